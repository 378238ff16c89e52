//! Scans 32-bit guest code into basic blocks and classifies every
//! instruction after Popek & Goldberg (CACM 17(7), 1974):
//!
//! - **innocuous**: neither reads nor changes the machine's privileged state;
//!   runs unchanged.
//! - **sensitive** (but unprivileged): reads or changes privileged state yet
//!   does *not* trap at CPL 3. These are the instructions that make x86 fail
//!   the Popek–Goldberg condition (POPF, PUSHF, SGDT, SIDT, SLDT, SMSW, STR,
//!   LAR, LSL, VERR, VERW, segment-register moves, far transfers, INT, IRET).
//! - **privileged**: traps (#GP) when executed outside ring 0 (CLI, STI, HLT,
//!   IN/OUT, LGDT, MOV CRn, ...).
//! - **control flow**: near jumps, calls and returns, which end a basic block.
//!
//! The classification is data ([`SPECIALS`]) that tools and tests read;
//! `popek classify` prints it.
//!
//! A basic block ends at every control transfer, at a special instruction
//! that must leave translated code ([`Special::ends_block`]), at
//! [`MAX_BLOCK_INSNS`] instructions, before an instruction that would start
//! on another page, or at bytes that do not decode (the block then records
//! where, and executing there raises a guest #UD).

#![forbid(unsafe_code)]

pub mod fast;
pub mod flags;

use iced_x86::{
    Code, Decoder, DecoderError, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind,
    Register,
};

/// The longest x86 instruction.
pub const MAX_INSN_LEN: usize = 15;
/// The most instructions a block holds.
pub const MAX_BLOCK_INSNS: usize = 64;
/// Blocks never start an instruction on a page other than their first.
pub const PAGE_SIZE: u32 = 4096;

/// An instruction's class after Popek & Goldberg.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// Runs unchanged: touches no privileged state.
    Innocuous,
    /// Reads or changes privileged state but does not trap at CPL 3.
    Sensitive,
    /// Traps with #GP at CPL > 0 (or CPL > IOPL for the I/O and IF ones).
    Privileged,
    /// Near JMP, Jcc, CALL, RET, LOOP, JECXZ.
    ControlFlow,
}

impl Class {
    /// Lower-case name, as printed in tables.
    pub fn name(self) -> &'static str {
        match self {
            Class::Innocuous => "innocuous",
            Class::Sensitive => "sensitive",
            Class::Privileged => "privileged",
            Class::ControlFlow => "control-flow",
        }
    }
}

/// What happens to a special instruction when a classic trap-and-emulate
/// VMM runs the guest kernel at CPL 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtRing3 {
    /// It traps (#GP): the VMM can emulate it. Popek–Goldberg holds.
    Traps,
    /// It runs without trapping and does the wrong thing for a guest kernel:
    /// a Popek–Goldberg violation.
    Silent,
    /// It runs without trapping, traps only in some cases (e.g. a segment
    /// load whose DPL check fails), or behaves differently in a way the VMM
    /// can partly hide.
    Sometimes,
}

macro_rules! specials {
    ($( $v:ident => $class:ident, $ring3:ident, $ends:expr, $what:expr; )*) => {
        /// Every special (sensitive, privileged) instruction kind popek knows.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Special { $( #[doc = $what] $v, )* }

        /// One row of the classification table.
        #[derive(Debug, Clone, Copy)]
        pub struct SpecialInfo {
            /// The kind.
            pub kind: Special,
            /// Its Popek–Goldberg class.
            pub class: Class,
            /// Its behaviour at CPL 3 under trap-and-emulate.
            pub at_ring3: AtRing3,
            /// Does it end a basic block (leave translated code)?
            pub ends_block: bool,
            /// What it does to privileged state.
            pub what: &'static str,
        }

        /// The classification table: one row per special instruction kind.
        pub const SPECIALS: &[SpecialInfo] = &[
            $( SpecialInfo { kind: Special::$v, class: Class::$class, at_ring3: AtRing3::$ring3, ends_block: $ends, what: $what }, )*
        ];
    };
}

