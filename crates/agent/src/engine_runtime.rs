//! [`EngineRuntime`]: a device on a container engine (balena-engine, Docker: the Docker
//! Engine API). Images live in the engine's store and instances run as containers.
//!
//! - **Images** are tagged `fleetdelta/<agent>:sha256-<manifest hex>`, where `<agent>` names the
//!   state directory (several agents may share one engine). They come through
//!   [`fleetdelta_pull::pull_into`]: the cheapest delta from the image the service runs when the
//!   registry lists one among the target's referrers, applied into the engine (source layers
//!   exported from it, the target loaded untagged with plain layers, verified by image ID and
//!   diff_ids, then tagged), else the missing layers.
//! - **Containers** are named `fd-<agent>-<service>-<instance>` and labelled with the service,
//!   instance, release and agent, so that a restarted agent finds them. Each gets the
//!   release's environment, `command`, `network_mode` and `restart` (default `always`, as
//!   balena's supervisor), the agent's variables ([`super::runtime::agent_env`]), and:
//!   - the service's lock directory at its host path (`FLEETDELTA_LOCK`), and its `balena/`
//!     directory at `/tmp/balena` (balena's `updates.lock` and `handover-complete`);
//!   - the directory of the agent's socket at its host path (`FLEETDELTA_API`);
//!   - a named volume `fd-<agent>-<service>-data` at `/data` (`FLEETDELTA_DATA`), kept across
//!     updates and never removed by the agent; replica `i` has `fd-<agent>-<service>-data-<i>`
//!     and its container name ends in `-r<i>`.
//!   - the release's `healthcheck`, over the image's: the readiness a rolling start waits for;
//!   - its log through the engine's `json-file` driver, capped at [`LOG_LIMIT`] (3 files of
//!     10 MiB): a chatty service cannot fill the device, and `docker logs` reads it.
//! - **Stopping** is the engine's stop (SIGTERM, SIGKILL after the timeout), then the
//!   container is removed: a stopped instance is never brought back by the engine's restart
//!   policy, and its name is free for a rollback.

use std::collections::BTreeSet;
use std::time::Duration;

use super::error::AgentError;
use super::runtime::{agent_env, instance_keys, Fetched, InstanceStatus, Launch, Readiness, Runtime};
use super::state::{Installed, InstanceRecord, StateDir};
use crate::error::Result;
use fleetdelta_engine::digest::Digest;
use fleetdelta_engine::engine::{ContainerSpec, Engine, EngineRef, Health, LogLimit};
use fleetdelta_engine::progress::Progress;
use fleetdelta_engine::reference::ImageRef;
use fleetdelta_engine::transfer::Transfer;
use fleetdelta_pull::PullOptions;

/// Label: the agent (state directory) a container belongs to.
pub const LABEL_AGENT: &str = "io.fleetdelta.agent";
/// Label: the service.
pub const LABEL_SERVICE: &str = "io.fleetdelta.service";
/// Label: the instance (see [`InstanceRecord::instance_id`]).
pub const LABEL_INSTANCE: &str = "io.fleetdelta.instance";
/// Label: the release the instance belongs to.
pub const LABEL_RELEASE: &str = "io.fleetdelta.release";
/// Where the service's data volume is mounted.
pub const DATA_PATH: &str = "/data";
/// Where balena's services look for their lock directory.
pub const BALENA_LOCK_PATH: &str = "/tmp/balena";
/// How long a container no installed instance names has to stop when pruned.
const PRUNE_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The restart policy of a service whose release names none (balena's default).
pub const DEFAULT_RESTART: &str = "always";
/// Each container's log cap: 3 files of 10 MiB.
pub const LOG_LIMIT: LogLimit = LogLimit { file_bytes: 10 << 20, files: 3 };

/// Runs a device's services as containers of a container engine.
#[derive(Debug)]
pub struct EngineRuntime<'a> {
    state: StateDir,
    transfer: &'a Transfer,
    agent: String,
}

impl<'a> EngineRuntime<'a> {
    /// The runtime of the agent on `state`, reaching the engine through `transfer` (its
    /// `--engine`, `$DOCKER_HOST`, or the default socket). The engine is connected to now,
    /// so that an unreachable one is reported before anything else.
    pub fn new(state: StateDir, transfer: &'a Transfer) -> Result<Self> {
        transfer.engine()?;
        let agent = Digest::of(state.root().as_os_str().as_encoded_bytes()).hex()[..12].to_string();
        Ok(EngineRuntime { state, transfer, agent })
    }

    fn engine(&self) -> Result<&Engine> {
        Ok(self.transfer.engine()?)
    }

    /// The repository of this agent's images in the engine.
    fn repository(&self) -> String {
        format!("fleetdelta/{}", self.agent)
    }

    /// The engine's name for the image of `record`.
    pub fn image_ref(&self, record: &InstanceRecord) -> EngineRef {
        EngineRef { name: self.repository(), tag: Some(record.store_tag()) }
    }

    /// The container of an instance.
    pub fn container_name(&self, service: &str, instance: &str) -> String {
        format!("fd-{}-{service}-{instance}", self.agent)
    }

    /// The named volume of a service's data (of one replica's, for replicas).
    pub fn volume_name(&self, service: &str, replica: Option<u32>) -> String {
        match replica {
            Some(i) => format!("fd-{}-{service}-data-{i}", self.agent),
            None => format!("fd-{}-{service}-data", self.agent),
        }
    }

    fn has_image(&self, record: &InstanceRecord) -> Result<bool> {
        Ok(self.engine()?.inspect(&self.image_ref(record).api_name())?.is_some())
    }

