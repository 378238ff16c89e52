//! Host code for translated blocks.
//!
//! A block is the translated instructions ([`Piece`]s) and an exit
//! ([`BlockExit`]). The dispatcher enters every block through the code
//! buffer's one shared entry routine (the prologue, [`frame`]), which
//! loads the guest registers and arithmetic flags from a [`Context`] and
//! jumps to the block. Every block leaves through the code buffer's
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
//! is a scratch register; R15 holds the context pointer; with counting
//! ([`Pace::Counted`]) R8 counts the guest instructions of completed blocks
//! and R14 is the chaining budget. The host's arithmetic flags and DF are
//! the guest's while guest code runs; the system flags stay virtual in the
//! context. Counting, the budget and polls use only flag-preserving
//! instructions (LEA, MOV, JRCXZ), so a stub never disturbs the guest's
//! flags.
//!
//! Layout of a block in the code buffer:
//!
//! ```text
//! body: one piece per guest instruction | exit stub(s) | side-exit stubs
//! ^ body_offset (the entry routine and chained jumps land here)
//! ```
//!
//! Guest memory is reached through GS: the calling thread's GS base must be
//! the guest window ([`crate::host::set_gs_base`]).

mod asm;
pub mod flags;
pub mod frame;
pub mod indirect;

pub use flags::FlagsOp;
pub use frame::{entry_offset, epilogue_offset, helper_offset, leave_offset, miss_offset};

use dynasm::dynasm;
use dynasmrt::{DynasmApi, DynasmLabelApi};

pub(crate) use asm::Asm;

use crate::abi::{
    BlockEntryFn, Context, FAST_MAP, LOOKUP_SHIFT, NEXT_EIP, PAGE_DELTAS, RAM_RW, SCRATCH,
    SCRATCH2, SEG_SLOW, TSC_OFFSET, TSC_SLOW,
};
use crate::host::CodeBuffer;
use crate::paging::Regions;
use flags::flags_fast_path;
use frame::ensure_epilogue;
use indirect::indirect_exit;

/// A piece of a block's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Host code for one guest instruction.
    Code(&'a [u8]),
    /// One guest instruction executed by a helper call: the guest state is
    /// stored, `helper(ctx, arg)` runs it, and the block
    /// goes on if the helper returns 0, or leaves (the state is already in
    /// the context) if it returns 1.
    Helper(HelperCall),
    /// PUSHFD, POPFD, CLI or STI on the virtual flags in host code, with
    /// the helper call where host code cannot do it.
    Flags(FlagsOp, HelperCall),
    /// An access through FS or GS (`fs` true for FS): `code` (from
    /// [`crate::lower::lower_seg_override`]) while the segment is flat,
    /// else the helper call (the interpreter checks the segment).
    Segment {
        /// FS (true) or GS.
        fs: bool,
        /// Host code for the flat case.
        code: &'a [u8],
        /// The helper call otherwise.
        call: HelperCall,
    },
    /// A hot store (see `Bt::hot_stores`) checked in host code: `ea`
    /// puts its guest address into R13D, and where the context's
    /// fast-write map (a byte per 64 bytes) allows that address, `store` does it on the host's
    /// writable view of RAM (`[r11 + r13]`); else the helper call (see
    /// [`crate::lower::lower_checked_store`]).
    Checked {
        /// LEA of the address into R13D.
        ea: &'a [u8],
        /// The instruction on `[r11 + r13]`.
        store: &'a [u8],
        /// The helper call otherwise.
        call: HelperCall,
    },
    /// RDTSC: the host's time-stamp counter plus the context's offset,
    /// while the context's `tsc_slow` is 0; else the helper call.
    Rdtsc(HelperCall),
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

/// A helper call for one guest instruction: the helper's argument, the
/// engine's description of the instruction (where its decoded form is,
/// which gives its EIPs, and how many instructions before it the block
/// counts: see `helper::HelperArg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelperCall {
    /// The argument pushed for the shared helper routine.
    pub arg: u32,
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

/// How translated code paces itself between returns to the dispatcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// Every block transfer counts the block's retired instructions (R8)
    /// and takes one unit of the chaining budget (R14): exact instruction
    /// counts and budgets, for `--max-insns`, the instruction clock,
    /// lockstep and statistics. About six host instructions a transfer.
    Counted,
    /// No counting; a load from the poll page at this (32-bit) host
    /// address at every transfer that can close a loop: a jump to an
    /// address not above the block's start, and every indirect branch
    /// (see [`crate::host::poll`]). The run loop takes control back by
    /// revoking the page. One host instruction on backward transfers,
    /// none on forward ones.
    Polled(u32),
    /// Neither: nothing asynchronous ever needs control back (a Linux
    /// program, whose system calls all leave translated code).
    Free,
}

/// What a block's stubs need to know besides their target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// The block's first guest instruction (a stub to an address not
    /// above it may close a loop).
    pub start: u32,
    /// The EIP after its last instruction.
    pub end: u32,
    /// How its transfers are paced.
    pub pace: Pace,
}

/// A poll: the load from the poll page at a block's exit, and where the
/// guest goes on when it faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Poll {
    /// Offset of the load in the block's code.
    pub at: usize,
    /// The guest address the exit goes to, or None for an indirect exit
    /// (which stored its target as the next EIP before the load).
    pub target: Option<u32>,
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
    /// The translation (its cache key) the jump is chained to, if it is
    /// (kept by the chaining code; None when the block is built).
    pub linked: Option<u64>,
}

