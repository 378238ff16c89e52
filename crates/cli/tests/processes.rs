//! Linux processes under popek: fork, exec, wait, pipes, signals and
//! process groups in a glibc program and in busybox sh scripts, each
//! compared with the same program run directly on the host (stdout,
//! stderr and exit status).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::run_with_timeout;

const POPEK: &str = env!("CARGO_BIN_EXE_popek");

fn run(cmd: &mut Command) -> Output {
    run_with_timeout(cmd, Duration::from_secs(120))
}

fn build(name: &str, src: &str, flags: &[&str]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("popek-processes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let c = dir.join(format!("{name}.c"));
    std::fs::write(&c, src).unwrap();
    let exe = dir.join(name);
    let o = Command::new("gcc")
        .args(["-m32", "-O1", "-o"])
        .arg(&exe)
        .arg(&c)
        .args(flags)
        .output()
        .expect("gcc");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    exe
}

fn busybox() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/distro/busybox");
    assert!(
        p.exists(),
        "run the README's test command (.ci/test): it fetches Debian's busybox-static:i386"
    );
    p
}

/// Native and popek (bt, interp) runs of `args`: equal stdout, stderr and
/// exit status.
fn same_as_native(args: &[&str]) {
    let native = run(Command::new(args[0]).args(&args[1..]));
    for engine in ["bt", "interp"] {
        let got = run(Command::new(POPEK)
            .args(["run", "--engine", engine])
            .args(args));
        assert_eq!(
            String::from_utf8_lossy(&got.stdout),
            String::from_utf8_lossy(&native.stdout),
            "{engine}: stdout"
        );
        assert_eq!(
            String::from_utf8_lossy(&got.stderr),
            String::from_utf8_lossy(&native.stderr),
            "{engine}: stderr"
        );
        assert_eq!(got.status.code(), native.status.code(), "{engine}: status");
        assert_eq!(got.status.code().is_none(), native.status.code().is_none());
    }
}

#[test]
fn a_glibc_program_forks_execs_waits_and_takes_signals_as_natively() {
    let exe = build(
        "processes",
        include_str!("programs/processes.c"),
        &["-static"],
    );
    same_as_native(&[exe.to_str().unwrap()]);
    // The same, dynamically linked (the host's i386 ld-linux.so.2 and
    // libc): fork and exec of a dynamic program included.
    let exe = build(
        "processes-dynamic",
        include_str!("programs/processes.c"),
        &[],
    );
    same_as_native(&[exe.to_str().unwrap()]);
}

/// pthreads (static and dynamic): contention, TLS, join, a blocking read
/// in a thread, pthread_kill, fork from a thread, and code one thread
/// writes while another runs it.
#[test]
fn threads_run_as_natively() {
    for (name, flags) in [
        ("threads", &["-static", "-pthread"][..]),
        ("threads-dynamic", &["-pthread"][..]),
    ] {
        let exe = build(name, include_str!("programs/threads.c"), flags);
        same_as_native(&[exe.to_str().unwrap()]);
    }
}

