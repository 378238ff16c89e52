//! Differential testing of popek against the host CPU.
//!
//! The host is an x86 that runs 32-bit code natively, so the silicon is the
//! oracle. Each case ([`gen`]) becomes a static i386 ELF ([`elf`]) that
//! loads an initial state, runs a random instruction sequence and writes
//! its final state to stdout. The same file runs as a child process and
//! under popek; registers, EFLAGS (less the flags the SDM leaves undefined
//! at the end of the sequence), memory and the x87 state (less the
//! instruction and operand pointers) must match.

#![forbid(unsafe_code)]

pub mod elf;
pub mod gen;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use gen::{Case, SCRATCH};
use popek_machine::{Config, Exit, Machine};

/// Which popek engines run the case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// The reference interpreter.
    Interp,
    /// The binary translator.
    Bt,
    /// Both, each compared with the native run.
    Both,
}

impl Engine {
    fn machine_engines(self) -> &'static [popek_machine::Engine] {
        match self {
            Engine::Interp => &[popek_machine::Engine::Interp],
            Engine::Bt => &[popek_machine::Engine::Bt],
            Engine::Both => &[popek_machine::Engine::Interp, popek_machine::Engine::Bt],
        }
    }
}

/// What a run printed (the dump) and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// stdout.
    pub dump: Vec<u8>,
    /// Exit status, or 128 + signal.
    pub status: i32,
}

/// Run the ELF natively as a child process.
pub fn run_native(path: &Path) -> std::io::Result<Outcome> {
    use std::os::unix::process::ExitStatusExt;
    let out = Command::new(path).output()?;
    let status = out
        .status
        .code()
        .unwrap_or_else(|| 128 + out.status.signal().unwrap_or(0));
    Ok(Outcome {
        dump: out.stdout,
        status,
    })
}

/// Run the ELF under popek, in this process.
pub fn run_popek(image: &[u8], engine: popek_machine::Engine) -> Outcome {
    let config = Config {
        max_insns: Some(1_000_000),
        engine,
        ..Config::default()
    };
    let mut m = match Machine::linux(image, &["case".to_string()], config) {
        Ok(m) => m,
        Err(e) => {
            return Outcome {
                dump: format!("load error: {e}").into_bytes(),
                status: -1,
            };
        }
    };
    let mut out = Vec::new();
    let mut err = Vec::new();
    let exit = m.run_with(&mut out, &mut err);
    if let Exit::Signal(f) = &exit {
        // What the case's signal handler would have written.
        return Outcome {
            dump: signal_dump(f),
            status: 0,
        };
    }
    if let Some(msg) = exit.message() {
        let _ = writeln!(out, "\npopek: {msg}");
    }
    let status = match exit {
        Exit::Exited(s) => s,
        other => other.status(),
    };
    Outcome { dump: out, status }
}

/// The signal number and i386 sigcontext a handler sees for a fatal
/// exception under popek (the layout [`elf::SIGNAL_DUMP_LEN`] describes).
pub fn signal_dump(f: &popek_machine::linux::Fatal) -> Vec<u8> {
    use popek_machine::linux::{USER_CS, USER_DS};
    let r = f.regs;
    let ds = u32::from(USER_DS);
    let words = [
        f.signo as u32,
        0,  // gs
        0,  // fs
        ds, // es
        ds, // ds
        r[7],
        r[6],
        r[5],
        r[4],
        r[3],
        r[2],
        r[1],
        r[0],
        u32::from(f.exception.vector),
        f.exception.error.unwrap_or(0),
        f.eip,
        u32::from(USER_CS),
        f.eflags,
        r[4],
        ds,
    ];
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// The final state a dump holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// EAX..EDI.
    pub regs: [u32; 8],
    /// EFLAGS.
    pub eflags: u32,
    /// Scratch and stack memory.
    pub memory: Vec<u8>,
    /// The FNSAVE image ([`elf::FPU_LEN`] bytes).
    pub fpu: Vec<u8>,
}

/// Parse a dump (None if it is not a complete one).
pub fn parse(dump: &[u8]) -> Option<State> {
    if dump.len() != elf::DUMP_LEN as usize {
        return None;
    }
    let mem_len = (SCRATCH + elf::STACK) as usize;
    let word = |i: usize| {
        let o = mem_len + 4 * i;
        u32::from_le_bytes(dump[o..o + 4].try_into().unwrap())
    };
    let mut regs = [0u32; 8];
    for (i, r) in regs.iter_mut().enumerate() {
        *r = word(i);
    }
    let fpu = mem_len + 4 * elf::OUT_WORDS as usize;
    Some(State {
        regs,
        eflags: word(8),
        memory: dump[..mem_len].to_vec(),
        fpu: dump[fpu..].to_vec(),
    })
}

/// EFLAGS bits compared: the arithmetic flags, TF, IF, DF.
const FLAGS_COMPARED: u32 = 0xFD5;

