//! The machine: guest RAM, a virtual CPU, devices, a loader and the run
//! loop, which hands each step to the engine (the translator's dispatcher,
//! the interpreter or the trap-and-emulate monitor) and routes what comes
//! back to devices, the Linux platform or an exit.
//!
//! ```text
//! Multiboot ELF ─▶ multiboot::load ─▶ Machine { Vcpu { regs, segs, ram, io } }
//!                                        │
//!                                  run(): loop { engine step ─▶ UART bytes to the host,
//!                                                 isa-debug-exit, HLT, budget, stop }
//! ```

pub mod bzimage;
pub mod console;
pub mod elf32;
pub mod gdb;
pub mod initramfs;
pub mod linux;
pub mod lockstep;
pub mod migrate;
pub mod monitor;
pub mod multiboot;
pub mod snapshot;
pub mod trap;

use std::io::Write;

use popek_memory::GuestRam;
use popek_vcpu::{reg, Exception, Stop, Vcpu};

/// Default guest RAM: 64 MiB.
pub const DEFAULT_MEMORY: u64 = 64 << 20;

/// Errors loading a guest.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// No Multiboot header in the first 8 KiB.
    #[error("no Multiboot header in the first 8 KiB and not an ELF executable")]
    NoMultibootHeader,
    /// The file is not a loadable ELF/Multiboot image.
    #[error("malformed guest image: {0}")]
    Malformed(String),
    /// A segment does not fit into guest RAM.
    #[error("guest image segment at {addr:#010x} ({len} bytes) does not fit in guest RAM (try --memory)")]
    DoesNotFit {
        /// Physical address.
        addr: u32,
        /// Length in bytes.
        len: u64,
    },
    /// Guest RAM could not be created.
    #[error("{0}")]
    Memory(String),
}

/// Guest instructions one translated block can retire (its instructions
/// and the exit), for budgeting.
const BLOCK_MAX: u64 = popek_decode::MAX_BLOCK_INSNS as u64 + 1;

/// A `max_insns` for [`Machine::step`] that lets the translator run exactly
/// one block.
pub const ONE_BLOCK: u64 = 2 * BLOCK_MAX;

/// Which engine executes guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// The reference interpreter: the oracle and the fallback.
    Interp,
    /// The binary translator (the default): translated blocks run as host
    /// code, special instructions call the virtual CPU.
    #[default]
    Bt,
    /// Classic trap-and-emulate: the guest kernel deprivileged to CPL 3
    /// (see [`trap`]); sensitive unprivileged instructions misbehave.
    Trap,
}

/// Machine configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Stop after this many guest instructions.
    pub max_insns: Option<u64>,
    /// The Multiboot command line (QEMU passes "<kernel path> <append>").
    pub cmdline: String,
    /// The engine.
    pub engine: Engine,
    /// Bound of the translation cache in blocks (None: unbounded).
    pub cache_blocks: Option<std::num::NonZeroUsize>,
    /// Print every executed instruction to stderr (slow), starting with
    /// the instruction of this number (0 = from the start).
    pub trace: Option<u64>,
    /// The machine's clock counts instructions (one ns each) instead of
    /// host time: device timing and the TSC are reproducible.
    pub icount: bool,
    /// Count every retired instruction exactly (`cpu.retired`, the
    /// statistics). Translated code that counts pays about six host
    /// instructions per block transfer; without it (and without an
    /// instruction budget, the instruction clock or a trace, which count
    /// anyway) it pays one load per backward transfer, and `cpu.retired`
    /// counts only what the interpreter executed. On by default.
    pub count_insns: bool,
    /// Resuming a snapshot with a disk: create this pcow overlay over the
    /// snapshot's image and give the guest that (the image stays as the
    /// snapshot saw it, so clones can share it).
    pub disk_overlay: Option<std::path::PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            memory: DEFAULT_MEMORY,
            max_insns: None,
            cmdline: String::new(),
            engine: Engine::Bt,
            cache_blocks: None,
            trace: None,
            icount: false,
            count_insns: true,
            disk_overlay: None,
        }
    }
}

/// Why a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The guest wrote to isa-debug-exit; the process status follows.
    DebugExit(i32),
    /// HLT with nothing that could ever wake the CPU (no interrupt sources).
    Halted {
        /// EIP after the HLT.
        eip: u32,
    },
    /// The instruction budget ran out.
    BudgetExhausted {
        /// Instructions executed.
        executed: u64,
        /// EIP of the next instruction.
        eip: u32,
    },
    /// A fault while delivering a double fault.
    TripleFault {
        /// The exception that could not be delivered.
        last: Exception,
        /// EIP of the instruction that started the cascade.
        eip: u32,
        /// Its bytes.
        bytes: Vec<u8>,
    },
    /// Something popek does not model.
    Unsupported {
        /// What.
        what: String,
        /// Guest EIP.
        eip: u32,
        /// Instruction bytes there.
        bytes: Vec<u8>,
    },
    /// A Linux process called exit or exit_group.
    Exited(i32),
    /// A Linux process was killed by the signal for a CPU exception.
    Signal(linux::Fatal),
    /// A Linux process was killed by a signal it sent itself (abort()).
    Killed(i32),
    /// The user typed Ctrl-A X on the serial console.
    Quit,
    /// The guest reset the machine (a kernel's reboot): popek ends the run,
    /// as QEMU does with -no-reboot.
    Reset,
    /// The monitor's `quit` command.
    MonitorQuit,
    /// The guest retired [`Machine::suspend_at`] instructions: the machine
    /// stops there, to be saved.
    Suspended,
    /// The guest was migrated: it runs on the target now
    /// ([`Machine::migrated`] says how it went).
    Migrated,
    /// CS:EIP reached a debugger's breakpoint ([`Machine::break_at`]): the
    /// machine stops for the debugger (not an end of the run).
    Breakpoint,
    /// The debugger killed the guest (gdb's `kill`).
    DebuggerKill,
    /// A thread of a Linux process (not the first) ended.
    ThreadDone,
}

