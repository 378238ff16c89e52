//! `popek-difftest`: run random instruction sequences natively and under
//! popek and report every divergence, shrunk, as a ready-to-paste corpus
//! entry.
//!
//! `cargo run --release -p popek-difftest -- --cases 1000000 --seed 1 --engine both`

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use clap::{Parser, ValueEnum};
use popek_difftest::{check, gen, report, shrink, Engine};

#[derive(Clone, Copy, ValueEnum)]
enum EngineArg {
    Interp,
    Bt,
    /// Both engines, each against the native run.
    Both,
}

#[derive(Parser)]
#[command(about = "Differential testing of popek against the host CPU")]
struct Args {
    /// Number of random sequences.
    #[arg(long, default_value_t = 10_000)]
    cases: u64,
    /// Seed of the first case (case i uses seed + i).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Instructions per sequence (about).
    #[arg(long, default_value_t = 20)]
    len: usize,
    /// Engine under test.
    #[arg(long, value_enum, default_value = "both")]
    engine: EngineArg,
    /// Worker threads (default: available parallelism).
    #[arg(long)]
    jobs: Option<usize>,
    /// Stop after this many divergences.
    #[arg(long, default_value_t = 10)]
    max_failures: u64,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let engine = match a.engine {
        EngineArg::Interp => Engine::Interp,
        EngineArg::Bt => Engine::Bt,
        EngineArg::Both => Engine::Both,
    };
    let dir = std::env::temp_dir().join(format!("popek-difftest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let jobs = a
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let next = AtomicU64::new(0);
    let failures = AtomicU64::new(0);
    let reports = Mutex::new(Vec::new());
    let start = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= a.cases || failures.load(Ordering::Relaxed) >= a.max_failures {
                    break;
                }
                let case = gen::generate(a.seed + i, a.len);
                match check(&case, &dir, engine) {
                    Ok(None) => {}
                    Ok(Some(why)) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        let small = shrink(&case, &dir, engine);
                        let why = check(&small, &dir, engine).ok().flatten().unwrap_or(why);
                        let r = format!("# seed {}\n{}", a.seed + i, report(&small, &why));
                        eprintln!("{r}");
                        reports.lock().unwrap().push(r);
                    }
                    Err(e) => {
                        eprintln!("popek-difftest: {e}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if (i + 1) % 100_000 == 0 {
                    eprintln!("{} cases, {:.0?}", i + 1, start.elapsed());
                }
            });
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
    let n = failures.load(Ordering::Relaxed);
    let ran = next.load(Ordering::Relaxed).min(a.cases);
    println!(
        "{ran} cases from seed {} in {:.1?}: {} passed, {n} failed",
        a.seed,
        start.elapsed(),
        ran - n.min(ran)
    );
    if n == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
