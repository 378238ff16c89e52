//! The Linux/x86 boot protocol, 32-bit entry (the kernel's
//! Documentation/x86/boot.rst, "32-bit Boot Protocol", and zero-page.rst):
//! a bzImage's protected-mode kernel loaded at 1 MiB, the `boot_params`
//! ("zero page") with the setup header copied from the file, an e820 memory
//! map, the command line and an initrd placed high.
//!
//! At entry the CPU is in 32-bit protected mode with paging off, a GDT holds
//! flat 4 GiB descriptors at `__BOOT_CS` (0x10, execute/read) and `__BOOT_DS`
//! (0x18, read/write), CS is `__BOOT_CS` and DS, ES, SS are `__BOOT_DS`,
//! interrupts are off, ESI holds the address of `boot_params` and EBP, EDI
//! and EBX are zero (boot.rst).
//!
//! Memory layout popek uses (all below the 640 KiB the e820 map reports as
//! RAM, away from the kernel and the initrd):
//!
//! ```text
//!   0x0000_1000  GDT (null, null, __BOOT_CS, __BOOT_DS)
//!   0x0001_0000  boot_params (4 KiB)
//!   0x0002_0000  command line (cmdline_size bytes at most)
//!   0x0010_0000  protected-mode kernel (code32_start)
//!   top of RAM   initrd, 4 KiB-aligned, below initrd_addr_max
//! ```

use popek_memory::GuestRam;

use crate::LoadError;

/// Where the entry GDT goes.
pub const GDT_ADDR: u32 = 0x1000;
/// Where `boot_params` goes (ESI at entry).
pub const BOOT_PARAMS_ADDR: u32 = 0x1_0000;
/// Where the command line goes.
pub const CMDLINE_ADDR: u32 = 0x2_0000;
/// Where a bzImage's protected-mode kernel is loaded.
pub const KERNEL_ADDR: u32 = 0x10_0000;
/// `__BOOT_CS`.
pub const BOOT_CS: u16 = 0x10;
/// `__BOOT_DS`.
pub const BOOT_DS: u16 = 0x18;

/// Offsets in the setup header and `boot_params` (boot.rst, "The Real-Mode
/// Kernel Header"; zero-page.rst).
mod off {
    pub const ALT_MEM_K: usize = 0x1E0;
    pub const E820_ENTRIES: usize = 0x1E8;
    pub const SETUP_SECTS: usize = 0x1F1;
    pub const BOOT_FLAG: usize = 0x1FE;
    pub const JUMP: usize = 0x200;
    pub const HEADER: usize = 0x202;
    pub const VERSION: usize = 0x206;
    pub const TYPE_OF_LOADER: usize = 0x210;
    pub const LOADFLAGS: usize = 0x211;
    pub const CODE32_START: usize = 0x214;
    pub const RAMDISK_IMAGE: usize = 0x218;
    pub const RAMDISK_SIZE: usize = 0x21C;
    pub const CMD_LINE_PTR: usize = 0x228;
    pub const INITRD_ADDR_MAX: usize = 0x22C;
    pub const CMDLINE_SIZE: usize = 0x238;
    pub const INIT_SIZE: usize = 0x260;
    pub const E820_TABLE: usize = 0x2D0;
}

/// "HdrS".
const HDRS: u32 = 0x5372_6448;
/// loadflags: the protected-mode code is loaded at 0x100000 (a bzImage).
const LOADED_HIGH: u8 = 0x01;
/// type_of_loader: "undefined" (boot.rst: a loader without an assigned ID).
const LOADER_UNDEFINED: u8 = 0xFF;
/// e820 types (ACPI "Address Range Memory" and "Reserved").
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// Where RAM below 1 MiB ends for the e820 map (the extended BIOS data
/// area above it is reserved, as on a PC with SeaBIOS).
const LOW_RAM_END: u64 = 0x9_FC00;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Is this a bzImage (boot flag, "HdrS", protocol 2.00 or later with the
/// protected-mode kernel loaded high)?
pub fn is_bzimage(file: &[u8]) -> bool {
    file.len() > off::INIT_SIZE + 4
        && u16_at(file, off::BOOT_FLAG) == 0xAA55
        && u32_at(file, off::HEADER) == HDRS
        && u16_at(file, off::VERSION) >= 0x0200
        && file[off::LOADFLAGS] & LOADED_HIGH != 0
}

/// What the loader placed where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The 32-bit entry point (code32_start).
    pub entry: u32,
    /// `boot_params` (ESI at entry).
    pub boot_params: u32,
    /// The initrd: address and length, if one was given.
    pub initrd: Option<(u32, u32)>,
}

