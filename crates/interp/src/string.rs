//! String instructions: MOVS, STOS, LODS, CMPS, SCAS, INS, OUTS with
//! REP/REPE/REPNE, DF, and 16- or 32-bit addressing.
//!
//! A REP instruction runs at most [`CHUNK`] iterations per step and then
//! re-executes (EIP stays on it), so a long copy does not starve the run
//! loop and an interrupt could be taken between iterations, as on hardware.
//! Each iteration commits ESI/EDI/ECX only after its memory accesses
//! succeeded, so a fault leaves the completed iterations' progress.
//!
//! REP MOVS and REP STOS going up (DF = 0) with 32-bit addresses take a
//! bulk path: runs that stay inside one page on each side, in RAM, pass
//! their segment checks and translate without a fault are done as one
//! memmove or fill (for MOVS only when the destination does not overlap
//! the source from above, where the element-by-element result differs).
//! Whatever the bulk path declines, the element loop does, faulting at the
//! exact element.

use iced_x86::{Instruction, Mnemonic as M, OpKind};
use popek_vcpu::flags::{DF, ZF};
use popek_vcpu::{reg, SegReg, VResult, Vcpu};

use crate::alu;
use crate::operand::seg_of;

/// Iterations of a REP string instruction per step.
pub const CHUNK: u32 = 4096;

pub fn execute(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let m = ins.mnemonic();
    let size: u32 = match m {
        M::Movsb | M::Stosb | M::Lodsb | M::Cmpsb | M::Scasb | M::Insb | M::Outsb => 1,
        M::Movsw | M::Stosw | M::Lodsw | M::Cmpsw | M::Scasw | M::Insw | M::Outsw => 2,
        _ => 4,
    };
    let a16 = (0..ins.op_count())
        .any(|i| matches!(ins.op_kind(i), OpKind::MemorySegSI | OpKind::MemoryESDI));
    let amask = if a16 { 0xFFFF } else { u32::MAX };
    let rep = ins.has_rep_prefix() || ins.has_repne_prefix();
    let cond = matches!(
        m,
        M::Cmpsb | M::Cmpsw | M::Cmpsd | M::Scasb | M::Scasw | M::Scasd
    );
    let src_seg = seg_of(ins.memory_segment());
    let step = if cpu.eflags & DF != 0 {
        size.wrapping_neg()
    } else {
        size
    };
    let adv = |v: u32| (v & !amask) | (v.wrapping_add(step) & amask);
    let start_eip = ins.ip32();
    let mut n = 0;
    let bulk_kind = match m {
        _ if !rep || a16 || step != size => None,
        M::Movsb | M::Movsw | M::Movsd => Some(true),
        M::Stosb | M::Stosw | M::Stosd => Some(false),
        _ => None,
    };
    loop {
        if let Some(movs) = bulk_kind {
            let budget = (CHUNK - n).min(cpu.regs[reg::ECX]);
            let k = bulk_run(cpu, movs, src_seg, size, budget);
            if k > 0 {
                n += k;
                let bytes = k * size;
                if movs {
                    cpu.regs[reg::ESI] = cpu.regs[reg::ESI].wrapping_add(bytes);
                }
                cpu.regs[reg::EDI] = cpu.regs[reg::EDI].wrapping_add(bytes);
                cpu.regs[reg::ECX] -= k;
                continue;
            }
        }
        if rep && cpu.regs[reg::ECX] & amask == 0 {
            return Ok(());
        }
        if n == CHUNK {
            cpu.eip = start_eip;
            return Ok(());
        }
        n += 1;
        let si = cpu.regs[reg::ESI];
        let di = cpu.regs[reg::EDI];
        let acc = cpu.regs[reg::EAX] & alu::mask(size);
        let (mut new_si, mut new_di) = (si, di);
        match m {
            M::Movsb | M::Movsw | M::Movsd => {
                let v = cpu.read_mem(src_seg, si & amask, size)?;
                cpu.write_mem(SegReg::Es, di & amask, size, v)?;
                new_si = adv(si);
                new_di = adv(di);
            }
            M::Stosb | M::Stosw | M::Stosd => {
                cpu.write_mem(SegReg::Es, di & amask, size, u64::from(acc))?;
                new_di = adv(di);
            }
            M::Lodsb | M::Lodsw | M::Lodsd => {
                let v = cpu.read_mem(src_seg, si & amask, size)? as u32;
                let x = &mut cpu.regs[reg::EAX];
                *x = (*x & !alu::mask(size)) | v;
                new_si = adv(si);
            }
            M::Cmpsb | M::Cmpsw | M::Cmpsd => {
                let a = cpu.read_mem(src_seg, si & amask, size)? as u32;
                let b = cpu.read_mem(SegReg::Es, di & amask, size)? as u32;
                let (_, f) = alu::sub(a, b, false, size);
                cpu.eflags = f.apply(cpu.eflags);
                new_si = adv(si);
                new_di = adv(di);
            }
            M::Scasb | M::Scasw | M::Scasd => {
                let b = cpu.read_mem(SegReg::Es, di & amask, size)? as u32;
                let (_, f) = alu::sub(acc, b, false, size);
                cpu.eflags = f.apply(cpu.eflags);
                new_di = adv(di);
            }
            M::Insb | M::Insw | M::Insd => {
                let port = cpu.regs[reg::EDX] as u16;
                cpu.check_io(port, size as u8)?;
                // Check the destination before reading the port (a read may
                // have side effects on a device).
                cpu.seg_check(SegReg::Es, di & amask, size, popek_vcpu::mmu::Access::Write)?;
                let v = cpu.port_in(port, size as u8)?;
                cpu.write_mem(SegReg::Es, di & amask, size, u64::from(v))?;
                new_di = adv(di);
            }
            _ => {
                // OUTS
                let port = cpu.regs[reg::EDX] as u16;
                cpu.check_io(port, size as u8)?;
                let v = cpu.read_mem(src_seg, si & amask, size)? as u32;
                cpu.port_out(port, size as u8, v)?;
                new_si = adv(si);
            }
        }
        cpu.regs[reg::ESI] = new_si;
        cpu.regs[reg::EDI] = new_di;
        if !rep {
            return Ok(());
        }
        let ecx = cpu.regs[reg::ECX];
        cpu.regs[reg::ECX] = (ecx & !amask) | (ecx.wrapping_sub(1) & amask);
        if cond {
            let z = cpu.eflags & ZF != 0;
            // REPE stops on ZF = 0, REPNE on ZF = 1.
            if (ins.has_repe_prefix() && !z) || (ins.has_repne_prefix() && z) {
                return Ok(());
            }
        }
        if cpu.board.exit_requested().is_some() {
            // The guest ended the machine from inside a REP OUTS.
            if cpu.regs[reg::ECX] & amask != 0 {
                cpu.eip = start_eip;
            }
            return Ok(());
        }
    }
}

