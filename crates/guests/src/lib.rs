//! The bundled guests, built from guests/ by build.rs with the machine's gcc
//! (`-m32 -ffreestanding -nostdlib`, `ld -m elf_i386`): Multiboot kernels
//! and static i386 Linux programs. `popek run NAME` finds them here; tests
//! run each under popek and QEMU (qemu-system-i386 for kernels, qemu-i386
//! and the host kernel itself for Linux programs).

#![forbid(unsafe_code)]

/// A bundled guest.
#[derive(Debug, Clone, Copy)]
pub struct Guest {
    /// Its name (`popek run NAME`).
    pub name: &'static str,
    /// Does the QEMU comparison test run it?
    pub qemu: bool,
    /// A static i386 Linux program (else a Multiboot kernel).
    pub linux: bool,
    /// What it shows.
    pub about: &'static str,
    /// The Multiboot ELF image.
    pub elf: &'static [u8],
    /// Where the build left the ELF file (for QEMU's -kernel).
    pub path: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/guests.rs"));

/// The bundled guest called `name`.
pub fn find(name: &str) -> Option<&'static Guest> {
    GUESTS.iter().find(|g| g.name == name)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_guest_is_an_i386_elf_of_its_kind() {
        assert!(super::GUESTS.len() >= 5);
        for g in super::GUESTS {
            assert_eq!(&g.elf[..4], b"\x7fELF", "{}", g.name);
            assert_eq!(g.elf[4], 1, "{}: ELFCLASS32", g.name);
            assert_eq!(
                u16::from_le_bytes([g.elf[18], g.elf[19]]),
                3,
                "{}: EM_386",
                g.name
            );
            // The Multiboot magic lies in the first 8 KiB of a kernel only.
            let head = &g.elf[..g.elf.len().min(8192)];
            let multiboot = head.windows(4).any(|w| w == 0x1BAD_B002u32.to_le_bytes());
            assert_eq!(multiboot, !g.linux, "{}", g.name);
        }
    }
}
