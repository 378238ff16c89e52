//! An initramfs for a Linux kernel: a cpio archive in the "newc" format
//! the kernel unpacks into its root file system before it runs `/init`
//! (the kernel's Documentation/driver-api/early-userspace/buffer-format.rst).
//!
//! Each entry is a 110-byte ASCII header ("070701" and thirteen 8-digit
//! hexadecimal fields: inode, mode, uid, gid, nlink, mtime, file size,
//! device major/minor, rdev major/minor, name size, checksum), the name with
//! its NUL, padded to a multiple of 4 bytes, then the data, padded likewise.
//! The archive ends with an entry named `TRAILER!!!`. The kernel accepts it
//! uncompressed, so no compressor is needed.
//!
//! [`Initramfs::busybox`] makes the usual small root: busybox-static as
//! `/bin/busybox`, the directories a shell expects, `/dev/console`, and an
//! `/init` script.

/// File type bits of a cpio mode (as in `st_mode`).
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// The `/init` that [`Initramfs::busybox`] installs when given none: an
/// interactive shell on the console (`setsid cttyhack` gives it a
/// controlling terminal, so Ctrl-C and job control work).
pub const SHELL_INIT: &str = "#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo 'popek: busybox shell on the console; reboot -f ends the machine'
exec setsid cttyhack sh
";

/// The directories of [`Initramfs::busybox`]'s root.
pub const BUSYBOX_DIRS: [&str; 11] = [
    "bin", "dev", "etc", "proc", "root", "sbin", "sys", "tmp", "usr", "usr/bin", "usr/sbin",
];

/// A cpio "newc" archive being built.
#[derive(Debug, Default, Clone)]
pub struct Initramfs {
    out: Vec<u8>,
    next_ino: u32,
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Self {
        Initramfs {
            out: Vec::new(),
            next_ino: 1,
        }
    }

    /// The usual busybox root: `/bin/busybox` (the given binary), `/init`
    /// (the given script, or [`SHELL_INIT`]), the directories /bin, /dev,
    /// /etc, /proc, /root, /sbin, /sys, /tmp, /usr/bin, /usr/sbin and the
    /// `/dev/console` node the kernel opens for init's standard streams.
    pub fn busybox(busybox: &[u8], init: Option<&str>) -> Self {
        let mut a = Initramfs::new();
        for d in BUSYBOX_DIRS {
            a.dir(d, if d == "tmp" { 0o1777 } else { 0o755 });
        }
        a.char_device("dev/console", 0o600, 5, 1);
        a.file("bin/busybox", 0o755, busybox);
        a.file("init", 0o755, init.unwrap_or(SHELL_INIT).as_bytes());
        a
    }

    /// A directory (`name` without a leading slash).
    pub fn dir(&mut self, name: &str, perm: u32) -> &mut Self {
        self.entry(name, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    /// A regular file.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> &mut Self {
        self.entry(name, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// A character device node.
    pub fn char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> &mut Self {
        self.entry(name, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> &mut Self {
        let name = name.trim_start_matches('/');
        let ino = self.next_ino;
        self.next_ino += 1;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            data.len() as u32,
            0, // device major
            0, // device minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // checksum (only for "070702")
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
        self
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    /// The archive, with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, rdev, data).
    type Entry = (String, u32, (u32, u32), Vec<u8>);

    /// Read an archive back with the layout the kernel's unpacker uses:
    /// one [`Entry`] per entry, up to the trailer.
    fn entries(a: &[u8]) -> Vec<Entry> {
        let mut v = Vec::new();
        let mut at = 0;
        loop {
            let h = &a[at..at + 110];
            assert_eq!(&h[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, namesize) = (field(1), field(6) as usize, field(11) as usize);
            let name = std::str::from_utf8(&a[at + 110..at + 110 + namesize - 1]).unwrap();
            assert_eq!(a[at + 110 + namesize - 1], 0, "name ends in NUL");
            let data_at = (at + 110 + namesize + 3) & !3;
            if name == "TRAILER!!!" {
                assert_eq!(
                    (data_at + size + 3) & !3,
                    a.len(),
                    "trailer ends the archive"
                );
                return v;
            }
            v.push((
                name.to_string(),
                mode,
                (field(9), field(10)),
                a[data_at..data_at + size].to_vec(),
            ));
            at = (data_at + size + 3) & !3;
        }
    }

    #[test]
    fn newc_entries_are_aligned_and_read_back() {
        let mut a = Initramfs::new();
        a.dir("bin", 0o755)
            .file("/bin/x", 0o644, b"hello")
            .symlink("sh", "bin/x")
            .char_device("console", 0o600, 5, 1);
        let bytes = a.finish();
        assert_eq!(bytes.len() % 4, 0);
        let e = entries(&bytes);
        assert_eq!(
            e,
            vec![
                ("bin".into(), 0o040755, (0, 0), vec![]),
                ("bin/x".into(), 0o100644, (0, 0), b"hello".to_vec()),
                ("sh".into(), 0o120777, (0, 0), b"bin/x".to_vec()),
                ("console".into(), 0o020600, (5, 1), vec![]),
            ]
        );
    }

    /// GNU cpio lists the same names.
    #[test]
    fn gnu_cpio_reads_the_archive() {
        let mut child = std::process::Command::new("cpio")
            .arg("-t")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("cpio (the README's test command installs it)");
        let bytes = Initramfs::busybox(b"\x7fELF", Some("#!/bin/sh\n")).finish();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        let names = String::from_utf8(out.stdout).unwrap();
        let names: Vec<&str> = names.lines().collect();
        assert!(names.contains(&"bin/busybox") && names.contains(&"init"));
        assert!(names.contains(&"dev/console"));
    }
}
