//! Memory access: segmentation (Intel SDM Vol. 3 §5.3), then paging
//! (Vol. 3 §4.3, 32-bit paging with optional 4 MiB pages), then RAM.
//!
//! No TLB is modelled: every access walks the page tables. The architecture
//! allows that (a TLB may hold fewer entries than the tables, even none), so
//! guests that forget INVLPG see their new mappings at once, as on a CPU
//! with a tiny TLB.

use crate::state::{attr, cr0, cr4, SegReg};
use crate::{vector, Fault, VResult, Vcpu};

/// Why memory is accessed, for permission checks and #PF error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Fetch,
}

/// What [`Vcpu::probe`] finds for a linear page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// The physical page behind it.
    pub phys_page: u32,
    /// May it be written without a fault or a dirty-bit update?
    pub writable: bool,
    /// The page directory and page table pages the answer came from.
    pub tables: [Option<u32>; 2],
}

/// A run of linear pages a side-effect-free walk found mapped alike
/// ([`Vcpu::probe_run`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeRun {
    /// The first linear page.
    pub first: u32,
    /// The physical page behind it (the others follow it).
    pub phys_first: u32,
    /// How many pages.
    pub count: u32,
    /// May they be written without a fault or a dirty-bit update?
    pub writable: bool,
    /// The page directory and page table pages the answer came from.
    pub tables: [Option<u32>; 2],
}

impl Vcpu {
    /// Translate a linear address to a physical one.
    ///
    /// `user` is true for accesses made at CPL 3 (not for the CPU's own
    /// implicit supervisor accesses to descriptor tables and the TSS).
    pub fn translate(&mut self, lin: u32, access: Access, user: bool) -> VResult<u32> {
        let write = access == Access::Write;
        if access != Access::Fetch && (self.touched.1 as usize) < self.touched.0.len() {
            self.touched.0[self.touched.1 as usize] = (lin, write);
            self.touched.1 += 1;
        }
        if self.cr0 & cr0::PG == 0 {
            return Ok(lin);
        }
        let pf = |cpu: &mut Vcpu, present: bool| -> Fault {
            cpu.fault_cr2 = lin;
            cpu.slow_accesses += 1;
            let code = u32::from(present) | (u32::from(write) << 1) | (u32::from(user) << 2);
            Fault::exc_code(vector::PF, code)
        };
        let pde_addr = (self.cr3 & 0xFFFF_F000) | ((lin >> 22) << 2);
        let pde = self.ram.read(pde_addr, 4) as u32;
        if pde & 1 == 0 {
            return Err(pf(self, false));
        }
        let big = pde & 0x80 != 0 && self.cr4 & cr4::PSE != 0;
        let (pte_addr, pte) = if big {
            (pde_addr, pde)
        } else {
            let a = (pde & 0xFFFF_F000) | (((lin >> 12) & 0x3FF) << 2);
            let e = self.ram.read(a, 4) as u32;
            if e & 1 == 0 {
                return Err(pf(self, false));
            }
            (a, e)
        };
        // Effective rights are the AND of both levels (SDM Vol. 3 §4.6).
        let user_ok = pde & pte & 4 != 0;
        let write_ok = pde & pte & 2 != 0;
        if user && !user_ok {
            return Err(pf(self, true));
        }
        if write && !write_ok && (user || self.cr0 & cr0::WP != 0) {
            return Err(pf(self, true));
        }
        // Accessed and dirty bits.
        if pde & 0x20 == 0 {
            self.slow_accesses += 1;
            self.ram.write_ad(pde_addr, pde | 0x20);
        }
        if !big {
            let want = 0x20 | if write { 0x40 } else { 0 };
            if pte & want != want {
                self.slow_accesses += 1;
                self.ram.write_ad(pte_addr, pte | want);
            }
            Ok((pte & 0xFFFF_F000) | (lin & 0xFFF))
        } else {
            if write && pde & 0x40 == 0 {
                self.slow_accesses += 1;
                let pde = self.ram.read(pde_addr, 4) as u32;
                self.ram.write_ad(pde_addr, pde | 0x40);
            }
            Ok((pde & 0xFFC0_0000) | (lin & 0x003F_FFFF))
        }
    }

