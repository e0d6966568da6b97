//! The differ analyses gzip blobs that no exact encoder reproduces
//! (`layer::corrected::analyze`), and blobs come from registries, whoever pushed them. With
//! arbitrary bytes, `analyze` must answer (a correction stream, `Unusable`, or an error)
//! without panicking, hanging or allocating beyond its windows; and a stream it writes must
//! rebuild the blob byte for byte from the blob's own tar, through `encode`, as the applier
//! will.
//!
//! Input: one mode byte, then the rest. Mode 0: the rest is the blob. Mode 1: the rest is a
//! raw deflate stream, framed by the harness with a gzip header and, when it inflates, its
//! true trailer (so that analysis goes deep on mutated deflate bits). Mode 2: the rest,
//! gzip-compressed by flate2 (zlib-rs) at the level its first byte picks.
#![no_main]

use std::io::{Read, Write};

use fleetdelta::layer::corrected::{analyze, encode, Outcome};
use libfuzzer_sys::fuzz_target;

/// Largest tar the harness inflates (an 8 KiB input inflates to at most about 8 MiB).
const MAX_TAR: u64 = 16 << 20;

fn inflate(mut r: impl Read) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    r.by_ref().take(MAX_TAR).read_to_end(&mut out).ok()?;
    Some(out)
}

fn framed(deflate: &[u8]) -> Vec<u8> {
    let mut blob = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
    blob.extend_from_slice(deflate);
    match inflate(flate2::read::DeflateDecoder::new(deflate)) {
        Some(tar) => {
            blob.extend_from_slice(&crc32fast::hash(&tar).to_le_bytes());
            blob.extend_from_slice(&(tar.len() as u32).to_le_bytes());
        }
        None => blob.extend_from_slice(&[0; 8]),
    }
    blob
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let blob = match mode % 3 {
        0 => rest.to_vec(),
        1 => framed(rest),
        _ => {
            let Some((&level, tar)) = rest.split_first() else { return };
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(u32::from(level % 10)));
            e.write_all(tar).expect("flate2 writes to a Vec");
            e.finish().expect("flate2 writes to a Vec")
        }
    };
    let mut stream = Vec::new();
    let Ok(Outcome::Written(analysis)) = analyze(&blob[..], 3, u64::MAX, &mut stream) else { return };
    let tar = inflate(flate2::read::GzDecoder::new(&blob[..])).expect("a blob analyze wrote corrections for inflates");
    assert_eq!(analysis.tar_bytes, tar.len() as u64, "analyze counted another tar length");
    let mut out = Vec::new();
    let n = encode(&analysis.header, 3, blob.len() as u64, &tar[..], &stream[..], &mut out).expect("a stream analyze wrote rebuilds its blob");
    assert_eq!(n, tar.len() as u64);
    assert!(out == blob, "the stream analyze wrote rebuilds another blob");
});
