//! Exception and interrupt delivery through the guest IDT, IRET, and far
//! control transfers (Intel SDM Vol. 3 §6.12–6.15; INT n, IRET, CALL, JMP
//! and RET pseudocode in Vol. 2).
//!
//! Every transfer is computed fully (descriptors checked, new stack
//! located) before registers change, so a fault part-way leaves the
//! registers as they were and the faulting instruction can restart.

use crate::desc::{is_null, Descriptor};
use crate::state::{flags, reg, SegReg, Segment};
use crate::{vector, Exception, Fault, Stop, VResult, Vcpu};

/// Where an interrupt comes from; it decides the DPL check, the EXT bit of
/// error codes and which EIP is saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// INT n, INT3, INTO: gate DPL is checked against CPL.
    Software,
    /// A CPU exception.
    Exception,
    /// A device interrupt (EXT = 1 in error codes).
    External,
}

/// Exception classes for the double-fault rules (SDM Vol. 3 Table 6-5).
fn contributory(v: u8) -> bool {
    matches!(v, 0 | 10 | 11 | 12 | 13)
}

/// Writes to a stack that is not the live one yet: the pushes of an
/// interrupt or far call, committed only when all of them succeeded.
struct StackFrame {
    seg: Segment,
    esp: u32,
}

impl StackFrame {
    fn push(&mut self, cpu: &mut Vcpu, v: u32, len: u32, err_sel: Option<u32>) -> VResult<()> {
        let mask = if self.seg.big() { u32::MAX } else { 0xFFFF };
        let new = (self.esp & !mask) | (self.esp.wrapping_sub(len) & mask);
        let off = new & mask;
        // Stack-limit and type checks against the (possibly new) SS cache.
        let saved = cpu.segs[SegReg::Ss as usize];
        cpu.segs[SegReg::Ss as usize] = self.seg;
        let lin = cpu.seg_check(SegReg::Ss, off, len, crate::mmu::Access::Write);
        cpu.segs[SegReg::Ss as usize] = saved;
        let lin = match (lin, err_sel) {
            (Ok(l), _) => l,
            (Err(_), Some(sel)) => return Err(Fault::ss(sel)),
            (Err(e), None) => return Err(e),
        };
        let user = self.seg.selector & 3 == 3;
        cpu.write_lin(lin, len, u64::from(v), user)?;
        self.esp = new;
        Ok(())
    }
}

