//! The system-call handlers, one function per call (or family of calls
//! sharing a shape, such as `open` and `openat`); the table in
//! [`super::syscalls`] names each one's numbers.

use std::ffi::CString;

use super::errno::*;
use super::mm::{page_up, PAGE};
use super::process::{host, host_errno, ids, now, stat64, File, LinuxProcess, AT_FDCWD};
use super::syscalls::Call;

/// exit, exit_group.
pub(super) fn sys_exit(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { n, a, .. } = c;
    let status = (a[0] & 0xFF) as i32;
    if n == 1 && pr.group.is_some() {
        // One thread of several.
        pr.thread_exited = Some(status);
    } else {
        pr.exited = Some(status);
    }
    Ok(0)
}

/// read.
pub(super) fn sys_read(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    if pr.group.is_some() {
        if let Ok(File::Host(h)) = pr.file(a[0]) {
            // A thread of several reads outside the process lock (a pipe
            // another thread writes, a terminal).
            let (h, addr, len) = (*h, a[1], a[2].min(1 << 24) as usize);
            pr.block = Some(super::threads::Block::Host {
                run: Box::new(move || {
                    let mut buf = vec![0u8; len];
                    // SAFETY: the buffer is `buf`; `h` is the process's.
                    let n = host(unsafe { libc::read(h, buf.as_mut_ptr().cast(), len) } as _);
                    (i64::from(n), buf)
                }),
                finish: Box::new(move |pr, cpu, n, buf| {
                    if n > 0 {
                        if let Err(e) = pr.mm.write(cpu, addr, &buf[..n as usize]) {
                            return -e;
                        }
                    }
                    n as i32
                }),
            });
            return Ok(0);
        }
    }
    Ok(pr.do_read(cpu, a[0], a[1], a[2]))
}

/// write.
pub(super) fn sys_write(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call {
        cpu, a, out, err, ..
    } = c;
    let data = pr.mm.read(cpu, a[1], a[2])?;
    Ok(pr.do_write(a[0], &data, out, err))
}

/// readv.
pub(super) fn sys_readv(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    let mut total = 0;
    for (base, len) in pr.iovecs(cpu, a[1], a[2])? {
        let r = pr.do_read(cpu, a[0], base, len);
        if r < 0 {
            return if total > 0 { Ok(total) } else { Err(-r) };
        }
        total += r;
        if (r as u32) < len {
            break;
        }
    }
    Ok(total)
}

/// sendfile, sendfile64.
pub(super) fn sys_sendfile(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call {
        cpu,
        n,
        a,
        out,
        err,
        ..
    } = c;
    pr.sendfile(cpu, n == 239, a, out, err)
}

/// writev.
pub(super) fn sys_writev(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call {
        cpu, a, out, err, ..
    } = c;
    let mut data = Vec::new();
    for (base, len) in pr.iovecs(cpu, a[1], a[2])? {
        data.extend(pr.mm.read(cpu, base, len)?);
    }
    Ok(pr.do_write(a[0], &data, out, err))
}

/// open, openat.
pub(super) fn sys_open(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let (dir, path, flags, mode) = if n == 5 {
        (AT_FDCWD, a[0], a[1], a[2])
    } else {
        (pr.dirfd(a[0])?, a[1], a[2], a[3])
    };
    let p = pr.path(cpu, path)?;
    // SAFETY: `p` is a NUL-terminated path; flags are Linux's
    // (the same values on i386 and x86-64).
    let h =
        host(unsafe { libc::openat(dir, p.as_ptr(), flags as i32 | libc::O_CLOEXEC, mode) } as _);
    if h < 0 {
        return Err(-h);
    }
    let fd = pr.install(File::Host(h), 0);
    pr.set_cloexec(fd, flags & libc::O_CLOEXEC as u32 != 0);
    Ok(fd)
}

/// close.
pub(super) fn sys_close(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { a, .. } = c;
    Ok(pr.close(a[0]))
}

/// unlink, unlinkat, rmdir.
pub(super) fn sys_unlink(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let (dir, path, flags) = match n {
        10 => (AT_FDCWD, a[0], 0),
        40 => (AT_FDCWD, a[0], libc::AT_REMOVEDIR as u32),
        _ => (pr.dirfd(a[0])?, a[1], a[2]),
    };
    let p = pr.path(cpu, path)?;
    // SAFETY: NUL-terminated path.
    Ok(host(
        unsafe { libc::unlinkat(dir, p.as_ptr(), flags as i32) } as _,
    ))
}

