//! The engine's API, through bollard: image inspect, export, load and tag. Synchronous
//! methods over the caller's tokio runtime; archives stream between the API and a thread
//! that reads or writes the layout.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use bollard::query_parameters::{ImportImageOptions, RemoveImageOptions, TagImageOptions};
use bollard::{Docker, API_DEFAULT_VERSION};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Serialize;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::image::manifest::BlobRef;
use crate::image::{Image, Layout, LayoutWriter};

use super::archive::{read_archive, write_archive, ArchiveStats};
use super::EngineRef;

/// Seconds an ordinary API request (inspect, tag, create, start, list…) may take to answer:
/// an engine that does not answer by then is reported, not waited for without end.
pub(super) const CONTROL_TIMEOUT: Duration = Duration::from_secs(120);
/// Seconds an image transfer may take to answer: a load is answered only once the whole
/// archive was sent and stored.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(3600);
/// Bytes sent to the engine per chunk of a load.
const CHUNK_BYTES: usize = 256 << 10;
/// Chunks in flight between the archive writer (or reader) and the API.
const CHANNEL_CHUNKS: usize = 8;

/// An image as the engine describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineImage {
    /// The image ID: the digest of its config.
    pub id: Digest,
    /// `RootFS.Layers`: the diff_ids, base first.
    pub layers: Vec<Digest>,
    /// `NAME:TAG`s that point at it.
    pub tags: Vec<String>,
}

/// What loading an image into the engine did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LoadReport {
    /// The image ID (the config digest), verified in the engine.
    pub id: Option<Digest>,
    /// The tag set, `NAME:TAG`.
    pub tagged: String,
    /// Whether the engine already had the image (nothing sent: only tagged).
    pub already_present: bool,
    /// The archive sent (bytes, layers sent and left out), when one was.
    pub archive: Option<ArchiveStats>,
    /// Whether a load without the layers the engine has was refused and all were sent.
    pub resent_whole: bool,
}

/// A connection to a container engine.
#[derive(Debug)]
pub struct Engine {
    pub(super) docker: Docker,
    host: String,
    pub(super) runtime: tokio::runtime::Handle,
}

impl Engine {
    /// Connects to the engine at `host` (`unix:///PATH`, `tcp://HOST:PORT` or
    /// `http://HOST:PORT`), agreeing on the API version it speaks (Docker 20.10 speaks 1.41).
    pub fn connect(host: &str, runtime: tokio::runtime::Handle) -> Result<Self> {
        let unreachable = |reason: String| Error::Engine { engine: host.to_string(), what: "connecting".into(), reason };
        let docker = if host.starts_with("unix://") || host.starts_with('/') {
            Docker::connect_with_unix(host, CONTROL_TIMEOUT.as_secs(), API_DEFAULT_VERSION)
        } else if host.starts_with("tcp://") || host.starts_with("http://") {
            Docker::connect_with_http(host, CONTROL_TIMEOUT.as_secs(), API_DEFAULT_VERSION)
        } else {
            return Err(unreachable("expected unix:///PATH, tcp://HOST:PORT or http://HOST:PORT (TLS is not supported)".into()));
        }
        .map_err(|e| unreachable(e.to_string()))?;
        let docker = runtime.block_on(docker.negotiate_version()).map_err(|e| unreachable(e.to_string()))?;
        Ok(Engine { docker, host: host.to_string(), runtime })
    }

    /// Where the engine is reached.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The connection for an image export or load, which may stream for long.
    fn transfer_client(&self) -> Docker {
        self.docker.clone().with_timeout(TRANSFER_TIMEOUT)
    }

    pub(super) fn error(&self, what: impl Into<String>, e: impl std::fmt::Display) -> Error {
        Error::Engine { engine: self.host.clone(), what: what.into(), reason: e.to_string() }
    }

