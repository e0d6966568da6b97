//! Releases: registering one starts building, in the background, the deltas from the
//! `previous_releases` releases registered before it, for every service whose image changed;
//! release-update queries plan a transition from what the registry and the builds say, and
//! answer the same JSON as `fleetdelta release-update --json`.
//!
//! Registered releases are kept in memory, in registration order, and in the service's
//! database ([`crate::db`]), from which a restarted service registers them again; the deltas
//! they lead to live in the registry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::build::find_delta;
use super::state::{Builds, Job, PairId, Status};
use crate::db::Database;
use crate::release_update::UpdateError;
use fleetdelta_engine::delta_store::DeltaKey;
use fleetdelta_engine::digest::Digest;
use fleetdelta_engine::error::{Error, Result};
use fleetdelta_engine::image::manifest::{is_index, Manifest, MAX_JSON_BYTES};
use fleetdelta_engine::image::platform::{entry_for, index_entries, IndexEntry};
use fleetdelta_engine::image::{Config, Platform};
use fleetdelta_engine::progress::Silent;
use fleetdelta_engine::reference::ImageRef;
use fleetdelta_engine::registry::{Client, RegistryRef};
use fleetdelta_release::{image_repository, oci_architecture, parse_release_image};
use fleetdelta_release::{plan, DeltaStatus, DeviceFacts, ImageCatalog, ImagePair, LayerBlob, Release, ResolvedImage};

/// One delta a registered release asked for.
#[derive(Clone, Debug, Serialize)]
pub struct PlannedDelta {
    /// The service.
    pub service: String,
    /// The earlier release it updates from.
    pub from_release: String,
    /// The image in that release.
    pub from_image: String,
    /// The image in the registered release.
    pub to_image: String,
    /// Where it stands: `resolving`, `unchanged` (same image digest), `building`, `ready`,
    /// `failed`.
    pub status: &'static str,
    /// The platform (`OS/ARCH[/VARIANT]`) when the target is a multi-platform index: one
    /// delta per platform the fleet runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// The pair, once both images are resolved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_config: Option<Digest>,
    /// The target manifest digest, once resolved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_manifest: Option<Digest>,
    /// The delta, when ready (`docker://...@sha256:...`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<String>,
    /// Why resolving or building failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug)]
struct Registered {
    release: Release,
    text: String,
    planned: Mutex<Vec<PlannedDelta>>,
}

/// The outcome of registering a release.
#[derive(Clone, Debug, Serialize)]
pub struct Registration {
    /// The release id.
    pub id: String,
    /// Whether it was new (`false`: the same release registered again; builds are looked at
    /// again, and nothing that exists is rebuilt).
    pub created: bool,
    /// The releases its deltas start from, nearest first.
    pub previous: Vec<String>,
    /// The deltas it asks for.
    pub deltas: Vec<PlannedDelta>,
}

/// Why registering failed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The release file is invalid.
    #[error(transparent)]
    Invalid(#[from] fleetdelta_release::ReleaseError),
    /// A different release with this id was registered before.
    #[error("release {0} is already registered with other contents")]
    Conflict(String),
    /// The release could not be recorded in the database: it is not registered.
    #[error(transparent)]
    Storage(Error),
}

/// The registered releases.
#[derive(Debug, Default)]
pub struct Releases {
    list: Mutex<Vec<Arc<Registered>>>,
    /// Where registrations are recorded; none: in memory only.
    db: Option<Database>,
    /// The platforms the fleet runs; empty: every platform of each target.
    platforms: Vec<Platform>,
    /// Held while registering the releases other instances registered.
    syncing: tokio::sync::Mutex<()>,
}

impl Releases {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Registered>>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registered release ids, in order.
    pub fn ids(&self) -> Vec<String> {
        self.lock().iter().map(|r| r.release.id.clone()).collect()
    }

    /// Every image the registered releases name, as written in their files.
    pub fn images(&self) -> std::collections::BTreeSet<String> {
        self.lock().iter().flat_map(|r| r.release.services.iter().map(|s| s.image.clone())).collect()
    }

    fn get(&self, id: &str) -> Option<Arc<Registered>> {
        self.lock().iter().find(|r| r.release.id == id).cloned()
    }

