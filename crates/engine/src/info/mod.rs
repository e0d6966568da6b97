//! What a delta holds, per target layer, for people and for scripts; and with the source
//! image, where each patch's bytes go, file by file ([`info_with_files`]).

mod chunk_cost;
mod files;
mod tar_walk;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::Serialize;

use crate::apply::{check_source, prepare_sources};
use crate::digest::Digest;
use crate::error::{IoContext, Result};
use crate::format::is_zero;
use crate::format::plan::{Encoding, Method, PatchStats, Wrapping};
use crate::layer::exact::Encoder;
use crate::package::{delta_download_bytes, DeltaImage};
use crate::progress::Progress;
use crate::reference::{load_image, ImageRef};
pub use files::{Coding, FileCost, LayerFiles};
pub use tar_walk::EntryKind;

/// A summary of a delta.
#[derive(Clone, Debug, Serialize)]
pub struct DeltaInfo {
    /// Delta format version.
    pub format_version: u32,
    /// Format features an applier must know to apply it (`delta.json`'s `features`).
    pub features: Vec<String>,
    /// Level it was computed at.
    pub level: String,
    /// Program that wrote it.
    pub created_by: String,
    /// Digest of the delta manifest.
    pub delta_manifest: Digest,
    /// Source manifest and config digests.
    pub source_manifest: Digest,
    /// Source config digest (what the applier requires).
    pub source_config: Digest,
    /// Target manifest digest.
    pub target_manifest: Digest,
    /// Target config digest.
    pub target_config: Digest,
    /// Bytes to download for the delta: manifest, config and layers.
    pub payload_bytes: u64,
    /// Bytes to download for the whole target image without any delta.
    pub target_bytes: u64,
    /// Per target layer.
    pub layers: Vec<LayerInfo>,
}

/// One target layer in a [`DeltaInfo`].
#[derive(Clone, Debug, Serialize)]
pub struct LayerInfo {
    /// Target layer index.
    pub index: u32,
    /// How it is rebuilt.
    pub method: Method,
    /// Target layer blob digest.
    pub digest: Digest,
    /// Target layer blob size.
    pub blob_bytes: u64,
    /// Size of the delta layers carrying its payload: patch or blob, and correction stream
    /// (0 for `source` without corrections).
    pub payload_bytes: u64,
    /// Of which the delta layer carrying its correction stream (corrected encodings).
    #[serde(skip_serializing_if = "is_zero")]
    pub corrections_bytes: u64,
    /// For `source`: the source layer it equals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_layer: Option<u32>,
    /// For `patch`: how it was coded.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "snake_case_keys")]
    pub stats: Option<PatchStats>,
    /// How the blob is rebuilt from the tar (absent in deltas that predate it).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "snake_case_keys")]
    pub encoding: Option<Encoding>,
    /// gzip files and zip entries inside the layer that the patch writes uncompressed,
    /// counted by kind and by the encoder that compresses them again (as
    /// [`describe_encoder`] names it): `"zip entries by zlib -6"`; and AArch64 code spans
    /// the patch writes with absolute call targets (`"AArch64 code spans seen by their call
    /// targets"`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub repacked_members: BTreeMap<String, u64>,
    /// For `patch`, with [`info_with_files`]: where the patch's bytes go, file by file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<LayerFiles>,
}

/// Serializes a value of the delta format (whose keys are camelCase, as deltas store them)
/// with snake_case keys, as every command's JSON output has them. The delta format has no
/// maps keyed by data, so every key is a field name.
fn snake_case_keys<T: Serialize, S: serde::Serializer>(value: &T, serializer: S) -> std::result::Result<S::Ok, S::Error> {
    fn snake(value: serde_json::Value) -> serde_json::Value {
        match value {
            serde_json::Value::Object(map) => serde_json::Value::Object(map.into_iter().map(|(k, v)| (snake_key(&k), snake(v))).collect()),
            serde_json::Value::Array(items) => serde_json::Value::Array(items.into_iter().map(snake).collect()),
            other => other,
        }
    }
    fn snake_key(key: &str) -> String {
        let mut out = String::with_capacity(key.len() + 4);
        for c in key.chars() {
            if c.is_ascii_uppercase() {
                out.push('_');
                out.push(c.to_ascii_lowercase());
            } else {
                out.push(c);
            }
        }
        out
    }
    snake(serde_json::to_value(value).map_err(serde::ser::Error::custom)?).serialize(serializer)
}

/// A byte count for people: `512 B`, `1.2 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// An encoder in words, from its JSON form: `pgzip block_size=262144`, `gnu-gzip level=9`.
pub fn describe_encoder(encoder: &Encoder) -> String {
    let fields = match serde_json::to_value(encoder) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => Default::default(),
    };
    let name = fields.get("kind").and_then(|k| k.as_str()).unwrap_or("?").to_string();
    let params: Vec<String> = fields.iter().filter(|(k, _)| *k != "kind").map(|(k, v)| format!("{k}={}", v.to_string().trim_matches('"'))).collect();
    if params.is_empty() {
        name
    } else {
        format!("{name} {}", params.join(" "))
    }
}

impl LayerInfo {
    /// How the blob comes out, in words: `exact (pgzip)`, `verbatim`,
    /// `corrected (preflate, 1.2 MiB of corrections = 3.4%)`, `other digest: why`.
    pub fn encoding_summary(&self) -> String {
        match &self.encoding {
            None => "recompressed unless identical (older delta)".into(),
            Some(Encoding::Verbatim) => "verbatim".into(),
            Some(Encoding::Exact { descriptor }) => format!("exact ({})", describe_encoder(&descriptor.encoder)),
            Some(Encoding::Corrected { .. }) => {
                let percent = 100.0 * self.corrections_bytes as f64 / self.blob_bytes.max(1) as f64;
                let precision = if percent < 1.0 { 2 } else { 1 };
                format!("corrected (preflate, {} of corrections = {percent:.precision$}%)", human_bytes(self.corrections_bytes))
            }
            Some(Encoding::Recompressed { reason }) => format!("other digest: {reason}"),
        }
    }
}

