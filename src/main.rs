//! The `fleetdelta` command: a thin layer over the library.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::run() {
        // A reader that went away: quietly, as a process killed by SIGPIPE.
        Ok(_) if cli::output::closed() => ExitCode::from(cli::output::CLOSED_PIPE_STATUS),
        Ok(code) => code,
        Err(e) => {
            eprintln!("fleetdelta: error: {}", one_line(&e));
            cli::exit::for_error(&e)
        }
    }
}

/// The error and its causes on one line, each said once: a cause whose text its parent's
/// message already ends with (an I/O error quoted by its context) is not repeated, and
/// control characters (a newline in a path) are escaped.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.chars().flat_map(|c| if c.is_control() { c.escape_default().collect::<Vec<_>>() } else { vec![c] }).collect()
}
