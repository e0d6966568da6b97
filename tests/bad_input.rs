//! Hostile and broken inputs: each gets a clear error, and nothing is written.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use fleetdelta::format::records::{PatchHeader, Record, RecordWriter, SourceRange};
use fleetdelta::image::Layout;
use fleetdelta::layer::Compression;
use fleetdelta::{apply, diff, info, ApplyOptions, DiffOptions, Error, LayerOutput, Level, Silent};
use serde_json::Value;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Fixture {
    /// A source, a target differing in one layer, and the delta between them.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let base: Tree = (0..10).map(|i| (format!("base/{i}"), file(text(i, 4000)))).collect();
        let app: Tree = (0..10).map(|i| (format!("app/{i}"), file(text(50 + i, 30_000)))).collect();
        let mut app2 = app.clone();
        app2.insert("app/new".into(), file(text(77, 9000)));
        if let Some(Node::File { data, .. }) = app2.get_mut("app/4") {
            data.splice(100..200, text(5, 300));
        }
        write_image(&root.join("s"), "latest", &[layer_tar(&base), layer_tar(&app)], Compression::Gzip);
        write_image(&root.join("t"), "latest", &[layer_tar(&base), layer_tar(&app2)], Compression::Gzip);
        let options = DiffOptions { level: Level::Fast, ..Default::default() };
        diff(&oci(&root.join("s")), &oci(&root.join("t")), &oci(&root.join("d")), &options, &Silent).unwrap();
        Fixture { _dir: dir, root }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Applies the delta to `source`, expecting failure; checks that the output directory
    /// did not change. Returns the error.
    fn apply_fails(&self, source: &str, out: &str) -> Error {
        let before = snapshot(&self.path(out));
        let err = apply(&oci(&self.path(source)), &oci(&self.path("d")), &oci(&self.path(out)), &ApplyOptions::default(), &Silent).unwrap_err();
        assert_eq!(snapshot(&self.path(out)), before, "output changed by a failed apply ({err})");
        let stray: Vec<_> =
            fs::read_dir(&self.root).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with('.')).collect();
        assert!(stray.is_empty(), "staging left behind: {stray:?}");
        err
    }

    fn payload_blob(&self) -> PathBuf {
        let m: Value = serde_json::from_slice(&fs::read(self.manifest_path()).unwrap()).unwrap();
        // The last layer holds the patch (format 2 puts a small one in the only layer).
        let d = m["layers"].as_array().unwrap().last().unwrap()["digest"].as_str().unwrap().trim_start_matches("sha256:").to_string();
        self.path("d/blobs/sha256").join(d)
    }

    fn manifest_path(&self) -> PathBuf {
        let index: Value = serde_json::from_slice(&fs::read(self.path("d/index.json")).unwrap()).unwrap();
        let d = index["manifests"][0]["digest"].as_str().unwrap().trim_start_matches("sha256:").to_string();
        self.path("d/blobs/sha256").join(d)
    }
}

fn contains(err: &Error, needle: &str) {
    assert!(err.to_string().contains(needle), "error {err:?} does not mention {needle:?}");
}

#[test]
fn a_good_delta_applies() {
    let f = Fixture::new();
    apply(&oci(&f.path("s")), &oci(&f.path("d")), &oci(&f.path("o")), &ApplyOptions::default(), &Silent).unwrap();
    assert_same_image(&f.path("t"), &f.path("o"));
}

#[test]
fn truncated_delta_blob() {
    let f = Fixture::new();
    let p = f.payload_blob();
    let bytes = fs::read(&p).unwrap();
    fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let err = f.apply_fails("s", "o");
    assert!(matches!(err, Error::SizeMismatch { .. }), "{err}");
}

#[test]
fn corrupted_delta_blob() {
    let f = Fixture::new();
    let p = f.payload_blob();
    let mut bytes = fs::read(&p).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x55;
    fs::write(&p, &bytes).unwrap();
    let err = f.apply_fails("s", "o");
    assert!(matches!(err, Error::DigestMismatch { .. } | Error::Malformed { .. }), "{err}");
}

#[test]
fn tampered_patch_with_valid_digests_is_caught() {
    // Flip a byte deep inside the (zstd-wrapped) patch and recompute every digest of the
    // delta image: only the patch parser, zstd or the diff_id check can notice.
    for offset_percent in [10usize, 50, 90] {
        let f = Fixture::new();
        reseal(&f.path("d"), |tars, _| {
            retar_payload(tars, |patch| {
                let at = patch.len() * offset_percent / 100;
                patch[at] ^= 0x01;
            });
        });
        let err = f.apply_fails("s", "o");
        assert!(!matches!(err, Error::Io { .. }), "{err}");
    }
}

fn patch_bytes(header: PatchHeader, records: &[Record]) -> Vec<u8> {
    let mut w = RecordWriter::new(Vec::new(), header).unwrap();
    for r in records {
        w.write(r).unwrap();
    }
    zstd::encode_all(&w.into_inner()[..], 3).unwrap()
}

#[test]
fn forged_patches_with_huge_or_out_of_range_sizes() {
    let cases: Vec<(&str, PatchHeader, Vec<Record>)> = vec![
        ("declared size", PatchHeader { target_layer: 1, tar_len: 1 << 60 }, vec![Record::End]),
        ("range", PatchHeader { target_layer: 1, tar_len: 100 }, vec![Record::Copy(SourceRange { layer: 1, offset: u64::MAX - 10, len: 100 }), Record::End]),
        ("chunk", PatchHeader { target_layer: 1, tar_len: 100 }, vec![Record::Chunk { prefix: vec![], raw_len: 1 << 40, frame: vec![] }]),
        ("source layer", PatchHeader { target_layer: 1, tar_len: 100 }, vec![Record::Copy(SourceRange { layer: 9, offset: 0, len: 100 }), Record::End]),
        ("target layer", PatchHeader { target_layer: 0, tar_len: 100 }, vec![Record::End]),
        (
            "outside source layer",
            PatchHeader { target_layer: 1, tar_len: 100 },
            vec![Record::Copy(SourceRange { layer: 1, offset: 1 << 30, len: 100 }), Record::End],
        ),
    ];
    for (name, header, records) in cases {
        let f = Fixture::new();
        let forged = patch_bytes(header, &records);
        reseal(&f.path("d"), |tars, _| {
            retar_payload(tars, |p| *p = forged.clone());
        });
        let err = f.apply_fails("s", "o");
        assert!(matches!(err, Error::TooLarge { .. } | Error::Malformed { .. }), "{name}: {err}");
    }
}

#[test]
fn a_zstd_bomb_in_the_patch_stream_is_refused() {
    // A patch stream that decompresses to gigabytes of zeros after a valid header.
    let f = Fixture::new();
    let mut raw = Vec::new();
    RecordWriter::new(&mut raw, PatchHeader { target_layer: 1, tar_len: 1 << 20 }).unwrap();
    raw.push(2); // LITERAL with no chunk: must fail before reading further
    raw.extend(std::iter::repeat_n(0u8, 64 << 20));
    let mut small_window = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    small_window.window_log(20).unwrap();
    std::io::Write::write_all(&mut small_window, &raw).unwrap();
    let bomb = small_window.finish().unwrap();
    assert!(bomb.len() < 100 << 10);
    reseal(&f.path("d"), |tars, _| {
        retar_payload(tars, |p| *p = bomb.clone());
    });
    let err = f.apply_fails("s", "o");
    assert!(matches!(err, Error::Malformed { .. }), "{err}");

    // The same with a window far larger than a patch stream may use: refused up front.
    let f = Fixture::new();
    let big_window = zstd::encode_all(&raw[..], 19).unwrap();
    reseal(&f.path("d"), |tars, _| {
        retar_payload(tars, |p| *p = big_window.clone());
    });
    let err = f.apply_fails("s", "o");
    contains(&err, "memory");
}

