//! `delta.json`: what the delta holds and how each target layer is rebuilt.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::format::address_map::AddressMap;
use crate::format::encoders::{Descriptor, Encoder, GzipHeader, CORRECTION_ENGINE};
use crate::format::{is_zero, reads_version, FORMAT_VERSION, OLDEST_READ_VERSION};

/// Feature: some layers are re-encoded byte for byte by a named gzip encoder
/// ([`Encoding::Exact`]). An applier without it would write other blob digests.
pub const FEATURE_EXACT_GZIP: &str = "exact-gzip";

/// Feature: some gzip files inside layers are patched uncompressed ([`Member`]): the
/// applier inflates them in the source layers it reads and compresses them again, byte for
/// byte, in the layers it rebuilds. An applier without it would misread the patches.
pub const FEATURE_GZIP_MEMBERS: &str = "gzip-members";

/// Feature: some layers are re-encoded byte for byte from their tar and a correction stream
/// carried in the delta ([`Encoding::Corrected`]). An applier without it would write other
/// blob digests.
pub const FEATURE_GZIP_CORRECTIONS: &str = "gzip-corrections";

/// Feature: some members are raw deflate streams ([`Wrapping::Deflate`]), the deflated
/// entries of zip files (jars, wheels) inside layers; requires [`FEATURE_GZIP_MEMBERS`] too.
/// An applier without it would read them as gzip files and fail.
pub const FEATURE_DEFLATE_MEMBERS: &str = "deflate-members";
/// Feature: patches may hold `RETIMED` records, source tar spans whose headers' mtimes move
/// by a constant (see [`crate::format::retime`]).
pub const FEATURE_RETIMED_HEADERS: &str = "retimed-headers";
/// Feature: patches may hold `ADD` records, source ranges to which the next chunk bytes are
/// added byte by byte (bsdiff's approximate matches: a file edited in scattered places).
pub const FEATURE_ADD_RANGES: &str = "add-ranges";
/// Feature: patches may hold difference chunks (`DIFFERENCES`, LZMA streams, see
/// [`crate::format::lzma`]) and `ADD-DIFFERENCES` records that take their differences from
/// them: bsdiff's separate difference stream, so that literals keep zstd and their prefix.
pub const FEATURE_DIFFERENCE_CHUNKS: &str = "difference-chunks";
/// Feature: some members are AArch64 code seen with absolute call targets and page
/// addresses ([`Wrapping::Aarch64Code`], see [`crate::layer::aarch64_code`]); requires
/// [`FEATURE_GZIP_MEMBERS`] too. An applier without it would misread the patches.
pub const FEATURE_AARCH64_CODE: &str = "aarch64-code";
/// Feature: some members of rebuilt layers are x86-64 code whose references are seen in the
/// old file's addresses, through an address map ([`Wrapping::X8664Code`], see
/// [`crate::layer::x86_64_code`]); requires [`FEATURE_GZIP_MEMBERS`] too. An applier without
/// it would misread the patches.
pub const FEATURE_X86_64_CODE: &str = "x86-64-code";
/// Feature: some x86-64 code spans also see their call frame information (`.eh_frame`,
/// `.eh_frame_hdr`) in the old file's addresses ([`AddressMap::eh_frame`], see
/// [`crate::layer::call_frames`]); requires [`FEATURE_X86_64_CODE`] too. An applier without it
/// would write those sections back wrong.
pub const FEATURE_X86_64_CALL_FRAMES: &str = "x86-64-call-frames";

/// Features a delta may require of the applier, beyond the base format. An applier refuses a
/// delta that requires a feature it does not know.
pub const KNOWN_FEATURES: &[&str] = &[
    FEATURE_EXACT_GZIP,
    FEATURE_GZIP_MEMBERS,
    FEATURE_GZIP_CORRECTIONS,
    FEATURE_DEFLATE_MEMBERS,
    FEATURE_RETIMED_HEADERS,
    FEATURE_ADD_RANGES,
    FEATURE_DIFFERENCE_CHUNKS,
    FEATURE_AARCH64_CODE,
    FEATURE_X86_64_CODE,
    FEATURE_X86_64_CALL_FRAMES,
];

/// Largest uncompressed size of a member the differ expands (and the applier accepts).
pub const MAX_MEMBER_RAW_BYTES: u64 = 256 << 20;

