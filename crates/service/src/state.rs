//! Single flight: one build per image pair, whatever the number of callers.
//!
//! Every pair the service hears of has one `Entry` in a map behind a mutex that is held for
//! map operations only, never across I/O. The first request for a pair (or the first after a
//! failure's backoff has passed) spawns the one task that looks the delta up in the registry
//! and builds it when absent; every other request sees `Working` and is told to come back
//! (202), or waits on the task's completion signal for a bounded time. Builds take a slot of a
//! semaphore, so at most `max_concurrent_builds` run at once, and at most
//! `max_queued_builds` wait. A failure is kept with its reason and the time before which no
//! new attempt starts (exponential backoff), so a broken pair is never rebuilt in a tight loop.
//!
//! With a [`Queue`] (the service's database), single flight spans instances: the task takes
//! the pair's lease before building, renews it while it builds, and records the outcome
//! there; a task that finds the lease held by another instance waits for that outcome (see
//! [`crate::queue`]). A database that cannot be reached makes the pair
//! [`FailureKind::Unavailable`] (HTTP 503) for a short while, never a failure with backoff.

use crate::release_update::UpdateError;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::build::{self, BuildContext};
pub use super::build::{Built, Job, PairId};
use super::config::ServiceConfig;
use super::metrics::Metrics;
use super::queue::{Claim, Queue};
use fleetdelta_engine::digest::Digest;
use fleetdelta_engine::error::Error;
use fleetdelta_engine::registry::{Client, RegistryRef};

/// How a failure is reported: the caller's images are the problem, a registry is, or we are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The pair cannot be built as asked (image missing, too large, malformed): HTTP 422.
    Unprocessable,
    /// A registry failed or refused us: HTTP 502.
    Upstream,
    /// Something failed here (disk, a bug): HTTP 500.
    Internal,
    /// The service cannot work on it now (its database is unreachable): HTTP 503, and the
    /// next request after a short wait tries again.
    Unavailable,
}

impl FailureKind {
    /// Classifies a build error.
    pub fn of(e: &Error) -> Self {
        match e {
            Error::Network { .. } | Error::Unauthorized { .. } => FailureKind::Upstream,
            Error::Registry { status, .. } if *status >= 500 || *status == 429 => FailureKind::Upstream,
            Error::Io { .. } => FailureKind::Internal,
            _ => FailureKind::Unprocessable,
        }
    }

    /// Classifies a release update's error: the engine's as [`FailureKind::of`] does, the
    /// releases' own as unprocessable.
    pub fn of_update(e: &UpdateError) -> Self {
        match e {
            UpdateError::Engine(e) => FailureKind::of(e),
            _ => FailureKind::Unprocessable,
        }
    }

    /// Its name in the build queue.
    pub fn name(self) -> &'static str {
        match self {
            FailureKind::Unprocessable => "unprocessable",
            FailureKind::Upstream => "upstream",
            FailureKind::Internal => "internal",
            FailureKind::Unavailable => "unavailable",
        }
    }

    /// The kind named `name` in the build queue (another instance's failure); unknown names
    /// (a newer instance's) count as internal.
    pub fn from_name(name: &str) -> Self {
        [FailureKind::Unprocessable, FailureKind::Upstream, FailureKind::Unavailable].into_iter().find(|k| k.name() == name).unwrap_or(FailureKind::Internal)
    }
}

/// A failed pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The last attempt's error.
    pub reason: String,
    /// Its kind.
    pub kind: FailureKind,
    /// Consecutive failed attempts.
    pub failures: u32,
    /// No new attempt starts before this.
    pub retry_at: Instant,
}

#[derive(Debug)]
enum Entry {
    /// A task is looking the delta up or building it; it flips the signal when done.
    Working {
        since: Instant,
        done: watch::Receiver<bool>,
        failures: u32,
    },
    Ready(Built),
    Failed(Failure),
}

