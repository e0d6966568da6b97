//! kill -9 at random points of applies into a device's store that holds other images: the
//! store stays valid, and the next apply leaves nothing of the killed ones behind.

mod common;

use std::collections::HashSet;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::*;
use fleetdelta::image::Layout;
use fleetdelta::layer::Compression;
use fleetdelta::{diff, DiffOptions, Level, Silent};

const KILLS: usize = 50;

fn apply_cmd(store: &Path, delta: &Path, tag: &str) -> Command {
    let mut cmd = fleetdelta();
    cmd.args(["apply", "--quiet"])
        .arg(format!("oci:{}:current", store.display()))
        .arg(format!("oci:{}", delta.display()))
        .arg(format!("oci:{}:{tag}", store.display()));
    cmd
}

/// Checks the store: `index.json` parses, every image it names loads with every blob
/// matching its digest, and `keep` and `current` are what they were.
fn check_store(store: &Path, keep: &[Vec<u8>], current: &[Vec<u8>], context: &str) {
    let layout = Layout::open(store).unwrap_or_else(|e| panic!("{context}: {e}"));
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(store.join("index.json")).unwrap()).unwrap_or_else(|e| panic!("{context}: index.json: {e}"));
    for entry in index["manifests"].as_array().unwrap() {
        let tag = entry["annotations"]["org.opencontainers.image.ref.name"].as_str().unwrap();
        let image = layout.load_image(Some(tag)).unwrap_or_else(|e| panic!("{context}: image {tag}: {e}"));
        for l in &image.layers {
            layout.verify_blob(&l.blob, tag).unwrap_or_else(|e| panic!("{context}: image {tag}: {e}"));
        }
    }
    assert_eq!(layer_tars(store, Some("keep")), keep, "{context}: image keep changed");
    assert_eq!(layer_tars(store, Some("current")), current, "{context}: image current changed");
}

/// The blobs `index.json` names: manifests, their configs and layers (hex digests).
fn referenced_blobs(store: &Path) -> HashSet<String> {
    let hex = |d: &serde_json::Value| d["digest"].as_str().unwrap().trim_start_matches("sha256:").to_string();
    let index: serde_json::Value = serde_json::from_slice(&fs::read(store.join("index.json")).unwrap()).unwrap();
    let mut found = HashSet::new();
    for m in index["manifests"].as_array().unwrap() {
        let manifest: serde_json::Value = serde_json::from_slice(&fs::read(store.join("blobs/sha256").join(hex(m))).unwrap()).unwrap();
        found.insert(hex(m));
        found.insert(hex(&manifest["config"]));
        found.extend(manifest["layers"].as_array().unwrap().iter().map(hex));
    }
    found
}

/// Checks that nothing of a killed apply is left: no staging directory, no commit journal,
/// no blob that `index.json` does not name.
fn check_no_leftovers(store: &Path, context: &str) {
    let hidden: Vec<String> =
        fs::read_dir(store).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with('.')).collect();
    assert!(hidden.is_empty(), "{context}: left behind: {hidden:?}");
    let referenced = referenced_blobs(store);
    let orphans: Vec<String> = fs::read_dir(store.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !referenced.contains(n))
        .collect();
    assert!(orphans.is_empty(), "{context}: blobs nothing names: {orphans:?}");
}

#[test]
fn kill_9_at_random_points_of_applies_leaves_a_valid_store_and_no_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base: Tree = (0..40).map(|i| (format!("base/{i}"), file(text(i, 50_000)))).collect();
    let app: Tree = (0..40).map(|i| (format!("app/{i}"), file(text(100 + i, 60_000)))).collect();
    let mut app2 = app.clone();
    for i in [3, 9, 21] {
        if let Some(Node::File { data, .. }) = app2.get_mut(&format!("app/{i}")) {
            data.splice(1000..1100, text(900 + i as u64, 400));
        }
    }
    app2.insert("app/new".into(), file(text(77, 500_000)));
    let other: Tree = [("other/file".to_string(), file(text(5, 30_000)))].into();
    write_image(&d.join("s"), "latest", &[layer_tar(&base), layer_tar(&app)], Compression::Gzip);
    write_image(&d.join("t"), "latest", &[layer_tar(&base), layer_tar(&app2)], Compression::Gzip);
    diff(&oci(&d.join("s")), &oci(&d.join("t")), &oci(&d.join("delta")), &DiffOptions { level: Level::Fast, ..Default::default() }, &Silent).unwrap();
    let store = d.join("store");
    write_image(&store, "keep", &[layer_tar(&other)], Compression::Gzip);
    fleetdelta::Transfer::new(Default::default()).unwrap().copy(&oci(&d.join("s")), &oci_tag(&store, "current"), &Silent).unwrap();
    let (keep, current) = (layer_tars(&store, Some("keep")), layer_tars(&store, Some("current")));

    // How long one apply takes here: the kills land anywhere in that span.
    let started = Instant::now();
    run(&mut apply_cmd(&store, &d.join("delta"), "timing"));
    let span = started.elapsed();
    check_no_leftovers(&store, "after a clean apply");

    let mut seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("seed {seed}, one apply takes {span:?}");
    let mut killed_mid_way = 0;
    for i in 0..KILLS {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = span.mul_f64((seed % 1000) as f64 / 1000.0);
        let tag = format!("next-{i}");
        let mut child = apply_cmd(&store, &d.join("delta"), &tag).spawn().unwrap();
        std::thread::sleep(delay);
        let finished = child.try_wait().unwrap().is_some();
        let _ = child.kill();
        child.wait().unwrap();
        if !finished {
            killed_mid_way += 1;
        }
        let context = format!("kill {i} after {delay:?}");
        check_store(&store, &keep, &current, &context);
        // The next apply cleans up after the killed one, and succeeds.
        run(&mut apply_cmd(&store, &d.join("delta"), "next"));
        check_no_leftovers(&store, &context);
        assert_same_tagged_image(&d.join("t"), None, &store, Some("next"));
        check_store(&store, &keep, &current, &context);
    }
    assert!(killed_mid_way >= KILLS / 2, "only {killed_mid_way} of {KILLS} applies were killed before they finished");
}
