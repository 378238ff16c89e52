//! The guest's addressing mode as translations depend on it: paging
//! (the [`PagingMode`] a translation of linear addresses and the shadow
//! window belong to), the FS/GS bases translated code may add, and whether
//! translated code can run at all ([`translatable`]).
//!
//! With paging off translations are keyed by physical address (linear =
//! physical in the flat mode translated code needs) and GS points at the
//! physical window. With paging on GS points at the shadow window, filled
//! on demand ([`Bt::fill_shadow`]); a change of [`PagingMode`] drops every
//! translation and the shadow, a page-table write the shadow.

use popek_vcpu::{cr0, cr4, flags, SegReg, Vcpu};

use crate::dispatch::Bt;
use crate::lower::SegBases;

/// The paging mode translations of linear addresses and the shadow window
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
    /// Follow the guest's paging mode. Translations of linear addresses
    /// are dropped when CR3, CR0.WP, CR4.PSE or user/supervisor mode
    /// change while paging is on, or when paging is switched; the shadow
    /// window is dropped then too. A write to a page table (`tables`, from
    /// the write watch) drops only what was derived from that table: the
    /// shadow pages it maps and the translations of code on them, as a
    /// TLB entry would be.
    pub(crate) fn sync_paging(&mut self, cpu: &mut Vcpu, tables: &[u32]) {
        let segs = seg_bases(cpu);
        if segs != self.segs {
            if self.segs_used && !self.cache.is_empty() {
                self.flush();
                self.stats.mode_flushes += 1;
            }
            self.segs = segs;
        }
        let key = paging_key(cpu);
        if key != self.key {
            if !self.cache.is_empty() {
                self.flush();
                self.stats.mode_flushes += 1;
            }
            self.reset_shadow(cpu);
            self.key = key;
        } else if !tables.is_empty() {
            self.table_writes(cpu, tables);
        }
    }

    /// Page tables were written: drop the shadow pages and translations
    /// derived from them (`table_deps`).
    fn table_writes(&mut self, cpu: &mut Vcpu, tables: &[u32]) {
        let mut lins = Vec::new();
        for t in tables {
            self.stats.table_writes += 1;
            if let Some(deps) = self.table_deps.remove(t) {
                lins.extend(deps);
            }
        }
        if lins.is_empty() {
            return;
        }
        lins.sort_unstable();
        lins.dedup();
        // Runs of consecutive pages go in one host call each.
        let mut i = 0;
        while i < lins.len() {
            let mut n = 1;
            while i + n < lins.len() && lins[i + n] == lins[i] + n as u32 {
                n += 1;
            }
            if cpu.ram.shadow_unmap(lins[i], n as u32).is_err() {
                // The host would not unmap it: start over from nothing.
                self.flush();
                self.reset_shadow(cpu);
                return;
            }
            self.stats.shadow_unmaps += n as u64;
            i += n;
        }
        self.drop_where(|t| {
            let (a, b) = t.lin_pages();
            lins.binary_search(&a).is_ok() || lins.binary_search(&b).is_ok()
        });
    }

    /// Remember that linear page `lin` was derived from page table `t`.
    pub(crate) fn depends_on_table(&mut self, t: u32, lin: u32) {
        let deps = self.table_deps.entry(t).or_default();
        if !deps.contains(&lin) {
            deps.push(lin);
        }
    }

    /// After the interpreter redid an instruction that faulted on the
    /// shadow window, map the page it touched (if the guest tables allow
    /// the access now) so the next access runs at host speed.
    pub(crate) fn fill_shadow(&mut self, cpu: &mut Vcpu, host_addr: u64, key: PagingKey) {
        let Some(PagingMode { user, .. }) = key else {
            return;
        };
        if paging_key(cpu) != key || cpu.ram.has_watched_writes() {
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
            if !self.watch.watch_table(&mut cpu.ram, t) {
                return;
            }
        }
        if cpu.ram.shadow_map(lin >> 12, p.phys_page, p.writable) {
            self.stats.shadow_maps += 1;
            for t in p.tables.into_iter().flatten() {
                self.depends_on_table(t, lin >> 12);
            }
        }
    }
}

impl Bt {
    /// Drop the whole shadow window and stop watching the page tables it
    /// was built from. Should the host refuse to unmap the shadow, every
    /// translation is dropped too and the shadow is not used until a reset
    /// succeeds (see `enter`).
    fn reset_shadow(&mut self, cpu: &mut Vcpu) {
        self.table_deps.clear();
        self.watch.forget_tables(&mut cpu.ram);
        self.shadow_broken = cpu.ram.shadow_reset().is_err();
    }
}
