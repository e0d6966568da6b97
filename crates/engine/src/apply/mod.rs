//! The applier: checks the source, rebuilds every target layer as a stream, verifies every
//! digest and commits the rebuilt image by rename.

pub mod patch;
pub mod pipe;
pub mod source;

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read, Write};
use std::path::Path;

use rayon::prelude::*;
use serde_json::Value;

use crate::digest::{verify, Digest, HashingWriter};
use crate::error::{Error, IoContext, Result};
use crate::format::plan::{Encoding, LayerPlan, Method, FEATURE_ADD_RANGES, FEATURE_DIFFERENCE_CHUNKS, FEATURE_RETIMED_HEADERS};
use crate::format::records::{Record, RecordReader, SourceRange};
use crate::format::MAX_RECORD_STREAM_WINDOW_LOG;
use crate::image::manifest::BlobRef;
use crate::image::{Image, Layer, Layout, LayoutWriter};
use crate::layer::compression::copy_hashed;
use crate::layer::corrected;
use crate::layer::members::Repacker;
use crate::layer::Compression;
use crate::package::{DeltaImage, PayloadReader};
use crate::progress::Progress;
use crate::reference::{load_image, ImageRef};
use pipe::{PipeReader, PipeWriter};
use source::{Preparer, SourceLayer};

/// How rebuilt layers are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LayerOutput {
    /// With the target's compression (blobs carried or copied whole keep their digest;
    /// recompressed ones get a new digest, with the same verified diff_id).
    #[default]
    Original,
    /// Uncompressed tars: the fast path for stores that keep diff_ids.
    Uncompressed,
}

/// Options of [`apply`].
#[derive(Clone, Debug)]
pub struct ApplyOptions {
    /// How rebuilt layers are stored.
    pub layers: LayerOutput,
    /// The target manifest digest the caller expects: refuses a delta for another target.
    pub expect_target: Option<Digest>,
    /// Largest uncompressed layer accepted.
    pub max_layer_bytes: u64,
    /// Layers rebuilt at once (each needs at most about 24 MiB), and threads compressing the
    /// blocks of byte-exact pgzip layers; at least 1 and at most the number of cores, whatever
    /// is asked. A layer re-encoded byte for byte is patched on one thread and compressed on
    /// another, as a pipeline; a layer written uncompressed is patched on one thread and
    /// hashed and written on another.
    pub jobs: usize,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions { layers: LayerOutput::Original, expect_target: None, max_layer_bytes: 64 << 30, jobs: 2 }
    }
}

/// What happened to one target layer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LayerOutcome {
    /// Target layer index.
    pub index: u32,
    /// How it was rebuilt.
    pub method: Method,
    /// The diff_id, verified.
    pub diff_id: Digest,
    /// The blob in the target manifest.
    pub original: Digest,
    /// The blob written.
    pub written: Digest,
    /// Whether the written blob is byte-identical to the original one.
    pub identical: bool,
}

/// What [`apply`] produced.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ApplyReport {
    /// The target manifest digest.
    pub target_manifest: Digest,
    /// The manifest written (equal to the target's when every layer blob is identical).
    pub written_manifest: Digest,
    /// The config digest (always the target's).
    pub config: Digest,
    /// Per layer.
    pub layers: Vec<LayerOutcome>,
}

impl ApplyReport {
    /// Whether the rebuilt image has exactly the target's manifest digest.
    pub fn identical(&self) -> bool {
        self.target_manifest == self.written_manifest
    }
}

