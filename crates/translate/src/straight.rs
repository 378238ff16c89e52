//! Host code for translated blocks.
//!
//! A block is: a prologue that loads the guest registers and arithmetic
//! flags from a [`Context`], the translated instructions, and an exit. Every
//! block leaves through the code buffer's one shared *epilogue*, which
//! stores the guest state back and returns to the dispatcher; the fault
//! handler enters the same epilogue. An exit to a known guest address is a
//! *stub* whose final `jmp` can be patched to go straight to another
//! block's body (chaining): guest state stays in host registers across the
//! jump, so a loop of translated blocks runs without the dispatcher.
//!
//! Register mapping: guest EAX, ECX, EDX, EBX, EBP, ESI, EDI are the host
//! registers with the same numbers, so most copied instructions need no
//! rewriting; guest ESP is R12D (the host's RSP stays the host stack); R13
//! is a scratch register; R15 holds the context pointer; R8 counts the
//! guest instructions of completed blocks; R14 is the chaining budget.
//! The host's arithmetic flags and DF are the guest's while guest code
//! runs; the system flags stay virtual in the context. Counting and the
//! budget use only flag-preserving instructions (LEA, MOV, JRCXZ).
//!
//! Guest memory is reached through GS: the calling thread's GS base must be
//! the guest window ([`set_gs_base`]).

use dynasm::dynasm;
use dynasmrt::{x64::X64Relocation, DynasmApi, VecAssembler};

use crate::code_buffer::CodeBuffer;

/// Guest state the host code reads and writes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Context {
    /// EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI.
    pub regs: [u32; 8],
    /// EFLAGS: only CF, PF, AF, ZF, SF, OF and DF are loaded and stored.
    pub eflags: u32,
    /// Where the guest goes next, written at every block exit.
    pub next_eip: u32,
    /// Set by the fault handler: the host address of the instruction that
    /// faulted (0 if the code ran to its exit).
    pub fault_rip: u64,
    /// Guest instructions of the blocks that completed in this run (the
    /// low [`LOOKUP_SHIFT`] bits), and indirect branches looked up in host
    /// code (the bits above): R8 counts both, with one LEA per block.
    pub retired: u64,
    /// Chained jumps allowed before returning to the dispatcher; what is
    /// left on return.
    pub chain_budget: u64,
    /// Opaque pointer handed to helper functions (the engine's state).
    pub env: u64,
    /// Set by the fault handler for a SIGSEGV: the host address accessed.
    pub fault_addr: u64,
    /// Set by the fault handler for a SIGSEGV: 1 if the access was a write.
    pub fault_write: u64,
    /// Of the indirect branches (RET, JMP/CALL r/m32) looked up in host
    /// code, the ones not found in the table (which return to the
    /// dispatcher; counted on that cold path, so a hit costs no count).
    pub indirect_misses: u64,
    /// Host address of the guest window GS points at (4 GiB-aligned):
    /// translated string instructions add it to ESI and EDI.
    pub window: u64,
    /// The system part of the guest's EFLAGS while its code runs: every
    /// bit outside [`HOST_FLAGS`] except IF, RF and VM (so PUSHF in host
    /// code adds it to the host's arithmetic flags). See [`Context::set_eflags`].
    pub sys: u32,
    /// The virtual IF: 0 or 0x200. CLI and STI in host code store it.
    pub vif: u32,
    /// 0 when POPF, CLI and STI may run in host code (CPL 0, neither RF
    /// nor VM set); otherwise they call the helper.
    pub slow: u32,
}

/// Offset of [`Context::sys`].
pub const SYS_OFFSET: u8 = 104;
/// Offset of [`Context::vif`].
pub const VIF_OFFSET: u8 = 108;
/// Offset of [`Context::slow`].
pub const SLOW_OFFSET: u8 = 112;

/// EFLAGS.IF.
const IF: u32 = 1 << 9;
/// EFLAGS.RF and EFLAGS.VM: never in a PUSHF image, never changed by POPF.
const RF_VM: u32 = 3 << 16;

impl Context {
    /// Hand the guest's whole EFLAGS to host code running at privilege
    /// level `cpl`: the arithmetic flags (in `eflags`, loaded into the
    /// host's), the system flags (`sys`), the virtual IF (`vif`).
    pub fn set_eflags(&mut self, eflags: u32, cpl: u8) {
        self.eflags = eflags;
        self.sys = eflags & !(HOST_FLAGS | IF | RF_VM);
        self.vif = eflags & IF;
        self.slow = u32::from(cpl != 0 || eflags & RF_VM != 0);
    }

    /// The guest's whole EFLAGS, as host code left it.
    pub fn guest_eflags(&self) -> u32 {
        (self.eflags & (HOST_FLAGS | RF_VM)) | self.sys | self.vif
    }
}

/// The bits of the host's RFLAGS image (PUSHFQ) outside [`HOST_FLAGS`]
/// while translated code runs: the reserved bit 1 and IF (user mode), and
/// AC and ID as the process has them (clear in practice). PUSHF in host
/// code subtracts them.
pub fn host_fixed_flags() -> u32 {
    let rflags: u64;
    // SAFETY: PUSHFQ and POP into a register touch only the stack slot
    // they push and pop.
    unsafe { std::arch::asm!("pushfq", "pop {}", out(reg) rflags) };
    rflags as u32 & !HOST_FLAGS
}

