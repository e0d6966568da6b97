//! docker-archive tars, the format of the engine's image export (`GET /images/{name}/get`)
//! and load (`POST /images/load`): a `manifest.json` listing, per image, its config file
//! (whose SHA-256 is the image ID) and its layer tars, uncompressed, base first.
//!
//! Both directions stream: layers go between the tar and the layout's blobs without being
//! held in memory, and every digest is checked on the way.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::digest::{Digest, Hasher};
use crate::error::{Error, IoContext, Result};
use crate::image::manifest::{BlobRef, Config, Image, MAX_JSON_BYTES, OCI_CONFIG, OCI_MANIFEST};
use crate::image::{Layout, LayoutWriter};
use crate::layer::compression::copy_hashed;
use crate::layer::Compression;

/// The media type of the layers read from the engine: plain tars, so blob digest = diff_id.
pub const UNCOMPRESSED_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// The index of an archive.
const MANIFEST_FILE: &str = "manifest.json";
/// Small files of an archive kept in memory while it is read (manifest.json, configs, and
/// the per-layer metadata of old archives); more is refused rather than buffered.
const MAX_SMALL_FILES: usize = 4096;
const MAX_SMALL_BYTES: u64 = 4 * MAX_JSON_BYTES;

/// One image of `manifest.json`.
#[derive(Debug, Serialize, Deserialize)]
struct ArchiveEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// Where a file of the archive went while it was read.
enum Stored {
    /// Kept in memory (small, not a layer).
    Small(Vec<u8>),
    /// Streamed into a blob of the layout being written.
    Blob { digest: Digest, size: u64 },
    /// A symbolic link to another file of the archive (newer engines link repeated layers).
    Link(String),
}

/// Reads a docker-archive of one image from `input` into `writer`: its config byte for byte
/// and its layers as uncompressed blobs, in an OCI manifest written to `writer` and returned
/// (to commit). Fails unless the config's digest is `expected_config` (the image ID the
/// engine gave) and every layer's digest is the diff_id the config names; a layer larger
/// than `max_layer_bytes` is refused.
pub fn read_archive(input: impl Read, writer: &LayoutWriter, expected_config: &Digest, max_layer_bytes: u64, what: &str) -> Result<BlobRef> {
    let mut files: HashMap<String, Stored> = HashMap::new();
    let mut small_bytes = 0u64;
    let mut archive = tar::Archive::new(input);
    for entry in archive.entries().ctx(|| format!("reading the archive of {what}"))? {
        let mut entry = entry.ctx(|| format!("reading the archive of {what}"))?;
        let path = normalize(&String::from_utf8_lossy(&entry.path_bytes()));
        let kind = entry.header().entry_type();
        if kind.is_symlink() {
            let target = entry.link_name_bytes().map(|t| String::from_utf8_lossy(&t).into_owned()).unwrap_or_default();
            let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
            files.insert(path.clone(), Stored::Link(normalize(&format!("{dir}/{target}"))));
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        let size = entry.size();
        // Layers (old layout: DIR/layer.tar; OCI layout: blobs/sha256/HEX) go to disk; the
        // small JSON files are kept to be parsed once the index has been read.
        if path.ends_with("/layer.tar") || path.starts_with("blobs/") || size > MAX_JSON_BYTES {
            let mut blob = writer.blob_limited(max_layer_bytes, &format!("{what}: {path}"))?;
            io::copy(&mut entry, &mut blob).map_err(|e| Error::io(format!("reading {path} of {what}"), e))?;
            let (digest, size) = blob.finish(None)?;
            files.insert(path, Stored::Blob { digest, size });
        } else {
            small_bytes += size;
            if files.len() >= MAX_SMALL_FILES || small_bytes > MAX_SMALL_BYTES {
                return Err(Error::TooLarge { what: format!("metadata in the archive of {what}"), limit: MAX_SMALL_BYTES });
            }
            let mut bytes = Vec::with_capacity(size as usize);
            entry.read_to_end(&mut bytes).ctx(|| format!("reading {path} of {what}"))?;
            files.insert(path, Stored::Small(bytes));
        }
    }

    let index = small_file(&files, MANIFEST_FILE, writer, what)?;
    let entries: Vec<ArchiveEntry> = serde_json::from_slice(&index).map_err(|e| Error::malformed(format!("{MANIFEST_FILE} of {what}"), e.to_string()))?;
    let [entry] = &entries[..] else {
        return Err(Error::malformed(format!("{MANIFEST_FILE} of {what}"), format!("{} images (expected one)", entries.len())));
    };
    let config_bytes = small_file(&files, &normalize(&entry.config), writer, what)?;
    let config_digest = Digest::of(&config_bytes);
    if &config_digest != expected_config {
        return Err(Error::DigestMismatch { what: format!("config of {what} (the image ID)"), expected: *expected_config, found: config_digest });
    }
    let config = Config::parse(config_bytes)?;
    if config.diff_ids.len() != entry.layers.len() {
        return Err(Error::malformed(
            format!("{MANIFEST_FILE} of {what}"),
            format!("{} layers, the config lists {} diff_ids", entry.layers.len(), config.diff_ids.len()),
        ));
    }
    let mut layers = Vec::with_capacity(entry.layers.len());
    for (i, (path, diff_id)) in entry.layers.iter().zip(&config.diff_ids).enumerate() {
        let (digest, size) = match resolve(&files, &normalize(path)) {
            Some(Stored::Blob { digest, size }) => (*digest, *size),
            Some(Stored::Small(bytes)) => writer.put_blob(bytes)?,
            _ => return Err(Error::NotFound(format!("layer {i} ({path}) in the archive of {what}"))),
        };
        if &digest != diff_id {
            return Err(Error::DigestMismatch { what: format!("layer {i} of {what} (its diff_id)"), expected: *diff_id, found: digest });
        }
        layers.push(json!({ "mediaType": UNCOMPRESSED_LAYER, "digest": digest.to_string(), "size": size }));
    }
    let (cd, cn) = writer.put_blob(&config.raw)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": OCI_CONFIG, "digest": cd.to_string(), "size": cn },
        "layers": layers,
    });
    let (md, mn) = writer.put_blob(&serde_json::to_vec(&manifest).expect("JSON values serialize"))?;
    Ok(BlobRef { media_type: OCI_MANIFEST.to_string(), digest: md, size: mn })
}

