//! Retention as a service setting (`retention:` in the configuration): every
//! `interval_seconds`, the deltas that neither a kept image nor a registered release needs are
//! deleted from the repositories of the registered releases' images, by the library behind
//! `fleetdelta gc` ([`fleetdelta_engine::retention::collect_garbage`]).
//!
//! Every delta a registered release needs is protected: those of its transitions from the
//! `previous_releases` releases before it, as planned when it was registered (for a
//! multi-platform target, one per platform). A run is put off while a registration is still
//! resolving its images, since its pairs are not known yet; and a repository is left alone
//! while a delta planned in it could not be resolved (its pair is unknown, so it could not be
//! protected).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::config::RetentionConfig;
use super::releases::Releases;
use super::state::Builds;
use fleetdelta_engine::delta_store::DeltaKey;
use fleetdelta_engine::reference::ImageRef;
use fleetdelta_engine::registry::RegistryRef;
use fleetdelta_engine::retention::{collect_garbage, Verdict};
use fleetdelta_release::parse_release_image;

/// Runs retention every [`RetentionConfig::interval`] until the task is dropped or aborted.
pub async fn run_periodically(config: RetentionConfig, releases: Arc<Releases>, builds: Arc<Builds>) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + config.interval(), config.interval());
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        collect_once(&config, &releases, &builds).await;
    }
}

/// One run over every repository of the registered releases' images, logged: each delta
/// deleted, and a line per repository. Failures are logged; the next run tries again.
pub async fn collect_once(config: &RetentionConfig, releases: &Releases, builds: &Builds) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let mut policy = match config.policy(now) {
        Ok(p) => p,
        Err(e) => {
            // Checked when the configuration was read; a cutoff out of range is the only way here.
            tracing::warn!(error = %e, "retention: no policy, nothing deleted");
            return;
        }
    };

    // The repositories, and what the registered releases need in them.
    let mut repositories: BTreeMap<String, RegistryRef> = BTreeMap::new();
    for image in releases.images() {
        if let Ok(ImageRef::Registry(r)) = parse_release_image(&image) {
            repositories.entry(r.repository_name()).or_insert(RegistryRef { tag: None, digest: None, ..r });
        }
    }
    let mut unresolved: BTreeMap<String, String> = BTreeMap::new();
    for id in releases.ids() {
        for planned in releases.describe(&id, builds).unwrap_or_default() {
            match (planned.source_config, planned.target_manifest) {
                (Some(source_config), Some(target_manifest)) => {
                    policy.protected.insert(DeltaKey { source_config, target_manifest });
                }
                _ if planned.status == "resolving" => {
                    tracing::info!(release = %id, "retention: run put off, a release is still resolving its images");
                    return;
                }
                _ if planned.status == "failed" => {
                    if let Ok(ImageRef::Registry(r)) = parse_release_image(&planned.to_image) {
                        let why = format!(
                            "release {id}'s delta for {} from {} is unresolved: {}",
                            planned.service,
                            planned.from_image,
                            planned.reason.unwrap_or_default()
                        );
                        unresolved.entry(r.repository_name()).or_insert(why);
                    }
                }
                // Unchanged (the same image): no delta.
                _ => {}
            }
        }
    }

    for (name, repository) in &repositories {
        if let Some(why) = unresolved.get(name) {
            tracing::warn!(repository = %name, reason = %why, "retention: repository left alone");
            continue;
        }
        match collect_garbage(builds.client(), repository, &policy, false).await {
            Ok(report) => {
                for d in report.deltas.iter().filter(|d| d.verdict == Verdict::Delete) {
                    tracing::info!(repository = %name, delta = %d.digest, tags = ?d.tags, reason = %d.reason, "retention deleted a delta");
                }
                tracing::info!(repository = %name, deleted = report.deleted, kept = report.kept, protected = policy.protected.len(), "retention run");
            }
            Err(e) => tracing::warn!(repository = %name, error = %e, "retention failed"),
        }
    }
}
