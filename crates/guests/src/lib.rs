//! The bundled guests: Multiboot kernels built from guests/ by build.rs
//! with the machine's gcc (`-m32 -ffreestanding -nostdlib`, `ld -m elf_i386`).
//! `popek run NAME` finds them here; tests run each under popek and QEMU.

/// A bundled guest.
#[derive(Debug, Clone, Copy)]
pub struct Guest {
    /// Its name (`popek run NAME`).
    pub name: &'static str,
    /// Does the QEMU comparison test run it?
    pub qemu: bool,
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
    fn every_guest_is_a_multiboot_elf() {
        assert!(super::GUESTS.len() >= 5);
        for g in super::GUESTS {
            assert_eq!(&g.elf[..4], b"\x7fELF", "{}", g.name);
            assert!(g.elf.len() > 100);
        }
    }
}
