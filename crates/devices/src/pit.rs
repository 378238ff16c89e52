//! The 8254 programmable interval timer (Intel 82C54 data sheet, order
//! number 231244: "Control word format", "Counter latch command",
//! "Read-back command", "Modes of operation") and the PC's port 0x61
//! (speaker gate and OUT2, as the IBM PC/AT technical reference wires
//! them).
//!
//! The input clock is 1.193182 MHz. Nothing here runs on its own: every
//! access carries the current time in nanoseconds, and a counter's state is
//! computed from the time it was loaded, so reading it is exact and the
//! machine can ask for the next moment OUT0 rises (to sleep until then).
//! Modes 0, 2, 3 and 4 are modelled (1 and 5 need a gate trigger, which
//! only channel 2 has on a PC: they behave as 0 and 4 there); BCD counting
//! is accepted and counts in binary.

/// The 8254's input clock, in Hz.
pub const PIT_HZ: u64 = 1_193_182;

/// PIT ticks in `ns` nanoseconds (rounded down).
pub fn ticks_in(ns: u64) -> u64 {
    (u128::from(ns) * u128::from(PIT_HZ) / 1_000_000_000) as u64
}

/// Nanoseconds until tick `t` (rounded up).
pub fn ns_of(t: u64) -> u64 {
    (u128::from(t) * 1_000_000_000).div_ceil(u128::from(PIT_HZ)) as u64
}

/// One counter of the 8254.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Channel {
    /// Mode (0-5).
    pub mode: u8,
    /// Read/write access: 1 LSB, 2 MSB, 3 LSB then MSB.
    pub access: u8,
    /// BCD counting requested (counts in binary).
    pub bcd: bool,
    /// The count written (0 means 65536).
    pub reload: u16,
    /// Time (ns) the count was loaded into the counting element and
    /// counting began; None until a count is written (and the gate is
    /// high, for channel 2).
    pub start: Option<u64>,
    /// The low byte written of a two-byte count, waiting for the high one.
    pub write_lsb: Option<u8>,
    /// Latched count (counter latch or read-back), read out first.
    pub latched: Option<u16>,
    /// Latched status byte (read-back), read out before the count.
    pub status: Option<u8>,
    /// The next read of a two-byte count returns the MSB.
    pub read_msb: bool,
    /// Gate input (channels 0 and 1 are tied high on a PC).
    pub gate: bool,
    /// Time of the last OUT rising edge reported to the interrupt line.
    pub reported: u64,
}

impl Channel {
    fn period(&self) -> u64 {
        if self.reload == 0 {
            65536
        } else {
            u64::from(self.reload)
        }
    }

    /// Ticks counted at `now` (None while not counting).
    fn elapsed(&self, now: u64) -> Option<u64> {
        Some(ticks_in(now.saturating_sub(self.start?)))
    }

    /// The counting element at `now`.
    pub fn count(&self, now: u64) -> u16 {
        let Some(e) = self.elapsed(now) else {
            return self.reload;
        };
        let n = self.period();
        match self.mode {
            2 => (n - e % n) as u16,
            // Mode 3 counts down by two, twice per period.
            3 => {
                let half = n.div_ceil(2);
                let into = e % n;
                let within = if into < half { into } else { into - half };
                (n.wrapping_sub(2 * within) & 0xFFFF) as u16
            }
            // Modes 0 and 4 count down through zero and wrap.
            _ => (n.wrapping_sub(e) & 0xFFFF) as u16,
        }
    }

    /// The OUT pin at `now`.
    pub fn out(&self, now: u64) -> bool {
        let Some(e) = self.elapsed(now) else {
            // Mode 0 holds OUT low after a count is written; every other
            // mode holds it high until counting starts.
            return self.mode != 0;
        };
        let n = self.period();
        match self.mode {
            0 | 1 => e >= n,
            2 => e % n != n - 1,
            3 => e % n < n.div_ceil(2),
            _ => e != n,
        }
    }

    /// The time of the first OUT rising edge after `after` (ns), if any.
    pub fn next_rise(&self, after: u64) -> Option<u64> {
        let start = self.start?;
        let n = self.period();
        let e = ticks_in(after.saturating_sub(start));
        let tick = match self.mode {
            0 | 1 => (e < n).then_some(n)?,
            4 | 5 => (e <= n).then_some(n + 1)?,
            // Mode 2: low during tick n-1 of each period, high again at n.
            // Mode 3: high again at the start of each period.
            _ => (e / n + 1) * n,
        };
        Some(start + ns_of(tick))
    }

    fn write_count(&mut self, now: u64, v: u8) {
        let full = match self.access {
            1 => Some(u16::from(v)),
            2 => Some(u16::from(v) << 8),
            _ => match self.write_lsb.take() {
                None => {
                    self.write_lsb = Some(v);
                    None
                }
                Some(lo) => Some(u16::from(lo) | u16::from(v) << 8),
            },
        };
        if let Some(c) = full {
            self.reload = c;
            self.start = self.gate.then_some(now);
            self.reported = now;
        }
    }

