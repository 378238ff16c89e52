//! Foundation benchmarks: the cost of scanning and classifying basic blocks
//! (what the translator pays before emitting code) and the reference
//! interpreter's speed on the compute guest (the baseline the translator
//! must beat). Run with `cargo bench -p popek-bench`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use popek_bench::{blocks_of, boot};
use popek_machine::Exit;

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

fn interp(c: &mut Criterion) {
    let mut g = c.benchmark_group("interp");
    g.sample_size(10);
    // Count the guest's instructions once so throughput is per instruction.
    let mut m = boot("compute");
    let exit = m.run(&mut std::io::sink());
    assert_eq!(exit, Exit::DebugExit(1));
    g.throughput(Throughput::Elements(m.cpu.retired));
    g.bench_function(format!("compute ({} instructions)", m.cpu.retired), |b| {
        b.iter(|| {
            let mut m = boot("compute");
            m.run(&mut std::io::sink())
        });
    });
    g.finish();
}

criterion_group!(benches, scan, interp);
criterion_main!(benches);
