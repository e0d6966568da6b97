//! Encoding one target layer as a patch: plan copies and literals, group literals into
//! chunks whose zstd reference prefix is made of their partners in the same order, compress
//! the chunks in parallel, then write the record stream.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io::Write;
use std::ops::Range;

use rayon::prelude::*;
use zstd::zstd_safe::{self, CParameter};

use crate::diff::approximate;
use crate::diff::material::Unpacked;
use crate::diff::pair::{Loc, Partner, SourceIndex};
use crate::error::{Error, IoContext, Result};
use crate::format::lzma;
use crate::format::plan::PatchStats;
use crate::format::records::{prefix_budget, PatchHeader, Record, RecordWriter, SourceRange};
use crate::format::retime::{self, Retimer, BLOCK};
use crate::format::{MAX_CHUNK_BYTES, MAX_DIFFERENCE_CHUNK_BYTES, MAX_PREFIX_BYTES, MAX_PREFIX_RANGES};
use crate::progress::Progress;

/// How hard the encoder works.
#[derive(Clone, Copy, Debug)]
pub struct EncodeParams {
    /// zstd level of the literal chunks.
    pub zstd_level: i32,
    /// Target literal bytes per chunk (at most [`MAX_CHUNK_BYTES`]).
    pub chunk_bytes: u64,
    /// Prefix bytes per chunk (at most [`MAX_PREFIX_BYTES`]).
    pub prefix_bytes: u64,
    /// Extra partner bytes on each side of a piece of a file split across chunks.
    pub window_slack: u64,
    /// Source bytes around the partners added to each chunk's prefix, so that contents
    /// that moved between files (code moved to a neighbouring module, renamed files the
    /// pairing missed) are still found; 0 disables it.
    pub context_bytes: u64,
    /// Similar files up to this size (and partners up to it) are tried as approximate
    /// matches ([`approximate`]), kept where they beat literals; 0 disables it. The aligner
    /// holds 16 bytes per partner byte, per worker thread.
    pub approximate_bytes: u64,
    /// The differences of approximate matches go to difference chunks, LZMA streams of their
    /// own ([`crate::format::lzma`]) compressed with this effort, rather than into the chunks
    /// beside the literals; `None` keeps them in the chunks.
    pub difference_chunks: Option<lzma::Effort>,
}

/// Frames compressed ahead of the record writer, per worker thread: enough to keep every
/// thread busy while the frames held at once stay a few chunks.
const FRAMES_PER_THREAD: usize = 2;

/// A planned operation on the output.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    Copy(SourceRange),
    Literal {
        chunk: usize,
        len: u64,
    },
    /// A run of source tar entries whose headers are retimed by `shift`; the source offset
    /// where its walker expects the next header (so that a run extends only onto it).
    Retimed {
        range: SourceRange,
        shift: i64,
        next_header: u64,
    },
    /// A source range plus differences taken from `chunk`.
    Add {
        range: SourceRange,
        chunk: usize,
    },
    /// A source range plus differences taken from difference chunk `chunk`.
    AddDifferences {
        range: SourceRange,
        chunk: usize,
    },
}

/// A difference chunk: the differences of `ADD-DIFFERENCES` records in order, each target
/// bytes minus their source bytes.
#[derive(Debug, Default)]
struct DifferencePlan {
    pieces: Vec<(Range<u64>, SourceRange)>,
    len: u64,
}

/// Bytes of a chunk: target bytes as they are, or the differences between target bytes and
/// the source bytes of an `ADD`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Target(Range<u64>),
    Difference { target: Range<u64>, source: SourceRange },
}

#[derive(Debug, Default)]
struct ChunkPlan {
    literals: Vec<Piece>,
    literal_len: u64,
    prefix: Vec<SourceRange>,
    prefix_len: u64,
}

impl ChunkPlan {
    /// Whether the last range of the prefix holds all of `p`.
    fn prefix_covers(&self, p: &SourceRange) -> bool {
        self.prefix.last().is_some_and(|l| l.layer == p.layer && l.offset <= p.offset && p.end() <= l.end())
    }
}

/// Accumulates operations and chunks in output order.
struct Planner {
    params: EncodeParams,
    ops: Vec<Op>,
    chunks: Vec<ChunkPlan>,
    differences: Vec<DifferencePlan>,
    stats: PatchStats,
    /// Prefix bytes the chunks may still read ([`prefix_budget`]): past it, literals are
    /// coded without their partner (only pathological layers get there).
    prefix_left: u64,
}

impl Planner {
    fn new(params: EncodeParams, tar_len: u64) -> Self {
        Planner {
            params,
            ops: Vec::new(),
            chunks: vec![ChunkPlan::default()],
            differences: vec![DifferencePlan::default()],
            stats: PatchStats::default(),
            prefix_left: prefix_budget(tar_len),
        }
    }

    fn copy(&mut self, r: SourceRange) {
        if r.len == 0 {
            return;
        }
        self.stats.copied_bytes += r.len;
        if let Some(Op::Copy(last)) = self.ops.last_mut() {
            if last.layer == r.layer && last.end() == r.offset {
                last.len += r.len;
                return;
            }
        }
        self.ops.push(Op::Copy(r));
    }

