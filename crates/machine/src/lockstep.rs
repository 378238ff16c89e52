//! `--lockstep`: the binary translator and the reference interpreter run the
//! same guest side by side, block by block, and the first divergence is
//! reported with both machine states.
//!
//! Each round runs one translated block (the translator's dispatcher with a
//! chaining budget of one), then steps the interpreter's machine until it
//! has retired as many instructions (and, after a guest exception, which
//! retires nothing, until it reaches the same EIP). Then registers, EIP,
//! EFLAGS, segment selectors, control registers, the x87 state (less its
//! instruction and operand pointers) and device output must be
//! equal; RAM is compared every [`RAM_EVERY`] rounds and at the end.
//!
//! EFLAGS bits the SDM leaves undefined are masked: the interpreter's
//! machine tracks, instruction by instruction, which arithmetic flags the
//! last writer left undefined ([`popek_decode::flags`]); the host CPU that
//! runs translated code may set those differently, and both are right.

use std::io::Write;

use popek_decode::flags::{defined_by, to_eflags, undefined_by};
use popek_vcpu::{reg, SegReg, Vcpu};

use crate::{Exit, Machine};

/// Rounds between full RAM comparisons.
pub const RAM_EVERY: u64 = 1 << 16;

/// The first difference between the two machines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    /// Guest instructions retired (by the translator's machine) before it.
    pub retired: u64,
    /// Where the block that diverged started.
    pub block: u32,
    /// What differs.
    pub what: String,
    /// The translator's machine state.
    pub bt: String,
    /// The interpreter's machine state.
    pub interp: String,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "lockstep: first divergence after {} instructions, in the block at {:#010x}: {}",
            self.retired, self.block, self.what
        )?;
        writeln!(f, "  bt:     {}", self.bt)?;
        write!(f, "  interp: {}", self.interp)
    }
}

/// One line of machine state.
fn state(cpu: &Vcpu, mask: u32) -> String {
    let r = &cpu.regs;
    let mut s = format!("eip={:08x}", cpu.eip);
    for (i, name) in reg::NAMES.iter().enumerate() {
        s += &format!(" {name}={:08x}", r[i]);
    }
    s += &format!(" eflags={:08x}", cpu.eflags);
    if mask != 0 {
        s += &format!(" (undefined {mask:#x})");
    }
    for (n, sr) in [
        ("cs", SegReg::Cs),
        ("ss", SegReg::Ss),
        ("ds", SegReg::Ds),
        ("es", SegReg::Es),
        ("fs", SegReg::Fs),
        ("gs", SegReg::Gs),
    ] {
        s += &format!(" {n}={:04x}", cpu.seg(sr).selector);
    }
    s += &format!(" cr0={:08x} cr3={:08x}", cpu.cr0, cpu.cr3);
    s
}

/// What differs between the CPUs, ignoring the flags in `mask`.
fn differs(a: &Vcpu, b: &Vcpu, mask: u32) -> Option<String> {
    if a.eip != b.eip {
        return Some("EIP".into());
    }
    for (i, name) in reg::NAMES.iter().enumerate() {
        if a.regs[i] != b.regs[i] {
            return Some(name.to_uppercase());
        }
    }
    if (a.eflags ^ b.eflags) & !mask != 0 {
        return Some(format!("EFLAGS bits {:#x}", (a.eflags ^ b.eflags) & !mask));
    }
    for sr in SegReg::ALL {
        let (x, y) = (a.seg(sr), b.seg(sr));
        if (x.selector, x.base, x.limit) != (y.selector, y.base, y.limit) {
            return Some(format!("segment {sr:?}"));
        }
    }
    for (name, x, y) in [
        ("CR0", a.cr0, b.cr0),
        ("CR2", a.cr2, b.cr2),
        ("CR3", a.cr3, b.cr3),
        ("CR4", a.cr4, b.cr4),
    ] {
        if x != y {
            return Some(format!("{name}: bt {x:#010x}, interp {y:#010x}"));
        }
    }
    if a.halted != b.halted {
        return Some("halted".into());
    }
    if !a.fpu.same_state(&b.fpu) {
        return Some("x87 state".into());
    }
    None
}

fn ram_differs(a: &Vcpu, b: &Vcpu) -> Option<String> {
    let (x, y) = (a.ram.as_slice(), b.ram.as_slice());
    if x == y {
        return None;
    }
    let at = x.iter().zip(y).position(|(p, q)| p != q).unwrap_or(0);
    Some(format!(
        "RAM at {at:#010x}: bt {:#04x}, interp {:#04x}",
        x[at], y[at]
    ))
}