/// Compiled host code for one block.
pub struct HostBlock {
    /// Executable address of the code (in a [`CodeBuffer`]).
    entry: *const u8,
    /// Code-buffer offset of the code.
    offset: usize,
    /// Code size in bytes.
    len: usize,
    /// End of the translated instructions (which start at the block's
    /// first byte, where chained jumps land).
    body_end: usize,
    /// Where everything else starts in the code buffer's block words
    /// (`CodeBuffer::meta`): the patchable exits, the poll-page loads of
    /// its exits (`Pace::Polled`) and the instruction map, laid out as
    /// [`META_HEAD`] says.
    meta: u32,
}

/// How [`HostBlock`]'s `meta` is laid out: the numbers of sites, polls and
/// guest instructions (n), then [`SITE_WORDS`] words per site (rel32,
/// target, cold, and the linked key's low and high halves, all ones for
/// none: no key has every bit set, a physical page number being below
/// 2^20), [`POLL_WORDS`] per poll (at, 1 if it has a target, the target),
/// then the instruction map: the EIP after the instructions, then for
/// each its EIP, the instructions its code counts before it and where its
/// host code starts in the block's (as built: one copy).
const META_HEAD: usize = 3;
const SITE_WORDS: usize = 5;
const POLL_WORDS: usize = 3;

/// A block's instruction map while it is built: for each translated
/// instruction its EIP, the instructions counted before it, and the offset
/// of its host code; and the EIP after the last (laid out in the block's
/// words as `end`, then the entries as they are).
#[derive(Clone, Copy)]
pub(crate) struct InsnMap<'a> {
    pub insns: &'a [[u32; 3]],
    pub end: u32,
}

/// A block's instruction map as its words hold it ([`HostBlock::insns`]):
/// three words per instruction.
#[derive(Clone, Copy)]
pub(crate) struct Insns<'b>(&'b [u32]);

impl Insns<'_> {
    /// The number of instructions.
    pub(crate) fn len(&self) -> usize {
        self.0.len() / 3
    }

    /// The `k`-th instruction's EIP, count before it and code offset.
    pub(crate) fn get(&self, k: usize) -> Option<[u32; 3]> {
        self.0.get(3 * k..3 * k + 3).map(|e| [e[0], e[1], e[2]])
    }

    /// Each instruction's EIP, count before it and code offset.
    pub(crate) fn iter(&self) -> impl Iterator<Item = [u32; 3]> + '_ {
        self.0.chunks_exact(3).map(|e| [e[0], e[1], e[2]])
    }
}

// SAFETY: `entry` points into the code buffer of the engine that owns this
// block; the block moves with the engine (which is Send: its code buffer
// is) and is never shared between threads, so sending it is sending the
// engine's own data.
unsafe impl Send for HostBlock {}

/// Errors building host code.
#[derive(Debug)]
pub struct BuildError(pub String);

/// `lea r8, [r8 + n]` with an 8-bit displacement (n below 128): count
/// retired guest instructions without touching flags.
fn count(n: usize) -> [u8; 4] {
    debug_assert!(n < 128);
    [0x4D, 0x8D, 0x40, n as u8]
}

/// `mov r9d, [poll]`: the load from the poll page (a 32-bit absolute
/// address: ModRM with a SIB byte and no base or index), recorded in
/// `polls` with where the guest goes on if it faults.
pub(crate) fn poll(ops: &mut Asm, page: u32, polls: &mut Vec<Poll>, target: Option<u32>) {
    polls.push(Poll {
        at: ops.offset().0,
        target,
    });
    let a = page.to_le_bytes();
    dynasm!(ops
        ; .arch x64
        ; .bytes [0x44, 0x8B, 0x0C, 0x25, a[0], a[1], a[2], a[3]].iter()
    );
}

/// What a block is built in, kept between blocks: the assembler
/// ([`Asm`]: dynasm-rs's macros, whose local labels replace hand-counted
/// jump distances within a block), the side exits (target, count, offset
/// of the branch's rel32) and the chainable sites and polls. One per
/// thread (its vectors keep their room: growing them was a fifth of
/// translation time); one assembler (base 0) serves every block, jumps
/// out of a block (to the epilogue, the leave routine) and RIP-relative
/// addresses are computed from the block's code-buffer offset
/// ([`jmp_to`]).
struct Room {
    asm: Asm,
    sides: Vec<(u32, usize, usize)>,
    sites: Vec<Site>,
    polls: Vec<Poll>,
}

impl Room {
    fn new() -> Box<Room> {
        Box::new(Room {
            asm: Asm::new(),
            sides: Vec::new(),
            sites: Vec::new(),
            polls: Vec::new(),
        })
    }
}

thread_local! {
    /// This thread's [`Room`] (boxed: taking it and putting it back moves
    /// a pointer).
    static ROOM: std::cell::Cell<Option<Box<Room>>> = const { std::cell::Cell::new(None) };
}

/// `jmp rel32` to code-buffer offset `to`, from a block at offset `base`
/// (the assembler's own base is 0, so that one assembler serves every
/// block: jumps out of the block are computed here).
pub(crate) fn jmp_to(ops: &mut Asm, base: usize, to: usize) {
    branch_to(ops, base, 0xE9, to);
}

/// `jmp rel32` (opcode 0xE9) or `call rel32` (0xE8) to code-buffer offset
/// `to`, from a block at offset `base`.
fn branch_to(ops: &mut Asm, base: usize, opcode: u8, to: usize) {
    let rel = (to as i64 - (base + ops.offset().0 + 5) as i64) as i32;
    let r = rel.to_le_bytes();
    ops.extend([opcode, r[0], r[1], r[2], r[3]].iter());
}

