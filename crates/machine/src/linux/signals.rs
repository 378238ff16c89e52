//! Signals: dispositions, the blocked mask, delivery to guest handlers in
//! Linux's i386 frames, sigreturn, sigsuspend, alarms.
//!
//! Asynchronous signals are the host's: a guest process is a host
//! process, so kill, SIGCHLD, a terminal's Ctrl-C and alarms reach popek
//! itself. popek mirrors the guest's dispositions and blocked mask on the
//! host: a signal the guest ignores is ignored by the host (and stays
//! ignored across exec), one with the default action gets the host's
//! default action (the process dies of it and its parent sees the native
//! wait status), one with a handler is caught by a host handler that only
//! marks it pending ([`HOST_PENDING`]); the host's mask is the guest's, so
//! blocking, sigsuspend and pending signals behave as natively. Signals
//! popek's own machinery uses on the host (SIGSEGV, SIGBUS, SIGFPE for
//! translated code, SIGILL, SIGTRAP, and the poll timer's real-time signal)
//! are not mirrored: sent to the process itself they are queued in
//! [`LinuxProcess`]'s own pending set instead.
//!
//! Delivery happens at an instruction boundary at CPL 3 (the run loop asks
//! before each engine step; translated code returns to it regularly once a
//! handler exists, see `Machine::step`), in Linux's ia32 frame layouts
//! (arch/x86/include/asm/sigframe.h: `sigframe_ia32`, `rt_sigframe_ia32`
//! with `ucontext_ia32`), so sigreturn and rt_sigreturn, glibc's restorers
//! and code that inspects the context work as on Linux. CPU exceptions
//! become SIGSEGV (with si_addr = CR2), SIGFPE, SIGILL... delivered to a
//! handler when the guest has one.

use std::sync::atomic::{AtomicU64, Ordering};

use popek_vcpu::{flags, reg, SegReg, Vcpu};

use super::errno::*;
use super::process::LinuxProcess;
use super::syscalls::Call;
use super::{user_flat, Fatal, KernelExit, USER_CS, USER_DS};

/// Signals the host caught for guest handlers, one bit per signal number.
pub static HOST_PENDING: AtomicU64 = AtomicU64::new(0);

/// sigaction flags.
const SA_SIGINFO: u32 = 4;
const SA_ONSTACK: u32 = 0x0800_0000;
const SA_RESTART: u32 = 0x1000_0000;
const SA_NODEFER: u32 = 0x4000_0000;
const SA_RESETHAND: u32 = 0x8000_0000;
const SA_RESTORER: u32 = 0x0400_0000;

const SIGKILL: i32 = 9;
const SIGSTOP: i32 = 19;

/// Signals the host does for popek itself: never mirrored.
fn reserved(sig: i32) -> bool {
    matches!(sig, 4 | 5 | 7 | 8 | 11)
        || sig == libc::SIGRTMIN() + 4
        || sig == SIGKILL
        || sig == SIGSTOP
}

fn bit(sig: i32) -> u64 {
    1u64 << sig
}

/// Signals whose default action is to be ignored (SIGCHLD, SIGCONT,
/// SIGURG, SIGWINCH); the stop signals are ignored too (no job control).
fn ignored_by_default(sig: i32) -> bool {
    matches!(sig, 17 | 18 | 23 | 28 | 19 | 20 | 21 | 22)
}

extern "C" fn on_host_signal(sig: libc::c_int) {
    if (1..64).contains(&sig) {
        HOST_PENDING.fetch_or(bit(sig), Ordering::SeqCst);
    }
}

/// The host's mask for guest mask `m` (reserved signals never blocked).
fn host_set(m: u64) -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset fill a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in 1..64 {
            if m & bit(s) != 0 && !reserved(s) {
                libc::sigaddset(&mut set, s);
            }
        }
        set
    }
}

