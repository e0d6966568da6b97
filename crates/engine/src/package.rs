//! The delta as an ordinary OCI image: writing it, and opening one with every digest checked.
//!
//! Layer 0 of the delta image is a tar holding `delta.json`, the target manifest and the
//! target config, then (format 2) the payload files small enough to share it; each further
//! layer is a tar holding one payload of one target layer: its patch, its original blob, or
//! the correction stream that re-encodes it. The manifest's `subject` is the target manifest,
//! and an annotation records the source config, which a lookup needs. See
//! `docs/format.md`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::digest::{verify, Digest, HashingWriter};
use crate::error::{Error, IoContext, Result};
use crate::format::plan::{check_features_known, DeltaPlan, Encoding, LayerPlan, Method};
use crate::format::*;
use crate::image::manifest::{BlobRef, Config, Image, Manifest, OCI_CONFIG, OCI_MANIFEST};
use crate::image::{Layout, LayoutWriter};
use crate::layer::compression::copy_hashed;
use crate::reference::{load_image, ImageRef};

/// Media type of the delta layers this build writes: gzip-compressed tars, like any image
/// layer, so that every OCI tool carries them unchanged (tools such as skopeo compress plain
/// tar layers on copy, which would change the delta's digest) and can unpack them. Readers
/// accept any layer compression, in case a tool recompressed them anyway.
pub const DELTA_LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

const TAR_BLOCK: u64 = 512;

/// What a payload layer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The patch of a [`Method::Patch`] layer.
    Patch,
    /// The blob of a [`Method::Blob`] layer.
    Blob,
    /// The correction stream of an [`Encoding::Corrected`] layer.
    Corrections,
}

impl Role {
    /// The `io.fleetdelta.role` annotation.
    pub fn name(self) -> &'static str {
        match self {
            Role::Patch => "patch",
            Role::Blob => "blob",
            Role::Corrections => "corrections",
        }
    }

    fn file_name(self, target_layer: u32) -> String {
        match self {
            Role::Patch => payload_file_name(target_layer, Method::Patch),
            Role::Blob => payload_file_name(target_layer, Method::Blob),
            Role::Corrections => corrections_file_name(target_layer),
        }
    }
}

/// A payload file produced by the differ, to be wrapped into a delta layer.
#[derive(Debug)]
pub struct Payload {
    /// The target layer it rebuilds.
    pub target_layer: u32,
    /// What it holds.
    pub role: Role,
    /// Where the payload bytes are.
    pub path: PathBuf,
}

fn tar_header(name: &str, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_path(name).expect("payload names are short ASCII");
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    h
}

/// How hard a delta layer's gzip works.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Effort {
    /// Payload files, compressed already (zstd frames, or a target's compressed blob):
    /// level 2, the fastest whose blocks fall back to stored ones on bytes that do not
    /// compress. zlib-rs's level 1 is zlib-ng's `deflate_quick`, which writes fixed-Huffman
    /// blocks whatever the input: it grew rust-cli-amd64's 3.29 MB patch by 5.3% (174 kB),
    /// where level 2 takes 0.1% off it, at about 60 MB/s.
    Fast,
    /// The metadata layer: `delta.json` is mostly numbers (member lists can reach thousands
    /// of entries), which gzip's best level shrinks by a third more than its fastest. Up to
    /// [`ZOPFLI_MAX_TAR_BYTES`], Zopfli writes it instead.
    Best,
}

/// The largest metadata tar Zopfli compresses. Where the metadata layer is most of a delta
/// (an edit of a few bytes), Zopfli's gzip is about 6% smaller than level 9's: 1,059 bytes
/// instead of 1,132 for config-line's 5.5 KiB tar. It costs 2-6 ms per KiB of tar (Debian's
/// `zopfli` took 0.02 s on pip-patch's 7 KiB, 0.4 s on npm-patch's 69 KiB), so a larger tar,
/// whose delta has bigger parts than its metadata, gets level 9.
const ZOPFLI_MAX_TAR_BYTES: u64 = 16 << 10;

