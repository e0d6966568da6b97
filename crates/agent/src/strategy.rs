//! Update strategies (label `io.balena.update.strategy`) as the ordered steps of one service's
//! update, split into what runs while the old instance keeps running (no lock needed) and the
//! switch (under the service's lock).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use fleetdelta_release::LABEL_UPDATE_STRATEGY;

/// The label giving a hand-over's timeout in milliseconds, as balena's supervisor reads it.
pub const LABEL_HANDOVER_TIMEOUT: &str = "io.balena.update.handover-timeout";
/// How long a new instance has to signal that it took over, unless the label says.
pub const DEFAULT_HANDOVER_TIMEOUT: Duration = Duration::from_secs(60);

/// How a service's instance is replaced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Download (and unpack) the new image while the old instance runs, then stop the old one
    /// and start the new one: the shortest downtime for the disk of two images.
    #[default]
    DownloadThenKill,
    /// Stop the old instance, then download and start the new one: less memory in use while
    /// downloading.
    KillThenDownload,
    /// Stop the old instance and delete its unpacked root filesystem before downloading: the
    /// least disk. The old image stays in the store until the switch commits, so a failed
    /// download still rolls back.
    DeleteThenDownload,
    /// Start the new instance beside the old one; stop the old one once the new one writes
    /// its hand-over file (`FLEETDELTA_HANDOVER_FILE`) or the hand-over timeout passes.
    HandOver,
}

impl Strategy {
    /// The strategy a service's labels choose (validated when the release was read; an
    /// unknown value falls back to the default).
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Self {
        match labels.get(LABEL_UPDATE_STRATEGY).map(String::as_str) {
            Some("kill-then-download") => Strategy::KillThenDownload,
            Some("delete-then-download") => Strategy::DeleteThenDownload,
            Some("hand-over") => Strategy::HandOver,
            _ => Strategy::DownloadThenKill,
        }
    }

    /// The hand-over timeout the labels give (milliseconds), or the default.
    pub fn handover_timeout(labels: &BTreeMap<String, String>) -> Duration {
        labels.get(LABEL_HANDOVER_TIMEOUT).and_then(|ms| ms.parse::<u64>().ok()).map_or(DEFAULT_HANDOVER_TIMEOUT, Duration::from_millis)
    }

    /// The steps of an update of this kind with this strategy, and the index of the first
    /// step of the switch (the steps before it run without the lock).
    pub fn steps(self, kind: UpdateKind) -> (Vec<Step>, usize) {
        use Step::*;
        let (steps, switch_at): (&[Step], usize) = match (kind, self) {
            (UpdateKind::Nothing, _) => (&[], 0),
            (UpdateKind::Added, _) => (&[Fetch, Unpack, StartNew, Commit], 2),
            (UpdateKind::Removed, _) => (&[StopOld, Commit], 0),
            (UpdateKind::Environment, Strategy::HandOver) => (&[StartNew, AwaitHandover, StopOld, Commit], 0),
            (UpdateKind::Environment, _) => (&[StopOld, StartNew, Commit], 0),
            (UpdateKind::Image, Strategy::DownloadThenKill) => (&[Fetch, Unpack, StopOld, StartNew, Commit], 2),
            (UpdateKind::Image, Strategy::KillThenDownload) => (&[StopOld, Fetch, Unpack, StartNew, Commit], 0),
            (UpdateKind::Image, Strategy::DeleteThenDownload) => (&[StopOld, DeleteOld, Fetch, Unpack, StartNew, Commit], 0),
            (UpdateKind::Image, Strategy::HandOver) => (&[Fetch, Unpack, StartNew, AwaitHandover, StopOld, Commit], 2),
        };
        (steps.to_vec(), switch_at)
    }
}

/// What changes for a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateKind {
    /// Same image, same environment: not touched.
    Nothing,
    /// New service.
    Added,
    /// Service gone.
    Removed,
    /// Same image, new environment: restarted without a download.
    Environment,
    /// New image (with or without a new environment).
    Image,
}

/// One journaled step of a service's update. Every step is idempotent, so that a step begun
/// before a crash is simply done again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Bring the new image into the store (a delta when the registry has one).
    Fetch,
    /// Unpack it into the new root filesystem.
    Unpack,
    /// Stop the old instance.
    StopOld,
    /// Delete the old instance's root filesystem.
    DeleteOld,
    /// Start the new instance.
    StartNew,
    /// Wait for the new instance's hand-over file, or the timeout.
    AwaitHandover,
    /// Record the new instance in `installed.json`: the service's commit point.
    Commit,
}

impl Step {
    /// The step's name, as journaled and as `--crash-after` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Fetch => "fetch",
            Step::Unpack => "unpack",
            Step::StopOld => "stop-old",
            Step::DeleteOld => "delete-old",
            Step::StartNew => "start-new",
            Step::AwaitHandover => "await-handover",
            Step::Commit => "commit",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_download_then_kill_and_hand_over_download_before_the_switch() {
        for (strategy, before_switch) in [
            (Strategy::DownloadThenKill, vec![Step::Fetch, Step::Unpack]),
            (Strategy::HandOver, vec![Step::Fetch, Step::Unpack]),
            (Strategy::KillThenDownload, vec![]),
            (Strategy::DeleteThenDownload, vec![]),
        ] {
            let (steps, at) = strategy.steps(UpdateKind::Image);
            assert_eq!(steps[..at], before_switch[..], "{strategy:?}");
            assert_eq!(steps.last(), Some(&Step::Commit));
            let stop = steps.iter().position(|s| *s == Step::StopOld).unwrap();
            let start = steps.iter().position(|s| *s == Step::StartNew).unwrap();
            assert_eq!(stop < start, strategy != Strategy::HandOver, "{strategy:?}: only hand-over starts before stopping");
        }
        assert_eq!(Strategy::DownloadThenKill.steps(UpdateKind::Nothing).0, []);
    }

    #[test]
    fn labels_choose_the_strategy_and_timeout() {
        let labels: BTreeMap<String, String> =
            [(LABEL_UPDATE_STRATEGY.to_string(), "hand-over".to_string()), (LABEL_HANDOVER_TIMEOUT.to_string(), "1500".to_string())].into();
        assert_eq!(Strategy::from_labels(&labels), Strategy::HandOver);
        assert_eq!(Strategy::handover_timeout(&labels), Duration::from_millis(1500));
        assert_eq!(Strategy::from_labels(&BTreeMap::new()), Strategy::DownloadThenKill);
        assert_eq!(Strategy::handover_timeout(&BTreeMap::new()), DEFAULT_HANDOVER_TIMEOUT);
    }
}
