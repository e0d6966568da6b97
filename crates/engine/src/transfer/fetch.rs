//! Fetching an image from a registry into a layout being written.

use serde::Serialize;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::image::manifest::{BlobRef, Config, Image, Manifest, MAX_JSON_BYTES};
use crate::image::{Layout, LayoutWriter};
use crate::progress::Progress;
use crate::registry::{Client, RegistryRef};

/// What fetching an image cost.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FetchReport {
    /// The image manifest's digest.
    pub manifest: Option<Digest>,
    /// Bytes received from the registry (manifests, config, layers; bytes received twice
    /// after a resume count twice).
    pub received: u64,
    /// Blobs downloaded.
    pub blobs_downloaded: usize,
    /// Blobs found locally (in the destination or a reuse layout) instead.
    pub blobs_reused: usize,
    /// Downloads resumed after a broken connection.
    pub resumes: u32,
}

/// Fetches the image `r` names (the entry for the client's platform when it is an index):
/// its manifest byte for byte, its config, and every layer blob that neither `writer`'s
/// destination nor any of `reuse` already holds and that `skip` does not list (a copy on its
/// way to a registry that has those). Every blob is verified before it is staged. The caller
/// commits `writer` under the tag it wants.
pub async fn fetch_image(
    client: &Client,
    r: &RegistryRef,
    writer: &LayoutWriter,
    reuse: &[&Layout],
    skip: &[Digest],
    progress: &dyn Progress,
) -> Result<(BlobRef, Image, FetchReport)> {
    let fetched = client.get_image_manifest(r).await?;
    let mut report = FetchReport { manifest: Some(fetched.digest), received: fetched.raw.len() as u64, ..FetchReport::default() };
    let manifest = Manifest::parse(fetched.raw.clone(), Some(&fetched.media_type))?;
    let manifest_ref = BlobRef { media_type: fetched.media_type.clone(), digest: fetched.digest, size: fetched.raw.len() as u64 };
    writer.put_blob(&fetched.raw)?;

    if manifest.config.size > MAX_JSON_BYTES {
        return Err(Error::TooLarge { what: format!("config of {r}"), limit: MAX_JSON_BYTES });
    }
    let mut config_bytes = Vec::new();
    let got = client.download_blob(r, &manifest.config, &mut config_bytes, &crate::progress::Silent).await?;
    report.received += got.received;
    let config = Config::parse(config_bytes)?;
    writer.put_blob(&config.raw)?;
    let image = Image::new(manifest, config)?;

    let missing: u64 = image.layers.iter().filter(|l| !skip.contains(&l.blob.digest) && !writer.has_blob(&l.blob)).map(|l| l.blob.size).sum();
    progress.stage(&format!("fetching {}", r.repository), missing);
    for (i, layer) in image.layers.iter().enumerate() {
        let what = format!("layer {i} of {r}");
        if skip.contains(&layer.blob.digest) {
            continue;
        }
        if writer.has_blob(&layer.blob) {
            report.blobs_reused += 1;
            continue;
        }
        if let Some(local) = reuse.iter().find(|l| l.blob_path(&layer.blob.digest).exists()) {
            if writer.add_existing_blob(local, &layer.blob, &what).is_ok() {
                report.blobs_reused += 1;
                progress.advance(layer.blob.size);
                continue;
            }
        }
        let mut out = writer.blob_limited(layer.blob.size, &what)?;
        let got = client.download_blob(r, &layer.blob, &mut out, progress).await?;
        out.finish(Some((&layer.blob.digest, &what)))?;
        report.received += got.received;
        report.resumes += got.resumes;
        report.blobs_downloaded += 1;
    }
    progress.finish();
    Ok((manifest_ref, image, report))
}
