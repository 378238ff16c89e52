//! A PCI bus on configuration mechanism #1 (PCI Local Bus Specification
//! 3.0, §3.2.2.3.2): a 32-bit address latch at port 0xCF8 (enable bit 31,
//! bus 23:16, device 15:11, function 10:8, register 7:2) and the data
//! window at 0xCFC-0xCFF. Bus 0 only: a host bridge at 00:00.0 (the
//! i440FX's IDs, as QEMU's `-M pc`) and the devices plugged in. Each
//! function is a 256-byte configuration space with a mask of the bits
//! software may write; BARs answer the sizing protocol (write all ones,
//! read back the size's complement) through that mask.

/// Configuration-space offsets (PCI 3.0 §6.1).
pub mod reg {
    /// Vendor ID (16 bits).
    pub const VENDOR: usize = 0x00;
    /// Device ID (16 bits).
    pub const DEVICE: usize = 0x02;
    /// Command (16 bits).
    pub const COMMAND: usize = 0x04;
    /// Revision ID.
    pub const REVISION: usize = 0x08;
    /// Class code (24 bits: programming interface, subclass, class).
    pub const CLASS: usize = 0x09;
    /// Header type.
    pub const HEADER_TYPE: usize = 0x0E;
    /// BAR 0 (the others follow, four bytes apart).
    pub const BAR0: usize = 0x10;
    /// Subsystem vendor ID.
    pub const SUBSYSTEM_VENDOR: usize = 0x2C;
    /// Subsystem ID.
    pub const SUBSYSTEM: usize = 0x2E;
    /// Interrupt line (the PIC input the firmware routed INTx to).
    pub const INTERRUPT_LINE: usize = 0x3C;
    /// Interrupt pin (1 = INTA#).
    pub const INTERRUPT_PIN: usize = 0x3D;
}

/// Command register bits.
pub mod command {
    /// Respond to I/O space accesses.
    pub const IO: u16 = 1 << 0;
    /// Respond to memory space accesses.
    pub const MEMORY: u16 = 1 << 1;
    /// May master the bus (DMA).
    pub const MASTER: u16 = 1 << 2;
    /// INTx emulation disabled.
    pub const INTX_DISABLE: u16 = 1 << 10;
}

/// One PCI function's configuration space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Function {
    /// Device number (0-31) on bus 0, function 0.
    pub device: u8,
    /// The 256 bytes.
    pub config: [u8; 256],
    /// Which bits software may write.
    pub wmask: [u8; 256],
}

impl Function {
    /// A type-0 header with the given IDs and class (class, subclass,
    /// programming interface as one 24-bit value), command register
    /// writable (I/O, memory, bus master, INTx disable).
    pub fn new(device: u8, vendor: u16, id: u16, class: u32) -> Function {
        let mut f = Function {
            device,
            config: [0; 256],
            wmask: [0; 256],
        };
        f.set16(reg::VENDOR, vendor);
        f.set16(reg::DEVICE, id);
        f.config[reg::CLASS] = class as u8;
        f.config[reg::CLASS + 1] = (class >> 8) as u8;
        f.config[reg::CLASS + 2] = (class >> 16) as u8;
        let cmd = command::IO | command::MEMORY | command::MASTER | command::INTX_DISABLE;
        f.wmask[reg::COMMAND] = cmd as u8;
        f.wmask[reg::COMMAND + 1] = (cmd >> 8) as u8;
        f
    }

    /// A 16-bit configuration register.
    pub fn get16(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.config[at], self.config[at + 1]])
    }

    /// Set a 16-bit configuration register (firmware's write, unmasked).
    pub fn set16(&mut self, at: usize, v: u16) {
        self.config[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// A 32-bit configuration register.
    pub fn get32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.config[at..at + 4].try_into().expect("4 bytes"))
    }

    /// Declare BAR `n` in I/O space, `size` bytes (a power of two, at
    /// least 4), placed at `base` as a firmware would.
    pub fn io_bar(&mut self, n: usize, size: u32, base: u32) {
        let at = reg::BAR0 + 4 * n;
        let v = (base & !(size - 1)) | 1;
        self.config[at..at + 4].copy_from_slice(&v.to_le_bytes());
        let mask = !(size - 1) & 0xFFFF_FFFC;
        self.wmask[at..at + 4].copy_from_slice(&mask.to_le_bytes());
    }

    /// Declare BAR `n` in memory space (32-bit, not prefetchable), `size`
    /// bytes (a power of two, at least 16), placed at `base`.
    pub fn mem_bar(&mut self, n: usize, size: u32, base: u32) {
        let at = reg::BAR0 + 4 * n;
        let v = base & !(size - 1);
        self.config[at..at + 4].copy_from_slice(&v.to_le_bytes());
        let mask = !(size - 1) & 0xFFFF_FFF0;
        self.wmask[at..at + 4].copy_from_slice(&mask.to_le_bytes());
    }

    /// Where BAR `n` (a memory BAR) decodes, if memory decoding is on.
    pub fn mem_base(&self, n: usize) -> Option<u32> {
        let cmd = self.get16(reg::COMMAND);
        let v = self.get32(reg::BAR0 + 4 * n);
        (cmd & command::MEMORY != 0 && v & 1 == 0 && v & !0xF != 0).then_some(v & !0xF)
    }

    /// Append a capability (PCI 3.0 §6.7) with `body` after its ID and
    /// next pointer, at `at` (from 0x40, four-byte aligned, in order).
    pub fn add_capability(&mut self, at: usize, id: u8, body: &[u8]) {
        // Status: capabilities list.
        self.config[0x06] |= 0x10;
        let mut p = 0x34;
        while self.config[p] != 0 {
            p = usize::from(self.config[p]) + 1;
        }
        self.config[p] = at as u8;
        self.config[at] = id;
        self.config[at + 1] = 0;
        self.config[at + 2..at + 2 + body.len()].copy_from_slice(body);
    }

    /// Where BAR `n` (an I/O BAR) decodes, if I/O decoding is on.
    pub fn io_base(&self, n: usize) -> Option<u16> {
        let cmd = self.get16(reg::COMMAND);
        let v = self.get32(reg::BAR0 + 4 * n);
        (cmd & command::IO != 0 && v & 1 != 0 && v & !3 != 0).then_some((v & 0xFFFC) as u16)
    }

    /// Interrupt line and pin, as the firmware routes INTA#.
    pub fn route_intx(&mut self, line: u8) {
        self.config[reg::INTERRUPT_LINE] = line;
        self.config[reg::INTERRUPT_PIN] = 1;
        self.wmask[reg::INTERRUPT_LINE] = 0xFF;
    }

    /// Read `size` bytes at `at` (within one dword).
    fn read(&self, at: usize, size: usize) -> u32 {
        let mut v = 0u32;
        for i in (0..size).rev() {
            v = v << 8 | u32::from(self.config[(at + i) & 0xFF]);
        }
        v
    }

    /// Write `size` bytes at `at` through the write mask.
    fn write(&mut self, at: usize, size: usize, value: u32) {
        for i in 0..size {
            let a = (at + i) & 0xFF;
            let b = (value >> (8 * i)) as u8;
            let m = self.wmask[a];
            self.config[a] = (self.config[a] & !m) | (b & m);
        }
    }
}

