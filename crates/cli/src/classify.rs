//! `popek classify`: the Popek-Goldberg table, or a guest's code
//! classified.

use popek_decode::{reachable_blocks, AtRing3, Class, SPECIALS};
use popek_machine::{Config, Machine};

use crate::run::load_image;

pub(crate) fn print_table() {
    println!(
        "{:<15} {:<11} {:<10} {:<6} what it does",
        "instruction", "class", "at ring 3", "ends"
    );
    println!("{}", "-".repeat(100));
    for r in SPECIALS {
        let ring3 = match r.at_ring3 {
            AtRing3::Traps => "traps",
            AtRing3::Silent => "SILENT",
            AtRing3::Sometimes => "sometimes",
        };
        println!(
            "{:<15} {:<11} {:<10} {:<6} {}",
            format!("{:?}", r.kind),
            r.class.name(),
            ring3,
            if r.ends_block { "block" } else { "" },
            r.what
        );
        println!(
            "{:<44}{} under --engine trap: {}",
            "",
            if r.at_ring3 == AtRing3::Silent {
                "VIOLATES Popek-Goldberg;"
            } else {
                "holds;"
            },
            popek_machine::trap::under_trap(r.kind)
        );
    }
    let silent = SPECIALS
        .iter()
        .filter(|r| r.at_ring3 == AtRing3::Silent)
        .count();
    println!(
        "\n{silent} sensitive instructions run at ring 3 without trapping (SILENT): x86 fails the \
         Popek-Goldberg condition that every sensitive instruction be privileged."
    );
    println!("Everything else: innocuous, or control flow (near JMP/Jcc/CALL/RET/LOOP), which ends a block.");
}

/// Print every block reachable from the guest's entry, classified.
pub(crate) fn classify_guest(guest: &str) -> Result<(), String> {
    let (image, path) = load_image(guest)?;
    let mut m = if crate::run::is_multiboot(&image) {
        Machine::multiboot(
            &image,
            Config {
                cmdline: path,
                ..Config::default()
            },
        )
    } else {
        let start = popek_machine::linux::Start::with_host_env(&[path], false);
        Machine::linux_with(&image, start, Config::default())
    }
    .map_err(|e| format!("{guest}: {e}"))?;
    let entry = m.cpu.eip;
    let cpu = &mut m.cpu;
    let blocks = reachable_blocks(|eip, buf| cpu.fetch(eip, buf).0, entry, 32, 4096);
    let mut counts = std::collections::BTreeMap::<Class, usize>::new();
    for block in &blocks {
        println!(
            "block {:#010x} ({} instructions, ends: {:?})",
            block.start,
            block.insns.len(),
            block.end
        );
        for i in &block.insns {
            *counts.entry(i.class).or_default() += 1;
            let bytes: String = i.bytes.iter().map(|b| format!("{b:02x}")).collect();
            let kind = i
                .special
                .map(|s| {
                    if s.info().at_ring3 == AtRing3::Silent {
                        format!(
                            " [{s:?}, violates Popek-Goldberg: under trap {}]",
                            popek_machine::trap::under_trap(s)
                        )
                    } else {
                        format!(" [{s:?}]")
                    }
                })
                .unwrap_or_default();
            println!(
                "  {:08x}  {:<24} {:<36} {}{}",
                i.ins.ip32(),
                bytes,
                i.ins.to_string(),
                i.class.name(),
                kind
            );
        }
    }
    println!("\nsummary:");
    for (c, n) in counts {
        println!("  {:<13} {n}", c.name());
    }
    Ok(())
}