    /// A registered release and its deltas, with their current status.
    pub fn describe(&self, id: &str, builds: &Builds) -> Option<Vec<PlannedDelta>> {
        let registered = self.get(id)?;
        let mut planned = registered.planned.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for p in planned.iter_mut().filter(|p| matches!(p.status, "building" | "ready" | "failed")) {
            let (Some(source_config), Some(target_manifest)) = (p.source_config, p.target_manifest) else { continue };
            let id = PairId { key: DeltaKey { source_config, target_manifest }, repository: image_repository(&p.to_image) };
            refresh(p, builds.peek(&id));
        }
        Some(planned)
    }

    /// Releases kept in `db` as well as in memory.
    pub fn with_database(db: Database) -> Self {
        Releases { list: Mutex::default(), db: Some(db), platforms: Vec::new(), syncing: tokio::sync::Mutex::default() }
    }

    /// The same, building the deltas of multi-platform images for these platforms only
    /// (empty: every platform of each target).
    pub fn for_platforms(self, platforms: Vec<Platform>) -> Self {
        Releases { platforms, ..self }
    }

    /// Registers the release in `text` (a release file), records it in the database, and
    /// starts resolving its images and building its deltas in the background.
    pub async fn register(&self, text: &str, previous_releases: usize, builds: &Arc<Builds>) -> Result<Registration, RegisterError> {
        let release = Release::parse(text, "the release posted")?;
        // The releases other instances registered come first: they are the previous ones.
        self.sync(previous_releases, builds).await.map_err(RegisterError::Storage)?;
        let (registered, created, previous) = self.insert(release, text, previous_releases)?;
        if let (true, Some(db)) = (created, &self.db) {
            let stored = db.add_release(&registered.release.id, text).await;
            if !matches!(stored, Ok(true)) {
                self.lock().retain(|r| !Arc::ptr_eq(r, &registered));
                return Err(match stored {
                    Err(e) => RegisterError::Storage(e),
                    // Another instance sharing the database registered other contents first.
                    _ => RegisterError::Conflict(registered.release.id.clone()),
                });
            }
        }
        Ok(self.start(registered, created, previous, builds))
    }

    /// Registers again, in their order, the releases the database holds (a restart), and
    /// starts their builds as their registration did. Returns how many.
    pub async fn restore(&self, previous_releases: usize, builds: &Arc<Builds>) -> Result<usize> {
        let Some(db) = &self.db else { return Ok(0) };
        let stored = db.releases().await?;
        for (id, text) in &stored {
            self.register_stored(id, text, previous_releases, builds)?;
        }
        Ok(stored.len())
    }

    /// Registers the releases that other instances sharing the database registered since
    /// this one last looked, in their order, and starts their builds (those another instance
    /// builds already are waited for, not built twice). Returns how many were new here.
    pub async fn sync(&self, previous_releases: usize, builds: &Arc<Builds>) -> Result<usize> {
        let Some(db) = &self.db else { return Ok(0) };
        // One look at a time (housekeeping and requests may ask at once).
        let _syncing = self.syncing.lock().await;
        if db.release_count().await? == self.lock().len() {
            return Ok(0);
        }
        let mut added = 0;
        for (id, text) in &db.releases().await? {
            if self.get(id).is_none() {
                self.register_stored(id, text, previous_releases, builds)?;
                added += 1;
            }
        }
        Ok(added)
    }

    fn register_stored(&self, id: &str, text: &str, previous_releases: usize, builds: &Arc<Builds>) -> Result<()> {
        let what = format!("release {id} in the database");
        let release = Release::parse(text, &what).map_err(|e| Error::malformed(&what, e.to_string()))?;
        let (registered, created, previous) = self.insert(release, text, previous_releases).map_err(|e| Error::malformed(&what, e.to_string()))?;
        self.start(registered, created, previous, builds);
        Ok(())
    }

    /// Adds `release` to the list unless it is there (with the same text); with the releases
    /// registered before it that its deltas start from.
    #[allow(clippy::type_complexity)]
    fn insert(&self, release: Release, text: &str, previous_releases: usize) -> Result<(Arc<Registered>, bool, Vec<Arc<Registered>>), RegisterError> {
        let mut list = self.lock();
        Ok(match list.iter().position(|r| r.release.id == release.id) {
            Some(i) if list[i].text != text => return Err(RegisterError::Conflict(release.id)),
            Some(i) => {
                let previous: Vec<Arc<Registered>> = list[..i].iter().rev().take(previous_releases).cloned().collect();
                (list[i].clone(), false, previous)
            }
            None => {
                let previous: Vec<Arc<Registered>> = list.iter().rev().take(previous_releases).cloned().collect();
                let registered = Arc::new(Registered { release, text: text.to_string(), planned: Mutex::new(Vec::new()) });
                list.push(registered.clone());
                (registered, true, previous)
            }
        })
    }

