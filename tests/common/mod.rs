//! Test harness: builds OCI images from file lists, runs diff + apply, checks results
//! independently of the library's own verification, and tampers with deltas.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use fleetdelta::image::manifest::{BlobRef, OCI_CONFIG, OCI_MANIFEST};
use fleetdelta::image::{Layout, LayoutWriter};
use fleetdelta::layer::Compression;
use fleetdelta::{Digest, ImageRef};
use serde_json::{json, Value};

pub mod agent;
pub mod engine;
pub mod http;
pub mod openapi;
pub mod postgres;
pub mod registry;
pub mod schema;
pub mod serve;

/// A command from Debian's packages that the test needs; fails (never skips) without it.
pub fn tool(name: &str) -> std::process::Command {
    let found = std::process::Command::new("sh").arg("-c").arg(format!("command -v {name}")).output().unwrap();
    assert!(found.status.success(), "{name} is required by this test: apt-get install {name}");
    std::process::Command::new(name)
}

/// The fleetdelta binary under test.
pub fn fleetdelta() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_fleetdelta"))
}

/// Seconds a command run by a test may take before it is killed and the test fails, naming
/// it: a hung engine or agent fails its test with what it printed, never stalls the suite.
/// `FLEETDELTA_TEST_COMMAND_SECONDS` overrides it.
pub const COMMAND_SECONDS: u64 = 900;

/// `Command::output` with a deadline ([`COMMAND_SECONDS`]).
pub trait Bounded {
    /// Runs the command to its end (stdin closed, stdout and stderr captured); past the
    /// deadline, kills it and panics with what it printed so far.
    fn output_bounded(&mut self) -> std::process::Output {
        let limit = std::env::var("FLEETDELTA_TEST_COMMAND_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(COMMAND_SECONDS);
        self.output_within(limit)
    }

    /// [`Bounded::output_bounded`] with a deadline of `limit` seconds.
    fn output_within(&mut self, limit: u64) -> std::process::Output;
}

impl Bounded for std::process::Command {
    fn output_within(&mut self, limit: u64) -> std::process::Output {
        use std::process::Stdio;
        let child = self.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("cannot run {self:?}: {e}"));
        wait_within(child, limit, &format!("{self:?}"))
    }
}

