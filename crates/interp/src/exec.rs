//! Instruction semantics. One function dispatches on the mnemonic; operand
//! sizes come from the decoded operands, so 8-, 16- and 32-bit forms share
//! one implementation. Special instructions call [`Vcpu`] methods.

use iced_x86::{Code, ConditionCode, CpuidFeature, Instruction, Mnemonic as M, OpKind, Register};
use popek_vcpu::flags::{AF, CF, DF, OF, PF, SF, ZF};
use popek_vcpu::{reg, vector, Fault, SegReg, VResult, Vcpu};

use crate::alu::{self, mask, sext, Flags, Shift};
use crate::operand::{
    effective_address, get_reg, loc, op_size, read_loc, read_op, seg_of, set_reg, write_loc,
    write_op, Loc,
};
use crate::string;

#[inline]
fn set_flags(cpu: &mut Vcpu, f: Flags) {
    cpu.eflags = f.apply(cpu.eflags);
}

#[inline]
fn flag(cpu: &Vcpu, f: u32) -> bool {
    cpu.eflags & f != 0
}

/// Evaluate a condition code against EFLAGS.
pub fn condition(cpu: &Vcpu, cc: ConditionCode) -> bool {
    let (c, z, s, o, p) = (
        flag(cpu, CF),
        flag(cpu, ZF),
        flag(cpu, SF),
        flag(cpu, OF),
        flag(cpu, PF),
    );
    match cc {
        ConditionCode::o => o,
        ConditionCode::no => !o,
        ConditionCode::b => c,
        ConditionCode::ae => !c,
        ConditionCode::e => z,
        ConditionCode::ne => !z,
        ConditionCode::be => c || z,
        ConditionCode::a => !c && !z,
        ConditionCode::s => s,
        ConditionCode::ns => !s,
        ConditionCode::p => p,
        ConditionCode::np => !p,
        ConditionCode::l => s != o,
        ConditionCode::ge => s == o,
        ConditionCode::le => z || s != o,
        ConditionCode::g => !z && s == o,
        ConditionCode::None => true,
    }
}

/// Operand size of the instruction: the size of its first operand.
#[inline]
fn size0(ins: &Instruction) -> u32 {
    op_size(ins, 0)
}

/// Stack operand size of PUSH/POP/CALL/RET-like instructions.
#[inline]
fn stack_size(ins: &Instruction) -> u32 {
    ins.stack_pointer_increment().unsigned_abs()
}

/// Jump to a near target, checking it against the CS limit.
fn jump(cpu: &mut Vcpu, target: u32) -> VResult<()> {
    let cs = cpu.seg(SegReg::Cs);
    if cs.limit != u32::MAX && target > cs.limit {
        return Err(Fault::gp(0));
    }
    cpu.eip = target;
    Ok(())
}

