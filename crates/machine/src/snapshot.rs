//! Snapshots: the whole machine in one file, and back.
//!
//! A snapshot holds what the guest can observe and nothing of popek's own
//! caches: the CPU (registers, descriptor caches, control and debug
//! registers, the x87 image), the board (PIC pair, PIT, RTC and CMOS,
//! UART, isa-debug-exit), the machine clock and instruction count, and
//! guest RAM with zero pages left out. Translations are not stored: they
//! are rebuilt on demand after a resume.
//!
//! ```text
//! 0      header (128 bytes): magic "POPEKSNP", format major.minor, kind,
//!        file length, offsets and lengths of the parts, RAM size, the
//!        snapshot's id and (diff) its base's id
//! 128    state: tagged sections ("CPU ", "FPU ", "PIC ", ...), each
//!        tag, length, body; unknown tags of the same major are skipped
//!        index: runs of guest pages (first, count, kind, file page)
//! 4K-aligned
//!        page data, mapped by a resumed machine straight from the file
//! end    trailer: "POPEKEND", CRC-32 of everything before it
//! ```
//!
//! A full snapshot lists the runs of pages it stores; every other page is
//! zero. A diff snapshot ([`Kind::Diff`]) lists the pages written since
//! its base snapshot (data or zero) and names the base by path and id;
//! every other page is the base's.
//!
//! Files are written to a temporary name, synced and renamed, so an
//! existing file is never left half-written. Reading checks the magic, the
//! major version, every length and offset, and the checksum before
//! anything is used, and reports a damaged file in one line.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use popek_devices::virtio::{Disk, VirtioBalloon, VirtioBlk, VirtioPci};
use popek_devices::{pic::Pic8259, pit::Channel, Board, Mc146818, PicPair, Pit8254};
use popek_memory::{Backing, GuestRam, PAGE_SIZE};
use popek_vcpu::{Segment, TableReg, Vcpu};

/// The file's first eight bytes.
pub const MAGIC: &[u8; 8] = b"POPEKSNP";
/// The trailer's first eight bytes.
const END_MAGIC: &[u8; 8] = b"POPEKEND";
/// The format's major version: a reader refuses any other.
pub const MAJOR: u16 = 1;
/// The format's minor version: additions a reader of the same major may
/// ignore.
pub const MINOR: u16 = 0;
/// Header length.
const HEADER: usize = 128;
/// Trailer length.
const TRAILER: usize = 16;
/// Bytes per run in the index.
const RUN: usize = 16;
/// Page size as usize.
const PAGE: usize = PAGE_SIZE as usize;
/// At most this many runs of stored pages (each becomes a host mapping
/// when a machine resumes): short gaps of zero pages are stored rather
/// than split the runs further.
const MAX_RUNS: usize = 4096;
/// How deep a chain of diff snapshots may go.
const MAX_CHAIN: usize = 256;

/// A snapshot that cannot be written or read, in one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotError(pub String);

impl std::fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SnapshotError {}

fn err<T>(msg: impl Into<String>) -> Result<T, SnapshotError> {
    Err(SnapshotError(msg.into()))
}

/// A full snapshot or the difference from a base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Every nonzero page is stored.
    Full,
    /// Only pages written since the base snapshot are stored.
    Diff,
}

/// Which snapshot a machine's memory last agreed with (the base of a diff
/// snapshot taken now): the one it resumed from or last wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRef {
    /// Its path (absolute).
    pub path: PathBuf,
    /// Its id.
    pub id: [u8; 16],
}

// ---------------------------------------------------------------------
// Encoding of the state sections.

/// Little-endian encoder of a state section.
#[derive(Default)]
struct Enc(Vec<u8>);

/// Decoder of a state section: every read is bounds-checked.
struct Dec<'a> {
    b: &'a [u8],
    at: usize,
    what: &'static str,
}

impl Dec<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], SnapshotError> {
        match self.b.get(self.at..self.at + n) {
            Some(s) => {
                self.at += n;
                Ok(s)
            }
            None => err(format!("damaged: the {} section is too short", self.what)),
        }
    }
}

/// A value stored in a state section.
trait Field: Sized {
    fn put(&self, e: &mut Enc);
    fn get(d: &mut Dec) -> Result<Self, SnapshotError>;
}

macro_rules! int_field {
    ($($t:ty),*) => {$(
        impl Field for $t {
            fn put(&self, e: &mut Enc) {
                e.0.extend_from_slice(&self.to_le_bytes());
            }
            fn get(d: &mut Dec) -> Result<Self, SnapshotError> {
                let s = d.take(std::mem::size_of::<$t>())?;
                Ok(<$t>::from_le_bytes(s.try_into().expect("sized above")))
            }
        }
    )*};
}
int_field!(u8, u16, u32, u64);

impl Field for bool {
    fn put(&self, e: &mut Enc) {
        e.0.push(u8::from(*self));
    }
    fn get(d: &mut Dec) -> Result<Self, SnapshotError> {
        match u8::get(d)? {
            0 => Ok(false),
            1 => Ok(true),
            v => err(format!("the {} section has a flag of {v}", d.what)),
        }
    }
}