/// Waits for a child started with piped stdout and stderr and collects them, like
/// `Child::wait_with_output`; past `limit` seconds, kills it and panics with what it printed.
pub fn wait_within(mut child: std::process::Child, limit: u64, what: &str) -> std::process::Output {
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(limit);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // A grandchild still holding the pipes must not stall the test either.
    let collect = |h: std::thread::JoinHandle<Vec<u8>>| {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !h.is_finished() && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if h.is_finished() {
            h.join().unwrap()
        } else {
            b"(its output is still held open by a process it started)".to_vec()
        }
    };
    let (stdout, stderr) = (collect(stdout), collect(stderr));
    match status {
        Some(status) => std::process::Output { status, stdout, stderr },
        None => panic!(
            "{what} did not finish within {limit} s and was killed; it printed:\n{}{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

/// Runs a command that must succeed (within [`COMMAND_SECONDS`]).
pub fn run(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd.output_bounded();
    assert!(out.status.success(), "{cmd:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

/// Runs a command that must fail with exit code 1; returns its stderr.
pub fn run_failing(cmd: &mut std::process::Command) -> String {
    let out = cmd.output_bounded();
    assert_eq!(out.status.code(), Some(1), "{cmd:?} should fail: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One tar entry to put into a layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    File { data: Vec<u8>, mode: u32, mtime: u64 },
    Dir { mode: u32 },
    Symlink { target: String },
}

pub type Tree = BTreeMap<String, Node>;

pub fn file(data: impl Into<Vec<u8>>) -> Node {
    Node::File { data: data.into(), mode: 0o644, mtime: 1_700_000_000 }
}

/// A layer tar of the tree, in path order, as most builders write it.
pub fn layer_tar(tree: &Tree) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, node) in tree {
        let mut h = tar::Header::new_ustar();
        match node {
            Node::File { data, mode, mtime } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                h.set_mode(*mode);
                h.set_mtime(*mtime);
                b.append_data(&mut h, path, &data[..]).unwrap();
            }
            Node::Dir { mode } => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                h.set_mode(*mode);
                b.append_data(&mut h, path, std::io::empty()).unwrap();
            }
            Node::Symlink { target } => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, path, target).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

pub fn compress(c: Compression, data: &[u8]) -> Vec<u8> {
    match c {
        // As docker and buildkit write layers: Go's compress/gzip at its default level (one of
        // the encoders the differ reproduces exactly).
        Compression::Gzip => go_gzip().encode_to_vec(data).unwrap(),
        _ => {
            let mut e = c.encoder(Vec::new()).unwrap();
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
    }
}

/// Go 1.19's `compress/gzip` at `DefaultCompression`.
pub fn go_gzip() -> fleetdelta::layer::exact::Descriptor {
    use fleetdelta::layer::exact::{Descriptor, Encoder, GoRelease, GzipHeader};
    Descriptor { encoder: Encoder::GoGzip { release: GoRelease::Go1_19 }, header: GzipHeader::go_stdlib_default() }
}

/// A gzip encoder the differ does not know (flate2 at its fast level), for the paths taken
/// when no encoder reproduces a blob.
pub fn unknown_gzip(data: &[u8]) -> Vec<u8> {
    let mut e = Compression::Gzip.encoder(Vec::new()).unwrap();
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Writes an image of the given layer tars into the layout `dir` under `tag`.
pub fn write_image(dir: &Path, tag: &str, layers: &[Vec<u8>], compression: Compression) -> Digest {
    write_image_as(dir, tag, layers, compression, false)
}

/// Like [`write_image`], as a Docker schema 2 image (manifest, config and layer media types)
/// when `docker` is set.
pub fn write_image_as(dir: &Path, tag: &str, layers: &[Vec<u8>], compression: Compression, docker: bool) -> Digest {
    write_image_with(dir, tag, layers, compression, docker, |tar| compress(compression, tar))
}

/// Like [`write_image_as`], with the layer blobs made by `encode` (which must produce
/// `compression`'s format).
pub fn write_image_with(dir: &Path, tag: &str, layers: &[Vec<u8>], compression: Compression, docker: bool, encode: impl Fn(&[u8]) -> Vec<u8>) -> Digest {
    let family = if docker { "application/vnd.docker.image.rootfs.diff.tar" } else { "application/vnd.oci.image.layer.v1.tar" };
    let (manifest_type, config_type) =
        if docker { (fleetdelta::image::manifest::DOCKER_MANIFEST, fleetdelta::image::manifest::DOCKER_CONFIG) } else { (OCI_MANIFEST, OCI_CONFIG) };
    let w = LayoutWriter::create(dir).unwrap();
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in layers {
        let blob = encode(tar);
        let (d, n) = w.put_blob(&blob).unwrap();
        descriptors.push(json!({"mediaType": compression.media_type_like(family), "digest": d.to_string(), "size": n}));
        diff_ids.push(Digest::of(tar).to_string());
    }
    let config = serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}})).unwrap();
    let (cd, cn) = w.put_blob(&config).unwrap();
    let manifest = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": manifest_type,
        "config": {"mediaType": config_type, "digest": cd.to_string(), "size": cn}, "layers": descriptors}))
    .unwrap();
    let (md, mn) = w.put_blob(&manifest).unwrap();
    w.commit(&BlobRef { media_type: manifest_type.into(), digest: md, size: mn }, tag).unwrap();
    md
}

/// One platform's image of a multi-platform index: architecture, variant, layer tars.
pub struct PlatformImage<'a> {
    pub architecture: &'a str,
    pub variant: Option<&'a str>,
    pub layers: Vec<Vec<u8>>,
}

