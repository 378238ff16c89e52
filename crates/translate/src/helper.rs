//! Helper calls: a guest instruction that host code cannot run (a special
//! instruction, or one the lowering does not cover) runs in the middle of
//! a block through `run_helper`, on the vcpu's own methods and the
//! interpreter's semantics (one source of truth; nothing is implemented
//! twice). The guest state is stored into the [`Context`] before the call
//! and loaded after it; the helper returns 1 when the block must end
//! (control went elsewhere, the CPU stopped, a device or a written watched
//! page needs the dispatcher, or the mode changed).

use popek_interp::Step;
use popek_vcpu::Vcpu;

use crate::abi::{Context, LOOKUP_SHIFT};
use crate::cache::FastMap;
use crate::emit::HelperCall;
use crate::paging::{paging_key, seg_bases, translatable, PagingKey};
use crate::stats::KindCounts;

/// The helper call for `ins`, the `index`-th of its block's helper
/// instructions, after `counted_before` instructions the block counts.
pub(crate) fn helper_call(
    ins: &iced_x86::Instruction,
    special: bool,
    index: usize,
    counted_before: usize,
) -> HelperCall {
    HelperCall {
        arg: HelperArg {
            special,
            x87: popek_interp::x87::is_x87(ins),
            counted_before,
            index,
        }
        .encode(),
    }
}

/// May host code execute the guest's RDTSC (the host's TSC plus the
/// offset)? Not while the TSC counts instructions, nor at CPL > 0 with
/// CR4.TSD set (#GP, SDM Vol. 2 RDTSC).
pub(crate) fn tsc_native(cpu: &Vcpu) -> bool {
    !cpu.clock_counts_instructions && (cpu.cr4 & popek_vcpu::state::cr4::TSD == 0 || cpu.cpl() == 0)
}

/// Where a helper call's argument keeps the index of its decoded
/// instruction (`Bt::helper_insns`): adding `n << INDEX_SHIFT` to an
/// argument moves its index by `n`.
pub(crate) const INDEX_SHIFT: u32 = 9;

/// Where a helper call's argument keeps the instructions its block
/// retired before it (7 bits): the shared helper routine adds them to the
/// count when the helper says leave (see `emit::frame`).
pub(crate) const COUNTED_SHIFT: u32 = 2;
pub(crate) const COUNTED_MASK: u32 = 0x7F;

/// What a helper call's argument says about its instruction: bit 0
/// special, bit 1 x87, bits 2-8 the instructions its block retired before
/// it, the rest the index of its decoded form in `Bt::helper_insns`.
struct HelperArg {
    special: bool,
    x87: bool,
    counted_before: usize,
    index: usize,
}

impl HelperArg {
    fn encode(&self) -> u32 {
        debug_assert!(self.counted_before as u32 <= COUNTED_MASK);
        u32::from(self.special)
            | u32::from(self.x87) << 1
            | (self.counted_before as u32) << COUNTED_SHIFT
            | (self.index as u32) << INDEX_SHIFT
    }
    fn decode(arg: u32) -> HelperArg {
        HelperArg {
            special: arg & 1 != 0,
            x87: arg & 2 != 0,
            counted_before: (arg >> COUNTED_SHIFT & COUNTED_MASK) as usize,
            index: (arg >> INDEX_SHIFT) as usize,
        }
    }
}

