//! Descriptor tables and segment-register loads
//! (Intel SDM Vol. 3 §3.4–3.5, §5.5–5.8; MOV/POP Sreg and LDS/LES pseudocode
//! in Vol. 2).

use crate::state::{attr, SegReg, Segment};
use crate::{Fault, VResult, Vcpu};

/// A raw 8-byte segment or gate descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor(pub u64);

impl Descriptor {
    /// Attribute bits 40..=55 (access byte and flags nibble).
    pub fn attr(self) -> u16 {
        ((self.0 >> 40) & 0xF0FF) as u16
    }
    /// Linear base address.
    pub fn base(self) -> u32 {
        (((self.0 >> 16) & 0xFF_FFFF) | ((self.0 >> 32) & 0xFF00_0000)) as u32
    }
    /// Limit in bytes, granularity applied.
    pub fn limit(self) -> u32 {
        let raw = ((self.0 & 0xFFFF) | ((self.0 >> 32) & 0xF_0000)) as u32;
        if self.attr() & attr::G != 0 {
            (raw << 12) | 0xFFF
        } else {
            raw
        }
    }
    /// Present bit.
    pub fn present(self) -> bool {
        self.attr() & attr::P != 0
    }
    /// Descriptor privilege level.
    pub fn dpl(self) -> u8 {
        ((self.attr() >> 5) & 3) as u8
    }
    /// Code or data (S = 1) rather than a system descriptor.
    pub fn is_segment(self) -> bool {
        self.attr() & attr::S != 0
    }
    /// Code segment.
    pub fn is_code(self) -> bool {
        self.is_segment() && self.attr() & attr::CODE != 0
    }
    /// Data segment.
    pub fn is_data(self) -> bool {
        self.is_segment() && self.attr() & attr::CODE == 0
    }
    /// Conforming code segment.
    pub fn conforming(self) -> bool {
        self.is_code() && self.attr() & attr::DC != 0
    }
    /// Readable code or writable data.
    pub fn rw(self) -> bool {
        self.attr() & attr::RW != 0
    }
    /// System descriptor type (0..=15).
    pub fn system_type(self) -> u8 {
        (self.attr() & 0xF) as u8
    }
    /// Gate: target selector.
    pub fn gate_selector(self) -> u16 {
        (self.0 >> 16) as u16
    }
    /// Gate: target offset.
    pub fn gate_offset(self) -> u32 {
        ((self.0 & 0xFFFF) | ((self.0 >> 32) & 0xFFFF_0000)) as u32
    }
    /// The segment cache this descriptor loads for `selector`.
    pub fn to_segment(self, selector: u16) -> Segment {
        Segment {
            selector,
            base: self.base(),
            limit: self.limit(),
            attr: self.attr(),
        }
    }
}

/// Is `sel` a null selector (index 0 in the GDT)?
pub fn is_null(sel: u16) -> bool {
    sel & 0xFFFC == 0
}

impl Vcpu {
    /// Linear address of the descriptor for `sel`, or None if it lies
    /// outside the GDT/LDT limit.
    pub fn descriptor_addr(&self, sel: u16) -> Option<u32> {
        let idx = u32::from(sel & 0xFFF8);
        let (base, limit) = if sel & 4 != 0 {
            if !self.ldtr.usable() {
                return None;
            }
            (self.ldtr.base, self.ldtr.limit)
        } else {
            (self.gdtr.base, u32::from(self.gdtr.limit))
        };
        if idx + 7 > limit {
            return None;
        }
        Some(base.wrapping_add(idx))
    }

    /// Read the descriptor for `sel`; #GP(selector) if outside the table.
    pub fn read_descriptor(&mut self, sel: u16) -> VResult<Descriptor> {
        match self.descriptor_addr(sel) {
            Some(a) => Ok(Descriptor(self.read_sys(a, 8)?)),
            None => Err(Fault::gp(u32::from(sel & 0xFFFC))),
        }
    }

    /// Set the accessed bit of a code/data descriptor, as the CPU does on load.
    pub fn mark_accessed(&mut self, sel: u16, d: Descriptor) -> VResult<()> {
        if d.is_segment() && d.attr() & attr::ACCESSED == 0 {
            if let Some(a) = self.descriptor_addr(sel) {
                self.write_sys(a + 5, 1, (d.0 >> 40) | 1)?;
            }
        }
        Ok(())
    }

