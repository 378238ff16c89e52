//! Selection: how each guest instruction of a block is lowered, and the
//! block built from them (`Bt::translate`, the one entry point from guest
//! instruction to host code).
//!
//! For each instruction of the scanned block, in order of preference:
//!
//! | guest instruction | lowered as | module |
//! |---|---|---|
//! | innocuous, encodable for the host | copied (re-encoded on GS, ESP in R12D) | [`crate::lower`] |
//! | PUSH/POP/CALL's push and other ESP users | rewritten on the guest stack | [`crate::lower`] |
//! | MOVS/STOS/LODS/CMPS/SCAS | the host's own on host pointers | [`crate::lower`] |
//! | JMP/Jcc/LOOP/JECXZ/CALL/RET/indirect | the block's exit ([`BlockExit`]); a Jcc whose fall-through stays on the page becomes a side exit (superblock) | [`crate::lower`], [`crate::emit`] |
//! | PUSHFD/POPFD/CLI/STI | host code on the virtual flags, helper call unless CPL 0 | [`crate::emit::flags`] |
//! | anything else that does not transfer control | a helper call (vcpu method or interpreter) | [`crate::helper`] |
//! | special instructions that end a block | left to the dispatcher | [`crate::dispatch`] |
//!
//! To add an instruction to host code: make `lower` produce it (and a
//! difftest template generate it); to add a special instruction: give the
//! vcpu its method and `popek_decode` its class, and it runs through a
//! helper call with no change here.

use popek_decode::{Scanner, Step};
use popek_vcpu::Vcpu;

use crate::cache::{key_eip, key_phys, Key, Translation, NO_BYTES};
use crate::dispatch::Bt;
use crate::emit::{BlockExit, Builder, FlagsOp, HelperCall, Piece, Span};
use crate::helper::{helper_call, INDEX_SHIFT};
use crate::lower::{
    checked_store_from_bytes, copy_fast, lower_checked_push, lower_checked_store, lower_into,
    lower_seg_override, lower_stack, lower_string, lower_terminator, seg_override_from_bytes,
    SegBases,
};

/// Instructions a block (a superblock too) retires at most, its exit
/// included: what the machine's exact instruction budget relies on.
pub(crate) const SUPERBLOCK_MAX: usize = popek_decode::MAX_BLOCK_INSNS;

/// The flags instruction `ins` is, if translated code runs it on the
/// virtual flags (32-bit PUSHF and POPF; the 16-bit forms are helpers).
fn flags_op(ins: &iced_x86::Instruction) -> Option<FlagsOp> {
    use iced_x86::Code;
    Some(match ins.code() {
        Code::Pushfd => FlagsOp::Pushfd {
            host_fixed: crate::host::host_fixed_flags(),
        },
        Code::Popfd => FlagsOp::Popfd,
        Code::Cli => FlagsOp::Cli,
        Code::Sti => FlagsOp::Sti,
        _ => return None,
    })
}

/// The vectors a translation works in, kept between translations: the
/// instructions looked at one by one, the instruction map (see
/// [`Out::map`]), the stretches of code (start, length) of a superblock
/// that followed jumps, and the instructions made helper calls (see
/// `Out::helpers`).
pub(crate) type Scratch = (
    Vec<popek_decode::Insn>,
    Vec<[u32; 3]>,
    Vec<(u32, u32)>,
    Vec<iced_x86::Instruction>,
);

/// How `--dump` says an instruction the fast scanner took was translated.
fn fast_kind(p: popek_decode::fast::Plain) -> &'static str {
    match p.stack() {
        true => "rewritten (guest stack)",
        false => "copied (fast scanner)",
    }
}

/// Guest code bytes for the scanner, fetched through `cpu`'s mapping; on
/// `known`, a linear page the current space's instruction TLB holds (and
/// the physical page it maps it to), read from that page without a walk
/// of the guest's tables (the TLB has them: a write to one drops the
/// entry; the walk that filled it found the page present, accessed and
/// allowed to this privilege).
fn fetcher(cpu: &mut Vcpu, known: Option<(u32, u32)>) -> impl FnMut(u32, &mut [u8]) -> usize + '_ {
    move |a, buf| {
        if let Some((lin, phys)) = known.filter(|&(lin, _)| a >> 12 == lin) {
            let at = (phys as usize) << 12 | (a & 0xFFF) as usize;
            let n = buf.len().min(0x1000 - (a & 0xFFF) as usize);
            if let Some(src) = cpu.ram.as_slice().get(at..at + n) {
                buf[..n].copy_from_slice(src);
                if n == buf.len() {
                    return n;
                }
                let rest = lin.wrapping_add(1) << 12;
                return n + cpu.fetch(rest, &mut buf[n..]).0;
            }
        }
        cpu.fetch(a, buf).0
    }
}

