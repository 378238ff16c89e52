//! System V message queues and semaphores: the host's (so they are shared
//! with every process on the host, popek's or not), through `ipc` (117,
//! the i386 multiplexer Debian's glibc uses) or the direct calls (393 ...
//! 402, semtimedop_time64 420). What differs on i386 is converted: a
//! message's type is a 32-bit long, semtimedop's timeout a 32-bit
//! timespec. The `*_ds` structures (IPC_STAT, IPC_SET, the INFO calls)
//! are not converted: those commands return EINVAL. Shared memory
//! segments are popek's own, files under /dev/shm (see [`Shm`]).

use popek_vcpu::Vcpu;

use super::errno::*;
use super::process::{check, host_errno, LinuxProcess};
use super::syscalls::Call;

/// The `ipc` multiplexer's calls (linux/ipc.h).
mod call {
    pub const SEMOP: u32 = 1;
    pub const SEMGET: u32 = 2;
    pub const SEMCTL: u32 = 3;
    pub const SEMTIMEDOP: u32 = 4;
    pub const MSGSND: u32 = 11;
    pub const MSGRCV: u32 = 12;
    pub const MSGGET: u32 = 13;
    pub const MSGCTL: u32 = 14;
    pub const SHMAT: u32 = 21;
    pub const SHMDT: u32 = 22;
    pub const SHMGET: u32 = 23;
    pub const SHMCTL: u32 = 24;
}

/// ipc (117): call, first, second, third, ptr, fifth.
pub(super) fn sys_ipc(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    let (first, second, third, ptr, fifth) = (a[1], a[2], a[3], a[4], a[5]);
    match a[0] & 0xFFFF {
        call::SEMOP => semop(pr, cpu, first, ptr, second, None),
        call::SEMTIMEDOP => semop(pr, cpu, first, ptr, second, Some((fifth, false))),
        call::SEMGET => semget(first, second, third),
        // (The fourth argument is a pointer to the union.)
        call::SEMCTL => {
            let arg = if ptr == 0 {
                0
            } else {
                pr.mm.read_u32(cpu, ptr)?
            };
            semctl(pr, cpu, first, second, third, arg)
        }
        call::MSGSND => msgsnd(pr, cpu, first, ptr, second, third),
        // Version 0 passes the buffer and type in a struct (ipc_kludge).
        call::MSGRCV => {
            let (buf, typ) = if a[0] >> 16 == 0 {
                (pr.mm.read_u32(cpu, ptr)?, pr.mm.read_u32(cpu, ptr + 4)?)
            } else {
                (ptr, fifth)
            };
            msgrcv(pr, cpu, first, buf, second, typ as i32, third)
        }
        call::MSGGET => msgget(first, second),
        call::MSGCTL => msgctl(first, second),
        // The address goes where `third` points.
        call::SHMAT => {
            let at = shmat(pr, cpu, first, ptr, second)?;
            pr.mm.write_u32(cpu, third, at)?;
            Ok(0)
        }
        call::SHMDT => shmdt(pr, cpu, ptr),
        call::SHMGET => shmget(first, second, third),
        call::SHMCTL => shmctl(pr, cpu, first, second, ptr),
        _ => Err(ENOSYS),
    }
}

/// The direct calls: semget (393), semctl (394), shmget (395), shmctl
/// (396), shmat (397), shmdt (398), msgget (399), msgsnd (400), msgrcv
/// (401), msgctl (402), semtimedop_time64 (420).
pub(super) fn sys_sysv(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    match n {
        393 => semget(a[0], a[1], a[2]),
        394 => semctl(pr, cpu, a[0], a[1], a[2], a[3]),
        395 => shmget(a[0], a[1], a[2]),
        396 => shmctl(pr, cpu, a[0], a[1], a[2]),
        397 => shmat(pr, cpu, a[0], a[1], a[2]).map(|at| at as i32),
        398 => shmdt(pr, cpu, a[0]),
        399 => msgget(a[0], a[1]),
        400 => msgsnd(pr, cpu, a[0], a[1], a[2], a[3]),
        401 => msgrcv(pr, cpu, a[0], a[1], a[2], a[3] as i32, a[4]),
        402 => msgctl(a[0], a[1]),
        _ => semop(pr, cpu, a[0], a[1], a[2], Some((a[3], true))),
    }
}

