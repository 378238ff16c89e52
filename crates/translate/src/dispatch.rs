//! The dispatcher: the loop that routes every exit of translated code
//! (the seeds' *dispatcher*, the VMM's entry point).
//!
//! At each step, in a mode the translator handles ([`translatable`]):
//! drain the write watch (drop translations of written code pages, follow
//! a page-table write or a change of paging mode), look up the translation
//! for EIP in the cache; on a miss translate the block ([`crate::select`])
//! and link it ([`crate::chain`]). Run it. It returns for one of the
//! [`ExitReason`]s: a stub whose target is not chained, the chaining
//! budget, a helper that asked to leave, a host fault in translated code
//! (the interpreter then executes that one instruction with the guest's
//! semantics, and a shadow page is mapped if the fault was on one), or a
//! stop. What no translation covers (a mode the translator does not
//! handle, a block-ending special instruction) the interpreter executes
//! here, one instruction per step.

use std::num::NonZeroUsize;

use popek_interp::Step;
use popek_memory::GuestRam;
use popek_vcpu::Vcpu;

use crate::abi::{Context, HelperFn, LOOKUP_SHIFT};
use crate::cache::{key_eip, FastMap, Key, TransCache, Translation};
use crate::chain::Link;
use crate::emit::Pace;
use crate::helper::{run_helper, tsc_native, HelperEnv, HotStore};
use crate::host::{set_gs_base, CodeBuffer, DirectMap, Poller};
use crate::lower::lower;
use crate::paging::{paging_key, seg_bases, translatable, PagingKey, Space};
use crate::select::SUPERBLOCK_MAX;
use crate::stats::{ExitReason, KindCounts, Stats};
use crate::watch::WriteWatch;

/// Size of the code buffer; when it fills, every translation is dropped.
pub const CODE_BUFFER_SIZE: usize = 32 << 20;

/// Chained jumps per dispatcher entry before control comes back.
pub const CHAIN_BUDGET: u64 = 1 << 16;
/// Cross-page links cut into a 4 MiB region at address-space switches
/// after which direct exits into it go through the indirect-branch table
/// (`Bt::volatile`).
pub const VOLATILE_CUTS: u16 = 4;

/// The mnemonic of the instruction at `eip`, and is it special
/// (sensitive or privileged)?
fn kind_at(cpu: &mut Vcpu, eip: u32) -> (iced_x86::Mnemonic, bool) {
    let mut buf = [0u8; popek_decode::MAX_INSN_LEN];
    let n = cpu.fetch(eip, &mut buf).0;
    let ins = popek_decode::decode_one(&buf[..n], eip, 32);
    (ins.mnemonic(), popek_decode::special(&ins).is_some())
}

