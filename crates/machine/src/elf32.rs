//! ELF32 i386 images (via the `object` crate): the part both loaders share.

use object::elf::{self, FileHeader32, ProgramHeader32};
use object::read::elf::{FileHeader, ProgramHeader};
use object::Endianness;
use popek_memory::GuestRam;

use crate::LoadError;

/// One PT_LOAD segment.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    /// Virtual address.
    pub vaddr: u32,
    /// Size in memory (the part beyond the file data is zero).
    pub memsz: u32,
    /// Offset in the file.
    pub offset: u32,
    /// PF_R, PF_W, PF_X.
    pub flags: u32,
    /// The file data.
    pub data: &'a [u8],
}

/// A parsed little-endian i386 ELF32 file.
pub struct Elf32<'a> {
    data: &'a [u8],
    hdr: &'a FileHeader32<Endianness>,
    endian: Endianness,
    phdrs: &'a [ProgramHeader32<Endianness>],
}

impl<'a> Elf32<'a> {
    /// Parse and check the header and program headers.
    pub fn parse(data: &'a [u8]) -> Result<Self, LoadError> {
        let hdr = FileHeader32::<Endianness>::parse(data)
            .map_err(|e| LoadError::Malformed(format!("not an ELF32 file: {e}")))?;
        let endian = hdr
            .endian()
            .map_err(|e| LoadError::Malformed(format!("ELF: {e}")))?;
        if endian != Endianness::Little || hdr.e_machine(endian) != elf::EM_386 {
            return Err(LoadError::Malformed("ELF is not little-endian i386".into()));
        }
        let phdrs = hdr
            .program_headers(endian, data)
            .map_err(|e| LoadError::Malformed(format!("ELF program headers: {e}")))?;
        Ok(Elf32 {
            data,
            hdr,
            endian,
            phdrs,
        })
    }

    /// The entry point.
    pub fn entry(&self) -> u32 {
        self.hdr.e_entry(self.endian)
    }

    /// Does the file ask for a dynamic loader (PT_INTERP)?
    pub fn has_interp(&self) -> bool {
        self.phdrs
            .iter()
            .any(|p| p.p_type(self.endian) == elf::PT_INTERP)
    }

    /// The program interpreter PT_INTERP names (the dynamic loader).
    pub fn interp(&self) -> Option<String> {
        let e = self.endian;
        let p = self.phdrs.iter().find(|p| p.p_type(e) == elf::PT_INTERP)?;
        let b = p.data(e, self.data).ok()?;
        let b = b.split(|&c| c == 0).next()?;
        Some(String::from_utf8_lossy(b).into_owned())
    }

    /// Is it position-independent (ET_DYN: a static PIE when it has no
    /// PT_INTERP)?
    pub fn is_dyn(&self) -> bool {
        self.hdr.e_type(self.endian) == elf::ET_DYN
    }

    /// (file offset, entry size, count) of the program headers.
    pub fn phdr_table(&self) -> (u32, u16, u16) {
        let e = self.endian;
        (
            self.hdr.e_phoff(e),
            self.hdr.e_phentsize(e),
            self.hdr.e_phnum(e),
        )
    }

    /// The PT_LOAD segments in full.
    pub fn segments(&self) -> Result<Vec<Segment<'a>>, LoadError> {
        let e = self.endian;
        self.phdrs
            .iter()
            .filter(|p| p.p_type(e) == elf::PT_LOAD)
            .map(|p| {
                let data = p
                    .data(e, self.data)
                    .map_err(|_| LoadError::Malformed("ELF segment outside the file".into()))?;
                if p.p_memsz(e) < p.p_filesz(e) {
                    return Err(LoadError::Malformed(
                        "ELF segment with memsz < filesz".into(),
                    ));
                }
                Ok(Segment {
                    vaddr: p.p_vaddr(e),
                    memsz: p.p_memsz(e),
                    offset: p.p_offset(e),
                    flags: p.p_flags(e).0,
                    data,
                })
            })
            .collect()
    }

    /// The loadable segments: (virtual address, physical address, memory
    /// size, writable).
    pub fn loads(&self) -> impl Iterator<Item = (u32, u32, u32, bool)> + '_ {
        let e = self.endian;
        self.phdrs
            .iter()
            .filter(move |p| p.p_type(e) == elf::PT_LOAD)
            .map(move |p| {
                (
                    p.p_vaddr(e),
                    p.p_paddr(e),
                    p.p_memsz(e),
                    p.p_flags(e).contains(elf::PF_W),
                )
            })
    }

    /// Copy every PT_LOAD segment into RAM at its physical (`physical`) or
    /// virtual address and zero the rest of its memory size. Returns the
    /// lowest and highest+1 address loaded.
    pub fn load_into(&self, ram: &mut GuestRam, physical: bool) -> Result<(u32, u32), LoadError> {
        let e = self.endian;
        let (mut lo, mut hi) = (u32::MAX, 0u32);
        for ph in self.phdrs.iter().filter(|p| p.p_type(e) == elf::PT_LOAD) {
            let addr = if physical {
                ph.p_paddr(e)
            } else {
                ph.p_vaddr(e)
            };
            let (filesz, memsz) = (ph.p_filesz(e), ph.p_memsz(e));
            if memsz < filesz {
                return Err(LoadError::Malformed(
                    "ELF segment with memsz < filesz".into(),
                ));
            }
            let bytes = ph
                .data(e, self.data)
                .map_err(|_| LoadError::Malformed("ELF segment outside the file".into()))?;
            if !ram.contains(addr, memsz) {
                return Err(LoadError::DoesNotFit {
                    addr,
                    len: u64::from(memsz),
                });
            }
            ram.load(addr, bytes);
            ram.zero(addr + filesz, memsz - filesz);
            lo = lo.min(addr);
            hi = hi.max(addr + memsz);
        }
        if lo == u32::MAX {
            return Err(LoadError::Malformed("ELF has no loadable segment".into()));
        }
        Ok((lo, hi))
    }
}
