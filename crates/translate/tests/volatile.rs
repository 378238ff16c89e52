//! A region whose cross-page links keep being cut at address-space
//! switches (code every process maps through page tables of its own)
//! becomes volatile: a block whose link into it was cut is translated
//! again with that exit going through the indirect-branch table, once.
//! Not when the jump's target is on the block's own page and the link was
//! cross-page only because the target's translation runs on into the next
//! page: translated again, such a block would be linked the same way, and
//! it was retranslated at every switch (the Linux boot made some blocks a
//! hundred times over).

use popek_memory::GuestRam;
use popek_translate::Bt;
use popek_vcpu::{cr0, reg, Vcpu};

/// The code's linear pages (region 1) and the physical pages every
/// process maps them to.
const CODE: u32 = 0x40_0000;
const CODE_PHYS: u32 = 0x10_0000;
/// A: `test eax, eax; jz T; hlt`.
const A: u32 = CODE + 0xF00;
/// T: `inc ebx; nop` then a `mov ecx, imm32` whose last byte is on the
/// next page (so T's translation covers two pages), and `hlt` there.
const T: u32 = CODE + 0xFFA;
/// Each process's page directory and its page table for region 1.
const TABLES: u32 = 0x20_0000;

fn machine() -> Vcpu {
    let mut cpu = Vcpu::new(GuestRam::new(4 << 20).unwrap());
    cpu.enter_flat_protected_mode(0x08, 0x10);
    let a: &[u8] = &[
        0x85, 0xC0, // test eax, eax
        0x0F, 0x84, // jz T (rel32)
    ];
    let rel = T.wrapping_sub(A + 8);
    let mut code = a.to_vec();
    code.extend_from_slice(&rel.to_le_bytes());
    code.push(0xF4); // hlt
    assert!(cpu.ram.load(CODE_PHYS + (A - CODE), &code));
    let t: &[u8] = &[
        0x43, // inc ebx (at 0xFFA)
        0x90, // nop
        0xB9, 0x11, 0x22, 0x33, 0x44, // mov ecx, 0x44332211 (0xFFC..=0x1000)
        0xF4, // hlt (at 0x1001)
    ];
    assert!(cpu.ram.load(CODE_PHYS + (T - CODE), t));
    cpu
}

/// Point CR3 at process `i`'s directory: region 1 through a page table of
/// its own (so every switch changes the region's directory entry) mapping
/// the code's two pages where every other process maps them.
fn switch_to(cpu: &mut Vcpu, i: u32) {
    let dir = TABLES + i * 0x2000;
    let table = dir + 0x1000;
    cpu.ram.write(dir + 4, 4, u64::from(table | 0x3)); // P RW
    for k in 0..2 {
        cpu.ram
            .write(table + 4 * k, 4, u64::from((CODE_PHYS + 0x1000 * k) | 0x3));
    }
    cpu.cr3 = dir;
    cpu.cr0 |= cr0::PG;
}

#[test]
fn a_link_cut_into_its_own_page_does_not_retranslate_its_block() {
    let mut cpu = machine();
    let mut bt = Bt::new(None);
    let rounds = 40;
    for i in 0..rounds {
        switch_to(&mut cpu, i);
        cpu.regs[reg::EAX] = 0;
        cpu.eip = A;
        cpu.halted = false;
        for _ in 0..100 {
            if cpu.halted {
                break;
            }
            bt.step(&mut cpu);
        }
        assert!(cpu.halted, "round {i} did not reach T's HLT");
        assert_eq!(cpu.eip, CODE + 0x1002, "round {i}: stopped after T's HLT");
        assert_eq!(cpu.regs[reg::EBX], i + 1, "round {i}: T ran once");
        assert_eq!(cpu.regs[reg::ECX], 0x4433_2211);
    }
    // Each switch cut A's link into T (the new space's instruction TLB
    // holds none of T's pages yet), and the region became volatile.
    let s = &bt.stats;
    assert!(s.links_cut >= 4, "{s:?}");
    assert_eq!(s.volatile_regions, 1, "{s:?}");
    // A and T (and T's HLT), not A once per switch.
    assert!(s.blocks_translated <= 6, "{s:?}");
}
