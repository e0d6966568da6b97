//! The transition between two releases: what each service needs, which deltas must exist, how
//! ready the whole is, and what a device downloads.

use std::collections::HashMap;
use std::fmt;

use super::catalog::{DeltaStatus, ImageCatalog, ImagePair, ResolvedImage};
use super::error::{ReleaseError, UnmetContract};
use super::facts::DeviceFacts;
use super::file::{image_repository, Release, Service};
use super::requirements::Unmet;
use fleetdelta_engine::digest::Digest;

/// What happens to a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Change {
    /// New in the target release: its image is downloaded whole (there is no source image).
    Added,
    /// Not in the target release (or dropped from it for this device): stopped and removed.
    Removed,
    /// Same image digest in both releases: nothing downloaded, not restarted.
    Unchanged,
    /// Image changed: the device applies a delta from the image it has.
    DeltaUpdate,
    /// In both releases, but not on the device (an optional service its contract kept off):
    /// downloaded whole.
    Download,
}

impl Change {
    /// The change as written in JSON and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Added => "added",
            Change::Removed => "removed",
            Change::Unchanged => "unchanged",
            Change::DeltaUpdate => "delta-update",
            Change::Download => "download",
        }
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A service's status, as balena's release-update tool reports it, plus `unchanged`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UpdateStatus {
    /// Its delta does not exist yet and is not being built.
    Pending,
    /// Its delta is being built.
    Preparing,
    /// Nothing is left to build: its delta is built, or it needs none (added, downloaded, removed).
    Ready,
    /// Its image does not change.
    Unchanged,
}

impl UpdateStatus {
    /// The status as written in JSON and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateStatus::Pending => "pending",
            UpdateStatus::Preparing => "preparing",
            UpdateStatus::Ready => "ready",
            UpdateStatus::Unchanged => "unchanged",
        }
    }

    /// How ready this is: `unchanged` counts as ready, since nothing is left to build.
    pub fn readiness(self) -> Readiness {
        match self {
            UpdateStatus::Pending => Readiness::Pending,
            UpdateStatus::Preparing => Readiness::Preparing,
            UpdateStatus::Ready | UpdateStatus::Unchanged => Readiness::Ready,
        }
    }
}

impl fmt::Display for UpdateStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How ready a transition is, ordered from least to most ready: `Pending < Preparing < Ready`.
///
/// The overall status of a transition is the least ready of its services' (the minimum in this
/// order), as in balena's release-update tool; a transition with no services is ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Readiness {
    /// Some delta is neither built nor being built.
    Pending,
    /// Every delta is built or being built, and some are being built.
    Preparing,
    /// Every delta is built: the device can move.
    Ready,
}

impl Readiness {
    /// The status as written in JSON and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Readiness::Pending => "pending",
            Readiness::Preparing => "preparing",
            Readiness::Ready => "ready",
        }
    }
}

impl fmt::Display for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A release as a transition names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReleaseRef {
    /// The release id.
    pub id: String,
    /// Its commit, if known.
    pub commit: Option<String>,
}

/// An image as a transition names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// The reference in the release file.
    pub reference: String,
    /// The digest it resolved to.
    pub digest: Digest,
    /// Its config digest, when the catalog knows it.
    pub config: Option<Digest>,
    /// Its full size: the sum of its layers.
    pub size: u64,
}

/// A built delta.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadyDelta {
    /// Where it is stored.
    pub reference: String,
    /// Its size in bytes.
    pub size: u64,
}

/// What happens to one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceUpdate {
    /// The service.
    pub service_name: String,
    /// What happens to it.
    pub change: Change,
    /// How ready it is.
    pub status: UpdateStatus,
    /// Why it got this change and status, in words.
    pub reason: String,
    /// The image the device has; `None` when it has none.
    pub from_image: Option<ImageInfo>,
    /// The image it moves to; `None` when removed.
    pub to_image: Option<ImageInfo>,
    /// The delta used, once built.
    pub delta: Option<ReadyDelta>,
    /// What the device downloads for this service, in bytes (see [`Transition`]).
    pub payload_size: u64,
}

/// An optional service of the target release left out for this device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DroppedService {
    /// The service.
    pub service_name: String,
    /// Its contract's slug.
    pub contract: String,
    /// What the device does not meet.
    pub unmet: Vec<Unmet>,
}

