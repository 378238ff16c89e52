//! virtio devices over PCI, the legacy interface (Virtual I/O Device
//! specification v1.2: §4.1.4.10 "Legacy Interfaces: A Note on PCI Device
//! Layout", §2.7 split virtqueues with the legacy layout of §2.7.2): the
//! transport ([`VirtioPci`]) and two devices, the block device on a raw
//! disk image (§5.2, [`Blk`]) and the memory balloon (§5.5, [`Balloon`]).
//!
//! The registers sit in BAR 0 (I/O space): device features, driver
//! features, the selected queue's page frame number and size, queue
//! select and notify, the device status and the interrupt status (ISR),
//! then the device's configuration. A write to QUEUE_NOTIFY marks the
//! queue; the CPU's OUT then calls [`VirtioPci::service`] with guest RAM,
//! which walks the available ring, hands each descriptor chain to the
//! device and fills the used ring, then raises INTA# until the driver
//! reads the ISR.
//!
//! A driver that hands the device addresses outside RAM, descriptor
//! chains that loop or run past the queue, or malformed requests gets the
//! device's status bit DEVICE_NEEDS_RESET (§2.1.1) and the device stops
//! serving the queue until it is reset; nothing reaches the host file.

use std::sync::{Arc, Mutex};

use crate::image::Image;

use popek_memory::GuestRam;

use crate::pci::{reg, Function};

/// Legacy register offsets in BAR 0.
mod r {
    pub const HOST_FEATURES: u16 = 0x00;
    pub const GUEST_FEATURES: u16 = 0x04;
    pub const QUEUE_PFN: u16 = 0x08;
    pub const QUEUE_NUM: u16 = 0x0C;
    pub const QUEUE_SEL: u16 = 0x0E;
    pub const QUEUE_NOTIFY: u16 = 0x10;
    pub const STATUS: u16 = 0x12;
    pub const ISR: u16 = 0x13;
    /// The device configuration (no MSI-X: right after the ISR).
    pub const CONFIG: u16 = 0x14;
}

/// Feature bits (§5.2.3).
pub mod feature {
    /// seg_max in the configuration is valid.
    pub const SEG_MAX: u32 = 1 << 2;
    /// The device is read-only.
    pub const RO: u32 = 1 << 5;
    /// The device takes flush requests.
    pub const FLUSH: u32 = 1 << 9;
}

/// Device status bits (§2.1).
const NEEDS_RESET: u8 = 0x40;

/// Request types (§5.2.6).
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
/// Request status values.
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Descriptor flags (§2.7.5).
const D_NEXT: u16 = 1;
const D_WRITE: u16 = 2;
const D_INDIRECT: u16 = 4;

/// The queue size the device offers.
pub const QUEUE_SIZE: u16 = 128;
/// Bytes of BAR 0 (the legacy registers, I/O space).
const BAR_SIZE: u32 = 0x40;
/// Bytes of BAR 1 (the modern interface, memory space, §4.1.4): common
/// configuration, ISR, device configuration and notifications, a page
/// each.
pub const MEM_BAR_SIZE: u32 = 0x4000;
/// Offsets of the modern interface's structures in BAR 1.
mod m {
    pub const COMMON: u32 = 0x0000;
    pub const ISR: u32 = 0x1000;
    pub const DEVICE: u32 = 0x2000;
    pub const NOTIFY: u32 = 0x3000;
    /// Bytes between two queues' notification addresses.
    pub const NOTIFY_MULTIPLIER: u32 = 4;
}
/// VIRTIO_F_VERSION_1 (§6): offered only through the modern interface.
const VERSION_1_HI: u32 = 1;
/// The I/O base the firmware gives the disk's BAR 0.
pub const IO_BASE: u16 = 0xC000;
/// The memory base the firmware gives the disk's BAR 1 (in the PCI hole
/// below 4 GiB, as QEMU's firmware places BARs).
pub const MEM_BASE: u32 = 0xFE00_0000;
/// The PIC input INTA# is routed to.
pub const IRQ: u8 = 11;
/// The PCI device number.
pub const SLOT: u8 = 3;

/// A disk image as the block device sees it.
#[derive(Debug, Clone)]
pub struct Disk {
    /// The image (raw, or an overlay over a base).
    pub image: Arc<Mutex<Image>>,
    /// Its path (absolute), as snapshots and migration name it.
    pub path: std::path::PathBuf,
    /// Its size in 512-byte sectors.
    pub sectors: u64,
    /// Opened read-only (the guest's writes fail).
    pub readonly: bool,
    /// Bytes read and written by the guest, requests served.
    pub read_bytes: u64,
    /// See `read_bytes`.
    pub written_bytes: u64,
    /// See `read_bytes`.
    pub requests: u64,
}

impl Disk {
    /// Open an image: raw, or a pcow overlay (found by its magic, or
    /// named by `format`).
    pub fn open(path: &str, format: Option<&str>, readonly: bool) -> Result<Disk, String> {
        let image = Image::open(std::path::Path::new(path), format, !readonly)?;
        let size = image.size()?;
        Ok(Disk {
            image: Arc::new(Mutex::new(image)),
            path: std::path::absolute(path).unwrap_or_else(|_| path.into()),
            sectors: size / 512,
            readonly,
            read_bytes: 0,
            written_bytes: 0,
            requests: 0,
        })
    }

    /// What identifies the image file's present contents without reading
    /// them: its size, modification time (ns) and inode. A snapshot
    /// records it; resuming checks that nobody wrote the file since.
    pub fn fingerprint(&self) -> Result<[u64; 3], String> {
        use std::os::unix::fs::MetadataExt;
        let m =
            std::fs::metadata(&self.path).map_err(|e| format!("{}: {e}", self.path.display()))?;
        let mtime = (m.mtime() as u64)
            .wrapping_mul(1_000_000_000)
            .wrapping_add(m.mtime_nsec() as u64);
        Ok([m.len(), mtime, m.ino()])
    }