impl<T: Field> Field for Option<T> {
    fn put(&self, e: &mut Enc) {
        self.is_some().put(e);
        if let Some(v) = self {
            v.put(e);
        }
    }
    fn get(d: &mut Dec) -> Result<Self, SnapshotError> {
        Ok(if bool::get(d)? {
            Some(T::get(d)?)
        } else {
            None
        })
    }
}

impl<T: Field, const N: usize> Field for [T; N] {
    fn put(&self, e: &mut Enc) {
        for v in self {
            v.put(e);
        }
    }
    fn get(d: &mut Dec) -> Result<Self, SnapshotError> {
        let v = (0..N).map(|_| T::get(d)).collect::<Result<Vec<T>, _>>()?;
        match v.try_into() {
            Ok(a) => Ok(a),
            Err(_) => err("an array of the wrong length"),
        }
    }
}

impl Field for Vec<u8> {
    fn put(&self, e: &mut Enc) {
        (self.len() as u32).put(e);
        e.0.extend_from_slice(self);
    }
    fn get(d: &mut Dec) -> Result<Self, SnapshotError> {
        let n = u32::get(d)? as usize;
        Ok(d.take(n)?.to_vec())
    }
}

/// `Field` for a struct, field by field, starting from `$init`.
macro_rules! struct_field {
    ($t:ty, $init:expr, $($f:ident),*) => {
        impl Field for $t {
            fn put(&self, e: &mut Enc) {
                $( self.$f.put(e); )*
            }
            #[allow(clippy::field_reassign_with_default)]
            fn get(d: &mut Dec) -> Result<Self, SnapshotError> {
                let mut v: $t = $init;
                $( v.$f = Field::get(d)?; )*
                Ok(v)
            }
        }
    };
}

struct_field!(Segment, Segment::default(), selector, base, limit, attr);
struct_field!(TableReg, TableReg::default(), base, limit);
struct_field!(
    Pic8259,
    PicPair::default().master,
    irr,
    isr,
    imr,
    lines,
    vector_base,
    lowest,
    level,
    auto_eoi,
    rotate_on_aeoi,
    special_mask,
    read_isr,
    poll,
    init_step,
    single,
    needs_icw4,
    icw3
);
struct_field!(PicPair, PicPair::default(), master, slave);
struct_field!(
    Channel,
    Channel::default(),
    mode,
    access,
    bcd,
    reload,
    start,
    write_lsb,
    latched,
    status,
    read_msb,
    gate,
    reported
);
struct_field!(
    Mc146818,
    Mc146818::new(0, 0),
    index,
    cmos,
    epoch,
    reported,
    flags_c
);

struct_field!(Pit8254, Pit8254::default(), channels, speaker);

/// What the machine keeps besides the CPU and the board.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineState {
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Does the clock count instructions (`--icount`)?
    pub icount: bool,
    /// Machine time (ns).
    pub now_ns: u64,
    /// The guest's TSC.
    pub tsc: u64,
    /// Instructions retired.
    pub retired: u64,
    /// Page faults delivered to the guest.
    pub page_faults: u64,
    /// Interpreted instructions until the run loop polls the board.
    pub poll_in: u64,
    /// Serial bytes the guest has sent so far.
    pub serial_out: u64,
    /// Time halted (ns).
    pub halted_ns: u64,
    /// The Multiboot or kernel command line the machine booted with.
    pub cmdline: Vec<u8>,
}
struct_field!(
    MachineState,
    MachineState::default(),
    memory,
    icount,
    now_ns,
    tsc,
    retired,
    page_faults,
    poll_in,
    serial_out,
    halted_ns,
    cmdline
);

/// One tagged section.
fn section(out: &mut Vec<u8>, tag: &[u8; 4], body: Enc) {
    out.extend_from_slice(tag);
    out.extend_from_slice(&(body.0.len() as u32).to_le_bytes());
    out.extend_from_slice(&body.0);
}

fn encode<T: Field>(v: &T) -> Enc {
    let mut e = Enc::default();
    v.put(&mut e);
    e
}

