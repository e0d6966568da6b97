//! How an agent runs: its options, and the constants its services and tests see.

use std::time::Duration;

use fleetdelta_release::DeviceFacts;

/// balena's hand-over signal, in the service's `/tmp/balena`: the new instance has taken over.
pub const BALENA_HANDOVER_FILE: &str = "handover-complete";

/// Exit status of a process stopped by the `crash_after` test hook.
pub const CRASH_EXIT_CODE: i32 = 86;

/// How the agent behaves.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// The device's facts: contracts are checked against them, and `os` says which OS runs.
    pub facts: Option<DeviceFacts>,
    /// Whether missing layers may be downloaded when no delta exists (`false` on metered links).
    pub allow_full: bool,
    /// Least time between two instance starts, so that many services do not start at once.
    pub stagger: Duration,
    /// How long a stopping instance has after SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
    /// How long to wait for locks before giving up for this run (`None`: as long as it takes).
    /// The update stays journaled, and the next run goes on with it.
    pub lock_timeout: Option<Duration>,
    /// How often held locks are tried again (and starting instances looked at).
    pub poll: Duration,
    /// At most this many instances of a service start at once (rolling starts of replicas).
    pub max_starting: usize,
    /// How long a starting instance has to become ready (replicas, health checks) before the
    /// start fails and the switch is rolled back.
    pub start_timeout: Duration,
    /// The command that installs an OS version (given as `FLEETDELTA_OS_VERSION`); it may
    /// reboot the device. Without one, the version is only recorded.
    pub os_update_command: Option<Vec<String>>,
    /// The command `agent reboot` runs once every lock is held and every instance stopped.
    pub reboot_command: Vec<String>,
    /// The command `agent shutdown` runs likewise.
    pub shutdown_command: Vec<String>,
    /// The builder service to ask for deltas first (as `pull --service` does).
    pub service: Option<fleetdelta_pull::ServiceOptions>,
    /// While waiting for locks, how often the target is read again: a newer release there
    /// supersedes the update that waits (`None`: never).
    pub recheck: Option<Duration>,
    /// Test hook: exit the process with [`CRASH_EXIT_CODE`], without any cleanup, right after
    /// doing this step and before journaling it done. `SERVICE:STEP` or `STEP` (step names as
    /// [`Step::as_str`](crate::Step::as_str)), or `begin` (plan journaled), `commit-release` (installed services
    /// recorded, before pruning).
    pub crash_after: Option<String>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            facts: None,
            allow_full: true,
            stagger: Duration::from_secs(1),
            stop_timeout: Duration::from_secs(10),
            lock_timeout: None,
            poll: Duration::from_millis(200),
            max_starting: 4,
            start_timeout: Duration::from_secs(120),
            os_update_command: None,
            reboot_command: vec!["systemctl".into(), "reboot".into()],
            shutdown_command: vec!["systemctl".into(), "poweroff".into()],
            recheck: Some(Duration::from_secs(60)),
            service: None,
            crash_after: None,
        }
    }
}
