//! The whole applier on a real delta whose patch layer carries fuzz input, with every digest
//! re-sealed so that the input reaches the payload reader and the patch executor. `apply` may
//! fail (it nearly always will: the rebuilt layer's diff_id is checked) but must not panic.
//!
//! Input: one mode byte, then the payload. Mode bit 0 clear: the rest is a patch record stream,
//! compressed here as the differ would. Set: the rest is the payload as stored (a zstd stream
//! of records), to reach the outer stream's decoder too.
#![no_main]

use std::sync::OnceLock;

use fleetdelta::{apply, ApplyOptions, Silent};
use fleetdelta_fuzz::{oci, scratch_dir, Fixture};
use libfuzzer_sys::fuzz_target;

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| Fixture::build().expect("building the fuzz fixture"))
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else { return };
    let compressed;
    let payload = if mode & 1 == 0 {
        compressed = zstd::bulk::compress(rest, 1).expect("compressing in memory");
        &compressed[..]
    } else {
        rest
    };
    let fixture = fixture();
    let work = scratch_dir().expect("creating a scratch directory");
    let delta = work.path().join("delta");
    fixture.write_delta_with_payload(&delta, payload).expect("writing the delta");
    // Small limits keep each run short: the fixture's layers are a few KiB.
    let options = ApplyOptions { max_layer_bytes: 16 << 20, jobs: 1, ..ApplyOptions::default() };
    let result = apply(&fixture.source, &oci(&delta).unwrap(), &oci(&work.path().join("out")).unwrap(), &options, &Silent);
    if mode & 1 == 0 && rest == &fixture.records[..] {
        result.expect("the fixture's own patch applies");
    }
});
