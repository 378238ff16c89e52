//! Which arithmetic flags an instruction defines and which it leaves
//! undefined (Intel SDM Vol. 1 Appendix A, and each instruction's "Flags
//! Affected"), from iced-x86's tables plus the count-dependent cases they
//! do not know. The differential harness and `--lockstep` mask the flags
//! the SDM leaves undefined: the interpreter computes one value, the host
//! CPU may compute another, and both are correct.

use iced_x86::{Instruction, RflagsBits};

/// The arithmetic flags, as iced-x86 `RflagsBits`.
pub const ARITH: u32 = RflagsBits::CF
    | RflagsBits::PF
    | RflagsBits::AF
    | RflagsBits::ZF
    | RflagsBits::SF
    | RflagsBits::OF;

/// The arithmetic flags (iced bits) an instruction surely writes: none for
/// a REP string instruction, which writes nothing when ECX is 0.
/// Likewise none for a shift or rotate whose count may be 0 (CL, or an
/// immediate that masks to 0), which leaves the flags alone.
pub fn defined_by(ins: &Instruction) -> u32 {
    if ins.has_rep_prefix() || ins.has_repe_prefix() || ins.has_repne_prefix() {
        return 0;
    }
    if let Some(count) = shift_count(ins) {
        if count.unwrap_or(0) == 0 {
            return 0;
        }
    }
    ins.rflags_modified() & ARITH
}

/// For shifts and rotates: Some(the count masked to 5 bits, or None for CL).
fn shift_count(ins: &Instruction) -> Option<Option<u32>> {
    use iced_x86::{Mnemonic as M, OpKind};
    let m = ins.mnemonic();
    if !matches!(
        m,
        M::Shl | M::Sal | M::Shr | M::Sar | M::Shld | M::Shrd | M::Rol | M::Ror | M::Rcl | M::Rcr
    ) {
        return None;
    }
    if ins.op_count() == 1 {
        return Some(Some(1));
    }
    Some(match ins.op_kind(ins.op_count() - 1) {
        OpKind::Immediate8 | OpKind::Immediate8_2nd => Some(u32::from(ins.immediate8()) & 31),
        _ => None,
    })
}

/// The arithmetic flags (iced bits) an instruction leaves undefined,
/// including the count-dependent cases iced-x86's static tables do not
/// know: OF after a shift or rotate whose count is not 1, CF after a shift
/// of a byte or word by at least its width.
pub fn undefined_by(ins: &Instruction) -> u32 {
    use iced_x86::{Mnemonic as M, OpKind};
    let mut u = ins.rflags_undefined() & ARITH;
    let shift = matches!(
        ins.mnemonic(),
        M::Shl | M::Sal | M::Shr | M::Sar | M::Shld | M::Shrd
    );
    let rotate = matches!(ins.mnemonic(), M::Rol | M::Ror | M::Rcl | M::Rcr);
    if shift || rotate {
        let count = shift_count(ins).flatten(); // None: CL, unknown here
        if count != Some(1) {
            u |= RflagsBits::OF;
        }
        let width = match ins.op_kind(0) {
            OpKind::Register => ins.op0_register().size() as u32 * 8,
            _ => ins.memory_size().size() as u32 * 8,
        };
        if shift && count.is_none_or(|c| c >= width) {
            u |= RflagsBits::CF;
        }
    }
    u
}

/// Convert iced-x86's `RflagsBits` (its own bit order) to EFLAGS bits.
pub fn to_eflags(bits: u32) -> u32 {
    const MAP: [(u32, u32); 6] = [
        (RflagsBits::CF, 1 << 0),
        (RflagsBits::PF, 1 << 2),
        (RflagsBits::AF, 1 << 4),
        (RflagsBits::ZF, 1 << 6),
        (RflagsBits::SF, 1 << 7),
        (RflagsBits::OF, 1 << 11),
    ];
    MAP.iter()
        .filter(|(i, _)| bits & i != 0)
        .map(|(_, e)| e)
        .sum()
}