    /// Read at byte `off`.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.image
            .lock()
            .map_err(|_| std::io::Error::other("the image lock is poisoned"))?
            .read_at(buf, off)
    }

    /// Write at byte `off`.
    pub fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.image
            .lock()
            .map_err(|_| std::io::Error::other("the image lock is poisoned"))?
            .write_at(buf, off)
    }

    /// Make what was written durable.
    pub fn flush(&self) -> std::io::Result<()> {
        self.image
            .lock()
            .map_err(|_| std::io::Error::other("the image lock is poisoned"))?
            .flush()
    }
}

/// One buffer of a descriptor chain: guest-physical address, length,
/// device-writable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Guest-physical address (checked to lie in RAM).
    pub addr: u32,
    /// Length in bytes.
    pub len: u32,
    /// The device writes it (else it reads it).
    pub write: bool,
}

/// What a virtio device does with the chains its driver makes available.
pub trait Device {
    /// The virtio device type (PCI subsystem ID: 2 block, 5 balloon).
    const TYPE: u16;
    /// PCI device ID of the transitional device (0x1000 + TYPE - 1).
    const PCI_ID: u16;
    /// PCI class code.
    const CLASS: u32;
    /// Number of virtqueues.
    const QUEUES: usize;
    /// Feature bits offered.
    fn features(&self) -> u32;
    /// The device configuration, from its first byte.
    fn config(&self) -> Vec<u8>;
    /// The driver wrote byte `v` at configuration offset `off`.
    fn config_write(&mut self, off: usize, v: u8);
    /// Serve one chain from queue `q`: the bytes written into the
    /// driver's buffers, or why the chain is malformed.
    fn serve(&mut self, q: usize, chain: &[Buffer], ram: &mut GuestRam) -> Result<u32, String>;
}

/// One virtqueue's state: where its three parts are (set by a legacy
/// driver as one page frame number, by a modern one part by part), its
/// size, and the next entry of the available ring to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queue {
    /// Legacy page frame number (0: not set up that way).
    pub pfn: u32,
    /// Modern: the descriptor table, driver (available) and device (used)
    /// areas, the size, and whether the driver enabled it.
    pub desc: u64,
    /// See `desc`.
    pub driver: u64,
    /// See `desc`.
    pub device: u64,
    /// See `desc`.
    pub size: u16,
    /// See `desc`.
    pub enabled: bool,
    /// Next available-ring entry to serve.
    pub last_avail: u16,
}

impl Default for Queue {
    fn default() -> Self {
        Queue {
            pfn: 0,
            desc: 0,
            driver: 0,
            device: 0,
            size: QUEUE_SIZE,
            enabled: false,
            last_avail: 0,
        }
    }
}

impl Queue {
    /// (descriptor table, available ring, used ring, size), if the queue
    /// is set up (§2.7.2 for the legacy layout).
    fn layout(&self) -> Option<(u64, u64, u64, u16)> {
        if self.enabled {
            return Some((self.desc, self.driver, self.device, self.size));
        }
        if self.pfn == 0 {
            return None;
        }
        let n = u64::from(QUEUE_SIZE);
        let desc = u64::from(self.pfn) << 12;
        let avail = desc + 16 * n;
        let used = (avail + 6 + 2 * n).next_multiple_of(4096);
        Some((desc, avail, used, QUEUE_SIZE))
    }
}

/// A virtio device on the PCI bus through the legacy interface.
#[derive(Debug, Clone)]
pub struct VirtioPci<D> {
    /// Its configuration space.
    pub pci: Function,
    /// The device.
    pub dev: D,
    /// Features the driver acknowledged.
    pub guest_features: u32,
    /// The queues.
    pub queues: Vec<Queue>,
    /// The selected queue.
    pub queue_sel: u16,
    /// Device status.
    pub status: u8,
    /// Interrupt status: bit 0 used-ring update, bit 1 configuration change.
    pub isr: u8,
    /// Queues notified since the last service (one bit each).
    pub notified: u32,
    /// Why the device stopped, if it did.
    pub broken: Option<String>,
    /// Modern interface: the feature words selected, the driver's
    /// features above bit 31.
    pub device_feature_select: u32,
    /// See `device_feature_select`.
    pub driver_feature_select: u32,
    /// See `device_feature_select`.
    pub guest_features_hi: u32,
}

impl<D: Device> VirtioPci<D> {
    /// The device as a firmware leaves it: PCI device `slot`, BAR 0 (the
    /// legacy registers) at `io_base`, BAR 1 (the modern interface) at
    /// `mem_base`, INTA# on `irq`, decoding off until the driver enables
    /// it. A transitional device (§4.1.2.3): legacy drivers use BAR 0,
    /// modern ones find BAR 1's structures through vendor capabilities.
    pub fn new(dev: D, slot: u8, io_base: u16, mem_base: u32, irq: u8) -> VirtioPci<D> {
        // Red Hat's virtio vendor ID, the transitional device ID.
        let mut pci = Function::new(slot, 0x1AF4, D::PCI_ID, D::CLASS);
        pci.set16(reg::SUBSYSTEM_VENDOR, 0x1AF4);
        pci.set16(reg::SUBSYSTEM, D::TYPE);
        pci.io_bar(0, BAR_SIZE, u32::from(io_base));
        if mem_base != 0 {
            pci.mem_bar(1, MEM_BAR_SIZE, mem_base);
            // struct virtio_pci_cap (§4.1.4): cap_len, cfg_type, bar, id,
            // padding, offset, length (and the notify multiplier).
            let cap = |kind: u8, off: u32, len: u32, extra: Option<u32>| {
                let mut b = vec![if extra.is_some() { 20 } else { 16 }, kind, 1, 0, 0, 0];
                b.extend_from_slice(&off.to_le_bytes());
                b.extend_from_slice(&len.to_le_bytes());
                if let Some(x) = extra {
                    b.extend_from_slice(&x.to_le_bytes());
                }
                b
            };
            pci.add_capability(0x40, 0x09, &cap(1, m::COMMON, 0x38, None));
            pci.add_capability(0x50, 0x09, &cap(3, m::ISR, 1, None));
            pci.add_capability(0x60, 0x09, &cap(4, m::DEVICE, 0x100, None));
            pci.add_capability(
                0x70,
                0x09,
                &cap(2, m::NOTIFY, 0x1000, Some(m::NOTIFY_MULTIPLIER)),
            );
        }
        pci.route_intx(irq);
        VirtioPci {
            pci,
            dev,
            guest_features: 0,
            queues: vec![Queue::default(); D::QUEUES],
            queue_sel: 0,
            status: 0,
            isr: 0,
            notified: 0,
            broken: None,
            device_feature_select: 0,
            driver_feature_select: 0,
            guest_features_hi: 0,
        }
    }

