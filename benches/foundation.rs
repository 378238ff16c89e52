//! Foundation benchmarks: the cost of scanning and classifying basic blocks
//! (what the translator pays before emitting code) and the reference
//! interpreter's and the translator's speed on the compute guest, and
//! Linux programs natively and under bt side by side (`linux`, `native`).
//! Run with `cargo bench -p popek-bench`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use popek_bench::{blocks_of, boot, boot_with};
use popek_machine::{Engine, Exit};
use popek_translate::Bt;

fn scan(c: &mut Criterion) {
    let mut g = c.benchmark_group("scan");
    for name in ["compute", "selfcheck", "exceptions"] {
        let mut m = boot(name);
        let n = blocks_of(&mut m).len() as u64;
        g.throughput(Throughput::Elements(n));
        g.bench_function(format!("{name} ({n} blocks)"), |b| {
            b.iter(|| blocks_of(&mut m).len());
        });
    }
    g.finish();
}

/// Translate every block reachable from the guest's entry, from each
/// basic block's start: as basic blocks (`superblocks` off) and as the
/// superblocks the engine builds by default (each goes on past
/// conditional branches, so it covers several basic blocks). Prints the
/// guest instructions per translation beside the timing.
fn translate(c: &mut Criterion) {
    let mut g = c.benchmark_group("translate");
    for name in ["compute", "selfcheck", "exceptions"] {
        let mut m = boot(name);
        let blocks: Vec<u32> = blocks_of(&mut m).iter().map(|b| b.start).collect();
        g.throughput(Throughput::Elements(blocks.len() as u64));
        for superblocks in [false, true] {
            let mut bt = Bt::new(None);
            bt.superblocks = superblocks;
            for &eip in &blocks {
                bt.translate_at(&mut m.cpu, eip);
            }
            let kind = if superblocks {
                "superblocks"
            } else {
                "basic blocks"
            };
            eprintln!(
                "translate/{name} ({kind}): {} guest instructions, {} basic blocks in {} translations",
                bt.stats.insns_translated,
                bt.stats.basic_blocks_translated,
                blocks.len()
            );
            g.bench_function(format!("{name} ({} {kind})", blocks.len()), |b| {
                b.iter(|| {
                    bt.flush();
                    for &eip in &blocks {
                        bt.translate_at(&mut m.cpu, eip);
                    }
                    bt.stats.blocks_translated
                });
            });
        }
    }
    g.finish();
}

fn engines(c: &mut Criterion) {
    let mut g = c.benchmark_group("engines");
    g.sample_size(10);
    // Every bare-metal benchmark guest under each engine (trap is the
    // interpreter with a monitor's bookkeeping around special instructions);
    // paging is the page-table-heavy one (fork, copy-on-write, CR3
    // switches, page-table churn: Adams and Agesen's forkwait and PTE
    // updates in one guest), compared with qemu-system-i386 in
    // docs/performance.md; ptchurn is page-table microbenchmarks (entries
    // rewritten and touched, 64 spaces, a clock, kmap windows, ...);
    // codedata keeps its data among its code, codedata-split is the same
    // program with the data on pages of its own, codedata-paged the first
    // with paging on.
    for guest in [
        "compute",
        "selfcheck",
        "paging",
        "ptchurn",
        "codedata",
        "codedata-split",
        "codedata-paged",
    ] {
        for engine in [Engine::Interp, Engine::Bt, Engine::Trap] {
            // Count the guest's instructions once so throughput is per instruction.
            let mut m = boot_with(guest, engine);
            let exit = m.run(&mut std::io::sink());
            assert_eq!(exit, Exit::DebugExit(1));
            g.throughput(Throughput::Elements(m.cpu.retired));
            g.bench_function(format!("{guest}/{engine:?}"), |b| {
                b.iter(|| {
                    let mut m = boot_with(guest, engine);
                    m.run(&mut std::io::sink())
                });
            });
        }
    }
    g.finish();
}

