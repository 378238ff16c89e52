//! `popek`: run 32-bit x86 guests, and look at how their instructions
//! classify after Popek & Goldberg.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod args;
mod classify;
mod compare;
mod demo;
mod host;
mod run;
mod stats;

const EXAMPLES: &str = "\
Examples:
  popek run hello                     run a bundled guest (binary translator)
  popek run hello --engine interp     ... with the reference interpreter
  popek run exceptions --lockstep     bt and interp side by side, block by block
  popek run ./kernel.elf --memory 128M --append 'debug=1'
  popek run compute --max-insns 1000000
  popek run compute --stats --dump=blocks.txt
  popek run ./prog arg1 arg2          a static i386 Linux program (int 0x80 serviced by popek)
  popek run --strace ./prog           ... printing its system calls
  popek run --engine native ./prog    ... directly on the host CPU
  popek initramfs rd.cpio --busybox target/distro/busybox
  popek run target/distro/vmlinuz --initrd rd.cpio --memory 256M --append console=ttyS0
                                      Debian's kernel to a busybox shell (Ctrl-A X quits)
  popek compare ./prog arg1           native vs bt: same output? how much slower?
  popek guests                        list the bundled guests
  popek classify                      the Popek-Goldberg classification table
  popek classify popf                 classify the code a guest runs from its entry
  popek run compute --suspend-at-insns 1000000 --snapshot c.snap
  popek resume c.snap                 ... and on from where it stopped
  popek run paging --monitor unix:/tmp/m.sock &
  popek monitor /tmp/m.sock snapshot file=p.snap
  popek img create --backing base.img guest1.pcow
  popek run vmlinuz --initrd rd.cpio --drive file=guest1.pcow ...
  popek incoming --listen 127.0.0.1:4444 &
  popek run paging --migrate-to 127.0.0.1:4444 --migrate-at-insns 1000000

popek's options go before the guest, or after a Multiboot kernel (which
takes no arguments: use --append). Everything after a Linux program is the
program's, as with qemu-i386; `--` ends popek's options explicitly.

Exit status: the guest's isa-debug-exit status ((v << 1) | 1, as QEMU), or
0 when the guest halts for good, 2 on an error (bad image, unsupported
operation, triple fault, a damaged snapshot), 4 when --max-insns runs
out, 6 when --lockstep finds a divergence.";