#[test]
fn unknown_format_version_is_refused_with_a_clear_error() {
    let f = Fixture::new();
    reseal(&f.path("d"), |_, m| m["annotations"]["io.fleetdelta.delta.version"] = Value::from("3"));
    let err = f.apply_fails("s", "o");
    assert!(matches!(err, Error::UnsupportedFormatVersion { .. }), "{err}");
    contains(&err, "version 3 is not supported (this build reads versions 1 to 2)");
    assert!(info(&oci(&f.path("d"))).is_err());
}

#[test]
fn an_image_that_is_not_a_delta_is_refused() {
    let f = Fixture::new();
    let before = snapshot(&f.path("o"));
    let err = apply(&oci(&f.path("s")), &oci(&f.path("t")), &oci(&f.path("o")), &ApplyOptions::default(), &Silent).unwrap_err();
    contains(&err, "not a fleetdelta delta");
    assert_eq!(snapshot(&f.path("o")), before);
}

#[test]
fn wrong_source_is_refused_before_anything_is_written() {
    let f = Fixture::new();
    let other: Tree = [("x".to_string(), file(text(1, 10)))].into();
    write_image(&f.path("other"), "latest", &[layer_tar(&other)], Compression::Gzip);
    let err = f.apply_fails("other", "o");
    assert!(matches!(err, Error::WrongSource { .. }), "{err}");
    contains(&err, "not the one this delta was made against");
}

/// A damaged gzip source layer fails (its CRC, or the rebuilt layer's diff_id); nothing is
/// written.
#[test]
fn a_damaged_source_layer_is_caught_before_anything_is_written() {
    let f = Fixture::new();
    let layout = fleetdelta::image::Layout::open(f.path("s")).unwrap();
    let image = layout.load_image(None).unwrap();
    let p = layout.blob_path(&image.layers[1].blob.digest);
    let mut bytes = fs::read(&p).unwrap();
    let n = bytes.len();
    bytes[n / 3] ^= 0xff;
    fs::write(&p, bytes).unwrap();
    let err = f.apply_fails("s", "o");
    assert!(matches!(err, Error::DigestMismatch { .. } | Error::Malformed { .. } | Error::Io { .. }), "{err}");
}

/// Apply does not hash the source layers (issue: hash each byte once): a byte flipped in an
/// uncompressed source layer, which no checksum of its own catches, reaches the patch's
/// copies and is caught by the rebuilt layer's diff_id; nothing is written.
#[test]
fn a_damaged_uncompressed_source_layer_is_caught_by_the_rebuilt_layers_diff_id() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let app: Tree = (0..10).map(|i| (format!("app/{i}"), file(text(50 + i, 30_000)))).collect();
    let mut app2 = app.clone();
    app2.insert("app/new".into(), file(text(77, 9000)));
    write_image(&root.join("s"), "latest", &[layer_tar(&app)], Compression::None);
    write_image(&root.join("t"), "latest", &[layer_tar(&app2)], Compression::None);
    diff(&oci(&root.join("s")), &oci(&root.join("t")), &oci(&root.join("d")), &DiffOptions::default(), &Silent).unwrap();
    let layout = fleetdelta::image::Layout::open(root.join("s")).unwrap();
    let p = layout.blob_path(&layout.load_image(None).unwrap().layers[0].blob.digest);
    let mut bytes = fs::read(&p).unwrap();
    // Inside the contents of app/3, which the target keeps as it is.
    let at = bytes.windows(5).position(|w| w == b"app/3").unwrap() + 512 + 1000;
    bytes[at] ^= 0x20;
    fs::write(&p, bytes).unwrap();
    let err = apply(&oci(&root.join("s")), &oci(&root.join("d")), &oci(&root.join("o")), &ApplyOptions::default(), &Silent).unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains("layer 0"), "names the layer: {err}");
    assert!(!root.join("o").exists() || fleetdelta::image::Layout::open(root.join("o")).and_then(|l| l.load_image(None)).is_err(), "nothing written");
}

/// Source and target layers over the layer limit: refused by name, whichever the applier
/// meets first (source layers are decompressed while the rebuild runs), whether layers are
/// written compressed or not; nothing is written.
#[test]
fn layers_past_the_limit_are_refused_by_name() {
    let f = Fixture::new();
    for layers in [LayerOutput::Original, LayerOutput::Uncompressed] {
        let opts = ApplyOptions { max_layer_bytes: 100_000, layers, ..ApplyOptions::default() };
        let err = apply(&oci(&f.path("s")), &oci(&f.path("d")), &oci(&f.path("o")), &opts, &Silent).unwrap_err();
        assert!(matches!(&err, Error::TooLarge { what, limit: 100_000 } if what.contains("layer 1")), "{layers:?}: {err}");
        assert!(!f.path("o").exists(), "nothing written");
    }
}

/// A gzip source layer that inflates past the layer limit (a decompression bomb on the
/// device), read by a target layer within it, is refused by name, although apply no longer
/// hashes its sources; nothing is written.
#[test]
fn a_source_layer_inflating_past_the_limit_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let app: Tree = (0..3).map(|i| (format!("app/{i}"), file(text(50 + i, 10_000)))).collect();
    let mut source = app.clone();
    source.insert("big".into(), file(vec![0; 400_000]));
    let mut target = app.clone();
    if let Some(Node::File { data, .. }) = target.get_mut("app/1") {
        data.splice(100..200, text(5, 300));
    }
    write_image(&root.join("s"), "latest", &[layer_tar(&source)], Compression::Gzip);
    write_image(&root.join("t"), "latest", &[layer_tar(&target)], Compression::Gzip);
    diff(&oci(&root.join("s")), &oci(&root.join("t")), &oci(&root.join("d")), &DiffOptions::default(), &Silent).unwrap();
    apply(&oci(&root.join("s")), &oci(&root.join("d")), &oci(&root.join("ok")), &ApplyOptions::default(), &Silent).unwrap();
    for _ in 0..5 {
        let opts = ApplyOptions { max_layer_bytes: 100_000, ..ApplyOptions::default() };
        let err = apply(&oci(&root.join("s")), &oci(&root.join("d")), &oci(&root.join("o")), &opts, &Silent).unwrap_err();
        assert!(matches!(&err, Error::TooLarge { what, limit: 100_000 } if what.contains("source layer 0")), "{err}");
        assert!(!root.join("o").exists(), "nothing written");
    }
}

#[test]
fn a_failed_apply_leaves_an_existing_output_layout_as_it_was() {
    let f = Fixture::new();
    let keep: Tree = [("keep".to_string(), file(text(3, 100)))].into();
    write_image(&f.path("o"), "latest", &[layer_tar(&keep)], Compression::Gzip);
    let p = f.payload_blob();
    fs::write(&p, b"garbage").unwrap();
    f.apply_fails("s", "o");
    assert_eq!(layer_tars(&f.path("o"), None), vec![layer_tar(&keep)]);
}

