//! The Linux i386 user-mode platform: popek acts as the guest's kernel. A
//! static i386 ELF runs at CPL 3 with the segment selectors an x86-64 Linux
//! kernel gives 32-bit processes (CS 0x23, DS/ES/SS 0x2B), and `int 0x80`
//! is serviced by popek ([`syscalls`]).
//!
//! The kernel side is real x86: popek builds a GDT, a TSS and an IDT in two
//! supervisor-only pages at the top of the address space, with Linux's gate
//! privileges (INT3, INTO and INT 0x80 are DPL 3; every other vector is
//! DPL 0, so `int $0x40` at CPL 3 raises #GP as on Linux). Every gate
//! points at its own address in a *trampoline* range of ring-0 code. The
//! virtual CPU delivers interrupts and exceptions architecturally
//! (privilege change, stack switch, error codes, trap or fault EIP); when
//! CS:EIP arrives in the trampoline at CPL 0, the run loop takes over as
//! the kernel: it services a system call and returns with IRET semantics,
//! or ends the process with the signal Linux would send. Memory is paged
//! ([`mm`]); the process starts with Linux's initial stack (argc, argv,
//! envp, auxv: fs/binfmt_elf.c `create_elf_tables`).
//!
//! Signals: handlers are recorded but never run; a CPU exception ends the
//! process as an unhandled signal does.

mod creds;
pub mod errno;
mod events;
mod files;
mod handlers;
mod ipc;
pub mod mm;
mod net;
pub mod process;
pub mod procs;
pub mod signals;
pub mod syscalls;
pub mod threads;

pub use process::LinuxProcess;

use std::io::Write;

use popek_memory::GuestRam;

use mm::{AddressSpace, KERNEL_BASE, PAGE};
use popek_vcpu::{attr, flags, reg, Exception, SegReg, Segment, Vcpu};

use crate::elf32::Elf32;
use crate::LoadError;

/// User code selector (x86-64 Linux's __USER32_CS).
pub const USER_CS: u16 = 0x23;
/// User data and stack selector (__USER32_DS).
pub const USER_DS: u16 = 0x2B;
const KERNEL_CS: u16 = 0x30;
const KERNEL_DS: u16 = 0x38;
const TSS_SEL: u16 = 0x40;

/// Linux signal numbers.
pub mod sig {
    /// Illegal instruction.
    pub const SIGILL: i32 = 4;
    /// Trace/breakpoint trap.
    pub const SIGTRAP: i32 = 5;
    /// Bus error.
    pub const SIGBUS: i32 = 7;
    /// Arithmetic exception.
    pub const SIGFPE: i32 = 8;
    /// Abort.
    pub const SIGABRT: i32 = 6;
    /// Killed.
    pub const SIGKILL: i32 = 9;
    /// Segmentation fault.
    pub const SIGSEGV: i32 = 11;

    /// The conventional name.
    pub fn name(s: i32) -> &'static str {
        match s {
            SIGILL => "SIGILL",
            SIGTRAP => "SIGTRAP",
            SIGBUS => "SIGBUS",
            SIGFPE => "SIGFPE",
            SIGSEGV => "SIGSEGV",
            SIGABRT => "SIGABRT",
            SIGKILL => "SIGKILL",
            _ => "signal",
        }
    }
}

/// End popek by signal `sig` with its default action (no core file), so
/// that whoever waits for it sees the status a native process killed by
/// that signal leaves. Returns if the signal does not end a process.
pub fn die_of(sig: i32) {
    // SAFETY: resetting a disposition, limiting core files to none and
    // raising a signal at this thread; nothing is shared with a handler.
    unsafe {
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &none);
        libc::signal(sig, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(sig);
    }
}

/// The signal Linux sends for a CPU exception in user mode
/// (arch/x86/kernel/traps.c).
pub fn signal_for(vector: u8) -> i32 {
    match vector {
        0 | 16 | 19 => sig::SIGFPE,
        1 | 3 => sig::SIGTRAP,
        6 => sig::SIGILL,
        7 => sig::SIGFPE,
        11 | 12 | 17 => sig::SIGBUS,
        _ => sig::SIGSEGV,
    }
}