impl Exit {
    /// The process exit status popek ends with. Guest-requested statuses
    /// are odd ((v << 1) | 1, as QEMU's isa-debug-exit), so popek's own
    /// endings use even numbers: 0 halted, 2 error, 4 budget exhausted.
    pub fn status(&self) -> i32 {
        match self {
            Exit::DebugExit(s) | Exit::Exited(s) => *s,
            Exit::Signal(f) => 128 + f.signo,
            Exit::Killed(s) => 128 + s,
            Exit::Quit
            | Exit::Reset
            | Exit::MonitorQuit
            | Exit::Suspended
            | Exit::Migrated
            | Exit::Breakpoint
            | Exit::DebuggerKill
            | Exit::ThreadDone => 0,
            Exit::Halted { .. } => 0,
            Exit::BudgetExhausted { .. } => 4,
            Exit::TripleFault { .. } | Exit::Unsupported { .. } => 2,
        }
    }

    /// A one-line description for stderr (None for a guest-requested exit).
    pub fn message(&self) -> Option<String> {
        let hex = |b: &[u8]| {
            b.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        match self {
            Exit::DebugExit(_) | Exit::Exited(_) => None,
            Exit::Signal(f) => Some(format!(
                "guest killed by {} ({}) at eip={:#010x}",
                linux::sig::name(f.signo),
                f.exception,
                f.eip
            )),
            Exit::Killed(s) => Some(format!("guest killed by {}", linux::sig::name(*s))),
            Exit::Quit => Some("terminated from the console (Ctrl-A X)".into()),
            Exit::MonitorQuit => Some("terminated from the monitor (quit)".into()),
            Exit::Suspended | Exit::Migrated | Exit::Breakpoint | Exit::ThreadDone => None,
            Exit::DebuggerKill => Some("killed from the debugger".into()),
            Exit::Reset => {
                Some("the guest reset the machine; the run ends (as QEMU's -no-reboot)".into())
            }
            Exit::Halted { eip } => Some(format!(
                "guest halted at eip={eip:#010x} with no interrupt source to wake it"
            )),
            Exit::BudgetExhausted { executed, eip } => Some(format!(
                "instruction budget exhausted after {executed} instructions at eip={eip:#010x}"
            )),
            Exit::TripleFault { last, eip, bytes } => Some(format!(
                "triple fault at eip={eip:#010x} [{}]: {last} while delivering a double fault",
                hex(bytes)
            )),
            Exit::Unsupported { what, eip, bytes } => Some(format!(
                "unsupported guest operation at eip={eip:#010x} [{}]: {what}",
                hex(bytes)
            )),
        }
    }
}

/// What the guest runs on.
pub enum Platform {
    /// A bare-metal PC: the guest is the kernel.
    BareMetal,
    /// A Linux i386 process: popek is the kernel.
    Linux(Box<linux::LinuxProcess>),
}

/// A virtual PC with one CPU.
pub struct Machine {
    /// The CPU, with RAM and devices.
    pub cpu: Vcpu,
    /// Configuration.
    pub config: Config,
    /// The platform.
    pub platform: Platform,
    /// The engine running guest code, with its state.
    pub engine: EngineState,
    /// Does the run loop deliver device interrupts before each step?
    /// (`--lockstep` turns it off and delivers them itself, at the same
    /// boundaries on both machines.)
    pub deliver_interrupts: bool,
    /// What the board did: interrupts delivered, time halted.
    pub stats: BoardStats,
    /// Bytes for COM1's receiver (popek's stdin, see [`console`]).
    pub serial_input: Option<std::sync::mpsc::Receiver<console::SerialInput>>,
    /// The user asked to end the run (Ctrl-A X).
    quit: bool,
    /// The retired count at which the run loop polls the board next.
    next_poll: u64,
    /// The machine time the run loop last read (at its last poll of the
    /// board), for the translator's wake time without another clock read.
    last_now: u64,
    /// Serial bytes the guest has sent to the host so far.
    pub serial_out: u64,
    /// The snapshot the machine's memory last agreed with (resumed from or
    /// written), with the dirty log running since: the base of a diff
    /// snapshot taken now.
    pub base: Option<snapshot::SnapshotRef>,
    /// The monitor's channel, when one listens (`--monitor`).
    pub monitor: Option<monitor::Monitor>,
    /// The monitor stopped the guest: machine time and TSC when it did.
    paused: Option<(u64, u64)>,
    /// Stop the run ([`Exit::Suspended`]) once this many instructions have
    /// retired (counted from boot, across resumes), exactly.
    pub suspend_at: Option<u64>,
    /// Start a migration once this many instructions have retired.
    pub migrate_at: Option<(u64, migrate::Options)>,
    /// The migration in progress.
    pub migration: Option<migrate::Outgoing>,
    /// How the last migration went: its summary, or why it failed.
    pub migrated: Option<Result<migrate::Summary, String>>,
    /// A host scheduler runs this machine among others (`popek host`): a
    /// halted CPU does not sleep in the run loop, it gives its thread back
    /// ([`Machine::run_slice`] says until when).
    pub cooperative: bool,
    /// Halted until this host time (set instead of sleeping when
    /// `cooperative`).
    sleep_until: Option<std::time::Instant>,
    /// A debugger's breakpoints (linear addresses): the run loop stops
    /// with [`Exit::Breakpoint`] before an engine step would start at one
    /// (after interrupt delivery, so a handler's first instruction stops
    /// too). See the gdb module.
    pub break_at: std::collections::BTreeSet<u32>,
    /// Go past the breakpoint at this EIP once (resuming from it).
    pub pass_break: Option<u32>,
    /// A debugger is attached: a halted CPU does not sleep long.
    pub debugging: bool,
    /// Its part in its Linux process's threads, once there are several.
    pub(crate) thread: Option<Box<linux::threads::ThreadCtx>>,
}

/// Interpreted instructions between two polls of the board: a device
/// interrupt waits at most this long (SDM Vol. 3 §6.8.1 lets it wait for
/// any instruction boundary).
const POLL_EVERY: u64 = 64;

/// The longest translated code that counts nothing runs before the run
/// loop looks at serial input and the board again (host time).
const POLL_SLICE_NS: u64 = 4_000_000;

/// The longest a halted machine waits before it looks at the monitor's
/// commands again.
const MONITOR_WAIT_NS: u64 = 20_000_000;

/// How a slice of a machine's run ended ([`Machine::run_slice`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slice {
    /// It ran its slice and can go on.
    Ran,
    /// It is halted with nothing to do before this host time.
    Halted(std::time::Instant),
    /// The run is over.
    Ended(Exit),
}

/// Counters of the board and the run loop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BoardStats {
    /// Device interrupts delivered, by vector: (IRQ line if a PIC's, count).
    pub interrupts: std::collections::BTreeMap<u8, (Option<u8>, u64)>,
    /// Time the CPU spent halted waiting for an interrupt (ns of machine
    /// time).
    pub halted_ns: u64,
}

