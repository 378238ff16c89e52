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
        "pv",
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

/// The host's monitor (`--monitor`), the way a test drives it: one command,
/// its JSON answer.
fn monitor(sock: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let o = popek(&[&["monitor", sock.to_str().unwrap()], args].concat());
    let s = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(s.trim()).unwrap_or_else(|_| panic!("{args:?}: {s}"))
}

/// Wait until `file` holds `line` (60 s at most).
fn wait_for_line(file: &std::path::Path, line: &str) {
    let start = std::time::Instant::now();
    loop {
        let s = std::fs::read_to_string(file).unwrap_or_default();
        if s.lines().any(|l| l == line) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{} never said {line:?}:\n{s}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Start `popek host` with a monitor on `sock` and the given specs.
fn host_with_monitor(
    sock: &std::path::Path,
    extra: &[&str],
    specs: &[String],
) -> std::process::Child {
    let _ = std::fs::remove_file(sock);
    let mut c = Command::new(POPEK);
    c.args(["host", "--threads", "2", "--stats-json", "-", "--monitor"])
        .arg(format!("unix:{}", sock.display()))
        .args(extra)
        .args(specs)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let child = c.spawn().unwrap();
    let start = std::time::Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no monitor socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// Two `pv` guests serving their balloons for a minute under `popek host
/// --monitor` (with `extra` options), once both have filled their pools:
/// the monitor's socket, their output files, the host.
fn two_pv_guests(
    tag: &str,
    extra: &[&str],
) -> (
    std::path::PathBuf,
    [std::path::PathBuf; 2],
    std::process::Child,
) {
    let dir = std::env::temp_dir().join(format!("popek-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("host.sock");
    let outs = [dir.join("a.out"), dir.join("b.out")];
    let specs: Vec<String> = outs
        .iter()
        .map(|o| format!("pv,out={},append=wait=60", o.display()))
        .collect();
    let child = host_with_monitor(&sock, extra, &specs);
    for o in &outs {
        wait_for_line(o, "pv: boot target 0 pages");
    }
    (sock, outs, child)
}

fn finish(child: std::process::Child) -> serde_json::Value {
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    report(&o)
}

/// Ballooning through the host's monitor: two `pv` guests (each fills a
/// 56 MiB pool); the host asks one for all of its pool, its balloon driver
/// hands the pages back over hypercalls, and the host's memory drops by
/// what the guest gave: the guest's RAM file (its allocated blocks) by at
/// least 50 MiB and the process's resident set by at least 40 MiB, as
/// measured by the host (the other guest is untouched). Deflating gives
/// the pages back, and the guest finds its other pages intact.
#[test]
fn the_host_balloons_a_guest_and_its_memory_goes_back() {
    let (sock, outs, child) = two_pv_guests("balloon", &[]);
    let guests = monitor(&sock, &["query-guests"]);
    assert_eq!(
        guests["return"]["guests"].as_array().map(Vec::len),
        Some(2),
        "{guests}"
    );
    let before = monitor(&sock, &["query-balloon", "guest=pv#1"])["return"].clone();
    let other_before = monitor(&sock, &["query-balloon", "guest=pv#2"])["return"]["host_ram_bytes"]
        .as_u64()
        .unwrap();
    let r = monitor(&sock, &["balloon", "guest=pv#1", "value=8388608"]);
    assert_eq!(r["return"]["target"].as_u64(), Some(8 << 20), "{r}");
    wait_for_line(
        &outs[0],
        "pv: balloon holds 14336 pages (56 MiB), host counts 14336; kept pages intact: yes, returned pages zero: yes",
    );
    let after = monitor(&sock, &["query-balloon", "guest=pv#1"])["return"].clone();
    assert_eq!(after["actual"].as_u64(), Some(8 << 20), "{after}");
    let ram_drop =
        before["host_ram_bytes"].as_u64().unwrap() - after["host_ram_bytes"].as_u64().unwrap();
    let rss_drop = before["host_rss_bytes"].as_u64().unwrap() as i64
        - after["host_rss_bytes"].as_u64().unwrap() as i64;
    assert!(ram_drop >= 50 << 20, "RAM file: {before} -> {after}");
    assert!(rss_drop >= 40 << 20, "resident set: {before} -> {after}");
    let other_after = monitor(&sock, &["query-balloon", "guest=pv#2"])["return"]["host_ram_bytes"]
        .as_u64()
        .unwrap();
    assert_eq!(other_after, other_before, "the other guest kept its memory");
    monitor(&sock, &["balloon", "guest=pv#1", "value=67108864"]);
    wait_for_line(
        &outs[0],
        "pv: balloon holds 0 pages (0 MiB), host counts 0; kept pages intact: yes, returned pages zero: yes",
    );
    let e = monitor(&sock, &["balloon", "guest=nobody", "value=0"]);
    assert_eq!(e["error"]["class"], "DeviceNotFound", "{e}");
    monitor(&sock, &["quit"]);
    let r = finish(child);
    assert_eq!(r["guests"][0]["exit_status"].as_i64(), Some(0), "{r}");
    for o in &outs {
        let s = std::fs::read_to_string(o).unwrap();
        assert!(!s.contains("WRONG") && !s.contains("FAILED"), "{s}");
    }
}

/// Shared store pages are freed once no guest page is backed by them: two
/// `pv` guests fill identical pools, which --dedup backs by one store;
/// both balloons then take every pool page (the host releases the pages,
/// breaking their sharing), and the store's pages go with them.
#[test]
fn store_pages_are_freed_when_their_sharers_break_away() {
    let (sock, outs, child) = two_pv_guests("reclaim", &["--dedup"]);
    // The scan goes on while the guests idle: wait for the pools.
    let start = std::time::Instant::now();
    loop {
        let d = monitor(&sock, &["query-dedup"]);
        if d["return"]["store_pages"].as_u64().unwrap() >= 14336 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{d}");
        std::thread::sleep(Duration::from_millis(50));
    }
    for g in ["pv#1", "pv#2"] {
        monitor(&sock, &["balloon", &format!("guest={g}"), "value=8388608"]);
    }
    for o in &outs {
        wait_for_line(
            o,
            "pv: balloon holds 14336 pages (56 MiB), host counts 14336; kept pages intact: yes, returned pages zero: yes",
        );
    }
    let d = monitor(&sock, &["query-dedup"]);
    monitor(&sock, &["quit"]);
    let r = finish(child);
    assert!(
        d["return"]["store_pages_reclaimed"].as_u64().unwrap() >= 14336,
        "{d}"
    );
    assert!(d["return"]["store_pages"].as_u64().unwrap() < 1024, "{d}");
    assert!(r["dedup"]["store_pages"].as_u64().unwrap() < 1024, "{r}");
}
