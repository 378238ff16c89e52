//! Guest physical RAM.
//!
//! The guest sees a flat physical address space of 4 GiB. RAM occupies
//! `[0, size)`; everything above is unassigned: reads return all ones and
//! writes are dropped, as on a PC bus with nothing decoding the address
//! (QEMU behaves the same way for unassigned memory).
//!
//! RAM lives in a memfd (anonymous shared memory) so it can be mapped twice:
//! once by memmap2 as the host's view (the slice the interpreter and the
//! devices use), and on demand into a [`Window`]: a 4 GiB reservation plus
//! guard pages, RAM at its start and everything else `PROT_NONE`. Translated
//! code addresses guest memory through the window (a segment base set to the
//! window, 32-bit address size), so the wrap at 4 GiB is exact and no guest
//! address can reach host memory. Untouched pages cost no host memory.
//!
//! The window is the only unsafe code here: the mappings are created and
//! destroyed in one place each, with the invariants written beside them.

use std::os::fd::{FromRawFd, OwnedFd};

use memmap2::{MmapMut, MmapOptions};

mod backing;
mod shadow;

pub use backing::Backing;
pub use shadow::Access;

/// The page size of the guest (and of the host), 4 KiB.
pub const PAGE_SIZE: u32 = 4096;

/// Guest physical RAM.
pub struct GuestRam {
    fd: OwnedFd,
    map: MmapMut,
    size: u32,
    window: Option<Window>,
    /// One bit per page: is the page write-watched (read-only to
    /// translated code, every write recorded)? See [`GuestRam::watch_page`].
    watched: Vec<u64>,
    /// One bit per page: is a write to it waiting in `writes`?
    pending: Vec<u64>,
    /// Writes to watched pages since the last [`GuestRam::take_watched_writes`],
    /// one per page.
    writes: Vec<WatchedWrite>,
    /// Writes to watched pages ever made (each one, not once per page).
    watched_count: u64,
    /// The shadow windows (linear addresses under guest paging), one per
    /// shadow address space, created on first use; see [`GuestRam::shadow`].
    shadows: Vec<Option<shadow::Shadow>>,
    /// The shadow translated code runs on (see
    /// [`GuestRam::set_running_shadow`]).
    running_shadow: Option<usize>,
    /// May a shadow sit at host address 0 ([`GuestRam::set_low_shadow`])?
    low_shadow: bool,
    /// One bit per page: does a write to it need more than the store
    /// (it is watched, backed by a snapshot file, or logged clean)? The
    /// one bit the write path tests.
    attention: Vec<u64>,
    /// Pages backed by snapshot files and the dirty log (see [`backing`]).
    backing: backing::State,
    /// The fast-write map (see [`GuestRam::fast_map`]), made on first use,
    /// and whether an entry was ever set (else clearing touches nothing).
    fast: Option<MmapMut>,
    fast_set: bool,
    /// Page-translation tables for checked stores (see
    /// [`GuestRam::page_deltas`]): all zero (no page), and identity (with
    /// paging off), made on first use.
    deltas_zero: Option<MmapMut>,
    deltas_identity: Option<MmapMut>,
}

/// Entries of a page-delta table: one per 4 KiB page of the 4 GiB
/// linear address space (see [`GuestRam::page_deltas`]).
pub const DELTA_ENTRIES: usize = 1 << 20;

/// What marks a page-delta entry as present (bit 40: above any 32-bit
/// delta, dropped when translated code adds the entry to a 32-bit
/// address).
pub const DELTA_PRESENT: u64 = 1 << 40;

/// A page-delta table: [`DELTA_ENTRIES`] zero entries, touched only where
/// written.
pub(crate) fn delta_table() -> Result<MmapMut, RamError> {
    MmapOptions::new()
        .len(DELTA_ENTRIES * 8)
        .map_anon()
        .map_err(|e| RamError(format!("cannot map a page-delta table: {e}")))
}

/// Entry `page` of a page-delta table.
pub(crate) fn delta_entry(t: &mut MmapMut, page: u32) -> &mut [u8] {
    let at = page as usize * 8;
    &mut t[at..at + 8]
}

/// Regions of 64 bytes in the 4 GiB physical address space: the entries
/// of the fast-write map ([`GuestRam::fast_map`]).
pub const FAST_REGIONS: usize = 1 << 26;

/// Bytes per entry of the fast-write map (the translator's code chunks).
pub const FAST_REGION: u32 = 64;

/// Bytes a [`Window`] reserves from its base: the 4 GiB guest address
/// space plus 64 KiB of guard, so an unaligned access at 0xFFFFFFFE cannot
/// leave it.
pub const WINDOW_SIZE: usize = (1 << 32) + GUARD;

