//! Re-encoding innocuous guest instructions as host instructions.
//!
//! An innocuous 32-bit instruction whose registers and memory operands
//! mean the same in 64-bit mode is *copied*: decoded with iced-x86,
//! its memory operand (if any) gets a GS segment override (GS base = the
//! guest window) and 32-bit address size, and it is encoded again with
//! `Encoder::new(64)`. The host's arithmetic flags are the guest's, so no
//! flag bookkeeping is needed. Everything else is reported as not copyable
//! with the reason; the translator lowers or calls the interpreter for it.

use iced_x86::{Code, Encoder, Instruction, MemoryOperand, Mnemonic as M, OpKind, Register};
use popek_decode::{classify, Class, CodeMemo};

use crate::emit::BlockExit;

/// How one guest instruction is translated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lowering {
    /// Copied: these host bytes do what the guest instruction does.
    Copied(Vec<u8>),
    /// Not copyable as is, and why.
    NotCopyable(&'static str),
}

/// The bases of FS and GS as translated code sees them: Some(base) for a
/// present, writable, expand-up data segment with a 4 GiB limit (no access
/// through it can fail a segment check), None otherwise. Translations do
/// not depend on them: the context holds them (see
/// [`crate::abi::Context::set_segs`]) and an access through a segment
/// whose entry is None goes to the interpreter at run time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegBases {
    /// FS's base.
    pub fs: Option<u32>,
    /// GS's base.
    pub gs: Option<u32>,
}

impl SegBases {
    /// Does `ins` address memory through FS or GS (and so depend on a base)?
    pub fn used_by(ins: &Instruction) -> bool {
        matches!(ins.segment_prefix(), Register::FS | Register::GS)
            && ins.mnemonic() != M::Lea
            && ins.op_kinds().any(|k| k == OpKind::Memory)
    }
}

/// `ins` with a FS or GS override, as host code that reads the segment's
/// base from the context (so a base change invalidates nothing): the
/// effective address into R13D (LEA, which neither faults nor touches
/// flags), the base loaded into R11D and added (LEA again, wrapping at
/// 4 GiB), then the instruction on `gs:[r13d]`. Returns true for FS,
/// false for GS. The caller guards the code with the segment's flatness
/// (`Piece::Segment`).
pub fn lower_seg_override(ins: &Instruction, out: &mut Vec<u8>) -> Result<bool, &'static str> {
    if !SegBases::used_by(ins) {
        return Err("no FS/GS memory operand");
    }
    if ins.is_string_instruction() {
        return Err("string instruction (ES:EDI cannot take a segment override)");
    }
    if ins.is_stack_instruction() || matches!(ins.mnemonic(), M::Enter | M::Leave) {
        return Err("stack instruction (64-bit pushes are 8 bytes)");
    }
    if is_bcd_or_32bit_only(ins) {
        return Err("not encodable in 64-bit mode");
    }
    if addr16(ins) {
        return Err("16-bit addressing");
    }
    if uses_high_byte(ins) {
        return Err("AH/CH/DH/BH with a REX prefix (the address goes through R13)");
    }
    let fs = ins.segment_prefix() == Register::FS;
    let base_at = if fs {
        crate::abi::FS_BASE
    } else {
        crate::abi::GS_BASE
    };
    let mark = out.len();
    let ea = ea_into_r13(ins);
    let load_base = MemoryOperand::with_base_displ(Register::R15, i64::from(base_at));
    let plus_base = MemoryOperand::new(
        Register::R13D,
        Register::R11D,
        1,
        0,
        0,
        false,
        Register::None,
    );
    let host = on_host_operand(ins, Register::R13D, Register::None, Register::GS)?;
    let ok = ea.ok().and_then(|i| enc(&i, out)).is_some()
        && Instruction::with2(Code::Mov_r32_rm32, Register::R11D, load_base)
            .ok()
            .and_then(|i| enc(&i, out))
            .is_some()
        && Instruction::with2(Code::Lea_r32_m, Register::R13D, plus_base)
            .ok()
            .and_then(|i| enc(&i, out))
            .is_some()
        && enc(&host, out).is_some();
    if ok {
        Ok(fs)
    } else {
        out.truncate(mark);
        Err("not encodable in 64-bit mode")
    }
}

/// The memory form of an instruction the fast scanner took (or of a MOV
/// between the accumulator and `[moffs32]`, as its ModRM form), in parts:
/// its opcode bytes, ModRM's reg field, the addressing bytes (ModRM, SIB,
/// displacement) and the rest (the immediate); REX.R when the reg field
/// names ESP (R12D on the host) and REX.B when the SIB base does.
struct MemForm {
    bytes: [u8; 16],
    len: usize,
    /// Where ModRM is, and where the addressing bytes end.
    m: usize,
    end: usize,
    rex_r: u8,
    rex_b: u8,
    absolute: bool,
}

impl MemForm {
    /// `bytes` (no prefix) in parts, if the fast scanner takes them (or
    /// their ModRM form, for a MOV with `[moffs32]`) as an instruction
    /// with a memory operand and no AH..BH (a REX prefix would change
    /// them).
    fn of(bytes: &[u8]) -> Option<MemForm> {
        let mut buf = [0u8; 16];
        let len = match moffs(bytes) {
            Some((op, a)) => {
                buf[..6].copy_from_slice(&[op, 0x05, a[0], a[1], a[2], a[3]]);
                6
            }
            None => {
                buf.get_mut(..bytes.len())?.copy_from_slice(bytes);
                bytes.len()
            }
        };
        let b = &buf[..len];
        let p = popek_decode::fast::plain(b)?;
        let m = usize::from(p.modrm());
        if m == 0 || p.high8() || usize::from(p.len()) != len {
            return None;
        }
        let (md, rm) = (b[m] >> 6, b[m] & 7);
        let mut end = m + 1;
        if rm == 4 {
            end += 1;
            if b[m + 1] & 7 == 5 && md == 0 {
                end += 4;
            }
        } else if rm == 5 && md == 0 {
            end += 4;
        }
        end += match md {
            1 => 1,
            2 => 4,
            _ => 0,
        };
        Some(MemForm {
            bytes: buf,
            len,
            m,
            end,
            rex_r: p.rex() & 0x04,
            rex_b: p.rex() & 0x01,
            absolute: p.absolute(),
        })
    }

    fn op(&self) -> &[u8] {
        &self.bytes[..self.m]
    }

    fn reg(&self) -> u8 {
        (self.bytes[self.m] >> 3) & 7
    }

    fn addr(&self) -> &[u8] {
        &self.bytes[self.m..self.end]
    }

    fn imm(&self) -> &[u8] {
        &self.bytes[self.end..self.len]
    }

    /// [`ea_into_r13`]'s host code: `mov r13d, disp32` for a bare
    /// `[disp32]`, else `lea r13d, [the guest's operand]` with 32-bit
    /// addressing (the guest's ModRM with 5, R13's low bits, as reg),
    /// given an 8-bit displacement of 0 where it had none (as the encoder
    /// is asked to).
    fn ea_into_r13(&self, out: &mut Vec<u8>) {
        let (modrm, rest) = (self.addr()[0], &self.addr()[1..]);
        if self.absolute {
            out.extend([0x41, 0xBD]);
            out.extend_from_slice(rest);
            return;
        }
        let (md, mut rm) = (modrm >> 6, modrm & 7);
        // A SIB with no index and no scale is written without one (but
        // for an ESP base, which needs it), as the encoder writes the
        // operand.
        let (sib, disp) = if rm == 4 {
            let sib = rest[0];
            if sib >> 3 == 4 && sib & 7 != 4 {
                rm = sib & 7;
                (None, &rest[1..])
            } else {
                (Some(sib), &rest[1..])
            }
        } else {
            (None, rest)
        };
        let no_base = sib.is_some_and(|s| s & 7 == 5) && md == 0;
        out.extend([0x67, 0x44 | self.rex_b, 0x8D]);
        if md == 0 && !no_base {
            out.push(0x40 | 5 << 3 | rm);
            out.extend(sib);
            out.push(0);
        } else {
            out.push(md << 6 | 5 << 3 | rm);
            out.extend(sib);
            out.extend_from_slice(disp);
        }
    }
}

/// MOV between the accumulator and a bare `[moffs32]` (A0-A3): its ModRM
/// form's opcode (as [`moffs_as_modrm`]) and the address.
fn moffs(bytes: &[u8]) -> Option<(u8, [u8; 4])> {
    let op = match bytes.first()? {
        0xA0 => 0x8A,
        0xA1 => 0x8B,
        0xA2 => 0x88,
        0xA3 => 0x89,
        _ => return None,
    };
    (bytes.len() == 5).then(|| (op, bytes[1..5].try_into().expect("4 bytes")))
}

/// [`lower_seg_override`] for an instruction whose bytes are an FS or GS
/// prefix and one the fast scanner takes (or a MOV of the accumulator to
/// or from `[moffs32]`, as its ModRM form): the same host code spelled from
/// the bytes (iced-x86 encodes it four times), or None for any other
/// instruction (the test `byte_lowerings_are_what_the_encoder_makes`
/// compares the two on every ModRM and SIB byte of the scanner's opcodes).
pub(crate) fn seg_override_from_bytes(bytes: &[u8], out: &mut Vec<u8>) -> Option<bool> {
    let fs = match bytes.first()? {
        0x64 => true,
        0x65 => false,
        _ => return None,
    };
    let f = MemForm::of(&bytes[1..])?;
    // LEA takes no segment (and so no base).
    if f.op() == [0x8D] {
        return None;
    }
    f.ea_into_r13(out);
    let base_at = if fs {
        crate::abi::FS_BASE
    } else {
        crate::abi::GS_BASE
    };
    const _: () = assert!(crate::abi::FS_BASE < 0x80 && crate::abi::GS_BASE < 0x80);
    out.extend([0x45, 0x8B, 0x5F, base_at]); // mov r11d, [r15 + base]
    out.extend([0x67, 0x47, 0x8D, 0x6C, 0x1D, 0x00]); // lea r13d, [r13d + r11d]
    out.extend([0x65, 0x67, 0x41 | f.rex_r]); // gs addr32, REX.B for R13
    out.extend_from_slice(f.op());
    out.extend([0x40 | f.reg() << 3 | 5, 0]); // [r13d + 0]
    out.extend_from_slice(f.imm());
    Some(fs)
}

