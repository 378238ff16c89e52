//! Credentials, scheduling and the process's personality: the host's,
//! with the guest's arguments. The user and group ids are the host
//! process's (a guest that changes them changes popek's, as qemu-i386
//! does). The 16-bit calls of Linux 1.x (setuid 23 ... getresgid 171)
//! take and return 16-bit ids, an id that does not fit reading as the
//! overflow id 65534, as the kernel's do.

use super::errno::*;
use super::process::{check, host_errno, LinuxProcess};
use super::syscalls::Call;

/// A timespec as i386 has it: two 32-bit words, or two 64-bit ones for
/// the `_time64` calls (`wide`).
fn timespec_bytes(ts: &libc::timespec, wide: bool) -> Vec<u8> {
    if wide {
        [ts.tv_sec.to_le_bytes(), ts.tv_nsec.to_le_bytes()].concat()
    } else {
        [
            (ts.tv_sec as u32).to_le_bytes(),
            (ts.tv_nsec as u32).to_le_bytes(),
        ]
        .concat()
    }
}

/// An id as a 16-bit call takes it (0xFFFF: unchanged, -1).
fn id16(v: u32) -> u32 {
    match v & 0xFFFF {
        0xFFFF => u32::MAX,
        x => x,
    }
}

/// An id as a 16-bit call returns it.
fn to16(v: u32) -> u32 {
    if v > 0xFFFF {
        65534
    } else {
        v
    }
}

/// Is call `n` one of the 16-bit ones?
fn narrow(n: u32) -> bool {
    n < 199
}

/// getuid (24), getgid (47), geteuid (49), getegid (50): the 16-bit ids.
pub(super) fn sys_ids16(_pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let ids = super::process::ids();
    let v = match c.n {
        24 => ids[0],
        47 => ids[1],
        49 => ids[2],
        _ => ids[3],
    };
    Ok(to16(v) as i32)
}

/// setuid (23, 213), setgid (46, 214), setreuid (70, 203), setregid (71,
/// 204), setresuid (164, 208), setresgid (170, 210), setfsuid (138,
/// 215), setfsgid (139, 216).
pub(super) fn sys_setids(_pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { n, a, .. } = c;
    let id = |i: usize| if narrow(n) { id16(a[i]) } else { a[i] };
    // SAFETY: plain host calls (glibc applies them to every thread).
    check(unsafe {
        match n {
            23 | 213 => libc::setuid(id(0)),
            46 | 214 => libc::setgid(id(0)),
            70 | 203 => libc::setreuid(id(0), id(1)),
            71 | 204 => libc::setregid(id(0), id(1)),
            164 | 208 => libc::setresuid(id(0), id(1), id(2)),
            170 | 210 => libc::setresgid(id(0), id(1), id(2)),
            // The previous fsuid, as the call returns (it cannot fail).
            138 | 215 => return Ok(libc::setfsuid(id(0)) as i32),
            _ => return Ok(libc::setfsgid(id(0)) as i32),
        }
    } as _)
}

/// getresuid (165, 209), getresgid (171, 211).
pub(super) fn sys_getresids(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: three ids to fill.
    check(unsafe {
        if n == 165 || n == 209 {
            libc::getresuid(&mut r, &mut e, &mut s)
        } else {
            libc::getresgid(&mut r, &mut e, &mut s)
        }
    } as _)?;
    for (k, v) in [r, e, s].into_iter().enumerate() {
        if narrow(n) {
            pr.mm.write(cpu, a[k], &(to16(v) as u16).to_le_bytes())?;
        } else {
            pr.mm.write_u32(cpu, a[k], v)?;
        }
    }
    Ok(0)
}

/// getgroups (80, 205), setgroups (81, 206).
pub(super) fn sys_groups(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let width = if narrow(n) { 2 } else { 4 };
    if n == 80 || n == 205 {
        let size = a[0] as i32;
        if size < 0 {
            return Err(EINVAL);
        }
        let mut groups = vec![0u32; 65536];
        // SAFETY: `groups` has room for 65536 ids.
        let k = check(unsafe { libc::getgroups(65536, groups.as_mut_ptr()) } as _)?;
        if size == 0 {
            return Ok(k);
        }
        if k > size {
            return Err(EINVAL);
        }
        let mut out = Vec::new();
        for &g in &groups[..k as usize] {
            if narrow(n) {
                out.extend((to16(g) as u16).to_le_bytes());
            } else {
                out.extend(g.to_le_bytes());
            }
        }
        pr.mm.write(cpu, a[1], &out)?;
        return Ok(k);
    }
    if a[0] > 65536 {
        return Err(EINVAL);
    }
    let raw = pr.mm.read(cpu, a[1], a[0] * width)?;
    let groups: Vec<u32> = raw
        .chunks(width as usize)
        .map(|b| match b {
            [x, y] => u32::from(u16::from_le_bytes([*x, *y])),
            _ => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        })
        .collect();
    // SAFETY: `groups` holds `a[0]` ids.
    check(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) } as _)
}

