//! The operator's actions on a device, under the services' update locks: restart, stop or
//! start one service, reboot or shut down the device.
//!
//! | action | locks | then |
//! |---|---|---|
//! | `restart S` | S's (reason `restart`) | S's instances stop and start again |
//! | `stop S` | S's (reason `stop`) | S's instances stop; the agent keeps them stopped |
//! | `start S` | none (nothing runs to disturb) | S's instances start |
//! | `reboot` | every service's (reason `reboot`) | every instance stops, the reboot command runs |
//! | `shutdown` | every service's (reason `shutdown`) | every instance stops, the shutdown command runs |
//!
//! An action waits for its locks as an update does: the holders get a `release-request`
//! saying why, a service that said go-ahead is not waited for, and the locks of a reboot are
//! taken all at once. `force` takes no lock at all. A held lock blocks only the actions that
//! need it: restarting B while A is locked goes ahead.
//!
//! A stopped service stays stopped, across agent restarts and updates that leave it
//! unchanged, until `start` or `restart`, or an update that replaces it.
//!
//! With an agent running on the state directory, actions go to it through its control socket
//! ([`super::api`]) and it does them between the polls of whatever it waits for; without
//! one, the caller opens the agent and does them itself ([`super::Agent::act`]).

use std::collections::BTreeSet;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::error::AgentError;
use super::lock::{self, Reason};
use super::state::Installed;
use super::{api, Agent};
use crate::error::Result;

/// An operator's action on the device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DeviceAction {
    /// Stop and start a service's instances.
    Restart {
        /// The service.
        service: String,
    },
    /// Stop a service's instances, and keep them stopped.
    Stop {
        /// The service.
        service: String,
    },
    /// Start a stopped service's instances.
    Start {
        /// The service.
        service: String,
    },
    /// Stop every instance and reboot the device.
    Reboot,
    /// Stop every instance and shut the device down.
    Shutdown,
}

impl DeviceAction {
    /// The action's name: `restart`, `stop`, `start`, `reboot` or `shutdown`.
    pub fn name(&self) -> &'static str {
        match self {
            DeviceAction::Restart { .. } => "restart",
            DeviceAction::Stop { .. } => "stop",
            DeviceAction::Start { .. } => "start",
            DeviceAction::Reboot => "reboot",
            DeviceAction::Shutdown => "shutdown",
        }
    }

    /// Why the action waits for locks; `None` when it takes none (`start`).
    pub fn reason(&self) -> Option<Reason> {
        match self {
            DeviceAction::Restart { .. } => Some(Reason::Restart),
            DeviceAction::Stop { .. } => Some(Reason::Stop),
            DeviceAction::Start { .. } => None,
            DeviceAction::Reboot => Some(Reason::Reboot),
            DeviceAction::Shutdown => Some(Reason::Shutdown),
        }
    }

    /// The one service it acts on, for the service actions.
    pub fn service(&self) -> Option<&str> {
        match self {
            DeviceAction::Restart { service } | DeviceAction::Stop { service } | DeviceAction::Start { service } => Some(service),
            DeviceAction::Reboot | DeviceAction::Shutdown => None,
        }
    }
}

impl std::fmt::Display for DeviceAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.service() {
            Some(service) => write!(f, "{} {service}", self.name()),
            None => f.write_str(self.name()),
        }
    }
}

/// What an action did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActionReport {
    /// The action, as `restart api`, `reboot`…
    pub action: String,
    /// The services whose instances it stopped or started.
    pub services: Vec<String>,
    /// Whether it went ahead without the locks (`force`).
    pub forced: bool,
    /// Seconds it waited for locks.
    pub waited_seconds: f64,
    /// The reboot or shutdown command it ran.
    pub command: Option<Vec<String>>,
}

