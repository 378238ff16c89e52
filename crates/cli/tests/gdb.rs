//! `popek run GUEST --gdb HOST:PORT` against QEMU's gdb stub: the same
//! gdb script (Debian's gdb, batch mode) run against `qemu-system-i386
//! -gdb tcp:... -S` and against popek must print the same registers,
//! memory, breakpoint, watchpoint and step answers, under bt and interp.
//!
//! The scripts start at the kernel's entry point: QEMU stops first in its
//! BIOS (0xFFFF0), popek at the entry (it has no BIOS), so the QEMU run
//! continues to a temporary breakpoint there first, and the lines that
//! say where each stopped first are left out of the comparison.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::run_with_timeout;

const POPEK: &str = env!("CARGO_BIN_EXE_popek");

/// A TCP port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Wait until something listens on 127.0.0.1:`port` (/proc/net/tcp,
/// without connecting: QEMU's stub takes one connection only).
fn wait_listening(port: u16) {
    let start = Instant::now();
    let want = format!(":{port:04X} 00000000:0000 0A");
    loop {
        let t = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        if t.lines().any(|l| l.contains(&want)) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "nothing listens on {port}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The ELF entry point of a bundled guest.
fn entry(elf: &str) -> u32 {
    let b = std::fs::read(elf).unwrap();
    u32::from_le_bytes(b[24..28].try_into().unwrap())
}

/// Run `script` in gdb (batch mode) against the stub on `port`, after
/// `prelude` commands; the output with the lines that differ by design
/// left out and breakpoint numbers replaced by N.
fn gdb(file: Option<&str>, port: u16, prelude: &[String], script: &str) -> String {
    let path = std::env::temp_dir().join(format!("popek-gdb-{}-{port}.gdb", std::process::id()));
    std::fs::write(&path, script).unwrap();
    let mut c = Command::new("gdb");
    c.args([
        "-batch",
        "-nx",
        "-ex",
        "set pagination off",
        "-ex",
        "set confirm off",
    ]);
    match file {
        Some(f) => c.args(["-ex", &format!("file {f}")]),
        None => c.args(["-ex", "set architecture i386"]),
    };
    c.args(["-ex", &format!("target remote 127.0.0.1:{port}")]);
    for p in prelude {
        c.args(["-ex", p]);
    }
    c.arg("-x").arg(&path);
    let o = run_with_timeout(&mut c, Duration::from_secs(300));
    let _ = std::fs::remove_file(&path);
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    let mut lines = Vec::new();
    let mut first_stop = true;
    for l in text.lines() {
        // Where each stopped first (QEMU in its BIOS, popek at the
        // kernel's entry), and QEMU's way there.
        if first_stop && l.starts_with("0x") && l.contains(" in ") {
            first_stop = false;
            continue;
        }
        if l.is_empty() || l.contains(" in _start ()") {
            continue;
        }
        let mut out = String::new();
        let mut words = l.split(' ').peekable();
        while let Some(w) = words.next() {
            out.push_str(w);
            if ["Breakpoint", "breakpoint", "watchpoint"].contains(&w) {
                if let Some(n) = words.peek() {
                    let digits = n.trim_end_matches([':', ',']);
                    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                        let rest = &n[digits.len()..];
                        out.push_str(" N");
                        out.push_str(rest);
                        words.next();
                    }
                }
            }
            out.push(' ');
        }
        lines.push(out.trim_end().to_string());
    }
    lines.join("\n")
}

fn qemu(kernel: &str, port: u16, extra: &[&str]) -> Child {
    let child = Command::new("qemu-system-i386")
        .args(["-M", "pc", "-nographic", "-no-reboot", "-kernel", kernel])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .args(extra)
        .args(["-gdb", &format!("tcp:127.0.0.1:{port}"), "-S"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-i386 (installed by .ci/test)");
    wait_listening(port);
    child
}

fn popek(args: &[&str], port: u16) -> Child {
    let mut child = Command::new(POPEK)
        .args(["run", "--gdb", &format!("127.0.0.1:{port}")])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The one line saying where it waits.
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("waiting for gdb"), "{line}");
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    child
}

fn finish(mut c: Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = c.kill();
            panic!("did not end");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The same script against QEMU and popek (under `engine`) on a bundled
/// guest: equal output.
fn against_qemu(guest: &str, engine: &str, script: &str) {
    let g = popek_guests::find(guest).expect("bundled");
    let tb = format!("tbreak *{:#x}", entry(g.path));
    let port = free_port();
    let mut q = qemu(g.path, port, &["-m", "64"]);
    let want = gdb(Some(g.path), port, &[tb.clone(), "continue".into()], script);
    let _ = q.kill();
    let _ = q.wait();
    let port = free_port();
    let p = popek(&[guest, "--engine", engine], port);
    let got = gdb(Some(g.path), port, &[tb], script);
    let _ = finish(p);
    assert!(
        want.contains("Breakpoint N,"),
        "QEMU's session went wrong:\n{want}"
    );
    assert_eq!(got, want, "{guest} under {engine}");
}

#[test]
fn gdb_is_installed() {
    let o = Command::new("gdb").arg("--version").output();
    assert!(
        o.is_ok_and(|o| o.status.success()),
        "gdb is missing (the test command installs Debian's gdb)"
    );
}

/// Breakpoints (software and hardware), stepi, a write watchpoint, memory
/// and every register gdb shows, on the compute guest; a breakpoint set
/// in the middle of code that has run (translated and chained under bt)
/// must still stop it: translations holding its address are dropped.
#[test]
fn compute_guest_answers_gdb_as_qemu_does() {
    let script = "\
break kmain
continue
info registers
x/8xw $esp
stepi
stepi
stepi
info registers eip esp ebp eax ecx edx eflags
x/4i $eip
delete
watch *(int *)((char *)&mc + 4 * (5 * 24 + 5))
continue
info registers
continue
p $eip
p/x *(int *)((char *)&mc + 4 * (5 * 24 + 5))
delete
break fib
ignore $bpnum 100
continue
stepi
stepi
stepi
set $mid = $pc
delete
break *$mid
continue
info registers
x/8xw $esp
delete
hbreak fib
continue
p/x $eip
p/x $esp
set var $eax = 0x1234
p/x $eax
delete
kill
";
    for engine in ["bt", "interp"] {
        against_qemu("compute", engine, script);
    }
}

/// Under the paging guest's page tables: breakpoints in its page-fault and
/// system-call handlers, CR2/CR3, and memory read at user addresses through
/// the current address space.
#[test]
fn paging_guest_answers_gdb_as_qemu_does() {
    let script = "\
break page_fault
ignore $bpnum 6
continue
info registers
x/8xw $esp
x/4xw 0x40800000
x/2i 0x40000000
p/x $cr2
hbreak syscall
continue
continue
info registers eip eax ebx ecx cr3
x/4xw 0x40400000
stepi
stepi
info registers eip esp eflags
delete
kill
";
    for engine in ["bt", "interp"] {
        against_qemu("paging", engine, script);
    }
}

/// Debian's kernel: a hardware breakpoint at the decompressed kernel's
/// entry (16 MiB, paging off), its bytes and three steps as under QEMU;
/// then gdb detaches and the boot goes on to its end (exit status 33).
#[test]
fn debian_kernel_stops_where_qemu_does_and_boots_on_after_detach() {
    let distro = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/distro");
    let kernel = distro.join("vmlinuz");
    assert!(
        kernel.exists(),
        "run the README's test command (.ci/test): it fetches Debian's kernel"
    );
    // An initramfs whose /init ends the machine through isa-debug-exit.
    let dir = std::env::temp_dir().join(format!("popek-gdb-linux-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let init = dir.join("init");
    std::fs::write(
        &init,
        "#!/bin/busybox sh\n/bin/busybox mount -t devtmpfs devtmpfs /dev\necho '=== booted'\n\
         printf '\\x10' | /bin/busybox dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null\n\
         /bin/busybox reboot -f\n",
    )
    .unwrap();
    let rd = dir.join("initrd.cpio");
    let o = Command::new(POPEK)
        .arg("initramfs")
        .arg(&rd)
        .arg("--busybox")
        .arg(distro.join("busybox"))
        .arg("--init")
        .arg(&init)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (kernel, rd) = (kernel.to_str().unwrap(), rd.to_str().unwrap());
    let cmdline = "console=ttyS0 nokaslr acpi=off pci=off nolapic noapic nosmp mitigations=off tsc=reliable no_timer_check initcall_blacklist=i8042_init rdinit=/init panic=-1 quiet";
    let script = "\
hbreak *0x1000000
continue
p/x $eip
x/16xb 0x1000000
p/x $cr0
stepi
stepi
stepi
p/x $eip
delete
detach
";
    let port = free_port();
    let mut q = qemu(
        kernel,
        port,
        &["-m", "256", "-initrd", rd, "-append", cmdline],
    );
    let want = gdb(None, port, &[], script);
    let _ = q.kill();
    let _ = q.wait();
    assert!(want.contains("$1 = 0x1000000"), "{want}");
    let port = free_port();
    let p = popek(
        &[
            kernel, "--initrd", rd, "--memory", "256M", "--append", cmdline,
        ],
        port,
    );
    let got = gdb(None, port, &[], script);
    assert_eq!(got, want);
    // Detached: the kernel boots on to the initramfs, which powers off
    // through isa-debug-exit.
    assert_eq!(finish(p).code(), Some(33));
}

/// One packet of the remote protocol, and its reply.
fn rsp(s: &mut TcpStream, body: &str) -> String {
    let sum = body.bytes().fold(0u8, |a, b| a.wrapping_add(b));
    write!(s, "${body}#{sum:02x}").unwrap();
    reply(s)
}

fn reply(s: &mut TcpStream) -> String {
    let mut b = [0u8; 1];
    loop {
        s.read_exact(&mut b).unwrap();
        if b[0] == b'$' {
            break;
        }
    }
    let mut body: Vec<u8> = Vec::new();
    loop {
        s.read_exact(&mut b).unwrap();
        match b[0] {
            b'#' => break,
            // Run-length encoding: the previous byte n - 29 more times.
            b'*' => {
                s.read_exact(&mut b).unwrap();
                let last = *body.last().unwrap();
                body.extend(std::iter::repeat_n(last, usize::from(b[0] - 29)));
            }
            c => body.push(c),
        }
    }
    let mut sum = [0u8; 2];
    s.read_exact(&mut sum).unwrap();
    s.write_all(b"+").unwrap();
    String::from_utf8_lossy(&body).into_owned()
}

/// Ctrl-C (the 0x03 byte) stops a running guest, here halted waiting for
/// input (clone waits 5 s), with SIGINT; registers read; a detach lets
/// the guest go on, and it ends as it does alone.
#[test]
fn ctrl_c_interrupts_and_detach_lets_the_guest_go_on() {
    let solo = run_with_timeout(
        Command::new(POPEK).args(["run", "clone"]),
        Duration::from_secs(120),
    );
    let port = free_port();
    let mut p = popek(&["clone"], port);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let first = rsp(&mut s, "?");
    assert!(first.starts_with('S') || first.starts_with('T'), "{first}");
    let c = b"$c#63";
    s.write_all(c).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    s.write_all(&[3]).unwrap();
    let stop = reply(&mut s);
    assert!(stop.starts_with("T02") || stop.starts_with("S02"), "{stop}");
    let regs = rsp(&mut s, "g");
    // 25 words, 8 x87 registers, 8 x87 words, 8 XMM registers, MXCSR.
    assert_eq!(regs.len(), 2 * (25 * 4 + 80 + 32 + 128 + 4), "{regs}");
    // EIP (word 8) lies in the guest's code, above 1 MiB.
    let eip = u32::from_str_radix(&regs[64..72], 16).unwrap().swap_bytes();
    assert!((0x10_0000..0x20_0000).contains(&eip), "{eip:#x}");
    assert_eq!(rsp(&mut s, "D"), "OK");
    drop(s);
    let mut out = String::new();
    p.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let status = finish(p);
    assert_eq!(status.code(), solo.status.code());
    assert_eq!(out, String::from_utf8_lossy(&solo.stdout));
}

/// Refusals: an address that cannot be listened on, --gdb with
/// --lockstep; each one line and status 2.
#[test]
fn bad_gdb_options_are_refused() {
    for args in [
        vec!["run", "--gdb", "256.1.1.1:1", "hello"],
        vec!["run", "--gdb", "127.0.0.1:1234", "--lockstep", "hello"],
    ] {
        let o = run_with_timeout(Command::new(POPEK).args(&args), Duration::from_secs(60));
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&o.stderr).lines().count(),
            1,
            "{args:?}"
        );
    }
}
