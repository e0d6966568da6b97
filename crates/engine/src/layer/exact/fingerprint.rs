//! Which encoder wrote a gzip blob? Cheap structural hints pick and order candidates;
//! each candidate is then confirmed by re-encoding the uncompressed bytes and comparing
//! with the blob as the bytes are produced, stopping at the first difference.

use std::io::{self, Read, Write};

use super::gzip_header::{GzipHeader, OS_UNIX};
use super::pgzip::{DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE, TAIL_SIZE, UMOCI_BLOCK_SIZE};
use super::{Descriptor, Encoder, GoRelease};
use crate::error::{Error, IoContext, Result};

/// The empty stored block a sync flush writes.
const SYNC_MARKER: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// How pgzip's deflate stream ends: the last block's sync flush, then an empty final
/// fixed block.
const PGZIP_END: [u8; 6] = [0x00, 0x00, 0xff, 0xff, 0x03, 0x00];
/// How much of the blob we keep to infer a pgzip block size (its first block must end
/// inside it).
const PROBE_LIMIT: usize = 8 << 20;
/// Sync markers examined when inferring the block size (the first may be a false hit).
const MAX_MARKERS_PROBED: usize = 8;

/// Finds the descriptor that rebuilds `blob` from `uncompressed`, or `None`.
pub fn fingerprint(blob: &[u8], uncompressed: &[u8]) -> Option<Descriptor> {
    fingerprint_streaming(|| Ok(blob), || Ok(uncompressed)).ok().flatten()
}

/// Streaming [`fingerprint`]: `open_blob` and `open_uncompressed` return fresh readers
/// from the start (each candidate re-reads both). Memory stays bounded: the blob is read
/// once for hints (keeping at most 8 MiB), then once per candidate while comparing.
/// Errors are I/O errors of the readers; a blob that no encoder reproduces is `Ok(None)`.
pub fn fingerprint_streaming<B: Read, U: Read>(
    mut open_blob: impl FnMut() -> io::Result<B>,
    mut open_uncompressed: impl FnMut() -> io::Result<U>,
) -> Result<Option<Descriptor>> {
    let hints = Hints::scan(open_blob().ctx(|| "opening blob".into())?)?;
    let Some(header) = hints.header.clone() else { return Ok(None) };
    for encoder in hints.candidates() {
        let descriptor = Descriptor { encoder, header: header.clone() };
        let blob = open_blob().ctx(|| "opening blob".into())?;
        let input = open_uncompressed().ctx(|| "opening uncompressed layer".into())?;
        if reproduces(&descriptor, input, blob)? {
            return Ok(Some(descriptor));
        }
    }
    Ok(None)
}

/// Finds the encoder that rebuilds the bare deflate stream `compressed` (a zip entry's
/// data) from `raw`, or `None`. `first` is tried first: the encoder that reproduced the
/// archive's other entries. Then the writers of zip files, most common first: zlib at its
/// default level (Python's `zipfile`, Java's `jar` and `ZipOutputStream`), Info-ZIP's `zip`
/// (gzip's deflate), other levels, and the Go encoders, whose endings give them away.
pub fn fingerprint_deflate(compressed: &[u8], raw: &[u8], first: Option<&Encoder>) -> Option<Encoder> {
    let mut candidates: Vec<Encoder> = first.into_iter().cloned().collect();
    if compressed.ends_with(&SYNC_MARKER) {
        candidates.push(Encoder::GoGzip { release: GoRelease::Go1_19 });
    }
    let go = [Encoder::GoGzip { release: GoRelease::Go1_27 }, Encoder::KlauspostGzip, Encoder::GoGzip { release: GoRelease::Go1_19 }];
    // The empty final fixed block klauspost's and Go 1.27's `Close` write ends in a zero byte.
    if compressed.last() == Some(&0) {
        candidates.extend(go[..2].iter().cloned());
    }
    for level in [6, 9, 1, 5, 4, 7, 8, 3, 2] {
        candidates.extend([Encoder::Zlib { level }, Encoder::GnuGzip { level }]);
    }
    candidates.extend(go);
    let mut tried = Vec::with_capacity(candidates.len());
    for encoder in candidates {
        if tried.contains(&encoder) {
            continue;
        }
        if reproduces_deflate(&encoder, raw, compressed) {
            return Some(encoder);
        }
        tried.push(encoder);
    }
    None
}

