//! What several test files share: a Multiboot image around hand-assembled
//! code.

/// A Multiboot image whose header (the a.out-kludge fields: load at
/// `load`, enter at `entry`) is followed by `body`, which is loaded at
/// `load + 32`.
pub fn multiboot_image(load: u32, entry: u32, body: &[u8]) -> Vec<u8> {
    let flags = 1u32 << 16;
    let magic = 0x1BAD_B002u32;
    let mut v = Vec::new();
    for w in [
        magic,
        flags,
        0u32.wrapping_sub(magic).wrapping_sub(flags),
        load,
        load,
        0,
        0,
        entry,
    ] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v.extend_from_slice(body);
    v
}
