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
//! | `GoGzip { release: Go1_27 }` | Go 1.27 `compress/gzip`, default level (flate level 6, klauspost's design) | Docker/moby, BuildKit built with Go 1.27 |
//! | `Zlib { level }` | zlib 1.2.13 deflate, levels 1-9 | Python's `gzip`, anything on the system zlib |
//! | `GnuGzip { level }` | GNU gzip 1.12, levels 1-9 | `gzip -9n` (Debian's changelogs and manual pages), `tar \| gzip` |
//!
//! GNU gzip's deflate and zlib's share their origin: the same match finder, lazy
//! evaluation and Huffman trees. They differ in where a block ends: gzip buffers 32767
//! symbols instead of zlib's 16383 (memLevel 8), and at every 4096th symbol ends the block
//! early when an estimate finds it compresses well with few matches. zlib carries that
//! estimate too, compiled out (`TRUNCATE_BLOCK` in its trees.c). They also differ at the end
//! of the input, where matches may read past the data: gzip reads whole windows from a
//! file, slides the whole upper half, zeroes two bytes past the data, hashes strings to the
//! very end and keeps looking for longer matches there. Our `GnuGzip` is the zlib port with
//! those behaviours, written from their description, not a port of gzip's GPL-3 code.
//!
//! Not reproduced: pigz (zlib in 128 KiB blocks with sync flushes and dictionaries) and
//! flate2's default zlib-rs backend (whose bytes differ from zlib's at every level).
//! [`fingerprint()`] returns `None` for them.
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
//! Other kinds: `{"kind": "klauspost-gzip"}`, `{"kind": "go-gzip", "release": "go1.19"}`
//! (or `"go1.27"`), `{"kind": "zlib", "level": 9}`, `{"kind": "gnu-gzip", "level": 9}`. The header's fields are described on [`GzipHeader`].

mod bits;
pub mod fingerprint;
mod go127;
mod go_flate;
pub mod gzip_header;
mod huffman;
mod klauspost;
mod match_len;
pub mod pgzip;
mod zlib;

use std::io::{Read, Write};

use crate::error::{IoContext, Result};
pub use crate::format::encoders::{Descriptor, Encoder, GoRelease, GzipHeader};
pub use fingerprint::{fingerprint, fingerprint_deflate, fingerprint_streaming};

impl Descriptor {
    /// Compresses `input` into `output` as the described encoder would, in bounded memory.
    /// Returns the number of uncompressed bytes.
    pub fn encode<R: Read, W: Write>(&self, mut input: R, mut output: W) -> Result<u64> {
        if let Encoder::Pgzip { block_size } = &self.encoder {
            return pgzip::encode(input, output, *block_size, &self.header);
        }
        let mut member = self.member_encoder()?;
        loop {
            let chunk = pgzip::read_block(&mut input, READ_CHUNK)?;
            member.write(&chunk, &mut output)?;
            if chunk.len() < READ_CHUNK {
                break;
            }
        }
        member.finish(&mut output)
    }

    /// A push-driven encoder for one gzip member, for callers that produce the input as a
    /// stream of writes (the applier re-packing gzip files inside a layer). Every encoder
    /// but pgzip (whose blocks are compressed in parallel from a reader) is available so.
    pub fn member_encoder(&self) -> Result<MemberEncoder> {
        Ok(MemberEncoder { header: Some(self.header.to_bytes()?), trailer: true, ..self.encoder.deflate_encoder()? })
    }

    /// [`encode`](Self::encode) into memory.
    pub fn encode_to_vec(&self, input: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(input.len() / 2 + 64);
        self.encode(input, &mut out)?;
        Ok(out)
    }
}

impl Encoder {
    /// A push-driven encoder for a bare deflate stream, with no gzip header or trailer (a zip
    /// entry's data). Every encoder but pgzip, whose streams only come whole in gzip, is
    /// available so.
    pub fn deflate_encoder(&self) -> Result<MemberEncoder> {
        let level = |level: u8| {
            if (1..=9).contains(&level) {
                Ok(level)
            } else {
                Err(crate::error::Error::unsupported("deflate level", level.to_string()))
            }
        };
        let deflater: Box<dyn RawDeflate> = match self {
            Encoder::Pgzip { .. } => {
                return Err(crate::error::Error::unsupported("encoder", "pgzip only encodes whole gzip blobs from a reader"));
            }
            Encoder::KlauspostGzip => Box::new(klauspost::Deflater::new()),
            Encoder::GoGzip { release: GoRelease::Go1_19 } => Box::new(go_flate::Deflater::new()),
            Encoder::GoGzip { release: GoRelease::Go1_27 } => Box::new(go127::deflater()),
            Encoder::Zlib { level: l } => Box::new(zlib::Deflater::with_flavor(level(*l)?, zlib::Flavor::Zlib)),
            Encoder::GnuGzip { level: l } => Box::new(zlib::Deflater::with_flavor(level(*l)?, zlib::Flavor::GnuGzip)),
        };
        Ok(MemberEncoder { header: None, trailer: false, deflater, pending: Vec::with_capacity(READ_CHUNK), crc: crc32fast::Hasher::new(), total: 0 })
    }

