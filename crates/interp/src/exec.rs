//! Instruction semantics. [`execute`] dispatches on the mnemonic to the
//! instruction families (arith: data and flags; control: transfers and
//! strings; system: I/O and system state; the stack and flag instructions
//! here); operand sizes come from the decoded operands, so 8-, 16- and
//! 32-bit forms share one implementation. Special instructions call
//! [`Vcpu`] methods.

mod arith;
mod control;
mod stack;
mod system;

use iced_x86::{Code, ConditionCode, CpuidFeature, Instruction, Mnemonic as M, OpKind, Register};
use popek_vcpu::flags::{CF, DF, OF, PF, SF, ZF};
use popek_vcpu::{reg, vector, Fault, SegReg, VResult, Vcpu};

use crate::alu::{mask, sext, Flags};
use crate::operand::{effective_address, get_reg, op_size, read_op, seg_of, set_reg, write_op};
use crate::string;

#[inline]
fn set_flags(cpu: &mut Vcpu, f: Flags) {
    cpu.eflags = f.apply(cpu.eflags);
}

#[inline]
fn flag(cpu: &Vcpu, f: u32) -> bool {
    cpu.eflags & f != 0
}

/// Evaluate a condition code against EFLAGS.
pub fn condition(cpu: &Vcpu, cc: ConditionCode) -> bool {
    let (c, z, s, o, p) = (
        flag(cpu, CF),
        flag(cpu, ZF),
        flag(cpu, SF),
        flag(cpu, OF),
        flag(cpu, PF),
    );
    match cc {
        ConditionCode::o => o,
        ConditionCode::no => !o,
        ConditionCode::b => c,
        ConditionCode::ae => !c,
        ConditionCode::e => z,
        ConditionCode::ne => !z,
        ConditionCode::be => c || z,
        ConditionCode::a => !c && !z,
        ConditionCode::s => s,
        ConditionCode::ns => !s,
        ConditionCode::p => p,
        ConditionCode::np => !p,
        ConditionCode::l => s != o,
        ConditionCode::ge => s == o,
        ConditionCode::le => z || s != o,
        ConditionCode::g => !z && s == o,
        ConditionCode::None => true,
    }
}

/// Operand size of the instruction: the size of its first operand.
#[inline]
fn size0(ins: &Instruction) -> u32 {
    op_size(ins, 0)
}

/// Stack operand size of PUSH/POP/CALL/RET-like instructions.
#[inline]
fn stack_size(ins: &Instruction) -> u32 {
    ins.stack_pointer_increment().unsigned_abs()
}

/// Jump to a near target, checking it against the CS limit.
fn jump(cpu: &mut Vcpu, target: u32) -> VResult<()> {
    let cs = cpu.seg(SegReg::Cs);
    if cs.limit != u32::MAX && target > cs.limit {
        return Err(Fault::gp(0));
    }
    cpu.eip = target;
    Ok(())
}

/// Read a far pointer (offset, selector) from the memory operand.
fn far_pointer(cpu: &mut Vcpu, ins: &Instruction, off_size: u32) -> VResult<(u32, u16)> {
    let seg = seg_of(ins.memory_segment());
    let ea = effective_address(cpu, ins);
    let off = cpu.read_mem(seg, ea, off_size)? as u32;
    let sel = cpu.read_mem(seg, ea.wrapping_add(off_size), 2)? as u16;
    Ok((off, sel))
}

fn table_operand(cpu: &mut Vcpu, ins: &Instruction) -> VResult<(u16, u32)> {
    let seg = seg_of(ins.memory_segment());
    let ea = effective_address(cpu, ins);
    let limit = cpu.read_mem(seg, ea, 2)? as u16;
    let base = cpu.read_mem(seg, ea.wrapping_add(2), 4)? as u32;
    Ok((limit, base))
}

fn store_table(cpu: &mut Vcpu, ins: &Instruction, limit: u16, base: u32) -> VResult<()> {
    let seg = seg_of(ins.memory_segment());
    let ea = effective_address(cpu, ins);
    // Check both parts before writing either.
    cpu.seg_check(seg, ea, 6, popek_vcpu::mmu::Access::Write)?;
    cpu.write_mem(seg, ea, 2, u64::from(limit))?;
    cpu.write_mem(seg, ea.wrapping_add(2), 4, u64::from(base))
}

/// Store a 16-bit system value (SLDT, STR, SMSW, MOV r/m, Sreg): a register
/// destination of 32 bits is zero-extended, memory receives 16 bits.
fn store_selector(cpu: &mut Vcpu, ins: &Instruction, v: u32) -> VResult<()> {
    match ins.op0_kind() {
        OpKind::Register => {
            set_reg(cpu, ins.op0_register(), v);
            Ok(())
        }
        _ => write_op(cpu, ins, 0, 2, v),
    }
}