/// [`lower_checked_store`] for an instruction the fast scanner takes (no
/// prefix, a memory operand, not LEA) or a MOV of the accumulator to or
/// from `[moffs32]`: the same host code spelled from its bytes, and where
/// the store starts; None for any other instruction.
pub(crate) fn checked_store_from_bytes(bytes: &[u8], out: &mut Vec<u8>) -> Option<usize> {
    let f = MemForm::of(bytes)?;
    if f.op() == [0x8D] {
        return None;
    }
    let mark = out.len();
    f.ea_into_r13(out);
    let split = out.len() - mark;
    out.push(0x43 | f.rex_r); // REX.X and REX.B: R13 and R11
    out.extend_from_slice(f.op());
    out.extend([0x04 | f.reg() << 3, 0x2B]); // [r11 + r13]
    out.extend_from_slice(f.imm());
    Some(split)
}

/// A hot store (`Bt::hot_stores`) as two pieces of host code for
/// [`crate::emit::Piece::Checked`]: its effective address into R13D (LEA,
/// flag-free; the first `split` bytes of what is appended to `out`), then
/// the instruction itself on `[r11 + r13]` (R11 the host's writable view
/// of RAM, no segment). Only plain accesses through DS, ES or SS (flat in
/// a translatable mode) of at most 16 bytes with 32-bit addressing: no
/// string, stack or x87 instruction, no FS/GS.
pub fn lower_checked_store(ins: &Instruction, out: &mut Vec<u8>) -> Result<usize, &'static str> {
    if !ins.op_kinds().any(|k| k == OpKind::Memory) || ins.mnemonic() == M::Lea {
        return Err("no memory operand");
    }
    if matches!(
        ins.segment_prefix(),
        Register::FS | Register::GS | Register::CS
    ) {
        return Err("a segment override");
    }
    if ins.is_string_instruction() || ins.is_stack_instruction() {
        return Err("string or stack instruction");
    }
    if matches!(ins.mnemonic(), M::Enter | M::Leave) || popek_interp::x87::is_x87(ins) {
        return Err("stack or x87 instruction");
    }
    if ins.memory_size().size() == 0 || ins.memory_size().size() > 16 {
        return Err("memory operand size");
    }
    if is_bcd_or_32bit_only(ins) || addr16(ins) || uses_high_byte(ins) {
        return Err("not encodable with R11 and R13");
    }
    let mark = out.len();
    let ea = ea_into_r13(ins);
    let host = on_host_operand(ins, Register::R11, Register::R13, Register::None)?;
    let ok = ea.ok().and_then(|i| enc(&i, out)).is_some();
    let split = out.len() - mark;
    if ok && enc(&host, out).is_some() {
        Ok(split)
    } else {
        out.truncate(mark);
        Err("not encodable in 64-bit mode")
    }
}

/// A hot push (`Bt::hot_stores`: the guest's stack shares a page with
/// translated code) for [`crate::emit::Piece::Checked`]: `lea r13d,
/// [r12 - 4]` (the first `split` bytes appended to `out`), then the store
/// on `[r11 + r13]` and ESP moved down. PUSH r32, PUSH imm and CALL rel32
/// (its return address; the block then exits to the target). Err for
/// every other instruction (and `out` unchanged).
pub fn lower_checked_push(ins: &Instruction, out: &mut Vec<u8>) -> Result<usize, &'static str> {
    let at = MemoryOperand::new(Register::R11, Register::R13, 1, 0, 0, false, Register::None);
    let store = match ins.code() {
        Code::Push_r32 => Instruction::with2(Code::Mov_rm32_r32, at, host_reg(ins.op0_register())),
        Code::Pushd_imm8 | Code::Pushd_imm32 => {
            Instruction::with2(Code::Mov_rm32_imm32, at, ins.immediate(0) as u32)
        }
        Code::Call_rel32_32 => Instruction::with2(Code::Mov_rm32_imm32, at, ins.next_ip32()),
        _ => return Err("not a push"),
    }
    .map_err(|_| "not encodable in 64-bit mode")?;
    let mark = out.len();
    out.extend([0x45, 0x8D, 0x6C, 0x24, 0xFC]); // lea r13d, [r12 - 4]
    let split = out.len() - mark;
    if enc(&store, out).is_none() {
        out.truncate(mark);
        return Err("not encodable in 64-bit mode");
    }
    adjust_esp(-4, out);
    Ok(split)
}

/// LEA (or MOV of the displacement) of `ins`'s guest effective address
/// into R13D: flag-free, wrapping at 4 GiB.
fn ea_into_r13(ins: &Instruction) -> Result<Instruction, iced_x86::IcedError> {
    let (b, i) = (ins.memory_base(), ins.memory_index());
    if b == Register::None && i == Register::None {
        return Instruction::with2(
            Code::Mov_r32_imm32,
            Register::R13D,
            ins.memory_displacement32(),
        );
    }
    let m = MemoryOperand::new(
        host_reg(b),
        host_reg(i),
        ins.memory_index_scale(),
        i64::from(ins.memory_displacement32() as i32),
        ins.memory_displ_size().max(1),
        false,
        Register::None,
    );
    Instruction::with2(Code::Lea_r32_m, Register::R13D, m)
}

/// `ins` (host registers) with its memory operand replaced by
/// `seg:[base + index]`, no displacement. The moffs forms of MOV have no
/// ModRM: their ModRM forms are used.
fn on_host_operand(
    ins: &Instruction,
    base: Register,
    index: Register,
    seg: Register,
) -> Result<Instruction, &'static str> {
    let at = MemoryOperand::new(base, index, 1, 0, 0, false, seg);
    match moffs_as_modrm(ins.code()) {
        Some((code, acc, true)) => Instruction::with2(code, acc, at),
        Some((code, acc, false)) => Instruction::with2(code, at, acc),
        None => Ok({
            let mut host = with_host_registers(ins);
            host.set_segment_prefix(seg);
            host.set_memory_base(base);
            host.set_memory_index(index);
            host.set_memory_index_scale(1);
            host.set_memory_displacement64(0);
            host.set_memory_displ_size(0);
            host
        }),
    }
    .map_err(|_| "not encodable in 64-bit mode")
}

/// `ins` with its register operands renamed for the host (guest ESP lives
/// in R12D).
fn with_host_registers(ins: &Instruction) -> Instruction {
    let mut host = *ins;
    for k in 0..ins.op_count() {
        if ins.op_kind(k) == OpKind::Register {
            host.set_op_register(k, host_reg(ins.op_register(k)));
        }
    }
    host
}

/// Does the memory operand use 16-bit addressing ([bx+si], [disp16])?
fn addr16(ins: &Instruction) -> bool {
    ins.memory_base().size() == 2 || ins.memory_index().size() == 2 || ins.memory_displ_size() == 2
}

/// For a moffs form of MOV (no ModRM byte): the ModRM form, the
/// accumulator, and whether it loads (true) or stores.
fn moffs_as_modrm(c: Code) -> Option<(Code, Register, bool)> {
    Some(match c {
        Code::Mov_AL_moffs8 => (Code::Mov_r8_rm8, Register::AL, true),
        Code::Mov_AX_moffs16 => (Code::Mov_r16_rm16, Register::AX, true),
        Code::Mov_EAX_moffs32 => (Code::Mov_r32_rm32, Register::EAX, true),
        Code::Mov_moffs8_AL => (Code::Mov_rm8_r8, Register::AL, false),
        Code::Mov_moffs16_AX => (Code::Mov_rm16_r16, Register::AX, false),
        Code::Mov_moffs32_EAX => (Code::Mov_rm32_r32, Register::EAX, false),
        _ => return None,
    })
}

/// The host register for a guest register: guest ESP lives in R12D (the
/// host's RSP is the host's stack); the others keep their numbers.
fn host_reg(r: Register) -> Register {
    match r {
        Register::ESP => Register::R12D,
        Register::SP => Register::R12W,
        r => r,
    }
}

thread_local! {
    /// One 64-bit encoder per thread, reused (creating one allocates).
    static ENCODER: std::cell::RefCell<Encoder> = std::cell::RefCell::new(Encoder::new(64));
}

/// Encode one host instruction onto `out`.
fn enc(ins: &Instruction, out: &mut Vec<u8>) -> Option<()> {
    ENCODER.with(|e| {
        let mut e = e.borrow_mut();
        let ok = e.encode(ins, 0).is_ok();
        // Hand the encoder its buffer back, emptied (no allocation per
        // instruction). A failed encoding may have left part of the
        // instruction in it: that must not reach the next one.
        let mut b = e.take_buffer();
        if ok {
            out.extend_from_slice(&b);
        }
        b.clear();
        e.set_buffer(b);
        ok.then_some(())
    })
}

/// ModRM (with `reg`'s low bits), SIB and displacement of `[r12d + disp]`:
/// no displacement for 0, 8 bits when it fits, else 32.
fn r12_operand(reg: u8, disp: i32, out: &mut Vec<u8>) {
    let r = (reg & 7) << 3;
    match disp {
        0 => out.extend([r | 0b100, 0x24]),
        -128..=127 => out.extend([0x40 | r | 0b100, 0x24, disp as u8]),
        _ => {
            out.extend([0x80 | r | 0b100, 0x24]);
            out.extend(disp.to_le_bytes());
        }
    }
}

