//! [`ProcessRuntime`]: each instance a local process run from its image's unpacked root
//! filesystem, images in an OCI layout in the state directory. No container engine and no
//! root are needed, and that has limits, which service authors must know:
//! - There is no chroot: the entrypoint is the file of that path *inside* the root filesystem
//!   (a program name is looked up in the image's `PATH` inside it), but it runs in the host's
//!   file system namespace. A `#!/bin/sh` script runs the host's `/bin/sh`, dynamic binaries
//!   use the host's loader, and absolute paths in the service mean host paths. Services should
//!   use relative paths or `FLEETDELTA_ROOTFS`.
//! - The working directory is the image's `WorkingDir` inside the root filesystem (the root
//!   filesystem itself when unset), created when missing. `WorkingDir` and the entrypoint
//!   resolve as in a chroot ([`super::rootfs::InRoot`]): an absolute path (`/app`, as docker
//!   and buildkit write it) starts from the root filesystem's root, and no symlink leads out.
//! - No isolation: no namespaces, cgroups or user switch; the service runs as the agent's user.
//! - Each instance is its own process group; stopping sends SIGTERM to the group, then
//!   SIGKILL after the stop timeout.
//!
//! Every instance gets the image's `Env`, then the release's environment, then the agent's
//! variables ([`super::runtime::agent_env`]), `FLEETDELTA_ROOTFS` and `FLEETDELTA_DATA`
//! (`<state>/services/<name>/data`, kept across updates).
//!
//! Instances outlive the agent: their process id and start time are recorded in
//! `services/<name>/instances/<id>.json`, so that a restarted agent finds them (and a reused
//! process id is not mistaken for them).

use std::collections::HashMap;
use std::fmt::Debug;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::AgentError;
use super::rootfs::{self, InRoot};
use super::runtime::{agent_env, Fetched, InstanceStatus, Launch, Runtime};
use super::state::{write_file, Installed, InstanceRecord, StateDir};
use super::store;
use crate::error::Result;
use fleetdelta_engine::error::IoContext;
use fleetdelta_engine::image::Layout;
use fleetdelta_engine::progress::Progress;
use fleetdelta_engine::transfer::Transfer;
use fleetdelta_pull::PullOptions;

/// `PATH` when the image sets none (Docker's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How often a stopping instance is looked at.
const POLL: Duration = Duration::from_millis(20);

/// Everything needed to start an instance as a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceSpec {
    /// The service.
    pub service: String,
    /// The instance's name (see [`super::state::InstanceRecord::instance_id`]).
    pub instance: String,
    /// The unpacked root filesystem.
    pub rootfs: PathBuf,
    /// Entrypoint followed by Cmd, from the image config.
    pub argv: Vec<String>,
    /// The environment, in order (later entries win).
    pub env: Vec<(String, String)>,
    /// The image's `WorkingDir`, inside the root filesystem (an absolute one starts from its
    /// root).
    pub working_dir: Option<String>,
}

/// The process an image config describes: `config.Entrypoint`, `Cmd`, `Env`, `WorkingDir`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageProcess {
    /// Entrypoint followed by Cmd.
    pub argv: Vec<String>,
    /// `Env`, split at the first `=`.
    pub env: Vec<(String, String)>,
    /// `WorkingDir`, when set.
    pub working_dir: Option<String>,
}

impl ImageProcess {
    /// Reads the process of an image config (its raw JSON); `command`, when given, replaces
    /// its `Cmd` (compose's `command`), and the `Entrypoint` stays.
    pub fn from_config(raw: &[u8], service: &str, command: Option<&[String]>) -> Result<Self> {
        let bad = |reason: String| AgentError::Runtime { service: service.to_string(), reason };
        let config: Value = serde_json::from_slice(raw).map_err(|e| bad(format!("image config: {e}")))?;
        let section = config.get("config").cloned().unwrap_or(Value::Null);
        let strings = |key: &str| -> Result<Vec<String>> {
            match section.get(key) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(items)) => {
                    items.iter().map(|v| v.as_str().map(str::to_string).ok_or_else(|| bad(format!("image config: {key} holds a non-string")))).collect()
                }
                Some(_) => Err(bad(format!("image config: {key} is not a list"))),
            }
        };
        let cmd = match command {
            Some(command) => command.to_vec(),
            None => strings("Cmd")?,
        };
        let argv: Vec<String> = strings("Entrypoint")?.into_iter().chain(cmd).collect();
        if argv.is_empty() {
            return Err(bad("the image has neither Entrypoint nor Cmd: nothing to run".into()));
        }
        let env = strings("Env")?
            .into_iter()
            .map(|e| match e.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (e, String::new()),
            })
            .collect();
        let working_dir = section.get("WorkingDir").and_then(Value::as_str).filter(|w| !w.is_empty()).map(str::to_string);
        Ok(ImageProcess { argv, env, working_dir })
    }
}

