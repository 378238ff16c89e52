//! The translator's counters, and the single list both `--stats` and
//! `--stats-json` are made from ([`Stats::counters`]).

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use crate::cache::EipHasher;

/// Counters of the engine.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Blocks translated (including interpret-only markers).
    pub blocks_translated: u64,
    /// The guest basic blocks those translations cover: one per
    /// translation, and in a superblock one more after each conditional
    /// branch it went on past and at each jump it followed (what a
    /// translator of basic blocks, such as QEMU's, or VMware's
    /// translation units, would have translated one by one).
    pub basic_blocks_translated: u64,
    /// Guest instructions translated into host code.
    pub insns_translated: u64,
    /// Of those, instructions the fast scanner took (`popek_decode::fast`:
    /// copied without a decode).
    pub insns_fast: u64,
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
    /// Translations dropped because their code was written.
    pub invalidations: u64,
    /// Writes to code pages that overlapped translated code.
    pub code_writes_hit: u64,
    /// Writes to code pages that only shared the page with translated
    /// code (and invalidated nothing).
    pub code_writes_missed: u64,
    /// Page-table writes that remapped translated code (cross-page links
    /// and indirect lookups into its regions were cut; translations stay,
    /// keyed by physical page).
    pub mapping_invalidations: u64,
    /// Time spent scanning and translating blocks, in nanoseconds.
    pub translate_ns: u64,
    /// Translations evicted by the cache bound (`--cache-blocks`).
    pub evictions: u64,
    /// Times every translation was dropped (the code buffer filled).
    pub flushes: u64,
    /// Pages mapped into a shadow window (guest linear memory) after a
    /// host fault: the hidden page faults, which the guest never sees.
    pub shadow_maps: u64,
    /// Pages those fills mapped (a fill maps the run of pages around the
    /// one touched that the guest's tables map alike and already marked
    /// accessed).
    pub shadow_pages: u64,
    /// Stores made helper calls because they kept writing watched pages
    /// (adaptive binary translation).
    pub hot_stores: u64,
    /// Of those, the ones that then rarely wrote watched pages and went
    /// back to host code.
    pub hot_stores_demoted: u64,
    /// 64-byte regions of code pages opened to checked stores (hot stores
    /// that then store there in host code: see `Piece::Checked`).
    pub fast_regions: u64,
    /// Shadow address spaces created (a paging mode met for the first
    /// time, or again after eviction).
    pub spaces_created: u64,
    /// Switches back to a shadow address space kept from before.
    pub spaces_reused: u64,
    /// Switches to another linear-to-physical mapping (a CR3 load, paging
    /// switched on or off).
    pub mapping_switches: u64,
    /// Cross-page chained jumps cut by those switches.
    pub links_cut: u64,
    /// 4 MiB regions whose direct exits go through the indirect-branch
    /// table (their links were cut too often).
    pub volatile_regions: u64,
    /// Instruction-TLB fills (a walk of the guest tables for a code page).
    pub itlb_fills: u64,
    /// Writes to page-table pages the shadow or translations came from.
    pub table_writes: u64,
    /// Shadow pages unmapped because a page table they came from changed.
    pub shadow_unmaps: u64,
    /// Shadows moved from host address 0 because the guest used a page
    /// below that window's floor (see `GuestRam::shadow_leave_low`).
    pub shadow_moves: u64,
    /// Page tables no longer shadowed because the guest kept writing them
    /// while nothing was derived from them anew (a write flood: a table
    /// freed and reused as data, or rewritten wholesale).
    pub tables_unshadowed: u64,
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

    /// The reason's short name, its key in `--stats-json` and its label
    /// in `--stats`.
    fn names(self) -> (&'static str, &'static str, &'static str) {
        match self {
            ExitReason::Unchained => (
                "unchained",
                "exits_unchained",
                "dispatcher exits: unchained",
            ),
            ExitReason::Budget => ("budget", "exits_budget", "dispatcher exits: budget"),
            ExitReason::Helper => ("helper", "exits_helper", "dispatcher exits: helper"),
            ExitReason::Fault => ("fault", "exits_fault", "dispatcher exits: fault"),
            ExitReason::Stop => ("stop", "exits_stop", "dispatcher exits: stop"),
            ExitReason::Interpreted => (
                "interpreted",
                "exits_interpreted",
                "dispatcher exits: interpreted",
            ),
        }
    }

    /// A short name for statistics.
    pub fn name(self) -> &'static str {
        self.names().0
    }

    /// The reason's key in `--stats-json`.
    pub fn json_key(self) -> &'static str {
        self.names().1
    }

    /// The reason's label in `--stats`.
    pub fn label(self) -> &'static str {
        self.names().2
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