/// Where things live in the kernel's two pages.
mod layout {
    use super::KERNEL_BASE;
    pub const GDT: u32 = KERNEL_BASE;
    pub const TSS: u32 = KERNEL_BASE + 0x100;
    pub const IDT: u32 = KERNEL_BASE + 0x200;
    pub const TRAMPOLINE: u32 = KERNEL_BASE + 0xA00;
    pub const KERNEL_STACK_TOP: u32 = KERNEL_BASE + 0x1FF0;
}

/// What a kernel entry decided.
pub enum KernelExit {
    /// Return to user mode and go on.
    Resume,
    /// The process exited with this status.
    Exit(i32),
    /// The process was killed by a signal for this exception.
    Signal(Fatal),
    /// The process was killed by a signal it sent itself (abort()).
    Killed(i32),
    /// A thread of a threaded process waits outside the process lock.
    Blocked(threads::Block),
    /// A thread (not the process) called exit with this status.
    ThreadExit(i32),
}

/// A fatal signal and the user state a signal handler would have seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fatal {
    /// Linux signal number.
    pub signo: i32,
    /// The exception.
    pub exception: Exception,
    /// The EIP in the signal frame (the faulting instruction for faults,
    /// the next one for traps).
    pub eip: u32,
    /// EAX..EDI at the fault, with the user ESP.
    pub regs: [u32; 8],
    /// EFLAGS at the fault.
    pub eflags: u32,
}

fn user_flat(sel: u16, code: bool) -> Segment {
    let mut a = attr::P | attr::S | attr::DB | attr::G | attr::ACCESSED | (3 << 5) | attr::RW;
    if code {
        a |= attr::CODE;
    }
    Segment::flat(sel, a)
}

/// A flat descriptor with the given access byte (flags G and D set).
fn flat_desc(access: u8) -> u64 {
    0x00CF_0000_0000_FFFF | (u64::from(access) << 40)
}

/// Guest RAM for a Linux process: at least 1 GiB (a lazily filled memfd:
/// only the pages the process touches cost anything).
pub const MIN_MEMORY: u64 = 1 << 30;

/// How the process starts.
#[derive(Debug, Clone, Default)]
pub struct Start {
    /// argv (argv[0] is the program as named).
    pub args: Vec<String>,
    /// The environment, `NAME=value`.
    pub env: Vec<String>,
    /// The executable's path on the host (for /proc/self/exe).
    pub exe: std::path::PathBuf,
    /// Print every system call (`--strace`).
    pub strace: bool,
    /// Where AT_RANDOM and getrandom take their bytes: the host's entropy
    /// (None), or a reproducible sequence from this seed (`--lockstep`
    /// runs two machines that must see the same bytes).
    pub random_seed: Option<u64>,
    /// Where the dynamic loader and the libraries it opens are looked up
    /// first (`-L SYSROOT` or POPEK_LD_PREFIX, as qemu-i386's -L and
    /// QEMU_LD_PREFIX): an absolute path the guest names is taken under
    /// it when the file exists there.
    pub sysroot: Option<std::path::PathBuf>,
}

impl Start {
    /// Start with `args` (args[0] names the program), popek's environment,
    /// and /proc/self/exe resolving to args[0] on the host.
    pub fn with_host_env(args: &[String], strace: bool) -> Start {
        Start {
            args: args.to_vec(),
            env: std::env::vars_os()
                .map(|(k, v)| format!("{}={}", k.to_string_lossy(), v.to_string_lossy()))
                .collect(),
            exe: args
                .first()
                .and_then(|a| std::fs::canonicalize(a).ok())
                .unwrap_or_default(),
            strace,
            random_seed: None,
            sysroot: std::env::var_os("POPEK_LD_PREFIX")
                .filter(|v| !v.is_empty())
                .map(std::path::PathBuf::from),
        }
    }

    /// `path` (an absolute guest path) under the sysroot, if it exists
    /// there; else `path` itself.
    pub fn host_path(&self, path: &std::path::Path) -> std::path::PathBuf {
        match &self.sysroot {
            Some(root) if path.is_absolute() => {
                let p = root.join(path.strip_prefix("/").unwrap_or(path));
                if p.exists() {
                    p
                } else {
                    path.to_path_buf()
                }
            }
            _ => path.to_path_buf(),
        }
    }
}

