//! System calls through `int 0x80` (i386 numbers:
//! arch/x86/entry/syscalls/syscall_32.tbl), serviced by popek on the host.
//!
//! Files are host files: a guest file descriptor names a host one (or
//! popek's stdout and stderr, which a caller may capture). Structures whose
//! i386 layout differs from the host's (stat64, timespec, rlimit, sysinfo)
//! are converted; the others (statx, linux_dirent64, termios, winsize) are
//! the same on both and copied.

use std::ffi::CString;
use std::io::Write;

use popek_vcpu::{reg, SegReg, Vcpu};

use super::errno::*;
use super::mm::{page_up, prot, AddressSpace, PAGE};
use super::{layout, Start, TLS_ENTRIES, TLS_FIRST};

/// An open file.
#[derive(Debug)]
enum File {
    /// popek's stdout (the caller's `out`).
    Out,
    /// popek's stderr (the caller's `err`).
    Err,
    /// A host file descriptor popek owns.
    Host(i32),
}

/// The state of the emulated process.
#[derive(Debug)]
pub struct LinuxProcess {
    /// The address space.
    pub mm: AddressSpace,
    files: Vec<Option<File>>,
    start: Start,
    /// The exit status once the process called exit or exit_group.
    pub exited: Option<i32>,
    /// The signal the process killed itself with (abort()).
    pub killed: Option<i32>,
    /// System call numbers that returned ENOSYS (each reported once).
    pub unknown_syscalls: Vec<u32>,
    /// System calls serviced.
    pub syscalls: u64,
}

/// Syscall argument kinds for `--strace`.
#[derive(Clone, Copy)]
enum A {
    /// Signed decimal.
    D,
    /// Hexadecimal.
    X,
    /// A path (NUL-terminated string).
    S,
    /// A buffer whose length is the next argument (written by the call:
    /// shown after it returns, up to the result).
    Out,
    /// A buffer whose length is the next argument (read by the call).
    In,
    /// A directory fd (AT_FDCWD by name).
    Dirfd,
}

const AT_FDCWD: i32 = -100;

fn host_errno() -> Errno {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(EIO)
}

/// A host call's result as Linux returns it.
fn host(r: libc::c_long) -> i32 {
    if r < 0 {
        -host_errno()
    } else {
        r as i32
    }
}

fn quoted(b: &[u8]) -> String {
    let mut s = String::from("\"");
    for &c in b.iter().take(32) {
        match c {
            b'\n' => s.push_str("\\n"),
            b'\t' => s.push_str("\\t"),
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7E => s.push(c as char),
            _ => s.push_str(&format!("\\{c:o}")),
        }
    }
    s.push('"');
    if b.len() > 32 {
        s.push_str("...");
    }
    s
}

impl LinuxProcess {
    pub(super) fn new(mm: AddressSpace, start: Start) -> LinuxProcess {
        // SAFETY: dup of the host's stdin; the result is checked.
        let stdin = unsafe { libc::dup(0) };
        let files = vec![
            (stdin >= 0).then_some(File::Host(stdin)),
            Some(File::Out),
            Some(File::Err),
        ];
        LinuxProcess {
            mm,
            files,
            start,
            exited: None,
            killed: None,
            unknown_syscalls: Vec::new(),
            syscalls: 0,
        }
    }

    fn name_and_args(n: u32) -> Option<(&'static str, &'static [A])> {
        use A::*;
        Some(match n {
            1 => ("exit", &[D]),
            3 => ("read", &[D, Out, D]),
            4 => ("write", &[D, In, D]),
            5 => ("open", &[S, X, X]),
            6 => ("close", &[D]),
            10 => ("unlink", &[S]),
            12 => ("chdir", &[S]),
            13 => ("time", &[X]),
            19 => ("lseek", &[D, D, D]),
            20 => ("getpid", &[]),
            33 => ("access", &[S, X]),
            37 => ("kill", &[D, D]),
            38 => ("rename", &[S, S]),
            39 => ("mkdir", &[S, X]),
            40 => ("rmdir", &[S]),
            41 => ("dup", &[D]),
            42 => ("pipe", &[X]),
            45 => ("brk", &[X]),
            54 => ("ioctl", &[D, X, X]),
            60 => ("umask", &[X]),
            63 => ("dup2", &[D, D]),
            64 => ("getppid", &[]),
            78 => ("gettimeofday", &[X, X]),
            85 => ("readlink", &[S, X, D]),
            90 => ("mmap", &[X]),
            91 => ("munmap", &[X, X]),
            116 => ("sysinfo", &[X]),
            122 => ("uname", &[X]),
            125 => ("mprotect", &[X, X, X]),
            140 => ("_llseek", &[D, D, D, X, D]),
            187 => ("sendfile", &[D, D, X, D]),
            239 => ("sendfile64", &[D, D, X, D]),
            145 => ("readv", &[D, X, D]),
            146 => ("writev", &[D, X, D]),
            158 => ("sched_yield", &[]),
            162 => ("nanosleep", &[X, X]),
            163 => ("mremap", &[X, X, X, X, X]),
            172 => ("prctl", &[D, X, X, X, X]),
            174 => ("rt_sigaction", &[D, X, X, D]),
            175 => ("rt_sigprocmask", &[D, X, X, D]),
            183 => ("getcwd", &[X, D]),
            186 => ("sigaltstack", &[X, X]),
            191 => ("ugetrlimit", &[D, X]),
            192 => ("mmap2", &[X, X, X, X, D, X]),
            195 => ("stat64", &[S, X]),
            196 => ("lstat64", &[S, X]),
            197 => ("fstat64", &[D, X]),
            199 => ("getuid32", &[]),
            200 => ("getgid32", &[]),
            201 => ("geteuid32", &[]),
            202 => ("getegid32", &[]),
            219 => ("madvise", &[X, X, D]),
            220 => ("getdents64", &[D, X, D]),
            221 => ("fcntl64", &[D, D, X]),
            224 => ("gettid", &[]),
            238 => ("tkill", &[D, D]),
            243 => ("set_thread_area", &[X]),
            252 => ("exit_group", &[D]),
            258 => ("set_tid_address", &[X]),
            265 => ("clock_gettime", &[D, X]),
            267 => ("clock_nanosleep", &[D, D, X, X]),
            270 => ("tgkill", &[D, D, D]),
            295 => ("openat", &[Dirfd, S, X, X]),
            296 => ("mkdirat", &[Dirfd, S, X]),
            300 => ("fstatat64", &[Dirfd, S, X, X]),
            301 => ("unlinkat", &[Dirfd, S, X]),
            302 => ("renameat", &[Dirfd, S, Dirfd, S]),
            305 => ("readlinkat", &[Dirfd, S, X, D]),
            307 => ("faccessat", &[Dirfd, S, X]),
            311 => ("set_robust_list", &[X, D]),
            330 => ("dup3", &[D, D, X]),
            331 => ("pipe2", &[X, X]),
            340 => ("prlimit64", &[D, D, X, X]),
            355 => ("getrandom", &[X, D, X]),
            383 => ("statx", &[Dirfd, S, X, X, X]),
            386 => ("rseq", &[X, D, X, X]),
            403 => ("clock_gettime64", &[D, X]),
            407 => ("clock_nanosleep_time64", &[D, D, X, X]),
            439 => ("faccessat2", &[Dirfd, S, X, X]),
            _ => return None,
        })
    }

