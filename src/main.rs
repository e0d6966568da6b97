//! The `fleetdelta` command: a thin layer over the library.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::run() {
        Ok(code) => code,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("fleetdelta: error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}
