//! The device agent: updates a device from the release it runs to a target release, one
//! service at a time, each under its own lock. See `docs/agent.md` for the state directory,
//! the lock protocol for service authors, and the journal's recovery rules.
//!
//! An update ([`Agent::update`]) goes:
//! 1. fetch the target release (file or URL) and plan against what the device runs, contracts
//!    checked against the device facts ([`plan::plan_update`]); nothing is touched before this;
//! 2. journal the plan, then the steps of every service that run while the old instances keep
//!    running: downloads (a delta when the registry has one) and unpacking;
//! 3. switch each service under its lock, in release order. A service whose lock is held gets
//!    a `release-request` and waits; the others go on. A service may say go-ahead or defer
//!    through the local API ([`api`]). Starts are staggered;
//! 4. install the OS when the release asks for another one, once every lock is free;
//! 5. commit: record the release, then remove images and root filesystems nothing uses.
//!
//! Every step is journaled before it is done ([`journal`]). A rerun after a crash resumes the
//! journaled update: steps done are skipped, the step that was under way is done again (each
//! is idempotent), and a switch that had begun goes on without waiting for its lock again (it
//! was granted). A step that fails during a switch rolls the service back to the instance it
//! ran, whose image stays in the store until the update commits.
//!
//! Where each part lives: the orchestration (open, update, resume, commit) here; switching a
//! service and rolling it back in `switch.rs`; the OS update in `os_update.rs`; options,
//! reports and `agent status` in `options.rs`, `report.rs` and `status.rs`; operator actions
//! in [`action`]; the runtimes in [`runtime`], [`engine_runtime`] and [`process`].
#![deny(missing_docs)]

pub mod action;
pub mod api;
pub mod engine_runtime;
pub mod error;
pub mod journal;
pub mod lock;
mod options;
mod os_update;
pub mod plan;
pub mod process;
mod report;
pub mod rootfs;
pub mod runtime;
pub mod state;
mod status;
pub mod store;
pub mod strategy;
mod switch;
pub mod target;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::time::Instant;

pub use action::{ActionReport, DeviceAction};
pub use api::{ApiRequest, ApiServer};
pub use engine_runtime::EngineRuntime;
pub use error::{AgentError, Result};
pub use lock::{Reason, ReleaseRequest, ServiceLock};
pub use options::{AgentOptions, BALENA_HANDOVER_FILE, CRASH_EXIT_CODE};
pub use plan::{plan_update, ServicePlan, UpdatePlan};
pub use process::{InstanceSpec, ProcessRuntime};
pub use report::{Outcome, ServiceReport, UpdateReport};
pub use runtime::{replicas, Fetched, InstanceStatus, Launch, Readiness, Runtime};
pub use state::{Installed, InstanceRecord, StateDir};
pub use status::{agent_running, current_release, status, AgentStatus};
pub use strategy::{Step, Strategy, UpdateKind};

use api::SharedRequests;
use fleetdelta_engine::error::IoContext;
use fleetdelta_engine::progress::Progress;
use fleetdelta_engine::transfer::Transfer;
use journal::{Journal, Record, Replay, OS_UPDATE};
use switch::{all_running, switch_under_way};

/// The device agent on one state directory. Only one agent runs per state directory.
pub struct Agent<'a> {
    state: StateDir,
    transfer: &'a Transfer,
    runtime: Box<dyn Runtime + 'a>,
    options: AgentOptions,
    requests: SharedRequests,
    progress: &'a dyn Progress,
    last_start: Option<Instant>,
    /// The target being applied, and when it was last read (see [`AgentOptions::recheck`]).
    target: Option<(String, Instant)>,
    /// Set when a newer target was found while waiting: the update in hand stops there.
    moved: bool,
    /// Set once a reboot or shutdown command ran: nothing is started or updated any more.
    pub(crate) powering_down: Option<&'static str>,
    _api: ApiServer,
    _control: ApiServer,
    _lock: File,
}

impl std::fmt::Debug for Agent<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("state", &self.state).field("runtime", &self.runtime).field("options", &self.options).finish_non_exhaustive()
    }
}

/// Per-update bookkeeping of an execution.
struct Run<'p> {
    plan: &'p UpdatePlan,
    done: BTreeMap<String, usize>,
    begun: BTreeMap<String, usize>,
    rolled_back: BTreeMap<String, String>,
    fetched: BTreeMap<String, Fetched>,
    waiting: BTreeSet<String>,
}