/// A delta that the transition uses, with the services that use it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeltaNeed {
    /// The image pair, and the target's repository where the delta lives.
    pub pair: ImagePair,
    /// The source image (the reference of the first service using it).
    pub from: ImageInfo,
    /// The target image.
    pub to: ImageInfo,
    /// Where the delta stands.
    pub status: DeltaStatus,
    /// The services that use it, in release order.
    pub services: Vec<String>,
}

/// The release update from one release to another: per service what happens, the deltas needed,
/// how ready the whole is and an estimate of what a device downloads.
///
/// Payload estimates are pessimistic but honest. Per service: the delta's size when it is
/// built; otherwise the size of the target image's layers that the service's current image
/// lacks (what a pull would fetch; layers shared with other services' images are not counted
/// as present); the whole image when the device has none; zero for unchanged and removed
/// services. The total counts each distinct target image once (a device stores an image once,
/// whichever services run it), at the largest estimate among the services producing it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The release the device runs.
    pub from: ReleaseRef,
    /// The release it moves to.
    pub to: ReleaseRef,
    /// Services of the target release (in its order), then removed services (in source order).
    pub services: Vec<ServiceUpdate>,
    /// Optional services of the target release left out because the device fails their contract.
    pub dropped: Vec<DroppedService>,
    /// The deltas the transition uses, one per image pair and target repository, in the order
    /// services first need them.
    pub deltas: Vec<DeltaNeed>,
    /// Whether contracts were checked (device facts were given).
    pub contracts_checked: bool,
    /// The least ready of the services' statuses.
    pub overall_status: Readiness,
    /// The total payload estimate in bytes.
    pub estimated_total_payload_size: u64,
}

impl Transition {
    /// The deltas neither built nor being built: what preparing the transition builds.
    pub fn deltas_to_build(&self) -> impl Iterator<Item = &DeltaNeed> {
        self.deltas.iter().filter(|d| d.status == DeltaStatus::Absent)
    }

    /// The update of the named service.
    pub fn service(&self, name: &str) -> Option<&ServiceUpdate> {
        self.services.iter().find(|s| s.service_name == name)
    }
}

/// Plans the transition of a device from release `from` to release `to`.
///
/// With `facts`, contracts are checked first: an unmet contract of a non-optional service of
/// `to` rejects the release ([`ReleaseError::Rejected`], naming every unmet requirement of every
/// such service); an optional service of `to` with an unmet contract is dropped and reported.
/// An optional service of `from` whose contract the facts fail is taken as not installed on the
/// device (the facts describe the device now; its supervisor would not have run it), so a target
/// service of that name is downloaded whole. Without facts, contracts are not checked and every
/// service of `from` is taken as installed.
pub fn plan(from: &Release, to: &Release, facts: Option<&DeviceFacts>, catalog: &dyn ImageCatalog) -> Result<Transition, ReleaseError> {
    let contracts = match facts {
        Some(facts) => check_contracts(from, to, facts)?,
        None => Contracts::default(),
    };
    let mut planner = Planner { catalog, images: HashMap::new(), deltas: HashMap::new(), needs: Vec::new() };
    let mut services = Vec::new();
    for target in to.services.iter().filter(|t| !contracts.dropped.iter().any(|d| d.service_name == t.name)) {
        services.push(planner.target_update(from, to, target, &contracts.not_installed)?);
    }
    for source in from.services.iter().filter(|s| !contracts.not_installed.contains_key(s.name.as_str())) {
        let reason = match (to.service(&source.name), contracts.dropped.iter().find(|d| d.service_name == source.name)) {
            (Some(_), Some(drop)) => format!("left out of release {} on this device ({}): stopped and removed", to.id, join(&drop.unmet)),
            (None, _) => format!("not in release {}: stopped and removed", to.id),
            (Some(_), None) => continue,
        };
        let from_image = planner.image(source)?;
        services.push(ServiceUpdate {
            service_name: source.name.clone(),
            change: Change::Removed,
            status: UpdateStatus::Ready,
            reason,
            from_image: Some(from_image.0),
            to_image: None,
            delta: None,
            payload_size: 0,
        });
    }
    let overall_status = services.iter().map(|s| s.status.readiness()).min().unwrap_or(Readiness::Ready);
    let estimated_total_payload_size = estimated_payload(&services);
    Ok(Transition {
        from: ReleaseRef { id: from.id.clone(), commit: from.commit.clone() },
        to: ReleaseRef { id: to.id.clone(), commit: to.commit.clone() },
        services,
        dropped: contracts.dropped,
        deltas: planner.needs,
        contracts_checked: facts.is_some(),
        overall_status,
        estimated_total_payload_size,
    })
}

