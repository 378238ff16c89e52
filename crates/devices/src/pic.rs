//! The 8259A programmable interrupt controller, as a master/slave pair on
//! the PC (Intel 8259A data sheet, order number 231468: "Programming the
//! 8259A", ICW1-ICW4 and OCW1-OCW3; "Interrupt sequence"; "Priority
//! modes").
//!
//! Modelled: the initialization sequence (ICW1-ICW4, single or cascaded,
//! with or without ICW4), the interrupt mask (OCW1), non-specific and
//! specific EOI, rotation on EOI and automatic rotation, set priority
//! (OCW2), reading IRR or ISR and the poll command (OCW3), special mask mode,
//! automatic EOI, edge- and level-triggered requests, fully nested
//! priority and the spurious IR7 when a request went away before the
//! acknowledge. The slave's INT output drives the master's IR2.
//! Not modelled: 8080/8085 mode and buffered mode (no effect on a PC),
//! special fully nested mode (accepted, treated as fully nested).

/// One 8259A: everything a snapshot needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pic8259 {
    /// Interrupt request register.
    pub irr: u8,
    /// In-service register.
    pub isr: u8,
    /// Interrupt mask register (OCW1).
    pub imr: u8,
    /// The IR input lines as the devices drive them (for edge detection).
    pub lines: u8,
    /// ICW2: the vector of IR0 (low three bits zero).
    pub vector_base: u8,
    /// The lowest-priority IR (rotation); IR0 is highest after init.
    pub lowest: u8,
    /// ICW1.LTIM: level-triggered mode.
    pub level: bool,
    /// ICW4.AEOI: automatic end of interrupt.
    pub auto_eoi: bool,
    /// Rotate in automatic EOI mode (OCW2 R=1, SL=0, EOI=0).
    pub rotate_on_aeoi: bool,
    /// OCW3 special mask mode.
    pub special_mask: bool,
    /// OCW3: a read of the command port returns ISR (else IRR).
    pub read_isr: bool,
    /// OCW3 poll command pending: the next command-port read polls.
    pub poll: bool,
    /// Where the initialization sequence is: 0 done, 2 expects ICW2,
    /// 3 expects ICW3, 4 expects ICW4.
    pub init_step: u8,
    /// ICW1.SNGL: no ICW3 follows.
    pub single: bool,
    /// ICW1.IC4: an ICW4 follows.
    pub needs_icw4: bool,
    /// ICW3 as written (cascade wiring; informational).
    pub icw3: u8,
}

impl Default for Pic8259 {
    fn default() -> Self {
        Pic8259 {
            irr: 0,
            isr: 0,
            imr: 0xFF,
            lines: 0,
            vector_base: 0,
            lowest: 7,
            level: false,
            auto_eoi: false,
            rotate_on_aeoi: false,
            special_mask: false,
            read_isr: false,
            poll: false,
            init_step: 0,
            single: false,
            needs_icw4: false,
            icw3: 0,
        }
    }
}

impl Pic8259 {
    /// Priority rank of IR `i` (0 is the highest) under the rotation.
    fn rank(&self, i: u8) -> u8 {
        (i.wrapping_sub(self.lowest).wrapping_sub(1)) & 7
    }

    /// The IR with the highest priority in `bits`, if any.
    fn highest(&self, bits: u8) -> Option<u8> {
        (0..8)
            .filter(|i| bits & (1 << i) != 0)
            .min_by_key(|&i| self.rank(i))
    }

    /// The request the 8259A would signal on INT now: the highest-priority
    /// unmasked request that outranks everything in service (in special
    /// mask mode, any unmasked request not itself in service).
    pub fn pending(&self) -> Option<u8> {
        let req = self.irr & !self.imr;
        let ir = self.highest(req)?;
        if self.special_mask {
            return (self.isr & (1 << ir) == 0).then_some(ir);
        }
        match self.highest(self.isr) {
            Some(s) if self.rank(s) <= self.rank(ir) => None,
            _ => Some(ir),
        }
    }

    /// Drive IR line `ir` high or low. Edge mode latches a request on the
    /// rising edge; level mode requests while the line is high.
    pub fn set_line(&mut self, ir: u8, high: bool) {
        let bit = 1u8 << ir;
        let was = self.lines & bit != 0;
        if high {
            self.lines |= bit;
            if self.level || !was {
                self.irr |= bit;
            }
        } else {
            self.lines &= !bit;
            if self.level {
                self.irr &= !bit;
            }
        }
    }