fn binary_alu(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
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

fn shift_op(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
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

fn mul_div(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
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
    }
    Ok(())
}

/// MUL/IMUL: CF = OF = overflow; SF, ZF, AF, PF are undefined (kept).
fn mul_flags(overflow: bool) -> Flags {
    Flags {
        mask: CF | OF,
        value: if overflow { CF | OF } else { 0 },
    }
}

fn bit_test(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
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

fn bcd(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
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
    }
    Ok(())
}

/// Read a far pointer (offset, selector) from the memory operand.
fn far_pointer(cpu: &mut Vcpu, ins: &Instruction, off_size: u32) -> VResult<(u32, u16)> {
    let seg = seg_of(ins.memory_segment());
    let ea = effective_address(cpu, ins);
    let off = cpu.read_mem(seg, ea, off_size)? as u32;
    let sel = cpu.read_mem(seg, ea.wrapping_add(off_size), 2)? as u16;
    Ok((off, sel))
}

fn table_operand(cpu: &mut Vcpu, ins: &Instruction) -> VResult<(u16, u32)> {
    let seg = seg_of(ins.memory_segment());
    let ea = effective_address(cpu, ins);
    let limit = cpu.read_mem(seg, ea, 2)? as u16;
    let base = cpu.read_mem(seg, ea.wrapping_add(2), 4)? as u32;
    Ok((limit, base))
}

fn store_table(cpu: &mut Vcpu, ins: &Instruction, limit: u16, base: u32) -> VResult<()> {
    let seg = seg_of(ins.memory_segment());
    let ea = effective_address(cpu, ins);
    // Check both parts before writing either.
    cpu.seg_check(seg, ea, 6, popek_vcpu::mmu::Access::Write)?;
    cpu.write_mem(seg, ea, 2, u64::from(limit))?;
    cpu.write_mem(seg, ea.wrapping_add(2), 4, u64::from(base))
}

/// Store a 16-bit system value (SLDT, STR, SMSW, MOV r/m, Sreg): a register
/// destination of 32 bits is zero-extended, memory receives 16 bits.
fn store_selector(cpu: &mut Vcpu, ins: &Instruction, v: u32) -> VResult<()> {
    match ins.op0_kind() {
        OpKind::Register => {
            set_reg(cpu, ins.op0_register(), v);
            Ok(())
        }
        _ => write_op(cpu, ins, 0, 2, v),
    }
}

/// Does every CPUID feature the instruction needs exist on popek's CPU model?
fn on_cpu_model(ins: &Instruction) -> bool {
    ins.cpuid_features().iter().all(|f| {
        matches!(
            f,
            CpuidFeature::INTEL8086
                | CpuidFeature::INTEL8086_ONLY
                | CpuidFeature::INTEL186
                | CpuidFeature::INTEL286
                | CpuidFeature::INTEL386
                | CpuidFeature::INTEL486
                | CpuidFeature::CPUID
                | CpuidFeature::TSC
                | CpuidFeature::MSR
                | CpuidFeature::CX8
                | CpuidFeature::CMOV
                | CpuidFeature::PAUSE
        )
    })
}

/// Execute a decoded instruction. `cpu.eip` already points past it.
pub fn execute(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    if crate::x87::is_x87(ins) {
        return crate::x87::execute(cpu, ins);
    }
    match ins.mnemonic() {
        M::Add | M::Adc | M::Sub | M::Sbb | M::Cmp | M::And | M::Or | M::Xor | M::Test => {
            binary_alu(cpu, ins)?
        }
        M::Inc | M::Dec => {
            let size = size0(ins);
            let l = loc(cpu, ins, 0);
            let a = read_loc(cpu, l, size)? & mask(size);
            let (r, f) = alu::incdec(a, ins.mnemonic() == M::Dec, size);
            write_loc(cpu, l, size, r)?;
            set_flags(cpu, f);
        }
        M::Neg => {
            let size = size0(ins);
            let l = loc(cpu, ins, 0);
            let a = read_loc(cpu, l, size)? & mask(size);
            let (r, mut f) = alu::sub(0, a, false, size);
            f.value = (f.value & !CF) | if a != 0 { CF } else { 0 };
            write_loc(cpu, l, size, r)?;
            set_flags(cpu, f);
        }
        M::Not => {
            let size = size0(ins);
            let l = loc(cpu, ins, 0);
            let a = read_loc(cpu, l, size)?;
            write_loc(cpu, l, size, !a)?;
        }
        M::Mul | M::Imul | M::Div | M::Idiv => mul_div(cpu, ins)?,
        M::Rol | M::Ror | M::Rcl | M::Rcr | M::Shl | M::Sal | M::Shr | M::Sar => {
            shift_op(cpu, ins)?
        }
        M::Shld | M::Shrd => {
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
        }
        M::Bt | M::Bts | M::Btr | M::Btc => bit_test(cpu, ins)?,
        M::Bsf | M::Bsr => {
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
            }
        }
        // F3 0F BC/BD: BSF/BSR on a CPU without BMI1/LZCNT, but glibc
        // emits them expecting either; the host (the oracle, and what
        // translated code runs on) has them, so popek behaves like it.
        M::Tzcnt | M::Lzcnt => {
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
        }
        M::Daa | M::Das | M::Aaa | M::Aas | M::Aam | M::Aad => bcd(cpu, ins)?,

        M::Mov => mov(cpu, ins)?,
        M::Movzx | M::Movsx => {
            let dsize = size0(ins);
            let ssize = op_size(ins, 1);
            let v = read_op(cpu, ins, 1, ssize)?;
            let v = if ins.mnemonic() == M::Movsx {
                sext(v, ssize) as u32
            } else {
                v
            };
            set_reg(cpu, ins.op0_register(), v & mask(dsize));
        }
        M::Xchg => {
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
            }
        }
        M::Xadd => {
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
        }
        M::Cmpxchg => {
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
        }
        M::Cmpxchg8b => {
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
            }
        }
        M::Bswap => {
            let r = ins.op0_register();
            let v = get_reg(cpu, r);
            // BSWAP r16 is undefined; popek clears the register's low word.
            let n = if r.size() == 4 { v.swap_bytes() } else { 0 };
            set_reg(cpu, r, n);
        }
        M::Lea => {
            let size = size0(ins);
            let ea = effective_address(cpu, ins);
            set_reg(cpu, ins.op0_register(), ea & mask(size));
        }
        M::Cmovo
        | M::Cmovno
        | M::Cmovb
        | M::Cmovae
        | M::Cmove
        | M::Cmovne
        | M::Cmovbe
        | M::Cmova
        | M::Cmovs
        | M::Cmovns
        | M::Cmovp
        | M::Cmovnp
        | M::Cmovl
        | M::Cmovge
        | M::Cmovle
        | M::Cmovg => {
            let size = size0(ins);
            // the source is read (and may fault) whatever the condition
            let v = read_op(cpu, ins, 1, size)?;
            if condition(cpu, ins.condition_code()) {
                set_reg(cpu, ins.op0_register(), v);
            }
        }
        M::Seto
        | M::Setno
        | M::Setb
        | M::Setae
        | M::Sete
        | M::Setne
        | M::Setbe
        | M::Seta
        | M::Sets
        | M::Setns
        | M::Setp
        | M::Setnp
        | M::Setl
        | M::Setge
        | M::Setle
        | M::Setg => {
            let v = u32::from(condition(cpu, ins.condition_code()));
            write_op(cpu, ins, 0, 1, v)?;
        }

        M::Push => push(cpu, ins)?,
        M::Pop => pop(cpu, ins)?,
        M::Pusha | M::Pushad => {
            let size = if ins.mnemonic() == M::Pushad { 4 } else { 2 };
            let esp = cpu.regs[reg::ESP];
            for r in 0..8 {
                let v = if r == reg::ESP { esp } else { cpu.regs[r] };
                cpu.push(v & mask(size), size)?;
            }
        }
        M::Popa | M::Popad => {
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
        }
        M::Pushf | M::Pushfd => cpu.pushf(ins.mnemonic() == M::Pushfd)?,
        M::Popf | M::Popfd => cpu.popf(ins.mnemonic() == M::Popfd)?,
        M::Enter => enter(cpu, ins)?,
        M::Leave => {
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
            }
        }
        M::Cbw => set_reg(cpu, Register::AX, sext(cpu.regs[reg::EAX], 1) as u32),
        M::Cwde => cpu.regs[reg::EAX] = sext(cpu.regs[reg::EAX], 2) as u32,
        M::Cwd => {
            let hi = if cpu.regs[reg::EAX] & 0x8000 != 0 {
                0xFFFF
            } else {
                0
            };
            set_reg(cpu, Register::DX, hi);
        }
        M::Cdq => {
            cpu.regs[reg::EDX] = if cpu.regs[reg::EAX] & 0x8000_0000 != 0 {
                u32::MAX
            } else {
                0
            }
        }
        M::Xlatb => {
            let v = read_op(cpu, ins, 0, 1)?;
            set_reg(cpu, Register::AL, v);
        }
        M::Lahf => {
            let f = cpu.eflags & (SF | ZF | AF | PF | CF) | 2;
            set_reg(cpu, Register::AH, f);
        }
        M::Sahf => {
            let ah = (cpu.regs[reg::EAX] >> 8) & 0xFF;
            let m = SF | ZF | AF | PF | CF;
            set_flags(cpu, Flags { mask: m, value: ah });
        }
        M::Lds | M::Les | M::Lfs | M::Lgs | M::Lss => {
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
        }

        M::Clc => cpu.eflags &= !CF,
        M::Stc => cpu.eflags |= CF,
        M::Cmc => cpu.eflags ^= CF,
        M::Cld => cpu.eflags &= !DF,
        M::Std => cpu.eflags |= DF,
        M::Cli => cpu.cli()?,
        M::Sti => cpu.sti()?,
        // ENDBR32/64 are hint NOPs (0F 1E) on a CPU without CET.
        M::Nop | M::Pause | M::Wait | M::Endbr32 | M::Endbr64 => {}
        M::Ud2 | M::Ud0 | M::Ud1 => return Err(Fault::ud()),
        M::Hlt => cpu.hlt()?,

        M::Jmp => {
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
            }
        }
        M::Jo
        | M::Jno
        | M::Jb
        | M::Jae
        | M::Je
        | M::Jne
        | M::Jbe
        | M::Ja
        | M::Js
        | M::Jns
        | M::Jp
        | M::Jnp
        | M::Jl
        | M::Jge
        | M::Jle
        | M::Jg => {
            if condition(cpu, ins.condition_code()) {
                jump(cpu, ins.near_branch_target() as u32)?;
            }
        }
        M::Jcxz | M::Jecxz => {
            let c = if ins.mnemonic() == M::Jcxz {
                cpu.regs[reg::ECX] & 0xFFFF
            } else {
                cpu.regs[reg::ECX]
            };
            if c == 0 {
                jump(cpu, ins.near_branch_target() as u32)?;
            }
        }
        M::Loop | M::Loope | M::Loopne => {
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
        }
        M::Call => {
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
            }
        }
        M::Ret => {
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
        }
        M::Retf => {
            let op32 = matches!(ins.code(), Code::Retfd | Code::Retfd_imm16);
            let imm = if ins.op_count() > 0 {
                ins.immediate16()
            } else {
                0
            };
            cpu.far_ret(op32, imm)?;
        }
        M::Iret | M::Iretd => cpu.iret(ins.mnemonic() == M::Iretd)?,
        M::Int => cpu.software_interrupt(ins.immediate8())?,
        M::Int3 => cpu.software_interrupt(vector::BP)?,
        M::Into => {
            if flag(cpu, OF) {
                cpu.software_interrupt(vector::OF)?;
            }
        }
        M::Int1 => cpu.software_interrupt(vector::DB)?,
        M::Bound => {
            let size = size0(ins);
            let idx = sext(get_reg(cpu, ins.op0_register()), size);
            let seg = seg_of(ins.memory_segment());
            let ea = effective_address(cpu, ins);
            let lo = sext(cpu.read_mem(seg, ea, size)? as u32, size);
            let hi = sext(cpu.read_mem(seg, ea.wrapping_add(size), size)? as u32, size);
            if idx < lo || idx > hi {
                return Err(Fault::exc(vector::BR));
            }
        }

        M::Movsb
        | M::Movsw
        | M::Movsd
        | M::Stosb
        | M::Stosw
        | M::Stosd
        | M::Lodsb
        | M::Lodsw
        | M::Lodsd
        | M::Cmpsb
        | M::Cmpsw
        | M::Cmpsd
        | M::Scasb
        | M::Scasw
        | M::Scasd
        | M::Insb
        | M::Insw
        | M::Insd
        | M::Outsb
        | M::Outsw
        | M::Outsd => string::execute(cpu, ins)?,

        M::In => {
            let size = size0(ins);
            let port = port_operand(cpu, ins, 1);
            let v = cpu.port_in(port, size as u8)?;
            set_reg(cpu, ins.op0_register(), v);
        }
        M::Out => {
            let size = op_size(ins, 1);
            let port = port_operand(cpu, ins, 0);
            let v = get_reg(cpu, ins.op1_register());
            cpu.port_out(port, size as u8, v)?;
        }
        M::Cpuid => cpu.cpuid(),
        M::Rdtsc => cpu.rdtsc()?,
        M::Rdmsr => cpu.rdmsr()?,
        M::Wrmsr => cpu.wrmsr()?,
        M::Lgdt | M::Lidt => {
            let (limit, base) = table_operand(cpu, ins)?;
            // A 0x66 prefix selects the 24-bit-base form.
            let op32 = !matches!(ins.code(), Code::Lgdt_m1632_16 | Code::Lidt_m1632_16);
            if ins.mnemonic() == M::Lgdt {
                cpu.lgdt(limit, base, op32)?;
            } else {
                cpu.lidt(limit, base, op32)?;
            }
        }
        M::Sgdt | M::Sidt => {
            let (limit, base) = if ins.mnemonic() == M::Sgdt {
                cpu.sgdt()
            } else {
                cpu.sidt()
            };
            store_table(cpu, ins, limit, base)?;
        }
        M::Sldt => {
            let v = u32::from(cpu.sldt());
            store_selector(cpu, ins, v)?;
        }
        M::Str => {
            let v = u32::from(cpu.str_());
            store_selector(cpu, ins, v)?;
        }
        M::Smsw => {
            let v = cpu.smsw();
            match ins.op0_kind() {
                OpKind::Register => set_reg(cpu, ins.op0_register(), v),
                _ => write_op(cpu, ins, 0, 2, v)?,
            }
        }
        M::Lldt => {
            let sel = read_op(cpu, ins, 0, 2)? as u16;
            cpu.lldt(sel)?;
        }
        M::Ltr => {
            let sel = read_op(cpu, ins, 0, 2)? as u16;
            cpu.ltr(sel)?;
        }
        M::Lmsw => {
            let v = read_op(cpu, ins, 0, 2)? as u16;
            cpu.lmsw(v)?;
        }
        M::Clts => cpu.clts()?,
        M::Invlpg => cpu.invlpg()?,
        M::Invd | M::Wbinvd => cpu.invd()?,
        M::Lar | M::Lsl => {
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
            }
        }
        M::Verr | M::Verw => {
            let sel = read_op(cpu, ins, 0, 2)? as u16;
            let ok = cpu.verify(sel, ins.mnemonic() == M::Verw)?;
            set_flags(
                cpu,
                Flags {
                    mask: ZF,
                    value: if ok { ZF } else { 0 },
                },
            );
        }
        _ => {
            if on_cpu_model(ins) {
                return Err(Fault::unsupported(format!(
                    "instruction `{ins}` is not implemented by the interpreter"
                )));
            }
            // Not on a Pentium Pro-class CPU (MMX, SSE, ...): #UD, as there.
            return Err(Fault::ud());
        }
    }
    Ok(())
}

