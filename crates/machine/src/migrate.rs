//! Live migration between two popek processes, over TCP.
//!
//! The steps are the seeds' (and Clark et al., NSDI 2005): the source
//! connects to the target and says who it is (`HELO`: magic, format
//! version; the target answers `WELC` or `FAIL`); it describes the machine
//! (`SETP`: RAM size, clock mode, command line) and the target creates it;
//! the source starts the dirty log and sends every page that may hold
//! anything (round 1), then, round after round, the pages the guest dirtied
//! during the previous round, while the guest keeps running between
//! batches. When a round leaves little enough to send (its pages at the
//! measured or configured bandwidth fit the maximum downtime), the source
//! freezes the guest, sends the last dirty pages and the machine's state
//! (`STAT`: the snapshot file's state sections, the same encoder) and
//! `DONE`; the target builds the machine, answers `STRT` and runs it; the
//! source ends once it has that answer. A guest that dirties memory faster
//! than it is sent is throttled (it runs a smaller share of the time), and
//! after [`MAX_ROUNDS`] stopped and copied; both are said.
//!
//! Every message is framed and checked: a tag, a length, the body and a
//! CRC-32 of the three. Anything wrong on either side (no target, a
//! version mismatch, garbage, a dropped connection) ends the migration
//! with one line; the source's guest goes on running where it was.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use popek_memory::{GuestRam, PAGE_SIZE};

use crate::snapshot;

/// The first bytes a source sends.
pub const MAGIC: &[u8; 8] = b"POPEKMIG";
/// Wire format major version: the other side must speak the same.
pub const MAJOR: u16 = 1;
/// Wire format minor version.
pub const MINOR: u16 = 0;
/// Pages per `PAGS` message.
const BATCH: usize = 256;
/// Host time one tick of the source may spend sending before the guest
/// runs again.
const TICK: Duration = Duration::from_millis(2);
/// Rounds before the source stops the guest and copies what is left.
pub const MAX_ROUNDS: u32 = 30;
/// The largest message body a side accepts.
const MAX_BODY: usize = 64 << 20;
/// How long either side waits for the other before it gives up.
const SILENCE: Duration = Duration::from_secs(30);
const PAGE: usize = PAGE_SIZE as usize;

/// How a migration is steered.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where the target listens (HOST:PORT).
    pub to: String,
    /// Bytes per second at most (None: as fast as the connection goes).
    pub bandwidth: Option<u64>,
    /// The longest the guest may stand still at the end.
    pub max_downtime: Duration,
}

/// Frame and send one message.
fn send(w: &mut impl Write, tag: &[u8; 4], body: &[u8]) -> std::io::Result<()> {
    let len = (body.len() as u32).to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(tag);
    crc.update(&len);
    crc.update(body);
    w.write_all(tag)?;
    w.write_all(&len)?;
    w.write_all(body)?;
    w.write_all(&crc.finalize().to_le_bytes())
}

/// Receive one framed message, checked.
fn recv(r: &mut impl Read) -> Result<([u8; 4], Vec<u8>), String> {
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "the other side hung up".to_string(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("the other side said nothing for {} s", SILENCE.as_secs())
        }
        _ => e.to_string(),
    };
    let mut head = [0u8; 8];
    r.read_exact(&mut head).map_err(io)?;
    let tag: [u8; 4] = head[..4].try_into().expect("4 bytes");
    let len = u32::from_le_bytes(head[4..].try_into().expect("4 bytes")) as usize;
    if !tag.iter().all(|b| b.is_ascii_uppercase()) {
        return Err("not a popek migration stream (bad message tag)".into());
    }
    if len > MAX_BODY {
        return Err(format!("a message of {len} bytes: damaged stream"));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(io)?;
    let mut crc = [0u8; 4];
    r.read_exact(&mut crc).map_err(io)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&head);
    h.update(&body);
    if h.finalize() != u32::from_le_bytes(crc) {
        return Err(format!(
            "the checksum of a {} message does not match: damaged stream",
            String::from_utf8_lossy(&tag)
        ));
    }
    Ok((tag, body))
}