    /// Walk the page tables for `lin` without side effects (no fault, no
    /// accessed or dirty bit set), for the translator's shadow window.
    /// None if an access from `user` (or supervisor) mode would fault, or
    /// would have to set the accessed bit first.
    pub fn probe(&self, lin: u32, user: bool) -> Option<Probe> {
        if self.cr0 & cr0::PG == 0 {
            return Some(Probe {
                phys_page: lin >> 12,
                writable: true,
                tables: [None, None],
            });
        }
        let pd = self.cr3 >> 12;
        let pde_addr = (self.cr3 & 0xFFFF_F000) | ((lin >> 22) << 2);
        let pde = self.ram.read(pde_addr, 4) as u32;
        if pde & 0x21 != 0x21 {
            return None;
        }
        let big = pde & 0x80 != 0 && self.cr4 & cr4::PSE != 0;
        let (entry, phys_page, pt) = if big {
            (pde, ((pde & 0xFFC0_0000) | (lin & 0x003F_F000)) >> 12, None)
        } else {
            let a = (pde & 0xFFFF_F000) | (((lin >> 12) & 0x3FF) << 2);
            let e = self.ram.read(a, 4) as u32;
            if e & 0x21 != 0x21 {
                return None;
            }
            (e, e >> 12, Some(a >> 12))
        };
        let (u, w) = (pde & entry & 4 != 0, pde & entry & 2 != 0);
        if user && !u {
            return None;
        }
        let may_write = w || (!user && self.cr0 & cr0::WP == 0);
        Some(Probe {
            phys_page,
            writable: may_write && entry & 0x40 != 0,
            tables: [Some(pd), pt],
        })
    }

    /// As [`Vcpu::probe`], for the run of linear pages around `lin` that
    /// map consecutive physical pages with the same rights, all accessed,
    /// within the aligned group of 16 pages `lin` is in (all 16 for a PSE
    /// mapping). The translator maps such a run into its shadow in one
    /// host call.
    pub fn probe_run(&self, lin: u32, user: bool) -> Option<ProbeRun> {
        let p = self.probe(lin, user)?;
        let page = lin >> 12;
        let one = ProbeRun {
            first: page,
            phys_first: p.phys_page,
            count: 1,
            writable: p.writable,
            tables: p.tables,
        };
        let Some(pt) = p.tables[1] else {
            if self.cr0 & cr0::PG == 0 {
                return Some(one);
            }
            // A 4 MiB page: the group maps consecutive frames with the
            // PDE's rights.
            let first = page & !15;
            return Some(ProbeRun {
                first,
                phys_first: p.phys_page - (page - first),
                count: 16,
                ..one
            });
        };
        let pde = self
            .ram
            .read((self.cr3 & 0xFFFF_F000) | ((lin >> 22) << 2), 4) as u32;
        let entry = |i: u32| self.ram.read((pt << 12) | (i << 2), 4) as u32;
        let idx = page & 0x3FF;
        let same = |i: u32| {
            let e = entry(i);
            if e & 0x21 != 0x21 || e >> 12 != p.phys_page.wrapping_add(i).wrapping_sub(idx) {
                return false;
            }
            let (u, w) = (pde & e & 4 != 0, pde & e & 2 != 0);
            if user && !u {
                return false;
            }
            let may_write = w || (!user && self.cr0 & cr0::WP == 0);
            (may_write && e & 0x40 != 0) == p.writable
        };
        let group = idx & !15;
        let mut lo = idx;
        while lo > group && same(lo - 1) {
            lo -= 1;
        }
        let mut hi = idx + 1;
        while hi < group + 16 && same(hi) {
            hi += 1;
        }
        Some(ProbeRun {
            first: page - (idx - lo),
            phys_first: p.phys_page - (idx - lo),
            count: hi - lo,
            ..one
        })
    }