/// A flags instruction that runs in host code on the virtual IF and
/// system flags (Piece::Flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagsOp {
    /// PUSHFD at any CPL: the host's arithmetic flags, the system flags
    /// and the virtual IF, pushed on the guest stack. `host_fixed` is
    /// [`host_fixed_flags`] when the block was translated.
    Pushfd {
        /// What PUSHFQ adds outside the arithmetic flags.
        host_fixed: u32,
    },
    /// POPFD: at CPL 0 with TF clear in the image, in host code; otherwise
    /// the helper.
    Popfd,
    /// CLI: at CPL 0 in host code; otherwise the helper.
    Cli,
    /// STI: at CPL 0 in host code; otherwise the helper.
    Sti,
}

/// The system flags POPF changes at CPL 0 besides IF and TF.
const POPF_SYS: u32 = 0x3000 | 0x4000 | 0x4_0000 | 0x20_0000; // IOPL, NT, AC, ID
/// The system flags POPF keeps: VIF, VIP and the reserved bit 1.
const POPF_KEEPS: u32 = 0x8_0000 | 0x10_0000 | 2;

/// Offset of [`Context::window`].
pub const WINDOW_OFFSET: u8 = 96;

/// The GS base [`set_gs_base`] last set on this thread (0 if none).
pub fn gs_base() -> u64 {
    GS_BASE.with(|g| g.get()) as u64
}

/// Where [`Context::retired`] counts indirect-branch lookups: one run
/// retires fewer than 2^24 instructions (at most [`crate::engine::CHAIN_BUDGET`]
/// + 1 blocks of at most 65).
pub const LOOKUP_SHIFT: u32 = 24;

/// Offset of [`Context::indirect_misses`].
const INDIRECT_MISSES_OFFSET: u8 = 88;

/// One entry of the indirect-branch table that translated code searches
/// for the target of a RET or an indirect JMP/CALL: the guest EIP and the
/// host address of its translation's body. An empty entry's host address
/// is the shared epilogue (whatever EIP it holds, taking it just returns
/// to the dispatcher with the target already stored).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LookupEntry {
    /// Host address to jump to.
    pub host: u64,
    /// The guest EIP it translates, negated: host code adds the target EIP
    /// and tests for zero (JRCXZ, no flags).
    neg_eip: u32,
    _pad: u32,
}

impl LookupEntry {
    /// An entry for `eip`, translated at host address `host`.
    pub fn new(eip: u32, host: u64) -> LookupEntry {
        LookupEntry {
            host,
            neg_eip: eip.wrapping_neg(),
            _pad: 0,
        }
    }

    /// The guest EIP the entry translates.
    pub fn eip(&self) -> u32 {
        self.neg_eip.wrapping_neg()
    }
}

/// Entries in the indirect-branch table: indexed by the low 16 bits of the
/// guest EIP (direct-mapped; MOVZX computes it without touching flags).
pub const LOOKUP_ENTRIES: usize = 1 << 16;

/// Add one to the context's counter at `off` without touching flags:
/// `mov r11, [r15+off]; lea r11, [r11+1]; mov [r15+off], r11`.
fn bump(out: &mut Vec<u8>, off: u8) {
    out.extend([0x4D, 0x8B, 0x5F, off]);
    out.extend([0x4D, 0x8D, 0x5B, 0x01]);
    out.extend([0x4D, 0x89, 0x5F, off]);
}

/// The exit of a block whose next EIP is in R13D: look it up in the indirect-branch table at `table` and
/// jump straight to its translation (if the chaining budget allows), or
/// return to the dispatcher (a miss is counted there). Only
/// flag-neutral instructions (MOV, MOVZX, LEA, NOT, JRCXZ), like the
/// stubs; R9-R11 and R13 are scratch.
fn indirect_exit(out: &mut Vec<u8>, base: usize, epilogue: usize, table: u64) {
    out.extend([0x45, 0x0F, 0xB7, 0xDD]); // movzx r11d, r13w
    out.extend([0x49, 0xBA]); // mov r10, table
    out.extend(table.to_le_bytes());
    out.extend([0x4F, 0x8D, 0x1C, 0x1B]); // lea r11, [r11 + r11]
    out.extend([0x49, 0x89, 0xC9]); // mov r9, rcx (the guest's, until the end)
    out.extend([0x43, 0x8B, 0x4C, 0xDA, 0x08]); // mov ecx, [r10 + r11*8 + 8]: -EIP
    out.extend([0x42, 0x8D, 0x0C, 0x29]); // lea ecx, [rcx + r13]: 0 iff equal
    out.extend([0xE3, 24]); // jrcxz hit (over mov, store, count, jmp: 3 + 4 + 12 + 5)
    out.extend([0x4C, 0x89, 0xC9]); // miss: mov rcx, r9
    store_r13d_as_next(out);
    bump(out, INDIRECT_MISSES_OFFSET);
    jmp_to(out, base, epilogue);
    // hit: the chaining budget, as in a stub
    out.extend([0x49, 0x8D, 0x4E, 0xFF]); // lea rcx, [r14 - 1]
    out.extend([0x49, 0x89, 0xCE]); // mov r14, rcx
    out.extend([0xE3, 0x07]); // jrcxz budget_out (over mov, jmp: 3 + 4)
    out.extend([0x4C, 0x89, 0xC9]); // mov rcx, r9
    out.extend([0x43, 0xFF, 0x24, 0xDA]); // jmp [r10 + r11*8]
    out.extend([0x4C, 0x89, 0xC9]); // budget_out: mov rcx, r9
    store_r13d_as_next(out);
    jmp_to(out, base, epilogue);
}

