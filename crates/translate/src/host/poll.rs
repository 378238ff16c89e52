//! The poll page: how the run loop takes control back from translated
//! code that counts nothing (`Pace::Polled`, see [`crate::emit`]).
//!
//! Translated code loads from a page of its own at every transfer that
//! can close a loop (a jump to an address not above the block's start, an
//! indirect branch): one load, no flags, no counter. While the page is
//! readable the load costs about nothing; to stop the code, the page is
//! made inaccessible and the next such load faults. The fault handler
//! ([`crate::host::fault`]) sends the code to the epilogue with the guest
//! state exact (the load is not a guest instruction), and the dispatcher
//! recognises the page, restores it and returns to the run loop.
//!
//! Who revokes the page: a POSIX timer per engine (CLOCK_MONOTONIC,
//! delivered to the engine's thread as [`poll_signal`]), armed for when
//! the run loop wants control back (the next device deadline, or a
//! bounded slice so serial input is noticed). Its handler only calls
//! mprotect on the page whose address the timer carries, so a signal that
//! arrives late, or on an engine that has gone (pages are pooled, never
//! unmapped), at worst causes one early return to the run loop.
//!
//! The page is mapped below 2 GiB (MAP_32BIT), so host code reaches it with
//! a 32-bit absolute address and needs no register.

use std::sync::{Mutex, Once};

/// Pages no engine uses any more (never unmapped: a late timer signal may
/// still revoke one, which costs its next user one early return).
static POOL: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// The real-time signal the poll timers send.
pub fn poll_signal() -> libc::c_int {
    libc::SIGRTMIN() + 4
}

/// A poll page and the timer that revokes it.
#[derive(Debug)]
pub struct Poller {
    page: u32,
    timer: Option<(libc::timer_t, std::thread::ThreadId)>,
    /// When the timer is set to fire (on the machine clock, ns), if armed.
    armed_at: Option<u64>,
}

// SAFETY: `timer_t` is a kernel timer id (an opaque pointer-sized value that
// any thread of the process may use); the page is process-wide memory.
unsafe impl Send for Poller {}

impl Poller {
    /// A readable poll page below 2 GiB, or None if the host cannot map
    /// one there.
    pub fn new() -> Option<Poller> {
        install();
        let page = POOL.lock().ok().and_then(|mut p| p.pop()).or_else(|| {
            // SAFETY: a fresh anonymous mapping; no existing memory is
            // touched.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
                    -1,
                    0,
                )
            };
            let a = p as usize;
            (p != libc::MAP_FAILED && a < 1 << 31).then_some(a as u32)
        })?;
        let mut p = Poller {
            page,
            timer: None,
            armed_at: None,
        };
        p.restore().then_some(p)
    }

    /// The page's address (below 2 GiB).
    pub fn addr(&self) -> u32 {
        self.page
    }

    /// Is host address `addr` on the poll page?
    pub fn holds(&self, addr: u64) -> bool {
        addr >> 12 == u64::from(self.page) >> 12
    }

    /// Make the page readable again (after a poll exit), and forget the
    /// timer that revoked it. False if the host refused.
    pub fn restore(&mut self) -> bool {
        self.armed_at = None;
        // SAFETY: the page is this poller's mapping (from `new`), never
        // unmapped.
        unsafe { libc::mprotect(self.page as usize as *mut _, 4096, libc::PROT_READ) == 0 }
    }

    /// Have the page revoked by machine time `at` (ns) or a little after,
    /// `now` being the machine time now: arms the timer unless it is
    /// already due no later than `at` plus a tolerance (so a deadline that
    /// moves a little does not cost a system call per dispatcher step).
    /// At least `MIN_SLICE_NS` from now, so code always makes progress.
    /// False if the host refused a timer (the caller must not run
    /// unpaced code then).
    pub fn arm(&mut self, at: u64, now: u64) -> bool {
        const TOLERANCE_NS: u64 = 50_000;
        const MIN_SLICE_NS: u64 = 20_000;
        let at = at.max(now + MIN_SLICE_NS);
        if self
            .armed_at
            .is_some_and(|t| t <= at.saturating_add(TOLERANCE_NS))
        {
            return true;
        }
        let me = std::thread::current().id();
        if self.timer.is_some_and(|(_, t)| t != me) {
            self.delete_timer();
        }
        if self.timer.is_none() {
            match create_timer(self.page) {
                Some(t) => self.timer = Some((t, me)),
                None => return false,
            }
        }
        let Some((timer, _)) = self.timer else {
            return false;
        };
        let delta = at - now;
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (delta / 1_000_000_000) as libc::time_t,
                tv_nsec: (delta % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: `timer` was created by `create_timer` and not deleted;
        // the specs are valid for the call.
        let r = unsafe { libc::timer_settime(timer, 0, &spec, std::ptr::null_mut()) };
        if r != 0 {
            return false;
        }
        self.armed_at = Some(at);
        true
    }

    fn delete_timer(&mut self) {
        if let Some((t, _)) = self.timer.take() {
            // SAFETY: `t` was created by `create_timer` and is deleted once.
            unsafe {
                libc::timer_delete(t);
            }
        }
        self.armed_at = None;
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.delete_timer();
        if self.restore() {
            if let Ok(mut p) = POOL.lock() {
                p.push(self.page);
            }
        }
    }
}

/// A one-shot timer on CLOCK_MONOTONIC that sends [`poll_signal`] to this
/// thread, carrying the page's address.
fn create_timer(page: u32) -> Option<libc::timer_t> {
    // SAFETY: a zeroed sigevent is valid; the fields set are the ones
    // SIGEV_THREAD_ID reads; gettid has no preconditions; `timer_create`
    // writes the id into `t`.
    unsafe {
        let mut ev: libc::sigevent = std::mem::zeroed();
        ev.sigev_notify = libc::SIGEV_THREAD_ID;
        ev.sigev_signo = poll_signal();
        ev.sigev_value = libc::sigval {
            sival_ptr: page as usize as *mut libc::c_void,
        };
        ev.sigev_notify_thread_id = libc::gettid();
        let mut t: libc::timer_t = std::ptr::null_mut();
        (libc::timer_create(libc::CLOCK_MONOTONIC, &mut ev, &mut t) == 0).then_some(t)
    }
}

/// The timer signal's handler: revoke the page the timer carries.
extern "C" fn on_timer(_sig: libc::c_int, info: *mut libc::siginfo_t, _uctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler;
    // for a timer's signal its value is the page address `create_timer`
    // put there. mprotect is a plain system call (async-signal-safe) on a
    // page that stays mapped for the life of the process.
    unsafe {
        let page = (*info).si_value().sival_ptr as usize;
        if page != 0 && page < 1 << 31 {
            libc::mprotect(page as *mut libc::c_void, 4096, libc::PROT_NONE);
        }
    }
}

/// Install the timer signal's handler (once per process).
fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting point; the handler
        // has the SA_SIGINFO signature and makes one system call.
        // SA_RESTART: a system call the signal interrupts is restarted.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_timer as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(poll_signal(), &sa, std::ptr::null_mut());
        }
    });
}
