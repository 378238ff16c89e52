//! Threads: clone with CLONE_VM|CLONE_THREAD, futexes, per-thread TLS.
//!
//! Each guest thread runs on a host thread of its own with its own vCPU
//! (its own `Machine`), and the threads of a process take turns: a
//! process lock (a ticket queue, [`Group`]) is held by the thread running
//! guest code, like a global interpreter lock. The holder has the
//! process's guest RAM, its engine (one translation cache for all
//! threads, so code one thread writes is seen stale by every other: the
//! write watch is the process's) and its kernel state swapped into its
//! `Machine`; it hands them back when its slice ends (a few
//! milliseconds), when it blocks (a futex wait, a sleep, a read, wait4)
//! or when it exits. Its own state (registers, segment caches, the
//! signal mask, pending signals, the TLS descriptors of GDT entries 12-14,
//! which it writes into the GDT when it takes its turn) stays with it.
//! There is no parallel speed-up: one guest thread runs at a time.
//!
//! futexes are popek's own: waiters by linear address (the threads share
//! one address space), queued under the process lock before the waiter
//! lets go of it, so no wake is lost; WAIT, WAKE, their BITSET forms,
//! REQUEUE, CMP_REQUEUE and WAKE_OP, as glibc uses them.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use popek_memory::GuestRam;
use popek_vcpu::{reg, SegReg, Vcpu};

use super::errno::*;
use super::process::LinuxProcess;
use super::syscalls::Call;
use super::{layout, TLS_ENTRIES, TLS_FIRST};
use crate::{EngineState, Exit, Machine, Platform};

/// How long a thread runs before it lets the others have a turn.
const SLICE: Duration = Duration::from_millis(4);

/// Guest thread ids: above any host pid (pid_max is at most 2^22) and
/// within FUTEX_TID_MASK.
pub(super) const TID_BASE: u32 = 1 << 28;

/// A process's threads: the lock they take turns with, and what the
/// holder has while the others wait.
pub struct Group {
    inner: Mutex<Inner>,
    cv: Condvar,
}

struct Inner {
    next_ticket: u64,
    serving: u64,
    ram: Option<GuestRam>,
    engine: Option<EngineState>,
    process: Option<Box<LinuxProcess>>,
    waiters: Vec<Waiter>,
    next_waiter: u64,
    /// exit_group's status: every thread stops.
    exit: Option<i32>,
    /// Threads that have not exited.
    live: usize,
    /// The status of the last thread to exit by itself.
    last_status: i32,
    next_tid: u32,
    /// Signals sent to a thread (tgkill) while it waits for its turn.
    thread_pending: HashMap<u32, u64>,
}

struct Waiter {
    id: u64,
    addr: u32,
    bitset: u32,
    woken: bool,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Group")
    }
}

impl Group {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wake up to `n` waiters on `addr` whose bitset meets `bitset`.
    fn wake(g: &mut Inner, addr: u32, n: u32, bitset: u32) -> u32 {
        let mut k = 0;
        for w in g.waiters.iter_mut() {
            if k == n {
                break;
            }
            if !w.woken && w.addr == addr && w.bitset & bitset != 0 {
                w.woken = true;
                k += 1;
            }
        }
        k
    }
}

/// A thread's own kernel state, set aside while it does not run.
#[derive(Debug, Default)]
pub struct ThreadState {
    /// Its thread id.
    pub tid: u32,
    blocked: u64,
    pending: u64,
    suspend_mask: Option<u64>,
    siginfo: HashMap<i32, [u32; 8]>,
    trap: (u32, u32),
    altstack: Option<(u32, u32)>,
    clear_tid: u32,
    /// Its descriptors for GDT entries 12-14.
    tls: [u64; 3],
    /// CLONE_SETTLS's user_desc, applied when it first runs.
    settls: Option<[u8; 16]>,
}

