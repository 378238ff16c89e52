//! Virtual devices on the PC port-I/O bus.
//!
//! Each device is a small state machine: register reads and writes change a
//! plain `State` struct, and nothing here loops, blocks or performs host I/O.
//! Output produced by a device (bytes the guest sent through the UART, the
//! status written to isa-debug-exit) is queued in the device for the machine
//! to collect. That keeps devices testable on their own and lets a snapshot
//! capture them by cloning their state.

#![forbid(unsafe_code)]

pub mod image;
pub mod pci;
pub mod pic;
pub mod pit;
pub mod pv;
pub mod rtc;
mod uart;
pub mod virtio;

pub use pic::{Pic8259, PicPair};
pub use pit::Pit8254;
pub use rtc::Mc146818;
pub use uart::{Uart16550, UartState};

/// The IRQ line of COM1.
pub const IRQ_COM1: u8 = 4;

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

/// The board of the PC: the port-I/O bus and the devices on it, their
/// interrupt lines into the PIC pair, and the time they run on.
///
/// The vcpu reaches it through a narrow interface: port reads and writes
/// (each carrying the current machine time in ns), whether an interrupt is
/// pending, and the interrupt acknowledge. The machine lets time pass with
/// [`Board::advance`] and asks [`Board::next_deadline`] how long an
/// idle CPU may sleep. Ports no device claims read as all ones and ignore
/// writes, like an undriven ISA bus (and like QEMU); they are counted.
///
/// Every field is plain state (no handles, threads or clocks), so the board
/// is cloned or saved like any value, and each machine owns its own: the
/// vcpu holds it by value (`popek_vcpu::Vcpu::board`)
/// only so that a helper called from translated code, which is handed the
/// vcpu alone, can reach the ports.
#[derive(Debug, Clone)]
pub struct Board {
    /// COM1 at 0x3F8..=0x3FF, on IRQ4.
    pub uart: Uart16550,
    /// isa-debug-exit at 0xF4..=0xF7.
    pub debug_exit: DebugExit,
    /// The 8259A pair at 0x20/0x21 and 0xA0/0xA1.
    pub pic: PicPair,
    /// The 8254 at 0x40-0x43 and port 0x61; channel 0 on IRQ0.
    pub pit: Pit8254,
    /// The MC146818 RTC and CMOS at 0x70/0x71; periodic interrupt on IRQ8.
    pub rtc: Mc146818,
    /// The guest pulsed the CPU's reset line: the 8042 keyboard
    /// controller's "pulse output port" command with bit 0 (0xFE on port
    /// 0x64), or bit 0 of system control port A (0x92, "fast reset").
    pub reset: bool,
    /// Reads of ports no device claims.
    pub unclaimed_reads: u64,
    /// Writes to ports no device claims.
    pub unclaimed_writes: u64,
    /// [`Board::next_deadline`] as of the last change (None: compute).
    deadline: Option<Option<u64>>,
    /// How late the machine noticed timer (IRQ0) edges, in ns of machine
    /// time: (edges, sum, maximum). The guest's own delays (IF clear,
    /// masked) come on top.
    pub timer_late: (u64, u64, u64),
    /// The PCI bus (configuration mechanism #1 at 0xCF8/0xCFC) and its
    /// host bridge.
    pub pci: pci::PciBus,
    /// A virtio-blk disk on the PCI bus (`--drive`).
    pub virtio_blk: Option<virtio::VirtioBlk>,
    /// A virtio memory balloon on the PCI bus (`--balloon`).
    pub balloon: Option<virtio::VirtioBalloon>,
    /// The paravirtual interface (hypercalls and their balloon).
    pub pv: pv::Paravirt,
}

impl Default for Board {
    fn default() -> Self {
        Board {
            uart: Uart16550::default(),
            debug_exit: DebugExit::default(),
            pic: PicPair::default(),
            pit: Pit8254::default(),
            rtc: Mc146818::new(0, 0),
            reset: false,
            unclaimed_reads: 0,
            unclaimed_writes: 0,
            deadline: None,
            timer_late: (0, 0, 0),
            pci: pci::PciBus::default(),
            virtio_blk: None,
            balloon: None,
            pv: pv::Paravirt::default(),
        }
    }
}

