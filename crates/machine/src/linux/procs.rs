//! Processes: fork (and vfork, and clone without CLONE_VM's sharing),
//! execve, wait, process groups and sessions, kill.
//!
//! A guest process is a host process: fork forks popek itself. The child
//! must not share the parent's guest RAM (a memfd mapped shared, so that
//! the translator's window and shadows alias it), so the parent copies it
//! into a new memfd just before the fork ([`popek_memory::GuestRam::duplicate`],
//! while nothing runs) and the child adopts the copy
//! ([`popek_memory::GuestRam::adopt`]) and starts a fresh engine (the
//! run loop sees [`LinuxProcess::reset_engine`]). Host pids are the guest's
//! pids, so wait4, kill, process groups and sessions are the host's calls,
//! and exit statuses travel as they would natively.
//!
//! execve of an i386 ELF (static, or dynamic with its interpreter; or
//! /proc/self/exe; or a #! script whose interpreter is one) loads it into
//! a new machine state that the run loop
//! swaps in ([`LinuxProcess::exec`]), keeping the descriptors without
//! close-on-exec; anything else (an x86-64 program, a script) is executed
//! by the host, as the kernel would, with the guest's descriptors put in
//! place.

use std::ffi::CString;
use std::path::PathBuf;

use popek_vcpu::{reg, Vcpu};

use super::errno::*;
use super::process::{host, host_errno, File, LinuxProcess};
use super::syscalls::Call;
use super::Start;

/// clone flags popek looks at.
mod clone {
    pub const VM: u32 = 0x0000_0100;
    pub const VFORK: u32 = 0x0000_4000;
    pub const SETTLS: u32 = 0x0008_0000;
    pub const PARENT_SETTID: u32 = 0x0010_0000;
    pub const CHILD_CLEARTID: u32 = 0x0020_0000;
    pub const CHILD_SETTID: u32 = 0x0100_0000;
    pub const THREAD: u32 = 0x0001_0000;
}

/// A program execve loaded, for the run loop to swap in.
pub struct Exec {
    /// Its CPU, with its own RAM.
    pub cpu: Vcpu,
    /// Its process state (descriptors still to be carried over).
    pub process: LinuxProcess,
}

impl std::fmt::Debug for Exec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exec").field("eip", &self.cpu.eip).finish()
    }
}

