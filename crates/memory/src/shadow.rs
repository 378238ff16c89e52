//! Shadow windows: guest *linear* memory while guest paging is on.
//!
//! Translated code reaches memory as `gs:[addr32]`. With paging off, GS is
//! the [`Window`] of physical memory. With paging on, a guest linear
//! address must go through the guest's page tables, so GS is a shadow
//! window, a second 4 GiB reservation filled lazily: every page starts
//! `PROT_NONE`; when translated code touches one, the host fault sends the
//! instruction to the interpreter (which walks the guest tables and raises
//! #PF if it must), and the engine then maps that linear page to the
//! physical page behind it, straight from the RAM memfd, with the rights
//! the guest tables grant. The next access runs at host speed. This is the
//! shadow page table of a classic VMM, kept by the host's MMU.
//!
//! There are several shadows, numbered by the caller (the translator keeps
//! one per shadow address space: page directory and privilege), so that a
//! CR3 switch or a change between user and supervisor mode only points GS
//! at another window, as a CPU with a tagged TLB would switch.
//!
//! A shadow must never grant what the guest tables no longer grant. The
//! caller watches the page-table pages a mapping was derived from
//! ([`GuestRam::watch_page`]) and unmaps exactly the linear pages a table
//! write affects ([`GuestRam::shadow_unmap`]). Setting accessed and dirty
//! bits ([`GuestRam::write_ad`]) is not such a write: it only makes the
//! tables grant more.

use std::collections::HashMap;
use std::os::fd::AsRawFd;

use crate::{GuestRam, RamError, Window, PAGE_SIZE};

/// One shadow window and what is mapped in it.
pub(crate) struct Shadow {
    window: Window,
    /// For each physical page mapped into the shadow, the linear pages
    /// that map it (to write-protect them with the physical page).
    aliases: HashMap<u32, Vec<u32>>,
    /// For each linear page mapped into the shadow, its physical page and
    /// what translated code may do there.
    shadow_of: HashMap<u32, (u32, Access)>,
    /// The page-delta table of checked stores (see
    /// [`GuestRam::page_deltas`]), made on first use: an entry only for a
    /// page mapped here whose guest entry lets it be written without a
    /// fault or a dirty-bit update, cleared whenever its mapping changes.
    deltas: Option<memmap2::MmapMut>,
    /// Linear pages made read-only here while another shadow ran (their
    /// entry says [`Access::Read`]) whose host protection is still
    /// read-write: made so before this shadow runs again
    /// ([`GuestRam::set_running_shadow`]).
    deferred: Vec<u32>,
}

/// What translated code may do on a page mapped into a shadow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Nothing: mapped, but revoked until the next access faults
    /// ([`GuestRam::shadow_revoke`]).
    Revoked,
    /// Read.
    Read,
    /// Read and write.
    Write,
}

impl Access {
    fn prot(self) -> i32 {
        match self {
            Access::Revoked => libc::PROT_NONE,
            Access::Read => libc::PROT_READ,
            Access::Write => libc::PROT_READ | libc::PROT_WRITE,
        }
    }
}

impl Shadow {
    /// The page-delta table, if there is one.
    pub(crate) fn deltas(&self) -> Option<*const u8> {
        self.deltas.as_ref().map(|t| t.as_ptr())
    }

    /// No checked store goes to linear page `lin` without the helper.
    fn clear_delta(&mut self, lin: u32) {
        if let Some(t) = self.deltas.as_mut() {
            crate::delta_entry(t, lin).fill(0);
        }
    }