/// A piece of a block's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Host code for one guest instruction.
    Code(&'a [u8]),
    /// One guest instruction executed by a helper call: the guest state is
    /// stored, `helper(ctx, eip, next_eip, arg)` runs it, and the block
    /// goes on if the helper returns 0, or leaves (the state is already in
    /// the context) if it returns 1.
    Helper(HelperCall),
    /// PUSHFD, POPFD, CLI or STI on the virtual flags in host code, with
    /// the helper call where host code cannot do it.
    Flags(FlagsOp, HelperCall),
    /// A conditional branch in the middle of a block (a superblock goes on
    /// at its fall-through): `jcc` to an exit stub for `target`, placed
    /// after the block's own exit, which counts `counted` instructions.
    Side {
        /// Condition nibble.
        cc: u8,
        /// Where the branch goes when taken.
        target: u32,
        /// Instructions of the block up to and including the branch.
        counted: usize,
    },
}

/// A helper call for one guest instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelperCall {
    /// The instruction's EIP.
    pub eip: u32,
    /// The EIP after it.
    pub next: u32,
    /// The helper's last argument (the engine's description of the
    /// instruction).
    pub arg: u32,
    /// Instructions before it in this block that the block counts.
    pub counted_before: usize,
}

/// The helper a [`Piece::Helper`] calls.
pub type Helper = extern "sysv64" fn(*mut Context, u32, u32, u32) -> u32;

/// Offset of [`Context::next_eip`].
pub const NEXT_EIP_OFFSET: i64 = 36;

/// The EFLAGS bits that live in the host's flags while guest code runs.
pub const HOST_FLAGS: u32 = 0xCD5;

/// How a block ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// To this guest address, through a patchable stub.
    Direct(u32),
    /// A Jcc: `cc` (the x86 condition nibble) taken goes to `taken`, else to
    /// `not_taken`; both through patchable stubs.
    Cond {
        /// Condition nibble.
        cc: u8,
        /// Target when the condition holds.
        taken: u32,
        /// Target otherwise.
        not_taken: u32,
    },
    /// LOOP: ECX is decremented (without touching flags); to `taken` if
    /// it is not zero, else to `not_taken`.
    Loop {
        /// Target while ECX is not zero.
        taken: u32,
        /// The instruction after the LOOP.
        not_taken: u32,
    },
    /// JECXZ: to `taken` if ECX is zero, else to `not_taken`.
    Jecxz {
        /// Target when ECX is zero.
        taken: u32,
        /// The instruction after the JECXZ.
        not_taken: u32,
    },
    /// The code before the exit left the next EIP in R13D (RET, indirect
    /// JMP and CALL); the exit stores it in the context only on its way
    /// back to the dispatcher.
    Stored,
}

/// A patchable jump in a block's exit stub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Site {
    /// Code-buffer offset of the jump's rel32 field.
    pub rel32: usize,
    /// The guest address the stub goes to.
    pub target: u32,
    /// Code-buffer offset the jump goes to while unchained: the stub's cold
    /// tail, which stores the next EIP and returns to the dispatcher.
    pub cold: usize,
}

/// Compiled host code for one block.
pub struct Straight {
    /// Executable address of the code (in a [`CodeBuffer`]).
    entry: *const u8,
    /// Code-buffer offset of the code.
    offset: usize,
    /// Code size in bytes.
    len: usize,
    /// Offset (in the code) of each translated instruction, in order.
    starts: Vec<usize>,
    /// End of the translated instructions.
    body_end: usize,
    /// Offset of the first translated instruction: where chained jumps land.
    body_start: usize,
    /// The patchable exits.
    sites: Vec<Site>,
}

/// Errors building host code.
#[derive(Debug)]
pub struct BuildError(pub String);

/// Bytes in one exit stub: count (4), mov (3), lea (4), mov (3), jrcxz
/// (2), mov (3), jmp (5); budget_out: mov (3); cold: store next EIP (8),
/// jmp (5).
const STUB_LEN: usize = 40;

/// `mov dword [r15 + NEXT_EIP], r13d`
fn store_r13d_as_next(out: &mut Vec<u8>) {
    out.extend([0x45, 0x89, 0x6F, NEXT_EIP_OFFSET as u8]);
}

/// `mov dword [r15 + NEXT_EIP], imm32`
fn store_next(out: &mut Vec<u8>, eip: u32) {
    out.extend([0x41, 0xC7, 0x47, NEXT_EIP_OFFSET as u8]);
    out.extend(eip.to_le_bytes());
}

/// Point the rel32 field at `at` (in `out`) to `to` (in `out`).
fn patch_rel32(out: &mut [u8], at: usize, to: usize) {
    let rel = (to as i64 - (at as i64 + 4)) as i32;
    out[at..at + 4].copy_from_slice(&rel.to_le_bytes());
}