/// Compare native and popek; None if they agree, else a description.
pub fn compare(case: &Case, native: &Outcome, popek: &Outcome) -> Option<String> {
    if native.status != popek.status {
        return Some(format!(
            "exit status: native {} popek {} ({})",
            native.status,
            popek.status,
            String::from_utf8_lossy(&popek.dump)
                .lines()
                .last()
                .unwrap_or("")
        ));
    }
    if native.status != 0 {
        // Both died the same way without reaching the handler.
        return None;
    }
    if native.dump.len() == elf::SIGNAL_DUMP_LEN as usize
        || popek.dump.len() == elf::SIGNAL_DUMP_LEN as usize
    {
        return compare_signal(case, &native.dump, &popek.dump);
    }
    let (Some(n), Some(p)) = (parse(&native.dump), parse(&popek.dump)) else {
        return Some(format!(
            "incomplete dump: native {} bytes, popek {} bytes: {}",
            native.dump.len(),
            popek.dump.len(),
            String::from_utf8_lossy(&popek.dump)
                .lines()
                .last()
                .unwrap_or("")
        ));
    };
    let mut diffs = Vec::new();
    const NAMES: [&str; 8] = ["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi"];
    for ((name, a), b) in NAMES.iter().zip(n.regs).zip(p.regs) {
        if a != b {
            diffs.push(format!("{name}: native {a:#010x} popek {b:#010x}"));
        }
    }
    let mask = FLAGS_COMPARED & !gen::undefined_at_end(case);
    if (n.eflags ^ p.eflags) & mask != 0 {
        diffs.push(format!(
            "eflags: native {:#06x} popek {:#06x} (compared bits {mask:#06x})",
            n.eflags & mask,
            p.eflags & mask
        ));
    }
    diffs.extend(compare_fpu(&n.fpu, &p.fpu));
    if let Some(i) = (0..n.memory.len()).find(|&i| n.memory[i] != p.memory[i]) {
        let region = if i < SCRATCH as usize {
            "scratch"
        } else {
            "stack"
        };
        diffs.push(format!(
            "memory ({region}) first differs at offset {i:#x}: native {:#04x} popek {:#04x}",
            n.memory[i], p.memory[i]
        ));
    }
    (!diffs.is_empty()).then(|| diffs.join("; "))
}

/// Compare two FNSAVE images: the control, status and tag words (their low
/// 16 bits; the upper halves are reserved) and the eight registers. FIP,
/// FCS, FOP, FDP and FDS are left out: under popek they hold host
/// addresses (docs/quirks.md).
fn compare_fpu(n: &[u8], p: &[u8]) -> Vec<String> {
    let hex = |b: &[u8]| {
        b.iter()
            .rev()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    };
    let mut fields = vec![("fcw", 0, 2), ("fsw", 4, 2), ("ftw", 8, 2)];
    const ST: [&str; 8] = ["st0", "st1", "st2", "st3", "st4", "st5", "st6", "st7"];
    fields.extend(
        ST.iter()
            .enumerate()
            .map(|(i, name)| (*name, 28 + 10 * i, 10)),
    );
    fields
        .into_iter()
        .filter(|&(_, at, len)| n[at..at + len] != p[at..at + len])
        .map(|(name, at, len)| {
            format!(
                "{name}: native {} popek {}",
                hex(&n[at..at + len]),
                hex(&p[at..at + len])
            )
        })
        .collect()
}

/// Compare two signal dumps: signal, trap number, error code, EIP, the
/// general registers, segment selectors and the defined flags.
fn compare_signal(case: &Case, native: &[u8], popek: &[u8]) -> Option<String> {
    const FIELDS: [&str; 20] = [
        "signal",
        "gs",
        "fs",
        "es",
        "ds",
        "edi",
        "esi",
        "ebp",
        "esp",
        "ebx",
        "edx",
        "ecx",
        "eax",
        "trapno",
        "err",
        "eip",
        "cs",
        "eflags",
        "esp_at_signal",
        "ss",
    ];
    if native.len() != popek.len() {
        return Some(format!(
            "native {} popek {}",
            describe(native),
            describe(popek)
        ));
    }
    let word = |d: &[u8], i: usize| u32::from_le_bytes(d[4 * i..4 * i + 4].try_into().unwrap());
    let mask = FLAGS_COMPARED & !gen::undefined_at_end(case);
    let diffs: Vec<String> = FIELDS
        .iter()
        .enumerate()
        .filter_map(|(i, name)| {
            let (a, b) = (word(native, i), word(popek, i));
            let differ = if *name == "eflags" {
                (a ^ b) & mask != 0
            } else {
                a != b
            };
            differ.then(|| format!("{name}: native {a:#x} popek {b:#x}"))
        })
        .collect();
    (!diffs.is_empty()).then(|| diffs.join("; "))
}

