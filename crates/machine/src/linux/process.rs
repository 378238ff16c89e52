//! The emulated Linux process's state: its address space, its file
//! table (guest descriptors naming host ones, or popek's stdout and
//! stderr), and the host-side work the system calls share (reads and
//! writes, mmap, time, stat conversion).

use std::ffi::CString;
use std::io::Write;
use std::os::fd::FromRawFd;

use popek_vcpu::{SegReg, Vcpu};

use super::errno::*;
use super::mm::{page_up, prot, AddressSpace, PAGE};
use super::{layout, Start, TLS_ENTRIES, TLS_FIRST};

/// An open file.
#[derive(Debug)]
pub(super) enum File {
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
    pub(super) files: Vec<Option<File>>,
    pub(super) start: Start,
    /// The exit status once the process called exit or exit_group.
    pub exited: Option<i32>,
    /// The signal the process killed itself with (abort()).
    pub killed: Option<i32>,
    /// System call numbers that returned ENOSYS (each reported once).
    pub unknown_syscalls: Vec<u32>,
    /// System calls serviced.
    pub syscalls: u64,
    /// This process was forked (its engine must start afresh on its own
    /// copy of RAM: see [`super::procs`]); cleared by the run loop.
    pub reset_engine: bool,
    /// This process is a fork of the one popek started.
    pub forked: bool,
    /// CLONE_CHILD_CLEARTID's address.
    pub clear_tid: u32,
    /// A program execve loaded, for the run loop to swap in.
    pub exec: Option<Box<super::procs::Exec>>,
    /// The dispositions rt_sigaction set, by signal (the i386 struct
    /// sigaction: handler, flags, restorer, mask).
    pub(super) sigactions: Vec<[u32; 5]>,
    /// Guest descriptors marked close-on-exec (popek's own host
    /// descriptors all are: this is the guest's flag).
    pub(super) cloexec: std::collections::BTreeSet<u32>,
    /// Signals pending for the guest (raised by popek itself: faults,
    /// SIGPIPE, reserved signals sent to itself), one bit per number.
    pub(super) pending: u64,
    /// The guest's blocked mask (mirrored on the host).
    pub(super) blocked: u64,
    /// sigsuspend's caller's mask, saved in the frame of the signal that
    /// ends the suspension.
    pub(super) suspend_mask: Option<u64>,
    /// siginfo of pending signals popek raised (faults).
    pub(super) siginfo: std::collections::HashMap<i32, [u32; 8]>,
    /// The exception vector and error code for the next frame's
    /// sigcontext (0, 0 for signals that are not faults).
    pub(super) trap: (u32, u32),
    /// sigaltstack: (ss_sp, ss_size), None while disabled.
    pub(super) altstack: Option<(u32, u32)>,
    /// The running thread's id (the host pid for the first thread).
    pub(super) tid: u32,
    /// The thread group, once the process made a thread.
    pub group: Option<std::sync::Arc<super::threads::Group>>,
    /// Threads clone made, for the run loop to start.
    pub new_threads: Vec<super::threads::NewThread>,
    /// What a blocking call of a threaded process waits for, outside the
    /// process lock.
    pub block: Option<super::threads::Block>,
    /// This thread called exit (not exit_group) while others run.
    pub thread_exited: Option<i32>,
    /// Files shared mappings were made of, by device and inode: their
    /// index among guest RAM's backing files (one descriptor each).
    pub(super) shared_files: std::collections::HashMap<(u64, u64), u32>,
    /// The limits on the address space the guest set (RLIMIT_DATA,
    /// RLIMIT_STACK, RLIMIT_RSS, RLIMIT_AS: soft, hard), kept rather than
    /// applied to popek (see `sys_rlimit`); None: the host's.
    pub(super) rlimits: [Option<(u64, u64)>; 16],
    /// System V shared memory attached (see `ipc::Shm`).
    pub(super) shm: super::ipc::Shm,
}

pub(super) const AT_FDCWD: i32 = -100;

pub(super) fn host_errno() -> Errno {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(EIO)
}

/// A host call's result, or its errno.
pub(super) fn check(r: libc::c_long) -> Result<i32, Errno> {
    if r < 0 {
        Err(host_errno())
    } else {
        Ok(r as i32)
    }
}

