//! Guest physical RAM.
//!
//! The guest sees a flat physical address space of 4 GiB. RAM occupies
//! `[0, size)`; everything above is unassigned: reads return all ones and
//! writes are dropped, as on a PC bus with nothing decoding the address
//! (QEMU behaves the same way for unassigned memory).
//!
//! RAM is an anonymous private mapping (memmap2), so untouched pages cost no
//! host memory. The binary translator will later map the same RAM into a
//! 4 GiB guest window; the interface here (physical reads and writes plus
//! direct slices) is what both engines use.

use memmap2::{MmapMut, MmapOptions};

/// The page size of the guest (and of the host), 4 KiB.
pub const PAGE_SIZE: u32 = 4096;

/// Guest physical RAM.
pub struct GuestRam {
    map: MmapMut,
    size: u32,
}

/// Error creating guest RAM.
#[derive(Debug)]
pub struct RamError(pub String);

impl std::fmt::Display for RamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for RamError {}

impl GuestRam {
    /// Guest RAM of `size` bytes (rounded up to a page; at most 3 GiB so the
    /// top of the address space stays free for devices and guard pages).
    pub fn new(size: u64) -> Result<Self, RamError> {
        let page = u64::from(PAGE_SIZE);
        let size = size.div_ceil(page) * page;
        if size == 0 || size > 3 << 30 {
            return Err(RamError(format!(
                "guest memory size {size} bytes is out of range (1 page .. 3 GiB)"
            )));
        }
        let map = MmapOptions::new()
            .len(size as usize)
            .map_anon()
            .map_err(|e| RamError(format!("cannot allocate {size} bytes of guest RAM: {e}")))?;
        Ok(GuestRam {
            map,
            size: size as u32,
        })
    }

    /// Size of RAM in bytes.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// All of RAM as a byte slice.
    pub fn as_slice(&self) -> &[u8] {
        &self.map
    }

    /// All of RAM as a mutable byte slice.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.map
    }

    /// Is `[addr, addr+len)` entirely RAM?
    pub fn contains(&self, addr: u32, len: u32) -> bool {
        u64::from(addr) + u64::from(len) <= u64::from(self.size)
    }

    /// Read one byte of physical memory.
    #[inline]
    pub fn read_u8(&self, addr: u32) -> u8 {
        self.map.get(addr as usize).copied().unwrap_or(0xFF)
    }

    /// Write one byte of physical memory.
    #[inline]
    pub fn write_u8(&mut self, addr: u32, v: u8) {
        if let Some(b) = self.map.get_mut(addr as usize) {
            *b = v;
        }
    }

    /// Read `len` (1..=8) bytes little-endian from physical memory.
    #[inline]
    pub fn read(&self, addr: u32, len: u32) -> u64 {
        let a = addr as usize;
        let l = len as usize;
        if let Some(s) = self.map.get(a..a + l) {
            let mut buf = [0u8; 8];
            buf[..l].copy_from_slice(s);
            u64::from_le_bytes(buf)
        } else {
            let mut v = 0u64;
            for i in (0..len).rev() {
                v = (v << 8) | u64::from(self.read_u8(addr.wrapping_add(i)));
            }
            v
        }
    }

    /// Write `len` (1..=8) bytes little-endian to physical memory.
    #[inline]
    pub fn write(&mut self, addr: u32, len: u32, v: u64) {
        let a = addr as usize;
        let l = len as usize;
        let bytes = v.to_le_bytes();
        if let Some(s) = self.map.get_mut(a..a + l) {
            s.copy_from_slice(&bytes[..l]);
        } else {
            for i in 0..len {
                self.write_u8(addr.wrapping_add(i), bytes[i as usize]);
            }
        }
    }

    /// Copy `data` into RAM at `addr`; bytes beyond RAM are dropped.
    /// Returns false if any byte fell outside RAM.
    pub fn load(&mut self, addr: u32, data: &[u8]) -> bool {
        if self.contains(addr, data.len() as u32) {
            let a = addr as usize;
            self.map[a..a + data.len()].copy_from_slice(data);
            true
        } else {
            false
        }
    }

    /// Fill `[addr, addr+len)` with zeros; false if it is not all RAM.
    pub fn zero(&mut self, addr: u32, len: u32) -> bool {
        if self.contains(addr, len) {
            let a = addr as usize;
            self.map[a..a + len as usize].fill(0);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_reads_back_and_unassigned_reads_ones() {
        let mut ram = GuestRam::new(8192).unwrap();
        ram.write(0x100, 4, 0xDEADBEEF);
        assert_eq!(ram.read(0x100, 4), 0xDEADBEEF);
        assert_eq!(ram.read(0x101, 2), 0xADBE);
        // straddling the end of RAM: the part inside is RAM, the rest is ones
        ram.write(8190, 2, 0x1234);
        assert_eq!(ram.read(8190, 4), 0xFFFF_1234);
        ram.write(8191, 4, 0);
        assert_eq!(ram.read(8190, 2), 0x0034);
        assert_eq!(ram.read(0xFFFF_FFFF, 1), 0xFF);
    }

    #[test]
    fn size_is_page_rounded_and_bounded() {
        assert_eq!(GuestRam::new(1).unwrap().size(), 4096);
        assert!(GuestRam::new(0).is_err());
        assert!(GuestRam::new(4 << 30).is_err());
    }
}
