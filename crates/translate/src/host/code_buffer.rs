//! The code buffer: where translated host code lives.
//!
//! One memfd mapped twice: a read-write view the translator appends code
//! to, and a read-execute view the CPU runs. No page is ever writable and
//! executable through the same mapping (W^X), and appending a block costs
//! a memcpy, not an mmap and an mprotect. When the buffer is full the
//! engine drops every translation and starts again from the beginning.
//!
//! Each page of the buffer costs a page fault in each view the first time
//! it is used: the kernel allocates and clears a shared-memory page for the
//! first write, and maps it for the first run. In the Linux boot that was
//! about a tenth of translation time (some 8,000 faults). Once the code
//! passes [`PREFAULT_FROM`], a helper thread puts the pages up to
//! [`PREFAULT_AHEAD`] beyond the code into both views (MADV_POPULATE_WRITE
//! and MADV_POPULATE_READ, Linux 5.14), on the other core while the
//! translator works; populating changes no contents, so the thread never
//! touches what the translator writes or the CPU runs. On an older kernel
//! the advice fails and pages fault in as before.
//!
//! The blocks' words (`CodeBuffer::meta`) are the same kind of memory:
//! appended to as blocks are built, some 0.8 bytes per byte of code. As a
//! growing vector they cost the Linux boot about 2,900 page faults inside
//! translations (and copies as the vector doubled). They have room
//! reserved for as many bytes as the code buffer holds (a block whose
//! words do not fit fills the buffer, as code that does not fit does), so
//! they never move, and the helper thread populates them as far as the
//! code.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Code below this many bytes faults its pages in itself (a small guest
/// starts no thread).
const PREFAULT_FROM: usize = 256 << 10;
/// How far ahead of the code the helper thread keeps pages ready.
const PREFAULT_AHEAD: usize = 2 << 20;
/// Cache lines [`CodeBuffer::prefetch_next`] asks for: about a block's
/// code (some 240 bytes in the Linux boot) and its words.
const PREFETCH_CODE_LINES: usize = 5;
const PREFETCH_WORD_LINES: usize = 3;
/// What [`Prefault::want`] holds to stop the thread.
const STOP: usize = usize::MAX;

/// The helper thread that populates pages ahead of the code.
struct Prefault {
    /// Bytes from the start to have in both views ([`STOP`]: end).
    want: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<()>,
    /// The process that started it (a forked child has no such thread).
    pid: u32,
}