/// Rebuilds the target image of `delta` from `source`, writing it to `output`.
pub fn apply(source: &ImageRef, delta: &ImageRef, output: &ImageRef, options: &ApplyOptions, progress: &dyn Progress) -> Result<ApplyReport> {
    let delta = DeltaImage::open(delta)?;
    if let Some(expected) = &options.expect_target {
        verify(|| "target manifest of the delta".into(), expected, None, &delta.target.manifest.digest, 0)?;
    }
    let (source_layout, source_image) = load_image(source)?;
    check_source(&delta, &source_image)?;
    let (out_dir, _) = output.local()?;
    let writer = LayoutWriter::create(out_dir)?;
    let scratch = writer.scratch()?;
    let jobs = options.jobs.clamp(1, std::thread::available_parallelism().map_or(1, |n| n.get()));
    let workers = |n: usize| rayon::ThreadPoolBuilder::new().num_threads(n).build().map_err(|e| Error::io("starting workers", io::Error::other(e)));
    let pool = workers(jobs)?;
    // Byte-exact encoders (pgzip compresses its blocks in parallel) get a pool of their own,
    // as wide: `--jobs` bounds them too. Not the layers' pool: an encoder waiting there for a
    // worker held by the patch that feeds it would wait for ever. Only started when a layer
    // is re-encoded.
    let encoders = if options.layers == LayerOutput::Original && delta.plan.layers.iter().any(|l| l.encoding.is_some()) { Some(workers(jobs)?) } else { None };

    let target_bytes = |l: &LayerPlan| delta.target.layers.get(l.index as usize).map_or(0, |t| t.blob.size);
    // Largest first: with fewer workers than layers, the longest rebuild starts at once
    // rather than after shorter ones, which would leave a worker idle at the end.
    let mut order: Vec<usize> = (0..delta.plan.layers.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(target_bytes(&delta.plan.layers[i])));
    // Source layers are prepared while the rebuild reads them, in the order it needs them.
    let mut needed: Vec<u32> = Vec::new();
    for l in order.iter().flat_map(|&i| &delta.plan.layers[i].source_layers_used) {
        if !needed.contains(l) {
            needed.push(*l);
        }
    }
    let (sources, preparers) = start_sources(&delta, &source_layout, &source_image, &needed, scratch.path(), options.max_layer_bytes)?;
    let ctx = Rebuild {
        delta: &delta,
        source_layout: &source_layout,
        source: &source_image,
        sources: &sources,
        writer: &writer,
        options,
        encoders: encoders.as_ref(),
    };
    let tar_limit = |l: &LayerPlan| delta.target.layers.get(l.index as usize).map_or(0, |t| ctx.tar_limit(t));
    // Bounds for the preparers that write something; source layers read in place need none.
    if preparers.iter().any(Preparer::has_work) {
        for (layer, end) in pool.install(|| source_extents(&delta, tar_limit)) {
            if let Some(source) = sources.get(&layer) {
                source.read_no_further_than(end);
            }
        }
    }

    progress.stage("rebuilding layers", delta.plan.layers.iter().map(target_bytes).sum());
    let mut outcomes: Vec<(usize, (LayerOutcome, BlobRef))> = std::thread::scope(|scope| {
        let preparing = source::prepare(scope, preparers, jobs);
        let rebuilt = pool.install(|| {
            order
                .par_iter()
                .with_max_len(1)
                .map(|&i| {
                    let l = &delta.plan.layers[i];
                    let r = ctx.layer(l);
                    progress.advance(target_bytes(l));
                    r.map(|r| (i, r))
                })
                .collect::<Result<Vec<_>>>()
        });
        // The rebuild is over: what the preparers have not written yet, nobody will read.
        sources.values().for_each(SourceLayer::cancel);
        // A source layer that could not be prepared explains a rebuild that failed reading it.
        preparing.join().and(rebuilt)
    })?;
    outcomes.sort_by_key(|(i, _)| *i);
    let outcomes: Vec<(LayerOutcome, BlobRef)> = outcomes.into_iter().map(|(_, o)| o).collect();
    drop(sources);
    drop(scratch);

    let target = &delta.target;
    let (config_digest, _) = writer.put_blob(&target.config.raw)?;
    verify(|| "target config".into(), &target.config.digest, None, &config_digest, 0)?;
    let manifest_bytes = if outcomes.iter().all(|(o, _)| o.identical) {
        target.manifest.raw.clone()
    } else {
        rewrite_manifest(&target.manifest.raw, outcomes.iter().map(|(_, b)| b))?
    };
    // A blob kept as the target names it must also have the size the target manifest gives
    // it (its digest was checked): the manifest is written as it is.
    for ((outcome, blob), layer) in outcomes.iter().zip(&target.layers) {
        if outcome.identical && blob.size != layer.blob.size {
            return Err(Error::SizeMismatch {
                what: format!("target layer {} ({}): the target manifest's size", outcome.index, layer.blob.digest),
                expected: layer.blob.size,
                found: blob.size,
            });
        }
    }
    let (manifest_digest, manifest_size) = writer.put_blob(&manifest_bytes)?;
    if let (Some(expected), LayerOutput::Original) = (&options.expect_target, options.layers) {
        // A layer recompressed rather than rebuilt byte for byte gives another manifest.
        verify(|| "manifest written (expected the target's, byte for byte)".into(), expected, None, &manifest_digest, 0)?;
    }
    let manifest = BlobRef { media_type: target.manifest.media_type.clone(), digest: manifest_digest, size: manifest_size };
    writer.commit(&manifest, output.tag_or_default())?;
    progress.finish();
    Ok(ApplyReport {
        target_manifest: target.manifest.digest,
        written_manifest: manifest_digest,
        config: config_digest,
        layers: outcomes.into_iter().map(|(o, _)| o).collect(),
    })
}

