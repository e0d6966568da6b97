//! Command-line parsing and dispatch.

#[macro_use]
pub mod output;
mod agent_cmd;
mod apply_cmd;
mod copy_cmd;
mod diff_cmd;
pub mod exit;
mod gc_cmd;
mod info_cmd;
mod progress;
mod pull_cmd;
#[cfg(feature = "service")]
mod release_update_cmd;
#[cfg(feature = "service")]
mod serve_cmd;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use fleetdelta::registry::{CredentialStore, Credentials};
use fleetdelta::{ClientOptions, Transfer};

use clap::{Parser, Subcommand, ValueEnum};

/// Binary deltas between OCI images, shipped as ordinary OCI images.
#[derive(Debug, Parser)]
#[command(name = "fleetdelta", version, about, after_help = exit::TABLE)]
pub struct Cli {
    /// No progress bars.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Registry attempts after the first, unless `--retries` says otherwise.
const DEFAULT_RETRIES: u32 = 6;
/// Seconds without a byte before a registry attempt fails, unless `--idle-timeout` says.
const DEFAULT_IDLE_TIMEOUT_SECONDS: u64 = 30;

/// How registries (`docker://` references) and the container engine (`docker-daemon:`) are reached.
#[derive(Debug, clap::Args)]
pub struct RegistryArgs {
    /// Registry (HOST[:PORT]) spoken to over plain HTTP; loopback addresses always are. Repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST", global = true)]
    pub insecure: Vec<String>,
    /// Credentials file (docker config.json or containers auth.json format) instead of the usual ones.
    #[arg(long, value_name = "FILE", global = true, conflicts_with = "creds")]
    pub authfile: Option<PathBuf>,
    /// USER:PASSWORD for every registry.
    #[arg(long, value_name = "USER:PASSWORD", global = true, env = "FLEETDELTA_CREDS", hide_env_values = true)]
    pub creds: Option<String>,
    /// Attempts after the first on network errors, 429 and 5xx [default: 6].
    #[arg(long, global = true)]
    pub retries: Option<u32>,
    /// Seconds without receiving a byte before an attempt counts as failed [default: 30].
    #[arg(long, value_name = "SECONDS", global = true)]
    pub idle_timeout: Option<u64>,
    /// The container engine of docker-daemon:NAME[:TAG] references (unix:///PATH or
    /// tcp://HOST:PORT) [default: $DOCKER_HOST, else unix:///var/run/docker.sock].
    #[arg(long, value_name = "URL", global = true)]
    pub engine: Option<String>,
}

impl RegistryArgs {
    /// The registry transport these flags describe, selecting `architecture` (OCI name) from
    /// multi-platform images, or this machine's.
    pub fn transfer(&self, architecture: Option<&str>) -> anyhow::Result<Transfer> {
        let credentials = match (&self.creds, &self.authfile) {
            (Some(c), _) => CredentialStore::explicit(Credentials::parse(c)?),
            (None, Some(f)) => CredentialStore::from_file(f.clone()),
            (None, None) => CredentialStore::from_environment(),
        };
        let options = ClientOptions {
            credentials,
            insecure: self.insecure.clone(),
            retries: self.retries.unwrap_or(DEFAULT_RETRIES),
            idle_timeout: Duration::from_secs(self.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT_SECONDS).max(1)),
            ..ClientOptions::default()
        };
        let options = match architecture {
            Some(a) => ClientOptions { architecture: a.to_string(), ..options },
            None => options,
        };
        Ok(Transfer::new(options)?.with_engine(self.engine.clone()))
    }
}

/// Effort levels.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LevelArg {
    /// Quick.
    Fast,
    /// Balanced.
    Default,
    /// Smallest payload.
    Max,
}

/// What the rebuilt image must preserve.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FidelityArg {
    /// Every blob digest and so the target's manifest digest (signatures, digest pins hold);
    /// layers no known encoder reproduces are carried whole.
    Exact,
    /// Layer contents (diff_ids) and config only; layers no known encoder reproduces are
    /// patched and get another blob digest.
    Content,
}