    /// Read `len` (1..=8) bytes at a physical address: RAM, or a device's
    /// memory-mapped registers (an access up to 4 bytes outside RAM that
    /// a PCI memory BAR decodes), or all ones.
    #[inline]
    fn phys_read(&mut self, p: u32, len: u32) -> u64 {
        if !self.ram.contains(p, len) && len <= 4 {
            self.slow_accesses += 1;
            if let Some(v) = self.board.mmio_read(p, len as u8) {
                return u64::from(v);
            }
        }
        self.ram.read(p, len)
    }

    /// Write `len` (1..=8) bytes at a physical address (see
    /// [`Vcpu::phys_read`]); a device notified through its registers then
    /// does its work on RAM.
    #[inline]
    fn phys_write(&mut self, p: u32, len: u32, v: u64) {
        if !self.ram.contains(p, len) && len <= 4 && self.board.mmio_write(p, len as u8, v as u32) {
            self.slow_accesses += 1;
            if self.board.dma_pending() {
                self.board.service_dma(&mut self.ram);
            }
            return;
        }
        self.ram.write(p, len, v);
    }

    /// A data access to `[lin, lin + len)` hits a debugger's watchpoint:
    /// remember the first.
    #[cold]
    fn check_watch(&mut self, lin: u32, len: u32, write: bool) {
        let end = u64::from(lin) + u64::from(len);
        let hit = self.watchpoints.iter().any(|w| {
            (if write { w.write } else { w.read })
                && u64::from(w.addr) < end
                && u64::from(lin) < u64::from(w.addr) + u64::from(w.len)
        });
        if hit && self.watch_hit.is_none() {
            self.watch_hit = Some((lin, write));
        }
    }

    /// The physical address behind linear address `lin` for a debugger:
    /// a walk of the guest's tables that sets no accessed or dirty bit and
    /// checks no privilege (None: not mapped).
    pub fn debug_phys(&self, lin: u32) -> Option<u32> {
        if self.cr0 & cr0::PG == 0 {
            return Some(lin);
        }
        let pde = self
            .ram
            .read((self.cr3 & 0xFFFF_F000) | ((lin >> 22) << 2), 4) as u32;
        if pde & 1 == 0 {
            return None;
        }
        if pde & 0x80 != 0 && self.cr4 & cr4::PSE != 0 {
            return Some((pde & 0xFFC0_0000) | (lin & 0x003F_FFFF));
        }
        let pte = self
            .ram
            .read((pde & 0xFFFF_F000) | (((lin >> 12) & 0x3FF) << 2), 4) as u32;
        (pte & 1 != 0).then_some((pte & 0xFFFF_F000) | (lin & 0xFFF))
    }

    /// Read `len` (1..=8) bytes at a linear address.
    pub fn read_lin(&mut self, lin: u32, len: u32, access: Access, user: bool) -> VResult<u64> {
        if !self.watchpoints.is_empty() && access == Access::Read {
            self.check_watch(lin, len, false);
        }
        let first_page_left = 0x1000 - (lin & 0xFFF);
        if len <= first_page_left {
            let p = self.translate(lin, access, user)?;
            return Ok(self.phys_read(p, len));
        }
        // Crosses a page: translate both halves before reading.
        let p0 = self.translate(lin, access, user)?;
        let p1 = self.translate(lin.wrapping_add(first_page_left), access, user)?;
        let lo = self.phys_read(p0, first_page_left);
        let hi = self.phys_read(p1, len - first_page_left);
        Ok(lo | (hi << (8 * first_page_left)))
    }

