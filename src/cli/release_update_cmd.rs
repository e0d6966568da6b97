//! `fleetdelta release-update`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use fleetdelta::delta_store::DeltaStore;
use fleetdelta::release::oci_architecture;
use fleetdelta::release::{render_table, DeviceFacts, Release};
use fleetdelta::release_update::{release_update, UpdateOptions};
use fleetdelta::{DiffOptions, Progress};

use super::{human_bytes, FidelityArg, LevelArg, RegistryArgs};

/// The command's flags and arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The release the device runs (YAML release file).
    #[arg(long, value_name = "RELEASE")]
    pub from: PathBuf,
    /// The release it moves to.
    #[arg(long, value_name = "RELEASE")]
    pub to: PathBuf,
    /// The device's facts (supervisor, os, l4t, kernel, device_type, arch): check contracts.
    #[arg(long, value_name = "FACTS")]
    pub device: Option<PathBuf>,
    /// Where deltas are kept: `target` (beside each target image in its registry
    /// repository) or oci:DIR.
    #[arg(long, value_name = "STORE", default_value = "target")]
    pub deltas: String,
    /// Build every delta not yet built (each once per image pair).
    #[arg(long)]
    pub prepare: bool,
    /// Wait until every delta is ready; implies --prepare (the missing deltas are built
    /// here, those being built elsewhere are waited for).
    #[arg(long)]
    pub wait: bool,
    /// Give up preparing and waiting after this many seconds (exit status 5; built deltas
    /// are kept); implies --wait.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<f64>,
    /// Seconds between looks while waiting.
    #[arg(long, value_name = "SECONDS", default_value_t = 2.0)]
    pub poll: f64,
    /// Effort of the deltas built.
    #[arg(long, value_enum, default_value = "default")]
    pub level: LevelArg,
    /// What images rebuilt from the deltas built must preserve: exact (every digest) or content (diff_ids).
    #[arg(long, value_enum, default_value = "exact")]
    pub fidelity: FidelityArg,
    /// Print JSON (balena's release-update shape, extended) instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn seconds(value: f64, flag: &str) -> anyhow::Result<Duration> {
    if !value.is_finite() || !(0.0..=1e9).contains(&value) {
        bail!("{flag} must be a number of seconds, not {value}");
    }
    Ok(Duration::from_secs_f64(value))
}

pub fn run(registry: &RegistryArgs, args: &Args, progress: &dyn Progress) -> anyhow::Result<ExitCode> {
    let from = Release::load(&args.from)?;
    let to = Release::load(&args.to)?;
    let facts = args.device.as_deref().map(DeviceFacts::load).transpose()?;
    // Multi-platform images resolve to the device's architecture when its facts name one.
    let arch = facts.as_ref().and_then(|f| f.arch.as_deref()).and_then(oci_architecture);
    let transfer = registry.transfer(arch)?;
    // Waiting for deltas nobody builds would never end: --timeout implies --wait, which
    // implies --prepare (as balena's release-update does).
    let wait = args.wait || args.timeout.is_some();
    let prepare = args.prepare || wait;
    let options = UpdateOptions {
        store: DeltaStore::parse(&args.deltas).context("--deltas")?,
        diff: DiffOptions { level: args.level.level(), fidelity: args.fidelity.fidelity(), ..DiffOptions::default() },
        prepare,
        wait,
        timeout: args.timeout.map(|t| seconds(t, "--timeout")).transpose()?,
        poll: seconds(args.poll, "--poll")?.max(Duration::from_millis(50)),
    };
    let update = release_update(&transfer, &from, &to, facts.as_ref(), &options, progress)
        .with_context(|| format!("release update {} -> {}", from.id, to.id))
        .inspect_err(|e| {
            // Scripts reading --json learn why, as JSON, besides the exit status.
            if let (true, Some(json)) = (args.json, super::exit::rejection_json(e)) {
                outln!("{json:#}");
            }
        })?;
    if args.json {
        let mut json = update.transition.to_json();
        if prepare {
            json["prepared"] = serde_json::to_value(&update.prepared)?;
        }
        if let Some(reason) = &update.timed_out {
            json["timed_out"] = serde_json::Value::String(reason.clone());
        }
        outln!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        out!("{}", render_table(&update.transition));
        if prepare {
            let p = &update.prepared;
            outln!(
                "prepared: {} built ({}), {} already built, {} being built elsewhere",
                p.built.len(),
                human_bytes(p.built.iter().map(|b| b.download).sum()),
                p.reused,
                p.building_elsewhere
            );
            for b in &p.built {
                outln!("  built {} ({}, {:.1} s)", b.reference, human_bytes(b.download), b.seconds);
            }
        }
    }
    if let Some(reason) = update.timed_out {
        eprintln!("fleetdelta: error: release update {} -> {}: {reason}", from.id, to.id);
        return Ok(ExitCode::from(super::exit::TIMED_OUT));
    }
    Ok(ExitCode::SUCCESS)
}
