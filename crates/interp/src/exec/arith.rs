//! Arithmetic, logic, shifts, bit operations, BCD, data movement within
//! registers and memory (MOV forms, XCHG, CMPXCHG, CMOVcc, SETcc): the
//! instructions whose only effects are on registers, memory and the
//! arithmetic flags.

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};
use popek_vcpu::flags::{AF, CF, OF, PF, SF, ZF};
use popek_vcpu::{reg, Fault, VResult, Vcpu};

use super::{condition, flag, set_flags, size0};
use crate::alu::{self, mask, sext, Flags, Shift};
use crate::operand::*;

/// Inc, Dec.
#[inline]
pub(super) fn x_inc(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = size0(ins);
    let l = loc(cpu, ins, 0);
    let a = read_loc(cpu, l, size)? & mask(size);
    let (r, f) = alu::incdec(a, ins.mnemonic() == M::Dec, size);
    write_loc(cpu, l, size, r)?;
    set_flags(cpu, f);
    Ok(())
}

/// Neg.
#[inline]
pub(super) fn x_neg(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = size0(ins);
    let l = loc(cpu, ins, 0);
    let a = read_loc(cpu, l, size)? & mask(size);
    let (r, mut f) = alu::sub(0, a, false, size);
    f.value = (f.value & !CF) | if a != 0 { CF } else { 0 };
    write_loc(cpu, l, size, r)?;
    set_flags(cpu, f);
    Ok(())
}

/// Not.
#[inline]
pub(super) fn x_not(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = size0(ins);
    let l = loc(cpu, ins, 0);
    let a = read_loc(cpu, l, size)?;
    write_loc(cpu, l, size, !a)?;
    Ok(())
}

/// Shld, Shrd.
#[inline]
pub(super) fn x_shld(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = size0(ins);
    let l = loc(cpu, ins, 0);
    let a = read_loc(cpu, l, size)? & mask(size);
    let b = read_op(cpu, ins, 1, size)?;
    let count = read_op(cpu, ins, 2, 1)?;
    let (r, f) = alu::double_shift(ins.mnemonic() == M::Shld, a, b, count, size);
    if count & 0x1F != 0 {
        write_loc(cpu, l, size, r)?;
    }
    set_flags(cpu, f);
    Ok(())
}

/// Bsf, Bsr.
#[inline]
pub(super) fn x_bsf(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = size0(ins);
    let v = read_op(cpu, ins, 1, size)?;
    if v == 0 {
        set_flags(
            cpu,
            Flags {
                mask: ZF,
                value: ZF,
            },
        );
    } else {
        let idx = if ins.mnemonic() == M::Bsf {
            v.trailing_zeros()
        } else {
            31 - v.leading_zeros()
        };
        set_reg(cpu, ins.op0_register(), idx);
        set_flags(cpu, Flags { mask: ZF, value: 0 });
    };
    Ok(())
}

/// Tzcnt, Lzcnt.
#[inline]
pub(super) fn x_tzcnt(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    // F3 0F BC/BD: BSF/BSR on a CPU without BMI1/LZCNT, but glibc
    // emits them expecting either; the host (the oracle, and what
    // translated code runs on) has them, so popek behaves like it.
    let size = size0(ins);
    let v = read_op(cpu, ins, 1, size)? & mask(size);
    let bits = 8 * size;
    let n = if v == 0 {
        bits
    } else if ins.mnemonic() == M::Tzcnt {
        v.trailing_zeros()
    } else {
        v.leading_zeros() - (32 - bits)
    };
    set_reg(cpu, ins.op0_register(), n);
    let value = if v == 0 { CF } else { 0 } | if n == 0 { ZF } else { 0 };
    set_flags(
        cpu,
        Flags {
            mask: CF | ZF,
            value,
        },
    );
    Ok(())
}

/// Movzx, Movsx.
#[inline]
pub(super) fn x_movzx(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let dsize = size0(ins);
    let ssize = op_size(ins, 1);
    let v = read_op(cpu, ins, 1, ssize)?;
    let v = if ins.mnemonic() == M::Movsx {
        sext(v, ssize) as u32
    } else {
        v
    };
    set_reg(cpu, ins.op0_register(), v & mask(dsize));
    Ok(())
}

/// Xchg.
#[inline]
pub(super) fn x_xchg(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = size0(ins);
    let a = loc(cpu, ins, 0);
    let b = loc(cpu, ins, 1);
    let va = read_loc(cpu, a, size)?;
    let vb = read_loc(cpu, b, size)?;
    // write memory first so a fault leaves registers untouched
    if matches!(a, Loc::Mem(..)) {
        write_loc(cpu, a, size, vb)?;
        write_loc(cpu, b, size, va)?;
    } else {
        write_loc(cpu, b, size, va)?;
        write_loc(cpu, a, size, vb)?;
    };
    Ok(())
}