/// What the device facts make of the contracts of both releases.
#[derive(Default)]
struct Contracts<'r> {
    /// Optional services of `to` whose contract the device does not meet.
    dropped: Vec<DroppedService>,
    /// Optional services of `from` whose contract the device does not meet, so it does not run
    /// them, with why.
    not_installed: HashMap<&'r str, Vec<Unmet>>,
}

/// Checks the contracts of `to` (rejecting it when a non-optional service's is unmet) and
/// of `from`'s optional services against `facts`.
fn check_contracts<'r>(from: &'r Release, to: &Release, facts: &DeviceFacts) -> Result<Contracts<'r>, ReleaseError> {
    let mut contracts = Contracts::default();
    let mut rejected = Vec::new();
    for service in &to.services {
        let Some(contract) = &service.contract else { continue };
        let unmet = contract.evaluate(facts);
        if unmet.is_empty() {
            continue;
        }
        if service.is_optional() {
            contracts.dropped.push(DroppedService { service_name: service.name.clone(), contract: contract.slug.clone(), unmet });
        } else {
            rejected.push(UnmetContract { service: service.name.clone(), contract: contract.slug.clone(), unmet });
        }
    }
    if !rejected.is_empty() {
        return Err(ReleaseError::Rejected { release: to.id.clone(), services: rejected });
    }
    for service in from.services.iter().filter(|s| s.is_optional()) {
        if let Some(contract) = &service.contract {
            let unmet = contract.evaluate(facts);
            if !unmet.is_empty() {
                contracts.not_installed.insert(&service.name, unmet);
            }
        }
    }
    Ok(contracts)
}

/// The pessimistic payload: each target image counted once, at the largest payload any
/// service asks for it.
fn estimated_payload(services: &[ServiceUpdate]) -> u64 {
    let mut per_image: HashMap<Digest, u64> = HashMap::new();
    for update in services {
        if let Some(image) = &update.to_image {
            let entry = per_image.entry(image.digest).or_default();
            *entry = (*entry).max(update.payload_size);
        }
    }
    per_image.values().sum()
}

/// Asks the catalog once per reference and once per image pair.
struct Planner<'a> {
    catalog: &'a dyn ImageCatalog,
    images: HashMap<String, ResolvedImage>,
    deltas: HashMap<ImagePair, DeltaStatus>,
    needs: Vec<DeltaNeed>,
}

