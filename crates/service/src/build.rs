//! One delta, produced: looked up in the registry (the store of record), else built from the
//! two images and pushed beside the target.
//!
//! A build fetches both images into a scratch layout of its own, runs the differ on a
//! blocking thread (it is CPU-bound and synchronous), and pushes the delta to the target's
//! repository under [`delta_tag`], with the target as its `subject`. The push sends every
//! blob first and the manifest last, so a build stopped at any point leaves either a complete
//! delta or blobs that nothing references.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Semaphore;

use super::config::ServiceConfig;
use super::metrics::Metrics;
use fleetdelta_engine::delta_store::{delta_tag, find_by_tag, find_in_repository, DeltaKey, StoredDelta};
use fleetdelta_engine::diff::{diff, DiffOptions};
use fleetdelta_engine::digest::Digest;
use fleetdelta_engine::error::{Error, IoContext, Result};
use fleetdelta_engine::image::manifest::Manifest;
use fleetdelta_engine::image::{Layout, LayoutWriter};
use fleetdelta_engine::progress::Silent;
use fleetdelta_engine::reference::ImageRef;
use fleetdelta_engine::registry::referrers::Referrer;
use fleetdelta_engine::registry::{Client, RegistryRef};
use fleetdelta_engine::transfer::{fetch_image, push_image};

/// What to build: the pair, and where its images are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// The pair.
    pub key: DeltaKey,
    /// The source image, if the caller named one (its config must be `key.source_config`).
    pub source: Option<RegistryRef>,
    /// The target image, pinned by `key.target_manifest`.
    pub target: RegistryRef,
}

impl Job {
    /// What single flight is per: the pair in the target's repository.
    pub fn id(&self) -> PairId {
        PairId { key: self.key, repository: self.target.repository_name() }
    }
}

/// A delta as the service tracks it: a pair in the repository of its target, where the delta
/// lives and is looked up. One image in two repositories has a delta in each, and an answer
/// for one repository is never given for another (a device may only be able to read its own).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PairId {
    /// The pair.
    pub key: DeltaKey,
    /// The target's repository, `HOST[:PORT]/NAME`.
    pub repository: String,
}

/// A delta the service has built or found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Built {
    /// The delta image, pinned by digest, in the target's repository.
    pub reference: RegistryRef,
    /// Its manifest digest.
    pub manifest: Digest,
    /// What a device downloads for it.
    pub download: u64,
}

/// What every build shares.
#[derive(Debug)]
pub struct BuildContext {
    /// The registry client.
    pub client: Arc<Client>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// Build slots.
    pub slots: Semaphore,
    /// The configuration.
    pub config: Arc<ServiceConfig>,
    /// Where builds stage their images.
    pub scratch: PathBuf,
    /// Images known by config digest (from registered releases and requests).
    pub known_sources: Mutex<HashMap<Digest, RegistryRef>>,
    /// One lock per target manifest, held while a delta of it is pushed: pushes of deltas
    /// for the same target update the same referrers fallback tag (read, add, write), and
    /// must not lose each other's entries.
    pub push_locks: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    /// Set when shutdown gives up on builds in flight: a build that sees it stops before
    /// pushing.
    pub abandoning: AtomicBool,
}

impl BuildContext {
    /// See `Builds::remember_source` (in `state`).
    pub fn remember_source(&self, config: Digest, image: RegistryRef) {
        let mut known = self.known_sources.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= self.config.max_tracked_pairs {
            known.clear();
        }
        known.insert(config, image);
    }

    fn push_lock(&self, target: &Digest) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.push_locks.lock().unwrap_or_else(|p| p.into_inner());
        if locks.len() >= self.config.max_tracked_pairs {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(*target).or_default().clone()
    }
}