/// chdir.
pub(super) fn sys_chdir(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    let p = pr.path(cpu, a[0])?;
    // SAFETY: NUL-terminated path.
    Ok(host(unsafe { libc::chdir(p.as_ptr()) } as _))
}

/// time.
pub(super) fn sys_time(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    let t = now(libc::CLOCK_REALTIME).0 as u32;
    if a[0] != 0 {
        pr.mm.write_u32(cpu, a[0], t)?;
    }
    Ok(t as i32)
}

/// lseek.
pub(super) fn sys_lseek(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { a, .. } = c;
    let h = pr.seekable(a[0])?;
    // SAFETY: plain lseek on an owned fd.
    let r = unsafe { libc::lseek(h, i64::from(a[1] as i32), a[2] as i32) };
    if r < 0 {
        return Err(host_errno());
    }
    if r > i64::from(i32::MAX) {
        return Err(EOVERFLOW);
    }
    Ok(r as i32)
}

/// _llseek.
pub(super) fn sys_llseek(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    let h = pr.seekable(a[0])?;
    let off = (i64::from(a[1]) << 32) | i64::from(a[2]);
    // SAFETY: plain lseek on an owned fd.
    let r = unsafe { libc::lseek(h, off, a[4] as i32) };
    if r < 0 {
        return Err(host_errno());
    }
    pr.mm.write(cpu, a[3], &r.to_le_bytes())?;
    Ok(0)
}

/// getpid, gettid, set_tid_address.
pub(super) fn sys_getpid(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { n, a, .. } = c;
    // popek's own process stands for the guest's; gettid and
    // set_tid_address answer the running thread's id.
    match n {
        224 => Ok(pr.tid as i32),
        258 => {
            pr.clear_tid = a[0];
            Ok(pr.tid as i32)
        }
        _ => Ok(std::process::id() as i32),
    }
}

/// Calls that succeed without doing anything popek models: madvise (a
/// hint), sched_yield (one thread), set_robust_list (no futex cleanup).
pub(super) fn sys_accept(_pr: &mut LinuxProcess, _c: Call<'_>) -> Result<i32, Errno> {
    Ok(0)
}

/// getppid.
pub(super) fn sys_getppid(_pr: &mut LinuxProcess, _c: Call<'_>) -> Result<i32, Errno> {
    Ok(std::os::unix::process::parent_id() as i32)
}

/// getuid32, getgid32, geteuid32, getegid32.
pub(super) fn sys_ids(_pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { n, .. } = c;
    Ok(ids()[(n - 199) as usize] as i32)
}

/// access, faccessat, faccessat2.
pub(super) fn sys_access(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let (dir, path, mode) = if n == 33 {
        (AT_FDCWD, a[0], a[1])
    } else {
        (pr.dirfd(a[0])?, a[1], a[2])
    };
    let p = pr.path(cpu, path)?;
    // SAFETY: NUL-terminated path.
    Ok(host(
        unsafe { libc::faccessat(dir, p.as_ptr(), mode as i32, 0) } as _,
    ))
}

/// rename, renameat.
pub(super) fn sys_rename(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let (d1, p1, d2, p2) = if n == 38 {
        (AT_FDCWD, a[0], AT_FDCWD, a[1])
    } else {
        (pr.dirfd(a[0])?, a[1], pr.dirfd(a[2])?, a[3])
    };
    let (p1, p2) = (pr.path(cpu, p1)?, pr.path(cpu, p2)?);
    // SAFETY: NUL-terminated paths.
    Ok(host(
        unsafe { libc::renameat(d1, p1.as_ptr(), d2, p2.as_ptr()) } as _,
    ))
}

/// mkdir, mkdirat.
pub(super) fn sys_mkdir(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let (dir, path, mode) = if n == 39 {
        (AT_FDCWD, a[0], a[1])
    } else {
        (pr.dirfd(a[0])?, a[1], a[2])
    };
    let p = pr.path(cpu, path)?;
    // SAFETY: NUL-terminated path.
    Ok(host(unsafe { libc::mkdirat(dir, p.as_ptr(), mode) } as _))
}

