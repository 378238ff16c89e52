//! A GDB remote stub: `popek run GUEST --gdb HOST:PORT`, as QEMU's `-s -S`.
//!
//! The machine is stopped before its first instruction until a debugger
//! connects; then the GDB Remote Serial Protocol (the `gdbstub` crate
//! speaks it) drives it:
//!
//! - **Registers** in QEMU's i386 layout (so that `info registers` reads the
//!   same under both): the eight general registers, EIP, EFLAGS, the six
//!   selectors, FS and GS bases, CR0, CR2, CR3, CR4, CR8 and EFER, the x87
//!   stack and control registers, XMM0-7 and MXCSR. General registers,
//!   EIP, EFLAGS and selectors can be written (a selector is loaded as MOV
//!   would, its descriptor from the guest's tables).
//! - **Memory** by linear address, through the guest's page tables (a walk
//!   that sets no accessed or dirty bit); writes go through RAM's write
//!   watch, so translations of written code are dropped as for any
//!   self-modifying code.
//! - **Breakpoints** (software and hardware alike, at linear addresses):
//!   the run loop stops before an engine step would start at one
//!   ([`Machine::break_at`]), and the translator never runs past one
//!   ([`popek_translate::Bt::set_breakpoints`]: blocks end before a
//!   breakpoint, the block at one is left to the dispatcher, and the
//!   translations holding an address whose breakpoint came or went are
//!   dropped).
//! - **Watchpoints** (write, read, access) are checked by the vcpu's data
//!   accesses ([`popek_vcpu::Watchpoint`]); while any is set the guest runs
//!   one interpreted instruction per step, and the stop is reported after
//!   the accessing instruction completed (as x86 data breakpoints trap).
//! - **Single-step** (`stepi`) runs one instruction on the interpreter, with
//!   device interrupts held back (QEMU's default single-step mode).
//! - **Continue, Ctrl-C, kill, detach**: after a detach the guest runs on
//!   without the debugger; a kill ends the run.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use gdbstub::arch::{Arch, Registers};
use gdbstub::common::Signal;
use gdbstub::conn::ConnectionExt;
use gdbstub::stub::run_blocking::{BlockingEventLoop, Event, WaitForStopReasonError};
use gdbstub::stub::{DisconnectReason, GdbStub, SingleThreadStopReason};
use gdbstub::target::ext::base::singlethread::{
    SingleThreadBase, SingleThreadResume, SingleThreadResumeOps, SingleThreadSingleStep,
    SingleThreadSingleStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps,
    SwBreakpoint, SwBreakpointOps, WatchKind,
};
use gdbstub::target::{Target, TargetError, TargetResult};
use popek_vcpu::{SegReg, Watchpoint};

use crate::{EngineState, Exit, Machine};

/// 32-bit x86 as popek shows it to gdb: QEMU's register layout for
/// qemu-system-i386.
pub enum I386 {}

impl Arch for I386 {
    type Usize = u32;
    type Registers = Regs;
    type BreakpointKind = usize;
    type RegId = ();

    fn target_description_xml() -> Option<&'static str> {
        Some(TARGET_XML)
    }
}

