//! Sensitive and privileged instructions (Intel SDM Vol. 2 pseudocode for
//! each; Vol. 3 §2.8 lists the system instructions, §5.9 the privileged
//! ones, §19.5 the I/O permission checks).
//!
//! These are the "interpreter routines" of the classic VMM: the reference
//! interpreter and the binary translator both call them.

use crate::interrupt::Source;
use crate::state::{attr, cr0, cr4, flags, reg, SegReg, Segment};
use crate::{desc::is_null, desc::Descriptor, Fault, VResult, Vcpu};

/// CPUID leaf 1 EDX: the features of popek's Pentium Pro-class CPU.
pub mod cpuid_edx {
    /// x87 FPU on chip.
    pub const FPU: u32 = 1 << 0;
    /// Page size extension (4 MiB pages).
    pub const PSE: u32 = 1 << 3;
    /// Time-stamp counter.
    pub const TSC: u32 = 1 << 4;
    /// RDMSR/WRMSR.
    pub const MSR: u32 = 1 << 5;
    /// CMPXCHG8B.
    pub const CX8: u32 = 1 << 8;
    /// CMOVcc.
    pub const CMOV: u32 = 1 << 15;
    /// What leaf 1 reports.
    pub const ALL: u32 = FPU | PSE | TSC | MSR | CX8 | CMOV;
}

/// CPUID leaf 1 EAX: family 6, model 1, stepping 9 (a Pentium Pro).
pub const CPUID_SIGNATURE: u32 = 0x0000_0619;

/// MSR number of the time-stamp counter.
pub const MSR_TSC: u32 = 0x10;
/// IA32_BIOS_SIGN_ID, the microcode update signature (Intel SDM Vol. 4,
/// Table 2-2, 8BH): Linux writes 0, executes CPUID(1) and reads the
/// revision from EDX.
pub const MSR_BIOS_SIGN_ID: u32 = 0x8B;

impl Vcpu {
    /// #GP(0) unless CPL is 0: the check that makes an instruction privileged.
    #[inline]
    pub fn require_cpl0(&self) -> VResult<()> {
        if self.cpl() == 0 {
            Ok(())
        } else {
            Err(Fault::gp(0))
        }
    }

    /// PUSHF/PUSHFD: push EFLAGS with VM and RF cleared in the image.
    /// At CPL 3 this reveals the *virtual* IF and IOPL: the value is what a
    /// real CPU running this guest at ring 0 would push.
    pub fn pushf(&mut self, op32: bool) -> VResult<()> {
        let image = self.eflags & !(flags::VM | flags::RF);
        if op32 {
            self.push(image, 4)
        } else {
            self.push(image & 0xFFFF, 2)
        }
    }

    /// POPF/POPFD. Sensitive: outside ring 0 IOPL is silently kept, and IF
    /// is silently kept when CPL > IOPL. No trap, which is why x86 fails
    /// the Popek–Goldberg condition.
    pub fn popf(&mut self, op32: bool) -> VResult<()> {
        let len = if op32 { 4 } else { 2 };
        let image = self.pop(len)?;
        let cpl = self.cpl();
        self.write_flags(image, if op32 { u32::MAX } else { 0xFFFF }, cpl);
        Ok(())
    }

    /// CLI: #GP(0) when CPL > IOPL.
    pub fn cli(&mut self) -> VResult<()> {
        if self.cpl() > self.iopl() {
            return Err(Fault::gp(0));
        }
        self.eflags &= !flags::IF;
        Ok(())
    }

    /// STI: #GP(0) when CPL > IOPL; interrupts stay inhibited for one more
    /// instruction when IF was clear.
    pub fn sti(&mut self) -> VResult<()> {
        if self.cpl() > self.iopl() {
            return Err(Fault::gp(0));
        }
        if self.eflags & flags::IF == 0 {
            self.int_shadow = true;
        }
        self.eflags |= flags::IF;
        Ok(())
    }