/// Whether `encoder` turns `raw` into exactly `compressed`, stopping at the first difference.
fn reproduces_deflate(encoder: &Encoder, raw: &[u8], compressed: &[u8]) -> bool {
    let Ok(mut member) = encoder.deflate_encoder() else { return false };
    let mut cmp = Comparer { blob: compressed, mismatch: false, buf: Vec::new() };
    member.write(raw, &mut cmp).is_ok() && member.finish(&mut cmp).is_ok() && cmp.blob.is_empty()
}

/// What one pass over the blob tells us.
#[derive(Debug, Default)]
struct Hints {
    /// `None` when the header is not one we can write back.
    header: Option<GzipHeader>,
    /// The deflate stream ends as pgzip's does.
    pgzip_end: bool,
    /// The deflate stream ends with an empty final stored block (Go 1.19's standard library).
    stored_end: bool,
    /// The deflate stream's last byte is 0, as after the empty final fixed block that
    /// klauspost's and Go 1.27's `Close` write (pgzip's streams end so too).
    zero_end: bool,
    /// pgzip block sizes consistent with the first sync markers.
    block_sizes: Vec<u32>,
    /// The header's XFL byte: zlib writes 2 at level 9, 4 at level 1.
    xfl: u8,
    /// The header's OS byte.
    os: u8,
}

impl Hints {
    fn scan(mut blob: impl Read) -> Result<Self> {
        let mut probe = Vec::new();
        (&mut blob).take(PROBE_LIMIT as u64).read_to_end(&mut probe).ctx(|| "reading blob".into())?;
        let Ok((header, header_len)) = GzipHeader::parse(&probe) else { return Ok(Hints::default()) };
        // The last 14 bytes: the end of the deflate stream, then the 8-byte trailer.
        let mut tail = probe[probe.len().saturating_sub(14)..].to_vec();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = blob.read(&mut buf).ctx(|| "reading blob".into())?;
            if n == 0 {
                break;
            }
            tail.extend_from_slice(&buf[..n]);
            tail.drain(..tail.len().saturating_sub(14));
        }
        let stream_end = if tail.len() >= 8 { &tail[..tail.len() - 8] } else { &[][..] };
        let deflate = &probe[header_len.min(probe.len())..];
        Ok(Hints {
            xfl: header.xfl,
            os: header.os,
            header: Some(header),
            pgzip_end: stream_end.ends_with(&PGZIP_END),
            stored_end: stream_end.ends_with(&SYNC_MARKER),
            zero_end: stream_end.last() == Some(&0),
            block_sizes: pgzip_block_sizes(deflate),
        })
    }

    /// Candidate encoders, most likely first.
    fn candidates(&self) -> Vec<Encoder> {
        let mut out = Vec::new();
        if self.pgzip_end {
            for &block_size in &self.block_sizes {
                out.push(Encoder::Pgzip { block_size });
            }
            // A single-block stream is the same for every block size larger than it.
            for block_size in [UMOCI_BLOCK_SIZE, DEFAULT_BLOCK_SIZE] {
                if !self.block_sizes.contains(&block_size) {
                    out.push(Encoder::Pgzip { block_size });
                }
            }
        }
        if self.stored_end {
            out.push(Encoder::GoGzip { release: GoRelease::Go1_19 });
        }
        if self.zero_end {
            // Same ending, same header; a wrong guess fails within the first 64 KiB window.
            // Go 1.27 first: Docker and BuildKit write far more layers than klauspost's gzip.
            out.push(Encoder::GoGzip { release: GoRelease::Go1_27 });
            out.push(Encoder::KlauspostGzip);
        }
        // zlib and GNU gzip streams have no telltale ending; XFL says which level if the
        // writer set it as both do, otherwise the default level goes first. GNU gzip writes
        // OS 3 (Unix); zlib's own gzip writer and Python's write 3 or 255.
        let levels: &[u8] = match self.xfl {
            2 => &[9, 8, 7, 6, 5, 4, 3, 2, 1],
            4 => &[1, 2, 3, 4, 5, 6, 7, 8, 9],
            _ => &[6, 5, 4, 7, 8, 9, 3, 2, 1],
        };
        let zlib = levels.iter().map(|&level| Encoder::Zlib { level });
        let gnu = levels.iter().map(|&level| Encoder::GnuGzip { level });
        if self.os == OS_UNIX {
            out.extend(gnu.chain(zlib));
        } else {
            out.extend(zlib.chain(gnu));
        }
        out
    }
}

