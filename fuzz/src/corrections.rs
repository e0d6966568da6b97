//! Inputs of the `corrections` target (`layer::corrected::encode`), shared with the seed
//! generator and with `examples/corrections_raw.rs`, which turns a seeded input into the
//! raw input of the same case.
//!
//! An input is one mode byte, then
//!
//! * mode 0, 1, 2 (raw): u16 LE tar length, u16 LE deflate length (the blob's length
//!   without header and trailer), the tar, then the correction stream. Mode 0: the rest is
//!   the records after the stream's prefix (magic, engine, target layer), which the
//!   harness writes, then zstd-compresses it all; mode 1: the rest is the whole
//!   decompressed stream, zstd-compressed by the harness; mode 2: the rest is the stored
//!   (zstd) stream itself.
//! * mode 3 (seeded): encoder byte, u16 LE tar length, the tar, then edits. The harness
//!   compresses the tar with the chosen encoder, writes the blob's correction stream with
//!   `analyze`, applies the edits (4 bytes each: kind, u16 LE position, value) to the
//!   decompressed stream or the tar, and re-compresses the stream.

use std::io::Write;

use fleetdelta::layer::corrected::{analyze, encode, Outcome, CORRECTIONS_MAGIC, CORRECTION_ENGINE};
use fleetdelta::layer::exact::{Descriptor, Encoder, GzipHeader};

/// The target layer every case is for.
pub const TARGET_LAYER: u32 = 3;
/// Most edits the seeded mode applies.
pub const MAX_EDITS: usize = 64;

/// One call of `encode`, and what it must give.
#[derive(Debug)]
pub struct Case {
    /// The gzip header of the layer plan.
    pub header: GzipHeader,
    /// The blob length of the target manifest.
    pub blob_len: u64,
    /// The tar `encode` reads.
    pub tar: Vec<u8>,
    /// The correction stream as stored (zstd).
    pub stream: Vec<u8>,
    /// The stream decompressed, when the harness knows it (not in mode 2).
    pub records: Option<Vec<u8>>,
    /// Seeded mode, nothing edited: the blob `encode` must rebuild.
    pub expect: Option<Vec<u8>>,
}

fn u16_at(data: &[u8], i: usize) -> usize {
    usize::from(u16::from_le_bytes([data[i], data[i + 1]]))
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The correction stream's prefix, as the differ writes it for [`TARGET_LAYER`].
pub fn prefix() -> Vec<u8> {
    let mut out = CORRECTIONS_MAGIC.to_vec();
    varint(&mut out, CORRECTION_ENGINE.len() as u64);
    out.extend_from_slice(CORRECTION_ENGINE.as_bytes());
    varint(&mut out, u64::from(TARGET_LAYER));
    out
}

/// The header of raw cases.
pub fn raw_header() -> GzipHeader {
    GzipHeader::plain(0, 0, 3)
}

/// Length of a blob with a [`raw_header`] and `deflate_len` bytes of deflate stream.
pub fn raw_blob_len(deflate_len: u64) -> u64 {
    raw_header().to_bytes().expect("a plain header").len() as u64 + 8 + deflate_len
}

/// The mode-1 input of a case with a [`raw_header`]: `records` is the whole decompressed
/// stream.
pub fn raw_input(deflate_len: u16, tar: &[u8], records: &[u8]) -> Vec<u8> {
    let tar_len = u16::try_from(tar.len()).expect("a raw tar has at most 65535 bytes");
    [&[1][..], &tar_len.to_le_bytes(), &deflate_len.to_le_bytes(), tar, records].concat()
}

/// The case an input describes, if any.
pub fn case(data: &[u8]) -> Option<Case> {
    let (&mode, rest) = data.split_first()?;
    match mode % 4 {
        3 => seeded(rest),
        m => raw(m, rest),
    }
}

fn raw(mode: u8, data: &[u8]) -> Option<Case> {
    if data.len() < 4 {
        return None;
    }
    let (tar_len, deflate_len) = (u16_at(data, 0).min(data.len() - 4), u16_at(data, 2) as u64);
    let (tar, rest) = data[4..].split_at(tar_len);
    let records = match mode {
        0 => Some([&prefix()[..], rest].concat()),
        1 => Some(rest.to_vec()),
        _ => None,
    };
    let stream = match &records {
        Some(r) => zstd::bulk::compress(r, 1).expect("zstd compresses"),
        None => rest.to_vec(),
    };
    Some(Case { header: raw_header(), blob_len: raw_blob_len(deflate_len), tar: tar.to_vec(), stream, records, expect: None })
}

/// A gzip blob of `tar` by the encoder `which` picks: flate2 (zlib-rs, which preflate models
/// only approximately) or one of fleetdelta's exact encoders.
pub fn compress(which: u8, tar: &[u8]) -> Vec<u8> {
    let level = 1 + u32::from(which >> 3) % 9;
    let encoder = match which & 7 {
        0..=2 => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
            e.write_all(tar).expect("flate2 writes to a Vec");
            return e.finish().expect("flate2 writes to a Vec");
        }
        3 | 4 => Encoder::Zlib { level: level as u8 },
        5 => Encoder::GnuGzip { level: level as u8 },
        6 => Encoder::KlauspostGzip,
        _ => Encoder::Pgzip { block_size: 16385 },
    };
    Descriptor { encoder, header: GzipHeader::plain(0, 0, 3) }.encode_to_vec(tar).expect("the exact encoders take any input")
}