/// Where a pair stands, as a request sees it.
#[derive(Clone, Debug)]
pub enum Status {
    /// Built (or found).
    Ready(Built),
    /// In progress since `since`; `done` turns true when it ends.
    Working {
        /// When the current attempt started.
        since: Instant,
        /// Flips to `true` when the attempt ends.
        done: watch::Receiver<bool>,
        /// Failed attempts before this one.
        failures: u32,
    },
    /// Failed; the next request after `retry_at` starts a new attempt.
    Failed(Failure),
    /// Not accepted now: the service is shutting down, or the queue is full.
    Unavailable(String),
}

/// The service's builds: the pair map, the build slots, the tasks.
#[derive(Debug)]
pub struct Builds {
    entries: Mutex<HashMap<PairId, Entry>>,
    context: Arc<BuildContext>,
    config: Arc<ServiceConfig>,
    tasks: Mutex<JoinSet<()>>,
    accepting: AtomicBool,
    /// The build queue shared with other instances; none: this instance alone.
    queue: Option<Queue>,
}

impl Builds {
    /// Builds with this configuration, registry client and metrics; each build stages its
    /// images in a fresh directory inside `scratch`.
    pub fn new(config: Arc<ServiceConfig>, client: Arc<Client>, metrics: Arc<Metrics>, scratch: PathBuf) -> Self {
        let context = Arc::new(BuildContext {
            client,
            metrics,
            slots: Semaphore::new(config.max_concurrent_builds),
            config: config.clone(),
            scratch,
            known_sources: Mutex::new(HashMap::new()),
            push_locks: Mutex::new(HashMap::new()),
            abandoning: AtomicBool::new(false),
        });
        Builds { entries: Mutex::new(HashMap::new()), context, config, tasks: Mutex::new(JoinSet::new()), accepting: AtomicBool::new(true), queue: None }
    }

    /// The same, sharing the work with other instances through `queue`.
    pub fn with_queue(self, queue: Queue) -> Self {
        Builds { queue: Some(queue), ..self }
    }

    /// The shared build queue, if any.
    pub fn queue(&self) -> Option<&Queue> {
        self.queue.as_ref()
    }

    /// Starts the jobs of instances that stopped renewing their leases, unless a task here
    /// already waits on them (it takes the lease over at its next look). Returns how many.
    pub async fn take_over(self: &Arc<Self>) -> fleetdelta_engine::error::Result<usize> {
        let Some(queue) = &self.queue else { return Ok(0) };
        if !self.accepting.load(Ordering::SeqCst) {
            return Ok(0);
        }
        let mut started = 0;
        for job in queue.expired(64).await? {
            let id = job.id();
            if matches!(self.peek(&id), Some(Status::Working { .. })) {
                continue;
            }
            tracing::warn!(source_config = %id.key.source_config, target = %id.key.target_manifest, repository = %id.repository, "taking over a delta whose instance stopped renewing its lease");
            self.ensure(job);
            started += 1;
        }
        Ok(started)
    }

    /// The registry client.
    pub fn client(&self) -> &Client {
        &self.context.client
    }