/// The state sections of a machine.
pub(crate) fn encode_state(m: &crate::Machine, base: Option<&SnapshotRef>) -> Vec<u8> {
    let c = &m.cpu;
    let mut out = Vec::new();
    let mach = MachineState {
        memory: u64::from(c.ram.size()),
        icount: c.clock_counts_instructions,
        now_ns: c.now_ns(),
        tsc: c.tsc(),
        retired: c.retired,
        page_faults: c.page_faults,
        poll_in: m.next_poll.saturating_sub(c.retired),
        serial_out: m.serial_out,
        halted_ns: m.stats.halted_ns,
        cmdline: m.config.cmdline.as_bytes().to_vec(),
    };
    section(&mut out, b"MACH", encode(&mach));
    let mut e = Enc::default();
    c.regs.put(&mut e);
    c.eip.put(&mut e);
    c.eflags.put(&mut e);
    for s in &c.segs {
        s.put(&mut e);
    }
    c.gdtr.put(&mut e);
    c.idtr.put(&mut e);
    c.ldtr.put(&mut e);
    c.tr.put(&mut e);
    for v in [c.cr0, c.cr2, c.fault_cr2, c.cr3, c.cr4] {
        v.put(&mut e);
    }
    c.dr.put(&mut e);
    c.halted.put(&mut e);
    c.int_shadow.put(&mut e);
    section(&mut out, b"CPU ", e);
    let mut e = Enc::default();
    e.0.extend_from_slice(c.fpu.image());
    c.fpu.used.put(&mut e);
    section(&mut out, b"FPU ", e);
    let b = &c.board;
    section(&mut out, b"PIC ", encode(&b.pic));
    section(&mut out, b"PIT ", encode(&b.pit));
    section(&mut out, b"RTC ", encode(&b.rtc));
    let u = &b.uart.state;
    let mut e = Enc::default();
    for v in [u.ier, u.lcr, u.mcr, u.scr, u.fcr] {
        v.put(&mut e);
    }
    u.divisor.put(&mut e);
    u.loopback.put(&mut e);
    u.thre_pending.put(&mut e);
    u.transmitting.put(&mut e);
    u.input.iter().copied().collect::<Vec<u8>>().put(&mut e);
    section(&mut out, b"UART", e);
    let mut e = Enc::default();
    b.debug_exit.written.put(&mut e);
    b.reset.put(&mut e);
    b.unclaimed_reads.put(&mut e);
    b.unclaimed_writes.put(&mut e);
    [b.timer_late.0, b.timer_late.1, b.timer_late.2].put(&mut e);
    section(&mut out, b"BORD", e);
    if let Some(v) = &b.virtio_blk {
        let mut e = Enc::default();
        put_transport(&mut e, v);
        let d = &v.dev.disk;
        // What the guest wrote is in the file before it is fingerprinted.
        let _ = d.flush();
        d.path.as_os_str().as_encoded_bytes().to_vec().put(&mut e);
        d.readonly.put(&mut e);
        d.fingerprint().unwrap_or([0; 3]).put(&mut e);
        section(&mut out, b"VBLK", e);
    }
    if let Some(bl) = &b.balloon {
        let mut e = Enc::default();
        put_transport(&mut e, bl);
        bl.dev.num_pages.put(&mut e);
        bl.dev.actual.put(&mut e);
        section(&mut out, b"VBAL", e);
    }
    {
        let pv = &b.pv;
        let mut e = Enc::default();
        pv.target.put(&mut e);
        pv.held.put(&mut e);
        pv.notify_irq.put(&mut e);
        pv.pending.put(&mut e);
        pv.calls.put(&mut e);
        pv.inflated.put(&mut e);
        pv.deflated.put(&mut e);
        let bits: Vec<u8> = pv.ballooned.iter().flat_map(|w| w.to_le_bytes()).collect();
        bits.put(&mut e);
        section(&mut out, b"PVIR", e);
    }
    if let Some(base) = base {
        let mut e = Enc::default();
        e.0.extend_from_slice(&base.id);
        base.path
            .as_os_str()
            .as_encoded_bytes()
            .to_vec()
            .put(&mut e);
        section(&mut out, b"BASE", e);
    }
    out
}

/// A virtio device's transport state: configuration space, features,
/// queues, status, interrupt status.
fn put_transport<D>(e: &mut Enc, v: &VirtioPci<D>) {
    e.0.extend_from_slice(&v.pci.config);
    v.guest_features.put(e);
    (v.queues.len() as u32).put(e);
    for q in &v.queues {
        q.pfn.put(e);
        q.last_avail.put(e);
    }
    v.queue_sel.put(e);
    v.status.put(e);
    v.isr.put(e);
    v.broken.is_some().put(e);
}

fn get_transport<D>(d: &mut Dec, v: &mut VirtioPci<D>) -> Result<(), SnapshotError> {
    v.pci.config = d.take(256)?.try_into().expect("256 bytes");
    v.guest_features = Field::get(d)?;
    let n = u32::get(d)? as usize;
    if n != v.queues.len() {
        return err(format!("a virtio device with {n} queues"));
    }
    for q in &mut v.queues {
        q.pfn = Field::get(d)?;
        q.last_avail = Field::get(d)?;
    }
    v.queue_sel = Field::get(d)?;
    v.status = Field::get(d)?;
    v.isr = Field::get(d)?;
    if bool::get(d)? {
        v.broken = Some("it had stopped before the snapshot".into());
    }
    Ok(())
}

/// The state sections, read back: (tag, body) in file order.
/// A state section: its tag and body.
type Section<'a> = ([u8; 4], &'a [u8]);

fn split_sections(state: &[u8]) -> Result<Vec<Section<'_>>, SnapshotError> {
    let mut v = Vec::new();
    let mut at = 0;
    while at < state.len() {
        let Some(h) = state.get(at..at + 8) else {
            return err("the state is cut inside a section header");
        };
        let tag: [u8; 4] = h[..4].try_into().expect("4 bytes");
        let len = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes")) as usize;
        let Some(body) = state.get(at + 8..at + 8 + len) else {
            return err(format!(
                "the {} section runs past the state",
                String::from_utf8_lossy(&tag)
            ));
        };
        v.push((tag, body));
        at += 8 + len;
    }
    Ok(v)
}