    /// Plans the deltas of `registered` from `previous` and starts them in the background.
    fn start(&self, registered: Arc<Registered>, created: bool, previous: Vec<Arc<Registered>>, builds: &Arc<Builds>) -> Registration {
        let mut planned = Vec::new();
        for earlier in &previous {
            for service in &registered.release.services {
                let Some(before) = earlier.release.service(&service.name) else { continue };
                if before.image == service.image {
                    continue;
                }
                planned.push(PlannedDelta {
                    service: service.name.clone(),
                    from_release: earlier.release.id.clone(),
                    from_image: before.image.clone(),
                    to_image: service.image.clone(),
                    status: "resolving",
                    platform: None,
                    source_config: None,
                    target_manifest: None,
                    delta: None,
                    reason: None,
                });
            }
        }
        *registered.planned.lock().unwrap_or_else(|p| p.into_inner()) = planned.clone();
        let id = registered.release.id.clone();
        tracing::info!(release = %id, created, previous = previous.len(), deltas = planned.len(), "release registered");
        let builds = Arc::clone(builds);
        let fleet = self.platforms.clone();
        tokio::spawn(async move { start_builds(&registered, &builds, &fleet).await });
        Registration { id, created, previous: previous.iter().map(|r| r.release.id.clone()).collect(), deltas: planned }
    }