/// One attempt at a translation: done, or the block did not fit in the
/// code buffer (then what it is instead, the interpreter's with its bytes
/// still watched, if a flush does not help).
enum Attempt {
    Done(Translation),
    Full(Translation),
}

/// Where a block's host code goes as its instructions are selected: the
/// builder, the instruction map, and the instructions its helper calls
/// run.
struct Out {
    b: Builder,
    /// For each translated instruction its EIP, the instructions counted
    /// before it and where its host code starts (one push each: the
    /// instruction map of [`crate::emit::InsnMap`]).
    map: Vec<[u32; 3]>,
    /// The EIP after the last translated instruction (its bytes end
    /// there), and where the block goes on after it: the target of a
    /// direct JMP the block followed while that JMP is the last.
    next: u32,
    followed: Option<u32>,
    /// The engine's helper instructions before this block's (its helper
    /// calls' indices start there).
    first_helper: u32,
    helpers: Vec<iced_x86::Instruction>,
    /// An STI held back until another instruction's host code follows it
    /// (see `translate_once`): its EIP, the count before it, the
    /// instruction.
    sti: Option<(u32, usize, iced_x86::Instruction)>,
    /// How each instruction was translated, for `--dump`.
    how: Vec<&'static str>,
    dumping: bool,
}

impl Out {
    /// The next translated instruction (at `eip`, the next one at `next`)
    /// starts here: it is the `counted`-th of the block.
    #[inline]
    fn mark(&mut self, eip: u32, next: u32, counted: usize) {
        let at = self.b.offset();
        self.mark_at(eip, next, counted, at);
    }

    /// The translated instruction at `eip` (the next one at `next`), the
    /// `counted`-th of the block, starts at offset `at` of the block's
    /// code.
    #[inline]
    fn mark_at(&mut self, eip: u32, next: u32, counted: usize, at: usize) {
        self.map.push([eip, counted as u32, at as u32]);
        self.next = next;
        self.followed = None;
    }

    /// The helper call for `ins`, the `counted`-th instruction, which the
    /// engine keeps for the helper.
    fn call(&mut self, ins: &iced_x86::Instruction, special: bool, counted: usize) -> HelperCall {
        let c = helper_call(ins, special, self.helpers.len(), counted);
        self.helpers.push(*ins);
        HelperCall {
            arg: c.arg + (self.first_helper << INDEX_SHIFT),
        }
    }

    /// An innocuous access through FS or GS, `counted`-th of the block:
    /// host code adding the base from the context while the segment is
    /// flat, else the interpreter (decided at run time, so a segment load
    /// changes no translation). False (and nothing added) if it cannot be
    /// lowered so.
    #[cold]
    #[inline(never)]
    fn segment(&mut self, i: &popek_decode::Insn, counted: usize, arena: &mut Vec<u8>) -> bool {
        arena.clear();
        // Spelled from the bytes when the fast scanner knows the rest.
        let fs = match seg_override_from_bytes(&i.bytes, arena) {
            Some(fs) => fs,
            None => match lower_seg_override(&i.ins, arena) {
                Ok(fs) => fs,
                Err(_) => return false,
            },
        };
        self.mark(i.ins.ip32(), i.ins.next_ip32(), counted);
        let call = self.call(&i.ins, false, counted);
        self.b.piece(&Piece::Segment {
            fs,
            code: arena,
            call,
        });
        if self.dumping {
            self.how
                .push("copied (FS/GS base from the context; interpreter unless flat)");
        }
        true
    }

    /// A hot store, `counted`-th of the block: its address made physical
    /// (page-delta table) and checked against the fast-write map in host
    /// code (stores beside translated code go through), the helper
    /// otherwise. A hot push (the guest's stack beside translated code) the
    /// same way; a hot CALL's push too, and the block ends there (Some(true)).
    /// None (and nothing added) if it cannot be lowered so.
    #[cold]
    #[inline(never)]
    fn checked(
        &mut self,
        i: &popek_decode::Insn,
        counted: usize,
        arena: &mut Vec<u8>,
    ) -> Option<bool> {
        arena.clear();
        let split = match checked_store_from_bytes(&i.bytes, arena) {
            Some(split) => split,
            None => lower_checked_store(&i.ins, arena)
                .or_else(|_| lower_checked_push(&i.ins, arena))
                .ok()?,
        };
        self.mark(i.ins.ip32(), i.ins.next_ip32(), counted);
        let call = self.call(&i.ins, false, counted);
        self.b.piece(&Piece::Checked {
            ea: &arena[..split],
            store: &arena[split..],
            call,
        });
        if self.dumping {
            self.how
                .push("checked store (fast-write map; interpreter otherwise)");
        }
        Some(i.ins.code() == iced_x86::Code::Call_rel32_32)
    }

