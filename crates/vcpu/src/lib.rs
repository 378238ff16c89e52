//! The virtual CPU: architectural state of a 32-bit protected-mode x86 and
//! the semantics of every sensitive and privileged instruction.
//!
//! This crate is the single source of truth for special instructions. The
//! reference interpreter and the binary translator both call the methods
//! here (`popf`, `cli`, `lgdt`, `iret`, `port_out`, ...): POPF is implemented
//! exactly once.
//!
//! Layout:
//! - [`state`]: registers, EFLAGS bits, segment descriptor caches.
//! - [`mmu`]: linear and segmented memory access, 2-level paging.
//! - [`desc`]: descriptor tables and segment-register loads.
//! - [`interrupt`]: exception and interrupt delivery through the IDT,
//!   double and triple faults, IRET, far JMP/CALL/RET.
//! - [`system`]: the remaining special instructions (POPF, PUSHF, CLI,
//!   STI, HLT, IN/OUT, LGDT, MOV CRn, CPUID, RDTSC, ...).
//!
//! Guest exceptions are values ([`Fault::Exception`]), not host errors. A
//! guest doing something popek does not model (a task switch, virtual-8086
//! mode, a call gate) yields [`Fault::Unsupported`], which ends the run
//! with a clear message.

pub mod desc;
pub mod interrupt;
pub mod mmu;
pub mod state;
pub mod system;
pub mod x87;

pub use popek_devices::Board;
pub use popek_memory::GuestRam;
pub use state::*;

/// Exception vectors (Intel SDM Vol. 3 §6.3.1, Table 6-1).
pub mod vector {
    /// Divide error.
    pub const DE: u8 = 0;
    /// Debug.
    pub const DB: u8 = 1;
    /// Breakpoint (INT3).
    pub const BP: u8 = 3;
    /// Overflow (INTO).
    pub const OF: u8 = 4;
    /// BOUND range exceeded.
    pub const BR: u8 = 5;
    /// Invalid opcode.
    pub const UD: u8 = 6;
    /// Device not available (x87 with CR0.EM or CR0.TS).
    pub const NM: u8 = 7;
    /// Double fault.
    pub const DF: u8 = 8;
    /// Invalid TSS.
    pub const TS: u8 = 10;
    /// Segment not present.
    pub const NP: u8 = 11;
    /// Stack-segment fault.
    pub const SS: u8 = 12;
    /// General protection.
    pub const GP: u8 = 13;
    /// Page fault.
    pub const PF: u8 = 14;
    /// x87 floating-point error (an unmasked exception was pending).
    pub const MF: u8 = 16;
    /// Alignment check.
    pub const AC: u8 = 17;

    /// The mnemonic of an exception vector, as the SDM writes it.
    pub fn name(v: u8) -> &'static str {
        match v {
            0 => "#DE",
            1 => "#DB",
            2 => "NMI",
            3 => "#BP",
            4 => "#OF",
            5 => "#BR",
            6 => "#UD",
            7 => "#NM",
            8 => "#DF",
            10 => "#TS",
            11 => "#NP",
            12 => "#SS",
            13 => "#GP",
            14 => "#PF",
            16 => "#MF",
            17 => "#AC",
            18 => "#MC",
            _ => "INT",
        }
    }
}

/// A guest exception: a vector plus an error code for those that push one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exception {
    /// The interrupt vector.
    pub vector: u8,
    /// The error code pushed on the handler's stack, if the vector has one.
    pub error: Option<u32>,
}

impl std::fmt::Display for Exception {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", vector::name(self.vector))?;
        if let Some(e) = self.error {
            write!(f, "({e:#x})")?;
        }
        Ok(())
    }
}

/// Why an instruction did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    /// A guest exception to deliver through the guest IDT.
    #[error("guest exception {0}")]
    Exception(Exception),
    /// Something the guest did that popek does not model; the run ends.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// The result of a virtual-CPU operation.
pub type VResult<T> = Result<T, Fault>;

impl Fault {
    /// An exception without an error code.
    pub fn exc(vector: u8) -> Fault {
        Fault::Exception(Exception {
            vector,
            error: None,
        })
    }
    /// An exception with an error code.
    pub fn exc_code(vector: u8, code: u32) -> Fault {
        Fault::Exception(Exception {
            vector,
            error: Some(code),
        })
    }
    /// #GP(code).
    pub fn gp(code: u32) -> Fault {
        Fault::exc_code(vector::GP, code)
    }
    /// #UD.
    pub fn ud() -> Fault {
        Fault::exc(vector::UD)
    }
    /// #SS(code).
    pub fn ss(code: u32) -> Fault {
        Fault::exc_code(vector::SS, code)
    }
    /// #NP(code).
    pub fn np(code: u32) -> Fault {
        Fault::exc_code(vector::NP, code)
    }
    /// #TS(code).
    pub fn ts(code: u32) -> Fault {
        Fault::exc_code(vector::TS, code)
    }
    /// #DE.
    pub fn de() -> Fault {
        Fault::exc(vector::DE)
    }
    /// Something popek does not model.
    pub fn unsupported(what: impl Into<String>) -> Fault {
        Fault::Unsupported(what.into())
    }
}

/// Why the virtual CPU stopped for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The guest wrote to isa-debug-exit; the process exit status follows.
    DebugExit(i32),
    /// A fault while delivering a double fault (the CPU would shut down).
    TripleFault {
        /// The exception that could not be delivered.
        last: Exception,
        /// EIP of the instruction that started the cascade.
        eip: u32,
    },
    /// The guest did something popek does not model.
    Unsupported {
        /// What it was.
        what: String,
        /// EIP of the instruction.
        eip: u32,
    },
}