/// Writes a multi-platform image into the layout `dir`: one OCI image per platform (gzip
/// layers, a config naming its `linux/ARCH[/VARIANT]`), each also tagged `TAG-ARCH` as a
/// single image, and an OCI image index of them (each entry with its platform) tagged `tag`.
/// Returns the index digest and the manifest digests in order.
pub fn write_platform_index(dir: &Path, tag: &str, images: &[PlatformImage]) -> (Digest, Vec<Digest>) {
    let mut manifests = Vec::new();
    let mut entries = Vec::new();
    for image in images {
        let w = LayoutWriter::create(dir).unwrap();
        let mut descriptors = Vec::new();
        let mut diff_ids = Vec::new();
        for tar in &image.layers {
            let (d, n) = w.put_blob(&compress(Compression::Gzip, tar)).unwrap();
            descriptors.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d.to_string(), "size": n}));
            diff_ids.push(Digest::of(tar).to_string());
        }
        let mut config = json!({"architecture": image.architecture, "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}});
        let mut platform = json!({"architecture": image.architecture, "os": "linux"});
        if let Some(v) = image.variant {
            config["variant"] = json!(v);
            platform["variant"] = json!(v);
        }
        let (cd, cn) = w.put_blob(&serde_json::to_vec(&config).unwrap()).unwrap();
        let manifest = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": cd.to_string(), "size": cn}, "layers": descriptors}))
        .unwrap();
        let (md, mn) = w.put_blob(&manifest).unwrap();
        w.commit(&BlobRef { media_type: OCI_MANIFEST.into(), digest: md, size: mn }, &format!("{tag}-{}", image.architecture)).unwrap();
        entries.push(json!({"mediaType": OCI_MANIFEST, "digest": md.to_string(), "size": mn, "platform": platform}));
        manifests.push(md);
    }
    let index = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": fleetdelta::image::manifest::OCI_INDEX, "manifests": entries})).unwrap();
    let w = LayoutWriter::create(dir).unwrap();
    let (d, n) = w.put_blob(&index).unwrap();
    w.commit(&BlobRef { media_type: fleetdelta::image::manifest::OCI_INDEX.into(), digest: d, size: n }, tag).unwrap();
    (d, manifests)
}

/// Writes an OCI image whose config has this `config` section (Entrypoint, Cmd, Env,
/// WorkingDir), as a container engine would run it.
pub fn write_runnable_image(dir: &Path, tag: &str, layers: &[Vec<u8>], config: Value) -> Digest {
    let w = LayoutWriter::create(dir).unwrap();
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in layers {
        let blob = compress(Compression::Gzip, tar);
        let (d, n) = w.put_blob(&blob).unwrap();
        descriptors.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d.to_string(), "size": n}));
        diff_ids.push(Digest::of(tar).to_string());
    }
    let config =
        serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux", "config": config, "rootfs": {"type": "layers", "diff_ids": diff_ids}})).unwrap();
    let (cd, cn) = w.put_blob(&config).unwrap();
    let manifest = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cd.to_string(), "size": cn}, "layers": descriptors}))
    .unwrap();
    let (md, mn) = w.put_blob(&manifest).unwrap();
    w.commit(&BlobRef { media_type: OCI_MANIFEST.into(), digest: md, size: mn }, tag).unwrap();
    md
}

pub fn oci(dir: &Path) -> ImageRef {
    ImageRef::parse(&format!("oci:{}", dir.display())).unwrap()
}

pub fn oci_tag(dir: &Path, tag: &str) -> ImageRef {
    ImageRef::parse(&format!("oci:{}:{tag}", dir.display())).unwrap()
}

/// The uncompressed layer tars of an image, decompressed by the test itself.
pub fn layer_tars(dir: &Path, tag: Option<&str>) -> Vec<Vec<u8>> {
    let layout = Layout::open(dir).unwrap();
    let image = layout.load_image(tag).unwrap();
    uncompressed_layers(&layout, &image)
}

fn uncompressed_layers(layout: &Layout, image: &fleetdelta::image::Image) -> Vec<Vec<u8>> {
    image
        .layers
        .iter()
        .map(|l| {
            let mut out = Vec::new();
            l.compression.decoder(fs::File::open(layout.blob_path(&l.blob.digest)).unwrap()).unwrap().read_to_end(&mut out).unwrap();
            out
        })
        .collect()
}

/// Asserts that `out` holds exactly the layers and config of `target`.
pub fn assert_same_image(target: &Path, out: &Path) {
    assert_same_tagged_image(target, None, out, None)
}

