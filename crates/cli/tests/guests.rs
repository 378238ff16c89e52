//! Every bundled guest under popek, against QEMU as the oracle: the same
//! serial bytes and the same exit status as
//! `qemu-system-i386 -kernel G -serial stdio -display none
//!  -device isa-debug-exit,iobase=0xf4,iosize=4 -no-reboot`.
//! Guests QEMU cannot judge (see guests/guests.txt) are checked against the
//! verdicts they print from the Intel SDM's definitions.

mod common;

use common::{run_with_timeout, with_input_when_ready};
use std::process::{Command, Output};
use std::time::Duration;

const POPEK: &str = env!("CARGO_BIN_EXE_popek");

/// `qemu-system-i386` booting the Multiboot kernel at `path` as the
/// oracle runs it.
fn qemu_command(path: &str) -> Command {
    let mut cmd = Command::new("qemu-system-i386");
    cmd.args([
        "-kernel", path, "-serial", "stdio", "-display", "none", "-device",
    ])
    .args([
        "isa-debug-exit,iobase=0xf4,iosize=4",
        "-no-reboot",
        "-m",
        "64",
    ]);
    cmd
}

fn qemu(path: &str) -> Output {
    run_with_timeout(&mut qemu_command(path), Duration::from_secs(300))
}

fn popek(args: &[&str]) -> Output {
    run_with_timeout(Command::new(POPEK).args(args), Duration::from_secs(300))
}

#[test]
fn qemu_is_installed() {
    let out = Command::new("qemu-system-i386").arg("--version").output();
    assert!(
        out.map(|o| o.status.success()).unwrap_or(false),
        "qemu-system-i386 is missing: run the README's test command (.ci/test), which installs qemu-system-x86"
    );
}

/// Both engines: the reference interpreter and the binary translator.
const ENGINES: [&str; 2] = ["interp", "bt"];

#[test]
fn every_qemu_guest_matches_qemu_byte_for_byte() {
    let guests: Vec<_> = popek_guests::GUESTS
        .iter()
        .filter(|g| g.qemu && !g.linux)
        .collect();
    assert!(guests.len() >= 5);
    let handles: Vec<_> = guests
        .iter()
        .map(|g| {
            let g = **g;
            std::thread::spawn(move || {
                let runs: Vec<_> = ENGINES
                    .iter()
                    .map(|e| (*e, popek(&["run", "--engine", e, g.path])))
                    .collect();
                (g, qemu(g.path), runs)
            })
        })
        .collect();
    for h in handles {
        let (g, q, runs) = h.join().unwrap();
        let qs = String::from_utf8_lossy(&q.stdout);
        assert!(
            !q.stdout.is_empty(),
            "{}: QEMU printed nothing; stderr: {}",
            g.name,
            String::from_utf8_lossy(&q.stderr)
        );
        for (engine, p) in runs {
            let name = format!("{} (--engine {engine})", g.name);
            let ps = String::from_utf8_lossy(&p.stdout);
            let err = String::from_utf8_lossy(&p.stderr);
            assert_eq!(
                ps, qs,
                "{name}: serial output differs from QEMU (popek stderr: {err})"
            );
            assert_eq!(
                p.status.code(),
                q.status.code(),
                "{name}: exit status differs from QEMU"
            );
            // The guests' own verdicts hold too (so QEMU and popek are not
            // merely equally wrong).
            assert!(
                !ps.contains("WRONG") && !ps.contains("FAIL"),
                "{name}: {ps}"
            );
            assert!(p.stderr.is_empty(), "{name}: popek stderr: {err}");
        }
    }
}