/// Xadd.
#[inline]
pub(super) fn x_xadd(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = size0(ins);
    let d = loc(cpu, ins, 0);
    let s = loc(cpu, ins, 1);
    let a = read_loc(cpu, d, size)? & mask(size);
    let b = read_loc(cpu, s, size)? & mask(size);
    let (r, f) = alu::add(a, b, false, size);
    write_loc(cpu, d, size, r)?;
    if d != s {
        write_loc(cpu, s, size, a)?;
    }
    set_flags(cpu, f);
    Ok(())
}

/// Cmpxchg.
#[inline]
pub(super) fn x_cmpxchg(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = size0(ins);
    let d = loc(cpu, ins, 0);
    let dv = read_loc(cpu, d, size)? & mask(size);
    let acc = cpu.regs[reg::EAX] & mask(size);
    let (_, f) = alu::sub(acc, dv, false, size);
    if acc == dv {
        let src = read_op(cpu, ins, 1, size)?;
        write_loc(cpu, d, size, src)?;
    } else {
        // The destination is written back with its own value.
        write_loc(cpu, d, size, dv)?;
        let acc_reg = match size {
            1 => Register::AL,
            2 => Register::AX,
            _ => Register::EAX,
        };
        set_reg(cpu, acc_reg, dv);
    }
    set_flags(cpu, f);
    Ok(())
}

/// Cmpxchg8b.
#[inline]
pub(super) fn x_cmpxchg8b(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let seg = seg_of(ins.memory_segment());
    let ea = effective_address(cpu, ins);
    let v = cpu.read_mem(seg, ea, 8)?;
    let cmp = (u64::from(cpu.regs[reg::EDX]) << 32) | u64::from(cpu.regs[reg::EAX]);
    if v == cmp {
        let new = (u64::from(cpu.regs[reg::ECX]) << 32) | u64::from(cpu.regs[reg::EBX]);
        cpu.write_mem(seg, ea, 8, new)?;
        set_flags(
            cpu,
            Flags {
                mask: ZF,
                value: ZF,
            },
        );
    } else {
        cpu.write_mem(seg, ea, 8, v)?;
        cpu.regs[reg::EAX] = v as u32;
        cpu.regs[reg::EDX] = (v >> 32) as u32;
        set_flags(cpu, Flags { mask: ZF, value: 0 });
    };
    Ok(())
}

/// Bswap.
#[inline]
pub(super) fn x_bswap(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let r = ins.op0_register();
    let v = get_reg(cpu, r);
    // BSWAP r16 is undefined; popek clears the register's low word.
    let n = if r.size() == 4 { v.swap_bytes() } else { 0 };
    set_reg(cpu, r, n);
    Ok(())
}

/// Lea.
#[inline]
pub(super) fn x_lea(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = size0(ins);
    let ea = effective_address(cpu, ins);
    set_reg(cpu, ins.op0_register(), ea & mask(size));
    Ok(())
}

/// Cmovo, Cmovno, Cmovb, Cmovae, Cmove, Cmovne, Cmovbe, Cmova, Cmovs, Cmovns, Cmovp, Cmovnp, Cmovl, Cmovge, Cmovle, Cmovg.
#[inline]
pub(super) fn x_cmovo(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = size0(ins);
    // the source is read (and may fault) whatever the condition
    let v = read_op(cpu, ins, 1, size)?;
    if condition(cpu, ins.condition_code()) {
        set_reg(cpu, ins.op0_register(), v);
    };
    Ok(())
}

/// Seto, Setno, Setb, Setae, Sete, Setne, Setbe, Seta, Sets, Setns, Setp, Setnp, Setl, Setge, Setle, Setg.
#[inline]
pub(super) fn x_seto(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let v = u32::from(condition(cpu, ins.condition_code()));
    write_op(cpu, ins, 0, 1, v)?;
    Ok(())
}

pub(super) fn binary_alu(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = size0(ins);
    let dst = loc(cpu, ins, 0);
    let a = read_loc(cpu, dst, size)? & mask(size);
    let b = read_op(cpu, ins, 1, size)?;
    let cf = flag(cpu, CF);
    let (res, f, write) = match ins.mnemonic() {
        M::Add => {
            let (r, f) = alu::add(a, b, false, size);
            (r, f, true)
        }
        M::Adc => {
            let (r, f) = alu::add(a, b, cf, size);
            (r, f, true)
        }
        M::Sub => {
            let (r, f) = alu::sub(a, b, false, size);
            (r, f, true)
        }
        M::Sbb => {
            let (r, f) = alu::sub(a, b, cf, size);
            (r, f, true)
        }
        M::Cmp => {
            let (r, f) = alu::sub(a, b, false, size);
            (r, f, false)
        }
        M::And => (a & b, alu::logic(a & b, size), true),
        M::Or => (a | b, alu::logic(a | b, size), true),
        M::Xor => (a ^ b, alu::logic(a ^ b, size), true),
        M::Test => (a & b, alu::logic(a & b, size), false),
        _ => unreachable!(),
    };
    if write {
        write_loc(cpu, dst, size, res)?;
    }
    set_flags(cpu, f);
    Ok(())
}

