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
//! page-table pages a mapping was derived from are *watched* by the
//! translator ([`GuestRam::watch_page`]): read-only to translated code
//! (like code pages), and any write to one (by the interpreter, a device or
//! the platform) is recorded; the translator then drops the whole shadow
//! ([`GuestRam::shadow_reset`]). So translated code sees
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
        let writable = writable && !self.is_watched(phys);
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
        if let Some(old) = self.shadow_of.insert(lin, phys) {
            if old != phys {
                if let Some(list) = self.aliases.get_mut(&old) {
                    list.retain(|&l| l != lin);
                }
            }
        }
        let list = self.aliases.entry(phys).or_default();
        if !list.contains(&lin) {
            list.push(lin);
        }
        true
    }

    /// Drop every shadow mapping (every linear page `PROT_NONE` again).
    pub fn shadow_reset(&mut self) -> Result<(), RamError> {
        self.aliases.clear();
        self.shadow_of.clear();
        match &self.shadow {
            Some(w) => unreserve(w.base(), WINDOW_SIZE),
            None => Ok(()),
        }
    }

    /// Drop the shadow mappings of `count` linear pages from `first` (they
    /// are `PROT_NONE` again and are mapped anew on their next use): what
    /// a TLB does for INVLPG, and what a changed page-table entry requires.
    /// One host call for the whole range.
    pub fn shadow_unmap(&mut self, first: u32, count: u32) -> Result<(), RamError> {
        for lin in first..first.saturating_add(count) {
            if let Some(phys) = self.shadow_of.remove(&lin) {
                if let Some(list) = self.aliases.get_mut(&phys) {
                    list.retain(|&l| l != lin);
                }
            }
        }
        match &self.shadow {
            Some(w) => {
                // SAFETY: the range lies inside the shadow reservation `w`
                // owns (linear pages are below 2^20).
                let at = unsafe { w.base().add((first * PAGE_SIZE) as usize) };
                unreserve(at, (count * PAGE_SIZE) as usize)
            }
            None => Ok(()),
        }
    }

    /// Write a page-table entry that only grants more than before (a
    /// not-present entry becoming present, as a kernel mapping new memory
    /// does): the shadow cannot be granting too much, so it is recorded
    /// as an accessed/dirty write ([`WatchedWrite::accessed_dirty`]).
    ///
    /// [`WatchedWrite::accessed_dirty`]: crate::WatchedWrite::accessed_dirty
    pub fn write_grant(&mut self, addr: u32, v: u32) {
        self.write_ad(addr, v);
    }

    /// Write a page-table entry whose accessed or dirty bit the CPU sets:
    /// recorded as such if the page is watched, so a watcher can tell it
    /// from a change of mapping.
    pub fn write_ad(&mut self, addr: u32, v: u32) {
        self.note_write_as(addr, 4, true);
        if let Some(s) = self.map.get_mut(addr as usize..addr as usize + 4) {
            s.copy_from_slice(&v.to_le_bytes());
        }
    }

    /// Make the shadow aliases of a physical page read-only, or (when it
    /// may be writable again) drop them, to be mapped again with the guest
    /// tables' rights on their next use.
    pub(crate) fn protect_aliases(&mut self, phys: u32, writable: bool) -> Result<(), RamError> {
        let Some(w) = &self.shadow else {
            return Ok(());
        };
        let Some(list) = self.aliases.get(&phys) else {
            return Ok(());
        };
        for &lin in list {
            // SAFETY: the page lies inside the shadow reservation, which
            // `w` owns; changing its protection or replacing it with a
            // PROT_NONE page affects only translated code's accesses.
            let at = unsafe { w.base().add((lin * PAGE_SIZE) as usize) };
            if writable {
                unreserve(at, PAGE_SIZE as usize)?;
            } else {
                // SAFETY: as above.
                let r = unsafe { libc::mprotect(at.cast(), PAGE_SIZE as usize, libc::PROT_READ) };
                if r != 0 {
                    return Err(RamError(format!(
                        "cannot write-protect linear page {:#010x} in the shadow: {}",
                        lin * PAGE_SIZE,
                        std::io::Error::last_os_error()
                    )));
                }
            }
        }
        if writable {
            if let Some(list) = self.aliases.remove(&phys) {
                for lin in list {
                    self.shadow_of.remove(&lin);
                }
            }
        }
        Ok(())
    }
}

/// Replace `[at, at+len)` of a window with fresh `PROT_NONE` pages.
fn unreserve(at: *mut u8, len: usize) -> Result<(), RamError> {
    // SAFETY: callers pass a range inside a window reservation they own;
    // MAP_FIXED replaces exactly that range with inaccessible anonymous
    // memory, so nothing else is affected.
    let r = unsafe {
        libc::mmap(
            at.cast(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if r == libc::MAP_FAILED {
        return Err(RamError(format!(
            "cannot unmap {len} bytes of a shadow window: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
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
        // A watched page is read-only in the shadow, and writes to it are
        // recorded, A/D updates marked as such.
        ram.watch_page(3).unwrap();
        // SAFETY: reading a page mapped above; it is still mapped.
        assert_eq!(read(base, 0x8000_0020), 0xCAFE);
        ram.write_ad(0x3000, 0x21);
        let w = ram.take_watched_writes();
        assert_eq!(w.len(), 1);
        assert!(w[0].accessed_dirty);
        ram.write(0x3004, 4, 7);
        assert!(!ram.take_watched_writes()[0].accessed_dirty);
        ram.unwatch_page(3).unwrap();
        ram.write(0x3008, 4, 7);
        assert!(
            !ram.has_watched_writes(),
            "unwatched pages are not recorded"
        );
        ram.shadow_reset().unwrap();
    }
}
