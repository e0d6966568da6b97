//! Bit-exact gzip blobs that no known encoder reproduces, rebuilt from their tar and a
//! **correction stream**.
//!
//! [`crate::layer::exact`] re-encodes a blob from nothing but its tar when it knows the
//! encoder that wrote it. For other zlib-family encoders (pigz and its sync-flushed 128 KiB
//! blocks, zlib-ng, miniz...) the differ records instead where the encoder departed from a
//! model of zlib's deflate: [preflate-rs](https://github.com/microsoft/preflate-rs) predicts
//! every block type, Huffman tree and match from the uncompressed bytes, and codes only the
//! mispredictions. The applier replays the tar through the same model with those
//! corrections and gets the original deflate stream, byte for byte.
//!
//! Both sides work in **chunks** that end on deflate block boundaries: the differ hands
//! preflate at most [`ANALYSIS_WINDOW`] compressed bytes (more only when one block is
//! larger) and at most about [`PLAIN_TEXT_LIMIT`] uncompressed bytes at a time, and
//! preflate keeps only a 32 KiB dictionary and fixed-size hash tables between chunks. The
//! applier's memory is therefore bounded by the chunk limits ([`MAX_CHUNK_PLAIN`],
//! [`MAX_CHUNK_DEFLATE`], [`MAX_CHUNK_CORRECTIONS`]), whatever the size of the layer.
//!
//! The correction stream is one zstd frame (window at most 2^[`MAX_WINDOW_LOG`] bytes),
//! which decompresses to (varints are unsigned LEB128, as in patches):
//!
//! ```text
//! magic     8 bytes  "FDCORR" 0x00 0x01
//! engine    varint n (at most 64), n bytes: the model the corrections are for (CORRECTION_ENGINE)
//! target    varint   index of the target layer (must equal the plan's index)
//! records…  tag 1 CHUNK: plain_len varint, deflate_len varint, corrections_len varint,
//!                        corrections_len bytes
//!           tag 0 END:   tar_len varint, deflate_len varint (the totals)
//! ```
//!
//! Each CHUNK takes the next `plain_len` bytes of the tar and must produce exactly
//! `deflate_len` (at least 1) bytes of deflate stream; its corrections are what preflate's
//! `PreflateStreamProcessor::decompress` returned for it, and the applier's
//! `RecreateStreamProcessor::recompress_bounded` consumes them, chunk after chunk. END repeats the
//! totals: the tar must end there, and the blob is the gzip header of the layer plan, the
//! chunks' output and the gzip trailer (CRC-32 and length of the tar), which makes exactly
//! the blob length of the target manifest. The totals come last so that the differ writes
//! the stream as it analyses the blob, holding one chunk at a time.
//!
//! Corrections are only valid for the model that wrote them, so the stream and the plan
//! name the engine ([`CORRECTION_ENGINE`]) and an applier refuses others.
//!
//! The corrections are hostile input, decoded by preflate-rs. The build uses a patched
//! 0.7.6 (vendor/preflate-rs/PATCHES.md) that checks the model parameters opening the first
//! chunk, bounds what the arithmetic decoder may decode, and stops a chunk whose deflate
//! output outgrows its declared `deflate_len` ([`RecreateStreamProcessor::recompress_bounded`]),
//! so rebuilding a chunk takes memory bounded by the chunk's limits and time bounded by its
//! plain text. What panics remain in preflate `guarded` turns into errors.
//!
//! Limits of the model, all of which make [`analyze`] report [`Outcome::Unusable`] (the
//! differ then carries the blob whole), never a wrong stream: preflate estimates the
//! encoder's parameters (hash function, match chain, which positions it indexes) on the
//! first chunk, and a later chunk that contradicts them stops the analysis (seen with zlib
//! level 9 output, and with long runs of zeros that first appear late in the tar); it does
//! not model Go's or klauspost's deflate (those have exact encoders); and pigz's fast levels
//! (1 to 3) cost about half the blob in corrections. When it fails to find a match,
//! preflate-rs 0.7.6 prints diagnostics on standard output, which the CLI points at
//! standard error while the differ runs.

use std::io::{self, Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};

use preflate_rs::{ExitCode, PreflateConfig, PreflateStreamProcessor, RecreateStreamProcessor};

use crate::error::{Error, Result};
use crate::format::records::write_varint;
use crate::layer::exact::gzip_header::{self, GzipHeader};

pub use crate::format::corrections::{CORRECTIONS_MAGIC, MAX_CHUNK_CORRECTIONS, MAX_CHUNK_DEFLATE, MAX_CHUNK_PLAIN, MAX_WINDOW_LOG, WINDOW_LOG};
use crate::format::corrections::{MAX_ENGINE_LEN, TAG_CHUNK, TAG_END};
pub use crate::format::encoders::CORRECTION_ENGINE;

