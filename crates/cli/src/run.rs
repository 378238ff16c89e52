//! `popek run`: boot a guest with the chosen engine (or run a Linux
//! program natively), and `--lockstep`.

use std::io::Write;
use std::process::ExitCode;

use popek_machine::{Config, Engine, Machine, Platform};

use crate::stats::{print_stats, stats_json_line};
use crate::{ControlArgs, EngineArg, ResumeArgs, ResumeEngine, RunArgs};

/// `popek run`.
pub(crate) fn run(args: RunArgs) -> ExitCode {
    let RunArgs {
        guest,
        args,
        engine,
        memory,
        max_insns,
        append,
        initrd,
        cache_blocks,
        dump,
        stats,
        stats_json,
        trace,
        lockstep,
        strace,
        sysroot,
        icount,
        drive: drive_spec,
        balloon,
        control,
    } = args;
    let (image, path) = match load_image(&guest) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("popek: {e}");
            return ExitCode::from(2);
        }
    };
    // A Linux kernel (bzImage) boots through the Linux boot protocol with
    // --append as its command line, as QEMU's -kernel -append does.
    let bzimage = popek_machine::bzimage::is_bzimage(&image);
    let initrd = match initrd {
        Some(f) if bzimage => match std::fs::read(&f) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("popek: cannot read initrd {f:?}: {e}");
                return ExitCode::from(2);
            }
        },
        Some(_) => {
            eprintln!("popek: --initrd is for Linux kernels (bzImage); {guest} is not one");
            return ExitCode::from(2);
        }
        None => None,
    };
    let config = Config {
        memory,
        max_insns,
        // QEMU passes "<kernel path> <append>" as the Multiboot command line.
        cmdline: if bzimage {
            append
        } else {
            format!("{path} {append}")
        },
        engine: match engine {
            EngineArg::Interp => Engine::Interp,
            EngineArg::Bt | EngineArg::Native => Engine::Bt,
            EngineArg::Trap => Engine::Trap,
        },
        cache_blocks,
        trace,
        icount,
        // Exact counts when they are reported, compared or suspended at,
        // or a monitor may ask; otherwise translated code counts nothing
        // (see Config::count_insns).
        count_insns: stats || stats_json || lockstep || control.counts(),
        disk_overlay: None,
    };
    let multiboot = is_multiboot(&image);
    if !multiboot && !bzimage && control.any() {
        eprintln!(
            "popek: {guest} is a Linux program: snapshots, migration and the monitor are for bare-metal machines (Multiboot kernels, the Linux kernel)"
        );
        return ExitCode::from(2);
    }
    let disk = match drive_spec.as_deref().map(parse_drive).transpose() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("popek: --drive {}: {e}", drive_spec.unwrap_or_default());
            return ExitCode::from(2);
        }
    };
    if (disk.is_some() || balloon.is_some()) && (!multiboot && !bzimage || lockstep) {
        eprintln!(
            "popek: --drive and --balloon are for bare-metal machines, and not with --lockstep (both engines would drive one device)"
        );
        return ExitCode::from(2);
    }
    if control.gdb.is_some() && lockstep {
        eprintln!("popek: --gdb drives one machine: not with --lockstep");
        return ExitCode::from(2);
    }
    if control.any() && (lockstep || matches!(engine, EngineArg::Trap)) {
        eprintln!(
            "popek: snapshots, migration and the monitor run under --engine bt or interp (not {})",
            if lockstep {
                "--lockstep"
            } else {
                "--engine trap"
            }
        );
        return ExitCode::from(2);
    }
    let mut argv = vec![path];
    argv.extend(args);
    if matches!(engine, EngineArg::Native) {
        if multiboot {
            eprintln!(
                "popek: --engine native runs Linux programs only ({guest} is a Multiboot kernel)"
            );
            return ExitCode::from(2);
        }
        return match native(&argv, &mut std::io::stdout()) {
            Ok((status, _)) => ExitCode::from(status as u8),
            Err(e) => {
                eprintln!("popek: {e}");
                ExitCode::from(2)
            }
        };
    }
    // Under --lockstep both machines draw the same "random" bytes.
    let mut seed = [0u8; 8];
    popek_machine::linux::fill_random(&mut seed, &mut None);
    let random_seed = lockstep.then_some(u64::from_le_bytes(seed));
    let boot = |config: Config| {
        if bzimage {
            Machine::linux_kernel(&image, initrd.as_deref(), config)
        } else if multiboot {
            Machine::multiboot(&image, config)
        } else {
            let host = popek_machine::linux::Start::with_host_env(&argv, strace);
            let start = popek_machine::linux::Start {
                random_seed,
                sysroot: sysroot.clone().or(host.sysroot.clone()),
                ..host
            };
            Machine::linux_with(&image, start, config)
        }
    };
    if lockstep {
        return run_lockstep(&guest, config, boot);
    }
    let mut m = match boot(config) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("popek: {guest}: {e}");
            return ExitCode::from(2);
        }
    };
    control.arm(&mut m);
    if let Some(d) = disk {
        m.cpu.board.virtio_blk = Some(popek_devices::virtio::VirtioBlk::disk(d));
    }
    if let Some(size) = balloon {
        let mut b = popek_devices::virtio::VirtioBalloon::balloon();
        let pages = (size.min(u64::from(m.cpu.ram.size())) / 4096) as u32;
        b.dev.num_pages = pages;
        m.cpu.board.balloon = Some(b);
        m.cpu.board.pv.set_target(pages);
    }
    drive(
        m,
        Output {
            dump,
            stats,
            stats_json,
            serial: multiboot || bzimage,
        },
        &control,
    )
}

