//! Writes each test case as a tiny static i386 Linux ELF: one RWX PT_LOAD
//! segment holding the code (prologue, sequence, epilogue) and the data
//! (scratch, stack, output area). The program loads the initial state, runs
//! the sequence, stores the final registers, EFLAGS and x87 state (FNSAVE),
//! and writes scratch, stack, registers and x87 state to stdout with one
//! `write` system call.

use crate::gen::{Case, SCRATCH};

/// Where the image is loaded (the classic i386 executable base).
pub const BASE: u32 = 0x0804_8000;
/// Stack area dumped after the run.
pub const STACK: u32 = 1024;
/// Final registers (8) and EFLAGS.
pub const OUT_WORDS: u32 = 9;
/// What the signal handler writes: the signal number and the 19 words of
/// the i386 `struct sigcontext` (gs, fs, es, ds, edi, esi, ebp, esp, ebx,
/// edx, ecx, eax, trapno, err, eip, cs, eflags, esp_at_signal, ss).
pub const SIGNAL_DUMP_LEN: u32 = 4 + 19 * 4;
/// Signals the handler catches (SIGILL, SIGTRAP, SIGBUS, SIGFPE, SIGSEGV).
const CAUGHT: [u32; 5] = [4, 5, 7, 8, 11];
/// Size of the alternate signal stack (after the file, zero-filled).
const ALT_STACK: u32 = 64 << 10;
/// The FNSAVE image (32-bit protected-mode format, Intel SDM Vol. 1
/// 8.1.10 and Figure 8-9): control, status and tag words, FIP/FCS/FOP,
/// FDP/FDS, then ST(0)..ST(7), 10 bytes each.
pub const FPU_LEN: u32 = 108;
/// Bytes written to stdout: scratch, stack, registers, flags, x87 state.
pub const DUMP_LEN: u32 = SCRATCH + STACK + 4 * OUT_WORDS + FPU_LEN;

/// Addresses of the data regions for a code size.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Start of scratch (also what EBX holds).
    pub data: u32,
}

impl Layout {
    fn for_code(code_len: u32) -> Layout {
        let code_end = BASE + 0x60 + code_len;
        Layout {
            data: (code_end + 0xFFF) & !0xFFF,
        }
    }
    /// Initial ESP.
    pub fn esp(self) -> u32 {
        self.data + SCRATCH + STACK - 256
    }
    fn out(self) -> u32 {
        self.data + SCRATCH + STACK
    }
    fn private_stack_top(self) -> u32 {
        self.out() + (4 * OUT_WORDS + FPU_LEN).max(SIGNAL_DUMP_LEN) + 128
    }
    /// struct sigaltstack (12 bytes) then struct kernel_sigaction (20 bytes).
    fn sys(self) -> u32 {
        self.private_stack_top() + 16
    }
    fn end(self) -> u32 {
        self.sys() + 48
    }
}

fn mov_imm(reg: u8, v: u32) -> Vec<u8> {
    let mut b = vec![0xB8 + reg];
    b.extend(v.to_le_bytes());
    b
}

fn int80(c: &mut Vec<u8>, nr: u32, ebx: u32, ecx: u32, edx: u32, esi: u32) {
    c.extend(mov_imm(0, nr));
    c.extend(mov_imm(3, ebx));
    c.extend(mov_imm(1, ecx));
    c.extend(mov_imm(2, edx));
    c.extend(mov_imm(6, esi));
    c.extend([0xCD, 0x80]);
}

fn prologue(case: &Case, l: Layout) -> Vec<u8> {
    // Catch the signals of the exceptions mode on an alternate stack.
    let mut c = Vec::new();
    int80(&mut c, 186, l.sys(), 0, 0, 0); // sigaltstack(&ss, NULL)
    for sig in CAUGHT {
        int80(&mut c, 174, sig, l.sys() + 16, 0, 8); // rt_sigaction(sig, &act, NULL, 8)
    }
    c.extend(mov_imm(4, l.esp())); // mov esp, stack
    c.push(0x68); // push imm32; popfd
    c.extend((case.flags | 0x202).to_le_bytes());
    c.push(0x9D);
    for r in 0..8u8 {
        match r {
            3 => c.extend(mov_imm(3, l.data)),
            4 => {}
            _ => c.extend(mov_imm(r, case.regs[r as usize])),
        }
    }
    c
}