/// A double-mapped buffer for host code.
pub struct CodeBuffer {
    _fd: OwnedFd,
    rw: NonNull<u8>,
    rx: NonNull<u8>,
    size: usize,
    used: usize,
    /// Bytes from the start asked of the prefault thread so far.
    asked: usize,
    prefault: Option<Prefault>,
    /// What the engine keeps of each block besides its code (exits, polls,
    /// instruction map: `emit::HostBlock`), appended word by word as
    /// blocks are built and emptied with the code: no allocation per
    /// block, and one block's words follow the last one's in memory.
    /// Never beyond the capacity it was made with (it never moves: the
    /// prefault thread populates it).
    meta: Vec<u32>,
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
            asked: 0,
            prefault: None,
            // As many bytes as the code (see the module's notes).
            meta: Vec::with_capacity(size / 4),
        })
    }

    /// Append code (16-byte aligned); its offset, or None when full.
    pub fn append(&mut self, code: &[u8]) -> Option<usize> {
        let at = self.used.next_multiple_of(16);
        if at + code.len() > self.size {
            return None;
        }
        if at + code.len() + PREFAULT_AHEAD / 2 > self.asked {
            self.prefault_to(at + code.len() + PREFAULT_AHEAD);
        }
        // SAFETY: `at..at + len` lies inside the read-write view, which no
        // running code writes, and `code` is a separate allocation.
        unsafe {
            std::ptr::copy_nonoverlapping(code.as_ptr(), self.rw.as_ptr().add(at), code.len())
        };
        self.used = at + code.len();
        Some(at)
    }

    /// Ask the helper thread (started once the code passes
    /// [`PREFAULT_FROM`]) to have the pages up to `end` in both views.
    fn prefault_to(&mut self, end: usize) {
        if end < PREFAULT_FROM + PREFAULT_AHEAD {
            return;
        }
        let end = end.min(self.size);
        if self.prefault.is_none() {
            let want = Arc::new(AtomicUsize::new(0));
            let (rw, rx, theirs) = (
                self.rw.as_ptr() as usize,
                self.rx.as_ptr() as usize,
                want.clone(),
            );
            // The whole pages of the words' room.
            let words = self.meta.as_ptr() as usize;
            let meta = (
                words.next_multiple_of(4096),
                (words + self.meta.capacity() * 4) / 4096 * 4096,
            );
            let thread = std::thread::Builder::new()
                .name("popek-code-prefault".into())
                .spawn(move || prefault_thread(rw, rx, meta, &theirs));
            let Ok(thread) = thread else {
                // No thread: pages fault in as they are used.
                self.asked = self.size;
                return;
            };
            self.prefault = Some(Prefault {
                want,
                thread,
                pid: std::process::id(),
            });
        }
        if let Some(p) = &self.prefault {
            p.want.store(end, Ordering::Release);
            p.thread.thread().unpark();
        }
        self.asked = end;
    }

    /// Where the next [`CodeBuffer::append`] will put code.
    pub fn next_offset(&self) -> usize {
        self.used.next_multiple_of(16)
    }

    /// Ask for the cache lines the next block's code and words will be
    /// written to, while that block is still being built: a translation in
    /// a run writes to lines no cache holds, and its stores otherwise wait
    /// for each (a prefetch is only a hint: it never faults, past the end
    /// of the buffer either).
    #[inline]
    pub fn prefetch_next(&self) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let code = self
            .rw
            .as_ptr()
            .cast_const()
            .wrapping_add(self.next_offset());
        let words = self
            .meta
            .as_ptr()
            .wrapping_add(self.meta.len())
            .cast::<u8>();
        for (at, lines) in [(code, PREFETCH_CODE_LINES), (words, PREFETCH_WORD_LINES)] {
            for k in 0..lines {
                // SAFETY: a prefetch reads nothing the program sees and
                // never faults, whatever the address (SSE is part of
                // x86_64).
                unsafe { _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(64 * k).cast::<i8>()) };
            }
        }
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
        self.meta.clear();
    }

    /// The block words from index `at` on (see `meta`).
    pub(crate) fn meta(&self, at: u32) -> &[u32] {
        &self.meta[at as usize..]
    }

    /// The block words from index `at` on, to change.
    pub(crate) fn meta_mut(&mut self, at: u32) -> &mut [u32] {
        &mut self.meta[at as usize..]
    }

    /// The words of the blocks, to append a block's `n` words to (its
    /// index is the length before), or None when they do not fit.
    pub(crate) fn meta_words(&mut self, n: usize) -> Option<&mut Vec<u32>> {
        (self.meta.len() + n <= self.meta.capacity()).then_some(&mut self.meta)
    }

    /// Bytes in use.
    pub fn used(&self) -> usize {
        self.used
    }
}

/// The prefault thread: populate the views at `rw` and `rx` up to what
/// `want` asks, and the pages `meta` (first, end) of the blocks' words as
/// far, and wait for more, until it says [`STOP`].
fn prefault_thread(rw: usize, rx: usize, meta: (usize, usize), want: &AtomicUsize) {
    let mut done = 0;
    loop {
        let w = want.load(Ordering::Acquire);
        if w == STOP {
            return;
        }
        if w <= done {
            std::thread::park();
            continue;
        }
        let to = w.next_multiple_of(4096);
        for (view, advice) in [
            (rw, libc::MADV_POPULATE_WRITE),
            (rx, libc::MADV_POPULATE_READ),
        ] {
            // SAFETY: `done..to` lies inside both views (`want` never
            // exceeds the buffer's size, a multiple of the page size),
            // which stay mapped until `CodeBuffer::drop` has joined this
            // thread; populating maps pages without changing their
            // contents.
            let r = unsafe { libc::madvise((view + done) as *mut libc::c_void, to - done, advice) };
            if r != 0 {
                // (A kernel without the advice: pages fault in instead.)
                return;
            }
        }
        let (from, end) = ((meta.0 + done).min(meta.1), (meta.0 + to).min(meta.1));
        if from < end {
            // SAFETY: `from..end` are whole pages of the words' vector,
            // whose room never moves and outlives this thread (dropped
            // after `CodeBuffer::drop` has joined it); populating maps
            // pages without changing their contents. (A failure leaves
            // them to fault in.)
            unsafe {
                libc::madvise(
                    from as *mut libc::c_void,
                    end - from,
                    libc::MADV_POPULATE_WRITE,
                )
            };
        }
        done = to;
    }
}