/// `--drive file=PATH[,format=raw|pcow][,readonly=on|off][,if=virtio]`: the
/// image, opened.
fn parse_drive(spec: &str) -> Result<popek_devices::virtio::Disk, String> {
    let (mut file, mut readonly, mut format) = (None, false, None);
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("file", f)) => file = Some(f.to_string()),
            Some(("if", "virtio")) => {}
            Some(("format", f @ ("raw" | "pcow"))) => format = Some(f.to_string()),
            Some(("format", f)) => {
                return Err(format!("format {f}: popek reads raw and pcow images"))
            }
            Some(("if", i)) => return Err(format!("if={i}: only virtio disks are supported")),
            Some(("readonly", "on")) => readonly = true,
            Some(("readonly", "off")) => readonly = false,
            _ => {
                return Err(format!(
                    "{part:?}: expected file=PATH, format=raw|pcow, readonly=on|off or if=virtio"
                ))
            }
        }
    }
    let file = file.ok_or("no file=PATH")?;
    popek_devices::virtio::Disk::open(&file, format.as_deref(), readonly)
}

/// Where a run's reports go.
struct Output {
    dump: Option<String>,
    stats: bool,
    stats_json: bool,
    /// Does the guest's serial line read popek's stdin?
    serial: bool,
}

impl ControlArgs {
    /// Does the run need exact instruction counts?
    fn counts(&self) -> bool {
        self.suspend_at_insns.is_some() || self.monitor.is_some() || self.migrate_to.is_some()
    }

    /// Is anything of snapshots, migration or the monitor asked for?
    fn any(&self) -> bool {
        self.counts() || self.snapshot.is_some()
    }

    /// Arm the machine's suspension and migration points.
    fn arm(&self, m: &mut Machine) {
        m.suspend_at = self.suspend_at_insns;
        if let Some(to) = &self.migrate_to {
            let opts = popek_machine::migrate::Options {
                to: to.clone(),
                bandwidth: self.migrate_bandwidth,
                max_downtime: std::time::Duration::from_millis(self.migrate_max_downtime),
            };
            m.migrate_at = Some((self.migrate_at_insns.unwrap_or(m.cpu.retired), opts));
        }
    }
}