    /// Emits target bytes `range` as literals, coded against `partner` if any.
    fn literal(&mut self, range: Range<u64>, partner: Option<SourceRange>) {
        let total = range.end - range.start;
        let mut offset = 0;
        while offset < total {
            let len = (total - offset).min(self.params.chunk_bytes);
            let window = partner.filter(|p| p.len > 0).map(|p| self.partner_window(p, offset, len, total));
            self.piece(range.start + offset..range.start + offset + len, window);
            offset += len;
        }
    }

    /// The part of a partner worth referencing for bytes `offset..offset+len` of a `total`-byte
    /// target: all of it when it fits, else a window at the proportional position.
    fn partner_window(&self, p: SourceRange, offset: u64, len: u64, total: u64) -> SourceRange {
        let max = self.params.prefix_bytes;
        if total <= self.params.chunk_bytes && p.len <= max {
            return p;
        }
        let width = p.len.min(max).min(len + 2 * self.params.window_slack);
        let center = p.offset + ((offset + len / 2) as u128 * p.len as u128 / total.max(1) as u128) as u64;
        let start = center.saturating_sub(width / 2).clamp(p.offset, p.end() - width);
        SourceRange { layer: p.layer, offset: start, len: width }
    }

    /// The chunk that takes `len` more bytes coded against `partner`: the current one, or a
    /// new one when it is full. A partner the current chunk's prefix already holds adds
    /// nothing to it (the bytes between an approximate match's adds are all coded against the
    /// same partner: counting it again for each would give every one a chunk of its own,
    /// and zstd would load the partner into its match finder for each).
    fn chunk_for(&mut self, len: u64, partner: Option<SourceRange>) -> usize {
        let current = self.chunks.last().expect("there is always a current chunk");
        let partner_len = partner.filter(|p| !current.prefix_covers(p)).map_or(0, |p| p.len);
        if current.literal_len > 0
            && (current.literal_len + len > self.params.chunk_bytes
                || current.prefix_len + partner_len > self.params.prefix_bytes
                || current.prefix.len() as u64 >= MAX_PREFIX_RANGES)
        {
            self.chunks.push(ChunkPlan::default());
        }
        self.chunks.len() - 1
    }

    /// Emits target bytes `range` as the source bytes `partner` (at most a chunk long) plus
    /// differences.
    fn add(&mut self, range: Range<u64>, partner: SourceRange) {
        if self.params.difference_chunks.is_some() {
            return self.add_differences(range, partner);
        }
        let mut done = 0;
        while done < partner.len {
            let len = (partner.len - done).min(self.params.chunk_bytes);
            let chunk = self.chunk_for(len, None);
            let source = SourceRange { layer: partner.layer, offset: partner.offset + done, len };
            let target = range.start + done..range.start + done + len;
            let plan = &mut self.chunks[chunk];
            plan.literal_len += len;
            plan.literals.push(Piece::Difference { target, source });
            self.ops.push(Op::Add { range: source, chunk });
            self.stats.added_bytes += len;
            self.stats.literal_bytes += len;
            done += len;
        }
    }

    /// [`Planner::add`] with the differences in difference chunks.
    fn add_differences(&mut self, range: Range<u64>, partner: SourceRange) {
        let limit = self.params.chunk_bytes.min(MAX_DIFFERENCE_CHUNK_BYTES);
        let mut done = 0;
        while done < partner.len {
            if self.differences.last().is_some_and(|d| d.len >= limit) {
                self.differences.push(DifferencePlan::default());
            }
            let index = self.differences.len() - 1;
            let plan = &mut self.differences[index];
            let len = (partner.len - done).min(limit - plan.len);
            let source = SourceRange { layer: partner.layer, offset: partner.offset + done, len };
            plan.pieces.push((range.start + done..range.start + done + len, source));
            plan.len += len;
            self.ops.push(Op::AddDifferences { range: source, chunk: index });
            self.stats.added_bytes += len;
            self.stats.literal_bytes += len;
            done += len;
        }
    }

    /// Emits similar file contents `range` by an alignment against `partner`: adds, and
    /// literals against the partner between them.
    fn approximate(&mut self, range: Range<u64>, partner: SourceRange, steps: &[approximate::Step]) {
        self.stats.files_approximated += 1;
        let (mut t, mut o) = (range.start, partner.offset as i128);
        for step in steps {
            if step.add > 0 {
                self.add(t..t + step.add, SourceRange { layer: partner.layer, offset: o as u64, len: step.add });
                t += step.add;
            }
            if step.extra > 0 {
                let window = (partner.len <= self.params.prefix_bytes).then_some(partner);
                self.piece(t..t + step.extra, window);
                t += step.extra;
            }
            o += step.add as i128 + step.seek as i128;
        }
        debug_assert_eq!(t, range.end);
    }

