//! The process's address space, kept the way a kernel keeps it: a list of
//! mapped ranges (VMAs) and the i386 page tables the virtual CPU walks
//! (SDM Vol. 3 §4.3, 32-bit paging), over guest-physical pages handed out
//! by a page allocator.
//!
//! Every mapped page is backed at once (guest RAM is a lazily filled
//! memfd, so an untouched page costs the host nothing) and its entry is
//! written with the accessed and dirty bits already set, so neither engine
//! ever takes a page fault on memory the process owns. Entries that only
//! grant more (new mappings) are written with [`GuestRam::write_grant`];
//! entries that take rights away (munmap, mprotect, mremap) are ordinary
//! writes, which make the translator drop what it derived from the tables.
//!
//! Layout (as an x86-64 kernel gives a 32-bit process, without ASLR): the
//! executable at its link address (a static PIE at 0x56555000), the heap
//! (brk) after it, mmap regions top-down below 0xF7FF0000, the stack below
//! 0xFFFFE000, and two supervisor-only pages at the top for the
//! descriptor tables, the trampoline and the kernel stack.

use std::collections::BTreeMap;

use popek_vcpu::Vcpu;

use super::errno::{Errno, EFAULT, EINVAL, ENOMEM};

/// Page size.
pub const PAGE: u32 = 0x1000;
/// The kernel's two pages (supervisor only).
pub const KERNEL_BASE: u32 = 0xFFFF_E000;
/// Top of the user stack.
pub const STACK_TOP: u32 = KERNEL_BASE;
/// Size of the stack mapping (the default RLIMIT_STACK, 8 MiB).
pub const STACK_SIZE: u32 = 8 << 20;
/// mmap places regions top-down from here.
pub const MMAP_TOP: u32 = 0xF7FF_0000;
/// ... and not below here.
const MMAP_BOTTOM: u32 = 0x0001_0000;
/// Where a static PIE is loaded.
pub const PIE_BASE: u32 = 0x5655_5000;

/// mmap protection bits.
pub mod prot {
    /// Readable.
    pub const READ: u32 = 1;
    /// Writable.
    pub const WRITE: u32 = 2;
    /// Executable (x86 32-bit paging has no NX: readable means executable).
    pub const EXEC: u32 = 4;
}

const P: u32 = 1;
const RW: u32 = 2;
const US: u32 = 4;
const A: u32 = 0x20;
const D: u32 = 0x40;

/// Round up to a page.
pub fn page_up(v: u32) -> u32 {
    v.wrapping_add(PAGE - 1) & !(PAGE - 1)
}

/// The address space.
#[derive(Debug)]
pub struct AddressSpace {
    /// Physical address of the page directory (CR3).
    pub directory: u32,
    next_phys: u32,
    phys_end: u32,
    /// Freed pages, handed out again in ascending runs (see `alloc`).
    free: std::collections::BTreeSet<u32>,
    /// The page `alloc` handed out last.
    last: u32,
    /// Mapped ranges: start -> (end, prot).
    vmas: BTreeMap<u32, (u32, u32)>,
    /// Start of the heap.
    pub brk_start: u32,
    /// Current end of the heap.
    pub brk: u32,
}

impl AddressSpace {
    /// An empty address space over all of `cpu`'s RAM.
    pub fn new(cpu: &mut Vcpu) -> AddressSpace {
        let mut a = AddressSpace {
            directory: 0,
            next_phys: PAGE,
            phys_end: cpu.ram.size() & !(PAGE - 1),
            free: std::collections::BTreeSet::new(),
            last: 0,
            vmas: BTreeMap::new(),
            brk_start: 0,
            brk: 0,
        };
        a.directory = a.alloc(cpu).expect("RAM for a page directory");
        a
    }

    /// A zeroed physical page: the one after the last handed out when it
    /// is free, so that a mapping made page by page gets consecutive frames
    /// (the translator maps a run of consecutive frames into its shadow
    /// with one host call at the first touch, where scattered frames take
    /// a hidden fault each: a freed heap reused for a fresh one cost glibc's
    /// qsort a fault per page).
    fn alloc(&mut self, cpu: &mut Vcpu) -> Option<u32> {
        let next = self.last.wrapping_add(PAGE);
        let reused = if self.free.remove(&next) {
            Some(next)
        } else {
            self.free.pop_first()
        };
        let p = match reused {
            Some(p) => {
                cpu.ram.zero(p, PAGE);
                p
            }
            None if self.next_phys < self.phys_end => {
                self.next_phys += PAGE;
                self.next_phys - PAGE
            }
            None => return None,
        };
        self.last = p;
        Some(p)
    }