    /// Does an I/O access at `port` fall in BAR 0? Its offset.
    pub fn decodes(&self, port: u16) -> Option<u16> {
        let base = self.pci.io_base(0)?;
        port.checked_sub(base).filter(|&o| u32::from(o) < BAR_SIZE)
    }

    /// Does a memory access at `addr` fall in BAR 1? Its offset.
    pub fn decodes_mem(&self, addr: u32) -> Option<u32> {
        let base = self.pci.mem_base(1)?;
        addr.checked_sub(base).filter(|&o| o < MEM_BAR_SIZE)
    }

    /// The modern common configuration structure (§4.1.4.3) as it reads
    /// now.
    fn common(&self) -> [u8; 0x38] {
        let mut c = [0u8; 0x38];
        let sel = usize::from(self.queue_sel);
        let q = self.queues.get(sel).copied();
        let features = match self.device_feature_select {
            0 => self.dev.features(),
            1 => VERSION_1_HI,
            _ => 0,
        };
        let driver = match self.driver_feature_select {
            0 => self.guest_features,
            1 => self.guest_features_hi,
            _ => 0,
        };
        let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
        put(0x00, &self.device_feature_select.to_le_bytes());
        put(0x04, &features.to_le_bytes());
        put(0x08, &self.driver_feature_select.to_le_bytes());
        put(0x0C, &driver.to_le_bytes());
        put(0x10, &0xFFFFu16.to_le_bytes()); // no MSI-X
        put(0x12, &(self.queues.len() as u16).to_le_bytes());
        put(0x14, &[self.status, 0]);
        put(0x16, &self.queue_sel.to_le_bytes());
        put(0x18, &q.map_or(0, |q| q.size).to_le_bytes());
        put(0x1A, &0xFFFFu16.to_le_bytes());
        put(0x1C, &u16::from(q.is_some_and(|q| q.enabled)).to_le_bytes());
        put(0x1E, &self.queue_sel.to_le_bytes());
        put(0x20, &q.map_or(0, |q| q.desc).to_le_bytes());
        put(0x28, &q.map_or(0, |q| q.driver).to_le_bytes());
        put(0x30, &q.map_or(0, |q| q.device).to_le_bytes());
        c
    }

    /// A read of `size` bytes at BAR 1 offset `off`.
    pub fn mem_read(&mut self, off: u32, size: u8) -> u32 {
        let bytes: Vec<u8> = match off {
            o if o < m::ISR => self.common().to_vec(),
            o if o < m::DEVICE => {
                // Reading the ISR clears it (§4.1.4.5).
                return if o == m::ISR {
                    u32::from(std::mem::take(&mut self.isr))
                } else {
                    0
                };
            }
            o if o < m::NOTIFY => self.dev.config(),
            _ => return 0,
        };
        let base = off & !0xFFF;
        let at = (off - base) as usize;
        let mut v = 0u32;
        for i in (0..usize::from(size)).rev() {
            v = v << 8 | u32::from(bytes.get(at + i).copied().unwrap_or(0));
        }
        v
    }

    /// A write of `size` bytes of `value` at BAR 1 offset `off`.
    pub fn mem_write(&mut self, off: u32, size: u8, value: u32) {
        let sel = usize::from(self.queue_sel);
        match off {
            o if o < m::ISR => {
                let half = |old: u64, hi: bool| {
                    if hi {
                        (old & 0xFFFF_FFFF) | (u64::from(value) << 32)
                    } else {
                        (old & !0xFFFF_FFFF) | u64::from(value)
                    }
                };
                match o {
                    0x00 => self.device_feature_select = value,
                    0x08 => self.driver_feature_select = value,
                    0x0C => match self.driver_feature_select {
                        0 => self.guest_features = value & self.dev.features(),
                        1 => self.guest_features_hi = value & VERSION_1_HI,
                        _ => {}
                    },
                    0x14 => {
                        self.status = value as u8;
                        if self.status == 0 {
                            self.reset();
                        }
                    }
                    0x16 => self.queue_sel = value as u16,
                    _ if sel >= self.queues.len() => {}
                    0x18 => {
                        let n = value as u16;
                        // A power of two no larger than what is offered.
                        if n.is_power_of_two() && n <= QUEUE_SIZE {
                            self.queues[sel].size = n;
                        }
                    }
                    0x1C => {
                        let q = &mut self.queues[sel];
                        q.enabled = value & 1 != 0;
                        q.last_avail = 0;
                    }
                    0x20 | 0x24 => {
                        let q = &mut self.queues[sel];
                        q.desc = half(q.desc, o == 0x24);
                    }
                    0x28 | 0x2C => {
                        let q = &mut self.queues[sel];
                        q.driver = half(q.driver, o == 0x2C);
                    }
                    0x30 | 0x34 => {
                        let q = &mut self.queues[sel];
                        q.device = half(q.device, o == 0x34);
                    }
                    _ => {}
                }
                let _ = size;
            }
            o if (m::DEVICE..m::NOTIFY).contains(&o) => {
                for i in 0..u32::from(size) {
                    self.dev
                        .config_write((o - m::DEVICE + i) as usize, (value >> (8 * i)) as u8);
                }
            }
            o if o >= m::NOTIFY => {
                let q = (o - m::NOTIFY) / m::NOTIFY_MULTIPLIER;
                if (q as usize) < self.queues.len() {
                    self.notified |= 1 << q;
                }
            }
            _ => {}
        }
    }

