//! Progress bars on a terminal (indicatif), nothing otherwise. Each stage shows its name, the
//! bytes done of its total with the rate, and the time it has run; a stage of unknown size
//! shows a spinner. The bar redraws on its own, so a long step inside a stage never leaves a
//! stale line, and no escape codes reach a stream that is not a terminal.

use std::io::IsTerminal;
use std::time::Duration;

use fleetdelta::{Progress, Silent};
use indicatif::{ProgressBar, ProgressStyle};

/// How often the bar redraws itself (elapsed time, spinner, rate).
const TICK: Duration = Duration::from_millis(120);

struct Bar {
    bar: ProgressBar,
    sized: ProgressStyle,
    open_ended: ProgressStyle,
}

impl Progress for Bar {
    fn stage(&self, name: &str, total: u64) {
        self.bar.reset();
        self.bar.set_style(if total == 0 { self.open_ended.clone() } else { self.sized.clone() });
        self.bar.set_length(total);
        self.bar.set_message(name.to_string());
    }
    fn advance(&self, n: u64) {
        self.bar.inc(n);
    }
    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// A progress bar when stderr is a terminal and `quiet` is not set.
pub fn for_terminal(quiet: bool) -> Box<dyn Progress> {
    if quiet || !std::io::stderr().is_terminal() {
        return Box::new(Silent);
    }
    let sized = ProgressStyle::with_template("{spinner} {msg:32} [{bar:30}] {bytes:>10} / {total_bytes:<10} {binary_bytes_per_sec:>12} {elapsed:>4}")
        .expect("valid template")
        .progress_chars("=> ");
    let open_ended = ProgressStyle::with_template("{spinner} {msg:32} {elapsed:>4}").expect("valid template");
    let bar = ProgressBar::new(0);
    bar.enable_steady_tick(TICK);
    Box::new(Bar { bar, sized, open_ended })
}