    /// The `counted`-th instruction of the block when it is none of the
    /// above (`hot`: a store that keeps writing watched pages; `ends`: it
    /// ends the block): Some(true) if its host code counts it, Some(false)
    /// if a helper call (which retires it through the interpreter), None if
    /// it ends the block here (nothing added).
    #[cold]
    #[inline(never)]
    fn other(
        &mut self,
        i: &popek_decode::Insn,
        counted: usize,
        hot: bool,
        ends: bool,
    ) -> Option<bool> {
        // RDTSC in host code (a helper call when the TSC counts
        // instructions or CR4.TSD applies: decided at run time).
        if i.ins.mnemonic() == iced_x86::Mnemonic::Rdtsc && !hot {
            self.mark(i.ins.ip32(), i.ins.next_ip32(), counted);
            let call = self.call(&i.ins, true, counted);
            self.b.piece(&Piece::Rdtsc(call));
            if self.dumping {
                self.how
                    .push("rewritten (host TSC + offset; helper call when not allowed)");
            }
            return Some(true);
        }
        // PUSHFD, POPFD, CLI and STI on the virtual flags in host code
        // (with a helper call where host code cannot do them).
        if let Some(op) = flags_op(&i.ins).filter(|_| !hot) {
            if op == FlagsOp::Sti {
                self.sti = Some((i.ins.ip32(), counted, i.ins));
            } else {
                self.mark(i.ins.ip32(), i.ins.next_ip32(), counted);
                let call = self.call(&i.ins, true, counted);
                self.b.piece(&Piece::Flags(op, call));
                if self.dumping {
                    self.how.push(if matches!(op, FlagsOp::Pushfd { .. }) {
                        "rewritten (virtual flags)"
                    } else {
                        "rewritten (virtual flags; helper call unless CPL 0)"
                    });
                }
            }
            return Some(true);
        }
        // Anything else that does not transfer control runs in place
        // through a helper call: special instructions on the vcpu
        // methods, the rest on the interpreter.
        if ends {
            return None;
        }
        self.mark(i.ins.ip32(), i.ins.next_ip32(), counted);
        let call = self.call(&i.ins, i.special.is_some(), counted);
        self.b.piece(&Piece::Helper(call));
        if self.dumping {
            self.how.push(if i.special.is_some() {
                "helper call (vcpu)"
            } else {
                "helper call (interpreter fallback)"
            });
        }
        Some(false)
    }

    /// A conditional branch, the block's `counted`-th instruction, as a
    /// side exit to `target` (the block goes on past it).
    fn side(&mut self, cc: u8, target: u32, counted: usize) {
        self.b.piece(&Piece::Side {
            cc,
            target,
            counted,
        });
        if self.dumping {
            self.how.push("rewritten (side exit; the block goes on)");
        }
    }

    /// The held-back STI's piece, now that something follows it.
    #[cold]
    fn flush_sti(&mut self) {
        if let Some((eip, counted, ins)) = self.sti.take() {
            self.mark(eip, ins.next_ip32(), counted);
            let call = self.call(&ins, true, counted);
            self.b.piece(&Piece::Flags(FlagsOp::Sti, call));
            if self.dumping {
                self.how
                    .push("rewritten (virtual flags; helper call unless CPL 0)");
            }
        }
    }
}

/// The sink of a superblock's scan (see `Bt::translate_once`): the fast
/// scanner's instructions copied straight into the block as they are
/// scanned (no `Insn` for them unless for `--dump`), the conditional
/// branches the scan goes on past made side exits, and a direct CALL, a
/// RET or a JMP off the block's page made its exit. `CHECKED`: on a page
/// with a hot store (declined: the general path's) or for `--dump`; the
/// common case checks neither.
struct Direct<'a, const CHECKED: bool> {
    body: crate::emit::Body<'a>,
    map: &'a mut Vec<[u32; 3]>,
    how: &'a mut Vec<&'static str>,
    /// The instructions the block's code counts so far, and of those the
    /// side exits and the exit (not the fast scanner's).
    counted: usize,
    others: u64,
    /// The block's exit, if the sink took it ([`popek_decode::Sink::exit`]).
    exit: Option<BlockExit>,
    /// The block's first instruction, and whether it may go on through a
    /// jump to its page (superblocks: the general path's to decide).
    start: u32,
    superblocks: bool,
    /// The last side exit made (see `side` in `translate_once`).
    side: Option<(u8, u32, u32, usize)>,
    split_at: usize,
    hot_page: bool,
    hot_stores: &'a crate::cache::FastMap<u32, crate::helper::HotStore>,
    dumping: bool,
}