/// Does every CPUID feature the instruction needs exist on popek's CPU model?
fn on_cpu_model(ins: &Instruction) -> bool {
    ins.cpuid_features().iter().all(|f| {
        matches!(
            f,
            CpuidFeature::INTEL8086
                | CpuidFeature::INTEL8086_ONLY
                | CpuidFeature::INTEL186
                | CpuidFeature::INTEL286
                | CpuidFeature::INTEL386
                | CpuidFeature::INTEL486
                | CpuidFeature::CPUID
                | CpuidFeature::TSC
                | CpuidFeature::MSR
                | CpuidFeature::CX8
                | CpuidFeature::CMOV
                | CpuidFeature::PAUSE
        )
    })
}

/// Execute a decoded instruction. `cpu.eip` already points past it.
pub fn execute(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    if crate::x87::is_x87(ins) {
        return crate::x87::execute(cpu, ins);
    }
    // One match (one jump table) over every mnemonic; longer semantics
    // live in the family modules.
    match ins.mnemonic() {
        M::Add | M::Adc | M::Sub | M::Sbb | M::Cmp | M::And | M::Or | M::Xor | M::Test => {
            arith::binary_alu(cpu, ins)?
        }
        M::Inc | M::Dec => arith::x_inc(cpu, ins)?,
        M::Neg => arith::x_neg(cpu, ins)?,
        M::Not => arith::x_not(cpu, ins)?,
        M::Mul | M::Imul | M::Div | M::Idiv => arith::mul_div(cpu, ins)?,
        M::Rol | M::Ror | M::Rcl | M::Rcr | M::Shl | M::Sal | M::Shr | M::Sar => {
            arith::shift_op(cpu, ins)?
        }
        M::Shld | M::Shrd => arith::x_shld(cpu, ins)?,
        M::Bt | M::Bts | M::Btr | M::Btc => arith::bit_test(cpu, ins)?,
        M::Bsf | M::Bsr => arith::x_bsf(cpu, ins)?,
        M::Tzcnt | M::Lzcnt => arith::x_tzcnt(cpu, ins)?,
        M::Daa | M::Das | M::Aaa | M::Aas | M::Aam | M::Aad => arith::bcd(cpu, ins)?,
        M::Mov => mov(cpu, ins)?,
        M::Movzx | M::Movsx => arith::x_movzx(cpu, ins)?,
        M::Xchg => arith::x_xchg(cpu, ins)?,
        M::Xadd => arith::x_xadd(cpu, ins)?,
        M::Cmpxchg => arith::x_cmpxchg(cpu, ins)?,
        M::Cmpxchg8b => arith::x_cmpxchg8b(cpu, ins)?,
        M::Bswap => arith::x_bswap(cpu, ins)?,
        M::Lea => arith::x_lea(cpu, ins)?,
        M::Cmovo
        | M::Cmovno
        | M::Cmovb
        | M::Cmovae
        | M::Cmove
        | M::Cmovne
        | M::Cmovbe
        | M::Cmova
        | M::Cmovs
        | M::Cmovns
        | M::Cmovp
        | M::Cmovnp
        | M::Cmovl
        | M::Cmovge
        | M::Cmovle
        | M::Cmovg => arith::x_cmovo(cpu, ins)?,
        M::Seto
        | M::Setno
        | M::Setb
        | M::Setae
        | M::Sete
        | M::Setne
        | M::Setbe
        | M::Seta
        | M::Sets
        | M::Setns
        | M::Setp
        | M::Setnp
        | M::Setl
        | M::Setge
        | M::Setle
        | M::Setg => arith::x_seto(cpu, ins)?,
        M::Jmp => control::x_jmp(cpu, ins)?,
        M::Jo
        | M::Jno
        | M::Jb
        | M::Jae
        | M::Je
        | M::Jne
        | M::Jbe
        | M::Ja
        | M::Js
        | M::Jns
        | M::Jp
        | M::Jnp
        | M::Jl
        | M::Jge
        | M::Jle
        | M::Jg => control::x_jo(cpu, ins)?,
        M::Jcxz | M::Jecxz => control::x_jcxz(cpu, ins)?,
        M::Loop | M::Loope | M::Loopne => control::x_loop(cpu, ins)?,
        M::Call => control::x_call(cpu, ins)?,
        M::Ret => control::x_ret(cpu, ins)?,
        M::Retf => control::x_retf(cpu, ins)?,
        M::Iret | M::Iretd => cpu.iret(ins.mnemonic() == M::Iretd)?,
        M::Int => cpu.software_interrupt(ins.immediate8())?,
        M::Int3 => cpu.software_interrupt(vector::BP)?,
        M::Into => control::x_into(cpu, ins)?,
        M::Int1 => cpu.software_interrupt(vector::DB)?,
        M::Bound => control::x_bound(cpu, ins)?,
        M::Movsb
        | M::Movsw
        | M::Movsd
        | M::Stosb
        | M::Stosw
        | M::Stosd
        | M::Lodsb
        | M::Lodsw
        | M::Lodsd
        | M::Cmpsb
        | M::Cmpsw
        | M::Cmpsd
        | M::Scasb
        | M::Scasw
        | M::Scasd
        | M::Insb
        | M::Insw
        | M::Insd
        | M::Outsb
        | M::Outsw
        | M::Outsd => string::execute(cpu, ins)?,
        M::Push => push(cpu, ins)?,
        M::Pop => pop(cpu, ins)?,
        M::Pusha | M::Pushad => stack::x_pusha(cpu, ins)?,
        M::Popa | M::Popad => stack::x_popa(cpu, ins)?,
        M::Pushf | M::Pushfd => cpu.pushf(ins.mnemonic() == M::Pushfd)?,
        M::Popf | M::Popfd => cpu.popf(ins.mnemonic() == M::Popfd)?,
        M::Enter => enter(cpu, ins)?,
        M::Leave => stack::x_leave(cpu, ins)?,
        M::Cbw => set_reg(cpu, Register::AX, sext(cpu.regs[reg::EAX], 1) as u32),
        M::Cwde => cpu.regs[reg::EAX] = sext(cpu.regs[reg::EAX], 2) as u32,
        M::Cwd => stack::x_cwd(cpu, ins)?,
        M::Cdq => stack::x_cdq(cpu, ins)?,
        M::Xlatb => stack::x_xlatb(cpu, ins)?,
        M::Lahf => stack::x_lahf(cpu, ins)?,
        M::Sahf => stack::x_sahf(cpu, ins)?,
        M::Lds | M::Les | M::Lfs | M::Lgs | M::Lss => stack::x_lds(cpu, ins)?,
        M::Clc => cpu.eflags &= !CF,
        M::Stc => cpu.eflags |= CF,
        M::Cmc => cpu.eflags ^= CF,
        M::Cld => cpu.eflags &= !DF,
        M::Std => cpu.eflags |= DF,
        M::Cli => cpu.cli()?,
        M::Sti => cpu.sti()?,
        // ENDBR32/64 are hint NOPs (0F 1E) on a CPU without CET.
        M::Nop | M::Pause | M::Wait | M::Endbr32 | M::Endbr64 => {}
        M::Ud2 | M::Ud0 | M::Ud1 => return Err(Fault::ud()),
        M::Hlt => cpu.hlt()?,
        M::In => system::x_in(cpu, ins)?,
        M::Out => system::x_out(cpu, ins)?,
        M::Cpuid => cpu.cpuid(),
        M::Vmcall => cpu.vmcall()?,
        M::Rdtsc => cpu.rdtsc()?,
        M::Rdmsr => cpu.rdmsr()?,
        M::Wrmsr => cpu.wrmsr()?,
        M::Lgdt | M::Lidt => system::x_lgdt(cpu, ins)?,
        M::Sgdt | M::Sidt => system::x_sgdt(cpu, ins)?,
        M::Sldt => system::x_sldt(cpu, ins)?,
        M::Str => system::x_str(cpu, ins)?,
        M::Smsw => system::x_smsw(cpu, ins)?,
        M::Lldt => system::x_lldt(cpu, ins)?,
        M::Ltr => system::x_ltr(cpu, ins)?,
        M::Lmsw => system::x_lmsw(cpu, ins)?,
        M::Clts => cpu.clts()?,
        M::Invlpg => cpu.invlpg()?,
        M::Invd | M::Wbinvd => cpu.invd()?,
        M::Lar | M::Lsl => system::x_lar(cpu, ins)?,
        M::Verr | M::Verw => system::x_verr(cpu, ins)?,
        _ => {
            if on_cpu_model(ins) {
                return Err(Fault::unsupported(format!(
                    "instruction `{ins}` is not implemented by the interpreter"
                )));
            }
            // Not on a Pentium Pro-class CPU (MMX, SSE, ...): #UD, as there.
            return Err(Fault::ud());
        }
    }
    Ok(())
}

