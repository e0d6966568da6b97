//! Exit codes: one per outcome, so that scripts can tell them apart (README's table, and
//! `fleetdelta --help`).

use std::process::ExitCode;

use fleetdelta::agent::AgentError;
use fleetdelta::release::ReleaseError;

/// Done.
pub const SUCCESS: u8 = 0;
/// Failed: the error is on stderr, and nothing was changed.
pub const ERROR: u8 = 1;
/// The command line is wrong (clap's own code).
#[allow(dead_code)] // clap exits with it by itself; named here for the table.
pub const USAGE: u8 = 2;
/// `agent --once`: the update is incomplete because a service's lock is held (or it
/// deferred); the device runs what it ran for those services, and the next run goes on.
/// `agent restart|stop|reboot|shutdown`: `--lock-timeout` passed with a lock still held;
/// nothing was done.
pub const LOCKED: u8 = 3;
/// `agent --once`: a service's update failed and it was rolled back to what it ran.
pub const ROLLED_BACK: u8 = 4;
/// `release-update --wait`/`--timeout`: the deadline passed before every delta was ready.
#[cfg_attr(not(feature = "service"), allow(dead_code))] // release-update's, which a device build lacks
pub const TIMED_OUT: u8 = 5;
/// The target release's contracts are not met by the device (`--device`): nothing changed.
pub const REJECTED: u8 = 6;

/// The table for `--help`.
pub const TABLE: &str = "Exit status:
  0  success
  1  error (stderr says what; nothing was changed)
  2  usage error
  3  agent --once: incomplete, a service's update lock is held (or it deferred);
     agent restart|stop|reboot|shutdown: --lock-timeout passed, a lock is still held
  4  agent --once: a service's update failed and was rolled back
  5  release-update: --timeout passed before every delta was ready
  6  the device does not meet the release's contracts (--device)
  141  stdout closed by its reader (... | head): the work was done, as with SIGPIPE";

/// The code of a failure: [`REJECTED`] for unmet contracts, [`LOCKED`] for an action that
/// gave up waiting for a lock, else [`ERROR`].
pub fn for_error(e: &anyhow::Error) -> ExitCode {
    let rejected = release_errors(e).any(|r| matches!(r, ReleaseError::Rejected { .. }));
    let locked = agent_errors(e).any(|a| matches!(a, AgentError::Locked { .. }));
    ExitCode::from(if rejected {
        REJECTED
    } else if locked {
        LOCKED
    } else {
        ERROR
    })
}

/// What a contract rejection prints on stdout with `--json` (`docs/schemas/rejected.schema.json`):
/// the release and, per service, the contract and its unmet requirements.
pub fn rejection_json(e: &anyhow::Error) -> Option<serde_json::Value> {
    let (release, services) = release_errors(e).find_map(|r| match r {
        ReleaseError::Rejected { release, services } => Some((release, services)),
        _ => None,
    })?;
    let services: Vec<serde_json::Value> = services
        .iter()
        .map(|s| serde_json::json!({"service_name": s.service, "contract": s.contract, "unmet_requirements": s.unmet.iter().map(ToString::to_string).collect::<Vec<_>>()}))
        .collect();
    Some(serde_json::json!({"rejected": {"release": release, "services": services}}))
}

/// The release model's errors in `e`'s chain: as they are, or wrapped whole in the agent's
/// or a release update's error.
fn release_errors(e: &anyhow::Error) -> impl Iterator<Item = &ReleaseError> {
    e.chain().filter_map(|cause| {
        cause.downcast_ref::<ReleaseError>().or_else(|| cause.downcast_ref::<AgentError>().and_then(AgentError::as_release)).or_else(|| in_update_error(cause))
    })
}

#[cfg(feature = "service")]
fn in_update_error<'a>(cause: &'a (dyn std::error::Error + 'static)) -> Option<&'a ReleaseError> {
    cause.downcast_ref::<fleetdelta::release_update::UpdateError>().and_then(|u| u.as_release())
}

#[cfg(not(feature = "service"))]
fn in_update_error<'a>(_: &'a (dyn std::error::Error + 'static)) -> Option<&'a ReleaseError> {
    None
}

fn agent_errors(e: &anyhow::Error) -> impl Iterator<Item = &AgentError> {
    e.chain().filter_map(|cause| cause.downcast_ref::<AgentError>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_in_the_table() {
        let codes = [SUCCESS, ERROR, USAGE, LOCKED, ROLLED_BACK, TIMED_OUT, REJECTED, super::super::output::CLOSED_PIPE_STATUS];
        for (i, a) in codes.iter().enumerate() {
            assert!(codes[i + 1..].iter().all(|b| a != b), "{a} twice");
            assert!(TABLE.contains(&format!("\n  {a}  ")), "{a} is not in the table");
        }
    }
}