#[test]
fn expect_target_refuses_a_delta_for_another_target() {
    let f = Fixture::new();
    let opts = ApplyOptions { expect_target: Some(fleetdelta::Digest::of(b"something else")), ..Default::default() };
    let err = apply(&oci(&f.path("s")), &oci(&f.path("d")), &oci(&f.path("o")), &opts, &Silent).unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert!(!f.path("o").exists());
}

#[test]
fn malformed_manifests_and_configs() {
    let f = Fixture::new();
    let m = f.manifest_path();
    let good = fs::read(&m).unwrap();
    for (name, bad) in [("not json", &b"{\"schemaVersion\": 2, "[..]), ("wrong shape", b"[1,2,3]"), ("no layers", b"{\"schemaVersion\":2,\"config\":{}}")] {
        // Keep the digest chain valid so that parsing, not digest checks, must refuse it.
        let d = fleetdelta::Digest::of(bad);
        fs::write(f.path("d/blobs/sha256").join(d.hex()), bad).unwrap();
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d.to_string(), "size": bad.len()}]});
        fs::write(f.path("d/index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
        let err = f.apply_fails("s", "o");
        assert!(matches!(err, Error::Malformed { .. }), "{name}: {err}");
    }
    let _ = good;
    // A config whose diff_ids do not match the manifest's layers.
    let f = Fixture::new();
    reseal(&f.path("d"), |tars, _| {
        tars.pop();
    });
    let err = f.apply_fails("s", "o");
    assert!(matches!(err, Error::Malformed { .. }), "{err}");
}

fn traversal_tar(path: &str) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_size(4);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    {
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
    }
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(b"evil");
    out.resize(1024, 0);
    out.extend_from_slice(&[0; 1024]);
    out
}

#[test]
fn tar_entries_that_escape_the_root_are_refused_by_the_differ() {
    for bad in ["../../etc/passwd", "/etc/shadow", "usr/../../x"] {
        let dir = tempfile::tempdir().unwrap();
        let s: Tree = [("a".to_string(), file(text(1, 100)))].into();
        write_image(&dir.path().join("s"), "latest", &[layer_tar(&s)], Compression::Gzip);
        write_image(&dir.path().join("t"), "latest", &[traversal_tar(bad)], Compression::Gzip);
        let err = diff(&oci(&dir.path().join("s")), &oci(&dir.path().join("t")), &oci(&dir.path().join("d")), &DiffOptions::default(), &Silent).unwrap_err();
        assert!(matches!(err, Error::UnsafePath { .. }), "{bad}: {err}");
        assert!(!dir.path().join("d").exists());
    }
}

#[test]
fn decompression_bombs_are_refused_by_the_differ() {
    let dir = tempfile::tempdir().unwrap();
    let s: Tree = [("a".to_string(), file(text(1, 100)))].into();
    let t: Tree = [("zeros".to_string(), file(vec![0u8; 8 << 20]))].into();
    write_image(&dir.path().join("s"), "latest", &[layer_tar(&s)], Compression::Gzip);
    write_image(&dir.path().join("t"), "latest", &[layer_tar(&t)], Compression::Gzip);
    let opts = DiffOptions { max_layer_bytes: 1 << 20, ..Default::default() };
    let err = diff(&oci(&dir.path().join("s")), &oci(&dir.path().join("t")), &oci(&dir.path().join("d")), &opts, &Silent).unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");
    assert!(!dir.path().join("d").exists());
}

#[test]
fn a_layer_blob_that_lies_about_its_diff_id_is_refused_by_the_differ() {
    let dir = tempfile::tempdir().unwrap();
    let s: Tree = [("a".to_string(), file(text(1, 100)))].into();
    write_image(&dir.path().join("s"), "latest", &[layer_tar(&s)], Compression::Gzip);
    write_image(&dir.path().join("t"), "latest", &[layer_tar(&s)], Compression::Gzip);
    // Point the target config's diff_id elsewhere: the target now claims new content.
    let t = dir.path().join("t");
    let layout = fleetdelta::image::Layout::open(&t).unwrap();
    let image = layout.load_image(None).unwrap();
    let mut config: Value = serde_json::from_slice(&image.config.raw).unwrap();
    config["rootfs"]["diff_ids"][0] = Value::from(fleetdelta::Digest::of(b"lie").to_string());
    let config = serde_json::to_vec(&config).unwrap();
    let cd = fleetdelta::Digest::of(&config);
    fs::write(layout.blob_path(&cd), &config).unwrap();
    let mut manifest: Value = serde_json::from_slice(&image.manifest.raw).unwrap();
    manifest["config"]["digest"] = Value::from(cd.to_string());
    manifest["config"]["size"] = Value::from(config.len());
    let m = serde_json::to_vec(&manifest).unwrap();
    let md = fleetdelta::Digest::of(&m);
    fs::write(layout.blob_path(&md), &m).unwrap();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md.to_string(), "size": m.len()}]});
    fs::write(t.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    let err = diff(&oci(&dir.path().join("s")), &oci(&t), &oci(&dir.path().join("d")), &DiffOptions::default(), &Silent).unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
}

#[test]
fn missing_images_and_tags_are_named() {
    let f = Fixture::new();
    let err = apply(&oci(&f.path("nowhere")), &oci(&f.path("d")), &oci(&f.path("o")), &ApplyOptions::default(), &Silent).unwrap_err();
    contains(&err, "nowhere");
    let err = apply(&oci_tag(&f.path("s"), "v9"), &oci(&f.path("d")), &oci(&f.path("o")), &ApplyOptions::default(), &Silent).unwrap_err();
    contains(&err, "\"v9\"");
    let _ = Path::new("");
}

/// A delta of the bundled umoci-built sample pair, whose changed layer is re-encoded exactly.
fn exact_sample_delta(dir: &Path) -> PathBuf {
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/sample");
    let d = dir.join("d");
    diff(&oci(&sample.join("v1")), &oci(&sample.join("v2")), &oci(&d), &DiffOptions::default(), &Silent).unwrap();
    d
}

#[test]
fn a_lying_encoder_descriptor_is_caught_by_the_blob_digest_and_nothing_is_written() {
    let sample_v1 = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/sample/v1");
    type Edit = fn(&mut Value);
    let cases: [(&str, Edit); 5] = [
        ("block size", |p| p["layers"][1]["encoding"]["descriptor"]["encoder"]["block_size"] = Value::from(131072)),
        ("header mtime", |p| p["layers"][1]["encoding"]["descriptor"]["header"]["mtime"] = Value::from(1)),
        ("undeclared feature", |p| p["features"] = Value::from(Vec::<String>::new())),
        ("unknown feature", |p| p["features"] = Value::from(vec!["exact-gzip", "exact-brotli"])),
        // A later build's feature with what it brings (a kind of encoding this build cannot
        // parse): refused by the feature's name, not the field's.
        ("unknown feature in use", |p| {
            p["features"] = Value::from(vec!["exact-gzip", "exact-brotli"]);
            p["layers"][1]["encoding"]["kind"] = Value::from("exact-brotli");
        }),
    ];
    for (name, edit) in cases {
        let dir = tempfile::tempdir().unwrap();
        let d = exact_sample_delta(dir.path());
        let plan: Value = serde_json::from_slice(&fleetdelta::info(&oci(&d)).map(|i| serde_json::to_vec(&i.layers[1].encoding).unwrap()).unwrap()).unwrap();
        assert_eq!(plan["kind"], "exact", "the sample's changed layer is re-encoded exactly");
        edit_plan(&d, edit);
        let out = dir.path().join("o");
        let err = apply(&oci(&sample_v1), &oci(&d), &oci(&out), &ApplyOptions::default(), &Silent).unwrap_err();
        let ok = match name {
            // Caught by the digest, or as soon as the blob outgrows the target's.
            "block size" | "header mtime" => {
                matches!(&err, Error::DigestMismatch { what, .. } | Error::TooLarge { what, .. } if what.contains("re-encoded exactly"))
            }
            "undeclared feature" => matches!(err, Error::Malformed { .. }),
            _ => matches!(err, Error::Unsupported { .. }) && err.to_string().contains("\"exact-brotli\""),
        };
        assert!(ok, "{name}: {err}");
        assert!(!out.exists(), "{name}: output written");
    }
}