/// The target description gdb asks for (qXfer:features:read): register
/// names, sizes and order, and the bit fields of EFLAGS, CR0, CR3, CR4,
/// EFER and MXCSR that gdb prints (SDM Vol. 1 §3.4.3, Vol. 3 §2.5).
const TARGET_XML: &str = r#"<?xml version="1.0"?>
<!DOCTYPE target SYSTEM "gdb-target.dtd">
<target version="1.0">
<architecture>i386</architecture>
<feature name="org.gnu.gdb.i386.core">
<flags id="i386_eflags" size="4">
<field name="" start="22" end="31"/><field name="ID" start="21" end="21"/>
<field name="VIP" start="20" end="20"/><field name="VIF" start="19" end="19"/>
<field name="AC" start="18" end="18"/><field name="VM" start="17" end="17"/>
<field name="RF" start="16" end="16"/><field name="" start="15" end="15"/>
<field name="NT" start="14" end="14"/><field name="IOPL" start="12" end="13"/>
<field name="OF" start="11" end="11"/><field name="DF" start="10" end="10"/>
<field name="IF" start="9" end="9"/><field name="TF" start="8" end="8"/>
<field name="SF" start="7" end="7"/><field name="ZF" start="6" end="6"/>
<field name="" start="5" end="5"/><field name="AF" start="4" end="4"/>
<field name="" start="3" end="3"/><field name="PF" start="2" end="2"/>
<field name="" start="1" end="1"/><field name="CF" start="0" end="0"/>
</flags>
<reg name="eax" bitsize="32" type="int32" regnum="0"/>
<reg name="ecx" bitsize="32" type="int32"/>
<reg name="edx" bitsize="32" type="int32"/>
<reg name="ebx" bitsize="32" type="int32"/>
<reg name="esp" bitsize="32" type="data_ptr"/>
<reg name="ebp" bitsize="32" type="data_ptr"/>
<reg name="esi" bitsize="32" type="int32"/>
<reg name="edi" bitsize="32" type="int32"/>
<reg name="eip" bitsize="32" type="code_ptr"/>
<reg name="eflags" bitsize="32" type="i386_eflags"/>
<reg name="cs" bitsize="32" type="int32"/>
<reg name="ss" bitsize="32" type="int32"/>
<reg name="ds" bitsize="32" type="int32"/>
<reg name="es" bitsize="32" type="int32"/>
<reg name="fs" bitsize="32" type="int32"/>
<reg name="gs" bitsize="32" type="int32"/>
<reg name="fs_base" bitsize="32" type="int32"/>
<reg name="gs_base" bitsize="32" type="int32"/>
<reg name="k_gs_base" bitsize="32" type="int32"/>
<flags id="i386_cr0" size="4">
<field name="PG" start="31" end="31"/><field name="CD" start="30" end="30"/>
<field name="NW" start="29" end="29"/><field name="AM" start="18" end="18"/>
<field name="WP" start="16" end="16"/><field name="NE" start="5" end="5"/>
<field name="ET" start="4" end="4"/><field name="TS" start="3" end="3"/>
<field name="EM" start="2" end="2"/><field name="MP" start="1" end="1"/>
<field name="PE" start="0" end="0"/>
</flags>
<flags id="i386_cr3" size="4">
<field name="PDBR" start="12" end="31"/><field name="PCID" start="0" end="11"/>
</flags>
<flags id="i386_cr4" size="4">
<field name="LAM_SUP" start="28" end="28"/><field name="LASS" start="27" end="27"/>
<field name="UINTR" start="25" end="25"/><field name="PKS" start="24" end="24"/>
<field name="CET" start="23" end="23"/><field name="PKE" start="22" end="22"/>
<field name="SMAP" start="21" end="21"/><field name="SMEP" start="20" end="20"/>
<field name="KL" start="19" end="19"/><field name="OSXSAVE" start="18" end="18"/>
<field name="PCIDE" start="17" end="17"/><field name="FSGSBASE" start="16" end="16"/>
<field name="SMXE" start="14" end="14"/><field name="VMXE" start="13" end="13"/>
<field name="LA57" start="12" end="12"/><field name="UMIP" start="11" end="11"/>
<field name="OSXMMEXCPT" start="10" end="10"/><field name="OSFXSR" start="9" end="9"/>
<field name="PCE" start="8" end="8"/><field name="PGE" start="7" end="7"/>
<field name="MCE" start="6" end="6"/><field name="PAE" start="5" end="5"/>
<field name="PSE" start="4" end="4"/><field name="DE" start="3" end="3"/>
<field name="TSD" start="2" end="2"/><field name="PVI" start="1" end="1"/>
<field name="VME" start="0" end="0"/>
</flags>
<flags id="i386_efer" size="4">
<field name="TCE" start="15" end="15"/><field name="FFXSR" start="14" end="14"/>
<field name="LMSLE" start="13" end="13"/><field name="SVME" start="12" end="12"/>
<field name="NXE" start="11" end="11"/><field name="LMA" start="10" end="10"/>
<field name="LME" start="8" end="8"/><field name="SCE" start="0" end="0"/>
</flags>
<reg name="cr0" bitsize="32" type="i386_cr0"/>
<reg name="cr2" bitsize="32" type="int32"/>
<reg name="cr3" bitsize="32" type="i386_cr3"/>
<reg name="cr4" bitsize="32" type="i386_cr4"/>
<reg name="cr8" bitsize="32" type="int32"/>
<reg name="efer" bitsize="32" type="i386_efer"/>
<reg name="st0" bitsize="80" type="i387_ext"/>
<reg name="st1" bitsize="80" type="i387_ext"/>
<reg name="st2" bitsize="80" type="i387_ext"/>
<reg name="st3" bitsize="80" type="i387_ext"/>
<reg name="st4" bitsize="80" type="i387_ext"/>
<reg name="st5" bitsize="80" type="i387_ext"/>
<reg name="st6" bitsize="80" type="i387_ext"/>
<reg name="st7" bitsize="80" type="i387_ext"/>
<reg name="fctrl" bitsize="32" type="int" group="float"/>
<reg name="fstat" bitsize="32" type="int" group="float"/>
<reg name="ftag" bitsize="32" type="int" group="float"/>
<reg name="fiseg" bitsize="32" type="int" group="float"/>
<reg name="fioff" bitsize="32" type="int" group="float"/>
<reg name="foseg" bitsize="32" type="int" group="float"/>
<reg name="fooff" bitsize="32" type="int" group="float"/>
<reg name="fop" bitsize="32" type="int" group="float"/>
<vector id="v4f" type="ieee_single" count="4"/>
<vector id="v2d" type="ieee_double" count="2"/>
<vector id="v16i8" type="int8" count="16"/>
<vector id="v8i16" type="int16" count="8"/>
<vector id="v4i32" type="int32" count="4"/>
<vector id="v2i64" type="int64" count="2"/>
<union id="vec128">
<field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>
<field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>
<field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>
<field name="uint128" type="uint128"/>
</union>
<flags id="i386_mxcsr" size="4">
<field name="IE" start="0" end="0"/><field name="DE" start="1" end="1"/>
<field name="ZE" start="2" end="2"/><field name="OE" start="3" end="3"/>
<field name="UE" start="4" end="4"/><field name="PE" start="5" end="5"/>
<field name="DAZ" start="6" end="6"/><field name="IM" start="7" end="7"/>
<field name="DM" start="8" end="8"/><field name="ZM" start="9" end="9"/>
<field name="OM" start="10" end="10"/><field name="UM" start="11" end="11"/>
<field name="PM" start="12" end="12"/><field name="FZ" start="15" end="15"/>
</flags>
<reg name="xmm0" bitsize="128" type="vec128"/>
<reg name="xmm1" bitsize="128" type="vec128"/>
<reg name="xmm2" bitsize="128" type="vec128"/>
<reg name="xmm3" bitsize="128" type="vec128"/>
<reg name="xmm4" bitsize="128" type="vec128"/>
<reg name="xmm5" bitsize="128" type="vec128"/>
<reg name="xmm6" bitsize="128" type="vec128"/>
<reg name="xmm7" bitsize="128" type="vec128"/>
<reg name="mxcsr" bitsize="32" type="i386_mxcsr" group="vector"/>
</feature>
</target>
"#;