    /// Remembers that `image` (pinned) has config `config`, so that requests naming only the
    /// config digest can be served (devices whose store recompressed their layers have another
    /// manifest digest, but the same config).
    pub fn remember_source(&self, config: Digest, image: RegistryRef) {
        self.context.remember_source(config, image);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PairId, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the pair stands in its repository, without starting anything.
    pub fn peek(&self, id: &PairId) -> Option<Status> {
        self.lock().get(id).map(Self::status_of)
    }

    fn status_of(entry: &Entry) -> Status {
        match entry {
            Entry::Working { since, done, failures } => Status::Working { since: *since, done: done.clone(), failures: *failures },
            Entry::Ready(b) => Status::Ready(b.clone()),
            Entry::Failed(f) => Status::Failed(f.clone()),
        }
    }

    /// Where the pair stands in the target's repository, starting its lookup-or-build when
    /// nothing is in progress and no failure's backoff is pending. Concurrent callers for one
    /// pair and repository share one task.
    pub fn ensure(self: &Arc<Self>, job: Job) -> Status {
        let id = job.id();
        let mut entries = self.lock();
        let failures = match entries.get(&id) {
            Some(Entry::Failed(f)) if Instant::now() >= f.retry_at => f.failures,
            Some(entry) => return Self::status_of(entry),
            None => 0,
        };
        if !self.accepting.load(Ordering::SeqCst) {
            return Status::Unavailable("the service is shutting down".into());
        }
        let working = entries.values().filter(|e| matches!(e, Entry::Working { .. })).count();
        if working >= self.config.max_concurrent_builds + self.config.max_queued_builds {
            return Status::Unavailable(format!("{working} pairs are being built or waiting; try again later"));
        }
        if entries.len() >= self.config.max_tracked_pairs {
            // Ready pairs are found again in the registry; failures within their backoff are
            // kept, so that forgetting never turns into a tight retry loop.
            let now = Instant::now();
            entries.retain(|_, e| match e {
                Entry::Working { .. } => true,
                Entry::Ready(_) => false,
                Entry::Failed(f) => f.retry_at > now,
            });
            if entries.len() >= self.config.max_tracked_pairs {
                return Status::Unavailable("too many pairs in progress or failing; try again later".into());
            }
        }
        let (signal, done) = watch::channel(false);
        let since = Instant::now();
        entries.insert(id.clone(), Entry::Working { since, done: done.clone(), failures });
        drop(entries);

        let this = Arc::clone(self);
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        // Reap finished tasks so that the set only holds those in flight.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move {
            let entry = match &this.queue {
                None => this.attempt(&job, failures).await,
                Some(queue) => this.attempt_shared(queue, &job, failures).await,
            };
            this.lock().insert(id, entry);
            let _ = signal.send(true);
        });
        Status::Working { since, done, failures }
    }

    /// One attempt at the pair, this instance alone: its outcome as the map keeps it.
    async fn attempt(&self, job: &Job, failures: u32) -> Entry {
        match build::produce(&self.context, job).await {
            Ok((built, _)) => Entry::Ready(built),
            Err(e) => Entry::Failed(self.failure(job, &e, failures + 1)),
        }
    }

    fn failure(&self, job: &Job, e: &Error, failures: u32) -> Failure {
        let backoff = self.config.retry_backoff(failures);
        let (key, repository) = (job.key, job.target.repository_name());
        tracing::warn!(source_config = %key.source_config, target = %key.target_manifest, %repository, failures, retry_in_s = backoff.as_secs_f64(), error = %e, "delta failed");
        Failure { reason: e.to_string(), kind: FailureKind::of(e), failures, retry_at: Instant::now() + backoff }
    }

    /// The database is unreachable: the pair is unavailable for a short while (503), and
    /// its failures are not counted.
    fn unavailable(&self, e: &Error, failures: u32) -> Entry {
        tracing::warn!(error = %e, "the build queue is unreachable");
        let wait = Duration::from_secs(self.config.retry_after_seconds.max(1));
        Entry::Failed(Failure { reason: e.to_string(), kind: FailureKind::Unavailable, failures, retry_at: Instant::now() + wait })
    }

    /// One attempt at the pair through the shared queue: built here while this instance
    /// holds its lease, or the outcome of the instance that holds it. The lease is taken
    /// only with a build slot in hand, so an instance holds at most as many leases as it
    /// has slots, and the pairs it cannot start yet stay free for other instances.
    async fn attempt_shared(&self, queue: &Queue, job: &Job, failures: u32) -> Entry {
        let id = job.id();
        if let Err(e) = queue.enqueue(job).await {
            return self.unavailable(&e, failures);
        }
        loop {
            let slot = match build::build_slot(&self.context).await {
                Ok(slot) => slot,
                Err(e) => return Entry::Failed(self.failure(job, &e, failures)),
            };
            let claim = match queue.claim(&id).await {
                Ok(claim) => claim,
                Err(e) => return self.unavailable(&e, failures),
            };
            let failures = match claim {
                Claim::Done(built) => {
                    drop(slot);
                    match build::still_there(&self.context, &built).await {
                        Ok(true) => {
                            self.context.metrics.delta_found();
                            return Entry::Ready(built);
                        }
                        Ok(false) => {
                            tracing::warn!(delta = %built.reference, "a delta recorded as ready is gone from the registry; building it again");
                            if let Err(e) = queue.forget(&id, &built).await {
                                return self.unavailable(&e, failures);
                            }
                            continue;
                        }
                        Err(e) => return Entry::Failed(self.failure(job, &e, failures)),
                    }
                }
                Claim::Failed { reason, kind, failures, wait } => {
                    return Entry::Failed(Failure { reason, kind: FailureKind::from_name(&kind), failures, retry_at: Instant::now() + wait })
                }
                Claim::Held { wait, .. } => {
                    // Look again soon, the slot free meanwhile: the holder records its
                    // outcome, or stops renewing. Stopping, this instance stops waiting.
                    drop(slot);
                    if !self.accepting.load(Ordering::SeqCst) {
                        return Entry::Failed(Failure {
                            reason: "the service is shutting down".into(),
                            kind: FailureKind::Unavailable,
                            failures,
                            retry_at: Instant::now(),
                        });
                    }
                    tokio::time::sleep(wait.clamp(Duration::from_millis(100), queue.lease() / 4)).await;
                    continue;
                }
                Claim::Mine { failures } => failures,
            };
            let Some(outcome) = holding_lease(queue, &id, build::produce_in_slot(&self.context, job)).await else {
                tracing::warn!(source_config = %id.key.source_config, target = %id.key.target_manifest, repository = %id.repository, "lost the lease to another instance; its outcome counts");
                continue;
            };
            drop(slot);
            return match outcome {
                Ok((built, fresh)) => {
                    if let Err(e) = queue.done(&id, &built, fresh).await {
                        // The delta is in the registry: other instances find it there once
                        // this lease expires.
                        tracing::warn!(error = %e, "could not record a delta in the build queue");
                    }
                    Entry::Ready(built)
                }
                Err(e) => {
                    let failure = self.failure(job, &e, failures + 1);
                    let wait = failure.retry_at.saturating_duration_since(Instant::now());
                    if let Err(e) = queue.failed(&id, &failure.reason, failure.kind.name(), failure.failures, wait).await {
                        tracing::warn!(error = %e, "could not record a failure in the build queue");
                    }
                    Entry::Failed(failure)
                }
            };
        }
    }

    /// Waits up to `wait` for a pair in progress to finish; returns where it stands then.
    pub async fn wait(&self, id: &PairId, status: Status, wait: Duration) -> Status {
        let Status::Working { mut done, .. } = status else { return status };
        // An error means the task was abandoned (shutdown): report what the map says.
        let _ = tokio::time::timeout(wait, done.wait_for(|d| *d)).await;
        self.peek(id).unwrap_or(Status::Unavailable("the pair was forgotten".into()))
    }

    /// Stops starting builds (shutdown has begun).
    pub fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::SeqCst);
    }

    /// Lets builds in flight finish for up to `grace`, then abandons the rest: their tasks are
    /// stopped where they are. A build pushes its manifest last, so an abandoned build leaves
    /// at most blobs that nothing references (the registry's garbage collection removes them),
    /// never a half-visible delta. Returns how many builds were abandoned.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.stop_accepting();
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        let finished = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if finished.is_ok() {
            return 0;
        }
        self.context.abandoning.store(true, Ordering::SeqCst);
        let abandoned = tasks.len();
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        if let Some(queue) = &self.queue {
            match queue.release_all().await {
                Ok(released) => tracing::info!(released, "gave back the leases of abandoned builds"),
                Err(e) => tracing::warn!(error = %e, "could not give back leases; they expire by themselves"),
            }
        }
        abandoned
    }
}

/// Runs `work` while renewing this instance's lease on `id` (a third of the lease apart);
/// `None` when the lease is lost to another instance (this instance stalled past it), in
/// which case `work` is dropped where it is: a build pushes its manifest last, so nothing
/// half-done becomes visible. A renewal that fails (the database unreachable) is retried at
/// the next beat; the work goes on.
async fn holding_lease<T>(queue: &Queue, id: &PairId, work: impl std::future::Future<Output = T>) -> Option<T> {
    let mut work = std::pin::pin!(work);
    let mut beat = tokio::time::interval(queue.lease() / 3);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat.tick().await;
    loop {
        tokio::select! {
            out = &mut work => return Some(out),
            _ = beat.tick() => match queue.renew(id).await {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => tracing::warn!(error = %e, "could not renew a lease; building on"),
            },
        }
    }
}
