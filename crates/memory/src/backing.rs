//! Guest RAM backed by snapshot files, and the dirty log.
//!
//! **Backing.** A machine resumed from a snapshot does not copy the
//! snapshot's memory: each stored page is mapped straight from the file,
//! read-only and `MAP_SHARED`, into the host's view, the window and the
//! shadows. Every process that resumes the same file shares those pages
//! through the host's page cache, so N clones of a guest cost about one
//! guest's RAM plus what each one writes. A page is copied into the
//! machine's own RAM (the memfd) on its first write, and its mappings are
//! switched over: copy-on-write done by popek rather than by the kernel,
//! because guest RAM must be mapped several times (window, shadows) and a
//! private file mapping cannot be aliased.
//!
//! **Dirty log.** While the log runs, every page it holds clean is
//! read-only to translated code, exactly as a watched code page is
//! ([`GuestRam::watch_page`]); the first write to it, from host code or
//! from the interpreter redoing a faulting store, marks it dirty and makes
//! it writable again. Diff snapshots and live migration read the log.
//!
//! Both feed one per-page bit, [`GuestRam`]'s `attention`, which is what
//! the write path tests.
//!
//! **Linked pages.** A page may instead be mapped from a file *writable*
//! ([`GuestRam::link_page`]): a Linux process's `MAP_SHARED` mapping of a
//! file, or of a memfd standing for shared anonymous memory. Every view
//! (host, window, shadows) maps the file's page, so the guest's stores go
//! to the host's page cache, coherent with the file's readers and writers
//! and with other processes mapping it; a fork keeps the page linked in
//! both (its copy of RAM leaves it out) instead of copying it.

use std::fs::File;
use std::os::fd::AsRawFd;

use crate::{bit, set_bit, GuestRam, RamError, PAGE_SIZE};

/// Where the pages of a snapshot file go: `count` guest pages from
/// `first` hold the file's bytes from `offset` (a multiple of the page
/// size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backing {
    /// The first guest physical page.
    pub first: u32,
    /// How many pages.
    pub count: u32,
    /// Byte offset in the file.
    pub offset: u64,
}

/// The backing and dirty-log state of guest RAM.
pub(crate) struct State {
    /// Files pages are mapped from (kept open for the shadows' mappings).
    files: Vec<File>,
    /// One bit per page: still mapped from a file (read-only everywhere).
    shared: Vec<u64>,
    /// For each page, the file index and the file page it is mapped from
    /// (meaningful where `shared` is set; empty until a file backs RAM).
    source: Vec<(u32, u32)>,
    /// Is the dirty log running?
    logging: bool,
    /// One bit per page: clean since the log started (read-only).
    clean: Vec<u64>,
    /// One bit per page: written since the log started.
    dirty: Vec<u64>,
    /// Pages copied out of a file on their first write.
    pub(crate) copied: u64,
    /// One bit per page: copied out of a file at least once (a page that
    /// is written after sharing: not worth sharing again).
    broken: Vec<u64>,
    /// Pages given back to the host.
    pub(crate) released: u64,
    /// One bit per page: linked to a file page, writable (see the module's
    /// notes); its file page in `source`.
    linked: Vec<u64>,
}

impl State {
    pub(crate) fn new(pages: usize) -> State {
        State {
            files: Vec::new(),
            shared: vec![0; pages.div_ceil(64)],
            source: Vec::new(),
            logging: false,
            clean: vec![0; pages.div_ceil(64)],
            dirty: vec![0; pages.div_ceil(64)],
            copied: 0,
            broken: vec![0; pages.div_ceil(64)],
            released: 0,
            linked: vec![0; pages.div_ceil(64)],
        }
    }

    /// Does a write to the page need more than the store?
    pub(crate) fn needs_attention(&self, page: u32) -> bool {
        bit(&self.shared, page) || bit(&self.clean, page)
    }

    /// The file and byte offset page `page` is mapped from, if any.
    pub(crate) fn source_of(&self, page: u32) -> Option<(i32, i64)> {
        if !bit(&self.shared, page) && !bit(&self.linked, page) {
            return None;
        }
        let (f, fp) = self.source[page as usize];
        Some((
            self.files[f as usize].as_raw_fd(),
            i64::from(fp) * i64::from(PAGE_SIZE),
        ))
    }
}

