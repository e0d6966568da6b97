//! `fleetdelta diff`.

use anyhow::Context;
use fleetdelta::image::Platform;
use fleetdelta::platforms::{diff_images, PlatformsReport};
use fleetdelta::{DiffOptions, ImageRef, Progress, Transfer};

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
    /// With image indexes: the delta of this platform alone (OS/ARCH[/VARIANT], e.g.
    /// linux/arm64), instead of a delta index of every platform of TARGET.
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<String>,
    /// The image the devices have (oci:DIR[:TAG], docker://HOST/REPO[:TAG|@DIGEST] or
    /// docker-daemon:NAME[:TAG]).
    pub source: String,
    /// The image they need (an image index: a delta per platform, from SOURCE's entry for the
    /// same platform).
    pub target: String,
    /// Where to write the delta image (a delta index when both images are indexes).
    pub delta: String,
}

pub fn run(transfer: &Transfer, args: &Args, progress: &dyn Progress) -> anyhow::Result<()> {
    let Args { level, max_layer_size, fidelity, json, ref platform, ref source, ref target, ref delta } = *args;
    let level = level.level();
    let (source, target, delta) = (ImageRef::parse(source)?, ImageRef::parse(target)?, ImageRef::parse(delta)?);
    if matches!(delta, ImageRef::Engine(_)) {
        anyhow::bail!("a delta is not a runnable image: write it to oci:DIR[:TAG] or docker://..., not {delta}");
    }
    let platform = platform.as_deref().map(Platform::parse).transpose().context("--platform")?;
    let options = DiffOptions { level, max_layer_bytes: max_layer_size, fidelity: fidelity.fidelity() };
    let written =
        diff_images(transfer, &source, &target, &delta, platform.as_ref(), &options, progress).with_context(|| format!("diff {source} -> {target}"))?;
    if let Some(index) = &written.index {
        return report_index(&delta, index, &written, json);
    }
    let Some(one) = written.deltas.first() else { anyhow::bail!("diff {source} -> {target}: no delta was written") };
    let report = &one.report;
    if json {
        // Per layer as `info --json` says it (the delta's own plan is its wire format).
        let layers = fleetdelta::info(&one.local).with_context(|| format!("reading back the delta written for {delta}"))?;
        let mut out = serde_json::json!({
            "delta": delta.to_string(),
            "delta_manifest": report.delta_manifest,
            "delta_bytes": report.delta_bytes,
            "full_pull_bytes": report.full_pull_bytes,
            "pushed": written.pushed,
            "layers": layers.layers,
        });
        if let Some(p) = &one.platform {
            out["platform"] = serde_json::Value::String(p.to_string());
        }
        outln!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let platform = one.platform.as_ref().map(|p| format!(" for {p}")).unwrap_or_default();
        outln!(
            "wrote {delta} ({}){platform}: {} to download instead of {} ({:.1}% of a pull of the missing layers)",
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

/// What a delta index holds, one line (or JSON entry) per platform.
fn report_index(delta: &ImageRef, index: &fleetdelta::image::BlobRef, written: &PlatformsReport, json: bool) -> anyhow::Result<()> {
    let platform = |d: &fleetdelta::platforms::PlatformDelta| d.platform.as_ref().map(ToString::to_string).unwrap_or_default();
    if json {
        let mut platforms = Vec::with_capacity(written.deltas.len());
        for d in &written.deltas {
            let layers = fleetdelta::info(&d.local).with_context(|| format!("reading back the delta for {} written for {delta}", platform(d)))?;
            platforms.push(serde_json::json!({
                "platform": platform(d),
                "delta_manifest": d.report.delta_manifest,
                "delta_bytes": d.report.delta_bytes,
                "full_pull_bytes": d.report.full_pull_bytes,
                "layers": layers.layers,
            }));
        }
        let out = serde_json::json!({
            "delta": delta.to_string(),
            "delta_manifest": index.digest,
            "delta_bytes": written.delta_bytes(),
            "full_pull_bytes": written.deltas.iter().map(|d| d.report.full_pull_bytes).sum::<u64>(),
            "pushed": null,
            "layers": [],
            "platforms": platforms,
        });
        outln!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    outln!("wrote {delta} ({}): a delta index of {} platforms; a device downloads its own platform's delta", index.digest, written.deltas.len());
    for d in &written.deltas {
        let r = &d.report;
        outln!(
            "  {:<14} {}: {} instead of {} ({:.1}%)",
            platform(d),
            r.delta_manifest,
            human_bytes(r.delta_bytes),
            human_bytes(r.full_pull_bytes),
            100.0 * r.delta_bytes as f64 / r.full_pull_bytes.max(1) as f64
        );
    }
    Ok(())
}
