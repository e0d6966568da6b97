//! Retention: deleting the deltas of a repository that no kept image needs.
//!
//! The images of a repository are its tags other than `delta-*` and the referrers fallback
//! tags `sha256-HEX`, and other than tags of deltas themselves. A [`RetentionPolicy`] keeps
//! the newest N of them (by their config's `created` time) and those created since a time;
//! an image whose age is unknown (no `created`) is always kept. A delta is kept when its
//! target (its `subject`) is a kept image, or one of a kept image index's platform manifests,
//! or when its pair is protected (a release still needs it); every other delta is deleted.
//! A kept target keeps all its deltas, whatever their source: a device on any older release
//! can still reach it in one step.
//!
//! Deltas are found three ways, and merged by digest: the referrers of every tagged image
//! (API or fallback tag), every fallback index `sha256-HEX` in the repository (which also
//! lists deltas of targets no longer tagged), and every tag whose manifest is a delta. Only
//! manifests with the `io.fleetdelta.delta.version` annotation are deltas; other referrers
//! (signatures, SBOMs) are never touched, and neither are the images.
//!
//! A delta is first taken out of its target's fallback index (so no device is sent to a
//! manifest that is gone), then its manifest is deleted by digest, then any tag still naming
//! it. Blobs are left to the registry's own garbage collector.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::Value;

use crate::delta_store::DeltaKey;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::format::{ANNOTATION_SOURCE_CONFIG, ANNOTATION_VERSION};
use crate::image::manifest::{is_index, Manifest, MAX_JSON_BYTES, OCI_INDEX};
use crate::platforms::ANNOTATION_TARGET_INDEX;
use crate::progress::Silent;
use crate::registry::referrers::{fallback_subject, fallback_tag, parse_index, Referrer};
use crate::registry::{Client, RegistryRef};

/// Which deltas a repository keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Keep the deltas of the newest this many images (by config `created`).
    pub keep_newest: Option<usize>,
    /// Keep the deltas of images created at or after this time (seconds since the epoch).
    pub keep_since: Option<i64>,
    /// Pairs never deleted, whatever the images' ages (the deltas registered releases need).
    pub protected: BTreeSet<DeltaKey>,
}

/// What a retention run found and did.
#[derive(Clone, Debug, Serialize)]
pub struct RetentionReport {
    /// The repository, `HOST/NAME`.
    pub repository: String,
    /// Whether nothing was deleted (only reported).
    pub dry_run: bool,
    /// The tagged images, newest first, and whether they are kept.
    pub images: Vec<RetainedImage>,
    /// Every delta found and what became of it.
    pub deltas: Vec<DeltaVerdict>,
    /// Deltas deleted (or, in a dry run, that would be).
    pub deleted: usize,
    /// Deltas kept.
    pub kept: usize,
}

/// A tagged image of the repository.
#[derive(Clone, Debug, Serialize)]
pub struct RetainedImage {
    /// Its tags.
    pub tags: Vec<String>,
    /// Its manifest (or index) digest.
    pub digest: Digest,
    /// Its config's `created` time as written, when it has one (the newest of an index's).
    pub created: Option<String>,
    /// Whether its deltas are kept.
    pub kept: bool,
}

/// What becomes of a delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Kept.
    Keep,
    /// Deleted (or to be deleted, in a dry run).
    Delete,
}

/// A delta of the repository.
#[derive(Clone, Debug, Serialize)]
pub struct DeltaVerdict {
    /// Its manifest digest.
    pub digest: Digest,
    /// The tags that named it.
    pub tags: Vec<String>,
    /// The image it rebuilds (its `subject`; a delta index's target index).
    pub target: Option<Digest>,
    /// The config of the image it starts from.
    pub source_config: Option<Digest>,
    /// Keep or delete.
    pub verdict: Verdict,
    /// Why, in words.
    pub reason: String,
}

/// One delta as found, before the verdict.
#[derive(Default)]
struct Found {
    tags: BTreeSet<String>,
    target: Option<Digest>,
    source_config: Option<Digest>,
}

fn is_delta(annotations: &BTreeMap<String, String>) -> bool {
    annotations.contains_key(ANNOTATION_VERSION)
}

fn source_config(annotations: &BTreeMap<String, String>) -> Option<Digest> {
    annotations.get(ANNOTATION_SOURCE_CONFIG).and_then(|d| d.parse().ok())
}

/// A tagged image: its manifest digests (an index's and its platform manifests') and age.
struct Tagged {
    tags: Vec<String>,
    digest: Digest,
    manifests: Vec<Digest>,
    created: Option<String>,
    created_at: Option<i64>,
}

