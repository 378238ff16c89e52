//! The interface between the dispatcher and translated code: the
//! [`Context`] host code reads and writes through R15, its field offsets
//! (which hand-encoded host instructions use as 8-bit displacements,
//! checked against the struct at compile time), the split of EFLAGS
//! between the host's flags and the virtual system flags, and the helper
//! function type.
//!
//! Invariants:
//! - Every offset below equals `offset_of!` of its field and fits a
//!   signed 8-bit displacement (compile-time assertions at the bottom).
//! - While guest code runs, [`HOST_FLAGS`] (the arithmetic flags and DF)
//!   live in the host's RFLAGS; IF is virtual ([`Context::vif`]); every
//!   other system flag is in [`Context::sys`]; RF and VM stay in
//!   [`Context::eflags`]. [`Context::set_eflags`] and
//!   [`Context::guest_eflags`] are exact inverses on any EFLAGS image.

use std::mem::offset_of;

use popek_vcpu::flags;

/// Guest state the host code reads and writes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Context {
    /// EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI.
    pub regs: [u32; 8],
    /// EFLAGS: the arithmetic flags and DF are loaded into and stored from
    /// the host's flags; RF and VM are kept here.
    pub eflags: u32,
    /// Where the guest goes next, written at every block exit.
    pub next_eip: u32,
    /// Set by the fault handler: the host address of the instruction that
    /// faulted (0 if the code ran to its exit).
    pub fault_rip: u64,
    /// Guest instructions of the blocks that completed in this run (the
    /// low [`LOOKUP_SHIFT`] bits), and indirect branches looked up in host
    /// code (the bits above): R8 counts both, with one LEA per block.
    pub retired: u64,
    /// Chained jumps allowed before returning to the dispatcher; what is
    /// left on return.
    pub chain_budget: u64,
    /// Opaque pointer handed to helper functions (the dispatcher's state).
    pub env: u64,
    /// Set by the fault handler for a SIGSEGV: the host address accessed.
    pub fault_addr: u64,
    /// Set by the fault handler for a SIGSEGV: 1 if the access was a write.
    pub fault_write: u64,
    /// Of the indirect branches (RET, JMP/CALL r/m32) looked up in host
    /// code, the ones not found in the table (which return to the
    /// dispatcher; counted on that cold path, so a hit costs no count).
    pub indirect_misses: u64,
    /// Host address of the guest window GS points at (4 GiB-aligned):
    /// translated string instructions add it to ESI and EDI.
    pub window: u64,
    /// The system part of the guest's EFLAGS while its code runs: every
    /// bit outside [`HOST_FLAGS`] except IF, RF and VM (so PUSHF in host
    /// code adds it to the host's arithmetic flags).
    pub sys: u32,
    /// The virtual IF: 0 or 0x200. CLI and STI in host code store it.
    pub vif: u32,
    /// 0 when POPF, CLI and STI may run in host code (CPL 0, neither RF
    /// nor VM set); otherwise they call the helper.
    pub slow: u32,
    /// FS's base, which host code adds for an FS override.
    pub fs_base: u32,
    /// GS's base, which host code adds for a GS override.
    pub gs_base: u32,
    /// 0 while FS (index 0) or GS (index 1) is a flat data segment (see
    /// [`crate::lower::SegBases`]), so host code may access memory through
    /// it; 1 sends such an access to the interpreter.
    pub seg_slow: [u8; 2],
    /// 0 when RDTSC may run in host code (the guest TSC is the host's plus
    /// [`Context::tsc_offset`], and CR4.TSD does not apply); otherwise it
    /// calls the helper.
    pub tsc_slow: u8,
    /// (Padding.)
    pub _pad: u8,
    /// What the guest TSC adds to the host's.
    pub tsc_offset: u64,
    /// Scratch for host code (RDTSC combines EDX:EAX through it).
    pub scratch: u64,
    /// The fast-write map (`GuestRam::fast_map`), indexed by physical
    /// address.
    pub fast_map: u64,
    /// `GuestRam::ram_ptr`: guest RAM writable whatever the window's
    /// protection, for the stores the fast-write map lets through.
    pub ram_rw: u64,
    /// More scratch for host code (a checked store keeps RCX here).
    pub scratch2: u64,
    /// The page-delta table a checked store turns its address into a
    /// physical one with (`GuestRam::page_deltas`: the identity with
    /// paging off, the current shadow's with paging on).
    pub page_deltas: u64,
    /// The [`HelperFn`] the shared helper routine calls (see
    /// [`crate::emit::frame::Frame`]'s `call_helper`).
    pub helper: u64,
}

