//! `--dump`: every translated block as the translator saw it (guest
//! instructions, their Popek-Goldberg class and how each was lowered)
//! and the host code it became, disassembled.

use crate::cache::{key_eip, Translation};
use crate::dispatch::Bt;
use crate::emit::{epilogue_offset, helper_offset, leave_offset, BlockExit, HostBlock};

impl Bt {
    /// Write every translated block (guest instructions, their class and
    /// how each was translated, then the host code disassembled) to `out`.
    pub fn set_dump(&mut self, out: Box<dyn std::io::Write + Send>) {
        self.dump = Some(out);
    }

    pub(crate) fn dump_block(
        &mut self,
        start: u32,
        insns: &[popek_decode::Insn],
        how: &[&str],
        code: &HostBlock,
        exit: Option<&BlockExit>,
    ) {
        use iced_x86::{Formatter, IntelFormatter};
        use std::fmt::Write as _;
        let (Some(_), Some(_)) = (self.code.as_ref(), self.dump.as_ref()) else {
            return;
        };
        let mut s = String::new();
        let mut fmt = IntelFormatter::new();
        let _ = writeln!(
            s,
            "== block {:#010x}: {} guest instructions translated, {} host bytes at code offset {:#x}, exit {}",
            start,
            how.len(),
            code.len(),
            code.offset(),
            match exit {
                Some(BlockExit::Direct(t)) => format!("to {t:#010x} (chainable)"),
                Some(BlockExit::Cond {
                    taken, not_taken, ..
                }) => {
                    format!("to {taken:#010x} or {not_taken:#010x} (chainable)")
                }
                Some(BlockExit::Loop { taken, not_taken })
                | Some(BlockExit::Jecxz { taken, not_taken }) => {
                    format!("to {taken:#010x} or {not_taken:#010x} by ECX (chainable)")
                }
                Some(BlockExit::Stored) => {
                    "indirect (RET or JMP/CALL r/m32): table lookup in host code".into()
                }
                None => "to the dispatcher (next instruction not translated)".into(),
            }
        );
        for (i, insn) in insns.iter().enumerate() {
            let bytes: Vec<String> = insn.bytes.iter().map(|b| format!("{b:02x}")).collect();
            let mut text = String::new();
            fmt.format(&insn.decoded(), &mut text);
            let kind = how
                .get(i)
                .copied()
                .unwrap_or("not translated: ends the block");
            let _ = writeln!(
                s,
                "  {:08x}  {:<30} {:<34} {:<12} {kind}",
                insn.ins.ip32(),
                bytes.join(" "),
                text,
                insn.class.name()
            );
            if i >= how.len() {
                break;
            }
        }
        let _ = writeln!(s, "  host code:");
        s.push_str(&self.listing_of(code));
        if let Some(out) = self.dump.as_mut() {
            let _ = out.write_all(s.as_bytes());
        }
    }

    /// The host code of the translation at `eip` as it is now (chained
    /// jumps patched), disassembled: one instruction a line, at its offset
    /// in the block; branch targets and 64-bit constants named (a place in
    /// this block, another block's body, the epilogue, the helper, the
    /// indirect-branch table), so the text does not depend on where the
    /// code buffer is mapped. None when `eip` has no translation.
    pub fn listing(&self, eip: u32) -> Option<String> {
        self.cache.iter().find_map(|(k, t)| match t {
            Translation::Code { code, .. } if key_eip(*k) == eip => Some(self.listing_of(code)),
            _ => None,
        })
    }

    fn listing_of(&self, code: &HostBlock) -> String {
        use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter, OpKind};
        use std::fmt::Write as _;
        let Some(buf) = self.code.as_ref() else {
            return String::new();
        };
        let start = buf.exec_addr(code.offset()) as u64;
        let end = start + code.len() as u64;
        let base = buf.exec_addr(0) as u64;
        let name = |addr: u64| -> String {
            if (start..end).contains(&addr) {
                return format!("+{:#x}", addr - start);
            }
            if addr == base + epilogue_offset() as u64 {
                return "epilogue".into();
            }
            if addr == base + leave_offset() as u64 {
                return "leave".into();
            }
            if addr == base + helper_offset() as u64 {
                return "call_helper".into();
            }
            if let Some(t) = self.lookup.as_ref() {
                if addr == t[0].addr() {
                    return "indirect-branch table".into();
                }
                if addr == t[1].addr() {
                    return "indirect-branch table (user)".into();
                }
            }
            if addr == base + crate::emit::miss_offset() as u64 {
                return "miss".into();
            }
            let body = self.cache.iter().find_map(|(e, t)| match t {
                Translation::Code { code, .. }
                    if buf.exec_addr(code.body_offset()) as u64 == addr =>
                {
                    Some(key_eip(*e))
                }
                _ => None,
            });
            match body {
                Some(e) => format!("body of block {e:#010x}"),
                None => format!("{addr:#x}"),
            }
        };
        let mut fmt = IntelFormatter::new();
        let mut out = String::new();
        let mut d = Decoder::with_ip(
            64,
            buf.bytes(code.offset(), code.len()),
            start,
            DecoderOptions::NONE,
        );
        while d.can_decode() {
            let ins = d.decode();
            let mut text = String::new();
            let branch = ins.op_count() == 1
                && matches!(
                    ins.op0_kind(),
                    OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
                );
            if branch {
                fmt.format_mnemonic(&ins, &mut text);
                text.push(' ');
                text.push_str(&name(ins.near_branch_target()));
            } else if ins.op_count() == 2 && ins.op1_kind() == OpKind::Immediate64 {
                fmt.format_mnemonic(&ins, &mut text);
                text.push(' ');
                fmt.format_operand(&ins, &mut text, 0).ok();
                text.push(',');
                text.push_str(&name(ins.immediate64()));
            } else if ins.is_ip_rel_memory_operand() && ins.ip_rel_memory_address() == base {
                fmt.format_mnemonic(&ins, &mut text);
                text.push(' ');
                fmt.format_operand(&ins, &mut text, 0).ok();
                text.push_str(",[code buffer]");
            } else if self.poller.as_ref().is_some_and(|p| {
                ins.op_count() == 2
                    && ins.op1_kind() == OpKind::Memory
                    && ins.memory_base() == iced_x86::Register::None
                    && p.holds(ins.memory_displacement64())
            }) {
                fmt.format_mnemonic(&ins, &mut text);
                text.push(' ');
                fmt.format_operand(&ins, &mut text, 0).ok();
                text.push_str(",[poll page]");
            } else {
                fmt.format(&ins, &mut text);
            }
            let _ = writeln!(out, "    +{:#05x}  {text}", ins.ip() - start);
        }
        out
    }
}
