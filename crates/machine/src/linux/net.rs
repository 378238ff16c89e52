//! Sockets: `socketcall` (102, the i386 multiplexer glibc used before
//! Linux 4.3) and the direct calls (359-373, recvmmsg 337 and 417,
//! sendmmsg 345),
//! serviced by the host's sockets. A guest socket is a host descriptor in
//! the guest's table, like a file.
//!
//! Addresses (`sockaddr_*`) have the same layout on i386 and x86-64 and
//! are copied as bytes. What differs is converted: `msghdr` and `iovec`
//! (32-bit pointers and lengths), control messages (`cmsghdr`'s length is
//! 32 bits and the data 4-byte aligned on i386; descriptors passed with
//! SCM_RIGHTS are guest descriptors on one side and host ones on the
//! other), and the `timeval` of SO_RCVTIMEO and SO_SNDTIMEO.
//!
//! The host sees MSG_NOSIGNAL on every send: a send on a socket whose peer
//! has gone raises the guest's SIGPIPE (unless the guest asked for
//! MSG_NOSIGNAL), as a write to such a pipe does.

use popek_vcpu::Vcpu;

use super::errno::*;
use super::process::{check, host_errno, File, LinuxProcess};
use super::syscalls::Call;

/// socketcall's call numbers (linux/net.h).
mod op {
    pub const SOCKET: u32 = 1;
    pub const BIND: u32 = 2;
    pub const CONNECT: u32 = 3;
    pub const LISTEN: u32 = 4;
    pub const ACCEPT: u32 = 5;
    pub const GETSOCKNAME: u32 = 6;
    pub const GETPEERNAME: u32 = 7;
    pub const SOCKETPAIR: u32 = 8;
    pub const SEND: u32 = 9;
    pub const RECV: u32 = 10;
    pub const SENDTO: u32 = 11;
    pub const RECVFROM: u32 = 12;
    pub const SHUTDOWN: u32 = 13;
    pub const SETSOCKOPT: u32 = 14;
    pub const GETSOCKOPT: u32 = 15;
    pub const SENDMSG: u32 = 16;
    pub const RECVMSG: u32 = 17;
    pub const ACCEPT4: u32 = 18;
    pub const RECVMMSG: u32 = 19;
    pub const SENDMMSG: u32 = 20;
}

/// How many argument words each socketcall takes (index: call number).
const ARGS: [u32; 21] = [
    0, 3, 3, 3, 2, 3, 3, 3, 4, 4, 4, 6, 6, 2, 5, 5, 3, 3, 4, 5, 4,
];

/// SOCK_CLOEXEC (the same as O_CLOEXEC on both).
const SOCK_CLOEXEC: u32 = 0o2_000_000;
/// MSG_NOSIGNAL.
const MSG_NOSIGNAL: u32 = 0x4000;
/// MSG_WAITFORONE (recvmmsg).
const MSG_WAITFORONE: u32 = 0x10000;
/// MSG_CMSG_CLOEXEC (recvmsg).
const MSG_CMSG_CLOEXEC: u32 = 0x4000_0000;
/// The largest socket address (sockaddr_storage).
const ADDR_MAX: u32 = 128;
/// i386 `struct msghdr`: name, namelen, iov, iovlen, control, controllen,
/// flags.
const MSGHDR: u32 = 28;

/// socketcall (102): the call number and a pointer to its arguments.
pub(super) fn sys_socketcall(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, a, .. } = c;
    let call = a[0];
    let n = *ARGS.get(call as usize).filter(|&&n| n > 0).ok_or(EINVAL)?;
    let words = pr.mm.read(cpu, a[1], 4 * n)?;
    let mut args = [0u32; 6];
    for (i, w) in words.chunks(4).enumerate() {
        args[i] = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
    }
    socket_op(pr, cpu, call, args)
}

/// The direct socket calls (socket 359 ... shutdown 373, recvmmsg 337
/// and recvmmsg_time64 417, sendmmsg 345).
pub(super) fn sys_socket(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let call = match n {
        359 => op::SOCKET,
        360 => op::SOCKETPAIR,
        361 => op::BIND,
        362 => op::CONNECT,
        363 => op::LISTEN,
        364 => op::ACCEPT4,
        365 => op::GETSOCKOPT,
        366 => op::SETSOCKOPT,
        367 => op::GETSOCKNAME,
        368 => op::GETPEERNAME,
        369 => op::SENDTO,
        370 => op::SENDMSG,
        371 => op::RECVFROM,
        372 => op::RECVMSG,
        373 => op::SHUTDOWN,
        337 | 417 => op::RECVMMSG,
        345 => op::SENDMMSG,
        _ => return Err(ENOSYS),
    };
    socket_op(pr, cpu, call, a)
}

