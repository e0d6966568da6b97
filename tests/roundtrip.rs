//! Round trips: diff then apply must rebuild the target image exactly, whatever the edits.

mod common;

use common::*;
use fleetdelta::format::plan::Method;
use fleetdelta::layer::Compression;
use fleetdelta::{apply, diff, info, ApplyOptions, DiffOptions, LayerOutput, Level, Silent};
use proptest::prelude::*;
use std::path::Path;

fn roundtrip(dir: &Path, source: &[Tree], target: &[Tree], sc: Compression, tc: Compression, level: Level) -> fleetdelta::ApplyReport {
    let (s, t, d, o) = (dir.join("s"), dir.join("t"), dir.join("d"), dir.join("o"));
    for p in [&s, &t, &d, &o] {
        let _ = std::fs::remove_dir_all(p);
    }
    write_image(&s, "latest", &source.iter().map(layer_tar).collect::<Vec<_>>(), sc);
    write_image(&t, "latest", &target.iter().map(layer_tar).collect::<Vec<_>>(), tc);
    diff(&oci(&s), &oci(&t), &oci(&d), &DiffOptions { level, ..Default::default() }, &Silent).unwrap();
    let report = apply(&oci(&s), &oci(&d), &oci(&o), &ApplyOptions::default(), &Silent).unwrap();
    assert_same_image(&t, &o);
    let u = dir.join("u");
    let _ = std::fs::remove_dir_all(&u);
    let opts = ApplyOptions { layers: LayerOutput::Uncompressed, ..Default::default() };
    apply(&oci(&s), &oci(&d), &oci(&u), &opts, &Silent).unwrap();
    assert_same_image(&t, &u);
    report
}

#[derive(Clone, Debug)]
enum Edit {
    Add { layer: usize, path: String, seed: u64, len: usize },
    Remove { pick: usize },
    Rename { pick: usize, to: String },
    Modify { pick: usize, at: f64, insert: usize, delete: usize, seed: u64 },
    Chmod { pick: usize, mode: u32 },
    Touch { pick: usize, mtime: u64 },
}

#[derive(Clone, Debug)]
enum LayerChange {
    Keep,
    Reverse,
    DropFirst,
    AddLayer(u64),
    /// Built again `n` seconds later: every file's mtime moves.
    Rebuilt(u16),
}

fn path_strategy() -> impl Strategy<Value = String> {
    (0..4u8, 0..12u8, prop::sample::select(vec!["txt", "so.1", "py", "bin"])).prop_map(|(d, f, ext)| format!("dir{d}/file{f}.{ext}"))
}

fn tree_strategy() -> impl Strategy<Value = Tree> {
    prop::collection::btree_map(path_strategy(), (any::<u64>(), 0..40_000usize), 1..16)
        .prop_map(|m| m.into_iter().map(|(p, (seed, len))| (p, file(text(seed, len)))).collect())
}

fn edit_strategy() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (0..3usize, path_strategy(), any::<u64>(), 0..30_000usize).prop_map(|(layer, path, seed, len)| Edit::Add { layer, path, seed, len }),
        any::<usize>().prop_map(|pick| Edit::Remove { pick }),
        (any::<usize>(), path_strategy()).prop_map(|(pick, to)| Edit::Rename { pick, to }),
        (any::<usize>(), 0.0..1.0f64, 0..3000usize, 0..3000usize, any::<u64>()).prop_map(|(pick, at, insert, delete, seed)| Edit::Modify {
            pick,
            at,
            insert,
            delete,
            seed
        }),
        (any::<usize>(), prop::sample::select(vec![0o600u32, 0o755, 0o4755])).prop_map(|(pick, mode)| Edit::Chmod { pick, mode }),
        (any::<usize>(), any::<u32>()).prop_map(|(pick, t)| Edit::Touch { pick, mtime: t as u64 }),
    ]
}

fn pick(layers: &mut [Tree], n: usize) -> Option<(usize, String)> {
    let all: Vec<(usize, String)> = layers.iter().enumerate().flat_map(|(i, t)| t.keys().map(move |k| (i, k.clone()))).collect();
    (!all.is_empty()).then(|| all[n % all.len()].clone())
}

