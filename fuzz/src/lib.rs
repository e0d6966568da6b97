//! Shared fixture of the fuzz targets that need whole images: a tiny source/target pair and
//! the delta between them, built once with fleetdelta itself, and a way to write copies of
//! that delta whose patch payload is replaced and whose digests are re-sealed, so that only
//! the applier's deeper checks stand between fuzz input and the patch executor.

pub mod corrections;
pub mod zip_members;

use std::error::Error;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use fleetdelta::image::manifest::{BlobRef, OCI_CONFIG, OCI_MANIFEST};
use fleetdelta::image::{Layout, LayoutWriter};
use fleetdelta::layer::Compression;
use fleetdelta::{Digest, DiffOptions, ImageRef, Level, Silent};
use serde_json::{json, Value};
use tempfile::TempDir;

/// Result of fixture building: any failure there is a harness bug, not a finding.
pub type BoxResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

const UNCOMPRESSED_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// Deterministic xorshift bytes: `text` picks words, otherwise raw bytes.
pub fn pseudo_random(seed: u64, len: usize, text: bool) -> Vec<u8> {
    const WORDS: [&[u8]; 12] =
        [b"alpha ", b"beta ", b"gamma ", b"delta\n", b"fleet ", b"image ", b"layer ", b"0x1f ", b"return ", b"{}\n", b"config ", b"zeta "];
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if text {
            out.extend_from_slice(WORDS[(x % WORDS.len() as u64) as usize]);
        } else {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out.truncate(len);
    out
}

/// A layer tar of regular files, in the given order.
pub fn layer_tar(files: &[(&str, Vec<u8>)]) -> BoxResult<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, path, &data[..])?;
    }
    Ok(b.into_inner()?)
}

/// Writes an image of the given layer tars (gzip-compressed) as the `latest` tag of `dir`.
pub fn write_image(dir: &Path, layers: &[Vec<u8>]) -> BoxResult<()> {
    let w = LayoutWriter::create(dir)?;
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in layers {
        let mut e = Compression::Gzip.encoder(Vec::new())?;
        e.write_all(tar)?;
        let blob = e.finish()?;
        let (d, n) = w.put_blob(&blob)?;
        descriptors.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d.to_string(), "size": n}));
        diff_ids.push(Digest::of(tar).to_string());
    }
    let config = serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}))?;
    let (cd, cn) = w.put_blob(&config)?;
    let manifest = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cd.to_string(), "size": cn}, "layers": descriptors}))?;
    let (md, mn) = w.put_blob(&manifest)?;
    w.commit(&BlobRef { media_type: OCI_MANIFEST.into(), digest: md, size: mn }, "latest")?;
    Ok(())
}

/// An `oci:` reference to the layout at `dir`.
pub fn oci(dir: &Path) -> BoxResult<ImageRef> {
    Ok(ImageRef::parse(&format!("oci:{}", dir.display()))?)
}

/// Where scratch directories go: RAM-backed when the machine has it.
fn scratch_parent() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// A directory for per-input scratch files.
pub fn scratch_dir() -> std::io::Result<TempDir> {
    tempfile::Builder::new().prefix("fleetdelta-fuzz-").tempdir_in(scratch_parent())
}

const FIXTURE_PREFIX: &str = "fleetdelta-fuzz-fixture-";

/// The fixture lives in a `static` and is never dropped, so its directory outlives the fuzzer
/// process: it carries the process id, and fixtures of processes that are gone are removed.
fn fixture_dir() -> std::io::Result<TempDir> {
    let parent = scratch_parent();
    for entry in fs::read_dir(&parent)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(FIXTURE_PREFIX).and_then(|rest| rest.split('-').next()) else { continue };
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    tempfile::Builder::new().prefix(&format!("{FIXTURE_PREFIX}{}-", std::process::id())).tempdir_in(parent)
}

/// The name and contents of the patch entry (`layer-<index>.patch`) in a delta layer's tar.
fn patch_entry(tar_bytes: &[u8]) -> BoxResult<Option<(String, Vec<u8>)>> {
    for entry in tar::Archive::new(tar_bytes).entries()? {
        let mut entry = entry?;
        let name = String::from_utf8(entry.path_bytes().into_owned())?;
        if name.starts_with("layer-") && name.ends_with(".patch") {
            let mut payload = Vec::new();
            entry.read_to_end(&mut payload)?;
            return Ok(Some((name, payload)));
        }
    }
    Ok(None)
}

/// The source image and a real delta from it, with what is needed to re-seal edited copies.
#[derive(Debug)]
pub struct Fixture {
    dir: TempDir,
    /// The source image the delta applies to.
    pub source: ImageRef,
    delta_root: PathBuf,
    manifest: Value,
    config: Value,
    /// The delta layer that holds the patch, and that layer's tar.
    patch_layer: usize,
    patch_layer_tar: Vec<u8>,
    patch_name: String,
    /// The delta's original patch payload: a zstd stream of patch records.
    pub payload: Vec<u8>,
    /// `payload` decompressed: the record stream itself.
    pub records: Vec<u8>,
}

