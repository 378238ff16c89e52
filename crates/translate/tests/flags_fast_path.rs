//! PUSHFD, POPFD, CLI and STI in translated code (the fast path on the
//! virtual flags at CPL 0, the helper elsewhere) against the interpreter,
//! which runs `Vcpu::popf`, `Vcpu::pushf`, `Vcpu::cli` and `Vcpu::sti`:
//! many random flag images, at CPL 0 and CPL 3, with IOPL 0 and 3.

use popek_memory::GuestRam;
use popek_translate::Bt;
use popek_vcpu::{flags, reg, Vcpu};

const CODE_AT: u32 = 0x10000;

/// `push image; popfd; pushfd; pop eax;` then, with `cli_sti`,
/// `cli; pushfd; pop ebx; sti; nop; pushfd; pop ecx;` then `jmp $`.
/// Returns the code and the number of instructions before the JMP.
fn code(image: u32, cli_sti: bool) -> (Vec<u8>, u64) {
    let mut c = vec![0x68];
    c.extend(image.to_le_bytes());
    c.extend([0x9D, 0x9C, 0x58]);
    let mut n = 4;
    if cli_sti {
        c.extend([0xFA, 0x9C, 0x5B, 0xFB, 0x90, 0x9C, 0x59]);
        n += 7;
    }
    c.extend([0xEB, 0xFE]);
    (c, n)
}

fn machine(code: &[u8], cpl: u16, iopl: u32, start_flags: u32) -> Vcpu {
    let mut cpu = Vcpu::new(GuestRam::new(1 << 20).unwrap());
    cpu.enter_flat_protected_mode(0x08 | cpl, 0x10 | cpl);
    cpu.regs[reg::ESP] = 0x8000;
    cpu.eflags =
        (start_flags & (flags::WRITABLE | flags::VIF | flags::VIP) & !(flags::TF | flags::IOPL))
            | flags::FIXED1
            | iopl << 12;
    cpu.eip = CODE_AT;
    assert!(cpu.ram.load(CODE_AT, code));
    cpu
}

#[test]
fn fast_path_agrees_with_the_vcpu_methods() {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u32
    };
    let mut bt = Bt::new(None);
    let mut cases = 0;
    for round in 0..400 {
        for (cpl, iopl) in [(0u16, 0u32), (0, 3), (3, 0), (3, 3)] {
            // Every bit of the image at random but TF (single-stepping is
            // the helper's and is covered by the popf guest against QEMU).
            let image = next() & !flags::TF;
            let start = next();
            // CLI/STI at CPL 3 need IOPL 3 (else #GP, with no IDT here).
            let cli_sti = cpl == 0 || iopl == 3;
            let (c, n) = code(image, cli_sti);
            let mut a = machine(&c, cpl, iopl, start);
            let mut b = machine(&c, cpl, iopl, start);
            bt.flush();
            bt.step_within(&mut a, 1);
            for _ in 0..=n {
                popek_interp::step(&mut b);
            }
            let what = format!(
                "round {round}: CPL {cpl} IOPL {iopl} image {image:#010x} start {:#010x}",
                machine(&c, cpl, iopl, start).eflags
            );
            assert_eq!(a.eip, b.eip, "{what}");
            assert_eq!(a.regs, b.regs, "{what}");
            assert_eq!(a.eflags, b.eflags, "{what}");
            assert_eq!(a.retired, b.retired, "{what}");
            for at in [0x7FF0, 0x7FF8] {
                assert_eq!(a.ram.read(at, 8), b.ram.read(at, 8), "{what}");
            }
            cases += 1;
        }
    }
    assert_eq!(cases, 1600);
    // The blocks ran in host code (not instruction by instruction in the
    // dispatcher), and at CPL 3 the helper was called.
    assert!(bt.stats.insns_native > 1600 * 4, "{:?}", bt.stats);
    assert!(bt.stats.special_calls > 0, "{:?}", bt.stats);
}
