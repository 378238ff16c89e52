//! The command line: errors are one clear line and a nonzero status, never
//! a panic; the classification table and guest listing are readable.

use std::process::Command;

const POPEK: &str = env!("CARGO_BIN_EXE_popek");

fn popek(args: &[&str]) -> std::process::Output {
    Command::new(POPEK).args(args).output().expect("run popek")
}

fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("popek-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn one_line_error(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.lines().count(), 1, "expected one line, got: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn missing_file_is_an_error() {
    let out = popek(&["run", "/nonexistent/kernel.elf"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(one_line_error(&out).contains("cannot read guest"));
}

#[test]
fn non_multiboot_file_is_an_error() {
    let p = temp_file("garbage.bin", &[0x55; 4096]);
    let out = popek(&["run", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(one_line_error(&out).contains("no Multiboot header"));
}

#[test]
fn truncated_elf_is_an_error() {
    let elf = popek_guests::find("hello").unwrap().elf;
    // keep the Multiboot header (at 0x1000) but cut the ELF short of its segment data
    let p = temp_file("truncated.elf", &elf[..0x1010.min(elf.len())]);
    let mut bad = elf[..0x1010].to_vec();
    bad[4] = 2; // ELFCLASS64: not an ELF32
    let q = temp_file("class64.elf", &bad);
    for f in [p, q] {
        let out = popek(&["run", f.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{f:?}");
        let e = one_line_error(&out);
        assert!(
            e.contains("malformed guest image") || e.contains("ELF"),
            "{e}"
        );
    }
}

#[test]
fn kernel_that_does_not_fit_in_memory_is_an_error() {
    let out = popek(&["run", "hello", "--memory", "512K"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(one_line_error(&out).contains("does not fit"));
}

#[test]
fn budget_ends_a_runaway_guest() {
    let out = popek(&["run", "compute", "--max-insns", "10000"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(one_line_error(&out).contains("budget exhausted after 10000 instructions"));
}

#[test]
fn classify_table_marks_the_popek_goldberg_breakers() {
    let out = popek(&["classify"]);
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    let row = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row {name}"))
            .to_string()
    };
    assert!(row("Popf ").contains("sensitive") && row("Popf ").contains("SILENT"));
    assert!(row("Sgdt ").contains("SILENT"));
    assert!(row("Cli ").contains("privileged") && row("Cli ").contains("traps"));
    assert!(row("MovToCr ").contains("privileged"));
}

#[test]
fn classify_a_guest_finds_its_special_instructions() {
    let out = popek(&["classify", "popf"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8_lossy(&out.stdout);
    for kind in [
        "[Cli]", "[Sti]", "[Lgdt]", "[Lidt]", "[Ltr]", "[Out]", "[In]",
    ] {
        assert!(s.contains(kind), "no {kind} in:\n{s}");
    }
    // The sensitive ones that do not trap are marked, with what they do
    // under --engine trap.
    for kind in ["[Popf, violates", "[Pushf, violates", "[Iret, violates"] {
        assert!(s.contains(kind), "no {kind} in:\n{s}");
    }
}

#[test]
fn guests_are_listed_and_help_has_examples() {
    let out = popek(&["guests"]);
    let s = String::from_utf8_lossy(&out.stdout);
    for g in ["hello", "popf", "exceptions", "selfcheck", "compute"] {
        assert!(s.lines().any(|l| l.starts_with(g)), "{g} missing");
    }
    let help = popek(&["--help"]);
    assert!(String::from_utf8_lossy(&help.stdout).contains("Examples:"));
}

#[test]
fn append_reaches_the_multiboot_command_line() {
    // hello does not print its command line; the memory map does, so check
    // the structure through the popek library directly instead.
    let m = popek_machine::Machine::multiboot(
        popek_guests::find("hello").unwrap().elf,
        popek_machine::Config {
            cmdline: "hello debug=1".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let mbi = m.cpu.regs[popek_vcpu_reg_ebx()] as usize;
    let ram = m.cpu.ram.as_slice();
    let flags = u32::from_le_bytes(ram[mbi..mbi + 4].try_into().unwrap());
    assert_eq!(flags & 4, 4);
    let cmd = u32::from_le_bytes(ram[mbi + 16..mbi + 20].try_into().unwrap()) as usize;
    assert_eq!(&ram[cmd..cmd + 14], b"hello debug=1\0");
}

fn popek_vcpu_reg_ebx() -> usize {
    3
}

#[test]
fn dump_shows_guest_and_host_code_of_each_block() {
    let dir = std::env::temp_dir().join(format!("popek-dump-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("blocks.txt");
    let arg = format!("--dump={}", file.display());
    let out = popek(&["run", "hello", "--engine", "bt", &arg]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = std::fs::read_to_string(&file).unwrap();
    assert!(dump.contains("== block 0x"), "{dump}");
    assert!(dump.contains("copied"));
    assert!(dump.contains("innocuous"));
    // the host code is disassembled, with addresses named: an unchained
    // exit stores the next EIP and jumps to the shared epilogue
    assert!(dump.contains("jmp epilogue"), "{dump}");
    // OUT to the UART is special: it ends translated code
    assert!(dump.contains("not translated: ends the block"));
    let interp = popek(&["run", "hello", "--engine", "interp", "--dump"]);
    assert_eq!(interp.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&interp.stderr).contains("--engine bt"));
}

#[test]
fn stats_json_is_one_object_with_the_counters() {
    let out = popek(&["run", "compute", "--engine", "bt", "--stats-json"]);
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().last().unwrap();
    assert!(line.starts_with('{') && line.ends_with('}'), "{line}");
    for key in [
        "guest_instructions",
        "cache_hits",
        "chained_transfers",
        "interpreter_fallbacks",
        "translation_ns",
        "indirect_lookups",
        "indirect_hits",
        "exits_unchained",
        "translation_share",
        "special_out",
    ] {
        assert!(
            line.contains(&format!("\"{key}\": ")),
            "{key} missing: {line}"
        );
    }
    // guest_instructions is the compute guest's count under the interpreter too
    let interp = popek(&["run", "compute", "--engine", "interp", "--stats-json"]);
    let il = String::from_utf8_lossy(&interp.stderr)
        .lines()
        .last()
        .unwrap()
        .to_string();
    let count = |l: &str| {
        l.split("\"guest_instructions\": ")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .trim_end_matches('}')
            .to_string()
    };
    assert_eq!(count(line), count(&il));
}

#[test]
fn lockstep_runs_both_engines_and_they_agree() {
    // exceptions: paging, #PF, #GP, #DF, INT/IRET, I/O. popf: PUSHF, POPF,
    // CLI and STI in translated code at ring 0 (on the virtual flags) and
    // on the helper at ring 3, POPF setting TF. nano reads the TSC around
    // every measurement (under lockstep the TSC counts instructions, so
    // both machines must read the same values, helper calls included).
    // sensitive, segments and triplefault: system state and a stop.
    // preempt and timers: timer, RTC and UART interrupts, delivered at the
    // same boundaries on both machines (lockstep runs both on the
    // instruction clock; timers found a stale interrupt shadow in bt).
    // ptchurn and preempt-paging: page-table churn, copy-on-write, a clock
    // and a swap (their #PFs push EFLAGS with flags a shift left
    // undefined: a resync, not a divergence).
    for guest in [
        "exceptions",
        "popf",
        "nano",
        "sensitive",
        "segments",
        "triplefault",
        "preempt",
        "timers",
        "paging",
        "ptchurn",
        "preempt-paging",
        "codedata",
        "pv",
    ] {
        let normal = popek(&["run", guest]);
        let out = popek(&["run", guest, "--lockstep"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), normal.status.code(), "{guest}: {err}");
        if guest != "nano" {
            // (nano prints timings: host time normally, instructions here.)
            assert_eq!(out.stdout, normal.stdout, "{guest}");
        }
        assert!(err.contains("bt and interp agreed on"), "{guest}: {err}");
    }
}

#[test]
fn bt_is_the_default_engine() {
    let out = popek(&["run", "hello", "--stats"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("blocks translated"), "{err}");
}

/// A C program built here: `gcc -m32` with the given flags.
fn c_program(name: &str, src: &str, flags: &[&str]) -> std::path::PathBuf {
    let c = temp_file(&format!("{name}.c"), src.as_bytes());
    let exe = c.with_extension("");
    let out = Command::new("gcc")
        .args(["-m32", "-O2", "-o"])
        .arg(&exe)
        .arg(&c)
        .args(flags)
        .output()
        .expect("gcc");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

const HELLO_C: &str = r#"#include <stdio.h>
int main(int argc, char **argv) { printf("hi %s %d\n", argv[argc - 1], argc); return argc; }
"#;

#[test]
fn dynamically_linked_programs_run_through_their_interpreter() {
    // The host's i386 ld-linux.so.2 and libc (gcc-multilib), a PIE.
    let exe = c_program("dynamic", HELLO_C, &[]);
    let p = exe.to_str().unwrap();
    let native = Command::new(p).args(["a", "b"]).output().unwrap();
    for engine in ["bt", "interp"] {
        let out = popek(&["run", "--engine", engine, p, "a", "b"]);
        assert_eq!(out.stdout, native.stdout, "{engine}");
        assert_eq!(out.status.code(), native.status.code(), "{engine}");
    }
    // -L: the interpreter and the libraries it opens under a sysroot.
    let root = std::env::temp_dir().join(format!("popek-sysroot-{}", std::process::id()));
    std::fs::create_dir_all(root.join("lib")).unwrap();
    std::fs::copy("/lib/ld-linux.so.2", root.join("lib/ld-linux.so.2")).unwrap();
    let out = popek(&["run", "-L", root.to_str().unwrap(), p, "c"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi c 2\n");
    // An interpreter that does not exist: one line, status 2.
    let bad = c_program(
        "badinterp",
        HELLO_C,
        &["-Wl,--dynamic-linker=/nonexistent/ld.so"],
    );
    let out = popek(&["run", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(one_line_error(&out).contains("/nonexistent/ld.so"));
}

#[test]
fn native_engine_and_compare_agree_with_the_host() {
    let exe = c_program("static", HELLO_C, &["-static"]);
    let p = exe.to_str().unwrap();
    let native = Command::new(p).arg("x").output().unwrap();
    for engine in ["native", "bt", "interp"] {
        let out = popek(&["run", "--engine", engine, p, "x"]);
        assert_eq!(out.stdout, native.stdout, "{engine}");
        assert_eq!(out.status.code(), native.status.code(), "{engine}");
    }
    let out = popek(&["compare", "--interp", p, "x"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert_eq!(text.matches("identical to native").count(), 2, "{text}");
    assert!(text.contains("blocks translated"), "{text}");
}

#[test]
fn strace_prints_each_system_call_and_its_result() {
    let exe = c_program("strace", HELLO_C, &["-static"]);
    let out = popek(&["run", "--strace", exe.to_str().unwrap(), "y"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("set_thread_area("), "{err}");
    assert!(err.contains("write(1, \"hi y 2\\n\", 7) = 7"), "{err}");
    assert!(err.contains("exit_group(2) = 0"), "{err}");
    assert!(
        err.contains("rseq(") && err.contains("= -1 ENOSYS"),
        "{err}"
    );
}

#[test]
fn unknown_system_calls_return_enosys_and_are_named_once() {
    let exe = c_program(
        "unknown",
        r#"#include <stdio.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <errno.h>
int main(void) { long a = syscall(0x1ff), b = syscall(0x1ff); printf("%ld %ld %d\n", a, b, errno); return 0; }
"#,
        &["-static"],
    );
    let out = popek(&["run", exe.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "-1 -1 38\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("unknown system call 511").count(), 1, "{err}");
}

#[test]
fn lockstep_runs_a_glibc_program_with_the_same_random_bytes() {
    // glibc mangles pointers with AT_RANDOM's bytes at startup: the two
    // machines of --lockstep must draw the same ones.
    let exe = c_program("lockstep", HELLO_C, &["-static"]);
    let p = exe.to_str().unwrap();
    let out = popek(&["run", "--lockstep", p, "z"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bt and interp agreed on"), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi z 2\n");
    assert_eq!(out.status.code(), Some(2));
}

/// The `--stats-json` line a run printed last on stderr.
fn stats_json_line(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    err.lines().last().unwrap_or_default().to_string()
}

/// One counter of a `--stats-json` line.
fn stats_json_value(line: &str, key: &str) -> u64 {
    line.split(&format!("\"{key}\": "))
        .nth(1)
        .and_then(|v| v.split([',', '}']).next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{key} missing: {line}"))
}

/// A write to a page table drops only the shadow pages (and translations)
/// derived from it, as a TLB entry would go, not the whole shadow:
/// user-hello's munmap and mprotect change some entries while the rest of
/// its address space stays mapped, and its output stays the native one
/// (crates/cli/tests/guests.rs).
#[test]
fn page_table_writes_drop_only_what_they_affect() {
    let out = popek(&["run", "--engine", "bt", "--stats-json", "user-hello"]);
    assert_eq!(out.status.code(), Some(0));
    let line = stats_json_line(&out);
    let get = |k: &str| stats_json_value(&line, k);
    assert!(get("page_table_writes") >= 1, "{line}");
    let (mapped, unmapped) = (get("shadow_pages_filled"), get("shadow_pages_unmapped"));
    assert!(unmapped >= 1 && unmapped < mapped, "{line}");
    assert_eq!(get("code_buffer_flushes"), 0, "{line}");
}

/// The paging guest switches among its processes' address spaces 1,200
/// times: each switch goes back to a shadow address space kept from
/// before, and translations survive (keyed by physical page), so there is
/// far less to translate than guest instructions executed in them; the
/// output stays QEMU's (crates/cli/tests/guests.rs).
#[test]
fn address_space_switches_keep_shadows_and_translations() {
    let out = popek(&["run", "--engine", "bt", "--stats-json", "paging"]);
    assert_eq!(out.status.code(), Some(1));
    let line = stats_json_line(&out);
    let get = |k: &str| stats_json_value(&line, k);
    let switches = get("mapping_switches");
    assert!(switches >= 1200, "{line}");
    // 9 processes, each with a user and a supervisor view: every other
    // switch finds its space kept.
    assert!(get("shadow_spaces_created") <= 32, "{line}");
    assert!(get("shadow_spaces_reused") >= switches, "{line}");
    // Programs A and B, the kernel: a few thousand blocks, not one set
    // per switch.
    assert!(get("blocks_translated") < 10_000, "{line}");
    assert_eq!(get("code_buffer_flushes"), 0, "{line}");
    assert!(get("mapping_invalidations") >= 1, "{line}");
    // The processes' code regions map differently in every space: after a
    // few links into them are cut, jumps into them go through the
    // indirect-branch table, so links are not cut and made again at every
    // switch (the output, QEMU's, says the jumps land right).
    assert!(get("volatile_regions") >= 1, "{line}");
    assert!(get("links_cut") < switches / 4, "{line}");
    // The guest's own page faults (copy-on-write, demand-zero, swap-ins:
    // the counts it prints) against the hidden ones popek handled itself.
    let printed: u64 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("copy-on-write ").nth(1))
        .map(|rest| {
            rest.split(", ")
                .map(|f| f.split(' ').next_back().unwrap().parse::<u64>().unwrap())
                .sum::<u64>()
        })
        .sum();
    assert_eq!(get("guest_page_faults"), printed, "{line}");
    assert!(get("shadow_pages_mapped") > 0, "{line}");
    // Adaptive binary translation: the kernel's stores into page tables
    // become helper calls, so far fewer page-table writes are host faults
    // than there are page-table writes (every hidden page fault is one
    // fault too).
    assert!(get("hot_stores") >= 1, "{line}");
    let faults = get("faults_in_translated_code");
    let hidden = get("shadow_pages_mapped");
    assert!(faults - hidden < get("page_table_writes") / 2, "{line}");
}

/// The page-table patterns of the ptchurn guest (its output is QEMU's:
/// guests.rs) cost popek few host faults: an entry rewritten and its page
/// touched at once, kmap-style windows and a clock clearing accessed bits
/// leave the accesses to helper calls instead of a fault per round (17,604
/// and 8,725 faults before those kept counting as faults host code would
/// take); demand-zero faults are retried on the interpreter instead of
/// faulting twice (1,014); 64 address spaces round robin are all kept
/// (with 32 kept, every switch made a space anew: 4,003 of them).
#[test]
fn page_table_patterns_take_few_host_faults() {
    let stats = |test: &str| {
        let out = popek(&[
            "run",
            "--engine",
            "bt",
            "--stats-json",
            "--append",
            test,
            "ptchurn",
        ]);
        assert_eq!(out.status.code(), Some(1), "{test}");
        (
            stats_json_line(&out),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    for (test, rounds) in [("test=1", 20_000), ("test=3", 1_000), ("test=4", 10_000)] {
        let (line, out) = stats(test);
        assert!(out.contains(&format!("{rounds} rounds")), "{out}");
        let faults = stats_json_value(&line, "faults_in_translated_code");
        assert!(faults < rounds / 10, "{test}: {line}");
        assert!(stats_json_value(&line, "hot_stores") >= 1, "{test}: {line}");
    }
    let (line, out) = stats("test=6");
    let get = |k: &str| stats_json_value(&line, k);
    assert!(out.contains("page faults 12800"), "{out}");
    assert_eq!(get("guest_page_faults"), 12_800, "{line}");
    assert!(get("faults_in_translated_code") < 1_000, "{line}");
    let (line, _) = stats("test=2");
    let get = |k: &str| stats_json_value(&line, k);
    assert!(get("mapping_switches") >= 4_000, "{line}");
    assert!(get("shadow_spaces_created") < 100, "{line}");
}

/// With paging on, stores beside translated code still go through host
/// code once their regions open (checked stores through the shadow's
/// page-delta table), and the output is the same as with paging off.
#[test]
fn checked_stores_work_with_paging_on() {
    let paged = popek(&["run", "--engine", "bt", "--stats-json", "codedata-paged"]);
    let plain = popek(&["run", "--engine", "bt", "codedata"]);
    assert_eq!(paged.status.code(), Some(1));
    assert_eq!(paged.stdout, plain.stdout);
    let line = stats_json_line(&paged);
    let get = |k: &str| stats_json_value(&line, k);
    assert!(get("fast_regions") >= 1, "{line}");
    // Far fewer stores left to the interpreter than the guest makes
    // beside its code (a few per round, 250 rounds of 256 values).
    assert!(get("interpreter_fallbacks") < 20_000, "{line}");
}

/// Stores to data that shares pages with translated code invalidate
/// nothing (only writes that overlap translated bytes do), and the stores
/// that keep hitting such pages stop faulting, and then store in host code
/// where no code is near: codedata's checks keep a
/// result table and counters among their own code and patch two functions
/// while they run (the output is QEMU's: crates/cli/tests/guests.rs).
#[test]
fn data_beside_code_invalidates_only_what_it_overwrites() {
    let out = popek(&["run", "--engine", "bt", "--stats-json", "codedata"]);
    assert_eq!(out.status.code(), Some(1));
    let line = stats_json_line(&out);
    let get = |k: &str| stats_json_value(&line, k);
    // Every round stores ~520 words beside code and patches one function.
    assert!(get("code_writes_missed") >= 1, "{line}");
    assert!(get("code_writes_hit") >= 250, "{line}");
    // A page's worth of blocks per patch would be thousands per round.
    assert!(get("blocks_translated") < 20 * 250, "{line}");
    assert!(get("hot_stores") >= 1, "{line}");
    assert!(get("faults_in_translated_code") < 1000, "{line}");
    // Those stores then check the fast-write map in host code: ~520 per
    // round would be 130,000 helper calls.
    assert!(get("fast_regions") >= 1, "{line}");
    assert!(get("interpreter_fallbacks") < 20_000, "{line}");
}

/// `popek initramfs` as GNU cpio reads it back: busybox, /init, the
/// console node, files added under new directories with their permission
/// bits; a malformed `--add` is an error.
#[test]
fn initramfs_holds_what_was_asked_for() {
    let bb = temp_file("fake-busybox", b"\x7fELF not really");
    let init = temp_file("my-init", b"#!/bin/sh\necho hi\n");
    let tool = temp_file("tool.sh", b"#!/bin/sh\n");
    std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();
    let out = bb.with_file_name("rd.cpio");
    let arg = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let add = format!("usr/local/bin/tool={}", arg(&tool));
    let o = popek(&[
        "initramfs",
        &arg(&out),
        "--busybox",
        &arg(&bb),
        "--init",
        &arg(&init),
        "--add",
        &add,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dir = out.with_file_name("rd-unpacked");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // (Without root, cpio cannot make the console node and says so: only
    // the files are looked at here, the node in the listing below.)
    Command::new("cpio")
        .args(["-i", "-d", "--quiet", "--no-absolute-filenames"])
        .current_dir(&dir)
        .stdin(std::fs::File::open(&out).unwrap())
        .output()
        .expect("cpio (the README's test command installs it)");
    assert_eq!(
        std::fs::read(dir.join("init")).unwrap(),
        std::fs::read(&init).unwrap()
    );
    assert_eq!(
        std::fs::read(dir.join("bin/busybox")).unwrap(),
        std::fs::read(&bb).unwrap()
    );
    let t = dir.join("usr/local/bin/tool");
    assert_eq!(std::fs::read(&t).unwrap(), b"#!/bin/sh\n");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&t).unwrap().permissions().mode() & 0o777,
        0o750
    );
    let list = Command::new("cpio")
        .arg("-t")
        .stdin(std::fs::File::open(&out).unwrap())
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&list.stdout);
    for n in ["dev/console", "usr/local", "usr/local/bin", "proc", "tmp"] {
        assert!(names.lines().any(|l| l == n), "{n} missing from:\n{names}");
    }
    let bad = popek(&[
        "initramfs",
        &arg(&out),
        "--busybox",
        &arg(&bb),
        "--add",
        "nothing",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("DEST=SRC"));
}

/// A drive that cannot be used is refused in one line, before the guest
/// runs: a missing image, an unreadable one, another format, a typo.
#[test]
fn a_bad_drive_is_an_error_in_one_line() {
    let dir = std::env::temp_dir().join(format!("popek-drive-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = format!("file={}", dir.join("missing.img").display());
    let is_dir = format!("file={}", dir.display());
    for spec in [
        missing.as_str(),
        is_dir.as_str(),
        "file=x.img,format=qcow2",
        "file=x.img,if=ide",
        "path=x.img",
        "format=raw",
    ] {
        let out = popek(&["run", "hello", "--drive", spec]);
        assert_eq!(out.status.code(), Some(2), "{spec}");
        assert!(out.stdout.is_empty(), "{spec}: the guest must not run");
        let err = one_line_error(&out);
        assert!(err.contains("--drive"), "{spec}: {err}");
    }
}

/// `popek img`: an overlay over a base reads as the base, refuses to
/// replace a file, flattens to a raw copy; a damaged overlay or a missing
/// base is refused in one line when a guest would use it.
#[test]
fn img_creates_overlays_and_flattens_them() {
    let dir = std::env::temp_dir().join(format!("popek-img-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let base: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 253) as u8).collect();
    std::fs::write(dir.join("base.img"), &base).unwrap();
    let p = |s: &str| dir.join(s).to_str().unwrap().to_string();
    let o = popek(&["img", "create", "--backing", "base.img", &p("g.pcow")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = popek(&["img", "info", &p("g.pcow")]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("pcow, 200000 bytes"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = popek(&["img", "create", "--backing", "base.img", &p("g.pcow")]);
    assert_eq!(o.status.code(), Some(2), "an existing file is not replaced");
    assert!(popek(&["img", "convert", &p("g.pcow"), &p("flat.img")])
        .status
        .success());
    assert_eq!(std::fs::read(dir.join("flat.img")).unwrap(), base);
    // A missing base, a damaged overlay: one line, status 2.
    std::fs::rename(dir.join("base.img"), dir.join("moved.img")).unwrap();
    let out = popek(&["run", "hello", "--drive", &format!("file={}", p("g.pcow"))]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        one_line_error(&out).contains("base"),
        "{}",
        one_line_error(&out)
    );
    let mut bytes = std::fs::read(dir.join("g.pcow")).unwrap();
    bytes[8] = 7;
    std::fs::write(dir.join("bad.pcow"), &bytes).unwrap();
    let out = popek(&[
        "run",
        "hello",
        "--drive",
        &format!("file={}", p("bad.pcow")),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        one_line_error(&out).contains("version 7"),
        "{}",
        one_line_error(&out)
    );
}

/// A process that maps page 0 and keeps using it: its shadow cannot stay
/// at host address 0 (the host never maps page 0 there), so it moves to a
/// window anywhere at the first such use, and its accesses there stop
/// faulting in the host; the results are the program's own arithmetic.
#[test]
fn a_process_using_page_zero_moves_its_shadow_once() {
    // (The pointer goes through a volatile variable: a compiler may treat
    // a use of one it knows to be null as unreachable.)
    let src = r#"#include <sys/mman.h>
static int *volatile where;
int main(void) {
    void *m = mmap(0, 8192, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    if (m == MAP_FAILED) return 1;
    where = m;
    volatile int *p = where;
    for (int i = 1000; i > 0; i--) { p[4] += i; p[1028] += 3; }
    return (p[4] + p[1028]) & 0xff; /* (500500 + 3000) & 0xff */
}
"#;
    let exe = c_program("page0", src, &["-static"]);
    let out = popek(&["run", "--stats-json", exe.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(204));
    let line = stats_json_line(&out);
    let get = |k: &str| stats_json_value(&line, k);
    // (Moved once where the shadow sat at host address 0, else never.)
    assert!(get("shadow_moves") <= 1, "{line}");
    // 2,000 stores and loads to page 0: a host fault for each of them
    // (the interpreter doing it) if the shadow stayed at 0.
    assert!(get("faults_in_translated_code") < 50, "{line}");
}
