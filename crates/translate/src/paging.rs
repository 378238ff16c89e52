//! The guest's addressing mode as translations depend on it: shadow
//! address spaces, the instruction TLB, the FS/GS bases translated code
//! may add, and whether translated code can run at all ([`translatable`]).
//!
//! ```text
//!   guest page tables (in guest RAM, watched)        shadow address spaces (host mappings)
//!   CR3=A ─▶ PD ─▶ PT ─▶ frames        ──fill on fault──▶  space (A, supervisor): window 0  ◀─ GS
//!   CR3=B ─▶ PD ─▶ PT ─▶ frames                            space (A, user):       window 1
//!           │                                              space (B, supervisor): window 2
//!           └─ a write to an entry ──▶ unmap exactly the linear pages that entry mapped,
//!                                      in every space derived from it (TLB semantics)
//! ```
//!
//! With paging off, GS points at the physical window and a translation's
//! key has the linear page as its physical page. With paging on, each
//! [`PagingMode`] (page directory, CR0.WP, CR4.PSE, user or supervisor)
//! has a shadow address space of its own ([`Space`]): a shadow window
//! filled on demand ([`Bt::fill_shadow`]: the *hidden* page faults the
//! guest never sees), the page-table entries each shadow page and each
//! code page was derived from, and an instruction TLB (linear code page to
//! physical page) through which the dispatcher keys its lookups. Up to
//! [`MAX_SPACES`] spaces are kept, least recently used out; a CR3 load or
//! a change of privilege switches spaces and drops nothing (the
//! cross-page links are cut, see [`crate::chain`]).
//!
//! A write to a page-table page (from the write watch, with the byte range
//! written) affects only the entries written: the shadow pages derived
//! from those entries are unmapped, their instruction-TLB entries dropped,
//! and the translations of code they mapped dropped, in every space.
//! INVLPG then has nothing left to drop: the shadow follows the guest's
//! tables more strictly than a TLB must.

use popek_vcpu::{cr0, cr4, flags, SegReg, Vcpu};

use crate::cache::{make_key, FastMap, Key};
use crate::dispatch::Bt;
use crate::lower::SegBases;

/// Shadow address spaces kept at most (each a 4 GiB host reservation of
/// address space; only the pages mapped in it cost host memory).
pub const MAX_SPACES: usize = 256;

/// A set of shadow address spaces (bit i: space i).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SpaceSet([u64; MAX_SPACES / 64]);

impl SpaceSet {
    fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    fn remove(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    fn union(&mut self, other: &SpaceSet) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a |= b;
        }
    }

    /// The spaces in the set, lowest first.
    fn iter(self) -> impl Iterator<Item = usize> {
        self.0.into_iter().enumerate().flat_map(|(w, bits)| {
            let mut b = bits;
            std::iter::from_fn(move || {
                (b != 0).then(|| {
                    let i = b.trailing_zeros() as usize;
                    b &= b - 1;
                    w * 64 + i
                })
            })
        })
    }
}

/// Writes (drains that found one) to a page table with no shadow mapping
/// derived from it in between, after which it is no longer shadowed: its
/// mappings go from every space and it is unwatched, so that further
/// writes cost nothing until something is derived from it again (a write
/// flood, as KVM calls it: a freed table reused as data, a table rewritten
/// wholesale, a clock clearing accessed bits that only helpers read).
pub const FLOOD_WRITES: u32 = 32;

/// The paging mode translations of linear addresses and a shadow window
/// are valid for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagingMode {
    /// CR3: the page directory.
    pub cr3: u32,
    /// CR0.WP: supervisor writes honour read-only pages.
    pub wp: bool,
    /// CR4.PSE: 4 MiB pages.
    pub pse: bool,
    /// CPL 3: accesses are user accesses.
    pub user: bool,
}

impl PagingMode {
    /// The same linear-to-physical mapping (whatever the privilege)?
    fn same_mapping(&self, other: &PagingMode) -> bool {
        self.cr3 == other.cr3 && self.pse == other.pse
    }
}

/// What the entry of page table `t` for linear page `l` (just written)
/// still grants of what shadow `space` (of paging mode `mode`) maps the
/// page with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    /// Everything: the same physical page, present and accessed, user if
    /// the space is, and for a writable mapping writable and dirty (the
    /// same value written again, a bit set): nothing to do.
    All,
    /// A writable mapping that may now only be read (the write right or
    /// the dirty bit taken away, as for copy-on-write).
    Read,
    /// Less: the page goes (or is revoked). Also for a page only in the
    /// instruction TLB.
    Less,
}

