//! Chaining: a block's exit stub jumps straight into its target's body
//! once both are translated, and the indirect-branch table lets RET and
//! indirect JMP/CALL find their target's translation in host code.
//!
//! Each translation records the chained jumps that land in it
//! (`incoming`); stubs whose target is not translated yet wait in
//! `pending`, keyed by target EIP. When a translation is dropped its
//! incoming jumps are patched back to their stubs' cold tails (which
//! return to the dispatcher) and wait again, and its table entry is
//! cleared. So a patched jump always lands in live code.

use crate::cache::Translation;
use crate::dispatch::Bt;
use crate::emit::{epilogue_offset, LookupEntry};

/// A chained jump into a block: the block holding the jump and the
/// code-buffer offset of its rel32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Link {
    pub(crate) from: u32,
    pub(crate) rel32: usize,
    /// Where the jump goes while unchained (its stub's cold tail).
    pub(crate) cold: usize,
}

impl Bt {
    /// Patch a chained jump to land in `target`'s body, or back to its
    /// stub's cold tail (which returns to the dispatcher).
    fn patch(&mut self, l: Link, to_body_of: Option<u32>) {
        let to = match to_body_of.and_then(|t| self.cache.peek(&t)) {
            Some(Translation::Code { code, .. }) => code.body_offset(),
            _ => l.cold,
        };
        if let Some(buf) = self.code.as_mut() {
            buf.patch_rel32(l.rel32, to);
        }
    }

    /// Link a new block at `eip`: stubs waiting for it, and its own stubs.
    pub(crate) fn link(&mut self, eip: u32) {
        let waiting = self.pending.remove(&eip).unwrap_or_default();
        for l in &waiting {
            self.patch(*l, Some(eip));
        }
        let sites: Vec<_> = match self.cache.peek_mut(&eip) {
            Some(Translation::Code { code, incoming, .. }) => {
                incoming.extend(waiting);
                code.sites().to_vec()
            }
            _ => return,
        };
        for site in sites {
            let link = Link {
                from: eip,
                rel32: site.rel32,
                cold: site.cold,
            };
            if let Some(Translation::Code { incoming, .. }) = self.cache.peek_mut(&site.target) {
                incoming.push(link);
                self.patch(link, Some(site.target));
            } else {
                self.pending.entry(site.target).or_default().push(link);
            }
        }
    }

    /// Unlink a block that left the cache.
    pub(crate) fn unlink(&mut self, eip: u32, entry: Translation) {
        let Translation::Code { code, incoming, .. } = entry else {
            return;
        };
        self.forget_lookup(eip);
        self.by_offset.remove(&code.offset());
        for l in incoming {
            if l.from != eip && self.cache.contains(&l.from) {
                self.patch(l, None);
                self.pending.entry(eip).or_default().push(l);
            }
        }
        for site in code.sites() {
            let gone = |l: &Link| l.from == eip && l.rel32 == site.rel32;
            if let Some(Translation::Code { incoming, .. }) = self.cache.peek_mut(&site.target) {
                incoming.retain(|l| !gone(l));
            } else if let Some(list) = self.pending.get_mut(&site.target) {
                list.retain(|l| !gone(l));
            }
        }
    }

    /// Make `eip`'s translation findable by indirect branches in host code.
    pub(crate) fn publish_lookup(&mut self, eip: u32) {
        let (Some(Translation::Code { code, .. }), Some(buf)) =
            (self.cache.peek(&eip), self.code.as_ref())
        else {
            return;
        };
        let host = buf.exec_addr(code.body_offset()) as u64;
        let empty = buf.exec_addr(epilogue_offset()) as u64;
        let i = eip as u16;
        let e = &mut self.lookup[usize::from(i)];
        if e.host == empty {
            self.lookup_used.push(i);
        }
        *e = LookupEntry::new(eip, host);
    }

    /// Remove `eip` from the indirect-branch table.
    fn forget_lookup(&mut self, eip: u32) {
        let Some(buf) = self.code.as_ref() else {
            return;
        };
        let e = &mut self.lookup[usize::from(eip as u16)];
        if e.eip() == eip {
            *e = LookupEntry::new(0, buf.exec_addr(epilogue_offset()) as u64);
        }
    }
}