/// A tar of `files` (their sizes as given), ended by its two zero blocks.
fn tar_len<T>(files: &[(String, T, u64)]) -> u64 {
    files.iter().map(|(_, _, size)| TAR_BLOCK + size.div_ceil(TAR_BLOCK) * TAR_BLOCK).sum::<u64>() + 2 * TAR_BLOCK
}

/// Writes `files` as a tar into `out`; returns `out` and the tar's digest (the diff_id).
fn write_tar<W: io::Write>(out: W, files: Vec<(String, Box<dyn Read + '_>, u64)>) -> Result<(W, Digest)> {
    let mut builder = tar::Builder::new(HashingWriter::new(out));
    for (name, data, size) in files {
        builder.append(&tar_header(&name, size), data).ctx(|| format!("writing delta layer entry {name}"))?;
    }
    let (out, diff_id, _) = builder.into_inner().ctx(|| "finishing delta layer".into())?.finish();
    Ok((out, diff_id))
}

/// Writes a gzip-compressed tar of the given files as a blob; returns its descriptor and
/// diff_id.
fn write_tar_blob(writer: &LayoutWriter, files: Vec<(String, Box<dyn Read + '_>, u64)>, effort: Effort) -> Result<(BlobRef, Digest)> {
    let (blob, diff_id) = if effort == Effort::Best && tar_len(&files) <= ZOPFLI_MAX_TAR_BYTES {
        let failed = |e: io::Error| Error::io("compressing delta layer", e);
        let encoder = zopfli::GzipEncoder::new_buffered(zopfli::Options::default(), zopfli::BlockType::Dynamic, writer.blob()?).map_err(failed)?;
        let (encoder, diff_id) = write_tar(encoder, files)?;
        (encoder.into_inner().map_err(|e| failed(e.into_error()))?.finish().map_err(failed)?, diff_id)
    } else {
        let level = match effort {
            Effort::Fast => flate2::Compression::new(2),
            Effort::Best => flate2::Compression::best(),
        };
        let (encoder, diff_id) = write_tar(flate2::write::GzEncoder::new(writer.blob()?, level), files)?;
        (encoder.finish().ctx(|| "compressing delta layer".into())?, diff_id)
    };
    let (digest, size) = blob.finish(None)?;
    Ok((BlobRef { media_type: DELTA_LAYER_MEDIA_TYPE.into(), digest, size }, diff_id))
}

/// Writes the delta image (blobs and manifest) through `writer`; returns the manifest
/// descriptor to commit and the bytes a device downloads for the delta (manifest, config,
/// layers). Fills in `plan.layers[..].delta_layer`, and the `corrections_layer` of
/// corrected encodings.
pub fn write_delta(writer: &LayoutWriter, plan: &mut DeltaPlan, target: &Image, payloads: &[Payload]) -> Result<(BlobRef, u64)> {
    // Small payload files join the metadata layer; the others get a layer each, from 1.
    let mut inline = Vec::new();
    let mut own = Vec::new();
    let mut inline_bytes = 0;
    for p in payloads {
        let size = std::fs::metadata(&p.path).ctx(|| format!("reading {}", p.path.display()))?.len();
        if size <= INLINE_PAYLOAD_BYTES && inline_bytes + size <= MAX_INLINE_PAYLOAD_BYTES {
            inline_bytes += size;
            inline.push((p, size));
        } else {
            own.push((p, size));
        }
    }
    for (layer, p) in inline.iter().map(|(p, _)| (0, *p)).chain(own.iter().enumerate().map(|(i, (p, _))| (i as u32 + 1, *p))) {
        let plan_layer = &mut plan.layers[p.target_layer as usize];
        match (p.role, &mut plan_layer.encoding) {
            (Role::Corrections, Some(Encoding::Corrected { corrections_layer, .. })) => *corrections_layer = layer,
            (Role::Corrections, _) => return Err(Error::malformed("delta plan", format!("corrections for layer {} whose encoding has none", p.target_layer))),
            _ => plan_layer.delta_layer = Some(layer),
        }
    }
    let open = |p: &Payload, size: u64| -> Result<(String, Box<dyn Read>, u64)> {
        let file = File::open(&p.path).ctx(|| format!("opening {}", p.path.display()))?;
        Ok((p.role.file_name(p.target_layer), Box::new(BufReader::new(file)), size))
    };
    let mut payload_layers = Vec::new();
    for (p, size) in &own {
        payload_layers.push(write_tar_blob(writer, vec![open(p, *size)?], Effort::Fast)?);
    }
    let plan_json = serde_json::to_vec(plan).expect("plans serialize");
    let mut files: Vec<(String, Box<dyn Read>, u64)> = vec![
        (PLAN_FILE.into(), Box::new(&plan_json[..]), plan_json.len() as u64),
        (TARGET_MANIFEST_FILE.into(), Box::new(&target.manifest.raw[..]), target.manifest.raw.len() as u64),
        (TARGET_CONFIG_FILE.into(), Box::new(&target.config.raw[..]), target.config.raw.len() as u64),
    ];
    for (p, size) in &inline {
        files.push(open(p, *size)?);
    }
    let metadata = write_tar_blob(writer, files, Effort::Best)?;

    let all = std::iter::once(&metadata).chain(&payload_layers);
    let layers: Vec<Value> =
        all.clone().map(|(blob, _)| json!({ "mediaType": DELTA_LAYER_MEDIA_TYPE, "digest": blob.digest.to_string(), "size": blob.size })).collect();
    let diff_ids: Vec<String> = all.map(|(_, diff_id)| diff_id.to_string()).collect();
    let config = json!({
        "architecture": target.config.architecture,
        "os": target.config.os,
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let config_bytes = serde_json::to_vec(&config).expect("JSON values serialize");
    let (config_digest, config_size) = writer.put_blob(&config_bytes)?;
    // Only what finding a delta needs (its source; the target is the subject): the rest is in
    // delta.json.
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": OCI_CONFIG, "digest": config_digest.to_string(), "size": config_size },
        "layers": layers,
        "subject": { "mediaType": target.manifest.media_type, "digest": target.manifest.digest.to_string(), "size": target.manifest.raw.len() },
        "annotations": {
            ANNOTATION_VERSION: FORMAT_VERSION.to_string(),
            ANNOTATION_SOURCE_CONFIG: plan.source.config.to_string(),
        },
    });
    let manifest_bytes = serde_json::to_vec(&manifest).expect("JSON values serialize");
    let (digest, size) = writer.put_blob(&manifest_bytes)?;
    let download = size + config_size + metadata.0.size + payload_layers.iter().map(|(b, _)| b.size).sum::<u64>();
    Ok((BlobRef { media_type: OCI_MANIFEST.into(), digest, size }, download))
}

/// A delta image opened for reading: its plan and the target it rebuilds, all verified.
#[derive(Debug)]
pub struct DeltaImage {
    /// The layout holding the delta.
    pub layout: Layout,
    /// The delta image itself.
    pub image: Image,
    /// Its plan.
    pub plan: DeltaPlan,
    /// The target image's manifest and config (their layers are what the delta rebuilds).
    pub target: Image,
}

impl DeltaImage {
    /// Opens the delta that `reference` names, checking its version and that every digest
    /// chains: manifest annotations, `delta.json`, embedded target manifest and config.
    pub fn open(reference: &ImageRef) -> Result<Self> {
        let (layout, image) = load_image(reference)?;
        let annotation = |key: &str| image.manifest.annotations.get(key).cloned();
        let version = annotation(ANNOTATION_VERSION)
            .ok_or_else(|| Error::unsupported(reference.to_string(), format!("not a fleetdelta delta (no {ANNOTATION_VERSION} annotation)")))?;
        let version = version.parse::<u32>().ok().filter(|v| reads_version(*v)).ok_or(Error::UnsupportedFormatVersion {
            found: version,
            oldest: OLDEST_READ_VERSION,
            supported: FORMAT_VERSION,
        })?;
        let metadata_layer = image.layers.first().ok_or_else(|| Error::malformed("delta", "no layers"))?;
        let limit = 4 * MAX_METADATA_FILE_BYTES + 2 * MAX_INLINE_PAYLOAD_BYTES;
        let compressed = layout.read_blob(&metadata_layer.blob, limit)?;
        let mut metadata = Vec::new();
        copy_hashed(metadata_layer.compression.decoder(&compressed[..])?, &mut metadata, limit, "delta metadata layer")?;
        let mut files = read_metadata_tar(&metadata, version)?;
        let mut take = |name: &str| files.remove(name).ok_or_else(|| Error::malformed("delta metadata layer", format!("no {name}")));
        let (plan_raw, manifest_raw, config_raw) = (take(PLAN_FILE)?, take(TARGET_MANIFEST_FILE)?, take(TARGET_CONFIG_FILE)?);
        let probe: Value = serde_json::from_slice(&plan_raw).map_err(|e| Error::malformed(PLAN_FILE, e.to_string()))?;
        if let Some(v) = probe.get("formatVersion").and_then(Value::as_u64) {
            if v != u64::from(version) {
                return Err(Error::malformed("delta", format!("{PLAN_FILE} has format version {v}, the manifest {version}")));
            }
        }
        if let Some(features) = probe.get("features").and_then(Value::as_array) {
            check_features_known(features.iter().filter_map(Value::as_str))?;
        }
        let plan: DeltaPlan = serde_json::from_value(probe).map_err(|e| Error::malformed(PLAN_FILE, e.to_string()))?;

        let target_manifest = Manifest::parse(manifest_raw, None)?;
        let expect = |what: &str, key: &str, found: &Digest| -> Result<()> {
            let recorded = annotation(key).ok_or_else(|| Error::malformed("delta manifest", format!("no {key} annotation")))?;
            let recorded: Digest = recorded.parse()?;
            verify(|| what.to_string(), &recorded, None, found, 0)
        };
        expect("delta.json source config", ANNOTATION_SOURCE_CONFIG, &plan.source.config)?;
        verify(|| "delta.json target manifest (against the embedded target manifest)".into(), &target_manifest.digest, None, &plan.target.manifest, 0)?;
        if version == 1 {
            expect("embedded target manifest", ANNOTATION_TARGET_MANIFEST, &target_manifest.digest)?;
            expect("delta.json target config", ANNOTATION_TARGET_CONFIG, &plan.target.config)?;
            expect("delta.json source manifest", ANNOTATION_SOURCE_MANIFEST, &plan.source.manifest)?;
        }
        verify(|| "delta.json target config (against the embedded target manifest)".into(), &target_manifest.config.digest, None, &plan.target.config, 0)?;
        let subject = image.manifest.subject.as_ref().ok_or_else(|| Error::malformed("delta manifest", "no subject"))?;
        verify(|| "delta subject".into(), &subject.digest, None, &target_manifest.digest, 0)?;
        let target_config = Config::parse(config_raw)?;
        let target = Image::new(target_manifest, target_config)?;
        plan.validate(target.layers.len(), image.layers.len())?;
        Ok(DeltaImage { layout, image, plan, target })
    }

    /// Opens the payload of a `patch` or `blob` layer plan as a stream. The delta layer's
    /// blob digest is verified first, in one pass over the blob, so what streams is what the
    /// delta manifest names.
    pub fn open_payload(&self, layer: &LayerPlan) -> Result<PayloadReader> {
        let index = layer.delta_layer.ok_or_else(|| Error::malformed("delta.json", format!("layer {} has no payload", layer.index)))?;
        self.open_file(index, &payload_file_name(layer.index, layer.method))
    }

    /// Opens the correction stream of a layer plan with a corrected encoding, as
    /// [`DeltaImage::open_payload`] opens payloads.
    pub fn open_corrections(&self, layer: &LayerPlan) -> Result<PayloadReader> {
        let Some(Encoding::Corrected { corrections_layer, .. }) = &layer.encoding else {
            return Err(Error::malformed("delta.json", format!("layer {} has no corrections", layer.index)));
        };
        self.open_file(*corrections_layer, &corrections_file_name(layer.index))
    }

    /// Opens the one file, `name`, of delta layer `index`.
    fn open_file(&self, index: u32, name: &str) -> Result<PayloadReader> {
        let delta_layer = self.image.layers.get(index as usize).ok_or_else(|| Error::malformed("delta.json", format!("delta layer {index} does not exist")))?;
        let blob = &delta_layer.blob;
        let what = format!("delta layer {index} ({})", blob.digest);
        self.layout.verify_blob(blob, &what)?;
        let file = self.layout.open_blob(blob)?;
        let mut input = BufReader::with_capacity(256 << 10, delta_layer.compression.decoder(BufReader::with_capacity(256 << 10, file))?);
        // The layer's entries in order, up to the one named: format 1 has it alone in its
        // layer, format 2 may put it after the metadata files and other payloads.
        loop {
            let mut raw = [0u8; TAR_BLOCK as usize];
            input.read_exact(&mut raw).map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => Error::malformed(&what, format!("no {name} in it (truncated tar)")),
                _ => Error::io(format!("reading {what}"), e),
            })?;
            if raw.iter().all(|b| *b == 0) {
                return Err(Error::malformed(&what, format!("no {name} in it")));
            }
            let header = tar::Header::from_byte_slice(&raw);
            let checksum_ok = header.cksum().ok().map(u64::from) == Some(retime::header_checksum(&raw));
            if !checksum_ok || header.entry_type() != tar::EntryType::Regular {
                return Err(Error::malformed(&what, format!("expected a tar of regular files holding {name}")));
            }
            let size = header.size().map_err(|e| Error::malformed(&what, e.to_string()))?;
            if header.path_bytes().as_ref() == name.as_bytes() {
                return Ok(PayloadReader { input: input.take(size), what });
            }
            let skip = size.div_ceil(TAR_BLOCK) * TAR_BLOCK;
            let skipped = io::copy(&mut (&mut input).take(skip), &mut io::sink()).ctx(|| format!("reading {what}"))?;
            if skipped != skip {
                return Err(Error::malformed(&what, format!("no {name} in it (truncated tar)")));
            }
        }
    }
}

