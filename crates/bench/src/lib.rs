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

/// Every basic block reachable from the guest's entry by direct branches.
pub fn blocks_of(m: &mut Machine) -> Vec<Block> {
    let entry = m.cpu.eip;
    let cpu = &mut m.cpu;
    reachable_blocks(|eip, buf| cpu.fetch(eip, buf).0, entry, 32, 100_000)
}