/// A process id the guest names made the host's: the guest itself (0, its
/// own pid, a thread of it) is the calling host thread (0); any other is
/// a host process (a fork of the guest's is a host process).
fn host_pid(pr: &LinuxProcess, pid: u32) -> i32 {
    if pid == 0 || pid == pr.tid || pid == std::process::id() || pid >= super::threads::TID_BASE {
        0
    } else {
        pid as i32
    }
}

/// sched_setparam (154), sched_getparam (155), sched_setscheduler (156),
/// sched_getscheduler (157), sched_get_priority_max (159),
/// sched_get_priority_min (160), sched_rr_get_interval (161, 423),
/// sched_setaffinity (241).
pub(super) fn sys_sched(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let param = |pr: &LinuxProcess, cpu: &popek_vcpu::Vcpu, at: u32| {
        pr.mm.read_u32(cpu, at).map(|p| libc::sched_param {
            sched_priority: p as i32,
        })
    };
    match n {
        154 | 156 => {
            let p = param(pr, cpu, if n == 154 { a[1] } else { a[2] })?;
            let pid = host_pid(pr, a[0]);
            // SAFETY: `p` is a valid sched_param.
            check(unsafe {
                if n == 154 {
                    libc::sched_setparam(pid, &p)
                } else {
                    libc::sched_setscheduler(pid, a[1] as i32, &p)
                }
            } as _)
        }
        155 => {
            let mut p = libc::sched_param { sched_priority: 0 };
            // SAFETY: `p` is valid to fill.
            check(unsafe { libc::sched_getparam(host_pid(pr, a[0]), &mut p) } as _)?;
            pr.mm.write_u32(cpu, a[1], p.sched_priority as u32)?;
            Ok(0)
        }
        157 => {
            let pid = host_pid(pr, a[0]);
            // SAFETY: a plain host call.
            check(unsafe { libc::sched_getscheduler(pid) } as _)
        }
        159 | 160 => {
            let policy = a[0] as i32;
            // SAFETY: plain host calls.
            check(unsafe {
                if n == 159 {
                    libc::sched_get_priority_max(policy)
                } else {
                    libc::sched_get_priority_min(policy)
                }
            } as _)
        }
        161 | 423 => {
            // SAFETY: an all-zero timespec is valid to fill.
            let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
            // SAFETY: `ts` is valid to fill.
            check(unsafe { libc::sched_rr_get_interval(host_pid(pr, a[0]), &mut ts) } as _)?;
            pr.mm.write(cpu, a[1], &timespec_bytes(&ts, n == 423))?;
            Ok(0)
        }
        _ => {
            // sched_setaffinity(pid, len, mask).
            // SAFETY: an all-zero cpu_set_t is valid.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            let len = (a[1] as usize).min(std::mem::size_of::<libc::cpu_set_t>());
            let mask = pr.mm.read(cpu, a[2], len as u32)?;
            for (i, byte) in mask.iter().enumerate() {
                for bit in 0..8 {
                    if byte >> bit & 1 != 0 {
                        // SAFETY: the CPU's index is below the set's
                        // size (`len` bytes at most of it).
                        unsafe { libc::CPU_SET(8 * i + bit, &mut set) };
                    }
                }
            }
            // SAFETY: `set` is valid for its size.
            check(unsafe {
                libc::sched_setaffinity(host_pid(pr, a[0]), std::mem::size_of_val(&set), &set)
            } as _)
        }
    }
}

/// personality (136): Linux's (PER_LINUX, 0) whatever is asked; setting
/// another is refused as the kernel refuses an unknown one.
pub(super) fn sys_personality(_pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { a, .. } = c;
    // 0xffffffff queries; PER_LINUX and PER_LINUX32 (8) with flags keep
    // the only execution domain popek has.
    match a[0] {
        u32::MAX => Ok(0),
        p if p & 0xFF == 0 || p & 0xFF == 8 => Ok(0),
        _ => Err(EINVAL),
    }
}

