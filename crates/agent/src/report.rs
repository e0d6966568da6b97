//! What an update did, per service and in all: the reports `agent --once --json` prints.

use serde::Serialize;

use crate::runtime::Fetched;
use crate::strategy::{Strategy, UpdateKind};

/// What happened to a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "outcome")]
pub enum Outcome {
    /// Nothing to do: not touched.
    Unchanged,
    /// Switched to its target instance (or removed).
    Updated,
    /// Its update failed and it runs its old instance.
    RolledBack {
        /// Why.
        reason: String,
    },
    /// Its lock is still held (or it deferred): it runs its old instance, and the next run
    /// goes on with the update.
    Waiting,
}

/// One service in an [`UpdateReport`].
#[derive(Clone, Debug, Serialize)]
pub struct ServiceReport {
    /// The service.
    pub service: String,
    /// The transition's word for its change.
    pub change: String,
    /// What changes.
    pub kind: UpdateKind,
    /// Its strategy.
    pub strategy: Strategy,
    /// What happened.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// How its image came (delta, missing layers, already there), when it was fetched.
    pub fetched: Option<Fetched>,
}

/// What [`Agent::update`](crate::Agent::update) did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct UpdateReport {
    /// The release the device ran.
    pub from_release: Option<String>,
    /// The target release.
    pub target_release: String,
    /// The release of an update that a crash had interrupted and that this run finished first.
    pub resumed: Option<String>,
    /// Per service.
    pub services: Vec<ServiceReport>,
    /// The OS version installed, if any.
    pub os_updated: Option<String>,
    /// Whether the device now runs the whole target release.
    pub complete: bool,
    /// Instances started because they were not running (after a power cut, say).
    pub restarted: Vec<String>,
}