/// What [`write_archive`] wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ArchiveStats {
    /// Bytes of the whole archive.
    pub archive_bytes: u64,
    /// Layers whose tar is in it.
    pub layers_sent: usize,
    /// Layers listed but left out (the engine has them).
    pub layers_omitted: usize,
}

/// Writes `image` of `layout` as an untagged docker-archive to `out`. The first `omit`
/// layers are listed in `manifest.json` but their tars left out: the engine's loader opens a
/// layer file only when it lacks that layer chain. Compressed layers are decompressed into
/// `scratch` first (a tar entry's size comes before its content); every layer's diff_id is
/// checked as it is sent, and a mismatch fails the write, so the engine never commits it.
pub fn write_archive(layout: &Layout, image: &Image, omit: usize, out: impl Write, scratch: &Path) -> Result<ArchiveStats> {
    let mut counted = CountingWriter { inner: out, count: 0 };
    let mut tar = tar::Builder::new(&mut counted);
    let config_name = format!("{}.json", image.config.digest.hex());
    let layer_names: Vec<String> = image.layers.iter().map(|l| format!("{}/layer.tar", l.diff_id.hex())).collect();
    // No RepoTags: loading tags nothing, the caller tags once the image is verified.
    let index = vec![ArchiveEntry { config: config_name.clone(), repo_tags: None, layers: layer_names.clone() }];
    let index = serde_json::to_vec(&index).expect("JSON values serialize");
    append(&mut tar, MANIFEST_FILE, index.len() as u64, &index[..])?;
    append(&mut tar, &config_name, image.config.raw.len() as u64, &image.config.raw[..])?;
    let mut stats = ArchiveStats { layers_omitted: omit.min(image.layers.len()), ..ArchiveStats::default() };
    for (i, (layer, name)) in image.layers.iter().zip(&layer_names).enumerate().skip(omit) {
        let what = format!("layer {i} ({})", layer.diff_id);
        if layer.compression == Compression::None {
            let blob = layout.open_blob(&layer.blob)?;
            let reader = VerifyingReader { inner: blob, hasher: Hasher::new(), expected: layer.diff_id, what: what.clone() };
            append(&mut tar, name, layer.blob.size, reader)?;
        } else {
            let mut plain = tempfile::tempfile_in(scratch).ctx(|| format!("creating a file in {}", scratch.display()))?;
            let decoder = layer.compression.decoder(layout.open_blob(&layer.blob)?)?;
            let (digest, size) = copy_hashed(decoder, &mut plain, u64::MAX, &what)?;
            crate::digest::verify(|| what.clone(), &layer.diff_id, None, &digest, size)?;
            io::Seek::rewind(&mut plain).ctx(|| format!("rewinding {what}"))?;
            append(&mut tar, name, size, plain)?;
        }
        stats.layers_sent += 1;
    }
    tar.finish().ctx(|| "finishing the archive".into())?;
    drop(tar);
    counted.flush().ctx(|| "sending the archive".into())?;
    stats.archive_bytes = counted.count;
    Ok(stats)
}