/// The register file in the order of [`TARGET_XML`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Regs {
    /// EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI.
    pub gpr: [u32; 8],
    /// EIP.
    pub eip: u32,
    /// EFLAGS.
    pub eflags: u32,
    /// CS, SS, DS, ES, FS, GS selectors.
    pub sel: [u32; 6],
    /// FS base, GS base, kernel GS base (0: no such MSR on a 32-bit CPU).
    pub bases: [u32; 3],
    /// CR0, CR2, CR3, CR4, CR8 (the TPR: 0 without a local APIC), EFER.
    pub ctl: [u32; 6],
    /// ST0-ST7 (80 bits each, ST(i) order).
    pub st: [[u8; 10]; 8],
    /// fctrl, fstat, ftag, fiseg, fioff, foseg, fooff, fop.
    pub fpu: [u32; 8],
    /// XMM0-XMM7.
    pub xmm: [[u8; 16]; 8],
    /// MXCSR.
    pub mxcsr: u32,
}

impl Registers for Regs {
    type ProgramCounter = u32;

    fn pc(&self) -> u32 {
        self.eip
    }

    fn gdb_serialize(&self, mut write: impl FnMut(Option<u8>)) {
        let mut word = |v: u32| v.to_le_bytes().into_iter().for_each(|b| write(Some(b)));
        self.gpr.iter().for_each(|&v| word(v));
        word(self.eip);
        word(self.eflags);
        self.sel.iter().for_each(|&v| word(v));
        self.bases.iter().for_each(|&v| word(v));
        self.ctl.iter().for_each(|&v| word(v));
        for r in &self.st {
            r.iter().for_each(|&b| write(Some(b)));
        }
        let mut word = |v: u32| v.to_le_bytes().into_iter().for_each(|b| write(Some(b)));
        self.fpu.iter().for_each(|&v| word(v));
        for r in &self.xmm {
            r.iter().for_each(|&b| write(Some(b)));
        }
        self.mxcsr
            .to_le_bytes()
            .into_iter()
            .for_each(|b| write(Some(b)));
    }

