//! The service's configuration: a YAML file (every key optional) and the command line's
//! overrides, with the limits that keep one instance's memory, disk and registry traffic
//! bounded.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use fleetdelta_engine::diff::Level;
use fleetdelta_engine::error::{Error, IoContext, Result};
use fleetdelta_engine::image::Platform;
use fleetdelta_engine::retention::{parse_cutoff, RetentionPolicy};

/// Largest configuration file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Longest interval between retention runs (a year), so that the sleep is always valid.
const MAX_RETENTION_INTERVAL: u64 = 366 * 86_400;

/// Everything `fleetdelta serve` can be told. The YAML file uses the same names, for example:
///
/// ```yaml
/// listen: 0.0.0.0:8080
/// max_concurrent_builds: 2
/// previous_releases: 3
/// level: default
/// max_image_bytes: 4000000000
/// registry:
///   insecure: [registry.lan:5000]
///   retries: 6
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// Address to listen on (`127.0.0.1:0` picks a free port; the bound address is logged and
    /// printed).
    pub listen: SocketAddr,
    /// How registries are reached.
    pub registry: RegistryConfig,
    /// Builds running at once; further builds wait in a queue (each build holds two images on
    /// disk and the differ's memory, so this is what bounds both).
    pub max_concurrent_builds: usize,
    /// Builds allowed to wait for a slot; requests beyond are answered 503 with Retry-After
    /// rather than growing the queue without bound.
    pub max_queued_builds: usize,
    /// When a release is registered, deltas are built from this many releases before it.
    pub previous_releases: usize,
    /// Differ effort.
    #[serde(with = "level_name")]
    pub level: Level,
    /// Largest image (compressed layers and config, as the registry lists them) the service
    /// agrees to diff, source or target.
    pub max_image_bytes: u64,
    /// Largest uncompressed layer the differ accepts.
    pub max_layer_bytes: u64,
    /// Largest request body (release files, delta requests).
    pub max_request_bytes: usize,
    /// Seconds a client is told to wait (`Retry-After`) while a delta is being built.
    pub retry_after_seconds: u64,
    /// Longest a request may ask to be held open waiting for a build (`?wait=SECONDS`).
    pub max_wait_seconds: u64,
    /// After a failed build, the first wait before it is tried again; doubled on every
    /// further failure of the same pair, up to `retry_max_seconds`.
    pub retry_initial_seconds: f64,
    /// Longest wait between attempts of a failing pair.
    pub retry_max_seconds: f64,
    /// On shutdown, how long builds in flight may take to finish before they are abandoned.
    pub shutdown_grace_seconds: f64,
    /// Pairs remembered in memory (ready, failed or in progress). Beyond it, finished entries
    /// are forgotten: ready deltas are found again in the registry, failures retried.
    pub max_tracked_pairs: usize,
    /// Where images are fetched and deltas staged (a fresh directory inside it per build).
    /// Default: the system's temporary directory.
    pub scratch_dir: Option<PathBuf>,
    /// Log format: `text` or `json`.
    pub log_format: LogFormat,
    /// Where the service keeps what must survive a restart (the releases registered, the
    /// build queue): `sqlite:PATH` (created when missing), `sqlite::memory:` (nothing kept),
    /// or `postgres://USER[:PASSWORD]@HOST[:PORT]/NAME` for several instances sharing the
    /// work. Default: `sqlite:$STATE_DIRECTORY/service.db` (systemd), else
    /// `$XDG_STATE_HOME/fleetdelta/service.db`, else `~/.local/state/fleetdelta/service.db`.
    pub database: Option<String>,
    /// How long an instance's lease on a build lasts without renewal (it renews every third
    /// of it while it builds): after an instance dies, its builds are taken over by another
    /// within about this long.
    pub lease_seconds: f64,
    /// The platforms the fleet runs (`OS/ARCH[/VARIANT]`, e.g. `linux/arm64`): when a
    /// release's images are multi-platform indexes, its deltas are built for these platforms
    /// of each target. Empty (the default): every platform of the target.
    pub platforms: Vec<String>,
    /// Deleting old deltas, periodically, in the repositories of the registered releases'
    /// images, with every delta a registered release needs protected. Absent (the default):
    /// nothing is deleted.
    pub retention: Option<RetentionConfig>,
}

