//! The `fleetdelta` command: a thin layer over the library.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    return_large_buffers_to_the_system();
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

/// Fixes glibc's mmap threshold at 1 MiB, so that every buffer that large (a patch chunk, its
/// prefix, a difference chunk's frame: up to 8 MiB each) is its own mapping and goes back to
/// the system when freed. By default glibc raises the threshold to the size of the largest
/// block freed so far, after which such buffers come from its arenas and stay there: an
/// apply of two layers at once then held 60-66 MiB at its peak instead of 53 MiB.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn return_large_buffers_to_the_system() {
    // SAFETY: mallopt only sets an allocator parameter, here before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// glibc's threshold is the only one this matters for.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_large_buffers_to_the_system() {}
