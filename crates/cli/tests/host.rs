//! `popek host`: many guests in one process. The oracle for each guest's
//! output is its solo run; fairness is checked against the weights.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::run_with_timeout;

const POPEK: &str = env!("CARGO_BIN_EXE_popek");

fn popek(args: &[&str]) -> Output {
    run_with_timeout(Command::new(POPEK).args(args), Duration::from_secs(300))
}

fn report(o: &Output) -> serde_json::Value {
    let err = String::from_utf8_lossy(&o.stderr);
    let line = err
        .lines()
        .rfind(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no report in {err}"));
    serde_json::from_str(line).unwrap()
}

/// Deterministic guests run side by side on 1, 2 and 3 threads print
/// exactly what each prints alone, and end with the same status.
#[test]
fn every_guest_prints_what_it_prints_alone() {
    let guests = [
        "hello",
        "selfcheck",
        "compute",
        "paging",
        "preempt",
        "timers",
        "codedata",
    ];
    let solo: Vec<Output> = guests.iter().map(|g| popek(&["run", g])).collect();
    let dir = std::env::temp_dir().join(format!("popek-host-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for threads in ["1", "2", "3"] {
        let mut args = vec!["host".to_string(), "--threads".into(), threads.into()];
        for g in guests {
            args.push(format!(
                "{g},out={}",
                dir.join(format!("{g}-{threads}.out")).display()
            ));
        }
        args.extend(["--stats-json".into(), "-".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = popek(&args);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let r = report(&o);
        for (i, g) in guests.iter().enumerate() {
            let got = std::fs::read(dir.join(format!("{g}-{threads}.out"))).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&solo[i].stdout),
                "{g} on {threads} threads"
            );
            assert_eq!(
                r["guests"][i]["exit_status"].as_i64(),
                solo[i].status.code().map(i64::from),
                "{g}"
            );
        }
    }
}

/// Weights 1:2:4 on one thread: while all three run, each gets its
/// entitled share to within 10% (round-robin, which ignores weights,
/// would give the first 2.3 times its share), and Jain's index is near 1.
#[test]
fn shares_follow_the_weights() {
    let o = popek(&[
        "host",
        "dirty,weight=1,append=passes=15000",
        "dirty,weight=2,append=passes=15000",
        "dirty,weight=4,append=passes=15000",
        "--stats-json",
        "-",
    ]);
    assert_eq!(o.status.code(), Some(0));
    let r = report(&o);
    for g in r["guests"].as_array().unwrap() {
        let ratio = g["share_ratio"].as_f64().unwrap();
        assert!((0.9..=1.1).contains(&ratio), "{g}");
    }
    assert!(r["fairness_jain"].as_f64().unwrap() > 0.99, "{r}");
    // Each guest's output still says every page held its counter.
    let out = String::from_utf8_lossy(&o.stdout);
    for n in ["dirty#1", "dirty#2", "dirty#3"] {
        assert!(
            out.contains(&format!(
                "{n}: dirty: 15000 passes over 4096 pages: every page held"
            )),
            "{out}"
        );
    }
}

/// A halted guest consumes nothing: `echo` waits a second for input
/// (halted between timer ticks) beside a busy guest, and uses a few
/// milliseconds of CPU.
#[test]
fn a_halted_guest_consumes_nothing() {
    let o = popek(&[
        "host",
        "echo",
        "dirty,append=passes=10000",
        "--stats-json",
        "-",
    ]);
    assert_eq!(o.status.code(), Some(0));
    let r = report(&o);
    let echo = r["guests"][0]["cpu_ms"].as_f64().unwrap();
    let dirty = r["guests"][1]["cpu_ms"].as_f64().unwrap();
    assert!(echo < 100.0 && echo * 4.0 < dirty, "{r}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("echo: echo: 0 bytes:"));
}

/// Bad specs and guests that are not kernels are refused in one line.
#[test]
fn bad_specs_are_refused() {
    for spec in [
        "hello,weight=0",
        "hello,colour=red",
        "user-hello",
        "no-such-guest",
    ] {
        let o = popek(&["host", spec]);
        assert_eq!(o.status.code(), Some(2), "{spec}");
        assert_eq!(
            String::from_utf8_lossy(&o.stderr).lines().count(),
            1,
            "{spec}"
        );
    }
}

/// Content-based page sharing: four identical `clone` guests (each fills
/// 4 MiB with the same pattern, then waits) print what they print alone,
/// and with --dedup the host holds their RAM in less than 40% of the
/// memory it takes without (measured: the machines' own RAM and the
/// shared store, as each guest ended).
#[test]
fn identical_guests_share_their_pages() {
    let solo = popek(&["run", "clone"]);
    let dir = std::env::temp_dir().join(format!("popek-dedup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut host_mib = Vec::new();
    for dedup in [false, true] {
        let outs: Vec<String> = (0..4)
            .map(|i| format!("clone,out={}", dir.join(format!("{dedup}-{i}")).display()))
            .collect();
        let mut args = vec!["host", "--threads", "2", "--stats-json", "-"];
        if dedup {
            args.push("--dedup");
        }
        args.extend(outs.iter().map(String::as_str));
        let o = popek(&args);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        for i in 0..4 {
            let got = std::fs::read(dir.join(format!("{dedup}-{i}"))).unwrap();
            assert_eq!(got, solo.stdout, "clone {i} (dedup {dedup})");
        }
        let r = report(&o);
        host_mib.push(r["guest_ram_host_mib"].as_f64().unwrap());
        if dedup {
            let d = &r["dedup"];
            assert!(d["shared_pages"].as_u64().unwrap() >= 4 * 1024, "{d}");
            assert!(d["store_pages"].as_u64().unwrap() < 2 * 1024, "{d}");
        }
    }
    assert!(host_mib[1] < 0.4 * host_mib[0], "{host_mib:?} MiB");
}
