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
        Builds { entries: Mutex::new(HashMap::new()), context, config, tasks: Mutex::new(JoinSet::new()), accepting: AtomicBool::new(true) }
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
            let key = job.key;
            let repository = &id.repository;
            let outcome = build::produce(&this.context, &job).await;
            let entry = match outcome {
                Ok(built) => Entry::Ready(built),
                Err(e) => {
                    let failures = failures + 1;
                    let backoff = this.config.retry_backoff(failures);
                    tracing::warn!(source_config = %key.source_config, target = %key.target_manifest, %repository, failures, retry_in_s = backoff.as_secs_f64(), error = %e, "delta failed");
                    Entry::Failed(Failure { reason: e.to_string(), kind: FailureKind::of(&e), failures, retry_at: Instant::now() + backoff })
                }
            };
            this.lock().insert(id, entry);
            let _ = signal.send(true);
        });
        Status::Working { since, done, failures }
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
        abandoned
    }
}
