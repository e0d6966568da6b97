//! Multi-platform images: one delta per platform, and delta indexes.
//!
//! A delta rebuilds one image. Between two multi-platform images (image indexes), [`diff_images`]
//! writes one delta per platform of the target index, each made from the source index's entry
//! for the same platform (os, architecture, variant; see [`Platform::matches`]) with that
//! platform's target manifest as its `subject`, and gathers them in a **delta index**: an OCI
//! image index whose entries are the per-platform delta manifests, each with its platform (see
//! `docs/format.md`). With a platform named, it writes that platform's delta alone.
//!
//! [`source_for_apply`] and [`delta_for_platform`] are the other side: the applier takes the
//! source's platform (or the one named) and the delta index's entry for it. Nothing here
//! falls back to the machine's own architecture where a platform can be known: a source index
//! without an entry for a platform of the target is an error that names it.

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::diff::{diff, DiffOptions, DiffReport};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::format::{ANNOTATION_VERSION, FORMAT_VERSION};
use crate::image::layout::host_architecture;
use crate::image::manifest::{is_index, BlobRef, Manifest, MAX_JSON_BYTES, OCI_INDEX};
use crate::image::platform::{entry_for, index_entries, IndexEntry, Platform};
use crate::image::{Layout, LayoutWriter, DEFAULT_TAG};
use crate::info::{info, DeltaInfo};
use crate::progress::Progress;
use crate::reference::{load_image, ImageRef};
use crate::transfer::{push_image, CopyReport, FetchReport, PushReport, Transfer};
use oci_spec::image::ImageIndex;

/// Annotation of a delta index: the digest of the target image index it rebuilds.
pub const ANNOTATION_TARGET_INDEX: &str = "io.fleetdelta.target.index";
/// Annotation of a delta index: the digest of the source image index it starts from.
pub const ANNOTATION_SOURCE_INDEX: &str = "io.fleetdelta.source.index";

/// What a reference names, read at its top.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Top {
    /// One image (a manifest).
    Image,
    /// A multi-platform index.
    Index {
        /// Its digest.
        digest: Digest,
        /// Its entries for a platform (see [`index_entries`]).
        entries: Vec<IndexEntry>,
    },
}

/// Reads what `image` names without descending into an index. Container engine images are
/// always one image.
pub fn read_top(transfer: &Transfer, image: &ImageRef) -> Result<Top> {
    let what = format!("image index {image}");
    match image {
        ImageRef::Layout { dir, tag } => {
            let layout = Layout::open(dir)?;
            let blob = layout.resolve_top(tag.as_deref())?;
            if !is_index(&blob.media_type) {
                return Ok(Top::Image);
            }
            let raw = layout.read_blob(&blob, MAX_JSON_BYTES)?;
            Ok(Top::Index { digest: blob.digest, entries: index_entries(&raw, &what)? })
        }
        ImageRef::Registry(r) => {
            let top = transfer.block_on(transfer.client().get_manifest(r, &r.reference()))?;
            if !is_index(&top.media_type) {
                return Ok(Top::Image);
            }
            Ok(Top::Index { digest: top.digest, entries: index_entries(&top.raw, &what)? })
        }
        _ => Ok(Top::Image),
    }
}

