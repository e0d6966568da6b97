//! Device-side pull: bring a registry image into a local layout, downloading as little as
//! possible. With the image the device has (`from`), the deltas that rebuild the target
//! are looked up among the target's referrers; the cheapest one made from the device's image
//! is applied. Without one, only the layers the device lacks are downloaded, unless the
//! operator forbids full downloads (metered links), in which case the pull fails and says so.
//!
//! With a builder service ([`PullOptions::service`]), the device first asks it for the delta
//! from the image it has, waiting politely while it is built (up to a bound); a service that
//! fails, is unreachable or is still building when the wait ends leaves the referrers lookup
//! and the rules above.
#![deny(missing_docs)]

pub mod api;
pub mod client;

use std::time::Duration;

use serde::Serialize;

use crate::api::DeltaRequest;
use crate::client::{ServiceClient, WaitOutcome};
use fleetdelta_engine::apply::{apply, ApplyOptions, ApplyReport};
use fleetdelta_engine::delta_store::{find_in_repository, DeltaKey};
use fleetdelta_engine::digest::Digest;
use fleetdelta_engine::error::{Error, Result};
use fleetdelta_engine::image::manifest::{Manifest, MAX_JSON_BYTES};
use fleetdelta_engine::image::{Image, Layout, LayoutWriter};
use fleetdelta_engine::progress::Progress;
use fleetdelta_engine::reference::{load_image, ImageRef};
use fleetdelta_engine::registry::RegistryRef;
use fleetdelta_engine::transfer::{fetch_image, FetchReport, Transfer};

/// Options of [`pull`].
#[derive(Clone, Debug, Default)]
pub struct PullOptions {
    /// Whether downloading the missing layers is allowed when no delta exists (or when it
    /// costs less than the delta). `false` on metered links: no delta, no update.
    pub allow_full: bool,
    /// Use this delta instead of looking among the target's referrers.
    pub delta: Option<RegistryRef>,
    /// How the delta is applied (its `expect_target` is set to the target's digest).
    pub apply: ApplyOptions,
    /// Ask this builder service for the delta first.
    pub service: Option<ServiceOptions>,
    /// Where the service finds the device's image (pinned), when the caller knows it: the
    /// device agent does. Otherwise the target's repository at the device's manifest digest
    /// is named, and the service goes by the config digest when that is not there.
    pub source: Option<RegistryRef>,
}

/// The builder service a device asks for its deltas.
#[derive(Clone, Debug)]
pub struct ServiceOptions {
    /// Its URL, `http://HOST:PORT`.
    pub url: String,
    /// The longest the device waits for a delta being built.
    pub max_wait: Duration,
}

/// How the image got there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum PullMethod {
    /// The device already has the target (same config, hence same layers' content): nothing
    /// downloaded but its manifest.
    Unchanged,
    /// A delta was downloaded and applied.
    Delta {
        /// The delta image.
        delta: String,
        /// The delta manifest digest.
        manifest: Digest,
    },
    /// The missing layers were downloaded.
    Full {
        /// Why no delta was used.
        reason: String,
    },
}

/// What [`pull`] did.
#[derive(Clone, Debug, Serialize)]
pub struct PullReport {
    /// The target image manifest digest in the registry.
    pub target_manifest: Digest,
    /// How.
    pub method: PullMethod,
    /// Bytes received from the registry.
    pub received: u64,
    /// What downloading the missing layers (and config) would have cost.
    pub missing_layers_bytes: u64,
    /// The manifest written to the output layout.
    pub written_manifest: Digest,
    /// The rebuild, when a delta was applied.
    pub apply: Option<ApplyReport>,
    /// What the builder service said, when one was asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceAnswer>,
}

/// What the builder service answered a pull.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum ServiceAnswer {
    /// The delta is built.
    Ready {
        /// Where, `docker://…@sha256:…`.
        delta: String,
        /// What downloading it costs.
        download_bytes: u64,
    },
    /// It could not build the delta.
    Failed {
        /// Why, as the service says.
        reason: String,
    },
    /// Still building when the wait ended (`--service-wait`).
    StillBuilding {
        /// Seconds waited.
        waited_seconds: f64,
    },
    /// It answered a delta reference that is no pinned registry image, or one outside the
    /// target's repository (deltas live beside their target, where the device can read).
    Unusable {
        /// The reference.
        reference: String,
    },
    /// It could not be asked (unreachable, or an answer that is not its API's).
    Unreachable {
        /// The error.
        error: String,
    },
}

impl std::fmt::Display for ServiceAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServiceAnswer::Ready { delta, download_bytes } => write!(f, "delta {delta} ready ({download_bytes} bytes)"),
            ServiceAnswer::Failed { reason } => write!(f, "could not build the delta: {reason}"),
            ServiceAnswer::StillBuilding { waited_seconds } => write!(f, "still building after {waited_seconds:.0} s"),
            ServiceAnswer::Unusable { reference } => write!(f, "answered an unusable delta reference {reference:?}"),
            ServiceAnswer::Unreachable { error } => f.write_str(error),
        }
    }
}

