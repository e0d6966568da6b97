//! The applier rebuilds gzip blobs that no exact encoder reproduces from their tar and a
//! correction stream carried in the delta (`layer::corrected::encode`), and anyone who can
//! push a delta controls that stream: with an arbitrary tar and correction stream, `encode`
//! must answer (a blob or an error) without panicking, hanging or allocating beyond its
//! chunk limits; a blob it writes has exactly the length asked for and counts the whole
//! tar; and a valid stream (written by `analyze` for a blob of the input's bytes, by flate2
//! or one of fleetdelta's exact encoders) left intact rebuilds that blob exactly. The input
//! format is described in `src/corrections.rs`: raw tar and stream, or a seeded case whose
//! valid stream is then edited. Inputs that once failed it are kept in
//! `regressions/corrections/`, with the preflate-rs fault each found (see the README).
#![no_main]

use fleetdelta_fuzz::corrections::check;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check(data);
});