/// Run a machine to its end (or its suspension), with the dump, the
/// serial console, the monitor and the reports the user asked for.
fn drive(mut m: Machine, o: Output, control: &ControlArgs) -> ExitCode {
    if let Some(target) = o.dump {
        let Some(bt) = m.engine.bt_mut() else {
            eprintln!("popek: --dump shows translated code: use it with --engine bt");
            return ExitCode::from(2);
        };
        let sink: Box<dyn Write + Send> = if target == "-" {
            Box::new(std::io::stderr())
        } else {
            match std::fs::File::create(&target) {
                Ok(f) => Box::new(std::io::BufWriter::new(f)),
                Err(e) => {
                    eprintln!("popek: cannot create dump file {target:?}: {e}");
                    return ExitCode::from(2);
                }
            }
        };
        bt.set_dump(sink);
    }
    let gdb = match control.gdb.as_deref().map(popek_machine::gdb::listen) {
        Some(Ok(l)) => Some(l),
        Some(Err(e)) => {
            eprintln!("popek: {e}");
            return ExitCode::from(2);
        }
        None => None,
    };
    if let Some(spec) = &control.monitor {
        match popek_machine::monitor::Monitor::listen(spec) {
            Ok(mon) => m.monitor = Some(mon),
            Err(e) => {
                eprintln!("popek: {e}");
                return ExitCode::from(2);
            }
        }
    }
    // A kernel's COM1 reads popek's stdin (raw while a terminal), as with
    // QEMU's -serial stdio; Ctrl-A X quits.
    let _raw = o.serial.then(|| {
        m.serial_input = Some(popek_machine::console::stdin_reader());
        popek_machine::console::RawTerminal::new()
    });
    // Not locked for the whole run: a Linux program's other threads write
    // to it too.
    let mut out = std::io::stdout();
    let start = std::time::Instant::now();
    let exit = match gdb {
        Some(l) => popek_machine::gdb::serve(&mut m, l, &mut out, &mut std::io::stderr()),
        None => m.run(&mut out),
    };
    let elapsed = start.elapsed();
    let _ = out.flush();
    if let Some(v) = &m.cpu.board.virtio_blk {
        // What the guest wrote reaches the disk before popek ends.
        if !v.dev.disk.readonly {
            if let Err(e) = v.dev.disk.flush() {
                eprintln!("popek: cannot flush the disk image: {e}");
            }
        }
        if let Some(why) = &v.broken {
            eprintln!("popek: the virtio disk stopped serving: {why}");
        }
    }
    if o.stats {
        print_stats(&m, elapsed);
    }
    if o.stats_json {
        eprintln!("{}", stats_json_line(&m, elapsed));
    }
    if exit == popek_machine::Exit::Migrated {
        // (The summary is printed; the guest runs on the target.)
        return ExitCode::SUCCESS;
    }
    let suspended = exit == popek_machine::Exit::Suspended;
    if let (true, Some(file)) = (suspended, &control.snapshot) {
        return suspend(&mut m, std::path::Path::new(file), control.diff);
    }
    if control.suspend_at_insns.is_some() && !suspended {
        eprintln!(
            "popek: the guest ended after {} instructions, before the suspension point: no snapshot written",
            m.cpu.retired
        );
    }
    // A Linux process killed by a signal dies of it here too, so that its
    // parent (a shell under popek, or on the host) sees the wait status
    // it would natively. A forked process says nothing (shells do not
    // either), nor does a SIGPIPE.
    let signal = match (&exit, &m.platform) {
        (popek_machine::Exit::Signal(f), Platform::Linux(p)) => Some((f.signo, p.forked)),
        (popek_machine::Exit::Killed(s), Platform::Linux(p)) => Some((*s, p.forked)),
        _ => None,
    };
    if let Some(msg) = exit.message() {
        if !signal.is_some_and(|(s, forked)| forked || s == 13) {
            eprintln!("popek: {msg}");
        }
    }
    if let Some((sig, _)) = signal {
        let _ = std::io::stdout().flush();
        popek_machine::linux::die_of(sig);
    }
    ExitCode::from(exit.status() as u8)
}

