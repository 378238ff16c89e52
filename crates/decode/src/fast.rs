//! The fast scanner: the common innocuous instructions of 32-bit code,
//! recognized from their bytes alone, without a full decode.
//!
//! Most of a kernel's or a program's instructions are register and memory
//! moves and arithmetic with no prefix: MOV, ALU, TEST, LEA, MOVZX/MOVSX,
//! shifts, INC/DEC, IMUL, SETcc, CMOVcc, and PUSH/POP of a register (whose
//! host code is a template with the register put in). For those the translator needs no
//! decoded operands: their length, where the ModRM byte is (if they address
//! memory), whether the address is a bare `[disp32]` and whether ESP is in
//! ModRM (R12 on the host: a REX prefix) say how to copy them (see `popek_translate::lower::copy_fast`). [`plain`] finds that
//! from the bytes with two lookup tables (opcode map: Intel SDM Vol. 2D,
//! appendix A.3, one- and two-byte opcode tables; ModRM/SIB lengths: Vol.
//! 2A, 2.1.5 tables 2-2 and 2-3). [`take`] also takes them behind a DS,
//! ES or SS override (flat wherever translated code runs: the host code
//! drops it), behind an operand-size prefix (kept: 16-bit operands and
//! immediates) and MOV between the accumulator and `[moffs32]`. Anything
//! else (another prefix, an opcode not in the tables, AH..BH beside ESP)
//! is None and goes through iced-x86 as before.
//!
//! The translator's tests `fast_scanner_agrees_with_the_decoder`,
//! `fast_scanner_prefixes_and_moffs` and `fast_scanner_operand_size` hold
//! this to iced-x86 and the full lowering on every opcode of the tables
//! with every ModRM and SIB byte.

use iced_x86::Instruction;

/// What the fast scanner found: one word (built and handed on in a
/// register, as the scanner's inner loop wants), read through its methods.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Plain(std::num::NonZeroU32);

/// Where [`Plain`]'s fields are in its word: the length (bits 0-7), the
/// REX prefix (8-15), the ModRM offset (16-17), then one bit each; bit 31
/// always set (the word is never zero: `Option<Plain>` is one word too).
const P_REX: u32 = 8;
const P_MODRM: u32 = 16;
const P_ABSOLUTE: u32 = 1 << 18;
const P_INC_DEC: u32 = 1 << 19;
const P_HIGH8: u32 = 1 << 20;
const P_PREFIX: u32 = 1 << 21;
const P_MOFFS: u32 = 1 << 22;
const P_STACK: u32 = 1 << 23;
const P_OPSIZE: u32 = 1 << 24;
const P_SET: u32 = 1 << 31;

