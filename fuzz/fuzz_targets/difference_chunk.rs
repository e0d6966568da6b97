//! The difference chunk decoder (raw LZMA2, `fleetdelta::format::lzma`) on arbitrary frames and
//! declared lengths: it must never panic, never write past the declared length, and accept a
//! frame only when it decodes to exactly that many bytes. Its own output, compressed again,
//! must decode to the same bytes.
#![no_main]

use fleetdelta::format::lzma;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u16, Vec<u8>)| {
    let (declared, frame) = input;
    // Up to 64 KiB declared: enough for every LZMA2 chunk form, small enough to run fast.
    let raw_len = u64::from(declared);
    let mut out = vec![0xAA; 7];
    if lzma::decompress(&frame, raw_len, &mut out).is_ok() {
        assert_eq!(out.len() as u64, raw_len, "accepted with another length");
        let again = lzma::compress(&out, lzma::Effort::Fast).expect("compressing decoded bytes");
        let mut round = Vec::new();
        lzma::decompress(&again, raw_len, &mut round).expect("decoding our own stream");
        assert!(round == out, "a round trip changed the bytes");
    }
});
