//! RDTSC in translated code: host code reads the host's time-stamp counter
//! and adds the guest's offset (EDX:EAX joined and split without touching
//! the guest's flags); under the instruction clock, or at CPL 3 with
//! CR4.TSD set, the helper runs `Vcpu::rdtsc`, as the interpreter does.

use popek_memory::GuestRam;
use popek_translate::Bt;
use popek_vcpu::state::{cr4, host_tsc};
use popek_vcpu::{flags, reg, Vcpu};

const CODE_AT: u32 = 0x10000;

/// `stc; rdtsc; mov esi, eax; mov edi, edx; rdtsc; jmp $`: five
/// instructions before the jump (which a block's one run retires too), CF
/// set before the reads.
const CODE: [u8; 12] = [
    0xF9, 0x0F, 0x31, 0x89, 0xC6, 0x89, 0xD7, 0x0F, 0x31, 0xEB, 0xFE, 0x90,
];

fn machine(cpl: u16) -> Vcpu {
    let mut cpu = Vcpu::new(GuestRam::new(1 << 20).unwrap());
    cpu.enter_flat_protected_mode(0x08 | cpl, 0x10 | cpl);
    cpu.regs[reg::ESP] = 0x8000;
    cpu.eip = CODE_AT;
    assert!(cpu.ram.load(CODE_AT, &CODE));
    cpu
}

fn tsc_pair(cpu: &Vcpu) -> (u64, u64) {
    let r = &cpu.regs;
    (
        u64::from(r[reg::EDI]) << 32 | u64::from(r[reg::ESI]),
        u64::from(r[reg::EDX]) << 32 | u64::from(r[reg::EAX]),
    )
}

#[test]
fn host_code_reads_the_guest_tsc() {
    let mut bt = Bt::new(None);
    // Offsets that carry from the low half into the high one and wrap.
    for start in [0, 0xFFFF_FFF0, 0x1234_5678_0000_0000, u64::MAX - 1000] {
        let mut cpu = machine(0);
        cpu.set_tsc(start);
        let before = cpu.tsc();
        bt.flush();
        bt.step_within(&mut cpu, 1);
        let after = cpu.tsc();
        let (first, second) = tsc_pair(&cpu);
        assert_eq!(cpu.eip, CODE_AT + 9, "start {start:#x}");
        assert!(
            first.wrapping_sub(before) <= after.wrapping_sub(before)
                && second.wrapping_sub(first) <= after.wrapping_sub(before),
            "start {start:#x}: {before:#x} <= {first:#x} <= {second:#x} <= {after:#x}"
        );
        assert_ne!(cpu.eflags & flags::CF, 0, "the carry flag survives");
        assert_eq!(cpu.retired, 6);
    }
    assert_eq!(bt.stats.special_calls, 0, "host code, no helper");
    // Host code reads the host's counter (the guest's with offset 0).
    let mut cpu = machine(0);
    cpu.tsc_offset = 0;
    let before = host_tsc();
    bt.flush();
    bt.step_within(&mut cpu, 1);
    assert!(tsc_pair(&cpu).0.wrapping_sub(before) <= host_tsc() - before);
}

#[test]
fn the_helper_reads_it_when_host_code_may_not() {
    let mut bt = Bt::new(None);
    // The instruction clock: the TSC is the instruction count.
    let mut a = machine(0);
    a.clock_counts_instructions = true;
    a.set_tsc(1000);
    let mut b = machine(0);
    b.clock_counts_instructions = true;
    b.set_tsc(1000);
    bt.step_within(&mut a, 1);
    for _ in 0..6 {
        popek_interp::step(&mut b);
    }
    assert_eq!((a.regs, a.retired), (b.regs, b.retired));
    // (Each read sees the instructions retired before it.)
    assert_eq!(tsc_pair(&a), (1001, 1004));
    assert_eq!(bt.stats.special_calls, 2);
    // CPL 3 with CR4.TSD: #GP (no IDT here: the run stops on both alike).
    let mut a = machine(3);
    a.cr4 |= cr4::TSD;
    let mut b = machine(3);
    b.cr4 |= cr4::TSD;
    bt.flush();
    let sa = bt.step_within(&mut a, 1);
    let sb = (0..2).map(|_| popek_interp::step(&mut b)).last().unwrap();
    assert_eq!(format!("{sa:?}"), format!("{sb:?}"));
    assert_eq!((a.eip, a.regs[reg::ESI]), (b.eip, b.regs[reg::ESI]));
}