/// One guest instruction run by `helper(ctx, eip, next, arg)`: store the
/// state and call; leave the block when the helper says so (counting the
/// `counted_before` instructions done in host code); the caller reloads
/// the state after it.
fn helper_call(out: &mut Vec<u8>, base: usize, h: Helper, call: &HelperCall) {
    let f = frame();
    out.extend_from_slice(&f.store_state);
    out.extend([0x4D, 0x89, 0x47, 0x30]); // mov [r15+48], r8
    out.extend([0x4C, 0x89, 0xFF]); // mov rdi, r15
    out.push(0xBE); // mov esi, eip
    out.extend(call.eip.to_le_bytes());
    out.push(0xBA); // mov edx, next
    out.extend(call.next.to_le_bytes());
    out.push(0xB9); // mov ecx, arg
    out.extend(call.arg.to_le_bytes());
    out.extend([0x48, 0xB8]); // mov rax, helper
    out.extend((h as usize as u64).to_le_bytes());
    out.extend([0x48, 0x83, 0xEC, 0x08]); // sub rsp, 8 (16-byte alignment)
    out.extend([0xFF, 0xD0]); // call rax
    out.extend([0x48, 0x83, 0xC4, 0x08]); // add rsp, 8
    out.extend([0x4D, 0x8B, 0x47, 0x30]); // mov r8, [r15+48]
    out.extend([0x85, 0xC0]); // test eax, eax
    out.extend([0x74, 9]); // jz over the leaving path: count (4) + jmp (5)
    count(out, call.counted_before);
    jmp_to(out, base, leave_offset());
}

/// The host code of a [`FlagsOp`]'s fast path. Returns the offsets (in
/// `out`) of rel32 fields to point at the slow path (a helper call), which
/// the caller places after a jump over it; none for PUSHFD.
///
/// Everything before a jump to the slow path leaves the guest's flags as
/// they were, except POPF's TF test, after which the helper's POPF sets
/// every arithmetic flag anyway (its load has just succeeded). The only
/// instruction that can fault comes first (the guest stack access), so a
/// fault finds the guest state as it was before the instruction.
fn flags_fast_path(out: &mut Vec<u8>, op: FlagsOp) -> Vec<usize> {
    let mut to_slow = Vec::new();
    // CPL 0? Flag-free: `slow` through RCX for JRCXZ.
    let mut cpl0_or_slow = |out: &mut Vec<u8>| {
        out.extend([0x49, 0x89, 0xCB]); // mov r11, rcx
        out.extend([0x41, 0x8B, 0x4F, SLOW_OFFSET]); // mov ecx, [r15+slow]
        out.extend([0xE3, 0x08]); // jrcxz fast
        out.extend([0x4C, 0x89, 0xD9]); // mov rcx, r11
        out.extend([0xE9, 0, 0, 0, 0]); // jmp slow
        to_slow.push(out.len() - 4);
        out.extend([0x4C, 0x89, 0xD9]); // fast: mov rcx, r11
    };
    match op {
        FlagsOp::Pushfd { host_fixed } => {
            out.push(0x9C); // pushfq
            out.extend([0x41, 0x5B]); // pop r11
            out.extend([0x45, 0x8B, 0x6F, SYS_OFFSET]); // mov r13d, [r15+sys]
            out.extend([0x47, 0x8D, 0x9C, 0x2B]); // lea r11d, [r11+r13-host_fixed]
            out.extend(host_fixed.wrapping_neg().to_le_bytes());
            out.extend([0x45, 0x8B, 0x6F, VIF_OFFSET]); // mov r13d, [r15+vif]
            out.extend([0x47, 0x8D, 0x1C, 0x2B]); // lea r11d, [r11+r13]
            out.extend([0x65, 0x67, 0x45, 0x89, 0x5C, 0x24, 0xFC]); // mov gs:[r12d-4], r11d
            out.extend([0x45, 0x8D, 0x64, 0x24, 0xFC]); // lea r12d, [r12-4]
        }
        FlagsOp::Cli | FlagsOp::Sti => {
            cpl0_or_slow(out);
            let vif = if op == FlagsOp::Sti { IF } else { 0 };
            out.extend([0x41, 0xC7, 0x47, VIF_OFFSET]); // mov dword [r15+vif], imm32
            out.extend(vif.to_le_bytes());
        }
        FlagsOp::Popfd => {
            cpl0_or_slow(out);
            out.extend([0x65, 0x67, 0x45, 0x8B, 0x1C, 0x24]); // mov r11d, gs:[r12d]
            out.extend([0x41, 0xF7, 0xC3, 0x00, 0x01, 0x00, 0x00]); // test r11d, TF
            out.extend([0x0F, 0x85, 0, 0, 0, 0]); // jnz slow (single-stepping)
            to_slow.push(out.len() - 4);
            out.extend([0x45, 0x8D, 0x64, 0x24, 0x04]); // lea r12d, [r12+4]
            out.extend([0x45, 0x89, 0xDD]); // mov r13d, r11d
            out.extend([0x41, 0x81, 0xE5]); // and r13d, IF
            out.extend(IF.to_le_bytes());
            out.extend([0x45, 0x89, 0x6F, VIF_OFFSET]); // mov [r15+vif], r13d
            out.extend([0x45, 0x89, 0xDD]); // mov r13d, r11d
            out.extend([0x41, 0x81, 0xE5]); // and r13d, POPF_SYS
            out.extend(POPF_SYS.to_le_bytes());
            out.extend([0x45, 0x8B, 0x4F, SYS_OFFSET]); // mov r9d, [r15+sys]
            out.extend([0x41, 0x81, 0xE1]); // and r9d, POPF_KEEPS
            out.extend(POPF_KEEPS.to_le_bytes());
            out.extend([0x45, 0x09, 0xE9]); // or r9d, r13d
            out.extend([0x45, 0x89, 0x4F, SYS_OFFSET]); // mov [r15+sys], r9d
            out.extend([0x41, 0x81, 0xE3]); // and r11d, HOST_FLAGS
            out.extend(HOST_FLAGS.to_le_bytes());
            out.extend([0x41, 0x83, 0xCB, 0x02]); // or r11d, 2
            out.extend([0x41, 0x53]); // push r11
            out.push(0x9D); // popfq
        }
    }
    to_slow
}

