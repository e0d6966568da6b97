//! Pushing an image from a layout to a registry.

use serde::Serialize;
use serde_json::Value;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::image::manifest::MAX_JSON_BYTES;
use crate::image::Layout;
use crate::progress::Progress;
use crate::registry::referrers::Referrer;
use crate::registry::{BlobPush, Client, RegistryRef};

/// What pushing an image did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PushReport {
    /// The manifest digest now in the registry.
    pub manifest: Digest,
    /// Blobs uploaded, and their bytes.
    pub blobs_uploaded: usize,
    /// Bytes uploaded.
    pub bytes_uploaded: u64,
    /// Blobs the registry had or mounted.
    pub blobs_skipped: usize,
    /// Whether the referrers fallback tag was updated (registries without the referrers API).
    pub referrers_tag_updated: bool,
}

/// Pushes the image tagged `tag` in `layout` to `dest` (its tag, or its digest when it names
/// only a digest, which must then be the manifest's). Blobs the repository has are skipped;
/// blobs of `mount_from` (a repository of the same registry) are mounted. A manifest with a
/// `subject` is listed under the subject's referrers fallback tag when the registry does not
/// index referrers itself.
pub async fn push_image(
    client: &Client,
    layout: &Layout,
    tag: Option<&str>,
    dest: &RegistryRef,
    mount_from: Option<&str>,
    progress: &dyn Progress,
) -> Result<PushReport> {
    let manifest_ref = layout.resolve(tag)?;
    let image = layout.load_image(tag)?;
    let raw = layout.read_blob(&manifest_ref, MAX_JSON_BYTES)?;
    let reference = match (&dest.tag, &dest.digest) {
        (_, Some(d)) if *d != manifest_ref.digest => {
            return Err(Error::DigestMismatch { what: format!("push to {dest}"), expected: *d, found: manifest_ref.digest });
        }
        (Some(t), _) => t.clone(),
        (None, Some(d)) => d.to_string(),
        (None, None) => crate::image::DEFAULT_TAG.to_string(),
    };
    let mut report = PushReport { manifest: manifest_ref.digest, blobs_uploaded: 0, bytes_uploaded: 0, blobs_skipped: 0, referrers_tag_updated: false };
    let blobs: Vec<_> = std::iter::once(&image.manifest.config).chain(image.layers.iter().map(|l| &l.blob)).collect();
    progress.stage(&format!("pushing {}", dest.repository), blobs.iter().map(|b| b.size).sum());
    for blob in blobs {
        // An upload advances progress as its chunks are acknowledged; a blob already there
        // (or mounted) counts at once.
        match client.push_blob(dest, blob, &layout.blob_path(&blob.digest), mount_from, progress).await? {
            BlobPush::Uploaded => {
                report.blobs_uploaded += 1;
                report.bytes_uploaded += blob.size;
            }
            BlobPush::Present | BlobPush::Mounted => {
                report.blobs_skipped += 1;
                progress.advance(blob.size);
            }
        }
    }
    let acknowledged = client.put_manifest(dest, &reference, &manifest_ref.media_type, &raw).await?;
    let doc: Value = serde_json::from_slice(&raw).map_err(|e| Error::malformed(format!("manifest {}", manifest_ref.digest), e.to_string()))?;
    if let (Some(subject), false) = (doc.get("subject"), acknowledged) {
        let subject: Digest = subject
            .get("digest")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::malformed(format!("manifest {}", manifest_ref.digest), "subject without a digest"))?
            .parse()?;
        let annotations = doc
            .get("annotations")
            .cloned()
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| Error::malformed(format!("manifest {}", manifest_ref.digest), e.to_string()))?;
        let artifact_type = doc.get("artifactType").and_then(Value::as_str).map(str::to_string).or_else(|| Some(image.manifest.config.media_type.clone()));
        let referrer = Referrer {
            digest: manifest_ref.digest,
            media_type: manifest_ref.media_type.clone(),
            size: manifest_ref.size,
            artifact_type,
            annotations: annotations.unwrap_or_default(),
        };
        client.add_fallback_referrer(dest, &subject, &referrer).await?;
        report.referrers_tag_updated = true;
    }
    progress.finish();
    Ok(report)
}
