//! Architectural state of the virtual CPU.

use popek_devices::Board;
use popek_memory::GuestRam;

/// General-purpose register numbers, in x86 encoding order.
pub mod reg {
    /// EAX.
    pub const EAX: usize = 0;
    /// ECX.
    pub const ECX: usize = 1;
    /// EDX.
    pub const EDX: usize = 2;
    /// EBX.
    pub const EBX: usize = 3;
    /// ESP.
    pub const ESP: usize = 4;
    /// EBP.
    pub const EBP: usize = 5;
    /// ESI.
    pub const ESI: usize = 6;
    /// EDI.
    pub const EDI: usize = 7;
    /// Register names for reports.
    pub const NAMES: [&str; 8] = ["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi"];
}

/// EFLAGS bits (Intel SDM Vol. 1 §3.4.3).
pub mod flags {
    /// Carry.
    pub const CF: u32 = 1 << 0;
    /// Always 1.
    pub const FIXED1: u32 = 1 << 1;
    /// Parity.
    pub const PF: u32 = 1 << 2;
    /// Auxiliary carry.
    pub const AF: u32 = 1 << 4;
    /// Zero.
    pub const ZF: u32 = 1 << 6;
    /// Sign.
    pub const SF: u32 = 1 << 7;
    /// Trap (single step).
    pub const TF: u32 = 1 << 8;
    /// Interrupt enable.
    pub const IF: u32 = 1 << 9;
    /// Direction.
    pub const DF: u32 = 1 << 10;
    /// Overflow.
    pub const OF: u32 = 1 << 11;
    /// I/O privilege level (2 bits).
    pub const IOPL: u32 = 3 << 12;
    /// Nested task.
    pub const NT: u32 = 1 << 14;
    /// Resume.
    pub const RF: u32 = 1 << 16;
    /// Virtual-8086 mode.
    pub const VM: u32 = 1 << 17;
    /// Alignment check.
    pub const AC: u32 = 1 << 18;
    /// Virtual interrupt flag.
    pub const VIF: u32 = 1 << 19;
    /// Virtual interrupt pending.
    pub const VIP: u32 = 1 << 20;
    /// CPUID available.
    pub const ID: u32 = 1 << 21;
    /// The six arithmetic flags.
    pub const ARITH: u32 = CF | PF | AF | ZF | SF | OF;
    /// The bits POPF/IRET may ever change on this CPU model.
    pub const WRITABLE: u32 = ARITH | TF | IF | DF | IOPL | NT | AC | ID;
}

/// CR0 bits.
pub mod cr0 {
    /// Protection enable.
    pub const PE: u32 = 1 << 0;
    /// Monitor coprocessor.
    pub const MP: u32 = 1 << 1;
    /// x87 emulation.
    pub const EM: u32 = 1 << 2;
    /// Task switched.
    pub const TS: u32 = 1 << 3;
    /// Extension type (hard-wired 1 since the 486).
    pub const ET: u32 = 1 << 4;
    /// Numeric error.
    pub const NE: u32 = 1 << 5;
    /// Write protect (supervisor writes honour read-only pages).
    pub const WP: u32 = 1 << 16;
    /// Alignment mask.
    pub const AM: u32 = 1 << 18;
    /// Not write-through.
    pub const NW: u32 = 1 << 29;
    /// Cache disable.
    pub const CD: u32 = 1 << 30;
    /// Paging.
    pub const PG: u32 = 1 << 31;
}

/// CR4 bits this CPU model implements.
pub mod cr4 {
    /// Time stamp disable (RDTSC privileged).
    pub const TSD: u32 = 1 << 2;
    /// Debugging extensions.
    pub const DE: u32 = 1 << 3;
    /// 4 MiB pages.
    pub const PSE: u32 = 1 << 4;
    /// Page global enable.
    pub const PGE: u32 = 1 << 7;
    /// All implemented bits; setting any other raises #GP(0).
    pub const VALID: u32 = TSD | DE | PSE | PGE;
}

/// Segment registers, in x86 encoding order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SegReg {
    /// ES.
    Es = 0,
    /// CS.
    Cs = 1,
    /// SS.
    Ss = 2,
    /// DS.
    Ds = 3,
    /// FS.
    Fs = 4,
    /// GS.
    Gs = 5,
}

impl SegReg {
    /// All six, in encoding order.
    pub const ALL: [SegReg; 6] = [
        SegReg::Es,
        SegReg::Cs,
        SegReg::Ss,
        SegReg::Ds,
        SegReg::Fs,
        SegReg::Gs,
    ];
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        ["es", "cs", "ss", "ds", "fs", "gs"][self as usize]
    }
}

