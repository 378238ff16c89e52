//! `popek host`: many guests in one process, their virtual CPUs scheduled
//! on M host threads with proportional shares.
//!
//! The scheduler is a weighted fair queue in the manner of Xen's credit
//! scheduler and ESX's shares: each guest accrues virtual time, its CPU
//! time divided by its weight; a free host thread takes the runnable guest
//! with the least virtual time and runs it for a slice
//! ([`popek_machine::Machine::run_slice`]). A halted guest gives its
//! thread back until its next device deadline and consumes nothing; when
//! it wakes, its virtual time is brought up to the least of the others'
//! (it cannot bank credit while asleep). One guest runs on one thread at a
//! time.
//!
//! Fairness is reported as each guest's share of the CPU time all guests
//! used while every one of them was still running, over its entitled share
//! (its weight over the sum of weights), and Jain's index over those
//! ratios, (Σx)² / (n Σx²): 1 is perfectly fair.

use std::io::Write;
use std::process::ExitCode;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use popek_machine::{Config, Exit, Machine, Slice};

use crate::run::load_image;

/// A scheduling slice.
const SLICE: Duration = Duration::from_millis(5);
/// Pages of a guest the page-sharing scan looks at after each of its
/// slices (a pass over 64 MiB takes 16 slices).
const SCAN_PAGES: usize = 1024;

/// Content-based page sharing across guests (`--dedup`, after
/// Waldspurger's ESX paper, OSDI 2002): after each slice, a scan hashes
/// the next pages of the guest that ran; a page whose contents are already
/// in the shared store (checked byte for byte, not only by hash) is backed
/// by the store's page, read-only and copy-on-write
/// ([`popek_memory::GuestRam::share_page`]), and its own memory freed; a
/// page seen for the second time in any guest goes into the store; a zero
/// page is just freed. Store pages are counted by the guest pages backed
/// by them; once every one has been written (copied back out: a
/// copy-on-write break, a balloon inflated over it), the store page is
/// freed and its slot reused. (A guest that ends keeps its references:
/// the report measures the store as the guests left it, and `popek host`
/// starts no guests later that could use the slots.)
struct Dedup {
    /// The store: one memfd of shared pages.
    store: std::fs::File,
    /// Store slots in use or free (the store file's size in pages).
    pages: u32,
    /// Store pages by content hash.
    by_hash: std::collections::HashMap<u32, Vec<u32>>,
    /// Pages seen once, by content hash.
    seen: std::collections::HashSet<u32>,
    zero_pages: u64,
    /// Guest pages backed by each store page, and each one's hash.
    refs: Vec<(u32, u32)>,
    /// Freed store slots.
    free: Vec<u32>,
    /// Store pages freed because no guest page was backed by them any more.
    reclaimed: u64,
}

impl Dedup {
    /// One guest page less is backed by store page `sp`.
    fn unref(&mut self, sp: u32) {
        let (n, h) = &mut self.refs[sp as usize];
        *n -= 1;
        if *n == 0 {
            let h = *h;
            if let Some(v) = self.by_hash.get_mut(&h) {
                v.retain(|&x| x != sp);
            }
            popek_memory::GuestRam::punch_page(&self.store, sp);
            self.free.push(sp);
            self.reclaimed += 1;
        }
    }

    /// Store pages in use.
    fn live(&self) -> u32 {
        self.pages - self.free.len() as u32
    }
}

/// A guest's scan position, its registration of the store, and its pages
/// backed by the store (guest page -> store page).
#[derive(Default)]
struct Scan {
    cursor: usize,
    store_index: Option<u32>,
    backed: std::collections::HashMap<u32, u32>,
}

/// One guest of `popek host`: `GUEST[,weight=W][,memory=SIZE][,balloon=SIZE][,out=FILE]
/// [,append=...][,initrd=FILE]`.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    /// The bundled guest or path.
    pub guest: String,
    /// Its name in reports (the guest, numbered if repeated).
    pub name: String,
    /// Its weight.
    pub weight: u32,
    /// Guest RAM.
    pub memory: u64,
    /// Where its serial output goes (None: stdout, each line prefixed).
    pub out: Option<String>,
    /// Kernel command line.
    pub append: String,
    /// A Linux kernel's initrd.
    pub initrd: Option<String>,
    /// The balloon's target at boot (bytes taken from the guest).
    pub balloon: Option<u64>,
}

