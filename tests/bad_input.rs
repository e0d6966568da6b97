//! Hostile and broken inputs: each gets a clear error, and nothing is written.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use fleetdelta::format::records::{PatchHeader, Record, RecordWriter, SourceRange};
use fleetdelta::layer::Compression;
use fleetdelta::{apply, diff, info, ApplyOptions, DiffOptions, Error, Level, Silent};
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
        let stray: Vec<_> = fs::read_dir(&self.root).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with('.')).collect();
        assert!(stray.is_empty(), "staging left behind: {stray:?}");
        err
    }

    fn payload_blob(&self) -> PathBuf {
        let m: Value = serde_json::from_slice(&fs::read(self.manifest_path()).unwrap()).unwrap();
        let d = m["layers"][1]["digest"].as_str().unwrap().trim_start_matches("sha256:").to_string();
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
            tars[1] = retar(&tars[1], |patch| {
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
        ("outside source layer", PatchHeader { target_layer: 1, tar_len: 100 }, vec![Record::Copy(SourceRange { layer: 1, offset: 1 << 30, len: 100 }), Record::End]),
    ];
    for (name, header, records) in cases {
        let f = Fixture::new();
        let forged = patch_bytes(header, &records);
        reseal(&f.path("d"), |tars, _| tars[1] = retar(&tars[1], |p| *p = forged.clone()));
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
    reseal(&f.path("d"), |tars, _| tars[1] = retar(&tars[1], |p| *p = bomb.clone()));
    let err = f.apply_fails("s", "o");
    assert!(matches!(err, Error::Malformed { .. }), "{err}");

    // The same with a window far larger than a patch stream may use: refused up front.
    let f = Fixture::new();
    let big_window = zstd::encode_all(&raw[..], 19).unwrap();
    reseal(&f.path("d"), |tars, _| tars[1] = retar(&tars[1], |p| *p = big_window.clone()));
    let err = f.apply_fails("s", "o");
    contains(&err, "memory");
}

#[test]
fn unknown_format_version_is_refused_with_a_clear_error() {
    let f = Fixture::new();
    reseal(&f.path("d"), |_, m| m["annotations"]["io.fleetdelta.delta.version"] = Value::from("2"));
    let err = f.apply_fails("s", "o");
    assert!(matches!(err, Error::UnsupportedFormatVersion { .. }), "{err}");
    contains(&err, "version 2");
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

#[test]
fn a_damaged_source_layer_is_caught_by_its_digest() {
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

fn edit_plan(delta: &Path, edit: impl FnOnce(&mut Value)) {
    reseal(delta, |tars, _| {
        tars[0] = retar_file(&tars[0], "delta.json", |p| {
            let mut plan: Value = serde_json::from_slice(p).unwrap();
            edit(&mut plan);
            *p = serde_json::to_vec(&plan).unwrap();
        })
    });
}

#[test]
fn a_lying_encoder_descriptor_is_caught_by_the_blob_digest_and_nothing_is_written() {
    let sample_v1 = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/sample/v1");
    type Edit = fn(&mut Value);
    let cases: [(&str, Edit); 4] = [
        ("block size", |p| p["layers"][1]["encoding"]["descriptor"]["encoder"]["block_size"] = Value::from(131072)),
        ("header mtime", |p| p["layers"][1]["encoding"]["descriptor"]["header"]["mtime"] = Value::from(1)),
        ("undeclared feature", |p| p["features"] = Value::from(Vec::<String>::new())),
        ("unknown feature", |p| p["features"] = Value::from(vec!["exact-gzip", "exact-brotli"])),
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
            "block size" | "header mtime" => matches!(&err, Error::DigestMismatch { what, .. } if what.contains("re-encoded exactly")),
            "undeclared feature" => matches!(err, Error::Malformed { .. }),
            _ => matches!(err, Error::Unsupported { .. }),
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
            p["layers"][1]["members"][0]["descriptor"] = serde_json::json!({"encoder": {"kind": "zlib", "level": 6}, "header": {"mtime": 0, "xfl": 0, "os": 3}});
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
        reseal(&d, |tars, _| tars[layer] = retar(&tars[layer], edit));
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
            tars[layer] = retar(&tars[layer], |c| {
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
    let cases: [(&str, Edit); 5] = [
        ("header mtime", |p| p["layers"][0]["encoding"]["header"]["mtime"] = Value::from(1)),
        ("undeclared feature", |p| p["features"] = Value::from(Vec::<String>::new())),
        ("other engine", |p| p["layers"][0]["encoding"]["engine"] = Value::from("preflate-rs 0.8.0")),
        ("corrections in the patch layer", |p| p["layers"][0]["encoding"]["correctionsLayer"] = p["layers"][0]["deltaLayer"].clone()),
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