/// Compressed bytes the differ hands preflate at a time (doubled, up to
/// [`MAX_CHUNK_DEFLATE`], while not even one deflate block fits).
pub const ANALYSIS_WINDOW: usize = 1 << 20;
/// Uncompressed bytes after which preflate ends a chunk at the block boundary before. A
/// zlib block holds at most 16383 matches of 258 bytes (4 MiB), so one always fits.
pub const PLAIN_TEXT_LIMIT: usize = 6 << 20;

/// Bytes read to parse the gzip header (10 fixed, an extra field of up to 64 KiB, and
/// a name and a comment, each of up to 64 KiB).
const MAX_HEADER_BYTES: usize = 10 + 2 + 3 * (64 << 10) + 4;
/// Largest tar: preflate counts positions in the uncompressed stream with 32-bit signed
/// integers, so the corrected path is for layers under 2 GiB (others are carried whole).
pub const MAX_TAR_BYTES: u64 = (1 << 31) - (64 << 20);

const WHAT: &str = "gzip corrections";

/// A correction stream the differ wrote, within budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Analysis {
    /// The blob's gzip member header.
    pub header: GzipHeader,
    /// Length of the uncompressed tar.
    pub tar_bytes: u64,
    /// Number of chunks.
    pub chunks: u64,
    /// Correction bytes, before zstd (the stream written is a little larger).
    pub correction_bytes: u64,
}

/// What [`analyze`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The correction stream was written.
    Written(Analysis),
    /// No correction stream within the limits rebuilds this blob: why.
    Unusable(String),
}

/// Runs preflate, turning a panic into an error: preflate is fed untrusted blobs on the
/// differ's side and untrusted corrections on the applier's.
fn guarded<T>(f: impl FnOnce() -> preflate_rs::Result<T>) -> std::result::Result<T, (Option<ExitCode>, String)> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        // preflate appends source locations to its messages, one per line: keep the first.
        Ok(Err(e)) => Err((Some(e.exit_code()), format!("preflate: {}: {}", e.exit_code(), e.message().lines().next().unwrap_or("")))),
        Err(_) => Err((None, "preflate panicked".into())),
    }
}

/// Analyses the gzip blob that `blob` reads, of target layer `target_layer`, and writes its
/// correction stream (zstd-compressed) to `out`, giving up as soon as the raw corrections
/// exceed `max_correction_bytes`. It holds one window of compressed bytes and one chunk of
/// uncompressed bytes and corrections at a time. After [`Outcome::Unusable`], `out` holds a
/// partial stream, to be discarded.
///
/// preflate checks every chunk as it goes (it recompresses it and compares), so a stream
/// written here rebuilds the blob; the applier checks the blob digest anyway.
pub fn analyze(blob: impl Read, target_layer: u32, max_correction_bytes: u64, out: impl Write) -> Result<Outcome> {
    analyze_in(blob, target_layer, max_correction_bytes, out, ANALYSIS_WINDOW, PLAIN_TEXT_LIMIT)
}

/// Reads from `input` until `buf` holds `want` bytes or the input ends.
fn fill(input: &mut impl Read, buf: &mut Vec<u8>, want: usize) -> Result<()> {
    if buf.len() < want {
        input.take((want - buf.len()) as u64).read_to_end(buf).map_err(|e| Error::io("reading a gzip blob", e))?;
    }
    Ok(())
}

