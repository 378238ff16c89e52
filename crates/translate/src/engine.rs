//! The `bt` engine's dispatcher.
//!
//! At each step, in a mode the translator handles (flat CS/DS/ES/SS, paging
//! off, no single-stepping): look up the translation for CS:EIP in the
//! translation cache (an LRU, bounded by `--cache-blocks`); on a miss, scan
//! the basic block and translate its longest lowerable prefix (copied
//! instructions, PUSH/POP, and a final JMP/Jcc/CALL/RET). Run it. Blocks
//! that end in a direct transfer are *chained*: the exit stub's jump is
//! patched to the target block's body as soon as both exist, so loops run
//! in host code without the dispatcher; a budget in R14 brings control back
//! every [`CHAIN_BUDGET`] chained jumps. What no block covers (special
//! instructions, indirect jumps, anything not lowered yet) the interpreter
//! executes: the fallback, counted in `--stats`.
//!
//! A host fault inside translated code stops before the faulting guest
//! instruction; the dispatcher finds it (code-buffer offset to block, then
//! the block's side table) and the interpreter executes it with the guest's
//! semantics.
//!
//! Self-modifying code: pages holding translated code are write-protected
//! in the guest window and tracked by [`GuestRam`]; a write to one (by
//! translated code, which faults and is redone by the interpreter, or by
//! the interpreter) drops that page's translations, and their chains are
//! unlinked, before the next lookup.
//!
//! Still missing (issue 4): inline indirect-branch lookup, helper calls
//! instead of interpreter fallbacks for special instructions, `--dump`,
//! `--stats-json`, `--lockstep`, paging.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::num::NonZeroUsize;

use lru::LruCache;
use popek_decode::scan_block_into;
use popek_interp::Step;
use popek_memory::GuestRam;
use popek_vcpu::{cr0, flags, SegReg, Vcpu};

use crate::code_buffer::CodeBuffer;
use crate::lower::{lower, lower_into, lower_stack, lower_string, lower_terminator, SegBases};
use crate::straight::{
    epilogue_offset, set_gs_base, Context, FlagsOp, HelperCall, LookupEntry, Piece, Straight,
    LOOKUP_ENTRIES, LOOKUP_SHIFT,
};

/// A hasher for guest EIPs: one multiply (the keys are not adversarial
/// for the host, only for hash-table balance).
#[derive(Default)]
pub struct EipHasher(u64);

impl Hasher for EipHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.0 = u64::from(v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A chained jump into a block: the block holding the jump and the
/// code-buffer offset of its rel32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Link {
    from: u32,
    rel32: usize,
    /// Where the jump goes while unchained (its stub's cold tail).
    cold: usize,
}

/// A cache entry: translated code, or a note that nothing at this EIP can
/// be translated (so the block is not scanned again).
enum Entry {
    Code {
        code: Straight,
        /// Guest EIP of each translated instruction, then the EIP after them.
        eips: Vec<u32>,
        /// For each translated instruction, how many instructions before
        /// it the block's code counts as retired (helper calls retire
        /// theirs through the interpreter).
        counted: Vec<u32>,
        pages: (u32, u32),
        /// Chained jumps that land in this block.
        incoming: Vec<Link>,
    },
    Interpret {
        pages: (u32, u32),
    },
}

impl Entry {
    fn pages(&self) -> (u32, u32) {
        match self {
            Entry::Code { pages, .. } | Entry::Interpret { pages } => *pages,
        }
    }
}

/// Where a translated instruction's host code is while a block is built:
/// a range of the engine's arena, or a helper call.
enum Part {
    Code(usize, usize),
    Piece(Piece<'static>),
}

/// Instructions a block (a superblock too) retires at most, its exit
/// included: what the machine's exact instruction budget relies on.
const SUPERBLOCK_MAX: usize = popek_decode::MAX_BLOCK_INSNS;

/// Counters of the engine.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Blocks translated (including interpret-only markers).
    pub blocks_translated: u64,
    /// Guest instructions translated into host code.
    pub insns_translated: u64,
    /// Host code bytes emitted.
    pub host_bytes: u64,
    /// Dispatcher lookups of the translation cache.
    pub lookups: u64,
    /// Lookups that found a translation.
    pub hits: u64,
    /// Block-to-block transfers taken through patched (chained) jumps.
    pub chained: u64,
    /// Guest instructions executed as host code.
    pub insns_native: u64,
    /// Guest instructions executed by the interpreter fallback (in the
    /// dispatcher or through a helper call).
    pub insns_interpreted: u64,
    /// Special instructions executed through helper calls on the vcpu.
    pub special_calls: u64,
    /// Host faults inside translated code (redone by the interpreter).
    pub faults: u64,
    /// Translations dropped because their code page was written.
    pub invalidations: u64,
    /// Time spent scanning and translating blocks, in nanoseconds.
    pub translate_ns: u64,
    /// Translations evicted by the cache bound (`--cache-blocks`).
    pub evictions: u64,
    /// Times every translation was dropped (the code buffer filled, or
    /// the paging mode changed).
    pub flushes: u64,
    /// Of those, the flushes for a change of paging mode, page tables, or
    /// an FS/GS base that translations use.
    pub mode_flushes: u64,
    /// Pages mapped into the shadow window (guest linear memory).
    pub shadow_maps: u64,
    /// Indirect branches (RET, JMP/CALL r/m32) looked up in host code.
    pub indirect_lookups: u64,
    /// Of those, the ones that found their target's translation (the rest
    /// returned to the dispatcher).
    pub indirect_hits: u64,
    /// Dispatcher exits by reason, indexed as [`ExitReason::ALL`].
    pub exits: [u64; 6],
}