fn epilogue(l: Layout) -> Vec<u8> {
    let out = l.out();
    let mut c = vec![0xA3]; // mov [out], eax
    c.extend(out.to_le_bytes());
    for r in 1..8u8 {
        c.extend([0x89, 0x05 | r << 3]); // mov [out+4r], reg
        c.extend((out + 4 * u32::from(r)).to_le_bytes());
    }
    c.extend(mov_imm(4, l.private_stack_top())); // a stack outside the dump
    c.push(0x9C); // pushfd; pop [out+32]
    c.extend([0x8F, 0x05]);
    c.extend((out + 32).to_le_bytes());
    c.extend([0xDD, 0x35]); // fnsave [out+36]
    c.extend((out + 4 * OUT_WORDS).to_le_bytes());
    c.extend(mov_imm(0, 4)); // write(1, data, DUMP_LEN)
    c.extend(mov_imm(3, 1));
    c.extend(mov_imm(1, l.data));
    c.extend(mov_imm(2, DUMP_LEN));
    c.extend([0xCD, 0x80]);
    c.extend(mov_imm(0, 252)); // exit_group(0)
    c.extend([0x31, 0xDB, 0xCD, 0x80]);
    c
}

/// The signal handler (SA_SIGINFO): write the signal number and the
/// sigcontext to stdout, then exit_group(0).
fn handler(l: Layout) -> Vec<u8> {
    let out = l.out();
    let mut c = vec![0x8B, 0x44, 0x24, 0x04, 0xA3]; // mov eax, [esp+4]; mov [out], eax
    c.extend(out.to_le_bytes());
    c.extend([0x8B, 0x74, 0x24, 0x0C, 0x83, 0xC6, 0x14]); // mov esi, [esp+12]; add esi, 20
    c.extend(mov_imm(7, out + 4));
    c.extend(mov_imm(1, 19));
    c.extend([0xFC, 0xF3, 0xA5]); // cld; rep movsd
    int80(&mut c, 4, 1, out, SIGNAL_DUMP_LEN, 0);
    int80(&mut c, 252, 0, 0, 0, 0);
    c
}

/// The code of a case: prologue, sequence, epilogue, signal handler.
/// Returns it with the layout and the handler's address.
pub fn code(case: &Case) -> (Vec<u8>, Layout, u32) {
    let seq: Vec<u8> = case.insns().flatten().copied().collect();
    // Code lengths do not depend on the layout's values.
    let guess = Layout::for_code(0);
    let len =
        prologue(case, guess).len() + seq.len() + epilogue(guess).len() + handler(guess).len();
    let l = Layout::for_code(len as u32);
    let mut c = prologue(case, l);
    c.extend(&seq);
    c.extend(epilogue(l));
    let handler_addr = BASE + 0x60 + c.len() as u32;
    c.extend(handler(l));
    (c, l, handler_addr)
}

/// Address of the first instruction of the sequence.
pub fn sequence_start(case: &Case) -> u32 {
    let l = Layout::for_code(0);
    BASE + 0x60 + prologue(case, l).len() as u32
}

/// The ELF file of a case.
pub fn elf(case: &Case) -> Vec<u8> {
    let (code, l, handler_addr) = code(case);
    let size = l.end() - BASE;
    let mut f = vec![0u8; size as usize];
    // ELF header (System V ABI, i386 supplement)
    f[..16].copy_from_slice(&[0x7F, b'E', b'L', b'F', 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let put16 = |f: &mut Vec<u8>, o: usize, v: u16| f[o..o + 2].copy_from_slice(&v.to_le_bytes());
    let put32 = |f: &mut Vec<u8>, o: usize, v: u32| f[o..o + 4].copy_from_slice(&v.to_le_bytes());
    put16(&mut f, 16, 2); // ET_EXEC
    put16(&mut f, 18, 3); // EM_386
    put32(&mut f, 20, 1); // EV_CURRENT
    put32(&mut f, 24, BASE + 0x60); // e_entry
    put32(&mut f, 28, 52); // e_phoff
    put16(&mut f, 40, 52); // e_ehsize
    put16(&mut f, 42, 32); // e_phentsize
    put16(&mut f, 44, 1); // e_phnum
    put16(&mut f, 46, 40); // e_shentsize
                           // Program header: PT_LOAD of the whole file, RWX
    put32(&mut f, 52, 1);
    put32(&mut f, 56, 0);
    put32(&mut f, 60, BASE);
    put32(&mut f, 64, BASE);
    put32(&mut f, 68, size);
    put32(&mut f, 72, size + ALT_STACK);
    put32(&mut f, 76, 7);
    put32(&mut f, 80, 0x1000);
    f[0x60..0x60 + code.len()].copy_from_slice(&code);
    let d = (l.data - BASE) as usize;
    f[d..d + case.scratch.len()].copy_from_slice(&case.scratch);
    // stack_t {ss_sp, ss_flags, ss_size}; kernel_sigaction {handler, flags, restorer, mask}
    let sys = (l.sys() - BASE) as usize;
    put32(&mut f, sys, l.end());
    put32(&mut f, sys + 8, ALT_STACK);
    put32(&mut f, sys + 16, handler_addr);
    put32(&mut f, sys + 20, 0x0800_0004); // SA_ONSTACK | SA_SIGINFO
    f
}
