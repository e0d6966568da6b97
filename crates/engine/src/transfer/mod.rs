//! Moving images between transports: fetching from registries, pushing to them, copying
//! between any two references, and the bridge that lets the synchronous engine (diff, apply)
//! read and write registry images through local scratch layouts.
//!
//! - [`fetch`] copies registry -> layout, skipping what the destination already holds.
//! - [`push`] copies layout -> registry, with mounts and the referrers fallback tag.
//! - [`Transfer`] is the synchronous front: `localize`, `staging_for`, `publish`, `copy`;
//!   it also reaches the container engine (`docker-daemon:` references, [`crate::engine`]).

pub mod fetch;
pub mod push;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use serde::Serialize;

pub use fetch::{fetch_image, FetchReport};
pub use push::{push_image, PushReport};

use crate::digest::Digest;
use crate::engine::client::EngineImage;
use crate::engine::{Engine, EngineRef, LoadReport, DEFAULT_ENGINE_HOST};
use crate::error::{Error, IoContext, Result};
use crate::image::manifest::{BlobRef, MAX_JSON_BYTES};
use crate::image::{Layout, LayoutWriter};
use crate::locked_dir::ScratchDir;
use crate::progress::Progress;
use crate::reference::ImageRef;
use crate::registry::{Client, ClientOptions, RegistryRef};

/// What a copy did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CopyReport {
    /// The manifest digest of the copied image.
    pub manifest: Option<Digest>,
    /// What was fetched, when the source is a registry.
    pub fetched: Option<FetchReport>,
    /// What was pushed, when the destination is a registry.
    pub pushed: Option<PushReport>,
    /// What was loaded, when the destination is the container engine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loaded: Option<LoadReport>,
}

/// What [`Transfer::publish_report`] did with a staged image.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Published {
    /// What was pushed, when the destination is a registry.
    pub pushed: Option<PushReport>,
    /// What was loaded, when the destination is the container engine.
    pub loaded: Option<LoadReport>,
}

/// Largest layer accepted from the container engine's export.
const MAX_ENGINE_LAYER_BYTES: u64 = 64 << 30;

/// Registry and engine access for synchronous callers: owns a tokio runtime, a [`Client`],
/// the container engine's connection (made when first needed) and a scratch directory
/// (removed on drop) where registry and engine images are staged.
#[derive(Debug)]
pub struct Transfer {
    /// Started on first use: a transfer between local layouts never needs one.
    runtime: OnceLock<tokio::runtime::Runtime>,
    client: Client,
    scratch: OnceLock<ScratchDir>,
    counter: AtomicUsize,
    engine_host: String,
    engine: OnceLock<Engine>,
    /// Images read from the engine: their layers are in it, so loads leave them out.
    engine_images: Mutex<Vec<EngineImage>>,
}

/// The prefix of a transfer's scratch directory in the system's temporary directory.
pub const SCRATCH_PREFIX: &str = "fleetdelta-scratch-";