/// Parse one SPEC. `append=` takes the rest of the SPEC (commas included).
pub(crate) fn parse_spec(s: &str) -> Result<Spec, String> {
    let (head, append) = match s.find(",append=") {
        Some(i) => (&s[..i], Some(s[i + 8..].to_string())),
        None => (s, None),
    };
    let mut parts = head.split(',');
    let guest = parts
        .next()
        .filter(|g| !g.is_empty())
        .ok_or("an empty guest")?;
    let mut spec = Spec {
        guest: guest.to_string(),
        name: guest.rsplit('/').next().unwrap_or(guest).to_string(),
        weight: 1,
        memory: popek_machine::DEFAULT_MEMORY,
        out: None,
        append: append.unwrap_or_default(),
        initrd: None,
        balloon: None,
    };
    for p in parts {
        match p.split_once('=') {
            Some(("weight", w)) => {
                spec.weight = w
                    .parse()
                    .ok()
                    .filter(|&w| w > 0)
                    .ok_or_else(|| format!("weight={w}: a positive integer"))?
            }
            Some(("memory", m)) => spec.memory = crate::parse_size(m)?,
            Some(("balloon", b)) => spec.balloon = Some(crate::parse_size(b)?),
            Some(("out", f)) => spec.out = Some(f.to_string()),
            Some(("initrd", f)) => spec.initrd = Some(f.to_string()),
            _ => {
                return Err(format!(
                    "{p:?}: expected weight=W, memory=SIZE, balloon=SIZE, out=FILE, initrd=FILE or append=..."
                ))
            }
        }
    }
    Ok(spec)
}

/// Bytes a guest sent to stdout, a line at a time, prefixed by its name.
struct Prefixed {
    name: String,
    line: Vec<u8>,
}