/// Checks that `source` is the image `delta` was made against: its config digest is the one
/// the delta requires (which pins every source layer's diff_id).
pub(crate) fn check_source(delta: &DeltaImage, source: &Image) -> Result<()> {
    if source.config.digest != delta.plan.source.config {
        return Err(Error::WrongSource { reason: format!("its config is {}, the delta needs {}", source.config.digest, delta.plan.source.config) });
    }
    Ok(())
}

/// Starts making the source layers `needed` available as `delta`'s patches read them
/// (decompressed into `scratch`, expanded where the plan lists members), each at most `limit`
/// bytes long: their views, readable at once, and their preparers, in the order of `needed`,
/// to run with [`source::prepare`].
pub(crate) fn start_sources<'a>(
    delta: &'a DeltaImage,
    layout: &'a Layout,
    image: &'a Image,
    needed: &[u32],
    scratch: &Path,
    limit: u64,
) -> Result<(HashMap<u32, SourceLayer>, Vec<Preparer<'a>>)> {
    let mut sources = HashMap::new();
    let mut preparers = Vec::new();
    for &i in needed {
        let members = delta.plan.source_members.iter().find(|m| m.layer == i).map_or(&[][..], |m| &m.members[..]);
        let (view, preparer) = source::start(layout, image, i, scratch, limit, members)?;
        sources.insert(i, view);
        preparers.push(preparer);
    }
    Ok((sources, preparers))
}

/// [`start_sources`], then waits until every layer is prepared, on as many threads as cores.
pub(crate) fn prepare_sources(
    delta: &DeltaImage,
    layout: &Layout,
    image: &Image,
    needed: &BTreeSet<u32>,
    scratch: &Path,
    limit: u64,
    progress: &dyn Progress,
) -> Result<HashMap<u32, SourceLayer>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let source_bytes: u64 = needed.iter().map(|i| image.layers.get(*i as usize).map_or(0, |l| l.blob.size)).sum();
    progress.stage("preparing source layers", source_bytes);
    let needed: Vec<u32> = needed.iter().copied().collect();
    let (sources, preparers) = start_sources(delta, layout, image, &needed, scratch, limit)?;
    sources.values().for_each(SourceLayer::want_all);
    std::thread::scope(|scope| source::prepare(scope, preparers, threads).join())?;
    progress.advance(source_bytes);
    Ok(sources)
}

