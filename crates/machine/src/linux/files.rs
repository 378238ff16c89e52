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
/// (271, two timevals), futimesat (299, a directory and two timevals),
/// utime (30, a utimbuf: two seconds).
pub(super) fn sys_utimensat(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let (dir, path, times, flags) = match n {
        271 | 30 => (libc::AT_FDCWD as u32, a[0], a[1], 0),
        299 => (a[0], a[1], a[2], 0),
        _ => (a[0], a[1], a[2], a[3]),
    };
    let ts = if times == 0 {
        None
    } else {
        let words = match n {
            412 => 8,
            30 => 2,
            _ => 4,
        };
        let b = pr.mm.read(cpu, times, 4 * words)?;
        let w = |i: usize| i32::from_le_bytes(b[4 * i..4 * i + 4].try_into().expect("4 bytes"));
        let q = |i: usize| i64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8 bytes"));
        let one = |k: usize| match n {
            412 => libc::timespec {
                tv_sec: q(2 * k),
                tv_nsec: q(2 * k + 1),
            },
            271 | 299 => libc::timespec {
                tv_sec: w(2 * k).into(),
                tv_nsec: i64::from(w(2 * k + 1)) * 1000,
            },
            30 => libc::timespec {
                tv_sec: w(k).into(),
                tv_nsec: 0,
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

/// A 64-bit offset from two registers (low word first).
fn off64(lo: u32, hi: u32) -> i64 {
    (u64::from(hi) << 32 | u64::from(lo)) as i64
}

/// pread64 (180), pwrite64 (181): the offset in two registers.
pub(super) fn sys_pread(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let h = pr.seekable(a[0])?;
    let off = off64(a[3], a[4]);
    if n == 180 {
        let mut buf = vec![0u8; a[2].min(1 << 24) as usize];
        // SAFETY: `buf` has room for its length.
        let k = check(unsafe { libc::pread(h, buf.as_mut_ptr().cast(), buf.len(), off) } as _)?;
        pr.mm.write(cpu, a[1], &buf[..k as usize])?;
        Ok(k)
    } else {
        let data = pr.mm.read(cpu, a[1], a[2].min(1 << 24))?;
        // SAFETY: `data` holds its length.
        check(unsafe { libc::pwrite(h, data.as_ptr().cast(), data.len(), off) } as _)
    }
}

/// preadv (333), pwritev (334), preadv2 (378), pwritev2 (379): through
/// one buffer; offset -1 (the 2 forms) is the file position. (preadv2's
/// flags, hints such as RWF_HIPRI, are not passed on.)
pub(super) fn sys_preadv(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let h = pr.seekable(a[0])?;
    let off = off64(a[3], a[4]);
    let current = (n == 378 || n == 379) && off == -1;
    let vecs = pr.iovecs(cpu, a[1], a[2])?;
    let total: usize = vecs
        .iter()
        .map(|&(_, l)| l as usize)
        .sum::<usize>()
        .min(1 << 24);
    if n == 333 || n == 378 {
        let mut buf = vec![0u8; total];
        // SAFETY: `buf` has room for its length.
        let k = check(unsafe {
            if current {
                libc::read(h, buf.as_mut_ptr().cast(), buf.len())
            } else {
                libc::pread(h, buf.as_mut_ptr().cast(), buf.len(), off)
            }
        } as _)?;
        let mut at = 0usize;
        for (base, len) in vecs {
            let take = (len as usize).min(k as usize - at);
            if take == 0 {
                break;
            }
            pr.mm.write(cpu, base, &buf[at..at + take])?;
            at += take;
        }
        Ok(k)
    } else {
        let mut data = Vec::with_capacity(total);
        for (base, len) in vecs {
            data.extend(pr.mm.read(cpu, base, len)?);
        }
        data.truncate(total);
        // SAFETY: `data` holds its length.
        check(unsafe {
            if current {
                libc::write(h, data.as_ptr().cast(), data.len())
            } else {
                libc::pwrite(h, data.as_ptr().cast(), data.len(), off)
            }
        } as _)
    }
}

/// flock (143), fchdir (133), readahead (225), fallocate (324),
/// sync_file_range (314), fadvise64 (250): a descriptor and plain
/// arguments (64-bit ones in two registers).
pub(super) fn sys_fd_op(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { n, a, .. } = c;
    let h = pr.host_fd(a[0])?;
    // SAFETY: plain arguments on a descriptor this process owns.
    check(unsafe {
        match n {
            143 => libc::flock(h, a[1] as i32),
            133 => libc::fchdir(h),
            225 => libc::readahead(h, off64(a[1], a[2]), a[3] as usize) as i32,
            324 => libc::fallocate(h, a[1] as i32, off64(a[2], a[3]), off64(a[4], a[5])),
            314 => libc::sync_file_range(h, off64(a[1], a[2]), off64(a[3], a[4]), a[5]),
            _ => libc::posix_fadvise(h, off64(a[1], a[2]), i64::from(a[3]), a[4] as i32),
        }
    })
}

/// mknod (14), mknodat (297): the device number as the i386 call encodes
/// it (the same as the host's for 32-bit numbers).
pub(super) fn sys_mknod(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let (dir, path, mode, dev) = if n == 14 {
        (libc::AT_FDCWD, a[0], a[1], a[2])
    } else {
        (pr.dirfd(a[0])?, a[1], a[2], a[3])
    };
    let p = pr.path(cpu, path)?;
    // SAFETY: a NUL-terminated path.
    check(unsafe { libc::mknodat(dir, p.as_ptr(), mode, u64::from(dev)) })
}

/// chroot (61): the host's (popek's own root changes with it, as
/// qemu-i386's does).
pub(super) fn sys_chroot(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    let p = pr.path(cpu, a[0])?;
    // SAFETY: a NUL-terminated path.
    check(unsafe { libc::chroot(p.as_ptr()) })
}

/// close_range (436): close (or with CLOSE_RANGE_CLOEXEC, mark
/// close-on-exec) the guest's descriptors `first..=last`.
pub(super) fn sys_close_range(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { a, .. } = c;
    const UNSHARE: u32 = 1 << 1;
    const CLOEXEC: u32 = 1 << 2;
    if a[0] > a[1] || a[2] & !(UNSHARE | CLOEXEC) != 0 {
        return Err(EINVAL);
    }
    let last = a[1].min(pr.files.len().saturating_sub(1) as u32);
    for fd in a[0]..=last {
        if pr.file(fd).is_ok() {
            if a[2] & CLOEXEC != 0 {
                pr.set_cloexec(fd as i32, true);
            } else {
                pr.close(fd);
            }
        }
    }
    Ok(0)
}

/// msync (144), mlock (150), munlock (151), mlockall (152), munlockall
/// (153), mlock2 (376), mincore (218): guest memory is never written back
/// to a file or swapped out, so these only check the range (ENOMEM where
/// nothing is mapped); mincore says every mapped page is resident.
pub(super) fn sys_mem_hint(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    if n == 152 || n == 153 {
        return Ok(0);
    }
    let (start, len) = if n == 144 || n == 218 {
        if a[0] & (super::mm::PAGE - 1) != 0 {
            return Err(EINVAL);
        }
        (a[0], a[1])
    } else {
        (
            a[0] & !(super::mm::PAGE - 1),
            a[1] + (a[0] & (super::mm::PAGE - 1)),
        )
    };
    let end = start.checked_add(super::mm::page_up(len)).ok_or(ENOMEM)?;
    if len > 0 && !pr.mm.is_mapped(start, end) {
        return Err(ENOMEM);
    }
    if n == 218 {
        let pages = ((end - start) / super::mm::PAGE) as usize;
        pr.mm.write(cpu, a[2], &vec![1u8; pages])?;
    }
    Ok(0)
}

/// memfd_create (356): a host memfd in the guest's table (the guest's
/// MFD_CLOEXEC kept as its flag).
pub(super) fn sys_memfd_create(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    let name = std::ffi::CString::new(pr.mm.read_cstr(cpu, a[0])?).map_err(|_| EINVAL)?;
    // SAFETY: a NUL-terminated name; popek's descriptors are close-on-exec.
    let h = check(unsafe { libc::memfd_create(name.as_ptr(), a[1] | libc::MFD_CLOEXEC) })?;
    let g = pr.install(super::process::File::Host(h), 0);
    pr.set_cloexec(g, a[1] & libc::MFD_CLOEXEC != 0);
    Ok(g)
}

/// copy_file_range (377), splice (313), tee (315): the host's, the two
/// optional offsets of the first two (64-bit words in guest memory) read
/// and written back.
pub(super) fn sys_splice(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    if n == 315 {
        let (fin, fout) = (pr.host_fd(a[0])?, pr.host_fd(a[1])?);
        // SAFETY: plain arguments on descriptors this process owns.
        return check(unsafe { libc::tee(fin, fout, a[2] as usize, a[3]) } as libc::c_int);
    }
    let (fin, fout) = (pr.host_fd(a[0])?, pr.host_fd(a[2])?);
    let read_off = |pr: &LinuxProcess, at: u32| -> Result<Option<i64>, Errno> {
        if at == 0 {
            return Ok(None);
        }
        let b = pr.mm.read(cpu, at, 8)?;
        Ok(Some(i64::from_le_bytes(b.try_into().expect("8 bytes"))))
    };
    let (mut oin, mut oout) = (read_off(pr, a[1])?, read_off(pr, a[3])?);
    let ptr = |o: &mut Option<i64>| o.as_mut().map_or(std::ptr::null_mut(), |v| v as *mut i64);
    let (pin, pout) = (ptr(&mut oin), ptr(&mut oout));
    let (len, flags) = (a[4] as usize, a[5]);
    // SAFETY: the offsets point at locals or are null.
    let r = unsafe {
        if n == 377 {
            libc::copy_file_range(fin, pin, fout, pout, len, flags)
        } else {
            libc::splice(fin, pin, fout, pout, len, flags)
        }
    };
    let r = check(r as libc::c_int)?;
    for (at, o) in [(a[1], oin), (a[3], oout)] {
        if let Some(v) = o {
            pr.mm.write(cpu, at, &v.to_le_bytes())?;
        }
    }
    Ok(r)
}

/// The extended-attribute calls: setxattr (226), lsetxattr (227),
/// fsetxattr (228), getxattr (229), lgetxattr (230), fgetxattr (231),
/// listxattr (232), llistxattr (233), flistxattr (234), removexattr (235),
/// lremovexattr (236), fremovexattr (237): the host's.
pub(super) fn sys_xattr(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    // Which form: by path (0), by path not following a link (1), by
    // descriptor (2).
    let form = (n - 226) % 3;
    let op = (n - 226) / 3;
    let path = if form == 2 {
        None
    } else {
        Some(pr.path(cpu, a[0])?)
    };
    let fd = if form == 2 { pr.host_fd(a[0])? } else { -1 };
    let p = path.as_ref().map_or(std::ptr::null(), |p| p.as_ptr());
    let name = |at: u32| std::ffi::CString::new(pr.mm.read_cstr(cpu, at)?).map_err(|_| EINVAL);
    match op {
        // set: name, value, size, flags
        0 => {
            let nm = name(a[1])?;
            let v = pr.mm.read(cpu, a[2], a[3].min(1 << 16))?;
            let (vp, len, flags) = (v.as_ptr().cast(), v.len(), a[4] as i32);
            // SAFETY: NUL-terminated strings and a buffer of `len` bytes.
            check(unsafe {
                match form {
                    0 => libc::setxattr(p, nm.as_ptr(), vp, len, flags),
                    1 => libc::lsetxattr(p, nm.as_ptr(), vp, len, flags),
                    _ => libc::fsetxattr(fd, nm.as_ptr(), vp, len, flags),
                }
            })
        }
        // get: name, value, size; list: list, size
        1 | 2 => {
            let nm = if op == 1 { Some(name(a[1])?) } else { None };
            let (buf_at, size) = if op == 1 { (a[2], a[3]) } else { (a[1], a[2]) };
            let mut buf = vec![0u8; size.min(1 << 16) as usize];
            let (bp, len) = (buf.as_mut_ptr().cast(), buf.len());
            let np = nm.as_ref().map_or(std::ptr::null(), |n| n.as_ptr());
            // SAFETY: NUL-terminated strings and a buffer of `len` bytes.
            let r = unsafe {
                match (op, form) {
                    (1, 0) => libc::getxattr(p, np, bp, len),
                    (1, 1) => libc::lgetxattr(p, np, bp, len),
                    (1, _) => libc::fgetxattr(fd, np, bp, len),
                    (_, 0) => libc::listxattr(p, bp.cast(), len),
                    (_, 1) => libc::llistxattr(p, bp.cast(), len),
                    _ => libc::flistxattr(fd, bp.cast(), len),
                }
            };
            let r = check(r as libc::c_int)?;
            if size > 0 {
                pr.mm.write(cpu, buf_at, &buf[..r as usize])?;
            }
            Ok(r)
        }
        // remove: name
        _ => {
            let nm = name(a[1])?;
            // SAFETY: NUL-terminated strings.
            check(unsafe {
                match form {
                    0 => libc::removexattr(p, nm.as_ptr()),
                    1 => libc::lremovexattr(p, nm.as_ptr()),
                    _ => libc::fremovexattr(fd, nm.as_ptr()),
                }
            })
        }
    }
}
