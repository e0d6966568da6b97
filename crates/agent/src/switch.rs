//! Switching a service to its target instance, step by step under its lock, and rolling it
//! back to the instance it ran when a step fails; starting and stopping replicas.

use std::collections::BTreeMap;
use std::fs;
use std::time::{Duration, Instant};

use crate::api;
use crate::error::{AgentError, Result};
use crate::journal::{Journal, Record};
use crate::lock::{self, ServiceLock};
use crate::plan::ServicePlan;
use crate::runtime::{self, replicas, InstanceStatus, Launch, Readiness, Runtime};
use crate::state::{Installed, InstanceRecord};
use crate::strategy::{Step, Strategy};
use crate::{Agent, Run, BALENA_HANDOVER_FILE};

/// How many threads stop a service's replicas.
pub(crate) const STOP_THREADS: usize = 16;

/// Whether the switch of `service` had begun by the journal's counts (`done` steps, the
/// step `begun`): its lock was granted then, and it goes on without waiting again.
pub(crate) fn switch_under_way(service: &ServicePlan, done: &BTreeMap<String, usize>, begun: &BTreeMap<String, usize>) -> bool {
    done.get(&service.service).copied().unwrap_or(0) > service.switch_at || begun.get(&service.service).is_some_and(|i| *i >= service.switch_at)
}

/// Whether every instance (replica) of `record` runs.
pub(crate) fn all_running(runtime: &dyn Runtime, service: &str, record: &InstanceRecord) -> Result<bool> {
    for instance in runtime::instance_keys(record) {
        if runtime.status(service, &instance)? == InstanceStatus::Stopped {
            return Ok(false);
        }
    }
    Ok(true)
}