    fn gdb_deserialize(&mut self, bytes: &[u8]) -> Result<(), ()> {
        // 8+1+1+6+3+6 words, 8 x 10 bytes, 8 words, 8 x 16 bytes, 1 word.
        if bytes.len() != 25 * 4 + 80 + 32 + 128 + 4 {
            return Err(());
        }
        let mut at = 0;
        let mut word = || {
            let v = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
            at += 4;
            v
        };
        for r in &mut self.gpr {
            *r = word();
        }
        self.eip = word();
        self.eflags = word();
        for r in &mut self.sel {
            *r = word();
        }
        for r in &mut self.bases {
            *r = word();
        }
        for r in &mut self.ctl {
            *r = word();
        }
        for r in &mut self.st {
            r.copy_from_slice(&bytes[at..at + 10]);
            at += 10;
        }
        let mut word = || {
            let v = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
            at += 4;
            v
        };
        for r in &mut self.fpu {
            *r = word();
        }
        for r in &mut self.xmm {
            r.copy_from_slice(&bytes[at..at + 16]);
            at += 16;
        }
        self.mxcsr = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        Ok(())
    }
}

/// The selectors in the layout's order.
const SEGS: [SegReg; 6] = [
    SegReg::Cs,
    SegReg::Ss,
    SegReg::Ds,
    SegReg::Es,
    SegReg::Fs,
    SegReg::Gs,
];

/// How the debugger last resumed the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    Continue,
    Step,
}

/// The machine as gdbstub's target.
pub struct Session<'a> {
    m: &'a mut Machine,
    out: &'a mut dyn Write,
    err: &'a mut dyn Write,
    /// Breakpoints: software (Z0) and hardware (Z1) ones share the set, so
    /// a count per address keeps one of each.
    bps: std::collections::BTreeMap<u32, u32>,
    resume: Resume,
    /// How the run ended, once it has.
    exit: Option<Exit>,
}

