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

use iced_x86::{Instruction, OpKind};
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
        S::Vmcall => "#UD at CPL 3 (no VMX): the monitor catches it and makes the hypercall",
        _ => match sp.info().at_ring3 {
            AtRing3::Traps => "#GP: the monitor catches it and emulates it on the virtual CPU",
            _ => "#GP (a DPL-0 selector or gate at CPL 3): the monitor emulates it",
        },
    }
}

/// Replace the value a push has just written at SS:ESP by `f` of it (the
/// push wrote there: this cannot fault).
fn rewrite_pushed(cpu: &mut Vcpu, ins: &Instruction, f: impl Fn(u32) -> u32) {
    let esp = cpu.regs[popek_vcpu::reg::ESP];
    let size = ins.stack_pointer_increment().unsigned_abs();
    if let Ok(v) = cpu.read_mem(SegReg::Ss, esp, size) {
        let _ = cpu.write_mem(SegReg::Ss, esp, size, u64::from(f(v as u32)));
    }
}

/// A sensitive, unprivileged instruction with its CPL-3 behaviour on the
/// real machine state. The interpreter runs it; where it stores what the
/// real machine would show (a table register, a selector, the MSW), the
/// stored value is replaced once the instruction has completed. Nothing
/// virtual is swapped out while an exception could be delivered (a fault
/// goes through the guest's own tables and flags).
fn at_ring3(cpu: &mut Vcpu, ins: &Instruction, sp: Special) -> Step {
    let before = cpu.retired;
    let kept = cpu.eflags & (flags::IF | flags::IOPL);
    let dest = (ins.op0_kind() == OpKind::Memory)
        .then(|| (seg_of(ins.memory_segment()), effective_address(cpu, ins)));
    if matches!(
        sp,
        Special::Lar | Special::Lsl | Special::Verr | Special::Verw
    ) {
        // The descriptor checks at CPL 3. A selector operand in memory is
        // read first: if that faults, the fault is delivered at CPL 0.
        let src = if matches!(sp, Special::Verr | Special::Verw) {
            0
        } else {
            1
        };
        let loc = popek_interp::operand::loc(cpu, ins, src);
        if popek_interp::operand::read_loc(cpu, loc, 2).is_err() {
            return popek_interp::step_decoded(cpu, ins);
        }
        let cs = cpu.segs[SegReg::Cs as usize].selector;
        cpu.segs[SegReg::Cs as usize].selector = cs | 3;
        let s = popek_interp::step_decoded(cpu, ins);
        cpu.segs[SegReg::Cs as usize].selector = cs;
        return s;
    }
    let s = popek_interp::step_decoded(cpu, ins);
    if cpu.retired == before {
        return s; // a fault was delivered, with the guest's own state
    }
    // What the real machine shows, stored where the instruction stored.
    let store16 = |cpu: &mut Vcpu, v: u32| match dest {
        Some((seg, off)) => {
            // The instruction has just written there: this cannot fault.
            let _ = cpu.write_mem(seg, off, 2, u64::from(v));
        }
        None => {
            let r = ins.op0_register();
            popek_interp::operand::set_reg(cpu, r, v);
        }
    };
    match sp {
        // The image shows the real IF (1) and IOPL (0).
        Special::Pushf => {
            rewrite_pushed(cpu, ins, |v| (v & !(flags::IF | flags::IOPL)) | flags::IF)
        }
        // At CPL 3 with IOPL 0 both keep IF and IOPL, silently.
        Special::Popf | Special::Iret => {
            cpu.eflags = (cpu.eflags & !(flags::IF | flags::IOPL)) | kept;
        }
        Special::Sgdt | Special::Sidt => {
            let t = if sp == Special::Sgdt {
                VMM_GDTR
            } else {
                VMM_IDTR
            };
            if let Some((seg, off)) = dest {
                let _ = cpu.write_mem(seg, off, 2, u64::from(t.limit));
                let _ = cpu.write_mem(seg, off.wrapping_add(2), 4, u64::from(t.base));
            }
        }
        Special::Sldt => store16(cpu, u32::from(VMM_LDTR)),
        Special::Str => store16(cpu, u32::from(VMM_TR)),
        Special::Smsw => {
            // A 32-bit register receives CR0 whole (docs/quirks.md).
            let v = if dest.is_none() && ins.op0_register().size() == 4 {
                VMM_CR0
            } else {
                VMM_CR0 & 0xFFFF
            };
            store16(cpu, v);
        }
        // CS and SS hold the CPL in their RPL: 3.
        Special::MovFromSeg => {
            let seg = seg_of(ins.op1_register());
            if matches!(seg, SegReg::Cs | SegReg::Ss) {
                store16(cpu, u32::from(cpu.seg(seg).selector) | 3);
            }
        }
        Special::PushSeg if matches!(seg_of(ins.op0_register()), SegReg::Cs | SegReg::Ss) => {
            rewrite_pushed(cpu, ins, |v| v | 3)
        }
        _ => {}
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use popek_memory::GuestRam;
    use popek_vcpu::{attr, Segment};

    /// A flat ring-0 CPU with a GDT at 0x500 (null, code 0x08, data 0x10)
    /// and an IDT at 0x600 whose gates all lead to 0x08:0x1000; `code` at
    /// 0x2000.
    fn cpu_with(code: &[u8]) -> Vcpu {
        let mut c = Vcpu::new(GuestRam::new(1 << 20).unwrap());
        c.enter_flat_protected_mode(0x08, 0x10);
        for s in SegReg::ALL {
            let a = c.segs[s as usize].attr;
            let sel = if s == SegReg::Cs { 0x08 } else { 0x10 };
            c.segs[s as usize] = Segment::flat(sel, a | attr::P);
        }
        c.ram.write(0x508, 8, 0x00CF_9A00_0000_FFFF);
        c.ram.write(0x510, 8, 0x00CF_9200_0000_FFFF);
        c.gdtr = TableReg {
            base: 0x500,
            limit: 23,
        };
        for v in 0..256u32 {
            c.ram.write(0x600 + 8 * v, 8, 0x0000_8E00_0008_1000);
        }
        c.idtr = TableReg {
            base: 0x600,
            limit: 0x7FF,
        };
        c.regs[popek_vcpu::reg::ESP] = 0x8000;
        c.ram.load(0x2000, code);
        c.eip = 0x2000;
        c
    }

    const SGDT_0X3000: [u8; 7] = [0x0F, 0x01, 0x05, 0x00, 0x30, 0x00, 0x00];

    #[test]
    fn sgdt_stores_the_monitors_gdtr_and_keeps_the_guests() {
        let mut cpu = cpu_with(&SGDT_0X3000);
        let mut t = Trap::new();
        assert_eq!(t.step(&mut cpu), Step::Executed);
        assert_eq!(cpu.ram.read(0x3000, 2), u64::from(VMM_GDTR.limit));
        assert_eq!(cpu.ram.read(0x3002, 4), u64::from(VMM_GDTR.base));
        assert_eq!((cpu.gdtr.base, cpu.gdtr.limit), (0x500, 23));
        assert_eq!(t.stats.violations[&Special::Sgdt].first_eip, 0x2000);
        assert!(t.stats.traps.is_empty());
    }

    #[test]
    fn a_faulting_sensitive_instruction_is_delivered_through_the_guests_tables() {
        // DS limit 0xFFF: SGDT to 0x3000 raises #GP(0), which must go
        // through the guest's IDT and GDT (not the monitor's) to 0x1000.
        let mut cpu = cpu_with(&SGDT_0X3000);
        cpu.segs[SegReg::Ds as usize].limit = 0xFFF;
        let mut t = Trap::new();
        assert_eq!(t.step(&mut cpu), Step::Executed);
        assert_eq!(cpu.eip, 0x1000);
        assert_eq!(cpu.cpl(), 0);
        assert_eq!(cpu.ram.read(0x3000, 4), 0, "nothing stored");
        assert_eq!((cpu.gdtr.base, cpu.idtr.base), (0x500, 0x600));
    }

    #[test]
    fn privileged_instructions_trap_and_are_emulated_on_the_virtual_cpu() {
        // cli; pushfd: CLI traps (the virtual IF is cleared), PUSHFD does
        // not and shows the real IF.
        let mut cpu = cpu_with(&[0xFA, 0x9C]);
        cpu.eflags |= flags::IF;
        let mut t = Trap::new();
        t.step(&mut cpu);
        t.step(&mut cpu);
        assert_eq!(
            cpu.eflags & flags::IF,
            0,
            "virtual IF cleared by the emulated CLI"
        );
        assert_ne!(
            cpu.ram.read(0x7FFC, 4) as u32 & flags::IF,
            0,
            "PUSHF shows the real IF"
        );
        assert_eq!(t.stats.traps[&Special::Cli].count, 1);
        assert_eq!(t.stats.violations[&Special::Pushf].count, 1);
    }
}