impl Vcpu {
    /// Deliver interrupt `vec` through the IDT. On success CS:EIP is the
    /// handler and the frame is on the handler's stack. `self.eip` must
    /// already be the return address the frame should hold.
    pub fn deliver(&mut self, vec: u8, error: Option<u32>, src: Source) -> VResult<()> {
        let ext = u32::from(src == Source::External);
        let idt_err = u32::from(vec) * 8 + 2 + ext;
        let off = u32::from(vec) * 8;
        if off + 7 > u32::from(self.idtr.limit) {
            return Err(Fault::gp(idt_err));
        }
        let gate = Descriptor(self.read_sys(self.idtr.base.wrapping_add(off), 8)?);
        let gtype = gate.system_type();
        let gate32 = match gtype {
            0xE | 0xF => true,
            0x6 | 0x7 => false,
            0x5 => {
                return Err(Fault::unsupported(format!(
                    "task gate in IDT vector {vec:#x} (hardware task switching)"
                )))
            }
            _ => return Err(Fault::gp(idt_err)),
        };
        if gate.is_segment() {
            return Err(Fault::gp(idt_err));
        }
        let cpl = self.cpl();
        if src == Source::Software && gate.dpl() < cpl {
            return Err(Fault::gp(idt_err));
        }
        if !gate.present() {
            return Err(Fault::np(idt_err));
        }
        let sel = gate.gate_selector();
        if is_null(sel) {
            return Err(Fault::gp(ext));
        }
        let sel_err = u32::from(sel & 0xFFFC) + ext;
        let cd = match self.descriptor_addr(sel) {
            Some(a) => Descriptor(self.read_sys(a, 8)?),
            None => return Err(Fault::gp(sel_err)),
        };
        if !cd.is_code() || cd.dpl() > cpl {
            return Err(Fault::gp(sel_err));
        }
        if !cd.present() {
            return Err(Fault::np(sel_err));
        }
        let offset = if gate32 {
            gate.gate_offset()
        } else {
            gate.gate_offset() & 0xFFFF
        };
        let new_cpl = if cd.conforming() { cpl } else { cd.dpl() };
        let len = if gate32 { 4 } else { 2 };
        let old_cs = self.segs[SegReg::Cs as usize].selector;
        let old_ss = self.segs[SegReg::Ss as usize];
        let old_esp = self.regs[reg::ESP];
        let image = self.eflags & !flags::RF;

        let mut frame;
        let mut new_ss = None;
        if new_cpl < cpl {
            // Inter-privilege: the new stack comes from the TSS.
            let (ss_sel, esp) = self.tss_stack(new_cpl, ext)?;
            let ssd = self.load_stack_for_cpl(ss_sel, new_cpl, ext)?;
            frame = StackFrame {
                seg: ssd.to_segment(ss_sel),
                esp,
            };
            let e = Some(u32::from(ss_sel & 0xFFFC) + ext);
            frame.push(self, u32::from(old_ss.selector), len, e)?;
            frame.push(self, old_esp, len, e)?;
            new_ss = Some((ss_sel, ssd));
        } else {
            frame = StackFrame {
                seg: old_ss,
                esp: old_esp,
            };
        }
        let e = new_ss.map(|(s, _)| u32::from(s & 0xFFFC) + ext);
        frame.push(self, image, len, e)?;
        frame.push(self, u32::from(old_cs), len, e)?;
        frame.push(self, self.eip, len, e)?;
        if let Some(code) = error {
            frame.push(self, code, len, e)?;
        }
        if offset > cd.limit() {
            return Err(Fault::gp(ext));
        }
        // Commit.
        self.mark_accessed(sel, cd)?;
        let new_cs = (sel & !3) | u16::from(new_cpl);
        self.segs[SegReg::Cs as usize] = Descriptor(cd.0 | (1 << 40)).to_segment(new_cs);
        if let Some((ss_sel, ssd)) = new_ss {
            self.segs[SegReg::Ss as usize] = Descriptor(ssd.0 | (1 << 40)).to_segment(ss_sel);
        }
        self.regs[reg::ESP] = frame.esp;
        self.eip = offset;
        self.eflags &= !(flags::TF | flags::NT | flags::RF | flags::VM);
        if gtype & 1 == 0 {
            self.eflags &= !flags::IF;
        }
        self.halted = false;
        Ok(())
    }

    /// SS:ESP for privilege level `pl` from the current TSS.
    fn tss_stack(&mut self, pl: u8, ext: u32) -> VResult<(u16, u32)> {
        let tr = self.tr;
        if !tr.usable() {
            return Err(Fault::ts(u32::from(tr.selector & 0xFFFC) + ext));
        }
        let tss32 = tr.attr & 8 != 0;
        let pl = u32::from(pl);
        if tss32 {
            let off = 4 + pl * 8;
            if off + 5 > tr.limit {
                return Err(Fault::ts(u32::from(tr.selector & 0xFFFC) + ext));
            }
            let esp = self.read_sys(tr.base.wrapping_add(off), 4)? as u32;
            let ss = self.read_sys(tr.base.wrapping_add(off + 4), 2)? as u16;
            Ok((ss, esp))
        } else {
            let off = 2 + pl * 4;
            if off + 3 > tr.limit {
                return Err(Fault::ts(u32::from(tr.selector & 0xFFFC) + ext));
            }
            let sp = self.read_sys(tr.base.wrapping_add(off), 2)? as u32;
            let ss = self.read_sys(tr.base.wrapping_add(off + 2), 2)? as u16;
            Ok((ss, sp))
        }
    }