/// Load a static i386 ELF and build the process. Returns the CPU (in user
/// mode at the entry point) and the process state.
pub fn load(image: &[u8], start: Start, memory: u64) -> Result<(Vcpu, LinuxProcess), LoadError> {
    let elf = Elf32::parse(image)?;
    // A dynamic executable: its program interpreter (ld-linux.so.2) is
    // loaded too, below the mmap area, and runs first (AT_BASE, AT_ENTRY).
    let interp = match elf.interp() {
        Some(name) => {
            let path = start.host_path(std::path::Path::new(&name));
            let data = std::fs::read(&path).map_err(|e| {
                LoadError::Malformed(format!(
                    "the program interpreter {name} ({}): {e} (popek run -L SYSROOT or POPEK_LD_PREFIX names where to find it)",
                    path.display()
                ))
            })?;
            Some(data)
        }
        None => None,
    };
    let interp_elf = interp.as_deref().map(Elf32::parse).transpose()?;
    if let Some(i) = &interp_elf {
        if !i.is_dyn() || i.has_interp() {
            return Err(LoadError::Malformed(
                "the program interpreter is not a shared object".into(),
            ));
        }
    }
    let segments = elf.segments()?;
    if segments.is_empty() {
        return Err(LoadError::Malformed("ELF has no loadable segment".into()));
    }
    let bias = if elf.is_dyn() {
        mm::PIE_BASE.wrapping_sub(segments.iter().map(|s| s.vaddr).min().unwrap_or(0) & !0xFFF)
    } else {
        0
    };
    let mut ram =
        GuestRam::new(memory.max(MIN_MEMORY)).map_err(|e| LoadError::Memory(e.to_string()))?;
    // A process has one address space, so its shadow can be the window at
    // host address 0: translated code's loads then carry no segment base.
    ram.set_low_shadow(true);
    let mut cpu = Vcpu::new(ram);
    let mut mm = AddressSpace::new(&mut cpu);
    let nomem = |_| LoadError::Memory("guest RAM exhausted while loading (try --memory)".into());

    // The kernel's pages, then paging on, then the tables through it.
    mm.map(
        &mut cpu,
        KERNEL_BASE,
        0,
        mm::prot::READ | mm::prot::WRITE,
        false,
    )
    .map_err(nomem)?;
    cpu.cr3 = mm.directory;
    cpu.cr0 = popek_vcpu::cr0::PE
        | popek_vcpu::cr0::MP
        | popek_vcpu::cr0::ET
        | popek_vcpu::cr0::NE
        | popek_vcpu::cr0::WP
        | popek_vcpu::cr0::PG;
    build_kernel_tables(&mut cpu);

    let top = load_segments(&mut cpu, &mut mm, &segments, bias)?;
    let (interp_base, interp_entry) = match &interp_elf {
        Some(i) => {
            let segs = i.segments()?;
            let lo = segs.iter().map(|s| s.vaddr).min().unwrap_or(0) & !0xFFF;
            let hi = segs.iter().map(|s| s.vaddr + s.memsz).max().unwrap_or(0);
            let span = mm::page_up(hi - lo);
            let base = mm
                .find_free(span)
                .ok_or_else(|| LoadError::Memory("no room for the program interpreter".into()))?;
            let ibias = base.wrapping_sub(lo);
            load_segments(&mut cpu, &mut mm, &segs, ibias)?;
            (base, i.entry().wrapping_add(ibias))
        }
        None => (0, 0),
    };
    mm.brk_start = mm::page_up(top);
    mm.brk = mm.brk_start;

    // Where the program headers are in memory (AT_PHDR).
    let (phoff, phent, phnum) = elf.phdr_table();
    let phdr = segments
        .iter()
        .find(|s| (s.offset..s.offset + s.data.len() as u32).contains(&phoff))
        .map(|s| s.vaddr.wrapping_add(bias) + (phoff - s.offset))
        .unwrap_or(0);

    let stack_low = mm::STACK_TOP - mm::STACK_SIZE;
    mm.map(
        &mut cpu,
        stack_low,
        mm::STACK_TOP,
        mm::prot::READ | mm::prot::WRITE,
        true,
    )
    .map_err(nomem)?;
    let entry = elf.entry().wrapping_add(bias);
    let sp = initial_stack(
        &mut cpu,
        &mm,
        &start,
        [phdr, u32::from(phent), u32::from(phnum), entry, interp_base],
    )
    .map_err(|_| LoadError::Malformed("arguments and environment do not fit the stack".into()))?;

    for s in SegReg::ALL {
        cpu.segs[s as usize] = match s {
            SegReg::Cs => user_flat(USER_CS, true),
            SegReg::Fs | SegReg::Gs => Segment::default(),
            _ => user_flat(USER_DS, false),
        };
    }
    cpu.eflags = flags::FIXED1 | flags::IF;
    cpu.regs = [0; 8];
    cpu.regs[reg::ESP] = sp;
    cpu.eip = if interp_elf.is_some() {
        interp_entry
    } else {
        entry
    };
    cpu.set_tsc(0);
    let process = LinuxProcess::new(mm, start);
    process.mirror_at_start();
    Ok((cpu, process))
}

