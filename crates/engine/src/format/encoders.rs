//! The encoders a delta names (`delta.json`'s `encoding`): the wire types of `exact` and
//! `corrected` re-encodings, as `docs/format.md` specifies them. What they do lives in
//! [`crate::layer::exact`] and [`crate::layer::corrected`], which implement them.

use serde::{Deserialize, Serialize};

/// An encoder and its parameters: the deflate stream inside the gzip member.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Encoder {
    /// klauspost/pgzip 1.2.5 over klauspost/compress 1.15.12 flate, `DefaultCompression`,
    /// with `SetConcurrency(block_size, _)` (umoci 0.4.7 uses 256 KiB; pgzip's default is
    /// 1 MiB). JSON: `{"kind": "pgzip", "block_size": 262144}`.
    Pgzip {
        /// Uncompressed bytes per block.
        block_size: u32,
    },
    /// klauspost/compress 1.15.12 `gzip` (one deflate stream, no blocks),
    /// `DefaultCompression`. JSON: `{"kind": "klauspost-gzip"}`.
    KlauspostGzip,
    /// The Go standard library's `compress/gzip` at `DefaultCompression` (flate level 6),
    /// as in the named Go release; Docker/moby and BuildKit write layers with it. Go 1.19's
    /// level 6 is the classic lazy matcher (zlib-like hash chains, 16K-token blocks); Go
    /// 1.27's is klauspost/compress's level-6 encoder taken into the standard library
    /// (64 KiB windows, Huffman tables reused across blocks).
    /// JSON: `{"kind": "go-gzip", "release": "go1.19"}` or `"release": "go1.27"`.
    GoGzip {
        /// Which generation of Go's encoder.
        release: GoRelease,
    },
    /// zlib 1.2.13 deflate (window 15, memLevel 8, default strategy) at `level` 1-9:
    /// what Python's `gzip`/`zlib`, and anything else on the system zlib, write.
    /// JSON: `{"kind": "zlib", "level": 9}`.
    Zlib {
        /// Compression level, 1-9.
        level: u8,
    },
    /// GNU gzip's deflate at `level` 1-9 (`gzip -9n` is how Debian compresses changelogs
    /// and manual pages; `tar | gzip` layers too): zlib's match finder and trees with
    /// gzip's block boundaries. JSON: `{"kind": "gnu-gzip", "level": 9}`.
    GnuGzip {
        /// Compression level, 1-9.
        level: u8,
    },
}

/// Generations of Go's standard-library deflate whose output we reproduce. A release
/// that changes the bytes gets a new variant; the name is the first release verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum GoRelease {
    /// Go 1.19 (verified against Debian bookworm's golang-1.19 1.19.8).
    #[serde(rename = "go1.19")]
    Go1_19,
    /// Go 1.27, the first release verified with the rewritten `compress/flate` (Go 1.27.3,
    /// Debian sid's golang-1.27).
    #[serde(rename = "go1.27")]
    Go1_27,
}

/// Everything needed to rebuild a gzip blob from its uncompressed bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Descriptor {
    /// How the deflate stream was produced.
    pub encoder: Encoder,
    /// The member header, byte for byte.
    pub header: GzipHeader,
}

/// A gzip member header.
///
/// JSON shape (fields other than `mtime`, `xfl` and `os` are omitted when absent/false):
/// `{"mtime": 2288912640, "xfl": 0, "os": 255, "text": false, "name": "a.tar",
///   "comment": "...", "extra": "hex bytes", "header_crc": false}`.
/// `name` and `comment` are Latin-1: each byte is the `char` of the same value, so any
/// byte string round-trips.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GzipHeader {
    /// MTIME, seconds since the epoch as stored (0 = none).
    pub mtime: u32,
    /// XFL: 2 = slowest compression, 4 = fastest, 0 otherwise (as the writer chose).
    pub xfl: u8,
    /// OS: 3 = Unix, 255 = unknown.
    pub os: u8,
    /// FTEXT flag.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub text: bool,
    /// FNAME: the original file name, without its terminating NUL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// FCOMMENT, without its terminating NUL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// FEXTRA payload (without its length), hex-encoded in JSON.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "hex_opt")]
    pub extra: Option<Vec<u8>>,
    /// FHCRC: a CRC-16 of the header follows it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub header_crc: bool,
}

/// The model the corrections are written for: the exact preflate-rs release (its predictor
/// defines what a correction means).
pub const CORRECTION_ENGINE: &str = "preflate-rs 0.7.6";

mod hex_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(bytes) => s.serialize_str(&hex::encode(bytes)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?.map(|h| hex::decode(h).map_err(serde::de::Error::custom)).transpose()
    }
}