impl Write for Prefixed {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        for &c in b {
            if c == b'\n' {
                let mut o = std::io::stdout().lock();
                o.write_all(self.name.as_bytes())?;
                o.write_all(b": ")?;
                o.write_all(&self.line)?;
                o.write_all(b"\n")?;
                self.line.clear();
            } else {
                self.line.push(c);
            }
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

impl Drop for Prefixed {
    /// A last line without its newline is still the guest's.
    fn drop(&mut self) {
        if !self.line.is_empty() {
            let _ = self.write_all(b"\n");
        }
    }
}

/// A guest's place in the scheduler.
struct Slot {
    spec: Spec,
    /// The machine while it waits (None while a thread runs it, or once
    /// it has ended).
    machine: Option<Machine>,
    /// Its output, with the machine.
    out: Option<Box<dyn Write + Send>>,
    /// CPU time used / weight (ns).
    vtime: f64,
    /// CPU time used (ns).
    cpu_ns: u64,
    /// Halted until.
    wake_at: Option<Instant>,
    /// How it ended.
    exit: Option<Exit>,
    /// Instructions retired when it ended.
    insns: u64,
    /// Its page-sharing scan.
    scan: Scan,
    /// Its RAM's sharing figures when it ended: pages backed by the
    /// store, copy-on-write breaks, bytes of host memory its own RAM held.
    shared_at_end: (u64, u64, u64),
}

struct Shared {
    slots: Vec<Slot>,
    dedup: Option<Dedup>,
    /// CPU time of each guest when the first one ended (the window in
    /// which every guest was running).
    at_first_end: Option<Vec<u64>>,
    /// The monitor asked to end every guest.
    quit: bool,
}

/// `popek host`.
pub(crate) fn host(
    threads: usize,
    dedup: bool,
    specs: Vec<String>,
    stats_json: Option<String>,
    monitor: Option<String>,
) -> ExitCode {
    let monitor = match monitor.map(|m| popek_machine::monitor::Monitor::listen(&m)) {
        Some(Ok(m)) => Some(m),
        Some(Err(e)) => {
            eprintln!("popek: host: {e}");
            return ExitCode::from(2);
        }
        None => None,
    };
    let mut slots = Vec::new();
    for s in &specs {
        let spec = match parse_spec(s) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("popek: host: {s}: {e}");
                return ExitCode::from(2);
            }
        };
        match boot(&spec) {
            Ok((m, out)) => slots.push(Slot {
                spec,
                machine: Some(m),
                out: Some(out),
                vtime: 0.0,
                cpu_ns: 0,
                wake_at: None,
                exit: None,
                insns: 0,
                scan: Scan::default(),
                shared_at_end: (0, 0, 0),
            }),
            Err(e) => {
                eprintln!("popek: host: {}: {e}", spec.guest);
                return ExitCode::from(2);
            }
        }
    }
    // Repeated guests get numbered names: hello#1, hello#2.
    let names: Vec<String> = slots.iter().map(|s| s.spec.name.clone()).collect();
    for (i, s) in slots.iter_mut().enumerate() {
        if names.iter().filter(|n| **n == names[i]).count() > 1 {
            let k = names[..i].iter().filter(|n| **n == names[i]).count();
            s.spec.name = format!("{}#{}", names[i], k + 1);
        }
    }
    for s in &mut slots {
        if s.spec.out.is_none() {
            s.out = Some(Box::new(Prefixed {
                name: s.spec.name.clone(),
                line: Vec::new(),
            }));
        }
    }
    let dedup = if dedup {
        match popek_memory::GuestRam::anonymous_file() {
            Ok(store) => Some(Dedup {
                store,
                pages: 0,
                by_hash: Default::default(),
                seen: Default::default(),
                zero_pages: 0,
                refs: Vec::new(),
                free: Vec::new(),
                reclaimed: 0,
            }),
            Err(e) => {
                eprintln!("popek: host: --dedup: cannot create the shared store: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let shared = Arc::new((
        Mutex::new(Shared {
            slots,
            dedup,
            at_first_end: None,
            quit: false,
        }),
        Condvar::new(),
    ));
    let started = Instant::now();
    let workers: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let shared = shared.clone();
            std::thread::spawn(move || worker(&shared))
        })
        .collect();
    if let Some(mon) = monitor {
        let shared = shared.clone();
        std::thread::spawn(move || serve_monitor(&shared, &mon));
    }
    for w in workers {
        let _ = w.join();
    }
    let wall = started.elapsed();
    let (lock, _) = &*shared;
    let st = lock.lock().unwrap_or_else(|p| p.into_inner());
    let window: Vec<u64> = st
        .at_first_end
        .clone()
        .unwrap_or_else(|| st.slots.iter().map(|s| s.cpu_ns).collect());
    let total: u64 = window.iter().sum();
    let wsum: u32 = st.slots.iter().map(|s| s.spec.weight).sum();
    let mut ratios = Vec::new();
    let mut guests = Vec::new();
    let mut normal = true;
    for (s, &cpu) in st.slots.iter().zip(&window) {
        let share = cpu as f64 / total.max(1) as f64;
        let entitled = f64::from(s.spec.weight) / f64::from(wsum);
        ratios.push(share / entitled);
        let exit = s.exit.clone().unwrap_or(Exit::Quit);
        let ok = matches!(
            exit,
            Exit::DebugExit(_)
                | Exit::Halted { .. }
                | Exit::Reset
                | Exit::Exited(_)
                | Exit::MonitorQuit
        );
        normal &= ok;
        if let Some(msg) = exit.message().filter(|_| !ok) {
            eprintln!("popek: host: {}: {msg}", s.spec.name);
        }
        guests.push(serde_json::json!({
            "name": s.spec.name,
            "weight": s.spec.weight,
            "insns": s.insns,
            "cpu_ms": s.cpu_ns as f64 / 1e6,
            "cpu_share": share,
            "entitled_share": entitled,
            "share_ratio": share / entitled,
            "exit_status": exit.status(),
        }));
    }
    let sum: f64 = ratios.iter().sum();
    let sq: f64 = ratios.iter().map(|r| r * r).sum();
    let jain = sum * sum / (ratios.len() as f64 * sq).max(f64::MIN_POSITIVE);
    let mut report = serde_json::json!({
        "threads": threads,
        "wall_ms": wall.as_secs_f64() * 1e3,
        "fairness_jain": jain,
        "guests": guests,
    });
    // Host memory for guest RAM: each machine's own (measured as it
    // ended) and the shared store's.
    let store_bytes = st.dedup.as_ref().map_or(0, |d| {
        use std::os::unix::fs::MetadataExt;
        d.store.metadata().map_or(0, |m| m.blocks() * 512)
    });
    let own: u64 = st.slots.iter().map(|s| s.shared_at_end.2).sum();
    report["guest_ram_host_mib"] =
        serde_json::json!((own + store_bytes) as f64 / f64::from(1 << 20));
    if let Some(d) = &st.dedup {
        let guest_pages: u64 = st.slots.iter().map(|s| s.spec.memory / 4096).sum();
        report["dedup"] = serde_json::json!({
            "guest_pages": guest_pages,
            "shared_pages": st.slots.iter().map(|s| s.shared_at_end.0).sum::<u64>(),
            "zero_pages": d.zero_pages,
            "cow_breaks": st.slots.iter().map(|s| s.shared_at_end.1).sum::<u64>(),
            "store_pages": d.live(),
            "store_pages_reclaimed": d.reclaimed,
        });
    }
    match stats_json {
        Some(f) if f == "-" => eprintln!("{report}"),
        Some(f) => {
            if let Err(e) = std::fs::write(&f, format!("{report}\n")) {
                eprintln!("popek: host: cannot write {f}: {e}");
            }
        }
        None => {}
    }
    ExitCode::from(if normal { 0 } else { 1 })
}