specials! {
    Pushf => Sensitive, Silent, false, "PUSHF: pushes EFLAGS, revealing the real IF and IOPL";
    Popf => Sensitive, Silent, false, "POPF: at CPL > 0 silently ignores IOPL, and IF when CPL > IOPL";
    Sgdt => Sensitive, Silent, false, "SGDT: stores GDTR, revealing the monitor's GDT";
    Sidt => Sensitive, Silent, false, "SIDT: stores IDTR, revealing the monitor's IDT";
    Sldt => Sensitive, Silent, false, "SLDT: stores the LDTR selector";
    Smsw => Sensitive, Silent, false, "SMSW: stores CR0's low bits (PE, MP, EM, TS)";
    Str => Sensitive, Silent, false, "STR: stores the task register selector";
    Lar => Sensitive, Silent, false, "LAR: loads access rights, checked against CPL";
    Lsl => Sensitive, Silent, false, "LSL: loads a segment limit, checked against CPL";
    Verr => Sensitive, Silent, false, "VERR: is a segment readable at CPL?";
    Verw => Sensitive, Silent, false, "VERW: is a segment writable at CPL?";
    MovFromSeg => Sensitive, Silent, false, "MOV r/m, Sreg: reveals the selector's RPL (the CPL for CS/SS)";
    PushSeg => Sensitive, Silent, false, "PUSH Sreg: reveals the selector's RPL";
    MovToSeg => Sensitive, Sometimes, true, "MOV Sreg, r/m: descriptor load with CPL checks";
    PopSeg => Sensitive, Sometimes, true, "POP Sreg: descriptor load with CPL checks";
    LoadFarPointer => Sensitive, Sometimes, true, "LDS/LES/LFS/LGS/LSS: descriptor load with CPL checks";
    FarJmp => Sensitive, Sometimes, true, "far JMP: loads CS, privilege checked";
    FarCall => Sensitive, Sometimes, true, "far CALL: loads CS, privilege checked";
    FarRet => Sensitive, Sometimes, true, "far RET: loads CS (and SS), may change privilege";
    IntN => Sensitive, Sometimes, true, "INT n: interrupt through the IDT, gate DPL checked";
    Int3 => Sensitive, Sometimes, true, "INT3: breakpoint trap through the IDT";
    Into => Sensitive, Sometimes, true, "INTO: overflow trap through the IDT";
    Iret => Sensitive, Silent, true, "IRET: loads CS, EFLAGS (IF, IOPL only with privilege)";
    Cpuid => Sensitive, Silent, false, "CPUID: reveals the processor";
    Rdtsc => Sensitive, Silent, false, "RDTSC: reveals real time (privileged only with CR4.TSD)";
    Cli => Privileged, Traps, false, "CLI: clears IF (CPL <= IOPL)";
    Sti => Privileged, Traps, false, "STI: sets IF (CPL <= IOPL), one-instruction shadow";
    Hlt => Privileged, Traps, true, "HLT: waits for an interrupt";
    In => Privileged, Traps, false, "IN: port input (CPL <= IOPL or the TSS I/O bitmap)";
    Out => Privileged, Traps, false, "OUT: port output (CPL <= IOPL or the TSS I/O bitmap)";
    Ins => Privileged, Traps, false, "INS: string port input";
    Outs => Privileged, Traps, false, "OUTS: string port output";
    Lgdt => Privileged, Traps, true, "LGDT: loads GDTR";
    Lidt => Privileged, Traps, true, "LIDT: loads IDTR";
    Lldt => Privileged, Traps, true, "LLDT: loads LDTR";
    Ltr => Privileged, Traps, true, "LTR: loads the task register";
    MovToCr => Privileged, Traps, true, "MOV CRn, r32: paging, protection, caches";
    MovFromCr => Privileged, Traps, false, "MOV r32, CRn";
    MovToDr => Privileged, Traps, false, "MOV DRn, r32: debug registers";
    MovFromDr => Privileged, Traps, false, "MOV r32, DRn";
    Lmsw => Privileged, Traps, true, "LMSW: loads CR0's low bits";
    Clts => Privileged, Traps, true, "CLTS: clears CR0.TS";
    Invlpg => Privileged, Traps, false, "INVLPG: invalidates a TLB entry";
    Invd => Privileged, Traps, false, "INVD: invalidates caches";
    Wbinvd => Privileged, Traps, false, "WBINVD: writes back and invalidates caches";
    Rdmsr => Privileged, Traps, false, "RDMSR: reads a model-specific register";
    Wrmsr => Privileged, Traps, true, "WRMSR: writes a model-specific register";
    Vmcall => Privileged, Traps, false, "VMCALL: a hypercall to popek at CPL 0 (#UD elsewhere)";
}

impl Special {
    /// This kind's row in [`SPECIALS`].
    pub fn info(self) -> &'static SpecialInfo {
        &SPECIALS[self as usize]
    }
    /// Its class.
    pub fn class(self) -> Class {
        self.info().class
    }
    /// Does it end a basic block?
    pub fn ends_block(self) -> bool {
        self.info().ends_block
    }
    /// Short name (the enum variant).
    pub fn name(self) -> String {
        format!("{self:?}")
    }
}

fn is_seg(r: Register) -> bool {
    r.is_segment_register()
}

/// The special kind of an instruction, if it is sensitive or privileged.
pub fn special(ins: &Instruction) -> Option<Special> {
    use Mnemonic as M;
    let s = match ins.mnemonic() {
        M::Pushf | M::Pushfd => Special::Pushf,
        M::Popf | M::Popfd => Special::Popf,
        M::Sgdt => Special::Sgdt,
        M::Sidt => Special::Sidt,
        M::Sldt => Special::Sldt,
        M::Smsw => Special::Smsw,
        M::Str => Special::Str,
        M::Lar => Special::Lar,
        M::Lsl => Special::Lsl,
        M::Verr => Special::Verr,
        M::Verw => Special::Verw,
        M::Mov => {
            let (k0, k1) = (ins.op0_kind(), ins.op1_kind());
            let r0 = if k0 == OpKind::Register {
                ins.op0_register()
            } else {
                Register::None
            };
            let r1 = if k1 == OpKind::Register {
                ins.op1_register()
            } else {
                Register::None
            };
            if is_seg(r0) {
                Special::MovToSeg
            } else if is_seg(r1) {
                Special::MovFromSeg
            } else if r0.is_cr() {
                Special::MovToCr
            } else if r1.is_cr() {
                Special::MovFromCr
            } else if r0.is_dr() {
                Special::MovToDr
            } else if r1.is_dr() {
                Special::MovFromDr
            } else {
                return None;
            }
        }
        M::Push if ins.op0_kind() == OpKind::Register && is_seg(ins.op0_register()) => {
            Special::PushSeg
        }
        M::Pop if ins.op0_kind() == OpKind::Register && is_seg(ins.op0_register()) => {
            Special::PopSeg
        }
        M::Lds | M::Les | M::Lfs | M::Lgs | M::Lss => Special::LoadFarPointer,
        M::Jmp if ins.is_jmp_far() || ins.is_jmp_far_indirect() => Special::FarJmp,
        M::Call if ins.is_call_far() || ins.is_call_far_indirect() => Special::FarCall,
        M::Retf => Special::FarRet,
        M::Int => Special::IntN,
        M::Int3 => Special::Int3,
        M::Into => Special::Into,
        M::Iret | M::Iretd => Special::Iret,
        M::Cpuid => Special::Cpuid,
        M::Rdtsc => Special::Rdtsc,
        M::Cli => Special::Cli,
        M::Sti => Special::Sti,
        M::Hlt => Special::Hlt,
        M::In => Special::In,
        M::Out => Special::Out,
        M::Insb | M::Insw | M::Insd => Special::Ins,
        M::Outsb | M::Outsw | M::Outsd => Special::Outs,
        M::Lgdt => Special::Lgdt,
        M::Lidt => Special::Lidt,
        M::Lldt => Special::Lldt,
        M::Ltr => Special::Ltr,
        M::Lmsw => Special::Lmsw,
        M::Clts => Special::Clts,
        M::Invlpg => Special::Invlpg,
        M::Invd => Special::Invd,
        M::Wbinvd => Special::Wbinvd,
        M::Rdmsr => Special::Rdmsr,
        M::Wrmsr => Special::Wrmsr,
        M::Vmcall => Special::Vmcall,
        _ => return None,
    };
    Some(s)
}