/// The bus: the address latch and bus 0's functions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciBus {
    /// The value last written to 0xCF8.
    pub address: u32,
    /// The host bridge, and plugged-in devices' functions are held by the
    /// devices themselves (see [`crate::Board`]).
    pub host_bridge: Function,
}

impl Default for PciBus {
    fn default() -> Self {
        PciBus {
            address: 0,
            // Intel 82441FX (i440FX) PMC, class host bridge.
            host_bridge: Function::new(0, 0x8086, 0x1237, 0x06_00_00),
        }
    }
}

impl PciBus {
    /// Is a configuration cycle addressed (enable bit, bus 0), and to
    /// which device, function and register?
    pub fn target(&self) -> Option<(u8, u8, usize)> {
        let a = self.address;
        if a & 0x8000_0000 == 0 || (a >> 16) & 0xFF != 0 {
            return None;
        }
        Some((
            ((a >> 11) & 0x1F) as u8,
            ((a >> 8) & 7) as u8,
            (a & 0xFC) as usize,
        ))
    }

    /// Write the address latch (an access of `size` bytes at 0xCF8 +
    /// `offset`).
    pub fn write_address(&mut self, offset: u16, size: u8, value: u32) {
        for i in 0..u32::from(size) {
            let sh = 8 * (u32::from(offset) + i);
            if sh < 32 {
                self.address = (self.address & !(0xFF << sh)) | (((value >> (8 * i)) & 0xFF) << sh);
            }
        }
    }

    /// Read the address latch.
    pub fn read_address(&self, offset: u16, size: u8) -> u32 {
        let v = self.address >> (8 * u32::from(offset));
        if size >= 4 {
            v
        } else {
            v & ((1 << (8 * u32::from(size))) - 1)
        }
    }
}

/// A configuration read of `size` bytes at data-port offset `offset` from
/// `f` (None: no such function, all ones).
pub fn config_read(f: Option<&Function>, reg: usize, offset: u16, size: u8) -> u32 {
    match f {
        Some(f) => f.read(reg + usize::from(offset), usize::from(size)),
        None if size >= 4 => u32::MAX,
        None => (1 << (8 * u32::from(size))) - 1,
    }
}

/// A configuration write to `f`.
pub fn config_write(f: Option<&mut Function>, reg: usize, offset: u16, size: u8, value: u32) {
    if let Some(f) = f {
        f.write(reg + usize::from(offset), usize::from(size), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BAR sizing (PCI 3.0 §6.2.5.1): all ones written, the size's
    /// complement read back, the I/O flag kept; the base moves when
    /// software writes one.
    #[test]
    fn bars_answer_the_sizing_protocol() {
        let mut f = Function::new(3, 0x1AF4, 0x1001, 0x01_00_00);
        f.io_bar(0, 0x40, 0xC000);
        assert_eq!(f.get32(reg::BAR0), 0xC001);
        f.write(reg::BAR0, 4, 0xFFFF_FFFF);
        assert_eq!(f.get32(reg::BAR0), 0xFFFF_FFC1);
        f.write(reg::BAR0, 4, 0xC100);
        assert_eq!(f.get32(reg::BAR0), 0xC101);
        assert_eq!(f.io_base(0), None, "I/O decoding is off");
        f.write(reg::COMMAND, 2, 0x0001);
        assert_eq!(f.io_base(0), Some(0xC100));
        // Read-only registers stay.
        f.write(reg::VENDOR, 4, 0);
        assert_eq!(f.get16(reg::VENDOR), 0x1AF4);
    }

    #[test]
    fn the_address_latch_selects_bus_0_functions() {
        let mut b = PciBus::default();
        b.write_address(0, 4, 0x8000_1810);
        assert_eq!(b.target(), Some((3, 0, 0x10)));
        b.write_address(0, 4, 0x8001_0000);
        assert_eq!(b.target(), None, "bus 1 does not exist");
        assert_eq!(config_read(None, 0, 0, 2), 0xFFFF);
        let h = &b.host_bridge;
        assert_eq!(config_read(Some(h), 0, 0, 4), 0x1237_8086);
        assert_eq!(config_read(Some(h), 8, 3, 1), 0x06);
    }
}