    fn piece(&mut self, range: Range<u64>, partner: Option<SourceRange>) {
        let len = range.end - range.start;
        let chunk_index = self.chunk_for(len, partner);
        let chunk = &mut self.chunks[chunk_index];
        chunk.literal_len += len;
        match chunk.literals.last_mut() {
            Some(Piece::Target(last)) if last.end == range.start => last.end = range.end,
            _ => chunk.literals.push(Piece::Target(range)),
        }
        if let Some(p) = partner {
            if !chunk.prefix_covers(&p) && p.len <= self.prefix_left {
                self.prefix_left -= p.len;
                chunk.prefix_len += p.len;
                match chunk.prefix.last_mut() {
                    Some(l) if l.layer == p.layer && l.end() == p.offset => l.len += p.len,
                    _ => chunk.prefix.push(p),
                }
            }
        }
        self.stats.literal_bytes += len;
        match self.ops.last_mut() {
            Some(Op::Literal { chunk, len: n }) if *chunk == chunk_index => *n += len,
            _ => self.ops.push(Op::Literal { chunk: chunk_index, len }),
        }
    }
}

fn range_of(layer: u32, r: Range<u64>) -> SourceRange {
    SourceRange { layer, offset: r.start, len: r.end - r.start }
}

/// Encodes target layer `target_index` (unpacked in `target`) against `source`, writing the
/// patch to `out`. Returns its statistics and the source layers it reads. `progress` advances
/// by the target bytes each record covers as it is written: the layer's tar length in all.
pub fn encode_layer(
    target_index: u32,
    target: &Unpacked,
    source: &SourceIndex<'_>,
    params: &EncodeParams,
    out: impl Write,
    progress: &dyn Progress,
) -> Result<(PatchStats, BTreeSet<u32>)> {
    debug_assert!(params.chunk_bytes <= MAX_CHUNK_BYTES && params.prefix_bytes <= MAX_PREFIX_BYTES);
    let mut planner = Planner::new(*params, target.index.len);
    // Each file's partner, found once: the alignments and the walk below both use it.
    let partners: Vec<Partner> = target
        .index
        .entries
        .iter()
        .zip(&target.content_digests)
        .map(|(e, digest)| match e.has_content() {
            true => source.partner(&e.path, digest.as_ref().expect("entries with contents have digests"), e.data_len),
            false => Partner::None,
        })
        .collect();
    let alignments = alignments(target, source, &partners, params)?;
    let mut layer_uses: HashMap<u32, u64> = HashMap::new();
    let mut meta_from = 0u64;
    for (i, e) in target.index.entries.iter().enumerate() {
        if !e.has_content() {
            // A directory, link or empty file whose header the source has at the same path:
            // a copy of it, or a retimed one. Left to the literals before the next file
            // otherwise.
            if let Some(l) = source.at_path(&e.path).filter(|_| e.data_len == 0) {
                if header_alone(&mut planner, source, target, l, meta_from..e.data_start)? {
                    meta_from = e.data_start;
                }
            }
            continue;
        }
        let partner = partners[i];
        planner.stats.files += 1;
        let partner_loc = match partner {
            Partner::Same(l) => {
                planner.stats.files_unchanged += 1;
                Some(l)
            }
            Partner::Similar(l) => {
                planner.stats.files_similar += 1;
                Some(l)
            }
            Partner::None => {
                planner.stats.files_new += 1;
                None
            }
        };
        // An unchanged file whose headers differ only by a moved mtime: a retimed copy of its
        // source entry, extending the run of such entries before it.
        if let Partner::Same(l) = partner {
            let s = source.entry(l);
            // The source bytes before its contents as long as the target's before them: its
            // own metadata when both start at the end of the previous file's contents.
            let meta_len = e.data_start - meta_from;
            if s.data_len == e.data_len
                && s.data_start >= meta_len
                && retime(&mut planner, source, target, l.layer, meta_from..e.data_start + e.data_len, s.data_start - meta_len, e.data_len)?
            {
                *layer_uses.entry(l.layer).or_default() += e.data_len;
                meta_from = e.data_start + e.data_len;
                continue;
            }
        }
        // Headers and padding before the contents, against the partner's: the source bytes
        // before its contents as long as the target's where its metadata holds that many (the
        // target's may start after a directory's header, already planned), else all of it.
        let meta = meta_from..e.data_start;
        let meta_partner = partner_loc.or_else(|| source.at_path(&e.path)).map(|l| {
            let s = source.entry(l);
            let start = s.data_start.checked_sub(meta.end - meta.start).filter(|start| *start >= s.meta_start).unwrap_or(s.meta_start);
            range_of(l.layer, start..s.data_start)
        });
        emit_bytes(&mut planner, source, target, meta, meta_partner)?;
        let content = e.content_range();
        match (partner, partner_loc) {
            (Partner::Same(l), _) => planner.copy(range_of(l.layer, source.entry(l).content_range())),
            (Partner::Similar(l), _) if alignments.contains_key(&i) => {
                planner.approximate(content, range_of(l.layer, source.entry(l).content_range()), &alignments[&i])
            }
            (_, Some(l)) => planner.literal(content, Some(range_of(l.layer, source.entry(l).content_range()))),
            _ => planner.literal(content, None),
        }
        if let Some(l) = partner_loc {
            *layer_uses.entry(l.layer).or_default() += e.data_len;
        }
        meta_from = e.data_start + e.data_len;
    }
    // The trailing headers and end-of-archive blocks, against the tail of the source layer
    // this layer draws most from.
    let tail_partner =
        layer_uses.iter().max_by_key(|(l, n)| (**n, std::cmp::Reverse(**l))).map(|(l, _)| *l).or((!source.layers.is_empty()).then_some(0)).map(|l| {
            let layer = &source.layers[l as usize];
            let start = layer.index.entries.iter().filter(|e| e.has_content()).map(|e| e.data_start + e.data_len).next_back().unwrap_or(0);
            range_of(l, start..layer.index.len)
        });
    let run_end = match planner.ops.last() {
        Some(Op::Retimed { range, .. }) => Some((range.layer, range.end())),
        _ => None,
    };
    let tail_retimed = match run_end {
        Some((layer, end)) if meta_from < target.index.len => retime(&mut planner, source, target, layer, meta_from..target.index.len, end, 0)?,
        _ => false,
    };
    if !tail_retimed {
        emit_bytes(&mut planner, source, target, meta_from..target.index.len, tail_partner)?;
    }

    let Planner { ops, mut chunks, differences, mut stats, mut prefix_left, .. } = planner;
    if params.context_bytes > 0 {
        let lens: Vec<u64> = source.layers.iter().map(|l| l.index.len).collect();
        for c in &mut chunks {
            let budget = params.context_bytes.min(params.prefix_bytes.saturating_sub(c.prefix_len)).min(prefix_left);
            let room = (MAX_PREFIX_RANGES as usize).saturating_sub(c.prefix.len());
            let mut context = context_ranges(&c.prefix, &lens, budget);
            context.truncate(room);
            let added = context.iter().map(|r| r.len).sum::<u64>();
            prefix_left -= added;
            c.prefix_len += added;
            context.append(&mut c.prefix);
            c.prefix = context;
        }
    }
    stats.chunks = chunks.iter().filter(|c| c.literal_len > 0).count() as u64;
    stats.difference_chunks = differences.iter().filter(|d| d.len > 0).count() as u64;
    stats.tar_bytes = target.index.len;

    let mut used = BTreeSet::new();
    let mut w = RecordWriter::new(out, PatchHeader { target_layer: target_index, tar_len: target.index.len }).ctx(|| "writing patch".into())?;
    let mut frames = Frames {
        chunks: chunks.iter().filter(|c| c.literal_len > 0).collect(),
        differences: differences.iter().filter(|d| d.len > 0).collect(),
        chunk_frames: VecDeque::new(),
        difference_frames: VecDeque::new(),
        target,
        source,
        params,
    };
    let mut current_chunk = None;
    let mut current_differences = None;
    for op in &ops {
        match op {
            Op::Copy(r) => {
                used.insert(r.layer);
                w.write(&Record::Copy(*r)).ctx(|| "writing patch".into())?;
                progress.advance(r.len);
            }
            Op::Retimed { range, shift, .. } => {
                used.insert(range.layer);
                w.write(&Record::Retimed { range: *range, shift: *shift }).ctx(|| "writing patch".into())?;
                progress.advance(range.len);
            }
            Op::AddDifferences { range, chunk } => {
                if current_differences != Some(*chunk) {
                    let frame = frames.next_difference_frame()?;
                    w.write(&Record::Differences { raw_len: differences[*chunk].len, frame }).ctx(|| "writing patch".into())?;
                    current_differences = Some(*chunk);
                }
                used.insert(range.layer);
                w.write(&Record::AddDifferences(*range)).ctx(|| "writing patch".into())?;
                progress.advance(range.len);
            }
            Op::Literal { chunk, .. } | Op::Add { chunk, .. } => {
                if current_chunk != Some(*chunk) {
                    let plan = &chunks[*chunk];
                    let frame = frames.next_chunk_frame()?;
                    used.extend(plan.prefix.iter().map(|p| p.layer));
                    w.write(&Record::Chunk { prefix: plan.prefix.clone(), raw_len: plan.literal_len, frame }).ctx(|| "writing patch".into())?;
                    current_chunk = Some(*chunk);
                }
                let (record, len) = match op {
                    Op::Add { range, .. } => {
                        used.insert(range.layer);
                        (Record::Add(*range), range.len)
                    }
                    Op::Literal { len, .. } => (Record::Literal(*len), *len),
                    _ => unreachable!("matched above"),
                };
                w.write(&record).ctx(|| "writing patch".into())?;
                progress.advance(len);
            }
        }
    }
    w.write(&Record::End).ctx(|| "writing patch".into())?;
    Ok((stats, used))
}

