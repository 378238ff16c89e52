//! Event descriptors: epoll, eventfd, timerfd and inotify, the host's.
//! Each is a host descriptor in the guest's table; reading and writing
//! them is `read` and `write` (their records have the same layout on
//! both). `struct epoll_event` is packed to 12 bytes on i386 and x86-64
//! alike, so the guest's events go to the host as they are (the data word
//! is the guest's, handed back untouched); only the descriptor epoll_ctl
//! names is the guest's and made the host's. The signal masks of
//! epoll_pwait and epoll_pwait2 are not applied (popek delivers the
//! guest's signals itself, between system calls).

use super::errno::*;
use super::process::{check, host_errno, File, LinuxProcess};
use super::syscalls::Call;

/// A host descriptor made for the guest, close-on-exec for the guest if
/// `flags` has O_CLOEXEC (EPOLL_CLOEXEC, EFD_CLOEXEC, TFD_CLOEXEC and
/// IN_CLOEXEC are all O_CLOEXEC).
fn install(pr: &mut LinuxProcess, h: i32, flags: u32) -> i32 {
    let g = pr.install(File::Host(h), 0);
    pr.set_cloexec(g, flags & libc::O_CLOEXEC as u32 != 0);
    g
}

/// epoll_create (254), epoll_create1 (329), epoll_ctl (255), epoll_wait
/// (256), epoll_pwait (319), epoll_pwait2 (441).
pub(super) fn sys_epoll(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    match n {
        254 | 329 => {
            if n == 254 && a[0] as i32 <= 0 {
                return Err(EINVAL);
            }
            let flags = if n == 329 { a[0] } else { 0 };
            // SAFETY: plain arguments; popek's descriptors are close-on-exec.
            let h = check(
                unsafe { libc::epoll_create1((flags | libc::O_CLOEXEC as u32) as i32) } as _,
            )?;
            Ok(install(pr, h, flags))
        }
        255 => {
            let (ep, fd) = (pr.host_fd(a[0])?, pr.host_fd(a[2])?);
            let mut ev = if a[3] == 0 {
                vec![0u8; 12]
            } else {
                pr.mm.read(cpu, a[3], 12)?
            };
            let p = if a[3] == 0 {
                std::ptr::null_mut()
            } else {
                ev.as_mut_ptr().cast::<libc::epoll_event>()
            };
            // SAFETY: `ev` holds one packed epoll_event (12 bytes).
            check(unsafe { libc::epoll_ctl(ep, a[1] as i32, fd, p) } as _)
        }
        _ => {
            let ep = pr.host_fd(a[0])?;
            let max = a[2] as i32;
            if max <= 0 || max > 1 << 16 {
                return Err(EINVAL);
            }
            let timeout = if n == 441 {
                if a[3] == 0 {
                    -1
                } else {
                    let (s, ns) = pr.read_timespec(cpu, a[3], true)?;
                    s.saturating_mul(1000)
                        .saturating_add((ns + 999_999) / 1_000_000)
                        .min(i64::from(i32::MAX)) as i32
                }
            } else {
                a[3] as i32
            };
            let at = a[1];
            pr.blocking(
                cpu,
                move || {
                    let mut out = vec![0u8; 12 * max as usize];
                    // SAFETY: `out` has room for `max` packed epoll_events.
                    let k = unsafe { libc::epoll_wait(ep, out.as_mut_ptr().cast(), max, timeout) };
                    if k < 0 {
                        return (-i64::from(host_errno()), Vec::new());
                    }
                    out.truncate(12 * k as usize);
                    (i64::from(k), out)
                },
                move |pr, cpu, k, out| {
                    if k < 0 {
                        return k as i32;
                    }
                    match pr.mm.write(cpu, at, &out) {
                        Ok(()) => k as i32,
                        Err(e) => -e,
                    }
                },
            )
        }
    }
}

/// eventfd (323), eventfd2 (328).
pub(super) fn sys_eventfd(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { n, a, .. } = c;
    let flags = if n == 328 { a[1] } else { 0 };
    // SAFETY: plain arguments.
    let h = check(unsafe { libc::eventfd(a[0], (flags | libc::O_CLOEXEC as u32) as i32) } as _)?;
    Ok(install(pr, h, flags))
}