/// A `PAGS` body: pages, each zero or with its bytes.
fn encode_pages(ram: &GuestRam, pages: &[u32]) -> Vec<u8> {
    let bytes = ram.as_slice();
    let mut b = Vec::with_capacity(4 + pages.len() * (5 + PAGE));
    b.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    for &p in pages {
        let data = &bytes[p as usize * PAGE..(p as usize + 1) * PAGE];
        b.extend_from_slice(&p.to_le_bytes());
        if snapshot::is_zero(data) {
            b.push(1);
        } else {
            b.push(0);
            b.extend_from_slice(data);
        }
    }
    b
}

/// What one round did, as the source reports it.
#[derive(Debug, Clone)]
pub struct Round {
    /// Its number, from 1.
    pub number: u32,
    /// Pages sent.
    pub pages: u64,
    /// Bytes sent.
    pub bytes: u64,
    /// Pages the guest dirtied while it ran.
    pub dirtied: u64,
    /// How long it took.
    pub duration: Duration,
}

/// What the source's side of a migration has to do next.
pub enum Tick {
    /// Go on running the guest.
    Continue,
    /// Stop the guest and copy the rest: these pages.
    Freeze(Vec<u32>),
}

/// The source's side of a migration in progress.
pub struct Outgoing {
    opts: Options,
    out: BufWriter<TcpStream>,
    input: BufReader<TcpStream>,
    peer: SocketAddr,
    /// The round's pages and how many are sent.
    list: Vec<u32>,
    next: usize,
    round: u32,
    round_start: Instant,
    round_bytes: u64,
    started: Instant,
    setup: Duration,
    last_tick: Instant,
    /// Percent of the time the guest is kept from running.
    throttle: u32,
    /// Rounds in a row that did not shrink.
    stalls: u32,
    /// The rounds so far.
    pub rounds: Vec<Round>,
    total_bytes: u64,
    total_pages: u64,
    memory: u64,
}

/// The source's report once the target runs the guest.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Where.
    pub peer: SocketAddr,
    /// From the start (connect) to the target's acknowledgement.
    pub total: Duration,
    /// From the freeze to the target's first instruction.
    pub downtime: Duration,
    /// From the start to the first page sent.
    pub setup: Duration,
    /// The live rounds and the stop-and-copy round.
    pub rounds: Vec<Round>,
    /// Bytes sent.
    pub bytes: u64,
    /// Guest RAM.
    pub memory: u64,
    /// Pages dirtied per second during the live rounds.
    pub dirty_rate: f64,
    /// The guest's share of time withheld at the end (percent).
    pub throttle: u32,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "migration to {} completed: total {:.1} ms, downtime {:.1} ms, setup {:.1} ms, \
             {} rounds, {:.1} MiB sent ({:.1}% of {} MiB RAM), dirty rate {:.0} pages/s{}",
            self.peer,
            self.total.as_secs_f64() * 1e3,
            self.downtime.as_secs_f64() * 1e3,
            self.setup.as_secs_f64() * 1e3,
            self.rounds.len(),
            self.bytes as f64 / (1 << 20) as f64,
            100.0 * self.bytes as f64 / self.memory as f64,
            self.memory >> 20,
            self.dirty_rate,
            if self.throttle > 0 {
                format!(", guest throttled by {}%", self.throttle)
            } else {
                String::new()
            }
        )
    }
}