/// The contents of `delta.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeltaPlan {
    /// Always [`FORMAT_VERSION`] for deltas this build writes.
    pub format_version: u32,
    /// Features the applier must understand (see [`KNOWN_FEATURES`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
    /// The program that wrote the delta.
    pub created_by: String,
    /// The level it was computed at.
    pub level: String,
    /// The image the delta applies to.
    pub source: SourceIdentity,
    /// The image the delta rebuilds.
    pub target: TargetIdentity,
    /// One entry per target layer, in target order.
    pub layers: Vec<LayerPlan>,
    /// Source layers whose gzip members the patches read uncompressed (feature
    /// [`FEATURE_GZIP_MEMBERS`]): patch source ranges in these layers are offsets in the
    /// layer tar with every listed member replaced by its contents.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_members: Vec<SourceMembers>,
}

/// A compressed stream inside a layer tar: a gzip file (a single gzip member filling a tar
/// entry's data) or one deflated entry of a zip file (a raw deflate stream somewhere in a tar
/// entry's data). Ordered by offset first, which is tar order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    /// Where the compressed bytes start in the layer tar.
    pub offset: u64,
    /// How many there are (for a gzip file, the tar entry's size).
    pub compressed_len: u64,
    /// The length of the contents.
    pub raw_len: u64,
    /// What frames the deflate stream; absent in JSON for gzip.
    #[serde(default, skip_serializing_if = "Wrapping::is_gzip")]
    pub wrapping: Wrapping,
}

/// What frames a member's deflate stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Wrapping {
    /// A whole gzip member: header, deflate stream, CRC-32 and length trailer.
    #[default]
    Gzip,
    /// A bare deflate stream (a zip entry's data: its headers stay in the tar as they are).
    Deflate,
    /// AArch64 code of an executable, seen with absolute call targets and page addresses
    /// ([`crate::layer::aarch64_code`]): as many bytes seen as stored.
    Aarch64Code,
    /// x86-64 code of an executable, its references seen in the old file's addresses
    /// ([`crate::layer::x86_64_code`]): as many bytes seen as stored. Only in rebuilt layers,
    /// with an [`AddressMap`]; the source file is read as it is.
    #[serde(rename = "x86-64-code")]
    X8664Code,
}

impl Wrapping {
    /// Whether this is [`Wrapping::Gzip`] (the default, left out of JSON).
    pub fn is_gzip(&self) -> bool {
        *self == Wrapping::Gzip
    }

    /// The fewest compressed bytes a member can have: an empty deflate stream is 2 bytes,
    /// gzip adds a 10-byte header and an 8-byte trailer.
    pub fn min_compressed_len(self) -> u64 {
        match self {
            Wrapping::Gzip => 20,
            Wrapping::Deflate => 2,
            Wrapping::Aarch64Code => 4,
            Wrapping::X8664Code => 1,
        }
    }

    /// How to name a member of this kind in messages.
    pub fn noun(self) -> &'static str {
        match self {
            Wrapping::Gzip => "gzip member",
            Wrapping::Deflate => "deflate stream",
            Wrapping::Aarch64Code => "span of AArch64 code",
            Wrapping::X8664Code => "span of x86-64 code",
        }
    }
}

impl Member {
    /// A gzip file of `compressed_len` bytes at `offset`, holding `raw_len` bytes.
    pub fn gzip(offset: u64, compressed_len: u64, raw_len: u64) -> Self {
        Member { offset, compressed_len, raw_len, wrapping: Wrapping::Gzip }
    }

    /// A raw deflate stream of `compressed_len` bytes at `offset`, holding `raw_len` bytes.
    pub fn deflate(offset: u64, compressed_len: u64, raw_len: u64) -> Self {
        Member { offset, compressed_len, raw_len, wrapping: Wrapping::Deflate }
    }

    /// A span of AArch64 code of `len` bytes at `offset`.
    pub fn aarch64_code(offset: u64, len: u64) -> Self {
        Member { offset, compressed_len: len, raw_len: len, wrapping: Wrapping::Aarch64Code }
    }

    /// A span of x86-64 code of `len` bytes at `offset`.
    pub fn x86_64_code(offset: u64, len: u64) -> Self {
        Member { offset, compressed_len: len, raw_len: len, wrapping: Wrapping::X8664Code }
    }

    /// Whether the member is seen as long as it is stored (a span of code).
    pub fn is_code(&self) -> bool {
        matches!(self.wrapping, Wrapping::Aarch64Code | Wrapping::X8664Code)
    }

    /// The byte range of the compressed bytes in the layer tar.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + self.compressed_len
    }
}

/// The members of one source layer that are read uncompressed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceMembers {
    /// Source layer index.
    pub layer: u32,
    /// Its expanded members, in tar order.
    pub members: Vec<Member>,
}

