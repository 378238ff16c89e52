//! Foundation benchmarks: the cost of scanning and classifying basic blocks
//! (what the translator pays before emitting code) and the reference
//! interpreter's and the translator's speed on the compute guest, and a
//! Linux program natively and under bt. Run with `cargo bench -p popek-bench`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use popek_bench::{blocks_of, boot, boot_with};
use popek_machine::{Engine, Exit};
use popek_translate::engine::Bt;

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

fn translate(c: &mut Criterion) {
    let mut g = c.benchmark_group("translate");
    for name in ["compute", "selfcheck", "exceptions"] {
        let mut m = boot(name);
        let blocks: Vec<u32> = blocks_of(&mut m).iter().map(|b| b.start).collect();
        g.throughput(Throughput::Elements(blocks.len() as u64));
        let mut bt = Bt::new(None);
        g.bench_function(format!("{name} ({} blocks)", blocks.len()), |b| {
            b.iter(|| {
                bt.flush();
                for &eip in &blocks {
                    bt.translate_at(&mut m.cpu, eip);
                }
                bt.stats.blocks_translated
            });
        });
    }
    g.finish();
}

fn engines(c: &mut Criterion) {
    let mut g = c.benchmark_group("engines");
    g.sample_size(10);
    for engine in [Engine::Interp, Engine::Bt] {
        // Count the guest's instructions once so throughput is per instruction.
        let mut m = boot_with("compute", engine);
        let exit = m.run(&mut std::io::sink());
        assert_eq!(exit, Exit::DebugExit(1));
        g.throughput(Throughput::Elements(m.cpu.retired));
        g.bench_function(format!("compute/{engine:?}"), |b| {
            b.iter(|| {
                let mut m = boot_with("compute", engine);
                m.run(&mut std::io::sink())
            });
        });
    }
    g.finish();
}

/// A Linux program run directly on the host and under bt: the bundled
/// user-compute guest, 5 rounds of its kernels.
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
    g.bench_function("user-compute/bt", |b| {
        b.iter(|| {
            let config = popek_machine::Config {
                engine: Engine::Bt,
                ..popek_machine::Config::default()
            };
            let mut m = popek_machine::Machine::linux(guest.elf, &args, config).expect("load");
            let mut out = Vec::new();
            let exit = m.run(&mut out);
            assert_eq!(out, native.stdout, "bt and native disagree");
            exit
        })
    });
    g.finish();
}

criterion_group!(benches, scan, translate, engines, linux);
criterion_main!(benches);
