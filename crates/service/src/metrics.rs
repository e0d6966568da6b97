//! The service's metrics, in the Prometheus text exposition format (version 0.0.4).
//!
//! A handful of counters, two gauges and one histogram do not justify a metrics crate and its
//! registry types: the format is a few lines of text per metric, stable for a decade, and
//! written here by [`Metrics::render`] (checked by a test against the format's rules).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the build-time histogram's buckets.
const BUILD_SECONDS_BUCKETS: [f64; 10] = [0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0];

/// Counters and gauges of one service instance; all operations are lock-free except the
/// per-route request counts and the histogram, each behind a short lock.
#[derive(Debug, Default)]
pub struct Metrics {
    builds_total: AtomicU64,
    builds_failed_total: AtomicU64,
    deltas_found_total: AtomicU64,
    bytes_saved_total: AtomicU64,
    delta_bytes_total: AtomicU64,
    queue_depth: AtomicU64,
    in_flight: AtomicU64,
    in_flight_peak: AtomicU64,
    build_seconds: Mutex<Histogram>,
    requests: Mutex<BTreeMap<(String, u16), u64>>,
}

#[derive(Debug, Default)]
struct Histogram {
    buckets: [u64; BUILD_SECONDS_BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// A snapshot of the main counters, for logs and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Builds started (the differ ran, or was about to).
    pub builds_total: u64,
    /// Builds that failed.
    pub builds_failed_total: u64,
    /// Deltas found already built in the registry (nothing built).
    pub deltas_found_total: u64,
    /// Builds waiting for a slot.
    pub queue_depth: u64,
    /// Builds running.
    pub in_flight: u64,
    /// The most builds ever running at once.
    pub in_flight_peak: u64,
}

impl Metrics {
    /// A build took a slot.
    pub fn build_started(&self) {
        self.builds_total.fetch_add(1, Ordering::Relaxed);
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.in_flight_peak.fetch_max(now, Ordering::Relaxed);
    }

    /// A build left its slot, successfully (with the full-pull and delta sizes) or not.
    pub fn build_finished(&self, took: Duration, sizes: Option<(u64, u64)>) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        match sizes {
            Some((full, delta)) => {
                self.bytes_saved_total.fetch_add(full.saturating_sub(delta), Ordering::Relaxed);
                self.delta_bytes_total.fetch_add(delta, Ordering::Relaxed);
            }
            None => {
                self.builds_failed_total.fetch_add(1, Ordering::Relaxed);
            }
        }
        let seconds = took.as_secs_f64();
        let mut h = self.build_seconds.lock().unwrap_or_else(|p| p.into_inner());
        for (bound, bucket) in BUILD_SECONDS_BUCKETS.iter().zip(h.buckets.iter_mut()) {
            if seconds <= *bound {
                *bucket += 1;
            }
        }
        h.count += 1;
        h.sum += seconds;
    }

    /// A delta was found in the registry instead of being built.
    pub fn delta_found(&self) {
        self.deltas_found_total.fetch_add(1, Ordering::Relaxed);
    }

