//! `popek`: run 32-bit x86 guests, and look at how their instructions
//! classify after Popek & Goldberg.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use popek_decode::{reachable_blocks, AtRing3, Class, SPECIALS};
use popek_machine::{Config, Engine, Machine};
use popek_translate::engine::ExitReason;

const EXAMPLES: &str = "\
Examples:
  popek run hello                     run a bundled guest (binary translator)
  popek run hello --engine interp     ... with the reference interpreter
  popek run exceptions --lockstep     bt and interp side by side, block by block
  popek run ./kernel.elf --memory 128M --append 'debug=1'
  popek run compute --max-insns 1000000
  popek run compute --stats --dump=blocks.txt
  popek run ./prog arg1 arg2          a static i386 Linux program (int 0x80 serviced by popek)
  popek run ./prog --strace           ... printing its system calls
  popek run ./prog --engine native    ... directly on the host CPU
  popek compare ./prog arg1           native vs bt: same output? how much slower?
  popek guests                        list the bundled guests
  popek classify                      the Popek-Goldberg classification table
  popek classify popf                 classify the code a guest runs from its entry

Exit status: the guest's isa-debug-exit status ((v << 1) | 1, as QEMU), or
0 when the guest halts for good, 2 on an error (bad image, unsupported
operation, triple fault), 3 when --lockstep finds a divergence, 4 when
--max-insns runs out.";

#[derive(Parser)]
#[command(name = "popek", version, about = "A binary-translating virtual machine monitor for 32-bit x86", after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum EngineArg {
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
    Run {
        /// Path to a Multiboot ELF or a static i386 Linux executable, or the
        /// name of a bundled guest.
        guest: String,
        /// Arguments for a Linux program (after the guest; use -- before options).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
        /// Execution engine.
        #[arg(long, value_enum, default_value = "bt")]
        engine: EngineArg,
        /// Run the translator and the interpreter side by side, block by
        /// block, and report the first divergence with both states (exit
        /// status 3).
        #[arg(long)]
        lockstep: bool,
        /// Guest RAM, e.g. 64M, 1G, 65536.
        #[arg(long, default_value = "64M", value_parser = parse_size)]
        memory: u64,
        /// Stop after this many guest instructions.
        #[arg(long)]
        max_insns: Option<u64>,
        /// Kernel command line (Multiboot; QEMU's -append).
        #[arg(long, default_value = "")]
        append: String,
        /// Bound the translation cache to N blocks (LRU eviction).
        #[arg(long, value_name = "N")]
        cache_blocks: Option<std::num::NonZeroUsize>,
        /// Write every translated block (guest code, how it was translated,
        /// host code) to FILE, or to stderr (needs --engine bt).
        #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
        dump: Option<String>,
        /// Print execution statistics to stderr when the guest ends.
        #[arg(long)]
        stats: bool,
        /// Print the statistics as one JSON object to stderr.
        #[arg(long)]
        stats_json: bool,
        /// Print every executed instruction and the registers before it to
        /// stderr, optionally only from the N-th instruction on.
        #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "0")]
        trace: Option<u64>,
        /// Print each system call of a Linux program and its result to
        /// stderr, as strace does.
        #[arg(long)]
        strace: bool,
    },
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

