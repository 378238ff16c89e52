//! Multiboot v1 loader (Multiboot Specification 0.6.96, §3) reproducing the
//! entry state of `qemu-system-i386 -kernel`.
//!
//! QEMU's Multiboot option ROM enters the kernel in 32-bit protected mode
//! with a GDT of its own (selector 0x08: flat 4 GiB ring-0 code; 0x10: flat
//! ring-0 data), paging off, interrupts off, EAX = 0x2BADB002 and EBX
//! pointing at the Multiboot information structure. popek builds the same
//! GDT in low memory ([`GDT_ADDR`]) and the information structure at
//! [`MBI_ADDR`].

use popek_memory::GuestRam;

use crate::elf32::Elf32;
use crate::LoadError;

/// The Multiboot header magic.
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// EAX at entry.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// Where popek puts the entry GDT.
pub const GDT_ADDR: u32 = 0x500;
/// Where popek puts the Multiboot information structure (where QEMU's
/// loader puts it).
pub const MBI_ADDR: u32 = 0x9500;
/// ESP at entry (the spec leaves it undefined; guests set their own):
/// where QEMU 7.2's Multiboot option ROM leaves it.
pub const ENTRY_ESP: u32 = 0x6F08;
/// EDI at entry (undefined by the spec): what QEMU 7.2's option ROM
/// leaves there, as ECX (the entry point, which it jumps through) and EDX
/// ([`entry_edx`]), so that a debugger reads the same registers under
/// popek as under QEMU (docs/quirks.md).
pub const ENTRY_EDI: u32 = 0x1000;

/// EDX at entry: QEMU's option ROM computes mem_upper (KiB) in EDX, then
/// reads its fw_cfg data port (0x511) through DX, so the high half of
/// mem_upper and the port are left.
pub fn entry_edx(mem_upper_kib: u32) -> u32 {
    (mem_upper_kib & 0xFFFF_0000) | 0x511
}
/// Code selector at entry (as QEMU's option ROM).
pub const ENTRY_CS: u16 = 0x08;
/// Data selectors at entry.
pub const ENTRY_DS: u16 = 0x10;

/// Header flag: the a.out kludge address fields are valid.
const FLAG_AOUT_KLUDGE: u32 = 1 << 16;

/// What the loader placed where.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// Entry point (EIP).
    pub entry: u32,
    /// Lowest and highest+1 physical address of the image.
    pub image: (u32, u32),
    /// Physical address of the Multiboot information structure (EBX).
    pub mbi: u32,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Find the Multiboot header: 4-byte aligned, in the first 8 KiB, with a
/// valid checksum. Returns its file offset and flags.
pub fn find_header(file: &[u8]) -> Option<(usize, u32)> {
    let end = file.len().min(8192);
    (0..end.saturating_sub(11)).step_by(4).find_map(|off| {
        let magic = u32_at(file, off);
        let flags = u32_at(file, off + 4);
        let sum = u32_at(file, off + 8);
        (magic == HEADER_MAGIC && magic.wrapping_add(flags).wrapping_add(sum) == 0)
            .then_some((off, flags))
    })
}

/// Load a Multiboot kernel into RAM and build the information structure.
pub fn load(ram: &mut GuestRam, file: &[u8], cmdline: &str) -> Result<Loaded, LoadError> {
    let (hoff, flags) = find_header(file).ok_or(LoadError::NoMultibootHeader)?;
    if flags & 0xFFFC & !FLAG_AOUT_KLUDGE != 0 {
        return Err(LoadError::Malformed(format!(
            "Multiboot header requests unsupported features (flags {flags:#x})"
        )));
    }
    let (entry, image) = if flags & FLAG_AOUT_KLUDGE != 0 {
        load_aout_kludge(ram, file, hoff)?
    } else {
        load_elf(ram, file)?
    };
    let mbi = build_info(ram, cmdline);
    Ok(Loaded { entry, image, mbi })
}

fn load_aout_kludge(
    ram: &mut GuestRam,
    file: &[u8],
    hoff: usize,
) -> Result<(u32, (u32, u32)), LoadError> {
    if file.len() < hoff + 32 {
        return Err(LoadError::Malformed("truncated Multiboot header".into()));
    }
    let header_addr = u32_at(file, hoff + 12);
    let load_addr = u32_at(file, hoff + 16);
    let load_end = u32_at(file, hoff + 20);
    let bss_end = u32_at(file, hoff + 24);
    let entry = u32_at(file, hoff + 28);
    let start = (hoff as u64)
        .checked_sub(u64::from(header_addr.wrapping_sub(load_addr)))
        .ok_or_else(|| LoadError::Malformed("Multiboot load_addr above header".into()))?
        as usize;
    let end = if load_end == 0 {
        file.len()
    } else {
        start + load_end.wrapping_sub(load_addr) as usize
    };
    let data = file
        .get(start..end)
        .ok_or_else(|| LoadError::Malformed("Multiboot load range outside the file".into()))?;
    if !ram.load(load_addr, data) {
        return Err(LoadError::DoesNotFit {
            addr: load_addr,
            len: data.len() as u64,
        });
    }
    let img_end = load_addr + data.len() as u32;
    let mut hi = img_end;
    if bss_end > img_end {
        if !ram.zero(img_end, bss_end - img_end) {
            return Err(LoadError::DoesNotFit {
                addr: img_end,
                len: u64::from(bss_end - img_end),
            });
        }
        hi = bss_end;
    }
    Ok((entry, (load_addr, hi)))
}