/// What helper calls from translated code work on.
pub(crate) struct HelperEnv {
    /// `Bt::helper_insns`.
    pub(crate) insns: *const Vec<iced_x86::Instruction>,
    /// Did a helper ask to leave the block?
    pub(crate) left: bool,
    pub(crate) cpu: *mut Vcpu,
    pub(crate) key: PagingKey,
    pub(crate) stop: Option<popek_vcpu::Stop>,
    pub(crate) specials: u64,
    /// Regions opened to checked stores (`Stats::fast_regions`).
    pub(crate) fast_regions: u64,
    pub(crate) fallbacks: u64,
    pub(crate) kinds: *mut KindCounts,
    /// The guest's x87 state is in the host FPU.
    pub(crate) fpu_loaded: bool,
    /// `Bt::hot_stores`: each hot store's runs and how many wrote a
    /// watched page.
    pub(crate) hot: *mut FastMap<u32, HotStore>,
    /// Hot stores that rarely write watched pages: to be translated as
    /// host code again.
    pub(crate) demote: Vec<u32>,
    /// `Bt::watch`, to tell harmless writes to watched pages (data beside
    /// code) from those the dispatcher must act on.
    pub(crate) watch: *const crate::watch::WriteWatch,
    /// The current shadow address space (None with paging off).
    pub(crate) space: Option<usize>,
    /// The current space's pages that helper calls reached (null with
    /// paging off), and `Bt::table_epoch`.
    pub(crate) virt: *mut FastMap<u32, VirtMap>,
    pub(crate) table_epoch: *const FastMap<u32, u32>,
}

/// A linear page an adaptive helper call reached where the shadow did not
/// grant the access, as host code would have mapped it then: its physical
/// page and rights, and the table it was found through with that table's
/// epoch (`Bt::table_epoch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VirtMap {
    phys: u32,
    writable: bool,
    table: u32,
    epoch: u32,
}

/// Would host code have faulted on the pages a helper's instruction
/// touched, where the shadow does not grant the access (a page revoked
/// because an entry's rights changed, unmapped because it was remapped,
/// a table unshadowed, or never mapped)? Host code would fault on such a
/// page once and then map it, so a page counts only if it is not in
/// `virt` as the guest's tables map it now: the same physical page and
/// rights, through a table not written since (its epoch). Records what it
/// counts. (Accessed and dirty bits to set are counted by the caller.)
fn shadow_lag(
    cpu: &Vcpu,
    space: usize,
    user: bool,
    virt: &mut FastMap<u32, VirtMap>,
    epochs: &FastMap<u32, u32>,
) -> bool {
    let (pages, n) = cpu.touched;
    let mut hit = false;
    for (lin, write) in pages.into_iter().take(usize::from(n)) {
        let lin = lin >> 12;
        let granted = match cpu.ram.shadow_entry(space, lin) {
            None | Some((_, popek_memory::Access::Revoked)) => false,
            Some((_, popek_memory::Access::Read)) => !write,
            Some((_, popek_memory::Access::Write)) => true,
        };
        if granted {
            continue;
        }
        let Some(probe) = cpu.probe(lin << 12, user) else {
            continue;
        };
        let table = probe.tables[1].or(probe.tables[0]).unwrap_or(0);
        let now = VirtMap {
            phys: probe.phys_page,
            writable: probe.writable,
            table,
            epoch: epochs.get(&table).copied().unwrap_or(0),
        };
        if virt.get(&lin) != Some(&now) {
            if virt.len() >= MAX_VIRT {
                virt.clear();
            }
            virt.insert(lin, now);
            hit = true;
        }
    }
    hit
}

/// Pages a space's `virt` holds at most (then it starts over).
const MAX_VIRT: usize = 1 << 16;

/// An instruction translated as a helper call because its memory accesses
/// kept faulting in host code (see `Bt::hot_stores`), and its credit: a
/// run that host code would have faulted on earns [`HIT_CREDIT`] (up to
/// [`MAX_CREDIT`]), any other run spends one, and at none left it goes
/// back to host code. A helper call costs a few hundred cycles, a host
/// fault (a signal, the interpreter, often an mprotect) some ten thousand,
/// so the helper pays while more than about one run in 30 would fault;
/// the cap bounds what a burst of faults buys: an instruction that copies
/// into a watched page and then into a plain one (a memcpy) goes back to
/// host code after a few hundred runs of the second.
///
/// Under guest paging a run also counts as a fault when it reached a page
/// the shadow does not grant and host code would not have mapped by now
/// ([`shadow_lag`]: the guest remapped it, changed its rights or cleared
/// its accessed or dirty bit; helpers leave the shadow as it is, since
/// mapping the page would cost the host call a fault costs, and revoking
/// it again when the guest next changes its entry another).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HotStore {
    pub(crate) credit: u32,
}

impl Default for HotStore {
    fn default() -> HotStore {
        HotStore {
            credit: START_CREDIT,
        }
    }
}