/// How far into each source layer the patches of `delta` read: the end of the furthest range
/// any of their records names (copies, chunks' prefixes, adds). Found by reading the patches'
/// records once before the rebuild, which costs about as much as decompressing the patches
/// (their chunks stay compressed), so that the source layers' preparers stop where reading
/// stops. A source layer that a patch which cannot be read lists gets no extent: the rebuild
/// reports what is wrong with that patch. `tar_limit` bounds each patch's output, as in the
/// rebuild.
fn source_extents(delta: &DeltaImage, tar_limit: impl Fn(&LayerPlan) -> u64 + Sync) -> HashMap<u32, u64> {
    let scanned: Vec<_> = delta
        .plan
        .layers
        .par_iter()
        .with_max_len(1)
        .filter(|plan| plan.method == Method::Patch)
        .map(|plan| {
            let what = format!("target layer {}", plan.index);
            let ends = open_patch(delta, plan, tar_limit(plan), &what).and_then(|(records, _)| patch_extents(&mut records.skip_frames(true)));
            (&plan.source_layers_used[..], ends.ok())
        })
        .collect();
    merge_extents(scanned)
}

/// The end of the furthest range of each source layer that the records of one patch read.
fn patch_extents<R: Read>(records: &mut RecordReader<R>) -> Result<HashMap<u32, u64>> {
    let mut ends: HashMap<u32, u64> = HashMap::new();
    let mut reach = |r: &SourceRange| {
        let end = ends.entry(r.layer).or_default();
        *end = (*end).max(r.end());
    };
    loop {
        match records.next_record()? {
            Record::Copy(r) | Record::Add(r) | Record::AddDifferences(r) | Record::Retimed { range: r, .. } => reach(&r),
            Record::Chunk { prefix, .. } => prefix.iter().for_each(&mut reach),
            Record::End => return Ok(ends),
            Record::Literal(_) | Record::Differences { .. } => {}
        }
    }
}

/// Each source layer's extent over every patch: (the layers a patch's plan lists, the ends its
/// records read, or `None` when they could not be read). A layer listed but not read needs
/// nothing; a layer listed by an unreadable patch gets no extent.
fn merge_extents<'a>(scanned: impl IntoIterator<Item = (&'a [u32], Option<HashMap<u32, u64>>)>) -> HashMap<u32, u64> {
    let mut extents: HashMap<u32, u64> = HashMap::new();
    let mut unbounded: BTreeSet<u32> = BTreeSet::new();
    for (listed, ends) in scanned {
        let Some(ends) = ends else {
            unbounded.extend(listed);
            continue;
        };
        for &layer in listed {
            extents.entry(layer).or_default();
        }
        for (layer, end) in ends {
            let e = extents.entry(layer).or_default();
            *e = (*e).max(end);
        }
    }
    extents.retain(|layer, _| !unbounded.contains(layer));
    extents
}

/// The record stream of `plan`'s patch, whose output may not exceed `limit` bytes, checked
/// to be for that layer, and the length of the patch file; `what` names the layer in
/// errors. Close it with [`finish_patch`].
pub(crate) fn open_patch(delta: &DeltaImage, plan: &LayerPlan, limit: u64, what: &str) -> Result<(PatchRecords, u64)> {
    let payload = delta.open_payload(plan)?;
    let patch_bytes = payload.len();
    let mut decoder = zstd::stream::read::Decoder::new(payload).ctx(|| "starting zstd".into())?;
    decoder.window_log_max(MAX_RECORD_STREAM_WINDOW_LOG).ctx(|| "configuring zstd".into())?;
    let records = RecordReader::new(decoder, limit)?
        .allow_retimed(delta.plan.declares(FEATURE_RETIMED_HEADERS))
        .allow_add(delta.plan.declares(FEATURE_ADD_RANGES))
        .allow_differences(delta.plan.declares(FEATURE_DIFFERENCE_CHUNKS));
    if records.header().target_layer != plan.index {
        return Err(Error::malformed(what, format!("its patch is for target layer {}", records.header().target_layer)));
    }
    Ok((records, patch_bytes))
}

/// A patch's records, as [`open_patch`] reads them from the delta.
pub(crate) type PatchRecords = RecordReader<zstd::stream::read::Decoder<'static, io::BufReader<PayloadReader>>>;

