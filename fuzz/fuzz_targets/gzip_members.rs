//! The applier expands gzip members and deflate streams of source layers where a delta says
//! they are, and the differ inflates any gzip file or zip entry it finds in a layer: with
//! arbitrary layer bytes and member lists, both must answer (an expanded tar or an error)
//! without panicking and within the size limit; whatever `inflate` accepts, `expand`
//! accepts with the same contents.
#![no_main]

use fleetdelta::format::plan::{validate_members, Member, Wrapping};
use fleetdelta::layer::members::{expand, inflate};
use libfuzzer_sys::fuzz_target;

const LIMIT: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    // Leading triples of u16 (offset, compressed length, raw length) until a zero triple,
    // then the layer bytes. The top bit of the compressed length marks a deflate stream.
    let mut members = Vec::new();
    let mut rest = data;
    while rest.len() >= 6 && members.len() < 8 {
        let f = |i: usize| u64::from(u16::from_le_bytes([rest[i], rest[i + 1]]));
        let (offset, compressed_len, raw_len) = (f(0), f(2), f(4));
        rest = &rest[6..];
        if offset == 0 && compressed_len == 0 && raw_len == 0 {
            break;
        }
        let wrapping = if compressed_len & 0x8000 != 0 { Wrapping::Deflate } else { Wrapping::Gzip };
        members.push(Member { offset, compressed_len: compressed_len & 0x7fff, raw_len, wrapping });
    }
    let layer = rest;
    if validate_members(&members, "fuzz").is_ok() {
        let mut out = Vec::new();
        if let Ok(len) = expand(layer, &members, &mut out, LIMIT, "fuzz") {
            assert_eq!(len, out.len() as u64);
            assert!(len <= LIMIT);
        }
    }
    for wrapping in [Wrapping::Gzip, Wrapping::Deflate] {
        if let Some(raw) = inflate(layer, wrapping, LIMIT) {
            let m = [Member { offset: 0, compressed_len: layer.len() as u64, raw_len: raw.len() as u64, wrapping }];
            let mut out = Vec::new();
            expand(layer, &m, &mut out, LIMIT, "fuzz").expect("what inflate accepts, expand accepts");
            assert_eq!(out, raw);
        }
    }
});