    /// The image `name` (`NAME:TAG` or `sha256:HEX`) names, or `None` when the engine has none.
    pub fn inspect(&self, name: &str) -> Result<Option<EngineImage>> {
        let what = || format!("inspecting {name}");
        let found = match self.runtime.block_on(self.docker.inspect_image(name)) {
            Ok(found) => found,
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => return Ok(None),
            Err(e) => return Err(self.error(what(), e)),
        };
        let id = found.id.as_deref().ok_or_else(|| self.error(what(), "the answer has no Id"))?;
        let id: Digest = id.parse().map_err(|e| self.error(what(), format!("image ID {id:?}: {e}")))?;
        let layers = found
            .root_fs
            .and_then(|r| r.layers)
            .unwrap_or_default()
            .iter()
            .map(|l| l.parse::<Digest>().map_err(|e| self.error(what(), format!("RootFS layer {l:?}: {e}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(EngineImage { id, layers, tags: found.repo_tags.unwrap_or_default() }))
    }

    /// The image `image` names, or an error saying the engine lacks it.
    pub fn require(&self, image: &EngineRef) -> Result<EngineImage> {
        self.inspect(&image.api_name())?.ok_or_else(|| Error::NotFound(format!("image {} in the container engine at {}", image.api_name(), self.host)))
    }

    /// Exports `image` into `writer` (see [`read_archive`]): exported by its ID, so that a tag
    /// moved meanwhile does not mix two images; the config must hash to that ID and every
    /// layer to its diff_id. Returns the manifest written (to commit) and the image.
    pub fn export(&self, image: &EngineRef, writer: &LayoutWriter, max_layer_bytes: u64) -> Result<(BlobRef, EngineImage)> {
        let found = self.require(image)?;
        let id = found.id.to_string();
        let what = format!("docker-daemon:{}", image.api_name());
        let (tx, rx) = mpsc::sync_channel::<io::Result<Bytes>>(CHANNEL_CHUNKS);
        let manifest = std::thread::scope(|s| {
            let reader = s.spawn(|| read_archive(ChannelReader { rx, current: Bytes::new() }, writer, &found.id, max_layer_bytes, &what));
            let fed = self.runtime.block_on(async {
                let transfer = self.transfer_client();
                let mut stream = transfer.export_image(&id);
                while let Some(chunk) = stream.next().await {
                    let failed = chunk.as_ref().err().map(|e| e.to_string());
                    // A reader that stopped (it failed) drops the receiver: stop too.
                    if tx.send(chunk.map_err(io::Error::other)).is_err() {
                        return Ok(());
                    }
                    if let Some(e) = failed {
                        return Err(e);
                    }
                }
                Ok(())
            });
            drop(tx);
            let read = reader.join().map_err(|_| Error::io("reading the exported archive", io::Error::other("the reader panicked")))?;
            match (fed, read) {
                (Err(e), _) => Err(self.error(format!("exporting {}", image.api_name()), e)),
                (Ok(()), read) => read,
            }
        })?;
        Ok((manifest, found))
    }

    /// Loads `image` of `layout` into the engine and tags it `dest`, the tag last: the
    /// archive carries no tag, and the image is tagged only once the engine holds an image
    /// whose ID is the config digest and whose layers are the config's diff_ids. Layers the
    /// engine has as a chain (the longest prefix of the diff_ids shared with one of
    /// `known`, images the engine has) are left out of the archive; should the engine refuse
    /// that (it lost them meanwhile), the whole archive is sent. `scratch` holds layers
    /// decompressed on the way.
    pub fn load(&self, layout: &Layout, image: &Image, dest: &EngineRef, known: &[EngineImage], scratch: &Path) -> Result<LoadReport> {
        let id_name = image.config.digest.to_string();
        let mut report = LoadReport { tagged: dest.api_name(), ..LoadReport::default() };
        let before = self.inspect(&id_name)?;
        report.already_present = before.as_ref().is_some_and(|b| b.layers == image.config.diff_ids);
        if !report.already_present {
            let shared = known.iter().map(|k| common_prefix(&k.layers, &image.config.diff_ids)).max().unwrap_or(0);
            report.archive = Some(match self.send(layout, image, shared, scratch) {
                Ok(stats) => stats,
                Err(_) if shared > 0 => {
                    report.resent_whole = true;
                    self.send(layout, image, 0, scratch)?
                }
                Err(e) => return Err(e),
            });
        }
        let loaded = self.inspect(&id_name)?;
        let verified = match &loaded {
            Some(l) if l.id == image.config.digest && l.layers == image.config.diff_ids => Ok(()),
            Some(l) => Err(self.error(
                format!("loading {}", dest.api_name()),
                format!("the engine holds {} with layers {:?}, expected {} with {:?}", l.id, l.layers, image.config.digest, image.config.diff_ids),
            )),
            None => Err(self.error(format!("loading {}", dest.api_name()), format!("the engine has no image {} after loading it", image.config.digest))),
        };
        if let Err(e) = verified {
            // Nothing was tagged; an untagged image this load created is taken out again.
            if before.is_none() && loaded.is_some() {
                let _ =
                    self.runtime.block_on(self.docker.remove_image(&id_name, Some(RemoveImageOptions { force: false, noprune: false, platforms: None }), None));
            }
            return Err(e);
        }
        let options = TagImageOptions { repo: Some(dest.name.clone()), tag: Some(dest.tag_or_default().to_string()) };
        self.runtime
            .block_on(self.docker.tag_image(&id_name, Some(options)))
            .map_err(|e| self.error(format!("tagging {} as {}", image.config.digest, dest.api_name()), e))?;
        report.id = Some(image.config.digest);
        Ok(report)
    }

    /// Streams one archive of `image` (the first `omit` layers left out) to `POST /images/load`.
    fn send(&self, layout: &Layout, image: &Image, omit: usize, scratch: &Path) -> Result<ArchiveStats> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(CHANNEL_CHUNKS);
        std::thread::scope(|s| {
            let writer = s.spawn(move || {
                let mut out = ChannelWriter { tx: tx.clone(), buffer: Vec::with_capacity(CHUNK_BYTES) };
                let written = write_archive(layout, image, omit, &mut out, scratch);
                if let Err(e) = &written {
                    // The request body fails: the engine drops what it received.
                    let _ = tx.blocking_send(Err(io::Error::other(e.to_string())));
                }
                written
            });
            let body = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
            let loaded = self.runtime.block_on(async {
                let transfer = self.transfer_client();
                let mut answers = transfer.import_image_stream(ImportImageOptions { quiet: true, platform: None }, body, None);
                while let Some(answer) = answers.next().await {
                    answer?;
                }
                Ok::<_, bollard::errors::Error>(())
            });
            let written = writer.join().map_err(|_| Error::io("writing the archive", io::Error::other("the writer panicked")))?;
            match (written, loaded) {
                (Ok(stats), Ok(())) => Ok(stats),
                // The engine stopped reading: what it said (or why the request failed) is the cause.
                (Err(Error::Io { source, .. }), Err(e)) if source.kind() == io::ErrorKind::BrokenPipe => {
                    Err(self.error(format!("loading {}", image.config.digest), e))
                }
                (Err(e), _) => Err(e),
                (Ok(_), Err(e)) => Err(self.error(format!("loading {}", image.config.digest), e)),
            }
        })
    }
}

/// How many leading entries `a` and `b` share.
fn common_prefix(a: &[Digest], b: &[Digest]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Reads the chunks a channel carries.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.recv() {
                Ok(chunk) => self.current = chunk?,
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Sends what is written as chunks of a channel; fails once the receiver is gone (the
/// request ended).
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<io::Result<Bytes>>,
    buffer: Vec<u8>,
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(buf);
        if self.buffer.len() >= CHUNK_BYTES {
            self.flush()?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buffer, Vec::with_capacity(CHUNK_BYTES)));
        self.tx.blocking_send(Ok(chunk)).map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the engine stopped reading the archive"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_layers_are_a_prefix() {
        let (a, b, c) = (Digest::of(b"a"), Digest::of(b"b"), Digest::of(b"c"));
        assert_eq!(common_prefix(&[a, b], &[a, b, c]), 2);
        assert_eq!(common_prefix(&[a, c], &[a, b, c]), 1);
        assert_eq!(common_prefix(&[b, a], &[a, b]), 0);
        assert_eq!(common_prefix(&[], &[a]), 0);
    }
}
