//! Arithmetic and logic with EFLAGS exactly as the Intel SDM defines them.
//!
//! Every function takes operands already masked to `size` bytes (1, 2 or 4)
//! and returns the result plus a [`Flags`] update: the bits it defines and
//! their new values. Flags the SDM leaves undefined are not in the update,
//! so they keep their old value (docs/quirks.md lists each case).

use popek_vcpu::flags::{AF, ARITH, CF, OF, PF, SF, ZF};

/// A partial EFLAGS update: `mask` says which bits are written with `value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flags {
    /// Bits defined by the operation.
    pub mask: u32,
    /// Their new values.
    pub value: u32,
}

impl Flags {
    /// No flag changes.
    pub const NONE: Flags = Flags { mask: 0, value: 0 };

    /// Apply to an EFLAGS value.
    #[inline]
    pub fn apply(self, eflags: u32) -> u32 {
        (eflags & !self.mask) | (self.value & self.mask)
    }
}

/// All-ones mask for an operand of `size` bytes.
#[inline]
pub fn mask(size: u32) -> u32 {
    if size >= 4 {
        u32::MAX
    } else {
        (1u32 << (size * 8)) - 1
    }
}

/// The sign bit of an operand of `size` bytes.
#[inline]
pub fn sign(size: u32) -> u32 {
    1u32 << (size * 8 - 1)
}

/// Sign-extend a `size`-byte value to 32 bits.
#[inline]
pub fn sext(v: u32, size: u32) -> i32 {
    match size {
        1 => v as u8 as i8 as i32,
        2 => v as u16 as i16 as i32,
        _ => v as i32,
    }
}

/// PF: set when the low byte has an even number of 1 bits.
#[inline]
pub fn parity(v: u32) -> bool {
    (v as u8).count_ones() % 2 == 0
}

#[inline]
fn bit(c: bool, f: u32) -> u32 {
    if c {
        f
    } else {
        0
    }
}

/// SF, ZF and PF of a result.
#[inline]
pub fn szp(res: u32, size: u32) -> u32 {
    bit(res & sign(size) != 0, SF) | bit(res & mask(size) == 0, ZF) | bit(parity(res), PF)
}

/// ADD/ADC: `a + b + carry`.
pub fn add(a: u32, b: u32, carry: bool, size: u32) -> (u32, Flags) {
    let m = mask(size);
    let wide = u64::from(a) + u64::from(b) + u64::from(carry);
    let res = (wide as u32) & m;
    let value = szp(res, size)
        | bit(wide > u64::from(m), CF)
        | bit((a ^ b ^ res) & 0x10 != 0, AF)
        | bit((a ^ res) & (b ^ res) & sign(size) != 0, OF);
    (res, Flags { mask: ARITH, value })
}

/// SUB/SBB/CMP/NEG: `a - b - borrow`.
pub fn sub(a: u32, b: u32, borrow: bool, size: u32) -> (u32, Flags) {
    let m = mask(size);
    let res = a.wrapping_sub(b).wrapping_sub(u32::from(borrow)) & m;
    let value = szp(res, size)
        | bit(u64::from(a) < u64::from(b) + u64::from(borrow), CF)
        | bit((a ^ b ^ res) & 0x10 != 0, AF)
        | bit((a ^ b) & (a ^ res) & sign(size) != 0, OF);
    (res, Flags { mask: ARITH, value })
}

/// AND/OR/XOR/TEST: CF = OF = 0, SF ZF PF from the result. AF is undefined
/// by the SDM; popek clears it, as Intel and AMD processors do.
pub fn logic(res: u32, size: u32) -> Flags {
    Flags {
        mask: ARITH,
        value: szp(res, size),
    }
}

/// INC/DEC: like ADD/SUB 1 but CF is preserved.
pub fn incdec(a: u32, dec: bool, size: u32) -> (u32, Flags) {
    let (res, f) = if dec {
        sub(a, 1, false, size)
    } else {
        add(a, 1, false, size)
    };
    (
        res,
        Flags {
            mask: ARITH & !CF,
            value: f.value,
        },
    )
}