impl Board {
    /// A bus with every device in its reset state (interrupt controllers
    /// uninitialized and masked, timer idle).
    pub fn new() -> Self {
        Self::default()
    }

    /// The board as a PC's firmware leaves it for a kernel (what QEMU's
    /// BIOS leaves a Multiboot kernel): the PICs at vectors 0x08 and 0x70
    /// with only IRQ0 and the cascade unmasked, the PIT's channel 0 at
    /// 18.2 Hz, the RTC set to `epoch` (seconds since 1970) with CMOS
    /// describing `memory` bytes.
    pub fn firmware(epoch: u64, memory: u64) -> Self {
        Board {
            pic: PicPair::firmware(),
            pit: Pit8254::firmware(0),
            rtc: Mc146818::new(epoch, memory),
            ..Board::default()
        }
    }

    /// An `IN` of `size` bytes (1, 2 or 4) from `port` at time `now` (ns).
    pub fn read(&mut self, port: u16, size: u8, now: u64) -> u32 {
        if let Some(v) = self.read_pci(port, size) {
            self.sync_lines();
            return v;
        }
        let mut v = 0u32;
        for i in (0..u16::from(size)).rev() {
            v = (v << 8) | u32::from(self.read_byte(port.wrapping_add(i), now));
        }
        v
    }