#[test]
fn lying_gzip_member_lists_are_refused_and_nothing_is_written() {
    type Edit = fn(&mut Value);
    let cases: [(&str, Edit); 6] = [
        ("source raw length", |p| {
            let n = p["sourceMembers"][0]["members"][0]["rawLen"].as_u64().unwrap();
            p["sourceMembers"][0]["members"][0]["rawLen"] = Value::from(n + 1);
        }),
        ("source offset", |p| {
            let n = p["sourceMembers"][0]["members"][0]["offset"].as_u64().unwrap();
            p["sourceMembers"][0]["members"][0]["offset"] = Value::from(n - 512);
        }),
        ("target level", |p| p["layers"][1]["members"][0]["descriptor"]["encoder"]["level"] = Value::from(1)),
        ("target length", |p| {
            let n = p["layers"][1]["members"][0]["compressedLen"].as_u64().unwrap();
            p["layers"][1]["members"][0]["compressedLen"] = Value::from(n + 1);
        }),
        ("overlap", |p| {
            let first = p["layers"][1]["members"][0].clone();
            p["layers"][1]["members"].as_array_mut().unwrap().insert(0, first);
        }),
        ("undeclared feature", |p| p["features"] = Value::from(vec!["exact-gzip"])),
    ];
    for (name, edit) in cases {
        let dir = tempfile::tempdir().unwrap();
        let pair = members_pair(dir.path());
        let d = dir.path().join("d");
        diff(&oci(&pair.source), &oci(&pair.target), &oci(&d), &DiffOptions::default(), &Silent).unwrap();
        edit_plan(&d, edit);
        let out = dir.path().join("o");
        let err = apply(&oci(&pair.source), &oci(&d), &oci(&out), &ApplyOptions::default(), &Silent).unwrap_err();
        let text = err.to_string();
        let ok = match name {
            "source raw length" => text.contains("inflates to"),
            "source offset" => text.contains("gzip member at offset"),
            "target level" | "target length" => text.contains("compressed to") || matches!(err, Error::DigestMismatch { .. }),
            _ => matches!(err, Error::Malformed { .. }),
        };
        assert!(ok, "{name}: {err}");
        assert!(!out.exists(), "{name}: output written");
    }
}

#[test]
fn lying_zip_member_lists_are_refused_and_nothing_is_written() {
    type Edit = fn(&mut Value);
    let cases: [(&str, Edit); 7] = [
        ("source raw length", |p| {
            let n = p["sourceMembers"][0]["members"][0]["rawLen"].as_u64().unwrap();
            p["sourceMembers"][0]["members"][0]["rawLen"] = Value::from(n + 1);
        }),
        ("source read as gzip", |p| {
            p["sourceMembers"][0]["members"][0].as_object_mut().unwrap().remove("wrapping");
        }),
        ("target level", |p| p["layers"][1]["members"][0]["encoder"]["level"] = Value::from(1)),
        ("target offset", |p| {
            let n = p["layers"][1]["members"][0]["offset"].as_u64().unwrap();
            p["layers"][1]["members"][0]["offset"] = Value::from(n - 30);
        }),
        ("no encoder", |p| {
            p["layers"][1]["members"][0].as_object_mut().unwrap().remove("encoder");
        }),
        ("gzip descriptor too", |p| {
            p["layers"][1]["members"][0]["descriptor"] =
                serde_json::json!({"encoder": {"kind": "zlib", "level": 6}, "header": {"mtime": 0, "xfl": 0, "os": 3}});
        }),
        ("undeclared feature", |p| p["features"].as_array_mut().unwrap().retain(|f| f != "deflate-members")),
    ];
    let dir = tempfile::tempdir().unwrap();
    let pair = zips_pair(dir.path());
    let good = dir.path().join("good");
    diff(&oci(&pair.source), &oci(&pair.target), &oci(&good), &DiffOptions::default(), &Silent).unwrap();
    for (name, edit) in cases {
        let d = dir.path().join(format!("d-{name}"));
        run(tool("cp").arg("-r").arg(&good).arg(&d));
        edit_plan(&d, edit);
        let out = dir.path().join(format!("o-{name}"));
        let err = apply(&oci(&pair.source), &oci(&d), &oci(&out), &ApplyOptions::default(), &Silent).unwrap_err();
        let text = err.to_string();
        let ok = match name {
            "source raw length" => text.contains("deflate stream at offset") && text.contains("inflates to"),
            "source read as gzip" => text.contains("gzip member at offset") && text.contains("does not inflate"),
            "target level" | "target offset" => text.contains("compressed to") || text.contains("ends inside") || matches!(err, Error::DigestMismatch { .. }),
            "no encoder" | "gzip descriptor too" => text.contains("needs an encoder"),
            _ => text.contains("deflate-members"),
        };
        assert!(ok, "{name}: {err}");
        assert!(!out.exists(), "{name}: output written");
    }
}

/// A source and a target whose changed layer `pigz` compressed (rebuilt with corrections),
/// and the delta between them. Returns the source, the delta and the corrections' delta
/// layer index.
fn corrected_delta(dir: &Path) -> (PathBuf, PathBuf, usize) {
    let app: Tree = (0..30).map(|i| (format!("app/{i}"), file(text(50 + i, 12_000)))).collect();
    let mut app2 = app.clone();
    app2.insert("app/new".into(), file(text(77, 9000)));
    let pigz = |tar: &[u8]| filter(tool("pigz").arg("-6n").arg("-c"), tar);
    let (s, t, d) = (dir.join("s"), dir.join("t"), dir.join("d"));
    write_image_with(&s, "latest", &[layer_tar(&app)], Compression::Gzip, false, pigz);
    write_image_with(&t, "latest", &[layer_tar(&app2)], Compression::Gzip, false, pigz);
    diff(&oci(&s), &oci(&t), &oci(&d), &DiffOptions::default(), &Silent).unwrap();
    let encoding = info(&oci(&d)).unwrap().layers[0].encoding.clone();
    let Some(fleetdelta::format::plan::Encoding::Corrected { corrections_layer, .. }) = encoding else {
        panic!("the pigz layer is not rebuilt with corrections: {encoding:?}");
    };
    (s, d, corrections_layer as usize)
}

