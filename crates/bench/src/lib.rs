//! Helpers shared by the criterion benchmarks in benches/.

#![forbid(unsafe_code)]

use popek_decode::{reachable_blocks, Block};
use popek_machine::{Config, Engine, Machine};

/// Boot a bundled guest (not run yet) for the interpreter.
pub fn boot(name: &str) -> Machine {
    boot_with(name, Engine::Interp)
}

/// Boot a bundled guest (not run yet) for `engine`.
pub fn boot_with(name: &str, engine: Engine) -> Machine {
    let g = popek_guests::find(name).unwrap_or_else(|| panic!("no bundled guest {name}"));
    let config = Config {
        cmdline: name.into(),
        engine,
        ..Config::default()
    };
    Machine::multiboot(g.elf, config).expect("boot")
}

/// Resume a machine from a snapshot file (not run yet), for the
/// interpreter.
pub fn resume(path: &str) -> Machine {
    let config = Config {
        engine: Engine::Interp,
        ..Config::default()
    };
    Machine::resume(std::path::Path::new(path), config)
        .unwrap_or_else(|e| panic!("resume {path}: {e}"))
}

/// The start of every block in a `popek run --dump` file, in the order
/// written, each once.
pub fn dumped_blocks(path: &str) -> Vec<u32> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut seen = std::collections::HashSet::new();
    text.lines()
        .filter_map(|l| l.strip_prefix("== block 0x"))
        .filter_map(|l| u32::from_str_radix(l.split(':').next()?, 16).ok())
        .filter(|&eip| seen.insert(eip))
        .collect()
}

/// Every basic block reachable from the guest's entry by direct branches.
pub fn blocks_of(m: &mut Machine) -> Vec<Block> {
    let entry = m.cpu.eip;
    let cpu = &mut m.cpu;
    reachable_blocks(|eip, buf| cpu.fetch(eip, buf).0, entry, 32, 100_000)
}

/// Each bundled Multiboot guest booted (not run yet), with the starts of
/// the first `limit` blocks reachable from its entry: what the tests that
/// translate every guest's blocks two ways go over.
pub fn bundled_block_starts(
    limit: usize,
) -> impl Iterator<Item = (&'static str, Machine, Vec<u32>)> {
    popek_guests::GUESTS
        .iter()
        .filter(|g| !g.linux)
        .map(move |g| {
            let mut m = boot(g.name);
            let starts = blocks_of(&mut m)
                .iter()
                .take(limit)
                .map(|b| b.start)
                .collect();
            (g.name, m, starts)
        })
}