/// dup.
pub(super) fn sys_dup(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { a, .. } = c;
    let f = pr.dup_file(a[0])?;
    Ok(pr.install(f, 0))
}

/// dup2, dup3.
pub(super) fn sys_dup2(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { n, a, .. } = c;
    if n == 330 && a[0] == a[1] {
        return Err(EINVAL);
    }
    let f = pr.dup_file(a[0])?;
    if a[0] == a[1] {
        return Ok(a[1] as i32);
    }
    if a[1] > 65535 {
        return Err(EBADF);
    }
    pr.close(a[1]);
    let fd = pr.install(f, a[1] as usize);
    // dup3's O_CLOEXEC.
    pr.set_cloexec(fd, n == 330 && a[2] & libc::O_CLOEXEC as u32 != 0);
    Ok(fd)
}

/// pipe, pipe2.
pub(super) fn sys_pipe(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for two fds.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if r < 0 {
        return Err(host_errno());
    }
    let g0 = pr.install(File::Host(fds[0]), 0) as u32;
    let g1 = pr.install(File::Host(fds[1]), 0) as u32;
    // pipe2's O_CLOEXEC.
    let cloexec = n == 331 && a[1] & libc::O_CLOEXEC as u32 != 0;
    pr.set_cloexec(g0 as i32, cloexec);
    pr.set_cloexec(g1 as i32, cloexec);
    let mut b = g0.to_le_bytes().to_vec();
    b.extend(g1.to_le_bytes());
    pr.mm.write(cpu, a[0], &b)?;
    Ok(0)
}

/// brk.
pub(super) fn sys_brk(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    Ok(pr.mm.set_brk(cpu, a[0]) as i32)
}

/// ioctl.
pub(super) fn sys_ioctl(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    pr.ioctl(cpu, a)
}

/// umask.
pub(super) fn sys_umask(_pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { a, .. } = c;
    // SAFETY: umask cannot fail.
    Ok(unsafe { libc::umask(a[0] & 0o777) as i32 })
}

/// gettimeofday.
pub(super) fn sys_gettimeofday(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    if a[0] != 0 {
        let (s, ns) = now(libc::CLOCK_REALTIME);
        let mut b = (s as u32).to_le_bytes().to_vec();
        b.extend(((ns / 1000) as u32).to_le_bytes());
        pr.mm.write(cpu, a[0], &b)?;
    }
    if a[1] != 0 {
        pr.mm.write(cpu, a[1], &[0; 8])?;
    }
    Ok(0)
}

/// readlink, readlinkat.
pub(super) fn sys_readlink(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let (dir, path, buf, len) = if n == 85 {
        (AT_FDCWD, a[0], a[1], a[2])
    } else {
        (pr.dirfd(a[0])?, a[1], a[2], a[3])
    };
    let raw = pr.mm.read_cstr(cpu, path)?;
    let target = if raw == b"/proc/self/exe" {
        pr.start.exe.as_os_str().as_encoded_bytes().to_vec()
    } else {
        let p = CString::new(raw).map_err(|_| EINVAL)?;
        let mut t = vec![0u8; 4096];
        // SAFETY: NUL-terminated path, buffer of its length.
        let r = unsafe { libc::readlinkat(dir, p.as_ptr(), t.as_mut_ptr().cast(), t.len()) };
        if r < 0 {
            return Err(host_errno());
        }
        t.truncate(r as usize);
        t
    };
    let k = target.len().min(len as usize);
    pr.mm.write(cpu, buf, &target[..k])?;
    Ok(k as i32)
}