    /// An `OUT` of `size` bytes (1, 2 or 4) of `value` to `port` at time
    /// `now` (ns).
    pub fn write(&mut self, port: u16, size: u8, value: u32, now: u64) {
        if self.write_pci(port, size, value) {
            self.sync_lines();
            return;
        }
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
            self.write_byte(port.wrapping_add(i), (value >> (8 * i)) as u8, now);
        }
    }

    fn read_byte(&mut self, port: u16, now: u64) -> u8 {
        self.deadline = None;
        let v = match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => self.uart.read(p - COM1_BASE),
            0x20 | 0x21 | 0xA0 | 0xA1 => self.pic.read(port),
            0x40..=0x43 => self.pit.read(port, now),
            0x61 => self.pit.read_port61(now),
            0x70 | 0x71 => self.rtc.read(port, now),
            // System control port A: A20 enabled (bit 1), as QEMU's.
            0x92 => 0x02,
            _ => {
                self.unclaimed_reads += 1;
                0xFF
            }
        };
        self.sync_lines();
        v
    }

    fn write_byte(&mut self, port: u16, v: u8, now: u64) {
        self.deadline = None;
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => self.uart.write(p - COM1_BASE, v),
            0x20 | 0x21 | 0xA0 | 0xA1 => self.pic.write(port, v),
            0x40..=0x43 => self.pit.write(port, v, now),
            0x61 => self.pit.write_port61(v, now),
            0x70 | 0x71 => self.rtc.write(port, v, now),
            // The 8042's commands 0xF0-0xFF pulse the output-port bits whose
            // mask bit is 0; output-port bit 0 is the CPU's reset line.
            0x64 if v & 0xF1 == 0xF0 => self.reset = true,
            0x92 if v & 1 != 0 => self.reset = true,
            0x92 => {}
            _ => self.unclaimed_writes += 1,
        }
        self.sync_lines();
    }

    /// Level-driven lines into the PIC (the UART's INTR on IRQ4, the
    /// virtio disk's INTA# on its routed line).
    fn sync_lines(&mut self) {
        let uart = self.uart.irq();
        self.pic.set_irq(IRQ_COM1, uart);
        if let Some(v) = &self.virtio_blk {
            let line = v.irq();
            self.pic.set_irq(virtio::IRQ, line);
        }
        if let Some(b) = &self.balloon {
            let line = b.irq();
            self.pic.set_irq(virtio::BALLOON_IRQ, line);
        }
        if let Some((line, high)) = self.pv.irq() {
            self.pic.set_irq(line, high);
        }
    }

    /// A hypercall (VMCALL at CPL 0) with the registers `regs` at time
    /// `now` (ns): see [`pv`].
    pub fn hypercall(&mut self, regs: &mut [u32; 8], ram: &mut popek_memory::GuestRam, now: u64) {
        let mut console = Vec::new();
        self.pv.hypercall(regs, ram, &mut console, now);
        self.uart.push_output(&console);
        self.deadline = None;
        self.sync_lines();
    }

    /// Set the balloon target of both balloons, the virtio device (if the
    /// machine has one) and the paravirtual one, to `pages` pages: a guest
    /// drives one of them.
    pub fn set_balloon_target(&mut self, pages: u32) {
        if let Some(b) = &mut self.balloon {
            b.set_target(pages);
        }
        self.pv.set_target(pages);
        self.update_lines();
    }

    /// Pages held by the balloons (virtio and paravirtual).
    pub fn ballooned_pages(&self) -> u32 {
        self.balloon.as_ref().map_or(0, |b| b.dev.actual) + self.pv.held
    }

    /// The PCI function at device `dev` of bus 0 (function 0 only).
    fn function(&mut self, dev: u8, func: u8) -> Option<&mut pci::Function> {
        if func != 0 {
            return None;
        }
        match dev {
            0 => Some(&mut self.pci.host_bridge),
            virtio::SLOT => self.virtio_blk.as_mut().map(|v| &mut v.pci),
            virtio::BALLOON_SLOT => self.balloon.as_mut().map(|v| &mut v.pci),
            _ => None,
        }
    }

    /// A whole access to the PCI configuration ports or a PCI device's
    /// I/O BAR (registers wider than a byte are not split), if it is one.
    fn read_pci(&mut self, port: u16, size: u8) -> Option<u32> {
        match port {
            0xCF8..=0xCFB => Some(self.pci.read_address(port - 0xCF8, size)),
            0xCFC..=0xCFF => {
                let t = self.pci.target();
                Some(match t {
                    Some((dev, func, reg)) => {
                        let f = self.function(dev, func).map(|f| &*f);
                        pci::config_read(f, reg, port - 0xCFC, size)
                    }
                    None => pci::config_read(None, 0, 0, size),
                })
            }
            _ => {
                if let Some(v) = self.virtio_blk.as_mut() {
                    if let Some(off) = v.decodes(port) {
                        return Some(v.read(off, size));
                    }
                }
                let b = self.balloon.as_mut()?;
                let off = b.decodes(port)?;
                Some(b.read(off, size))
            }
        }
    }

    /// See [`Board::read_pci`]; true if the write was the PCI's.
    fn write_pci(&mut self, port: u16, size: u8, value: u32) -> bool {
        match port {
            0xCF8..=0xCFB => self.pci.write_address(port - 0xCF8, size, value),
            0xCFC..=0xCFF => {
                if let Some((dev, func, reg)) = self.pci.target() {
                    pci::config_write(self.function(dev, func), reg, port - 0xCFC, size, value);
                }
            }
            _ => {
                if let Some(v) = self.virtio_blk.as_mut() {
                    if let Some(off) = v.decodes(port) {
                        v.write(off, size, value);
                        return true;
                    }
                }
                let Some(b) = self.balloon.as_mut() else {
                    return false;
                };
                let Some(off) = b.decodes(port) else {
                    return false;
                };
                b.write(off, size, value);
            }
        }
        true
    }

    /// Bring the interrupt lines up to date after the host changed a
    /// device (the monitor asked the balloon for pages).
    pub fn update_lines(&mut self) {
        self.deadline = None;
        self.sync_lines();
    }

    /// A read of `size` bytes at physical address `addr` outside RAM, if
    /// a device's memory BAR decodes it (memory-mapped I/O).
    pub fn mmio_read(&mut self, addr: u32, size: u8) -> Option<u32> {
        let v = if let Some(off) = self.virtio_blk.as_ref().and_then(|v| v.decodes_mem(addr)) {
            self.virtio_blk.as_mut()?.mem_read(off, size)
        } else {
            let off = self.balloon.as_ref()?.decodes_mem(addr)?;
            self.balloon.as_mut()?.mem_read(off, size)
        };
        self.sync_lines();
        Some(v)
    }

    /// A write of `size` bytes at physical address `addr` outside RAM;
    /// true if a device's memory BAR took it.
    pub fn mmio_write(&mut self, addr: u32, size: u8, value: u32) -> bool {
        if let Some(off) = self.virtio_blk.as_ref().and_then(|v| v.decodes_mem(addr)) {
            if let Some(v) = self.virtio_blk.as_mut() {
                v.mem_write(off, size, value);
            }
        } else if let Some(off) = self.balloon.as_ref().and_then(|b| b.decodes_mem(addr)) {
            if let Some(b) = self.balloon.as_mut() {
                b.mem_write(off, size, value);
            }
        } else {
            return false;
        }
        self.sync_lines();
        true
    }

    /// Has a device work that needs guest RAM (a virtqueue notified)?
    pub fn dma_pending(&self) -> bool {
        self.virtio_blk.as_ref().is_some_and(|v| v.notified != 0)
            || self.balloon.as_ref().is_some_and(|b| b.notified != 0)
    }

    /// Let devices do their work on guest RAM (the CPU's OUT that
    /// notified them calls this).
    pub fn service_dma(&mut self, ram: &mut popek_memory::GuestRam) {
        if let Some(v) = &mut self.virtio_blk {
            v.service(ram);
        }
        if let Some(b) = &mut self.balloon {
            b.service(ram);
        }
        self.sync_lines();
    }

    /// Let time pass up to `now` (ns): timer edges, the RTC's periodic
    /// interrupt, finished transmissions.
    pub fn advance(&mut self, now: u64) {
        // Nothing can happen before the next deadline (cached until a
        // port access changes the devices).
        if self.deadline.is_some_and(|d| d.is_none_or(|t| now < t)) {
            return;
        }
        self.deadline = None;
        if let Some(edge) = self.pit.irq0_rose(now) {
            self.pic.pulse_irq(0);
            let late = now - edge;
            self.timer_late.0 += 1;
            self.timer_late.1 += late;
            self.timer_late.2 = self.timer_late.2.max(late);
        }
        if self.rtc.irq8_rose(now) {
            self.pic.pulse_irq(8);
        }
        self.uart.tick();
        self.sync_lines();
        self.next_deadline();
    }

    /// Bytes arrive on COM1's serial line.
    pub fn serial_input(&mut self, bytes: &[u8]) {
        self.uart.receive(bytes);
        self.sync_lines();
    }

    /// Is an interrupt request asserted to the CPU (unmasked, outranking
    /// what is in service)?
    pub fn interrupt_pending(&self) -> bool {
        self.pic.interrupt_pending()
    }

    /// The interrupt acknowledge: the vector to deliver, if one is pending.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let v = self.pic.acknowledge();
        self.sync_lines();
        v
    }

    /// The IRQ line (0-15) a vector came from, by the PICs' vector bases.
    pub fn irq_of(&self, vector: u8) -> Option<u8> {
        let m = self.pic.master.vector_base;
        let s = self.pic.slave.vector_base;
        if vector & 0xF8 == m {
            Some(vector & 7)
        } else if vector & 0xF8 == s {
            Some(8 + (vector & 7))
        } else {
            None
        }
    }

    /// The next time (ns) a device will raise an interrupt by itself (the
    /// timer, the RTC), if any: how long an idle CPU may sleep.
    pub fn next_deadline(&mut self) -> Option<u64> {
        if let Some(d) = self.deadline {
            return d;
        }
        // A byte in the transmitter is out at once (its THRE interrupt
        // comes at the next advance).
        let uart = self.uart.state.transmitting.then_some(0);
        let d = [uart, self.pit.next_irq0(), self.rtc.next_irq8()]
            .into_iter()
            .flatten()
            .min();
        self.deadline = Some(d);
        d
    }

    /// Has the guest asked to end the machine (isa-debug-exit)?
    pub fn exit_requested(&self) -> Option<i32> {
        self.debug_exit.exit_status()
    }

    /// Must the run loop look at the board before more guest code runs
    /// (the guest asked to end or reset the machine, or serial output waits
    /// to be written to the host)?
    pub fn needs_attention(&self) -> bool {
        self.exit_requested().is_some() || self.reset || self.uart.has_output()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_exit_status_matches_qemu_formula() {
        let mut bus = Board::new();
        assert_eq!(bus.exit_requested(), None);
        bus.write(DEBUG_EXIT_PORT, 1, 0x1234_5621, 0);
        // a byte write carries only the low byte
        assert_eq!(bus.exit_requested(), Some((0x21 << 1) | 1));
    }

    #[test]
    fn unclaimed_ports_read_ones() {
        let mut bus = Board::new();
        assert_eq!(bus.read(0x60, 1, 0), 0xFF);
        assert_eq!(bus.read(0x1234, 4, 0), 0xFFFF_FFFF);
        assert_eq!(bus.unclaimed_reads, 5);
    }

    #[test]
    fn uart_word_access_splits_into_bytes() {
        let mut bus = Board::new();
        bus.write(COM1_BASE, 1, u32::from(b'h'), 0);
        assert_eq!(bus.uart.take_output(), b"h");
        // LSR (offset 5) and MSR (offset 6) read as one 16-bit access
        let v = bus.read(COM1_BASE + 5, 2, 0);
        assert_eq!(v & 0xFF, 0x60);
    }

    /// The timer's edge reaches the CPU through the PIC as vector 8 in the
    /// firmware state, and the board says when it comes.
    #[test]
    fn the_firmware_timer_interrupts_through_the_pic() {
        let mut bus = Board::firmware(0, 64 << 20);
        let t = bus.next_deadline().unwrap();
        assert_eq!(t, pit::ns_of(65536));
        bus.advance(t - 1);
        assert!(!bus.interrupt_pending());
        bus.advance(t);
        assert!(bus.interrupt_pending());
        assert_eq!(bus.acknowledge(), Some(0x08));
        assert_eq!(bus.irq_of(0x08), Some(0));
        bus.write(0x20, 1, 0x20, t); // EOI
        assert!(!bus.interrupt_pending());
    }

    /// A kernel's reboot reaches the reset line through the 8042 (0xFE on
    /// port 0x64) or port 0x92 bit 0; other 8042 commands do not reset.
    #[test]
    fn the_8042_and_port_92_pulse_reset() {
        let mut bus = Board::new();
        bus.write(0x64, 1, 0xAD, 0); // disable keyboard: no reset
        bus.write(0x64, 1, 0xFF, 0); // pulse no bit
        assert!(!bus.reset && !bus.needs_attention());
        assert_eq!(bus.read(0x92, 1, 0), 0x02);
        bus.write(0x64, 1, 0xFE, 0);
        assert!(bus.reset && bus.needs_attention());
        let mut bus = Board::new();
        bus.write(0x92, 1, 0x03, 0);
        assert!(bus.reset);
    }

    /// The UART's interrupt reaches the slave-free IRQ4 once unmasked.
    #[test]
    fn the_uart_interrupt_is_irq4() {
        let mut bus = Board::firmware(0, 64 << 20);
        bus.write(0x21, 1, 0xEA, 0); // unmask IRQ4 too
        bus.write(COM1_BASE + 4, 1, 0x08, 0); // MCR.OUT2
        bus.write(COM1_BASE + 1, 1, 0x02, 0); // IER: THRE
        assert_eq!(bus.acknowledge(), Some(0x0C));
    }
}
