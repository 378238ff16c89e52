//! The indirect-branch exit: RET and indirect JMP/CALL look their target
//! up in a direct-mapped table in host code and jump straight to its
//! translation, or return to the dispatcher on a miss.
//!
//! Table format ([`LookupEntry`], 16 bytes): the host address of the
//! translation's body, then the guest EIP negated, so host code adds the
//! target and tests for zero with JRCXZ (no flags touched). An empty entry
//! points at the shared epilogue: taking it returns to the dispatcher
//! with the target already stored. The table is indexed by the low 16 bits
//! of the EIP ([`LOOKUP_ENTRIES`]).

use dynasm::dynasm;
use dynasmrt::{DynasmApi, DynasmLabelApi};

use crate::abi::{INDIRECT_MISSES, NEXT_EIP};
use crate::emit::{epilogue_offset, Asm};

// The dynasm code below spells these offsets as literals (dynasm-rs picks
// an 8-bit displacement only for literals).
const _: () = assert!(NEXT_EIP == 0x24 && INDIRECT_MISSES == 0x58);

/// for the target of a RET or an indirect JMP/CALL: the guest EIP and the
/// host address of its translation's body. An empty entry's host address
/// is the shared epilogue (whatever EIP it holds, taking it just returns
/// to the dispatcher with the target already stored).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LookupEntry {
    /// Host address to jump to.
    pub host: u64,
    /// The guest EIP it translates, negated: host code adds the target EIP
    /// and tests for zero (JRCXZ, no flags).
    neg_eip: u32,
    _pad: u32,
}

impl LookupEntry {
    /// An entry for `eip`, translated at host address `host`.
    pub fn new(eip: u32, host: u64) -> LookupEntry {
        LookupEntry {
            host,
            neg_eip: eip.wrapping_neg(),
            _pad: 0,
        }
    }

    /// The guest EIP the entry translates.
    pub fn eip(&self) -> u32 {
        self.neg_eip.wrapping_neg()
    }
}

/// Entries in the indirect-branch table: indexed by the low 16 bits of the
/// guest EIP (direct-mapped; MOVZX computes it without touching flags).
pub const LOOKUP_ENTRIES: usize = 1 << 16;

/// The exit of a block whose next EIP is in R13D: look it up in the
/// indirect-branch table at `table` and jump straight to its translation
/// (if the chaining budget allows, when `budget`), or return to the
/// dispatcher (a miss is counted there). Only flag-neutral instructions
/// (MOV, MOVZX, LEA, JRCXZ), like the stubs; R9-R11 and R13 are scratch.
pub(crate) fn indirect_exit(ops: &mut Asm, table: u64, budget: bool) {
    let epilogue = epilogue_offset();
    dynasm!(ops
        ; .arch x64
        ; movzx r11d, r13w
        ; mov r10, QWORD table as i64
        ; lea r11, [r11 + r11 * 1]
        ; mov r9, rcx                         // the guest's RCX, until the end
        ; mov ecx, DWORD [r10 + r11 * 8 + 8]  // the entry's negated EIP
        ; lea ecx, [rcx + r13]                // 0 iff it is the target
        ; jrcxz >hit
        ; mov rcx, r9                         // miss: back to the dispatcher
        ; mov DWORD [r15 + 0x24], r13d        // next_eip
        ; mov r11, QWORD [r15 + 0x58]         // indirect_misses + 1
        ; lea r11, [r11 + 1]
        ; mov QWORD [r15 + 0x58], r11
        ; jmp extern epilogue
        ; hit:
    );
    if !budget {
        dynasm!(ops
            ; .arch x64
            ; mov rcx, r9
            ; jmp QWORD [r10 + r11 * 8]
        );
        return;
    }
    dynasm!(ops
        ; .arch x64                           // the chaining budget, as in a stub
        ; lea rcx, [r14 - 1]
        ; mov r14, rcx
        ; jrcxz >budget_out
        ; mov rcx, r9
        ; jmp QWORD [r10 + r11 * 8]
        ; budget_out:
        ; mov rcx, r9
        ; mov DWORD [r15 + 0x24], r13d
        ; jmp extern epilogue
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

    /// The indirect-branch exit disassembles to the intended
    /// instructions, and its two JRCXZs land where they should.
    #[test]
    fn indirect_exit_encoding() {
        let mut ops = Asm::new(0x1000);
        indirect_exit(&mut ops, 0x1122_3344_5566_7788, true);
        let out = ops.finalize().unwrap();
        let mut d = Decoder::with_ip(64, &out, 0x1000, DecoderOptions::NONE);
        let mut fmt = IntelFormatter::new();
        let mut text = Vec::new();
        let mut at = Vec::new();
        while d.can_decode() {
            let ins = d.decode();
            assert!(!ins.is_invalid());
            let mut t = String::new();
            fmt.format(&ins, &mut t);
            at.push((ins.ip(), ins.near_branch_target()));
            text.push(t);
        }
        let want = [
            "movzx r11d,r13w",
            "mov r10,1122334455667788h",
            "lea r11,[r11+r11]",
            "mov r9,rcx",
            "mov ecx,[r10+r11*8+8]",
            "lea ecx,[rcx+r13]",
            "jrcxz",
            "mov rcx,r9",
            "mov [r15+24h],r13d",
            "mov r11,[r15+58h]",
            "lea r11,[r11+1]",
            "mov [r15+58h],r11",
            "jmp 0",
            "lea rcx,[r14-1]",
            "mov r14,rcx",
            "jrcxz",
            "mov rcx,r9",
            "jmp qword ptr [r10+r11*8]",
            "mov rcx,r9",
            "mov [r15+24h],r13d",
            "jmp 0",
        ];
        let text: Vec<&str> = text
            .iter()
            .map(|t| if t.starts_with("jrcxz") { "jrcxz" } else { t })
            .collect();
        assert_eq!(text, want);
        // The first JRCXZ goes to the hit path, the second to budget_out.
        let ip_of = |i: usize| at[i].0;
        assert_eq!(at[6].1, ip_of(13));
        assert_eq!(at[15].1, ip_of(18));
    }
}