/// [`analyze`] with another window and plain-text limit (smaller ones in tests, for many
/// chunks from small blobs).
fn analyze_in(
    mut blob: impl Read,
    target_layer: u32,
    max_correction_bytes: u64,
    out: impl Write,
    first_window: usize,
    plain_text_limit: usize,
) -> Result<Outcome> {
    let unusable = |why: String| Ok(Outcome::Unusable(why));
    // The compressed bytes not consumed yet: the header, then a window at a time.
    let mut buf = Vec::new();
    fill(&mut blob, &mut buf, MAX_HEADER_BYTES)?;
    let (header, header_len) = match GzipHeader::parse(&buf) {
        Ok(h) => h,
        Err(e) => return unusable(e.to_string()),
    };
    if header.to_bytes()? != buf[..header_len] {
        return unusable("its gzip header cannot be written back identically".into());
    }
    buf.drain(..header_len);
    let io_err = |e: io::Error| Error::io("writing gzip corrections", e);
    let mut out = zstd::stream::write::Encoder::new(out, 3).map_err(io_err)?;
    out.window_log(WINDOW_LOG).map_err(io_err)?;
    out.include_checksum(true).map_err(io_err)?;
    out.write_all(CORRECTIONS_MAGIC).map_err(io_err)?;
    write_varint(&mut out, CORRECTION_ENGINE.len() as u64).map_err(io_err)?;
    out.write_all(CORRECTION_ENGINE.as_bytes()).map_err(io_err)?;
    write_varint(&mut out, target_layer as u64).map_err(io_err)?;

    let config = PreflateConfig { max_chain_length: 4096, plain_text_limit, verify_compression: true };
    let mut preflate = PreflateStreamProcessor::new(&config);
    let mut crc = crc32fast::Hasher::new();
    let (mut deflate_total, mut tar_len, mut correction_bytes, mut chunks, mut window) = (0u64, 0u64, 0u64, 0u64, first_window);
    while !preflate.is_done() {
        // One byte more than the window tells whether the input goes on.
        fill(&mut blob, &mut buf, window + 1)?;
        let end = buf.len().min(window);
        if end == 0 {
            return unusable("its deflate stream is truncated".into());
        }
        let chunk = match guarded(|| preflate.decompress(&buf[..end])) {
            Ok(c) => c,
            // Not even one block in the window: widen it.
            Err((Some(ExitCode::ShortRead), _)) if end < buf.len() && (window as u64) < MAX_CHUNK_DEFLATE => {
                window *= 2;
                continue;
            }
            Err((_, why)) => return unusable(why),
        };
        let plain = preflate.plain_text().text();
        let (plain_len, deflate_len, corrections) = (plain.len() as u64, chunk.compressed_size as u64, &chunk.corrections);
        if deflate_len == 0 || deflate_len > MAX_CHUNK_DEFLATE || plain_len > MAX_CHUNK_PLAIN || corrections.len() as u64 > MAX_CHUNK_CORRECTIONS {
            return unusable(format!("a chunk of {plain_len} bytes, {deflate_len} compressed, {} of corrections exceeds the limits", corrections.len()));
        }
        crc.update(plain);
        tar_len += plain_len;
        correction_bytes += corrections.len() as u64;
        chunks += 1;
        if tar_len > MAX_TAR_BYTES {
            return unusable(format!("its tar is larger than {MAX_TAR_BYTES} bytes"));
        }
        if correction_bytes > max_correction_bytes {
            return unusable(format!("its corrections exceed the budget of {max_correction_bytes} bytes"));
        }
        out.write_all(&[TAG_CHUNK]).map_err(io_err)?;
        write_varint(&mut out, plain_len).map_err(io_err)?;
        write_varint(&mut out, deflate_len).map_err(io_err)?;
        write_varint(&mut out, corrections.len() as u64).map_err(io_err)?;
        out.write_all(corrections).map_err(io_err)?;
        buf.drain(..chunk.compressed_size);
        deflate_total += deflate_len;
        window = first_window;
        preflate.shrink_to_dictionary();
    }
    // Exactly the trailer must follow: one byte more says there is more.
    fill(&mut blob, &mut buf, 9)?;
    if buf != gzip_header::trailer(crc.finalize(), tar_len) {
        return unusable("its deflate stream is not followed by exactly its gzip trailer (several members, or trailing data)".into());
    }
    out.write_all(&[TAG_END]).map_err(io_err)?;
    write_varint(&mut out, tar_len).map_err(io_err)?;
    write_varint(&mut out, deflate_total).map_err(io_err)?;
    out.finish().map_err(io_err)?.flush().map_err(io_err)?;
    Ok(Outcome::Written(Analysis { header, tar_bytes: tar_len, chunks, correction_bytes }))
}

/// A reader that computes the CRC-32 and counts what passes through it.
struct CrcReader<R> {
    inner: R,
    crc: crc32fast::Hasher,
    len: u64,
}

impl<R: Read> Read for CrcReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

fn bad(reason: impl Into<String>) -> Error {
    Error::malformed(WHAT, reason)
}

/// Reads an unsigned LEB128 integer (the patch format's), naming the correction stream in
/// errors.
fn read_varint(input: &mut impl Read) -> Result<u64> {
    crate::format::records::read_varint(input).map_err(|e| match e {
        Error::Malformed { reason, .. } => bad(reason),
        other => other,
    })
}

fn read_exact(input: &mut impl Read, buf: &mut [u8], what: &str) -> Result<()> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => bad(format!("truncated {what}")),
        _ => bad(format!("reading {what}: {e}")),
    })
}

