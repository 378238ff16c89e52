//! The minimal Linux user-mode platform against the host: tiny static i386
//! programs built here with gcc run natively (IA32 emulation) and under
//! popek; stdout, exit status and the killing signal must agree.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Command;

use popek_machine::{Config, Engine, Exit, Machine};

fn build(name: &str, asm: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("popek-linux-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join(format!("{name}.S"));
    let exe = dir.join(name);
    std::fs::write(&src, format!(".globl _start\n_start:\n{asm}\n")).unwrap();
    let out = Command::new("gcc")
        .args(["-m32", "-nostdlib", "-static", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("gcc");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// (stdout, exit status or 128 + signal) natively and under popek.
fn both(exe: &PathBuf) -> ((Vec<u8>, i32), (Vec<u8>, Exit)) {
    let n = Command::new(exe).output().expect("run natively");
    let status = n
        .status
        .code()
        .unwrap_or_else(|| 128 + n.status.signal().unwrap());
    let image = std::fs::read(exe).unwrap();
    let args = vec![exe.display().to_string()];
    let run = |engine| {
        let config = Config {
            max_insns: Some(1_000_000),
            engine,
            ..Config::default()
        };
        let mut m = Machine::linux(&image, &args, config).unwrap();
        let mut out = Vec::new();
        let mut err = Vec::new();
        let e = m.run_with(&mut out, &mut err);
        (out, e)
    };
    // Both engines must agree; the translator's result is compared with
    // the native run.
    let interp = run(Engine::Interp);
    let bt = run(Engine::Bt);
    assert_eq!(bt, interp, "bt and interp differ");
    ((n.stdout, status), bt)
}

#[test]
fn write_and_exit_group_match_native() {
    let exe = build(
        "hello",
        "mov $4, %eax\n mov $1, %ebx\n mov $msg, %ecx\n mov $6, %edx\n int $0x80\n\
         mov $252, %eax\n mov $42, %ebx\n int $0x80\n msg: .ascii \"hello\\n\"",
    );
    let ((nout, nstatus), (pout, exit)) = both(&exe);
    assert_eq!(pout, nout);
    assert_eq!(exit.status(), nstatus);
    assert_eq!(exit, Exit::Exited(42));
}

#[test]
fn selectors_seen_by_the_program_match_native() {
    // Print CS, SS, DS as raw bytes.
    let exe = build(
        "sel",
        "mov %cs, %eax\n mov %eax, buf\n mov %ss, %eax\n mov %eax, buf+4\n mov %ds, %eax\n\
         mov %eax, buf+8\n mov $4, %eax\n mov $1, %ebx\n mov $buf, %ecx\n mov $12, %edx\n\
         int $0x80\n mov $1, %eax\n xor %ebx, %ebx\n int $0x80\n .data\n buf: .long 0,0,0",
    );
    let ((nout, nstatus), (pout, exit)) = both(&exe);
    assert_eq!(pout, nout);
    assert_eq!(exit.status(), nstatus);
}

#[test]
fn faults_become_the_signals_linux_sends() {
    for (name, asm, signo) in [
        ("de", "xor %ecx, %ecx\n div %ecx", 8),
        ("ud", "ud2", 4),
        ("gp", "cli", 11),
        ("int40", "int $0x40", 11),
        ("bp", "int3", 5),
        ("segload", "mov $0x1000, %eax\n mov %eax, %ds", 11),
    ] {
        let exe = build(name, asm);
        let ((_, nstatus), (_, exit)) = both(&exe);
        assert_eq!(nstatus, 128 + signo, "{name}: native");
        assert_eq!(exit.status(), nstatus, "{name}: {exit:?}");
    }
}

#[test]
fn wild_pointers_and_the_kernel_region_fault_like_linux() {
    // An unmapped address, a write to the read-only text, and the top of
    // the address space all raise #PF, which Linux turns into SIGSEGV.
    for (name, asm) in [
        ("wild_read", "mov 0x10, %eax"),
        ("wild_write", "movl $1, 0x20000000"),
        ("text_write", "movl $1, _start"),
        ("top", "mov 0xfffffffc, %eax"),
    ] {
        let exe = build(name, asm);
        let ((_, nstatus), (_, exit)) = both(&exe);
        assert_eq!(nstatus, 128 + 11, "{name}: native");
        assert_eq!(exit.status(), nstatus, "{name}: {exit:?}");
        let Exit::Signal(f) = exit else {
            unreachable!()
        };
        assert_eq!(f.exception.vector, 14, "{name}");
    }
}

/// A block whose POPF goes to the helper (CPL 3) and whose store then
/// faults (it writes the page its own code is on) counts its instructions
/// exactly: the engines agree on the count (`both` gives each a budget
/// the guest fits in by far), and the program finishes as natively.
#[test]
fn a_fault_after_a_flags_helper_in_the_first_block_counts_exactly() {
    let exe = build(
        "popf_fault",
        ".section .wtext, \"awx\"\n\
         mov $50, %esi\n\
         again: mov $20, %eax\n int $0x80\n\
         pushf\n popf\n movl %esi, slot\n\
         dec %esi\n jnz again\n\
         mov $1, %eax\n mov slot, %ebx\n int $0x80\n\
         slot: .long 0",
    );
    let ((_, nstatus), (_, exit)) = both(&exe);
    assert_eq!(nstatus, 1, "native");
    assert_eq!(exit, Exit::Exited(1));
}

/// A process's shadow sits at host address 0 when the host allows, where
/// page 0 can never be mapped: a program that maps linear page 0 and
/// works on it and on page 1 in a loop (its shadow moves to a window
/// anywhere at the first use of page 0 under bt) gets the same results
/// under bt as under the interpreter, and as natively where the host lets
/// it map page 0.
#[test]
fn a_program_using_page_zero_runs_like_the_interpreter_says() {
    // mmap2(0, 8 KiB, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED), then
    // 1000 rounds adding the counter to [0x10] and 3 to [0x1010]; the
    // exit status is their sum's low byte: (500500 + 3000) & 0xff = 204.
    let exe = build(
        "page0",
        "mov $192, %eax\n xor %ebx, %ebx\n mov $0x2000, %ecx\n mov $3, %edx\n\
         mov $0x32, %esi\n mov $-1, %edi\n xor %ebp, %ebp\n int $0x80\n\
         mov $1000, %ecx\n\
         again: addl %ecx, 0x10\n addl $3, 0x1010\n loop again\n\
         mov 0x10, %ebx\n add 0x1010, %ebx\n and $0xff, %ebx\n\
         mov $1, %eax\n int $0x80",
    );
    let ((_, nstatus), (_, exit)) = both(&exe);
    assert_eq!(exit, Exit::Exited(204));
    // (A host that refuses page 0 to the native run kills it.)
    if nstatus != 128 + 11 {
        assert_eq!(nstatus, 204, "native");
    }
}