/// Block sizes a pgzip stream could have: the uncompressed length up to each of its first
/// sync markers (the first block's end, unless a marker is a chance byte pattern).
fn pgzip_block_sizes(deflate: &[u8]) -> Vec<u32> {
    let mut sizes = Vec::new();
    let markers = deflate.windows(4).enumerate().filter(|(_, w)| *w == SYNC_MARKER).map(|(i, _)| i + 4);
    for end in markers.take(MAX_MARKERS_PROBED) {
        let Some(len) = inflated_len(&deflate[..end]) else { continue };
        if len > TAIL_SIZE as u64 && len <= u64::from(MAX_BLOCK_SIZE) && !sizes.contains(&(len as u32)) {
            sizes.push(len as u32);
        }
    }
    sizes
}

/// How many bytes the start of a raw deflate stream decodes to, if it decodes.
fn inflated_len(prefix: &[u8]) -> Option<u64> {
    let mut decoder = flate2::read::DeflateDecoder::new(prefix);
    let mut sink = [0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        match decoder.read(&mut sink) {
            Ok(0) => return Some(total),
            Ok(n) => {
                total += n as u64;
                if total > u64::from(MAX_BLOCK_SIZE) {
                    return None;
                }
            }
            // A prefix ends mid-stream; what decoded so far is the answer.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Some(total),
            Err(_) => return None,
        }
    }
}

/// Re-encodes `input` with `descriptor` and compares with `blob` as it goes.
fn reproduces(descriptor: &Descriptor, input: impl Read, blob: impl Read) -> Result<bool> {
    let mut cmp = Comparer { blob, mismatch: false, buf: Vec::new() };
    match descriptor.encode(input, &mut cmp) {
        Ok(_) => {}
        Err(_) if cmp.mismatch => return Ok(false),
        Err(e) => return Err(e),
    }
    // Equal so far; the blob must end here too.
    let mut extra = [0u8; 1];
    Ok(cmp.blob.read(&mut extra).ctx(|| "reading blob".into())? == 0)
}

/// A `Write` that checks its input against a reader and fails at the first difference,
/// which aborts the encoder early.
struct Comparer<R> {
    blob: R,
    mismatch: bool,
    buf: Vec<u8>,
}