/// Why control came back from translated code to the dispatcher (or never
/// left it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// A block ended at a guest address with no chained translation (not
    /// translated yet, an indirect-branch table miss, or a block cut short
    /// before an instruction the translator leaves to the dispatcher).
    Unchained,
    /// The chaining budget ran out (the dispatcher checks the instruction
    /// budget and pending work).
    Budget,
    /// A helper call asked to leave: control went elsewhere, a device has
    /// output or wants to exit, code or page tables were written, or the
    /// mode changed.
    Helper,
    /// A host fault in translated code (the interpreter redid the
    /// instruction: a guest exception, unassigned memory, a watched page,
    /// or a shadow page not mapped yet).
    Fault,
    /// The CPU stopped (triple fault, unsupported instruction) or halted.
    Stop,
    /// The dispatcher interpreted an instruction itself (no translation:
    /// a mode the translator does not handle, or a block-ending special
    /// instruction).
    Interpreted,
}

impl ExitReason {
    /// Every reason, in the order of [`Stats::exits`].
    pub const ALL: [ExitReason; 6] = [
        ExitReason::Unchained,
        ExitReason::Budget,
        ExitReason::Helper,
        ExitReason::Fault,
        ExitReason::Stop,
        ExitReason::Interpreted,
    ];

    /// A short name for statistics.
    pub fn name(self) -> &'static str {
        match self {
            ExitReason::Unchained => "unchained",
            ExitReason::Budget => "budget",
            ExitReason::Helper => "helper",
            ExitReason::Fault => "fault",
            ExitReason::Stop => "stop",
            ExitReason::Interpreted => "interpreted",
        }
    }
}

/// Counts by instruction mnemonic.
#[derive(Debug, Default, Clone)]
pub struct KindCounts {
    /// Interpreter fallbacks (in the dispatcher or through helper calls).
    pub fallbacks: KindMap,
    /// Special instructions executed through helper calls.
    pub specials: KindMap,
}

/// Counts by mnemonic (a cheap hasher: helper calls count on every call).
pub type KindMap = HashMap<iced_x86::Mnemonic, u64, BuildHasherDefault<EipHasher>>;

impl KindCounts {
    /// A map's counts by lowercase mnemonic ("push", "rep movsd" is
    /// "movsd"), most frequent first.
    pub fn named(map: &KindMap) -> Vec<(String, u64)> {
        let mut v: Vec<_> = map
            .iter()
            .map(|(m, n)| (format!("{m:?}").to_lowercase(), *n))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }
}

/// The mnemonic of the instruction at `eip`, and is it special
/// (sensitive or privileged)?
fn kind_at(cpu: &mut Vcpu, eip: u32) -> (iced_x86::Mnemonic, bool) {
    let mut buf = [0u8; popek_decode::MAX_INSN_LEN];
    let n = cpu.fetch(eip, &mut buf).0;
    let ins = popek_decode::decode_one(&buf[..n], eip, 32);
    (ins.mnemonic(), popek_decode::special(&ins).is_some())
}

/// The flags instruction `ins` is, if translated code runs it on the
/// virtual flags (32-bit PUSHF and POPF; the 16-bit forms are helpers).
fn flags_op(ins: &iced_x86::Instruction, host_fixed: u32) -> Option<FlagsOp> {
    use iced_x86::Code;
    Some(match ins.code() {
        Code::Pushfd => FlagsOp::Pushfd { host_fixed },
        Code::Popfd => FlagsOp::Popfd,
        Code::Cli => FlagsOp::Cli,
        Code::Sti => FlagsOp::Sti,
        _ => return None,
    })
}

/// The helper call for `ins`, the `index`-th of its block's helper
/// instructions, after `counted_before` instructions the block counts.
fn helper_call(
    ins: &iced_x86::Instruction,
    special: bool,
    index: usize,
    counted_before: usize,
) -> HelperCall {
    HelperCall {
        eip: ins.ip32(),
        next: ins.next_ip32(),
        arg: HelperArg {
            special,
            x87: popek_interp::x87::is_x87(ins),
            index,
        }
        .encode(),
        counted_before,
    }
}

/// What a helper call's last argument says about its instruction: bit 0
/// special, bit 1 x87, the rest the index of its decoded form in
/// `Bt::helper_insns`.
struct HelperArg {
    special: bool,
    x87: bool,
    index: usize,
}

impl HelperArg {
    fn encode(&self) -> u32 {
        u32::from(self.special) | u32::from(self.x87) << 1 | (self.index as u32) << 2
    }
    fn decode(arg: u32) -> HelperArg {
        HelperArg {
            special: arg & 1 != 0,
            x87: arg & 2 != 0,
            index: (arg >> 2) as usize,
        }
    }
}

/// What helper calls from translated code work on.
struct HelperEnv {
    /// `Bt::helper_insns`.
    insns: *const Vec<iced_x86::Instruction>,
    /// Did a helper ask to leave the block?
    left: bool,
    segs: SegBases,
    cpu: *mut Vcpu,
    key: PagingKey,
    stop: Option<popek_vcpu::Stop>,
    specials: u64,
    fallbacks: u64,
    kinds: *mut KindCounts,
    /// The guest's x87 state is in the host FPU.
    fpu_loaded: bool,
}