fn semget(key: u32, n: u32, flags: u32) -> Result<i32, Errno> {
    // SAFETY: plain arguments.
    check(unsafe { libc::semget(key as i32, n as i32, flags as i32) } as _)
}

fn msgget(key: u32, flags: u32) -> Result<i32, Errno> {
    // SAFETY: plain arguments.
    check(unsafe { libc::msgget(key as i32, flags as i32) } as _)
}

/// semop and semtimedop (the timeout a 32-bit timespec, or a 64-bit one
/// if `wide`): `struct sembuf` is the same on both.
fn semop(
    pr: &mut LinuxProcess,
    cpu: &mut Vcpu,
    id: u32,
    sops: u32,
    nsops: u32,
    timeout: Option<(u32, bool)>,
) -> Result<i32, Errno> {
    if nsops == 0 || nsops > 500 {
        return Err(if nsops == 0 { EINVAL } else { E2BIG });
    }
    let ops = pr.mm.read(cpu, sops, 6 * nsops)?;
    let ts = match timeout {
        Some((at, wide)) if at != 0 => {
            let (tv_sec, tv_nsec) = pr.read_timespec(cpu, at, wide)?;
            Some(libc::timespec { tv_sec, tv_nsec })
        }
        _ => None,
    };
    pr.blocking(
        cpu,
        move || {
            let tp = ts
                .as_ref()
                .map_or(std::ptr::null(), |t| t as *const libc::timespec);
            // SAFETY: `ops` holds `nsops` sembufs; `tp` a timespec or null.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_semtimedop,
                    id as i32,
                    ops.as_ptr(),
                    nsops as usize,
                    tp,
                )
            };
            let r = if r < 0 { -i64::from(host_errno()) } else { r };
            (r, Vec::new())
        },
        |_, _, r, _| r as i32,
    )
}

/// semctl: the value commands, GETALL and SETALL (arrays of 16-bit
/// values), IPC_RMID; the `semid_ds` ones are refused.
fn semctl(
    pr: &mut LinuxProcess,
    cpu: &mut Vcpu,
    id: u32,
    num: u32,
    cmd: u32,
    arg: u32,
) -> Result<i32, Errno> {
    const IPC_RMID: u32 = 0;
    const GETPID: u32 = 11;
    const GETVAL: u32 = 12;
    const GETALL: u32 = 13;
    const GETNCNT: u32 = 14;
    const GETZCNT: u32 = 15;
    const SETVAL: u32 = 16;
    const SETALL: u32 = 17;
    let (id, num) = (id as i32, num as i32);
    // (IPC_64, which glibc adds to the command, changes only the *_ds
    // layouts.)
    let cmd = cmd & !0x100;
    // SAFETY: plain arguments, or an array of the semaphores' count.
    unsafe {
        match cmd {
            IPC_RMID | GETPID | GETVAL | GETNCNT | GETZCNT => {
                check(libc::semctl(id, num, cmd as i32) as _)
            }
            SETVAL => check(libc::semctl(id, num, cmd as i32, arg as i32) as _),
            GETALL | SETALL => {
                let n = sem_count(id)?;
                let mut vals = vec![0u16; n];
                if cmd == SETALL {
                    let b = pr.mm.read(cpu, arg, 2 * n as u32)?;
                    for (v, c) in vals.iter_mut().zip(b.chunks(2)) {
                        *v = u16::from_le_bytes([c[0], c[1]]);
                    }
                }
                let r = check(libc::semctl(id, 0, cmd as i32, vals.as_mut_ptr()) as _)?;
                if cmd == GETALL {
                    let b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
                    pr.mm.write(cpu, arg, &b)?;
                }
                Ok(r)
            }
            _ => Err(EINVAL),
        }
    }
}

/// How many semaphores set `id` has (IPC_STAT on the host).
fn sem_count(id: i32) -> Result<usize, Errno> {
    // SAFETY: an all-zero semid_ds is valid to fill.
    let mut ds: libc::semid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: `ds` is valid to fill.
    check(unsafe { libc::semctl(id, 0, libc::IPC_STAT, &mut ds as *mut libc::semid_ds) } as _)?;
    Ok(ds.sem_nsems as usize)
}