/// Read a guest image: a bundled guest by name, else a file. Returns the
/// bytes and the path QEMU would have been given.
fn load_image(guest: &str) -> Result<(Vec<u8>, String), String> {
    if let Some(g) = popek_guests::find(guest) {
        if !std::path::Path::new(guest).exists() {
            // A Linux program's argv[0] is the file the build left, so that
            // --engine native (which executes that file) sees the same one.
            let path = if g.linux { g.path } else { guest };
            return Ok((g.elf.to_vec(), path.to_string()));
        }
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

/// A Multiboot kernel (or not an ELF file at all: the Multiboot loader then
/// names the problem), else a Linux program.
fn is_multiboot(image: &[u8]) -> bool {
    popek_machine::multiboot::find_header(image).is_some() || !image.starts_with(b"\x7fELF")
}

fn bundled_names() -> String {
    popek_guests::GUESTS
        .iter()
        .map(|g| g.name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run {
            guest,
            args,
            engine,
            memory,
            max_insns,
            append,
            cache_blocks,
            dump,
            stats,
            stats_json,
            trace,
            lockstep,
            strace,
        } => {
            let (image, path) = match load_image(&guest) {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("popek: {e}");
                    return ExitCode::from(2);
                }
            };
            let config = Config {
                memory,
                max_insns,
                // QEMU passes "<kernel path> <append>" as the Multiboot command line.
                cmdline: format!("{path} {append}"),
                engine: match engine {
                    EngineArg::Interp => Engine::Interp,
                    EngineArg::Bt | EngineArg::Native => Engine::Bt,
                    EngineArg::Trap => Engine::Trap,
                },
                cache_blocks,
                trace,
            };
            let multiboot = is_multiboot(&image);
            let mut argv = vec![path];
            argv.extend(args);
            if matches!(engine, EngineArg::Native) {
                if multiboot {
                    eprintln!("popek: --engine native runs Linux programs only ({guest} is a Multiboot kernel)");
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
                if multiboot {
                    Machine::multiboot(&image, config)
                } else {
                    let start = popek_machine::linux::Start {
                        random_seed,
                        ..popek_machine::linux::Start::with_host_env(&argv, strace)
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
            if let Some(target) = dump {
                let Some(bt) = m.bt.as_mut() else {
                    eprintln!("popek: --dump shows translated code: use it with --engine bt");
                    return ExitCode::from(2);
                };
                let sink: Box<dyn Write> = if target == "-" {
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
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            let start = std::time::Instant::now();
            let exit = m.run(&mut out);
            let elapsed = start.elapsed();
            let _ = out.flush();
            if stats {
                print_stats(&m, elapsed);
            }
            if stats_json {
                eprintln!("{}", stats_json_line(&m, elapsed));
            }
            if let Some(msg) = exit.message() {
                eprintln!("popek: {msg}");
            }
            ExitCode::from(exit.status() as u8)
        }
        Cmd::Compare { prog, args, interp } => compare(&prog, args, interp),
        Cmd::Demo { name, guest } => match demo(&name, &guest) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("popek: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::Classify { guest: None } => {
            print_table();
            ExitCode::SUCCESS
        }
        Cmd::Classify { guest: Some(g) } => match classify_guest(&g) {
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

/// Run a Linux program directly on the host; its stdout goes to `out`.
/// Returns the exit status (128 + signal when killed) and the wall time.
fn native(argv: &[String], out: &mut dyn Write) -> Result<(i32, std::time::Duration), String> {
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

/// `a` as a percentage of `b` (0 when `b` is 0).
fn pct(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        100.0 * a as f64 / b as f64
    }
}

/// `popek compare`.
fn compare(prog: &str, args: Vec<String>, interp: bool) -> ExitCode {
    let (image, path) = match load_image(prog) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("popek: {e}");
            return ExitCode::from(2);
        }
    };
    let mut argv = vec![path];
    argv.extend(args);
    let mut native_out = Vec::new();
    let (native_status, native_time) = match native(&argv, &mut native_out) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("popek: {e}");
            return ExitCode::from(2);
        }
    };
    let mut engines = vec![Engine::Bt];
    if interp {
        engines.push(Engine::Interp);
    }
    let mut same = true;
    // A closed stdout (`| head`) must not panic: write errors are ignored.
    let stdout = std::io::stdout();
    let mut so = stdout.lock();
    let _ = writeln!(
        so,
        "{:<8} {:>10} {:>10} {:>8}  stdout",
        "engine", "wall (s)", "vs native", "status"
    );
    let _ = writeln!(
        so,
        "{:<8} {:>10.4} {:>10} {:>8}  {} bytes",
        "native",
        native_time.as_secs_f64(),
        "1.00x",
        native_status,
        native_out.len()
    );
    let mut details = Vec::new();
    for engine in engines {
        let config = Config {
            engine,
            ..Config::default()
        };
        let mut m = match Machine::linux_with(
            &image,
            popek_machine::linux::Start::with_host_env(&argv, false),
            config,
        ) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("popek: {prog}: {e}");
                return ExitCode::from(2);
            }
        };
        let mut out = Vec::new();
        let mut err = std::io::stderr();
        let start = std::time::Instant::now();
        let exit = m.run_with(&mut out, &mut err);
        let t = start.elapsed();
        let status = exit.status();
        let agree = out == native_out && status == native_status;
        same &= agree;
        let name = if engine == Engine::Bt { "bt" } else { "interp" };
        let _ = writeln!(
            so,
            "{:<8} {:>10.4} {:>9.2}x {:>8}  {} bytes, {}",
            name,
            t.as_secs_f64(),
            t.as_secs_f64() / native_time.as_secs_f64().max(1e-9),
            status,
            out.len(),
            if agree {
                "identical to native"
            } else {
                "DIFFERS from native"
            }
        );
        if let Some(msg) = exit.message() {
            details.push(format!("{name}: {msg}"));
        }
        if let Some(bt) = &m.bt {
            let s = bt.stats;
            details.push(format!(
                "bt: {} guest instructions, {} blocks translated, {:.2} us per translation, \
                 {:.1}% of the time translating, cache hit rate {:.2}% ({} lookups), \
                 {} chained transfers, {:.3}% of instructions interpreted",
                m.cpu.retired,
                s.blocks_translated,
                s.translate_ns as f64 / 1000.0 / s.blocks_translated.max(1) as f64,
                pct(s.translate_ns, t.as_nanos() as u64),
                pct(s.hits, s.lookups),
                s.lookups,
                s.chained,
                pct(s.insns_interpreted, m.cpu.retired),
            ));
        }
    }
    for d in details {
        let _ = writeln!(so, "{d}");
    }
    if same {
        ExitCode::SUCCESS
    } else {
        eprintln!("popek: compare: output or exit status differs from native execution");
        ExitCode::from(1)
    }
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
            ExitCode::from(3)
        }
    }
}

/// The statistics as one JSON object (hand-written: flat numbers only).
fn stats_json_line(m: &Machine, elapsed: std::time::Duration) -> String {
    let mut fields = vec![
        ("guest_instructions".to_string(), m.cpu.retired.to_string()),
        (
            "run_seconds".to_string(),
            format!("{:.6}", elapsed.as_secs_f64()),
        ),
    ];
    if let Some(bt) = &m.bt {
        let s = bt.stats;
        for (k, v) in [
            ("blocks_translated", s.blocks_translated),
            ("guest_instructions_translated", s.insns_translated),
            ("host_bytes", s.host_bytes),
            ("cache_lookups", s.lookups),
            ("cache_hits", s.hits),
            ("cache_evictions", s.evictions),
            ("cache_invalidations", s.invalidations),
            ("code_buffer_flushes", s.flushes),
            ("chained_transfers", s.chained),
            ("instructions_native", s.insns_native),
            ("interpreter_fallbacks", s.insns_interpreted),
            ("special_calls", s.special_calls),
            ("faults_in_translated_code", s.faults),
            ("translation_ns", s.translate_ns),
            ("indirect_lookups", s.indirect_lookups),
            ("indirect_hits", s.indirect_hits),
            ("shadow_pages_mapped", s.shadow_maps),
            ("mode_flushes", s.mode_flushes),
        ] {
            fields.push((k.to_string(), v.to_string()));
        }
        for (r, n) in ExitReason::ALL.iter().zip(s.exits) {
            fields.push((format!("exits_{}", r.name()), n.to_string()));
        }
        fields.push((
            "translation_share".to_string(),
            format!(
                "{:.6}",
                s.translate_ns as f64 / 1e9 / elapsed.as_secs_f64().max(1e-9)
            ),
        ));
        for (prefix, map) in [
            ("special", &bt.by_kind.specials),
            ("fallback", &bt.by_kind.fallbacks),
        ] {
            let mut v = popek_translate::engine::KindCounts::named(map);
            v.sort();
            for (k, n) in v {
                fields.push((format!("{prefix}_{k}"), n.to_string()));
            }
        }
    }
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("\"{k}\": {v}"))
        .collect();
    format!("{{{}}}", body.join(", "))
}

fn print_stats(m: &Machine, elapsed: std::time::Duration) {
    let retired = m.cpu.retired;
    eprintln!("popek stats:");
    eprintln!("  guest instructions executed   {retired}");
    eprintln!(
        "  run time                      {:.3} s",
        elapsed.as_secs_f64()
    );
    if let Some(bt) = &m.bt {
        let s = bt.stats;
        eprintln!("  blocks translated             {}", s.blocks_translated);
        eprintln!("  guest instructions translated {}", s.insns_translated);
        eprintln!("  host bytes emitted            {}", s.host_bytes);
        eprintln!(
            "  cache lookups / hits          {} / {} ({:.1}%)",
            s.lookups,
            s.hits,
            pct(s.hits, s.lookups)
        );
        eprintln!("  chained block transfers       {}", s.chained);
        eprintln!(
            "  indirect lookups / hits       {} / {} ({:.1}%)",
            s.indirect_lookups,
            s.indirect_hits,
            pct(s.indirect_hits, s.indirect_lookups)
        );
        let exits: Vec<String> = ExitReason::ALL
            .iter()
            .zip(s.exits)
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| format!("{} {n}", r.name()))
            .collect();
        eprintln!("  dispatcher exits by reason    {}", exits.join(", "));
        eprintln!("  special-instruction calls     {}", s.special_calls);
        eprintln!(
            "  executed as host code         {} ({:.1}%)",
            s.insns_native,
            pct(s.insns_native, retired)
        );
        eprintln!(
            "  interpreter fallbacks         {} ({:.1}%)",
            s.insns_interpreted,
            pct(s.insns_interpreted, retired)
        );
        let us = s.translate_ns as f64 / 1000.0;
        eprintln!(
            "  translation time              {us:.0} us total, {:.2} us per block, {:.2}% of run time",
            us / s.blocks_translated.max(1) as f64,
            100.0 * us / 1e6 / elapsed.as_secs_f64().max(1e-9)
        );
        eprintln!("  faults in translated code     {}", s.faults);
        eprintln!("  invalidations (code written)  {}", s.invalidations);
        eprintln!(
            "  evictions / buffer flushes    {} / {}",
            s.evictions, s.flushes
        );
        eprintln!(
            "  shadow pages / mode flushes   {} / {}",
            s.shadow_maps, s.mode_flushes
        );
        let top = |m| {
            let v = popek_translate::engine::KindCounts::named(m);
            let v: Vec<String> = v.iter().take(8).map(|(k, n)| format!("{k} {n}")).collect();
            v.join(", ")
        };
        eprintln!(
            "  special calls by kind         {}",
            top(&bt.by_kind.specials)
        );
        eprintln!(
            "  fallbacks by opcode           {}",
            top(&bt.by_kind.fallbacks)
        );
    }
    if let Some(t) = &m.trap {
        print_trap_stats(&t.stats, &mut std::io::stderr());
    }
}