/// Checks that nothing follows the END record of a patch [`open_patch`] opened, and that its
/// payload file was read to its end.
pub(crate) fn finish_patch(records: PatchRecords, what: &str) -> Result<()> {
    let mut decoder = records.into_inner();
    let mut trailing = [0u8; 1];
    if decoder.read(&mut trailing).map_err(|e| Error::malformed(what, format!("patch stream: {e}")))? != 0 {
        return Err(Error::malformed(what, "data after the end of the patch"));
    }
    decoder.finish().into_inner().finish()
}

/// Replaces the layer descriptors' digest, size and media type, keeping everything else.
fn rewrite_manifest<'a>(raw: &[u8], layers: impl Iterator<Item = &'a BlobRef>) -> Result<Vec<u8>> {
    let mut manifest: Value = serde_json::from_slice(raw).map_err(|e| Error::malformed("target manifest", e.to_string()))?;
    let descriptors = manifest.get_mut("layers").and_then(Value::as_array_mut).ok_or_else(|| Error::malformed("target manifest", "no layers"))?;
    for (d, blob) in descriptors.iter_mut().zip(layers) {
        d["mediaType"] = Value::from(blob.media_type.clone());
        d["digest"] = Value::from(blob.digest.to_string());
        d["size"] = Value::from(blob.size);
    }
    Ok(serde_json::to_vec(&manifest).expect("JSON values serialize"))
}

/// Runs `body`, writing a layer's tar into a [`pipe::pipe`] on this thread, while `sink`
/// reads the pipe on a thread of its own: the two work at once, `body` at most a few MiB
/// ahead, so memory stays bounded. Returns what each returned.
///
/// An error of `sink` explains a `body` failure that is a closed pipe; an error of `body` of
/// its own explains a `sink` failure (the tar it read ended early).
fn piped<B: Send, T>(what: &str, sink: impl FnOnce(PipeReader) -> Result<B> + Send, body: impl FnOnce(&mut PipeWriter) -> Result<T>) -> Result<(B, T)> {
    let (writer, reader) = pipe::pipe();
    let (sunk, written) = std::thread::scope(|scope| {
        let sink = scope.spawn(move || sink(reader));
        let mut writer = writer;
        let result = body(&mut writer);
        // Flushing and dropping our end of the pipe is the sink's end of input.
        let closed = writer.flush().map(|()| drop(writer)).map_err(|e| Error::io(format!("writing {what}"), e));
        let sunk = sink.join().unwrap_or_else(|_| Err(Error::malformed(what, "the thread writing it panicked")));
        (sunk, result.and_then(|r| closed.map(|()| r)))
    });
    match (sunk, written) {
        (Err(e), Err(Error::Io { source, .. })) if source.kind() == io::ErrorKind::BrokenPipe => Err(e),
        (_, Err(e)) | (Err(e), Ok(_)) => Err(e),
        (Ok(b), Ok(t)) => Ok((b, t)),
    }
}

struct Rebuild<'a> {
    delta: &'a DeltaImage,
    source_layout: &'a Layout,
    source: &'a Image,
    sources: &'a HashMap<u32, SourceLayer>,
    writer: &'a LayoutWriter,
    options: &'a ApplyOptions,
    /// Where byte-exact encoders run: started when a layer plan has an encoding and layers
    /// are written as the target's.
    encoders: Option<&'a rayon::ThreadPool>,
}

