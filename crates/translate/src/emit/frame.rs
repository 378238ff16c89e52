//! The fixed code sequences every block shares: the prologue (push the
//! host's callee-saved registers, load the guest state from the context),
//! the state store and load around helper calls, and at the start of every
//! code buffer the indirect-branch miss routine (offset 0, where an empty
//! entry of the indirect-branch table points), which counts the miss and
//! falls into the epilogue, which stores the guest state, pops the frame
//! and returns to the dispatcher (the fault handler resumes there too).
//! Assembled once with dynasm, position-independent.

use dynasm::dynasm;
use dynasmrt::{x64::X64Relocation, DynasmApi, DynasmLabelApi, VecAssembler};

use crate::abi::{CHAIN_BUDGET, EFLAGS, HELPER, HOST_FLAGS, INDIRECT_MISSES, REGS, RETIRED};
use crate::helper::{COUNTED_MASK, COUNTED_SHIFT};

// dynasm-rs cannot be told to use an 8-bit displacement for a constant
// that is not a literal, so the sequences below spell the context offsets
// as literals; these assertions tie them to the Context's fields.
const _: () = assert!(
    REGS == 0
        && EFLAGS == 32
        && RETIRED == 48
        && CHAIN_BUDGET == 56
        && INDIRECT_MISSES == 0x58
        && crate::abi::NEXT_EIP == 0x24
);
use crate::emit::BuildError;
use crate::host::CodeBuffer;

/// The indirect-branch miss routine lives at the start of every code
/// buffer (an empty table entry, 0, is its offset).
pub fn miss_offset() -> usize {
    0
}

/// The shared epilogue follows the miss routine.
pub fn epilogue_offset() -> usize {
    frame().miss.len()
}

/// Offset of the shared "leave" routine (after a helper asked to leave:
/// the guest state is already in the context).
pub fn leave_offset() -> usize {
    (frame().miss.len() + frame().epilogue.len()).next_multiple_of(16)
}

/// Offset of the shared entry routine: the prologue, then a jump to the
/// block body in RSI ([`crate::abi::BlockEntryFn`]).
pub fn entry_offset() -> usize {
    (leave_offset() + frame().leave.len()).next_multiple_of(16)
}

/// Offset of the shared helper routine, which a block's helper call
/// calls (see [`Frame::call_helper`]).
pub fn helper_offset() -> usize {
    (entry_offset() + frame().enter.len()).next_multiple_of(16)
}

/// Put the miss routine, the shared epilogue, the leave, entry and helper
/// routines at the start of `buf` if it is empty; the epilogue's offset.
pub(crate) fn ensure_epilogue(buf: &mut CodeBuffer) -> Result<usize, BuildError> {
    if buf.next_offset() == 0 {
        let f = frame();
        // The miss routine falls into the epilogue: one piece.
        let at = buf
            .append(&[&f.miss[..], &f.epilogue[..]].concat())
            .ok_or_else(|| BuildError("code buffer too small".into()))?;
        debug_assert_eq!(at, miss_offset());
        let at = buf
            .append(&f.leave)
            .ok_or_else(|| BuildError("code buffer too small".into()))?;
        debug_assert_eq!(at, leave_offset());
        let at = buf
            .append(&f.enter)
            .ok_or_else(|| BuildError("code buffer too small".into()))?;
        debug_assert_eq!(at, entry_offset());
        let at = buf
            .append(&f.call_helper)
            .ok_or_else(|| BuildError("code buffer too small".into()))?;
        debug_assert_eq!(at, helper_offset());
    }
    Ok(epilogue_offset())
}

/// The fixed code sequences, assembled once (dynasmrt); all are
/// position-independent.
pub(crate) struct Frame {
    /// The shared entry routine: the prologue, then a jump to the body
    /// (RSI, kept in R11).
    pub(crate) enter: Vec<u8>,
    /// Store the state and counters, pop the frame, return.
    pub(crate) epilogue: Vec<u8>,
    /// Store the counters, pop the frame, return (state already stored).
    pub(crate) leave: Vec<u8>,
    /// Store the target of an indirect branch that missed (R13D) as the
    /// next EIP, count the miss and fall into the epilogue.
    pub(crate) miss: Vec<u8>,
    /// The helper routine a block calls for an instruction host code does
    /// not do, with the helper's argument pushed (`push imm32; call`: ten
    /// bytes in the block instead of the whole sequence): store the guest
    /// state and the count, call the context's helper with the argument;
    /// then reload the state and return past the argument, or (the helper
    /// said leave) add the instructions the block retired before the call
    /// (`helper::COUNTED_SHIFT`, `COUNTED_MASK`) to the count, drop the return address
    /// and the argument, and leave as the leave routine does. The block's
    /// RSP is 8 more than a multiple of 16 (the prologue's six pushes after
    /// the caller's return address), so the two pushes keep the helper's
    /// stack aligned with one 8-byte adjustment.
    pub(crate) call_helper: Vec<u8>,
}