    /// Write `len` (1..=8) bytes at a linear address. Both pages of a
    /// page-crossing write are checked before any byte is written.
    pub fn write_lin(&mut self, lin: u32, len: u32, v: u64, user: bool) -> VResult<()> {
        if !self.watchpoints.is_empty() {
            self.check_watch(lin, len, true);
        }
        let first_page_left = 0x1000 - (lin & 0xFFF);
        if len <= first_page_left {
            let p = self.translate(lin, Access::Write, user)?;
            self.phys_write(p, len, v);
            return Ok(());
        }
        let p0 = self.translate(lin, Access::Write, user)?;
        let p1 = self.translate(lin.wrapping_add(first_page_left), Access::Write, user)?;
        self.phys_write(p0, first_page_left, v);
        self.phys_write(p1, len - first_page_left, v >> (8 * first_page_left));
        Ok(())
    }

    /// Supervisor (implicit) read of the CPU's own structures: GDT, LDT, IDT, TSS.
    pub fn read_sys(&mut self, lin: u32, len: u32) -> VResult<u64> {
        self.read_lin(lin, len, Access::Read, false)
    }

    /// Supervisor (implicit) write of the CPU's own structures.
    pub fn write_sys(&mut self, lin: u32, len: u32, v: u64) -> VResult<()> {
        self.write_lin(lin, len, v, false)
    }

    /// Check a segmented access and return its linear address
    /// (SDM Vol. 3 §5.3 limit checking, §5.4 type checking).
    pub fn seg_check(&self, s: SegReg, off: u32, len: u32, access: Access) -> VResult<u32> {
        let seg = &self.segs[s as usize];
        let fault = || {
            if s == SegReg::Ss {
                Fault::ss(0)
            } else {
                Fault::gp(0)
            }
        };
        if !seg.usable() {
            return Err(fault());
        }
        let a = seg.attr;
        match access {
            Access::Write if a & attr::CODE != 0 || a & attr::RW == 0 => return Err(Fault::gp(0)),
            Access::Read if a & attr::CODE != 0 && a & attr::RW == 0 => return Err(Fault::gp(0)),
            _ => {}
        }
        let last = u64::from(off) + u64::from(len) - 1;
        let ok = if a & attr::CODE == 0 && a & attr::DC != 0 {
            // expand-down: valid offsets are (limit, upper]
            let upper: u64 = if seg.big() { 0xFFFF_FFFF } else { 0xFFFF };
            u64::from(off) > u64::from(seg.limit) && last <= upper
        } else if seg.limit == 0xFFFF_FFFF {
            // flat: accesses wrap at 4 GiB like the hardware's 32-bit adder
            true
        } else {
            last <= u64::from(seg.limit)
        };
        if !ok {
            return Err(fault());
        }
        Ok(seg.base.wrapping_add(off))
    }

    /// Are accesses made at user privilege (CPL 3)?
    #[inline]
    pub fn user(&self) -> bool {
        self.cpl() == 3
    }

    /// Read `len` bytes at `s:off`.
    pub fn read_mem(&mut self, s: SegReg, off: u32, len: u32) -> VResult<u64> {
        let lin = self.seg_check(s, off, len, Access::Read)?;
        let user = self.user();
        self.read_lin(lin, len, Access::Read, user)
    }

    /// Write `len` bytes at `s:off`.
    pub fn write_mem(&mut self, s: SegReg, off: u32, len: u32, v: u64) -> VResult<()> {
        let lin = self.seg_check(s, off, len, Access::Write)?;
        let user = self.user();
        self.write_lin(lin, len, v, user)
    }

