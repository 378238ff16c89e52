//! The translation cache: guest EIP to [`Translation`], least recently
//! used out first when bounded (`--cache-blocks`), and what drops
//! translations: eviction, invalidation after a write to a code page, and
//! the flush of everything (a full code buffer, a change of mode).
//!
//! Invariants: every `Translation::Code` in the cache has its host code in
//! the current code buffer, an entry in `by_offset`, and is linked
//! ([`crate::chain`]); a translation leaves the cache only through
//! [`Bt::unlink`] (or [`Bt::flush`], which forgets everything at once), so
//! no chained jump or indirect-table entry ever points at dropped code.

use std::hash::Hasher;

use popek_vcpu::Vcpu;

use crate::chain::Link;
use crate::dispatch::Bt;
use crate::emit::{epilogue_offset, HostBlock, LookupEntry, LOOKUP_ENTRIES};

/// A hasher for guest EIPs: one multiply (the keys are not adversarial
/// for the host, only for hash-table balance).
#[derive(Default)]
pub struct EipHasher(u64);

impl Hasher for EipHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.0 = u64::from(v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A cache entry: translated code, or a note that nothing at this EIP can
/// be translated (so the block is not scanned again).
pub(crate) enum Translation {
    Code {
        code: HostBlock,
        /// Guest EIP of each translated instruction, then the EIP after them.
        eips: Vec<u32>,
        /// For each translated instruction, how many instructions before
        /// it the block's code counts as retired (helper calls retire
        /// theirs through the interpreter).
        counted: Vec<u32>,
        /// Physical pages of its first and last byte.
        pages: (u32, u32),
        /// Linear pages of its first and last byte.
        lin: (u32, u32),
        /// Chained jumps that land in this block.
        incoming: Vec<Link>,
    },
    Interpret {
        pages: (u32, u32),
        lin: (u32, u32),
    },
}

impl Translation {
    pub(crate) fn pages(&self) -> (u32, u32) {
        match self {
            Translation::Code { pages, .. } | Translation::Interpret { pages, .. } => *pages,
        }
    }

    pub(crate) fn lin_pages(&self) -> (u32, u32) {
        match self {
            Translation::Code { lin, .. } | Translation::Interpret { lin, .. } => *lin,
        }
    }
}

impl Bt {
    /// A cache miss: translate the block at `eip`, insert it (evicting the
    /// least recently used block if the cache is full) and link it.
    pub(crate) fn translate_into_cache(&mut self, cpu: &mut Vcpu, eip: u32) {
        let t = std::time::Instant::now();
        let e = self.translate(cpu, eip);
        self.stats.translate_ns += t.elapsed().as_nanos() as u64;
        if let Some((old_eip, old)) = self.cache.push(eip, e) {
            if old_eip != eip {
                self.stats.evictions += 1;
            }
            self.unlink(old_eip, old);
        }
        self.link(eip);
    }

    /// Drop every translation and reclaim the whole code buffer.
    pub fn flush(&mut self) {
        if let Some(buf) = self.code.as_ref() {
            let empty = LookupEntry::new(0, buf.exec_addr(epilogue_offset()) as u64);
            if self.lookup_used.len() > LOOKUP_ENTRIES / 8 {
                self.lookup.fill(empty);
            } else {
                for &i in &self.lookup_used {
                    self.lookup[usize::from(i)] = empty;
                }
            }
            self.lookup_used.clear();
        }
        self.cache.clear();
        self.segs_used = false;
        self.pending.clear();
        self.by_offset.clear();
        if let Some(buf) = self.code.as_mut() {
            buf.reset();
        }
        self.helper_insns.clear();
        self.stats.flushes += 1;
    }

    /// Drop the translations made from any of the `written` code pages.
    pub(crate) fn invalidate(&mut self, written: &[u32]) {
        if written.is_empty() {
            return;
        }
        self.drop_where(|t| {
            let (a, b) = t.pages();
            written.contains(&a) || written.contains(&b)
        });
    }

    /// Drop (and unlink) every cached translation `stale` says is stale.
    pub(crate) fn drop_where(&mut self, stale: impl Fn(&Translation) -> bool) {
        let keys: Vec<u32> = self
            .cache
            .iter()
            .filter(|(_, t)| stale(t))
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            if let Some(e) = self.cache.pop(&k) {
                self.unlink(k, e);
                self.stats.invalidations += 1;
            }
        }
    }
}