/// A delta that rebuilds the target from the device's image.
#[derive(Debug)]
struct Candidate {
    reference: RegistryRef,
    manifest: Digest,
    download: u64,
}

/// [`pull`] between any transports, as a device on a container engine runs it: `from` may be
/// an engine image (exported into a scratch layout first, its layers then left out of the
/// load), and `output` the engine (the target is rebuilt with plain layers, the only kind
/// the engine stores, then loaded, verified and tagged last; see
/// [`Transfer::publish_report`]) or a registry. A layout `output` is written in place.
pub fn pull_into(
    transfer: &Transfer,
    from: Option<&ImageRef>,
    target: &RegistryRef,
    output: &ImageRef,
    options: &PullOptions,
    progress: &dyn Progress,
) -> Result<(PullReport, fleetdelta_engine::transfer::Published)> {
    let from = match from {
        Some(f) => Some(transfer.localize(f, progress)?.0),
        None => None,
    };
    let mut options = options.clone();
    if matches!(output, ImageRef::Engine(_)) {
        options.apply.layers = fleetdelta_engine::apply::LayerOutput::Uncompressed;
    }
    let staged = transfer.staging_for(output)?;
    let report = pull(transfer, from.as_ref(), target, &staged, &options, progress)?;
    let published = transfer.publish_report(&staged, output, progress)?;
    Ok((report, published))
}

/// Pulls `target` into `output` (a layout; the device's store may be the layout of `from`),
/// using a delta from `from` when one exists. Every blob and digest is verified before the
/// output is committed; a failed pull leaves `output` as it was.
pub fn pull(
    transfer: &Transfer,
    from: Option<&ImageRef>,
    target: &RegistryRef,
    output: &ImageRef,
    options: &PullOptions,
    progress: &dyn Progress,
) -> Result<PullReport> {
    let (out_dir, _) = output.local()?;
    let out_tag = output.tag_or_default();
    let client = transfer.client();
    let fetched = transfer.block_on(client.get_image_manifest(target))?;
    let target_manifest = Manifest::parse(fetched.raw.clone(), Some(&fetched.media_type))?;
    let local = from.map(load_image).transpose()?;
    let out_layout = Layout::open(out_dir).ok();
    let have = |d: &Digest| local.as_ref().is_some_and(|(l, _)| l.blob_path(d).exists()) || out_layout.as_ref().is_some_and(|l| l.blob_path(d).exists());
    let missing_layers_bytes =
        std::iter::once(&target_manifest.config).chain(target_manifest.layers.iter()).filter(|b| !have(&b.digest)).map(|b| b.size).sum::<u64>();
    let mut report = PullReport {
        target_manifest: fetched.digest,
        method: PullMethod::Unchanged,
        received: fetched.raw.len() as u64,
        missing_layers_bytes,
        written_manifest: fetched.digest,
        apply: None,
        service: None,
    };

    // The config digest is the image's identity: a device whose store recompressed the
    // layers (a different manifest digest) has the target all the same.
    if let (Some(from), Some((_, image))) = (from, &local) {
        if image.config.digest == target_manifest.config.digest {
            report.written_manifest = image.manifest.digest;
            transfer.copy(from, output, progress)?;
            return Ok(report);
        }
    }

    let candidate = match (&local, &options.delta) {
        (None, _) => None,
        (Some(_), Some(delta)) => Some(describe_delta(transfer, delta, &mut report.received)?),
        (Some((_, image)), None) => {
            let from_service = match &options.service {
                Some(service) => {
                    let (candidate, note) = ask_service(transfer, service, target, &fetched.digest, image, options.source.as_ref());
                    report.service = Some(note);
                    candidate
                }
                None => None,
            };
            match from_service {
                Some(c) => Some(c),
                None => {
                    let key = DeltaKey { source_config: image.config.digest, target_manifest: fetched.digest };
                    transfer.block_on(find_in_repository(transfer.client(), target, &key))?.and_then(|d| match d.reference {
                        ImageRef::Registry(reference) => Some(Candidate { reference, manifest: d.manifest, download: d.download }),
                        _ => None,
                    })
                }
            }
        }
    };
    let reason = match (&candidate, from) {
        (_, None) => "no local image to start from".to_string(),
        (None, Some(_)) => match &report.service {
            Some(note) => format!("no delta in {}/{} rebuilds {} from the local image (service: {note})", target.registry, target.repository, fetched.digest),
            None => format!("no delta in {}/{} rebuilds {} from the local image", target.registry, target.repository, fetched.digest),
        },
        (Some(c), Some(_)) if options.allow_full && options.delta.is_none() && c.download > missing_layers_bytes => {
            format!("the delta ({} bytes) costs more than the missing layers ({missing_layers_bytes} bytes)", c.download)
        }
        (Some(c), Some(from)) => {
            match apply_delta(transfer, from, c, output, &fetched.digest, options, progress) {
                Ok((applied, received)) => {
                    report.received += received;
                    report.written_manifest = applied.written_manifest;
                    report.method = PullMethod::Delta { delta: format!("docker://{}", c.reference), manifest: c.manifest };
                    report.apply = Some(applied);
                    return Ok(report);
                }
                // A delta that fails verification is no reason to leave the device behind
                // when the operator allows a full download; the reason is reported.
                Err(e) if options.allow_full => format!("the delta failed: {e}"),
                Err(e) => return Err(e),
            }
        }
    };
    if !options.allow_full {
        return Err(Error::NotFound(format!("{reason}, and full downloads are not allowed (metered link)")));
    }
    let writer = LayoutWriter::create(out_dir)?;
    let reuse: Vec<&Layout> = local.iter().map(|(l, _)| l).collect();
    let (manifest, _, fetch): (_, Image, FetchReport) =
        transfer.block_on(fetch_image(client, &target.with_digest(fetched.digest), &writer, &reuse, &[], progress))?;
    writer.commit(&manifest, out_tag)?;
    report.received += fetch.received;
    report.written_manifest = manifest.digest;
    // The output had every blob: nothing came but the manifest.
    report.method = if fetch.blobs_downloaded == 0 { PullMethod::Unchanged } else { PullMethod::Full { reason } };
    Ok(report)
}

