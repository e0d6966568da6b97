//! Release updates against real images: the [`fleetdelta_release`] planner fed by the transports
//! (layouts and registries) and a [`DeltaStore`], then prepared (every missing delta built
//! once per image pair) and waited for, within a deadline.
//!
//! Preparing is safe to interrupt and to run concurrently: each delta is written to its
//! store only once complete and verified, a build holds its pair's lock (so a second
//! `--prepare` skips it and reports it `preparing`), and a rerun reuses every delta already
//! built. The deadline is checked before each build and while waiting; a build that has
//! started is finished, never left half-written.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use fleetdelta_engine::delta_store::{DeltaKey, DeltaStore};
use fleetdelta_engine::diff::{diff, DiffOptions};
use fleetdelta_engine::digest::Digest;
use fleetdelta_engine::error::{Error, Result};
use fleetdelta_engine::image::layout::host_architecture;
use fleetdelta_engine::image::manifest::{BlobRef, Manifest, MAX_JSON_BYTES};
use fleetdelta_engine::image::{IndexEntry, Layout};
use fleetdelta_engine::platforms::localize_entry;
use fleetdelta_engine::progress::Progress;
use fleetdelta_engine::reference::ImageRef;
use fleetdelta_engine::transfer::Transfer;
use fleetdelta_release::{
    oci_architecture, parse_release_image, plan, DeltaStatus, DeviceFacts, ImageCatalog, ImagePair, LayerBlob, Readiness, Release, ReleaseError, ResolvedImage,
    Transition,
};

/// Why a release update failed: reading an image or building a delta (the engine's error),
/// or the releases themselves (the release model's: an invalid file, unmet contracts).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateError {
    /// An image that could not be read, a delta that could not be built or stored.
    #[error(transparent)]
    Engine(#[from] Error),
    /// The releases: a transition that cannot be planned, contracts the device does not meet.
    #[error(transparent)]
    Release(#[from] ReleaseError),
}

impl UpdateError {
    /// The release model's error this one is, if it is one.
    pub fn as_release(&self) -> Option<&ReleaseError> {
        match self {
            UpdateError::Release(e) => Some(e),
            UpdateError::Engine(_) => None,
        }
    }
}

/// Options of [`release_update`].
#[derive(Clone, Debug)]
pub struct UpdateOptions {
    /// Where deltas are found and written.
    pub store: DeltaStore,
    /// How deltas are built.
    pub diff: DiffOptions,
    /// Build every delta that is neither built nor being built.
    pub prepare: bool,
    /// Wait until every delta is built (by us or by another builder).
    pub wait: bool,
    /// Deadline for preparing and waiting, from the start.
    pub timeout: Option<Duration>,
    /// How often to look again while waiting.
    pub poll: Duration,
}

impl Default for UpdateOptions {
    fn default() -> Self {
        UpdateOptions {
            store: DeltaStore::TargetRepository,
            diff: DiffOptions::default(),
            prepare: false,
            wait: false,
            timeout: None,
            poll: Duration::from_secs(2),
        }
    }
}

/// A delta built by [`release_update`].
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub struct BuiltDelta {
    /// Where it was written.
    pub reference: String,
    /// Source image manifest digest.
    pub from: Digest,
    /// Target image manifest digest.
    pub to: Digest,
    /// What a device downloads for it.
    pub download: u64,
    /// How long building it took, in seconds.
    pub seconds: f64,
}

/// What preparing did.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub struct PrepareReport {
    /// Deltas built by this run.
    pub built: Vec<BuiltDelta>,
    /// Deltas found built when this run came to them (by an earlier run or another builder).
    pub reused: usize,
    /// Deltas another builder was building (left to it, and shown as `preparing`).
    pub building_elsewhere: usize,
}

/// The outcome of [`release_update`].
#[derive(Clone, Debug)]
pub struct ReleaseUpdate {
    /// The transition as it stands at the end.
    pub transition: Transition,
    /// What preparing did (empty without `prepare`).
    pub prepared: PrepareReport,
    /// Set when the deadline passed before every delta was ready: says what is missing.
    pub timed_out: Option<String>,
}

