//! Referrers: finding the manifests whose `subject` is a given manifest (here: the deltas that
//! rebuild a target image).
//!
//! OCI distribution 1.1 registries answer `GET /v2/NAME/referrers/DIGEST` and index referrers
//! themselves (they acknowledge a pushed `subject` with an `OCI-Subject` header). Older
//! registries, such as distribution 2.8, do neither; for them the spec's fallback is an image
//! index stored under the tag `sha256-HEX` of the subject, which pushers keep up to date.
//! Both are read and, when needed, the fallback is written.

use std::collections::BTreeMap;

use oci_spec::image::{Descriptor, ImageIndex, MediaType};
use reqwest::header::ACCEPT;
use reqwest::StatusCode;

use super::client::{expect_status, read_bounded, Client, Scope};
use super::reference::RegistryRef;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::image::manifest::{BlobRef, Manifest, MAX_JSON_BYTES, OCI_INDEX};

/// One manifest that refers to a subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Referrer {
    /// The referrer's manifest digest.
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// Its manifest size.
    pub size: u64,
    /// Its artifact type, when it has one.
    pub artifact_type: Option<String>,
    /// Its manifest annotations.
    pub annotations: BTreeMap<String, String>,
}

impl Referrer {
    /// The entry that lists `manifest` among the referrers of its subject, as the referrers
    /// API gives it: its `artifactType`, else its config's media type.
    pub fn from_manifest(manifest: &Manifest) -> Self {
        Referrer {
            digest: manifest.digest,
            media_type: manifest.media_type.clone(),
            size: manifest.raw.len() as u64,
            artifact_type: manifest.artifact_type.clone().or_else(|| Some(manifest.config.media_type.clone())),
            annotations: manifest.annotations.clone(),
        }
    }

    /// The index entry that lists this referrer.
    fn descriptor(&self) -> Result<Descriptor> {
        let digest: oci_spec::image::Digest =
            self.digest.to_string().parse().map_err(|e: oci_spec::OciSpecError| Error::malformed(format!("referrer {}", self.digest), e.to_string()))?;
        let mut d = Descriptor::new(MediaType::from(self.media_type.as_str()), self.size, digest);
        d.set_artifact_type(self.artifact_type.as_deref().map(MediaType::from));
        if !self.annotations.is_empty() {
            d.set_annotations(Some(self.annotations.iter().map(|(k, v)| (k.clone(), v.clone())).collect()));
        }
        Ok(d)
    }

    /// The referrer an index entry lists.
    fn from_descriptor(d: &Descriptor) -> Result<Self> {
        let blob = BlobRef::from_descriptor(d)?;
        Ok(Referrer {
            digest: blob.digest,
            media_type: blob.media_type,
            size: blob.size,
            artifact_type: d.artifact_type().as_ref().map(ToString::to_string),
            annotations: d.annotations().iter().flatten().map(|(k, v)| (k.clone(), v.clone())).collect(),
        })
    }
}

/// The fallback tag under which referrers of `subject` are listed.
pub fn fallback_tag(subject: &Digest) -> String {
    format!("sha256-{}", subject.hex())
}

/// Whether `tag` is a referrers fallback tag ([`fallback_tag`]); its subject when it is.
pub fn fallback_subject(tag: &str) -> Option<Digest> {
    let hex = tag.strip_prefix("sha256-")?;
    format!("sha256:{hex}").parse().ok()
}