    fn read_count(&mut self, now: u64) -> u8 {
        if let Some(s) = self.status.take() {
            return s;
        }
        let c = self.latched.unwrap_or_else(|| self.count(now));
        let (byte, done) = match self.access {
            1 => (c as u8, true),
            2 => ((c >> 8) as u8, true),
            _ if self.read_msb => ((c >> 8) as u8, true),
            _ => (c as u8, false),
        };
        self.read_msb = !done;
        if done {
            self.latched = None;
        }
        byte
    }

    fn status_byte(&self, now: u64) -> u8 {
        u8::from(self.out(now)) << 7
            | u8::from(self.start.is_none()) << 6
            | self.access << 4
            | self.mode << 1
            | u8::from(self.bcd)
    }
}

/// The 8254 and port 0x61.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pit8254 {
    /// Channels 0 (IRQ0), 1 (DRAM refresh on old PCs) and 2 (speaker).
    pub channels: [Channel; 3],
    /// Port 0x61 bit 1: speaker data enable.
    pub speaker: bool,
}

impl Default for Pit8254 {
    fn default() -> Self {
        let mut channels: [Channel; 3] = Default::default();
        channels[0].gate = true;
        channels[1].gate = true;
        Pit8254 {
            channels,
            speaker: false,
        }
    }
}

impl Pit8254 {
    /// A read of port 0x40-0x42 at time `now` (ns).
    pub fn read(&mut self, port: u16, now: u64) -> u8 {
        match port {
            0x40..=0x42 => self.channels[usize::from(port - 0x40)].read_count(now),
            _ => 0xFF, // the control word register is write-only
        }
    }

    /// A write to port 0x40-0x43 at time `now` (ns).
    pub fn write(&mut self, port: u16, v: u8, now: u64) {
        if let 0x40..=0x42 = port {
            self.channels[usize::from(port - 0x40)].write_count(now, v);
            return;
        }
        let sc = v >> 6;
        if sc == 3 {
            // Read-back: bit 5 low latches counts, bit 4 low latches status.
            for i in 0..3 {
                if v & (2 << i) == 0 {
                    continue;
                }
                let ch = &mut self.channels[i];
                if v & 0x10 == 0 && ch.status.is_none() {
                    ch.status = Some(ch.status_byte(now));
                }
                if v & 0x20 == 0 && ch.latched.is_none() {
                    ch.latched = Some(ch.count(now));
                }
            }
            return;
        }
        let ch = &mut self.channels[usize::from(sc)];
        let access = (v >> 4) & 3;
        if access == 0 {
            // Counter latch command.
            if ch.latched.is_none() {
                ch.latched = Some(ch.count(now));
            }
            return;
        }
        ch.access = access;
        ch.mode = match (v >> 1) & 7 {
            6 => 2,
            7 => 3,
            m => m,
        };
        ch.bcd = v & 1 != 0;
        ch.start = None;
        ch.write_lsb = None;
        ch.latched = None;
        ch.status = None;
        ch.read_msb = false;
    }

    /// Port 0x61: bit 0 gate 2, bit 1 speaker data, bit 4 the refresh
    /// toggle (every 15.085 us), bit 5 OUT2.
    pub fn read_port61(&self, now: u64) -> u8 {
        let refresh = (now / 15_085) & 1 == 1;
        u8::from(self.channels[2].gate)
            | u8::from(self.speaker) << 1
            | u8::from(refresh) << 4
            | u8::from(self.channels[2].out(now)) << 5
    }

    /// A write to port 0x61: the gate of channel 2 (a rising gate starts
    /// or restarts its count) and the speaker enable.
    pub fn write_port61(&mut self, v: u8, now: u64) {
        let ch = &mut self.channels[2];
        let gate = v & 1 != 0;
        if gate && !ch.gate && (ch.start.is_some() || ch.reload != 0 || ch.mode != 0) {
            ch.start = Some(now);
        }
        if !gate && ch.mode == 0 {
            // Mode 0 stops counting while the gate is low (modelled as a
            // restart when it rises again).
            ch.start = None;
        }
        ch.gate = gate;
        self.speaker = v & 2 != 0;
    }

    /// Did OUT0 rise since the last call (IRQ0)? The time of the first
    /// rise not reported yet, if so; advances what has been reported to
    /// `now`.
    pub fn irq0_rose(&mut self, now: u64) -> Option<u64> {
        let ch = &mut self.channels[0];
        let rise = ch.next_rise(ch.reported).filter(|&t| t <= now)?;
        ch.reported = now;
        Some(rise)
    }

