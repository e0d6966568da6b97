//! `fleetdelta serve`: the builder service (see `fleetdelta::service` and docs/api.md).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use fleetdelta::registry::{CredentialStore, Credentials};
use fleetdelta::service::config::LogFormat;
use fleetdelta::service::{shutdown, Service, ServiceConfig};
use fleetdelta::ClientOptions;

use super::{LevelArg, RegistryArgs};

/// Flags of `serve`; each overrides the configuration file.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Configuration file (YAML; see docs/api.md for every key).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on (port 0: any free port; the address is printed).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Builds running at once.
    #[arg(long, value_name = "N")]
    pub max_concurrent_builds: Option<usize>,
    /// When a release is registered, build deltas from this many releases before it.
    #[arg(long, value_name = "N")]
    pub previous_releases: Option<usize>,
    /// Effort of the deltas built.
    #[arg(long, value_enum)]
    pub level: Option<LevelArg>,
    /// Largest image (compressed blobs) agreed to diff, in bytes.
    #[arg(long, value_name = "BYTES")]
    pub max_image_size: Option<u64>,
    /// Largest request body, in bytes.
    #[arg(long, value_name = "BYTES")]
    pub max_request_size: Option<usize>,
    /// First wait before a failed pair is tried again, in seconds (doubled on each failure).
    #[arg(long, value_name = "SECONDS")]
    pub retry_initial: Option<f64>,
    /// Longest wait before a failed pair is tried again, in seconds.
    #[arg(long, value_name = "SECONDS")]
    pub retry_max: Option<f64>,
    /// On SIGTERM, how long builds in flight may take to finish, in seconds.
    #[arg(long, value_name = "SECONDS")]
    pub shutdown_grace: Option<f64>,
    /// Log lines as JSON objects.
    #[arg(long)]
    pub log_json: bool,
    /// Where registered releases and the build queue are kept across restarts: sqlite:PATH,
    /// sqlite::memory: (nothing kept), or postgres://USER@HOST/NAME (several instances
    /// sharing the work) [default: sqlite:$XDG_STATE_HOME/fleetdelta/service.db].
    #[arg(long, value_name = "URL")]
    pub database: Option<String>,
}

pub fn run(registry: &RegistryArgs, args: &ServeArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => ServiceConfig::load(path)?,
        None => ServiceConfig::default(),
    };
    if let Some(v) = args.listen {
        config.listen = v;
    }
    if let Some(v) = args.max_concurrent_builds {
        config.max_concurrent_builds = v;
    }
    if let Some(v) = args.previous_releases {
        config.previous_releases = v;
    }
    if let Some(v) = args.level {
        config.level = v.level();
    }
    if let Some(v) = args.max_image_size {
        config.max_image_bytes = v;
    }
    if let Some(v) = args.max_request_size {
        config.max_request_bytes = v;
    }
    if let Some(v) = args.retry_initial {
        config.retry_initial_seconds = v;
    }
    if let Some(v) = args.retry_max {
        config.retry_max_seconds = v;
    }
    if let Some(v) = args.shutdown_grace {
        config.shutdown_grace_seconds = v;
    }
    if args.log_json {
        config.log_format = LogFormat::Json;
    }
    if let Some(v) = &args.database {
        config.database = Some(v.clone());
    }
    config.validate("the service configuration (file and flags)")?;
    super::init_logging(config.log_format == fleetdelta::service::config::LogFormat::Json, "info");

    // Registry access: the file's section, then the command line's flags on top.
    let file = &config.registry;
    let credentials = match (&registry.creds, &registry.authfile, &file.authfile) {
        (Some(c), _, _) => CredentialStore::explicit(Credentials::parse(c)?),
        (None, Some(f), _) | (None, None, Some(f)) => CredentialStore::from_file(f.clone()),
        (None, None, None) => CredentialStore::from_environment(),
    };
    let options = ClientOptions {
        credentials,
        insecure: file.insecure.iter().chain(registry.insecure.iter()).cloned().collect(),
        retries: registry.retries.unwrap_or(file.retries),
        idle_timeout: Duration::from_secs(registry.idle_timeout.unwrap_or(file.idle_timeout_seconds).max(1)),
        ..ClientOptions::default()
    };

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    let report = runtime.block_on(async {
        let service = Service::bind(config, options).await?;
        // The address first, alone on stdout: what scripts and tests read (logs go to stderr).
        outln!("listening on http://{}", service.local_addr()?);
        std::io::stdout().flush().context("writing to stdout")?;
        anyhow::Ok(service.run(shutdown::signal()).await?)
    })?;
    // Blocking threads of abandoned builds are not waited for.
    runtime.shutdown_timeout(Duration::from_secs(1));
    if report.abandoned_builds > 0 {
        eprintln!("fleetdelta: {} builds abandoned at shutdown (nothing of them published)", report.abandoned_builds);
    }
    Ok(())
}