/// The engine running guest code, with its state ([`Config::engine`]
/// chooses it).
pub enum EngineState {
    /// The reference interpreter (no state of its own).
    Interp,
    /// The binary translator.
    Bt(Box<popek_translate::Bt>),
    /// The trap-and-emulate monitor.
    Trap(Box<trap::Trap>),
}

impl EngineState {
    /// A fresh engine of the configured kind.
    fn new(config: &Config) -> EngineState {
        match config.engine {
            Engine::Interp => EngineState::Interp,
            Engine::Bt => EngineState::Bt(Box::new(popek_translate::Bt::new(config.cache_blocks))),
            Engine::Trap => EngineState::Trap(Box::new(trap::Trap::new())),
        }
    }

    /// The translator, when the engine is `bt`.
    pub fn bt(&self) -> Option<&popek_translate::Bt> {
        match self {
            EngineState::Bt(b) => Some(b),
            _ => None,
        }
    }

    /// The translator, when the engine is `bt`.
    pub fn bt_mut(&mut self) -> Option<&mut popek_translate::Bt> {
        match self {
            EngineState::Bt(b) => Some(b),
            _ => None,
        }
    }

    /// The trap-and-emulate monitor, when the engine is `trap`.
    pub fn trap(&self) -> Option<&trap::Trap> {
        match self {
            EngineState::Trap(t) => Some(t),
            _ => None,
        }
    }
}

/// A CPU on `ram` as a PC's firmware hands it to a kernel: flat 32-bit
/// protected mode with code selector `cs` and data selector `ds`, paging
/// and interrupts off, the GDT at `gdt.0` with `gdt.1` entries, the real-mode
/// IDT, the TSC at 0, and the board in QEMU's firmware state (PIC vectors
/// 8 and 0x70, PIT channel 0 at 18.2 Hz, the RTC at the host's time, CMOS
/// describing the RAM).
fn firmware_cpu(ram: GuestRam, cs: u16, ds: u16, gdt: (u32, u16)) -> Vcpu {
    let memory = u64::from(ram.size());
    let mut cpu = Vcpu::new(ram);
    cpu.enter_flat_protected_mode(cs, ds);
    cpu.gdtr.base = gdt.0;
    cpu.gdtr.limit = gdt.1 * 8 - 1;
    cpu.idtr.base = 0;
    cpu.idtr.limit = 0x3FF;
    cpu.set_tsc(0);
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    cpu.board = popek_devices::Board::firmware(epoch, memory);
    cpu
}

impl Machine {
    /// Boot a Multiboot kernel image, as `qemu-system-i386 -kernel`.
    pub fn multiboot(image: &[u8], config: Config) -> Result<Machine, LoadError> {
        let mut ram = GuestRam::new(config.memory).map_err(|e| LoadError::Memory(e.to_string()))?;
        let loaded = multiboot::load(&mut ram, image, &config.cmdline)?;
        let gdt = (multiboot::GDT_ADDR, 3);
        let mut cpu = firmware_cpu(ram, multiboot::ENTRY_CS, multiboot::ENTRY_DS, gdt);
        cpu.eip = loaded.entry;
        cpu.regs[reg::EAX] = multiboot::BOOTLOADER_MAGIC;
        cpu.regs[reg::EBX] = loaded.mbi;
        cpu.regs[reg::ESP] = multiboot::ENTRY_ESP;
        cpu.regs[reg::ECX] = loaded.entry;
        cpu.regs[reg::EDX] = multiboot::entry_edx((cpu.ram.size() / 1024).saturating_sub(1024));
        cpu.regs[reg::EDI] = multiboot::ENTRY_EDI;
        Ok(Machine::assemble(cpu, config, Platform::BareMetal))
    }

    /// Boot a Linux kernel (a bzImage) through the 32-bit boot protocol,
    /// with `config.cmdline` as its command line and an optional initrd, on
    /// the board as a PC's firmware leaves it (see [`bzimage`]).
    pub fn linux_kernel(
        image: &[u8],
        initrd: Option<&[u8]>,
        config: Config,
    ) -> Result<Machine, LoadError> {
        let mut ram = GuestRam::new(config.memory).map_err(|e| LoadError::Memory(e.to_string()))?;
        let loaded = bzimage::load(&mut ram, image, &config.cmdline, initrd)?;
        let gdt = (bzimage::GDT_ADDR, 4);
        let mut cpu = firmware_cpu(ram, bzimage::BOOT_CS, bzimage::BOOT_DS, gdt);
        cpu.eip = loaded.entry;
        cpu.regs = [0; 8];
        cpu.regs[reg::ESI] = loaded.boot_params;
        // boot.rst leaves ESP undefined (the kernel takes its own stack at
        // once); below boot_params it points at free low memory.
        cpu.regs[reg::ESP] = loaded.boot_params;
        Ok(Machine::assemble(cpu, config, Platform::BareMetal))
    }

    /// A machine of `cpu` on `platform`, with the configured engine: the
    /// setup every loader shares.
    /// A new engine of the configured kind, paced for `platform`.
    fn engine_for(config: &Config, linux: bool) -> EngineState {
        let mut engine = EngineState::new(config);
        if let EngineState::Bt(bt) = &mut engine {
            use popek_translate::Pacing;
            let counted = config.count_insns
                || config.max_insns.is_some()
                || config.icount
                || config.trace.is_some();
            bt.set_pacing(if counted {
                Pacing::Counted
            } else if linux {
                // Nothing asynchronous reaches a Linux process (until it
                // installs a signal handler: see `Machine::step`).
                Pacing::Free
            } else {
                Pacing::Polled
            });
        }
        engine
    }

    /// A new engine for this machine (after a fork or an execve).
    fn fresh_engine(&self) -> EngineState {
        Machine::engine_for(&self.config, matches!(self.platform, Platform::Linux(_)))
    }

