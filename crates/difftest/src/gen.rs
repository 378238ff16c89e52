//! The generator: random, valid, reproducible sequences of integer
//! instructions, as raw bytes built from opcode templates.
//!
//! Invariants every sequence keeps, so both sides run the same program and
//! never fault (faulting sequences are the exceptions mode, not yet here):
//! - EBX holds the scratch area's base and is never written; ESP is only
//!   moved by balanced templates (PUSH/POP, CALL/RET) within the stack area.
//! - Memory operands are `[ebx + disp8]` inside the scratch area (now and
//!   then behind a DS, ES or SS override: all flat).
//! - Divisions are preceded by instructions that make them non-faulting.
//! - A flag consumer (ADC, SBB, SETcc, CMOVcc, Jcc, LAHF, PUSHF, DAA, ...)
//!   that reads a flag the previous producers left undefined is preceded
//!   by a CMP that defines all six arithmetic flags.
//! - String instructions get ESI/EDI/ECX set up to stay inside scratch.

use iced_x86::{Decoder, DecoderOptions, Instruction, OpKind, Register};
pub use popek_decode::flags::{defined_by, to_eflags, undefined_by};

/// Scratch area size in bytes (memory operands and strings stay inside).
pub const SCRATCH: u32 = 512;

/// A small, fast, seedable generator (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// The next 64 random bits.
    pub fn bits(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// A number in `0..n`.
    pub fn below(&mut self, n: u32) -> u32 {
        (self.bits() % u64::from(n)) as u32
    }
    /// True with probability 1/n.
    pub fn one_in(&mut self, n: u32) -> bool {
        self.below(n) == 0
    }
    /// An interesting 32-bit value: edge cases often, random otherwise.
    pub fn value(&mut self) -> u32 {
        const EDGES: [u32; 12] = [
            0,
            1,
            0x7F,
            0x80,
            0xFF,
            0x7FFF,
            0x8000,
            0xFFFF,
            0x7FFF_FFFF,
            0x8000_0000,
            0xFFFF_FFFF,
            9,
        ];
        match self.below(4) {
            0 => EDGES[self.below(EDGES.len() as u32) as usize],
            1 => self.below(256),
            _ => self.bits() as u32,
        }
    }
}

/// One generated test case: initial state and the instruction bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    /// Initial EAX, ECX, EDX, (EBX ignored: scratch base), (ESP ignored), EBP, ESI, EDI.
    pub regs: [u32; 8],
    /// Initial arithmetic flags and DF.
    pub flags: u32,
    /// Initial scratch memory.
    pub scratch: Vec<u8>,
    /// The instruction sequence in groups: a template's instructions (with
    /// the flag producer it needed) form one group, which shrinking keeps
    /// or drops as a whole, so setup and use are never separated.
    pub groups: Vec<Vec<Vec<u8>>>,
}

