//! The inputs that once crashed, hung or exhausted memory in the fuzz targets
//! (`fuzz/regressions/<target>/`), replayed under `cargo test` with the targets' own checks:
//! each must now answer within the limits. `tools/test` also replays them on the fuzz
//! binaries themselves (libFuzzer's timeout and RSS limit); this keeps them in every test run.

#[path = "../fuzz/src/corrections.rs"]
#[allow(dead_code)] // shared with the fuzz crate: the seed generator uses more of it
mod corrections;
#[path = "../fuzz/src/zip_members.rs"]
mod zip_members;

use std::fs;
use std::path::{Path, PathBuf};

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

/// Replays every regression of `target` through its checks (`check` panics on a violation,
/// after the input is named here); each must be an input of the target.
fn replay(target: &str, check: fn(&[u8]) -> bool) {
    for path in inputs(target) {
        eprintln!("replaying {}", path.display());
        assert!(check(&fs::read(&path).unwrap()), "{}: not an input of the {target} target", path.display());
    }
}

/// `fuzz/fuzz_targets/corrections.rs`: `encode` answers; what it writes has the lengths
/// asked for; an intact stream rebuilds its blob.
#[test]
fn corrections_regressions_answer() {
    replay("corrections", corrections::check);
}

/// `fuzz/fuzz_targets/zip_members.rs`: every member `find` lists lies inside its zip, does
/// not overlap the others, and expands as the applier will.
#[test]
fn zip_members_regressions_answer() {
    replay("zip_members", zip_members::check);
}