/// mmap.
pub(super) fn sys_mmap(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    let b = pr.mm.read(cpu, a[0], 24)?;
    let w: Vec<u32> = b
        .chunks(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if w[5] & (PAGE - 1) != 0 {
        return Err(EINVAL);
    }
    pr.mmap(cpu, [w[0], w[1], w[2], w[3], w[4], w[5] / PAGE])
}

/// mmap2.
pub(super) fn sys_mmap2(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    pr.mmap(cpu, a)
}

/// munmap.
pub(super) fn sys_munmap(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    if a[0] & (PAGE - 1) != 0 || a[1] == 0 {
        return Err(EINVAL);
    }
    let end = a[0].checked_add(page_up(a[1])).ok_or(EINVAL)?;
    pr.mm.unmap(cpu, a[0], end);
    Ok(0)
}

/// mprotect.
pub(super) fn sys_mprotect(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    if a[0] & (PAGE - 1) != 0 {
        return Err(EINVAL);
    }
    let end = a[0].checked_add(page_up(a[1])).ok_or(ENOMEM)?;
    pr.mm.protect(cpu, a[0], end, a[2] & 7)?;
    Ok(0)
}

/// mremap.
pub(super) fn sys_mremap(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    pr.mremap(cpu, a)
}

/// sysinfo.
pub(super) fn sys_sysinfo(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    pr.sysinfo(cpu, a[0])
}

/// uname.
pub(super) fn sys_uname(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    // SAFETY: a zeroed utsname is valid for uname to fill.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid utsname.
    unsafe { libc::uname(&mut u) };
    let mut b = Vec::with_capacity(390);
    for f in [
        &u.sysname,
        &u.nodename,
        &u.release,
        &u.version,
        &u.machine,
        &u.domainname,
    ] {
        b.extend(f.iter().take(65).map(|&c| c as u8));
    }
    pr.mm.write(cpu, a[0], &b)?;
    Ok(0)
}

/// nanosleep.
pub(super) fn sys_nanosleep(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    let t = pr.mm.read(cpu, a[0], 8)?;
    pr.sleep(
        cpu,
        i64::from(i32::from_le_bytes([t[0], t[1], t[2], t[3]])),
        i64::from(i32::from_le_bytes([t[4], t[5], t[6], t[7]])),
        a[1],
        false,
    )?;
    Ok(0)
}

/// clock_nanosleep, clock_nanosleep_time64.
pub(super) fn sys_clock_nanosleep(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let t = if n == 267 {
        let t = pr.mm.read(cpu, a[2], 8)?;
        (
            i64::from(i32::from_le_bytes([t[0], t[1], t[2], t[3]])),
            i64::from(i32::from_le_bytes([t[4], t[5], t[6], t[7]])),
        )
    } else {
        let t = pr.mm.read(cpu, a[2], 16)?;
        (
            i64::from_le_bytes(t[..8].try_into().unwrap_or_default()),
            i64::from_le_bytes(t[8..].try_into().unwrap_or_default()),
        )
    };
    let (mut s, mut ns) = t;
    // The time left is written only for a relative sleep.
    let mut rem = a[3];
    if a[1] & 1 != 0 {
        // TIMER_ABSTIME
        let (cs, cns) = now(a[0] as i32);
        let d = (s * 1_000_000_000 + ns) - (cs * 1_000_000_000 + cns);
        (s, ns) = (d.max(0) / 1_000_000_000, d.max(0) % 1_000_000_000);
        rem = 0;
    }
    pr.sleep(cpu, s, ns, rem, n != 267)?;
    Ok(0)
}

/// prctl.
pub(super) fn sys_prctl(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    Ok(match a[0] {
        // PR_SET_NAME, PR_GET_NAME
        15 => 0,
        16 => {
            pr.mm.write(cpu, a[1], b"popek-guest\0\0\0\0\0")?;
            0
        }
        _ => return Err(EINVAL),
    })
}

/// getcwd.
pub(super) fn sys_getcwd(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    let cwd = std::env::current_dir().map_err(|_| ENOENT)?;
    let mut b = cwd.as_os_str().as_encoded_bytes().to_vec();
    b.push(0);
    if b.len() > a[1] as usize {
        return Err(ERANGE);
    }
    pr.mm.write(cpu, a[0], &b)?;
    Ok(b.len() as i32)
}

/// getrlimit (76), setrlimit (75), ugetrlimit (191), prlimit64 (340).
/// The limits are the host process's (a guest that lowers its descriptor
/// limit lowers popek's), but for those on the address space (RLIMIT_DATA,
/// RLIMIT_STACK, RLIMIT_RSS, RLIMIT_AS), which would bound popek's own
/// reservations: the guest's are kept in the process, reported back and
/// not enforced. The i386 `rlimit` has 32-bit words (infinity
/// 0xffffffff; getrlimit, the old call, says 0x7fffffff); prlimit64's are
/// 64-bit.
pub(super) fn sys_rlimit(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    const INFINITY: u64 = u64::MAX;
    let Call { cpu, n, a, .. } = c;
    let (res, new, old) = match n {
        76 | 191 => (a[0], 0, a[1]),
        75 => (a[0], a[1], 0),
        _ => {
            let pid = a[0];
            if pid != 0 && pid != std::process::id() && pid != pr.tid && pid < 1 << 28 {
                return Err(ESRCH);
            }
            (a[1], a[2], a[3])
        }
    };
    if res >= 16 {
        return Err(EINVAL);
    }
    let kept = matches!(res, 2 | 3 | 5 | 9);
    let now = match pr.rlimits[res as usize] {
        Some(v) if kept => v,
        _ => {
            // SAFETY: a zeroed rlimit is valid for getrlimit to fill.
            let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
            // SAFETY: `rl` is valid.
            if unsafe { libc::getrlimit(res as _, &mut rl) } < 0 {
                return Err(host_errno());
            }
            (rl.rlim_cur, rl.rlim_max)
        }
    };
    if new != 0 {
        let (cur, max) = if n == 75 {
            let b = pr.mm.read(cpu, new, 8)?;
            let w = |i: usize| match u32::from_le_bytes(b[4 * i..4 * i + 4].try_into().expect("4"))
            {
                u32::MAX => INFINITY,
                v => u64::from(v),
            };
            (w(0), w(1))
        } else {
            let b = pr.mm.read(cpu, new, 16)?;
            let q = |i: usize| u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8"));
            (q(0), q(1))
        };
        if cur > max {
            return Err(EINVAL);
        }
        if kept {
            // SAFETY: geteuid cannot fail.
            if max > now.1 && unsafe { libc::geteuid() } != 0 {
                return Err(EPERM);
            }
            pr.rlimits[res as usize] = Some((cur, max));
        } else {
            let rl = libc::rlimit {
                rlim_cur: cur,
                rlim_max: max,
            };
            // SAFETY: `rl` is valid.
            if unsafe { libc::setrlimit(res as _, &rl) } < 0 {
                return Err(host_errno());
            }
        }
    }
    if old != 0 {
        let b = match n {
            340 => [now.0.to_le_bytes(), now.1.to_le_bytes()].concat(),
            _ => {
                let top = if n == 76 {
                    0x7FFF_FFFF
                } else {
                    u64::from(u32::MAX)
                };
                let c = |v: u64| v.min(top) as u32;
                [c(now.0).to_le_bytes(), c(now.1).to_le_bytes()].concat()
            }
        };
        pr.mm.write(cpu, old, &b)?;
    }
    Ok(0)
}

/// stat64, lstat64, fstat64, fstatat64.
pub(super) fn sys_stat64(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let (dir, path, buf, flags) = match n {
        195 => (AT_FDCWD, Some(a[0]), a[1], 0),
        196 => (AT_FDCWD, Some(a[0]), a[1], libc::AT_SYMLINK_NOFOLLOW as u32),
        197 => (pr.host_fd(a[0])?, None, a[1], libc::AT_EMPTY_PATH as u32),
        _ => (pr.dirfd(a[0])?, Some(a[1]), a[2], a[3]),
    };
    let p = match path {
        Some(p) => pr.path(cpu, p)?,
        None => CString::default(),
    };
    // SAFETY: a zeroed stat is valid for fstatat to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: NUL-terminated path, valid stat.
    if unsafe { libc::fstatat(dir, p.as_ptr(), &mut st, flags as i32) } < 0 {
        return Err(host_errno());
    }
    pr.mm.write(cpu, buf, &stat64(&st))?;
    Ok(0)
}

/// statx.
pub(super) fn sys_statx(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    let dir = pr.dirfd(a[0])?;
    let p = pr.path(cpu, a[1])?;
    let mut b = [0u8; 256];
    // SAFETY: NUL-terminated path; struct statx is 256 bytes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_statx,
            dir,
            p.as_ptr(),
            a[2] as i32,
            a[3],
            b.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(host_errno());
    }
    pr.mm.write(cpu, a[4], &b)?;
    Ok(0)
}