/// The service's periodic retention ([`ServiceConfig::retention`]): `fleetdelta gc`'s policy,
/// run every `interval_seconds` over every repository of the registered releases' images.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Keep the deltas of the newest this many images of each repository (by their config's
    /// `created` time), as `fleetdelta gc --keep-targets`.
    #[serde(default)]
    pub keep_targets: Option<usize>,
    /// Delete the deltas of images created before this date or RFC 3339 time, or longer ago
    /// than this duration (`90d`, `2 weeks`) at each run, as `fleetdelta gc --older-than`.
    /// With `keep_targets`, an image kept by either is kept.
    #[serde(default)]
    pub older_than: Option<String>,
    /// Seconds between runs; the first runs one interval after the start.
    #[serde(default = "RetentionConfig::default_interval")]
    pub interval_seconds: u64,
}

impl RetentionConfig {
    fn default_interval() -> u64 {
        3600
    }

    /// The policy of a run at `now` (seconds since the epoch), with nothing protected yet.
    pub fn policy(&self, now: i64) -> Result<RetentionPolicy> {
        let keep_since = self.older_than.as_deref().map(|t| parse_cutoff(t, now)).transpose()?;
        Ok(RetentionPolicy { keep_newest: self.keep_targets, keep_since, ..RetentionPolicy::default() })
    }

    /// The time between runs.
    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.interval_seconds)
    }
}

/// How the service reaches registries.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Registries (`HOST[:PORT]`) spoken to over plain HTTP; loopback always is.
    pub insecure: Vec<String>,
    /// Credentials file (docker config.json or containers auth.json format) instead of the
    /// usual ones.
    pub authfile: Option<PathBuf>,
    /// Attempts after the first on network errors, 429 and 5xx.
    pub retries: u32,
    /// Seconds without a byte before an attempt counts as failed.
    pub idle_timeout_seconds: u64,
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event, for log collectors.
    Json,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig { insecure: Vec::new(), authfile: None, retries: 6, idle_timeout_seconds: 30 }
    }
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            registry: RegistryConfig::default(),
            max_concurrent_builds: 2,
            max_queued_builds: 1024,
            previous_releases: 3,
            level: Level::Default,
            max_image_bytes: 8 << 30,
            max_layer_bytes: 16 << 30,
            max_request_bytes: 1 << 20,
            retry_after_seconds: 2,
            max_wait_seconds: 30,
            retry_initial_seconds: 30.0,
            retry_max_seconds: 3600.0,
            shutdown_grace_seconds: 60.0,
            max_tracked_pairs: 100_000,
            scratch_dir: None,
            log_format: LogFormat::Text,
            database: None,
            lease_seconds: 30.0,
            platforms: Vec::new(),
            retention: None,
        }
    }
}

impl ServiceConfig {
    /// Parses a configuration file's text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self> {
        let config: ServiceConfig = serde_norway::from_str(text).map_err(|e| Error::malformed(file, e.to_string()))?;
        config.validate(file)?;
        Ok(config)
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Self> {
        let what = path.display().to_string();
        let size = std::fs::metadata(path).ctx(|| format!("reading {what}"))?.len();
        if size > MAX_CONFIG_BYTES {
            return Err(Error::TooLarge { what, limit: MAX_CONFIG_BYTES });
        }
        let text = std::fs::read_to_string(path).ctx(|| format!("reading {what}"))?;
        Self::parse(&text, &what)
    }