    fn assemble(mut cpu: Vcpu, config: Config, platform: Platform) -> Machine {
        if config.icount {
            cpu.clock_counts_instructions = true;
            cpu.set_tsc(0);
        }
        let engine = Machine::engine_for(&config, matches!(platform, Platform::Linux(_)));
        Machine {
            engine,
            deliver_interrupts: true,
            stats: BoardStats::default(),
            serial_input: None,
            quit: false,
            next_poll: 0,
            last_now: 0,
            serial_out: 0,
            base: None,
            monitor: None,
            paused: None,
            suspend_at: None,
            migrate_at: None,
            migration: None,
            migrated: None,
            cooperative: false,
            sleep_until: None,
            break_at: Default::default(),
            pass_break: None,
            debugging: false,
            thread: None,
            cpu,
            config,
            platform,
        }
    }

    /// Start a static i386 Linux executable as a user-mode process, with
    /// popek's environment.
    pub fn linux(image: &[u8], args: &[String], config: Config) -> Result<Machine, LoadError> {
        Machine::linux_with(image, linux::Start::with_host_env(args, false), config)
    }

    /// Start a static i386 Linux executable as a user-mode process.
    pub fn linux_with(
        image: &[u8],
        start: linux::Start,
        config: Config,
    ) -> Result<Machine, LoadError> {
        let (cpu, process) = linux::load(image, start, config.memory)?;
        Ok(Machine::assemble(
            cpu,
            config,
            Platform::Linux(Box::new(process)),
        ))
    }

    /// Resume a machine from a snapshot (and the chain of bases a diff
    /// snapshot needs). Its memory is mapped from the files, shared with
    /// every other machine resumed from them until written (see
    /// `popek_memory::Backing`); the dirty log runs from here, so a diff
    /// snapshot against this one can be taken later. `config`'s memory
    /// size, command line and clock mode are the snapshot's.
    pub fn resume(
        path: &std::path::Path,
        config: Config,
    ) -> Result<Machine, snapshot::SnapshotError> {
        let s = snapshot::Snapshot::open(path)?;
        let chain = s.chain()?;
        let ram = snapshot::restore_ram(&chain)?;
        let top = &chain[0];
        let mut m = Machine::from_state(&top.state, ram, config)
            .map_err(|e| snapshot::SnapshotError(format!("{}: {e}", path.display())))?;
        m.cpu
            .ram
            .start_dirty_log()
            .map_err(|e| snapshot::SnapshotError(e.to_string()))?;
        m.base = Some(snapshot::SnapshotRef {
            path: snapshot::absolute(path),
            id: top.id,
        });
        Ok(m)
    }

    /// A machine of saved `state` on `ram` (which holds the saved RAM):
    /// `config`'s memory size, command line and clock mode are the
    /// state's. What a resume and an incoming migration share.
    pub fn from_state(
        state: &snapshot::State,
        ram: GuestRam,
        config: Config,
    ) -> Result<Machine, snapshot::SnapshotError> {
        let mach = &state.mach;
        let config = Config {
            memory: mach.memory,
            cmdline: String::from_utf8_lossy(&mach.cmdline).into_owned(),
            icount: mach.icount,
            ..config
        };
        let mut m = Machine::assemble(Vcpu::new(ram), config, Platform::BareMetal);
        let overlay = m.config.disk_overlay.clone();
        state.apply(&mut m.cpu, overlay.as_deref())?;
        m.next_poll = m.cpu.retired + mach.poll_in;
        m.serial_out = mach.serial_out;
        m.stats.halted_ns = mach.halted_ns;
        Ok(m)
    }

    /// Write the machine to a snapshot file at `path`: everything, or
    /// (`diff`) the pages written since [`Machine::base`]. The machine can
    /// go on running; the dirty log restarts, so that the next diff
    /// snapshot is against this one.
    ///
    /// With a disk, the snapshot names the image and its fingerprint; a
    /// machine that goes on (`continuing`) then writes to a new pcow
    /// overlay over the image (next to it, named after the snapshot's
    /// id), so that the image stays as the snapshot saw it.
    pub fn save_snapshot(
        &mut self,
        path: &std::path::Path,
        diff: bool,
        continuing: bool,
    ) -> Result<snapshot::Written, snapshot::SnapshotError> {
        if let Platform::Linux(_) = self.platform {
            return Err(snapshot::SnapshotError(
                "a Linux program cannot be snapshotted: its state includes host files and processes (snapshots are for bare-metal machines: Multiboot kernels and the Linux kernel)".into(),
            ));
        }
        let base =
            match (diff, &self.base) {
                (false, _) => None,
                (true, Some(b)) => Some(b.clone()),
                (true, None) => return Err(snapshot::SnapshotError(
                    "a diff snapshot needs a base: resume from a snapshot or take a full one first"
                        .into(),
                )),
            };
        if base
            .as_ref()
            .is_some_and(|b| b.path == snapshot::absolute(path))
        {
            return Err(snapshot::SnapshotError(format!(
                "{}: a diff snapshot cannot replace its own base",
                path.display()
            )));
        }
        let written = snapshot::write(self, path, base.as_ref())?;
        if continuing {
            self.freeze_disk(&written.id)?;
        }
        self.cpu
            .ram
            .start_dirty_log()
            .map_err(|e| snapshot::SnapshotError(e.to_string()))?;
        self.base = Some(snapshot::SnapshotRef {
            path: snapshot::absolute(path),
            id: written.id,
        });
        Ok(written)
    }

    /// Leave the disk image as a snapshot saw it: the guest writes to a new
    /// overlay over it from now on.
    fn freeze_disk(&mut self, id: &[u8; 16]) -> Result<(), snapshot::SnapshotError> {
        let Some(v) = &mut self.cpu.board.virtio_blk else {
            return Ok(());
        };
        if v.dev.disk.readonly {
            return Ok(());
        }
        let e = |m: String| snapshot::SnapshotError(m);
        let base = v.dev.disk.path.clone();
        let mut name = base.file_name().unwrap_or_default().to_os_string();
        name.push(format!(
            ".{}.pcow",
            id[..4]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ));
        let overlay = base.with_file_name(name);
        popek_devices::image::create_overlay(&overlay, Some(&base), None).map_err(e)?;
        let o = overlay
            .to_str()
            .ok_or_else(|| e("an overlay path that is not UTF-8".into()))?;
        let disk = popek_devices::virtio::Disk::open(o, Some("pcow"), false).map_err(e)?;
        eprintln!(
            "popek: the disk image {} is kept as the snapshot saw it; the guest writes to {} now",
            base.display(),
            overlay.display()
        );
        v.dev.disk = disk;
        Ok(())
    }