impl Outgoing {
    /// Connect to the target, agree on the version, describe the machine,
    /// start the dirty log: the first round begins.
    pub fn start(m: &mut crate::Machine, opts: Options) -> Result<Outgoing, String> {
        let started = Instant::now();
        let addr = opts
            .to
            .to_socket_addrs()
            .map_err(|e| format!("{}: {e}", opts.to))?
            .next()
            .ok_or_else(|| format!("{}: no address", opts.to))?;
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        stream
            .set_read_timeout(Some(SILENCE))
            .map_err(|e| e.to_string())?;
        let mut out =
            BufWriter::with_capacity(1 << 20, stream.try_clone().map_err(|e| e.to_string())?);
        let mut input = BufReader::new(stream);
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&MAJOR.to_le_bytes());
        hello.extend_from_slice(&MINOR.to_le_bytes());
        send(&mut out, b"HELO", &hello)
            .and_then(|()| out.flush())
            .map_err(|e| format!("{addr}: {e}"))?;
        match recv(&mut input).map_err(|e| format!("{addr}: {e}"))? {
            (t, b) if &t == b"WELC" => {
                let major = b.get(..2).map(|v| u16::from_le_bytes([v[0], v[1]]));
                if major != Some(MAJOR) {
                    return Err(format!(
                        "{addr} speaks migration format {}, this popek {MAJOR}.x",
                        major.map_or("?".to_string(), |v| v.to_string())
                    ));
                }
            }
            (t, b) if &t == b"FAIL" => {
                return Err(format!("{addr} refused: {}", String::from_utf8_lossy(&b)))
            }
            (t, _) => {
                return Err(format!(
                    "{addr} answered {} instead of a welcome",
                    String::from_utf8_lossy(&t)
                ))
            }
        }
        let c = &m.cpu;
        let mut setup = Vec::new();
        setup.extend_from_slice(&u64::from(c.ram.size()).to_le_bytes());
        setup.push(u8::from(c.clock_counts_instructions));
        setup.extend_from_slice(m.config.cmdline.as_bytes());
        send(&mut out, b"SETP", &setup).map_err(|e| format!("{addr}: {e}"))?;
        // The dirty log is the migration's now: a diff snapshot could no
        // longer be taken against the machine's last snapshot.
        m.base = None;
        m.cpu.ram.start_dirty_log().map_err(|e| e.to_string())?;
        let list = m.cpu.ram.maybe_nonzero_pages();
        let now = Instant::now();
        Ok(Outgoing {
            memory: u64::from(m.cpu.ram.size()),
            opts,
            out,
            input,
            peer: addr,
            list,
            next: 0,
            round: 1,
            round_start: now,
            round_bytes: 0,
            started,
            setup: now - started,
            last_tick: now,
            throttle: 0,
            stalls: 0,
            rounds: Vec::new(),
            total_bytes: 0,
            total_pages: 0,
        })
    }

    /// Where the migration goes.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Send the next batch of the round (within the bandwidth), and at
    /// the end of a round decide: another round, or the freeze. Called by
    /// the run loop between steps of the guest; Err ends the migration.
    pub fn tick(&mut self, ram: &mut GuestRam) -> Result<Tick, String> {
        let now = Instant::now();
        if self.throttle > 0 {
            // The guest ran since the last tick; keep it from running for
            // the throttled share of the time.
            let ran = now - self.last_tick;
            std::thread::sleep(ran * self.throttle / (100 - self.throttle));
        }
        let now = Instant::now();
        self.last_tick = now;
        // Batches for up to TICK of host time (within the bandwidth), then
        // the guest runs again.
        while self.next < self.list.len() && now.elapsed() < TICK {
            let mut n = BATCH.min(self.list.len() - self.next);
            if let Some(bw) = self.opts.bandwidth {
                let allowed = (bw as f64 * self.round_start.elapsed().as_secs_f64()) as u64;
                let left = allowed.saturating_sub(self.round_bytes) as usize;
                n = n.min(left / (PAGE + 5));
            }
            if n == 0 {
                break;
            }
            let pages = &self.list[self.next..self.next + n];
            let body = encode_pages(ram, pages);
            send(&mut self.out, b"PAGS", &body).map_err(|e| e.to_string())?;
            self.round_bytes += body.len() as u64 + 12;
            self.next += n;
        }
        if self.next < self.list.len() {
            return Ok(Tick::Continue);
        }
        // The round is sent: what did the guest dirty meanwhile?
        self.out.flush().map_err(|e| e.to_string())?;
        let dirty = ram.dirty_pages();
        ram.start_dirty_log().map_err(|e| e.to_string())?;
        let duration = self.round_start.elapsed();
        let round = Round {
            number: self.round,
            pages: self.list.len() as u64,
            bytes: self.round_bytes,
            dirtied: dirty.len() as u64,
            duration,
        };
        eprintln!(
            "popek: migration round {}: {} pages sent ({:.1} MiB) in {:.1} ms; {} pages dirtied meanwhile",
            round.number,
            round.pages,
            round.bytes as f64 / (1 << 20) as f64,
            round.duration.as_secs_f64() * 1e3,
            round.dirtied
        );
        self.total_bytes += round.bytes;
        self.total_pages += round.pages;
        let rate = match self.opts.bandwidth {
            Some(bw) => bw as f64,
            None => round.bytes as f64 / duration.as_secs_f64().max(1e-6),
        };
        let left = dirty.len() as f64 * (PAGE + 5) as f64 / rate.max(1.0);
        let shrinking = round.dirtied < round.pages * 9 / 10;
        self.rounds.push(round);
        if left <= self.opts.max_downtime.as_secs_f64() {
            return Ok(Tick::Freeze(dirty));
        }
        if self.round >= MAX_ROUNDS {
            eprintln!(
                "popek: migration: {} pages still dirty after {MAX_ROUNDS} rounds: stopping the guest to copy them",
                dirty.len()
            );
            return Ok(Tick::Freeze(dirty));
        }
        self.stalls = if shrinking { 0 } else { self.stalls + 1 };
        if self.stalls >= 2 && self.throttle < 90 {
            self.throttle = (self.throttle + 20).min(90);
            self.stalls = 0;
            eprintln!(
                "popek: migration: the guest dirties memory as fast as it is sent: throttled to {}% of its time",
                100 - self.throttle
            );
        }
        self.list = dirty;
        self.next = 0;
        self.round += 1;
        self.round_start = Instant::now();
        self.round_bytes = 0;
        Ok(Tick::Continue)
    }

    /// The guest stands still: send the last pages and the state, wait
    /// for the target to start it. The source's guest must not run again
    /// once this succeeds.
    pub fn finish(mut self, m: &crate::Machine, pages: Vec<u32>) -> Result<Summary, String> {
        let frozen = Instant::now();
        let mut bytes = 0u64;
        for chunk in pages.chunks(BATCH) {
            let body = encode_pages(&m.cpu.ram, chunk);
            bytes += body.len() as u64 + 12;
            send(&mut self.out, b"PAGS", &body).map_err(|e| e.to_string())?;
        }
        let state = snapshot::encode_state(m, None);
        bytes += state.len() as u64 + 24;
        send(&mut self.out, b"STAT", &state).map_err(|e| e.to_string())?;
        send(&mut self.out, b"DONE", &[]).map_err(|e| e.to_string())?;
        self.out.flush().map_err(|e| e.to_string())?;
        match recv(&mut self.input)? {
            (t, _) if &t == b"STRT" => {}
            (t, b) if &t == b"FAIL" => {
                return Err(format!(
                    "the target failed: {}",
                    String::from_utf8_lossy(&b)
                ))
            }
            (t, _) => {
                return Err(format!(
                    "the target answered {} instead of starting",
                    String::from_utf8_lossy(&t)
                ))
            }
        }
        let done = Instant::now();
        let downtime = done - frozen;
        self.rounds.push(Round {
            number: self.round + 1,
            pages: pages.len() as u64,
            bytes,
            dirtied: 0,
            duration: downtime,
        });
        let live: Duration = self.rounds[..self.rounds.len() - 1]
            .iter()
            .map(|r| r.duration)
            .sum();
        let dirtied: u64 = self.rounds.iter().map(|r| r.dirtied).sum();
        Ok(Summary {
            peer: self.peer,
            total: done - self.started,
            downtime,
            setup: self.setup,
            bytes: self.total_bytes + bytes,
            memory: self.memory,
            dirty_rate: dirtied as f64 / live.as_secs_f64().max(1e-6),
            throttle: self.throttle,
            rounds: self.rounds,
        })
    }
}

