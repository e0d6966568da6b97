//! The state directory: where the agent keeps what the device runs, its images, and one
//! directory per service. Everything the agent must not lose is written atomically
//! (temporary file, fsync, rename, fsync of the directory).
//!
//! ```text
//! <state>/
//!   agent.lock               held by the running agent (one agent per state directory)
//!   api/agent.sock           the local API (see api.rs); its directory is mounted into containers
//!   control.sock             the operator's actions (restart, stop, reboot…), host only
//!   release.yaml             the release the device runs, once fully applied
//!   target.yaml              the release being applied (during an update)
//!   installed.json           per service: the instance that runs (image, digest, environment);
//!                            the services the operator stopped
//!   journal.jsonl            the write-ahead journal of the update in progress
//!   images/                  the image store: an OCI layout, one tag per image digest
//!   services/<name>/
//!     rootfs/<digest hex>/   the unpacked root filesystem of an image
//!     instances/<id>.json    a started instance: its process id and start time (processes)
//!     instances/<id>.log     its stdout and stderr (processes)
//!     data/                  the service's persistent data, kept across updates (processes;
//!                            containers have a named volume)
//!   locks/<name>/            mounted into the service's containers at the same path
//!     updates.lock           the service takes it with flock(2) to hold updates back
//!     release-request        written by the agent while it waits for that lock (JSON)
//!     handover-<id>          written by a new instance when it has taken over (hand-over)
//!     balena/                mounted at /tmp/balena: balena's lock directory
//!       updates.lock         held while it exists (balena's lockfile convention)
//!       release-request      the same request as above
//!       handover-complete    balena's hand-over signal
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::AgentError;
use crate::error::Result;
use fleetdelta_engine::digest::Digest;
use fleetdelta_engine::error::IoContext;
use fleetdelta_engine::image::layout::write_atomically;
use fleetdelta_release::RunOptions;

/// Paths inside a state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Opens (creating when needed) a state directory. A relative path is made absolute here,
    /// once: services get paths into it (`FLEETDELTA_LOCK`, `FLEETDELTA_DATA`, ...) and
    /// resolve them from their own working directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = absolute(root.into())?;
        for dir in [root.clone(), root.join("services"), root.join("locks"), root.join("api")] {
            fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        }
        Ok(StateDir { root })
    }

    /// Opens a state directory that an agent has created, creating nothing: for commands
    /// that read it or speak to its agent, where a mistyped path must be an error
    /// ([`AgentError::NoStateDir`]).
    pub fn open_existing(root: impl Into<PathBuf>) -> Result<Self> {
        let root = absolute(root.into())?;
        if !(root.join("services").is_dir() && root.join("locks").is_dir()) {
            return Err(AgentError::NoStateDir { path: root });
        }
        Ok(StateDir { root })
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Held by the running agent.
    pub fn agent_lock(&self) -> PathBuf {
        self.root.join("agent.lock")
    }

    /// The local API's socket.
    pub fn socket(&self) -> PathBuf {
        self.api_dir().join("agent.sock")
    }

    /// The agent's control socket (not mounted into containers): operator actions.
    pub fn control_socket(&self) -> PathBuf {
        self.root.join("control.sock")
    }

    /// The directory of the local API's socket: containers mount the directory, so that the
    /// socket an agent binds anew after a restart is the one they see.
    pub fn api_dir(&self) -> PathBuf {
        self.root.join("api")
    }

    /// The release the device runs, once fully applied.
    pub fn release_file(&self) -> PathBuf {
        self.root.join("release.yaml")
    }

    /// The release being applied.
    pub fn target_file(&self) -> PathBuf {
        self.root.join("target.yaml")
    }

    /// What runs, per service.
    pub fn installed_file(&self) -> PathBuf {
        self.root.join("installed.json")
    }

    /// The write-ahead journal.
    pub fn journal_file(&self) -> PathBuf {
        self.root.join("journal.jsonl")
    }

    /// The image store (an OCI layout).
    pub fn store(&self) -> PathBuf {
        self.root.join("images")
    }

    /// A service's directory.
    pub fn service_dir(&self, service: &str) -> PathBuf {
        self.root.join("services").join(service)
    }

    /// Where an image is unpacked for a service.
    pub fn rootfs(&self, service: &str, digest: &Digest) -> PathBuf {
        self.service_dir(service).join("rootfs").join(digest.hex())
    }

    /// A service's persistent data directory (`FLEETDELTA_DATA`), kept across updates.
    pub fn data_dir(&self, service: &str) -> PathBuf {
        self.service_dir(service).join("data")
    }

    /// Where a service's instances record their processes.
    pub fn instances_dir(&self, service: &str) -> PathBuf {
        self.service_dir(service).join("instances")
    }

    /// The file a new instance writes when it has taken over from the old one (in the lock
    /// directory, which containers see at the same path).
    pub fn handover_file(&self, service: &str, instance: &str) -> PathBuf {
        self.lock_dir(service).join(format!("handover-{instance}"))
    }

    /// balena's lock directory for a service, mounted at `/tmp/balena` in its containers.
    pub fn balena_dir(&self, service: &str) -> PathBuf {
        self.lock_dir(service).join("balena")
    }

    /// A service's lock directory.
    pub fn lock_dir(&self, service: &str) -> PathBuf {
        self.root.join("locks").join(service)
    }

    /// The lock a service takes to hold updates back.
    pub fn lock_file(&self, service: &str) -> PathBuf {
        self.lock_dir(service).join("updates.lock")
    }

    /// The request the agent writes while it waits for a service's lock.
    pub fn request_file(&self, service: &str) -> PathBuf {
        self.lock_dir(service).join("release-request")
    }

    /// Creates a service's directories and its lock file, so that the service can take the
    /// lock from its first start.
    pub fn prepare_service(&self, service: &str) -> Result<()> {
        for dir in [self.data_dir(service), self.instances_dir(service), self.lock_dir(service), self.balena_dir(service)] {
            fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        }
        let lock = self.lock_file(service);
        fs::OpenOptions::new().create(true).append(true).open(&lock).ctx(|| format!("creating {}", lock.display()))?;
        Ok(())
    }
}