fn apply_edits(mut layers: Vec<Tree>, edits: &[Edit], change: &LayerChange) -> Vec<Tree> {
    for e in edits {
        match e {
            Edit::Add { layer, path, seed, len } => {
                let l = *layer % layers.len();
                layers[l].insert(path.clone(), file(text(*seed, *len)));
            }
            Edit::Remove { pick: n } => {
                if let Some((l, p)) = pick(&mut layers, *n) {
                    layers[l].remove(&p);
                }
            }
            Edit::Rename { pick: n, to } => {
                if let Some((l, p)) = pick(&mut layers, *n) {
                    let node = layers[l].remove(&p).unwrap();
                    layers[l].insert(to.clone(), node);
                }
            }
            Edit::Modify { pick: n, at, insert, delete, seed } => {
                if let Some((l, p)) = pick(&mut layers, *n) {
                    if let Some(Node::File { data, .. }) = layers[l].get_mut(&p) {
                        let pos = (data.len() as f64 * at) as usize;
                        let end = (pos + delete).min(data.len());
                        data.splice(pos..end, text(*seed, *insert));
                    }
                }
            }
            Edit::Chmod { pick: n, mode: m } => {
                if let Some((l, p)) = pick(&mut layers, *n) {
                    if let Some(Node::File { mode, .. }) = layers[l].get_mut(&p) {
                        *mode = *m;
                    }
                }
            }
            Edit::Touch { pick: n, mtime: t } => {
                if let Some((l, p)) = pick(&mut layers, *n) {
                    if let Some(Node::File { mtime, .. }) = layers[l].get_mut(&p) {
                        *mtime = *t;
                    }
                }
            }
        }
    }
    match change {
        LayerChange::Keep => {}
        LayerChange::Reverse => layers.reverse(),
        LayerChange::DropFirst if layers.len() > 1 => {
            layers.remove(0);
        }
        LayerChange::DropFirst => {}
        LayerChange::Rebuilt(secs) => {
            for node in layers.iter_mut().flat_map(|t| t.values_mut()) {
                if let Node::File { mtime, .. } = node {
                    *mtime += u64::from(*secs);
                }
            }
        }
        LayerChange::AddLayer(seed) => {
            let mut t = Tree::new();
            t.insert(format!("extra/{seed}.txt"), file(text(*seed, 5000)));
            t.insert("extra".into(), Node::Dir { mode: 0o755 });
            t.insert("extra/link".into(), Node::Symlink { target: "../dir0".into() });
            layers.push(t);
        }
    }
    layers
}

fn compression_strategy() -> impl Strategy<Value = Compression> {
    prop::sample::select(vec![Compression::None, Compression::Gzip, Compression::Zstd])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_edits_round_trip(
        source in prop::collection::vec(tree_strategy(), 1..4),
        edits in prop::collection::vec(edit_strategy(), 0..12),
        change in prop_oneof![Just(LayerChange::Keep), Just(LayerChange::Reverse), Just(LayerChange::DropFirst), any::<u64>().prop_map(LayerChange::AddLayer), any::<u16>().prop_map(LayerChange::Rebuilt)],
        sc in compression_strategy(),
        tc in compression_strategy(),
        level in prop::sample::select(vec![Level::Fast, Level::Default, Level::Max]),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let target = apply_edits(source.clone(), &edits, &change);
        roundtrip(dir.path(), &source, &target, sc, tc, level);
    }
}

#[test]
fn unchanged_layers_cost_nothing_and_keep_their_blob_digest() {
    let dir = tempfile::tempdir().unwrap();
    let base: Tree = (0..20).map(|i| (format!("base/{i}"), file(text(i, 3000)))).collect();
    let app1: Tree = (0..20).map(|i| (format!("app/{i}.py"), file(text(100 + i, 8000)))).collect();
    let mut app2 = app1.clone();
    if let Some(Node::File { data, .. }) = app2.get_mut("app/3.py") {
        data.extend_from_slice(b"\nprint('v2')\n");
    }
    let report = roundtrip(dir.path(), &[base.clone(), app1], &[base, app2], Compression::Gzip, Compression::Gzip, Level::Default);
    assert!(report.layers[0].identical, "the unchanged base layer keeps its digest");
    let i = info(&oci(&dir.path().join("d"))).unwrap();
    assert_eq!(i.layers[0].method, Method::Source);
    assert_eq!(i.layers[0].payload_bytes, 0);
    assert_eq!(i.layers[1].method, Method::Patch);
    let stats = i.layers[1].stats.as_ref().unwrap();
    assert_eq!((stats.files, stats.files_unchanged, stats.files_similar), (20, 19, 1));
    assert!(i.layers[1].payload_bytes < 3_000, "a one-line change costs {} bytes", i.layers[1].payload_bytes);
}

