//! `fleetdelta copy`.

use anyhow::Context;
use fleetdelta::{ImageRef, Progress, Transfer};

use super::human_bytes;

/// The command's flags and arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// The image to copy.
    pub source: String,
    /// Where to put it.
    pub destination: String,
}

pub fn run(transfer: &Transfer, args: &Args, progress: &dyn Progress) -> anyhow::Result<()> {
    let Args { json, ref source, ref destination } = *args;
    let (source, destination) = (ImageRef::parse(source)?, ImageRef::parse(destination)?);
    let report = fleetdelta::platforms::copy(transfer, &source, &destination, progress).with_context(|| format!("copy {source} -> {destination}"))?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let manifest = report.manifest.map(|d| d.to_string()).unwrap_or_default();
    outln!("copied {source} to {destination} ({manifest})");
    if let Some(f) = &report.fetched {
        outln!("  fetched {} blobs ({} received, {} resumed), reused {}", f.blobs_downloaded, human_bytes(f.received), f.resumes, f.blobs_reused);
    }
    if let Some(loaded) = &report.loaded {
        super::print_loaded(&destination, loaded);
    }
    if let Some(p) = &report.pushed {
        outln!("  pushed {} blobs ({}), {} already there or mounted", p.blobs_uploaded, human_bytes(p.bytes_uploaded), p.blobs_skipped);
    }
    Ok(())
}