/// `mov dword [r15 + next_eip], eip`.
fn store_next(ops: &mut Asm, eip: u32) {
    const _: () = assert!(NEXT_EIP == 0x24);
    dynasm!(ops
        ; .arch x64
        ; mov DWORD [r15 + 0x24], eip as i32
    );
}

/// One guest instruction run by the helper: push its argument and call
/// the shared helper routine ([`frame::Frame::call_helper`]), which stores
/// the state and calls the helper, and either returns here with the state
/// reloaded (go on) or leaves the block through the leave routine
/// (counting the instructions done in host code before it, which the
/// argument carries). `push imm32` sign-extends; the routine reads the
/// low half.
fn helper_call(ops: &mut Asm, base: usize, call: &HelperCall) {
    let a = call.arg.to_le_bytes();
    ops.extend([0x68, a[0], a[1], a[2], a[3]].iter()); // push arg
    branch_to(ops, base, 0xE8, helper_offset());
}

/// The exits of a block being built: its patchable jumps and polls.
pub(crate) struct Exits<'r> {
    /// The block's code-buffer offset.
    pub(crate) base: usize,
    pub(crate) span: Span,
    pub(crate) sites: Vec<Site>,
    pub(crate) polls: Vec<Poll>,
    /// The indirect-branch table and the regions whose links keep being
    /// cut (see [`via_table`]).
    pub(crate) via_table: Option<(u64, &'r Regions)>,
}

/// Does a direct exit to `target` go through the indirect-branch table
/// instead of a chainable jump? When it leaves the block's pages for a
/// 4 MiB region whose cross-page links keep being cut at address-space
/// switches (`Bt::volatile`: a process's code, which every context switch
/// maps differently): a link there would be cut and made again at every
/// switch, where the table is emptied for the region at no cost per entry
/// and filled again by the dispatcher.
fn via_table(ex: &Exits, target: u32) -> Option<u64> {
    let (table, volatile) = ex.via_table?;
    let (first, last) = (ex.span.start >> 12, ex.span.end.wrapping_sub(1) >> 12);
    let page = target >> 12;
    (page != first && page != last && volatile.has(target >> 22)).then_some(table)
}

/// An exit stub to `target`: pace the transfer (`Pace::Counted`: count the
/// `n` instructions and take one unit of the chaining budget;
/// `Pace::Polled`: poll if `target` may close a loop), and jump (the patch
/// site, recorded in `sites`) to the stub's cold tail, which stores the
/// next EIP and returns to the dispatcher; chaining points the jump at the
/// target's body instead, so a chained transfer writes no memory. The
/// budget goes through RCX for JRCXZ with MOVs (R13 is scratch), cheaper
/// than two XCHGs.
///
/// Spelled in bytes rather than with assembler labels (every block has
/// one to three stubs; a label costs a hash-map insertion): the golden
/// listings (tests/golden/emit.txt) show what they disassemble to.
fn stub(ops: &mut Asm, ex: &mut Exits, target: u32, n: usize) {
    if let Some(table) = via_table(ex, target) {
        if ex.span.pace == Pace::Counted {
            // The instructions and one lookup, in one LEA (as the exit of
            // an indirect branch).
            let both = (n as u32 | 1 << LOOKUP_SHIFT) as i32;
            dynasm!(ops ; .arch x64 ; lea r8, [r8 + both]);
        }
        dynasm!(ops ; .arch x64 ; mov r13d, target as i32);
        indirect_exit(ops, ex, table);
        return;
    }
    // Each stub is laid out in one piece: its bytes with the count, the
    // target and the jump to the epilogue put in, appended at once.
    let (base, at) = (ex.base, ops.offset().0);
    // The stub's last 13 bytes: its cold tail.
    let tail = cold_bytes(target);
    // The length before the cold tail and where the patchable jump's rel32
    // is in it.
    let (head, rel32) = match ex.span.pace {
        Pace::Counted => {
            let c = count(n);
            let mut s = [0u8; 40];
            s[..27].copy_from_slice(&[
                c[0], c[1], c[2], c[3], // lea r8, [r8 + n]
                0x49, 0x89, 0xCD, // mov r13, rcx
                0x49, 0x8D, 0x4E, 0xFF, // lea rcx, [r14 - 1]
                0x49, 0x89, 0xCE, // mov r14, rcx
                0xE3, 0x08, // jrcxz budget_out (over the next 8 bytes)
                0x4C, 0x89, 0xE9, // mov rcx, r13
                0xE9, 3, 0, 0, 0, // jmp cold, over budget_out's `mov rcx, r13`
                0x4C, 0x89, 0xE9, // budget_out: mov rcx, r13 (then the cold tail)
            ]);
            s[27..].copy_from_slice(&tail);
            put_epilogue_jump(&mut s, base + at);
            ops.extend(s.iter());
            (27, 20)
        }
        Pace::Polled(_) | Pace::Free => {
            // A poll first if the exit may close a loop; then `jmp cold`
            // (the next byte) and the cold tail.
            let polled = match ex.span.pace {
                Pace::Polled(page) if target <= ex.span.start => {
                    poll(ops, page, &mut ex.polls, Some(target));
                    ops.offset().0 - at
                }
                _ => 0,
            };
            let mut s = [0u8; 18];
            s[..5].copy_from_slice(&[0xE9, 0, 0, 0, 0]);
            s[5..].copy_from_slice(&tail);
            put_epilogue_jump(&mut s, base + at + polled);
            ops.extend(s.iter());
            (polled + 5, polled + 1)
        }
    };
    ex.sites.push(Site {
        rel32: base + at + rel32,
        target,
        cold: base + at + head,
        linked: None,
    });
}

