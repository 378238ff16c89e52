//! The translator's write watch: which guest physical pages translations
//! depend on, and what a write to one of them means.
//!
//! Two kinds of pages are watched: *code pages* (a translation was made
//! from their bytes) and *table pages* (the page tables the shadow window
//! and the translations of linear addresses were derived from). Memory
//! provides the primitive ([`GuestRam::watch_page`]: read-only to
//! translated code, every write recorded once per page); this module owns
//! the policy. The dispatcher drains the recorded writes in one place,
//! [`WriteWatch::drain`], before every lookup:
//!
//! - a write to a code page matters only where it overlaps translated code:
//!   each code page counts, per 64-byte chunk, the translations made from
//!   its bytes there ([`WriteWatch::add_code`], [`WriteWatch::remove_code`]),
//!   so a store to data that merely shares the page with code invalidates
//!   nothing (QEMU keeps a bitmap of code bytes per page the same way); the
//!   caller drops the translations a write does overlap, and a page no
//!   translation covers any more stops being a code page;
//! - a written table page makes the shadow stale, unless every write was
//!   the CPU setting an accessed or dirty bit (which only grants more);
//! - a page watched for neither reason any more is unwatched (writable to
//!   translated code again).
//!
//! Invariant: a page is watched in memory iff it is a code page or a
//! table page here (or unwatching it failed, which only costs faults).
//! The same mechanism is meant to serve dirty-page tracking for snapshots
//! and live migration: one more kind of page, drained the same way.

use popek_memory::GuestRam;

/// Bytes of a page per chunk of a code page's map.
pub const CHUNK: u32 = 64;

/// What a drain found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Written {
    /// Writes that overlapped translated code (`page, lo, hi`: bytes
    /// `lo..hi`): the translations covering those bytes are stale.
    pub code: Vec<(u32, u16, u16)>,
    /// Writes to code pages that overlapped no translated code.
    pub code_missed: u64,
    /// Page tables changed (beyond accessed and dirty bits), with the byte
    /// range of the page written (`page, lo, hi`: bytes `lo..hi`).
    pub tables: Vec<(u32, u16, u16)>,
}

/// Code and page-table pages the translator watches for writes.
#[derive(Debug, Default)]
pub struct WriteWatch {
    /// One bit per physical page: translated code was made from it.
    code: Vec<u64>,
    /// For each code page, how many translations cover each 64-byte chunk.
    chunks: crate::cache::FastMap<u32, [u16; 64]>,
    /// Pages that stopped being code pages, to unwatch at the next drain
    /// (unless they are tables, or code again by then).
    released: Vec<u32>,
    /// One bit per physical page: the shadow depends on this page table.
    tables: Vec<u64>,
}

/// The chunks bytes `lo..hi` of a page touch (none when `lo >= hi`).
fn chunks_of(lo: u32, hi: u32) -> std::ops::Range<usize> {
    if lo >= hi {
        return 0..0;
    }
    (lo / CHUNK) as usize..(hi.min(4096).div_ceil(CHUNK)) as usize
}

fn get(v: &[u64], page: u32) -> bool {
    v.get((page / 64) as usize)
        .is_some_and(|x| x & (1 << (page % 64)) != 0)
}

fn set_bit(v: &mut Vec<u64>, page: u32, on: bool) {
    let w = (page / 64) as usize;
    if w >= v.len() {
        if !on {
            return;
        }
        v.resize(w + 1, 0);
    }
    if on {
        v[w] |= 1 << (page % 64);
    } else {
        v[w] &= !(1 << (page % 64));
    }
}

/// Mark `page` in `set`, asking memory to watch it: Some(true) if it was
/// new, Some(false) if it was marked already, None if memory refused.
fn watch(set: &mut Vec<u64>, ram: &mut GuestRam, page: u32) -> Option<bool> {
    if get(set, page) {
        return Some(false);
    }
    ram.watch_page(page).ok()?;
    set_bit(set, page, true);
    Some(true)
}

impl WriteWatch {
    /// A translation is made from bytes `lo..hi` of physical page `page`:
    /// watch the page as code and count the bytes. False when memory could
    /// not watch it (then nothing may be translated from it, and nothing
    /// was counted).
    pub fn watch_code(&mut self, ram: &mut GuestRam, page: u32, lo: u32, hi: u32) -> bool {
        if watch(&mut self.code, ram, page).is_none() {
            return false;
        }
        // Stores beside code may have been let through fast: not here now.
        // (Where every chunk held code already, none was: an entry is set
        // only where its region and the next hold none, and the count that
        // made a chunk code cleared the entries that reach into it. The
        // fast-write map is 64 MiB of address space: one line of it fewer
        // per translation, and one TLB entry.)
        if self.add_code(page, lo, hi) {
            ram.clear_fast(page, lo, hi);
        }
        true
    }