fn port_operand(cpu: &Vcpu, ins: &Instruction, i: u32) -> u16 {
    match ins.op_kind(i) {
        OpKind::Immediate8 => u16::from(ins.immediate8()),
        _ => cpu.regs[reg::EDX] as u16,
    }
}

fn mov(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let r0 = if ins.op0_kind() == OpKind::Register {
        ins.op0_register()
    } else {
        Register::None
    };
    let r1 = if ins.op1_kind() == OpKind::Register {
        ins.op1_register()
    } else {
        Register::None
    };
    if r0.is_segment_register() {
        let sel = read_op(cpu, ins, 1, 2)? as u16;
        let s = seg_of(r0);
        cpu.load_seg(s, sel)?;
        if s == SegReg::Ss {
            cpu.int_shadow = true;
        }
        return Ok(());
    }
    if r1.is_segment_register() {
        let v = u32::from(cpu.seg(seg_of(r1)).selector);
        return store_selector(cpu, ins, v);
    }
    if r0.is_cr() {
        let n = (r0 as u32 - Register::CR0 as u32) as u8;
        return cpu.mov_to_cr(n, get_reg(cpu, r1));
    }
    if r1.is_cr() {
        let n = (r1 as u32 - Register::CR0 as u32) as u8;
        let v = cpu.mov_from_cr(n)?;
        set_reg(cpu, r0, v);
        return Ok(());
    }
    if r0.is_dr() {
        let n = (r0 as u32 - Register::DR0 as u32) as u8;
        return cpu.mov_to_dr(n, get_reg(cpu, r1));
    }
    if r1.is_dr() {
        let n = (r1 as u32 - Register::DR0 as u32) as u8;
        let v = cpu.mov_from_dr(n)?;
        set_reg(cpu, r0, v);
        return Ok(());
    }
    let size = size0(ins);
    let v = read_op(cpu, ins, 1, size)?;
    write_op(cpu, ins, 0, size, v)
}