/// The number (0-15) of a 32-bit host register.
fn reg_number(r: Register) -> Option<u8> {
    let n = r.number();
    (r.size() == 4 && n < 16).then_some(n as u8)
}

/// `mov gs:[r12d + disp], r32` (store) or `mov r32, gs:[r12d + disp]`:
/// guest stack memory, encoded here (the most common rewrite; the general
/// encoder costs more than the rest of the instruction's translation).
fn stack_mov(store: bool, reg: Register, disp: i32, out: &mut Vec<u8>) -> Option<()> {
    let n = reg_number(reg)?;
    // GS, address size 32, REX (R for R8D-R15D, B for R12).
    out.extend([0x65, 0x67, 0x41 | if n >= 8 { 0x04 } else { 0 }]);
    out.push(if store { 0x89 } else { 0x8B });
    r12_operand(n, disp, out);
    Some(())
}

/// `lea r12d, [r12d + delta]`: move the guest stack pointer (no flags).
fn adjust_esp(delta: i64, out: &mut Vec<u8>) {
    out.extend([0x67, 0x45, 0x8D]);
    r12_operand(12, delta as i32, out);
}

/// `mov r13d, <operand 0 of ins>` for a register or 32-bit-addressed
/// memory operand (through GS).
fn load_r13d(ins: &Instruction, out: &mut Vec<u8>) -> Option<()> {
    let load = match ins.op0_kind() {
        OpKind::Register => Instruction::with2(
            Code::Mov_r32_rm32,
            Register::R13D,
            host_reg(ins.op0_register()),
        )
        .ok()?,
        OpKind::Memory => {
            let (b, i) = (ins.memory_base(), ins.memory_index());
            if b.size() == 2
                || i.size() == 2
                || matches!(ins.segment_prefix(), Register::FS | Register::GS)
            {
                return None;
            }
            let m = MemoryOperand::new(
                host_reg(b),
                host_reg(i),
                ins.memory_index_scale(),
                i64::from(ins.memory_displacement32() as i32),
                if b == Register::None && i == Register::None {
                    4
                } else {
                    ins.memory_displ_size().max(1)
                },
                false,
                Register::GS,
            );
            Instruction::with2(Code::Mov_r32_rm32, Register::R13D, m).ok()?
        }
        _ => return None,
    };
    enc(&load, out)
}

/// PUSH imm32 on the guest stack: the store first, then ESP, so a fault
/// leaves ESP untouched.
fn push_imm32(v: u32, out: &mut Vec<u8>) {
    // mov dword gs:[r12d - 4], imm32
    out.extend([0x65, 0x67, 0x41, 0xC7]);
    r12_operand(0, -4, out);
    out.extend(v.to_le_bytes());
    adjust_esp(-4, out);
}

/// LEAVE's host code: the saved EBP loaded first (a fault leaves ESP and
/// EBP as they were), then ESP = EBP + 4 and EBP = the value loaded:
/// `mov r13d, gs:[ebp]`, `lea r12d, [ebp + 4]`, `mov ebp, r13d` (the test
/// `leave_is_what_the_encoder_makes` holds the bytes to iced-x86's).
const LEAVE: [u8; 14] = [
    0x65, 0x67, 0x44, 0x8B, 0x6D, 0x00, // mov r13d, gs:[ebp]
    0x67, 0x44, 0x8D, 0x65, 0x04, // lea r12d, [ebp + 4]
    0x41, 0x8B, 0xED, // mov ebp, r13d
];

/// PUSH r/m32/imm, POP r32 and LEAVE on the guest stack (32-bit operand size),
/// appended to `out`. The store or load comes first, so a fault leaves ESP
/// untouched. False (and `out` unchanged) for every other instruction.
pub fn lower_stack(ins: &Instruction, out: &mut Vec<u8>) -> bool {
    let mark = out.len();
    let done = match ins.code() {
        Code::Push_r32 => {
            stack_mov(true, host_reg(ins.op0_register()), -4, out).map(|()| adjust_esp(-4, out))
        }
        Code::Pushd_imm8 | Code::Pushd_imm32 => {
            push_imm32(ins.immediate(0) as u32, out);
            Some(())
        }
        // PUSH r/m32: the operand's address uses ESP before the push
        // (Intel SDM PUSH), as the load through R13D does.
        Code::Push_rm32 => load_r13d(ins, out)
            .and_then(|()| stack_mov(true, Register::R13D, -4, out))
            .map(|()| adjust_esp(-4, out)),
        Code::Pop_r32 => {
            let r = host_reg(ins.op0_register());
            stack_mov(false, r, 0, out).map(|()| {
                // POP ESP: ESP is the value popped.
                if r != Register::R12D {
                    adjust_esp(4, out);
                }
            })
        }
        // LEAVE: the saved EBP loaded first (a fault leaves ESP and EBP
        // as they were), then ESP = EBP + 4 and EBP = the value loaded.
        Code::Leaved => {
            out.extend(LEAVE);
            Some(())
        }
        _ => None,
    };
    if done.is_none() {
        out.truncate(mark);
    }
    done.is_some()
}

/// A string instruction (MOVS, STOS, LODS, CMPS, SCAS, with or without a
/// REP prefix) with 32-bit addresses and no segment override, run by the
/// host's own string instruction on host pointers: ESI and EDI become
/// `window + ESI` and `window + EDI` (64-bit addresses, so ES needs no
/// override), the guest's bytes run unchanged (RCX is the count, DF the
/// direction), and the low 32 bits are kept after. The window is
/// 4 GiB-aligned, so at a fault in the middle the low halves the fault
/// handler saves are the guest's ESI and EDI with the progress made; a run
/// that wraps around the guest's 4 GiB faults in the window's guard and is
/// redone by the interpreter. INS and OUTS are not here (port I/O). False
/// (and `out` unchanged) for every other instruction.
pub fn lower_string(ins: &Instruction, bytes: &[u8], out: &mut Vec<u8>) -> bool {
    let (src, dst) = match ins.mnemonic() {
        M::Movsb | M::Movsw | M::Movsd | M::Cmpsb | M::Cmpsw | M::Cmpsd => (true, true),
        M::Stosb | M::Stosw | M::Stosd | M::Scasb | M::Scasw | M::Scasd => (false, true),
        M::Lodsb | M::Lodsw | M::Lodsd => (true, false),
        _ => return false,
    };
    let addr32 = ins
        .op_kinds()
        .all(|k| !matches!(k, OpKind::MemorySegSI | OpKind::MemoryESDI));
    if !addr32 || ins.segment_prefix() != Register::None || bytes.len() != ins.len() {
        return false;
    }
    out.extend([0x4D, 0x8B, 0x4F, crate::abi::WINDOW]); // mov r9, [r15 + window]
    if src {
        out.extend([0x49, 0x8D, 0x34, 0x31]); // lea rsi, [r9 + rsi]
    }
    if dst {
        out.extend([0x49, 0x8D, 0x3C, 0x39]); // lea rdi, [r9 + rdi]
    }
    out.extend_from_slice(bytes);
    if src {
        out.extend([0x89, 0xF6]); // mov esi, esi
    }
    if dst {
        out.extend([0x89, 0xFF]); // mov edi, edi
    }
    true
}

/// A block-ending near transfer: JMP rel, Jcc rel, LOOP, JECXZ, CALL rel,
/// RET [imm16] (32-bit operand and address size). Appends host code to
/// run first (CALL's push of the return address, RET's pop of the target
/// into the context) to `out` and says how the block exits. None (and `out`
/// unchanged) for every other instruction.
pub fn lower_terminator(ins: &Instruction, out: &mut Vec<u8>) -> Option<BlockExit> {
    let mark = out.len();
    let r = terminator(ins, out);
    if r.is_none() {
        out.truncate(mark);
    }
    r
}

/// The host code of a block exit the fast scanner found
/// ([`popek_decode::fast::exit`]) at an instruction that ends at `next`,
/// appended to `out`: what [`lower_terminator`] gives for the same
/// instruction.
pub(crate) fn exit_code(e: popek_decode::fast::Exit, next: u32, out: &mut Vec<u8>) -> BlockExit {
    use popek_decode::fast::Exit;
    match e {
        Exit::Jmp(target) => BlockExit::Direct(target),
        Exit::Call(target) => {
            push_imm32(next, out);
            BlockExit::Direct(target)
        }
        Exit::Ret => {
            ret(0, out);
            BlockExit::Stored
        }
    }
}

/// RET's host code: the return address into R13D, then ESP past it and
/// `imm` bytes more.
fn ret(imm: i64, out: &mut Vec<u8>) {
    // (A 32-bit register: `stack_mov` refuses only others.)
    let _ = stack_mov(false, Register::R13D, 0, out);
    adjust_esp(4 + imm, out);
}