/// A tree of `n` small files with directories between them, every file's mtime `mtime`.
fn app_tree(n: u64, mtime: u64) -> Tree {
    let mut t = Tree::new();
    for i in 0..n {
        if i % 10 == 0 {
            t.insert(format!("app/m{:03}", i / 10), Node::Dir { mode: 0o755 });
        }
        t.insert(format!("app/m{:03}/f{i}.js", i / 10), Node::File { data: text(i, 200 + (i as usize * 37) % 3000), mode: 0o644, mtime });
    }
    t
}

#[test]
fn a_rebuild_seconds_later_costs_its_changes_not_its_headers() {
    // The same tree built twice, 5 s apart, with one file changed: every header differs (mtime
    // and checksum). Retimed runs of the source entries make it cost what the same change
    // costs without the moved mtimes.
    let payload = |dir: &Path, shift: u64| {
        let v1 = app_tree(400, 1_700_000_000);
        let mut v2 = app_tree(400, 1_700_000_000 + shift);
        if let Some(Node::File { data, .. }) = v2.get_mut("app/m020/f200.js") {
            data.extend_from_slice(b"\nexport const version = 2;\n");
        }
        roundtrip(dir, &[v1], &[v2], Compression::Gzip, Compression::Gzip, Level::Default);
        let i = info(&oci(&dir.join("d"))).unwrap();
        (i.layers[0].payload_bytes, i.layers[0].stats.clone().unwrap(), i.features)
    };
    let dir = tempfile::tempdir().unwrap();
    let (same_time, _, features) = payload(dir.path(), 0);
    assert!(!features.iter().any(|f| f == "retimed-headers"), "nothing to retime: {features:?}");
    let (moved, stats, features) = payload(dir.path(), 5);
    assert!(features.iter().any(|f| f == "retimed-headers"), "{features:?}");
    assert!(stats.retimed_headers >= 399 + 30, "files and directories: {stats:?}");
    assert!(moved <= same_time + 64, "moved mtimes cost {moved} bytes, the same change without them {same_time}");
}