/// A host call's result, or the negated errno.
fn result(r: isize) -> i64 {
    if r < 0 {
        -i64::from(host_errno())
    } else {
        r as i64
    }
}

/// A send's result for the guest: EPIPE without MSG_NOSIGNAL raises the
/// guest's SIGPIPE too.
fn sent(pr: &mut LinuxProcess, r: i64, flags: u32) -> i32 {
    if r == -i64::from(EPIPE) && flags & MSG_NOSIGNAL == 0 {
        pr.raise_sigpipe();
    }
    r as i32
}

/// The last four bytes of `b` as a number, taken off.
fn take_u32(b: &mut Vec<u8>) -> u32 {
    let at = b.len().saturating_sub(4);
    let v = b.split_off(at);
    u32::from_le_bytes(v.try_into().unwrap_or([0; 4]))
}

/// A socket address from the guest (`len` bytes at `addr`; none at 0).
fn read_addr(pr: &LinuxProcess, cpu: &Vcpu, addr: u32, len: u32) -> Result<Vec<u8>, Errno> {
    if addr == 0 {
        return Ok(Vec::new());
    }
    if len > ADDR_MAX {
        return Err(EINVAL);
    }
    pr.mm.read(cpu, addr, len)
}

/// A socket address into the guest: at most `*len_at` bytes at `addr`,
/// and its whole length (`len`) at `len_at` (nothing when `addr` is 0).
fn write_addr(
    pr: &LinuxProcess,
    cpu: &mut Vcpu,
    addr: u32,
    len_at: u32,
    bytes: &[u8],
) -> Result<(), Errno> {
    if addr == 0 || len_at == 0 {
        return Ok(());
    }
    let room = pr.mm.read_u32(cpu, len_at)? as usize;
    pr.mm.write(cpu, addr, &bytes[..bytes.len().min(room)])?;
    pr.mm.write_u32(cpu, len_at, bytes.len() as u32)
}

/// Room for an address the host fills in.
fn addr_room() -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain bytes; all-zero is valid.
    let s: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    (
        s,
        std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t,
    )
}