impl Plain {
    /// From its fields (see the methods).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn new(
        len: usize,
        modrm: usize,
        absolute: bool,
        inc_dec: bool,
        rex: u8,
        high8: bool,
        moffs: bool,
        stack: bool,
    ) -> Plain {
        let bit = |on: bool, b: u32| if on { b } else { 0 };
        let w = P_SET
            | len as u32
            | u32::from(rex) << P_REX
            | (modrm as u32) << P_MODRM
            | bit(absolute, P_ABSOLUTE)
            | bit(inc_dec, P_INC_DEC)
            | bit(high8, P_HIGH8)
            | bit(moffs, P_MOFFS)
            | bit(stack, P_STACK);
        Plain(std::num::NonZeroU32::new(w).unwrap_or(std::num::NonZeroU32::MAX))
    }

    /// The instruction's length in bytes (never 0: no `is_empty`).
    #[inline(always)]
    #[allow(clippy::len_without_is_empty)]
    pub fn len(self) -> u8 {
        self.0.get() as u8
    }

    /// The offset of its ModRM byte when it addresses memory, else 0.
    #[inline(always)]
    pub fn modrm(self) -> u8 {
        (self.0.get() >> P_MODRM) as u8 & 3
    }

    /// The memory operand is a bare `[disp32]` (ModRM mod 00, r/m 101).
    #[inline(always)]
    pub fn absolute(self) -> bool {
        self.0.get() & P_ABSOLUTE != 0
    }

    /// INC or DEC of a register in its one-byte form (0x40-0x4F, a REX
    /// prefix in 64-bit mode).
    #[inline(always)]
    pub fn inc_dec(self) -> bool {
        self.0.get() & P_INC_DEC != 0
    }

    /// The REX prefix the host needs for ESP (R12 there) as ModRM.reg
    /// (REX.R), as ModRM.rm or as the SIB base (REX.B), else 0.
    #[inline(always)]
    pub fn rex(self) -> u8 {
        (self.0.get() >> P_REX) as u8
    }

    /// A byte register in ModRM is AH, CH, DH or BH (which a REX prefix
    /// would make SPL, BPL, SIL or DIL).
    #[inline(always)]
    pub fn high8(self) -> bool {
        self.0.get() & P_HIGH8 != 0
    }

    /// Bytes of prefix before the instruction that its host code drops (a
    /// DS, ES or SS override, see [`take`]) or puts back in its own place
    /// (the operand-size prefix, [`Plain::opsize`]); `len` counts them,
    /// `modrm` does not.
    #[inline(always)]
    pub fn prefix(self) -> u8 {
        u8::from(self.0.get() & P_PREFIX != 0)
    }

    /// Behind an operand-size prefix (0x66: 16-bit operands and
    /// immediates), which the host code keeps: after `gs addr32`, before
    /// the REX prefix.
    #[inline(always)]
    pub fn opsize(self) -> bool {
        self.0.get() & P_OPSIZE != 0
    }

    /// A MOV between the accumulator and `[moffs32]` (A0-A3): memory
    /// without a ModRM byte.
    #[inline(always)]
    pub fn moffs(self) -> bool {
        self.0.get() & P_MOFFS != 0
    }

    /// PUSH r32 or POP r32 in the one-byte form (0x50-0x5F, ESP too): host
    /// code addressing the guest's stack (see
    /// `popek_translate::lower::copy_fast`), not the guest's bytes.
    #[inline(always)]
    pub fn stack(self) -> bool {
        self.0.get() & P_STACK != 0
    }

    /// The same behind a one-byte prefix the host code drops.
    fn prefixed(self) -> Plain {
        Plain(self.0.saturating_add(1 | P_PREFIX))
    }

    /// The same behind an operand-size prefix (the host code's too).
    fn sized16(self) -> Plain {
        Plain(self.0.saturating_add(1 | P_PREFIX | P_OPSIZE))
    }
}

impl std::fmt::Debug for Plain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plain")
            .field("len", &self.len())
            .field("modrm", &self.modrm())
            .field("absolute", &self.absolute())
            .field("inc_dec", &self.inc_dec())
            .field("rex", &self.rex())
            .field("high8", &self.high8())
            .field("prefix", &self.prefix())
            .field("moffs", &self.moffs())
            .field("stack", &self.stack())
            .field("opsize", &self.opsize())
            .finish()
    }
}

// One opcode's entry: what follows the opcode and what its fields mean.
/// A recognized opcode.
const OK: u16 = 1;
/// A ModRM byte follows the opcode.
const MODRM: u16 = 1 << 1;
/// An 8-bit immediate follows (after ModRM, SIB and displacement).
const IMM8: u16 = 1 << 2;
/// A 32-bit immediate follows (16-bit behind an operand-size prefix).
const IMM32: u16 = 1 << 3;
/// ModRM.reg names a 32-bit register (ESP there is not copyable).
const REG32: u16 = 1 << 4;
/// ModRM.rm with mod 11 names a 32-bit or 16-bit register (ESP, SP: no).
const RM32: u16 = 1 << 5;
/// Memory operand only (LEA: mod 11 is #UD).
const MEM_ONLY: u16 = 1 << 6;
/// The low 3 opcode bits name a 32-bit register (ESP: no, but for
/// STACK); no ModRM.
const OPREG32: u16 = 1 << 7;
/// INC/DEC r32 in the one-byte form.
const INC_DEC: u16 = 1 << 8;
/// F6/F7: the immediate is there only for /0 (TEST).
const IMM_IF_TEST: u16 = 1 << 9;
/// ModRM.reg names a byte register (AH..BH cannot meet a REX prefix).
const REG8: u16 = 1 << 10;
/// ModRM.rm with mod 11 names a byte register.
const RM8: u16 = 1 << 11;
/// PUSH r32 or POP r32 (0x50-0x5F): any register, ESP too.
const STACK: u16 = 1 << 12;
/// The usual two-operand form: r/m32 and r32 (either way round).
const RM_R32: u16 = OK | MODRM | REG32 | RM32;
/// The same with byte registers: r/m8 and r8.
const RM_R8: u16 = OK | MODRM | REG8 | RM8;
/// The ModRM.reg values allowed (an opcode group's /digit), in bits 8..16
/// of the second table.
const ALL_DIGITS: u8 = 0xFF;

