//! `--engine trap`: a classic trap-and-emulate monitor, the design that
//! x86 defeats (Popek & Goldberg, CACM 17(7), 1974; Adams & Agesen,
//! ASPLOS 2006, section 2).
//!
//! The guest's kernel runs *deprivileged*: as hardware would run it under
//! such a monitor, at CPL 3 with IOPL 0, the host's IF set, and the
//! monitor's own GDT, IDT, LDT, task register and CR0 loaded. Each guest
//! instruction is classified (popek-decode's table, [`AtRing3`]):
//!
//! - **Traps** (privileged: CLI, STI, HLT, IN/OUT, LGDT, MOV CRn, ...) and
//!   **Sometimes** (segment loads, far transfers, INT n: a kernel's DPL-0
//!   selectors and gates fail their checks at CPL 3): the CPU raises #GP,
//!   the monitor catches it, counts it and emulates the instruction on the
//!   virtual CPU, with the virtual CPU's semantics (the interpreter: the
//!   same routines as everywhere else).
//! - **Silent** (sensitive but unprivileged): no trap. The instruction runs
//!   with its ring-3 behaviour on the real machine state: PUSHF shows the
//!   real IF (1) and IOPL (0); POPF and IRET silently keep IF and IOPL;
//!   SGDT, SIDT, SLDT, STR and SMSW reveal the monitor's registers
//!   ([`VMM_GDTR`], [`VMM_IDTR`], [`VMM_LDTR`], [`VMM_TR`], [`VMM_CR0`]);
//!   MOV from CS/SS and PUSH CS/SS show RPL 3; LAR, LSL, VERR and VERW do
//!   their checks at CPL 3, so the kernel's DPL-0 descriptors fail them.
//!   CPUID and RDTSC run without a trap too; popek still shows its virtual
//!   CPU and TSC there (a real monitor could hide neither; programs pick
//!   code paths by CPUID, and popek executes only its own model's).
//!   Every such execution is a Popek–Goldberg violation the monitor never
//!   sees; [`TrapStats`] records them with the EIP of the first.
//!
//! Everything else is innocuous and runs as it is (on the interpreter).
//! The monitor's shadow page tables are taken to map the kernel's pages
//! for CPL 3, so deprivileging adds no page faults.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use iced_x86::{Instruction, OpKind, Register};
use popek_decode::{AtRing3, Special};
use popek_interp::operand::{effective_address, seg_of};
use popek_interp::Step;
use popek_vcpu::{flags, SegReg, TableReg, Vcpu};

/// The monitor's GDTR, which SGDT reveals to a deprivileged kernel.
pub const VMM_GDTR: TableReg = TableReg {
    base: 0xFFC0_1000,
    limit: 0x00FF,
};
/// The monitor's IDTR, which SIDT reveals.
pub const VMM_IDTR: TableReg = TableReg {
    base: 0xFFC0_2000,
    limit: 0x07FF,
};
/// The monitor's LDT selector, which SLDT reveals.
pub const VMM_LDTR: u16 = 0x0038;
/// The monitor's task register selector, which STR reveals.
pub const VMM_TR: u16 = 0x0030;
/// The real CR0 (PE, MP, ET, NE, WP, AM, PG: a Linux host's), whose low
/// 16 bits SMSW reveals.
pub const VMM_CR0: u32 = 0x8005_0033;

/// One kind of trapping instruction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TrapCount {
    /// Traps taken.
    pub count: u64,
    /// Host time spent emulating them (the monitor's side of each trap;
    /// the hardware round trip is benches/programs/trap_cost.c's figure).
    pub emulation: Duration,
    /// EIP of the first.
    pub first_eip: u32,
}

/// One kind of sensitive instruction that ran without trapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    /// Its kind.
    pub kind: Special,
    /// Executions.
    pub count: u64,
    /// EIP of the first.
    pub first_eip: u32,
}

