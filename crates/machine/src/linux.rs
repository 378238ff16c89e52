//! A minimal Linux i386 user-mode platform: popek acts as the guest's
//! kernel. A static i386 ELF runs at CPL 3 with the segment selectors an
//! x86-64 Linux kernel gives 32-bit processes (CS 0x23, DS/ES/SS 0x2B), and
//! `int 0x80` is serviced by popek.
//!
//! The kernel side is real x86: popek builds a GDT, a TSS and an IDT in a
//! reserved region at the top of guest RAM, with Linux's gate privileges
//! (INT3, INTO and INT 0x80 are DPL 3; every other vector is DPL 0, so
//! `int $0x40` at CPL 3 raises #GP as on Linux). Every gate points at its
//! own address in a *trampoline* range of ring-0 code. The virtual CPU
//! delivers interrupts and exceptions architecturally (privilege change,
//! stack switch, error codes, trap or fault EIP); when CS:EIP arrives in the
//! trampoline at CPL 0, the run loop takes over as the kernel: it services a
//! system call and returns with IRET semantics, or ends the process with
//! the signal Linux would send.
//!
//! System calls: write, exit, exit_group; rt_sigaction, rt_sigprocmask and
//! sigaltstack are accepted and ignored (no signal is ever delivered to a handler: a
//! fault ends the process, as an unhandled signal does); everything else
//! returns -ENOSYS. The full Linux ABI comes with the Linux user-mode issue.

use std::io::Write;

use popek_memory::GuestRam;
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

/// Size of the reserved kernel region at the top of RAM: descriptor tables,
/// TSS, trampoline and kernel stack in the first 64 KiB, then the page
/// directory and page tables.
const KERNEL_REGION: u32 = 0x50000;
/// Size of the user stack below the kernel region.
const USER_STACK: u32 = 1 << 20;

/// Linux system call numbers (i386).
mod nr {
    pub const EXIT: u32 = 1;
    pub const WRITE: u32 = 4;
    pub const RT_SIGACTION: u32 = 174;
    pub const RT_SIGPROCMASK: u32 = 175;
    pub const SIGALTSTACK: u32 = 186;
    pub const EXIT_GROUP: u32 = 252;
}

const ENOSYS: i32 = 38;
const EBADF: i32 = 9;
const EFAULT: i32 = 14;

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
            _ => "signal",
        }
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

/// Where things live in the kernel region.
#[derive(Debug, Clone, Copy)]
struct Layout {
    base: u32,
}

impl Layout {
    fn gdt(self) -> u32 {
        self.base
    }
    fn tss(self) -> u32 {
        self.base + 0x100
    }
    fn idt(self) -> u32 {
        self.base + 0x200
    }
    fn trampoline(self) -> u32 {
        self.base + 0xA00
    }
    fn kernel_stack_top(self) -> u32 {
        self.base + 0xFFF0
    }
    fn page_tables(self) -> (u32, u32) {
        (self.base + 0x10000, self.base + KERNEL_REGION)
    }
}

/// The state of the emulated process.
#[derive(Debug)]
pub struct LinuxProcess {
    layout: Layout,
    /// The exit status once the process called exit or exit_group.
    pub exited: Option<i32>,
    /// System call numbers that returned ENOSYS (each reported once).
    pub unknown_syscalls: Vec<u32>,
}