impl Fixture {
    /// Builds a two-layer source, a target whose top layer is edited (so the delta holds one
    /// `source` layer and one `patch` layer), and the delta between them.
    pub fn build() -> BoxResult<Fixture> {
        let dir = fixture_dir()?;
        let base = layer_tar(&[("etc/os-release", pseudo_random(1, 600, true)), ("usr/lib/libfoo.so", pseudo_random(2, 12 << 10, false))])?;
        let app_v1 = layer_tar(&[
            ("app/data.bin", pseudo_random(3, 10 << 10, false)),
            ("app/main.js", pseudo_random(4, 6 << 10, true)),
            ("app/old.txt", pseudo_random(5, 900, true)),
        ])?;
        let mut data = pseudo_random(3, 10 << 10, false);
        data[100..140].copy_from_slice(&pseudo_random(6, 40, false));
        data.extend_from_slice(&pseudo_random(7, 700, false));
        let mut main = pseudo_random(4, 6 << 10, true);
        main.splice(2000..2000, b"console.log(\"hello fleet\");\n".iter().copied());
        let app_v2 = layer_tar(&[("app/data.bin", data), ("app/main.js", main), ("app/new.txt", pseudo_random(8, 500, true))])?;
        let (source_dir, target_dir, delta_root) = (dir.path().join("v1"), dir.path().join("v2"), dir.path().join("delta"));
        write_image(&source_dir, &[base.clone(), app_v1])?;
        write_image(&target_dir, &[base, app_v2])?;
        let source = oci(&source_dir)?;
        let options = DiffOptions { level: Level::Fast, ..DiffOptions::default() };
        fleetdelta::diff(&source, &oci(&target_dir)?, &oci(&delta_root)?, &options, &Silent)?;

        let image = Layout::open(&delta_root)?.load_image(None)?;
        let manifest: Value = serde_json::from_slice(&image.manifest.raw)?;
        let config: Value = serde_json::from_slice(&image.config.raw)?;
        // The patch is the entry `layer-<index>.patch` of whichever layer holds it: format 2
        // puts small payloads in the metadata layer, beside `delta.json`.
        for (patch_layer, layer) in image.layers.iter().enumerate() {
            let blob = fs::read(delta_root.join("blobs/sha256").join(layer.blob.digest.hex()))?;
            let mut patch_layer_tar = Vec::new();
            layer.compression.decoder(&blob[..])?.read_to_end(&mut patch_layer_tar)?;
            let Some((patch_name, payload)) = patch_entry(&patch_layer_tar)? else { continue };
            let records = zstd::stream::decode_all(&payload[..])?;
            return Ok(Fixture { dir, source, delta_root, manifest, config, patch_layer, patch_layer_tar, patch_name, payload, records });
        }
        Err("the fixture delta has no patch".into())
    }

    /// Where the fixture's images live.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Writes at `dest` (a new directory) a copy of the delta whose patch layer holds
    /// `payload`, stored as an uncompressed tar, with every digest and size re-sealed.
    pub fn write_delta_with_payload(&self, dest: &Path, payload: &[u8]) -> BoxResult<()> {
        let blobs = dest.join("blobs/sha256");
        fs::create_dir_all(&blobs)?;
        fs::copy(self.delta_root.join("oci-layout"), dest.join("oci-layout"))?;
        let mut manifest = self.manifest.clone();
        let layers = manifest["layers"].as_array().ok_or("manifest without layers")?.len();
        for i in (0..layers).filter(|i| *i != self.patch_layer) {
            let digest: Digest = manifest["layers"][i]["digest"].as_str().ok_or("layer without digest")?.parse()?;
            fs::copy(self.delta_root.join("blobs/sha256").join(digest.hex()), blobs.join(digest.hex()))?;
        }

        // The patch layer's tar again, with the payload replaced and every other entry kept.
        let mut b = tar::Builder::new(Vec::new());
        for entry in tar::Archive::new(&self.patch_layer_tar[..]).entries()? {
            let mut entry = entry?;
            let mut header = entry.header().clone();
            if entry.path_bytes().as_ref() == self.patch_name.as_bytes() {
                header.set_size(payload.len() as u64);
                header.set_cksum();
                b.append(&header, payload)?;
            } else {
                let mut data = Vec::new();
                entry.read_to_end(&mut data)?;
                b.append(&header, &data[..])?;
            }
        }
        let tar_bytes = b.into_inner()?;
        let tar_digest = Digest::of(&tar_bytes);
        fs::write(blobs.join(tar_digest.hex()), &tar_bytes)?;
        let layer = &mut manifest["layers"][self.patch_layer];
        layer["mediaType"] = UNCOMPRESSED_LAYER.into();
        layer["digest"] = tar_digest.to_string().into();
        layer["size"] = tar_bytes.len().into();

        let mut config = self.config.clone();
        config["rootfs"]["diff_ids"][self.patch_layer] = tar_digest.to_string().into();
        let config = serde_json::to_vec(&config)?;
        let config_digest = Digest::of(&config);
        fs::write(blobs.join(config_digest.hex()), &config)?;
        manifest["config"]["digest"] = config_digest.to_string().into();
        manifest["config"]["size"] = config.len().into();

        let manifest = serde_json::to_vec(&manifest)?;
        let manifest_digest = Digest::of(&manifest);
        fs::write(blobs.join(manifest_digest.hex()), &manifest)?;
        let index = json!({"schemaVersion": 2, "manifests": [{"mediaType": OCI_MANIFEST, "digest": manifest_digest.to_string(),
            "size": manifest.len(), "annotations": {"org.opencontainers.image.ref.name": "latest"}}]});
        fs::write(dest.join("index.json"), serde_json::to_vec(&index)?)?;
        Ok(())
    }
}
