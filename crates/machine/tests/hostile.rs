//! Guests that do what popek does not model, or that misbehave: each run
//! ends with a clear report naming the guest address and instruction bytes,
//! never a panic or a hang. The guests are assembled here with iced-x86 and
//! wrapped in a Multiboot image using the a.out-kludge header fields.

use iced_x86::code_asm::*;
use popek_machine::{Config, Engine, Exit, Machine};

mod common;

const LOAD: u32 = 0x10_0000;
const CODE: u32 = LOAD + 32;

/// A Multiboot image: header (with load addresses) followed by the code.
fn image(f: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    f(&mut a);
    raw_image(&a.assemble(u64::from(CODE)).unwrap())
}

/// A Multiboot image around hand-assembled code at `CODE`.
fn raw_image(code: &[u8]) -> Vec<u8> {
    common::multiboot_image(LOAD, CODE, code)
}

fn run_on(img: &[u8], engine: Engine, cache_blocks: Option<usize>) -> (Exit, Vec<u8>) {
    let config = Config {
        max_insns: Some(1_000_000),
        engine,
        cache_blocks: cache_blocks.and_then(std::num::NonZeroUsize::new),
        ..Config::default()
    };
    let mut m = Machine::multiboot(img, config).unwrap();
    let mut out = Vec::new();
    let e = m.run(&mut out);
    (e, out)
}

/// Run under the interpreter and under the translator (unbounded cache and
/// a two-block cache); all must agree (the budget counts steps, which
/// differ between engines, so a budget exit is compared by kind only).
fn run(img: &[u8]) -> (Exit, Vec<u8>) {
    let (ei, oi) = run_on(img, Engine::Interp, None);
    for cache in [None, Some(2)] {
        let (eb, ob) = run_on(img, Engine::Bt, cache);
        assert_eq!(ob, oi, "output under bt (cache {cache:?})");
        match (&ei, &eb) {
            (Exit::BudgetExhausted { .. }, Exit::BudgetExhausted { .. }) => {}
            _ => assert_eq!(eb, ei, "exit under bt (cache {cache:?})"),
        }
    }
    (ei, oi)
}

#[test]
fn task_gate_is_reported_as_unsupported() {
    // IDT at 0x2000 with a task gate for vector 0x30; then INT 0x30.
    let img = image(|a| {
        a.mov(dword_ptr(0x2000 + 0x30 * 8), 0x0028_0000u32).unwrap();
        a.mov(dword_ptr(0x2000 + 0x30 * 8 + 4), 0x0000_8500u32)
            .unwrap();
        a.mov(word_ptr(0x3000), 0x7FFu32).unwrap();
        a.mov(dword_ptr(0x3002), 0x2000u32).unwrap();
        a.lidt(ptr(0x3000)).unwrap();
        a.int(0x30).unwrap();
    });
    let (e, _) = run(&img);
    let Exit::Unsupported {
        ref what,
        eip,
        ref bytes,
    } = e
    else {
        panic!("{e:?}")
    };
    assert!(what.contains("task gate"), "{what}");
    assert_eq!(bytes, &[0xCD, 0x30]);
    let msg = e.message().unwrap();
    assert!(
        msg.contains(&format!("eip={eip:#010x}")) && msg.contains("[cd 30]"),
        "{msg}"
    );
    assert_eq!(msg.lines().count(), 1);
    assert_eq!(e.status(), 2);
}

#[test]
fn leaving_protected_mode_is_reported() {
    let img = image(|a| {
        a.mov(eax, cr0).unwrap();
        a.and(eax, 0xFFFF_FFFEu32).unwrap();
        a.mov(cr0, eax).unwrap();
    });
    let (e, _) = run(&img);
    assert!(
        matches!(e, Exit::Unsupported { ref what, ref bytes, .. }
            if what.contains("real mode") && bytes == &[0x0F, 0x22, 0xC0]),
        "{e:?}"
    );
}

