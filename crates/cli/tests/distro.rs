//! A static i386 program shipped by a distribution, not built here:
//! Debian's busybox-static for i386 (unpacked into target/distro/ by the
//! README's test command, .ci/test). Each applet runs directly on the host
//! and under popek (both engines), in the same directory with the same
//! arguments; stdout, stderr and exit status must be byte-identical.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const POPEK: &str = env!("CARGO_BIN_EXE_popek");

fn busybox() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/distro/busybox");
    assert!(
        p.exists(),
        "{} is missing: run the README's test command (.ci/test), which fetches Debian's busybox-static:i386",
        p.display()
    );
    p.canonicalize().unwrap()
}

/// A directory of small files for the applets to work on.
fn fixture() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("popek-distro-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("fruit.txt"), "pear\napple\nfig\napple\nbanana\n").unwrap();
    let nums: String = (1..=500).map(|i| format!("{i}\n")).collect();
    std::fs::write(dir.join("nums.txt"), nums).unwrap();
    std::fs::write(dir.join("sub/deep.txt"), "x".repeat(10_000)).unwrap();
    dir
}

fn show(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn debian_busybox_applets_match_direct_execution() {
    let bb = busybox();
    let dir = fixture();
    let applets: &[&[&str]] = &[
        &["echo", "hello", "world"],
        &["seq", "3", "7"],
        &["expr", "6", "*", "7"],
        &[
            "printf",
            "%05d:%x:%s|%5.2f\\n",
            "42",
            "255",
            "str",
            "3.14159",
        ],
        &["sha256sum", "fruit.txt", "nums.txt"],
        &["md5sum", "nums.txt", "sub/deep.txt"],
        &["sort", "-r", "fruit.txt"],
        &["sort", "-n", "-r", "nums.txt"],
        &["uniq", "-c", "fruit.txt"],
        &["wc", "fruit.txt", "nums.txt"],
        &["ls", "-la", "."],
        &["ls", "-R"],
        &["find", ".", "-name", "*.txt"],
        &["du", "-s", "."],
        &["cat", "fruit.txt", "nums.txt"],
        &["head", "-n", "3", "nums.txt"],
        &["tail", "-n", "2", "nums.txt"],
        &["cut", "-c", "2-3", "fruit.txt"],
        &["grep", "-n", "an", "fruit.txt"],
        &["sed", "-n", "s/a/A/gp", "fruit.txt"],
        &[
            "awk",
            "{ s += $1 } END { print s, s / 7, s % 9 }",
            "nums.txt",
        ],
        &["base64", "fruit.txt"],
        &["od", "-c", "fruit.txt"],
        &["factor", "1234567", "600851475143"],
        &["dc", "-e", "2 100 ^ p"],
        &["gzip", "-c", "nums.txt"],
        &["date", "-u", "-d", "@0"],
        &["cat", "no-such-file"],
    ];
    for args in applets {
        let native = Command::new(&bb)
            .args(*args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            !native.stdout.is_empty() || !native.stderr.is_empty(),
            "busybox {args:?} printed nothing natively"
        );
        for engine in ["bt", "interp"] {
            let p = Command::new(POPEK)
                .args(["run", "--engine", engine])
                .arg(&bb)
                .args(*args)
                .current_dir(&dir)
                .output()
                .unwrap();
            assert!(
                p.stdout == native.stdout
                    && p.stderr == native.stderr
                    && p.status.code() == native.status.code(),
                "busybox {args:?} under --engine {engine} differs from direct execution\n\
                 --- native:\n{}\n--- popek:\n{}",
                show(&native),
                show(&p)
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