    /// Check a stack segment taken from the TSS for privilege `pl`.
    fn load_stack_for_cpl(&mut self, ss: u16, pl: u8, ext: u32) -> VResult<Descriptor> {
        let err = u32::from(ss & 0xFFFC) + ext;
        if is_null(ss) {
            return Err(Fault::ts(ext));
        }
        let d = match self.descriptor_addr(ss) {
            Some(a) => Descriptor(self.read_sys(a, 8)?),
            None => return Err(Fault::ts(err)),
        };
        if (ss & 3) as u8 != pl || d.dpl() != pl || !d.is_data() || !d.rw() {
            return Err(Fault::ts(err));
        }
        if !d.present() {
            return Err(Fault::ss(err));
        }
        Ok(d)
    }

    /// Raise a CPU exception: deliver it, applying the double-fault rules
    /// (SDM Vol. 3 §6.15, interrupt 8). `fault_eip` is the EIP to report.
    /// Returns a [`Stop`] on triple fault or unsupported delivery.
    pub fn raise(&mut self, exc: Exception, src: Source) -> Result<(), Stop> {
        let start_eip = self.eip;
        let mut cur = exc;
        let mut cur_src = src;
        // A page fault loads CR2 with its linear address as it is raised
        // (SDM Vol. 3 §6.15, interrupt 14), a nested one too.
        if cur.vector == vector::PF && src == Source::Exception {
            self.cr2 = self.fault_cr2;
        }
        for _ in 0..4 {
            match self.deliver(cur.vector, cur.error, cur_src) {
                Ok(()) => {
                    if cur.vector == crate::vector::PF && cur_src != Source::External {
                        self.page_faults += 1;
                    }
                    return Ok(());
                }
                Err(Fault::Unsupported(what)) => {
                    return Err(Stop::Unsupported {
                        what,
                        eip: start_eip,
                    })
                }
                Err(Fault::Exception(second)) => {
                    if second.vector == vector::PF {
                        self.cr2 = self.fault_cr2;
                    }
                    if cur.vector == vector::DF {
                        return Err(Stop::TripleFault {
                            last: second,
                            eip: start_eip,
                        });
                    }
                    let first_pf = cur.vector == vector::PF;
                    let df = (contributory(cur.vector) || first_pf)
                        && (contributory(second.vector)
                            || (first_pf && second.vector == vector::PF))
                        || (first_pf && contributory(second.vector));
                    cur = if df {
                        Exception {
                            vector: vector::DF,
                            error: Some(0),
                        }
                    } else {
                        second
                    };
                    cur_src = Source::Exception;
                }
            }
        }
        Err(Stop::TripleFault {
            last: cur,
            eip: start_eip,
        })
    }

