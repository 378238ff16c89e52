//! Live migration between two popek processes on loopback, with the run
//! that was never migrated as the oracle: the source's output followed by
//! the target's must be that run's output, and the target must end with
//! its status. Faults (no target, a target killed mid-way, a dropped
//! connection, a version mismatch, garbage) end the migration in one line
//! and the guest goes on where it was. Every test ends by itself.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{instructions, run_with_timeout};

const POPEK: &str = env!("CARGO_BIN_EXE_popek");
const LIMIT: Duration = Duration::from_secs(300);

fn popek(args: &[&str]) -> Output {
    run_with_timeout(Command::new(POPEK).args(args), LIMIT)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A `popek incoming` waiting on a free loopback port.
struct Target {
    child: Child,
    port: u16,
    err: std::sync::mpsc::Receiver<String>,
}

impl Target {
    fn start(extra: &[&str]) -> Target {
        let mut child = Command::new(POPEK)
            .args(["incoming", "--listen", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, err) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = err
            .recv_timeout(Duration::from_secs(60))
            .expect("popek incoming says where it listens");
        let port = first
            .rsplit(':')
            .next()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no port in {first:?}"));
        Target { child, port, err }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Wait for the target to end: its stdout, stderr and status.
    fn finish(mut self) -> (Vec<u8>, String, Option<i32>) {
        drop(self.child.stdin.take());
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > LIMIT {
                let _ = self.child.kill();
                panic!("the target did not end");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut out = Vec::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        let mut err = String::new();
        while let Ok(l) = self.err.recv_timeout(Duration::from_millis(200)) {
            err.push_str(&l);
            err.push('\n');
        }
        (out, err, status.code())
    }
}

/// Migrate `args` (a `popek run` on the instruction clock) at `at`
/// instructions with `extra` source options; the outputs and status must
/// be `whole`'s. Returns the source's stderr.
fn migrate(args: &[&str], at: u64, extra: &[&str], whole: &Output) -> String {
    let target = Target::start(&[]);
    let addr = target.addr();
    let at = at.to_string();
    let mut src_args = args.to_vec();
    src_args.extend(["--migrate-to", &addr, "--migrate-at-insns", &at]);
    src_args.extend(extra);
    let src = popek(&src_args);
    let (out, err, status) = target.finish();
    assert_eq!(
        src.status.code(),
        Some(0),
        "{args:?} source: {}",
        stderr(&src)
    );
    assert!(
        stderr(&src).contains("completed: total"),
        "{args:?} source: {}",
        stderr(&src)
    );
    let mut both = src.stdout.clone();
    both.extend_from_slice(&out);
    assert_eq!(
        String::from_utf8_lossy(&both),
        String::from_utf8_lossy(&whole.stdout),
        "{args:?} migrated at {at}; target: {err}"
    );
    assert_eq!(status, whole.status.code(), "{args:?}: target: {err}");
    stderr(&src)
}

/// Every bundled kernel, migrated half-way through its run (on the
/// instruction clock, so the halfway point and the output are the same
/// run to run), goes on on the target as if never moved.
#[test]
fn every_bundled_kernel_migrates_and_goes_on() {
    for g in popek_guests::GUESTS.iter().filter(|g| !g.linux) {
        let whole = popek(&["run", g.name, "--icount", "--stats-json"]);
        let total = instructions(&whole);
        migrate(&["run", g.name, "--icount"], total / 2, &[], &whole);
    }
}

/// A guest writing every page of 16 MiB over and over, migrated over a
/// slow link: round after round resends what it dirtied, it is throttled
/// when it outruns the link, and on the target every page holds the
/// counter it last wrote (a lost dirty page would show as a stale one).
#[test]
fn a_guest_that_keeps_dirtying_memory_arrives_whole() {
    let args = ["run", "dirty", "--append", "passes=40000", "--icount"];
    let whole = popek(&args);
    assert!(
        String::from_utf8_lossy(&whole.stdout).contains("every page held its counter"),
        "{}",
        String::from_utf8_lossy(&whole.stdout)
    );
    let err = migrate(
        &args,
        5_000_000,
        &[
            // (16 MiB take 200 ms, twice the downtime allowed: the dirty
            // set fits only once the guest dirties less than half its
            // pages in a round, which it does not until it is throttled,
            // even slowed down by a busy host.)
            "--migrate-bandwidth",
            "80M",
            "--migrate-max-downtime",
            "100",
        ],
        &whole,
    );
    let rounds = err
        .lines()
        .filter(|l| l.contains("migration round"))
        .count();
    assert!(rounds >= 3, "{err}");
    assert!(err.contains("throttled"), "{err}");
}

/// No target: the source says so and the guest ends as it would have.
#[test]
fn no_target_leaves_the_guest_running_here() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let whole = popek(&["run", "compute"]);
    let to = format!("127.0.0.1:{port}");
    let o = popek(&[
        "run",
        "compute",
        "--migrate-to",
        &to,
        "--migrate-at-insns",
        "1000",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&whole.stdout)
    );
    assert_eq!(o.status.code(), whole.status.code());
    assert!(stderr(&o).contains("failed"), "{}", stderr(&o));
    assert!(stderr(&o).contains("goes on here"), "{}", stderr(&o));
}

/// The target killed mid-migration: the source's guest goes on to its
/// normal end.
#[test]
fn a_target_killed_midway_leaves_the_guest_running_here() {
    let args = ["run", "dirty", "--append", "passes=100000"];
    let whole = popek(&args);
    let mut target = Target::start(&[]);
    let addr = target.addr();
    let mut src = Command::new(POPEK)
        .args(args)
        .args(["--migrate-to", &addr, "--migrate-at-insns", "5000000"])
        .args(["--migrate-bandwidth", "20M"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = src.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        out.read_to_end(&mut v).unwrap();
        v
    });
    // Kill the target once the first round is through.
    let mut err = String::new();
    let mut lines = BufReader::new(src.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        err.push_str(&line);
        err.push('\n');
        if line.contains("migration round 1:") {
            break;
        }
    }
    target.child.kill().unwrap();
    target.child.wait().unwrap();
    for line in lines {
        err.push_str(&line.unwrap());
        err.push('\n');
    }
    let status = src.wait().unwrap();
    let got = reader.join().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&whole.stdout),
        "{err}"
    );
    assert_eq!(status.code(), whole.status.code());
    assert!(
        err.contains("failed") && err.contains("goes on here"),
        "{err}"
    );
}

/// Frame a message as the wire format does.
fn frame(tag: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut m = tag.to_vec();
    m.extend_from_slice(&(body.len() as u32).to_le_bytes());
    m.extend_from_slice(body);
    let crc = crc32fast::hash(&m);
    m.extend_from_slice(&crc.to_le_bytes());
    m
}

/// A fake target that does `act` with the source's connection; the
/// source must fail the migration in one line and its guest go on.
fn against_fake_target(act: impl FnOnce(TcpStream) + Send + 'static, why: &str) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = listener.local_addr().unwrap().to_string();
    let fake = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        act(conn);
    });
    let whole = popek(&["run", "hello"]);
    let o = popek(&["run", "hello", "--migrate-to", &to]);
    fake.join().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&whole.stdout),
        "{why}"
    );
    assert_eq!(o.status.code(), whole.status.code(), "{why}");
    let err = stderr(&o);
    // Round reports, then one line saying it failed.
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.contains("failed") && last.contains("goes on here"),
        "{why}: {err}"
    );
    assert!(
        err.lines()
            .rev()
            .skip(1)
            .all(|l| l.contains("migration round")),
        "{why}: {err}"
    );
}