#[test]
fn jump_into_unassigned_memory_ends_in_a_triple_fault_report() {
    // No IDT: the #UD from the all-ones bytes cannot be delivered.
    let img = image(|a| {
        a.mov(word_ptr(0x3000), 0u32).unwrap();
        a.lidt(ptr(0x3000)).unwrap();
        a.mov(eax, 0xFFFF_F000u32).unwrap();
        a.jmp(eax).unwrap();
    });
    let (e, _) = run(&img);
    let Exit::TripleFault { eip, .. } = e else {
        panic!("{e:?}")
    };
    assert_eq!(eip, 0xFFFF_F000);
}

#[test]
fn wild_stores_over_the_whole_address_space_are_contained() {
    // Store at every 16 MiB step of the 4 GiB space, at the top dword (the
    // access wraps), push and pop with ESP at 2, 0 and 0xFFFFFFFE; then
    // report through the UART. Under bt these accesses fault in the guest
    // window's guard and are redone by the interpreter.
    let img = image(|a| {
        let mut lp = a.create_label();
        a.xor(eax, eax).unwrap();
        a.set_label(&mut lp).unwrap();
        a.mov(dword_ptr(eax + 0x10), 0xDEAD_BEEFu32).unwrap();
        a.add(eax, 0x0100_0000u32).unwrap();
        a.jnz(lp).unwrap();
        a.mov(dword_ptr(0xFFFF_FFFEu32), 0x1234_5678u32).unwrap();
        a.mov(esp, 2u32).unwrap();
        a.push(eax).unwrap();
        a.mov(esp, 0u32).unwrap();
        a.push(eax).unwrap();
        a.pop(ecx).unwrap();
        a.mov(esp, 0xFFFF_FFFEu32).unwrap();
        a.pop(ecx).unwrap();
        a.mov(dx, 0x3F8u32).unwrap();
        a.mov(al, b'k' as u32).unwrap();
        a.out(dx, al).unwrap();
        a.mov(al, 0u32).unwrap();
        a.out(0xF4, al).unwrap();
    });
    let (e, out) = run(&img);
    assert_eq!(out, b"k");
    assert_eq!(e, Exit::DebugExit(1));
}

#[test]
fn runaway_loop_is_stopped_by_the_budget() {
    let img = image(|a| {
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        a.jmp(l).unwrap();
    });
    let (e, _) = run(&img);
    assert_eq!(
        e,
        Exit::BudgetExhausted {
            executed: 1_000_000,
            eip: CODE
        }
    );
    assert_eq!(e.status(), 4);
}

#[test]
fn hlt_with_interrupts_off_halts_for_good() {
    let img = image(|a| {
        a.cli().unwrap();
        a.hlt().unwrap();
    });
    let (e, _) = run(&img);
    assert_eq!(e, Exit::Halted { eip: CODE + 2 });
    assert_eq!(e.status(), 0);
}

#[test]
fn self_modifying_code_takes_effect_at_once() {
    // L: mov al, 'A'; out dx, al; mov byte [L+1], 'B'; dec ecx; jnz L
    // The second iteration must print the patched immediate: "AB".
    let l = CODE + 9;
    let mut code = vec![
        0xB9, 2, 0, 0, 0, 0x66, 0xBA, 0xF8, 0x03, 0xB0, b'A', 0xEE, 0xC6, 0x05,
    ];
    code.extend_from_slice(&(l + 1).to_le_bytes());
    code.extend_from_slice(&[b'B', 0x49, 0x75, 0xF3, 0xB0, 0x00, 0xE6, 0xF4]);
    let (e, out) = run(&raw_image(&code));
    assert_eq!(out, b"AB");
    assert_eq!(e, Exit::DebugExit(1));
}

#[test]
fn code_patching_the_next_instruction_of_its_own_block() {
    // mov byte [N+1], 'Z'; N: mov al, '?'; out to the UART; exit
    let n = CODE + 7;
    let mut code = vec![0xC6, 0x05];
    code.extend_from_slice(&(n + 1).to_le_bytes());
    code.extend_from_slice(&[
        b'Z', 0xB0, b'?', 0x66, 0xBA, 0xF8, 0x03, 0xEE, 0xB0, 0x00, 0xE6, 0xF4,
    ]);
    let (_, out) = run(&raw_image(&code));
    assert_eq!(out, b"Z");
}

