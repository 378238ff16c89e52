//! The monitor: a control channel for a running machine, in the spirit of
//! QEMU's QMP.
//!
//! `popek run GUEST --monitor unix:PATH` listens on a Unix socket. A client
//! gets one greeting line, then sends one JSON object per line,
//! `{"execute": "COMMAND", "arguments": {...}}`, and gets one line back:
//! `{"return": {...}}` or `{"error": {"class": ..., "desc": ...}}`.
//!
//! | command        | arguments                  | does                                   |
//! |----------------|----------------------------|----------------------------------------|
//! | `query-status` |                            | running or paused, instructions, EIP   |
//! | `query-stats`  |                            | instructions, translations, interrupts |
//! | `stop`         |                            | pause the guest (its clock stops too)  |
//! | `cont`         |                            | go on                                  |
//! | `snapshot`     | `file`, `diff` (bool)      | write a snapshot; the guest goes on    |
//! | `migrate`      | `uri` (tcp:HOST:PORT), `bandwidth` (bytes/s), `max_downtime` (ms) | live-migrate the guest to a `popek incoming` |
//! | `query-migrate`|                            | none, active, completed or failed      |
//! | `balloon`      | `value` (bytes)            | the guest's memory: both balloons' target |
//! | `query-balloon`|                            | the balloons, the host's RAM and RSS   |
//! | `quit`         |                            | end the run (exit status 0)            |
//!
//! Connections are served by threads of their own; each command goes to
//! the run loop over a channel and is carried out between two steps of the
//! engine, where the machine's state is exact (the same boundary an
//! instruction budget stops at), so a snapshot taken here resumes exactly.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};

use serde_json::{json, Value};

/// A command from a client, with where its answer goes.
pub struct Request {
    /// The command.
    pub execute: String,
    /// Its arguments (an object, or null).
    pub arguments: Value,
    /// Where the one-line answer goes, with a sender the connection
    /// signals on once the answer is written (so that a command that ends
    /// the run is answered before the process ends).
    pub reply: Sender<(Value, Sender<()>)>,
}

impl Request {
    /// Answer; with `wait`, until the client has been sent the answer
    /// (at most a second).
    pub fn answer(self, v: Value, wait: bool) {
        let (tx, rx) = channel();
        if self.reply.send((v, tx)).is_ok() && wait {
            let _ = rx.recv_timeout(std::time::Duration::from_secs(1));
        }
    }
}

/// The machine's end of the monitor.
pub struct Monitor {
    rx: Receiver<Request>,
    path: PathBuf,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `{"return": v}`.
pub fn ok(v: Value) -> Value {
    json!({ "return": v })
}

/// `{"error": {"class": class, "desc": desc}}`.
pub fn error(class: &str, desc: impl Into<String>) -> Value {
    json!({ "error": { "class": class, "desc": desc.into() } })
}

impl Monitor {
    /// Listen on `spec` (`unix:PATH`). A stale socket left at PATH by a
    /// run that ended is replaced; any other file there is an error.
    pub fn listen(spec: &str) -> Result<Monitor, String> {
        let Some(path) = spec.strip_prefix("unix:") else {
            return Err(format!(
                "--monitor {spec}: expected unix:PATH (a Unix socket to listen on)"
            ));
        };
        let path = PathBuf::from(path);
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(format!(
                    "--monitor {}: a file that is not a socket is in the way",
                    path.display()
                ));
            }
            let _ = std::fs::remove_file(&path);
        }
        let listener = UnixListener::bind(&path)
            .map_err(|e| format!("--monitor {}: cannot listen: {e}", path.display()))?;
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let tx = tx.clone();
                std::thread::spawn(move || serve(conn, tx));
            }
        });
        Ok(Monitor { rx, path })
    }

    /// A command waiting, if any (never blocks).
    pub fn try_next(&self) -> Option<Request> {
        self.rx.try_recv().ok()
    }

    /// The next command, waiting up to `wait` for it.
    pub fn next_within(&self, wait: std::time::Duration) -> Option<Request> {
        self.rx.recv_timeout(wait).ok()
    }
}

/// One client: a greeting, then a line in, a line out, until it hangs up.
fn serve(conn: UnixStream, tx: Sender<Request>) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let greeting = json!({
        "popek": { "version": env!("CARGO_PKG_VERSION") },
        "commands": ["query-status", "query-stats", "stop", "cont", "snapshot", "migrate", "query-migrate", "quit"],
    });
    if writeln!(out, "{greeting}").is_err() {
        return;
    }
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let answer = match serde_json::from_str::<Value>(&line) {
            Ok(v) => match v.get("execute").and_then(Value::as_str) {
                Some(cmd) => {
                    let (rtx, rrx) = channel();
                    let req = Request {
                        execute: cmd.to_string(),
                        arguments: v.get("arguments").cloned().unwrap_or(Value::Null),
                        reply: rtx,
                    };
                    if tx.send(req).is_err() {
                        error("GenericError", "the machine has ended")
                    } else {
                        match rrx.recv() {
                            Ok((v, written)) => {
                                let ok = writeln!(out, "{v}").is_ok();
                                let _ = written.send(());
                                if !ok {
                                    return;
                                }
                                continue;
                            }
                            Err(_) => error("GenericError", "the machine has ended"),
                        }
                    }
                }
                None => error("GenericError", "expected {\"execute\": COMMAND, ...}"),
            },
            Err(e) => error("GenericError", format!("not JSON: {e}")),
        };
        if writeln!(out, "{answer}").is_err() {
            return;
        }
    }
}

/// `popek monitor PATH COMMAND [KEY=VALUE...]`: send one command, print
/// the answer. Values that parse as JSON (numbers, true, false) are sent
/// as such, others as strings. Returns whether the answer was a return.
pub fn client(path: &Path, command: &str, args: &[String]) -> Result<Value, String> {
    let mut arguments = serde_json::Map::new();
    for a in args {
        let (k, v) = a
            .split_once('=')
            .ok_or_else(|| format!("argument {a:?}: expected KEY=VALUE"))?;
        let v = serde_json::from_str::<Value>(v).unwrap_or_else(|_| Value::String(v.into()));
        arguments.insert(k.to_string(), v);
    }
    let conn = UnixStream::connect(path)
        .map_err(|e| format!("cannot connect to the monitor at {}: {e}", path.display()))?;
    let mut out = conn
        .try_clone()
        .map_err(|e| format!("monitor connection: {e}"))?;
    let mut lines = BufReader::new(conn).lines();
    let _greeting = lines
        .next()
        .ok_or("the monitor closed the connection")?
        .map_err(|e| e.to_string())?;
    let req = json!({ "execute": command, "arguments": Value::Object(arguments) });
    writeln!(out, "{req}").map_err(|e| format!("monitor connection: {e}"))?;
    let answer = lines
        .next()
        .ok_or("the monitor closed the connection without an answer")?
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&answer).map_err(|e| format!("the monitor's answer is not JSON: {e}"))
}
