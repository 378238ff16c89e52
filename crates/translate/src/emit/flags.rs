//! PUSHFD, POPFD, CLI and STI in host code on the virtual flags.
//!
//! At CPL 0 (and with neither RF nor VM set) the guest's own kernel may
//! change IF and the system flags: host code does it on [`Context::vif`]
//! and [`Context::sys`] without a call. Elsewhere (and for POPF setting TF)
//! the fast path jumps to a helper call that runs the vcpu's own
//! `popf`/`cli`/`sti`, so the semantics are written once. PUSHFD needs no
//! slow path: the image is the host's arithmetic flags, `sys` and `vif`.
//! The masks come from [`crate::abi`], which derives them from
//! `popek_vcpu::flags`; a test checks the fast path against `Vcpu::popf`
//! and `Vcpu::pushf` over random flag images.
//!
//! [`Context::vif`]: crate::abi::Context::vif
//! [`Context::sys`]: crate::abi::Context::sys

use dynasm::dynasm;
use dynasmrt::DynasmApi;
use popek_vcpu::flags::{FIXED1, IF, TF};

use crate::abi::{HOST_FLAGS, POPF_KEEPS, POPF_SYS, SLOW, SYS, VIF};
use crate::emit::Asm;

/// A flags instruction that runs in host code on the virtual IF and
/// system flags (Piece::Flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagsOp {
    /// PUSHFD at any CPL: the host's arithmetic flags, the system flags
    /// and the virtual IF, pushed on the guest stack. `host_fixed` is
    /// [`host_fixed_flags`] when the block was translated.
    Pushfd {
        /// What PUSHFQ adds outside the arithmetic flags.
        host_fixed: u32,
    },
    /// POPFD: at CPL 0 with TF clear in the image, in host code; otherwise
    /// the helper.
    Popfd,
    /// CLI: at CPL 0 in host code; otherwise the helper.
    Cli,
    /// STI: at CPL 0 in host code; otherwise the helper.
    Sti,
}