#[test]
fn loop_and_jecxz_agree_across_engines() {
    // eax = 3 * 5 via LOOP, flags from the ADD survive the LOOP's ECX
    // decrement, JECXZ skips a store; print 0x40 + eax and the carry flag.
    let img = image(|a| {
        let mut l = a.create_label();
        let mut z = a.create_label();
        a.mov(ecx, 5u32).unwrap();
        a.xor(eax, eax).unwrap();
        a.set_label(&mut l).unwrap();
        a.add(eax, 3u32).unwrap();
        a.stc().unwrap();
        a.loop_(l).unwrap();
        a.setc(bl).unwrap();
        a.jecxz(z).unwrap();
        a.mov(eax, 0x21u32).unwrap();
        a.set_label(&mut z).unwrap();
        a.add(al, 0x40u32).unwrap();
        a.mov(dx, 0x3F8u32).unwrap();
        a.out(dx, al).unwrap();
        a.mov(al, bl).unwrap();
        a.add(al, 0x30u32).unwrap();
        a.out(dx, al).unwrap();
        a.mov(al, 0u32).unwrap();
        a.out(0xF4, al).unwrap();
    });
    let (e, out) = run(&img);
    assert_eq!(out, b"O1");
    assert_eq!(e, Exit::DebugExit(1));
}

#[test]
fn indirect_call_and_jump_through_memory() {
    // mov eax, F; call eax; mov [0x3000], G; jmp [0x3000]; hlt
    // G: exit(0)   F: print 'K'; ret
    let (f, g) = (CODE + 28, CODE + 24);
    let mut code = vec![0xB8];
    code.extend_from_slice(&f.to_le_bytes());
    code.extend_from_slice(&[0xFF, 0xD0, 0xC7, 0x05, 0x00, 0x30, 0x00, 0x00]);
    code.extend_from_slice(&g.to_le_bytes());
    code.extend_from_slice(&[0xFF, 0x25, 0x00, 0x30, 0x00, 0x00, 0xF4]);
    code.extend_from_slice(&[0xB0, 0x00, 0xE6, 0xF4]);
    code.extend_from_slice(&[0x66, 0xBA, 0xF8, 0x03, 0xB0, b'K', 0xEE, 0xC3]);
    assert_eq!(code.len(), 36);
    let (e, out) = run(&raw_image(&code));
    assert_eq!(out, b"K");
    assert_eq!(e, Exit::DebugExit(1));
}

#[test]
fn fs_and_gs_bases_are_honoured_and_followed_when_they_change() {
    // GDT at 0x4000: 0x08 code and 0x10 data (flat, as the Multiboot state
    // has them), 0x18 data based at 0x8000 with a 4 GiB limit, 0x20 data
    // based at 0x8000 with a 4 KiB limit, 0x28 data based at 0x9000 with
    // a 4 GiB limit.
    let desc = |base: u32, flat: bool| -> (u32, u32) {
        let lo = (base & 0xFFFF) << 16 | if flat { 0xFFFF } else { 0x0FFF };
        let hi = (base & 0xFF00_0000)
            | (base >> 16 & 0xFF)
            | if flat { 0x00CF_9200 } else { 0x0040_9200 };
        (lo, hi)
    };
    let img = image(|a| {
        let gdt = [
            (0, 0),
            (0x0000_FFFF, 0x00CF_9A00),
            (0x0000_FFFF, 0x00CF_9200),
            desc(0x8000, true),
            desc(0x8000, false),
            desc(0x9000, true),
        ];
        for (i, (lo, hi)) in gdt.iter().enumerate() {
            a.mov(dword_ptr(0x4000 + 8 * i as u32), *lo).unwrap();
            a.mov(dword_ptr(0x4004 + 8 * i as u32), *hi).unwrap();
        }
        a.mov(word_ptr(0x3000), 6 * 8 - 1).unwrap();
        a.mov(dword_ptr(0x3002), 0x4000u32).unwrap();
        a.lgdt(ptr(0x3000)).unwrap();
        a.mov(dword_ptr(0x8010), u32::from(b'A')).unwrap();
        a.mov(dword_ptr(0x9010), u32::from(b'Z')).unwrap();
        a.mov(ax, 0x18u32).unwrap();
        a.mov(fs, ax).unwrap();
        a.mov(ax, 0x20u32).unwrap();
        a.mov(gs, ax).unwrap();
        a.mov(dx, 0x3F8u32).unwrap();
        a.mov(ecx, 3u32).unwrap();
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        a.mov(eax, dword_ptr(0x10).fs()).unwrap();
        a.add(byte_ptr(0x10).fs(), 1u32).unwrap();
        a.out(dx, al).unwrap();
        a.mov(ebx, 0x10u32).unwrap();
        a.mov(al, byte_ptr(ebx).gs()).unwrap();
        a.out(dx, al).unwrap();
        a.loop_(l).unwrap();
        // The same code with a new FS base the second time round:
        // translations that used the old base must not run again.
        a.mov(esi, 2u32).unwrap();
        let mut m = a.create_label();
        a.jmp(m).unwrap(); // M starts a block both times
        a.set_label(&mut m).unwrap();
        a.mov(eax, dword_ptr(0x10).fs()).unwrap();
        a.out(dx, al).unwrap();
        a.mov(ax, 0x28u32).unwrap();
        a.mov(fs, ax).unwrap();
        a.dec(esi).unwrap();
        a.jnz(m).unwrap();
        a.mov(al, 0u32).unwrap();
        a.out(0xF4, al).unwrap();
    });
    let (e, out) = run(&img);
    assert_eq!(String::from_utf8_lossy(&out), "ABBCCDDZ");
    assert_eq!(e, Exit::DebugExit(1));
}