    fn spec(&self, launch: &Launch) -> ContainerSpec {
        let Launch { service, record, replica, .. } = *launch;
        let instance = launch.instance();
        let mut env: Vec<String> = record.environment.iter().map(|(k, v)| format!("{k}={v}")).collect();
        env.extend(agent_env(&self.state, launch).into_iter().map(|(k, v)| format!("{k}={v}")));
        env.push(format!("FLEETDELTA_DATA={DATA_PATH}"));
        // What balena's services read.
        env.push(format!("BALENA_SERVICE_NAME={service}"));
        env.push(format!("BALENA_APP_LOCK_PATH={BALENA_LOCK_PATH}/updates.lock"));
        let mut labels = record.labels.clone();
        labels.insert(LABEL_AGENT.into(), self.agent.clone());
        labels.insert(LABEL_SERVICE.into(), service.into());
        labels.insert(LABEL_INSTANCE.into(), instance.clone());
        labels.insert(LABEL_RELEASE.into(), record.release.clone());
        let lock_dir = self.state.lock_dir(service).display().to_string();
        let api_dir = self.state.api_dir().display().to_string();
        ContainerSpec {
            name: self.container_name(service, &instance),
            image: self.image_ref(record).api_name(),
            command: record.run.command.clone(),
            env,
            labels,
            binds: vec![
                format!("{lock_dir}:{lock_dir}"),
                format!("{}:{BALENA_LOCK_PATH}", self.state.balena_dir(service).display()),
                format!("{api_dir}:{api_dir}"),
                format!("{}:{DATA_PATH}", self.volume_name(service, replica)),
            ],
            network_mode: record.run.network_mode.clone(),
            restart: Some(record.run.restart.clone().unwrap_or_else(|| DEFAULT_RESTART.into())),
            healthcheck: record.run.healthcheck.clone(),
            log_limit: Some(LOG_LIMIT),
        }
    }
}

impl Runtime for EngineRuntime<'_> {
    fn fetch(
        &self,
        transfer: &Transfer,
        from: Option<&InstanceRecord>,
        to: &InstanceRecord,
        options: &PullOptions,
        progress: &dyn Progress,
    ) -> Result<Fetched> {
        if self.has_image(to)? {
            return Ok(Fetched::Present);
        }
        let output = ImageRef::Engine(self.image_ref(to));
        let source = match from {
            Some(f) if self.has_image(f)? => Some(ImageRef::Engine(self.image_ref(f))),
            _ => None,
        };
        super::store::fetch_image(transfer, source.as_ref(), from, to, &output, options, progress)
    }

    fn prepare(&self, service: &str, record: &InstanceRecord) -> Result<()> {
        if self.has_image(record)? {
            return Ok(());
        }
        let reason = format!("the engine lost the image {} ({})", self.image_ref(record).api_name(), record.image);
        Err(AgentError::Runtime { service: service.into(), reason })
    }

    fn discard(&self, service: &str, from: &InstanceRecord, to: &InstanceRecord) -> Result<()> {
        if from.digest == to.digest {
            return Ok(());
        }
        let installed = Installed::load(&self.state)?;
        let shared = installed.services.iter().any(|(name, r)| name != service && r.digest == from.digest);
        if !shared {
            // In use by a container (not ours to stop): kept, and nothing is lost.
            self.engine()?.remove_image(&self.image_ref(from).api_name())?;
        }
        Ok(())
    }

    fn prune(&self, installed: &Installed) -> Result<()> {
        let engine = self.engine()?;
        let wanted: BTreeSet<String> =
            installed.services.iter().flat_map(|(s, r)| instance_keys(r).into_iter().map(move |i| self.container_name(s, &i))).collect();
        for name in engine.containers_labelled(LABEL_AGENT, &self.agent)? {
            if !wanted.contains(&name) {
                engine.stop_container(&name, PRUNE_STOP_TIMEOUT)?;
                engine.remove_container(&name)?;
            }
        }
        let keep: BTreeSet<String> = installed.services.values().map(|r| self.image_ref(r).api_name()).collect();
        for tag in engine.tags_in(&self.repository())? {
            if !keep.contains(&tag) {
                engine.remove_image(&tag)?;
            }
        }
        Ok(())
    }

    fn start(&self, launch: &Launch) -> Result<()> {
        let engine = self.engine()?;
        let name = self.container_name(launch.service, &launch.instance());
        match engine.inspect_container(&name)? {
            Some(found) if found.running => return Ok(()),
            Some(_) => {}
            None => {
                engine.create_container(&self.spec(launch))?;
            }
        }
        Ok(engine.start_container(&name)?)
    }

    fn stop(&self, service: &str, instance: &str, timeout: Duration) -> Result<()> {
        let engine = self.engine()?;
        let name = self.container_name(service, instance);
        engine.stop_container(&name, timeout)?;
        Ok(engine.remove_container(&name)?)
    }

    fn status(&self, service: &str, instance: &str) -> Result<InstanceStatus> {
        Ok(match self.engine()?.inspect_container(&self.container_name(service, instance))? {
            Some(found) if found.running => InstanceStatus::Running { pid: found.pid.unwrap_or(0) },
            _ => InstanceStatus::Stopped,
        })
    }

    fn readiness(&self, service: &str, instance: &str) -> Result<Readiness> {
        Ok(match self.engine()?.inspect_container(&self.container_name(service, instance))? {
            Some(found) if !found.running => Readiness::Failed,
            Some(found) => match found.health {
                Health::None | Health::Healthy => Readiness::Ready,
                Health::Starting => Readiness::Starting,
                Health::Unhealthy => Readiness::Failed,
            },
            None => Readiness::Failed,
        })
    }
}