/// An ALU pair of rows (00-05 and the like): r/m8,r8; r/m32,r32; r8,r/m8;
/// r32,r/m32; AL,imm8; EAX,imm32.
const fn alu(t: &mut [u16; 256], base: usize) {
    t[base] = RM_R8;
    t[base + 1] = RM_R32;
    t[base + 2] = RM_R8;
    t[base + 3] = RM_R32;
    t[base + 4] = OK | IMM8;
    t[base + 5] = OK | IMM32;
}

/// The one-byte opcode map's recognized entries.
static ONE: [u16; 256] = {
    let mut t = [0u16; 256];
    let mut k = 0;
    while k < 8 {
        alu(&mut t, k * 8);
        k += 1;
    }
    let mut r = 0;
    while r < 8 {
        if r != 4 {
            t[0x40 + r] = OK | OPREG32 | INC_DEC;
            t[0x48 + r] = OK | OPREG32 | INC_DEC;
            t[0xB8 + r] = OK | OPREG32 | IMM32;
            if r != 0 {
                t[0x90 + r] = OK | OPREG32;
            }
        }
        t[0xB0 + r] = OK | IMM8;
        t[0x50 + r] = OK | OPREG32 | STACK;
        t[0x58 + r] = OK | OPREG32 | STACK;
        r += 1;
    }
    t[0x69] = RM_R32 | IMM32;
    t[0x6B] = RM_R32 | IMM8;
    t[0x80] = OK | MODRM | RM8 | IMM8;
    t[0x81] = OK | MODRM | RM32 | IMM32;
    t[0x83] = OK | MODRM | RM32 | IMM8;
    t[0x84] = RM_R8;
    t[0x85] = RM_R32;
    t[0x86] = RM_R8;
    t[0x87] = RM_R32;
    t[0x88] = RM_R8;
    t[0x89] = RM_R32;
    t[0x8A] = RM_R8;
    t[0x8B] = RM_R32;
    t[0x8D] = OK | MODRM | REG32 | MEM_ONLY;
    t[0x90] = OK;
    t[0x98] = OK;
    t[0x99] = OK;
    t[0xA8] = OK | IMM8;
    t[0xA9] = OK | IMM32;
    t[0xC0] = OK | MODRM | RM8 | IMM8;
    t[0xC1] = OK | MODRM | RM32 | IMM8;
    t[0xC6] = OK | MODRM | RM8 | IMM8;
    t[0xC7] = OK | MODRM | RM32 | IMM32;
    t[0xD0] = OK | MODRM | RM8;
    t[0xD1] = OK | MODRM | RM32;
    t[0xD2] = OK | MODRM | RM8;
    t[0xD3] = OK | MODRM | RM32;
    t[0xF6] = OK | MODRM | RM8 | IMM8 | IMM_IF_TEST;
    t[0xF7] = OK | MODRM | RM32 | IMM32 | IMM_IF_TEST;
    t[0xFE] = OK | MODRM | RM8;
    t[0xFF] = OK | MODRM | RM32;
    t
};

