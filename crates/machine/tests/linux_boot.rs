//! The Linux boot protocol's 32-bit entry state (Documentation/x86/boot.rst,
//! "32-bit Boot Protocol"), checked by a protected-mode kernel of our own in
//! a minimal bzImage: protected mode with paging off, CS = __BOOT_CS (0x10),
//! DS = ES = SS = __BOOT_DS (0x18), interrupts off, ESI = boot_params (whose
//! setup header says "HdrS"), EBX = EDI = EBP = 0. The kernel reports through
//! isa-debug-exit: 0x21 when every check holds, else the number of the
//! first that failed. Under the interpreter and the translator (under
//! `--engine trap` the kernel runs deprivileged, and MOV from CS shows its
//! CPL of 3: the Popek-Goldberg violation that engine exists to show).

use iced_x86::code_asm::*;
use popek_machine::{bzimage, Config, Engine, Exit, Machine};

/// The checks, in order; a failed one exits with its number (1-based).
fn kernel() -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    let mut fail = a.create_label();
    let mut n = 0u32;
    let mut check = |a: &mut CodeAssembler, fail: &mut CodeLabel| {
        n += 1;
        a.mov(ecx, n).unwrap();
        a.jne(*fail).unwrap();
    };
    a.mov(eax, cs).unwrap();
    a.cmp(ax, 0x10).unwrap();
    check(&mut a, &mut fail);
    for s in [ds, es, ss] {
        a.mov(eax, s).unwrap();
        a.cmp(ax, 0x18).unwrap();
        check(&mut a, &mut fail);
    }
    for r in [ebx, edi, ebp] {
        a.test(r, r).unwrap();
        check(&mut a, &mut fail);
    }
    a.cmp(dword_ptr(esi + 0x202), 0x5372_6448).unwrap();
    check(&mut a, &mut fail);
    a.cmp(esi, bzimage::BOOT_PARAMS_ADDR).unwrap();
    check(&mut a, &mut fail);
    // (The protocol leaves ESP undefined: take a stack of our own.)
    a.mov(esp, 0x8000).unwrap();
    a.pushfd().unwrap();
    a.pop(eax).unwrap();
    a.and(eax, 0x200).unwrap();
    check(&mut a, &mut fail);
    a.mov(eax, cr0).unwrap();
    a.and(eax, 0x8000_0001u32 as i32).unwrap();
    a.cmp(eax, 1).unwrap();
    check(&mut a, &mut fail);
    a.mov(al, 0x21).unwrap();
    a.out(0xF4, al).unwrap();
    a.hlt().unwrap();
    a.set_label(&mut fail).unwrap();
    a.mov(eax, ecx).unwrap();
    a.out(0xF4, al).unwrap();
    a.hlt().unwrap();
    a.assemble(0x10_0000).unwrap()
}

/// A bzImage around `payload`: one setup sector, protocol 2.15, loaded
/// high at 1 MiB (boot.rst, "The Real-Mode Kernel Header").
fn bzimage_of(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 1024];
    f[0x1F1] = 1;
    f[0x1FE..0x200].copy_from_slice(&0xAA55u16.to_le_bytes());
    f[0x200] = 0xEB;
    f[0x201] = 0x6A;
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&0x020Fu16.to_le_bytes());
    f[0x211] = 1;
    f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    f[0x22C..0x230].copy_from_slice(&0x37FF_FFFFu32.to_le_bytes());
    f[0x238..0x23C].copy_from_slice(&255u32.to_le_bytes());
    f[0x260..0x264].copy_from_slice(&0x10_0000u32.to_le_bytes());
    f.extend_from_slice(payload);
    f
}

#[test]
fn the_32_bit_entry_state_is_the_boot_protocol_s() {
    let image = bzimage_of(&kernel());
    assert!(bzimage::is_bzimage(&image));
    for engine in [Engine::Interp, Engine::Bt] {
        let config = Config {
            engine,
            cmdline: "console=ttyS0".into(),
            ..Config::default()
        };
        let mut m = Machine::linux_kernel(&image, Some(b"initrd"), config).unwrap();
        let exit = m.run(&mut std::io::sink());
        assert_eq!(exit, Exit::DebugExit((0x21 << 1) | 1), "{engine:?}");
    }
}