fn push(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = stack_size(ins);
    let v = match ins.op0_kind() {
        OpKind::Register if ins.op0_register().is_segment_register() => {
            // PUSH Sreg: zero-extended to the operand size (docs/quirks.md).
            get_reg(cpu, ins.op0_register())
        }
        _ => read_op(cpu, ins, 0, size)?,
    };
    cpu.push(v & mask(size), size)
}

fn pop(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = stack_size(ins);
    if ins.op0_kind() == OpKind::Register {
        let r = ins.op0_register();
        let v = cpu.peek(0, size)?;
        if r.is_segment_register() {
            let s = seg_of(r);
            cpu.load_seg(s, v as u16)?;
            if s == SegReg::Ss {
                cpu.int_shadow = true;
            }
            cpu.pop(size)?;
        } else {
            cpu.pop(size)?;
            // POP ESP loads the popped value, after the increment.
            set_reg(cpu, r, v);
        }
        return Ok(());
    }
    // POP m: the address is computed after ESP is incremented.
    let v = cpu.peek(0, size)?;
    let old_esp = cpu.regs[reg::ESP];
    cpu.pop(size)?;
    if let Err(e) = write_op(cpu, ins, 0, size, v) {
        cpu.regs[reg::ESP] = old_esp;
        return Err(e);
    }
    Ok(())
}