#[test]
fn unchanged_directory_headers_between_changed_files_are_copied() {
    // Every file changes (a line appended: new size, new header), none of the 40 directories
    // does: their headers are copies of the source's, not literals between the files'.
    let v1 = app_tree(400, 1_700_000_000);
    let mut v2 = v1.clone();
    for node in v2.values_mut() {
        if let Node::File { data, .. } = node {
            data.extend_from_slice(b"\nexport const version = 2;\n");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    roundtrip(dir.path(), &[v1], &[v2], Compression::Gzip, Compression::Gzip, Level::Default);
    let stats = info(&oci(&dir.path().join("d"))).unwrap().layers[0].stats.clone().unwrap();
    assert_eq!((stats.files, stats.files_unchanged), (400, 0), "{stats:?}");
    assert!(stats.copied_bytes >= 40 * 512, "the directories' headers: {stats:?}");
}

#[test]
fn a_same_length_edit_costs_its_bytes_not_the_headers_after_directories() {
    // One file of 400 edited in place (same length, same header), 40 directories between the
    // files: every other header, padding and file is a copy, whatever precedes it.
    let v1 = app_tree(400, 1_700_000_000);
    let mut v2 = v1.clone();
    if let Some(Node::File { data, .. }) = v2.get_mut("app/m020/f200.js") {
        data[10..14].copy_from_slice(b"v2!!");
    }
    let dir = tempfile::tempdir().unwrap();
    for level in [Level::Fast, Level::Default, Level::Max] {
        roundtrip(dir.path(), std::slice::from_ref(&v1), std::slice::from_ref(&v2), Compression::Gzip, Compression::Gzip, level);
        let stats = info(&oci(&dir.path().join("d"))).unwrap().layers[0].stats.clone().unwrap();
        assert_eq!((stats.files, stats.files_unchanged), (400, 399), "{level:?}: {stats:?}");
        assert!(stats.literal_bytes <= 4_096, "{level:?}: {} bytes of literals for a 4-byte edit: {stats:?}", stats.literal_bytes);
    }
}

#[test]
fn a_binary_whose_addresses_moved_costs_its_edits_not_a_sequence_per_address() {
    // A 640 KiB executable-like file: a 32-bit address every 16 bytes, all moved by 0x40 in
    // v2 (code moved), a version string edited and a function inserted. Byte matchers pay a
    // sequence per address; approximate matches (ADD records) carry differences that are
    // mostly zeros and repeat.
    let mut old = Vec::new();
    let mut state = 0x9e37_79b9_u32;
    for i in 0..40_000u32 {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        old.extend_from_slice(&(0x40_0000 + i * 24).to_le_bytes());
        old.extend_from_slice(&state.to_le_bytes());
        old.extend_from_slice(&[0x48, 0x8b, 0x05, (i % 7) as u8, 0xe8, 0x90, 0x90, 0xc3]);
    }
    let mut new = old.clone();
    for piece in new.chunks_mut(16) {
        let v = u32::from_le_bytes(piece[..4].try_into().unwrap()) + 0x40;
        piece[..4].copy_from_slice(&v.to_le_bytes());
    }
    new[1000..1010].copy_from_slice(b"v2.0.31-fd");
    new.splice(300_000..300_000, text(7, 700));
    let tree = |app: Vec<u8>| -> Tree { [("usr/bin/app".to_string(), file(app)), ("etc/motd".to_string(), file(text(1, 2000)))].into_iter().collect() };
    let (v1, v2) = (tree(old), tree(new));
    let dir = tempfile::tempdir().unwrap();
    let payload = |level: Level| {
        roundtrip(dir.path(), std::slice::from_ref(&v1), std::slice::from_ref(&v2), Compression::Gzip, Compression::Gzip, level);
        let i = info(&oci(&dir.path().join("d"))).unwrap();
        (i.layers[0].payload_bytes, i.layers[0].stats.clone().unwrap(), i.features)
    };
    let (fast, _, features) = payload(Level::Fast);
    assert!(!features.iter().any(|f| f == "add-ranges"), "the fast level codes literals: {features:?}");
    let mut sizes = Vec::new();
    // The differences travel in difference chunks (LZMA), apart from the literals; the differ
    // no longer writes ADD records (the applier still reads them, see tests/bad_input.rs).
    for level in [Level::Max, Level::Default] {
        let feature = "difference-chunks";
        let (approximated, stats, features) = payload(level);
        assert!(features.iter().any(|f| f == feature), "{level:?}: {features:?}");
        assert!(!features.iter().any(|f| f == "add-ranges"), "{level:?}: {features:?}");
        assert_eq!(stats.files_approximated, 1, "{level:?}: {stats:?}");
        assert!(stats.added_bytes > 600_000, "{level:?}: {stats:?}");
        assert!(stats.difference_chunks > 0, "{level:?}: {stats:?}");
        assert!(approximated * 4 < fast, "{level:?}: approximate matches take {approximated} bytes, literals at the fast level {fast}");
        sizes.push(approximated);

        // A delta whose plan hides the feature is refused at the first record that needs it.
        let d = dir.path().join("d");
        edit_plan(&d, |p| p["features"].as_array_mut().unwrap().retain(|f| f != feature));
        let err = apply(&oci(&dir.path().join("s")), &oci(&d), &oci(&dir.path().join("o2")), &ApplyOptions::default(), &Silent).unwrap_err().to_string();
        assert!(err.contains(&format!("does not declare \"{feature}\"")), "{err}");
        assert!(!dir.path().join("o2").exists(), "nothing written");
    }
    assert!(sizes[0] <= sizes[1], "max {} bytes, default {}", sizes[0], sizes[1]);
}

#[test]
fn a_one_line_change_in_a_large_layer_costs_under_two_kilobytes_in_all() {
    // The fixed cost of a delta: manifest, config, metadata and the patch, for a same-length
    // edit of one line of one file among 3000 (format 2: one layer, short annotations).
    let dir = tempfile::tempdir().unwrap();
    let v1: Tree = (0..3000).map(|i| (format!("usr/share/doc/p{}/f{i}", i / 30), file(text(i, 1000 + (i as usize * 131) % 9000)))).collect();
    let mut v2 = v1.clone();
    if let Some(Node::File { data, .. }) = v2.get_mut("usr/share/doc/p50/f1500") {
        data[400..414].copy_from_slice(b"HISTSIZE=5000\n");
    }
    roundtrip(dir.path(), &[v1], &[v2], Compression::Gzip, Compression::Gzip, Level::Default);
    let i = info(&oci(&dir.path().join("d"))).unwrap();
    assert_eq!(i.format_version, 2);
    assert!(i.payload_bytes <= 2000, "the whole delta image is {} bytes", i.payload_bytes);
    let layout = fleetdelta::image::Layout::open(dir.path().join("d")).unwrap();
    assert_eq!(layout.load_image(None).unwrap().layers.len(), 1, "a small patch shares the metadata layer");
}

#[test]
fn identical_images_rebuild_with_the_same_manifest_digest() {
    let dir = tempfile::tempdir().unwrap();
    let t: Tree = (0..5).map(|i| (format!("f{i}"), file(text(i, 1000)))).collect();
    let both = std::slice::from_ref(&t);
    let report = roundtrip(dir.path(), both, both, Compression::Gzip, Compression::Gzip, Level::Fast);
    assert!(report.identical());
    assert_eq!(report.written_manifest, report.target_manifest);
}

#[test]
fn files_larger_than_a_chunk_are_split_and_still_match_their_partner() {
    let dir = tempfile::tempdir().unwrap();
    let big = text(7, 11 << 20);
    let mut changed = big.clone();
    for k in 0..20 {
        let at = k * (changed.len() / 20);
        changed.splice(at..at + 100, text(k as u64 + 1000, 150));
    }
    let s: Tree = [("big.bin".to_string(), file(big.clone()))].into();
    let t: Tree = [("big.bin".to_string(), file(changed))].into();
    roundtrip(dir.path(), &[s], &[t], Compression::Zstd, Compression::Gzip, Level::Fast);
    let i = info(&oci(&dir.path().join("d"))).unwrap();
    let stats = i.layers[0].stats.clone().unwrap();
    assert!(stats.chunks >= 3, "{stats:?}");
    assert!(i.layers[0].payload_bytes < 200_000, "payload {} for 20 small edits of an 11 MiB file", i.layers[0].payload_bytes);
}

#[test]
fn a_layer_with_nothing_in_common_is_carried_as_its_blob() {
    let dir = tempfile::tempdir().unwrap();
    // Random bytes do not compress: the patch cannot beat the blob by the required margin.
    let mut x = 0x9e3779b97f4a7c15u64;
    let noise: Vec<u8> = (0..50_000)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545f4914f6cdd1d) >> 56) as u8
        })
        .collect();
    let s: Tree = [("a".to_string(), file(text(1, 100)))].into();
    let t: Tree = [("b".to_string(), file(noise))].into();
    let report = roundtrip(dir.path(), &[s], &[t], Compression::Gzip, Compression::Gzip, Level::Fast);
    assert_eq!(report.layers[0].method, Method::Blob);
    assert!(report.identical(), "a carried blob keeps its digest");
}