/// msgsnd: the i386 message (a 32-bit type, then the text) made the
/// host's (a 64-bit type).
fn msgsnd(
    pr: &mut LinuxProcess,
    cpu: &mut Vcpu,
    id: u32,
    msg: u32,
    size: u32,
    flags: u32,
) -> Result<i32, Errno> {
    if size > 1 << 20 {
        return Err(EINVAL);
    }
    let typ = pr.mm.read_u32(cpu, msg)? as i32;
    let text = pr.mm.read(cpu, msg + 4, size)?;
    let mut host = i64::from(typ).to_ne_bytes().to_vec();
    host.extend(text);
    pr.blocking(
        cpu,
        move || {
            // SAFETY: `host` holds a type and `size` bytes of text.
            let r = unsafe {
                libc::msgsnd(id as i32, host.as_ptr().cast(), size as usize, flags as i32)
            };
            (if r < 0 { -i64::from(host_errno()) } else { 0 }, Vec::new())
        },
        |_, _, r, _| r as i32,
    )
}

/// msgrcv: the host's message made the i386 one.
fn msgrcv(
    pr: &mut LinuxProcess,
    cpu: &mut Vcpu,
    id: u32,
    msg: u32,
    size: u32,
    typ: i32,
    flags: u32,
) -> Result<i32, Errno> {
    if size > 1 << 20 {
        return Err(EINVAL);
    }
    pr.blocking(
        cpu,
        move || {
            let mut host = vec![0u8; 8 + size as usize];
            // SAFETY: `host` has room for a type and `size` bytes.
            let r = unsafe {
                libc::msgrcv(
                    id as i32,
                    host.as_mut_ptr().cast(),
                    size as usize,
                    libc::c_long::from(typ),
                    flags as i32,
                )
            };
            if r < 0 {
                return (-i64::from(host_errno()), Vec::new());
            }
            host.truncate(8 + r as usize);
            (r as i64, host)
        },
        move |pr, cpu, r, host| {
            if r < 0 {
                return r as i32;
            }
            let t = i64::from_ne_bytes(host[..8].try_into().expect("8 bytes")) as i32;
            let mut out = t.to_le_bytes().to_vec();
            out.extend(&host[8..]);
            match pr.mm.write(cpu, msg, &out) {
                Ok(()) => r as i32,
                Err(e) => -e,
            }
        },
    )
}

/// msgctl: IPC_RMID; the `msqid_ds` commands are refused.
fn msgctl(id: u32, cmd: u32) -> Result<i32, Errno> {
    match cmd & !0x100 {
        // SAFETY: IPC_RMID takes no buffer.
        0 => check(unsafe { libc::msgctl(id as i32, 0, std::ptr::null_mut()) } as _),
        _ => Err(EINVAL),
    }
}

/// System V shared memory segments, kept as files under /dev/shm
/// (`popek-sysv-UID-KEY`, or a unique name for IPC_PRIVATE): a segment is
/// attached as a shared mapping of its file (its pages linked to the
/// file's, as for MAP_SHARED), so it is shared across fork and between
/// popek's processes (not with native ones). Its id is the file's inode
/// number; it lives until IPC_RMID removes the file (as a segment lives
/// until removed).
#[derive(Debug, Default)]
pub(super) struct Shm {
    /// Attached segments: address -> length (for shmdt).
    attached: std::collections::BTreeMap<u32, u32>,
}

const SHM_DIR: &str = "/dev/shm";

fn shm_prefix() -> String {
    // SAFETY: geteuid cannot fail.
    format!("popek-sysv-{}-", unsafe { libc::geteuid() })
}

/// The file of segment `id` (its inode number).
fn shm_path(id: u32) -> Result<std::path::PathBuf, Errno> {
    use std::os::unix::fs::MetadataExt;
    let prefix = shm_prefix();
    let dir = std::fs::read_dir(SHM_DIR).map_err(|_| EINVAL)?;
    for e in dir.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with(&prefix) {
            continue;
        }
        if let Ok(m) = e.metadata() {
            if m.ino() & 0x7FFF_FFFF == u64::from(id) {
                return Ok(e.path());
            }
        }
    }
    Err(EINVAL)
}

