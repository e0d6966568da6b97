//! The host OS update: installed once every service's lock is free, all of them taken first.

use std::process::Command;
use std::time::Instant;

use crate::api;
use crate::error::{AgentError, Result};
use crate::journal::{Journal, Record, OS_UPDATE};
use crate::lock::{self, Reason, ServiceLock};
use crate::state::Installed;
use crate::strategy::Step;
use crate::{Agent, Run};

impl Agent<'_> {
    /// Takes the locks of all `services` at once, or none, so that no service is held back
    /// while the agent waits for another; a service that said go-ahead is not waited for.
    /// When some are held, the rest are let go and each holder gets a request saying
    /// `reason` (for `release`): `Ok(Err(holders))`, the holders in `services`' order.
    pub(crate) fn take_all_locks(&mut self, services: &[String], reason: Reason, release: &str) -> Result<std::result::Result<Vec<ServiceLock>, Vec<String>>> {
        let mut locks = Vec::new();
        let mut held = Vec::new();
        for name in services {
            match ServiceLock::try_acquire(&self.state, name)? {
                Some(lock) => locks.push(lock),
                None if api::lock(&self.requests).go_ahead(name) => {}
                None => held.push(name.clone()),
            }
        }
        if held.is_empty() {
            return Ok(Ok(locks));
        }
        drop(locks);
        for name in &held {
            let request = lock::write_request(&self.state, name, reason, release)?;
            let mut requests = api::lock(&self.requests);
            if !requests.waiting.contains_key(name) {
                tracing::info!(service = %name, reason = reason.as_str(), since = %request.since, "waits for its lock");
            }
            requests.waiting.insert(name.clone(), request);
        }
        Ok(Err(held))
    }

    /// Installs the OS once every installed service's lock is free (or the service said
    /// go-ahead): the locks are taken all at once, so that no service is held back while the
    /// agent waits for another.
    pub(crate) fn update_os(&mut self, journal: &mut Journal, run: &mut Run, version: &str) -> Result<Option<String>> {
        let started = Instant::now();
        let services: Vec<String> = Installed::load(&self.state)?.services.into_keys().collect();
        loop {
            let taken = self.take_all_locks(&services, Reason::OsUpdate, &run.plan.target_release)?;
            run.waiting = taken.as_ref().err().map(|w| w.iter().cloned().collect()).unwrap_or_default();
            if let Ok(held) = taken {
                for name in &services {
                    lock::remove_request(&self.state, name)?;
                    api::lock(&self.requests).waiting.remove(name);
                }
                tracing::info!(version, "installing the OS: every lock is held");
                journal.append(&Record::Begun { service: OS_UPDATE.into(), index: 0, step: Step::Commit })?;
                if let Some(command) = &self.options.os_update_command {
                    let status = Command::new(&command[0]).args(&command[1..]).env("FLEETDELTA_OS_VERSION", version).status();
                    match status {
                        Ok(s) if s.success() => {}
                        Ok(s) => return Err(AgentError::Runtime { service: OS_UPDATE.into(), reason: format!("the OS update command exited with {s}") }),
                        Err(e) => return Err(AgentError::Runtime { service: OS_UPDATE.into(), reason: format!("starting the OS update command: {e}") }),
                    }
                }
                let mut installed = Installed::load(&self.state)?;
                installed.os = Some(version.to_string());
                installed.save(&self.state)?;
                self.crash_point("os-update");
                journal.append(&Record::Done { service: OS_UPDATE.into(), index: 0 })?;
                run.done.insert(OS_UPDATE.into(), 1);
                drop(held);
                return Ok(Some(version.to_string()));
            }
            if self.options.lock_timeout.is_some_and(|t| started.elapsed() >= t) || self.target_moved(&run.plan.target_release) {
                self.withdraw_requests(run)?;
                return Ok(None);
            }
            self.serve_actions(&run.changing());
            std::thread::sleep(self.options.poll);
        }
    }
}