/// The /digits each one-byte group allows (all for a non-group opcode).
static ONE_DIGITS: [u8; 256] = {
    let mut t = [ALL_DIGITS; 256];
    // Group 2 (shifts and rotates): /6 is an undocumented alias of /4.
    let shifts = !(1u8 << 6);
    t[0xC0] = shifts;
    t[0xC1] = shifts;
    t[0xD0] = shifts;
    t[0xD1] = shifts;
    t[0xD2] = shifts;
    t[0xD3] = shifts;
    // Group 11: MOV r/m, imm is /0 (C6 F8 and C7 F8 are XABORT, XBEGIN).
    t[0xC6] = 1;
    t[0xC7] = 1;
    // Group 3: TEST /0, NOT, NEG, MUL, IMUL, DIV, IDIV (/1 an alias).
    t[0xF6] = !(1u8 << 1);
    t[0xF7] = !(1u8 << 1);
    // Groups 4 and 5: INC, DEC (the rest of FF transfers control or pushes).
    t[0xFE] = 0b11;
    t[0xFF] = 0b11;
    t
};

/// The two-byte (0F xx) opcode map's recognized entries.
static TWO: [u16; 256] = {
    let mut t = [0u16; 256];
    let mut c = 0;
    while c < 16 {
        // CMOVcc r32, r/m32 and SETcc r/m8.
        t[0x40 + c] = RM_R32;
        t[0x90 + c] = OK | MODRM | RM8;
        c += 1;
    }
    t[0xA3] = RM_R32;
    t[0xAB] = RM_R32;
    t[0xB3] = RM_R32;
    t[0xBB] = RM_R32;
    t[0xA4] = RM_R32 | IMM8;
    t[0xAC] = RM_R32 | IMM8;
    t[0xA5] = RM_R32;
    t[0xAD] = RM_R32;
    t[0xAF] = RM_R32;
    t[0xB6] = OK | MODRM | REG32 | RM8;
    t[0xB7] = RM_R32;
    t[0xBE] = OK | MODRM | REG32 | RM8;
    t[0xBF] = RM_R32;
    t[0xBA] = OK | MODRM | RM32 | IMM8;
    t[0xBC] = RM_R32;
    t[0xBD] = RM_R32;
    t
};

/// The /digits each two-byte group allows.
static TWO_DIGITS: [u8; 256] = {
    let mut t = [ALL_DIGITS; 256];
    // Group 8: BT, BTS, BTR, BTC are /4../7.
    t[0xBA] = 0xF0;
    // SETcc's ModRM.reg is not an operand: /0 only, as encoders write it.
    let mut c = 0;
    while c < 16 {
        t[0x90 + c] = 1;
        c += 1;
    }
    t
};

/// The instruction at the start of `bytes` (32-bit code), if it is one of
/// the fast scanner's: no prefix, an opcode of its tables, no byte register
/// AH..BH beside ESP, and all its bytes in `bytes`.
#[inline(always)]
pub fn plain(bytes: &[u8]) -> Option<Plain> {
    plain_sized(bytes, 4)
}