/// Descriptor attribute bits as kept in a segment cache: bits 40..=55 of the
/// descriptor (access byte in bits 0..=7, flags nibble in bits 12..=15).
pub mod attr {
    /// Accessed (data/code) or the low type bit.
    pub const ACCESSED: u16 = 1 << 0;
    /// Writable (data) or readable (code).
    pub const RW: u16 = 1 << 1;
    /// Expand-down (data) or conforming (code).
    pub const DC: u16 = 1 << 2;
    /// Code segment.
    pub const CODE: u16 = 1 << 3;
    /// Code or data (not a system descriptor).
    pub const S: u16 = 1 << 4;
    /// Present.
    pub const P: u16 = 1 << 7;
    /// Default operation size (code) / big (stack).
    pub const DB: u16 = 1 << 14;
    /// Granularity (limit in 4 KiB units).
    pub const G: u16 = 1 << 15;
}

/// A segment register: the visible selector and the hidden descriptor cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Segment {
    /// The selector the guest loaded.
    pub selector: u16,
    /// Linear base address.
    pub base: u32,
    /// Limit in bytes (granularity already applied).
    pub limit: u32,
    /// Attribute bits (see [`attr`]); 0 for a null (unusable) segment.
    pub attr: u16,
}

impl Segment {
    /// A flat 4 GiB segment with the given selector and attributes.
    pub fn flat(selector: u16, attr: u16) -> Segment {
        Segment {
            selector,
            base: 0,
            limit: 0xFFFF_FFFF,
            attr,
        }
    }
    /// Is this segment usable (a non-null descriptor was loaded)?
    pub fn usable(&self) -> bool {
        self.attr & attr::P != 0
    }
    /// Descriptor privilege level.
    pub fn dpl(&self) -> u8 {
        ((self.attr >> 5) & 3) as u8
    }
    /// Is it a code segment?
    pub fn is_code(&self) -> bool {
        self.attr & attr::CODE != 0
    }
    /// 32-bit default operand size (CS) or 32-bit stack pointer (SS).
    pub fn big(&self) -> bool {
        self.attr & attr::DB != 0
    }
}

/// GDTR or IDTR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TableReg {
    /// Linear base address.
    pub base: u32,
    /// Limit in bytes.
    pub limit: u16,
}

/// Model-specific registers this CPU model implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Msrs {
    /// IA32_APIC_BASE-less Pentium Pro: only the TSC and a few others.
    pub tsc_written: Option<u64>,
}