/// Writes the gzip blob of target layer `target_layer`: `header`, then the deflate stream
/// rebuilt from the uncompressed `tar` with the correction stream `corrections` (as
/// [`analyze`] wrote it, zstd-compressed), then the trailer. `blob_len` is the length the
/// blob must have (the target manifest's). Checks every length on the way, in bounded
/// memory; returns the length of the tar.
///
/// The correction stream is untrusted: every error is reported, never a panic. That the
/// blob is the right one is for the caller to check, by its digest.
pub fn encode(header: &GzipHeader, target_layer: u32, blob_len: u64, tar: impl Read, corrections: impl Read, mut out: impl Write) -> Result<u64> {
    let header_bytes = header.to_bytes()?;
    let deflate_expected = blob_len
        .checked_sub(header_bytes.len() as u64 + 8)
        .ok_or_else(|| bad(format!("a blob of {blob_len} bytes cannot hold a gzip header of {} bytes and a trailer", header_bytes.len())))?;
    let mut input = zstd::stream::read::Decoder::new(corrections).map_err(|e| bad(format!("starting zstd: {e}")))?;
    input.window_log_max(MAX_WINDOW_LOG).map_err(|e| bad(format!("configuring zstd: {e}")))?;

    let mut magic = [0u8; 8];
    read_exact(&mut input, &mut magic, "header")?;
    if &magic != CORRECTIONS_MAGIC {
        return Err(bad("not a correction stream (bad magic)"));
    }
    let engine_len = read_varint(&mut input)?;
    if engine_len > MAX_ENGINE_LEN {
        return Err(bad(format!("engine name of {engine_len} bytes")));
    }
    let mut engine = vec![0u8; engine_len as usize];
    read_exact(&mut input, &mut engine, "engine name")?;
    if engine != CORRECTION_ENGINE.as_bytes() {
        return Err(Error::unsupported(WHAT, format!("written for {:?}; this build has {CORRECTION_ENGINE}", String::from_utf8_lossy(&engine))));
    }
    let target = read_varint(&mut input)?;
    if target != target_layer as u64 {
        return Err(bad(format!("for target layer {target}, not {target_layer}")));
    }

    let write_err = |e: io::Error| Error::io("writing the re-encoded blob", e);
    out.write_all(&header_bytes).map_err(write_err)?;
    let mut tar = CrcReader { inner: tar, crc: crc32fast::Hasher::new(), len: 0 };
    let mut recreate = RecreateStreamProcessor::new();
    let mut corrections = Vec::new();
    let (mut deflate_len, mut chunk) = (0u64, 0u64);
    loop {
        let mut tag = [0u8; 1];
        read_exact(&mut input, &mut tag, "record tag")?;
        match tag[0] {
            TAG_CHUNK => {
                let chunk_bad = |reason: String| bad(format!("chunk {chunk}: {reason}"));
                let plain_len = read_varint(&mut input)?;
                let chunk_deflate = read_varint(&mut input)?;
                let corrections_len = read_varint(&mut input)?;
                if plain_len > MAX_CHUNK_PLAIN || tar.len + plain_len > MAX_TAR_BYTES {
                    return Err(chunk_bad(format!("{plain_len} uncompressed bytes exceed the limits")));
                }
                if chunk_deflate == 0 || chunk_deflate > MAX_CHUNK_DEFLATE || deflate_len + chunk_deflate > deflate_expected {
                    return Err(chunk_bad(format!("{chunk_deflate} compressed bytes: zero, too many, or more than the blob holds")));
                }
                if corrections_len > MAX_CHUNK_CORRECTIONS {
                    return Err(chunk_bad(format!("{corrections_len} bytes of corrections exceed the limit")));
                }
                corrections.clear();
                (&mut input).take(corrections_len).read_to_end(&mut corrections).map_err(|e| chunk_bad(format!("reading corrections: {e}")))?;
                if corrections.len() as u64 != corrections_len {
                    return Err(chunk_bad("truncated corrections".into()));
                }
                let mut plain = (&mut tar).take(plain_len);
                let mut plain_reader = io::BufReader::with_capacity(64 << 10, &mut plain);
                let rebuilt = guarded(|| recreate.recompress_bounded(&mut plain_reader, &corrections, chunk_deflate as usize));
                drop(plain_reader);
                if plain.limit() != 0 {
                    return Err(chunk_bad(format!("the tar ends {} bytes before the chunk does", plain.limit())));
                }
                let rebuilt = rebuilt.map_err(|(_, why)| chunk_bad(why))?;
                if rebuilt.len() as u64 != chunk_deflate {
                    return Err(chunk_bad(format!("rebuilt {} compressed bytes instead of {chunk_deflate}", rebuilt.len())));
                }
                out.write_all(&rebuilt).map_err(write_err)?;
                deflate_len += chunk_deflate;
                chunk += 1;
            }
            TAG_END => {
                let (tar_total, deflate_total) = (read_varint(&mut input)?, read_varint(&mut input)?);
                if tar_total != tar.len || deflate_total != deflate_len {
                    return Err(bad(format!("the end says {tar_total} and {deflate_total} bytes, the chunks {} and {deflate_len}", tar.len)));
                }
                if deflate_len != deflate_expected {
                    return Err(bad(format!("{deflate_len} compressed bytes where the blob holds {deflate_expected}")));
                }
                let (mut more, tar_len) = ([0u8; 1], tar.len);
                if tar.read(&mut more).map_err(|e| Error::io("reading the tar", e))? != 0 {
                    return Err(bad(format!("the tar goes on after {tar_len} bytes")));
                }
                if input.read(&mut more).map_err(|e| bad(format!("after the end: {e}")))? != 0 {
                    return Err(bad("data after the end"));
                }
                out.write_all(&gzip_header::trailer(tar.crc.finalize(), tar.len)).map_err(write_err)?;
                return Ok(tar.len);
            }
            other => return Err(bad(format!("unknown record tag {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Text-like bytes with repeats near and far, from a seed.
    fn synth(seed: u64, len: usize) -> Vec<u8> {
        let words: [&[u8]; 10] = [b"layer ", b"image ", b"fleet ", b"delta\n", b"usr/lib/", b"0x1f8b ", b"return ", b"{}\n", b"config ", b"\0\0\0\0"];
        let mut x = seed | 1;
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x.is_multiple_of(5) && out.len() > 5000 {
                let from = out.len() - 1 - (x >> 20) as usize % 5000;
                let n = 8 + (x >> 40) as usize % 60;
                for i in 0..n {
                    out.push(out[from + i]);
                }
            } else if x.is_multiple_of(7) {
                out.push((x >> 32) as u8);
            } else {
                out.extend_from_slice(words[(x >> 8) as usize % words.len()]);
            }
        }
        out.truncate(len);
        out
    }

    /// A gzip blob made by flate2 (its zlib-rs backend: no exact encoder reproduces it).
    fn flate2_gzip(data: &[u8], level: u32) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn corrections_of(blob: &[u8], window: usize, plain_limit: usize) -> (Analysis, Vec<u8>) {
        let mut out = Vec::new();
        match analyze_in(blob, 3, u64::MAX, &mut out, window, plain_limit).unwrap() {
            Outcome::Written(a) => (a, out),
            Outcome::Unusable(why) => panic!("unusable: {why}"),
        }
    }

    fn rebuild(header: &GzipHeader, blob_len: u64, tar: &[u8], corrections: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        encode(header, 3, blob_len, tar, corrections, &mut out)?;
        Ok(out)
    }

    /// Files of [`synth`] text padded with zeros to 512-byte blocks, as in a tar.
    fn tarish(seed: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 100_000);
        let mut i = 0;
        while out.len() < len {
            out.extend_from_slice(&[0; 512]);
            out.extend_from_slice(&synth(seed + i, 1000 + (i as usize * 7919) % 60_000));
            out.resize(out.len().next_multiple_of(512), 0);
            i += 1;
        }
        out.truncate(len);
        out
    }

    /// A gzip blob with zlib's own deflate bytes (the exact port of zlib 1.2.13).
    fn zlib_gzip(data: &[u8], level: u8) -> Vec<u8> {
        use crate::layer::exact::{Descriptor, Encoder};
        Descriptor { encoder: Encoder::Zlib { level }, header: GzipHeader::plain(0, 0, 3) }.encode_to_vec(data).unwrap()
    }

    #[test]
    fn flate2_blobs_round_trip_at_several_levels() {
        let tar = synth(1, 2_000_000);
        for level in [1, 6, 9] {
            let blob = flate2_gzip(&tar, level);
            let (a, corrections) = corrections_of(&blob, ANALYSIS_WINDOW, PLAIN_TEXT_LIMIT);
            assert_eq!((a.tar_bytes, a.chunks), (tar.len() as u64, 1));
            let rebuilt = rebuild(&a.header, blob.len() as u64, &tar, &corrections).unwrap();
            assert!(rebuilt == blob, "level {level}: the blob differs");
            assert!(corrections.len() < blob.len() / 10, "level {level}: {} bytes of corrections for a {}-byte blob", corrections.len(), blob.len());
        }
    }

    #[test]
    fn zlib_streams_round_trip_in_many_chunks() {
        let tar = tarish(1, 3_000_000);
        for level in [1, 6] {
            let blob = zlib_gzip(&tar, level);
            let (a, corrections) = corrections_of(&blob, 64 << 10, PLAIN_TEXT_LIMIT);
            assert!(a.chunks > 4, "level {level}: {} chunks", a.chunks);
            let rebuilt = rebuild(&a.header, blob.len() as u64, &tar, &corrections).unwrap();
            assert!(rebuilt == blob, "level {level}: the blob differs");
        }
    }

    #[test]
    fn empty_and_tiny_tars_round_trip() {
        for tar in [&b""[..], b"a", b"hello hello hello hello"] {
            let blob = flate2_gzip(tar, 6);
            let (a, corrections) = corrections_of(&blob, ANALYSIS_WINDOW, PLAIN_TEXT_LIMIT);
            assert_eq!(rebuild(&a.header, blob.len() as u64, tar, &corrections).unwrap(), blob);
        }
    }

    #[test]
    fn blobs_it_cannot_describe_are_unusable_not_errors() {
        let tar = synth(2, 100_000);
        let blob = flate2_gzip(&tar, 6);
        let two_members = [blob.clone(), blob.clone()].concat();
        let trailing = [blob.clone(), vec![0; 4]].concat();
        let cases: [(&str, Vec<u8>, u64); 5] = [
            ("two members", two_members, u64::MAX),
            ("trailing zeros", trailing, u64::MAX),
            ("truncated", blob[..blob.len() / 2].to_vec(), u64::MAX),
            ("not gzip", tar.clone(), u64::MAX),
            ("over budget", blob.clone(), 0),
        ];
        for (name, blob, budget) in cases {
            let outcome = analyze(&blob[..], 0, budget, Vec::new()).unwrap();
            assert!(matches!(outcome, Outcome::Unusable(_)), "{name}: {outcome:?}");
        }
    }

    /// The decompressed stream as (prefix up to the records, chunks, end totals).
    type Parsed = (Vec<u8>, Vec<(u64, u64, Vec<u8>)>, (u64, u64));

    fn parse(stream: &[u8]) -> Parsed {
        let raw = zstd::decode_all(stream).unwrap();
        let mut r = &raw[..];
        let prefix_len = 8 + 1 + CORRECTION_ENGINE.len() + 1;
        let prefix = r[..prefix_len].to_vec();
        r = &r[prefix_len..];
        let mut chunks = Vec::new();
        loop {
            let tag = r[0];
            r = &r[1..];
            if tag == TAG_END {
                let end = (read_varint(&mut r).unwrap(), read_varint(&mut r).unwrap());
                return (prefix, chunks, end);
            }
            let (p, d, n) = (read_varint(&mut r).unwrap(), read_varint(&mut r).unwrap(), read_varint(&mut r).unwrap());
            chunks.push((p, d, r[..n as usize].to_vec()));
            r = &r[n as usize..];
        }
    }

    fn unparse((prefix, chunks, end): &Parsed) -> Vec<u8> {
        let mut raw = prefix.clone();
        for (p, d, c) in chunks {
            raw.push(TAG_CHUNK);
            for v in [*p, *d, c.len() as u64] {
                write_varint(&mut raw, v).unwrap();
            }
            raw.extend_from_slice(c);
        }
        raw.push(TAG_END);
        write_varint(&mut raw, end.0).unwrap();
        write_varint(&mut raw, end.1).unwrap();
        zstd::encode_all(&raw[..], 3).unwrap()
    }

    #[test]
    fn hostile_correction_streams_fail_cleanly() {
        let tar = tarish(3, 1_500_000);
        let blob = zlib_gzip(&tar, 6);
        let (a, good) = corrections_of(&blob, 64 << 10, PLAIN_TEXT_LIMIT);
        let parsed = parse(&good);
        assert!(parsed.1.len() >= 3, "{} chunks", parsed.1.len());
        assert_eq!(zstd::decode_all(&unparse(&parsed)[..]).unwrap(), zstd::decode_all(&good[..]).unwrap(), "the test's parser round-trips");
        let edit = |f: &dyn Fn(&mut Parsed)| {
            let mut p = parsed.clone();
            f(&mut p);
            unparse(&p)
        };
        let mut garbage = good.clone();
        for (i, b) in garbage.iter_mut().enumerate().skip(4) {
            *b = b.wrapping_mul(31).wrapping_add(i as u8);
        }
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("truncated", good[..good.len() / 2].to_vec()),
            ("truncated record stream", {
                let mut raw = zstd::decode_all(&good[..]).unwrap();
                raw.truncate(raw.len() - 3);
                zstd::encode_all(&raw[..], 3).unwrap()
            }),
            ("garbage", garbage),
            ("not zstd", synth(4, 5000)),
            ("trailing data", {
                let mut raw = zstd::decode_all(&good[..]).unwrap();
                raw.push(7);
                zstd::encode_all(&raw[..], 3).unwrap()
            }),
            ("wrong engine", edit(&|p| p.0[9] = b'X')),
            ("wrong target", edit(&|p| *p.0.last_mut().unwrap() = 4)),
            ("plain length +1", edit(&|p| p.1[1].0 += 1)),
            ("plain length -1", edit(&|p| p.1[1].0 -= 1)),
            ("huge plain length", edit(&|p| p.1[0].0 = u64::MAX / 2)),
            ("deflate length +1", edit(&|p| p.1[2].1 += 1)),
            ("zero deflate length", edit(&|p| p.1[2].1 = 0)),
            ("huge corrections", edit(&|p| p.1[0].2 = vec![0; (MAX_CHUNK_CORRECTIONS + 1) as usize])),
            ("no corrections", edit(&|p| p.1[1].2.clear())),
            ("corrections flipped", edit(&|p| p.1[1].2.iter_mut().for_each(|b| *b ^= 0x5a))),
            ("first corrections flipped", edit(&|p| p.1[0].2.iter_mut().for_each(|b| *b = b.rotate_left(3)))),
            ("chunks swapped", edit(&|p| p.1.swap(1, 2))),
            (
                "chunk dropped",
                edit(&|p| {
                    p.1.remove(1);
                }),
            ),
            ("end lies", edit(&|p| p.2 .0 += 1)),
        ];
        let mut caught = 0;
        for (name, stream) in &cases {
            match rebuild(&a.header, blob.len() as u64, &tar, stream) {
                Err(e) => {
                    caught += 1;
                    assert!(matches!(e, Error::Malformed { .. } | Error::Unsupported { .. }), "{name}: {e}");
                }
                // Corrections that preflate accepts but that are wrong make another blob,
                // which the applier's digest check refuses.
                Ok(rebuilt) => assert!(rebuilt != blob, "{name}: rebuilt the blob"),
            }
        }
        assert!(caught >= cases.len() - 2, "only {caught} of {} caught by the encoder itself", cases.len());
        // The tar itself may lie too.
        assert!(rebuild(&a.header, blob.len() as u64, &tar[..tar.len() - 1], &good).is_err());
        assert!(rebuild(&a.header, blob.len() as u64, &[&tar[..], b"x"].concat(), &good).is_err());
        assert!(rebuild(&a.header, blob.len() as u64 + 1, &tar, &good).is_err());
        assert!(rebuild(&a.header, 5, &tar, &good).is_err());
    }

    /// Found by the `corrections` fuzz target: corrections on which preflate-rs 0.7.6 as
    /// released panics (a Huffman tree size correction underflows in `decode_difference`,
    /// with overflow checks on). The patched preflate refuses the tree they describe;
    /// either way `encode` must answer with an error naming the chunk.
    #[test]
    fn corrections_that_made_preflate_panic_are_errors() {
        let mut prefix = CORRECTIONS_MAGIC.to_vec();
        write_varint(&mut prefix, CORRECTION_ENGINE.len() as u64).unwrap();
        prefix.extend_from_slice(CORRECTION_ENGINE.as_bytes());
        write_varint(&mut prefix, 3).unwrap();
        // The model parameters analyze writes for an empty tar (bitcode), then two bytes of
        // arithmetic-coded corrections.
        let corrections =
            vec![0x00, 0x00, 0x04, 0x00, 0x02, 0x04, 0x00, 0x00, 0x02, 0x40, 0x01, 0x04, 0x00, 0x00, 0x04, 0x00, 0x04, 0x00, 0x00, 0x02, 0x02, 0x5a, 0x00];
        let stream = unparse(&(prefix, vec![(0, 2, corrections)], (0, 2)));
        let header = GzipHeader::plain(0, 0, 3);
        match rebuild(&header, 10 + 2 + 8, b"", &stream) {
            Err(Error::Malformed { reason, .. }) => assert!(reason.starts_with("chunk 0: preflate"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    /// The raw cases in `fuzz/regressions/corrections` (mode 1 of the `corrections` fuzz
    /// target: u16 LE tar length, u16 LE deflate length, the tar, the decompressed stream),
    /// each found to make preflate-rs 0.7.6 as released loop for ever, allocate without bound
    /// or panic, now answer: an error naming their chunk, or a blob of exactly the length
    /// asked (which the applier's digest check then judges). The seeded cases there are
    /// replayed by the fuzz binary itself (tools/test).
    #[test]
    fn fuzz_regressions_answer() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/corrections");
        let (mut replayed, mut errors) = (0, 0);
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            if data.len() < 5 || data[0] != 1 {
                continue;
            }
            let tar_len = usize::from(u16::from_le_bytes([data[1], data[2]])).min(data.len() - 5);
            let deflate_len = u64::from(u16::from_le_bytes([data[3], data[4]]));
            let (tar, records) = data[5..].split_at(tar_len);
            let stream = zstd::bulk::compress(records, 1).unwrap();
            let header = GzipHeader::plain(0, 0, 3);
            let blob_len = header.to_bytes().unwrap().len() as u64 + 8 + deflate_len;
            match rebuild(&header, blob_len, tar, &stream) {
                Err(Error::Malformed { reason, .. }) => {
                    assert!(reason.starts_with("chunk ") || reason.starts_with("the end"), "{}: {reason}", path.display());
                    errors += 1;
                }
                Ok(blob) => assert_eq!(blob.len() as u64, blob_len, "{}", path.display()),
                other => panic!("{}: {other:?}", path.display()),
            }
            replayed += 1;
        }
        assert!(replayed >= 6 && errors >= 5, "{replayed} raw regressions in {}, {errors} refused", dir.display());
    }

    /// The first chunk's corrections as preflate-rs 0.7.6 writes them: its private
    /// `ReconstructionData` (bitcode encodes fields in order, whatever their names), so that
    /// tests can write hostile model parameters.
    #[derive(bitcode::Decode, bitcode::Encode)]
    struct FirstChunk {
        parameters: preflate_rs::TokenPredictorParameters,
        corrections: Vec<u8>,
    }

    /// The copy of preflate's `ReconstructionData` layout decodes what preflate writes for a
    /// first chunk, to the parameters it reports, and encodes back to the same bytes.
    #[test]
    fn first_chunk_layout_is_preflates() {
        for (tar, level) in [(synth(5, 300_000), 6), (tarish(6, 300_000), 1), (Vec::new(), 6)] {
            let blob = flate2_gzip(&tar, level);
            let (_, header_len) = GzipHeader::parse(&blob).unwrap();
            let config = PreflateConfig { max_chain_length: 4096, plain_text_limit: PLAIN_TEXT_LIMIT, verify_compression: false };
            let chunk = PreflateStreamProcessor::new(&config).decompress(&blob[header_len..blob.len() - 8]).unwrap();
            let first: FirstChunk = bitcode::decode(&chunk.corrections).unwrap();
            assert_eq!(Some(first.parameters), chunk.parameters);
            assert_eq!(bitcode::encode(&first), chunk.corrections);
            first.parameters.validate().unwrap();
        }
    }

    /// Found by the `corrections` fuzz target (a window of 2^40 bytes: a shift overflow in
    /// preflate); the others by reading preflate (blocks of at most 0 tokens make it loop for
    /// ever, a zlib hash shifted by 40 bits overflows, a chain of 2^31 or matches longer than
    /// deflate's would search without bound). The patched preflate refuses them by name.
    #[test]
    fn hostile_model_parameters_are_refused() {
        let tar = tarish(7, 100_000);
        let blob = flate2_gzip(&tar, 6);
        let (a, good) = corrections_of(&blob, ANALYSIS_WINDOW, PLAIN_TEXT_LIMIT);
        let parsed = parse(&good);
        let first: FirstChunk = bitcode::decode(&parsed.1[0].2).unwrap();
        let with = |f: &dyn Fn(&mut preflate_rs::TokenPredictorParameters)| {
            let mut p = parsed.clone();
            let mut parameters = first.parameters;
            f(&mut parameters);
            p.1[0].2 = bitcode::encode(&FirstChunk { parameters, corrections: first.corrections.clone() });
            unparse(&p)
        };
        assert_eq!(rebuild(&a.header, blob.len() as u64, &tar, &with(&|_| ())).unwrap(), blob, "the stream re-encoded unchanged still works");
        let cases: [(&str, Vec<u8>, &str); 7] = [
            ("huge window", with(&|p| p.window_bits = 40), "model parameters: a window of 2^40 bytes"),
            ("no tokens", with(&|p| p.max_token_count = 0), "model parameters: blocks of at most 0 tokens"),
            (
                "hash shift",
                with(&|p| p.hash_algorithm = preflate_rs::HashAlgorithm::Zlib { hash_mask: 0x7fff, hash_shift: 40 }),
                "model parameters: a 16-bit hash shifted by 40 bits",
            ),
            ("long chain", with(&|p| p.max_chain = 1 << 31), "model parameters: a match chain of 2147483648"),
            ("nice length", with(&|p| p.nice_length = 259), "model parameters: match lengths nice 259"),
            ("min length", with(&|p| p.min_len = u32::MAX), "model parameters: match lengths"),
            (
                "not bitcode",
                {
                    let mut p = parsed.clone();
                    p.1[0].2.truncate(3);
                    unparse(&p)
                },
                "chunk 0: preflate: ",
            ),
        ];
        for (name, stream, want) in cases {
            match rebuild(&a.header, blob.len() as u64, &tar, &stream) {
                Err(Error::Malformed { reason, .. }) => {
                    assert!(reason.starts_with("chunk 0: preflate: ") && reason.contains(want), "{name}: {reason}")
                }
                other => panic!("{name}: {other:?}"),
            }
        }
    }
}