fn enter(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = if ins.code() == Code::Enterw_imm16_imm8 {
        2
    } else {
        4
    };
    let alloc = u32::from(ins.immediate16());
    let level = u32::from(ins.immediate8_2nd()) % 32;
    let big = cpu.seg(SegReg::Ss).big();
    let m = cpu.stack_mask();
    cpu.push(cpu.regs[reg::EBP] & mask(size), size)?;
    let frame_temp = cpu.regs[reg::ESP];
    if level > 0 {
        let mut ebp = cpu.regs[reg::EBP];
        for _ in 1..level {
            ebp = (ebp & !m) | (ebp.wrapping_sub(size) & m);
            let v = cpu.read_mem(SegReg::Ss, ebp & m, size)? as u32;
            cpu.push(v, size)?;
        }
        cpu.push(frame_temp & mask(size), size)?;
    }
    if big {
        if size == 4 {
            cpu.regs[reg::EBP] = frame_temp;
        } else {
            set_reg(cpu, Register::BP, frame_temp);
        }
    } else {
        set_reg(cpu, Register::BP, frame_temp);
    }
    let esp = cpu.regs[reg::ESP];
    cpu.regs[reg::ESP] = (esp & !m) | (esp.wrapping_sub(alloc) & m);
    Ok(())
}