    /// Service the system call in EAX (arguments in EBX, ECX, EDX, ESI,
    /// EDI, EBP); returns EAX's new value.
    pub(super) fn syscall(
        &mut self,
        cpu: &mut Vcpu,
        out: &mut dyn Write,
        err: &mut dyn Write,
    ) -> i32 {
        self.syscalls += 1;
        let r = &cpu.regs;
        let n = r[reg::EAX];
        let a = [
            r[reg::EBX],
            r[reg::ECX],
            r[reg::EDX],
            r[reg::ESI],
            r[reg::EDI],
            r[reg::EBP],
        ];
        let shown = Self::name_and_args(n);
        let before = match (self.start.strace, shown) {
            (true, Some((name, kinds))) => Some(self.show_args(cpu, name, kinds, &a, None)),
            _ => None,
        };
        let ret = self.dispatch(cpu, n, a, out, err);
        if self.start.strace {
            let _ = out.flush();
            let call = match (shown, before) {
                (Some((name, kinds)), Some(_)) => self.show_args(cpu, name, kinds, &a, Some(ret)),
                _ => format!("syscall_{n}({:#x}, {:#x}, {:#x})", a[0], a[1], a[2]),
            };
            let result = if (-4095..0).contains(&ret) {
                let (name, text) = describe(-ret);
                format!("-1 {name} ({text})")
            } else if matches!(n, 45 | 90 | 192 | 163) {
                format!("{:#x}", ret as u32)
            } else {
                ret.to_string()
            };
            let _ = writeln!(err, "{call} = {result}");
        }
        ret
    }

    fn show_args(
        &self,
        cpu: &Vcpu,
        name: &str,
        kinds: &[A],
        a: &[u32; 6],
        ret: Option<i32>,
    ) -> String {
        let mut parts = Vec::new();
        for (i, k) in kinds.iter().enumerate() {
            let v = a[i];
            parts.push(match k {
                A::D => (v as i32).to_string(),
                A::X => format!("{v:#x}"),
                A::Dirfd if v as i32 == AT_FDCWD => "AT_FDCWD".to_string(),
                A::Dirfd => (v as i32).to_string(),
                A::S => match self.mm.read_cstr(cpu, v) {
                    Ok(s) => quoted(&s),
                    Err(_) => format!("{v:#x}"),
                },
                A::In => {
                    let len = a[i + 1].min(64);
                    match self.mm.read(cpu, v, len) {
                        Ok(b) if a[i + 1] <= 64 => quoted(&b),
                        Ok(b) => format!("{}...", quoted(&b)),
                        Err(_) => format!("{v:#x}"),
                    }
                }
                A::Out => match ret {
                    Some(n) if n > 0 => match self.mm.read(cpu, v, (n as u32).min(64)) {
                        Ok(b) => quoted(&b),
                        Err(_) => format!("{v:#x}"),
                    },
                    _ => format!("{v:#x}"),
                },
            });
        }
        format!("{name}({})", parts.join(", "))
    }

    fn file(&self, fd: u32) -> Result<&File, Errno> {
        self.files
            .get(fd as usize)
            .and_then(Option::as_ref)
            .ok_or(EBADF)
    }

    /// The host fd behind a guest fd (popek's own 1 and 2 for Out and Err).
    fn host_fd(&self, fd: u32) -> Result<i32, Errno> {
        Ok(match self.file(fd)? {
            File::Out => 1,
            File::Err => 2,
            File::Host(h) => *h,
        })
    }

    /// A directory fd for the *at calls.
    fn dirfd(&self, fd: u32) -> Result<i32, Errno> {
        if fd as i32 == AT_FDCWD {
            Ok(AT_FDCWD)
        } else {
            self.host_fd(fd)
        }
    }

