//! `fleetdelta apply`.

use anyhow::Context;
use fleetdelta::{apply, ApplyOptions, ImageRef, Progress, Transfer};

use super::LayersArg;

#[allow(clippy::too_many_arguments)]
pub fn run(
    transfer: &Transfer,
    layers: LayersArg,
    expect_target: Option<&str>,
    max_layer_size: u64,
    jobs: usize,
    json: bool,
    source: &str,
    delta: &str,
    output: &str,
    progress: &dyn Progress,
) -> anyhow::Result<()> {
    let (source, delta, output) = (ImageRef::parse(source)?, ImageRef::parse(delta)?, ImageRef::parse(output)?);
    // The engine stores layers uncompressed: re-encoding them exactly would be wasted work.
    let layers = if matches!(output, ImageRef::Engine(_)) { fleetdelta::LayerOutput::Uncompressed } else { layers.output() };
    let options =
        ApplyOptions { layers, expect_target: expect_target.map(str::parse).transpose().context("--expect-target")?, max_layer_bytes: max_layer_size, jobs };
    let (local_source, _) = transfer.localize(&source, progress).with_context(|| format!("fetching {source}"))?;
    let (local_delta, fetched) = transfer.localize(&delta, progress).with_context(|| format!("fetching {delta}"))?;
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
