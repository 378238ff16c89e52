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

use popek_vcpu::flags::IF;

use crate::abi::{HOST_FLAGS, POPF_KEEPS, POPF_SYS, SLOW, SYS, VIF};

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

/// The host code of a [`FlagsOp`]'s fast path. Returns the offsets (in
/// `out`) of rel32 fields to point at the slow path (a helper call), which
/// the caller places after a jump over it; none for PUSHFD.
///
/// Everything before a jump to the slow path leaves the guest's flags as
/// they were, except POPF's TF test, after which the helper's POPF sets
/// every arithmetic flag anyway (its load has just succeeded). The only
/// instruction that can fault comes first (the guest stack access), so a
/// fault finds the guest state as it was before the instruction.
pub(crate) fn flags_fast_path(out: &mut Vec<u8>, op: FlagsOp) -> Vec<usize> {
    let mut to_slow = Vec::new();
    // CPL 0? Flag-free: `slow` through RCX for JRCXZ.
    let mut cpl0_or_slow = |out: &mut Vec<u8>| {
        out.extend([0x49, 0x89, 0xCB]); // mov r11, rcx
        out.extend([0x41, 0x8B, 0x4F, SLOW]); // mov ecx, [r15+slow]
        out.extend([0xE3, 0x08]); // jrcxz fast
        out.extend([0x4C, 0x89, 0xD9]); // mov rcx, r11
        out.extend([0xE9, 0, 0, 0, 0]); // jmp slow
        to_slow.push(out.len() - 4);
        out.extend([0x4C, 0x89, 0xD9]); // fast: mov rcx, r11
    };
    match op {
        FlagsOp::Pushfd { host_fixed } => {
            out.push(0x9C); // pushfq
            out.extend([0x41, 0x5B]); // pop r11
            out.extend([0x45, 0x8B, 0x6F, SYS]); // mov r13d, [r15+sys]
            out.extend([0x47, 0x8D, 0x9C, 0x2B]); // lea r11d, [r11+r13-host_fixed]
            out.extend(host_fixed.wrapping_neg().to_le_bytes());
            out.extend([0x45, 0x8B, 0x6F, VIF]); // mov r13d, [r15+vif]
            out.extend([0x47, 0x8D, 0x1C, 0x2B]); // lea r11d, [r11+r13]
            out.extend([0x65, 0x67, 0x45, 0x89, 0x5C, 0x24, 0xFC]); // mov gs:[r12d-4], r11d
            out.extend([0x45, 0x8D, 0x64, 0x24, 0xFC]); // lea r12d, [r12-4]
        }
        FlagsOp::Cli | FlagsOp::Sti => {
            cpl0_or_slow(out);
            let vif = if op == FlagsOp::Sti { IF } else { 0 };
            out.extend([0x41, 0xC7, 0x47, VIF]); // mov dword [r15+vif], imm32
            out.extend(vif.to_le_bytes());
        }
        FlagsOp::Popfd => {
            cpl0_or_slow(out);
            out.extend([0x65, 0x67, 0x45, 0x8B, 0x1C, 0x24]); // mov r11d, gs:[r12d]
            out.extend([0x41, 0xF7, 0xC3, 0x00, 0x01, 0x00, 0x00]); // test r11d, TF
            out.extend([0x0F, 0x85, 0, 0, 0, 0]); // jnz slow (single-stepping)
            to_slow.push(out.len() - 4);
            out.extend([0x45, 0x8D, 0x64, 0x24, 0x04]); // lea r12d, [r12+4]
            out.extend([0x45, 0x89, 0xDD]); // mov r13d, r11d
            out.extend([0x41, 0x81, 0xE5]); // and r13d, IF
            out.extend(IF.to_le_bytes());
            out.extend([0x45, 0x89, 0x6F, VIF]); // mov [r15+vif], r13d
            out.extend([0x45, 0x89, 0xDD]); // mov r13d, r11d
            out.extend([0x41, 0x81, 0xE5]); // and r13d, POPF_SYS
            out.extend(POPF_SYS.to_le_bytes());
            out.extend([0x45, 0x8B, 0x4F, SYS]); // mov r9d, [r15+sys]
            out.extend([0x41, 0x81, 0xE1]); // and r9d, POPF_KEEPS
            out.extend(POPF_KEEPS.to_le_bytes());
            out.extend([0x45, 0x09, 0xE9]); // or r9d, r13d
            out.extend([0x45, 0x89, 0x4F, SYS]); // mov [r15+sys], r9d
            out.extend([0x41, 0x81, 0xE3]); // and r11d, HOST_FLAGS
            out.extend(HOST_FLAGS.to_le_bytes());
            out.extend([0x41, 0x83, 0xCB, 0x02]); // or r11d, 2
            out.extend([0x41, 0x53]); // push r11
            out.push(0x9D); // popfq
        }
    }
    to_slow
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emit::patch_rel32;
    use crate::emit::tests::disassemble;

    /// disassemble to the intended instructions, and the context offsets
    /// they use are the fields'.
    #[test]
    fn flags_fast_path_encoding() {
        let mut out = Vec::new();
        let slow = flags_fast_path(&mut out, FlagsOp::Pushfd { host_fixed: 0x202 });
        assert!(slow.is_empty());
        assert_eq!(
            disassemble(&out),
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
            "jrcxz 0000000000000011h",
            "mov rcx,r11",
            "jmp 0000000000000016h",
            "mov rcx,r11",
        ];
        for (op, store) in [
            (FlagsOp::Cli, "mov dword ptr [r15+6Ch],0"),
            (FlagsOp::Sti, "mov dword ptr [r15+6Ch],200h"),
        ] {
            let mut out = Vec::new();
            let slow = flags_fast_path(&mut out, op);
            patch_rel32(&mut out, slow[0], 0x16);
            let mut want = cpl_check.to_vec();
            want.push(store);
            assert_eq!(disassemble(&out), want);
        }
        let mut out = Vec::new();
        let slow = flags_fast_path(&mut out, FlagsOp::Popfd);
        assert_eq!(slow.len(), 2);
        patch_rel32(&mut out, slow[0], 0x16);
        patch_rel32(&mut out, slow[1], 0x16);
        let mut want = cpl_check.to_vec();
        want.extend([
            "mov r11d,gs:[r12d]",
            "test r11d,100h",
            "jne 0000000000000016h",
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
        assert_eq!(disassemble(&out), want);
    }
}