impl Session<'_> {
    /// Hand the breakpoint set to the run loop and the translator.
    fn sync_breakpoints(&mut self) {
        let set: BTreeSet<u32> = self.bps.keys().copied().collect();
        if let EngineState::Bt(bt) = &mut self.m.engine {
            bt.set_breakpoints(&set);
        }
        self.m.break_at = set;
    }

    fn add_break(&mut self, addr: u32) -> bool {
        *self.bps.entry(addr).or_default() += 1;
        self.sync_breakpoints();
        true
    }

    fn remove_break(&mut self, addr: u32) -> bool {
        match self.bps.get_mut(&addr) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                self.bps.remove(&addr);
            }
            None => return false,
        }
        self.sync_breakpoints();
        true
    }

    /// Run until a stop the debugger hears about, or until `poll` says
    /// the debugger sent something.
    fn run(&mut self, mut poll: impl FnMut() -> bool) -> Option<SingleThreadStopReason<u32>> {
        let m = &mut *self.m;
        if self.resume == Resume::Step {
            // One instruction on the interpreter, no interrupt taken (as
            // QEMU steps by default).
            m.pass_break = Some(m.cpu.eip);
            let deliver = m.deliver_interrupts;
            m.deliver_interrupts = false;
            let r = m.step(1, self.out, self.err);
            m.deliver_interrupts = deliver;
            return Some(self.stopped(r, true));
        }
        m.pass_break = Some(m.cpu.eip);
        let mut last_poll = Instant::now();
        loop {
            let m = &mut *self.m;
            // With watchpoints, one interpreted instruction per step (the
            // interpreter checks every access).
            let max = if m.cpu.watchpoints.is_empty() {
                u64::MAX
            } else {
                1
            };
            let r = m.step(max, self.out, self.err);
            if r.is_some() || self.m.cpu.watch_hit.is_some() {
                if matches!(r, Some(Exit::Halted { .. })) {
                    // Halted for good: wait for the debugger (Ctrl-C), as
                    // a halted CPU under QEMU does.
                    std::thread::sleep(Duration::from_millis(10));
                    if poll() {
                        return None;
                    }
                    continue;
                }
                return Some(self.stopped(r, false));
            }
            if let Some(until) = self.m.sleep_until.take() {
                let wait = until.saturating_duration_since(Instant::now());
                std::thread::sleep(wait.min(Duration::from_millis(10)));
            }
            if last_poll.elapsed() >= Duration::from_millis(10) {
                last_poll = Instant::now();
                if poll() {
                    return None;
                }
            }
        }
    }

    /// What to tell the debugger after a step that returned `r`.
    fn stopped(&mut self, r: Option<Exit>, step: bool) -> SingleThreadStopReason<u32> {
        if let Some((addr, write)) = self.m.cpu.watch_hit.take() {
            let kind = if write {
                WatchKind::Write
            } else {
                WatchKind::Read
            };
            // (The watchpoint's own address, as gdb asked for it.)
            let addr = self
                .m
                .cpu
                .watchpoints
                .iter()
                .find(|w| w.addr <= addr.wrapping_add(7) && addr < w.addr.wrapping_add(w.len))
                .map_or(addr, |w| w.addr);
            return SingleThreadStopReason::Watch {
                tid: (),
                kind,
                addr,
            };
        }
        match r {
            None if step => SingleThreadStopReason::DoneStep,
            None | Some(Exit::Breakpoint) => SingleThreadStopReason::SwBreak(()),
            Some(e) => {
                let status = e.status();
                if let Some(msg) = e.message() {
                    let _ = writeln!(self.err, "popek: {msg}");
                }
                self.exit = Some(e);
                SingleThreadStopReason::Exited(status as u8)
            }
        }
    }
}

impl Target for Session<'_> {
    type Arch = I386;
    type Error = String;

    fn base_ops(&mut self) -> BaseOps<'_, I386, String> {
        BaseOps::SingleThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    // The guest's code is not patched with INT3: breakpoints are the run
    // loop's, so gdb's own fallback must not write into guest memory.
    fn guard_rail_implicit_sw_breakpoints(&self) -> bool {
        true
    }
}