/// Plans the transition from `from` to `to` for a device with `facts` (contracts unchecked
/// without), then prepares and waits as `options` say. A release rejected by its contracts is
/// an error, and nothing is built.
pub fn release_update(
    transfer: &Transfer,
    from: &Release,
    to: &Release,
    facts: Option<&DeviceFacts>,
    options: &UpdateOptions,
    progress: &dyn Progress,
) -> Result<ReleaseUpdate, UpdateError> {
    let started = Instant::now();
    let deadline = options.timeout.map(|t| started + t);
    // Multi-platform images resolve to the device's architecture when its facts name one.
    let arch = facts.and_then(|f| f.arch.as_deref()).and_then(oci_architecture);
    let catalog = StoreCatalog::new(transfer, &options.store, arch);
    let mut transition = plan(from, to, facts, &catalog)?;
    let mut prepared = PrepareReport::default();
    let late = |t: &Transition| {
        let needed = t.deltas.len();
        let ready = t.deltas.iter().filter(|d| matches!(d.status, DeltaStatus::Ready { .. })).count();
        format!(
            "timed out after {:.0} s: {ready} of {needed} deltas ready, overall status {}; built deltas are kept",
            started.elapsed().as_secs_f64(),
            t.overall_status.as_str()
        )
    };

    if options.prepare {
        prepared.building_elsewhere = transition.deltas.iter().filter(|d| d.status == DeltaStatus::Building).count();
        let needs: Vec<_> = transition.deltas_to_build().cloned().collect();
        for need in needs {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let transition = plan(from, to, facts, &catalog)?;
                return Ok(ReleaseUpdate { timed_out: Some(late(&transition)), transition, prepared });
            }
            let (key, source_seen, target_seen) = catalog.key_of(&need.pair)?;
            let target = target_seen.reference.clone();
            let Some(_lock) = options.store.lock_build(&key, &target)? else {
                prepared.building_elsewhere += 1;
                continue;
            };
            if options.store.find(transfer, &key, &target)?.is_some() {
                prepared.reused += 1;
                continue;
            }
            let began = Instant::now();
            let dest = options.store.location(&key, &target)?;
            let local_source = catalog.localize(&source_seen, progress)?;
            let local_target = catalog.localize(&target_seen, progress)?;
            let staged = transfer.staging_for(&dest)?;
            let report = diff(&local_source, &local_target, &staged, &options.diff, progress)?;
            transfer.publish(&staged, &dest, progress)?;
            prepared.built.push(BuiltDelta {
                reference: dest.to_string(),
                from: need.pair.from,
                to: need.pair.to,
                download: report.delta_bytes,
                seconds: began.elapsed().as_secs_f64(),
            });
        }
        transition = plan(from, to, facts, &catalog)?;
    }

    if options.wait {
        while transition.overall_status != Readiness::Ready {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(ReleaseUpdate { timed_out: Some(late(&transition)), transition, prepared });
            }
            let nap = deadline.map_or(options.poll, |d| options.poll.min(d.saturating_duration_since(Instant::now())));
            std::thread::sleep(nap);
            transition = plan(from, to, facts, &catalog)?;
        }
    }
    Ok(ReleaseUpdate { transition, prepared, timed_out: None })
}

/// An image as resolved: where it is (pinned) and its config.
#[derive(Clone, Debug)]
struct Seen {
    reference: ImageRef,
    config: Digest,
    /// For a layout whose tag names a multi-platform index: the entry resolved, which is what
    /// is diffed (the tag alone would name this machine's platform).
    entry: Option<BlobRef>,
}

/// [`ImageCatalog`] over the transports and a delta store. Registry images are resolved to
/// the entry for the transfer's architecture and pinned by digest, so a tag moving while a
/// release update runs cannot change what is diffed.
///
/// Images are remembered per digest *and repository*: one digest may be in several
/// repositories, and a delta is written to and looked up in its target's repository
/// ([`ImagePair::repository`]), never in another that happens to hold the same image.
struct StoreCatalog<'a> {
    transfer: &'a Transfer,
    store: &'a DeltaStore,
    /// The architecture multi-platform images resolve to (the device's); `None`: the
    /// transfer's for registries, this machine's for layouts.
    arch: Option<&'a str>,
    seen: RefCell<HashMap<(Digest, String), Seen>>,
}