fn describe(dump: &[u8]) -> String {
    if dump.len() == elf::SIGNAL_DUMP_LEN as usize {
        let w = |i: usize| u32::from_le_bytes(dump[4 * i..4 * i + 4].try_into().unwrap());
        format!("signal {} (trap {}) at eip {:#x}", w(0), w(13), w(15))
    } else {
        format!(
            "{} bytes: {}",
            dump.len(),
            String::from_utf8_lossy(dump).lines().last().unwrap_or("")
        )
    }
}

/// Run one case natively and under popek's `engine`(s); None if they
/// agree, else the first divergence (naming the engine).
pub fn check(case: &Case, dir: &Path, engine: Engine) -> Result<Option<String>, String> {
    let image = elf::elf(case);
    let native = run_image_natively(&image, dir)?;
    for &e in engine.machine_engines() {
        let popek = run_popek(&image, e);
        if let Some(why) = compare(case, &native, &popek) {
            return Ok(Some(format!("[{}] {why}", format!("{e:?}").to_lowercase())));
        }
    }
    Ok(None)
}

/// Write an ELF image into `dir` (one file per thread) and run it natively.
pub fn run_image_natively(image: &[u8], dir: &Path) -> Result<Outcome, String> {
    let name = format!("case-{:?}", std::thread::current().id()).replace(['(', ')'], "");
    let path = dir.join(name);
    write_executable(&path, image).map_err(|e| format!("cannot write {path:?}: {e}"))?;
    // Another thread's fork may briefly hold the file open for writing
    // (ETXTBSY); try again.
    let mut tries = 0;
    loop {
        match run_native(&path) {
            Err(e) if e.raw_os_error() == Some(26) && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            r => break r.map_err(|e| format!("cannot run {path:?}: {e}")),
        }
    }
}

fn write_executable(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // A fresh file each time: replacing avoids ETXTBSY from a previous exec.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, path)
}

/// Shrink a failing case: drop whole groups, then single instructions of
/// a group where the rest still decodes as intended, while it still fails.
pub fn shrink(case: &Case, dir: &Path, engine: Engine) -> Case {
    let mut best = case.clone();
    let mut i = 0;
    while i < best.groups.len() {
        let mut trial = best.clone();
        trial.groups.remove(i);
        match check(&trial, dir, engine) {
            Ok(Some(_)) => best = trial,
            _ => i += 1,
        }
    }
    best
}

/// A failing case as a ready-to-paste corpus entry with its disassembly.
pub fn report(case: &Case, why: &str) -> String {
    use iced_x86::Formatter;
    let mut fmt = iced_x86::IntelFormatter::new();
    let mut s = format!("# divergence: {why}\n");
    let mut ip = elf::sequence_start(case);
    for b in case.insns() {
        let mut ins = gen::decode(b);
        ins.set_ip32(ip);
        let mut text = String::new();
        fmt.format(&ins, &mut text);
        let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
        s.push_str(&format!("#   {:<30} {}\n", hex.join(" "), text));
        ip += b.len() as u32;
    }
    s.push_str(&corpus_line(case));
    s
}

/// One corpus line: `regs=... flags=... scratch=... insns=g1a,g1b;g2a`
/// (instructions in hex, `,` within a group, `;` between groups).
pub fn corpus_line(case: &Case) -> String {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let regs: Vec<String> = case.regs.iter().map(|r| format!("{r:08x}")).collect();
    let groups: Vec<String> = case
        .groups
        .iter()
        .map(|g| g.iter().map(|b| hex(b)).collect::<Vec<_>>().join(","))
        .collect();
    format!(
        "regs={} flags={:04x} scratch={} insns={}\n",
        regs.join(","),
        case.flags,
        hex(&case.scratch),
        groups.join(";")
    )
}

/// Parse a corpus line written by [`corpus_line`].
pub fn parse_corpus_line(line: &str) -> Option<Case> {
    let mut regs = [0u32; 8];
    let mut flags = 0;
    let mut scratch = Vec::new();
    let mut groups = Vec::new();
    for field in line.split_whitespace() {
        let (k, v) = field.split_once('=')?;
        match k {
            "regs" => {
                for (i, r) in v.split(',').enumerate() {
                    *regs.get_mut(i)? = u32::from_str_radix(r, 16).ok()?;
                }
            }
            "flags" => flags = u32::from_str_radix(v, 16).ok()?,
            "scratch" => scratch = hex_bytes(v)?,
            "insns" => {
                groups = v
                    .split(';')
                    .map(|g| g.split(',').map(hex_bytes).collect::<Option<Vec<_>>>())
                    .collect::<Option<Vec<_>>>()?
            }
            _ => return None,
        }
    }
    (scratch.len() == SCRATCH as usize).then_some(Case {
        regs,
        flags,
        scratch,
        groups,
    })
}

fn hex_bytes(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
