//! `fleetdelta info`.

use anyhow::Context;
use fleetdelta::{info, ImageRef, Silent, Transfer};

use super::human_bytes;

/// The command's flags and arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The delta image.
    pub delta: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(transfer: &Transfer, args: &Args) -> anyhow::Result<()> {
    let Args { ref delta, json } = *args;
    let delta = ImageRef::parse(delta)?;
    let (local, _) = transfer.localize(&delta, &Silent).with_context(|| format!("fetching {delta}"))?;
    let info = info(&local).with_context(|| format!("info {delta}"))?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    outln!("delta {} (format {}, level {}, {})", info.delta_manifest, info.format_version, info.level, info.created_by);
    if !info.features.is_empty() {
        outln!("features {}", info.features.join(", "));
    }
    outln!("source manifest {} config {}", info.source_manifest, info.source_config);
    outln!("target manifest {} config {}", info.target_manifest, info.target_config);
    outln!(
        "payload {} for a {} target image ({:.1}%)",
        human_bytes(info.payload_bytes),
        human_bytes(info.target_bytes),
        100.0 * info.payload_bytes as f64 / info.target_bytes.max(1) as f64
    );
    outln!("{:>5}  {:<6}  {:>10}  {:>10}  {:>7}  {:<32}  detail", "layer", "method", "blob", "payload", "ratio", "blob rebuilt");
    for l in &info.layers {
        let detail = match (&l.source_layer, &l.stats) {
            (Some(s), _) => format!("equals source layer {s}"),
            (_, Some(st)) => {
                format!(
                    "{} files: {} unchanged, {} similar, {} new; {} copied, {} literal in {} chunks",
                    st.files,
                    st.files_unchanged,
                    st.files_similar,
                    st.files_new,
                    human_bytes(st.copied_bytes),
                    human_bytes(st.literal_bytes),
                    st.chunks
                ) + &if st.files_approximated > 0 {
                    format!(" ({} similar files as approximate matches: {} added to source bytes)", st.files_approximated, human_bytes(st.added_bytes))
                } else {
                    String::new()
                }
            }
            _ => String::new(),
        };
        let detail = if l.repacked_members.is_empty() {
            detail
        } else {
            let by: Vec<String> = l.repacked_members.iter().map(|(e, n)| format!("{n} {e}")).collect();
            let bytes = l.stats.as_ref().map_or(0, |s| s.member_bytes);
            format!("{detail}; compressed files patched uncompressed ({}), repacked exactly: {}", human_bytes(bytes), by.join(", "))
        };
        outln!(
            "{:>5}  {:<6}  {:>10}  {:>10}  {:>6.1}%  {:<32}  {detail}",
            l.index,
            format!("{:?}", l.method).to_lowercase(),
            human_bytes(l.blob_bytes),
            human_bytes(l.payload_bytes),
            100.0 * l.payload_bytes as f64 / l.blob_bytes.max(1) as f64,
            l.encoding_summary()
        );
    }
    Ok(())
}
