//! The shadow window: guest *linear* memory while guest paging is on.
//!
//! Translated code reaches memory as `gs:[addr32]`. With paging off, GS is
//! the [`Window`] of physical memory. With paging on, a guest linear
//! address must go through the guest's page tables, so GS is a second
//! 4 GiB reservation, the shadow, filled lazily: every page starts
//! `PROT_NONE`; when translated code touches one, the host fault sends the
//! instruction to the interpreter (which walks the guest tables and raises
//! #PF if it must), and the engine then maps that linear page to the
//! physical page behind it, straight from the RAM memfd, with the rights
//! the guest tables grant. The next access runs at host speed. This is the
//! shadow page table of a classic VMM, kept by the host's MMU.
//!
//! The shadow must never grant what the guest tables no longer grant. The
//! page-table pages a mapping was derived from are *table pages*: read-only
//! to translated code (like code pages), and any write to one (by the
//! interpreter, a device or the platform) is recorded; the engine then drops
//! the whole shadow ([`GuestRam::shadow_reset`]). So translated code sees
//! a mapping change at once, as the interpreter (which has no TLB) does.
//! Setting accessed and dirty bits ([`GuestRam::write_ad`]) is not such a
//! write: it only makes the tables grant more.

use std::os::fd::AsRawFd;

use crate::{GuestRam, RamError, Window, PAGE_SIZE, WINDOW_SIZE};

impl GuestRam {
    /// The shadow window, created on first use (every page `PROT_NONE`).
    pub fn shadow(&mut self) -> Result<&Window, RamError> {
        if self.shadow.is_none() {
            self.shadow = Some(Window::reserve()?);
        }
        Ok(self.shadow.as_ref().expect("created above"))
    }

    /// Map linear page `lin` to physical page `phys` in the shadow, read-only
    /// unless `writable` (and the physical page is neither code nor a page
    /// table). False when `phys` is not RAM or there is no shadow.
    pub fn shadow_map(&mut self, lin: u32, phys: u32, writable: bool) -> bool {
        if phys >= self.size / PAGE_SIZE {
            return false;
        }
        let writable = writable && !self.watched(phys);
        let Some(w) = &self.shadow else { return false };
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: MAP_FIXED replaces one page inside the shadow reservation,
        // which `w` owns; the memfd holds `phys` (checked above), so the
        // mapping aliases guest RAM only.
        let r = unsafe {
            libc::mmap(
                w.base().add((lin * PAGE_SIZE) as usize).cast(),
                PAGE_SIZE as usize,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                self.fd.as_raw_fd(),
                i64::from(phys * PAGE_SIZE),
            )
        };
        if r == libc::MAP_FAILED {
            return false;
        }
        let list = self.aliases.entry(phys).or_default();
        if !list.contains(&lin) {
            list.push(lin);
        }
        true
    }

    /// Drop every shadow mapping and forget every page-table page.
    pub fn shadow_reset(&mut self) {
        self.table_written = false;
        self.aliases.clear();
        let tables: Vec<u32> = (0..self.table_pages.len() as u32 * 64)
            .filter(|p| self.table_pages[(p / 64) as usize] & (1 << (p % 64)) != 0)
            .collect();
        self.table_pages.fill(0);
        for p in tables {
            self.protect(p, true);
        }
        if let Some(w) = &self.shadow {
            unreserve(w.base(), WINDOW_SIZE);
        }
    }

    /// Mark a physical page as a page table the shadow depends on: it
    /// becomes read-only to translated code, and writes to it are recorded.
    pub fn mark_table_page(&mut self, page: u32) {
        let (w, b) = ((page / 64) as usize, page % 64);
        if let Some(x) = self.table_pages.get_mut(w) {
            if *x & (1 << b) == 0 {
                *x |= 1 << b;
                self.protect(page, false);
            }
        }
    }

    /// Has a page-table page been written since the last call? (The shadow
    /// is stale if so.)
    pub fn take_table_writes(&mut self) -> bool {
        std::mem::take(&mut self.table_written)
    }

    /// Is a page-table write waiting for [`GuestRam::take_table_writes`]?
    pub fn has_table_writes(&self) -> bool {
        self.table_written
    }

    /// Write a page-table entry that only grants more than before (a
    /// not-present entry becoming present, as a kernel mapping new memory
    /// does): the shadow cannot be granting too much, so this is not a
    /// page-table change either.
    pub fn write_grant(&mut self, addr: u32, v: u32) {
        self.write_ad(addr, v);
    }

    /// Write a page-table entry whose accessed or dirty bit the CPU sets:
    /// a code-page write if it is one, but not a page-table change.
    pub fn write_ad(&mut self, addr: u32, v: u32) {
        let was = self.table_written;
        self.write(addr, 4, u64::from(v));
        self.table_written = was;
    }

    /// Make the shadow aliases of a physical page read-only, or (when it
    /// may be writable again) drop them, to be mapped again with the guest
    /// tables' rights on their next use.
    pub(crate) fn protect_aliases(&mut self, phys: u32, writable: bool) {
        let Some(w) = &self.shadow else { return };
        let Some(list) = self.aliases.get(&phys) else {
            return;
        };
        for &lin in list {
            // SAFETY: the page lies inside the shadow reservation, which
            // `w` owns; changing its protection or replacing it with a
            // PROT_NONE page affects only translated code's accesses.
            let at = unsafe { w.base().add((lin * PAGE_SIZE) as usize) };
            if writable {
                unreserve(at, PAGE_SIZE as usize);
            } else {
                // SAFETY: as above.
                unsafe {
                    libc::mprotect(at.cast(), PAGE_SIZE as usize, libc::PROT_READ);
                }
            }
        }
        if writable {
            self.aliases.remove(&phys);
        }
    }
}

/// Replace `[at, at+len)` of a window with fresh `PROT_NONE` pages.
fn unreserve(at: *mut u8, len: usize) {
    // SAFETY: callers pass a range inside a window reservation they own;
    // MAP_FIXED replaces exactly that range with inaccessible anonymous
    // memory, so nothing else is affected.
    unsafe {
        libc::mmap(
            at.cast(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::GuestRam;

    fn read(base: *mut u8, at: u32) -> u32 {
        // SAFETY: callers read pages the test mapped into the shadow.
        unsafe { std::ptr::read_unaligned(base.add(at as usize).cast::<u32>()) }
    }

    #[test]
    fn shadow_pages_alias_ram_and_table_writes_are_recorded() {
        let mut ram = GuestRam::new(0x10000).unwrap();
        ram.write(0x3010, 4, 0x1234_5678);
        let base = ram.shadow().unwrap().base();
        assert!(ram.shadow_map(0x80000, 3, true));
        assert_eq!(read(base, 0x8000_0010), 0x1234_5678);
        // A write through the shadow shows in RAM.
        // SAFETY: the page was mapped writable just above.
        unsafe { std::ptr::write_unaligned(base.add(0x8000_0020).cast::<u32>(), 0xCAFE) };
        assert_eq!(ram.read(0x3020, 4), 0xCAFE);
        assert!(!ram.shadow_map(0x80001, 0x10, true), "beyond RAM");
        // Table pages: A/D updates are not changes, other writes are.
        ram.mark_table_page(5);
        ram.write_ad(0x5000, 0x21);
        assert!(!ram.take_table_writes());
        ram.write(0x5004, 4, 7);
        assert!(ram.take_table_writes());
        ram.shadow_reset();
        ram.write(0x5008, 4, 7);
        assert!(!ram.take_table_writes(), "reset forgets table pages");
    }
}