/// Scan the next pages of `m` (which just ran) for sharing.
fn scan(d: &Mutex<Shared>, m: &mut Machine, scan: &mut Scan) {
    let pages = m.cpu.ram.maybe_nonzero_pages();
    if pages.is_empty() {
        return;
    }
    let mut st = d.lock().unwrap_or_else(|p| p.into_inner());
    let Some(dd) = st.dedup.as_mut() else { return };
    let index = match scan.store_index {
        Some(i) => i,
        None => match m.cpu.ram.register_backing(&dd.store) {
            Ok(i) => {
                scan.store_index = Some(i);
                i
            }
            Err(_) => return,
        },
    };
    use std::os::unix::fs::FileExt;
    // Pages written since they were shared no longer hold their store
    // page.
    let ram = &m.cpu.ram;
    let broken: Vec<u32> = scan
        .backed
        .iter()
        .filter(|(&p, _)| !ram.is_shared(p))
        .map(|(&p, _)| p)
        .collect();
    for p in broken {
        if let Some(sp) = scan.backed.remove(&p) {
            dd.unref(sp);
        }
    }
    for k in 0..SCAN_PAGES.min(pages.len()) {
        let p = pages[(scan.cursor + k) % pages.len()];
        // Shared already, or written after being shared.
        if m.cpu.ram.is_shared(p) || m.cpu.ram.was_copied(p) {
            continue;
        }
        let at = p as usize * 4096;
        let bytes: Vec<u8> = m.cpu.ram.as_slice()[at..at + 4096].to_vec();
        if bytes.iter().all(|&b| b == 0) {
            m.cpu.ram.release_page(p);
            dd.zero_pages += 1;
            continue;
        }
        let h = crc32fast_hash(&bytes);
        let mut found = None;
        for &sp in dd.by_hash.get(&h).map(Vec::as_slice).unwrap_or(&[]) {
            let mut other = vec![0u8; 4096];
            if dd
                .store
                .read_exact_at(&mut other, u64::from(sp) * 4096)
                .is_ok()
                && other == bytes
            {
                found = Some(sp);
                break;
            }
        }
        let sp = match found {
            Some(sp) => sp,
            None if dd.seen.contains(&h) => {
                // The second page with these contents: into the store.
                let sp = dd.free.pop().unwrap_or(dd.pages);
                if dd.store.write_all_at(&bytes, u64::from(sp) * 4096).is_err() {
                    if sp < dd.pages {
                        dd.free.push(sp);
                    }
                    continue;
                }
                if sp == dd.pages {
                    dd.pages += 1;
                    dd.refs.push((0, h));
                }
                dd.refs[sp as usize] = (0, h);
                dd.by_hash.entry(h).or_default().push(sp);
                sp
            }
            None => {
                dd.seen.insert(h);
                continue;
            }
        };
        if m.cpu.ram.share_page(p, index, sp).is_ok() && m.cpu.ram.is_shared(p) {
            dd.refs[sp as usize].0 += 1;
            scan.backed.insert(p, sp);
        } else if dd.refs[sp as usize].0 == 0 {
            // A new store page nobody took.
            dd.refs[sp as usize].0 = 1;
            dd.unref(sp);
        }
    }
    scan.cursor = (scan.cursor + SCAN_PAGES) % pages.len();
}

/// CRC-32 of a page, the sharing table's hash (contents are compared in
/// full before pages are shared).
fn crc32fast_hash(b: &[u8]) -> u32 {
    popek_machine::snapshot::crc32(b)
}

