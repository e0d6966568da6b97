//! Per-service steps from the release transition: what the device runs now (`installed.json`)
//! against the target release, planned by [`fleetdelta_release::plan`] (contracts included).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::lock::Reason;
use super::state::{Installed, InstanceRecord, StateDir};
use super::strategy::{Step, Strategy, UpdateKind};
use crate::error::Result;
use fleetdelta_engine::image::manifest::{Manifest, MAX_JSON_BYTES};
use fleetdelta_engine::image::Layout;
use fleetdelta_engine::reference::ImageRef;
use fleetdelta_engine::transfer::Transfer;
use fleetdelta_release::parse_release_image;
use fleetdelta_release::{plan, Change, DeltaStatus, DeviceFacts, ImageCatalog, ImagePair, LayerBlob, Release, ResolvedImage, Service};

/// The update of one service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePlan {
    /// The service.
    pub service: String,
    /// What changes.
    pub kind: UpdateKind,
    /// The transition's word for it (`added`, `delta-update`, ...), for reports.
    pub change: String,
    /// How it is replaced.
    pub strategy: Strategy,
    /// What its release request says, when the agent waits for its lock.
    pub reason: Reason,
    /// The instance that runs now, if any.
    pub from: Option<InstanceRecord>,
    /// The instance it moves to; `None` when removed.
    pub to: Option<InstanceRecord>,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// The first step of the switch: the steps before it run without the lock.
    pub switch_at: usize,
}

impl ServicePlan {
    /// Whether the service is switched at all (needs its lock).
    pub fn switches(&self) -> bool {
        self.switch_at < self.steps.len()
    }
}

/// The update of a device to a target release.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdatePlan {
    /// The release the device runs (`None` on a new device).
    pub from_release: Option<String>,
    /// The target release.
    pub target_release: String,
    /// The OS version to install first, when the release asks for one the device does not run.
    pub os_update: Option<String>,
    /// Per service, in the target's order, then removed services.
    pub services: Vec<ServicePlan>,
    /// Services switched together: those whose switch changes a variable of the release's
    /// own `environment` (a coupled change). Each group's switches wait until every member's
    /// lock is free, then run one after the other under all their locks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<Vec<String>>,
}

/// The groups of switching services that a change of one of the release's variables couples
/// (services sharing a changed variable, transitively), each of at least two.
fn coupled(target: &Release, services: &[ServicePlan]) -> Vec<Vec<String>> {
    let mut groups: Vec<BTreeSet<String>> = Vec::new();
    for key in target.environment.keys() {
        let changed: BTreeSet<String> = services
            .iter()
            .filter(|s| s.switches())
            .filter(|s| s.from.as_ref().and_then(|f| f.environment.get(key)) != s.to.as_ref().and_then(|t| t.environment.get(key)))
            .map(|s| s.service.clone())
            .collect();
        if changed.is_empty() {
            continue;
        }
        // Merge with every group it meets.
        let (meeting, rest): (Vec<_>, Vec<_>) = groups.into_iter().partition(|g| !g.is_disjoint(&changed));
        let merged = meeting.into_iter().fold(changed, |mut all, g| {
            all.extend(g);
            all
        });
        groups = rest;
        groups.push(merged);
    }
    let order: BTreeMap<&str, usize> = services.iter().enumerate().map(|(i, s)| (s.service.as_str(), i)).collect();
    let mut groups: Vec<Vec<String>> = groups
        .into_iter()
        .filter(|g| g.len() > 1)
        .map(|g| {
            let mut members: Vec<String> = g.into_iter().collect();
            members.sort_by_key(|m| order.get(m.as_str()).copied().unwrap_or(usize::MAX));
            members
        })
        .collect();
    groups.sort_by_key(|g| order.get(g[0].as_str()).copied().unwrap_or(usize::MAX));
    groups
}

