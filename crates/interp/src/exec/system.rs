//! System instructions: port I/O, CPUID, RDTSC, MSRs, the descriptor
//! tables and task register, CR0's low word, cache and TLB control, and
//! the descriptor checks LAR, LSL, VERR and VERW. Each calls its
//! [`Vcpu`] method: the same one the translator's helper calls run.

use iced_x86::{Code, Instruction, Mnemonic as M, OpKind};
use popek_vcpu::flags::ZF;
use popek_vcpu::{VResult, Vcpu};

use super::{port_operand, set_flags, size0, store_selector, store_table, table_operand};
use crate::alu::{mask, Flags};
use crate::operand::*;

/// In.
#[inline]
pub(super) fn x_in(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = size0(ins);
    let port = port_operand(cpu, ins, 1);
    let v = cpu.port_in(port, size as u8)?;
    set_reg(cpu, ins.op0_register(), v);
    Ok(())
}

/// Out.
#[inline]
pub(super) fn x_out(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = op_size(ins, 1);
    let port = port_operand(cpu, ins, 0);
    let v = get_reg(cpu, ins.op1_register());
    cpu.port_out(port, size as u8, v)?;
    Ok(())
}

/// Lgdt, Lidt.
#[inline]
pub(super) fn x_lgdt(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let (limit, base) = table_operand(cpu, ins)?;
    // A 0x66 prefix selects the 24-bit-base form.
    let op32 = !matches!(ins.code(), Code::Lgdt_m1632_16 | Code::Lidt_m1632_16);
    if ins.mnemonic() == M::Lgdt {
        cpu.lgdt(limit, base, op32)?;
    } else {
        cpu.lidt(limit, base, op32)?;
    };
    Ok(())
}

/// Sgdt, Sidt.
#[inline]
pub(super) fn x_sgdt(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let (limit, base) = if ins.mnemonic() == M::Sgdt {
        cpu.sgdt()
    } else {
        cpu.sidt()
    };
    store_table(cpu, ins, limit, base)?;
    Ok(())
}

/// Sldt.
#[inline]
pub(super) fn x_sldt(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let v = u32::from(cpu.sldt());
    store_selector(cpu, ins, v)?;
    Ok(())
}

/// Str.
#[inline]
pub(super) fn x_str(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let v = u32::from(cpu.str_());
    store_selector(cpu, ins, v)?;
    Ok(())
}

/// Smsw.
#[inline]
pub(super) fn x_smsw(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let v = cpu.smsw();
    match ins.op0_kind() {
        OpKind::Register => set_reg(cpu, ins.op0_register(), v),
        _ => write_op(cpu, ins, 0, 2, v)?,
    };
    Ok(())
}

/// Lldt.
#[inline]
pub(super) fn x_lldt(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let sel = read_op(cpu, ins, 0, 2)? as u16;
    cpu.lldt(sel)?;
    Ok(())
}

/// Ltr.
#[inline]
pub(super) fn x_ltr(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let sel = read_op(cpu, ins, 0, 2)? as u16;
    cpu.ltr(sel)?;
    Ok(())
}

/// Lmsw.
#[inline]
pub(super) fn x_lmsw(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let v = read_op(cpu, ins, 0, 2)? as u16;
    cpu.lmsw(v)?;
    Ok(())
}

/// Lar, Lsl.
#[inline]
pub(super) fn x_lar(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = size0(ins);
    let sel = read_op(cpu, ins, 1, 2)? as u16;
    let r = if ins.mnemonic() == M::Lar {
        cpu.lar(sel)?
    } else {
        cpu.lsl(sel)?
    };
    match r {
        Some(v) => {
            set_reg(cpu, ins.op0_register(), v & mask(size));
            set_flags(
                cpu,
                Flags {
                    mask: ZF,
                    value: ZF,
                },
            );
        }
        None => set_flags(cpu, Flags { mask: ZF, value: 0 }),
    };
    Ok(())
}

/// Verr, Verw.
#[inline]
pub(super) fn x_verr(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let sel = read_op(cpu, ins, 0, 2)? as u16;
    let ok = cpu.verify(sel, ins.mnemonic() == M::Verw)?;
    set_flags(
        cpu,
        Flags {
            mask: ZF,
            value: if ok { ZF } else { 0 },
        },
    );
    Ok(())
}
