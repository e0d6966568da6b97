//! Where a patch's bytes go, entry by entry of the tar it rebuilds (`fleetdelta info --files`).
//!
//! The patch is replayed as the applier replays it, against the same source layers, into an
//! output that keeps nothing: it walks the rebuilt tar ([`TarWalk`]) and counts each byte for
//! its entry's headers or contents, by the record that appended it. Copied and retimed bytes
//! cost records only; literal and added bytes come out of chunks, whose zstd frames are the
//! payload that counts, shared among the pieces of each chunk that the entries took
//! ([`chunk_cost`](super::chunk_cost), an estimate). Memory stays what the applier needs:
//! one chunk, its prefix and its frame, plus a few numbers per entry.
//!
//! The patch file is itself one zstd frame around the records and the chunks' frames. The
//! frames are usually stored in it as they are, and the records then cost the rest of the
//! patch; but that frame may compress them further, and the rest is then less than the
//! records cost (even below 0). Both the rest and the records compressed alone (the frames
//! left out, as the differ compresses a patch) fall short of what the records cost in the
//! patch: the larger one is taken for it, and the chunks cost what is left, which the
//! entries share.

use std::collections::HashMap;
use std::io::{self, Write};

use serde::Serialize;

use super::chunk_cost::{apportion, piece_costs};
use super::tar_walk::{EntryKind, Part, TarWalk};
use crate::apply::patch::{replay_patch, PatchOutput};
use crate::apply::source::SourceLayer;
use crate::apply::{finish_patch, open_patch};
use crate::diff::Level;
use crate::error::{Error, IoContext, Result};
use crate::format::plan::{LayerPlan, Member, Method};
use crate::format::records::{PatchHeader, Record, RecordWriter};
use crate::format::{is_zero, RECORD_STREAM_WINDOW_LOG};
use crate::package::DeltaImage;

/// The zstd level of the frame around a patch's records, as the differ writes it
/// (`crate::diff`): 3 at `--level fast`, 9 otherwise.
fn record_stream_level(level: Level) -> i32 {
    if level == Level::Fast {
        3
    } else {
        9
    }
}

/// Where one patched layer's patch goes, entry by entry of the tar it rebuilds.
///
/// The entries' costs sum to `chunk_cost_bytes`, and with `records_and_framing_bytes` to
/// `patch_bytes`.
#[derive(Clone, Debug, Serialize)]
pub struct LayerFiles {
    /// Bytes of the layer's patch file.
    pub patch_bytes: u64,
    /// What the records and the zstd frame of the patch around them cost, estimated:
    /// `patch_bytes` less `chunk_frame_bytes`, or, when the patch's zstd frame compressed the
    /// chunks' frames so much that this is less, the records alone (without the frames)
    /// compressed as the differ compresses a patch; at most `patch_bytes`.
    pub records_and_framing_bytes: u64,
    /// What the chunks cost in the patch: `patch_bytes` less `records_and_framing_bytes`. The
    /// entries' costs share it.
    pub chunk_cost_bytes: u64,
    /// The chunks' zstd frames as the patch holds them, before its own zstd frame (more than
    /// `chunk_cost_bytes` when that frame compresses them further).
    pub chunk_frame_bytes: u64,
    /// Estimated cost of every entry's headers, PAX records, long names and padding, and of
    /// the end of the archive (each also counted in its entry's cost).
    pub header_cost_bytes: u64,
    /// zstd level at which the chunks are compressed again to estimate the costs (the level
    /// the differ used for them, as the delta's level and its image tell).
    pub estimate_zstd_level: i32,
    /// Every entry of the tar the patch rebuilds, in tar order, the end of the archive last.
    /// Where the patch writes gzip files and zip entries uncompressed, this is the tar with
    /// them uncompressed.
    pub entries: Vec<FileCost>,
}

