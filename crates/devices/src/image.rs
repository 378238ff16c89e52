//! Disk images: raw files, and popek's copy-on-write overlay ("pcow") over
//! a read-only base, so that one base image can be cloned into many
//! guests (the seeds' templating) and a guest's writes never touch the
//! base.
//!
//! The pcow format, version 1 (all integers little-endian):
//!
//! ```text
//! 0     "POPEKCOW"                      magic
//! 8     u32 version (1)
//! 12    u32 cluster size (65536)
//! 16    u64 virtual size in bytes
//! 24    u64 offset of the cluster table (4096)
//! 32    u32 length of the backing path, then the path (UTF-8; relative
//!       paths are relative to the overlay's directory; empty: no base)
//! 4096  the cluster table: one u64 per cluster of the virtual disk, the
//!       file offset of the cluster's data, or 0 while it is the base's
//! ...   cluster data, appended as clusters are first written
//! ```
//!
//! A write to a cluster not yet in the overlay copies the base's cluster
//! into a new one at the end of the file, then writes into it, then
//! records it in the table (data before the table entry, so a crash in
//! between leaves the old contents visible, never garbage). Reads of
//! clusters not in the overlay read the base (zeros past its end).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The magic number of an overlay.
pub const MAGIC: &[u8; 8] = b"POPEKCOW";
/// The overlay format's version.
pub const VERSION: u32 = 1;
/// Bytes per cluster.
pub const CLUSTER: u64 = 64 << 10;
/// Where the cluster table starts.
const TABLE: u64 = 4096;
/// How deep a chain of overlays may go.
const MAX_CHAIN: usize = 64;

/// An open disk image.
#[derive(Debug)]
pub enum Image {
    /// A raw file: the disk's bytes.
    Raw(File),
    /// An overlay over a base.
    Cow(Box<Cow>),
}

/// An open overlay.
#[derive(Debug)]
pub struct Cow {
    file: File,
    size: u64,
    base: Option<Image>,
    table: Vec<u64>,
    /// Where the next new cluster goes.
    end: u64,
    writable: bool,
}

fn io(path: &Path, e: std::io::Error) -> String {
    format!("{}: {e}", path.display())
}

impl Image {
    /// Open `path`: an overlay if it starts with the overlay's magic
    /// (`format` None or "pcow"), else a raw image (`format` None or
    /// "raw"). Bases are opened read-only.
    pub fn open(path: &Path, format: Option<&str>, writable: bool) -> Result<Image, String> {
        Image::open_depth(path, format, writable, 0)
    }

    fn open_depth(
        path: &Path,
        format: Option<&str>,
        writable: bool,
        depth: usize,
    ) -> Result<Image, String> {
        if depth > MAX_CHAIN {
            return Err(format!(
                "{}: a chain of more than {MAX_CHAIN} overlays",
                path.display()
            ));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| format!("cannot open disk image {}: {e}", path.display()))?;
        let meta = file.metadata().map_err(|e| io(path, e))?;
        if !meta.is_file() {
            return Err(format!(
                "disk image {} is not a regular file",
                path.display()
            ));
        }
        let mut magic = [0u8; 8];
        let is_cow = file.read_exact_at(&mut magic, 0).is_ok() && &magic == MAGIC;
        match (format, is_cow) {
            (None | Some("raw"), false) | (Some("raw"), true) => Ok(Image::Raw(file)),
            (None | Some("pcow"), true) => Ok(Image::Cow(Box::new(Cow::open(
                file, path, writable, depth,
            )?))),
            (Some("pcow"), false) => Err(format!("{} is not a pcow overlay", path.display())),
            (Some(f), _) => Err(format!("format {f}: popek reads raw and pcow images")),
        }
    }

    /// The virtual disk's size in bytes.
    pub fn size(&self) -> Result<u64, String> {
        match self {
            Image::Raw(f) => f.metadata().map(|m| m.len()).map_err(|e| e.to_string()),
            Image::Cow(c) => Ok(c.size),
        }
    }

    /// Read `buf.len()` bytes at `off` (zeros past the end of a base).
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        match self {
            Image::Raw(f) => {
                let len = f.metadata()?.len();
                let n = len.saturating_sub(off).min(buf.len() as u64) as usize;
                f.read_exact_at(&mut buf[..n], off)?;
                buf[n..].fill(0);
                Ok(())
            }
            Image::Cow(c) => c.read_at(buf, off),
        }
    }

    /// Write `buf` at `off`.
    pub fn write_at(&mut self, buf: &[u8], off: u64) -> std::io::Result<()> {
        match self {
            Image::Raw(f) => f.write_all_at(buf, off),
            Image::Cow(c) => c.write_at(buf, off),
        }
    }

    /// Make what was written durable.
    pub fn flush(&self) -> std::io::Result<()> {
        match self {
            Image::Raw(f) => f.sync_data(),
            Image::Cow(c) => c.file.sync_data(),
        }
    }
}