impl<R: Read> Write for Comparer<R> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.resize(data.len(), 0);
        let mut filled = 0;
        while filled < data.len() {
            let n = self.blob.read(&mut self.buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled < data.len() || self.buf[..] != *data {
            self.mismatch = true;
            return Err(Error::malformed("blob", "differs from the re-encoding").into_io());
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        (0..len as u32).flat_map(|i| format!("line {} of {}\n", i % 1000, i / 7).into_bytes()).take(len).collect()
    }

    fn descriptors() -> Vec<Descriptor> {
        vec![
            Descriptor { encoder: Encoder::Pgzip { block_size: UMOCI_BLOCK_SIZE }, header: GzipHeader::klauspost_default() },
            Descriptor { encoder: Encoder::Pgzip { block_size: 100_000 }, header: GzipHeader::klauspost_default() },
            Descriptor { encoder: Encoder::KlauspostGzip, header: GzipHeader::klauspost_default() },
            Descriptor { encoder: Encoder::GoGzip { release: GoRelease::Go1_19 }, header: GzipHeader::go_stdlib_default() },
            Descriptor {
                encoder: Encoder::GoGzip { release: GoRelease::Go1_19 },
                header: GzipHeader { name: Some("layer.tar".into()), ..GzipHeader::plain(1_700_000_000, 0, 3) },
            },
            Descriptor { encoder: Encoder::GoGzip { release: GoRelease::Go1_27 }, header: GzipHeader::go_stdlib_default() },
            Descriptor {
                encoder: Encoder::GoGzip { release: GoRelease::Go1_27 },
                header: GzipHeader { name: Some("layer.tar".into()), ..GzipHeader::plain(1_700_000_000, 0, 3) },
            },
            Descriptor { encoder: Encoder::Zlib { level: 9 }, header: GzipHeader::plain(0, 2, 3) },
            Descriptor { encoder: Encoder::Zlib { level: 3 }, header: GzipHeader::plain(0, 0, 3) },
        ]
    }

    #[test]
    fn every_encoder_is_recognised() {
        let data = sample(700_000);
        for d in descriptors() {
            let blob = d.encode_to_vec(&data).unwrap();
            let found = fingerprint(&blob, &data).unwrap_or_else(|| panic!("{d:?} not recognised"));
            // Different descriptors may produce the same bytes; what matters is that it does.
            assert_eq!(found.encode_to_vec(&data).unwrap(), blob, "{d:?} -> {found:?}");
            // These write bytes no other encoder writes on this input.
            if matches!(d.encoder, Encoder::Pgzip { block_size: 100_000 } | Encoder::GoGzip { .. }) {
                assert_eq!(found, d);
            }
        }
    }

    #[test]
    fn tiny_and_empty_inputs_are_recognised() {
        for data in [&b""[..], b"x", b"hello hello hello"] {
            for d in descriptors() {
                let blob = d.encode_to_vec(data).unwrap();
                let found = fingerprint(&blob, data).unwrap_or_else(|| panic!("{d:?} on {data:?}"));
                assert_eq!(found.encode_to_vec(data).unwrap(), blob);
            }
        }
    }

    #[test]
    fn foreign_or_damaged_blobs_are_none() {
        let data = sample(100_000);
        // Stored blocks only: no encoder we model writes that for compressible data.
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
        e.write_all(&data).unwrap();
        assert_eq!(fingerprint(&e.finish().unwrap(), &data), None);
        let mut blob = descriptors()[0].encode_to_vec(&data).unwrap();
        assert_eq!(fingerprint(&blob, &data[1..]), None);
        let mid = blob.len() / 2;
        blob[mid] ^= 1;
        assert_eq!(fingerprint(&blob, &data), None);
        blob.truncate(mid);
        assert_eq!(fingerprint(&blob, &data), None);
    }

    proptest::proptest! {
        #[test]
        fn hostile_blobs_never_panic(blob in proptest::collection::vec(proptest::num::u8::ANY, 0..2000), seed in 0u8..4) {
            let mut blob = blob;
            // Make some of them look like gzip so the deeper paths run.
            if seed > 0 && blob.len() >= 10 {
                blob[..10].copy_from_slice(&GzipHeader::klauspost_default().to_bytes().unwrap());
            }
            if seed > 1 && blob.len() >= 24 {
                let n = blob.len();
                blob[n - 14..n - 8].copy_from_slice(&PGZIP_END);
            }
            let _ = fingerprint(&blob, b"some data");
        }
    }
}