/// fork, vfork, clone, clone3 (2, 190, 120, 435).
pub(super) fn sys_fork(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call {
        cpu,
        n,
        a,
        out,
        err,
    } = c;
    // (flags, new stack, parent tid address, TLS descriptor, child tid
    // address): clone's registers, or clone3's struct clone_args.
    let (flags, stack, parent_tid, tls, child_tid) = match n {
        120 => (a[0], a[1], a[2], a[3], a[4]),
        435 => {
            let b = pr.mm.read(cpu, a[0], a[1].clamp(64, 88))?;
            let q = |i: usize| u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8 bytes"));
            let (stack, size) = (q(5) as u32, q(6) as u32);
            let top = if stack != 0 {
                stack.wrapping_add(size)
            } else {
                0
            };
            (q(0) as u32, top, q(3) as u32, q(7) as u32, q(2) as u32)
        }
        _ => (0, 0, 0, 0, 0),
    };
    let cloning = n == 120 || n == 435;
    if pr.start.random_seed.is_some() {
        // --lockstep (the only user of a fixed random seed) runs two
        // machines in one process: a fork would fork both.
        pr.report_unsupported(n, "fork under --lockstep", err);
        return Err(ENOSYS);
    }
    if flags & clone::THREAD != 0 {
        if flags & clone::VM == 0 {
            return Err(EINVAL);
        }
        let tid = super::threads::clone_thread(
            pr,
            cpu,
            stack,
            (flags & clone::SETTLS != 0).then_some(tls),
            (flags & clone::CHILD_CLEARTID != 0).then_some(child_tid),
        )?;
        if flags & clone::PARENT_SETTID != 0 {
            pr.mm.write_u32(cpu, parent_tid, tid)?;
        }
        if flags & clone::CHILD_SETTID != 0 {
            pr.mm.write_u32(cpu, child_tid, tid)?;
        }
        return Ok(tid as i32);
    }
    // CLONE_VM without CLONE_THREAD is vfork's (posix_spawn): the child
    // gets a copy here, which is what it needs until it execs.
    let _ = flags & (clone::VM | clone::VFORK);
    // Buffered output must not be written twice.
    let _ = out.flush();
    let _ = err.flush();
    let copy = cpu.ram.duplicate().map_err(|_| ENOMEM)?;
    // SAFETY: fork has no preconditions; popek runs Linux programs on one
    // thread, and the child touches only its own copy of the state.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(host_errno());
    }
    if pid == 0 {
        if cpu.ram.adopt(copy).is_err() {
            // The child cannot have memory of its own: it must not run on
            // the parent's.
            // SAFETY: _exit ends this process at once.
            unsafe { libc::_exit(127) };
        }
        pr.reset_engine = true;
        pr.forked = true;
        // Only the forking thread goes on in the child.
        pr.group = None;
        pr.tid = std::process::id();
        // A child starts with no pending signals.
        pr.pending = 0;
        super::signals::HOST_PENDING.store(0, std::sync::atomic::Ordering::SeqCst);
        if cloning {
            if stack != 0 {
                cpu.regs[reg::ESP] = stack;
            }
            let tid = std::process::id();
            if flags & clone::CHILD_SETTID != 0 {
                pr.mm.write_u32(cpu, child_tid, tid)?;
            }
            if flags & clone::CHILD_CLEARTID != 0 {
                pr.clear_tid = child_tid;
            }
            if flags & clone::SETTLS != 0 {
                pr.set_thread_area(cpu, tls)?;
            }
        }
        return Ok(0);
    }
    drop(copy);
    if cloning && flags & clone::PARENT_SETTID != 0 {
        pr.mm.write_u32(cpu, parent_tid, pid as u32)?;
    }
    Ok(pid)
}

/// A NULL-terminated array of string pointers in guest memory.
fn strings(pr: &LinuxProcess, cpu: &Vcpu, mut addr: u32) -> Result<Vec<String>, Errno> {
    let mut v = Vec::new();
    if addr == 0 {
        return Ok(v);
    }
    loop {
        let p = pr.mm.read_u32(cpu, addr)?;
        if p == 0 {
            return Ok(v);
        }
        let s = pr.mm.read_cstr(cpu, p)?;
        v.push(String::from_utf8_lossy(&s).into_owned());
        addr = addr.wrapping_add(4);
        if v.len() > 1 << 16 {
            return Err(E2BIG);
        }
    }
}

/// Is `image` an i386 ELF executable (static, or dynamic with its
/// interpreter: popek runs both)?
fn runs_here(image: &[u8]) -> bool {
    image.len() > 20
        && &image[..4] == b"\x7fELF"
        && image[4] == 1
        && u16::from_le_bytes([image[18], image[19]]) == 3
        && crate::elf32::Elf32::parse(image).is_ok()
}

