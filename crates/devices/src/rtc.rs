//! The MC146818 real-time clock and CMOS RAM at ports 0x70/0x71
//! (Motorola MC146818A data sheet: "Address map", "Registers A-D",
//! "Periodic interrupt"; the CMOS layout of the IBM PC/AT BIOS).
//!
//! The time of day is the host's wall clock at the machine's creation plus
//! the machine's own elapsed time (so with an instruction-count clock a run
//! sees time advance with the instructions). Register B chooses BCD or
//! binary and 12- or 24-hour format; register A's rate selects the periodic
//! interrupt, raised on IRQ8 when register B enables it; reading register C
//! acknowledges. Bit 7 of the index port (NMI disable) is ignored. The
//! update-ended and alarm interrupts are not modelled (UIP reads 0).

/// Nanoseconds in one second.
const SECOND: u64 = 1_000_000_000;

/// The RTC and its CMOS RAM: everything a snapshot needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mc146818 {
    /// The selected register (port 0x70, bit 7 dropped).
    pub index: u8,
    /// The 128 bytes of CMOS RAM; 0x00-0x09 are computed from the clock.
    pub cmos: [u8; 128],
    /// Seconds since 1970 at machine time 0.
    pub epoch: u64,
    /// Time (ns) of the last periodic tick reported as an interrupt.
    pub reported: u64,
    /// Register C's flags not yet read (IRQF, PF).
    pub flags_c: u8,
}

/// Register indices.
mod r {
    pub const A: usize = 0x0A;
    pub const B: usize = 0x0B;
    pub const C: usize = 0x0C;
    pub const D: usize = 0x0D;
}

/// Register B bits.
const B_PIE: u8 = 0x40;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
/// Register C bits.
const C_IRQF: u8 = 0x80;
const C_PF: u8 = 0x40;

impl Mc146818 {
    /// An RTC whose clock reads `epoch` (seconds since 1970, UTC) at
    /// machine time 0, with CMOS RAM describing `memory` bytes of RAM.
    pub fn new(epoch: u64, memory: u64) -> Mc146818 {
        let mut cmos = [0u8; 128];
        cmos[r::A] = 0x26; // 32.768 kHz divider, 1024 Hz periodic rate
        cmos[r::B] = B_24H;
        cmos[r::D] = 0x80; // valid RAM and time
        cmos[0x10] = 0x00; // no floppy drives
        cmos[0x14] = 0x06; // equipment: FPU present, VGA
                           // Base memory 640 KiB; extended memory above 1 MiB in KiB (capped
                           // at 0xFFFF); memory above 16 MiB in 64 KiB blocks.
        let base = 640u16.to_le_bytes();
        cmos[0x15..0x17].copy_from_slice(&base);
        let ext = (memory.saturating_sub(1 << 20) >> 10).min(0xFFFF) as u16;
        cmos[0x17..0x19].copy_from_slice(&ext.to_le_bytes());
        cmos[0x30..0x32].copy_from_slice(&ext.to_le_bytes());
        let high = (memory.saturating_sub(16 << 20) >> 16).min(0xFFFF) as u16;
        cmos[0x34..0x36].copy_from_slice(&high.to_le_bytes());
        Mc146818 {
            index: 0,
            cmos,
            epoch,
            reported: 0,
            flags_c: 0,
        }
    }

    /// The periodic interrupt's period in ns (None when the rate is 0 or
    /// the divider is not the 32.768 kHz time base).
    fn period(&self) -> Option<u64> {
        let rate = u32::from(self.cmos[r::A] & 0x0F);
        if rate == 0 || (self.cmos[r::A] >> 4) & 7 != 2 {
            return None;
        }
        // Rates 1 and 2 alias 8 and 9 (data sheet table 5).
        let rate = if rate < 3 { rate + 7 } else { rate };
        let hz = 32768u64 >> (rate - 1);
        Some(SECOND / hz)
    }

    /// The next periodic tick after what was last reported, if the periodic
    /// interrupt is enabled.
    pub fn next_irq8(&self) -> Option<u64> {
        if self.cmos[r::B] & B_PIE == 0 {
            return None;
        }
        let p = self.period()?;
        Some((self.reported / p + 1) * p)
    }

    /// Account for periodic ticks up to `now`: true if the IRQ8 line
    /// should pulse (a tick passed with the periodic interrupt enabled).
    pub fn irq8_rose(&mut self, now: u64) -> bool {
        let Some(p) = self.period() else {
            return false;
        };
        if now / p > self.reported / p {
            self.reported = now;
            self.flags_c |= C_PF;
            if self.cmos[r::B] & B_PIE != 0 {
                self.flags_c |= C_IRQF;
                return true;
            }
        }
        false
    }

    fn encode(&self, v: u64) -> u8 {
        let v = v as u8;
        if self.cmos[r::B] & B_BINARY != 0 {
            v
        } else {
            (v / 10) << 4 | (v % 10)
        }
    }

