//! The `bt` engine's dispatcher, first version.
//!
//! At each step: in a mode the translator handles (flat CS/DS/ES/SS, paging
//! off, no single-stepping), look up the translation for CS:EIP; on a miss,
//! scan the basic block and compile its longest prefix of copyable
//! instructions. Run it on the host; then let the interpreter execute the
//! instruction that ended the prefix (a special instruction, control
//! transfer, or anything not copied yet) — the interpreter fallback. A host
//! fault inside translated code stops it before the faulting instruction,
//! which the interpreter then executes with the guest's semantics.
//!
//! Self-modifying code: pages holding translated code are write-protected
//! in the guest window and tracked by [`GuestRam`]; a write to one (by
//! translated code, which faults and is redone by the interpreter, or by
//! the interpreter itself) invalidates that page's translations before the
//! next lookup.
//!
//! Still missing (issue 4): chaining, indirect-branch lookup, helper calls
//! instead of interpreter fallbacks for special instructions, ESP mapping,
//! the LRU bound, `--dump` and `--stats`.

use std::hash::{BuildHasherDefault, Hasher};
use std::num::NonZeroUsize;

use lru::LruCache;

/// A hasher for guest EIPs: one multiply (the keys are not adversarial
/// for the host, only for hash-table balance).
#[derive(Default)]
struct EipHasher(u64);

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

use popek_decode::{scan_block, PAGE_SIZE};
use popek_interp::Step;
use popek_vcpu::{cr0, flags, SegReg, Vcpu};

use crate::code_buffer::CodeBuffer;
use crate::lower::{lower, lower_stack, lower_terminator, Lowering};
use crate::straight::{set_gs_base, Context, Straight};