/// A member of a rebuilt layer: its patch writes the contents, which the applier
/// compresses to the original bytes, with `descriptor` (a gzip member) or `encoder` (a raw
/// deflate stream): exactly one of them, as the wrapping says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RepackedMember {
    /// Where it lies in the target layer tar.
    #[serde(flatten)]
    pub member: Member,
    /// For a gzip member: the encoder and header that reproduce its bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub descriptor: Option<Descriptor>,
    /// For a raw deflate stream: the encoder that reproduces its bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder: Option<Encoder>,
    /// For x86-64 code: where its addresses were in the source file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_map: Option<AddressMap>,
}

impl RepackedMember {
    /// A gzip member rebuilt by `descriptor`.
    pub fn gzip(member: Member, descriptor: Descriptor) -> Self {
        RepackedMember { member: Member { wrapping: Wrapping::Gzip, ..member }, descriptor: Some(descriptor), encoder: None, address_map: None }
    }

    /// A raw deflate stream rebuilt by `encoder`.
    pub fn deflate(member: Member, encoder: Encoder) -> Self {
        RepackedMember { member: Member { wrapping: Wrapping::Deflate, ..member }, descriptor: None, encoder: Some(encoder), address_map: None }
    }

    /// A span of AArch64 code, which needs no encoder.
    pub fn aarch64_code(member: Member) -> Self {
        RepackedMember { member: Member { wrapping: Wrapping::Aarch64Code, ..member }, descriptor: None, encoder: None, address_map: None }
    }

    /// A span of x86-64 code seen through `map`.
    pub fn x86_64_code(member: Member, map: AddressMap) -> Self {
        RepackedMember { member: Member { wrapping: Wrapping::X8664Code, ..member }, descriptor: None, encoder: None, address_map: Some(map) }
    }

    /// The encoder, whichever the wrapping.
    pub fn encoder(&self) -> Option<&Encoder> {
        self.descriptor.as_ref().map(|d| &d.encoder).or(self.encoder.as_ref())
    }

    /// Checks that the member names what its wrapping needs, and only that.
    pub fn validate(&self, what: &str) -> Result<()> {
        let mapped = self.address_map.is_some();
        let ok = match self.member.wrapping {
            Wrapping::Gzip => self.descriptor.is_some() && self.encoder.is_none() && !mapped,
            Wrapping::Deflate => self.descriptor.is_none() && self.encoder.as_ref().is_some_and(|e| !matches!(e, Encoder::Pgzip { .. })) && !mapped,
            Wrapping::Aarch64Code => self.descriptor.is_none() && self.encoder.is_none() && !mapped,
            Wrapping::X8664Code => self.descriptor.is_none() && self.encoder.is_none() && mapped,
        };
        if ok {
            if let Some(map) = &self.address_map {
                let at =
                    |e: Error| Error::malformed("delta.json", format!("{what}: the {} at offset {}: {e}", self.member.wrapping.noun(), self.member.offset));
                map.segments().map_err(at)?;
                map.regions(self.member.raw_len).map_err(at)?;
            }
            return Ok(());
        }
        let needs = match self.member.wrapping {
            Wrapping::Gzip => "a descriptor, and no bare encoder or address map",
            Wrapping::Deflate => "an encoder (not pgzip), and no gzip descriptor or address map",
            Wrapping::Aarch64Code => "neither an encoder, a descriptor nor an address map",
            Wrapping::X8664Code => "an address map, and neither an encoder nor a descriptor",
        };
        Err(Error::malformed("delta.json", format!("{what}: the {} at offset {} needs {needs}", self.member.wrapping.noun(), self.member.offset)))
    }
}

/// Refuses `features` that this build does not know, naming the first. Readers call it on the
/// raw plan before parsing it whole: a feature's new fields would otherwise fail the parse
/// with a message about a field rather than the feature.
pub fn check_features_known<'a>(features: impl IntoIterator<Item = &'a str>) -> Result<()> {
    match features.into_iter().find(|f| !KNOWN_FEATURES.contains(f)) {
        Some(f) => Err(Error::unsupported("delta", format!("it requires feature {f:?}, unknown to this build"))),
        None => Ok(()),
    }
}

/// Checks that members are in order, do not overlap and are within the size limits.
pub fn validate_members<'a>(members: impl IntoIterator<Item = &'a Member>, what: &str) -> Result<()> {
    let mut end = 0u64;
    for m in members {
        let bad = |reason: String| Err(Error::malformed("delta.json", format!("{what}: member at offset {}: {reason}", m.offset)));
        if m.offset < end {
            return bad("overlaps the previous one or is out of order".into());
        }
        if m.compressed_len < m.wrapping.min_compressed_len() {
            return bad(format!("{} compressed bytes cannot hold a {}", m.compressed_len, m.wrapping.noun()));
        }
        if m.is_code() && m.raw_len != m.compressed_len {
            return bad(format!("a {} of {} bytes cannot be seen as {}", m.wrapping.noun(), m.compressed_len, m.raw_len));
        }
        if m.raw_len > MAX_MEMBER_RAW_BYTES {
            return bad(format!("{} uncompressed bytes exceed the limit of {MAX_MEMBER_RAW_BYTES}", m.raw_len));
        }
        end = match m.offset.checked_add(m.compressed_len) {
            Some(e) => e,
            None => return bad("ends beyond 2^64".into()),
        };
    }
    Ok(())
}