    /// Watch a page table that the shadow (or a translation of linear
    /// addresses) was derived from. False when memory could not watch it
    /// (then nothing may be derived from it).
    pub fn watch_table(&mut self, ram: &mut GuestRam, page: u32) -> bool {
        match watch(&mut self.tables, ram, page) {
            None => false,
            Some(new) => {
                if new {
                    // (A code page's stores beside code may have gone fast.)
                    ram.clear_fast(page, 0, popek_memory::PAGE_SIZE);
                }
                true
            }
        }
    }

    /// May stores to the 64-byte region of physical address `addr` and
    /// the next region go past the watch (no translated code there, no
    /// page table)? See [`GuestRam::fast_map`].
    pub fn fast_ok(&self, addr: u32) -> bool {
        let r = popek_memory::FAST_REGION;
        let first = addr / r * r;
        let Some(next) = first.checked_add(r) else {
            return false;
        };
        [first, next].iter().all(|&a| {
            let (page, off) = (a / 4096, (a % 4096) as u16);
            !self.is_table(page) && !self.overlaps_code(page, off, off + r as u16)
        })
    }

    /// Is a page watched as code?
    pub fn is_code(&self, page: u32) -> bool {
        get(&self.code, page)
    }

    /// Is a page watched as a page table?
    pub fn is_table(&self, page: u32) -> bool {
        get(&self.tables, page)
    }

    /// Count bytes `lo..hi` of `page` as code once more: true if a chunk
    /// of them held none before.
    fn add_code(&mut self, page: u32, lo: u32, hi: u32) -> bool {
        let counts = self.chunks.entry(page).or_insert([0; 64]);
        let mut fresh = false;
        for c in chunks_of(lo, hi) {
            fresh |= counts[c] == 0;
            counts[c] = counts[c].saturating_add(1);
        }
        fresh
    }

    /// A translation made from bytes `lo..hi` of `page` is gone: a page no
    /// translation covers any more stops being a code page (and is
    /// unwatched at the next drain unless it is a table).
    pub fn remove_code(&mut self, page: u32, lo: u32, hi: u32) {
        let Some(counts) = self.chunks.get_mut(&page) else {
            return;
        };
        for c in chunks_of(lo, hi) {
            counts[c] = counts[c].saturating_sub(1);
        }
        if counts.iter().all(|&n| n == 0) {
            self.chunks.remove(&page);
            set_bit(&mut self.code, page, false);
            self.released.push(page);
        }
    }

    /// Do bytes `lo..hi` of `page` overlap translated code?
    pub fn overlaps_code(&self, page: u32, lo: u16, hi: u16) -> bool {
        self.chunks
            .get(&page)
            .is_some_and(|counts| chunks_of(u32::from(lo), u32::from(hi)).any(|c| counts[c] != 0))
    }

    /// Is a recorded write harmless to what was derived from watched pages
    /// (it overlaps no translated code and changes no page table)? Then
    /// translated code may go on past it.
    pub fn harmless(&self, w: &popek_memory::WatchedWrite) -> bool {
        (w.accessed_dirty || !self.is_table(w.page)) && !self.overlaps_code(w.page, w.lo, w.hi)
    }

    /// Forget every code page (every translation is gone).
    pub fn forget_code(&mut self) {
        for page in std::mem::take(&mut self.chunks).into_keys() {
            set_bit(&mut self.code, page, false);
            self.released.push(page);
        }
    }

    /// Take the writes memory recorded since the last drain.
    pub fn drain(&mut self, ram: &mut GuestRam) -> Written {
        for page in std::mem::take(&mut self.released) {
            if !get(&self.code, page) && !get(&self.tables, page) {
                // A page left watched only costs faults (see below).
                let _ = ram.unwatch_page(page);
            }
        }
        let mut out = Written::default();
        if !ram.has_watched_writes() {
            return out;
        }
        for w in ram.take_watched_writes() {
            if get(&self.code, w.page) {
                if self.overlaps_code(w.page, w.lo, w.hi) {
                    out.code.push((w.page, w.lo, w.hi));
                } else {
                    out.code_missed += 1;
                }
            }
            let table = get(&self.tables, w.page);
            if table && !w.accessed_dirty {
                out.tables.push((w.page, w.lo, w.hi));
            }
            if !table && !get(&self.code, w.page) {
                // Nothing depends on it now. Should unwatching fail, the
                // page stays watched: its writes fault and are redone by
                // the interpreter, and the next drain finds them again.
                let _ = ram.unwatch_page(w.page);
            }
        }
        out
    }