pub(super) fn shift_op(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = size0(ins);
    let dst = loc(cpu, ins, 0);
    let a = read_loc(cpu, dst, size)? & mask(size);
    let count = if ins.op_count() > 1 {
        read_op(cpu, ins, 1, 1)?
    } else {
        1
    };
    let op = match ins.mnemonic() {
        M::Rol => Shift::Rol,
        M::Ror => Shift::Ror,
        M::Rcl => Shift::Rcl,
        M::Rcr => Shift::Rcr,
        M::Shl | M::Sal => Shift::Shl,
        M::Shr => Shift::Shr,
        _ => Shift::Sar,
    };
    let (res, f) = alu::shift(op, a, count, flag(cpu, CF), size);
    if count & 0x1F != 0 {
        write_loc(cpu, dst, size, res)?;
    }
    set_flags(cpu, f);
    Ok(())
}

pub(super) fn mul_div(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let m = ins.mnemonic();
    if m == M::Imul && ins.op_count() > 1 {
        // IMUL r, r/m [, imm]: truncated signed product.
        let size = size0(ins);
        let (a, b) = if ins.op_count() == 2 {
            (read_op(cpu, ins, 0, size)?, read_op(cpu, ins, 1, size)?)
        } else {
            (read_op(cpu, ins, 1, size)?, read_op(cpu, ins, 2, size)?)
        };
        let full = i64::from(sext(a, size)) * i64::from(sext(b, size));
        let res = (full as u32) & mask(size);
        let overflow = i64::from(sext(res, size)) != full;
        set_reg(cpu, ins.op0_register(), res);
        set_flags(cpu, mul_flags(overflow));
        return Ok(());
    }
    let size = size0(ins);
    let src = read_op(cpu, ins, 0, size)?;
    let (lo, hi) = match size {
        1 => (get_reg(cpu, Register::AL), get_reg(cpu, Register::AH)),
        2 => (get_reg(cpu, Register::AX), get_reg(cpu, Register::DX)),
        _ => (cpu.regs[reg::EAX], cpu.regs[reg::EDX]),
    };
    let bits = size * 8;
    let write_pair = |cpu: &mut Vcpu, lo: u32, hi: u32| match size {
        1 => set_reg(cpu, Register::AX, (lo & 0xFF) | ((hi & 0xFF) << 8)),
        2 => {
            set_reg(cpu, Register::AX, lo);
            set_reg(cpu, Register::DX, hi);
        }
        _ => {
            cpu.regs[reg::EAX] = lo;
            cpu.regs[reg::EDX] = hi;
        }
    };
    match m {
        M::Mul => {
            let p = u64::from(lo & mask(size)) * u64::from(src);
            let (l, h) = ((p as u32) & mask(size), ((p >> bits) as u32) & mask(size));
            write_pair(cpu, l, h);
            set_flags(cpu, mul_flags(h != 0));
        }
        M::Imul => {
            let p = i64::from(sext(lo, size)) * i64::from(sext(src, size));
            let l = (p as u32) & mask(size);
            let h = ((p >> bits) as u32) & mask(size);
            write_pair(cpu, l, h);
            set_flags(cpu, mul_flags(i64::from(sext(l, size)) != p));
        }
        M::Div => {
            if src == 0 {
                return Err(Fault::de());
            }
            let dividend = (u64::from(hi & mask(size)) << bits) | u64::from(lo & mask(size));
            let q = dividend / u64::from(src);
            let r = dividend % u64::from(src);
            if q > u64::from(mask(size)) {
                return Err(Fault::de());
            }
            write_pair(cpu, q as u32, r as u32);
        }
        _ => {
            // IDIV
            if src == 0 {
                return Err(Fault::de());
            }
            let dividend =
                ((u64::from(hi & mask(size)) << bits) | u64::from(lo & mask(size))) as i64;
            let dividend = (dividend << (64 - 2 * bits)) >> (64 - 2 * bits);
            let divisor = i64::from(sext(src, size));
            let q = dividend.checked_div(divisor).ok_or_else(Fault::de)?;
            let r = dividend.checked_rem(divisor).ok_or_else(Fault::de)?;
            let min = -(1i64 << (bits - 1));
            let max = (1i64 << (bits - 1)) - 1;
            if q < min || q > max {
                return Err(Fault::de());
            }
            write_pair(cpu, q as u32 & mask(size), r as u32 & mask(size));
        }
    };
    Ok(())
}