impl Case {
    /// All instructions in order.
    pub fn insns(&self) -> impl Iterator<Item = &Vec<u8>> {
        self.groups.iter().flatten()
    }
    /// Number of instructions.
    pub fn len(&self) -> usize {
        self.groups.iter().map(Vec::len).sum()
    }
    /// Is the sequence empty?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

const EBX: u8 = 3;
const ESP: u8 = 4;

/// A register number for a 16/32-bit operand that may be written.
fn wreg(r: &mut Rng) -> u8 {
    loop {
        let x = r.below(8) as u8;
        if x != EBX && x != ESP {
            return x;
        }
    }
}

/// A register number for an 8-bit operand that may be written (not BL, BH).
fn wreg8(r: &mut Rng) -> u8 {
    loop {
        let x = r.below(8) as u8;
        if x != 3 && x != 7 {
            return x;
        }
    }
}

/// A ModRM (plus displacement) with `reg` in the reg field: register-direct
/// with a writable register, or `[ebx + disp8]` inside scratch.
fn modrm(r: &mut Rng, reg: u8, byte_op: bool, mem_size: u32) -> Vec<u8> {
    if r.one_in(3) {
        mem_modrm(r, reg, mem_size)
    } else {
        let rm = if byte_op { wreg8(r) } else { wreg(r) };
        vec![0xC0 | (reg << 3) | rm]
    }
}

/// A memory ModRM with `reg` in the reg field: `[ebx + disp]` in several
/// encodings, the `mem_size` bytes inside scratch.
fn mem_modrm(r: &mut Rng, reg: u8, mem_size: u32) -> Vec<u8> {
    // disp8 is signed: stay in 0..=0x77 so [ebx+disp] and its bytes fit
    // (an 80-bit operand may reach 0x80)
    let disp = r.below(0x78 - mem_size.min(8)) as u8;
    let d32 = u32::from(disp).to_le_bytes();
    let r3 = reg << 3;
    match r.below(5) {
        0 => vec![0x40 | r3 | EBX, disp],                     // [ebx+disp8]
        1 => vec![r3 | EBX],                                  // [ebx]
        2 => [&[0x80 | r3 | EBX][..], &d32].concat(),         // [ebx+disp32]
        3 => vec![0x44 | r3, 0x20 | EBX, disp],               // SIB [ebx+disp8], no index
        _ => [&[0x04 | r3, EBX << 3 | 5][..], &d32].concat(), // SIB [ebx*1+disp32], no base
    }
}

/// An x87 instruction (or a short group): every arithmetic, compare,
/// load/store, constant, transcendental and control form gcc and glibc use,
/// on values from scratch (random bit patterns: NaNs, denormals, invalid
/// BCD) and whatever the stack holds (underflow and overflow included, all
/// exceptions masked). Not FNSTENV/FNSAVE/FXSAVE: their FIP/FDP fields hold
/// host addresses under popek (docs/quirks.md).
fn template_x87(r: &mut Rng) -> Vec<Vec<u8>> {
    let i = r.below(8) as u8;
    let op = r.below(8) as u8;
    let k = r.below(3) as u8;
    match r.below(14) {
        // loads first, so later forms find values: FLD m32/m64/m80, FILD
        // m16/m32/m64, FBLD m80, a constant, FLD ST(i)
        0 | 1 => vec![match r.below(9) {
            0 => [vec![0xD9], mem_modrm(r, 0, 4)].concat(),
            1 => [vec![0xDD], mem_modrm(r, 0, 8)].concat(),
            2 => [vec![0xDB], mem_modrm(r, 5, 10)].concat(),
            3 => [vec![0xDF], mem_modrm(r, 0, 2)].concat(),
            4 => [vec![0xDB], mem_modrm(r, 0, 4)].concat(),
            5 => [vec![0xDF], mem_modrm(r, 5, 8)].concat(),
            6 => [vec![0xDF], mem_modrm(r, 4, 10)].concat(),
            7 => vec![0xD9, 0xE8 + r.below(7) as u8], // FLD1 FLDL2T FLDL2E FLDPI FLDLG2 FLDLN2 FLDZ
            _ => vec![0xD9, 0xC0 + i],
        }],
        // arithmetic with memory: m32fp, m64fp, m32int, m16int
        2 | 3 => {
            let (opc, size) = [(0xD8, 4), (0xDC, 8), (0xDA, 4), (0xDE, 2)][r.below(4) as usize];
            vec![[vec![opc], mem_modrm(r, op, size)].concat()]
        }
        // arithmetic between registers: D8 (ST(0) op= ST(i)), DC (ST(i) op=
        // ST(0)), DE (and pop; DE D9 is FCOMPP)
        4 | 5 => {
            let opc = [0xD8, 0xDC, 0xDE][r.below(3) as usize];
            let op = if opc != 0xD8 && (op == 2 || op == 3) {
                op + 4 // DC D0-DF and DE D0-DF (but D9) are aliases; keep to real forms
            } else {
                op
            };
            vec![vec![opc, 0xC0 | op << 3 | i]]
        }
        // stores: FST/FSTP m32/m64/m80, FIST/FISTP/FISTTP m16/m32/m64,
        // FBSTP, FST/FSTP ST(i)
        6 | 7 => vec![match r.below(12) {
            0 => [vec![0xD9], mem_modrm(r, 2 + k % 2, 4)].concat(),
            1 => [vec![0xDD], mem_modrm(r, 1 + k, 8)].concat(),
            2 => [vec![0xDB], mem_modrm(r, 7, 10)].concat(),
            3 => [vec![0xDF], mem_modrm(r, 1 + k, 2)].concat(),
            4 => [vec![0xDB], mem_modrm(r, 1 + k, 4)].concat(),
            5 => [vec![0xDF], mem_modrm(r, 7, 8)].concat(),
            6 => [vec![0xDF], mem_modrm(r, 6, 10)].concat(),
            7 => [vec![0xDD], mem_modrm(r, 1, 8)].concat(), // FISTTP m64
            8 => [vec![0xD9], mem_modrm(r, 7, 2)].concat(), // FNSTCW
            9 => [vec![0xDD], mem_modrm(r, 7, 2)].concat(), // FNSTSW m16
            10 => vec![0xDF, 0xE0],                         // FNSTSW AX
            _ => vec![0xDD, if r.one_in(2) { 0xD0 } else { 0xD8 } + i],
        }],
        // compares: FCOM/FCOMP/FUCOM/FUCOMP ST(i), FCOMPP, FUCOMPP, FTST,
        // FXAM, and the EFLAGS forms FCOMI/FCOMIP/FUCOMI/FUCOMIP
        8 | 9 => vec![match r.below(8) {
            0 => vec![0xD8, 0xD0 + r.below(16) as u8],
            1 => vec![0xDD, 0xE0 + r.below(16) as u8],
            2 => vec![0xDE, 0xD9],
            3 => vec![0xDA, 0xE9],
            4 => vec![0xD9, 0xE4 + r.below(2) as u8],
            5 => vec![0xDB, 0xE8 + r.below(16) as u8],
            _ => vec![0xDF, 0xE8 + r.below(16) as u8],
        }],
        // FCMOVcc (reads EFLAGS)
        10 => vec![vec![
            [0xDA, 0xDB][r.below(2) as usize],
            0xC0 + r.below(32) as u8,
        ]],
        // one-operand forms and transcendentals: D9 E0-E1 and F0-FF
        11 | 12 => vec![vec![
            0xD9,
            if r.one_in(8) {
                0xE0 + r.below(2) as u8
            } else {
                0xF0 + r.below(16) as u8
            },
        ]],
        // control: FXCH, FFREE, FINCSTP/FDECSTP (in the D9 F6/F7 slots
        // above), FNCLEX, FNINIT, FWAIT, FNOP, and FLDCW with a control word
        // that keeps every exception masked (random rounding and precision)
        _ => match r.below(7) {
            0 | 1 => vec![vec![0xD9, 0xC8 + i]],
            2 => vec![vec![0xDD, 0xC0 + i]],
            3 => vec![vec![0xDB, 0xE2 + r.below(2) as u8]],
            4 => vec![vec![0x9B], vec![0xD9, 0xD0]],
            _ => {
                let disp = r.below(0x70) as u8;
                let cw = 0x7F | (r.below(16) as u16) << 8; // PC and RC bits
                vec![
                    [vec![0x66, 0xC7, 0x43, disp], cw.to_le_bytes().to_vec()].concat(), // mov word [ebx+disp], cw
                    vec![0xD9, 0x6B, disp], // fldcw [ebx+disp]
                ]
            }
        },
    }
}

fn reg_for(r: &mut Rng, byte_op: bool) -> u8 {
    if byte_op {
        wreg8(r)
    } else {
        wreg(r)
    }
}

/// Operand size for a new instruction: (byte_op, prefix 0x66).
fn size(r: &mut Rng) -> (bool, bool) {
    match r.below(4) {
        0 => (true, false),
        1 => (false, true),
        _ => (false, false),
    }
}

fn with_prefix(p66: bool, mut v: Vec<u8>) -> Vec<u8> {
    if p66 {
        v.insert(0, 0x66);
    }
    v
}

fn imm(r: &mut Rng, n: usize) -> Vec<u8> {
    r.value().to_le_bytes()[..n].to_vec()
}

/// Generate one template: one or more instructions.
fn template(r: &mut Rng) -> Vec<Vec<u8>> {
    if r.one_in(6) {
        return template_x87(r);
    }
    let (b, p66) = size(r);
    let opsz = if b {
        1
    } else if p66 {
        2
    } else {
        4
    };
    let immn = if b {
        1
    } else if p66 {
        2
    } else {
        4
    };
    match r.below(24) {
        // ALU r/m, r and r, r/m: ADD OR ADC SBB AND SUB XOR CMP
        0..=3 => {
            let op = ((r.below(8) as u8) << 3) | u8::from(!b);
            let dir = r.below(2) as u8 * 2;
            let reg = reg_for(r, b);
            let mut v = vec![op | dir];
            v.extend(modrm(r, reg, b, opsz));
            vec![with_prefix(p66, v)]
        }
        // ALU r/m, imm (80, 81, 83)
        4 | 5 => {
            let ext = r.below(8) as u8;
            if b {
                let mut v = vec![0x80];
                v.extend(modrm(r, ext, true, 1));
                v.extend(imm(r, 1));
                vec![v]
            } else if r.one_in(2) {
                let mut v = vec![0x83];
                v.extend(modrm(r, ext, false, opsz));
                v.extend(imm(r, 1));
                vec![with_prefix(p66, v)]
            } else {
                let mut v = vec![0x81];
                v.extend(modrm(r, ext, false, opsz));
                v.extend(imm(r, immn));
                vec![with_prefix(p66, v)]
            }
        }
        // TEST, INC, DEC, NOT, NEG, MUL, IMUL (F6/F7 and FE/FF)
        6 | 7 => {
            let ext = [0u8, 2, 3, 4, 5][r.below(5) as usize];
            let mut v = vec![if b { 0xF6 } else { 0xF7 }];
            v.extend(modrm(r, ext, b, opsz));
            if ext == 0 {
                v.extend(imm(r, immn));
            }
            let mut out = vec![with_prefix(p66, v)];
            if r.one_in(2) {
                let mut w = vec![if b { 0xFE } else { 0xFF }];
                let ext = r.below(2) as u8;
                w.extend(modrm(r, ext, b, opsz));
                out.push(with_prefix(p66, w));
            }
            out
        }
        // IMUL r, r/m and r, r/m, imm
        8 => {
            let reg = wreg(r);
            let mut v = if r.one_in(2) {
                vec![0x0F, 0xAF]
            } else {
                vec![0x6B]
            };
            v.extend(modrm(r, reg, false, if p66 { 2 } else { 4 }));
            if v[0] == 0x6B {
                v.extend(imm(r, 1));
            }
            vec![with_prefix(p66 && !b, v)]
        }
        // shifts and rotates: C0/C1 imm, D0/D1 by 1, D2/D3 by CL
        9 | 10 => {
            let ext = loop {
                let e = r.below(8) as u8;
                if e != 6 {
                    break e;
                }
            };
            let form = r.below(3);
            let base = [0xC0u8, 0xD0, 0xD2][form as usize] + u8::from(!b);
            let mut v = vec![base];
            v.extend(modrm(r, ext, b, opsz));
            if form == 0 {
                v.push(r.below(64) as u8);
            }
            vec![with_prefix(p66, v)]
        }
        // SHLD/SHRD imm8 or CL. A 16-bit form with a count above 16 has an
        // undefined result, so 16-bit forms take an immediate below 16.
        11 => {
            let w16 = p66 && !b;
            let op = [0xA4u8, 0xA5, 0xAC, 0xAD][r.below(4) as usize] & if w16 { !1 } else { 0xFF };
            let reg = wreg(r);
            let mut v = vec![0x0F, op];
            v.extend(modrm(r, reg, false, if w16 { 2 } else { 4 }));
            if op & 1 == 0 {
                v.push(r.below(if w16 { 16 } else { 32 }) as u8);
            }
            vec![with_prefix(w16, v)]
        }
        // DIV/IDIV made non-faulting
        12 => {
            let signed = r.one_in(2);
            let ext = if signed { 0xF9u8 } else { 0xF1 }; // /7 or /6 with rm = ECX
            match opsz {
                1 => vec![
                    vec![0x0F, 0xB6, 0xC0],                             // movzx eax, al
                    vec![0x83, 0xE1, 0x7F],                             // and ecx, 0x7f
                    vec![0x83, 0xC9, 0x02],                             // or ecx, 2
                    if signed { vec![0x66, 0x98] } else { vec![0x90] }, // cbw
                    vec![0xF6, ext],
                ],
                _ => {
                    let mut v = vec![
                        vec![0x81, 0xE1, 0xFF, 0x7F, 0, 0], // and ecx, 0x7fff
                        vec![0x83, 0xC9, 0x02],             // or ecx, 2
                    ];
                    let widen = match (opsz, signed) {
                        (2, true) => vec![0x66, 0x99], // cwd
                        (4, true) => vec![0x99],       // cdq
                        _ => vec![0x31, 0xD2],         // xor edx, edx
                    };
                    v.push(widen);
                    v.push(with_prefix(p66, vec![0xF7, ext]));
                    v
                }
            }
        }
        // BT family with immediate or register bit offsets (register forms
        // only with register destinations, so no access leaves scratch)
        13 => {
            if r.one_in(2) {
                let ext = 4 + r.below(4) as u8;
                let mut v = vec![0x0F, 0xBA];
                v.extend(modrm(r, ext, false, 4));
                v.push(r.below(256) as u8);
                vec![with_prefix(p66, v)]
            } else {
                let op = [0xA3u8, 0xAB, 0xB3, 0xBB][r.below(4) as usize];
                let (reg, rm) = (wreg(r), wreg(r));
                vec![with_prefix(p66, vec![0x0F, op, 0xC0 | reg << 3 | rm])]
            }
        }
        // BSF/BSR, BSWAP, MOVZX/MOVSX
        14 => {
            let reg = wreg(r);
            match r.below(3) {
                0 => {
                    let mut v = vec![0x0F, if r.one_in(2) { 0xBC } else { 0xBD }];
                    v.extend(modrm(r, reg, false, if p66 { 2 } else { 4 }));
                    vec![with_prefix(p66, v)]
                }
                1 => vec![vec![0x0F, 0xC8 + reg]],
                _ => {
                    let op = [0xB6u8, 0xB7, 0xBE, 0xBF][r.below(4) as usize];
                    let mut v = vec![0x0F, op];
                    v.extend(modrm(r, reg, op & 1 == 0, 2));
                    vec![v]
                }
            }
        }
        // SETcc / CMOVcc / LAHF / PUSHF+POP / SAHF (flag consumers)
        15 | 16 => {
            let cc = r.below(16) as u8;
            match r.below(5) {
                0 => {
                    let mut v = vec![0x0F, 0x90 + cc];
                    v.extend(modrm(r, 0, true, 1));
                    vec![v]
                }
                1 => {
                    let mut v = vec![0x0F, 0x40 + cc];
                    let reg = wreg(r);
                    v.extend(modrm(r, reg, false, 4));
                    vec![with_prefix(p66, v)]
                }
                2 => vec![vec![0x9F]],
                3 => vec![vec![0x9C], vec![0x58 + wreg(r)]],
                _ => vec![vec![0x9E]],
            }
        }
        // Jcc short forward over one ALU instruction
        17 => {
            let cc = r.below(16) as u8;
            let body = template_alu(r);
            let mut out = vec![vec![0x70 + cc, body.len() as u8]];
            out.push(body);
            out
        }
        // XADD, CMPXCHG, XCHG, CMPXCHG8B, with optional LOCK on memory
        18 => {
            let reg = reg_for(r, b);
            let (mut v, mem_ok) = match r.below(4) {
                0 => (vec![0x0F, 0xC0 | u8::from(!b)], true),
                1 => (vec![0x0F, 0xB0 | u8::from(!b)], true),
                2 => (vec![0x86 | u8::from(!b)], true),
                _ => {
                    let disp = (r.below(SCRATCH / 8 - 2) * 8).min(0x78) as u8;
                    let mut v = vec![0x0F, 0xC7, 0x4B, disp];
                    if r.one_in(2) {
                        v.insert(0, 0xF0);
                    }
                    return vec![v];
                }
            };
            let m = modrm(r, reg, b, opsz);
            let is_mem = m[0] >> 6 != 3;
            v.extend(m);
            if is_mem && mem_ok && r.one_in(2) {
                v.insert(0, 0xF0);
            }
            vec![with_prefix(p66, v)]
        }
        // BCD
        19 => {
            let op = [0x27u8, 0x2F, 0x37, 0x3F, 0xD4, 0xD5][r.below(6) as usize];
            if op >= 0xD4 {
                vec![vec![op, 1 + r.below(255) as u8]]
            } else {
                vec![vec![op]]
            }
        }
        // strings with REP/REPE/REPNE and either direction
        20 => {
            let elem = [1u32, 2, 4][r.below(3) as usize];
            let count = r.below(12);
            let down = r.one_in(2);
            let mid = 128 + r.below(256) / elem * elem;
            let lea = |dst: u8, off: u32| {
                vec![
                    0x8D,
                    0x83 | dst << 3,
                    (off & 0xFF) as u8,
                    (off >> 8) as u8,
                    0,
                    0,
                ]
            };
            let mut v = vec![
                lea(6, mid),                              // lea esi, [ebx+mid]
                lea(7, 128 + r.below(256) / elem * elem), // lea edi, [ebx+...]
                vec![0xB9, count as u8, 0, 0, 0],         // mov ecx, count
                vec![if down { 0xFD } else { 0xFC }],     // std / cld
            ];
            let base = [0xA4u8, 0xAA, 0xAC, 0xA6, 0xAE][r.below(5) as usize];
            let op = base + u8::from(elem > 1);
            let mut ins = vec![op];
            if elem == 2 {
                ins.insert(0, 0x66);
            }
            match r.below(3) {
                0 => {}
                1 => ins.insert(0, 0xF3),
                _ => ins.insert(0, 0xF2),
            }
            v.push(ins);
            v.push(vec![0xFC]); // cld
            v
        }
        // PUSH/POP pairs, a LEAVE frame, CALL/RET
        21 => match r.below(6) {
            0 => vec![vec![0x50 + r.below(8) as u8], vec![0x58 + wreg(r)]],
            1 => vec![vec![0x6A, r.below(256) as u8], vec![0x8F, 0xC0 + wreg(r)]],
            // PUSH r/m32 from scratch, a register, or the stack itself
            // ([esp+disp8]: the address uses ESP before the push)
            2 => vec![
                [vec![0xFF], modrm(r, 6, false, 4)].concat(),
                vec![0x58 + wreg(r)],
            ],
            3 => vec![
                vec![0xFF, 0x74, 0x24, (r.below(16) * 4) as u8],
                vec![0x58 + wreg(r)],
            ],
            // A frame: PUSH EBP, MOV EBP,ESP, a push, LEAVE.
            4 => vec![
                vec![0x55],
                vec![0x89, 0xE5],
                vec![0x6A, r.below(256) as u8],
                vec![0xC9],
            ],
            _ => vec![vec![0xE8, 2, 0, 0, 0], vec![0xEB, 1], vec![0xC3]],
        },
        // LEA (32-bit SIB and 16-bit 0x67 forms), CBW/CWDE/CWD/CDQ, XLAT,
        // MOV from Sreg, CLC/STC/CMC
        22 => match r.below(7) {
            6 => {
                // LEA computes an address without accessing it, so every
                // 16-bit addressing form ([bx+si], [bp+di+disp8], [disp16],
                // ...) can be tested with arbitrary register values.
                let (md, rm) = (r.below(3) as u8, r.below(8) as u8);
                let mut v = vec![0x67, 0x8D, md << 6 | wreg(r) << 3 | rm];
                let disp = match (md, rm) {
                    (0, 6) | (2, _) => 2,
                    (1, _) => 1,
                    _ => 0,
                };
                v.extend(imm(r, disp));
                vec![with_prefix(p66, v)]
            }
            0 => vec![vec![
                0x8D,
                0x44 | wreg(r) << 3,
                (r.below(4) as u8) << 6 | wreg(r) << 3 | EBX,
                r.below(256) as u8,
            ]],
            1 => vec![with_prefix(r.one_in(2), vec![0x98])],
            2 => vec![with_prefix(r.one_in(2), vec![0x99])],
            3 => vec![vec![0xD7]],
            4 => vec![vec![0x8C, 0xC0 | (r.below(4) as u8) << 3 | wreg(r)]],
            _ => vec![vec![[0xF8u8, 0xF9, 0xF5][r.below(3) as usize]]],
        },
        // MOV forms
        _ => {
            let reg = reg_for(r, b);
            let mut v = vec![0x88 | u8::from(!b) | (r.below(2) as u8) << 1];
            v.extend(modrm(r, reg, b, opsz));
            vec![with_prefix(p66, v)]
        }
    }
}

/// An ALU instruction (for Jcc bodies).
fn template_alu(r: &mut Rng) -> Vec<u8> {
    let op = (r.below(8) as u8) << 3 | 1;
    vec![op, 0xC0 | wreg(r) << 3 | wreg(r)]
}

/// Decode one instruction's bytes (32-bit).
pub fn decode(bytes: &[u8]) -> Instruction {
    Decoder::with_ip(32, bytes, 0, DecoderOptions::NONE).decode()
}

/// A CMP that defines all six arithmetic flags.
fn producer(r: &mut Rng) -> Vec<u8> {
    vec![0x39, 0xC0 | (r.below(8) as u8) << 3 | r.below(8) as u8]
}

use popek_decode::flags::ARITH;

/// Generate a case of about `len` instructions.
pub fn generate(seed: u64, len: usize) -> Case {
    let mut r = Rng::new(seed);
    let mut regs = [0u32; 8];
    for v in regs.iter_mut() {
        *v = r.value();
    }
    let flags = (r.bits() as u32) & (ARITH | 0x400);
    let scratch = (0..SCRATCH).map(|_| r.below(256) as u8).collect();
    let mut groups: Vec<Vec<Vec<u8>>> = Vec::new();
    let mut count = 0;
    let mut undefined = 0u32; // arithmetic flags currently undefined (iced bits)
    while count < len {
        let mut group = Vec::new();
        for mut bytes in template(&mut r) {
            // Now and then a DS, ES or SS override on a memory operand (all
            // three flat: the same access; compilers and kernels write them
            // as padding and markers).
            let mem = |i: &Instruction| (0..i.op_count()).any(|k| i.op_kind(k) == OpKind::Memory);
            let plain = decode(&bytes);
            if mem(&plain) && plain.segment_prefix() == Register::None && r.one_in(8) {
                let mut with = bytes.clone();
                with.insert(0, [0x26, 0x36, 0x3E][r.below(3) as usize]);
                if decode(&with).len() == with.len() {
                    bytes = with;
                }
            }
            let ins = decode(&bytes);
            assert!(
                !ins.is_invalid(),
                "generator produced invalid bytes {bytes:02x?}"
            );
            let reads = ins.rflags_read() & ARITH;
            // Before a Jcc, define every flag: the skipped body must not
            // leave the tracking believing in flags only one path defines.
            let is_jcc = (0x70..=0x7F).contains(&bytes[0]);
            if reads & undefined != 0 || is_jcc {
                group.push(producer(&mut r));
                undefined = 0;
            }
            undefined = (undefined & !defined_by(&ins)) | undefined_by(&ins);
            group.push(bytes);
        }
        count += group.len();
        groups.push(group);
    }
    // Every fourth case ends with an instruction that faults or traps: the
    // exceptions mode, compared by signal, trap number, error code and EIP.
    if seed % 4 == 0 {
        groups.push(faulting(&mut r));
    }
    Case {
        regs,
        flags,
        scratch,
        groups,
    }
}

/// A group whose last instruction raises an exception at CPL 3.
pub fn faulting(r: &mut Rng) -> Vec<Vec<u8>> {
    match r.below(10) {
        // #PF in the middle of a REP string instruction: going down (STD)
        // from just above the start of the image into the unmapped page
        // below it; the fault reports the iterations done (ECX, ESI, EDI).
        // The stores land in the ELF header, on the page of the code.
        9 if r.one_in(3) => {
            let base = crate::elf::BASE;
            let mov = |op: u8, v: u32| [&[op][..], &v.to_le_bytes()].concat();
            // EDI at most 17 elements above the start: ECX (20 or more)
            // always runs it off.
            let kind = r.below(3);
            let elem = if kind == 1 { 1 } else { 4 };
            let mut v = vec![
                mov(0xBF, base + elem * (1 + r.below(16))), // mov edi, ...
                mov(0xB9, 20 + r.below(100)),               // mov ecx, ...
                vec![0xFD],                                 // std
            ];
            match kind {
                0 => v.push(vec![0xF3, 0xAB]), // rep stosd
                1 => v.push(vec![0xF3, 0xAA]), // rep stosb
                _ => {
                    v.insert(0, mov(0xBE, base + 4 * r.below(24))); // mov esi, ...
                    v.push(vec![0xF3, 0xA5]); // rep movsd
                }
            }
            v
        }
        // #PF: a load or store through an absolute address (moffs form) that
        // is mapped neither in a Linux process nor under popek
        9 => {
            let addr = if r.one_in(2) {
                0x1000 + r.below(0x0800_0000 - 0x2000)
            } else {
                0x1000_0000 + r.below(0x3000_0000)
            };
            let op = [0xA0u8, 0xA1, 0xA2, 0xA3][r.below(4) as usize];
            vec![[&[op][..], &addr.to_le_bytes()].concat()]
        }
        // #DE: divide by zero (32- or 8-bit)
        0 => vec![
            vec![0x31, 0xC9],
            if r.one_in(2) {
                vec![0xF7, 0xF1]
            } else {
                vec![0xF6, 0xF1]
            },
        ],
        // #DE: IDIV overflow
        1 => vec![
            vec![0xB8, 0, 0, 0, 0x80],
            vec![0x99],
            vec![0xB9, 0xFF, 0xFF, 0xFF, 0xFF],
            vec![0xF7, 0xF9],
        ],
        // #UD: UD2, or LOCK on a register destination
        2 => vec![if r.one_in(2) {
            vec![0x0F, 0x0B]
        } else {
            vec![0xF0, 0x01, 0xC0]
        }],
        // #GP: privileged instructions at CPL 3
        3 => {
            const PRIV: [&[u8]; 16] = [
                &[0xFA],
                &[0xFB],
                &[0xF4],
                &[0xEC],
                &[0xEE],
                &[0xE4, 0x60],
                &[0x0F, 0x20, 0xC0],
                &[0x0F, 0x01, 0x13],
                &[0x0F, 0x08],
                &[0x0F, 0x09],
                &[0x0F, 0x06],
                &[0x0F, 0x32],
                &[0x0F, 0x30],
                &[0x0F, 0x22, 0xD8],
                &[0x0F, 0x00, 0xD8],
                &[0x0F, 0x01, 0xF0],
            ];
            vec![PRIV[r.below(PRIV.len() as u32) as usize].to_vec()]
        }
        // #GP: INT n through a DPL-0 gate
        4 => {
            let n = loop {
                let n = r.below(256) as u8;
                if !matches!(n, 3 | 4 | 0x80) {
                    break n;
                }
            };
            vec![vec![0xCD, n]]
        }
        // #GP: loading a selector outside the GDT, an LDT selector, or a null SS
        5 => {
            let sel = match r.below(3) {
                0 => 0x80 + r.below(0xFF00),
                1 => (r.below(0x2000) << 3) | 4 | r.below(4),
                _ => 0,
            };
            let sreg = if sel == 0 {
                2
            } else {
                [0u8, 2, 3, 4, 5][r.below(5) as usize]
            };
            vec![
                vec![0xB8, sel as u8, (sel >> 8) as u8, 0, 0],
                vec![0x8E, 0xC0 | sreg << 3],
            ]
        }
        // #BR: BOUND out of range
        6 => vec![
            vec![0xC7, 0x03, 10, 0, 0, 0],
            vec![0xC7, 0x43, 0x04, 20, 0, 0, 0],
            vec![0xB8, if r.one_in(2) { 30 } else { 5 }, 0, 0, 0],
            vec![0x62, 0x03],
        ],
        // #BP: INT3 (a trap: EIP after it)
        7 => vec![vec![0xCC]],
        // #OF: INTO after an overflow (a trap)
        _ => vec![
            vec![0xB8, 0xFF, 0xFF, 0xFF, 0x7F],
            vec![0x83, 0xC0, 0x01],
            vec![0xCE],
        ],
    }
}

/// The arithmetic flags left undefined at the end of the sequence, as
/// EFLAGS bits.
pub fn undefined_at_end(case: &Case) -> u32 {
    let mut undefined = 0u32;
    for b in case.insns() {
        let ins = decode(b);
        undefined = (undefined & !defined_by(&ins)) | undefined_by(&ins);
    }
    to_eflags(undefined)
}

/// Does any instruction read an arithmetic flag that the instructions
/// before it left undefined? (The generator never emits such sequences;
/// subsets of them, as other tools take, may.)
pub fn reads_undefined_flag<'a>(insns: impl IntoIterator<Item = &'a Vec<u8>>) -> bool {
    let mut undefined = 0u32;
    for b in insns {
        let ins = decode(b);
        if ins.rflags_read() & ARITH & undefined != 0 {
            return true;
        }
        undefined = (undefined & !defined_by(&ins)) | undefined_by(&ins);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_reproducible_and_valid() {
        let a = generate(7, 50);
        assert_eq!(a, generate(7, 50));
        assert_ne!(a, generate(8, 50));
        // seed 7 is not a multiple of 4: no faulting group, all valid
        for b in a.insns() {
            assert!(!decode(b).is_invalid());
            assert_eq!(decode(b).len(), b.len(), "{b:02x?}");
        }
    }
}