/// Execute the instruction at `eip` in place of translated code: the
/// special instructions' vcpu methods and the interpreter's semantics, the
/// same as everywhere else. Returns 0 to go on with the block, 1 to leave
/// it (control went elsewhere, the CPU stopped or halted, a device wants
/// the dispatcher, or code was written).
extern "sysv64" fn run_helper(ctx: *mut Context, eip: u32, next: u32, arg: u32) -> u32 {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: `ctx` is the context `Bt::step` passed to the running
        // code; its `env` points at the HelperEnv on that call's stack,
        // whose `cpu` is the CPU `step` borrowed and does not touch while
        // the code runs.
        let (ctx, env) = unsafe { (&mut *ctx, &mut *((*ctx).env as *mut HelperEnv)) };
        // SAFETY: see above.
        let cpu = unsafe { &mut *env.cpu };
        cpu.regs = ctx.regs;
        cpu.eflags = ctx.guest_eflags();
        cpu.eip = eip;
        let HelperArg {
            special,
            x87,
            index,
        } = HelperArg::decode(arg);
        // SAFETY: `insns` points at the engine's table, which the engine
        // does not touch while its code runs; every helper call in the code
        // buffer has its entry (the table is emptied with the buffer).
        let ins = unsafe { &(&*env.insns)[index] };
        let kind = ins.mnemonic();
        // SAFETY: `kinds` points at the engine's counters, which the engine
        // does not touch while its code runs.
        let kinds = unsafe { &mut *env.kinds };
        if special {
            env.specials += 1;
            *kinds.specials.entry(kind).or_default() += 1;
        } else {
            env.fallbacks += 1;
            *kinds.fallbacks.entry(kind).or_default() += 1;
        }
        // An x87 instruction on the interpreter: the guest's FPU state is
        // in the host FPU while translated code runs; hand it over.
        let handover = x87 && env.fpu_loaded;
        if handover {
            cpu.fpu.save_host();
        }
        let step = popek_interp::step_decoded(cpu, ins);
        if handover {
            cpu.fpu.load_host();
        }
        ctx.regs = cpu.regs;
        ctx.set_eflags(cpu.eflags, cpu.cpl());
        ctx.next_eip = cpu.eip;
        let go_on = match step {
            Step::Executed => {
                cpu.eip == next
                    && !cpu.halted
                    && cpu.io.exit_requested().is_none()
                    && !cpu.io.uart.has_output()
                    && !cpu.ram.has_code_writes()
                    && !cpu.ram.has_table_writes()
                    && flat(cpu)
                    && paging_key(cpu) == env.key
                    && seg_bases(cpu) == env.segs
            }
            Step::Halted => false,
            Step::Stop(s) => {
                env.stop = Some(s);
                false
            }
        };
        env.left |= !go_on;
        u32::from(!go_on)
    }));
    // Unwinding through translated code is not possible: a panic in the
    // interpreter is a host bug, so end the process loudly.
    r.unwrap_or_else(|_| std::process::abort())
}

/// Size of the code buffer; when it fills, every translation is dropped.
pub const CODE_BUFFER_SIZE: usize = 32 << 20;

/// Chained jumps per dispatcher entry before control comes back.
pub const CHAIN_BUDGET: u64 = 1 << 16;

/// What the shadow window and the translations of linear addresses depend
/// on while paging is on: CR3, CR0.WP, CR4.PSE and user mode. None with
/// paging off (translations are keyed by physical address then).
type PagingKey = Option<(u32, u32, u32, bool)>;

/// FS's and GS's bases where translated code may use them.
fn seg_bases(cpu: &Vcpu) -> SegBases {
    use popek_vcpu::attr;
    let base = |r: SegReg| {
        let s = cpu.seg(r);
        let a = s.attr;
        (s.usable()
            && a & attr::CODE == 0
            && a & attr::RW != 0
            && a & attr::DC == 0
            && s.limit == u32::MAX)
            .then_some(s.base)
    };
    SegBases {
        fs: base(SegReg::Fs),
        gs: base(SegReg::Gs),
    }
}

fn paging_key(cpu: &Vcpu) -> PagingKey {
    (cpu.cr0 & cr0::PG != 0).then(|| {
        (
            cpu.cr3,
            cpu.cr0 & cr0::WP,
            cpu.cr4 & popek_vcpu::cr4::PSE,
            cpu.cpl() == 3,
        )
    })
}

/// The binary-translation engine.
pub struct Bt {
    /// The translation cache: guest EIP to translation, least recently
    /// used first out when bounded.
    cache: LruCache<u32, Entry, BuildHasherDefault<EipHasher>>,
    code: Option<CodeBuffer>,
    /// Exit stubs waiting for their target to be translated, by target EIP.
    pending: HashMap<u32, Vec<Link>>,
    /// Code-buffer offset of each block's code, to find a faulting block.
    by_offset: BTreeMap<usize, u32>,
    /// Counters.
    pub stats: Stats,
    /// Interpreter fallbacks by mnemonic, and special-instruction helper
    /// calls by mnemonic.
    pub by_kind: KindCounts,
    /// Where `--dump` writes each translated block.
    dump: Option<Box<dyn std::io::Write>>,
    /// Scratch space for host code while a block is built.
    arena: Vec<u8>,
    /// The decoded instruction of every helper call in the code buffer
    /// (its index is in the call's argument), so a helper neither fetches
    /// nor decodes. Emptied with the buffer.
    helper_insns: Vec<iced_x86::Instruction>,
    /// The paging mode the cached translations and the shadow belong to.
    key: PagingKey,
    /// The indirect-branch table translated code searches (RET, indirect
    /// JMP/CALL), indexed by the low 16 bits of the guest EIP.
    lookup: Box<[LookupEntry]>,
    /// Indices of `lookup` that hold a translation.
    lookup_used: Vec<u16>,
    /// FS and GS bases as the cached translations assume them.
    segs: SegBases,
    /// Does any cached translation use an FS or GS base?
    segs_used: bool,
    /// Do blocks go on past a conditional branch's fall-through
    /// (superblocks)? On by default; the translation-cost benchmark turns
    /// it off to measure basic blocks alone.
    pub superblocks: bool,
    /// The instructions, EIPs and counts of the block being translated,
    /// kept between translations.
    scratch: (Vec<popek_decode::Insn>, Vec<u32>, Vec<u32>),
}