    /// A register's value at `now` (ns of machine time).
    fn register(&mut self, i: usize, now: u64) -> u8 {
        let secs = self.epoch + now / SECOND;
        let days = secs / 86400;
        let t = secs % 86400;
        let (y, m, d) = civil(days);
        match i {
            0 => self.encode(t % 60),
            2 => self.encode(t / 60 % 60),
            4 => {
                let h = t / 3600;
                if self.cmos[r::B] & B_24H != 0 {
                    self.encode(h)
                } else {
                    let h12 = if h % 12 == 0 { 12 } else { h % 12 };
                    self.encode(h12) | if h >= 12 { 0x80 } else { 0 }
                }
            }
            6 => self.encode((days + 4) % 7 + 1), // 1970-01-01 was a Thursday
            7 => self.encode(d),
            8 => self.encode(m),
            9 => self.encode(y % 100),
            0x32 => self.encode(y / 100),
            r::A => self.cmos[r::A] & 0x7F, // UIP never set
            r::C => {
                self.irq8_rose(now);
                std::mem::take(&mut self.flags_c)
            }
            _ => self.cmos[i],
        }
    }

    /// A read of port 0x70 (write-only on a PC: all ones) or 0x71.
    pub fn read(&mut self, port: u16, now: u64) -> u8 {
        if port == 0x70 {
            return 0xFF;
        }
        self.register(usize::from(self.index), now)
    }

    /// A write of port 0x70 (the index; NMI mask bit ignored) or 0x71.
    pub fn write(&mut self, port: u16, v: u8, now: u64) {
        if port == 0x70 {
            self.index = v & 0x7F;
            return;
        }
        let i = usize::from(self.index);
        match i {
            r::C | r::D => {} // read-only
            r::A => {
                self.irq8_rose(now);
                self.cmos[r::A] = v & 0x7F;
                self.reported = now;
            }
            r::B => {
                self.irq8_rose(now);
                self.cmos[r::B] = v;
                self.reported = now;
            }
            _ => self.cmos[i] = v,
        }
    }
}

/// (year, month, day) of `days` since 1970-01-01 (proleptic Gregorian).
fn civil(days: u64) -> (u64, u64, u64) {
    // Howard Hinnant's days-from-civil inverse, for days >= 0.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-28 15:04:05 UTC.
    const T: u64 = 1_795_878_245;

    fn read(rtc: &mut Mc146818, i: u8, now: u64) -> u8 {
        rtc.write(0x70, i, now);
        rtc.read(0x71, now)
    }

    #[test]
    fn time_and_date_in_bcd_and_binary() {
        let mut rtc = Mc146818::new(T, 64 << 20);
        let v: Vec<u8> = [0, 2, 4, 7, 8, 9, 0x32]
            .iter()
            .map(|&i| read(&mut rtc, i, 0))
            .collect();
        assert_eq!(v, [0x05, 0x04, 0x15, 0x28, 0x11, 0x26, 0x20]);
        assert_eq!(read(&mut rtc, 6, 0), 0x07, "a Saturday (Sunday = 1)");
        rtc.write(0x70, 0x0B, 0);
        rtc.write(0x71, B_24H | B_BINARY, 0);
        assert_eq!(read(&mut rtc, 4, 0), 15);
        assert_eq!(
            read(&mut rtc, 0, 61 * SECOND),
            6,
            "time goes on with the machine"
        );
        rtc.write(0x70, 0x0B, 0);
        rtc.write(0x71, B_BINARY, 0); // 12-hour
        assert_eq!(read(&mut rtc, 4, 0), 0x80 | 3, "3 PM");
    }

    #[test]
    fn periodic_interrupt_at_the_rate_of_register_a() {
        let mut rtc = Mc146818::new(T, 64 << 20);
        rtc.write(0x70, 0x0A, 0);
        rtc.write(0x71, 0x2F, 0); // rate 15: 2 Hz
        assert_eq!(rtc.next_irq8(), None, "PIE off");
        rtc.write(0x70, 0x0B, 0);
        rtc.write(0x71, B_24H | B_PIE, 0);
        assert_eq!(rtc.next_irq8(), Some(SECOND / 2));
        assert!(!rtc.irq8_rose(SECOND / 2 - 1));
        assert!(rtc.irq8_rose(SECOND / 2));
        assert_eq!(read(&mut rtc, 0x0C, SECOND / 2), C_IRQF | C_PF);
        assert_eq!(read(&mut rtc, 0x0C, SECOND / 2), 0, "reading C clears it");
    }

    #[test]
    fn cmos_describes_memory_and_register_d_is_valid() {
        let mut rtc = Mc146818::new(T, 64 << 20);
        let word = |rtc: &mut Mc146818, i: u8| {
            u16::from(read(rtc, i, 0)) | u16::from(read(rtc, i + 1, 0)) << 8
        };
        assert_eq!(word(&mut rtc, 0x15), 640);
        assert_eq!(word(&mut rtc, 0x17), 63 * 1024);
        assert_eq!(word(&mut rtc, 0x34), ((48u32 << 20) >> 16) as u16);
        assert_eq!(read(&mut rtc, 0x0D, 0), 0x80);
        // NMI-disable bit in the index is ignored.
        rtc.write(0x70, 0x80 | 0x0D, 0);
        assert_eq!(rtc.read(0x71, 0), 0x80);
    }
}