/// Is this a near control transfer (JMP, Jcc, CALL, RET, LOOPcc, JECXZ)?
pub fn is_control_flow(ins: &Instruction) -> bool {
    matches!(
        ins.flow_control(),
        FlowControl::UnconditionalBranch
            | FlowControl::IndirectBranch
            | FlowControl::ConditionalBranch
            | FlowControl::Return
            | FlowControl::Call
            | FlowControl::IndirectCall
    )
}

/// Classify an instruction after Popek & Goldberg.
pub fn classify(ins: &Instruction) -> Class {
    class_of(ins, special(ins))
}

/// Instruction codes a [`CodeMemo`] holds (iced-x86 has about 4,900).
const MEMO_CODES: usize = 8192;

/// A nonzero byte per instruction code, computed the first time the code
/// is seen and read with one load after that: for properties of an
/// instruction that depend on its code alone (a translator asks them of
/// every instruction it scans).
pub struct CodeMemo([std::sync::atomic::AtomicU8; MEMO_CODES]);

impl CodeMemo {
    /// An empty memo (for a `static`).
    #[allow(clippy::new_without_default)]
    pub const fn new() -> CodeMemo {
        CodeMemo([const { std::sync::atomic::AtomicU8::new(0) }; MEMO_CODES])
    }

    /// The byte for `code`: `compute()` (which must not be 0) the first
    /// time, the remembered value after.
    pub fn get(&self, code: Code, compute: impl FnOnce() -> u8) -> u8 {
        use std::sync::atomic::Ordering::Relaxed;
        let slot = self.0.get(code as usize);
        match slot.map_or(0, |m| m.load(Relaxed)) {
            0 => {
                let v = compute();
                debug_assert_ne!(v, 0, "a memo's values are nonzero");
                if let Some(m) = slot {
                    m.store(v, Relaxed);
                }
                v
            }
            v => v,
        }
    }
}

/// [`special`] and [`classify`] by instruction code: both depend on the
/// code alone (which operand is a segment, control or debug register, and
/// whether a PUSH or POP names a segment register, are all distinct
/// codes). 1: innocuous; 2: control flow; 3 + k: special kind k.
static CLASSES: CodeMemo = CodeMemo::new();

/// [`special`] and [`classify`] of `ins` at once, memoized by its code.
pub fn special_and_class(ins: &Instruction) -> (Option<Special>, Class) {
    let k = CLASSES.get(ins.code(), || {
        let sp = special(ins);
        match (sp, class_of(ins, sp)) {
            (Some(s), _) => 3 + s as u8,
            (None, Class::ControlFlow) => 2,
            (None, _) => 1,
        }
    });
    match k {
        1 => (None, Class::Innocuous),
        2 => (None, Class::ControlFlow),
        k => {
            let s = SPECIALS[usize::from(k - 3)].kind;
            (Some(s), s.class())
        }
    }
}

/// [`classify`] with the instruction's special kind already known.
fn class_of(ins: &Instruction, special: Option<Special>) -> Class {
    match special {
        Some(s) => s.class(),
        None if is_control_flow(ins) => Class::ControlFlow,
        None => Class::Innocuous,
    }
}

/// One decoded guest instruction in a block.
#[derive(Debug, Clone)]
pub struct Insn {
    /// The decoded instruction (its `ip()` is the guest EIP). For an
    /// instruction the fast scanner took (`fast` is Some) only its EIP and
    /// length (`ip32`, `len`, `next_ip32`): [`Insn::decoded`] decodes the rest.
    pub ins: Instruction,
    /// Its bytes.
    pub bytes: InsnBytes,
    /// Its class.
    pub class: Class,
    /// Its special kind, for sensitive and privileged instructions.
    pub special: Option<Special>,
    /// What the fast scanner found, if it took the instruction (scanned
    /// with `fast`: then it is innocuous and not special).
    pub fast: Option<fast::Plain>,
}

impl Insn {
    /// An instruction the fast scanner took at `eip` (see [`Insn::ins`]).
    #[inline]
    pub fn fast(eip: u32, plain: fast::Plain, bytes: InsnBytes) -> Insn {
        let len = usize::from(plain.len());
        let mut ins = Instruction::default();
        ins.set_len(len);
        ins.set_next_ip(u64::from(eip.wrapping_add(len as u32)));
        Insn {
            ins,
            bytes,
            class: Class::Innocuous,
            special: None,
            fast: Some(plain),
        }
    }

