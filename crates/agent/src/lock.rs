//! Per-service update locks and the requests that say why the agent waits for them.
//!
//! A service holds back its own updates in either of two ways:
//! - fleetdelta's: flock(2) on `<state>/locks/<service>/updates.lock` (shared or exclusive;
//!   `flock FILE command` from util-linux or busybox will do);
//! - balena's lockfile convention: `<state>/locks/<service>/balena/updates.lock` (mounted at
//!   `/tmp/balena/updates.lock` in the service's containers) is held while it exists. Create
//!   it with `O_CREAT|O_EXCL` (`lockfile`, or `set -C; : > FILE` in a shell), remove it when
//!   done. A flock on it counts too, since the file then exists.
//!
//! The agent takes both, without blocking, before it stops, restarts or replaces the service,
//! and holds them until the switch is committed: the flock exclusively, and the lockfile by
//! creating it exclusively with [`AGENT_MARK`] inside, as balena's supervisor does (a new
//! instance that takes its lock at start-up waits until then). A lockfile with the mark that
//! a killed agent left is the agent's own and taken over: only one agent runs per state
//! directory. While a lock is held by someone else, the agent writes `release-request` beside
//! both files and removes it once it no longer waits.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::state::{sync_parent, write_file, StateDir};
use crate::error::Result;
use fleetdelta_engine::error::IoContext;

/// Why the agent waits for a service's lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The device's OS is to be updated, and the device rebooted: every lock is needed.
    OsUpdate,
    /// The service is to be stopped and replaced (new image or environment), or removed.
    UpdateRestart,
    /// The service is to be updated without stopping it first: a new instance starts beside
    /// it and takes over (strategy `hand-over`).
    UpdateNoRestart,
    /// The operator restarts the service (`fleetdelta agent restart`).
    Restart,
    /// The operator stops the service (`fleetdelta agent stop`).
    Stop,
    /// The device is to reboot (`fleetdelta agent reboot`): every lock is needed.
    Reboot,
    /// The device is to shut down (`fleetdelta agent shutdown`): every lock is needed.
    Shutdown,
}

impl Reason {
    /// The reason as written in the request file.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::OsUpdate => "os_update",
            Reason::UpdateRestart => "update_restart",
            Reason::UpdateNoRestart => "update_no_restart",
            Reason::Restart => "restart",
            Reason::Stop => "stop",
            Reason::Reboot => "reboot",
            Reason::Shutdown => "shutdown",
        }
    }
}

/// The `release-request` file: the agent waits for this service's lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRequest {
    /// The service.
    pub service: String,
    /// Why the agent waits.
    pub reason: Reason,
    /// The release the agent is moving to.
    pub target_release: String,
    /// Since when the agent waits, RFC 3339 in UTC.
    pub since: String,
    /// The same instant, in seconds since the Unix epoch.
    pub since_unix: u64,
    /// The local API's socket, where the service may ask the agent to go ahead or defer.
    pub api: PathBuf,
}

