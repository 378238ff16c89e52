//! The x87 FPU, executed on the host's x87.
//!
//! Results must be bit-identical to the host CPU (the oracle), including
//! the transcendental instructions (FSIN, FPATAN, F2XM1, ...) whose exact
//! results are the microcode's. So popek does not emulate x87 arithmetic:
//! the guest's FPU state lives here as an FXSAVE image (Intel SDM Vol. 1
//! §10.5.1, Table 10-2), and each x87 instruction runs on the host FPU
//! inside a small generated *stub*:
//!
//! ```text
//! stmxcsr [rdi+24]        keep the host's MXCSR in the image
//! fxrstor [rdi]           the guest's x87 state into the host FPU
//! push [rdi+640]; popfq   guest CF/PF/AF/ZF/SF/OF (FCMOVcc reads them)
//! lea rdx, [rdi+512]      the memory operand, if any, is the scratch area
//! mov eax, [rdi+648]      (FNSTSW AX writes AX)
//! <the guest instruction, its ModRM rewritten to [rdx]>
//! pushfq; pop [rdi+640]   (FCOMI and friends write ZF/PF/CF)
//! mov [rdi+648], eax
//! fxsave [rdi]            the new guest state back into the image
//! fninit                  the host FPU as the ABI expects it
//! ret
//! ```
//!
//! The interpreter copies a memory operand into the scratch area before
//! the call and out of it after (a store's destination is checked first, so
//! a fault leaves the FPU state unchanged, as on hardware). The translator
//! instead keeps the guest state in the host FPU while translated code runs
//! ([`Fpu::load_host`], [`Fpu::save_host`]) and copies x87 instructions.
//! Stubs are generated once per distinct instruction form and cached.
//!
//! All of popek's own unsafe code for the x87 lives in this module.

use std::cell::RefCell;
use std::collections::HashMap;

/// FCW after FNINIT (all exceptions masked, 64-bit precision, round to nearest).
pub const FCW_INIT: u16 = 0x037F;

/// Byte offsets in the FXSAVE image.
pub mod off {
    /// x87 control word.
    pub const FCW: usize = 0;
    /// x87 status word.
    pub const FSW: usize = 2;
    /// Abridged tag word (one bit per register).
    pub const FTW: usize = 4;
    /// MXCSR (the host's, never the guest's: the guest has no SSE).
    pub const MXCSR: usize = 24;
    /// ST(0)..ST(7) (in stack order), 16 bytes apart, 10 used.
    pub const ST0: usize = 32;
}

/// FSW bit 7: an unmasked exception is pending (the next waiting x87
/// instruction raises #MF).
pub const FSW_ES: u16 = 1 << 7;

/// What one stub call works on: the FXSAVE image, the memory operand, the
/// arithmetic flags and EAX.
#[repr(C, align(16))]
#[derive(Clone)]
pub struct FpuCall {
    /// FXSAVE image of the guest's x87 state.
    pub image: [u8; 512],
    /// The memory operand (up to 108 bytes: FNSAVE's 32-bit image).
    pub scratch: [u8; 128],
    /// EFLAGS: in, CF/PF/AF/ZF/SF/OF; out, as the instruction left them.
    pub eflags: u64,
    /// EAX in and out (FNSTSW AX).
    pub eax: u64,
}

const SCRATCH: u32 = 512;
const EFLAGS: u32 = 640;
const EAX: u32 = 648;

/// The guest's x87 FPU.
#[derive(Clone)]
pub struct Fpu {
    call: Box<FpuCall>,
    /// The guest has used the FPU: the translator must load its state
    /// into the host FPU while translated code runs.
    pub used: bool,
}

impl std::fmt::Debug for Fpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fpu")
            .field("fcw", &self.fcw())
            .field("fsw", &self.fsw())
            .field("used", &self.used)
            .finish()
    }
}

impl Default for Fpu {
    fn default() -> Self {
        let mut call = Box::new(FpuCall {
            image: [0; 512],
            scratch: [0; 128],
            eflags: 0,
            eax: 0,
        });
        call.image[off::FCW..off::FCW + 2].copy_from_slice(&FCW_INIT.to_le_bytes());
        call.image[off::MXCSR..off::MXCSR + 4].copy_from_slice(&0x1F80u32.to_le_bytes());
        Fpu { call, used: false }
    }
}

impl Fpu {
    /// The FXSAVE image of the guest's x87 state (Intel SDM Vol. 1
    /// §10.5.1, Table 10-2): what a snapshot stores.
    pub fn image(&self) -> &[u8; 512] {
        &self.call.image
    }

    /// Replace the x87 state with an FXSAVE image (a snapshot's).
    pub fn set_image(&mut self, image: &[u8; 512]) {
        self.call.image = *image;
    }

    /// The x87 control word.
    pub fn fcw(&self) -> u16 {
        u16::from_le_bytes([self.call.image[off::FCW], self.call.image[off::FCW + 1]])
    }

    /// The x87 status word.
    pub fn fsw(&self) -> u16 {
        u16::from_le_bytes([self.call.image[off::FSW], self.call.image[off::FSW + 1]])
    }