    fn install(&mut self, f: File, min: usize) -> i32 {
        let slot = (min..)
            .find(|&i| self.files.get(i).is_none_or(Option::is_none))
            .unwrap_or(min);
        if slot >= self.files.len() {
            self.files.resize_with(slot + 1, || None);
        }
        self.files[slot] = Some(f);
        slot as i32
    }

    fn close(&mut self, fd: u32) -> i32 {
        match self.files.get_mut(fd as usize).and_then(Option::take) {
            Some(File::Host(h)) => {
                // SAFETY: `h` is a host fd this process owns.
                unsafe { libc::close(h) };
                0
            }
            Some(_) => 0,
            None => -EBADF,
        }
    }

    fn dup_file(&self, fd: u32) -> Result<File, Errno> {
        Ok(match self.file(fd)? {
            File::Out => File::Out,
            File::Err => File::Err,
            File::Host(h) => {
                // SAFETY: `h` is a host fd this process owns.
                let d = unsafe { libc::fcntl(*h, libc::F_DUPFD_CLOEXEC, 3) };
                if d < 0 {
                    return Err(host_errno());
                }
                File::Host(d)
            }
        })
    }

    fn path(&self, cpu: &Vcpu, addr: u32) -> Result<CString, Errno> {
        let p = self.mm.read_cstr(cpu, addr)?;
        if p == b"/proc/self/exe" {
            return Ok(
                CString::new(self.start.exe.as_os_str().as_encoded_bytes()).unwrap_or_default()
            );
        }
        CString::new(p).map_err(|_| EINVAL)
    }

    fn do_write(&mut self, fd: u32, data: &[u8], out: &mut dyn Write, err: &mut dyn Write) -> i32 {
        let r = match self.file(fd) {
            Err(e) => return -e,
            // Flushed at once, so stdout and stderr interleave as natively.
            Ok(File::Out) => out.write_all(data).and_then(|()| out.flush()),
            Ok(File::Err) => err.write_all(data),
            Ok(File::Host(h)) => {
                // SAFETY: the buffer is `data`; `h` is owned.
                let n = unsafe { libc::write(*h, data.as_ptr().cast(), data.len()) };
                return host(n as _);
            }
        };
        match r {
            Ok(()) => data.len() as i32,
            Err(e) => -e.raw_os_error().unwrap_or(EPIPE),
        }
    }

    fn do_read(&mut self, cpu: &mut Vcpu, fd: u32, addr: u32, len: u32) -> i32 {
        let h = match self.file(fd) {
            Ok(File::Host(h)) => *h,
            Ok(_) => return -EBADF,
            Err(e) => return -e,
        };
        let mut buf = vec![0u8; len.min(1 << 24) as usize];
        // SAFETY: the buffer is `buf`; `h` is owned.
        let n = host(unsafe { libc::read(h, buf.as_mut_ptr().cast(), buf.len()) } as _);
        if n > 0 {
            if let Err(e) = self.mm.write(cpu, addr, &buf[..n as usize]) {
                return -e;
            }
        }
        n
    }

    /// sendfile(out, in, offset, count): copies through a buffer; `wide`
    /// is sendfile64, whose offset is a 64-bit loff_t.
    fn sendfile(
        &mut self,
        cpu: &mut Vcpu,
        wide: bool,
        a: [u32; 6],
        out: &mut dyn Write,
        err: &mut dyn Write,
    ) -> Result<i32, Errno> {
        let h = match self.file(a[1])? {
            File::Host(h) => *h,
            _ => return Err(EINVAL),
        };
        self.file(a[0])?;
        let off = match (a[2], wide) {
            (0, _) => None,
            (p, true) => Some(i64::from_le_bytes(
                self.mm.read(cpu, p, 8)?[..8].try_into().unwrap(),
            )),
            (p, false) => Some(i64::from(self.mm.read_u32(cpu, p)? as i32)),
        };
        let mut buf = vec![0u8; a[3].min(1 << 24) as usize];
        // SAFETY: the buffer is `buf`; `h` is owned.
        let n = host(unsafe {
            match off {
                None => libc::read(h, buf.as_mut_ptr().cast(), buf.len()),
                Some(o) => libc::pread(h, buf.as_mut_ptr().cast(), buf.len(), o),
            }
        } as _);
        if n <= 0 {
            return if n < 0 { Err(-n) } else { Ok(0) };
        }
        let written = self.do_write(a[0], &buf[..n as usize], out, err);
        if let (Some(o), true) = (off, written > 0) {
            // The offset advances by what was written, as Linux's does.
            let o = o + i64::from(written);
            if wide {
                self.mm.write(cpu, a[2], &o.to_le_bytes())?;
            } else {
                self.mm.write_u32(cpu, a[2], o as u32)?;
            }
        }
        Ok(written)
    }

    fn iovecs(&self, cpu: &Vcpu, addr: u32, count: u32) -> Result<Vec<(u32, u32)>, Errno> {
        if count > 1024 {
            return Err(EINVAL);
        }
        let b = self.mm.read(cpu, addr, count * 8)?;
        Ok(b.chunks(8)
            .map(|c| {
                (
                    u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                    u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
                )
            })
            .collect())
    }