/// The state of a snapshot, decoded.
pub struct State {
    /// Machine-level fields.
    pub mach: MachineState,
    sections: Vec<([u8; 4], Vec<u8>)>,
    /// The base of a diff snapshot.
    pub base: Option<SnapshotRef>,
}

impl State {
    fn body(&self, tag: &[u8; 4], what: &'static str) -> Result<Dec<'_>, SnapshotError> {
        match self.sections.iter().find(|(t, _)| t == tag) {
            Some((_, b)) => Ok(Dec { b, at: 0, what }),
            None => err(format!("damaged: the snapshot has no {what} section")),
        }
    }

    /// Put the CPU and board state into `cpu` (whose RAM is restored).
    /// The disk is the image the state names, checked unchanged; with
    /// `disk_overlay`, a new pcow overlay over it at that path, which the
    /// guest writes instead (the image stays as the snapshot saw it).
    pub(crate) fn apply(
        &self,
        cpu: &mut Vcpu,
        disk_overlay: Option<&Path>,
    ) -> Result<(), SnapshotError> {
        let d = &mut self.body(b"CPU ", "CPU")?;
        cpu.regs = Field::get(d)?;
        cpu.eip = Field::get(d)?;
        cpu.eflags = Field::get(d)?;
        for s in &mut cpu.segs {
            *s = Segment::get(d)?;
        }
        cpu.gdtr = Field::get(d)?;
        cpu.idtr = Field::get(d)?;
        cpu.ldtr = Field::get(d)?;
        cpu.tr = Field::get(d)?;
        cpu.cr0 = Field::get(d)?;
        cpu.cr2 = Field::get(d)?;
        cpu.fault_cr2 = Field::get(d)?;
        cpu.cr3 = Field::get(d)?;
        cpu.cr4 = Field::get(d)?;
        cpu.dr = Field::get(d)?;
        cpu.halted = Field::get(d)?;
        cpu.int_shadow = Field::get(d)?;
        let d = &mut self.body(b"FPU ", "x87")?;
        let image: [u8; 512] = d.take(512)?.try_into().expect("512 bytes");
        cpu.fpu.set_image(&image);
        cpu.fpu.used = Field::get(d)?;
        let mut b = Board::default();
        b.pic = Field::get(&mut self.body(b"PIC ", "PIC")?)?;
        b.pit = Field::get(&mut self.body(b"PIT ", "PIT")?)?;
        b.rtc = Field::get(&mut self.body(b"RTC ", "RTC")?)?;
        let d = &mut self.body(b"UART", "UART")?;
        let u = &mut b.uart.state;
        u.ier = Field::get(d)?;
        u.lcr = Field::get(d)?;
        u.mcr = Field::get(d)?;
        u.scr = Field::get(d)?;
        u.fcr = Field::get(d)?;
        u.divisor = Field::get(d)?;
        u.loopback = Field::get(d)?;
        u.thre_pending = Field::get(d)?;
        u.transmitting = Field::get(d)?;
        u.input = Vec::<u8>::get(d)?.into();
        let d = &mut self.body(b"BORD", "board")?;
        b.debug_exit.written = Field::get(d)?;
        b.reset = Field::get(d)?;
        b.unclaimed_reads = Field::get(d)?;
        b.unclaimed_writes = Field::get(d)?;
        let late: [u64; 3] = Field::get(d)?;
        b.timer_late = (late[0], late[1], late[2]);
        if self.sections.iter().any(|(t, _)| t == b"VBLK") {
            let d = &mut self.body(b"VBLK", "virtio disk")?;
            let mut probe = VirtioPci::new(Probe, 0, 0, 0, 0);
            get_transport(d, &mut probe)?;
            let path = PathBuf::from(
                String::from_utf8(Vec::<u8>::get(d)?)
                    .map_err(|_| SnapshotError("a disk path that is not UTF-8".into()))?,
            );
            let readonly: bool = Field::get(d)?;
            let print: [u64; 3] = Field::get(d)?;
            let disk = open_disk(&path, readonly, print, disk_overlay)?;
            let mut v = VirtioBlk::disk(disk);
            v.pci = probe.pci;
            v.guest_features = probe.guest_features;
            v.queues = probe.queues;
            v.queue_sel = probe.queue_sel;
            v.status = probe.status;
            v.isr = probe.isr;
            v.broken = probe.broken;
            b.virtio_blk = Some(v);
        }
        if self.sections.iter().any(|(t, _)| t == b"VBAL") {
            let d = &mut self.body(b"VBAL", "virtio balloon")?;
            let mut v = VirtioBalloon::balloon();
            get_transport(d, &mut v)?;
            v.dev.num_pages = Field::get(d)?;
            v.dev.actual = Field::get(d)?;
            b.balloon = Some(v);
        }
        // (Snapshots before the paravirtual interface have no PVIR.)
        if self.sections.iter().any(|(t, _)| t == b"PVIR") {
            let d = &mut self.body(b"PVIR", "paravirtual interface")?;
            let pv = &mut b.pv;
            pv.target = Field::get(d)?;
            pv.held = Field::get(d)?;
            pv.notify_irq = Field::get(d)?;
            if pv.notify_irq.is_some_and(|l| l > 15) {
                return err("the paravirtual interface's IRQ line is above 15");
            }
            pv.pending = Field::get(d)?;
            pv.calls = Field::get(d)?;
            pv.inflated = Field::get(d)?;
            pv.deflated = Field::get(d)?;
            let bits: Vec<u8> = Field::get(d)?;
            if bits.len() % 8 != 0 {
                return err("the paravirtual balloon's page bitmap is not whole words");
            }
            pv.ballooned = bits
                .chunks(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("chunks of 8")))
                .collect();
        }
        b.update_lines();
        cpu.board = b;
        let m = &self.mach;
        cpu.retired = m.retired;
        cpu.page_faults = m.page_faults;
        cpu.clock_counts_instructions = m.icount;
        cpu.set_now_ns(m.now_ns);
        cpu.set_tsc(m.tsc);
        Ok(())
    }
}