    /// HLT: privileged; the CPU waits for an interrupt.
    pub fn hlt(&mut self) -> VResult<()> {
        self.require_cpl0()?;
        self.halted = true;
        Ok(())
    }

    /// The I/O permission check of IN, OUT, INS and OUTS: allowed when
    /// CPL <= IOPL, else the TSS I/O bitmap decides (SDM Vol. 1 §19.5).
    pub fn check_io(&mut self, port: u16, size: u8) -> VResult<()> {
        if self.cpl() <= self.iopl() {
            return Ok(());
        }
        let tr = self.tr;
        if !tr.usable() || tr.attr & 0xF != 0xB || tr.limit < 0x67 {
            return Err(Fault::gp(0));
        }
        let map_base = self.read_sys(tr.base.wrapping_add(0x66), 2)? as u32;
        let byte = map_base + u32::from(port / 8);
        if byte + 1 > tr.limit {
            return Err(Fault::gp(0));
        }
        let bits = self.read_sys(tr.base.wrapping_add(byte), 2)? as u32;
        let mask = ((1u32 << size) - 1) << (port % 8);
        if bits & mask != 0 {
            return Err(Fault::gp(0));
        }
        Ok(())
    }

    /// IN: read `size` bytes from `port`.
    pub fn port_in(&mut self, port: u16, size: u8) -> VResult<u32> {
        self.check_io(port, size)?;
        let now = self.now_ns();
        Ok(self.board.read(port, size, now))
    }

    /// OUT: write `size` bytes of `value` to `port`.
    pub fn port_out(&mut self, port: u16, size: u8, value: u32) -> VResult<()> {
        self.check_io(port, size)?;
        let now = self.now_ns();
        self.board.write(port, size, value, now);
        if self.board.dma_pending() {
            self.board.service_dma(&mut self.ram);
        }
        Ok(())
    }

    /// LGDT with the 6-byte operand `limit`, `base`. A 16-bit operand size
    /// loads only 24 bits of base.
    pub fn lgdt(&mut self, limit: u16, base: u32, op32: bool) -> VResult<()> {
        self.require_cpl0()?;
        self.gdtr.limit = limit;
        self.gdtr.base = if op32 { base } else { base & 0x00FF_FFFF };
        Ok(())
    }

    /// LIDT, as LGDT.
    pub fn lidt(&mut self, limit: u16, base: u32, op32: bool) -> VResult<()> {
        self.require_cpl0()?;
        self.idtr.limit = limit;
        self.idtr.base = if op32 { base } else { base & 0x00FF_FFFF };
        Ok(())
    }

    /// SGDT: (limit, base). Not privileged: at CPL 3 it reveals the real table.
    pub fn sgdt(&self) -> (u16, u32) {
        (self.gdtr.limit, self.gdtr.base)
    }

    /// SIDT: (limit, base). Not privileged.
    pub fn sidt(&self) -> (u16, u32) {
        (self.idtr.limit, self.idtr.base)
    }

    /// SLDT: the LDTR selector. Not privileged.
    pub fn sldt(&self) -> u16 {
        self.ldtr.selector
    }

    /// STR: the TR selector. Not privileged.
    pub fn str_(&self) -> u16 {
        self.tr.selector
    }

    /// SMSW: CR0 (callers keep the low 16 bits for 16-bit destinations).
    /// Not privileged: it reveals PE, MP, EM, TS at any CPL.
    pub fn smsw(&self) -> u32 {
        self.cr0
    }

    /// LLDT.
    pub fn lldt(&mut self, sel: u16) -> VResult<()> {
        self.require_cpl0()?;
        if is_null(sel) {
            self.ldtr = Segment {
                selector: sel,
                ..Segment::default()
            };
            return Ok(());
        }
        let err = u32::from(sel & 0xFFFC);
        if sel & 4 != 0 {
            return Err(Fault::gp(err));
        }
        let d = self.read_descriptor(sel)?;
        if d.is_segment() || d.system_type() != 2 {
            return Err(Fault::gp(err));
        }
        if !d.present() {
            return Err(Fault::np(err));
        }
        self.ldtr = d.to_segment(sel);
        Ok(())
    }