fn storage_bytes(s: &libc::sockaddr_storage, len: libc::socklen_t) -> Vec<u8> {
    let len = (len as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: `s` is `size_of::<sockaddr_storage>()` bytes of plain data.
    unsafe { std::slice::from_raw_parts((s as *const libc::sockaddr_storage).cast::<u8>(), len) }
        .to_vec()
}

/// A new host socket (or accepted connection) into the guest's table.
fn install(pr: &mut LinuxProcess, h: i32, cloexec: bool) -> i32 {
    let g = pr.install(File::Host(h), 0);
    pr.set_cloexec(g, cloexec);
    g
}

fn socket_op(pr: &mut LinuxProcess, cpu: &mut Vcpu, call: u32, a: [u32; 6]) -> Result<i32, Errno> {
    match call {
        op::SOCKET => {
            // SAFETY: plain arguments; popek's descriptors are all
            // close-on-exec (the guest's flag is kept in its table).
            let h = check(unsafe {
                libc::socket(a[0] as i32, (a[1] | SOCK_CLOEXEC) as i32, a[2] as i32)
            } as _)?;
            Ok(install(pr, h, a[1] & SOCK_CLOEXEC != 0))
        }
        op::SOCKETPAIR => {
            let mut sv = [0i32; 2];
            // SAFETY: `sv` has room for two descriptors.
            check(unsafe {
                libc::socketpair(
                    a[0] as i32,
                    (a[1] | SOCK_CLOEXEC) as i32,
                    a[2] as i32,
                    sv.as_mut_ptr(),
                )
            } as _)?;
            let cloexec = a[1] & SOCK_CLOEXEC != 0;
            let g0 = install(pr, sv[0], cloexec);
            let g1 = install(pr, sv[1], cloexec);
            let mut b = g0.to_le_bytes().to_vec();
            b.extend(g1.to_le_bytes());
            pr.mm.write(cpu, a[3], &b)?;
            Ok(0)
        }
        op::BIND => {
            let h = pr.host_fd(a[0])?;
            let addr = read_addr(pr, cpu, a[1], a[2])?;
            // SAFETY: `addr` holds the guest's address.
            check(
                unsafe { libc::bind(h, addr.as_ptr().cast(), addr.len() as libc::socklen_t) } as _,
            )
        }
        op::CONNECT => {
            let h = pr.host_fd(a[0])?;
            let addr = read_addr(pr, cpu, a[1], a[2])?;
            pr.blocking(
                cpu,
                move || {
                    let len = addr.len() as libc::socklen_t;
                    // SAFETY: `addr` holds the guest's address.
                    let r = unsafe { libc::connect(h, addr.as_ptr().cast(), len) };
                    (result(r as isize), Vec::new())
                },
                |_, _, r, _| r as i32,
            )
        }
        op::LISTEN => {
            let h = pr.host_fd(a[0])?;
            // SAFETY: plain arguments.
            check(unsafe { libc::listen(h, a[1] as i32) } as _)
        }
        op::ACCEPT | op::ACCEPT4 => {
            let h = pr.host_fd(a[0])?;
            let flags = if call == op::ACCEPT4 { a[3] } else { 0 };
            let (addr_at, len_at) = (a[1], a[2]);
            pr.blocking(
                cpu,
                move || {
                    let (mut s, mut len) = addr_room();
                    // SAFETY: `s` has room for `len` bytes.
                    let c = unsafe {
                        libc::accept4(
                            h,
                            (&mut s as *mut libc::sockaddr_storage).cast(),
                            &mut len,
                            (flags | SOCK_CLOEXEC) as i32,
                        )
                    };
                    let r = result(c as isize);
                    (
                        r,
                        if r >= 0 {
                            storage_bytes(&s, len)
                        } else {
                            Vec::new()
                        },
                    )
                },
                move |pr, cpu, r, addr| {
                    if r < 0 {
                        return r as i32;
                    }
                    let g = install(pr, r as i32, flags & SOCK_CLOEXEC != 0);
                    match write_addr(pr, cpu, addr_at, len_at, &addr) {
                        Ok(()) => g,
                        Err(e) => -e,
                    }
                },
            )
        }
        op::GETSOCKNAME | op::GETPEERNAME => {
            let h = pr.host_fd(a[0])?;
            let (mut s, mut len) = addr_room();
            let p = (&mut s as *mut libc::sockaddr_storage).cast();
            // SAFETY: `s` has room for `len` bytes.
            check(unsafe {
                if call == op::GETSOCKNAME {
                    libc::getsockname(h, p, &mut len)
                } else {
                    libc::getpeername(h, p, &mut len)
                }
            } as _)?;
            if a[2] == 0 {
                return Err(EFAULT);
            }
            write_addr(pr, cpu, a[1], a[2], &storage_bytes(&s, len))?;
            Ok(0)
        }
        op::SEND | op::SENDTO => {
            let h = pr.host_fd(a[0])?;
            let data = pr.mm.read(cpu, a[1], a[2].min(1 << 24))?;
            let addr = if call == op::SENDTO {
                read_addr(pr, cpu, a[4], a[5])?
            } else {
                Vec::new()
            };
            let flags = a[3];
            pr.blocking(
                cpu,
                move || {
                    let (p, len) = if addr.is_empty() {
                        (std::ptr::null(), 0)
                    } else {
                        (addr.as_ptr().cast(), addr.len() as libc::socklen_t)
                    };
                    // SAFETY: `data` and `addr` are buffers of the lengths
                    // given.
                    let r = unsafe {
                        libc::sendto(
                            h,
                            data.as_ptr().cast(),
                            data.len(),
                            (flags | MSG_NOSIGNAL) as i32,
                            p,
                            len,
                        )
                    };
                    (result(r), Vec::new())
                },
                move |pr, _, r, _| sent(pr, r, flags),
            )
        }
        op::RECV | op::RECVFROM => {
            let h = pr.host_fd(a[0])?;
            let cap = a[2].min(1 << 24) as usize;
            let (buf_at, flags) = (a[1], a[3]);
            let (from_at, from_len_at) = if call == op::RECVFROM {
                (a[4], a[5])
            } else {
                (0, 0)
            };
            pr.blocking(
                cpu,
                move || {
                    let mut buf = vec![0u8; cap];
                    let (mut s, mut len) = addr_room();
                    let from = from_at != 0;
                    // SAFETY: `buf` and `s` are buffers of the lengths given.
                    let n = unsafe {
                        libc::recvfrom(
                            h,
                            buf.as_mut_ptr().cast(),
                            cap,
                            flags as i32,
                            if from {
                                (&mut s as *mut libc::sockaddr_storage).cast()
                            } else {
                                std::ptr::null_mut()
                            },
                            if from { &mut len } else { std::ptr::null_mut() },
                        )
                    };
                    let r = result(n);
                    if r < 0 {
                        return (r, Vec::new());
                    }
                    // (MSG_TRUNC may say more than the buffer held.) The
                    // sender's address follows the data, then the data's
                    // length.
                    buf.truncate((r as usize).min(cap));
                    let addr = if from {
                        storage_bytes(&s, len)
                    } else {
                        Vec::new()
                    };
                    let k = buf.len() as u32;
                    buf.extend(&addr);
                    buf.extend(k.to_le_bytes());
                    (r, buf)
                },
                move |pr, cpu, r, mut b| {
                    if r < 0 {
                        return r as i32;
                    }
                    let k = take_u32(&mut b) as usize;
                    let addr = b.split_off(k);
                    let done = pr.mm.write(cpu, buf_at, &b).and_then(|()| {
                        if from_at != 0 {
                            write_addr(pr, cpu, from_at, from_len_at, &addr)
                        } else {
                            Ok(())
                        }
                    });
                    match done {
                        Ok(()) => r as i32,
                        Err(e) => -e,
                    }
                },
            )
        }
        op::SHUTDOWN => {
            let h = pr.host_fd(a[0])?;
            // SAFETY: plain arguments.
            check(unsafe { libc::shutdown(h, a[1] as i32) } as _)
        }
        op::SETSOCKOPT => {
            let h = pr.host_fd(a[0])?;
            let (level, name) = (a[1] as i32, a[2] as i32);
            let mut val = pr.mm.read(cpu, a[3], a[4].min(4096))?;
            if is_timeval(level, name) {
                val = timeval_to_host(&val)?;
            }
            // SAFETY: `val` holds the option's bytes.
            check(unsafe {
                libc::setsockopt(
                    h,
                    level,
                    name,
                    val.as_ptr().cast(),
                    val.len() as libc::socklen_t,
                )
            } as _)
        }
        op::GETSOCKOPT => {
            let h = pr.host_fd(a[0])?;
            let (level, name) = (a[1] as i32, a[2] as i32);
            let room = pr.mm.read_u32(cpu, a[4])?;
            let mut val = vec![0u8; 4096];
            let mut len = if is_timeval(level, name) {
                16
            } else {
                room.min(4096)
            } as libc::socklen_t;
            let p = val.as_mut_ptr().cast();
            // SAFETY: `val` has room for `len` bytes.
            let r = unsafe { libc::getsockopt(h, level, name, p, &mut len) };
            check(r as _)?;
            let mut out = val[..len as usize].to_vec();
            if is_timeval(level, name) {
                out = timeval_to_guest(&out);
            }
            let n = out.len().min(room as usize);
            pr.mm.write(cpu, a[3], &out[..n])?;
            pr.mm.write_u32(cpu, a[4], n as u32)?;
            Ok(0)
        }
        op::SENDMSG => {
            let (run, finish) = sendmsg(pr, cpu, a[0], a[1], a[2])?;
            pr.blocking(cpu, run, finish)
        }
        op::RECVMSG => {
            let (run, finish) = recvmsg(pr, cpu, a[0], a[1], a[2])?;
            pr.blocking(cpu, run, finish)
        }
        op::SENDMMSG => {
            // struct mmsghdr: a msghdr, then the bytes sent (msg_len).
            // (Each message at once, under the process lock.)
            let mut done = 0;
            for i in 0..a[2].min(1024) {
                let at = a[1] + i * (MSGHDR + 4);
                let (run, finish) = sendmsg(pr, cpu, a[0], at, a[3])?;
                let (r, d) = run();
                match finish(pr, cpu, r, d) {
                    n @ 0.. => pr.mm.write_u32(cpu, at + MSGHDR, n as u32)?,
                    e if done == 0 => return Err(-e),
                    _ => break,
                }
                done += 1;
            }
            Ok(done)
        }
        op::RECVMMSG => {
            // (The timeout, a[4], is left to the host's socket timeouts.)
            let mut done = 0;
            let mut flags = a[3];
            for i in 0..a[2].min(1024) {
                let at = a[1] + i * (MSGHDR + 4);
                let (run, finish) = recvmsg(pr, cpu, a[0], at, flags & !MSG_WAITFORONE)?;
                let (r, d) = run();
                match finish(pr, cpu, r, d) {
                    n @ 0.. => pr.mm.write_u32(cpu, at + MSGHDR, n as u32)?,
                    e if done == 0 => return Err(-e),
                    _ => break,
                }
                done += 1;
                if a[3] & MSG_WAITFORONE != 0 {
                    flags |= libc::MSG_DONTWAIT as u32;
                }
            }
            Ok(done)
        }
        _ => Err(EINVAL),
    }
}

/// SO_RCVTIMEO and SO_SNDTIMEO (the old ones: a `timeval` of two longs).
fn is_timeval(level: i32, name: i32) -> bool {
    level == libc::SOL_SOCKET && (name == 20 || name == 21)
}

fn timeval_to_host(v: &[u8]) -> Result<Vec<u8>, Errno> {
    if v.len() < 8 {
        return Err(EINVAL);
    }
    let s = i32::from_le_bytes([v[0], v[1], v[2], v[3]]);
    let us = i32::from_le_bytes([v[4], v[5], v[6], v[7]]);
    let mut out = i64::from(s).to_le_bytes().to_vec();
    out.extend(i64::from(us).to_le_bytes());
    Ok(out)
}

fn timeval_to_guest(v: &[u8]) -> Vec<u8> {
    let q = |i: usize| {
        v.get(8 * i..8 * i + 8)
            .map_or(0, |b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let mut out = (q(0) as i32).to_le_bytes().to_vec();
    out.extend((q(1) as i32).to_le_bytes());
    out
}

/// The i386 msghdr at `at`: (name, namelen, iov, iovlen, control,
/// controllen, flags).
fn read_msghdr(pr: &LinuxProcess, cpu: &Vcpu, at: u32) -> Result<[u32; 7], Errno> {
    let b = pr.mm.read(cpu, at, MSGHDR)?;
    let mut h = [0u32; 7];
    for (i, w) in b.chunks(4).enumerate() {
        h[i] = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
    }
    Ok(h)
}

const CMSG_GUEST_HDR: usize = 12;
const CMSG_HOST_HDR: usize = std::mem::size_of::<libc::cmsghdr>();

fn align(n: usize, to: usize) -> usize {
    n.next_multiple_of(to)
}

/// The guest's control messages made the host's (SCM_RIGHTS: guest
/// descriptors made host ones).
fn cmsgs_to_host(pr: &LinuxProcess, guest: &[u8]) -> Result<Vec<u8>, Errno> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + CMSG_GUEST_HDR <= guest.len() {
        let w =
            |i: usize| u32::from_le_bytes(guest[at + 4 * i..at + 4 * i + 4].try_into().expect("4"));
        let (len, level, kind) = (w(0) as usize, w(1) as i32, w(2) as i32);
        if len < CMSG_GUEST_HDR || at + len > guest.len() {
            return Err(EINVAL);
        }
        let mut data = guest[at + CMSG_GUEST_HDR..at + len].to_vec();
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            let mut host = Vec::new();
            for fd in data.chunks_exact(4) {
                let g = u32::from_le_bytes(fd.try_into().expect("4 bytes"));
                host.extend(pr.host_fd(g)?.to_ne_bytes());
            }
            data = host;
        }
        let start = out.len();
        out.extend((CMSG_HOST_HDR + data.len()).to_ne_bytes());
        out.extend(level.to_ne_bytes());
        out.extend(kind.to_ne_bytes());
        debug_assert_eq!(out.len() - start, CMSG_HOST_HDR);
        out.extend(&data);
        out.resize(align(out.len(), 8), 0);
        at += align(len, 4);
    }
    Ok(out)
}

/// The host's control messages made the guest's (SCM_RIGHTS: the host
/// descriptors received installed in the guest's table), at most `room`
/// bytes; and whether some did not fit (MSG_CTRUNC).
fn cmsgs_to_guest(
    pr: &mut LinuxProcess,
    host: &[u8],
    room: usize,
    cloexec: bool,
) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut truncated = false;
    let mut at = 0;
    while at + CMSG_HOST_HDR <= host.len() {
        let len = usize::from_ne_bytes(host[at..at + 8].try_into().expect("8 bytes"));
        let level = i32::from_ne_bytes(host[at + 8..at + 12].try_into().expect("4 bytes"));
        let kind = i32::from_ne_bytes(host[at + 12..at + 16].try_into().expect("4 bytes"));
        if len < CMSG_HOST_HDR || at + len > host.len() {
            break;
        }
        let mut data = host[at + CMSG_HOST_HDR..at + len].to_vec();
        let rights = level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS;
        let fits = out.len() + CMSG_GUEST_HDR + data.len() <= room;
        if rights {
            let mut guest = Vec::new();
            for fd in data.chunks_exact(4) {
                let h = i32::from_ne_bytes(fd.try_into().expect("4 bytes"));
                if fits {
                    guest.extend(install(pr, h, cloexec).to_le_bytes());
                } else {
                    // SAFETY: a descriptor the host just gave popek.
                    unsafe { libc::close(h) };
                }
            }
            data = guest;
        }
        if !fits {
            truncated = true;
        } else {
            out.extend(((CMSG_GUEST_HDR + data.len()) as u32).to_le_bytes());
            out.extend(level.to_le_bytes());
            out.extend(kind.to_le_bytes());
            out.extend(&data);
            out.resize(align(out.len(), 4).min(room), 0);
        }
        at += align(len, 8);
    }
    (out, truncated)
}