    /// Fetch up to `buf.len()` instruction bytes at CS:EIP. Returns how many
    /// bytes were fetched and, if fewer than asked, the fault that stopped
    /// the fetch (raised only if the decoder needs those bytes).
    pub fn fetch(&mut self, eip: u32, buf: &mut [u8]) -> (usize, Option<Fault>) {
        let user = self.user();
        let mut n = 0;
        while n < buf.len() {
            let off = eip.wrapping_add(n as u32);
            let lin = match self.seg_check(SegReg::Cs, off, 1, Access::Fetch) {
                Ok(l) => l,
                Err(e) => return (n, Some(e)),
            };
            let chunk = ((0x1000 - (lin & 0xFFF)) as usize).min(buf.len() - n);
            // Bytes in the same page as `lin` within CS's limit.
            let limit_left = {
                let cs = self.seg(SegReg::Cs);
                if cs.limit == 0xFFFF_FFFF {
                    usize::MAX
                } else {
                    (cs.limit - off) as usize + 1
                }
            };
            let chunk = chunk.min(limit_left);
            let phys = match self.translate(lin, Access::Fetch, user) {
                Ok(p) => p,
                Err(e) => return (n, Some(e)),
            };
            match self
                .ram
                .as_slice()
                .get(phys as usize..phys as usize + chunk)
            {
                Some(src) => buf[n..n + chunk].copy_from_slice(src),
                None => {
                    for i in 0..chunk {
                        buf[n + i] = self.ram.read_u8(phys.wrapping_add(i as u32));
                    }
                }
            }
            n += chunk;
        }
        (n, None)
    }

    /// Mask for the stack pointer: 32 bits if SS is big, else 16.
    #[inline]
    pub fn stack_mask(&self) -> u32 {
        if self.segs[SegReg::Ss as usize].big() {
            0xFFFF_FFFF
        } else {
            0xFFFF
        }
    }

    /// Push `len` (2 or 4) bytes.
    pub fn push(&mut self, v: u32, len: u32) -> VResult<()> {
        let mask = self.stack_mask();
        let esp = self.regs[4];
        let new = (esp & !mask) | (esp.wrapping_sub(len) & mask);
        self.write_mem(SegReg::Ss, new & mask, len, u64::from(v))?;
        self.regs[4] = new;
        Ok(())
    }

    /// Pop `len` (2 or 4) bytes.
    pub fn pop(&mut self, len: u32) -> VResult<u32> {
        let v = self.peek(0, len)?;
        let mask = self.stack_mask();
        let esp = self.regs[4];
        self.regs[4] = (esp & !mask) | (esp.wrapping_add(len) & mask);
        Ok(v)
    }