/// `lea r8, [r8 + n]` (n below 128): count this block's instructions.
fn count(out: &mut Vec<u8>, n: usize) {
    out.extend([0x4D, 0x8D, 0x40, n as u8]);
}

/// `jmp rel32` to code-buffer offset `to`, from code at offset `base + out.len()`.
fn jmp_to(out: &mut Vec<u8>, base: usize, to: usize) {
    let next = base + out.len() + 5;
    out.push(0xE9);
    out.extend(((to as i64 - next as i64) as i32).to_le_bytes());
}

impl Straight {
    /// Compile translated instructions (host bytes, in order) ending in
    /// `exit` into `buf`. `n` is the number of guest instructions. Fails
    /// with [`BuildError`] when the buffer is full.
    pub fn compile_block(
        buf: &mut CodeBuffer,
        body: &[Piece],
        n: usize,
        end_eip: u32,
        exit: Option<&Exit>,
        helper: Option<Helper>,
        lookup: Option<*const LookupEntry>,
    ) -> Result<Straight, BuildError> {
        let lookup = lookup.map(|t| t as u64);
        let epilogue = ensure_epilogue(buf)?;
        let base = buf.next_offset();
        let f = frame();
        let code_bytes: usize = body
            .iter()
            .map(|p| match p {
                Piece::Code(b) => b.len(),
                Piece::Helper(_) => 128,
                Piece::Flags(..) => 256,
                Piece::Side { .. } => 6,
            })
            .sum();
        let mut out = Vec::with_capacity(f.prologue.len() + code_bytes + 3 * STUB_LEN + 96);
        out.extend_from_slice(&f.prologue);
        let body_start = out.len();
        let mut starts = Vec::with_capacity(body.len());
        // Side exits: (offset of the jcc's rel32, target, count).
        let mut sides = Vec::new();
        for piece in body {
            starts.push(out.len());
            match piece {
                Piece::Code(b) => out.extend_from_slice(b),
                Piece::Side {
                    cc,
                    target,
                    counted,
                } => {
                    out.extend([0x0F, 0x80 | cc, 0, 0, 0, 0]); // jcc side stub (patched below)
                    sides.push((out.len() - 4, *target, *counted));
                }
                Piece::Helper(call) => {
                    let h =
                        helper.ok_or_else(|| BuildError("helper piece without a helper".into()))?;
                    helper_call(&mut out, base, h, call);
                    out.extend_from_slice(&f.load_state);
                }
                Piece::Flags(op, call) => {
                    let to_slow = flags_fast_path(&mut out, *op);
                    if !to_slow.is_empty() {
                        let h = helper
                            .ok_or_else(|| BuildError("flags piece without a helper".into()))?;
                        out.extend([0xE9, 0, 0, 0, 0]); // jmp done
                        let over = out.len();
                        let slow = out.len();
                        for at in to_slow {
                            patch_rel32(&mut out, at, slow);
                        }
                        helper_call(&mut out, base, h, call);
                        out.extend_from_slice(&f.load_state);
                        // The helper retired the instruction, which the
                        // block's exit counts too.
                        out.extend([0x4D, 0x8D, 0x40, 0xFF]); // lea r8, [r8-1]
                        let done = out.len();
                        patch_rel32(&mut out, over - 4, done);
                    }
                }
            }
        }
        let body_end = out.len();
        let mut sites = Vec::with_capacity(2);
        // One stub: count, budget, patchable jump; the next EIP is stored
        // only on the cold path back to the dispatcher (a chained jump
        // carries it in the code). The budget goes through RCX for JRCXZ
        // with MOVs (R13 is scratch), cheaper than two XCHGs.
        let stub_counting = |out: &mut Vec<u8>, sites: &mut Vec<Site>, target: u32, n: usize| {
            count(out, n);
            out.extend([0x49, 0x89, 0xCD]); // mov r13, rcx
            out.extend([0x49, 0x8D, 0x4E, 0xFF]); // lea rcx, [r14 - 1]
            out.extend([0x49, 0x89, 0xCE]); // mov r14, rcx
            out.extend([0xE3, 0x08]); // jrcxz budget_out
            out.extend([0x4C, 0x89, 0xE9]); // mov rcx, r13
            let cold = base + out.len() + 5 + 3;
            jmp_to(out, base, cold); // the patch site
            sites.push(Site {
                rel32: base + out.len() - 4,
                target,
                cold,
            });
            out.extend([0x4C, 0x89, 0xE9]); // budget_out: mov rcx, r13
            debug_assert_eq!(base + out.len(), cold);
            store_next(out, target);
            jmp_to(out, base, epilogue);
        };
        let stub = |out: &mut Vec<u8>, sites: &mut Vec<Site>, target: u32| {
            stub_counting(out, sites, target, n)
        };
        match exit {
            Some(Exit::Direct(t)) => stub(&mut out, &mut sites, *t),
            Some(Exit::Cond {
                cc,
                taken,
                not_taken,
            }) => {
                // jcc over the not-taken stub (whose length is fixed)
                out.extend([0x0F, 0x80 | cc]);
                out.extend((STUB_LEN as u32).to_le_bytes());
                let before = out.len();
                stub(&mut out, &mut sites, *not_taken);
                debug_assert_eq!(out.len() - before, STUB_LEN);
                stub(&mut out, &mut sites, *taken);
            }
            Some(Exit::Loop { taken, not_taken }) => {
                out.extend([0x8D, 0x49, 0xFF]); // lea ecx, [rcx - 1]: no flags
                out.extend([0x67, 0xE3, STUB_LEN as u8]); // jecxz over the taken stub
                stub(&mut out, &mut sites, *taken);
                stub(&mut out, &mut sites, *not_taken);
            }
            Some(Exit::Jecxz { taken, not_taken }) => {
                out.extend([0x67, 0xE3, STUB_LEN as u8]); // jecxz over the not-taken stub
                stub(&mut out, &mut sites, *not_taken);
                stub(&mut out, &mut sites, *taken);
            }
            Some(Exit::Stored) => match lookup {
                Some(table) => {
                    // The block's instructions and one lookup, in one LEA.
                    out.extend([0x4D, 0x8D, 0x80]); // lea r8, [r8 + disp32]
                    out.extend(((n as u32) | 1 << LOOKUP_SHIFT).to_le_bytes());
                    indirect_exit(&mut out, base, epilogue, table);
                }
                None => {
                    store_r13d_as_next(&mut out);
                    count(&mut out, n);
                    jmp_to(&mut out, base, epilogue);
                }
            },
            None => {
                store_next(&mut out, end_eip);
                count(&mut out, n);
                jmp_to(&mut out, base, epilogue);
            }
        }
        for (rel32, target, counted) in sides {
            let here = out.len();
            out[rel32..rel32 + 4].copy_from_slice(&((here - (rel32 + 4)) as u32).to_le_bytes());
            stub_counting(&mut out, &mut sites, target, counted);
        }
        let at = buf
            .append(&out)
            .ok_or_else(|| BuildError("code buffer full".into()))?;
        debug_assert_eq!(at, base);
        Ok(Straight {
            entry: buf.exec_addr(at),
            offset: at,
            len: out.len(),
            starts,
            body_end,
            body_start,
            sites,
        })
    }

