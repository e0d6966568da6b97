//! The differ looks into zip files it finds in layers (jars, wheels), which come from
//! registries and may be crafted: with arbitrary target and source bytes, `find` must return
//! without panicking, and every member it lists must lie inside its zip, not overlap the
//! others, and expand there as the applier will (so a delta never lists what the applier
//! refuses).
#![no_main]

use fleetdelta::diff::zip_members::find;
use fleetdelta::format::plan::{validate_members, Member};
use fleetdelta::layer::members::expand;
use libfuzzer_sys::fuzz_target;

const LIMIT: u64 = 64 << 20;

fn check(zip: &[u8], members: &[Member]) {
    validate_members(members, "fuzz").expect("find lists valid members");
    for m in members {
        assert!(m.offset + m.compressed_len <= zip.len() as u64, "member beyond its zip");
    }
    let mut out = Vec::new();
    let len = expand(zip, members, &mut out, LIMIT, "fuzz").expect("what find lists, expand accepts");
    assert_eq!(len, out.len() as u64);
}

fuzz_target!(|data: &[u8]| {
    // A u16 split point, then the target zip and the source zip.
    if data.len() < 2 {
        return;
    }
    let split = (usize::from(u16::from_le_bytes([data[0], data[1]]))).min(data.len() - 2);
    let (target, source) = data[2..].split_at(split);
    let found = find(target, source);
    let target_members: Vec<Member> = found.target.iter().map(|m| m.member).collect();
    check(target, &target_members);
    check(source, &found.source);
});