/// Identity of the source image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceIdentity {
    /// Manifest digest (informative: the applier accepts any manifest of the same config).
    pub manifest: Digest,
    /// Config digest: fixes the diff_ids of every source layer, so the applier requires it.
    pub config: Digest,
}

/// Identity of the target image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetIdentity {
    /// Manifest digest.
    pub manifest: Digest,
    /// Config digest.
    pub config: Digest,
}

/// How one target layer is rebuilt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// The same uncompressed layer exists in the source image: no payload.
    Source,
    /// Rebuilt from source material by a patch record stream.
    Patch,
    /// The original compressed blob is carried whole.
    Blob,
}

/// The plan for one target layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerPlan {
    /// Index of the target layer.
    pub index: u32,
    /// How it is rebuilt.
    pub method: Method,
    /// For [`Method::Source`]: the index of the source layer with the same diff_id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_layer: Option<u32>,
    /// For [`Method::Patch`] and [`Method::Blob`]: the index, among the delta image's layers,
    /// of the layer carrying the payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_layer: Option<u32>,
    /// For [`Method::Patch`]: the source layers whose contents the patch reads.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_layers_used: Vec<u32>,
    /// For [`Method::Patch`]: what the patch is made of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<PatchStats>,
    /// How the compressed blob is obtained from the rebuilt tar. Absent in deltas that predate
    /// it: the blob is then the source's when identical, else recompressed by the applier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<Encoding>,
    /// For [`Method::Patch`]: gzip members the patch writes uncompressed, which the applier
    /// compresses again (feature [`FEATURE_GZIP_MEMBERS`]), in tar order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<RepackedMember>,
}

impl LayerPlan {
    /// Target layer `index` taken from source layer `source_layer`, encoded by `encoding`.
    pub fn source(index: u32, source_layer: u32, encoding: Encoding) -> Self {
        LayerPlan {
            index,
            method: Method::Source,
            source_layer: Some(source_layer),
            delta_layer: None,
            source_layers_used: Vec::new(),
            stats: None,
            encoding: Some(encoding),
            members: Vec::new(),
        }
    }

    /// Target layer `index` carried whole in the delta.
    pub fn blob(index: u32) -> Self {
        LayerPlan { method: Method::Blob, source_layer: None, ..LayerPlan::source(index, 0, Encoding::Verbatim) }
    }

    /// Target layer `index` rebuilt by a patch reading `source_layers_used`, with its
    /// statistics, encoding and repacked members.
    pub fn patch(index: u32, source_layers_used: Vec<u32>, stats: PatchStats, encoding: Encoding, members: Vec<RepackedMember>) -> Self {
        LayerPlan { method: Method::Patch, source_layer: None, source_layers_used, stats: Some(stats), members, ..LayerPlan::source(index, 0, encoding) }
    }
}

/// How the applier turns a rebuilt layer tar into the target's compressed blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Encoding {
    /// Nothing to encode: the blob is carried or linked as is, or the layer is a plain tar.
    /// The blob digest is the target's.
    Verbatim,
    /// Re-encoded by the named encoder, byte for byte: the blob digest is the target's (the
    /// applier checks it).
    Exact {
        /// The encoder, its parameters and the gzip header.
        descriptor: Descriptor,
    },
    /// Re-encoded byte for byte from the tar and a correction stream (feature
    /// [`FEATURE_GZIP_CORRECTIONS`], see [`crate::layer::corrected`]): for gzip blobs that no
    /// known encoder reproduces. The blob digest is the target's (the applier checks it).
    Corrected {
        /// The model the corrections are written for: [`CORRECTION_ENGINE`].
        engine: String,
        /// The gzip member header, byte for byte.
        header: GzipHeader,
        /// The index, among the delta image's layers, of the layer carrying the correction
        /// stream.
        #[serde(rename = "correctionsLayer")]
        corrections_layer: u32,
        /// The size of the correction stream (informative).
        #[serde(rename = "correctionsBytes")]
        corrections_bytes: u64,
    },
    /// Compressed by the applier's own encoder: the same tar (diff_id checked) in a blob with
    /// another digest, so the written manifest differs from the target's.
    Recompressed {
        /// Why no exact encoding was used.
        reason: String,
    },
}

