//! Unit tests of instruction semantics on tiny snippets. Expected values
//! come from the Intel SDM's definitions (computed here by other means),
//! not from running the interpreter.

use iced_x86::code_asm::*;
use popek_vcpu::flags::{CF, OF, ZF};
use popek_vcpu::reg::*;

use crate::testutil::{run, STACK};

#[test]
fn enter_leave_balance_the_stack() {
    let c = run(|a| {
        a.mov(ebp, 0x1234u32).unwrap();
        a.enter(16u32, 0u32).unwrap();
        a.mov(ebx, ebp).unwrap();
        a.leave().unwrap();
    });
    assert_eq!(c.regs[ESP], STACK);
    assert_eq!(c.regs[EBP], 0x1234);
    assert_eq!(c.regs[EBX], STACK - 4);
}

#[test]
fn shld_shrd_fill_from_the_source() {
    let c = run(|a| {
        a.mov(eax, 2u32).unwrap();
        a.mov(edx, 0x5555_5555u32).unwrap();
        a.mov(ecx, 2u32).unwrap();
        a.shrd(eax, edx, cl).unwrap();
        a.mov(ebx, 0x8000_0001u32).unwrap();
        a.shld(ebx, edx, cl).unwrap();
    });
    // (2 >> 2) | (0x55555555 << 30): the source's low bits fill from the top
    assert_eq!(c.regs[EAX], 0x4000_0000);
    assert_eq!(c.regs[EBX], (0x8000_0001u32 << 2) | (0x5555_5555 >> 30));
}

#[test]
fn div_by_zero_restarts_with_registers_intact() {
    // No IDT: #DE cannot be delivered; it becomes #GP then #DF then a triple fault.
    let mut cpu = crate::testutil::flat_cpu();
    cpu.idtr.limit = 0;
    let mut a = CodeAssembler::new(32).unwrap();
    a.mov(eax, 7u32).unwrap();
    a.xor(ecx, ecx).unwrap();
    a.div(ecx).unwrap();
    let code = a.assemble(0x1000).unwrap();
    cpu.ram.load(0x1000, &code);
    let mut last = crate::Step::Executed;
    for _ in 0..3 {
        last = crate::step(&mut cpu);
    }
    assert!(matches!(
        last,
        crate::Step::Stop(popek_vcpu::Stop::TripleFault { eip: 0x1007, .. })
    ));
    assert_eq!(cpu.regs[EAX], 7);
    assert_eq!(cpu.eip, 0x1007);
}

#[test]
fn mul_and_imul_flags() {
    let c = run(|a| {
        a.mov(eax, 0x8000_0000u32).unwrap();
        a.mov(ecx, 2u32).unwrap();
        a.mul(ecx).unwrap();
        a.pushfd().unwrap();
        a.pop(esi).unwrap();
        a.mov(eax, 0xFFFF_FFFFu32).unwrap();
        a.imul(ecx).unwrap();
        a.pushfd().unwrap();
        a.pop(edi).unwrap();
    });
    assert_eq!(c.regs[EDX], 0xFFFF_FFFF);
    assert_eq!(c.regs[EAX], 0xFFFF_FFFE);
    assert_eq!(c.regs[ESI] & (CF | OF), CF | OF);
    assert_eq!(c.regs[EDI] & (CF | OF), 0);
}

#[test]
fn rep_movsd_backwards_and_cmpsb() {
    let c = run(|a| {
        a.mov(dword_ptr(0x2000), 0x1111_1111u32).unwrap();
        a.mov(dword_ptr(0x2004), 0x2222_2222u32).unwrap();
        a.std().unwrap();
        a.mov(esi, 0x2004u32).unwrap();
        a.mov(edi, 0x3004u32).unwrap();
        a.mov(ecx, 2u32).unwrap();
        a.rep().movsd().unwrap();
        a.cld().unwrap();
        a.mov(esi, 0x2000u32).unwrap();
        a.mov(edi, 0x3000u32).unwrap();
        a.mov(ecx, 8u32).unwrap();
        a.repe().cmpsb().unwrap();
    });
    assert_eq!(c.ram.read(0x3000, 8), 0x2222_2222_1111_1111);
    assert_eq!(c.regs[ECX], 0);
    assert_eq!(c.eflags & ZF, ZF);
}

#[test]
fn single_step_traps_after_one_instruction() {
    // TF set: the first instruction completes, then #DB is delivered with
    // the EIP of the next instruction on the stack and DR6.BS set.
    let mut cpu = crate::testutil::sandbox_cpu();
    cpu.eip = 0x2000;
    cpu.eflags |= popek_vcpu::flags::TF;
    cpu.ram.load(0x2000, &[0x40, 0x40]); // inc eax; inc eax
    cpu.regs[EAX] = 0;
    assert_eq!(crate::step(&mut cpu), crate::Step::Executed);
    assert_eq!(cpu.regs[EAX], 1);
    assert_eq!(cpu.eip, 0x1000, "in the #DB handler");
    assert_eq!(cpu.ram.read(cpu.regs[ESP], 4), 0x2001, "saved EIP");
    assert_eq!(cpu.eflags & popek_vcpu::flags::TF, 0);
    assert_ne!(cpu.dr[6] & (1 << 14), 0);
}

#[test]
fn sixteen_bit_code_segment_decodes_16_bit_forms() {
    // CS.D = 0: B8 imm16 is MOV AX, imm16 and 66 B8 imm32 is MOV EAX, imm32.
    let mut cpu = crate::testutil::flat_cpu();
    cpu.segs[popek_vcpu::SegReg::Cs as usize].attr &= !popek_vcpu::attr::DB;
    cpu.regs[EAX] = 0xFFFF_FFFF;
    cpu.ram.load(
        0x1000,
        &[0xB8, 0x34, 0x12, 0x66, 0xB9, 0x78, 0x56, 0x34, 0x12],
    );
    crate::step(&mut cpu);
    crate::step(&mut cpu);
    assert_eq!(cpu.regs[EAX], 0xFFFF_1234);
    assert_eq!(cpu.regs[ECX], 0x1234_5678);
    assert_eq!(cpu.eip, 0x1009);
}

#[test]
fn int_n_pushes_flags_cs_eip_and_iret_returns() {
    let mut cpu = crate::testutil::sandbox_cpu();
    cpu.eip = 0x2000;
    cpu.eflags |= popek_vcpu::flags::IF | CF;
    cpu.ram.load(0x2000, &[0xCD, 0x40]); // int 0x40
    cpu.ram.load(0x1000, &[0xCF]); // iret
    crate::step(&mut cpu);
    assert_eq!(cpu.eip, 0x1000);
    assert_eq!(
        cpu.eflags & popek_vcpu::flags::IF,
        0,
        "interrupt gate clears IF"
    );
    let top = cpu.regs[ESP];
    assert_eq!(cpu.ram.read(top, 4), 0x2002);
    assert_eq!(cpu.ram.read(top + 4, 4), 0x08);
    assert_ne!(cpu.ram.read(top + 8, 4) as u32 & popek_vcpu::flags::IF, 0);
    crate::step(&mut cpu);
    assert_eq!(cpu.eip, 0x2002);
    assert_eq!(cpu.regs[ESP], STACK);
    assert_eq!(
        cpu.eflags & (popek_vcpu::flags::IF | CF),
        popek_vcpu::flags::IF | CF
    );
}