/// [`assert_same_image`] for tagged images.
pub fn assert_same_tagged_image(target: &Path, target_tag: Option<&str>, out: &Path, out_tag: Option<&str>) {
    let t = Layout::open(target).unwrap().load_image(target_tag).unwrap();
    let o = Layout::open(out).unwrap().load_image(out_tag).unwrap();
    assert_eq!(o.config.raw, t.config.raw, "config differs");
    let (tt, ot) = (layer_tars(target, target_tag), layer_tars(out, out_tag));
    assert_eq!(tt.len(), ot.len());
    for (i, (a, b)) in tt.iter().zip(&ot).enumerate() {
        assert!(a == b, "layer {i} differs ({} vs {} bytes)", a.len(), b.len());
        assert_eq!(Digest::of(b), t.config.diff_ids[i]);
    }
}

/// Every file under `dir`, with its contents: to check that a failure wrote nothing.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    if !dir.exists() {
        return out;
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().to_path_buf(), fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Deterministic pseudo-random bytes that look a little like text.
pub fn text(seed: u64, len: usize) -> Vec<u8> {
    let words: [&[u8]; 12] = [b"alpha ", b"beta ", b"gamma ", b"delta\n", b"fleet ", b"image ", b"layer ", b"0x1f ", b"return ", b"{}\n", b"config ", b"zeta "];
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(words[(x % 12) as usize]);
    }
    out.truncate(len);
    out
}

/// Rewrites a delta layout after `edit` changed its blobs: recomputes the digests of the
/// layer blobs, config and manifest so that only deeper checks can catch the change.
/// `edit` gets the delta layer tars (uncompressed) and the manifest JSON. The layers are
/// stored uncompressed, as a tool that recompressed a delta might.
pub fn reseal(delta: &Path, edit: impl FnOnce(&mut Vec<Vec<u8>>, &mut Value)) {
    let layout = Layout::open(delta).unwrap();
    let image = layout.load_image(None).unwrap();
    let mut tars = uncompressed_layers(&layout, &image);
    let mut manifest: Value = serde_json::from_slice(&image.manifest.raw).unwrap();
    edit(&mut tars, &mut manifest);
    let blobs = delta.join("blobs/sha256");
    let mut diff_ids = Vec::new();
    for (i, t) in tars.iter().enumerate() {
        let d = Digest::of(t);
        fs::write(blobs.join(d.hex()), t).unwrap();
        manifest["layers"][i]["mediaType"] = Value::from("application/vnd.oci.image.layer.v1.tar");
        manifest["layers"][i]["digest"] = Value::from(d.to_string());
        manifest["layers"][i]["size"] = Value::from(t.len());
        diff_ids.push(d.to_string());
    }
    let mut config: Value = serde_json::from_slice(&image.config.raw).unwrap();
    config["rootfs"]["diff_ids"] = Value::from(diff_ids);
    let config = serde_json::to_vec(&config).unwrap();
    let cd = Digest::of(&config);
    fs::write(blobs.join(cd.hex()), &config).unwrap();
    manifest["config"]["digest"] = Value::from(cd.to_string());
    manifest["config"]["size"] = Value::from(config.len());
    let m = serde_json::to_vec(&manifest).unwrap();
    let md = Digest::of(&m);
    fs::write(blobs.join(md.hex()), &m).unwrap();
    let index = json!({"schemaVersion": 2, "manifests": [{"mediaType": OCI_MANIFEST, "digest": md.to_string(), "size": m.len(),
        "annotations": {"org.opencontainers.image.ref.name": "latest"}}]});
    fs::write(delta.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

/// Edits the payload file (`layer-NNNN.patch` or `.blob`) of the delta layer tars: format 2
/// puts a small one in the metadata layer, a large one in a layer of its own. Returns the
/// index of the tar that held it.
pub fn retar_payload(tars: &mut [Vec<u8>], edit: impl FnOnce(&mut Vec<u8>)) -> usize {
    let names =
        |t: &[u8]| -> Vec<String> { tar::Archive::new(t).entries().unwrap().map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned()).collect() };
    let (i, name) = tars
        .iter()
        .enumerate()
        .find_map(|(i, t)| names(t).into_iter().find(|n| n.starts_with("layer-") && (n.ends_with(".patch") || n.ends_with(".blob"))).map(|n| (i, n)))
        .expect("a delta layer holds a payload");
    tars[i] = retar_file(&tars[i], &name, edit);
    i
}

/// Replaces the single file inside a one-entry tar.
pub fn retar(tar_bytes: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut archive = tar::Archive::new(tar_bytes);
    let mut entry = archive.entries().unwrap().next().unwrap().unwrap();
    let name = entry.path().unwrap().into_owned();
    let mut data = Vec::new();
    entry.read_to_end(&mut data).unwrap();
    edit(&mut data);
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, name, &data[..]).unwrap();
    b.into_inner().unwrap()
}