/// Finds the delta of `key` beside `target`: among the target's referrers, else under its tag
/// (then listed among the referrers again, so that devices looking there find it too).
pub async fn find_delta(client: &Client, target: &RegistryRef, key: &DeltaKey) -> Result<Option<StoredDelta>> {
    if let Some(found) = find_in_repository(client, target, key).await? {
        return Ok(Some(found));
    }
    let Some(found) = find_by_tag(client, target, key).await? else { return Ok(None) };
    let fetched = client.get_image_manifest(&target.by_digest(found.manifest)).await?;
    let referrer = Referrer::from_manifest(&Manifest::parse(fetched.raw, Some(&fetched.media_type))?);
    if let Err(e) = client.add_fallback_referrer(target, &key.target_manifest, &referrer).await {
        tracing::warn!(delta = %found.manifest, error = %e, "could not list the delta among the target's referrers");
    }
    Ok(Some(found))
}

fn built_from(found: StoredDelta) -> Result<Built> {
    match found.reference {
        ImageRef::Registry(reference) => Ok(Built { reference, manifest: found.manifest, download: found.download }),
        other => Err(Error::unsupported(other.to_string(), "the service stores deltas in registries")),
    }
}

/// Looks the delta of `job` up, and builds it when absent (waiting for a build slot); `true`
/// with it when it was built (not found).
pub async fn produce(ctx: &BuildContext, job: &Job) -> Result<(Built, bool)> {
    if let Some(found) = find_delta(&ctx.client, &job.target, &job.key).await? {
        return found_delta(ctx, job, found, "delta found in the registry");
    }
    let _slot = build_slot(ctx).await?;
    produce_in_slot(ctx, job).await
}

/// Waits for one of the build slots (counted as queued meanwhile).
pub async fn build_slot(ctx: &BuildContext) -> Result<tokio::sync::SemaphorePermit<'_>> {
    ctx.metrics.queued(true);
    let slot = ctx.slots.acquire().await;
    ctx.metrics.queued(false);
    slot.map_err(|_| Error::unsupported("build", "the service is shutting down"))
}

fn found_delta(ctx: &BuildContext, job: &Job, found: StoredDelta, how: &str) -> Result<(Built, bool)> {
    ctx.metrics.delta_found();
    tracing::info!(source_config = %job.key.source_config, target = %job.key.target_manifest, delta = %found.manifest, "{how}");
    Ok((built_from(found)?, false))
}

/// [`produce`] for a caller holding a build slot.
pub async fn produce_in_slot(ctx: &BuildContext, job: &Job) -> Result<(Built, bool)> {
    let key = &job.key;
    // Another instance may have pushed it while this build waited for a slot.
    if let Some(found) = find_delta(&ctx.client, &job.target, key).await? {
        return found_delta(ctx, job, found, "delta found in the registry after waiting for a slot");
    }
    ctx.metrics.build_started();
    let started = Instant::now();
    tracing::info!(source_config = %key.source_config, target = %key.target_manifest, "build started");
    let result = build(ctx, job).await;
    let took = started.elapsed();
    ctx.metrics.build_finished(took, result.as_ref().ok().map(|(b, full)| (*full, b.download)));
    let (built, full) = result?;
    tracing::info!(source_config = %key.source_config, target = %key.target_manifest, delta = %built.manifest, download = built.download, full_pull = full, seconds = took.as_secs_f64(), "build finished");
    Ok((built, true))
}

