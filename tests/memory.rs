//! Peak memory must not grow with the image, the applier's on the device nor the differ's on
//! the builder: apply deltas of, and diff, a small and a large image in child processes and
//! compare their peak RSS, as GNU time reports it (Debian's `time` package; `tools/test`
//! installs it).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use fleetdelta::format::plan::{Encoding, Method, Wrapping};
use fleetdelta::layer::exact::pgzip::UMOCI_BLOCK_SIZE;
use fleetdelta::layer::exact::{Descriptor, Encoder, GzipHeader};
use fleetdelta::layer::Compression;
use fleetdelta::{diff, info, DiffOptions, Level, Silent};

/// How the test images store their layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layers {
    /// Plain tars: the applier's streaming alone.
    Plain,
    /// umoci's pgzip blobs re-encoded exactly, and in every 16 files a gzip file (GNU gzip
    /// -9n) and a zip (Python's `zipfile`, four deflated entries) expanded and repacked
    /// exactly.
    ExactGzip,
    /// pigz blobs (which no exact encoder reproduces) rebuilt from their tar and preflate
    /// correction data.
    Corrected,
}

/// File `i` of a target image: the source's with 100 bytes at a spot of its own replaced
/// by 150 new ones, so the differ must code it against its partner.
fn edited(i: usize, mut data: Vec<u8>) -> Vec<u8> {
    let at = (i * 7919) % (data.len() - 200);
    data.splice(at..at + 100, text(i as u64 + 1_000_000, 150));
    data
}

/// Source and target images of about `mib` MiB of files, the target with edits spread
/// through every file; then the delta; then the peak RSS of `fleetdelta apply` on it.
fn apply_peak_kib(dir: &Path, mib: usize, layers: Layers) -> i64 {
    let files = mib * 4;
    let gnu9 = Descriptor { encoder: Encoder::GnuGzip { level: 9 }, header: GzipHeader::plain(0, 2, 3) };
    let zipped = |data: Vec<u8>| python_zip(&data.chunks(64 << 10).enumerate().map(|(k, c)| (format!("part{k}.txt"), c.to_vec(), true)).collect::<Vec<_>>());
    let member = |i: usize, data: Vec<u8>| match (layers, i % 16) {
        (Layers::ExactGzip, 0) => gnu9.encode_to_vec(&data).unwrap(),
        (Layers::ExactGzip, 8) => zipped(data),
        _ => data,
    };
    let contents: Vec<Vec<u8>> = (0..files).map(|i| text(i as u64, 256 << 10)).collect();
    let source: Tree = contents.iter().enumerate().map(|(i, c)| (format!("data/{i:05}.bin"), file(member(i, c.clone())))).collect();
    let target: Tree = contents.into_iter().enumerate().map(|(i, data)| (format!("data/{i:05}.bin"), file(member(i, edited(i, data))))).collect();
    let (s, t, d, o) = (dir.join("s"), dir.join("t"), dir.join("d"), dir.join("o"));
    match layers {
        Layers::Plain => {
            write_image(&s, "latest", &[layer_tar(&source)], Compression::None);
            write_image(&t, "latest", &[layer_tar(&target)], Compression::None);
        }
        Layers::ExactGzip => {
            let pgzip = Descriptor { encoder: Encoder::Pgzip { block_size: UMOCI_BLOCK_SIZE }, header: GzipHeader::klauspost_default() };
            write_image_with(&s, "latest", &[layer_tar(&source)], Compression::Gzip, false, |tar| pgzip.encode_to_vec(tar).unwrap());
            write_image_with(&t, "latest", &[layer_tar(&target)], Compression::Gzip, false, |tar| pgzip.encode_to_vec(tar).unwrap());
        }
        Layers::Corrected => {
            let pigz = |tar: &[u8]| filter(tool("pigz").arg("-6n").arg("-c"), tar);
            write_image_with(&s, "latest", &[layer_tar(&source)], Compression::Gzip, false, pigz);
            write_image_with(&t, "latest", &[layer_tar(&target)], Compression::Gzip, false, pigz);
        }
    }
    // The default level: gzip and zip files are expanded only above the fast level.
    let level = if layers == Layers::Plain { Level::Fast } else { Level::Default };
    let report = diff(&oci(&s), &oci(&t), &oci(&d), &DiffOptions { level, ..Default::default() }, &Silent).unwrap();
    if layers == Layers::Corrected {
        let plan = &report.plan.layers[0];
        assert!(matches!(plan.encoding, Some(Encoding::Corrected { .. })), "{:?}", plan.encoding);
    }
    if layers == Layers::ExactGzip {
        let plan = &report.plan.layers[0];
        assert!(matches!(plan.encoding, Some(Encoding::Exact { .. })), "{:?}", plan.encoding);
        let gzip = plan.members.iter().filter(|m| m.member.wrapping == Wrapping::Gzip).count();
        let deflate = plan.members.len() - gzip;
        assert_eq!(gzip, files.div_ceil(16), "every gzip file is repacked");
        assert!(deflate >= files / 16, "every zip has a changed entry repacked: {deflate}");
    }
    drop((source, target));
    let peak = peak_kib(
        Command::new(env!("CARGO_BIN_EXE_fleetdelta"))
            .args(["apply", "--quiet"])
            .arg(format!("oci:{}", s.display()))
            .arg(format!("oci:{}", d.display()))
            .arg(format!("oci:{}", o.display())),
    );
    assert_same_image(&t, &o);
    peak
}