impl LinuxProcess {
    /// Swap the running thread's own state with `t`'s.
    fn swap_thread(&mut self, t: &mut ThreadState) {
        std::mem::swap(&mut self.tid, &mut t.tid);
        std::mem::swap(&mut self.blocked, &mut t.blocked);
        std::mem::swap(&mut self.pending, &mut t.pending);
        std::mem::swap(&mut self.suspend_mask, &mut t.suspend_mask);
        std::mem::swap(&mut self.siginfo, &mut t.siginfo);
        std::mem::swap(&mut self.trap, &mut t.trap);
        std::mem::swap(&mut self.altstack, &mut t.altstack);
        std::mem::swap(&mut self.clear_tid, &mut t.clear_tid);
    }
}

/// A new thread, made by clone, for the run loop to start.
pub struct NewThread {
    /// Its CPU (on a placeholder RAM until it runs).
    pub cpu: Vcpu,
    /// Its state.
    pub state: ThreadState,
}

impl std::fmt::Debug for NewThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewThread")
            .field("tid", &self.state.tid)
            .finish()
    }
}

/// A machine's part in its process's thread group.
pub struct ThreadCtx {
    group: Arc<Group>,
    spare: Option<GuestRam>,
    state: ThreadState,
    held: bool,
    since: Instant,
    main: bool,
}

/// A blocking host call's result put into the guest (under the lock).
pub type Finish = Box<dyn FnOnce(&mut LinuxProcess, &mut Vcpu, i64, Vec<u8>) -> i32 + Send>;

/// What a blocking call waits for outside the process lock.
pub enum Block {
    /// A futex wait: the waiter's id, and until when.
    Futex(u64, Option<Instant>),
    /// A sleep.
    Sleep(Duration),
    /// A host call (`run`), its result then handed to `finish` under the
    /// lock.
    Host {
        /// The call (no guest memory: what it needs is copied in).
        run: Box<dyn FnOnce() -> (i64, Vec<u8>) + Send>,
        /// Its result into the guest.
        finish: Finish,
    },
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Block")
    }
}

/// The descriptors in GDT entries 12-14 (the running thread's TLS).
fn tls_entries(cpu: &mut Vcpu) -> [u64; 3] {
    let mut t = [0; 3];
    for (i, d) in t.iter_mut().enumerate() {
        *d = cpu
            .read_sys(layout::GDT + 8 * (TLS_FIRST + i as u32), 8)
            .unwrap_or(0);
    }
    t
}

/// A placeholder RAM for a thread that does not hold the process lock.
fn spare_ram() -> GuestRam {
    GuestRam::new(4096).expect("a one-page memfd")
}

/// clone with CLONE_THREAD: a new thread of this process, running from
/// the same point with EAX 0 on `stack`; its id.
pub(super) fn clone_thread(
    pr: &mut LinuxProcess,
    cpu: &mut Vcpu,
    stack: u32,
    tls: Option<u32>,
    clear_tid: Option<u32>,
) -> Result<u32, Errno> {
    let group = pr
        .group
        .get_or_insert_with(|| {
            Arc::new(Group {
                inner: Mutex::new(Inner {
                    // The creator holds ticket 0.
                    next_ticket: 1,
                    serving: 0,
                    ram: None,
                    engine: None,
                    process: None,
                    waiters: Vec::new(),
                    next_waiter: 0,
                    exit: None,
                    live: 1,
                    last_status: 0,
                    next_tid: TID_BASE,
                    thread_pending: HashMap::new(),
                }),
                cv: Condvar::new(),
            })
        })
        .clone();
    let tid = {
        let mut g = group.lock();
        g.next_tid += 1;
        g.live += 1;
        g.next_tid + std::process::id() % 4096
    };
    let mut child = cpu.thread_copy(spare_ram());
    child.regs[reg::EAX] = 0;
    if stack != 0 {
        child.regs[reg::ESP] = stack;
    }
    let mut state = ThreadState {
        tid,
        blocked: pr.blocked,
        clear_tid: clear_tid.unwrap_or(0),
        ..ThreadState::default()
    };
    state.tls = tls_entries(cpu);
    if let Some(addr) = tls {
        let b = pr.mm.read(cpu, addr, 16)?;
        let mut d = [0u8; 16];
        d.copy_from_slice(&b);
        state.settls = Some(d);
    }
    pr.new_threads.push(NewThread { cpu: child, state });
    Ok(tid)
}