/// getcpu (318): the host CPU the calling thread is on, NUMA node 0.
pub(super) fn sys_getcpu(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    // SAFETY: no arguments.
    let which = unsafe { libc::sched_getcpu() }.max(0) as u32;
    if a[0] != 0 {
        pr.mm.write_u32(cpu, a[0], which)?;
    }
    if a[1] != 0 {
        pr.mm.write_u32(cpu, a[1], 0)?;
    }
    Ok(0)
}

/// ioprio_set (289), ioprio_get (290): the host's, for the guest's own
/// process or another host process.
pub(super) fn sys_ioprio(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { n, a, .. } = c;
    // IOPRIO_WHO_PROCESS (1) names a process; the others groups and users.
    let who = if a[0] == 1 {
        host_pid(pr, a[1]) as libc::c_long
    } else {
        libc::c_long::from(a[1])
    };
    // SAFETY: plain arguments.
    check(unsafe {
        if n == 289 {
            libc::syscall(libc::SYS_ioprio_set, a[0] as i32, who, a[2] as i32)
        } else {
            libc::syscall(libc::SYS_ioprio_get, a[0] as i32, who)
        }
    })
}

/// capget (184), capset (185): the host's (`cap_user_header` and
/// `cap_user_data` have the same layout on both).
pub(super) fn sys_capability(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let mut header = pr.mm.read(cpu, a[0], 8)?;
    let pid = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    header[4..8].copy_from_slice(&host_pid(pr, pid).to_le_bytes());
    // Version 1 has one set of three words, versions 2 and 3 two.
    let version = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let words = if version == 0x1998_0330 { 3 } else { 6 };
    let mut data = if n == 185 && a[1] != 0 {
        pr.mm.read(cpu, a[1], 4 * words)?
    } else {
        vec![0u8; 4 * words as usize]
    };
    let p = if a[1] == 0 {
        std::ptr::null_mut()
    } else {
        data.as_mut_ptr()
    };
    // SAFETY: `header` and `data` hold what the call reads and writes.
    let r = unsafe { libc::syscall(libc::SYS_capget + (n - 184) as i64, header.as_mut_ptr(), p) };
    // The kernel writes its version back when the guest's is unknown.
    let version_now = &header[0..4];
    pr.mm.write(cpu, a[0], version_now)?;
    check(r)?;
    if n == 184 && a[1] != 0 {
        pr.mm.write(cpu, a[1], &data)?;
    }
    Ok(0)
}

/// clock_getres (266, a 32-bit timespec), clock_getres_time64 (406).
pub(super) fn sys_clock_getres(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    // SAFETY: an all-zero timespec is valid to fill.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is valid to fill.
    check(unsafe { libc::clock_getres(a[0] as i32, &mut ts) } as _)?;
    if a[1] != 0 {
        pr.mm.write(cpu, a[1], &timespec_bytes(&ts, n == 406))?;
    }
    Ok(0)
}

/// syslog (103): the kernel log, the host's (klogctl: a command, a buffer
/// and its length).
pub(super) fn sys_syslog(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    let len = (a[2] as i32).clamp(0, 1 << 24) as usize;
    let mut buf = vec![0u8; len];
    // SAFETY: `buf` has room for `len` bytes.
    let r = check(unsafe { libc::klogctl(a[0] as i32, buf.as_mut_ptr().cast(), len as i32) } as _)?;
    // SYSLOG_ACTION_READ (2), READ_ALL (3), READ_CLEAR (4) fill the buffer.
    if matches!(a[0], 2..=4) && r > 0 {
        pr.mm.write(cpu, a[1], &buf[..r as usize])?;
    }
    Ok(r)
}

/// nice (34): the host process's niceness, raised (or, as root, lowered)
/// by the increment.
pub(super) fn sys_nice(_pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let inc = c.a[0] as i32;
    // SAFETY: plain host calls; errno is cleared before getpriority, whose
    // -1 may be a valid result.
    unsafe {
        *libc::__errno_location() = 0;
        let now = libc::getpriority(libc::PRIO_PROCESS, 0);
        if now == -1 && *libc::__errno_location() != 0 {
            return Err(host_errno());
        }
        let want = (now + inc.clamp(-40, 40)).clamp(-20, 19);
        // (setpriority says EACCES where nice says EPERM.)
        check(libc::setpriority(libc::PRIO_PROCESS, 0, want) as _)
            .map(|_| 0)
            .map_err(|e| if e == EACCES { EPERM } else { e })
    }
}