impl Agent<'_> {
    /// Switches every service that has a switch, each as soon as its lock is free (or it said
    /// go-ahead). Returns whether all are done; `false` when the lock timeout passed first.
    pub(crate) fn switch_all(&mut self, journal: &mut Journal, run: &mut Run) -> Result<bool> {
        let started = Instant::now();
        let plan = run.plan;
        loop {
            let pending: Vec<&ServicePlan> = run.pending().collect();
            if pending.is_empty() {
                return Ok(true);
            }
            // Each unit switches as a whole: one service, or a group a release variable couples.
            let mut units: Vec<Vec<&ServicePlan>> = Vec::new();
            for service in pending {
                let group = plan.groups.iter().find(|g| g.contains(&service.service));
                match group.and_then(|g| units.iter_mut().find(|u| u.iter().any(|m| g.contains(&m.service)))) {
                    Some(unit) => unit.push(service),
                    None => units.push(vec![service]),
                }
            }
            for unit in units {
                let mut locks = Vec::new();
                let mut blocked = Vec::new();
                let mut under_way = false;
                for service in &unit {
                    let name = service.service.as_str();
                    // A switch begun before a crash was granted then: it goes on without waiting.
                    under_way |= switch_under_way(service, &run.done, &run.begun);
                    let lock = ServiceLock::try_acquire(&self.state, name)?;
                    let (go_ahead, deferred) = {
                        let requests = api::lock(&self.requests);
                        (requests.go_ahead(name), requests.deferred_until(name).is_some())
                    };
                    if !(go_ahead || (lock.is_some() && !deferred)) {
                        blocked.push(*service);
                    }
                    locks.extend(lock);
                }
                if !under_way && !blocked.is_empty() {
                    // Nothing of the unit switches: its members whose locks are free are not
                    // held back by the agent, and those it waits for are told why.
                    drop(locks);
                    for service in unit {
                        let name = service.service.as_str();
                        if blocked.iter().any(|b| b.service == name) {
                            let request = lock::write_request(&self.state, name, service.reason, &run.plan.target_release)?;
                            if !run.waiting.contains(name) {
                                tracing::info!(service = name, reason = service.reason.as_str(), since = %request.since, release = %run.plan.target_release, "waits for its lock");
                            }
                            api::lock(&self.requests).waiting.insert(name.to_string(), request);
                        } else if !run.waiting.contains(name) {
                            tracing::info!(service = name, release = %run.plan.target_release, "waits for the services its change is coupled with");
                        }
                        run.waiting.insert(name.to_string());
                    }
                    continue;
                }
                for service in unit {
                    let name = service.service.as_str();
                    lock::remove_request(&self.state, name)?;
                    api::lock(&self.requests).waiting.remove(name);
                    run.waiting.remove(name);
                    let done = run.done.get(name).copied().unwrap_or(0);
                    tracing::info!(service = name, release = %run.plan.target_release, "switching");
                    for index in done.max(service.switch_at)..service.steps.len() {
                        if let Err(e) = self.run_step(journal, run, service, index) {
                            self.roll_back(journal, run, service, &e.to_string())?;
                            break;
                        }
                    }
                    if !run.rolled_back.contains_key(name) {
                        tracing::info!(service = name, release = %run.plan.target_release, "switched");
                    }
                    api::lock(&self.requests).take_go_ahead(name);
                }
                drop(locks);
            }
            if run.waiting.is_empty() {
                continue;
            }
            if self.options.lock_timeout.is_some_and(|t| started.elapsed() >= t) || self.target_moved(&plan.target_release) {
                self.withdraw_requests(run)?;
                return Ok(false);
            }
            self.serve_actions(&run.changing());
            std::thread::sleep(self.options.poll);
        }
    }

    /// Removes the requests of services still waiting: this run no longer waits for them.
    pub(crate) fn withdraw_requests(&mut self, run: &Run) -> Result<()> {
        for name in &run.waiting {
            lock::remove_request(&self.state, name)?;
            api::lock(&self.requests).waiting.remove(name);
        }
        Ok(())
    }

    /// Journals and does one step of a service.
    pub(crate) fn run_step(&mut self, journal: &mut Journal, run: &mut Run, service: &ServicePlan, index: usize) -> Result<()> {
        let step = service.steps[index];
        let name = service.service.as_str();
        journal.append(&Record::Begun { service: name.into(), index, step })?;
        run.begun.insert(name.into(), index);
        self.do_step(run, service, step)?;
        self.crash_point(&format!("{name}:{}", step.as_str()));
        journal.append(&Record::Done { service: name.into(), index })?;
        run.begun.remove(name);
        run.done.insert(name.into(), index + 1);
        Ok(())
    }

    pub(crate) fn do_step(&mut self, run: &mut Run, service: &ServicePlan, step: Step) -> Result<()> {
        let name = service.service.as_str();
        let missing = || AgentError::State { path: self.state.journal_file(), reason: format!("step {} of {name} has no instance", step.as_str()) };
        match step {
            Step::Fetch => {
                let to = service.to.as_ref().ok_or_else(missing)?;
                let how = self.runtime.fetch(self.transfer, service.from.as_ref(), to, &self.pull_options(self.options.allow_full), self.progress)?;
                tracing::info!(service = name, image = %to.image, how = %how, "fetched");
                run.fetched.insert(name.into(), how);
            }
            Step::Unpack => {
                let to = service.to.as_ref().ok_or_else(missing)?;
                self.runtime.prepare(name, to)?;
            }
            Step::StopOld => {
                if let Some(from) = &service.from {
                    self.stop(name, from)?;
                }
            }
            Step::DeleteOld => {
                if let (Some(from), Some(to)) = (&service.from, &service.to) {
                    self.runtime.discard(name, from, to)?;
                }
            }
            Step::StartNew => {
                let to = service.to.as_ref().ok_or_else(missing)?;
                let handover = service.strategy == Strategy::HandOver && service.from.is_some();
                if handover {
                    for file in self.handover_files(name, to) {
                        let _ = fs::remove_file(file);
                    }
                    let _ = fs::remove_file(self.state.balena_dir(name).join(BALENA_HANDOVER_FILE));
                }
                self.start(name, to, handover, true)?;
            }
            Step::AwaitHandover => {
                let to = service.to.as_ref().ok_or_else(missing)?;
                // Every new instance's (each replica's) file, or balena's
                // `/tmp/balena/handover-complete`.
                let files = self.handover_files(name, to);
                let balena = self.state.balena_dir(name).join(BALENA_HANDOVER_FILE);
                let deadline = Instant::now() + Strategy::handover_timeout(&to.labels);
                while !(files.iter().all(|f| f.exists()) || balena.exists()) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                for file in files.iter().chain([&balena]) {
                    let _ = fs::remove_file(file);
                }
            }
            Step::Commit => {
                let mut installed = Installed::load(&self.state)?;
                match &service.to {
                    Some(to) => installed.services.insert(name.into(), to.clone()),
                    None => installed.services.remove(name),
                };
                installed.save(&self.state)?;
            }
        }
        Ok(())
    }

    /// Puts a service back on the instance it ran: stops the new one if it was started and
    /// starts the old one (unpacking it again if delete-then-download removed it).
    pub(crate) fn roll_back(&mut self, journal: &mut Journal, run: &mut Run, service: &ServicePlan, reason: &str) -> Result<()> {
        let name = service.service.as_str();
        tracing::warn!(service = name, reason, "rolled back to the instance it ran");
        journal.append(&Record::RolledBack { service: name.into(), reason: reason.into() })?;
        run.begun.remove(name);
        run.rolled_back.insert(name.into(), reason.into());
        if let Some(to) = &service.to {
            self.stop(name, to)?;
        }
        if let Some(from) = &service.from {
            self.start(name, from, false, false)?;
        }
        Ok(())
    }

    /// Starts an instance, no sooner than `stagger` after the previous start. Its image is
    /// fetched and prepared again first when the device lost it (a rollback after
    /// `delete-then-download`, a store damaged by a power cut); that costs nothing otherwise.
    /// Such an image is downloaded whole if need be, even where full downloads are not
    /// allowed: it restores a service the device ran, it is no update.
    ///
    /// With `gate` (the start of a new instance in a switch), a service with replicas is
    /// started rolling: at most [`AgentOptions::max_starting`] replicas start at once, and
    /// each further start waits until one of them is ready (running, and healthy when it has
    /// a health check). So does the end of the start of a service with replicas or a health
    /// check: an instance that fails, or is not ready within [`AgentOptions::start_timeout`]
    /// of its own start, fails the start (and the switch is rolled back). Without it (a rollback to what ran,
    /// instances that stopped), instances are started one after the other without waiting:
    /// they ran before, and a slow start must not fail the recovery.
    pub(crate) fn start(&mut self, service: &str, record: &InstanceRecord, handover: bool, gate: bool) -> Result<()> {
        if all_running(self.runtime.as_ref(), service, record)? {
            return Ok(());
        }
        self.state.prepare_service(service)?;
        self.runtime.fetch(self.transfer, None, record, &self.pull_options(true), self.progress)?;
        self.runtime.prepare(service, record)?;
        let gated = gate && (record.run.replica_count() > 1 || record.run.healthcheck.is_some());
        // Each starting instance with the time it must be ready by.
        let mut starting: Vec<(String, Instant)> = Vec::new();
        for replica in replicas(record) {
            let launch = Launch { service, record, handover, replica };
            let instance = launch.instance();
            if let InstanceStatus::Running { .. } = self.runtime.status(service, &instance)? {
                continue;
            }
            if gated {
                self.await_ready(service, &mut starting, self.options.max_starting.max(1) - 1)?;
            }
            if let Some(last) = self.last_start {
                let wait = self.options.stagger.saturating_sub(last.elapsed());
                std::thread::sleep(wait);
            }
            self.runtime.start(&launch)?;
            self.last_start = Some(Instant::now());
            starting.push((instance, Instant::now() + self.options.start_timeout));
        }
        if gated {
            self.await_ready(service, &mut starting, 0)?;
        }
        Ok(())
    }

    /// Waits until at most `at_most` of `starting` are not ready yet, removing the ready
    /// ones; fails on an instance that failed, or that is not ready by its deadline.
    pub(crate) fn await_ready(&mut self, service: &str, starting: &mut Vec<(String, Instant)>, at_most: usize) -> Result<()> {
        loop {
            let mut failed = None;
            let mut still = Vec::with_capacity(starting.len());
            for (instance, deadline) in starting.drain(..) {
                match self.runtime.readiness(service, &instance)? {
                    Readiness::Ready => {}
                    Readiness::Starting => still.push((instance, deadline)),
                    Readiness::Failed => failed = Some(instance),
                }
            }
            *starting = still;
            if let Some(instance) = failed {
                return Err(AgentError::Runtime {
                    service: service.into(),
                    reason: format!("instance {instance} stopped or failed its health check while starting"),
                });
            }
            if starting.len() <= at_most {
                return Ok(());
            }
            let now = Instant::now();
            let late: Vec<&str> = starting.iter().filter(|(_, d)| *d <= now).map(|(i, _)| i.as_str()).collect();
            if !late.is_empty() {
                let reason = format!("{} instance(s) not ready {} s after their start: {}", late.len(), self.options.start_timeout.as_secs(), late.join(", "));
                return Err(AgentError::Runtime { service: service.into(), reason });
            }
            std::thread::sleep(self.options.poll);
        }
    }

    /// The hand-over files of every instance (replica) of `record`.
    pub(crate) fn handover_files(&self, service: &str, record: &InstanceRecord) -> Vec<std::path::PathBuf> {
        runtime::instance_keys(record).iter().map(|i| self.state.handover_file(service, i)).collect()
    }

    /// Stops every replica of `record`, several at once.
    pub(crate) fn stop(&self, service: &str, record: &InstanceRecord) -> Result<()> {
        let instances = runtime::instance_keys(record);
        let (runtime, timeout) = (self.runtime.as_ref(), self.options.stop_timeout);
        let per_thread = instances.len().div_ceil(STOP_THREADS).max(1);
        std::thread::scope(|s| {
            let stops: Vec<_> =
                instances.chunks(per_thread).map(|chunk| s.spawn(move || chunk.iter().try_for_each(|i| runtime.stop(service, i, timeout)))).collect();
            stops
                .into_iter()
                .try_for_each(|t| t.join().unwrap_or_else(|_| Err(AgentError::Runtime { service: service.into(), reason: "a stop panicked".into() })))
        })
    }
}