/// The peak RSS (KiB) of `cmd` (its program, arguments and added environment) run under GNU
/// time; it must succeed.
fn peak_kib(cmd: &mut Command) -> i64 {
    assert!(Path::new("/usr/bin/time").exists(), "this test needs GNU time: apt-get install time");
    let envs = cmd.get_envs().filter_map(|(k, v)| Some((k, v?)));
    let out = Command::new("/usr/bin/time").args(["-f", "peak-rss-kib %M"]).arg(cmd.get_program()).args(cmd.get_args()).envs(envs).output_bounded();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    stderr.lines().find_map(|l| l.strip_prefix("peak-rss-kib ")).and_then(|v| v.trim().parse().ok()).unwrap_or_else(|| panic!("no peak RSS in {stderr}"))
}

/// Applies deltas of a `small` and a `large` MiB image stored as `layers`, and checks that
/// the large one peaks under 64 MiB and less than 16 MiB above the small one.
fn assert_peak_does_not_grow(layers: Layers, how: &str, small_mib: usize, large_mib: usize) {
    let dir = tempfile::tempdir().unwrap();
    let small = apply_peak_kib(&dir.path().join("small"), small_mib, layers);
    let large = apply_peak_kib(&dir.path().join("large"), large_mib, layers);
    eprintln!("peak RSS of {how}: {small} KiB for a {small_mib} MiB image, {large} KiB for a {large_mib} MiB image");
    assert!(large < 64 * 1024, "apply of a {large_mib} MiB image peaked at {large} KiB");
    assert!(large < small + 16 * 1024, "peak RSS grew from {small} to {large} KiB with a {}x larger image", large_mib / small_mib);
}

#[test]
fn apply_peak_memory_does_not_grow_with_image_size() {
    assert_peak_does_not_grow(Layers::Plain, "apply", 16, 192);
}

#[test]
fn apply_peak_memory_does_not_grow_with_image_size_when_re_encoding_exactly() {
    assert_peak_does_not_grow(Layers::ExactGzip, "an exact apply", 16, 96);
}

#[test]
fn apply_peak_memory_does_not_grow_with_image_size_when_rebuilding_with_corrections() {
    assert_peak_does_not_grow(Layers::Corrected, "an apply with corrections", 16, 64);
}

/// Worker threads of the measured diffs, so that the bound holds on machines of any size.
const DIFF_THREADS: &str = "2";

/// Largest peak RSS of `fleetdelta diff` with [`DIFF_THREADS`] threads on the images of
/// [`diff_peak_memory_does_not_grow_with_image_size`] (README, "How it works"): the fixed
/// part, and per thread one chunk with its prefix, its frame and zstd's tables at the fast
/// level.
const DIFF_PEAK_BOUND_KIB: i64 = 64 * 1024;

/// Source and target images of about `mib` MiB of text in one plain layer, every target file
/// edited (so the encoder codes each against its partner and reads both images whole, and
/// the applier is not involved); then the peak RSS of `fleetdelta diff` between them.
fn diff_peak_kib(dir: &Path, mib: usize) -> i64 {
    let (s, t, d) = (dir.join("s"), dir.join("t"), dir.join("d"));
    {
        let contents: Vec<Vec<u8>> = (0..mib * 4).map(|i| text(i as u64, 256 << 10)).collect();
        let source: Tree = contents.iter().enumerate().map(|(i, c)| (format!("data/{i:05}.txt"), file(c.clone()))).collect();
        write_image(&s, "latest", &[layer_tar(&source)], Compression::None);
        drop(source);
        let target: Tree = contents.into_iter().enumerate().map(|(i, data)| (format!("data/{i:05}.txt"), file(edited(i, data)))).collect();
        write_image(&t, "latest", &[layer_tar(&target)], Compression::None);
    }
    let peak = peak_kib(
        Command::new(env!("CARGO_BIN_EXE_fleetdelta"))
            .env("RAYON_NUM_THREADS", DIFF_THREADS)
            .args(["diff", "--quiet", "--level", "fast"])
            .arg(format!("oci:{}", s.display()))
            .arg(format!("oci:{}", t.display()))
            .arg(format!("oci:{}", d.display())),
    );
    // The delta is a real one: every file was coded against its partner, not carried.
    let layer = &info(&oci(&d)).unwrap().layers[0];
    let stats = layer.stats.as_ref().expect("the layer is patched");
    assert_eq!((layer.method, stats.files_similar), (Method::Patch, mib as u64 * 4), "{stats:?}");
    assert!(stats.literal_bytes > (mib as u64) << 20 && layer.payload_bytes < (mib as u64) << 16, "{stats:?}");
    peak
}

/// Issue 15, item 15: `diff` held both images in its RSS (1.18 GB for two 512 MiB layers).
/// Diffs a 32 MiB and a 256 MiB image: the larger may peak at most 16 MiB above the smaller,
/// and under [`DIFF_PEAK_BOUND_KIB`].
#[test]
fn diff_peak_memory_does_not_grow_with_image_size() {
    let (small_mib, large_mib) = (32, 256);
    let dir = tempfile::tempdir().unwrap();
    let small = diff_peak_kib(&dir.path().join("small"), small_mib);
    let large = diff_peak_kib(&dir.path().join("large"), large_mib);
    eprintln!("peak RSS of diff: {small} KiB for a {small_mib} MiB image, {large} KiB for a {large_mib} MiB image");
    assert!(large < DIFF_PEAK_BOUND_KIB, "diff of a {large_mib} MiB image peaked at {large} KiB");
    assert!(large < small + 16 * 1024, "diff peak RSS grew from {small} to {large} KiB with a {}x larger image", large_mib / small_mib);
}
