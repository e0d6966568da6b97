//! `fleetdelta release-update`.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use fleetdelta::delta_store::DeltaStore;
use fleetdelta::release::oci_architecture;
use fleetdelta::release::{render_table, DeviceFacts, Release};
use fleetdelta::release_update::{release_update, UpdateOptions};
use fleetdelta::{DiffOptions, Progress};

use super::{human_bytes, FidelityArg, LevelArg, RegistryArgs};

/// The command's arguments.
pub struct Args<'a> {
    pub from: &'a Path,
    pub to: &'a Path,
    pub device: Option<&'a Path>,
    pub deltas: &'a str,
    pub prepare: bool,
    pub wait: bool,
    pub timeout: Option<f64>,
    pub poll: f64,
    pub level: LevelArg,
    pub fidelity: FidelityArg,
    pub json: bool,
}

fn seconds(value: f64, flag: &str) -> anyhow::Result<Duration> {
    if !value.is_finite() || !(0.0..=1e9).contains(&value) {
        bail!("{flag} must be a number of seconds, not {value}");
    }
    Ok(Duration::from_secs_f64(value))
}

pub fn run(registry: &RegistryArgs, args: &Args, progress: &dyn Progress) -> anyhow::Result<ExitCode> {
    let from = Release::load(args.from)?;
    let to = Release::load(args.to)?;
    let facts = args.device.map(DeviceFacts::load).transpose()?;
    // Multi-platform images resolve to the device's architecture when its facts name one.
    let arch = facts.as_ref().and_then(|f| f.arch.as_deref()).and_then(oci_architecture);
    let transfer = registry.transfer(arch)?;
    // Waiting for deltas nobody builds would never end: --timeout implies --wait, which
    // implies --prepare (as balena's release-update does).
    let wait = args.wait || args.timeout.is_some();
    let prepare = args.prepare || wait;
    let options = UpdateOptions {
        store: DeltaStore::parse(args.deltas).context("--deltas")?,
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
