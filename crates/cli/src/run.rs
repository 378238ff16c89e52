//! `popek run`: boot a guest with the chosen engine (or run a Linux
//! program natively), and `--lockstep`.

use std::io::Write;
use std::process::ExitCode;

use popek_machine::{Config, Engine, Machine};

use crate::stats::{print_stats, stats_json_line};
use crate::{EngineArg, RunArgs};

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
        icount,
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
        // Exact counts when they are reported or compared; otherwise
        // translated code counts nothing (see Config::count_insns).
        count_insns: stats || stats_json || lockstep,
    };
    let multiboot = is_multiboot(&image);
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
        let Some(bt) = m.engine.bt_mut() else {
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
    // A kernel's COM1 reads popek's stdin (raw while a terminal), as with
    // QEMU's -serial stdio; Ctrl-A X quits.
    let _raw = multiboot.then(|| {
        m.serial_input = Some(popek_machine::console::stdin_reader());
        popek_machine::console::RawTerminal::new()
    });
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

/// Read a guest image: a bundled guest by name, else a file. Returns the
/// bytes and the path QEMU would have been given.
pub(crate) fn load_image(guest: &str) -> Result<(Vec<u8>, String), String> {
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