/// What the monitor saw, and what it did not.
#[derive(Debug, Default, Clone)]
pub struct TrapStats {
    /// Traps, by kind of instruction.
    pub traps: BTreeMap<Special, TrapCount>,
    /// Popek–Goldberg violations observed, by kind of instruction.
    pub violations: BTreeMap<Special, Violation>,
}

/// The trap-and-emulate engine.
#[derive(Debug, Default)]
pub struct Trap {
    /// Counters.
    pub stats: TrapStats,
}

/// The segment register an instruction reads (MOV r/m, Sreg; PUSH Sreg).
fn seg_source(ins: &Instruction, sp: Special) -> Option<SegReg> {
    let r = match sp {
        Special::MovFromSeg => ins.op1_register(),
        Special::PushSeg => ins.op0_register(),
        _ => return None,
    };
    (r != Register::None).then(|| seg_of(r))
}

impl Trap {
    /// A new engine.
    pub fn new() -> Trap {
        Trap::default()
    }

    /// Execute one guest instruction deprivileged.
    pub fn step(&mut self, cpu: &mut Vcpu) -> Step {
        if cpu.halted {
            return popek_interp::step(cpu);
        }
        let eip = cpu.eip;
        let mut buf = [0u8; popek_decode::MAX_INSN_LEN];
        let (n, _) = cpu.fetch(eip, &mut buf);
        let ins = popek_decode::decode_one(&buf[..n], eip, if cpu.code32() { 32 } else { 16 });
        let special = if ins.is_invalid() {
            None
        } else {
            popek_decode::special(&ins)
        };
        let Some(sp) = special else {
            // Innocuous (or not decodable: the interpreter raises the fault).
            return popek_interp::step(cpu);
        };
        match sp.info().at_ring3 {
            AtRing3::Traps | AtRing3::Sometimes => {
                let t = Instant::now();
                let s = popek_interp::step_decoded(cpu, &ins);
                let e = self.stats.traps.entry(sp).or_insert(TrapCount {
                    first_eip: eip,
                    ..TrapCount::default()
                });
                e.count += 1;
                e.emulation += t.elapsed();
                s
            }
            AtRing3::Silent => {
                let v = self.stats.violations.entry(sp).or_insert(Violation {
                    kind: sp,
                    count: 0,
                    first_eip: eip,
                });
                v.count += 1;
                at_ring3(cpu, &ins, sp)
            }
        }
    }
}

/// What a special instruction does under `--engine trap` (for `popek
/// classify` and `--stats`).
pub fn under_trap(sp: Special) -> &'static str {
    use Special as S;
    match sp {
        S::Pushf => "pushes the real IF (1) and IOPL (0), not the kernel's",
        S::Popf => "silently keeps IF and IOPL: the kernel's CLI-by-POPF or IOPL change is lost",
        S::Iret => "silently keeps IF and IOPL",
        S::Sgdt => "stores the monitor's GDTR",
        S::Sidt => "stores the monitor's IDTR",
        S::Sldt => "stores the monitor's LDT selector",
        S::Str => "stores the monitor's task register selector",
        S::Smsw => "stores the real CR0's low bits",
        S::MovFromSeg | S::PushSeg => "shows RPL 3 for CS and SS (the real CPL)",
        S::Lar | S::Lsl | S::Verr | S::Verw => {
            "checks at CPL 3: the kernel's DPL-0 descriptors fail (ZF=0)"
        }
        S::Cpuid => "runs without a trap (popek still shows its virtual CPU)",
        S::Rdtsc => "runs without a trap (popek still shows its virtual TSC)",
        _ => match sp.info().at_ring3 {
            AtRing3::Traps => "#GP: the monitor catches it and emulates it on the virtual CPU",
            _ => "#GP (a DPL-0 selector or gate at CPL 3): the monitor emulates it",
        },
    }
}