fn port_operand(cpu: &Vcpu, ins: &Instruction, i: u32) -> u16 {
    match ins.op_kind(i) {
        OpKind::Immediate8 => u16::from(ins.immediate8()),
        _ => cpu.regs[reg::EDX] as u16,
    }
}

fn mov(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let r0 = if ins.op0_kind() == OpKind::Register {
        ins.op0_register()
    } else {
        Register::None
    };
    let r1 = if ins.op1_kind() == OpKind::Register {
        ins.op1_register()
    } else {
        Register::None
    };
    if r0.is_segment_register() {
        let sel = read_op(cpu, ins, 1, 2)? as u16;
        let s = seg_of(r0);
        cpu.load_seg(s, sel)?;
        if s == SegReg::Ss {
            cpu.int_shadow = true;
        }
        return Ok(());
    }
    if r1.is_segment_register() {
        let v = u32::from(cpu.seg(seg_of(r1)).selector);
        return store_selector(cpu, ins, v);
    }
    if r0.is_cr() {
        let n = (r0 as u32 - Register::CR0 as u32) as u8;
        return cpu.mov_to_cr(n, get_reg(cpu, r1));
    }
    if r1.is_cr() {
        let n = (r1 as u32 - Register::CR0 as u32) as u8;
        let v = cpu.mov_from_cr(n)?;
        set_reg(cpu, r0, v);
        return Ok(());
    }
    if r0.is_dr() {
        let n = (r0 as u32 - Register::DR0 as u32) as u8;
        return cpu.mov_to_dr(n, get_reg(cpu, r1));
    }
    if r1.is_dr() {
        let n = (r1 as u32 - Register::DR0 as u32) as u8;
        let v = cpu.mov_from_dr(n)?;
        set_reg(cpu, r0, v);
        return Ok(());
    }
    let size = size0(ins);
    let v = read_op(cpu, ins, 1, size)?;
    write_op(cpu, ins, 0, size, v)
}