    /// IRET / IRETD in protected mode without NT (SDM Vol. 2 IRET).
    pub fn iret(&mut self, op32: bool) -> VResult<()> {
        if self.eflags & flags::NT != 0 {
            return Err(Fault::unsupported("IRET with NT set (task return)"));
        }
        let len = if op32 { 4 } else { 2 };
        let new_eip = self.peek(0, len)?;
        let cs_sel = self.peek(len, len)? as u16;
        let new_flags = self.peek(2 * len, len)?;
        if op32 && new_flags & flags::VM != 0 && self.cpl() == 0 {
            return Err(Fault::unsupported("IRET to virtual-8086 mode"));
        }
        let cpl = self.cpl();
        let rpl = (cs_sel & 3) as u8;
        let cd = self.check_return_cs(cs_sel)?;
        let cs_limit = cd.limit();
        let mut esp_after = 3 * len;
        let outer = rpl > cpl;
        let mut new_ss = None;
        if outer {
            let esp = self.peek(3 * len, len)?;
            let ss_sel = self.peek(4 * len, len)? as u16;
            let ssd = self.check_return_ss(ss_sel, rpl)?;
            new_ss = Some((ss_sel, ssd, esp));
            esp_after = 5 * len;
        }
        if new_eip > cs_limit {
            return Err(Fault::gp(0));
        }
        // Commit.
        self.mark_accessed(cs_sel, cd)?;
        self.segs[SegReg::Cs as usize] = Descriptor(cd.0 | (1 << 40)).to_segment(cs_sel);
        self.eip = if op32 { new_eip } else { new_eip & 0xFFFF };
        self.write_flags(new_flags, if op32 { u32::MAX } else { 0xFFFF }, cpl);
        if let Some((ss_sel, ssd, esp)) = new_ss {
            self.mark_accessed(ss_sel, ssd)?;
            self.segs[SegReg::Ss as usize] = Descriptor(ssd.0 | (1 << 40)).to_segment(ss_sel);
            self.regs[reg::ESP] = if ssd.attr() & crate::state::attr::DB != 0 {
                esp
            } else {
                (self.regs[reg::ESP] & 0xFFFF_0000) | (esp & 0xFFFF)
            };
            self.invalidate_outer_segments();
        } else {
            let mask = self.stack_mask();
            let esp = self.regs[reg::ESP];
            self.regs[reg::ESP] = (esp & !mask) | (esp.wrapping_add(esp_after) & mask);
        }
        Ok(())
    }

    /// Update EFLAGS from a POPF/IRET image under the privilege rules:
    /// IOPL changes only at CPL 0, IF only when CPL <= IOPL (SDM POPF).
    /// `cpl` is the privilege level *before* the instruction.
    pub fn write_flags(&mut self, image: u32, size_mask: u32, cpl: u8) {
        let mut writable = flags::WRITABLE & size_mask;
        if cpl > 0 {
            writable &= !flags::IOPL;
        }
        if cpl > self.iopl() {
            writable &= !flags::IF;
        }
        self.eflags = (self.eflags & !writable) | (image & writable) | flags::FIXED1;
        self.eflags &= !flags::RF;
    }

    /// Checks on the CS selector of a far RET or IRET.
    fn check_return_cs(&mut self, sel: u16) -> VResult<Descriptor> {
        let err = u32::from(sel & 0xFFFC);
        if is_null(sel) {
            return Err(Fault::gp(0));
        }
        let d = self.read_descriptor(sel)?;
        let rpl = (sel & 3) as u8;
        if !d.is_code() || rpl < self.cpl() {
            return Err(Fault::gp(err));
        }
        if d.conforming() && d.dpl() > rpl || !d.conforming() && d.dpl() != rpl {
            return Err(Fault::gp(err));
        }
        if !d.present() {
            return Err(Fault::np(err));
        }
        Ok(d)
    }

    /// Checks on the SS selector popped when returning to privilege `rpl`.
    fn check_return_ss(&mut self, sel: u16, rpl: u8) -> VResult<Descriptor> {
        let err = u32::from(sel & 0xFFFC);
        if is_null(sel) {
            return Err(Fault::gp(0));
        }
        let d = self.read_descriptor(sel)?;
        if (sel & 3) as u8 != rpl || !d.is_data() || !d.rw() || d.dpl() != rpl {
            return Err(Fault::gp(err));
        }
        if !d.present() {
            return Err(Fault::ss(err));
        }
        Ok(d)
    }

    /// Checks on the target of a far JMP or CALL to a code segment
    /// (call gates and task switches are not modelled).
    fn check_far_target(&mut self, sel: u16, offset: u32) -> VResult<Descriptor> {
        let err = u32::from(sel & 0xFFFC);
        if is_null(sel) {
            return Err(Fault::gp(0));
        }
        let d = self.read_descriptor(sel)?;
        let cpl = self.cpl();
        if !d.is_segment() {
            return Err(match d.system_type() {
                4 | 0xC => Fault::unsupported("far transfer through a call gate"),
                1 | 5 | 9 => Fault::unsupported("far transfer to a TSS or task gate"),
                _ => Fault::gp(err),
            });
        }
        if !d.is_code() {
            return Err(Fault::gp(err));
        }
        let rpl = (sel & 3) as u8;
        if d.conforming() {
            if d.dpl() > cpl {
                return Err(Fault::gp(err));
            }
        } else if rpl > cpl || d.dpl() != cpl {
            return Err(Fault::gp(err));
        }
        if !d.present() {
            return Err(Fault::np(err));
        }
        if offset > d.limit() {
            return Err(Fault::gp(0));
        }
        Ok(d)
    }