impl<'p> Run<'p> {
    /// The services whose switch is still to do (not done nor rolled back).
    pub(crate) fn pending(&self) -> impl Iterator<Item = &'p ServicePlan> + '_ {
        self.plan
            .services
            .iter()
            .filter(|s| s.switches() && !self.rolled_back.contains_key(&s.service) && self.done.get(&s.service).copied().unwrap_or(0) < s.steps.len())
    }

    /// The names of [`Run::pending`]: the services this update still changes.
    pub(crate) fn changing(&self) -> BTreeSet<String> {
        self.pending().map(|s| s.service.clone()).collect()
    }

    /// The bookkeeping of `plan` as the journal left it.
    pub(crate) fn resume(plan: &'p UpdatePlan, replay: &Replay) -> Self {
        Run {
            plan,
            done: replay.done.clone(),
            begun: replay.begun.clone(),
            rolled_back: replay.rolled_back.iter().map(|s| (s.clone(), "rolled back before the agent restarted".to_string())).collect(),
            fetched: BTreeMap::new(),
            waiting: BTreeSet::new(),
        }
    }
}

impl<'a> Agent<'a> {
    /// Opens the state directory, takes the agent lock and starts the local API.
    pub fn open(state: StateDir, transfer: &'a Transfer, runtime: Box<dyn Runtime + 'a>, options: AgentOptions, progress: &'a dyn Progress) -> Result<Self> {
        let lock_path = state.agent_lock();
        let lock = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).ctx(|| format!("opening {}", lock_path.display()))?;
        if lock.try_lock().is_err() {
            return Err(AgentError::Busy { state: state.root().to_path_buf() });
        }
        let requests = SharedRequests::default();
        api::lock(&requests).services = Installed::load(&state)?.services.into_keys().collect();
        let api = ApiServer::start(&state.socket(), requests.clone(), api::Access::Services)?;
        let control = ApiServer::start(&state.control_socket(), requests.clone(), api::Access::Control)?;
        Ok(Agent {
            state,
            transfer,
            runtime,
            options,
            requests,
            progress,
            last_start: None,
            target: None,
            moved: false,
            powering_down: None,
            _api: api,
            _control: control,
            _lock: lock,
        })
    }

    /// The state directory.
    pub fn state(&self) -> &StateDir {
        &self.state
    }

    /// Updates the device to the release at `target` (a file or URL). An update a crash
    /// interrupted is finished first.
    pub fn update(&mut self, target: &str) -> Result<UpdateReport> {
        if let Some(action) = self.powering_down {
            return Err(AgentError::Action { action: "update".into(), reason: format!("the device is going down ({action})") });
        }
        loop {
            self.moved = false;
            self.target = Some((target.to_string(), Instant::now()));
            let report = self.update_once(target)?;
            // A newer release appeared while a lock was awaited: go on with it.
            if !self.moved {
                return Ok(report);
            }
        }
    }

    /// Whether the target now names another release than `current` (read at most once per
    /// [`AgentOptions::recheck`]; a target that cannot be read now is no news).
    fn target_moved(&mut self, current: &str) -> bool {
        let (Some(every), Some((source, last))) = (self.options.recheck, self.target.as_mut()) else { return false };
        if last.elapsed() < every {
            return false;
        }
        *last = Instant::now();
        let moved = target::load_target(self.transfer, source).is_ok_and(|(release, _)| release.id != current);
        self.moved |= moved;
        moved
    }

    fn update_once(&mut self, target: &str) -> Result<UpdateReport> {
        let (release, text) = target::load_target(self.transfer, target)?;
        let (mut journal, replay) = Journal::open(&self.state.journal_file())?;
        let mut resumed = None;
        if let Some(plan) = replay.plan.clone() {
            if plan.target_release == release.id {
                let report = self.execute(&mut journal, &plan, &replay)?;
                return Ok(UpdateReport { resumed: Some(plan.target_release.clone()), ..report });
            }
            // A newer target: what the old update began is finished, the rest of it is
            // planned anew against the newer target, so that a service waiting for its lock
            // holds back neither the others nor later releases.
            self.supersede(&mut journal, &plan, &replay, &release.id)?;
            resumed = Some(plan.target_release.clone());
        }
        let installed = Installed::load(&self.state)?;
        let plan = plan_update(self.transfer, &self.state, &installed, &release, self.options.facts.as_ref())?;
        let nothing_to_do = plan.os_update.is_none()
            && installed.release.as_deref() == Some(release.id.as_str())
            && plan.services.iter().all(|s| s.kind == UpdateKind::Nothing);
        if nothing_to_do {
            let restarted = self.reconcile(&Replay::default())?;
            let services = plan.services.iter().map(|s| self.service_report(s, Outcome::Unchanged, None)).collect();
            return Ok(UpdateReport {
                from_release: installed.release,
                target_release: release.id,
                resumed,
                services,
                complete: true,
                restarted,
                os_updated: None,
            });
        }
        for s in plan.services.iter().filter(|s| !s.steps.is_empty()) {
            tracing::info!(service = %s.service, change = %s.change, kind = ?s.kind, strategy = ?s.strategy, release = %plan.target_release, "planned");
        }
        state::write_file(&self.state.target_file(), text.as_bytes())?;
        journal.append(&Record::Begin { plan: plan.clone() })?;
        self.crash_point("begin");
        let report = self.execute(&mut journal, &plan, &Replay { plan: Some(plan.clone()), ..Replay::default() })?;
        Ok(UpdateReport { resumed, ..report })
    }

    /// Ends the unfinished update `plan` for a newer target: switches under way (granted their
    /// lock before a crash) are finished or rolled back, the requests of services that waited
    /// are withdrawn, and the update is journaled superseded and ended. Nothing else of it is
    /// done: downloads it made stay in the store until the next commit prunes them.
    fn supersede(&mut self, journal: &mut Journal, plan: &UpdatePlan, replay: &Replay, by: &str) -> Result<()> {
        self.reconcile(replay)?;
        let mut run = Run::resume(plan, replay);
        for service in &plan.services {
            let name = service.service.as_str();
            let done = run.done.get(name).copied().unwrap_or(0);
            if !service.switches() || run.rolled_back.contains_key(name) || done >= service.steps.len() || !switch_under_way(service, &run.done, &run.begun) {
                continue;
            }
            for index in done..service.steps.len() {
                if let Err(e) = self.run_step(journal, &mut run, service, index) {
                    self.roll_back(journal, &mut run, service, &e.to_string())?;
                    break;
                }
            }
        }
        for service in &plan.services {
            lock::remove_request(&self.state, &service.service)?;
            api::lock(&self.requests).waiting.remove(&service.service);
        }
        tracing::info!(release = %plan.target_release, by, "superseded by a newer target");
        journal.append(&Record::Superseded { by: by.to_string() })?;
        self.crash_point("superseded");
        journal.append(&Record::End)?;
        journal.clear()
    }

    /// Starts every installed instance that does not run, except those of services whose
    /// switch is under way (the update goes on with them) and those the operator stopped
    /// (stopped again if they run). Returns the services started.
    pub fn reconcile(&mut self, replay: &Replay) -> Result<Vec<String>> {
        let installed = Installed::load(&self.state)?;
        let mut started = Vec::new();
        for (service, record) in &installed.services {
            let switching = replay
                .plan
                .as_ref()
                .and_then(|p| p.services.iter().find(|s| &s.service == service))
                .is_some_and(|sp| switch_under_way(sp, &replay.done, &replay.begun));
            if switching {
                continue;
            }
            if installed.stopped.contains(service) {
                // Kept stopped, even where the engine restarted it (its restart policy).
                self.stop(service, record)?;
                continue;
            }
            if !all_running(self.runtime.as_ref(), service, record)? {
                self.start(service, record, false, false)?;
                started.push(service.clone());
            }
        }
        Ok(started)
    }

    fn execute(&mut self, journal: &mut Journal, plan: &UpdatePlan, replay: &Replay) -> Result<UpdateReport> {
        let installed = Installed::load(&self.state)?;
        {
            let mut requests = api::lock(&self.requests);
            requests.target_release = Some(plan.target_release.clone());
            requests.services = installed.services.into_keys().chain(plan.services.iter().map(|s| s.service.clone())).collect();
        }
        let restarted = self.reconcile(replay)?;
        let mut run = Run::resume(plan, replay);
        for service in &plan.services {
            if run.rolled_back.contains_key(&service.service) {
                continue;
            }
            let done = run.done.get(&service.service).copied().unwrap_or(0);
            for index in done..service.switch_at {
                if let Err(e) = self.run_step(journal, &mut run, service, index) {
                    self.roll_back(journal, &mut run, service, &e.to_string())?;
                    break;
                }
            }
        }
        let complete_switches = self.switch_all(journal, &mut run)?;
        let os_updated = match (&plan.os_update, complete_switches) {
            (Some(version), true) if run.done.get(OS_UPDATE).copied().unwrap_or(0) == 0 => self.update_os(journal, &mut run, version)?,
            (Some(version), true) => Some(version.clone()),
            _ => None,
        };
        let complete = complete_switches && (plan.os_update.is_none() || os_updated.is_some());
        if complete {
            self.finish(journal, &run)?;
        }
        // Whatever the crash interrupted (a switch committed just before a power cut, say),
        // every installed instance runs when the agent is done with the update.
        let mut restarted = restarted;
        restarted.extend(self.reconcile(&Replay::default())?);
        let services = plan
            .services
            .iter()
            .map(|s| {
                let outcome = if let Some(reason) = run.rolled_back.get(&s.service) {
                    Outcome::RolledBack { reason: reason.clone() }
                } else if run.waiting.contains(&s.service) {
                    Outcome::Waiting
                } else if s.steps.is_empty() {
                    Outcome::Unchanged
                } else {
                    Outcome::Updated
                };
                self.service_report(s, outcome, run.fetched.get(&s.service).cloned())
            })
            .collect();
        Ok(UpdateReport {
            from_release: plan.from_release.clone(),
            target_release: plan.target_release.clone(),
            resumed: None,
            services,
            os_updated,
            complete: complete && run.rolled_back.is_empty(),
            restarted,
        })
    }

    pub(crate) fn service_report(&self, s: &ServicePlan, outcome: Outcome, fetched: Option<Fetched>) -> ServiceReport {
        ServiceReport { service: s.service.clone(), change: s.change.clone(), kind: s.kind, strategy: s.strategy, outcome, fetched }
    }

    /// Records the release, removes what nothing uses, and closes the journal.
    pub(crate) fn finish(&mut self, journal: &mut Journal, run: &Run) -> Result<()> {
        let mut installed = Installed::load(&self.state)?;
        for service in &run.plan.services {
            if run.rolled_back.contains_key(&service.service) {
                continue;
            }
            // A service an update replaced or removed runs (or is gone): a stop ends there.
            if service.switches() {
                installed.stopped.remove(&service.service);
            }
            match &service.to {
                // Unchanged services take the target's labels and release id without a switch.
                Some(to) => installed.services.insert(service.service.clone(), to.clone()),
                None => installed.services.remove(&service.service),
            };
        }
        if run.rolled_back.is_empty() {
            installed.release = Some(run.plan.target_release.clone());
        }
        installed.save(&self.state)?;
        if run.rolled_back.is_empty() && self.state.target_file().exists() {
            fs::rename(self.state.target_file(), self.state.release_file()).ctx(|| "recording the release".into())?;
            state::sync_parent(&self.state.release_file())?;
        }
        self.crash_point("commit-release");
        for service in &run.plan.services {
            if !installed.services.contains_key(&service.service) {
                for instance in service.from.iter().map(InstanceRecord::instance_id) {
                    let _ = fs::remove_file(self.state.instances_dir(&service.service).join(format!("{instance}.log")));
                }
            }
            lock::remove_request(&self.state, &service.service)?;
        }
        // Pruning is cleanup after the commit: whatever it meets, the journal is closed, or
        // every later run would replay this update and fail here again.
        let pruned = self.runtime.prune(&installed);
        journal.append(&Record::End)?;
        journal.clear()?;
        pruned
    }

    /// How images are pulled: full downloads allowed or not, through the builder service.
    pub(crate) fn pull_options(&self, allow_full: bool) -> fleetdelta_pull::PullOptions {
        fleetdelta_pull::PullOptions { allow_full, service: self.options.service.clone(), ..fleetdelta_pull::PullOptions::default() }
    }

    pub(crate) fn crash_point(&self, point: &str) {
        let hit = self.options.crash_after.as_deref().is_some_and(|c| c == point || point.split_once(':').is_some_and(|(_, step)| step == c));
        if hit {
            eprintln!("fleetdelta: crash injected after {point}");
            std::process::exit(CRASH_EXIT_CODE);
        }
    }
}