/// `PROT_NONE` guard before and after a window's 4 GiB: a string
/// instruction that translated code runs on host pointers and that wraps
/// around the guest's address space faults there (and is redone by the
/// interpreter, which wraps).
pub const GUARD: usize = 64 << 10;

/// The 4 GiB guest window: guest physical address `a` is `base + a`.
/// RAM is mapped at the start (shared with [`GuestRam`]'s slice); the rest
/// is `PROT_NONE`, so any access there faults in the host. The base is
/// 4 GiB-aligned, so the low 32 bits of a host pointer into the window are
/// the guest address (translated string instructions rely on it).
///
/// One shadow window may sit at host address 0 ([`GuestRam::set_low_shadow`]):
/// translated code then runs with a GS base of 0, and on hosts whose loads
/// take a cycle more with a non-zero segment base every guest load is that
/// much faster. Such a window starts at the host's lowest mappable address
/// (`vm.mmap_min_addr`, and never below page 1: its [`Window::floor_page`]);
/// guest pages below it cannot be mapped there, and a guest that uses one
/// has its shadow moved to a window anywhere
/// ([`GuestRam::shadow_leave_low`]).
pub struct Window {
    /// Host address of guest address 0.
    base: usize,
    /// The first byte of the window (an offset from `base`) the host lets
    /// this process map: 0, or `vm.mmap_min_addr` for a window at 0.
    floor: usize,
    /// The host reservation this value owns (guards included).
    reserved: (usize, usize),
}

impl Window {
    /// Host address of guest address 0 (null for a window at host
    /// address 0).
    pub fn base(&self) -> *mut u8 {
        self.base as *mut u8
    }

    /// Host address of window offset `off` (only for the host's memory
    /// calls: it may be null, or below the floor).
    pub(crate) fn at(&self, off: usize) -> *mut u8 {
        (self.base + off) as *mut u8
    }

    /// The first guest page this window can map (0 unless the window sits
    /// at host address 0).
    pub fn floor_page(&self) -> u32 {
        (self.floor / PAGE_SIZE as usize) as u32
    }

    /// Pages `first..first + count` clipped to those at or above the
    /// floor: (first, count), count possibly 0.
    pub(crate) fn clip(&self, first: u32, count: u32) -> (u32, u32) {
        let floor = self.floor_page();
        let end = first.saturating_add(count);
        let first = first.max(floor);
        (first, end.saturating_sub(first))
    }

