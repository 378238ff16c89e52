//! `popek run` never silently ignores what a user typed: after a Multiboot
//! kernel only popek's options may follow; everything after a Linux
//! program is the program's (as with qemu-i386), and popek says so when
//! one of those is also a popek option. The program's view of its
//! arguments is checked against running it natively.

use std::process::{Command, Output};

const POPEK: &str = env!("CARGO_BIN_EXE_popek");

fn popek(args: &[&str]) -> Output {
    Command::new(POPEK).args(args).output().expect("run popek")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `user-hello` run natively with `args`: what it prints (its argv).
fn native_user_hello(args: &[&str]) -> Vec<u8> {
    let g = popek_guests::find("user-hello").expect("bundled");
    let out = Command::new(g.path)
        .args(args)
        .output()
        .expect("run natively");
    assert!(out.status.success());
    out.stdout
}

#[test]
fn a_kernel_takes_no_arguments() {
    for extra in [&["extra", "args"][..], &["--", "x"]] {
        let mut argv = vec!["run", "hello"];
        argv.extend(extra);
        let out = popek(&argv);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{argv:?}: {err}");
        assert!(out.stdout.is_empty(), "{argv:?}: the guest must not run");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("Multiboot kernel"), "{err}");
        assert!(err.contains("use --append"), "{err}");
    }
}

#[test]
fn unknown_options_are_errors_with_a_suggestion() {
    // After a kernel, before a kernel, before a Linux program.
    for argv in [
        &["run", "hello", "--stat"][..],
        &["run", "--stat", "hello"],
        &["run", "--stat", "user-hello"],
    ] {
        let out = popek(argv);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{argv:?}: {err}");
        assert!(out.stdout.is_empty(), "{argv:?}: the guest must not run");
        assert!(err.contains("unexpected argument '--stat'"), "{err}");
        assert!(
            err.contains("a similar argument exists: '--stats'"),
            "{err}"
        );
    }
    let out = popek(&["run", "hello", "--bogus-flag"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("'--bogus-flag'"));
}

#[test]
fn options_after_a_kernel_are_popeks() {
    let plain = popek(&["run", "hello"]);
    let out = popek(&["run", "hello", "--stats", "--engine", "interp"]);
    assert_eq!(out.status.code(), plain.status.code());
    assert_eq!(out.stdout, plain.stdout);
    let err = stderr(&out);
    assert!(err.contains("popek stats:"), "{err}");
    // --engine interp took effect: no translator counters.
    assert!(!err.contains("blocks translated"), "{err}");
}

#[test]
fn everything_after_a_linux_program_is_its_own() {
    // A popek option after the program goes to the program, once noted.
    let out = popek(&["run", "user-hello", "--stats", "-x", "--engine=interp"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(
        out.stdout,
        native_user_hello(&["--stats", "-x", "--engine=interp"])
    );
    assert!(!err.contains("popek stats:"), "{err}");
    let notes: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("went to the program"))
        .collect();
    assert_eq!(notes.len(), 1, "{err}");
    assert!(notes[0].contains("--stats --engine=interp"), "{err}");
    assert!(
        notes[0].contains("popek run --stats --engine=interp user-hello"),
        "{err}"
    );

    // `--` ends popek's options: no note, and the program gets the rest.
    let out = popek(&["run", "--stats", "user-hello", "--", "--stats", "a"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(out.stdout, native_user_hello(&["--stats", "a"]));
    assert!(err.contains("popek stats:"), "{err}");
    assert!(!err.contains("went to the program"), "{err}");

    // Plain arguments: nothing to say.
    let out = popek(&["run", "user-hello", "one", "two"]);
    assert_eq!(out.stdout, native_user_hello(&["one", "two"]));
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
}

/// However popek's options before the guest are spelled (a value
/// attached with `=` or given apart, a `--` ending them), the guest is
/// found where the user put it and runs as it does without them; a
/// Linux program gets the arguments after it, as natively.
#[test]
fn options_before_the_guest_in_every_spelling() {
    let dir = std::env::temp_dir().join(format!("popek-args-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let dump = dir.join("blocks.txt");
    let dump_eq = format!("--dump={}", dump.display());
    let dump_path = dump.display().to_string();
    let plain = popek(&["run", "hello"]);
    for argv in [
        &["run", dump_eq.as_str(), "hello"][..],
        &["run", "--dump", dump_path.as_str(), "hello"],
        &["run", dump_eq.as_str(), "--max-insns=100000000", "hello"],
        &["run", "--", "hello"],
        &["run", dump_eq.as_str(), "--", "hello"],
    ] {
        let _ = std::fs::remove_file(&dump);
        let out = popek(argv);
        let err = stderr(&out);
        assert_eq!(out.status.code(), plain.status.code(), "{argv:?}: {err}");
        assert_eq!(out.stdout, plain.stdout, "{argv:?}");
        assert!(!err.contains("panicked"), "{argv:?}: {err}");
        if argv.iter().any(|a| a.contains("dump")) {
            let text = std::fs::read_to_string(&dump).expect("the dump was written");
            assert!(text.contains("== block"), "{argv:?}");
        }
    }
    let out = popek(&["run", dump_eq.as_str(), "user-hello", "a", "--stats"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(out.stdout, native_user_hello(&["a", "--stats"]));
    // A guest whose name starts with `-`, after `--`: looked for as a file.
    let out = popek(&["run", "--", "-no-such-guest"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cannot read guest \"-no-such-guest\""),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
