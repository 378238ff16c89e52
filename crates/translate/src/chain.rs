//! Chaining: a block's exit stub jumps straight into its target's body
//! once both are translated, and the indirect-branch tables let RET and
//! indirect JMP/CALL find their target's translation in host code.
//!
//! Each translation records the chained jumps that land in it
//! (`incoming`) and where its own stubs are chained (`Site::linked`); stubs
//! whose target is not translated yet wait in `pending`, keyed by target
//! EIP. When a translation is dropped its incoming jumps are patched back
//! to their stubs' cold tails (which return to the dispatcher) and wait
//! again, and its table entry is cleared. So a patched jump always lands in
//! live code.
//!
//! Translations are keyed by physical page ([`crate::cache::Key`]), so a
//! chained jump must land in the translation that is right for the address
//! space the code runs in:
//!
//! - A jump to a page of its own block (a *same-page* link) is right in
//!   every address space the block itself is right in, so it stays.
//! - A jump to another page (a *cross-page* link) is made only when the
//!   current address space maps that page to the target's physical page,
//!   and is recorded in `cross`; a switch to another address space cuts
//!   every cross-page link (they are made again on demand), and empties
//!   the indirect-branch tables, which are filled by the dispatcher as
//!   it looks translations up.
//!
//! Links join translations made for the same privilege only, and there is
//! one indirect-branch table per privilege, so user code never reaches a
//! translation checked only against supervisor rights.

use crate::cache::{key_eip, key_user, make_key, Key, Translation};
use crate::dispatch::Bt;
#[cfg(doc)]
use crate::emit::HostBlock;
use crate::emit::{set_linked_of, sites_of};
use crate::paging::Regions;

/// A chained jump into a block: the block holding the jump and the
/// code-buffer offset of its rel32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Link {
    pub(crate) from: Key,
    pub(crate) rel32: usize,
    /// Where the jump goes while unchained (its stub's cold tail).
    pub(crate) cold: usize,
}

/// An indirect-branch table entry as it was set: its EIP, and where the
/// translation it led to was made (the linear page of its last byte, the
/// physical pages of its first and last). The entry stays right while the
/// current mapping maps those pages there.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Published {
    pub(crate) eip: u32,
    pub(crate) lin1: u32,
    pub(crate) pages: (u32, u32),
}

/// What chaining needs of a translation ([`Bt::shape`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    lin: (u32, u32),
    pages: (u32, u32),
    /// Its body's code-buffer offset and where its words start
    /// ([`HostBlock::words`]), for translated code.
    body: Option<(usize, u32)>,
}

impl Shape {
    /// The physical page behind linear page `lin` as the translation saw
    /// it, if it covers that page.
    fn phys_of(&self, lin: u32) -> Option<u32> {
        if lin == self.lin.0 {
            Some(self.pages.0)
        } else if lin == self.lin.1 {
            Some(self.pages.1)
        } else {
            None
        }
    }
}

/// Chained jumps into one place: most often one, held inline (no
/// allocation) until there are two.
#[derive(Debug, Default)]
pub(crate) enum Links {
    #[default]
    None,
    One(Link),
    Many(Vec<Link>),
}

impl Links {
    pub(crate) fn push(&mut self, l: Link) {
        // (In place: the vector is not moved out and back.)
        match self {
            Links::None => *self = Links::One(l),
            Links::One(a) => {
                // (Room for a few more: a place two blocks jump to often
                // has more, and growing by one each time reallocates.)
                let mut v = Vec::with_capacity(8);
                v.extend([*a, l]);
                *self = Links::Many(v);
            }
            Links::Many(v) => v.push(l),
        }
    }

    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&Link) -> bool) {
        match self {
            Links::None => {}
            Links::One(l) => {
                if !keep(l) {
                    *self = Links::None;
                }
            }
            Links::Many(v) => v.retain(keep),
        }
    }

    pub(crate) fn as_slice(&self) -> &[Link] {
        match self {
            Links::None => &[],
            Links::One(l) => std::slice::from_ref(l),
            Links::Many(v) => v,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }
}

impl Bt {
    /// Patch a chained jump back to its stub's cold tail (which returns to
    /// the dispatcher).
    fn unpatch(&mut self, l: Link) {
        if let Some(buf) = self.code.as_mut() {
            buf.patch_rel32(l.rel32, l.cold);
        }
    }