#[test]
fn tampered_corrections_are_refused_and_nothing_is_written() {
    type Edit = fn(&mut Vec<u8>);
    let cases: [(&str, Edit); 4] = [
        ("flipped byte", |c| {
            let n = c.len();
            c[n / 2] ^= 0x10;
        }),
        ("truncated", |c| c.truncate(c.len() - 5)),
        ("garbage", |c| c.iter_mut().for_each(|b| *b = b.wrapping_mul(167).wrapping_add(13))),
        // Well-formed zstd around corrections that lie: every correction byte changed.
        ("lying corrections", |c| {
            let mut raw = zstd::decode_all(&c[..]).unwrap();
            let n = raw.len();
            for b in &mut raw[n / 3..n - 8] {
                *b = b.rotate_left(1);
            }
            *c = zstd::encode_all(&raw[..], 3).unwrap();
        }),
    ];
    for (name, edit) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (s, d, layer) = corrected_delta(dir.path());
        reseal(&d, |tars, _| tars[layer] = retar_file(&tars[layer], "layer-0000.corrections", edit));
        let out = dir.path().join("o");
        let err = apply(&oci(&s), &oci(&d), &oci(&out), &ApplyOptions::default(), &Silent).unwrap_err();
        assert!(matches!(err, Error::Malformed { .. } | Error::DigestMismatch { .. }), "{name}: {err}");
        assert!(!out.exists(), "{name}: output written");
    }
}

/// What opens the first chunk's corrections: preflate-rs's `ReconstructionData` (bitcode
/// encodes fields in order): the model parameters, then the arithmetic-coded corrections.
#[derive(bitcode::Decode, bitcode::Encode)]
struct FirstChunk {
    parameters: preflate_rs::TokenPredictorParameters,
    coded: Vec<u8>,
}

/// Rewrites the arithmetic-coded corrections of every chunk of a decompressed correction
/// stream (inside the first chunk's model parameters; the lengths follow), leaving the
/// prefix, the other fields and END as they are.
fn edit_chunks(raw: &[u8], edit: fn(&mut Vec<u8>)) -> Vec<u8> {
    use fleetdelta::format::records::{read_varint, write_varint};
    let mut input = raw;
    let mut out = input[..8].to_vec();
    input = &input[8..];
    let engine = read_varint(&mut input).unwrap() as usize;
    write_varint(&mut out, engine as u64).unwrap();
    out.extend_from_slice(&input[..engine]);
    input = &input[engine..];
    write_varint(&mut out, read_varint(&mut input).unwrap()).unwrap();
    let mut chunks = 0;
    while input[0] == 1 {
        out.push(1);
        input = &input[1..];
        for _ in 0..2 {
            write_varint(&mut out, read_varint(&mut input).unwrap()).unwrap();
        }
        let n = read_varint(&mut input).unwrap() as usize;
        let mut corrections = input[..n].to_vec();
        input = &input[n..];
        if chunks == 0 {
            let mut first: FirstChunk = bitcode::decode(&corrections).unwrap();
            edit(&mut first.coded);
            corrections = bitcode::encode(&first);
        } else {
            edit(&mut corrections);
        }
        write_varint(&mut out, corrections.len() as u64).unwrap();
        out.extend_from_slice(&corrections);
        chunks += 1;
    }
    assert!(chunks > 0 && input[0] == 0, "a stream of chunks, then END");
    out.extend_from_slice(input);
    out
}

/// Corrections that are well-formed records with valid model parameters, but whose coded
/// part is hostile to the model that reads it: cut short (the arithmetic decoder then runs
/// past its end, which made preflate-rs 0.7.6 as released write empty blocks, or read ones,
/// for ever), emptied, zeroed or inverted. Each is refused (the fuzz target `corrections`
/// checks the time and memory bounds), and nothing is written.
#[test]
fn corrections_hostile_to_the_model_are_refused_and_nothing_is_written() {
    type Edit = fn(&mut Vec<u8>);
    let cases: [(&str, Edit); 4] = [
        ("cut to a quarter", |c| c.truncate(c.len() / 4)),
        ("emptied", Vec::clear),
        ("zeroed", |c| c.iter_mut().for_each(|b| *b = 0)),
        ("inverted", |c| c.iter_mut().for_each(|b| *b = !*b)),
    ];
    for (name, edit) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (s, d, layer) = corrected_delta(dir.path());
        reseal(&d, |tars, _| {
            tars[layer] = retar_file(&tars[layer], "layer-0000.corrections", |c| {
                let raw = zstd::decode_all(&c[..]).unwrap();
                *c = zstd::encode_all(&edit_chunks(&raw, edit)[..], 3).unwrap();
            })
        });
        let out = dir.path().join("o");
        let err = apply(&oci(&s), &oci(&d), &oci(&out), &ApplyOptions::default(), &Silent).unwrap_err();
        assert!(matches!(err, Error::Malformed { .. } | Error::DigestMismatch { .. }), "{name}: {err}");
        assert!(!out.exists(), "{name}: output written");
    }
}

#[test]
fn lying_corrected_encodings_are_refused_and_nothing_is_written() {
    type Edit = fn(&mut Value);
    // (Format 2 lets the corrections share the patch's layer: their files have other names.)
    let cases: [(&str, Edit); 4] = [
        ("header mtime", |p| p["layers"][0]["encoding"]["header"]["mtime"] = Value::from(1)),
        ("undeclared feature", |p| p["features"] = Value::from(Vec::<String>::new())),
        ("other engine", |p| p["layers"][0]["encoding"]["engine"] = Value::from("preflate-rs 0.8.0")),
        ("corrections in no layer", |p| p["layers"][0]["encoding"]["correctionsLayer"] = Value::from(9)),
    ];
    for (name, edit) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (s, d, _) = corrected_delta(dir.path());
        edit_plan(&d, edit);
        let out = dir.path().join("o");
        let err = apply(&oci(&s), &oci(&d), &oci(&out), &ApplyOptions::default(), &Silent).unwrap_err();
        let ok = match name {
            "header mtime" => matches!(&err, Error::DigestMismatch { what, .. } if what.contains("re-encoded with corrections")),
            "other engine" => matches!(err, Error::Unsupported { .. }),
            _ => matches!(err, Error::Malformed { .. }),
        };
        assert!(ok, "{name}: {err}");
        assert!(!out.exists(), "{name}: output written");
    }
}

// ---- Reliability: output bounded by the target, nothing trusted unchecked, nothing left ----

/// Like [`Fixture::new`], with a third target layer of noise that the delta carries whole.
fn blob_fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let base: Tree = (0..10).map(|i| (format!("base/{i}"), file(text(i, 4000)))).collect();
    let app: Tree = (0..10).map(|i| (format!("app/{i}"), file(text(50 + i, 30_000)))).collect();
    let extra: Tree = [("extra/noise".to_string(), file(random(200_000, 3)))].into();
    write_image(&root.join("s"), "latest", &[layer_tar(&base), layer_tar(&app)], Compression::Gzip);
    write_image(&root.join("t"), "latest", &[layer_tar(&base), layer_tar(&app), layer_tar(&extra)], Compression::Gzip);
    diff(&oci(&root.join("s")), &oci(&root.join("t")), &oci(&root.join("d")), &DiffOptions { level: Level::Fast, ..Default::default() }, &Silent).unwrap();
    let plan = info(&oci(&root.join("d"))).unwrap();
    assert_eq!(plan.layers[2].method, fleetdelta::format::plan::Method::Blob, "the noise layer is carried whole");
    Fixture { _dir: dir, root }
}

