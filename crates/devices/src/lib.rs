//! Virtual devices on the PC port-I/O bus.
//!
//! Each device is a small state machine: register reads and writes change a
//! plain `State` struct, and nothing here loops, blocks or performs host I/O.
//! Output produced by a device (bytes the guest sent through the UART, the
//! status written to isa-debug-exit) is queued in the device for the machine
//! to collect. That keeps devices testable on their own and lets a snapshot
//! capture them by cloning their state.

#![forbid(unsafe_code)]

mod uart;

pub use uart::{Uart16550, UartState};

/// The I/O port base of the first serial port (COM1).
pub const COM1_BASE: u16 = 0x3F8;
/// The I/O port of QEMU's `isa-debug-exit` device as configured by
/// `-device isa-debug-exit,iobase=0xf4,iosize=4`.
pub const DEBUG_EXIT_PORT: u16 = 0xF4;

/// QEMU's `isa-debug-exit`: a write of value `v` ends the machine with exit
/// status `(v << 1) | 1`.
#[derive(Debug, Default, Clone)]
pub struct DebugExit {
    /// The value the guest wrote, once it wrote one.
    pub written: Option<u32>,
}

impl DebugExit {
    /// The guest wrote `value` (of the access width) to the port.
    pub fn write(&mut self, value: u32) {
        self.written.get_or_insert(value);
    }

    /// The process exit status QEMU would end with, once the guest wrote.
    pub fn exit_status(&self) -> Option<i32> {
        self.written.map(|v| ((v << 1) | 1) as i32)
    }
}

/// The port-I/O bus of the PC: decodes a port number to a device.
///
/// Ports no device claims read as all ones and ignore writes, like an
/// undriven ISA bus (and like QEMU).
#[derive(Debug, Default, Clone)]
pub struct PortBus {
    /// COM1 at 0x3F8..=0x3FF.
    pub uart: Uart16550,
    /// isa-debug-exit at 0xF4..=0xF7.
    pub debug_exit: DebugExit,
}

impl PortBus {
    /// A bus with a UART at COM1 and isa-debug-exit at 0xF4.
    pub fn new() -> Self {
        Self::default()
    }

    /// An `IN` of `size` bytes (1, 2 or 4) from `port`.
    pub fn read(&mut self, port: u16, size: u8) -> u32 {
        let mut v = 0u32;
        for i in (0..u16::from(size)).rev() {
            v = (v << 8) | u32::from(self.read_byte(port.wrapping_add(i)));
        }
        v
    }

    /// An `OUT` of `size` bytes (1, 2 or 4) of `value` to `port`.
    pub fn write(&mut self, port: u16, size: u8, value: u32) {
        if (DEBUG_EXIT_PORT..DEBUG_EXIT_PORT + 4).contains(&port) {
            let mask = if size >= 4 {
                u32::MAX
            } else {
                (1u32 << (8 * u32::from(size))) - 1
            };
            self.debug_exit.write(value & mask);
            return;
        }
        for i in 0..u16::from(size) {
            self.write_byte(port.wrapping_add(i), (value >> (8 * i)) as u8);
        }
    }

    fn read_byte(&mut self, port: u16) -> u8 {
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => self.uart.read(p - COM1_BASE),
            _ => 0xFF,
        }
    }

    fn write_byte(&mut self, port: u16, v: u8) {
        if (COM1_BASE..COM1_BASE + 8).contains(&port) {
            self.uart.write(port - COM1_BASE, v);
        }
    }

    /// Has the guest asked to end the machine (isa-debug-exit)?
    pub fn exit_requested(&self) -> Option<i32> {
        self.debug_exit.exit_status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_exit_status_matches_qemu_formula() {
        let mut bus = PortBus::new();
        assert_eq!(bus.exit_requested(), None);
        bus.write(DEBUG_EXIT_PORT, 1, 0x1234_5621);
        // a byte write carries only the low byte
        assert_eq!(bus.exit_requested(), Some((0x21 << 1) | 1));
    }

    #[test]
    fn unclaimed_ports_read_ones() {
        let mut bus = PortBus::new();
        assert_eq!(bus.read(0x60, 1), 0xFF);
        assert_eq!(bus.read(0x1234, 4), 0xFFFF_FFFF);
    }

    #[test]
    fn uart_word_access_splits_into_bytes() {
        let mut bus = PortBus::new();
        bus.write(COM1_BASE, 1, u32::from(b'h'));
        assert_eq!(bus.uart.take_output(), b"h");
        // LSR (offset 5) and MSR (offset 6) read as one 16-bit access
        let v = bus.read(COM1_BASE + 5, 2);
        assert_eq!(v & 0xFF, 0x60);
    }
}
