//! The indirect-branch exit: RET and indirect JMP/CALL look their target
//! up in a table in host code and jump straight to its translation, or
//! return to the dispatcher on a miss.
//!
//! The table ([`crate::host::DirectMap`]) has one 32-bit entry per guest
//! EIP: the code-buffer offset of the body of the translation there, or 0
//! for none, which is the offset of the buffer's miss routine (it stores
//! the target, still in R13D, as the next EIP, counts the miss and falls
//! into the epilogue). Indexed by the whole target, an entry needs no
//! comparison: the exit loads the entry, adds the buffer's base
//! (RIP-relative LEA) and jumps. Only flag-neutral instructions.

use dynasm::dynasm;
use dynasmrt::{DynasmApi, DynasmLabelApi};

use crate::abi::NEXT_EIP;
use crate::emit::{epilogue_offset, jmp_to, poll, Asm, Exits, Pace};

// The dynasm code below spells this offset as a literal (dynasm-rs picks
// an 8-bit displacement only for literals).
const _: () = assert!(NEXT_EIP == 0x24);

/// The exit of a block whose next EIP is in R13D: pace the transfer
/// (`Pace::Counted`: one unit of the chaining budget; `Pace::Polled`: a
/// poll, after storing the next EIP for it), look it up in the table at
/// `table` and jump to the translation's body or the miss routine. R9-R11
/// and R13 are scratch.
pub(crate) fn indirect_exit(ops: &mut Asm, ex: &mut Exits, table: u64) {
    if let Pace::Polled(page) = ex.span.pace {
        // The target is the next EIP if the poll faults.
        dynasm!(ops
            ; .arch x64
            ; mov DWORD [r15 + 0x24], r13d      // next_eip
        );
        poll(ops, page, &mut ex.polls, None);
    }
    dynasm!(ops
        ; .arch x64
        ; mov r11, QWORD table as i64
        ; mov r11d, DWORD [r11 + r13 * 4]       // body offset, 0: miss routine
    );
    // `lea r10, [rip + disp32]` to the buffer's start (offset 0), from the
    // end of this 7-byte instruction.
    let next = ex.base + ops.offset().0 + 7;
    let d = (-(next as i64) as i32).to_le_bytes();
    dynasm!(ops
        ; .arch x64
        ; .bytes [0x4C, 0x8D, 0x15, d[0], d[1], d[2], d[3]].iter()
        ; lea r11, [r11 + r10]
    );
    if ex.span.pace != Pace::Counted {
        dynasm!(ops
            ; .arch x64
            ; jmp r11
        );
        return;
    }
    dynasm!(ops
        ; .arch x64                              // the chaining budget, as in a stub
        ; mov r9, rcx
        ; lea rcx, [r14 - 1]
        ; mov r14, rcx
        ; jrcxz >budget_out
        ; mov rcx, r9
        ; jmp r11
        ; budget_out:
        ; mov rcx, r9
        ; mov DWORD [r15 + 0x24], r13d          // next_eip
    );
    jmp_to(ops, ex.base, epilogue_offset());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emit::Span;
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

    /// The exit for `pace` at code-buffer offset 0x1000, disassembled:
    /// (text, RIP-relative or branch target, address) per instruction.
    fn exit(pace: Pace) -> Vec<(String, u64, u64)> {
        let mut ops = Asm::new();
        let mut ex = Exits {
            base: 0x1000,
            span: Span {
                start: 0,
                end: 0,
                pace,
            },
            sites: Vec::new(),
            polls: Vec::new(),
            via_table: None,
        };
        indirect_exit(&mut ops, &mut ex, 0x1122_3344_5566_7788);
        let out = ops.finish().unwrap().to_vec();
        let mut d = Decoder::with_ip(64, &out, 0x1000, DecoderOptions::NONE);
        let mut fmt = IntelFormatter::new();
        let mut got = Vec::new();
        while d.can_decode() {
            let ins = d.decode();
            assert!(!ins.is_invalid());
            let mut t = String::new();
            fmt.format_mnemonic(&ins, &mut t);
            let branch = ins.near_branch_target() != 0;
            for i in (0..ins.op_count()).filter(|_| !branch) {
                t.push_str(if i == 0 { " " } else { "," });
                if ins.op_kind(i) == iced_x86::OpKind::Memory && ins.is_ip_rel_memory_operand() {
                    t.push_str("[rip]");
                } else {
                    fmt.format_operand(&ins, &mut t, i).unwrap();
                }
            }
            let to = if ins.is_ip_rel_memory_operand() {
                ins.ip_rel_memory_address()
            } else {
                ins.near_branch_target()
            };
            got.push((t, to, ins.ip()));
        }
        got
    }

    /// The exit disassembles to the intended instructions; the LEA finds
    /// the buffer's start (offset 0, the miss routine); the budget's JRCXZ
    /// lands on its way out.
    #[test]
    fn indirect_exit_encoding() {
        let counted = exit(Pace::Counted);
        let text: Vec<&str> = counted.iter().map(|(t, ..)| t.as_str()).collect();
        assert_eq!(
            text,
            [
                "mov r11,1122334455667788h",
                "mov r11d,[r11+r13*4]",
                "lea r10,[rip]",
                "lea r11,[r11+r10]",
                "mov r9,rcx",
                "lea rcx,[r14-1]",
                "mov r14,rcx",
                "jrcxz",
                "mov rcx,r9",
                "jmp r11",
                "mov rcx,r9",
                "mov [r15+24h],r13d",
                "jmp",
            ]
        );
        assert_eq!(counted[2].1, 0, "LEA to the buffer's start");
        assert_eq!(counted[7].1, counted[10].2, "JRCXZ to the budget's way out");
        assert_eq!(counted[12].1, epilogue_offset() as u64, "then the epilogue");
        let free = exit(Pace::Free);
        let text: Vec<&str> = free.iter().map(|(t, ..)| t.as_str()).collect();
        assert_eq!(
            text,
            [
                "mov r11,1122334455667788h",
                "mov r11d,[r11+r13*4]",
                "lea r10,[rip]",
                "lea r11,[r11+r10]",
                "jmp r11",
            ]
        );
        assert_eq!(free[2].1, 0, "LEA to the buffer's start");
    }
}