    /// Start migrating to `opts.to` (the guest goes on running); a failure
    /// to start is reported and the guest goes on here.
    pub fn start_migration(&mut self, opts: migrate::Options) {
        let to = opts.to.clone();
        match migrate::Outgoing::start(self, opts) {
            Ok(m) => {
                self.migration = Some(m);
                self.migrated = None;
            }
            Err(e) => self.migration_failed(&to, e),
        }
    }

    fn migration_failed(&mut self, to: &str, why: String) {
        eprintln!("popek: migration to {to} failed: {why}; the guest goes on here");
        self.cpu.ram.stop_dirty_log();
        self.migrated = Some(Err(why));
    }

    /// A step of the migration in progress: a batch of pages, or the end.
    fn migration_tick(&mut self) -> Option<Exit> {
        let mut mig = self.migration.take()?;
        let to = mig.peer().to_string();
        match mig.tick(&mut self.cpu.ram) {
            Ok(migrate::Tick::Continue) => {
                self.migration = Some(mig);
                None
            }
            Ok(migrate::Tick::Freeze(pages)) => match mig.finish(self, pages) {
                Ok(summary) => {
                    eprintln!("popek: {summary}");
                    self.migrated = Some(Ok(summary));
                    Some(Exit::Migrated)
                }
                Err(e) => {
                    self.migration_failed(&to, e);
                    None
                }
            },
            Err(e) => {
                self.migration_failed(&to, e);
                None
            }
        }
    }

    /// Carry out the monitor's commands waiting (all of them, and while
    /// the guest is stopped, every command until `cont` or `quit`).
    /// Some(exit) when one ended the run.
    fn serve_monitor(&mut self) -> Option<Exit> {
        loop {
            let monitor = self.monitor.as_ref()?;
            let req = if self.paused.is_some() {
                match monitor.next_within(std::time::Duration::from_millis(100)) {
                    Some(r) => r,
                    None => continue,
                }
            } else {
                monitor.try_next()?
            };
            let (answer, exit) = self.command(&req.execute, &req.arguments);
            req.answer(answer, exit.is_some());
            if exit.is_some() {
                return exit;
            }
        }
    }