/// Emit the host code of a [`FlagsOp`]'s fast path into `ops`. Where host
/// code cannot do the instruction it jumps to the slow path, a helper call
/// the caller assembles after it: the offsets of those jumps' rel32 fields
/// are returned, for the caller to land there ([`super::helper_tail`]);
/// PUSHFD has none.
///
/// Everything before a jump to the slow path leaves the guest's flags as
/// they were, except POPF's TF test, after which the helper's POPF sets
/// every arithmetic flag anyway (its load has just succeeded). The only
/// instruction that can fault comes first (the guest stack access), so a
/// fault finds the guest state as it was before the instruction.
pub(crate) fn flags_fast_path(ops: &mut Asm, op: FlagsOp) -> [Option<usize>; 2] {
    // Context offsets as literals, for 8-bit displacements.
    const _: () = assert!(SYS == 0x68 && VIF == 0x6C && SLOW == 0x70 && FIXED1 == 2);
    if let FlagsOp::Pushfd { host_fixed } = op {
        dynasm!(ops
            ; .arch x64
            ; pushfq
            ; pop r11
            ; mov r13d, DWORD [r15 + 0x68]                       // sys
            ; lea r11d, [r11 + r13 - host_fixed as i32]
            ; mov r13d, DWORD [r15 + 0x6C]                       // vif
            ; lea r11d, [r11 + r13]
            ; gs mov DWORD [r12d - 4], r11d
            ; lea r12d, [r12 - 4]
        );
        return [None, None];
    }
    // CPL 0? Flag-free: `slow` through RCX for JRCXZ.
    dynasm!(ops
        ; .arch x64
        ; mov r11, rcx
        ; mov ecx, DWORD [r15 + 0x70]                            // slow
    );
    let cpl = super::guard_tail(ops);
    let mut tf = None;
    match op {
        FlagsOp::Cli | FlagsOp::Sti => {
            let vif = if op == FlagsOp::Sti { IF } else { 0 };
            dynasm!(ops
                ; .arch x64
                ; mov DWORD [r15 + 0x6C], vif as i32
            );
        }
        FlagsOp::Popfd => {
            dynasm!(ops
                ; .arch x64
                ; gs mov r11d, DWORD [r12d]
                ; test r11d, TF as i32
            );
            // Single-stepping: JNZ to the slow path.
            tf = Some(super::jcc_forward(ops, 0x5));
            dynasm!(ops
                ; .arch x64
                ; lea r12d, [r12 + 4]
                ; mov r13d, r11d
                ; and r13d, IF as i32
                ; mov DWORD [r15 + 0x6C], r13d                   // vif
                ; mov r13d, r11d
                ; and r13d, POPF_SYS as i32
                ; mov r9d, DWORD [r15 + 0x68]                    // sys
                ; and r9d, POPF_KEEPS as i32
                ; or r9d, r13d
                ; mov DWORD [r15 + 0x68], r9d
                ; and r11d, HOST_FLAGS as i32
                ; or r11d, 2                                     // FIXED1
                ; push r11
                ; popfq
            );
        }
        FlagsOp::Pushfd { .. } => unreachable!("handled above"),
    }
    [Some(cpl), tf]
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

    /// The fast path of `op`, disassembled, with the slow path right after
    /// it: near-branch targets are shown as "slow" or as the index of the
    /// instruction they land on.
    fn fast_path(op: FlagsOp) -> Vec<String> {
        let mut ops = Asm::new();
        for at in flags_fast_path(&mut ops, op).into_iter().flatten() {
            crate::emit::land(&mut ops, at);
        }
        let code = ops.finish().unwrap().to_vec();
        let mut d = Decoder::with_ip(64, &code, 0, DecoderOptions::NONE);
        let mut fmt = IntelFormatter::new();
        let insns: Vec<_> = std::iter::from_fn(|| d.can_decode().then(|| d.decode())).collect();
        insns
            .iter()
            .map(|ins| {
                assert!(!ins.is_invalid());
                let mut t = String::new();
                if ins.is_jcc_short_or_near() || ins.is_jmp_short_or_near() || ins.is_jcx_short() {
                    fmt.format_mnemonic(ins, &mut t);
                    let to = ins.near_branch_target();
                    if to == code.len() as u64 {
                        t.push_str(" slow");
                    } else {
                        let i = insns.iter().position(|x| x.ip() == to).unwrap();
                        t.push_str(&format!(" #{i}"));
                    }
                } else {
                    fmt.format(ins, &mut t);
                }
                t
            })
            .collect()
    }

    /// The fast paths of PUSHFD, POPFD, CLI and STI disassemble to the
    /// intended instructions, with the context's offsets.
    #[test]
    fn flags_fast_path_encoding() {
        assert_eq!(
            fast_path(FlagsOp::Pushfd { host_fixed: 0x202 }),
            [
                "pushfq",
                "pop r11",
                "mov r13d,[r15+68h]",
                "lea r11d,[r11+r13-202h]",
                "mov r13d,[r15+6Ch]",
                "lea r11d,[r11+r13]",
                "mov gs:[r12d-4],r11d",
                "lea r12d,[r12-4]",
            ]
        );
        let cpl_check = [
            "mov r11,rcx",
            "mov ecx,[r15+70h]",
            "jrcxz #5",
            "mov rcx,r11",
            "jmp slow",
            "mov rcx,r11",
        ];
        for (op, store) in [
            (FlagsOp::Cli, "mov dword ptr [r15+6Ch],0"),
            (FlagsOp::Sti, "mov dword ptr [r15+6Ch],200h"),
        ] {
            let mut want = cpl_check.to_vec();
            want.push(store);
            assert_eq!(fast_path(op), want);
        }
        let mut want = cpl_check.to_vec();
        want.extend([
            "mov r11d,gs:[r12d]",
            "test r11d,100h",
            "jne slow",
            "lea r12d,[r12+4]",
            "mov r13d,r11d",
            "and r13d,200h",
            "mov [r15+6Ch],r13d",
            "mov r13d,r11d",
            "and r13d,247000h",
            "mov r9d,[r15+68h]",
            "and r9d,180002h",
            "or r9d,r13d",
            "mov [r15+68h],r9d",
            "and r11d,0CD5h",
            "or r11d,2",
            "push r11",
            "popfq",
        ]);
        assert_eq!(fast_path(FlagsOp::Popfd), want);
    }
}