/// One bulk run of REP MOVS (`movs`) or REP STOS going up: at most
/// `budget` elements of `size` bytes, inside one page on each side.
/// Returns the elements done (0: leave this element to the loop).
fn bulk_run(cpu: &mut Vcpu, movs: bool, src_seg: SegReg, size: u32, budget: u32) -> u32 {
    use popek_vcpu::mmu::Access;
    if !cpu.watchpoints.is_empty() {
        // A debugger watches: element by element, through the checks.
        return 0;
    }
    let page_elems = |lin: u32| (0x1000 - (lin & 0xFFF)) / size;
    let di = cpu.regs[reg::EDI];
    let Ok(lin_di) = cpu.seg_check(SegReg::Es, di, size, Access::Write) else {
        return 0;
    };
    let mut k = budget.min(page_elems(lin_di));
    let mut lin_si = 0;
    if movs {
        let Ok(l) = cpu.seg_check(src_seg, cpu.regs[reg::ESI], size, Access::Read) else {
            return 0;
        };
        lin_si = l;
        k = k.min(page_elems(lin_si));
    }
    if k < 2 {
        return 0;
    }
    let len = k * size;
    // The whole run passes the segment checks (no offset wrap-around).
    let whole = |cpu: &Vcpu, s: SegReg, off: u32, access| {
        u64::from(off) + u64::from(len) <= 1 << 32 && cpu.seg_check(s, off, len, access).is_ok()
    };
    if !whole(cpu, SegReg::Es, di, Access::Write)
        || (movs && !whole(cpu, src_seg, cpu.regs[reg::ESI], Access::Read))
    {
        return 0;
    }
    let user = cpu.user();
    let src = if movs {
        match cpu.translate(lin_si, Access::Read, user) {
            Ok(p) if cpu.ram.contains(p, len) => Some(p),
            _ => return 0,
        }
    } else {
        None
    };
    let dst = match cpu.translate(lin_di, Access::Write, user) {
        Ok(p) if cpu.ram.contains(p, len) => p,
        _ => return 0,
    };
    match src {
        // The destination overlapping the source from above: each element
        // reads what an earlier one wrote; leave it to the loop.
        Some(p) if dst > p && dst < p + len => return 0,
        Some(p) => cpu.ram.copy_within_page(p, dst, len),
        None => cpu.ram.fill_within_page(dst, len, cpu.regs[reg::EAX], size),
    }
    k
}