/// The host address of guest word `lin` if it lies in a page of a shared
/// mapping (linked to a file page: see `GuestRam::link_page`).
fn shared_word(pr: &LinuxProcess, cpu: &mut Vcpu, lin: u32) -> Option<usize> {
    let frame = pr.mm.frame(cpu, lin & !0xFFF)?;
    if !cpu.ram.is_linked(frame >> 12) || lin & 3 != 0 {
        return None;
    }
    Some(cpu.ram.as_mut_slice().as_mut_ptr() as usize + (frame | (lin & 0xFFF)) as usize)
}

/// A futex operation on words of shared mappings: the host's (waits
/// outside the process lock in a threaded process). The priority-
/// inheritance operations, whose words hold thread ids the host does not
/// know, are refused.
fn host_futex(
    pr: &mut LinuxProcess,
    cpu: &mut Vcpu,
    n: u32,
    a: [u32; 6],
    host: usize,
) -> Result<i32, Errno> {
    let [_, op, val, timeout, uaddr2, val3] = a;
    let cmd = op & 0x7F;
    let (ts, host2) = match cmd {
        // WAIT, WAIT_BITSET: a timespec (relative, or absolute for
        // WAIT_BITSET), 32-bit or 64-bit (futex_time64).
        0 | 9 => {
            let ts = if timeout == 0 {
                None
            } else {
                let (tv_sec, tv_nsec) = pr.read_timespec(cpu, timeout, n == 422)?;
                Some(libc::timespec { tv_sec, tv_nsec })
            };
            (ts, 0)
        }
        // WAKE, WAKE_BITSET.
        1 | 10 => (None, 0),
        // REQUEUE, CMP_REQUEUE, WAKE_OP: a second word, in shared memory
        // too.
        3..=5 => (None, shared_word(pr, cpu, uaddr2).ok_or(EINVAL)?),
        _ => return Err(ENOSYS),
    };
    let run = move || {
        let tp = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // (REQUEUE's and WAKE_OP's fourth argument is a count, not a
        // pointer.)
        let fourth = if matches!(cmd, 3..=5) {
            timeout as usize
        } else {
            tp as usize
        };
        // SAFETY: `host` (and `host2`) are words of popek's view of guest
        // RAM, mapped while the process lives; `tp` is a timespec or null.
        let r =
            unsafe { libc::syscall(libc::SYS_futex, host, op as i32, val, fourth, host2, val3) };
        let r = if r < 0 {
            -i64::from(super::process::host_errno())
        } else {
            r
        };
        (r, Vec::new())
    };
    if matches!(cmd, 0 | 9) {
        pr.blocking(cpu, run, |_, _, r, _| r as i32)
    } else {
        let (r, _) = run();
        if r < 0 {
            Err(-r as Errno)
        } else {
            Ok(r as i32)
        }
    }
}

/// tkill/tgkill to a thread of this process: true if `tid` is one (the
/// signal is then pending for it).
pub(super) fn signal_thread(pr: &mut LinuxProcess, tid: u32, sig: i32) -> bool {
    if tid == pr.tid {
        if sig != 0 {
            pr.pending |= 1 << sig;
        }
        return true;
    }
    let Some(group) = &pr.group else {
        return false;
    };
    if tid < TID_BASE && tid != std::process::id() {
        return false;
    }
    if sig != 0 {
        *group.lock().thread_pending.entry(tid).or_default() |= 1 << sig;
        group.cv.notify_all();
    }
    true
}