/// A local reference to the image of `entry`, an entry of the index `image` names: fetched
/// by digest from a registry, or taken out of a layout into a scratch layout of its own (blobs
/// hard-linked where possible, each verified).
pub fn localize_entry(transfer: &Transfer, image: &ImageRef, entry: &IndexEntry, progress: &dyn Progress) -> Result<(ImageRef, Option<FetchReport>)> {
    match image {
        ImageRef::Registry(r) => transfer.localize(&ImageRef::Registry(r.by_digest(entry.manifest.digest)), progress),
        ImageRef::Layout { dir, .. } => {
            let from = Layout::open(dir)?;
            let manifest = Manifest::parse(from.read_blob(&entry.manifest, MAX_JSON_BYTES)?, Some(&entry.manifest.media_type))?;
            let out = transfer.scratch_layout("platform")?;
            let writer = LayoutWriter::create(&out)?;
            writer.add_existing_blob(&from, &manifest.config, &format!("config of {}", manifest.digest))?;
            for (i, layer) in manifest.layers.iter().enumerate() {
                writer.add_existing_blob(&from, layer, &format!("layer {i} of {}", manifest.digest))?;
            }
            writer.put_blob(&manifest.raw)?;
            writer.commit(&entry.manifest, DEFAULT_TAG)?;
            Ok((ImageRef::Layout { dir: out, tag: Some(DEFAULT_TAG.into()) }, None))
        }
        other => Err(Error::unsupported(other.to_string(), "only layouts and registries hold image indexes")),
    }
}

/// The platform of a local image, from its config.
fn platform_of(local: &ImageRef) -> Result<Platform> {
    Ok(Platform::of_config(&load_image(local)?.1.config))
}

/// A local reference to the image of `image` for `platform`: its entry when `image` is an
/// index, the image itself otherwise, which must then be for `platform`.
fn localize_for(transfer: &Transfer, image: &ImageRef, top: &Top, platform: &Platform, role: &str, progress: &dyn Progress) -> Result<ImageRef> {
    match top {
        Top::Index { entries, .. } => {
            let entry = entry_for(entries, platform, &format!("the {role} image index {image}"))?;
            Ok(localize_entry(transfer, image, entry, progress)?.0)
        }
        Top::Image => {
            let (local, _) = transfer.localize(image, progress)?;
            let has = platform_of(&local)?;
            if !has.matches(platform) {
                return Err(Error::unsupported(format!("the {role} {image}"), format!("it is an image for {has}, not {platform}")));
            }
            Ok(local)
        }
    }
}

/// One delta written by [`diff_images`].
#[derive(Clone, Debug)]
pub struct PlatformDelta {
    /// The platform it is for, when known (a diff of two single images names none).
    pub platform: Option<Platform>,
    /// The delta's manifest.
    pub manifest: BlobRef,
    /// Where it was written locally (a layout and tag; scratch ones last as long as the
    /// transfer), for reading it back.
    pub local: ImageRef,
    /// What the differ reported.
    pub report: DiffReport,
}

/// What [`diff_images`] wrote.
#[derive(Clone, Debug)]
pub struct PlatformsReport {
    /// The delta index, when one was written (both images are indexes and no platform was
    /// named); `None` when the delta is a single delta image.
    pub index: Option<BlobRef>,
    /// The deltas, in the order of the target index's entries.
    pub deltas: Vec<PlatformDelta>,
    /// What was pushed of a single delta written to a registry.
    pub pushed: Option<PushReport>,
}

impl PlatformsReport {
    /// Bytes a device downloads for its platform's delta, summed over the platforms.
    pub fn delta_bytes(&self) -> u64 {
        self.deltas.iter().map(|d| d.report.delta_bytes).sum()
    }
}