/// `fleetdelta apply` with no file allowed past `max_file` bytes (RLIMIT_FSIZE through
/// util-linux's prlimit): a write past it kills the process with SIGXFSZ. Returns the
/// output; the process must have ended by itself, not by that signal.
fn apply_with_file_limit(f: &Fixture, max_file: u64, extra: &[&str]) -> std::process::Output {
    let out = tool("prlimit")
        .arg(format!("--fsize={max_file}"))
        .arg(env!("CARGO_BIN_EXE_fleetdelta"))
        .args(["apply", "--quiet"])
        .args(extra)
        .arg(format!("oci:{}", f.path("s").display()))
        .arg(format!("oci:{}", f.path("d").display()))
        .arg(format!("oci:{}", f.path("o").display()))
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), None, "killed by a signal (SIGXFSZ: wrote past {max_file} bytes): {}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn a_blob_payload_longer_than_the_target_blob_is_refused_before_it_is_written() {
    let f = blob_fixture();
    // 64 MiB of zeros where the target's 200 kB blob should be (the payload tar declares it).
    reseal(&f.path("d"), |tars, _| {
        retar_payload(tars, |p| p.resize(64 << 20, 0));
    });
    for mode in ["original", "uncompressed"] {
        let out = apply_with_file_limit(&f, 16 << 20, &["--layers", mode]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{mode}: {stderr}");
        assert!(stderr.contains("the blob the delta carries: size mismatch"), "{mode}: {stderr}");
        assert!(!f.path("o").exists(), "{mode}: output written");
    }
}

#[test]
fn a_patch_cannot_write_more_than_the_target_blob_can_hold() {
    // 47 bytes that copy the same source range over and over: a gigabyte of tar.
    let f = Fixture::new();
    let target = fleetdelta::image::Layout::open(f.path("t")).unwrap().load_image(None).unwrap();
    let blob_size = target.layers[1].blob.size;
    let source_len = layer_tars(&f.path("s"), None)[1].len() as u64;
    let tar_len = 1u64 << 30;
    let mut raw = Vec::new();
    let mut w = RecordWriter::new(&mut raw, PatchHeader { target_layer: 1, tar_len }).unwrap();
    let mut left = tar_len;
    while left > 0 {
        let len = left.min(source_len);
        w.write(&Record::Copy(SourceRange { layer: 1, offset: 0, len })).unwrap();
        left -= len;
    }
    w.write(&Record::End).unwrap();
    let patch = zstd::encode_all(&raw[..], 19).unwrap();
    assert!(patch.len() < 4096, "{} bytes", patch.len());
    reseal(&f.path("d"), |tars, _| {
        retar_payload(tars, |p| *p = patch.clone());
    });
    for mode in ["original", "uncompressed"] {
        let out = apply_with_file_limit(&f, 32 << 20, &["--layers", mode]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{mode}: {stderr}");
        let limit = Compression::Gzip.max_uncompressed_len(blob_size);
        assert!(stderr.contains(&format!("patch for target layer 1: larger than the limit of {limit} bytes")), "{mode}: {stderr}");
        assert!(!f.path("o").exists());
    }
}

#[test]
fn patches_whose_records_produce_nothing_are_refused() {
    // Millions of empty copies (or empty chunks with whole prefixes) cost CPU, not bytes.
    let f = Fixture::new();
    let tar = &layer_tars(&f.path("t"), None)[1];
    let cases: Vec<(&str, Record)> = vec![
        ("a copy of 0 bytes", Record::Copy(SourceRange { layer: 1, offset: 0, len: 0 })),
        (
            "a chunk of 0 bytes",
            Record::Chunk { prefix: vec![SourceRange { layer: 1, offset: 0, len: 100_000 }], raw_len: 0, frame: zstd::encode_all(&b""[..], 1).unwrap() },
        ),
    ];
    for (name, empty) in cases {
        let mut raw = Vec::new();
        let mut w = RecordWriter::new(&mut raw, PatchHeader { target_layer: 1, tar_len: tar.len() as u64 }).unwrap();
        for _ in 0..1_000_000 {
            w.write(&empty).unwrap();
        }
        let frame = zstd::encode_all(&tar[..], 3).unwrap();
        w.write(&Record::Chunk { prefix: vec![], raw_len: tar.len() as u64, frame }).unwrap();
        w.write(&Record::Literal(tar.len() as u64)).unwrap();
        w.write(&Record::End).unwrap();
        let mut patch = zstd::stream::write::Encoder::new(Vec::new(), 19).unwrap();
        patch.window_log(20).unwrap();
        std::io::Write::write_all(&mut patch, &raw).unwrap();
        let patch = patch.finish().unwrap();
        reseal(&f.path("d"), |tars, _| {
            retar_payload(tars, |p| *p = patch.clone());
        });
        let err = f.apply_fails("s", "o");
        contains(&err, name);
    }
}

/// Replaces the delta's layer-1 patch with `records` and declares `feature` in its plan.
fn with_patch(f: &Fixture, records: &[Record], feature: &str) {
    let n = layer_tars(&f.path("t"), None)[1].len() as u64;
    let patch = patch_bytes(PatchHeader { target_layer: 1, tar_len: n }, records);
    reseal(&f.path("d"), |tars, _| {
        retar_payload(tars, |p| *p = patch.clone());
        tars[0] = retar_file(&tars[0], "delta.json", |raw| {
            let mut plan: Value = serde_json::from_slice(raw).unwrap();
            plan["features"].as_array_mut().unwrap().push(feature.into());
            *raw = serde_json::to_vec(&plan).unwrap();
        });
    });
}

/// A delta whose layer-1 patch rebuilds the target's first 1000 bytes from source layer 1 plus
/// the difference chunk `frame`, and the rest from a chunk; its plan declares the feature.
fn with_difference_chunk(f: &Fixture, frame: Vec<u8>) {
    let target = &layer_tars(&f.path("t"), None)[1];
    let n = target.len() as u64;
    let rest = zstd::encode_all(&target[1000..], 3).unwrap();
    let records = [
        Record::Differences { raw_len: 1000, frame },
        Record::AddDifferences(SourceRange { layer: 1, offset: 0, len: 1000 }),
        Record::Chunk { prefix: vec![], raw_len: n - 1000, frame: rest },
        Record::Literal(n - 1000),
        Record::End,
    ];
    with_patch(f, &records, "difference-chunks");
}

#[test]
fn add_records_written_by_hand_rebuild_by_the_format() {
    // The differ writes difference chunks now; deltas with ADD records (differences in the
    // chunk, between literals) still apply.
    let f = Fixture::new();
    let (source, target) = (&layer_tars(&f.path("s"), None)[1], &layer_tars(&f.path("t"), None)[1]);
    let n = target.len() as u64;
    let mut chunk: Vec<u8> = target[..600].iter().zip(&source[..600]).map(|(t, s)| t.wrapping_sub(*s)).collect();
    chunk.extend_from_slice(&target[600..]);
    let records = [
        Record::Chunk { prefix: vec![], raw_len: n, frame: zstd::encode_all(&chunk[..], 3).unwrap() },
        Record::Add(SourceRange { layer: 1, offset: 0, len: 400 }),
        Record::Add(SourceRange { layer: 1, offset: 400, len: 200 }),
        Record::Literal(n - 600),
        Record::End,
    ];
    with_patch(&f, &records, "add-ranges");
    apply(&oci(&f.path("s")), &oci(&f.path("d")), &oci(&f.path("o")), &ApplyOptions::default(), &Silent).unwrap();
    assert_eq!(layer_tars(&f.path("o"), None)[1], *target);
}

#[test]
fn difference_chunks_rebuild_by_the_format_and_lying_ones_are_refused_by_name() {
    // Differences written by hand, as the format defines them, rebuild the target.
    let f = Fixture::new();
    let (source, target) = (&layer_tars(&f.path("s"), None)[1], &layer_tars(&f.path("t"), None)[1]);
    let differences: Vec<u8> = target[..1000].iter().zip(&source[..1000]).map(|(t, s)| t.wrapping_sub(*s)).collect();
    with_difference_chunk(&f, fleetdelta::format::lzma::compress(&differences, fleetdelta::format::lzma::Effort::Strong).unwrap());
    apply(&oci(&f.path("s")), &oci(&f.path("d")), &oci(&f.path("o")), &ApplyOptions::default(), &Silent).unwrap();
    assert_eq!(layer_tars(&f.path("o"), None)[1], *target);

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("patch difference chunk (LZMA)", vec![0xff; 64]),
        (
            "decompresses to more than the 1000 bytes declared",
            fleetdelta::format::lzma::compress(&[0u8; 2000], fleetdelta::format::lzma::Effort::Strong).unwrap(),
        ),
        ("the stream ends after 500 of 1000 bytes", fleetdelta::format::lzma::compress(&[0u8; 500], fleetdelta::format::lzma::Effort::Strong).unwrap()),
        // Well formed, but not the target's differences: the rebuilt layer's checks catch it
        // (here the exact re-encoding outgrows the blob's size before the diff_id is known).
        ("target layer 1", fleetdelta::format::lzma::compress(&[1u8; 1000], fleetdelta::format::lzma::Effort::Strong).unwrap()),
    ];
    for (needle, frame) in cases {
        let f = Fixture::new();
        with_difference_chunk(&f, frame);
        let err = f.apply_fails("s", "o");
        contains(&err, needle);
    }
}