/// A stand-in device to decode a transport's state into (two queues at
/// most: the block device's one, the balloon's two).
struct Probe;

impl popek_devices::virtio::Device for Probe {
    const TYPE: u16 = 0;
    const PCI_ID: u16 = 0;
    const CLASS: u32 = 0;
    const QUEUES: usize = 1;
    fn features(&self) -> u32 {
        0
    }
    fn config(&self) -> Vec<u8> {
        Vec::new()
    }
    fn config_write(&mut self, _off: usize, _v: u8) {}
    fn serve(
        &mut self,
        _q: usize,
        _chain: &[popek_devices::virtio::Buffer],
        _ram: &mut GuestRam,
    ) -> Result<u32, String> {
        Ok(0)
    }
}

/// The disk a snapshot names: the same image, unchanged since (its
/// fingerprint), or a new overlay over it.
fn open_disk(
    path: &Path,
    readonly: bool,
    print: [u64; 3],
    overlay: Option<&Path>,
) -> Result<Disk, SnapshotError> {
    let e = |m: String| SnapshotError(m);
    let name = path
        .to_str()
        .ok_or_else(|| e("a disk path that is not UTF-8".into()))?;
    let check = Disk::open(name, None, true).map_err(e)?;
    if check.fingerprint().map_err(e)? != print {
        return Err(e(format!(
            "the disk image {name} changed since the snapshot was taken, so the guest would find another disk (to resume one snapshot more than once, give each resume --disk-overlay NEW.pcow)"
        )));
    }
    drop(check);
    match overlay {
        None => Disk::open(name, None, readonly).map_err(e),
        Some(o) => {
            popek_devices::image::create_overlay(o, Some(path), None).map_err(e)?;
            let o = o
                .to_str()
                .ok_or_else(|| e("an overlay path that is not UTF-8".into()))?;
            Disk::open(o, Some("pcow"), readonly).map_err(e)
        }
    }
}

pub(crate) fn decode_state(state: &[u8]) -> Result<State, SnapshotError> {
    let sections: Vec<([u8; 4], Vec<u8>)> = split_sections(state)?
        .into_iter()
        .map(|(t, b)| (t, b.to_vec()))
        .collect();
    let mut s = State {
        mach: MachineState::default(),
        sections,
        base: None,
    };
    s.mach = Field::get(&mut s.body(b"MACH", "machine")?)?;
    if s.sections.iter().any(|(t, _)| t == b"BASE") {
        let d = &mut s.body(b"BASE", "base")?;
        let id: [u8; 16] = d.take(16)?.try_into().expect("16 bytes");
        let path = Vec::<u8>::get(d)?;
        let path = String::from_utf8(path)
            .map_err(|_| SnapshotError("the base path is not UTF-8".into()))?;
        s.base = Some(SnapshotRef {
            path: PathBuf::from(path),
            id,
        });
    }
    Ok(s)
}

// ---------------------------------------------------------------------
// The page index.

/// What a run of pages holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunKind {
    /// Bytes stored in the file's page data.
    Data = 0,
    /// Zero pages (a diff's pages that were zeroed since the base).
    Zero = 1,
}

/// A run of guest pages in the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    first: u32,
    count: u32,
    kind: RunKind,
    /// Page number within the page data (Data runs).
    file_page: u32,
}

pub(crate) fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: reinterpreting initialized bytes as u64 words is sound
        // for any bit pattern; align_to handles the alignment.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Runs of pages to store: `pages` (sorted) split into data and zero