/// One entry of a patched layer and what it costs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileCost {
    /// Its path in the tar.
    pub path: String,
    /// What it is.
    pub kind: EntryKind,
    /// Size of its contents in the target layer (as its tar header gives it).
    pub size: u64,
    /// Estimated payload bytes it costs: its share of the chunk frames, headers and contents.
    pub cost_bytes: u64,
    /// Of which its headers, records and padding.
    pub header_cost_bytes: u64,
    /// How its contents were rebuilt.
    pub contents: Coding,
    /// How its headers, records and padding were rebuilt.
    pub header: Coding,
    /// gzip files and zip entries inside it that the patch writes uncompressed (their
    /// uncompressed bytes are the ones counted in `contents`).
    #[serde(skip_serializing_if = "is_zero")]
    pub members_patched_uncompressed: u32,
}

/// Bytes of one part of a tar entry, by the record that rebuilt them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Coding {
    /// Copied from the source (COPY).
    pub copied_bytes: u64,
    /// Copied from the source with their tar headers retimed (RETIMED).
    pub retimed_bytes: u64,
    /// Source bytes plus differences from a chunk (ADD).
    pub added_bytes: u64,
    /// Taken from a chunk (LITERAL).
    pub literal_bytes: u64,
}

impl Coding {
    /// All the bytes counted.
    pub fn total(&self) -> u64 {
        self.copied_bytes + self.retimed_bytes + self.added_bytes + self.literal_bytes
    }

    fn add(&mut self, how: Appended, n: u64) {
        *match how {
            Appended::Copied => &mut self.copied_bytes,
            Appended::Retimed => &mut self.retimed_bytes,
            Appended::Added | Appended::AddedDifferences => &mut self.added_bytes,
            Appended::Literal => &mut self.literal_bytes,
        } += n;
    }
}

impl FileCost {
    /// Whether this is a real entry, not the end of the archive.
    pub fn is_entry(&self) -> bool {
        self.kind != EntryKind::EndOfArchive
    }
}

/// The zstd levels the differ compressed `delta`'s chunks at (its level's, for the share of
/// the target image that had to be patched: [`Level::params_for`]), and its patches' records.
pub(super) fn zstd_levels(delta: &DeltaImage) -> Levels {
    let level: Level = delta.plan.level.parse().unwrap_or_default();
    let blob_bytes = |index: u32| delta.target.layers.get(index as usize).map_or(0, |t| t.blob.size);
    let patched = delta.plan.layers.iter().filter(|l| l.method != Method::Source).map(|l| blob_bytes(l.index)).sum();
    let image = delta.target.layers.iter().map(|l| l.blob.size).sum();
    Levels { chunks: level.params_for(patched, image).zstd_level, records: record_stream_level(level) }
}

/// zstd levels of a delta's patches, as [`zstd_levels`] finds them.
#[derive(Clone, Copy, Debug)]
pub(super) struct Levels {
    /// Of the chunks.
    chunks: i32,
    /// Of the frame around the records.
    records: i32,
}

/// Replays the patch of `plan` (a `patch` layer of `delta`) against `sources`, and tells
/// where its bytes go. The rebuilt tar may be at most `max_layer_bytes` long.
pub(super) fn layer_files(
    delta: &DeltaImage,
    plan: &LayerPlan,
    sources: &HashMap<u32, SourceLayer>,
    levels: Levels,
    max_layer_bytes: u64,
) -> Result<LayerFiles> {
    let target = delta.target.layers.get(plan.index as usize).ok_or_else(|| Error::malformed("delta.json", format!("no target layer {}", plan.index)))?;
    let what = format!("target layer {} ({})", plan.index, target.blob.digest);
    let limit = target.compression.max_uncompressed_len(target.blob.size).min(max_layer_bytes);
    let (mut records, patch_bytes) = open_patch(delta, plan, limit, &what)?;
    let members: Vec<Member> = plan.members.iter().map(|m| m.member).collect();
    let walk = TarWalk::new(&format!("{what} as its patch rebuilds it"), &members);
    let mut tally = Tally::new(walk, records.header(), levels)?;
    replay_patch(&mut records, sources, &mut tally)?;
    finish_patch(records, &what)?;
    tally.finish(patch_bytes)
}

