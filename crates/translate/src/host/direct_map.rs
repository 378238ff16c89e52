//! The indirect-branch table's memory: one 32-bit entry for every guest
//! EIP (2^32 entries, 16 GiB of address space reserved with
//! MAP_NORESERVE). An entry holds the code-buffer offset of the body of
//! the translation at that EIP, or 0 (the buffer's miss routine) for
//! none; pages never written read as zeros from the kernel's shared zero
//! page, so only the pages that hold a published target cost memory (one
//! 4 KiB page per 1 KiB of guest code with indirect-branch targets).
//!
//! The reservation is read-only (reads of it cost no commit charge even
//! where the host does not overcommit); a 64 KiB chunk is made writable
//! when its first entry is set.
//!
//! Host code indexes it with the full target EIP, so a lookup needs no
//! comparison: `mov r11d, [table + r13*4]` and a jump to the buffer's
//! base plus that offset (see [`crate::emit::indirect`]).

/// Entries: one per 32-bit guest EIP.
const ENTRIES: usize = 1 << 32;
const BYTES: usize = ENTRIES * 4;
/// Entries per chunk made writable at once (64 KiB of table).
const CHUNK_ENTRIES: usize = 1 << 14;

/// A table of 2^32 code-buffer offsets, reserved and filled lazily.
#[derive(Debug)]
pub struct DirectMap {
    base: *mut u32,
    /// One bit per chunk: made writable.
    writable: Vec<u64>,
}

// SAFETY: the map is plain memory owned by its engine, which is used from
// one thread at a time.
unsafe impl Send for DirectMap {}

impl DirectMap {
    /// Reserve the table (no memory is committed until written), or None
    /// if the host refuses the reservation.
    pub fn new() -> Option<DirectMap> {
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BYTES,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        (p != libc::MAP_FAILED).then(|| DirectMap {
            base: p.cast(),
            writable: vec![0; ENTRIES / CHUNK_ENTRIES / 64],
        })
    }

    /// The table's address, for host code.
    pub fn addr(&self) -> u64 {
        self.base as u64
    }

    /// The entry for `eip`.
    pub fn get(&self, eip: u32) -> u32 {
        // SAFETY: every u32 EIP indexes inside the 2^32-entry mapping,
        // which lives as long as `self`.
        unsafe { self.base.add(eip as usize).read() }
    }

    /// Set the entry for `eip`; false if the host refused to make its
    /// chunk writable (the entry then stays empty: lookups of it miss).
    pub fn set(&mut self, eip: u32, offset: u32) -> bool {
        let chunk = eip as usize / CHUNK_ENTRIES;
        let (word, bit) = (chunk / 64, 1u64 << (chunk % 64));
        if self.writable[word] & bit == 0 {
            if offset == 0 {
                // Already empty: a read-only chunk reads as zeros.
                return true;
            }
            // SAFETY: the chunk lies inside this mapping (chunk-aligned,
            // CHUNK_ENTRIES entries).
            let r = unsafe {
                libc::mprotect(
                    self.base.add(chunk * CHUNK_ENTRIES).cast(),
                    CHUNK_ENTRIES * 4,
                    libc::PROT_READ | libc::PROT_WRITE,
                )
            };
            if r != 0 {
                return false;
            }
            self.writable[word] |= bit;
        }
        // SAFETY: as in `get`, and the chunk is writable; `&mut self`
        // excludes other Rust access (host code reads the table only while
        // the engine runs it, never at the same time as this).
        unsafe { self.base.add(eip as usize).write(offset) };
        true
    }

    /// Empty the entries at `used` (every EIP set since the last
    /// clear): one by one when they are few, else the whole table at once
    /// (its memory goes back to the host).
    pub fn clear(&mut self, used: impl ExactSizeIterator<Item = u32>) {
        if used.len() > 4096 {
            // SAFETY: the range is exactly this mapping; MADV_DONTNEED on a
            // private anonymous mapping makes it read as zeros again.
            let r = unsafe { libc::madvise(self.base.cast(), BYTES, libc::MADV_DONTNEED) };
            if r == 0 {
                return;
            }
        }
        for eip in used {
            // Setting an entry to 0 cannot fail.
            let _ = self.set(eip, 0);
        }
    }
}

impl Drop for DirectMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe {
            libc::munmap(self.base.cast(), BYTES);
        }
    }
}