fn terminator(ins: &Instruction, out: &mut Vec<u8>) -> Option<BlockExit> {
    let next = ins.next_ip32();
    match ins.code() {
        Code::Jmp_rel8_32 | Code::Jmp_rel32_32 => Some(BlockExit::Direct(ins.near_branch32())),
        Code::Call_rel32_32 => {
            push_imm32(next, out);
            Some(BlockExit::Direct(ins.near_branch32()))
        }
        Code::Retnd | Code::Retnd_imm16 => {
            let imm = if ins.code() == Code::Retnd_imm16 {
                i64::from(ins.immediate16())
            } else {
                0
            };
            ret(imm, out);
            Some(BlockExit::Stored)
        }
        Code::Jmp_rm32 | Code::Call_rm32 => {
            // The target into R13D first (the operand may use ESP), then
            // CALL's push; the exit looks the target up.
            load_r13d(ins, out)?;
            if ins.code() == Code::Call_rm32 {
                push_imm32(next, out);
            }
            Some(BlockExit::Stored)
        }
        Code::Loop_rel8_32_ECX => Some(BlockExit::Loop {
            taken: ins.near_branch32(),
            not_taken: next,
        }),
        Code::Jecxz_rel8_32 => Some(BlockExit::Jecxz {
            taken: ins.near_branch32(),
            not_taken: next,
        }),
        _ if ins.is_jcc_short_or_near() && ins.op0_kind() == OpKind::NearBranch32 => {
            // iced's ConditionCode runs o, no, b, ae, ... g from 1: the x86
            // condition nibble is one less.
            let cc = (ins.condition_code() as u8).wrapping_sub(1) & 0x0F;
            Some(BlockExit::Cond {
                cc,
                taken: ins.near_branch32(),
                not_taken: next,
            })
        }
        _ => None,
    }
}

/// Re-encode `ins` for the host, if it can be copied.
pub fn lower(ins: &Instruction) -> Lowering {
    if classify(ins) != Class::Innocuous {
        return Lowering::NotCopyable("special or control flow");
    }
    lower_innocuous(ins, None)
}

/// [`lower_into`] as a value.
pub fn lower_innocuous(ins: &Instruction, bytes: Option<&[u8]>) -> Lowering {
    let mut out = Vec::new();
    match lower_into(ins, bytes, &mut out) {
        Ok(()) => Lowering::Copied(out),
        Err(why) => Lowering::NotCopyable(why),
    }
}

/// BCD adjustments and other instructions 64-bit mode does not have.
fn is_bcd_or_32bit_only(ins: &Instruction) -> bool {
    matches!(
        ins.mnemonic(),
        M::Daa
            | M::Das
            | M::Aaa
            | M::Aas
            | M::Aam
            | M::Aad
            | M::Bound
            | M::Into
            | M::Salc
            | M::Lds
            | M::Les
            | M::Lfs
            | M::Lgs
            | M::Lss
            | M::Arpl
            | M::Xlatb
    )
}

/// Does a register operand or address register name ESP/SP (which lives
/// in R12 on the host)?
fn uses_esp(ins: &Instruction) -> bool {
    (0..ins.op_count()).any(|i| ins.op_kind(i) == OpKind::Register && is_esp(ins.op_register(i)))
        || is_esp(ins.memory_base())
        || is_esp(ins.memory_index())
}

/// ESP or SP (R12 on the host).
fn is_esp(r: Register) -> bool {
    matches!(r, Register::ESP | Register::SP)
}

/// Does the instruction name AH, CH, DH or BH? Those cannot be encoded
/// with a REX prefix (the same register numbers then mean SPL, BPL, SIL
/// and DIL), and a host instruction that uses R12 (the guest's ESP) or R13
/// needs one: such an instruction is left to the interpreter.
fn uses_high_byte(ins: &Instruction) -> bool {
    (0..ins.op_count()).any(|i| {
        ins.op_kind(i) == OpKind::Register
            && matches!(
                ins.op_register(i),
                Register::AH | Register::CH | Register::DH | Register::BH
            )
    })
}

/// Opcode 0x82 (an alias of 0x80 that 64-bit mode does not have). The
/// other 32-bit-only opcodes are stack, BCD, far or segment-load
/// instructions, which never reach the fast path. (iced's `op_code()`
/// would say it too, but builds a large table on first use.)
fn group1_82(c: Code) -> bool {
    matches!(
        c,
        Code::Add_rm8_imm8_82
            | Code::Or_rm8_imm8_82
            | Code::Adc_rm8_imm8_82
            | Code::Sbb_rm8_imm8_82
            | Code::And_rm8_imm8_82
            | Code::Sub_rm8_imm8_82
            | Code::Xor_rm8_imm8_82
            | Code::Cmp_rm8_imm8_82
    )
}

/// The fast path of [`lower`]: when the guest's own bytes mean the same
/// in 64-bit mode, copy them (behind `gs` and `addr32` prefixes when the
/// instruction addresses memory) instead of encoding again. That holds for
/// an innocuous instruction without a segment prefix, a 16-bit address, a
/// short INC/DEC form or an opcode that 64-bit mode lacks (0x82); ESP and a
/// bare ModRM disp32 (RIP-relative in 64-bit mode) are patched in the bytes
/// ([`patch_bytes`]). False otherwise (the encoder's turn).
fn copy_bytes(ins: &Instruction, bytes: &[u8], out: &mut Vec<u8>) -> bool {
    // VEX, XOP and EVEX fields mean other registers in 64-bit mode (the
    // inverted R', V' and vvvv bits 32-bit mode ignores): the encoder's.
    if ins.encoding() != iced_x86::EncodingKind::Legacy
        || bytes.len() != ins.len()
        || group1_82(ins.code())
        || ins.segment_prefix() != Register::None
        || matches!(
            ins.code(),
            Code::Inc_r32 | Code::Dec_r32 | Code::Inc_r16 | Code::Dec_r16
        )
    {
        return false;
    }
    let mem = ins.op_kinds().any(|k| k == OpKind::Memory);
    if mem && addr16(ins) {
        return false;
    }
    let absolute = mem
        && ins.memory_base() == Register::None
        && ins.memory_index() == Register::None
        && moffs_as_modrm(ins.code()).is_none();
    if absolute || uses_esp(ins) {
        return patch_bytes(ins, bytes, mem, absolute, out);
    }
    if mem {
        out.extend([0x65, 0x67]);
    }
    out.extend_from_slice(bytes);
    true
}

/// [`copy_bytes`] for an instruction naming ESP or addressing a bare
/// `[disp32]`: the guest's bytes behind `gs addr32` (with memory), a REX
/// prefix after the legacy prefixes (REX.B for ESP as SIB base, ModRM r/m
/// register or the register in the opcode, REX.R for ESP in ModRM.reg: R12
/// on the host), and a bare disp32 ModRM (mod 00, r/m 101, RIP-relative in
/// 64-bit mode) given a SIB byte with neither base nor index (r/m 100, SIB
/// 0x25: `[disp32]`, Intel SDM Vol. 2A, 2.2.1.6). Only instructions
/// whose register operands are all general registers other than
/// AH/CH/DH/BH (which a REX prefix turns into SPL/BPL/SIL/DIL); false for
/// anything else (the encoder's turn). The test
/// `patched_bytes_mean_what_the_encoder_would_emit` holds it to the
/// encoder on random instructions.
fn patch_bytes(
    ins: &Instruction,
    bytes: &[u8],
    mem: bool,
    absolute: bool,
    out: &mut Vec<u8>,
) -> bool {
    if uses_high_byte(ins) {
        return false;
    }
    let mut esp_regs = 0;
    for k in 0..ins.op_count() {
        if ins.op_kind(k) == OpKind::Register {
            let r = ins.op_register(k);
            if !r.is_gpr() {
                return false;
            }
            esp_regs += usize::from(is_esp(r));
        }
    }
    let op = bytes
        .iter()
        .position(|b| {
            !matches!(
                b,
                0x66 | 0x67 | 0xF0 | 0xF2 | 0xF3 | 0x26 | 0x2E | 0x36 | 0x3E | 0x64 | 0x65
            )
        })
        .unwrap_or(bytes.len());
    let (opcode_len, in_opcode) = match &bytes[op..] {
        [0x0F, 0x38 | 0x3A, ..] => (3, false),
        [0x0F, b, ..] => (2, (0xC8..=0xCF).contains(b)),
        [b, ..] => (1, matches!(b, 0x90..=0x97 | 0xB8..=0xBF)),
        [] => return false,
    };
    let modrm_at = op + opcode_len;
    let mut rex = 0x40;
    if is_esp(ins.memory_base()) {
        rex |= 1;
    }
    if in_opcode {
        if esp_regs > 0 {
            rex |= 1;
            esp_regs -= 1;
        }
    } else if esp_regs > 0 || absolute {
        let Some(&modrm) = bytes.get(modrm_at) else {
            return false;
        };
        if modrm >> 6 == 3 && modrm & 7 == 4 && esp_regs > 0 {
            rex |= 1;
            esp_regs -= 1;
        }
        if esp_regs > 0 && (modrm >> 3) & 7 == 4 {
            rex |= 4;
            esp_regs -= 1;
        }
        if absolute && modrm & 0xC7 != 0x05 {
            return false;
        }
    }
    if esp_regs > 0 || (absolute && in_opcode) {
        return false;
    }
    if mem {
        out.extend([0x65, 0x67]);
    }
    out.extend_from_slice(&bytes[..op]);
    if rex != 0x40 {
        out.push(rex);
    }
    if absolute {
        out.extend_from_slice(&bytes[op..modrm_at]);
        out.extend([bytes[modrm_at] & !7 | 4, 0x25]);
        out.extend_from_slice(&bytes[modrm_at + 1..]);
    } else {
        out.extend_from_slice(&bytes[op..]);
    }
    true
}

/// Does an innocuous instruction's code alone allow copying its bytes
/// (legacy encoding; no string, stack, BCD or other 32-bit-only
/// instruction, no 0x82 alias, no short INC/DEC)? Memoized by code
/// (1 yes, 2 no).
fn code_copies(ins: &Instruction) -> bool {
    static COPIES: CodeMemo = CodeMemo::new();
    let yes = || {
        ins.encoding() == iced_x86::EncodingKind::Legacy
            && !ins.is_string_instruction()
            && !ins.is_stack_instruction()
            && !matches!(ins.mnemonic(), M::Enter | M::Leave)
            && !is_bcd_or_32bit_only(ins)
            && !group1_82(ins.code())
            && !matches!(
                ins.code(),
                Code::Inc_r32 | Code::Dec_r32 | Code::Inc_r16 | Code::Dec_r16
            )
    };
    COPIES.get(ins.code(), || if yes() { 1 } else { 2 }) == 1
}

