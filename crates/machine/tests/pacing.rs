//! Translated code that counts nothing (`Pacing::Polled`, the default of
//! `popek run` without statistics) must still give control back to the
//! run loop when a device interrupt comes: a guest that spins with
//! interrupts enabled in a loop of translated code, through a self-jump,
//! an indirect jump, or a forward then a backward jump, is interrupted by
//! the PIT and ends from its handler. Without the poll page the loop would
//! never leave host code, and the test would time out.

use std::sync::mpsc;
use std::time::Duration;

use iced_x86::code_asm::*;
use popek_machine::{Config, Exit, Machine};
use popek_translate::Pacing;

mod common;

const LOAD: u32 = 0x10_0000;
const HANDLER: u32 = LOAD + 32;
const MAIN: u32 = HANDLER + 16;

/// A Multiboot image (a.out-kludge header) holding an IRQ0 handler that
/// writes isa-debug-exit, and `main` entered with interrupts off.
fn image(main: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    // mov al, 0x10; out 0xf4, al; hlt; jmp $-1
    let mut v = vec![0xB0, 0x10, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD];
    v.resize((MAIN - HANDLER) as usize, 0x90);
    let mut a = CodeAssembler::new(32).unwrap();
    // IDT at 0x2000 with an interrupt gate for vector 0x20 (IRQ0 once the
    // PIC is set up below) to the handler, on the current CS.
    a.mov(eax, cs).unwrap();
    a.shl(eax, 16).unwrap();
    a.or(eax, HANDLER & 0xFFFF).unwrap();
    a.mov(dword_ptr(0x2000 + 0x20 * 8), eax).unwrap();
    a.mov(
        dword_ptr(0x2000 + 0x20 * 8 + 4),
        (HANDLER & 0xFFFF_0000) | 0x8E00,
    )
    .unwrap();
    a.mov(word_ptr(0x3000), 0x7FFu32).unwrap();
    a.mov(dword_ptr(0x3002), 0x2000u32).unwrap();
    a.lidt(ptr(0x3000)).unwrap();
    // 8259A: ICW1-4, vectors from 0x20, only IRQ0 unmasked.
    for (port, val) in [
        (0x20u8, 0x11u8),
        (0x21, 0x20),
        (0x21, 0x04),
        (0x21, 0x01),
        (0x21, 0xFE),
        (0xA0, 0x11),
        (0xA1, 0x28),
        (0xA1, 0x02),
        (0xA1, 0x01),
        (0xA1, 0xFF),
        // 8254 channel 0, mode 2, 1193 (about 1 kHz).
        (0x43, 0x34),
        (0x40, 0xA9),
        (0x40, 0x04),
    ] {
        a.mov(al, val as u32).unwrap();
        a.out(i32::from(port), al).unwrap();
    }
    a.xor(eax, eax).unwrap();
    a.sti().unwrap();
    main(&mut a);
    v.extend_from_slice(&a.assemble(u64::from(MAIN)).unwrap());
    common::multiboot_image(LOAD, MAIN, &v)
}

/// Run `img` on bt as `popek run` does without statistics, on a thread:
/// its exit, or None if it has not ended within 30 s.
fn run_polled(img: Vec<u8>) -> Option<(Exit, Pacing)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let config = Config {
            count_insns: false,
            ..Config::default()
        };
        let mut m = Machine::multiboot(&img, config).unwrap();
        let pacing = m.engine.bt().unwrap().pacing();
        let e = m.run(&mut Vec::new());
        let _ = tx.send((e, pacing));
    });
    rx.recv_timeout(Duration::from_secs(30)).ok()
}

fn assert_interrupted(img: Vec<u8>, what: &str) {
    let (exit, pacing) = run_polled(img).unwrap_or_else(|| panic!("{what}: never interrupted"));
    assert_eq!(pacing, Pacing::Polled, "{what}");
    assert_eq!(exit, Exit::DebugExit(0x10 << 1 | 1), "{what}");
}

#[test]
fn a_self_loop_is_interrupted() {
    assert_interrupted(
        image(|a| {
            let mut top = a.create_label();
            a.set_label(&mut top).unwrap();
            a.inc(eax).unwrap();
            a.jmp(top).unwrap();
        }),
        "inc; jmp self",
    );
}

#[test]
fn loops_through_indirect_branches_are_interrupted() {
    // EBX = the loop's top: `call l1; l1: pop ebx; add ebx, 4` (one byte
    // and three), then the loop goes back through a register or a RET.
    let with = |back: fn(&mut CodeAssembler)| {
        image(move |a| {
            let mut l1 = a.create_label();
            a.call(l1).unwrap();
            a.set_label(&mut l1).unwrap();
            a.pop(ebx).unwrap();
            a.add(ebx, 4).unwrap();
            a.inc(eax).unwrap();
            back(a);
        })
    };
    assert_interrupted(with(|a| a.jmp(ebx).unwrap()), "inc; jmp ebx (to the inc)");
    assert_interrupted(
        with(|a| {
            a.push(ebx).unwrap();
            a.ret().unwrap();
        }),
        "inc; push ebx; ret",
    );
}

#[test]
fn a_loop_of_forward_and_backward_jumps_is_interrupted() {
    assert_interrupted(
        image(|a| {
            let mut top = a.create_label();
            let mut mid = a.create_label();
            a.set_label(&mut top).unwrap();
            a.inc(eax).unwrap();
            a.jmp(mid).unwrap();
            // Padding so `mid` is another block further on.
            for _ in 0..8 {
                a.nop().unwrap();
            }
            a.set_label(&mut mid).unwrap();
            a.add(eax, 3).unwrap();
            a.test(eax, 1).unwrap();
            a.jmp(top).unwrap();
        }),
        "forward then backward",
    );
}

#[test]
fn pacing_follows_what_the_run_needs() {
    let img = image(|a| {
        a.hlt().unwrap();
    });
    let pacing = |config: Config| {
        let m = Machine::multiboot(&img, config).unwrap();
        m.engine.bt().unwrap().pacing()
    };
    let quiet = Config {
        count_insns: false,
        ..Config::default()
    };
    assert_eq!(pacing(quiet.clone()), Pacing::Polled);
    assert_eq!(pacing(Config::default()), Pacing::Counted);
    let budget = Config {
        max_insns: Some(1000),
        ..quiet.clone()
    };
    assert_eq!(pacing(budget), Pacing::Counted);
    let icount = Config {
        icount: true,
        ..quiet
    };
    assert_eq!(pacing(icount), Pacing::Counted);
}