    /// LTR: load an available TSS and mark it busy.
    pub fn ltr(&mut self, sel: u16) -> VResult<()> {
        self.require_cpl0()?;
        let err = u32::from(sel & 0xFFFC);
        if is_null(sel) {
            return Err(Fault::gp(0));
        }
        if sel & 4 != 0 {
            return Err(Fault::gp(err));
        }
        let d = self.read_descriptor(sel)?;
        if d.is_segment() || !matches!(d.system_type(), 1 | 9) {
            return Err(Fault::gp(err));
        }
        if !d.present() {
            return Err(Fault::np(err));
        }
        let busy = Descriptor(d.0 | (2 << 40));
        if let Some(a) = self.descriptor_addr(sel) {
            self.write_sys(a + 5, 1, (busy.0 >> 40) & 0xFF)?;
        }
        self.tr = busy.to_segment(sel);
        Ok(())
    }

    /// LMSW: loads PE, MP, EM, TS; cannot clear PE.
    pub fn lmsw(&mut self, v: u16) -> VResult<()> {
        self.require_cpl0()?;
        let v = u32::from(v) & 0xF;
        self.cr0 = (self.cr0 & !0xE) | (v & 0xE) | (self.cr0 & cr0::PE) | (v & cr0::PE);
        Ok(())
    }

    /// CLTS: clear CR0.TS.
    pub fn clts(&mut self) -> VResult<()> {
        self.require_cpl0()?;
        self.cr0 &= !cr0::TS;
        Ok(())
    }

    /// MOV CRn, r32.
    pub fn mov_to_cr(&mut self, n: u8, v: u32) -> VResult<()> {
        self.require_cpl0()?;
        match n {
            0 => {
                if v & cr0::PG != 0 && v & cr0::PE == 0 {
                    return Err(Fault::gp(0));
                }
                if v & cr0::NW != 0 && v & cr0::CD == 0 {
                    return Err(Fault::gp(0));
                }
                if v & cr0::PE == 0 {
                    return Err(Fault::unsupported(
                        "MOV CR0 clearing PE (real mode is not modelled)",
                    ));
                }
                self.cr0 = v | cr0::ET;
            }
            2 => self.cr2 = v,
            3 => self.cr3 = v & 0xFFFF_F018,
            4 => {
                if v & !cr4::VALID != 0 {
                    return Err(Fault::gp(0));
                }
                self.cr4 = v;
            }
            _ => return Err(Fault::ud()),
        }
        Ok(())
    }

    /// MOV r32, CRn.
    pub fn mov_from_cr(&self, n: u8) -> VResult<u32> {
        self.require_cpl0()?;
        match n {
            0 => Ok(self.cr0),
            2 => Ok(self.cr2),
            3 => Ok(self.cr3),
            4 => Ok(self.cr4),
            _ => Err(Fault::ud()),
        }
    }

    fn dr_index(&self, n: u8) -> VResult<usize> {
        match n {
            4 | 5 if self.cr4 & cr4::DE != 0 => Err(Fault::ud()),
            4 | 5 => Ok(usize::from(n) + 2),
            0..=7 => Ok(usize::from(n)),
            _ => Err(Fault::ud()),
        }
    }

    /// MOV DRn, r32 (stored; hardware breakpoints are not implemented).
    pub fn mov_to_dr(&mut self, n: u8, v: u32) -> VResult<()> {
        self.require_cpl0()?;
        let i = self.dr_index(n)?;
        self.dr[i] = match i {
            6 => v | 0xFFFF_0FF0,
            7 => (v | 0x400) & !0xD000,
            _ => v,
        };
        Ok(())
    }