/// The record of a started process.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ProcessRecord {
    pid: u32,
    /// Field 22 of `/proc/<pid>/stat`: tells this process from a later one with the same id.
    start_time: u64,
    /// When it was started, in seconds since the Unix epoch (for people and staggering checks).
    #[serde(default)]
    started_at: f64,
}

/// Runs instances as local processes (see the module docs for what that means and lacks).
#[derive(Debug)]
pub struct ProcessRuntime {
    state: StateDir,
    /// Processes this agent started, reaped when they exit so that none lingers as a zombie.
    children: Mutex<HashMap<u32, Child>>,
}

impl ProcessRuntime {
    /// A runtime recording its processes in the state directory.
    pub fn new(state: StateDir) -> Self {
        ProcessRuntime { state, children: Mutex::new(HashMap::new()) }
    }

    fn record_path(&self, service: &str, instance: &str) -> PathBuf {
        self.state.instances_dir(service).join(format!("{instance}.json"))
    }

    fn reap(&self, pid: u32) {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(child) = children.get_mut(&pid) {
            if matches!(child.try_wait(), Ok(Some(_))) {
                children.remove(&pid);
            }
        }
    }
}

impl ProcessRuntime {
    /// Unpacks the image of `record` for `service`, unless it is.
    fn ensure_rootfs(&self, service: &str, record: &InstanceRecord) -> Result<()> {
        let dest = self.state.rootfs(service, &record.digest);
        if dest.exists() {
            return Ok(());
        }
        let layout = Layout::open(self.state.store())?;
        let image = layout.load_image(Some(&record.store_tag()))?;
        rootfs::unpack_image(&layout, &image, &dest)
    }

    /// What a launch runs: the image's process, the environment, the root filesystem.
    fn spec(&self, launch: &Launch) -> Result<InstanceSpec> {
        let Launch { service, record, .. } = *launch;
        let image = Layout::open(self.state.store())?.load_image(Some(&record.store_tag()))?;
        let process = ImageProcess::from_config(&image.config.raw, service, record.run.command.as_deref())?;
        let rootfs = self.state.rootfs(service, &record.digest);
        let path = |p: &Path| p.display().to_string();
        let mut env = process.env;
        env.extend(record.environment.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.extend(agent_env(&self.state, launch));
        env.push(("FLEETDELTA_ROOTFS".to_string(), path(&rootfs)));
        let data = match launch.replica {
            Some(i) => self.state.data_dir(service).join(format!("replica-{i}")),
            None => self.state.data_dir(service),
        };
        fs::create_dir_all(&data).ctx(|| format!("creating {}", data.display()))?;
        env.push(("FLEETDELTA_DATA".to_string(), path(&data)));
        Ok(InstanceSpec { service: service.to_string(), instance: launch.instance(), rootfs, argv: process.argv, env, working_dir: process.working_dir })
    }
}

impl Runtime for ProcessRuntime {
    fn fetch(
        &self,
        transfer: &Transfer,
        from: Option<&InstanceRecord>,
        to: &InstanceRecord,
        options: &PullOptions,
        progress: &dyn Progress,
    ) -> Result<Fetched> {
        store::fetch(transfer, &self.state, from, to, options, progress)
    }

    fn prepare(&self, service: &str, record: &InstanceRecord) -> Result<()> {
        self.ensure_rootfs(service, record)
    }