/// Whether the delta `built` is still in the registry (retention may have deleted it since
/// it was recorded).
pub async fn still_there(ctx: &BuildContext, built: &Built) -> Result<bool> {
    match ctx.client.get_manifest(&built.reference, &built.manifest.to_string()).await {
        Ok(_) => Ok(true),
        Err(Error::NotFound(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// An image's manifest, checked against the size limit.
async fn image_within_limits(ctx: &BuildContext, image: &RegistryRef) -> Result<Manifest> {
    let fetched = ctx.client.get_image_manifest(image).await?;
    let manifest = Manifest::parse(fetched.raw, Some(&fetched.media_type))?;
    let size = manifest.config.size.saturating_add(manifest.layers.iter().map(|l| l.size).fold(0u64, u64::saturating_add));
    if size > ctx.config.max_image_bytes {
        return Err(Error::TooLarge { what: format!("image docker://{image} ({size} bytes of blobs)"), limit: ctx.config.max_image_bytes });
    }
    Ok(manifest)
}

/// The source image, pinned: the one the job names if its config is the key's, else one the
/// service knows with that config.
async fn source_image(ctx: &BuildContext, job: &Job) -> Result<(RegistryRef, Manifest)> {
    let wanted = job.key.source_config;
    let mut tried = Vec::new();
    let known = ctx.known_sources.lock().unwrap_or_else(|p| p.into_inner()).get(&wanted).cloned();
    for candidate in job.source.iter().chain(known.iter()) {
        match image_within_limits(ctx, candidate).await {
            Ok(m) if m.config.digest == wanted => {
                let pinned = candidate.with_digest(m.digest);
                ctx.remember_source(wanted, pinned.clone());
                return Ok((pinned, m));
            }
            Ok(m) => tried.push(format!("docker://{candidate} has config {}", m.config.digest)),
            Err(Error::NotFound(what)) => tried.push(format!("{what} does not exist")),
            Err(e) => return Err(e),
        }
    }
    let tried = if tried.is_empty() { "no image with it was named or registered".to_string() } else { tried.join("; ") };
    Err(Error::NotFound(format!("source image with config {wanted}: {tried}")))
}

/// Builds and pushes the delta; returns it with the full-pull size it saves against.
async fn build(ctx: &BuildContext, job: &Job) -> Result<(Built, u64)> {
    let key = job.key;
    let target = job.target.with_digest(key.target_manifest);
    let (source, _) = source_image(ctx, job).await?;
    let target_manifest = image_within_limits(ctx, &target).await?;
    if target_manifest.digest != key.target_manifest {
        return Err(Error::DigestMismatch { what: format!("target docker://{target}"), expected: key.target_manifest, found: target_manifest.digest });
    }

    std::fs::create_dir_all(&ctx.scratch).ctx(|| format!("creating {}", ctx.scratch.display()))?;
    let dir = tempfile::Builder::new().prefix("build-").tempdir_in(&ctx.scratch).ctx(|| format!("creating a build directory in {}", ctx.scratch.display()))?;
    let images = dir.path().join("images");
    for (image, tag) in [(&source, "source"), (&target, "target")] {
        let writer = LayoutWriter::create(&images)?;
        let (manifest, _, _) = fetch_image(&ctx.client, image, &writer, &[], &[], &Silent).await?;
        writer.commit(&manifest, tag)?;
    }

    let tag = delta_tag(&key);
    let delta_dir = dir.path().join("delta");
    let (src, tgt, out) = (
        ImageRef::Layout { dir: images.clone(), tag: Some("source".into()) },
        ImageRef::Layout { dir: images, tag: Some("target".into()) },
        ImageRef::Layout { dir: delta_dir.clone(), tag: Some(tag.clone()) },
    );
    let options = DiffOptions { level: ctx.config.level, max_layer_bytes: ctx.config.max_layer_bytes, ..DiffOptions::default() };
    let report = tokio::task::spawn_blocking(move || diff(&src, &tgt, &out, &options, &Silent))
        .await
        .map_err(|e| Error::unsupported("the differ", format!("its thread failed: {e}")))??;

    if ctx.abandoning.load(Ordering::SeqCst) {
        return Err(Error::unsupported("build", "abandoned at shutdown before pushing"));
    }
    let layout = Layout::open(&delta_dir)?;
    let lock = ctx.push_lock(&key.target_manifest);
    let _pushing = lock.lock().await;
    let pushed = push_image(&ctx.client, &layout, Some(&tag), &target.with_tag(&tag), None, &Silent).await?;
    let built = Built { reference: target.by_digest(pushed.manifest), manifest: pushed.manifest, download: report.delta_bytes };
    Ok((built, report.full_pull_bytes))
}
