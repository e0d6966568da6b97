//! `fleetdelta apply`.

use anyhow::Context;
use fleetdelta::{apply, ApplyOptions, ImageRef, LayerOutput, Progress};

use super::LayersArg;

#[allow(clippy::too_many_arguments)]
pub fn run(
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
    let options = ApplyOptions {
        layers: match layers {
            LayersArg::Original => LayerOutput::Original,
            LayersArg::Uncompressed => LayerOutput::Uncompressed,
        },
        expect_target: expect_target.map(str::parse).transpose().context("--expect-target")?,
        max_layer_bytes: max_layer_size,
        jobs,
    };
    let report = apply(&source, &delta, &output, &options, progress).with_context(|| format!("apply {delta} to {source}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let identical = report.layers.iter().filter(|l| l.identical).count();
    println!("rebuilt {output}: every diff_id and the config digest {} verified", report.config);
    if report.identical() {
        println!("manifest {}: identical to the target, all {} layer blobs identical", report.written_manifest, report.layers.len());
    } else {
        println!(
            "manifest {}: rewritten (target manifest is {}); {identical} of {} layer blobs identical, the others recompressed with the same verified content",
            report.written_manifest,
            report.target_manifest,
            report.layers.len()
        );
    }
    for l in &report.layers {
        let state = if l.identical { "identical".to_string() } else { format!("rewritten as {}", l.written) };
        println!("  layer {:>2} {:<6} {} {state}", l.index, format!("{:?}", l.method).to_lowercase(), l.original);
    }
    Ok(())
}