fn push(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = stack_size(ins);
    let v = match ins.op0_kind() {
        OpKind::Register if ins.op0_register().is_segment_register() => {
            // PUSH Sreg: zero-extended to the operand size (docs/quirks.md).
            get_reg(cpu, ins.op0_register())
        }
        _ => read_op(cpu, ins, 0, size)?,
    };
    cpu.push(v & mask(size), size)
}

fn pop(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = stack_size(ins);
    if ins.op0_kind() == OpKind::Register {
        let r = ins.op0_register();
        let v = cpu.peek(0, size)?;
        if r.is_segment_register() {
            let s = seg_of(r);
            cpu.load_seg(s, v as u16)?;
            if s == SegReg::Ss {
                cpu.int_shadow = true;
            }
            cpu.pop(size)?;
        } else {
            cpu.pop(size)?;
            // POP ESP loads the popped value, after the increment.
            set_reg(cpu, r, v);
        }
        return Ok(());
    }
    // POP m: the address is computed after ESP is incremented.
    let v = cpu.peek(0, size)?;
    let old_esp = cpu.regs[reg::ESP];
    cpu.pop(size)?;
    if let Err(e) = write_op(cpu, ins, 0, size, v) {
        cpu.regs[reg::ESP] = old_esp;
        return Err(e);
    }
    Ok(())
}

fn enter(cpu: &mut Vcpu, ins: &Instruction) -> VResult<()> {
    let size = if ins.code() == Code::Enterw_imm16_imm8 {
        2
    } else {
        4
    };
    let alloc = u32::from(ins.immediate16());
    let level = u32::from(ins.immediate8_2nd()) % 32;
    let big = cpu.seg(SegReg::Ss).big();
    let m = cpu.stack_mask();
    cpu.push(cpu.regs[reg::EBP] & mask(size), size)?;
    let frame_temp = cpu.regs[reg::ESP];
    if level > 0 {
        let mut ebp = cpu.regs[reg::EBP];
        for _ in 1..level {
            ebp = (ebp & !m) | (ebp.wrapping_sub(size) & m);
            let v = cpu.read_mem(SegReg::Ss, ebp & m, size)? as u32;
            cpu.push(v, size)?;
        }
        cpu.push(frame_temp & mask(size), size)?;
    }
    if big {
        if size == 4 {
            cpu.regs[reg::EBP] = frame_temp;
        } else {
            set_reg(cpu, Register::BP, frame_temp);
        }
    } else {
        set_reg(cpu, Register::BP, frame_temp);
    }
    let esp = cpu.regs[reg::ESP];
    cpu.regs[reg::ESP] = (esp & !m) | (esp.wrapping_sub(alloc) & m);
    Ok(())
}