#[test]
fn deltas_are_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let s: Tree = (0..30).map(|i| (format!("f{i}"), file(text(i, 20_000)))).collect();
    let mut t = s.clone();
    t.insert("new".into(), file(text(99, 5000)));
    write_image(&dir.path().join("s"), "latest", &[layer_tar(&s)], Compression::Gzip);
    write_image(&dir.path().join("t"), "latest", &[layer_tar(&t)], Compression::Gzip);
    let mut digests = Vec::new();
    for name in ["d1", "d2"] {
        let r = diff(&oci(&dir.path().join("s")), &oci(&dir.path().join("t")), &oci(&dir.path().join(name)), &DiffOptions::default(), &Silent).unwrap();
        digests.push(r.delta_manifest);
    }
    assert_eq!(digests[0], digests[1]);
}

#[test]
fn docker_schema2_images_round_trip_and_keep_their_media_types() {
    let dir = tempfile::tempdir().unwrap();
    let base: Tree = (0..8).map(|i| (format!("usr/lib/{i}.so"), file(text(i, 9000)))).collect();
    let app1: Tree = (0..8).map(|i| (format!("srv/app/{i}.js"), file(text(40 + i, 7000)))).collect();
    let mut app2 = app1.clone();
    app2.insert("srv/app/new.js".into(), file(text(99, 3000)));
    let (s, t, d, o) = (dir.path().join("s"), dir.path().join("t"), dir.path().join("d"), dir.path().join("o"));
    write_image_as(&s, "latest", &[layer_tar(&base), layer_tar(&app1)], Compression::Gzip, true);
    write_image_as(&t, "latest", &[layer_tar(&base), layer_tar(&app2)], Compression::Gzip, true);
    diff(&oci(&s), &oci(&t), &oci(&d), &DiffOptions::default(), &Silent).unwrap();
    let report = apply(&oci(&s), &oci(&d), &oci(&o), &ApplyOptions::default(), &Silent).unwrap();
    assert_same_image(&t, &o);
    assert!(report.layers[0].identical);
    let image = fleetdelta::image::Layout::open(&o).unwrap().load_image(None).unwrap();
    assert_eq!(image.manifest.media_type, fleetdelta::image::manifest::DOCKER_MANIFEST);
    assert!(image.layers.iter().all(|l| l.blob.media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip"));
}

#[test]
fn a_layer_only_recompressed_is_re_encoded_exactly_or_carried_whole() {
    use fleetdelta::diff::Fidelity;
    use fleetdelta::format::plan::Encoding;
    let dir = tempfile::tempdir().unwrap();
    let tree: Tree = (0..30).map(|i| (format!("lib/{i}.so"), file(text(i, 20_000)))).collect();
    let tars = [layer_tar(&tree)];
    let (zstd, gzip) = (dir.path().join("zstd"), dir.path().join("gzip"));
    // zstd at level 19: not what the applier's own zstd (level 3) would write.
    write_image_with(&zstd, "latest", &tars, Compression::Zstd, false, |tar| zstd::encode_all(tar, 19).unwrap());
    write_image(&gzip, "latest", &tars, Compression::Gzip);

    // zstd -> Go gzip: the same tar, re-encoded exactly: nothing but the plan to download.
    let d = dir.path().join("d1");
    diff(&oci(&zstd), &oci(&gzip), &oci(&d), &DiffOptions::default(), &Silent).unwrap();
    let i = info(&oci(&d)).unwrap();
    assert_eq!(i.layers[0].method, Method::Source);
    assert!(matches!(i.layers[0].encoding, Some(Encoding::Exact { .. })), "{:?}", i.layers[0].encoding);
    let o = dir.path().join("o1");
    let report = apply(&oci(&zstd), &oci(&d), &oci(&o), &ApplyOptions::default(), &Silent).unwrap();
    assert!(report.identical(), "the rebuilt image has the target's manifest digest");

    // Go gzip -> zstd: no encoder reproduces the zstd blob. Exact fidelity carries it whole;
    // content fidelity recompresses it and says the digest will differ.
    for (fidelity, keeps_digest) in [(Fidelity::Exact, true), (Fidelity::Content, false)] {
        let d = dir.path().join(format!("d-{fidelity:?}"));
        diff(&oci(&gzip), &oci(&zstd), &oci(&d), &DiffOptions { fidelity, ..Default::default() }, &Silent).unwrap();
        let i = info(&oci(&d)).unwrap();
        let expected = if keeps_digest { Method::Blob } else { Method::Source };
        assert_eq!(i.layers[0].method, expected, "{fidelity:?}");
        let o = dir.path().join(format!("o-{fidelity:?}"));
        let report = apply(&oci(&gzip), &oci(&d), &oci(&o), &ApplyOptions::default(), &Silent).unwrap();
        assert_eq!(report.identical(), keeps_digest, "{fidelity:?}");
        assert_same_image(&zstd, &o);
    }
}

#[test]
fn gzip_files_inside_layers_are_patched_uncompressed_and_repacked_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let pair = members_pair(dir.path());
    let d = dir.path().join("d");
    diff(&oci(&pair.source), &oci(&pair.target), &oci(&d), &DiffOptions::default(), &Silent).unwrap();
    let i = info(&oci(&d)).unwrap();
    let docs = &i.layers[1];
    assert_eq!(docs.method, Method::Patch);
    assert_eq!(docs.repacked_members, pair.expandable, "the changed GNU gzip files, and only those");
    // Compressed, each changed file would cost about its size; patched as text, a fraction
    // (beside the files that stay compressed).
    let budget = pair.expandable_bytes / 4 + pair.other_changed_bytes;
    assert!(
        docs.payload_bytes < budget,
        "payload {} for {} bytes of expanded and {} of other changed gzip files",
        docs.payload_bytes,
        pair.expandable_bytes,
        pair.other_changed_bytes
    );
    rebuilds_exactly_and_fast_costs_more(dir.path(), &pair.source, &pair.target, &d, docs.payload_bytes);
}

#[test]
fn zip_entries_inside_layers_are_patched_uncompressed_and_repacked_exactly() {
    use fleetdelta::format::plan::FEATURE_DEFLATE_MEMBERS;
    let dir = tempfile::tempdir().unwrap();
    let pair = zips_pair(dir.path());
    let d = dir.path().join("d");
    diff(&oci(&pair.source), &oci(&pair.target), &oci(&d), &DiffOptions::default(), &Silent).unwrap();
    let i = info(&oci(&d)).unwrap();
    let app = &i.layers[1];
    assert_eq!(app.method, Method::Patch);
    let zip_entries: u64 = app.repacked_members.iter().filter(|(k, _)| k.starts_with("zip entries by ")).map(|(_, n)| n).sum();
    assert_eq!(zip_entries, pair.expandable, "the changed deflated entries with partners, and only those: {:?}", app.repacked_members);
    assert_eq!(app.repacked_members.len(), 1, "all written by zlib's deflate at level 6 (or gzip's, identical on these): {:?}", app.repacked_members);
    let plan = fleetdelta::package::DeltaImage::open(&oci(&d)).unwrap().plan;
    assert!(plan.features.iter().any(|f| f == FEATURE_DEFLATE_MEMBERS), "{:?}", plan.features);
    // Left compressed, the rebuilt classes would cost most of the zips' size.
    assert!(app.payload_bytes < pair.changed_zip_bytes / 4, "payload {} for {} bytes of changed zips", app.payload_bytes, pair.changed_zip_bytes);
    rebuilds_exactly_and_fast_costs_more(dir.path(), &pair.source, &pair.target, &d, app.payload_bytes);
}

/// For a delta `d` that expands compressed files in target layer 1 (whose payload is
/// `payload`): it rebuilds the target bit-exactly, or with plain tars when asked; the fast
/// level expands nothing, costs more than twice as much, and rebuilds the target exactly too.
fn rebuilds_exactly_and_fast_costs_more(dir: &Path, source: &Path, target: &Path, d: &Path, payload: u64) {
    for layers in [LayerOutput::Original, LayerOutput::Uncompressed] {
        let o = dir.join(format!("o-{layers:?}"));
        let report = apply(&oci(source), &oci(d), &oci(&o), &ApplyOptions { layers, ..Default::default() }, &Silent).unwrap();
        assert_eq!(report.identical(), layers == LayerOutput::Original);
        assert_same_image(target, &o);
    }
    let fast = dir.join("fast");
    diff(&oci(source), &oci(target), &oci(&fast), &DiffOptions { level: Level::Fast, ..Default::default() }, &Silent).unwrap();
    let f = info(&oci(&fast)).unwrap();
    assert!(f.layers[1].repacked_members.is_empty());
    assert!(f.layers[1].payload_bytes > 2 * payload, "fast {} vs default {payload}", f.layers[1].payload_bytes);
    let o = dir.join("o-fast");
    assert!(apply(&oci(source), &oci(&fast), &oci(&o), &ApplyOptions::default(), &Silent).unwrap().identical());
}

/// Images of a base layer and an app layer, both compressed by `pigz -9n` (zlib's deflate in
/// 128 KiB blocks with sync flushes, which no exact encoder reproduces), the target with
/// edits in the app layer.
fn pigz_pair(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let base: Tree = (0..10).map(|i| (format!("usr/lib/lib{i}.so"), file(text(i, 20_000)))).collect();
    let app: Tree = (0..40).map(|i| (format!("srv/app/{i}.py"), file(text(100 + i, 16_000)))).collect();
    let mut app2 = app.clone();
    for i in [3, 17, 30] {
        if let Some(Node::File { data, .. }) = app2.get_mut(&format!("srv/app/{i}.py")) {
            data.splice(5_000..5_100, text(900 + i, 300));
        }
    }
    app2.insert("srv/app/new.py".into(), file(text(999, 9_000)));
    let pigz = |tar: &[u8]| filter(tool("pigz").arg("-9n").arg("-c"), tar);
    let (s, t) = (dir.join("s"), dir.join("t"));
    write_image_with(&s, "latest", &[layer_tar(&base), layer_tar(&app)], Compression::Gzip, false, pigz);
    write_image_with(&t, "latest", &[layer_tar(&base), layer_tar(&app2)], Compression::Gzip, false, pigz);
    (s, t)
}

#[test]
fn a_pigz_layer_is_rebuilt_bit_exactly_with_corrections() {
    use fleetdelta::diff::Fidelity;
    use fleetdelta::format::plan::Encoding;
    let dir = tempfile::tempdir().unwrap();
    let (s, t) = pigz_pair(dir.path());
    for fidelity in [Fidelity::Exact, Fidelity::Content] {
        let d = dir.path().join(format!("d-{fidelity:?}"));
        diff(&oci(&s), &oci(&t), &oci(&d), &DiffOptions { fidelity, ..Default::default() }, &Silent).unwrap();
        let i = info(&oci(&d)).unwrap();
        let app = &i.layers[1];
        assert_eq!(app.method, Method::Patch, "{fidelity:?}");
        assert!(matches!(app.encoding, Some(Encoding::Corrected { .. })), "{fidelity:?}: {:?}", app.encoding);
        assert!(
            app.corrections_bytes > 0 && app.corrections_bytes < app.blob_bytes / 10,
            "{} bytes of corrections for a {}-byte blob",
            app.corrections_bytes,
            app.blob_bytes
        );
        assert!(app.encoding_summary().starts_with("corrected (preflate, "), "{}", app.encoding_summary());
        assert!(app.payload_bytes < app.blob_bytes / 4, "payload {} for a {}-byte blob", app.payload_bytes, app.blob_bytes);
        eprintln!(
            "pigz -9n layer of {} bytes: {} ({} bytes of corrections, {:.2}%)",
            app.blob_bytes,
            app.encoding_summary(),
            app.corrections_bytes,
            100.0 * app.corrections_bytes as f64 / app.blob_bytes as f64
        );
        for layers in [LayerOutput::Original, LayerOutput::Uncompressed] {
            let o = dir.path().join(format!("o-{fidelity:?}-{layers:?}"));
            let started = std::time::Instant::now();
            let report = apply(&oci(&s), &oci(&d), &oci(&o), &ApplyOptions { layers, ..Default::default() }, &Silent).unwrap();
            eprintln!("apply ({layers:?}) in {:?}", started.elapsed());
            assert_eq!(report.identical(), layers == LayerOutput::Original, "{fidelity:?} {layers:?}");
            assert_same_image(&t, &o);
        }
    }

    // The same tar compressed another way: only the corrections travel.
    let go = dir.path().join("go");
    let tars = layer_tars(&t, None);
    write_image(&go, "latest", &tars, Compression::Gzip);
    let d = dir.path().join("d-recompressed");
    diff(&oci(&go), &oci(&t), &oci(&d), &DiffOptions::default(), &Silent).unwrap();
    let i = info(&oci(&d)).unwrap();
    for l in &i.layers {
        assert_eq!(l.method, Method::Source);
        assert!(matches!(l.encoding, Some(Encoding::Corrected { .. })), "{:?}", l.encoding);
        assert_eq!(l.payload_bytes, l.corrections_bytes);
    }
    let o = dir.path().join("o-recompressed");
    assert!(apply(&oci(&go), &oci(&d), &oci(&o), &ApplyOptions::default(), &Silent).unwrap().identical());
    assert_same_image(&t, &o);
}

/// What a progress display is told: each stage with its total, and what was advanced in it.
#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<(String, u64, u64, u32)>>);

impl fleetdelta::Progress for Recorder {
    fn stage(&self, name: &str, total: u64) {
        self.0.lock().unwrap().push((name.to_string(), total, 0, 0));
    }
    fn advance(&self, n: u64) {
        if let Some(last) = self.0.lock().unwrap().last_mut() {
            last.2 += n;
            last.3 += 1;
        }
    }
}

/// Every stage of diff and apply with a size counts bytes (not layers) up to exactly that
/// size, and the encoding of a single layer moves as its patch is written, not once at its
/// end (a gzip file inside the layer, so that the expanded tar is what is counted).
#[test]
fn progress_stages_count_their_bytes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let gz = |seed| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        std::io::Write::write_all(&mut e, &text(seed, 200_000)).unwrap();
        e.finish().unwrap()
    };
    let s: Tree = (0..20).map(|i| (format!("f{i}"), file(text(i, 30_000)))).chain([("data.gz".to_string(), file(gz(7)))]).collect();
    let mut t = s.clone();
    t.insert("new".into(), file(text(99, 50_000)));
    t.insert("data.gz".into(), file(gz(8)));
    write_image(&dir.path().join("s"), "latest", &[layer_tar(&s)], Compression::Gzip);
    write_image(&dir.path().join("t"), "latest", &[layer_tar(&t)], Compression::Gzip);
    let (s, t, d, o) = (oci(&dir.path().join("s")), oci(&dir.path().join("t")), oci(&dir.path().join("d")), oci(&dir.path().join("o")));
    let recorded = Recorder::default();
    diff(&s, &t, &d, &DiffOptions::default(), &recorded).unwrap();
    apply(&s, &d, &o, &ApplyOptions::default(), &recorded).unwrap();
    let stages = recorded.0.into_inner().unwrap();
    for name in ["unpacking layers", "encoding layers", "rebuilding layers"] {
        assert!(stages.iter().any(|(n, total, _, _)| n == name && *total > 100_000), "no {name} stage in bytes: {stages:?}");
    }
    for (name, total, done, _) in &stages {
        if *total > 0 {
            assert_eq!(done, total, "stage {name}: {stages:?}");
        }
    }
    let encoding = stages.iter().find(|(n, ..)| n == "encoding layers").unwrap();
    assert!(encoding.3 > 1, "one layer's encoding advanced {} times: {stages:?}", encoding.3);
}
