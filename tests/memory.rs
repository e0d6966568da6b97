//! The applier's peak memory must not grow with the image: apply deltas of a small and a
//! large image in child processes and compare their peak RSS, as GNU time reports it
//! (Debian's `time` package; `tools/test` installs it).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use fleetdelta::layer::Compression;
use fleetdelta::{diff, DiffOptions, Level, Silent};

/// Source and target images of about `mib` MiB of files, the target with edits spread
/// through every file; then the delta; then the peak RSS of `fleetdelta apply` on it.
fn apply_peak_kib(dir: &Path, mib: usize) -> i64 {
    let files = mib * 4;
    let source: Tree = (0..files).map(|i| (format!("data/{i:05}.bin"), file(text(i as u64, 256 << 10)))).collect();
    let mut target = source.clone();
    for (i, node) in target.values_mut().enumerate() {
        if let Node::File { data, .. } = node {
            let at = (i * 7919) % (data.len() - 200);
            data.splice(at..at + 100, text(i as u64 + 1_000_000, 150));
        }
    }
    let (s, t, d, o) = (dir.join("s"), dir.join("t"), dir.join("d"), dir.join("o"));
    // Plain tar layers: what is measured is the applier's streaming, not an encoder (exact
    // re-encoding's memory is bounded by its block and window sizes; tools/compare reports
    // apply peak RSS on the umoci-built corpus, whose layers are re-encoded exactly).
    write_image(&s, "latest", &[layer_tar(&source)], Compression::None);
    write_image(&t, "latest", &[layer_tar(&target)], Compression::None);
    diff(&oci(&s), &oci(&t), &oci(&d), &DiffOptions { level: Level::Fast, ..Default::default() }, &Silent).unwrap();
    drop((source, target));
    assert!(Path::new("/usr/bin/time").exists(), "this test needs GNU time: apt-get install time");
    let out = Command::new("/usr/bin/time")
        .args(["-f", "peak-rss-kib %M"])
        .arg(env!("CARGO_BIN_EXE_fleetdelta"))
        .args(["apply", "--quiet"])
        .arg(format!("oci:{}", s.display()))
        .arg(format!("oci:{}", d.display()))
        .arg(format!("oci:{}", o.display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_same_image(&t, &o);
    stderr.lines().find_map(|l| l.strip_prefix("peak-rss-kib ")).and_then(|v| v.trim().parse().ok()).unwrap_or_else(|| panic!("no peak RSS in {stderr}"))
}

#[test]
fn apply_peak_memory_does_not_grow_with_image_size() {
    let dir = tempfile::tempdir().unwrap();
    let small = apply_peak_kib(&dir.path().join("small"), 16);
    let large = apply_peak_kib(&dir.path().join("large"), 192);
    eprintln!("peak RSS of apply: {small} KiB for a 16 MiB image, {large} KiB for a 192 MiB image");
    assert!(large < 64 * 1024, "apply of a 192 MiB image peaked at {large} KiB");
    assert!(large < small + 16 * 1024, "peak RSS grew from {small} to {large} KiB with a 12x larger image");
}