/// The rel32 of the `jmp epilogue` that ends `stub`, a stub laid out at
/// code-buffer offset `at`.
fn put_epilogue_jump(stub: &mut [u8], at: usize) {
    let end = stub.len();
    let rel = (epilogue_offset() as i64 - (at + end) as i64) as i32;
    stub[end - 4..].copy_from_slice(&rel.to_le_bytes());
}

/// Does an exit to `target` need code before its patchable jump (a count
/// and the budget, or a poll)? If not, a conditional branch to it can be
/// the patch site itself ([`cold_tail`]), one host jump less when taken.
fn bare_exit(ex: &Exits, target: u32) -> bool {
    if via_table(ex, target).is_some() {
        return false;
    }
    match ex.span.pace {
        Pace::Counted => false,
        Pace::Polled(_) => target > ex.span.start,
        Pace::Free => true,
    }
}

/// The exit to `target` of a conditional branch whose rel32 (at code
/// offset `rel32` of the block) is the patch site: only the cold tail,
/// which the branch goes to until it is chained to the target's body.
fn cold_tail(ops: &mut Asm, ex: &mut Exits, target: u32, rel32: usize) {
    ex.sites.push(Site {
        rel32: ex.base + rel32,
        target,
        cold: ex.base + ops.offset().0,
        linked: None,
    });
    let mut s = cold_bytes(target);
    put_epilogue_jump(&mut s, ex.base + ops.offset().0);
    ops.extend(s.iter());
}

/// A stub's cold tail: `mov dword [r15 + 0x24], target` (the next EIP, see
/// `store_next`) and `jmp epilogue` (its rel32 left for
/// [`put_epilogue_jump`]).
fn cold_bytes(target: u32) -> [u8; 13] {
    const _: () = assert!(NEXT_EIP == 0x24);
    let t = target.to_le_bytes();
    [
        0x41, 0xC7, 0x47, 0x24, t[0], t[1], t[2], t[3], 0xE9, 0, 0, 0, 0,
    ]
}

/// The start of a guarded piece: go on to its host code (which follows)
/// while the context byte at `slow_at` is 0, else jump to the slow path
/// [`helper_tail`] lands (the offset of that jump's rel32 field is
/// returned). Flag-free: the byte into RCX for JRCXZ.
///
/// (The branches of the pieces made for instructions, this and the
/// helper tail, are patched by hand rather than through local labels:
/// the assembler's labels cost a few hundred host instructions each, a
/// piece took five, and a retranslated block on a page of hot stores
/// makes nearly one checked store per block.)
fn guard(ops: &mut Asm, slow_at: i32) -> usize {
    dynasm!(ops
        ; .arch x64
        ; mov r11, rcx
        ; movzx ecx, BYTE [r15 + slow_at]
    );
    guard_tail(ops)
}

/// [`guard`] once RCX is saved in R11 and the value that sends the piece
/// to its slow path is in ECX (the flags instructions' load a word).
fn guard_tail(ops: &mut Asm) -> usize {
    let fast = jrcxz_forward(ops);
    dynasm!(ops
        ; .arch x64
        ; mov rcx, r11
    );
    let slow = jmp_forward(ops);
    land8(ops, fast);
    dynasm!(ops
        ; .arch x64
        ; mov rcx, r11
    );
    slow
}

/// The end of a piece with a fast path in host code: past the helper call
/// (the slow path), which the jumps at `slow` (their rel32 fields) go to
/// when host code cannot do the instruction; the jumps at `done` go past
/// it, as the fast path does. The helper retires the instruction, which
/// the block's exit counts too: one is taken off.
fn helper_tail(
    ops: &mut Asm,
    base: usize,
    call: &HelperCall,
    slow: impl IntoIterator<Item = usize>,
    done: impl IntoIterator<Item = usize>,
) {
    let skip = jmp_forward(ops);
    for at in slow {
        land(ops, at);
    }
    helper_call(ops, base, call);
    dynasm!(ops
        ; .arch x64
        ; lea r8, [r8 - 1]
    );
    for at in done.into_iter().chain([skip]) {
        land(ops, at);
    }
}

/// `jmp rel32` to a place not assembled yet: the offset of its rel32
/// field, for [`land`].
fn jmp_forward(ops: &mut Asm) -> usize {
    ops.extend([0xE9, 0, 0, 0, 0].iter());
    ops.offset().0 - 4
}

/// `jrcxz rel8` to a place not assembled yet: the offset of its rel8
/// field, for [`land8`].
fn jrcxz_forward(ops: &mut Asm) -> usize {
    ops.extend([0xE3, 0].iter());
    ops.offset().0 - 1
}

/// The short branch whose rel8 field is at `rel8` ([`jrcxz_forward`])
/// goes to the next byte assembled (an error of the block's if that is
/// out of its reach).
fn land8(ops: &mut Asm, rel8: usize) {
    let to = ops.offset().0;
    match i8::try_from(to - (rel8 + 1)) {
        Ok(rel) => ops.bytes_mut()[rel8] = rel as u8,
        Err(_) => ops.fail(dynasmrt::DynasmError::ImpossibleRelocation(
            dynasmrt::TargetKind::Local("a short branch"),
        )),
    }
}

/// `jcc rel32` (x86 condition nibble `cc`) to a place not assembled yet:
/// the offset of its rel32 field, for [`land`].
fn jcc_forward(ops: &mut Asm, cc: u8) -> usize {
    debug_assert!(cc < 16);
    ops.extend([0x0F, 0x80 | cc, 0, 0, 0, 0].iter());
    ops.offset().0 - 4
}