    /// Checks values that would make the service useless or unbounded.
    pub fn validate(&self, what: &str) -> Result<()> {
        let bad = |reason: &str| Err(Error::malformed(what, reason.to_string()));
        if self.max_concurrent_builds == 0 {
            return bad("max_concurrent_builds must be at least 1");
        }
        if self.max_request_bytes == 0 || self.max_tracked_pairs == 0 {
            return bad("max_request_bytes and max_tracked_pairs must be at least 1");
        }
        for (name, v) in [
            ("retry_initial_seconds", self.retry_initial_seconds),
            ("retry_max_seconds", self.retry_max_seconds),
            ("shutdown_grace_seconds", self.shutdown_grace_seconds),
        ] {
            if !v.is_finite() || !(0.0..=1e7).contains(&v) {
                return Err(Error::malformed(what, format!("{name} must be a number of seconds between 0 and 1e7, not {v}")));
            }
        }
        if !self.lease_seconds.is_finite() || !(0.3..=86_400.0).contains(&self.lease_seconds) {
            return Err(Error::malformed(what, format!("lease_seconds must be between 0.3 and 86400, not {}", self.lease_seconds)));
        }
        if self.retry_initial_seconds > self.retry_max_seconds {
            return bad("retry_initial_seconds must not exceed retry_max_seconds");
        }
        self.fleet_platforms().map_err(|e| Error::malformed(what, format!("platforms: {e}")))?;
        if let Some(retention) = &self.retention {
            if retention.keep_targets.is_none() && retention.older_than.is_none() {
                return bad("retention needs keep_targets or older_than (or both): without either it would delete every delta");
            }
            if !(1..=MAX_RETENTION_INTERVAL).contains(&retention.interval_seconds) {
                return Err(Error::malformed(what, format!("retention.interval_seconds must be between 1 and {MAX_RETENTION_INTERVAL}")));
            }
            retention.policy(0).map_err(|e| Error::malformed(what, format!("retention.older_than: {e}")))?;
        }
        Ok(())
    }

    /// [`ServiceConfig::platforms`], parsed; empty means every platform of each target.
    pub fn fleet_platforms(&self) -> Result<Vec<Platform>> {
        self.platforms.iter().map(|p| Platform::parse(p)).collect()
    }

    /// The wait before attempt `failures + 1` of a pair that failed `failures` times:
    /// exponential from `retry_initial_seconds`, capped at `retry_max_seconds`.
    pub fn retry_backoff(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(40) as i32;
        Duration::from_secs_f64((self.retry_initial_seconds * 2f64.powi(exponent)).min(self.retry_max_seconds))
    }

    /// The lease on a build.
    pub fn lease(&self) -> Duration {
        Duration::from_secs_f64(self.lease_seconds)
    }

    /// The shutdown grace period.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs_f64(self.shutdown_grace_seconds)
    }
}

mod level_name {
    use serde::{Deserialize, Deserializer};

