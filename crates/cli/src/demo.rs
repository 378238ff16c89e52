//! `popek demo popek-goldberg`.

use popek_machine::{Config, Engine, EngineState, Machine};

use crate::run::{is_multiboot, load_image};
use crate::stats::print_trap_stats;

/// `popek demo popek-goldberg`: the guest under each engine, side by side.
pub(crate) fn demo(name: &str, guest: &str) -> Result<(), String> {
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
        if let EngineState::Trap(t) = m.engine {
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