/// Rewrites the delta's `delta.json` with `edit`, and reseals the delta ([`reseal`]).
pub fn edit_plan(delta: &Path, edit: impl FnOnce(&mut Value)) {
    reseal(delta, |tars, _| {
        tars[0] = retar_file(&tars[0], "delta.json", |p| {
            let mut plan: Value = serde_json::from_slice(p).unwrap();
            edit(&mut plan);
            *p = serde_json::to_vec(&plan).unwrap();
        })
    });
}

/// Rebuilds a tar with the contents of the entry named `name` edited (the others as they are).
pub fn retar_file(tar_bytes: &[u8], name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut archive = tar::Archive::new(tar_bytes);
    let mut b = tar::Builder::new(Vec::new());
    let mut edit = Some(edit);
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        if path == name {
            (edit.take().expect("one entry of that name"))(&mut data);
        }
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, &path, &data[..]).unwrap();
    }
    assert!(edit.is_none(), "no entry {name}");
    b.into_inner().unwrap()
}

/// A service image in `dir` under `tag`: a base layer shared by every version of every
/// service, and an app layer of `files` files per service whose contents drift with `version`.
pub fn service_image(dir: &Path, tag: &str, service: u64, version: u64, files: u64) {
    let base: Tree = (0..15).map(|i| (format!("usr/lib/lib{i}.so"), file(text(i, 20_000)))).collect();
    let app: Tree = (0..files)
        .map(|i| {
            let mut data = text(service * 1_000 + i, 16_000);
            if i % 3 == 0 {
                data.splice(100..200, text(version * 77 + i, 150));
            }
            (format!("srv/{service}/f{i}.txt"), file(data))
        })
        .collect();
    write_image(dir, tag, &[layer_tar(&base), layer_tar(&app)], Compression::Gzip);
}