    /// Load a data or stack segment register with the checks of MOV Sreg,
    /// POP Sreg and LDS/LES/LFS/LGS/LSS in protected mode.
    /// Loading CS goes through far transfers instead.
    pub fn load_seg(&mut self, s: SegReg, sel: u16) -> VResult<()> {
        let cpl = self.cpl();
        let rpl = (sel & 3) as u8;
        let err = u32::from(sel & 0xFFFC);
        if s == SegReg::Cs {
            return Err(Fault::ud());
        }
        if is_null(sel) {
            if s == SegReg::Ss {
                return Err(Fault::gp(0));
            }
            self.segs[s as usize] = Segment {
                selector: sel,
                ..Segment::default()
            };
            return Ok(());
        }
        let d = self.read_descriptor(sel)?;
        if s == SegReg::Ss {
            if rpl != cpl || !d.is_data() || !d.rw() || d.dpl() != cpl {
                return Err(Fault::gp(err));
            }
            if !d.present() {
                return Err(Fault::ss(err));
            }
        } else {
            let readable = d.is_data() || (d.is_code() && d.rw());
            if !readable {
                return Err(Fault::gp(err));
            }
            if (d.is_data() || !d.conforming()) && (rpl > d.dpl() || cpl > d.dpl()) {
                return Err(Fault::gp(err));
            }
            if !d.present() {
                return Err(Fault::np(err));
            }
        }
        self.mark_accessed(sel, d)?;
        self.segs[s as usize] = Descriptor(d.0 | (1 << 40)).to_segment(sel);
        Ok(())
    }

    /// After a return to an outer privilege level, data segment registers
    /// whose DPL is below the new CPL become null (SDM RET/IRET pseudocode).
    pub fn invalidate_outer_segments(&mut self) {
        let cpl = self.cpl();
        for s in [SegReg::Es, SegReg::Ds, SegReg::Fs, SegReg::Gs] {
            let seg = self.segs[s as usize];
            let conforming_code = seg.is_code() && seg.attr & attr::DC != 0;
            if seg.usable() && !conforming_code && seg.dpl() < cpl {
                self.segs[s as usize] = Segment {
                    selector: 0,
                    ..Segment::default()
                };
            }
        }
    }

    /// Can a descriptor be seen by LAR/LSL/VERR/VERW at the current CPL
    /// with this selector's RPL? Conforming code segments are always visible.
    fn visible(&self, sel: u16, d: Descriptor) -> bool {
        if d.conforming() {
            return true;
        }
        let cpl = self.cpl();
        let rpl = (sel & 3) as u8;
        d.dpl() >= cpl && d.dpl() >= rpl
    }

    /// LAR: the access rights of `sel` (descriptor bits 32..=63 masked with
    /// 0x00F0FF00), or None (ZF = 0) if the selector is not valid for LAR.
    pub fn lar(&mut self, sel: u16) -> VResult<Option<u32>> {
        let Some(d) = self.lookup_for_query(sel)? else {
            return Ok(None);
        };
        let ok_system = matches!(d.system_type(), 1 | 2 | 3 | 4 | 5 | 9 | 11 | 12);
        if (!d.is_segment() && !ok_system) || !self.visible(sel, d) {
            return Ok(None);
        }
        Ok(Some(((d.0 >> 32) as u32) & 0x00F0_FF00))
    }

    /// LSL: the byte-granular limit of `sel`, or None (ZF = 0).
    pub fn lsl(&mut self, sel: u16) -> VResult<Option<u32>> {
        let Some(d) = self.lookup_for_query(sel)? else {
            return Ok(None);
        };
        let ok_system = matches!(d.system_type(), 1 | 2 | 3 | 9 | 11);
        if (!d.is_segment() && !ok_system) || !self.visible(sel, d) {
            return Ok(None);
        }
        Ok(Some(d.limit()))
    }

    /// VERR (`write` = false) or VERW (`write` = true): ZF result.
    pub fn verify(&mut self, sel: u16, write: bool) -> VResult<bool> {
        let Some(d) = self.lookup_for_query(sel)? else {
            return Ok(false);
        };
        if !d.is_segment() || !self.visible(sel, d) {
            return Ok(false);
        }
        Ok(if write {
            d.is_data() && d.rw()
        } else {
            d.is_data() || d.rw()
        })
    }

    fn lookup_for_query(&mut self, sel: u16) -> VResult<Option<Descriptor>> {
        if is_null(sel) {
            return Ok(None);
        }
        match self.descriptor_addr(sel) {
            Some(a) => Ok(Some(Descriptor(self.read_sys(a, 8)?))),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_fields_decode_like_the_sdm_figure() {
        // flat 4 GiB ring-0 code: base 0, limit 0xFFFFF, G, D, P, DPL 0, type A
        let d = Descriptor(0x00CF_9A00_0000_FFFF);
        assert_eq!(d.base(), 0);
        assert_eq!(d.limit(), 0xFFFF_FFFF);
        assert!(d.is_code() && d.present() && d.rw() && !d.conforming());
        assert_eq!(d.dpl(), 0);
        // base 0x12345678, limit 0x0ABCD byte granular, ring-3 data
        let d = Descriptor(0x1240_F234_5678_ABCD);
        assert_eq!(d.base(), 0x1234_5678);
        assert_eq!(d.limit(), 0xABCD);
        assert!(d.is_data());
        assert_eq!(d.dpl(), 3);
    }
}