/// An i386 itimerspec (four 32-bit words, or 64-bit with `wide`).
fn itimerspec(b: &[u8], wide: bool) -> libc::itimerspec {
    let v = |i: usize| {
        if wide {
            i64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8 bytes"))
        } else {
            i64::from(i32::from_le_bytes(
                b[4 * i..4 * i + 4].try_into().expect("4 bytes"),
            ))
        }
    };
    libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: v(0),
            tv_nsec: v(1),
        },
        it_value: libc::timespec {
            tv_sec: v(2),
            tv_nsec: v(3),
        },
    }
}

fn itimerspec_bytes(t: &libc::itimerspec, wide: bool) -> Vec<u8> {
    let v = [
        t.it_interval.tv_sec,
        t.it_interval.tv_nsec,
        t.it_value.tv_sec,
        t.it_value.tv_nsec,
    ];
    v.iter()
        .flat_map(|&x| {
            if wide {
                x.to_le_bytes().to_vec()
            } else {
                (x as i32).to_le_bytes().to_vec()
            }
        })
        .collect()
}

/// timerfd_create (322), timerfd_settime (325, 411), timerfd_gettime
/// (326, 410).
pub(super) fn sys_timerfd(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let wide = n == 410 || n == 411;
    let size = if wide { 32 } else { 16 };
    // SAFETY: an all-zero itimerspec is valid.
    let mut old: libc::itimerspec = unsafe { std::mem::zeroed() };
    match n {
        322 => {
            // SAFETY: plain arguments.
            let h = check(unsafe {
                libc::timerfd_create(a[0] as i32, (a[1] | libc::O_CLOEXEC as u32) as i32)
            } as _)?;
            Ok(install(pr, h, a[1]))
        }
        325 | 411 => {
            let h = pr.host_fd(a[0])?;
            let new = itimerspec(&pr.mm.read(cpu, a[2], size)?, wide);
            // SAFETY: `new` and `old` are valid itimerspecs.
            check(unsafe { libc::timerfd_settime(h, a[1] as i32, &new, &mut old) } as _)?;
            if a[3] != 0 {
                pr.mm.write(cpu, a[3], &itimerspec_bytes(&old, wide))?;
            }
            Ok(0)
        }
        _ => {
            let h = pr.host_fd(a[0])?;
            // SAFETY: `old` is valid to fill.
            check(unsafe { libc::timerfd_gettime(h, &mut old) } as _)?;
            pr.mm.write(cpu, a[1], &itimerspec_bytes(&old, wide))?;
            Ok(0)
        }
    }
}

/// inotify_init (291), inotify_init1 (332), inotify_add_watch (292),
/// inotify_rm_watch (293).
pub(super) fn sys_inotify(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    match n {
        291 | 332 => {
            let flags = if n == 332 { a[0] } else { 0 };
            // SAFETY: plain arguments.
            let h = check(
                unsafe { libc::inotify_init1((flags | libc::O_CLOEXEC as u32) as i32) } as _,
            )?;
            Ok(install(pr, h, flags))
        }
        292 => {
            let h = pr.host_fd(a[0])?;
            let path = pr.path(cpu, a[1])?;
            // SAFETY: a NUL-terminated path.
            check(unsafe { libc::inotify_add_watch(h, path.as_ptr(), a[2]) } as _)
        }
        _ => {
            let h = pr.host_fd(a[0])?;
            // SAFETY: plain arguments.
            check(unsafe { libc::inotify_rm_watch(h, a[1] as i32) } as _)
        }
    }
}

/// signalfd (321), signalfd4 (327): the host's. popek keeps the host's
/// blocked mask the guest's, so a signal the guest blocks to read it this
/// way stays pending on the host, where the descriptor reads it
/// (`signalfd_siginfo` has the same layout on both). Signals popek raises
/// for the guest itself (SIGPIPE from EPIPE, faults) do not show there.
pub(super) fn sys_signalfd(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    if a[2] != 8 {
        return Err(EINVAL);
    }
    let flags = if n == 327 { a[3] } else { 0 };
    let b = pr.mm.read(cpu, a[1], 8)?;
    let mask = u64::from_le_bytes(b.try_into().expect("8 bytes"));
    // SAFETY: sigemptyset/sigaddset fill a local set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in 1..=64 {
            if mask >> (sig - 1) & 1 != 0 {
                libc::sigaddset(&mut set, sig);
            }
        }
        set
    };
    let (fd, existing) = if a[0] as i32 == -1 {
        (-1, false)
    } else {
        (pr.host_fd(a[0])?, true)
    };
    // SAFETY: `set` is a valid signal set.
    let h =
        check(unsafe { libc::signalfd(fd, &set, (flags | libc::O_CLOEXEC as u32) as i32) } as _)?;
    if existing {
        return Ok(a[0] as i32);
    }
    Ok(install(pr, h, flags))
}