pub(crate) fn frame() -> &'static Frame {
    static FRAME: std::sync::OnceLock<Frame> = std::sync::OnceLock::new();
    FRAME.get_or_init(|| {
        let mut ops: VecAssembler<X64Relocation> = VecAssembler::new(0);
        dynasm!(ops
            ; .arch x64
            ; mov eax, DWORD [r15 + 32]
            ; and eax, HOST_FLAGS as i32
            ; push rax
            ; popfq
            ; mov eax, DWORD [r15]
            ; mov ecx, DWORD [r15 + 4]
            ; mov edx, DWORD [r15 + 8]
            ; mov ebx, DWORD [r15 + 12]
            ; mov r12d, DWORD [r15 + 16]
            ; mov ebp, DWORD [r15 + 20]
            ; mov esi, DWORD [r15 + 24]
            ; mov edi, DWORD [r15 + 28]
        );
        let load_state = ops.take().expect("assembles");
        dynasm!(ops
            ; .arch x64
            ; mov DWORD [r15], eax
            ; mov DWORD [r15 + 4], ecx
            ; mov DWORD [r15 + 8], edx
            ; mov DWORD [r15 + 12], ebx
            ; mov DWORD [r15 + 16], r12d
            ; mov DWORD [r15 + 20], ebp
            ; mov DWORD [r15 + 24], esi
            ; mov DWORD [r15 + 28], edi
            ; pushfq
            ; pop rax
            ; and eax, HOST_FLAGS as i32
            ; mov ecx, DWORD [r15 + 32]
            ; and ecx, !HOST_FLAGS as i32
            ; or eax, ecx
            ; mov DWORD [r15 + 32], eax
        );
        let store_state = ops.take().expect("assembles");
        dynasm!(ops
            ; .arch x64
            ; push rbx
            ; push rbp
            ; push r12
            ; push r13
            ; push r14
            ; push r15
            ; mov r15, rdi
            ; xor r8d, r8d
            ; mov r14, QWORD [r15 + 56]
        );
        let mut prologue = ops.take().expect("assembles");
        prologue.extend_from_slice(&load_state);
        dynasm!(ops
            ; .arch x64
            ; mov QWORD [r15 + 48], r8
            ; mov QWORD [r15 + 56], r14
            ; cld
            ; pop r15
            ; pop r14
            ; pop r13
            ; pop r12
            ; pop rbp
            ; pop rbx
            ; ret
        );
        let leave = ops.take().expect("assembles");
        let helper = HELPER as i32;
        let (shift, mask) = (COUNTED_SHIFT as i8, COUNTED_MASK as i32);
        dynasm!(ops
            ; .arch x64
            ; .bytes store_state.iter()
            ; mov QWORD [r15 + 48], r8
            ; mov rdi, r15
            ; mov esi, DWORD [rsp + 8]
            ; sub rsp, 8
            ; call QWORD [r15 + helper]
            ; add rsp, 8
            ; mov r8, QWORD [r15 + 48]
            ; test eax, eax
            ; jnz >leave
            ; .bytes load_state.iter()
            ; ret 8
            ; leave:
            ; mov eax, DWORD [rsp + 8]
            ; shr eax, shift
            ; and eax, mask
            ; add r8, rax
            ; add rsp, 16
            ; .bytes leave.iter()
        );
        let call_helper = ops.finalize().expect("assembles");
        let mut epilogue = store_state.clone();
        epilogue.extend_from_slice(&leave);
        // The body's address (RSI) waits in R11, which the prologue does
        // not touch (it loads the guest's ESI into RSI).
        let mut ops: VecAssembler<X64Relocation> = VecAssembler::new(0);
        dynasm!(ops
            ; .arch x64
            ; mov r11, rsi
        );
        let mut enter = ops.take().expect("assembles");
        enter.extend_from_slice(&prologue);
        dynasm!(ops
            ; .arch x64
            ; jmp r11
        );
        enter.extend_from_slice(&ops.take().expect("assembles"));
        dynasm!(ops
            ; .arch x64
            ; mov DWORD [r15 + 0x24], r13d
            ; mov r11, QWORD [r15 + 0x58]
            ; lea r11, [r11 + 1]
            ; mov QWORD [r15 + 0x58], r11
        );
        let miss = ops.finalize().expect("assembles");
        Frame {
            miss,
            enter,
            call_helper,
            epilogue,
            leave,
        }
    })
}