impl Encoding {
    /// Whether the rebuilt blob has the target's digest.
    pub fn keeps_digest(&self) -> bool {
        !matches!(self, Encoding::Recompressed { .. })
    }
}

/// Informative figures about a patch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PatchStats {
    /// Length of the rebuilt tar.
    pub tar_bytes: u64,
    /// Bytes copied verbatim from source layers.
    pub copied_bytes: u64,
    /// Bytes coded as compressed literals.
    pub literal_bytes: u64,
    /// Number of literal chunks.
    pub chunks: u64,
    /// Regular files with contents in the target layer.
    pub files: u64,
    /// ... of which found unchanged somewhere in the source.
    pub files_unchanged: u64,
    /// ... of which coded against a similar source file.
    pub files_similar: u64,
    /// ... of which coded with no source partner.
    pub files_new: u64,
    /// Size of the payload file (the compressed record stream).
    pub payload_bytes: u64,
    /// gzip members patched uncompressed and compressed again by the applier.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub members: u64,
    /// ... their compressed size in the target.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub member_bytes: u64,
    /// Tar headers rebuilt from their source partner with the mtime moved (`RETIMED`
    /// records, feature [`FEATURE_RETIMED_HEADERS`]); their bytes count as copied.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retimed_headers: u64,
    /// Bytes rebuilt by `ADD` records (source bytes plus differences; feature
    /// [`FEATURE_ADD_RANGES`]), out of the similar files' literals; they count as literal.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub added_bytes: u64,
    /// Similar files coded by approximate matches (`ADD` records) rather than literals.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub files_approximated: u64,
    /// Difference chunks (LZMA streams, feature [`FEATURE_DIFFERENCE_CHUNKS`]) that the
    /// `added_bytes` take their differences from; none when they come from the chunks.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub difference_chunks: u64,
}