impl<'a> StoreCatalog<'a> {
    fn new(transfer: &'a Transfer, store: &'a DeltaStore, arch: Option<&'a str>) -> Self {
        StoreCatalog { transfer, store, arch, seen: RefCell::new(HashMap::new()) }
    }

    /// A local reference to a resolved image: a layout's index entry is taken out on its own,
    /// anything else is localized as usual.
    fn localize(&self, image: &Seen, progress: &dyn Progress) -> Result<ImageRef> {
        match &image.entry {
            Some(manifest) => Ok(localize_entry(self.transfer, &image.reference, &IndexEntry { manifest: manifest.clone(), platform: None }, progress)?.0),
            None => Ok(self.transfer.localize(&image.reference, progress)?.0),
        }
    }

    /// The delta key of `pair`, with where to read its source and where its target is. The
    /// source is read from the target's repository when it is there too, else from any
    /// repository that has it (only its content matters); the target is the one in the pair's
    /// repository.
    fn key_of(&self, pair: &ImagePair) -> Result<(DeltaKey, Seen, Seen)> {
        let seen = self.seen.borrow();
        let target = seen
            .get(&(pair.to, pair.repository.clone()))
            .ok_or_else(|| Error::Internal(format!("image {} in {} was not resolved before planning", pair.to, pair.repository)))?;
        let source = seen
            .get(&(pair.from, pair.repository.clone()))
            .or_else(|| seen.iter().filter(|((d, _), _)| *d == pair.from).min_by(|a, b| a.0 .1.cmp(&b.0 .1)).map(|(_, s)| s))
            .ok_or_else(|| Error::Internal(format!("image {} was not resolved before planning", pair.from)))?;
        Ok((DeltaKey { source_config: source.config, target_manifest: pair.to }, source.clone(), target.clone()))
    }
}

impl ImageCatalog for StoreCatalog<'_> {
    fn resolve(&self, reference: &str) -> Result<ResolvedImage> {
        let image = parse_release_image(reference)?;
        let (manifest, pinned, entry) = match &image {
            ImageRef::Registry(r) => {
                let client = self.transfer.client();
                let fetched = match self.arch {
                    Some(arch) => self.transfer.block_on(client.get_image_manifest_for(r, arch))?,
                    None => self.transfer.block_on(client.get_image_manifest(r))?,
                };
                let manifest = Manifest::parse(fetched.raw, Some(&fetched.media_type))?;
                let pinned = ImageRef::Registry(r.with_digest(manifest.digest));
                (manifest, pinned, None)
            }
            ImageRef::Layout { dir, tag } => {
                let layout = Layout::open(dir)?;
                let top = layout.resolve_top(tag.as_deref())?;
                let blob = layout.resolve_for(tag.as_deref(), self.arch.unwrap_or(host_architecture()))?;
                let entry = (top.digest != blob.digest).then(|| blob.clone());
                (Manifest::parse(layout.read_blob(&blob, MAX_JSON_BYTES)?, Some(&blob.media_type))?, image.clone(), entry)
            }
            // parse_release_image gives registry and layout references only.
            _ => return Err(Error::unsupported(reference, "release images are registry images or OCI layouts")),
        };
        self.seen.borrow_mut().insert((manifest.digest, image.repository()), Seen { reference: pinned, config: manifest.config.digest, entry });
        Ok(ResolvedImage {
            digest: manifest.digest,
            config: Some(manifest.config.digest),
            layers: manifest.layers.iter().map(|l| LayerBlob { digest: l.digest, size: l.size }).collect(),
        })
    }

    fn delta_status(&self, pair: &ImagePair) -> Result<DeltaStatus> {
        let (key, _, target) = self.key_of(pair)?;
        let target = target.reference;
        if self.store.is_building(&key, &target)? {
            return Ok(DeltaStatus::Building);
        }
        Ok(match self.store.find(self.transfer, &key, &target)? {
            Some(found) => DeltaStatus::Ready { reference: found.reference.to_string(), size: found.download },
            None => DeltaStatus::Absent,
        })
    }
}
