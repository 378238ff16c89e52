//! The translation cache: [`Key`] (guest EIP, the physical page it was
//! fetched from, user or supervisor mode) to [`Translation`], least
//! recently used out first when bounded (`--cache-blocks`), and what drops
//! translations: eviction, invalidation after a write to a code page or a
//! change of the page-table entry that mapped it, and the flush of
//! everything (a full code buffer).
//!
//! Keying by the physical page is what lets translations outlive a CR3
//! switch or a change of privilege: the same kernel code mapped in every
//! address space is found under the same key in all of them, and a process
//! whose code at the same linear address is other bytes gets translations
//! of its own. The dispatcher finds the physical page of EIP through the
//! current shadow address space's instruction TLB ([`crate::paging`]).
//!
//! Invariants: every `Translation::Code` in the cache has its host code in
//! the current code buffer, an entry in `by_offset`, and is linked
//! ([`crate::chain`]); a translation leaves the cache only through
//! [`Bt::unlink`] (or [`Bt::flush`], which forgets everything at once), so
//! no chained jump or indirect-table entry ever points at dropped code.

use std::hash::Hasher;

use popek_vcpu::Vcpu;

use crate::chain::Links;
use crate::dispatch::Bt;
use crate::emit::HostBlock;
use crate::host::CodeBuffer;

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
    fn write_u64(&mut self, v: u64) {
        self.0 = (v ^ (v >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A hash map keyed by guest addresses or page numbers, with
/// [`EipHasher`] (one multiply per key).
pub(crate) type FastMap<K, V> =
    std::collections::HashMap<K, V, std::hash::BuildHasherDefault<EipHasher>>;

/// Grow `m` fourfold when it is full, not twofold as an insert would: a
/// long run's maps reach tens of thousands of entries, and each growth
/// moves every entry into a fresh allocation (lines no cache holds, pages
/// that fault in), inside whichever translation happened to insert then:
/// growing the cache's map by doubling took 7% of the Linux boot's time
/// translating. Fourfold moves a third as many entries and faults a
/// quarter fewer pages on the way to the same size (the last table's
/// pages fault in either way).
pub(crate) fn grow_fourfold<K: Eq + std::hash::Hash, V>(m: &mut FastMap<K, V>) {
    if m.len() == m.capacity() {
        m.reserve(3 * m.len().max(64));
    }
}

/// What a translation is found by: its guest EIP (bits 0-31), the physical
/// page of that EIP (bits 32-51; the linear page with paging off) and
/// whether it was made for user mode (bit 63: the guest tables' U/S rights
/// it was checked against).
pub(crate) type Key = u64;

/// The key of the translation of `eip` on physical page `phys_page`.
pub(crate) fn make_key(eip: u32, phys_page: u32, user: bool) -> Key {
    u64::from(eip) | u64::from(phys_page) << 32 | u64::from(user) << 63
}

/// The physical page of a key's EIP (its linear page with paging off).
pub(crate) fn key_phys(k: Key) -> u32 {
    (k >> 32) as u32 & 0x7FFF_FFFF
}

/// The guest EIP of a key.
pub(crate) fn key_eip(k: Key) -> u32 {
    k as u32
}

/// Was the translation made for user mode?
pub(crate) fn key_user(k: Key) -> bool {
    k >> 63 != 0
}

/// The code-buffer offset of each translation's code, to find the block
/// a faulting host instruction belongs to. The buffer is filled from the
/// start and emptied only whole ([`Bt::flush`]), so offsets come in
/// increasing order: a vector searched by halves (cheaper to add to than a
/// tree, which cost a few percent of each translation). A dropped
/// translation leaves its offset with no key.
#[derive(Default)]
pub(crate) struct Offsets(Vec<(usize, Key)>);

/// No translation (no key has bits 52-62 set).
const GONE: Key = u64::MAX;

impl Offsets {
    /// The translation whose code starts at `off`, after every other.
    pub(crate) fn push(&mut self, off: usize, key: Key) {
        debug_assert!(self.0.last().is_none_or(|&(o, _)| o < off));
        // (Fourfold, as `grow_fourfold`: fewer copies on the way.)
        if self.0.len() == self.0.capacity() {
            self.0.reserve(3 * self.0.len().max(64));
        }
        self.0.push((off, key));
    }

    /// The translation at `off` is gone.
    pub(crate) fn remove(&mut self, off: usize) {
        if let Ok(i) = self.0.binary_search_by_key(&off, |e| e.0) {
            self.0[i].1 = GONE;
        }
    }

    /// The translation whose code holds offset `off` (the last one to
    /// start at or before it), if it is still cached.
    pub(crate) fn holding(&self, off: usize) -> Option<Key> {
        let i = self.0.partition_point(|e| e.0 <= off);
        let key = self.0.get(i.checked_sub(1)?)?.1;
        (key != GONE).then_some(key)
    }

    pub(crate) fn clear(&mut self) {
        self.0.clear();
    }
}

/// The translation cache: least-recently-used order when bounded
/// (`--cache-blocks N`), else a plain hash map to slots ([`Slab`], the
/// default: no order to keep up on every lookup and no list node per
/// entry, which cost a tenth of each translation in the Linux boot).
pub(crate) enum TransCache {
    Lru(lru::LruCache<Key, Translation, std::hash::BuildHasherDefault<EipHasher>>),
    Map(Slab),
}

/// The unbounded cache: keys map to slots of a vector of translations.
/// The hash table holds 16-byte entries, not the 112 of a key with its
/// translation: its growth (every entry moved into a fresh table whose
/// pages fault in, inside whichever translation inserts then) took 6-7%
/// of the Linux boot's time in `translate_into_cache` with the
/// translations in it; the vector only grows at its end (glibc moves a
/// large one by remapping its pages), and lookups probe a table a seventh
/// the size (3,900 fewer page faults in a boot).
pub(crate) struct Slab {
    slot: FastMap<Key, u32>,
    entries: Vec<Option<Translation>>,
    /// Slots of `entries` emptied by `pop`, for the next pushes.
    free: Vec<u32>,
}

impl Slab {
    fn get(&self, k: &Key) -> Option<&Translation> {
        let &i = self.slot.get(k)?;
        self.entries.get(i as usize)?.as_ref()
    }

    fn get_mut(&mut self, k: &Key) -> Option<&mut Translation> {
        let &i = self.slot.get(k)?;
        self.entries.get_mut(i as usize)?.as_mut()
    }

    fn push(&mut self, k: Key, t: Translation) -> Option<Translation> {
        if let Some(&i) = self.slot.get(&k) {
            return self.entries[i as usize].replace(t);
        }
        let i = match self.free.pop() {
            Some(i) => {
                self.entries[i as usize] = Some(t);
                i
            }
            None => {
                self.entries.push(Some(t));
                (self.entries.len() - 1) as u32
            }
        };
        grow_fourfold(&mut self.slot);
        self.slot.insert(k, i);
        None
    }

    fn pop(&mut self, k: &Key) -> Option<Translation> {
        let i = self.slot.remove(k)?;
        self.free.push(i);
        self.entries.get_mut(i as usize)?.take()
    }

    fn clear(&mut self) {
        self.slot.clear();
        self.entries.clear();
        self.free.clear();
    }
}

impl TransCache {
    /// Bounded to `capacity` entries (LRU), or unbounded.
    pub(crate) fn new(capacity: Option<std::num::NonZeroUsize>) -> TransCache {
        let hasher = std::hash::BuildHasherDefault::<EipHasher>::default();
        match capacity {
            Some(c) => TransCache::Lru(lru::LruCache::with_hasher(c, hasher)),
            None => TransCache::Map(Slab {
                slot: FastMap::with_capacity_and_hasher(256, hasher),
                entries: Vec::with_capacity(256),
                free: Vec::new(),
            }),
        }
    }

    /// The translation for `k`, as the most recently used.
    pub(crate) fn get(&mut self, k: &Key) -> Option<&Translation> {
        match self {
            TransCache::Lru(c) => c.get(k),
            TransCache::Map(m) => m.get(k),
        }
    }

    /// The translation for `k`, order unchanged.
    pub(crate) fn peek(&self, k: &Key) -> Option<&Translation> {
        match self {
            TransCache::Lru(c) => c.peek(k),
            TransCache::Map(m) => m.get(k),
        }
    }

    /// As [`TransCache::peek`], mutable.
    pub(crate) fn peek_mut(&mut self, k: &Key) -> Option<&mut Translation> {
        match self {
            TransCache::Lru(c) => c.peek_mut(k),
            TransCache::Map(m) => m.get_mut(k),
        }
    }

    /// Insert; the entry that had the same key, or that was evicted.
    pub(crate) fn push(&mut self, k: Key, t: Translation) -> Option<(Key, Translation)> {
        match self {
            TransCache::Lru(c) => c.push(k, t),
            TransCache::Map(m) => m.push(k, t).map(|old| (k, old)),
        }
    }

    /// Remove the translation for `k`.
    pub(crate) fn pop(&mut self, k: &Key) -> Option<Translation> {
        match self {
            TransCache::Lru(c) => c.pop(k),
            TransCache::Map(m) => m.pop(k),
        }
    }

    /// Is there a translation for `k`?
    pub(crate) fn contains(&self, k: &Key) -> bool {
        self.peek(k).is_some()
    }

    /// No translation at all?
    pub(crate) fn is_empty(&self) -> bool {
        match self {
            TransCache::Lru(c) => c.is_empty(),
            TransCache::Map(m) => m.slot.is_empty(),
        }
    }

    /// Drop every translation.
    pub(crate) fn clear(&mut self) {
        match self {
            TransCache::Lru(c) => c.clear(),
            TransCache::Map(m) => m.clear(),
        }
    }

    /// Every (key, translation), in no particular order.
    pub(crate) fn iter(&self) -> Box<dyn Iterator<Item = (&Key, &Translation)> + '_> {
        match self {
            TransCache::Lru(c) => Box::new(c.iter()),
            TransCache::Map(m) => Box::new(
                m.slot
                    .iter()
                    .filter_map(|(k, &i)| Some((k, m.entries.get(i as usize)?.as_ref()?))),
            ),
        }
    }
}

/// A cache entry: translated code, or a note that nothing at this EIP can
/// be translated (so the block is not scanned again).
pub(crate) enum Translation {
    Code {
        /// The host code (with the instruction map: see
        /// [`HostBlock::insns`]).
        code: HostBlock,
        /// Physical pages of its first and last byte.
        pages: (u32, u32),
        /// Linear pages of its first and last byte.
        lin: (u32, u32),
        /// Chained jumps that land in this block.
        incoming: Links,
        /// The guest bytes it was made from (see [`CodeBytes`]).
        bytes: CodeBytes,
    },
    Interpret {
        pages: (u32, u32),
        lin: (u32, u32),
        bytes: CodeBytes,
    },
}

/// The guest bytes a translation was made from: up to two ranges
/// (physical page, first byte, end byte) counted in the write watch, so a
/// write there, and only there, makes it stale.
pub(crate) type CodeBytes = [(u32, u16, u16); 2];

/// No bytes.
pub(crate) const NO_BYTES: CodeBytes = [(u32::MAX, 0, 0); 2];

impl Translation {
    pub(crate) fn pages(&self) -> (u32, u32) {
        match self {
            Translation::Code { pages, .. } | Translation::Interpret { pages, .. } => *pages,
        }
    }

    pub(crate) fn lin_pages(&self) -> (u32, u32) {
        match self {
            Translation::Code { lin, .. } | Translation::Interpret { lin, .. } => *lin,
        }
    }

    pub(crate) fn bytes(&self) -> &CodeBytes {
        match self {
            Translation::Code { bytes, .. } | Translation::Interpret { bytes, .. } => bytes,
        }
    }

    /// Does it translate the instruction at `eip` (`buf`: the code buffer
    /// holding its code)?
    pub(crate) fn holds_insn(&self, buf: Option<&CodeBuffer>, eip: u32) -> bool {
        match (self, buf) {
            (Translation::Code { code, .. }, Some(buf)) => {
                code.insns(buf).1.iter().any(|e| e[0] == eip)
            }
            _ => false,
        }
    }

    /// Was it made from any of bytes `lo..hi` of physical page `page`?
    fn made_from(&self, page: u32, lo: u16, hi: u16) -> bool {
        self.bytes()
            .iter()
            .any(|&(p, a, b)| p == page && a < hi && lo < b)
    }
}

impl Bt {
    /// A cache miss: translate the block at `key`, insert it (evicting the
    /// least recently used block if the cache is full) and link it.
    pub(crate) fn translate_into_cache(&mut self, cpu: &mut Vcpu, key: Key) {
        let t = popek_vcpu::state::host_tsc();
        let e = self.translate(cpu, key);
        let ticks = popek_vcpu::state::host_tsc().wrapping_sub(t);
        self.stats.translate_ns += (ticks as f64 * self.ns_per_tick) as u64;
        let pages = e.bytes().map(|b| b.0);
        if let Some((old_key, old)) = self.cache.push(key, e) {
            if old_key != key {
                self.stats.evictions += 1;
            }
            self.unlink(old_key, old);
        }
        for (i, &p) in pages.iter().enumerate() {
            if p != u32::MAX && !pages[..i].contains(&p) {
                self.by_page.entry(p).or_default().push(key);
            }
        }
        self.link(key);
    }

    /// Drop every translation and reclaim the whole code buffer.
    pub fn flush(&mut self) {
        self.clear_lookups();
        self.watch.forget_code();
        self.cache.clear();
        self.by_page.clear();
        self.pending.clear();
        self.cross.clear();
        self.by_offset.clear();
        if let Some(buf) = self.code.as_mut() {
            buf.reset();
        }
        self.helper_insns.clear();
        self.stats.flushes += 1;
    }

    /// Empty both indirect-branch tables.
    pub(crate) fn clear_lookups(&mut self) {
        let Some(tables) = self.lookup.as_mut() else {
            return;
        };
        for ((table, used), held) in tables
            .iter_mut()
            .zip(self.lookup_used.iter_mut())
            .zip(self.lookup_regions.iter_mut())
        {
            *held = crate::paging::Regions::NONE;
            table.clear(used.iter().map(|u| u.eip));
            used.clear();
        }
    }

    /// Drop the indirect-branch table entries for code in any of the
    /// 4 MiB `regions` whose pages the current mapping no longer maps
    /// where they were translated (the instruction TLBs of the current
    /// directory say so; a page they do not hold counts as changed). The
    /// rest still lead where the mapping does, and the current space's
    /// watched tables will see them remapped. (Emptying whole tables here,
    /// as before, cost the Linux boot some 300,000 more trips through the
    /// dispatcher to publish the kernel's entries again.)
    pub(crate) fn clear_lookups_in(&mut self, regions: &crate::paging::Regions) {
        if regions.is_all() {
            self.clear_lookups();
            return;
        }
        for t in 0..2 {
            if !self.lookup_regions[t].meets(regions) {
                continue;
            }
            let used = std::mem::take(&mut self.lookup_used[t]);
            let mut kept = crate::paging::Regions::NONE;
            let mut still = Vec::with_capacity(used.len());
            let mut gone = Vec::new();
            if let Some(tables) = self.lookup.as_ref() {
                let table = &tables[t];
                let itlb = &self.itlbs_now()[t];
                // The last page asked about, and its answer: entries come
                // in runs on one page.
                let mut last: Option<(u32, u32, bool)> = None;
                let mut alike = |lin: u32, phys: u32| match last {
                    Some((l, p, a)) if l == lin && p == phys => a,
                    _ => {
                        let a = itlb.get(lin) == Some(phys);
                        last = Some((lin, phys, a));
                        a
                    }
                };
                for u in used {
                    if table.get(u.eip) == 0 {
                        // (Emptied since: the translation went.)
                        continue;
                    }
                    let lin0 = u.eip >> 12;
                    let hit = regions.has(lin0 >> 10) || regions.has(u.lin1 >> 10);
                    if !hit || (alike(lin0, u.pages.0) && alike(u.lin1, u.pages.1)) {
                        kept.add(lin0 >> 10);
                        kept.add(u.lin1 >> 10);
                        still.push(u);
                    } else {
                        gone.push(u.eip);
                    }
                }
            }
            if let Some(tables) = self.lookup.as_mut() {
                for eip in gone {
                    // Setting an entry to 0 cannot fail.
                    let _ = tables[t].set(eip, 0);
                }
            }
            self.lookup_used[t] = still;
            self.lookup_regions[t] = kept;
        }
    }

    /// Drop the translations made from any of the `written` bytes (page,
    /// first, end).
    pub(crate) fn invalidate(&mut self, written: &[(u32, u16, u16)]) {
        if written.is_empty() {
            return;
        }
        // Only the translations made from the written pages can be stale.
        let mut keys: Vec<Key> = written
            .iter()
            .filter_map(|w| self.by_page.get(&w.0))
            .flatten()
            .copied()
            .filter(|k| {
                self.cache.peek(k).is_some_and(|t| {
                    written
                        .iter()
                        .any(|&(page, lo, hi)| t.made_from(page, lo, hi))
                })
            })
            .collect();
        keys.sort_unstable();
        keys.dedup();
        for k in keys {
            if let Some(e) = self.cache.pop(&k) {
                self.unlink(k, e);
                self.stats.invalidations += 1;
            }
        }
    }

    /// Drop (and unlink) every cached translation `stale` says is stale;
    /// how many.
    /// (`stale` is also given the code buffer, where a block's instruction
    /// map is.)
    pub(crate) fn drop_where(
        &mut self,
        stale: impl Fn(&Translation, Option<&CodeBuffer>) -> bool,
    ) -> u64 {
        self.drop_keyed_where(|_, t, buf| stale(t, buf))
    }

    /// As [`Bt::drop_where`], deciding on the key too.
    pub(crate) fn drop_keyed_where(
        &mut self,
        stale: impl Fn(Key, &Translation, Option<&CodeBuffer>) -> bool,
    ) -> u64 {
        let buf = self.code.as_ref();
        let keys: Vec<Key> = self
            .cache
            .iter()
            .filter(|(k, t)| stale(**k, t, buf))
            .map(|(k, _)| *k)
            .collect();
        let mut n = 0;
        for k in keys {
            if let Some(e) = self.cache.pop(&k) {
                self.unlink(k, e);
                n += 1;
            }
        }
        n
    }
}
