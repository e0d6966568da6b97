//! Command-line parsing and dispatch.

mod apply_cmd;
mod diff_cmd;
mod info_cmd;
mod progress;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Binary deltas between OCI images, shipped as ordinary OCI images.
#[derive(Debug, Parser)]
#[command(name = "fleetdelta", version, about)]
pub struct Cli {
    /// No progress bars.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Effort levels.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LevelArg {
    /// Quick.
    Fast,
    /// Balanced.
    Default,
    /// Smallest payload.
    Max,
}

/// Layer storage of the rebuilt image.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LayersArg {
    /// The target's compression.
    Original,
    /// Plain tars.
    Uncompressed,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Compute the delta from SOURCE to TARGET and write it as an OCI image to DELTA.
    Diff {
        /// Effort: fast, default or max.
        #[arg(long, value_enum, default_value = "default")]
        level: LevelArg,
        /// Largest uncompressed layer accepted, in bytes.
        #[arg(long, default_value_t = 64 << 30)]
        max_layer_size: u64,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// The image the devices have (oci:DIR[:TAG]).
        source: String,
        /// The image they need.
        target: String,
        /// Where to write the delta image.
        delta: String,
    },
    /// Rebuild the target image of DELTA from SOURCE and write it to OUTPUT.
    Apply {
        /// How to store rebuilt layers.
        #[arg(long, value_enum, default_value = "original")]
        layers: LayersArg,
        /// Refuse the delta unless it rebuilds this target manifest digest.
        #[arg(long)]
        expect_target: Option<String>,
        /// Largest uncompressed layer accepted, in bytes.
        #[arg(long, default_value_t = 64 << 30)]
        max_layer_size: u64,
        /// Layers rebuilt at once.
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// The image the device has.
        source: String,
        /// The delta image.
        delta: String,
        /// Where to write the rebuilt image.
        output: String,
    },
    /// Show what a delta holds, per target layer.
    Info {
        /// The delta image.
        delta: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Parses the command line and runs the command.
pub fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let progress = progress::for_terminal(cli.quiet);
    match cli.command {
        Command::Diff { level, max_layer_size, json, source, target, delta } => {
            diff_cmd::run(level, max_layer_size, json, &source, &target, &delta, progress.as_ref())
        }
        Command::Apply { layers, expect_target, max_layer_size, jobs, json, source, delta, output } => {
            apply_cmd::run(layers, expect_target.as_deref(), max_layer_size, jobs, json, &source, &delta, &output, progress.as_ref())
        }
        Command::Info { delta, json } => info_cmd::run(&delta, json),
    }?;
    Ok(ExitCode::SUCCESS)
}

/// Formats a byte count for people.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