/// Runs a Debian tool as a filter: `data` on stdin, stdout returned.
pub fn filter(cmd: &mut std::process::Command, data: &[u8]) -> Vec<u8> {
    use std::process::Stdio;
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// Images whose layers hold gzip files, as Debian's do (changelogs and manual pages
/// compressed by `gzip -9n`), and what changed between them.
pub struct MembersPair {
    pub source: PathBuf,
    pub target: PathBuf,
    /// The changed gzip files the differ should expand: their count by encoder name (as
    /// `fleetdelta info` names encoders), and their compressed size in the target.
    pub expandable: BTreeMap<String, u64>,
    pub expandable_bytes: u64,
    /// The compressed size of the other changed files (which stay compressed).
    pub other_changed_bytes: u64,
}

/// Source and target images in `dir` (Go-gzip layers): one layer of docs, where each
/// changelog gains an entry on top and a manual page changes in the middle, beside files
/// that must stay compressed: unchanged ones, a pigz file of several blocks (no encoder
/// reproduces it; a one-block pigz file is zlib's), two
/// gzip members in one file, and a `.gz` that is not gzip.
pub fn members_pair(dir: &Path) -> MembersPair {
    let gzip = |level: u32, data: &[u8]| filter(tool("gzip").arg(format!("-{level}n")).arg("-c"), data);
    let changelog = |seed: u64, len: usize| text(seed, len);
    let sizes = [2_000usize, 40_000, 150_000, 400_000];
    let (mut source, mut target) = (Tree::new(), Tree::new());
    let mut expandable = BTreeMap::new();
    let mut expandable_bytes = 0;
    for (i, len) in sizes.iter().enumerate() {
        let old = changelog(100 + i as u64, *len);
        let mut new = changelog(900 + i as u64, 700);
        new.extend_from_slice(&old);
        let path = format!("usr/share/doc/pkg{i}/changelog.Debian.gz");
        source.insert(path.clone(), file(gzip(9, &old)));
        let gz = gzip(9, &new);
        expandable_bytes += gz.len() as u64;
        target.insert(path, file(gz));
        *expandable.entry("gzip files by gnu-gzip level=9".to_string()).or_default() += 1;
    }
    // A manual page at gzip's default level, edited in the middle.
    let page = text(7, 90_000);
    let mut edited = page.clone();
    edited.splice(45_000..45_100, text(8, 300));
    source.insert("usr/share/man/man1/tool.1.gz".into(), file(gzip(6, &page)));
    let gz = gzip(6, &edited);
    expandable_bytes += gz.len() as u64;
    target.insert("usr/share/man/man1/tool.1.gz".into(), file(gz));
    *expandable.entry("gzip files by gnu-gzip level=6".to_string()).or_default() += 1;
    // Unchanged: copied as they are.
    let same = file(gzip(9, &text(11, 30_000)));
    source.insert("usr/share/doc/same/changelog.gz".into(), same.clone());
    target.insert("usr/share/doc/same/changelog.gz".into(), same);
    // pigz: changed, but no encoder reproduces it.
    let old = text(12, 300_000);
    let mut new = text(13, 500);
    new.extend_from_slice(&old);
    source.insert("usr/share/doc/pigz/data.gz".into(), file(filter(tool("pigz").arg("-9n").arg("-c"), &old)));
    target.insert("usr/share/doc/pigz/data.gz".into(), file(filter(tool("pigz").arg("-9n").arg("-c"), &new)));
    // Two members in one file, and a .gz that is not gzip at all.
    let two = |a: &[u8], b: &[u8]| [gzip(9, a), gzip(9, b)].concat();
    source.insert("usr/share/doc/two/NEWS.gz".into(), file(two(&text(14, 5000), &text(15, 5000))));
    target.insert("usr/share/doc/two/NEWS.gz".into(), file(two(&text(16, 5000), &text(15, 5000))));
    source.insert("usr/share/doc/fake/x.gz".into(), file([&[0x1f, 0x8b, 0x08][..], &text(17, 3000)].concat()));
    target.insert("usr/share/doc/fake/x.gz".into(), file([&[0x1f, 0x8b, 0x08][..], &text(18, 3000)].concat()));
    let other_changed_bytes = ["usr/share/doc/pigz/data.gz", "usr/share/doc/two/NEWS.gz", "usr/share/doc/fake/x.gz"]
        .iter()
        .map(|p| match &target[*p] {
            Node::File { data, .. } => data.len() as u64,
            _ => 0,
        })
        .sum();
    let base: Tree = (0..5).map(|i| (format!("bin/tool{i}"), file(text(200 + i, 20_000)))).collect();
    let (s, t) = (dir.join("members-s"), dir.join("members-t"));
    write_image(&s, "latest", &[layer_tar(&base), layer_tar(&source)], Compression::Gzip);
    write_image(&t, "latest", &[layer_tar(&base), layer_tar(&target)], Compression::Gzip);
    MembersPair { source: s, target: t, expandable, expandable_bytes, other_changed_bytes }
}

/// Writes a zip with Debian's Python `zipfile` (the system zlib, as wheels and Java's `jar`
/// are written): `entries` are (name, contents, deflated or stored), in order.
pub fn python_zip(entries: &[(String, Vec<u8>, bool)]) -> Vec<u8> {
    const SCRIPT: &str = concat!(
        "import sys, json, zipfile, io\n",
        "buf = io.BytesIO()\n",
        "with zipfile.ZipFile(buf, 'w') as z:\n",
        "    for name, data, deflate in json.load(sys.stdin):\n",
        "        info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))\n",
        "        info.compress_type = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED\n",
        "        z.writestr(info, bytes.fromhex(data))\n",
        "sys.stdout.buffer.write(buf.getvalue())\n",
    );
    let spec: Vec<Value> = entries.iter().map(|(n, d, deflate)| json!([n, hex::encode(d), deflate])).collect();
    filter(tool("/usr/bin/python3").args(["-c", SCRIPT]), &serde_json::to_vec(&spec).unwrap())
}

/// Writes a zip with Info-ZIP's `zip -X -D -6` to its stdout, as a pipe gets it: every entry
/// deflated (or stored when that is smaller) and followed by a data descriptor.
pub fn info_zip(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    for (name, data) in entries {
        let path = dir.path().join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, data).unwrap();
    }
    let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    run(tool("zip").current_dir(dir.path()).args(["-q", "-X", "-D", "-6", "-"]).args(&names)).stdout
}