/// Merges ranges (sorted by layer and offset) into disjoint ones.
fn merge(mut ranges: Vec<SourceRange>) -> Vec<SourceRange> {
    ranges.sort_by_key(|r| (r.layer, r.offset));
    let mut out: Vec<SourceRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(l) if l.layer == r.layer && r.offset <= l.end() => l.len = l.len.max(r.end() - l.offset),
            _ => out.push(r),
        }
    }
    out
}

/// The source bytes within `margin` of the partners, minus the partners themselves.
fn surroundings(partners: &[SourceRange], merged_partners: &[SourceRange], lens: &[u64], margin: u64) -> Vec<SourceRange> {
    let grown = merge(
        partners
            .iter()
            .map(|p| {
                let start = p.offset.saturating_sub(margin);
                let end = p.end().saturating_add(margin).min(lens[p.layer as usize]);
                SourceRange { layer: p.layer, offset: start, len: end.saturating_sub(start) }
            })
            .collect(),
    );
    let mut out = Vec::new();
    let mut holes = merged_partners.iter().peekable();
    for g in grown {
        let mut at = g.offset;
        while let Some(h) = holes.peek() {
            if (h.layer, h.end()) <= (g.layer, at) {
                holes.next();
                continue;
            }
            if h.layer != g.layer || h.offset >= g.end() {
                break;
            }
            if h.offset > at {
                out.push(SourceRange { layer: g.layer, offset: at, len: h.offset - at });
            }
            at = at.max(h.end());
            if h.end() > g.end() {
                break;
            }
            holes.next();
        }
        if at < g.end() {
            out.push(SourceRange { layer: g.layer, offset: at, len: g.end() - at });
        }
    }
    out
}

