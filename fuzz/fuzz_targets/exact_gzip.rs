//! The differ fingerprints registry blobs, which anyone can push: a gzip header parser and a
//! fingerprinter fed arbitrary bytes must answer (a descriptor or none) without panicking,
//! and a descriptor found must reproduce the blob.
#![no_main]

use fleetdelta::layer::exact::{fingerprint, GzipHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = GzipHeader::parse(data);
    // Split at the first NUL: a blob, then what it claims to decompress to.
    let Some(split) = data.iter().position(|b| *b == 0) else { return };
    let (blob, uncompressed) = (&data[..split], &data[split + 1..]);
    if let Some(descriptor) = fingerprint(blob, uncompressed) {
        assert_eq!(descriptor.encode_to_vec(uncompressed).expect("a found descriptor encodes"), blob);
    }
});