fn grant(cpu: &Vcpu, space: usize, mode: PagingMode, t: u32, l: u32) -> Grant {
    let Some((phys, access)) = cpu.ram.shadow_entry(space, l) else {
        return Grant::Less;
    };
    let pte = cpu.ram.read((t << 12) | ((l & 0x3FF) << 2), 4) as u32;
    let read = 0x21 | if mode.user { 0x04 } else { 0 };
    let write = 0x40 | if mode.user || mode.wp { 0x02 } else { 0 };
    if pte >> 12 != phys || pte & read != read {
        return Grant::Less;
    }
    match access {
        popek_memory::Access::Revoked => Grant::Less,
        popek_memory::Access::Read => Grant::All,
        popek_memory::Access::Write if pte & write == write => Grant::All,
        popek_memory::Access::Write => Grant::Read,
    }
}

/// A copy of the page directory at `cr3` (None if it is not in RAM).
fn directory(cpu: &Vcpu, cr3: u32) -> Option<(u32, Box<[u32; 1024]>)> {
    let at = (cr3 & !0xFFF) as usize;
    let bytes = cpu.ram.as_slice().get(at..at + 4096)?;
    let mut d = Box::new([0u32; 1024]);
    for (e, b) in d.iter_mut().zip(bytes.chunks_exact(4)) {
        *e = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    Some((cr3 >> 12, d))
}

/// The regions whose page-directory entries differ between directories
/// `a` and `b` (all of them if either is not in RAM).
fn directory_diff(cpu: &Vcpu, a: u32, b: u32) -> Regions {
    let ram = cpu.ram.as_slice();
    let dir = |cr3: u32| {
        let at = (cr3 & !0xFFF) as usize;
        ram.get(at..at + 4096)
    };
    let (Some(x), Some(y)) = (dir(a), dir(b)) else {
        return Regions::ALL;
    };
    let entry = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let mut r = Regions::NONE;
    for (i, (p, q)) in x.chunks_exact(4).zip(y.chunks_exact(4)).enumerate() {
        // (Accessed and dirty bits change no mapping.)
        if (entry(p) ^ entry(q)) & !0x60 != 0 {
            r.add(i as u32);
        }
    }
    r
}

/// A set of 4 MiB regions of the linear address space (page-directory
/// entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Regions([u64; 16]);

impl Regions {
    /// No region.
    pub(crate) const NONE: Regions = Regions([0; 16]);
    /// Every region.
    pub(crate) const ALL: Regions = Regions([u64::MAX; 16]);

    /// Add region `r` (0..1024).
    pub(crate) fn add(&mut self, r: u32) {
        self.0[(r / 64) as usize & 15] |= 1 << (r % 64);
    }

    /// Is region `r` in the set?
    pub(crate) fn has(&self, r: u32) -> bool {
        self.0[(r / 64) as usize & 15] & 1 << (r % 64) != 0
    }

    /// Do the sets share a region?
    pub(crate) fn meets(&self, other: &Regions) -> bool {
        self.0.iter().zip(other.0).any(|(a, b)| a & b != 0)
    }

    /// Is the set empty?
    pub(crate) fn is_empty(&self) -> bool {
        // (Folded: a comparison with an array is a memcmp call.)
        self.0.iter().fold(0, |a, w| a | w) == 0
    }

    /// Does the set hold every region?
    pub(crate) fn is_all(&self) -> bool {
        self.0.iter().fold(u64::MAX, |a, w| a & w) == u64::MAX
    }
}

/// Where linear code pages map, for [`Bt::itlbs_now`].
pub(crate) enum PhysOf<'a> {
    /// Paging is off.
    Identity,
    /// As this instruction TLB holds them.
    Tlb(&'a FastMap<u32, u32>),
    /// Nothing is known.
    Unknown,
}

impl PhysOf<'_> {
    /// The physical page of linear page `lin`, if known.
    pub(crate) fn get(&self, lin: u32) -> Option<u32> {
        match self {
            PhysOf::Identity => Some(lin),
            PhysOf::Tlb(t) => t.get(&lin).copied(),
            PhysOf::Unknown => None,
        }
    }
}

/// The paging mode, None with paging off.
pub type PagingKey = Option<PagingMode>;

/// The CPU's paging mode now.
pub fn paging_key(cpu: &Vcpu) -> PagingKey {
    (cpu.cr0 & cr0::PG != 0).then(|| PagingMode {
        cr3: cpu.cr3,
        wp: cpu.cr0 & cr0::WP != 0,
        pse: cpu.cr4 & cr4::PSE != 0,
        user: cpu.cpl() == 3,
    })
}