/// getdents64.
pub(super) fn sys_getdents64(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    let h = pr.host_fd(a[0])?;
    let mut b = vec![0u8; a[2].min(1 << 20) as usize];
    // SAFETY: the buffer is `b`; linux_dirent64 is the same on both ABIs.
    let r = unsafe { libc::syscall(libc::SYS_getdents64, h, b.as_mut_ptr(), b.len()) };
    if r < 0 {
        return Err(host_errno());
    }
    pr.mm.write(cpu, a[1], &b[..r as usize])?;
    Ok(r as i32)
}

/// fcntl (55), fcntl64 (221). Record locks are the host's, their
/// `struct flock` converted: i386's has 32-bit offsets (F_GETLK 5,
/// F_SETLK 6, F_SETLKW 7), its `flock64` 64-bit ones 4-byte aligned, 24
/// bytes (F_GETLK64 12 ... F_SETLKW64 14, and the open-file-description
/// locks 36-38).
pub(super) fn sys_fcntl64(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    let (host_cmd, wide) = match a[1] {
        5..=7 => (a[1] as i32, false),
        12..=14 => (a[1] as i32 - 7, true),
        36..=38 => (a[1] as i32, true),
        _ => return pr.fcntl(a),
    };
    let h = pr.host_fd(a[0])?;
    let b = pr.mm.read(cpu, a[2], if wide { 24 } else { 16 })?;
    let h16 = |i: usize| i16::from_le_bytes([b[i], b[i + 1]]);
    let w32 = |i: usize| i32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    let w64 = |i: usize| i64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    // SAFETY: an all-zero flock is valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = h16(0);
    fl.l_whence = h16(2);
    if wide {
        (fl.l_start, fl.l_len, fl.l_pid) = (w64(4), w64(12), w32(20));
    } else {
        (fl.l_start, fl.l_len, fl.l_pid) = (w32(4).into(), w32(8).into(), w32(12));
    }
    // SAFETY: `fl` is a valid flock for the lock command.
    let r = unsafe { libc::fcntl(h, host_cmd, &mut fl) };
    if r < 0 {
        return Err(host_errno());
    }
    if matches!(a[1], 5 | 12 | 36) {
        let mut out = fl.l_type.to_le_bytes().to_vec();
        out.extend(fl.l_whence.to_le_bytes());
        if wide {
            out.extend(fl.l_start.to_le_bytes());
            out.extend(fl.l_len.to_le_bytes());
        } else {
            if fl.l_start > i64::from(i32::MAX) || fl.l_len > i64::from(i32::MAX) {
                return Err(EOVERFLOW);
            }
            out.extend((fl.l_start as i32).to_le_bytes());
            out.extend((fl.l_len as i32).to_le_bytes());
        }
        out.extend(fl.l_pid.to_le_bytes());
        pr.mm.write(cpu, a[2], &out)?;
    }
    Ok(r)
}