    /// Is INTA# asserted?
    pub fn irq(&self) -> bool {
        self.isr != 0 && self.pci.get16(reg::COMMAND) & crate::pci::command::INTX_DISABLE == 0
    }

    /// The configuration changed (the host asked something of the
    /// driver): a configuration interrupt.
    pub fn config_changed(&mut self) {
        self.isr |= 2;
    }

    fn reset(&mut self) {
        self.guest_features = 0;
        self.guest_features_hi = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queues.fill(Queue::default());
        self.queue_sel = 0;
        self.status = 0;
        self.isr = 0;
        self.notified = 0;
        self.broken = None;
    }

    /// Read `size` bytes at BAR offset `off`.
    pub fn read(&mut self, off: u16, size: u8) -> u32 {
        let mut v = 0u32;
        for i in (0..u16::from(size)).rev() {
            v = v << 8 | u32::from(self.read_byte(off + i));
        }
        v
    }

    fn read_byte(&mut self, off: u16) -> u8 {
        let le = |v: u32, at: u16, base: u16| (v >> (8 * (at - base))) as u8;
        let sel = usize::from(self.queue_sel);
        match off {
            r::HOST_FEATURES..=0x03 => le(self.dev.features(), off, r::HOST_FEATURES),
            r::GUEST_FEATURES..=0x07 => le(self.guest_features, off, r::GUEST_FEATURES),
            r::QUEUE_PFN..=0x0B => le(self.queues.get(sel).map_or(0, |q| q.pfn), off, r::QUEUE_PFN),
            r::QUEUE_NUM..=0x0D => {
                let n = if sel < self.queues.len() {
                    QUEUE_SIZE
                } else {
                    0
                };
                le(u32::from(n), off, r::QUEUE_NUM)
            }
            r::QUEUE_SEL..=0x0F => le(u32::from(self.queue_sel), off, r::QUEUE_SEL),
            r::STATUS => self.status,
            r::ISR => std::mem::take(&mut self.isr),
            o if o >= r::CONFIG => self
                .dev
                .config()
                .get(usize::from(o - r::CONFIG))
                .copied()
                .unwrap_or(0),
            _ => 0,
        }
    }

    /// Write `size` bytes of `value` at BAR offset `off`.
    pub fn write(&mut self, off: u16, size: u8, value: u32) {
        let set = |old: u32, base: u16| -> u32 {
            let mut v = old;
            for i in 0..u16::from(size) {
                let at = off + i;
                if (base..base + 4).contains(&at) {
                    let sh = 8 * u32::from(at - base);
                    v = (v & !(0xFF << sh)) | (((value >> (8 * i)) & 0xFF) << sh);
                }
            }
            v
        };
        let sel = usize::from(self.queue_sel);
        match off {
            r::GUEST_FEATURES => {
                self.guest_features = set(self.guest_features, off) & self.dev.features()
            }
            r::QUEUE_PFN if sel < self.queues.len() => {
                let q = &mut self.queues[sel];
                q.pfn = set(q.pfn, off);
                q.last_avail = 0;
            }
            r::QUEUE_SEL => self.queue_sel = value as u16,
            r::QUEUE_NOTIFY if usize::from(value as u16) < self.queues.len() => {
                self.notified |= 1 << (value as u16)
            }
            r::STATUS => {
                self.status = value as u8;
                if self.status == 0 {
                    self.reset();
                }
            }
            o if o >= r::CONFIG => {
                for i in 0..u16::from(size) {
                    self.dev
                        .config_write(usize::from(o - r::CONFIG + i), (value >> (8 * i)) as u8);
                }
            }
            _ => {}
        }
    }

    /// Serve the notified queues: every chain the driver made available,
    /// then the interrupt.
    pub fn service(&mut self, ram: &mut GuestRam) {
        let notified = std::mem::take(&mut self.notified);
        if self.broken.is_some() {
            return;
        }
        for q in 0..self.queues.len() {
            if notified & (1 << q) == 0 {
                continue;
            }
            if let Err(why) = self.serve_queue(q, ram) {
                // The driver gets DEVICE_NEEDS_RESET and a configuration
                // interrupt; the device serves nothing more until a reset.
                self.broken = Some(why);
                self.status |= NEEDS_RESET;
                self.isr |= 2;
                return;
            }
        }
    }

