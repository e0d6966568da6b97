//! The JSON form of a [`Transition`], in the shape balena's release-update tool prints.
//!
//! The shape follows `balena-io-modules/balena-release-update` (`lib/index.ts`, interfaces
//! `ReleaseUpdate` and `ServiceUpdate`, and the example in `bin/balena-release-update.js`):
//!
//! ```text
//! originates_from__release: {id, commit}
//! produces__release: {id, commit}
//! is_produced_by__service_update: [{
//!     service_name, status,
//!     originates_from__image?: {id, is_stored_at__image_location, content_hash, image_size},
//!     produces__image: {id, is_stored_at__image_location, content_hash, image_size,
//!                       is_produced_by__delta?: {id, version, is_stored_at__location, size}}}]
//! overall_status, estimated_total_payload_size?
//! ```
//!
//! Where we differ, and why:
//! - No numeric `id`s: they are balenaCloud database keys; an image is identified by its
//!   `content_hash` (the manifest digest) and a delta by its location. Release ids are strings.
//! - `commit` is left out when the release file gives none.
//! - The delta's `version` (balena's delta algorithm, 2 or 3) is left out.
//! - `estimated_total_payload_size` is always given; balena's tool gives it only when the update
//!   is ready, but ours is a pessimistic estimate that holds before deltas exist.
//! - `is_produced_by__service_update` lists, like balena's, the services of the target release
//!   (balena's lists added services with status `ready` and no `originates_from__image`, as we
//!   do); unchanged services carry status `unchanged`.
//! - Added fields: per service `change`, `reason` and `estimated_payload_size`; at the top
//!   `contracts_checked`, `removed_services` (services stopped and removed: they produce no image,
//!   which balena's service updates always have), `dropped_services` (optional services left out,
//!   with the unmet requirements) and `deltas` (one per image pair and target repository, with
//!   the services using it: a delta lives in its target's repository).

use serde::Serialize;

use super::catalog::DeltaStatus;
use super::transition::{Change, DeltaNeed, ImageInfo, ReleaseRef, ServiceUpdate, Transition};

impl Transition {
    /// The transition as a JSON value in balena's release-update shape (see the module docs).
    pub fn to_json(&self) -> serde_json::Value {
        // Serializing plain structs of strings and numbers into a Value cannot fail.
        serde_json::to_value(Wire::from(self)).unwrap_or_default()
    }

    /// [`Transition::to_json`], pretty-printed.
    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(&self.to_json()).unwrap_or_default()
    }
}

#[derive(Serialize)]
struct Wire<'a> {
    #[serde(rename = "originates_from__release")]
    originates_from_release: WireRelease<'a>,
    #[serde(rename = "produces__release")]
    produces_release: WireRelease<'a>,
    #[serde(rename = "is_produced_by__service_update")]
    is_produced_by_service_update: Vec<WireServiceUpdate<'a>>,
    overall_status: &'static str,
    estimated_total_payload_size: u64,
    contracts_checked: bool,
    removed_services: Vec<WireRemoved<'a>>,
    dropped_services: Vec<WireDropped<'a>>,
    deltas: Vec<WireDelta<'a>>,
}

#[derive(Serialize)]
struct WireRelease<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    commit: Option<&'a str>,
}

#[derive(Serialize)]
struct WireImage<'a> {
    #[serde(rename = "is_stored_at__image_location")]
    is_stored_at_image_location: &'a str,
    content_hash: String,
    image_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(rename = "is_produced_by__delta")]
    is_produced_by_delta: Option<WireDeltaRef<'a>>,
}

#[derive(Serialize)]
struct WireDeltaRef<'a> {
    #[serde(rename = "is_stored_at__location")]
    is_stored_at_location: &'a str,
    size: u64,
}

#[derive(Serialize)]
struct WireServiceUpdate<'a> {
    service_name: &'a str,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(rename = "originates_from__image")]
    originates_from_image: Option<WireImage<'a>>,
    #[serde(rename = "produces__image")]
    produces_image: WireImage<'a>,
    change: &'static str,
    reason: &'a str,
    estimated_payload_size: u64,
}

#[derive(Serialize)]
struct WireRemoved<'a> {
    service_name: &'a str,
    status: &'static str,
    #[serde(rename = "originates_from__image")]
    originates_from_image: Option<WireImage<'a>>,
    change: &'static str,
    reason: &'a str,
}

#[derive(Serialize)]
struct WireDropped<'a> {
    service_name: &'a str,
    contract: &'a str,
    unmet_requirements: Vec<String>,
}

#[derive(Serialize)]
struct WireDelta<'a> {
    status: &'static str,
    #[serde(rename = "originates_from__image")]
    originates_from_image: WireImage<'a>,
    #[serde(rename = "produces__image")]
    produces_image: WireImage<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(rename = "is_stored_at__location")]
    is_stored_at_location: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    services: &'a [String],
}

fn release(r: &ReleaseRef) -> WireRelease<'_> {
    WireRelease { id: &r.id, commit: r.commit.as_deref() }
}

fn image(info: &ImageInfo) -> WireImage<'_> {
    WireImage { is_stored_at_image_location: &info.reference, content_hash: info.digest.to_string(), image_size: info.size, is_produced_by_delta: None }
}

/// `None` for a service that produces no image (a removed one).
fn service_update(s: &ServiceUpdate) -> Option<WireServiceUpdate<'_>> {
    let produces = WireImage {
        is_produced_by_delta: s.delta.as_ref().map(|d| WireDeltaRef { is_stored_at_location: &d.reference, size: d.size }),
        ..image(s.to_image.as_ref()?)
    };
    Some(WireServiceUpdate {
        service_name: &s.service_name,
        status: s.status.as_str(),
        originates_from_image: s.from_image.as_ref().map(image),
        produces_image: produces,
        change: s.change.as_str(),
        reason: &s.reason,
        estimated_payload_size: s.payload_size,
    })
}

fn delta(d: &DeltaNeed) -> WireDelta<'_> {
    let (status, location, size) = match &d.status {
        DeltaStatus::Absent => ("pending", None, None),
        DeltaStatus::Building => ("preparing", None, None),
        DeltaStatus::Ready { reference, size } => ("ready", Some(reference.as_str()), Some(*size)),
    };
    WireDelta { status, originates_from_image: image(&d.from), produces_image: image(&d.to), is_stored_at_location: location, size, services: &d.services }
}

impl<'a> From<&'a Transition> for Wire<'a> {
    fn from(t: &'a Transition) -> Self {
        Wire {
            originates_from_release: release(&t.from),
            produces_release: release(&t.to),
            is_produced_by_service_update: t.services.iter().filter_map(service_update).collect(),
            overall_status: t.overall_status.as_str(),
            estimated_total_payload_size: t.estimated_total_payload_size,
            contracts_checked: t.contracts_checked,
            removed_services: t
                .services
                .iter()
                .filter(|s| s.change == Change::Removed)
                .map(|s| WireRemoved {
                    service_name: &s.service_name,
                    status: s.status.as_str(),
                    originates_from_image: s.from_image.as_ref().map(image),
                    change: s.change.as_str(),
                    reason: &s.reason,
                })
                .collect(),
            dropped_services: t
                .dropped
                .iter()
                .map(|d| WireDropped {
                    service_name: &d.service_name,
                    contract: &d.contract,
                    unmet_requirements: d.unmet.iter().map(ToString::to_string).collect(),
                })
                .collect(),
            deltas: t.deltas.iter().map(delta).collect(),
        }
    }
}
