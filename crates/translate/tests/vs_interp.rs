//! The translator against the reference interpreter: random sequences from
//! the differential harness's generator, restricted to the groups whose
//! instructions are all copied, run as host code on the guest window and
//! by the interpreter from the same state. Registers, the defined flags and
//! the scratch memory must agree.

use popek_decode::{classify, Class};
use popek_difftest::gen::{self, Case, SCRATCH};
use popek_memory::GuestRam;
use popek_translate::abi::{Context, HOST_FLAGS};
use popek_translate::emit::HostBlock;
use popek_translate::host::set_gs_base;
use popek_translate::lower::lower_innocuous;
use popek_translate::{lower, Lowering};
use popek_vcpu::{attr, reg, SegReg, Segment, Vcpu};

const SCRATCH_AT: u32 = 0x4000;
const CODE_AT: u32 = 0x10000;

/// Keep the groups whose instructions are all copyable; return the guest
/// bytes and the host bytes. Odd seeds take the translator's fast path
/// (the guest's own bytes behind `gs addr32`), even seeds the encoder.
fn copyable(case: &Case, seed: u64) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut guest = Vec::new();
    let mut host = Vec::new();
    let fast = seed % 2 == 1;
    for g in &case.groups {
        let lowered: Option<Vec<Vec<u8>>> = g
            .iter()
            .map(|b| {
                let ins = gen::decode(b);
                let l = if fast && classify(&ins) == Class::Innocuous {
                    lower_innocuous(&ins, Some(b))
                } else {
                    lower(&ins)
                };
                match l {
                    Lowering::Copied(h) => Some(h),
                    Lowering::NotCopyable(_) => None,
                }
            })
            .collect();
        if let Some(h) = lowered {
            guest.extend(g.iter().cloned());
            host.extend(h);
        }
    }
    (guest, host)
}

fn initial_regs(case: &Case) -> [u32; 8] {
    let mut regs = case.regs;
    regs[reg::EBX] = SCRATCH_AT;
    regs[reg::ESP] = 0x8000;
    regs
}

fn interp(case: &Case, guest: &[Vec<u8>]) -> (Context, Vec<u8>) {
    let mut cpu = Vcpu::new(GuestRam::new(1 << 20).unwrap());
    cpu.enter_flat_protected_mode(0x08, 0x10);
    for s in SegReg::ALL {
        let a = cpu.segs[s as usize].attr;
        cpu.segs[s as usize] =
            Segment::flat(if s == SegReg::Cs { 0x08 } else { 0x10 }, a | attr::P);
    }
    cpu.regs = initial_regs(case);
    cpu.eflags = 2 | (case.flags & HOST_FLAGS);
    cpu.ram.load(SCRATCH_AT, &case.scratch);
    let code: Vec<u8> = guest.concat();
    cpu.ram.load(CODE_AT, &code);
    cpu.eip = CODE_AT;
    let end = CODE_AT + code.len() as u32;
    while cpu.eip != end {
        let step = popek_interp::step(&mut cpu);
        assert_eq!(
            step,
            popek_interp::Step::Executed,
            "interpreter at {:#x}",
            cpu.eip
        );
    }
    let ctx = Context {
        regs: cpu.regs,
        eflags: cpu.eflags,
        ..Context::default()
    };
    (
        ctx,
        cpu.ram.as_slice()[SCRATCH_AT as usize..(SCRATCH_AT + SCRATCH) as usize].to_vec(),
    )
}

fn translated(case: &Case, host: &[Vec<u8>]) -> (Context, Vec<u8>) {
    let mut ram = GuestRam::new(1 << 20).unwrap();
    ram.load(SCRATCH_AT, &case.scratch);
    let base = ram.window().unwrap().base();
    set_gs_base(base).unwrap();
    let mut buf = popek_translate::host::CodeBuffer::new(1 << 20).unwrap();
    let code = HostBlock::compile(&mut buf, host.iter().map(|b| &b[..])).unwrap();
    let mut ctx = Context {
        regs: initial_regs(case),
        eflags: 2 | (case.flags & HOST_FLAGS),
        ..Context::default()
    };
    popek_translate::host::fault::install();
    // SAFETY: GS base is this RAM's window and the fault handler is
    // installed; the code comes from `lower`.
    unsafe { code.run(&buf, &mut ctx) };
    (
        ctx,
        ram.as_slice()[SCRATCH_AT as usize..(SCRATCH_AT + SCRATCH) as usize].to_vec(),
    )
}

#[test]
fn copied_code_agrees_with_the_interpreter() {
    let mut compared = 0;
    let mut instructions = 0;
    for seed in 1..=3000u64 {
        if seed % 4 == 0 {
            continue; // exceptions-mode cases end in a fault
        }
        let case = gen::generate(seed, 20);
        let (guest, host) = copyable(&case, seed);
        if guest.is_empty() || gen::reads_undefined_flag(&guest) {
            continue;
        }
        let kept = Case {
            groups: vec![guest.clone()],
            ..case.clone()
        };
        let (want, want_mem) = interp(&kept, &guest);
        let (got, got_mem) = translated(&kept, &host);
        let mask = HOST_FLAGS & !gen::undefined_at_end(&kept);
        let mut w = want;
        let mut g = got;
        w.regs[reg::ESP] = 0;
        g.regs[reg::ESP] = 0;
        assert_eq!(
            g.regs,
            w.regs,
            "seed {seed}: registers\n{}",
            popek_difftest::report(&kept, "translated vs interp")
        );
        assert_eq!(g.eflags & mask, w.eflags & mask, "seed {seed}: flags");
        assert_eq!(got_mem, want_mem, "seed {seed}: scratch memory");
        compared += 1;
        instructions += guest.len();
    }
    assert!(
        compared > 1500 && instructions > 15_000,
        "{compared} cases, {instructions} instructions"
    );
}
