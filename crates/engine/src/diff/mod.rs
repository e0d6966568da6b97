//! The differ: reads both images, pairs and matches their files, encodes each changed layer
//! and packages the result as an OCI image.

pub mod address_map;
pub mod approximate;
pub mod call_frames;
pub mod encode;
pub mod encoding;
pub mod material;
pub mod members;
pub mod pair;
pub mod zip_members;

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rayon::prelude::*;

use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use crate::format::lzma::Effort;
use crate::format::plan::{
    DeltaPlan, Encoding, LayerPlan, PatchStats, SourceIdentity, SourceMembers, TargetIdentity, FEATURE_AARCH64_CODE, FEATURE_ADD_RANGES,
    FEATURE_DEFLATE_MEMBERS, FEATURE_DIFFERENCE_CHUNKS, FEATURE_EXACT_GZIP, FEATURE_GZIP_CORRECTIONS, FEATURE_GZIP_MEMBERS, FEATURE_RETIMED_HEADERS,
    FEATURE_X86_64_CALL_FRAMES, FEATURE_X86_64_CODE,
};
use crate::format::{FORMAT_VERSION, MAX_PREFIX_BYTES, RECORD_STREAM_WINDOW_LOG};
use crate::image::{Image, Layout, LayoutWriter};
use crate::package::{write_delta, Payload, Role};
use crate::progress::Progress;
use crate::reference::{load_image, ImageRef};
use encode::{encode_layer, EncodeParams};
use encoding::{choose, Choice};
pub use encoding::{Fidelity, CORRECTIONS_BUDGET};
use material::{unpack, Unpacked};
use pair::SourceIndex;

/// A patch (with its correction stream, if any) must be smaller than this fraction of the
/// target blob to be used: otherwise the blob itself is carried, which keeps the layer's
/// digest (and the manifest's) unchanged.
pub const BLOB_PREFERENCE: f64 = 0.9;

/// How much effort the differ spends for a smaller delta.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Level {
    /// Quick: zstd level 3 chunks.
    Fast,
    /// Balanced.
    #[default]
    Default,
    /// The smallest payload, whatever it costs.
    Max,
}

/// Similar files and partners up to this size are tried as approximate matches at `default` and
/// `max`: executables and shared libraries (a Rust program of 33 MB, a Go one of 11 MB,
/// libcrypto's 4.7 MB) are where they pay most. Aligning costs 4 bytes of suffix array per
/// partner byte per file aligned at once, and about a sixth of `zstd -19 --patch-from`'s time on
/// the same file; the limit bounds that memory.
const APPROXIMATE_BYTES: u64 = 64 << 20;

impl Level {
    /// The encoder parameters for this level.
    pub fn params(self) -> EncodeParams {
        let base = EncodeParams {
            zstd_level: 3,
            chunk_bytes: 4 << 20,
            prefix_bytes: MAX_PREFIX_BYTES,
            window_slack: 1 << 20,
            context_bytes: 0,
            approximate_bytes: 0,
            difference_chunks: None,
        };
        match self {
            Level::Fast => base,
            Level::Default => {
                EncodeParams { zstd_level: 12, context_bytes: 2 << 20, approximate_bytes: APPROXIMATE_BYTES, difference_chunks: Some(Effort::Fast), ..base }
            }
            Level::Max => EncodeParams {
                zstd_level: 19,
                window_slack: 2 << 20,
                context_bytes: MAX_PREFIX_BYTES,
                approximate_bytes: APPROXIMATE_BYTES,
                difference_chunks: Some(Effort::Strong),
                ..base
            },
        }
    }

