//! `fleetdelta agent`: run the device agent, show its status, or speak to its local API.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use fleetdelta::agent::{self, Agent, AgentOptions, ApiRequest, DeviceAction, EngineRuntime, Outcome, ProcessRuntime, Runtime, StateDir, UpdateReport};
use fleetdelta::release::DeviceFacts;
use fleetdelta::Progress;

use super::RegistryArgs;

/// Where services run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeArg {
    /// Containers of the container engine at --engine ($DOCKER_HOST, else
    /// unix:///var/run/docker.sock); images in its store.
    #[default]
    Engine,
    /// Local processes from unpacked root filesystems, without isolation (no engine, no root).
    Process,
}

/// Flags of the agent itself.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Where services run: as containers of the engine (the default), or as local processes.
    #[arg(long, value_enum, default_value_t = RuntimeArg::Engine)]
    pub runtime: RuntimeArg,
    /// The state directory (created if missing; a relative path is taken from the current
    /// directory, and services are given absolute paths into it).
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// The target release: a release file or an http(s) URL serving one.
    #[arg(long, value_name = "RELEASE")]
    pub target: Option<String>,
    /// The device's facts (supervisor, os, l4t, kernel, device_type, arch): contracts are checked.
    #[arg(long, value_name = "FACTS")]
    pub device: Option<PathBuf>,
    /// Apply the target once and exit (status 3 when a held lock, 4 when a rollback left it
    /// incomplete).
    #[arg(long)]
    pub once: bool,
    /// Never download whole layers: an image without a delta is not updated (metered links).
    #[arg(long)]
    pub no_full_download: bool,
    /// Least seconds between two service starts.
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
    pub stagger: f64,
    /// Ask this builder service (`fleetdelta serve`, http://HOST:PORT) for each delta first,
    /// as `pull --service` does.
    #[arg(long, value_name = "URL")]
    pub service: Option<String>,
    /// With --service: the longest wait, in seconds, for a delta being built.
    #[arg(long, value_name = "SECONDS", default_value_t = 300.0)]
    pub service_wait: f64,
    /// At most this many instances of a service start at once: replicas start rolling, each
    /// further start waiting until one is ready (running, and healthy if it has a health check).
    #[arg(long, value_name = "K", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_starting: u32,
    /// Seconds a starting instance (of a service with replicas or a health check) has to become
    /// ready before the switch is rolled back.
    #[arg(long, value_name = "SECONDS", default_value_t = 120.0)]
    pub start_timeout: f64,
    /// Seconds a stopping service has after SIGTERM before SIGKILL.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub stop_timeout: f64,
    /// Give up waiting for locks after this many seconds (the update goes on at the next run).
    #[arg(long, value_name = "SECONDS")]
    pub lock_timeout: Option<f64>,
    /// Seconds between looks at the target release: without --once, for the next update; while
    /// a lock is awaited, for a newer release that supersedes the one waiting.
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    pub interval: f64,
    /// Shell command that installs the OS version in $FLEETDELTA_OS_VERSION (may reboot).
    #[arg(long, value_name = "COMMAND")]
    pub os_update_command: Option<String>,
    /// Shell command that `agent reboot` runs (through this agent) once every lock is held and
    /// every service stopped.
    #[arg(long, value_name = "COMMAND", default_value = "systemctl reboot")]
    pub reboot_command: String,
    /// Shell command that `agent shutdown` runs likewise.
    #[arg(long, value_name = "COMMAND", default_value = "systemctl poweroff")]
    pub shutdown_command: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write the decision log (stderr) as JSON lines; its level comes from $FLEETDELTA_LOG.
    #[arg(long)]
    pub log_json: bool,
    /// Test hook: exit with status 86 right after this step (SERVICE:STEP, STEP, begin,
    /// commit-release), before journaling it done.
    #[arg(long, hide = true, value_name = "STEP")]
    pub crash_after: Option<String>,
}

/// Flags of the operator's actions (restart, stop, start, reboot, shutdown).
#[derive(Debug, clap::Args)]
pub struct ActionArgs {
    /// The state directory.
    #[arg(long, value_name = "DIR")]
    pub state: PathBuf,
    /// Where the agent runs its services (when no agent runs and this command does the action).
    #[arg(long, value_enum, default_value_t = RuntimeArg::Engine)]
    pub runtime: RuntimeArg,
    /// Go ahead without the update locks: the services holding them are not asked.
    #[arg(long)]
    pub force: bool,
    /// Give up after this many seconds waiting for locks (status 3; nothing is done).
    #[arg(long, value_name = "SECONDS")]
    pub lock_timeout: Option<f64>,
    /// Seconds a stopping service has after SIGTERM before SIGKILL.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub stop_timeout: f64,
}

/// Flags of `agent reboot` and `agent shutdown`.
#[derive(Debug, clap::Args)]
pub struct PowerArgs {
    #[command(flatten)]
    pub action: ActionArgs,
    /// The shell command that reboots (or shuts down) the device, when no agent runs (a
    /// running agent uses its own --reboot-command or --shutdown-command).
    #[arg(long, value_name = "COMMAND")]
    pub command: Option<String>,
}