/// The bundled Linux programs: popek (both engines) against the host
/// kernel running the same file (`--engine native`) and against qemu-i386.
#[test]
fn every_linux_guest_matches_native_and_qemu_i386() {
    let guests: Vec<_> = popek_guests::GUESTS.iter().filter(|g| g.linux).collect();
    assert!(guests.len() >= 2);
    // user-compute reads its first argument as a repeat count.
    let args = ["2", "second argument"];
    for g in guests {
        let native = run_with_timeout(Command::new(g.path).args(args), Duration::from_secs(60));
        let qemu = run_with_timeout(
            Command::new("qemu-i386").arg(g.path).args(args),
            Duration::from_secs(60),
        );
        assert!(!native.stdout.is_empty(), "{}: no output natively", g.name);
        assert_eq!(
            String::from_utf8_lossy(&qemu.stdout),
            String::from_utf8_lossy(&native.stdout),
            "{}: qemu-i386 and the host disagree",
            g.name
        );
        for engine in ["native", "interp", "bt"] {
            let mut cmd = vec!["run", "--engine", engine, g.name];
            cmd.extend(args);
            let p = popek(&cmd);
            let name = format!("{} (--engine {engine})", g.name);
            assert_eq!(
                String::from_utf8_lossy(&p.stdout),
                String::from_utf8_lossy(&native.stdout),
                "{name}: stdout differs from direct execution; stderr: {}",
                String::from_utf8_lossy(&p.stderr)
            );
            assert_eq!(p.status.code(), native.status.code(), "{name}");
            assert!(
                !String::from_utf8_lossy(&p.stdout).contains("WRONG"),
                "{name}"
            );
            assert!(
                p.stderr.is_empty(),
                "{name}: {}",
                String::from_utf8_lossy(&p.stderr)
            );
        }
    }
}

/// The nanobenchmark guest: timings differ from run to run, so only the
/// shape is checked: every operation reported, as a number of ticks, and
/// the guest's own clean exit, under both engines.
#[test]
fn nano_guest_reports_every_operation() {
    const OPS: [&str; 10] = [
        "call/ret",
        "pushf/popf",
        "cli/sti",
        "in (UART scratch)",
        "out (UART scratch)",
        "vmcall (hypercall NOP)",
        "mov cr0 (read, write)",
        "mov cr3 (reload)",
        "int/iret",
        "divzero (#DE round trip)",
    ];
    for engine in ENGINES {
        let p = popek(&["run", "nano", "--engine", engine]);
        let out = String::from_utf8_lossy(&p.stdout);
        assert_eq!(p.status.code(), Some(1), "{engine}: {out}");
        for op in OPS {
            let line = out
                .lines()
                .find(|l| l.starts_with(&format!("{op}: ")))
                .unwrap_or_else(|| panic!("{engine}: no line for {op}: {out}"));
            let n = line[op.len() + 2..].trim_end_matches(" ticks");
            assert!(n.parse::<u32>().is_ok(), "{engine}: {line}");
        }
    }
}

#[test]
fn a_tiny_translation_cache_changes_nothing_but_speed() {
    // Eight and four blocks for a guest with hundreds: constant eviction and
    // retranslation; with four, the code buffer fills and is flushed in the
    // middle of translating a block (twice), which must not lose the
    // block's helper calls.
    let want = popek(&["run", "selfcheck", "--engine", "interp"]);
    for blocks in ["8", "4"] {
        let got = popek(&[
            "run",
            "selfcheck",
            "--engine",
            "bt",
            "--cache-blocks",
            blocks,
            "--stats",
        ]);
        let err = String::from_utf8_lossy(&got.stderr);
        assert_eq!(got.stdout, want.stdout, "{blocks} blocks: {err}");
        assert_eq!(got.status.code(), want.status.code(), "{blocks} blocks");
        if blocks == "4" {
            let flushes = err
                .lines()
                .find_map(|l| l.strip_prefix("  code buffer flushes"))
                .and_then(|v| v.trim().parse::<u32>().ok());
            assert!(flushes.is_some_and(|f| f > 0), "no buffer flush: {err}");
        }
    }
}

#[test]
fn segments_guest_follows_the_sdm() {
    for engine in ENGINES {
        let p = popek(&["run", "segments", "--engine", engine]);
        let out = String::from_utf8_lossy(&p.stdout);
        assert!(out.contains("segments: PASS"), "{engine}: {out}");
        assert!(!out.contains("WRONG"), "{engine}: {out}");
        assert_eq!(p.status.code(), Some(1));
    }
}