    /// The encoder's settings at this level for an image whose layers to patch are
    /// `patched` of its `image` blob bytes. At `default`, the literal chunks get zstd level
    /// [`STRONG_DEFAULT_ZSTD_LEVEL`] instead of 12 when the layers to patch are at most
    /// a fifth of the image: the stronger level's cost grows with the patched bytes, which
    /// are then a small part of the image (the default's budget is a fifth of the time
    /// `zstd -19 --patch-from` takes over the whole image). On the corpus's pip app, whose
    /// one changed layer is a tenth of the image, it took the payload from 1.06x to 0.98x
    /// zstd -19's, at 0.13x its time. The differences of approximate matches get
    /// [`Effort::Strong`] then too (pip-patch: 114,862 -> 105,264 B, 2.9 -> 3.7 s).
    pub fn params_for(self, patched: u64, image: u64) -> EncodeParams {
        let params = self.params();
        if self == Level::Default && patched.saturating_mul(5) <= image {
            return EncodeParams { zstd_level: STRONG_DEFAULT_ZSTD_LEVEL, difference_chunks: Some(Effort::Strong), ..params };
        }
        params
    }

    /// The name used on the command line and in `delta.json`.
    pub fn name(self) -> &'static str {
        match self {
            Level::Fast => "fast",
            Level::Default => "default",
            Level::Max => "max",
        }
    }
}

/// The zstd level of `default`'s literal chunks when the layers to patch are a small part of
/// the image (see [`Level::params_for`]).
pub const STRONG_DEFAULT_ZSTD_LEVEL: i32 = 16;

impl FromStr for Level {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fast" => Ok(Level::Fast),
            "default" => Ok(Level::Default),
            "max" => Ok(Level::Max),
            other => Err(Error::unsupported("level", format!("{other:?} (expected fast, default or max)"))),
        }
    }
}

/// Options of [`diff`].
#[derive(Clone, Debug)]
pub struct DiffOptions {
    /// Effort level.
    pub level: Level,
    /// Largest uncompressed layer accepted (guards against decompression bombs).
    pub max_layer_bytes: u64,
    /// Whether the rebuilt image must keep every blob digest.
    pub fidelity: Fidelity,
}

impl Default for DiffOptions {
    fn default() -> Self {
        DiffOptions { level: Level::Default, max_layer_bytes: 64 << 30, fidelity: Fidelity::Exact }
    }
}

/// What [`diff`] produced.
#[derive(Clone, Debug)]
pub struct DiffReport {
    /// Digest of the delta image manifest.
    pub delta_manifest: Digest,
    /// Bytes a device downloads for the delta (manifest, config, layers).
    pub delta_bytes: u64,
    /// Bytes a device downloads for the target without a delta, given the source: manifest,
    /// config and the layer blobs whose diff_id the source lacks.
    pub full_pull_bytes: u64,
    /// The plan written into the delta.
    pub plan: DeltaPlan,
}