    /// What a [`Scanner::run`] handed its sink at `eip`, as an `Insn`
    /// (what [`scan_block_into`] keeps).
    pub fn taken(eip: u32, t: Taken, bytes: InsnBytes) -> Insn {
        match t {
            Taken::Plain(p) => Insn::fast(eip, p, bytes),
            Taken::Jcc { .. } | Taken::Exit(_) => {
                let ins = fast::simple(bytes.raw(), eip).unwrap_or_default();
                let (special, class) = special_and_class(&ins);
                Insn {
                    ins,
                    bytes,
                    class,
                    special,
                    fast: None,
                }
            }
        }
    }

    /// The whole decoded instruction (decoding the bytes of one the fast
    /// scanner took).
    pub fn decoded(&self) -> Instruction {
        match self.fast {
            None => self.ins,
            Some(_) => decode_one(&self.bytes, self.ins.ip32(), 32),
        }
    }
}

/// The bytes of one instruction (at most [`MAX_INSN_LEN`]), held inline:
/// scanning a block allocates nothing per instruction.
#[derive(Clone, Copy)]
pub struct InsnBytes {
    buf: [u8; MAX_INSN_LEN],
    len: u8,
}

impl InsnBytes {
    /// The first `MAX_INSN_LEN` bytes of `b` at most.
    pub fn new(b: &[u8]) -> InsnBytes {
        let len = b.len().min(MAX_INSN_LEN);
        let mut buf = [0; MAX_INSN_LEN];
        buf[..len].copy_from_slice(&b[..len]);
        InsnBytes {
            buf,
            len: len as u8,
        }
    }

    /// All `MAX_INSN_LEN` bytes held: the instruction's, then whatever
    /// followed it where it was read (nothing to read; one fixed-size copy).
    #[inline]
    pub fn raw(&self) -> &[u8; MAX_INSN_LEN] {
        &self.buf
    }

    /// The `len` bytes at `off` of `window`, copied as one fixed-size move
    /// when the window has a whole `MAX_INSN_LEN` there (the bytes past
    /// `len` are then the window's, which nothing reads).
    #[inline(always)]
    fn within(window: &[u8], off: usize, len: usize) -> InsnBytes {
        match window.get(off..off + MAX_INSN_LEN) {
            Some(w) => InsnBytes {
                buf: w.try_into().expect("MAX_INSN_LEN bytes"),
                len: len.min(MAX_INSN_LEN) as u8,
            },
            None => InsnBytes::new(&window[off..off + len]),
        }
    }
}

impl PartialEq for InsnBytes {
    fn eq(&self, other: &InsnBytes) -> bool {
        **self == **other
    }
}

impl Eq for InsnBytes {}

impl std::ops::Deref for InsnBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for InsnBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

/// Why a block ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockEnd {
    /// The last instruction is a control transfer.
    ControlFlow,
    /// The last instruction is a special instruction that leaves translated code.
    Special(Special),
    /// [`MAX_BLOCK_INSNS`] reached.
    SizeLimit,
    /// The next instruction starts on another page.
    PageBoundary,
    /// The bytes at this EIP do not decode (a #UD when reached) or UD2.
    Undecodable(u32),
    /// Instruction bytes at this EIP could not be fetched (a fault when reached).
    FetchFault(u32),
}

/// A basic block of guest code.
#[derive(Debug, Clone)]
pub struct Block {
    /// Guest EIP of the first instruction.
    pub start: u32,
    /// The instructions, in order.
    pub insns: Vec<Insn>,
    /// Why the block ended.
    pub end: BlockEnd,
}

/// Decode one instruction from `bytes` at `eip` in a `bitness`-bit code segment.
pub fn decode_one(bytes: &[u8], eip: u32, bitness: u32) -> Instruction {
    let mut d = Decoder::with_ip(bitness, bytes, u64::from(eip), DecoderOptions::NONE);
    d.decode()
}

/// Room for a block's bytes: [`MAX_BLOCK_INSNS`] instructions of at most
/// [`MAX_INSN_LEN`] bytes.
pub const SCAN_SPACE: usize = MAX_BLOCK_INSNS * MAX_INSN_LEN;

/// Scan the basic block that starts at `eip`.
///
/// `fetch(eip, buf)` fills `buf` with guest code bytes at `eip` and returns
/// how many it could fetch (fewer at an unmapped page or segment limit).
pub fn scan_block(fetch: impl FnMut(u32, &mut [u8]) -> usize, start: u32, bitness: u32) -> Block {
    let mut insns = Vec::with_capacity(16);
    let end = scan_block_into(
        fetch,
        start,
        bitness,
        &mut insns,
        MAX_BLOCK_INSNS,
        false,
        false,
        &mut [0; SCAN_SPACE],
    );
    Block { start, insns, end }
}

/// As [`scan_block`], appending at most `max` instructions to `insns`
/// (a translator building a superblock scans into one vector); returns
/// how the block ends ([`BlockEnd::SizeLimit`] after `max`). With
/// `past_jcc`, a conditional branch (Jcc) does not end the scan: it goes
/// on at the branch's fall-through while that is on the first page (a
/// superblock's side exits), and the caller finds each Jcc among the
/// instructions. With `fast` (32-bit code only), the instructions the fast
/// scanner knows ([`fast::take`]) are not decoded: their `fast` says what
/// they are (see [`Insn::ins`]); and relative branches, RET and LEAVE are
/// built from their bytes ([`fast::simple`]), the decoder's instruction
/// without the decoder. The bytes are fetched into `space` (a translator
/// keeps one between scans: nothing is zeroed or allocated per block; what
/// it held before is never read as code). (A [`Scanner`] run to the end,
/// keeping every instruction.)
#[allow(clippy::too_many_arguments)]
pub fn scan_block_into(
    mut fetch: impl FnMut(u32, &mut [u8]) -> usize,
    start: u32,
    bitness: u32,
    insns: &mut Vec<Insn>,
    max: usize,
    past_jcc: bool,
    fast: bool,
    space: &mut [u8; SCAN_SPACE],
) -> BlockEnd {
    let mut sc = Scanner::new(&mut fetch, start, bitness, max, past_jcc, fast, space);
    loop {
        if let Step::End(end) = sc.run(&mut fetch, space, insns, true, &mut |_, _, _: &_| true) {
            return end;
        }
    }
}

