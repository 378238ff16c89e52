//! A 16550-compatible UART (National Semiconductor PC16550D data sheet).
//!
//! Transmission is instantaneous: a byte written to THR is queued for the
//! host at once, so LSR always reports the transmitter empty (polling
//! guests never wait). The THRE interrupt (data sheet, "Interrupt
//! identification register", table 4) follows the transmission: enabling
//! it with THR empty raises it at once; writing THR clears it, and it comes
//! back when the machine next lets time pass ([`Uart16550::tick`]), so an
//! interrupt-driven driver gets one edge per byte (or FIFO load) as on
//! hardware. Received bytes ([`Uart16550::receive`]) raise the received-
//! data interrupt. INTR reaches IRQ4 only with MCR.OUT2 set, as the PC
//! wires it. Line-status and modem-status interrupts never occur (no
//! errors, fixed modem lines).

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
/// MCR: OUT2, which gates INTR onto IRQ4 on a PC.
const MCR_OUT2: u8 = 1 << 3;
/// IER: received data available interrupt.
const IER_ERBFI: u8 = 1 << 0;
/// IER: transmitter holding register empty interrupt.
const IER_ETBEI: u8 = 1 << 1;
/// LSR: data ready.
const LSR_DR: u8 = 1 << 0;

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
    /// A THRE interrupt is pending (until IIR reports it or THR is written).
    pub thre_pending: bool,
    /// THR was written since the last [`Uart16550::tick`]: the THRE
    /// interrupt comes back then.
    pub transmitting: bool,
    /// Received bytes not read yet (the receive FIFO, unbounded).
    pub input: std::collections::VecDeque<u8>,
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
            thre_pending: false,
            transmitting: false,
            input: std::collections::VecDeque::new(),
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
            reg::RBR_THR_DLL => match s.loopback.take() {
                Some(b) => b,
                None => s.input.pop_front().unwrap_or(0),
            },
            reg::IER_DLM if dlab => (s.divisor >> 8) as u8,
            reg::IER_DLM => s.ier,
            // The highest-priority pending interrupt; bits 7:6 mirror
            // FCR bit 0 (FIFOs enabled).
            reg::IIR_FCR => {
                let fifo = if s.fcr & 1 != 0 { 0xC0 } else { 0 };
                let id = if s.ier & IER_ERBFI != 0 && !s.input.is_empty() {
                    0x04
                } else if s.ier & IER_ETBEI != 0 && s.thre_pending {
                    // Reading IIR with THRE the source clears it.
                    s.thre_pending = false;
                    0x02
                } else {
                    0x01
                };
                fifo | id
            }
            reg::LCR => s.lcr,
            reg::MCR => s.mcr,
            reg::LSR => {
                let ready = s.loopback.is_some() || !s.input.is_empty();
                LSR_THRE | LSR_TEMT | if ready { LSR_DR } else { 0 }
            }
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
            reg::RBR_THR_DLL => {
                self.out.push(v);
                s.thre_pending = false;
                s.transmitting = true;
            }
            reg::IER_DLM if dlab => s.divisor = (s.divisor & 0x00FF) | (u16::from(v) << 8),
            reg::IER_DLM => {
                // Enabling THRE with THR empty raises it at once.
                if v & IER_ETBEI != 0 && s.ier & IER_ETBEI == 0 {
                    s.thre_pending = true;
                }
                s.ier = v & 0x0F;
            }
            reg::IIR_FCR => {
                // FCR bit 1 clears the receive FIFO (bit 2, the transmit
                // FIFO, has nothing to clear: transmission is instant).
                // Changing the FIFO enable clears both, as on the 16550.
                if v & 0x02 != 0 || (v ^ s.fcr) & 0x01 != 0 {
                    s.input.clear();
                }
                s.fcr = v;
            }
            reg::LCR => s.lcr = v,
            reg::MCR => s.mcr = v & 0x1F,
            reg::SCR => s.scr = v,
            _ => {}
        }
    }

    /// Time passed: a transmission started since the last tick is done,
    /// so THR is empty again (THRE interrupt).
    pub fn tick(&mut self) {
        if std::mem::take(&mut self.state.transmitting) {
            self.state.thre_pending = true;
        }
    }

    /// Bytes arrive on the serial line.
    pub fn receive(&mut self, bytes: &[u8]) {
        self.state.input.extend(bytes);
    }

    /// The INTR output as IRQ4 sees it (gated by MCR.OUT2).
    pub fn irq(&self) -> bool {
        let s = &self.state;
        s.mcr & MCR_OUT2 != 0
            && ((s.ier & IER_ERBFI != 0 && !s.input.is_empty())
                || (s.ier & IER_ETBEI != 0 && s.thre_pending))
    }

    /// Take the bytes transmitted since the last call.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Queue `bytes` as if transmitted (the hypercall console, which
    /// shares the serial output).
    pub fn push_output(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
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

    /// The THRE interrupt as Linux's 8250 driver probes it (enable, then
    /// IIR shows THRE at once) and drives it (one edge per byte written,
    /// once the byte is out), gated onto IRQ4 by OUT2.
    #[test]
    fn thre_interrupt_follows_transmission() {
        let mut u = Uart16550::default();
        u.write(reg::MCR, MCR_OUT2);
        u.write(reg::IER_DLM, IER_ETBEI);
        assert!(u.irq());
        assert_eq!(u.read(reg::IIR_FCR), 0x02);
        assert_eq!(u.read(reg::IIR_FCR), 0x01, "reading IIR cleared THRE");
        assert!(!u.irq());
        u.write(reg::RBR_THR_DLL, b'x');
        assert!(!u.irq(), "writing THR clears THRE");
        u.tick();
        assert!(u.irq(), "the byte is out: THR empty again");
        u.write(reg::MCR, 0);
        assert!(!u.irq(), "OUT2 low disconnects IRQ4");
        u.write(reg::IIR_FCR, 0x01);
        assert_eq!(u.read(reg::IIR_FCR) & 0xC0, 0xC0, "FIFOs enabled");
    }

    #[test]
    fn received_bytes_raise_the_data_interrupt_first() {
        let mut u = Uart16550::default();
        u.write(reg::MCR, MCR_OUT2);
        u.write(reg::IER_DLM, IER_ERBFI | IER_ETBEI);
        u.receive(b"ab");
        assert_eq!(u.read(reg::LSR) & LSR_DR, LSR_DR);
        assert_eq!(u.read(reg::IIR_FCR), 0x04, "received data outranks THRE");
        assert_eq!(u.read(reg::RBR_THR_DLL), b'a');
        assert_eq!(u.read(reg::RBR_THR_DLL), b'b');
        assert_eq!(u.read(reg::LSR) & LSR_DR, 0);
        assert_eq!(u.read(reg::IIR_FCR), 0x02);
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