    fn serve_queue(&mut self, q: usize, ram: &mut GuestRam) -> Result<(), String> {
        let Some((desc, avail, used, size)) = self.queues[q].layout() else {
            return Ok(());
        };
        let n = u64::from(size);
        let ram_end = u64::from(ram.size());
        // (Guest-chosen addresses: no sum may wrap.)
        let beyond = |at: u64, len: u64| at.checked_add(len).is_none_or(|e| e > ram_end);
        if size == 0
            || size > QUEUE_SIZE
            || beyond(desc, 16 * n)
            || beyond(avail, 6 + 2 * n)
            || beyond(used, 6 + 8 * n)
        {
            return Err(format!("queue {q} at {desc:#x} lies outside RAM"));
        }
        let (avail, used) = (avail as u32, used as u32);
        let avail_idx = ram.read(avail + 2, 2) as u16;
        if avail_idx.wrapping_sub(self.queues[q].last_avail) > size {
            return Err("the available index ran more than a queue ahead".into());
        }
        let mut served = false;
        while self.queues[q].last_avail != avail_idx {
            let slot = u32::from(self.queues[q].last_avail % size);
            let head = ram.read(avail + 4 + 2 * slot, 2) as u16;
            let chain = chain(ram, desc, head, size)?;
            let written = self.dev.serve(q, &chain, ram)?;
            let ui = ram.read(used + 2, 2) as u16;
            let at = used + 4 + 8 * u32::from(ui % size);
            ram.write(at, 4, u64::from(head));
            ram.write(at + 4, 4, u64::from(written));
            ram.write(used + 2, 2, u64::from(ui.wrapping_add(1)));
            self.queues[q].last_avail = self.queues[q].last_avail.wrapping_add(1);
            served = true;
        }
        // VRING_AVAIL_F_NO_INTERRUPT: the driver asks for no interrupt.
        if served && ram.read(avail, 2) & 1 == 0 {
            self.isr |= 1;
        }
        Ok(())
    }
}

/// The descriptor chain from `head`, checked: in RAM, no loops, no
/// indirect tables (not offered).
fn chain(ram: &GuestRam, desc: u64, head: u16, size: u16) -> Result<Vec<Buffer>, String> {
    let mut chain = Vec::new();
    let mut i = head;
    loop {
        if i >= size || chain.len() >= usize::from(size) {
            return Err(format!(
                "descriptor chain from {head} loops or leaves the queue"
            ));
        }
        let d = (desc + 16 * u64::from(i)) as u32;
        let addr = ram.read(d, 8);
        let len = ram.read(d + 8, 4) as u32;
        let flags = ram.read(d + 12, 2) as u16;
        let next = ram.read(d + 14, 2) as u16;
        if flags & D_INDIRECT != 0 {
            return Err("an indirect descriptor, which the device did not offer".into());
        }
        if addr
            .checked_add(u64::from(len))
            .is_none_or(|e| e > u64::from(ram.size()))
        {
            return Err(format!(
                "a buffer at {addr:#x} ({len} bytes) lies outside RAM"
            ));
        }
        chain.push(Buffer {
            addr: addr as u32,
            len,
            write: flags & D_WRITE != 0,
        });
        if flags & D_NEXT == 0 {
            return Ok(chain);
        }
        i = next;
    }
}

/// The block device (§5.2) on a raw image.
#[derive(Debug, Clone)]
pub struct Blk {
    /// The image.
    pub disk: Disk,
}

/// The virtio-blk PCI function.
pub type VirtioBlk = VirtioPci<Blk>;

impl VirtioBlk {
    /// A virtio disk at PCI slot [`SLOT`], BAR 0 at [`IO_BASE`], INTA# on
    /// [`IRQ`].
    pub fn disk(disk: Disk) -> VirtioBlk {
        VirtioPci::new(Blk { disk }, SLOT, IO_BASE, MEM_BASE, IRQ)
    }
}

impl Device for Blk {
    const TYPE: u16 = 2;
    const PCI_ID: u16 = 0x1001;
    // Mass storage (SCSI), as QEMU's.
    const CLASS: u32 = 0x01_00_00;
    const QUEUES: usize = 1;

    fn features(&self) -> u32 {
        feature::SEG_MAX | feature::FLUSH | if self.disk.readonly { feature::RO } else { 0 }
    }

    fn config(&self) -> Vec<u8> {
        let mut c = vec![0u8; 0x18];
        c[0..8].copy_from_slice(&self.disk.sectors.to_le_bytes());
        // size_max (not offered), seg_max
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        c
    }

    fn config_write(&mut self, _off: usize, _v: u8) {}

    fn serve(&mut self, _q: usize, chain: &[Buffer], ram: &mut GuestRam) -> Result<u32, String> {
        let (h, rest) = chain.split_first().expect("a chain has a buffer");
        let Some((st, data)) = rest.split_last() else {
            return Err("a request without a status byte".into());
        };
        if h.len < 16 || h.write || st.len < 1 || !st.write {
            return Err("a malformed request header or status".into());
        }
        let kind = ram.read(h.addr, 4) as u32;
        let sector = ram.read(h.addr + 8, 8);
        let disk = &mut self.disk;
        disk.requests += 1;
        let mut written = 0u32;
        let status = match kind {
            T_IN | T_OUT => {
                let total: u64 = data.iter().map(|d| u64::from(d.len)).sum();
                let ok_dir = data.iter().all(|d| d.write == (kind == T_IN));
                let beyond = sector.saturating_mul(512).saturating_add(total) > disk.sectors * 512;
                if !ok_dir || beyond || (kind == T_OUT && disk.readonly) {
                    S_IOERR
                } else {
                    let mut pos = sector * 512;
                    let mut st = S_OK;
                    for b in data {
                        let r = if kind == T_IN {
                            let mut buf = vec![0u8; b.len as usize];
                            disk.read_at(&mut buf, pos).map(|()| {
                                ram.load(b.addr, &buf);
                                written += b.len;
                                disk.read_bytes += u64::from(b.len);
                            })
                        } else {
                            let a = b.addr as usize;
                            let buf = &ram.as_slice()[a..a + b.len as usize];
                            disk.write_at(buf, pos).map(|()| {
                                disk.written_bytes += u64::from(b.len);
                            })
                        };
                        if r.is_err() {
                            st = S_IOERR;
                            break;
                        }
                        pos += u64::from(b.len);
                    }
                    st
                }
            }
            T_FLUSH => {
                if disk.readonly || disk.flush().is_ok() {
                    S_OK
                } else {
                    S_IOERR
                }
            }
            T_GET_ID => {
                let id = b"popek-virtio-blk\0\0\0\0";
                match data.first() {
                    Some(b) if b.write => {
                        let n = (b.len as usize).min(id.len());
                        ram.load(b.addr, &id[..n]);
                        written += n as u32;
                        S_OK
                    }
                    _ => S_IOERR,
                }
            }
            _ => S_UNSUPP,
        };
        ram.write(st.addr, 1, u64::from(status));
        Ok(written + 1)
    }
}