/// One counter of [`Stats::counters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    /// The key in `--stats-json`.
    pub key: &'static str,
    /// The label in `--stats`.
    pub label: &'static str,
    /// The value.
    pub value: u64,
}

impl Stats {
    /// Every counter, in the order `--stats` prints them, with the key
    /// `--stats-json` uses: the one list both outputs are made from.
    pub fn counters(&self) -> Vec<Counter> {
        let c = |key, label, value| Counter { key, label, value };
        let mut v = vec![
            c(
                "blocks_translated",
                "blocks translated",
                self.blocks_translated,
            ),
            c(
                "basic_blocks_translated",
                "guest basic blocks they cover",
                self.basic_blocks_translated,
            ),
            c(
                "guest_instructions_translated",
                "guest instructions translated",
                self.insns_translated,
            ),
            c(
                "guest_instructions_fast_scanned",
                "of those, fast-scanned",
                self.insns_fast,
            ),
            c("host_bytes", "host bytes emitted", self.host_bytes),
            c("cache_lookups", "cache lookups", self.lookups),
            c("cache_hits", "cache hits", self.hits),
            c("chained_transfers", "chained block transfers", self.chained),
            c(
                "indirect_lookups",
                "indirect lookups",
                self.indirect_lookups,
            ),
            c("indirect_hits", "indirect hits", self.indirect_hits),
            c(
                "special_calls",
                "special-instruction calls",
                self.special_calls,
            ),
            c(
                "instructions_native",
                "executed as host code",
                self.insns_native,
            ),
            c(
                "interpreter_fallbacks",
                "interpreter fallbacks",
                self.insns_interpreted,
            ),
            c(
                "translation_ns",
                "nanoseconds translating",
                self.translate_ns,
            ),
            c(
                "faults_in_translated_code",
                "faults in translated code",
                self.faults,
            ),
            c(
                "cache_invalidations",
                "invalidations (code written)",
                self.invalidations,
            ),
            c(
                "code_writes_hit",
                "writes to code pages: hit code",
                self.code_writes_hit,
            ),
            c(
                "code_writes_missed",
                "writes to code pages: beside code",
                self.code_writes_missed,
            ),
            c(
                "mapping_invalidations",
                "code remapped (links and lookups cut)",
                self.mapping_invalidations,
            ),
            c("cache_evictions", "evictions", self.evictions),
            c("code_buffer_flushes", "code buffer flushes", self.flushes),
            c(
                "shadow_pages_mapped",
                "hidden page faults (shadow pages mapped)",
                self.shadow_maps,
            ),
            c(
                "shadow_pages_filled",
                "shadow pages filled by them",
                self.shadow_pages,
            ),
            c("page_table_writes", "page-table writes", self.table_writes),
            c(
                "shadow_pages_unmapped",
                "shadow pages unmapped",
                self.shadow_unmaps,
            ),
            c(
                "shadow_moves",
                "shadows moved from host address 0",
                self.shadow_moves,
            ),
            c(
                "tables_unshadowed",
                "page tables unshadowed (write floods)",
                self.tables_unshadowed,
            ),
            c(
                "shadow_spaces_created",
                "shadow address spaces created",
                self.spaces_created,
            ),
            c(
                "shadow_spaces_reused",
                "shadow address spaces reused",
                self.spaces_reused,
            ),
            c(
                "mapping_switches",
                "address-space switches",
                self.mapping_switches,
            ),
            c("links_cut", "cross-page links cut", self.links_cut),
            c(
                "volatile_regions",
                "regions jumped into through the table",
                self.volatile_regions,
            ),
            c(
                "hot_stores",
                "accesses made helper calls (adaptive)",
                self.hot_stores,
            ),
            c(
                "hot_stores_demoted",
                "of those, back to host code",
                self.hot_stores_demoted,
            ),
            c(
                "fast_regions",
                "regions opened to checked stores",
                self.fast_regions,
            ),
            c("itlb_fills", "instruction-TLB fills", self.itlb_fills),
        ];
        for (r, n) in ExitReason::ALL.iter().zip(self.exits) {
            v.push(c(r.json_key(), r.label(), n));
        }
        v
    }
}