/// The binary-translation engine.
pub struct Bt {
    /// The translation cache: key (EIP, physical page, privilege) to
    /// translation, least recently used first out when bounded.
    pub(crate) cache: TransCache,
    /// A debugger's breakpoints (linear addresses): see
    /// [`Bt::set_breakpoints`].
    pub(crate) breakpoints: std::collections::BTreeSet<u32>,
    pub(crate) code: Option<CodeBuffer>,
    /// Exit stubs waiting for their target to be translated, by target EIP.
    pub(crate) pending: FastMap<u32, crate::chain::Links>,
    /// Cross-page chained jumps (target, link), filed by the 4 MiB region
    /// of the target's pages: cut where the mapping changes (see
    /// [`crate::chain`]).
    pub(crate) cross: FastMap<u16, Vec<(Key, Link)>>,
    /// The cached translations made from each physical page (what a write
    /// to the page may make stale).
    pub(crate) by_page: FastMap<u32, Vec<Key>>,
    /// The 4 MiB regions of the code each indirect-branch table (index:
    /// user) has entries for since it was last emptied.
    pub(crate) lookup_regions: [crate::paging::Regions; 2],
    /// Has the physical window been released since guest paging went on
    /// (see `enter`)?
    window_released: bool,
    /// Code-buffer offset of each block's code, to find a faulting block.
    pub(crate) by_offset: crate::cache::Offsets,
    /// Counters.
    pub stats: Stats,
    /// Host TSC ticks to nanoseconds, for `stats.translate_ns`.
    pub(crate) ns_per_tick: f64,
    /// Interpreter fallbacks by mnemonic, and special-instruction helper
    /// calls by mnemonic.
    pub by_kind: KindCounts,
    /// Where `--dump` writes each translated block.
    pub(crate) dump: Option<Box<dyn std::io::Write + Send>>,
    /// The code and page-table pages the translations depend on.
    pub(crate) watch: WriteWatch,
    /// The shadow address spaces (see [`crate::paging`]); the index of
    /// one is the number of its shadow window in guest RAM.
    pub(crate) spaces: Vec<Space>,
    /// For each page directory and page table something is derived from,
    /// the spaces derived from it (so that a table write visits only
    /// those).
    pub(crate) table_spaces: FastMap<u32, crate::paging::SpaceSet>,
    /// The current space (None with paging off).
    pub(crate) space: Option<usize>,
    /// An instruction of translated code whose access raised a page fault
    /// for the guest: its EIP, the paging mode, and the linear address in
    /// the shadow. Should the guest's handler return to it, it is retried
    /// on the interpreter and the page mapped after it, which saves the
    /// host fault translated code would take there.
    pub(crate) retry: Option<(u32, PagingKey, u64)>,
    /// The current page directory (its page number) and its entries as
    /// the kept links and lookups assume them (see [`crate::paging`]).
    pub(crate) dir_now: Option<(u32, Box<[u32; 1024]>)>,
    /// Writes to each watched page table since a shadow mapping was last
    /// derived from it (see [`crate::paging::FLOOD_WRITES`]).
    pub(crate) flood: FastMap<u32, u32>,
    /// How many times each page table was seen written or unshadowed:
    /// a page a helper call reached through a table whose count moved
    /// since may have been remapped (see `helper::shadow_lag`).
    pub(crate) table_epoch: FastMap<u32, u32>,
    /// Counts switches between spaces (for least-recently-used eviction).
    pub(crate) tick: u64,
    /// The host refused to unmap a shadow window: it may grant what the
    /// guest tables no longer do, so translated code must not use it.
    pub(crate) shadow_broken: bool,
    /// Scratch space for host code while a block is built.
    pub(crate) arena: Vec<u8>,
    /// The decoded instruction of every helper call in the code buffer
    /// (its index is in the call's argument), so a helper neither fetches
    /// nor decodes. Emptied with the buffer.
    pub(crate) helper_insns: Vec<iced_x86::Instruction>,
    /// The paging mode of the current space.
    pub(crate) key: PagingKey,
    /// The indirect-branch tables translated code looks targets up in
    /// (RET, indirect JMP/CALL), direct maps indexed by the whole guest
    /// EIP: one for supervisor translations, one for user ones (made with
    /// the code buffer).
    pub(crate) lookup: Option<Box<[DirectMap; 2]>>,
    /// What each table was given since it was last emptied: an entry for
    /// every EIP whose translation was published, with the pages it was
    /// made from (see [`crate::chain::Published`]).
    pub(crate) lookup_used: [Vec<crate::chain::Published>; 2],
    /// Host faults of translated code's memory accesses by guest EIP (a
    /// store to a watched page, an access the shadow does not grant yet:
    /// an accessed or dirty bit to set, a page the guest's tables changed;
    /// a device's registers): an instruction that takes
    /// [`HOT_STORE_FAULTS`] becomes a helper call (`hot_stores`) when its
    /// block is translated again. Counted in quarters
    /// ([`FAULT_QUARTERS`]): a fault that went away for good (the shadow
    /// mapped the page, or the guest took its #PF) on a page the
    /// instruction had not faulted on before counts one quarter: an
    /// instruction touching fresh page after fresh page (zeroing a new
    /// process's memory, copying to it) faults once per page, and a
    /// helper call would cost every run of it, and its block's
    /// translations twice (promoted, then demoted). Every other fault
    /// counts whole: a store to a watched page faults every time, and a
    /// page faulted on before had its mapping come and go (a kmap-style
    /// window, a clock clearing accessed bits, demand-zero pages freed and
    /// faulted in again).
    pub(crate) store_faults: FastMap<u32, u32>,
    /// The (EIP, host page) pairs that faulted since the shadow spaces last
    /// changed (one emptied, all dropped), for `store_faults`.
    pub(crate) fault_pages: FastMap<(u32, u64), ()>,
    /// Guest EIPs of instructions translated as helper calls: adaptive
    /// binary translation (Adams and Agesen, ASPLOS 2006), a call instead
    /// of a host fault for an instruction whose accesses keep faulting;
    /// one that then rarely would goes back to host code (`demotions`
    /// counts the times: each makes the next promotion take four times
    /// the faults, up to [`MAX_DEMOTIONS`] times).
    pub(crate) hot_stores: FastMap<u32, HotStore>,
    /// The pages (EIP >> 12) that have held a hot store: a block on any
    /// other page looks none of its instructions up in `hot_stores`. Only
    /// grows (a page left here after its hot stores were demoted costs
    /// only those lookups).
    pub(crate) hot_pages: PageSet,
    pub(crate) demotions: FastMap<u32, u32>,
    /// Hot stores a run of host code demoted (acted on at the next drain).
    pub(crate) demoted: Vec<u32>,
    /// May hot stores become checked stores (`Piece::Checked`)? False once
    /// the host refused to map the fast-write map.
    pub(crate) checked_stores: bool,
    /// Do blocks go on past a conditional branch's fall-through
    /// (superblocks)? On by default; the translation-cost benchmark turns
    /// it off to measure basic blocks alone.
    pub superblocks: bool,
    /// Scan the common innocuous instructions with the fast scanner
    /// (`popek_decode::fast`) instead of decoding them? On by default;
    /// crates/bench/tests/fast_scan.rs compares translations with it off.
    pub fast_scan: bool,
    /// The instructions, instruction map and stretches of code (start,
    /// length) of the block being translated, kept between translations.
    pub(crate) scratch: crate::select::Scratch,
    /// The bytes of the block being scanned (kept between translations).
    pub(crate) scan_space: Box<[u8; popek_decode::SCAN_SPACE]>,
    /// Regions whose cross-page links keep being cut at address-space
    /// switches: direct exits into them go through the indirect-branch
    /// table (see `emit::via_table`); and how many links into each region
    /// have been cut (up to [`VOLATILE_CUTS`]).
    pub(crate) volatile: crate::paging::Regions,
    pub(crate) cuts: Box<[u16; 1024]>,
    /// A block's exit sites while [`Bt::link`] chains them (kept between
    /// links: nothing allocated per block).
    pub(crate) site_scratch: Vec<crate::emit::Site>,
    /// How translated code paces itself ([`Pacing`]); the poll page and
    /// its timer when polled.
    pub(crate) pacing: Pacing,
    pub(crate) poller: Option<Poller>,
    /// When the run loop wants control back (machine clock, ns), and the
    /// machine clock when it said so (`Pacing::Polled`).
    pub(crate) wake: (u64, u64),
}