/// sched_yield (158): another thread's turn, if there are threads.
pub(super) fn sys_sched_yield(pr: &mut LinuxProcess, _c: Call<'_>) -> Result<i32, Errno> {
    if pr.group.is_some() {
        pr.block = Some(Block::Sleep(Duration::ZERO));
    }
    Ok(0)
}

/// futex (240), futex_time64 (422).
pub(super) fn sys_futex(pr: &mut LinuxProcess, c: Call<'_>) -> Result<i32, Errno> {
    let Call { cpu, n, a, .. } = c;
    let [uaddr, op, val, timeout, uaddr2, val3] = a;
    let cmd = op & 0x7F;
    // A futex in a shared mapping may have waiters in other processes:
    // the host's futex on popek's own view of the page (the kernel keys it
    // by the file page, as it does the guest's under Linux).
    if let Some(host) = shared_word(pr, cpu, uaddr) {
        return host_futex(pr, cpu, n, a, host);
    }
    let realtime = op & 256 != 0;
    let read = |pr: &LinuxProcess, cpu: &Vcpu, at: u32| pr.mm.read_u32(cpu, at);
    // A wait needs another thread to wake it: without one, only a
    // timeout (or a signal) ends it.
    match cmd {
        0 | 9 => {
            if read(pr, cpu, uaddr)? != val {
                return Err(EAGAIN);
            }
            let bitset = if cmd == 9 { val3 } else { u32::MAX };
            if bitset == 0 {
                return Err(EINVAL);
            }
            let deadline = if timeout == 0 {
                None
            } else {
                let (s, ns) = pr.read_timespec(cpu, timeout, n == 422)?;
                let mut d =
                    Duration::from_secs(s.max(0) as u64) + Duration::from_nanos(ns.max(0) as u64);
                if cmd == 9 {
                    // WAIT_BITSET's timeout is absolute.
                    let (cs, cns) = super::process::now(if realtime { 0 } else { 1 });
                    let now = Duration::from_secs(cs.max(0) as u64)
                        + Duration::from_nanos(cns.max(0) as u64);
                    d = d.saturating_sub(now);
                }
                Some(Instant::now() + d)
            };
            let Some(group) = pr.group.clone() else {
                // The only thread: nobody can wake it but time.
                match deadline {
                    Some(t) => {
                        std::thread::sleep(t.saturating_duration_since(Instant::now()));
                        return Err(ETIMEDOUT);
                    }
                    // As natively: until a signal comes.
                    None => {
                        while !pr.signal_pending() {
                            // SAFETY: an empty mask: any handled signal ends it.
                            unsafe {
                                let mut set: libc::sigset_t = std::mem::zeroed();
                                libc::sigemptyset(&mut set);
                                libc::sigsuspend(&set);
                            }
                        }
                        return Err(EINTR);
                    }
                }
            };
            let mut g = group.lock();
            g.next_waiter += 1;
            let id = g.next_waiter;
            g.waiters.push(Waiter {
                id,
                addr: uaddr,
                bitset,
                woken: false,
            });
            drop(g);
            pr.block = Some(Block::Futex(id, deadline));
            Ok(0)
        }
        1 | 10 => {
            let bitset = if cmd == 10 { val3 } else { u32::MAX };
            Ok(match &pr.group {
                Some(group) => {
                    let mut g = group.lock();
                    let k = Group::wake(&mut g, uaddr, val, bitset);
                    group.cv.notify_all();
                    k as i32
                }
                None => 0,
            })
        }
        3 | 4 => {
            if cmd == 4 && read(pr, cpu, uaddr)? != val3 {
                return Err(EAGAIN);
            }
            // val2 (the requeue limit) travels in the timeout argument.
            Ok(match &pr.group {
                Some(group) => {
                    let mut g = group.lock();
                    let k = Group::wake(&mut g, uaddr, val, u32::MAX);
                    let mut moved = 0;
                    for w in g.waiters.iter_mut() {
                        if moved == timeout {
                            break;
                        }
                        if !w.woken && w.addr == uaddr {
                            w.addr = uaddr2;
                            moved += 1;
                        }
                    }
                    group.cv.notify_all();
                    (k + moved) as i32
                }
                None => 0,
            })
        }
        5 => {
            // WAKE_OP: *uaddr2 = oldval OP oparg; wake on uaddr; wake on
            // uaddr2 too if oldval CMP cmparg.
            let (wop, cmp) = ((val3 >> 28) & 0xF, (val3 >> 24) & 0xF);
            let mut oparg = (val3 >> 12) & 0xFFF;
            let cmparg = val3 & 0xFFF;
            if wop & 8 != 0 {
                oparg = 1 << (oparg & 31);
            }
            let old = read(pr, cpu, uaddr2)?;
            let new = match wop & 7 {
                0 => oparg,
                1 => old.wrapping_add(oparg),
                2 => old | oparg,
                3 => old & !oparg,
                4 => old ^ oparg,
                _ => return Err(ENOSYS),
            };
            pr.mm.write_u32(cpu, uaddr2, new)?;
            let hit = match cmp {
                0 => old == cmparg,
                1 => old != cmparg,
                2 => (old as i32) < cmparg as i32,
                3 => (old as i32) <= cmparg as i32,
                4 => (old as i32) > cmparg as i32,
                5 => (old as i32) >= cmparg as i32,
                _ => return Err(ENOSYS),
            };
            Ok(match &pr.group {
                Some(group) => {
                    let mut g = group.lock();
                    let mut k = Group::wake(&mut g, uaddr, val, u32::MAX);
                    if hit {
                        k += Group::wake(&mut g, uaddr2, timeout, u32::MAX);
                    }
                    group.cv.notify_all();
                    k as i32
                }
                None => 0,
            })
        }
        _ => Err(ENOSYS),
    }
}