    /// The interrupt-acknowledge cycle: the IR being serviced (its ISR bit
    /// set unless in automatic-EOI mode), or None for a spurious request
    /// (the caller reports IR7).
    pub fn acknowledge(&mut self) -> Option<u8> {
        let ir = self.pending()?;
        let bit = 1u8 << ir;
        // (In level mode a line still high requests again after the EOI.)
        self.irr &= !bit;
        if self.auto_eoi {
            if self.rotate_on_aeoi {
                self.lowest = ir;
            }
        } else {
            self.isr |= bit;
        }
        Some(ir)
    }

    /// After an EOI in level mode a line still high requests again.
    fn relatch_levels(&mut self) {
        if self.level {
            self.irr |= self.lines;
        }
    }

    /// A write to the command port (A0 = 0): ICW1, OCW2 or OCW3.
    pub fn write_command(&mut self, v: u8) {
        if v & 0x10 != 0 {
            // ICW1: start the initialization sequence.
            *self = Pic8259 {
                lines: self.lines,
                level: v & 0x08 != 0,
                single: v & 0x02 != 0,
                needs_icw4: v & 0x01 != 0,
                imr: 0,
                init_step: 2,
                ..Pic8259::default()
            };
            return;
        }
        if v & 0x08 != 0 {
            // OCW3
            if v & 0x04 != 0 {
                self.poll = true;
            }
            if v & 0x02 != 0 {
                self.read_isr = v & 0x01 != 0;
            }
            if v & 0x40 != 0 {
                self.special_mask = v & 0x20 != 0;
            }
            return;
        }
        // OCW2: R, SL, EOI in bits 7..5, level in 2..0.
        let level = v & 7;
        match v >> 5 {
            0b001 => {
                // Non-specific EOI: the highest-priority ISR bit.
                if let Some(ir) = self.highest(self.isr) {
                    self.isr &= !(1 << ir);
                }
                self.relatch_levels();
            }
            0b011 => {
                self.isr &= !(1 << level);
                self.relatch_levels();
            }
            0b101 => {
                // Rotate on non-specific EOI.
                if let Some(ir) = self.highest(self.isr) {
                    self.isr &= !(1 << ir);
                    self.lowest = ir;
                }
                self.relatch_levels();
            }
            0b111 => {
                // Rotate on specific EOI.
                self.isr &= !(1 << level);
                self.lowest = level;
                self.relatch_levels();
            }
            0b110 => self.lowest = level,
            0b100 => self.rotate_on_aeoi = true,
            0b000 => self.rotate_on_aeoi = false,
            _ => {} // 0b010: no operation
        }
    }

    /// A write to the data port (A0 = 1): ICW2-4 during initialization,
    /// else OCW1 (the mask).
    pub fn write_data(&mut self, v: u8) {
        match self.init_step {
            2 => {
                self.vector_base = v & 0xF8;
                self.init_step = if !self.single {
                    3
                } else if self.needs_icw4 {
                    4
                } else {
                    0
                };
            }
            3 => {
                self.icw3 = v;
                self.init_step = if self.needs_icw4 { 4 } else { 0 };
            }
            4 => {
                self.auto_eoi = v & 0x02 != 0;
                self.init_step = 0;
            }
            _ => self.imr = v,
        }
    }

    /// A read of the command port: the poll word after a poll command
    /// (bit 7 set if a request was acknowledged, its IR in bits 2..0), else
    /// IRR or ISR as OCW3 last chose.
    pub fn read_command(&mut self) -> u8 {
        if std::mem::take(&mut self.poll) {
            return match self.acknowledge() {
                Some(ir) => 0x80 | ir,
                None => 0,
            };
        }
        if self.read_isr {
            self.isr
        } else {
            self.irr
        }
    }

    /// A read of the data port: the mask.
    pub fn read_data(&self) -> u8 {
        self.imr
    }
}

/// The PC's two 8259As: the master at 0x20/0x21 (IRQ0-7), the slave at
/// 0xA0/0xA1 (IRQ8-15) on the master's IR2.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PicPair {
    /// The master (IRQ0-7).
    pub master: Pic8259,
    /// The slave (IRQ8-15), cascaded on the master's IR2.
    pub slave: Pic8259,
}

/// The master IR the slave's INT output drives.
const CASCADE: u8 = 2;

impl PicPair {
    /// Drive IRQ line `irq` (0-15).
    pub fn set_irq(&mut self, irq: u8, high: bool) {
        if irq < 8 {
            self.master.set_line(irq, high);
        } else {
            self.slave.set_line(irq - 8, high);
            self.sync_cascade();
        }
    }