impl SingleThreadBase for Session<'_> {
    fn read_registers(&mut self, r: &mut Regs) -> TargetResult<(), Self> {
        let cpu = &self.m.cpu;
        r.gpr = cpu.regs;
        r.eip = cpu.eip;
        r.eflags = cpu.eflags;
        for (i, s) in SEGS.iter().enumerate() {
            r.sel[i] = u32::from(cpu.seg(*s).selector);
        }
        r.bases = [cpu.seg(SegReg::Fs).base, cpu.seg(SegReg::Gs).base, 0];
        r.ctl = [cpu.cr0, cpu.cr2, cpu.cr3, cpu.cr4, 0, 0];
        // The x87 and SSE state from the FXSAVE image (SDM Vol. 1
        // §10.5.1): ST(i) in order, the status word with its TOP field.
        let img = cpu.fpu.image();
        let u16_at = |o: usize| u32::from(u16::from_le_bytes([img[o], img[o + 1]]));
        for (i, st) in r.st.iter_mut().enumerate() {
            st.copy_from_slice(&img[32 + 16 * i..32 + 16 * i + 10]);
        }
        // fctrl, fstat; the tag word and the last instruction and operand
        // pointers read as 0 (host addresses under popek; QEMU reports 0
        // too).
        r.fpu = [u16_at(0), u16_at(2), 0, 0, 0, 0, 0, 0];
        for (i, x) in r.xmm.iter_mut().enumerate() {
            x.copy_from_slice(&img[160 + 16 * i..160 + 16 * i + 16]);
        }
        r.mxcsr = u32::from_le_bytes([img[24], img[25], img[26], img[27]]);
        Ok(())
    }

    fn write_registers(&mut self, r: &Regs) -> TargetResult<(), Self> {
        let cpu = &mut self.m.cpu;
        cpu.regs = r.gpr;
        cpu.eip = r.eip;
        // Bit 1 is always set; the others as written.
        cpu.eflags = r.eflags | 2;
        for (i, s) in SEGS.iter().enumerate() {
            let sel = r.sel[i] as u16;
            if sel != cpu.seg(*s).selector {
                // Loaded as MOV Sreg would; a selector the tables refuse
                // leaves the register as it was.
                let _ = cpu.load_seg(*s, sel);
            }
        }
        cpu.cr2 = r.ctl[1];
        Ok(())
    }

    fn read_addrs(&mut self, start: u32, data: &mut [u8]) -> TargetResult<usize, Self> {
        let cpu = &self.m.cpu;
        for (i, b) in data.iter_mut().enumerate() {
            let lin = start.wrapping_add(i as u32);
            match cpu.debug_phys(lin).filter(|&p| cpu.ram.contains(p, 1)) {
                Some(p) => *b = cpu.ram.read(p, 1) as u8,
                // What could be read (gdb reports the rest unreadable).
                None if i > 0 => return Ok(i),
                None => return Err(TargetError::NonFatal),
            }
        }
        Ok(data.len())
    }

    fn write_addrs(&mut self, start: u32, data: &[u8]) -> TargetResult<(), Self> {
        let cpu = &mut self.m.cpu;
        for (i, &b) in data.iter().enumerate() {
            let lin = start.wrapping_add(i as u32);
            match cpu.debug_phys(lin).filter(|&p| cpu.ram.contains(p, 1)) {
                Some(p) => cpu.ram.write(p, 1, u64::from(b)),
                None => return Err(TargetError::NonFatal),
            }
        }
        Ok(())
    }

    fn support_resume(&mut self) -> Option<SingleThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

impl SingleThreadResume for Session<'_> {
    fn resume(&mut self, _signal: Option<Signal>) -> Result<(), String> {
        self.resume = Resume::Continue;
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<SingleThreadSingleStepOps<'_, Self>> {
        Some(self)
    }
}

impl SingleThreadSingleStep for Session<'_> {
    fn step(&mut self, _signal: Option<Signal>) -> Result<(), String> {
        self.resume = Resume::Step;
        Ok(())
    }
}

impl Breakpoints for Session<'_> {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        Some(self)
    }
}

impl SwBreakpoint for Session<'_> {
    fn add_sw_breakpoint(&mut self, addr: u32, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.add_break(addr))
    }

    fn remove_sw_breakpoint(&mut self, addr: u32, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.remove_break(addr))
    }
}

impl HwBreakpoint for Session<'_> {
    fn add_hw_breakpoint(&mut self, addr: u32, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.add_break(addr))
    }

    fn remove_hw_breakpoint(&mut self, addr: u32, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.remove_break(addr))
    }
}