/// Whether `name` is the name of a payload file (format 2 puts small ones in the metadata
/// layer, after the metadata files).
fn is_payload_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("layer-") else { return false };
    let Some((digits, suffix)) = rest.split_once('.') else { return false };
    digits.len() == 4 && digits.bytes().all(|b| b.is_ascii_digit()) && ["patch", "blob", "corrections"].contains(&suffix)
}

/// Reads the small metadata tar: regular files only, each bounded, no duplicates; payload
/// files (format 2) are skipped, they are read by name when applied.
fn read_metadata_tar(bytes: &[u8], version: u32) -> Result<BTreeMap<String, Vec<u8>>> {
    let what = "delta metadata layer";
    let mut archive = tar::Archive::new(bytes);
    let mut files = BTreeMap::new();
    for entry in archive.entries().map_err(|e| Error::malformed(what, e.to_string()))? {
        let mut entry = entry.map_err(|e| Error::malformed(what, e.to_string()))?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let payload = version >= 2 && is_payload_name(&name);
        if !entry.header().entry_type().is_file() || !(payload || [PLAN_FILE, TARGET_MANIFEST_FILE, TARGET_CONFIG_FILE].contains(&name.as_str())) {
            return Err(Error::malformed(what, format!("unexpected entry {name:?}")));
        }
        if payload {
            continue;
        }
        if entry.size() > MAX_METADATA_FILE_BYTES {
            return Err(Error::TooLarge { what: format!("{what}: {name}"), limit: MAX_METADATA_FILE_BYTES });
        }
        let mut data = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut data).map_err(|e| Error::malformed(what, e.to_string()))?;
        if files.insert(name.clone(), data).is_some() {
            return Err(Error::malformed(what, format!("duplicate entry {name:?}")));
        }
    }
    Ok(files)
}