/// `fleetdelta agent status|go-ahead|defer|restart|stop|start|reboot|shutdown`.
#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// What runs, the update under way, and the release requests waiting for locks.
    Status {
        /// The state directory.
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        /// Accepted for symmetry with the other commands: the status is always JSON.
        #[arg(long)]
        json: bool,
        /// Where the agent runs its services.
        #[arg(long, value_enum, default_value_t = RuntimeArg::Engine)]
        runtime: RuntimeArg,
    },
    /// Tell the running agent to update SERVICE now, even while its lock is held.
    GoAhead {
        /// The state directory.
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        /// The service.
        service: String,
    },
    /// Tell the running agent not to switch SERVICE for a while.
    Defer {
        /// The state directory.
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        /// For how many seconds.
        #[arg(long)]
        seconds: u64,
        /// The service.
        service: String,
    },
    /// Restart SERVICE once its update lock is free (the holder is told: reason `restart`).
    Restart {
        #[command(flatten)]
        args: ActionArgs,
        /// The service.
        service: String,
    },
    /// Stop SERVICE once its update lock is free (reason `stop`); it stays stopped until
    /// `agent start`, `agent restart`, or an update that replaces it.
    Stop {
        #[command(flatten)]
        args: ActionArgs,
        /// The service.
        service: String,
    },
    /// Start a stopped SERVICE (no lock needed).
    Start {
        #[command(flatten)]
        args: ActionArgs,
        /// The service.
        service: String,
    },
    /// Once every service's update lock is free (reason `reboot`), stop every service and
    /// reboot the device.
    Reboot {
        #[command(flatten)]
        args: PowerArgs,
    },
    /// Once every service's update lock is free (reason `shutdown`), stop every service and
    /// shut the device down.
    Shutdown {
        #[command(flatten)]
        args: PowerArgs,
    },
}

pub fn run(registry: &RegistryArgs, action: Option<Action>, args: RunArgs, quiet: bool, progress: &dyn Progress) -> anyhow::Result<ExitCode> {
    match action {
        Some(Action::Status { state, runtime, json: _ }) => {
            // Read only: a mistyped path is an error, not a new state directory.
            let state = StateDir::open_existing(&state)?;
            let transfer = registry.transfer(None)?;
            let runtime = make_runtime(runtime, &state, &transfer)?;
            let status = agent::status(&state, runtime.as_ref())?;
            outln!("{}", serde_json::to_string_pretty(&status)?);
            return Ok(ExitCode::SUCCESS);
        }
        Some(Action::GoAhead { state, service }) => return api(&state, ApiRequest::GoAhead { service }),
        Some(Action::Defer { state, seconds, service }) => return api(&state, ApiRequest::Defer { service, seconds }),
        Some(Action::Restart { args, service }) => return act(registry, progress, DeviceAction::Restart { service }, &args, None),
        Some(Action::Stop { args, service }) => return act(registry, progress, DeviceAction::Stop { service }, &args, None),
        Some(Action::Start { args, service }) => return act(registry, progress, DeviceAction::Start { service }, &args, None),
        Some(Action::Reboot { args }) => return act(registry, progress, DeviceAction::Reboot, &args.action, args.command),
        Some(Action::Shutdown { args }) => return act(registry, progress, DeviceAction::Shutdown, &args.action, args.command),
        None => {}
    }
    let Some(state) = &args.state else { bail!("--state DIR is required") };
    // One log line per decision on stderr (warnings only with --quiet); the report on stdout.
    super::init_logging(args.log_json, if quiet { "warn" } else { "info" });
    let Some(target) = &args.target else { bail!("--target RELEASE is required") };
    let facts = args.device.as_deref().map(DeviceFacts::load).transpose()?;
    let options = AgentOptions {
        facts,
        allow_full: !args.no_full_download,
        stagger: seconds(args.stagger, "--stagger")?,
        stop_timeout: seconds(args.stop_timeout, "--stop-timeout")?,
        lock_timeout: args.lock_timeout.map(|t| seconds(t, "--lock-timeout")).transpose()?,
        os_update_command: args.os_update_command.clone().map(shell),
        reboot_command: shell(args.reboot_command.clone()),
        shutdown_command: shell(args.shutdown_command.clone()),
        crash_after: args.crash_after.clone(),
        recheck: Some(seconds(args.interval, "--interval")?),
        max_starting: args.max_starting as usize,
        service: args
            .service
            .clone()
            .map(|url| -> anyhow::Result<_> { Ok(fleetdelta::pull::ServiceOptions { url, max_wait: seconds(args.service_wait, "--service-wait")? }) })
            .transpose()?,
        start_timeout: seconds(args.start_timeout, "--start-timeout")?,
        ..AgentOptions::default()
    };
    let arch = options.facts.as_ref().and_then(|f| f.arch.as_deref()).and_then(fleetdelta::release::oci_architecture);
    let transfer = registry.transfer(arch)?;
    let state_dir = StateDir::open(state)?;
    let runtime = make_runtime(args.runtime, &state_dir, &transfer)?;
    let mut agent = Agent::open(state_dir, &transfer, runtime, options, progress)?;
    loop {
        let result = agent.update(target).with_context(|| format!("update to {target}"));
        if let (true, Err(e)) = (args.json, &result) {
            if let Some(json) = super::exit::rejection_json(e) {
                outln!("{json:#}");
            }
        }
        if args.once {
            let report = result?;
            print_report(&report, args.json)?;
            let rolled_back = report.services.iter().any(|s| matches!(s.outcome, Outcome::RolledBack { .. }));
            return Ok(ExitCode::from(match (report.complete, rolled_back) {
                (true, _) => super::exit::SUCCESS,
                (false, true) => super::exit::ROLLED_BACK,
                (false, false) => super::exit::LOCKED,
            }));
        }
        match result {
            Ok(report) => print_report(&report, args.json)?,
            Err(e) => eprintln!("fleetdelta: error: {e:#}"),
        }
        // Between runs, actions asked on the control socket are done.
        agent.idle(seconds(args.interval, "--interval")?);
    }
}

