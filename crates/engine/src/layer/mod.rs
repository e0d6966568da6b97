//! Layers: compression and the structure of the tar archives inside them.

pub mod aarch64_code;
pub mod call_frames;
pub mod compression;
pub mod corrected;
pub mod exact;
pub mod members;
pub mod tar_index;
pub mod x86_64_code;

pub use compression::Compression;
pub use tar_index::{EntryKind, TarEntry, TarIndex};

/// The machine (`e_machine`) of a little-endian 64-bit ELF file whose first bytes are `head`
/// (at least 20); `None` for anything else.
pub fn elf64_le_machine(head: &[u8]) -> Option<u16> {
    use object::elf::{ELFCLASS64, ELFDATA2LSB, ELFMAG};
    (head.len() >= 20 && head[..4] == ELFMAG && head[4] == ELFCLASS64.0 && head[5] == ELFDATA2LSB.0).then(|| u16::from_le_bytes([head[18], head[19]]))
}