/// Finds the deltas of the repository `repository` names (its tag or digest is ignored),
/// judges them by `policy`, and deletes those not kept unless `dry_run`.
pub async fn collect_garbage(client: &Client, repository: &RegistryRef, policy: &RetentionPolicy, dry_run: bool) -> Result<RetentionReport> {
    if policy.keep_newest.is_none() && policy.keep_since.is_none() {
        return Err(Error::unsupported("retention", "a policy must keep the newest N images or those created since a time (it would delete every delta)"));
    }
    let repo = repository.without_tag();
    let tags = client.list_tags(&repo).await?;
    let mut found: BTreeMap<Digest, Found> = BTreeMap::new();
    let mut images: BTreeMap<Digest, Tagged> = BTreeMap::new();
    let fallback_tags: BTreeSet<&str> = tags.iter().map(String::as_str).filter(|t| fallback_subject(t).is_some()).collect();

    for tag in tags.iter().filter(|t| !fallback_tags.contains(t.as_str())) {
        let fetched = match client.get_manifest(&repo, tag).await {
            Ok(m) => m,
            Err(Error::NotFound(_)) => continue, // untagged since the listing
            Err(e) => return Err(e),
        };
        if let Some(image) = images.get_mut(&fetched.digest) {
            image.tags.push(tag.clone());
            continue;
        }
        if let Some(f) = found.get_mut(&fetched.digest) {
            f.tags.insert(tag.clone());
            continue;
        }
        if is_index(&fetched.media_type) {
            let index: Value = serde_json::from_slice(&fetched.raw).map_err(|e| Error::malformed(format!("index {tag}"), e.to_string()))?;
            let annotations: BTreeMap<String, String> = index.get("annotations").and_then(|a| serde_json::from_value(a.clone()).ok()).unwrap_or_default();
            if is_delta(&annotations) {
                let target = annotations.get(ANNOTATION_TARGET_INDEX).and_then(|d| d.parse().ok());
                found.insert(fetched.digest, Found { tags: [tag.clone()].into(), target, source_config: None });
                continue;
            }
            let children: Vec<Digest> = index
                .get("manifests")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|m| m.get("digest").and_then(Value::as_str).and_then(|d| d.parse().ok()))
                .collect();
            let mut created: Option<(i64, String)> = None;
            let mut unknown = children.is_empty();
            for child in &children {
                match image_created(client, &repo, &child.to_string()).await? {
                    Some((at, text)) if created.as_ref().is_none_or(|(c, _)| at > *c) => created = Some((at, text)),
                    Some(_) => {}
                    None => unknown = true,
                }
            }
            let created = if unknown { None } else { created };
            let mut manifests = vec![fetched.digest];
            manifests.extend(children);
            images.insert(
                fetched.digest,
                Tagged { tags: vec![tag.clone()], digest: fetched.digest, manifests, created_at: created.as_ref().map(|c| c.0), created: created.map(|c| c.1) },
            );
            continue;
        }
        let manifest = Manifest::parse(fetched.raw.clone(), Some(&fetched.media_type))?;
        if is_delta(&manifest.annotations) {
            found.insert(
                fetched.digest,
                Found { tags: [tag.clone()].into(), target: manifest.subject.as_ref().map(|s| s.digest), source_config: source_config(&manifest.annotations) },
            );
            continue;
        }
        let created = config_created(client, &repo, &manifest).await?;
        images.insert(
            fetched.digest,
            Tagged {
                tags: vec![tag.clone()],
                digest: fetched.digest,
                manifests: vec![fetched.digest],
                created_at: created.as_ref().map(|c| c.0),
                created: created.map(|c| c.1),
            },
        );
    }

    // Deltas listed as referrers: of every tagged image, and in every fallback index.
    let add_referrer = |found: &mut BTreeMap<Digest, Found>, subject: Digest, r: &Referrer| {
        if is_delta(&r.annotations) {
            let entry = found.entry(r.digest).or_default();
            entry.target.get_or_insert(subject);
            if entry.source_config.is_none() {
                entry.source_config = source_config(&r.annotations);
            }
        }
    };
    for image in images.values() {
        for subject in &image.manifests {
            for r in client.referrers(&repo, subject).await? {
                add_referrer(&mut found, *subject, &r);
            }
        }
    }
    for tag in &fallback_tags {
        let subject = fallback_subject(tag).expect("filtered");
        let index = match client.get_manifest(&repo, tag).await {
            Ok(m) => m,
            Err(Error::NotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        for r in parse_index(&index.raw, &format!("referrers index {tag}"))? {
            add_referrer(&mut found, subject, &r);
        }
    }

    // Which images are kept.
    let mut ordered: Vec<Tagged> = images.into_values().collect();
    ordered.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| a.tags.cmp(&b.tags)));
    let mut kept_manifests: BTreeSet<Digest> = BTreeSet::new();
    let mut report_images = Vec::new();
    let mut rank = 0usize;
    for mut image in ordered {
        let kept = match image.created_at {
            None => true,
            Some(at) => {
                let newest = policy.keep_newest.is_some_and(|n| rank < n);
                rank += 1;
                newest || policy.keep_since.is_some_and(|since| at >= since)
            }
        };
        if kept {
            kept_manifests.extend(image.manifests.iter().copied());
        }
        image.tags.sort();
        report_images.push(RetainedImage { tags: image.tags, digest: image.digest, created: image.created, kept });
    }

    // Verdicts.
    let mut deltas = Vec::new();
    for (digest, f) in found {
        let protected = match (f.source_config, f.target) {
            (Some(source_config), Some(target_manifest)) => policy.protected.contains(&DeltaKey { source_config, target_manifest }),
            _ => false,
        };
        let (verdict, reason) = match f.target {
            None => (Verdict::Keep, "its target is unknown (no subject)".to_string()),
            Some(_) if protected => (Verdict::Keep, "a registered release needs it".to_string()),
            Some(t) if kept_manifests.contains(&t) => (Verdict::Keep, "its target is a kept image".to_string()),
            Some(t) => (Verdict::Delete, format!("its target {t} is not a kept image")),
        };
        deltas.push(DeltaVerdict { digest, tags: f.tags.into_iter().collect(), target: f.target, source_config: f.source_config, verdict, reason });
    }

    if !dry_run {
        delete(client, &repo, &deltas, &fallback_tags).await?;
    }
    let deleted = deltas.iter().filter(|d| d.verdict == Verdict::Delete).count();
    Ok(RetentionReport {
        repository: format!("{}/{}", repo.registry, repo.repository),
        dry_run,
        images: report_images,
        kept: deltas.len() - deleted,
        deleted,
        deltas,
    })
}