    /// One monitor command: the answer, and an exit if it ends the run.
    pub fn command(
        &mut self,
        execute: &str,
        arguments: &serde_json::Value,
    ) -> (serde_json::Value, Option<Exit>) {
        use serde_json::json;
        let status = |m: &Machine| {
            json!({
                "status": if m.paused.is_some() { "paused" } else { "running" },
                "running": m.paused.is_none(),
                "insns": m.cpu.retired,
                "eip": m.cpu.eip,
                "halted": m.cpu.halted,
                "serial_bytes": m.serial_out,
            })
        };
        match execute {
            "query-status" => (monitor::ok(status(self)), None),
            "query-stats" => {
                let interrupts: u64 = self.stats.interrupts.values().map(|v| v.1).sum();
                let mut v = json!({
                    "insns": self.cpu.retired,
                    "page_faults": self.cpu.page_faults,
                    "interrupts": interrupts,
                    "halted_ms": self.stats.halted_ns / 1_000_000,
                    "serial_bytes": self.serial_out,
                    "dirty_pages": self.cpu.ram.dirty_pages().len(),
                    "shared_pages": self.cpu.ram.shared_pages(),
                    "copied_pages": self.cpu.ram.copied_pages(),
                });
                if let Some(bt) = self.engine.bt() {
                    let s = &bt.stats;
                    v["blocks_translated"] = json!(s.blocks_translated);
                    v["translate_ms"] = json!(s.translate_ns / 1_000_000);
                    v["invalidations"] = json!(s.invalidations);
                }
                (monitor::ok(v), None)
            }
            "stop" => {
                if self.paused.is_none() {
                    self.paused = Some((self.cpu.now_ns(), self.cpu.tsc()));
                }
                (monitor::ok(status(self)), None)
            }
            "cont" => {
                if let Some((now, tsc)) = self.paused.take() {
                    // The guest's clocks stood still while it was stopped.
                    self.cpu.set_now_ns(now);
                    self.cpu.set_tsc(tsc);
                    self.last_now = now;
                }
                (monitor::ok(status(self)), None)
            }
            "snapshot" => {
                let Some(file) = arguments.get("file").and_then(|v| v.as_str()) else {
                    return (
                        monitor::error("GenericError", "snapshot needs {\"file\": PATH}"),
                        None,
                    );
                };
                let diff = arguments
                    .get("diff")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false);
                // A stopped guest is saved with the time it stopped at.
                let saved = self.paused.map(|(now, tsc)| {
                    let live = (self.cpu.now_ns(), self.cpu.tsc());
                    self.cpu.set_now_ns(now);
                    self.cpu.set_tsc(tsc);
                    live
                });
                let r = self.save_snapshot(std::path::Path::new(file), diff, true);
                if let Some((now, tsc)) = saved {
                    self.cpu.set_now_ns(now);
                    self.cpu.set_tsc(tsc);
                }
                match r {
                    Ok(w) => (
                        monitor::ok(json!({
                            "file": file,
                            "kind": if w.kind == snapshot::Kind::Diff { "diff" } else { "full" },
                            "bytes": w.bytes,
                            "pages_stored": w.pages_stored,
                            "memory": w.memory,
                            "ms": w.elapsed.as_secs_f64() * 1e3,
                            "insns": self.cpu.retired,
                            "eip": self.cpu.eip,
                            "serial_bytes": self.serial_out,
                        })),
                        None,
                    ),
                    Err(e) => (monitor::error("GenericError", e.to_string()), None),
                }
            }
            "migrate" => {
                let Some(uri) = arguments.get("uri").and_then(|v| v.as_str()) else {
                    return (
                        monitor::error(
                            "GenericError",
                            "migrate needs {\"uri\": \"tcp:HOST:PORT\"}",
                        ),
                        None,
                    );
                };
                if self.migration.is_some() {
                    return (
                        monitor::error("GenericError", "a migration is in progress"),
                        None,
                    );
                }
                let opts = migrate::Options {
                    to: uri.strip_prefix("tcp:").unwrap_or(uri).to_string(),
                    bandwidth: arguments.get("bandwidth").and_then(|v| v.as_u64()),
                    max_downtime: std::time::Duration::from_millis(
                        arguments
                            .get("max_downtime")
                            .and_then(|v| v.as_u64())
                            .unwrap_or(300),
                    ),
                };
                self.start_migration(opts);
                match &self.migrated {
                    Some(Err(e)) => (monitor::error("GenericError", e.clone()), None),
                    _ => (monitor::ok(json!({ "status": "active" })), None),
                }
            }
            "query-migrate" => {
                let v = match (&self.migration, &self.migrated) {
                    (Some(m), _) => json!({ "status": "active", "rounds": m.rounds.len() }),
                    (None, Some(Ok(s))) => json!({
                        "status": "completed",
                        "rounds": s.rounds.len(),
                        "downtime_ms": s.downtime.as_secs_f64() * 1e3,
                        "total_ms": s.total.as_secs_f64() * 1e3,
                        "bytes": s.bytes,
                    }),
                    (None, Some(Err(e))) => json!({ "status": "failed", "error": e }),
                    (None, None) => json!({ "status": "none" }),
                };
                (monitor::ok(v), None)
            }
            "balloon" | "query-balloon" => {
                let ram = u64::from(self.cpu.ram.size());
                if execute == "balloon" {
                    let Some(v) = arguments.get("value").and_then(|v| v.as_u64()) else {
                        return (
                            monitor::error("GenericError", "balloon needs {\"value\": BYTES}"),
                            None,
                        );
                    };
                    let pages = (ram.saturating_sub(v.min(ram)) / 4096) as u32;
                    self.cpu.board.set_balloon_target(pages);
                }
                (monitor::ok(self.balloon_report()), None)
            }
            "quit" => (monitor::ok(json!({})), Some(Exit::MonitorQuit)),
            other => (
                monitor::error(
                    "CommandNotFound",
                    format!("the command {other} has not been found"),
                ),
                None,
            ),
        }
    }

    /// The balloons as the monitor's `query-balloon` reports them: the
    /// guest's memory (`actual`, bytes) and the host's target, each
    /// balloon's pages, and the host memory the guest's RAM takes (the RAM
    /// file's allocated blocks) beside the whole process's resident set.
    pub fn balloon_report(&self) -> serde_json::Value {
        use serde_json::json;
        let ram = u64::from(self.cpu.ram.size());
        let b = &self.cpu.board;
        let pv = &b.pv;
        let mut v = json!({
            "actual": ram - u64::from(b.ballooned_pages()) * 4096,
            "target": ram - u64::from(pv.target) * 4096,
            "released_pages": self.cpu.ram.released_pages(),
            "paravirtual": {
                "held_pages": pv.held,
                "inflated_pages": pv.inflated,
                "deflated_pages": pv.deflated,
                "hypercalls": pv.total_calls(),
            },
            "host_ram_bytes": self.cpu.ram.host_bytes(),
            "host_rss_bytes": process_rss_bytes(),
        });
        if let Some(vb) = &b.balloon {
            v["inflated_pages"] = json!(vb.dev.inflated);
            v["deflated_pages"] = json!(vb.dev.deflated);
            v["virtio"] = json!({
                "held_pages": vb.dev.actual,
                "inflated_pages": vb.dev.inflated,
                "deflated_pages": vb.dev.deflated,
            });
        }
        v
    }

    /// Up to 15 instruction bytes at CS:`eip`, for reports.
    pub fn bytes_at(&mut self, eip: u32) -> Vec<u8> {
        let mut buf = [0u8; popek_decode::MAX_INSN_LEN];
        let (n, _) = self.cpu.fetch(eip, &mut buf);
        let bitness = if self.cpu.code32() { 32 } else { 16 };
        let ins = popek_decode::decode_one(&buf[..n], eip, bitness);
        let len = if ins.is_invalid() {
            n.min(8)
        } else {
            ins.len()
        };
        buf[..len].to_vec()
    }

    pub(crate) fn stop_exit(&mut self, stop: Stop) -> Exit {
        match stop {
            Stop::DebugExit(s) => Exit::DebugExit(s),
            Stop::TripleFault { last, eip } => {
                let bytes = self.bytes_at(eip);
                Exit::TripleFault { last, eip, bytes }
            }
            Stop::Unsupported { what, eip } => {
                let bytes = self.bytes_at(eip);
                Exit::Unsupported { what, eip, bytes }
            }
        }
    }

    fn trace_one(&mut self) {
        let eip = self.cpu.eip;
        let bytes = self.bytes_at(eip);
        let bitness = if self.cpu.code32() { 32 } else { 16 };
        let ins = popek_decode::decode_one(&bytes, eip, bitness);
        let r = &self.cpu.regs;
        eprintln!(
            "{eip:08x}  {:<30} eax={:08x} ecx={:08x} edx={:08x} ebx={:08x} esp={:08x} ebp={:08x} esi={:08x} edi={:08x} fl={:08x}",
            ins.to_string(), r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], self.cpu.eflags
        );
    }

    /// Run until the guest exits, halts for good, or the budget runs out.
    /// Serial output (or a Linux process's stdout) goes to `out` as it is
    /// produced; a Linux process's stderr goes to popek's stderr.
    pub fn run(&mut self, out: &mut dyn Write) -> Exit {
        self.run_with(out, &mut std::io::stderr())
    }

    /// Run for about `slice` of host time (whole engine steps), for a host
    /// scheduler: [`Slice::Ran`], [`Slice::Halted`] (nothing to do before
    /// the given time: the machine did not sleep, see
    /// [`Machine::cooperative`]) or [`Slice::Ended`].
    pub fn run_slice(&mut self, out: &mut dyn Write, slice: std::time::Duration) -> Slice {
        let start = std::time::Instant::now();
        let mut err = std::io::sink();
        loop {
            if let Some(e) = self.step(u64::MAX, out, &mut err) {
                let _ = out.flush();
                return Slice::Ended(e);
            }
            if let Some(t) = self.sleep_until.take() {
                return Slice::Halted(t);
            }
            if start.elapsed() >= slice {
                return Slice::Ran;
            }
        }
    }

    /// As [`Machine::run`], with a Linux process's stderr going to `err`.
    pub fn run_with(&mut self, out: &mut dyn Write, err: &mut dyn Write) -> Exit {
        // The budget counts steps (so a storm of faulting instructions,
        // which retire nothing, still ends) or retired instructions (so a
        // translated loop that chains in host code ends), whichever is more.
        let budget = self.config.max_insns.unwrap_or(u64::MAX);
        let start_retired = self.cpu.retired;
        let mut steps = 0u64;
        let exit = loop {
            let used = steps.max(self.cpu.retired - start_retired);
            if used >= budget {
                break Exit::BudgetExhausted {
                    executed: used,
                    eip: self.cpu.eip,
                };
            }
            // The suspension point counts retired instructions only, so
            // that it is exact (a fault retires nothing).
            let to_suspend = self
                .suspend_at
                .map_or(u64::MAX, |t| t.saturating_sub(self.cpu.retired));
            if to_suspend == 0 {
                break Exit::Suspended;
            }
            let to_migrate = match &self.migrate_at {
                Some((t, _)) if *t <= self.cpu.retired => {
                    let (_, opts) = self.migrate_at.take().expect("matched");
                    self.start_migration(opts);
                    u64::MAX
                }
                Some((t, _)) => t - self.cpu.retired,
                None => u64::MAX,
            };
            let to_suspend = to_suspend.min(to_migrate);
            steps += 1;
            if self.config.trace.is_some_and(|from| steps > from) {
                self.trace_one();
            }
            if let Some(e) = self.step((budget - used).min(to_suspend), out, err) {
                break e;
            }
        };
        let _ = out.flush();
        if let Some(m) = self.migration.take() {
            eprintln!(
                "popek: the guest ended during the migration to {}: it ends here, the target gets nothing",
                m.peer()
            );
            self.cpu.ram.stop_dirty_log();
        }
        exit
    }

    /// One step of the run loop: a dispatcher step of the translator
    /// (retiring at most `max_insns` instructions) or one interpreted instruction,
    /// then device output, a debug exit, and the Linux platform's kernel
    /// work. Some(exit) when the run is over.
    pub fn step(
        &mut self,
        max_insns: u64,
        out: &mut dyn Write,
        err: &mut dyn Write,
    ) -> Option<Exit> {
        if self.serial_input.is_some() {
            self.take_serial_input(None);
            if self.quit {
                return Some(Exit::Quit);
            }
        }
        if self.thread.is_some() {
            // A thread of several: its turn may be over.
            if let Some(e) = self.thread_turn() {
                return Some(e);
            }
        }
        if let Platform::Linux(p) = &mut self.platform {
            // A signal that arrived while user code ran (kill, SIGCHLD,
            // an alarm) is taken before more of it runs.
            if p.signal_pending() {
                if let Some(e) = p.deliver_signals(&mut self.cpu) {
                    return kernel_exit(e);
                }
            }
        }
        if self.monitor.is_some() {
            if let Some(exit) = self.serve_monitor() {
                return Some(exit);
            }
        }
        if self.migration.is_some() {
            if let Some(exit) = self.migration_tick() {
                return Some(exit);
            }
        }
        // Poll the board before every step that can run many instructions
        // (a translated run) or when halted, and otherwise every
        // POLL_EVERY instructions: reading the clock per interpreted
        // instruction would cost more than the instruction.
        if self.deliver_interrupts
            && (self.cpu.halted || self.cpu.retired >= self.next_poll || self.engine.bt().is_some())
        {
            self.next_poll = self.cpu.retired + POLL_EVERY;
            if let Err(stop) = self.poll_interrupts() {
                return Some(self.stop_exit(stop));
            }
        }
        if !self.break_at.is_empty() {
            let eip = self.cpu.eip;
            if self.pass_break.take() != Some(eip) && self.break_at.contains(&eip) {
                return Some(Exit::Breakpoint);
            }
        }
        // With the instruction clock, run no further than the next device
        // deadline, so the interrupt comes on time (to within a block).
        let max_insns = if self.cpu.clock_counts_instructions {
            match self.cpu.board.next_deadline() {
                Some(t) => max_insns.min(t.saturating_sub(self.cpu.now_ns()).max(ONE_BLOCK)),
                None => max_insns,
            }
        } else {
            max_insns
        };
        let step = match &mut self.engine {
            // A translated block retires at most 64 instructions plus its
            // exit: near the end of an instruction budget, interpret one
            // at a time so the budget is exact.
            EngineState::Bt(bt) if max_insns >= ONE_BLOCK => {
                if bt.pacing() == popek_translate::Pacing::Polled {
                    // Translated code that counts nothing comes back when
                    // the next device deadline comes, or after a slice (so
                    // serial input and Ctrl-A X are noticed). The board
                    // was polled just before this step, at `last_now`.
                    let now = self.last_now;
                    let slice = now + POLL_SLICE_NS;
                    let at = self
                        .cpu
                        .board
                        .next_deadline()
                        .map_or(slice, |t| t.min(slice));
                    bt.set_wake(at, now);
                }
                bt.step_within(&mut self.cpu, max_insns / BLOCK_MAX - 1)
            }
            EngineState::Bt(bt) => bt.interpret_one(&mut self.cpu),
            EngineState::Trap(t) => t.step(&mut self.cpu),
            EngineState::Interp => popek_interp::step(&mut self.cpu),
        };
        if self.cpu.board.uart.has_output() {
            // Written through at once, as a serial line would: a prompt
            // with no newline must not wait in a line buffer while the
            // guest waits for what the user types in answer.
            let bytes = self.cpu.board.uart.take_output();
            self.serial_out += bytes.len() as u64;
            let _ = out.write_all(&bytes).and_then(|()| out.flush());
        }
        if let Some(s) = self.cpu.board.exit_requested() {
            return Some(Exit::DebugExit(s));
        }
        if self.cpu.board.reset {
            return Some(Exit::Reset);
        }
        if let Platform::Linux(p) = &mut self.platform {
            if let Some(vector) = p.kernel_entry(&self.cpu) {
                let exit = p.handle(&mut self.cpu, vector, out, err);
                if let Some(exec) = p.exec.take() {
                    // execve loaded a program: it replaces this one, with
                    // the descriptors that stay open across exec (the
                    // process's other threads end).
                    let linux::procs::Exec { cpu, mut process } = *exec;
                    p.hand_over_files(&mut process);
                    if self.thread.is_some() {
                        let _ = self.group_exit(0);
                        self.thread = None;
                    }
                    self.cpu = cpu;
                    self.platform = Platform::Linux(Box::new(process));
                    self.engine = self.fresh_engine();
                    return None;
                }
                if std::mem::take(&mut p.reset_engine) {
                    // A forked child, on its own copy of RAM, alone.
                    self.engine = Machine::engine_for(&self.config, true);
                    self.thread = None;
                }
                let threads = !p.new_threads.is_empty();
                if p.has_handlers() {
                    // Signals are delivered between engine steps: the
                    // translated code must come back now and then.
                    if let EngineState::Bt(bt) = &mut self.engine {
                        if bt.pacing() == popek_translate::Pacing::Free {
                            bt.set_pacing(popek_translate::Pacing::Counted);
                        }
                    }
                }
                if threads {
                    self.start_threads();
                }
                return match exit {
                    linux::KernelExit::Blocked(b) => self.run_blocked(b),
                    linux::KernelExit::ThreadExit(s) => Some(self.thread_exit(s)),
                    linux::KernelExit::Exit(s) if self.thread.is_some() => Some(self.group_exit(s)),
                    e => kernel_exit(e),
                };
            }
        }
        match step {
            popek_interp::Step::Executed => None,
            popek_interp::Step::Halted => self.idle(),
            popek_interp::Step::Stop(stop) => Some(self.stop_exit(stop)),
        }
    }

    /// Let the devices' time pass up to now and, if the CPU can take one
    /// (IF set, no interrupt shadow after STI or MOV SS), deliver the
    /// pending device interrupt through the guest's IDT (SDM Vol. 3
    /// §6.8.1: external interrupts are recognized at instruction
    /// boundaries). A halted CPU wakes up. Returns the vector delivered.
    pub fn poll_interrupts(&mut self) -> Result<Option<u8>, Stop> {
        let now = self.cpu.now_ns();
        self.last_now = now;
        self.cpu.board.advance(now);
        if self.cpu.eflags & popek_vcpu::flags::IF == 0
            || self.cpu.int_shadow
            || !self.cpu.board.interrupt_pending()
        {
            return Ok(None);
        }
        let Some(vector) = self.cpu.board.acknowledge() else {
            return Ok(None);
        };
        self.cpu.halted = false;
        let irq = self.cpu.board.irq_of(vector);
        self.stats.interrupts.entry(vector).or_insert((irq, 0)).1 += 1;
        let interrupt = Exception {
            vector,
            error: None,
        };
        self.cpu
            .raise(interrupt, popek_vcpu::interrupt::Source::External)?;
        Ok(Some(vector))
    }

    /// The CPU halted. With interrupts enabled and a device that will
    /// raise one, wait for it: sleep until the deadline in host time, or
    /// skip to it on the instruction clock (no host CPU is burnt either
    /// way). Otherwise nothing can wake the CPU: the run ends.
    /// Does a halted CPU wake up now and then for commands (the
    /// monitor's, a migration's rounds, a debugger's Ctrl-C)?
    fn wakes_for_commands(&self) -> bool {
        self.monitor.is_some() || self.migration.is_some() || self.debugging
    }

    fn idle(&mut self) -> Option<Exit> {
        let can_wake = self.cpu.eflags & popek_vcpu::flags::IF != 0;
        let now = self.cpu.now_ns();
        let pending = self.cpu.board.interrupt_pending();
        let input = self.serial_input.is_some();
        match self.cpu.board.next_deadline() {
            _ if can_wake && pending => None,
            Some(t) if can_wake => {
                let mut wait = t.saturating_sub(now);
                if self.wakes_for_commands() {
                    // Commands are served between steps: wake up for them.
                    wait = wait.min(MONITOR_WAIT_NS);
                }
                if self.cpu.clock_counts_instructions {
                    self.cpu.idle_ns += wait;
                } else if input {
                    // Serial input may come first and wake the guest.
                    let started = std::time::Instant::now();
                    self.take_serial_input(Some(std::time::Duration::from_nanos(wait)));
                    self.stats.halted_ns += started.elapsed().as_nanos() as u64;
                    return self.quit.then_some(Exit::Quit);
                } else if self.cooperative {
                    // The scheduler runs other guests meanwhile.
                    self.sleep_until =
                        Some(std::time::Instant::now() + std::time::Duration::from_nanos(wait));
                } else {
                    std::thread::sleep(std::time::Duration::from_nanos(wait));
                }
                self.stats.halted_ns += wait;
                None
            }
            // Only the serial line can wake the CPU: wait for it.
            None if can_wake && input => {
                let started = std::time::Instant::now();
                let wait = if self.wakes_for_commands() {
                    std::time::Duration::from_nanos(MONITOR_WAIT_NS)
                } else {
                    std::time::Duration::MAX
                };
                let open = self.take_serial_input(Some(wait));
                self.stats.halted_ns += started.elapsed().as_nanos() as u64;
                if self.quit {
                    Some(Exit::Quit)
                } else if open {
                    None
                } else {
                    Some(Exit::Halted { eip: self.cpu.eip })
                }
            }
            _ => Some(Exit::Halted { eip: self.cpu.eip }),
        }
    }

    /// Move what arrived on the serial console into COM1's receiver,
    /// waiting up to `wait` for the first byte (None: do not wait).
    /// Returns false once the input has ended (and then drops it).
    fn take_serial_input(&mut self, wait: Option<std::time::Duration>) -> bool {
        use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
        let Some(rx) = &self.serial_input else {
            return false;
        };
        let mut bytes = Vec::new();
        let mut open = true;
        if let Some(w) = wait {
            let first = if w == std::time::Duration::MAX {
                rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
            } else {
                rx.recv_timeout(w)
            };
            match first {
                Ok(console::SerialInput::Byte(b)) => bytes.push(b),
                Ok(console::SerialInput::Quit) => self.quit = true,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => open = false,
            }
        }
        while open && !self.quit {
            match rx.try_recv() {
                Ok(console::SerialInput::Byte(b)) => bytes.push(b),
                Ok(console::SerialInput::Quit) => self.quit = true,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        if !bytes.is_empty() {
            self.cpu.board.serial_input(&bytes);
        }
        if !open {
            self.serial_input = None;
        }
        open
    }
}

/// The process's resident set in bytes (VmRSS of /proc/self/status; 0
/// where it cannot be read).
pub fn process_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        })
        .unwrap_or(0)
}

/// The run's end for what the Linux platform's kernel side decided.
fn kernel_exit(e: linux::KernelExit) -> Option<Exit> {
    match e {
        linux::KernelExit::Resume | linux::KernelExit::Blocked(_) => None,
        linux::KernelExit::Exit(s) | linux::KernelExit::ThreadExit(s) => Some(Exit::Exited(s)),
        linux::KernelExit::Signal(f) => Some(Exit::Signal(f)),
        linux::KernelExit::Killed(s) => Some(Exit::Killed(s)),
    }
}