impl Rebuild<'_> {
    /// The longest tar target layer `target` can be: what its blob, of the size the verified
    /// target manifest gives, can hold. Every stream that rebuilds it stops there.
    fn tar_limit(&self, target: &Layer) -> u64 {
        target.compression.max_uncompressed_len(target.blob.size).min(self.options.max_layer_bytes)
    }

    fn output_compression(&self, target: &Layer) -> Compression {
        match self.options.layers {
            LayerOutput::Original => target.compression,
            LayerOutput::Uncompressed => Compression::None,
        }
    }

    /// Writes a layer blob from its uncompressed tar, which `body` writes, verifying the
    /// diff_id on the way. Returns the blob and what `body` returned. With an exact or a
    /// corrected encoding (and original layers), the blob is re-encoded byte for byte and
    /// must have the target's digest.
    fn write_tar<T>(&self, plan: &LayerPlan, target: &Layer, what: &str, body: impl FnOnce(&mut dyn Write) -> Result<T>) -> Result<(BlobRef, T)> {
        if self.options.layers == LayerOutput::Original {
            let gzip_only = || -> Result<()> {
                if target.compression != Compression::Gzip {
                    return Err(Error::malformed("delta.json", format!("{what} is not gzip-compressed but its plan re-encodes it as gzip")));
                }
                Ok(())
            };
            match &plan.encoding {
                Some(Encoding::Exact { descriptor }) => {
                    gzip_only()?;
                    return self.write_tar_encoded(target, what, "re-encoded exactly", |tar, blob| descriptor.encode(tar, blob).map(drop), body);
                }
                Some(Encoding::Corrected { header, .. }) => {
                    gzip_only()?;
                    let encode = |tar: &mut dyn Read, blob: &mut dyn Write| {
                        let mut corrections = self.delta.open_corrections(plan)?;
                        corrected::encode(header, plan.index, target.blob.size, tar, &mut corrections, blob)?;
                        corrections.finish()
                    };
                    return self.write_tar_encoded(target, what, "re-encoded with corrections", encode, body);
                }
                _ => {}
            }
        }
        let compression = self.output_compression(target);
        if compression == Compression::None {
            // The blob is the tar: its digest is the diff_id, hashed once by the blob writer
            // and checked before the blob is stored. The blob writer hashes and writes on a
            // thread of its own while `body` rebuilds the tar.
            let blob = self.writer.blob_limited(self.tar_limit(target), what)?;
            let (blob, result) = piped(
                what,
                move |reader| {
                    let mut blob = blob;
                    reader.copy_to(&mut blob).map_err(|e| Error::io(format!("writing {what}"), e))?;
                    Ok(blob)
                },
                |pipe| body(pipe),
            )?;
            let (digest, size) = blob.finish(Some((&target.diff_id, &format!("{what} (rebuilt, uncompressed)"))))?;
            return Ok((BlobRef { media_type: compression.media_type_like(&target.blob.media_type), digest, size }, result));
        }
        // Compressing never grows a tar by more than its stored blocks' headers.
        let limit = self.tar_limit(target).saturating_add(self.tar_limit(target) / 16).saturating_add(64 << 10);
        let mut out = HashingWriter::new(compression.encoder(self.writer.blob_limited(limit, what)?)?);
        let result = body(&mut out)?;
        let (encoder, diff_id, len) = out.finish();
        verify(|| format!("{what} (rebuilt, uncompressed)"), &target.diff_id, None, &diff_id, len)?;
        let blob = encoder.finish().ctx(|| format!("compressing {what}"))?;
        let (digest, size) = blob.finish(None)?;
        Ok((BlobRef { media_type: compression.media_type_like(&target.blob.media_type), digest, size }, result))
    }

    /// [`Rebuild::write_tar`] through a byte-exact `encode` (of the tar it reads into the blob
    /// it writes), named `how` in a digest mismatch. The encoder reads the tar from a pipe on
    /// its own thread while `body` writes it (see [`piped`]).
    fn write_tar_encoded<T>(
        &self,
        target: &Layer,
        what: &str,
        how: &str,
        encode: impl FnOnce(&mut dyn Read, &mut dyn Write) -> Result<()> + Send,
        body: impl FnOnce(&mut dyn Write) -> Result<T>,
    ) -> Result<(BlobRef, T)> {
        let encoders = self.encoders.ok_or_else(|| Error::malformed(what, "re-encoded without an encoder pool"))?;
        let blob = self.writer.blob_limited(target.blob.size, &format!("{what} ({how}), past the target manifest's size"))?;
        let encode = move |mut reader: PipeReader| {
            encoders.install(move || {
                let mut blob = blob;
                encode(&mut reader, &mut blob).map(|()| blob)
            })
        };
        let (blob, (result, diff_id, len)) = piped(what, encode, |pipe| {
            let mut out = HashingWriter::new(pipe);
            let result = body(&mut out)?;
            let (_, diff_id, len) = out.finish();
            Ok((result, diff_id, len))
        })?;
        verify(|| format!("{what} (rebuilt, uncompressed)"), &target.diff_id, None, &diff_id, len)?;
        let (digest, size) = blob.finish(Some((&target.blob.digest, &format!("{what} ({how})"))))?;
        Ok((BlobRef { media_type: target.blob.media_type.clone(), digest, size }, result))
    }

    fn layer(&self, plan: &LayerPlan) -> Result<(LayerOutcome, BlobRef)> {
        let target = &self.delta.target.layers[plan.index as usize];
        let what = format!("target layer {} ({})", plan.index, target.blob.digest);
        let written = match plan.method {
            Method::Source => self.copy_source(plan, target, &what)?,
            Method::Patch => self.run_patch(plan, target, &what)?,
            Method::Blob => self.carry_blob(plan, target, &what)?,
        };
        let outcome = LayerOutcome {
            index: plan.index,
            method: plan.method,
            diff_id: target.diff_id,
            original: target.blob.digest,
            written: written.digest,
            identical: written.digest == target.blob.digest,
        };
        Ok((outcome, written))
    }

    fn copy_source(&self, plan: &LayerPlan, target: &Layer, what: &str) -> Result<BlobRef> {
        let index = plan.source_layer.expect("validated plan");
        let source = self.source.layers.get(index as usize).ok_or_else(|| Error::malformed("delta.json", format!("source layer {index} does not exist")))?;
        if source.diff_id != target.diff_id {
            return Err(Error::malformed("delta.json", format!("{what} is said to equal source layer {index}, whose diff_id differs")));
        }
        if source.blob.digest == target.blob.digest && self.options.layers == LayerOutput::Original {
            // The blob is kept as it is: its compression must be the one the target declares.
            let mut start = Vec::new();
            self.source_layout.open_blob(&source.blob)?.take(4).read_to_end(&mut start).ctx(|| format!("reading {what}"))?;
            let found = Compression::sniff(&start);
            if found != target.compression {
                return Err(Error::malformed(
                    "target manifest",
                    format!("{what} is declared {} but its blob is {}", target.blob.media_type, found.media_type_like(&target.blob.media_type)),
                ));
            }
            self.writer.add_existing_blob(self.source_layout, &target.blob, what)?;
            return Ok(target.blob.clone());
        }
        let blob = self.source_layout.open_blob(&source.blob)?;
        let (written, _) = self.write_tar(plan, target, what, |out| copy_hashed(source.compression.decoder(blob)?, out, self.tar_limit(target), what))?;
        Ok(written)
    }

    fn run_patch(&self, plan: &LayerPlan, target: &Layer, what: &str) -> Result<BlobRef> {
        let (mut records, _) = open_patch(self.delta, plan, self.tar_limit(target), what)?;
        let (blob, ()) = self.write_tar(plan, target, what, move |out| {
            if plan.members.is_empty() {
                patch::run_patch(&mut records, self.sources, out)?;
            } else {
                // The patch writes the expanded tar; its members are compressed again.
                let mut repack = Repacker::new(out, &plan.members);
                patch::run_patch(&mut records, self.sources, &mut repack)?;
                repack.finish()?;
            }
            finish_patch(records, what)
        })?;
        Ok(blob)
    }

    fn carry_blob(&self, plan: &LayerPlan, target: &Layer, what: &str) -> Result<BlobRef> {
        let mut payload = self.delta.open_payload(plan)?;
        if payload.len() != target.blob.size {
            return Err(Error::SizeMismatch { what: format!("{what}: the blob the delta carries"), expected: target.blob.size, found: payload.len() });
        }
        if self.options.layers == LayerOutput::Uncompressed && target.compression != Compression::None {
            let (blob, _) =
                self.write_tar(plan, target, what, |out| copy_hashed(target.compression.decoder(&mut payload)?, out, self.tar_limit(target), what))?;
            payload.finish()?;
            return Ok(blob);
        }
        let mut w = self.writer.blob_limited(target.blob.size, what)?;
        io::copy(&mut payload, &mut w).ctx(|| format!("copying {what}"))?;
        payload.finish()?;
        let (digest, size) = w.finish(Some((&target.blob.digest, what)))?;
        // The blob matches the manifest; check that it also holds the tar the config names.
        let staged = self.writer.open_staged_blob(&digest)?;
        let (diff_id, len) = copy_hashed(target.compression.decoder(staged)?, io::sink(), self.tar_limit(target), what)?;
        verify(|| format!("{what} (uncompressed)"), &target.diff_id, None, &diff_id, len)?;
        Ok(BlobRef { media_type: target.blob.media_type.clone(), digest, size })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fails(what: &str) -> Error {
        Error::malformed("test", what)
    }

    #[test]
    fn a_patch_reaches_the_end_of_its_furthest_range_in_each_source_layer() {
        use crate::format::records::{PatchHeader, RecordWriter};
        let range = |layer, offset, len| SourceRange { layer, offset, len };
        let mut w = RecordWriter::new(Vec::new(), PatchHeader { target_layer: 2, tar_len: 636 }).unwrap();
        for r in [
            Record::Copy(range(0, 5000, 100)),
            Record::Copy(range(0, 10, 20)),
            Record::Chunk { prefix: vec![range(1, 700, 50), range(0, 6000, 1)], raw_len: 4, frame: zstd::encode_all(&b"abcd"[..], 3).unwrap() },
            Record::Literal(4),
            Record::Retimed { range: range(3, 0, 512), shift: 5 },
            Record::End,
        ] {
            w.write(&r).unwrap();
        }
        let bytes = w.into_inner();
        let mut records = RecordReader::new(&bytes[..], 1 << 20).unwrap().allow_retimed(true);
        let ends = patch_extents(&mut records).unwrap();
        assert_eq!(ends, HashMap::from([(0, 6001), (1, 750), (3, 512)]));
    }

    #[test]
    fn extents_are_the_furthest_over_every_patch_and_none_where_a_patch_is_unreadable() {
        let merged = merge_extents([
            (&[0, 1, 4][..], Some(HashMap::from([(0, 100), (1, 7)]))),
            (&[0, 2][..], Some(HashMap::from([(0, 300), (2, 9)]))),
            (&[2, 3][..], None),
        ]);
        // Layer 4 is listed but not read; 2 and 3 are listed by a patch that cannot be read.
        assert_eq!(merged, HashMap::from([(0, 300), (1, 7), (4, 0)]));
    }

    #[test]
    fn piped_returns_what_both_ends_returned() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let (copied, n) = piped(
            "layer",
            |reader| {
                let mut out = Vec::new();
                reader.copy_to(&mut out).map_err(|e| Error::io("sink", e))?;
                Ok(out)
            },
            |pipe| pipe.write_all(&data).map(|()| data.len()).map_err(|e| Error::io("body", e)),
        )
        .unwrap();
        assert_eq!((copied, n), (data.clone(), data.len()));
    }

    #[test]
    fn a_failing_sink_is_the_error_not_the_closed_pipe_the_body_meets() {
        let err = piped(
            "layer",
            |_reader| -> Result<()> { Err(fails("disk full")) },
            |pipe| (0..64).try_for_each(|_| pipe.write_all(&[1; 1 << 20])).map_err(|e| Error::io("writing layer", e)),
        )
        .unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
    }

    #[test]
    fn a_failing_body_is_the_error_not_the_short_input_the_sink_meets() {
        let err = piped(
            "layer",
            |mut reader| -> Result<()> {
                let mut all = Vec::new();
                reader.read_to_end(&mut all).map_err(|e| Error::io("sink", e))?;
                Err(fails("tar ended early"))
            },
            |pipe| -> Result<()> {
                pipe.write_all(b"half a tar").map_err(|e| Error::io("body", e))?;
                Err(fails("patch record out of range"))
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("patch record out of range"), "{err}");
    }
}