/// A shadow address space.
#[derive(Debug)]
pub(crate) struct Space {
    pub(crate) mode: PagingMode,
    /// When it was last switched to (a counter).
    last_used: u64,
    /// One bit per page-directory entry (4 MiB region) something in this
    /// space was derived from: a write to that entry unmaps the region.
    regions: [u64; 16],
    /// For each watched page table, the linear pages derived from its
    /// entries in this space (shadow mappings and code pages), in
    /// increasing order (a table's list holds up to 1,024 pages per
    /// directory entry using it: looked up by halves).
    deps: FastMap<u32, Vec<u32>>,
    /// The pages adaptive helper calls reached that the shadow does not
    /// grant, as host code would have mapped them (see
    /// `helper::shadow_lag`).
    pub(crate) virt: FastMap<u32, crate::helper::VirtMap>,
    /// The instruction TLB: linear code page to physical page, for the
    /// pages translations were made from or entered on in this space.
    itlb: FastMap<u32, u32>,
}

impl Space {
    /// A space for `mode` with nothing derived in it yet.
    fn empty(mode: PagingMode, last_used: u64) -> Space {
        Space {
            mode,
            last_used,
            regions: [0; 16],
            deps: FastMap::default(),
            virt: FastMap::default(),
            itlb: FastMap::default(),
        }
    }
}

