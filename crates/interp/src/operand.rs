//! Operand access: registers, memory operands (with segmentation), and
//! immediates of a decoded instruction.

use iced_x86::{Instruction, OpKind, Register};
use popek_vcpu::{Fault, SegReg, VResult, Vcpu};

use crate::alu::mask;

/// Map an iced segment register to popek's.
pub fn seg_of(r: Register) -> SegReg {
    match r {
        Register::ES => SegReg::Es,
        Register::CS => SegReg::Cs,
        Register::SS => SegReg::Ss,
        Register::FS => SegReg::Fs,
        Register::GS => SegReg::Gs,
        _ => SegReg::Ds,
    }
}

/// Read a general-purpose or segment register.
#[inline]
pub fn get_reg(cpu: &Vcpu, r: Register) -> u32 {
    let n = r as u32;
    let al = Register::AL as u32;
    let ah = Register::AH as u32;
    let ax = Register::AX as u32;
    let eax = Register::EAX as u32;
    match n {
        _ if (al..al + 4).contains(&n) => cpu.regs[(n - al) as usize] & 0xFF,
        _ if (ah..ah + 4).contains(&n) => (cpu.regs[(n - ah) as usize] >> 8) & 0xFF,
        _ if (ax..ax + 8).contains(&n) => cpu.regs[(n - ax) as usize] & 0xFFFF,
        _ if (eax..eax + 8).contains(&n) => cpu.regs[(n - eax) as usize],
        _ if r.is_segment_register() => u32::from(cpu.seg(seg_of(r)).selector),
        _ => 0,
    }
}

/// Write a general-purpose register (8-bit and 16-bit writes merge).
#[inline]
pub fn set_reg(cpu: &mut Vcpu, r: Register, v: u32) {
    let n = r as u32;
    let al = Register::AL as u32;
    let ah = Register::AH as u32;
    let ax = Register::AX as u32;
    let eax = Register::EAX as u32;
    if (al..al + 4).contains(&n) {
        let x = &mut cpu.regs[(n - al) as usize];
        *x = (*x & !0xFF) | (v & 0xFF);
    } else if (ah..ah + 4).contains(&n) {
        let x = &mut cpu.regs[(n - ah) as usize];
        *x = (*x & !0xFF00) | ((v & 0xFF) << 8);
    } else if (ax..ax + 8).contains(&n) {
        let x = &mut cpu.regs[(n - ax) as usize];
        *x = (*x & !0xFFFF) | (v & 0xFFFF);
    } else if (eax..eax + 8).contains(&n) {
        cpu.regs[(n - eax) as usize] = v;
    }
}

/// Does the memory operand use 16-bit addressing (0x67 in 32-bit code)?
pub fn addr16(ins: &Instruction) -> bool {
    let b = ins.memory_base();
    let i = ins.memory_index();
    if b != Register::None || i != Register::None {
        // XLAT's index is AL; its base tells the address size.
        b.size() == 2 || i.size() == 2
    } else {
        ins.memory_displ_size() == 2
    }
}

/// The effective address (offset within the segment) of the memory operand.
pub fn effective_address(cpu: &Vcpu, ins: &Instruction) -> u32 {
    let mut a = ins.memory_displacement32();
    let b = ins.memory_base();
    if b != Register::None {
        a = a.wrapping_add(get_reg(cpu, b));
    }
    let i = ins.memory_index();
    if i != Register::None {
        a = a.wrapping_add(get_reg(cpu, i).wrapping_mul(ins.memory_index_scale()));
    }
    if addr16(ins) {
        a & 0xFFFF
    } else {
        a
    }
}

/// Where an operand lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loc {
    /// A register.
    Reg(Register),
    /// Memory at segment:offset.
    Mem(SegReg, u32),
}

/// The location of operand `i` (a register or memory operand).
pub fn loc(cpu: &Vcpu, ins: &Instruction, i: u32) -> Loc {
    match ins.op_kind(i) {
        OpKind::Register => Loc::Reg(ins.op_register(i)),
        _ => Loc::Mem(seg_of(ins.memory_segment()), effective_address(cpu, ins)),
    }
}

/// Read `size` bytes at a location.
#[inline]
pub fn read_loc(cpu: &mut Vcpu, l: Loc, size: u32) -> VResult<u32> {
    match l {
        Loc::Reg(r) => Ok(get_reg(cpu, r)),
        Loc::Mem(s, off) => Ok(cpu.read_mem(s, off, size)? as u32),
    }
}

/// Write `size` bytes at a location.
#[inline]
pub fn write_loc(cpu: &mut Vcpu, l: Loc, size: u32, v: u32) -> VResult<()> {
    match l {
        Loc::Reg(r) => {
            set_reg(cpu, r, v);
            Ok(())
        }
        Loc::Mem(s, off) => cpu.write_mem(s, off, size, u64::from(v & mask(size))),
    }
}

/// The size in bytes of operand `i`.
pub fn op_size(ins: &Instruction, i: u32) -> u32 {
    match ins.op_kind(i) {
        OpKind::Register => ins.op_register(i).size() as u32,
        OpKind::Immediate8 | OpKind::Immediate8_2nd => 1,
        OpKind::Immediate16 | OpKind::Immediate8to16 => 2,
        OpKind::Immediate32 | OpKind::Immediate8to32 => 4,
        _ => ins.memory_size().size() as u32,
    }
}

/// Read operand `i` (register, memory or immediate), masked to `size` bytes.
pub fn read_op(cpu: &mut Vcpu, ins: &Instruction, i: u32, size: u32) -> VResult<u32> {
    let v = match ins.op_kind(i) {
        OpKind::Register => get_reg(cpu, ins.op_register(i)),
        OpKind::Immediate8 => u32::from(ins.immediate8()),
        OpKind::Immediate8_2nd => u32::from(ins.immediate8_2nd()),
        OpKind::Immediate16 => u32::from(ins.immediate16()),
        OpKind::Immediate32 => ins.immediate32(),
        OpKind::Immediate8to16 => ins.immediate8to16() as u16 as u32,
        OpKind::Immediate8to32 => ins.immediate8to32() as u32,
        OpKind::Memory => {
            let l = loc(cpu, ins, i);
            read_loc(cpu, l, size)?
        }
        k => return Err(Fault::unsupported(format!("operand kind {k:?}"))),
    };
    Ok(v & mask(size))
}

/// Write operand `i` (register or memory).
pub fn write_op(cpu: &mut Vcpu, ins: &Instruction, i: u32, size: u32, v: u32) -> VResult<()> {
    let l = loc(cpu, ins, i);
    write_loc(cpu, l, size, v)
}