impl LinuxProcess {
    /// Make the host's disposition of `sig` follow the guest's.
    fn mirror(&self, sig: i32) {
        if reserved(sig) {
            return;
        }
        let h = self.disposition(sig);
        // SAFETY: installing a handler that only sets an atomic bit, or
        // SIG_DFL/SIG_IGN.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = match h {
                // (SIGPIPE too: the Rust runtime ignores it, but the
                // guest's write to a pipe nobody reads, or another
                // process's kill, ends the process as natively.)
                0 => libc::SIG_DFL,
                1 => libc::SIG_IGN,
                _ => on_host_signal as extern "C" fn(libc::c_int) as usize,
            };
            libc::sigfillset(&mut sa.sa_mask);
            // No SA_RESTART: a blocking host call returns EINTR, and popek
            // restarts the guest's call if the guest's handler asks.
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }

    /// The guest changed its blocked mask: so does the host.
    pub(super) fn set_blocked(&mut self, m: u64) {
        self.blocked = m & !(bit(SIGKILL) | bit(SIGSTOP));
        let set = host_set(self.blocked);
        // SAFETY: a valid set.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) };
    }

    /// After execve: handlers go back to the default action, ignored
    /// signals stay ignored (the mask is kept).
    pub(super) fn reset_handlers_for_exec(&mut self, from: &LinuxProcess) {
        for s in 1..64usize {
            let h = from.sigactions[s][0];
            if h == 1 {
                self.sigactions[s] = [1, 0, 0, 0, 0];
            }
            if h > 1 {
                self.mirror_default(s as i32);
            }
        }
        self.blocked = from.blocked;
    }

    fn mirror_default(&self, sig: i32) {
        if !reserved(sig) {
            // SAFETY: SIG_DFL.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }

    /// The host's dispositions at the start of a process: SIGPIPE's
    /// default action (the Rust runtime ignores it).
    pub(super) fn mirror_at_start(&self) {
        self.mirror(libc::SIGPIPE);
    }

    /// Is a signal waiting that the guest may take now?
    pub fn signal_pending(&self) -> bool {
        (self.pending | HOST_PENDING.load(Ordering::Relaxed)) & !self.blocked != 0
    }

    /// Does the signal about to be delivered ask for SA_RESTART?
    pub(super) fn restarts(&self) -> bool {
        let ready = (self.pending | HOST_PENDING.load(Ordering::SeqCst)) & !self.blocked;
        ready != 0 && self.sigactions[ready.trailing_zeros() as usize][1] & SA_RESTART != 0
    }

    /// Does the guest have a handler for any signal (so translated code
    /// must come back to the run loop now and then)?
    pub fn has_handlers(&self) -> bool {
        self.sigactions.iter().any(|a| a[0] > 1)
    }

    /// Deliver the lowest pending signal the guest does not block, if any:
    /// run its handler (a frame on the user stack), ignore it, or end the
    /// process by its default action. Only at CPL 3.
    pub fn deliver_signals(&mut self, cpu: &mut Vcpu) -> Option<KernelExit> {
        if cpu.cpl() != 3 {
            return None;
        }
        self.pending |= HOST_PENDING.swap(0, Ordering::SeqCst);
        let ready = self.pending & !self.blocked;
        if ready == 0 {
            return None;
        }
        let sig = ready.trailing_zeros() as i32;
        self.pending &= !bit(sig);
        let info = self.siginfo.remove(&sig).unwrap_or_else(|| {
            let mut i = [0u32; 8];
            i[0] = sig as u32;
            i
        });
        self.run_handler(cpu, sig, info)
    }

    /// Deliver `sig` (its siginfo words: signo, errno, code, then the
    /// union) now.
    fn run_handler(&mut self, cpu: &mut Vcpu, sig: i32, info: [u32; 8]) -> Option<KernelExit> {
        let act = self.sigactions[sig as usize];
        match act[0] {
            0 if ignored_by_default(sig) => return None,
            0 => return Some(KernelExit::Killed(sig)),
            1 => return None,
            _ => {}
        }
        let (handler, sa_flags, restorer) = (act[0], act[1], act[2]);
        let sa_mask = u64::from(act[3]) | u64::from(act[4]) << 32;
        let saved_mask = self.suspend_mask.take().unwrap_or(self.blocked);
        let rt = sa_flags & SA_SIGINFO != 0;
        // SA_ONSTACK: on the alternate stack, unless already on it.
        let on_alt = |esp: u32, (sp, size): (u32, u32)| esp.wrapping_sub(sp) < size;
        let esp = match self.altstack {
            Some(alt) if sa_flags & SA_ONSTACK != 0 && !on_alt(cpu.regs[reg::ESP], alt) => {
                alt.0.wrapping_add(alt.1)
            }
            _ => cpu.regs[reg::ESP],
        };
        // Frame sizes: the old frame is pretcode, sig, sigcontext (88),
        // extramask, retcode (Linux's unused fpstate area between the
        // sigcontext and extramask is left out: only popek's sigreturn
        // reads extramask); the rt frame is
        // pretcode, sig, pinfo, puc, siginfo (128), ucontext (116),
        // retcode. The FXSAVE image follows, 64-aligned.
        let body = if rt {
            4 * 4 + 128 + 116 + 8
        } else {
            8 + 88 + 4 + 8
        };
        let total = body + 64 + 512;
        let frame = (esp.wrapping_sub(total) & !15).wrapping_sub(4);
        let fp = (frame + body + 63) & !63;
        let mut b = vec![0u8; (fp + 512 - frame) as usize];
        let put = |b: &mut Vec<u8>, off: u32, v: u32| {
            b[off as usize..off as usize + 4].copy_from_slice(&v.to_le_bytes())
        };
        let sc_at = if rt { 16 + 128 + 20 } else { 8 };
        // sigcontext_32.
        let seg = |s: SegReg| u32::from(cpu.seg(s).selector);
        let r = cpu.regs;
        let sc = [
            seg(SegReg::Gs),
            seg(SegReg::Fs),
            seg(SegReg::Es),
            seg(SegReg::Ds),
            r[reg::EDI],
            r[reg::ESI],
            r[reg::EBP],
            r[reg::ESP],
            r[reg::EBX],
            r[reg::EDX],
            r[reg::ECX],
            r[reg::EAX],
            self.trap.0,
            self.trap.1,
            cpu.eip,
            seg(SegReg::Cs),
            cpu.eflags,
            r[reg::ESP],
            seg(SegReg::Ss),
            fp,
            saved_mask as u32,
            cpu.cr2,
        ];
        for (i, v) in sc.iter().enumerate() {
            put(&mut b, sc_at + 4 * i as u32, *v);
        }
        let retcode = body - 8;
        let pretcode = if sa_flags & SA_RESTORER != 0 {
            restorer
        } else {
            frame + retcode
        };
        put(&mut b, 0, pretcode);
        put(&mut b, 4, sig as u32);
        if rt {
            put(&mut b, 8, frame + 16);
            put(&mut b, 12, frame + 16 + 128);
            for (i, v) in info.iter().enumerate() {
                put(&mut b, 16 + 4 * i as u32, *v);
            }
            // ucontext: flags, link, stack (sp, flags, size), mcontext
            // (the sigcontext above), the mask.
            match self.altstack {
                Some((sp, size)) => {
                    put(&mut b, 144 + 8, sp);
                    put(
                        &mut b,
                        144 + 12,
                        u32::from(on_alt(cpu.regs[reg::ESP], (sp, size))),
                    );
                    put(&mut b, 144 + 16, size);
                }
                None => put(&mut b, 144 + 12, 2),
            }
            put(&mut b, 144 + 20 + 88, saved_mask as u32);
            put(&mut b, 144 + 20 + 92, (saved_mask >> 32) as u32);
            // movl $173, %eax; int $0x80
            b[retcode as usize..retcode as usize + 7]
                .copy_from_slice(&[0xB8, 173, 0, 0, 0, 0xCD, 0x80]);
        } else {
            put(&mut b, 8 + 88, (saved_mask >> 32) as u32);
            // popl %eax; movl $119, %eax; int $0x80
            b[retcode as usize..retcode as usize + 8]
                .copy_from_slice(&[0x58, 0xB8, 119, 0, 0, 0, 0xCD, 0x80]);
        }
        let img = cpu.fpu.image();
        let at = (fp - frame) as usize;
        b[at..at + 512].copy_from_slice(img);
        if self.mm.write(cpu, frame, &b).is_err() {
            // No room for the frame: Linux kills with SIGSEGV.
            return Some(KernelExit::Killed(11));
        }
        cpu.regs[reg::ESP] = frame;
        cpu.regs[reg::EAX] = sig as u32;
        cpu.regs[reg::EDX] = if rt { frame + 16 } else { 0 };
        cpu.regs[reg::ECX] = if rt { frame + 16 + 128 } else { 0 };
        cpu.eip = handler;
        cpu.eflags &= !(flags::DF | flags::TF | (1 << 16));
        for s in [SegReg::Ds, SegReg::Es, SegReg::Ss] {
            cpu.segs[s as usize] = user_flat(USER_DS, false);
        }
        cpu.segs[SegReg::Cs as usize] = user_flat(USER_CS, true);
        let mut mask = saved_mask | sa_mask;
        if sa_flags & SA_NODEFER == 0 {
            mask |= bit(sig);
        }
        self.set_blocked(mask);
        if sa_flags & SA_RESETHAND != 0 {
            self.sigactions[sig as usize] = [0; 5];
            self.mirror(sig);
        }
        self.trap = (0, 0);
        None
    }

    /// A CPU exception in user mode: the guest's handler for its signal
    /// runs if it has one (si_addr the faulting address), else the
    /// process dies of it.
    pub(super) fn fault(&mut self, cpu: &mut Vcpu, f: Fatal, vector: u8) -> KernelExit {
        let sig = f.signo;
        let h = self.disposition(sig);
        if h <= 1 || self.blocked & bit(sig) != 0 {
            return KernelExit::Signal(f);
        }
        // Back to the user context the exception left.
        cpu.segs[SegReg::Cs as usize] = user_flat(USER_CS, true);
        cpu.segs[SegReg::Ss as usize] = user_flat(USER_DS, false);
        cpu.regs = f.regs;
        cpu.eip = f.eip;
        cpu.eflags = f.eflags | flags::FIXED1;
        let error = f.exception.error.unwrap_or(0);
        self.trap = (u32::from(vector), error);
        // siginfo: signo, errno, code, si_addr.
        let (code, addr) = match vector {
            14 => (if error & 1 != 0 { 2 } else { 1 }, cpu.cr2),
            0 => (1, f.eip), // FPE_INTDIV
            6 => (2, f.eip), // ILL_ILLOPN
            13 => (128, 0),  // SI_KERNEL
            _ => (128, f.eip),
        };
        match self.run_handler(cpu, sig, [sig as u32, 0, code, addr, 0, 0, 0, 0]) {
            Some(e) => e,
            None => KernelExit::Resume,
        }
    }
}

/// rt_sigaction (174).
pub(super) fn sys_rt_sigaction(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    let sig = a[0] as usize;
    if sig == 0 || sig > 64 || ((sig == 9 || sig == 19) && a[1] != 0) {
        return Err(EINVAL);
    }
    let old = pr.sigactions[sig];
    if a[1] != 0 {
        let b = pr.mm.read(cpu, a[1], 20)?;
        let w = |i: usize| u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
        pr.sigactions[sig] = [w(0), w(1), w(2), w(3), w(4)];
        pr.mirror(sig as i32);
    }
    if a[2] != 0 {
        let bytes: Vec<u8> = old.iter().flat_map(|v| v.to_le_bytes()).collect();
        pr.mm
            .write(cpu, a[2], &bytes[..(12 + a[3].min(8)) as usize])?;
    }
    Ok(0)
}

/// rt_sigprocmask (175).
pub(super) fn sys_rt_sigprocmask(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    let old = pr.blocked;
    if a[1] != 0 {
        let b = pr.mm.read(cpu, a[1], a[3].min(8))?;
        let mut m = [0u8; 8];
        m[..b.len()].copy_from_slice(&b);
        // Signal n is bit n - 1 in the guest's set.
        let set = u64::from_le_bytes(m) << 1;
        pr.set_blocked(match a[0] {
            0 => old | set,
            1 => old & !set,
            2 => set,
            _ => return Err(EINVAL),
        });
    }
    if a[2] != 0 {
        let b = (old >> 1).to_le_bytes();
        pr.mm.write(cpu, a[2], &b[..a[3].min(8) as usize])?;
    }
    Ok(0)
}

/// rt_sigsuspend (179): wait with the given mask until a signal the
/// guest handles arrives; its handler runs with the old mask saved.
pub(super) fn sys_rt_sigsuspend(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    let b = pr.mm.read(cpu, a[0], a[1].min(8))?;
    let mut m = [0u8; 8];
    m[..b.len()].copy_from_slice(&b);
    let mask = u64::from_le_bytes(m) << 1;
    let old = pr.blocked;
    pr.set_blocked(mask);
    while !pr.signal_pending() {
        let set = host_set(pr.blocked);
        // SAFETY: a valid set; returns when a handler ran.
        unsafe { libc::sigsuspend(&set) };
    }
    pr.suspend_mask = Some(old);
    Err(EINTR)
}

/// pause (29).
pub(super) fn sys_pause(pr: &mut LinuxProcess, _c: Call<'_>) -> Result<i32, Errno> {
    while !pr.signal_pending() {
        let set = host_set(pr.blocked);
        // SAFETY: a valid set.
        unsafe { libc::sigsuspend(&set) };
    }
    Err(EINTR)
}

/// sigreturn (119) and rt_sigreturn (173): the context the frame saved.
pub(super) fn sys_sigreturn(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, .. } = c;
    let esp = cpu.regs[reg::ESP];
    let (frame, sc_at) = if n == 173 {
        (esp.wrapping_sub(4), 16 + 128 + 20)
    } else {
        (esp.wrapping_sub(8), 8)
    };
    let sc = pr.mm.read(cpu, frame + sc_at, 88)?;
    let w = |i: usize| u32::from_le_bytes([sc[4 * i], sc[4 * i + 1], sc[4 * i + 2], sc[4 * i + 3]]);
    let mask = if n == 173 {
        let m = pr.mm.read(cpu, frame + 144 + 20 + 88, 8)?;
        u64::from_le_bytes(m.try_into().expect("8 bytes"))
    } else {
        u64::from(w(20)) | u64::from(pr.mm.read_u32(cpu, frame + 8 + 88)?) << 32
    };
    cpu.regs = [w(11), w(10), w(9), w(8), w(7), w(6), w(5), w(4)];
    cpu.eip = w(14);
    // The flags user code may change (Linux's FIX_EFLAGS).
    const USER: u32 = 0x0004_0DD5 | (1 << 16);
    cpu.eflags = (cpu.eflags & !USER) | (w(16) & USER) | flags::FIXED1;
    for (s, i) in [
        (SegReg::Gs, 0),
        (SegReg::Fs, 1),
        (SegReg::Es, 2),
        (SegReg::Ds, 3),
    ] {
        let sel = (w(i) & 0xFFFF) as u16;
        if sel != cpu.seg(s).selector {
            let _ = cpu.load_seg(s, sel | 3);
        }
    }
    let fp = w(19);
    if fp != 0 {
        if let Ok(img) = pr.mm.read(cpu, fp, 512) {
            let mut a = [0u8; 512];
            a.copy_from_slice(&img);
            cpu.fpu.set_image(&a);
        }
    }
    pr.set_blocked(mask);
    // EAX is the saved one (the syscall's result is what the frame holds).
    Ok(cpu.regs[reg::EAX] as i32)
}

