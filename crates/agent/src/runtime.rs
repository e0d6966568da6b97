//! Where a device keeps its images and how it runs service instances: the [`Runtime`]
//! interface the agent drives. Two implement it:
//! - [`super::engine_runtime::EngineRuntime`], the default: images in the container engine's
//!   store (balena-engine, Docker), instances as containers;
//! - [`super::process::ProcessRuntime`]: images in an OCI layout in the state directory,
//!   instances as local processes from unpacked root filesystems (no engine, no root, no
//!   isolation).

use std::fmt::Debug;
use std::time::Duration;

use serde::Serialize;

use super::state::{Installed, InstanceRecord, StateDir};
use crate::error::Result;
use fleetdelta_engine::progress::Progress;
use fleetdelta_engine::transfer::Transfer;
use fleetdelta_pull::PullOptions;

/// Whether an instance runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstanceStatus {
    /// It runs, as this process (the leader of its process group, or the container's first
    /// process).
    Running {
        /// Its process id, as the host sees it.
        pid: u32,
    },
    /// It does not run.
    Stopped,
}

/// One instance to start.
#[derive(Clone, Copy, Debug)]
pub struct Launch<'a> {
    /// The service.
    pub service: &'a str,
    /// What it runs.
    pub record: &'a InstanceRecord,
    /// Whether it starts beside the instance it replaces (hand-over): it is told where to
    /// signal that it took over (`FLEETDELTA_HANDOVER_FILE`).
    pub handover: bool,
    /// Which replica, when the service runs several (`replicas`), from 0.
    pub replica: Option<u32>,
}

impl Launch<'_> {
    /// The instance's name: [`InstanceRecord::instance_id`], with `-r<replica>` for a replica.
    pub fn instance(&self) -> String {
        instance_key(&self.record.instance_id(), self.replica)
    }
}

/// The replicas of an instance: `[None]` for a service without `replicas`, else `Some(0..n)`.
pub fn replicas(record: &InstanceRecord) -> Vec<Option<u32>> {
    match record.run.replicas {
        None => vec![None],
        Some(n) => (0..n).map(Some).collect(),
    }
}

/// The names of every instance (replica) of `record`.
pub fn instance_keys(record: &InstanceRecord) -> Vec<String> {
    let id = record.instance_id();
    replicas(record).into_iter().map(|r| instance_key(&id, r)).collect()
}

/// The name of replica `replica` of an instance.
pub fn instance_key(instance_id: &str, replica: Option<u32>) -> String {
    match replica {
        Some(i) => format!("{instance_id}-r{i}"),
        None => instance_id.to_string(),
    }
}

/// How an image came onto the device (the agent's report and log).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "how", rename_all = "snake_case")]
pub enum Fetched {
    /// The device had it already (in the engine, or the store): nothing was downloaded.
    Present,
    /// The image it ran has the same content (the same config): nothing but the manifest.
    SameContent,
    /// A delta was downloaded and applied.
    Delta {
        /// The delta, `docker://…@sha256:…`.
        delta: String,
        /// Bytes received from the registry.
        received_bytes: u64,
    },
    /// The missing layers were downloaded.
    Layers {
        /// Bytes received from the registry.
        received_bytes: u64,
        /// Why no delta was used.
        reason: String,
    },
    /// Copied from the OCI layout the release names.
    Layout,
}

impl std::fmt::Display for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fetched::Present => f.write_str("already on the device"),
            Fetched::SameContent => f.write_str("same content as the image it had"),
            Fetched::Delta { delta, received_bytes } => write!(f, "delta {delta}, {received_bytes} bytes received"),
            Fetched::Layers { received_bytes, reason } => write!(f, "missing layers, {received_bytes} bytes received ({reason})"),
            Fetched::Layout => f.write_str("copied from its layout"),
        }
    }
}

/// Whether a started instance is ready to serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// It runs and its health check (if it has one) passes.
    Ready,
    /// Not yet: it starts, or its health check has not passed yet.
    Starting,
    /// It stopped, or its health check failed: it will not become ready by itself.
    Failed,
}

/// Keeps images and runs instances on a device. Every call is idempotent (fetching an image
/// the device has, starting a running instance or stopping a stopped one does nothing), so
/// that a step redone after a crash is harmless.
pub trait Runtime: Debug + Sync {
    /// Brings the image of `to` onto the device: a delta from `from`'s image when the
    /// registry (or the builder service of `options`) has one, else the missing layers unless
    /// `options.allow_full` is false. Returns how.
    fn fetch(&self, transfer: &Transfer, from: Option<&InstanceRecord>, to: &InstanceRecord, options: &PullOptions, progress: &dyn Progress)
        -> Result<Fetched>;
    /// Makes a fetched image ready to start (unpacks it, where instances run from a root
    /// filesystem).
    fn prepare(&self, service: &str, record: &InstanceRecord) -> Result<()>;
    /// Frees what the old instance's image takes before the new one is downloaded
    /// (`delete-then-download`); what a rollback needs is fetched or prepared again.
    fn discard(&self, service: &str, from: &InstanceRecord, to: &InstanceRecord) -> Result<()>;
    /// Removes the images and instances that nothing in `installed` uses.
    fn prune(&self, installed: &Installed) -> Result<()>;
    /// Starts the instance, unless it runs.
    fn start(&self, launch: &Launch) -> Result<()>;
    /// Stops the instance: asks it to stop, and forces it after `timeout`.
    fn stop(&self, service: &str, instance: &str, timeout: Duration) -> Result<()>;
    /// Whether it runs.
    fn status(&self, service: &str, instance: &str) -> Result<InstanceStatus>;
    /// Whether it is ready: by default, whether it runs.
    fn readiness(&self, service: &str, instance: &str) -> Result<Readiness> {
        Ok(match self.status(service, instance)? {
            InstanceStatus::Running { .. } => Readiness::Ready,
            InstanceStatus::Stopped => Readiness::Failed,
        })
    }
}

/// The variables every instance gets from the agent, after its image's `Env` and the
/// release's environment: who it is (`FLEETDELTA_SERVICE`, `_INSTANCE`, `_RELEASE`, and for
/// replicas `FLEETDELTA_REPLICA` from 0 and `FLEETDELTA_REPLICAS`), its update lock
/// (`FLEETDELTA_LOCK`), the agent's socket (`FLEETDELTA_API`) and, during a hand-over,
/// `FLEETDELTA_HANDOVER_FILE`. The paths are the host's: containers see them at
/// the same paths.
pub fn agent_env(state: &StateDir, launch: &Launch) -> Vec<(String, String)> {
    let instance = launch.instance();
    let path = |p: std::path::PathBuf| p.display().to_string();
    let mut env = vec![
        ("FLEETDELTA_SERVICE".to_string(), launch.service.to_string()),
        ("FLEETDELTA_INSTANCE".to_string(), instance.clone()),
        ("FLEETDELTA_RELEASE".to_string(), launch.record.release.clone()),
        ("FLEETDELTA_LOCK".to_string(), path(state.lock_file(launch.service))),
        ("FLEETDELTA_API".to_string(), path(state.socket())),
    ];
    if launch.handover {
        env.push(("FLEETDELTA_HANDOVER_FILE".to_string(), path(state.handover_file(launch.service, &instance))));
    }
    if let Some(replica) = launch.replica {
        env.push(("FLEETDELTA_REPLICA".to_string(), replica.to_string()));
        env.push(("FLEETDELTA_REPLICAS".to_string(), launch.record.run.replica_count().to_string()));
    }
    env
}
