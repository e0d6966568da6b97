//! Blobs: resumable, verified downloads and uploads (cross-repository mount, one request or
//! chunks).
//!
//! A download that breaks resumes from the byte where it stopped with an HTTP `Range`
//! request, and keeps going as long as each attempt makes progress; a registry that ignores
//! the range (answers `200`) is read from the start and the bytes already kept are skipped.
//! Nothing more than the declared size is ever accepted, and the digest is checked before the
//! caller may use the blob.

use std::io::{SeekFrom, Write};
use std::path::Path;

use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE};
use reqwest::{Method, Response, StatusCode, Url};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::client::{describe, error_message, expect_status, Client, Scope};
use super::reference::RegistryRef;
use crate::digest::{verify, Hasher};
use crate::error::{Error, Result};
use crate::image::manifest::BlobRef;
use crate::progress::Progress;

/// How a blob came to be in the destination repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BlobPush {
    /// It was there already.
    Present,
    /// The registry linked it from another repository (no bytes sent).
    Mounted,
    /// It was uploaded.
    Uploaded,
}

/// What a download cost on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Download {
    /// Bytes received, counting any received twice after a resume.
    pub received: u64,
    /// How many times the download resumed after a failure.
    pub resumes: u32,
}

impl Client {
    /// Whether the repository has the blob (`HEAD`).
    pub async fn blob_exists(&self, r: &RegistryRef, blob: &BlobRef, push: bool) -> Result<bool> {
        let what = format!("HEAD blob {} in {}/{}", blob.digest, r.registry, r.repository);
        let url = self.url(r, &format!("{}/blobs/{}", r.repository, blob.digest))?;
        let scope = if push { Scope::push(&r.repository) } else { Scope::pull(&r.repository) };
        let response = self.send(r, &[scope], &what, true, |h| h.head(url.clone())).await?;
        match response.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(expect_status(response, &what, &[]).await.expect_err("no status accepted")),
        }
    }

    /// Downloads a blob into `out`, resuming after failures, and verifies its size and digest.
    /// `out` receives each byte once, in order; on error the caller discards what it got.
    pub async fn download_blob(&self, r: &RegistryRef, blob: &BlobRef, out: &mut (dyn Write + Send), progress: &dyn Progress) -> Result<Download> {
        let what = format!("blob {} from {}/{}", blob.digest, r.registry, r.repository);
        let url = self.url(r, &format!("{}/blobs/{}", r.repository, blob.digest))?;
        let mut hasher = Hasher::new();
        let mut stats = Download::default();
        let mut failures = 0u32;
        loop {
            let from = hasher.len();
            if from == blob.size && from > 0 {
                // Everything arrived but the connection broke before its end was seen.
                break;
            }
            let response = self
                .send(r, &[Scope::pull(&r.repository)], &what, true, |h| {
                    let request = h.get(url.clone());
                    if from > 0 {
                        request.header(RANGE, format!("bytes={from}-"))
                    } else {
                        request
                    }
                })
                .await?;
            let skip = match response.status() {
                StatusCode::OK => from,
                StatusCode::PARTIAL_CONTENT if from > 0 => {
                    let range = response.headers().get(CONTENT_RANGE).and_then(|v| v.to_str().ok()).unwrap_or("");
                    if !range.starts_with(&format!("bytes {from}-")) {
                        return Err(Error::malformed(&what, format!("asked for bytes from {from}, got Content-Range {range:?}")));
                    }
                    0
                }
                StatusCode::NOT_FOUND => return Err(Error::NotFound(what)),
                _ => return Err(expect_status(response, &what, &[]).await.expect_err("no status accepted")),
            };
            if from > 0 {
                stats.resumes += 1;
            }
            let before = hasher.len();
            let outcome = receive(response, skip, blob.size, &mut hasher, out, &what, progress, &mut stats).await?;
            if let Some(e) = outcome {
                // A broken connection or a stalled one: try again from where we are. An attempt
                // that brought bytes restarts the count, so a slow link that keeps moving
                // finishes; one that brings nothing gives up after the configured retries.
                failures = if hasher.len() > before { 0 } else { failures + 1 };
                if failures > self.options.retries {
                    return Err(Error::Network {
                        what,
                        reason: format!("{e} ({failures} attempts without progress, {} of {} bytes received)", hasher.len(), blob.size),
                    });
                }
                tokio::time::sleep(self.backoff(failures)).await;
                continue;
            }
            let len = hasher.len();
            if len < blob.size {
                failures += 1;
                if failures > self.options.retries {
                    return Err(Error::SizeMismatch { what: format!("{what}: the registry keeps ending the body early"), expected: blob.size, found: len });
                }
                tokio::time::sleep(self.backoff(failures)).await;
                continue;
            }
            break;
        }
        let len = hasher.len();
        verify(|| what.clone(), &blob.digest, Some(blob.size), &hasher.finish(), len)?;
        Ok(stats)
    }

    /// Makes the repository hold the blob stored in the file `path`: nothing when it has it,
    /// a cross-repository mount from `mount_from` (a repository of the same registry) when
    /// the registry allows, else an upload in one request or in chunks of
    /// [`super::ClientOptions::chunk_size`].
    pub async fn push_blob(&self, r: &RegistryRef, blob: &BlobRef, path: &Path, mount_from: Option<&str>, progress: &dyn Progress) -> Result<BlobPush> {
        if self.blob_exists(r, blob, true).await? {
            return Ok(BlobPush::Present);
        }
        let what = format!("upload of blob {} to {}/{}", blob.digest, r.registry, r.repository);
        let mut start = self.url(r, &format!("{}/blobs/uploads/", r.repository))?;
        let mut scopes = vec![Scope::push(&r.repository)];
        if let Some(from) = mount_from.filter(|f| *f != r.repository) {
            start.query_pairs_mut().append_pair("mount", &blob.digest.to_string()).append_pair("from", from);
            scopes.push(Scope::pull(from));
        }
        let response = self.send(r, &scopes, &what, true, |h| h.post(start.clone()).header(CONTENT_LENGTH, 0)).await?;
        if response.status() == StatusCode::CREATED {
            return Ok(BlobPush::Mounted);
        }
        let response = expect_status(response, &what, &[StatusCode::ACCEPTED]).await?;
        let mut location = next_location(&response, &start, &what)?;

        let mut file = tokio::fs::File::open(path).await.map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let chunk_size = self.options.chunk_size.max(1) as u64;
        if blob.size <= chunk_size {
            let mut body = Vec::with_capacity(blob.size as usize);
            (&mut file).take(blob.size + 1).read_to_end(&mut body).await.map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            if body.len() as u64 != blob.size {
                return Err(Error::SizeMismatch { what: path.display().to_string(), expected: blob.size, found: body.len() as u64 });
            }
            let url = with_digest(&location, blob);
            let response = self
                .send(r, &[Scope::push(&r.repository)], &what, true, |h| {
                    h.request(Method::PUT, url.clone()).header(CONTENT_TYPE, "application/octet-stream").body(body.clone())
                })
                .await?;
            expect_status(response, &what, &[StatusCode::CREATED]).await?;
            progress.advance(blob.size);
            return Ok(BlobPush::Uploaded);
        }

        let mut offset = 0u64;
        // What progress was told: an upload resumed from where the registry says it is
        // reports each byte once.
        let mut reported = 0u64;
        let mut failures = 0u32;
        while offset < blob.size {
            let len = chunk_size.min(blob.size - offset);
            let mut body = vec![0u8; len as usize];
            file.seek(SeekFrom::Start(offset)).await.map_err(|e| Error::io(format!("seeking {}", path.display()), e))?;
            file.read_exact(&mut body).await.map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            let range = format!("{}-{}", offset, offset + len - 1);
            let url = location.clone();
            // Not retried blindly: after a failure the registry says how much it kept.
            let sent = self
                .send(r, &[Scope::push(&r.repository)], &what, false, |h| {
                    h.request(Method::PATCH, url.clone()).header(CONTENT_TYPE, "application/octet-stream").header(CONTENT_RANGE, &range).body(body.clone())
                })
                .await;
            match sent {
                Ok(response) if response.status() == StatusCode::ACCEPTED => {
                    location = next_location(&response, &location, &what)?;
                    offset += len;
                    failures = 0;
                    if offset > reported {
                        progress.advance(offset - reported);
                        reported = offset;
                    }
                }
                other => {
                    let reason = match other {
                        Ok(response) => format!("{}: {}", response.status(), error_message(response).await),
                        Err(e) => e.to_string(),
                    };
                    failures += 1;
                    if failures > self.options.retries {
                        return Err(Error::Network { what, reason: format!("{reason} (after {failures} attempts)") });
                    }
                    tokio::time::sleep(self.backoff(failures)).await;
                    offset = self.upload_offset(r, &location, &what).await?;
                }
            }
        }
        let url = with_digest(&location, blob);
        let response = self.send(r, &[Scope::push(&r.repository)], &what, true, |h| h.request(Method::PUT, url.clone()).header(CONTENT_LENGTH, 0)).await?;
        expect_status(response, &what, &[StatusCode::CREATED]).await?;
        Ok(BlobPush::Uploaded)
    }

    /// Asks the registry to link the blob from the repository `from` of the same registry.
    /// Returns whether it did; when it opens an upload session instead, that session is
    /// cancelled.
    pub async fn mount_blob(&self, r: &RegistryRef, blob: &BlobRef, from: &str) -> Result<bool> {
        let what = format!("mount of blob {} from {from} into {}/{}", blob.digest, r.registry, r.repository);
        let mut url = self.url(r, &format!("{}/blobs/uploads/", r.repository))?;
        url.query_pairs_mut().append_pair("mount", &blob.digest.to_string()).append_pair("from", from);
        let scopes = [Scope::push(&r.repository), Scope::pull(from)];
        let response = self.send(r, &scopes, &what, true, |h| h.post(url.clone()).header(CONTENT_LENGTH, 0)).await?;
        if response.status() == StatusCode::CREATED {
            return Ok(true);
        }
        let response = expect_status(response, &what, &[StatusCode::ACCEPTED]).await?;
        if let Ok(session) = next_location(&response, &url, &what) {
            // Best effort: an abandoned session expires on its own.
            let _ = self.send(r, &scopes[..1], &what, false, |h| h.delete(session.clone())).await;
        }
        Ok(false)
    }

    /// How many bytes of an upload session the registry holds (`GET` on the session).
    async fn upload_offset(&self, r: &RegistryRef, location: &Url, what: &str) -> Result<u64> {
        let response = self.send(r, &[Scope::push(&r.repository)], what, true, |h| h.get(location.clone())).await?;
        let response = expect_status(response, what, &[StatusCode::NO_CONTENT, StatusCode::OK]).await?;
        let range = response.headers().get(RANGE).and_then(|v| v.to_str().ok()).unwrap_or("0-0");
        let end = range.rsplit('-').next().and_then(|e| e.trim().parse::<u64>().ok());
        Ok(match end {
            Some(end) if range != "0-0" => end + 1,
            _ => 0,
        })
    }
}