/// kill (37), tkill (238), tgkill (270): the host's kill, except for the
/// signals popek keeps to itself sent to the process itself.
pub(super) fn sys_kill(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { n, a, .. } = c;
    let (pid, sig) = match n {
        270 => (a[1] as i32, a[2] as i32),
        _ => (a[0] as i32, a[1] as i32),
    };
    if !(0..=64).contains(&sig) {
        return Err(EINVAL);
    }
    // tkill/tgkill naming one of this process's threads.
    if n != 37 && super::threads::signal_thread(pr, pid as u32, sig) {
        return Ok(0);
    }
    let me = std::process::id() as i32;
    if pid == me && reserved(sig) {
        if sig != 0 {
            pr.pending |= bit(sig);
            if pr.disposition(sig) == 0 || sig == SIGKILL {
                pr.killed = Some(sig);
            }
        }
        return Ok(0);
    }
    // SAFETY: the host's kill, with the guest's arguments.
    let r = unsafe { libc::kill(pid, sig) };
    if r < 0 {
        return Err(super::process::host_errno());
    }
    Ok(0)
}

/// sigaltstack (186): the alternate signal stack (stack_t: ss_sp,
/// ss_flags, ss_size).
pub(super) fn sys_sigaltstack(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    const SS_ONSTACK: u32 = 1;
    const SS_DISABLE: u32 = 2;
    let esp = cpu.regs[reg::ESP];
    let on = pr
        .altstack
        .is_some_and(|(sp, size)| esp.wrapping_sub(sp) < size);
    let old = match pr.altstack {
        Some((sp, size)) => [sp, if on { SS_ONSTACK } else { 0 }, size],
        None => [0, SS_DISABLE, 0],
    };
    if a[0] != 0 {
        let b = pr.mm.read(cpu, a[0], 12)?;
        let w = |i: usize| u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
        if on {
            return Err(EPERM);
        }
        let (sp, flags, size) = (w(0), w(1), w(2));
        if flags & !(SS_DISABLE | SS_ONSTACK | 0x8000_0000) != 0 {
            return Err(EINVAL);
        }
        pr.altstack = if flags & SS_DISABLE != 0 {
            None
        } else if size < 2048 {
            return Err(ENOMEM);
        } else {
            Some((sp, size))
        };
    }
    if a[1] != 0 {
        let b: Vec<u8> = old.iter().flat_map(|v| v.to_le_bytes()).collect();
        pr.mm.write(cpu, a[1], &b)?;
    }
    Ok(0)
}