/// Code translated under guest paging, paging turned off again, then that
/// code rewritten: the physical window translated code uses with paging
/// off (dropped while paging was on, made again now) must keep the code's
/// page read-only, so the write is noticed and the new bytes run.
#[test]
fn code_rewritten_after_paging_goes_off_again_runs_anew() {
    // f (mov eax, 1; ret) right after a short jump over it: its immediate
    // is at CODE + 3.
    let img = image(|a| {
        let mut f = a.create_label();
        let mut l = a.create_label();
        let mut start = a.create_label();
        a.jmp(start).unwrap();
        a.set_label(&mut f).unwrap();
        a.mov(eax, 1u32).unwrap();
        a.ret().unwrap();
        a.set_label(&mut start).unwrap();
        // One 4 MiB identity page (PSE) from a directory at 0x200000.
        a.mov(dword_ptr(0x20_0000), 0x83u32).unwrap();
        a.mov(eax, cr4).unwrap();
        a.or(eax, 0x10).unwrap();
        a.mov(cr4, eax).unwrap();
        a.mov(eax, 0x20_0000u32).unwrap();
        a.mov(cr3, eax).unwrap();
        a.mov(eax, cr0).unwrap();
        a.or(eax, 0x8000_0000u32 as i32).unwrap();
        a.mov(cr0, eax).unwrap();
        // Translated (and its page watched) with paging on.
        a.mov(ecx, 100u32).unwrap();
        a.set_label(&mut l).unwrap();
        a.call(f).unwrap();
        a.loop_(l).unwrap();
        // Paging off; f's immediate becomes 2; f again.
        a.mov(ebx, cr0).unwrap();
        a.and(ebx, 0x7FFF_FFFF).unwrap();
        a.mov(cr0, ebx).unwrap();
        a.call(f).unwrap();
        a.mov(ebx, eax).unwrap();
        a.mov(byte_ptr(CODE + 3), 2u32).unwrap();
        a.call(f).unwrap();
        a.lea(eax, eax + ebx * 4 + 0x40).unwrap();
        a.mov(dx, 0x3F8u32).unwrap();
        a.out(dx, al).unwrap();
        a.mov(al, 0u32).unwrap();
        a.out(0xF4, al).unwrap();
    });
    let (e, out) = run(&img);
    // 2 + 1 * 4 + 0x40: the first call after paging went off still ran the
    // old bytes (1), the one after the write the new ones (2).
    assert_eq!(out, b"F");
    assert_eq!(e, Exit::DebugExit(1));
}