    /// Where a translation is (for chaining): the linear pages it was made
    /// from, their physical pages, and its body's code-buffer offset (None
    /// for a block left to the interpreter).
    fn shape(&self, k: Key) -> Option<Shape> {
        let t = self.cache.peek(&k)?;
        Some(Shape {
            lin: t.lin_pages(),
            pages: t.pages(),
            body: match t {
                Translation::Code { code, .. } => Some((code.body_offset(), code.words())),
                Translation::Interpret { .. } => None,
            },
        })
    }

    /// Patch `l` (a stub of a block shaped `from`) into `to` (shaped
    /// `target`) if it may be chained there: Some(cross-page) if it was.
    /// The caller records the link in `to`'s incoming jumps, in the stub's
    /// site and (cross-page) in `cross`: [`Bt::file_cross`].
    fn chain_into(&mut self, l: Link, from: &Shape, to: Key, target: &Shape) -> Option<bool> {
        if key_user(l.from) != key_user(to) {
            return None;
        }
        let (body, _) = target.body?;
        let mut cross = false;
        for (lin, p) in [
            (target.lin.0, target.pages.0),
            (target.lin.1, target.pages.1),
        ] {
            match from.phys_of(lin) {
                Some(q) if q == p => {}
                Some(_) => return None,
                None => {
                    cross = true;
                    if self.current_phys(lin) != Some(p) {
                        return None;
                    }
                }
            }
        }
        if let Some(buf) = self.code.as_mut() {
            buf.patch_rel32(l.rel32, body);
        }
        Some(cross)
    }

    /// A cross-page link into `to` (shaped `target`), filed under the
    /// regions of the target's pages.
    fn file_cross(&mut self, to: Key, target: &Shape, l: Link) {
        let (a, b) = ((target.lin.0 >> 10) as u16, (target.lin.1 >> 10) as u16);
        self.cross.entry(a).or_default().push((to, l));
        if b != a {
            self.cross.entry(b).or_default().push((to, l));
        }
    }

    /// Record in the block holding `l` where its stub is chained.
    fn set_linked(&mut self, l: Link, to: Option<Key>) {
        if let Some(from) = self.shape(l.from) {
            self.set_linked_in(&from, l, to);
        }
    }

    /// The same, the block holding `l` shaped `from`.
    fn set_linked_in(&mut self, from: &Shape, l: Link, to: Option<Key>) {
        if let (Some((_, words)), Some(buf)) = (from.body, self.code.as_mut()) {
            let at = sites_of(buf, words).position(|s| s.rel32 == l.rel32);
            if let Some(k) = at {
                set_linked_of(buf, words, k, to);
            }
        }
    }

    /// Chain the stubs waiting for `key`'s EIP that may land in it.
    pub(crate) fn link_waiting(&mut self, key: Key) {
        let eip = key_eip(key);
        let Some(waiting) = self.pending.remove(&eip) else {
            return;
        };
        match self.shape(key) {
            Some(me) => self.link_waiting_as(key, &me, waiting),
            None => {
                self.pending.insert(eip, waiting);
            }
        }
    }

    /// The same for the stubs `waiting` (taken out of `pending`), `key`'s
    /// translation shaped `me`.
    fn link_waiting_as(&mut self, key: Key, me: &Shape, waiting: Links) {
        let eip = key_eip(key);
        let me = *me;
        let mut still = Links::None;
        let mut came = Links::None;
        for &l in waiting.as_slice() {
            let from = self.shape(l.from);
            let cross = match &from {
                Some(from) => self.chain_into(l, from, key, &me),
                None => None,
            };
            match (cross, from) {
                (Some(cross), Some(from)) => {
                    self.set_linked_in(&from, l, Some(key));
                    if cross {
                        self.file_cross(key, &me, l);
                    }
                    came.push(l);
                }
                _ => still.push(l),
            }
        }
        if !came.is_empty() {
            if let Some(Translation::Code { incoming, .. }) = self.cache.peek_mut(&key) {
                for &l in came.as_slice() {
                    incoming.push(l);
                }
            }
        }
        if !still.is_empty() {
            self.pending.insert(eip, still);
        }
    }