/// Computes the deltas from `source` to `target` and writes them at `delta` (a layout or a
/// registry).
///
/// - Both images are indexes, no `platform`: one delta per platform of the target index,
///   from the source's entry for the same platform, gathered in a delta index at `delta`.
///   Every platform is matched before anything is built: a source index without an entry
///   for one of them is an error naming it, and nothing is written.
/// - With `platform`: that platform's delta alone, as a single delta image; each side that
///   is an index gives its entry for it, a side that is one image must be for it.
/// - One side an index, the other one image, no `platform`: the index's entry for the
///   platform of the image.
/// - Two images: the delta between them, as [`diff`] writes it.
pub fn diff_images(
    transfer: &Transfer,
    source: &ImageRef,
    target: &ImageRef,
    delta: &ImageRef,
    platform: Option<&Platform>,
    options: &DiffOptions,
    progress: &dyn Progress,
) -> Result<PlatformsReport> {
    if matches!(delta, ImageRef::Engine(_)) {
        return Err(Error::unsupported(delta.to_string(), "a delta is not a runnable image: write it to oci:DIR[:TAG] or docker://..."));
    }
    let (source_top, target_top) = (read_top(transfer, source)?, read_top(transfer, target)?);
    if let (Top::Index { digest: source_index, entries: sources }, Top::Index { digest: target_index, entries: targets }, None) =
        (&source_top, &target_top, platform)
    {
        return diff_indexes(transfer, (source, *source_index, sources), (target, *target_index, targets), delta, options, progress);
    }
    let (local_source, local_target, platform) = match (&source_top, &target_top, platform) {
        (_, _, Some(p)) => (
            localize_for(transfer, source, &source_top, p, "source", progress)?,
            localize_for(transfer, target, &target_top, p, "target", progress)?,
            Some(p.clone()),
        ),
        (Top::Image, Top::Index { .. }, None) => {
            let (local_source, _) = transfer.localize(source, progress)?;
            let p = platform_of(&local_source)?;
            (local_source, localize_for(transfer, target, &target_top, &p, "target", progress)?, Some(p))
        }
        (Top::Index { .. }, Top::Image, None) => {
            let (local_target, _) = transfer.localize(target, progress)?;
            let p = platform_of(&local_target)?;
            (localize_for(transfer, source, &source_top, &p, "source", progress)?, local_target, Some(p))
        }
        _ => (transfer.localize(source, progress)?.0, transfer.localize(target, progress)?.0, None),
    };
    let staged = transfer.staging_for(delta)?;
    let report = diff(&local_source, &local_target, &staged, options, progress)?;
    let (dir, tag) = staged.local()?;
    let manifest = Layout::open(dir)?.resolve_top(tag)?;
    let pushed = transfer.publish(&staged, delta, progress)?;
    Ok(PlatformsReport { index: None, deltas: vec![PlatformDelta { platform, manifest, local: staged, report }], pushed })
}

/// Both sides are indexes: a delta per target platform, then the delta index.
fn diff_indexes(
    transfer: &Transfer,
    (source, source_index, sources): (&ImageRef, Digest, &[IndexEntry]),
    (target, target_index, targets): (&ImageRef, Digest, &[IndexEntry]),
    delta: &ImageRef,
    options: &DiffOptions,
    progress: &dyn Progress,
) -> Result<PlatformsReport> {
    if targets.is_empty() {
        return Err(Error::malformed(format!("the target image index {target}"), "it has no image for a platform"));
    }
    // Every platform is paired before any build, so a missing one costs nothing.
    let mut pairs = Vec::with_capacity(targets.len());
    for t in targets {
        let platform = t
            .platform
            .clone()
            .ok_or_else(|| Error::malformed(format!("the target image index {target}"), format!("entry {} has no platform", t.manifest.digest)))?;
        let s = entry_for(sources, &platform, &format!("the source image index {source}"))?;
        pairs.push((platform, s, t));
    }
    let mut built = Vec::with_capacity(pairs.len());
    for (platform, s, t) in pairs {
        progress.stage(&format!("delta for {platform}"), 0);
        let (local_source, _) = localize_entry(transfer, source, s, progress)?;
        let (local_target, _) = localize_entry(transfer, target, t, progress)?;
        let out = transfer.scratch_layout("delta")?;
        let local = ImageRef::Layout { dir: out.clone(), tag: Some(DEFAULT_TAG.into()) };
        let report = diff(&local_source, &local_target, &local, options, progress)?;
        let layout = Layout::open(&out)?;
        let manifest = layout.resolve_top(Some(DEFAULT_TAG))?;
        built.push((layout, PlatformDelta { platform: Some(platform), manifest, local, report }));
    }
    let raw = delta_index(source_index, target_index, &built)?;
    let index = BlobRef { media_type: OCI_INDEX.into(), digest: Digest::of(&raw), size: raw.len() as u64 };
    let images: Vec<IndexImage<'_>> = built
        .iter()
        .map(|(layout, d)| IndexImage { layout, tag: DEFAULT_TAG, manifest: &d.manifest, what: format!("the delta for {}", describe(&d.platform)) })
        .collect();
    write_index(transfer, delta, &images, &index, &raw, progress)?;
    Ok(PlatformsReport { index: Some(index), deltas: built.into_iter().map(|(_, d)| d).collect(), pushed: None })
}