/// [`plain`] with `imm` bytes for a full-size immediate (4, or 2 behind
/// an operand-size prefix).
#[inline(always)]
fn plain_sized(bytes: &[u8], imm: usize) -> Option<Plain> {
    let &op = bytes.first()?;
    let (entry, digits, at) = if op == 0x0F {
        let &op2 = bytes.get(1)?;
        (TWO[usize::from(op2)], TWO_DIGITS[usize::from(op2)], 2)
    } else {
        (ONE[usize::from(op)], ONE_DIGITS[usize::from(op)], 1)
    };
    if entry & OK == 0 {
        return None;
    }
    if entry & OPREG32 != 0 {
        let len = 1 + if entry & IMM32 != 0 { imm } else { 0 };
        return (bytes.len() >= len).then(|| {
            Plain::new(
                len,
                0,
                false,
                entry & INC_DEC != 0,
                0,
                false,
                false,
                entry & STACK != 0,
            )
        });
    }
    let mut len = at;
    let mut modrm_at = 0usize;
    let mut absolute = false;
    let mut digit = 0;
    let mut rex = 0;
    let mut high8 = false;
    if entry & MODRM != 0 {
        let &modrm = bytes.get(at)?;
        let (md, reg, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
        digit = reg;
        if digits & (1 << reg) == 0 {
            return None;
        }
        if entry & REG32 != 0 && reg == 4 {
            rex |= 0x44;
        }
        len += 1;
        if md == 3 {
            if entry & MEM_ONLY != 0 {
                return None;
            }
            if entry & RM32 != 0 && rm == 4 {
                rex |= 0x41;
            }
        } else {
            modrm_at = at;
            if rm == 4 {
                let &sib = bytes.get(at + 1)?;
                let (index, base) = ((sib >> 3) & 7, sib & 7);
                // ESP as the base is R12 on the host; no base and no index
                // is a bare [disp32] in a SIB (rare: the full path's).
                if base == 4 {
                    rex |= 0x41;
                } else if base == 5 && md == 0 && index == 4 {
                    return None;
                }
                len += 1;
                if base == 5 && md == 0 {
                    len += 4;
                }
            } else if rm == 5 && md == 0 {
                absolute = true;
                len += 4;
            }
            len += match md {
                1 => 1,
                2 => 4,
                _ => 0,
            };
        }
        // A REX prefix makes AH, CH, DH and BH into SPL, BPL, SIL, DIL.
        high8 = (entry & REG8 != 0 && reg >= 4) || (entry & RM8 != 0 && md == 3 && rm >= 4);
        if rex != 0 && high8 {
            return None;
        }
    }
    if entry & IMM_IF_TEST == 0 || digit == 0 {
        if entry & IMM8 != 0 {
            len += 1;
        } else if entry & IMM32 != 0 {
            len += imm;
        }
    }
    (bytes.len() >= len)
        .then(|| Plain::new(len, modrm_at, absolute, false, rex, high8, false, false))
}

/// What the scanner takes at the start of `bytes` (32-bit code): one of
/// [`plain`]'s instructions or a MOV between the accumulator and
/// `[moffs32]` (A0-A3: `mov eax, [addr]` and the like, which compilers
/// write for globals), either of them behind one DS, ES or SS segment
/// override (kernels pad with `3E 8D 74 26 00`, a `lea esi, [esi]` with
/// a DS prefix, and mark some atomics so). Translated code runs only
/// while CS, DS, ES and SS are flat (base 0, limit 4 GiB), so such an
/// override changes nothing and the host code leaves it out. (CS's
/// override is left to the decoder: a write through it faults.) Also one
/// of [`plain`]'s behind an operand-size prefix (16-bit operands: three
/// in four of the Linux boot's instructions the scanner left to the
/// decoder and copied all the same), with a 16-bit immediate where a
/// 32-bit one was, but PUSH, POP and the one-byte INC and DEC (whose
/// host code is not their bytes) and AH..BH operands.
#[inline(always)]
pub fn take(bytes: &[u8]) -> Option<Plain> {
    match plain(bytes) {
        Some(p) => Some(p),
        None if matches!(bytes.first(), Some(0x26 | 0x36 | 0x3E | 0x66 | 0xA0..=0xA3)) => {
            take_prefixed_or_moffs(bytes)
        }
        None => None,
    }
}

/// [`take`] for what [`plain`] does not take (the rarer forms, out of the
/// common path).
#[inline(never)]
fn take_prefixed_or_moffs(bytes: &[u8]) -> Option<Plain> {
    if bytes.first() == Some(&0x66) {
        let p = plain_sized(&bytes[1..], 2)?;
        // (Not with AH..BH: the decoder's path writes some of those anew,
        // without the prefix, which means nothing to a byte operand.)
        return (!p.stack() && !p.inc_dec() && !p.high8()).then(|| p.sized16());
    }
    let prefix = usize::from(matches!(bytes.first()?, 0x26 | 0x36 | 0x3E));
    let rest = &bytes[prefix..];
    let p = match rest.first()? {
        0xA0..=0xA3 => {
            (rest.len() >= 5).then(|| Plain::new(5, 0, false, false, 0, false, true, false))?
        }
        _ if prefix == 1 => plain(rest)?,
        _ => return None,
    };
    Some(if prefix == 1 { p.prefixed() } else { p })
}

/// The one-byte opcodes [`simple`] builds (their operands are a relative
/// target or none): Jcc rel8, CALL rel32, JMP rel32, JMP rel8, RET, LEAVE.
/// (PUSH and POP r32 are [`take`]'s.)
const SIMPLE_ONE: [(u8, u8); 6] = [
    (0x70, 0x7F),
    (0xE8, 0xE8),
    (0xE9, 0xE9),
    (0xEB, 0xEB),
    (0xC3, 0xC3),
    (0xC9, 0xC9),
];

/// The decoded form of each encoding [`simple`] builds, with a zero
/// displacement at EIP 0 (decoded once by iced-x86, on first use): one-byte
/// opcodes at their value, `0F 80+cc` (Jcc rel32) at 256 + cc.
fn templates() -> &'static [Instruction; 272] {
    static T: std::sync::OnceLock<Box<[Instruction; 272]>> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let mut t = Box::new([Instruction::default(); 272]);
        for &(lo, hi) in &SIMPLE_ONE {
            for op in lo..=hi {
                t[usize::from(op)] = crate::decode_one(&[op, 0, 0, 0, 0], 0, 32);
            }
        }
        for cc in 0..16u8 {
            t[256 + usize::from(cc)] = crate::decode_one(&[0x0F, 0x80 + cc, 0, 0, 0, 0], 0, 32);
        }
        t
    })
}