/// alarm (27).
pub(super) fn sys_alarm(_pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { a, .. } = c;
    // SAFETY: plain host call.
    Ok(unsafe { libc::alarm(a[0]) } as i32)
}

/// setitimer (104), getitimer (105): the host's timers, with the i386
/// itimerval (four 32-bit words).
pub(super) fn sys_itimer(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let to_host = |w: &[u32]| libc::itimerval {
        it_interval: libc::timeval {
            tv_sec: w[0] as i32 as i64,
            tv_usec: w[1] as i32 as i64,
        },
        it_value: libc::timeval {
            tv_sec: w[2] as i32 as i64,
            tv_usec: w[3] as i32 as i64,
        },
    };
    // SAFETY: an all-zero itimerval is valid.
    let mut old: libc::itimerval = unsafe { std::mem::zeroed() };
    let (which, new, out) = if n == 104 {
        (a[0], a[1], a[2])
    } else {
        (a[0], 0, a[1])
    };
    let r = if n == 104 {
        let b = pr.mm.read(cpu, new, 16)?;
        let w: Vec<u32> = b
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let v = to_host(&w);
        // SAFETY: valid itimervals.
        unsafe { libc::setitimer(which as i32, &v, &mut old) }
    } else {
        // SAFETY: as above.
        unsafe { libc::getitimer(which as i32, &mut old) }
    };
    if r < 0 {
        return Err(super::process::host_errno());
    }
    if out != 0 {
        let mut b = Vec::new();
        for v in [
            old.it_interval.tv_sec,
            old.it_interval.tv_usec,
            old.it_value.tv_sec,
            old.it_value.tv_usec,
        ] {
            b.extend_from_slice(&(v as i32).to_le_bytes());
        }
        pr.mm.write(cpu, out, &b)?;
    }
    Ok(0)
}