/// Computes the delta from `source` to `target` and writes it as an image at `delta`.
///
/// The pipeline: read both images → unpack the layers to encode and every source layer
/// ([`material`]) → expand gzip and zip members ([`members`]) → index the source ([`pair`])
/// → encode each changed layer ([`encode`], choosing its re-encoding with [`encoding`]) →
/// plan the unchanged ones → package the delta ([`crate::package`]) and commit it.
pub fn diff(source: &ImageRef, target: &ImageRef, delta: &ImageRef, options: &DiffOptions, progress: &dyn Progress) -> Result<DiffReport> {
    let (source_layout, source_image) = load_image(source)?;
    let (target_layout, target_image) = load_image(target)?;
    let (delta_dir, _) = delta.local()?;
    let writer = LayoutWriter::create(delta_dir)?;
    let scratch = writer.scratch()?;

    let source_by_diff_id: HashMap<Digest, u32> = source_image.layers.iter().enumerate().rev().map(|(i, l)| (l.diff_id, i as u32)).collect();
    let to_encode: Vec<u32> =
        (0..target_image.layers.len() as u32).filter(|i| !source_by_diff_id.contains_key(&target_image.layers[*i as usize].diff_id)).collect();
    let sides = Sides { source: (&source_layout, &source_image), target: (&target_layout, &target_image) };
    let (mut unpacked_source, unpacked_target) = unpack_layers(&sides, &to_encode, scratch.path(), options, progress)?;

    // The blobs of the layers no source layer has: what the delta patches, and what a pull
    // without it would download.
    let new_layer_bytes: u64 = to_encode.iter().map(|i| target_image.layers[*i as usize].blob.size).sum();
    let params = options.level.params_for(new_layer_bytes, target_image.layers.iter().map(|l| l.blob.size).sum());
    let patch_path = |i: u32| scratch.path().join(format!("patch-{i}"));
    // How each changed blob was compressed is found while the patches are made: finding it
    // re-encodes the blob, patching reads the tars, neither needs the other, and each has
    // long steps on one thread (a gzip file inside a layer, a suffix array) that would
    // leave the other threads waiting. A layer carried as its blob throws its patch away.
    let (choices, patched) = rayon::join(
        || to_encode.par_iter().map(|i| choose_encoding(&sides, &unpacked_target, *i, scratch.path(), options.fidelity)).collect::<Result<Vec<Choice>>>(),
        || -> Result<_> {
            let (expansion, expanded_target) = expand_members(&mut unpacked_source, &unpacked_target, scratch.path(), options, progress)?;
            let index = SourceIndex::build(&unpacked_source);
            let changed = Changed { unpacked: &unpacked_target, expanded: &expanded_target, expansion: &expansion, index: &index, params };
            progress.stage("encoding layers", to_encode.iter().map(|i| changed.tar_bytes(*i)).sum());
            let patches: Vec<Result<(PatchStats, BTreeSet<u32>)>> =
                to_encode.par_iter().map(|i| changed.patch(*i, &patch_path(*i), options, progress)).collect();
            Ok((expansion, expanded_target, patches))
        },
    );
    let (choices, (expansion, expanded_target, patches)) = (choices?, patched?);
    let encoded: Vec<(LayerPlan, Vec<Payload>)> = to_encode
        .iter()
        .zip(choices)
        .zip(patches)
        .map(|((i, choice), patch)| layer_plan(sides.target, *i, choice, patch, patch_path(*i), &expansion))
        .collect::<Result<_>>()?;
    let mut encoded: HashMap<u32, (LayerPlan, Vec<Payload>)> = encoded.into_iter().map(|e| (e.0.index, e)).collect();

    let mut layers = Vec::new();
    let mut payloads = Vec::new();
    for (i, layer) in target_image.layers.iter().enumerate() {
        let (plan, layer_payloads) = match source_by_diff_id.get(&layer.diff_id) {
            Some(s) => plan_from_source(&sides, i as u32, *s, scratch.path(), options.fidelity)?,
            None => encoded.remove(&(i as u32)).ok_or_else(|| Error::Internal(format!("target layer {i} was not encoded")))?,
        };
        layers.push(plan);
        payloads.extend(layer_payloads);
    }
    // Source members matter only in the layers the patches read.
    let read: BTreeSet<u32> = layers.iter().flat_map(|l| l.source_layers_used.iter().copied()).collect();
    let source_members: Vec<SourceMembers> =
        expansion.source.into_iter().filter(|(layer, _)| read.contains(layer)).map(|(layer, members)| SourceMembers { layer, members }).collect();
    let mut plan = DeltaPlan {
        format_version: FORMAT_VERSION,
        features: Vec::new(),
        created_by: format!("fleetdelta {}", env!("CARGO_PKG_VERSION")),
        level: options.level.name().to_string(),
        source: SourceIdentity { manifest: source_image.manifest.digest, config: source_image.config.digest },
        target: TargetIdentity { manifest: target_image.manifest.digest, config: target_image.config.digest },
        layers,
        source_members,
    };
    plan.features = features_used(&plan);
    let (manifest, delta_bytes) = write_delta(&writer, &mut plan, &target_image, &payloads)?;
    drop(unpacked_source);
    drop(unpacked_target);
    drop(expanded_target);
    drop(scratch);
    writer.commit(&manifest, delta.tag_or_default())?;
    progress.finish();
    let full_pull_bytes = target_image.manifest.raw.len() as u64 + target_image.manifest.config.size + new_layer_bytes;
    Ok(DiffReport { delta_manifest: manifest.digest, delta_bytes, full_pull_bytes, plan })
}

/// Both images, each with the layout it is read from.
struct Sides<'a> {
    source: (&'a Layout, &'a Image),
    target: (&'a Layout, &'a Image),
}

