//! Straight-line host code: a run of copied guest instructions between a
//! prologue that loads the guest registers and arithmetic flags from a
//! [`Context`] and an epilogue that stores them back.
//!
//! Register mapping: guest EAX, ECX, EDX, EBX, EBP, ESI, EDI are the host
//! registers with the same numbers, so most copied instructions need no
//! register rewriting; guest ESP is R12D (the host's RSP stays the host
//! stack); R13 is a scratch register; R15 holds the context pointer. The host's arithmetic flags and DF are the guest's while the
//! block runs; the system flags stay virtual in the context.
//!
//! Guest memory is reached through GS: the calling thread's GS base must be
//! the guest window ([`set_gs_base`]).

use dynasm::dynasm;
use dynasmrt::{x64::X64Relocation, DynasmApi, VecAssembler};

use crate::code_buffer::CodeBuffer;

/// Guest state the host code reads and writes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Context {
    /// EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI.
    pub regs: [u32; 8],
    /// EFLAGS: only CF, PF, AF, ZF, SF, OF and DF are loaded and stored.
    pub eflags: u32,
    /// Where the guest goes next, written by a lowered branch at the end of
    /// the code (otherwise left as the caller set it).
    pub next_eip: u32,
    /// Set by the fault handler: the host address of the instruction that
    /// faulted (0 if the code ran to its end).
    pub fault_rip: u64,
}

/// Offset of [`Context::next_eip`].
pub const NEXT_EIP_OFFSET: i64 = 36;

/// The EFLAGS bits that live in the host's flags while guest code runs.
pub const HOST_FLAGS: u32 = 0xCD5 | 0x400;

/// Compiled host code for one straight-line run.
pub struct Straight {
    /// Executable address of the code (in a [`CodeBuffer`]).
    entry: *const u8,
    /// Code size in bytes.
    len: usize,
    /// Host offset of each copied instruction, in order.
    starts: Vec<usize>,
    /// Host offset of the fault entry (the epilogue, entered by the
    /// SIGSEGV/SIGFPE handler with the guest state of the faulting
    /// instruction still in the registers).
    fault_entry: usize,
    /// End of the copied instructions (start of the epilogue).
    body_end: usize,
}

/// Errors building host code.
#[derive(Debug)]
pub struct BuildError(pub String);

impl Straight {
    /// Compile copied instructions (host bytes, in order) into `buf`.
    /// Fails with [`BuildError`] when the buffer is full.
    pub fn compile<'a>(
        buf: &mut CodeBuffer,
        body: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Straight, BuildError> {
        let (prologue, epilogue) = frame();
        let mut bytes = Vec::with_capacity(256);
        bytes.extend_from_slice(prologue);
        let mut starts = Vec::new();
        for b in body {
            starts.push(bytes.len());
            bytes.extend_from_slice(b);
        }
        let body_end = bytes.len();
        bytes.extend_from_slice(epilogue);
        let at = buf
            .append(&bytes)
            .ok_or_else(|| BuildError("code buffer full".into()))?;
        Ok(Straight {
            entry: buf.exec_addr(at),
            len: bytes.len(),
            starts,
            fault_entry: body_end,
            body_end,
        })
    }

    /// The index of the copied instruction at host address `rip`, if `rip`
    /// lies in this code's copied instructions.
    pub fn instruction_at(&self, rip: u64) -> Option<usize> {
        let base = self.entry as u64;
        let off = rip.checked_sub(base)? as usize;
        if off >= self.body_end || self.starts.first().is_none_or(|s| off < *s) {
            return None;
        }
        Some(self.starts.partition_point(|s| *s <= off) - 1)
    }

    /// Host code size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Is the code empty (never: prologue and epilogue are always there)?
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Run the code on `ctx`. If a copied instruction faults (a host
    /// SIGSEGV or SIGFPE), the guest state *before* that instruction is in
    /// `ctx` and `ctx.fault_rip` says which one ([`Straight::instruction_at`]).
    ///
    /// # Safety
    ///
    /// The calling thread's GS base must be a guest window, the fault
    /// handler must be installed ([`crate::fault::install`]), the
    /// instructions must have come from [`crate::lower`], and the
    /// [`CodeBuffer`] holding the code must not have been reset or dropped.
    pub unsafe fn run(&self, ctx: &mut Context) {
        type Entry = extern "sysv64" fn(*mut Context);
        ctx.fault_rip = 0;
        let start = self.entry as u64;
        let active = crate::fault::Active {
            start: start + self.starts.first().copied().unwrap_or(self.body_end) as u64,
            end: start + self.body_end as u64,
            fault_entry: start + self.fault_entry as u64,
            ctx: ctx as *mut Context,
        };
        crate::fault::set_active(Some(active));
        // SAFETY: `entry` is the executable copy of the code emitted in
        // `compile`, which starts with a function of type `Entry` that
        // preserves the callee-saved registers it touches and returns with
        // DF clear; the caller keeps the code buffer alive and unreset.
        let f: Entry = unsafe { std::mem::transmute::<*const u8, Entry>(self.entry) };
        f(ctx);
        crate::fault::set_active(None);
    }
}

/// The prologue and epilogue every run shares, assembled once (dynasmrt).
/// Both are position-independent.
fn frame() -> (&'static [u8], &'static [u8]) {
    static FRAME: std::sync::OnceLock<(Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
    let (p, e) = FRAME.get_or_init(|| {
        let mut ops: VecAssembler<X64Relocation> = VecAssembler::new(0);
        dynasm!(ops
            ; .arch x64
            ; push rbx
            ; push rbp
            ; push r12
            ; push r13
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
            ; mov r12d, DWORD [r15 + 16]
            ; mov ebp, DWORD [r15 + 20]
            ; mov esi, DWORD [r15 + 24]
            ; mov edi, DWORD [r15 + 28]
        );
        let prologue = ops.take().expect("prologue assembles");
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
            ; cld
            ; pop r15
            ; pop r13
            ; pop r12
            ; pop rbp
            ; pop rbx
            ; ret
        );
        let epilogue = ops.finalize().expect("epilogue assembles");
        (prologue, epilogue)
    });
    (p, e)
}

thread_local! {
    /// What this thread's GS base was last set to.
    static GS_BASE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Set the calling thread's GS base (ARCH_SET_GS). popek's host code reaches
/// guest memory as `gs:[addr32]`; nothing else in a Rust program on x86-64
/// Linux uses GS (thread-locals use FS).
pub fn set_gs_base(base: *mut u8) -> std::io::Result<()> {
    const ARCH_SET_GS: libc::c_long = 0x1001;
    if GS_BASE.with(|g| g.get()) == base as usize {
        return Ok(());
    }
    // SAFETY: arch_prctl(ARCH_SET_GS) only changes this thread's GS base,
    // which no Rust or libc code on x86-64 Linux relies on.
    let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_SET_GS, base as libc::c_ulong) };
    if r == 0 {
        GS_BASE.with(|g| g.set(base as usize));
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
