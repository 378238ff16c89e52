//! System calls through `int 0x80` (i386 numbers:
//! arch/x86/entry/syscalls/syscall_32.tbl), serviced by popek on the host.
//!
//! One table ([`SYSCALLS`]) says, for each number, the call's name, how
//! `--strace` shows its arguments and which handler runs it. Files are host
//! files: a guest file descriptor names a host one (or popek's stdout and
//! stderr, which a caller may capture). Structures whose i386 layout
//! differs from the host's (stat64, timespec, rlimit, sysinfo) are
//! converted; the others (statx, linux_dirent64, termios, winsize) are the
//! same on both and copied.

use std::io::Write;

use popek_vcpu::{reg, Vcpu};

use super::errno::*;
use super::handlers::*;
use super::process::{LinuxProcess, AT_FDCWD};

/// Syscall argument kinds for `--strace`.
#[derive(Clone, Copy)]
pub(super) enum A {
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

/// One row of the system-call table: the i386 number, the name and the
/// argument kinds `--strace` shows, and the handler.
pub(super) struct Syscall {
    /// The i386 system-call number (EAX).
    pub nr: u32,
    /// Its name.
    pub name: &'static str,
    /// How `--strace` shows its arguments.
    pub args: &'static [A],
    /// The handler.
    pub run: Handler,
}

/// A system call's handler: the result it returns in EAX, or the errno
/// (returned negated).
pub(super) type Handler = fn(&mut LinuxProcess, Call<'_>) -> Result<i32, Errno>;

/// What a handler works on.
pub(super) struct Call<'a> {
    /// The CPU (registers, and guest memory through the address space).
    pub cpu: &'a mut Vcpu,
    /// The system-call number.
    pub n: u32,
    /// EBX, ECX, EDX, ESI, EDI, EBP.
    pub a: [u32; 6],
    /// The process's stdout.
    pub out: &'a mut dyn Write,
    /// The process's stderr.
    pub err: &'a mut dyn Write,
}

use super::creds::{
    sys_capability, sys_clock_getres, sys_getcpu, sys_getresids, sys_groups, sys_ids16, sys_ioprio,
    sys_nice, sys_personality, sys_sched, sys_setids, sys_syslog,
};
use super::events::{sys_epoll, sys_eventfd, sys_inotify, sys_signalfd, sys_timer, sys_timerfd};
use super::files::{
    sys_chown, sys_chroot, sys_close_range, sys_fd_op, sys_getaffinity, sys_link, sys_mem_hint,
    sys_memfd_create, sys_mknod, sys_pread, sys_preadv, sys_priority, sys_splice, sys_statfs64,
    sys_sync, sys_truncate, sys_utimensat, sys_xattr,
};
use super::ipc::{sys_ipc, sys_sysv};
use super::net::{sys_socket, sys_socketcall};
use super::procs::{
    sys_chmod, sys_execve, sys_fork, sys_getrusage, sys_pgrp, sys_poll, sys_select, sys_times,
    sys_wait4, sys_waitid,
};
use super::signals::{
    sys_alarm, sys_itimer, sys_kill, sys_pause, sys_rt_sigaction, sys_rt_sigpending,
    sys_rt_sigprocmask, sys_rt_sigqueueinfo, sys_rt_sigsuspend, sys_rt_sigtimedwait,
    sys_sigaltstack, sys_sigreturn,
};
use super::threads::{sys_futex, sys_sched_yield};
use A::{Dirfd, In, Out, D, S, X};

/// Every system call popek knows, sorted by number (looked up by binary
/// search; a test checks the order). Any other number is `sys_unknown`'s.
#[rustfmt::skip]
pub(super) static SYSCALLS: &[Syscall] = &[
    Syscall { nr: 1, name: "exit", args: &[D], run: sys_exit },
    Syscall { nr: 2, name: "fork", args: &[], run: sys_fork },
    Syscall { nr: 3, name: "read", args: &[D, Out, D], run: sys_read },
    Syscall { nr: 4, name: "write", args: &[D, In, D], run: sys_write },
    Syscall { nr: 5, name: "open", args: &[S, X, X], run: sys_open },
    Syscall { nr: 6, name: "close", args: &[D], run: sys_close },
    Syscall { nr: 7, name: "waitpid", args: &[D, X, X], run: sys_wait4 },
    Syscall { nr: 9, name: "link", args: &[S, S], run: sys_link },
    Syscall { nr: 10, name: "unlink", args: &[S], run: sys_unlink },
    Syscall { nr: 11, name: "execve", args: &[S, X, X], run: sys_execve },
    Syscall { nr: 12, name: "chdir", args: &[S], run: sys_chdir },
    Syscall { nr: 13, name: "time", args: &[X], run: sys_time },
    Syscall { nr: 14, name: "mknod", args: &[S, X, X], run: sys_mknod },
    Syscall { nr: 15, name: "chmod", args: &[S, X], run: sys_chmod },
    Syscall { nr: 19, name: "lseek", args: &[D, D, D], run: sys_lseek },
    Syscall { nr: 20, name: "getpid", args: &[], run: sys_getpid },
    Syscall { nr: 23, name: "setuid", args: &[D], run: sys_setids },
    Syscall { nr: 24, name: "getuid", args: &[], run: sys_ids16 },
    Syscall { nr: 27, name: "alarm", args: &[D], run: sys_alarm },
    Syscall { nr: 29, name: "pause", args: &[], run: sys_pause },
    Syscall { nr: 30, name: "utime", args: &[S, X], run: sys_utimensat },
    Syscall { nr: 33, name: "access", args: &[S, X], run: sys_access },
    Syscall { nr: 34, name: "nice", args: &[D], run: sys_nice },
    Syscall { nr: 36, name: "sync", args: &[], run: sys_sync },
    Syscall { nr: 37, name: "kill", args: &[D, D], run: sys_kill },
    Syscall { nr: 38, name: "rename", args: &[S, S], run: sys_rename },
    Syscall { nr: 39, name: "mkdir", args: &[S, X], run: sys_mkdir },
    Syscall { nr: 40, name: "rmdir", args: &[S], run: sys_unlink },
    Syscall { nr: 41, name: "dup", args: &[D], run: sys_dup },
    Syscall { nr: 42, name: "pipe", args: &[X], run: sys_pipe },
    Syscall { nr: 43, name: "times", args: &[X], run: sys_times },
    Syscall { nr: 45, name: "brk", args: &[X], run: sys_brk },
    Syscall { nr: 46, name: "setgid", args: &[D], run: sys_setids },
    Syscall { nr: 47, name: "getgid", args: &[], run: sys_ids16 },
    Syscall { nr: 49, name: "geteuid", args: &[], run: sys_ids16 },
    Syscall { nr: 50, name: "getegid", args: &[], run: sys_ids16 },
    Syscall { nr: 54, name: "ioctl", args: &[D, X, X], run: sys_ioctl },
    Syscall { nr: 55, name: "fcntl", args: &[D, D, X], run: sys_fcntl64 },
    Syscall { nr: 57, name: "setpgid", args: &[D, D], run: sys_pgrp },
    Syscall { nr: 60, name: "umask", args: &[X], run: sys_umask },
    Syscall { nr: 61, name: "chroot", args: &[S], run: sys_chroot },
    Syscall { nr: 63, name: "dup2", args: &[D, D], run: sys_dup2 },
    Syscall { nr: 64, name: "getppid", args: &[], run: sys_getppid },
    Syscall { nr: 65, name: "getpgrp", args: &[], run: sys_pgrp },
    Syscall { nr: 66, name: "setsid", args: &[], run: sys_pgrp },
    Syscall { nr: 70, name: "setreuid", args: &[D, D], run: sys_setids },
    Syscall { nr: 71, name: "setregid", args: &[D, D], run: sys_setids },
    Syscall { nr: 75, name: "setrlimit", args: &[D, X], run: sys_rlimit },
    Syscall { nr: 76, name: "getrlimit", args: &[D, X], run: sys_rlimit },
    Syscall { nr: 77, name: "getrusage", args: &[D, X], run: sys_getrusage },
    Syscall { nr: 78, name: "gettimeofday", args: &[X, X], run: sys_gettimeofday },
    Syscall { nr: 80, name: "getgroups", args: &[D, X], run: sys_groups },
    Syscall { nr: 81, name: "setgroups", args: &[D, X], run: sys_groups },
    Syscall { nr: 83, name: "symlink", args: &[S, S], run: sys_link },
    Syscall { nr: 85, name: "readlink", args: &[S, X, D], run: sys_readlink },
    Syscall { nr: 90, name: "mmap", args: &[X], run: sys_mmap },
    Syscall { nr: 91, name: "munmap", args: &[X, X], run: sys_munmap },
    Syscall { nr: 92, name: "truncate", args: &[S, D], run: sys_truncate },
    Syscall { nr: 93, name: "ftruncate", args: &[D, D], run: sys_truncate },
    Syscall { nr: 94, name: "fchmod", args: &[D, X], run: sys_chmod },
    Syscall { nr: 96, name: "getpriority", args: &[D, D], run: sys_priority },
    Syscall { nr: 97, name: "setpriority", args: &[D, D, D], run: sys_priority },
    Syscall { nr: 102, name: "socketcall", args: &[D, X], run: sys_socketcall },
    Syscall { nr: 103, name: "syslog", args: &[D, X, D], run: sys_syslog },
    Syscall { nr: 104, name: "setitimer", args: &[D, X, X], run: sys_itimer },
    Syscall { nr: 105, name: "getitimer", args: &[D, X], run: sys_itimer },
    Syscall { nr: 114, name: "wait4", args: &[D, X, X, X], run: sys_wait4 },
    Syscall { nr: 116, name: "sysinfo", args: &[X], run: sys_sysinfo },
    Syscall { nr: 117, name: "ipc", args: &[D, D, D, D, X, D], run: sys_ipc },
    Syscall { nr: 118, name: "fsync", args: &[D], run: sys_sync },
    Syscall { nr: 119, name: "sigreturn", args: &[], run: sys_sigreturn },
    Syscall { nr: 120, name: "clone", args: &[X, X, X, X, X], run: sys_fork },
    Syscall { nr: 122, name: "uname", args: &[X], run: sys_uname },
    Syscall { nr: 125, name: "mprotect", args: &[X, X, X], run: sys_mprotect },
    Syscall { nr: 132, name: "getpgid", args: &[D], run: sys_pgrp },
    Syscall { nr: 133, name: "fchdir", args: &[D], run: sys_fd_op },
    Syscall { nr: 136, name: "personality", args: &[X], run: sys_personality },
    Syscall { nr: 138, name: "setfsuid", args: &[D], run: sys_setids },
    Syscall { nr: 139, name: "setfsgid", args: &[D], run: sys_setids },
    Syscall { nr: 140, name: "_llseek", args: &[D, D, D, X, D], run: sys_llseek },
    Syscall { nr: 142, name: "_newselect", args: &[D, X, X, X, X], run: sys_select },
    Syscall { nr: 143, name: "flock", args: &[D, D], run: sys_fd_op },
    Syscall { nr: 144, name: "msync", args: &[X, X, X], run: sys_mem_hint },
    Syscall { nr: 145, name: "readv", args: &[D, X, D], run: sys_readv },
    Syscall { nr: 146, name: "writev", args: &[D, X, D], run: sys_writev },
    Syscall { nr: 147, name: "getsid", args: &[D], run: sys_pgrp },
    Syscall { nr: 148, name: "fdatasync", args: &[D], run: sys_sync },
    Syscall { nr: 150, name: "mlock", args: &[X, X], run: sys_mem_hint },
    Syscall { nr: 151, name: "munlock", args: &[X, X], run: sys_mem_hint },
    Syscall { nr: 152, name: "mlockall", args: &[X], run: sys_mem_hint },
    Syscall { nr: 153, name: "munlockall", args: &[], run: sys_mem_hint },
    Syscall { nr: 154, name: "sched_setparam", args: &[D, X], run: sys_sched },
    Syscall { nr: 155, name: "sched_getparam", args: &[D, X], run: sys_sched },
    Syscall { nr: 156, name: "sched_setscheduler", args: &[D, D, X], run: sys_sched },
    Syscall { nr: 157, name: "sched_getscheduler", args: &[D], run: sys_sched },
    Syscall { nr: 158, name: "sched_yield", args: &[], run: sys_sched_yield },
    Syscall { nr: 159, name: "sched_get_priority_max", args: &[D], run: sys_sched },
    Syscall { nr: 160, name: "sched_get_priority_min", args: &[D], run: sys_sched },
    Syscall { nr: 161, name: "sched_rr_get_interval", args: &[D, X], run: sys_sched },
    Syscall { nr: 162, name: "nanosleep", args: &[X, X], run: sys_nanosleep },
    Syscall { nr: 163, name: "mremap", args: &[X, X, X, X, X], run: sys_mremap },
    Syscall { nr: 164, name: "setresuid", args: &[D, D, D], run: sys_setids },
    Syscall { nr: 165, name: "getresuid", args: &[X, X, X], run: sys_getresids },
    Syscall { nr: 168, name: "poll", args: &[X, D, D], run: sys_poll },
    Syscall { nr: 170, name: "setresgid", args: &[D, D, D], run: sys_setids },
    Syscall { nr: 171, name: "getresgid", args: &[X, X, X], run: sys_getresids },
    Syscall { nr: 172, name: "prctl", args: &[D, X, X, X, X], run: sys_prctl },
    Syscall { nr: 173, name: "rt_sigreturn", args: &[], run: sys_sigreturn },
    Syscall { nr: 174, name: "rt_sigaction", args: &[D, X, X, D], run: sys_rt_sigaction },
    Syscall { nr: 175, name: "rt_sigprocmask", args: &[D, X, X, D], run: sys_rt_sigprocmask },
    Syscall { nr: 176, name: "rt_sigpending", args: &[X, D], run: sys_rt_sigpending },
    Syscall { nr: 177, name: "rt_sigtimedwait", args: &[X, X, X, D], run: sys_rt_sigtimedwait },
    Syscall { nr: 178, name: "rt_sigqueueinfo", args: &[D, D, X], run: sys_rt_sigqueueinfo },
    Syscall { nr: 179, name: "rt_sigsuspend", args: &[X, D], run: sys_rt_sigsuspend },
    Syscall { nr: 180, name: "pread64", args: &[D, Out, D, D, D], run: sys_pread },
    Syscall { nr: 181, name: "pwrite64", args: &[D, In, D, D, D], run: sys_pread },
    Syscall { nr: 183, name: "getcwd", args: &[X, D], run: sys_getcwd },
    Syscall { nr: 184, name: "capget", args: &[X, X], run: sys_capability },
    Syscall { nr: 185, name: "capset", args: &[X, X], run: sys_capability },
    Syscall { nr: 186, name: "sigaltstack", args: &[X, X], run: sys_sigaltstack },
    Syscall { nr: 187, name: "sendfile", args: &[D, D, X, D], run: sys_sendfile },
    Syscall { nr: 190, name: "vfork", args: &[], run: sys_fork },
    Syscall { nr: 191, name: "ugetrlimit", args: &[D, X], run: sys_rlimit },
    Syscall { nr: 192, name: "mmap2", args: &[X, X, X, X, D, X], run: sys_mmap2 },
    Syscall { nr: 193, name: "truncate64", args: &[S, X, X], run: sys_truncate },
    Syscall { nr: 194, name: "ftruncate64", args: &[D, X, X], run: sys_truncate },
    Syscall { nr: 195, name: "stat64", args: &[S, X], run: sys_stat64 },
    Syscall { nr: 196, name: "lstat64", args: &[S, X], run: sys_stat64 },
    Syscall { nr: 197, name: "fstat64", args: &[D, X], run: sys_stat64 },
    Syscall { nr: 198, name: "lchown32", args: &[S, D, D], run: sys_chown },
    Syscall { nr: 199, name: "getuid32", args: &[], run: sys_ids },
    Syscall { nr: 200, name: "getgid32", args: &[], run: sys_ids },
    Syscall { nr: 201, name: "geteuid32", args: &[], run: sys_ids },
    Syscall { nr: 202, name: "getegid32", args: &[], run: sys_ids },
    Syscall { nr: 203, name: "setreuid32", args: &[D, D], run: sys_setids },
    Syscall { nr: 204, name: "setregid32", args: &[D, D], run: sys_setids },
    Syscall { nr: 205, name: "getgroups32", args: &[D, X], run: sys_groups },
    Syscall { nr: 206, name: "setgroups32", args: &[D, X], run: sys_groups },
    Syscall { nr: 207, name: "fchown32", args: &[D, D, D], run: sys_chown },
    Syscall { nr: 208, name: "setresuid32", args: &[D, D, D], run: sys_setids },
    Syscall { nr: 209, name: "getresuid32", args: &[X, X, X], run: sys_getresids },
    Syscall { nr: 210, name: "setresgid32", args: &[D, D, D], run: sys_setids },
    Syscall { nr: 211, name: "getresgid32", args: &[X, X, X], run: sys_getresids },
    Syscall { nr: 212, name: "chown32", args: &[S, D, D], run: sys_chown },
    Syscall { nr: 213, name: "setuid32", args: &[D], run: sys_setids },
    Syscall { nr: 214, name: "setgid32", args: &[D], run: sys_setids },
    Syscall { nr: 215, name: "setfsuid32", args: &[D], run: sys_setids },
    Syscall { nr: 216, name: "setfsgid32", args: &[D], run: sys_setids },
    Syscall { nr: 218, name: "mincore", args: &[X, X, X], run: sys_mem_hint },
    Syscall { nr: 219, name: "madvise", args: &[X, X, D], run: sys_accept },
    Syscall { nr: 220, name: "getdents64", args: &[D, X, D], run: sys_getdents64 },
    Syscall { nr: 221, name: "fcntl64", args: &[D, D, X], run: sys_fcntl64 },
    Syscall { nr: 224, name: "gettid", args: &[], run: sys_getpid },
    Syscall { nr: 225, name: "readahead", args: &[D, D, D, D], run: sys_fd_op },
    Syscall { nr: 226, name: "setxattr", args: &[S, S, X, D, X], run: sys_xattr },
    Syscall { nr: 227, name: "lsetxattr", args: &[S, S, X, D, X], run: sys_xattr },
    Syscall { nr: 228, name: "fsetxattr", args: &[D, S, X, D, X], run: sys_xattr },
    Syscall { nr: 229, name: "getxattr", args: &[S, S, X, D], run: sys_xattr },
    Syscall { nr: 230, name: "lgetxattr", args: &[S, S, X, D], run: sys_xattr },
    Syscall { nr: 231, name: "fgetxattr", args: &[D, S, X, D], run: sys_xattr },
    Syscall { nr: 232, name: "listxattr", args: &[S, X, D], run: sys_xattr },
    Syscall { nr: 233, name: "llistxattr", args: &[S, X, D], run: sys_xattr },
    Syscall { nr: 234, name: "flistxattr", args: &[D, X, D], run: sys_xattr },
    Syscall { nr: 235, name: "removexattr", args: &[S, S], run: sys_xattr },
    Syscall { nr: 236, name: "lremovexattr", args: &[S, S], run: sys_xattr },
    Syscall { nr: 237, name: "fremovexattr", args: &[D, S], run: sys_xattr },
    Syscall { nr: 238, name: "tkill", args: &[D, D], run: sys_kill },
    Syscall { nr: 239, name: "sendfile64", args: &[D, D, X, D], run: sys_sendfile },
    Syscall { nr: 240, name: "futex", args: &[X, D, D, X, X, X], run: sys_futex },
    Syscall { nr: 241, name: "sched_setaffinity", args: &[D, D, X], run: sys_sched },
    Syscall { nr: 242, name: "sched_getaffinity", args: &[D, D, X], run: sys_getaffinity },
    Syscall { nr: 243, name: "set_thread_area", args: &[X], run: sys_set_thread_area },
    Syscall { nr: 250, name: "fadvise64", args: &[D, D, D, D, D], run: sys_fd_op },
    Syscall { nr: 252, name: "exit_group", args: &[D], run: sys_exit },
    Syscall { nr: 254, name: "epoll_create", args: &[D], run: sys_epoll },
    Syscall { nr: 255, name: "epoll_ctl", args: &[D, D, D, X], run: sys_epoll },
    Syscall { nr: 256, name: "epoll_wait", args: &[D, X, D, D], run: sys_epoll },
    Syscall { nr: 258, name: "set_tid_address", args: &[X], run: sys_getpid },
    Syscall { nr: 259, name: "timer_create", args: &[D, X, X], run: sys_timer },
    Syscall { nr: 260, name: "timer_settime", args: &[D, D, X, X], run: sys_timer },
    Syscall { nr: 261, name: "timer_gettime", args: &[D, X], run: sys_timer },
    Syscall { nr: 262, name: "timer_getoverrun", args: &[D], run: sys_timer },
    Syscall { nr: 263, name: "timer_delete", args: &[D], run: sys_timer },
    Syscall { nr: 265, name: "clock_gettime", args: &[D, X], run: sys_clock_gettime },
    Syscall { nr: 266, name: "clock_getres", args: &[D, X], run: sys_clock_getres },
    Syscall { nr: 267, name: "clock_nanosleep", args: &[D, D, X, X], run: sys_clock_nanosleep },
    Syscall { nr: 268, name: "statfs64", args: &[S, D, X], run: sys_statfs64 },
    Syscall { nr: 269, name: "fstatfs64", args: &[D, D, X], run: sys_statfs64 },
    Syscall { nr: 270, name: "tgkill", args: &[D, D, D], run: sys_kill },
    Syscall { nr: 271, name: "utimes", args: &[S, X], run: sys_utimensat },
    Syscall { nr: 272, name: "fadvise64_64", args: &[D, X, X, X, X, D], run: sys_accept },
    Syscall { nr: 284, name: "waitid", args: &[D, D, X, X, X], run: sys_waitid },
    Syscall { nr: 289, name: "ioprio_set", args: &[D, D, D], run: sys_ioprio },
    Syscall { nr: 290, name: "ioprio_get", args: &[D, D], run: sys_ioprio },
    Syscall { nr: 291, name: "inotify_init", args: &[], run: sys_inotify },
    Syscall { nr: 292, name: "inotify_add_watch", args: &[D, S, X], run: sys_inotify },
    Syscall { nr: 293, name: "inotify_rm_watch", args: &[D, D], run: sys_inotify },
    Syscall { nr: 295, name: "openat", args: &[Dirfd, S, X, X], run: sys_open },
    Syscall { nr: 296, name: "mkdirat", args: &[Dirfd, S, X], run: sys_mkdir },
    Syscall { nr: 297, name: "mknodat", args: &[Dirfd, S, X, X], run: sys_mknod },
    Syscall { nr: 298, name: "fchownat", args: &[Dirfd, S, D, D, X], run: sys_chown },
    Syscall { nr: 299, name: "futimesat", args: &[Dirfd, S, X], run: sys_utimensat },
    Syscall { nr: 300, name: "fstatat64", args: &[Dirfd, S, X, X], run: sys_stat64 },
    Syscall { nr: 301, name: "unlinkat", args: &[Dirfd, S, X], run: sys_unlink },
    Syscall { nr: 302, name: "renameat", args: &[Dirfd, S, Dirfd, S], run: sys_rename },
    Syscall { nr: 303, name: "linkat", args: &[Dirfd, S, Dirfd, S, X], run: sys_link },
    Syscall { nr: 304, name: "symlinkat", args: &[S, Dirfd, S], run: sys_link },
    Syscall { nr: 305, name: "readlinkat", args: &[Dirfd, S, X, D], run: sys_readlink },
    Syscall { nr: 306, name: "fchmodat", args: &[Dirfd, S, X], run: sys_chmod },
    Syscall { nr: 307, name: "faccessat", args: &[Dirfd, S, X], run: sys_access },
    Syscall { nr: 308, name: "pselect6", args: &[D, X, X, X, X, X], run: sys_select },
    Syscall { nr: 309, name: "ppoll", args: &[X, D, X, X, D], run: sys_poll },
    Syscall { nr: 311, name: "set_robust_list", args: &[X, D], run: sys_accept },
    Syscall { nr: 313, name: "splice", args: &[D, X, D, X, D, X], run: sys_splice },
    Syscall { nr: 314, name: "sync_file_range", args: &[D, D, D, D, D, X], run: sys_fd_op },
    Syscall { nr: 315, name: "tee", args: &[D, D, D, X], run: sys_splice },
    Syscall { nr: 318, name: "getcpu", args: &[X, X, X], run: sys_getcpu },
    Syscall { nr: 319, name: "epoll_pwait", args: &[D, X, D, D, X], run: sys_epoll },
    Syscall { nr: 320, name: "utimensat", args: &[Dirfd, S, X, X], run: sys_utimensat },
    Syscall { nr: 321, name: "signalfd", args: &[D, X, D], run: sys_signalfd },
    Syscall { nr: 322, name: "timerfd_create", args: &[D, X], run: sys_timerfd },
    Syscall { nr: 323, name: "eventfd", args: &[D], run: sys_eventfd },
    Syscall { nr: 324, name: "fallocate", args: &[D, D, D, D, D, D], run: sys_fd_op },
    Syscall { nr: 325, name: "timerfd_settime", args: &[D, X, X, X], run: sys_timerfd },
    Syscall { nr: 326, name: "timerfd_gettime", args: &[D, X], run: sys_timerfd },
    Syscall { nr: 327, name: "signalfd4", args: &[D, X, D, X], run: sys_signalfd },
    Syscall { nr: 328, name: "eventfd2", args: &[D, X], run: sys_eventfd },
    Syscall { nr: 329, name: "epoll_create1", args: &[X], run: sys_epoll },
    Syscall { nr: 330, name: "dup3", args: &[D, D, X], run: sys_dup2 },
    Syscall { nr: 331, name: "pipe2", args: &[X, X], run: sys_pipe },
    Syscall { nr: 332, name: "inotify_init1", args: &[X], run: sys_inotify },
    Syscall { nr: 333, name: "preadv", args: &[D, X, D, D, D], run: sys_preadv },
    Syscall { nr: 334, name: "pwritev", args: &[D, X, D, D, D], run: sys_preadv },
    Syscall { nr: 335, name: "rt_tgsigqueueinfo", args: &[D, D, D, X], run: sys_rt_sigqueueinfo },
    Syscall { nr: 337, name: "recvmmsg", args: &[D, X, D, X, X], run: sys_socket },
    Syscall { nr: 340, name: "prlimit64", args: &[D, D, X, X], run: sys_rlimit },
    Syscall { nr: 344, name: "syncfs", args: &[D], run: sys_sync },
    Syscall { nr: 345, name: "sendmmsg", args: &[D, X, D, X], run: sys_socket },
    Syscall { nr: 355, name: "getrandom", args: &[X, D, X], run: sys_getrandom },
    Syscall { nr: 356, name: "memfd_create", args: &[S, X], run: sys_memfd_create },
    Syscall { nr: 359, name: "socket", args: &[D, X, D], run: sys_socket },
    Syscall { nr: 360, name: "socketpair", args: &[D, X, D, X], run: sys_socket },
    Syscall { nr: 361, name: "bind", args: &[D, X, D], run: sys_socket },
    Syscall { nr: 362, name: "connect", args: &[D, X, D], run: sys_socket },
    Syscall { nr: 363, name: "listen", args: &[D, D], run: sys_socket },
    Syscall { nr: 364, name: "accept4", args: &[D, X, X, X], run: sys_socket },
    Syscall { nr: 365, name: "getsockopt", args: &[D, D, D, X, X], run: sys_socket },
    Syscall { nr: 366, name: "setsockopt", args: &[D, D, D, X, D], run: sys_socket },
    Syscall { nr: 367, name: "getsockname", args: &[D, X, X], run: sys_socket },
    Syscall { nr: 368, name: "getpeername", args: &[D, X, X], run: sys_socket },
    Syscall { nr: 369, name: "sendto", args: &[D, In, D, X, X, D], run: sys_socket },
    Syscall { nr: 370, name: "sendmsg", args: &[D, X, X], run: sys_socket },
    Syscall { nr: 371, name: "recvfrom", args: &[D, Out, D, X, X, X], run: sys_socket },
    Syscall { nr: 372, name: "recvmsg", args: &[D, X, X], run: sys_socket },
    Syscall { nr: 373, name: "shutdown", args: &[D, D], run: sys_socket },
    Syscall { nr: 376, name: "mlock2", args: &[X, X, X], run: sys_mem_hint },
    Syscall { nr: 377, name: "copy_file_range", args: &[D, X, D, X, D, X], run: sys_splice },
    Syscall { nr: 378, name: "preadv2", args: &[D, X, D, D, D, X], run: sys_preadv },
    Syscall { nr: 379, name: "pwritev2", args: &[D, X, D, D, D, X], run: sys_preadv },
    Syscall { nr: 383, name: "statx", args: &[Dirfd, S, X, X, X], run: sys_statx },
    Syscall { nr: 386, name: "rseq", args: &[X, D, X, X], run: sys_unknown },
    Syscall { nr: 393, name: "semget", args: &[D, D, X], run: sys_sysv },
    Syscall { nr: 394, name: "semctl", args: &[D, D, D, X], run: sys_sysv },
    Syscall { nr: 395, name: "shmget", args: &[D, D, X], run: sys_sysv },
    Syscall { nr: 396, name: "shmctl", args: &[D, D, X], run: sys_sysv },
    Syscall { nr: 397, name: "shmat", args: &[D, X, X], run: sys_sysv },
    Syscall { nr: 398, name: "shmdt", args: &[X], run: sys_sysv },
    Syscall { nr: 399, name: "msgget", args: &[D, X], run: sys_sysv },
    Syscall { nr: 400, name: "msgsnd", args: &[D, X, D, X], run: sys_sysv },
    Syscall { nr: 401, name: "msgrcv", args: &[D, X, D, D, X], run: sys_sysv },
    Syscall { nr: 402, name: "msgctl", args: &[D, D, X], run: sys_sysv },
    Syscall { nr: 403, name: "clock_gettime64", args: &[D, X], run: sys_clock_gettime },
    Syscall { nr: 406, name: "clock_getres_time64", args: &[D, X], run: sys_clock_getres },
    Syscall { nr: 407, name: "clock_nanosleep_time64", args: &[D, D, X, X], run: sys_clock_nanosleep },
    Syscall { nr: 408, name: "timer_gettime64", args: &[D, X], run: sys_timer },
    Syscall { nr: 409, name: "timer_settime64", args: &[D, D, X, X], run: sys_timer },
    Syscall { nr: 410, name: "timerfd_gettime64", args: &[D, X], run: sys_timerfd },
    Syscall { nr: 411, name: "timerfd_settime64", args: &[D, X, X, X], run: sys_timerfd },
    Syscall { nr: 412, name: "utimensat_time64", args: &[Dirfd, S, X, X], run: sys_utimensat },
    Syscall { nr: 413, name: "pselect6_time64", args: &[D, X, X, X, X, X], run: sys_select },
    Syscall { nr: 414, name: "ppoll_time64", args: &[X, D, X, X, D], run: sys_poll },
    Syscall { nr: 417, name: "recvmmsg_time64", args: &[D, X, D, X, X], run: sys_socket },
    Syscall { nr: 420, name: "semtimedop_time64", args: &[D, X, D, X], run: sys_sysv },
    Syscall { nr: 421, name: "rt_sigtimedwait_time64", args: &[X, X, X, D], run: sys_rt_sigtimedwait },
    Syscall { nr: 422, name: "futex_time64", args: &[X, D, D, X, X, X], run: sys_futex },
    Syscall { nr: 423, name: "sched_rr_get_interval_time64", args: &[D, X], run: sys_sched },
    Syscall { nr: 435, name: "clone3", args: &[X, D], run: sys_fork },
    Syscall { nr: 436, name: "close_range", args: &[D, D, X], run: sys_close_range },
    Syscall { nr: 439, name: "faccessat2", args: &[Dirfd, S, X, X], run: sys_access },
    Syscall { nr: 441, name: "epoll_pwait2", args: &[D, X, D, X, X], run: sys_epoll },
];

/// The row for system call `nr`, if popek knows it.
pub(super) fn lookup(nr: u32) -> Option<&'static Syscall> {
    SYSCALLS
        .binary_search_by_key(&nr, |s| s.nr)
        .ok()
        .map(|i| &SYSCALLS[i])
}

impl LinuxProcess {
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
        let row = lookup(n);
        let shown = row.map(|s| (s.name, s.args));
        let before = match (self.start.strace, shown) {
            (true, Some((name, kinds))) => Some(self.show_args(cpu, name, kinds, &a, None)),
            _ => None,
        };
        let run = row.map_or(sys_unknown as Handler, |s| s.run);
        let call = Call {
            cpu: &mut *cpu,
            n,
            a,
            out: &mut *out,
            err: &mut *err,
        };
        let ret = run(self, call).unwrap_or_else(|e| -e);
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
}

#[cfg(test)]
mod tests {
    use super::SYSCALLS;

    #[test]
    fn the_table_is_sorted_by_number_and_names_are_unique() {
        assert!(SYSCALLS.windows(2).all(|w| w[0].nr < w[1].nr));
        let mut names: Vec<&str> = SYSCALLS.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SYSCALLS.len());
    }
}
