//! The delta format, pinned: deltas written by an earlier build (`tests/fixtures/golden/`,
//! made by `tools/make-golden`) still apply to their sources and give their targets bit for
//! bit, and what `info --json` says of them is unchanged. A damaged one is refused and
//! writes nothing. A change to the format that breaks these is a new format version.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{assert_same_image, fleetdelta, oci, run};
use fleetdelta::image::Layout;
use fleetdelta::{apply, ApplyOptions, Silent};
use serde_json::Value;

/// One golden case: its directory, and its source and target layouts.
fn case(name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("tests/fixtures/golden").join(name);
    if name == "sample" {
        (dir, root.join("corpus/sample/v1"), root.join("corpus/sample/v2"))
    } else {
        (dir.clone(), dir.join("source"), dir.join("target"))
    }
}

/// Every case: uncompressed layers, zlib layers rebuilt exactly, layers rebuilt from
/// preflate's corrections, gzip and zip files inside a layer, umoci's pgzip layers.
const CASES: [&str; 5] = ["plain", "zlib", "corrected", "members", "sample"];

#[test]
fn golden_deltas_apply_bit_for_bit_and_say_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    for name in CASES {
        let (dir, source, target) = case(name);
        let out = tmp.path().join(name);
        let report = apply(&oci(&source), &oci(&dir.join("delta")), &oci(&out), &ApplyOptions::default(), &Silent).unwrap_or_else(|e| panic!("{name}: {e}"));
        let wanted = Layout::open(&target).unwrap().load_image(None).unwrap().manifest.digest;
        assert_eq!(report.written_manifest, wanted, "{name}: the target's manifest, bit for bit");
        assert_same_image(&target, &out);

        let info: Value = serde_json::from_slice(&run(fleetdelta().args(["info", "--json", &format!("oci:{}", dir.join("delta").display())])).stdout).unwrap();
        common::schema::assert_valid("info", &info);
        let committed: Value = serde_json::from_slice(&fs::read(dir.join("info.json")).unwrap()).unwrap();
        assert_eq!(info, committed, "{name}: info --json changed");
    }
    // The cases cover what they claim.
    let encodings = |name: &str| -> Vec<String> {
        let info: Value = serde_json::from_slice(&fs::read(case(name).0.join("info.json")).unwrap()).unwrap();
        info["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| format!("{}/{}", l["method"].as_str().unwrap(), l["encoding"]["kind"].as_str().unwrap_or("-")))
            .collect()
    };
    assert!(encodings("corrected").contains(&"patch/corrected".to_string()), "{:?}", encodings("corrected"));
    assert!(encodings("zlib").contains(&"patch/exact".to_string()));
    let members: Value = serde_json::from_slice(&fs::read(case("members").0.join("info.json")).unwrap()).unwrap();
    assert_eq!(members["layers"][1]["stats"]["members"], 2, "a gzip file and a zip entry: {members}");
}

#[test]
fn a_damaged_golden_delta_is_refused_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, source, _) = case("corrected");
    let delta = tmp.path().join("delta");
    copy_dir(&dir.join("delta"), &delta);
    // The largest blob carries a payload: one flipped byte.
    let blobs = delta.join("blobs/sha256");
    let largest = fs::read_dir(&blobs).unwrap().flatten().max_by_key(|e| e.metadata().unwrap().len()).unwrap().path();
    let mut bytes = fs::read(&largest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    fs::write(&largest, bytes).unwrap();
    let out = tmp.path().join("out");
    let err = apply(&oci(&source), &oci(&delta), &oci(&out), &ApplyOptions::default(), &Silent).unwrap_err().to_string();
    assert!(err.contains("digest") || err.contains("sha256"), "{err}");
    assert!(Layout::open(&out).and_then(|l| l.load_image(None)).is_err(), "nothing written");
}

/// Deltas written before `encoding` existed (format version 1 all the same) get the
/// behaviour the format gives them: the source's blob when identical, else the applier's own
/// compression. Plain tars come out bit for bit; gzip layers with the target's content.
#[test]
fn a_delta_without_encoding_applies_as_the_format_says() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["plain", "zlib"] {
        let (dir, source, target) = case(name);
        let delta = tmp.path().join(format!("{name}-delta"));
        copy_dir(&dir.join("delta"), &delta);
        let mut removed = 0;
        common::edit_plan(&delta, |plan| {
            for layer in plan["layers"].as_array_mut().unwrap() {
                removed += layer.as_object_mut().unwrap().remove("encoding").is_some() as usize;
            }
        });
        assert!(removed > 0, "{name}: the golden delta has encodings to remove");
        let out = tmp.path().join(format!("{name}-out"));
        apply(&oci(&source), &oci(&delta), &oci(&out), &ApplyOptions::default(), &Silent).unwrap_or_else(|e| panic!("{name}: {e}"));
        let wanted = Layout::open(&target).unwrap().load_image(None).unwrap();
        let got = Layout::open(&out).unwrap().load_image(None).unwrap();
        assert_eq!(got.config.diff_ids, wanted.config.diff_ids, "{name}: the target's content");
        if name == "plain" {
            assert_eq!(got.manifest.digest, wanted.manifest.digest, "plain tars: the target bit for bit");
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), target).unwrap();
        }
    }
}