    fn discard(&self, service: &str, from: &InstanceRecord, to: &InstanceRecord) -> Result<()> {
        let old = self.state.rootfs(service, &from.digest);
        if from.digest != to.digest && old.exists() {
            fs::remove_dir_all(&old).ctx(|| format!("removing {}", old.display()))?;
        }
        Ok(())
    }

    fn prune(&self, installed: &Installed) -> Result<()> {
        store::prune(&self.state, installed)
    }

    fn start(&self, launch: &Launch) -> Result<()> {
        // A root filesystem removed meanwhile (delete-then-download, a rollback) is unpacked again.
        self.ensure_rootfs(launch.service, launch.record)?;
        let spec = self.spec(launch)?;
        self.spawn(&spec)
    }

    fn stop(&self, service: &str, instance: &str, timeout: Duration) -> Result<()> {
        self.kill(service, instance, timeout)
    }

    fn status(&self, service: &str, instance: &str) -> Result<InstanceStatus> {
        self.process_status(service, instance)
    }
}

impl ProcessRuntime {
    /// Starts the process of `spec`, unless it runs.
    pub fn spawn(&self, spec: &InstanceSpec) -> Result<()> {
        if let InstanceStatus::Running { .. } = self.process_status(&spec.service, &spec.instance)? {
            return Ok(());
        }
        let fail = |reason: String| AgentError::Runtime { service: spec.service.clone(), reason };
        let path_var = spec.env.iter().rev().find(|(k, _)| k == "PATH").map_or(DEFAULT_PATH, |(_, v)| v.as_str());
        let program = resolve_program(&spec.rootfs, &spec.argv[0], path_var).map_err(fail)?;
        let working_dir = match &spec.working_dir {
            // As a container engine does: created when missing, inside the root filesystem.
            Some(dir) => InRoot::open(&spec.rootfs)?.create_dir_all(dir).map_err(|e| fail(format!("WorkingDir {dir:?}: {e}")))?,
            None => spec.rootfs.clone(),
        };
        let instances = self.state.instances_dir(&spec.service);
        fs::create_dir_all(&instances).ctx(|| format!("creating {}", instances.display()))?;
        let log_path = instances.join(format!("{}.log", spec.instance));
        let log = fs::OpenOptions::new().create(true).append(true).open(&log_path).ctx(|| format!("opening {}", log_path.display()))?;
        let log2 = log.try_clone().ctx(|| format!("opening {}", log_path.display()))?;
        let child = Command::new(&program)
            .args(&spec.argv[1..])
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&working_dir)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| fail(format!("starting {}: {e}", program.display())))?;
        let pid = child.id();
        let start_time = proc_stat(pid).map(|(_, t)| t).unwrap_or(0);
        self.children.lock().unwrap_or_else(|p| p.into_inner()).insert(pid, child);
        let started_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let record = ProcessRecord { pid, start_time, started_at };
        write_file(&self.record_path(&spec.service, &spec.instance), &serde_json::to_vec(&record).expect("records serialize"))
    }

    fn kill(&self, service: &str, instance: &str, timeout: Duration) -> Result<()> {
        if let InstanceStatus::Running { pid } = self.process_status(service, instance)? {
            let group = rustix::process::Pid::from_raw(pid as i32).filter(|p| p.as_raw_nonzero().get() > 1);
            if let Some(group) = group {
                let _ = rustix::process::kill_process_group(group, rustix::process::Signal::TERM);
                let deadline = Instant::now() + timeout;
                while Instant::now() < deadline && self.process_status(service, instance)? != InstanceStatus::Stopped {
                    std::thread::sleep(POLL);
                }
                // The rest of the group too: a service's children must not outlive it.
                let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
                while self.process_status(service, instance)? != InstanceStatus::Stopped {
                    std::thread::sleep(POLL);
                }
            }
        }
        let path = self.record_path(service, instance);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(fleetdelta_engine::Error::io(format!("removing {}", path.display()), e).into()),
            _ => Ok(()),
        }
    }

    /// Whether the recorded process of an instance runs.
    pub fn process_status(&self, service: &str, instance: &str) -> Result<InstanceStatus> {
        let Ok(bytes) = fs::read(self.record_path(service, instance)) else { return Ok(InstanceStatus::Stopped) };
        let Ok(record) = serde_json::from_slice::<ProcessRecord>(&bytes) else { return Ok(InstanceStatus::Stopped) };
        self.reap(record.pid);
        Ok(match proc_stat(record.pid) {
            Some((state, start)) if state != 'Z' && state != 'X' && start == record.start_time => InstanceStatus::Running { pid: record.pid },
            _ => InstanceStatus::Stopped,
        })
    }
}