/// A cache entry: translated code, or a note that nothing at this EIP
/// can be copied (so the block is not scanned again).
enum Entry {
    Code {
        code: Straight,
        /// Guest EIP of each translated instruction, then the EIP after them.
        eips: Vec<u32>,
        /// Does the code end with a lowered branch (which sets the next EIP)?
        terminated: bool,
        pages: (u32, u32),
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

/// Counters of the engine.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Blocks translated (including interpret-only markers).
    pub blocks_translated: u64,
    /// Guest instructions copied into host code.
    pub insns_translated: u64,
    /// Host code bytes emitted.
    pub host_bytes: u64,
    /// Cache lookups, hits and misses.
    pub lookups: u64,
    /// Lookups that found a translation.
    pub hits: u64,
    /// Guest instructions executed as host code.
    pub insns_native: u64,
    /// Guest instructions executed by the interpreter fallback.
    pub insns_interpreted: u64,
    /// Host faults inside translated code (redone by the interpreter).
    pub faults: u64,
    /// Translations dropped because their code page was written.
    pub invalidations: u64,
    /// Time spent scanning and translating blocks, in nanoseconds.
    pub translate_ns: u64,
    /// Translations evicted by the cache bound (`--cache-blocks`).
    pub evictions: u64,
    /// Times the code buffer filled and every translation was dropped.
    pub flushes: u64,
}

/// Size of the code buffer; when it fills, every translation is dropped.
pub const CODE_BUFFER_SIZE: usize = 32 << 20;

/// The binary-translation engine.
pub struct Bt {
    /// The translation cache: guest EIP to translation, least recently
    /// used first out when bounded.
    cache: LruCache<u32, Entry, BuildHasherDefault<EipHasher>>,
    code: Option<CodeBuffer>,
    /// Counters.
    pub stats: Stats,
}

fn flat(cpu: &Vcpu) -> bool {
    cpu.cr0 & cr0::PG == 0
        && cpu.eflags & flags::TF == 0
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
            stats: Stats::default(),
        }
    }

    /// Point this thread's GS at the guest window (a thread-local makes
    /// the repeat cheap) and set up the code buffer and fault handler.
    fn enter(&mut self, cpu: &mut Vcpu) -> bool {
        if self.code.is_none() {
            crate::fault::install();
            // iced-x86 builds its tables on first use (hundreds of
            // microseconds): pay that here, not in the first translation.
            let warm = popek_decode::decode_one(&[0x01, 0xC8], 0, 32);
            let _ = lower(&warm);
            match CodeBuffer::new(CODE_BUFFER_SIZE) {
                Ok(b) => self.code = Some(b),
                Err(_) => return false,
            }
        }
        match cpu.ram.window() {
            Ok(w) => set_gs_base(w.base()).is_ok(),
            Err(_) => false,
        }
    }

    fn invalidate(&mut self, cpu: &mut Vcpu) {
        let written = cpu.ram.take_code_writes();
        if written.is_empty() {
            return;
        }
        let before = self.cache.len();
        self.cache.retain(|_, e| {
            let (a, b) = e.pages();
            !written.contains(&a) && !written.contains(&b)
        });
        self.stats.invalidations += (before - self.cache.len()) as u64;
    }

    fn translate(&mut self, cpu: &mut Vcpu, eip: u32) -> Entry {
        let block = scan_block(|a, buf| cpu.fetch(a, buf).0, eip, 32);
        let mut eips = Vec::new();
        let mut host = Vec::new();
        let mut terminated = false;
        for i in &block.insns {
            let lowered = match lower(&i.ins) {
                Lowering::Copied(h) => Some(h),
                Lowering::NotCopyable(_) => lower_stack(&i.ins),
            };
            if let Some(h) = lowered {
                eips.push(i.ins.ip32());
                host.push(h);
                continue;
            }
            if let Some(h) = lower_terminator(&i.ins) {
                eips.push(i.ins.ip32());
                host.push(h);
                terminated = true;
            }
            break;
        }
        let n = eips.len();
        let last_byte = if n > 0 {
            block.insns[n - 1].ins.next_ip32().wrapping_sub(1)
        } else {
            eip
        };
        let pages = (eip / PAGE_SIZE, last_byte / PAGE_SIZE);
        cpu.ram.mark_code_page(pages.0);
        cpu.ram.mark_code_page(pages.1);
        self.stats.blocks_translated += 1;
        if host.is_empty() {
            return Entry::Interpret { pages };
        }
        let Some(buf) = self.code.as_mut() else {
            return Entry::Interpret { pages };
        };
        let code = match Straight::compile(buf, host.iter().map(|b| &b[..])) {
            Ok(c) => c,
            Err(_) => {
                // Full: drop every translation, start the buffer again.
                self.cache.clear();
                buf.reset();
                self.stats.flushes += 1;
                match Straight::compile(buf, host.iter().map(|b| &b[..])) {
                    Ok(c) => c,
                    Err(_) => return Entry::Interpret { pages },
                }
            }
        };
        self.stats.insns_translated += n as u64;
        self.stats.host_bytes += code.len() as u64;
        eips.push(block.insns[n - 1].ins.next_ip32());
        Entry::Code {
            code,
            eips,
            terminated,
            pages,
        }
    }

    fn interpret(&mut self, cpu: &mut Vcpu) -> Step {
        self.stats.insns_interpreted += 1;
        let s = popek_interp::step(cpu);
        self.invalidate(cpu);
        s
    }

    /// Execute one translated run (and the instruction after it), or one
    /// interpreted instruction.
    pub fn step(&mut self, cpu: &mut Vcpu) -> Step {
        if cpu.halted || !flat(cpu) || !self.enter(cpu) {
            return self.interpret(cpu);
        }
        self.invalidate(cpu);
        let eip = cpu.eip;
        self.stats.lookups += 1;
        if self.cache.get(&eip).is_some() {
            self.stats.hits += 1;
        } else {
            let t = std::time::Instant::now();
            let e = self.translate(cpu, eip);
            self.stats.translate_ns += t.elapsed().as_nanos() as u64;
            if let Some((old, _)) = self.cache.push(eip, e) {
                if old != eip {
                    self.stats.evictions += 1;
                }
            }
        }
        let Some(Entry::Code {
            code,
            eips,
            terminated,
            ..
        }) = self.cache.peek(&eip)
        else {
            return self.interpret(cpu);
        };
        let n = eips.len() - 1;
        let mut ctx = Context {
            regs: cpu.regs,
            eflags: cpu.eflags,
            next_eip: eips[n],
            fault_rip: 0,
        };
        // SAFETY: `enter` pointed this thread's GS at this CPU's guest
        // window and installed the fault handler; `code` holds only
        // instructions from `lower`, `lower_stack` and `lower_terminator`,
        // run in a flat mode where guest linear addresses are guest
        // physical addresses.
        unsafe { code.run(&mut ctx) };
        cpu.regs = ctx.regs;
        cpu.eflags = ctx.eflags;
        if ctx.fault_rip != 0 {
            // Stopped before the faulting instruction: the interpreter
            // executes it with the guest's semantics.
            self.stats.faults += 1;
            let done = code.instruction_at(ctx.fault_rip).unwrap_or(0);
            cpu.eip = eips[done];
            cpu.retired += done as u64;
            self.stats.insns_native += done as u64;
            return self.interpret(cpu);
        }
        cpu.eip = ctx.next_eip;
        cpu.retired += n as u64;
        self.stats.insns_native += n as u64;
        if *terminated {
            Step::Executed
        } else {
            self.interpret(cpu)
        }
    }
}