/// Unpacks every source layer and the target layers `to_encode` into `scratch`, in parallel.
fn unpack_layers(
    sides: &Sides,
    to_encode: &[u32],
    scratch: &Path,
    options: &DiffOptions,
    progress: &dyn Progress,
) -> Result<(Vec<Unpacked>, HashMap<u32, Unpacked>)> {
    let ((source_layout, source_image), (target_layout, target_image)) = (sides.source, sides.target);
    if to_encode.is_empty() {
        return Ok((Vec::new(), HashMap::new()));
    }
    let total: u64 =
        source_image.layers.iter().map(|l| l.blob.size).sum::<u64>() + to_encode.iter().map(|i| target_image.layers[*i as usize].blob.size).sum::<u64>();
    progress.stage("unpacking layers", total);
    let jobs: Vec<(bool, u32)> = (0..source_image.layers.len() as u32).map(|i| (true, i)).chain(to_encode.iter().map(|i| (false, *i))).collect();
    let results: Vec<Unpacked> = jobs
        .par_iter()
        .map(|(is_source, i)| {
            let (layout, image, side) = if *is_source { (source_layout, source_image, "source") } else { (target_layout, target_image, "target") };
            let layer = &image.layers[*i as usize];
            let what = format!("{side} layer {i} ({})", layer.blob.digest);
            let u = unpack(layout, layer, scratch, &format!("{side}-{i}.tar"), options.max_layer_bytes, &what)?;
            progress.advance(layer.blob.size);
            Ok(u)
        })
        .collect::<Result<_>>()?;
    let mut results = results.into_iter();
    let source = results.by_ref().take(source_image.layers.len()).collect();
    Ok((source, to_encode.iter().copied().zip(results).collect()))
}

/// Finds the gzip files and zip entries inside the layers that are patched uncompressed (not
/// at the fast level), and expands them: the source layers in place, the target layers into
/// the map returned beside the expansion.
fn expand_members(
    source: &mut [Unpacked],
    target: &HashMap<u32, Unpacked>,
    scratch: &Path,
    options: &DiffOptions,
    progress: &dyn Progress,
) -> Result<(members::Expansion, HashMap<u32, Unpacked>)> {
    if options.level == Level::Fast || target.is_empty() {
        return Ok((members::Expansion::default(), HashMap::new()));
    }
    progress.stage("looking into gzip and zip files", 0);
    let expansion = members::find(target, &SourceIndex::build(source), options.max_layer_bytes)?;
    for (layer, ms) in &expansion.source {
        let u = &mut source[*layer as usize];
        *u = u.expanded(ms, scratch, &format!("source-{layer}.x.tar"), options.max_layer_bytes, &format!("source layer {layer}"))?;
    }
    let expanded = expansion
        .target
        .iter()
        .map(|(layer, ms)| {
            let u = target[layer].expanded(ms, scratch, &format!("target-{layer}.x.tar"), options.max_layer_bytes, &format!("target layer {layer}"))?;
            Ok((*layer, u))
        })
        .collect::<Result<_>>()?;
    Ok((expansion, expanded))
}

/// The target layers no source layer has, unpacked (and expanded where they hold members),
/// with the source index their patches match against.
struct Changed<'a> {
    unpacked: &'a HashMap<u32, Unpacked>,
    expanded: &'a HashMap<u32, Unpacked>,
    expansion: &'a members::Expansion,
    index: &'a SourceIndex<'a>,
    /// The encoder's settings, for the level and the image.
    params: EncodeParams,
}

