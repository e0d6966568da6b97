//! Bit-exact re-encoding of gzip layers.
//!
//! A registry blob is "encoder E, with parameters P, behind header H" applied to the
//! layer's tar. This module holds faithful ports of the encoders that wrote the layers
//! found in real registries, a serializable [`Descriptor`] naming one, and a
//! [`fingerprint()`] that finds the descriptor which reproduces a given blob.
//!
//! The descriptor's JSON shape is stable (new encoders add new `kind`s):
//!
//! ```json
//! {"encoder": {"kind": "pgzip", "block_size": 262144},
//!  "header": {"mtime": 2288912640, "xfl": 0, "os": 255}}
//! ```

mod bits;
pub mod fingerprint;
mod go_flate;
pub mod gzip_header;
mod huffman;
mod klauspost;
pub mod pgzip;

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::error::{IoContext, Result};
pub use fingerprint::{fingerprint, fingerprint_streaming};
pub use gzip_header::GzipHeader;

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
    /// as in the named Go release; Docker/moby and BuildKit write layers with it.
    /// JSON: `{"kind": "go-gzip", "release": "go1.19"}`.
    GoGzip {
        /// Which generation of Go's encoder.
        release: GoRelease,
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
}

/// Everything needed to rebuild a gzip blob from its uncompressed bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Descriptor {
    /// How the deflate stream was produced.
    pub encoder: Encoder,
    /// The member header, byte for byte.
    pub header: GzipHeader,
}

impl Descriptor {
    /// Compresses `input` into `output` as the described encoder would, in bounded memory.
    /// Returns the number of uncompressed bytes.
    pub fn encode<R: Read, W: Write>(&self, input: R, output: W) -> Result<u64> {
        match &self.encoder {
            Encoder::Pgzip { block_size } => pgzip::encode(input, output, *block_size, &self.header),
            Encoder::KlauspostGzip => {
                encode_single_stream(input, output, &self.header, klauspost::Deflater::new(), |d, chunk| match chunk {
                    Some(data) => {
                        d.write(data);
                        d.take_output()
                    }
                    None => {
                        d.close();
                        d.take_output()
                    }
                })
            }
            Encoder::GoGzip { release: GoRelease::Go1_19 } => {
                encode_single_stream(input, output, &self.header, go_flate::Deflater::new(), |d, chunk| match chunk {
                    Some(data) => {
                        d.write(data);
                        d.take_output()
                    }
                    None => {
                        d.close();
                        d.take_output()
                    }
                })
            }
        }
    }

    /// [`encode`](Self::encode) into memory.
    pub fn encode_to_vec(&self, input: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(input.len() / 2 + 64);
        self.encode(input, &mut out)?;
        Ok(out)
    }
}

/// Streaming read size for single-stream encoders.
const READ_CHUNK: usize = 256 << 10;

/// A single-stream gzip member: header, `step(Some(chunk))` per chunk of input, then
/// `step(None)` to finish, then the trailer. `step` returns the compressed bytes ready.
fn encode_single_stream<R: Read, W: Write, D>(
    mut input: R,
    mut output: W,
    header: &GzipHeader,
    mut deflater: D,
    mut step: impl FnMut(&mut D, Option<&[u8]>) -> Vec<u8>,
) -> Result<u64> {
    output.write_all(&header.to_bytes()?).ctx(|| "writing gzip header".into())?;
    let mut crc = crc32fast::Hasher::new();
    let mut total = 0u64;
    loop {
        let chunk = pgzip::read_block(&mut input, READ_CHUNK)?;
        crc.update(&chunk);
        total += chunk.len() as u64;
        output.write_all(&step(&mut deflater, Some(&chunk))).ctx(|| "writing deflate stream".into())?;
        if chunk.len() < READ_CHUNK {
            break;
        }
    }
    output.write_all(&step(&mut deflater, None)).ctx(|| "writing deflate stream".into())?;
    output.write_all(&gzip_header::trailer(crc.finalize(), total)).ctx(|| "writing gzip trailer".into())?;
    Ok(total)
}
