//! A 16550-compatible UART (National Semiconductor PC16550D data sheet).
//!
//! Transmission is instantaneous: a byte written to THR is queued for the
//! host at once, so LSR always reports the transmitter empty. There is no
//! receive path yet (LSR.DR stays 0) and no interrupt line: IIR always reads
//! "no interrupt pending", which is what polling guests expect.

/// Register offsets from the UART's base port.
mod reg {
    pub const RBR_THR_DLL: u16 = 0;
    pub const IER_DLM: u16 = 1;
    pub const IIR_FCR: u16 = 2;
    pub const LCR: u16 = 3;
    pub const MCR: u16 = 4;
    pub const LSR: u16 = 5;
    pub const MSR: u16 = 6;
    pub const SCR: u16 = 7;
}

/// LSR: transmitter holding register empty.
const LSR_THRE: u8 = 1 << 5;
/// LSR: transmitter empty.
const LSR_TEMT: u8 = 1 << 6;
/// LCR: divisor latch access bit.
const LCR_DLAB: u8 = 1 << 7;
/// MCR: loopback mode.
const MCR_LOOP: u8 = 1 << 4;

/// The programmer-visible registers of the UART: everything a snapshot needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UartState {
    /// Interrupt enable register.
    pub ier: u8,
    /// Line control register.
    pub lcr: u8,
    /// Modem control register.
    pub mcr: u8,
    /// Scratch register.
    pub scr: u8,
    /// FIFO control (last value written).
    pub fcr: u8,
    /// Divisor latch (baud rate divisor).
    pub divisor: u16,
    /// Byte looped back in loopback mode, readable from RBR.
    pub loopback: Option<u8>,
}

impl Default for UartState {
    fn default() -> Self {
        UartState {
            ier: 0,
            lcr: 0,
            mcr: 0,
            scr: 0,
            fcr: 0,
            divisor: 12, // 9600 baud with the PC's 1.8432 MHz clock
            loopback: None,
        }
    }
}

/// A 16550 UART whose transmitted bytes collect in an output queue.
#[derive(Debug, Default, Clone)]
pub struct Uart16550 {
    /// Register state.
    pub state: UartState,
    out: Vec<u8>,
}

impl Uart16550 {
    /// Read the register at `offset` (0..=7).
    pub fn read(&mut self, offset: u16) -> u8 {
        let s = &mut self.state;
        let dlab = s.lcr & LCR_DLAB != 0;
        match offset {
            reg::RBR_THR_DLL if dlab => s.divisor as u8,
            reg::RBR_THR_DLL => s.loopback.take().unwrap_or(0),
            reg::IER_DLM if dlab => (s.divisor >> 8) as u8,
            reg::IER_DLM => s.ier,
            // no interrupt pending; FIFOs enabled bits mirror FCR bit 0
            reg::IIR_FCR => 0x01 | if s.fcr & 1 != 0 { 0xC0 } else { 0 },
            reg::LCR => s.lcr,
            reg::MCR => s.mcr,
            reg::LSR => LSR_THRE | LSR_TEMT | u8::from(s.loopback.is_some()),
            // CTS, DSR and DCD asserted (or MCR reflected in loopback)
            reg::MSR if s.mcr & MCR_LOOP != 0 => (s.mcr & 0x0F) << 4,
            reg::MSR => 0xB0,
            reg::SCR => s.scr,
            _ => 0xFF,
        }
    }

    /// Write `v` to the register at `offset` (0..=7).
    pub fn write(&mut self, offset: u16, v: u8) {
        let s = &mut self.state;
        let dlab = s.lcr & LCR_DLAB != 0;
        match offset {
            reg::RBR_THR_DLL if dlab => s.divisor = (s.divisor & 0xFF00) | u16::from(v),
            reg::RBR_THR_DLL if s.mcr & MCR_LOOP != 0 => s.loopback = Some(v),
            reg::RBR_THR_DLL => self.out.push(v),
            reg::IER_DLM if dlab => s.divisor = (s.divisor & 0x00FF) | (u16::from(v) << 8),
            reg::IER_DLM => s.ier = v & 0x0F,
            reg::IIR_FCR => s.fcr = v,
            reg::LCR => s.lcr = v,
            reg::MCR => s.mcr = v & 0x1F,
            reg::SCR => s.scr = v,
            _ => {}
        }
    }

    /// Take the bytes transmitted since the last call.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Are transmitted bytes waiting to be collected?
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divisor_latch_does_not_transmit() {
        let mut u = Uart16550::default();
        u.write(reg::LCR, 0x80);
        u.write(reg::RBR_THR_DLL, 0x01);
        u.write(reg::IER_DLM, 0x00);
        u.write(reg::LCR, 0x03);
        assert_eq!(u.state.divisor, 1);
        assert!(!u.has_output());
        u.write(reg::RBR_THR_DLL, b'A');
        assert_eq!(u.take_output(), b"A");
    }

    #[test]
    fn loopback_and_scratch() {
        let mut u = Uart16550::default();
        u.write(reg::SCR, 0x5A);
        assert_eq!(u.read(reg::SCR), 0x5A);
        u.write(reg::MCR, MCR_LOOP | 0x3);
        u.write(reg::RBR_THR_DLL, 0x42);
        assert_eq!(u.read(reg::LSR) & 1, 1);
        assert_eq!(u.read(reg::RBR_THR_DLL), 0x42);
        assert_eq!(u.read(reg::MSR), 0x30);
        assert!(!u.has_output());
    }
}