/// One image of an index being written: its manifest, in a local layout under `tag`.
struct IndexImage<'a> {
    layout: &'a Layout,
    tag: &'a str,
    manifest: &'a BlobRef,
    /// The image in messages: `the delta for linux/arm64`.
    what: String,
}

/// Writes the index `raw` (whose blob is `index`) and every image it lists to `dest`, a layout
/// or a registry: the images first (in a registry, each by digest, so that its subject's
/// referrers list it), then the index, byte for byte. Returns what was pushed to a registry,
/// the images' pushes added up.
fn write_index(
    transfer: &Transfer,
    dest: &ImageRef,
    images: &[IndexImage<'_>],
    index: &BlobRef,
    raw: &[u8],
    progress: &dyn Progress,
) -> Result<Option<PushReport>> {
    match dest {
        ImageRef::Layout { dir, tag } => {
            let writer = LayoutWriter::create(dir)?;
            for image in images {
                let loaded = image.layout.load_image(Some(image.tag))?;
                for (i, blob) in std::iter::once(&loaded.manifest.config).chain(loaded.layers.iter().map(|l| &l.blob)).enumerate() {
                    writer.add_existing_blob(image.layout, blob, &format!("blob {i} of {}", image.what))?;
                }
                writer.add_existing_blob(image.layout, image.manifest, &format!("the manifest of {}", image.what))?;
            }
            writer.put_blob(raw)?;
            writer.commit(index, tag.as_deref().unwrap_or(DEFAULT_TAG))?;
            Ok(None)
        }
        ImageRef::Registry(r) => transfer.block_on(async {
            let mut total = PushReport { manifest: index.digest, blobs_uploaded: 0, bytes_uploaded: 0, blobs_skipped: 0, referrers_tag_updated: false };
            for image in images {
                let pushed = push_image(transfer.client(), image.layout, Some(image.tag), &r.by_digest(image.manifest.digest), None, progress).await?;
                total.blobs_uploaded += pushed.blobs_uploaded;
                total.bytes_uploaded += pushed.bytes_uploaded;
                total.blobs_skipped += pushed.blobs_skipped;
                total.referrers_tag_updated |= pushed.referrers_tag_updated;
            }
            let reference = match (&r.tag, &r.digest) {
                (_, Some(d)) if *d != index.digest => return Err(Error::DigestMismatch { what: format!("push to {r}"), expected: *d, found: index.digest }),
                (Some(t), _) => t.clone(),
                (None, Some(d)) => d.to_string(),
                (None, None) => DEFAULT_TAG.to_string(),
            };
            transfer.client().put_manifest(r, &reference, &index.media_type, raw).await?;
            Ok(Some(total))
        }),
        other => Err(Error::unsupported(other.to_string(), "an image index is written to a layout or a registry")),
    }
}

/// Copies what `src` names to `dst`. One image is copied as [`Transfer::copy`] does. An image
/// index (a multi-platform image, or a delta index) is copied whole: every image it lists,
/// attestation manifests included, then the index itself byte for byte, so that it keeps its
/// digest and the images keep theirs. An index cannot go into the container engine, which
/// holds one image per name.
pub fn copy(transfer: &Transfer, src: &ImageRef, dst: &ImageRef, progress: &dyn Progress) -> Result<CopyReport> {
    let Top::Index { digest, .. } = read_top(transfer, src)? else { return transfer.copy(src, dst, progress) };
    if matches!(dst, ImageRef::Engine(_)) {
        return Err(Error::unsupported(
            format!("copying the image index {src} into {dst}"),
            "the container engine holds one image per name: copy the image of one platform (by digest) instead",
        ));
    }
    let (index, raw) = index_blob(transfer, src, digest)?;
    let what = format!("the image index {src}");
    let parsed = ImageIndex::from_reader(&raw[..]).map_err(|e| Error::malformed(&what, e.to_string()))?;
    let mut fetched: Option<FetchReport> = None;
    let mut locals = Vec::with_capacity(parsed.manifests().len());
    for descriptor in parsed.manifests() {
        let manifest = BlobRef::from_descriptor(descriptor)?;
        if is_index(&manifest.media_type) {
            return Err(Error::unsupported(&what, format!("its entry {} is an index itself, which copy does not follow", manifest.digest)));
        }
        let platform = descriptor.platform().as_ref().map(Platform::of_spec);
        progress.stage(&format!("image for {}", describe(&platform)), 0);
        let (local, report) = localize_entry(transfer, src, &IndexEntry { manifest: manifest.clone(), platform: platform.clone() }, progress)?;
        if let Some(r) = report {
            let total = fetched.get_or_insert_with(|| FetchReport { manifest: Some(digest), ..FetchReport::default() });
            total.received += r.received;
            total.blobs_downloaded += r.blobs_downloaded;
            total.blobs_reused += r.blobs_reused;
            total.resumes += r.resumes;
        }
        let (dir, tag) = local.local()?;
        locals.push((Layout::open(dir)?, tag.unwrap_or(DEFAULT_TAG).to_string(), manifest, format!("the image for {}", describe(&platform))));
    }
    let images: Vec<IndexImage<'_>> = locals.iter().map(|(layout, tag, manifest, what)| IndexImage { layout, tag, manifest, what: what.clone() }).collect();
    let pushed = write_index(transfer, dst, &images, &index, &raw, progress)?;
    Ok(CopyReport { manifest: Some(digest), fetched, pushed, loaded: None })
}

/// The blob and bytes of the index `image` names (a layout or a registry), checked against
/// `digest`, what [`read_top`] found there.
fn index_blob(transfer: &Transfer, image: &ImageRef, digest: Digest) -> Result<(BlobRef, Vec<u8>)> {
    let (media_type, raw) = match image {
        ImageRef::Layout { dir, tag } => {
            let layout = Layout::open(dir)?;
            let blob = layout.resolve_top(tag.as_deref())?;
            (blob.media_type.clone(), layout.read_blob(&blob, MAX_JSON_BYTES)?)
        }
        ImageRef::Registry(r) => {
            let fetched = transfer.block_on(transfer.client().get_manifest(r, &digest.to_string()))?;
            (fetched.media_type, fetched.raw)
        }
        other => return Err(Error::unsupported(other.to_string(), "only layouts and registries hold image indexes")),
    };
    let found = Digest::of(&raw);
    if found != digest {
        return Err(Error::DigestMismatch { what: format!("the image index {image}"), expected: digest, found });
    }
    Ok((BlobRef { media_type, digest, size: raw.len() as u64 }, raw))
}

/// One platform's delta of a delta index, summarized.
#[derive(Clone, Debug, Serialize)]
pub struct PlatformInfo {
    /// The entry's platform (`linux/arm64/v8`); absent when the entry gives none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// Its delta, as [`crate::info()`] summarizes one.
    pub info: DeltaInfo,
}

/// A delta index, summarized: every platform's delta in the index's order.
#[derive(Clone, Debug, Serialize)]
pub struct IndexInfo {
    /// The delta index's digest.
    pub delta_index: Digest,
    /// One per entry.
    pub platforms: Vec<PlatformInfo>,
}

/// Summarizes the delta `delta` names when it is a delta index, each platform's delta
/// fetched and verified as [`crate::info()`] does one; `None` when it is one delta.
pub fn info_index(transfer: &Transfer, delta: &ImageRef, progress: &dyn Progress) -> Result<Option<IndexInfo>> {
    let Top::Index { digest, entries } = read_top(transfer, delta)? else { return Ok(None) };
    let mut platforms = Vec::with_capacity(entries.len());
    for entry in &entries {
        let (local, _) = localize_entry(transfer, delta, entry, progress)?;
        platforms.push(PlatformInfo { platform: entry.platform.as_ref().map(Platform::to_string), info: info(&local)? });
    }
    Ok(Some(IndexInfo { delta_index: digest, platforms }))
}

fn describe(platform: &Option<Platform>) -> String {
    platform.as_ref().map_or_else(|| "the image".into(), Platform::to_string)
}

/// The delta index's bytes: an OCI image index of the per-platform delta manifests, each entry
/// with its platform and the delta's annotations, and the two image indexes it goes between.
fn delta_index(source_index: Digest, target_index: Digest, deltas: &[(Layout, PlatformDelta)]) -> Result<Vec<u8>> {
    let mut manifests = Vec::with_capacity(deltas.len());
    for (layout, d) in deltas {
        let manifest = Manifest::parse(layout.read_blob(&d.manifest, MAX_JSON_BYTES)?, Some(&d.manifest.media_type))?;
        let mut platform = Map::new();
        if let Some(p) = &d.platform {
            platform.insert("architecture".into(), json!(p.architecture));
            platform.insert("os".into(), json!(p.os));
            if let Some(v) = &p.variant {
                platform.insert("variant".into(), json!(v));
            }
        }
        manifests.push(json!({
            "mediaType": d.manifest.media_type,
            "digest": d.manifest.digest.to_string(),
            "size": d.manifest.size,
            "platform": Value::Object(platform),
            "annotations": manifest.annotations,
        }));
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests,
        "annotations": {
            ANNOTATION_VERSION: FORMAT_VERSION.to_string(),
            ANNOTATION_SOURCE_INDEX: source_index.to_string(),
            ANNOTATION_TARGET_INDEX: target_index.to_string(),
        },
    });
    serde_json::to_vec(&index).map_err(|e| Error::Internal(format!("serializing a delta index: {e}")))
}