#[test]
fn triple_fault_is_reported_with_address_and_bytes() {
    let p = popek(&["run", "triplefault"]);
    let err = String::from_utf8_lossy(&p.stderr);
    assert_eq!(p.status.code(), Some(2));
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("triple fault at eip=0x"), "{err}");
    // the faulting instruction is a DIV (opcode F7 /6)
    assert!(err.contains("[f7 "), "{err}");
    assert!(String::from_utf8_lossy(&p.stdout).contains("dividing by zero"));
}

/// COM1's receiver through received-data interrupts, fed from popek's
/// stdin as QEMU's -serial stdio feeds it: the same line comes back.
#[test]
fn serial_input_reaches_the_guest_as_under_qemu() {
    let g = popek_guests::find("echo").expect("bundled");
    let want = with_input_when_ready(&mut qemu_command(g.path), b"hello popek\n");
    assert_eq!(
        String::from_utf8_lossy(&want),
        "echo: ready\necho: 12 bytes:HELLO POPEK\n"
    );
    for engine in ENGINES {
        let got = with_input_when_ready(
            Command::new(POPEK).args(["run", "--engine", engine, "echo"]),
            b"hello popek\n",
        );
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "{engine}"
        );
    }
}

/// The paravirtual guest checks each hypercall's answer against what it
/// knows without popek (the Multiboot header's memory size, a clock that
/// must advance, #UD for VMCALL at ring 3, the errors the interface
/// documents) and, after the balloon inflated at boot and deflated at the
/// end, its pool's pages against their pattern. Under QEMU, whose CPU has
/// no popek leaves, it must find no interface (the detection's negative
/// case).
#[test]
fn pv_guest_finds_the_interface_only_under_popek() {
    let g = popek_guests::find("pv").expect("bundled");
    let q = qemu(g.path);
    let qout = String::from_utf8_lossy(&q.stdout);
    assert!(
        qout.contains("pv: no popek paravirtual interface here"),
        "{qout}"
    );
    let mut outs = Vec::new();
    for engine in ENGINES {
        let p = popek(&["run", "pv", "--balloon", "16M", "--engine", engine]);
        let out = String::from_utf8_lossy(&p.stdout).into_owned();
        assert_eq!(p.status.code(), Some(1), "{engine}: {out}");
        assert!(
            !out.contains("WRONG") && !out.contains("FAILED"),
            "{engine}: {out}"
        );
        for line in [
            "pv: found PopekPopekVM, interface version 1",
            "pv: this line came through the console hypercall",
            "pv: boot target 4096 pages",
            "pv: balloon holds 4096 pages (16 MiB), host counts 4096; kept pages intact: yes, returned pages zero: yes",
            "pv: balloon holds 0 pages (0 MiB), host counts 0; kept pages intact: yes, returned pages zero: yes",
            "pv: done",
        ] {
            assert!(out.lines().any(|l| l == line), "{engine}: no {line:?} in {out}");
        }
        // Every check the guest makes (the `check` calls in guests/pv.c).
        assert_eq!(out.matches(": ok\n").count(), 10, "{engine}: {out}");
        outs.push(out);
    }
    assert_eq!(outs[0], outs[1]);
}

/// The clone guest (the snapshot tests' guest) answers lines from the
/// serial line as under QEMU.
#[test]
fn the_clone_guest_answers_lines_as_under_qemu() {
    let g = popek_guests::find("clone").expect("bundled");
    let input: &'static [u8] = b"hello popek\nsecond line\nquit\n";
    let want = with_input_when_ready(&mut qemu_command(g.path), input);
    assert!(
        String::from_utf8_lossy(&want).contains("line 2: SECOND LINE"),
        "{}",
        String::from_utf8_lossy(&want)
    );
    for engine in ENGINES {
        let got = with_input_when_ready(
            Command::new(POPEK).args(["run", "--engine", engine, "clone"]),
            input,
        );
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "{engine}"
        );
    }
}
