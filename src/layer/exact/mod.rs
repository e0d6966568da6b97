//! Bit-exact re-encoding of gzip layers.
//!
//! A registry blob is "encoder E, with parameters P, behind header H" applied to the
//! layer's tar. This module holds faithful ports of the encoders that wrote the layers
//! found in real registries, a serializable [`Descriptor`] naming one, and a
//! [`fingerprint()`] that finds the descriptor which reproduces a given blob.
//!
//! | [`Encoder`] | reproduces, byte for byte | written by |
//! |---|---|---|
//! | `Pgzip { block_size }` | klauspost/pgzip 1.2.5 on klauspost/compress 1.15.12, default level | umoci 0.4.7 (256 KiB blocks), skopeo |
//! | `KlauspostGzip` | klauspost/compress 1.15.12 `gzip`, default level | Go tools using klauspost's gzip |
//! | `GoGzip { release: Go1_19 }` | Go 1.19 `compress/gzip`, default level | Docker/moby, BuildKit built with Go 1.19 |
//! | `Zlib { level }` | zlib 1.2.13 deflate, levels 1-9 | Python's `gzip`, anything on the system zlib |
//!
//! Not reproduced: GNU gzip (its deflate is not zlib's: other block boundaries; a port
//! would be a derivative of GPL-3 code), pigz (zlib in 128 KiB blocks with sync flushes
//! and dictionaries) and flate2's default zlib-rs backend (whose bytes differ from zlib's
//! at every level). [`fingerprint()`] returns `None` for them.
//!
//! Encoding streams from a `Read` into a `Write` with bounded memory; pgzip blocks are
//! compressed in parallel (rayon), which gives the same bytes because each block depends
//! only on its input and the previous block's last 16 KiB.
//!
//! The descriptor's JSON shape is stable (new encoders add new `kind`s):
//!
//! ```json
//! {"encoder": {"kind": "pgzip", "block_size": 262144},
//!  "header": {"mtime": 2288912640, "xfl": 0, "os": 255}}
//! ```
//! Other kinds: `{"kind": "klauspost-gzip"}`, `{"kind": "go-gzip", "release": "go1.19"}`,
//! `{"kind": "zlib", "level": 9}`. The header's fields are described on [`GzipHeader`].