    /// Physical address of the page-table entry for `lin`, creating the
    /// page table if `create`.
    fn pte(&mut self, cpu: &mut Vcpu, lin: u32, create: bool) -> Option<u32> {
        let pde_at = self.directory + (lin >> 22) * 4;
        let mut pde = cpu.ram.read(pde_at, 4) as u32;
        if pde & P == 0 {
            if !create {
                return None;
            }
            let table = self.alloc(cpu)?;
            // The page entries decide the rights.
            pde = table | P | RW | US;
            cpu.ram.write_grant(pde_at, pde);
        }
        Some((pde & !0xFFF) + ((lin >> 12) & 0x3FF) * 4)
    }

    /// The present entry for `lin` (no side effects).
    fn entry(&self, cpu: &Vcpu, lin: u32) -> Option<u32> {
        let pde = cpu.ram.read(self.directory + (lin >> 22) * 4, 4) as u32;
        if pde & P == 0 {
            return None;
        }
        let e = cpu.ram.read((pde & !0xFFF) + ((lin >> 12) & 0x3FF) * 4, 4) as u32;
        (e & P != 0).then_some(e)
    }

    fn flags(prot: u32, user: bool) -> u32 {
        let mut f = A | D;
        if prot & (prot::READ | prot::WRITE | prot::EXEC) != 0 {
            f |= P;
        }
        if prot & prot::WRITE != 0 {
            f |= RW;
        }
        if user {
            f |= US;
        }
        f
    }

    /// Map fresh zeroed memory at `[start, end)` (page-aligned, not mapped
    /// yet). `user` false makes supervisor-only pages.
    pub fn map(
        &mut self,
        cpu: &mut Vcpu,
        start: u32,
        end: u32,
        prot: u32,
        user: bool,
    ) -> Result<(), Errno> {
        let flags = Self::flags(prot, user);
        // `end` may be 0: the kernel's pages end at 4 GiB.
        for i in 0..end.wrapping_sub(start) / PAGE {
            let lin = start + i * PAGE;
            let phys = self.alloc(cpu).ok_or(ENOMEM)?;
            let at = self.pte(cpu, lin, true).ok_or(ENOMEM)?;
            cpu.ram.write_grant(at, phys | flags);
        }
        if user {
            self.vmas.insert(start, (end, prot));
        }
        Ok(())
    }

    /// The physical page behind `lin`, if mapped (present or not).
    fn backing(&mut self, cpu: &mut Vcpu, lin: u32) -> Option<(u32, u32)> {
        let at = self.pte(cpu, lin, false)?;
        let e = cpu.ram.read(at, 4) as u32;
        (e & !0xFFF != 0).then_some((at, e))
    }

    /// Remove `[start, end)` from the VMA list (splitting ranges).
    fn cut(&mut self, start: u32, end: u32) {
        let hit: Vec<(u32, (u32, u32))> = self
            .vmas
            .range(..end)
            .filter(|(_, (e, _))| *e > start)
            .map(|(s, v)| (*s, *v))
            .collect();
        for (s, (e, p)) in hit {
            self.vmas.remove(&s);
            if s < start {
                self.vmas.insert(s, (start, p));
            }
            if e > end {
                self.vmas.insert(end, (e, p));
            }
        }
    }

    /// munmap: free the pages of `[start, end)` (a page of a shared
    /// mapping is unlinked from its file first).
    pub fn unmap(&mut self, cpu: &mut Vcpu, start: u32, end: u32) {
        let mut lin = start;
        while lin < end {
            if let Some((at, e)) = self.backing(cpu, lin) {
                cpu.ram.write(at, 4, 0);
                let frame = e & !0xFFF;
                if cpu.ram.is_linked(frame / PAGE) && cpu.ram.unlink_page(frame / PAGE).is_err() {
                    // Still the file's page: never handed out again.
                    lin += PAGE;
                    continue;
                }
                self.free.insert(frame);
            }
            lin += PAGE;
        }
        self.cut(start, end);
    }