/// `mmap` with `MAP_FIXED` over `[at, at+len)`, which the caller owns.
///
/// # Safety
///
/// `[at, at+len)` must lie inside a mapping the caller owns and that no
/// Rust reference covers while it is replaced.
unsafe fn map_fixed(
    at: *mut u8,
    len: usize,
    prot: i32,
    fd: i32,
    offset: i64,
) -> Result<(), RamError> {
    // SAFETY: the caller's contract; MAP_FIXED replaces exactly that range.
    let r = unsafe {
        libc::mmap(
            at.cast(),
            len,
            prot,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd,
            offset,
        )
    };
    if r == libc::MAP_FAILED {
        return Err(RamError(format!(
            "cannot map guest RAM ({len} bytes): {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

impl GuestRam {
    /// Back guest pages with the pages of `file` (a snapshot's memory
    /// image), read-only and shared with every other process that maps
    /// the same file, until each page's first write copies it. For fresh
    /// RAM only: before the window exists and before anything else backs
    /// or watches the pages.
    pub fn back_with(&mut self, file: &File, runs: &[Backing]) -> Result<(), RamError> {
        let pages = self.size / PAGE_SIZE;
        if self.window.is_some() || self.shadows.iter().any(Option::is_some) {
            return Err(RamError(
                "guest RAM is in use: it cannot be backed by a file".into(),
            ));
        }
        let file = file
            .try_clone()
            .map_err(|e| RamError(format!("cannot keep the snapshot file open: {e}")))?;
        let index = self.backing.files.len() as u32;
        let fd = file.as_raw_fd();
        self.backing.files.push(file);
        if self.backing.source.is_empty() {
            self.backing.source = vec![(0, 0); pages as usize];
        }
        for r in runs {
            if r.count == 0 {
                continue;
            }
            if r.first >= pages
                || r.count > pages - r.first
                || r.offset % u64::from(PAGE_SIZE) != 0
                || r.offset / u64::from(PAGE_SIZE) + u64::from(r.count) > u64::from(u32::MAX)
            {
                return Err(RamError(format!(
                    "a snapshot run of {} pages at page {:#x} does not fit guest RAM",
                    r.count, r.first
                )));
            }
            let at = (r.first * PAGE_SIZE) as usize;
            // SAFETY: the run lies inside the host view of RAM (checked
            // above), which `self.map` owns; no reference into it is held
            // (this method has `&mut self`).
            unsafe {
                map_fixed(
                    self.map.as_mut_ptr().add(at),
                    (r.count * PAGE_SIZE) as usize,
                    libc::PROT_READ,
                    fd,
                    r.offset as i64,
                )?;
            }
            let fp = (r.offset / u64::from(PAGE_SIZE)) as u32;
            for i in 0..r.count {
                set_bit(&mut self.backing.shared, r.first + i, true);
                self.backing.source[(r.first + i) as usize] = (index, fp + i);
                self.update_attention(r.first + i);
            }
        }
        Ok(())
    }

    /// Keep `file` open as a source of pages for [`GuestRam::share_page`];
    /// returns its index.
    pub fn register_backing(&mut self, file: &File) -> Result<u32, RamError> {
        let f = file
            .try_clone()
            .map_err(|e| RamError(format!("cannot keep a backing file open: {e}")))?;
        self.backing.files.push(f);
        if self.backing.source.is_empty() {
            self.backing.source = vec![(0, 0); (self.size / PAGE_SIZE) as usize];
        }
        Ok(self.backing.files.len() as u32 - 1)
    }

    /// Back a page of running RAM by page `file_page` of registered file
    /// `file` instead, read-only and shared with whoever else maps it, and
    /// free the machine's own copy: content-based page sharing. The caller
    /// has checked that the file page holds exactly the page's bytes. The
    /// first write copies it back out, as for snapshot-backed pages.
    pub fn share_page(&mut self, page: u32, file: u32, file_page: u32) -> Result<(), RamError> {
        if page >= self.size / PAGE_SIZE || bit(&self.backing.shared, page) {
            return Ok(());
        }
        let (fd, off) = self.file_page(file, file_page)?;
        let at = (page * PAGE_SIZE) as usize;
        // SAFETY: the page lies inside the host view, which `self.map`
        // owns; the file page holds the same bytes (the caller checked),
        // so nothing that reads the view sees a change.
        unsafe {
            map_fixed(
                self.map.as_mut_ptr().add(at),
                PAGE_SIZE as usize,
                libc::PROT_READ,
                fd,
                off,
            )?;
        }
        if let Some(w) = &self.window {
            // SAFETY: as above, inside the RAM part of the window.
            unsafe { map_fixed(w.at(at), PAGE_SIZE as usize, libc::PROT_READ, fd, off)? };
        }
        self.protect_aliases(page, true)?;
        set_bit(&mut self.backing.shared, page, true);
        self.backing.source[page as usize] = (file, file_page);
        self.update_attention(page);
        self.free_own_copy(page);
        Ok(())
    }

    /// The descriptor and byte offset of page `file_page` of registered
    /// file `file`.
    fn file_page(&self, file: u32, file_page: u32) -> Result<(i32, i64), RamError> {
        let Some(fd) = self.backing.files.get(file as usize).map(|f| f.as_raw_fd()) else {
            return Err(RamError("no such backing file".into()));
        };
        Ok((fd, i64::from(file_page) * i64::from(PAGE_SIZE)))
    }

    /// Free the memfd's copy of page `page`, which nothing maps any more
    /// (it reads as zeros when mapped again).
    fn free_own_copy(&self, page: u32) {
        // SAFETY: fallocate on the memfd this value owns; punching a hole
        // changes only the memfd's contents.
        unsafe {
            libc::fallocate(
                self.fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                i64::from(page * PAGE_SIZE),
                i64::from(PAGE_SIZE),
            );
        }
    }

    /// Map page `page` of RAM from page `file_page` of registered file
    /// `file` ([`GuestRam::register_backing`]), writable, in every view: a
    /// shared mapping's page (see the module's notes). The machine's own
    /// copy is freed. The file page must exist (a page past the end of the
    /// file would fault in popek's own accesses).
    pub fn link_page(&mut self, page: u32, file: u32, file_page: u32) -> Result<(), RamError> {
        if page >= self.size / PAGE_SIZE || bit(&self.backing.shared, page) {
            return Err(RamError(format!("page {page:#x} cannot be linked")));
        }
        let (fd, off) = self.file_page(file, file_page)?;
        let at = (page * PAGE_SIZE) as usize;
        // SAFETY: the page lies inside the host view, which `self.map`
        // owns; no reference into it is held (`&mut self`).
        unsafe {
            map_fixed(
                self.map.as_mut_ptr().add(at),
                PAGE_SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                fd,
                off,
            )?;
        }
        set_bit(&mut self.backing.linked, page, true);
        self.backing.source[page as usize] = (file, file_page);
        self.remap_in_window(page)?;
        self.protect_aliases(page, true)?;
        self.free_own_copy(page);
        Ok(())
    }

    /// Map a linked page from the machine's own memory again (its shared
    /// mapping went away): it reads as zeros.
    pub fn unlink_page(&mut self, page: u32) -> Result<(), RamError> {
        if !self.is_linked(page) {
            return Ok(());
        }
        let at = (page * PAGE_SIZE) as usize;
        let fd = self.fd.as_raw_fd();
        // SAFETY: as in `link_page`; the memfd's page was punched, so the
        // view shows zeros.
        unsafe {
            map_fixed(
                self.map.as_mut_ptr().add(at),
                PAGE_SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                fd,
                at as i64,
            )?;
        }
        set_bit(&mut self.backing.linked, page, false);
        self.remap_in_window(page)?;
        self.protect_aliases(page, true)
    }

    /// Is the page linked to a file page ([`GuestRam::link_page`])?
    pub fn is_linked(&self, page: u32) -> bool {
        bit(&self.backing.linked, page)
    }

    /// Map page `page` in the window (if there is one) from where it comes
    /// from now, with the rights its attention bit allows.
    fn remap_in_window(&mut self, page: u32) -> Result<(), RamError> {
        let Some(w) = &self.window else {
            return Ok(());
        };
        let at = (page * PAGE_SIZE) as usize;
        let (fd, off) = self
            .backing
            .source_of(page)
            .unwrap_or((self.fd.as_raw_fd(), at as i64));
        let prot = libc::PROT_READ
            | if self.writable(page) {
                libc::PROT_WRITE
            } else {
                0
            };
        // SAFETY: the page lies inside the RAM part of the window, which
        // `self.window` owns; only translated code reaches memory there.
        unsafe { map_fixed(w.at(at), PAGE_SIZE as usize, prot, fd, off) }
    }

    /// Free page `page` of a file of pages (a page-sharing store whose
    /// page no guest maps any more): it reads as zeros and costs no host
    /// memory. False if the file system cannot punch holes.
    pub fn punch_page(file: &File, page: u32) -> bool {
        // SAFETY: fallocate on a descriptor `file` keeps open; it changes
        // only the file's contents.
        let r = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                i64::from(page) * i64::from(PAGE_SIZE),
                i64::from(PAGE_SIZE),
            )
        };
        r == 0
    }

    /// Bytes of host memory the machine's own RAM holds now (the memfd's
    /// allocated blocks: pages shared from files or never touched cost
    /// nothing here).
    pub fn host_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let f = self.fd.try_clone().map(File::from);
        f.and_then(|f| f.metadata()).map_or(0, |m| m.blocks() * 512)
    }

    /// Was the page ever copied out of a file by a write (sharing it
    /// again would likely be broken again)?
    pub fn was_copied(&self, page: u32) -> bool {
        bit(&self.backing.broken, page)
    }

    /// Is the page backed by a file (a snapshot's, or shared)?
    pub fn is_shared(&self, page: u32) -> bool {
        bit(&self.backing.shared, page)
    }

    /// Pages mapped from a file (a snapshot's, or shared) and not yet
    /// written.
    pub fn shared_pages(&self) -> u64 {
        self.backing
            .shared
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// The pages that may hold something other than zeros, in order: those
    /// the host has memory for in the memfd (found with `SEEK_DATA` and
    /// `SEEK_HOLE`, so never-touched RAM is not read, which would make the
    /// host allocate it) and those mapped from snapshot files.
    pub fn maybe_nonzero_pages(&self) -> Vec<u32> {
        let pages = self.size / PAGE_SIZE;
        let mut present = self.backing.shared.clone();
        let fd = self.fd.as_raw_fd();
        let end = i64::from(self.size);
        let mut at = 0i64;
        while at < end {
            // SAFETY: lseek on a descriptor this value owns; it moves only
            // the file offset, which nothing else uses (mappings and pread
            // do not).
            let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
            if data < 0 {
                // ENXIO: no data after `at`. Any other error: assume data.
                if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                    return (0..pages).collect();
                }
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let hole = if hole < 0 { end } else { hole.min(end) };
            let first = (data / i64::from(PAGE_SIZE)) as u32;
            let last = ((hole + i64::from(PAGE_SIZE) - 1) / i64::from(PAGE_SIZE)) as u32;
            for p in first..last.min(pages) {
                set_bit(&mut present, p, true);
            }
            at = hole;
        }
        (0..pages).filter(|&p| bit(&present, p)).collect()
    }

    /// A copy of RAM's contents in a new memory file: made by a process
    /// about to fork (while nothing writes RAM), for the child to
    /// [`GuestRam::adopt`]. Only pages that may hold data are copied.
    pub fn duplicate(&self) -> Result<File, RamError> {
        use std::os::unix::fs::FileExt;
        let err = |e: std::io::Error| RamError(format!("cannot copy guest RAM: {e}"));
        let f = GuestRam::anonymous_file().map_err(err)?;
        f.set_len(u64::from(self.size)).map_err(err)?;
        // (Linked pages stay linked in the child: not copied.)
        let pages: Vec<u32> = self
            .maybe_nonzero_pages()
            .into_iter()
            .filter(|&p| !self.is_linked(p))
            .collect();
        let mut i = 0;
        while i < pages.len() {
            let first = pages[i];
            let mut n = 1;
            while i + n < pages.len() && pages[i + n] == first + n as u32 {
                n += 1;
            }
            let (a, b) = (
                (first * PAGE_SIZE) as usize,
                ((first + n as u32) * PAGE_SIZE) as usize,
            );
            f.write_all_at(&self.map[a..b], a as u64).map_err(err)?;
            i += n;
        }
        Ok(f)
    }

    /// Go on with `file` (a [`GuestRam::duplicate`] made before a fork) as
    /// this RAM's memory: the forked child's own copy, no longer shared
    /// with the parent, but for linked pages, which stay mapped from their
    /// files. The window and the shadows are dropped (made again on first
    /// use), watches and the dirty log forgotten: the engine that used them
    /// starts afresh.
    pub fn adopt(&mut self, file: File) -> Result<(), RamError> {
        let fd = file.as_raw_fd();
        // SAFETY: the host view, which `self.map` owns, is replaced by the
        // same range of `file`, which holds the same bytes; `file` is at
        // least `size` bytes long.
        unsafe {
            map_fixed(
                self.map.as_mut_ptr(),
                self.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                fd,
                0,
            )?;
        }
        self.fd = std::os::fd::OwnedFd::from(file);
        self.window = None;
        self.shadows.clear();
        self.watched.fill(0);
        self.pending.fill(0);
        self.writes.clear();
        self.attention.fill(0);
        self.clear_fast_all();
        let old = std::mem::replace(
            &mut self.backing,
            State::new((self.size / PAGE_SIZE) as usize),
        );
        if old.linked.iter().any(|&w| w != 0) {
            self.backing.files = old.files;
            self.backing.source = old.source;
            self.backing.linked = old.linked;
            self.relink_all()?;
        }
        Ok(())
    }

    /// Map every linked page from its file again, in the host view and the
    /// window (after a mapping of all of RAM replaced them).
    fn relink_all(&mut self) -> Result<(), RamError> {
        for p in 0..self.size / PAGE_SIZE {
            if !self.is_linked(p) {
                continue;
            }
            if let Some((fd, off)) = self.backing.source_of(p) {
                // SAFETY: one page of the host view, which `self.map` owns;
                // no reference into it is held (`&mut self`).
                unsafe {
                    map_fixed(
                        self.map.as_mut_ptr().add((p * PAGE_SIZE) as usize),
                        PAGE_SIZE as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        fd,
                        off,
                    )?;
                }
                self.remap_in_window(p)?;
            }
        }
        Ok(())
    }

    /// Pages copied out of a snapshot file on their first write.
    pub fn copied_pages(&self) -> u64 {
        self.backing.copied
    }

    /// Map the pages backed by files, and make every page whose writes need
    /// attention read-only, in a window just created (which maps the memfd).
    pub(crate) fn apply_backing_to_window(&mut self) -> Result<(), RamError> {
        let Some(w) = &self.window else {
            return Ok(());
        };
        let pages = self.size / PAGE_SIZE;
        let mut p = 0;
        while p < pages {
            if let Some((fd, off)) = self.backing.source_of(p) {
                // A run of pages contiguous in one file: one mapping.
                let mut n = 1;
                while p + n < pages
                    && self.backing.source_of(p + n)
                        == Some((fd, off + i64::from(n) * i64::from(PAGE_SIZE)))
                {
                    n += 1;
                }
                // (Linked pages writable, until the loop below.)
                let prot = if self.is_linked(p) {
                    libc::PROT_READ | libc::PROT_WRITE
                } else {
                    libc::PROT_READ
                };
                // SAFETY: the pages lie inside the RAM part of the window,
                // which `self.window` owns; only translated code reaches
                // memory through it.
                unsafe {
                    map_fixed(
                        w.at((p * PAGE_SIZE) as usize),
                        (n * PAGE_SIZE) as usize,
                        prot,
                        fd,
                        off,
                    )?;
                }
                p += n;
            } else {
                p += 1;
            }
        }
        // Every page whose writes need attention (watched, backed by a
        // file, logged clean) is read-only in the window, as `protect`
        // keeps it: one host call per run of such pages.
        let mut p = 0;
        while p < pages {
            if self.writable(p) {
                p += 1;
                continue;
            }
            let mut n = 1;
            while p + n < pages && !self.writable(p + n) {
                n += 1;
            }
            // SAFETY: the pages lie inside the RAM part of the window,
            // which `self.window` owns; read-only affects only translated
            // code's stores.
            let r = unsafe {
                libc::mprotect(
                    w.at((p * PAGE_SIZE) as usize).cast(),
                    (n * PAGE_SIZE) as usize,
                    libc::PROT_READ,
                )
            };
            if r != 0 {
                return Err(RamError(format!(
                    "cannot write-protect guest pages in a new window: {}",
                    std::io::Error::last_os_error()
                )));
            }
            p += n;
        }
        Ok(())
    }

    /// Before a write to `page`: copy it out of its file, mark it dirty.
    /// The page becomes writable to translated code unless it is watched.
    pub(crate) fn before_write(&mut self, page: u32) {
        let mut changed = false;
        if bit(&self.backing.shared, page) {
            if self.copy_out(page).is_err() {
                // The host would not map one more page (too many mappings):
                // copy every backed page at once instead.
                self.copy_out_all();
            }
            changed = true;
        }
        if bit(&self.backing.clean, page) {
            set_bit(&mut self.backing.clean, page, false);
            set_bit(&mut self.backing.dirty, page, true);
            changed = true;
        }
        if changed {
            self.update_attention(page);
            if self.writable(page) {
                // A failure leaves the page read-only: translated stores to
                // it keep faulting and are redone by the interpreter.
                let _ = self.protect(page, true);
            }
        }
    }

    /// Give a file-backed page its own copy in the memfd and point the
    /// host view and the window at it; its shadow aliases (mapped from the
    /// file) are dropped, to be mapped again on their next use.
    fn copy_out(&mut self, page: u32) -> Result<(), RamError> {
        let at = (page * PAGE_SIZE) as usize;
        let len = PAGE_SIZE as usize;
        let mut buf = vec![0u8; len];
        buf.copy_from_slice(&self.map[at..at + len]);
        let fd = self.fd.as_raw_fd();
        // SAFETY: the page lies inside the host view, which `self.map`
        // owns; `buf` holds a copy, no reference into the page is live.
        unsafe {
            map_fixed(
                self.map.as_mut_ptr().add(at),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                fd,
                at as i64,
            )?;
        }
        self.map[at..at + len].copy_from_slice(&buf);
        set_bit(&mut self.backing.shared, page, false);
        set_bit(&mut self.backing.broken, page, true);
        self.backing.copied += 1;
        if let Some(w) = &self.window {
            // SAFETY: the page lies inside the RAM part of the window,
            // which `self.window` owns. Read-only until the caller decides.
            let r = unsafe { map_fixed(w.at(at), len, libc::PROT_READ, fd, at as i64) };
            if r.is_err() {
                // The window still shows the file's page, which is what the
                // memfd holds now: stale only after the next write, so make
                // translated code stop using the window.
                return Err(RamError("cannot map a copied page into the window".into()));
            }
        }
        self.protect_aliases(page, true)
    }

    /// Copy every file-backed page into the memfd, with one mapping of
    /// all of RAM per view: the fallback when the host refuses more
    /// mappings.
    fn copy_out_all(&mut self) {
        use std::os::unix::fs::FileExt;
        let pages = self.size / PAGE_SIZE;
        let Ok(fd) = self.fd.try_clone() else {
            // No descriptor left to copy through: nothing sound remains (the
            // next write would fault in popek itself).
            eprintln!(
                "popek: cannot copy guest RAM out of its snapshot file: out of file descriptors"
            );
            std::process::exit(2);
        };
        let memfd = File::from(fd);
        for p in 0..pages {
            if bit(&self.backing.shared, p) {
                let at = (p * PAGE_SIZE) as usize;
                let _ = memfd.write_all_at(&self.map[at..at + PAGE_SIZE as usize], at as u64);
            }
        }
        let fd = self.fd.as_raw_fd();
        // SAFETY: the whole host view, which `self.map` owns; the memfd now
        // holds every page's content, so the view shows the same bytes.
        let host = unsafe {
            map_fixed(
                self.map.as_mut_ptr(),
                self.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                fd,
                0,
            )
        };
        if let Some(w) = &self.window {
            // SAFETY: the RAM part of the window, which `self.window` owns.
            let _ = unsafe { map_fixed(w.base(), self.size as usize, libc::PROT_READ, fd, 0) };
        }
        if host.is_err() || self.relink_all().is_err() {
            // Nothing sound is left to do: the view is the file's,
            // read-only, and the next write would fault in popek itself.
            eprintln!("popek: cannot map guest RAM over its own view: the host is out of mappings (vm.max_map_count)");
            std::process::exit(2);
        }
        for p in 0..pages {
            if bit(&self.backing.shared, p) {
                set_bit(&mut self.backing.shared, p, false);
                self.backing.copied += 1;
                let _ = self.protect_aliases(p, true);
            }
            self.update_attention(p);
            if self.writable(p) {
                let _ = self.protect(p, true);
            }
        }
    }

    /// Give page `page`'s memory back to the host (a balloon inflated over
    /// it): it reads as zeros from now on, and costs no host memory until
    /// it is written again. Counted as a write of the whole page (the
    /// write watch and the dirty log see it).
    pub fn release_page(&mut self, page: u32) {
        if page >= self.size / PAGE_SIZE {
            return;
        }
        self.note_write(page * PAGE_SIZE, PAGE_SIZE);
        // SAFETY: fallocate on the memfd this value owns; punching a hole
        // frees the page's memory, and every mapping of it reads zeros.
        let r = unsafe {
            libc::fallocate(
                self.fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                i64::from(page * PAGE_SIZE),
                i64::from(PAGE_SIZE),
            )
        };
        if r != 0 {
            // The host keeps the memory; the guest still sees zeros.
            let at = (page * PAGE_SIZE) as usize;
            self.map[at..at + PAGE_SIZE as usize].fill(0);
        } else {
            self.backing.released += 1;
        }
    }

    /// Pages given back to the host ([`GuestRam::release_page`]).
    pub fn released_pages(&self) -> u64 {
        self.backing.released
    }

    /// Start (or restart) the dirty log: every page is clean and read-only
    /// to translated code until its first write.
    pub fn start_dirty_log(&mut self) -> Result<(), RamError> {
        let pages = self.size / PAGE_SIZE;
        self.backing.logging = true;
        self.backing.dirty.fill(0);
        for p in 0..pages {
            set_bit(&mut self.backing.clean, p, true);
            self.update_attention(p);
        }
        if let Some(w) = &self.window {
            // SAFETY: the RAM part of the window, which `self.window` owns;
            // read-only affects only translated code's stores.
            let r = unsafe { libc::mprotect(w.base().cast(), self.size as usize, libc::PROT_READ) };
            if r != 0 {
                return Err(RamError(format!(
                    "cannot write-protect guest RAM for the dirty log: {}",
                    std::io::Error::last_os_error()
                )));
            }
        }
        self.readonly_aliases()
    }

    /// Stop the dirty log: pages are writable again unless watched or
    /// backed by a file.
    pub fn stop_dirty_log(&mut self) {
        let pages = self.size / PAGE_SIZE;
        self.backing.logging = false;
        for p in 0..pages {
            if bit(&self.backing.clean, p) {
                set_bit(&mut self.backing.clean, p, false);
                self.update_attention(p);
                if self.writable(p) {
                    let _ = self.protect(p, true);
                }
            }
        }
    }

    /// Is the dirty log running?
    pub fn dirty_logging(&self) -> bool {
        self.backing.logging
    }

    /// Has the page been written since the dirty log started?
    pub fn is_dirty(&self, page: u32) -> bool {
        bit(&self.backing.dirty, page)
    }

    /// The pages written since the dirty log started, in order.
    pub fn dirty_pages(&self) -> Vec<u32> {
        (0..self.size / PAGE_SIZE)
            .filter(|&p| bit(&self.backing.dirty, p))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shadow::tests::host_prot;
    use std::io::Write;

    /// A file of `pages` pages, page i filled with byte i + 1.
    fn image(pages: u32) -> File {
        let mut f = tempfile();
        for i in 0..pages {
            f.write_all(&[i as u8 + 1; PAGE_SIZE as usize]).unwrap();
        }
        f
    }

    fn tempfile() -> File {
        let path = std::env::temp_dir().join(format!(
            "popek-backing-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    /// Backed pages read the file, a write copies the page out (the file
    /// keeps its bytes), and the window and the shadows follow: read-only
    /// file pages before, the machine's own writable page after.
    #[test]
    fn backed_pages_are_copied_on_their_first_write() {
        let f = image(4);
        let mut ram = GuestRam::new(8 * PAGE_SIZE as u64).unwrap();
        let runs = [Backing {
            first: 2,
            count: 3,
            offset: u64::from(PAGE_SIZE),
        }];
        ram.back_with(&f, &runs).unwrap();
        assert_eq!(ram.shared_pages(), 3);
        assert_eq!(ram.read(0x2000, 1), 2, "page 2 holds file page 1");
        assert_eq!(ram.read(0x4FFF, 1), 4);
        assert_eq!(ram.read(0x1000, 1), 0, "unbacked pages are zero");
        let win = ram.window().unwrap().base() as usize;
        assert_eq!(host_prot(win + 0x3000), "r--s");
        assert_eq!(host_prot(win + 0x1000), "rw-s");
        let sh = ram.shadow(0).unwrap().base() as usize;
        assert!(ram.shadow_map_run(0, 0x100, 1, 3, true));
        assert_eq!(
            host_prot(sh + 0x100000),
            "rw-s",
            "an unbacked page: writable"
        );
        assert_eq!(host_prot(sh + 0x102000), "r--s", "a backed page: read-only");
        // SAFETY: the page was mapped into the shadow just above.
        assert_eq!(unsafe { *((sh + 0x102000) as *const u8) }, 3);
        ram.write(0x3010, 1, 0xAA);
        assert_eq!(ram.read(0x3010, 1), 0xAA);
        assert_eq!(ram.read(0x3011, 1), 3, "the rest of the page was copied");
        assert_eq!(ram.shared_pages(), 2);
        assert_eq!(ram.copied_pages(), 1);
        assert_eq!(host_prot(win + 0x3000), "rw-s");
        // SAFETY: the window maps all of RAM.
        assert_eq!(unsafe { *((win + 0x3010) as *const u8) }, 0xAA);
        assert_eq!(
            ram.shadow_entry(0, 0x102),
            None,
            "the file alias was dropped"
        );
        assert!(ram.shadow_map(0, 0x102, 3, true));
        assert_eq!(host_prot(sh + 0x102000), "rw-s");
        let mut b = [0u8; 2];
        use std::os::unix::fs::FileExt;
        f.read_exact_at(&mut b, 2 * u64::from(PAGE_SIZE) + 0x10)
            .unwrap();
        assert_eq!(b, [3, 3], "the file is never written");
        // Backed pages and pages the host has memory for (page 1 was read
        // above), not pages never touched.
        let pages = ram.maybe_nonzero_pages();
        assert!([1, 2, 3, 4].iter().all(|p| pages.contains(p)), "{pages:?}");
        assert!(!pages.contains(&7), "{pages:?}");
    }

    /// The dirty log write-protects every page until its first write, in
    /// the window and in the shadows, and names the pages written.
    #[test]
    fn the_dirty_log_names_written_pages() {
        let mut ram = GuestRam::new(8 * PAGE_SIZE as u64).unwrap();
        let win = ram.window().unwrap().base() as usize;
        let sh = ram.shadow(0).unwrap().base() as usize;
        assert!(ram.shadow_map_run(0, 0x10, 0, 8, true));
        ram.watch_page(5).unwrap();
        ram.start_dirty_log().unwrap();
        assert!(ram.dirty_logging());
        assert_eq!(host_prot(win + 0x2000), "r--s");
        assert_eq!(host_prot(sh + 0x12000), "r--s");
        ram.write(0x2004, 4, 1);
        ram.fill_within_page(0x5000, 8, 0, 1);
        assert_eq!(ram.dirty_pages(), vec![2, 5]);
        assert_eq!(host_prot(win + 0x2000), "rw-s");
        assert_eq!(host_prot(win + 0x5000), "r--s", "still watched");
        assert_eq!(host_prot(win + 0x3000), "r--s");
        assert_eq!(
            ram.take_watched_writes().len(),
            1,
            "the watch still records"
        );
        ram.start_dirty_log().unwrap();
        assert!(ram.dirty_pages().is_empty(), "a restart forgets");
        ram.stop_dirty_log();
        assert_eq!(host_prot(win + 0x3000), "rw-s");
        assert_eq!(host_prot(win + 0x5000), "r--s", "still watched");
    }

    /// Two machines share one page of a file (content-based sharing); a
    /// write gives the writer its own copy and leaves the other sharing.
    #[test]
    fn a_write_to_a_shared_page_breaks_sharing_for_the_writer_only() {
        let store = image(1); // one page of 1s
        let mut a = GuestRam::new(4 * PAGE_SIZE as u64).unwrap();
        let mut b = GuestRam::new(4 * PAGE_SIZE as u64).unwrap();
        for ram in [&mut a, &mut b] {
            ram.load(0x1000, &[1u8; 4096]);
            let wa = ram.window().unwrap().base() as usize;
            let f = ram.register_backing(&store).unwrap();
            ram.share_page(1, f, 0).unwrap();
            assert!(ram.is_shared(1));
            assert_eq!(host_prot(wa + 0x1000), "r--s");
            assert_eq!(ram.read(0x1ABC, 1), 1);
        }
        a.write(0x1000, 4, 0xDEAD_BEEF);
        assert!(!a.is_shared(1) && b.is_shared(1));
        assert_eq!(a.read(0x1000, 4), 0xDEAD_BEEF);
        assert_eq!(a.read(0x1004, 1), 1, "the rest was copied");
        assert_eq!(
            b.read(0x1000, 4),
            0x0101_0101,
            "the other machine still sees the store"
        );
        let mut x = [0u8; 4];
        use std::os::unix::fs::FileExt;
        store.read_exact_at(&mut x, 0).unwrap();
        assert_eq!(x, [1; 4], "the store is never written");
    }

    /// A linked page is the file's page in every view: stores through the
    /// host view, the window and a shadow reach the file, and the file's
    /// writes show in all three; a copy of RAM for a fork leaves it out
    /// and the adopting RAM links it again; unlinked, it reads as zeros and
    /// leaves the file alone.
    #[test]
    fn linked_pages_are_the_files_in_every_view() {
        use std::os::unix::fs::FileExt;
        let file = image(2);
        let mut ram = GuestRam::new(8 * PAGE_SIZE as u64).unwrap();
        let win = ram.window().unwrap().base() as usize;
        let sh = ram.shadow(0).unwrap().base() as usize;
        ram.load(0x3000, &[7u8; 4096]);
        let f = ram.register_backing(&file).unwrap();
        ram.link_page(3, f, 1).unwrap();
        assert!(ram.is_linked(3));
        assert_eq!(ram.read(0x3010, 1), 2, "file page 1 (of 2s)");
        assert!(ram.shadow_map_run(0, 0x10, 0, 8, true));
        assert_eq!(host_prot(win + 0x3000), "rw-s");
        assert_eq!(host_prot(sh + 0x13000), "rw-s");
        ram.write(0x3000, 1, 0xA1);
        // SAFETY: page 3 is mapped writable in the window and at linear
        // page 0x13 of the shadow (asserted above).
        unsafe {
            *((win + 0x3001) as *mut u8) = 0xA2;
            *((sh + 0x13002) as *mut u8) = 0xA3;
        }
        let mut x = [0u8; 4];
        file.read_exact_at(&mut x, u64::from(PAGE_SIZE)).unwrap();
        assert_eq!(x, [0xA1, 0xA2, 0xA3, 2], "every view's store is the file's");
        file.write_all_at(&[0x5A], u64::from(PAGE_SIZE) + 3)
            .unwrap();
        assert_eq!(ram.read(0x3003, 1), 0x5A, "the file's write shows");
        // A fork's copy of RAM: the linked page stays linked.
        let copy = ram.duplicate().unwrap();
        let mut other = [0u8; 1];
        copy.read_exact_at(&mut other, 0x3000).unwrap();
        assert_eq!(other, [0], "not copied");
        ram.adopt(copy).unwrap();
        assert!(ram.is_linked(3));
        ram.write(0x3004, 1, 0xB4);
        file.read_exact_at(&mut x, u64::from(PAGE_SIZE) + 4)
            .unwrap();
        assert_eq!(x[0], 0xB4, "still the file's after adopting");
        ram.unlink_page(3).unwrap();
        assert!(!ram.is_linked(3));
        assert_eq!(ram.read(0x3000, 4), 0, "the machine's own page again");
        ram.write(0x3000, 1, 0xCC);
        file.read_exact_at(&mut x, u64::from(PAGE_SIZE)).unwrap();
        assert_eq!(x[0], 0xA1, "the file no longer sees the page's stores");
    }
}