mod bits;
pub mod fingerprint;
mod go_flate;
pub mod gzip_header;
mod huffman;
mod klauspost;
pub mod pgzip;
mod zlib;

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
    /// zlib 1.2.13 deflate (window 15, memLevel 8, default strategy) at `level` 1-9:
    /// what Python's `gzip`/`zlib`, and anything else on the system zlib, write.
    /// JSON: `{"kind": "zlib", "level": 9}`.
    Zlib {
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
            Encoder::Zlib { level } => {
                if !(1..=9).contains(level) {
                    return Err(crate::error::Error::unsupported("zlib level", level.to_string()));
                }
                encode_single_stream(input, output, &self.header, zlib::Deflater::new(*level), |d, chunk| {
                    match chunk {
                        Some(data) => d.write(data),
                        None => d.finish(),
                    }
                    d.take_output()
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

/// Streaming read size for single-stream encoders: small enough that a fingerprint
/// candidate that mismatches is abandoned after about one deflate block.
const READ_CHUNK: usize = 64 << 10;

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all_descriptors() -> Vec<Descriptor> {
        vec![
            Descriptor { encoder: Encoder::Pgzip { block_size: 16385 }, header: GzipHeader::klauspost_default() },
            Descriptor { encoder: Encoder::Pgzip { block_size: 40_000 }, header: GzipHeader::klauspost_default() },
            Descriptor { encoder: Encoder::KlauspostGzip, header: GzipHeader::klauspost_default() },
            Descriptor {
                encoder: Encoder::GoGzip { release: GoRelease::Go1_19 },
                header: GzipHeader::go_stdlib_default(),
            },
        ]
    }

    fn gunzip(blob: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(blob).read_to_end(&mut out).unwrap();
        out
    }

    /// Inputs with long repeats, short repeats and noise, from a few proptest numbers.
    fn synth(seed: u64, len: usize, period: usize) -> Vec<u8> {
        let mut x = seed | 1;
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x.is_multiple_of(3) && out.len() > period {
                let start = out.len() - period;
                let n = ((x >> 8) as usize % 300).min(len - out.len());
                for i in 0..n {
                    out.push(out[start + i % period]);
                }
            } else {
                out.push((x >> 32) as u8 % 16 + b'a');
            }
        }
        out
    }

    #[test]
    fn the_json_shape_is_stable() {
        let d = Descriptor { encoder: Encoder::Pgzip { block_size: 262_144 }, header: GzipHeader::klauspost_default() };
        assert_eq!(
            serde_json::to_string(&d).unwrap(),
            r#"{"encoder":{"kind":"pgzip","block_size":262144},"header":{"mtime":2288912640,"xfl":0,"os":255}}"#
        );
        let go = Descriptor {
            encoder: Encoder::GoGzip { release: GoRelease::Go1_19 },
            header: GzipHeader::go_stdlib_default(),
        };
        assert_eq!(
            serde_json::to_string(&go).unwrap(),
            r#"{"encoder":{"kind":"go-gzip","release":"go1.19"},"header":{"mtime":0,"xfl":0,"os":255}}"#
        );
        assert_eq!(serde_json::to_string(&Encoder::KlauspostGzip).unwrap(), r#"{"kind":"klauspost-gzip"}"#);
        assert_eq!(serde_json::to_string(&Encoder::Zlib { level: 9 }).unwrap(), r#"{"kind":"zlib","level":9}"#);
        for d in all_descriptors() {
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(serde_json::from_str::<Descriptor>(&json).unwrap(), d);
        }
    }

    #[test]
    fn a_reused_klauspost_deflater_writes_what_a_new_one_writes() {
        // pgzip pools its deflaters; we reuse one per thread. Reuse must not change bytes.
        let blocks: Vec<Vec<u8>> = (0..4).map(|i| synth(i, 50_000 + i as usize * 7_000, 97)).collect();
        let mut reused = klauspost::Deflater::new();
        for (i, block) in blocks.iter().enumerate() {
            let dict = if i == 0 { &[][..] } else { &blocks[i - 1][blocks[i - 1].len() - pgzip::TAIL_SIZE..] };
            let (mut a, mut b) = (Vec::new(), Vec::new());
            pgzip::compress_block(&mut reused, dict, block, i == 3, &mut a);
            pgzip::compress_block(&mut klauspost::Deflater::new(), dict, block, i == 3, &mut b);
            assert_eq!(a, b, "block {i}");
        }
    }

    #[test]
    fn block_size_multiples_and_edges_round_trip() {
        let data = synth(9, 200_000, 1234);
        for d in all_descriptors() {
            for len in [0, 1, 2, 31, 32, 33, 127, 128, 16384, 16385, 40_000, 80_000, 80_001, 65535, 65536, 131_071] {
                assert_eq!(gunzip(&d.encode_to_vec(&data[..len]).unwrap()), &data[..len], "{d:?} len {len}");
            }
        }
    }

    #[test]
    fn streaming_through_small_reads_gives_the_same_bytes() {
        /// A reader that hands out at most 1000 bytes per call.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = buf.len().min(self.0.len()).min(1000);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let data = synth(3, 300_000, 4000);
        for d in all_descriptors() {
            let mut out = Vec::new();
            assert_eq!(d.encode(Trickle(&data), &mut out).unwrap(), data.len() as u64);
            assert_eq!(out, d.encode_to_vec(&data).unwrap(), "{d:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn every_encoder_round_trips(seed in any::<u64>(), len in 0usize..150_000, period in 1usize..5000) {
            let data = synth(seed, len, period);
            for d in all_descriptors() {
                prop_assert_eq!(gunzip(&d.encode_to_vec(&data).unwrap()), data.clone());
            }
        }
    }
}