    /// A rising edge on IRQ `irq` (an edge-triggered device's pulse).
    pub fn pulse_irq(&mut self, irq: u8) {
        self.set_irq(irq, false);
        self.set_irq(irq, true);
    }

    /// The slave's INT output as the master's IR2 line.
    fn sync_cascade(&mut self) {
        if self.master.single {
            return;
        }
        let int = self.slave.pending().is_some();
        self.master.set_line(CASCADE, int);
    }

    /// Is INT asserted to the CPU?
    pub fn interrupt_pending(&self) -> bool {
        self.master.pending().is_some()
    }

    /// The CPU's interrupt acknowledge: the vector to deliver, if INT is
    /// asserted. A request that vanished gives the spurious vector of IR7
    /// (of the slave's IR7 when it was the slave's), as the 8259A does.
    pub fn acknowledge(&mut self) -> Option<u8> {
        self.master.pending()?;
        let vector = match self.master.acknowledge() {
            Some(CASCADE) if !self.master.single => match self.slave.acknowledge() {
                Some(ir) => self.slave.vector_base | ir,
                None => self.slave.vector_base | 7,
            },
            Some(ir) => self.master.vector_base | ir,
            None => self.master.vector_base | 7,
        };
        self.sync_cascade();
        Some(vector)
    }

    /// A port read (0x20, 0x21, 0xA0, 0xA1).
    pub fn read(&mut self, port: u16) -> u8 {
        let v = match port {
            0x20 => self.master.read_command(),
            0x21 => self.master.read_data(),
            0xA0 => self.slave.read_command(),
            _ => self.slave.read_data(),
        };
        self.sync_cascade();
        v
    }

    /// A port write (0x20, 0x21, 0xA0, 0xA1).
    pub fn write(&mut self, port: u16, v: u8) {
        match port {
            0x20 => self.master.write_command(v),
            0x21 => self.master.write_data(v),
            0xA0 => self.slave.write_command(v),
            _ => self.slave.write_data(v),
        }
        self.sync_cascade();
    }

