//! The builder service behind `fleetdelta serve`: deltas built once per image pair, ahead of
//! the fleet, for many devices at once.
//!
//! - [`config`]: the configuration file and its limits.
//! - [`api`]: the JSON bodies of the HTTP API (`docs/api.md`, `docs/openapi.yaml`).
//! - [`routes`]: the HTTP routes and handlers (axum).
//! - [`state`]: single flight: one lookup-or-build per pair, bounded slots, failures with
//!   backoff.
//! - [`build`]: one delta: found in the registry, or fetched, diffed and pushed beside the
//!   target.
//! - [`releases`]: release registration (background builds from earlier releases) and
//!   release-update queries.
//! - [`db`]: the durable state (registered releases, the build queue), in SQLite or
//!   PostgreSQL.
//! - [`queue`]: the build queue several instances share: leases, heartbeats, take-over.
//! - [`retention`]: the periodic deletion of old deltas (`retention:`), protecting those the
//!   registered releases need.
//! - [`metrics`]: Prometheus text format.
//! - [`shutdown`]: signals, and the order things stop in.
//! - [`release_update`]: the transition between two releases, with each delta's status;
//!   prepares, waits for and times out the builds (also what the CLI runs without a service).
//! - [`api`] and [`client`] live in `fleetdelta-pull` (the device's side) and are re-exported.
//!
//! The registry is the store of record for deltas; the releases registered are kept in the
//! service's database ([`db`]), so a restart forgets none (see `docs/scaling.md`).
#![deny(missing_docs)]

pub mod build;
pub mod config;
pub mod db;
pub mod metrics;
pub mod queue;
pub mod release_update;
pub mod releases;
pub mod retention;
pub mod routes;
pub mod shutdown;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;

pub use config::ServiceConfig;
pub use fleetdelta_pull::{api, client};
pub use shutdown::ShutdownReport;

use db::Database;
use fleetdelta_engine::error::{IoContext, Result};
use fleetdelta_engine::locked_dir::ScratchDir;
use fleetdelta_engine::registry::{Client, ClientOptions};
use queue::Queue;
use releases::Releases;

/// A service bound to its address, ready to run.
#[derive(Debug)]
pub struct Service {
    listener: tokio::net::TcpListener,
    app: routes::App,
    scratch: ScratchDir,
}

impl Service {
    /// Binds the listening socket and sets up the registry client (`registry` options; the
    /// configuration's registry section is the caller's to merge into them).
    pub async fn bind(config: ServiceConfig, registry: ClientOptions) -> Result<Self> {
        config.validate("the service configuration")?;
        let listener = tokio::net::TcpListener::bind(config.listen).await.ctx(|| format!("listening on {}", config.listen))?;
        let scratch_root = config.scratch_dir.clone().unwrap_or_else(std::env::temp_dir);
        // One directory per run, removed when the service returns; a killed run's is removed
        // when the next one starts (a live instance's, sharing the directory, is kept).
        let scratch = ScratchDir::create(&scratch_root, "fleetdelta-serve-")?;
        let config = Arc::new(config);
        let metrics = Arc::new(metrics::Metrics::default());
        let client = Arc::new(Client::new(registry)?);
        let url = match &config.database {
            Some(url) => url.clone(),
            None => config::default_database_url()?,
        };
        let db = Database::open(&url).await?;
        let queue = Queue::new(db.clone(), queue::instance_name(), config.lease());
        tracing::info!(database = %db::redacted(&url), instance = queue.owner(), "database open");
        let builds = Arc::new(state::Builds::new(config.clone(), client, metrics.clone(), scratch.path().to_path_buf()).with_queue(queue));
        let releases = Arc::new(Releases::with_database(db).for_platforms(config.fleet_platforms()?));
        let restored = releases.restore(config.previous_releases, &builds).await?;
        tracing::info!(restored, "releases restored");
        let app = routes::App { config, builds, releases, metrics, source_configs: Arc::default() };
        Ok(Service { listener, app, scratch })
    }

    /// The address it listens on (the port chosen when the configuration said 0).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener.local_addr().ctx(|| "reading the listening address".into())
    }

    /// Its metrics (for embedding and tests).
    pub fn metrics(&self) -> Arc<metrics::Metrics> {
        self.app.metrics.clone()
    }

    /// Serves until `shutdown` resolves, then stops as [`shutdown`] describes.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<ShutdownReport> {
        let Service { listener, app, scratch } = self;
        let builds = app.builds.clone();
        let grace = app.config.shutdown_grace();
        let stopping = builds.clone();
        let housekeeping = tokio::spawn(housekeeping(app.clone()));
        let retention = app.config.retention.clone().map(|r| tokio::spawn(retention::run_periodically(r, app.releases.clone(), builds.clone())));
        let router = routes::router(app);
        tracing::info!(addr = %listener.local_addr().ctx(|| "reading the listening address".into())?, "serving");
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                shutdown.await;
                stopping.stop_accepting();
            })
            .await
            .ctx(|| "serving HTTP".into())?;
        housekeeping.abort();
        // A run stopped between two deletions leaves nothing half-done: each delta is taken
        // out of its referrers index before its manifest is deleted, and the next run resumes.
        if let Some(task) = retention {
            task.abort();
        }
        let abandoned_builds = builds.drain(grace).await;
        if abandoned_builds > 0 {
            tracing::warn!(abandoned_builds, "abandoned builds in flight at the end of the grace period; nothing of them was published");
        }
        drop(scratch);
        tracing::info!("stopped");
        Ok(ShutdownReport { abandoned_builds })
    }
}

/// What an instance does besides answering: takes over the builds of instances that stopped
/// renewing their leases, and registers the releases other instances registered, a few times
/// per lease period. Errors (the database unreachable) are logged and tried again.
async fn housekeeping(app: routes::App) {
    let period = (app.config.lease() / 2).clamp(std::time::Duration::from_millis(200), std::time::Duration::from_secs(10));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = app.builds.take_over().await {
            tracing::warn!(error = %e, "could not look for builds to take over");
        }
        match app.releases.sync(app.config.previous_releases, &app.builds).await {
            Ok(0) => {}
            Ok(added) => tracing::info!(added, "releases registered by other instances"),
            Err(e) => tracing::warn!(error = %e, "could not look for releases registered by other instances"),
        }
    }
}