#[derive(Parser)]
#[command(name = "popek", version, about = "A binary-translating virtual machine monitor for 32-bit x86", after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum EngineArg {
    /// The reference interpreter.
    Interp,
    /// The binary translator (the default): guest code runs as
    /// translated host code, special instructions on the virtual CPU.
    Bt,
    /// Direct execution of a Linux program on the host CPU (the kernel's
    /// IA32 emulation): the baseline translation is measured against.
    Native,
    /// Classic trap-and-emulate: the guest kernel deprivileged to CPL 3;
    /// privileged instructions trap and are emulated, sensitive
    /// unprivileged ones (POPF, PUSHF, SGDT, ...) silently misbehave.
    Trap,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a Multiboot kernel, or start a static i386 Linux program.
    Run(RunArgs),
    /// Run a static i386 Linux program natively and under bt (and interp
    /// with --interp): check that stdout and the exit status are the same,
    /// and print the times, the ratio to native and the translation
    /// statistics that explain it.
    Compare {
        /// The program.
        prog: String,
        /// Its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
        /// Also run the interpreter.
        #[arg(long)]
        interp: bool,
    },
    /// Print the classification table, or classify a guest's code.
    Classify {
        /// A bundled guest or a path: classify the blocks reachable from its entry.
        guest: Option<String>,
    },
    /// List the bundled guests.
    Guests,
    /// Resume a machine from a snapshot (`run --suspend-at-insns`, or the
    /// monitor's snapshot command) and run it on.
    Resume(ResumeArgs),
    /// Send one command to a running machine's monitor and print the
    /// answer (a JSON line): query-status, query-stats, stop, cont,
    /// snapshot file=PATH [diff=true], quit.
    Monitor {
        /// The monitor's socket (the PATH of --monitor unix:PATH).
        socket: String,
        /// The command.
        command: String,
        /// Its arguments, KEY=VALUE each.
        args: Vec<String>,
    },
    /// Wait for one live migration (`popek run ... --migrate-to`, or the
    /// monitor's migrate command) and run the guest once it arrives; the
    /// exit status is the guest's.
    Incoming {
        /// HOST:PORT to listen on (port 0: any free port, printed).
        #[arg(long, value_name = "HOST:PORT")]
        listen: String,
        /// Execution engine.
        #[arg(long, value_enum, default_value = "bt")]
        engine: ResumeEngine,
        /// Print execution statistics to stderr when the guest ends.
        #[arg(long)]
        stats: bool,
        /// Print the statistics as one JSON object to stderr.
        #[arg(long)]
        stats_json: bool,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Run many guests in one process, their virtual CPUs scheduled on
    /// host threads with proportional shares (weights); each guest's
    /// serial output goes to its out=FILE or to stdout, each line
    /// prefixed with its name. The exit status is 0 when every guest ended
    /// normally.
    Host {
        /// Host threads to run guests on.
        #[arg(long, default_value = "1")]
        threads: usize,
        /// Content-based page sharing: identical pages across guests
        /// backed by one host page, copy-on-write.
        #[arg(long)]
        dedup: bool,
        /// Write the report (each guest's CPU share against its weight,
        /// Jain's fairness index) as one JSON object to FILE (- for
        /// stderr).
        #[arg(long, value_name = "FILE")]
        stats_json: Option<String>,
        /// A monitor for the host on a Unix socket (unix:PATH):
        /// query-guests, query-dedup, quit, and a guest's query-status, query-stats,
        /// balloon and query-balloon with guest=NAME.
        #[arg(long, value_name = "unix:PATH")]
        monitor: Option<String>,
        /// GUEST[,weight=W][,memory=SIZE][,balloon=SIZE][,out=FILE][,initrd=FILE][,append=...]
        /// (append= takes the rest of the spec).
        #[arg(required = true)]
        specs: Vec<String>,
    },
    /// Disk images: create a copy-on-write overlay (pcow) over a base, so
    /// one base can be cloned into many guests; flatten an image to raw;
    /// describe one.
    Img {
        #[command(subcommand)]
        cmd: ImgCmd,
    },
    /// Check a snapshot file and describe it: kind, version, sizes, where
    /// the guest stopped, and a digest of its RAM (through its bases).
    Inspect {
        /// The snapshot file.
        file: String,
    },
    /// Write an initramfs (a cpio archive, uncompressed) for a Linux
    /// kernel: busybox-static as /bin/busybox, /init (a script of yours, or
    /// an interactive shell on the console), /dev/console, the usual
    /// directories, and any files you add.
    Initramfs {
        /// The archive to write.
        out: String,
        /// A static i386 busybox (e.g. from Debian's busybox-static:i386).
        #[arg(long, value_name = "PATH")]
        busybox: String,
        /// The /init script (default: mount /proc, /sys, /dev and start a
        /// shell on the console).
        #[arg(long, value_name = "FILE")]
        init: Option<String>,
        /// Add a host file as DEST in the archive (its permission bits
        /// kept; missing parent directories made).
        #[arg(long, value_name = "DEST=SRC")]
        add: Vec<String>,
    },
    /// Demonstrations. `popek-goldberg`: run a bundled guest (default
    /// `sensitive`) under interp, bt and trap and print what each line of
    /// its output became, side by side, then what the trap-and-emulate
    /// monitor saw (traps) and did not see (violations).
    Demo {
        /// Which demonstration: popek-goldberg.
        name: String,
        /// The bundled guest to run.
        #[arg(long, default_value = "sensitive")]
        guest: String,
    },
}

