//! An unmodified operating system: Debian 12's i386 Linux kernel
//! (linux-image-686, fetched into target/distro/ by the README's test
//! command, .ci/test) booted with an initramfs of Debian's busybox-static,
//! under popek's binary translator and under qemu-system-i386 with the same
//! files and command line. The userspace output must be the same, and so
//! must the isa-debug-exit status the script ends with.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const POPEK: &str = env!("CARGO_BIN_EXE_popek");

/// The command line (docs/architecture.md, "Linux kernels", says what popek
/// needs of it and why the rest is there).
const CMDLINE: &str = "console=ttyS0 nokaslr acpi=off pci=off nolapic noapic nosmp \
    mitigations=off tsc=reliable no_timer_check initcall_blacklist=i8042_init \
    rdinit=/init panic=-1 quiet";

/// The fixed script of the boot test: shell arithmetic, fork+exec loops,
/// pipelines, awk (with x87 floating point), gzip, file I/O on tmpfs,
/// signals, background jobs and timers; then isa-debug-exit through
/// /dev/port (status (0x10 << 1) | 1 = 33).
const CHECK_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
echo "=== begin"
a=1; b=1; i=0
while [ $i -lt 40 ]; do t=$((a + b)); a=$b; b=$t; i=$((i + 1)); done
echo "arithmetic: $b $(( (b * 7) % 1000003 )) $(( 1 << 20 )) $(( -17 / 5 )) $(( -17 % 5 ))"
n=0; for i in $(seq 1 40); do n=$(expr $n + $(echo $i | wc -c)); done; echo "fork+exec: $n"
seq 1 3000 | awk '{ s += $1 * $1 } END { print "squares:", s }'
seq 1 500 | sort -rn | head -n 3 | tr '\n' ' '; echo
echo "The Quick Brown Fox" | tr 'A-Z' 'a-z' | sed 's/quick/slow/' | rev
awk 'BEGIN { for (i = 1; i <= 2000; i++) h += 1 / i; r = 1; for (i = 0; i < 30; i++) r = (r + 2 / r) / 2
  x = 1; for (i = 0; i < 30; i++) x = x * 1.5; printf "harmonic: %.12f sqrt2: %.12f %.6e %d %s\n", h, r, x, int(x) % 997, x / 7 }'
seq 1 20000 > /tmp/nums
gzip -9 -c /tmp/nums > /tmp/nums.gz
echo "gzip: $(wc -c < /tmp/nums) -> $(wc -c < /tmp/nums.gz) bytes"
gunzip -c /tmp/nums.gz | md5sum
md5sum < /tmp/nums
mkdir -p /tmp/d/e
dd if=/dev/zero bs=1024 count=512 2>/dev/null | tr '\0' 'z' > /tmp/d/e/zs
for f in a b c; do echo "file $f" > /tmp/d/$f; done
cat /tmp/d/a /tmp/d/b /tmp/d/c
ls /tmp/d | tr '\n' ' '; echo
wc -c < /tmp/d/e/zs
sha256sum < /tmp/d/e/zs
cp /tmp/d/e/zs /tmp/d/copy && cmp /tmp/d/e/zs /tmp/d/copy && echo "cmp: same"
find /tmp/d -type f | sort
rm -r /tmp/d; ls /tmp | tr '\n' ' '; echo
sh -c 'kill -TERM $$'; echo "killed: $?"
(sleep 0.2; echo "background done") & wait; echo "waited: $?"
trap 'echo trapped USR1' USR1; kill -USR1 $$
dd if=/dev/zero bs=4096 count=1024 2>/dev/null | md5sum
echo "=== end"
printf '\x10' | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
echo "isa-debug-exit did not end the machine"
reboot -f
"#;

fn distro(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/distro")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: run the README's test command (.ci/test), which fetches Debian's \
         linux-image-686:i386 and busybox-static:i386",
        p.display()
    );
    p.canonicalize().unwrap()
}