/// A sensitive, unprivileged instruction with its CPL-3 behaviour on the
/// real machine state: the interpreter runs it with the real values in
/// place of the virtual ones, and the virtual ones go back after.
fn at_ring3(cpu: &mut Vcpu, ins: &Instruction, sp: Special) -> Step {
    let real_flags = |f: u32| (f & !(flags::IF | flags::IOPL)) | flags::IF;
    match sp {
        Special::Pushf => {
            let virt = cpu.eflags;
            cpu.eflags = real_flags(virt);
            let s = popek_interp::step_decoded(cpu, ins);
            cpu.eflags =
                (cpu.eflags & !(flags::IF | flags::IOPL)) | (virt & (flags::IF | flags::IOPL));
            s
        }
        Special::Popf | Special::Iret => {
            // At CPL 3 with IOPL 0 both keep IF and IOPL, silently (a
            // delivered exception sets the flags itself).
            let kept = cpu.eflags & (flags::IF | flags::IOPL);
            let before = cpu.retired;
            let s = popek_interp::step_decoded(cpu, ins);
            if cpu.retired != before {
                cpu.eflags = (cpu.eflags & !(flags::IF | flags::IOPL)) | kept;
            }
            s
        }
        Special::Sgdt | Special::Sidt => {
            let (g, i) = (cpu.gdtr, cpu.idtr);
            cpu.gdtr = VMM_GDTR;
            cpu.idtr = VMM_IDTR;
            let s = popek_interp::step_decoded(cpu, ins);
            cpu.gdtr = g;
            cpu.idtr = i;
            s
        }
        Special::Sldt | Special::Str => {
            let (l, t) = (cpu.ldtr.selector, cpu.tr.selector);
            cpu.ldtr.selector = VMM_LDTR;
            cpu.tr.selector = VMM_TR;
            let s = popek_interp::step_decoded(cpu, ins);
            cpu.ldtr.selector = l;
            cpu.tr.selector = t;
            s
        }
        Special::Smsw => {
            let c = cpu.cr0;
            cpu.cr0 = (c & !0xFFFF) | (VMM_CR0 & 0xFFFF);
            let s = popek_interp::step_decoded(cpu, ins);
            cpu.cr0 = c;
            s
        }
        Special::MovFromSeg | Special::PushSeg => {
            // CS and SS hold the CPL in their RPL: 3. (Changing CS's
            // selector would change the CPL of the access itself, so the
            // stored value is fixed up after the instruction.)
            let seg = seg_source(ins, sp);
            let dest = (sp == Special::MovFromSeg && ins.op0_kind() == OpKind::Memory)
                .then(|| (seg_of(ins.memory_segment()), effective_address(cpu, ins)));
            let before = cpu.retired;
            let s = popek_interp::step_decoded(cpu, ins);
            if matches!(seg, Some(SegReg::Cs | SegReg::Ss)) && cpu.retired != before {
                let esp = cpu.regs[popek_vcpu::reg::ESP];
                let fix = match (sp, dest) {
                    (Special::PushSeg, _) => Some((SegReg::Ss, esp)),
                    (_, Some(at)) => Some(at),
                    _ => {
                        let r = ins.op0_register();
                        let v = popek_interp::operand::get_reg(cpu, r);
                        popek_interp::operand::set_reg(cpu, r, v | 3);
                        None
                    }
                };
                if let Some((s, off)) = fix {
                    // The instruction has just written there: this cannot fault.
                    if let Ok(v) = cpu.read_mem(s, off, 2) {
                        let _ = cpu.write_mem(s, off, 2, v | 3);
                    }
                }
            }
            s
        }
        Special::Lar | Special::Lsl | Special::Verr | Special::Verw => {
            // The descriptor checks at CPL 3 (the monitor's segments).
            let cs = cpu.segs[SegReg::Cs as usize].selector;
            cpu.segs[SegReg::Cs as usize].selector = cs | 3;
            let s = popek_interp::step_decoded(cpu, ins);
            if cpu.segs[SegReg::Cs as usize].selector == cs | 3 {
                cpu.segs[SegReg::Cs as usize].selector = cs;
            }
            s
        }
        _ => popek_interp::step_decoded(cpu, ins),
    }
}