    /// MOV r32, DRn.
    pub fn mov_from_dr(&self, n: u8) -> VResult<u32> {
        self.require_cpl0()?;
        Ok(self.dr[self.dr_index(n)?])
    }

    /// INVLPG: no TLB is modelled, so only the privilege check remains.
    pub fn invlpg(&mut self) -> VResult<()> {
        self.require_cpl0()
    }

    /// INVD / WBINVD: no caches are modelled.
    pub fn invd(&mut self) -> VResult<()> {
        self.require_cpl0()
    }

    /// RDMSR: ECX selects the MSR; EDX:EAX receive it.
    pub fn rdmsr(&mut self) -> VResult<()> {
        self.require_cpl0()?;
        let v = match self.regs[reg::ECX] {
            MSR_TSC => self.tsc(),
            // The microcode update signature reads as revision 0 in EDX.
            MSR_BIOS_SIGN_ID => 0,
            _ => return Err(Fault::gp(0)),
        };
        self.regs[reg::EAX] = v as u32;
        self.regs[reg::EDX] = (v >> 32) as u32;
        Ok(())
    }

    /// WRMSR: ECX selects the MSR; EDX:EAX is written.
    pub fn wrmsr(&mut self) -> VResult<()> {
        self.require_cpl0()?;
        let v = (u64::from(self.regs[reg::EDX]) << 32) | u64::from(self.regs[reg::EAX]);
        match self.regs[reg::ECX] {
            MSR_TSC => self.set_tsc(v),
            // Software clears it before CPUID(1) to read the revision the
            // CPU then loads (no microcode here: it stays 0).
            MSR_BIOS_SIGN_ID => {}
            _ => return Err(Fault::gp(0)),
        }
        Ok(())
    }

    /// RDTSC: EDX:EAX = TSC; #GP(0) at CPL > 0 when CR4.TSD is set.
    pub fn rdtsc(&mut self) -> VResult<()> {
        if self.cr4 & cr4::TSD != 0 && self.cpl() != 0 {
            return Err(Fault::gp(0));
        }
        let t = self.tsc();
        self.regs[reg::EAX] = t as u32;
        self.regs[reg::EDX] = (t >> 32) as u32;
        Ok(())
    }

    /// CPUID for a Pentium Pro-class CPU: leaves 0 and 1; higher leaves
    /// return leaf 1's data, as Intel CPUs return the highest basic leaf.
    pub fn cpuid(&mut self) {
        let leaf = self.regs[reg::EAX];
        let (a, b, c, d) = match leaf {
            0 => (
                1,
                u32::from_le_bytes(*b"Genu"),
                u32::from_le_bytes(*b"ntel"),
                u32::from_le_bytes(*b"ineI"),
            ),
            // The hypervisor leaves (reserved by Intel for hypervisors,
            // SDM Vol. 2A "CPUID"): popek's paravirtual interface.
            0x4000_0000 => {
                let s = popek_devices::pv::SIGNATURE;
                let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
                (0x4000_0001, w(0), w(4), w(8))
            }
            0x4000_0001 => (popek_devices::pv::VERSION, 0, 0, 0),
            _ => (CPUID_SIGNATURE, 0, 0, cpuid_edx::ALL),
        };
        self.regs[reg::EAX] = a;
        self.regs[reg::EBX] = b;
        self.regs[reg::ECX] = c;
        self.regs[reg::EDX] = d;
    }

    /// VMCALL: a hypercall to popek at CPL 0 (docs/hypercalls.md); #UD
    /// elsewhere, as on a processor without VMX.
    pub fn vmcall(&mut self) -> VResult<()> {
        if self.cpl() != 0 {
            return Err(Fault::ud());
        }
        let now = self.now_ns();
        self.board.hypercall(&mut self.regs, &mut self.ram, now);
        Ok(())
    }

    /// INT n, INT3 or INTO taken: deliver `vec` as a software interrupt with
    /// `self.eip` already pointing after the instruction.
    pub fn software_interrupt(&mut self, vec: u8) -> VResult<()> {
        self.deliver(vec, None, Source::Software)
    }