/// The widest surroundings of the partners that fit in `budget` bytes.
fn context_ranges(partners: &[SourceRange], lens: &[u64], budget: u64) -> Vec<SourceRange> {
    if partners.is_empty() || budget == 0 {
        return Vec::new();
    }
    let merged = merge(partners.to_vec());
    let size = |ranges: &[SourceRange]| ranges.iter().map(|r| r.len).sum::<u64>();
    let (mut lo, mut hi) = (0u64, lens.iter().copied().max().unwrap_or(0));
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if size(&surroundings(partners, &merged, lens, mid)) <= budget {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    surroundings(partners, &merged, lens, lo)
}

/// Plans target bytes `t` — padding, headers, then `content_len` bytes of contents — as a
/// retimed copy of the source bytes of the same length at `s_start` in source layer `layer`,
/// extending the run before it when that run's walker expects a header just there. Returns
/// false, planning nothing, when the bytes are not such a copy (other changes in the headers,
/// a header whose size is not the contents', no mtime moved).
fn retime(planner: &mut Planner, source: &SourceIndex<'_>, target: &Unpacked, layer: u32, t: Range<u64>, s_start: u64, content_len: u64) -> Result<bool> {
    let len = t.end - t.start;
    let meta_len = len - content_len;
    let pad = meta_len % BLOCK;
    let src_layer = &source.layers[layer as usize];
    if meta_len < BLOCK || s_start.checked_add(len).is_none_or(|end| end > src_layer.index.len) {
        return Ok(false);
    }
    let mut src = src_layer.read(s_start..s_start + meta_len)?;
    let tgt = target.read(t.start..t.start + meta_len)?;
    if src[..pad as usize] != tgt[..pad as usize] {
        return Ok(false);
    }
    // The shift, from the first header or the file's own (the last block): a long-name or
    // PAX pseudo-header first may carry no time.
    let (first, last) = (pad as usize..(pad + BLOCK) as usize, src.len() - BLOCK as usize..src.len());
    let shift = [first, last].into_iter().find_map(|block| {
        let (old, new) = (retime::header_mtime(&src[block.clone()])?, retime::header_mtime(&tgt[block])?);
        let shift = i64::try_from(new).ok()? - i64::try_from(old).ok()?;
        (old != 0 && shift != 0).then_some(shift)
    });
    // Headers without a time (a directory written with mtime 0) extend the run before them
    // at its shift.
    let shift = shift.or_else(|| match planner.ops.last() {
        Some(Op::Retimed { range, shift, next_header }) if range.layer == layer && range.end() == s_start && *next_header == s_start + pad => Some(*shift),
        _ => None,
    });
    let Some(shift) = shift else { return Ok(false) };
    let mut walker = Retimer::new(shift);
    if walker.apply(&mut src[pad as usize..]).is_err() || src != tgt {
        return Ok(false);
    }
    let header_start = s_start + pad;
    let next_header = header_start + (meta_len - pad) + content_len.div_ceil(BLOCK) * BLOCK;
    if content_len > 0 {
        // The walker must skip exactly these contents to reach the next entry's header.
        let size = retime::header_size(&src[src.len() - BLOCK as usize..]);
        if size != Some(content_len) || walker.next_header() != Some(next_header - header_start) {
            return Ok(false);
        }
    }
    planner.stats.copied_bytes += len - pad;
    planner.stats.retimed_headers += walker.headers();
    match planner.ops.last_mut() {
        Some(Op::Retimed { range, shift: s, next_header: n }) if range.layer == layer && *s == shift && range.end() == s_start && *n == header_start => {
            range.len += len;
            *n = next_header;
        }
        _ => {
            emit_bytes(planner, source, target, t.start..t.start + pad, Some(range_of(layer, s_start..header_start)))?;
            planner.ops.push(Op::Retimed { range: range_of(layer, header_start..s_start + len), shift, next_header });
        }
    }
    Ok(true)
}

/// Emits the header of a target entry without contents (a directory, a link), the blocks at
/// the end of `t` (which starts with the previous file's padding), from the header of the
/// source entry `l` at the same path: a retimed copy extending the run before it where the
/// source's padding is the same too, else a copy when the header blocks are the same bytes.
/// Says whether it did; otherwise the bytes stay with the literals before the next file.
fn header_alone(planner: &mut Planner, source: &SourceIndex<'_>, target: &Unpacked, l: Loc, t: Range<u64>) -> Result<bool> {
    let s = source.entry(l);
    let (len, header_start) = (t.end - t.start, t.start.div_ceil(BLOCK) * BLOCK);
    let header_len = t.end.saturating_sub(header_start);
    if s.data_len != 0 || header_len == 0 || s.data_start < s.meta_start + header_len {
        return Ok(false);
    }
    if s.data_start >= len && retime(planner, source, target, l.layer, t.clone(), s.data_start - len, 0)? {
        return Ok(true);
    }
    // The padding and the header as one copy where the source's bytes before its header are
    // the same, else the header alone.
    let layer = &source.layers[l.layer as usize];
    if s.data_start >= s.meta_start + len && target.read(t.clone())? == layer.read(s.data_start - len..s.data_start)? {
        planner.copy(range_of(l.layer, s.data_start - len..s.data_start));
        return Ok(true);
    }
    let s_header = s.data_start - header_len..s.data_start;
    if target.read(header_start..t.end)? != layer.read(s_header.clone())? {
        return Ok(false);
    }
    emit_bytes(planner, source, target, t.start..header_start, None)?;
    planner.copy(range_of(l.layer, s_header));
    Ok(true)
}

/// Files smaller than this are never approximated: a few records cost what they could save.
const MIN_APPROXIMATE_BYTES: u64 = 512;

/// The alignments worth using, by target entry: every similar binary file (its partner in
/// `partners`, by entry) and partner within [`EncodeParams::approximate_bytes`] is aligned
/// (in parallel), and kept where its estimated size beats literals.
fn alignments(target: &Unpacked, source: &SourceIndex<'_>, partners: &[Partner], params: &EncodeParams) -> Result<HashMap<usize, Vec<approximate::Step>>> {
    if params.approximate_bytes == 0 {
        return Ok(HashMap::new());
    }
    let within = |n: u64| (MIN_APPROXIMATE_BYTES..=params.approximate_bytes).contains(&n);
    let candidates: Vec<(usize, Range<u64>, SourceRange)> = target
        .index
        .entries
        .iter()
        .zip(partners)
        .enumerate()
        .filter_map(|(i, (e, partner))| match partner {
            Partner::Similar(l) if within(e.data_len) => {
                let partner = range_of(l.layer, source.entry(*l).content_range());
                within(partner.len).then(|| (i, e.content_range(), partner))
            }
            _ => None,
        })
        .collect();
    let kept: Vec<Option<(usize, Vec<approximate::Step>)>> = candidates
        .par_iter()
        .map(|(i, content, partner)| {
            let new = target.read(content.clone())?;
            if !approximate::is_binary(&new) {
                return Ok(None);
            }
            let old = source.layers[partner.layer as usize].read(partner.offset..partner.end())?;
            Ok(approximate::align_if_smaller(&old, &new)?.map(|steps| (*i, steps)))
        })
        .collect::<Result<_>>()?;
    Ok(kept.into_iter().flatten().collect())
}

/// Emits target bytes that are not file contents: a copy when they equal the partner's.
fn emit_bytes(planner: &mut Planner, source: &SourceIndex<'_>, target: &Unpacked, range: Range<u64>, partner: Option<SourceRange>) -> Result<()> {
    if range.is_empty() {
        return Ok(());
    }
    if let Some(p) = partner {
        if target.same_bytes(range.clone(), &source.layers[p.layer as usize], p.offset..p.end())? {
            planner.copy(p);
            return Ok(());
        }
    }
    planner.literal(range, partner);
    Ok(())
}

/// The frames of a layer's chunks and difference chunks, compressed ahead of the record
/// writer in parallel, a batch at a time in the order the records use them, so that the
/// frames held at once do not grow with the layer.
struct Frames<'a, 's> {
    /// Chunks and difference chunks still to compress, in order.
    chunks: VecDeque<&'a ChunkPlan>,
    differences: VecDeque<&'a DifferencePlan>,
    /// Frames compressed and not yet written, in order.
    chunk_frames: VecDeque<Vec<u8>>,
    difference_frames: VecDeque<Vec<u8>>,
    target: &'a Unpacked,
    source: &'a SourceIndex<'s>,
    params: &'a EncodeParams,
}

impl Frames<'_, '_> {
    /// The frame of the next chunk.
    fn next_chunk_frame(&mut self) -> Result<Vec<u8>> {
        if self.chunk_frames.is_empty() {
            self.refill()?;
        }
        self.chunk_frames.pop_front().ok_or_else(|| Error::malformed("patch plan", "more chunks referenced than compressed"))
    }

    /// The frame of the next difference chunk.
    fn next_difference_frame(&mut self) -> Result<Vec<u8>> {
        if self.difference_frames.is_empty() {
            self.refill()?;
        }
        self.difference_frames.pop_front().ok_or_else(|| Error::malformed("patch plan", "more difference chunks referenced than compressed"))
    }

    /// Compresses the next batch of each kind whose frames have run out, both at once: a
    /// layer holding one chunk and a few difference chunks (an executable coded by an
    /// approximate match) would otherwise compress its chunk on one thread while the others
    /// wait.
    fn refill(&mut self) -> Result<()> {
        let batch = rayon::current_num_threads().max(1) * FRAMES_PER_THREAD;
        let next = |queue_empty: bool, left: usize| if queue_empty { batch.min(left) } else { 0 };
        let chunks: Vec<&ChunkPlan> = self.chunks.drain(..next(self.chunk_frames.is_empty(), self.chunks.len())).collect();
        let differences: Vec<&DifferencePlan> = self.differences.drain(..next(self.difference_frames.is_empty(), self.differences.len())).collect();
        let (target, source, params) = (self.target, self.source, self.params);
        let effort = params.difference_chunks.unwrap_or(lzma::Effort::Strong);
        let (chunk_frames, difference_frames) = rayon::join(
            || chunks.par_iter().map(|c| compress_chunk(c, target, source, params.zstd_level)).collect::<Result<Vec<_>>>(),
            || differences.par_iter().map(|d| compress_differences(d, target, source, effort)).collect::<Result<Vec<_>>>(),
        );
        self.chunk_frames.extend(chunk_frames?);
        self.difference_frames.extend(difference_frames?);
        Ok(())
    }
}

/// Compresses one difference chunk: its target bytes minus their source bytes, as an LZMA
/// stream.
fn compress_differences(plan: &DifferencePlan, target: &Unpacked, source: &SourceIndex<'_>, effort: lzma::Effort) -> Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(plan.len as usize);
    for (t, r) in &plan.pieces {
        append_differences(&mut bytes, t.clone(), r, target, source)?;
    }
    lzma::compress(&bytes, effort)
}

/// Appends target bytes `t` minus source bytes `r` (as long), byte by byte modulo 256.
fn append_differences(out: &mut Vec<u8>, t: Range<u64>, r: &SourceRange, target: &Unpacked, source: &SourceIndex<'_>) -> Result<()> {
    let start = out.len();
    target.read_append(t, out)?;
    let partner = source.layers[r.layer as usize].read(r.offset..r.end())?;
    for (byte, p) in out[start..].iter_mut().zip(&partner) {
        *byte = byte.wrapping_sub(*p);
    }
    Ok(())
}

/// Compresses one chunk's literals with its prefix as zstd reference.
fn compress_chunk(chunk: &ChunkPlan, target: &Unpacked, source: &SourceIndex<'_>, level: i32) -> Result<Vec<u8>> {
    let mut prefix = Vec::with_capacity(chunk.prefix_len as usize);
    for p in &chunk.prefix {
        source.layers[p.layer as usize].read_append(p.offset..p.end(), &mut prefix)?;
    }
    let mut literals = Vec::with_capacity(chunk.literal_len as usize);
    for piece in &chunk.literals {
        match piece {
            Piece::Target(r) => target.read_append(r.clone(), &mut literals)?,
            Piece::Difference { target: t, source: r } => append_differences(&mut literals, t.clone(), r, target, source)?,
        }
    }
    let zstd_err = |code: usize| Error::malformed("zstd compression", zstd_safe::get_error_name(code).to_string());
    let mut cctx = chunk_compressor(&prefix, literals.len(), level, "zstd compression")?;
    let mut frame = Vec::with_capacity(zstd_safe::compress_bound(literals.len()));
    cctx.compress2(&mut frame, &literals).map_err(zstd_err)?;
    Ok(frame)
}

/// The zstd context a chunk of `chunk_len` bytes is compressed with at `level`, `prefix` its
/// reference; `info --files` compresses chunks again with the same one (errors name `what`).
pub(crate) fn chunk_compressor<'p>(prefix: &'p [u8], chunk_len: usize, level: i32, what: &str) -> Result<zstd_safe::CCtx<'p>> {
    let zstd_err = |code: usize| Error::malformed(what, zstd_safe::get_error_name(code).to_string());
    // The window: the prefix and the chunk.
    let window_log = ((prefix.len() + chunk_len).max(1 << 10) as u64).next_power_of_two().trailing_zeros().clamp(10, 27);
    let mut cctx = zstd_safe::CCtx::create();
    cctx.set_parameter(CParameter::CompressionLevel(level)).map_err(zstd_err)?;
    cctx.set_parameter(CParameter::WindowLog(window_log)).map_err(zstd_err)?;
    cctx.set_parameter(CParameter::ChecksumFlag(false)).map_err(zstd_err)?;
    // Long-distance matching finds the long runs shared with the prefix cheaply, as
    // `zstd --patch-from` does; it matters most at fast levels whose hash tables are small.
    cctx.set_parameter(CParameter::EnableLongDistanceMatching(true)).map_err(zstd_err)?;
    cctx.ref_prefix(prefix).map_err(zstd_err)?;
    Ok(cctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> EncodeParams {
        EncodeParams { zstd_level: 3, chunk_bytes: 100, prefix_bytes: 150, window_slack: 10, context_bytes: 0, approximate_bytes: 0, difference_chunks: None }
    }

    fn r(layer: u32, offset: u64, len: u64) -> SourceRange {
        SourceRange { layer, offset, len }
    }

    #[test]
    fn context_surrounds_partners_within_budget_and_excludes_them() {
        let lens = [1000, 1000];
        let partners = [r(0, 100, 50), r(0, 160, 40), r(1, 500, 10)];
        let ctx = context_ranges(&partners, &lens, 60);
        let total: u64 = ctx.iter().map(|c| c.len).sum();
        assert!(total <= 60 && total > 30, "{ctx:?}");
        for c in &ctx {
            for p in &partners {
                assert!(c.layer != p.layer || c.end() <= p.offset || c.offset >= p.end(), "{c:?} overlaps {p:?}");
            }
        }
        assert!(ctx.contains(&r(0, 150, 10)), "the gap between partners is context: {ctx:?}");
        let all = context_ranges(&partners, &lens, u64::MAX);
        assert_eq!(all.iter().map(|c| c.len).sum::<u64>(), 2000 - 100);
        assert!(context_ranges(&[], &lens, 100).is_empty());
    }

    #[test]
    fn copies_merge_when_contiguous() {
        let mut p = Planner::new(params(), 1 << 30);
        p.copy(SourceRange { layer: 0, offset: 0, len: 10 });
        p.copy(SourceRange { layer: 0, offset: 10, len: 5 });
        p.copy(SourceRange { layer: 1, offset: 15, len: 5 });
        assert_eq!(p.ops, vec![Op::Copy(SourceRange { layer: 0, offset: 0, len: 15 }), Op::Copy(SourceRange { layer: 1, offset: 15, len: 5 })]);
    }

    #[test]
    fn large_literals_split_into_bounded_chunks_with_proportional_partner_windows() {
        let mut p = Planner::new(params(), 1 << 30);
        p.literal(0..350, Some(SourceRange { layer: 2, offset: 1000, len: 700 }));
        assert_eq!(p.chunks.len(), 4);
        for c in &p.chunks {
            assert!(c.literal_len <= 100 && c.prefix_len <= 150, "{c:?}");
            for r in &c.prefix {
                assert!(r.offset >= 1000 && r.end() <= 1700, "{r:?}");
            }
        }
        let lits: u64 = p
            .ops
            .iter()
            .map(|o| match o {
                Op::Literal { len, .. } => *len,
                _ => 0,
            })
            .sum();
        assert_eq!(lits, 350);
        // The last piece (bytes 300..350 of 350) maps to the last part of the partner.
        assert!(p.chunks[3].prefix[0].offset >= 1500, "{:?}", p.chunks[3].prefix);
    }

    #[test]
    fn small_literals_share_a_chunk_until_a_bound_is_reached() {
        let mut p = Planner::new(params(), 1 << 30);
        for i in 0..5u64 {
            p.literal(i * 40..i * 40 + 40, Some(SourceRange { layer: 0, offset: i * 60, len: 60 }));
        }
        let sizes: Vec<_> = p.chunks.iter().map(|c| (c.literal_len, c.prefix_len)).collect();
        assert_eq!(sizes, vec![(80, 120), (80, 120), (40, 60)]);
        assert_eq!(p.chunks[0].prefix, vec![SourceRange { layer: 0, offset: 0, len: 120 }], "adjacent partners merge");
    }

    #[test]
    fn the_bytes_between_an_approximate_match_s_adds_share_one_chunk_and_prefix() {
        // A partner of 120 bytes where a prefix holds at most 150: counted again for each
        // piece between adds, every piece would have had a chunk (and a prefix) of its own.
        let mut p = Planner::new(params(), 1000);
        let partner = r(0, 0, 120);
        let steps: Vec<approximate::Step> = (0..4).map(|_| approximate::Step { add: 10, extra: 5, seek: 0 }).collect();
        p.approximate(0..60, partner, &steps);
        assert_eq!(p.chunks.len(), 1);
        assert_eq!((p.chunks[0].literal_len, p.chunks[0].prefix_len), (60, 120));
        assert_eq!(p.chunks[0].prefix, vec![partner]);
    }

    #[test]
    fn chunk_prefixes_stay_within_the_budget_a_reader_allows() {
        // One-byte literals, each with its own whole-prefix partner: without the budget the
        // patch would read 8 MiB of prefix per byte, and a reader would refuse it.
        let params = EncodeParams { prefix_bytes: MAX_PREFIX_BYTES, chunk_bytes: MAX_CHUNK_BYTES, ..params() };
        let mut p = Planner::new(params, 100);
        for i in 0..100u64 {
            p.literal(i..i + 1, Some(SourceRange { layer: 0, offset: i * MAX_PREFIX_BYTES, len: MAX_PREFIX_BYTES }));
        }
        let total: u64 = p.chunks.iter().map(|c| c.prefix_len).sum();
        assert!(total <= prefix_budget(100), "{total} prefix bytes");
        assert!(p.chunks.iter().filter(|c| c.prefix_len > 0).count() >= 8, "partners are used while the budget lasts");
        let lits: u64 = p
            .ops
            .iter()
            .map(|o| match o {
                Op::Literal { len, .. } => *len,
                _ => 0,
            })
            .sum();
        assert_eq!(lits, 100, "every byte is still coded");
    }
}