/// The virtual CPU with the machine it is wired to: RAM and the port bus.
///
/// Registers are public so engines (interpreter, translator) and tests can
/// read and set them directly; special instructions go through methods.
pub struct Vcpu {
    /// EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI.
    pub regs: [u32; 8],
    /// Instruction pointer (offset in CS).
    pub eip: u32,
    /// EFLAGS. IF, IOPL, TF, NT, AC and ID are the guest's *virtual* system
    /// flags: they live only here, never in the host's flags register.
    pub eflags: u32,
    /// ES, CS, SS, DS, FS, GS.
    pub segs: [Segment; 6],
    /// Global descriptor table register.
    pub gdtr: TableReg,
    /// Interrupt descriptor table register.
    pub idtr: TableReg,
    /// Local descriptor table register (selector plus cache).
    pub ldtr: Segment,
    /// Task register (selector plus cache).
    pub tr: Segment,
    /// CR0.
    pub cr0: u32,
    /// CR2 (page-fault linear address).
    pub cr2: u32,
    /// The linear address of the last page fault a translation found: CR2
    /// takes it when that #PF is raised (a lookup that is not an access,
    /// such as the translator reading ahead, leaves CR2 alone).
    pub fault_cr2: u32,
    /// CR3 (page directory base).
    pub cr3: u32,
    /// CR4.
    pub cr4: u32,
    /// DR0..DR7 (stored; breakpoints are not implemented).
    pub dr: [u32; 8],
    /// Added to the host TSC, or to the instruction clock, to give the
    /// guest TSC.
    pub tsc_offset: u64,
    /// The machine's one clock counts retired instructions (one ns each,
    /// plus the time skipped while halted, [`Vcpu::idle_ns`]) instead of
    /// host time: the devices' time and the TSC (one tick per ns) then
    /// follow the instructions, so runs are reproducible (`--icount`, and
    /// both machines of `--lockstep`).
    pub clock_counts_instructions: bool,
    /// Time the instruction clock skipped while the CPU was halted (ns).
    pub idle_ns: u64,
    /// When the machine was created or resumed (host time), the origin of
    /// device time.
    pub boot: std::time::Instant,
    /// Machine time at `boot` (ns): nonzero when a machine resumes from a
    /// snapshot, so its clock goes on from where it stopped.
    pub clock_base_ns: u64,
    /// The CPU executed HLT and waits for an interrupt.
    pub halted: bool,
    /// Interrupts are inhibited for one instruction (after STI, MOV SS, POP SS).
    pub int_shadow: bool,
    /// Guest physical RAM.
    pub ram: GuestRam,
    /// The board: the port-I/O bus, its devices and their interrupt lines.
    pub board: Board,
    /// Guest instructions retired.
    pub retired: u64,
    /// Page faults delivered to the guest (through its IDT), as opposed to
    /// the hidden ones an engine handles itself.
    pub page_faults: u64,
    /// Data accesses the host MMU could not have made on the guest's
    /// behalf (a device's registers, an accessed or dirty bit to set, a
    /// page fault): translated code faults on each, so the translator's
    /// adaptive helpers count them to decide whether an instruction stays
    /// a helper call.
    pub slow_accesses: u64,
    /// The linear addresses of the first data accesses (address, write)
    /// since `touched.1` was last set to 0, at most two: what the
    /// translator's adaptive helpers look at after a run (see
    /// `popek_translate`'s `run_helper`).
    pub touched: ([(u32, bool); 2], u8),
    /// The x87 FPU.
    pub fpu: crate::x87::Fpu,
    /// A debugger's watchpoints on linear addresses (checked by every data
    /// access through [`Vcpu::read_lin`] and [`Vcpu::write_lin`]: the
    /// interpreter's; a debugger runs the guest on it while any is set).
    pub watchpoints: Vec<Watchpoint>,
    /// The first watchpoint an access hit since the debugger last looked:
    /// the linear address accessed and whether it was a write.
    pub watch_hit: Option<(u32, bool)>,
}

impl Vcpu {
    /// A CPU with this one's architectural state on `ram`: a new thread of
    /// a Linux process (its registers are then set by clone).
    pub fn thread_copy(&self, ram: GuestRam) -> Vcpu {
        Vcpu {
            regs: self.regs,
            eip: self.eip,
            eflags: self.eflags,
            segs: self.segs,
            gdtr: self.gdtr,
            idtr: self.idtr,
            ldtr: self.ldtr,
            tr: self.tr,
            cr0: self.cr0,
            cr2: self.cr2,
            fault_cr2: self.fault_cr2,
            cr3: self.cr3,
            cr4: self.cr4,
            dr: self.dr,
            tsc_offset: self.tsc_offset,
            clock_counts_instructions: self.clock_counts_instructions,
            idle_ns: self.idle_ns,
            boot: self.boot,
            clock_base_ns: self.clock_base_ns,
            halted: false,
            int_shadow: false,
            ram,
            board: self.board.clone(),
            retired: 0,
            page_faults: 0,
            slow_accesses: 0,
            touched: ([(0, false); 2], 0),
            fpu: self.fpu.clone(),
            watchpoints: Vec::new(),
            watch_hit: None,
        }
    }
}

/// A debugger's watchpoint: data accesses to `[addr, addr + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watchpoint {
    /// The first linear address watched.
    pub addr: u32,
    /// How many bytes.
    pub len: u32,
    /// Do reads hit it?
    pub read: bool,
    /// Do writes hit it?
    pub write: bool,
}

impl Vcpu {
    /// A CPU in the state after RESET (Intel SDM Vol. 3 §9.1.1), except that
    /// popek has no real mode: the machine loader puts it into protected mode.
    pub fn new(ram: GuestRam) -> Vcpu {
        let data = Segment {
            selector: 0,
            base: 0,
            limit: 0xFFFF,
            attr: attr::P | attr::S | attr::RW | attr::ACCESSED,
        };
        let mut segs = [data; 6];
        segs[SegReg::Cs as usize] = Segment {
            selector: 0xF000,
            base: 0xFFFF_0000,
            limit: 0xFFFF,
            attr: attr::P | attr::S | attr::CODE | attr::RW | attr::ACCESSED,
        };
        Vcpu {
            regs: [0; 8],
            eip: 0xFFF0,
            eflags: flags::FIXED1,
            segs,
            gdtr: TableReg {
                base: 0,
                limit: 0xFFFF,
            },
            idtr: TableReg {
                base: 0,
                limit: 0xFFFF,
            },
            ldtr: Segment::default(),
            tr: Segment::default(),
            cr0: cr0::ET | cr0::CD | cr0::NW,
            cr2: 0,
            fault_cr2: 0,
            cr3: 0,
            cr4: 0,
            dr: [0, 0, 0, 0, 0, 0, 0xFFFF_0FF0, 0x400],
            tsc_offset: 0,
            clock_counts_instructions: false,
            idle_ns: 0,
            boot: std::time::Instant::now(),
            clock_base_ns: 0,
            halted: false,
            int_shadow: false,
            ram,
            board: Board::new(),
            retired: 0,
            page_faults: 0,
            slow_accesses: 0,
            touched: ([(0, false); 2], 0),
            fpu: crate::x87::Fpu::default(),
            watchpoints: Vec::new(),
            watch_hit: None,
        }
    }

