//! Real C programs against the host: built here with `gcc -m32 -static`
//! (glibc, Debian's gcc-multilib), run natively (the kernel's IA32
//! emulation) and under popek with both engines. stdout and the exit
//! status must be identical to native execution.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use popek_machine::linux::Start;
use popek_machine::{Config, Engine, Machine};

fn build(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("popek-glibc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/c/{name}.c"));
    let exe = dir.join(name);
    let out = Command::new("gcc")
        .args(["-m32", "-static", "-O2", "-o"])
        .arg(&exe)
        .arg(&src)
        .arg("-lm")
        .output()
        .expect("gcc");
    assert!(
        out.status.success(),
        "gcc -m32 -static failed (is gcc-multilib installed?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

const ENV: [(&str, &str); 2] = [("POPEK_TEST_VAR", "from the test"), ("LC_ALL", "C")];

/// stdout and exit status of a native run, then under each engine.
fn check(exe: &Path, args: &[&str]) {
    let native = Command::new(exe)
        .args(args)
        .env_clear()
        .envs(ENV)
        .output()
        .expect("run natively");
    let native_status = native
        .status
        .code()
        .unwrap_or_else(|| 128 + native.status.signal().unwrap());
    let image = std::fs::read(exe).unwrap();
    let mut argv = vec![exe.display().to_string()];
    argv.extend(args.iter().map(|s| s.to_string()));
    for engine in [Engine::Bt, Engine::Interp] {
        let start = Start {
            args: argv.clone(),
            env: ENV.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            exe: exe.to_path_buf(),
            strace: false,
            random_seed: None,
            sysroot: None,
        };
        let config = Config {
            engine,
            max_insns: Some(500_000_000),
            ..Config::default()
        };
        let mut m = Machine::linux_with(&image, start, config).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let exit = m.run_with(&mut out, &mut err);
        assert_eq!(
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&native.stdout),
            "{engine:?}: stdout differs from native ({exit:?}; stderr: {})",
            String::from_utf8_lossy(&err)
        );
        assert_eq!(exit.status(), native_status, "{engine:?}: exit status");
        assert_eq!(err, native.stderr, "{engine:?}: stderr");
    }
}

/// printf (integers, floats, long double), qsort, malloc/free/realloc
/// (brk, mmap, mremap), stdio and raw file I/O, stat, access, unlink,
/// string functions, setjmp/longjmp, getenv, exit status 17.
#[test]
fn libc_program_matches_native() {
    let exe = build("libc");
    let dir = std::env::temp_dir().join(format!("popek-glibc-io-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    check(&exe, &[dir.to_str().unwrap()]);
}

/// x87: transcendental and other instructions printed bit for bit,
/// rounding modes through FLDCW, FXAM, comparisons, FBSTP/FBLD,
/// FNSTENV/FLDENV, FNSAVE/FRSTOR, libm.
#[test]
fn x87_results_are_bit_identical_to_the_host() {
    check(&build("x87"), &[]);
}