    use fleetdelta_engine::diff::Level;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Level, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// The database of [`ServiceConfig::database`] when none is given, its directory created.
pub fn default_database_url() -> Result<String> {
    let dir = match (std::env::var_os("STATE_DIRECTORY"), std::env::var_os("XDG_STATE_HOME"), std::env::var_os("HOME")) {
        // systemd's StateDirectory= may list several, separated by ':'; the first is ours.
        (Some(s), _, _) if !s.is_empty() => PathBuf::from(s.to_string_lossy().split(':').next().unwrap_or_default()),
        (_, Some(x), _) if !x.is_empty() => PathBuf::from(x).join("fleetdelta"),
        (_, _, Some(h)) if !h.is_empty() => PathBuf::from(h).join(".local/state/fleetdelta"),
        _ => return Err(Error::unsupported("the service's database", "no $STATE_DIRECTORY, $XDG_STATE_HOME or $HOME: give `database` (or --database)")),
    };
    std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    Ok(format!("sqlite:{}", dir.join("service.db").display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_parse_with_defaults_and_refuse_unknown_keys_and_useless_values() {
        let c = ServiceConfig::parse("listen: 127.0.0.1:0\nlevel: fast\nregistry:\n  insecure: [reg.lan:5000]\n", "c.yaml").unwrap();
        assert_eq!(c.level, Level::Fast);
        assert_eq!(c.registry.insecure, vec!["reg.lan:5000".to_string()]);
        assert_eq!(c.registry.retries, 6);
        assert_eq!(c.max_concurrent_builds, 2);
        assert!(ServiceConfig::parse("", "empty.yaml").is_ok());
        let unknown = ServiceConfig::parse("max_builds: 3\n", "c.yaml").unwrap_err().to_string();
        assert!(unknown.contains("c.yaml") && unknown.contains("max_builds"), "{unknown}");
        assert!(ServiceConfig::parse("max_concurrent_builds: 0\n", "c.yaml").is_err());
        assert!(ServiceConfig::parse("level: extreme\n", "c.yaml").is_err());
        assert!(ServiceConfig::parse("retry_initial_seconds: 100\nretry_max_seconds: 10\n", "c.yaml").is_err());
        let fleet = ServiceConfig::parse("platforms: [linux/amd64, linux/arm/v7]\n", "c.yaml").unwrap();
        assert_eq!(fleet.fleet_platforms().unwrap(), vec![Platform::linux("amd64"), Platform::parse("linux/arm/v7").unwrap()]);
        let bad = ServiceConfig::parse("platforms: [arm64]\n", "c.yaml").unwrap_err().to_string();
        assert!(bad.contains("c.yaml") && bad.contains("platforms") && bad.contains("arm64"), "{bad}");
    }

    #[test]
    fn retention_is_off_by_default_and_checked_when_set() {
        assert!(ServiceConfig::parse("", "c.yaml").unwrap().retention.is_none());
        let c = ServiceConfig::parse("retention:\n  keep_targets: 3\n", "c.yaml").unwrap();
        let r = c.retention.unwrap();
        assert_eq!((r.keep_targets, r.interval_seconds), (Some(3), 3600));
        assert_eq!(r.policy(1_000_000).unwrap(), RetentionPolicy { keep_newest: Some(3), ..RetentionPolicy::default() });
        let r = ServiceConfig::parse("retention:\n  older_than: 2 weeks\n  interval_seconds: 60\n", "c.yaml").unwrap().retention.unwrap();
        assert_eq!(r.policy(2_000_000).unwrap().keep_since, Some(2_000_000 - 14 * 86_400));
        assert_eq!(r.interval(), Duration::from_secs(60));
        let dated = ServiceConfig::parse("retention:\n  older_than: 2026-12-01T12:00:00+02:00\n", "c.yaml").unwrap().retention.unwrap();
        assert_eq!(dated.policy(0).unwrap().keep_since, Some(1_796_119_200));
        for (text, expected) in [
            ("retention: {}\n", "keep_targets or older_than"),
            ("retention:\n  interval_seconds: 60\n", "keep_targets or older_than"),
            ("retention:\n  older_than: someday\n", "retention.older_than"),
            ("retention:\n  keep_targets: 1\n  interval_seconds: 0\n", "interval_seconds"),
            ("retention:\n  keep_targets: 1\n  keep_releases: 2\n", "keep_releases"),
        ] {
            let e = ServiceConfig::parse(text, "c.yaml").unwrap_err().to_string();
            assert!(e.contains("c.yaml") && e.contains(expected), "{text}: {e}");
        }
    }

    #[test]
    fn retry_backoff_doubles_up_to_its_cap() {
        let c = ServiceConfig { retry_initial_seconds: 1.0, retry_max_seconds: 5.0, ..ServiceConfig::default() };
        let waits: Vec<u64> = (1..=5).map(|n| c.retry_backoff(n).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 5, 5]);
        assert_eq!(c.retry_backoff(u32::MAX).as_secs(), 5);
    }
}