/// Step the interpreter's machine once, keeping track of the arithmetic
/// flags left undefined, and noting in `read` an instruction that reads
/// one of them (a PUSHF, a branch, ADC...).
fn interp_step(
    m: &mut Machine,
    mask: &mut u32,
    read: &mut Option<String>,
    out: &mut Vec<u8>,
    err: &mut Vec<u8>,
) -> Option<Exit> {
    let eip = m.cpu.eip;
    let ins = insn_at(m);
    let before = m.cpu.retired;
    if read.is_none() && to_eflags(ins.rflags_read()) & *mask != 0 {
        *read = Some(format!("{:?} at {eip:#010x}", ins.mnemonic()).to_lowercase());
    }
    let exit = m.step(1, out, err);
    if m.cpu.retired > before {
        *mask = (*mask & !to_eflags(defined_by(&ins))) | to_eflags(undefined_by(&ins));
    } else if read.is_none() && *mask != 0 && m.cpu.eip != eip {
        // Not retired, gone elsewhere: an exception or interrupt was
        // delivered, which pushes EFLAGS, undefined flags and all.
        *read = Some(format!(
            "EFLAGS pushed by an exception or interrupt at {eip:#010x}"
        ));
    }
    exit
}

/// Run `bt` (engine bt) and `interp` (engine interp), built from the same
/// guest, in lockstep. The translator's machine's output goes to `out` and
/// `err`; the interpreter's must be the same. Ok(exit) if they agreed to
/// the end.
pub fn run(
    bt: &mut Machine,
    interp: &mut Machine,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Agreement, Box<Divergence>> {
    let budget = bt.config.max_insns.unwrap_or(u64::MAX);
    // Both machines read the same time: the instruction clock (devices
    // and TSC), the TSC from 0 when lockstep starts (at boot); interrupts
    // are delivered at the same boundaries on both (see below).
    for m in [&mut *bt, &mut *interp] {
        m.cpu.clock_counts_instructions = true;
        m.cpu.set_tsc(0);
        m.deliver_interrupts = false;
    }
    let (mut a_out, mut a_err, mut b_out, mut b_err) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut mask = 0u32;
    let mut read: Option<String> = None;
    let mut agreement = Agreement {
        exit: Exit::Halted { eip: 0 },
        resyncs: 0,
    };
    let mut rounds = 0u64;
    // The translator's machine stopped inside a REP string instruction
    // (see below): no interrupts until it finishes.
    let mut mid_rep = false;
    // a_out[..sent] has gone to `out` already.
    let mut sent = 0usize;
    let diverge = |bt: &Machine, interp: &Machine, block: u32, what: String, mask: u32| {
        Box::new(Divergence {
            retired: bt.cpu.retired,
            block,
            what,
            bt: state(&bt.cpu, 0),
            interp: state(&interp.cpu, mask),
        })
    };
    let exit = loop {
        rounds += 1;
        if bt.cpu.retired.max(rounds) >= budget {
            break Exit::BudgetExhausted {
                executed: bt.cpu.retired.max(rounds),
                eip: bt.cpu.eip,
            };
        }
        let block = bt.cpu.eip;
        // Device interrupts at the same boundary on both machines (their
        // boards run on the same instruction clock).
        let polled = if mid_rep {
            (Ok(None), Ok(None))
        } else {
            (bt.poll_interrupts(), interp.poll_interrupts())
        };
        match polled {
            (Ok(a), Ok(b)) if a == b => {}
            (Err(a), Err(b)) if a == b => {
                let exit = bt.stop_exit(a);
                break exit;
            }
            (a, b) => {
                return Err(diverge(
                    bt,
                    interp,
                    block,
                    format!("interrupt delivery: bt {a:?}, interp {b:?}"),
                    mask,
                ))
            }
        }
        let a_exit = bt.step(crate::ONE_BLOCK, &mut a_out, &mut a_err);
        let mut b_exit = None;
        let mut idle = 0;
        while b_exit.is_none() {
            if interp.cpu.retired < bt.cpu.retired {
                b_exit = interp_step(interp, &mut mask, &mut read, &mut b_out, &mut b_err);
            } else if (interp.cpu.eip != bt.cpu.eip || a_exit.is_some()) && idle < 2 {
                // A guest exception (or a block-ending special) retired
                // nothing on one side yet.
                idle += 1;
                b_exit = interp_step(interp, &mut mask, &mut read, &mut b_out, &mut b_err);
            } else {
                break;
            }
            if a_exit.is_none() && interp.cpu.retired > bt.cpu.retired {
                break;
            }
        }
        let _ = out.write_all(&a_out[sent..]);
        sent = a_out.len();
        let _ = err.write_all(&a_err);
        // Output so far must agree as far as both have got.
        let common = a_out.len().min(b_out.len());
        if a_out[..common] != b_out[..common] || a_err != b_err {
            return Err(diverge(bt, interp, block, "device output".into(), mask));
        }
        a_out.drain(..common);
        b_out.drain(..common);
        sent -= common;
        a_err.clear();
        b_err.clear();
        match (&a_exit, &b_exit) {
            (None, None) => {}
            (Some(x), Some(y)) if x == y => break x.clone(),
            _ => {
                return Err(diverge(
                    bt,
                    interp,
                    block,
                    format!("exit: bt {a_exit:?}, interp {b_exit:?}"),
                    mask,
                ))
            }
        }
        // A REP string instruction the translator's machine left part-way
        // (a hidden page fault in its host code hands the rest to the
        // interpreter, which may stop between iterations, as the SDM
        // allows): the same instruction, retired on neither side, its
        // counts and pointers further on one. Compare once it is done.
        mid_rep = a_exit.is_none()
            && bt.cpu.eip == interp.cpu.eip
            && bt.cpu.retired == interp.cpu.retired
            && rep_string_at(bt)
            && differs(&bt.cpu, &interp.cpu, mask).is_some();
        if mid_rep {
            continue;
        }
        let what = differs(&bt.cpu, &interp.cpu, mask).or_else(|| {
            // An undefined flag read in this block may have gone to memory
            // (PUSHF, SETcc m8): compare RAM now.
            read.as_ref()
                .and_then(|_| ram_differs(&bt.cpu, &interp.cpu))
        });
        if let Some(what) = what {
            if read.is_none() {
                return Err(diverge(bt, interp, block, what, mask));
            }
            // The guest read a flag the SDM leaves undefined in this block
            // (the host CPU and the interpreter may both be right): take
            // the translator's state and go on.
            resync(bt, interp);
            agreement.resyncs += 1;
        }
        read = None;
        // Equal but for undefined flags: go on from the host CPU's values,
        // so an undefined flag cannot surface later (pushed, or read by a
        // branch) as a false divergence.
        interp.cpu.eflags = (interp.cpu.eflags & !mask) | (bt.cpu.eflags & mask);
        mask = 0;
        if rounds % RAM_EVERY == 0 {
            if let Some(what) = ram_differs(&bt.cpu, &interp.cpu) {
                return Err(diverge(bt, interp, block, what, mask));
            }
        }
    };
    if let Some(what) = ram_differs(&bt.cpu, &interp.cpu) {
        return Err(diverge(bt, interp, bt.cpu.eip, what, mask));
    }
    if a_out != b_out {
        return Err(diverge(
            bt,
            interp,
            bt.cpu.eip,
            "device output".into(),
            mask,
        ));
    }
    let _ = out.flush();
    agreement.exit = exit;
    Ok(agreement)
}

/// The instruction at the machine's EIP.
fn insn_at(m: &mut Machine) -> iced_x86::Instruction {
    let mut buf = [0u8; popek_decode::MAX_INSN_LEN];
    let eip = m.cpu.eip;
    let n = m.cpu.fetch(eip, &mut buf).0;
    popek_decode::decode_one(&buf[..n], eip, 32)
}

/// Is the instruction at the machine's EIP a REP string instruction?
fn rep_string_at(m: &mut Machine) -> bool {
    let ins = insn_at(m);
    ins.is_string_instruction() && (ins.has_rep_prefix() || ins.has_repne_prefix())
}

/// Make the interpreter's machine the translator's: registers, flags and
/// RAM (after a read of an undefined flag).
fn resync(bt: &Machine, interp: &mut Machine) {
    interp.cpu.regs = bt.cpu.regs;
    interp.cpu.eflags = bt.cpu.eflags;
    interp.cpu.eip = bt.cpu.eip;
    interp
        .cpu
        .ram
        .as_mut_slice()
        .copy_from_slice(bt.cpu.ram.as_slice());
}

/// How a lockstep run that found no divergence ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreement {
    /// How the guest's run ended (the same on both machines).
    pub exit: Exit,
    /// Times the interpreter's machine took the translator's state after
    /// the guest read an arithmetic flag the SDM leaves undefined.
    pub resyncs: u64,
}
