//! The inputs that once crashed, hung or exhausted memory in the fuzz targets
//! (`fuzz/regressions/<target>/`), replayed under `cargo test` with the targets' own checks:
//! each must now answer within the limits. `tools/test` also replays them on the fuzz
//! binaries themselves (libFuzzer's timeout and RSS limit); this keeps them in every test run.

#[path = "../fuzz/src/corrections.rs"]
#[allow(dead_code)] // shared with the fuzz crate: the seed generator uses more of it
mod corrections;

use std::fs;
use std::path::{Path, PathBuf};

use fleetdelta::diff::zip_members::find;
use fleetdelta::format::plan::{validate_members, Member};
use fleetdelta::layer::corrected::encode;
use fleetdelta::layer::members::expand;

fn inputs(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions").join(target);
    let mut found: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_none_or(|x| x != "md"))
        .collect();
    found.sort();
    assert!(!found.is_empty(), "no regressions in {}", dir.display());
    found
}

/// `fuzz/fuzz_targets/corrections.rs`: `encode` answers; what it writes has the lengths
/// asked for; an intact stream rebuilds its blob.
#[test]
fn corrections_regressions_answer() {
    let paths = inputs("corrections");
    let mut seeded = 0;
    for path in &paths {
        let data = fs::read(path).unwrap();
        let case = corrections::case(&data).unwrap_or_else(|| panic!("{}: not an input of the target", path.display()));
        seeded += case.expect.is_some() as usize;
        let mut out = Vec::new();
        let result = encode(&case.header, corrections::TARGET_LAYER, case.blob_len, &case.tar[..], &case.stream[..], &mut out);
        if let Ok(n) = result {
            assert_eq!(n, case.tar.len() as u64, "{}: encode counted another tar length", path.display());
            assert_eq!(out.len() as u64, case.blob_len, "{}: encode wrote a blob of another length", path.display());
        }
        if let Some(blob) = case.expect {
            assert!(result.is_ok() && out == blob, "{}: an intact correction stream does not rebuild its blob: {result:?}", path.display());
        }
    }
    eprintln!("{} corrections regressions replayed, {seeded} of them seeded", paths.len());
}

/// `fuzz/fuzz_targets/zip_members.rs`: every member `find` lists lies inside its zip, does
/// not overlap the others, and expands as the applier will.
#[test]
fn zip_members_regressions_answer() {
    const LIMIT: u64 = 64 << 20;
    let check = |zip: &[u8], members: &[Member], what: &str| {
        validate_members(members, "regression").unwrap_or_else(|e| panic!("{what}: find lists invalid members: {e}"));
        for m in members {
            assert!(m.offset + m.compressed_len <= zip.len() as u64, "{what}: member beyond its zip");
        }
        let mut out = Vec::new();
        let len = expand(zip, members, &mut out, LIMIT, "regression").unwrap_or_else(|e| panic!("{what}: expand refuses what find lists: {e}"));
        assert_eq!(len, out.len() as u64, "{what}");
    };
    for path in inputs("zip_members") {
        let data = fs::read(&path).unwrap();
        assert!(data.len() >= 2, "{}: too short to be an input of the target", path.display());
        let split = usize::from(u16::from_le_bytes([data[0], data[1]])).min(data.len() - 2);
        let (target, source) = data[2..].split_at(split);
        let found = find(target, source);
        let target_members: Vec<Member> = found.target.iter().map(|m| m.member).collect();
        let what = path.display().to_string();
        check(target, &target_members, &what);
        check(source, &found.source, &what);
    }
}
