//! Suspend, resume, snapshots, clones and the monitor, with the
//! uninterrupted run as the oracle: a guest suspended after N instructions
//! and resumed must print, byte for byte, what the run that was never
//! stopped prints (the two halves concatenated), and end with the same
//! status, under either engine and across engines. (The uninterrupted runs
//! are themselves checked against QEMU by tests/guests.rs.)

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{instructions, run_with_timeout, with_input_when_ready};

const POPEK: &str = env!("CARGO_BIN_EXE_popek");
const LIMIT: Duration = Duration::from_secs(300);

fn popek(args: &[&str]) -> Output {
    run_with_timeout(Command::new(POPEK).args(args), LIMIT)
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("popek-snapshot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Suspend `guest` (run with `extra` options) under `e1` after `n`
/// instructions and resume it under `e2`; the output of both halves and
/// the final status must be the uninterrupted run's.
fn suspend_and_resume(guest: &str, extra: &[&str], n: u64, e1: &str, e2: &str, whole: &Output) {
    let file = tmp(&format!("{guest}-{n}-{e1}-{e2}.snap"));
    let f = file.to_str().unwrap();
    let n_s = n.to_string();
    let mut args = vec![
        "run",
        guest,
        "--icount",
        "--engine",
        e1,
        "--suspend-at-insns",
        &n_s,
        "--snapshot",
        f,
    ];
    args.extend_from_slice(extra);
    let a = popek(&args);
    assert_eq!(a.status.code(), Some(0), "{guest} suspend: {}", stderr(&a));
    let line = stderr(&a);
    assert!(
        line.contains(&format!("after {n} instructions")) && line.lines().count() == 1,
        "{guest}: one line saying where: {line}"
    );
    let b = popek(&["resume", f, "--engine", e2]);
    let mut both = a.stdout.clone();
    both.extend_from_slice(&b.stdout);
    assert_eq!(
        String::from_utf8_lossy(&both),
        String::from_utf8_lossy(&whole.stdout),
        "{guest}: suspended at {n} under {e1}, resumed under {e2}: {}",
        stderr(&b)
    );
    assert_eq!(
        b.status.code(),
        whole.status.code(),
        "{guest} {e1}->{e2}: {}",
        stderr(&b)
    );
    let _ = std::fs::remove_file(&file);
}

/// Every bundled bare-metal guest, on the instruction clock (so that its
/// output and its instruction count do not depend on the host's speed: a
/// guest waiting for the timer would retire more instructions under bt
/// than under interp, and `nano` prints TSC ticks) (`nano` prints TSC measurements; `echo` and `clone` wait for
/// input: `clone` is the monitor's and the clones' guest below), at a
/// third and two thirds of its run, under bt and interp and across them.
fn bundled(guest: &str) {
    bundled_with(guest, &[]);
}

fn bundled_with(guest: &str, extra: &[&str]) {
    let mut args = vec!["run", guest, "--icount", "--stats-json"];
    args.extend_from_slice(extra);
    let whole = popek(&args);
    let total = instructions(&whole);
    assert!(total > 3, "{guest}: {total} instructions");
    suspend_and_resume(guest, extra, total / 3, "bt", "interp", &whole);
    suspend_and_resume(guest, extra, total / 3, "interp", "interp", &whole);
    suspend_and_resume(guest, extra, 2 * total / 3, "interp", "bt", &whole);
    suspend_and_resume(guest, extra, 2 * total / 3, "bt", "bt", &whole);
}

/// The paravirtual guest with its balloon inflated at boot: suspended
/// with pages in the balloon (the paravirtual interface's state and the
/// released pages travel in the snapshot), it deflates after the resume
/// and finds its pages as the uninterrupted run does.
#[test]
fn pv_with_its_balloon_resumes_where_it_stopped() {
    bundled_with("pv", &["--balloon", "16M"]);
}

macro_rules! bundled_tests {
    ($($name:ident => $guest:expr),* $(,)?) => {$(
        #[test]
        fn $name() {
            bundled($guest);
        }
    )*};
}

bundled_tests! {
    hello_resumes_where_it_stopped => "hello",
    popf_resumes_where_it_stopped => "popf",
    sensitive_resumes_where_it_stopped => "sensitive",
    exceptions_resumes_where_it_stopped => "exceptions",
    selfcheck_resumes_where_it_stopped => "selfcheck",
    compute_resumes_where_it_stopped => "compute",
    segments_resumes_where_it_stopped => "segments",
    preempt_resumes_where_it_stopped => "preempt",
    timers_resumes_where_it_stopped => "timers",
    paging_resumes_where_it_stopped => "paging",
    codedata_resumes_where_it_stopped => "codedata",
    triplefault_resumes_where_it_stopped => "triplefault",
    nano_resumes_where_it_stopped => "nano",
    echo_resumes_where_it_stopped => "echo",
    clone_resumes_where_it_stopped => "clone",
    codedata_split_resumes_where_it_stopped => "codedata-split",
    codedata_paged_resumes_where_it_stopped => "codedata-paged",
    dirty_resumes_where_it_stopped => "dirty",
    pv_resumes_where_it_stopped => "pv",
    ptchurn_resumes_where_it_stopped => "ptchurn",
    preempt_paging_resumes_where_it_stopped => "preempt-paging",
}

/// Every bundled bare-metal guest is covered above.
#[test]
fn every_bundled_kernel_is_covered() {
    let src = include_str!("snapshot.rs");
    for g in popek_guests::GUESTS.iter().filter(|g| !g.linux) {
        let covered = src.contains(&format!("=> \"{}\"", g.name));
        assert!(covered, "bundled guest {} has no snapshot test", g.name);
    }
}

/// A chain: a full snapshot, a diff snapshot resumed from it; restoring the
/// diff gives the same machine (RAM digest, registers) as a full snapshot
/// taken at the same point, and the run goes on the same.
#[test]
fn a_diff_snapshot_restores_what_a_full_one_does() {
    let whole = popek(&["run", "paging", "--icount", "--stats-json"]);
    let total = instructions(&whole);
    let (n1, n2) = ((total / 4).to_string(), (total / 2).to_string());
    let (base, diff, full) = (tmp("base.snap"), tmp("diff.snap"), tmp("full.snap"));
    let (b, d, f) = (
        base.to_str().unwrap(),
        diff.to_str().unwrap(),
        full.to_str().unwrap(),
    );
    let a = popek(&[
        "run",
        "paging",
        "--icount",
        "--suspend-at-insns",
        &n1,
        "--snapshot",
        b,
    ]);
    assert!(a.status.success(), "{}", stderr(&a));
    let m = popek(&[
        "resume",
        b,
        "--suspend-at-insns",
        &n2,
        "--snapshot",
        d,
        "--diff",
    ]);
    assert!(m.status.success(), "{}", stderr(&m));
    assert!(stderr(&m).contains("diff snapshot"), "{}", stderr(&m));
    let x = popek(&["resume", b, "--suspend-at-insns", &n2, "--snapshot", f]);
    assert_eq!(x.stdout, m.stdout);
    let describe = |file: &str| {
        let o = popek(&["inspect", file]);
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let (di, fi) = (describe(d), describe(f));
    let last_two = |s: &str| {
        s.lines()
            .rev()
            .take(2)
            .map(String::from)
            .collect::<Vec<_>>()
    };
    assert!(di.contains("kind:        diff") && fi.contains("kind:        full"));
    assert_eq!(last_two(&di), last_two(&fi), "diff:\n{di}\nfull:\n{fi}");
    assert!(
        std::fs::metadata(&diff).unwrap().len() < std::fs::metadata(&full).unwrap().len(),
        "a diff stores less than a full snapshot"
    );
    let rest = popek(&["resume", d]);
    let mut all = a.stdout.clone();
    all.extend_from_slice(&m.stdout);
    all.extend_from_slice(&rest.stdout);
    assert_eq!(
        String::from_utf8_lossy(&all),
        String::from_utf8_lossy(&whole.stdout)
    );
    assert_eq!(rest.status.code(), whole.status.code());
    // A diff whose base is gone, or was replaced by another snapshot, is
    // refused.
    std::fs::rename(&full, &base).unwrap();
    let o = popek(&["resume", d]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("another snapshot"), "{}", stderr(&o));
    std::fs::remove_file(&base).unwrap();
    let o = popek(&["resume", d]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("base snapshot"), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1);
}

/// One line on stderr, exit status 2, nothing on stdout.
fn refused(file: &Path, why: &str) {
    let o = popek(&["resume", file.to_str().unwrap()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{why}: {err}");
    assert_eq!(err.lines().count(), 1, "{why}: one line: {err}");
    assert!(err.starts_with("popek: "), "{why}: {err}");
    assert!(o.stdout.is_empty(), "{why}: the guest must not run");
}

/// Damaged files are refused with one clear line: flipped bytes anywhere,
/// truncation, another format version, another program's file.
#[test]
fn damaged_snapshots_are_refused_in_one_line() {
    let good = tmp("good.snap");
    let g = good.to_str().unwrap();
    let a = popek(&[
        "run",
        "hello",
        "--suspend-at-insns",
        "1000",
        "--snapshot",
        g,
    ]);
    assert!(a.status.success(), "{}", stderr(&a));
    let bytes = std::fs::read(&good).unwrap();
    let bad = tmp("bad.snap");
    let with = |b: &[u8], why: &str| {
        std::fs::write(&bad, b).unwrap();
        refused(&bad, why);
    };
    // A flipped bit in the header, the state, the page index, the page
    // data and the trailer.
    for at in [
        20,
        130,
        300,
        bytes.len() / 2,
        bytes.len() - 20,
        bytes.len() - 3,
    ] {
        let mut b = bytes.clone();
        b[at] ^= 0x10;
        with(&b, &format!("a flipped bit at byte {at}"));
    }
    with(&bytes[..bytes.len() - 1], "truncated by one byte");
    with(&bytes[..bytes.len() / 2], "truncated by half");
    with(&bytes[..100], "truncated inside the header");
    with(&[], "empty");
    let mut b = bytes.clone();
    b[8] = 9;
    with(&b, "format version 9");
    std::fs::write(&bad, &b).unwrap();
    let err = stderr(&popek(&["resume", bad.to_str().unwrap()]));
    assert!(err.contains("version 9"), "{err}");
    with(b"#!/bin/sh\necho not a snapshot\n", "a shell script");
    with(
        &std::fs::read(POPEK).unwrap()[..1 << 16],
        "an ELF executable",
    );
    refused(&tmp("no-such.snap"), "a missing file");
    let o = popek(&["inspect", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    // The good one still resumes.
    let o = popek(&["resume", g]);
    let whole = popek(&["run", "hello"]);
    let mut both = a.stdout.clone();
    both.extend_from_slice(&o.stdout);
    assert_eq!(both, whole.stdout);
}

/// A snapshot that cannot be written leaves nothing behind and the old
/// file as it was; one that can replaces it whole (written under another
/// name, synced, renamed).
#[test]
fn a_snapshot_replaces_a_file_only_once_complete() {
    let file = tmp("atomic.snap");
    let f = file.to_str().unwrap();
    std::fs::write(&file, b"an older file").unwrap();
    let missing_dir = tmp("no-such-dir/x.snap");
    let o = popek(&[
        "run",
        "hello",
        "--suspend-at-insns",
        "1000",
        "--snapshot",
        missing_dir.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    let o = popek(&[
        "run",
        "hello",
        "--suspend-at-insns",
        "1000",
        "--snapshot",
        f,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::read(&file).unwrap().starts_with(b"POPEKSNP"));
    let dir = file.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Linux programs have host state popek cannot save: refused in one line.
#[test]
fn linux_programs_refuse_snapshots() {
    let file = tmp("user.snap");
    let o = popek(&[
        "run",
        "--suspend-at-insns",
        "1000",
        "--snapshot",
        file.to_str().unwrap(),
        "user-hello",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("bare-metal"), "{}", stderr(&o));
    assert!(!file.exists());
}

/// What cannot be suspended or monitored is refused in one line with
/// status 2: the trap engine, lockstep, a monitor that is not a Unix
/// socket, a diff with no base.
#[test]
fn what_cannot_be_snapshotted_is_refused() {
    let file = tmp("refused.snap");
    let f = file.to_str().unwrap();
    for args in [
        vec![
            "run",
            "hello",
            "--engine",
            "trap",
            "--suspend-at-insns",
            "10",
            "--snapshot",
            f,
        ],
        vec![
            "run",
            "hello",
            "--lockstep",
            "--suspend-at-insns",
            "10",
            "--snapshot",
            f,
        ],
        vec!["run", "hello", "--monitor", "tcp:127.0.0.1:4444"],
        vec![
            "run",
            "hello",
            "--suspend-at-insns",
            "10",
            "--snapshot",
            f,
            "--diff",
        ],
    ] {
        let o = popek(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o).lines().count(), 1, "{args:?}: {}", stderr(&o));
        assert!(!file.exists(), "{args:?}");
    }
}

/// A running popek with a monitor socket, its stdin a pipe.
struct Monitored {
    child: Child,
    socket: PathBuf,
    out: std::sync::mpsc::Receiver<Vec<u8>>,
    seen: Vec<u8>,
}

impl Monitored {
    fn start(args: &[&str], name: &str) -> Monitored {
        let socket = tmp(name);
        let spec = format!("unix:{}", socket.display());
        let mut child = Command::new(POPEK)
            .args(args)
            .args(["--monitor", &spec])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let (tx, out) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let start = Instant::now();
        while !socket.exists() {
            assert!(start.elapsed() < LIMIT, "no monitor socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Monitored {
            child,
            socket,
            out,
            seen: Vec::new(),
        }
    }

    /// Send one command through `popek monitor`; the answer's "return".
    fn command(&self, args: &[&str]) -> serde_json::Value {
        let o = popek(&[&["monitor", self.socket.to_str().unwrap()], args].concat());
        let answer: serde_json::Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", stderr(&o)));
        assert!(o.status.success(), "{args:?}: {answer}");
        answer["return"].clone()
    }

    /// Wait until the output holds `text`.
    fn wait_for(&mut self, text: &str) {
        let start = Instant::now();
        while !String::from_utf8_lossy(&self.seen).contains(text) {
            assert!(start.elapsed() < LIMIT, "no {text:?} in {:?}", self.seen);
            if let Ok(chunk) = self.out.recv_timeout(Duration::from_millis(50)) {
                self.seen.extend_from_slice(&chunk);
            }
        }
    }

    /// Close stdin and collect the rest of the output and the status.
    fn finish(mut self) -> (Vec<u8>, Option<i32>) {
        drop(self.child.stdin.take());
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(start.elapsed() < LIMIT, "popek did not end");
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(chunk) = self.out.recv_timeout(Duration::from_millis(500)) {
            self.seen.extend_from_slice(&chunk);
        }
        (self.seen, status.code())
    }
}

/// Resume `file` with `input` on stdin at once; all it printed.
fn resume_with_input(file: &Path, input: &[u8]) -> Vec<u8> {
    let mut c = Command::new(POPEK)
        .args(["resume", file.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(input).unwrap();
    c.wait_with_output().unwrap().stdout
}

/// The monitor: status, stop and cont, a snapshot of a running guest and a
/// diff on it, quit. Each snapshot resumes exactly: given the input the
/// original read after it, it prints what the original printed after it.
#[test]
fn the_monitor_snapshots_a_running_guest_exactly() {
    let mut m = Monitored::start(&["run", "clone"], "clone.sock");
    m.wait_for("ready\n");
    let s = m.command(&["query-status"]);
    assert_eq!(s["status"], "running", "{s}");
    let s = m.command(&["stop"]);
    assert_eq!(s["status"], "paused", "{s}");
    let paused_at = m.command(&["query-status"])["insns"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        m.command(&["query-status"])["insns"].as_u64().unwrap(),
        paused_at
    );
    let full = tmp("clone-full.snap");
    let r = m.command(&["snapshot", &format!("file={}", full.display())]);
    assert_eq!(r["kind"], "full", "{r}");
    let at_full = r["serial_bytes"].as_u64().unwrap() as usize;
    assert_eq!(m.command(&["cont"])["status"], "running");
    let stats = m.command(&["query-stats"]);
    assert!(stats["insns"].as_u64().unwrap() >= paused_at, "{stats}");
    // A line, then a diff snapshot of the guest between two lines.
    m.child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"first line\n")
        .unwrap();
    m.wait_for("FIRST LINE, checksum");
    m.wait_for("\n");
    let diff = tmp("clone-diff.snap");
    let r = m.command(&["snapshot", &format!("file={}", diff.display()), "diff=true"]);
    assert_eq!(r["kind"], "diff", "{r}");
    let at_diff = r["serial_bytes"].as_u64().unwrap() as usize;
    assert!(at_diff > at_full);
    m.child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"second line\n")
        .unwrap();
    m.wait_for("SECOND LINE, checksum");
    let unknown = popek(&["monitor", m.socket.to_str().unwrap(), "no-such-command"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stdout).contains("CommandNotFound"));
    m.command(&["quit"]);
    let (whole, status) = m.finish();
    assert_eq!(status, Some(0));
    let whole = String::from_utf8_lossy(&whole).into_owned();
    let done = |out: &[u8], from: usize| {
        // The original was ended by `quit`; the resumed one by a "quit"
        // line, which prints the final checksum.
        let out = String::from_utf8_lossy(out).into_owned();
        assert!(
            out.starts_with(&whole[from..]),
            "resumed:\n{out}\noriginal:\n{whole}"
        );
        assert!(
            out[whole.len() - from..].starts_with("clone: done"),
            "{out}"
        );
    };
    done(
        &resume_with_input(&full, b"first line\nsecond line\nquit\n"),
        at_full,
    );
    done(&resume_with_input(&diff, b"second line\nquit\n"), at_diff);
}

/// Clones: three machines resumed from one snapshot at once share its
/// pages through the host's page cache (each maps the file; the kernel
/// counts those pages as shared), and each goes its own way after, exactly
/// as a machine never suspended would given the same input.
#[test]
fn clones_share_the_snapshot_and_diverge() {
    let file = tmp("clone.snap");
    let mut m = Monitored::start(&["run", "clone"], "clone-src.sock");
    m.wait_for("ready\n");
    m.command(&["snapshot", &format!("file={}", file.display())]);
    m.command(&["quit"]);
    m.finish();
    let clones: Vec<Child> = (0..3)
        .map(|_| {
            Command::new(POPEK)
                .args(["resume", file.to_str().unwrap()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let canonical = file.canonicalize().unwrap();
    let start = Instant::now();
    loop {
        let shared: Vec<u64> = clones
            .iter()
            .map(|c| shared_clean_kb(c.id(), &canonical))
            .collect();
        if shared.iter().all(|&kb| kb > 0) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the snapshot's pages are not shared: {shared:?} kB"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for (i, mut c) in clones.into_iter().enumerate() {
        let input = format!("clone number {i}\nquit\n");
        c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let o = c.wait_with_output().unwrap();
        let got = String::from_utf8_lossy(&o.stdout).into_owned();
        let want =
            with_input_when_ready(Command::new(POPEK).args(["run", "clone"]), input.as_bytes());
        let want = String::from_utf8_lossy(&want).into_owned();
        let after_ready = &want[want.find("ready\n").unwrap() + 6..];
        assert_eq!(got, after_ready, "clone {i}");
        assert!(
            got.contains(&format!("CLONE NUMBER {i}")),
            "clone {i}: {got}"
        );
    }
}

/// Kilobytes of `file`'s pages that process `pid` maps and shares with
/// another process (Shared_Clean in /proc/PID/smaps).
fn shared_clean_kb(pid: u32, file: &Path) -> u64 {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return 0;
    };
    let mut inside = false;
    let mut total = 0;
    for line in smaps.lines() {
        // A mapping's header: "start-end perms offset dev inode [path]".
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.split('-').all(|h| u64::from_str_radix(h, 16).is_ok()) {
            inside = line.ends_with(file.to_str().unwrap());
        } else if let (true, Some(v)) = (inside, line.strip_prefix("Shared_Clean:")) {
            total += v
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
        }
    }
    total
}