/// The memory balloon (§5.5): the host sets how many pages it wants
/// (`num_pages`), the driver hands page frame numbers over on the inflate
/// queue and takes them back on the deflate queue, and reports how many it
/// holds (`actual`). Inflated pages are released on the host (their
/// memory freed: they read as zeros if the guest touches them again).
#[derive(Debug, Clone, Default)]
pub struct Balloon {
    /// Pages the host asks the balloon to hold.
    pub num_pages: u32,
    /// Pages the driver says it holds.
    pub actual: u32,
    /// Pages inflated (handed over) and deflated (taken back), counted.
    pub inflated: u64,
    /// See `inflated`.
    pub deflated: u64,
}

/// The virtio-balloon PCI function.
pub type VirtioBalloon = VirtioPci<Balloon>;

/// The balloon's PCI slot, BAR and interrupt line.
pub const BALLOON_SLOT: u8 = 4;
/// See [`BALLOON_SLOT`].
pub const BALLOON_IO_BASE: u16 = 0xC040;
/// See [`BALLOON_SLOT`].
pub const BALLOON_IRQ: u8 = 10;
/// See [`BALLOON_SLOT`].
pub const BALLOON_MEM_BASE: u32 = MEM_BASE + MEM_BAR_SIZE;

impl VirtioBalloon {
    /// A balloon at PCI slot [`BALLOON_SLOT`].
    pub fn balloon() -> VirtioBalloon {
        VirtioPci::new(
            Balloon::default(),
            BALLOON_SLOT,
            BALLOON_IO_BASE,
            BALLOON_MEM_BASE,
            BALLOON_IRQ,
        )
    }

    /// Ask the guest to hold `pages` pages in the balloon.
    pub fn set_target(&mut self, pages: u32) {
        self.dev.num_pages = pages;
        self.config_changed();
    }
}

impl Device for Balloon {
    const TYPE: u16 = 5;
    const PCI_ID: u16 = 0x1002;
    // "Other" class (0xFF), as QEMU's.
    const CLASS: u32 = 0xFF_00_00;
    const QUEUES: usize = 2;

    fn features(&self) -> u32 {
        // VIRTIO_BALLOON_F_MUST_TELL_HOST (bit 0): the driver tells the
        // host before it uses deflated pages.
        1
    }

    fn config(&self) -> Vec<u8> {
        let mut c = vec![0u8; 8];
        c[0..4].copy_from_slice(&self.num_pages.to_le_bytes());
        c[4..8].copy_from_slice(&self.actual.to_le_bytes());
        c
    }

    fn config_write(&mut self, off: usize, v: u8) {
        if (4..8).contains(&off) {
            let sh = 8 * (off - 4);
            self.actual = (self.actual & !(0xFF << sh)) | (u32::from(v) << sh);
        }
    }

