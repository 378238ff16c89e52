//! Host code for translated blocks.
//!
//! A block is: a prologue that loads the guest registers and arithmetic
//! flags from a [`Context`], the translated instructions ([`Piece`]s), and
//! an exit ([`BlockExit`]). Every block leaves through the code buffer's
//! one shared *epilogue* ([`frame`]), which stores the guest state back and
//! returns to the dispatcher; the fault handler enters the same epilogue.
//! An exit to a known guest address is a *stub* whose final `jmp` can be
//! patched to go straight to another block's body (chaining, see
//! [`crate::chain`]): guest state stays in host registers across the jump,
//! so a loop of translated blocks runs without the dispatcher.
//!
//! Register mapping: guest EAX, ECX, EDX, EBX, EBP, ESI, EDI are the host
//! registers with the same numbers, so most copied instructions need no
//! rewriting; guest ESP is R12D (the host's RSP stays the host stack); R13
//! is a scratch register; R15 holds the context pointer; R8 counts the
//! guest instructions of completed blocks; R14 is the chaining budget.
//! The host's arithmetic flags and DF are the guest's while guest code
//! runs; the system flags stay virtual in the context. Counting and the
//! budget use only flag-preserving instructions (LEA, MOV, JRCXZ), so a
//! stub never disturbs the guest's flags.
//!
//! Layout of a block in the code buffer:
//!
//! ```text
//! prologue | body: one piece per guest instruction | exit stub(s) | side-exit stubs
//!   ^ entry (from the dispatcher)  ^ body_offset (chained jumps land here)
//! ```
//!
//! Guest memory is reached through GS: the calling thread's GS base must be
//! the guest window ([`crate::host::set_gs_base`]).

pub mod flags;
pub mod frame;
pub mod indirect;

pub use flags::FlagsOp;
pub use frame::{epilogue_offset, leave_offset};
pub use indirect::{LookupEntry, LOOKUP_ENTRIES};

use crate::abi::{BlockEntryFn, Context, HelperFn, LOOKUP_SHIFT, NEXT_EIP, RETIRED};
use crate::host::CodeBuffer;
use flags::flags_fast_path;
use frame::{ensure_epilogue, frame};
use indirect::indirect_exit;

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

/// How a block ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockExit {
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
pub struct HostBlock {
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
pub(crate) fn store_r13d_as_next(out: &mut Vec<u8>) {
    out.extend([0x45, 0x89, 0x6F, NEXT_EIP]);
}

/// `mov dword [r15 + NEXT_EIP], imm32`
fn store_next(out: &mut Vec<u8>, eip: u32) {
    out.extend([0x41, 0xC7, 0x47, NEXT_EIP]);
    out.extend(eip.to_le_bytes());
}

/// Point the rel32 field at `at` (in `out`) to `to` (in `out`).
pub(crate) fn patch_rel32(out: &mut [u8], at: usize, to: usize) {
    let rel = (to as i64 - (at as i64 + 4)) as i32;
    out[at..at + 4].copy_from_slice(&rel.to_le_bytes());
}

/// One guest instruction run by `helper(ctx, eip, next, arg)`: store the
/// state and call; leave the block when the helper says so (counting the
/// `counted_before` instructions done in host code); the caller reloads
/// the state after it.
pub(crate) fn helper_call(out: &mut Vec<u8>, base: usize, h: HelperFn, call: &HelperCall) {
    let f = frame();
    out.extend_from_slice(&f.store_state);
    out.extend([0x4D, 0x89, 0x47, RETIRED]); // mov [r15+retired], r8
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
    out.extend([0x4D, 0x8B, 0x47, RETIRED]); // mov r8, [r15+retired]
    out.extend([0x85, 0xC0]); // test eax, eax
    out.extend([0x74, 9]); // jz over the leaving path: count (4) + jmp (5)
    count(out, call.counted_before);
    jmp_to(out, base, leave_offset());
}

/// `lea r8, [r8 + n]` (n below 128): count this block's instructions.
pub(crate) fn count(out: &mut Vec<u8>, n: usize) {
    out.extend([0x4D, 0x8D, 0x40, n as u8]);
}

/// `jmp rel32` to code-buffer offset `to`, from code at offset `base + out.len()`.
pub(crate) fn jmp_to(out: &mut Vec<u8>, base: usize, to: usize) {
    let next = base + out.len() + 5;
    out.push(0xE9);
    out.extend(((to as i64 - next as i64) as i32).to_le_bytes());
}

impl HostBlock {
    /// Compile translated instructions (host bytes, in order) ending in
    /// `exit` into `buf`. `n` is the number of guest instructions. Fails
    /// with [`BuildError`] when the buffer is full.
    pub fn compile_block(
        buf: &mut CodeBuffer,
        body: &[Piece],
        n: usize,
        end_eip: u32,
        exit: Option<&BlockExit>,
        helper: Option<HelperFn>,
        lookup: Option<*const LookupEntry>,
    ) -> Result<HostBlock, BuildError> {
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
            Some(BlockExit::Direct(t)) => stub(&mut out, &mut sites, *t),
            Some(BlockExit::Cond {
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
            Some(BlockExit::Loop { taken, not_taken }) => {
                out.extend([0x8D, 0x49, 0xFF]); // lea ecx, [rcx - 1]: no flags
                out.extend([0x67, 0xE3, STUB_LEN as u8]); // jecxz over the taken stub
                stub(&mut out, &mut sites, *taken);
                stub(&mut out, &mut sites, *not_taken);
            }
            Some(BlockExit::Jecxz { taken, not_taken }) => {
                out.extend([0x67, 0xE3, STUB_LEN as u8]); // jecxz over the not-taken stub
                stub(&mut out, &mut sites, *not_taken);
                stub(&mut out, &mut sites, *taken);
            }
            Some(BlockExit::Stored) => match lookup {
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
        Ok(HostBlock {
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
    ) -> Result<HostBlock, BuildError> {
        let body: Vec<Piece> = body.into_iter().map(Piece::Code).collect();
        let n = body.len();
        HostBlock::compile_block(buf, &body, n, 0, None, None, None)
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
    /// handler must be installed ([`crate::host::fault::install`]), the code
    /// (and every block it chains to) must have been built by this module
    /// from instructions lowered by [`crate::lower`], and `buf` must be the
    /// buffer holding it.
    pub unsafe fn run(&self, buf: &CodeBuffer, ctx: &mut Context) {
        ctx.fault_rip = 0;
        ctx.fault_addr = 0;
        ctx.fault_write = 0;
        ctx.retired = 0;
        ctx.indirect_misses = 0;
        let active = crate::host::fault::Active {
            start: buf.exec_addr(0) as u64,
            end: buf.exec_addr(0) as u64 + buf.next_offset() as u64,
            fault_entry: buf.exec_addr(epilogue_offset()) as u64,
            ctx: ctx as *mut Context,
        };
        crate::host::fault::set_active(Some(active));
        // SAFETY: `entry` is the executable copy of a block emitted in
        // `compile_block`: a prologue for a function of type `Entry`, code
        // that keeps the stack as the prologue left it, and an exit through
        // the shared epilogue, which restores the callee-saved registers
        // and returns with DF clear.
        let f: BlockEntryFn = unsafe { std::mem::transmute::<*const u8, BlockEntryFn>(self.entry) };
        f(ctx);
        crate::host::fault::set_active(None);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

    /// Host code disassembled (Intel syntax), one string per instruction.
    pub(crate) fn disassemble(code: &[u8]) -> Vec<String> {
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
}