/// An initramfs built by `popek initramfs` with the given /init (None: the
/// interactive shell).
fn initramfs(tag: &str, init: Option<&str>) -> PathBuf {
    initramfs_with(tag, init, &[])
}

/// As [`initramfs`], with files added (`popek initramfs --add DEST=SRC`).
fn initramfs_with(tag: &str, init: Option<&str>, add: &[String]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("popek-linux-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("initrd.cpio");
    let mut cmd = Command::new(POPEK);
    cmd.arg("initramfs")
        .arg(&out)
        .arg("--busybox")
        .arg(distro("busybox"));
    if let Some(init) = init {
        let script = dir.join("init");
        std::fs::write(&script, init).unwrap();
        cmd.arg("--init").arg(script);
    }
    for a in add {
        cmd.arg("--add").arg(a);
    }
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

fn qemu(initrd: &Path) -> Command {
    let mut c = Command::new("qemu-system-i386");
    c.args(["-M", "isapc", "-cpu", "pentium2", "-m", "256", "-kernel"])
        .arg(distro("vmlinuz"))
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", CMDLINE, "-serial", "stdio", "-display", "none"])
        .args([
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=4",
            "-no-reboot",
        ]);
    c
}

fn popek(initrd: &Path) -> Command {
    popek_with(initrd, &[])
}

/// `popek run` of the kernel with popek options `extra` (an engine,
/// --lockstep).
fn popek_with(initrd: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(POPEK);
    c.arg("run")
        .args(extra)
        .arg(distro("vmlinuz"))
        .arg("--initrd")
        .arg(initrd)
        .args(["--append", CMDLINE, "--memory", "256M"]);
    c
}

/// Run `cmd` with piped stdio; once its output contains `ready`, write
/// `input` to its stdin. Returns stdout and the exit status, or panics
/// after `limit`.
fn run(mut cmd: Command, ready: Option<(&str, &str)>, limit: Duration) -> (String, Option<i32>) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut pending = ready;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(chunk) => seen.extend_from_slice(&chunk),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Some((marker, input)) = pending {
            if String::from_utf8_lossy(&seen).contains(marker) {
                stdin.as_mut().unwrap().write_all(input.as_bytes()).unwrap();
                pending = None;
            }
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!(
                "no end after {limit:?}; output so far:\n{}",
                String::from_utf8_lossy(&seen)
            );
        }
    }
    drop(stdin);
    let status = child.wait().unwrap();
    (String::from_utf8_lossy(&seen).into_owned(), status.code())
}

