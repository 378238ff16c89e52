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
//! - a written code page stops being a code page (its translations are
//!   dropped by the caller, so nothing depends on it any more);
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

/// What a drain found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Written {
    /// Code pages written: their translations are stale.
    pub code: Vec<u32>,
    /// Page tables changed (beyond accessed and dirty bits), with the byte
    /// range of the page written (`page, lo, hi`: bytes `lo..hi`).
    pub tables: Vec<(u32, u16, u16)>,
}

/// Code and page-table pages the translator watches for writes.
#[derive(Debug, Default)]
pub struct WriteWatch {
    /// One bit per physical page: translated code was made from it.
    code: Vec<u64>,
    /// One bit per physical page: the shadow depends on this page table.
    tables: Vec<u64>,
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
    /// Watch a page that translated code was made from. False when memory
    /// could not watch it (then nothing may be translated from it).
    pub fn watch_code(&mut self, ram: &mut GuestRam, page: u32) -> bool {
        watch(&mut self.code, ram, page).is_some()
    }

    /// Watch a page table that the shadow (or a translation of linear
    /// addresses) was derived from. False when memory could not watch it
    /// (then nothing may be derived from it).
    pub fn watch_table(&mut self, ram: &mut GuestRam, page: u32) -> bool {
        watch(&mut self.tables, ram, page).is_some()
    }

    /// Is a page watched as code?
    pub fn is_code(&self, page: u32) -> bool {
        get(&self.code, page)
    }

    /// Take the writes memory recorded since the last drain.
    pub fn drain(&mut self, ram: &mut GuestRam) -> Written {
        let mut out = Written::default();
        if !ram.has_watched_writes() {
            return out;
        }
        for w in ram.take_watched_writes() {
            if get(&self.code, w.page) {
                set_bit(&mut self.code, w.page, false);
                out.code.push(w.page);
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

    #[test]
    fn code_writes_invalidate_once_and_table_writes_ignore_accessed_dirty() {
        let mut ram = GuestRam::new(1 << 20).unwrap();
        let mut w = WriteWatch::default();
        assert!(w.watch_code(&mut ram, 5));
        assert!(w.watch_code(&mut ram, 3));
        assert!(w.watch_table(&mut ram, 4));
        assert!(w.watch_table(&mut ram, 3));
        ram.write(0x5000, 1, 0x90);
        ram.write_ad(0x4000, 0x21);
        let d = w.drain(&mut ram);
        assert_eq!(d.code, vec![5]);
        assert!(
            d.tables.is_empty(),
            "only an accessed bit was set in a table"
        );
        assert!(!ram.is_watched(5), "nothing depends on page 5 any more");
        ram.write(0x3004, 4, 1);
        assert_eq!(
            w.drain(&mut ram),
            Written {
                code: vec![3],
                tables: vec![(3, 4, 8)]
            }
        );
        // Page 3 is still a table page: still watched.
        assert!(ram.is_watched(3) && !w.is_code(3));
        w.forget_tables(&mut ram);
        assert!(!ram.is_watched(3) && !ram.is_watched(4));
        ram.write(0x4000, 4, 1);
        assert_eq!(w.drain(&mut ram), Written::default());
    }
}