    fn set_cs_same_privilege(&mut self, sel: u16, d: Descriptor) -> VResult<()> {
        self.mark_accessed(sel, d)?;
        let cs = (sel & !3) | u16::from(self.cpl());
        self.segs[SegReg::Cs as usize] = Descriptor(d.0 | (1 << 40)).to_segment(cs);
        Ok(())
    }

    /// Far JMP to `sel:offset`.
    pub fn far_jmp(&mut self, sel: u16, offset: u32, op32: bool) -> VResult<()> {
        let offset = if op32 { offset } else { offset & 0xFFFF };
        let d = self.check_far_target(sel, offset)?;
        self.set_cs_same_privilege(sel, d)?;
        self.eip = offset;
        Ok(())
    }

    /// Far CALL to `sel:offset`; `ret_eip` is the return address.
    pub fn far_call(&mut self, sel: u16, offset: u32, op32: bool, ret_eip: u32) -> VResult<()> {
        let offset = if op32 { offset } else { offset & 0xFFFF };
        let d = self.check_far_target(sel, offset)?;
        let len = if op32 { 4 } else { 2 };
        let old_cs = u32::from(self.segs[SegReg::Cs as usize].selector);
        let mut frame = StackFrame {
            seg: self.segs[SegReg::Ss as usize],
            esp: self.regs[reg::ESP],
        };
        frame.push(self, old_cs, len, None)?;
        frame.push(self, ret_eip, len, None)?;
        self.set_cs_same_privilege(sel, d)?;
        self.regs[reg::ESP] = frame.esp;
        self.eip = offset;
        Ok(())
    }

    /// Far RET, popping `imm` extra bytes of parameters.
    pub fn far_ret(&mut self, op32: bool, imm: u16) -> VResult<()> {
        let len = if op32 { 4 } else { 2 };
        let new_eip = self.peek(0, len)?;
        let cs_sel = self.peek(len, len)? as u16;
        let cd = self.check_return_cs(cs_sel)?;
        let rpl = (cs_sel & 3) as u8;
        let imm = u32::from(imm);
        let outer = rpl > self.cpl();
        let mut new_ss = None;
        if outer {
            let esp = self.peek(2 * len + imm, len)?;
            let ss_sel = self.peek(3 * len + imm, len)? as u16;
            let ssd = self.check_return_ss(ss_sel, rpl)?;
            new_ss = Some((ss_sel, ssd, esp));
        }
        if new_eip > cd.limit() {
            return Err(Fault::gp(0));
        }
        self.mark_accessed(cs_sel, cd)?;
        self.segs[SegReg::Cs as usize] = Descriptor(cd.0 | (1 << 40)).to_segment(cs_sel);
        self.eip = if op32 { new_eip } else { new_eip & 0xFFFF };
        if let Some((ss_sel, ssd, esp)) = new_ss {
            self.mark_accessed(ss_sel, ssd)?;
            self.segs[SegReg::Ss as usize] = Descriptor(ssd.0 | (1 << 40)).to_segment(ss_sel);
            let mask = self.stack_mask();
            self.regs[reg::ESP] = (esp & mask).wrapping_add(imm) & mask | (esp & !mask);
            self.invalidate_outer_segments();
        } else {
            let mask = self.stack_mask();
            let esp = self.regs[reg::ESP];
            self.regs[reg::ESP] = (esp & !mask) | (esp.wrapping_add(2 * len + imm) & mask);
        }
        Ok(())
    }
}
