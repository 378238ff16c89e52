//! The stack instructions (PUSHA, POPA, LEAVE), conversions (CWD, CDQ),
//! XLAT, LAHF/SAHF and far-pointer loads; PUSH, POP, ENTER and the flag
//! instructions are short enough to stay in [`super::execute`].

use iced_x86::{Code, Instruction, Mnemonic as M, Register};
use popek_vcpu::flags::{AF, CF, PF, SF, ZF};
use popek_vcpu::{reg, SegReg, VResult, Vcpu};

use super::{far_pointer, set_flags, size0};
use crate::alu::{mask, Flags};
use crate::operand::*;

/// Pusha, Pushad.
#[inline]
pub(super) fn x_pusha(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = if ins.mnemonic() == M::Pushad { 4 } else { 2 };
    let esp = cpu.regs[reg::ESP];
    for r in 0..8 {
        let v = if r == reg::ESP { esp } else { cpu.regs[r] };
        cpu.push(v & mask(size), size)?;
    }
    Ok(())
}

/// Popa, Popad.
#[inline]
pub(super) fn x_popa(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = if ins.mnemonic() == M::Popad { 4 } else { 2 };
    let mut vals = [0u32; 8];
    for i in 0..8 {
        vals[7 - i] = cpu.peek(i as u32 * size, size)?;
    }
    for (r, v) in vals.iter().enumerate() {
        if r != reg::ESP {
            let x = &mut cpu.regs[r];
            *x = (*x & !mask(size)) | v;
        }
    }
    let m = cpu.stack_mask();
    let esp = cpu.regs[reg::ESP];
    cpu.regs[reg::ESP] = (esp & !m) | (esp.wrapping_add(8 * size) & m);
    Ok(())
}

/// Leave.
#[inline]
pub(super) fn x_leave(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = if ins.code() == Code::Leavew { 2 } else { 4 };
    let m = cpu.stack_mask();
    let esp = cpu.regs[reg::ESP];
    cpu.regs[reg::ESP] = (esp & !m) | (cpu.regs[reg::EBP] & m);
    match cpu.pop(size) {
        Ok(v) => {
            let x = &mut cpu.regs[reg::EBP];
            *x = (*x & !mask(size)) | v;
        }
        Err(e) => {
            cpu.regs[reg::ESP] = esp;
            return Err(e);
        }
    };
    Ok(())
}

/// Cwd.
#[inline]
pub(super) fn x_cwd(cpu: &mut Vcpu, _ins: &Instruction) -> VResult<()> {
    let hi = if cpu.regs[reg::EAX] & 0x8000 != 0 {
        0xFFFF
    } else {
        0
    };
    set_reg(cpu, Register::DX, hi);
    Ok(())
}

/// Cdq.
#[inline]
pub(super) fn x_cdq(cpu: &mut Vcpu, _ins: &Instruction) -> VResult<()> {
    cpu.regs[reg::EDX] = if cpu.regs[reg::EAX] & 0x8000_0000 != 0 {
        u32::MAX
    } else {
        0
    };
    Ok(())
}

/// Xlatb.
#[inline]
pub(super) fn x_xlatb(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let v = read_op(cpu, ins, 0, 1)?;
    set_reg(cpu, Register::AL, v);
    Ok(())
}

/// Lahf.
#[inline]
pub(super) fn x_lahf(cpu: &mut Vcpu, _ins: &Instruction) -> VResult<()> {
    let f = cpu.eflags & (SF | ZF | AF | PF | CF) | 2;
    set_reg(cpu, Register::AH, f);
    Ok(())
}

/// Sahf.
#[inline]
pub(super) fn x_sahf(cpu: &mut Vcpu, _ins: &Instruction) -> VResult<()> {
    let ah = (cpu.regs[reg::EAX] >> 8) & 0xFF;
    let m = SF | ZF | AF | PF | CF;
    set_flags(cpu, Flags { mask: m, value: ah });
    Ok(())
}

/// Lds, Les, Lfs, Lgs, Lss.
#[inline]
pub(super) fn x_lds(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = size0(ins);
    let (off, sel) = far_pointer(cpu, ins, size)?;
    let s = match ins.mnemonic() {
        M::Lds => SegReg::Ds,
        M::Les => SegReg::Es,
        M::Lfs => SegReg::Fs,
        M::Lgs => SegReg::Gs,
        _ => SegReg::Ss,
    };
    cpu.load_seg(s, sel)?;
    if s == SegReg::Ss {
        cpu.int_shadow = true;
    }
    set_reg(cpu, ins.op0_register(), off);
    Ok(())
}
