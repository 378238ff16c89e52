//! Faults inside translated code.
//!
//! A copied instruction can fault in the host: a load or store outside
//! guest RAM hits the window's `PROT_NONE` pages (SIGSEGV), a DIV raises
//! SIGFPE. x86 faults are precise, so the host registers and flags at the
//! fault are exactly the guest state before the faulting instruction. The
//! handler checks that the fault is inside the code this thread is running
//! (a thread-local set around each run), records the host address in the
//! guest context and resumes at the code's epilogue, which stores the guest
//! state and returns to the dispatcher. The dispatcher then lets the
//! interpreter execute that one instruction, which produces the guest's
//! semantics (unassigned memory reads as ones, #DE through the guest IDT).
//!
//! Every other fault is handed to the default action, so a real host bug
//! still crashes loudly.

use std::cell::Cell;
use std::sync::Once;

use crate::abi::Context;

/// The code a thread is running: copied instructions in `[start, end)`.
#[derive(Debug, Clone, Copy)]
pub struct Active {
    /// First copied instruction.
    pub start: u64,
    /// End of the copied instructions.
    pub end: u64,
    /// Where to resume after a fault (the epilogue).
    pub fault_entry: u64,
    /// The context the code runs on.
    pub ctx: *mut Context,
}

thread_local! {
    static ACTIVE: Cell<Option<Active>> = const { Cell::new(None) };
}

/// Set (or clear) the code this thread is running.
pub fn set_active(a: Option<Active>) {
    ACTIVE.with(|c| c.set(a));
}

extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, uctx: *mut libc::c_void) {
    let active = ACTIVE.with(|c| c.get());
    // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler.
    let gregs = unsafe { &mut (*uctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
    let rip = gregs[libc::REG_RIP as usize] as u64;
    if let Some(a) = active {
        if (a.start..a.end).contains(&rip) {
            let r15 = gregs[libc::REG_R15 as usize] as u64;
            if rip == a.fault_entry || r15 != a.ctx as u64 {
                // The fault is in the epilogue itself, or translated code
                // lost its context register: the guest state cannot be
                // recovered. End the process with one line (write and
                // _exit are async-signal-safe) rather than fault again
                // forever.
                lost_context(rip - a.start);
            }
            // SAFETY: `ctx` points at the Context passed to the running
            // code, alive for the whole run (see HostBlock::run); the kernel
            // passes a valid siginfo_t, whose si_addr is the faulting
            // address for SIGSEGV and SIGBUS.
            unsafe {
                (*a.ctx).fault_rip = rip;
                if sig == libc::SIGSEGV {
                    (*a.ctx).fault_addr = (*info).si_addr() as u64;
                    // Page-fault error code bit 1: the access was a write.
                    (*a.ctx).fault_write = (gregs[libc::REG_ERR as usize] as u64 >> 1) & 1;
                }
            }
            gregs[libc::REG_RIP as usize] = a.fault_entry as i64;
            return;
        }
    }
    // Not ours: restore the default action and return; the instruction
    // faults again and the process dies with the right signal.
    // SAFETY: resetting a signal's disposition to SIG_DFL is always valid.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
    }
}

/// Translated code faulted without its context (a popek bug): say so on
/// stderr, with the code-buffer offset of the fault (`--dump` prints each
/// block's), and exit with status 2 (popek's error status).
fn lost_context(offset: u64) -> ! {
    let mut msg =
        *b"popek: internal error: translated code lost its context (at code offset 0x0000000000000000)\n";
    let hex = b"0123456789abcdef";
    // The 16 zeros before ")\n".
    let at = msg.len() - 18;
    for i in 0..16 {
        msg[at + i] = hex[((offset >> (60 - 4 * i)) & 0xF) as usize];
    }
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is
    // valid for its length.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(2);
    }
}

/// Install the SIGSEGV and SIGFPE handler (once per process).
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for sig in [libc::SIGSEGV, libc::SIGFPE, libc::SIGBUS] {
            // SAFETY: a zeroed sigaction is a valid starting point; the
            // handler has the SA_SIGINFO signature and only touches a
            // const-initialised thread-local and the ucontext.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = handler as *const () as usize;
                sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
    });
}