impl Machine {
    /// Start the threads clone made, and join the group if this is its
    /// first.
    pub(crate) fn start_threads(&mut self) {
        let Platform::Linux(p) = &mut self.platform else {
            return;
        };
        let Some(group) = p.group.clone() else {
            return;
        };
        let news = std::mem::take(&mut p.new_threads);
        if self.thread.is_none() {
            self.thread = Some(Box::new(ThreadCtx {
                group: group.clone(),
                spare: Some(spare_ram()),
                state: ThreadState::default(),
                held: true,
                since: Instant::now(),
                main: true,
            }));
            p.tid = std::process::id();
            // Threads come back to the run loop for their turns.
            if let EngineState::Bt(bt) = &mut self.engine {
                bt.set_pacing(popek_translate::Pacing::Counted);
            }
        }
        for t in news {
            let mut m = Machine::assemble(t.cpu, self.config.clone(), Platform::BareMetal);
            m.engine = EngineState::Interp;
            m.thread = Some(Box::new(ThreadCtx {
                group: group.clone(),
                spare: None,
                state: t.state,
                held: false,
                since: Instant::now(),
                main: false,
            }));
            std::thread::spawn(move || thread_main(m));
        }
    }

    /// Hand the process back to the group (the turn ends).
    pub(crate) fn gil_release(&mut self) {
        let Some(ctx) = self.thread.as_mut() else {
            return;
        };
        if !ctx.held {
            return;
        }
        ctx.state.tls = tls_entries(&mut self.cpu);
        if let Platform::Linux(p) = &mut self.platform {
            p.swap_thread(&mut ctx.state);
        }
        let group = ctx.group.clone();
        let mut g = group.lock();
        let spare = ctx.spare.take().unwrap_or_else(spare_ram);
        g.ram = Some(std::mem::replace(&mut self.cpu.ram, spare));
        g.engine = Some(std::mem::replace(&mut self.engine, EngineState::Interp));
        if let Platform::Linux(p) = std::mem::replace(&mut self.platform, Platform::BareMetal) {
            g.process = Some(p);
        }
        g.serving += 1;
        ctx.held = false;
        group.cv.notify_all();
    }