/// The target's side: what arrived, ready to be started.
pub struct Incoming {
    /// The machine's state.
    pub state: snapshot::State,
    /// Its RAM.
    pub ram: GuestRam,
    /// The source.
    pub peer: SocketAddr,
    out: BufWriter<TcpStream>,
    /// Pages received (all rounds).
    pub pages: u64,
    /// Bytes received.
    pub bytes: u64,
}

/// The target's answer to the source, once the guest is about to run.
pub struct Starter {
    out: BufWriter<TcpStream>,
}

impl Incoming {
    /// The state and RAM to build the machine from, and what answers the
    /// source.
    pub fn split(self) -> (snapshot::State, GuestRam, Starter) {
        (self.state, self.ram, Starter { out: self.out })
    }
}

impl Starter {
    /// Tell the source the guest runs here now.
    pub fn started(mut self) -> Result<(), String> {
        send(&mut self.out, b"STRT", &[])
            .and_then(|()| self.out.flush())
            .map_err(|e| format!("cannot tell the source: {e}"))
    }
}

/// Listen on `listen` (HOST:PORT; port 0 picks one), say where with
/// `listening`, take one migration and receive it. Err: one line.
pub fn incoming(listen: &str, listening: impl FnOnce(SocketAddr)) -> Result<Incoming, String> {
    let listener =
        TcpListener::bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    listening(listener.local_addr().map_err(|e| e.to_string())?);
    let (stream, peer) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    drop(listener);
    let _ = stream.set_nodelay(true);
    stream
        .set_read_timeout(Some(SILENCE))
        .map_err(|e| e.to_string())?;
    let mut out = BufWriter::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut input = BufReader::with_capacity(1 << 20, stream);
    let fail = |out: &mut BufWriter<TcpStream>, why: String| {
        let _ = send(out, b"FAIL", why.as_bytes()).and_then(|()| out.flush());
        format!("migration from {peer}: {why}")
    };
    let (tag, hello) = recv(&mut input).map_err(|e| fail(&mut out, e))?;
    if &tag != b"HELO" || hello.len() < 12 || &hello[..8] != MAGIC {
        return Err(fail(&mut out, "not a popek migration stream".into()));
    }
    let major = u16::from_le_bytes([hello[8], hello[9]]);
    let minor = u16::from_le_bytes([hello[10], hello[11]]);
    if major != MAJOR {
        return Err(fail(
            &mut out,
            format!("the source speaks migration format {major}.{minor}, this popek {MAJOR}.x"),
        ));
    }
    let mut welcome = Vec::new();
    welcome.extend_from_slice(&MAJOR.to_le_bytes());
    welcome.extend_from_slice(&MINOR.to_le_bytes());
    send(&mut out, b"WELC", &welcome)
        .and_then(|()| out.flush())
        .map_err(|e| format!("migration from {peer}: {e}"))?;
    let (tag, setup) = recv(&mut input).map_err(|e| fail(&mut out, e))?;
    if &tag != b"SETP" || setup.len() < 9 {
        return Err(fail(&mut out, "no machine description".into()));
    }
    let memory = u64::from_le_bytes(setup[..8].try_into().expect("8 bytes"));
    let mut ram = GuestRam::new(memory).map_err(|e| fail(&mut out, e.to_string()))?;
    let pages = ram.size() / PAGE_SIZE;
    let (mut received, mut bytes) = (0u64, 0u64);
    loop {
        let (tag, body) = recv(&mut input).map_err(|e| {
            fail(
                &mut out,
                format!("{e} after {received} pages, before the machine was complete"),
            )
        })?;
        bytes += body.len() as u64 + 12;
        match &tag {
            b"PAGS" => {
                let mut at = 4;
                let count = body
                    .get(..4)
                    .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .unwrap_or(0);
                for _ in 0..count {
                    let Some(h) = body.get(at..at + 5) else {
                        return Err(fail(&mut out, "a cut page message".into()));
                    };
                    let p = u32::from_le_bytes(h[..4].try_into().expect("4 bytes"));
                    if p >= pages {
                        return Err(fail(&mut out, format!("page {p:#x} is beyond RAM")));
                    }
                    at += 5;
                    match h[4] {
                        1 => {
                            ram.zero(p * PAGE_SIZE, PAGE_SIZE);
                        }
                        0 => {
                            let Some(data) = body.get(at..at + PAGE) else {
                                return Err(fail(&mut out, "a cut page message".into()));
                            };
                            ram.load(p * PAGE_SIZE, data);
                            at += PAGE;
                        }
                        k => return Err(fail(&mut out, format!("a page of kind {k}"))),
                    }
                    received += 1;
                }
            }
            b"STAT" => {
                let state = snapshot::decode_state(&body).map_err(|e| fail(&mut out, e.0))?;
                if state.mach.memory != memory {
                    return Err(fail(&mut out, "the state's RAM size differs".into()));
                }
                let (tag, _) = recv(&mut input).map_err(|e| fail(&mut out, e))?;
                if &tag != b"DONE" {
                    return Err(fail(&mut out, "no end after the state".into()));
                }
                return Ok(Incoming {
                    state,
                    ram,
                    peer,
                    out,
                    pages: received,
                    bytes,
                });
            }
            t => {
                return Err(fail(
                    &mut out,
                    format!("an unexpected {} message", String::from_utf8_lossy(t)),
                ))
            }
        }
    }
}