/// runs, and gaps in data runs closed until there are at most
/// [`MAX_RUNS`] (the gap pages are then stored too).
fn plan_runs(ram: &[u8], pages: &[u32], zero_runs: bool) -> Vec<Run> {
    // Maximal runs of consecutive pages of one kind.
    let mut runs: Vec<Run> = Vec::new();
    for &p in pages {
        let a = p as usize * PAGE;
        let kind = if is_zero(&ram[a..a + PAGE]) {
            RunKind::Zero
        } else {
            RunKind::Data
        };
        if kind == RunKind::Zero && !zero_runs {
            continue;
        }
        match runs.last_mut() {
            Some(r) if r.kind == kind && r.first + r.count == p => r.count += 1,
            _ => runs.push(Run {
                first: p,
                count: 1,
                kind,
                file_page: 0,
            }),
        }
    }
    let mut gap = 1u32;
    while runs.len() > MAX_RUNS {
        let mut merged: Vec<Run> = Vec::new();
        for r in runs {
            match merged.last_mut() {
                // Close a short gap between data runs (whatever lies in it
                // is stored as it is now: zero pages, pages of the base, or
                // a diff's zero run, whose bytes are zero anyway).
                Some(m)
                    if m.kind == RunKind::Data
                        && r.kind == RunKind::Data
                        && r.first - (m.first + m.count) <= gap =>
                {
                    m.count = r.first + r.count - m.first;
                }
                _ => merged.push(r),
            }
        }
        runs = merged;
        gap *= 2;
    }
    // A diff's zero run swallowed by a data run is gone; drop zero runs
    // that overlap data runs now.
    let data: Vec<(u32, u32)> = runs
        .iter()
        .filter(|r| r.kind == RunKind::Data)
        .map(|r| (r.first, r.first + r.count))
        .collect();
    runs.retain(|r| {
        r.kind == RunKind::Data
            || !data
                .iter()
                .any(|&(a, b)| r.first < b && a < r.first + r.count)
    });
    let mut next = 0;
    for r in runs.iter_mut().filter(|r| r.kind == RunKind::Data) {
        r.file_page = next;
        next += r.count;
    }
    runs
}

// ---------------------------------------------------------------------
// Writing.

/// What writing a snapshot did.
#[derive(Debug, Clone)]
pub struct Written {
    /// The file.
    pub path: PathBuf,
    /// Full or diff.
    pub kind: Kind,
    /// Its size in bytes.
    pub bytes: u64,
    /// Guest pages stored.
    pub pages_stored: u64,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// How long writing took.
    pub elapsed: std::time::Duration,
    /// Its id.
    pub id: [u8; 16],
}

/// A random id for a new snapshot.
fn new_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    crate::linux::fill_random(&mut id, &mut None);
    id
}

/// A writer that checksums what it writes.
struct Summing<W: Write> {
    w: W,
    crc: crc32fast::Hasher,
    n: u64,
}