/// A Linux program run directly on the host, under bt and under the
/// interpreter: the bundled user-compute guest, 5 rounds of its kernels
/// (1 round for the interpreter).
fn linux(c: &mut Criterion) {
    let guest = popek_guests::find("user-compute").expect("bundled user-compute");
    let args = [guest.path.to_string(), "5".to_string()];
    let run_natively = || {
        std::process::Command::new(guest.path)
            .arg("5")
            .output()
            .expect("run natively")
    };
    let native = run_natively();
    let mut g = c.benchmark_group("linux");
    g.sample_size(10);
    g.bench_function("user-compute/native", |b| b.iter(|| run_natively().status));
    for counted in [false, true] {
        // As `popek run` (translated code counts nothing), and as `popek
        // run --stats` (every instruction counted, a budget per transfer).
        let name = if counted { "bt counted" } else { "bt" };
        g.bench_function(format!("user-compute/{name}"), |b| {
            b.iter(|| {
                let config = popek_machine::Config {
                    engine: Engine::Bt,
                    count_insns: counted,
                    ..popek_machine::Config::default()
                };
                let mut m = popek_machine::Machine::linux(guest.elf, &args, config).expect("load");
                let mut out = Vec::new();
                let exit = m.run(&mut out);
                assert_eq!(out, native.stdout, "bt and native disagree");
                exit
            })
        });
    }
    let one = [guest.path.to_string(), "1".to_string()];
    g.bench_function("user-compute (1 round)/interp", |b| {
        b.iter(|| {
            let config = popek_machine::Config {
                engine: Engine::Interp,
                ..popek_machine::Config::default()
            };
            let mut m = popek_machine::Machine::linux(guest.elf, &one, config).expect("load");
            m.run(&mut std::io::sink())
        })
    });
    g.finish();
}

/// The compute guest under bt with translation-cache capacities from tiny
/// to unbounded: the time of a whole run, and beside it (printed once per
/// capacity) the dispatcher's lookups, hits, misses and evictions.
/// benches/perf_report.py tabulates and plots the same counters for every
/// workload (docs/cache-hit-rate.csv).
fn cache(c: &mut Criterion) {
    let mut g = c.benchmark_group("cache");
    g.sample_size(10);
    let boot_capped = |cap: Option<usize>| {
        let guest = popek_guests::find("compute").expect("bundled compute");
        let config = popek_machine::Config {
            engine: Engine::Bt,
            cache_blocks: cap.and_then(std::num::NonZeroUsize::new),
            ..popek_machine::Config::default()
        };
        popek_machine::Machine::multiboot(guest.elf, config).expect("boot")
    };
    for cap in [Some(8), Some(32), Some(128), None] {
        let name = cap.map_or("unbounded".to_string(), |c| c.to_string());
        let mut m = boot_capped(cap);
        assert_eq!(m.run(&mut std::io::sink()), Exit::DebugExit(1));
        let s = m.engine.bt().expect("bt").stats;
        println!(
            "cache/compute/{name}: lookups {} hits {} misses {} evictions {} hit rate {:.1}%",
            s.lookups,
            s.hits,
            s.lookups - s.hits,
            s.evictions,
            100.0 * s.hits as f64 / s.lookups.max(1) as f64
        );
        g.bench_function(format!("compute/{name}"), |b| {
            b.iter(|| boot_capped(cap).run(&mut std::io::sink()))
        });
    }
    g.finish();
}

/// Closer to native (issue 20): benches/programs/kernels.c built with the
/// host's `gcc -m32 -static -O2`, the kernels where block transfers,
/// indirect branches and calls and returns weigh most (the switch-based
/// bytecode interpreter, glibc's qsort with its comparator calls, deep
/// recursion), each run natively, under bt as `popek run` runs it, and
/// under bt counting every instruction (as `--stats`), side by side. Skipped
/// with a note if the host cannot build 32-bit programs.
fn native(c: &mut Criterion) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let prog = dir.join("kernels");
    let src = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../benches/programs/kernels.c"
    );
    let built = std::process::Command::new("gcc")
        .args(["-m32", "-static", "-O2", "-o"])
        .arg(&prog)
        .arg(src)
        .status()
        .is_ok_and(|s| s.success());
    if !built {
        eprintln!("native: gcc -m32 -static cannot build {src}; skipped");
        return;
    }
    let elf = std::fs::read(&prog).expect("read the built kernels");
    let mut g = c.benchmark_group("native");
    g.sample_size(10);
    for (kernel, reps) in [("bytecode", "1"), ("sort", "2"), ("recursion", "2")] {
        let args = [prog.display().to_string(), reps.into(), kernel.into()];
        let run_natively = || {
            std::process::Command::new(&prog)
                .args(&args[1..])
                .output()
                .expect("run natively")
        };
        let native = run_natively();
        g.bench_function(format!("{kernel}/native"), |b| {
            b.iter(|| run_natively().status)
        });
        for counted in [false, true] {
            let name = if counted { "bt counted" } else { "bt" };
            g.bench_function(format!("{kernel}/{name}"), |b| {
                b.iter(|| {
                    let config = popek_machine::Config {
                        engine: Engine::Bt,
                        count_insns: counted,
                        ..popek_machine::Config::default()
                    };
                    let mut m = popek_machine::Machine::linux(&elf, &args, config).expect("load");
                    let mut out = Vec::new();
                    let exit = m.run(&mut out);
                    assert_eq!(out, native.stdout, "bt and native disagree");
                    exit
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, scan, translate, engines, linux, native, cache);
criterion_main!(benches);