/// The instruction at the start of `bytes` at `eip` (32-bit code), decoded
/// without the decoder, if it is one of the few the translator meets most
/// after [`take`]'s (Jcc, JMP and CALL with a relative target, RET,
/// LEAVE) and all its bytes are in `bytes`: the same
/// `Instruction` iced-x86 decodes (the test
/// `simple_instructions_are_what_the_decoder_decodes` compares every bit).
#[inline]
pub fn simple(bytes: &[u8], eip: u32) -> Option<Instruction> {
    let &op = bytes.first()?;
    let (at, rel) = match op {
        0xC3 | 0xC9 => (usize::from(op), None),
        0x70..=0x7F | 0xEB => (usize::from(op), Some(i32::from(*bytes.get(1)? as i8))),
        0xE8 | 0xE9 => {
            let d: [u8; 4] = bytes.get(1..5)?.try_into().ok()?;
            (usize::from(op), Some(i32::from_le_bytes(d)))
        }
        0x0F => match *bytes.get(1)? {
            cc @ 0x80..=0x8F => {
                let d: [u8; 4] = bytes.get(2..6)?.try_into().ok()?;
                (256 + usize::from(cc - 0x80), Some(i32::from_le_bytes(d)))
            }
            _ => return None,
        },
        _ => return None,
    };
    let mut ins = templates()[at];
    let next = eip.wrapping_add(ins.len() as u32);
    ins.set_next_ip(u64::from(next));
    if let Some(rel) = rel {
        ins.set_near_branch32(next.wrapping_add(rel as u32));
    }
    Some(ins)
}

/// What ends most blocks, without a prefix: a direct CALL or JMP, or a
/// RET (see [`exit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// CALL rel32 (E8) to its target.
    Call(u32),
    /// JMP rel32 (E9) or rel8 (EB) to its target.
    Jmp(u32),
    /// RET (C3).
    Ret,
}

/// The block exit at the start of `bytes` at `eip` (a CALL rel32, a JMP
/// rel32 or rel8 or a RET, no prefix), if all its bytes are there: its
/// length and what it is (Intel SDM Vol. 2A, CALL, JMP; Vol. 2B, RET).
#[inline(always)]
pub fn exit(bytes: &[u8], eip: u32) -> Option<(usize, Exit)> {
    let rel32 = || -> Option<i32> { Some(i32::from_le_bytes(bytes.get(1..5)?.try_into().ok()?)) };
    let (len, rel) = match *bytes.first()? {
        0xC3 => return Some((1, Exit::Ret)),
        0xE8 | 0xE9 => (5, rel32()?),
        0xEB => (2, i32::from(*bytes.get(1)? as i8)),
        _ => return None,
    };
    let target = eip.wrapping_add(len as u32).wrapping_add(rel as u32);
    Some((
        len,
        match bytes[0] {
            0xE8 => Exit::Call(target),
            _ => Exit::Jmp(target),
        },
    ))
}