/// Write the snapshot of a suspended machine and say so in one line.
fn suspend(m: &mut Machine, file: &std::path::Path, diff: bool) -> ExitCode {
    match m.save_snapshot(file, diff, false) {
        Ok(w) => {
            eprintln!(
                "popek: suspended at eip={:#010x} after {} instructions: wrote {} ({} snapshot, {:.1} MiB for {} MiB of RAM, {} pages stored) in {:.1} ms",
                m.cpu.eip,
                m.cpu.retired,
                file.display(),
                if w.kind == popek_machine::snapshot::Kind::Diff { "diff" } else { "full" },
                w.bytes as f64 / (1 << 20) as f64,
                w.memory >> 20,
                w.pages_stored,
                w.elapsed.as_secs_f64() * 1e3
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("popek: {e}");
            ExitCode::from(2)
        }
    }
}

/// `popek resume`.
pub(crate) fn resume(args: ResumeArgs) -> ExitCode {
    let config = Config {
        max_insns: None,
        engine: match args.engine {
            ResumeEngine::Interp => Engine::Interp,
            ResumeEngine::Bt => Engine::Bt,
        },
        cache_blocks: args.cache_blocks,
        trace: args.trace,
        count_insns: args.stats || args.stats_json || args.control.counts(),
        disk_overlay: args.disk_overlay.clone().map(std::path::PathBuf::from),
        ..Config::default()
    };
    let started = std::time::Instant::now();
    let mut m = match Machine::resume(std::path::Path::new(&args.file), config) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("popek: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(at) = args.control.suspend_at_insns {
        if at <= m.cpu.retired {
            eprintln!(
                "popek: --suspend-at-insns {at}: the snapshot is at {} instructions already",
                m.cpu.retired
            );
            return ExitCode::from(2);
        }
    }
    m.config.max_insns = args.max_insns;
    args.control.arm(&mut m);
    if args.stats || args.stats_json {
        // From the command to the machine ready for its first instruction:
        // the file opened and checked (its checksum over every byte), RAM
        // mapped from it, the state put back.
        eprintln!(
            "popek: resumed {} in {:.3} ms ({} MiB of RAM, {} pages mapped from snapshot files)",
            args.file,
            started.elapsed().as_secs_f64() * 1e3,
            m.cpu.ram.size() >> 20,
            m.cpu.ram.shared_pages()
        );
    }
    drive(
        m,
        Output {
            dump: args.dump,
            stats: args.stats,
            stats_json: args.stats_json,
            serial: true,
        },
        &args.control,
    )
}

/// `popek incoming`: wait for a migration, then run the guest.
pub(crate) fn incoming(
    listen: &str,
    engine: ResumeEngine,
    stats: bool,
    stats_json: bool,
    control: &ControlArgs,
) -> ExitCode {
    let got = popek_machine::migrate::incoming(listen, |addr| {
        eprintln!("popek: waiting for a migration on {addr}");
    });
    let inc = match got {
        Ok(i) => i,
        Err(e) => {
            eprintln!("popek: {e}");
            return ExitCode::from(2);
        }
    };
    let config = Config {
        engine: match engine {
            ResumeEngine::Interp => Engine::Interp,
            ResumeEngine::Bt => Engine::Bt,
        },
        count_insns: stats || stats_json || control.counts(),
        ..Config::default()
    };
    let (peer, pages, bytes) = (inc.peer, inc.pages, inc.bytes);
    let (state, ram, inc) = inc.split();
    let mut m = match Machine::from_state(&state, ram, config) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("popek: migration from {peer}: {e}");
            return ExitCode::from(2);
        }
    };
    control.arm(&mut m);
    eprintln!(
        "popek: migration from {peer}: {pages} pages ({:.1} MiB) received; the guest runs here",
        bytes as f64 / (1 << 20) as f64
    );
    if let Err(e) = inc.started() {
        eprintln!("popek: migration from {peer}: {e}");
        return ExitCode::from(2);
    }
    drive(
        m,
        Output {
            dump: None,
            stats,
            stats_json,
            serial: true,
        },
        control,
    )
}

/// `popek inspect`: check a snapshot and describe it.
pub(crate) fn inspect(file: &str) -> ExitCode {
    use popek_machine::snapshot::{Kind, Snapshot};
    let path = std::path::Path::new(file);
    let s = match Snapshot::open(path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("popek: {e}");
            return ExitCode::from(2);
        }
    };
    let mut o = String::new();
    macro_rules! outln {
        ($o:expr, $($t:tt)*) => {{
            use std::fmt::Write as _;
            let _ = writeln!($o, $($t)*);
        }};
    }
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mach = s.state.mach.clone();
    outln!(o, "file:        {file}");
    outln!(
        o,
        "format:      popek snapshot {}.{}",
        s.version.0,
        s.version.1
    );
    outln!(
        o,
        "kind:        {}",
        if s.kind == Kind::Diff { "diff" } else { "full" }
    );
    outln!(o, "id:          {}", hex(&s.id));
    if let Some(b) = &s.state.base {
        outln!(o, "base:        {} ({})", b.path.display(), hex(&b.id));
    }
    outln!(o, "size:        {} bytes", s.bytes);
    outln!(o, "memory:      {} MiB", mach.memory >> 20);
    outln!(o, "pages:       {} stored", s.pages_stored());
    outln!(o, "insns:       {}", mach.retired);
    outln!(
        o,
        "clock:       {} ns ({})",
        mach.now_ns,
        if mach.icount {
            "instruction clock"
        } else {
            "host time"
        }
    );
    outln!(o, "serial out:  {} bytes", mach.serial_out);
    let config = Config {
        engine: Engine::Interp,
        ..Config::default()
    };
    match Machine::resume(path, config) {
        Ok(m) => {
            outln!(o, "cpu:         {}", m.cpu.summary());
            outln!(
                o,
                "ram digest:  {:08x} (CRC-32 of all guest RAM)",
                crc32(m.cpu.ram.as_slice())
            );
            // (A closed pipe is the reader's choice, not an error.)
            let _ = std::io::stdout().write_all(o.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("popek: {e}");
            ExitCode::from(2)
        }
    }
}

/// CRC-32 (IEEE) of `b`.
fn crc32(b: &[u8]) -> u32 {
    popek_machine::snapshot::crc32(b)
}