/// What a kernel entry decided.
pub enum KernelExit {
    /// Return to user mode and go on.
    Resume,
    /// The process exited with this status.
    Exit(i32),
    /// The process was killed by a signal for this exception.
    Signal(Fatal),
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

/// Load a static i386 ELF and build the process. Returns the CPU (in user
/// mode at the entry point) and the process state.
pub fn load(
    image: &[u8],
    args: &[String],
    mut memory: u64,
) -> Result<(Vcpu, LinuxProcess), LoadError> {
    let elf = Elf32::parse(image)?;
    if elf.has_interp() {
        return Err(LoadError::Malformed(
            "dynamically linked executables are not supported yet (PT_INTERP present)".into(),
        ));
    }
    let top = elf
        .loads()
        .map(|(vaddr, _, memsz, _)| u64::from(vaddr) + u64::from(memsz))
        .max()
        .ok_or_else(|| LoadError::Malformed("ELF has no loadable segment".into()))?;
    // Guest RAM must hold the image, the stack and the kernel region; RAM is
    // a lazy mapping, so untouched space costs nothing.
    memory = memory.max((top + u64::from(USER_STACK + KERNEL_REGION) + 0xFFFF) & !0xFFFF);
    let mut ram = GuestRam::new(memory).map_err(|e| LoadError::Memory(e.to_string()))?;
    elf.load_into(&mut ram, false)?;
    let layout = Layout {
        base: ram.size() - KERNEL_REGION,
    };
    let mut cpu = Vcpu::new(ram);
    build_kernel_tables(&mut cpu, layout);

    // Paging: the image and the stack are user pages (identity-mapped),
    // the kernel region is supervisor-only, everything else is not present,
    // so a wild pointer faults (SIGSEGV) as it does under Linux.
    let mut pager = Pager::new(&mut cpu, layout.page_tables());
    for (start, _, memsz, writable) in elf.loads() {
        pager.map(&mut cpu, start, start + memsz, true, writable)?;
    }
    pager.map(&mut cpu, layout.base - USER_STACK, layout.base, true, true)?;
    pager.map(
        &mut cpu,
        layout.base,
        layout.base + KERNEL_REGION,
        false,
        true,
    )?;
    cpu.cr3 = pager.directory;

    // The initial stack: argc, argv[], NULL, envp[] (empty), NULL, auxv AT_NULL.
    let mut sp = layout.base - 16;
    let mut argv_ptrs = Vec::new();
    for a in args.iter().rev() {
        let mut bytes = a.as_bytes().to_vec();
        bytes.push(0);
        sp -= bytes.len() as u32;
        cpu.ram.load(sp, &bytes);
        argv_ptrs.push(sp);
    }
    argv_ptrs.reverse();
    sp &= !15;
    let mut words = vec![args.len() as u32];
    words.extend(&argv_ptrs);
    words.extend([0, 0, 0, 0]); // argv NULL, envp NULL, AT_NULL pair
    sp -= 4 * words.len() as u32;
    sp &= !15;
    for (i, w) in words.iter().enumerate() {
        cpu.ram.write(sp + 4 * i as u32, 4, u64::from(*w));
    }

    for s in SegReg::ALL {
        cpu.segs[s as usize] = match s {
            SegReg::Cs => user_flat(USER_CS, true),
            SegReg::Fs | SegReg::Gs => Segment::default(),
            _ => user_flat(USER_DS, false),
        };
    }
    cpu.cr0 = popek_vcpu::cr0::PE | popek_vcpu::cr0::ET | popek_vcpu::cr0::PG;
    cpu.eflags = flags::FIXED1 | flags::IF;
    cpu.regs = [0; 8];
    cpu.regs[reg::ESP] = sp;
    cpu.eip = elf.entry();
    cpu.set_tsc(0);
    Ok((
        cpu,
        LinuxProcess {
            layout,
            exited: None,
            unknown_syscalls: Vec::new(),
        },
    ))
}

/// Builds 32-bit page tables (SDM Vol. 3 §4.3) in the kernel region.
struct Pager {
    directory: u32,
    next: u32,
    end: u32,
}

impl Pager {
    fn new(cpu: &mut Vcpu, (start, end): (u32, u32)) -> Pager {
        cpu.ram.zero(start, 0x1000);
        Pager {
            directory: start,
            next: start + 0x1000,
            end,
        }
    }