    #[allow(clippy::too_many_lines)]
    fn dispatch(
        &mut self,
        cpu: &mut Vcpu,
        n: u32,
        a: [u32; 6],
        out: &mut dyn Write,
        err: &mut dyn Write,
    ) -> i32 {
        let r: Result<i32, Errno> = (|| {
            Ok(match n {
                1 | 252 => {
                    self.exited = Some((a[0] & 0xFF) as i32);
                    0
                }
                3 => self.do_read(cpu, a[0], a[1], a[2]),
                4 => {
                    let data = self.mm.read(cpu, a[1], a[2])?;
                    self.do_write(a[0], &data, out, err)
                }
                145 => {
                    let mut total = 0;
                    for (base, len) in self.iovecs(cpu, a[1], a[2])? {
                        let r = self.do_read(cpu, a[0], base, len);
                        if r < 0 {
                            return if total > 0 { Ok(total) } else { Err(-r) };
                        }
                        total += r;
                        if (r as u32) < len {
                            break;
                        }
                    }
                    total
                }
                187 | 239 => self.sendfile(cpu, n == 239, a, out, err)?,
                146 => {
                    let mut data = Vec::new();
                    for (base, len) in self.iovecs(cpu, a[1], a[2])? {
                        data.extend(self.mm.read(cpu, base, len)?);
                    }
                    self.do_write(a[0], &data, out, err)
                }
                5 | 295 => {
                    let (dir, path, flags, mode) = if n == 5 {
                        (AT_FDCWD, a[0], a[1], a[2])
                    } else {
                        (self.dirfd(a[0])?, a[1], a[2], a[3])
                    };
                    let p = self.path(cpu, path)?;
                    // SAFETY: `p` is a NUL-terminated path; flags are Linux's
                    // (the same values on i386 and x86-64).
                    let h = host(unsafe {
                        libc::openat(dir, p.as_ptr(), flags as i32 | libc::O_CLOEXEC, mode)
                    } as _);
                    if h < 0 {
                        return Err(-h);
                    }
                    self.install(File::Host(h), 0)
                }
                6 => self.close(a[0]),
                10 | 301 | 40 => {
                    let (dir, path, flags) = match n {
                        10 => (AT_FDCWD, a[0], 0),
                        40 => (AT_FDCWD, a[0], libc::AT_REMOVEDIR as u32),
                        _ => (self.dirfd(a[0])?, a[1], a[2]),
                    };
                    let p = self.path(cpu, path)?;
                    // SAFETY: NUL-terminated path.
                    host(unsafe { libc::unlinkat(dir, p.as_ptr(), flags as i32) } as _)
                }
                12 => {
                    let p = self.path(cpu, a[0])?;
                    // SAFETY: NUL-terminated path.
                    host(unsafe { libc::chdir(p.as_ptr()) } as _)
                }
                13 => {
                    let t = now(libc::CLOCK_REALTIME).0 as u32;
                    if a[0] != 0 {
                        self.mm.write_u32(cpu, a[0], t)?;
                    }
                    t as i32
                }
                19 => {
                    let h = self.seekable(a[0])?;
                    // SAFETY: plain lseek on an owned fd.
                    let r = unsafe { libc::lseek(h, i64::from(a[1] as i32), a[2] as i32) };
                    if r < 0 {
                        return Err(host_errno());
                    }
                    if r > i64::from(i32::MAX) {
                        return Err(EOVERFLOW);
                    }
                    r as i32
                }
                140 => {
                    let h = self.seekable(a[0])?;
                    let off = (i64::from(a[1]) << 32) | i64::from(a[2]);
                    // SAFETY: plain lseek on an owned fd.
                    let r = unsafe { libc::lseek(h, off, a[4] as i32) };
                    if r < 0 {
                        return Err(host_errno());
                    }
                    self.mm.write(cpu, a[3], &r.to_le_bytes())?;
                    0
                }
                // popek's own process stands for the guest's.
                20 | 224 | 258 => std::process::id() as i32,
                64 => std::os::unix::process::parent_id() as i32,
                199..=202 => ids()[(n - 199) as usize] as i32,
                33 | 307 | 439 => {
                    let (dir, path, mode) = if n == 33 {
                        (AT_FDCWD, a[0], a[1])
                    } else {
                        (self.dirfd(a[0])?, a[1], a[2])
                    };
                    let p = self.path(cpu, path)?;
                    // SAFETY: NUL-terminated path.
                    host(unsafe { libc::faccessat(dir, p.as_ptr(), mode as i32, 0) } as _)
                }
                37 | 238 | 270 => {
                    let sig = if n == 270 { a[2] } else { a[1] } as i32;
                    // Only the process itself exists: a signal to it with
                    // no handler that runs ends it (0 just checks).
                    if sig != 0 {
                        self.killed = Some(sig);
                    }
                    0
                }
                38 | 302 => {
                    let (d1, p1, d2, p2) = if n == 38 {
                        (AT_FDCWD, a[0], AT_FDCWD, a[1])
                    } else {
                        (self.dirfd(a[0])?, a[1], self.dirfd(a[2])?, a[3])
                    };
                    let (p1, p2) = (self.path(cpu, p1)?, self.path(cpu, p2)?);
                    // SAFETY: NUL-terminated paths.
                    host(unsafe { libc::renameat(d1, p1.as_ptr(), d2, p2.as_ptr()) } as _)
                }
                39 | 296 => {
                    let (dir, path, mode) = if n == 39 {
                        (AT_FDCWD, a[0], a[1])
                    } else {
                        (self.dirfd(a[0])?, a[1], a[2])
                    };
                    let p = self.path(cpu, path)?;
                    // SAFETY: NUL-terminated path.
                    host(unsafe { libc::mkdirat(dir, p.as_ptr(), mode) } as _)
                }
                41 => {
                    let f = self.dup_file(a[0])?;
                    self.install(f, 0)
                }
                63 | 330 => {
                    if n == 330 && a[0] == a[1] {
                        return Err(EINVAL);
                    }
                    let f = self.dup_file(a[0])?;
                    if a[0] == a[1] {
                        return Ok(a[1] as i32);
                    }
                    if a[1] > 65535 {
                        return Err(EBADF);
                    }
                    self.close(a[1]);
                    self.install(f, a[1] as usize)
                }
                42 | 331 => {
                    let mut fds = [0i32; 2];
                    // SAFETY: `fds` has room for two fds.
                    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
                    if r < 0 {
                        return Err(host_errno());
                    }
                    let g0 = self.install(File::Host(fds[0]), 0) as u32;
                    let g1 = self.install(File::Host(fds[1]), 0) as u32;
                    let mut b = g0.to_le_bytes().to_vec();
                    b.extend(g1.to_le_bytes());
                    self.mm.write(cpu, a[0], &b)?;
                    0
                }
                45 => self.mm.set_brk(cpu, a[0]) as i32,
                54 => self.ioctl(cpu, a)?,
                60 => {
                    // SAFETY: umask cannot fail.
                    unsafe { libc::umask(a[0] & 0o777) as i32 }
                }
                78 => {
                    if a[0] != 0 {
                        let (s, ns) = now(libc::CLOCK_REALTIME);
                        let mut b = (s as u32).to_le_bytes().to_vec();
                        b.extend(((ns / 1000) as u32).to_le_bytes());
                        self.mm.write(cpu, a[0], &b)?;
                    }
                    if a[1] != 0 {
                        self.mm.write(cpu, a[1], &[0; 8])?;
                    }
                    0
                }
                85 | 305 => {
                    let (dir, path, buf, len) = if n == 85 {
                        (AT_FDCWD, a[0], a[1], a[2])
                    } else {
                        (self.dirfd(a[0])?, a[1], a[2], a[3])
                    };
                    let raw = self.mm.read_cstr(cpu, path)?;
                    let target = if raw == b"/proc/self/exe" {
                        self.start.exe.as_os_str().as_encoded_bytes().to_vec()
                    } else {
                        let p = CString::new(raw).map_err(|_| EINVAL)?;
                        let mut t = vec![0u8; 4096];
                        // SAFETY: NUL-terminated path, buffer of its length.
                        let r = unsafe {
                            libc::readlinkat(dir, p.as_ptr(), t.as_mut_ptr().cast(), t.len())
                        };
                        if r < 0 {
                            return Err(host_errno());
                        }
                        t.truncate(r as usize);
                        t
                    };
                    let k = target.len().min(len as usize);
                    self.mm.write(cpu, buf, &target[..k])?;
                    k as i32
                }
                90 => {
                    let b = self.mm.read(cpu, a[0], 24)?;
                    let w: Vec<u32> = b
                        .chunks(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    if w[5] & (PAGE - 1) != 0 {
                        return Err(EINVAL);
                    }
                    self.mmap(cpu, [w[0], w[1], w[2], w[3], w[4], w[5] / PAGE])?
                }
                192 => self.mmap(cpu, a)?,
                91 => {
                    if a[0] & (PAGE - 1) != 0 || a[1] == 0 {
                        return Err(EINVAL);
                    }
                    let end = a[0].checked_add(page_up(a[1])).ok_or(EINVAL)?;
                    self.mm.unmap(cpu, a[0], end);
                    0
                }
                125 => {
                    if a[0] & (PAGE - 1) != 0 {
                        return Err(EINVAL);
                    }
                    let end = a[0].checked_add(page_up(a[1])).ok_or(ENOMEM)?;
                    self.mm.protect(cpu, a[0], end, a[2] & 7)?;
                    0
                }
                163 => self.mremap(cpu, a)?,
                219 => 0,
                116 => self.sysinfo(cpu, a[0])?,
                122 => {
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
                    self.mm.write(cpu, a[0], &b)?;
                    0
                }
                158 => 0,
                162 => {
                    let t = self.mm.read(cpu, a[0], 8)?;
                    sleep(
                        i64::from(i32::from_le_bytes([t[0], t[1], t[2], t[3]])),
                        i64::from(i32::from_le_bytes([t[4], t[5], t[6], t[7]])),
                    )?;
                    0
                }
                267 | 407 => {
                    let t = if n == 267 {
                        let t = self.mm.read(cpu, a[2], 8)?;
                        (
                            i64::from(i32::from_le_bytes([t[0], t[1], t[2], t[3]])),
                            i64::from(i32::from_le_bytes([t[4], t[5], t[6], t[7]])),
                        )
                    } else {
                        let t = self.mm.read(cpu, a[2], 16)?;
                        (
                            i64::from_le_bytes(t[..8].try_into().unwrap_or_default()),
                            i64::from_le_bytes(t[8..].try_into().unwrap_or_default()),
                        )
                    };
                    let (mut s, mut ns) = t;
                    if a[1] & 1 != 0 {
                        // TIMER_ABSTIME
                        let (cs, cns) = now(a[0] as i32);
                        let d = (s * 1_000_000_000 + ns) - (cs * 1_000_000_000 + cns);
                        (s, ns) = (d.max(0) / 1_000_000_000, d.max(0) % 1_000_000_000);
                    }
                    sleep(s, ns)?;
                    0
                }
                172 => match a[0] {
                    // PR_SET_NAME, PR_GET_NAME
                    15 => 0,
                    16 => {
                        self.mm.write(cpu, a[1], b"popek-guest\0\0\0\0\0")?;
                        0
                    }
                    _ => return Err(EINVAL),
                },
                174 => {
                    if a[2] != 0 {
                        // No handler recorded: SIG_DFL, no flags, empty mask.
                        self.mm.write(cpu, a[2], &[0; 16])?;
                    }
                    0
                }
                175 => {
                    if a[2] != 0 {
                        self.mm.write(cpu, a[2], &vec![0; a[3].min(128) as usize])?;
                    }
                    0
                }
                186 => {
                    if a[1] != 0 {
                        // ss_sp, ss_flags = SS_DISABLE, ss_size
                        self.mm
                            .write(cpu, a[1], &[0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0])?;
                    }
                    0
                }
                183 => {
                    let cwd = std::env::current_dir().map_err(|_| ENOENT)?;
                    let mut b = cwd.as_os_str().as_encoded_bytes().to_vec();
                    b.push(0);
                    if b.len() > a[1] as usize {
                        return Err(ERANGE);
                    }
                    self.mm.write(cpu, a[0], &b)?;
                    b.len() as i32
                }
                191 | 340 => {
                    let (res, new, old) = if n == 191 {
                        (a[0], 0, a[1])
                    } else {
                        if a[0] != 0 && a[0] != std::process::id() {
                            return Err(ESRCH);
                        }
                        (a[1], a[2], a[3])
                    };
                    let _ = new;
                    // SAFETY: a zeroed rlimit is valid for getrlimit to fill.
                    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
                    // SAFETY: `rl` is valid.
                    if unsafe { libc::getrlimit(res as _, &mut rl) } < 0 {
                        return Err(host_errno());
                    }
                    if old != 0 {
                        if n == 191 {
                            let c = |v: u64| v.min(u64::from(u32::MAX)) as u32;
                            let mut b = c(rl.rlim_cur).to_le_bytes().to_vec();
                            b.extend(c(rl.rlim_max).to_le_bytes());
                            self.mm.write(cpu, old, &b)?;
                        } else {
                            let mut b = rl.rlim_cur.to_le_bytes().to_vec();
                            b.extend(rl.rlim_max.to_le_bytes());
                            self.mm.write(cpu, old, &b)?;
                        }
                    }
                    0
                }
                195 | 196 | 197 | 300 => {
                    let (dir, path, buf, flags) = match n {
                        195 => (AT_FDCWD, Some(a[0]), a[1], 0),
                        196 => (AT_FDCWD, Some(a[0]), a[1], libc::AT_SYMLINK_NOFOLLOW as u32),
                        197 => (self.host_fd(a[0])?, None, a[1], libc::AT_EMPTY_PATH as u32),
                        _ => (self.dirfd(a[0])?, Some(a[1]), a[2], a[3]),
                    };
                    let p = match path {
                        Some(p) => self.path(cpu, p)?,
                        None => CString::default(),
                    };
                    // SAFETY: a zeroed stat is valid for fstatat to fill.
                    let mut st: libc::stat = unsafe { std::mem::zeroed() };
                    // SAFETY: NUL-terminated path, valid stat.
                    if unsafe { libc::fstatat(dir, p.as_ptr(), &mut st, flags as i32) } < 0 {
                        return Err(host_errno());
                    }
                    self.mm.write(cpu, buf, &stat64(&st))?;
                    0
                }
                383 => {
                    let dir = self.dirfd(a[0])?;
                    let p = self.path(cpu, a[1])?;
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
                    self.mm.write(cpu, a[4], &b)?;
                    0
                }
                220 => {
                    let h = self.host_fd(a[0])?;
                    let mut b = vec![0u8; a[2].min(1 << 20) as usize];
                    // SAFETY: the buffer is `b`; linux_dirent64 is the same on both ABIs.
                    let r =
                        unsafe { libc::syscall(libc::SYS_getdents64, h, b.as_mut_ptr(), b.len()) };
                    if r < 0 {
                        return Err(host_errno());
                    }
                    self.mm.write(cpu, a[1], &b[..r as usize])?;
                    r as i32
                }
                221 => self.fcntl(a)?,
                243 => self.set_thread_area(cpu, a[0])?,
                265 | 403 => {
                    let (s, ns) = now(a[0] as i32);
                    let b: Vec<u8> = if n == 265 {
                        [(s as u32).to_le_bytes(), (ns as u32).to_le_bytes()].concat()
                    } else {
                        [s.to_le_bytes(), ns.to_le_bytes()].concat()
                    };
                    self.mm.write(cpu, a[1], &b)?;
                    0
                }
                311 => 0,
                355 => {
                    let mut b = vec![0u8; a[1].min(1 << 20) as usize];
                    super::fill_random(&mut b, &mut self.start.random_seed);
                    self.mm.write(cpu, a[0], &b)?;
                    b.len() as i32
                }
                _ => {
                    if n != 386 && !self.unknown_syscalls.contains(&n) {
                        self.unknown_syscalls.push(n);
                        let _ = writeln!(err, "popek: unknown system call {n} returns -ENOSYS");
                    }
                    return Err(ENOSYS);
                }
            })
        })();
        r.unwrap_or_else(|e| -e)
    }

    fn seekable(&self, fd: u32) -> Result<i32, Errno> {
        match self.file(fd)? {
            File::Host(h) => Ok(*h),
            _ => Err(ESPIPE),
        }
    }

    fn ioctl(&mut self, cpu: &mut Vcpu, a: [u32; 6]) -> Result<i32, Errno> {
        let h = self.host_fd(a[0])?;
        let size = match a[1] {
            0x5401 => 36, // TCGETS: struct termios
            0x5413 => 8,  // TIOCGWINSZ: struct winsize
            _ => return Err(ENOTTY),
        };
        let mut b = [0u8; 64];
        // SAFETY: both requests write at most `size` bytes into `b`.
        if unsafe { libc::ioctl(h, libc::c_ulong::from(a[1]), b.as_mut_ptr()) } < 0 {
            return Err(host_errno());
        }
        self.mm.write(cpu, a[2], &b[..size])?;
        Ok(0)
    }

    fn fcntl(&mut self, a: [u32; 6]) -> Result<i32, Errno> {
        match a[1] {
            // F_DUPFD, F_DUPFD_CLOEXEC
            0 | 1030 => {
                let f = self.dup_file(a[0])?;
                Ok(self.install(f, a[2] as usize))
            }
            // F_GETFD, F_SETFD: close-on-exec means nothing without exec.
            1 => self.file(a[0]).map(|_| 0),
            2 => self.file(a[0]).map(|_| 0),
            // F_GETFL, F_SETFL
            3 | 4 => {
                let h = self.host_fd(a[0])?;
                // SAFETY: plain fcntl on an fd.
                Ok(host(
                    unsafe { libc::fcntl(h, a[1] as i32, a[2] as i32) } as _
                ))
            }
            _ => Err(EINVAL),
        }
    }

    fn sysinfo(&mut self, cpu: &mut Vcpu, addr: u32) -> Result<i32, Errno> {
        // SAFETY: a zeroed sysinfo is valid for sysinfo to fill.
        let mut si: libc::sysinfo = unsafe { std::mem::zeroed() };
        // SAFETY: `si` is valid.
        if unsafe { libc::sysinfo(&mut si) } < 0 {
            return Err(host_errno());
        }
        // Scale the sizes into 32 bits, as the compat syscall does.
        let mut unit = u64::from(si.mem_unit.max(1));
        let sizes = [
            si.totalram,
            si.freeram,
            si.sharedram,
            si.bufferram,
            si.totalswap,
            si.freeswap,
            si.totalhigh,
            si.freehigh,
        ];
        while sizes.iter().any(|&v| v > u64::from(u32::MAX))
            && unit < (1 << 30)
            && sizes
                .iter()
                .any(|&v| v * u64::from(si.mem_unit.max(1)) / unit > u64::from(u32::MAX))
        {
            unit <<= 1;
        }
        let scale = |v: u64| (v * u64::from(si.mem_unit.max(1)) / unit) as u32;
        let mut b = Vec::with_capacity(64);
        b.extend((si.uptime as u32).to_le_bytes());
        for l in si.loads {
            b.extend((l as u32).to_le_bytes());
        }
        for v in &sizes[..6] {
            b.extend(scale(*v).to_le_bytes());
        }
        b.extend(si.procs.to_le_bytes());
        b.extend([0, 0]);
        b.extend(scale(si.totalhigh).to_le_bytes());
        b.extend(scale(si.freehigh).to_le_bytes());
        b.extend((unit as u32).to_le_bytes());
        b.resize(64, 0);
        self.mm.write(cpu, addr, &b)?;
        Ok(0)
    }

    fn mmap(&mut self, cpu: &mut Vcpu, a: [u32; 6]) -> Result<i32, Errno> {
        const SHARED: u32 = 1;
        const FIXED: u32 = 0x10;
        const ANON: u32 = 0x20;
        const FIXED_NOREPLACE: u32 = 0x10_0000;
        let [addr, len, pr, flags, fd, pgoff] = a;
        if len == 0 || flags & 3 == 0 {
            return Err(EINVAL);
        }
        let len = page_up(len);
        if len == 0 {
            return Err(ENOMEM);
        }
        let file = if flags & ANON == 0 {
            let h = match self.file(fd)? {
                File::Host(h) => *h,
                _ => return Err(EACCES),
            };
            if flags & SHARED != 0 && pr & prot::WRITE != 0 {
                // Shared writable file mappings would need write-back.
                return Err(EINVAL);
            }
            Some(h)
        } else {
            None
        };
        let start = if flags & (FIXED | FIXED_NOREPLACE) != 0 {
            if addr & (PAGE - 1) != 0 || addr.checked_add(len).is_none_or(|e| e > layout::GDT) {
                return Err(EINVAL);
            }
            if self.mm.overlaps(addr, addr + len) {
                if flags & FIXED == 0 {
                    return Err(EEXIST);
                }
                self.mm.unmap(cpu, addr, addr + len);
            }
            addr
        } else if addr != 0
            && addr & (PAGE - 1) == 0
            && addr
                .checked_add(len)
                .is_some_and(|e| e <= super::mm::MMAP_TOP)
            && !self.mm.overlaps(addr, addr + len)
        {
            addr
        } else {
            self.mm.find_free(len).ok_or(ENOMEM)?
        };
        self.mm.map(cpu, start, start + len, pr & 7, true)?;
        if let Some(h) = file {
            let mut buf = vec![0u8; len as usize];
            let mut got = 0usize;
            let off = i64::from(pgoff) * i64::from(PAGE);
            while got < buf.len() {
                // SAFETY: the buffer is the unfilled part of `buf`.
                let r = unsafe {
                    libc::pread(
                        h,
                        buf[got..].as_mut_ptr().cast(),
                        buf.len() - got,
                        off + got as i64,
                    )
                };
                if r <= 0 {
                    break;
                }
                got += r as usize;
            }
            if pr & 7 != 0 {
                self.mm.fill(cpu, start, &buf[..got])?;
            }
        }
        Ok(start as i32)
    }

    fn mremap(&mut self, cpu: &mut Vcpu, a: [u32; 6]) -> Result<i32, Errno> {
        const MAYMOVE: u32 = 1;
        let [old, old_len, new_len, flags, ..] = a;
        if old & (PAGE - 1) != 0 || new_len == 0 || flags & !MAYMOVE != 0 {
            return Err(EINVAL);
        }
        let (old_len, new_len) = (page_up(old_len), page_up(new_len));
        if !self.mm.is_mapped(old, old + old_len) {
            return Err(EFAULT);
        }
        if new_len <= old_len {
            self.mm.unmap(cpu, old + new_len, old + old_len);
            return Ok(old as i32);
        }
        if self.mm.grow(cpu, old, old + old_len, old + new_len).is_ok() {
            return Ok(old as i32);
        }
        if flags & MAYMOVE == 0 {
            return Err(ENOMEM);
        }
        let new = self.mm.find_free(new_len).ok_or(ENOMEM)?;
        let pr = self.mm.prot_at(old).unwrap_or(prot::READ | prot::WRITE);
        self.mm.move_pages(cpu, old, old_len, new)?;
        self.mm.map(cpu, new + old_len, new + new_len, pr, true)?;
        self.mm.cut_join(new, new + new_len, pr);
        Ok(new as i32)
    }

    /// set_thread_area: a TLS descriptor in the GDT (arch/x86/kernel/tls.c).
    fn set_thread_area(&mut self, cpu: &mut Vcpu, addr: u32) -> Result<i32, Errno> {
        let b = self.mm.read(cpu, addr, 16)?;
        let w = |i: usize| u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
        let (mut entry, base, limit, bits) = (w(0), w(1), w(2), w(3));
        if entry == u32::MAX {
            entry = (TLS_FIRST..TLS_FIRST + TLS_ENTRIES)
                .find(|&e| cpu.read_sys(layout::GDT + 8 * e, 8).unwrap_or(0) == 0)
                .ok_or(ESRCH)?;
            self.mm.write_u32(cpu, addr, entry)?;
        }
        if !(TLS_FIRST..TLS_FIRST + TLS_ENTRIES).contains(&entry) {
            return Err(EINVAL);
        }
        let (seg_32bit, contents, read_exec_only, limit_in_pages, not_present, useable) = (
            bits & 1,
            (bits >> 1) & 3,
            (bits >> 3) & 1,
            (bits >> 4) & 1,
            (bits >> 5) & 1,
            (bits >> 6) & 1,
        );
        // An all-empty descriptor clears the entry (LDT_empty).
        let desc: u64 = if base == 0 && limit == 0 && read_exec_only == 1 && not_present == 1 {
            0
        } else {
            let lo = ((base & 0xFFFF) << 16) | (limit & 0xFFFF);
            let hi = (base & 0xFF00_0000)
                | ((base & 0x00FF_0000) >> 16)
                | (limit & 0xF_0000)
                | ((read_exec_only ^ 1) << 9)
                | (contents << 10)
                | ((not_present ^ 1) << 15)
                | (seg_32bit << 22)
                | (limit_in_pages << 23)
                | (useable << 20)
                | 0x7000;
            u64::from(lo) | (u64::from(hi) << 32)
        };
        cpu.write_sys(layout::GDT + 8 * entry, 8, desc)
            .map_err(|_| EFAULT)?;
        // A segment register holding the selector sees the new descriptor.
        let sel = (entry << 3 | 3) as u16;
        for s in [SegReg::Fs, SegReg::Gs] {
            if cpu.segs[s as usize].selector == sel {
                let _ = cpu.load_seg(s, sel);
            }
        }
        Ok(0)
    }
}

impl Drop for LinuxProcess {
    fn drop(&mut self) {
        for f in self.files.iter_mut().filter_map(Option::take) {
            if let File::Host(h) = f {
                // SAFETY: `h` is a host fd this process owns.
                unsafe { libc::close(h) };
            }
        }
    }
}

/// getuid, getgid, geteuid, getegid.
pub(super) fn ids() -> [u32; 4] {
    // SAFETY: these calls take no arguments and cannot fail.
    unsafe {
        [
            libc::getuid(),
            libc::getgid(),
            libc::geteuid(),
            libc::getegid(),
        ]
    }
}

/// A clock's time: (seconds, nanoseconds).
fn now(clock: i32) -> (i64, i64) {
    // SAFETY: a zeroed timespec is valid for clock_gettime to fill.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is valid.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec, ts.tv_nsec)
}

fn sleep(s: i64, ns: i64) -> Result<(), Errno> {
    if s < 0 || !(0..1_000_000_000).contains(&ns) {
        return Err(EINVAL);
    }
    std::thread::sleep(std::time::Duration::new(s as u64, ns as u32));
    Ok(())
}

/// The i386 `struct stat64` (arch/x86/include/uapi/asm/stat.h, 96 bytes).
fn stat64(st: &libc::stat) -> [u8; 96] {
    let mut b = [0u8; 96];
    let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
    put(0, &st.st_dev.to_le_bytes());
    put(12, &(st.st_ino as u32).to_le_bytes());
    put(16, &st.st_mode.to_le_bytes());
    put(20, &(st.st_nlink as u32).to_le_bytes());
    put(24, &st.st_uid.to_le_bytes());
    put(28, &st.st_gid.to_le_bytes());
    put(32, &st.st_rdev.to_le_bytes());
    put(44, &st.st_size.to_le_bytes());
    put(52, &(st.st_blksize as u32).to_le_bytes());
    put(56, &st.st_blocks.to_le_bytes());
    put(64, &(st.st_atime as u32).to_le_bytes());
    put(68, &(st.st_atime_nsec as u32).to_le_bytes());
    put(72, &(st.st_mtime as u32).to_le_bytes());
    put(76, &(st.st_mtime_nsec as u32).to_le_bytes());
    put(80, &(st.st_ctime as u32).to_le_bytes());
    put(84, &(st.st_ctime_nsec as u32).to_le_bytes());
    put(88, &st.st_ino.to_le_bytes());
    b
}