    /// When OUT0 rises next (IRQ0), after what was last reported.
    pub fn next_irq0(&self) -> Option<u64> {
        let ch = &self.channels[0];
        ch.next_rise(ch.reported)
    }

    /// What a PC's firmware leaves: channel 0 in mode 3 with the full
    /// count (18.2 Hz), counting from `now`.
    pub fn firmware(now: u64) -> Pit8254 {
        let mut p = Pit8254::default();
        p.write(0x43, 0x36, now);
        p.write(0x40, 0, now);
        p.write(0x40, 0, now);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nanoseconds of `t` PIT ticks, exactly on a tick.
    fn at(t: u64) -> u64 {
        ns_of(t)
    }

    #[test]
    fn mode2_rate_generator_period_and_latch() {
        let mut p = Pit8254::default();
        p.write(0x43, 0x34, 0); // channel 0, LSB/MSB, mode 2
        p.write(0x40, 100, 0);
        p.write(0x40, 0, 0);
        // Counts N..1, reloading: after 30 ticks the count is 70.
        p.write(0x43, 0x00, at(30)); // latch channel 0
        assert_eq!(p.read(0x40, at(500)), 70);
        assert_eq!(p.read(0x40, at(500)), 0);
        // OUT0 rises once per period: at tick 100, 200, ...
        assert_eq!(p.next_irq0(), Some(at(100)));
        assert!(p.irq0_rose(at(99)).is_none());
        assert_eq!(p.irq0_rose(at(100)), Some(at(100)));
        assert_eq!(p.next_irq0(), Some(at(200)));
    }

    #[test]
    fn mode0_interrupt_on_terminal_count() {
        let mut p = Pit8254::default();
        p.write(0x43, 0x30, 0); // channel 0, LSB/MSB, mode 0
        p.write(0x40, 0x10, 0);
        p.write(0x40, 0x00, 0);
        assert!(!p.channels[0].out(at(15)));
        assert!(p.channels[0].out(at(16)));
        assert_eq!(p.irq0_rose(at(20)), Some(at(16)));
        assert!(p.irq0_rose(at(100_000)).is_none(), "mode 0 fires once");
        // The counter wraps through zero and goes on counting.
        assert_eq!(p.channels[0].count(at(17)), 0xFFFF);
    }

    #[test]
    fn mode3_square_wave_at_the_firmware_rate() {
        let p = Pit8254::firmware(0);
        // 65536 ticks: about 54.9 ms, 18.2 Hz.
        assert_eq!(p.next_irq0(), Some(at(65536)));
        assert!(p.channels[0].out(at(32767)));
        assert!(!p.channels[0].out(at(32768)));
    }

    #[test]
    fn read_back_latches_status_then_count() {
        let mut p = Pit8254::default();
        p.write(0x43, 0xB0, 0); // channel 2, LSB/MSB, mode 0
        p.write_port61(0x01, 0);
        p.write(0x42, 0xFF, 0);
        p.write(0x42, 0xFF, 0);
        p.write(0x43, 0xC8, at(5)); // read-back: count and status, channel 2
        let status = p.read(0x42, at(9));
        assert_eq!(status & 0x3F, 0x30, "access LSB/MSB, mode 0, binary");
        assert_eq!(status & 0x80, 0, "OUT low before terminal count");
        let lo = p.read(0x42, at(9));
        let hi = p.read(0x42, at(9));
        assert_eq!(u16::from(lo) | u16::from(hi) << 8, 0xFFFF - 5);
    }

    #[test]
    fn port61_reports_out2_the_way_linux_calibrates_the_tsc() {
        // Linux's pit_calibrate_tsc: gate high, speaker off; channel 2 in
        // mode 0 with a count; wait until OUT2 (0x61 bit 5) goes high.
        let mut p = Pit8254::default();
        p.write_port61(0x01, 0);
        p.write(0x43, 0xB0, 0);
        p.write(0x42, 0x9B, 0);
        p.write(0x42, 0x2E, 0); // 11931 ticks: 10 ms
        assert_eq!(p.read_port61(at(11930)) & 0x20, 0);
        assert_eq!(p.read_port61(at(11931)) & 0x20, 0x20);
        assert_eq!(p.read_port61(0) & 1, 1, "the gate reads back");
    }

    #[test]
    fn lsb_only_and_msb_only_access() {
        let mut p = Pit8254::default();
        p.write(0x43, 0x14, 0); // channel 0, LSB only, mode 2
        p.write(0x40, 50, 0);
        assert_eq!(p.channels[0].reload, 50);
        p.write(0x43, 0x24, 0); // MSB only
        p.write(0x40, 1, 0);
        assert_eq!(p.channels[0].reload, 256);
        assert_eq!(p.read(0x40, 0), 1, "MSB of 256");
        assert_eq!(p.read(0x40, at(6)), 0, "MSB of 250");
    }
}