/// `path` made absolute against the current directory (not canonicalized: symlinks stay).
fn absolute(path: PathBuf) -> Result<PathBuf> {
    Ok(std::path::absolute(&path).ctx(|| format!("making {} absolute", path.display()))?)
}

/// One service instance as installed: what it runs, with which environment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// The image reference in the release file.
    pub image: String,
    /// The image's manifest digest (in its registry or source layout).
    pub digest: Digest,
    /// The image's config digest, when known: an image with the same config is the same
    /// image, whatever its manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Digest>,
    /// The release the instance belongs to.
    pub release: String,
    /// The release's environment for the service.
    pub environment: BTreeMap<String, String>,
    /// The service's labels in that release.
    pub labels: BTreeMap<String, String>,
    /// Its container settings in that release (command, network, restart policy).
    #[serde(default, skip_serializing_if = "RunOptions::is_empty")]
    pub run: RunOptions,
}

impl InstanceRecord {
    /// The instance's name: its image, environment and container settings, so that an
    /// instance is replaced exactly when one of them changes, and two instances of one
    /// service (during a hand-over) have different names.
    pub fn instance_id(&self) -> String {
        let mut settings = serde_json::to_vec(&self.environment).unwrap_or_default();
        if !self.run.is_empty() {
            settings.extend(serde_json::to_vec(&self.run).unwrap_or_default());
        }
        format!("{}-{}", &self.digest.hex()[..12], &Digest::of(&settings).hex()[..8])
    }

    /// The image's tag in the store.
    pub fn store_tag(&self) -> String {
        store_tag(&self.digest)
    }
}

/// The store tag of an image digest.
pub fn store_tag(digest: &Digest) -> String {
    format!("sha256-{}", digest.hex())
}

/// What the device runs: the release last fully applied, the OS version last installed by
/// an update, and the instance of each service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    /// The release last fully applied; `None` on a new device.
    pub release: Option<String>,
    /// The OS version installed by the agent's last OS update.
    pub os: Option<String>,
    /// Per service, the instance that runs.
    pub services: BTreeMap<String, InstanceRecord>,
    /// The services the operator stopped (`fleetdelta agent stop`): the agent keeps them
    /// stopped until `agent start` or `agent restart`, or an update replaces them.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub stopped: BTreeSet<String>,
}

impl Installed {
    /// Reads `installed.json` (empty on a new device).
    pub fn load(state: &StateDir) -> Result<Self> {
        let path = state.installed_file();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| AgentError::State { path: path.clone(), reason: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Installed::default()),
            Err(e) => Err(fleetdelta_engine::Error::io(format!("reading {}", path.display()), e).into()),
        }
    }

    /// Writes `installed.json` atomically and durably: the commit point of a service's switch.
    pub fn save(&self, state: &StateDir) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).expect("records serialize");
        write_file(&state.installed_file(), &bytes)
    }
}

/// Writes a file atomically and durably: the rename itself is synced with its directory, so
/// that after a power cut the file is either the old one or the new one.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically(path, bytes)?;
    sync_parent(path)
}

/// Makes a rename or removal in `path`'s directory durable.
pub(crate) fn sync_parent(path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    Ok(fs::File::open(dir).and_then(|d| d.sync_all()).ctx(|| format!("syncing {}", dir.display()))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_directories_are_absolute_and_only_open_creates_one() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("state");
        let err = StateDir::open_existing(&root).unwrap_err().to_string();
        assert!(err.contains(&root.display().to_string()) && err.contains("no agent state directory"), "{err}");
        assert!(!root.exists(), "a read-only open creates nothing");
        fs::create_dir(&root).unwrap();
        assert!(StateDir::open_existing(&root).is_err(), "an empty directory is no state directory");
        StateDir::open(&root).unwrap();
        // The same directory through a relative path, from whatever the current directory is.
        let cwd = std::env::current_dir().unwrap();
        let mut relative: PathBuf = cwd.components().skip(1).map(|_| "..").collect();
        relative.push(root.strip_prefix("/").unwrap());
        let state = StateDir::open_existing(&relative).unwrap();
        assert!(state.root().is_absolute() && state.lock_file("api").is_absolute(), "{}", state.root().display());
        assert_eq!(state.root().canonicalize().unwrap(), root.canonicalize().unwrap());
        assert!(StateDir::open(&relative).unwrap().socket().is_absolute());
    }
}
