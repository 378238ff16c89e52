//! File-system calls that are the host's with the guest's arguments:
//! links, ownership, truncation, times, sync, statfs, and the CPU
//! affinity and priority calls that report on the host process. Paths go
//! through [`LinuxProcess::path`] (the sysroot and /proc/self/exe) and
//! descriptors through the guest's table.

use super::errno::*;
use super::process::{host_errno, LinuxProcess};
use super::syscalls::Call;

fn check(r: libc::c_int) -> Result<i32, Errno> {
    if r < 0 {
        Err(host_errno())
    } else {
        Ok(r)
    }
}

/// link (9), linkat (303), symlink (83), symlinkat (304).
pub(super) fn sys_link(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    // A symlink's target is its contents, not a path to look up.
    let target = |pr: &LinuxProcess, addr| {
        std::ffi::CString::new(pr.mm.read_cstr(cpu, addr)?).map_err(|_| EINVAL)
    };
    // SAFETY: NUL-terminated paths, descriptors this process owns.
    check(unsafe {
        match n {
            9 => libc::link(pr.path(cpu, a[0])?.as_ptr(), pr.path(cpu, a[1])?.as_ptr()),
            303 => libc::linkat(
                pr.dirfd(a[0])?,
                pr.path(cpu, a[1])?.as_ptr(),
                pr.dirfd(a[2])?,
                pr.path(cpu, a[3])?.as_ptr(),
                a[4] as i32,
            ),
            83 => libc::symlink(target(pr, a[0])?.as_ptr(), pr.path(cpu, a[1])?.as_ptr()),
            _ => libc::symlinkat(
                target(pr, a[0])?.as_ptr(),
                pr.dirfd(a[1])?,
                pr.path(cpu, a[2])?.as_ptr(),
            ),
        }
    })
}

/// chown32 (212), lchown32 (198), fchown32 (207), fchownat (298).
pub(super) fn sys_chown(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    // SAFETY: as above.
    check(unsafe {
        match n {
            212 => libc::chown(pr.path(cpu, a[0])?.as_ptr(), a[1], a[2]),
            198 => libc::lchown(pr.path(cpu, a[0])?.as_ptr(), a[1], a[2]),
            207 => libc::fchown(pr.host_fd(a[0])?, a[1], a[2]),
            _ => libc::fchownat(
                pr.dirfd(a[0])?,
                pr.path(cpu, a[1])?.as_ptr(),
                a[2],
                a[3],
                a[4] as i32,
            ),
        }
    })
}

/// truncate (92), ftruncate (93), truncate64 (193), ftruncate64 (194):
/// the 64-bit forms take the length in two registers.
pub(super) fn sys_truncate(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let len = match n {
        92 | 93 => i64::from(a[1] as i32),
        _ => (u64::from(a[2]) << 32 | u64::from(a[1])) as i64,
    };
    // SAFETY: as above.
    check(unsafe {
        match n {
            92 | 193 => libc::truncate(pr.path(cpu, a[0])?.as_ptr(), len),
            _ => libc::ftruncate(pr.host_fd(a[0])?, len),
        }
    })
}

/// sync (36), fsync (118), fdatasync (148), syncfs (344).
pub(super) fn sys_sync(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { n, a, .. } = c;
    // SAFETY: descriptors this process owns.
    check(unsafe {
        match n {
            36 => {
                libc::sync();
                0
            }
            118 => libc::fsync(pr.host_fd(a[0])?),
            148 => libc::fdatasync(pr.host_fd(a[0])?),
            _ => libc::syncfs(pr.host_fd(a[0])?),
        }
    })
}