impl Agent<'_> {
    /// Does `action` once its locks are free (or at once with `force`), waiting at most
    /// [`super::AgentOptions::lock_timeout`]: past it, the requests are withdrawn and the error
    /// names the services that hold their locks.
    pub fn act(&mut self, action: &DeviceAction, force: bool) -> Result<ActionReport> {
        let started = Instant::now();
        loop {
            match self.try_act(action, force, started)? {
                Ok(report) => return Ok(report),
                Err(held) => {
                    if self.options.lock_timeout.is_some_and(|t| started.elapsed() >= t) {
                        self.withdraw_action(action)?;
                        return Err(AgentError::Locked { action: action.to_string(), services: held });
                    }
                }
            }
            std::thread::sleep(self.options.poll);
        }
    }

    /// One attempt at `action`: `Ok(Err(held))` when locks it needs are held (their holders
    /// were told why), else the action is done.
    pub(super) fn try_act(&mut self, action: &DeviceAction, force: bool, since: Instant) -> Result<std::result::Result<ActionReport, Vec<String>>> {
        if let Some(going) = self.powering_down {
            return Err(AgentError::Action { action: action.to_string(), reason: format!("the device is going down ({going})") });
        }
        let installed = Installed::load(&self.state)?;
        let services: Vec<String> = match action.service() {
            Some(service) => {
                if !installed.services.contains_key(service) {
                    let known = installed.services.keys().map(String::as_str).collect::<Vec<_>>().join(", ");
                    return Err(AgentError::UnknownService { service: service.to_string(), known });
                }
                vec![service.to_string()]
            }
            None => installed.services.keys().cloned().collect(),
        };
        let mut locks = Vec::new();
        if let (Some(reason), false) = (action.reason(), force) {
            match self.take_all_locks(&services, reason, installed.release.as_deref().unwrap_or_default())? {
                Ok(taken) => locks = taken,
                Err(held) => return Ok(Err(held)),
            }
            self.withdraw_action(action)?;
        }
        tracing::info!(action = %action, forced = force, "acting");
        let mut report = ActionReport {
            action: action.to_string(),
            services: services.clone(),
            forced: force,
            waited_seconds: since.elapsed().as_secs_f64(),
            command: None,
        };
        match action {
            DeviceAction::Restart { service } | DeviceAction::Start { service } => {
                let record = &installed.services[service];
                if matches!(action, DeviceAction::Restart { .. }) {
                    self.stop(service, record)?;
                }
                self.set_stopped(service, false)?;
                self.start(service, record, false, false)?;
            }
            DeviceAction::Stop { service } => {
                // Recorded first: a crash after the stop leaves the service stopped.
                self.set_stopped(service, true)?;
                self.stop(service, &installed.services[service])?;
            }
            DeviceAction::Reboot | DeviceAction::Shutdown => {
                for (service, record) in &installed.services {
                    self.stop(service, record)?;
                }
                let command = if matches!(action, DeviceAction::Reboot) { &self.options.reboot_command } else { &self.options.shutdown_command };
                report.command = Some(command.clone());
                let failed = match std::process::Command::new(&command[0]).args(&command[1..]).status() {
                    Ok(s) if s.success() => None,
                    Ok(s) => Some(format!("{} exited with {s}", command.join(" "))),
                    Err(e) => Some(format!("starting {}: {e}", command.join(" "))),
                };
                if let Some(reason) = failed {
                    // The device stays up: what ran runs again.
                    for (service, record) in installed.services.iter().filter(|(s, _)| !installed.stopped.contains(*s)) {
                        self.start(service, record, false, false)?;
                    }
                    return Err(AgentError::Action { action: action.to_string(), reason });
                }
                self.powering_down = Some(action.name());
            }
        }
        for name in &services {
            api::lock(&self.requests).take_go_ahead(name);
        }
        drop(locks);
        Ok(Ok(report))
    }

    /// Records that the operator stopped a service (or no longer does).
    fn set_stopped(&self, service: &str, stopped: bool) -> Result<()> {
        let mut installed = Installed::load(&self.state)?;
        let changed = if stopped { installed.stopped.insert(service.to_string()) } else { installed.stopped.remove(service) };
        if changed {
            installed.save(&self.state)?;
        }
        Ok(())
    }

    /// Removes the requests an action wrote: it no longer waits.
    pub(super) fn withdraw_action(&mut self, action: &DeviceAction) -> Result<()> {
        let services: Vec<String> = match action.service() {
            Some(s) => vec![s.to_string()],
            None => Installed::load(&self.state)?.services.into_keys().collect(),
        };
        for name in services {
            let ours = lock::read_request(&self.state.request_file(&name)).is_some_and(|r| Some(r.reason) == action.reason());
            if ours {
                lock::remove_request(&self.state, &name)?;
                api::lock(&self.requests).waiting.remove(&name);
            }
        }
        Ok(())
    }

    /// Does the actions queued on the control socket whose locks are free; answers those
    /// done, failed or out of time. Called between the polls of whatever the agent waits for.
    /// An action on a service in `busy` (those the update under way changes) waits until the
    /// update is done with them: it would act on an instance being replaced.
    pub(super) fn serve_actions(&mut self, busy: &BTreeSet<String>) {
        let queued = std::mem::take(&mut api::lock(&self.requests).actions);
        let mut still = Vec::new();
        for pending in queued {
            let blocked: Vec<String> = match pending.action.service() {
                Some(s) => busy.iter().filter(|b| *b == s).cloned().collect(),
                None => busy.iter().cloned().collect(),
            };
            let attempt = if blocked.is_empty() { self.try_act(&pending.action, pending.force, pending.since) } else { Ok(Err(blocked)) };
            let answer = match attempt {
                Ok(Ok(report)) => Some(serde_json::json!({"ok": true, "report": report})),
                Ok(Err(held)) if pending.deadline.is_some_and(|d| Instant::now() >= d) => {
                    let _ = self.withdraw_action(&pending.action);
                    let error = AgentError::Locked { action: pending.action.to_string(), services: held.clone() };
                    Some(serde_json::json!({"ok": false, "locked_services": held, "error": error.to_string()}))
                }
                Ok(Err(_)) => None,
                Err(e) => Some(serde_json::json!({"ok": false, "error": e.to_string()})),
            };
            match answer {
                Some(answer) => {
                    let _ = pending.reply.send(answer);
                }
                None => still.push(pending),
            }
        }
        api::lock(&self.requests).actions.extend(still);
    }

    /// Waits `period`, doing queued actions meanwhile: the agent's rest between two runs.
    pub fn idle(&mut self, period: std::time::Duration) {
        let until = Instant::now() + period;
        loop {
            self.serve_actions(&BTreeSet::new());
            let now = Instant::now();
            if now >= until {
                return;
            }
            std::thread::sleep(self.options.poll.min(until - now));
        }
    }
}