impl Planner<'_> {
    /// What happens to the service `target` of `to`, given the service of that name in `from`
    /// (added, downloaded whole, unchanged or delta-updated).
    fn target_update(
        &mut self,
        from: &Release,
        to: &Release,
        target: &Service,
        not_installed: &HashMap<&str, Vec<Unmet>>,
    ) -> Result<ServiceUpdate, ReleaseError> {
        let to_image = self.image(target)?;
        let source = from.service(&target.name);
        Ok(match source {
            None => ServiceUpdate {
                service_name: target.name.clone(),
                change: Change::Added,
                status: UpdateStatus::Ready,
                reason: format!("new in release {}: downloaded whole ({} layers), there is no source image", to.id, to_image.1.layers.len()),
                payload_size: to_image.0.size,
                from_image: None,
                to_image: Some(to_image.0),
                delta: None,
            },
            Some(source) if not_installed.contains_key(source.name.as_str()) => ServiceUpdate {
                service_name: target.name.clone(),
                change: Change::Download,
                status: UpdateStatus::Ready,
                reason: format!(
                    "not on the device, whose facts fail its optional contract in release {} ({}): downloaded whole ({} layers)",
                    from.id,
                    join(&not_installed[source.name.as_str()]),
                    to_image.1.layers.len()
                ),
                payload_size: to_image.0.size,
                from_image: None,
                to_image: Some(to_image.0),
                delta: None,
            },
            Some(source) => {
                let from_image = self.image(source)?;
                if from_image.1.same_content(&to_image.1) {
                    let reason = if from_image.0.digest == to_image.0.digest {
                        format!("same image in both releases ({}): nothing to download, not restarted", short_digest(&to_image.0.digest))
                    } else {
                        format!(
                            "same content in both releases (config {}; manifests {} and {}, blobs recompressed): nothing to download, not restarted",
                            short_digest(&to_image.1.config.unwrap_or(to_image.0.digest)),
                            short_digest(&from_image.0.digest),
                            short_digest(&to_image.0.digest)
                        )
                    };
                    ServiceUpdate {
                        service_name: target.name.clone(),
                        change: Change::Unchanged,
                        status: UpdateStatus::Unchanged,
                        reason,
                        payload_size: 0,
                        from_image: Some(from_image.0),
                        to_image: Some(to_image.0),
                        delta: None,
                    }
                } else {
                    self.delta_update(&target.name, from_image, to_image)?
                }
            }
        })
    }

    fn image(&mut self, service: &Service) -> Result<(ImageInfo, ResolvedImage), ReleaseError> {
        let resolved = match self.images.get(&service.image) {
            Some(resolved) => resolved.clone(),
            None => {
                let resolved = self
                    .catalog
                    .resolve(&service.image)
                    .map_err(|e| ReleaseError::catalog(format!("image {:?} of service {:?}", service.image, service.name), e))?;
                if let Some(pinned) = service.pinned_digest() {
                    if pinned != resolved.digest {
                        return Err(ReleaseError::catalog(
                            format!("image {:?} of service {:?}", service.image, service.name),
                            fleetdelta_engine::Error::DigestMismatch { what: "resolved image".into(), expected: pinned, found: resolved.digest },
                        ));
                    }
                }
                self.images.insert(service.image.clone(), resolved.clone());
                resolved
            }
        };
        let info = ImageInfo { reference: service.image.clone(), digest: resolved.digest, config: resolved.config, size: resolved.size() };
        Ok((info, resolved))
    }

    fn delta_update(
        &mut self,
        service: &str,
        (from_info, from): (ImageInfo, ResolvedImage),
        (to_info, to): (ImageInfo, ResolvedImage),
    ) -> Result<ServiceUpdate, ReleaseError> {
        let pair = ImagePair { from: from.digest, to: to.digest, repository: image_repository(&to_info.reference) };
        let status = match self.deltas.get(&pair) {
            Some(status) => status.clone(),
            None => {
                let status = self.catalog.delta_status(&pair).map_err(|e| {
                    ReleaseError::catalog(format!("delta {} -> {} in {}", short_digest(&pair.from), short_digest(&pair.to), pair.repository), e)
                })?;
                self.deltas.insert(pair.clone(), status.clone());
                status
            }
        };
        match self.needs.iter_mut().find(|n| n.pair == pair) {
            Some(need) => need.services.push(service.to_string()),
            None => {
                self.needs.push(DeltaNeed { pair, from: from_info.clone(), to: to_info.clone(), status: status.clone(), services: vec![service.to_string()] })
            }
        }
        let (missing, missing_size) = to.missing_from(&from);
        let pull = format!("the estimate is the {missing} of {} layers the device lacks", to.layers.len());
        let (status, reason, delta, payload_size) = match status {
            DeltaStatus::Absent => (
                UpdateStatus::Pending,
                format!("image changed; no delta for this image pair yet: {pull}"),
                None,
                missing_size,
            ),
            DeltaStatus::Building => (
                UpdateStatus::Preparing,
                format!("image changed; its delta is being built: {pull}"),
                None,
                missing_size,
            ),
            // A device downloads the missing layers instead when they cost less (as `pull`
            // does): the estimate is the cheaper of the two.
            DeltaStatus::Ready { reference, size } if missing_size < size => (
                UpdateStatus::Ready,
                format!("image changed; delta ready ({reference}), but the {missing} layers the device lacks cost less ({missing_size} bytes against {size}): the estimate is those"),
                Some(ReadyDelta { reference, size }),
                missing_size,
            ),
            DeltaStatus::Ready { reference, size } => (
                UpdateStatus::Ready,
                format!("image changed; delta ready ({reference})"),
                Some(ReadyDelta { reference, size }),
                size,
            ),
        };
        Ok(ServiceUpdate {
            service_name: service.to_string(),
            change: Change::DeltaUpdate,
            status,
            reason,
            from_image: Some(from_info),
            to_image: Some(to_info),
            delta,
            payload_size,
        })
    }
}