#[test]
fn a_dropped_connection_or_another_version_fails_the_migration_only() {
    against_fake_target(drop, "the target hangs up at once");
    against_fake_target(
        |mut c| {
            let mut hello = [0u8; 32];
            let _ = c.read(&mut hello);
            let mut v = 9u16.to_le_bytes().to_vec();
            v.extend_from_slice(&0u16.to_le_bytes());
            c.write_all(&frame(b"WELC", &v)).unwrap();
        },
        "the target speaks version 9",
    );
    against_fake_target(
        |mut c| {
            let mut hello = [0u8; 32];
            let _ = c.read(&mut hello);
            c.write_all(b"HTTP/1.0 400 Bad Request\r\n\r\n").unwrap();
        },
        "the target answers garbage",
    );
    against_fake_target(
        |mut c| {
            let mut hello = [0u8; 32];
            let _ = c.read(&mut hello);
            c.write_all(&frame(b"WELC", &[1, 0, 0, 0])).unwrap();
            // Take part of the pages, then drop the connection.
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
        },
        "the target drops the connection mid-way",
    );
}

/// The target refuses what is not a migration, or another version, in
/// one line with status 2.
#[test]
fn the_target_refuses_garbage_and_other_versions() {
    let send = |bytes: Vec<u8>, why: &str, want: &str| {
        let t = Target::start(&[]);
        let mut c = TcpStream::connect(t.addr()).unwrap();
        c.write_all(&bytes).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let (out, err, status) = t.finish();
        assert_eq!(status, Some(2), "{why}: {err}");
        assert!(out.is_empty(), "{why}");
        let last = err.lines().last().unwrap_or("");
        assert!(last.contains(want), "{why}: {err}");
    };
    send(
        b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        "HTTP",
        "not a popek migration",
    );
    let mut hello = b"POPEKMIG".to_vec();
    hello.extend_from_slice(&9u16.to_le_bytes());
    hello.extend_from_slice(&0u16.to_le_bytes());
    send(frame(b"HELO", &hello), "version 9", "format 9.0");
    let mut hello = b"POPEKMIG".to_vec();
    hello.extend_from_slice(&1u16.to_le_bytes());
    hello.extend_from_slice(&0u16.to_le_bytes());
    let mut m = frame(b"HELO", &hello);
    m.extend_from_slice(&frame(b"SETP", &{
        let mut s = (64u64 << 20).to_le_bytes().to_vec();
        s.push(0);
        s
    }));
    send(m, "a source that hangs up", "hung up");
}

/// The monitor's migrate command moves a running guest; the target goes
/// on reading the serial line.
#[test]
fn the_monitor_migrates_a_running_guest() {
    let target = Target::start(&[]);
    let sock = std::env::temp_dir().join(format!("popek-migrate-{}.sock", std::process::id()));
    let spec = format!("unix:{}", sock.display());
    let mut src = Command::new(POPEK)
        .args(["run", "clone", "--monitor", &spec])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = src.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("ready\n") {
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "the source ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    let status = popek(&["monitor", sock.to_str().unwrap(), "query-migrate"]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("\"none\""));
    let uri = format!("uri=tcp:{}", target.addr());
    let o = popek(&["monitor", sock.to_str().unwrap(), "migrate", &uri]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("active"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let s = src.wait().unwrap();
    assert_eq!(s.code(), Some(0));
    let mut t = target;
    t.child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"moved\nquit\n")
        .unwrap();
    let (tout, err, status) = t.finish();
    let tout = String::from_utf8_lossy(&tout);
    assert!(tout.contains("line 1: MOVED"), "{tout} {err}");
    assert!(tout.contains("clone: done"), "{tout}");
    assert_eq!(status, Some(1));
}