    /// Compile a straight run of instructions that ends by returning to
    /// the dispatcher (used by tests).
    pub fn compile<'a>(
        buf: &mut CodeBuffer,
        body: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Straight, BuildError> {
        let body: Vec<Piece> = body.into_iter().map(Piece::Code).collect();
        let n = body.len();
        Straight::compile_block(buf, &body, n, 0, None, None, None)
    }

    /// The index of the translated instruction at host address `rip`, if
    /// `rip` lies in this block's translated instructions.
    pub fn instruction_at(&self, rip: u64) -> Option<usize> {
        let off = rip.checked_sub(self.entry as u64)? as usize;
        if off >= self.body_end || self.starts.first().is_none_or(|s| off < *s) {
            return None;
        }
        Some(self.starts.partition_point(|s| *s <= off) - 1)
    }

    /// Host code size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Is the code empty (never: there is always a prologue and an exit)?
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Executable address of the code.
    pub fn entry(&self) -> *const u8 {
        self.entry
    }

    /// Code-buffer offset of the code.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Code-buffer offset where chained jumps into this block land.
    pub fn body_offset(&self) -> usize {
        self.offset + self.body_start
    }

    /// The patchable exits.
    pub fn sites(&self) -> &[Site] {
        &self.sites
    }

    /// Run the code on `ctx` (and whatever it chains to). If a translated
    /// instruction faults (a host SIGSEGV or SIGFPE), the guest state
    /// *before* it is in `ctx` and `ctx.fault_rip` says where it was.
    ///
    /// # Safety
    ///
    /// The calling thread's GS base must be a guest window, the fault
    /// handler must be installed ([`crate::fault::install`]), the code
    /// (and every block it chains to) must have been built by this module
    /// from instructions lowered by [`crate::lower`], and `buf` must be the
    /// buffer holding it.
    pub unsafe fn run(&self, buf: &CodeBuffer, ctx: &mut Context) {
        type Entry = extern "sysv64" fn(*mut Context);
        ctx.fault_rip = 0;
        ctx.fault_addr = 0;
        ctx.fault_write = 0;
        ctx.retired = 0;
        ctx.indirect_misses = 0;
        let active = crate::fault::Active {
            start: buf.exec_addr(0) as u64,
            end: buf.exec_addr(0) as u64 + buf.next_offset() as u64,
            fault_entry: buf.exec_addr(epilogue_offset()) as u64,
            ctx: ctx as *mut Context,
        };
        crate::fault::set_active(Some(active));
        // SAFETY: `entry` is the executable copy of a block emitted in
        // `compile_block`: a prologue for a function of type `Entry`, code
        // that keeps the stack as the prologue left it, and an exit through
        // the shared epilogue, which restores the callee-saved registers
        // and returns with DF clear.
        let f: Entry = unsafe { std::mem::transmute::<*const u8, Entry>(self.entry) };
        f(ctx);
        crate::fault::set_active(None);
    }
}