/// The lines from `begin` to `end` (both included), less the kernel's
/// own messages.
fn between(out: &str, begin: &str, end: &str) -> String {
    let from = out
        .find(begin)
        .unwrap_or_else(|| panic!("no {begin:?} in:\n{out}"));
    let to = out[from..]
        .find(end)
        .unwrap_or_else(|| panic!("no {end:?} in:\n{out}"));
    out[from..from + to + end.len()]
        .replace('\r', "")
        .lines()
        .filter(|l| !is_kernel_message(l))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A printk line: "[    1.234567] ...".
fn is_kernel_message(line: &str) -> bool {
    line.strip_prefix('[').is_some_and(|r| {
        r.split_once(']').is_some_and(|(t, _)| {
            !t.trim().is_empty() && t.trim().chars().all(|c| c.is_ascii_digit() || c == '.')
        })
    })
}

const LIMIT: Duration = Duration::from_secs(180);

#[test]
fn debian_kernel_runs_the_check_script_as_under_qemu() {
    let rd = initramfs("check", Some(CHECK_INIT));
    let (want, want_status) = run(qemu(&rd), None, LIMIT);
    let want_lines = between(&want, "=== begin", "=== end");
    assert_eq!(want_status, Some(33), "qemu:\n{want}");
    assert!(want_lines.contains("cmp: same"), "qemu:\n{want}");
    let (got, status) = run(popek(&rd), None, LIMIT);
    assert_eq!(
        between(&got, "=== begin", "=== end"),
        want_lines,
        "popek:\n{got}"
    );
    assert_eq!(status, want_status, "popek:\n{got}");
}

/// The interactive shell `popek initramfs` makes by default, typed into
/// once it is up (stdin on the serial port, as QEMU's -serial stdio).
#[test]
fn debian_kernel_shell_reads_the_serial_line_as_under_qemu() {
    let rd = initramfs("shell", None);
    let line = "echo \"=== $((1 + 1))\"; echo $((6 * 7)) | tr 42 24; ls /proc/self/ | grep -c .; \
        echo \"=== $((1 + 2))\"; printf '\\x21' | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null\n";
    let ready = Some(("/ # ", line));
    let (want, want_status) = run(qemu(&rd), ready, LIMIT);
    assert_eq!(want_status, Some(67), "qemu:\n{want}");
    let want_lines = between(&want, "=== 2", "=== 3");
    let (got, status) = run(popek(&rd), ready, LIMIT);
    assert_eq!(between(&got, "=== 2", "=== 3"), want_lines, "popek:\n{got}");
    assert_eq!(status, want_status, "popek:\n{got}");
}

/// The boot of the boot test's script under `popek_with(extra)`, against
/// QEMU's.
fn check_script_with(extra: &[&str], limit: Duration) {
    let rd = initramfs(&extra.join("").replace('-', ""), Some(CHECK_INIT));
    let (want, want_status) = run(qemu(&rd), None, LIMIT);
    let (got, status) = run(popek_with(&rd, extra), None, limit);
    assert_eq!(
        between(&got, "=== begin", "=== end"),
        between(&want, "=== begin", "=== end"),
        "popek {extra:?}:\n{got}"
    );
    assert_eq!(status, want_status, "popek {extra:?}:\n{got}");
}

/// The reference interpreter boots the kernel and runs the script too
/// (about five minutes: not in the suite's time budget).
#[test]
#[ignore = "minutes: cargo test -p popek --test linux_kernel -- --ignored"]
fn debian_kernel_runs_the_check_script_under_the_interpreter() {
    check_script_with(&["--engine", "interp"], Duration::from_secs(3600));
}

/// The translator checked block by block against the interpreter for the
/// whole boot and script (tens of minutes: not in the suite's budget).
#[test]
#[ignore = "tens of minutes: cargo test -p popek --test linux_kernel -- --ignored"]
fn debian_kernel_runs_the_check_script_in_lockstep() {
    check_script_with(&["--lockstep"], Duration::from_secs(4 * 3600));
}

/// Suspend and resume: on the instruction clock, the kernel suspended in
/// the middle of its boot (a full snapshot), resumed and suspended again in
/// the middle of the script (a diff snapshot on the first), resumed from
/// the diff and suspended near the end (a diff on the diff), and the last
/// stretch resumed under the interpreter, prints what the run that was
/// never stopped prints, and ends with its status.
#[test]
fn debian_kernel_suspends_and_resumes_where_it_stopped() {
    let rd = initramfs("snapshot", Some(CHECK_INIT));
    let dir = rd.parent().unwrap().to_path_buf();
    let whole = common::run_with_timeout(
        popek_with(&rd, &["--icount", "--stats-json"]).stdin(Stdio::null()),
        LIMIT,
    );
    let total = common::instructions(&whole);
    let points = [total * 2 / 5, total * 7 / 10, total - 20_000_000];
    let snaps: Vec<PathBuf> = (0..3).map(|i| dir.join(format!("s{i}.snap"))).collect();
    let mut out = Vec::new();
    let first = common::run_with_timeout(
        popek_with(
            &rd,
            &[
                "--icount",
                "--suspend-at-insns",
                &points[0].to_string(),
                "--snapshot",
                snaps[0].to_str().unwrap(),
            ],
        )
        .stdin(Stdio::null()),
        LIMIT,
    );
    assert_eq!(
        first.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    out.extend_from_slice(&first.stdout);
    for i in 1..3 {
        let o = common::run_with_timeout(
            Command::new(POPEK)
                .arg("resume")
                .arg(&snaps[i - 1])
                .args(["--suspend-at-insns", &points[i].to_string(), "--snapshot"])
                .arg(&snaps[i])
                .arg("--diff")
                .stdin(Stdio::null()),
            LIMIT,
        );
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "{e}");
        assert!(e.contains("diff snapshot"), "{e}");
        out.extend_from_slice(&o.stdout);
    }
    let last = common::run_with_timeout(
        Command::new(POPEK)
            .arg("resume")
            .arg(&snaps[2])
            .args(["--engine", "interp"])
            .stdin(Stdio::null()),
        LIMIT,
    );
    out.extend_from_slice(&last.stdout);
    let want = user_lines(&whole.stdout);
    assert!(want.contains("=== end"), "{want}");
    assert_eq!(user_lines(&out), want);
    assert_eq!(last.status.code(), whole.status.code());
    assert_eq!(whole.status.code(), Some(33));
}

/// Live migration: on the instruction clock, the kernel migrated to a
/// `popek incoming` on loopback in the middle of its boot goes on there:
/// the source's output followed by the target's is the unmigrated run's
/// (kernel messages aside), and the target ends with its status.
#[test]
fn debian_kernel_migrates_mid_boot() {
    let rd = initramfs("migrate", Some(CHECK_INIT));
    let whole = common::run_with_timeout(
        popek_with(&rd, &["--icount", "--stats-json"]).stdin(Stdio::null()),
        LIMIT,
    );
    let total = common::instructions(&whole);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let to = format!("127.0.0.1:{port}");
    let target = std::thread::spawn(move || {
        common::run_with_timeout(
            Command::new(POPEK)
                .args(["incoming", "--listen", &format!("127.0.0.1:{port}")])
                .stdin(Stdio::null()),
            LIMIT,
        )
    });
    // (The target binds first; retry the source until it listens.)
    let start = Instant::now();
    let src = loop {
        let o = common::run_with_timeout(
            popek_with(
                &rd,
                &[
                    "--icount",
                    "--migrate-to",
                    &to,
                    "--migrate-at-insns",
                    &(total * 2 / 5).to_string(),
                ],
            )
            .stdin(Stdio::null()),
            LIMIT,
        );
        if String::from_utf8_lossy(&o.stderr).contains("completed") || start.elapsed() > LIMIT {
            break o;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let tgt = target.join().unwrap();
    let e = String::from_utf8_lossy(&src.stderr);
    assert_eq!(src.status.code(), Some(0), "{e}");
    assert!(e.contains("completed"), "{e}");
    let mut both = src.stdout.clone();
    both.extend_from_slice(&tgt.stdout);
    assert_eq!(user_lines(&both), user_lines(&whole.stdout));
    assert_eq!(
        tgt.status.code(),
        Some(33),
        "{}",
        String::from_utf8_lossy(&tgt.stderr)
    );
}

/// The modules a virtio driver needs, in an order `insmod` accepts: the
/// PCI transport (`virtio_pci`) and `driver`, each after the modules its
/// `.modinfo` section's `depends=` names (Debian's linux-image ships them;
/// .ci/test copies them into target/distro/modules/). The order comes from
/// the modules themselves because it changes between Debian's kernel
/// updates: 6.1.176's virtio.ko depended on nothing, 6.1.192's needs
/// virtio_ring.
fn virtio_modules(driver: &str) -> Vec<String> {
    fn visit(m: &str, order: &mut Vec<String>, path: &mut Vec<String>) {
        if order.iter().any(|o| o == m) {
            return;
        }
        assert!(
            !path.iter().any(|p| p == m),
            "modules depend on each other in a cycle: {path:?} -> {m}"
        );
        path.push(m.to_string());
        let ko = std::fs::read(distro(&format!("modules/{m}.ko"))).unwrap();
        for dep in module_depends(&ko) {
            visit(&dep, order, path);
        }
        path.pop();
        order.push(m.to_string());
    }
    let mut order = Vec::new();
    for m in ["virtio_pci", driver] {
        visit(m, &mut order, &mut Vec::new());
    }
    order
}

/// The `depends=` entry of a module's `.modinfo` section (NUL-separated
/// `key=value` strings): the modules it needs loaded first.
fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let at = ko
        .windows(key.len())
        .position(|w| w == key)
        .expect("a kernel module without a depends= entry")
        + key.len();
    let end = ko[at..].iter().position(|&b| b == 0).unwrap() + at;
    std::str::from_utf8(&ko[at..end])
        .unwrap()
        .split(',')
        .filter(|d| !d.is_empty())
        .map(str::to_string)
        .collect()
}

/// An /init that loads `modules` (from [`virtio_modules`]) in order, then
/// runs `body`.
fn virtio_init(modules: &[String], body: &str) -> String {
    format!(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nmount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\nmount -t devtmpfs devtmpfs /dev\n\
         for m in {}; do\n\
         \x20 insmod /lib/$m.ko || echo \"insmod $m failed\"\ndone\n{body}",
        modules.join(" ")
    )
}

/// The disk test's /init (after [`virtio_init`]): load the modules, read the disk whole and in
/// parts, write to it, read back what was written.
const DISK_INIT_BODY: &str = r#"echo "=== begin"
echo "sectors: $(cat /sys/block/vda/size) ro: $(cat /sys/block/vda/ro)"
md5sum /dev/vda
dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 40; echo
dd if=/dev/vda bs=4096 skip=100 count=50 2>/dev/null | md5sum
seq 1 30000 | dd of=/dev/vda bs=4096 seek=64 conv=notrunc,fsync 2>/dev/null; echo "write: $?"
echo "written by the guest at sector 3" | dd of=/dev/vda bs=512 seek=3 conv=notrunc 2>/dev/null; echo "write: $?"
sync
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda bs=4096 skip=64 count=40 2>/dev/null | md5sum
dd if=/dev/vda bs=512 skip=3 count=1 2>/dev/null | head -c 32; echo
md5sum /dev/vda
echo "=== end"
printf '\x10' | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
"#;

/// A disk image of `mib` MiB: a text first sector, then pseudo-random
/// bytes (the same for every run).
fn disk_image(path: &Path, mib: usize) {
    let mut b = vec![0u8; mib << 20];
    let mut x: u32 = 0x1234_5678;
    for v in b.iter_mut() {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        *v = (x >> 16) as u8;
    }
    let head = b"popek test disk: its first sector\n";
    b[..head.len()].copy_from_slice(head);
    std::fs::write(path, b).unwrap();
}

/// The disk test's kernel command line: CMDLINE with the PCI bus on.
fn pci_cmdline() -> String {
    CMDLINE.replace("pci=off ", "")
}

/// The output's lines less the kernel's own messages.
fn user_lines(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .replace('\r', "")
        .lines()
        .filter(|l| !is_kernel_message(l))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `popek initramfs --add` arguments putting `modules` (from
/// target/distro/modules/) into /lib.
fn module_adds(modules: &[String]) -> Vec<String> {
    modules
        .iter()
        .map(|m| {
            format!(
                "lib/{m}.ko={}",
                distro(&format!("modules/{m}.ko")).display()
            )
        })
        .collect()
}

/// The disk tests' initramfs (Debian's virtio modules, the disk script)
/// and a 4 MiB image beside it: (initramfs, directory, image).
fn disk_setup(tag: &str) -> (PathBuf, PathBuf, PathBuf) {
    let modules = virtio_modules("virtio_blk");
    let add = module_adds(&modules);
    let rd = initramfs_with(tag, Some(&virtio_init(&modules, DISK_INIT_BODY)), &add);
    let dir = rd.parent().unwrap().to_path_buf();
    let original = dir.join("original.img");
    disk_image(&original, 4);
    (rd, dir, original)
}

/// A virtio disk: PCI (configuration mechanism #1, a host bridge, legacy
/// virtio-pci on an I/O BAR, INTA# on the PIC) and virtio-blk on a raw
/// image. Debian's kernel loads its own virtio modules from the
/// initramfs, reads the disk (its checksum equal to the host's), writes
/// to it and reads back; the guest prints what it printed under
/// `qemu-system-i386 -M pc -drive file=IMG,if=virtio,format=raw`, and the
/// image file ends up exactly as QEMU leaves a copy of the same image.
/// Read-only (readonly=on): the guest sees a read-only disk, its writes
/// fail, and the file is untouched, as under QEMU. On a pcow overlay made
/// by `popek img create --backing` over the image: the base is untouched
/// and the overlay, flattened by `popek img convert`, holds what QEMU left
/// in its copy.
#[test]
fn debian_kernel_reads_and_writes_a_virtio_disk_as_under_qemu() {
    let (rd, dir, original) = disk_setup("disk");
    for (readonly, overlay) in [(false, false), (true, false), (false, true)] {
        let (q_img, p_img) = (dir.join("qemu.img"), dir.join("popek.img"));
        std::fs::copy(&original, &q_img).unwrap();
        std::fs::copy(&original, &p_img).unwrap();
        let ro = if readonly { ",readonly=on" } else { "" };
        let over = dir.join("popek.pcow");
        let _ = std::fs::remove_file(&over);
        if overlay {
            let o = Command::new(POPEK)
                .args(["img", "create", "--backing"])
                .arg(&p_img)
                .arg(&over)
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        let drive_file = if overlay { &over } else { &p_img };
        let mut q = Command::new("qemu-system-i386");
        q.args(["-M", "pc", "-cpu", "pentium2", "-m", "256", "-kernel"])
            .arg(distro("vmlinuz"))
            .arg("-initrd")
            .arg(&rd)
            .args([
                "-append",
                &pci_cmdline(),
                "-serial",
                "stdio",
                "-display",
                "none",
            ])
            .args([
                "-device",
                "isa-debug-exit,iobase=0xf4,iosize=4",
                "-no-reboot",
            ])
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=raw{ro}", q_img.display()));
        let (want, want_status) = run(q, None, LIMIT);
        let mut p = Command::new(POPEK);
        p.arg("run")
            .arg(distro("vmlinuz"))
            .arg("--initrd")
            .arg(&rd)
            .args(["--append", &pci_cmdline(), "--memory", "256M"])
            .arg("--drive")
            .arg(format!("file={}{ro}", drive_file.display()));
        let (got, status) = run(p, None, LIMIT);
        let want_lines = between(&want, "=== begin", "=== end");
        assert!(want_lines.contains("sectors: 8192"), "qemu:\n{want}");
        // The guest's first checksum of /dev/vda is the host's of the image.
        let host = Command::new("md5sum").arg(&original).output().unwrap();
        let host = String::from_utf8_lossy(&host.stdout);
        let host_sum = host.split_whitespace().next().unwrap();
        assert!(
            between(&got, "=== begin", "=== end").contains(&format!("{host_sum}  /dev/vda")),
            "popek:\n{got}\nhost: {host_sum}"
        );
        assert_eq!(
            between(&got, "=== begin", "=== end"),
            want_lines,
            "popek:\n{got}"
        );
        assert_eq!(status, want_status);
        assert_eq!(want_status, Some(33));
        let base_bytes = std::fs::read(&p_img).unwrap();
        let p_bytes = if overlay {
            assert!(
                base_bytes == std::fs::read(&original).unwrap(),
                "the base was written"
            );
            let flat = dir.join("flat.img");
            let _ = std::fs::remove_file(&flat);
            let o = Command::new(POPEK)
                .args(["img", "convert"])
                .arg(&over)
                .arg(&flat)
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            std::fs::read(&flat).unwrap()
        } else {
            base_bytes
        };
        let q_bytes = std::fs::read(&q_img).unwrap();
        assert!(
            q_bytes == p_bytes,
            "the images differ after the run (readonly {readonly}, overlay {overlay})"
        );
        let untouched = q_bytes == std::fs::read(&original).unwrap();
        assert_eq!(untouched, readonly, "readonly: {readonly}");
    }
}

/// The balloon test's /init (after [`virtio_init`]): load the balloon driver, wait until the
/// kernel's memory shrinks by what the host asked (--balloon), say so,
/// then wait until it grows back (the monitor's balloon command).
const BALLOON_INIT_BODY: &str = r#"total() { awk '/MemTotal/ { print $2 }' /proc/meminfo; }
echo "=== begin $(total)"
i=0; while [ $(total) -gt 120000 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
echo "inflated $(total)"
i=0; while [ $(total) -lt 200000 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
echo "deflated $(total)"
echo "=== end"
printf '\x10' | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
"#;

/// virtio-balloon: asked at boot to take 128 MiB of a 256 MiB guest, the
/// driver inflates (the kernel's MemTotal falls by that much) and the host
/// releases every page it gets; the monitor's `balloon value=256M` lets
/// the guest deflate (MemTotal back).
#[test]
fn debian_kernel_inflates_and_deflates_its_balloon() {
    let modules = virtio_modules("virtio_balloon");
    let add = module_adds(&modules);
    let rd = initramfs_with(
        "balloon",
        Some(&virtio_init(&modules, BALLOON_INIT_BODY)),
        &add,
    );
    let sock = rd.parent().unwrap().join("balloon.sock");
    let mut child = Command::new(POPEK)
        .arg("run")
        .arg(distro("vmlinuz"))
        .arg("--initrd")
        .arg(&rd)
        .args([
            "--append",
            &pci_cmdline(),
            "--memory",
            "256M",
            "--balloon",
            "128M",
        ])
        .arg("--monitor")
        .arg(format!("unix:{}", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let start = Instant::now();
    while !seen.contains("inflated ") || !seen[seen.find("inflated ").unwrap()..].contains('\n') {
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0 && start.elapsed() < LIMIT, "no inflation:\n{seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let number = |key: &str, s: &str| -> u64 {
        let at = s.find(key).unwrap_or_else(|| panic!("no {key:?} in {s}")) + key.len();
        s[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (before, inflated) = (number("=== begin ", &seen), number("inflated ", &seen));
    assert!(
        before - inflated >= 100 * 1024,
        "MemTotal {before} -> {inflated} kB"
    );
    let q = Command::new(POPEK)
        .args(["monitor", sock.to_str().unwrap(), "query-balloon"])
        .output()
        .unwrap();
    let q = String::from_utf8_lossy(&q.stdout).into_owned();
    assert!(number("\"released_pages\":", &q) >= 32768, "{q}");
    let d = Command::new(POPEK)
        .args([
            "monitor",
            sock.to_str().unwrap(),
            "balloon",
            "value=268435456",
        ])
        .output()
        .unwrap();
    assert!(d.status.success(), "{}", String::from_utf8_lossy(&d.stdout));
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    seen.push_str(&rest);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(33), "{seen}");
    assert!(number("deflated ", &seen) >= before - 1024, "{seen}");
}

/// A machine with a disk suspends, resumes and migrates with it: on the
/// instruction clock, Debian's kernel running the disk script, suspended
/// late in the script and resumed twice from the one snapshot (each
/// resume on its own overlay, `--disk-overlay`: clones), and migrated at
/// the same point, prints what the uninterrupted run prints, and each
/// disk ends as the uninterrupted run leaves its image. A snapshot whose
/// image changed since is refused in one line.
#[test]
fn debian_kernel_with_a_disk_suspends_resumes_and_migrates() {
    let (rd, dir, original) = disk_setup("disk-snap");
    let machine = |img: &Path, extra: &[&str]| {
        let mut c = Command::new(POPEK);
        c.arg("run")
            .arg(distro("vmlinuz"))
            .arg("--initrd")
            .arg(&rd)
            .args(["--append", &pci_cmdline(), "--memory", "256M", "--icount"])
            .arg("--drive")
            .arg(format!("file={}", img.display()))
            .args(extra)
            .stdin(Stdio::null());
        c
    };
    let copy = |name: &str| {
        let p = dir.join(name);
        std::fs::copy(&original, &p).unwrap();
        p
    };
    let w_img = copy("whole.img");
    let whole = common::run_with_timeout(&mut machine(&w_img, &["--stats-json"]), LIMIT);
    let total = common::instructions(&whole);
    let at = (total * 9 / 10).to_string();
    let want_image = std::fs::read(&w_img).unwrap();
    assert_eq!(whole.status.code(), Some(33));
    // Suspend, then two clones of the snapshot on their own overlays.
    let s_img = copy("suspended.img");
    let snap = dir.join("disk.snap");
    let first = common::run_with_timeout(
        &mut machine(
            &s_img,
            &[
                "--suspend-at-insns",
                &at,
                "--snapshot",
                snap.to_str().unwrap(),
            ],
        ),
        LIMIT,
    );
    assert_eq!(
        first.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    for clone in ["one.pcow", "two.pcow"] {
        let over = dir.join(clone);
        let _ = std::fs::remove_file(&over);
        let rest = common::run_with_timeout(
            Command::new(POPEK)
                .arg("resume")
                .arg(&snap)
                .arg("--disk-overlay")
                .arg(&over)
                .stdin(Stdio::null()),
            LIMIT,
        );
        assert_eq!(
            rest.status.code(),
            Some(33),
            "{}",
            String::from_utf8_lossy(&rest.stderr)
        );
        let mut both = first.stdout.clone();
        both.extend_from_slice(&rest.stdout);
        assert_eq!(user_lines(&both), user_lines(&whole.stdout), "{clone}");
        let flat = dir.join("flat.img");
        let _ = std::fs::remove_file(&flat);
        let o = Command::new(POPEK)
            .args(["img", "convert"])
            .arg(&over)
            .arg(&flat)
            .output()
            .unwrap();
        assert!(o.status.success());
        assert!(
            std::fs::read(&flat).unwrap() == want_image,
            "{clone}: the disk differs"
        );
    }
    // The image itself, resumed once: then it has changed, and a second
    // plain resume is refused.
    let rest = common::run_with_timeout(
        Command::new(POPEK)
            .arg("resume")
            .arg(&snap)
            .stdin(Stdio::null()),
        LIMIT,
    );
    assert_eq!(rest.status.code(), Some(33));
    assert!(std::fs::read(&s_img).unwrap() == want_image);
    let again = common::run_with_timeout(
        Command::new(POPEK)
            .arg("resume")
            .arg(&snap)
            .stdin(Stdio::null()),
        LIMIT,
    );
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("changed since the snapshot"));
    // Migration: the target opens the same image (shared storage).
    let m_img = copy("migrated.img");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let target = std::thread::spawn(move || {
        common::run_with_timeout(
            Command::new(POPEK)
                .args(["incoming", "--listen", &format!("127.0.0.1:{port}")])
                .stdin(Stdio::null()),
            LIMIT,
        )
    });
    let to = format!("127.0.0.1:{port}");
    let start = Instant::now();
    let src = loop {
        let o = common::run_with_timeout(
            &mut machine(&m_img, &["--migrate-to", &to, "--migrate-at-insns", &at]),
            LIMIT,
        );
        if String::from_utf8_lossy(&o.stderr).contains("completed") || start.elapsed() > LIMIT {
            break o;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let tgt = target.join().unwrap();
    assert_eq!(
        src.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&src.stderr)
    );
    assert_eq!(
        tgt.status.code(),
        Some(33),
        "{}",
        String::from_utf8_lossy(&tgt.stderr)
    );
    let mut both = src.stdout.clone();
    both.extend_from_slice(&tgt.stdout);
    assert_eq!(user_lines(&both), user_lines(&whole.stdout));
    assert!(
        std::fs::read(&m_img).unwrap() == want_image,
        "the migrated disk differs"
    );
}