impl<W: Write> Write for Summing<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.w.write(b)?;
        self.crc.update(&b[..n]);
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// Write the machine's snapshot to `path`: full, or (with `base`) the
/// pages written since `base`, which the machine's dirty log must have
/// tracked since then.
pub fn write(
    m: &crate::Machine,
    path: &Path,
    base: Option<&SnapshotRef>,
) -> Result<Written, SnapshotError> {
    let started = std::time::Instant::now();
    let ram = &m.cpu.ram;
    let bytes = ram.as_slice();
    let (kind, pages): (Kind, Vec<u32>) = match base {
        None => (Kind::Full, ram.maybe_nonzero_pages()),
        Some(_) => {
            if !ram.dirty_logging() {
                return err(
                    "a diff snapshot needs the dirty log since its base, which is not running",
                );
            }
            (Kind::Diff, ram.dirty_pages())
        }
    };
    let runs = plan_runs(bytes, &pages, kind == Kind::Diff);
    let state = encode_state(m, base);
    let index_off = HEADER + state.len();
    let index_len = runs.len() * RUN;
    let data_off = (index_off + index_len).next_multiple_of(PAGE);
    let data_pages: u64 = runs
        .iter()
        .filter(|r| r.kind == RunKind::Data)
        .map(|r| u64::from(r.count))
        .sum();
    let data_end = data_off as u64 + data_pages * PAGE as u64;
    let file_len = data_end + TRAILER as u64;
    let id = new_id();
    let mut h = vec![0u8; HEADER];
    h[0..8].copy_from_slice(MAGIC);
    h[8..10].copy_from_slice(&MAJOR.to_le_bytes());
    h[10..12].copy_from_slice(&MINOR.to_le_bytes());
    h[12..16].copy_from_slice(&(kind as u32).to_le_bytes());
    for (at, v) in [
        (16, file_len),
        (24, HEADER as u64),
        (32, state.len() as u64),
        (40, index_off as u64),
        (48, index_len as u64),
        (56, data_off as u64),
        (64, data_pages),
        (72, u64::from(ram.size())),
    ] {
        h[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    h[80..96].copy_from_slice(&id);
    if let Some(b) = base {
        h[96..112].copy_from_slice(&b.id);
    }
    let mut index = Vec::with_capacity(index_len);
    for r in &runs {
        for v in [r.first, r.count, r.kind as u32, r.file_page] {
            index.extend_from_slice(&v.to_le_bytes());
        }
    }
    let tmp = temp_name(path);
    let io =
        |e: std::io::Error| SnapshotError(format!("cannot write snapshot {}: {e}", path.display()));
    let file = File::create(&tmp).map_err(io)?;
    let result = (|| {
        let mut w = Summing {
            w: BufWriter::with_capacity(1 << 20, &file),
            crc: crc32fast::Hasher::new(),
            n: 0,
        };
        w.write_all(&h)?;
        w.write_all(&state)?;
        w.write_all(&index)?;
        w.write_all(&vec![0u8; data_off - index_off - index_len])?;
        for r in runs.iter().filter(|r| r.kind == RunKind::Data) {
            let a = r.first as usize * PAGE;
            w.write_all(&bytes[a..a + r.count as usize * PAGE])?;
        }
        debug_assert_eq!(w.n, data_end);
        let crc = w.crc.clone().finalize();
        let mut t = [0u8; TRAILER];
        t[..8].copy_from_slice(END_MAGIC);
        t[8..12].copy_from_slice(&crc.to_le_bytes());
        w.w.write_all(&t)?;
        w.w.flush()?;
        drop(w);
        file.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(Written {
        path: path.to_path_buf(),
        kind,
        bytes: file_len,
        pages_stored: data_pages,
        memory: u64::from(ram.size()),
        elapsed: started.elapsed(),
        id,
    })
}

/// The temporary name a snapshot is written under before the rename.
fn temp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

// ---------------------------------------------------------------------
// Reading.

/// A snapshot file, checked.
pub struct Snapshot {
    /// Its path.
    pub path: PathBuf,
    file: File,
    /// Full or diff.
    pub kind: Kind,
    /// Format version.
    pub version: (u16, u16),
    /// Its id.
    pub id: [u8; 16],
    /// The id of its base (diff).
    pub base_id: [u8; 16],
    /// Its decoded state.
    pub state: State,
    runs: Vec<Run>,
    data_off: u64,
    /// Its size in bytes.
    pub bytes: u64,
}

impl Snapshot {
    /// Open and check a snapshot file: magic, version, lengths, checksum.
    pub fn open(path: &Path) -> Result<Snapshot, SnapshotError> {
        let name = path.display();
        let file = File::open(path)
            .map_err(|e| SnapshotError(format!("cannot open snapshot {name}: {e}")))?;
        let len = file
            .metadata()
            .map_err(|e| SnapshotError(format!("cannot read snapshot {name}: {e}")))?
            .len();
        let bad = |what: String| SnapshotError(format!("{name}: {what}"));
        if len < 8 {
            return Err(bad(
                "not a popek snapshot (too short for the magic number)".into()
            ));
        }
        // SAFETY: a read-only private mapping of a file this process opened;
        // the bytes are only read, and a snapshot is never written in place
        // (writers rename a new file over it).
        let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }
            .map_err(|e| bad(format!("cannot map the file: {e}")))?;
        let b = &map[..];
        if &b[..8] != MAGIC {
            return Err(bad("not a popek snapshot (bad magic number)".into()));
        }
        if b.len() < HEADER + TRAILER {
            return Err(bad(format!(
                "truncated: {} bytes, shorter than a header",
                b.len()
            )));
        }
        let u16_at = |a: usize| u16::from_le_bytes(b[a..a + 2].try_into().expect("2 bytes"));
        let u32_at = |a: usize| u32::from_le_bytes(b[a..a + 4].try_into().expect("4 bytes"));
        let u64_at = |a: usize| u64::from_le_bytes(b[a..a + 8].try_into().expect("8 bytes"));
        let (major, minor) = (u16_at(8), u16_at(10));
        if major != MAJOR {
            return Err(bad(format!(
                "snapshot format version {major}.{minor}, but this popek reads version {MAJOR}.x only"
            )));
        }
        let file_len = u64_at(16);
        if file_len != len {
            return Err(bad(format!(
                "truncated or extended: the header says {file_len} bytes, the file has {len}"
            )));
        }
        let end = len as usize - TRAILER;
        let t = &b[end..];
        if &t[..8] != END_MAGIC || t[12..].iter().any(|&x| x != 0) {
            return Err(bad("damaged: no trailer at the end".into()));
        }
        let crc = u32::from_le_bytes(t[8..12].try_into().expect("4 bytes"));
        if crc32fast::hash(&b[..end]) != crc {
            return Err(bad("damaged: the checksum does not match".into()));
        }
        let kind = match u32_at(12) {
            0 => Kind::Full,
            1 => Kind::Diff,
            k => return Err(bad(format!("unknown snapshot kind {k}"))),
        };
        let part = |off: u64,
                    n: u64,
                    what: &str|
         -> Result<std::ops::Range<usize>, SnapshotError> {
            match off.checked_add(n) {
                Some(e) if e <= end as u64 && off >= HEADER as u64 => Ok(off as usize..e as usize),
                _ => Err(bad(format!("damaged: the {what} lies outside the file"))),
            }
        };
        let state_r = part(u64_at(24), u64_at(32), "state")?;
        let index_r = part(u64_at(40), u64_at(48), "page index")?;
        let data_off = u64_at(56);
        let data_pages = u64_at(64);
        let data_r = part(
            data_off,
            data_pages.saturating_mul(PAGE as u64),
            "page data",
        )?;
        if data_off % PAGE as u64 != 0 || index_r.len() % RUN != 0 {
            return Err(bad("damaged: misaligned page data or index".into()));
        }
        let memory = u64_at(72);
        let pages = memory / PAGE as u64;
        let mut runs = Vec::new();
        for r in b[index_r].chunks(RUN) {
            let v = |i: usize| u32::from_le_bytes(r[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
            let kind = match v(2) {
                0 => RunKind::Data,
                1 => RunKind::Zero,
                k => return Err(bad(format!("damaged: a page run of unknown kind {k}"))),
            };
            let run = Run {
                first: v(0),
                count: v(1),
                kind,
                file_page: v(3),
            };
            if u64::from(run.first) + u64::from(run.count) > pages
                || (kind == RunKind::Data
                    && u64::from(run.file_page) + u64::from(run.count) > data_pages)
            {
                return Err(bad(
                    "damaged: a page run lies outside RAM or the page data".into()
                ));
            }
            runs.push(run);
        }
        let _ = data_r;
        let state = decode_state(&b[state_r]).map_err(|e| bad(format!("damaged: {e}")))?;
        if state.mach.memory != memory || memory == 0 || memory % PAGE as u64 != 0 {
            return Err(bad("damaged: inconsistent RAM size".into()));
        }
        if (kind == Kind::Diff) != state.base.is_some() {
            return Err(bad(
                "damaged: a diff snapshot without a base, or the reverse".into(),
            ));
        }
        let id: [u8; 16] = b[80..96].try_into().expect("16 bytes");
        let base_id: [u8; 16] = b[96..112].try_into().expect("16 bytes");
        drop(map);
        Ok(Snapshot {
            path: path.to_path_buf(),
            file,
            kind,
            version: (major, minor),
            id,
            base_id,
            state,
            runs,
            data_off,
            bytes: len,
        })
    }

    /// The chain this snapshot needs, itself first, then its base, its
    /// base's base... down to a full snapshot; every link checked.
    pub fn chain(self) -> Result<Vec<Snapshot>, SnapshotError> {
        let mut chain = vec![self];
        while chain.last().expect("not empty").kind == Kind::Diff {
            if chain.len() > MAX_CHAIN {
                return err(format!(
                    "{}: a chain of more than {MAX_CHAIN} diff snapshots",
                    chain[0].path.display()
                ));
            }
            let top = chain.last().expect("not empty");
            let base = top.state.base.clone().expect("checked in open");
            let path = if base.path.is_absolute() {
                base.path.clone()
            } else {
                top.path.parent().unwrap_or(Path::new(".")).join(&base.path)
            };
            let b = Snapshot::open(&path).map_err(|e| {
                SnapshotError(format!("{}: its base snapshot: {e}", top.path.display()))
            })?;
            if b.id != top.base_id || base.id != top.base_id {
                return err(format!(
                    "{}: its base {} is another snapshot than the one it was taken from",
                    top.path.display(),
                    path.display()
                ));
            }
            if b.state.mach.memory != top.state.mach.memory {
                return err(format!(
                    "{}: its base has another RAM size",
                    top.path.display()
                ));
            }
            chain.push(b);
        }
        Ok(chain)
    }
}

/// Guest RAM as a chain of snapshots (newest first) leaves it: every page
/// mapped from the newest snapshot that stores it.
pub(crate) fn restore_ram(chain: &[Snapshot]) -> Result<GuestRam, SnapshotError> {
    let memory = chain[0].state.mach.memory;
    let pages = (memory / PAGE as u64) as usize;
    // Per page: which snapshot of the chain holds it (usize::MAX: zero),
    // and its file page there.
    const ZERO: (usize, u32) = (usize::MAX, 0);
    let mut source: Vec<Option<(usize, u32)>> = vec![None; pages];
    for (i, s) in chain.iter().enumerate() {
        for r in &s.runs {
            for k in 0..r.count {
                let p = (r.first + k) as usize;
                if source[p].is_none() {
                    source[p] = Some(match r.kind {
                        RunKind::Data => (i, r.file_page + k),
                        RunKind::Zero => ZERO,
                    });
                }
            }
        }
    }
    let mut ram = GuestRam::new(memory).map_err(|e| SnapshotError(e.to_string()))?;
    for (i, s) in chain.iter().enumerate() {
        let mut runs: Vec<Backing> = Vec::new();
        for (p, src) in source.iter().enumerate() {
            let Some((j, fp)) = *src else { continue };
            if j != i {
                continue;
            }
            let offset = s.data_off + u64::from(fp) * PAGE as u64;
            match runs.last_mut() {
                Some(r)
                    if r.first + r.count == p as u32
                        && r.offset + u64::from(r.count) * PAGE as u64 == offset =>
                {
                    r.count += 1
                }
                _ => runs.push(Backing {
                    first: p as u32,
                    count: 1,
                    offset,
                }),
            }
        }
        if !runs.is_empty() {
            ram.back_with(&s.file, &runs)
                .map_err(|e| SnapshotError(format!("{}: {e}", s.path.display())))?;
        }
    }
    Ok(ram)
}

impl Snapshot {
    /// Guest pages this file stores.
    pub fn pages_stored(&self) -> u64 {
        self.runs
            .iter()
            .filter(|r| r.kind == RunKind::Data)
            .map(|r| u64::from(r.count))
            .sum()
    }
}

/// An absolute form of `path`, for a diff snapshot's reference to its
/// base.
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// CRC-32 (IEEE 802.3) of `b`, the checksum snapshot files carry.
pub fn crc32(b: &[u8]) -> u32 {
    crc32fast::hash(b)
}
