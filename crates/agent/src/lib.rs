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
#![deny(missing_docs)]

pub mod action;
pub mod api;
pub mod engine_runtime;
pub mod error;
pub mod journal;
pub mod lock;
pub mod plan;
pub mod process;
pub mod rootfs;
pub mod runtime;
pub mod state;
pub mod store;
pub mod strategy;
pub mod target;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;

pub use action::{ActionReport, DeviceAction};
pub use api::{ApiRequest, ApiServer};
pub use engine_runtime::EngineRuntime;
pub use error::{AgentError, Result};
pub use lock::{Reason, ReleaseRequest, ServiceLock};
pub use plan::{plan_update, ServicePlan, UpdatePlan};
pub use process::{InstanceSpec, ProcessRuntime};
pub use runtime::{replicas, Fetched, InstanceStatus, Launch, Readiness, Runtime};
pub use state::{Installed, InstanceRecord, StateDir};
pub use strategy::{Step, Strategy, UpdateKind};

use api::SharedRequests;
use fleetdelta_engine::error::IoContext;
use fleetdelta_engine::progress::Progress;
use fleetdelta_engine::transfer::Transfer;
use fleetdelta_release::{DeviceFacts, Release};
use journal::{Journal, Record, Replay, OS_UPDATE};

/// How many threads stop a service's replicas.
const STOP_THREADS: usize = 16;

/// Whether the switch of `service` had begun by the journal's counts (`done` steps, the
/// step `begun`): its lock was granted then, and it goes on without waiting again.
fn switch_under_way(service: &ServicePlan, done: &BTreeMap<String, usize>, begun: &BTreeMap<String, usize>) -> bool {
    done.get(&service.service).copied().unwrap_or(0) > service.switch_at || begun.get(&service.service).is_some_and(|i| *i >= service.switch_at)
}

/// Whether every instance (replica) of `record` runs.
fn all_running(runtime: &dyn Runtime, service: &str, record: &InstanceRecord) -> Result<bool> {
    for instance in runtime::instance_keys(record) {
        if runtime.status(service, &instance)? == InstanceStatus::Stopped {
            return Ok(false);
        }
    }
    Ok(true)
}

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
    /// [`Step::as_str`]), or `begin` (plan journaled), `commit-release` (installed services
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

/// What [`Agent::update`] did.
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
    fn pending(&self) -> impl Iterator<Item = &'p ServicePlan> + '_ {
        self.plan
            .services
            .iter()
            .filter(|s| s.switches() && !self.rolled_back.contains_key(&s.service) && self.done.get(&s.service).copied().unwrap_or(0) < s.steps.len())
    }

    /// The names of [`Run::pending`]: the services this update still changes.
    fn changing(&self) -> BTreeSet<String> {
        self.pending().map(|s| s.service.clone()).collect()
    }

    /// The bookkeeping of `plan` as the journal left it.
    fn resume(plan: &'p UpdatePlan, replay: &Replay) -> Self {
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

    fn service_report(&self, s: &ServicePlan, outcome: Outcome, fetched: Option<Fetched>) -> ServiceReport {
        ServiceReport { service: s.service.clone(), change: s.change.clone(), kind: s.kind, strategy: s.strategy, outcome, fetched }
    }

    /// Switches every service that has a switch, each as soon as its lock is free (or it said
    /// go-ahead). Returns whether all are done; `false` when the lock timeout passed first.
    fn switch_all(&mut self, journal: &mut Journal, run: &mut Run) -> Result<bool> {
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

    /// Takes the locks of all `services` at once, or none, so that no service is held back
    /// while the agent waits for another; a service that said go-ahead is not waited for.
    /// When some are held, the rest are let go and each holder gets a request saying
    /// `reason` (for `release`): `Ok(Err(holders))`, the holders in `services`' order.
    fn take_all_locks(&mut self, services: &[String], reason: Reason, release: &str) -> Result<std::result::Result<Vec<ServiceLock>, Vec<String>>> {
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

    /// Removes the requests of services still waiting: this run no longer waits for them.
    fn withdraw_requests(&mut self, run: &Run) -> Result<()> {
        for name in &run.waiting {
            lock::remove_request(&self.state, name)?;
            api::lock(&self.requests).waiting.remove(name);
        }
        Ok(())
    }

    /// Installs the OS once every installed service's lock is free (or the service said
    /// go-ahead): the locks are taken all at once, so that no service is held back while the
    /// agent waits for another.
    fn update_os(&mut self, journal: &mut Journal, run: &mut Run, version: &str) -> Result<Option<String>> {
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

    /// Records the release, removes what nothing uses, and closes the journal.
    fn finish(&mut self, journal: &mut Journal, run: &Run) -> Result<()> {
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

    /// Journals and does one step of a service.
    fn run_step(&mut self, journal: &mut Journal, run: &mut Run, service: &ServicePlan, index: usize) -> Result<()> {
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

    fn do_step(&mut self, run: &mut Run, service: &ServicePlan, step: Step) -> Result<()> {
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
    fn roll_back(&mut self, journal: &mut Journal, run: &mut Run, service: &ServicePlan, reason: &str) -> Result<()> {
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
    fn start(&mut self, service: &str, record: &InstanceRecord, handover: bool, gate: bool) -> Result<()> {
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
    fn await_ready(&mut self, service: &str, starting: &mut Vec<(String, Instant)>, at_most: usize) -> Result<()> {
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
    fn handover_files(&self, service: &str, record: &InstanceRecord) -> Vec<std::path::PathBuf> {
        runtime::instance_keys(record).iter().map(|i| self.state.handover_file(service, i)).collect()
    }

    /// How images are pulled: full downloads allowed or not, through the builder service.
    fn pull_options(&self, allow_full: bool) -> fleetdelta_pull::PullOptions {
        fleetdelta_pull::PullOptions { allow_full, service: self.options.service.clone(), ..fleetdelta_pull::PullOptions::default() }
    }

    /// Stops every replica of `record`, several at once.
    fn stop(&self, service: &str, record: &InstanceRecord) -> Result<()> {
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

    fn crash_point(&self, point: &str) {
        let hit = self.options.crash_after.as_deref().is_some_and(|c| c == point || point.split_once(':').is_some_and(|(_, step)| step == c));
        if hit {
            eprintln!("fleetdelta: crash injected after {point}");
            std::process::exit(CRASH_EXIT_CODE);
        }
    }
}

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