/// What a [`Scanner::run`] hands its sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// One of the fast scanner's instructions ([`fast::take`]).
    Plain(fast::Plain),
    /// A conditional branch (70-7F, or 0F 80-8F with a 32-bit
    /// displacement) in a scan that goes on past them, its fall-through
    /// on the page: condition `cc` (the opcode's low nibble, Intel SDM
    /// Vol. 2D appendix B.1.4.7) and `target`.
    Jcc {
        /// The condition nibble.
        cc: u8,
        /// Where it jumps when taken.
        target: u32,
    },
    /// A direct CALL or JMP or a RET ([`fast::exit`]): taken, the scan
    /// ends after it.
    Exit(fast::Exit),
}

/// Where a [`Scanner::run`] hands the instructions it takes: the fast
/// scanner's, the conditional branches the scan goes on past and the
/// block exits it knows. Each says whether it took the instruction (else
/// it is pushed onto the run's vector and the run stops there). (A method
/// each on one value, so that the common one, `plain`, does no more than
/// it must.)
pub trait Sink {
    /// One of the fast scanner's instructions at `eip` ([`fast::take`]);
    /// `raw` holds its bytes first, then whatever followed them.
    fn plain(&mut self, eip: u32, p: fast::Plain, raw: &[u8; MAX_INSN_LEN]) -> bool;
    /// A conditional branch at `eip` (see [`Taken::Jcc`]), its bytes.
    fn jcc(&mut self, eip: u32, cc: u8, target: u32, bytes: &InsnBytes) -> bool;
    /// A block exit at `eip` (see [`Taken::Exit`]), its bytes. Taken, it
    /// ends the scan.
    fn exit(&mut self, eip: u32, e: fast::Exit, bytes: &InsnBytes) -> bool;
}

/// A function of what was taken as a [`Sink`].
impl<F: FnMut(u32, Taken, &InsnBytes) -> bool> Sink for F {
    fn plain(&mut self, eip: u32, p: fast::Plain, raw: &[u8; MAX_INSN_LEN]) -> bool {
        let bytes = InsnBytes {
            buf: *raw,
            len: p.len().min(MAX_INSN_LEN as u8),
        };
        self(eip, Taken::Plain(p), &bytes)
    }
    fn jcc(&mut self, eip: u32, cc: u8, target: u32, bytes: &InsnBytes) -> bool {
        self(eip, Taken::Jcc { cc, target }, bytes)
    }
    fn exit(&mut self, eip: u32, e: fast::Exit, bytes: &InsnBytes) -> bool {
        self(eip, Taken::Exit(e), bytes)
    }
}

/// Where a [`Scanner::run`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// At an instruction the caller has to look at: pushed onto its
    /// vector (one the fast scanner did not take, decoded, or one the
    /// caller's sink declined).
    Pushed,
    /// The scan ends here (and says so from then on).
    End(BlockEnd),
}

/// Bytes fetched at a time: most blocks are short.
const FETCH_CHUNK: usize = 128;

/// A block's scan, run in stretches: a translator hands the fast
/// scanner's instructions ([`fast::take`]) to a sink as they are scanned
/// (no [`Insn`] for them, the scan's state in registers meanwhile), and
/// gets every other instruction pushed onto its vector, in order, one
/// [`Scanner::run`] each. The bytes are fetched into a `space` the caller
/// keeps (and passes again with the fetch function at each run) in
/// chunks of `FETCH_CHUNK` as decoding reaches them.
#[derive(Debug)]
pub struct Scanner {
    /// The first instruction of this stretch of code.
    start: u32,
    bitness: u32,
    /// The most instructions to scan from `start`.
    max: usize,
    past_jcc: bool,
    fast: bool,
    /// Bytes from `start` to the end of its page, and to fetch at most
    /// (the last instruction may run into the next page).
    page_left: usize,
    want: usize,
    /// Bytes asked of `fetch` so far, and fetched.
    asked: usize,
    fetched: usize,
    /// Where the next instruction starts (from `start`).
    off: usize,
    /// Instructions found from `start`, and since [`Scanner::new`].
    taken: usize,
    total: usize,
    done: Option<BlockEnd>,
}

impl Scanner {
    /// A scan at `start` of at most `max` instructions (see
    /// [`scan_block_into`] for `past_jcc` and `fast`); fetches the first
    /// chunk.
    pub fn new(
        fetch: &mut impl FnMut(u32, &mut [u8]) -> usize,
        start: u32,
        bitness: u32,
        max: usize,
        past_jcc: bool,
        fast: bool,
        space: &mut [u8; SCAN_SPACE],
    ) -> Scanner {
        let mut sc = Scanner {
            start,
            bitness,
            max,
            past_jcc,
            fast: fast && bitness == 32,
            page_left: 0,
            want: 0,
            asked: 0,
            fetched: 0,
            off: 0,
            taken: 0,
            total: 0,
            done: None,
        };
        sc.restart(fetch, start, max, past_jcc, space);
        sc
    }

