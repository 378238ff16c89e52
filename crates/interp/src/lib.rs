//! The reference interpreter: executes 32-bit x86 (the integer instruction
//! set of a Pentium Pro-class CPU, protected mode, flat or segmented) one
//! instruction at a time on a [`Vcpu`].
//!
//! It is popek's oracle and fallback. Arithmetic flags are computed eagerly
//! and exactly ([`alu`]); special instructions call the virtual CPU's
//! methods, the same ones the binary translator calls.
//!
//! Fault model: an instruction either completes or raises a guest
//! exception with the registers and EFLAGS it started with and EIP at the
//! instruction (the fault "restarts" it). String instructions are the
//! architectural exception: a REP string instruction interrupted by a fault
//! keeps the progress of the iterations that completed.

#![forbid(unsafe_code)]

pub mod alu;
mod exec;
pub mod operand;
mod string;
pub mod x87;

use iced_x86::Instruction;
use popek_decode::{decode_one, MAX_INSN_LEN};
use popek_vcpu::interrupt::Source;
use popek_vcpu::{flags, vector, Exception, Fault, Stop, Vcpu};

/// What one step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The instruction completed, or raised an exception that was delivered.
    Executed,
    /// The CPU is halted (HLT) and waits for an interrupt.
    Halted,
    /// The machine stopped.
    Stop(Stop),
}

/// Fetch and decode the instruction at CS:EIP.
///
/// Returns the instruction and its bytes, or the fault that fetching or
/// decoding raises (a page fault, a CS limit violation, or #UD).
pub fn fetch_decode(cpu: &mut Vcpu) -> Result<(Instruction, [u8; MAX_INSN_LEN], usize), Fault> {
    let eip = cpu.eip;
    let mut buf = [0u8; MAX_INSN_LEN];
    let (n, fetch_fault) = cpu.fetch(eip, &mut buf);
    let bitness = if cpu.code32() { 32 } else { 16 };
    let ins = decode_one(&buf[..n], eip, bitness);
    if ins.is_invalid() {
        if let Some(f) = fetch_fault {
            // Would more bytes have made a valid instruction? Then the
            // fetch fault is what the CPU raises, not #UD.
            let mut padded = buf;
            padded[n..].fill(0);
            let full = decode_one(&padded, eip, bitness);
            if n == 0 || (!full.is_invalid() && full.len() > n) {
                return Err(f);
            }
        }
        return Err(Fault::ud());
    }
    Ok((ins, buf, n))
}

/// Execute one instruction at CS:EIP (or deliver the exception it raises).
pub fn step(cpu: &mut Vcpu) -> Step {
    step_with(cpu, None)
}

/// [`step`] for the instruction at CS:EIP already decoded (by an engine
/// that decoded it when it translated the code around it, and drops that
/// translation when the bytes change): no fetch and no decoding.
pub fn step_decoded(cpu: &mut Vcpu, ins: &iced_x86::Instruction) -> Step {
    debug_assert_eq!(ins.ip32(), cpu.eip);
    step_with(cpu, Some(ins))
}

fn step_with(cpu: &mut Vcpu, decoded: Option<&iced_x86::Instruction>) -> Step {
    if cpu.halted {
        return Step::Halted;
    }
    let start_eip = cpu.eip;
    let saved_regs = cpu.regs;
    let saved_flags = cpu.eflags;
    let single_step = cpu.eflags & flags::TF != 0;
    cpu.int_shadow = false;
    let fetched = match decoded {
        Some(ins) => Ok(*ins),
        None => fetch_decode(cpu).map(|(ins, _, _)| ins),
    };
    let mut unfinished_rep = false;
    let result = match fetched {
        Ok(ins) => {
            cpu.eip = ins.next_ip32();
            let r = exec::execute(cpu, &ins).map_err(|f| (f, ins.is_string_instruction()));
            // A REP string instruction that stopped after a chunk of its
            // iterations (EIP still on it) retires once, when it is done,
            // as on hardware and in translated code.
            unfinished_rep = ins.is_string_instruction()
                && (ins.has_rep_prefix() || ins.has_repne_prefix())
                && cpu.eip == start_eip;
            r
        }
        Err(f) => Err((f, false)),
    };
    match result {
        Ok(()) if unfinished_rep => Step::Executed,
        Ok(()) => {
            cpu.retired += 1;
            if single_step && !cpu.halted {
                // Single-step trap after the instruction (SDM Vol. 3 §17.3.1.4).
                cpu.dr[6] |= 1 << 14;
                return deliver(
                    cpu,
                    Exception {
                        vector: vector::DB,
                        error: None,
                    },
                    Source::Exception,
                );
            }
            if cpu.halted {
                Step::Halted
            } else {
                Step::Executed
            }
        }
        Err((Fault::Exception(e), partial_string)) => {
            // Faults restart the instruction with the state it started with.
            if !partial_string {
                cpu.regs = saved_regs;
                cpu.eflags = saved_flags;
            }
            cpu.eip = start_eip;
            deliver(cpu, e, Source::Exception)
        }
        Err((Fault::Unsupported(what), _)) => {
            cpu.regs = saved_regs;
            cpu.eflags = saved_flags;
            cpu.eip = start_eip;
            Step::Stop(Stop::Unsupported {
                what,
                eip: start_eip,
            })
        }
    }
}

fn deliver(cpu: &mut Vcpu, e: Exception, src: Source) -> Step {
    match cpu.raise(e, src) {
        Ok(()) => Step::Executed,
        Err(stop) => Step::Stop(stop),
    }
}

/// Execute a software interrupt instruction (INT n, INT3, INTO) whose EIP
/// already points past it. Exposed for engines that lower these.
pub fn software_interrupt(cpu: &mut Vcpu, vec: u8) -> Result<(), Fault> {
    cpu.software_interrupt(vec)
}

#[cfg(test)]
mod coverage;
#[cfg(test)]
mod tests;
#[cfg(test)]
pub mod testutil;