/// `sha256:` and the first 12 hex digits, as docker shortens image ids.
pub fn short_digest(digest: &Digest) -> String {
    let mut text = digest.to_string();
    text.truncate(fleetdelta_engine::digest::SHA256_PREFIX.len() + SHORT_DIGEST_HEX);
    text
}

/// Hex digits shown of a shortened digest.
const SHORT_DIGEST_HEX: usize = 12;

fn join(unmet: &[Unmet]) -> String {
    unmet.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::catalog::LayerBlob;

    /// Images named by reference; layers named by number. Counts calls to check caching.
    #[derive(Default)]
    struct FakeCatalog {
        images: HashMap<String, ResolvedImage>,
        deltas: HashMap<ImagePair, DeltaStatus>,
        calls: RefCell<Vec<String>>,
    }

    impl FakeCatalog {
        fn image(mut self, reference: &str, layers: &[(u8, u64)]) -> Self {
            let layers: Vec<LayerBlob> = layers.iter().map(|&(n, size)| LayerBlob { digest: Digest::from_bytes([n; 32]), size }).collect();
            let digest = Digest::of(format!("{layers:?}").as_bytes());
            self.images.insert(reference.to_string(), ResolvedImage { digest, config: None, layers });
            self
        }
        fn delta(mut self, from: &str, to: &str, status: DeltaStatus) -> Self {
            let pair = ImagePair { from: self.images[from].digest, to: self.images[to].digest, repository: image_repository(to) };
            self.deltas.insert(pair, status);
            self
        }
    }

    impl ImageCatalog for FakeCatalog {
        fn resolve(&self, reference: &str) -> fleetdelta_engine::Result<ResolvedImage> {
            self.calls.borrow_mut().push(format!("resolve {reference}"));
            self.images.get(reference).cloned().ok_or_else(|| fleetdelta_engine::Error::NotFound(reference.to_string()))
        }
        fn delta_status(&self, pair: &ImagePair) -> fleetdelta_engine::Result<DeltaStatus> {
            self.calls.borrow_mut().push(format!("delta {}", short_digest(&pair.to)));
            Ok(self.deltas.get(pair).cloned().unwrap_or(DeltaStatus::Absent))
        }
    }

    fn release(id: &str, services: &[(&str, &str)]) -> Release {
        release_with(id, services, "")
    }

    /// `extra` is appended to the YAML of every service (labels, contract).
    fn release_with(id: &str, services: &[(&str, &str)], extra: &str) -> Release {
        let mut text = format!("id: '{id}'\nservices:\n");
        for (name, image) in services {
            text.push_str(&format!("  {name}:\n    image: {image}\n{extra}"));
        }
        Release::parse(&text, id).unwrap()
    }

    fn changes(t: &Transition) -> Vec<(&str, Change, UpdateStatus, u64)> {
        t.services.iter().map(|s| (s.service_name.as_str(), s.change, s.status, s.payload_size)).collect()
    }

    fn catalog() -> FakeCatalog {
        FakeCatalog::default()
            .image("api:1", &[(1, 1000), (2, 200)])
            .image("api:2", &[(1, 1000), (3, 300)])
            .image("api:3", &[(1, 1000), (4, 50), (5, 5)])
            .image("web:1", &[(1, 1000), (6, 60)])
            .image("worker:1", &[(7, 700)])
    }

    #[test]
    fn timeline_of_three_releases() {
        let v1 = release("v1", &[("api", "api:1"), ("web", "web:1")]);
        let v2 = release("v2", &[("api", "api:2"), ("web", "web:1")]);
        let v3 = release("v3", &[("api", "api:2"), ("web", "web:1"), ("worker", "worker:1")]);
        let cat = catalog().delta("api:1", "api:2", DeltaStatus::Ready { reference: "api:delta-1-2".into(), size: 42 });

        // v1 -> v2: api changes (delta ready), web does not.
        let t = plan(&v1, &v2, None, &cat).unwrap();
        assert_eq!(changes(&t), [("api", Change::DeltaUpdate, UpdateStatus::Ready, 42), ("web", Change::Unchanged, UpdateStatus::Unchanged, 0)]);
        assert_eq!((t.overall_status, t.estimated_total_payload_size), (Readiness::Ready, 42));
        assert_eq!(t.service("api").unwrap().delta.as_ref().unwrap().reference, "api:delta-1-2");

        // v2 -> v3: api is unchanged in this step; worker is added and downloaded whole.
        let t = plan(&v2, &v3, None, &cat).unwrap();
        assert_eq!(
            changes(&t),
            [
                ("api", Change::Unchanged, UpdateStatus::Unchanged, 0),
                ("web", Change::Unchanged, UpdateStatus::Unchanged, 0),
                ("worker", Change::Added, UpdateStatus::Ready, 700),
            ]
        );
        assert!(t.deltas.is_empty());
        assert_eq!(t.estimated_total_payload_size, 700);

        // v1 -> v3 skips a step: same delta pair as v1 -> v2, plus the added worker.
        let t = plan(&v1, &v3, None, &cat).unwrap();
        assert_eq!(t.deltas.len(), 1);
        assert_eq!(t.estimated_total_payload_size, 742);

        // v3 -> v1 goes back: api needs the reverse delta, which does not exist; worker is removed.
        let t = plan(&v3, &v1, None, &cat).unwrap();
        assert_eq!(
            changes(&t),
            [
                ("api", Change::DeltaUpdate, UpdateStatus::Pending, 200),
                ("web", Change::Unchanged, UpdateStatus::Unchanged, 0),
                ("worker", Change::Removed, UpdateStatus::Ready, 0),
            ]
        );
        assert_eq!(t.overall_status, Readiness::Pending);
        assert_eq!(t.deltas_to_build().count(), 1);
        assert!(t.service("api").unwrap().reason.contains("the 1 of 2 layers the device lacks"), "{t:?}");
    }

    #[test]
    fn services_sharing_an_image_pair_share_one_delta_and_one_download() {
        let from = release("a", &[("left", "api:1"), ("right", "api:1"), ("other", "web:1")]);
        let to = release("b", &[("left", "api:2"), ("right", "api:2"), ("other", "api:3")]);
        let cat = catalog();
        let t = plan(&from, &to, None, &cat).unwrap();
        assert_eq!(t.deltas.len(), 2);
        assert_eq!(t.deltas[0].services, ["left", "right"]);
        assert_eq!(t.deltas[1].services, ["other"]);
        assert_eq!(t.deltas_to_build().count(), 2);
        // left and right each need 300 bytes of api:2, which the device stores once.
        assert_eq!(t.estimated_total_payload_size, 300 + 55);
        // Each reference and each pair is asked once.
        let calls = cat.calls.borrow();
        assert_eq!(calls.iter().filter(|c| c.starts_with("resolve api:1")).count(), 1);
        assert_eq!(calls.iter().filter(|c| c.starts_with("delta")).count(), 2);
    }

    #[test]
    fn one_image_in_two_repositories_has_a_delta_in_each() {
        // The same digests under fleet/api and fleet/gpu: a delta lives in its target's
        // repository, so each service gets the one beside its own target.
        let layers_1 = [(1, 1000), (2, 200)];
        let layers_2 = [(1, 1000), (3, 300)];
        let cat = FakeCatalog::default()
            .image("reg.example/fleet/api:1", &layers_1)
            .image("reg.example/fleet/gpu:1", &layers_1)
            .image("reg.example/fleet/api:2", &layers_2)
            .image("reg.example/fleet/gpu:2", &layers_2)
            .delta("reg.example/fleet/gpu:1", "reg.example/fleet/gpu:2", DeltaStatus::Ready { reference: "reg.example/fleet/gpu@d".into(), size: 9 });
        let from = release("a", &[("api", "reg.example/fleet/api:1"), ("gpu", "reg.example/fleet/gpu:1")]);
        let to = release("b", &[("api", "reg.example/fleet/api:2"), ("gpu", "reg.example/fleet/gpu:2")]);
        let t = plan(&from, &to, None, &cat).unwrap();
        assert_eq!(t.deltas.len(), 2, "{t:?}");
        assert_eq!(t.deltas[0].pair.from, t.deltas[1].pair.from);
        assert_eq!(t.deltas[0].pair.to, t.deltas[1].pair.to);
        assert_eq!((t.deltas[0].pair.repository.as_str(), t.deltas[0].services.as_slice()), ("reg.example/fleet/api", &["api".to_string()][..]));
        assert_eq!((t.deltas[1].pair.repository.as_str(), t.deltas[1].services.as_slice()), ("reg.example/fleet/gpu", &["gpu".to_string()][..]));
        // gpu's delta is ready in fleet/gpu; api's is not, whatever fleet/gpu holds.
        assert_eq!(changes(&t), [("api", Change::DeltaUpdate, UpdateStatus::Pending, 300), ("gpu", Change::DeltaUpdate, UpdateStatus::Ready, 9)]);
        assert_eq!(t.deltas_to_build().map(|d| d.pair.repository.as_str()).collect::<Vec<_>>(), ["reg.example/fleet/api"]);
        assert_eq!(t.overall_status, Readiness::Pending);
    }

    #[test]
    fn overall_status_is_the_least_ready() {
        let from = release("a", &[("x", "api:1"), ("y", "web:1")]);
        let to = release("b", &[("x", "api:2"), ("y", "api:3")]);
        let ready = || DeltaStatus::Ready { reference: "d".into(), size: 1 };
        let cases = [
            (ready(), ready(), Readiness::Ready),
            (ready(), DeltaStatus::Building, Readiness::Preparing),
            (DeltaStatus::Building, DeltaStatus::Absent, Readiness::Pending),
            (DeltaStatus::Absent, ready(), Readiness::Pending),
        ];
        for (x, y, expected) in cases {
            let cat = catalog().delta("api:1", "api:2", x.clone()).delta("web:1", "api:3", y.clone());
            let t = plan(&from, &to, None, &cat).unwrap();
            assert_eq!(t.overall_status, expected, "{x:?} {y:?}");
        }
        // Only unchanged services: ready.
        let t = plan(&from, &from, None, &catalog()).unwrap();
        assert_eq!((t.overall_status, t.estimated_total_payload_size), (Readiness::Ready, 0));
        assert!(Readiness::Pending < Readiness::Preparing && Readiness::Preparing < Readiness::Ready);
    }

    #[test]
    fn building_deltas_estimate_the_missing_layers() {
        let from = release("a", &[("api", "api:1")]);
        let to = release("b", &[("api", "api:2")]);
        let t = plan(&from, &to, None, &catalog().delta("api:1", "api:2", DeltaStatus::Building)).unwrap();
        assert_eq!(changes(&t), [("api", Change::DeltaUpdate, UpdateStatus::Preparing, 300)]);
        assert_eq!(t.deltas_to_build().count(), 0, "a delta being built is not built again");
    }

    #[test]
    fn a_delta_that_costs_more_than_the_missing_layers_is_not_the_estimate() {
        let from = release("a", &[("api", "api:1")]);
        let to = release("b", &[("api", "api:2")]);
        let ready = |size| DeltaStatus::Ready { reference: "docker://r/api@sha256:dd".into(), size };
        let cheap = plan(&from, &to, None, &catalog().delta("api:1", "api:2", ready(40))).unwrap();
        assert_eq!(changes(&cheap), [("api", Change::DeltaUpdate, UpdateStatus::Ready, 40)]);
        let dear = plan(&from, &to, None, &catalog().delta("api:1", "api:2", ready(900))).unwrap();
        assert_eq!(changes(&dear), [("api", Change::DeltaUpdate, UpdateStatus::Ready, 300)], "the 300 bytes of missing layers");
        assert!(dear.services[0].reason.contains("cost less"), "{}", dear.services[0].reason);
        assert_eq!(dear.estimated_total_payload_size, 300);
    }

    const GPU_CONTRACT: &str =
        "    contract:\n      type: sw.container\n      slug: needs-l4t-32-4\n      requires:\n        - {type: sw.l4t, version: '>=32.4'}\n";

    fn facts(l4t: &str) -> DeviceFacts {
        DeviceFacts { l4t: Some(l4t.into()), ..DeviceFacts::default() }
    }

    #[test]
    fn contracts_reject_drop_or_pass() {
        let from = release("a", &[("api", "api:1")]);
        let required = release_with("b", &[("api", "api:2"), ("gpu", "worker:1")], GPU_CONTRACT);
        let optional =
            release_with("b", &[("api", "api:2"), ("gpu", "worker:1")], &format!("    labels: {{io.balena.features.optional: '1'}}\n{GPU_CONTRACT}"));
        // (release, l4t, expected: Ok(services planned) or Err(message part))
        type Expected = Result<&'static [&'static str], &'static str>;
        let cases: [(&Release, &str, Expected); 4] = [
            (&required, "32.4.4", Ok(&["api", "gpu"])),
            (
                &required,
                "32.2",
                Err("release \"b\" is rejected for this device: service \"api\" (contract \"needs-l4t-32-4\"): requires sw.l4t >=32.4 but the device has 32.2.0; service \"gpu\""),
            ),
            (&optional, "32.4.4", Ok(&["api", "gpu"])),
            (&optional, "32.2", Ok(&[])),
        ];
        for (to, l4t, expected) in cases {
            let result = plan(&from, to, Some(&facts(l4t)), &catalog());
            match expected {
                Ok(names) => {
                    let t = result.unwrap();
                    let planned: Vec<_> = t.services.iter().map(|s| s.service_name.as_str()).collect();
                    if names.is_empty() {
                        // Both optional services dropped: api was on the device, so it is removed.
                        assert_eq!(changes(&t), [("api", Change::Removed, UpdateStatus::Ready, 0)]);
                        assert_eq!(t.dropped.len(), 2);
                        assert_eq!(t.dropped[1].unmet[0].to_string(), "requires sw.l4t >=32.4 but the device has 32.2.0");
                        assert!(t.services[0].reason.starts_with("left out of release b on this device (requires sw.l4t"));
                    } else {
                        assert_eq!(planned, names);
                        assert!(t.dropped.is_empty() && t.contracts_checked);
                    }
                }
                Err(message) => {
                    let err = result.unwrap_err();
                    assert!(err.to_string().starts_with(message), "{err}");
                    assert!(matches!(&err, ReleaseError::Rejected { services, .. } if services.len() == 2));
                }
            }
        }
        // Without facts, contracts are not checked.
        let t = plan(&from, &required, None, &catalog()).unwrap();
        assert!(!t.contracts_checked && t.dropped.is_empty());
    }

    #[test]
    fn optional_services_the_device_never_ran_are_downloaded_whole() {
        let gpu = format!("    labels: {{io.balena.features.optional: '1'}}\n{GPU_CONTRACT}");
        let from = release_with("a", &[("gpu", "worker:1")], &gpu);
        // The target drops the contract: the device lacks the image, so no delta can serve it.
        let to = release("b", &[("gpu", "api:1")]);
        let t = plan(&from, &to, Some(&facts("32.2")), &catalog()).unwrap();
        assert_eq!(changes(&t), [("gpu", Change::Download, UpdateStatus::Ready, 1200)]);
        assert!(t.deltas.is_empty());
        assert!(t.services[0].reason.contains("fail its optional contract in release a"), "{}", t.services[0].reason);
        // An optional source service never installed and gone from the target leaves no trace.
        let t = plan(&from, &release("c", &[("api", "api:1")]), Some(&facts("32.2")), &catalog()).unwrap();
        assert_eq!(changes(&t), [("api", Change::Added, UpdateStatus::Ready, 1200)]);
    }

    #[test]
    fn catalog_failures_and_pin_mismatches_name_the_image() {
        let from = release("a", &[("api", "api:1")]);
        let err = plan(&from, &release("b", &[("api", "missing:1")]), None, &catalog()).unwrap_err();
        assert_eq!(err.to_string(), "image \"missing:1\" of service \"api\": not found: missing:1");
        let wrong_pin = format!("api:1@{}", Digest::of(b"other"));
        let mut cat = catalog();
        cat.images.insert(wrong_pin.clone(), cat.images["api:1"].clone());
        let err = plan(&from, &release("b", &[("api", &wrong_pin)]), None, &cat).unwrap_err();
        assert!(matches!(&err, ReleaseError::Catalog { source, .. } if matches!(**source, fleetdelta_engine::Error::DigestMismatch { .. })));
    }
}