/// Can translated code run in this mode? CS, DS, ES and SS flat (base 0,
/// limit 4 GiB), 32-bit code, no single-stepping. Paging may be on: then
/// guest memory is reached through the shadow window.
fn flat(cpu: &Vcpu) -> bool {
    cpu.eflags & flags::TF == 0
        && [SegReg::Cs, SegReg::Ds, SegReg::Es, SegReg::Ss]
            .iter()
            .all(|s| {
                let seg = cpu.seg(*s);
                seg.usable() && seg.base == 0 && seg.limit == u32::MAX
            })
        && cpu.code32()
}

impl Default for Bt {
    fn default() -> Self {
        Bt::new(None)
    }
}

impl Bt {
    /// A new engine with an empty cache holding at most `capacity` blocks
    /// (unbounded with None). Evicted blocks' host code stays in the code
    /// buffer until it fills and is flushed.
    pub fn new(capacity: Option<NonZeroUsize>) -> Bt {
        let hasher = BuildHasherDefault::<EipHasher>::default();
        Bt {
            cache: match capacity {
                Some(c) => LruCache::with_hasher(c, hasher),
                None => LruCache::unbounded_with_hasher(hasher),
            },
            code: None,
            pending: HashMap::new(),
            by_offset: BTreeMap::new(),
            stats: Stats::default(),
            by_kind: KindCounts::default(),
            dump: None,
            arena: Vec::with_capacity(4096),
            helper_insns: Vec::new(),
            key: None,
            lookup: vec![LookupEntry::default(); LOOKUP_ENTRIES].into_boxed_slice(),
            lookup_used: Vec::new(),
            segs: SegBases::default(),
            segs_used: false,
            superblocks: true,
            scratch: (
                Vec::with_capacity(SUPERBLOCK_MAX),
                Vec::with_capacity(SUPERBLOCK_MAX + 1),
                Vec::with_capacity(SUPERBLOCK_MAX),
            ),
        }
    }

    /// Write every translated block (guest instructions, their class and
    /// how each was translated, then the host code disassembled) to `out`.
    pub fn set_dump(&mut self, out: Box<dyn std::io::Write>) {
        self.dump = Some(out);
    }