/// Deletes the deltas judged [`Verdict::Delete`]: out of the fallback indexes first, then
/// their manifests, then tags that still name them.
async fn delete(client: &Client, repo: &RegistryRef, deltas: &[DeltaVerdict], fallback_tags: &BTreeSet<&str>) -> Result<()> {
    let doomed: Vec<&DeltaVerdict> = deltas.iter().filter(|d| d.verdict == Verdict::Delete).collect();
    let subjects: BTreeSet<Digest> = doomed.iter().filter_map(|d| d.target).collect();
    let doomed_digests: BTreeSet<Digest> = doomed.iter().map(|d| d.digest).collect();
    for subject in subjects {
        let tag = fallback_tag(&subject);
        if !fallback_tags.contains(tag.as_str()) {
            continue;
        }
        let index = match client.get_manifest(repo, &tag).await {
            Ok(m) => m,
            Err(Error::NotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        let mut value: Value = serde_json::from_slice(&index.raw).map_err(|e| Error::malformed(format!("referrers index {tag}"), e.to_string()))?;
        let Some(entries) = value.get_mut("manifests").and_then(Value::as_array_mut) else { continue };
        let before = entries.len();
        entries.retain(|e| e.get("digest").and_then(Value::as_str).and_then(|d| d.parse::<Digest>().ok()).is_none_or(|d| !doomed_digests.contains(&d)));
        if entries.len() == before {
            continue;
        }
        if entries.is_empty() {
            client.delete_manifest(repo, &index.digest.to_string()).await?;
        } else {
            let raw = serde_json::to_vec(&value).expect("JSON values serialize");
            client.put_manifest(repo, &tag, OCI_INDEX, &raw).await?;
        }
    }
    for d in doomed {
        client.delete_manifest(repo, &d.digest.to_string()).await?;
        // Registries that keep a tag of a deleted manifest are told to drop the tag too.
        for tag in &d.tags {
            match client.get_manifest(repo, tag).await {
                Ok(m) if m.digest == d.digest => {
                    client.delete_manifest(repo, tag).await?;
                }
                Ok(_) | Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// An image's config `created` time: seconds since the epoch and the text.
async fn image_created(client: &Client, repo: &RegistryRef, reference: &str) -> Result<Option<(i64, String)>> {
    let fetched = client.get_manifest(repo, reference).await?;
    if is_index(&fetched.media_type) {
        return Ok(None);
    }
    let manifest = Manifest::parse(fetched.raw, Some(&fetched.media_type))?;
    config_created(client, repo, &manifest).await
}

async fn config_created(client: &Client, repo: &RegistryRef, manifest: &Manifest) -> Result<Option<(i64, String)>> {
    if manifest.config.size > MAX_JSON_BYTES {
        return Err(Error::TooLarge { what: format!("config {}", manifest.config.digest), limit: MAX_JSON_BYTES });
    }
    let mut raw = Vec::new();
    client.download_blob(repo, &manifest.config, &mut raw, &Silent).await?;
    let config: Value = serde_json::from_slice(&raw).map_err(|e| Error::malformed(format!("config {}", manifest.config.digest), e.to_string()))?;
    Ok(config.get("created").and_then(Value::as_str).and_then(|text| parse_time(text).map(|at| (at, text.to_string()))))
}

/// Parses an RFC 3339 time (`2026-12-01T10:00:00Z`, offsets and fractions allowed) or a date
/// (`2026-12-01`, midnight UTC) into seconds since the epoch. A time without an offset is
/// refused: it names no instant.
pub fn parse_time(text: &str) -> Option<i64> {
    let text = text.trim();
    if let Ok(at) = text.parse::<jiff::Timestamp>() {
        return Some(at.as_second());
    }
    // strptime is strict (the whole text, this format), so `2026-12-01T10:00:00` is no date.
    let date = jiff::civil::Date::strptime("%Y-%m-%d", text).ok()?;
    Some(jiff::tz::Offset::UTC.to_timestamp(date.to_datetime(jiff::civil::Time::midnight())).ok()?.as_second())
}

/// Parses a duration into seconds: `30d`, `12h`, `2w`, `1h30m`, `2 weeks`, ISO 8601's `P30D`
/// (jiff's span formats). Days are 24 hours and weeks 7 days; months and years, whose length
/// varies, and negative durations are refused.
pub fn parse_duration_seconds(text: &str) -> Option<i64> {
    let span: jiff::Span = text.trim().parse().ok()?;
    if span.signum() < 0 || span.get_years() != 0 || span.get_months() != 0 {
        return None;
    }
    let seconds = span.total(jiff::SpanTotal::from(jiff::Unit::Second).days_are_24_hours()).ok()?;
    Some(seconds.floor() as i64)
}

/// The time `text` names: a date or time ([`parse_time`]), or a duration before `now`
/// ([`parse_duration_seconds`]). Seconds since the epoch.
pub fn parse_cutoff(text: &str, now: i64) -> Result<i64> {
    parse_time(text).or_else(|| parse_duration_seconds(text).and_then(|d| now.checked_sub(d))).ok_or_else(|| {
        Error::unsupported(format!("time {text:?}"), "expected a date (2026-12-01), an RFC 3339 time (2026-12-01T10:00:00Z) or a duration (90d, 12h, 2w)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_dates_and_durations_parse() {
        for (text, expected) in [
            ("1970-01-01", Some(0)),
            ("1970-01-02T00:00:00Z", Some(86_400)),
            ("2000-03-01T00:00:00Z", Some(951_868_800)),
            ("2026-12-01T10:00:00.123456789Z", Some(1_796_119_200)),
            ("2026-12-01T12:00:00+02:00", Some(1_796_119_200)),
            ("2026-12-01T08:30:00-01:30", Some(1_796_119_200)),
            ("2026-12-01T15:45:00+05:45", Some(1_796_119_200)),
            ("2026-12-01T10:00:00-00:00", Some(1_796_119_200)),
            ("2026-12-01t10:00:00z", Some(1_796_119_200)),
            ("2026-12-01 10:00:00Z", Some(1_796_119_200)),
            (" 2026-12-01T10:00:00Z ", Some(1_796_119_200)),
            ("2026-12-01", Some(1_796_083_200)),
            ("2026-13-01", None),
            ("2026-02-30", None),
            ("2026-12-01T25:00:00Z", None),
            ("2026-12-01T10:00:00", None),
            ("2026-12-01T10:00:00.Z", None),
            // RFC 3339 offsets stop at 23:59; jiff takes up to 25:59 (as Temporal does).
            ("2026-12-01T10:00:00+26:00", None),
            ("2026-12-01junk", None),
            ("yesterday", None),
            ("", None),
        ] {
            assert_eq!(parse_time(text), expected, "{text}");
        }
        for (text, expected) in [
            ("90d", Some(90 * 86_400)),
            ("12h", Some(43_200)),
            ("2w", Some(1_209_600)),
            ("5s", Some(5)),
            ("1h30m", Some(5_400)),
            ("2 weeks", Some(1_209_600)),
            ("3 days 4 hours", Some(3 * 86_400 + 4 * 3600)),
            ("P30D", Some(30 * 86_400)),
            ("d", None),
            ("-1d", None),
            ("3y", None),
            ("2mo", None),
            ("soon", None),
        ] {
            assert_eq!(parse_duration_seconds(text), expected, "{text}");
        }
        assert_eq!(parse_cutoff("1d", 100_000).unwrap(), 100_000 - 86_400);
        assert_eq!(parse_cutoff("1970-01-02", 5).unwrap(), 86_400);
        assert_eq!(parse_cutoff("1970-01-02T02:00:00+02:00", 5).unwrap(), 86_400);
        let err = parse_cutoff("soon", 0).unwrap_err().to_string();
        assert!(err.contains("\"soon\"") && err.contains("duration"), "{err}");
    }
}
