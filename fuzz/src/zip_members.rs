//! The `zip_members` target's checks, shared with `tests/regression.rs`, which replays
//! `regressions/zip_members/` under `cargo test`.

use fleetdelta::diff::zip_members::find;
use fleetdelta::format::plan::{validate_members, Member};
use fleetdelta::layer::members::expand;

const LIMIT: u64 = 64 << 20;

fn check_members(zip: &[u8], members: &[Member]) {
    validate_members(members, "fuzz").expect("find lists valid members");
    for m in members {
        assert!(m.offset + m.compressed_len <= zip.len() as u64, "member beyond its zip");
    }
    let mut out = Vec::new();
    let len = expand(zip, members, &mut out, LIMIT, "fuzz").expect("what find lists, expand accepts");
    assert_eq!(len, out.len() as u64);
}

/// The target's checks on one input (a u16 split point, then the target zip and the source
/// zip): `find` returns, and every member it lists is valid, inside its zip, and expands as
/// the applier will. Returns whether `data` is an input of the target at all.
pub fn check(data: &[u8]) -> bool {
    if data.len() < 2 {
        return false;
    }
    let split = usize::from(u16::from_le_bytes([data[0], data[1]])).min(data.len() - 2);
    let (target, source) = data[2..].split_at(split);
    let found = find(target, source);
    let target_members: Vec<Member> = found.target.iter().map(|m| m.member).collect();
    check_members(target, &target_members);
    check_members(source, &found.source);
    true
}