/// A conditional branch at the start of `bytes` at `eip` (70-7F with an
/// 8-bit displacement, 0F 80-8F with a 32-bit one, no prefix): its length,
/// condition nibble and target.
#[inline(always)]
pub fn jcc(bytes: &[u8], eip: u32) -> Option<(usize, u8, u32)> {
    let (len, cc, rel) = match *bytes.first()? {
        op @ 0x70..=0x7F => (2, op & 0x0F, i32::from(*bytes.get(1)? as i8)),
        0x0F => match *bytes.get(1)? {
            op @ 0x80..=0x8F => {
                let d: [u8; 4] = bytes.get(2..6)?.try_into().ok()?;
                (6, op & 0x0F, i32::from_le_bytes(d))
            }
            _ => return None,
        },
        _ => return None,
    };
    let next = eip.wrapping_add(len as u32);
    Some((len, cc, next.wrapping_add(rel as u32)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every block exit `exit` finds (CALL rel32, JMP rel32 and rel8, RET)
    /// at EIPs near 0, in the middle and near the 4 GiB wrap, with
    /// displacements of every size and sign: the length, kind and target
    /// iced-x86 decodes; nothing when its bytes are cut short or for any
    /// other first byte.
    #[test]
    fn exits_are_what_the_decoder_decodes() {
        use iced_x86::Code;
        let mut encodings: Vec<Vec<u8>> = vec![vec![0xC3]];
        for d in [0u8, 1, 0x7F, 0x80, 0xFE, 0xFF] {
            encodings.push(vec![0xEB, d]);
        }
        for d in [0i32, 1, -1, 0x7FFF_FFFF, i32::MIN, 0x1234, -0x1234] {
            for op in [0xE8u8, 0xE9] {
                let mut e = vec![op];
                e.extend(d.to_le_bytes());
                encodings.push(e);
            }
        }
        for eip in [
            0u32,
            0x10,
            0x0804_8000,
            0x7FFF_FFF0,
            0xFFFF_FFF0,
            0xFFFF_FFFE,
        ] {
            for e in &encodings {
                let ins = crate::decode_one(e, eip, 32);
                let want = match ins.code() {
                    Code::Retnd => Exit::Ret,
                    Code::Call_rel32_32 => Exit::Call(ins.near_branch32()),
                    Code::Jmp_rel32_32 | Code::Jmp_rel8_32 => Exit::Jmp(ins.near_branch32()),
                    c => panic!("{e:02x?}: {c:?}"),
                };
                assert_eq!(
                    exit(e, eip),
                    Some((ins.len(), want)),
                    "{e:02x?} at {eip:#x}"
                );
                assert_eq!(exit(&e[..e.len() - 1], eip), None, "{e:02x?} cut short");
            }
        }
        for op in 0..=255u8 {
            if !matches!(op, 0xC3 | 0xE8 | 0xE9 | 0xEB) {
                assert_eq!(exit(&[op, 0, 0, 0, 0, 0], 0), None, "{op:#x}");
            }
        }
    }

    /// Every encoding `simple` builds, at EIPs near 0, in the middle and
    /// near the 4 GiB wrap, with displacements of every size and sign: the
    /// very instruction iced-x86 decodes, bit for bit; and nothing when its
    /// bytes are cut short.
    #[test]
    fn simple_instructions_are_what_the_decoder_decodes() {
        let mut encodings: Vec<Vec<u8>> = Vec::new();
        for &(lo, hi) in &SIMPLE_ONE {
            for op in lo..=hi {
                match op {
                    0x70..=0x7F | 0xEB => {
                        for d in [0u8, 1, 0x7F, 0x80, 0xFE, 0xFF] {
                            encodings.push(vec![op, d]);
                        }
                    }
                    0xE8 | 0xE9 => {
                        for d in [0i32, 5, -5, i32::MAX, i32::MIN, 0x1234_5678] {
                            let mut e = vec![op];
                            e.extend(d.to_le_bytes());
                            encodings.push(e);
                        }
                    }
                    _ => encodings.push(vec![op]),
                }
            }
        }
        encodings.extend(near_jcc_encodings());
        for e in &encodings {
            for eip in TEST_EIPS {
                let mut bytes = e.clone();
                bytes.extend([0xCC; 8]);
                let got = simple(&bytes, eip).expect("taken");
                let want = crate::decode_one(&bytes, eip, 32);
                assert!(
                    got.eq_all_bits(&want),
                    "{e:02X?} at {eip:#x}: {got:?} vs {want:?}"
                );
                assert_eq!(got.ip32(), eip);
                assert!(
                    simple(&e[..e.len() - 1], eip).is_none(),
                    "{e:02X?} cut short"
                );
            }
        }
        // What it does not take: a prefix, another opcode, 0F outside Jcc.
        for b in [
            [0x66, 0x50],
            [0xF3, 0xC3],
            [0x0F, 0x90],
            [0xFF, 0xD0],
            [0xC2, 0x04],
        ] {
            assert!(simple(&b, 0).is_none(), "{b:02X?}");
        }
    }

    /// EIPs the branch tests decode at: near 0, in the middle, near the
    /// 4 GiB wrap.
    const TEST_EIPS: [u32; 5] = [0, 0x10, 0x0040_1000, 0x7FFF_FFF0, 0xFFFF_FFF8];

    /// 0F 80-8F (Jcc rel32) with displacements of every size and sign.
    fn near_jcc_encodings() -> Vec<Vec<u8>> {
        let mut encodings = Vec::new();
        for op in 0x80..=0x8Fu8 {
            for d in [0i32, -6, 5, 0x7FFF_FFFF, -0x8000_0000] {
                let mut e = vec![0x0F, op];
                e.extend(d.to_le_bytes());
                encodings.push(e);
            }
        }
        encodings
    }

    /// `jcc` on every conditional branch (70-7F, 0F 80-8F) with
    /// displacements of every size and sign, at EIPs near 0, in the middle
    /// and near the 4 GiB wrap: iced-x86's length, condition and target
    /// (the translator's condition nibble is iced's condition code less
    /// one); nothing when cut short, for any other opcode or behind a
    /// prefix.
    #[test]
    fn jcc_is_what_the_decoder_decodes() {
        let mut encodings: Vec<Vec<u8>> = Vec::new();
        for op in 0x70..=0x7Fu8 {
            for d in [0u8, 1, 0x7F, 0x80, 0xFE, 0xFF] {
                encodings.push(vec![op, d]);
            }
        }
        encodings.extend(near_jcc_encodings());
        for e in &encodings {
            for eip in TEST_EIPS {
                let mut bytes = e.clone();
                bytes.extend([0xCC; 8]);
                let (len, cc, target) = jcc(&bytes, eip).expect("a Jcc");
                let want = crate::decode_one(&bytes, eip, 32);
                assert!(want.is_jcc_short_or_near(), "{e:02X?}");
                assert_eq!(len, want.len(), "{e:02X?} at {eip:#x}");
                assert_eq!(
                    cc,
                    (want.condition_code() as u8).wrapping_sub(1),
                    "{e:02X?} at {eip:#x}"
                );
                assert_eq!(target, want.near_branch32(), "{e:02X?} at {eip:#x}");
                assert!(jcc(&e[..e.len() - 1], eip).is_none(), "{e:02X?} cut short");
            }
        }
        for b in [
            [0x66, 0x74, 0x00],
            [0x3E, 0x74, 0x00],
            [0xEB, 0x00, 0x00],
            [0x0F, 0x90, 0xC0],
            [0x0F, 0x7F, 0x00],
            [0xE3, 0x00, 0x00],
        ] {
            assert!(jcc(&b, 0).is_none(), "{b:02X?}");
        }
    }
}