/// The source image `apply` rebuilds from, localized, with its platform: the image itself, or
/// from an index the entry for `platform` (this machine's `linux/ARCH` when none is named).
/// A named platform that the image is not for is an error.
pub fn source_for_apply(transfer: &Transfer, source: &ImageRef, platform: Option<&Platform>, progress: &dyn Progress) -> Result<(ImageRef, Platform)> {
    let top = read_top(transfer, source)?;
    let wanted = match (&top, platform) {
        (_, Some(p)) => p.clone(),
        (Top::Index { .. }, None) => Platform::linux(host_architecture()),
        (Top::Image, None) => {
            let (local, _) = transfer.localize(source, progress)?;
            let p = platform_of(&local)?;
            return Ok((local, p));
        }
    };
    Ok((localize_for(transfer, source, &top, &wanted, "source", progress)?, wanted))
}

/// The delta in `delta` for an image of `platform`, localized: `delta` itself when it is one
/// delta, its entry for `platform` when it is a delta index (an error naming the platforms it
/// has when there is none).
pub fn delta_for_platform(transfer: &Transfer, delta: &ImageRef, platform: &Platform, progress: &dyn Progress) -> Result<(ImageRef, Option<FetchReport>)> {
    match read_top(transfer, delta)? {
        Top::Image => transfer.localize(delta, progress),
        Top::Index { entries, .. } => {
            let entry = entry_for(&entries, platform, &format!("the delta index {delta}"))?;
            localize_entry(transfer, delta, entry, progress)
        }
    }
}
