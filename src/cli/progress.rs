//! Progress bars on a terminal (indicatif), nothing otherwise.

use std::io::IsTerminal;

use fleetdelta::{Progress, Silent};
use indicatif::{ProgressBar, ProgressStyle};

struct Bar(ProgressBar);

impl Progress for Bar {
    fn stage(&self, name: &str, total: u64) {
        self.0.reset();
        self.0.set_length(total);
        self.0.set_message(name.to_string());
    }
    fn advance(&self, n: u64) {
        self.0.inc(n);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

/// A progress bar when stderr is a terminal and `quiet` is not set.
pub fn for_terminal(quiet: bool) -> Box<dyn Progress> {
    if quiet || !std::io::stderr().is_terminal() {
        return Box::new(Silent);
    }
    let bar = ProgressBar::new(0);
    bar.set_style(ProgressStyle::with_template("{msg:24} [{bar:40}] {percent:>3}% {elapsed}").expect("valid template").progress_chars("=> "));
    Box::new(Bar(bar))
}