    /// Encodes `input` as a bare deflate stream into memory.
    pub fn deflate_to_vec(&self, input: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(input.len() / 2 + 64);
        let mut encoder = self.deflate_encoder()?;
        encoder.write(input, &mut out)?;
        encoder.finish(&mut out)?;
        Ok(out)
    }
}

/// Streaming read size for single-stream encoders: small enough that a fingerprint
/// candidate that mismatches is abandoned after about one deflate block.
const READ_CHUNK: usize = 64 << 10;

/// A raw deflate encoder driven by pushes.
trait RawDeflate: Send {
    /// Takes `data` (always [`READ_CHUNK`] bytes but for the last push).
    fn push(&mut self, data: &[u8]);
    /// Ends the stream.
    fn end(&mut self);
    /// The compressed bytes ready so far.
    fn output(&mut self) -> Vec<u8>;
}

/// Implements [`RawDeflate`] over a port's own calls (`write`, `take_output`, and `finish`
/// or `close` as its original names the end of the stream).
macro_rules! impl_raw_deflate {
    ([$($generics:tt)*] $deflater:ty, $end:ident) => {
        impl<$($generics)*> RawDeflate for $deflater {
            fn push(&mut self, data: &[u8]) {
                self.write(data)
            }
            fn end(&mut self) {
                self.$end()
            }
            fn output(&mut self) -> Vec<u8> {
                self.take_output()
            }
        }
    };
}

impl_raw_deflate!([] zlib::Deflater, finish);
impl_raw_deflate!([F: klauspost::MatchFinder] klauspost::Deflater<F>, close);
impl_raw_deflate!([] go_flate::Deflater, close);

/// One gzip member (or bare deflate stream) encoded from pushed input:
/// [`MemberEncoder::write`] any number of times, then [`MemberEncoder::finish`]. The
/// deflater always sees the input in chunks of the same size, however the caller splits it,
/// so the bytes never depend on the caller.
pub struct MemberEncoder {
    /// The gzip header, until it is written.
    header: Option<Vec<u8>>,
    /// Whether the stream ends with a gzip trailer.
    trailer: bool,
    deflater: Box<dyn RawDeflate>,
    pending: Vec<u8>,
    crc: crc32fast::Hasher,
    total: u64,
}

impl std::fmt::Debug for MemberEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberEncoder").field("total", &self.total).finish_non_exhaustive()
    }
}

impl MemberEncoder {
    /// Encodes `data`, writing whatever compressed bytes are ready to `output`.
    pub fn write(&mut self, mut data: &[u8], output: &mut impl Write) -> Result<()> {
        if let Some(header) = self.header.take() {
            output.write_all(&header).ctx(|| "writing gzip header".into())?;
        }
        self.crc.update(data);
        self.total += data.len() as u64;
        while !data.is_empty() {
            let n = (READ_CHUNK - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.pending.len() == READ_CHUNK {
                self.deflater.push(&self.pending);
                self.pending.clear();
                output.write_all(&self.deflater.output()).ctx(|| "writing deflate stream".into())?;
            }
        }
        Ok(())
    }

    /// Ends the member: the last compressed bytes and the trailer. Returns the number of
    /// uncompressed bytes.
    pub fn finish(mut self, output: &mut impl Write) -> Result<u64> {
        if let Some(header) = self.header.take() {
            output.write_all(&header).ctx(|| "writing gzip header".into())?;
        }
        // The last push is shorter than a chunk (possibly empty), as a reader's last read.
        self.deflater.push(&self.pending);
        self.deflater.end();
        output.write_all(&self.deflater.output()).ctx(|| "writing deflate stream".into())?;
        if self.trailer {
            output.write_all(&gzip_header::trailer(self.crc.finalize(), self.total)).ctx(|| "writing gzip trailer".into())?;
        }
        Ok(self.total)
    }
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
            Descriptor { encoder: Encoder::GoGzip { release: GoRelease::Go1_19 }, header: GzipHeader::go_stdlib_default() },
            Descriptor { encoder: Encoder::GoGzip { release: GoRelease::Go1_27 }, header: GzipHeader::go_stdlib_default() },
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
        assert_eq!(serde_json::to_string(&d).unwrap(), r#"{"encoder":{"kind":"pgzip","block_size":262144},"header":{"mtime":2288912640,"xfl":0,"os":255}}"#);
        let go = Descriptor { encoder: Encoder::GoGzip { release: GoRelease::Go1_19 }, header: GzipHeader::go_stdlib_default() };
        assert_eq!(serde_json::to_string(&go).unwrap(), r#"{"encoder":{"kind":"go-gzip","release":"go1.19"},"header":{"mtime":0,"xfl":0,"os":255}}"#);
        assert_eq!(serde_json::to_string(&Encoder::GoGzip { release: GoRelease::Go1_27 }).unwrap(), r#"{"kind":"go-gzip","release":"go1.27"}"#);
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