/// Opens and verifies the delta `reference` names, and summarizes it.
pub fn info(reference: &ImageRef) -> Result<DeltaInfo> {
    Ok(summarize(&DeltaImage::open(reference)?))
}

/// Options of [`info_with_files`].
#[derive(Clone, Debug)]
pub struct FilesOptions {
    /// The image the delta was made against: the patches read its layers.
    pub source: ImageRef,
    /// Where the source layers are decompressed, in a directory of their own removed
    /// afterwards.
    pub scratch: PathBuf,
    /// Largest uncompressed layer accepted.
    pub max_layer_bytes: u64,
}

/// [`info`], with each patched layer's [`LayerFiles`]: its patch replayed against the source
/// image as the applier would (storing nothing it rebuilds), each byte of the rebuilt tar
/// counted for its entry by the record that wrote it, and each chunk's zstd frame shared
/// among the entries that took its bytes. The shares are estimated: each chunk is compressed
/// again, flushed wherever its bytes pass from one entry (or from an entry's headers to its
/// contents) to the next, and what each flush wrote, less what a flush itself costs, is
/// scaled to the real frame ([`LayerFiles`]). The records
/// cost the patch beyond its chunks' frames (at least what they cost compressed alone), the
/// chunks the rest ([`LayerFiles::records_and_framing_bytes`]).
///
/// Refuses a source image other than the delta's ([`crate::Error::WrongSource`]).
pub fn info_with_files(reference: &ImageRef, options: &FilesOptions, progress: &dyn Progress) -> Result<DeltaInfo> {
    let delta = DeltaImage::open(reference)?;
    let mut summary = summarize(&delta);
    let (layout, source) = load_image(&options.source)?;
    check_source(&delta, &source)?;
    let patched: Vec<usize> = (0..delta.plan.layers.len()).filter(|i| delta.plan.layers[*i].method == Method::Patch).collect();
    let needed: BTreeSet<u32> = patched.iter().flat_map(|i| delta.plan.layers[*i].source_layers_used.iter().copied()).collect();
    let scratch = tempfile::Builder::new()
        .prefix(".info-files-")
        .tempdir_in(&options.scratch)
        .ctx(|| format!("creating a scratch directory in {}", options.scratch.display()))?;
    let sources = prepare_sources(&delta, &layout, &source, &needed, scratch.path(), options.max_layer_bytes, progress)?;
    let levels = files::zstd_levels(&delta);
    let tar_bytes = |i: &usize| delta.plan.layers[*i].stats.as_ref().map_or(0, |s| s.tar_bytes);
    progress.stage("replaying patches", patched.iter().map(tar_bytes).sum());
    for i in patched {
        let files = files::layer_files(&delta, &delta.plan.layers[i], &sources, levels, options.max_layer_bytes)?;
        progress.advance(tar_bytes(&i));
        summary.layers[i].files = Some(files);
    }
    progress.finish();
    Ok(summary)
}

/// What `delta` holds, from its plan.
fn summarize(delta: &DeltaImage) -> DeltaInfo {
    let target = &delta.target;
    let layers = delta
        .plan
        .layers
        .iter()
        .map(|l| {
            let t = &target.layers[l.index as usize];
            let layer_bytes = |d: u32| delta.image.layers[d as usize].blob.size;
            let corrections_bytes = match &l.encoding {
                Some(Encoding::Corrected { corrections_layer, .. }) => layer_bytes(*corrections_layer),
                _ => 0,
            };
            LayerInfo {
                index: l.index,
                method: l.method,
                digest: t.blob.digest,
                blob_bytes: t.blob.size,
                payload_bytes: l.delta_layer.map_or(0, layer_bytes) + corrections_bytes,
                corrections_bytes,
                source_layer: l.source_layer,
                stats: l.stats.clone(),
                encoding: l.encoding.clone(),
                repacked_members: l.members.iter().fold(BTreeMap::new(), |mut m, r| {
                    let kind = match r.member.wrapping {
                        Wrapping::Gzip => "gzip files",
                        Wrapping::Deflate => "zip entries",
                        Wrapping::Aarch64Code => "AArch64 code spans",
                        Wrapping::X8664Code => "x86-64 code spans",
                    };
                    let key = match (r.encoder(), r.member.wrapping) {
                        (Some(encoder), _) => format!("{kind} by {}", describe_encoder(encoder)),
                        (None, Wrapping::X8664Code) if r.address_map.as_ref().is_some_and(|m| m.has_call_frames()) => {
                            format!("{kind} and their call frames seen through the old file's addresses")
                        }
                        (None, Wrapping::X8664Code) => format!("{kind} seen through the old file's addresses"),
                        (None, _) => format!("{kind} seen by their call targets"),
                    };
                    *m.entry(key).or_default() += 1;
                    m
                }),
                files: None,
            }
        })
        .collect();
    DeltaInfo {
        format_version: delta.plan.format_version,
        features: delta.plan.features.clone(),
        level: delta.plan.level.clone(),
        created_by: delta.plan.created_by.clone(),
        delta_manifest: delta.image.manifest.digest,
        source_manifest: delta.plan.source.manifest,
        source_config: delta.plan.source.config,
        target_manifest: target.manifest.digest,
        target_config: target.config.digest,
        payload_bytes: delta_download_bytes(&delta.image),
        target_bytes: delta_download_bytes(target),
        layers,
    }
}