    /// Put the CPU into the state QEMU's Multiboot loader leaves it in:
    /// protected mode, flat 4 GiB ring-0 code at `cs` and data at `ds`,
    /// paging off, interrupts off (Multiboot spec §3.2).
    pub fn enter_flat_protected_mode(&mut self, cs: u16, ds: u16) {
        let code = attr::P | attr::S | attr::CODE | attr::RW | attr::ACCESSED | attr::DB | attr::G;
        let data = attr::P | attr::S | attr::RW | attr::ACCESSED | attr::DB | attr::G;
        for s in SegReg::ALL {
            self.segs[s as usize] = Segment::flat(ds, data);
        }
        self.segs[SegReg::Cs as usize] = Segment::flat(cs, code);
        self.cr0 = cr0::PE | cr0::ET;
        self.eflags = flags::FIXED1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use popek_memory::GuestRam;

    fn ring(cpl: u16) -> Vcpu {
        let mut c = Vcpu::new(GuestRam::new(1 << 20).unwrap());
        c.enter_flat_protected_mode(0x08 | cpl, 0x10 | cpl);
        c.regs[reg::ESP] = 0x8000;
        c
    }

    /// The microcode signature MSR takes Linux's write of 0 and reads back
    /// revision 0; other unmodelled MSRs #GP as on a CPU without them.
    #[test]
    fn microcode_signature_msr_reads_revision_zero() {
        let mut c = ring(0);
        c.regs[reg::ECX] = MSR_BIOS_SIGN_ID;
        c.regs[reg::EAX] = 0;
        c.regs[reg::EDX] = 0;
        assert_eq!(c.wrmsr(), Ok(()));
        c.regs[reg::EDX] = 0xFFFF_FFFF;
        assert_eq!(c.rdmsr(), Ok(()));
        assert_eq!((c.regs[reg::EDX], c.regs[reg::EAX]), (0, 0));
        c.regs[reg::ECX] = 0x186;
        assert_eq!(c.rdmsr(), Err(Fault::gp(0)));
    }

    #[test]
    fn popf_at_ring3_silently_keeps_if_and_iopl() {
        let mut c = ring(3);
        c.push(flags::IF | flags::IOPL | flags::CF, 4).unwrap();
        c.popf(true).unwrap();
        assert_eq!(c.eflags & (flags::IF | flags::IOPL), 0);
        assert_eq!(c.eflags & flags::CF, flags::CF);

        let mut c = ring(0);
        c.push(flags::IF | flags::IOPL, 4).unwrap();
        c.popf(true).unwrap();
        assert_eq!(
            c.eflags & (flags::IF | flags::IOPL),
            flags::IF | flags::IOPL
        );
    }

    #[test]
    fn cli_sti_need_iopl_and_hlt_needs_ring0() {
        let mut c = ring(3);
        assert_eq!(c.cli(), Err(Fault::gp(0)));
        assert_eq!(c.hlt(), Err(Fault::gp(0)));
        c.eflags |= flags::IOPL;
        assert!(c.sti().is_ok());
        assert!(c.int_shadow);
        assert_eq!(c.hlt(), Err(Fault::gp(0)));
    }

    #[test]
    fn cr0_rules() {
        let mut c = ring(0);
        assert_eq!(c.mov_to_cr(0, cr0::PG), Err(Fault::gp(0)));
        assert!(matches!(c.mov_to_cr(0, 0), Err(Fault::Unsupported(_))));
        assert_eq!(c.mov_to_cr(4, 1 << 5), Err(Fault::gp(0)));
        assert_eq!(c.mov_to_cr(1, 0), Err(Fault::ud()));
        c.mov_to_cr(0, cr0::PE | cr0::TS).unwrap();
        c.clts().unwrap();
        assert_eq!(c.cr0, cr0::PE | cr0::ET);
    }
}
