//! Containers in the engine, through bollard: create, start, stop, remove, inspect, list by
//! label, and image untagging. The device agent's engine runtime
//! (`fleetdelta-agent`'s `engine_runtime`) is built on these; they know nothing of releases.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bollard::models::{ContainerCreateBody, HostConfig, RestartPolicy, RestartPolicyNameEnum};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, RemoveContainerOptions, RemoveImageOptions, StartContainerOptions, StopContainerOptions,
};

use crate::error::Result;

use super::Engine;

/// What a container is created with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerSpec {
    /// Its name (unique in the engine).
    pub name: String,
    /// The image, by name or ID.
    pub image: String,
    /// `Cmd`, when it replaces the image's.
    pub command: Option<Vec<String>>,
    /// `KEY=VALUE`s over the image's `Env`.
    pub env: Vec<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// `SOURCE:TARGET[:OPTIONS]` bind mounts and named volumes (`NAME:TARGET`).
    pub binds: Vec<String>,
    /// `none`, `host`, `bridge` or a network's name; the engine's default when `None`.
    pub network_mode: Option<String>,
    /// `no`, `always`, `unless-stopped` or `on-failure`.
    pub restart: Option<String>,
    /// The health check, over the image's.
    pub healthcheck: Option<Healthcheck>,
    /// Its log (stdout and stderr) through the engine's `json-file` driver, rotated, at most
    /// this size; the engine's default driver when `None`.
    pub log_limit: Option<LogLimit>,
}

/// A service's health check (compose's `healthcheck`), run by the container engine; release
/// files give it per service.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Healthcheck {
    /// `["CMD", program, args...]`, `["CMD-SHELL", "shell command"]` (a plain string is
    /// the latter) or `["NONE"]` (the image's check disabled).
    pub test: Vec<String>,
    /// Between two checks, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    /// How long one check may take, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Failures in a row that make the instance unhealthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Time after start during which failures do not count, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_period_ms: Option<u64>,
}

/// A cap on a container's log: `files` files of at most `file_bytes` each (the `json-file`
/// driver's `max-size` and `max-file`); `docker logs` reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogLimit {
    /// Bytes per file before it rotates.
    pub file_bytes: u64,
    /// Files kept, the current one included.
    pub files: u32,
}

/// What the engine says of a container's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// It has no health check.
    None,
    /// Its check has not passed yet.
    Starting,
    /// Its check passes.
    Healthy,
    /// Its check failed its retries.
    Unhealthy,
}

/// A container as the engine describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerState {
    /// Its ID.
    pub id: String,
    /// Its name, without the leading `/`.
    pub name: String,
    /// Whether it runs (or is restarting).
    pub running: bool,
    /// Its main process, while it runs.
    pub pid: Option<u32>,
    /// The image ID it was created from.
    pub image: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its health.
    pub health: Health,
}

/// The restart policies the engine knows, by their compose names.
pub fn restart_policy(name: &str) -> Option<RestartPolicyNameEnum> {
    match name {
        "no" => Some(RestartPolicyNameEnum::NO),
        "always" => Some(RestartPolicyNameEnum::ALWAYS),
        "unless-stopped" => Some(RestartPolicyNameEnum::UNLESS_STOPPED),
        "on-failure" => Some(RestartPolicyNameEnum::ON_FAILURE),
        _ => None,
    }
}

/// Attempts at a start or stop that the engine did not answer in time.
const TIMED_OUT_ATTEMPTS: u32 = 3;

/// Runs an idempotent request (a start or a stop: repeated, it answers 304) again when the
/// engine did not answer in time. An engine on a loaded device (a slow SD card, hundreds of
/// containers changing at once) can take minutes; it usually did what was asked, and giving
/// up would roll back through the same busy engine.
fn patiently<T>(request: impl Fn() -> std::result::Result<T, bollard::errors::Error>) -> std::result::Result<T, bollard::errors::Error> {
    let mut attempt = 1;
    loop {
        match request() {
            Err(bollard::errors::Error::RequestTimeoutError) if attempt < TIMED_OUT_ATTEMPTS => attempt += 1,
            other => return other,
        }
    }
}