/// Boot one guest for the host: a Multiboot kernel or a Linux kernel.
fn boot(spec: &Spec) -> Result<(Machine, Box<dyn Write + Send>), String> {
    let (image, path) = load_image(&spec.guest)?;
    let bzimage = popek_machine::bzimage::is_bzimage(&image);
    if !bzimage && !crate::run::is_multiboot(&image) {
        return Err(
            "popek host runs bare-metal kernels (Multiboot, Linux), not Linux programs".into(),
        );
    }
    let config = Config {
        memory: spec.memory,
        cmdline: if bzimage {
            spec.append.clone()
        } else {
            format!("{path} {}", spec.append)
        },
        ..Config::default()
    };
    let initrd = spec
        .initrd
        .as_ref()
        .map(|f| std::fs::read(f).map_err(|e| format!("initrd {f}: {e}")))
        .transpose()?;
    let mut m = if bzimage {
        Machine::linux_kernel(&image, initrd.as_deref(), config)
    } else {
        Machine::multiboot(&image, config)
    }
    .map_err(|e| e.to_string())?;
    m.cooperative = true;
    if let Some(size) = spec.balloon {
        // As `popek run --balloon`: a virtio balloon on the PCI bus and the
        // paravirtual one, both asked for the same pages.
        let pages = (size.min(u64::from(m.cpu.ram.size())) / 4096) as u32;
        let mut b = popek_devices::virtio::VirtioBalloon::balloon();
        b.dev.num_pages = pages;
        m.cpu.board.balloon = Some(b);
        m.cpu.board.pv.set_target(pages);
    }
    let out: Box<dyn Write + Send> = match &spec.out {
        Some(f) => Box::new(std::fs::File::create(f).map_err(|e| format!("out={f}: {e}"))?),
        None => Box::new(std::io::sink()),
    };
    Ok((m, out))
}

/// The host's monitor (`--monitor unix:PATH`, the machine monitor's
/// protocol): `query-guests`; `query-dedup` (the shared store now); `quit`
/// (every guest ends at its next slice
/// boundary); and, with `guest=NAME`, a guest's own `query-status`,
/// `query-stats`, `balloon` and `query-balloon`, carried out between two of
/// its slices. Serves until every guest has ended.
fn serve_monitor(shared: &(Mutex<Shared>, Condvar), mon: &popek_machine::monitor::Monitor) {
    use popek_machine::monitor::{error, ok};
    use serde_json::json;
    let (lock, cv) = shared;
    loop {
        {
            let st = lock.lock().unwrap_or_else(|p| p.into_inner());
            if st.slots.iter().all(|s| s.exit.is_some()) {
                return;
            }
        }
        let Some(req) = mon.next_within(Duration::from_millis(100)) else {
            continue;
        };
        // `quit` ends the process once the guests end, and nothing waits
        // for this thread: the answer is written first, then the guests
        // are told.
        let quit = req.execute == "quit";
        let answer = match req.execute.as_str() {
            "query-guests" => {
                let st = lock.lock().unwrap_or_else(|p| p.into_inner());
                let guests: Vec<_> = st
                    .slots
                    .iter()
                    .map(|s| {
                        json!({
                            "name": s.spec.name,
                            "weight": s.spec.weight,
                            "status": match (&s.exit, s.wake_at) {
                                (Some(_), _) => "ended",
                                (None, Some(_)) => "halted",
                                (None, None) => "running",
                            },
                            "exit_status": s.exit.as_ref().map(|e| e.status()),
                            "cpu_ms": s.cpu_ns as f64 / 1e6,
                        })
                    })
                    .collect();
                ok(json!({ "guests": guests }))
            }
            "query-dedup" => {
                let st = lock.lock().unwrap_or_else(|p| p.into_inner());
                match &st.dedup {
                    Some(d) => ok(json!({
                        "store_pages": d.live(),
                        "store_pages_reclaimed": d.reclaimed,
                        "zero_pages": d.zero_pages,
                    })),
                    None => error("DeviceNotActive", "page sharing is off (run with --dedup)"),
                }
            }
            "quit" => ok(json!({})),
            cmd @ ("query-status" | "query-stats" | "balloon" | "query-balloon") => {
                match req.arguments.get("guest").and_then(|g| g.as_str()) {
                    None => error("GenericError", format!("{cmd} needs guest=NAME")),
                    Some(name) => guest_command(shared, name, cmd, &req.arguments),
                }
            }
            other => error(
                "CommandNotFound",
                format!("the command {other} has not been found"),
            ),
        };
        req.answer(answer, quit);
        if quit {
            lock.lock().unwrap_or_else(|p| p.into_inner()).quit = true;
            cv.notify_all();
        }
    }
}