/// The branch whose rel32 field is at `rel32` ([`jcc_forward`]) goes to
/// the next byte assembled.
fn land(ops: &mut Asm, rel32: usize) {
    let to = ops.offset().0;
    let rel = (to - (rel32 + 4)) as i32;
    ops.bytes_mut()[rel32..rel32 + 4].copy_from_slice(&rel.to_le_bytes());
}

/// Set up what every block needs before the first is translated: the
/// shared routines at the start of `buf` (assembled on first use) and this
/// thread's assembler, so their one-time cost is the engine's start, not
/// its first translation's.
pub(crate) fn prepare(buf: &mut CodeBuffer) -> Result<(), BuildError> {
    ensure_epilogue(buf)?;
    ROOM.with(|r| {
        let room = r.take().unwrap_or_else(Room::new);
        r.set(Some(room));
    });
    Ok(())
}

/// A block being built: the translator appends each guest instruction's
/// host code to it as it selects it ([`Builder::code`] for copied and
/// rewritten instructions, [`Builder::piece`] for the rest), then
/// [`Builder::finish`] adds the exits and puts the block into the code
/// buffer. Building in place: no copy of each instruction's host code
/// between lowering and the assembler.
pub(crate) struct Builder {
    /// The thread's [`Room`] (given back when the builder goes).
    room: Option<Box<Room>>,
    /// The code-buffer offset the block will have.
    base: usize,
}

/// A block's code and side exits while it is built ([`Builder::body`]).
pub(crate) struct Body<'a> {
    /// The host code so far.
    pub(crate) code: &'a mut Vec<u8>,
    sides: &'a mut Vec<(u32, usize, usize)>,
}

impl Body<'_> {
    /// A side exit (as [`Piece::Side`]): a conditional branch on `cc` to
    /// `target`, the `counted`-th instruction, whose stub comes after
    /// the block's exit.
    #[inline]
    pub(crate) fn side(&mut self, cc: u8, target: u32, counted: usize) {
        debug_assert!(cc < 16);
        self.code.extend([0x0F, 0x80 | cc, 0, 0, 0, 0]);
        self.sides.push((target, counted, self.code.len() - 4));
    }
}

impl Drop for Builder {
    fn drop(&mut self) {
        if let Some(room) = self.room.take() {
            ROOM.with(|r| r.set(Some(room)));
        }
    }
}

impl Builder {
    /// Start a block at the end of `buf` (the shared routines first if
    /// `buf` is empty). Its helper calls are relative to the buffer's
    /// current end: a block that does not fit ([`Builder::finish`] fails)
    /// is built again after a flush.
    pub(crate) fn begin(buf: &mut CodeBuffer) -> Result<Builder, BuildError> {
        ensure_epilogue(buf)?;
        buf.prefetch_next();
        let mut room = ROOM.with(|r| r.take()).unwrap_or_else(Room::new);
        room.asm.clear();
        room.sides.clear();
        Ok(Builder {
            room: Some(room),
            base: buf.next_offset(),
        })
    }

    fn room(&mut self) -> &mut Room {
        self.room.as_mut().expect("the room is held until drop")
    }

    fn asm(&mut self) -> &mut Asm {
        &mut self.room().asm
    }

    /// The host code so far, to append an instruction's host code to.
    #[inline]
    pub(crate) fn code(&mut self) -> &mut Vec<u8> {
        self.asm().bytes_mut()
    }