    /// Read `len` bytes at `SS:(ESP + off)` without popping.
    pub fn peek(&mut self, off: u32, len: u32) -> VResult<u32> {
        let mask = self.stack_mask();
        let a = self.regs[4].wrapping_add(off) & mask;
        Ok(self.read_mem(SegReg::Ss, a, len)? as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Segment;
    use popek_memory::GuestRam;

    fn cpu() -> Vcpu {
        let mut c = Vcpu::new(GuestRam::new(1 << 22).unwrap());
        let data = attr::P | attr::S | attr::RW | attr::DB | attr::G;
        for s in SegReg::ALL {
            c.segs[s as usize] = Segment::flat(0x10, data);
        }
        c.segs[1] = Segment::flat(0x08, attr::P | attr::S | attr::CODE | attr::RW | attr::DB);
        c.cr0 |= cr0::PE;
        c
    }

    #[test]
    fn paging_walk_sets_accessed_dirty_and_faults_with_sdm_error_codes() {
        let mut c = cpu();
        // page directory at 0x1000, one page table at 0x2000
        c.ram.write(0x1000, 4, 0x2000 | 0x7); // P RW US
        c.ram.write(0x2000 + 5 * 4, 4, 0x0030_0000 | 0x5); // P US, read-only
        c.cr3 = 0x1000;
        c.cr0 |= cr0::PG;
        assert_eq!(c.translate(0x5123, Access::Read, true), Ok(0x30_0123));
        assert_eq!(c.ram.read(0x2014, 4) as u32 & 0x60, 0x20);
        // user write to a read-only page: present | write | user = 7
        assert_eq!(
            c.translate(0x5000, Access::Write, true),
            Err(Fault::exc_code(vector::PF, 7))
        );
        // (CR2 is loaded when the #PF is raised, not by the lookup.)
        assert_eq!((c.fault_cr2, c.cr2), (0x5000, 0));
        // supervisor write is allowed without CR0.WP, and marks the page dirty
        assert!(c.translate(0x5000, Access::Write, false).is_ok());
        assert_eq!(c.ram.read(0x2014, 4) as u32 & 0x40, 0x40);
        c.cr0 |= cr0::WP;
        assert!(c.translate(0x5000, Access::Write, false).is_err());
        // not present: error code bit 0 clear
        assert_eq!(
            c.translate(0x6000, Access::Read, false),
            Err(Fault::exc_code(vector::PF, 0))
        );
    }

    /// CR2 takes the address of the access whose #PF is raised; a lookup
    /// that faults but is never raised (the translator reading ahead)
    /// leaves it alone.
    #[test]
    fn cr2_is_loaded_when_the_page_fault_is_raised() {
        let mut c = cpu();
        // The low 4 MiB identity-mapped by one large page, nothing else.
        c.ram.write(0x1000, 4, 0x83);
        c.cr4 |= cr4::PSE;
        c.cr3 = 0x1000;
        c.cr0 |= cr0::PG;
        // IDT at 0x3000: vector 14 an interrupt gate to 0x08:0x8000.
        c.ram.write(0x3000 + 14 * 8, 4, (0x08 << 16) | 0x8000);
        c.ram.write(0x3000 + 14 * 8 + 4, 4, 0x8E00);
        c.idtr = crate::state::TableReg {
            base: 0x3000,
            limit: 0x7FF,
        };
        // GDT at 0x4000: 0x08 flat ring-0 code.
        c.ram.write(0x4008, 4, 0x0000_FFFF);
        c.ram.write(0x400C, 4, 0x00CF_9A00);
        c.gdtr = crate::state::TableReg {
            base: 0x4000,
            limit: 0x17,
        };
        c.regs[4] = 0x9000;
        c.eip = 0x100;
        assert!(c.translate(0x50_0000, Access::Read, false).is_err());
        assert_eq!(c.cr2, 0, "a lookup alone");
        let Err(Fault::Exception(e)) = c.translate(0x60_1234, Access::Write, false) else {
            panic!("not mapped");
        };
        c.raise(e, crate::interrupt::Source::Exception).unwrap();
        assert_eq!((c.cr2, c.eip), (0x60_1234, 0x8000));
        // INT 14 is not a page fault: CR2 stays.
        c.fault_cr2 = 0x1111;
        c.eip = 0x100;
        c.software_interrupt(14).unwrap();
        assert_eq!((c.cr2, c.eip), (0x60_1234, 0x8000));
    }

    #[test]
    fn segment_limits_and_expand_down() {
        let mut c = cpu();
        c.segs[SegReg::Ds as usize] = Segment {
            selector: 0x18,
            base: 0x1000,
            limit: 0xFF,
            attr: attr::P | attr::S | attr::RW | attr::DB,
        };
        assert_eq!(c.seg_check(SegReg::Ds, 0xFC, 4, Access::Read), Ok(0x10FC));
        assert_eq!(
            c.seg_check(SegReg::Ds, 0xFD, 4, Access::Read),
            Err(Fault::gp(0))
        );
        c.segs[SegReg::Ss as usize] = Segment {
            selector: 0x20,
            base: 0,
            limit: 0xFFF,
            attr: attr::P | attr::S | attr::RW | attr::DC | attr::DB,
        };
        assert!(c.seg_check(SegReg::Ss, 0x1000, 4, Access::Write).is_ok());
        assert_eq!(
            c.seg_check(SegReg::Ss, 0xFFF, 4, Access::Write),
            Err(Fault::ss(0))
        );
    }

    #[test]
    fn push_pop_wrap_in_16_bit_stack() {
        let mut c = cpu();
        c.segs[SegReg::Ss as usize].attr &= !attr::DB;
        c.regs[4] = 0xABCD_0002;
        c.push(0x1122_3344, 4).unwrap();
        assert_eq!(c.regs[4], 0xABCD_FFFE);
        assert_eq!(c.pop(4).unwrap(), 0x1122_3344);
        assert_eq!(c.regs[4], 0xABCD_0002);
    }
}