impl Cow {
    fn open(file: File, path: &Path, writable: bool, depth: usize) -> Result<Cow, String> {
        let bad = |what: &str| format!("{}: damaged overlay: {what}", path.display());
        let mut h = vec![0u8; TABLE as usize];
        file.read_exact_at(&mut h, 0)
            .map_err(|_| bad("shorter than its header"))?;
        let u32_at = |a: usize| u32::from_le_bytes(h[a..a + 4].try_into().expect("4 bytes"));
        let u64_at = |a: usize| u64::from_le_bytes(h[a..a + 8].try_into().expect("8 bytes"));
        if u32_at(8) != VERSION {
            return Err(format!(
                "{}: overlay version {}, this popek reads version {VERSION}",
                path.display(),
                u32_at(8)
            ));
        }
        if u64::from(u32_at(12)) != CLUSTER || u64_at(24) != TABLE {
            return Err(bad("an unknown cluster size or table place"));
        }
        let size = u64_at(16);
        let plen = u32_at(32) as usize;
        let Some(p) = h.get(36..36 + plen) else {
            return Err(bad("a backing path longer than the header"));
        };
        let backing = String::from_utf8(p.to_vec()).map_err(|_| bad("a backing path not UTF-8"))?;
        let clusters = size.div_ceil(CLUSTER) as usize;
        let mut t = vec![0u8; clusters * 8];
        file.read_exact_at(&mut t, TABLE)
            .map_err(|_| bad("its cluster table is cut"))?;
        let table: Vec<u64> = t
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let data_start = (TABLE + t.len() as u64).next_multiple_of(CLUSTER);
        let len = file.metadata().map_err(|e| io(path, e))?.len();
        let outside = |o: u64| o < data_start || o % CLUSTER != 0 || o + CLUSTER > len;
        if table.iter().any(|&o| o != 0 && outside(o)) {
            return Err(bad("a cluster outside the file"));
        }
        let base = if backing.is_empty() {
            None
        } else {
            let b = PathBuf::from(&backing);
            let b = if b.is_absolute() {
                b
            } else {
                path.parent().unwrap_or(Path::new(".")).join(b)
            };
            Some(
                Image::open_depth(&b, None, false, depth + 1)
                    .map_err(|e| format!("{}: its base: {e}", path.display()))?,
            )
        };
        Ok(Cow {
            file,
            size,
            base,
            table,
            end: len.max(data_start).next_multiple_of(CLUSTER),
            writable,
        })
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = off + done as u64;
            let c = at / CLUSTER;
            let within = at % CLUSTER;
            let n = ((CLUSTER - within) as usize).min(buf.len() - done);
            let part = &mut buf[done..done + n];
            match self.table.get(c as usize).copied() {
                Some(o) if o != 0 => self.file.read_exact_at(part, o + within)?,
                Some(_) => match &self.base {
                    Some(b) => b.read_at(part, at)?,
                    None => part.fill(0),
                },
                None => part.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], off: u64) -> std::io::Result<()> {
        if !self.writable {
            return Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let at = off + done as u64;
            let c = (at / CLUSTER) as usize;
            let within = at % CLUSTER;
            let n = ((CLUSTER - within) as usize).min(buf.len() - done);
            if c >= self.table.len() {
                return Err(std::io::Error::other("a write past the end of the disk"));
            }
            if self.table[c] == 0 {
                // Copy the base's cluster into a new one, then record it.
                let mut data = vec![0u8; CLUSTER as usize];
                if let Some(b) = &self.base {
                    b.read_at(&mut data, c as u64 * CLUSTER)?;
                }
                data[within as usize..within as usize + n].copy_from_slice(&buf[done..done + n]);
                let o = self.end;
                self.file.write_all_at(&data, o)?;
                self.file
                    .write_all_at(&o.to_le_bytes(), TABLE + 8 * c as u64)?;
                self.table[c] = o;
                self.end += CLUSTER;
            } else {
                self.file
                    .write_all_at(&buf[done..done + n], self.table[c] + within)?;
            }
            done += n;
        }
        Ok(())
    }
}