    fn serve(&mut self, q: usize, chain: &[Buffer], ram: &mut GuestRam) -> Result<u32, String> {
        let pages = ram.size() / 4096;
        for b in chain {
            if b.write || b.len % 4 != 0 {
                return Err("a balloon buffer that is not a list of page numbers".into());
            }
            for i in 0..b.len / 4 {
                let pfn = ram.read(b.addr + 4 * i, 4) as u32;
                if pfn >= pages {
                    return Err(format!("page frame {pfn:#x} lies outside RAM"));
                }
                if q == 0 {
                    ram.release_page(pfn);
                    self.inflated += 1;
                } else {
                    self.deflated += 1;
                }
            }
        }
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::command;

    /// A disk of `sectors` sectors, sector i filled with byte i.
    fn disk(sectors: u64, readonly: bool) -> Disk {
        let path = std::env::temp_dir().join(format!(
            "popek-virtio-{}-{:?}.img",
            std::process::id(),
            std::thread::current().id()
        ));
        let mut b = Vec::new();
        for i in 0..sectors {
            b.extend_from_slice(&[i as u8; 512]);
        }
        std::fs::write(&path, b).unwrap();
        let d = Disk::open(path.to_str().unwrap(), None, readonly).unwrap();
        std::fs::remove_file(&path).unwrap();
        d
    }

    /// The queue at 0x10000 (PFN 0x10): descriptors, available ring at
    /// +0x800, used ring at +0x1000.
    const Q: u32 = 0x10000;
    const AVAIL: u32 = Q + 16 * QUEUE_SIZE as u32;
    const USED: u32 = Q + 0x1000;

    fn device(d: Disk) -> (VirtioBlk, GuestRam) {
        let mut v = VirtioBlk::disk(d);
        v.pci.set16(reg::COMMAND, command::IO | command::MASTER);
        v.write(r::STATUS, 1, 1 | 2 | 4);
        v.write(r::QUEUE_PFN, 4, Q >> 12);
        (v, GuestRam::new(1 << 20).unwrap())
    }

    fn desc(ram: &mut GuestRam, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = Q + 16 * u32::from(i);
        ram.write(d, 8, addr);
        ram.write(d + 8, 4, u64::from(len));
        ram.write(d + 12, 2, u64::from(flags));
        ram.write(d + 14, 2, u64::from(next));
    }

    /// Make descriptor chain `head` available and notify.
    fn submit<D: Device>(v: &mut VirtioPci<D>, ram: &mut GuestRam, head: u16) {
        let idx = ram.read(AVAIL + 2, 2) as u16;
        ram.write(
            AVAIL + 4 + 2 * u32::from(idx % QUEUE_SIZE),
            2,
            u64::from(head),
        );
        ram.write(AVAIL + 2, 2, u64::from(idx.wrapping_add(1)));
        v.write(r::QUEUE_NOTIFY, 2, 0);
        v.service(ram);
    }

    /// A request: header at 0x20000, data at 0x21000, status at 0x22000.
    fn request(v: &mut VirtioBlk, ram: &mut GuestRam, kind: u32, sector: u64, len: u32) -> u8 {
        ram.write(0x20000, 4, u64::from(kind));
        ram.write(0x20008, 8, sector);
        ram.write(0x22000, 1, 0xFF);
        let write = kind == T_IN;
        desc(ram, 0, 0x20000, 16, D_NEXT, 1);
        desc(
            ram,
            1,
            0x21000,
            len,
            D_NEXT | if write { D_WRITE } else { 0 },
            2,
        );
        desc(ram, 2, 0x22000, 1, D_WRITE, 0);
        submit(v, ram, 0);
        ram.read(0x22000, 1) as u8
    }

    /// Reads and writes reach the image; the used ring, the ISR and
    /// INTA# follow (§2.7.8, §4.1.4.5); reading the ISR clears it.
    #[test]
    fn requests_reach_the_image_and_complete_in_the_used_ring() {
        let (mut v, mut ram) = device(disk(16, false));
        assert_eq!(v.read(r::CONFIG, 4), 16, "capacity in sectors");
        assert_eq!(request(&mut v, &mut ram, T_IN, 3, 1024), S_OK);
        assert_eq!(ram.read(0x21000, 1), 3);
        assert_eq!(ram.read(0x21200, 1), 4);
        assert_eq!(ram.read(USED + 2, 2), 1, "used index");
        assert_eq!(
            ram.read(USED + 8, 4),
            1025,
            "bytes written: data and status"
        );
        assert!(v.irq());
        assert_eq!(v.read(r::ISR, 1), 1);
        assert!(!v.irq(), "reading the ISR deasserts INTA#");
        ram.load(0x21000, &[0xAB; 512]);
        assert_eq!(request(&mut v, &mut ram, T_OUT, 5, 512), S_OK);
        let mut b = [0u8; 512];
        v.dev.disk.read_at(&mut b, 5 * 512).unwrap();
        assert_eq!(b, [0xAB; 512]);
        assert_eq!(request(&mut v, &mut ram, T_FLUSH, 0, 0), S_OK);
        assert_eq!(
            request(&mut v, &mut ram, T_IN, 15, 1024),
            S_IOERR,
            "past the end"
        );
        assert_eq!(request(&mut v, &mut ram, 77, 0, 512), S_UNSUPP);
    }

    /// A read-only image: writes fail with IOERR and the file keeps its
    /// bytes; the device says RO.
    #[test]
    fn a_read_only_image_refuses_writes() {
        let (mut v, mut ram) = device(disk(4, true));
        assert_ne!(v.read(r::HOST_FEATURES, 4) & feature::RO, 0);
        ram.load(0x21000, &[0xCD; 512]);
        assert_eq!(request(&mut v, &mut ram, T_OUT, 1, 512), S_IOERR);
        let mut b = [0u8; 512];
        v.dev.disk.read_at(&mut b, 512).unwrap();
        assert_eq!(b, [1; 512]);
    }

    /// Wild buffers and looping chains: the device sets
    /// DEVICE_NEEDS_RESET (§2.1.1), raises a configuration interrupt and
    /// serves nothing more until the driver resets it.
    #[test]
    fn wild_addresses_and_loops_stop_the_device() {
        for (what, setup) in [
            ("a buffer beyond RAM", 0),
            ("a chain that loops", 1),
            ("a queue beyond RAM", 2),
        ] {
            let (mut v, mut ram) = device(disk(4, false));
            match setup {
                0 => {
                    desc(&mut ram, 0, 0x20000, 16, D_NEXT, 1);
                    desc(&mut ram, 1, 0xFFFF_F000, 4096, D_NEXT | D_WRITE, 2);
                    desc(&mut ram, 2, 0x22000, 1, D_WRITE, 0);
                    submit(&mut v, &mut ram, 0);
                }
                1 => {
                    desc(&mut ram, 0, 0x20000, 16, D_NEXT, 1);
                    desc(&mut ram, 1, 0x21000, 512, D_NEXT, 0);
                    submit(&mut v, &mut ram, 0);
                }
                _ => {
                    v.write(r::QUEUE_PFN, 4, 0xFFFF0);
                    v.write(r::QUEUE_NOTIFY, 2, 0);
                    v.service(&mut ram);
                }
            }
            assert_ne!(v.read(r::STATUS, 1) as u8 & NEEDS_RESET, 0, "{what}");
            assert!(v.broken.is_some(), "{what}");
            assert_eq!(v.read(r::ISR, 1), 2, "{what}: configuration interrupt");
            // Nothing more is served until a reset.
            assert_eq!(request(&mut v, &mut ram, T_IN, 0, 512), 0xFF, "{what}");
            v.write(r::STATUS, 1, 0);
            assert!(v.broken.is_none() && v.queues[0].pfn == 0, "{what}: reset");
        }
    }

    /// The balloon: the host's target in the configuration with a
    /// configuration interrupt; inflated page frames are released on the
    /// host (they read as zeros); a frame outside RAM stops the device.
    #[test]
    fn the_balloon_releases_inflated_pages() {
        let mut b = VirtioBalloon::balloon();
        b.pci.set16(reg::COMMAND, command::IO | command::MASTER);
        let mut ram = GuestRam::new(1 << 20).unwrap();
        b.set_target(3);
        assert_eq!(b.read(r::CONFIG, 4), 3);
        assert_eq!(b.read(r::ISR, 1), 2, "configuration interrupt");
        b.write(r::QUEUE_PFN, 4, Q >> 12);
        ram.write(0x50000, 4, 0xDEAD);
        // The PFN list: pages 0x50 and 0x51.
        ram.write(0x20000, 4, 0x50);
        ram.write(0x20004, 4, 0x51);
        desc(&mut ram, 0, 0x20000, 8, 0, 0);
        submit(&mut b, &mut ram, 0);
        assert_eq!(b.dev.inflated, 2);
        assert_eq!(ram.released_pages(), 2);
        assert_eq!(ram.read(0x50000, 4), 0, "a released page reads zeros");
        b.write(r::CONFIG + 4, 4, 2);
        assert_eq!(b.dev.actual, 2, "the driver reports what it holds");
        ram.write(0x20000, 4, 0x1_0000);
        submit(&mut b, &mut ram, 0);
        assert!(b.broken.is_some(), "a frame beyond RAM");
    }

    /// The modern interface (§4.1.4): four vendor capabilities in
    /// configuration space point into BAR 1; a driver that sets the queue
    /// up part by part through the common configuration and notifies at
    /// the queue's notification address is served the same; VERSION_1 is
    /// offered there only.
    #[test]
    fn the_modern_interface_serves_the_same_requests() {
        let mut v = VirtioBlk::disk(disk(16, false));
        v.pci.set16(reg::COMMAND, command::MEMORY | command::MASTER);
        // The capability list: common (1), ISR (3), device (4), notify (2).
        let mut kinds = Vec::new();
        let mut at = usize::from(v.pci.config[0x34]);
        while at != 0 {
            assert_eq!(v.pci.config[at], 0x09, "vendor-specific");
            assert_eq!(v.pci.config[at + 4], 1, "in BAR 1");
            kinds.push(v.pci.config[at + 3]);
            at = usize::from(v.pci.config[at + 1]);
        }
        assert_eq!(kinds, [1, 3, 4, 2]);
        assert_eq!(v.decodes_mem(MEM_BASE + 0x14), Some(0x14));
        assert_eq!(v.decodes_mem(MEM_BASE + MEM_BAR_SIZE), None);
        v.mem_write(0x00, 4, 1);
        assert_eq!(v.mem_read(0x04, 4), VERSION_1_HI);
        assert_eq!(
            v.read(r::HOST_FEATURES, 4) & VERSION_1_HI,
            0,
            "not offered to legacy drivers"
        );
        v.mem_write(0x08, 4, 1);
        v.mem_write(0x0C, 4, VERSION_1_HI);
        v.mem_write(0x14, 1, 1 | 2 | 8);
        v.mem_write(0x16, 2, 0);
        v.mem_write(0x18, 2, 16);
        v.mem_write(0x20, 4, 0x30000);
        v.mem_write(0x28, 4, 0x31000);
        v.mem_write(0x30, 4, 0x32000);
        v.mem_write(0x1C, 2, 1);
        assert_eq!(v.mem_read(0x1E, 2), 0, "queue 0 notifies at offset 0");
        assert_eq!(
            v.mem_read(m::DEVICE, 4),
            16,
            "capacity through the device structure"
        );
        let mut ram = GuestRam::new(1 << 20).unwrap();
        ram.write(0x20000, 4, u64::from(T_IN));
        ram.write(0x20008, 8, 7);
        let d = |ram: &mut GuestRam, i: u32, addr: u64, len: u32, flags: u16, next: u16| {
            let at = 0x30000 + 16 * i;
            ram.write(at, 8, addr);
            ram.write(at + 8, 4, u64::from(len));
            ram.write(at + 12, 2, u64::from(flags));
            ram.write(at + 14, 2, u64::from(next));
        };
        d(&mut ram, 0, 0x20000, 16, D_NEXT, 1);
        d(&mut ram, 1, 0x21000, 512, D_NEXT | D_WRITE, 2);
        d(&mut ram, 2, 0x22000, 1, D_WRITE, 0);
        ram.write(0x31004, 2, 0); // ring[0] = head 0
        ram.write(0x31002, 2, 1); // idx
        v.mem_write(m::NOTIFY, 2, 0);
        v.service(&mut ram);
        assert_eq!(ram.read(0x22000, 1), u64::from(S_OK));
        assert_eq!(ram.read(0x21000, 1), 7, "sector 7 read");
        assert_eq!(ram.read(0x32002, 2), 1, "used index");
        assert_eq!(v.mem_read(m::ISR, 1), 1);
        assert_eq!(v.mem_read(m::ISR, 1), 0, "reading the ISR cleared it");
    }

    /// Addresses near the top of the 64-bit space (a modern driver sets
    /// them whole) stop the device instead of wrapping around.
    #[test]
    fn wrapping_queue_addresses_stop_the_device() {
        let mut v = VirtioBlk::disk(disk(4, false));
        v.pci.set16(reg::COMMAND, command::MEMORY | command::MASTER);
        for (off, value) in [(0x20, u32::MAX - 3), (0x24, u32::MAX), (0x1C, 1)] {
            v.mem_write(off, 4, value);
        }
        let mut ram = GuestRam::new(1 << 20).unwrap();
        v.mem_write(m::NOTIFY, 2, 0);
        v.service(&mut ram);
        assert!(v.broken.is_some());
    }
}
