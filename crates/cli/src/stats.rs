//! `--stats` and `--stats-json`: both made from the translator's one list
//! of counters ([`popek_translate::Stats::counters`]).

use std::io::Write;

use popek_machine::Machine;

/// `a` as a percentage of `b` (0 when `b` is 0).
pub(crate) fn pct(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        100.0 * a as f64 / b as f64
    }
}

/// The statistics as one JSON object (hand-written: flat numbers only).
pub(crate) fn stats_json_line(m: &Machine, elapsed: std::time::Duration) -> String {
    let mut fields = vec![
        ("guest_instructions".to_string(), m.cpu.retired.to_string()),
        (
            "run_seconds".to_string(),
            format!("{:.6}", elapsed.as_secs_f64()),
        ),
    ];
    for (k, v) in board_counters(m) {
        fields.push((k, v.to_string()));
    }
    if let Some(bt) = m.engine.bt() {
        let s = bt.stats;
        for c in s.counters() {
            fields.push((c.key.to_string(), c.value.to_string()));
        }
        fields.push((
            "translation_share".to_string(),
            format!(
                "{:.6}",
                s.translate_ns as f64 / 1e9 / elapsed.as_secs_f64().max(1e-9)
            ),
        ));
        for (prefix, map) in [
            ("special", &bt.by_kind.specials),
            ("fallback", &bt.by_kind.fallbacks),
        ] {
            let mut v = popek_translate::KindCounts::named(map);
            v.sort();
            for (k, n) in v {
                fields.push((format!("{prefix}_{k}"), n.to_string()));
            }
        }
    }
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("\"{k}\": {v}"))
        .collect();
    format!("{{{}}}", body.join(", "))
}

/// The board's counters for `--stats-json`: interrupts by vector, time
/// halted, unclaimed port accesses.
fn board_counters(m: &Machine) -> Vec<(String, u64)> {
    let mut v = vec![
        ("halted_ns".to_string(), m.stats.halted_ns),
        ("guest_page_faults".to_string(), m.cpu.page_faults),
        (
            "unclaimed_port_reads".to_string(),
            m.cpu.board.unclaimed_reads,
        ),
        (
            "unclaimed_port_writes".to_string(),
            m.cpu.board.unclaimed_writes,
        ),
    ];
    for (vector, (_, n)) in &m.stats.interrupts {
        v.push((format!("interrupts_vector_{vector}"), *n));
    }
    v
}