/// set_thread_area.
pub(super) fn sys_set_thread_area(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    pr.set_thread_area(cpu, a[0])
}

/// clock_gettime, clock_gettime64.
pub(super) fn sys_clock_gettime(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let (s, ns) = now(a[0] as i32);
    let b: Vec<u8> = if n == 265 {
        [(s as u32).to_le_bytes(), (ns as u32).to_le_bytes()].concat()
    } else {
        [s.to_le_bytes(), ns.to_le_bytes()].concat()
    };
    pr.mm.write(cpu, a[1], &b)?;
    Ok(0)
}

/// getrandom.
pub(super) fn sys_getrandom(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    let mut b = vec![0u8; a[1].min(1 << 20) as usize];
    super::fill_random(&mut b, &mut pr.start.random_seed);
    pr.mm.write(cpu, a[0], &b)?;
    Ok(b.len() as i32)
}

/// Any other number: ENOSYS, reported once on stderr (rseq, which
/// glibc probes, silently).
pub(super) fn sys_unknown(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { n, err, .. } = c;
    if n != 386 && !pr.unknown_syscalls.contains(&n) {
        pr.unknown_syscalls.push(n);
        let _ = writeln!(err, "popek: unknown system call {n} returns -ENOSYS");
    }
    Err(ENOSYS)
}
