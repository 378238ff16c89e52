//! Straight-line host code: a run of copied guest instructions between a
//! prologue that loads the guest registers and arithmetic flags from a
//! [`Context`] and an epilogue that stores them back.
//!
//! Register mapping: guest EAX..EDI are host EAX..EDI (same encodings), so
//! copied instructions need no register rewriting; guest ESP is not mapped
//! (instructions using it are not copied yet). R15 holds the context
//! pointer. The host's arithmetic flags and DF are the guest's while the
//! block runs; the system flags stay virtual in the context.
//!
//! Guest memory is reached through GS: the calling thread's GS base must be
//! the guest window ([`set_gs_base`]).

use dynasm::dynasm;
use dynasmrt::{x64::Assembler, DynasmApi, ExecutableBuffer};

/// Guest state the host code reads and writes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Context {
    /// EAX, ECX, EDX, EBX, ESP (unused), EBP, ESI, EDI.
    pub regs: [u32; 8],
    /// EFLAGS: only CF, PF, AF, ZF, SF, OF and DF are loaded and stored.
    pub eflags: u32,
}

/// The EFLAGS bits that live in the host's flags while guest code runs.
pub const HOST_FLAGS: u32 = 0xCD5 | 0x400;

/// Compiled host code for one straight-line run.
pub struct Straight {
    buf: ExecutableBuffer,
}

/// Errors building host code.
#[derive(Debug)]
pub struct BuildError(pub String);

impl Straight {
    /// Compile copied instructions (host bytes, in order).
    pub fn compile<'a>(body: impl IntoIterator<Item = &'a [u8]>) -> Result<Straight, BuildError> {
        let mut ops = Assembler::new().map_err(|e| BuildError(e.to_string()))?;
        dynasm!(ops
            ; .arch x64
            ; push rbx
            ; push rbp
            ; push r15
            ; mov r15, rdi
            ; mov eax, DWORD [r15 + 32]
            ; and eax, HOST_FLAGS as i32
            ; push rax
            ; popfq
            ; mov eax, DWORD [r15]
            ; mov ecx, DWORD [r15 + 4]
            ; mov edx, DWORD [r15 + 8]
            ; mov ebx, DWORD [r15 + 12]
            ; mov ebp, DWORD [r15 + 20]
            ; mov esi, DWORD [r15 + 24]
            ; mov edi, DWORD [r15 + 28]
        );
        for b in body {
            ops.extend(b.iter().copied());
        }
        dynasm!(ops
            ; .arch x64
            ; mov DWORD [r15], eax
            ; mov DWORD [r15 + 4], ecx
            ; mov DWORD [r15 + 8], edx
            ; mov DWORD [r15 + 12], ebx
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
            ; cld
            ; pop r15
            ; pop rbp
            ; pop rbx
            ; ret
        );
        let buf = ops
            .finalize()
            .map_err(|_| BuildError("finalize failed".into()))?;
        Ok(Straight { buf })
    }

    /// Host code size in bytes.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Is the code empty (never: prologue and epilogue are always there)?
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Run the code on `ctx`.
    ///
    /// # Safety
    ///
    /// The calling thread's GS base must be a guest window in which every
    /// memory access of the copied instructions lands on mapped memory
    /// (a fault there is not handled yet), and the instructions must have
    /// come from [`crate::lower`].
    pub unsafe fn run(&self, ctx: &mut Context) {
        type Entry = extern "sysv64" fn(*mut Context);
        // SAFETY: the buffer starts with the prologue emitted in `compile`,
        // a function of type `Entry` that preserves the callee-saved
        // registers it touches and returns with DF clear.
        let f: Entry = unsafe { std::mem::transmute(self.buf.ptr(dynasmrt::AssemblyOffset(0))) };
        f(ctx);
    }
}

/// Set the calling thread's GS base (ARCH_SET_GS). popek's host code reaches
/// guest memory as `gs:[addr32]`; nothing else in a Rust program on x86-64
/// Linux uses GS (thread-locals use FS).
pub fn set_gs_base(base: *mut u8) -> std::io::Result<()> {
    const ARCH_SET_GS: libc::c_long = 0x1001;
    // SAFETY: arch_prctl(ARCH_SET_GS) only changes this thread's GS base,
    // which no Rust or libc code on x86-64 Linux relies on.
    let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_SET_GS, base as libc::c_ulong) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
