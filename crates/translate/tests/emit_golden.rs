//! Golden tests for the emitter, in the style of Cranelift's emit tests:
//! guest instructions and the host code they become, disassembled by
//! iced-x86 (an independent decoder) with addresses named, kept as plain
//! text in golden/emit.txt that anyone can extend.
//!
//! Each case in the file:
//!
//! ```text
//! == name
//! code 0x1000: 01 c8 eb 0e          guest bytes loaded at an address (any number of lines)
//! superblocks off                   optional: basic blocks only
//! pacing polled                     optional: Pacing::Polled or free (default: counted)
//! translate 0x1010 0x1000           blocks translated, in this order (chaining links them)
//! listing 0x1000                    the host code of this block, as it is after all of them:
//!     +0x000  add eax,ecx
//! ```
//!
//! A case ends at a blank line. To add one, write everything but the
//! listing's lines and run `UPDATE_GOLDEN=1 cargo test -p popek-translate
//! --test emit_golden`; read what it wrote before committing it.

use popek_memory::GuestRam;
use popek_translate::{Bt, Pacing};
use popek_vcpu::{reg, Vcpu};

const FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/emit.txt");

struct Case {
    name: String,
    code: Vec<(u32, Vec<u8>)>,
    superblocks: bool,
    pacing: Pacing,
    translate: Vec<u32>,
    listing: u32,
    want: String,
}

fn hex(s: &str) -> u32 {
    u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).expect("hex address")
}

/// The file as (text before the cases, cases).
fn parse(text: &str) -> (String, Vec<Case>) {
    let mut preamble = String::new();
    let mut cases = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(l) = lines.next() {
        let Some(name) = l.strip_prefix("== ") else {
            if cases.is_empty() {
                preamble.push_str(l);
                preamble.push('\n');
            }
            continue;
        };
        let mut c = Case {
            name: name.to_string(),
            code: Vec::new(),
            superblocks: true,
            pacing: Pacing::Counted,
            translate: Vec::new(),
            listing: 0,
            want: String::new(),
        };
        while let Some(l) = lines.next() {
            if l.trim().is_empty() {
                break;
            }
            if let Some(rest) = l.strip_prefix("code ") {
                let (at, bytes) = rest.split_once(':').expect("code ADDR: BYTES");
                let bytes = bytes
                    .split_whitespace()
                    .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
                    .collect();
                c.code.push((hex(at), bytes));
            } else if l == "superblocks off" {
                c.superblocks = false;
            } else if let Some(p) = l.strip_prefix("pacing ") {
                c.pacing = match p {
                    "polled" => Pacing::Polled,
                    "free" => Pacing::Free,
                    _ => panic!("{}: pacing is polled or free", c.name),
                };
            } else if let Some(rest) = l.strip_prefix("translate ") {
                c.translate = rest.split_whitespace().map(hex).collect();
            } else if let Some(rest) = l.strip_prefix("listing ") {
                c.listing = hex(rest);
                while lines.peek().is_some_and(|l| l.starts_with("    ")) {
                    c.want.push_str(lines.next().unwrap());
                    c.want.push('\n');
                }
            } else {
                panic!("{}: cannot read line {l:?}", c.name);
            }
        }
        cases.push(c);
    }
    (preamble, cases)
}

fn run(c: &Case) -> String {
    let mut cpu = Vcpu::new(GuestRam::new(1 << 20).unwrap());
    cpu.enter_flat_protected_mode(0x08, 0x10);
    cpu.regs[reg::ESP] = 0x8000;
    for (at, bytes) in &c.code {
        assert!(cpu.ram.load(*at, bytes), "{}", c.name);
    }
    let mut bt = Bt::new(None);
    bt.superblocks = c.superblocks;
    bt.set_pacing(c.pacing);
    assert_eq!(bt.pacing(), c.pacing, "{}", c.name);
    for &eip in &c.translate {
        assert!(bt.translate_at(&mut cpu, eip), "{}", c.name);
    }
    bt.listing(c.listing)
        .unwrap_or_else(|| panic!("{}: no translation at {:#x}", c.name, c.listing))
}

#[test]
fn emitted_host_code_matches_the_golden_listings() {
    let text = std::fs::read_to_string(FILE).unwrap();
    let (preamble, cases) = parse(&text);
    assert!(cases.len() >= 6, "the file has its cases");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        let mut out = preamble;
        for c in &cases {
            out.push_str(&format!("== {}\n", c.name));
            for (at, bytes) in &c.code {
                let b: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
                out.push_str(&format!("code {at:#06x}: {}\n", b.join(" ")));
            }
            if !c.superblocks {
                out.push_str("superblocks off\n");
            }
            match c.pacing {
                Pacing::Counted => {}
                Pacing::Polled => out.push_str("pacing polled\n"),
                Pacing::Free => out.push_str("pacing free\n"),
            }
            let t: Vec<String> = c.translate.iter().map(|a| format!("{a:#06x}")).collect();
            out.push_str(&format!("translate {}\n", t.join(" ")));
            out.push_str(&format!("listing {:#06x}\n{}\n", c.listing, run(c)));
        }
        std::fs::write(FILE, out.trim_end().to_string() + "\n").unwrap();
        return;
    }
    let mut failed = Vec::new();
    for c in &cases {
        let got = run(c);
        if got != c.want {
            failed.push(format!("== {}\nwant:\n{}got:\n{}", c.name, c.want, got));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