/// Load a bzImage with its command line and initrd into RAM of `memory`
/// bytes and build `boot_params`.
pub fn load(
    ram: &mut GuestRam,
    file: &[u8],
    cmdline: &str,
    initrd: Option<&[u8]>,
) -> Result<Loaded, LoadError> {
    if !is_bzimage(file) {
        return Err(LoadError::Malformed(
            "not a bzImage (no boot flag, \"HdrS\" header or LOADED_HIGH)".into(),
        ));
    }
    let version = u16_at(file, off::VERSION);
    if version < 0x0206 {
        return Err(LoadError::Malformed(format!(
            "boot protocol {}.{:02} is too old (popek needs 2.06: the 32-bit entry with cmdline_size)",
            version >> 8,
            version & 0xFF
        )));
    }
    let memory = u64::from(ram.size());
    let setup_sects = match file[off::SETUP_SECTS] {
        0 => 4,
        n => usize::from(n),
    };
    let kernel_off = (setup_sects + 1) * 512;
    let kernel = file
        .get(kernel_off..)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| LoadError::Malformed("the bzImage has no protected-mode kernel".into()))?;
    // The kernel needs init_size bytes from its load address to decompress
    // and run (boot.rst, "init_size").
    let init_size = u64::from(u32_at(file, off::INIT_SIZE)).max(kernel.len() as u64);
    if u64::from(KERNEL_ADDR) + init_size > memory || !ram.load(KERNEL_ADDR, kernel) {
        return Err(LoadError::DoesNotFit {
            addr: KERNEL_ADDR,
            len: init_size,
        });
    }
    // boot_params: zeroed, the setup header copied from the file (from
    // 0x1F1 to 0x202 + the byte at 0x201).
    let mut bp = vec![0u8; 4096];
    let hdr_end = (0x202 + usize::from(file[off::JUMP + 1]))
        .min(file.len())
        .min(4096);
    bp[off::SETUP_SECTS..hdr_end].copy_from_slice(&file[off::SETUP_SECTS..hdr_end]);
    let put32 = |bp: &mut Vec<u8>, o: usize, v: u32| bp[o..o + 4].copy_from_slice(&v.to_le_bytes());
    bp[off::TYPE_OF_LOADER] = LOADER_UNDEFINED;
    // Command line, NUL-terminated, at most cmdline_size bytes.
    let max = u32_at(file, off::CMDLINE_SIZE) as usize;
    if cmdline.len() > max {
        return Err(LoadError::Malformed(format!(
            "kernel command line of {} bytes is longer than the kernel's cmdline_size ({max})",
            cmdline.len()
        )));
    }
    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    ram.load(CMDLINE_ADDR, &line);
    put32(&mut bp, off::CMD_LINE_PTR, CMDLINE_ADDR);
    // The initrd at the top of RAM (and below initrd_addr_max), clear of
    // the kernel's init_size.
    let loaded_initrd = match initrd {
        None => None,
        Some(rd) => {
            let addr_max = u64::from(u32_at(file, off::INITRD_ADDR_MAX));
            let top = memory.min(addr_max + 1);
            let len = rd.len() as u64;
            let at = top.checked_sub(len).map(|a| a & !0xFFF);
            let floor = u64::from(KERNEL_ADDR) + init_size;
            match at {
                Some(a) if a >= floor && ram.load(a as u32, rd) => Some((a as u32, len as u32)),
                _ => {
                    return Err(LoadError::DoesNotFit {
                        addr: top.saturating_sub(len) as u32,
                        len,
                    })
                }
            }
        }
    };
    if let Some((a, len)) = loaded_initrd {
        put32(&mut bp, off::RAMDISK_IMAGE, a);
        put32(&mut bp, off::RAMDISK_SIZE, len);
    }
    // The memory map: RAM below 640 KiB, the EBDA and BIOS reserved, RAM
    // from 1 MiB.
    let map = [
        (0, LOW_RAM_END, E820_RAM),
        (LOW_RAM_END, 0xA_0000 - LOW_RAM_END, E820_RESERVED),
        (0xF_0000, 0x1_0000, E820_RESERVED),
        (0x10_0000, memory - 0x10_0000, E820_RAM),
    ];
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        let o = off::E820_TABLE + 20 * i;
        bp[o..o + 8].copy_from_slice(&addr.to_le_bytes());
        bp[o + 8..o + 16].copy_from_slice(&size.to_le_bytes());
        put32(&mut bp, o + 16, *kind);
    }
    bp[off::E820_ENTRIES] = map.len() as u8;
    put32(&mut bp, off::ALT_MEM_K, ((memory - 0x10_0000) >> 10) as u32);
    ram.load(BOOT_PARAMS_ADDR, &bp);
    // The GDT: null, null, __BOOT_CS, __BOOT_DS (flat 4 GiB, ring 0).
    let mut gdt = [0u8; 32];
    gdt[16..24].copy_from_slice(&0x00CF_9A00_0000_FFFFu64.to_le_bytes());
    gdt[24..32].copy_from_slice(&0x00CF_9200_0000_FFFFu64.to_le_bytes());
    ram.load(GDT_ADDR, &gdt);
    Ok(Loaded {
        entry: u32_at(file, off::CODE32_START),
        boot_params: BOOT_PARAMS_ADDR,
        initrd: loaded_initrd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal bzImage: one setup sector after the boot sector, protocol
    /// 2.15, loaded high, a protected-mode kernel of `payload`.
    pub(crate) fn image(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 1024];
        f[off::SETUP_SECTS] = 1;
        f[off::BOOT_FLAG..off::BOOT_FLAG + 2].copy_from_slice(&0xAA55u16.to_le_bytes());
        f[off::JUMP] = 0xEB;
        f[off::JUMP + 1] = 0x6A; // header ends at 0x26C
        f[off::HEADER..off::HEADER + 4].copy_from_slice(&HDRS.to_le_bytes());
        f[off::VERSION..off::VERSION + 2].copy_from_slice(&0x020Fu16.to_le_bytes());
        f[off::LOADFLAGS] = LOADED_HIGH;
        f[off::CODE32_START..off::CODE32_START + 4].copy_from_slice(&KERNEL_ADDR.to_le_bytes());
        f[off::INITRD_ADDR_MAX..off::INITRD_ADDR_MAX + 4]
            .copy_from_slice(&0x37FF_FFFFu32.to_le_bytes());
        f[off::CMDLINE_SIZE..off::CMDLINE_SIZE + 4].copy_from_slice(&2047u32.to_le_bytes());
        f[off::INIT_SIZE..off::INIT_SIZE + 4].copy_from_slice(&0x20_0000u32.to_le_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// boot.rst's 32-bit protocol, field by field: the kernel at 1 MiB, the
    /// header copied into boot_params with type_of_loader set, the command
    /// line and the initrd where cmd_line_ptr and ramdisk_image say, the
    /// e820 map with RAM below 640 KiB, the GDT's flat selectors.
    #[test]
    fn a_bzimage_is_laid_out_as_the_boot_protocol_says() {
        let mut ram = GuestRam::new(16 << 20).unwrap();
        let file = image(b"\x90\x90\xF4");
        let rd = vec![0xAB; 5000];
        let l = load(&mut ram, &file, "console=ttyS0 quiet", Some(&rd)).unwrap();
        assert_eq!(l.entry, 0x10_0000);
        assert_eq!(ram.read(0x10_0000, 3), 0xF4_9090);
        let bp = BOOT_PARAMS_ADDR;
        let r32 = |a: u32| ram.read(a, 4) as u32;
        assert_eq!(r32(bp + 0x202), HDRS);
        assert_eq!(ram.read(bp + 0x210, 1), 0xFF, "type_of_loader");
        assert_eq!(ram.read(bp + 0x211, 1), 1, "loadflags kept");
        let cmd = r32(bp + 0x228);
        let text: Vec<u8> = (0..20).map(|i| ram.read(cmd + i, 1) as u8).collect();
        assert_eq!(&text, b"console=ttyS0 quiet\0");
        let (rd_at, rd_len) = (r32(bp + 0x218), r32(bp + 0x21C));
        assert_eq!(rd_len, 5000);
        assert_eq!(rd_at % 4096, 0);
        assert!(rd_at >= 0x30_0000 && rd_at + rd_len <= 16 << 20);
        assert_eq!(ram.read(rd_at + 4999, 1), 0xAB);
        assert_eq!(l.initrd, Some((rd_at, 5000)));
        // e820: 4 entries, the first RAM from 0 to 0x9FC00, the last RAM
        // from 1 MiB to the end.
        assert_eq!(ram.read(bp + 0x1E8, 1), 4);
        let e = |i: u32| {
            let o = bp + 0x2D0 + 20 * i;
            (ram.read(o, 8), ram.read(o + 8, 8), r32(o + 16))
        };
        assert_eq!(e(0), (0, 0x9_FC00, 1));
        assert_eq!(e(3), (0x10_0000, (16 << 20) - 0x10_0000, 1));
        assert_eq!(r32(bp + 0x1E0), (15 << 20) >> 10, "alt_mem_k");
        // __BOOT_CS and __BOOT_DS: flat 4 GiB code and data.
        assert_eq!(ram.read(GDT_ADDR + 0x10, 8), 0x00CF_9A00_0000_FFFF);
        assert_eq!(ram.read(GDT_ADDR + 0x18, 8), 0x00CF_9200_0000_FFFF);
    }

    #[test]
    fn what_does_not_fit_or_is_not_a_bzimage_is_refused() {
        let mut ram = GuestRam::new(16 << 20).unwrap();
        assert!(!is_bzimage(b"\x7fELF"));
        let mut old = image(b"\xF4");
        old[off::VERSION] = 0x04; // 2.04
        assert!(load(&mut ram, &old, "", None).is_err());
        let long = "x".repeat(3000);
        assert!(load(&mut ram, &image(b"\xF4"), &long, None).is_err());
        let big = vec![0u8; 15 << 20];
        assert!(matches!(
            load(&mut ram, &image(b"\xF4"), "", Some(&big)),
            Err(LoadError::DoesNotFit { .. })
        ));
    }
}
