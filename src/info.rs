//! What a delta holds, per target layer, for people and for scripts.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::digest::Digest;
use crate::error::Result;
use crate::format::plan::{Encoding, Method, PatchStats};
use crate::image::ImageRef;
use crate::layer::exact::Encoder;
use crate::package::{delta_download_bytes, DeltaImage};

/// A summary of a delta.
#[derive(Clone, Debug, Serialize)]
pub struct DeltaInfo {
    /// Delta format version.
    pub format_version: u32,
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
    /// Size of the delta layer carrying its payload (0 for `source`).
    pub payload_bytes: u64,
    /// For `source`: the source layer it equals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_layer: Option<u32>,
    /// For `patch`: how it was coded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<PatchStats>,
    /// How the blob is rebuilt from the tar (absent in deltas that predate it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoding: Option<Encoding>,
    /// gzip files inside the layer that the patch writes uncompressed, counted by the
    /// encoder that compresses them again (as [`describe_encoder`] names it).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub repacked_members: BTreeMap<String, u64>,
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
    /// How the blob comes out, in words: `exact (pgzip)`, `verbatim`, `recompressed: why`.
    pub fn encoding_summary(&self) -> String {
        match &self.encoding {
            None => "recompressed unless identical (older delta)".into(),
            Some(Encoding::Verbatim) => "verbatim".into(),
            Some(Encoding::Exact { descriptor }) => format!("exact ({})", describe_encoder(&descriptor.encoder)),
            Some(Encoding::Recompressed { reason }) => format!("other digest: {reason}"),
        }
    }
}

/// Opens and verifies the delta `reference` names, and summarizes it.
pub fn info(reference: &ImageRef) -> Result<DeltaInfo> {
    let delta = DeltaImage::open(reference)?;
    let target = &delta.target;
    let layers = delta
        .plan
        .layers
        .iter()
        .map(|l| {
            let t = &target.layers[l.index as usize];
            LayerInfo {
                index: l.index,
                method: l.method,
                digest: t.blob.digest,
                blob_bytes: t.blob.size,
                payload_bytes: l.delta_layer.map_or(0, |d| delta.image.layers[d as usize].blob.size),
                source_layer: l.source_layer,
                stats: l.stats.clone(),
                encoding: l.encoding.clone(),
                repacked_members: l.members.iter().fold(BTreeMap::new(), |mut m, r| {
                    *m.entry(describe_encoder(&r.descriptor.encoder)).or_default() += 1;
                    m
                }),
            }
        })
        .collect();
    Ok(DeltaInfo {
        format_version: delta.plan.format_version,
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
    })
}