    /// The code so far and the side exits, to add copied instructions and
    /// side exits to (what [`Builder::code`] and a [`Piece::Side`] do)
    /// without going through the builder for each.
    #[inline]
    pub(crate) fn body(&mut self) -> Body<'_> {
        let room = self.room.as_mut().expect("the room is held until drop");
        Body {
            code: room.asm.bytes_mut(),
            sides: &mut room.sides,
        }
    }

    /// Take back the side exit just added (a [`Piece::Side`], the last
    /// piece): the conditional branch is the block's exit after all.
    pub(crate) fn unside(&mut self) {
        let room = self.room();
        if let Some((_, _, rel32)) = room.sides.pop() {
            room.asm.bytes_mut().truncate(rel32 - 2);
        }
    }

    /// The side exits added so far (conditional branches the block went
    /// on past).
    pub(crate) fn side_exits(&self) -> usize {
        self.room.as_ref().map_or(0, |r| r.sides.len())
    }

    /// Offset in the block's code of the next byte.
    #[inline]
    pub(crate) fn offset(&self) -> usize {
        self.room.as_ref().map_or(0, |r| r.asm.offset().0)
    }

    /// Append one piece's host code.
    pub(crate) fn piece(&mut self, piece: &Piece<'_>) {
        let base = self.base;
        let room = self.room.as_mut().expect("the room is held until drop");
        let (ops, sides) = (&mut room.asm, &mut room.sides);
        match piece {
            Piece::Code(b) => dynasm!(ops ; .arch x64 ; .bytes b.iter()),
            Piece::Side {
                cc,
                target,
                counted,
            } => {
                let rel32 = jcc_forward(ops, *cc);
                sides.push((*target, *counted, rel32));
            }
            Piece::Helper(call) => helper_call(ops, base, call),
            Piece::Segment { fs, code, call } => {
                let slow = guard(ops, i32::from(SEG_SLOW) + i32::from(!*fs));
                ops.extend(code.iter());
                helper_tail(ops, base, call, [slow], []);
            }
            Piece::Checked { ea, store, call } => {
                // Flag-free, RCX kept in scratch2: the address's page
                // (address >> 12: the address times 16, read from the
                // scratch slot two bytes up) looked up in the page-delta
                // table (none: JRCXZ to the helper), the delta added
                // (a 32-bit LEA drops the present bit): the physical
                // address; then the fast-write map's byte for its
                // 64-byte region (address >> 6: times 4, a byte up).
                let (sc, sc1, sc2) = (SCRATCH as i32, SCRATCH as i32 + 1, SCRATCH2 as i32);
                let (map, rw) = (FAST_MAP as i32, RAM_RW as i32);
                let (sc_2, deltas) = (SCRATCH as i32 + 2, PAGE_DELTAS as i32);
                ops.extend(ea.iter());
                dynasm!(ops
                    ; .arch x64
                    ; mov QWORD [r15 + sc2], rcx
                    ; lea r11, [r13 * 8]
                    ; lea r11, [r11 * 2]
                    ; mov QWORD [r15 + sc], r11
                    ; mov ecx, DWORD [r15 + sc_2]
                    ; mov r11, QWORD [r15 + deltas]
                    ; mov rcx, QWORD [r11 + rcx * 8]
                );
                let no_page = jrcxz_forward(ops);
                dynasm!(ops
                    ; .arch x64
                    ; lea r13d, [r13 + rcx]
                    ; lea r11, [r13 * 4]
                    ; mov QWORD [r15 + sc], r11
                    ; mov ecx, DWORD [r15 + sc1]
                    ; mov r11, QWORD [r15 + map]
                    ; movzx ecx, BYTE [r11 + rcx]
                );
                let not_fast = jrcxz_forward(ops);
                dynasm!(ops
                    ; .arch x64
                    ; mov rcx, QWORD [r15 + sc2]
                    ; mov r11, QWORD [r15 + rw]
                );
                ops.extend(store.iter());
                let done = jmp_forward(ops);
                land8(ops, no_page);
                land8(ops, not_fast);
                dynasm!(ops
                    ; .arch x64
                    ; mov rcx, QWORD [r15 + sc2]
                );
                let slow = jmp_forward(ops);
                helper_tail(ops, base, call, [slow], [done]);
            }
            Piece::Rdtsc(call) => {
                // EDX:EAX = host TSC + offset, flag-free: the halves
                // joined in the scratch slot, added with LEA, split.
                let (off, scratch) = (TSC_OFFSET as i32, SCRATCH as i32);
                let slow = guard(ops, i32::from(TSC_SLOW));
                dynasm!(ops
                    ; .arch x64
                    ; rdtsc
                    ; mov DWORD [r15 + scratch], eax
                    ; mov DWORD [r15 + scratch + 4], edx
                    ; mov r13, QWORD [r15 + scratch]
                    ; mov r11, QWORD [r15 + off]
                    ; lea r13, [r13 + r11]
                    ; mov QWORD [r15 + scratch], r13
                    ; mov eax, DWORD [r15 + scratch]
                    ; mov edx, DWORD [r15 + scratch + 4]
                );
                helper_tail(ops, base, call, [slow], []);
            }
            Piece::Flags(op, call) => {
                let slow = flags_fast_path(ops, *op);
                if !matches!(op, FlagsOp::Pushfd { .. }) {
                    helper_tail(ops, base, call, slow.into_iter().flatten(), []);
                }
            }
        }
    }

    /// Add the exit (`exit`, or back to the dispatcher at `span.end`) and
    /// the side exits' stubs and append the block to `buf`. `n` is the
    /// number of guest instructions. Fails with [`BuildError`] when the
    /// buffer is full. Direct exits into the `volatile` regions look their
    /// target up in the `lookup` table instead of being chainable.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn finish(
        mut self,
        buf: &mut CodeBuffer,
        n: usize,
        span: Span,
        exit: Option<&BlockExit>,
        lookup: Option<u64>,
        volatile: Option<&Regions>,
        map: InsnMap<'_>,
    ) -> Result<HostBlock, BuildError> {
        let base = self.base;
        debug_assert_eq!(base, buf.next_offset());
        let room = self.room.as_mut().expect("the room is held until drop");
        let sides = std::mem::take(&mut room.sides);
        let ops = &mut room.asm;
        let body_end = ops.offset().0;
        // Sites and polls are gathered in vectors kept between blocks and
        // laid out with the instruction map in the code buffer's words.
        let (mut sites, mut polls) = (
            std::mem::take(&mut room.sites),
            std::mem::take(&mut room.polls),
        );
        sites.clear();
        polls.clear();
        let mut ex = Exits {
            base,
            span,
            sites,
            polls,
            via_table: lookup.zip(volatile),
        };
        match exit {
            Some(BlockExit::Direct(t)) => stub(ops, &mut ex, *t, n),
            Some(BlockExit::Cond {
                cc,
                taken,
                not_taken,
            }) => {
                let rel32 = jcc_forward(ops, *cc);
                stub(ops, &mut ex, *not_taken, n);
                land(ops, rel32);
                if bare_exit(&ex, *taken) {
                    cold_tail(ops, &mut ex, *taken, rel32);
                } else {
                    stub(ops, &mut ex, *taken, n);
                }
            }
            Some(BlockExit::Loop { taken, not_taken }) => {
                dynasm!(ops
                    ; .arch x64
                    ; lea ecx, [rcx - 1]                 // ECX - 1, no flags
                    ; jecxz >not_taken
                );
                stub(ops, &mut ex, *taken, n);
                dynasm!(ops ; .arch x64 ; not_taken:);
                stub(ops, &mut ex, *not_taken, n);
            }
            Some(BlockExit::Jecxz { taken, not_taken }) => {
                dynasm!(ops
                    ; .arch x64
                    ; jecxz >taken
                );
                stub(ops, &mut ex, *not_taken, n);
                dynasm!(ops ; .arch x64 ; taken:);
                stub(ops, &mut ex, *taken, n);
            }
            Some(BlockExit::Stored) => match lookup {
                Some(table) => {
                    if span.pace == Pace::Counted {
                        // The block's instructions and one lookup, in one
                        // LEA.
                        let both = (n as u32 | 1 << LOOKUP_SHIFT) as i32;
                        dynasm!(ops
                            ; .arch x64
                            ; lea r8, [r8 + both]
                        );
                    }
                    indirect_exit(ops, &mut ex, table);
                }
                None => {
                    const _: () = assert!(NEXT_EIP == 0x24);
                    dynasm!(ops
                        ; .arch x64
                        ; mov DWORD [r15 + 0x24], r13d
                        ; .bytes count(n).iter()
                    );
                    jmp_to(ops, base, epilogue_offset());
                }
            },
            None => {
                store_next(ops, span.end);
                dynasm!(ops
                    ; .arch x64
                    ; .bytes count(n).iter()
                );
                jmp_to(ops, base, epilogue_offset());
            }
        }
        for &(target, counted, rel32) in &sides {
            land(ops, rel32);
            if bare_exit(&ex, target) {
                cold_tail(ops, &mut ex, target, rel32);
            } else {
                stub(ops, &mut ex, target, counted);
            }
        }
        room.sides = sides;
        let Exits { sites, polls, .. } = ex;
        let n = meta_len(&sites, &polls, map);
        let Some(words) = buf.meta_words(n) else {
            return Err(BuildError("block words full".into()));
        };
        let meta = meta(words, &sites, &polls, map);
        (room.sites, room.polls) = (sites, polls);
        let len = ops.offset().0;
        let at = buf
            .append(ops.finish()?)
            .ok_or_else(|| BuildError("code buffer full".into()))?;
        debug_assert_eq!(at, base);
        Ok(HostBlock {
            entry: buf.exec_addr(at),
            offset: at,
            len,
            body_end,
            meta,
        })
    }
}

