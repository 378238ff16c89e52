//! Test support: run a snippet assembled with iced's code assembler on a
//! flat ring-0 CPU until it executes HLT.

use iced_x86::code_asm::CodeAssembler;
use popek_memory::GuestRam;
use popek_vcpu::{attr, reg, SegReg, Segment, Vcpu};

use crate::{step, Step};

/// Where snippets are loaded.
pub const CODE: u32 = 0x1000;
/// Initial ESP.
pub const STACK: u32 = 0x8000;

/// A flat 32-bit ring-0 CPU with 1 MiB of RAM.
pub fn flat_cpu() -> Vcpu {
    let mut c = Vcpu::new(GuestRam::new(1 << 20).unwrap());
    c.enter_flat_protected_mode(0x08, 0x10);
    for s in SegReg::ALL {
        let a = c.segs[s as usize].attr;
        c.segs[s as usize] = Segment::flat(if s == SegReg::Cs { 0x08 } else { 0x10 }, a | attr::P);
    }
    c.regs[reg::ESP] = STACK;
    c.eip = CODE;
    c
}

/// A flat CPU with a GDT at 0x500 (null, flat ring-0 code 0x08, flat
/// ring-0 data 0x10) and an IDT at 0x600 whose 256 interrupt gates all lead
/// to 0x08:0x1000.
pub fn sandbox_cpu() -> Vcpu {
    let mut cpu = flat_cpu();
    cpu.ram.write(0x500, 8, 0);
    cpu.ram.write(0x508, 8, 0x00CF_9A00_0000_FFFF);
    cpu.ram.write(0x510, 8, 0x00CF_9200_0000_FFFF);
    cpu.gdtr.base = 0x500;
    cpu.gdtr.limit = 23;
    for v in 0..256u32 {
        cpu.ram.write(0x600 + 8 * v, 8, 0x0000_8E00_0008_1000);
    }
    cpu.idtr.base = 0x600;
    cpu.idtr.limit = 0x7FF;
    cpu
}

/// Assemble `f`'s code followed by HLT, run it on `cpu`, return the CPU.
pub fn run_on(mut cpu: Vcpu, f: impl FnOnce(&mut CodeAssembler)) -> Vcpu {
    let mut a = CodeAssembler::new(32).unwrap();
    f(&mut a);
    a.hlt().unwrap();
    let code = a.assemble(u64::from(CODE)).unwrap();
    cpu.ram.load(CODE, &code);
    for _ in 0..1_000_000 {
        match step(&mut cpu) {
            Step::Executed => {}
            Step::Halted => return cpu,
            Step::Stop(s) => panic!("stopped: {s:?}"),
        }
    }
    panic!("snippet did not halt");
}

/// Run a snippet on a fresh flat CPU.
pub fn run(f: impl FnOnce(&mut CodeAssembler)) -> Vcpu {
    run_on(flat_cpu(), f)
}