    /// The transition from release `from` to release `to` (both registered) for a device
    /// with `facts`, as `release-update --json` prints it. `Ok(Err(ids))` names the releases
    /// of the two that are not registered.
    pub async fn update(
        &self,
        from: &str,
        to: &str,
        facts: Option<&DeviceFacts>,
        builds: &Builds,
    ) -> Result<std::result::Result<serde_json::Value, Vec<String>>, UpdateError> {
        let (from, to) = match (self.get(from), self.get(to)) {
            (Some(f), Some(t)) => (f, t),
            (f, t) => {
                return Ok(Err([(from, f.is_none()), (to, t.is_none())].into_iter().filter(|(_, missing)| *missing).map(|(id, _)| id.to_string()).collect()))
            }
        };
        let client = builds.client();
        // Multi-platform images resolve to the device's architecture when its facts name one.
        let arch = facts.and_then(|f| f.arch.as_deref()).and_then(oci_architecture);
        let mut catalog = MemoryCatalog::default();
        for service in from.release.services.iter().chain(to.release.services.iter()) {
            if !catalog.images.contains_key(&service.image) {
                let resolved = resolve(client, &service.image, arch).await?;
                catalog.images.insert(service.image.clone(), resolved);
            }
        }
        for service in &to.release.services {
            let Some(before) = from.release.service(&service.name) else { continue };
            let (source, target) = (&catalog.images[&before.image], &catalog.images[&service.image]);
            if source.manifest.digest == target.manifest.digest {
                continue;
            }
            let key = DeltaKey { source_config: source.manifest.config.digest, target_manifest: target.manifest.digest };
            let reference = |delta: Digest| ImageRef::Registry(target.pinned.by_digest(delta)).to_string();
            let status = match builds.peek(&PairId { key, repository: target.pinned.repository_name() }) {
                Some(Status::Working { .. }) => DeltaStatus::Building,
                Some(Status::Ready(b)) => DeltaStatus::Ready { reference: reference(b.manifest), size: b.download },
                _ => match find_delta(client, &target.pinned, &key).await? {
                    Some(found) => DeltaStatus::Ready { reference: found.reference.to_string(), size: found.download },
                    None => DeltaStatus::Absent,
                },
            };
            let pair = ImagePair { from: source.manifest.digest, to: target.manifest.digest, repository: image_repository(&service.image) };
            catalog.statuses.insert(pair, status);
        }
        Ok(Ok(plan(&from.release, &to.release, facts, &catalog)?.to_json()))
    }
}

fn refresh(p: &mut PlannedDelta, status: Option<Status>) {
    match status {
        Some(Status::Ready(b)) => {
            p.status = "ready";
            p.delta = Some(ImageRef::Registry(b.reference).to_string());
            p.reason = None;
        }
        Some(Status::Failed(f)) => {
            p.status = "failed";
            p.reason = Some(f.reason);
        }
        Some(Status::Working { .. }) | Some(Status::Unavailable(_)) | None => p.status = "building",
    }
}

/// A release image resolved in a registry.
#[derive(Clone, Debug)]
struct Resolved {
    pinned: RegistryRef,
    manifest: Manifest,
}

fn registry_image(image: &str) -> Result<RegistryRef> {
    match parse_release_image(image)? {
        ImageRef::Registry(r) => Ok(r),
        _ => Err(Error::unsupported(image, "the service works with registry images (docker://), not layouts")),
    }
}

/// A release image resolved to one image: a multi-platform index to its entry for
/// `linux/arch` (the client's architecture when `None`).
async fn resolve(client: &Client, image: &str, arch: Option<&str>) -> Result<Resolved> {
    let r = registry_image(image)?;
    let fetched = match arch {
        Some(arch) => client.get_image_manifest_for(&r, arch).await?,
        None => client.get_image_manifest(&r).await?,
    };
    let manifest = Manifest::parse(fetched.raw, Some(&fetched.media_type))?;
    Ok(Resolved { pinned: r.with_digest(manifest.digest), manifest })
}

/// A release image as registered: one image, or a multi-platform index.
#[derive(Clone, Debug)]
enum Top {
    One(Box<Resolved>),
    Index { repository: RegistryRef, entries: Vec<IndexEntry> },
}

async fn resolve_top(client: &Client, image: &str) -> Result<Top> {
    let r = registry_image(image)?;
    let top = client.get_manifest(&r, &r.reference()).await?;
    if is_index(&top.media_type) {
        return Ok(Top::Index { entries: index_entries(&top.raw, &format!("image index docker://{r}"))?, repository: r.without_tag() });
    }
    let manifest = Manifest::parse(top.raw, Some(&top.media_type))?;
    Ok(Top::One(Box::new(Resolved { pinned: r.with_digest(manifest.digest), manifest })))
}

async fn resolve_entry(client: &Client, repository: &RegistryRef, entry: &IndexEntry) -> Result<Resolved> {
    let pinned = repository.by_digest(entry.manifest.digest);
    let fetched = client.get_manifest(&pinned, &entry.manifest.digest.to_string()).await?;
    if is_index(&fetched.media_type) {
        return Err(Error::unsupported(format!("image index docker://{repository}"), "an index nested in an index"));
    }
    Ok(Resolved { pinned, manifest: Manifest::parse(fetched.raw, Some(&fetched.media_type))? })
}

/// The image pairs of a planned delta: one for two images; one per platform when the target
/// is an index (those of `fleet` it has, every one when `fleet` is empty), each from the
/// source's image of that platform. A platform the source lacks is a failed pair, saying so.
async fn platform_pairs(
    client: &Client,
    source: &Top,
    target: &Top,
    fleet: &[Platform],
) -> Vec<(Option<Platform>, std::result::Result<(Resolved, Resolved), String>)> {
    let (repository, targets) = match target {
        Top::One(t) => {
            return match source {
                Top::One(s) => vec![(None, Ok((s.as_ref().clone(), t.as_ref().clone())))],
                Top::Index { repository, entries } => {
                    // The source's entry for the target's platform.
                    let platform = match config_platform(client, t).await {
                        Ok(p) => p,
                        Err(e) => return vec![(None, Err(e.to_string()))],
                    };
                    let pair = match entry_for(entries, &platform, &format!("the source image index docker://{repository}")) {
                        Ok(e) => resolve_entry(client, repository, e).await.map(|s| (s, t.as_ref().clone())).map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    vec![(Some(platform), pair)]
                }
            };
        }
        Top::Index { repository, entries } => (repository, entries),
    };
    let mut pairs = Vec::new();
    for t in targets {
        let Some(platform) = t.platform.clone() else { continue };
        if !fleet.is_empty() && !fleet.iter().any(|f| f.matches(&platform)) {
            continue;
        }
        let source = match source {
            Top::Index { repository, entries } => match entry_for(entries, &platform, &format!("the source image index docker://{repository}")) {
                Ok(e) => resolve_entry(client, repository, e).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            Top::One(s) => match config_platform(client, s).await {
                Ok(p) if p.matches(&platform) => Ok(s.as_ref().clone()),
                Ok(p) => Err(format!("the source docker://{} is an image for {p}, and has none for {platform}", s.pinned)),
                Err(e) => Err(e.to_string()),
            },
        };
        let pair = match (source, resolve_entry(client, repository, t).await) {
            (Ok(s), Ok(t)) => Ok((s, t)),
            (Err(e), _) => Err(e),
            (_, Err(e)) => Err(e.to_string()),
        };
        pairs.push((Some(platform), pair));
    }
    pairs
}

/// The platform an image's config says it is for.
async fn config_platform(client: &Client, image: &Resolved) -> Result<Platform> {
    let config = &image.manifest.config;
    if config.size > MAX_JSON_BYTES {
        return Err(Error::TooLarge { what: format!("config of docker://{}", image.pinned), limit: MAX_JSON_BYTES });
    }
    let mut raw = Vec::with_capacity(config.size as usize);
    client.download_blob(&image.pinned, config, &mut raw, &Silent).await?;
    Ok(Platform::of_config(&Config::parse(raw)?))
}

/// Resolves a registered release's pairs and starts their builds: one per planned delta, or
/// one per platform of the fleet when the target is a multi-platform index.
async fn start_builds(registered: &Registered, builds: &Arc<Builds>, fleet: &[Platform]) {
    let planned = registered.planned.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut images: HashMap<String, std::result::Result<Top, String>> = HashMap::new();
    let mut updated = Vec::with_capacity(planned.len());
    for p in planned {
        for image in [&p.from_image, &p.to_image] {
            if !images.contains_key(image) {
                let resolved = resolve_top(builds.client(), image).await.map_err(|e| e.to_string());
                if let Ok(Top::One(r)) = &resolved {
                    builds.remember_source(r.manifest.config.digest, r.pinned.clone());
                }
                images.insert(image.clone(), resolved);
            }
        }
        let pairs = match (&images[&p.from_image], &images[&p.to_image]) {
            (Ok(source), Ok(target)) => platform_pairs(builds.client(), source, target, fleet).await,
            (Err(e), _) | (_, Err(e)) => vec![(None, Err(e.clone()))],
        };
        for (platform, pair) in pairs {
            let mut p = PlannedDelta { platform: platform.map(|p| p.to_string()), ..p.clone() };
            match pair {
                Ok((source, target)) if source.manifest.digest == target.manifest.digest => p.status = "unchanged",
                Ok((source, target)) => {
                    builds.remember_source(source.manifest.config.digest, source.pinned.clone());
                    let key = DeltaKey { source_config: source.manifest.config.digest, target_manifest: target.manifest.digest };
                    p.source_config = Some(key.source_config);
                    p.target_manifest = Some(key.target_manifest);
                    let status = builds.ensure(Job { key, source: Some(source.pinned.clone()), target: target.pinned.clone() });
                    refresh(&mut p, Some(status));
                }
                Err(e) => {
                    p.status = "failed";
                    p.reason = Some(e);
                }
            }
            updated.push(p);
        }
    }
    *registered.planned.lock().unwrap_or_else(|p| p.into_inner()) = updated;
}

/// [`ImageCatalog`] over images and delta statuses looked up beforehand (planning is
/// synchronous; the lookups are not).
#[derive(Debug, Default)]
struct MemoryCatalog {
    images: HashMap<String, Resolved>,
    statuses: HashMap<ImagePair, DeltaStatus>,
}

impl ImageCatalog for MemoryCatalog {
    fn resolve(&self, reference: &str) -> Result<ResolvedImage> {
        let r = self.images.get(reference).ok_or_else(|| Error::Internal(format!("image {reference} was not resolved before planning")))?;
        Ok(ResolvedImage {
            digest: r.manifest.digest,
            config: Some(r.manifest.config.digest),
            layers: r.manifest.layers.iter().map(|l| LayerBlob { digest: l.digest, size: l.size }).collect(),
        })
    }

    fn delta_status(&self, pair: &ImagePair) -> Result<DeltaStatus> {
        Ok(self.statuses.get(pair).cloned().unwrap_or(DeltaStatus::Absent))
    }
}