/// execve (11).
pub(super) fn sys_execve(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call {
        cpu, a, out, err, ..
    } = c;
    let path = pr.path(cpu, a[0])?;
    let args = strings(pr, cpu, a[1])?;
    let env = strings(pr, cpu, a[2])?;
    let host_path = PathBuf::from(std::ffi::OsStr::new(
        std::str::from_utf8(path.as_bytes()).map_err(|_| ENOENT)?,
    ));
    // SAFETY: NUL-terminated path.
    if unsafe { libc::access(path.as_ptr(), libc::X_OK) } != 0 {
        return Err(host_errno());
    }
    let mut image = std::fs::read(&host_path).map_err(|e| e.raw_os_error().unwrap_or(ENOENT))?;
    let mut host_path = host_path;
    let mut args = args;
    // A #! script whose interpreter is an i386 program runs under popek
    // too (fs/binfmt_script.c: argv becomes interpreter, its optional
    // argument, the script's path, then the script's arguments).
    if image.starts_with(b"#!") {
        let line = image[2..]
            .split(|&c| c == b'\n')
            .next()
            .map(|l| String::from_utf8_lossy(l).trim().to_string())
            .unwrap_or_default();
        let mut it = line.splitn(2, [' ', '\t']);
        let interp = it.next().unwrap_or("").to_string();
        let iarg = it
            .next()
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty());
        let ipath = pr.start.host_path(std::path::Path::new(&interp));
        if let Ok(iimage) = std::fs::read(&ipath) {
            if runs_here(&iimage) {
                let script = host_path.to_string_lossy().into_owned();
                let mut v = vec![interp];
                v.extend(iarg);
                v.push(script);
                v.extend(args.into_iter().skip(1));
                args = v;
                image = iimage;
                host_path = ipath;
            }
        }
    }
    if runs_here(&image) {
        let start = Start {
            args,
            env,
            exe: std::fs::canonicalize(&host_path).unwrap_or(host_path),
            strace: pr.start.strace,
            random_seed: pr.start.random_seed,
            sysroot: pr.start.sysroot.clone(),
        };
        let memory = u64::from(cpu.ram.size());
        let (ncpu, np) = super::load(&image, start, memory).map_err(|_| ENOEXEC)?;
        pr.exec = Some(Box::new(Exec {
            cpu: ncpu,
            process: np,
        }));
        return Ok(0);
    }
    // The host runs it, with the guest's descriptors where the guest has
    // them.
    let _ = out.flush();
    let _ = err.flush();
    let c_args: Vec<CString> = args
        .iter()
        .map(|s| CString::new(s.as_bytes()).unwrap_or_default())
        .collect();
    let c_env: Vec<CString> = env
        .iter()
        .map(|s| CString::new(s.as_bytes()).unwrap_or_default())
        .collect();
    pr.host_descriptors_in_place();
    let mut argv: Vec<*const libc::c_char> = c_args.iter().map(|s| s.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = c_env.iter().map(|s| s.as_ptr()).collect();
    envp.push(std::ptr::null());
    // SAFETY: NUL-terminated path and NULL-terminated arrays of
    // NUL-terminated strings, alive across the call.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    // Only reached on failure, with the descriptors moved: nothing sound
    // is left to return to.
    let e = host_errno();
    let _ = writeln!(
        err,
        "popek: execve {}: {}",
        host_path.display(),
        std::io::Error::from_raw_os_error(e)
    );
    // SAFETY: _exit ends this process at once.
    unsafe { libc::_exit(127) }
}

use std::io::Write;

/// wait4 (114), waitpid (7).
pub(super) fn sys_wait4(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    if pr.group.is_some() && a[2] & libc::WNOHANG as u32 == 0 {
        // A thread of several waits outside the process lock.
        pr.block = Some(super::threads::Block::Host {
            run: Box::new(move || {
                let mut status = 0i32;
                // SAFETY: an all-zero rusage is valid.
                let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
                // SAFETY: pointers to locals.
                let r = unsafe { libc::wait4(a[0] as i32, &mut status, a[2] as i32, &mut ru) };
                let r = if r < 0 {
                    -i64::from(host_errno())
                } else {
                    i64::from(r)
                };
                let mut b = status.to_le_bytes().to_vec();
                b.extend(rusage_i386(&ru));
                (r, b)
            }),
            finish: Box::new(move |pr, cpu, r, b| {
                if r > 0 && a[1] != 0 {
                    if let Err(e) = pr.mm.write(cpu, a[1], &b[..4]) {
                        return -e;
                    }
                }
                if r > 0 && n == 114 && a[3] != 0 {
                    if let Err(e) = pr.mm.write(cpu, a[3], &b[4..]) {
                        return -e;
                    }
                }
                r as i32
            }),
        });
        return Ok(0);
    }
    let mut status = 0i32;
    // SAFETY: an all-zero rusage is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pointers to locals.
    let r = unsafe { libc::wait4(a[0] as i32, &mut status, a[2] as i32, &mut ru) };
    if r < 0 {
        return Err(host_errno());
    }
    if r > 0 && a[1] != 0 {
        pr.mm.write_u32(cpu, a[1], status as u32)?;
    }
    if n == 114 && a[3] != 0 {
        let b = rusage_i386(&ru);
        pr.mm.write(cpu, a[3], &b)?;
    }
    Ok(r)
}

