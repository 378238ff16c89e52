//! Re-encoding innocuous guest instructions as host instructions.
//!
//! An innocuous 32-bit instruction whose registers and memory operands
//! mean the same in 64-bit mode is *copied*: decoded with iced-x86,
//! its memory operand (if any) gets a GS segment override (GS base = the
//! guest window) and 32-bit address size, and it is encoded again with
//! `Encoder::new(64)`. The host's arithmetic flags are the guest's, so no
//! flag bookkeeping is needed. Everything else is reported as not copyable
//! with the reason; the translator lowers or calls the interpreter for it.

use iced_x86::{Code, Encoder, Instruction, Mnemonic as M, OpKind, Register};
use popek_decode::{classify, Class};

/// How one guest instruction is translated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lowering {
    /// Copied: these host bytes do what the guest instruction does.
    Copied(Vec<u8>),
    /// Not copyable as is, and why.
    NotCopyable(&'static str),
}

fn touches_esp(ins: &Instruction) -> bool {
    let esp = |r: Register| r != Register::None && r.full_register32() == Register::ESP;
    (0..ins.op_count()).any(|i| ins.op_kind(i) == OpKind::Register && esp(ins.op_register(i)))
        || (ins.op_kinds().any(|k| k == OpKind::Memory)
            && (esp(ins.memory_base()) || esp(ins.memory_index())))
}

/// Re-encode `ins` for the host, if it can be copied.
pub fn lower(ins: &Instruction) -> Lowering {
    use Lowering::NotCopyable as No;
    if classify(ins) != Class::Innocuous {
        return No("special or control flow");
    }
    if ins.is_string_instruction() {
        return No("string instruction (ES:EDI cannot take a segment override)");
    }
    if ins.is_stack_instruction() || matches!(ins.mnemonic(), M::Enter | M::Leave) {
        return No("stack instruction (64-bit pushes are 8 bytes)");
    }
    if matches!(ins.segment_prefix(), Register::FS | Register::GS) {
        return No("FS/GS override (segments other than the flat four)");
    }
    if touches_esp(ins) {
        return No("uses ESP (the host stack pointer)");
    }
    if matches!(
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
    ) {
        return No("not encodable in 64-bit mode");
    }
    let mut host = *ins;
    // INC/DEC r16/r32 short forms (40+r, 48+r) are REX prefixes in 64-bit mode.
    let code = match ins.code() {
        Code::Inc_r32 => Some(Code::Inc_rm32),
        Code::Dec_r32 => Some(Code::Dec_rm32),
        Code::Inc_r16 => Some(Code::Inc_rm16),
        Code::Dec_r16 => Some(Code::Dec_rm16),
        _ => None,
    };
    if let Some(c) = code {
        host = match Instruction::with1(c, ins.op0_register()) {
            Ok(i) => i,
            Err(_) => return No("INC/DEC re-encoding failed"),
        };
    }
    if ins.op_kinds().any(|k| k == OpKind::Memory) {
        let b = ins.memory_base();
        let i = ins.memory_index();
        if (b != Register::None && b.size() == 2) || (i != Register::None && i.size() == 2) {
            return No("16-bit addressing");
        }
        if b == Register::None && i == Register::None && ins.memory_displ_size() == 2 {
            return No("16-bit addressing");
        }
        host.set_segment_prefix(Register::GS);
        if b == Register::None && i == Register::None {
            // An absolute [disp32]: in 64-bit mode encode it as SIB-absolute
            // with a 32-bit address size (not RIP-relative).
            host.set_memory_displ_size(4);
        }
    }
    let mut enc = Encoder::new(64);
    match enc.encode(&host, 0) {
        Ok(_) => Lowering::Copied(enc.take_buffer()),
        Err(_) => No("not encodable in 64-bit mode"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

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

    #[test]
    fn special_stack_and_esp_instructions_are_not_copied() {
        for g in [
            &[0x9D][..],
            &[0x50],
            &[0x89, 0xE0],
            &[0x8B, 0x04, 0x24],
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
}