/// shmget: key, size, flags.
fn shmget(key: u32, size: u32, flags: u32) -> Result<i32, Errno> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    const IPC_CREAT: u32 = 0o1000;
    const IPC_EXCL: u32 = 0o2000;
    static PRIVATE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let prefix = shm_prefix();
    let name = if key == 0 {
        let k = PRIVATE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{prefix}p{}-{k}", std::process::id())
    } else {
        format!("{prefix}{key:08x}")
    };
    let path = std::path::Path::new(SHM_DIR).join(name);
    let create = key == 0 || flags & IPC_CREAT != 0;
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(true).mode(flags & 0o777);
    if key == 0 || (create && flags & IPC_EXCL != 0) {
        o.create_new(true);
    } else if create {
        o.create(true);
    }
    let f = o
        .open(&path)
        .map_err(|e| e.raw_os_error().unwrap_or(EINVAL))?;
    let m = f.metadata().map_err(|_| EINVAL)?;
    if m.len() == 0 {
        if size == 0 {
            let _ = std::fs::remove_file(&path);
            return Err(EINVAL);
        }
        // (The size asked, which IPC_STAT reports; attached, it takes whole
        // pages.)
        f.set_len(u64::from(size)).map_err(|_| ENOMEM)?;
    } else if u64::from(size) > m.len() {
        return Err(EINVAL);
    }
    Ok((m.ino() & 0x7FFF_FFFF) as i32)
}

/// shmat: attach segment `id` at `addr` (0: anywhere), read-only with
/// SHM_RDONLY; its address.
fn shmat(
    pr: &mut LinuxProcess,
    cpu: &mut Vcpu,
    id: u32,
    addr: u32,
    flags: u32,
) -> Result<u32, Errno> {
    use std::os::fd::AsRawFd;
    const SHM_RDONLY: u32 = 0o10000;
    const SHM_RND: u32 = 0o20000;
    let path = shm_path(id)?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(flags & SHM_RDONLY == 0)
        .open(&path)
        .map_err(|e| e.raw_os_error().unwrap_or(EINVAL))?;
    let len = super::mm::page_up(f.metadata().map_err(|_| EINVAL)?.len() as u32);
    let start = match addr {
        0 => pr.mm.find_free(len).ok_or(ENOMEM)?,
        a if a & 0xFFF != 0 && flags & SHM_RND == 0 => return Err(EINVAL),
        a => {
            let a = a & !0xFFF;
            if a.checked_add(len).is_none_or(|e| e > super::mm::MMAP_TOP)
                || pr.mm.overlaps(a, a + len)
            {
                return Err(EINVAL);
            }
            a
        }
    };
    let prot = if flags & SHM_RDONLY != 0 {
        super::mm::prot::READ
    } else {
        super::mm::prot::READ | super::mm::prot::WRITE
    };
    pr.mm.map(cpu, start, start + len, prot, true)?;
    if let Err(e) = pr.link_shared(cpu, start, len, Some(f.as_raw_fd()), 0) {
        pr.mm.unmap(cpu, start, start + len);
        return Err(e);
    }
    pr.shm.attached.insert(start, len);
    Ok(start)
}

/// shmdt: detach the segment attached at `addr`.
fn shmdt(pr: &mut LinuxProcess, cpu: &mut Vcpu, addr: u32) -> Result<i32, Errno> {
    let len = pr.shm.attached.remove(&addr).ok_or(EINVAL)?;
    pr.mm.unmap(cpu, addr, addr + len);
    Ok(0)
}

/// shmctl: IPC_RMID, and IPC_STAT (the size, owner and mode of the i386
/// `shmid64_ds`; times, pids and the attach count read 0).
fn shmctl(
    pr: &mut LinuxProcess,
    cpu: &mut Vcpu,
    id: u32,
    cmd: u32,
    buf: u32,
) -> Result<i32, Errno> {
    use std::os::unix::fs::MetadataExt;
    let path = shm_path(id)?;
    match cmd & !0x100 {
        0 => {
            std::fs::remove_file(&path).map_err(|e| e.raw_os_error().unwrap_or(EINVAL))?;
            Ok(0)
        }
        2 => {
            let m = std::fs::metadata(&path).map_err(|_| EINVAL)?;
            let mut b = vec![0u8; 84];
            b[4..8].copy_from_slice(&m.uid().to_le_bytes());
            b[8..12].copy_from_slice(&m.gid().to_le_bytes());
            b[12..16].copy_from_slice(&m.uid().to_le_bytes());
            b[16..20].copy_from_slice(&m.gid().to_le_bytes());
            b[20..22].copy_from_slice(&((m.mode() & 0o777) as u16).to_le_bytes());
            b[36..40].copy_from_slice(&(m.len() as u32).to_le_bytes());
            pr.mm.write(cpu, buf, &b)?;
            Ok(0)
        }
        _ => Err(EINVAL),
    }
}