fn append<W: Write>(tar: &mut tar::Builder<W>, name: &str, size: u64, data: impl Read) -> Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    header.set_mode(0o644);
    tar.append_data(&mut header, name, data).map_err(|e| Error::io(format!("writing {name} into the archive"), e))
}

/// A reader that fails at its end unless what it read has the expected digest.
struct VerifyingReader<R> {
    inner: R,
    hasher: Hasher,
    expected: Digest,
    what: String,
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        if n == 0 && !buf.is_empty() {
            let found = self.hasher.clone().finish();
            if found != self.expected {
                return Err(Error::DigestMismatch { what: self.what.clone(), expected: self.expected, found }.into_io());
            }
        }
        Ok(n)
    }
}

struct CountingWriter<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// `./a//b/` -> `a/b`, and `a/../b` -> `b`, as paths inside the archive.
fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

/// The stored file `path` names, following links (a bounded number of times: a loop of
/// links is not a file).
fn resolve<'a>(files: &'a HashMap<String, Stored>, path: &str) -> Option<&'a Stored> {
    let mut current = files.get(path)?;
    for _ in 0..8 {
        match current {
            Stored::Link(target) => current = files.get(target)?,
            other => return Some(other),
        }
    }
    None
}

/// The bytes of a small file of the archive (kept in memory, or a blob when it was stored as one).
fn small_file(files: &HashMap<String, Stored>, path: &str, writer: &LayoutWriter, what: &str) -> Result<Vec<u8>> {
    match resolve(files, path) {
        Some(Stored::Small(bytes)) => Ok(bytes.clone()),
        Some(Stored::Blob { digest, size }) if *size <= MAX_JSON_BYTES => {
            let mut bytes = Vec::new();
            writer.open_staged_blob(digest)?.read_to_end(&mut bytes).ctx(|| format!("reading {path} of {what}"))?;
            Ok(bytes)
        }
        Some(Stored::Blob { .. }) => Err(Error::TooLarge { what: format!("{path} of {what}"), limit: MAX_JSON_BYTES }),
        _ => Err(Error::NotFound(format!("{path} in the archive of {what}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(content: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, "version", content).unwrap();
        b.into_inner().unwrap()
    }

    /// An image of two uncompressed layers in a new layout.
    fn image(dir: &Path) -> (Layout, Image) {
        let w = LayoutWriter::create(&dir.join("src")).unwrap();
        let tars = [layer(b"base"), layer(b"v2")];
        let mut descriptors = Vec::new();
        for t in &tars {
            let (d, n) = w.put_blob(t).unwrap();
            descriptors.push(json!({"mediaType": UNCOMPRESSED_LAYER, "digest": d.to_string(), "size": n}));
        }
        let diff_ids: Vec<String> = tars.iter().map(|t| Digest::of(t).to_string()).collect();
        let config = serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}})).unwrap();
        let (cd, cn) = w.put_blob(&config).unwrap();
        let manifest = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"mediaType": OCI_CONFIG, "digest": cd.to_string(), "size": cn}, "layers": descriptors});
        let (md, mn) = w.put_blob(&serde_json::to_vec(&manifest).unwrap()).unwrap();
        w.commit(&BlobRef { media_type: OCI_MANIFEST.into(), digest: md, size: mn }, "v2").unwrap();
        let layout = Layout::open(dir.join("src")).unwrap();
        let image = layout.load_image(Some("v2")).unwrap();
        (layout, image)
    }

    #[test]
    fn archives_round_trip_with_config_and_diff_ids_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (layout, img) = image(dir.path());
        let mut archive = Vec::new();
        let stats = write_archive(&layout, &img, 0, &mut archive, dir.path()).unwrap();
        assert_eq!((stats.layers_sent, stats.layers_omitted, stats.archive_bytes), (2, 0, archive.len() as u64));
        let w = LayoutWriter::create(&dir.path().join("back")).unwrap();
        let manifest = read_archive(&archive[..], &w, &img.config.digest, 1 << 20, "app:v2").unwrap();
        w.commit(&manifest, "v2").unwrap();
        let back = Layout::open(dir.path().join("back")).unwrap().load_image(Some("v2")).unwrap();
        assert_eq!(back.config.raw, img.config.raw);
        assert_eq!(back.layers.iter().map(|l| l.blob.digest).collect::<Vec<_>>(), img.config.diff_ids);

        let mut partial = Vec::new();
        let stats = write_archive(&layout, &img, 1, &mut partial, dir.path()).unwrap();
        assert_eq!((stats.layers_sent, stats.layers_omitted), (1, 1));
        assert!(partial.len() < archive.len());
    }

    #[test]
    fn refuses_other_configs_and_layers() {
        let dir = tempfile::tempdir().unwrap();
        let (layout, img) = image(dir.path());
        let mut archive = Vec::new();
        write_archive(&layout, &img, 0, &mut archive, dir.path()).unwrap();
        let w = LayoutWriter::create(&dir.path().join("x")).unwrap();
        let err = read_archive(&archive[..], &w, &Digest::of(b"other"), 1 << 20, "app:v2").unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
        // One byte of the last layer changed ("v2" -> "v3"): its diff_id no longer matches.
        let at = archive.windows(2).rposition(|w| w == b"v2").unwrap();
        archive[at + 1] = b'3';
        let err = read_archive(&archive[..], &w, &img.config.digest, 1 << 20, "app:v2").unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }) && err.to_string().contains("layer 1"), "{err}");
        // A layout blob damaged after it was written is not sent as it is.
        std::fs::write(layout.blob_path(&img.layers[1].blob.digest), layer(b"v3")).unwrap();
        let err = write_archive(&layout, &img, 0, io::sink(), dir.path()).unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    }

    #[test]
    fn hostile_archives_are_refused_by_name() {
        fn archive(entries: &[(&str, &[u8], Option<&str>)]) -> Vec<u8> {
            let mut b = tar::Builder::new(Vec::new());
            for (path, data, link) in entries {
                let mut h = tar::Header::new_gnu();
                h.set_mode(0o644);
                match link {
                    Some(target) => {
                        h.set_entry_type(tar::EntryType::Symlink);
                        h.set_size(0);
                        b.append_link(&mut h, path, target).unwrap();
                    }
                    None => {
                        h.set_size(data.len() as u64);
                        b.append_data(&mut h, path, *data).unwrap();
                    }
                }
            }
            b.into_inner().unwrap()
        }
        let dir = tempfile::tempdir().unwrap();
        let w = LayoutWriter::create(&dir.path().join("x")).unwrap();
        let config = Digest::of(b"{}");
        let cases: [(&str, Vec<u8>); 4] = [
            ("no manifest.json", archive(&[("other", b"x", None)])),
            ("manifest.json not JSON", archive(&[("manifest.json", b"[{", None)])),
            ("two images", archive(&[("manifest.json", br#"[{"Config":"c","Layers":[]},{"Config":"c","Layers":[]}]"#, None)])),
            ("a loop of links", archive(&[("manifest.json", br#"[{"Config":"a","Layers":[]}]"#, None), ("a", b"", Some("b")), ("b", b"", Some("a"))])),
        ];
        for (name, bytes) in cases {
            let err = read_archive(&bytes[..], &w, &config, 1 << 20, "app:v2").unwrap_err();
            assert!(matches!(err, Error::NotFound(_) | Error::Malformed { .. }), "{name}: {err}");
            assert!(err.to_string().contains("app:v2"), "{name}: {err}");
        }
    }

    #[test]
    fn normalizes_archive_paths() {
        for (input, expected) in [("./manifest.json", "manifest.json"), ("a//b/", "a/b"), ("x/../blobs/sha256/ab", "blobs/sha256/ab")] {
            assert_eq!(normalize(input), expected);
        }
    }
}
