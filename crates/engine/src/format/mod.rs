//! The delta format: its version, limits and the two encodings a delta carries — the plan
//! (`delta.json`, see [`plan`]) and the per-layer patch record streams (see [`records`]).
//! `docs/format.md` is the prose specification; the constants here are its limits.

pub mod address_map;
pub mod corrections;
pub mod encoders;
pub mod lzma;
pub mod plan;
pub mod records;
pub mod retime;

/// The format version this build writes, and the newest it reads.
///
/// Version 2 has the layout of version 1 with a smaller fixed cost: payload files may share
/// the metadata layer ([`INLINE_PAYLOAD_BYTES`]), and the manifest carries only the
/// annotations that finding a delta needs (see `docs/format.md`).
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this build reads.
pub const OLDEST_READ_VERSION: u32 = 1;

/// Whether `n` is its type's zero: serde leaves such fields out of the JSON it writes.
pub(crate) fn is_zero<T: Default + PartialEq>(n: &T) -> bool {
    *n == T::default()
}

/// Whether this build reads deltas of format `version`.
pub fn reads_version(version: u32) -> bool {
    (OLDEST_READ_VERSION..=FORMAT_VERSION).contains(&version)
}

/// Payload files up to this size go into the metadata layer (format 2), so that a small
/// delta is one layer: each further layer costs a descriptor, a diff_id and a tar.
pub const INLINE_PAYLOAD_BYTES: u64 = 64 << 10;
/// At most this many payload bytes in all go into the metadata layer (format 2): the applier
/// reads that layer whole.
pub const MAX_INLINE_PAYLOAD_BYTES: u64 = 1 << 20;

/// Largest decompressed size of one chunk of literal bytes. Bounds the applier's memory.
pub const MAX_CHUNK_BYTES: u64 = 8 << 20;
/// Largest decompressed size of one difference chunk (`DIFFERENCES`, [`lzma`]): with its
/// dictionary, what it adds to the applier's memory.
pub const MAX_DIFFERENCE_CHUNK_BYTES: u64 = 4 << 20;
/// Largest total size of the reference prefix of one chunk. Bounds the applier's memory.
pub const MAX_PREFIX_BYTES: u64 = 8 << 20;
/// Largest number of source ranges making up one chunk's prefix.
pub const MAX_PREFIX_RANGES: u64 = 1 << 16;
/// Largest compressed size of one chunk frame (zstd's bound for [`MAX_CHUNK_BYTES`]).
pub const MAX_FRAME_BYTES: u64 = MAX_CHUNK_BYTES + (MAX_CHUNK_BYTES >> 8) + (128 << 10);
/// zstd window (log2) of the outer stream that wraps a patch's records.
pub const RECORD_STREAM_WINDOW_LOG: u32 = 20;
/// Largest zstd window (log2) the applier accepts for that outer stream.
pub const MAX_RECORD_STREAM_WINDOW_LOG: u32 = 22;
/// Largest `delta.json`, and largest embedded target manifest or config.
pub const MAX_METADATA_FILE_BYTES: u64 = 8 << 20;

/// Manifest annotation carrying the format version; its presence marks an image as a delta.
pub const ANNOTATION_VERSION: &str = "io.fleetdelta.delta.version";
/// Manifest annotation: digest of the source image manifest (format 1 only).
pub const ANNOTATION_SOURCE_MANIFEST: &str = "io.fleetdelta.source.manifest";
/// Manifest annotation: digest of the source image config.
pub const ANNOTATION_SOURCE_CONFIG: &str = "io.fleetdelta.source.config";
/// Manifest annotation: digest of the target image manifest (format 1; format 2 has it only as
/// the manifest's `subject`).
pub const ANNOTATION_TARGET_MANIFEST: &str = "io.fleetdelta.target.manifest";
/// Manifest annotation: digest of the target image config (format 1 only).
pub const ANNOTATION_TARGET_CONFIG: &str = "io.fleetdelta.target.config";
/// Layer annotation (format 1 only): what the delta layer holds (`metadata`, `patch`, `blob` or
/// `corrections`).
pub const ANNOTATION_ROLE: &str = "io.fleetdelta.role";
/// Layer annotation (format 1 only): the index of the target layer a `patch`, `blob` or `corrections` layer
/// rebuilds.
pub const ANNOTATION_TARGET_LAYER: &str = "io.fleetdelta.target-layer";

/// File names inside the metadata layer.
pub const PLAN_FILE: &str = "delta.json";
/// The target manifest, byte for byte.
pub const TARGET_MANIFEST_FILE: &str = "target-manifest.json";
/// The target config, byte for byte.
pub const TARGET_CONFIG_FILE: &str = "target-config.json";

/// The name of the single file inside a patch or blob layer for target layer `index`.
pub fn payload_file_name(index: u32, method: plan::Method) -> String {
    match method {
        plan::Method::Blob => format!("layer-{index:04}.blob"),
        _ => format!("layer-{index:04}.patch"),
    }
}

/// The name of the single file inside the layer carrying the correction stream of target
/// layer `index` (see [`crate::layer::corrected`]).
pub fn corrections_file_name(index: u32) -> String {
    format!("layer-{index:04}.corrections")
}