impl HwWatchpoint for Session<'_> {
    fn add_hw_watchpoint(
        &mut self,
        addr: u32,
        len: u32,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        let (read, write) = match kind {
            WatchKind::Write => (false, true),
            WatchKind::Read => (true, false),
            WatchKind::ReadWrite => (true, true),
        };
        self.m.cpu.watchpoints.push(Watchpoint {
            addr,
            len: len.max(1),
            read,
            write,
        });
        Ok(true)
    }

    fn remove_hw_watchpoint(
        &mut self,
        addr: u32,
        len: u32,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        let (read, write) = match kind {
            WatchKind::Write => (false, true),
            WatchKind::Read => (true, false),
            WatchKind::ReadWrite => (true, true),
        };
        let w = Watchpoint {
            addr,
            len: len.max(1),
            read,
            write,
        };
        let ws = &mut self.m.cpu.watchpoints;
        match ws.iter().position(|x| *x == w) {
            Some(i) => {
                ws.remove(i);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// gdbstub's blocking event loop over a TCP connection.
struct Loop<'a>(std::marker::PhantomData<&'a ()>);

impl<'a> BlockingEventLoop for Loop<'a> {
    type Target = Session<'a>;
    type Connection = TcpStream;
    type StopReason = SingleThreadStopReason<u32>;

    #[allow(clippy::type_complexity)]
    fn wait_for_stop_reason(
        target: &mut Session<'a>,
        conn: &mut TcpStream,
    ) -> Result<Event<SingleThreadStopReason<u32>>, WaitForStopReasonError<String, std::io::Error>>
    {
        // A debugger that hung up counts as data (the read then fails).
        let mut poll = || conn.peek().map(|b| b.is_some()).unwrap_or(true);
        match target.run(&mut poll) {
            Some(stop) => Ok(Event::TargetStopped(stop)),
            None => {
                let byte = ConnectionExt::read(conn).map_err(WaitForStopReasonError::Connection)?;
                Ok(Event::IncomingData(byte))
            }
        }
    }

    fn on_interrupt(
        _target: &mut Session<'a>,
    ) -> Result<Option<SingleThreadStopReason<u32>>, String> {
        Ok(Some(SingleThreadStopReason::Signal(Signal::SIGINT)))
    }
}

/// Listen on `addr` (HOST:PORT) for a debugger.
pub fn listen(addr: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr).map_err(|e| format!("--gdb {addr}: cannot listen: {e}"))
}

/// Serve a debugger on `listener`: wait for one to connect (the machine
/// has not run an instruction), let it drive the machine, and go on
/// without it after a detach. The run's exit.
pub fn serve(
    m: &mut Machine,
    listener: TcpListener,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Exit {
    let addr = listener
        .local_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string());
    let _ = writeln!(
        err,
        "popek: waiting for gdb on {addr} (target remote {addr})"
    );
    let conn = match listener.accept() {
        Ok((c, _)) => c,
        Err(e) => {
            let _ = writeln!(err, "popek: --gdb: {e}");
            return Exit::DebuggerKill;
        }
    };
    drop(listener);
    let _ = conn.set_nodelay(true);
    // gdb's kill (vKill) waits for an OK that gdbstub, outside extended
    // mode, does not send: popek sends it on this clone of the socket.
    let reply = conn.try_clone().ok();
    m.debugging = true;
    let mut s = Session {
        m,
        out,
        err,
        bps: Default::default(),
        resume: Resume::Continue,
        exit: None,
    };
    let r = GdbStub::new(conn).run_blocking::<Loop<'_>>(&mut s);
    let exit = s.exit.take();
    // No breakpoints or watchpoints outlive the session.
    s.bps.clear();
    s.sync_breakpoints();
    s.m.cpu.watchpoints.clear();
    s.m.cpu.watch_hit = None;
    s.m.debugging = false;
    let Session { m, out, err, .. } = s;
    match r {
        Ok(DisconnectReason::Kill) => {
            if let Some(mut c) = reply {
                let _ = c.set_nonblocking(false);
                let _ = c.write_all(b"$OK#9a").and_then(|()| c.flush());
                let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
                let _ = std::io::Read::read(&mut c, &mut [0u8; 1]);
            }
            Exit::DebuggerKill
        }
        Ok(DisconnectReason::TargetExited(_) | DisconnectReason::TargetTerminated(_)) => {
            exit.unwrap_or(Exit::DebuggerKill)
        }
        Ok(DisconnectReason::Disconnect) => match exit {
            Some(e) => e,
            // Detached: the guest goes on by itself.
            None => m.run_with(out, err),
        },
        Err(e) => {
            let _ = writeln!(
                err,
                "popek: gdb connection: {e}; the guest goes on without it"
            );
            match exit {
                Some(e) => e,
                None => m.run_with(out, err),
            }
        }
    }
}
