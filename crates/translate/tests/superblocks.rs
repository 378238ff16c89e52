//! Superblocks that follow direct jumps: a switch-based interpreter
//! (dispatch through a jump table, each case jumping back to the
//! dispatch) runs under the translator as under the reference
//! interpreter, and each case's translation holds a copy of the dispatch
//! code (the jump back is followed, not a block transfer).

use std::io::Write;
use std::sync::{Arc, Mutex};

use popek_memory::GuestRam;
use popek_translate::Bt;
use popek_vcpu::{reg, Vcpu};

const DISPATCH: u32 = 0x10000;
const CASES: [u32; 3] = [0x10010, 0x10020, 0x10030];
const PROGRAM: u32 = 0x11000;
const TABLE: u32 = 0x12000;

/// The interpreter's code, program and jump table in a flat machine at
/// CPL 0: ESI walks the program's opcodes (0: EBX += 3, 1: EBX *= 5, 2:
/// the end of a round: ECX rounds, then HLT).
fn machine() -> Vcpu {
    let mut cpu = Vcpu::new(GuestRam::new(1 << 20).unwrap());
    cpu.enter_flat_protected_mode(0x08, 0x10);
    cpu.regs[reg::ESP] = 0x8000;
    cpu.regs[reg::ESI] = PROGRAM;
    cpu.regs[reg::ECX] = 200;
    cpu.regs[reg::EBX] = 1;
    cpu.eip = DISPATCH;
    let code: [(u32, &[u8]); 4] = [
        // movzx eax, byte [esi]; inc esi; jmp [eax*4 + TABLE]
        (
            DISPATCH,
            &[
                0x0F, 0xB6, 0x06, 0x46, 0xFF, 0x24, 0x85, 0x00, 0x20, 0x01, 0x00,
            ],
        ),
        // add ebx, 3; jmp DISPATCH
        (CASES[0], &[0x83, 0xC3, 0x03, 0xEB, 0xEB]),
        // imul ebx, ebx, 5; jmp DISPATCH
        (CASES[1], &[0x6B, 0xDB, 0x05, 0xEB, 0xDB]),
        // dec ecx; jz +7 (hlt); mov esi, PROGRAM; jmp DISPATCH; hlt
        (
            CASES[2],
            &[
                0x49, 0x74, 0x07, 0xBE, 0x00, 0x10, 0x01, 0x00, 0xEB, 0xC6, 0xF4,
            ],
        ),
    ];
    for (at, bytes) in code {
        assert!(cpu.ram.load(at, bytes));
    }
    let table: Vec<u8> = CASES.iter().flat_map(|c| c.to_le_bytes()).collect();
    assert!(cpu.ram.load(TABLE, &table));
    assert!(cpu.ram.load(PROGRAM, &[0, 1, 0, 0, 1, 1, 0, 2]));
    cpu
}

/// Collects what the translator's `--dump` writes.
#[derive(Clone, Default)]
struct Dump(Arc<Mutex<Vec<u8>>>);

impl Write for Dump {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_switch_interpreter_runs_as_on_the_interpreter_with_the_dispatch_in_each_case() {
    let mut want = machine();
    loop {
        match popek_interp::step(&mut want) {
            popek_interp::Step::Executed => {}
            popek_interp::Step::Halted => break,
            other => panic!("the interpreter at {:#x}: {other:?}", want.eip),
        }
    }
    let mut cpu = machine();
    let mut bt = Bt::new(None);
    let dump = Dump::default();
    bt.set_dump(Box::new(dump.clone()));
    for _ in 0..100_000 {
        if cpu.halted {
            break;
        }
        bt.step_within(&mut cpu, 1000);
    }
    assert!(cpu.halted, "the translated run ends");
    assert_eq!(cpu.regs, want.regs);
    assert_eq!(cpu.eip, want.eip);
    assert_eq!(cpu.retired, want.retired, "every instruction counted");
    // Each case's block goes on through the jump back into a copy of the
    // dispatch code and leaves by its indirect jump.
    let text = String::from_utf8(dump.0.lock().unwrap().clone()).unwrap();
    for case in CASES {
        let block = text
            .split("== block ")
            .find(|b| b.starts_with(&format!("{case:#010x}")))
            .unwrap_or_else(|| panic!("no translation at {case:#x}:\n{text}"));
        if case == CASES[2] {
            // The last case's jump follows its conditional branch.
            assert!(block.contains("side exit"), "{block}");
        }
        assert!(block.contains("jump followed"), "{block}");
        assert!(block.contains("exit indirect"), "{block}");
        assert!(block.contains("movzx eax,byte ptr [esi]"), "{block}");
    }
}