/// rt_sigpending (176): the signals pending and blocked.
pub(super) fn sys_rt_sigpending(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    // SAFETY: an empty set for sigpending to fill.
    let host = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigpending(&mut set);
        set
    };
    let mut m = pr.pending | HOST_PENDING.load(Ordering::SeqCst);
    for s in 1..64 {
        // SAFETY: a valid set.
        if unsafe { libc::sigismember(&host, s) } == 1 {
            m |= bit(s);
        }
    }
    let b = ((m & pr.blocked) >> 1).to_le_bytes();
    pr.mm.write(cpu, a[0], &b[..a[1].min(8) as usize])?;
    Ok(0)
}

/// rt_sigtimedwait (177), rt_sigtimedwait_time64 (421): take one of the
/// given (blocked) signals without running its handler; the number, with
/// a siginfo of its number.
pub(super) fn sys_rt_sigtimedwait(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let b = pr.mm.read(cpu, a[0], a[3].min(8))?;
    let mut m = [0u8; 8];
    m[..b.len()].copy_from_slice(&b);
    let want = u64::from_le_bytes(m) << 1;
    let deadline = if a[2] == 0 {
        None
    } else {
        let (s, ns) = pr.read_timespec(cpu, a[2], n == 421)?;
        Some(
            std::time::Instant::now()
                + std::time::Duration::from_secs(s.max(0) as u64)
                + std::time::Duration::from_nanos(ns.max(0) as u64),
        )
    };
    let set = host_set(want);
    loop {
        pr.pending |= HOST_PENDING.swap(0, Ordering::SeqCst);
        if pr.pending & want != 0 {
            let sig = (pr.pending & want).trailing_zeros() as i32;
            pr.pending &= !bit(sig);
            let words = pr
                .siginfo
                .remove(&sig)
                .unwrap_or([sig as u32, 0, 0, 0, 0, 0, 0, 0]);
            if a[1] != 0 {
                let mut info = [0u8; 128];
                for (i, w) in words.iter().enumerate() {
                    info[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
                }
                pr.mm.write(cpu, a[1], &info)?;
            }
            return Ok(sig);
        }
        // A signal the host holds blocked for the guest: take it there.
        let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
        if left.is_some_and(|l| l.is_zero()) {
            return Err(EAGAIN);
        }
        let ts = left.map(|l| libc::timespec {
            tv_sec: l.as_secs() as i64,
            tv_nsec: i64::from(l.subsec_nanos()),
        });
        let mut host = [0u8; 128];
        // SAFETY: a valid set, room for a siginfo and a timespec (or
        // NULL: no limit).
        let r = unsafe {
            libc::sigtimedwait(
                &set,
                host.as_mut_ptr().cast(),
                ts.as_ref().map_or(std::ptr::null(), |t| t as *const _),
            )
        };
        if r > 0 {
            pr.pending |= bit(r);
            // The host's siginfo (signo, errno, code, a pad, pid, uid,
            // value) in i386's layout.
            let h = |k: usize| u32::from_ne_bytes(host[k..k + 4].try_into().expect("4 bytes"));
            pr.siginfo
                .insert(r, [r as u32, h(4), h(8), h(16), h(20), h(24), 0, 0]);
        } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN) {
            return Err(EAGAIN);
        } else if !pr.signal_pending() {
            continue;
        } else {
            return Err(EINTR);
        }
    }
}

