//! Executes docs/coverage.md: every row's bytes are decoded and run on a
//! fresh sandbox CPU, and the outcome must match the table.

use popek_vcpu::{reg, vector, Fault};

use crate::testutil::sandbox_cpu;

const TABLE: &str = include_str!("../../../docs/coverage.md");

fn parse_hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

/// Run one instruction in the sandbox the document describes; the outcome
/// as the table writes it.
fn outcome(form: &str, bytes: &[u8]) -> String {
    let mut cpu = sandbox_cpu();
    cpu.regs = [1, 2, 0, 0x2000, 0x8000, 0x5000, 0x3000, 0x4000];
    if form.contains("RDMSR") {
        cpu.regs[reg::ECX] = 0x10;
    }
    for (i, v) in [0x10u32, 0x08, 0x10, 0x10].iter().enumerate() {
        cpu.ram.write(0x2000 + 4 * i as u32, 4, u64::from(*v));
    }
    for (i, v) in [0x1000u32, 0x08, 0x2].iter().enumerate() {
        cpu.ram.write(0x8000 + 4 * i as u32, 4, u64::from(*v));
    }
    cpu.ram.load(0x1000, bytes);
    cpu.eip = 0x1000;
    let result = match crate::fetch_decode(&mut cpu) {
        Ok((ins, _, _)) => {
            assert_eq!(ins.len(), bytes.len(), "{form}: decoded length");
            cpu.eip = ins.next_ip32();
            crate::exec::execute(&mut cpu, &ins)
        }
        Err(f) => Err(f),
    };
    match result {
        Ok(()) => "ok".into(),
        Err(Fault::Exception(e)) => vector::name(e.vector).into(),
        Err(Fault::Unsupported(what)) => format!("unsupported: {what}"),
    }
}

#[test]
fn coverage_table() {
    let mut rows = 0;
    let mut wrong = Vec::new();
    for line in TABLE
        .lines()
        .filter(|l| l.starts_with("| ") && l.contains('`'))
    {
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        let (form, hex, want) = (cols[2], cols[3].trim_matches('`'), cols[4]);
        let got = outcome(form, &parse_hex(hex));
        if got != want {
            wrong.push(format!(
                "{form} ({hex}): table says {want}, interpreter gives {got}"
            ));
        }
        rows += 1;
    }
    assert!(rows > 150, "only {rows} rows parsed");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