    /// Identity-map `[start, end)` with 4 KiB pages.
    fn map(
        &mut self,
        cpu: &mut Vcpu,
        start: u32,
        end: u32,
        user: bool,
        writable: bool,
    ) -> Result<(), LoadError> {
        let flags = 1 | (u32::from(writable) << 1) | (u32::from(user) << 2);
        let mut page = start & !0xFFF;
        while page < end {
            let pde_addr = self.directory + (page >> 22) * 4;
            let mut pde = cpu.ram.read(pde_addr, 4) as u32;
            if pde & 1 == 0 {
                if self.next >= self.end {
                    return Err(LoadError::Malformed(
                        "executable spans too much address space for popek's page tables".into(),
                    ));
                }
                cpu.ram.zero(self.next, 0x1000);
                pde = self.next | 7; // rights are decided by the page entries
                self.next += 0x1000;
                cpu.ram.write(pde_addr, 4, u64::from(pde));
            }
            let pte_addr = (pde & !0xFFF) + ((page >> 12) & 0x3FF) * 4;
            let old = cpu.ram.read(pte_addr, 4) as u32;
            // Overlapping segments: the union of their rights.
            cpu.ram
                .write(pte_addr, 4, u64::from(page | flags | (old & 7)));
            page = match page.checked_add(0x1000) {
                Some(p) => p,
                None => break,
            };
        }
        Ok(())
    }
}

fn build_kernel_tables(cpu: &mut Vcpu, l: Layout) {
    let gdt = l.gdt();
    let entries: [(u16, u64); 5] = [
        (USER_CS, flat_desc(0xFA)),
        (USER_DS, flat_desc(0xF2)),
        (KERNEL_CS, flat_desc(0x9A)),
        (KERNEL_DS, flat_desc(0x92)),
        (TSS_SEL, {
            let base = u64::from(l.tss());
            0x67 | ((base & 0xFF_FFFF) << 16) | (0x89u64 << 40) | ((base >> 24) << 56)
        }),
    ];
    for (sel, d) in entries {
        cpu.ram.write(gdt + u32::from(sel & !7), 8, d);
    }
    cpu.gdtr.base = gdt;
    cpu.gdtr.limit = 0x7F;
    // TSS: ESP0, SS0, no I/O bitmap.
    cpu.ram
        .write(l.tss() + 4, 4, u64::from(l.kernel_stack_top()));
    cpu.ram.write(l.tss() + 8, 4, u64::from(KERNEL_DS));
    cpu.ram.write(l.tss() + 0x66, 2, 0x68);
    cpu.ltr(TSS_SEL).expect("TSS descriptor is valid");
    for v in 0..256u32 {
        let target = l.trampoline() + v;
        let dpl: u64 = if matches!(v, 3 | 4 | 0x80) { 3 } else { 0 };
        let gate = (u64::from(target) & 0xFFFF)
            | (u64::from(KERNEL_CS) << 16)
            | ((0x8E | (dpl << 5)) << 40)
            | ((u64::from(target) >> 16) << 48);
        cpu.ram.write(l.idt() + 8 * v, 8, gate);
        // The trampoline bytes are never executed; HLT marks them.
        cpu.ram.write(target, 1, 0xF4);
    }
    cpu.idtr.base = l.idt();
    cpu.idtr.limit = 0x7FF;
}

fn has_error_code(v: u8) -> bool {
    matches!(v, 8 | 10 | 11 | 12 | 13 | 14 | 17)
}

impl LinuxProcess {
    /// Did the CPU just enter the kernel (CPL 0 in the trampoline)? Returns the vector.
    pub fn kernel_entry(&self, cpu: &Vcpu) -> Option<u8> {
        let t = self.layout.trampoline();
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
        let rd = |cpu: &mut Vcpu, a: u32| cpu.ram.read(a, 4) as u32;
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
            return KernelExit::Signal(Fatal {
                signo: signal_for(vector),
                exception: Exception { vector, error },
                eip,
                regs,
                eflags,
            });
        }
        // Restore the user context first (IRET to CPL 3), then run the call.
        cpu.segs[SegReg::Cs as usize] = user_flat(USER_CS, true);
        cpu.segs[SegReg::Ss as usize] = user_flat(USER_DS, false);
        cpu.regs[reg::ESP] = user_esp;
        cpu.eip = eip;
        cpu.eflags = eflags | flags::FIXED1;
        let r = self.syscall(cpu, out, err);
        cpu.regs[reg::EAX] = r as u32;
        match self.exited {
            Some(s) => KernelExit::Exit(s),
            None => KernelExit::Resume,
        }
    }

    fn syscall(&mut self, cpu: &mut Vcpu, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
        let [eax, ecx, edx, ebx, ..] = cpu.regs;
        match eax {
            nr::EXIT | nr::EXIT_GROUP => {
                self.exited = Some((ebx & 0xFF) as i32);
                0
            }
            nr::WRITE => {
                let (fd, buf, len) = (ebx, ecx, edx);
                if !cpu.ram.contains(buf, len) {
                    return -EFAULT;
                }
                let bytes = &cpu.ram.as_slice()[buf as usize..(buf + len) as usize];
                let ok = match fd {
                    1 => out.write_all(bytes).is_ok(),
                    2 => err.write_all(bytes).is_ok(),
                    _ => return -EBADF,
                };
                if ok {
                    len as i32
                } else {
                    -EBADF
                }
            }
            nr::RT_SIGACTION | nr::RT_SIGPROCMASK | nr::SIGALTSTACK => 0,
            n => {
                if !self.unknown_syscalls.contains(&n) {
                    self.unknown_syscalls.push(n);
                    let _ = writeln!(err, "popek: unknown system call {n} returns -ENOSYS");
                }
                -ENOSYS
            }
        }
    }
}