/// rt_sigqueueinfo (178), rt_tgsigqueueinfo (335): a signal with the
/// sender's siginfo (sigqueue's value). To the process itself it is
/// queued with that siginfo, so an SA_SIGINFO handler sees si_code and
/// si_value; to a thread of it, or to another process (through the host,
/// whose siginfo layout differs: converted), it arrives as a plain signal.
pub(super) fn sys_rt_sigqueueinfo(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let (pid, tid, sig, at) = if n == 178 {
        (a[0], None, a[1] as i32, a[2])
    } else {
        (a[0], Some(a[1]), a[2] as i32, a[3])
    };
    if !(1..=64).contains(&sig) {
        return Err(EINVAL);
    }
    let b = pr.mm.read(cpu, at, 32)?;
    let w = |i: usize| u32::from_le_bytes(b[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    let me = std::process::id();
    if pid == me && tid.is_none_or(|t| t == pr.tid) {
        let mut info = [0u32; 8];
        for (i, v) in info.iter_mut().enumerate() {
            *v = w(i);
        }
        info[0] = sig as u32;
        pr.siginfo.insert(sig, info);
        pr.pending |= bit(sig);
        return Ok(0);
    }
    if let Some(t) = tid {
        if pid == me && super::threads::signal_thread(pr, t, sig) {
            return Ok(0);
        }
    }
    // The host's siginfo: signo, errno, code, a pad, then pid, uid and the
    // value (8 bytes).
    let mut host = [0u8; 128];
    for (k, v) in [
        (0, sig as u32),
        (4, w(1)),
        (8, w(2)),
        (16, w(3)),
        (20, w(4)),
        (24, w(5)),
    ] {
        host[k..k + 4].copy_from_slice(&v.to_ne_bytes());
    }
    // SAFETY: `host` is a siginfo's 128 bytes.
    let r = unsafe {
        match tid {
            None => libc::syscall(libc::SYS_rt_sigqueueinfo, pid as i32, sig, host.as_ptr()),
            Some(t) => libc::syscall(
                libc::SYS_rt_tgsigqueueinfo,
                pid as i32,
                t as i32,
                sig,
                host.as_ptr(),
            ),
        }
    };
    if r < 0 {
        return Err(super::process::host_errno());
    }
    Ok(0)
}