/// MUL/IMUL: CF = OF = overflow; SF, ZF, AF, PF are undefined (kept).
fn mul_flags(overflow: bool) -> Flags {
    Flags {
        mask: CF | OF,
        value: if overflow { CF | OF } else { 0 },
    }
}

pub(super) fn bit_test(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = size0(ins);
    let bits = size * 8;
    let (target, bitno) = match ins.op_kind(0) {
        OpKind::Register => {
            let off = read_op(cpu, ins, 1, size)?;
            (Loc::Reg(ins.op0_register()), off & (bits - 1))
        }
        _ => {
            let seg = seg_of(ins.memory_segment());
            let ea = effective_address(cpu, ins);
            if ins.op1_kind() == OpKind::Register {
                // Register bit offsets are signed and may leave the operand.
                let off = sext(read_op(cpu, ins, 1, size)?, size);
                let unit = off.div_euclid(bits as i32);
                let addr = ea.wrapping_add((unit * size as i32) as u32);
                (Loc::Mem(seg, addr), off.rem_euclid(bits as i32) as u32)
            } else {
                let off = read_op(cpu, ins, 1, 1)?;
                (Loc::Mem(seg, ea), off & (bits - 1))
            }
        }
    };
    let v = read_loc(cpu, target, size)?;
    let b = (v >> bitno) & 1 != 0;
    let new = match ins.mnemonic() {
        M::Bts => Some(v | (1 << bitno)),
        M::Btr => Some(v & !(1 << bitno)),
        M::Btc => Some(v ^ (1 << bitno)),
        _ => None,
    };
    if let Some(n) = new {
        write_loc(cpu, target, size, n)?;
    }
    set_flags(
        cpu,
        Flags {
            mask: CF,
            value: if b { CF } else { 0 },
        },
    );
    Ok(())
}

pub(super) fn bcd(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let al = cpu.regs[reg::EAX] & 0xFF;
    let af = flag(cpu, AF);
    let cf = flag(cpu, CF);
    let set_al = |cpu: &mut Vcpu, v: u32| set_reg(cpu, Register::AL, v);
    match ins.mnemonic() {
        M::Daa | M::Das => {
            let das = ins.mnemonic() == M::Das;
            let mut new_al = al;
            let mut new_cf = false;
            let mut new_af = false;
            if al & 0xF > 9 || af {
                if das {
                    new_cf = cf || al < 6;
                    new_al = al.wrapping_sub(6) & 0xFF;
                } else {
                    new_cf = cf || al + 6 > 0xFF;
                    new_al = (al + 6) & 0xFF;
                }
                new_af = true;
            }
            if al > 0x99 || cf {
                new_al = if das {
                    new_al.wrapping_sub(0x60) & 0xFF
                } else {
                    (new_al + 0x60) & 0xFF
                };
                new_cf = true;
            } else if !das {
                new_cf = false;
            }
            set_al(cpu, new_al);
            let value =
                alu::szp(new_al, 1) | if new_cf { CF } else { 0 } | if new_af { AF } else { 0 };
            set_flags(
                cpu,
                Flags {
                    mask: CF | AF | SF | ZF | PF,
                    value,
                },
            );
        }
        M::Aaa | M::Aas => {
            let ax = cpu.regs[reg::EAX] & 0xFFFF;
            let adjust = al & 0xF > 9 || af;
            let new_ax = if !adjust {
                ax
            } else if ins.mnemonic() == M::Aaa {
                ax.wrapping_add(0x106)
            } else {
                // AX <- AX - 6; AH <- AH - 1 (the borrow from AL reaches AH too)
                ax.wrapping_sub(6).wrapping_sub(0x100)
            };
            set_reg(cpu, Register::AX, new_ax & 0xFF0F);
            let value = if adjust { CF | AF } else { 0 };
            set_flags(
                cpu,
                Flags {
                    mask: CF | AF,
                    value,
                },
            );
        }
        M::Aam => {
            let base = u32::from(ins.immediate8());
            if base == 0 {
                return Err(Fault::de());
            }
            let new = ((al / base) << 8) | (al % base);
            set_reg(cpu, Register::AX, new);
            set_flags(
                cpu,
                Flags {
                    mask: SF | ZF | PF,
                    value: alu::szp(new & 0xFF, 1),
                },
            );
        }
        _ => {
            // AAD
            let base = u32::from(ins.immediate8());
            let ah = (cpu.regs[reg::EAX] >> 8) & 0xFF;
            let new = (al + ah * base) & 0xFF;
            set_reg(cpu, Register::AX, new);
            set_flags(
                cpu,
                Flags {
                    mask: SF | ZF | PF,
                    value: alu::szp(new, 1),
                },
            );
        }
    };
    Ok(())
}