/// Create an overlay at `new` over `backing` (recorded as given), of the
/// base's size or `size`. Refuses to replace an existing file.
pub fn create_overlay(
    new: &Path,
    backing: Option<&Path>,
    size: Option<u64>,
) -> Result<u64, String> {
    let base_size = match backing {
        Some(b) => {
            let abs = if b.is_absolute() {
                b.to_path_buf()
            } else {
                new.parent().unwrap_or(Path::new(".")).join(b)
            };
            Some(Image::open(&abs, None, false)?.size()?)
        }
        None => None,
    };
    let size = size
        .or(base_size)
        .ok_or("an overlay without a base needs a size")?;
    let path = backing
        .map(|b| b.to_str().ok_or("the backing path is not UTF-8"))
        .transpose()?
        .unwrap_or("");
    if 36 + path.len() > TABLE as usize {
        return Err("the backing path is too long".into());
    }
    let mut h = vec![0u8; TABLE as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(CLUSTER as u32).to_le_bytes());
    h[16..24].copy_from_slice(&size.to_le_bytes());
    h[24..32].copy_from_slice(&TABLE.to_le_bytes());
    h[32..36].copy_from_slice(&(path.len() as u32).to_le_bytes());
    h[36..36 + path.len()].copy_from_slice(path.as_bytes());
    let clusters = size.div_ceil(CLUSTER);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(new)
        .map_err(|e| format!("cannot create {}: {e}", new.display()))?;
    f.write_all_at(&h, 0)
        .and_then(|()| f.set_len((TABLE + 8 * clusters).next_multiple_of(CLUSTER)))
        .and_then(|()| f.sync_all())
        .map_err(|e| io(new, e))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "popek-image-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Writes land in the overlay (clusters copied from the base), reads
    /// see base and overlay merged, the base keeps its bytes, and the
    /// overlay reopens with what was written; an overlay of an overlay
    /// reads through both.
    #[test]
    fn overlays_copy_on_write_and_leave_the_base_alone() {
        let d = dir();
        let base: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(d.join("base.img"), &base).unwrap();
        assert_eq!(
            create_overlay(&d.join("a.pcow"), Some(Path::new("base.img")), None).unwrap(),
            300_000
        );
        let mut a = Image::open(&d.join("a.pcow"), None, true).unwrap();
        a.write_at(b"hello", 70_000).unwrap();
        a.write_at(&[7u8; 100_000], 150_000).unwrap();
        let mut got = vec![0u8; 300_000];
        a.read_at(&mut got, 0).unwrap();
        let mut want = base.clone();
        want[70_000..70_005].copy_from_slice(b"hello");
        want[150_000..250_000].fill(7);
        assert!(got == want);
        assert_eq!(std::fs::read(d.join("base.img")).unwrap(), base);
        drop(a);
        let a = Image::open(&d.join("a.pcow"), Some("pcow"), false).unwrap();
        let mut again = vec![0u8; 300_000];
        a.read_at(&mut again, 0).unwrap();
        assert!(again == want, "reopened");
        create_overlay(&d.join("b.pcow"), Some(Path::new("a.pcow")), None).unwrap();
        let mut b = Image::open(&d.join("b.pcow"), None, true).unwrap();
        b.write_at(b"world", 0).unwrap();
        let mut top = vec![0u8; 300_000];
        b.read_at(&mut top, 0).unwrap();
        want[..5].copy_from_slice(b"world");
        assert!(top == want, "through two overlays");
        assert!(
            create_overlay(&d.join("b.pcow"), None, Some(1)).is_err(),
            "no overwrite"
        );
    }

    /// A read-only overlay refuses writes; a damaged header or another
    /// version is refused on open.
    #[test]
    fn damaged_and_read_only_overlays() {
        let d = dir();
        create_overlay(&d.join("e.pcow"), None, Some(1 << 20)).unwrap();
        let mut e = Image::open(&d.join("e.pcow"), None, false).unwrap();
        assert!(e.write_at(b"x", 0).is_err());
        let mut zero = [1u8; 16];
        e.read_at(&mut zero, 4096).unwrap();
        assert_eq!(zero, [0; 16], "no base: zeros");
        let mut bytes = std::fs::read(d.join("e.pcow")).unwrap();
        bytes[8] = 9;
        std::fs::write(d.join("v9.pcow"), &bytes).unwrap();
        let err = Image::open(&d.join("v9.pcow"), None, true).unwrap_err();
        assert!(err.contains("version 9"), "{err}");
        std::fs::write(d.join("cut.pcow"), &bytes[..100]).unwrap();
        assert!(Image::open(&d.join("cut.pcow"), Some("pcow"), true).is_err());
        assert!(Image::open(&d.join("e.pcow"), Some("qcow2"), true).is_err());
    }
}
