//! Translate a bundled guest's blocks over and over, for a profiler:
//! every basic block reachable from the guest's entry, translated into an
//! emptied cache (as superblocks, the engine's default, or as basic
//! blocks), for a number of seconds; prints the time per translation.
//! The criterion group `translate` measures the same thing with
//! statistics; this loop is what `perf record` should watch, without the
//! benchmark harness around it:
//!
//! ```text
//! cargo build --release -p popek-bench --example translate_loop
//! perf record -F 10000 ./target/release/examples/translate_loop selfcheck 5
//! ```
//!
//! Arguments: guest (default `selfcheck`), seconds (default 5) or a
//! number of passes over the blocks (`200x`: the same work every run, for
//! an instruction count such as `valgrind --tool=cachegrind`'s), then
//! `bb` to translate basic blocks only and `cold` to write over 8 MiB of
//! memory between translations (as a guest running between them does:
//! the translator's code and data leave the first- and second-level
//! caches; `cold=KIB` over that many KiB), timing the translations only
//! (`--stats`' figure in a run), `polled` for the exits a run without
//! instruction counting builds (`Pacing::Polled`, as in the Linux boot;
//! the engine's default, counted exits, otherwise), and `every=N` for
//! every Nth of a snapshot's blocks only (a shorter run, for cachegrind's
//! cache simulation with `cold`), and `btb=N` to run N taken branches,
//! each at its own address, between translations (a guest running
//! between them leaves the host's branch predictors knowing none of the
//! translator's branches; N = 16384 covers the branch target buffers of
//! current x86 cores in 32 KiB of code, so the caches keep almost all of
//! the translator's code and data), timing the translations only;
//! `cold=0` times the translations only with nothing in between.
//!
//! The guest may instead be a snapshot (`PATH.snap`, from `popek run
//! ... --suspend-at-insns N --snapshot PATH.snap --dump PATH.dump`): the
//! blocks are then those the run had translated, read from the dump
//! written beside it, translated in the machine's state at the snapshot
//! (those its current mapping still covers). The Linux kernel's blocks
//! this way are what the boot's translations cost without the guest
//! running in between (docs/testing.md says how to make one).

use popek_bench::{blocks_of, boot, dumped_blocks, resume};
use popek_translate::Bt;

fn main() {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "selfcheck".into());
    let how_long = args.next().unwrap_or_else(|| "5".into());
    let passes: Option<u64> = how_long.strip_suffix('x').and_then(|n| n.parse().ok());
    let secs: f64 = how_long.parse().unwrap_or(5.0);
    let rest: Vec<String> = args.collect();
    let superblocks = !rest.iter().any(|s| s == "bb");
    let arg = |name: &str| {
        rest.iter().find_map(|s| {
            s.strip_prefix(name)?
                .strip_prefix('=')?
                .parse::<usize>()
                .ok()
        })
    };
    let cold = rest.iter().any(|s| s == "cold" || s.starts_with("cold="));
    let cold_kib = arg("cold").unwrap_or(8 << 10);
    let every = arg("every").unwrap_or(1).max(1);
    let polled = rest.iter().any(|s| s == "polled");
    let mut other = if cold {
        vec![1u8; cold_kib << 10]
    } else {
        Vec::new()
    };
    let branches = arg("btb").map(taken_branches);
    let mut bt = Bt::new(None);
    bt.superblocks = superblocks;
    if polled {
        bt.set_pacing(popek_translate::Pacing::Polled);
    }
    let (mut m, blocks) = match name.strip_suffix(".snap") {
        Some(stem) => {
            let mut m = resume(&name);
            let dumped = dumped_blocks(&format!("{stem}.dump"));
            // Those the snapshot's mapping covers, each once.
            let blocks: Vec<u32> = dumped
                .into_iter()
                .step_by(every)
                .filter(|&eip| {
                    bt.flush();
                    bt.translate_at(&mut m.cpu, eip)
                })
                .collect();
            bt.stats = Default::default();
            (m, blocks)
        }
        None => {
            let mut m = boot(&name);
            let blocks = blocks_of(&mut m).iter().map(|b| b.start).collect();
            (m, blocks)
        }
    };
    let start = std::time::Instant::now();
    let mut n = 0u64;
    while match passes {
        Some(p) => n < p * blocks.len() as u64,
        None => start.elapsed().as_secs_f64() < secs,
    } {
        bt.flush();
        for &eip in &blocks {
            bt.translate_at(&mut m.cpu, eip);
            if let Some((_, run)) = &branches {
                run();
            }
            if cold {
                for line in other.chunks_mut(64) {
                    line[0] = line[0].wrapping_add(1);
                }
                std::hint::black_box(&mut other);
            }
        }
        n += blocks.len() as u64;
    }
    let us = if cold || branches.is_some() {
        bt.stats.translate_ns as f64 / 1e3 / bt.stats.blocks_translated.max(1) as f64
    } else {
        start.elapsed().as_secs_f64() * 1e6 / n.max(1) as f64
    };
    let insns = bt.stats.insns_translated as f64 / bt.stats.blocks_translated.max(1) as f64;
    let basic = bt.stats.basic_blocks_translated as f64 / bt.stats.blocks_translated.max(1) as f64;
    println!(
        "{name} ({}): {us:.3} us per translation, {insns:.1} guest instructions and {basic:.2} basic blocks each, {n} translations",
        if superblocks {
            "superblocks"
        } else {
            "basic blocks"
        }
    );
}

/// `n` taken branches, each at its own address (`jmp` to the next
/// instruction, two bytes each) and a `ret`, in executable memory: the
/// mapping (kept for as long as the function is called) and the function.
fn taken_branches(n: usize) -> (memmap2::Mmap, extern "C" fn()) {
    let mut code = memmap2::MmapMut::map_anon(2 * n + 1).expect("an anonymous mapping");
    for pair in code[..2 * n].chunks_mut(2) {
        pair.copy_from_slice(&[0xEB, 0x00]);
    }
    code[2 * n] = 0xC3;
    let code = code.make_exec().expect("an executable mapping");
    // SAFETY: the mapping holds `n` `jmp rel8 0` and a `ret`: code that
    // touches no memory and returns, callable with the C ABI; it stays
    // mapped as long as the returned Mmap lives, which the caller keeps
    // beside the function.
    let run = unsafe { std::mem::transmute::<*const u8, extern "C" fn()>(code.as_ptr()) };
    (code, run)
}