/// The shared epilogue lives at the start of every code buffer.
pub fn epilogue_offset() -> usize {
    0
}

/// Offset of the shared "leave" routine (after a helper asked to leave:
/// the guest state is already in the context).
pub fn leave_offset() -> usize {
    frame().epilogue.len().next_multiple_of(16)
}

/// Put the shared epilogue and leave routine at the start of `buf` if it
/// is empty; the epilogue's offset.
fn ensure_epilogue(buf: &mut CodeBuffer) -> Result<usize, BuildError> {
    if buf.next_offset() == 0 {
        let f = frame();
        let at = buf
            .append(&f.epilogue)
            .ok_or_else(|| BuildError("code buffer too small".into()))?;
        debug_assert_eq!(at, epilogue_offset());
        let at = buf
            .append(&f.leave)
            .ok_or_else(|| BuildError("code buffer too small".into()))?;
        debug_assert_eq!(at, leave_offset());
    }
    Ok(epilogue_offset())
}

/// The fixed code sequences, assembled once (dynasmrt); all are
/// position-independent.
struct Frame {
    /// Block entry: push the frame, load the state.
    prologue: Vec<u8>,
    /// Store the guest registers and flags into the context.
    store_state: Vec<u8>,
    /// Load the guest registers and flags from the context.
    load_state: Vec<u8>,
    /// Store the state and counters, pop the frame, return.
    epilogue: Vec<u8>,
    /// Store the counters, pop the frame, return (state already stored).
    leave: Vec<u8>,
}

fn frame() -> &'static Frame {
    static FRAME: std::sync::OnceLock<Frame> = std::sync::OnceLock::new();
    FRAME.get_or_init(|| {
        let mut ops: VecAssembler<X64Relocation> = VecAssembler::new(0);
        dynasm!(ops
            ; .arch x64
            ; mov eax, DWORD [r15 + 32]
            ; and eax, HOST_FLAGS as i32
            ; push rax
            ; popfq
            ; mov eax, DWORD [r15]
            ; mov ecx, DWORD [r15 + 4]
            ; mov edx, DWORD [r15 + 8]
            ; mov ebx, DWORD [r15 + 12]
            ; mov r12d, DWORD [r15 + 16]
            ; mov ebp, DWORD [r15 + 20]
            ; mov esi, DWORD [r15 + 24]
            ; mov edi, DWORD [r15 + 28]
        );
        let load_state = ops.take().expect("assembles");
        dynasm!(ops
            ; .arch x64
            ; mov DWORD [r15], eax
            ; mov DWORD [r15 + 4], ecx
            ; mov DWORD [r15 + 8], edx
            ; mov DWORD [r15 + 12], ebx
            ; mov DWORD [r15 + 16], r12d
            ; mov DWORD [r15 + 20], ebp
            ; mov DWORD [r15 + 24], esi
            ; mov DWORD [r15 + 28], edi
            ; pushfq
            ; pop rax
            ; and eax, HOST_FLAGS as i32
            ; mov ecx, DWORD [r15 + 32]
            ; and ecx, !HOST_FLAGS as i32
            ; or eax, ecx
            ; mov DWORD [r15 + 32], eax
        );
        let store_state = ops.take().expect("assembles");
        dynasm!(ops
            ; .arch x64
            ; push rbx
            ; push rbp
            ; push r12
            ; push r13
            ; push r14
            ; push r15
            ; mov r15, rdi
            ; xor r8d, r8d
            ; mov r14, QWORD [r15 + 56]
        );
        let mut prologue = ops.take().expect("assembles");
        prologue.extend_from_slice(&load_state);
        dynasm!(ops
            ; .arch x64
            ; mov QWORD [r15 + 48], r8
            ; mov QWORD [r15 + 56], r14
            ; cld
            ; pop r15
            ; pop r14
            ; pop r13
            ; pop r12
            ; pop rbp
            ; pop rbx
            ; ret
        );
        let leave = ops.finalize().expect("assembles");
        let mut epilogue = store_state.clone();
        epilogue.extend_from_slice(&leave);
        Frame {
            prologue,
            store_state,
            load_state,
            epilogue,
            leave,
        }
    })
}