/// The common case of [`copy_bytes`], decided from the decoded fields
/// directly: a code that copies ([`code_copies`]), no segment prefix, no
/// ESP or SP anywhere, and a memory operand (if any) with a 32-bit address
/// and a base or index register. False leaves it to the full path.
fn copy_plain(ins: &Instruction, bytes: &[u8], out: &mut Vec<u8>) -> bool {
    let esp = |r: Register| matches!(r, Register::ESP | Register::SP);
    if bytes.len() != ins.len()
        || ins.segment_prefix() != Register::None
        || esp(ins.op0_register())
        || esp(ins.op1_register())
        || esp(ins.op2_register())
        || esp(ins.op3_register())
        || !code_copies(ins)
    {
        return false;
    }
    let mem = [
        ins.op0_kind(),
        ins.op1_kind(),
        ins.op2_kind(),
        ins.op3_kind(),
    ]
    .contains(&OpKind::Memory);
    if mem {
        let (b, i) = (ins.memory_base(), ins.memory_index());
        if esp(b) || esp(i) || (b == Register::None && i == Register::None) || addr16(ins) {
            return false;
        }
        out.extend([0x65, 0x67]);
    }
    out.extend_from_slice(bytes);
    true
}

/// The host code of an instruction the fast scanner took
/// ([`popek_decode::fast::take`]), appended to `out`: its bytes without a
/// DS, ES or SS override (an operand-size prefix after `gs addr32` and
/// before REX, where the decoder's path puts it), behind `gs addr32`
/// when it addresses memory
/// (`[moffs32]` too), with the REX prefix ESP needs (R12 on the host), a
/// bare `[disp32]` given a SIB byte with neither base nor index (as
/// [`patch_bytes`] writes it), and INC/DEC r32 in their ModRM form (FF /0,
/// FF /1); PUSH and POP r32 as [`lower_stack`] writes them. What
/// [`lower_into`] (`lower_stack` for PUSH and POP) gives for the same
/// instruction without the override (the tests
/// `fast_scanner_agrees_with_the_decoder` and `fast_scanner_prefixes_and_moffs`).
#[inline(always)]
pub(crate) fn copy_fast(
    p: popek_decode::fast::Plain,
    raw: &[u8; popek_decode::MAX_INSN_LEN],
    out: &mut Vec<u8>,
) {
    // Written as fixed-size moves into a local buffer, appended whole and
    // cut to length: no copy of a variable length per instruction.
    const ROOM: usize = popek_decode::MAX_INSN_LEN + 5;
    // The bytes after a segment prefix the host code leaves out (with room
    // for the fixed-size moves below past the end).
    let mut shifted = [0u8; popek_decode::MAX_INSN_LEN + 1];
    let raw: &[u8] = if p.prefix() == 0 {
        raw
    } else {
        shifted[..popek_decode::MAX_INSN_LEN - 1].copy_from_slice(&raw[1..]);
        &shifted
    };
    let guest_len = usize::from(p.len() - p.prefix());
    let mut host = [0u8; ROOM];
    let len = if p.stack() {
        // `lower_stack`'s: PUSH is `mov gs:[r12d - 4], r32` and `lea r12d,
        // [r12d - 4]`; POP is `mov r32, gs:[r12d]` and `lea r12d, [r12d +
        // 4]` (not for POP ESP: ESP is the value loaded). ESP is R12D.
        let r = raw[0] & 7;
        let (rex, modrm) = match r {
            4 => (0x45, 0x20),
            _ => (0x41, r << 3),
        };
        if raw[0] < 0x58 {
            host[..13].copy_from_slice(&[
                0x65,
                0x67,
                rex,
                0x89,
                0x44 | modrm,
                0x24,
                0xFC,
                0x67,
                0x45,
                0x8D,
                0x64,
                0x24,
                0xFC,
            ]);
            13
        } else {
            host[..12].copy_from_slice(&[
                0x65,
                0x67,
                rex,
                0x8B,
                0x04 | modrm,
                0x24,
                0x67,
                0x45,
                0x8D,
                0x64,
                0x24,
                0x04,
            ]);
            if r == 4 {
                6
            } else {
                12
            }
        }
    } else if p.inc_dec() {
        host[0] = 0xFF;
        host[1] = 0xC0 | (raw[0] & 0x0F);
        2
    } else {
        let mut at = 0;
        if p.modrm() != 0 || p.moffs() {
            host[..2].copy_from_slice(&[0x65, 0x67]);
            at = 2;
        }
        if p.opsize() {
            host[at] = 0x66;
            at += 1;
        }
        if p.rex() != 0 {
            host[at] = p.rex();
            at += 1;
        }
        if !p.absolute() {
            host[at..at + popek_decode::MAX_INSN_LEN]
                .copy_from_slice(&raw[..popek_decode::MAX_INSN_LEN]);
            at + guest_len
        } else {
            // The opcode (one or two bytes), ModRM given a SIB, then the
            // displacement and immediate.
            let m = usize::from(p.modrm());
            host[at..at + 2].copy_from_slice(&raw[..2]);
            host[at + m] = (raw[m] & 0xF8) | 4;
            host[at + m + 1] = 0x25;
            host[at + m + 2..at + m + 2 + 12].copy_from_slice(&raw[m + 1..m + 13]);
            at + guest_len + 1
        }
    };
    let mark = out.len();
    out.extend_from_slice(&host);
    out.truncate(mark + len);
}