/// `popek run`'s arguments.
#[derive(Args)]
pub(crate) struct RunArgs {
    /// Path to a Multiboot ELF or a static i386 Linux executable, or the
    /// name of a bundled guest.
    pub(crate) guest: String,
    /// Arguments for a Linux program: everything after the program goes
    /// to it, as with qemu-i386 (a Multiboot kernel takes none: use
    /// --append for its command line).
    #[arg(last = true)]
    pub(crate) args: Vec<String>,
    /// Execution engine.
    #[arg(long, value_enum, default_value = "bt")]
    pub(crate) engine: EngineArg,
    /// Run the translator and the interpreter side by side, block by
    /// block, and report the first divergence with both states (exit
    /// status 6).
    #[arg(long)]
    pub(crate) lockstep: bool,
    /// Guest RAM, e.g. 64M, 1G, 65536.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub(crate) memory: u64,
    /// Stop after this many guest instructions.
    #[arg(long)]
    pub(crate) max_insns: Option<u64>,
    /// Kernel command line (Multiboot or Linux kernel; QEMU's -append).
    #[arg(long, default_value = "")]
    pub(crate) append: String,
    /// Initial RAM disk for a Linux kernel (bzImage), as QEMU's -initrd.
    #[arg(long, value_name = "FILE")]
    pub(crate) initrd: Option<String>,
    /// Bound the translation cache to N blocks (LRU eviction).
    #[arg(long, value_name = "N")]
    pub(crate) cache_blocks: Option<std::num::NonZeroUsize>,
    /// Write every translated block (guest code, how it was translated,
    /// host code) to FILE, or to stderr (needs --engine bt).
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    pub(crate) dump: Option<String>,
    /// Print execution statistics to stderr when the guest ends.
    #[arg(long)]
    pub(crate) stats: bool,
    /// Print the statistics as one JSON object to stderr.
    #[arg(long)]
    pub(crate) stats_json: bool,
    /// Print every executed instruction and the registers before it to
    /// stderr, optionally only from the N-th instruction on.
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "0")]
    pub(crate) trace: Option<u64>,
    /// Print each system call of a Linux program and its result to
    /// stderr, as strace does.
    #[arg(long)]
    pub(crate) strace: bool,
    /// Look up a dynamic Linux program's interpreter (ld-linux.so.2) and
    /// the files it opens under SYSROOT first, as qemu-i386 -L does
    /// (default: the POPEK_LD_PREFIX environment variable, else the host's
    /// own /lib/ld-linux.so.2 and libraries).
    #[arg(short = 'L', value_name = "SYSROOT")]
    pub(crate) sysroot: Option<std::path::PathBuf>,
    /// Guest time counts instructions (one ns each) instead of host time:
    /// timer interrupts, the RTC and RDTSC are reproducible run to run.
    #[arg(long)]
    pub(crate) icount: bool,
    /// A virtio-blk disk on the PCI bus backed by a raw image file, as
    /// QEMU's -drive: file=PATH[,format=raw][,readonly=on][,if=virtio].
    #[arg(long, value_name = "file=PATH[,...]")]
    pub(crate) drive: Option<String>,
    /// A virtio memory balloon on the PCI bus, asked at boot to take SIZE
    /// of the guest's RAM (0: present, empty). The monitor's `balloon
    /// value=BYTES` sets the guest's memory later, as QEMU's.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub(crate) balloon: Option<u64>,
    #[command(flatten)]
    pub(crate) control: ControlArgs,
}

/// Suspending to a snapshot and the monitor, shared by `run` and `resume`.
#[derive(Args, Clone)]
pub(crate) struct ControlArgs {
    /// Suspend once the guest has retired N instructions (counted from
    /// boot, across resumes): write the machine to the --snapshot file,
    /// print where and what, and exit 0.
    #[arg(long, value_name = "N", requires = "snapshot")]
    pub(crate) suspend_at_insns: Option<u64>,
    /// The snapshot file --suspend-at-insns writes.
    #[arg(long, value_name = "FILE", requires = "suspend_at_insns")]
    pub(crate) snapshot: Option<String>,
    /// Write a diff snapshot: only the pages written since the snapshot
    /// the machine resumed from (or last wrote), which stays its base.
    #[arg(long, requires = "snapshot")]
    pub(crate) diff: bool,
    /// Serve the monitor (QMP-like JSON commands, one per line) on a Unix
    /// socket: unix:PATH. `popek monitor PATH COMMAND` is a client.
    #[arg(long, value_name = "unix:PATH")]
    pub(crate) monitor: Option<String>,
    /// Live-migrate the guest to a `popek incoming --listen HOST:PORT`
    /// (from the start, or at --migrate-at-insns).
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) migrate_to: Option<String>,
    /// Start the migration once the guest has retired N instructions.
    #[arg(long, value_name = "N", requires = "migrate_to")]
    pub(crate) migrate_at_insns: Option<u64>,
    /// Send at most RATE bytes per second (e.g. 50M; default: as fast as
    /// the connection goes).
    #[arg(long, value_name = "RATE", value_parser = parse_size)]
    pub(crate) migrate_bandwidth: Option<u64>,
    /// The longest the guest may stand still at the end of a migration.
    #[arg(long, value_name = "MS", default_value = "300")]
    pub(crate) migrate_max_downtime: u64,
    /// Wait for gdb on HOST:PORT (`target remote HOST:PORT`) before the
    /// first instruction, as QEMU's -s -S (-gdb tcp::PORT -S), and let it
    /// drive the machine: registers, memory, breakpoints, watchpoints,
    /// stepi, continue, Ctrl-C, kill, detach.
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) gdb: Option<String>,
}