thread_local! {
    /// What this thread's GS base was last set to.
    static GS_BASE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Set the calling thread's GS base (ARCH_SET_GS). popek's host code reaches
/// guest memory as `gs:[addr32]`; nothing else in a Rust program on x86-64
/// Linux uses GS (thread-locals use FS).
pub fn set_gs_base(base: *mut u8) -> std::io::Result<()> {
    const ARCH_SET_GS: libc::c_long = 0x1001;
    if GS_BASE.with(|g| g.get()) == base as usize {
        return Ok(());
    }
    // SAFETY: arch_prctl(ARCH_SET_GS) only changes this thread's GS base,
    // which no Rust or libc code on x86-64 Linux relies on.
    let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_SET_GS, base as libc::c_ulong) };
    if r == 0 {
        GS_BASE.with(|g| g.set(base as usize));
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

    fn disassemble(code: &[u8]) -> Vec<String> {
        let mut d = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
        let mut fmt = IntelFormatter::new();
        let mut text = Vec::new();
        while d.can_decode() {
            let ins = d.decode();
            assert!(!ins.is_invalid(), "{text:?}");
            let mut t = String::new();
            fmt.format(&ins, &mut t);
            text.push(t);
        }
        text
    }

    /// The hand-encoded fast paths of PUSHFD, POPFD, CLI and STI
    /// disassemble to the intended instructions, and the context offsets
    /// they use are the fields'.
    #[test]
    fn flags_fast_path_encoding() {
        let mut out = Vec::new();
        let slow = flags_fast_path(&mut out, FlagsOp::Pushfd { host_fixed: 0x202 });
        assert!(slow.is_empty());
        assert_eq!(
            disassemble(&out),
            [
                "pushfq",
                "pop r11",
                "mov r13d,[r15+68h]",
                "lea r11d,[r11+r13-202h]",
                "mov r13d,[r15+6Ch]",
                "lea r11d,[r11+r13]",
                "mov gs:[r12d-4],r11d",
                "lea r12d,[r12-4]",
            ]
        );
        let cpl_check = [
            "mov r11,rcx",
            "mov ecx,[r15+70h]",
            "jrcxz 0000000000000011h",
            "mov rcx,r11",
            "jmp 0000000000000016h",
            "mov rcx,r11",
        ];
        for (op, store) in [
            (FlagsOp::Cli, "mov dword ptr [r15+6Ch],0"),
            (FlagsOp::Sti, "mov dword ptr [r15+6Ch],200h"),
        ] {
            let mut out = Vec::new();
            let slow = flags_fast_path(&mut out, op);
            patch_rel32(&mut out, slow[0], 0x16);
            let mut want = cpl_check.to_vec();
            want.push(store);
            assert_eq!(disassemble(&out), want);
        }
        let mut out = Vec::new();
        let slow = flags_fast_path(&mut out, FlagsOp::Popfd);
        assert_eq!(slow.len(), 2);
        patch_rel32(&mut out, slow[0], 0x16);
        patch_rel32(&mut out, slow[1], 0x16);
        let mut want = cpl_check.to_vec();
        want.extend([
            "mov r11d,gs:[r12d]",
            "test r11d,100h",
            "jne 0000000000000016h",
            "lea r12d,[r12+4]",
            "mov r13d,r11d",
            "and r13d,200h",
            "mov [r15+6Ch],r13d",
            "mov r13d,r11d",
            "and r13d,247000h",
            "mov r9d,[r15+68h]",
            "and r9d,180002h",
            "or r9d,r13d",
            "mov [r15+68h],r9d",
            "and r11d,0CD5h",
            "or r11d,2",
            "push r11",
            "popfq",
        ]);
        assert_eq!(disassemble(&out), want);
        assert_eq!(std::mem::offset_of!(Context, sys), SYS_OFFSET as usize);
        assert_eq!(std::mem::offset_of!(Context, vif), VIF_OFFSET as usize);
        assert_eq!(std::mem::offset_of!(Context, slow), SLOW_OFFSET as usize);
        // What PUSHFD subtracts is what the host's PUSHFQ shows outside
        // the arithmetic flags in a normal process: bit 1 and IF.
        assert_eq!(host_fixed_flags(), 0x202);
    }

    /// The hand-encoded indirect-branch exit disassembles to the intended
    /// instructions, and its two JRCXZs land where they should.
    #[test]
    fn indirect_exit_encoding() {
        let mut out = Vec::new();
        indirect_exit(&mut out, 0x1000, 0, 0x1122_3344_5566_7788);
        let mut d = Decoder::with_ip(64, &out, 0x1000, DecoderOptions::NONE);
        let mut fmt = IntelFormatter::new();
        let mut text = Vec::new();
        let mut at = Vec::new();
        while d.can_decode() {
            let ins = d.decode();
            assert!(!ins.is_invalid());
            let mut t = String::new();
            fmt.format(&ins, &mut t);
            at.push((ins.ip(), ins.near_branch_target()));
            text.push(t);
        }
        let want = [
            "movzx r11d,r13w",
            "mov r10,1122334455667788h",
            "lea r11,[r11+r11]",
            "mov r9,rcx",
            "mov ecx,[r10+r11*8+8]",
            "lea ecx,[rcx+r13]",
            "jrcxz",
            "mov rcx,r9",
            "mov [r15+24h],r13d",
            "mov r11,[r15+58h]",
            "lea r11,[r11+1]",
            "mov [r15+58h],r11",
            "jmp 0",
            "lea rcx,[r14-1]",
            "mov r14,rcx",
            "jrcxz",
            "mov rcx,r9",
            "jmp qword ptr [r10+r11*8]",
            "mov rcx,r9",
            "mov [r15+24h],r13d",
            "jmp 0",
        ];
        let text: Vec<&str> = text
            .iter()
            .map(|t| if t.starts_with("jrcxz") { "jrcxz" } else { t })
            .collect();
        assert_eq!(text, want);
        // The first JRCXZ goes to the hit path, the second to budget_out.
        let ip_of = |i: usize| at[i].0;
        assert_eq!(at[6].1, ip_of(13));
        assert_eq!(at[15].1, ip_of(18));
        assert_eq!(
            std::mem::offset_of!(Context, indirect_misses),
            INDIRECT_MISSES_OFFSET as usize
        );
        assert_eq!(
            std::mem::offset_of!(Context, next_eip),
            NEXT_EIP_OFFSET as usize
        );
        assert_eq!(
            std::mem::offset_of!(Context, window),
            WINDOW_OFFSET as usize
        );
    }
}