/// timer_create (259), timer_settime (260, 409), timer_gettime (261,
/// 408), timer_getoverrun (262), timer_delete (263): POSIX timers, the
/// host's (their ids are the kernel's). A timer signals the host process,
/// so the signal reaches the guest as any other from outside does (its
/// siginfo carries the signal number only). SIGEV_SIGNAL and SIGEV_NONE
/// are supported, and SIGEV_THREAD_ID naming the calling thread; another
/// thread (glibc's SIGEV_THREAD helper) is refused with EINVAL.
pub(super) fn sys_timer(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    const SIGEV_SIGNAL: i32 = 0;
    const SIGEV_NONE: i32 = 1;
    const SIGEV_THREAD_ID: i32 = 4;
    match n {
        259 => {
            // SAFETY: an all-zero sigevent is valid.
            let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
            if a[1] == 0 {
                sev.sigev_notify = SIGEV_SIGNAL;
                sev.sigev_signo = libc::SIGALRM;
            } else {
                let b = pr.mm.read(cpu, a[1], 16)?;
                let w = |i: usize| i32::from_le_bytes(b[4 * i..4 * i + 4].try_into().expect("4"));
                sev.sigev_value = libc::sigval {
                    sival_ptr: w(0) as u32 as usize as *mut libc::c_void,
                };
                sev.sigev_signo = w(1);
                sev.sigev_notify = w(2);
                match sev.sigev_notify {
                    SIGEV_SIGNAL | SIGEV_NONE => {}
                    SIGEV_THREAD_ID if w(3) as u32 == pr.tid => {
                        // SAFETY: gettid cannot fail.
                        sev.sigev_notify_thread_id = unsafe { libc::gettid() };
                    }
                    _ => return Err(EINVAL),
                }
            }
            let mut id: i32 = 0;
            // SAFETY: `sev` and `id` are valid for the call.
            check(unsafe {
                libc::syscall(
                    libc::SYS_timer_create,
                    a[0] as i32,
                    &sev as *const libc::sigevent,
                    &mut id as *mut i32,
                )
            })?;
            pr.mm.write_u32(cpu, a[2], id as u32)?;
            Ok(0)
        }
        260 | 409 => {
            let wide = n == 409;
            let new = itimerspec(&pr.mm.read(cpu, a[2], if wide { 32 } else { 16 })?, wide);
            // SAFETY: an all-zero itimerspec is valid.
            let mut old: libc::itimerspec = unsafe { std::mem::zeroed() };
            // SAFETY: `new` and `old` are valid itimerspecs.
            check(unsafe {
                libc::syscall(
                    libc::SYS_timer_settime,
                    a[0] as i32,
                    a[1] as i32,
                    &new as *const libc::itimerspec,
                    &mut old as *mut libc::itimerspec,
                )
            })?;
            if a[3] != 0 {
                pr.mm.write(cpu, a[3], &itimerspec_bytes(&old, wide))?;
            }
            Ok(0)
        }
        261 | 408 => {
            // SAFETY: an all-zero itimerspec is valid.
            let mut now: libc::itimerspec = unsafe { std::mem::zeroed() };
            // SAFETY: `now` is valid to fill.
            check(unsafe {
                libc::syscall(
                    libc::SYS_timer_gettime,
                    a[0] as i32,
                    &mut now as *mut libc::itimerspec,
                )
            })?;
            pr.mm.write(cpu, a[1], &itimerspec_bytes(&now, n == 408))?;
            Ok(0)
        }
        _ => {
            let call = if n == 262 {
                libc::SYS_timer_getoverrun
            } else {
                libc::SYS_timer_delete
            };
            // SAFETY: a plain argument.
            check(unsafe { libc::syscall(call, a[0] as i32) })
        }
    }
}