/// Read a guest image: a bundled guest by name, else a file. Returns the
/// bytes and the path QEMU would have been given.
pub(crate) fn load_image(guest: &str) -> Result<(Vec<u8>, String), String> {
    if let Some(g) = bundled(guest) {
        // A Linux program's argv[0] is the file the build left, so that
        // --engine native (which executes that file) sees the same one.
        let path = if g.linux { g.path } else { guest };
        return Ok((g.elf.to_vec(), path.to_string()));
    }
    std::fs::read(guest)
        .map(|b| (b, guest.to_string()))
        .map_err(|e| {
            format!(
                "cannot read guest {guest:?}: {e} (bundled guests: {})",
                bundled_names()
            )
        })
}

/// The first [`IMAGE_HEAD`] bytes of a guest image (what [`is_multiboot`]
/// looks at), without reading the rest: deciding how to parse the command
/// line should not read a large program twice.
pub(crate) fn image_head(guest: &str) -> Option<Vec<u8>> {
    if let Some(g) = bundled(guest) {
        return Some(g.elf[..g.elf.len().min(IMAGE_HEAD)].to_vec());
    }
    use std::io::Read;
    let mut head = Vec::with_capacity(IMAGE_HEAD);
    std::fs::File::open(guest)
        .and_then(|f| f.take(IMAGE_HEAD as u64).read_to_end(&mut head))
        .ok()?;
    Some(head)
}

/// The bundled guest `guest` names, unless a file of that name exists (a
/// path wins over a bundled name).
fn bundled(guest: &str) -> Option<&'static popek_guests::Guest> {
    popek_guests::find(guest).filter(|_| !std::path::Path::new(guest).exists())
}

/// How much of an image [`is_multiboot`] reads: the Multiboot header lies
/// in the first 8 KiB (Multiboot Specification 0.6.96, section 3.1.1).
const IMAGE_HEAD: usize = 8192;

/// A Multiboot kernel (or not an ELF file at all: the Multiboot loader then
/// names the problem), else a Linux program.
pub(crate) fn is_multiboot(image: &[u8]) -> bool {
    popek_machine::multiboot::find_header(image).is_some() || !image.starts_with(b"\x7fELF")
}

fn bundled_names() -> String {
    popek_guests::GUESTS
        .iter()
        .map(|g| g.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Run a Linux program directly on the host; its stdout goes to `out`.
/// Returns the exit status (128 + signal when killed) and the wall time.
pub(crate) fn native(
    argv: &[String],
    out: &mut dyn Write,
) -> Result<(i32, std::time::Duration), String> {
    use std::os::unix::process::ExitStatusExt;
    let prog = if argv[0].contains('/') {
        argv[0].clone()
    } else {
        format!("./{}", argv[0])
    };
    let start = std::time::Instant::now();
    let child = std::process::Command::new(&prog)
        .args(&argv[1..])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {prog:?} natively: {e}"))?;
    let output = child
        .wait_with_output()
        .map_err(|e| format!("{prog}: {e}"))?;
    let elapsed = start.elapsed();
    let _ = out.write_all(&output.stdout);
    let _ = out.flush();
    let status = output
        .status
        .code()
        .unwrap_or_else(|| 128 + output.status.signal().unwrap_or(0));
    Ok((status, elapsed))
}

/// `--lockstep`: the guest under bt and under the interpreter, compared
/// block by block.
fn run_lockstep(
    guest: &str,
    config: Config,
    boot: impl Fn(Config) -> Result<Machine, popek_machine::LoadError>,
) -> ExitCode {
    let machines = boot(Config {
        engine: Engine::Bt,
        ..config.clone()
    })
    .and_then(|a| {
        boot(Config {
            engine: Engine::Interp,
            ..config
        })
        .map(|b| (a, b))
    });
    let (mut a, mut b) = match machines {
        Ok(m) => m,
        Err(e) => {
            eprintln!("popek: {guest}: {e}");
            return ExitCode::from(2);
        }
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match popek_machine::lockstep::run(&mut a, &mut b, &mut out, &mut std::io::stderr()) {
        Ok(agreed) => {
            let _ = out.flush();
            eprintln!(
                "popek: lockstep: bt and interp agreed on {} instructions ({} resyncs after reads of undefined flags)",
                a.cpu.retired, agreed.resyncs
            );
            let exit = agreed.exit;
            if let Some(msg) = exit.message() {
                eprintln!("popek: {msg}");
            }
            ExitCode::from(exit.status() as u8)
        }
        Err(d) => {
            let _ = out.flush();
            eprintln!("{d}");
            ExitCode::from(6)
        }
    }
}