/// A new hot instruction's credit (see [`HotStore`]).
pub(crate) const START_CREDIT: u32 = 64;
/// What a run host code would have faulted on earns.
pub(crate) const HIT_CREDIT: u32 = 32;
/// The most credit a hot instruction holds.
pub(crate) const MAX_CREDIT: u32 = 256;

/// Are the writes to watched pages since the last drain all harmless (data
/// beside translated code, accessed and dirty bits), so the block may go on?
fn harmless_writes(cpu: &Vcpu, env: &HelperEnv) -> bool {
    let writes = cpu.ram.watched_writes();
    if writes.is_empty() {
        return true;
    }
    // SAFETY: `watch` points at the engine's write watch, which the engine
    // does not touch while its code runs.
    let watch = unsafe { &*env.watch };
    writes.iter().all(|w| watch.harmless(w))
}

/// Execute the instruction `arg` names (its decoded form, and so its EIP,
/// is in the engine's table) in place of translated code: the
/// special instructions' vcpu methods and the interpreter's semantics, the
/// same as everywhere else. Returns 0 to go on with the block, 1 to leave
/// it (control went elsewhere, the CPU stopped or halted, a device wants
/// the dispatcher, or code was written).
pub(crate) extern "sysv64" fn run_helper(ctx: *mut Context, arg: u32) -> u32 {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: `ctx` is the context `Bt::step_within` passed to the running
        // code; its `env` points at the HelperEnv on that call's stack,
        // whose `cpu` is the CPU `step` borrowed and does not touch while
        // the code runs.
        let (ctx, env) = unsafe { (&mut *ctx, &mut *((*ctx).env as *mut HelperEnv)) };
        // SAFETY: see above.
        let cpu = unsafe { &mut *env.cpu };
        let HelperArg {
            special,
            x87,
            counted_before,
            index,
        } = HelperArg::decode(arg);
        // SAFETY: `insns` points at the engine's table, which the engine
        // does not touch while its code runs; every helper call in the code
        // buffer has its entry (the table is emptied with the buffer).
        let ins = unsafe { &(&*env.insns)[index] };
        let (eip, next) = (ins.ip32(), ins.next_ip32());
        cpu.regs = ctx.regs;
        cpu.eflags = ctx.guest_eflags();
        cpu.eip = eip;
        let kind = ins.mnemonic();
        // SAFETY: `kinds` points at the engine's counters, which the engine
        // does not touch while its code runs.
        let kinds = unsafe { &mut *env.kinds };
        if special {
            env.specials += 1;
            *kinds.specials.entry(kind).or_default() += 1;
        } else {
            env.fallbacks += 1;
            *kinds.fallbacks.entry(kind).or_default() += 1;
        }
        // An x87 instruction on the interpreter: the guest's FPU state is
        // in the host FPU while translated code runs; hand it over.
        let handover = x87 && env.fpu_loaded;
        if handover {
            cpu.fpu.save_host();
        }
        // The instructions this run of host code retired before this one
        // are not in `cpu.retired` yet (the dispatcher adds them when the
        // code returns): count them during the step, so whatever reads the
        // count (a TSC that counts instructions) sees the exact value.
        // (Added before the fields are split: a flags slow path earlier in
        // the block took one off the packed count, which may have borrowed
        // from the lookup field.)
        let inflight = ctx.retired.wrapping_add(counted_before as u64) & ((1 << LOOKUP_SHIFT) - 1);
        cpu.retired += inflight;
        let slow_before = (cpu.slow_accesses, cpu.ram.watched_write_count());
        cpu.touched.1 = 0;
        let step = popek_interp::step_decoded(cpu, ins);
        cpu.retired -= inflight;
        // SAFETY: `hot` points at the engine's map, which the engine does
        // not touch while its code runs.
        let hot = unsafe { &mut *env.hot };
        if !hot.is_empty() {
            if let Some(h) = hot.get_mut(&eip) {
                // Would host code have faulted? (It wrote a watched page,
                // set an accessed or dirty bit, touched a device, or took
                // a page fault.)
                let mut hit = (cpu.slow_accesses, cpu.ram.watched_write_count()) != slow_before;
                if let Some(space) = env.space {
                    // SAFETY: `virt` points at the current space's map
                    // and `table_epoch` at the engine's, which the engine
                    // does not touch while its code runs (with a space,
                    // `virt` is not null).
                    let (virt, epochs) = unsafe { (&mut *env.virt, &*env.table_epoch) };
                    if hit {
                        // An accessed or dirty bit set: the guest cleared
                        // it, which host code would have seen as a change
                        // of the entry (the next access to the page faults
                        // again), whichever instruction makes it.
                        let (pages, n) = cpu.touched;
                        for (lin, _) in pages.into_iter().take(usize::from(n)) {
                            virt.remove(&(lin >> 12));
                        }
                    } else {
                        hit = shadow_lag(cpu, space, env.key.is_some_and(|k| k.user), virt, epochs);
                    }
                }
                // Let its stores beside translated code through in host
                // code from now on (see `Piece::Checked`): with paging
                // on, where the shadow maps the page as the guest's
                // tables do and they let it be written as it is.
                // SAFETY: `watch` points at the engine's write watch,
                // which the engine does not touch while its code runs.
                let watch = unsafe { &*env.watch };
                let (done, n) = cpu.touched;
                let user = env.key.is_some_and(|k| k.user);
                for (a, write) in done.into_iter().take(usize::from(n)) {
                    let phys = match env.space {
                        _ if !write => continue,
                        None => a,
                        Some(_) => match cpu.probe(a, user) {
                            Some(p) if p.writable => (p.phys_page << 12) | (a & 0xFFF),
                            _ => continue,
                        },
                    };
                    if !watch.fast_ok(phys) {
                        continue;
                    }
                    let delta_ok = env
                        .space
                        .is_none_or(|space| cpu.ram.shadow_set_delta(space, a >> 12, phys >> 12));
                    if delta_ok && cpu.ram.set_fast(phys) {
                        env.fast_regions += 1;
                    }
                }
                if hit {
                    h.credit = (h.credit + HIT_CREDIT).min(MAX_CREDIT);
                } else if h.credit > 0 {
                    h.credit -= 1;
                } else {
                    hot.remove(&eip);
                    env.demote.push(eip);
                }
            }
        }
        if handover {
            cpu.fpu.load_host();
        }
        ctx.regs = cpu.regs;
        ctx.set_eflags(cpu.eflags, cpu.cpl());
        // A segment load changes no translation: host code reads FS's and
        // GS's bases and flatness from the context; a TSC write or a change
        // of CR4.TSD or CPL reaches RDTSC's host code the same way.
        ctx.set_segs(seg_bases(cpu));
        ctx.set_tsc(cpu.tsc_offset, tsc_native(cpu));
        let irq = cpu.board.interrupt_pending();
        if irq {
            // As at entry (see the dispatcher): STI, POPF and CLI keep
            // coming here while a device interrupt waits.
            ctx.slow = 1;
        }
        // An interrupt the CPU can take now (IF just set by STI/POPF, or a
        // device raised one on OUT/IN) is delivered by the run loop: leave.
        let interruptible = irq && cpu.eflags & popek_vcpu::flags::IF != 0;
        ctx.next_eip = cpu.eip;
        let go_on = match step {
            Step::Executed => {
                // (A demoted instruction leaves too: its block is to be
                // translated again, and a loop of chained blocks might not
                // come back to the dispatcher for a long time.)
                env.demote.is_empty()
                    && cpu.eip == next
                    && !cpu.halted
                    && !cpu.board.needs_attention()
                    && harmless_writes(cpu, env)
                    && !interruptible
                    && translatable(cpu)
                    && paging_key(cpu) == env.key
            }
            Step::Halted => false,
            Step::Stop(s) => {
                env.stop = Some(s);
                false
            }
        };
        env.left |= !go_on;
        u32::from(!go_on)
    }));
    // Unwinding through translated code is not possible: a panic in the
    // interpreter is a host bug, so end the process loudly.
    r.unwrap_or_else(|_| std::process::abort())
}