    /// Do two FPUs hold the same architectural state: control, status and
    /// tag words and the eight registers? The instruction and operand
    /// pointers are left out (host addresses under popek, docs/quirks.md).
    pub fn same_state(&self, other: &Fpu) -> bool {
        let (a, b) = (&self.call.image, &other.call.image);
        a[off::FCW..off::FTW + 1] == b[off::FCW..off::FTW + 1]
            && (0..8).all(|i| {
                let r = off::ST0 + 16 * i;
                a[r..r + 10] == b[r..r + 10]
            })
    }

    /// The memory operand area of the next [`Fpu::execute`].
    pub fn scratch(&mut self) -> &mut [u8; 128] {
        &mut self.call.scratch
    }

    /// Run one x87 instruction on the host FPU. `host` is the instruction
    /// in host form (see [`host_form`]); its memory operand, if any, is the
    /// scratch area. `eflags` and `eax` are the guest's; the new values are
    /// returned.
    pub fn execute(&mut self, host: &HostForm, eflags: u32, eax: u32) -> (u32, u32) {
        const ARITH: u32 = 0x8D5;
        self.used = true;
        self.call.eflags = u64::from(eflags & ARITH | 2);
        self.call.eax = u64::from(eax);
        let stub = stub_for(host);
        // SAFETY: `stub` is a function generated by `emit` for exactly this
        // host form: it reads and writes only the FpuCall `rdi` points to
        // (the image, the scratch area, flags and EAX), keeps the stack
        // balanced, restores the host FPU to its FNINIT state and MXCSR,
        // and leaves DF clear (the flags it pops have only arithmetic bits).
        // The instruction itself is an x87 instruction whose only memory
        // operand is [rdx] = the 128-byte scratch area, large enough for
        // any x87 operand (FNSAVE: 108 bytes).
        unsafe { stub(&mut *self.call) };
        (self.call.eflags as u32 & ARITH, self.call.eax as u32)
    }

    /// Load the guest's state into the host FPU (the translator, before
    /// running translated code that may contain x87 instructions).
    pub fn load_host(&mut self) {
        let image = self.call.image.as_mut_ptr();
        // SAFETY: `image` is a 512-byte, 16-byte-aligned FXSAVE area
        // (FpuCall is align(16), the image is its first field). STMXCSR
        // first puts the host's MXCSR into the image, so FXRSTOR changes
        // only the x87 state, which Rust code on x86-64 does not use.
        unsafe {
            std::arch::asm!(
                "stmxcsr [{0} + 24]",
                "fxrstor [{0}]",
                in(reg) image,
                options(nostack, preserves_flags),
            );
        }
    }

    /// Save the host FPU into the guest's state and reinitialise the host
    /// FPU (after translated code ran).
    pub fn save_host(&mut self) {
        let image = self.call.image.as_mut_ptr();
        // SAFETY: as in `load_host`; FNINIT gives the host FPU back the
        // state the ABI expects (empty stack, FCW 0x37F).
        unsafe {
            std::arch::asm!(
                "fxsave [{0}]",
                "fninit",
                in(reg) image,
                options(nostack, preserves_flags),
            );
        }
    }
}

/// An x87 instruction in host form: prefixes the host needs (FWAIT, 66h),
/// the opcode, and a ModRM byte whose memory operand is `[rdx]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HostForm {
    bytes: [u8; 4],
    len: u8,
}

