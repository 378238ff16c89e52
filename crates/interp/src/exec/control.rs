//! Control transfers (JMP, Jcc, LOOP, CALL, RET, far forms, INT, IRET,
//! BOUND) and the string instructions (through [`crate::string`]).

use iced_x86::{Code, Instruction, Mnemonic as M, OpKind};
use popek_vcpu::{reg, vector, Fault, SegReg, VResult, Vcpu};

use super::{condition, far_pointer, flag, jump, size0, stack_size};
use crate::alu::{mask, sext};
use crate::operand::*;
use popek_vcpu::flags::{OF, ZF};

/// Jmp.
#[inline]
pub(super) fn x_jmp(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    if ins.is_jmp_far() {
        let off = if ins.op0_kind() == OpKind::FarBranch32 {
            ins.far_branch32()
        } else {
            u32::from(ins.far_branch16())
        };
        cpu.far_jmp(
            ins.far_branch_selector(),
            off,
            ins.op0_kind() == OpKind::FarBranch32,
        )?;
    } else if ins.is_jmp_far_indirect() {
        let osz = ins.memory_size().size() as u32 - 2;
        let (off, sel) = far_pointer(cpu, ins, osz)?;
        cpu.far_jmp(sel, off, osz == 4)?;
    } else if ins.is_jmp_near_indirect() {
        let size = size0(ins);
        let t = read_op(cpu, ins, 0, size)?;
        jump(cpu, t)?;
    } else {
        jump(cpu, ins.near_branch_target() as u32)?;
    };
    Ok(())
}

/// Jo, Jno, Jb, Jae, Je, Jne, Jbe, Ja, Js, Jns, Jp, Jnp, Jl, Jge, Jle, Jg.
#[inline]
pub(super) fn x_jo(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    if condition(cpu, ins.condition_code()) {
        jump(cpu, ins.near_branch_target() as u32)?;
    };
    Ok(())
}

/// Jcxz, Jecxz.
#[inline]
pub(super) fn x_jcxz(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let c = if ins.mnemonic() == M::Jcxz {
        cpu.regs[reg::ECX] & 0xFFFF
    } else {
        cpu.regs[reg::ECX]
    };
    if c == 0 {
        jump(cpu, ins.near_branch_target() as u32)?;
    };
    Ok(())
}

/// Loop, Loope, Loopne.
#[inline]
pub(super) fn x_loop(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let cx16 = matches!(
        ins.code(),
        Code::Loop_rel8_16_CX
            | Code::Loop_rel8_32_CX
            | Code::Loope_rel8_16_CX
            | Code::Loope_rel8_32_CX
            | Code::Loopne_rel8_16_CX
            | Code::Loopne_rel8_32_CX
    );
    let m = if cx16 { 0xFFFF } else { u32::MAX };
    let ecx = cpu.regs[reg::ECX];
    let count = ecx.wrapping_sub(1) & m;
    let z = flag(cpu, ZF);
    let take = count != 0
        && match ins.mnemonic() {
            M::Loope => z,
            M::Loopne => !z,
            _ => true,
        };
    if take {
        jump(cpu, ins.near_branch_target() as u32)?;
    }
    cpu.regs[reg::ECX] = (ecx & !m) | count;
    Ok(())
}

/// Call.
#[inline]
pub(super) fn x_call(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    if ins.is_call_far() {
        let op32 = ins.op0_kind() == OpKind::FarBranch32;
        let off = if op32 {
            ins.far_branch32()
        } else {
            u32::from(ins.far_branch16())
        };
        let ret = cpu.eip;
        cpu.far_call(ins.far_branch_selector(), off, op32, ret)?;
    } else if ins.is_call_far_indirect() {
        let osz = ins.memory_size().size() as u32 - 2;
        let (off, sel) = far_pointer(cpu, ins, osz)?;
        let ret = cpu.eip;
        cpu.far_call(sel, off, osz == 4, ret)?;
    } else {
        let size = stack_size(ins);
        let target = if ins.is_call_near_indirect() {
            read_op(cpu, ins, 0, size)?
        } else {
            ins.near_branch_target() as u32
        };
        let ret = cpu.eip;
        let cs = cpu.seg(SegReg::Cs);
        if cs.limit != u32::MAX && target > cs.limit {
            return Err(Fault::gp(0));
        }
        cpu.push(ret & mask(size), size)?;
        cpu.eip = target;
    };
    Ok(())
}

/// Ret.
#[inline]
pub(super) fn x_ret(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = if ins.code() == Code::Retnw || ins.code() == Code::Retnw_imm16 {
        2
    } else {
        4
    };
    let target = cpu.peek(0, size)?;
    let imm = if ins.op_count() > 0 {
        u32::from(ins.immediate16())
    } else {
        0
    };
    jump(cpu, target)?;
    let m = cpu.stack_mask();
    let esp = cpu.regs[reg::ESP];
    cpu.regs[reg::ESP] = (esp & !m) | (esp.wrapping_add(size + imm) & m);
    Ok(())
}

/// Retf.
#[inline]
pub(super) fn x_retf(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let op32 = matches!(ins.code(), Code::Retfd | Code::Retfd_imm16);
    let imm = if ins.op_count() > 0 {
        ins.immediate16()
    } else {
        0
    };
    cpu.far_ret(op32, imm)?;
    Ok(())
}

/// Into.
#[inline]
pub(super) fn x_into(cpu: &mut Vcpu, _ins: &Instruction) -> VResult<()> {
    if flag(cpu, OF) {
        cpu.software_interrupt(vector::OF)?;
    };
    Ok(())
}

/// Bound.
#[inline]
pub(super) fn x_bound(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = size0(ins);
    let idx = sext(get_reg(cpu, ins.op0_register()), size);
    let seg = seg_of(ins.memory_segment());
    let ea = effective_address(cpu, ins);
    let lo = sext(cpu.read_mem(seg, ea, size)? as u32, size);
    let hi = sext(cpu.read_mem(seg, ea.wrapping_add(size), size)? as u32, size);
    if idx < lo || idx > hi {
        return Err(Fault::exc(vector::BR));
    };
    Ok(())
}
