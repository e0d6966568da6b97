//! `fleetdelta diff`.

use anyhow::Context;
use fleetdelta::{diff, DiffOptions, ImageRef, Progress, Transfer};

use super::{human_bytes, FidelityArg, LevelArg};

/// The command's flags and arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Effort: fast, default or max.
    #[arg(long, value_enum, default_value = "default")]
    pub level: LevelArg,
    /// Largest uncompressed layer accepted, in bytes.
    #[arg(long, default_value_t = 64 << 30)]
    pub max_layer_size: u64,
    /// What the rebuilt image must preserve: exact (every digest) or content (diff_ids).
    #[arg(long, value_enum, default_value = "exact")]
    pub fidelity: FidelityArg,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// The image the devices have (oci:DIR[:TAG], docker://HOST/REPO[:TAG|@DIGEST] or
    /// docker-daemon:NAME[:TAG]).
    pub source: String,
    /// The image they need.
    pub target: String,
    /// Where to write the delta image.
    pub delta: String,
}

pub fn run(transfer: &Transfer, args: &Args, progress: &dyn Progress) -> anyhow::Result<()> {
    let Args { level, max_layer_size, fidelity, json, ref source, ref target, ref delta } = *args;
    let level = level.level();
    let (source, target, delta) = (ImageRef::parse(source)?, ImageRef::parse(target)?, ImageRef::parse(delta)?);
    if matches!(delta, ImageRef::Engine(_)) {
        anyhow::bail!("a delta is not a runnable image: write it to oci:DIR[:TAG] or docker://..., not {delta}");
    }
    let options = DiffOptions { level, max_layer_bytes: max_layer_size, fidelity: fidelity.fidelity() };
    let (local_source, _) = transfer.localize(&source, progress).with_context(|| format!("fetching {source}"))?;
    let (local_target, _) = transfer.localize(&target, progress).with_context(|| format!("fetching {target}"))?;
    let staged = transfer.staging_for(&delta)?;
    let report = diff(&local_source, &local_target, &staged, &options, progress).with_context(|| format!("diff {source} -> {target}"))?;
    // Per layer as `info --json` says it (the delta's own plan is its wire format).
    let layers = json.then(|| fleetdelta::info(&staged).with_context(|| format!("reading back the delta written for {delta}"))).transpose()?;
    let pushed = transfer.publish(&staged, &delta, progress).with_context(|| format!("pushing the delta to {delta}"))?;
    if json {
        let out = serde_json::json!({
            "delta": delta.to_string(),
            "delta_manifest": report.delta_manifest,
            "delta_bytes": report.delta_bytes,
            "full_pull_bytes": report.full_pull_bytes,
            "pushed": pushed,
            "layers": layers.map(|i| i.layers).unwrap_or_default(),
        });
        outln!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        outln!(
            "wrote {delta} ({}): {} to download instead of {} ({:.1}% of a pull of the missing layers)",
            report.delta_manifest,
            human_bytes(report.delta_bytes),
            human_bytes(report.full_pull_bytes),
            100.0 * report.delta_bytes as f64 / report.full_pull_bytes.max(1) as f64
        );
        let layers = &report.plan.layers;
        let rewritten: Vec<String> = layers.iter().filter(|l| l.encoding.as_ref().is_some_and(|e| !e.keeps_digest())).map(|l| l.index.to_string()).collect();
        if rewritten.is_empty() {
            outln!("bit-exact: the rebuilt image will have the target's manifest digest ({} layers)", layers.len());
        } else {
            outln!(
                "content-exact: layers {} will be recompressed with other blob digests (no known encoder reproduces them); every diff_id is kept",
                rewritten.join(", ")
            );
        }
    }
    Ok(())
}