/// Plans the update of the device to `target`. `facts` (when given) check the contracts and
/// say which OS the device runs.
pub fn plan_update(transfer: &Transfer, state: &StateDir, installed: &Installed, target: &Release, facts: Option<&DeviceFacts>) -> Result<UpdatePlan> {
    let from = installed_release(installed);
    let catalog = AgentCatalog { transfer, store: state.store(), installed };
    let transition = plan(&from, target, facts, &catalog)?;
    let mut services = Vec::new();
    for update in &transition.services {
        let name = &update.service_name;
        let from = installed.services.get(name).cloned();
        let to = match (update.change, target.service(name), &update.to_image, &from) {
            (Change::Removed, ..) => None,
            // The same content under another manifest: the device keeps the image it has.
            (Change::Unchanged, Some(service), Some(_), Some(from)) => {
                Some(InstanceRecord { image: from.image.clone(), ..record(service, from.digest, from.config, &target.id) })
            }
            (_, Some(service), Some(image), _) => Some(record(service, image.digest, image.config, &target.id)),
            _ => None,
        };
        let kind = match (update.change, &from, &to) {
            (Change::Removed, _, _) => UpdateKind::Removed,
            (_, None, Some(_)) => UpdateKind::Added,
            (_, Some(from), Some(to)) if from.digest == to.digest => {
                if from.environment == to.environment && from.run == to.run {
                    UpdateKind::Nothing
                } else {
                    UpdateKind::Environment
                }
            }
            _ => UpdateKind::Image,
        };
        let labels = to.as_ref().or(from.as_ref()).map(|r| r.labels.clone()).unwrap_or_default();
        let strategy = Strategy::from_labels(&labels);
        let (steps, switch_at) = strategy.steps(kind);
        let reason = if strategy == Strategy::HandOver && kind != UpdateKind::Removed { Reason::UpdateNoRestart } else { Reason::UpdateRestart };
        services.push(ServicePlan { service: name.clone(), kind, change: update.change.to_string(), strategy, reason, from, to, steps, switch_at });
    }
    let os_update = match (&target.os, facts.and_then(|f| f.os.as_ref()), &installed.os) {
        (Some(wanted), Some(running), _) if wanted != running => Some(wanted.clone()),
        (Some(wanted), None, installed_os) if installed_os.as_ref() != Some(wanted) => Some(wanted.clone()),
        _ => None,
    };
    let groups = coupled(target, &services);
    Ok(UpdatePlan { from_release: installed.release.clone(), target_release: target.id.clone(), os_update, services, groups })
}

/// The instance record a target service gets.
fn record(service: &Service, digest: fleetdelta_engine::Digest, config: Option<fleetdelta_engine::Digest>, release: &str) -> InstanceRecord {
    InstanceRecord {
        image: service.image.clone(),
        digest,
        config,
        release: release.to_string(),
        environment: service.environment.clone(),
        labels: service.labels.clone(),
        run: service.run.clone(),
    }
}

/// The release the device runs, as the transition planner wants it: one service per installed
/// instance. A device part way through an update (a service still waiting for its lock) runs
/// services of two releases; each is compared with the target as it is.
fn installed_release(installed: &Installed) -> Release {
    Release {
        id: installed.release.clone().unwrap_or_else(|| "none".into()),
        commit: None,
        os: installed.os.clone(),
        environment: BTreeMap::new(),
        services: installed
            .services
            .iter()
            .map(|(name, r)| Service {
                name: name.clone(),
                image: r.image.clone(),
                labels: r.labels.clone(),
                contract: None,
                environment: r.environment.clone(),
                run: r.run.clone(),
            })
            .collect(),
    }
}

/// Resolves images for planning: an image the device runs answers from its record (no
/// network, and the digest the device actually has, even if a tag moved since), anything
/// else through its transport. Delta status does not matter to the device, which looks for
/// a delta when it fetches.
struct AgentCatalog<'a> {
    transfer: &'a Transfer,
    store: std::path::PathBuf,
    installed: &'a Installed,
}

impl ImageCatalog for AgentCatalog<'_> {
    fn resolve(&self, reference: &str) -> fleetdelta_engine::Result<ResolvedImage> {
        if let Some(record) = self.installed.services.values().find(|r| r.image == reference) {
            let layers = Layout::open(&self.store)
                .and_then(|store| {
                    let blob = store.resolve(Some(&record.store_tag()))?;
                    Manifest::parse(store.read_blob(&blob, MAX_JSON_BYTES)?, Some(&blob.media_type))
                })
                .map(|m| layers_of(&m))
                .unwrap_or_default();
            return Ok(ResolvedImage { digest: record.digest, config: record.config, layers });
        }
        let manifest = match parse_release_image(reference)? {
            ImageRef::Registry(r) => {
                let fetched = self.transfer.block_on(self.transfer.client().get_image_manifest(&r))?;
                Manifest::parse(fetched.raw, Some(&fetched.media_type))?
            }
            ImageRef::Layout { dir, tag } => {
                let layout = Layout::open(dir)?;
                let blob = layout.resolve(tag.as_deref())?;
                Manifest::parse(layout.read_blob(&blob, MAX_JSON_BYTES)?, Some(&blob.media_type))?
            }
            // parse_release_image gives registry and layout references only.
            _ => return Err(fleetdelta_engine::error::Error::unsupported(reference, "release images are registry images or OCI layouts")),
        };
        Ok(ResolvedImage { digest: manifest.digest, config: Some(manifest.config.digest), layers: layers_of(&manifest) })
    }

    fn delta_status(&self, _pair: &ImagePair) -> fleetdelta_engine::Result<DeltaStatus> {
        Ok(DeltaStatus::Absent)
    }
}

fn layers_of(manifest: &Manifest) -> Vec<LayerBlob> {
    manifest.layers.iter().map(|l| LayerBlob { digest: l.digest, size: l.size }).collect()
}

/// The services of a plan by name.
pub fn by_name(plan: &UpdatePlan) -> BTreeMap<&str, &ServicePlan> {
    plan.services.iter().map(|s| (s.service.as_str(), s)).collect()
}