/// [`lower`] for an instruction the decoder already classified innocuous,
/// with its guest `bytes` when at hand (the fast path copies them): the
/// host code is appended to `out`, or the reason it cannot be copied is
/// returned (and `out` is unchanged).
pub fn lower_into(
    ins: &Instruction,
    bytes: Option<&[u8]>,
    out: &mut Vec<u8>,
) -> Result<(), &'static str> {
    if bytes.is_some_and(|b| copy_plain(ins, b, out)) {
        return Ok(());
    }
    if ins.is_string_instruction() {
        return Err("string instruction (ES:EDI cannot take a segment override)");
    }
    if ins.is_stack_instruction() || matches!(ins.mnemonic(), M::Enter | M::Leave) {
        return Err("stack instruction (64-bit pushes are 8 bytes)");
    }
    if SegBases::used_by(ins) {
        return Err("FS/GS override (guarded host code: lower_seg_override)");
    }
    if is_bcd_or_32bit_only(ins) {
        return Err("not encodable in 64-bit mode");
    }
    if bytes.is_some_and(|b| copy_bytes(ins, b, out)) {
        return Ok(());
    }
    if uses_esp(ins) && uses_high_byte(ins) {
        return Err("AH/CH/DH/BH with ESP (R12 needs a REX prefix)");
    }
    let mut host = with_host_registers(ins);
    // INC/DEC r16/r32 short forms (40+r, 48+r) are REX prefixes in 64-bit mode.
    let code = match ins.code() {
        Code::Inc_r32 => Some(Code::Inc_rm32),
        Code::Dec_r32 => Some(Code::Dec_rm32),
        Code::Inc_r16 => Some(Code::Inc_rm16),
        Code::Dec_r16 => Some(Code::Dec_rm16),
        _ => None,
    };
    if let Some(c) = code {
        host = match Instruction::with1(c, host_reg(ins.op0_register())) {
            Ok(i) => i,
            Err(_) => return Err("INC/DEC re-encoding failed"),
        };
    }
    if ins.op_kinds().any(|k| k == OpKind::Memory) {
        if addr16(ins) {
            return Err("16-bit addressing");
        }
        let (b, i) = (ins.memory_base(), ins.memory_index());
        host.set_segment_prefix(Register::GS);
        host.set_memory_base(host_reg(b));
        host.set_memory_index(host_reg(i));
        if b == Register::None && i == Register::None {
            // An absolute [disp32]: in 64-bit mode encode it as SIB-absolute
            // with a 32-bit address size (not RIP-relative).
            host.set_memory_displ_size(4);
        }
    }
    match enc(&host, out) {
        Some(()) => Ok(()),
        None => Err("not encodable in 64-bit mode"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

    /// `gs:[r12d + disp]`: guest stack memory.
    fn stack_slot(disp: i64) -> MemoryOperand {
        MemoryOperand::new(
            Register::R12D,
            Register::None,
            1,
            disp,
            1,
            false,
            Register::GS,
        )
    }

    /// One decoded host instruction, formatted, that must be all of `b`.
    fn one(b: &[u8]) -> String {
        let mut d = Decoder::with_ip(64, b, 0, DecoderOptions::NONE);
        let ins = d.decode();
        assert!(!ins.is_invalid() && ins.len() == b.len(), "{b:02x?}");
        let mut t = String::new();
        IntelFormatter::new().format(&ins, &mut t);
        t
    }

    /// The same instruction through iced's encoder, formatted.
    fn iced(ins: Instruction) -> String {
        let mut b = Vec::new();
        enc(&ins, &mut b).unwrap();
        one(&b)
    }

    /// The guest-stack forms encoded by hand are the instructions the
    /// general encoder makes, for every register and every displacement
    /// size.
    #[test]
    fn hand_encoded_stack_forms_match_the_encoder() {
        let regs = [
            Register::EAX,
            Register::ECX,
            Register::EDX,
            Register::EBX,
            Register::R12D,
            Register::EBP,
            Register::ESI,
            Register::EDI,
            Register::R13D,
        ];
        for disp in [0i32, 4, -4, 127, -128, 128, -129, 0x1000, -0x7FFF_FFFF] {
            for r in regs {
                let mut b = Vec::new();
                stack_mov(true, r, disp, &mut b).unwrap();
                let want = Instruction::with2(Code::Mov_rm32_r32, stack_slot(i64::from(disp)), r);
                assert_eq!(one(&b), iced(want.unwrap()), "store {r:?} {disp}");
                let mut b = Vec::new();
                stack_mov(false, r, disp, &mut b).unwrap();
                let want = Instruction::with2(Code::Mov_r32_rm32, r, stack_slot(i64::from(disp)));
                assert_eq!(one(&b), iced(want.unwrap()), "load {r:?} {disp}");
            }
            let mut b = Vec::new();
            adjust_esp(i64::from(disp), &mut b);
            let m = MemoryOperand::new(
                Register::R12D,
                Register::None,
                1,
                i64::from(disp),
                1,
                false,
                Register::None,
            );
            let want = Instruction::with2(Code::Lea_r32_m, Register::R12D, m);
            assert_eq!(one(&b), iced(want.unwrap()), "lea {disp}");
        }
        let mut b = Vec::new();
        push_imm32(0x0804_90F0, &mut b);
        let store = b.len() - 6;
        let want = Instruction::with2(Code::Mov_rm32_imm32, stack_slot(-4), 0x0804_90F0_u32);
        assert_eq!(one(&b[..store]), iced(want.unwrap()));
        assert_eq!(one(&b[store..]), "lea r12d,[r12d-4]");
    }

    /// LEAVE's bytes, spelled by hand, are the encoder's for the three
    /// instructions they stand for.
    #[test]
    fn leave_is_what_the_encoder_makes() {
        let saved = MemoryOperand::new(Register::EBP, Register::None, 1, 0, 0, false, Register::GS);
        let above = MemoryOperand::new(
            Register::EBP,
            Register::None,
            1,
            4,
            1,
            false,
            Register::None,
        );
        let mut want = Vec::new();
        for ins in [
            Instruction::with2(Code::Mov_r32_rm32, Register::R13D, saved),
            Instruction::with2(Code::Lea_r32_m, Register::R12D, above),
            Instruction::with2(Code::Mov_r32_rm32, Register::EBP, Register::R13D),
        ] {
            enc(&ins.unwrap(), &mut want).unwrap();
        }
        assert_eq!(LEAVE[..], want[..]);
        let mut b = Vec::new();
        assert!(lower_stack(&guest(&[0xC9]), &mut b));
        assert_eq!(b, want);
    }

    fn guest(bytes: &[u8]) -> Instruction {
        Decoder::with_ip(32, bytes, 0, DecoderOptions::NONE).decode()
    }

    fn host_text(bytes: &[u8]) -> String {
        let ins = Decoder::with_ip(64, bytes, 0, DecoderOptions::NONE).decode();
        assert_eq!(ins.len(), bytes.len());
        let mut s = String::new();
        IntelFormatter::new().format(&ins, &mut s);
        s
    }

    /// AH, CH, DH and BH cannot be encoded beside R12 (the guest's ESP) or
    /// R13: with the REX prefix those need, the same register numbers mean
    /// SPL, BPL, SIL and DIL, and `mov ah, [esp+40h]` would have written
    /// the low byte of the host's stack pointer (found booting Linux).
    #[test]
    fn high_byte_registers_never_meet_a_rex_prefix() {
        for g in [
            &[0x8A, 0x64, 0x24, 0x40][..],               // mov ah,[esp+40h]
            &[0x88, 0x7C, 0x24, 0x08],                   // mov [esp+8],bh
            &[0x64, 0x8A, 0x25, 0x10, 0x00, 0x00, 0x00], // mov ah,fs:[10h]
        ] {
            let mut out = Vec::new();
            let ins = guest(g);
            let lowered = if SegBases::used_by(&ins) {
                lower_seg_override(&ins, &mut out).map(|_| ())
            } else {
                lower_into(&ins, Some(g), &mut out)
            };
            match lowered {
                Err(_) => assert!(out.is_empty()),
                Ok(()) => {
                    let mut d = Decoder::with_ip(64, &out, 0, DecoderOptions::NONE);
                    while d.can_decode() {
                        let ins = d.decode();
                        let mut t = String::new();
                        IntelFormatter::new().format(&ins, &mut t);
                        for r in ["spl", "bpl", "sil", "dil"] {
                            assert!(!t.contains(r), "{g:02x?} lowered to {t}");
                        }
                    }
                }
            }
        }
        // A failed encoding leaves nothing behind in the encoder for the
        // next instruction.
        let bad = Instruction::with2(
            Code::Mov_r8_rm8,
            Register::AH,
            MemoryOperand::with_base_displ(Register::R12D, 0x40),
        )
        .unwrap();
        assert_eq!(enc(&bad, &mut Vec::new()), None);
        let mut out = Vec::new();
        enc(&Instruction::with(Code::Nopd), &mut out).unwrap();
        assert_eq!(out, [0x90]);
        // Beside other registers they are copied as they are.
        let mut out = Vec::new();
        lower_into(
            &guest(&[0x8A, 0x63, 0x04]),
            Some(&[0x8A, 0x63, 0x04]),
            &mut out,
        )
        .unwrap();
        assert_eq!(host_text(&out), "mov ah,gs:[ebx+4]");
    }

    /// String instructions run on host pointers: the disassembly of what
    /// `lower_string` emits, and what it declines.
    #[test]
    fn string_instructions_run_on_host_pointers() {
        let text = |g: &[u8]| -> Option<Vec<String>> {
            let mut out = Vec::new();
            if !lower_string(&guest(g), g, &mut out) {
                return None;
            }
            let mut d = Decoder::with_ip(64, &out, 0, DecoderOptions::NONE);
            Some(
                std::iter::from_fn(|| d.can_decode().then(|| d.decode()))
                    .map(|i| {
                        let mut s = String::new();
                        IntelFormatter::new().format(&i, &mut s);
                        s
                    })
                    .collect(),
            )
        };
        assert_eq!(
            text(&[0xF3, 0xA5]).unwrap(),
            [
                "mov r9,[r15+60h]",
                "lea rsi,[r9+rsi]",
                "lea rdi,[r9+rdi]",
                "rep movsd [rdi],[rsi]",
                "mov esi,esi",
                "mov edi,edi"
            ]
        );
        assert_eq!(
            text(&[0xF3, 0xAA]).unwrap(),
            [
                "mov r9,[r15+60h]",
                "lea rdi,[r9+rdi]",
                "rep stosb [rdi]",
                "mov edi,edi"
            ]
        );
        assert_eq!(
            text(&[0xAD]).unwrap(),
            [
                "mov r9,[r15+60h]",
                "lea rsi,[r9+rsi]",
                "lodsd [rsi]",
                "mov esi,esi"
            ]
        );
        // 16-bit addresses, a segment override, port I/O: not here.
        for g in [&[0x67, 0xA4][..], &[0x64, 0xA5], &[0xF3, 0x6C], &[0x6F]] {
            assert_eq!(text(g), None, "{g:02x?}");
        }
    }

    /// Golden triples: guest bytes, host bytes, host disassembly.
    #[test]
    fn golden_lowerings() {
        let cases: &[(&[u8], &[u8], &str)] = &[
            (&[0x01, 0xC8], &[0x01, 0xC8], "add eax,ecx"),
            (
                &[0x8B, 0x43, 0x10],
                &[0x65, 0x67, 0x8B, 0x43, 0x10],
                "mov eax,gs:[ebx+10h]",
            ),
            (&[0x40], &[0xFF, 0xC0], "inc eax"),
            (&[0x66, 0x4B], &[0x66, 0xFF, 0xCB], "dec bx"),
            (
                &[0xA1, 0x78, 0x56, 0x34, 0x12],
                &[0x65, 0x67, 0xA1, 0x78, 0x56, 0x34, 0x12],
                "addr32 mov eax,gs:[12345678h]",
            ),
            (
                &[0x0F, 0xC7, 0x4B, 0x08],
                &[0x65, 0x67, 0x0F, 0xC7, 0x4B, 0x08],
                "cmpxchg8b gs:[ebx+8]",
            ),
            (&[0x88, 0xE0], &[0x88, 0xE0], "mov al,ah"),
            (
                &[0x8B, 0x44, 0x24, 0x04],
                &[0x65, 0x67, 0x41, 0x8B, 0x44, 0x24, 0x04],
                "mov eax,gs:[r12d+4]",
            ),
            (&[0x89, 0xEC], &[0x41, 0x89, 0xEC], "mov r12d,ebp"),
        ];
        for (g, h, text) in cases {
            match lower(&guest(g)) {
                Lowering::Copied(b) => {
                    assert_eq!(host_text(&b), *text, "{g:02x?}");
                    assert_eq!(&b[..], *h, "{g:02x?} -> {text}");
                }
                other => panic!("{g:02x?}: {other:?}"),
            }
        }
    }

    /// FS/GS overrides: the address goes through R13D with the segment
    /// base loaded from the context and added, then the access through GS.
    #[test]
    fn fs_and_gs_overrides_add_the_base_from_the_context() {
        let cases: &[(&[u8], bool, &[&str])] = &[
            (
                &[0x64, 0xA1, 0x10, 0, 0, 0],
                true,
                &[
                    "mov r13d,10h",
                    "mov r11d,[r15+74h]",
                    "lea r13d,[r13d+r11d]",
                    "mov eax,gs:[r13d]",
                ],
            ),
            (
                &[0x65, 0x80, 0x44, 0x24, 0x08, 0x01],
                false,
                &[
                    "lea r13d,[r12d+8]",
                    "mov r11d,[r15+78h]",
                    "lea r13d,[r13d+r11d]",
                    "add byte ptr gs:[r13d],1",
                ],
            ),
            (
                &[0x64, 0x89, 0x1C, 0x8E],
                true,
                &[
                    "lea r13d,[esi+ecx*4]",
                    "mov r11d,[r15+74h]",
                    "lea r13d,[r13d+r11d]",
                    "mov gs:[r13d],ebx",
                ],
            ),
        ];
        assert_eq!((crate::abi::FS_BASE, crate::abi::GS_BASE), (0x74, 0x78));
        for (g, fs, want) in cases {
            let mut out = Vec::new();
            assert_eq!(lower_seg_override(&guest(g), &mut out), Ok(*fs));
            let mut d = Decoder::with_ip(64, &out, 0, DecoderOptions::NONE);
            let mut got = Vec::new();
            while d.can_decode() {
                let mut t = String::new();
                IntelFormatter::new().format(&d.decode(), &mut t);
                got.push(t);
            }
            assert_eq!(got, *want, "{g:02x?}");
        }
        // lower_into leaves them to the guarded path.
        let g = [0x64, 0xA1, 0x10, 0, 0, 0];
        assert!(lower_into(&guest(&g), Some(&g), &mut Vec::new()).is_err());
    }

    /// The fast path (guest bytes behind `gs addr32`) and the encoder
    /// agree on what the host instruction is.
    #[test]
    fn copied_bytes_mean_what_the_encoder_would_emit() {
        let cases: &[&[u8]] = &[
            &[0x01, 0xC8],
            &[0x8B, 0x43, 0x10],
            &[0x66, 0x89, 0x5C, 0x8E, 0x7F],
            &[0xF0, 0x0F, 0xC1, 0x0B],
            &[0x0F, 0xB6, 0x04, 0x1E],
            &[0x8A, 0x24, 0x85, 0x00, 0x10, 0x00, 0x00],
            &[0xA1, 0x78, 0x56, 0x34, 0x12],
            &[0x66, 0xA3, 0x78, 0x56, 0x34, 0x12],
            &[0xC7, 0x80, 0x00, 0x01, 0x00, 0x00, 0x67, 0x67, 0x67, 0x67],
            &[0x8D, 0x44, 0x9D, 0xFC],
            &[0x0F, 0xAF, 0xD1],
            &[0xD3, 0xE0],
            &[0x80, 0x34, 0x19, 0x5A],
        ];
        for g in cases {
            let ins = guest(g);
            let (Lowering::Copied(fast), Lowering::Copied(slow)) =
                (lower_innocuous(&ins, Some(g)), lower_innocuous(&ins, None))
            else {
                panic!("{g:02x?} not copied");
            };
            assert_eq!(host_text(&fast), host_text(&slow), "{g:02x?}");
        }
        // Forms the fast path must leave to the encoder.
        for g in [
            &[0x82, 0xC0, 0x01][..], // 0x82 does not exist in 64-bit mode
            &[0x67, 0x8B, 0x07],     // 16-bit addressing
            &[0x40],                 // INC r32 short form
        ] {
            assert!(!copy_bytes(&guest(g), g, &mut Vec::new()), "{g:02x?}");
        }
    }

    /// The patched bytes (ESP as R12, a bare `[disp32]` given a SIB byte)
    /// and the encoder agree on random instructions: every innocuous
    /// instruction of random bytes that both lower is the same host
    /// instruction, and the forms the patch is for are among them.
    #[test]
    fn patched_bytes_mean_what_the_encoder_would_emit() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let (mut esp, mut absolute, mut same, mut plain) = (0, 0, 0, 0);
        for _ in 0..60_000 {
            let mut g = [0u8; 15];
            for b in &mut g {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            // Every fourth one gets an ESP-based or a bare disp32 operand.
            match x % 8 {
                0 => g[1] = (g[1] & 0x38) | 0x44,
                1 => g[1] = (g[1] & 0x38) | 0x05,
                2 => g[1] = 0xC0 | (g[1] & 0x38) | 4,
                _ => {}
            }
            let ins = guest(&g);
            if ins.is_invalid() || classify(&ins) != Class::Innocuous {
                continue;
            }
            let g = &g[..ins.len()];
            // The plain copy, where it applies, is the full path's bytes.
            let mut plain_bytes = Vec::new();
            if copy_plain(&ins, g, &mut plain_bytes) {
                let mut full = Vec::new();
                assert!(copy_bytes(&ins, g, &mut full), "{g:02x?}");
                assert_eq!(plain_bytes, full, "{g:02x?}");
                plain += 1;
            }
            let (Lowering::Copied(fast), Lowering::Copied(slow)) =
                (lower_innocuous(&ins, Some(g)), lower_innocuous(&ins, None))
            else {
                continue;
            };
            assert_eq!(host_text(&fast), host_text(&slow), "{g:02x?}");
            same += 1;
            if uses_esp(&ins) {
                esp += 1;
            }
            if ins.op_kinds().any(|k| k == OpKind::Memory)
                && ins.memory_base() == Register::None
                && ins.memory_index() == Register::None
            {
                absolute += 1;
            }
        }
        assert!(
            same > 10_000 && esp > 1_000 && absolute > 500 && plain > 5_000,
            "{same} {esp} {absolute} {plain}"
        );
        // The hand-picked forms.
        for g in [
            &[0x8B, 0x05, 0x00, 0x10, 0x00, 0x00][..], // mov eax,[1000h]
            &[0x8B, 0x44, 0x24, 0x04],                 // mov eax,[esp+4]
            &[0x8B, 0x24, 0x24],                       // mov esp,[esp]
            &[0x89, 0x25, 0x00, 0x10, 0x00, 0x00],     // mov [1000h],esp
            &[0x83, 0xE4, 0xF0],                       // and esp,0FFFFFFF0h
            &[0x87, 0xE4],                             // xchg esp,esp
            &[0x94],                                   // xchg esp,eax
            &[0xBC, 0x00, 0x10, 0x00, 0x00],           // mov esp,1000h
            &[0x0F, 0xCC],                             // bswap esp
            &[0x66, 0x0F, 0xB6, 0x64, 0x24, 0x03],     // movzx sp,byte [esp+3]
            &[0xC7, 0x05, 0, 0x10, 0, 0, 1, 0, 0, 0],  // mov dword [1000h],1
            &[0xD9, 0x44, 0x24, 0x08],                 // fld dword [esp+8]
        ] {
            let ins = guest(g);
            let mut fast = Vec::new();
            assert!(copy_bytes(&ins, g, &mut fast), "{g:02x?}");
            let Lowering::Copied(slow) = lower_innocuous(&ins, None) else {
                panic!("{g:02x?}");
            };
            assert_eq!(host_text(&fast), host_text(&slow), "{g:02x?}");
        }
    }

    #[test]
    fn special_stack_and_string_instructions_are_not_copied() {
        for g in [
            &[0x9D][..],
            &[0x50],
            &[0xA4],
            &[0x27],
            &[0xFA],
            &[0xEB, 0x00],
        ] {
            assert!(
                matches!(lower(&guest(g)), Lowering::NotCopyable(_)),
                "{g:02x?}"
            );
        }
    }

    /// Every one- and two-byte opcode with every ModRM byte and (where one
    /// follows) every SIB byte, then `tail`: each sequence handed to `f`.
    fn each_form(tail: &[u8], mut f: impl FnMut(&[u8])) {
        let mut seq = Vec::with_capacity(16);
        for two in [false, true] {
            for op in 0..=255u8 {
                if !two && op == 0x0F {
                    continue;
                }
                for modrm in 0..=255u8 {
                    let sibs = if modrm >> 6 != 3 && modrm & 7 == 4 {
                        0..=255u8
                    } else {
                        0..=0u8
                    };
                    for sib in sibs {
                        seq.clear();
                        if two {
                            seq.push(0x0F);
                        }
                        seq.extend([op, modrm, sib]);
                        seq.extend_from_slice(tail);
                        f(&seq);
                    }
                }
            }
        }
    }

    /// The FS/GS and checked-store lowerings spelled from the bytes are
    /// the encoder's (`lower_seg_override`, `lower_checked_store`), for
    /// every opcode the fast scanner takes with every ModRM byte and
    /// every SIB byte, and displacements and immediates of zero and not;
    /// and they take every such instruction the encoder's take.
    #[test]
    fn byte_lowerings_are_what_the_encoder_makes() {
        let tails = [
            [0x11, 0x92, 0x33, 0x84, 0x55, 0x06, 0x77, 0x88, 0x99, 0xAA],
            [0; 10],
        ];
        let (mut seg, mut checked) = (0usize, 0usize);
        for tail in tails {
            each_form(&tail, |seq| {
                let Some(p) = popek_decode::fast::plain(seq) else {
                    return;
                };
                let bytes = &seq[..usize::from(p.len())];
                // LEA and AH..BH beside the REX prefix the host code needs
                // are the encoder's to refuse.
                let theirs = p.high8() || bytes[0] == 0x8D;
                let ins = popek_decode::decode_one(bytes, 0x1000, 32);
                let what = format!("{bytes:02X?}");
                let (mut want, mut got) = (Vec::new(), Vec::new());
                let w = lower_checked_store(&ins, &mut want).ok();
                let g = checked_store_from_bytes(bytes, &mut got);
                if g.is_some() {
                    checked += 1;
                    assert_eq!((g, &got), (w, &want), "{what}: checked store");
                } else {
                    assert!(w.is_none() || theirs, "{what}");
                }
                for prefix in [0x64u8, 0x65] {
                    let mut pre = vec![prefix];
                    pre.extend_from_slice(bytes);
                    let ins = popek_decode::decode_one(&pre, 0x1000, 32);
                    let (mut want, mut got) = (Vec::new(), Vec::new());
                    let w = lower_seg_override(&ins, &mut want).ok();
                    let g = seg_override_from_bytes(&pre, &mut got);
                    let what = format!("{pre:02X?}");
                    if g.is_some() {
                        seg += 1;
                        assert_eq!((g, &got), (w, &want), "{what}: FS/GS");
                    } else {
                        assert!(w.is_none() || theirs, "{what}");
                    }
                }
            });
        }
        let mut seq = Vec::with_capacity(8);
        // MOV between the accumulator and [moffs32], with and without an
        // FS or GS prefix.
        for op in 0xA0..=0xA3u8 {
            for addr in [[0u8; 4], [0x11, 0x92, 0x33, 0x84]] {
                for prefix in [None, Some(0x64u8), Some(0x65)] {
                    seq.clear();
                    seq.extend(prefix);
                    seq.push(op);
                    seq.extend(addr);
                    let ins = popek_decode::decode_one(&seq, 0x1000, 32);
                    let (mut want, mut got) = (Vec::new(), Vec::new());
                    let (w, g) = match prefix {
                        None => (
                            lower_checked_store(&ins, &mut want).ok(),
                            checked_store_from_bytes(&seq, &mut got),
                        ),
                        Some(_) => (
                            lower_seg_override(&ins, &mut want).ok().map(usize::from),
                            seg_override_from_bytes(&seq, &mut got).map(usize::from),
                        ),
                    };
                    assert!(g.is_some(), "{seq:02X?}");
                    assert_eq!((g, &got), (w, &want), "{seq:02X?}");
                }
            }
        }
        assert!(seg > 100_000 && checked > 50_000, "{seg} {checked}");
    }

    /// The host code the full lowering writes for an instruction the fast
    /// scanner took (`ins`, decoded from `bytes`): `lower_stack`'s for
    /// PUSH and POP, `lower_into`'s for the rest; None if it declines.
    fn full_lowering(
        p: popek_decode::fast::Plain,
        ins: &Instruction,
        bytes: &[u8],
    ) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        let done = match p.stack() {
            true => lower_stack(ins, &mut out),
            false => lower_into(ins, Some(bytes), &mut out).is_ok(),
        };
        done.then_some(out)
    }

    /// `p`, taken at the start of `bytes`, is what the decoder finds there
    /// (its length, innocuous, not special, not x87), and `copy_fast`
    /// writes what `lower_into` writes for it; what it is, for messages.
    fn agrees_with_the_decoder(p: popek_decode::fast::Plain, bytes: &[u8]) -> String {
        let len = usize::from(p.len());
        let what = format!("{:02X?} ({p:?})", &bytes[..len]);
        let ins = popek_decode::decode_one(bytes, 0x1000, 32);
        assert!(!ins.is_invalid(), "{what}: invalid");
        assert_eq!(ins.len(), len, "{what}: length");
        assert_eq!(
            popek_decode::special_and_class(&ins),
            (None, Class::Innocuous),
            "{what}: class"
        );
        assert!(!popek_interp::x87::is_x87(&ins), "{what}: x87");
        let want = full_lowering(p, &ins, &bytes[..len]).expect(&what);
        let mut got = Vec::new();
        copy_fast(p, popek_decode::InsnBytes::new(bytes).raw(), &mut got);
        assert_eq!(got, want, "{what}: host bytes");
        what
    }

    /// The fast scanner takes only instructions the decoder calls
    /// innocuous and not special, with the decoder's length, and
    /// `copy_fast` writes what `lower_into` writes for them: every one- and
    /// two-byte opcode with every ModRM byte and (where one follows) every
    /// SIB byte, no prefix. Also: it takes a fair share of them (the
    /// common instructions), and none whose bytes are cut short.
    #[test]
    fn fast_scanner_agrees_with_the_decoder() {
        let tail = [0x11, 0x92, 0x33, 0x84, 0x55, 0x06, 0x77, 0x88, 0x99, 0xAA];
        let mut taken = 0usize;
        let mut checked = 0usize;
        each_form(&tail, |seq| {
            checked += 1;
            let Some(p) = popek_decode::fast::plain(seq) else {
                return;
            };
            taken += 1;
            let len = usize::from(p.len());
            let what = agrees_with_the_decoder(p, seq);
            assert_eq!(popek_decode::fast::plain(&seq[..len - 1]), None, "{what}");
        });
        assert!(taken > checked / 5, "{taken} of {checked}");
    }

    /// Behind an operand-size prefix the scanner takes what it takes
    /// without one but PUSH, POP, the one-byte INC and DEC and byte
    /// operands in AH..BH, with the decoder's length (16-bit immediates),
    /// innocuous and not special, and `copy_fast` writes what `lower_into`
    /// writes for the same bytes (the prefix kept); every one- and
    /// two-byte opcode with every ModRM and SIB byte; none when a byte is
    /// missing, none behind two prefixes.
    #[test]
    fn fast_scanner_operand_size() {
        use popek_decode::fast::{plain, take};
        let tail = [0x11, 0x92, 0x33, 0x84, 0x55, 0x06, 0x77, 0x88, 0x99, 0xAA];
        let mut n = 0usize;
        let mut with = Vec::with_capacity(20);
        each_form(&tail, |seq| {
            with.clear();
            with.push(0x66);
            with.extend_from_slice(seq);
            let got = take(&with);
            let bare = plain(seq).filter(|p| !p.stack() && !p.inc_dec() && !p.high8());
            assert_eq!(got.is_some(), bare.is_some(), "{with:02X?}");
            let Some(p) = got else {
                return;
            };
            n += 1;
            let len = usize::from(p.len());
            let what = agrees_with_the_decoder(p, &with);
            assert!(p.opsize() && p.prefix() == 1, "{what}");
            assert_eq!(take(&with[..len - 1]), None, "{what}: cut short");
            for other in [0x26u8, 0x3E, 0x66, 0xF0] {
                let mut two = vec![other];
                two.extend_from_slice(&with);
                assert_eq!(take(&two), None, "{other:02X} {what}");
            }
        });
        assert!(n > 500_000, "{n}");
    }

    /// Behind a DS, ES or SS override (and only those), the scanner takes
    /// what it takes without one, one byte longer, and the host code is
    /// the one without the override (the decoder sees the same
    /// instruction with that segment: all four are flat wherever
    /// translated code runs); a MOV between the accumulator and
    /// `[moffs32]` is copied as the encoder writes it, with or without such
    /// an override. None of them when a byte is missing.
    #[test]
    fn fast_scanner_prefixes_and_moffs() {
        use popek_decode::fast::{plain, take};
        let tail = [0x11, 0x92, 0x33, 0x84, 0x55, 0x06, 0x77, 0x88, 0x99, 0xAA];
        let copy = |p, seq: &[u8]| {
            let mut v = Vec::new();
            copy_fast(p, popek_decode::InsnBytes::new(seq).raw(), &mut v);
            v
        };
        let mut n = 0usize;
        each_form(&tail, |seq| {
            if !matches!(seq[0], 0x26 | 0x36 | 0x3E | 0x66 | 0xA0..=0xA3) {
                assert_eq!(take(seq), plain(seq), "{seq:02X?}");
            }
            // (One override at most.)
            let bare = take(seq).filter(|p| p.prefix() == 0);
            let mut with = vec![0u8; seq.len() + 1];
            with[1..].copy_from_slice(seq);
            // (0x66: `fast_scanner_operand_size`.)
            for prefix in [0x26u8, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0xF0, 0xF3] {
                with[0] = prefix;
                let got = take(&with);
                let Some(p) = bare.filter(|_| matches!(prefix, 0x26 | 0x36 | 0x3E)) else {
                    assert_eq!(got, None, "{with:02X?}");
                    continue;
                };
                n += 1;
                let len = usize::from(p.len()) + 1;
                let what = format!("{:02X?}", &with[..len]);
                assert_eq!(
                    got.map(|g| (g.len(), g.prefix())),
                    Some((len as u8, 1)),
                    "{what}"
                );
                let ins = popek_decode::decode_one(&with, 0x1000, 32);
                let plain_ins = popek_decode::decode_one(seq, 0x1000, 32);
                assert_eq!(ins.len(), len, "{what}: length");
                assert_eq!(ins.code(), plain_ins.code(), "{what}");
                assert_eq!(
                    popek_decode::special_and_class(&ins),
                    (None, Class::Innocuous),
                    "{what}: class"
                );
                let want = full_lowering(got.unwrap(), &plain_ins, &seq[..len - 1]).expect(&what);
                assert_eq!(copy(got.unwrap(), &with), want, "{what}: host bytes");
                assert_eq!(take(&with[..len - 1]), None, "{what}: cut short");
            }
        });
        assert!(n > 100_000, "{n}");
        for op in 0xA0..=0xA3u8 {
            for prefix in [None, Some(0x26u8), Some(0x36), Some(0x3E)] {
                for addr in [[0u8; 4], [0x40, 0xDD, 0xC3, 0xC1], [0xFF; 4]] {
                    let bare: Vec<u8> = [op].iter().chain(&addr).copied().collect();
                    let with: Vec<u8> = prefix.iter().chain(&bare).copied().collect();
                    let what = format!("{with:02X?}");
                    let p = take(&with).unwrap_or_else(|| panic!("{what}: not taken"));
                    assert_eq!(usize::from(p.len()), with.len(), "{what}");
                    let ins = popek_decode::decode_one(&bare, 0x1000, 32);
                    assert_eq!(
                        popek_decode::special_and_class(&ins),
                        (None, Class::Innocuous),
                        "{what}: class"
                    );
                    let mut want = Vec::new();
                    assert_eq!(lower_into(&ins, Some(&bare), &mut want), Ok(()), "{what}");
                    assert_eq!(copy(p, &with), want, "{what}: host bytes");
                    assert_eq!(take(&with[..with.len() - 1]), None, "{what}: cut short");
                }
            }
        }
    }
}