/// Map and fill an ELF's loadable segments at `bias`: each page once,
/// with the union of the rights of the segments sharing it (as
/// overlapping MAP_FIXED file mappings give). Returns the end of the last.
fn load_segments(
    cpu: &mut Vcpu,
    mm: &mut AddressSpace,
    segments: &[crate::elf32::Segment<'_>],
    bias: u32,
) -> Result<u32, LoadError> {
    let nomem = |_| LoadError::Memory("guest RAM exhausted while loading (try --memory)".into());
    let mut pages: std::collections::BTreeMap<u32, u32> = Default::default();
    let mut top = 0u32;
    for s in segments {
        let start = s.vaddr.wrapping_add(bias);
        let end = start
            .checked_add(s.memsz)
            .filter(|&e| e <= mm::MMAP_TOP)
            .ok_or_else(|| {
                LoadError::Malformed("ELF segment outside the user address space".into())
            })?;
        let prot = (if s.flags & object::elf::PF_R.0 != 0 {
            mm::prot::READ
        } else {
            0
        }) | (if s.flags & object::elf::PF_W.0 != 0 {
            mm::prot::WRITE
        } else {
            0
        }) | (if s.flags & object::elf::PF_X.0 != 0 {
            mm::prot::EXEC
        } else {
            0
        });
        let mut p = start & !0xFFF;
        while p < end {
            *pages.entry(p).or_default() |= prot;
            p += PAGE;
        }
        top = top.max(end);
    }
    for (&p, &prot) in &pages {
        mm.map(cpu, p, p + PAGE, prot, true).map_err(nomem)?;
    }
    for s in segments {
        let start = s.vaddr.wrapping_add(bias);
        mm.fill(cpu, start, s.data).map_err(nomem)?;
        let zeros = vec![0u8; (s.memsz as usize).saturating_sub(s.data.len())];
        mm.fill(cpu, start + s.data.len() as u32, &zeros)
            .map_err(nomem)?;
    }
    Ok(top)
}

/// Auxiliary vector keys (include/uapi/linux/auxvec.h).
mod at {
    pub const NULL: u32 = 0;
    pub const PHDR: u32 = 3;
    pub const PHENT: u32 = 4;
    pub const PHNUM: u32 = 5;
    pub const PAGESZ: u32 = 6;
    pub const BASE: u32 = 7;
    pub const FLAGS: u32 = 8;
    pub const ENTRY: u32 = 9;
    pub const UID: u32 = 11;
    pub const EUID: u32 = 12;
    pub const GID: u32 = 13;
    pub const EGID: u32 = 14;
    pub const PLATFORM: u32 = 15;
    pub const HWCAP: u32 = 16;
    pub const CLKTCK: u32 = 17;
    pub const SECURE: u32 = 23;
    pub const RANDOM: u32 = 25;
    pub const HWCAP2: u32 = 26;
    pub const EXECFN: u32 = 31;
}

/// Build argc, argv, envp and auxv below [`mm::STACK_TOP`] as Linux does;
/// returns the initial ESP (16-byte aligned, pointing at argc).
fn initial_stack(
    cpu: &mut Vcpu,
    mm: &AddressSpace,
    start: &Start,
    [phdr, phent, phnum, entry, base]: [u32; 5],
) -> Result<u32, errno::Errno> {
    let mut sp = mm::STACK_TOP - 4;
    let mut push_bytes = |cpu: &mut Vcpu, b: &[u8]| -> Result<u32, errno::Errno> {
        sp -= b.len() as u32;
        mm.write(cpu, sp, b)?;
        Ok(sp)
    };
    let cstr = |s: &str| {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    };
    let execfn = push_bytes(
        cpu,
        &cstr(start.args.first().map(String::as_str).unwrap_or("")),
    )?;
    let mut envp = Vec::new();
    for e in start.env.iter().rev() {
        envp.push(push_bytes(cpu, &cstr(e))?);
    }
    envp.reverse();
    let mut argv = Vec::new();
    for a in start.args.iter().rev() {
        argv.push(push_bytes(cpu, &cstr(a))?);
    }
    argv.reverse();
    let platform = push_bytes(cpu, b"i686\0")?;
    let mut random = [0u8; 16];
    fill_random(&mut random, &mut start.random_seed.clone());
    let random = push_bytes(cpu, &random)?;
    let [uid, gid, euid, egid] = process::ids();
    let auxv = [
        (at::HWCAP, popek_vcpu::system::cpuid_edx::ALL),
        (at::PAGESZ, PAGE),
        (at::CLKTCK, 100),
        (at::PHDR, phdr),
        (at::PHENT, phent),
        (at::PHNUM, phnum),
        (at::BASE, base),
        (at::FLAGS, 0),
        (at::ENTRY, entry),
        (at::UID, uid),
        (at::EUID, euid),
        (at::GID, gid),
        (at::EGID, egid),
        (at::SECURE, 0),
        (at::RANDOM, random),
        (at::HWCAP2, 0),
        (at::EXECFN, execfn),
        (at::PLATFORM, platform),
        (at::NULL, 0),
    ];
    let mut words = vec![argv.len() as u32];
    words.extend(&argv);
    words.push(0);
    words.extend(&envp);
    words.push(0);
    for (k, v) in auxv {
        words.extend([k, v]);
    }
    let sp = (sp - 4 * words.len() as u32) & !15;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    mm.write(cpu, sp, &bytes)?;
    Ok(sp)
}

/// Random bytes from the host (AT_RANDOM, getrandom).
/// Random bytes: the host's, or the next of a splitmix64 sequence when a
/// seed is given (which it advances).
pub fn fill_random(buf: &mut [u8], seed: &mut Option<u64>) {
    if let Some(state) = seed {
        for chunk in buf.chunks_mut(8) {
            *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = *state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
        return;
    }
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled part of `buf`.
        let r = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if r <= 0 {
            break;
        }
        done += r as usize;
    }
}

fn build_kernel_tables(cpu: &mut Vcpu) {
    let w = |cpu: &mut Vcpu, lin: u32, len: u32, v: u64| {
        cpu.write_sys(lin, len, v)
            .expect("the kernel's pages are mapped");
    };
    let entries: [(u16, u64); 5] = [
        (USER_CS, flat_desc(0xFA)),
        (USER_DS, flat_desc(0xF2)),
        (KERNEL_CS, flat_desc(0x9A)),
        (KERNEL_DS, flat_desc(0x92)),
        (TSS_SEL, {
            let base = u64::from(layout::TSS);
            0x67 | ((base & 0xFF_FFFF) << 16) | (0x89u64 << 40) | ((base >> 24) << 56)
        }),
    ];
    for (sel, d) in entries {
        w(cpu, layout::GDT + u32::from(sel & !7), 8, d);
    }
    cpu.gdtr.base = layout::GDT;
    cpu.gdtr.limit = GDT_LIMIT;
    // TSS: ESP0, SS0, no I/O bitmap.
    w(cpu, layout::TSS + 4, 4, u64::from(layout::KERNEL_STACK_TOP));
    w(cpu, layout::TSS + 8, 4, u64::from(KERNEL_DS));
    w(cpu, layout::TSS + 0x66, 2, 0x68);
    cpu.ltr(TSS_SEL).expect("TSS descriptor is valid");
    for v in 0..256u32 {
        let target = layout::TRAMPOLINE + v;
        let dpl: u64 = if matches!(v, 3 | 4 | 0x80) { 3 } else { 0 };
        let gate = (u64::from(target) & 0xFFFF)
            | (u64::from(KERNEL_CS) << 16)
            | ((0x8E | (dpl << 5)) << 40)
            | ((u64::from(target) >> 16) << 48);
        w(cpu, layout::IDT + 8 * v, 8, gate);
        // The trampoline bytes are never executed; HLT marks them.
        w(cpu, target, 1, 0xF4);
    }
    cpu.idtr.base = layout::IDT;
    cpu.idtr.limit = 0x7FF;
}

/// The GDT holds 16 entries; entries 12 to 14 are the TLS slots
/// (x86-64 Linux's GDT_ENTRY_TLS_MIN for 32-bit processes).
const GDT_LIMIT: u16 = 16 * 8 - 1;
/// First TLS entry.
pub const TLS_FIRST: u32 = 12;
/// Number of TLS entries.
pub const TLS_ENTRIES: u32 = 3;

fn has_error_code(v: u8) -> bool {
    matches!(v, 8 | 10 | 11 | 12 | 13 | 14 | 17)
}

impl LinuxProcess {
    /// Did the CPU just enter the kernel (CPL 0 in the trampoline)? Returns the vector.
    pub fn kernel_entry(&self, cpu: &Vcpu) -> Option<u8> {
        let t = layout::TRAMPOLINE;
        (cpu.cpl() == 0 && (t..t + 256).contains(&cpu.eip)).then(|| (cpu.eip - t) as u8)
    }

    /// Act as the kernel for an entry through `vector`.
    pub fn handle(
        &mut self,
        cpu: &mut Vcpu,
        vector: u8,
        out: &mut dyn Write,
        err: &mut dyn Write,
    ) -> KernelExit {
        // The frame the CPU pushed on the kernel stack.
        let mut sp = cpu.regs[reg::ESP];
        let rd = |cpu: &mut Vcpu, a: u32| cpu.read_sys(a, 4).unwrap_or(0) as u32;
        let error = if has_error_code(vector) {
            let e = rd(cpu, sp);
            sp += 4;
            Some(e)
        } else {
            None
        };
        let eip = rd(cpu, sp);
        let eflags = rd(cpu, sp + 8);
        let user_esp = rd(cpu, sp + 12);
        if vector != 0x80 {
            let mut regs = cpu.regs;
            regs[reg::ESP] = user_esp;
            let f = Fatal {
                signo: signal_for(vector),
                exception: Exception { vector, error },
                eip,
                regs,
                eflags,
            };
            return self.fault(cpu, f, vector);
        }
        // Restore the user context first (IRET to CPL 3), then run the call.
        cpu.segs[SegReg::Cs as usize] = user_flat(USER_CS, true);
        cpu.segs[SegReg::Ss as usize] = user_flat(USER_DS, false);
        cpu.regs[reg::ESP] = user_esp;
        cpu.eip = eip;
        cpu.eflags = eflags | flags::FIXED1;
        let nr = cpu.regs[reg::EAX];
        let r = self.syscall(cpu, out, err);
        cpu.regs[reg::EAX] = r as u32;
        // A blocking call a signal interrupted: if the handler about to
        // run asks for SA_RESTART, the call is made again after it
        // (sigsuspend, pause and the sleeps are never restarted).
        if r == -errno::EINTR
            && !matches!(nr, 29 | 119 | 162 | 173 | 179 | 267 | 407)
            && self.restarts()
        {
            cpu.eip = cpu.eip.wrapping_sub(2);
            cpu.regs[reg::EAX] = nr;
        }
        if let Some(s) = self.killed {
            return KernelExit::Killed(s);
        }
        if let Some(s) = self.exited {
            return KernelExit::Exit(s);
        }
        if let Some(s) = self.thread_exited.take() {
            return KernelExit::ThreadExit(s);
        }
        if let Some(b) = self.block.take() {
            return KernelExit::Blocked(b);
        }
        // A signal the call raised or let through is taken on the way
        // back to user mode, before the next user instruction.
        if self.signal_pending() {
            if let Some(e) = self.deliver_signals(cpu) {
                return e;
            }
        }
        KernelExit::Resume
    }
}