/// Asks the builder service for the delta from `image` (the device's) to the target, waiting
/// as the options allow. Returns the delta when the service has it, and what it said.
fn ask_service(
    transfer: &Transfer,
    service: &ServiceOptions,
    target: &RegistryRef,
    target_manifest: &Digest,
    image: &Image,
    source: Option<&RegistryRef>,
) -> (Option<Candidate>, ServiceAnswer) {
    // The device's manifest digest is the registry's when it pulled the image whole; after a
    // delta (or out of a container engine) its layers may be recompressed, and the config
    // digest is what identifies it.
    let source = match source {
        Some(s) => s.without_tag(),
        None => target.by_digest(image.manifest.digest),
    };
    let request = DeltaRequest {
        target: format!("docker://{}", target.by_digest(*target_manifest)),
        source: Some(format!("docker://{source}")),
        source_config: Some(image.config.digest),
    };
    let outcome = ServiceClient::new(&service.url).and_then(|client| transfer.block_on(client.wait_for_delta(&request, service.max_wait)));
    match outcome {
        Ok(WaitOutcome::Ready(delta)) => {
            let parsed = match ImageRef::parse(&delta.reference) {
                Ok(ImageRef::Registry(r)) if r.digest == Some(delta.manifest) && r.same_repository(target) => r,
                _ => return (None, ServiceAnswer::Unusable { reference: delta.reference }),
            };
            let answer = ServiceAnswer::Ready { delta: delta.reference.clone(), download_bytes: delta.download_bytes };
            (Some(Candidate { reference: parsed, manifest: delta.manifest, download: delta.download_bytes }), answer)
        }
        Ok(WaitOutcome::Failed(reason)) => (None, ServiceAnswer::Failed { reason }),
        Ok(WaitOutcome::TimedOut { waited }) => (None, ServiceAnswer::StillBuilding { waited_seconds: waited.as_secs_f64() }),
        Err(e) => (None, ServiceAnswer::Unreachable { error: e.to_string() }),
    }
}

/// Reads a delta's manifest to learn what downloading it costs.
fn describe_delta(transfer: &Transfer, delta: &RegistryRef, received: &mut u64) -> Result<Candidate> {
    let m = transfer.block_on(transfer.client().get_image_manifest(delta))?;
    *received += m.raw.len() as u64;
    let manifest = Manifest::parse(m.raw.clone(), Some(&m.media_type))?;
    if manifest.config.size > MAX_JSON_BYTES {
        return Err(Error::TooLarge { what: format!("config of delta {delta}"), limit: MAX_JSON_BYTES });
    }
    let download = m.raw.len() as u64 + manifest.config.size + manifest.layers.iter().map(|l| l.size).sum::<u64>();
    Ok(Candidate { reference: delta.with_digest(m.digest), manifest: m.digest, download })
}

fn apply_delta(
    transfer: &Transfer,
    from: &ImageRef,
    candidate: &Candidate,
    output: &ImageRef,
    target: &Digest,
    options: &PullOptions,
    progress: &dyn Progress,
) -> Result<(ApplyReport, u64)> {
    let (delta, fetched) = transfer.localize(&ImageRef::Registry(candidate.reference.clone()), progress)?;
    let apply_options = ApplyOptions { expect_target: Some(*target), ..options.apply.clone() };
    let report = apply(from, &delta, output, &apply_options, progress)?;
    Ok((report, fetched.map(|f| f.received).unwrap_or(0)))
}