/// A machine monitor command for the guest called `name`, once it is
/// between two slices (waiting up to 5 s for it).
fn guest_command(
    shared: &(Mutex<Shared>, Condvar),
    name: &str,
    cmd: &str,
    args: &serde_json::Value,
) -> serde_json::Value {
    use popek_machine::monitor::error;
    let (lock, cv) = shared;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
    let Some(i) = st.slots.iter().position(|s| s.spec.name == name) else {
        return error("DeviceNotFound", format!("no guest called {name}"));
    };
    loop {
        if st.slots[i].exit.is_some() {
            return error("DeviceNotActive", format!("{name} has ended"));
        }
        let s = &mut st.slots[i];
        if let Some(m) = s.machine.as_mut() {
            let (answer, _) = m.command(cmd, args);
            // A new balloon target raises the guest's interrupt line: a
            // halted guest wakes to take it.
            if cmd == "balloon" {
                s.wake_at = None;
                cv.notify_all();
            }
            return answer;
        }
        let now = Instant::now();
        if now >= deadline {
            return error(
                "GenericError",
                format!("{name} did not come off its thread"),
            );
        }
        st = cv
            .wait_timeout(st, deadline - now)
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
    }
}

/// A host thread: take the runnable guest with the least virtual time,
/// run it for a slice, put it back; until every guest has ended.
fn worker(shared: &(Mutex<Shared>, Condvar)) {
    let (lock, cv) = shared;
    loop {
        let picked = {
            let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if st.quit {
                    // The monitor's quit: every guest not running ends.
                    for s in &mut st.slots {
                        if let Some(m) = s.machine.take() {
                            s.insns = m.cpu.retired;
                            s.shared_at_end = (
                                m.cpu.ram.shared_pages(),
                                m.cpu.ram.copied_pages(),
                                m.cpu.ram.host_bytes(),
                            );
                            s.exit = Some(Exit::MonitorQuit);
                            if let Some(mut o) = s.out.take() {
                                let _ = o.flush();
                            }
                        }
                    }
                }
                if st.slots.iter().all(|s| s.exit.is_some()) {
                    cv.notify_all();
                    return;
                }
                let now = Instant::now();
                // Guests waking up cannot have banked credit while asleep.
                let floor = st
                    .slots
                    .iter()
                    .filter(|s| s.exit.is_none() && s.wake_at.is_none())
                    .map(|s| s.vtime)
                    .fold(f64::INFINITY, f64::min);
                for s in &mut st.slots {
                    if s.wake_at.is_some_and(|t| t <= now) {
                        s.wake_at = None;
                        if floor.is_finite() {
                            s.vtime = s.vtime.max(floor);
                        }
                    }
                }
                let best = st
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.machine.is_some() && s.wake_at.is_none())
                    .min_by(|a, b| a.1.vtime.total_cmp(&b.1.vtime))
                    .map(|(i, _)| i);
                if let Some(i) = best {
                    let s = &mut st.slots[i];
                    let m = s.machine.take().expect("filtered on is_some");
                    let out = s.out.take().expect("kept with the machine");
                    let sc = std::mem::take(&mut s.scan);
                    break (i, m, out, sc);
                }
                // Nothing runnable: wait for a wake time or a guest put back.
                let next = st.slots.iter().filter_map(|s| s.wake_at).min();
                let wait = next.map_or(Duration::from_millis(10), |t| {
                    t.saturating_duration_since(now)
                });
                st = cv
                    .wait_timeout(st, wait.min(Duration::from_millis(10)))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        };
        let (i, mut m, mut out, mut sc) = picked;
        let t0 = Instant::now();
        let r = m.run_slice(&mut out, SLICE);
        let dt = t0.elapsed().as_nanos() as u64;
        if !matches!(r, Slice::Ended(_)) {
            scan(lock, &mut m, &mut sc);
        }
        let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
        let s = &mut st.slots[i];
        s.scan = sc;
        s.cpu_ns += dt;
        s.vtime += dt as f64 / f64::from(s.spec.weight);
        match r {
            Slice::Ran => {
                s.machine = Some(m);
                s.out = Some(out);
            }
            Slice::Halted(t) => {
                s.wake_at = Some(t);
                s.machine = Some(m);
                s.out = Some(out);
            }
            Slice::Ended(e) => {
                let _ = out.flush();
                drop(out);
                s.insns = m.cpu.retired;
                s.shared_at_end = (
                    m.cpu.ram.shared_pages(),
                    m.cpu.ram.copied_pages(),
                    m.cpu.ram.host_bytes(),
                );
                s.exit = Some(e);
                if st.at_first_end.is_none() {
                    st.at_first_end = Some(st.slots.iter().map(|s| s.cpu_ns).collect());
                }
            }
        }
        cv.notify_all();
    }
}