/// A host call's result as Linux returns it.
pub(super) fn host(r: libc::c_long) -> i32 {
    if r < 0 {
        -host_errno()
    } else {
        r as i32
    }
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
            reset_engine: false,
            forked: false,
            clear_tid: 0,
            exec: None,
            sigactions: vec![[0; 5]; 65],
            cloexec: Default::default(),
            pending: 0,
            blocked: 0,
            suspend_mask: None,
            siginfo: Default::default(),
            trap: (0, 0),
            altstack: None,
            tid: std::process::id(),
            group: None,
            new_threads: Vec::new(),
            block: None,
            thread_exited: None,
            shared_files: Default::default(),
            rlimits: [None; 16],
            shm: Default::default(),
        }
    }

    /// Close every descriptor (a process image replaced by execve, before
    /// it takes the old one's).
    pub(super) fn close_all(&mut self) {
        for fd in 0..self.files.len() {
            self.close(fd as u32);
        }
    }

    /// The handler address rt_sigaction gave signal `sig` (0: SIG_DFL,
    /// 1: SIG_IGN).
    pub fn disposition(&self, sig: i32) -> u32 {
        self.sigactions.get(sig as usize).map_or(0, |a| a[0])
    }

    pub(super) fn file(&self, fd: u32) -> Result<&File, Errno> {
        self.files
            .get(fd as usize)
            .and_then(Option::as_ref)
            .ok_or(EBADF)
    }

    /// The host fd behind a guest fd (popek's own 1 and 2 for Out and Err).
    pub(super) fn host_fd(&self, fd: u32) -> Result<i32, Errno> {
        Ok(match self.file(fd)? {
            File::Out => 1,
            File::Err => 2,
            File::Host(h) => *h,
        })
    }

    /// A directory fd for the *at calls.
    pub(super) fn dirfd(&self, fd: u32) -> Result<i32, Errno> {
        if fd as i32 == AT_FDCWD {
            Ok(AT_FDCWD)
        } else {
            self.host_fd(fd)
        }
    }

    pub(super) fn install(&mut self, f: File, min: usize) -> i32 {
        let slot = (min..)
            .find(|&i| self.files.get(i).is_none_or(Option::is_none))
            .unwrap_or(min);
        if slot >= self.files.len() {
            self.files.resize_with(slot + 1, || None);
        }
        self.files[slot] = Some(f);
        self.cloexec.remove(&(slot as u32));
        slot as i32
    }

    /// Mark guest descriptor `fd` close-on-exec (or not).
    pub(super) fn set_cloexec(&mut self, fd: i32, on: bool) {
        if on {
            self.cloexec.insert(fd as u32);
        } else {
            self.cloexec.remove(&(fd as u32));
        }
    }

    pub(super) fn close(&mut self, fd: u32) -> i32 {
        self.cloexec.remove(&fd);
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

    pub(super) fn dup_file(&self, fd: u32) -> Result<File, Errno> {
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

    pub(super) fn path(&self, cpu: &Vcpu, addr: u32) -> Result<CString, Errno> {
        let p = self.mm.read_cstr(cpu, addr)?;
        if p == b"/proc/self/exe" {
            return Ok(
                CString::new(self.start.exe.as_os_str().as_encoded_bytes()).unwrap_or_default()
            );
        }
        if self.start.sysroot.is_some() && p.first() == Some(&b'/') {
            use std::os::unix::ffi::OsStrExt;
            let host = self
                .start
                .host_path(std::path::Path::new(std::ffi::OsStr::from_bytes(&p)));
            return CString::new(host.as_os_str().as_bytes()).map_err(|_| EINVAL);
        }
        CString::new(p).map_err(|_| EINVAL)
    }

    pub(super) fn do_write(
        &mut self,
        fd: u32,
        data: &[u8],
        out: &mut dyn Write,
        err: &mut dyn Write,
    ) -> i32 {
        let r = match self.file(fd) {
            Err(e) => return -e,
            // Flushed at once, so stdout and stderr interleave as natively.
            Ok(File::Out) => out.write_all(data).and_then(|()| out.flush()),
            Ok(File::Err) => err.write_all(data),
            Ok(File::Host(h)) => {
                // SAFETY: the buffer is `data`; `h` is owned.
                let n = unsafe { libc::write(*h, data.as_ptr().cast(), data.len()) };
                if n >= 0 {
                    return n as i32;
                }
                Err(std::io::Error::last_os_error())
            }
        };
        match r {
            Ok(()) => data.len() as i32,
            Err(e) => {
                let e = e.raw_os_error().unwrap_or(EPIPE);
                // A write to a pipe nobody reads: SIGPIPE, whose default
                // action ends the process (popek itself ignores SIGPIPE,
                // as Rust programs do, and sees EPIPE).
                if e == EPIPE {
                    self.raise_sigpipe();
                }
                -e
            }
        }
    }

    /// A timespec from guest memory: two 32-bit words, or two 64-bit ones
    /// for the `_time64` calls (`wide`); (seconds, nanoseconds).
    pub(super) fn read_timespec(
        &self,
        cpu: &Vcpu,
        at: u32,
        wide: bool,
    ) -> Result<(i64, i64), Errno> {
        let t = self.mm.read(cpu, at, if wide { 16 } else { 8 })?;
        Ok(if wide {
            (
                i64::from_le_bytes(t[0..8].try_into().expect("8 bytes")),
                i64::from_le_bytes(t[8..16].try_into().expect("8 bytes")),
            )
        } else {
            (
                i32::from_le_bytes(t[0..4].try_into().expect("4 bytes")).into(),
                i32::from_le_bytes(t[4..8].try_into().expect("4 bytes")).into(),
            )
        })
    }

    /// A host call that may block (`run`, which owns what it needs), then
    /// its result put into the guest (`finish`, returning EAX): at once,
    /// or, in a process with several threads, outside the process lock so
    /// that the others run meanwhile (see `threads::Block::Host`).
    pub(super) fn blocking(
        &mut self,
        cpu: &mut Vcpu,
        run: impl FnOnce() -> (i64, Vec<u8>) + Send + 'static,
        finish: impl FnOnce(&mut LinuxProcess, &mut Vcpu, i64, Vec<u8>) -> i32 + Send + 'static,
    ) -> Result<i32, Errno> {
        if self.group.is_some() {
            self.block = Some(super::threads::Block::Host {
                run: Box::new(run),
                finish: Box::new(finish),
            });
            return Ok(0);
        }
        let (r, data) = run();
        match finish(self, cpu, r, data) {
            e @ -4095..=-1 => Err(-e),
            v => Ok(v),
        }
    }

    /// SIGPIPE for the guest (a write or send that met EPIPE): its
    /// default action ends the process.
    pub(super) fn raise_sigpipe(&mut self) {
        match self.disposition(13) {
            0 if self.blocked & 1 << 13 == 0 => self.killed = Some(13),
            1 => {}
            _ => self.pending |= 1 << 13,
        }
    }

    pub(super) fn do_read(&mut self, cpu: &mut Vcpu, fd: u32, addr: u32, len: u32) -> i32 {
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
    pub(super) fn sendfile(
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

    pub(super) fn iovecs(
        &self,
        cpu: &Vcpu,
        addr: u32,
        count: u32,
    ) -> Result<Vec<(u32, u32)>, Errno> {
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

    pub(super) fn seekable(&self, fd: u32) -> Result<i32, Errno> {
        match self.file(fd)? {
            File::Host(h) => Ok(*h),
            _ => Err(ESPIPE),
        }
    }

    pub(super) fn ioctl(&mut self, cpu: &mut Vcpu, a: [u32; 6]) -> Result<i32, Errno> {
        let h = self.host_fd(a[0])?;
        if a[1] == 0x5410 {
            // TIOCSPGRP: the terminal's foreground process group (a pid_t).
            let pgrp = self.mm.read_u32(cpu, a[2])? as i32;
            // SAFETY: the request reads one pid_t.
            let r = unsafe { libc::ioctl(h, libc::TIOCSPGRP, &pgrp) };
            return if r < 0 { Err(host_errno()) } else { Ok(0) };
        }
        let size = match a[1] {
            0x5401 => 36, // TCGETS: struct termios
            0x5413 => 8,  // TIOCGWINSZ: struct winsize
            0x540F => 4,  // TIOCGPGRP: pid_t
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

    pub(super) fn fcntl(&mut self, a: [u32; 6]) -> Result<i32, Errno> {
        match a[1] {
            // F_DUPFD, F_DUPFD_CLOEXEC
            0 | 1030 => {
                let f = self.dup_file(a[0])?;
                let fd = self.install(f, a[2] as usize);
                self.set_cloexec(fd, a[1] == 1030);
                Ok(fd)
            }
            // F_GETFD, F_SETFD: the guest's close-on-exec flag.
            1 => self
                .file(a[0])
                .map(|_| i32::from(self.cloexec.contains(&a[0]))),
            2 => {
                self.file(a[0])?;
                self.set_cloexec(a[0] as i32, a[2] & 1 != 0);
                Ok(0)
            }
            // F_GETFL, F_SETFL, and those that take and return an int:
            // F_SETOWN, F_GETOWN, F_SETSIG, F_GETSIG, F_SETLEASE,
            // F_GETLEASE, F_NOTIFY, F_SETPIPE_SZ, F_GETPIPE_SZ,
            // F_ADD_SEALS, F_GET_SEALS.
            3 | 4 | 8..=11 | 1024..=1026 | 1031..=1034 => {
                let h = self.host_fd(a[0])?;
                // SAFETY: plain fcntl on an fd.
                Ok(host(
                    unsafe { libc::fcntl(h, a[1] as i32, a[2] as i32) } as _
                ))
            }
            _ => Err(EINVAL),
        }
    }

    pub(super) fn sysinfo(&mut self, cpu: &mut Vcpu, addr: u32) -> Result<i32, Errno> {
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

    pub(super) fn mmap(&mut self, cpu: &mut Vcpu, a: [u32; 6]) -> Result<i32, Errno> {
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
        if flags & SHARED != 0 {
            if let Err(e) = self.link_shared(cpu, start, len, file, pgoff) {
                self.mm.unmap(cpu, start, start + len);
                return Err(e);
            }
        } else if let Some(h) = file {
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

    /// A shared mapping at `[start, start + len)` (frames just mapped):
    /// each page linked to its page of the file (`file`, from page
    /// `pgoff`), or of a new memfd for shared anonymous memory, so that
    /// stores reach the file and a fork shares the pages. Pages past the
    /// end of the file stay the process's own (Linux would raise SIGBUS
    /// on them).
    pub(super) fn link_shared(
        &mut self,
        cpu: &mut Vcpu,
        start: u32,
        len: u32,
        file: Option<i32>,
        pgoff: u32,
    ) -> Result<(), Errno> {
        let (index, pages) = match file {
            Some(h) => {
                // SAFETY: an all-zero stat is valid to fill.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                // SAFETY: `st` is valid; `h` is a descriptor this process owns.
                if unsafe { libc::fstat(h, &mut st) } < 0 {
                    return Err(host_errno());
                }
                let key = (st.st_dev, st.st_ino);
                let index = match self.shared_files.get(&key) {
                    Some(&i) => i,
                    None => {
                        // SAFETY: `h` is a descriptor this process owns.
                        let d = unsafe { libc::fcntl(h, libc::F_DUPFD_CLOEXEC, 3) };
                        if d < 0 {
                            return Err(host_errno());
                        }
                        // SAFETY: `d` is a new descriptor nothing else owns.
                        let f =
                            std::fs::File::from(unsafe { std::os::fd::OwnedFd::from_raw_fd(d) });
                        let i = cpu.ram.register_backing(&f).map_err(|_| ENOMEM)?;
                        self.shared_files.insert(key, i);
                        i
                    }
                };
                let size_pages = (st.st_size.max(0) as u64).div_ceil(u64::from(PAGE));
                let n = size_pages
                    .saturating_sub(u64::from(pgoff))
                    .min(u64::from(len / PAGE)) as u32;
                (index, n)
            }
            None => {
                // SAFETY: a NUL-terminated name.
                let raw =
                    unsafe { libc::memfd_create(c"popek-shared".as_ptr(), libc::MFD_CLOEXEC) };
                if raw < 0 {
                    return Err(host_errno());
                }
                // SAFETY: `raw` is a new descriptor nothing else owns.
                let f = std::fs::File::from(unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) });
                f.set_len(u64::from(len)).map_err(|_| ENOMEM)?;
                (
                    cpu.ram.register_backing(&f).map_err(|_| ENOMEM)?,
                    len / PAGE,
                )
            }
        };
        let first = if file.is_some() { pgoff } else { 0 };
        for i in 0..pages {
            let frame = self.mm.frame(cpu, start + i * PAGE).ok_or(EFAULT)?;
            cpu.ram
                .link_page(frame / PAGE, index, first + i)
                .map_err(|_| ENOMEM)?;
        }
        Ok(())
    }

    pub(super) fn mremap(&mut self, cpu: &mut Vcpu, a: [u32; 6]) -> Result<i32, Errno> {
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
    pub(super) fn set_thread_area(&mut self, cpu: &mut Vcpu, addr: u32) -> Result<i32, Errno> {
        let b = self.mm.read(cpu, addr, 16)?;
        let mut d = [0u8; 16];
        d.copy_from_slice(&b);
        let (asked, entry) = self.tls_apply(cpu, d)?;
        if asked == u32::MAX {
            self.mm.write_u32(cpu, addr, entry)?;
        }
        Ok(0)
    }

    /// Install the TLS descriptor a user_desc describes (set_thread_area,
    /// CLONE_SETTLS): (the entry asked for, the entry used).
    pub(super) fn tls_apply(&mut self, cpu: &mut Vcpu, b: [u8; 16]) -> Result<(u32, u32), Errno> {
        let w = |i: usize| u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
        let (mut entry, base, limit, bits) = (w(0), w(1), w(2), w(3));
        let asked = entry;
        if entry == u32::MAX {
            entry = (TLS_FIRST..TLS_FIRST + TLS_ENTRIES)
                .find(|&e| cpu.read_sys(layout::GDT + 8 * e, 8).unwrap_or(0) == 0)
                .ok_or(ESRCH)?;
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
        Ok((asked, entry))
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
pub(super) fn now(clock: i32) -> (i64, i64) {
    // SAFETY: a zeroed timespec is valid for clock_gettime to fill.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is valid.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec, ts.tv_nsec)
}

impl LinuxProcess {
    /// Sleep `s` s and `ns` ns (a thread of several sleeps outside the
    /// process lock). Interrupted by a signal: EINTR, with the time left
    /// written at `rem` (a 32-bit timespec, or a 64-bit one if `wide`).
    pub(super) fn sleep(
        &mut self,
        cpu: &mut Vcpu,
        s: i64,
        ns: i64,
        rem: u32,
        wide: bool,
    ) -> Result<(), Errno> {
        if s < 0 || !(0..1_000_000_000).contains(&ns) {
            return Err(EINVAL);
        }
        let d = std::time::Duration::new(s as u64, ns as u32);
        if self.group.is_some() {
            self.block = Some(super::threads::Block::Sleep(d));
            return Ok(());
        }
        // The host's nanosleep, so that a signal the guest handles ends
        // the sleep early (EINTR), as natively.
        let t = libc::timespec {
            tv_sec: s,
            tv_nsec: ns,
        };
        let mut left = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid timespecs.
        if unsafe { libc::nanosleep(&t, &mut left) } < 0 {
            let e = host_errno();
            if e == EINTR && rem != 0 {
                let mut b = Vec::new();
                if wide {
                    b.extend_from_slice(&left.tv_sec.to_le_bytes());
                    b.extend_from_slice(&left.tv_nsec.to_le_bytes());
                } else {
                    b.extend_from_slice(&(left.tv_sec as i32).to_le_bytes());
                    b.extend_from_slice(&(left.tv_nsec as i32).to_le_bytes());
                }
                self.mm.write(cpu, rem, &b)?;
            }
            return Err(e);
        }
        Ok(())
    }
}

/// The i386 `struct stat64` (arch/x86/include/uapi/asm/stat.h, 96 bytes).
pub(super) fn stat64(st: &libc::stat) -> [u8; 96] {
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
