//! `fleetdelta pull`.

use anyhow::{bail, Context};
use std::time::Duration;

use fleetdelta::pull::{pull_into, PullMethod, ServiceOptions};
use fleetdelta::{ApplyOptions, ImageRef, Progress, PullOptions, Transfer};

use super::{human_bytes, LayersArg};

/// The command's flags.
#[derive(Clone, Copy)]
pub struct Args<'a> {
    pub from: Option<&'a str>,
    pub delta: Option<&'a str>,
    pub allow_full: bool,
    pub service: Option<&'a str>,
    pub service_wait: f64,
    pub layers: LayersArg,
    pub json: bool,
}

pub fn run(transfer: &Transfer, args: &Args, target: &str, output: &str, progress: &dyn Progress) -> anyhow::Result<()> {
    let Args { from, delta, allow_full, service, service_wait, layers, json } = *args;
    if !service_wait.is_finite() || !(0.0..=1e7).contains(&service_wait) {
        bail!("--service-wait must be a number of seconds, not {service_wait}");
    }
    let service = service.map(|url| ServiceOptions { url: url.to_string(), max_wait: Duration::from_secs_f64(service_wait) });
    let ImageRef::Registry(target) = ImageRef::parse(target)? else { bail!("the image to pull must be a registry image (docker://...)") };
    let delta = match delta.map(ImageRef::parse).transpose()? {
        None => None,
        Some(ImageRef::Registry(d)) => Some(d),
        Some(_) => bail!("--delta must be a registry image (docker://...)"),
    };
    let from = from.map(ImageRef::parse).transpose()?;
    let output = ImageRef::parse(output)?;
    let options = PullOptions { allow_full, delta, service, apply: ApplyOptions { layers: layers.output(), ..ApplyOptions::default() }, source: None };
    let (report, published) =
        pull_into(transfer, from.as_ref(), &target, &output, &options, progress).with_context(|| format!("pull docker://{target} into {output}"))?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    if let Some(loaded) = &published.loaded {
        super::print_loaded(&output, loaded);
    }
    match &report.method {
        PullMethod::Unchanged => outln!("{output} already has docker://{target} ({})", report.target_manifest),
        PullMethod::Delta { delta, .. } => outln!(
            "rebuilt docker://{target} ({}) in {output} from the delta {delta}: {} received instead of {}",
            report.target_manifest,
            human_bytes(report.received),
            human_bytes(report.missing_layers_bytes)
        ),
        PullMethod::Full { reason } => {
            outln!(
                "downloaded the missing layers of docker://{target} ({}) into {output}: {} received ({reason})",
                report.target_manifest,
                human_bytes(report.received)
            )
        }
    }
    if let Some(note) = &report.service {
        outln!("  service: {note}");
    }
    if report.written_manifest != report.target_manifest {
        outln!("  written manifest {} (layers recompressed; every diff_id and the config verified)", report.written_manifest);
    }
    Ok(())
}