/// Images whose layers hold zip files (jars, wheels), and what changed between them.
pub struct ZipsPair {
    pub source: PathBuf,
    pub target: PathBuf,
    /// The changed deflated entries the differ should expand.
    pub expandable: u64,
    /// The compressed size of the changed zip files in the target.
    pub changed_zip_bytes: u64,
}

/// Classes of a library at `version`: most change a little in the middle at each version,
/// some stay the same.
fn classes(lib: u64, version: u64) -> Vec<(String, Vec<u8>)> {
    (0..24u64)
        .map(|i| {
            let mut data = text(lib * 1000 + i, 3_000 + 1_500 * i as usize);
            if i % 4 != 0 {
                let at = data.len() / 2;
                data.splice(at..at + 40, text(lib * 1000 + i + 100 * version, 60));
            }
            (format!("org/example/lib{lib}/C{i}.class"), data)
        })
        .collect()
}

/// Source and target images in `dir` (Go-gzip layers) whose app layer holds: a jar by
/// Info-ZIP with a versioned name (`lib-1.0.jar` → `lib-1.1.jar`); a wheel by Python's
/// `zipfile`; a Spring Boot style jar (Python's `zipfile`) holding an Info-ZIP jar as a
/// stored entry; and a zip written by `pigz --zip` (an encoder nobody reproduces), which
/// stays compressed. In each, 18 of 24 classes change; the target adds a class too.
pub fn zips_pair(dir: &Path) -> ZipsPair {
    let versioned = |v: u64| -> Vec<(String, Vec<u8>)> {
        let mut c = classes(1, v);
        c.insert(0, ("META-INF/MANIFEST.MF".into(), format!("Manifest-Version: 1.0\nImplementation-Version: 1.{v}\n").into_bytes()));
        if v == 1 {
            c.push(("org/example/lib1/New.class".into(), text(77, 5_000)));
        }
        c
    };
    let deflated = |c: Vec<(String, Vec<u8>)>| c.into_iter().map(|(n, d)| (n, d, true)).collect::<Vec<_>>();
    let fat = |v: u64| {
        let mut e = deflated(classes(3, v));
        e.push((format!("BOOT-INF/lib/dep-2.{v}.jar"), info_zip(&classes(4, v)), false));
        python_zip(&e)
    };
    let (mut source, mut target) = (Tree::new(), Tree::new());
    for (tree, v) in [(&mut source, 0u64), (&mut target, 1)] {
        tree.insert(format!("usr/share/java/lib-1.{v}.jar"), file(info_zip(&versioned(v))));
        tree.insert(format!("opt/app/wheels/pkg-0.{v}-py3-none-any.whl"), file(python_zip(&deflated(classes(2, v)))));
        tree.insert("opt/app/app.jar".into(), file(fat(v)));
        // Several of pigz's 128 KiB blocks: no encoder reproduces it.
        let mut data = text(5, 600_000);
        data.splice(300_000..300_010, text(6 + v, 10));
        tree.insert("opt/app/data.zip".into(), file(filter(tool("pigz").args(["--zip", "-6", "-c"]), &data)));
        tree.insert("opt/app/same.jar".into(), file(info_zip(&classes(9, 0))));
    }
    // 18 changed classes in each of lib, pkg, app's own classes and dep.
    let expandable = 4 * 18;
    let changed_zip_bytes = target
        .iter()
        .filter(|(p, _)| !p.ends_with("same.jar"))
        .map(|(_, n)| match n {
            Node::File { data, .. } => data.len() as u64,
            _ => 0,
        })
        .sum();
    let base: Tree = (0..5).map(|i| (format!("bin/tool{i}"), file(text(200 + i, 20_000)))).collect();
    let (s, t) = (dir.join("zips-s"), dir.join("zips-t"));
    write_image(&s, "latest", &[layer_tar(&base), layer_tar(&source)], Compression::Gzip);
    write_image(&t, "latest", &[layer_tar(&base), layer_tar(&target)], Compression::Gzip);
    ZipsPair { source: s, target: t, expandable, changed_zip_bytes }
}

/// Deterministic pseudo-random bytes.
pub fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