    /// Forget every table page (the shadows they were watched for are
    /// gone): unwatch those that are not code pages too.
    pub fn forget_tables(&mut self, ram: &mut GuestRam) {
        for (w, bits) in std::mem::take(&mut self.tables).into_iter().enumerate() {
            let mut b = bits;
            while b != 0 {
                let p = (w * 64) as u32 + b.trailing_zeros();
                b &= b - 1;
                if !get(&self.code, p) {
                    // As in `drain`: a page left watched only costs faults.
                    let _ = ram.unwatch_page(p);
                }
            }
        }
    }

    /// Forget one table page (nothing is derived from it any more).
    pub fn forget_table(&mut self, ram: &mut GuestRam, page: u32) {
        if !get(&self.tables, page) {
            return;
        }
        set_bit(&mut self.tables, page, false);
        if !get(&self.code, page) {
            let _ = ram.unwatch_page(page);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast-write map's invariant under any mix of code counted and
    /// dropped and entries set where `fast_ok` allows: an entry is 1 only
    /// where `fast_ok` still says yes (no code in its region or the next).
    /// (`watch_code` leaves the map alone where every chunk held code
    /// already; this is what makes that right.)
    #[test]
    fn fast_entries_never_cover_code() {
        let pages = 4u32;
        let mut ram = GuestRam::new(u64::from(pages) * 4096).unwrap();
        ram.fast_map().unwrap();
        let mut w = WriteWatch::default();
        let mut held: Vec<(u32, u32, u32)> = Vec::new();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = |n: u32| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % u64::from(n)) as u32
        };
        for step in 0..20_000 {
            match next(3) {
                0 => {
                    let (page, lo) = (next(pages), next(4096));
                    let hi = (lo + 1 + next(300)).min(4096);
                    if w.watch_code(&mut ram, page, lo, hi) {
                        held.push((page, lo, hi));
                    }
                }
                1 if !held.is_empty() => {
                    let (page, lo, hi) = held.swap_remove(next(held.len() as u32) as usize);
                    w.remove_code(page, lo, hi);
                }
                _ => {
                    let a = next(pages * 4096);
                    if w.fast_ok(a) {
                        ram.set_fast(a);
                    }
                }
            }
            for a in (0..pages * 4096).step_by(popek_memory::FAST_REGION as usize) {
                assert!(
                    !ram.is_fast(a) || w.fast_ok(a),
                    "step {step}: region {a:#x} fast beside code"
                );
            }
        }
    }

    #[test]
    fn code_writes_count_where_they_overlap_code_and_table_writes_ignore_accessed_dirty() {
        let mut ram = GuestRam::new(1 << 20).unwrap();
        let mut w = WriteWatch::default();
        assert!(w.watch_code(&mut ram, 5, 0x100, 0x120));
        assert!(w.watch_code(&mut ram, 3, 0, 0x10));
        assert!(w.watch_table(&mut ram, 4));
        assert!(w.watch_table(&mut ram, 3));
        // Data beside code (another 64-byte chunk): no invalidation.
        ram.write(0x5000, 1, 0x90);
        ram.write_ad(0x4000, 0x21);
        let d = w.drain(&mut ram);
        assert!(d.code.is_empty() && d.code_missed == 1, "{d:?}");
        assert!(
            d.tables.is_empty(),
            "only an accessed bit was set in a table"
        );
        // A write into the code's chunk is reported with its bytes.
        ram.write(0x5110, 2, 0x9090);
        assert_eq!(w.drain(&mut ram).code, vec![(5, 0x110, 0x112)]);
        // The caller drops that translation: nothing depends on page 5.
        w.remove_code(5, 0x100, 0x120);
        w.drain(&mut ram);
        assert!(!ram.is_watched(5) && !w.is_code(5));
        ram.write(0x3004, 4, 1);
        assert_eq!(
            w.drain(&mut ram),
            Written {
                code: vec![(3, 4, 8)],
                code_missed: 0,
                tables: vec![(3, 4, 8)]
            }
        );
        // Page 3 is still a table page: still watched.
        w.remove_code(3, 0, 0x10);
        w.drain(&mut ram);
        assert!(ram.is_watched(3) && !w.is_code(3));
        w.forget_tables(&mut ram);
        assert!(!ram.is_watched(3) && !ram.is_watched(4));
        ram.write(0x4000, 4, 1);
        assert_eq!(w.drain(&mut ram), Written::default());
    }
}