/// Rewrites the target manifest that a delta embeds (and every digest that names it), so
/// that only checks of the target's own descriptors can catch `edit`.
fn forge_target_manifest(delta: &Path, edit: impl FnOnce(&mut Value)) {
    reseal(delta, |tars, manifest| {
        let mut target = Vec::new();
        tars[0] = retar_file(&tars[0], "target-manifest.json", |raw| {
            let mut m: Value = serde_json::from_slice(raw).unwrap();
            edit(&mut m);
            *raw = serde_json::to_vec(&m).unwrap();
            target = raw.clone();
        });
        let digest = fleetdelta::Digest::of(&target).to_string();
        tars[0] = retar_file(&tars[0], "delta.json", |raw| {
            let mut plan: Value = serde_json::from_slice(raw).unwrap();
            plan["target"]["manifest"] = Value::from(digest.clone());
            *raw = serde_json::to_vec(&plan).unwrap();
        });
        manifest["annotations"]["io.fleetdelta.target.manifest"] = Value::from(digest.clone());
        manifest["subject"]["digest"] = Value::from(digest);
        manifest["subject"]["size"] = Value::from(target.len());
    });
}

/// A store (`o`) that holds the source image under `current`: the device's own layout.
fn store_with_source(f: &Fixture) {
    fleetdelta::Transfer::new(Default::default()).unwrap().copy(&oci(&f.path("s")), &oci_tag(&f.path("o"), "current"), &Silent).unwrap();
}

#[test]
fn a_damaged_blob_already_in_the_output_is_replaced_not_trusted() {
    let f = Fixture::new();
    store_with_source(&f);
    let shared = fleetdelta::image::Layout::open(f.path("t")).unwrap().load_image(None).unwrap().layers[0].blob.clone();
    let in_store = f.path("o/blobs/sha256").join(shared.digest.hex());
    let mut bytes = fs::read(&in_store).unwrap();
    bytes[100] ^= 1;
    // A new file: the store's blob may be a hard link of the source's.
    let damage = |bytes: &[u8]| {
        fs::remove_file(&in_store).unwrap();
        fs::write(&in_store, bytes).unwrap();
    };
    damage(&bytes);
    // From an intact source elsewhere: the damaged copy is replaced by a verified one.
    apply(&oci(&f.path("s")), &oci(&f.path("d")), &oci_tag(&f.path("o"), "next"), &ApplyOptions::default(), &Silent).unwrap();
    assert_eq!(fleetdelta::Digest::of(&fs::read(&in_store).unwrap()), shared.digest, "the damaged blob was kept");
    assert_same_tagged_image(&f.path("t"), None, &f.path("o"), Some("next"));

    // From the store itself, whose copy is the damaged one: refused, naming the blob.
    damage(&bytes);
    let err = apply(&oci_tag(&f.path("o"), "current"), &oci(&f.path("d")), &oci_tag(&f.path("o"), "again"), &ApplyOptions::default(), &Silent).unwrap_err();
    assert!(matches!(&err, Error::DigestMismatch { what, .. } if what.contains(&shared.digest.to_string())), "{err}");
    assert!(Layout::open(f.path("o")).unwrap().resolve(Some("again")).is_err());
}

#[test]
fn target_descriptors_that_lie_about_size_or_media_type_are_refused() {
    type Edit = fn(&mut Value);
    let cases: [(&str, Edit); 3] = [
        ("size 2^63", |m| m["layers"][0]["size"] = Value::from(1u64 << 63)),
        ("size + 1", |m| m["layers"][0]["size"] = Value::from(m["layers"][0]["size"].as_u64().unwrap() + 1)),
        ("zstd media type", |m| m["layers"][0]["mediaType"] = Value::from("application/vnd.oci.image.layer.v1.tar+zstd")),
    ];
    for (name, edit) in cases {
        let f = Fixture::new();
        // Into the device's store, which already has the shared layer's blob.
        store_with_source(&f);
        forge_target_manifest(&f.path("d"), edit);
        let before = snapshot(&f.path("o"));
        let err = apply(&oci_tag(&f.path("o"), "current"), &oci(&f.path("d")), &oci_tag(&f.path("o"), "next"), &ApplyOptions::default(), &Silent).unwrap_err();
        assert!(matches!(err, Error::SizeMismatch { .. } | Error::Malformed { .. }), "{name}: {err}");
        assert_eq!(snapshot(&f.path("o")), before, "{name}: the store changed");
    }
}

#[test]
fn a_failed_commit_takes_back_the_blobs_it_moved_in() {
    let f = Fixture::new();
    let keep: Tree = [("keep".to_string(), file(text(3, 100)))].into();
    write_image(&f.path("o"), "keep", &[layer_tar(&keep)], Compression::Gzip);
    // An index.json that cannot be read back: the commit fails after moving blobs in.
    fs::write(f.path("o/index.json"), b"{\"manifests\": [").unwrap();
    let blobs_before: Vec<_> = fs::read_dir(f.path("o/blobs/sha256")).unwrap().map(|e| e.unwrap().file_name()).collect();
    let err = apply(&oci(&f.path("s")), &oci(&f.path("d")), &oci(&f.path("o")), &ApplyOptions::default(), &Silent).unwrap_err();
    assert!(matches!(&err, Error::Malformed { what, reason } if what.ends_with("index.json") && reason.contains("EOF")), "{err}");
    let mut blobs_after: Vec<_> = fs::read_dir(f.path("o/blobs/sha256")).unwrap().map(|e| e.unwrap().file_name()).collect();
    blobs_after.sort();
    let mut blobs_before = blobs_before;
    blobs_before.sort();
    assert_eq!(blobs_after, blobs_before, "blobs that nothing names were left in the store");
    let stray: Vec<_> =
        fs::read_dir(f.path("o")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with('.')).collect();
    assert!(stray.is_empty(), "{stray:?}");
}

