//! `fleetdelta pull`.

use anyhow::{bail, Context};
use fleetdelta::pull::PullMethod;
use fleetdelta::{pull, ApplyOptions, ImageRef, Progress, PullOptions, Transfer};

use super::{human_bytes, LayersArg};

#[allow(clippy::too_many_arguments)]
pub fn run(
    transfer: &Transfer,
    from: Option<&str>,
    delta: Option<&str>,
    allow_full: bool,
    layers: LayersArg,
    json: bool,
    target: &str,
    output: &str,
    progress: &dyn Progress,
) -> anyhow::Result<()> {
    let ImageRef::Registry(target) = ImageRef::parse(target)? else { bail!("the image to pull must be a registry image (docker://...)") };
    let delta = match delta.map(ImageRef::parse).transpose()? {
        None => None,
        Some(ImageRef::Registry(d)) => Some(d),
        Some(_) => bail!("--delta must be a registry image (docker://...)"),
    };
    let from = from.map(ImageRef::parse).transpose()?;
    let output = ImageRef::parse(output)?;
    let options = PullOptions { allow_full, delta, apply: ApplyOptions { layers: layers.output(), ..ApplyOptions::default() } };
    let report = pull(transfer, from.as_ref(), &target, &output, &options, progress).with_context(|| format!("pull docker://{target}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    match &report.method {
        PullMethod::Unchanged => println!("{output} already has docker://{target} ({})", report.target_manifest),
        PullMethod::Delta { delta, .. } => println!(
            "rebuilt docker://{target} ({}) in {output} from the delta {delta}: {} received instead of {}",
            report.target_manifest,
            human_bytes(report.received),
            human_bytes(report.missing_layers_bytes)
        ),
        PullMethod::Full { reason } => {
            println!("downloaded the missing layers of docker://{target} ({}) into {output}: {} received ({reason})", report.target_manifest, human_bytes(report.received))
        }
    }
    if report.written_manifest != report.target_manifest {
        println!("  written manifest {} (layers recompressed; every diff_id and the config verified)", report.written_manifest);
    }
    Ok(())
}