fn print_trap_stats(t: &popek_machine::trap::TrapStats, w: &mut dyn Write) {
    let traps: u64 = t.traps.values().map(|c| c.count).sum();
    let emulation: std::time::Duration = t.traps.values().map(|c| c.emulation).sum();
    let _ = writeln!(
        w,
        "  traps (#GP, emulated)         {traps}, {:.2} us of emulation each",
        emulation.as_secs_f64() * 1e6 / traps.max(1) as f64
    );
    for (k, c) in &t.traps {
        let _ = writeln!(
            w,
            "    {:<14} {:>9} traps, {:>7.2} us each, first at eip={:#010x}",
            format!("{k:?}"),
            c.count,
            c.emulation.as_secs_f64() * 1e6 / c.count.max(1) as f64,
            c.first_eip
        );
    }
    let silent: u64 = t.violations.values().map(|v| v.count).sum();
    let _ = writeln!(
        w,
        "  Popek-Goldberg violations     {silent} (sensitive, executed without a trap)"
    );
    for (k, v) in &t.violations {
        let _ = writeln!(
            w,
            "    {:<14} {:>9} times,  first at eip={:#010x}: {}",
            format!("{k:?}"),
            v.count,
            v.first_eip,
            popek_machine::trap::under_trap(*k)
        );
    }
}

