//! The code buffer: where translated host code lives.
//!
//! One memfd mapped twice: a read-write view the translator appends code
//! to, and a read-execute view the CPU runs. No page is ever writable and
//! executable through the same mapping (W^X), and appending a block costs
//! a memcpy, not an mmap and an mprotect. When the buffer is full the
//! engine drops every translation and starts again from the beginning.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

/// A double-mapped buffer for host code.
pub struct CodeBuffer {
    _fd: OwnedFd,
    rw: NonNull<u8>,
    rx: NonNull<u8>,
    size: usize,
    used: usize,
}

// SAFETY: the mappings are owned by this value alone.
unsafe impl Send for CodeBuffer {}

fn map(fd: &OwnedFd, size: usize, prot: libc::c_int) -> std::io::Result<NonNull<u8>> {
    // SAFETY: a new shared mapping of our own memfd at an address of the
    // kernel's choosing; it aliases no Rust object.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            prot,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(NonNull::new(p.cast()).expect("mmap returned non-null"))
}

impl CodeBuffer {
    /// A buffer of `size` bytes (rounded up to pages).
    pub fn new(size: usize) -> std::io::Result<CodeBuffer> {
        let size = size.div_ceil(4096).max(1) * 4096;
        // SAFETY: a NUL-terminated name; memfd_create has no other preconditions.
        let raw = unsafe { libc::memfd_create(c"popek-code".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        std::fs::File::from(fd.try_clone()?).set_len(size as u64)?;
        let rw = map(&fd, size, libc::PROT_READ | libc::PROT_WRITE)?;
        let rx = map(&fd, size, libc::PROT_READ | libc::PROT_EXEC)?;
        Ok(CodeBuffer {
            _fd: fd,
            rw,
            rx,
            size,
            used: 0,
        })
    }

    /// Append code (16-byte aligned); its offset, or None when full.
    pub fn append(&mut self, code: &[u8]) -> Option<usize> {
        let at = self.used.next_multiple_of(16);
        if at + code.len() > self.size {
            return None;
        }
        // SAFETY: `at..at + len` lies inside the read-write view, which no
        // running code writes, and `code` is a separate allocation.
        unsafe {
            std::ptr::copy_nonoverlapping(code.as_ptr(), self.rw.as_ptr().add(at), code.len())
        };
        self.used = at + code.len();
        Some(at)
    }

    /// Where the next [`CodeBuffer::append`] will put code.
    pub fn next_offset(&self) -> usize {
        self.used.next_multiple_of(16)
    }

    /// Overwrite code already in the buffer (to patch a jump). The caller
    /// must not be running code from the buffer while patching.
    pub fn write_at(&mut self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.used, "patch outside the code");
        // SAFETY: the range lies inside the read-write view (checked above)
        // and `bytes` is a separate allocation.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.rw.as_ptr().add(offset), bytes.len())
        };
    }

    /// Point the rel32 field at `site` to code-buffer offset `to`.
    pub fn patch_rel32(&mut self, site: usize, to: usize) {
        let rel = to as i64 - (site as i64 + 4);
        self.write_at(site, &(rel as i32).to_le_bytes());
    }

    /// The code at `offset..offset + len` (for disassembly).
    pub fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        assert!(offset + len <= self.used, "range outside the code");
        // SAFETY: the range lies inside the read-write view, which lives as
        // long as `self`; it is only written through `&mut self`.
        unsafe { std::slice::from_raw_parts(self.rw.as_ptr().add(offset), len) }
    }

    /// The executable address of `offset`.
    pub fn exec_addr(&self, offset: usize) -> *const u8 {
        debug_assert!(offset < self.size);
        self.rx.as_ptr().wrapping_add(offset)
    }

    /// Forget all code (the caller drops every translation first).
    pub fn reset(&mut self) {
        self.used = 0;
    }

    /// Bytes in use.
    pub fn used(&self) -> usize {
        self.used
    }
}

impl Drop for CodeBuffer {
    fn drop(&mut self) {
        // SAFETY: both views were mapped with exactly `size` bytes in `new`
        // and are unmapped only here.
        unsafe {
            libc::munmap(self.rw.as_ptr().cast(), self.size);
            libc::munmap(self.rx.as_ptr().cast(), self.size);
        }
    }
}