    /// The physical page behind mapped page `lin`.
    pub fn frame(&self, cpu: &Vcpu, lin: u32) -> Option<u32> {
        self.entry(cpu, lin).map(|e| e & !0xFFF)
    }

    /// mprotect. ENOMEM if part of the range is not mapped.
    pub fn protect(
        &mut self,
        cpu: &mut Vcpu,
        start: u32,
        end: u32,
        prot: u32,
    ) -> Result<(), Errno> {
        if !self.is_mapped(start, end) {
            return Err(ENOMEM);
        }
        let flags = Self::flags(prot, true);
        let mut lin = start;
        while lin < end {
            if let Some((at, e)) = self.backing(cpu, lin) {
                cpu.ram.write(at, 4, u64::from((e & !0xFFF) | flags));
            }
            lin += PAGE;
        }
        self.cut_join(start, end, prot);
        Ok(())
    }

    /// Is every page of `[start, end)` in some VMA?
    pub fn is_mapped(&self, start: u32, end: u32) -> bool {
        let mut at = start;
        for (&s, &(e, _)) in self.vmas.range(..end) {
            if e <= at {
                continue;
            }
            if s > at {
                return false;
            }
            at = e;
            if at >= end {
                return true;
            }
        }
        at >= end
    }

    /// Is any page of `[start, end)` in some VMA?
    pub fn overlaps(&self, start: u32, end: u32) -> bool {
        self.vmas.range(..end).any(|(_, &(e, _))| e > start)
    }

    /// The protection of the VMA holding `lin`.
    pub fn prot_at(&self, lin: u32) -> Option<u32> {
        self.vmas
            .range(..=lin)
            .next_back()
            .filter(|(_, &(e, _))| e > lin)
            .map(|(_, &(_, p))| p)
    }

    /// A free range of `len` bytes, top-down from [`MMAP_TOP`].
    pub fn find_free(&self, len: u32) -> Option<u32> {
        let mut hi = MMAP_TOP;
        for (&s, &(e, _)) in self.vmas.range(..MMAP_TOP).rev() {
            if e <= hi && hi - e >= len {
                return Some(hi - len);
            }
            hi = hi.min(s);
        }
        (hi >= MMAP_BOTTOM + len).then(|| hi - len)
    }

    /// mremap: move the pages of `[old, old+old_len)` to `new` (a free
    /// range) without copying, by rewriting their entries.
    pub fn move_pages(
        &mut self,
        cpu: &mut Vcpu,
        old: u32,
        len: u32,
        new: u32,
    ) -> Result<(), Errno> {
        let prot = self.prot_at(old).ok_or(EFAULT)?;
        let flags = Self::flags(prot, true);
        for off in (0..len).step_by(PAGE as usize) {
            let Some((at, e)) = self.backing(cpu, old + off) else {
                continue;
            };
            cpu.ram.write(at, 4, 0);
            let to = self.pte(cpu, new + off, true).ok_or(ENOMEM)?;
            cpu.ram.write(to, 4, u64::from((e & !0xFFF) | flags));
        }
        self.cut(old, old + len);
        self.cut_join(new, new + len, prot);
        Ok(())
    }

    /// Record `[start, end)` as one range with `prot`, replacing whatever
    /// ranges covered it.
    pub fn cut_join(&mut self, start: u32, end: u32, prot: u32) {
        self.cut(start, end);
        self.vmas.insert(start, (end, prot));
    }

    /// Extend the VMA ending at `end` by fresh pages up to `new_end`.
    pub fn grow(
        &mut self,
        cpu: &mut Vcpu,
        start: u32,
        end: u32,
        new_end: u32,
    ) -> Result<(), Errno> {
        let prot = self.prot_at(start).ok_or(EFAULT)?;
        if self.overlaps(end, new_end) {
            return Err(ENOMEM);
        }
        self.map(cpu, end, new_end, prot, true)?;
        self.cut_join(start, new_end, prot);
        Ok(())
    }