/// `popek demo popek-goldberg`: the guest under each engine, side by side.
fn demo(name: &str, guest: &str) -> Result<(), String> {
    if name != "popek-goldberg" {
        return Err(format!("unknown demo {name:?} (demos: popek-goldberg)"));
    }
    let (image, path) = load_image(guest)?;
    if !is_multiboot(&image) {
        return Err(format!("{guest}: the demo runs Multiboot kernels"));
    }
    let mut outputs = Vec::new();
    let mut trap_stats = None;
    for engine in [Engine::Interp, Engine::Bt, Engine::Trap] {
        let config = Config {
            cmdline: format!("{path} "),
            engine,
            ..Config::default()
        };
        let mut m = Machine::multiboot(&image, config).map_err(|e| format!("{guest}: {e}"))?;
        let mut out = Vec::new();
        let exit = m.run(&mut out);
        if let Some(msg) = exit.message() {
            out.extend_from_slice(format!("[popek: {msg}]\n").as_bytes());
        }
        if let Some(t) = m.trap.take() {
            trap_stats = Some(t.stats);
        }
        outputs.push(String::from_utf8_lossy(&out).into_owned());
    }
    let lines: Vec<Vec<&str>> = outputs.iter().map(|o| o.lines().collect()).collect();
    let rows = lines.iter().map(Vec::len).max().unwrap_or(0);
    let width = lines[0].iter().map(|l| l.len()).max().unwrap_or(0).max(10);
    println!("{guest} under each engine (\"!\" marks lines where trap-and-emulate differs):\n");
    println!(
        "  {:<width$}  {:<9} trap (kernel deprivileged to CPL 3)",
        "interp", "bt"
    );
    let mut differ = 0;
    for r in 0..rows {
        let cell = |e: usize| lines[e].get(r).copied().unwrap_or("");
        let (a, b, t) = (cell(0), cell(1), cell(2));
        let same_bt = if a == b { "same" } else { b };
        let mark = if a != t { "!" } else { " " };
        differ += usize::from(a != t);
        let t = if a == t { "same" } else { t };
        println!("{mark} {a:<width$}  {same_bt:<9} {t}");
    }
    println!(
        "\n{differ} of {rows} lines differ under trap. What the monitor saw (traps) and what it did not (violations):"
    );
    if let Some(t) = trap_stats {
        print_trap_stats(&t, &mut std::io::stdout());
    }
    Ok(())
}