/// `popek resume`'s arguments.
#[derive(Args)]
pub(crate) struct ResumeArgs {
    /// The snapshot file (a diff snapshot finds its base by the path it
    /// recorded).
    pub(crate) file: String,
    /// Execution engine (a snapshot resumes under either).
    #[arg(long, value_enum, default_value = "bt")]
    pub(crate) engine: ResumeEngine,
    /// Stop after this many more guest instructions.
    #[arg(long)]
    pub(crate) max_insns: Option<u64>,
    /// Bound the translation cache to N blocks (LRU eviction).
    #[arg(long, value_name = "N")]
    pub(crate) cache_blocks: Option<std::num::NonZeroUsize>,
    /// Write every translated block to FILE, or to stderr.
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    pub(crate) dump: Option<String>,
    /// Print execution statistics to stderr when the guest ends.
    #[arg(long)]
    pub(crate) stats: bool,
    /// Print the statistics as one JSON object to stderr.
    #[arg(long)]
    pub(crate) stats_json: bool,
    /// The snapshot has a disk: create this pcow overlay over its image
    /// and let the guest write there, leaving the image as the snapshot
    /// saw it (so several resumes of one snapshot can run: clones).
    #[arg(long, value_name = "NEW.pcow")]
    pub(crate) disk_overlay: Option<String>,
    /// Print every executed instruction to stderr, optionally only from
    /// the N-th (counted from the resume).
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "0")]
    pub(crate) trace: Option<u64>,
    #[command(flatten)]
    pub(crate) control: ControlArgs,
}

/// `popek img` commands.
#[derive(Subcommand)]
pub(crate) enum ImgCmd {
    /// Create an image: a pcow overlay over --backing (the base is only
    /// read from then on), or an empty pcow overlay of --size.
    Create {
        /// The base image (raw or pcow), recorded as given (relative paths
        /// relative to the new overlay's directory).
        #[arg(long, value_name = "BASE")]
        backing: Option<String>,
        /// The virtual size (default: the base's).
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        size: Option<u64>,
        /// The new overlay (an existing file is not replaced).
        new: String,
    },
    /// Write an image's whole virtual disk (through its bases) to a raw
    /// file.
    Convert {
        /// The image (raw or pcow).
        input: String,
        /// The raw file to write.
        output: String,
    },
    /// Describe an image: format, virtual size, base.
    Info {
        /// The image.
        image: String,
    },
}

/// The engines a snapshot resumes under.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum ResumeEngine {
    /// The reference interpreter.
    Interp,
    /// The binary translator.
    Bt,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let m = match s[i..].to_ascii_uppercase().as_str() {
                "K" | "KB" | "KIB" => 1u64 << 10,
                "M" | "MB" | "MIB" => 1 << 20,
                "G" | "GB" | "GIB" => 1 << 30,
                other => return Err(format!("unknown size suffix {other:?}")),
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size too large: {s:?}"))
}