/// A byte count that keeps nothing.
#[derive(Debug, Default)]
struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A patch's records written again without their chunks' frames, compressed as the differ
/// compresses a patch: what they cost.
type RecordsAlone = RecordWriter<zstd::stream::write::Encoder<'static, Counter>>;

fn records_alone(header: PatchHeader, level: i32) -> Result<RecordsAlone> {
    let mut outer = zstd::stream::write::Encoder::new(Counter::default(), level).ctx(|| "starting zstd".into())?;
    outer.window_log(RECORD_STREAM_WINDOW_LOG).ctx(|| "configuring zstd".into())?;
    outer.include_checksum(true).ctx(|| "configuring zstd".into())?;
    RecordWriter::new(outer, header).ctx(|| "estimating the records' cost".into())
}

/// Which record appends the bytes being written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Appended {
    Copied,
    Retimed,
    /// Source bytes plus differences from the chunk.
    Added,
    /// Source bytes plus differences from the difference chunk.
    AddedDifferences,
    Literal,
}

/// What one entry's headers or contents got.
#[derive(Clone, Copy, Debug, Default)]
struct PartTally {
    coding: Coding,
    cost: u64,
}

/// A patch output that stores nothing: it counts each byte for its entry's part, and shares
/// each chunk's frame among the parts that took its bytes.
struct Tally {
    walk: TarWalk,
    appending: Appended,
    /// Per entry, its headers' and its contents' tallies; their costs are shares of the
    /// chunks' frames until [`Tally::finish`] scales them to the patch.
    entries: Vec<[PartTally; 2]>,
    /// The current chunk's bytes taken so far, as runs taken by one part of one entry.
    pieces: Vec<(usize, Part, usize)>,
    /// The same for the current difference chunk.
    difference_pieces: Vec<(usize, Part, usize)>,
    chunk_frame_bytes: u64,
    levels: Levels,
    records: RecordsAlone,
}

fn slot(part: Part) -> usize {
    match part {
        Part::Header => 0,
        Part::Contents => 1,
    }
}

impl Tally {
    fn new(walk: TarWalk, header: PatchHeader, levels: Levels) -> Result<Self> {
        let records = records_alone(header, levels.records)?;
        Ok(Tally {
            walk,
            appending: Appended::Copied,
            entries: Vec::new(),
            pieces: Vec::new(),
            difference_pieces: Vec::new(),
            chunk_frame_bytes: 0,
            levels,
            records,
        })
    }

    fn finish(mut self, patch_bytes: u64) -> Result<LayerFiles> {
        let walked = self.walk.finish()?;
        let records_alone = self.records.into_inner().finish().ctx(|| "estimating the records' cost".into())?.0;
        let records_and_framing = patch_bytes.saturating_sub(self.chunk_frame_bytes).max(records_alone).min(patch_bytes);
        let chunk_cost_bytes = if self.chunk_frame_bytes == 0 { 0 } else { patch_bytes - records_and_framing };
        // The frames' shares, scaled to what the chunks cost in the patch.
        self.entries.resize(walked.len(), Default::default());
        let shares: Vec<u64> = self.entries.iter().flatten().map(|p| p.cost).collect();
        for (part, cost) in self.entries.iter_mut().flatten().zip(apportion(chunk_cost_bytes, &shares)) {
            part.cost = cost;
        }
        let entries: Vec<FileCost> = walked
            .into_iter()
            .zip(self.entries)
            .map(|(e, [header, contents])| FileCost {
                path: e.path,
                kind: e.kind,
                size: e.size,
                cost_bytes: header.cost + contents.cost,
                header_cost_bytes: header.cost,
                contents: contents.coding,
                header: header.coding,
                members_patched_uncompressed: e.members,
            })
            .collect();
        Ok(LayerFiles {
            patch_bytes,
            records_and_framing_bytes: patch_bytes - chunk_cost_bytes,
            chunk_cost_bytes,
            chunk_frame_bytes: self.chunk_frame_bytes,
            header_cost_bytes: entries.iter().map(|e| e.header_cost_bytes).sum(),
            estimate_zstd_level: self.levels.chunks,
            entries,
        })
    }
}

