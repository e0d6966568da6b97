//! What `fleetdelta agent status` shows, read from the state directory without an agent.

use std::collections::BTreeMap;
use std::fs::{self, File};

use serde::Serialize;

use crate::api::{self, ApiRequest};
use crate::error::Result;
use crate::journal;
use crate::lock::{self, ReleaseRequest};
use crate::runtime::Runtime;
use crate::state::{Installed, StateDir};
use crate::switch::all_running;
use fleetdelta_release::Release;

/// What `fleetdelta agent status` shows: what runs, the update under way, the requests.
#[derive(Clone, Debug, Serialize)]
pub struct AgentStatus {
    /// What runs.
    pub installed: Installed,
    /// The release of the update under way, if any.
    pub updating_to: Option<String>,
    /// The release requests written, by service.
    pub waiting: Vec<ReleaseRequest>,
    /// Per installed service, whether its instance runs.
    pub running: BTreeMap<String, bool>,
    /// Whether an agent runs on this state directory now (holds its lock).
    pub agent_running: bool,
    /// While an agent runs: per service that deferred its switch, the seconds left.
    pub deferred_seconds: BTreeMap<String, u64>,
    /// While an agent runs: the services that said go-ahead and were not switched yet.
    pub go_ahead: Vec<String>,
}

/// Whether an agent runs on the state directory: it holds `agent.lock` for as long as it
/// runs, and a lock we can take is nobody's.
pub fn agent_running(state: &StateDir) -> bool {
    File::open(state.agent_lock()).is_ok_and(|f| matches!(f.try_lock_shared(), Err(std::fs::TryLockError::WouldBlock)))
}

/// Reads the state of a device without taking the agent lock (read only).
pub fn status(state: &StateDir, runtime: &dyn Runtime) -> Result<AgentStatus> {
    let installed = Installed::load(state)?;
    let updating_to = journal::read_replay(&state.journal_file())?.plan.map(|p| p.target_release);
    let mut waiting = Vec::new();
    if let Ok(dirs) = fs::read_dir(state.root().join("locks")) {
        for dir in dirs.flatten() {
            if let Some(request) = lock::read_request(&dir.path().join("release-request")) {
                waiting.push(request);
            }
        }
    }
    let mut running = BTreeMap::new();
    for (name, record) in &installed.services {
        running.insert(name.clone(), all_running(runtime, name, record)?);
    }
    let agent_running = agent_running(state);
    // Deferrals and go-aheads live in the running agent: asked of its API.
    let (mut deferred_seconds, mut go_ahead) = (BTreeMap::new(), Vec::new());
    if agent_running {
        if let Ok(answer) = api::send(&state.socket(), &ApiRequest::Status) {
            deferred_seconds = serde_json::from_value(answer["deferred_seconds"].clone()).unwrap_or_default();
            go_ahead = serde_json::from_value(answer["go_ahead"].clone()).unwrap_or_default();
        }
    }
    Ok(AgentStatus { installed, updating_to, waiting, running, agent_running, deferred_seconds, go_ahead })
}

/// Reads a release file as the agent keeps it (for callers that want the current release).
pub fn current_release(state: &StateDir) -> Result<Option<Release>> {
    let path = state.release_file();
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(Release::load(&path)?))
}