/// FS's and GS's bases where translated code may use them.
pub fn seg_bases(cpu: &Vcpu) -> SegBases {
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

/// Can translated code run in this mode? CS, DS, ES and SS flat (base 0,
/// limit 4 GiB), 32-bit code, no single-stepping. Paging may be on: then
/// guest memory is reached through the shadow window.
pub fn translatable(cpu: &Vcpu) -> bool {
    cpu.eflags & flags::TF == 0
        && [SegReg::Cs, SegReg::Ds, SegReg::Es, SegReg::Ss]
            .iter()
            .all(|s| {
                let seg = cpu.seg(*s);
                seg.usable() && seg.base == 0 && seg.limit == u32::MAX
            })
        && cpu.code32()
}

impl Bt {
    /// Follow the guest's addressing mode: act on page-table writes
    /// (`tables`, from the write watch) and switch shadow address spaces
    /// when the paging mode changed.
    pub(crate) fn sync_paging(&mut self, cpu: &mut Vcpu, tables: &[(u32, u16, u16)]) {
        if !tables.is_empty() {
            self.table_writes(cpu, tables);
        }
        let key = paging_key(cpu);
        if key != self.key {
            // The regions where the mapping changes: those whose directory
            // entries differ (an equal entry maps its 4 MiB alike: the same
            // page table or the same large page).
            let same = match (key, self.key) {
                (Some(a), Some(b)) => a.same_mapping(&b),
                (None, None) => true,
                _ => false,
            };
            let mut changed = match (key, self.key) {
                _ if same => Regions::NONE,
                (Some(a), Some(b)) if a.pse == b.pse => directory_diff(cpu, a.cr3, b.cr3),
                _ => Regions::ALL,
            };
            self.space = key.map(|m| self.space_for(cpu, m));
            self.key = key;
            if !same {
                self.stats.mapping_switches += 1;
                self.dir_now = key.and_then(|k| directory(cpu, k.cr3));
                // Kept links rely on the new directory's writes being seen.
                if let Some((d, _)) = &self.dir_now {
                    if !self.watch.watch_table(&mut cpu.ram, *d) {
                        self.dir_now = None;
                        changed = Regions::ALL;
                    }
                }
                // (The old directory stays watched: switching back to it
                // is common, and watching it again would cost an mprotect
                // each time; a write flood unwatches it if it becomes
                // data.)
            }
            if !changed.is_empty() {
                // What was chained or published into those regions was
                // checked against the old mapping (links into pages the
                // new one maps alike stay).
                self.cut_cross_links_in(&changed, &Bt::mapped_alike_now);
                self.clear_lookups_in(&changed);
            }
        }
    }

    /// The shadow address space for `mode`: an existing one, a new one, or
    /// the least recently used one emptied.
    fn space_for(&mut self, cpu: &mut Vcpu, mode: PagingMode) -> usize {
        self.tick += 1;
        let found = self
            .spaces_of_table(mode.cr3 >> 12)
            .find(|&i| self.spaces[i].mode == mode);
        if let Some(i) = found {
            self.spaces[i].last_used = self.tick;
            self.stats.spaces_reused += 1;
            return i;
        }
        self.stats.spaces_created += 1;
        let fresh = Space::empty(mode, self.tick);
        if self.spaces.len() < MAX_SPACES {
            self.spaces.push(fresh);
            let i = self.spaces.len() - 1;
            self.note_table(mode.cr3 >> 12, i);
            return i;
        }
        let i = (0..self.spaces.len())
            .min_by_key(|&i| self.spaces[i].last_used)
            .expect("MAX_SPACES > 0");
        self.empty_space(cpu, i, fresh);
        i
    }

    /// Page table `t` was written or unshadowed (see `Bt::table_epoch`).
    fn bump_epoch(&mut self, t: u32) {
        let e = self.table_epoch.entry(t).or_default();
        *e = e.wrapping_add(1);
    }

    /// The spaces derived from page directory or page table `t`.
    fn spaces_of_table(&self, t: u32) -> impl Iterator<Item = usize> {
        self.table_spaces
            .get(&t)
            .copied()
            .unwrap_or_default()
            .iter()
    }

    /// Space `i` is derived from table `t`.
    fn note_table(&mut self, t: u32, i: usize) {
        self.table_spaces.entry(t).or_default().insert(i);
    }

    /// Space `i` is no longer derived from table `t`.
    fn unnote_table(&mut self, t: u32, i: usize) {
        if let Some(set) = self.table_spaces.get_mut(&t) {
            set.remove(i);
            if set.is_empty() {
                self.table_spaces.remove(&t);
            }
        }
    }

    /// Replace space `i` with `fresh`, dropping everything derived in it.
    fn empty_space(&mut self, cpu: &mut Vcpu, i: usize, fresh: Space) {
        self.fault_pages.clear();
        let new_dir = fresh.mode.cr3 >> 12;
        let old = std::mem::replace(&mut self.spaces[i], fresh);
        for t in old.deps.keys().copied().chain([old.mode.cr3 >> 12]) {
            self.unnote_table(t, i);
        }
        self.note_table(new_dir, i);
        // Its code pages' translations stay: they are keyed by physical
        // page and entered only through another space's TLB. A link or
        // lookup into a page its TLB held may have had no other voucher
        // (a space whose tables are watched and would see the page
        // remapped): those go, unless another space holds the page alike
        // through the same directory entry as the current mapping.
        let mut held = Regions::NONE;
        for &l in old.itlb.keys() {
            held.add(l >> 10);
        }
        if !held.is_empty() {
            let cpu_now: &Vcpu = cpu;
            self.cut_cross_links_in(&held, &|bt: &Bt, to: Key| bt.vouched(cpu_now, to));
            self.clear_lookups_in(&held);
        }
        for t in old.deps.into_keys().chain([old.mode.cr3 >> 12]) {
            self.release_table(cpu, t);
        }
        if cpu.ram.shadow_reset(i).is_err() {
            self.shadow_broken = true;
        }
    }

    /// Stop shadowing page table `t` after a write flood: unmap what every
    /// space derived from it (a space whose directory it is, unless that
    /// is the current directory, is emptied), and unwatch it. False when
    /// it stays (the current directory: kept links rely on its watch).
    fn unshadow_table(&mut self, cpu: &mut Vcpu, t: u32) -> bool {
        if self.dir_now.as_ref().is_some_and(|d| d.0 == t) {
            return false;
        }
        let mut stale = Regions::NONE;
        let users: Vec<usize> = self.spaces_of_table(t).collect();
        for i in users {
            if self.spaces[i].mode.cr3 >> 12 == t {
                let fresh = Space::empty(self.spaces[i].mode, self.spaces[i].last_used);
                self.empty_space(cpu, i, fresh);
                continue;
            }
            let Some(lins) = self.spaces[i].deps.remove(&t) else {
                continue;
            };
            self.unnote_table(t, i);
            self.spaces[i].itlb.retain(|l, _| {
                let hit = lins.binary_search(l).is_ok();
                if hit {
                    stale.add(l >> 10);
                }
                !hit
            });
            let mut k = 0;
            while k < lins.len() {
                let mut n = 1;
                while k + n < lins.len() && lins[k + n] == lins[k] + n as u32 {
                    n += 1;
                }
                if cpu.ram.shadow_unmap(i, lins[k], n as u32).is_err() {
                    self.drop_spaces(cpu);
                    return true;
                }
                self.stats.shadow_unmaps += n as u64;
                k += n;
            }
        }
        self.stats.tables_unshadowed += 1;
        self.bump_epoch(t);
        self.release_table(cpu, t);
        if !stale.is_empty() {
            self.stats.mapping_invalidations += 1;
            self.cut_cross_links_in(&stale, &Bt::mapped_alike_now);
            self.clear_lookups_in(&stale);
        }
        true
    }

    /// Stop watching table `t` if no space depends on it any more.
    fn release_table(&mut self, cpu: &mut Vcpu, t: u32) {
        // (The current directory stays watched: kept links rely on it.)
        let used = self.dir_now.as_ref().is_some_and(|d| d.0 == t)
            || self.spaces_of_table(t).any(|i| {
                let s = &self.spaces[i];
                s.deps.contains_key(&t)
                    || (s.mode.cr3 >> 12 == t && s.regions.iter().any(|&r| r != 0))
            });
        if !used {
            self.watch.forget_table(&mut cpu.ram, t);
        }
    }

    /// Page-table entries were written: in every space, unmap the shadow
    /// pages derived from them and drop their instruction-TLB entries; if
    /// code was remapped, cut the links and lookups into its regions that
    /// the current mapping does not still vouch for.
    fn table_writes(&mut self, cpu: &mut Vcpu, tables: &[(u32, u16, u16)]) {
        let mut stale = Regions::NONE;
        self.stats.table_writes += tables.len() as u64;
        for &(t, _, _) in tables {
            self.bump_epoch(t);
        }
        // The current directory's entries that changed: links into their
        // regions go, even where no space walked (one made under another
        // space whose entry was equal may have been kept: see
        // `sync_paging`). Other directories are compared at the switch.
        if let Some((d, entries)) = self.dir_now.as_mut() {
            for &(t, lo, hi) in tables.iter().filter(|w| w.0 == *d) {
                for r in u32::from(lo) / 4..=((u32::from(hi).max(1) - 1) / 4).min(1023) {
                    let now = cpu.ram.read((t << 12) | (r << 2), 4) as u32;
                    let was = std::mem::replace(&mut entries[r as usize], now);
                    // (Accessed and dirty bits change no mapping.)
                    if was & 1 != 0 && (was ^ now) & !0x60 != 0 {
                        stale.add(r);
                    }
                }
            }
        }
        let mut users = SpaceSet::default();
        for &(t, _, _) in tables {
            if let Some(set) = self.table_spaces.get(&t) {
                users.union(set);
            }
        }
        let mut released = Vec::new();
        for i in users.iter() {
            // Runs of linear pages to unmap: (first, count).
            let mut runs: Vec<(u32, u32)> = Vec::new();
            // Page-table entries written: (table, linear page).
            let mut hits: Vec<(u32, u32)> = Vec::new();
            // Pages that may now only be read (their mapping stays).
            let mut read_only: Vec<u32> = Vec::new();
            // Pages whose entries were written: checked stores to them go
            // to the helper until it finds them writable again.
            let mut written: Vec<u32> = Vec::new();
            let space = &mut self.spaces[i];
            let dir = space.mode.cr3 >> 12;
            for &(t, lo, hi) in tables {
                let (first, last) = (u32::from(lo) / 4, (u32::from(hi).max(1) - 1) / 4);
                if t == dir {
                    // Directory entries: their whole 4 MiB regions.
                    for r in first..=last.min(1023) {
                        let (w, b) = ((r / 64) as usize, r % 64);
                        if space.regions[w] & 1 << b != 0 {
                            space.regions[w] &= !(1 << b);
                            runs.push((r << 10, 1024));
                        }
                    }
                }
                let Some(deps) = space.deps.get_mut(&t) else {
                    continue;
                };
                let mode = space.mode;
                deps.retain(|&l| {
                    if !(first..=last).contains(&(l & 0x3FF)) {
                        return true;
                    }
                    written.push(l);
                    match grant(cpu, i, mode, t, l) {
                        Grant::All => true,
                        Grant::Read => {
                            read_only.push(l);
                            true
                        }
                        Grant::Less => {
                            hits.push((t, l));
                            false
                        }
                    }
                });
                if deps.is_empty() {
                    space.deps.remove(&t);
                    released.push((t, i));
                }
            }
            // An entry that still maps the same physical page (an accessed
            // or dirty bit cleared, rights changed) only revokes the page,
            // which its next access maps again with one mprotect.
            let mut revoked = Vec::new();
            for (t, l) in hits {
                let pte = cpu.ram.read((t << 12) | ((l & 0x3FF) << 2), 4) as u32;
                let same = pte & 1 != 0
                    && cpu
                        .ram
                        .shadow_entry(i, l)
                        .is_some_and(|(p, _)| p == pte >> 12);
                match same.then(|| cpu.ram.shadow_revoke(i, l)) {
                    Some(Ok(true)) => revoked.push(l),
                    _ => runs.push((l, 1)),
                }
            }
            for l in written {
                cpu.ram.shadow_clear_delta(i, l);
            }
            for l in read_only {
                if !cpu.ram.shadow_reprotect(i, l, false) {
                    // (The host refused: unmap it.)
                    runs.push((l, 1));
                }
            }
            self.stats.shadow_unmaps += revoked.len() as u64;
            if runs.is_empty() && revoked.is_empty() {
                continue;
            }
            runs.sort_unstable();
            // Merge overlapping and adjacent runs: one host call each.
            let mut merged: Vec<(u32, u32)> = Vec::new();
            for (f, n) in runs {
                match merged.last_mut() {
                    Some((mf, mn)) if f <= *mf + *mn => *mn = (*mn).max(f + n - *mf),
                    _ => merged.push((f, n)),
                }
            }
            // What was revoked or unmapped leaves the instruction TLB, and
            // the code it mapped is stale.
            // In any space, not only the current one: a link made under
            // one space stays valid under another whose directory maps the
            // region alike (see `sync_paging`), and its target may be in
            // the instruction TLB of the first alone.
            self.spaces[i].itlb.retain(|&l, _| {
                let hit =
                    revoked.contains(&l) || merged.iter().any(|&(f, n)| (f..f + n).contains(&l));
                if hit {
                    stale.add(l >> 10);
                }
                !hit
            });
            for (f, n) in merged {
                if cpu.ram.shadow_unmap(i, f, n).is_err() {
                    // The host would not unmap it: start over from nothing.
                    self.drop_spaces(cpu);
                    return;
                }
                self.stats.shadow_unmaps += u64::from(n);
            }
        }
        for (t, i) in released {
            // (A space stays derived from its own directory.)
            if self.spaces[i].mode.cr3 >> 12 != t {
                self.unnote_table(t, i);
            }
        }
        // (Tables nothing is derived from any more stay watched: the next
        // walk through them, as when a kernel changes an entry and touches
        // the page again as kmap does, would watch them anew, an mprotect
        // each way per write. A table that becomes data is unwatched by
        // the write-flood rule below.)
        // Tables written again and again with nothing derived from them in
        // between stop being shadowed.
        for &(t, _, _) in tables {
            if !self.watch.is_table(t) {
                self.flood.remove(&t);
                continue;
            }
            let n = self.flood.entry(t).or_default();
            *n += 1;
            if *n >= FLOOD_WRITES && self.unshadow_table(cpu, t) {
                self.flood.remove(&t);
            }
        }
        // Translations stay: they are keyed by physical page and entered
        // through the instruction TLB, which has just lost the stale pages
        // (a process that maps the same code again finds them). What was
        // chained or published across pages into those regions was checked
        // against the old entries: it goes, unless the current mapping
        // still maps its target alike.
        if !stale.is_empty() {
            self.stats.mapping_invalidations += 1;
            self.cut_cross_links_in(&stale, &Bt::mapped_alike_now);
            self.clear_lookups_in(&stale);
        }
    }

    /// Record what the walk for linear pages `first..first + count` used
    /// (`tables` as [`popek_vcpu::mmu::Probe`] gives them: the directory,
    /// and the page table unless it is a 4 MiB page), in the current
    /// space. False when a table cannot be watched (then nothing may be
    /// derived from it).
    pub(crate) fn depend_on_walk(
        &mut self,
        cpu: &mut Vcpu,
        tables: [Option<u32>; 2],
        first: u32,
        count: u32,
    ) -> bool {
        let Some(i) = self.space else {
            return true;
        };
        for t in tables.into_iter().flatten() {
            if !self.watch.watch_table(&mut cpu.ram, t) {
                return false;
            }
            if !self.flood.is_empty() {
                self.flood.remove(&t);
            }
        }
        let space = &mut self.spaces[i];
        if tables[0].is_some() {
            for r in first >> 10..=(first + count - 1) >> 10 {
                space.regions[(r / 64) as usize] |= 1 << (r % 64);
            }
        }
        if let Some(pt) = tables[1] {
            let deps = space.deps.entry(pt).or_default();
            for l in first..first + count {
                if let Err(at) = deps.binary_search(&l) {
                    deps.insert(at, l);
                }
            }
            self.note_table(pt, i);
        }
        true
    }

    /// The physical page behind linear code page `lin` in the current
    /// space, as far as its instruction TLB knows (itself with paging off).
    pub(crate) fn current_phys(&self, lin: u32) -> Option<u32> {
        match self.space {
            None => Some(lin),
            Some(i) => self.spaces[i].itlb.get(&lin).copied(),
        }
    }

    /// Does a space hold `to`'s pages in its instruction TLB where `to`
    /// was translated, through the directory entries the current directory
    /// has (so that space's watched tables would see them remapped)?
    pub(crate) fn vouched(&self, cpu: &Vcpu, to: Key) -> bool {
        let (Some(t), Some((_, now))) = (self.cache.peek(&to), self.dir_now.as_ref()) else {
            return false;
        };
        let (l, p) = (t.lin_pages(), t.pages());
        [(l.0, p.0), (l.1, p.1)].iter().all(|&(lin, phys)| {
            let pde = now[(lin >> 10) as usize];
            self.spaces.iter().any(|s| {
                s.itlb.get(&lin) == Some(&phys)
                    && cpu.ram.read((s.mode.cr3 & !0xFFF) | ((lin >> 10) << 2), 4) as u32 == pde
            })
        })
    }

    /// For code of each privilege (index: user), the instruction TLB
    /// under the current mapping: the space of that privilege with the
    /// current space's mapping (None if there is none yet). With paging
    /// off, linear is physical: [`PhysOf::Identity`].
    pub(crate) fn itlbs_now(&self) -> [PhysOf<'_>; 2] {
        let Some(c) = self.space else {
            return [PhysOf::Identity, PhysOf::Identity];
        };
        let now = &self.spaces[c].mode;
        [false, true].map(|user| {
            self.spaces_of_table(now.cr3 >> 12)
                .map(|i| &self.spaces[i])
                .find(|s| s.mode.user == user && s.mode.same_mapping(now))
                .map_or(PhysOf::Unknown, |s| PhysOf::Tlb(&s.itlb))
        })
    }

    /// Enter linear code page `lin` -> physical page `phys` in the current
    /// space's instruction TLB (its tables already depended on).
    pub(crate) fn itlb_insert(&mut self, lin: u32, phys: u32) {
        if let Some(i) = self.space {
            self.spaces[i].itlb.insert(lin, phys);
        }
    }

    /// The physical page of the code at linear address `addr` in the
    /// current space: from the instruction TLB, filled by a walk of the
    /// guest's tables on a miss (which sets the accessed bits an
    /// instruction fetch would). None when the fetch would fault (the
    /// interpreter then raises the guest's #PF).
    pub(crate) fn code_phys(&mut self, cpu: &mut Vcpu, addr: u32) -> Option<u32> {
        let page = addr >> 12;
        if let Some(p) = self.current_phys(page) {
            return Some(p);
        }
        let user = self.key.is_some_and(|k| k.user);
        let mut p = cpu.probe(addr, user);
        if p.is_none() {
            // Not accessed yet (or not mapped): fetch a byte as the CPU
            // would, which sets the accessed bits or finds the fault.
            let mut b = [0u8; 1];
            if cpu.fetch(addr, &mut b).0 == 0 {
                return None;
            }
            p = cpu.probe(addr, user);
        }
        let p = p?;
        if !self.depend_on_walk(cpu, p.tables, page, 1) {
            return None;
        }
        self.itlb_insert(page, p.phys_page);
        self.stats.itlb_fills += 1;
        Some(p.phys_page)
    }

    /// The cache key of the code at `eip` in the current space.
    pub(crate) fn entry_key(&mut self, cpu: &mut Vcpu, eip: u32) -> Option<Key> {
        let user = self.key.is_some_and(|k| k.user);
        Some(make_key(eip, self.code_phys(cpu, eip)?, user))
    }

    /// Does linear page `lin` map to physical page `phys` here?
    pub(crate) fn second_page_ok(&mut self, cpu: &mut Vcpu, lin: u32, phys: u32) -> bool {
        self.code_phys(cpu, lin << 12) == Some(phys)
    }

    /// After the interpreter redid an instruction that faulted on the
    /// shadow window, map the page it touched (if the guest tables allow
    /// the access now) so the next access runs at host speed: a hidden
    /// page fault, which the guest never sees. True when it mapped the
    /// page (the access will not fault again while the mapping stays).
    pub(crate) fn fill_shadow(&mut self, cpu: &mut Vcpu, host_addr: u64, key: PagingKey) -> bool {
        let Some(PagingMode { user, .. }) = key else {
            return false;
        };
        let Some(space) = self.space else {
            return false;
        };
        // (A table write still waiting in the watch is drained before
        // translated code runs again, and unmaps this page if it must.)
        if paging_key(cpu) != key {
            return false;
        }
        let Ok(w) = cpu.ram.shadow(space) else {
            return false;
        };
        let Some(lin) = host_addr.checked_sub(w.base() as u64) else {
            return false;
        };
        if lin >= 1 << 32 {
            return false;
        }
        // (Below the floor of a window at host address 0 nothing can be
        // mapped: see below.)
        let below_floor = lin >> 12 < u64::from(w.floor_page());
        let lin = lin as u32;
        if let Some((phys, access)) = cpu.ram.shadow_entry(space, lin >> 12) {
            if access != popek_memory::Access::Revoked && cpu.ram.is_watched(phys) {
                // A write to a watched page (code, a page table): it stays
                // read-only, and the rest of its run is mapped already.
                return false;
            }
            // Revoked, or read-only until the dirty bit was set: if the
            // tables still map it there, grant what they grant now.
            if let Some(p) = cpu.probe(lin, user).filter(|p| p.phys_page == phys) {
                if self.depend_on_walk(cpu, p.tables, lin >> 12, 1)
                    && cpu.ram.shadow_reprotect(space, lin >> 12, p.writable)
                {
                    self.stats.shadow_maps += 1;
                    self.stats.shadow_pages += 1;
                    return true;
                }
                return false;
            }
        }
        let Some(mut run) = cpu.probe_run(lin, user) else {
            return false;
        };
        if below_floor {
            // The guest maps and uses a page the window at host address 0
            // cannot hold (below the host's lowest mappable address): the
            // shadow moves to a window anywhere, emptied, and maps this run
            // there; the process's pages are mapped anew as they are used.
            // Else every access there would go through a host fault.
            if !cpu.ram.shadow_leave_low(space) {
                return false;
            }
            self.stats.shadow_moves += 1;
        }
        if run.phys_first + run.count > cpu.ram.size() / 4096 {
            // (A large page reaching beyond RAM: just the page touched.)
            let page = lin >> 12;
            run.phys_first += page - run.first;
            run.first = page;
            run.count = 1;
        }
        if !self.depend_on_walk(cpu, run.tables, run.first, run.count) {
            return false;
        }
        let mut ok =
            cpu.ram
                .shadow_map_run(space, run.first, run.phys_first, run.count, run.writable);
        if !ok && run.phys_first + run.count <= cpu.ram.size() / 4096 {
            // RAM the host would not map: out of mappings (each mapped run
            // is a host VMA, and a process has a bounded number). Empty
            // the other spaces and try once more.
            for i in (0..self.spaces.len()).filter(|&i| i != space) {
                let fresh = Space::empty(self.spaces[i].mode, self.spaces[i].last_used);
                self.empty_space(cpu, i, fresh);
            }
            ok = cpu
                .ram
                .shadow_map_run(space, run.first, run.phys_first, run.count, run.writable);
        }
        if ok {
            self.stats.shadow_maps += 1;
            self.stats.shadow_pages += u64::from(run.count);
        }
        ok
    }

    /// Drop every shadow address space (every window reset) and stop
    /// watching the page tables they were built from. Should the host
    /// refuse to unmap a shadow, translated code does not use the shadows
    /// until a reset succeeds (see `enter`).
    pub(crate) fn drop_spaces(&mut self, cpu: &mut Vcpu) {
        self.fault_pages.clear();
        self.watch.forget_tables(&mut cpu.ram);
        self.flood.clear();
        self.table_spaces.clear();
        self.shadow_broken = false;
        for i in 0..self.spaces.len() {
            self.shadow_broken |= cpu.ram.shadow_reset(i).is_err();
        }
        self.spaces.clear();
        self.space = None;
        self.key = None;
        // Translations stay (keyed by physical page, entered only through
        // a TLB, and the TLBs are gone); what was chained or published
        // across pages goes.
        self.cut_cross_links();
        self.clear_lookups();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use popek_memory::GuestRam;

    /// Two page directories differ in the regions whose entries map
    /// differently; accessed and dirty bits alone are no difference, and a
    /// directory outside RAM differs everywhere.
    #[test]
    fn directory_diff_names_the_regions_that_map_differently() {
        let mut cpu = Vcpu::new(GuestRam::new(1 << 20).unwrap());
        let (a, b) = (0x1000u32, 0x2000u32);
        for r in 0..1024u32 {
            let e = (r << 22) | 0x83; // the same 4 MiB pages
            cpu.ram.write(a + 4 * r, 4, u64::from(e));
            cpu.ram.write(b + 4 * r, 4, u64::from(e));
        }
        cpu.ram
            .write(b + 4 * 5, 4, u64::from((5u32 << 22) | 0x83 | 0x60)); // A, D
        cpu.ram.write(b + 4 * 7, 4, u64::from((9u32 << 22) | 0x83)); // elsewhere
        cpu.ram.write(b + 4 * 0x300, 4, 0); // not present
        let d = directory_diff(&cpu, a, b);
        let named: Vec<u32> = (0..1024).filter(|&r| d.has(r)).collect();
        assert_eq!(named, vec![7, 0x300]);
        assert_eq!(directory_diff(&cpu, a, 0x7FFF_F000), Regions::ALL);
        let mut r = Regions::NONE;
        assert!(r.is_empty() && !r.meets(&Regions::ALL));
        r.add(1023);
        assert!(r.has(1023) && !r.has(1022) && !r.meets(&d));
    }
}