    /// Give the pages [`Shadow::deferred`] lists the protection their
    /// entries say (read-only where they still say so: a page unmapped,
    /// revoked or mapped anew since has the protection that set), in runs
    /// of neighbouring pages (one host call each).
    fn apply_deferred(&mut self) -> Result<(), RamError> {
        if self.deferred.is_empty() {
            return Ok(());
        }
        let mut pages = std::mem::take(&mut self.deferred);
        pages.sort_unstable();
        pages.dedup();
        pages.retain(|lin| self.shadow_of.get(lin).is_some_and(|e| e.1 == Access::Read));
        let mut k = 0;
        while k < pages.len() {
            let first = pages[k];
            let mut n = 1;
            while k + n < pages.len() && pages[k + n] == first + n as u32 {
                n += 1;
            }
            if let Err(e) = self.mprotect(first, n as u32, Access::Read) {
                // (Still to do: translated code must not run here.)
                self.deferred.extend_from_slice(&pages[k..]);
                return Err(e);
            }
            k += n;
        }
        Ok(())
    }

    /// The host protection of `count` mapped pages from `lin`.
    fn mprotect(&mut self, lin: u32, count: u32, access: Access) -> Result<(), RamError> {
        // SAFETY: the pages lie inside the shadow reservation, which
        // `self.window` owns (linear pages are below 2^20); changing their
        // protection affects only translated code's accesses.
        let r = unsafe {
            libc::mprotect(
                self.window.at((lin * PAGE_SIZE) as usize).cast(),
                (count * PAGE_SIZE) as usize,
                access.prot(),
            )
        };
        if r != 0 {
            return Err(RamError(format!(
                "cannot change the protection of linear page {:#010x} in a shadow: {}",
                lin * PAGE_SIZE,
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    fn forget(&mut self, lin: u32) {
        self.clear_delta(lin);
        if let Some((phys, _)) = self.shadow_of.remove(&lin) {
            if let Some(list) = self.aliases.get_mut(&phys) {
                list.retain(|&l| l != lin);
            }
        }
    }

    /// Change the protection of one mapped page.
    fn protect(&mut self, lin: u32, access: Access) -> Result<(), RamError> {
        self.clear_delta(lin);
        self.mprotect(lin, 1, access)?;
        if let Some(e) = self.shadow_of.get_mut(&lin) {
            e.1 = access;
        }
        Ok(())
    }
}

impl GuestRam {
    /// Shadow window `space`, created on first use (every page
    /// `PROT_NONE`).
    pub fn shadow(&mut self, space: usize) -> Result<&Window, RamError> {
        if self.shadows.len() <= space {
            self.shadows.resize_with(space + 1, || None);
        }
        if self.shadows[space].is_none() {
            // The window at host address 0, if asked for and no other
            // shadow holds it.
            let low = self.low_shadow
                && !self
                    .shadows
                    .iter()
                    .flatten()
                    .any(|s| s.window.base().is_null());
            let window = match low.then(Window::reserve_low).flatten() {
                Some(w) => w,
                None => Window::reserve()?,
            };
            self.shadows[space] = Some(Shadow {
                window,
                aliases: HashMap::new(),
                shadow_of: HashMap::new(),
                deltas: None,
                deferred: Vec::new(),
            });
        }
        Ok(&self.shadows[space].as_ref().expect("created above").window)
    }

    /// Let the next shadow window made sit at host address 0 if the host
    /// has that range free and no other shadow holds it (see [`Window`]):
    /// for a guest whose one address space runs nearly all the time (a
    /// Linux process). Guest pages below the host's lowest mappable
    /// address are then never mapped in that shadow (a guest that uses
    /// one is moved: [`GuestRam::shadow_leave_low`]).
    pub fn set_low_shadow(&mut self, on: bool) {
        self.low_shadow = on;
    }

    /// Move shadow `space` from host address 0 to a window anywhere,
    /// emptied (every page is mapped anew on its next use), and give the
    /// low window to no shadow of this RAM again: for a guest that maps
    /// and uses pages below that window's floor. False if the shadow was
    /// not at host address 0 or no other window could be reserved.
    pub fn shadow_leave_low(&mut self, space: usize) -> bool {
        self.low_shadow = false;
        let Some(Some(s)) = self.shadows.get_mut(space) else {
            return false;
        };
        if !s.window.base().is_null() {
            return false;
        }
        let Ok(window) = Window::reserve() else {
            return false;
        };
        s.window = window;
        s.aliases.clear();
        s.shadow_of.clear();
        s.deltas = None;
        s.deferred.clear();
        true
    }

    /// The physical page linear page `lin` maps in shadow `space`, and
    /// what translated code may do there, if it is mapped.
    pub fn shadow_entry(&self, space: usize, lin: u32) -> Option<(u32, Access)> {
        match self.shadows.get(space) {
            Some(Some(s)) => s.shadow_of.get(&lin).copied(),
            _ => None,
        }
    }

    /// Let checked stores to linear page `lin` of shadow `space` go to
    /// physical page `phys` (see [`GuestRam::page_deltas`]): the caller
    /// has found the page mapped here to `phys`, and the guest's entry
    /// letting it be written without a fault or a dirty-bit update. The
    /// entry goes when the mapping changes ([`GuestRam::shadow_unmap`],
    /// revoking, reprotecting) or with [`GuestRam::shadow_clear_delta`].
    /// False if there is no such mapping or no table could be made.
    pub fn shadow_set_delta(&mut self, space: usize, lin: u32, phys: u32) -> bool {
        let Some(Some(s)) = self.shadows.get_mut(space) else {
            return false;
        };
        if !s
            .shadow_of
            .get(&lin)
            .is_some_and(|&(p, a)| p == phys && a != Access::Revoked)
        {
            return false;
        }
        if s.deltas.is_none() {
            match crate::delta_table() {
                Ok(t) => s.deltas = Some(t),
                Err(_) => return false,
            }
        }
        let delta =
            u64::from(phys.wrapping_sub(lin).wrapping_mul(PAGE_SIZE)) | crate::DELTA_PRESENT;
        let t = s.deltas.as_mut().expect("made above");
        crate::delta_entry(t, lin).copy_from_slice(&delta.to_le_bytes());
        true
    }

    /// Checked stores to linear page `lin` of shadow `space` go to the
    /// helper again (its guest entry was written).
    pub fn shadow_clear_delta(&mut self, space: usize, lin: u32) {
        if let Some(Some(s)) = self.shadows.get_mut(space) {
            s.clear_delta(lin);
        }
    }

    /// The physical page linear page `lin` maps in shadow `space`, if it
    /// is mapped and not revoked.
    pub fn shadow_page(&self, space: usize, lin: u32) -> Option<u32> {
        self.shadow_entry(space, lin)
            .filter(|e| e.1 != Access::Revoked)
            .map(|e| e.0)
    }

    /// Revoke linear page `lin` of shadow `space` (every access faults)
    /// but keep its mapping, so [`GuestRam::shadow_reprotect`] can grant
    /// access again without mapping it anew: for a page-table entry that
    /// still maps the same physical page (an accessed or dirty bit
    /// cleared, rights changed). False when the page is not mapped.
    pub fn shadow_revoke(&mut self, space: usize, lin: u32) -> Result<bool, RamError> {
        let Some(Some(s)) = self.shadows.get_mut(space) else {
            return Ok(false);
        };
        match s.shadow_of.get(&lin) {
            None => Ok(false),
            // (Revoked already: nothing for the host to do.)
            Some((_, Access::Revoked)) => Ok(true),
            Some(_) => {
                s.protect(lin, Access::Revoked)?;
                Ok(true)
            }
        }
    }

    /// Grant access to mapped linear page `lin` of shadow `space` again:
    /// read, and write too if `writable` and its physical page is not
    /// watched. False when the page is not mapped or the host refused.
    pub fn shadow_reprotect(&mut self, space: usize, lin: u32, writable: bool) -> bool {
        let Some((phys, _)) = self.shadow_entry(space, lin) else {
            return false;
        };
        let access = if writable && self.writable(phys) {
            Access::Write
        } else {
            Access::Read
        };
        match self.shadows.get_mut(space) {
            Some(Some(s)) => s.protect(lin, access).is_ok(),
            _ => false,
        }
    }

    /// Map linear page `lin` to physical page `phys` in shadow `space`,
    /// read-only unless `writable` (and the physical page is not watched).
    /// False when `phys` is not RAM or there is no such shadow.
    pub fn shadow_map(&mut self, space: usize, lin: u32, phys: u32, writable: bool) -> bool {
        self.shadow_map_run(space, lin, phys, 1, writable)
    }

    /// Map `count` linear pages from `lin` to the physical pages from
    /// `phys` in shadow `space`, in as few host calls as the pages'
    /// sources allow: read-only unless `writable`; pages whose writes need
    /// attention (watched, backed by a snapshot file, logged clean)
    /// read-only in any case. Pages below the window's floor
    /// ([`Window::floor_page`]) are left out. False (and nothing mapped)
    /// when the physical pages are not all RAM, all of them are below the
    /// floor, or there is no such shadow.
    pub fn shadow_map_run(
        &mut self,
        space: usize,
        lin: u32,
        phys: u32,
        count: u32,
        writable: bool,
    ) -> bool {
        let pages = self.size / PAGE_SIZE;
        if count == 0
            || phys >= pages
            || count > pages - phys
            || u64::from(lin) + u64::from(count) > 1 << 20
        {
            return false;
        }
        // (Pages below the window's floor are never mapped: translated
        // code's accesses there always fault.)
        let Some(Some(s)) = self.shadows.get(space) else {
            return false;
        };
        let (first, count) = s.window.clip(lin, count);
        if count == 0 {
            return false;
        }
        let (lin, phys) = (first, phys + (first - lin));
        // Where each page comes from (the memfd, or the snapshot file that
        // still backs it) and whether translated code may write it: one
        // host call per stretch that agrees on both.
        let memfd = self.fd.as_raw_fd();
        let plan: Vec<(i32, i64, bool)> = (phys..phys + count)
            .map(|p| {
                let (fd, off) = self
                    .backing
                    .source_of(p)
                    .unwrap_or((memfd, i64::from(p) * i64::from(PAGE_SIZE)));
                (fd, off, writable && self.writable(p))
            })
            .collect();
        let Some(Some(s)) = self.shadows.get_mut(space) else {
            return false;
        };
        let at = |l: u32| s.window.at((l * PAGE_SIZE) as usize);
        let mut i = 0;
        while i < count {
            let (fd, off, w) = plan[i as usize];
            let mut n = 1;
            while i + n < count
                && plan[(i + n) as usize] == (fd, off + i64::from(n) * i64::from(PAGE_SIZE), w)
            {
                n += 1;
            }
            let prot = libc::PROT_READ | if w { libc::PROT_WRITE } else { 0 };
            // SAFETY: MAP_FIXED replaces `n` pages inside the shadow
            // reservation, which `s.window` owns; the memfd (or the file
            // backing them) holds the physical pages (checked above), so
            // the mapping aliases guest RAM only.
            let r = unsafe {
                libc::mmap(
                    at(lin + i).cast(),
                    (n * PAGE_SIZE) as usize,
                    prot,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    fd,
                    off,
                )
            };
            if r == libc::MAP_FAILED {
                // Take back what was mapped of the run.
                let _ = s.window.clear(lin, count);
                for l in lin..lin + count {
                    s.forget(l);
                }
                return false;
            }
            i += n;
        }
        for i in 0..count {
            s.forget(lin + i);
            let access = if plan[i as usize].2 {
                Access::Write
            } else {
                Access::Read
            };
            s.shadow_of.insert(lin + i, (phys + i, access));
            s.aliases.entry(phys + i).or_default().push(lin + i);
        }
        true
    }

    /// Make every writable page of every shadow read-only (the dirty log
    /// starting).
    pub(crate) fn readonly_aliases(&mut self) -> Result<(), RamError> {
        for s in self.shadows.iter_mut().flatten() {
            s.deltas = None;
            let writable: Vec<u32> = s
                .shadow_of
                .iter()
                .filter(|(_, e)| e.1 == Access::Write)
                .map(|(&l, _)| l)
                .collect();
            for lin in writable {
                s.protect(lin, Access::Read)?;
            }
        }
        Ok(())
    }

    /// Drop every mapping of shadow `space` (every linear page `PROT_NONE`
    /// again).
    pub fn shadow_reset(&mut self, space: usize) -> Result<(), RamError> {
        match self.shadows.get_mut(space) {
            Some(Some(s)) => {
                s.aliases.clear();
                s.shadow_of.clear();
                s.deltas = None;
                s.deferred.clear();
                s.window.clear(0, 1 << 20)
            }
            _ => Ok(()),
        }
    }

    /// Drop the mappings of `count` linear pages from `first` in shadow
    /// `space` (they are `PROT_NONE` again and are mapped anew on their
    /// next use): what a TLB does for INVLPG, and what a changed
    /// page-table entry requires. One host call for the whole range.
    pub fn shadow_unmap(&mut self, space: usize, first: u32, count: u32) -> Result<(), RamError> {
        let Some(Some(s)) = self.shadows.get_mut(space) else {
            return Ok(());
        };
        // (Pages below the window's floor are never mapped.)
        let (first, count) = s.window.clip(first, count);
        if count == 0 {
            return Ok(());
        }
        for lin in first..first.saturating_add(count) {
            s.forget(lin);
        }
        s.window.clear(first, count)
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

    /// The shadow translated code runs on from now (None: none, or not
    /// known), until the next call: pages of the others made read-only are
    /// made so on the host only when each runs again (a kernel's code page
    /// watched for the first time has a writable alias in every process's
    /// shadow that touched it: one host call each, which the Linux boot's
    /// translations paid, against one for the running shadow now and runs
    /// of neighbouring pages for each other shadow when it next runs, if
    /// it is not reset first). This shadow's pages deferred so are made
    /// read-only here.
    pub fn set_running_shadow(&mut self, space: Option<usize>) -> Result<(), RamError> {
        self.running_shadow = space;
        match space.and_then(|i| self.shadows.get_mut(i)) {
            Some(Some(s)) => s.apply_deferred(),
            _ => Ok(()),
        }
    }

    /// Make the shadow aliases of a physical page read-only, or (when it
    /// may be writable again) drop them, to be mapped again with the guest
    /// tables' rights on their next use; in every shadow (on the host at
    /// once in the running one, see [`GuestRam::set_running_shadow`]).
    pub(crate) fn protect_aliases(&mut self, phys: u32, writable: bool) -> Result<(), RamError> {
        let running = self.running_shadow;
        for (i, s) in self.shadows.iter_mut().enumerate() {
            let Some(s) = s else { continue };
            let Some(list) = s.aliases.get(&phys) else {
                continue;
            };
            let defer = running.is_some_and(|r| r != i);
            for lin in list.clone() {
                if writable {
                    s.window.clear(lin, 1)?;
                } else if s.shadow_of.get(&lin).is_some_and(|e| e.1 == Access::Write) {
                    // (A revoked page stays revoked: its next access must
                    // fault, to set the accessed bit.)
                    if defer {
                        s.clear_delta(lin);
                        if let Some(e) = s.shadow_of.get_mut(&lin) {
                            e.1 = Access::Read;
                        }
                        s.deferred.push(lin);
                    } else {
                        s.protect(lin, Access::Read)?;
                    }
                }
            }
            if writable {
                if let Some(list) = s.aliases.remove(&phys) {
                    for lin in list {
                        s.shadow_of.remove(&lin);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use crate::GuestRam;

    fn read(base: *mut u8, at: u32) -> u32 {
        let p = (base as usize + at as usize) as *const u32;
        // SAFETY: callers read pages the test mapped into the shadow.
        unsafe { std::ptr::read_unaligned(p) }
    }

    #[test]
    fn shadow_pages_alias_ram_and_table_writes_are_recorded() {
        let mut ram = GuestRam::new(0x10000).unwrap();
        ram.write(0x3010, 4, 0x1234_5678);
        let base = ram.shadow(0).unwrap().base();
        assert!(ram.shadow_map(0, 0x80000, 3, true));
        assert_eq!(read(base, 0x8000_0010), 0x1234_5678);
        // A write through the shadow shows in RAM.
        // SAFETY: the page was mapped writable just above.
        unsafe { std::ptr::write_unaligned(base.add(0x8000_0020).cast::<u32>(), 0xCAFE) };
        assert_eq!(ram.read(0x3020, 4), 0xCAFE);
        assert!(!ram.shadow_map(0, 0x80001, 0x10, true), "beyond RAM");
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
        ram.shadow_reset(0).unwrap();
    }

    /// The host's protection of the page at `addr` ("rw-s", "---s", ...),
    /// from /proc/self/maps.
    pub(crate) fn host_prot(addr: usize) -> String {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        for l in maps.lines() {
            let mut f = l.split_whitespace();
            let range = f.next().unwrap();
            let (a, b) = range.split_once('-').unwrap();
            let (a, b) = (
                usize::from_str_radix(a, 16).unwrap(),
                usize::from_str_radix(b, 16).unwrap(),
            );
            if (a..b).contains(&addr) {
                return f.next().unwrap().to_string();
            }
        }
        String::new()
    }

    /// A revoked page keeps its mapping but grants nothing, whatever
    /// happens to the protection of its physical page, until it is
    /// reprotected; reprotecting never makes a watched page writable.
    #[test]
    fn revoked_pages_stay_revoked_until_reprotected() {
        use crate::Access;
        let mut ram = GuestRam::new(0x10000).unwrap();
        let base = ram.shadow(0).unwrap().base() as usize;
        let at = |lin: usize| base + (lin << 12);
        assert!(ram.shadow_map_run(0, 0x80000, 2, 3, true));
        assert_eq!(ram.shadow_entry(0, 0x80001), Some((3, Access::Write)));
        assert!(ram.shadow_revoke(0, 0x80001).unwrap());
        assert!(!ram.shadow_revoke(0, 0x90000).unwrap(), "not mapped");
        assert_eq!(ram.shadow_page(0, 0x80001), None);
        assert_eq!(host_prot(at(0x80001)), "---s");
        // Watching its page write-protects the other aliases only.
        ram.watch_page(3).unwrap();
        assert_eq!(ram.shadow_entry(0, 0x80001), Some((3, Access::Revoked)));
        assert_eq!(host_prot(at(0x80001)), "---s");
        ram.watch_page(2).unwrap();
        assert_eq!(ram.shadow_entry(0, 0x80000), Some((2, Access::Read)));
        assert_eq!(host_prot(at(0x80000)), "r--s");
        assert!(ram.shadow_reprotect(0, 0x80001, true));
        assert_eq!(ram.shadow_entry(0, 0x80001), Some((3, Access::Read)));
        assert_eq!(host_prot(at(0x80001)), "r--s");
        // Unwatching drops the aliases (mapped again on their next use).
        ram.unwatch_page(3).unwrap();
        assert_eq!(ram.shadow_entry(0, 0x80001), None);
        assert!(!ram.shadow_reprotect(0, 0x80001, true));
        ram.shadow_reset(0).unwrap();
    }

    /// A page watched while another shadow runs is read-only at once in
    /// the running shadow and, in the others, by the time each runs again
    /// (their entries say read-only at once); an alias unmapped, revoked
    /// or unwatched in between keeps what that made of it.
    #[test]
    fn other_shadows_are_protected_before_they_run() {
        use crate::Access;
        let mut ram = GuestRam::new(0x10000).unwrap();
        let b0 = ram.shadow(0).unwrap().base() as usize;
        let b1 = ram.shadow(1).unwrap().base() as usize;
        for space in [0, 1] {
            assert!(ram.shadow_map_run(space, 0x80000, 2, 4, true));
        }
        ram.set_running_shadow(Some(0)).unwrap();
        ram.watch_page(2).unwrap();
        assert_eq!(host_prot(b0 + (0x80000 << 12)), "r--s");
        assert_eq!(ram.shadow_entry(1, 0x80000), Some((2, Access::Read)));
        assert_eq!(host_prot(b1 + (0x80000 << 12)), "rw-s", "deferred");
        // Revoked, or unwatched, before shadow 1 runs: left so.
        ram.watch_page(3).unwrap();
        ram.watch_page(4).unwrap();
        assert!(ram.shadow_revoke(1, 0x80001).unwrap());
        ram.unwatch_page(4).unwrap();
        assert_eq!(ram.shadow_entry(1, 0x80002), None);
        ram.set_running_shadow(Some(1)).unwrap();
        assert_eq!(host_prot(b1 + (0x80000 << 12)), "r--s");
        assert_eq!(host_prot(b1 + (0x80001 << 12)), "---s");
        assert_eq!(
            host_prot(b1 + (0x80002 << 12)),
            host_prot(b1 + (0x90000 << 12))
        );
        assert_eq!(host_prot(b1 + (0x80003 << 12)), "rw-s", "not watched");
        // With none running, every shadow at once.
        ram.set_running_shadow(None).unwrap();
        ram.watch_page(5).unwrap();
        assert_eq!(host_prot(b0 + (0x80003 << 12)), "r--s");
        assert_eq!(host_prot(b1 + (0x80003 << 12)), "r--s");
        for space in [0, 1] {
            ram.shadow_reset(space).unwrap();
        }
    }

    /// A shadow asked to sit at host address 0 does (the test process has
    /// nothing mapped in its low 4 GiB), one at a time: linear address `a`
    /// is host address `a`, pages below the host's lowest mappable address
    /// (and page 0 in any case) are never mapped, and the range is free
    /// again once the window goes.
    #[test]
    fn one_shadow_sits_at_host_address_zero() {
        use crate::Access;
        let mut ram = GuestRam::new(0x10000).unwrap();
        ram.set_low_shadow(true);
        assert!(ram.shadow(0).unwrap().base().is_null());
        assert!(!ram.shadow(1).unwrap().base().is_null(), "only one");
        let floor = ram.shadow(0).unwrap().floor_page();
        let min: usize = std::fs::read_to_string("/proc/sys/vm/mmap_min_addr")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(floor as usize, min.div_ceil(4096).max(1));
        // A run across the floor maps the pages from the floor on.
        assert!(ram.shadow_map_run(0, floor - 1, 2, 2, true));
        assert_eq!(ram.shadow_entry(0, floor - 1), None);
        assert!(!ram.shadow_map(0, floor - 1, 2, true), "below the floor");
        let phys = 3;
        assert_eq!(ram.shadow_entry(0, floor), Some((phys, Access::Write)));
        ram.write(phys * 4096 + 8, 4, 0x1234_5678);
        assert_eq!(read(std::ptr::null_mut(), floor * 4096 + 8), 0x1234_5678);
        assert_eq!(host_prot(floor as usize * 4096), "rw-s");
        // Unmapping a range from 0 leaves below the floor alone.
        ram.shadow_unmap(0, 0, floor + 1).unwrap();
        assert_eq!(ram.shadow_entry(0, floor), None);
        assert_eq!(host_prot(floor as usize * 4096), "---p");
        // Moved to a window anywhere: page 0 maps, and no shadow of this
        // RAM takes the low window again.
        assert!(ram.shadow_map(0, floor, 2, true));
        assert!(ram.shadow_leave_low(0));
        assert!(!ram.shadow(0).unwrap().base().is_null());
        assert_eq!(ram.shadow_entry(0, floor), None, "emptied");
        assert_eq!(ram.shadow(0).unwrap().floor_page(), 0);
        assert!(ram.shadow_map(0, 0, 2, true));
        assert!(!ram.shadow_leave_low(0), "not at 0 any more");
        assert!(!ram.shadow(2).unwrap().base().is_null());
        drop(ram);
        let mut ram = GuestRam::new(0x10000).unwrap();
        ram.set_low_shadow(true);
        assert!(ram.shadow(0).unwrap().base().is_null(), "free again");
    }
}