    /// Replace guest pages `first..first + count` of the window (those at
    /// or above its floor, below 4 GiB + the guard) with fresh `PROT_NONE`
    /// pages: whatever was mapped there is gone.
    pub(crate) fn clear(&self, first: u32, count: u32) -> Result<(), RamError> {
        let (first, count) = self.clip(first, count);
        let end = (u64::from(first) + u64::from(count))
            .min((WINDOW_SIZE / PAGE_SIZE as usize) as u64) as usize;
        let first = first as usize;
        if end <= first {
            return Ok(());
        }
        let len = (end - first) * PAGE_SIZE as usize;
        // SAFETY: the range lies inside this window's reservation (clipped
        // to its floor and its end above), which this value owns; MAP_FIXED
        // replaces exactly that range with inaccessible anonymous memory,
        // so nothing else is affected.
        let r = unsafe {
            libc::mmap(
                self.at(first * PAGE_SIZE as usize).cast(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if r == libc::MAP_FAILED {
            return Err(RamError(format!(
                "cannot unmap {len} bytes of a guest window: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// Reserve a 4 GiB-aligned window of [`WINDOW_SIZE`] bytes with
    /// [`GUARD`] bytes before it, all `PROT_NONE`.
    fn reserve() -> Result<Window, RamError> {
        const FOUR_GIB: usize = 1 << 32;
        // Room to align: the guard, one 4 GiB of slack, then the window.
        let len = GUARD + FOUR_GIB + WINDOW_SIZE;
        // SAFETY: an anonymous PROT_NONE reservation at an address of the
        // kernel's choosing; it aliases nothing.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(RamError(format!(
                "cannot reserve a 4 GiB guest window: {}",
                std::io::Error::last_os_error()
            )));
        }
        let start = raw as usize;
        let base = (start + GUARD).next_multiple_of(FOUR_GIB);
        let (keep_from, keep_to) = (base - GUARD, base + WINDOW_SIZE);
        // SAFETY: both ranges lie inside the reservation just made (keep_from
        // >= start and keep_to <= start + len by the arithmetic above) and
        // outside the part kept; unmapping them releases address space only.
        let trimmed = unsafe {
            (keep_from == start || libc::munmap(raw, keep_from - start) == 0)
                && (start + len == keep_to
                    || libc::munmap(keep_to as *mut libc::c_void, start + len - keep_to) == 0)
        };
        if !trimmed {
            return Err(RamError(format!(
                "cannot trim the guest window's reservation: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(Window {
            base,
            floor: 0,
            reserved: (keep_from, keep_to - keep_from),
        })
    }

    /// Reserve a window at host address 0, from the lowest address the
    /// host lets a process map to the end of the guard after 4 GiB; None
    /// when any of that range is taken (or the kernel cannot be asked not
    /// to replace what is there).
    fn reserve_low() -> Option<Window> {
        // (Never host page 0, even where the host would map it: a null
        // pointer in popek must not reach guest memory.)
        let floor = mmap_min_addr()
            .max(PAGE_SIZE as usize)
            .next_multiple_of(PAGE_SIZE as usize);
        if floor >= 1 << 31 {
            return None;
        }
        let len = WINDOW_SIZE - floor;
        // SAFETY: MAP_FIXED_NOREPLACE maps only if nothing is mapped in
        // the range (else it fails), so no existing memory is touched; an
        // anonymous PROT_NONE reservation aliases nothing.
        let raw = unsafe {
            libc::mmap(
                floor as *mut libc::c_void,
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE
                    | libc::MAP_ANONYMOUS
                    | libc::MAP_NORESERVE
                    | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return None;
        }
        if raw as usize != floor {
            // A kernel before 4.17 takes the flag as a hint and maps
            // elsewhere: give that back.
            // SAFETY: the mapping just made, which nothing else uses.
            unsafe { libc::munmap(raw, len) };
            return None;
        }
        Some(Window {
            base: 0,
            floor,
            reserved: (floor, len),
        })
    }
}

/// The host's lowest mappable address (`vm.mmap_min_addr`; 64 KiB, a
/// common setting, if it cannot be read).
fn mmap_min_addr() -> usize {
    static MIN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MIN.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/vm/mmap_min_addr")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(64 << 10)
    })
}

impl Drop for Window {
    fn drop(&mut self) {
        // A failure here could only leave address space reserved; there is
        // no one to report it to in a destructor.
        // SAFETY: `reserved` is what `reserve` or `reserve_low` kept of its
        // mapping, not unmapped elsewhere.
        unsafe {
            libc::munmap(self.reserved.0 as *mut libc::c_void, self.reserved.1);
        }
    }
}

/// A write to a watched page ([`GuestRam::take_watched_writes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchedWrite {
    /// The physical page.
    pub page: u32,
    /// Every write to it since the last drain was the CPU setting an
    /// accessed or dirty bit in a page-table entry ([`GuestRam::write_ad`]).
    pub accessed_dirty: bool,
    /// The bytes of the page the other writes touched: offsets `lo..hi`
    /// (their hull; empty when `accessed_dirty`).
    pub lo: u16,
    /// See `lo`.
    pub hi: u16,
}

fn bit(v: &[u64], page: u32) -> bool {
    v.get((page / 64) as usize)
        .is_some_and(|x| x & (1 << (page % 64)) != 0)
}

fn set_bit(v: &mut [u64], page: u32, on: bool) {
    if let Some(x) = v.get_mut((page / 64) as usize) {
        if on {
            *x |= 1 << (page % 64);
        } else {
            *x &= !(1 << (page % 64));
        }
    }
}

/// Error creating guest RAM.
#[derive(Debug)]
pub struct RamError(pub String);

impl std::fmt::Display for RamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for RamError {}

impl GuestRam {
    /// Guest RAM of `size` bytes (rounded up to a page; at most 3 GiB so the
    /// top of the address space stays free for devices and guard pages).
    pub fn new(size: u64) -> Result<Self, RamError> {
        let page = u64::from(PAGE_SIZE);
        let size = size.div_ceil(page) * page;
        if size == 0 || size > 3 << 30 {
            return Err(RamError(format!(
                "guest memory size {size} bytes is out of range (1 page .. 3 GiB)"
            )));
        }
        // SAFETY: the name is a NUL-terminated C string; memfd_create has no
        // other preconditions.
        let raw = unsafe { libc::memfd_create(c"popek-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(RamError(format!(
                "cannot create guest RAM: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `raw` is a new file descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let file = std::fs::File::from(fd.try_clone().map_err(|e| RamError(e.to_string()))?);
        file.set_len(size)
            .map_err(|e| RamError(format!("cannot allocate {size} bytes of guest RAM: {e}")))?;
        // SAFETY: the memfd is private to this process and never shrunk, so
        // the mapping stays valid for the life of `map`.
        let map = unsafe { MmapOptions::new().len(size as usize).map_mut(&file) }
            .map_err(|e| RamError(format!("cannot map {size} bytes of guest RAM: {e}")))?;
        let pages = (size / u64::from(PAGE_SIZE)) as usize;
        Ok(GuestRam {
            fd,
            map,
            size: size as u32,
            window: None,
            watched: vec![0; pages.div_ceil(64)],
            pending: vec![0; pages.div_ceil(64)],
            writes: Vec::new(),
            watched_count: 0,
            shadows: Vec::new(),
            running_shadow: None,
            low_shadow: false,
            deltas_zero: None,
            deltas_identity: None,
            attention: vec![0; pages.div_ceil(64)],
            backing: backing::State::new(pages),
            fast: None,
            fast_set: false,
        })
    }

    /// A new anonymous memory file (a memfd), for memory popek shares
    /// between machines (the page-sharing store).
    pub fn anonymous_file() -> std::io::Result<std::fs::File> {
        // SAFETY: the name is a NUL-terminated C string; memfd_create has
        // no other preconditions.
        let raw = unsafe { libc::memfd_create(c"popek-shared".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new file descriptor that nothing else owns.
        Ok(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) }))
    }

    /// Drop the guest window (its address space and the host's work of
    /// keeping each page's protection in it), for a caller that will not
    /// use it for a while: translated code under guest paging runs on the
    /// shadows. The next [`GuestRam::window`] makes it again, with every
    /// page's protection. Whether there was one.
    pub fn release_window(&mut self) -> bool {
        self.window.take().is_some()
    }

    /// The guest window, created on first use.
    pub fn window(&mut self) -> Result<&Window, RamError> {
        if self.window.is_none() {
            let err = |what: &str| RamError(format!("{what}: {}", std::io::Error::last_os_error()));
            let window = Window::reserve()?;
            let base: *mut libc::c_void = window.base().cast();
            use std::os::fd::AsRawFd;
            // SAFETY: MAP_FIXED replaces the first `size` bytes of the
            // reservation made just above, which this function owns; the
            // memfd is at least `size` bytes long.
            let ram = unsafe {
                libc::mmap(
                    base,
                    self.size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    self.fd.as_raw_fd(),
                    0,
                )
            };
            if ram == libc::MAP_FAILED {
                return Err(err("cannot map guest RAM into the window"));
            }
            self.window = Some(window);
            self.apply_backing_to_window()?;
        }
        Ok(self.window.as_ref().expect("created above"))
    }

    /// Size of RAM in bytes.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// All of RAM as a byte slice.
    pub fn as_slice(&self) -> &[u8] {
        &self.map
    }

    /// All of RAM as a mutable byte slice (every page counts as written).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let mut a = 0;
        while a < self.size {
            self.note_write(a, PAGE_SIZE);
            a += PAGE_SIZE;
        }
        &mut self.map
    }

    /// Is `[addr, addr+len)` entirely RAM?
    pub fn contains(&self, addr: u32, len: u32) -> bool {
        u64::from(addr) + u64::from(len) <= u64::from(self.size)
    }

    /// Read one byte of physical memory.
    #[inline]
    pub fn read_u8(&self, addr: u32) -> u8 {
        self.map.get(addr as usize).copied().unwrap_or(0xFF)
    }

    /// Write one byte of physical memory.
    #[inline]
    pub fn write_u8(&mut self, addr: u32, v: u8) {
        self.note_write(addr, 1);
        if let Some(b) = self.map.get_mut(addr as usize) {
            *b = v;
        }
    }

    /// Record writes that touch watched pages.
    #[inline]
    fn note_write(&mut self, addr: u32, len: u32) {
        self.note_write_as(addr, len, false);
    }

    #[inline]
    fn note_write_as(&mut self, addr: u32, len: u32, accessed_dirty: bool) {
        let first = addr / PAGE_SIZE;
        let end = addr.wrapping_add(len - 1);
        let last = end / PAGE_SIZE;
        if bit(&self.attention, first) {
            let hi = if last == first {
                end % PAGE_SIZE + 1
            } else {
                PAGE_SIZE
            };
            self.attend(first, addr % PAGE_SIZE, hi, accessed_dirty);
        }
        if last != first && bit(&self.attention, last) {
            self.attend(last, 0, end % PAGE_SIZE + 1, accessed_dirty);
        }
    }

    /// A write to a page that needs attention: give it its own copy if a
    /// snapshot file backs it, mark it dirty if the log holds it clean,
    /// record it if it is watched.
    #[cold]
    fn attend(&mut self, page: u32, lo: u32, hi: u32, accessed_dirty: bool) {
        self.before_write(page);
        if bit(&self.watched, page) {
            self.record(page, lo, hi, accessed_dirty);
        }
    }

    /// Recompute the attention bit of a page (and forget that its bytes
    /// could be written fast: see [`GuestRam::fast_map`]).
    fn update_attention(&mut self, page: u32) {
        let on = bit(&self.watched, page) || self.backing.needs_attention(page);
        set_bit(&mut self.attention, page, on);
        self.clear_fast(page, 0, PAGE_SIZE);
    }

    /// The fast-write map: one byte per 64-byte region of the physical
    /// address space ([`FAST_REGIONS`] of them). Translated code may store
    /// to physical address `a` through [`GuestRam::ram_ptr`], bypassing the
    /// write watch, when byte `a >> 6` is 1 (a store of up to 16 bytes: it
    /// may reach into the next region). Invariant: an entry is 1 only if it
    /// is not a page's last region and it and the next region are RAM on pages whose writes need nothing but what the
    /// translator's code watch checks ([`GuestRam::may_write_fast`]), and
    /// the translator, which sets entries ([`GuestRam::set_fast`]), has
    /// found no translated code and no page table there; every change of a
    /// page's attention clears its entries (and the one before), and the
    /// translator clears those it translates code from.
    /// Untouched, the map costs no memory.
    pub fn fast_map(&mut self) -> Result<*const u8, RamError> {
        if self.fast.is_none() {
            let m = MmapOptions::new()
                .len(FAST_REGIONS)
                .map_anon()
                .map_err(|e| RamError(format!("cannot map the fast-write map: {e}")))?;
            self.fast = Some(m);
        }
        Ok(self.fast.as_ref().expect("made above").as_ptr())
    }

    /// A page-delta table for translated code's checked stores: for each
    /// 4 KiB page of the address space translated code sees (linear with
    /// paging on, physical with it off), 0, or [`DELTA_PRESENT`] plus the
    /// physical page's address less the page's own (mod 2^32), so that a
    /// store there may add it to the address and go on to the fast-write
    /// map ([`GuestRam::fast_map`]). With paging off (`space` None): the
    /// identity for every page of RAM. With paging on: shadow `space`'s
    /// table (see [`GuestRam::shadow_set_delta`]), or one of zeros while it
    /// has none. The pointer stays valid until the shadow is reset.
    pub fn page_deltas(&mut self, space: Option<usize>) -> Result<*const u8, RamError> {
        let Some(i) = space else {
            if self.deltas_identity.is_none() {
                let mut t = delta_table()?;
                for page in 0..self.size / PAGE_SIZE {
                    delta_entry(&mut t, page).copy_from_slice(&DELTA_PRESENT.to_le_bytes());
                }
                self.deltas_identity = Some(t);
            }
            return Ok(self.deltas_identity.as_ref().expect("made above").as_ptr());
        };
        if let Some(t) = self
            .shadows
            .get(i)
            .and_then(Option::as_ref)
            .and_then(|s| s.deltas())
        {
            return Ok(t);
        }
        if self.deltas_zero.is_none() {
            self.deltas_zero = Some(delta_table()?);
        }
        Ok(self.deltas_zero.as_ref().expect("made above").as_ptr())
    }

    /// The host address of guest physical address 0 in popek's own view of
    /// RAM (writable whatever the window's protection).
    pub fn ram_ptr(&mut self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// May the bytes of `page` be written without GuestRam noticing (it is
    /// RAM, and not shared with a file, another guest or the dirty log)?
    /// Being watched is the caller's business.
    pub fn may_write_fast(&self, page: u32) -> bool {
        page < self.size / PAGE_SIZE && !self.backing.needs_attention(page)
    }

    /// Let translated code store to the region of physical address `addr`
    /// (see [`GuestRam::fast_map`]; the caller has checked for code and
    /// page tables). Nothing happens unless the region and the next are RAM
    /// that [`GuestRam::may_write_fast`] allows. True if the entry was 0.
    pub fn set_fast(&mut self, addr: u32) -> bool {
        let region = addr / FAST_REGION;
        if addr % PAGE_SIZE >= PAGE_SIZE - FAST_REGION {
            // (A store in a page's last region may reach into the next
            // page, which under paging need not be the next physical one.)
            return false;
        }
        let Some(next) = (region * FAST_REGION).checked_add(FAST_REGION) else {
            return false;
        };
        if !self.may_write_fast(addr / PAGE_SIZE) || !self.may_write_fast(next / PAGE_SIZE) {
            return false;
        }
        let Some(m) = self.fast.as_mut() else {
            return false;
        };
        self.fast_set = true;
        std::mem::replace(&mut m[region as usize], 1) == 0
    }

    /// May translated code store fast to the region of physical address
    /// `addr` (its entry in the fast-write map is 1)?
    pub fn is_fast(&self, addr: u32) -> bool {
        let region = (addr / FAST_REGION) as usize;
        self.fast_set && self.fast.as_ref().is_some_and(|m| m[region] != 0)
    }

    /// Translated code may no longer store fast to bytes `lo..hi` of
    /// `page` (nor to the region before them, whose stores may reach in).
    pub fn clear_fast(&mut self, page: u32, lo: u32, hi: u32) {
        let Some(m) = self.fast.as_mut().filter(|_| self.fast_set) else {
            return;
        };
        if lo >= hi {
            return;
        }
        let first = (page * (PAGE_SIZE / FAST_REGION) + lo / FAST_REGION) as usize;
        let last =
            (page * (PAGE_SIZE / FAST_REGION) + (hi - 1).min(PAGE_SIZE - 1) / FAST_REGION) as usize;
        m[first.saturating_sub(1)..=last.min(FAST_REGIONS - 1)].fill(0);
    }

    /// Translated code may store fast nowhere (until entries are set again).
    pub(crate) fn clear_fast_all(&mut self) {
        self.fast = None;
        self.fast_set = false;
    }

    /// May translated code write the page (nothing to notice on a write)?
    fn writable(&self, page: u32) -> bool {
        !bit(&self.attention, page)
    }

    #[cold]
    fn record(&mut self, page: u32, lo: u32, hi: u32, accessed_dirty: bool) {
        self.watched_count += 1;
        let (lo, hi) = if accessed_dirty {
            (u16::MAX, 0)
        } else {
            (lo as u16, hi as u16)
        };
        if bit(&self.pending, page) {
            if !accessed_dirty {
                if let Some(w) = self.writes.iter_mut().find(|w| w.page == page) {
                    w.accessed_dirty = false;
                    w.lo = w.lo.min(lo);
                    w.hi = w.hi.max(hi);
                }
            }
            return;
        }
        set_bit(&mut self.pending, page, true);
        self.writes.push(WatchedWrite {
            page,
            accessed_dirty,
            lo,
            hi,
        });
    }

    /// Watch a physical page: it becomes read-only to translated code (in
    /// the window and in the shadow), so translated stores to it fault and
    /// are redone by the interpreter, and every write to it is recorded for
    /// [`GuestRam::take_watched_writes`]. Who watches a page, and why, is
    /// the caller's business (the translator's write watch).
    ///
    /// Fails (and the page is not watched) when the host refuses to change
    /// the protection: translated code must then not rely on the watch.
    pub fn watch_page(&mut self, page: u32) -> Result<(), RamError> {
        if page < self.size / PAGE_SIZE && !bit(&self.watched, page) {
            set_bit(&mut self.watched, page, true);
            self.update_attention(page);
            if let Err(e) = self.protect(page, false) {
                set_bit(&mut self.watched, page, false);
                self.update_attention(page);
                // Undo what part of it was done; the watch failed anyway.
                let _ = self.protect(page, true);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Stop watching a physical page: writable again to translated code.
    /// Fails (and the page stays watched, which costs only faults) when
    /// the host refuses to change the protection.
    pub fn unwatch_page(&mut self, page: u32) -> Result<(), RamError> {
        if bit(&self.watched, page) {
            set_bit(&mut self.watched, page, false);
            self.update_attention(page);
            if let Err(e) = self.protect(page, true) {
                set_bit(&mut self.watched, page, true);
                self.update_attention(page);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Is the page watched?
    pub fn is_watched(&self, page: u32) -> bool {
        bit(&self.watched, page)
    }

    /// Has a watched page been written since the last
    /// [`GuestRam::take_watched_writes`]?
    pub fn has_watched_writes(&self) -> bool {
        !self.writes.is_empty()
    }

    /// How many writes to watched pages were ever made (every one, where
    /// [`GuestRam::watched_writes`] holds one per page): a clock for
    /// telling whether a piece of work wrote any.
    pub fn watched_write_count(&self) -> u64 {
        self.watched_count
    }

    /// The writes recorded since the last [`GuestRam::take_watched_writes`]
    /// (they stay recorded).
    pub fn watched_writes(&self) -> &[WatchedWrite] {
        &self.writes
    }

    /// The watched pages written since the last call, once each, in the
    /// order of their first write. The pages stay watched.
    pub fn take_watched_writes(&mut self) -> Vec<WatchedWrite> {
        let writes = std::mem::take(&mut self.writes);
        for w in &writes {
            set_bit(&mut self.pending, w.page, false);
        }
        writes
    }

    /// Make a physical page read-only (or writable again, unless a write
    /// to it still needs attention) in the window; its shadow aliases
    /// become read-only, or are dropped to be mapped again on their next
    /// use.
    fn protect(&mut self, page: u32, writable: bool) -> Result<(), RamError> {
        let writable = writable && self.writable(page);
        self.protect_aliases(page, writable)?;
        let Some(w) = &self.window else {
            return Ok(());
        };
        if page >= self.size / PAGE_SIZE {
            return Ok(());
        }
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: the page lies inside the RAM part of this window's
        // mapping, which this value owns; changing its protection affects
        // only accesses through the window (translated code).
        let r = unsafe {
            libc::mprotect(
                w.at((page * PAGE_SIZE) as usize).cast(),
                PAGE_SIZE as usize,
                prot,
            )
        };
        if r != 0 {
            return Err(RamError(format!(
                "cannot change the protection of guest page {:#010x} in the window: {}",
                page * PAGE_SIZE,
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// Read `len` (1..=8) bytes little-endian from physical memory.
    #[inline]
    pub fn read(&self, addr: u32, len: u32) -> u64 {
        let a = addr as usize;
        let l = len as usize;
        if let Some(s) = self.map.get(a..a + l) {
            let mut buf = [0u8; 8];
            buf[..l].copy_from_slice(s);
            u64::from_le_bytes(buf)
        } else {
            let mut v = 0u64;
            for i in (0..len).rev() {
                v = (v << 8) | u64::from(self.read_u8(addr.wrapping_add(i)));
            }
            v
        }
    }

    /// Write `len` (1..=8) bytes little-endian to physical memory.
    #[inline]
    pub fn write(&mut self, addr: u32, len: u32, v: u64) {
        self.note_write(addr, len);
        let a = addr as usize;
        let l = len as usize;
        let bytes = v.to_le_bytes();
        if let Some(s) = self.map.get_mut(a..a + l) {
            s.copy_from_slice(&bytes[..l]);
        } else {
            for i in 0..len {
                self.write_u8(addr.wrapping_add(i), bytes[i as usize]);
            }
        }
    }

    /// Copy `len` bytes from `src` to `dst` within one page each (as
    /// memmove), recording the write: the bulk form of REP MOVS. Both
    /// ranges must be RAM ([`GuestRam::contains`]).
    pub fn copy_within_page(&mut self, src: u32, dst: u32, len: u32) {
        self.note_write(dst, len);
        let (s, d) = (src as usize, dst as usize);
        self.map.copy_within(s..s + len as usize, d);
    }

    /// Fill `len` bytes at `dst` (within one page, RAM) with the low `size`
    /// bytes of `v` repeated, recording the write: the bulk form of REP STOS.
    pub fn fill_within_page(&mut self, dst: u32, len: u32, v: u32, size: u32) {
        self.note_write(dst, len);
        let pattern = v.to_le_bytes();
        let size = size.clamp(1, 4) as usize;
        // Eight bytes at a time (1, 2 and 4 divide 8), then the rest.
        let mut wide = [0u8; 8];
        for (i, b) in wide.iter_mut().enumerate() {
            *b = pattern[i % size];
        }
        let d = dst as usize;
        let mut chunks = self.map[d..d + len as usize].chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&wide);
        }
        for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
            *b = pattern[i % size];
        }
    }

    /// Copy `data` into RAM at `addr`; bytes beyond RAM are dropped.
    /// Returns false if any byte fell outside RAM.
    pub fn load(&mut self, addr: u32, data: &[u8]) -> bool {
        if self.contains(addr, data.len() as u32) {
            let mut p = addr & !(PAGE_SIZE - 1);
            while p < addr + data.len() as u32 {
                self.note_write(p, PAGE_SIZE);
                p += PAGE_SIZE;
            }
            let a = addr as usize;
            self.map[a..a + data.len()].copy_from_slice(data);
            true
        } else {
            false
        }
    }

    /// Fill `[addr, addr+len)` with zeros; false if it is not all RAM.
    pub fn zero(&mut self, addr: u32, len: u32) -> bool {
        if self.contains(addr, len) {
            let mut p = addr & !(PAGE_SIZE - 1);
            while p < addr + len {
                self.note_write(p, PAGE_SIZE);
                p += PAGE_SIZE;
            }
            let a = addr as usize;
            self.map[a..a + len as usize].fill(0);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast-write map: a region opens only where it and the next are
    /// RAM needing no attention besides a watch; watching, the dirty log
    /// and clearing close it again, with the region before.
    #[test]
    fn fast_write_regions_open_and_close_by_the_rules() {
        let mut ram = GuestRam::new(4 * 4096).unwrap();
        let map = ram.fast_map().unwrap();
        // SAFETY: the map is FAST_REGIONS bytes, readable, owned by
        // `ram`, which outlives these reads.
        let at = |r: u32| unsafe { *map.add(r as usize) };
        assert!(ram.set_fast(0x1040));
        assert!(!ram.set_fast(0x1040), "already open");
        assert_eq!(at(0x1040 / 64), 1);
        // The last region of RAM: its next region is not RAM.
        assert!(!ram.set_fast(0x3FC0));
        assert!(!ram.set_fast(0xFFFF_FFC0), "beyond RAM, at the top");
        // Translated code at 0x1080 closes its region and the one before.
        assert!(ram.set_fast(0x1080));
        ram.clear_fast(1, 0x80, 0x90);
        assert_eq!((at(0x1040 / 64), at(0x1080 / 64)), (0, 0));
        // A page's last region never opens (a store there may reach into
        // the next page, which under paging need not follow it).
        assert!(!ram.set_fast(0x0FC0) && !ram.set_fast(0x1FC8));
        // A change of a page's attention closes the whole page.
        assert!(ram.set_fast(0x1100) && ram.set_fast(0x1F80));
        ram.watch_page(1).unwrap();
        assert_eq!((at(0x1100 / 64), at(0x1F80 / 64)), (0, 0));
        // A page the dirty log holds clean does not open.
        ram.start_dirty_log().unwrap();
        assert!(!ram.set_fast(0x2000));
        ram.write(0x2000, 4, 1);
        assert!(ram.is_dirty(2) && ram.set_fast(0x2000), "written: dirty");
    }

    #[test]
    fn windows_are_4gib_aligned_and_bulk_writes_are_recorded() {
        let mut ram = GuestRam::new(1 << 20).unwrap();
        assert_eq!(ram.window().unwrap().base() as usize % (1 << 32), 0);
        assert_eq!(ram.shadow(0).unwrap().base() as usize % (1 << 32), 0);
        ram.load(0x3000, b"abcdefgh");
        ram.watch_page(4).unwrap();
        ram.watch_page(5).unwrap();
        ram.copy_within_page(0x3000, 0x4010, 8);
        ram.fill_within_page(0x5000, 6, 0x0201, 2);
        ram.write_ad(0x6000, 0x21);
        ram.write(0x4020, 1, 0);
        assert_eq!(ram.read(0x4010, 8), u64::from_le_bytes(*b"abcdefgh"));
        assert_eq!(ram.read(0x5000, 6), 0x0201_0201_0201);
        let w = ram.take_watched_writes();
        let pages: Vec<(u32, u16, u16)> = w.iter().map(|w| (w.page, w.lo, w.hi)).collect();
        // Page 4: bytes 0x10..0x18 copied, byte 0x20 written: their hull.
        assert_eq!(pages, vec![(4, 0x10, 0x21), (5, 0, 6)]);
        assert!(!ram.has_watched_writes());
        ram.watch_page(6).unwrap();
        ram.write_ad(0x6000, 0x61);
        assert_eq!(
            ram.take_watched_writes(),
            vec![WatchedWrite {
                page: 6,
                accessed_dirty: true,
                lo: u16::MAX,
                hi: 0,
            }]
        );
        ram.write_ad(0x6000, 0x61);
        ram.write(0x6004, 4, 0);
        assert_eq!(
            ram.take_watched_writes(),
            vec![WatchedWrite {
                page: 6,
                accessed_dirty: false,
                lo: 4,
                hi: 8,
            }]
        );
    }

    #[test]
    fn ram_reads_back_and_unassigned_reads_ones() {
        let mut ram = GuestRam::new(8192).unwrap();
        ram.write(0x100, 4, 0xDEADBEEF);
        assert_eq!(ram.read(0x100, 4), 0xDEADBEEF);
        assert_eq!(ram.read(0x101, 2), 0xADBE);
        // straddling the end of RAM: the part inside is RAM, the rest is ones
        ram.write(8190, 2, 0x1234);
        assert_eq!(ram.read(8190, 4), 0xFFFF_1234);
        ram.write(8191, 4, 0);
        assert_eq!(ram.read(8190, 2), 0x0034);
        assert_eq!(ram.read(0xFFFF_FFFF, 1), 0xFF);
    }

    #[test]
    fn the_window_shows_the_same_ram() {
        let mut ram = GuestRam::new(8192).unwrap();
        ram.write(0x1234, 4, 0xCAFE_F00D);
        let base = ram.window().unwrap().base();
        // SAFETY: 0x1234..0x1238 lies inside the RAM mapped at the window base.
        let seen = unsafe { std::ptr::read_unaligned(base.add(0x1234).cast::<u32>()) };
        assert_eq!(seen, 0xCAFE_F00D);
        // SAFETY: as above; a write through the window shows in the slice.
        unsafe { std::ptr::write_unaligned(base.add(0x10).cast::<u16>(), 0xBEEF) };
        assert_eq!(ram.read(0x10, 2), 0xBEEF);
    }

    #[test]
    fn size_is_page_rounded_and_bounded() {
        assert_eq!(GuestRam::new(1).unwrap().size(), 4096);
        assert!(GuestRam::new(0).is_err());
        assert!(GuestRam::new(4 << 30).is_err());
    }
}