/// Writes the service's request, keeping `since` when a request for the same reason and
/// release is already there (the agent has been waiting since then).
pub fn write_request(state: &StateDir, service: &str, reason: Reason, target_release: &str) -> Result<ReleaseRequest> {
    let path = state.request_file(service);
    if let Some(existing) = read_request(&path) {
        if existing.reason == reason && existing.target_release == target_release {
            return Ok(existing);
        }
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let request = ReleaseRequest {
        service: service.to_string(),
        reason,
        target_release: target_release.to_string(),
        since: rfc3339(now),
        since_unix: now,
        api: state.socket(),
    };
    fs::create_dir_all(state.balena_dir(service)).ctx(|| format!("creating {}", state.balena_dir(service).display()))?;
    let bytes = serde_json::to_vec_pretty(&request).expect("requests serialize");
    write_file(&path, &bytes)?;
    write_file(&state.balena_dir(service).join(REQUEST_FILE), &bytes)?;
    Ok(request)
}

/// Reads a request file; `None` when there is none or it is unreadable (it is rewritten).
pub fn read_request(path: &Path) -> Option<ReleaseRequest> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// Removes the service's request: the agent no longer waits for its lock.
pub fn remove_request(state: &StateDir, service: &str) -> Result<()> {
    for path in [state.request_file(service), state.balena_dir(service).join(REQUEST_FILE)] {
        match fs::remove_file(&path) {
            Ok(()) => sync_parent(&path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fleetdelta_engine::Error::io(format!("removing {}", path.display()), e).into()),
        }
    }
    Ok(())
}

/// The request's file name, in both lock directories.
const REQUEST_FILE: &str = "release-request";
/// balena's lock file, in `<lock dir>/balena/` (`/tmp/balena/` in containers).
pub const BALENA_LOCK_FILE: &str = "updates.lock";
/// What the agent writes into balena's lock file while it holds it: tells its own (a killed
/// agent's) lock from a service's.
pub const AGENT_MARK: &[u8] = b"fleetdelta-agent\n";

/// A service's update lock, held by the agent until dropped (the flock is released and
/// balena's lock file removed).
#[derive(Debug)]
pub struct ServiceLock {
    _file: File,
    balena: PathBuf,
}

impl ServiceLock {
    /// Takes the service's lock if nobody holds it; `None` when someone does (a flock on
    /// `updates.lock`, or balena's lock file).
    pub fn try_acquire(state: &StateDir, service: &str) -> Result<Option<ServiceLock>> {
        state.prepare_service(service)?;
        let path = state.lock_file(service);
        let file = OpenOptions::new().read(true).write(true).open(&path).ctx(|| format!("opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Ok(None),
            Err(TryLockError::Error(e)) => return Err(fleetdelta_engine::Error::io(format!("locking {}", path.display()), e).into()),
        }
        let balena = state.balena_dir(service).join(BALENA_LOCK_FILE);
        if !take_lockfile(&balena)? {
            return Ok(None);
        }
        Ok(Some(ServiceLock { _file: file, balena }))
    }
}

impl Drop for ServiceLock {
    fn drop(&mut self) {
        // Only a file with the agent's mark is removed: never a service's.
        if fs::read(&self.balena).is_ok_and(|b| b == AGENT_MARK) {
            let _ = fs::remove_file(&self.balena);
        }
    }
}

/// Takes balena's lock file by creating it exclusively with the agent's mark. `false` when a
/// service holds it (the file exists without the mark).
fn take_lockfile(path: &Path) -> Result<bool> {
    // A second try only when the file went away between the create and the read.
    for _ in 0..2 {
        match OpenOptions::new().write(true).create_new(true).open(path) {
            Ok(mut file) => {
                file.write_all(AGENT_MARK).ctx(|| format!("writing {}", path.display()))?;
                return Ok(true);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match fs::read(path) {
                Ok(bytes) => return Ok(bytes == AGENT_MARK),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                // A file the agent may not read is not the agent's.
                Err(_) => return Ok(false),
            },
            Err(e) => return Err(fleetdelta_engine::Error::io(format!("creating {}", path.display()), e).into()),
        }
    }
    Ok(false)
}

/// Seconds since the epoch as RFC 3339 UTC (`2024-06-01T12:00:00Z`).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_717_243_199), "2024-06-01T11:59:59Z");
    }

    #[test]
    fn a_held_lock_is_not_taken_and_requests_keep_their_start() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let first = ServiceLock::try_acquire(&state, "api").unwrap().expect("free");
        assert!(ServiceLock::try_acquire(&state, "api").unwrap().is_none(), "another open file description is refused");
        drop(first);
        assert!(ServiceLock::try_acquire(&state, "api").unwrap().is_some());

        // balena's convention: the lock file's existence holds the lock.
        let balena = state.balena_dir("api").join(BALENA_LOCK_FILE);
        fs::write(&balena, b"").unwrap();
        assert!(ServiceLock::try_acquire(&state, "api").unwrap().is_none(), "a service's lock file holds updates back");
        assert!(balena.exists(), "the agent never removes a service's lock file");
        fs::remove_file(&balena).unwrap();
        let held = ServiceLock::try_acquire(&state, "api").unwrap().expect("free");
        assert_eq!(fs::read(&balena).unwrap(), AGENT_MARK, "the agent holds balena's lock file while it holds the lock");
        drop(held);
        assert!(!balena.exists(), "released");
        // A killed agent's lock file is the agent's own.
        fs::write(&balena, AGENT_MARK).unwrap();
        let again = ServiceLock::try_acquire(&state, "api").unwrap().expect("the agent's own lock file is taken over");
        drop(again);
        assert!(!balena.exists(), "released");

        let a = write_request(&state, "api", Reason::UpdateRestart, "2").unwrap();
        let mut on_disk = read_request(&state.request_file("api")).unwrap();
        assert_eq!(on_disk, a);
        on_disk.since_unix = 1;
        write_file(&state.request_file("api"), &serde_json::to_vec(&on_disk).unwrap()).unwrap();
        assert_eq!(write_request(&state, "api", Reason::UpdateRestart, "2").unwrap().since_unix, 1, "still waiting since then");
        assert_eq!(write_request(&state, "api", Reason::OsUpdate, "2").unwrap().reason, Reason::OsUpdate);
        remove_request(&state, "api").unwrap();
        assert!(!state.request_file("api").exists());
        remove_request(&state, "api").unwrap();
    }
}