/// The shift and rotate group. `count` is the raw count operand (CL or an
/// immediate); it is masked to 5 bits here as the SDM specifies for all
/// operand sizes below 64 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shift {
    /// ROL.
    Rol,
    /// ROR.
    Ror,
    /// RCL.
    Rcl,
    /// RCR.
    Rcr,
    /// SHL/SAL.
    Shl,
    /// SHR.
    Shr,
    /// SAR.
    Sar,
}

/// Execute a shift or rotate. `cf` is the incoming carry flag.
pub fn shift(op: Shift, a: u32, count: u32, cf: bool, size: u32) -> (u32, Flags) {
    let w = size * 8;
    let m = mask(size);
    let count = count & 0x1F;
    if count == 0 {
        return (a, Flags::NONE);
    }
    let msb = |v: u32| v & sign(size) != 0;
    let a64 = u64::from(a);
    match op {
        Shift::Shl => {
            let res = ((a64 << count) as u32) & m;
            let c = (a64 << count) >> w & 1 != 0;
            let mut f = Flags {
                mask: CF | SF | ZF | PF,
                value: szp(res, size) | bit(c, CF),
            };
            if count == 1 {
                f.mask |= OF;
                f.value |= bit(msb(res) != c, OF);
            }
            (res, f)
        }
        Shift::Shr => {
            let res = if count >= w { 0 } else { a >> count };
            let c = (a64 >> (count - 1)) & 1 != 0;
            let mut f = Flags {
                mask: CF | SF | ZF | PF,
                value: szp(res, size) | bit(c, CF),
            };
            if count == 1 {
                f.mask |= OF;
                f.value |= bit(msb(a), OF);
            }
            (res, f)
        }
        Shift::Sar => {
            let s = i64::from(sext(a, size));
            let res = ((s >> count.min(63)) as u32) & m;
            let c = (s >> (count - 1).min(63)) & 1 != 0;
            let mut f = Flags {
                mask: CF | SF | ZF | PF,
                value: szp(res, size) | bit(c, CF),
            };
            if count == 1 {
                f.mask |= OF;
            }
            (res, f)
        }
        Shift::Rol => {
            let tc = count % w;
            let res = if tc == 0 {
                a
            } else {
                ((a << tc) | (a >> (w - tc))) & m
            };
            let c = res & 1 != 0;
            let mut f = Flags {
                mask: CF,
                value: bit(c, CF),
            };
            if count == 1 {
                f.mask |= OF;
                f.value |= bit(msb(res) != c, OF);
            }
            (res, f)
        }
        Shift::Ror => {
            let tc = count % w;
            let res = if tc == 0 {
                a
            } else {
                ((a >> tc) | (a << (w - tc))) & m
            };
            let c = msb(res);
            let mut f = Flags {
                mask: CF,
                value: bit(c, CF),
            };
            if count == 1 {
                f.mask |= OF;
                f.value |= bit(msb(res) != (res & (sign(size) >> 1) != 0), OF);
            }
            (res, f)
        }
        Shift::Rcl | Shift::Rcr => {
            let tc = if w == 32 { count } else { count % (w + 1) };
            // OF for RCR is computed from the operand before rotation.
            let of_rcr = msb(a) != cf;
            // Rotate the (w+1)-bit quantity CF:a.
            let mut v = (u64::from(cf) << w) | a64;
            let span = w + 1;
            let vm = (1u64 << span) - 1;
            if tc != 0 {
                v = if op == Shift::Rcl {
                    ((v << tc) | (v >> (span - tc))) & vm
                } else {
                    ((v >> tc) | (v << (span - tc))) & vm
                };
            }
            let res = (v as u32) & m;
            let c = (v >> w) & 1 != 0;
            let mut f = if tc == 0 {
                Flags::NONE
            } else {
                Flags {
                    mask: CF,
                    value: bit(c, CF),
                }
            };
            if count == 1 {
                f.mask |= OF;
                f.value |= if op == Shift::Rcl {
                    bit(msb(res) != c, OF)
                } else {
                    bit(of_rcr, OF)
                };
            }
            (res, f)
        }
    }
}