impl Write for Tally {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Tally { walk, appending, entries, pieces, difference_pieces, .. } = self;
        let mut pieces = match appending {
            Appended::Added | Appended::Literal => Some(pieces),
            Appended::AddedDifferences => Some(difference_pieces),
            Appended::Copied | Appended::Retimed => None,
        };
        walk.feed(buf, |entry, part, n| {
            if entries.len() <= entry {
                entries.resize(entry + 1, Default::default());
            }
            entries[entry][slot(part)].coding.add(*appending, n as u64);
            if let Some(pieces) = pieces.as_mut() {
                match pieces.last_mut() {
                    Some((e, p, len)) if *e == entry && *p == part => *len += n,
                    _ => pieces.push((entry, part, n)),
                }
            }
        })
        .map_err(Error::into_io)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl PatchOutput for Tally {
    fn record(&mut self, record: &Record) -> Result<()> {
        let alone = || "estimating the records' cost".to_string();
        match record {
            Record::Copy(_) => self.appending = Appended::Copied,
            Record::Retimed { .. } => self.appending = Appended::Retimed,
            Record::Add(_) => self.appending = Appended::Added,
            Record::AddDifferences(_) => self.appending = Appended::AddedDifferences,
            Record::Literal(_) => self.appending = Appended::Literal,
            Record::Differences { raw_len, frame } => {
                self.chunk_frame_bytes += frame.len() as u64;
                return self.records.write(&Record::Differences { raw_len: *raw_len, frame: Vec::new() }).ctx(alone);
            }
            Record::Chunk { prefix, raw_len, frame } => {
                self.chunk_frame_bytes += frame.len() as u64;
                let without_frame = Record::Chunk { prefix: prefix.clone(), raw_len: *raw_len, frame: Vec::new() };
                return self.records.write(&without_frame).ctx(alone);
            }
            Record::End => {}
        }
        self.records.write(record).ctx(alone)
    }

    fn wants_frames(&self) -> bool {
        true
    }

    fn chunk_consumed(&mut self, prefix: &[u8], chunk: &[u8], frame: &[u8]) -> Result<()> {
        let pieces = std::mem::take(&mut self.pieces);
        self.share(pieces, prefix, chunk, frame)
    }

    fn differences_consumed(&mut self, chunk: &[u8], frame: &[u8]) -> Result<()> {
        // Shared by zstd's estimate as well: the pieces' relative costs, not the codec's.
        let pieces = std::mem::take(&mut self.difference_pieces);
        self.share(pieces, &[], chunk, frame)
    }
}

impl Tally {
    /// Shares `frame`'s bytes among the `pieces` that took `chunk`'s bytes.
    fn share(&mut self, pieces: Vec<(usize, Part, usize)>, prefix: &[u8], chunk: &[u8], frame: &[u8]) -> Result<()> {
        let lengths: Vec<usize> = pieces.iter().map(|p| p.2).collect();
        let costs = piece_costs(prefix, chunk, &lengths, frame.len() as u64, self.levels.chunks)?;
        for ((entry, part, _), cost) in pieces.into_iter().zip(costs) {
            self.entries[entry][slot(part)].cost += cost;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_bytes::noise;

    /// A tar of `files` (path, contents), written by the tar crate.
    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, path, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// Feeds `tar` to a tally as a patch would: the first `copied` bytes by a COPY, the rest
    /// from one chunk compressed against `prefix`, taken by LITERAL records of `pieces` bytes;
    /// `patch_bytes(frame length)` is the length of the patch.
    fn tally(tar: &[u8], copied: usize, prefix: &[u8], pieces: &[usize], patch_bytes: impl Fn(u64) -> u64) -> LayerFiles {
        let literal = &tar[copied..];
        assert_eq!(pieces.iter().sum::<usize>(), literal.len());
        let mut cctx = zstd::zstd_safe::CCtx::create();
        cctx.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(12)).unwrap();
        cctx.ref_prefix(prefix).unwrap();
        let mut frame = Vec::with_capacity(zstd::zstd_safe::compress_bound(literal.len()));
        cctx.compress2(&mut frame, literal).unwrap();
        let header = PatchHeader { target_layer: 0, tar_len: tar.len() as u64 };
        let mut t = Tally::new(TarWalk::new("test tar", &[]), header, Levels { chunks: 12, records: 9 }).unwrap();
        t.record(&Record::Copy(crate::format::records::SourceRange { layer: 0, offset: 0, len: copied as u64 })).unwrap();
        t.write_all(&tar[..copied]).unwrap();
        t.record(&Record::Chunk { prefix: Vec::new(), raw_len: literal.len() as u64, frame: frame.clone() }).unwrap();
        let mut at = 0;
        for &n in pieces {
            t.record(&Record::Literal(n as u64)).unwrap();
            t.write_all(&literal[at..at + n]).unwrap();
            at += n;
        }
        t.chunk_consumed(prefix, literal, &frame).unwrap();
        t.record(&Record::End).unwrap();
        t.finish(patch_bytes(frame.len() as u64)).unwrap()
    }

    #[test]
    fn a_file_with_new_bytes_costs_more_than_one_its_partner_holds_and_costs_sum_to_the_patch() {
        let (same, old, new) = (noise(1, 30_000), noise(2, 30_000), noise(3, 30_000));
        let tar = tar_of(&[("a/copied", b"copied whole"), ("a/same-as-partner", &same), ("a/rewritten", &new)]);
        let prefix = [same.clone(), old].concat();
        // The first entry is copied; the literals start at the second entry's header, in
        // records that do not follow entry boundaries.
        let pieces = [700, 20_000, tar.len() - 1024 - 20_700];
        let files = tally(&tar, 1024, &prefix, &pieces, |frame| frame + 1000);
        let by_path = |p: &str| files.entries.iter().find(|e| e.path == p).unwrap_or_else(|| panic!("no {p}: {files:#?}"));
        let (copied, same, rewritten) = (by_path("a/copied"), by_path("a/same-as-partner"), by_path("a/rewritten"));
        assert_eq!((copied.cost_bytes, copied.contents.copied_bytes, copied.header.copied_bytes), (0, 12, 1012));
        assert_eq!(same.contents, Coding { literal_bytes: 30_000, ..Default::default() });
        assert_eq!(rewritten.contents.literal_bytes, 30_000);
        assert!(rewritten.cost_bytes > 29_000, "{rewritten:?}");
        assert!(same.cost_bytes < 1_000, "{same:?}");
        assert!(rewritten.header_cost_bytes > 0 && rewritten.header_cost_bytes < rewritten.cost_bytes);
        let end = files.entries.last().unwrap();
        assert_eq!((end.kind, end.header.literal_bytes), (EntryKind::EndOfArchive, 1024));
        // The chunk's frame stored as it is: the records cost the rest of the patch.
        assert_eq!((files.records_and_framing_bytes, files.chunk_cost_bytes), (1000, files.chunk_frame_bytes));
        assert_eq!(files.entries.iter().map(|e| e.cost_bytes).sum::<u64>(), files.chunk_cost_bytes);
        assert_eq!(files.header_cost_bytes, files.entries.iter().map(|e| e.header_cost_bytes).sum::<u64>());
        let total: u64 = files.entries.iter().map(|e| e.header.total() + e.contents.total()).sum();
        assert_eq!(total, tar.len() as u64);

        // A patch whose zstd frame compressed the chunk's frame: the records (a few varints)
        // compressed alone cost a few dozen bytes, and the chunk the rest.
        let squeezed = tally(&tar, 1024, &prefix, &pieces, |frame| frame - 100);
        let records = squeezed.records_and_framing_bytes;
        assert!(records > 10 && records < 80, "{records}");
        assert_eq!(squeezed.chunk_cost_bytes, squeezed.patch_bytes - records);
        assert_eq!(squeezed.entries.iter().map(|e| e.cost_bytes).sum::<u64>(), squeezed.chunk_cost_bytes);
        let by_path = |p: &str| squeezed.entries.iter().find(|e| e.path == p).unwrap().cost_bytes;
        assert!(by_path("a/rewritten") > 28_000 && by_path("a/same-as-partner") < 1_000);
    }
}