/// waitid (284): the host's, with the i386 siginfo (signo, errno, code,
/// pid, uid, status) and rusage.
pub(super) fn sys_waitid(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    // SAFETY: an all-zero siginfo is valid for waitid to fill.
    let mut si: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `si` is valid; the id type and options are the guest's.
    let r = unsafe {
        libc::waitid(
            a[0] as libc::idtype_t,
            a[1] as libc::id_t,
            &mut si,
            a[3] as i32,
        )
    };
    if r < 0 {
        return Err(host_errno());
    }
    if a[2] != 0 {
        let mut b = [0u8; 128];
        // SAFETY: the fields of a SIGCHLD siginfo (zero when no child
        // changed state, with WNOHANG).
        let (pid, uid, status) = unsafe { (si.si_pid(), si.si_uid(), si.si_status()) };
        for (i, v) in [
            si.si_signo as u32,
            si.si_errno as u32,
            si.si_code as u32,
            pid as u32,
            uid,
            status as u32,
        ]
        .iter()
        .enumerate()
        {
            b[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
        pr.mm.write(cpu, a[2], &b)?;
    }
    if a[4] != 0 {
        // SAFETY: an all-zero rusage is valid.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `ru` is valid.
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
        pr.mm.write(cpu, a[4], &rusage_i386(&ru))?;
    }
    Ok(0)
}

/// setpgid (57), getpgrp (65), setsid (66), getpgid (132), getsid (147).
pub(super) fn sys_pgrp(_pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { n, a, .. } = c;
    // SAFETY: plain host calls on process ids.
    let r = unsafe {
        match n {
            57 => libc::setpgid(a[0] as i32, a[1] as i32),
            65 => libc::getpgrp(),
            66 => libc::setsid(),
            132 => libc::getpgid(a[0] as i32),
            _ => libc::getsid(a[0] as i32),
        }
    };
    Ok(host(r as libc::c_long)).and_then(|r| if r < 0 { Err(-r) } else { Ok(r) })
}

impl LinuxProcess {
    /// Move the host descriptors behind the guest's to the guest's
    /// numbers, for a host execve: descriptors the guest marked
    /// close-on-exec are left out, every other host descriptor is closed
    /// on exec.
    fn host_descriptors_in_place(&mut self) {
        let mut moved = Vec::new();
        for (g, f) in self.files.iter().enumerate() {
            let h = match f {
                Some(File::Out) => 1,
                Some(File::Err) => 2,
                Some(File::Host(h)) => *h,
                None => continue,
            };
            if self.cloexec.contains(&(g as u32)) {
                continue;
            }
            // SAFETY: as above; the copy is above every guest number.
            let tmp = unsafe { libc::fcntl(h, libc::F_DUPFD_CLOEXEC, 4096) };
            if tmp >= 0 {
                moved.push((g as i32, tmp));
            }
        }
        let keep: Vec<i32> = moved.iter().map(|&(g, _)| g).collect();
        for fd in 0..4096 {
            if !keep.contains(&fd) {
                // SAFETY: marking descriptors close-on-exec.
                unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            }
        }
        for (g, tmp) in moved {
            // SAFETY: dup2 clears close-on-exec on `g`.
            unsafe { libc::dup2(tmp, g) };
        }
    }

    /// Carry the descriptors over to the program execve loaded, closing
    /// those marked close-on-exec.
    pub(crate) fn hand_over_files(&mut self, next: &mut LinuxProcess) {
        for fd in std::mem::take(&mut self.cloexec) {
            self.close(fd);
        }
        next.close_all();
        next.files = std::mem::take(&mut self.files);
        next.forked = self.forked;
        next.reset_handlers_for_exec(self);
        next.pending = self.pending;
        next.rlimits = self.rlimits;
    }

    fn report_unsupported(&mut self, n: u32, what: &str, err: &mut dyn Write) {
        if !self.unknown_syscalls.contains(&n) {
            self.unknown_syscalls.push(n);
            let _ = writeln!(
                err,
                "popek: {what} is not supported yet: system call {n} returns -ENOSYS"
            );
        }
    }
}

/// poll (168), ppoll (309), ppoll_time64 (414): the host's, on the host
/// descriptors behind the guest's (struct pollfd is the same on i386);
/// outside the process lock in a threaded process.
pub(super) fn sys_poll(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let count = a[1];
    if count > 4096 {
        return Err(EINVAL);
    }
    let raw = pr.mm.read(cpu, a[0], 8 * count)?;
    let mut fds: Vec<libc::pollfd> = raw
        .chunks(8)
        .map(|e| {
            let fd = i32::from_le_bytes(e[0..4].try_into().expect("4 bytes"));
            let events = i16::from_le_bytes(e[4..6].try_into().expect("2 bytes"));
            let host = if fd < 0 {
                -1
            } else {
                // An fd the guest does not have: POLLNVAL, as the host
                // says for a closed one (i32::MAX is never open).
                pr.host_fd(fd as u32).unwrap_or(i32::MAX)
            };
            libc::pollfd {
                fd: host,
                events,
                revents: 0,
            }
        })
        .collect();
    let timeout = if n == 168 {
        a[2] as i32
    } else if a[2] == 0 {
        -1
    } else {
        let (s, ns) = pr.read_timespec(cpu, a[2], n == 414)?;
        // (A negative 32-bit timeout waits for ever, as it did.)
        let least = if n == 414 { 0 } else { i64::from(i32::MIN) };
        s.saturating_mul(1000)
            .saturating_add(ns / 1_000_000)
            .clamp(least, i64::from(i32::MAX)) as i32
    };
    let at = a[0];
    pr.blocking(
        cpu,
        move || {
            // SAFETY: `fds` holds `count` pollfds.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if r < 0 {
                return (-i64::from(host_errno()), Vec::new());
            }
            let mut out = raw;
            for (i, f) in fds.iter().enumerate() {
                out[8 * i + 6..8 * i + 8].copy_from_slice(&f.revents.to_le_bytes());
            }
            (i64::from(r), out)
        },
        move |pr, cpu, r, out| {
            if r < 0 {
                return r as i32;
            }
            match pr.mm.write(cpu, at, &out) {
                Ok(()) => r as i32,
                Err(e) => -e,
            }
        },
    )
}

/// _newselect (142), pselect6 (308), pselect6_time64 (413): the host's
/// select on the host descriptors behind the guest's (fd_set's bit layout
/// is the same on i386). The timeout is a timeval of two 32-bit words
/// (142) or a timespec of two 32-bit (308) or 64-bit (413) words, the time
/// left written back as Linux does; pselect's signal mask is not applied
/// (popek delivers the guest's signals between system calls). Outside the
/// process lock in a threaded process.
pub(super) fn sys_select(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let nfds = a[0].min(1024);
    let bytes = nfds.div_ceil(8);
    let mut sets: [Option<Vec<u8>>; 3] = [None, None, None];
    for (k, set) in sets.iter_mut().enumerate() {
        if a[1 + k] != 0 {
            *set = Some(pr.mm.read(cpu, a[1 + k], bytes)?);
        }
    }
    // Guest fd -> host fd, for every fd in any set.
    let mut map = Vec::new();
    for g in 0..nfds {
        if sets
            .iter()
            .flatten()
            .any(|s| s[(g / 8) as usize] >> (g % 8) & 1 != 0)
        {
            map.push((g, pr.host_fd(g)?));
        }
    }
    // SAFETY: all-zero fd_sets are empty.
    let mut host: [libc::fd_set; 3] = unsafe { std::mem::zeroed() };
    let mut max = -1;
    for (k, set) in sets.iter().enumerate() {
        if let Some(s) = set {
            for &(g, h) in &map {
                if s[(g / 8) as usize] >> (g % 8) & 1 != 0 {
                    if h >= libc::FD_SETSIZE as i32 {
                        return Err(EBADF);
                    }
                    // SAFETY: h < FD_SETSIZE.
                    unsafe { libc::FD_SET(h, &mut host[k]) };
                    max = max.max(h);
                }
            }
        }
    }
    let tv = if a[4] != 0 {
        // (A timeval has the same two 32-bit words.)
        let (s, frac) = pr.read_timespec(cpu, a[4], n == 413)?;
        if n != 142 && !(0..1_000_000_000).contains(&frac) {
            return Err(EINVAL);
        }
        Some(libc::timeval {
            tv_sec: s,
            // (A timespec's nanoseconds, rounded up to microseconds.)
            tv_usec: if n == 142 { frac } else { (frac + 999) / 1000 },
        })
    } else {
        None
    };
    // The host's select outside the process lock in a threaded process:
    // the sets and the time left come back as bytes.
    let present = [sets[0].is_some(), sets[1].is_some(), sets[2].is_some()];
    let run = move || {
        let mut host = host;
        let mut tv = tv;
        let mut ptrs = [std::ptr::null_mut::<libc::fd_set>(); 3];
        for (k, p) in ptrs.iter_mut().enumerate() {
            if present[k] {
                *p = &mut host[k];
            }
        }
        let tvp = tv
            .as_mut()
            .map_or(std::ptr::null_mut(), |t| t as *mut libc::timeval);
        // SAFETY: the sets and timeval are locals (or null).
        let r = unsafe { libc::select(max + 1, ptrs[0], ptrs[1], ptrs[2], tvp) };
        if r < 0 {
            return (-i64::from(host_errno()), Vec::new());
        }
        let mut out = Vec::new();
        for (k, &(g, h)) in (0..3).flat_map(|k| map.iter().map(move |m| (k, m))) {
            // SAFETY: h < FD_SETSIZE (checked above).
            let hit = h < libc::FD_SETSIZE as i32 && unsafe { libc::FD_ISSET(h, &host[k]) };
            if present[k] && hit {
                out.push((k as u32, g));
            }
        }
        let mut b: Vec<u8> = out
            .iter()
            .flat_map(|&(k, g)| [k.to_le_bytes(), g.to_le_bytes()].concat())
            .collect();
        let t = tv.unwrap_or(libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        });
        b.extend(t.tv_sec.to_le_bytes());
        b.extend(t.tv_usec.to_le_bytes());
        (i64::from(r), b)
    };
    let finish = move |pr: &mut LinuxProcess, cpu: &mut Vcpu, r: i64, b: Vec<u8>| {
        if r < 0 {
            return r as i32;
        }
        let (hits, t) = b.split_at(b.len() - 16);
        let tv_sec = i64::from_le_bytes(t[0..8].try_into().expect("8 bytes"));
        let tv_usec = i64::from_le_bytes(t[8..16].try_into().expect("8 bytes"));
        let mut put = || -> Result<(), Errno> {
            for (k, set) in sets.iter_mut().enumerate() {
                if let Some(s) = set {
                    s.fill(0);
                    for h in hits.chunks(8) {
                        let kk = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
                        let g = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
                        if kk as usize == k {
                            s[(g / 8) as usize] |= 1 << (g % 8);
                        }
                    }
                    pr.mm.write(cpu, a[1 + k], s)?;
                }
            }
            if a[4] != 0 {
                let b = match n {
                    142 => [
                        (tv_sec as i32).to_le_bytes(),
                        (tv_usec as i32).to_le_bytes(),
                    ]
                    .concat(),
                    308 => [
                        (tv_sec as i32).to_le_bytes(),
                        (tv_usec as i32 * 1000).to_le_bytes(),
                    ]
                    .concat(),
                    _ => [tv_sec.to_le_bytes(), (tv_usec * 1000).to_le_bytes()].concat(),
                };
                pr.mm.write(cpu, a[4], &b)?;
            }
            Ok(())
        };
        match put() {
            Ok(()) => r as i32,
            Err(e) => -e,
        }
    };
    pr.blocking(cpu, run, finish)
}