/// Host iovecs over `bufs`.
fn host_iovecs(bufs: &mut [Vec<u8>]) -> Vec<libc::iovec> {
    bufs.iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect()
}

/// A blocking call's host part and its guest part
/// (`LinuxProcess::blocking`).
type Run = Box<dyn FnOnce() -> (i64, Vec<u8>) + Send>;
type Finish = super::threads::Finish;

/// sendmsg: the guest's message read now (control messages made the
/// host's), sent by the host part.
fn sendmsg(
    pr: &mut LinuxProcess,
    cpu: &mut Vcpu,
    fd: u32,
    at: u32,
    flags: u32,
) -> Result<(Run, Finish), Errno> {
    let h = pr.host_fd(fd)?;
    let [name, namelen, iov, iovlen, control, controllen, _] = read_msghdr(pr, cpu, at)?;
    let addr = read_addr(pr, cpu, name, namelen)?;
    let mut bufs = Vec::new();
    for (base, len) in pr.iovecs(cpu, iov, iovlen)? {
        bufs.push(pr.mm.read(cpu, base, len)?);
    }
    let guest_control = if control == 0 {
        Vec::new()
    } else {
        pr.mm.read(cpu, control, controllen.min(1 << 16))?
    };
    let mut host_control = cmsgs_to_host(pr, &guest_control)?;
    let run: Run = Box::new(move || {
        let mut iovs = host_iovecs(&mut bufs);
        // SAFETY: all-zero is a valid empty msghdr.
        let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
        if !addr.is_empty() {
            m.msg_name = addr.as_ptr() as *mut libc::c_void;
            m.msg_namelen = addr.len() as libc::socklen_t;
        }
        m.msg_iov = iovs.as_mut_ptr();
        m.msg_iovlen = iovs.len();
        if !host_control.is_empty() {
            m.msg_control = host_control.as_mut_ptr().cast();
            m.msg_controllen = host_control.len();
        }
        // SAFETY: every pointer in `m` points into a buffer above of the
        // length given.
        let r = unsafe { libc::sendmsg(h, &m, (flags | MSG_NOSIGNAL) as i32) };
        (result(r), Vec::new())
    });
    Ok((run, Box::new(move |pr, _, r, _| sent(pr, r, flags))))
}