/// The blob of `tar` by encoder `which` and its correction stream, if `analyze` writes one.
pub fn analysed(which: u8, tar: &[u8]) -> Option<(GzipHeader, Vec<u8>, Vec<u8>)> {
    let blob = compress(which, tar);
    let mut stream = Vec::new();
    match analyze(&blob[..], TARGET_LAYER, u64::MAX, &mut stream).expect("analyze reads and writes Vecs") {
        Outcome::Written(a) => Some((a.header, blob, stream)),
        Outcome::Unusable(_) => None,
    }
}

fn seeded(data: &[u8]) -> Option<Case> {
    if data.len() < 3 {
        return None;
    }
    let which = data[0];
    let tar_len = u16_at(data, 1).min(data.len() - 3);
    let (original_tar, edits) = data[3..].split_at(tar_len);
    let (header, blob, stream) = analysed(which, original_tar)?;
    let original = zstd::decode_all(&stream[..]).expect("analyze writes a zstd stream");
    let (mut records, mut tar) = (original.clone(), original_tar.to_vec());
    for edit in edits.chunks_exact(4).take(MAX_EDITS) {
        let (kind, pos, value) = (edit[0], u16_at(edit, 1), edit[3]);
        match kind % 6 {
            0 if !records.is_empty() => {
                let i = pos % records.len();
                records[i] ^= value;
            }
            1 => records.truncate(pos),
            2 => records.insert(pos.min(records.len()), value),
            3 if !records.is_empty() => {
                records.remove(pos % records.len());
            }
            4 if !tar.is_empty() => {
                let i = pos % tar.len();
                tar[i] ^= value;
            }
            // Move a byte of the stream to its end, so records can be reordered.
            5 if !records.is_empty() => {
                let b = records.remove(pos % records.len());
                records.push(b);
            }
            _ => {}
        }
    }
    let intact = records == original && tar == original_tar;
    let stream = if records == original { stream } else { zstd::bulk::compress(&records, 1).expect("zstd compresses") };
    let blob_len = blob.len() as u64;
    Some(Case { header, blob_len, tar, stream, records: Some(records), expect: intact.then_some(blob) })
}

/// The target's checks on one input: `encode` answers (a blob or an error, never a panic or
/// a hang); a blob it writes has the length asked for and counts the whole tar; an intact
/// stream rebuilds its blob. Returns whether `data` is an input of the target at all.
pub fn check(data: &[u8]) -> bool {
    let Some(case) = case(data) else { return false };
    let mut out = Vec::new();
    let result = encode(&case.header, TARGET_LAYER, case.blob_len, &case.tar[..], &case.stream[..], &mut out);
    if let Ok(n) = result {
        assert_eq!(n, case.tar.len() as u64, "encode counted another tar length");
        assert_eq!(out.len() as u64, case.blob_len, "encode wrote a blob of another length");
    }
    if let Some(blob) = case.expect {
        assert!(result.is_ok() && out == blob, "an intact correction stream does not rebuild its blob: {result:?}");
    }
    true
}