impl Client {
    /// Lists the referrers of `subject` in the repository, from the referrers API or else
    /// from the fallback tag. Malformed entries are errors, not silently dropped.
    pub async fn referrers(&self, r: &RegistryRef, subject: &Digest) -> Result<Vec<Referrer>> {
        let what = format!("referrers of {subject} in {}/{}", r.registry, r.repository);
        let url = self.url(r, &format!("{}/referrers/{subject}", r.repository))?;
        let response = self.send(r, &[Scope::pull(&r.repository)], &what, true, |h| h.get(url.clone()).header(ACCEPT, OCI_INDEX)).await?;
        let is_index = response.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|t| t.starts_with(OCI_INDEX));
        if response.status() == StatusCode::OK && is_index {
            let raw = read_bounded(response, MAX_JSON_BYTES, &what).await?;
            return parse_index(&raw, &what);
        }
        if response.status() != StatusCode::NOT_FOUND && response.status() != StatusCode::OK {
            expect_status(response, &what, &[]).await?;
        }
        match self.get_manifest(r, &fallback_tag(subject)).await {
            Ok(index) => parse_index(&index.raw, &what),
            Err(Error::NotFound(_)) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Adds `referrer` to the fallback tag index of `subject` (read, add, write). Concurrent
    /// pushers of referrers to the same subject may race; the loser's entry is re-added by
    /// its next push, and readers treat a missing entry as "no delta yet".
    pub async fn add_fallback_referrer(&self, r: &RegistryRef, subject: &Digest, referrer: &Referrer) -> Result<()> {
        let tag = fallback_tag(subject);
        let mut entries: Vec<Descriptor> = match self.get_manifest(r, &tag).await {
            Ok(index) => parse_oci_index(&index.raw, &format!("referrers index {tag}"))?.manifests().clone(),
            Err(Error::NotFound(_)) => Vec::new(),
            Err(e) => return Err(e),
        };
        let digest = referrer.digest.to_string();
        entries.retain(|e| e.digest().to_string() != digest);
        entries.push(referrer.descriptor()?);
        let mut index = ImageIndex::default();
        index.set_media_type(Some(MediaType::ImageIndex));
        index.set_manifests(entries);
        let raw = serde_json::to_vec(&index).expect("indexes serialize");
        self.put_manifest(r, &tag, OCI_INDEX, &raw).await?;
        Ok(())
    }
}

/// Reads the entries of a referrers index.
pub fn parse_index(raw: &[u8], what: &str) -> Result<Vec<Referrer>> {
    parse_oci_index(raw, what)?.manifests().iter().map(|d| Referrer::from_descriptor(d).map_err(|e| Error::malformed(what, e.to_string()))).collect()
}

fn parse_oci_index(raw: &[u8], what: &str) -> Result<ImageIndex> {
    if raw.len() as u64 > MAX_JSON_BYTES {
        return Err(Error::TooLarge { what: what.into(), limit: MAX_JSON_BYTES });
    }
    ImageIndex::from_reader(raw).map_err(|e| Error::malformed(what, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_tags_name_their_subject() {
        let d = Digest::of(b"x");
        assert_eq!(fallback_subject(&fallback_tag(&d)), Some(d));
        assert_eq!(fallback_subject("sha256-xyz"), None);
        assert_eq!(fallback_subject("v1"), None);
    }

    #[test]
    fn referrer_index_round_trips_and_rejects_bad_entries() {
        let r = Referrer {
            digest: Digest::of(b"m"),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: 10,
            artifact_type: None,
            annotations: [("io.fleetdelta.source.config".to_string(), "sha256:x".to_string())].into(),
        };
        let mut index = ImageIndex::default();
        index.set_manifests(vec![r.descriptor().unwrap()]);
        let raw = serde_json::to_vec(&index).unwrap();
        assert_eq!(parse_index(&raw, "t").unwrap(), vec![r]);
        let m = "application/vnd.oci.image.manifest.v1+json";
        let good = format!("sha256:{}", "0".repeat(64));
        for bad in [
            r#"{}"#.to_string(),
            r#"{"schemaVersion":2}"#.to_string(),
            format!(r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{m}","size":1}}]}}"#),
            format!(r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{m}","digest":"sha256:00","size":1}}]}}"#),
            format!(r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{m}","digest":"{good}"}}]}}"#),
            format!(r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{m}","digest":"{good}","size":1,"annotations":{{"a":1}}}}]}}"#),
        ] {
            assert!(parse_index(bad.as_bytes(), "t").is_err(), "{bad}");
        }
        let one = format!(r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{m}","digest":"{good}","size":1}}]}}"#);
        assert_eq!(parse_index(one.as_bytes(), "t").unwrap().len(), 1, "the smallest valid entry");
        assert_eq!(fallback_tag(&Digest::of(b"")), "sha256-e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }
}