/// The payload bytes of one delta layer, streamed from its (verified) blob.
pub struct PayloadReader {
    /// Bounded by the entry's size; its remaining limit is what is left to read.
    input: io::Take<BufReader<Box<dyn Read>>>,
    what: String,
}

impl std::fmt::Debug for PayloadReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PayloadReader").field("left", &self.input.limit()).field("what", &self.what).finish()
    }
}

impl PayloadReader {
    /// Payload bytes left to read (all of them, before the first read): the size its tar
    /// entry declares.
    pub fn len(&self) -> u64 {
        self.input.limit()
    }

    /// Whether no payload bytes are left.
    pub fn is_empty(&self) -> bool {
        self.input.limit() == 0
    }

    /// Checks that the whole payload was consumed.
    pub fn finish(self) -> Result<()> {
        if self.input.limit() != 0 {
            return Err(Error::malformed(&self.what, format!("{} payload bytes left unread", self.input.limit())));
        }
        Ok(())
    }
}

impl Read for PayloadReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.limit() == 0 {
            return Ok(0);
        }
        let n = self.input.read(buf)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{}: truncated payload", self.what)));
        }
        Ok(n)
    }
}

/// Total bytes a device downloads for this delta: manifest, config and every layer blob.
pub fn delta_download_bytes(image: &Image) -> u64 {
    image.manifest.raw.len() as u64 + image.manifest.config.size + image.layers.iter().map(|l| l.blob.size).sum::<u64>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_bytes::noise;

    /// A payload is compressed already: its delta layer must not grow it (zlib-rs's level 1
    /// added 5.3% to every patch), and must give it back whole.
    #[test]
    fn a_payload_that_does_not_compress_costs_its_size_in_its_layer() {
        let dir = tempfile::tempdir().unwrap();
        let writer = LayoutWriter::create(&dir.path().join("delta")).unwrap();
        let payload = noise(7, 3 << 20);
        let (blob, _) = write_tar_blob(&writer, vec![("layer-0001.patch".into(), Box::new(&payload[..]), payload.len() as u64)], Effort::Fast).unwrap();
        assert!(blob.size <= payload.len() as u64 + payload.len() as u64 / 500 + 2048, "{} bytes of layer for a {}-byte payload", blob.size, payload.len());
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(writer.open_staged_blob(&blob.digest).unwrap()));
        let mut entry = tar.entries().unwrap().next().unwrap().unwrap();
        let mut back = Vec::new();
        entry.read_to_end(&mut back).unwrap();
        assert!(back == payload, "the payload comes back as it was");
    }

    /// Where the metadata layer is most of a delta, it is compressed by Zopfli: smaller than
    /// gzip's best level, and an ordinary gzip stream holding the tar its diff_id names. A
    /// metadata tar past the size limit gets level 9, as before.
    #[test]
    fn a_small_metadata_layer_is_smaller_than_gzip_best_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let writer = LayoutWriter::create(&dir.path().join("delta")).unwrap();
        let json: Vec<u8> =
            (0..120).flat_map(|i| format!("{{\"index\":{i},\"method\":\"patch\",\"tarBytes\":{}}},", i * 7919 % 100_003).into_bytes()).collect();
        let entries = || -> Vec<(String, Box<dyn Read + '_>, u64)> { vec![("delta.json".into(), Box::new(&json[..]), json.len() as u64)] };
        assert!(tar_len(&entries()) <= ZOPFLI_MAX_TAR_BYTES);
        let (blob, diff_id) = write_tar_blob(&writer, entries(), Effort::Best).unwrap();
        let level9 = |tar: &[u8]| {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            io::Write::write_all(&mut gz, tar).unwrap();
            gz.finish().unwrap()
        };
        let (tar, tar_diff_id) = write_tar(Vec::new(), entries()).unwrap();
        assert_eq!(diff_id, tar_diff_id);
        assert_eq!(tar.len() as u64, tar_len(&entries()));
        let best = level9(&tar);
        assert!(blob.size < best.len() as u64, "{} bytes, level 9 {}", blob.size, best.len());
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(writer.open_staged_blob(&blob.digest).unwrap()).read_to_end(&mut back).unwrap();
        assert!(back == tar, "the tar comes back as it was");
        // Past the limit: gzip's best level, byte for byte.
        let big = noise(3, ZOPFLI_MAX_TAR_BYTES as usize);
        let entries = || -> Vec<(String, Box<dyn Read + '_>, u64)> { vec![("layer-0000.patch".into(), Box::new(&big[..]), big.len() as u64)] };
        let (blob, _) = write_tar_blob(&writer, entries(), Effort::Best).unwrap();
        let (tar, _) = write_tar(Vec::new(), entries()).unwrap();
        let mut written = Vec::new();
        writer.open_staged_blob(&blob.digest).unwrap().read_to_end(&mut written).unwrap();
        assert!(written == level9(&tar), "level 9 past the limit");
    }
}