fn load_elf(ram: &mut GuestRam, file: &[u8]) -> Result<(u32, (u32, u32)), LoadError> {
    let elf = Elf32::parse(file)?;
    let range = elf.load_into(ram, true)?;
    Ok((elf.entry(), range))
}

/// Write the Multiboot information structure (spec §3.3) and the entry GDT.
fn build_info(ram: &mut GuestRam, cmdline: &str) -> u32 {
    // The GDT QEMU's option ROM uses: null, flat code (0x08), flat data (0x10).
    let gdt: [u64; 3] = [0, 0x00CF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF];
    for (i, d) in gdt.iter().enumerate() {
        ram.write(GDT_ADDR + 8 * i as u32, 8, *d);
    }
    let m = MBI_ADDR;
    ram.zero(m, 0x1000);
    let cmd_addr = m + 0x100;
    let name_addr = m + 0x80;
    let mmap_addr = m + 0x40 + 0x400;
    let mut cmd = cmdline.as_bytes().to_vec();
    cmd.truncate(0x3FF);
    cmd.push(0);
    ram.load(cmd_addr, &cmd);
    ram.load(name_addr, b"popek\0");
    let ram_kib = ram.size() / 1024;
    // mmap: [0, 639 KiB) and [1 MiB, end of RAM) available.
    let entries: [(u64, u64); 2] = [(0, 0x9FC00), (0x10_0000, u64::from(ram.size()) - 0x10_0000)];
    for (i, (base, len)) in entries.iter().enumerate() {
        let e = mmap_addr + 24 * i as u32;
        ram.write(e, 4, 20);
        ram.write(e + 4, 8, *base);
        ram.write(e + 12, 8, *len);
        ram.write(e + 20, 4, 1);
    }
    let flags = 1 | (1 << 2) | (1 << 6) | (1 << 9);
    ram.write(m, 4, flags);
    ram.write(m + 4, 4, 640);
    ram.write(m + 8, 4, u64::from(ram_kib.saturating_sub(1024)));
    ram.write(m + 16, 4, u64::from(cmd_addr));
    ram.write(m + 44, 4, 48);
    ram.write(m + 48, 4, u64::from(mmap_addr));
    ram.write(m + 64, 4, u64::from(name_addr));
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(flags: u32) -> Vec<u8> {
        let mut v = vec![0u8; 64];
        v[8..12].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        v[12..16].copy_from_slice(&flags.to_le_bytes());
        let sum = 0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags);
        v[16..20].copy_from_slice(&sum.to_le_bytes());
        v
    }

    #[test]
    fn header_needs_alignment_and_checksum() {
        let v = header(0);
        assert_eq!(find_header(&v), Some((8, 0)));
        let mut bad = v.clone();
        bad[16] ^= 1;
        assert_eq!(find_header(&bad), None);
        let mut shifted = vec![0u8; 2];
        shifted.extend_from_slice(&v);
        assert_eq!(find_header(&shifted), None);
    }

    #[test]
    fn aout_kludge_loads_and_clears_bss() {
        let mut f = header(FLAG_AOUT_KLUDGE);
        let base = 0x10_0000u32;
        // header at file offset 8 == address base + 8
        for (i, v) in [base + 8, base, 0, base + 0x200, base + 0x30]
            .iter()
            .enumerate()
        {
            f[20 + 4 * i..24 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(&[0xF4; 16]);
        let mut ram = GuestRam::new(4 << 20).unwrap();
        ram.write(base + 0x100, 4, 0xFFFF_FFFF);
        let l = load(&mut ram, &f, "k").unwrap();
        assert_eq!(l.entry, base + 0x30);
        assert_eq!(ram.read(base + 64, 1), 0xF4);
        assert_eq!(ram.read(base + 0x100, 4), 0);
        assert_eq!(ram.read(MBI_ADDR + 8, 4), 4 * 1024 - 1024);
    }

    #[test]
    fn rejects_garbage() {
        let mut ram = GuestRam::new(1 << 20).unwrap();
        assert!(matches!(
            load(&mut ram, b"hello", ""),
            Err(LoadError::NoMultibootHeader)
        ));
        let mut f = header(0);
        f.extend_from_slice(&[0; 64]);
        assert!(matches!(
            load(&mut ram, &f, ""),
            Err(LoadError::Malformed(_))
        ));
    }
}