/// How translated code gives control back to the run loop, and whether
/// it counts what it retires (see [`Pace`] for the code of each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pacing {
    /// Exact: every retired instruction counted, a chaining budget on
    /// every transfer (instruction budgets, the instruction clock,
    /// lockstep, statistics). The default.
    #[default]
    Counted,
    /// Counts nothing; returns when the run loop's wake time (see
    /// [`Bt::set_wake`], to be set before each step) has come, through
    /// the poll page.
    Polled,
    /// Counts nothing and returns only when the code exits by itself
    /// (nothing asynchronous: a Linux program).
    Free,
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
        Bt {
            cache: TransCache::new(capacity),
            breakpoints: Default::default(),
            code: None,
            pending: FastMap::default(),
            cross: FastMap::default(),
            by_page: FastMap::default(),
            dir_now: None,
            flood: FastMap::default(),
            table_epoch: FastMap::default(),
            lookup_regions: [crate::paging::Regions::NONE; 2],
            by_offset: Default::default(),
            window_released: false,
            stats: Stats::default(),
            ns_per_tick: popek_vcpu::state::host_tsc_ns_per_tick(),
            by_kind: KindCounts::default(),
            dump: None,
            arena: Vec::with_capacity(4096),
            helper_insns: Vec::new(),
            key: None,
            lookup: None,
            lookup_used: [Vec::new(), Vec::new()],
            superblocks: true,
            fast_scan: true,
            store_faults: FastMap::default(),
            fault_pages: FastMap::default(),
            hot_stores: FastMap::default(),
            hot_pages: PageSet::default(),
            demotions: FastMap::default(),
            demoted: Vec::new(),
            checked_stores: true,
            watch: WriteWatch::default(),
            spaces: Vec::new(),
            table_spaces: FastMap::default(),
            retry: None,
            space: None,
            tick: 0,
            shadow_broken: false,
            volatile: crate::paging::Regions::NONE,
            cuts: Box::new([0; 1024]),
            site_scratch: Vec::new(),
            scan_space: Box::new([0; popek_decode::SCAN_SPACE]),
            scratch: (
                Vec::with_capacity(SUPERBLOCK_MAX),
                Vec::with_capacity(SUPERBLOCK_MAX),
                Vec::with_capacity(SUPERBLOCK_MAX),
                Vec::with_capacity(SUPERBLOCK_MAX),
            ),
            pacing: Pacing::Counted,
            poller: None,
            wake: (u64::MAX, 0),
        }
    }

    /// Choose how translated code paces itself (dropping the translations
    /// made with another pacing). `Pacing::Polled` falls back to
    /// `Pacing::Counted` if the host cannot map a poll page.
    pub fn set_pacing(&mut self, pacing: Pacing) {
        let pacing = match pacing {
            Pacing::Polled => {
                if self.poller.is_none() {
                    self.poller = Poller::new();
                }
                if self.poller.is_some() {
                    Pacing::Polled
                } else {
                    Pacing::Counted
                }
            }
            p => p,
        };
        if pacing != self.pacing {
            self.pacing = pacing;
            if !self.cache.is_empty() {
                self.flush();
            }
        }
    }

    /// The pacing translated code uses.
    pub fn pacing(&self) -> Pacing {
        self.pacing
    }

    /// The pacing as new blocks are compiled.
    pub(crate) fn pace(&self) -> Pace {
        match (self.pacing, &self.poller) {
            (Pacing::Polled, Some(p)) => Pace::Polled(p.addr()),
            (Pacing::Free, _) => Pace::Free,
            _ => Pace::Counted,
        }
    }

    /// With `Pacing::Polled`: the run loop wants control back at machine
    /// time `at` (ns; `now` is the machine time now).
    pub fn set_wake(&mut self, at: u64, now: u64) {
        self.wake = (at, now);
    }

    /// Point this thread's GS at the guest window (a thread-local makes
    /// the repeat cheap) and set up the code buffer and fault handler.
    fn enter(&mut self, ram: &mut GuestRam) -> bool {
        if self.code.is_none() {
            crate::host::fault::install();
            // iced-x86 builds its tables on first use (hundreds of
            // microseconds): pay that here, not in the first translation.
            let warm = popek_decode::decode_one(&[0x01, 0xC8], 0, 32);
            let _ = lower(&warm);
            let (Ok(mut b), Some(s), Some(u)) = (
                CodeBuffer::new(CODE_BUFFER_SIZE),
                DirectMap::new(),
                DirectMap::new(),
            ) else {
                return false;
            };
            // The shared routines and the assembler, before the first
            // translation (a buffer too small for them translates nothing).
            if crate::emit::prepare(&mut b).is_err() {
                return false;
            }
            self.code = Some(b);
            self.lookup = Some(Box::new([s, u]));
        }
        if self.space.is_some() && self.shadow_broken {
            self.shadow_broken = (0..self.spaces.len()).any(|i| ram.shadow_reset(i).is_err());
            if self.shadow_broken {
                return false;
            }
        }
        let w = match self.space {
            Some(i) => {
                // Under guest paging translated code runs on the shadows:
                // the physical window goes, and with it a host call per
                // page watched or unwatched. Once: a guest that turns
                // paging off again keeps the window it makes then.
                if !self.window_released && ram.release_window() {
                    self.window_released = true;
                }
                // (Its pages made read-only while another ran are made so
                // on the host now.)
                if ram.set_running_shadow(Some(i)).is_err() {
                    return false;
                }
                ram.shadow(i)
            }
            None => {
                // (No shadow runs: every one is protected at once.)
                let _ = ram.set_running_shadow(None);
                ram.window()
            }
        };
        match w {
            Ok(w) => set_gs_base(w.base()).is_ok(),
            Err(_) => false,
        }
    }

    /// A debugger's breakpoints, at linear addresses. Translation stops
    /// before each: a block never holds one after its first instruction,
    /// and the block that would start at one is left to the dispatcher
    /// (an instruction for the interpreter), so no chained jump runs past
    /// it and the run loop sees CS:EIP reach it. The translations that hold
    /// an address whose breakpoint came or went are dropped (translated
    /// again on their next use); how many.
    pub fn set_breakpoints(&mut self, bps: &std::collections::BTreeSet<u32>) -> u64 {
        let changed: Vec<u32> = self
            .breakpoints
            .symmetric_difference(bps)
            .copied()
            .collect();
        if changed.is_empty() {
            return 0;
        }
        self.breakpoints = bps.clone();
        let holds = |k: Key, t: &Translation, buf: Option<&CodeBuffer>| {
            changed
                .iter()
                .any(|&a| key_eip(k) == a || t.holds_insn(buf, a))
        };
        let n = self.drop_keyed_where(holds);
        self.stats.invalidations += n;
        n
    }

    /// Translate the block at `eip` into the cache (as a miss would),
    /// without running it: for benchmarks of the translation cost.
    /// Returns false when the CPU is not in a mode the translator handles.
    pub fn translate_at(&mut self, cpu: &mut Vcpu, eip: u32) -> bool {
        if !translatable(cpu) {
            return false;
        }
        self.drain_writes(cpu);
        if !self.enter(&mut cpu.ram) {
            return false;
        }
        match self.entry_key(cpu, eip) {
            Some(key) => {
                self.translate_into_cache(cpu, key);
                true
            }
            None => false,
        }
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
        popek_interp::step(cpu)
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
        if cpu.halted || !translatable(cpu) {
            return self.interpret(cpu);
        }
        self.drain_writes(cpu);
        if !self.enter(&mut cpu.ram) {
            return self.interpret(cpu);
        }
        // Checked stores read the fast-write map; should the host refuse
        // to map it, none are made any more and those made are dropped.
        let fast_map = cpu
            .ram
            .fast_map()
            .ok()
            .zip(cpu.ram.page_deltas(self.space).ok());
        if fast_map.is_none() && self.checked_stores {
            self.checked_stores = false;
            self.flush();
        }
        if let Some((at, key, lin)) = self.retry {
            if cpu.eip == at && paging_key(cpu) == key {
                // The instruction whose access raised a #PF, back from the
                // guest's handler: the interpreter retries it and the page
                // is mapped after it, as a host fault would have (which
                // the retry in translated code would nearly always take:
                // the handler changed the entry).
                self.retry = None;
                let step = self.interpret(cpu);
                if let Some(host) = self
                    .space
                    .and_then(|i| cpu.ram.shadow(i).ok())
                    .map(|w| w.base() as u64 + lin)
                {
                    self.fill_shadow(cpu, host, key);
                }
                return step;
            }
        }
        let eip = cpu.eip;
        let Some(key) = self.entry_key(cpu, eip) else {
            // The fetch faults: the interpreter delivers the #PF.
            return self.interpret(cpu);
        };
        self.stats.lookups += 1;
        // A block on two pages is right here only if its second page maps
        // where it did.
        let hit = self.cache.get(&key).map(|t| {
            let (lin, pages) = (t.lin_pages(), t.pages());
            (lin.1, pages.1, lin.0 != lin.1)
        });
        match hit {
            Some((l, p, two)) if !two || self.second_page_ok(cpu, l, p) => {
                self.stats.hits += 1;
                if self.space.is_some() {
                    // Stubs cut at an address-space switch, or made while
                    // this page was not in the TLB, may land here now.
                    self.link_waiting(key);
                }
            }
            _ => self.translate_into_cache(cpu, key),
        }
        self.publish_lookup(key);
        let (Some(Translation::Code { code, .. }), Some(buf)) =
            (self.cache.peek(&key), self.code.as_ref())
        else {
            return self.interpret(cpu);
        };
        let mut env = HelperEnv {
            left: false,
            cpu: std::ptr::null_mut(),
            key: self.key,
            stop: None,
            specials: 0,
            fast_regions: 0,
            fallbacks: 0,
            kinds: &mut self.by_kind,
            insns: &self.helper_insns,
            fpu_loaded: cpu.fpu.used,
            hot: &mut self.hot_stores,
            demote: Vec::new(),
            watch: &self.watch,
            space: self.space,
            virt: match self.space {
                Some(i) => &mut self.spaces[i].virt,
                None => std::ptr::null_mut(),
            },
            table_epoch: &self.table_epoch,
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
            window: crate::host::gs_base(),
            sys: 0,
            vif: 0,
            slow: 0,
            fs_base: 0,
            gs_base: 0,
            seg_slow: [1; 2],
            tsc_slow: 1,
            _pad: 0,
            tsc_offset: 0,
            scratch: 0,
            fast_map: 0,
            ram_rw: cpu.ram.ram_ptr() as u64,
            scratch2: 0,
            page_deltas: 0,
            helper: run_helper as HelperFn as usize as u64,
        };
        // (Without them, no checked store is left in the cache: see above.)
        if let Some((map, deltas)) = fast_map {
            ctx.fast_map = map as u64;
            ctx.page_deltas = deltas as u64;
        }
        ctx.set_eflags(cpu.eflags, cpu.cpl());
        ctx.set_segs(seg_bases(cpu));
        ctx.set_tsc(cpu.tsc_offset, tsc_native(cpu));
        if cpu.board.interrupt_pending() {
            // A device interrupt waits for IF: let STI, POPF and CLI go
            // through the helper, which leaves as soon as IF is set.
            ctx.slow = 1;
        }
        let budget = ctx.chain_budget;
        if self.pacing == Pacing::Polled {
            let (at, now) = self.wake;
            if !self.poller.as_mut().is_some_and(|p| p.arm(at, now)) {
                // No timer: nothing could stop code that counts nothing.
                self.set_pacing(Pacing::Counted);
                return self.interpret(cpu);
            }
        }
        if env.fpu_loaded {
            // The guest's x87 state goes into the host FPU for the code's
            // copied x87 instructions (and comes back after).
            cpu.fpu.load_host();
        }
        // An interrupt shadow (after STI or MOV SS) covers the next
        // instruction only, and that one runs first in the block: it ends
        // here (a helper's STI opens a new one).
        cpu.int_shadow = false;
        let cpu_ptr: *mut Vcpu = cpu;
        env.cpu = cpu_ptr;
        ctx.env = &mut env as *mut HelperEnv as u64;
        // SAFETY: `enter` pointed this thread's GS at this CPU's guest
        // window (the physical window with paging off, where linear
        // addresses are physical in a translatable mode; with paging on the
        // shadow window, which maps only what the guest tables grant: the
        // write watch resets it on every page-table write) and installed
        // the fault handler; every block in the buffer was built by
        // `emit::Builder` from lowered instructions and is
        // reachable only through links to blocks still cached; `cpu` is
        // not used until the code returns (helpers use `cpu_ptr`).
        unsafe { code.run(buf, &mut ctx) };
        // SAFETY: the code has returned; `cpu_ptr` came from `cpu` above.
        let cpu = unsafe { &mut *cpu_ptr };
        if env.fpu_loaded {
            cpu.fpu.save_host();
        }
        cpu.regs = ctx.regs;
        cpu.eflags = ctx.guest_eflags();
        self.stats.chained += budget - ctx.chain_budget;
        // Stopped before a faulting instruction: which one, and how many
        // instructions of its block retired before it.
        let polled = ctx.fault_rip != 0
            && self
                .poller
                .as_ref()
                .is_some_and(|p| p.holds(ctx.fault_addr));
        let fault = (ctx.fault_rip != 0).then(|| {
            let off = ctx.fault_rip - buf.exec_addr(0) as u64;
            let block = self.by_offset.holding(off as usize);
            match block.and_then(|b| self.cache.peek(&b)) {
                // The run loop revoked the poll page: the guest goes on
                // where the exit was going.
                Some(Translation::Code { code, .. }) if polled => (
                    Some(
                        code.poll_at(buf, ctx.fault_rip)
                            .and_then(|p| p.target)
                            .unwrap_or(ctx.next_eip),
                    ),
                    0,
                ),
                Some(Translation::Code { code, .. }) => {
                    let (end, insns) = code.insns(buf);
                    let done = code.insn_at(ctx.fault_rip, insns).unwrap_or(0);
                    match insns.get(done) {
                        Some([eip, native, _]) => (Some(eip), u64::from(native)),
                        None => (Some(end), 0),
                    }
                }
                _ => (None, 0),
            }
        });
        // The count of the faulting block's instructions is added before
        // the packed fields are split: a flags slow path in that block took
        // one off already (its helper counted it), which may have borrowed
        // from the lookup field.
        let packed = if self.pacing == Pacing::Counted {
            ctx.retired
                .wrapping_add(fault.map_or(0, |(_, native)| native))
        } else {
            // Nothing counted (an indirect miss is still counted).
            ctx.indirect_misses << LOOKUP_SHIFT
        };
        let lookups = packed >> LOOKUP_SHIFT;
        let retired = packed & ((1 << LOOKUP_SHIFT) - 1);
        self.stats.indirect_lookups += lookups;
        self.stats.indirect_hits += lookups - ctx.indirect_misses;
        cpu.retired += retired;
        self.stats.insns_native += retired;
        self.stats.special_calls += env.specials;
        self.stats.fast_regions += env.fast_regions;
        self.stats.insns_interpreted += env.fallbacks;
        self.demoted.append(&mut env.demote);
        if let Some(stop) = env.stop {
            self.count_exit(ExitReason::Stop);
            return Step::Stop(stop);
        }
        if polled {
            if let Some((Some(eip), _)) = fault {
                cpu.eip = eip;
            }
            self.count_exit(ExitReason::Budget);
            if self.poller.as_mut().is_some_and(|p| !p.restore()) {
                self.set_pacing(Pacing::Counted);
            }
            return Step::Executed;
        }
        if ctx.fault_rip != 0 {
            // (`buf` still borrows the engine: count directly.)
            self.stats.exits[ExitReason::Fault as usize] += 1;
            // Stopped before a faulting instruction: find it, and let the
            // interpreter execute it with the guest's semantics.
            self.stats.faults += 1;
            if let Some((Some(eip), _)) = fault {
                cpu.eip = eip;
            }
            let key = self.key;
            let in_window = ctx.fault_addr != 0 && self.in_window(cpu, ctx.fault_addr);
            let (faults, eip) = (cpu.page_faults, cpu.eip);
            let step = self.execute_one(cpu);
            // Did the fault go away for good (see `Bt::store_faults`)?
            let mut resolved = false;
            if ctx.fault_addr != 0 {
                if cpu.page_faults != faults {
                    // A #PF for the guest: its handler will return to this
                    // instruction (see `Bt::retry`).
                    self.retry = self
                        .space
                        .and_then(|i| cpu.ram.shadow(i).ok())
                        .and_then(|w| ctx.fault_addr.checked_sub(w.base() as u64))
                        .map(|lin| (eip, key, lin));
                    resolved = true;
                }
                resolved |= self.fill_shadow(cpu, ctx.fault_addr, key);
            }
            if in_window {
                self.store_fault(cpu, eip, ctx.fault_addr >> 12, resolved);
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

/// Host faults after which an instruction becomes a helper call (the
/// first time; see `Bt::hot_stores`).
pub const HOT_STORE_FAULTS: u32 = 2;

/// The units of a fault in `Bt::store_faults` (a fault on a fresh page
/// that went away for good counts one).
pub const FAULT_QUARTERS: u32 = 4;

/// At most this many (EIP, host page) pairs in `Bt::fault_pages` (about
/// a megabyte).
pub const FAULT_PAGES_KEPT: usize = 1 << 15;

/// Demotions after which the faults a promotion takes stop growing
/// (`HOT_STORE_FAULTS << 2 * MAX_DEMOTIONS` then).
pub const MAX_DEMOTIONS: u32 = 4;

impl Bt {
    /// Is host address `addr` in the window GS points at (guest memory as
    /// translated code sees it)?
    fn in_window(&self, cpu: &mut Vcpu, addr: u64) -> bool {
        let base = match self.space {
            Some(i) => cpu.ram.shadow(i).map(|w| w.base()),
            None => cpu.ram.window().map(|w| w.base()),
        };
        base.is_ok_and(|b| {
            addr.checked_sub(b as u64)
                .is_some_and(|off| off < popek_memory::WINDOW_SIZE as u64)
        })
    }

    /// The instruction at `eip` faulted on guest memory in host code:
    /// after [`HOT_STORE_FAULTS`] of those (four times more after each
    /// demotion), drop the translations that hold it so that it is
    /// translated again as a helper call (faults are counted as
    /// `Bt::store_faults` says). `host_page`: the host page the access
    /// faulted on; `resolved`: the fault went away for good.
    fn store_fault(&mut self, cpu: &Vcpu, eip: u32, host_page: u64, resolved: bool) {
        if self.hot_stores.contains_key(&eip) {
            return;
        }
        let before = self.fault_pages.insert((eip, host_page), ()).is_some();
        if self.fault_pages.len() > FAULT_PAGES_KEPT {
            // (Every page fresh again: promotions only come later.)
            self.fault_pages.clear();
        }
        let demoted = self
            .demotions
            .get(&eip)
            .copied()
            .unwrap_or(0)
            .min(MAX_DEMOTIONS);
        let n = self.store_faults.entry(eip).or_default();
        *n += if resolved && !before {
            1
        } else {
            FAULT_QUARTERS
        };
        if *n < (HOT_STORE_FAULTS * FAULT_QUARTERS) << (2 * demoted) {
            return;
        }
        *n = 0;
        self.hot_stores.insert(eip, HotStore::default());
        self.hot_pages.insert(eip >> 12);
        self.stats.hot_stores += 1;
        self.retranslate_holding(cpu, eip);
    }

    /// Hot instructions that rarely would have faulted go back to host
    /// code.
    fn demote_stores(&mut self, cpu: &Vcpu, eips: &[u32]) {
        for &eip in eips {
            *self.demotions.entry(eip).or_default() += 1;
            self.stats.hot_stores_demoted += 1;
            self.retranslate_holding(cpu, eip);
        }
    }

    /// Drop the translations holding the instruction at `eip`, to be
    /// translated again.
    fn retranslate_holding(&mut self, cpu: &Vcpu, eip: u32) {
        let holds = |t: &Translation, buf: Option<&CodeBuffer>| t.holds_insn(buf, eip);
        // The translations of the physical page the current mapping puts
        // `eip` on (the whole cache if neither the instruction TLB nor the
        // guest's tables know).
        let Some(keys) = self
            .current_phys(eip >> 12)
            .or_else(|| cpu.debug_phys(eip).map(|p| p >> 12))
            .map(|p| self.by_page.get(&p).cloned().unwrap_or_default())
        else {
            self.drop_where(holds);
            return;
        };
        for k in keys {
            if self
                .cache
                .peek(&k)
                .is_some_and(|t| holds(t, self.code.as_ref()))
            {
                if let Some(e) = self.cache.pop(&k) {
                    self.unlink(k, e);
                }
            }
        }
    }

    /// Drain the write watch, the one place recorded writes are acted on:
    /// drop the translations of written code pages, then follow the
    /// paging mode (a page-table write resets the shadow).
    pub(crate) fn drain_writes(&mut self, cpu: &mut Vcpu) {
        if !self.demoted.is_empty() {
            let d = std::mem::take(&mut self.demoted);
            self.demote_stores(cpu, &d);
        }
        let written = self.watch.drain(&mut cpu.ram);
        self.stats.code_writes_hit += written.code.len() as u64;
        self.stats.code_writes_missed += written.code_missed;
        self.invalidate(&written.code);
        self.sync_paging(cpu, &written.tables);
    }
}

/// A set of 4 KiB pages of the 4 GiB linear space: one bit each, the
/// 128 KiB of bits allocated with the first page (a lookup reads one
/// word: a translation asks once, and in a run the word is seldom in the
/// cache).
#[derive(Debug, Default)]
pub(crate) struct PageSet(Vec<u64>);

impl PageSet {
    /// Add `page` (a linear address >> 12).
    pub(crate) fn insert(&mut self, page: u32) {
        if self.0.is_empty() {
            self.0 = vec![0; 1 << 14];
        }
        self.0[(page as usize >> 6) & ((1 << 14) - 1)] |= 1 << (page & 63);
    }

    /// Is `page` in the set?
    pub(crate) fn contains(&self, page: u32) -> bool {
        self.0
            .get(page as usize >> 6)
            .is_some_and(|w| w & 1 << (page & 63) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> (Bt, Vcpu) {
        (
            Bt::new(None),
            Vcpu::new(GuestRam::new(1 << 20).expect("guest RAM")),
        )
    }

    /// An instruction that faults on one fresh page after another, each
    /// fault going away (the shadow mapped the page), stays host code for
    /// eight faults; faults that do not go away, or on a page it faulted
    /// on before, make it a helper call after two or three.
    #[test]
    fn fresh_page_faults_weigh_a_quarter() {
        let (mut bt, cpu) = engine();
        let eip = 0x1000;
        for page in 0..7 {
            bt.store_fault(&cpu, eip, 0x7000 + page, true);
        }
        assert!(!bt.hot_stores.contains_key(&eip));
        bt.store_fault(&cpu, eip, 0x7007, true);
        assert!(bt.hot_stores.contains_key(&eip), "the eighth fresh page");

        // A store to a watched page faults every time.
        let eip = 0x2000;
        bt.store_fault(&cpu, eip, 0x7000, false);
        assert!(!bt.hot_stores.contains_key(&eip));
        bt.store_fault(&cpu, eip, 0x7000, false);
        assert!(bt.hot_stores.contains_key(&eip), "two unresolved faults");

        // A mapping that comes and goes (a kmap-style window): the first
        // fault on the page is fresh, the next two are not.
        let eip = 0x3000;
        bt.store_fault(&cpu, eip, 0x9000, true);
        bt.store_fault(&cpu, eip, 0x9000, true);
        assert!(!bt.hot_stores.contains_key(&eip));
        bt.store_fault(&cpu, eip, 0x9000, true);
        assert!(bt.hot_stores.contains_key(&eip), "the same page again");
    }

    /// Once the shadow spaces change, a page faulted on before is fresh
    /// again (another process's memory at the same host address).
    #[test]
    fn pages_are_fresh_again_after_the_spaces_change() {
        let (mut bt, mut cpu) = engine();
        let eip = 0x4000;
        bt.store_fault(&cpu, eip, 0x9000, true);
        bt.store_fault(&cpu, eip, 0x9000, true);
        bt.drop_spaces(&mut cpu);
        bt.store_fault(&cpu, eip, 0x9000, true);
        assert!(
            !bt.hot_stores.contains_key(&eip),
            "1 + 4 + 1 quarters: not yet"
        );
    }
}
