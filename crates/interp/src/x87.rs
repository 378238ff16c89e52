//! x87 instructions: addressing, faults and the memory operand here; the
//! arithmetic on the host FPU ([`popek_vcpu::x87`]), so results are the
//! host's bit for bit.

use iced_x86::{CpuidFeature, Instruction, Mnemonic as M, OpKind};
use popek_vcpu::mmu::Access;
use popek_vcpu::x87::{host_form, FSW_ES};
use popek_vcpu::{cr0, reg, vector, Fault, VResult, Vcpu};

use crate::operand::{effective_address, seg_of};

/// Is this an x87 instruction (FWAIT included)?
pub fn is_x87(ins: &Instruction) -> bool {
    // One load by instruction code after the first time (the translator
    // asks for every instruction it lowers, the interpreter for every one
    // it runs). 1: x87, 2: not.
    static X87: popek_decode::CodeMemo = popek_decode::CodeMemo::new();
    let x87 = || {
        ins.cpuid_features().iter().any(|f| {
            matches!(
                f,
                CpuidFeature::FPU | CpuidFeature::FPU287 | CpuidFeature::FPU387
            )
        }) || matches!(ins.mnemonic(), M::Fisttp)
    };
    X87.get(ins.code(), || if x87() { 1 } else { 2 }) == 1
}

/// Does the instruction store its memory operand (rather than load it)?
fn stores(m: M) -> bool {
    matches!(
        m,
        M::Fst
            | M::Fstp
            | M::Fist
            | M::Fistp
            | M::Fisttp
            | M::Fbstp
            | M::Fnstcw
            | M::Fstcw
            | M::Fnstsw
            | M::Fstsw
            | M::Fnstenv
            | M::Fstenv
            | M::Fnsave
            | M::Fsave
    )
}

/// The no-wait forms check no pending exception (SDM Vol. 1 §8.3.12).
fn waits(m: M) -> bool {
    !matches!(
        m,
        M::Fninit | M::Fnclex | M::Fnstcw | M::Fnstsw | M::Fnstenv | M::Fnsave | M::Fnop
    )
}

/// Execute an x87 instruction (`cpu.eip` already points past it).
pub fn execute(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let m = ins.mnemonic();
    // SDM Vol. 3 §2.5: EM makes x87 instructions raise #NM (WAIT excepted),
    // TS makes them raise #NM (WAIT only with MP) so a kernel can switch
    // FPU state lazily.
    let (em, ts, mp) = (
        cpu.cr0 & cr0::EM != 0,
        cpu.cr0 & cr0::TS != 0,
        cpu.cr0 & cr0::MP != 0,
    );
    let nm = if m == M::Wait { ts && mp } else { em || ts };
    if nm {
        return Err(Fault::exc(vector::NM));
    }
    if waits(m) && cpu.fpu.fsw() & FSW_ES != 0 {
        // A pending unmasked exception from an earlier instruction.
        return Err(Fault::exc(vector::MF));
    }
    let mut bytes = [0u8; popek_decode::MAX_INSN_LEN];
    let (n, _) = cpu.fetch(ins.ip32(), &mut bytes);
    let Some(host) = host_form(&bytes[..n.min(ins.len())]) else {
        return Err(Fault::unsupported("x87 instruction form"));
    };
    let mem = ins.op_kinds().any(|k| k == OpKind::Memory);
    let size = ins.memory_size().size() as u32;
    let place = mem.then(|| (seg_of(ins.memory_segment()), effective_address(cpu, ins)));
    if let Some((s, off)) = place {
        if stores(m) {
            // Check the destination first: a fault must leave the FPU as it was.
            let lin = cpu.seg_check(s, off, size, Access::Write)?;
            let user = cpu.user();
            let mut page = lin & !0xFFF;
            let last = lin.wrapping_add(size - 1) & !0xFFF;
            loop {
                cpu.translate(page.max(lin), Access::Write, user)?;
                if page == last {
                    break;
                }
                page = page.wrapping_add(0x1000);
            }
        } else {
            let mut buf = [0u8; 128];
            for at in (0..size).step_by(8) {
                let len = (size - at).min(8);
                let v = cpu.read_mem(s, off.wrapping_add(at), len)?;
                buf[at as usize..(at + len) as usize]
                    .copy_from_slice(&v.to_le_bytes()[..len as usize]);
            }
            cpu.fpu.scratch()[..size as usize].copy_from_slice(&buf[..size as usize]);
        }
    }
    let (eflags, eax) = cpu.fpu.execute(&host, cpu.eflags, cpu.regs[reg::EAX]);
    cpu.eflags = (cpu.eflags & !0x8D5) | eflags;
    cpu.regs[reg::EAX] = eax;
    if let Some((s, off)) = place.filter(|_| stores(m)) {
        let buf = *cpu.fpu.scratch();
        for at in (0..size).step_by(8) {
            let len = (size - at).min(8);
            let mut v = [0u8; 8];
            v[..len as usize].copy_from_slice(&buf[at as usize..(at + len) as usize]);
            cpu.write_mem(s, off.wrapping_add(at), len, u64::from_le_bytes(v))?;
        }
    }
    Ok(())
}
