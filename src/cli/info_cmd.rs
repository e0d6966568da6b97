//! `fleetdelta info`.

use anyhow::Context;
use fleetdelta::info::{info_with_files, Coding, FileCost, FilesOptions, LayerFiles};
use fleetdelta::platforms::{delta_for_platform, info_index, source_for_apply};
use fleetdelta::{info, ApplyOptions, DeltaInfo, ImageRef, Progress, Silent, Transfer};

use super::human_bytes;

/// The command's flags and arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The delta image.
    pub delta: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Also show where each patch's bytes go, file by file: replays every patch against
    /// --source (storing nothing) and estimates each file's share of the compressed chunks by
    /// compressing them again. Text lists the --top files of each patched layer, JSON all of
    /// them (`files` under each patched layer).
    #[arg(long, requires = "source")]
    pub files: bool,
    /// The image the delta was made against, which --files reads.
    #[arg(long, value_name = "IMAGE", requires = "files")]
    pub source: Option<String>,
    /// With --files, the files listed per patched layer, most costly first.
    #[arg(long, value_name = "N", default_value_t = 20, requires = "files")]
    pub top: usize,
}

pub fn run(transfer: &Transfer, args: &Args, progress: &dyn Progress) -> anyhow::Result<()> {
    let Args { ref delta, json, files, ref source, top } = *args;
    let delta = ImageRef::parse(delta)?;
    let info = match (files, source) {
        (true, Some(source)) => {
            let source = ImageRef::parse(source)?;
            // From a delta index, the delta of the source's platform.
            let (local_source, platform) = source_for_apply(transfer, &source, None, progress).with_context(|| format!("fetching {source}"))?;
            let (local, _) = delta_for_platform(transfer, &delta, &platform, &Silent).with_context(|| format!("fetching {delta}"))?;
            let scratch = transfer.scratch_layout("info-files")?;
            std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
            // The applier's bound on a layer, for the source layers decompressed and the tars rebuilt.
            let options = FilesOptions { source: local_source, scratch, max_layer_bytes: ApplyOptions::default().max_layer_bytes };
            info_with_files(&local, &options, progress).with_context(|| format!("info --files {delta} against {source}"))?
        }
        _ => {
            if let Some(index) = info_index(transfer, &delta, &Silent).with_context(|| format!("info {delta}"))? {
                if json {
                    outln!("{}", serde_json::to_string_pretty(&index)?);
                    return Ok(());
                }
                outln!("delta index {} ({} platforms)", index.delta_index, index.platforms.len());
                for p in &index.platforms {
                    outln!();
                    outln!("platform {}", p.platform.as_deref().unwrap_or("(none given)"));
                    print_info(&p.info, top);
                }
                return Ok(());
            }
            let (local, _) = transfer.localize(&delta, &Silent).with_context(|| format!("fetching {delta}"))?;
            info(&local).with_context(|| format!("info {delta}"))?
        }
    };
    if json {
        outln!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    print_info(&info, top);
    Ok(())
}

/// One delta in words: its images, payload and layers, and with --files where its bytes go.
fn print_info(info: &DeltaInfo, top: usize) {
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
                    let differences = if st.difference_chunks > 0 { format!(", differences in {} LZMA chunks", st.difference_chunks) } else { String::new() };
                    format!(
                        " ({} similar files as approximate matches: {} added to source bytes{differences})",
                        st.files_approximated,
                        human_bytes(st.added_bytes)
                    )
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
            format!("{detail}; files patched in another form ({}), turned back exactly: {}", human_bytes(bytes), by.join(", "))
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
    for l in &info.layers {
        if let Some(files) = &l.files {
            print_files(l.index, files, top);
        }
    }
}

/// The `top` costliest entries of a patched layer, then where the rest of its patch goes.
fn print_files(layer: u32, files: &LayerFiles, top: usize) {
    let share = |n: u64| 100.0 * n as f64 / files.patch_bytes.max(1) as f64;
    outln!();
    outln!(
        "layer {layer}: {} of patch, by file (estimated: each chunk compressed again at zstd {}, flushed between files, scaled to the real frame)",
        human_bytes(files.patch_bytes),
        files.estimate_zstd_level
    );
    let mut entries: Vec<&FileCost> = files.entries.iter().filter(|e| e.is_entry()).collect();
    entries.sort_by_key(|e| (std::cmp::Reverse(e.cost_bytes), std::cmp::Reverse(e.contents.literal_bytes + e.contents.added_bytes)));
    outln!("{:>10}  {:>6}  {:>10}  {:>10}  {:<40}  path", "cost", "share", "size", "hdr cost", "coded as");
    for e in entries.iter().take(top) {
        let uncompressed = match e.members_patched_uncompressed {
            0 => String::new(),
            1 => " (patched uncompressed)".into(),
            n => format!(" ({n} members patched uncompressed)"),
        };
        outln!(
            "{:>10}  {:>5.1}%  {:>10}  {:>10}  {:<40}  {}{uncompressed}",
            human_bytes(e.cost_bytes),
            share(e.cost_bytes),
            human_bytes(e.size),
            human_bytes(e.header_cost_bytes),
            coded_as(e),
            e.path
        );
    }
    if entries.len() > top {
        let rest: u64 = entries[top..].iter().map(|e| e.cost_bytes).sum();
        outln!("{:>10}  {:>5.1}%  ({} more entries)", human_bytes(rest), share(rest), entries.len() - top);
    }
    outln!(
        "{:>10}  {:>5.1}%  tar headers and padding (counted above with their entries, and the end of the archive)",
        human_bytes(files.header_cost_bytes),
        share(files.header_cost_bytes)
    );
    outln!(
        "{:>10}  {:>5.1}%  records and framing (the patch beyond its chunks' frames, at least the records compressed alone)",
        human_bytes(files.records_and_framing_bytes),
        share(files.records_and_framing_bytes)
    );
    if files.chunk_frame_bytes != files.chunk_cost_bytes {
        outln!(
            "{:>10}  {:>5}   chunk frames before the patch's own zstd frame ({} in the patch, which the files share)",
            human_bytes(files.chunk_frame_bytes),
            "",
            human_bytes(files.chunk_cost_bytes)
        );
    }
}

/// How an entry was rebuilt: its contents' bytes by record, and its headers' when a chunk
/// carried any of them.
fn coded_as(e: &FileCost) -> String {
    let contents = describe(&e.contents);
    let h = &e.header;
    if h.literal_bytes + h.added_bytes == 0 {
        return contents;
    }
    format!("{contents}; header {}", describe(&Coding { copied_bytes: 0, retimed_bytes: 0, ..*h }))
}

fn describe(c: &Coding) -> String {
    let parts: Vec<String> = [("copied", c.copied_bytes), ("retimed", c.retimed_bytes), ("added", c.added_bytes), ("literal", c.literal_bytes)]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(how, n)| format!("{how} {}", human_bytes(*n)))
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" + ")
    }
}