impl Transfer {
    /// A transfer with these client options.
    pub fn new(options: ClientOptions) -> Result<Self> {
        let engine_host = std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| DEFAULT_ENGINE_HOST.to_string());
        Ok(Transfer {
            runtime: OnceLock::new(),
            client: Client::new(options)?,
            scratch: OnceLock::new(),
            counter: AtomicUsize::new(0),
            engine_host,
            engine: OnceLock::new(),
            engine_images: Mutex::default(),
        })
    }

    /// The same transfer reaching the container engine at `host` (`unix:///PATH`,
    /// `tcp://HOST:PORT`) instead of `$DOCKER_HOST` or [`DEFAULT_ENGINE_HOST`].
    pub fn with_engine(mut self, host: Option<String>) -> Self {
        if let Some(host) = host {
            self.engine_host = host;
            self.engine = OnceLock::new();
        }
        self
    }

    /// The container engine, connected on first use.
    pub fn engine(&self) -> Result<&Engine> {
        if let Some(engine) = self.engine.get() {
            return Ok(engine);
        }
        let engine = Engine::connect(&self.engine_host, self.runtime()?.handle().clone())?;
        Ok(self.engine.get_or_init(|| engine))
    }

    /// The registry client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Runs a future of the registry API to completion; fails if the async runtime cannot
    /// be started.
    pub fn block_on<T, E: From<Error>>(&self, future: impl std::future::Future<Output = std::result::Result<T, E>>) -> std::result::Result<T, E> {
        self.runtime()?.block_on(future)
    }

    /// The async runtime, started on first use.
    fn runtime(&self) -> Result<&tokio::runtime::Runtime> {
        if let Some(runtime) = self.runtime.get() {
            return Ok(runtime);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().ctx(|| "starting the async runtime".into())?;
        Ok(self.runtime.get_or_init(|| runtime))
    }

    fn scratch(&self) -> Result<PathBuf> {
        if let Some(dir) = self.scratch.get() {
            return Ok(dir.path().to_path_buf());
        }
        // A killed process's scratch directory is removed by the next one's creation.
        let dir = ScratchDir::create(&std::env::temp_dir(), SCRATCH_PREFIX)?;
        Ok(self.scratch.get_or_init(|| dir).path().to_path_buf())
    }

    /// A local reference to `image`: itself for a layout; for a registry image, a verified
    /// copy fetched into the scratch layout (blobs shared by several fetched images are
    /// fetched once).
    ///
    /// An engine image is exported into the scratch layout, its config byte for byte and its
    /// layers uncompressed (see [`Engine::export`]).
    pub fn localize(&self, image: &ImageRef, progress: &dyn Progress) -> Result<(ImageRef, Option<FetchReport>)> {
        if let ImageRef::Engine(e) = image {
            return Ok((self.export_from_engine(e)?, None));
        }
        let ImageRef::Registry(r) = image else { return Ok((image.clone(), None)) };
        let dir = self.scratch()?.join("fetched");
        let tag = format!("image-{}", self.counter.fetch_add(1, Ordering::Relaxed));
        let writer = LayoutWriter::create(&dir)?;
        let (manifest, _, report) = self.block_on(fetch_image(&self.client, r, &writer, &[], &[], progress))?;
        writer.commit(&manifest, &tag)?;
        Ok((ImageRef::Layout { dir, tag: Some(tag) }, Some(report)))
    }

    fn export_from_engine(&self, image: &EngineRef) -> Result<ImageRef> {
        let dir = self.scratch()?.join("fetched");
        let tag = format!("image-{}", self.counter.fetch_add(1, Ordering::Relaxed));
        let writer = LayoutWriter::create(&dir)?;
        let (manifest, found) = self.engine()?.export(image, &writer, MAX_ENGINE_LAYER_BYTES)?;
        writer.commit(&manifest, &tag)?;
        self.engine_images.lock().unwrap_or_else(|e| e.into_inner()).push(found);
        Ok(ImageRef::Layout { dir, tag: Some(tag) })
    }

    /// A fresh layout directory in the scratch directory (removed with the transfer), for
    /// images staged on the way elsewhere.
    pub fn scratch_layout(&self, what: &str) -> Result<PathBuf> {
        Ok(self.scratch()?.join(format!("{what}-{}", self.counter.fetch_add(1, Ordering::Relaxed))))
    }

    /// Where to write an image meant for `dest`: `dest` itself for a layout, a fresh scratch
    /// layout for a registry or the engine (then [`Transfer::publish`] it).
    pub fn staging_for(&self, dest: &ImageRef) -> Result<ImageRef> {
        match dest {
            ImageRef::Registry(_) | ImageRef::Engine(_) => {
                let dir = self.scratch()?.join(format!("out-{}", self.counter.fetch_add(1, Ordering::Relaxed)));
                Ok(ImageRef::Layout { dir, tag: Some(dest.tag_or_default().to_string()) })
            }
            _ => Ok(dest.clone()),
        }
    }

    /// Pushes what was written to `staged` (from [`Transfer::staging_for`]) to `dest`; nothing
    /// to do when `dest` is a layout.
    pub fn publish(&self, staged: &ImageRef, dest: &ImageRef, progress: &dyn Progress) -> Result<Option<PushReport>> {
        Ok(self.publish_report(staged, dest, progress)?.pushed)
    }

    /// Like [`Transfer::publish`], also for the engine: the image is loaded untagged, verified
    /// there (ID = config digest, layers = diff_ids) and only then tagged `dest`; layers of
    /// images read from the engine, and of the image `dest` names now, are not sent again.
    pub fn publish_report(&self, staged: &ImageRef, dest: &ImageRef, progress: &dyn Progress) -> Result<Published> {
        let ImageRef::Layout { dir, tag } = staged else { return Ok(Published::default()) };
        match dest {
            ImageRef::Registry(r) => {
                let layout = Layout::open(dir)?;
                let report = self.block_on(push_image(&self.client, &layout, tag.as_deref(), r, None, progress))?;
                Ok(Published { pushed: Some(report), loaded: None })
            }
            ImageRef::Engine(e) => Ok(Published { pushed: None, loaded: Some(self.load_into_engine(dir, tag.as_deref(), e)?) }),
            ImageRef::Layout { .. } => Ok(Published::default()),
        }
    }

    fn load_into_engine(&self, dir: &std::path::Path, tag: Option<&str>, dest: &EngineRef) -> Result<LoadReport> {
        let engine = self.engine()?;
        let layout = Layout::open(dir)?;
        let image = layout.load_image(tag)?;
        let mut known = self.engine_images.lock().unwrap_or_else(|e| e.into_inner()).clone();
        known.extend(engine.inspect(&dest.api_name())?);
        let scratch = tempfile::Builder::new().prefix("load-").tempdir_in(self.scratch()?).ctx(|| "creating a scratch directory".into())?;
        engine.load(&layout, &image, dest, &known, scratch.path())
    }

    /// Copies the image `src` names to `dst`, between any two transports, verifying every
    /// blob. Blobs the destination holds are not transferred; between repositories of one
    /// registry, blobs are mounted instead of downloaded and uploaded again.
    ///
    /// From the engine, the image is exported first; into it, staged and loaded (see
    /// [`Transfer::publish_report`]).
    pub fn copy(&self, src: &ImageRef, dst: &ImageRef, progress: &dyn Progress) -> Result<CopyReport> {
        if let ImageRef::Engine(e) = src {
            let local = self.export_from_engine(e)?;
            return self.copy(&local, dst, progress);
        }
        if let ImageRef::Engine(e) = dst {
            let staged = self.staging_for(dst)?;
            let mut report = self.copy(src, &staged, progress)?;
            let (dir, tag) = staged.local()?;
            report.loaded = Some(self.load_into_engine(dir, tag, e)?);
            return Ok(report);
        }
        match (src, dst) {
            (ImageRef::Layout { dir, tag }, ImageRef::Layout { dir: out, .. }) => {
                let from = Layout::open(dir)?;
                let manifest = from.resolve(tag.as_deref())?;
                let image = from.load_image(tag.as_deref())?;
                let writer = LayoutWriter::create(out)?;
                writer.add_existing_blob(&from, &image.manifest.config, "config")?;
                for (i, layer) in image.layers.iter().enumerate() {
                    writer.add_existing_blob(&from, &layer.blob, &format!("layer {i}"))?;
                }
                writer.put_blob(&from.read_blob(&manifest, MAX_JSON_BYTES)?)?;
                writer.commit(&manifest, dst.tag_or_default())?;
                Ok(CopyReport { manifest: Some(manifest.digest), ..CopyReport::default() })
            }
            (ImageRef::Registry(r), ImageRef::Layout { dir: out, .. }) => {
                let writer = LayoutWriter::create(out)?;
                let (manifest, _, report) = self.block_on(fetch_image(&self.client, r, &writer, &[], &[], progress))?;
                writer.commit(&manifest, dst.tag_or_default())?;
                Ok(CopyReport { manifest: Some(manifest.digest), fetched: Some(report), pushed: None, loaded: None })
            }
            (ImageRef::Layout { dir, tag }, ImageRef::Registry(r)) => {
                let report = self.block_on(push_image(&self.client, &Layout::open(dir)?, tag.as_deref(), r, None, progress))?;
                Ok(CopyReport { manifest: Some(report.manifest), fetched: None, pushed: Some(report), loaded: None })
            }
            (ImageRef::Registry(from), ImageRef::Registry(to)) => self.copy_between_registries(from, to, progress),
            (ImageRef::Engine(_), _) | (_, ImageRef::Engine(_)) => unreachable!("engine images are staged above"),
        }
    }

    fn copy_between_registries(&self, from: &RegistryRef, to: &RegistryRef, progress: &dyn Progress) -> Result<CopyReport> {
        let dir = self.scratch()?.join(format!("copy-{}", self.counter.fetch_add(1, Ordering::Relaxed)));
        let writer = LayoutWriter::create(&dir)?;
        let same_registry = from.registry == to.registry;
        // Within one registry, mount first: only blobs it refuses to mount are downloaded.
        let mounted: Vec<BlobRef> = if same_registry {
            self.block_on(async {
                let fetched = self.client.get_image_manifest(from).await?;
                let manifest = crate::image::Manifest::parse(fetched.raw, Some(&fetched.media_type))?;
                let mut mounted = Vec::new();
                for blob in std::iter::once(&manifest.config).chain(manifest.layers.iter()) {
                    if self.client.blob_exists(to, blob, true).await? || self.client.mount_blob(to, blob, &from.repository).await? {
                        mounted.push(blob.clone());
                    }
                }
                Ok::<_, Error>(mounted)
            })?
        } else {
            Vec::new()
        };
        // The scratch copy may lack the mounted layers: pushing skips blobs the destination has.
        let skip: Vec<Digest> = mounted.iter().map(|b| b.digest).collect();
        let (manifest, _, fetched) = self.block_on(fetch_image(&self.client, from, &writer, &[], &skip, progress))?;
        writer.commit(&manifest, "copy")?;
        let layout = Layout::open(&dir)?;
        let pushed = self.block_on(push_image(&self.client, &layout, Some("copy"), to, same_registry.then_some(from.repository.as_str()), progress))?;
        Ok(CopyReport { manifest: Some(manifest.digest), fetched: Some(fetched), pushed: Some(pushed), loaded: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_async_runtime_starts_only_when_a_future_is_run() {
        let transfer = Transfer::new(ClientOptions::default()).unwrap();
        let local = ImageRef::parse("oci:/nonexistent/layout").unwrap();
        assert_eq!(transfer.localize(&local, &crate::progress::Silent).unwrap().0.to_string(), local.to_string());
        assert!(transfer.runtime.get().is_none(), "a local transfer started the runtime");
        assert_eq!(transfer.block_on(async { Ok::<_, Error>(7) }).unwrap(), 7);
        assert!(transfer.runtime.get().is_some());
    }
}