    /// The state a PC's firmware leaves (what a Multiboot kernel booted by
    /// QEMU sees): master vectors 0x08-0x0F, slave 0x70-0x77, cascaded,
    /// edge-triggered, normal EOI; only IRQ0 (the timer) and the cascade
    /// unmasked on the master, everything masked on the slave.
    pub fn firmware() -> PicPair {
        let mut p = PicPair::default();
        for (cmd, data, base, icw3, mask) in [
            (0x20, 0x21, 0x08, 0x04, 0xFA),
            (0xA0, 0xA1, 0x70, 0x02, 0xFF),
        ] {
            p.write(cmd, 0x11);
            p.write(data, base);
            p.write(data, icw3);
            p.write(data, 0x01);
            p.write(data, mask);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pair initialized as Linux does (vectors 0x30/0x38, 8086 mode).
    fn linux_like() -> PicPair {
        let mut p = PicPair::default();
        for (cmd, data, base, icw3) in [(0x20, 0x21, 0x30, 0x04), (0xA0, 0xA1, 0x38, 0x02)] {
            p.write(cmd, 0x11); // ICW1: edge, cascade, ICW4 follows
            p.write(data, base); // ICW2
            p.write(data, icw3); // ICW3
            p.write(data, 0x01); // ICW4: 8086 mode, normal EOI
        }
        p
    }

    #[test]
    fn icw1_clears_the_mask_and_the_sequence_sets_vectors() {
        let mut p = linux_like();
        assert_eq!(p.read(0x21), 0, "ICW1 clears the IMR (data sheet, ICW1)");
        p.write(0x21, 0xFE);
        assert_eq!(p.read(0x21), 0xFE);
        p.pulse_irq(0);
        assert!(p.interrupt_pending());
        assert_eq!(p.acknowledge(), Some(0x30));
        assert!(!p.interrupt_pending(), "IR0 in service blocks itself");
    }

    #[test]
    fn masked_requests_wait_in_irr() {
        let mut p = linux_like();
        p.write(0x21, 0x01);
        p.pulse_irq(0);
        assert!(!p.interrupt_pending());
        p.write(0x20, 0x0A); // OCW3: read IRR
        assert_eq!(p.read(0x20), 0x01);
        p.write(0x21, 0x00);
        assert_eq!(p.acknowledge(), Some(0x30));
    }

    #[test]
    fn fully_nested_priority_and_eoi() {
        let mut p = linux_like();
        p.pulse_irq(3);
        assert_eq!(p.acknowledge(), Some(0x33));
        // A lower priority request waits; a higher one nests.
        p.pulse_irq(5);
        assert!(!p.interrupt_pending());
        p.pulse_irq(1);
        assert_eq!(p.acknowledge(), Some(0x31));
        p.write(0x20, 0x0B); // OCW3: read ISR
        assert_eq!(p.read(0x20), 0b0000_1010);
        p.write(0x20, 0x20); // non-specific EOI: the highest in service (1)
        assert_eq!(p.read(0x20), 0b0000_1000);
        p.write(0x20, 0x63); // specific EOI for IR3
        assert_eq!(p.read(0x20), 0);
        assert_eq!(p.acknowledge(), Some(0x35));
    }

    #[test]
    fn the_slave_cascades_through_ir2_and_needs_both_eois() {
        let mut p = linux_like();
        p.set_irq(8, true); // RTC
        assert!(p.interrupt_pending());
        assert_eq!(p.acknowledge(), Some(0x38));
        p.write(0x20, 0x0B);
        p.write(0xA0, 0x0B);
        assert_eq!(p.read(0x20), 0x04, "the master has IR2 in service");
        assert_eq!(p.read(0xA0), 0x01);
        p.set_irq(8, false);
        p.write(0xA0, 0x20);
        p.write(0x20, 0x20);
        assert_eq!((p.read(0x20), p.read(0xA0)), (0, 0));
    }

    #[test]
    fn edge_mode_latches_once_per_rising_edge() {
        let mut p = linux_like();
        p.set_irq(4, true);
        assert_eq!(p.acknowledge(), Some(0x34));
        p.write(0x20, 0x20);
        // Still high, but no new edge: nothing pending.
        assert!(!p.interrupt_pending());
        p.set_irq(4, false);
        p.set_irq(4, true);
        assert_eq!(p.acknowledge(), Some(0x34));
    }

    #[test]
    fn a_request_gone_before_the_acknowledge_is_spurious_ir7() {
        let mut p = linux_like();
        // Level mode on the master, so dropping the line removes the request.
        p.master.level = true;
        p.set_irq(5, true);
        assert!(p.interrupt_pending());
        p.set_irq(5, false);
        assert!(!p.interrupt_pending());
        // The CPU acknowledges anyway only if INT was seen; model the
        // data sheet case directly on the chip: no request -> IR7, no ISR.
        assert_eq!(p.master.acknowledge(), None);
        assert_eq!(p.master.isr, 0);
    }

    #[test]
    fn rotation_and_set_priority() {
        let mut p = linux_like();
        p.write(0x20, 0xC4); // set priority: IR4 lowest, so IR5 highest
        p.pulse_irq(1);
        p.pulse_irq(6);
        assert_eq!(p.acknowledge(), Some(0x36));
        p.write(0x20, 0xA0); // rotate on non-specific EOI: IR6 becomes lowest
        assert_eq!(p.acknowledge(), Some(0x31));
    }

    #[test]
    fn auto_eoi_and_the_poll_command() {
        let mut p = PicPair::default();
        p.write(0x20, 0x13); // single, ICW4
        p.write(0x21, 0x40);
        p.write(0x21, 0x03); // ICW4: AEOI, 8086
        p.pulse_irq(2);
        assert_eq!(p.acknowledge(), Some(0x42));
        assert_eq!(p.master.isr, 0, "automatic EOI leaves nothing in service");
        p.pulse_irq(6);
        p.write(0x20, 0x0C); // OCW3: poll
        assert_eq!(p.read(0x20), 0x86);
    }

    #[test]
    fn special_mask_mode_lets_lower_priorities_in() {
        let mut p = linux_like();
        p.pulse_irq(1);
        assert_eq!(p.acknowledge(), Some(0x31));
        p.write(0x21, 0x02); // mask IR1 (in service)
        p.write(0x20, 0x68); // OCW3: set special mask mode
        p.pulse_irq(4);
        assert_eq!(p.acknowledge(), Some(0x34));
    }

    #[test]
    fn firmware_state_is_what_qemu_leaves() {
        let mut p = PicPair::firmware();
        assert_eq!(p.read(0x21), 0xFA);
        assert_eq!(p.read(0xA1), 0xFF);
        p.pulse_irq(0);
        assert_eq!(p.acknowledge(), Some(0x08));
    }
}