    /// A build started waiting for a slot (`true`) or stopped waiting (`false`).
    pub fn queued(&self, waiting: bool) {
        if waiting {
            self.queue_depth.fetch_add(1, Ordering::Relaxed);
        } else {
            self.queue_depth.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Counts an answered request by route (the matched pattern, never the raw path, so the
    /// label set stays bounded) and status.
    pub fn request(&self, route: &str, status: u16) {
        let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *requests.entry((route.to_string(), status)).or_default() += 1;
    }

    /// The main counters now.
    pub fn counters(&self) -> Counters {
        Counters {
            builds_total: self.builds_total.load(Ordering::Relaxed),
            builds_failed_total: self.builds_failed_total.load(Ordering::Relaxed),
            deltas_found_total: self.deltas_found_total.load(Ordering::Relaxed),
            queue_depth: self.queue_depth.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            in_flight_peak: self.in_flight_peak.load(Ordering::Relaxed),
        }
    }

    /// Every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let c = self.counters();
        let mut scalar = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n");
        };
        scalar("fleetdelta_builds_total", "counter", "Delta builds started.", c.builds_total);
        scalar("fleetdelta_builds_failed_total", "counter", "Delta builds that failed.", c.builds_failed_total);
        scalar(
            "fleetdelta_deltas_found_total",
            "counter",
            "Deltas found already built (in the registry, or recorded by another instance), not built here.",
            c.deltas_found_total,
        );
        scalar(
            "fleetdelta_bytes_saved_total",
            "counter",
            "Per device using them, bytes the deltas built save: full pull of the missing layers minus the delta.",
            self.bytes_saved_total.load(Ordering::Relaxed),
        );
        scalar("fleetdelta_delta_bytes_total", "counter", "Download size of the deltas built.", self.delta_bytes_total.load(Ordering::Relaxed));
        scalar("fleetdelta_build_queue_depth", "gauge", "Builds waiting for a slot.", c.queue_depth);
        scalar("fleetdelta_builds_in_flight", "gauge", "Builds running.", c.in_flight);
        scalar("fleetdelta_builds_in_flight_peak", "gauge", "The most builds that ran at once since start.", c.in_flight_peak);

        let h = self.build_seconds.lock().unwrap_or_else(|p| p.into_inner());
        let _ = write!(out, "# HELP fleetdelta_build_seconds Time each build took, failed ones included.\n# TYPE fleetdelta_build_seconds histogram\n");
        for (bound, count) in BUILD_SECONDS_BUCKETS.iter().zip(h.buckets.iter()) {
            let _ = writeln!(out, "fleetdelta_build_seconds_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = write!(
            out,
            "fleetdelta_build_seconds_bucket{{le=\"+Inf\"}} {}\nfleetdelta_build_seconds_sum {}\nfleetdelta_build_seconds_count {}\n",
            h.count, h.sum, h.count
        );
        drop(h);

        let requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let _ =
            write!(out, "# HELP fleetdelta_http_requests_total HTTP requests answered, by route and status.\n# TYPE fleetdelta_http_requests_total counter\n");
        for ((route, status), n) in requests.iter() {
            let _ = writeln!(out, "fleetdelta_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}", escape_label(route));
        }
        out
    }
}

/// Escapes a label value as the text format requires (backslash, double quote, newline).
fn escape_label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Reads one sample's value from text in this format: `name` alone or `name{labels}`.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format() {
        let m = Metrics::default();
        m.queued(true);
        m.queued(false);
        m.build_started();
        m.build_finished(Duration::from_millis(1500), Some((1000, 300)));
        m.build_started();
        m.build_finished(Duration::from_secs(1000), None);
        m.request("/v1/deltas", 202);
        m.request("/v1/deltas", 202);
        m.request("/we\"ird", 404);
        let text = m.render();
        assert_eq!(sample(&text, "fleetdelta_builds_total"), Some(2.0));
        assert_eq!(sample(&text, "fleetdelta_builds_failed_total"), Some(1.0));
        assert_eq!(sample(&text, "fleetdelta_bytes_saved_total"), Some(700.0));
        assert_eq!(sample(&text, "fleetdelta_builds_in_flight"), Some(0.0));
        assert_eq!(sample(&text, "fleetdelta_builds_in_flight_peak"), Some(1.0));
        assert_eq!(sample(&text, "fleetdelta_build_seconds_bucket{le=\"1\"}"), Some(0.0));
        assert_eq!(sample(&text, "fleetdelta_build_seconds_bucket{le=\"2\"}"), Some(1.0));
        assert_eq!(sample(&text, "fleetdelta_build_seconds_bucket{le=\"+Inf\"}"), Some(2.0));
        assert_eq!(sample(&text, "fleetdelta_build_seconds_count"), Some(2.0));
        assert_eq!(sample(&text, "fleetdelta_http_requests_total{route=\"/v1/deltas\",status=\"202\"}"), Some(2.0));
        assert!(text.contains("route=\"/we\\\"ird\""), "{text}");
        // Every sample line is `name[{labels}] value`, and every metric has HELP and TYPE first.
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap().to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let name: String = line.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f))).unwrap_or(&name);
            assert!(typed.contains(family), "{line} has no TYPE before it");
            assert!(line.rsplit(' ').next().unwrap().parse::<f64>().is_ok(), "{line}");
        }
    }
}