    fn dump_block(
        &mut self,
        block: &popek_decode::Block,
        how: &[&str],
        code: &Straight,
        exit: Option<&crate::straight::Exit>,
    ) {
        use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};
        use std::fmt::Write as _;
        let (Some(buf), Some(_)) = (self.code.as_ref(), self.dump.as_ref()) else {
            return;
        };
        let mut s = String::new();
        let mut fmt = IntelFormatter::new();
        let _ = writeln!(
            s,
            "== block {:#010x}: {} guest instructions translated, {} host bytes, exit {}",
            block.start,
            how.len(),
            code.len(),
            match exit {
                Some(crate::straight::Exit::Direct(t)) => format!("to {t:#010x} (chainable)"),
                Some(crate::straight::Exit::Cond {
                    taken, not_taken, ..
                }) => {
                    format!("to {taken:#010x} or {not_taken:#010x} (chainable)")
                }
                Some(crate::straight::Exit::Loop { taken, not_taken })
                | Some(crate::straight::Exit::Jecxz { taken, not_taken }) => {
                    format!("to {taken:#010x} or {not_taken:#010x} by ECX (chainable)")
                }
                Some(crate::straight::Exit::Stored) => {
                    "indirect (RET or JMP/CALL r/m32): table lookup in host code".into()
                }
                None => "to the dispatcher (next instruction not translated)".into(),
            }
        );
        for (i, insn) in block.insns.iter().enumerate() {
            let bytes: Vec<String> = insn.bytes.iter().map(|b| format!("{b:02x}")).collect();
            let mut text = String::new();
            fmt.format(&insn.ins, &mut text);
            let kind = how
                .get(i)
                .copied()
                .unwrap_or("not translated: ends the block");
            let _ = writeln!(
                s,
                "  {:08x}  {:<30} {:<34} {:<12} {kind}",
                insn.ins.ip32(),
                bytes.join(" "),
                text,
                insn.class.name()
            );
            if i >= how.len() {
                break;
            }
        }
        let host = buf.bytes(code.offset(), code.len());
        let start = buf.exec_addr(code.offset()) as u64;
        let mut d = Decoder::with_ip(64, host, start, DecoderOptions::NONE);
        let _ = writeln!(s, "  host code:");
        while d.can_decode() {
            let ins = d.decode();
            let mut text = String::new();
            fmt.format(&ins, &mut text);
            let _ = writeln!(s, "    {:016x}  {text}", ins.ip());
        }
        if let Some(out) = self.dump.as_mut() {
            let _ = out.write_all(s.as_bytes());
        }
    }

    /// Point this thread's GS at the guest window (a thread-local makes
    /// the repeat cheap) and set up the code buffer and fault handler.
    fn enter(&mut self, ram: &mut GuestRam) -> bool {
        if self.code.is_none() {
            crate::fault::install();
            // iced-x86 builds its tables on first use (hundreds of
            // microseconds): pay that here, not in the first translation.
            let warm = popek_decode::decode_one(&[0x01, 0xC8], 0, 32);
            let _ = lower(&warm);
            match CodeBuffer::new(CODE_BUFFER_SIZE) {
                Ok(b) => {
                    let empty = LookupEntry::new(0, b.exec_addr(epilogue_offset()) as u64);
                    self.lookup.fill(empty);
                    self.code = Some(b);
                }
                Err(_) => return false,
            }
        }
        let paging = self.key.is_some();
        let w = if paging { ram.shadow() } else { ram.window() };
        match w {
            Ok(w) => set_gs_base(w.base()).is_ok(),
            Err(_) => false,
        }
    }

    /// Patch a chained jump to land in `target`'s body, or back to its
    /// stub's cold tail (which returns to the dispatcher).
    fn patch(&mut self, l: Link, to_body_of: Option<u32>) {
        let to = match to_body_of.and_then(|t| self.cache.peek(&t)) {
            Some(Entry::Code { code, .. }) => code.body_offset(),
            _ => l.cold,
        };
        if let Some(buf) = self.code.as_mut() {
            buf.patch_rel32(l.rel32, to);
        }
    }

    /// Link a new block at `eip`: stubs waiting for it, and its own stubs.
    fn link(&mut self, eip: u32) {
        let waiting = self.pending.remove(&eip).unwrap_or_default();
        for l in &waiting {
            self.patch(*l, Some(eip));
        }
        let sites: Vec<_> = match self.cache.peek_mut(&eip) {
            Some(Entry::Code { code, incoming, .. }) => {
                incoming.extend(waiting);
                code.sites().to_vec()
            }
            _ => return,
        };
        for site in sites {
            let link = Link {
                from: eip,
                rel32: site.rel32,
                cold: site.cold,
            };
            if let Some(Entry::Code { incoming, .. }) = self.cache.peek_mut(&site.target) {
                incoming.push(link);
                self.patch(link, Some(site.target));
            } else {
                self.pending.entry(site.target).or_default().push(link);
            }
        }
    }

    /// Unlink a block that left the cache.
    fn unlink(&mut self, eip: u32, entry: Entry) {
        let Entry::Code { code, incoming, .. } = entry else {
            return;
        };
        self.forget_lookup(eip);
        self.by_offset.remove(&code.offset());
        for l in incoming {
            if l.from != eip && self.cache.contains(&l.from) {
                self.patch(l, None);
                self.pending.entry(eip).or_default().push(l);
            }
        }
        for site in code.sites() {
            let gone = |l: &Link| l.from == eip && l.rel32 == site.rel32;
            if let Some(Entry::Code { incoming, .. }) = self.cache.peek_mut(&site.target) {
                incoming.retain(|l| !gone(l));
            } else if let Some(list) = self.pending.get_mut(&site.target) {
                list.retain(|l| !gone(l));
            }
        }
    }

    /// Follow the guest's paging mode. Translations of linear addresses
    /// are dropped when CR3, CR0.WP, CR4.PSE or user/supervisor mode
    /// change while paging is on, or when paging is switched; the shadow
    /// window is dropped then too, and whenever a page table it was built
    /// from is written.
    fn sync_paging(&mut self, cpu: &mut Vcpu) {
        let segs = seg_bases(cpu);
        if segs != self.segs {
            if self.segs_used && !self.cache.is_empty() {
                self.flush();
                self.stats.mode_flushes += 1;
            }
            self.segs = segs;
        }
        let key = paging_key(cpu);
        let tables = cpu.ram.take_table_writes();
        if key != self.key || (tables && key.is_some()) {
            if !self.cache.is_empty() {
                self.flush();
                self.stats.mode_flushes += 1;
            }
            cpu.ram.shadow_reset();
            self.key = key;
        } else if tables {
            cpu.ram.shadow_reset();
        }
    }

    /// After the interpreter redid an instruction that faulted on the
    /// shadow window, map the page it touched (if the guest tables allow
    /// the access now) so the next access runs at host speed.
    fn fill_shadow(&mut self, cpu: &mut Vcpu, host_addr: u64, key: PagingKey) {
        let Some((_, _, _, user)) = key else { return };
        if paging_key(cpu) != key || cpu.ram.has_table_writes() {
            return;
        }
        let Ok(w) = cpu.ram.shadow() else { return };
        let Some(lin) = host_addr.checked_sub(w.base() as u64) else {
            return;
        };
        if lin >= 1 << 32 {
            return;
        }
        let lin = lin as u32;
        let Some(p) = cpu.probe(lin, user) else {
            return;
        };
        for t in p.tables.into_iter().flatten() {
            cpu.ram.mark_table_page(t);
        }
        if cpu.ram.shadow_map(lin >> 12, p.phys_page, p.writable) {
            self.stats.shadow_maps += 1;
        }
    }

    /// Make `eip`'s translation findable by indirect branches in host code.
    fn publish_lookup(&mut self, eip: u32) {
        let (Some(Entry::Code { code, .. }), Some(buf)) =
            (self.cache.peek(&eip), self.code.as_ref())
        else {
            return;
        };
        let host = buf.exec_addr(code.body_offset()) as u64;
        let empty = buf.exec_addr(epilogue_offset()) as u64;
        let i = eip as u16;
        let e = &mut self.lookup[usize::from(i)];
        if e.host == empty {
            self.lookup_used.push(i);
        }
        *e = LookupEntry::new(eip, host);
    }

    /// Remove `eip` from the indirect-branch table.
    fn forget_lookup(&mut self, eip: u32) {
        let Some(buf) = self.code.as_ref() else {
            return;
        };
        let e = &mut self.lookup[usize::from(eip as u16)];
        if e.eip() == eip {
            *e = LookupEntry::new(0, buf.exec_addr(epilogue_offset()) as u64);
        }
    }

    /// Drop every translation and reclaim the whole code buffer.
    pub fn flush(&mut self) {
        if let Some(buf) = self.code.as_ref() {
            let empty = LookupEntry::new(0, buf.exec_addr(epilogue_offset()) as u64);
            if self.lookup_used.len() > LOOKUP_ENTRIES / 8 {
                self.lookup.fill(empty);
            } else {
                for &i in &self.lookup_used {
                    self.lookup[usize::from(i)] = empty;
                }
            }
            self.lookup_used.clear();
        }
        self.cache.clear();
        self.segs_used = false;
        self.pending.clear();
        self.by_offset.clear();
        if let Some(buf) = self.code.as_mut() {
            buf.reset();
        }
        self.helper_insns.clear();
        self.stats.flushes += 1;
    }

    fn invalidate(&mut self, ram: &mut GuestRam) {
        let written = ram.take_code_writes();
        if written.is_empty() {
            return;
        }
        let stale: Vec<u32> = self
            .cache
            .iter()
            .filter(|(_, e)| {
                let (a, b) = e.pages();
                written.contains(&a) || written.contains(&b)
            })
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            if let Some(e) = self.cache.pop(&k) {
                self.unlink(k, e);
                self.stats.invalidations += 1;
            }
        }
    }

    fn translate(&mut self, cpu: &mut Vcpu, eip: u32) -> Entry {
        // Vectors kept between translations (room for a whole superblock):
        // nothing is allocated or grows while a block is built.
        let (mut insns, mut eips, mut counted_at) = std::mem::take(&mut self.scratch);
        insns.clear();
        eips.clear();
        counted_at.clear();
        let end = scan_block_into(
            |a, buf| cpu.fetch(a, buf).0,
            eip,
            32,
            &mut insns,
            SUPERBLOCK_MAX,
        );
        let mut block = popek_decode::Block {
            start: eip,
            insns,
            end,
        };
        // Host code of the translated instructions, one after another;
        // `parts` says which bytes (or which helper call) is whose.
        let mut arena = std::mem::take(&mut self.arena);
        arena.clear();
        let mut parts: Vec<Part> = Vec::with_capacity(SUPERBLOCK_MAX);
        let mut exit = None;
        let mut how = Vec::new();
        let dumping = self.dump.is_some();
        let mut counted = 0usize;
        // This block's helper instructions; their indices in the pieces are
        // relative until the block is compiled (a full buffer is flushed,
        // and the engine's table with it, between two attempts).
        let mut helpers = Vec::new();
        let host_fixed = crate::straight::host_fixed_flags();
        let mut k = 0;
        while k < block.insns.len() {
            let i = block.insns[k].clone();
            k += 1;
            let mark = arena.len();
            // Translated code runs x87 instructions on the host FPU, with
            // the guest's state loaded (see `step_within`).
            cpu.fpu.used |= popek_interp::x87::is_x87(&i.ins);
            let kind = if i.class == popek_decode::Class::Innocuous
                && lower_into(&i.ins, Some(&i.bytes), &mut arena, &self.segs).is_ok()
            {
                Some("copied")
            } else if lower_stack(&i.ins, &mut arena) {
                Some("rewritten (guest stack)")
            } else if lower_string(&i.ins, &i.bytes, &mut arena) {
                Some("rewritten (string, host pointers)")
            } else {
                None
            };
            if let Some(kind) = kind {
                self.segs_used |= SegBases::used_by(&i.ins);
                eips.push(i.ins.ip32());
                counted_at.push(counted as u32);
                parts.push(Part::Code(mark, arena.len()));
                if dumping {
                    how.push(kind);
                }
                counted += 1;
                continue;
            }
            if let Some(e) = lower_terminator(&i.ins, &mut arena) {
                eips.push(i.ins.ip32());
                counted_at.push(counted as u32);
                // A superblock: a conditional branch whose fall-through is
                // on the block's page becomes a side exit, and the block
                // goes on there (up to SUPERBLOCK_MAX instructions).
                if let crate::straight::Exit::Cond {
                    cc,
                    taken,
                    not_taken,
                } = e
                {
                    if self.superblocks
                        && arena.len() == mark
                        && k == block.insns.len()
                        && eips.len() < SUPERBLOCK_MAX
                        && not_taken / 4096 == eip / 4096
                    {
                        counted += 1;
                        parts.push(Part::Piece(Piece::Side {
                            cc,
                            target: taken,
                            counted,
                        }));
                        if dumping {
                            how.push("rewritten (side exit; the block goes on)");
                        }
                        let room = SUPERBLOCK_MAX - eips.len();
                        block.end = scan_block_into(
                            |a, buf| cpu.fetch(a, buf).0,
                            not_taken,
                            32,
                            &mut block.insns,
                            room,
                        );
                        continue;
                    }
                }
                parts.push(Part::Code(mark, arena.len()));
                if dumping {
                    how.push("rewritten (block exit)");
                }
                counted += 1;
                exit = Some(e);
                break;
            }
            // PUSHFD, POPFD, CLI and STI on the virtual flags in host code
            // (with a helper call where host code cannot do them).
            if let Some(op) = flags_op(&i.ins, host_fixed) {
                eips.push(i.ins.ip32());
                counted_at.push(counted as u32);
                let call = helper_call(&i.ins, true, helpers.len(), counted);
                parts.push(Part::Piece(Piece::Flags(op, call)));
                helpers.push(i.ins);
                if dumping {
                    how.push(if matches!(op, FlagsOp::Pushfd { .. }) {
                        "rewritten (virtual flags)"
                    } else {
                        "rewritten (virtual flags; helper call unless CPL 0)"
                    });
                }
                counted += 1;
                continue;
            }
            // Anything else that does not transfer control runs in place
            // through a helper call: special instructions on the vcpu
            // methods, the rest on the interpreter.
            let ends = i.class == popek_decode::Class::ControlFlow
                || i.special.is_some_and(|sp| sp.ends_block());
            if ends {
                break;
            }
            eips.push(i.ins.ip32());
            counted_at.push(counted as u32);
            let call = helper_call(&i.ins, i.special.is_some(), helpers.len(), counted);
            parts.push(Part::Piece(Piece::Helper(call)));
            helpers.push(i.ins);
            if dumping {
                how.push(if i.special.is_some() {
                    "helper call (vcpu)"
                } else {
                    "helper call (interpreter fallback)"
                });
            }
        }
        // STI opens an interrupt shadow over the next instruction, which
        // host code does not record: an STI that would be the last
        // instruction of the block's host code (the shadow still open when
        // the block exits) is left to the dispatcher.
        if let Some(Part::Piece(Piece::Flags(FlagsOp::Sti, _))) = parts.last() {
            parts.pop();
            eips.pop();
            counted_at.pop();
            helpers.pop();
            if dumping {
                how.pop();
            }
            counted -= 1;
        }
        let host: Vec<Piece> = parts
            .into_iter()
            .map(|p| match p {
                Part::Code(a, b) => Piece::Code(&arena[a..b]),
                Part::Piece(h) => h,
            })
            .collect();
        let n = eips.len();
        let last_byte = if n > 0 {
            block.insns[n - 1].ins.next_ip32().wrapping_sub(1)
        } else {
            eip
        };
        // The physical pages of the code (the same as the linear ones with
        // paging off), and under paging the tables that map them: a write
        // to either makes this translation stale.
        let user = self.key.is_some_and(|k| k.3);
        let probe = |cpu: &Vcpu, lin: u32| cpu.probe(lin, user);
        let (first, last) = (probe(cpu, eip), probe(cpu, last_byte));
        let pages = match (first, last) {
            (Some(a), Some(b)) => (a.phys_page, b.phys_page),
            _ => (u32::MAX, u32::MAX),
        };
        for p in [first, last].into_iter().flatten() {
            cpu.ram.mark_code_page(p.phys_page);
            for t in p.tables.into_iter().flatten() {
                cpu.ram.mark_table_page(t);
            }
        }
        self.stats.blocks_translated += 1;
        if n == 0 || pages.0 == u32::MAX {
            self.arena = arena;
            self.scratch = (block.insns, eips, counted_at);
            return Entry::Interpret { pages };
        }
        let end = block.insns[n - 1].ins.next_ip32();
        // A block cut short (page boundary, size limit, an instruction left
        // to the dispatcher) goes on at `end`: a chainable exit too.
        let exit = Some(exit.unwrap_or(crate::straight::Exit::Direct(end)));
        let mut compiled = None;
        for attempt in 0..2 {
            let Some(buf) = self.code.as_mut() else { break };
            let table = self.lookup.as_ptr();
            let base = (self.helper_insns.len() as u32) << 2;
            let rebased = |c: HelperCall| HelperCall {
                arg: c.arg + base,
                ..c
            };
            let pieces: Vec<Piece> = host
                .iter()
                .map(|p| match *p {
                    Piece::Helper(c) => Piece::Helper(rebased(c)),
                    Piece::Flags(op, c) => Piece::Flags(op, rebased(c)),
                    ref other => other.clone(),
                })
                .collect();
            match Straight::compile_block(
                buf,
                &pieces,
                counted,
                end,
                exit.as_ref(),
                Some(run_helper),
                Some(table),
            ) {
                Ok(c) => {
                    compiled = Some(c);
                    self.helper_insns.append(&mut helpers);
                    break;
                }
                Err(_) if attempt == 0 => self.flush(), // full: start again
                Err(_) => {}
            }
        }
        drop(host);
        self.arena = arena;
        let Some(code) = compiled else {
            self.scratch = (block.insns, eips, counted_at);
            return Entry::Interpret { pages };
        };
        self.stats.insns_translated += n as u64;
        self.stats.host_bytes += code.len() as u64;
        self.by_offset.insert(code.offset(), eip);
        if self.dump.is_some() {
            self.dump_block(&block, &how, &code, exit.as_ref());
        }
        eips.push(end);
        let entry = Entry::Code {
            code,
            eips: eips.clone(),
            counted: counted_at.clone(),
            pages,
            incoming: Vec::new(),
        };
        self.scratch = (block.insns, eips, counted_at);
        entry
    }

    /// Translate the block at `eip` into the cache (as a miss would),
    /// without running it: for benchmarks of the translation cost.
    /// Returns false when the CPU is not in a mode the translator handles.
    pub fn translate_at(&mut self, cpu: &mut Vcpu, eip: u32) -> bool {
        if !flat(cpu) {
            return false;
        }
        self.sync_paging(cpu);
        if !self.enter(&mut cpu.ram) {
            return false;
        }
        self.translate_into_cache(cpu, eip);
        true
    }

    /// A cache miss: translate the block at `eip`, insert it (evicting the
    /// least recently used block if the cache is full) and link it.
    fn translate_into_cache(&mut self, cpu: &mut Vcpu, eip: u32) {
        let t = std::time::Instant::now();
        let e = self.translate(cpu, eip);
        self.stats.translate_ns += t.elapsed().as_nanos() as u64;
        if let Some((old_eip, old)) = self.cache.push(eip, e) {
            if old_eip != eip {
                self.stats.evictions += 1;
            }
            self.unlink(old_eip, old);
        }
        self.link(eip);
    }

    fn count_exit(&mut self, why: ExitReason) {
        self.stats.exits[why as usize] += 1;
    }

    /// Execute one instruction in the dispatcher (an exit of its own).
    fn interpret(&mut self, cpu: &mut Vcpu) -> Step {
        self.count_exit(ExitReason::Interpreted);
        self.execute_one(cpu)
    }

    /// Execute the instruction at CS:EIP on the interpreter: a special
    /// instruction that ends a block (on its vcpu method, through the
    /// interpreter's decoding) or an interpreter fallback.
    fn execute_one(&mut self, cpu: &mut Vcpu) -> Step {
        let (kind, special) = kind_at(cpu, cpu.eip);
        if special {
            self.stats.special_calls += 1;
            *self.by_kind.specials.entry(kind).or_default() += 1;
        } else {
            self.stats.insns_interpreted += 1;
            *self.by_kind.fallbacks.entry(kind).or_default() += 1;
        }
        let s = popek_interp::step(cpu);
        self.invalidate(&mut cpu.ram);
        s
    }

    /// Interpret the instruction at CS:EIP (counted as the dispatcher's).
    pub fn interpret_one(&mut self, cpu: &mut Vcpu) -> Step {
        self.interpret(cpu)
    }

    /// Run translated code from CS:EIP (chaining as far as it goes), or
    /// interpret one instruction.
    pub fn step(&mut self, cpu: &mut Vcpu) -> Step {
        self.step_within(cpu, u64::MAX)
    }

    /// As [`Bt::step`], taking at most `max_blocks` chained jumps (each
    /// block runs at most 65 guest instructions), so an instruction budget
    /// is honoured to within one block's worth per block.
    pub fn step_within(&mut self, cpu: &mut Vcpu, max_blocks: u64) -> Step {
        if cpu.halted || !flat(cpu) {
            return self.interpret(cpu);
        }
        self.sync_paging(cpu);
        if !self.enter(&mut cpu.ram) {
            return self.interpret(cpu);
        }
        self.invalidate(&mut cpu.ram);
        let eip = cpu.eip;
        self.stats.lookups += 1;
        if self.cache.get(&eip).is_some() {
            self.stats.hits += 1;
        } else {
            self.translate_into_cache(cpu, eip);
        }
        self.publish_lookup(eip);
        let (Some(Entry::Code { code, .. }), Some(buf)) =
            (self.cache.peek(&eip), self.code.as_ref())
        else {
            return self.interpret(cpu);
        };
        let mut env = HelperEnv {
            left: false,
            segs: self.segs,
            cpu: std::ptr::null_mut(),
            key: self.key,
            stop: None,
            specials: 0,
            fallbacks: 0,
            kinds: &mut self.by_kind,
            insns: &self.helper_insns,
            fpu_loaded: cpu.fpu.used,
        };
        let mut ctx = Context {
            regs: cpu.regs,
            eflags: cpu.eflags,
            next_eip: eip,
            fault_rip: 0,
            retired: 0,
            chain_budget: CHAIN_BUDGET.min(max_blocks.max(1)),
            env: 0,
            fault_addr: 0,
            fault_write: 0,
            indirect_misses: 0,
            window: crate::straight::gs_base(),
            sys: 0,
            vif: 0,
            slow: 0,
        };
        ctx.set_eflags(cpu.eflags, cpu.cpl());
        let budget = ctx.chain_budget;
        if env.fpu_loaded {
            // The guest's x87 state goes into the host FPU for the code's
            // copied x87 instructions (and comes back after).
            cpu.fpu.load_host();
        }
        let cpu_ptr: *mut Vcpu = cpu;
        env.cpu = cpu_ptr;
        ctx.env = &mut env as *mut HelperEnv as u64;
        // SAFETY: `enter` pointed this thread's GS at this CPU's guest
        // window and installed the fault handler; every block in the buffer
        // was built by `Straight::compile_block` from lowered instructions
        // and is reachable only through links to blocks still cached; the
        // mode is flat, so guest linear addresses are physical addresses;
        // `cpu` is not used until the code returns (helpers use `cpu_ptr`).
        unsafe { code.run(buf, &mut ctx) };
        // SAFETY: the code has returned; `cpu_ptr` came from `cpu` above.
        let cpu = unsafe { &mut *cpu_ptr };
        if env.fpu_loaded {
            cpu.fpu.save_host();
        }
        cpu.regs = ctx.regs;
        cpu.eflags = ctx.guest_eflags();
        self.stats.chained += budget - ctx.chain_budget;
        let lookups = ctx.retired >> LOOKUP_SHIFT;
        let retired = ctx.retired & ((1 << LOOKUP_SHIFT) - 1);
        self.stats.indirect_lookups += lookups;
        self.stats.indirect_hits += lookups - ctx.indirect_misses;
        cpu.retired += retired;
        self.stats.insns_native += retired;
        self.stats.special_calls += env.specials;
        self.stats.insns_interpreted += env.fallbacks;
        if let Some(stop) = env.stop {
            self.count_exit(ExitReason::Stop);
            return Step::Stop(stop);
        }
        if ctx.fault_rip != 0 {
            // (`buf` still borrows the engine: count directly.)
            self.stats.exits[ExitReason::Fault as usize] += 1;
            // Stopped before a faulting instruction: find it, and let the
            // interpreter execute it with the guest's semantics.
            self.stats.faults += 1;
            let off = ctx.fault_rip - buf.exec_addr(0) as u64;
            let block = self
                .by_offset
                .range(..=off as usize)
                .next_back()
                .map(|(_, e)| *e);
            if let Some(Entry::Code {
                code,
                eips,
                counted,
                ..
            }) = block.and_then(|b| self.cache.peek(&b))
            {
                let done = code.instruction_at(ctx.fault_rip).unwrap_or(0);
                cpu.eip = eips[done];
                let native = u64::from(counted.get(done).copied().unwrap_or(0));
                cpu.retired += native;
                self.stats.insns_native += native;
            }
            let key = self.key;
            let step = self.execute_one(cpu);
            if ctx.fault_addr != 0 {
                self.fill_shadow(cpu, ctx.fault_addr, key);
            }
            return step;
        }
        cpu.eip = ctx.next_eip;
        self.count_exit(if cpu.halted {
            ExitReason::Stop
        } else if env.left {
            ExitReason::Helper
        } else if ctx.chain_budget == 0 {
            ExitReason::Budget
        } else {
            ExitReason::Unchained
        });
        if cpu.halted {
            Step::Halted
        } else {
            Step::Executed
        }
    }
}