fn not_found(e: &bollard::errors::Error) -> bool {
    matches!(e, bollard::errors::Error::DockerResponseServerError { status_code: 404, .. })
}

impl Engine {
    /// Creates a container (not started). Fails when the name is taken.
    pub fn create_container(&self, spec: &ContainerSpec) -> Result<String> {
        let restart_policy = match &spec.restart {
            Some(name) => Some(RestartPolicy {
                name: Some(restart_policy(name).ok_or_else(|| self.error(format!("creating {}", spec.name), format!("unknown restart policy {name:?}")))?),
                maximum_retry_count: None,
            }),
            None => None,
        };
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: spec.command.clone(),
            env: Some(spec.env.clone()),
            labels: Some(spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<HashMap<_, _>>()),
            healthcheck: spec.healthcheck.as_ref().map(|h| {
                let ns = |ms: Option<u64>| ms.map(|ms| i64::try_from(ms.saturating_mul(1_000_000)).unwrap_or(i64::MAX));
                bollard::models::HealthConfig {
                    test: Some(h.test.clone()),
                    interval: ns(h.interval_ms),
                    timeout: ns(h.timeout_ms),
                    retries: h.retries.map(i64::from),
                    start_period: ns(h.start_period_ms),
                    start_interval: None,
                }
            }),
            host_config: Some(HostConfig {
                log_config: spec.log_limit.map(|l| bollard::models::HostConfigLogConfig {
                    typ: Some("json-file".into()),
                    config: Some(HashMap::from([("max-size".to_string(), l.file_bytes.to_string()), ("max-file".to_string(), l.files.to_string())])),
                }),
                binds: Some(spec.binds.clone()),
                network_mode: spec.network_mode.clone(),
                restart_policy,
                ..HostConfig::default()
            }),
            ..ContainerCreateBody::default()
        };
        let options = CreateContainerOptions { name: Some(spec.name.clone()), ..CreateContainerOptions::default() };
        let created =
            self.block_on(self.docker.create_container(Some(options), body)).map_err(|e| self.error(format!("creating container {}", spec.name), e))?;
        Ok(created.id)
    }

    /// Starts a container (nothing when it runs).
    pub fn start_container(&self, name: &str) -> Result<()> {
        match patiently(|| self.block_on(self.docker.start_container(name, None::<StartContainerOptions>))) {
            Ok(()) => Ok(()),
            // 304: already started.
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 304, .. }) => Ok(()),
            Err(e) => Err(self.error(format!("starting container {name}"), e)),
        }
    }

    /// Stops a container: SIGTERM (or its stop signal), SIGKILL after `timeout`. A missing or
    /// stopped container is no error.
    pub fn stop_container(&self, name: &str, timeout: Duration) -> Result<()> {
        let t = i32::try_from(timeout.as_secs().max(u64::from(timeout.subsec_nanos() > 0))).unwrap_or(i32::MAX);
        // The engine answers once the container stopped: up to `timeout` after the request.
        let docker = self.docker.clone().with_timeout(super::client::CONTROL_TIMEOUT + timeout);
        match patiently(|| self.block_on(docker.stop_container(name, Some(StopContainerOptions { t: Some(t), signal: None })))) {
            Ok(()) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 304, .. }) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(self.error(format!("stopping container {name}"), e)),
        }
    }

    /// Removes a container, with its anonymous volumes (named volumes stay). A missing one is
    /// no error.
    pub fn remove_container(&self, name: &str) -> Result<()> {
        let options = RemoveContainerOptions { v: true, force: true, link: false };
        match self.block_on(self.docker.remove_container(name, Some(options))) {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(self.error(format!("removing container {name}"), e)),
        }
    }

    /// The container `name`, or `None` when the engine has none.
    pub fn inspect_container(&self, name: &str) -> Result<Option<ContainerState>> {
        let found = match self.block_on(self.docker.inspect_container(name, None)) {
            Ok(found) => found,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(self.error(format!("inspecting container {name}"), e)),
        };
        let state = found.state.unwrap_or_default();
        let running = state.running.unwrap_or(false) || state.restarting.unwrap_or(false);
        let health = match state.health.and_then(|h| h.status) {
            Some(bollard::models::HealthStatusEnum::STARTING) => Health::Starting,
            Some(bollard::models::HealthStatusEnum::HEALTHY) => Health::Healthy,
            Some(bollard::models::HealthStatusEnum::UNHEALTHY) => Health::Unhealthy,
            _ => Health::None,
        };
        Ok(Some(ContainerState {
            id: found.id.unwrap_or_default(),
            name: found.name.unwrap_or_default().trim_start_matches('/').to_string(),
            running,
            pid: state.pid.filter(|p| *p > 0).and_then(|p| u32::try_from(p).ok()),
            image: found.image.unwrap_or_default(),
            labels: found.config.and_then(|c| c.labels).unwrap_or_default().into_iter().collect(),
            health,
        }))
    }

    /// The names of every container (running or not) with the label `key=value`.
    pub fn containers_labelled(&self, key: &str, value: &str) -> Result<Vec<String>> {
        let filters = HashMap::from([("label".to_string(), vec![format!("{key}={value}")])]);
        let options = ListContainersOptions { all: true, filters: Some(filters), ..ListContainersOptions::default() };
        let found =
            self.block_on(self.docker.list_containers(Some(options))).map_err(|e| self.error(format!("listing containers labelled {key}={value}"), e))?;
        Ok(found.into_iter().filter_map(|c| c.names.and_then(|n| n.into_iter().next())).map(|n| n.trim_start_matches('/').to_string()).collect())
    }

    /// Removes the tag (or image) `name`; the image itself goes with its last tag unless a
    /// container uses it. Missing: no error. In use: `Ok(false)`.
    pub fn remove_image(&self, name: &str) -> Result<bool> {
        let options = RemoveImageOptions { force: false, noprune: false, platforms: None };
        match self.block_on(self.docker.remove_image(name, Some(options), None)) {
            Ok(_) => Ok(true),
            Err(e) if not_found(&e) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 409, .. }) => Ok(false),
            Err(e) => Err(self.error(format!("removing image {name}"), e)),
        }
    }

    /// The `NAME:TAG`s of the images in repository `repository`.
    pub fn tags_in(&self, repository: &str) -> Result<Vec<String>> {
        let filters = HashMap::from([("reference".to_string(), vec![format!("{repository}:*")])]);
        let options = bollard::query_parameters::ListImagesOptions { all: false, filters: Some(filters), ..Default::default() };
        let found = self.block_on(self.docker.list_images(Some(options))).map_err(|e| self.error(format!("listing images of {repository}"), e))?;
        let prefix = format!("{repository}:");
        Ok(found.into_iter().flat_map(|i| i.repo_tags).filter(|t| t.starts_with(&prefix)).collect())
    }

    fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_policies_are_compose_names() {
        assert_eq!(restart_policy("always"), Some(RestartPolicyNameEnum::ALWAYS));
        assert_eq!(restart_policy("unless-stopped"), Some(RestartPolicyNameEnum::UNLESS_STOPPED));
        assert_eq!(restart_policy("sometimes"), None);
    }

    #[test]
    fn a_start_or_stop_the_engine_did_not_answer_in_time_is_asked_again_a_bounded_number_of_times() {
        let attempts = std::cell::Cell::new(0);
        let slow_twice = || {
            attempts.set(attempts.get() + 1);
            if attempts.get() < 3 {
                Err(bollard::errors::Error::RequestTimeoutError)
            } else {
                Ok(attempts.get())
            }
        };
        assert_eq!(patiently(slow_twice).unwrap(), 3);
        attempts.set(0);
        let never = || {
            attempts.set(attempts.get() + 1);
            Err::<(), _>(bollard::errors::Error::RequestTimeoutError)
        };
        assert!(matches!(patiently(never), Err(bollard::errors::Error::RequestTimeoutError)));
        assert_eq!(attempts.get(), TIMED_OUT_ATTEMPTS);
        attempts.set(0);
        let refused = || {
            attempts.set(attempts.get() + 1);
            Err::<(), _>(bollard::errors::Error::DockerResponseServerError { status_code: 500, message: "no".into() })
        };
        assert!(patiently(refused).is_err());
        assert_eq!(attempts.get(), 1, "other errors are not retried");
    }
}
