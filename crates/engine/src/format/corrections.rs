//! The container of a correction stream (`docs/format.md`, section 4): its magic, record
//! tags and limits. The model inside (preflate's corrections) is [`crate::layer::corrected`]'s.

/// The first bytes of every decompressed correction stream.
pub const CORRECTIONS_MAGIC: &[u8; 8] = b"FDCORR\x00\x01";
/// Largest `plain_len` of a chunk: `PLAIN_TEXT_LIMIT` (in `layer::corrected`), plus one last match, plus stored
/// blocks (which preflate does not count) within a window.
pub const MAX_CHUNK_PLAIN: u64 = 8 << 20;
/// Largest `deflate_len` of a chunk.
pub const MAX_CHUNK_DEFLATE: u64 = 8 << 20;
/// Largest `corrections_len` of a chunk.
pub const MAX_CHUNK_CORRECTIONS: u64 = 8 << 20;
/// Longest engine name in a correction stream.
pub const MAX_ENGINE_LEN: u64 = 64;
/// zstd window (log2) the differ writes the correction stream with.
pub const WINDOW_LOG: u32 = 20;
/// Largest zstd window (log2) the applier accepts for the correction stream.
pub const MAX_WINDOW_LOG: u32 = 22;
/// Record tag: the end of the stream.
pub const TAG_END: u8 = 0;
/// Record tag: one chunk (its lengths, then its corrections).
pub const TAG_CHUNK: u8 = 1;