/// Streams one response body into `out`. Returns `Ok(Some(reason))` when the connection broke
/// (worth resuming) and `Err` for what retrying cannot fix.
#[allow(clippy::too_many_arguments)]
async fn receive(
    mut response: Response,
    mut skip: u64,
    size: u64,
    hasher: &mut Hasher,
    out: &mut (dyn Write + Send),
    what: &str,
    progress: &dyn Progress,
    stats: &mut Download,
) -> Result<Option<String>> {
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return Ok(None),
            Err(e) => return Ok(Some(describe(&e))),
        };
        stats.received += chunk.len() as u64;
        let mut data = &chunk[..];
        let dropped = skip.min(data.len() as u64);
        data = &data[dropped as usize..];
        skip -= dropped;
        if hasher.len() + data.len() as u64 > size {
            return Err(Error::SizeMismatch {
                what: format!("{what}: the registry sent more than the declared size"),
                expected: size,
                found: hasher.len() + data.len() as u64,
            });
        }
        hasher.update(data);
        out.write_all(data).map_err(|e| Error::io(format!("writing {what}"), e))?;
        progress.advance(data.len() as u64);
    }
}

/// The upload session URL from `Location`, resolved against the request URL.
fn next_location(response: &Response, base: &Url, what: &str) -> Result<Url> {
    let location = response.headers().get(LOCATION).and_then(|v| v.to_str().ok()).ok_or_else(|| Error::malformed(what, "no Location header in the answer"))?;
    let url = base.join(location).map_err(|e| Error::malformed(what, format!("Location {location:?}: {e}")))?;
    if url.host_str() != base.host_str() || url.port_or_known_default() != base.port_or_known_default() {
        // Credentials must not follow an upload to another host.
        return Err(Error::unsupported(what, format!("the upload moved to another host ({location})")));
    }
    Ok(url)
}

fn with_digest(location: &Url, blob: &BlobRef) -> Url {
    let mut url = location.clone();
    url.query_pairs_mut().append_pair("digest", &blob.digest.to_string());
    url
}
