//! System instructions: port I/O, CPUID, RDTSC, MSRs, the descriptor
//! tables and task register, CR0's low word, cache and TLB control, and
//! the descriptor checks LAR, LSL, VERR and VERW. Each calls its
//! [`Vcpu`] method: the same one the translator's helper calls run.

use iced_x86::{Code, Instruction, Mnemonic as M, OpKind};
use popek_vcpu::flags::ZF;
use popek_vcpu::{VResult, Vcpu};

use super::{port_operand, set_flags, size0, store_selector, store_table, table_operand};
use crate::alu::{mask, Flags};
use crate::operand::*;

/// Execute `ins` if it is one of this family's; None if it is not.
pub(super) fn execute(cpu: &mut Vcpu, ins: &Instruction) -> Option<VResult<()>> {
    let r = (|| {
        match ins.mnemonic() {
            M::In => {
                let size = size0(ins);
                let port = port_operand(cpu, ins, 1);
                let v = cpu.port_in(port, size as u8)?;
                set_reg(cpu, ins.op0_register(), v);
            }
            M::Out => {
                let size = op_size(ins, 1);
                let port = port_operand(cpu, ins, 0);
                let v = get_reg(cpu, ins.op1_register());
                cpu.port_out(port, size as u8, v)?;
            }
            M::Cpuid => cpu.cpuid(),
            M::Rdtsc => cpu.rdtsc()?,
            M::Rdmsr => cpu.rdmsr()?,
            M::Wrmsr => cpu.wrmsr()?,
            M::Lgdt | M::Lidt => {
                let (limit, base) = table_operand(cpu, ins)?;
                // A 0x66 prefix selects the 24-bit-base form.
                let op32 = !matches!(ins.code(), Code::Lgdt_m1632_16 | Code::Lidt_m1632_16);
                if ins.mnemonic() == M::Lgdt {
                    cpu.lgdt(limit, base, op32)?;
                } else {
                    cpu.lidt(limit, base, op32)?;
                }
            }
            M::Sgdt | M::Sidt => {
                let (limit, base) = if ins.mnemonic() == M::Sgdt {
                    cpu.sgdt()
                } else {
                    cpu.sidt()
                };
                store_table(cpu, ins, limit, base)?;
            }
            M::Sldt => {
                let v = u32::from(cpu.sldt());
                store_selector(cpu, ins, v)?;
            }
            M::Str => {
                let v = u32::from(cpu.str_());
                store_selector(cpu, ins, v)?;
            }
            M::Smsw => {
                let v = cpu.smsw();
                match ins.op0_kind() {
                    OpKind::Register => set_reg(cpu, ins.op0_register(), v),
                    _ => write_op(cpu, ins, 0, 2, v)?,
                }
            }
            M::Lldt => {
                let sel = read_op(cpu, ins, 0, 2)? as u16;
                cpu.lldt(sel)?;
            }
            M::Ltr => {
                let sel = read_op(cpu, ins, 0, 2)? as u16;
                cpu.ltr(sel)?;
            }
            M::Lmsw => {
                let v = read_op(cpu, ins, 0, 2)? as u16;
                cpu.lmsw(v)?;
            }
            M::Clts => cpu.clts()?,
            M::Invlpg => cpu.invlpg()?,
            M::Invd | M::Wbinvd => cpu.invd()?,
            M::Lar | M::Lsl => {
                let size = size0(ins);
                let sel = read_op(cpu, ins, 1, 2)? as u16;
                let r = if ins.mnemonic() == M::Lar {
                    cpu.lar(sel)?
                } else {
                    cpu.lsl(sel)?
                };
                match r {
                    Some(v) => {
                        set_reg(cpu, ins.op0_register(), v & mask(size));
                        set_flags(
                            cpu,
                            Flags {
                                mask: ZF,
                                value: ZF,
                            },
                        );
                    }
                    None => set_flags(cpu, Flags { mask: ZF, value: 0 }),
                }
            }
            M::Verr | M::Verw => {
                let sel = read_op(cpu, ins, 0, 2)? as u16;
                let ok = cpu.verify(sel, ins.mnemonic() == M::Verw)?;
                set_flags(
                    cpu,
                    Flags {
                        mask: ZF,
                        value: if ok { ZF } else { 0 },
                    },
                );
            }
            _ => return Ok(false),
        }
        Ok(true)
    })();
    match r {
        Ok(true) => Some(Ok(())),
        Ok(false) => None,
        Err(e) => Some(Err(e)),
    }
}
