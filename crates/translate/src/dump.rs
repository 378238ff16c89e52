//! `--dump`: every translated block as the translator saw it (guest
//! instructions, their Popek-Goldberg class and how each was lowered)
//! and the host code it became, disassembled.

use crate::dispatch::Bt;
use crate::emit::{BlockExit, HostBlock};

impl Bt {
    /// Write every translated block (guest instructions, their class and
    /// how each was translated, then the host code disassembled) to `out`.
    pub fn set_dump(&mut self, out: Box<dyn std::io::Write>) {
        self.dump = Some(out);
    }

    pub(crate) fn dump_block(
        &mut self,
        block: &popek_decode::Block,
        how: &[&str],
        code: &HostBlock,
        exit: Option<&BlockExit>,
    ) {
        use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};
        use std::fmt::Write as _;
        let (Some(buf), Some(_)) = (self.code.as_ref(), self.dump.as_ref()) else {
            return;
        };
        let mut s = String::new();
        let mut fmt = IntelFormatter::new();
        let _ = writeln!(
            s,
            "== block {:#010x}: {} guest instructions translated, {} host bytes, exit {}",
            block.start,
            how.len(),
            code.len(),
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
        for (i, insn) in block.insns.iter().enumerate() {
            let bytes: Vec<String> = insn.bytes.iter().map(|b| format!("{b:02x}")).collect();
            let mut text = String::new();
            fmt.format(&insn.ins, &mut text);
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
        let host = buf.bytes(code.offset(), code.len());
        let start = buf.exec_addr(code.offset()) as u64;
        let mut d = Decoder::with_ip(64, host, start, DecoderOptions::NONE);
        let _ = writeln!(s, "  host code:");
        while d.can_decode() {
            let ins = d.decode();
            let mut text = String::new();
            fmt.format(&ins, &mut text);
            let _ = writeln!(s, "    {:016x}  {text}", ins.ip());
        }
        if let Some(out) = self.dump.as_mut() {
            let _ = out.write_all(s.as_bytes());
        }
    }
}