/// Sockets (Unix, loopback TCP and UDP, socketcall and the direct calls,
/// descriptors passed with SCM_RIGHTS, options), positioned I/O, record
/// locks, epoll, eventfd, timerfd, inotify, select and its relatives, ids
/// and scheduling, in a static glibc program.
#[test]
fn sockets_events_and_ids_as_natively() {
    let exe = build(
        "syscalls",
        include_str!("programs/syscalls.c"),
        &["-static"],
    );
    let dir = std::env::temp_dir().join(format!("popek-syscalls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    same_as_native(&[exe.to_str().unwrap(), dir.to_str().unwrap()]);
}

/// busybox's network and identity applets: httpd serving wget over
/// loopback TCP (both under popek), nc, id, mkfifo, ionice.
#[test]
fn busybox_serves_and_fetches_over_loopback_as_natively() {
    let bb = busybox();
    // A port nothing listens on now (the kernel's pick).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // (SIGPIPE ends the server: a shell announces a job that another
    // signal killed, or not, as the timing of its reaping goes.)
    let script = r#"
d=/tmp/popek-www-$$; mkdir -p $d; echo "<p>served</p>" > $d/index.html
httpd -f -p 127.0.0.1:PORT -h $d & h=$!
i=0
while ! wget -q -O - http://127.0.0.1:PORT/index.html 2>/dev/null; do
  i=$((i+1)); [ $i -gt 100 ] && echo "no server" && break; sleep 0.1
done
wget -q -O - http://127.0.0.1:PORT/missing.html; echo "missing: $?"
echo "from nc" | nc 127.0.0.1 PORT | head -n 1
kill -PIPE $h; wait $h; echo "httpd ended $?"
id -u; id -g; id -G | wc -w; id -un
mkfifo $d/f; ls -l $d/f | cut -c1; rm -r $d
ionice -p $$
"#
    .replace("PORT", &port.to_string());
    same_as_native(&[bb.to_str().unwrap(), "sh", "-c", &script]);
}

/// busybox sh: pipelines, subshells, command substitution, background
/// jobs and wait, traps, kill, exit statuses, SIGPIPE, exec, a #! script
/// whose interpreter is busybox, links, ownership, truncation, statfs,
/// resource limits.
#[test]
fn busybox_shell_scripts_run_as_natively() {
    let bb = busybox();
    let script = r#"
echo "start"
seq 1 10 | grep 5
seq 1 200 | sort -rn | head -n 3 | tr '\n' ' '; echo
n=$(seq 1 100 | wc -l); echo "lines: $n"
x=$( (echo a; echo b) | wc -l ); echo "sub: $x"
for i in 1 2 3; do echo "loop $i" | sed 's/loop/iteration/'; done
(exit 7); echo "status $?"
false | true; echo "pipe status $?"
sh -c 'exit 42'; echo "child $?"
f=/tmp/popek-sh-$$; echo abc > $f; cat $f | rev; rm $f
(sleep 0.1; echo bg) & wait; echo "waited $?"
sleep 0.2 & p=$!; wait $p; echo "wait pid $?"
yes | head -n 2
trap 'echo trapped USR1' USR1; kill -USR1 $$; echo "after trap"
trap - USR1
sh -c 'kill -9 $$'; echo "killed $?"
sh -c 'kill -TERM $$'; echo "terminated $?"
echo "x" | (read v; echo "read $v")
echo err >&2
sh -c 'exec echo "exec replaced the shell"'
s=/tmp/popek-sh-script-$$; printf '#!BUSYBOX sh\necho "script $1 $#"\nexit 9\n' > $s; chmod +x $s
$s one two; echo "script status $?"; rm $s
d=/tmp/popek-sh-dir-$$; mkdir -p $d; cd $d
echo hi > a; ln a b; ln -s a c; ls -l | wc -l; readlink c; chown $(id -u) a
truncate -s 100 a; wc -c < a; sync; df / > /dev/null; echo "df $?"
cp -p a d; mv d e; ls | tr '\n' ' '; echo; cd /; rm -r $d
(ulimit -n 512; ulimit -n; ulimit -s 4096; ulimit -s; ulimit -v 100000; ulimit -v)
echo "end"
exit 3
"#
    .replace("BUSYBOX", bb.to_str().unwrap());
    same_as_native(&[bb.to_str().unwrap(), "sh", "-c", &script]);
}

/// `--strace` shows the process calls.
#[test]
fn strace_shows_fork_exec_and_wait() {
    let exe = build(
        "threads-strace",
        include_str!("programs/threads.c"),
        &["-static", "-pthread"],
    );
    let o = run(Command::new(POPEK).args(["run", "--strace", exe.to_str().unwrap()]));
    let err = String::from_utf8_lossy(&o.stderr);
    for call in ["clone(", "futex("] {
        assert!(err.contains(call), "no {call} in {err}");
    }
    let bb = busybox();
    let o = run(Command::new(POPEK).args([
        "run",
        "--strace",
        bb.to_str().unwrap(),
        "sh",
        "-c",
        "echo a | tr a b",
    ]));
    let err = String::from_utf8_lossy(&o.stderr);
    for call in ["clone(", "execve(\"/proc/self/exe\"", "wait4(", "pipe2("] {
        assert!(err.contains(call), "no {call} in {err}");
    }
    assert_eq!(String::from_utf8_lossy(&o.stdout), "b\n");
}

/// Memory unmapped and mapped again comes back as consecutive frames: a
/// program that maps, fills and unmaps 1 MiB eight times prints what it
/// prints natively, and popek's shadow maps the fresh mappings a run of
/// frames per hidden fault (with the frames handed back last-freed first,
/// each of the 2,048 pages touched took a fault of its own).
#[test]
fn memory_mapped_again_is_filled_a_run_of_pages_per_fault() {
    let exe = build(
        "remap",
        r#"
#include <stdio.h>
#include <sys/mman.h>
int main(void)
{
    unsigned sum = 0;
    for (int r = 0; r < 8; r++) {
        unsigned char *p = mmap(0, 1 << 20, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            return 1;
        for (unsigned i = 0; i < 1 << 20; i += 64)
            p[i] = (unsigned char)(i >> 6) + r;
        for (unsigned i = 0; i < 1 << 20; i += 64)
            sum = sum * 31 + p[i];
        munmap(p, 1 << 20);
    }
    printf("%08x\n", sum);
    return 0;
}
"#,
        &["-static"],
    );
    same_as_native(&[exe.to_str().unwrap()]);
    let o = run(Command::new(POPEK).args(["run", "--stats-json", exe.to_str().unwrap()]));
    let err = String::from_utf8_lossy(&o.stderr);
    let stats: serde_json::Value =
        serde_json::from_str(err.lines().last().unwrap_or_default()).expect("stats JSON");
    let hidden = stats["shadow_pages_mapped"]
        .as_u64()
        .expect("hidden faults");
    let filled = stats["shadow_pages_filled"].as_u64().expect("pages filled");
    assert!(filled >= 8 * 256, "{stats}");
    assert!(hidden < 8 * 256 / 4, "{stats}");
}