/// The state letter and start time of a process, from `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields restart after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// The host path of the program `name` inside `rootfs`: a path is taken inside the root
/// filesystem (from its root), a bare name is looked up in `path_var`'s directories inside it.
/// Paths and symlinks resolve as in a chroot ([`InRoot`]): never out of the root filesystem.
fn resolve_program(rootfs: &Path, name: &str, path_var: &str) -> std::result::Result<PathBuf, String> {
    let root = InRoot::open(rootfs).map_err(|e| e.to_string())?;
    let inside = |path: &str| -> Option<PathBuf> {
        let found = root.resolve(path).ok()?;
        let executable = fs::metadata(&found).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        executable.then_some(found)
    };
    if name.contains('/') {
        return inside(name).ok_or_else(|| format!("entrypoint {name:?} is not an executable file inside the image's root filesystem"));
    }
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .find_map(|dir| inside(&format!("{dir}/{name}")))
        .ok_or_else(|| format!("entrypoint {name:?} is not in the image's PATH ({path_var}) inside its root filesystem"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_entrypoint_cmd_env_and_workdir() {
        let raw = br#"{"config": {"Entrypoint": ["/bin/run"], "Cmd": ["--fast"], "Env": ["PATH=/bin", "EMPTY"], "WorkingDir": "/app"}, "rootfs": {"type": "layers", "diff_ids": []}}"#;
        let p = ImageProcess::from_config(raw, "api", None).unwrap();
        assert_eq!(p.argv, ["/bin/run", "--fast"]);
        assert_eq!(p.env, [("PATH".to_string(), "/bin".to_string()), ("EMPTY".to_string(), String::new())]);
        assert_eq!(p.working_dir.as_deref(), Some("/app"));
        let command = ["--slow".to_string()];
        assert_eq!(ImageProcess::from_config(raw, "api", Some(&command)).unwrap().argv, ["/bin/run", "--slow"], "command replaces Cmd only");
        let err = ImageProcess::from_config(br#"{"config": {}}"#, "api", None).unwrap_err().to_string();
        assert!(err.contains("service api: the image has neither Entrypoint nor Cmd"), "{err}");
        assert!(ImageProcess::from_config(br#"{"config": {"Cmd": "sh"}}"#, "api", None).is_err());
    }

    #[test]
    fn programs_resolve_inside_the_root_filesystem_only() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("bin")).unwrap();
        fs::write(r.join("bin/run"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(r.join("bin/run"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(r.join("bin/data"), "x").unwrap();
        std::os::unix::fs::symlink("/bin/sh", r.join("bin/escape")).unwrap();
        std::os::unix::fs::symlink("run", r.join("bin/alias")).unwrap();
        // As in a chroot: an absolute link starts from the root filesystem's root, and `..`
        // stops there.
        std::os::unix::fs::symlink("/bin/run", r.join("bin/absolute")).unwrap();
        std::os::unix::fs::symlink("../../../../bin/run", r.join("bin/climbing")).unwrap();
        let canon = r.canonicalize().unwrap();
        assert_eq!(resolve_program(r, "/bin/run", DEFAULT_PATH).unwrap(), canon.join("bin/run"));
        assert_eq!(resolve_program(r, "/bin/absolute", DEFAULT_PATH).unwrap(), canon.join("bin/run"));
        assert_eq!(resolve_program(r, "climbing", "/bin").unwrap(), canon.join("bin/run"));
        assert_eq!(resolve_program(r, "run", "/usr/bin:/bin").unwrap(), canon.join("bin/run"));
        assert_eq!(resolve_program(r, "bin/alias", DEFAULT_PATH).unwrap(), canon.join("bin/run"));
        for bad in ["/bin/data", "/bin/escape", "/../bin/sh", "sh", "/bin/missing"] {
            assert!(resolve_program(r, bad, DEFAULT_PATH).is_err(), "{bad}");
        }
    }
}