/// How many words [`meta`] appends.
fn meta_len(sites: &[Site], polls: &[Poll], map: InsnMap<'_>) -> usize {
    META_HEAD + sites.len() * SITE_WORDS + polls.len() * POLL_WORDS + 3 * map.insns.len() + 1
}

/// Append [`HostBlock`]'s words for these sites, polls and instruction
/// map to `m` (code offsets fit in 32 bits: rel32 jumps span the code
/// buffer); where they start.
fn meta(m: &mut Vec<u32>, sites: &[Site], polls: &[Poll], map: InsnMap<'_>) -> u32 {
    let n = map.insns.len();
    let at = m.len() as u32;
    m.extend([sites.len() as u32, polls.len() as u32, n as u32]);
    for s in sites {
        let linked = s.linked.unwrap_or(u64::MAX);
        m.extend([
            s.rel32 as u32,
            s.target,
            s.cold as u32,
            linked as u32,
            (linked >> 32) as u32,
        ]);
    }
    for p in polls {
        m.extend([
            p.at as u32,
            u32::from(p.target.is_some()),
            p.target.unwrap_or(0),
        ]);
    }
    m.push(map.end);
    m.extend_from_slice(map.insns.as_flattened());
    debug_assert_eq!(m.len() - at as usize, meta_len(sites, polls, map));
    at
}

/// The patchable exits of the block whose words start at `meta`
/// ([`HostBlock::words`]).
pub(crate) fn sites_of(buf: &CodeBuffer, meta: u32) -> impl ExactSizeIterator<Item = Site> + '_ {
    let m = buf.meta(meta);
    let n = m[0] as usize;
    m[META_HEAD..META_HEAD + n * SITE_WORDS]
        .chunks_exact(SITE_WORDS)
        .map(|w| {
            let linked = u64::from(w[3]) | u64::from(w[4]) << 32;
            Site {
                rel32: w[0] as usize,
                target: w[1],
                cold: w[2] as usize,
                linked: (linked != u64::MAX).then_some(linked),
            }
        })
}

/// Record what the `k`-th patchable exit of the block whose words start at
/// `meta` is chained to.
pub(crate) fn set_linked_of(buf: &mut CodeBuffer, meta: u32, k: usize, linked: Option<u64>) {
    let at = META_HEAD + k * SITE_WORDS;
    let linked = linked.unwrap_or(u64::MAX);
    let m = buf.meta_mut(meta);
    m[at + 3] = linked as u32;
    m[at + 4] = (linked >> 32) as u32;
}