    /// Link a new block: stubs waiting for it, and its own stubs.
    pub(crate) fn link(&mut self, key: Key) {
        let Some(me) = self.shape(key) else {
            return;
        };
        if let Some(waiting) = self.pending.remove(&key_eip(key)) {
            self.link_waiting_as(key, &me, waiting);
        }
        // The block's sites, copied into a vector kept between links, and
        // where each was chained (set in the block's sites at the end).
        let mut sites = std::mem::take(&mut self.site_scratch);
        sites.clear();
        if let (Some((_, words)), Some(buf)) = (me.body, self.code.as_ref()) {
            sites.extend(sites_of(buf, words));
        }
        let mut any = false;
        for site in sites.iter_mut() {
            let link = Link {
                from: key,
                rel32: site.rel32,
                cold: site.cold,
            };
            // The target's translation as this block's pages (or else the
            // current address space) say.
            let page = site.target >> 12;
            let to = me
                .phys_of(page)
                .or_else(|| self.current_phys(page))
                .map(|phys| make_key(site.target, phys, key_user(key)));
            let chained = to.and_then(|to| {
                let target = if to == key { me } else { self.shape(to)? };
                let cross = self.chain_into(link, &me, to, &target)?;
                Some((to, target, cross))
            });
            site.linked = None;
            match chained {
                Some((to, target, cross)) => {
                    if let Some(Translation::Code { incoming, .. }) = self.cache.peek_mut(&to) {
                        incoming.push(link);
                    }
                    if cross {
                        self.file_cross(to, &target, link);
                    }
                    site.linked = Some(to);
                    any = true;
                }
                None => {
                    crate::cache::grow_fourfold(&mut self.pending);
                    self.pending.entry(site.target).or_default().push(link);
                }
            }
        }
        if any {
            if let (Some((_, words)), Some(buf)) = (me.body, self.code.as_mut()) {
                for (k, done) in sites.iter().enumerate() {
                    set_linked_of(buf, words, k, done.linked);
                }
            }
        }
        self.site_scratch = sites;
    }

    /// Unchain a link from its target `to` and let it wait again.
    fn unchain(&mut self, to: Key, l: Link) {
        self.unpatch(l);
        self.set_linked(l, None);
        crate::cache::grow_fourfold(&mut self.pending);
        self.pending.entry(key_eip(to)).or_default().push(l);
    }

    /// Cut every cross-page link.
    pub(crate) fn cut_cross_links(&mut self) {
        self.cut_cross_links_in(&Regions::ALL, &|_, _| false);
    }

    /// Does the current mapping map `to`'s pages where they were when it
    /// was translated (the instruction TLB of its privilege says so; a
    /// page the TLB does not hold counts as changed)?
    pub(crate) fn mapped_alike_now(&self, to: Key) -> bool {
        let itlb = self.itlbs_now();
        self.cache.peek(&to).is_some_and(|t| {
            let (l, p) = (t.lin_pages(), t.pages());
            let tlb = &itlb[usize::from(key_user(to))];
            tlb.get(l.0) == Some(p.0) && tlb.get(l.1) == Some(p.1)
        })
    }