/// utimensat (320, two i386 timespecs), utimensat_time64 (412), utimes
/// (271, two timevals).
pub(super) fn sys_utimensat(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let (dir, path, times, flags) = if n == 271 {
        (libc::AT_FDCWD as u32, a[0], a[1], 0)
    } else {
        (a[0], a[1], a[2], a[3])
    };
    let ts = if times == 0 {
        None
    } else {
        let words = if n == 412 { 8 } else { 4 };
        let b = pr.mm.read(cpu, times, 4 * words)?;
        let w = |i: usize| i32::from_le_bytes(b[4 * i..4 * i + 4].try_into().expect("4 bytes"));
        let q = |i: usize| i64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8 bytes"));
        let one = |k: usize| match n {
            412 => libc::timespec {
                tv_sec: q(2 * k),
                tv_nsec: q(2 * k + 1),
            },
            271 => libc::timespec {
                tv_sec: w(2 * k).into(),
                tv_nsec: i64::from(w(2 * k + 1)) * 1000,
            },
            _ => libc::timespec {
                tv_sec: w(2 * k).into(),
                tv_nsec: w(2 * k + 1).into(),
            },
        };
        Some([one(0), one(1)])
    };
    let tsp = ts.as_ref().map_or(std::ptr::null(), |t| t.as_ptr());
    let dirfd = if dir as i32 == libc::AT_FDCWD {
        libc::AT_FDCWD
    } else {
        pr.host_fd(dir)?
    };
    // SAFETY: a NUL-terminated path (or NULL: the descriptor itself) and
    // two timespecs (or NULL: now).
    check(unsafe {
        if path == 0 {
            libc::futimens(dirfd, tsp)
        } else {
            libc::utimensat(dirfd, pr.path(cpu, path)?.as_ptr(), tsp, flags as i32)
        }
    })
}

/// statfs64 (268), fstatfs64 (269): the i386 struct statfs64 (f_flags
/// reads 0: the host's libc does not show it).
pub(super) fn sys_statfs64(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    // SAFETY: an all-zero statfs is valid for the call to fill.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path or an owned descriptor; `st` is valid.
    check(unsafe {
        if n == 268 {
            libc::statfs(pr.path(cpu, a[0])?.as_ptr(), &mut st)
        } else {
            libc::fstatfs(pr.host_fd(a[0])?, &mut st)
        }
    })?;
    let mut b = Vec::with_capacity(84);
    b.extend_from_slice(&(st.f_type as u32).to_le_bytes());
    b.extend_from_slice(&(st.f_bsize as u32).to_le_bytes());
    for v in [st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    // SAFETY: fsid_t is two ints.
    let fsid: [i32; 2] = unsafe { std::mem::transmute(st.f_fsid) };
    b.extend_from_slice(&fsid[0].to_le_bytes());
    b.extend_from_slice(&fsid[1].to_le_bytes());
    for v in [st.f_namelen, st.f_frsize, 0] {
        b.extend_from_slice(&(v as u32).to_le_bytes());
    }
    b.extend_from_slice(&[0; 16]);
    let size = a[1].min(84) as usize;
    pr.mm.write(cpu, a[2], &b[..size])?;
    Ok(0)
}

/// sched_getaffinity (242): the host process's CPUs.
pub(super) fn sys_getaffinity(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    // SAFETY: an all-zero cpu_set_t is valid.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let pid = if a[0] == 0 { 0 } else { a[0] as i32 };
    // SAFETY: `set` is valid for its size.
    check(unsafe { libc::sched_getaffinity(pid, std::mem::size_of_val(&set), &mut set) })?;
    // SAFETY: cpu_set_t is plain bytes.
    let bytes: [u8; std::mem::size_of::<libc::cpu_set_t>()] = unsafe { std::mem::transmute(set) };
    // The kernel returns the size of its mask (a multiple of a long).
    let len = (a[1] as usize).min(128) & !3;
    if len < 4 {
        return Err(EINVAL);
    }
    pr.mm.write(cpu, a[2], &bytes[..len])?;
    Ok(len as i32)
}

/// getpriority (96), setpriority (97): the host's (getpriority returns
/// 20 - nice, as the system call does).
pub(super) fn sys_priority(_pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { n, a, .. } = c;
    // SAFETY: plain host calls; errno is cleared before getpriority, whose
    // -1 may be a valid result.
    unsafe {
        if n == 96 {
            *libc::__errno_location() = 0;
            let v = libc::getpriority(a[0], a[1]);
            if v == -1 && *libc::__errno_location() != 0 {
                return Err(host_errno());
            }
            Ok(20 - v)
        } else {
            check(libc::setpriority(a[0], a[1], a[2] as i32))
        }
    }
}