/// recvmsg: the guest's message header read now; the host part receives
/// into buffers of its own and hands back the data, the sender's address,
/// the control messages, their lengths and the flags; the guest part
/// writes them (descriptors received installed in the guest's table).
fn recvmsg(
    pr: &mut LinuxProcess,
    cpu: &mut Vcpu,
    fd: u32,
    at: u32,
    flags: u32,
) -> Result<(Run, Finish), Errno> {
    let h = pr.host_fd(fd)?;
    let [name, _, iov, iovlen, control, controllen, _] = read_msghdr(pr, cpu, at)?;
    let vecs = pr.iovecs(cpu, iov, iovlen)?;
    let sizes: Vec<usize> = vecs.iter().map(|&(_, l)| l.min(1 << 24) as usize).collect();
    let want_control = control != 0 && controllen > 0;
    let run: Run = Box::new(move || {
        let mut bufs: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n]).collect();
        let mut iovs = host_iovecs(&mut bufs);
        let (mut s, len) = addr_room();
        // Room for the host's form of as many control bytes as the guest
        // has (each header 4 bytes longer, each message padded to 8).
        let mut host_control = vec![0u8; 2 * controllen.min(1 << 16) as usize + 64];
        // SAFETY: all-zero is a valid empty msghdr.
        let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
        if name != 0 {
            m.msg_name = (&mut s as *mut libc::sockaddr_storage).cast();
            m.msg_namelen = len;
        }
        m.msg_iov = iovs.as_mut_ptr();
        m.msg_iovlen = iovs.len();
        if want_control {
            m.msg_control = host_control.as_mut_ptr().cast();
            m.msg_controllen = host_control.len();
        }
        // SAFETY: every pointer in `m` points into a buffer above of the
        // length given; the host's descriptors come back close-on-exec.
        let n = unsafe { libc::recvmsg(h, &mut m, (flags | MSG_CMSG_CLOEXEC) as i32) };
        let r = result(n);
        if r < 0 {
            return (r, Vec::new());
        }
        // The data, the address, the control messages, then the three
        // lengths and the flags.
        let mut out = Vec::new();
        let mut left = r as usize;
        for b in &bufs {
            let k = left.min(b.len());
            out.extend(&b[..k]);
            left -= k;
        }
        let data_len = out.len() as u32;
        let addr = if name != 0 {
            storage_bytes(&s, m.msg_namelen)
        } else {
            Vec::new()
        };
        out.extend(&addr);
        let got = if want_control {
            &host_control[..m.msg_controllen.min(host_control.len())]
        } else {
            &[][..]
        };
        out.extend(got);
        for v in [
            data_len,
            addr.len() as u32,
            got.len() as u32,
            m.msg_flags as u32,
        ] {
            out.extend(v.to_le_bytes());
        }
        (r, out)
    });
    let finish: Finish = Box::new(move |pr, cpu, r, mut b| {
        if r < 0 {
            return r as i32;
        }
        let msg_flags = take_u32(&mut b);
        let _control_len = take_u32(&mut b);
        let addr_len = take_u32(&mut b) as usize;
        let data_len = take_u32(&mut b) as usize;
        let host_control = b.split_off(data_len + addr_len);
        let addr = b.split_off(data_len);
        let mut put = || -> Result<(), Errno> {
            let mut done = 0usize;
            for &(base, len) in &vecs {
                let k = (data_len - done).min(len as usize);
                if k == 0 {
                    break;
                }
                pr.mm.write(cpu, base, &b[done..done + k])?;
                done += k;
            }
            // (The host echoes MSG_CMSG_CLOEXEC, which popek always asks
            // for.)
            let mut msg_flags = msg_flags & !MSG_CMSG_CLOEXEC | flags & MSG_CMSG_CLOEXEC;
            let mut guest_controllen = 0;
            if want_control {
                let (out, truncated) = cmsgs_to_guest(
                    pr,
                    &host_control,
                    controllen as usize,
                    flags & MSG_CMSG_CLOEXEC != 0,
                );
                if truncated {
                    msg_flags |= libc::MSG_CTRUNC as u32;
                }
                pr.mm.write(cpu, control, &out)?;
                guest_controllen = out.len() as u32;
            }
            if name != 0 {
                write_addr(pr, cpu, name, at + 4, &addr)?;
            }
            pr.mm.write_u32(cpu, at + 20, guest_controllen)?;
            pr.mm.write_u32(cpu, at + 24, msg_flags)
        };
        match put() {
            Ok(()) => r as i32,
            Err(e) => -e,
        }
    });
    Ok((run, finish))
}
