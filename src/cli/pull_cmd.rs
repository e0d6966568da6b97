//! `fleetdelta pull`.

use anyhow::{bail, Context};
use std::time::Duration;

use fleetdelta::pull::{pull_into, PullMethod, ServiceOptions};
use fleetdelta::{ApplyOptions, ImageRef, Progress, PullOptions, Transfer};

use super::{human_bytes, LayersArg};

/// The command's flags and arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The image the device has (a local layout or docker-daemon:NAME[:TAG]).
    #[arg(long, value_name = "IMAGE")]
    pub from: Option<String>,
    /// Use this delta instead of looking among the target's referrers.
    #[arg(long, value_name = "IMAGE")]
    pub delta: Option<String>,
    /// Never download whole layers: fail when there is no usable delta (metered links).
    #[arg(long)]
    pub no_full_download: bool,
    /// Ask this builder service (http://HOST:PORT) for the delta, and wait while it is built.
    #[arg(long, value_name = "URL", env = "FLEETDELTA_SERVICE")]
    pub service: Option<String>,
    /// Longest wait, in seconds, for the service to build the delta.
    #[arg(long, value_name = "SECONDS", default_value_t = 300.0, requires = "service")]
    pub service_wait: f64,
    /// How to store rebuilt layers.
    #[arg(long, value_enum, default_value = "original")]
    pub layers: LayersArg,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// The image wanted (docker://HOST/REPO[:TAG|@DIGEST]).
    pub target: String,
    /// The local layout to write it to (oci:DIR[:TAG]), or docker-daemon:NAME[:TAG].
    pub output: String,
}

pub fn run(transfer: &Transfer, args: &Args, progress: &dyn Progress) -> anyhow::Result<()> {
    let (from, delta, service) = (args.from.as_deref(), args.delta.as_deref(), args.service.as_deref());
    let (allow_full, service_wait, layers, json) = (!args.no_full_download, args.service_wait, args.layers, args.json);
    let (target, output) = (args.target.as_str(), args.output.as_str());
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