fn print_table() {
    println!(
        "{:<15} {:<11} {:<10} {:<6} what it does",
        "instruction", "class", "at ring 3", "ends"
    );
    println!("{}", "-".repeat(100));
    for r in SPECIALS {
        let ring3 = match r.at_ring3 {
            AtRing3::Traps => "traps",
            AtRing3::Silent => "SILENT",
            AtRing3::Sometimes => "sometimes",
        };
        println!(
            "{:<15} {:<11} {:<10} {:<6} {}",
            format!("{:?}", r.kind),
            r.class.name(),
            ring3,
            if r.ends_block { "block" } else { "" },
            r.what
        );
        println!(
            "{:<44}{} under --engine trap: {}",
            "",
            if r.at_ring3 == AtRing3::Silent {
                "VIOLATES Popek-Goldberg;"
            } else {
                "holds;"
            },
            popek_machine::trap::under_trap(r.kind)
        );
    }
    let silent = SPECIALS
        .iter()
        .filter(|r| r.at_ring3 == AtRing3::Silent)
        .count();
    println!(
        "\n{silent} sensitive instructions run at ring 3 without trapping (SILENT): x86 fails the \
         Popek-Goldberg condition that every sensitive instruction be privileged."
    );
    println!("Everything else: innocuous, or control flow (near JMP/Jcc/CALL/RET/LOOP), which ends a block.");
}

/// Print every block reachable from the guest's entry, classified.
fn classify_guest(guest: &str) -> Result<(), String> {
    let (image, path) = load_image(guest)?;
    let mut m = if is_multiboot(&image) {
        Machine::multiboot(
            &image,
            Config {
                cmdline: path,
                ..Config::default()
            },
        )
    } else {
        let start = popek_machine::linux::Start::with_host_env(&[path], false);
        Machine::linux_with(&image, start, Config::default())
    }
    .map_err(|e| format!("{guest}: {e}"))?;
    let entry = m.cpu.eip;
    let cpu = &mut m.cpu;
    let blocks = reachable_blocks(|eip, buf| cpu.fetch(eip, buf).0, entry, 32, 4096);
    let mut counts = std::collections::BTreeMap::<Class, usize>::new();
    for block in &blocks {
        println!(
            "block {:#010x} ({} instructions, ends: {:?})",
            block.start,
            block.insns.len(),
            block.end
        );
        for i in &block.insns {
            *counts.entry(i.class).or_default() += 1;
            let bytes: String = i.bytes.iter().map(|b| format!("{b:02x}")).collect();
            let kind = i
                .special
                .map(|s| {
                    if s.info().at_ring3 == AtRing3::Silent {
                        format!(
                            " [{s:?}, violates Popek-Goldberg: under trap {}]",
                            popek_machine::trap::under_trap(s)
                        )
                    } else {
                        format!(" [{s:?}]")
                    }
                })
                .unwrap_or_default();
            println!(
                "  {:08x}  {:<24} {:<36} {}{}",
                i.ins.ip32(),
                bytes,
                i.ins.to_string(),
                i.class.name(),
                kind
            );
        }
    }
    println!("\nsummary:");
    for (c, n) in counts {
        println!("  {:<13} {n}", c.name());
    }
    Ok(())
}