/// times (43): the i386 struct tms (four clock_t of 32 bits), in the
/// host's clock ticks.
pub(super) fn sys_times(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    // SAFETY: an all-zero tms is valid for times to fill.
    let mut t: libc::tms = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is valid.
    let r = unsafe { libc::times(&mut t) };
    if a[0] != 0 {
        let mut b = Vec::new();
        for v in [t.tms_utime, t.tms_stime, t.tms_cutime, t.tms_cstime] {
            b.extend_from_slice(&(v as i32).to_le_bytes());
        }
        pr.mm.write(cpu, a[0], &b)?;
    }
    Ok(r as i32)
}

/// getrusage (77): the i386 struct rusage (two timevals, 14 longs).
pub(super) fn sys_getrusage(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    // SAFETY: an all-zero rusage is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is valid.
    if unsafe { libc::getrusage(a[0] as i32, &mut ru) } < 0 {
        return Err(host_errno());
    }
    pr.mm.write(cpu, a[1], &rusage_i386(&ru))?;
    Ok(0)
}

/// A host rusage in the i386 layout.
fn rusage_i386(ru: &libc::rusage) -> Vec<u8> {
    let mut b = Vec::with_capacity(72);
    for v in [
        ru.ru_utime.tv_sec,
        ru.ru_utime.tv_usec,
        ru.ru_stime.tv_sec,
        ru.ru_stime.tv_usec,
        ru.ru_maxrss,
        ru.ru_ixrss,
        ru.ru_idrss,
        ru.ru_isrss,
        ru.ru_minflt,
        ru.ru_majflt,
        ru.ru_nswap,
        ru.ru_inblock,
        ru.ru_oublock,
        ru.ru_msgsnd,
        ru.ru_msgrcv,
        ru.ru_nsignals,
        ru.ru_nvcsw,
        ru.ru_nivcsw,
    ] {
        b.extend_from_slice(&(v as i32).to_le_bytes());
    }
    b
}

/// chmod (15), fchmod (94), fchmodat (306): the host's, on the host path
/// or descriptor.
pub(super) fn sys_chmod(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    // SAFETY: NUL-terminated paths and descriptors this process owns.
    let r = unsafe {
        match n {
            15 => {
                let p = pr.path(cpu, a[0])?;
                libc::chmod(p.as_ptr(), a[1] as libc::mode_t)
            }
            94 => libc::fchmod(pr.host_fd(a[0])?, a[1] as libc::mode_t),
            _ => {
                let p = pr.path(cpu, a[1])?;
                libc::fchmodat(pr.dirfd(a[0])?, p.as_ptr(), a[2] as libc::mode_t, 0)
            }
        }
    };
    if r < 0 {
        return Err(host_errno());
    }
    Ok(0)
}