#[test]
fn a_malformed_index_is_named_with_the_parser_reason() {
    let f = Fixture::new();
    fs::write(f.path("s/index.json"), b"{\"schemaVersion\": 2, \"manifests\": [1]}").unwrap();
    let err = apply(&oci(&f.path("s")), &oci(&f.path("d")), &oci(&f.path("o")), &ApplyOptions::default(), &Silent).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("index.json: malformed") && text.contains("line 1 column") && !text.contains("serde failed"), "{text}");
}

#[test]
fn expect_target_compares_the_manifest_actually_written() {
    // A source with the same config (diff_ids) as the delta's, but its blobs compressed
    // otherwise: its layers are recompressed, so the manifest written is not the target's.
    let f = Fixture::new();
    let tars = layer_tars(&f.path("s"), None);
    write_image_with(&f.path("s2"), "latest", &tars, Compression::Gzip, false, |t| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut e, t).unwrap();
        e.finish().unwrap()
    });
    let target = fleetdelta::image::Layout::open(f.path("t")).unwrap().resolve(None).unwrap().digest;
    let opts = ApplyOptions { expect_target: Some(target), ..Default::default() };
    let err = apply(&oci(&f.path("s2")), &oci(&f.path("d")), &oci(&f.path("o")), &opts, &Silent).unwrap_err();
    assert!(matches!(&err, Error::DigestMismatch { what, .. } if what.contains("manifest written")), "{err}");
    assert!(!f.path("o").exists());
    // Without the pin the rebuilt image is accepted, with its own manifest.
    let report = apply(&oci(&f.path("s2")), &oci(&f.path("d")), &oci(&f.path("o")), &ApplyOptions::default(), &Silent).unwrap();
    assert!(!report.identical());
    assert_same_image(&f.path("t"), &f.path("o"));
}

#[test]
fn delta_json_must_name_the_config_of_the_embedded_target_manifest() {
    let f = Fixture::new();
    let other = fleetdelta::Digest::of(b"another config").to_string();
    reseal(&f.path("d"), |tars, manifest| {
        tars[0] = retar_file(&tars[0], "delta.json", |raw| {
            let mut plan: Value = serde_json::from_slice(raw).unwrap();
            plan["target"]["config"] = Value::from(other.clone());
            *raw = serde_json::to_vec(&plan).unwrap();
        });
        manifest["annotations"]["io.fleetdelta.target.config"] = Value::from(other.clone());
    });
    let err = f.apply_fails("s", "o");
    assert!(matches!(&err, Error::DigestMismatch { what, .. } if what.contains("delta.json target config")), "{err}");
}

#[test]
fn a_zstd_delta_layer_with_a_huge_window_is_refused_by_name() {
    let f = Fixture::new();
    reseal(&f.path("d"), |_, _| {});
    // Recompress the patch layer with a 128 MiB window, as a tool might.
    let layout = Layout::open(f.path("d")).unwrap();
    let image = layout.load_image(None).unwrap();
    let last = image.layers.len() - 1;
    let tar = fs::read(layout.blob_path(&image.layers[last].blob.digest)).unwrap();
    let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    e.set_parameter(zstd::stream::raw::CParameter::WindowLog(27)).unwrap();
    std::io::Write::write_all(&mut e, &tar).unwrap();
    let blob = e.finish().unwrap();
    let mut manifest: Value = serde_json::from_slice(&image.manifest.raw).unwrap();
    let d = fleetdelta::Digest::of(&blob);
    fs::write(layout.blob_path(&d), &blob).unwrap();
    manifest["layers"][last]["mediaType"] = Value::from("application/vnd.oci.image.layer.v1.tar+zstd");
    manifest["layers"][last]["digest"] = Value::from(d.to_string());
    manifest["layers"][last]["size"] = Value::from(blob.len());
    let m = serde_json::to_vec(&manifest).unwrap();
    let md = fleetdelta::Digest::of(&m);
    fs::write(layout.blob_path(&md), &m).unwrap();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md.to_string(), "size": m.len()}]});
    fs::write(f.path("d/index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    let err = f.apply_fails("s", "o");
    assert!(matches!(&err, Error::TooLarge { what, .. } if what.contains("zstd frame window")), "{err}");
}

#[test]
fn jobs_beyond_the_cores_are_bounded() {
    let f = Fixture::new();
    let opts = ApplyOptions { jobs: 20_000, ..Default::default() };
    apply(&oci(&f.path("s")), &oci(&f.path("d")), &oci(&f.path("o")), &opts, &Silent).unwrap();
    assert_same_image(&f.path("t"), &f.path("o"));
    let out = fleetdelta().args(["apply", "--jobs", "20000", "oci:/nonexistent/a", "oci:/nonexistent/b", "oci:/nonexistent/c"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--jobs"));
}

#[test]
fn errors_are_one_line_and_say_each_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no\nsuch");
    let out = fleetdelta().args(["info"]).arg(format!("oci:{}", missing.display())).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr:?}");
    assert!(stderr.contains("no\\nsuch"), "{stderr:?}");
    let f = Fixture::new();
    fs::remove_file(f.path("s/index.json")).unwrap();
    let out = fleetdelta()
        .args(["apply"])
        .arg(format!("oci:{}", f.path("s").display()))
        .arg(format!("oci:{}", f.path("d").display()))
        .arg(format!("oci:{}", f.path("o").display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("os error 2").count(), 1, "{stderr}");
    assert!(stderr.contains("index.json"), "{stderr}");
}

#[test]
fn written_files_honour_the_umask_and_index_json_keeps_its_mode() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::new();
    let cmd = format!(
        "umask 022 && exec {} apply --quiet oci:{} oci:{} oci:{}",
        env!("CARGO_BIN_EXE_fleetdelta"),
        f.path("s").display(),
        f.path("d").display(),
        f.path("o").display()
    );
    run(std::process::Command::new("sh").args(["-c", &cmd]));
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&f.path("o")), 0o755);
    assert_eq!(mode(&f.path("o/index.json")), 0o644);
    for b in fs::read_dir(f.path("o/blobs/sha256")).unwrap() {
        assert_eq!(mode(&b.unwrap().path()), 0o644);
    }
    fs::set_permissions(f.path("o/index.json"), fs::Permissions::from_mode(0o640)).unwrap();
    let cmd = cmd.replace(&format!("oci:{}", f.path("o").display()), &format!("oci:{}:again", f.path("o").display()));
    run(std::process::Command::new("sh").args(["-c", &cmd]));
    assert_eq!(mode(&f.path("o/index.json")), 0o640, "index.json's mode changed");
}

/// A tmpfs mounted for the test (the tests run as root), unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path, size: &str) -> Self {
        fs::create_dir_all(at).unwrap();
        run(std::process::Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "fleetdelta-test"]).arg(at));
        Mount(at.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn an_empty_mount_point_as_output_is_written_in_place() {
    let f = Fixture::new();
    let _mount = Mount::tmpfs(&f.path("o"), "64m");
    apply(&oci(&f.path("s")), &oci(&f.path("d")), &oci(&f.path("o")), &ApplyOptions::default(), &Silent).unwrap();
    assert_same_image(&f.path("t"), &f.path("o"));
    let stray: Vec<_> =
        fs::read_dir(f.path("o")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with('.')).collect();
    assert!(stray.is_empty(), "{stray:?}");
}
