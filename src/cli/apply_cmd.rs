//! `fleetdelta apply`.

use anyhow::Context;
use fleetdelta::image::Platform;
use fleetdelta::platforms::{delta_for_platform, source_for_apply};
use fleetdelta::{apply, ApplyOptions, ImageRef, Progress, Transfer};

use super::LayersArg;

/// The command's flags and arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How to store rebuilt layers.
    #[arg(long, value_enum, default_value = "original")]
    pub layers: LayersArg,
    /// Refuse the delta unless it rebuilds this target manifest digest.
    #[arg(long)]
    pub expect_target: Option<String>,
    /// Largest uncompressed layer accepted, in bytes.
    #[arg(long, default_value_t = 64 << 30)]
    pub max_layer_size: u64,
    /// Layers rebuilt at once, and threads compressing byte-exact pgzip blocks (1 to 1024; no more than the machine's cores are used).
    #[arg(long, default_value_t = 2, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    pub jobs: usize,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// The platform to rebuild (OS/ARCH[/VARIANT]): SOURCE's entry for it when SOURCE is an
    /// image index, and DELTA's when it is a delta index. By default, SOURCE's own platform
    /// (this machine's when SOURCE is an index).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<String>,
    /// The image the device has.
    pub source: String,
    /// The delta image, or a delta index (the delta for SOURCE's platform is taken).
    pub delta: String,
    /// Where to write the rebuilt image (into docker-daemon:NAME[:TAG], with plain layers,
    /// tagged once the engine holds it verified).
    pub output: String,
}

pub fn run(transfer: &Transfer, args: &Args, progress: &dyn Progress) -> anyhow::Result<()> {
    let Args { layers, ref expect_target, max_layer_size, jobs, json, ref platform, ref source, ref delta, ref output } = *args;
    let platform = platform.as_deref().map(Platform::parse).transpose().context("--platform")?;
    let expect_target = expect_target.as_deref();
    let (source, delta, output) = (ImageRef::parse(source)?, ImageRef::parse(delta)?, ImageRef::parse(output)?);
    // The engine stores layers uncompressed: re-encoding them exactly would be wasted work.
    let layers = if matches!(output, ImageRef::Engine(_)) { fleetdelta::LayerOutput::Uncompressed } else { layers.output() };
    let options =
        ApplyOptions { layers, expect_target: expect_target.map(str::parse).transpose().context("--expect-target")?, max_layer_bytes: max_layer_size, jobs };
    let (local_source, platform) = source_for_apply(transfer, &source, platform.as_ref(), progress).with_context(|| format!("fetching {source}"))?;
    let (local_delta, fetched) = delta_for_platform(transfer, &delta, &platform, progress).with_context(|| format!("fetching {delta}"))?;
    let staged = transfer.staging_for(&output)?;
    let report = apply(&local_source, &local_delta, &staged, &options, progress).with_context(|| format!("apply {delta} to {source}"))?;
    let published = transfer.publish_report(&staged, &output, progress).with_context(|| format!("writing the rebuilt image to {output}"))?;
    if let (Some(f), false) = (&fetched, json) {
        outln!("fetched {delta}: {} received, {} resumed downloads", super::human_bytes(f.received), f.resumes);
    }
    if json {
        let mut out = serde_json::to_value(&report)?;
        if let (Some(loaded), Some(map)) = (&published.loaded, out.as_object_mut()) {
            map.insert("loaded".into(), serde_json::to_value(loaded)?);
        }
        outln!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if let Some(loaded) = &published.loaded {
        super::print_loaded(&output, loaded);
    }
    let identical = report.layers.iter().filter(|l| l.identical).count();
    outln!("rebuilt {output}: every diff_id and the config digest {} verified", report.config);
    if report.identical() {
        outln!("manifest {}: identical to the target, all {} layer blobs identical", report.written_manifest, report.layers.len());
    } else {
        outln!(
            "manifest {}: rewritten (target manifest is {}); {identical} of {} layer blobs identical, the others recompressed with the same verified content",
            report.written_manifest,
            report.target_manifest,
            report.layers.len()
        );
    }
    for l in &report.layers {
        let state = if l.identical { "identical".to_string() } else { format!("rewritten as {}", l.written) };
        outln!("  layer {:>2} {:<6} {} {state}", l.index, format!("{:?}", l.method).to_lowercase(), l.original);
    }
    Ok(())
}