impl<const CHECKED: bool> Direct<'_, CHECKED> {
    /// Is the instruction at `at` one to decline (a hot store)?
    #[inline(always)]
    fn declines(&self, at: u32) -> bool {
        CHECKED && self.hot_page && self.hot_stores.contains_key(&at)
    }
}

impl<const CHECKED: bool> popek_decode::Sink for Direct<'_, CHECKED> {
    #[inline(always)]
    fn plain(
        &mut self,
        at: u32,
        p: popek_decode::fast::Plain,
        raw: &[u8; popek_decode::MAX_INSN_LEN],
    ) -> bool {
        if self.declines(at) {
            return false;
        }
        // (`Out::mark`.)
        let code = &mut *self.body.code;
        self.map.push([at, self.counted as u32, code.len() as u32]);
        self.counted += 1;
        copy_fast(p, raw, code);
        if CHECKED && self.dumping {
            self.how.push(fast_kind(p));
        }
        true
    }

    // (As the general path does it: `Out::side`.)
    fn jcc(&mut self, at: u32, cc: u8, target: u32, bytes: &popek_decode::InsnBytes) -> bool {
        if self.declines(at) {
            return false;
        }
        self.map
            .push([at, self.counted as u32, self.body.code.len() as u32]);
        self.counted += 1;
        self.others += 1;
        self.body.side(cc, target, self.counted);
        let after = at.wrapping_add(bytes.len() as u32);
        self.split_at = self.map.len();
        self.side = Some((cc, target, after, self.split_at));
        if CHECKED && self.dumping {
            self.how.push("rewritten (side exit; the block goes on)");
        }
        true
    }

    // (As the general path does it: `lower_terminator`, then the exit.)
    fn exit(
        &mut self,
        at: u32,
        e: popek_decode::fast::Exit,
        bytes: &popek_decode::InsnBytes,
    ) -> bool {
        if self.declines(at) {
            return false;
        }
        if let popek_decode::fast::Exit::Jmp(t) = e {
            if self.superblocks && t / 4096 == self.start / 4096 {
                // It may be followed.
                return false;
            }
        }
        let code = &mut *self.body.code;
        self.map.push([at, self.counted as u32, code.len() as u32]);
        self.counted += 1;
        self.others += 1;
        let next = at.wrapping_add(bytes.len() as u32);
        self.exit = Some(crate::lower::exit_code(e, next, code));
        if CHECKED && self.dumping {
            self.how.push("rewritten (block exit)");
        }
        true
    }
}

/// One [`Scanner::run`] with a [`Direct`] sink: how it ended, the
/// instructions counted (and how many of those it took that are not the
/// fast scanner's), its last side exit, where the last basic block split
/// and the block's exit if it took it.
macro_rules! direct_run {
    ($checked:expr, $sc:expr, $fetch:expr, $space:expr, $insns:expr, $out:expr, $counted:expr,
     $split_at:expr, $hot_page:expr, $hot_stores:expr, $dumping:expr, $start:expr,
     $superblocks:expr) => {{
        let mut d = Direct::<{ $checked }> {
            body: $out.b.body(),
            map: &mut $out.map,
            how: &mut $out.how,
            counted: $counted,
            others: 0,
            exit: None,
            start: $start,
            superblocks: $superblocks,
            side: None,
            split_at: $split_at,
            hot_page: $hot_page,
            hot_stores: $hot_stores,
            dumping: $dumping,
        };
        let step = $sc.run($fetch, $space, $insns, $dumping, &mut d);
        (step, d.counted, d.others, d.side, d.split_at, d.exit)
    }};
}

impl Bt {
    /// Translate the block at `key` (each instruction as the table at the
    /// top of this file says), or say why it is the interpreter's.
    pub(crate) fn translate(&mut self, cpu: &mut Vcpu, key: Key) -> Translation {
        self.stats.blocks_translated += 1;
        self.stats.basic_blocks_translated += 1;
        match self.translate_once(cpu, key) {
            Attempt::Done(t) => t,
            Attempt::Full(_) => {
                // The code buffer is full: start again after the flush
                // forgot every translation (and the bytes this attempt
                // watched).
                self.flush();
                match self.translate_once(cpu, key) {
                    Attempt::Done(t) | Attempt::Full(t) => t,
                }
            }
        }
    }