    /// Current privilege level: the RPL of CS in protected mode.
    #[inline]
    pub fn cpl(&self) -> u8 {
        (self.segs[SegReg::Cs as usize].selector & 3) as u8
    }

    /// I/O privilege level from EFLAGS.
    #[inline]
    pub fn iopl(&self) -> u8 {
        ((self.eflags >> 12) & 3) as u8
    }

    /// A segment register's cache.
    #[inline]
    pub fn seg(&self, s: SegReg) -> &Segment {
        &self.segs[s as usize]
    }

    /// Is the default operand size of the current code segment 32 bits?
    #[inline]
    pub fn code32(&self) -> bool {
        self.segs[SegReg::Cs as usize].big()
    }

    /// Is paging enabled?
    #[inline]
    pub fn paging(&self) -> bool {
        self.cr0 & cr0::PG != 0
    }

    /// The machine's time in ns since it was created: host monotonic
    /// time, or the instruction clock ([`Vcpu::clock_counts_instructions`]).
    /// Devices (timers, the RTC) run on it.
    pub fn now_ns(&self) -> u64 {
        if self.clock_counts_instructions {
            self.retired + self.idle_ns
        } else {
            self.clock_base_ns + self.boot.elapsed().as_nanos() as u64
        }
    }

    /// What the guest TSC counts: the host TSC, or the instruction clock.
    fn tsc_clock(&self) -> u64 {
        if self.clock_counts_instructions {
            self.now_ns()
        } else {
            host_tsc()
        }
    }

    /// Set the machine time (ns) from now on: the clock goes on from `ns`
    /// (a machine resumed from a snapshot, or continued after a pause).
    pub fn set_now_ns(&mut self, ns: u64) {
        if self.clock_counts_instructions {
            self.idle_ns = ns.saturating_sub(self.retired);
        } else {
            self.boot = std::time::Instant::now();
            self.clock_base_ns = ns;
        }
    }

    /// The guest's time-stamp counter.
    pub fn tsc(&self) -> u64 {
        self.tsc_clock().wrapping_add(self.tsc_offset)
    }

    /// Set the guest's time-stamp counter.
    pub fn set_tsc(&mut self, v: u64) {
        self.tsc_offset = v.wrapping_sub(self.tsc_clock());
    }

    /// A one-line summary of the registers, for error reports.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for (i, n) in reg::NAMES.iter().enumerate() {
            s.push_str(&format!("{n}={:08x} ", self.regs[i]));
        }
        s.push_str(&format!(
            "eip={:08x} eflags={:08x} cs={:04x} ss={:04x} cpl={}",
            self.eip,
            self.eflags,
            self.segs[1].selector,
            self.segs[2].selector,
            self.cpl()
        ));
        s
    }
}

/// The host's time-stamp counter.
pub fn host_tsc() -> u64 {
    // SAFETY: RDTSC has no preconditions on x86-64; it only reads the counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Nanoseconds per tick of the host's time-stamp counter, measured once
/// per process against the monotonic clock over 50 us (a span timed with
/// two RDTSCs costs a few nanoseconds, with `Instant` two system-clock
/// reads; the counter runs at a constant rate on the hosts popek runs on).
pub fn host_tsc_ns_per_tick() -> f64 {
    static RATIO: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *RATIO.get_or_init(|| {
        let (t0, c0) = (std::time::Instant::now(), host_tsc());
        loop {
            let ns = t0.elapsed().as_nanos();
            if ns >= 50_000 {
                let ticks = host_tsc().wrapping_sub(c0).max(1);
                break ns as f64 / ticks as f64;
            }
        }
    })
}
