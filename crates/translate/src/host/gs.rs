//! The calling thread's GS base, which translated code adds to every guest
//! address (`gs:[addr32]`), and the host's fixed RFLAGS bits.
//!
//! Invariant: while translated code runs on a thread, that thread's GS
//! base is the window of the guest being run ([`set_gs_base`] is called by
//! the dispatcher on every entry; a thread-local makes the repeat free).
//! Nothing else in a Rust program on x86-64 Linux uses GS (thread-locals
//! use FS).

use crate::abi::HOST_FLAGS;

/// What [`GS_BASE`] holds before [`set_gs_base`] is first called on a
/// thread: no window's base (a new thread's GS base is its creator's, which
/// may be any window, even the one at host address 0).
const UNSET: usize = usize::MAX;

thread_local! {
    /// What this thread's GS base was last set to.
    static GS_BASE: std::cell::Cell<usize> = const { std::cell::Cell::new(UNSET) };
}

/// The GS base [`set_gs_base`] last set on this thread (0 if none).
pub fn gs_base() -> u64 {
    match GS_BASE.with(|g| g.get()) {
        UNSET => 0,
        b => b as u64,
    }
}

/// Does the kernel let user code write the GS base itself (WRGSBASE,
/// CR4.FSGSBASE, reported as bit 1 of AT_HWCAP2 since Linux 5.9)?
fn wrgsbase_allowed() -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // SAFETY: getauxval only reads the process's auxiliary vector.
    *ALLOWED.get_or_init(|| unsafe { libc::getauxval(libc::AT_HWCAP2) } & 2 != 0)
}

/// Set the calling thread's GS base (WRGSBASE where the kernel allows it,
/// else ARCH_SET_GS). popek's host code reaches guest memory as
/// `gs:[addr32]`; an address-space switch of the guest moves GS to another
/// shadow window, so this is on the path of every guest CR3 load.
pub fn set_gs_base(base: *mut u8) -> std::io::Result<()> {
    const ARCH_SET_GS: libc::c_long = 0x1001;
    if GS_BASE.with(|g| g.get()) == base as usize {
        return Ok(());
    }
    if wrgsbase_allowed() {
        // SAFETY: the kernel enabled CR4.FSGSBASE for user code (checked
        // above); WRGSBASE only changes this thread's GS base, which no
        // Rust or libc code on x86-64 Linux relies on, and the kernel
        // saves and restores it with the thread.
        unsafe {
            std::arch::asm!("wrgsbase {}", in(reg) base as u64, options(nostack, preserves_flags))
        };
        GS_BASE.with(|g| g.set(base as usize));
        return Ok(());
    }
    // SAFETY: arch_prctl(ARCH_SET_GS) only changes this thread's GS base,
    // which no Rust or libc code on x86-64 Linux relies on.
    let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_SET_GS, base as libc::c_ulong) };
    if r == 0 {
        GS_BASE.with(|g| g.set(base as usize));
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The bits of the host's RFLAGS image (PUSHFQ) outside [`HOST_FLAGS`]
/// while translated code runs: the reserved bit 1 and IF (user mode), and
/// AC and ID as the process has them (clear in practice). PUSHF in host
/// code subtracts them.
pub fn host_fixed_flags() -> u32 {
    let rflags: u64;
    // SAFETY: PUSHFQ and POP into a register touch only the stack slot
    // they push and pop.
    unsafe { std::arch::asm!("pushfq", "pop {}", out(reg) rflags) };
    rflags as u32 & !HOST_FLAGS
}

#[cfg(test)]
mod tests {
    /// What PUSHFD subtracts is what the host's PUSHFQ shows outside the
    /// arithmetic flags in a normal process: bit 1 and IF.
    #[test]
    fn host_fixed_flags_are_bit_1_and_if() {
        assert_eq!(super::host_fixed_flags(), 0x202);
    }
}