impl Changed<'_> {
    /// The bytes of the tar the patch of layer `i` rebuilds (expanded where it has members).
    fn tar_bytes(&self, i: u32) -> u64 {
        self.expanded.get(&i).unwrap_or(&self.unpacked[&i]).index.len
    }

    /// Writes the patch of target layer `i` to `path` (rebuilding the expanded tar when the
    /// layer has members); returns its statistics and the source layers it reads.
    fn patch(&self, i: u32, path: &Path, options: &DiffOptions, progress: &dyn Progress) -> Result<(PatchStats, BTreeSet<u32>)> {
        let file = BufWriter::with_capacity(1 << 20, File::create(path).ctx(|| format!("creating {}", path.display()))?);
        let mut outer = zstd::stream::write::Encoder::new(file, if options.level == Level::Fast { 3 } else { 9 }).ctx(|| "starting zstd".into())?;
        outer.window_log(RECORD_STREAM_WINDOW_LOG).ctx(|| "configuring zstd".into())?;
        outer.include_checksum(true).ctx(|| "configuring zstd".into())?;
        let members = self.expansion.target.get(&i).map_or(&[][..], |m| &m[..]);
        let (mut stats, used) = encode_layer(i, self.expanded.get(&i).unwrap_or(&self.unpacked[&i]), self.index, &self.params, &mut outer, progress)?;
        stats.members = members.len() as u64;
        stats.member_bytes = members.iter().map(|m| m.member.compressed_len).sum();
        outer.finish().ctx(|| "finishing patch".into())?.into_inner().map_err(|e| Error::io("writing patch", e.into_error()))?;
        stats.payload_bytes = std::fs::metadata(path).ctx(|| format!("reading {}", path.display()))?.len();
        Ok((stats, used))
    }
}

/// The plan and payloads of changed target layer `i`, whose blob is re-encoded as `choice`
/// says and whose `patch` was written to `path`: the patch (with its correction stream, if
/// any), or the blob itself when the patch would not be smaller enough ([`BLOB_PREFERENCE`])
/// or the layer cannot be rebuilt with the fidelity asked for.
fn layer_plan(
    (target_layout, target_image): (&Layout, &Image),
    i: u32,
    choice: Choice,
    patch: Result<(PatchStats, BTreeSet<u32>)>,
    path: PathBuf,
    expansion: &members::Expansion,
) -> Result<(LayerPlan, Vec<Payload>)> {
    let layer = &target_image.layers[i as usize];
    let blob = || vec![Payload { target_layer: i, role: Role::Blob, path: target_layout.blob_path(&layer.blob.digest) }];
    let (encoding, corrections) = match choice {
        Choice::Encode(e) => (e, None),
        Choice::Correct { encoding, path, bytes } => (encoding, Some((path, bytes))),
        Choice::CarryBlob => return Ok((LayerPlan::blob(i), blob())),
    };
    let (stats, used) = patch?;
    let members = expansion.target.get(&i).cloned().unwrap_or_default();
    let cost = stats.payload_bytes + corrections.as_ref().map_or(0, |(_, bytes)| *bytes);
    if cost as f64 >= BLOB_PREFERENCE * layer.blob.size as f64 {
        return Ok((LayerPlan { stats: Some(stats), ..LayerPlan::blob(i) }, blob()));
    }
    let mut payloads = vec![Payload { target_layer: i, role: Role::Patch, path }];
    payloads.extend(corrections.map(|(path, _)| Payload { target_layer: i, role: Role::Corrections, path }));
    Ok((LayerPlan::patch(i, used.into_iter().collect(), stats, encoding, members), payloads))
}

/// How to re-encode changed target layer `i` from its unpacked tar ([`choose`]).
fn choose_encoding(sides: &Sides, unpacked: &HashMap<u32, Unpacked>, i: u32, scratch: &Path, fidelity: Fidelity) -> Result<Choice> {
    let (target_layout, target_image) = sides.target;
    let target = &unpacked[&i];
    choose(target_layout, &target_image.layers[i as usize], i, fidelity, scratch, || Ok(target.reader()))
}