fn main() -> ExitCode {
    let cli = match args::parse(std::env::args().collect()) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match cli.cmd {
        Cmd::Run(args) => run::run(args),
        Cmd::Resume(args) => run::resume(args),
        Cmd::Monitor {
            socket,
            command,
            args,
        } => match popek_machine::monitor::client(std::path::Path::new(&socket), &command, &args) {
            Ok(answer) => {
                println!("{answer}");
                if answer.get("return").is_some() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
            Err(e) => {
                eprintln!("popek: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::Inspect { file } => run::inspect(&file),
        Cmd::Host {
            threads,
            dedup,
            stats_json,
            monitor,
            specs,
        } => host::host(threads, dedup, specs, stats_json, monitor),
        Cmd::Img { cmd } => match img(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("popek: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::Incoming {
            listen,
            engine,
            stats,
            stats_json,
            control,
        } => run::incoming(&listen, engine, stats, stats_json, &control),
        Cmd::Compare { prog, args, interp } => compare::compare(&prog, args, interp),
        Cmd::Demo { name, guest } => match demo::demo(&name, &guest) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("popek: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::Classify { guest: None } => {
            classify::print_table();
            ExitCode::SUCCESS
        }
        Cmd::Classify { guest: Some(g) } => match classify::classify_guest(&g) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("popek: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::Initramfs {
            out,
            busybox,
            init,
            add,
        } => match initramfs(&out, &busybox, init.as_deref(), &add) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("popek: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::Guests => {
            for g in popek_guests::GUESTS {
                println!("{:<12} {}", g.name, g.about);
            }
            ExitCode::SUCCESS
        }
    }
}

/// `popek img`.
fn img(cmd: ImgCmd) -> Result<(), String> {
    use popek_devices::image::{create_overlay, Image};
    use std::path::Path;
    match cmd {
        ImgCmd::Create { backing, size, new } => {
            let size = create_overlay(Path::new(&new), backing.as_deref().map(Path::new), size)?;
            println!(
                "{new}: pcow overlay of {size} bytes{}",
                backing.map(|b| format!(" over {b}")).unwrap_or_default()
            );
            Ok(())
        }
        ImgCmd::Convert { input, output } => {
            let img = Image::open(Path::new(&input), None, false)?;
            let size = img.size()?;
            let out = std::fs::File::create(&output).map_err(|e| format!("{output}: {e}"))?;
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; 1 << 20];
            let mut at = 0u64;
            while at < size {
                let n = (size - at).min(buf.len() as u64) as usize;
                img.read_at(&mut buf[..n], at)
                    .map_err(|e| format!("{input}: {e}"))?;
                // Zero runs stay holes in the raw file.
                if buf[..n].iter().any(|&b| b != 0) {
                    out.write_all_at(&buf[..n], at)
                        .map_err(|e| format!("{output}: {e}"))?;
                }
                at += n as u64;
            }
            out.set_len(size)
                .and_then(|()| out.sync_all())
                .map_err(|e| format!("{output}: {e}"))
        }
        ImgCmd::Info { image } => {
            let img = Image::open(Path::new(&image), None, false)?;
            let kind = match &img {
                Image::Raw(_) => "raw",
                Image::Cow(_) => "pcow",
            };
            println!("{image}: {kind}, {} bytes", img.size()?);
            Ok(())
        }
    }
}

/// `popek initramfs`.
fn initramfs(out: &str, busybox: &str, init: Option<&str>, add: &[String]) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let read = |p: &str| std::fs::read(p).map_err(|e| format!("{p}: {e}"));
    let init = match init {
        Some(p) => Some(String::from_utf8(read(p)?).map_err(|_| format!("{p}: not text"))?),
        None => None,
    };
    let mut a = popek_machine::initramfs::Initramfs::busybox(&read(busybox)?, init.as_deref());
    let mut dirs: std::collections::BTreeSet<String> = popek_machine::initramfs::BUSYBOX_DIRS
        .iter()
        .map(|d| d.to_string())
        .collect();
    for spec in add {
        let (dest, src) = spec
            .split_once('=')
            .ok_or_else(|| format!("--add {spec}: expected DEST=SRC"))?;
        let dest = dest.trim_start_matches('/');
        if dest.is_empty() || dest.ends_with('/') {
            return Err(format!("--add {spec}: DEST must name a file"));
        }
        // Its missing parent directories, outermost first.
        for (i, _) in dest.match_indices('/') {
            if dirs.insert(dest[..i].to_string()) {
                a.dir(&dest[..i], 0o755);
            }
        }
        let perm = std::fs::metadata(src)
            .map_err(|e| format!("{src}: {e}"))?
            .permissions()
            .mode();
        a.file(dest, perm, &read(src)?);
    }
    std::fs::write(out, a.finish()).map_err(|e| format!("{out}: {e}"))
}