/// Does an operator's action: through the running agent's control socket, or, when no agent
/// runs, by opening the agent here. Prints the report (JSON).
fn act(registry: &RegistryArgs, progress: &dyn Progress, action: DeviceAction, args: &ActionArgs, command: Option<String>) -> anyhow::Result<ExitCode> {
    let state = StateDir::open_existing(&args.state)?;
    let wait = args.lock_timeout.map(|t| seconds(t, "--lock-timeout")).transpose()?;
    let report = if agent::agent_running(&state) {
        agent::api::send_action(&state.control_socket(), &action, args.force, wait).with_context(|| format!("the agent on {}", state.root().display()))?
    } else {
        let mut options = AgentOptions {
            lock_timeout: wait,
            stop_timeout: seconds(args.stop_timeout, "--stop-timeout")?,
            stagger: Duration::ZERO,
            ..AgentOptions::default()
        };
        if let Some(command) = command {
            match action {
                DeviceAction::Shutdown => options.shutdown_command = shell(command),
                _ => options.reboot_command = shell(command),
            }
        }
        let transfer = registry.transfer(None)?;
        let runtime = make_runtime(args.runtime, &state, &transfer)?;
        let mut agent = Agent::open(state, &transfer, runtime, options, progress)?;
        agent.act(&action, args.force)?
    };
    outln!("{}", serde_json::to_string_pretty(&report)?);
    Ok(ExitCode::SUCCESS)
}

fn make_runtime<'a>(kind: RuntimeArg, state: &StateDir, transfer: &'a fleetdelta::Transfer) -> anyhow::Result<Box<dyn Runtime + 'a>> {
    Ok(match kind {
        RuntimeArg::Engine => {
            Box::new(EngineRuntime::new(state.clone(), transfer).context("the container engine (use --runtime process to run services without one)")?)
        }
        RuntimeArg::Process => Box::new(ProcessRuntime::new(state.clone())),
    })
}

fn api(state: &Path, request: ApiRequest) -> anyhow::Result<ExitCode> {
    let socket = StateDir::open_existing(state)?.socket();
    let answer = agent::api::send(&socket, &request).with_context(|| format!("agent at {}", socket.display()))?;
    outln!("{answer}");
    Ok(ExitCode::SUCCESS)
}

/// A shell command line as the argument vector that runs it.
fn shell(command: String) -> Vec<String> {
    vec!["/bin/sh".to_string(), "-c".to_string(), command]
}

fn seconds(value: f64, flag: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value).with_context(|| format!("{flag} {value}: not a number of seconds"))
}

fn print_report(report: &UpdateReport, json: bool) -> anyhow::Result<()> {
    if json {
        outln!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    if let Some(resumed) = &report.resumed {
        outln!("resumed the interrupted update to release {resumed}");
    }
    let from = report.from_release.as_deref().unwrap_or("none");
    outln!("release {from} -> {}: {}", report.target_release, if report.complete { "complete" } else { "incomplete" });
    for s in &report.services {
        let outcome = match &s.outcome {
            Outcome::Unchanged => "unchanged (not restarted)".to_string(),
            Outcome::Updated => "updated".to_string(),
            Outcome::Waiting => "waiting for its lock".to_string(),
            Outcome::RolledBack { reason } => format!("rolled back: {reason}"),
        };
        let fetched = s.fetched.as_ref().map(|f| format!(" [{f}]")).unwrap_or_default();
        outln!("  {:<20} {:<13} {outcome}{fetched}", s.service, s.change);
    }
    if let Some(os) = &report.os_updated {
        outln!("  OS {os} installed");
    }
    if !report.restarted.is_empty() {
        outln!("  started (were not running): {}", report.restarted.join(", "));
    }
    Ok(())
}