impl DeltaPlan {
    /// Every member the plan lists: the source layers' and the rebuilt layers'.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.source_members.iter().flat_map(|s| &s.members).chain(self.layers.iter().flat_map(|l| l.members.iter().map(|m| &m.member)))
    }

    /// Whether some member is a bare deflate stream (feature [`FEATURE_DEFLATE_MEMBERS`]).
    pub fn lists_deflate_members(&self) -> bool {
        self.members().any(|m| m.wrapping == Wrapping::Deflate)
    }

    /// Whether some member is AArch64 code (feature [`FEATURE_AARCH64_CODE`]).
    pub fn lists_aarch64_code(&self) -> bool {
        self.members().any(|m| m.wrapping == Wrapping::Aarch64Code)
    }

    /// Whether some member is x86-64 code (feature [`FEATURE_X86_64_CODE`]).
    pub fn lists_x86_64_code(&self) -> bool {
        self.members().any(|m| m.wrapping == Wrapping::X8664Code)
    }

    /// Whether some x86-64 code span converts call frame information (feature
    /// [`FEATURE_X86_64_CALL_FRAMES`]).
    pub fn lists_call_frames(&self) -> bool {
        self.layers.iter().flat_map(|l| &l.members).any(|m| m.address_map.as_ref().is_some_and(AddressMap::has_call_frames))
    }

    /// Whether the delta declares `feature`.
    pub fn declares(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }

    /// Checks the version, required features and internal consistency; `target_layers` and
    /// `source_layers` are the layer counts of the images.
    pub fn validate(&self, target_layers: usize, delta_layers: usize) -> Result<()> {
        if !reads_version(self.format_version) {
            return Err(Error::UnsupportedFormatVersion { found: self.format_version.to_string(), oldest: OLDEST_READ_VERSION, supported: FORMAT_VERSION });
        }
        check_features_known(self.features.iter().map(String::as_str))?;
        let bad = |reason: String| Error::malformed("delta.json", reason);
        // Format 1 keeps layer 0 for the metadata and one file per payload layer; format 2
        // lets payload files share a layer (the metadata layer included), told apart by name.
        let shared = self.format_version >= 2;
        let payload_layer = |d: u32| (shared || d != 0) && (d as usize) < delta_layers;
        if self.layers.len() != target_layers {
            return Err(bad(format!("{} layer plans for a target of {target_layers} layers", self.layers.len())));
        }
        for (i, l) in self.layers.iter().enumerate() {
            if l.index as usize != i {
                return Err(bad(format!("layer plan {i} has index {}", l.index)));
            }
            let ok = match l.method {
                Method::Source => l.source_layer.is_some() && l.delta_layer.is_none(),
                Method::Patch | Method::Blob => l.source_layer.is_none() && l.delta_layer.is_some_and(payload_layer),
            };
            if !ok {
                return Err(bad(format!("layer plan {i} ({:?}) names no valid payload or source layer", l.method)));
            }
            if let Some(Encoding::Exact { .. }) = &l.encoding {
                if l.method == Method::Blob {
                    return Err(bad(format!("layer plan {i} re-encodes a blob that is carried whole")));
                }
                if !self.declares(FEATURE_EXACT_GZIP) {
                    return Err(bad(format!("layer plan {i} re-encodes exactly but the delta does not declare {FEATURE_EXACT_GZIP:?}")));
                }
            }
            if let Some(Encoding::Corrected { engine, corrections_layer, .. }) = &l.encoding {
                if l.method == Method::Blob {
                    return Err(bad(format!("layer plan {i} re-encodes a blob that is carried whole")));
                }
                if !self.declares(FEATURE_GZIP_CORRECTIONS) {
                    return Err(bad(format!("layer plan {i} re-encodes with corrections but the delta does not declare {FEATURE_GZIP_CORRECTIONS:?}")));
                }
                if engine != CORRECTION_ENGINE {
                    return Err(Error::unsupported("delta", format!("layer plan {i} has corrections for {engine:?}; this build has {CORRECTION_ENGINE:?}")));
                }
                let c = *corrections_layer;
                if !payload_layer(c) || (!shared && l.delta_layer == Some(c)) {
                    return Err(bad(format!("layer plan {i} names delta layer {c} for its corrections")));
                }
            }
            if !l.members.is_empty() {
                if l.method != Method::Patch {
                    return Err(bad(format!("layer plan {i} lists gzip members but is not a patch")));
                }
                validate_members(l.members.iter().map(|m| &m.member), &format!("layer plan {i}"))?;
                for m in &l.members {
                    m.validate(&format!("layer plan {i}"))?;
                }
            }
        }
        let members_used = !self.source_members.is_empty() || self.layers.iter().any(|l| !l.members.is_empty());
        if members_used && !self.declares(FEATURE_GZIP_MEMBERS) {
            return Err(bad(format!("gzip members are listed but the delta does not declare {FEATURE_GZIP_MEMBERS:?}")));
        }
        if self.lists_deflate_members() && !self.declares(FEATURE_DEFLATE_MEMBERS) {
            return Err(bad(format!("deflate streams are listed as members but the delta does not declare {FEATURE_DEFLATE_MEMBERS:?}")));
        }
        if self.lists_aarch64_code() && !self.declares(FEATURE_AARCH64_CODE) {
            return Err(bad(format!("AArch64 code is listed as members but the delta does not declare {FEATURE_AARCH64_CODE:?}")));
        }
        if self.lists_x86_64_code() && !self.declares(FEATURE_X86_64_CODE) {
            return Err(bad(format!("x86-64 code is listed as members but the delta does not declare {FEATURE_X86_64_CODE:?}")));
        }
        if self.lists_call_frames() && !self.declares(FEATURE_X86_64_CALL_FRAMES) {
            return Err(bad(format!("x86-64 call frames are listed in an address map but the delta does not declare {FEATURE_X86_64_CALL_FRAMES:?}")));
        }
        let mut last = None;
        for s in &self.source_members {
            if last.is_some_and(|l| l >= s.layer) {
                return Err(bad(format!("source members of layer {} are out of order or repeated", s.layer)));
            }
            last = Some(s.layer);
            validate_members(&s.members, &format!("source layer {}", s.layer))?;
            // A source file is read as it is: the map of x86-64 code is the target's.
            if let Some(m) = s.members.iter().find(|m| m.wrapping == Wrapping::X8664Code) {
                return Err(bad(format!("source layer {}: the member at offset {} is x86-64 code, which only rebuilt layers list", s.layer, m.offset)));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// A valid plan for a target of 3 layers and a delta of 4 (metadata, patch, blob, corrections):
    /// the example of `docs/format.md`, with a corrected layer.
    fn valid() -> Value {
        let d = Digest::of(b"x").to_string();
        json!({
            "formatVersion": 1,
            "features": ["exact-gzip", "gzip-corrections"],
            "createdBy": "fleetdelta test",
            "level": "default",
            "source": { "manifest": d, "config": d },
            "target": { "manifest": d, "config": d },
            "layers": [
                { "index": 0, "method": "source", "sourceLayer": 0, "encoding": { "kind": "verbatim" } },
                { "index": 1, "method": "patch", "deltaLayer": 1, "sourceLayersUsed": [0],
                  "encoding": { "kind": "corrected", "engine": CORRECTION_ENGINE, "header": { "mtime": 0, "xfl": 0, "os": 255 },
                                "correctionsLayer": 3, "correctionsBytes": 10 } },
                { "index": 2, "method": "blob", "deltaLayer": 2, "encoding": { "kind": "verbatim" } }
            ]
        })
    }

    fn validate(plan: &Value, target_layers: usize) -> Result<()> {
        let plan: DeltaPlan = serde_json::from_value(plan.clone()).expect("the cases are well-formed JSON plans");
        plan.validate(target_layers, 4)
    }

    #[test]
    fn aarch64_code_spans_are_declared_as_long_seen_as_stored_and_need_no_encoder() {
        let span = json!({ "offset": 1024, "compressedLen": 4096, "rawLen": 4096, "wrapping": "aarch64-code" });
        let with = |edit: &dyn Fn(&mut Value)| {
            let mut p = valid();
            p["features"] = json!(["exact-gzip", "gzip-corrections", "gzip-members", "aarch64-code"]);
            p["layers"][1]["members"] = json!([span.clone()]);
            p["sourceMembers"] = json!([{ "layer": 0, "members": [span.clone()] }]);
            edit(&mut p);
            validate(&p, 3)
        };
        with(&|_| {}).unwrap();
        type Edit = fn(&mut Value);
        let cases: [(Edit, &str); 5] = [
            (|p| p["features"] = json!(["exact-gzip", "gzip-corrections", "gzip-members"]), "does not declare \"aarch64-code\""),
            (|p| p["layers"][1]["members"][0]["rawLen"] = json!(4100), "cannot be seen as 4100"),
            (|p| p["sourceMembers"][0]["members"][0]["compressedLen"] = json!(4000), "cannot be seen as 4096"),
            (|p| p["layers"][1]["members"][0]["encoder"] = json!({ "kind": "zlib", "level": 6 }), "needs neither an encoder, a descriptor nor an address map"),
            (
                |p| {
                    p["layers"][1]["members"][0]["compressedLen"] = json!(3);
                    p["layers"][1]["members"][0]["rawLen"] = json!(3);
                },
                "3 compressed bytes cannot hold a span of AArch64 code",
            ),
        ];
        for (edit, message) in cases {
            let e = with(&edit).unwrap_err().to_string();
            assert!(e.contains(message), "{message}: {e}");
        }
    }

    #[test]
    fn x86_64_code_spans_are_declared_and_carry_a_map_in_rebuilt_layers_only() {
        let map = json!({ "code": 0x401000, "segments": [0x401000, 0x800, -0x40, 0x100, 0x200, 0x30] });
        let span = json!({ "offset": 1024, "compressedLen": 4096, "rawLen": 4096, "wrapping": "x86-64-code", "addressMap": map });
        let with = |edit: &dyn Fn(&mut Value)| {
            let mut p = valid();
            p["features"] = json!(["exact-gzip", "gzip-corrections", "gzip-members", "x86-64-code"]);
            p["layers"][1]["members"] = json!([span.clone()]);
            edit(&mut p);
            validate(&p, 3)
        };
        with(&|_| {}).unwrap();
        type Edit = fn(&mut Value);
        // Call frames need their own feature, and a place inside the span.
        let frames = |p: &mut Value| {
            p["layers"][1]["members"][0]["addressMap"]["codeAt"] = json!(1024);
            p["layers"][1]["members"][0]["addressMap"]["ehFrame"] = json!([0, 64, 0x400000]);
        };
        with(&|p| {
            frames(p);
            p["features"].as_array_mut().unwrap().push(json!("x86-64-call-frames"));
        })
        .unwrap();
        let cases: [(Edit, &str); 9] = [
            (|p| p["features"] = json!(["exact-gzip", "gzip-corrections", "gzip-members"]), "does not declare \"x86-64-code\""),
            (
                |p| {
                    p["layers"][1]["members"][0]["addressMap"]["codeAt"] = json!(1024);
                    p["layers"][1]["members"][0]["addressMap"]["ehFrame"] = json!([0, 64, 0x400000]);
                },
                "does not declare \"x86-64-call-frames\"",
            ),
            (|p| p["layers"][1]["members"][0]["addressMap"]["ehFrameHdr"] = json!([4090, 12, 0x400000]), "outside the span of 4096 bytes"),
            (
                |p| {
                    p["layers"][1]["members"][0]["addressMap"]["codeLen"] = json!(1024);
                    p["layers"][1]["members"][0]["addressMap"]["ehFrame"] = json!([1000, 64, 0x400000]);
                },
                "the code at 0..1024 overlaps the .eh_frame at 1000..1064",
            ),
            (|p| p["layers"][1]["members"][0]["rawLen"] = json!(4100), "cannot be seen as 4100"),
            (|p| drop(p["layers"][1]["members"][0].as_object_mut().unwrap().remove("addressMap")), "needs an address map"),
            (|p| p["layers"][1]["members"][0]["addressMap"]["segments"] = json!([0x401000, 0x800]), "not whole segments of three"),
            (|p| p["layers"][1]["members"][0]["addressMap"]["segments"] = json!([0x401000, 0x800, 0, 0, 0x100, -0x400]), "overlap in old addresses"),
            (
                |p| {
                    let mut source = p["layers"][1]["members"][0].clone();
                    source.as_object_mut().unwrap().remove("addressMap");
                    p["sourceMembers"] = json!([{ "layer": 0, "members": [source] }]);
                },
                "x86-64 code, which only rebuilt layers list",
            ),
        ];
        for (edit, message) in cases {
            let e = with(&edit).unwrap_err().to_string();
            assert!(e.contains(message), "{message}: {e}");
        }
    }

    #[test]
    fn validate_refuses_each_inconsistency_by_name() {
        validate(&valid(), 3).expect("the base plan is valid");
        let exact = json!({ "kind": "exact", "descriptor": { "encoder": { "kind": "zlib", "level": 6 }, "header": { "mtime": 0, "xfl": 0, "os": 255 } } });
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(&str, usize, Edit, &str)> = vec![
            ("format version", 3, Box::new(|p| p["formatVersion"] = json!(3)), "format version 3 is not supported (this build reads versions 1 to 2)"),
            ("unknown feature", 3, Box::new(|p| p["features"] = json!(["exact-gzip", "gzip-corrections", "time-travel"])), "\"time-travel\""),
            ("layer count", 4, Box::new(|_| {}), "3 layer plans for a target of 4 layers"),
            ("index", 3, Box::new(|p| p["layers"][1]["index"] = json!(5)), "layer plan 1 has index 5"),
            ("source with a payload", 3, Box::new(|p| p["layers"][0]["deltaLayer"] = json!(1)), "layer plan 0 (Source) names no valid"),
            ("patch from the metadata layer", 3, Box::new(|p| p["layers"][1]["deltaLayer"] = json!(0)), "layer plan 1 (Patch) names no valid"),
            ("patch past the delta", 3, Box::new(|p| p["layers"][1]["deltaLayer"] = json!(4)), "layer plan 1 (Patch) names no valid"),
            ("blob with a source", 3, Box::new(|p| p["layers"][2]["sourceLayer"] = json!(0)), "layer plan 2 (Blob) names no valid"),
            (
                "exact blob",
                3,
                Box::new({
                    let exact = exact.clone();
                    move |p| p["layers"][2]["encoding"] = exact.clone()
                }),
                "layer plan 2 re-encodes a blob that is carried whole",
            ),
            (
                "exact undeclared",
                3,
                Box::new(move |p| {
                    p["layers"][1]["encoding"] = exact.clone();
                    p["features"] = json!(["gzip-corrections"]);
                }),
                "layer plan 1 re-encodes exactly but the delta does not declare \"exact-gzip\"",
            ),
            ("corrections undeclared", 3, Box::new(|p| p["features"] = json!(["exact-gzip"])), "does not declare \"gzip-corrections\""),
            ("corrections engine", 3, Box::new(|p| p["layers"][1]["encoding"]["engine"] = json!("preflate-rs 0.1")), "has corrections for \"preflate-rs 0.1\""),
            (
                "corrections in the metadata layer",
                3,
                Box::new(|p| p["layers"][1]["encoding"]["correctionsLayer"] = json!(0)),
                "names delta layer 0 for its corrections",
            ),
            (
                "corrections in the patch's layer",
                3,
                Box::new(|p| p["layers"][1]["encoding"]["correctionsLayer"] = json!(1)),
                "names delta layer 1 for its corrections",
            ),
            (
                "corrections past the delta",
                3,
                Box::new(|p| p["layers"][1]["encoding"]["correctionsLayer"] = json!(4)),
                "names delta layer 4 for its corrections",
            ),
        ];
        for (name, target_layers, edit, message) in cases {
            let mut plan = valid();
            edit(&mut plan);
            match validate(&plan, target_layers) {
                Ok(()) => panic!("{name}: accepted"),
                Err(e) => assert!(e.to_string().contains(message), "{name}: {e}"),
            }
        }
    }

    #[test]
    fn format_2_lets_payloads_share_the_metadata_layer_and_each_other() {
        let mut plan = valid();
        plan["formatVersion"] = json!(2);
        plan["layers"][1]["deltaLayer"] = json!(0);
        plan["layers"][1]["encoding"]["correctionsLayer"] = json!(0);
        plan["layers"][2]["deltaLayer"] = json!(0);
        validate(&plan, 3).expect("format 2: every payload in the metadata layer");
        plan["formatVersion"] = json!(1);
        assert!(validate(&plan, 3).unwrap_err().to_string().contains("names no valid payload"), "format 1 keeps layer 0 for the metadata");
    }
}
