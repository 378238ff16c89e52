//! `popek compare`: a Linux program natively and under popek's engines.

use std::io::Write;
use std::process::ExitCode;

use popek_machine::{Config, Engine, Machine};

use crate::run::{load_image, native};
use crate::stats::pct;

/// `popek compare`.
pub(crate) fn compare(prog: &str, args: Vec<String>, interp: bool) -> ExitCode {
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
        if let Some(bt) = m.engine.bt() {
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
