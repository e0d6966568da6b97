//! The JSON bodies of the HTTP API, shared by the server (`fleetdelta-service`'s routes) and
//! the device's client ([`super::client`]). `docs/api.md` and `docs/openapi.yaml` describe them.

use serde::{Deserialize, Serialize};

use fleetdelta_engine::digest::Digest;

/// The route a device asks for a delta on (`POST`).
pub const DELTAS: &str = "/v1/deltas";

/// `POST /v1/deltas`: the delta from the image a device has to the image it needs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeltaRequest {
    /// The target image, pinned: `docker://HOST/REPO@sha256:...`.
    pub target: String,
    /// The source image in a registry (`docker://...`), when the caller knows it. Optional
    /// when `source_config` is given and the service knows an image with that config (from a
    /// registered release or an earlier request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The config digest of the source image: what identifies it, whatever its layers'
    /// compression. Required unless `source` is pinned by digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_config: Option<Digest>,
}

/// Where a delta request stands.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DeltaState {
    /// Built: `delta` says where (HTTP 200).
    Ready,
    /// Being looked up or built: ask again after `retry_after_seconds` (HTTP 202).
    Building,
    /// The last attempt failed: `reason` says why; a request after `retry_after_seconds`
    /// starts the next attempt (HTTP 422, 500 or 502).
    Failed,
    /// The service cannot take the request now (shutting down, or too many builds queued):
    /// ask again later (HTTP 503).
    Unavailable,
}

/// A built delta.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeltaLocation {
    /// The delta image, pinned by digest: `docker://HOST/REPO@sha256:...`.
    pub reference: String,
    /// Its manifest digest.
    pub manifest: Digest,
    /// The tag it is also stored under, in the target's repository.
    pub tag: String,
    /// What a device downloads for it: manifest, config and layers, in bytes.
    pub download_bytes: u64,
}

/// The answer to a delta request, whatever its status.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DeltaResponse {
    /// Where it stands.
    pub status: DeltaState,
    /// The source config digest the delta is (to be) made from, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_config: Option<Digest>,
    /// The target manifest digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_manifest: Option<Digest>,
    /// The delta, when ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<DeltaLocation>,
    /// Why it failed or is unavailable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Failed attempts so far for this pair.
    #[serde(default)]
    pub failures: u32,
    /// When to ask again (also in the `Retry-After` header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
}

/// An error answer that is not about a delta (bad request, unknown release).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorResponse {
    /// What was wrong.
    pub error: String,
}