impl HostBlock {
    /// Compile translated instructions (host bytes, in order) ending in
    /// `exit` into `buf`, with the offset in the code of each piece in
    /// `starts` (what the translator does with a [`Builder`], for tests).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn compile_block<'a>(
        buf: &mut CodeBuffer,
        body: impl IntoIterator<Item = Piece<'a>>,
        n: usize,
        span: Span,
        exit: Option<&BlockExit>,
        lookup: Option<u64>,
        volatile: Option<&Regions>,
        starts: &mut Vec<u32>,
    ) -> Result<HostBlock, BuildError> {
        let mut b = Builder::begin(buf)?;
        starts.clear();
        for piece in body {
            starts.push(b.offset() as u32);
            b.piece(&piece);
        }
        let map = InsnMap {
            insns: &[],
            end: span.end,
        };
        b.finish(buf, n, span, exit, lookup, volatile, map)
    }

    /// Compile a straight run of instructions that ends by returning to
    /// the dispatcher (used by tests).
    pub fn compile<'a>(
        buf: &mut CodeBuffer,
        body: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<HostBlock, BuildError> {
        let body: Vec<Piece> = body.into_iter().map(Piece::Code).collect();
        let n = body.len();
        let span = Span {
            start: 0,
            end: 0,
            pace: Pace::Counted,
        };
        HostBlock::compile_block(buf, body, n, span, None, None, None, &mut Vec::new())
    }

    /// The index of the translated instruction at host address `rip`, if
    /// `rip` lies in this block's translated instructions, whose offsets in
    /// the code are `starts` (as [`HostBlock::compile_block`] gave them).
    pub fn instruction_at(&self, rip: u64, starts: &[u32]) -> Option<usize> {
        self.index_at(rip, starts.len(), |k| starts[k])
    }

    /// The index of the instruction (of `n`, the `k`-th's code at offset
    /// `start(k)`, in order) whose code holds host address `rip`.
    fn index_at(&self, rip: u64, n: usize, start: impl Fn(usize) -> u32) -> Option<usize> {
        let off = rip.checked_sub(self.entry as u64)? as usize;
        let starts_by = |k: usize| start(k) as usize <= off;
        if off >= self.body_end || n == 0 || !starts_by(0) {
            return None;
        }
        // The last one whose code starts at or before `off`.
        let (mut lo, mut hi) = (0, n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if starts_by(mid) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Some(lo - 1)
    }

    /// Host code size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Is the code empty (never: there is always an exit)?
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

    /// Code-buffer offset where chained jumps into this block land: its
    /// first translated instruction, the block's first byte.
    pub fn body_offset(&self) -> usize {
        self.offset
    }

    /// The patchable exits (`buf`: the code buffer holding the block).
    pub fn sites<'b>(&self, buf: &'b CodeBuffer) -> impl ExactSizeIterator<Item = Site> + 'b {
        sites_of(buf, self.meta)
    }

    /// Where the block's words start in the code buffer (for
    /// [`sites_of`] and [`set_linked_of`] without the block at hand).
    pub(crate) fn words(&self) -> u32 {
        self.meta
    }

    /// The poll at host address `rip`, if one is there.
    pub fn poll_at(&self, buf: &CodeBuffer, rip: u64) -> Option<Poll> {
        let off = rip.checked_sub(self.entry as u64)? as usize;
        let m = buf.meta(self.meta);
        let at = META_HEAD + m[0] as usize * SITE_WORDS;
        m[at..at + m[1] as usize * POLL_WORDS]
            .chunks_exact(POLL_WORDS)
            .find(|w| w[0] as usize == off)
            .map(|w| Poll {
                at: off,
                target: (w[1] != 0).then_some(w[2]),
            })
    }

    /// The block's instruction map: the EIP after its instructions, and
    /// for each its EIP, the instructions its code counts before it
    /// (helper calls retire theirs through the interpreter) and the
    /// offset of its host code in the block's.
    pub(crate) fn insns<'b>(&self, buf: &'b CodeBuffer) -> (u32, Insns<'b>) {
        let m = buf.meta(self.meta);
        let at = META_HEAD + m[0] as usize * SITE_WORDS + m[1] as usize * POLL_WORDS;
        let n = m[2] as usize;
        (m[at], Insns(&m[at + 1..at + 1 + 3 * n]))
    }

    /// The index of the translated instruction at host address `rip` in
    /// this block's instruction map `insns` ([`HostBlock::insns`]).
    pub(crate) fn insn_at(&self, rip: u64, insns: Insns<'_>) -> Option<usize> {
        self.index_at(rip, insns.len(), |k| insns.0[3 * k + 2])
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
        // SAFETY: the entry routine at `entry_offset` (put there with the
        // epilogue) is a function of type `BlockEntryFn`: the prologue,
        // then a jump to `self.entry`, the executable copy of a block
        // emitted in `compile_block`, whose code keeps the stack as the
        // prologue left it and leaves through the shared epilogue, which
        // restores the callee-saved registers and returns with DF clear.
        let f: BlockEntryFn = unsafe {
            std::mem::transmute::<*const u8, BlockEntryFn>(buf.exec_addr(entry_offset()))
        };
        f(ctx, self.entry);
        crate::host::fault::set_active(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every host offset of a block's body finds the piece whose code
    /// holds it (a linear scan of the pieces' starts says which); the exit
    /// and anything outside the block find none.
    #[test]
    fn host_offsets_find_their_instruction() {
        let mut buf = CodeBuffer::new(1 << 20).expect("code buffer");
        let lens = [1usize, 3, 7, 2, 15, 1, 4];
        let nops: Vec<Vec<u8>> = lens.iter().map(|&n| vec![0x90; n]).collect();
        let span = Span {
            start: 0,
            end: 0,
            pace: Pace::Counted,
        };
        let mut starts = Vec::new();
        let body = nops.iter().map(|b| Piece::Code(b));
        let block = HostBlock::compile_block(
            &mut buf,
            body,
            lens.len(),
            span,
            None,
            None,
            None,
            &mut starts,
        )
        .expect("compiled");
        let body_end: usize = lens.iter().sum();
        let entry = block.entry as u64;
        for off in 0..block.len() + 8 {
            let want = (off < body_end)
                .then(|| starts.iter().rposition(|&s| s as usize <= off))
                .flatten();
            assert_eq!(
                block.instruction_at(entry + off as u64, &starts),
                want,
                "{off}"
            );
        }
        assert_eq!(block.instruction_at(entry.wrapping_sub(1), &starts), None);
    }
}