/// `--stats`: every counter on a line of its own (a percentage beside the
/// ones that are a share of something), then the derived figures.
pub(crate) fn print_stats(m: &Machine, elapsed: std::time::Duration) {
    let retired = m.cpu.retired;
    eprintln!("popek stats:");
    eprintln!("  {:<42}{retired}", "guest instructions executed");
    eprintln!("  {:<42}{:.3} s", "run time", elapsed.as_secs_f64());
    let b = &m.stats;
    let delivered: u64 = b.interrupts.values().map(|(_, n)| n).sum();
    let by: Vec<String> = b
        .interrupts
        .iter()
        .map(|(v, (irq, n))| match irq {
            Some(i) => format!("{v:#04x} (IRQ{i}) {n}"),
            None => format!("{v:#04x} {n}"),
        })
        .collect();
    eprintln!(
        "  {:<42}{delivered} {}",
        "interrupts delivered",
        by.join(", ")
    );
    eprintln!("  {:<42}{:.3} s", "time halted", b.halted_ns as f64 / 1e9);
    eprintln!(
        "  {:<42}{}",
        "page faults delivered to the guest", m.cpu.page_faults
    );
    eprintln!(
        "  {:<42}{} / {}",
        "unclaimed port reads / writes", m.cpu.board.unclaimed_reads, m.cpu.board.unclaimed_writes
    );
    if let Some(v) = &m.cpu.board.virtio_blk {
        let d = &v.dev.disk;
        eprintln!(
            "  {:<42}{} requests, {:.1} MiB read, {:.1} MiB written",
            "virtio disk",
            d.requests,
            d.read_bytes as f64 / (1 << 20) as f64,
            d.written_bytes as f64 / (1 << 20) as f64
        );
    }
    if let Some(b) = &m.cpu.board.balloon {
        eprintln!(
            "  {:<42}{} pages asked, {} held, {} inflated, {} deflated, {} released to the host",
            "virtio balloon",
            b.dev.num_pages,
            b.dev.actual,
            b.dev.inflated,
            b.dev.deflated,
            m.cpu.ram.released_pages()
        );
    }
    let (edges, sum, max) = m.cpu.board.timer_late;
    if edges > 0 {
        eprintln!(
            "  {:<42}{:.1} us on average, {:.1} us at most ({edges} edges)",
            "timer edges noticed late by",
            sum as f64 / edges as f64 / 1e3,
            max as f64 / 1e3
        );
    }
    if let Some(bt) = m.engine.bt() {
        let s = bt.stats;
        for c in s.counters() {
            if c.value == 0 && c.key.starts_with("exits_") {
                continue;
            }
            let of = match c.key {
                "cache_hits" => Some(s.lookups),
                "indirect_hits" => Some(s.indirect_lookups),
                "instructions_native" | "interpreter_fallbacks" => Some(retired),
                _ => None,
            };
            match of {
                Some(of) => eprintln!("  {:<42}{} ({:.1}%)", c.label, c.value, pct(c.value, of)),
                None => eprintln!("  {:<42}{}", c.label, c.value),
            }
        }
        let us = s.translate_ns as f64 / 1000.0;
        eprintln!(
            "  {:<42}{us:.0} us total, {:.2} us per block, {:.2}% of run time, \
             {:.2} us per basic block",
            "translation time",
            us / s.blocks_translated.max(1) as f64,
            100.0 * us / 1e6 / elapsed.as_secs_f64().max(1e-9),
            us / s.basic_blocks_translated.max(1) as f64,
        );
        let top = |m| {
            let v = popek_translate::KindCounts::named(m);
            let v: Vec<String> = v.iter().take(8).map(|(k, n)| format!("{k} {n}")).collect();
            v.join(", ")
        };
        eprintln!(
            "  {:<42}{}",
            "special calls by kind",
            top(&bt.by_kind.specials)
        );
        eprintln!(
            "  {:<42}{}",
            "fallbacks by opcode",
            top(&bt.by_kind.fallbacks)
        );
    }
    if let Some(t) = m.engine.trap() {
        print_trap_stats(&t.stats, &mut std::io::stderr());
    }
}

pub(crate) fn print_trap_stats(t: &popek_machine::trap::TrapStats, w: &mut dyn Write) {
    let traps: u64 = t.traps.values().map(|c| c.count).sum();
    let emulation: std::time::Duration = t.traps.values().map(|c| c.emulation).sum();
    let _ = writeln!(
        w,
        "  traps (#GP, emulated)         {traps}, {:.2} us of emulation each",
        emulation.as_secs_f64() * 1e6 / traps.max(1) as f64
    );
    for (k, c) in &t.traps {
        let _ = writeln!(
            w,
            "    {:<14} {:>9} traps, {:>7.2} us each, first at eip={:#010x}",
            format!("{k:?}"),
            c.count,
            c.emulation.as_secs_f64() * 1e6 / c.count.max(1) as f64,
            c.first_eip
        );
    }
    let silent: u64 = t.violations.values().map(|v| v.count).sum();
    let _ = writeln!(
        w,
        "  Popek-Goldberg violations     {silent} (sensitive, executed without a trap)"
    );
    for (k, v) in &t.violations {
        let _ = writeln!(
            w,
            "    {:<14} {:>9} times,  first at eip={:#010x}: {}",
            format!("{k:?}"),
            v.count,
            v.first_eip,
            popek_machine::trap::under_trap(*k)
        );
    }
}
