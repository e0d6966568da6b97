//! `fleetdelta gc`.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use fleetdelta::retention::{collect_garbage, parse_cutoff, RetentionPolicy, Verdict};
use fleetdelta::{ImageRef, Transfer};

/// The command's flags and arguments.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("policy").required(true).multiple(true).args(["keep_targets", "older_than"])))]
pub struct Args {
    /// The repository whose deltas are collected: docker://HOST/NAME.
    #[arg(long)]
    pub repository: String,
    /// Keep the deltas of the N newest images (by their config's `created` time).
    #[arg(long, value_name = "N")]
    pub keep_targets: Option<usize>,
    /// Delete the deltas of images created before this date (2026-12-01, an RFC 3339 time)
    /// or longer ago than this duration (90d, 12h, 2w). With --keep-targets, an image kept by
    /// either is kept.
    #[arg(long, value_name = "DATE|DURATION")]
    pub older_than: Option<String>,
    /// Report what would be deleted; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(transfer: &Transfer, args: &Args) -> anyhow::Result<()> {
    let repository = match ImageRef::parse(&args.repository)? {
        ImageRef::Registry(r) if r.tag.is_none() && r.digest.is_none() => r,
        other => bail!("--repository is docker://HOST/NAME, without a tag or digest (got {other})"),
    };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let keep_since = args.older_than.as_deref().map(|t| parse_cutoff(t, now)).transpose()?;
    let policy = RetentionPolicy { keep_newest: args.keep_targets, keep_since, ..RetentionPolicy::default() };
    let report =
        transfer.block_on(collect_garbage(transfer.client(), &repository, &policy, args.dry_run)).with_context(|| format!("gc {}", args.repository))?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    for image in &report.images {
        let created = image.created.as_deref().unwrap_or("unknown age");
        outln!("{} {} {} ({created})", if image.kept { "keep image " } else { "old image  " }, image.tags.join(","), image.digest);
    }
    for d in &report.deltas {
        let action = match (d.verdict, report.dry_run) {
            (Verdict::Keep, _) => "keep",
            (Verdict::Delete, true) => "would delete",
            (Verdict::Delete, false) => "deleted",
        };
        let tags = if d.tags.is_empty() { String::new() } else { format!(" [{}]", d.tags.join(",")) };
        outln!("{action} delta {}{tags}: {}", d.digest, d.reason);
    }
    let verb = if report.dry_run { "would delete" } else { "deleted" };
    outln!("{}: {} deltas kept, {} {verb}; blobs are left to the registry's garbage collector", report.repository, report.kept, report.deleted);
    Ok(())
}