    fn translate_once(&mut self, cpu: &mut Vcpu, key: Key) -> Attempt {
        let eip = key_eip(key);
        // Vectors kept between translations (room for a whole superblock):
        // nothing is allocated or grows while a block is built.
        let (mut insns, mut map, mut stretches, mut helpers) = std::mem::take(&mut self.scratch);
        insns.clear();
        map.clear();
        stretches.clear();
        helpers.clear();
        let user = self.key.is_some_and(|k| k.user);
        // The host code goes straight into the block being built (the
        // engine has its code buffer by the time anything is translated).
        let Some(b) = self.code.as_mut().and_then(|buf| Builder::begin(buf).ok()) else {
            self.scratch = (insns, map, stretches, helpers);
            return Attempt::Done(Translation::Interpret {
                pages: (u32::MAX, u32::MAX),
                lin: (eip >> 12, eip >> 12),
                bytes: NO_BYTES,
            });
        };
        let mut out = Out {
            b,
            map,
            next: eip,
            followed: None,
            first_helper: self.helper_insns.len() as u32,
            helpers,
            sti: None,
            how: Vec::new(),
            dumping: self.dump.is_some(),
        };
        // Host code lowered before it is wrapped (FS/GS accesses, checked
        // stores).
        let mut arena = std::mem::take(&mut self.arena);
        let mut exit = None;
        let dumping = out.dumping;
        let mut counted = 0usize;
        let mut fast = 0u64;
        // How many instructions the block held when it last went on past a
        // branch (a side exit, a followed jump): if nothing came after,
        // that starts no basic block of the translation's.
        let mut split_at = usize::MAX;
        // Every instruction of a block starts on its first page: if that
        // page never held a hot store, none is looked up.
        let hot_page = self.hot_pages.contains(eip >> 12);
        // A superblock is scanned as it is translated: past each
        // conditional branch whose fall-through is on the block's page.
        // The fast scanner's instructions are copied as they are scanned
        // (with `gs addr32` for memory; no `Insn` for them unless for
        // `--dump`) by the sink below; every other instruction is pushed
        // onto `insns` and looked at in turn.
        // The block's first page as the instruction TLB has it (the key's
        // physical page: the entry key came from there), if it does.
        let first_page = {
            let (lin, phys) = (eip >> 12, key_phys(key));
            (self.current_phys(lin) == Some(phys)).then_some((lin, phys))
        };
        let space: &mut [u8; popek_decode::SCAN_SPACE] = &mut self.scan_space;
        let mut sc = Scanner::new(
            &mut fetcher(cpu, first_page),
            eip,
            32,
            SUPERBLOCK_MAX,
            self.superblocks,
            self.fast_scan,
            space,
        );
        // A conditional branch made a side exit because the scan went on
        // past it (condition, target, fall-through, the instruction map's
        // length after it): the block's exit instead if the scan ends
        // right there, nothing translated after it.
        let mut side: Option<(u8, u32, u32, usize)> = None;
        // The instructions translated before the current stretch of code
        // (the stretches before it, after a followed jump, are in
        // `stretches`).
        let mut stretch_from = 0usize;
        // The fast scanner's instructions go straight into the block, but
        // after an STI held back and while a debugger has breakpoints:
        // then each goes through the paths below, as does a hot store
        // (the sink declines it).
        let direct = self.breakpoints.is_empty();
        let hot_stores = &self.hot_stores;
        loop {
            let before = out.map.len();
            let step = if direct && out.sti.is_none() {
                let fetch = &mut fetcher(cpu, first_page);
                let sb = self.superblocks;
                let (step, now, others, last_side, split, end) = if hot_page || dumping {
                    direct_run!(
                        true, sc, fetch, space, &mut insns, out, counted, split_at, hot_page,
                        hot_stores, dumping, eip, sb
                    )
                } else {
                    direct_run!(
                        false, sc, fetch, space, &mut insns, out, counted, split_at, hot_page,
                        hot_stores, dumping, eip, sb
                    )
                };
                fast += (now - counted) as u64 - others;
                counted = now;
                split_at = split;
                if last_side.is_some() {
                    side = last_side;
                }
                if end.is_some() {
                    exit = end;
                }
                step
            } else {
                sc.run(
                    &mut fetcher(cpu, first_page),
                    space,
                    &mut insns,
                    dumping,
                    &mut |_, _, _: &_| false,
                )
            };
            // What the sink took: the block goes on after the last of
            // them (the instruction pushed, if one was, starts there; else
            // the scan stopped there).
            if out.map.len() > before {
                out.next = match step {
                    Step::Pushed => insns.last().map_or(out.next, |i| i.ins.ip32()),
                    Step::End(_) => {
                        let (from, len) = sc.stretch();
                        from.wrapping_add(len)
                    }
                };
                out.followed = None;
            }
            if exit.is_some() {
                // The sink took the block's exit.
                break;
            }
            // (A run that ends pushed nothing: the side exit is the last
            // instruction scanned if nothing was translated after it.)
            if let Some((cc, taken, not_taken, at)) = side.take() {
                if matches!(step, Step::End(_)) && out.map.len() == at {
                    out.b.unside();
                    split_at = usize::MAX;
                    if dumping {
                        out.how.pop();
                        out.how.push("rewritten (block exit)");
                    }
                    exit = Some(BlockExit::Cond {
                        cc,
                        taken,
                        not_taken,
                    });
                    break;
                }
            }
            if let Step::End(_) = step {
                break;
            }
            let k = insns.len() - 1;
            // A debugger's breakpoint: the block ends before it (see
            // `Bt::set_breakpoints`).
            if !self.breakpoints.is_empty() && self.breakpoints.contains(&insns[k].ins.ip32()) {
                break;
            }
            // The fast scanner's instructions are copied as they are (with
            // `gs addr32` for memory), unless a hot store: decoded in full
            // for the paths below.
            if let Some(p) = insns[k].fast {
                let i = &insns[k];
                if !hot_page || !self.hot_stores.contains_key(&i.ins.ip32()) {
                    if out.sti.is_some() {
                        out.flush_sti();
                    }
                    out.mark(i.ins.ip32(), i.ins.next_ip32(), counted);
                    copy_fast(p, i.bytes.raw(), out.b.code());
                    fast += 1;
                    if dumping {
                        out.how.push(fast_kind(p));
                    }
                    counted += 1;
                    continue;
                }
                let full = insns[k].decoded();
                insns[k].ins = full;
                insns[k].fast = None;
            }
            let i = &insns[k];
            // STI opens an interrupt shadow over the next instruction,
            // which host code does not record: an STI that would be the
            // last instruction of the block's host code (the shadow still
            // open when the block exits) is left to the dispatcher. So an
            // STI's piece goes in only when another instruction's follows
            // (every instruction has host code but one that ends the block
            // and is no terminator; tried on the side).
            let ends = i.class == popek_decode::Class::ControlFlow
                || i.special.is_some_and(|sp| sp.ends_block());
            if out.sti.is_some()
                && (!ends || {
                    arena.clear();
                    lower_terminator(&i.ins, &mut arena).is_some()
                })
            {
                out.flush_sti();
            }
            // Translated code runs x87 instructions on the host FPU, with
            // the guest's state loaded (see `step_within`). (No control
            // transfer is one.)
            if !cpu.fpu.used && i.class != popek_decode::Class::ControlFlow {
                cpu.fpu.used = popek_interp::x87::is_x87(&i.ins);
            }
            // A store that keeps writing watched pages is a helper call
            // (see `Bt::hot_stores`), unless it transfers control.
            // (A direct CALL whose push keeps faulting: a checked push,
            // below.)
            let hot_eip = hot_page && self.hot_stores.contains_key(&i.ins.ip32());
            let hot = hot_eip && i.class != popek_decode::Class::ControlFlow;
            let hot_call = hot_eip && i.ins.code() == iced_x86::Code::Call_rel32_32;
            // An innocuous access through FS or GS: host code adding the
            // base from the context while the segment is flat, else the
            // interpreter (decided at run time, so a segment load changes
            // no translation).
            if !hot
                && i.class == popek_decode::Class::Innocuous
                && SegBases::used_by(&i.ins)
                && out.segment(i, counted, &mut arena)
            {
                counted += 1;
                continue;
            }
            // A hot store: its address made physical (page-delta table)
            // and checked against the fast-write map in host code (stores
            // beside translated code go through), the helper otherwise.
            // A hot push (the guest's stack beside translated code) the
            // same way; a hot CALL's push too, and the block ends there.
            if (hot || hot_call) && self.checked_stores {
                if let Some(ends) = out.checked(i, counted, &mut arena) {
                    counted += 1;
                    if ends {
                        exit = Some(BlockExit::Direct(i.ins.near_branch32()));
                        break;
                    }
                    continue;
                }
            }
            // Copied or rewritten in place: lowered straight into the
            // block (each leaves the code as it was when it declines).
            // `lower_into` refuses stack instructions: PUSH and POP go to
            // `lower_stack` without asking it.
            // (None of them takes a control transfer.)
            let at = out.b.offset();
            let code = out.b.code();
            let kind = if hot || i.class == popek_decode::Class::ControlFlow {
                None
            } else if i.class == popek_decode::Class::Innocuous
                && !i.ins.is_stack_instruction()
                && lower_into(&i.ins, Some(&i.bytes), code).is_ok()
            {
                Some("copied")
            } else if lower_stack(&i.ins, code) {
                Some("rewritten (guest stack)")
            } else if lower_string(&i.ins, &i.bytes, code) {
                Some("rewritten (string, host pointers)")
            } else {
                None
            };
            if let Some(kind) = kind {
                out.mark_at(i.ins.ip32(), i.ins.next_ip32(), counted, at);
                if dumping {
                    out.how.push(kind);
                }
                counted += 1;
                continue;
            }
            if let Some(e) = lower_terminator(&i.ins, out.b.code()) {
                out.mark_at(i.ins.ip32(), i.ins.next_ip32(), counted, at);
                // A superblock: a conditional branch whose fall-through is
                // on the block's page becomes a side exit, and the block
                // goes on there, if the scan goes on past it (up to
                // SUPERBLOCK_MAX instructions): see `side` above.
                if let BlockExit::Cond {
                    cc,
                    taken,
                    not_taken,
                } = e
                {
                    if self.superblocks && out.b.offset() == at && not_taken / 4096 == eip / 4096 {
                        counted += 1;
                        out.side(cc, taken, counted);
                        split_at = out.map.len();
                        side = Some((cc, taken, not_taken, split_at));
                        continue;
                    }
                }
                // A superblock follows a direct JMP to its own page (not
                // into instructions it already holds; the jump ended the
                // scan, as every transfer but a Jcc does): the jump is no
                // code, and the block goes on at its target. A switch's
                // dispatch code then ends each case's block (a copy of it
                // per case), as in a threaded interpreter; transfers
                // between blocks stay as the pacing needs them (exits to
                // a target not above the block's start poll).
                if let BlockExit::Direct(t) = e {
                    if self.superblocks
                        && matches!(
                            i.ins.code(),
                            iced_x86::Code::Jmp_rel8_32 | iced_x86::Code::Jmp_rel32_32
                        )
                        && sc.scanned() < SUPERBLOCK_MAX
                        && t / 4096 == eip / 4096
                        && !stretches
                            .iter()
                            .chain([&sc.stretch()])
                            .any(|&(from, len)| t.wrapping_sub(from) < len)
                    {
                        if dumping {
                            out.how.push("rewritten (jump followed; the block goes on)");
                        }
                        counted += 1;
                        out.followed = Some(t);
                        split_at = out.map.len();
                        stretches.push(sc.stretch());
                        stretch_from = out.map.len();
                        let room = SUPERBLOCK_MAX - sc.scanned();
                        sc.restart(&mut fetcher(cpu, first_page), t, room, true, space);
                        continue;
                    }
                }
                if dumping {
                    out.how.push("rewritten (block exit)");
                }
                counted += 1;
                exit = Some(e);
                break;
            }
            // Anything else: RDTSC, the flags instructions, helper calls;
            // or the end of the block.
            match out.other(i, counted, hot, ends) {
                Some(true) => counted += 1,
                Some(false) => {}
                None => break,
            }
        }
        // An STI nothing followed is the dispatcher's.
        if out.sti.take().is_some() {
            counted -= 1;
        }
        let Out {
            b,
            map,
            mut helpers,
            how,
            next,
            followed,
            ..
        } = out;
        let n = map.len();
        // The bytes from the lowest instruction to the end of the highest
        // (a superblock that followed a jump holds code on both sides of
        // its start; every instruction starts on the first page). (A
        // marker for an instruction left to the interpreter covers that
        // instruction's bytes.)
        let (first_byte, last_byte) = match n {
            0 => (
                eip,
                eip.wrapping_add(insns.first().map_or(1, |i| i.ins.len() as u32) - 1),
            ),
            _ => {
                // The stretches of code the block's instructions came from
                // (all of each but the last, up to its last translated
                // instruction).
                let (from, _) = sc.stretch();
                let current = (n > stretch_from).then_some((from, next.wrapping_sub(from)));
                let (mut lo, mut hi, mut wrapped) = (eip, eip, None);
                for &(from, len) in stretches.iter().chain(&current) {
                    let last = from.wrapping_add(len).wrapping_sub(1);
                    lo = lo.min(from);
                    if last < from {
                        // Its last instruction runs past the 4 GiB wrap:
                        // its last byte is on page 0, the block's second
                        // page.
                        wrapped = Some(last);
                    }
                    hi = hi.max(last);
                }
                (lo, wrapped.unwrap_or(hi))
            }
        };
        // The physical pages of the code (the same as the linear ones with
        // paging off), and under paging the table entries that map them: a
        // write to the bytes or the entries makes this translation stale.
        // The pages go into the current space's instruction TLB.
        let probe = |cpu: &Vcpu, lin: u32| cpu.probe(lin, user);
        // The first page: the instruction TLB's if it holds it (its tables
        // were depended on when it went in: see the loop below), else a walk.
        let first = match first_page {
            Some((_, phys)) if self.flood.is_empty() => Some(popek_vcpu::mmu::Probe {
                phys_page: phys,
                writable: false,
                tables: [None, None],
            }),
            _ => probe(cpu, eip),
        };
        let last = if last_byte >> 12 == eip >> 12 {
            first
        } else {
            probe(cpu, last_byte)
        };
        let lin = (eip >> 12, last_byte >> 12);
        let (lo, end) = (first_byte & 0xFFF, (last_byte & 0xFFF) + 1);
        let ranges = if lin.0 == lin.1 {
            [(first, lin.0, lo, end), (None, 0, 0, 0)]
        } else {
            [(first, lin.0, lo, 4096), (last, lin.1, 0, end)]
        };
        let mut pages = match (first, last) {
            (Some(a), Some(b)) => (a.phys_page, b.phys_page),
            _ => (u32::MAX, u32::MAX),
        };
        let mut bytes = NO_BYTES;
        for (k, (p, lin_page, a, b)) in ranges.into_iter().enumerate() {
            let Some(p) = p else { continue };
            if pages.0 == u32::MAX {
                break;
            }
            let watched = self.watch.watch_code(&mut cpu.ram, p.phys_page, a, b);
            if watched {
                bytes[k] = (p.phys_page, a as u16, b as u16);
            }
            // A page the current space's instruction TLB holds where the
            // walk found it had its walk depended on when it went in (and
            // leaves the TLB when a table it came through is written): only
            // another one's is recorded here.
            let known = self.space.is_some()
                && self.flood.is_empty()
                && self.current_phys(lin_page) == Some(p.phys_page);
            if watched && (known || self.depend_on_walk(cpu, p.tables, lin_page, 1)) {
                if !known {
                    self.itlb_insert(lin_page, p.phys_page);
                }
            } else {
                // A write could not be noticed: translate nothing here.
                pages = (u32::MAX, u32::MAX);
            }
        }
        if pages.0 == u32::MAX {
            for &(page, a, b) in &bytes {
                if page != u32::MAX {
                    self.watch.remove_code(page, u32::from(a), u32::from(b));
                }
            }
            bytes = NO_BYTES;
        }
        self.arena = arena;
        if n == 0 || pages.0 == u32::MAX {
            self.scratch = (insns, map, stretches, helpers);
            return Attempt::Done(Translation::Interpret { pages, lin, bytes });
        }
        // A block cut short (page boundary, size limit, an instruction left
        // to the dispatcher) goes on at `end`: a chainable exit too. After
        // a jump the block followed (a direct JMP that is not the exit),
        // that is the jump's target.
        let end = match followed {
            Some(t) if exit.is_none() => t,
            _ => next,
        };
        let exit = Some(exit.unwrap_or(BlockExit::Direct(end)));
        let span = Span {
            start: eip,
            end,
            pace: self.pace(),
        };
        let table = self.lookup.as_ref().map(|t| t[usize::from(user)].addr());
        let volatile =
            (self.space.is_some() && !self.volatile.is_empty()).then_some(&self.volatile);
        let insn_map = crate::emit::InsnMap { insns: &map, end };
        // The guest basic blocks this translation covers besides its first:
        // one after each conditional branch it went on past and at each
        // jump it followed, if an instruction of it was translated.
        let basic_blocks =
            (b.side_exits() + stretches.len()).saturating_sub(usize::from(split_at == n)) as u64;
        let built = self.code.as_mut().ok_or(()).and_then(|buf| {
            b.finish(buf, counted, span, exit.as_ref(), table, volatile, insn_map)
                .map_err(|_| ())
        });
        let Ok(code) = built else {
            self.scratch = (insns, map, stretches, helpers);
            return Attempt::Full(Translation::Interpret { pages, lin, bytes });
        };
        self.helper_insns.append(&mut helpers);
        self.stats.insns_translated += n as u64;
        self.stats.basic_blocks_translated += basic_blocks;
        self.stats.insns_fast += fast;
        self.stats.host_bytes += code.len() as u64;
        self.by_offset.push(code.offset(), key);
        if self.dump.is_some() {
            self.dump_block(eip, &insns, &how, &code, exit.as_ref());
        }
        let entry = Translation::Code {
            code,
            pages,
            lin,
            incoming: crate::chain::Links::None,
            bytes,
        };
        self.scratch = (insns, map, stretches, helpers);
        Attempt::Done(entry)
    }
}