    /// Cut the cross-page links into the 4 MiB regions of `regions`
    /// (whose mapping may have changed), but those `keep` vouches for
    /// (e.g. [`Bt::mapped_alike_now`]). Links into other regions stay: the
    /// kernel's code, mapped alike in every process, keeps its links
    /// across context switches.
    pub(crate) fn cut_cross_links_in(
        &mut self,
        regions: &Regions,
        keep: &dyn Fn(&Bt, Key) -> bool,
    ) {
        let hit: Vec<u16> = self
            .cross
            .keys()
            .copied()
            .filter(|&r| regions.has(u32::from(r)))
            .collect();
        // Blocks whose links into a volatile region were cut: they are
        // translated again, with exits through the table (see
        // `emit::via_table`), instead of being linked and cut again. Not
        // when the jump's target is on the block's own pages: a link there
        // is cross-page only because the target's translation runs on
        // into another page, and the block made again would be linked
        // (and cut) the same way (the Linux boot translated some blocks
        // over a hundred times so).
        let mut stale = Vec::new();
        for r in hit {
            let Some(links) = self.cross.remove(&r) else {
                continue;
            };
            let keep: Vec<bool> = links.iter().map(|(to, _)| keep(self, *to)).collect();
            let mut kept = Vec::new();
            for ((to, l), keep) in links.into_iter().zip(keep) {
                if keep {
                    kept.push((to, l));
                    continue;
                }
                let live = match self.cache.peek_mut(&to) {
                    Some(Translation::Code { incoming, .. }) => {
                        let before = incoming.len();
                        incoming.retain(|x| *x != l);
                        incoming.len() != before
                    }
                    _ => false,
                };
                if live {
                    self.unchain(to, l);
                    self.stats.links_cut += 1;
                    let n = &mut self.cuts[usize::from(r) & 1023];
                    *n = n.saturating_add(1);
                    if *n == crate::dispatch::VOLATILE_CUTS {
                        self.volatile.add(u32::from(r));
                        self.stats.volatile_regions += 1;
                    }
                    let page = key_eip(to) >> 12;
                    let elsewhere = |bt: &Bt| {
                        bt.cache.peek(&l.from).is_some_and(|t| {
                            let (first, last) = t.lin_pages();
                            page != first && page != last
                        })
                    };
                    if self.volatile.has(u32::from(r)) && elsewhere(self) {
                        stale.push(l.from);
                    }
                }
            }
            if !kept.is_empty() {
                self.cross.insert(r, kept);
            }
        }
        stale.sort_unstable();
        stale.dedup();
        for k in stale {
            if let Some(e) = self.cache.pop(&k) {
                self.unlink(k, e);
            }
        }
    }

    /// Unlink a block that left the cache.
    pub(crate) fn unlink(&mut self, key: Key, entry: Translation) {
        for &(page, lo, hi) in entry.bytes() {
            if page != u32::MAX {
                self.watch.remove_code(page, u32::from(lo), u32::from(hi));
                if let Some(keys) = self.by_page.get_mut(&page) {
                    keys.retain(|&k| k != key);
                    if keys.is_empty() {
                        self.by_page.remove(&page);
                    }
                }
            }
        }
        let Translation::Code { code, incoming, .. } = entry else {
            return;
        };
        self.forget_lookup(key, &code);
        self.by_offset.remove(code.offset());
        for &l in incoming.as_slice() {
            if l.from != key && self.cache.contains(&l.from) {
                self.unchain(key, l);
            }
        }
        let Some(buf) = self.code.as_ref() else {
            return;
        };
        for site in code.sites(buf) {
            let gone = |l: &Link| l.from == key && l.rel32 == site.rel32;
            match site.linked.and_then(|t| self.cache.peek_mut(&t)) {
                Some(Translation::Code { incoming, .. }) => incoming.retain(|l| !gone(l)),
                _ => {
                    if let Some(list) = self.pending.get_mut(&site.target) {
                        list.retain(|l| !gone(l));
                    }
                }
            }
        }
    }

    /// Make `key`'s translation findable by indirect branches in host code
    /// (in the table of its privilege).
    pub(crate) fn publish_lookup(&mut self, key: Key) {
        let (
            Some(Translation::Code {
                code, lin, pages, ..
            }),
            Some(tables),
        ) = (self.cache.peek(&key), self.lookup.as_mut())
        else {
            return;
        };
        let eip = key_eip(key);
        let t = usize::from(key_user(key));
        self.lookup_regions[t].add(lin.0 >> 10);
        self.lookup_regions[t].add(lin.1 >> 10);
        let body = code.body_offset() as u32;
        let changed = tables[t].get(eip) != body;
        if tables[t].set(eip, body) && changed {
            self.lookup_used[t].push(Published {
                eip,
                lin1: lin.1,
                pages: *pages,
            });
        }
    }

    /// Remove `key`'s translation from the indirect-branch table.
    fn forget_lookup(&mut self, key: Key, code: &crate::emit::HostBlock) {
        let Some(tables) = self.lookup.as_mut() else {
            return;
        };
        let (eip, t) = (key_eip(key), usize::from(key_user(key)));
        if tables[t].get(eip) == code.body_offset() as u32 {
            // Setting an entry to 0 cannot fail.
            let _ = tables[t].set(eip, 0);
        }
    }
}