    /// brk: move the end of the heap; returns the new (or, on failure, the
    /// old) break, as Linux does.
    pub fn set_brk(&mut self, cpu: &mut Vcpu, want: u32) -> u32 {
        if want < self.brk_start {
            return self.brk;
        }
        let (old_top, new_top) = (page_up(self.brk), page_up(want));
        if new_top > old_top {
            if self.overlaps(old_top, new_top)
                || self
                    .map(cpu, old_top, new_top, prot::READ | prot::WRITE, true)
                    .is_err()
            {
                return self.brk;
            }
            // One VMA for the whole heap (brk_start is page-aligned).
            self.cut_join(self.brk_start, new_top, prot::READ | prot::WRITE);
        } else if new_top < old_top {
            self.unmap(cpu, new_top, old_top);
        }
        self.brk = want;
        self.brk
    }

    /// Copy user memory out (EFAULT if any byte is not readable).
    pub fn read(&self, cpu: &Vcpu, addr: u32, len: u32) -> Result<Vec<u8>, Errno> {
        let mut out = Vec::with_capacity(len as usize);
        self.each_page(cpu, addr, len, false, |ram, phys, n| {
            out.extend_from_slice(&ram.as_slice()[phys as usize..(phys + n) as usize]);
        })
        .map(|_| out)
    }

    /// Copy into user memory (EFAULT if any byte is not writable).
    pub fn write(&self, cpu: &mut Vcpu, addr: u32, data: &[u8]) -> Result<(), Errno> {
        self.store(cpu, addr, data, true)
    }

    /// Copy into mapped user memory whatever its protection (the loader
    /// and file mappings filling read-only pages).
    pub fn fill(&self, cpu: &mut Vcpu, addr: u32, data: &[u8]) -> Result<(), Errno> {
        self.store(cpu, addr, data, false)
    }

    fn store(&self, cpu: &mut Vcpu, addr: u32, data: &[u8], check: bool) -> Result<(), Errno> {
        let mut pieces = Vec::new();
        self.each_page(cpu, addr, data.len() as u32, check, |_, phys, n| {
            pieces.push((phys, n));
        })?;
        let mut at = 0usize;
        for (phys, n) in pieces {
            cpu.ram.load(phys, &data[at..at + n as usize]);
            at += n as usize;
        }
        Ok(())
    }

    fn each_page(
        &self,
        cpu: &Vcpu,
        addr: u32,
        len: u32,
        write: bool,
        mut f: impl FnMut(&popek_vcpu::GuestRam, u32, u32),
    ) -> Result<(), Errno> {
        if len == 0 {
            return Ok(());
        }
        if addr.checked_add(len - 1).is_none() {
            return Err(EFAULT);
        }
        let mut at = addr;
        let end = addr + (len - 1);
        loop {
            let e = self.entry(cpu, at).ok_or(EFAULT)?;
            if e & US == 0 || (write && e & RW == 0) {
                return Err(EFAULT);
            }
            let page_end = (at | 0xFFF).min(end);
            let n = page_end - at + 1;
            f(&cpu.ram, (e & !0xFFF) | (at & 0xFFF), n);
            if page_end == end {
                return Ok(());
            }
            at = page_end + 1;
        }
    }

    /// A 32-bit word of user memory.
    pub fn read_u32(&self, cpu: &Vcpu, addr: u32) -> Result<u32, Errno> {
        let b = self.read(cpu, addr, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Store a 32-bit word in user memory.
    pub fn write_u32(&self, cpu: &mut Vcpu, addr: u32, v: u32) -> Result<(), Errno> {
        self.write(cpu, addr, &v.to_le_bytes())
    }

    /// A NUL-terminated string of user memory (at most 4096 bytes).
    pub fn read_cstr(&self, cpu: &Vcpu, addr: u32) -> Result<Vec<u8>, Errno> {
        let mut out = Vec::new();
        let mut at = addr;
        loop {
            let chunk = (PAGE - (at & 0xFFF)).min(4096);
            let b = self.read(cpu, at, chunk)?;
            if let Some(n) = b.iter().position(|&c| c == 0) {
                out.extend_from_slice(&b[..n]);
                return Ok(out);
            }
            out.extend_from_slice(&b);
            if out.len() >= 4096 {
                return Err(EINVAL);
            }
            at = at.wrapping_add(chunk);
        }
    }
}