/// Layer storage of the rebuilt image.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LayersArg {
    /// The target's compression.
    Original,
    /// Plain tars.
    Uncompressed,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Compute the delta from SOURCE to TARGET and write it as an OCI image to DELTA.
    Diff(diff_cmd::Args),
    /// Rebuild the target image of DELTA from SOURCE and write it to OUTPUT.
    Apply(apply_cmd::Args),
    /// Copy an image between layouts, registries and the container engine (oci:DIR[:TAG],
    /// docker://HOST/REPO[:TAG|@DIGEST], docker-daemon:NAME[:TAG]); an image index (a
    /// multi-platform image or a delta index) whole, keeping its digest.
    Copy(copy_cmd::Args),
    /// Bring a registry image into a local layout or the container engine using a delta from
    /// the image the device has.
    Pull(pull_cmd::Args),
    /// The update from one release to another: per service removed, added, unchanged or
    /// delta-updated, each delta's status, the payload estimate; builds and waits for deltas.
    #[cfg(feature = "service")]
    ReleaseUpdate(release_update_cmd::Args),
    /// Run the builder service: deltas built once per image pair, ahead of the fleet, served
    /// over HTTP (docs/api.md). Stops on SIGTERM or ctrl-c.
    #[cfg(feature = "service")]
    Serve(serve_cmd::ServeArgs),
    /// The device agent: update this device to a target release, service by service, each
    /// under its lock (`agent --state DIR --target RELEASE`); or `agent status|go-ahead|defer`.
    #[command(args_conflicts_with_subcommands = true)]
    Agent {
        #[command(subcommand)]
        action: Option<agent_cmd::Action>,
        #[command(flatten)]
        run: agent_cmd::RunArgs,
    },
    /// Show what a delta holds, per target layer.
    Info(info_cmd::Args),
    /// Delete the deltas of a registry repository whose target is not among the images kept
    /// (the newest N, or those newer than a date); blobs are left to the registry's own
    /// garbage collector.
    Gc(gc_cmd::Args),
}

/// Parses the command line and runs the command.
pub fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let progress = progress::for_terminal(cli.quiet);
    let progress = progress.as_ref();
    let registry = &cli.registry;
    let transfer = || registry.transfer(None);
    match cli.command {
        Command::Diff(args) => diff_cmd::run(&transfer()?, &args, progress),
        Command::Apply(args) => apply_cmd::run(&transfer()?, &args, progress),
        Command::Copy(args) => copy_cmd::run(&transfer()?, &args, progress),
        Command::Pull(args) => pull_cmd::run(&transfer()?, &args, progress),
        #[cfg(feature = "service")]
        Command::Serve(args) => serve_cmd::run(registry, &args),
        Command::Info(args) => info_cmd::run(&transfer()?, &args, progress),
        Command::Gc(args) => gc_cmd::run(&transfer()?, &args),
        Command::Agent { action, run } => return agent_cmd::run(registry, action, run, cli.quiet, progress),
        #[cfg(feature = "service")]
        Command::ReleaseUpdate(args) => return release_update_cmd::run(registry, &args, progress),
    }?;
    Ok(ExitCode::SUCCESS)
}

impl LevelArg {
    fn level(self) -> fleetdelta::Level {
        match self {
            LevelArg::Fast => fleetdelta::Level::Fast,
            LevelArg::Default => fleetdelta::Level::Default,
            LevelArg::Max => fleetdelta::Level::Max,
        }
    }
}

impl FidelityArg {
    fn fidelity(self) -> fleetdelta::diff::Fidelity {
        match self {
            FidelityArg::Exact => fleetdelta::diff::Fidelity::Exact,
            FidelityArg::Content => fleetdelta::diff::Fidelity::Content,
        }
    }
}

impl LayersArg {
    fn output(self) -> fleetdelta::LayerOutput {
        match self {
            LayersArg::Original => fleetdelta::LayerOutput::Original,
            LayersArg::Uncompressed => fleetdelta::LayerOutput::Uncompressed,
        }
    }
}

/// Formats a byte count for people.
pub fn human_bytes(n: u64) -> String {
    fleetdelta::info::human_bytes(n)
}

/// Says what loading into the container engine did.
pub fn print_loaded(output: &fleetdelta::ImageRef, loaded: &fleetdelta::engine::LoadReport) {
    let id = loaded.id.map(|d| d.to_string()).unwrap_or_default();
    match &loaded.archive {
        None => outln!("{output}: the engine already had {id}; tagged {}", loaded.tagged),
        Some(a) => outln!(
            "{output}: loaded {id} ({} sent, {} layers, {} already in the engine left out{}), verified, tagged {}",
            human_bytes(a.archive_bytes),
            a.layers_sent,
            a.layers_omitted,
            if loaded.resent_whole { "; resent whole after the engine refused" } else { "" },
            loaded.tagged
        ),
    }
}

/// Structured logs (tracing) on stderr: text, or JSON lines; the level from `$FLEETDELTA_LOG`
/// (`info` by default); colours only on a terminal.
pub fn init_logging(json: bool, default_level: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLEETDELTA_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().init()
    } else {
        builder.init()
    }
}