impl Context {
    /// Take FS's and GS's bases and flatness from `segs`.
    pub fn set_segs(&mut self, segs: crate::lower::SegBases) {
        self.fs_base = segs.fs.unwrap_or(0);
        self.gs_base = segs.gs.unwrap_or(0);
        self.seg_slow = [u8::from(segs.fs.is_none()), u8::from(segs.gs.is_none())];
    }

    /// Take the guest TSC's offset from the host's, and whether host code
    /// may read it (`native`: not counting instructions, CR4.TSD clear or
    /// CPL 0).
    pub fn set_tsc(&mut self, offset: u64, native: bool) {
        self.tsc_offset = offset;
        self.tsc_slow = u8::from(!native);
    }
}

/// Offset of [`Context::regs`] (EAX; register `i` is at `4 * i`).
pub const REGS: u8 = 0;
/// Offset of [`Context::eflags`].
pub const EFLAGS: u8 = 32;
/// Offset of [`Context::next_eip`].
pub const NEXT_EIP: u8 = 36;
/// Offset of [`Context::retired`].
pub const RETIRED: u8 = 48;
/// Offset of [`Context::chain_budget`].
pub const CHAIN_BUDGET: u8 = 56;
/// Offset of [`Context::indirect_misses`].
pub const INDIRECT_MISSES: u8 = 88;
/// Offset of [`Context::window`].
pub const WINDOW: u8 = 96;
/// Offset of [`Context::sys`].
pub const SYS: u8 = 104;
/// Offset of [`Context::vif`].
pub const VIF: u8 = 108;
/// Offset of [`Context::slow`].
pub const SLOW: u8 = 112;

/// Offset of [`Context::fs_base`].
pub const FS_BASE: u8 = 116;
/// Offset of [`Context::gs_base`].
pub const GS_BASE: u8 = 120;
/// Offset of [`Context::seg_slow`] (FS's byte; GS's follows).
pub const SEG_SLOW: u8 = 124;
/// Offset of [`Context::tsc_slow`].
pub const TSC_SLOW: u8 = 126;
/// Offset of [`Context::tsc_offset`] (beyond disp8: dynasm code only).
pub const TSC_OFFSET: u32 = 128;
/// Offset of [`Context::scratch`] (beyond disp8: dynasm code only).
pub const SCRATCH: u32 = 136;
/// Offset of [`Context::fast_map`] (dynasm code only).
pub const FAST_MAP: u32 = 144;
/// Offset of [`Context::ram_rw`] (dynasm code only).
pub const RAM_RW: u32 = 152;
/// Offset of [`Context::scratch2`] (dynasm code only).
pub const SCRATCH2: u32 = 160;
/// Offset of [`Context::page_deltas`] (dynasm code only).
pub const PAGE_DELTAS: u32 = 168;
/// Offset of [`Context::helper`] (dynasm code only).
pub const HELPER: u32 = 176;