/// SHLD (`left`) or SHRD: shift `dst` by `count`, filling from `src`.
/// Counts above the operand width (16-bit forms only) give an undefined
/// result; popek shifts through `dst:src:dst` as Intel processors do.
pub fn double_shift(left: bool, dst: u32, src: u32, count: u32, size: u32) -> (u32, Flags) {
    let w = u128::from(size * 8);
    let count = u128::from(count & 0x1F);
    if count == 0 {
        return (dst, Flags::NONE);
    }
    let m = u128::from(mask(size));
    let (d, s) = (u128::from(dst) & m, u128::from(src) & m);
    // Shift through dst:src:dst (3w <= 96 bits, so u128 holds it).
    let (res, c) = if left {
        let cat = (d << (2 * w)) | (s << w) | d;
        let shifted = cat << count;
        (
            ((shifted >> (2 * w)) & m) as u32,
            (shifted >> (3 * w)) & 1 != 0,
        )
    } else {
        let cat = d | (s << w) | (d << (2 * w));
        (((cat >> count) & m) as u32, (cat >> (count - 1)) & 1 != 0)
    };
    let mut f = Flags {
        mask: CF | SF | ZF | PF,
        value: szp(res, size) | bit(c, CF),
    };
    if count == 1 {
        f.mask |= OF;
        f.value |= bit((u128::from(res) ^ d) & (1 << (w - 1)) != 0, OF);
    }
    (res, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_sub_flags_on_boundaries() {
        let (r, f) = add(0x7F, 1, false, 1);
        assert_eq!(r, 0x80);
        assert_eq!(f.value & (OF | SF | AF | CF | ZF), OF | SF | AF);
        let (r, f) = add(0xFFFF_FFFF, 0, true, 4);
        assert_eq!(r, 0);
        assert_eq!(f.value & (CF | ZF | OF), CF | ZF);
        let (r, f) = sub(0, 1, false, 2);
        assert_eq!(r, 0xFFFF);
        assert_eq!(f.value & (CF | SF | OF | AF), CF | SF | AF);
        let (_, f) = sub(0x80, 1, false, 1);
        assert_eq!(f.value & OF, OF);
        // SBB with borrow where b = 0xFFFFFFFF must still borrow
        let (r, f) = sub(5, 0xFFFF_FFFF, true, 4);
        assert_eq!(r, 5);
        assert_eq!(f.value & CF, CF);
    }

    #[test]
    fn shifts_and_rotates() {
        assert_eq!(shift(Shift::Shl, 0x81, 1, false, 1).0, 0x02);
        assert_eq!(
            shift(Shift::Shl, 0x81, 1, false, 1).1.value & (CF | OF),
            CF | OF
        );
        assert_eq!(shift(Shift::Shr, 0x80, 8, false, 1).0, 0);
        assert_eq!(shift(Shift::Shr, 0x80, 8, false, 1).1.value & CF, CF);
        assert_eq!(shift(Shift::Sar, 0x8000, 15, false, 2).0, 0xFFFF);
        // 8-bit ROL by 8: value unchanged, CF = bit 0 of the result
        let (r, f) = shift(Shift::Rol, 0x01, 8, false, 1);
        assert_eq!((r, f.value & CF, f.mask & CF), (0x01, CF, CF));
        // count 32 masks to 0: nothing changes
        assert_eq!(shift(Shift::Shl, 5, 32, false, 4), (5, Flags::NONE));
        // RCL 8-bit by 9 is the identity and leaves CF alone
        assert_eq!(shift(Shift::Rcl, 0x55, 9, true, 1), (0x55, Flags::NONE));
        assert_eq!(shift(Shift::Rcr, 0x01, 1, true, 1).0, 0x80);
        assert_eq!(shift(Shift::Rcr, 0x01, 1, true, 1).1.value & CF, CF);
    }

    #[test]
    fn double_shifts() {
        assert_eq!(
            double_shift(true, 0x1234_5678, 0x9ABC_DEF0, 8, 4).0,
            0x3456_789A
        );
        assert_eq!(
            double_shift(false, 0x1234_5678, 0x9ABC_DEF0, 8, 4).0,
            0xF012_3456
        );
        assert_eq!(
            double_shift(true, 0x8000, 0, 1, 2).1.value & (CF | OF | ZF),
            CF | OF | ZF
        );
    }
}