    /// Scan on at `start` instead (a superblock following a jump), at
    /// most `max` instructions more.
    pub fn restart(
        &mut self,
        fetch: &mut impl FnMut(u32, &mut [u8]) -> usize,
        start: u32,
        max: usize,
        past_jcc: bool,
        space: &mut [u8; SCAN_SPACE],
    ) {
        // The instructions start on this page (the last may run into the
        // next), at most MAX_BLOCK_INSNS of at most MAX_INSN_LEN bytes.
        self.start = start;
        self.max = max.min(MAX_BLOCK_INSNS);
        self.past_jcc = past_jcc;
        self.page_left = (PAGE_SIZE - start % PAGE_SIZE) as usize;
        self.want = (self.page_left + MAX_INSN_LEN - 1).min(SCAN_SPACE);
        self.asked = self.want.min(FETCH_CHUNK);
        self.fetched = fetch(start, &mut space[..self.asked]);
        self.off = 0;
        self.taken = 0;
        self.done = None;
    }

    /// Where this stretch of code starts, and the bytes scanned from
    /// there.
    pub fn stretch(&self) -> (u32, u32) {
        (self.start, self.off as u32)
    }

    /// Instructions found since [`Scanner::new`].
    pub fn scanned(&self) -> usize {
        self.total
    }

    /// Scan on: each instruction the fast scanner takes, each conditional
    /// branch the scan goes on past and a block exit it knows go to `sink`
    /// (see [`Sink`]; a function of its EIP, what the scanner found and
    /// its bytes is one), which says whether it took it (else it is pushed
    /// onto `insns` and the run stops there; a block exit taken ends the
    /// scan); stop at the next other instruction (decoded and pushed onto
    /// `insns`) or at the end of the block. With `keep`, the instructions
    /// the sink took are pushed onto `insns` too.
    #[inline]
    pub fn run(
        &mut self,
        fetch: &mut impl FnMut(u32, &mut [u8]) -> usize,
        space: &mut [u8; SCAN_SPACE],
        insns: &mut Vec<Insn>,
        keep: bool,
        sink: &mut impl Sink,
    ) -> Step {
        if let Some(e) = self.done {
            return Step::End(e);
        }
        let (start, page_left, want, max) = (self.start, self.page_left, self.want, self.max);
        let (mut off, mut asked, mut fetched, mut taken) =
            (self.off, self.asked, self.fetched, self.taken);
        let first = taken;
        let mut done = None;
        // Below `bound` an instruction starts on the page with a whole
        // MAX_INSN_LEN fetched (or all there is): the checks below it are
        // skipped.
        let bound = |fetched: usize, asked: usize| {
            let whole = match fetched == asked && asked < want {
                true => fetched.saturating_sub(MAX_INSN_LEN - 1),
                false => fetched,
            };
            whole.min(page_left)
        };
        let mut below = bound(fetched, asked);
        'scan: loop {
            // The common case first: the fast scanner's instructions one
            // after another, each with a whole MAX_INSN_LEN fetched at it
            // on the page (none of the checks below applies to them, and
            // their bytes are read in place).
            if self.fast {
                let solid = fetched.saturating_sub(MAX_INSN_LEN - 1).min(page_left);
                while off < solid && taken < max {
                    let Some(raw) = space
                        .get(off..off + MAX_INSN_LEN)
                        .and_then(|w| <&[u8; MAX_INSN_LEN]>::try_from(w).ok())
                    else {
                        break;
                    };
                    let Some(p) = fast::take(raw) else {
                        break;
                    };
                    let eip = start.wrapping_add(off as u32);
                    let len = usize::from(p.len());
                    let took = sink.plain(eip, p, raw);
                    off += len;
                    taken += 1;
                    let bytes = || InsnBytes {
                        buf: *raw,
                        len: len as u8,
                    };
                    if !took {
                        // Declined: the caller's, as the others below.
                        insns.push(Insn::fast(eip, p, bytes()));
                        break 'scan;
                    }
                    if keep {
                        insns.push(Insn::fast(eip, p, bytes()));
                    }
                }
            }
            let eip = start.wrapping_add(off as u32);
            if taken >= max {
                done = Some(BlockEnd::SizeLimit);
                break;
            }
            if off >= below {
                if off >= page_left {
                    done = Some(BlockEnd::PageBoundary);
                    break;
                }
                // Less than a whole instruction left of a full chunk:
                // fetch on.
                if fetched == asked && asked < want && fetched - off < MAX_INSN_LEN {
                    let more = (asked + FETCH_CHUNK).min(want);
                    fetched += fetch(start.wrapping_add(asked as u32), &mut space[asked..more]);
                    asked = more;
                    below = bound(fetched, asked);
                }
                if off >= fetched {
                    done = Some(BlockEnd::FetchFault(eip));
                    break;
                }
            }
            if self.fast {
                // One of the fast scanner's, or a conditional branch the
                // scan goes on past (as below: its fall-through on the
                // page). (One call of the sink: inlined.)
                let window = &space[off..fetched];
                let found = match fast::take(window) {
                    Some(p) => Some((Taken::Plain(p), usize::from(p.len()))),
                    None => self
                        .past_jcc
                        .then(|| fast::jcc(window, eip))
                        .flatten()
                        .filter(|&(len, _, _)| off + len < page_left)
                        .map(|(len, cc, target)| (Taken::Jcc { cc, target }, len))
                        .or_else(|| fast::exit(window, eip).map(|(len, e)| (Taken::Exit(e), len))),
                };
                if let Some((t, len)) = found {
                    let bytes = InsnBytes::within(&space[..], off, len);
                    let took = match t {
                        Taken::Plain(p) => sink.plain(eip, p, bytes.raw()),
                        Taken::Jcc { cc, target } => sink.jcc(eip, cc, target, &bytes),
                        Taken::Exit(e) => sink.exit(eip, e, &bytes),
                    };
                    if took {
                        off += len;
                        taken += 1;
                        if keep {
                            insns.push(Insn::taken(eip, t, bytes));
                        }
                        if let Taken::Exit(_) = t {
                            // The block ends with it.
                            done = Some(BlockEnd::ControlFlow);
                            break;
                        }
                        continue;
                    }
                    // A declined branch goes the way of the others, below.
                    if let Taken::Plain(p) = t {
                        off += len;
                        taken += 1;
                        insns.push(Insn::fast(eip, p, bytes));
                        break;
                    }
                }
            }
            // Relative branches, RET and LEAVE built without the decoder
            // (the same instruction it would decode).
            let simple = if self.fast {
                fast::simple(&space[off..fetched], eip)
            } else {
                None
            };
            // (Decoded in place, in the vector's next slot: an instruction
            // is not copied on its way there.)
            insns.push(Insn {
                ins: simple.unwrap_or_default(),
                bytes: InsnBytes {
                    buf: [0; MAX_INSN_LEN],
                    len: 0,
                },
                class: Class::Innocuous,
                special: None,
                fast: None,
            });
            let slot = insns.last_mut().expect("pushed above");
            if simple.is_none() {
                let mut decoder = Decoder::with_ip(
                    self.bitness,
                    &space[off..fetched],
                    u64::from(eip),
                    DecoderOptions::NONE,
                );
                decoder.decode_out(&mut slot.ins);
                let ins = &slot.ins;
                if ins.is_invalid() || ins.code() == Code::Ud2 {
                    // Running out of fetched bytes (a fetch fault ahead,
                    // not the end of the window) is a fetch fault, not #UD.
                    let short = ins.is_invalid()
                        && decoder.last_error() == DecoderError::NoMoreBytes
                        && fetched < want;
                    insns.pop();
                    done = Some(if short {
                        BlockEnd::FetchFault(eip)
                    } else {
                        BlockEnd::Undecodable(eip)
                    });
                    break;
                }
            }
            let ins = &slot.ins;
            let len = ins.len();
            let (sp, class) = special_and_class(ins);
            slot.bytes = InsnBytes::within(&space[..], off, len);
            slot.class = class;
            slot.special = sp;
            off += len;
            taken += 1;
            if class == Class::ControlFlow
                && !(self.past_jcc
                    && ins.is_jcc_short_or_near()
                    && ins.op0_kind() == OpKind::NearBranch32
                    && off < page_left)
            {
                // Looked at by the caller first: the end is the next run's.
                self.done = Some(BlockEnd::ControlFlow);
            } else if let Some(s) = sp.filter(|s| s.ends_block()) {
                self.done = Some(BlockEnd::Special(s));
            }
            break;
        }
        self.off = off;
        self.asked = asked;
        self.fetched = fetched;
        self.taken = taken;
        self.total += taken - first;
        match done {
            Some(e) => {
                self.done = Some(e);
                Step::End(e)
            }
            None => Step::Pushed,
        }
    }
}