impl HostForm {
    /// The host bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// The host form of a guest x87 instruction (its bytes, prefixes
/// included), or None if it is not one. Segment, address-size, LOCK and
/// REP prefixes are dropped (the caller has done the addressing); the
/// operand-size prefix stays (it selects the 16-bit FNSTENV/FNSAVE images).
pub fn host_form(guest: &[u8]) -> Option<HostForm> {
    let mut out = [0u8; 4];
    let mut n = 0;
    let mut i = 0;
    let mut o16 = false;
    while let Some(&b) = guest.get(i) {
        match b {
            0x9B => {
                if n > 0 {
                    return None;
                }
                out[0] = 0x9B;
                n = 1;
            }
            0x66 => o16 = true,
            0x67 | 0x26 | 0x2E | 0x36 | 0x3E | 0x64 | 0x65 | 0xF0 | 0xF2 | 0xF3 => {}
            _ => break,
        }
        i += 1;
    }
    let Some(&op) = guest.get(i) else {
        // A lone FWAIT.
        return (n == 1).then_some(HostForm { bytes: out, len: 1 });
    };
    if !(0xD8..=0xDF).contains(&op) {
        return None;
    }
    let modrm = *guest.get(i + 1)?;
    if o16 {
        out[n] = 0x66;
        n += 1;
    }
    out[n] = op;
    out[n + 1] = if modrm >= 0xC0 {
        modrm
    } else {
        (modrm & 0x38) | 0x02
    };
    Some(HostForm {
        bytes: out,
        len: (n + 2) as u8,
    })
}

type Stub = unsafe extern "sysv64" fn(*mut FpuCall);

thread_local! {
    static STUBS: RefCell<HashMap<HostForm, (memmap2::Mmap, Stub)>> = RefCell::new(HashMap::new());
}

fn stub_for(host: &HostForm) -> Stub {
    STUBS.with(|s| {
        let mut s = s.borrow_mut();
        if let Some((_, f)) = s.get(host) {
            return *f;
        }
        let code = emit(host.bytes());
        let mut map = memmap2::MmapMut::map_anon(code.len()).expect("x87 stub memory");
        map[..code.len()].copy_from_slice(&code);
        let map = map.make_exec().expect("x87 stub made executable");
        // SAFETY: the mapping holds the code `emit` produced, a complete
        // function with the Stub signature; it stays mapped as long as the
        // cache entry (the thread) lives.
        let f = unsafe { std::mem::transmute::<*const u8, Stub>(map.as_ptr()) };
        s.insert(*host, (map, f));
        f
    })
}

/// The stub's machine code (see the module documentation).
fn emit(insn: &[u8]) -> Vec<u8> {
    let d = |v: u32| v.to_le_bytes();
    let mut c = Vec::with_capacity(64);
    c.extend([0x0F, 0xAE, 0x5F, off::MXCSR as u8]); // stmxcsr [rdi+24]
    c.extend([0x0F, 0xAE, 0x0F]); // fxrstor [rdi]
    c.extend([0xFF, 0xB7]); // push qword [rdi+EFLAGS]
    c.extend(d(EFLAGS));
    c.push(0x9D); // popfq
    c.extend([0x48, 0x8D, 0x97]); // lea rdx, [rdi+SCRATCH]
    c.extend(d(SCRATCH));
    c.extend([0x8B, 0x87]); // mov eax, [rdi+EAX]
    c.extend(d(EAX));
    c.extend_from_slice(insn);
    c.push(0x9C); // pushfq
    c.extend([0x8F, 0x87]); // pop qword [rdi+EFLAGS]
    c.extend(d(EFLAGS));
    c.extend([0x89, 0x87]); // mov [rdi+EAX], eax
    c.extend(d(EAX));
    c.extend([0x0F, 0xAE, 0x07]); // fxsave [rdi]
    c.extend([0xDB, 0xE3]); // fninit
    c.push(0xC3); // ret
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_forms() {
        // fld qword [ebx+8] -> fld qword [rdx]
        assert_eq!(
            host_form(&[0xDD, 0x43, 0x08]).unwrap().bytes(),
            &[0xDD, 0x02]
        );
        // fadd st, st(1) is copied.
        assert_eq!(host_form(&[0xD8, 0xC1]).unwrap().bytes(), &[0xD8, 0xC1]);
        // 16-bit fnstenv keeps 66h; gs and addr16 are dropped.
        assert_eq!(
            host_form(&[0x65, 0x66, 0x67, 0xD9, 0x37]).unwrap().bytes(),
            &[0x66, 0xD9, 0x32]
        );
        // fstcw (FWAIT + fnstcw) with a SIB byte and disp32.
        assert_eq!(
            host_form(&[0x9B, 0xD9, 0xBC, 0x24, 0, 1, 0, 0])
                .unwrap()
                .bytes(),
            &[0x9B, 0xD9, 0x3A]
        );
        assert_eq!(host_form(&[0x9B]).unwrap().bytes(), &[0x9B]);
        assert!(host_form(&[0x90]).is_none());
    }

    /// 1 + 2 on the host FPU through a stub, stored as a double.
    #[test]
    fn arithmetic_through_stubs() {
        let mut f = Fpu::default();
        let run = |f: &mut Fpu, b: &[u8]| f.execute(&host_form(b).unwrap(), 0, 0);
        run(&mut f, &[0xD9, 0xE8]); // fld1
        run(&mut f, &[0xD9, 0xE8]); // fld1
        run(&mut f, &[0xDE, 0xC1]); // faddp
        f.scratch()[..8].copy_from_slice(&1.0f64.to_le_bytes());
        run(&mut f, &[0xDC, 0x00]); // fadd qword [eax]
        run(&mut f, &[0xDD, 0x18]); // fstp qword [eax]
        assert_eq!(
            f64::from_le_bytes(f.scratch()[..8].try_into().unwrap()),
            3.0
        );
        // fcomi: compare 1 with 0 (greater: ZF=PF=CF=0).
        run(&mut f, &[0xD9, 0xEE]); // fldz
        run(&mut f, &[0xD9, 0xE8]); // fld1
        let (fl, _) = f.execute(&host_form(&[0xDB, 0xF1]).unwrap(), 0x45, 0);
        assert_eq!(fl & 0x45, 0);
        // fnstsw ax keeps EAX's upper half.
        let (_, eax) = f.execute(&host_form(&[0xDF, 0xE0]).unwrap(), 0, 0xABCD_0000);
        assert_eq!(eax >> 16, 0xABCD);
        assert_eq!(eax & 0x3800, 6 << 11, "TOP = 6 after two pushes");
    }
}