impl Drop for CodeBuffer {
    fn drop(&mut self) {
        if let Some(p) = self.prefault.take() {
            p.want.store(STOP, Ordering::Release);
            if p.pid == std::process::id() {
                p.thread.thread().unpark();
                // (A panic in the thread left nothing to clean up.)
                let _ = p.thread.join();
            } else {
                // In a forked child the thread does not exist: nothing to
                // join or detach.
                std::mem::forget(p.thread);
            }
        }
        // SAFETY: both views were mapped with exactly `size` bytes in `new`
        // and are unmapped only here.
        unsafe {
            libc::munmap(self.rw.as_ptr().cast(), self.size);
            libc::munmap(self.rx.as_ptr().cast(), self.size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{CodeBuffer, PREFAULT_FROM};

    #[test]
    fn block_words_never_move_and_fill_like_code() {
        let mut buf = CodeBuffer::new(64 << 10).unwrap();
        let first = buf.meta_words(0).unwrap().as_ptr();
        let room = buf.meta_words(0).unwrap().capacity();
        assert!(room >= (64 << 10) / 4, "room for as many bytes as the code");
        let mut n = 0;
        for _ in 0..=room / 100 + 1 {
            let Some(m) = buf.meta_words(100) else { break };
            m.extend([7; 100]);
            n += 100;
        }
        assert!(n <= room && n + 100 > room, "{n} words in a room of {room}");
        assert_eq!(
            buf.meta_words(0).unwrap().as_ptr(),
            first,
            "the words moved"
        );
        buf.reset();
        assert!(buf.meta_words(100).is_some(), "a reset empties them");
    }

    /// Is every page of `from..to` resident?
    fn resident(from: usize, to: usize) -> bool {
        let pages = (to - from) / 4096;
        let mut v = vec![0u8; pages];
        // SAFETY: `from..to` are whole pages of a live allocation (the
        // caller's); mincore only reports on them into `v` (one byte per
        // page).
        let r = unsafe { libc::mincore(from as *mut libc::c_void, to - from, v.as_mut_ptr()) };
        r == 0 && v.iter().all(|b| b & 1 == 1)
    }

    #[test]
    fn the_prefault_thread_populates_the_block_words_as_far_as_the_code() {
        // (A kernel before 5.14 has no MADV_POPULATE_WRITE: nothing is
        // populated ahead there, by design.)
        let probe = vec![0u8; 3 * 4096];
        let page = (probe.as_ptr() as usize).next_multiple_of(4096);
        // SAFETY: one whole page inside `probe`; populating changes no
        // contents.
        let r =
            unsafe { libc::madvise(page as *mut libc::c_void, 4096, libc::MADV_POPULATE_WRITE) };
        if r != 0 {
            eprintln!("no MADV_POPULATE_WRITE here: nothing to check");
            return;
        }
        let mut buf = CodeBuffer::new(8 << 20).unwrap();
        let words = buf.meta_words(0).unwrap().as_ptr() as usize;
        let (from, to) = (
            words.next_multiple_of(4096),
            (words + PREFAULT_FROM) / 4096 * 4096,
        );
        assert!(!resident(from, to), "nothing was written there yet");
        // Code past PREFAULT_FROM starts the thread.
        let block = vec![0x90u8; 4096];
        while buf.used() < PREFAULT_FROM + 4096 {
            buf.append(&block).unwrap();
        }
        let t = std::time::Instant::now();
        while !resident(from, to) {
            assert!(
                t.elapsed().as_secs() < 10,
                "the words' pages were not populated"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