/// Plans target layer `i`, whose tar is source layer `s`'s: the source's blob when it is the
/// same, else the same tar re-encoded as the target's blob was (or that blob carried whole).
fn plan_from_source(sides: &Sides, i: u32, s: u32, scratch: &Path, fidelity: Fidelity) -> Result<(LayerPlan, Vec<Payload>)> {
    let ((_, source_image), (target_layout, target_image)) = (sides.source, sides.target);
    let layer = &target_image.layers[i as usize];
    let blob_path = target_layout.blob_path(&layer.blob.digest);
    let choice = if source_image.layers[s as usize].blob.digest == layer.blob.digest {
        Choice::Encode(Encoding::Verbatim)
    } else {
        choose(target_layout, layer, i, fidelity, scratch, || {
            layer.compression.decoder(std::io::BufReader::new(File::open(&blob_path)?)).map_err(Error::into_io)
        })?
    };
    Ok(match choice {
        Choice::Encode(encoding) => (LayerPlan::source(i, s, encoding), Vec::new()),
        Choice::Correct { encoding, path, .. } => (LayerPlan::source(i, s, encoding), vec![Payload { target_layer: i, role: Role::Corrections, path }]),
        Choice::CarryBlob => (LayerPlan::blob(i), vec![Payload { target_layer: i, role: Role::Blob, path: blob_path }]),
    })
}

/// The features `plan` uses, which an applier must know ([`DeltaPlan::validate`]).
fn features_used(plan: &DeltaPlan) -> Vec<String> {
    let uses = |f: fn(&LayerPlan) -> bool| plan.layers.iter().any(f);
    let mut features = Vec::new();
    if uses(|l| matches!(l.encoding, Some(Encoding::Exact { .. }))) {
        features.push(FEATURE_EXACT_GZIP.to_string());
    }
    if !plan.source_members.is_empty() || uses(|l| !l.members.is_empty()) {
        features.push(FEATURE_GZIP_MEMBERS.to_string());
    }
    if uses(|l| matches!(l.encoding, Some(Encoding::Corrected { .. }))) {
        features.push(FEATURE_GZIP_CORRECTIONS.to_string());
    }
    if plan.lists_deflate_members() {
        features.push(FEATURE_DEFLATE_MEMBERS.to_string());
    }
    if plan.lists_aarch64_code() {
        features.push(FEATURE_AARCH64_CODE.to_string());
    }
    if plan.lists_x86_64_code() {
        features.push(FEATURE_X86_64_CODE.to_string());
    }
    if plan.lists_call_frames() {
        features.push(FEATURE_X86_64_CALL_FRAMES.to_string());
    }
    if uses(|l| l.stats.as_ref().is_some_and(|s| s.retimed_headers > 0)) {
        features.push(FEATURE_RETIMED_HEADERS.to_string());
    }
    // `ADD` records: adds whose differences are in the chunks, not in difference chunks.
    if uses(|l| l.stats.as_ref().is_some_and(|s| s.added_bytes > 0 && s.difference_chunks == 0)) {
        features.push(FEATURE_ADD_RANGES.to_string());
    }
    if uses(|l| l.stats.as_ref().is_some_and(|s| s.difference_chunks > 0)) {
        features.push(FEATURE_DIFFERENCE_CHUNKS.to_string());
    }
    features
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_compresses_harder_only_where_the_patched_layers_are_a_small_part_of_the_image() {
        assert_eq!(Level::Default.params_for(20, 100).zstd_level, STRONG_DEFAULT_ZSTD_LEVEL);
        assert_eq!(Level::Default.params_for(21, 100).zstd_level, Level::Default.params().zstd_level);
        assert_eq!(Level::Default.params_for(100, 100).zstd_level, 12);
        assert_eq!(Level::Default.params_for(0, 0).zstd_level, STRONG_DEFAULT_ZSTD_LEVEL);
        for level in [Level::Fast, Level::Max] {
            assert_eq!(level.params_for(1, 100).zstd_level, level.params().zstd_level);
        }
        // The differences' LZMA works harder with it; everything else stays the level's.
        let (strong, plain) = (Level::Default.params_for(1, 100), Level::Default.params());
        assert_eq!((strong.difference_chunks, plain.difference_chunks), (Some(Effort::Strong), Some(Effort::Fast)));
        assert_eq!(Level::Max.params_for(100, 100).difference_chunks, Some(Effort::Strong));
        assert_eq!((strong.context_bytes, strong.approximate_bytes, strong.chunk_bytes), (plain.context_bytes, plain.approximate_bytes, plain.chunk_bytes));
    }
}