    /// Wait for this thread's turn and take the process; false if the
    /// process is ending (exit_group).
    pub(crate) fn gil_acquire(&mut self) -> bool {
        let Some(ctx) = self.thread.as_mut() else {
            return true;
        };
        if ctx.held {
            return true;
        }
        let group = ctx.group.clone();
        let mut g = group.lock();
        let t = g.next_ticket;
        g.next_ticket += 1;
        while g.serving != t {
            g = group.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        let (Some(ram), Some(engine), Some(process)) =
            (g.ram.take(), g.engine.take(), g.process.take())
        else {
            return false;
        };
        let exiting = g.exit.is_some();
        let sent = g.thread_pending.remove(&ctx.state.tid).unwrap_or(0);
        drop(g);
        ctx.state.pending |= sent;
        ctx.spare = Some(std::mem::replace(&mut self.cpu.ram, ram));
        self.engine = engine;
        self.platform = Platform::Linux(process);
        ctx.held = true;
        ctx.since = Instant::now();
        for i in 0..TLS_ENTRIES {
            let _ = self.cpu.write_sys(
                layout::GDT + 8 * (TLS_FIRST + i),
                8,
                ctx.state.tls[i as usize],
            );
        }
        let settls = ctx.state.settls.take();
        if let Platform::Linux(p) = &mut self.platform {
            p.swap_thread(&mut ctx.state);
            if let Some(d) = settls {
                let _ = p.tls_apply(&mut self.cpu, d);
            }
        }
        // The thread's segment caches are its own; a selector of a TLS
        // entry is reloaded from its descriptors.
        for s in [SegReg::Fs, SegReg::Gs] {
            let sel = self.cpu.segs[s as usize].selector;
            if (TLS_FIRST..TLS_FIRST + TLS_ENTRIES).contains(&u32::from(sel >> 3)) {
                let _ = self.cpu.load_seg(s, sel);
            }
        }
        !exiting
    }

    /// The end of the run for a thread that cannot go on: the process's
    /// status for the main thread, [`Exit::ThreadDone`] for another.
    fn group_end(&mut self) -> Exit {
        let Some(ctx) = self.thread.as_ref() else {
            return Exit::ThreadDone;
        };
        if !ctx.main {
            return Exit::ThreadDone;
        }
        let group = ctx.group.clone();
        let mut g = group.lock();
        while g.exit.is_none() && g.live > 0 {
            g = group.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        Exit::Exited(g.exit.unwrap_or(g.last_status))
    }

    /// Before a step: end the turn if the slice is over (and take the
    /// next one).
    pub(crate) fn thread_turn(&mut self) -> Option<Exit> {
        let ctx = self.thread.as_ref()?;
        if ctx.held && ctx.since.elapsed() < SLICE {
            return None;
        }
        self.gil_release();
        if self.gil_acquire() {
            None
        } else {
            Some(self.group_end())
        }
    }

    /// Carry out what a blocking call waits for, outside the process
    /// lock; EAX gets the call's result.
    pub(crate) fn run_blocked(&mut self, b: Block) -> Option<Exit> {
        let group = self.thread.as_ref().map(|c| c.group.clone())?;
        match b {
            Block::Futex(id, deadline) => {
                self.gil_release();
                let mut g = group.lock();
                let woken = loop {
                    let w = g.waiters.iter().position(|w| w.id == id);
                    let Some(i) = w else { break false };
                    if g.waiters[i].woken || g.exit.is_some() {
                        g.waiters.swap_remove(i);
                        break true;
                    }
                    match deadline {
                        Some(t) => {
                            let left = t.saturating_duration_since(Instant::now());
                            if left.is_zero() {
                                g.waiters.swap_remove(i);
                                break false;
                            }
                            g = group
                                .cv
                                .wait_timeout(g, left)
                                .map(|(g, _)| g)
                                .unwrap_or_else(|p| p.into_inner().0);
                        }
                        None => g = group.cv.wait(g).unwrap_or_else(|p| p.into_inner()),
                    }
                };
                drop(g);
                if !self.gil_acquire() {
                    return Some(self.group_end());
                }
                self.cpu.regs[reg::EAX] = if woken { 0 } else { (-ETIMEDOUT) as u32 };
            }
            Block::Sleep(d) => {
                self.gil_release();
                std::thread::sleep(d);
                if !self.gil_acquire() {
                    return Some(self.group_end());
                }
                self.cpu.regs[reg::EAX] = 0;
            }
            Block::Host { run, finish } => {
                self.gil_release();
                let (r, data) = run();
                if !self.gil_acquire() {
                    return Some(self.group_end());
                }
                if let Platform::Linux(p) = &mut self.platform {
                    self.cpu.regs[reg::EAX] = finish(p, &mut self.cpu, r, data) as u32;
                }
            }
        }
        None
    }

    /// This thread called exit: clear its tid for pthread_join (and wake
    /// the joiner), leave the group; the last one out ends the process.
    pub(crate) fn thread_exit(&mut self, status: i32) -> Exit {
        let Some(group) = self.thread.as_ref().map(|c| c.group.clone()) else {
            return Exit::Exited(status);
        };
        if let Platform::Linux(p) = &mut self.platform {
            let at = p.clear_tid;
            if at != 0 && p.mm.write_u32(&mut self.cpu, at, 0).is_ok() {
                let mut g = group.lock();
                Group::wake(&mut g, at, u32::MAX, u32::MAX);
            }
        }
        {
            let mut g = group.lock();
            g.live -= 1;
            g.last_status = status;
        }
        self.gil_release();
        group.cv.notify_all();
        if self.thread.as_ref().is_some_and(|c| c.main) {
            self.group_end()
        } else {
            Exit::ThreadDone
        }
    }

    /// exit_group in a threaded process: every thread stops.
    pub(crate) fn group_exit(&mut self, status: i32) -> Exit {
        if let Some(ctx) = self.thread.as_ref() {
            let group = ctx.group.clone();
            group.lock().exit = Some(status);
            group.cv.notify_all();
            if !ctx.main {
                self.gil_release();
                return Exit::ThreadDone;
            }
        }
        Exit::Exited(status)
    }
}

/// A thread's host thread: its turns until it exits or the process ends.
fn thread_main(mut m: Machine) {
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    if !m.gil_acquire() {
        return;
    }
    loop {
        match m.step(u64::MAX, &mut out, &mut err) {
            None => {}
            Some(Exit::ThreadDone) => return,
            Some(Exit::Signal(f)) => {
                let _ = std::io::Write::flush(&mut out);
                let msg = Exit::Signal(f.clone()).message().unwrap_or_default();
                let _ = std::io::Write::write_all(&mut err, format!("popek: {msg}\n").as_bytes());
                super::die_of(f.signo);
                std::process::exit(128 + f.signo);
            }
            Some(Exit::Killed(s)) => {
                let _ = std::io::Write::flush(&mut out);
                super::die_of(s);
                std::process::exit(128 + s);
            }
            Some(Exit::Exited(s)) => {
                let _ = std::io::Write::flush(&mut out);
                std::process::exit(s);
            }
            Some(other) => {
                if let Some(msg) = other.message() {
                    let _ =
                        std::io::Write::write_all(&mut err, format!("popek: {msg}\n").as_bytes());
                }
                std::process::exit(other.status());
            }
        }
    }
}