const _: () = assert!(offset_of!(Context, regs) == REGS as usize);
const _: () = assert!(offset_of!(Context, fs_base) == FS_BASE as usize);
const _: () = assert!(offset_of!(Context, gs_base) == GS_BASE as usize);
const _: () = assert!(offset_of!(Context, seg_slow) == SEG_SLOW as usize);
const _: () = assert!(offset_of!(Context, tsc_slow) == TSC_SLOW as usize);
const _: () = assert!(offset_of!(Context, tsc_offset) == TSC_OFFSET as usize);
const _: () = assert!(offset_of!(Context, scratch) == SCRATCH as usize);
const _: () = assert!(offset_of!(Context, fast_map) == FAST_MAP as usize);
const _: () = assert!(offset_of!(Context, ram_rw) == RAM_RW as usize);
const _: () = assert!(offset_of!(Context, scratch2) == SCRATCH2 as usize);
const _: () = assert!(offset_of!(Context, page_deltas) == PAGE_DELTAS as usize);
const _: () = assert!(offset_of!(Context, helper) == HELPER as usize);
const _: () = assert!(offset_of!(Context, eflags) == EFLAGS as usize);
const _: () = assert!(offset_of!(Context, next_eip) == NEXT_EIP as usize);
const _: () = assert!(offset_of!(Context, retired) == RETIRED as usize);
const _: () = assert!(offset_of!(Context, chain_budget) == CHAIN_BUDGET as usize);
const _: () = assert!(offset_of!(Context, indirect_misses) == INDIRECT_MISSES as usize);
const _: () = assert!(offset_of!(Context, window) == WINDOW as usize);
const _: () = assert!(offset_of!(Context, sys) == SYS as usize);
const _: () = assert!(offset_of!(Context, vif) == VIF as usize);
const _: () = assert!(offset_of!(Context, slow) == SLOW as usize);
// Hand-encoded instructions address the context with a signed disp8: every
// field they use lies below 128 (TSC_OFFSET and SCRATCH are reached only by
// dynasm-assembled code, which encodes any displacement).
const _: () = assert!(SLOW < 128 && SEG_SLOW < 128 && TSC_SLOW < 128);

/// The EFLAGS bits that live in the host's flags while guest code runs:
/// the six arithmetic flags and DF.
pub const HOST_FLAGS: u32 = flags::ARITH | flags::DF;
/// EFLAGS.RF and EFLAGS.VM: never in a PUSHF image, never changed by POPF.
pub const RF_VM: u32 = flags::RF | flags::VM;
/// The system flags POPF changes at CPL 0 besides IF and TF (SDM Vol. 2,
/// POPF: IOPL, NT, AC and ID are writable at CPL 0; VIF and VIP are not).
pub const POPF_SYS: u32 = flags::IOPL | flags::NT | flags::AC | flags::ID;
/// The system flags POPF keeps: VIF, VIP and the reserved bit 1.
pub const POPF_KEEPS: u32 = flags::VIF | flags::VIP | flags::FIXED1;

/// Where [`Context::retired`] counts indirect-branch lookups: one run
/// retires fewer than 2^24 instructions (at most
/// [`crate::dispatch::CHAIN_BUDGET`] + 1 blocks of at most 65).
pub const LOOKUP_SHIFT: u32 = 24;

impl Context {
    /// Hand the guest's whole EFLAGS to host code running at privilege
    /// level `cpl`: the arithmetic flags (in `eflags`, loaded into the
    /// host's), the system flags (`sys`), the virtual IF (`vif`).
    pub fn set_eflags(&mut self, eflags: u32, cpl: u8) {
        self.eflags = eflags;
        self.sys = eflags & !(HOST_FLAGS | flags::IF | RF_VM);
        self.vif = eflags & flags::IF;
        self.slow = u32::from(cpl != 0 || eflags & RF_VM != 0);
    }

    /// The guest's whole EFLAGS, as host code left it.
    pub fn guest_eflags(&self) -> u32 {
        (self.eflags & (HOST_FLAGS | RF_VM)) | self.sys | self.vif
    }
}

/// The function a helper call in translated code calls (through the
/// shared helper routine): `helper(ctx, arg)`, `arg` the engine's
/// description of the instruction (which says where its decoded form is,
/// and so its EIP), returning 0 to go on with the block and 1 to leave it
/// (the guest state is then already in the context).
pub type HelperFn = extern "sysv64" fn(*mut Context, u32) -> u32;

/// The type of the shared entry routine (the prologue): it loads the
/// guest state from the context and jumps to the block body given.
pub type BlockEntryFn = extern "sysv64" fn(*mut Context, *const u8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eflags_split_round_trips() {
        let mut x = 0x1234_5678u32;
        for cpl in [0u8, 3] {
            for _ in 0..10_000 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let image = (x & 0x003F_7FD5) | flags::FIXED1;
                let mut c = Context::default();
                c.set_eflags(image, cpl);
                assert_eq!(c.guest_eflags(), image);
                assert_eq!(c.slow != 0, cpl != 0 || image & RF_VM != 0);
            }
        }
    }
}
