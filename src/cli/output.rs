//! What commands print on standard output. A reader that closes the pipe early
//! (`fleetdelta copy … | head -1`) ends the command quietly, with the status a process
//! killed by SIGPIPE has (141), where `println!` would panic. Writing stops at the first
//! failure; the command's work (already done) and its cleanup are not cut short.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once standard output could not be written: nothing more is written to it.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// The exit status of a command whose reader went away (128 + SIGPIPE).
pub const CLOSED_PIPE_STATUS: u8 = 141;

/// Writes `args` to standard output and flushes, unless it failed before.
pub fn write(args: std::fmt::Arguments) {
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if out.write_fmt(args).and_then(|()| out.flush()).is_err() {
        CLOSED.store(true, Ordering::Relaxed);
    }
}

/// Whether a write to standard output failed (its reader closed it).
pub fn closed() -> bool {
    CLOSED.load(Ordering::Relaxed)
}

/// `println!` through [`write`].
macro_rules! outln {
    () => {
        $crate::cli::output::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::output::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` through [`write`].
#[cfg_attr(not(feature = "service"), allow(unused_macros))] // only release-update prints without a newline
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::output::write(format_args!($($arg)*))
    };
}