/// Every basic block reachable from `entry` by following direct near and
/// far branch targets and fall-through paths (indirect targets are not
/// known statically). At most `max_blocks` blocks, in discovery order.
pub fn reachable_blocks(
    mut fetch: impl FnMut(u32, &mut [u8]) -> usize,
    entry: u32,
    bitness: u32,
    max_blocks: usize,
) -> Vec<Block> {
    let mut todo = vec![entry];
    let mut seen = std::collections::BTreeSet::new();
    let mut blocks = Vec::new();
    while let Some(pc) = todo.pop() {
        if blocks.len() >= max_blocks || !seen.insert(pc) {
            continue;
        }
        let b = scan_block(&mut fetch, pc, bitness);
        for i in &b.insns {
            match i.ins.op0_kind() {
                OpKind::NearBranch32 | OpKind::NearBranch16 => {
                    todo.push(i.ins.near_branch_target() as u32)
                }
                OpKind::FarBranch32 => todo.push(i.ins.far_branch32()),
                _ => {}
            }
        }
        let falls_through = !matches!(b.end, BlockEnd::Undecodable(_) | BlockEnd::FetchFault(_))
            && b.insns.last().is_some_and(|last| {
                !matches!(
                    last.ins.flow_control(),
                    FlowControl::UnconditionalBranch
                        | FlowControl::Return
                        | FlowControl::IndirectBranch
                )
            });
        if falls_through {
            let last = b.insns.last().expect("non-empty");
            todo.push(last.ins.next_ip32());
        }
        blocks.push(b);
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(code: &[u8]) -> Block {
        scan_block(
            |eip, buf| {
                let off = (eip - 0x1000) as usize;
                let avail = code.len().saturating_sub(off).min(buf.len());
                buf[..avail].copy_from_slice(&code[off..off + avail]);
                avail
            },
            0x1000,
            32,
        )
    }

    #[test]
    fn classes_of_the_popek_goldberg_breakers() {
        // pushfd; cli; mov eax,cr0; sgdt [eax]; mov ax,ds; add eax,1; popfd; hlt
        let b = block(&[
            0x9C, 0xFA, 0x0F, 0x20, 0xC0, 0x0F, 0x01, 0x00, 0x8C, 0xD8, 0x83, 0xC0, 0x01, 0x9D,
            0xF4,
        ]);
        let got: Vec<_> = b.insns.iter().map(|i| (i.class, i.special)).collect();
        assert_eq!(
            got,
            vec![
                (Class::Sensitive, Some(Special::Pushf)),
                (Class::Privileged, Some(Special::Cli)),
                (Class::Privileged, Some(Special::MovFromCr)),
                (Class::Sensitive, Some(Special::Sgdt)),
                (Class::Sensitive, Some(Special::MovFromSeg)),
                (Class::Innocuous, None),
                (Class::Sensitive, Some(Special::Popf)),
                (Class::Privileged, Some(Special::Hlt)),
            ]
        );
        // POPF runs in translated code (on the virtual flags); HLT leaves.
        assert_eq!(b.end, BlockEnd::Special(Special::Hlt));
    }

    #[test]
    fn block_ends_at_branch_and_at_bad_bytes() {
        // nop; jne +0; (never scanned) nop
        let b = block(&[0x90, 0x75, 0x00, 0x90]);
        assert_eq!(b.insns.len(), 2);
        assert_eq!(b.end, BlockEnd::ControlFlow);
        // nop; then 0x0F 0xFF (UD0 needs a ModRM: 0F FF C0 decodes) vs a reserved opcode
        let b = block(&[0x90, 0x0F, 0x0B]);
        assert_eq!(b.end, BlockEnd::Undecodable(0x1001));
        // a truncated instruction at the end of available bytes is a fetch fault
        let b = block(&[0x90, 0xB8, 0x01]);
        assert_eq!(b.end, BlockEnd::FetchFault(0x1001));
    }

    /// A scan in runs hands the sink the fast scanner's instructions and
    /// pushes the others, in order: together, the instructions (EIP,
    /// bytes, what the fast scanner found) and the end that
    /// `scan_block_into` keeps, past Jcc's and up to the page's end,
    /// whether the sink takes every instruction, none or every other (one
    /// it declines is pushed and ends the run).
    #[test]
    fn scanner_runs_hand_over_what_a_whole_scan_keeps() {
        // MOV, PUSH, ADD imm8, a JZ past the NOP, DS-prefixed LEA, POP,
        // a NOP, a MOV from [moffs32], CPUID, again and again; the last
        // instructions run into the next page.
        let unit: &[u8] = &[
            0x89, 0xD8, 0x55, 0x83, 0xC0, 0x05, 0x74, 0x01, 0x90, 0x3E, 0x8D, 0x74, 0x26, 0x00,
            0x5D, 0x90, 0xA1, 0x44, 0x33, 0x22, 0x11, 0x0F, 0xA2,
        ];
        let code: Vec<u8> = unit.iter().copied().cycle().take(8192).collect();
        let mut fetch = |eip: u32, buf: &mut [u8]| {
            let off = eip as usize;
            let n = code.len().saturating_sub(off).min(buf.len());
            buf[..n].copy_from_slice(&code[off..off + n]);
            n
        };
        let key = |i: &Insn| (i.ins.ip32(), i.ins.len(), i.bytes, i.fast);
        let mut space = [0u8; SCAN_SPACE];
        for start in [0u32, 3, 0xF80, 0xFE9] {
            let mut whole = Vec::new();
            let end = scan_block_into(
                &mut fetch, start, 32, &mut whole, 64, true, true, &mut space,
            );
            let whole: Vec<_> = whole.iter().map(key).collect();
            assert!(
                whole.iter().filter(|k| k.3.is_some()).count() > 3,
                "{start:#x}"
            );
            for policy in 0..3 {
                let mut sc = Scanner::new(&mut fetch, start, 32, 64, true, true, &mut space);
                let (mut got, mut insns, mut k) = (Vec::new(), Vec::new(), 0usize);
                let step = loop {
                    let before = insns.len();
                    let step = sc.run(
                        &mut fetch,
                        &mut space,
                        &mut insns,
                        false,
                        &mut |eip, t, b: &_| {
                            k += 1;
                            let take = policy == 0 || (policy == 2 && k % 2 == 0);
                            if take {
                                got.push(key(&Insn::taken(eip, t, *b)));
                            }
                            take
                        },
                    );
                    assert!(insns.len() <= before + 1, "{start:#x}: one pushed at most");
                    got.extend(insns[before..].iter().map(key));
                    if let Step::End(e) = step {
                        break e;
                    }
                };
                assert_eq!(got, whole, "{start:#x}, policy {policy}");
                assert_eq!(step, end, "{start:#x}, policy {policy}");
                assert_eq!(sc.scanned(), whole.len(), "{start:#x}, policy {policy}");
            }
        }
    }

    #[test]
    fn block_stops_at_page_boundary_and_size_limit() {
        let b = scan_block(
            |_, buf| {
                buf.fill(0x90);
                buf.len()
            },
            0x1FF0,
            32,
        );
        assert_eq!(b.insns.len(), 16);
        assert_eq!(b.end, BlockEnd::PageBoundary);
        let b = scan_block(
            |_, buf| {
                buf.fill(0x90);
                buf.len()
            },
            0x1000,
            32,
        );
        assert_eq!(b.insns.len(), MAX_BLOCK_INSNS);
        assert_eq!(b.end, BlockEnd::SizeLimit);
    }

    #[test]
    fn the_memo_by_code_agrees_with_classifying_each_instruction() {
        // Every one- and two-byte opcode with a spread of ModRM bytes and
        // prefixes, twice (the second time from the memo).
        assert!(Code::values().len() <= MEMO_CODES);
        for round in 0..2 {
            for pre in [&[][..], &[0x66], &[0x67], &[0xF3], &[0x64]] {
                for op in 0..0x200u32 {
                    for modrm in [0x00u8, 0x05, 0x24, 0x44, 0xC0, 0xC4, 0xD8, 0xE1, 0xF8, 0xFF] {
                        let mut b = pre.to_vec();
                        if op >= 0x100 {
                            b.push(0x0F);
                        }
                        b.extend([op as u8, modrm, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66]);
                        let ins = decode_one(&b, 0x1000, 32);
                        if ins.is_invalid() {
                            continue;
                        }
                        let want = (special(&ins), classify(&ins));
                        assert_eq!(special_and_class(&ins), want, "round {round}: {b:02x?}");
                    }
                }
            }
        }
    }

    #[test]
    fn table_is_indexed_by_kind() {
        for (i, row) in SPECIALS.iter().enumerate() {
            assert_eq!(row.kind as usize, i);
        }
        assert!(SPECIALS.iter().any(|r| r.at_ring3 == AtRing3::Silent));
    }
}
