//! The differ looks into zip files it finds in layers (jars, wheels), which come from
//! registries and may be crafted: with arbitrary target and source bytes, `find` must return
//! without panicking, and every member it lists must lie inside its zip, not overlap the
//! others, and expand there as the applier will (so a delta never lists what the applier
//! refuses).
#![no_main]

use fleetdelta_fuzz::zip_members::check;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check(data);
});
