//! Layers: compression and the structure of the tar archives inside them.

pub mod aarch64_code;
pub mod compression;
pub mod corrected;
pub mod exact;
pub mod members;
pub mod tar_index;
pub mod x86_64_code;

pub use compression::Compression;
pub use tar_index::{EntryKind, TarEntry, TarIndex};
