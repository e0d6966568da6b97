//! What a delta holds, per target layer, for people and for scripts.

use serde::Serialize;

use crate::digest::Digest;
use crate::error::Result;
use crate::format::plan::{Method, PatchStats};
use crate::image::ImageRef;
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
