//! Executing a patch record stream: source copies, chunk literals and source ranges plus
//! differences (from the chunk, or from a difference chunk, [`crate::format::lzma`]), written
//! in order.

use std::collections::HashMap;
use std::io::{Read, Write};

use zstd::zstd_safe;

use crate::apply::source::SourceLayer;
use crate::error::{Error, IoContext, Result};
use crate::format::lzma::DifferenceStream;
use crate::format::records::{Record, RecordReader, SourceRange};
use crate::format::retime::Retimer;

/// Source bytes copied at a time: big enough that a copy costs few reads, small enough that
/// a small layer does not pay for a megabyte of fresh pages it never fills.
const COPY_BUFFER_BYTES: usize = 256 << 10;
/// Difference chunk bytes decoded at a time (the applier's memory, per layer rebuilt at once).
const DIFFERENCE_BUFFER_BYTES: usize = 64 << 10;

/// Where a replayed patch goes: the rebuilt tar's bytes, and what produced them for a
/// caller that wants to know ([`mod@crate::info`]'s per-file costs). The applier's output is
/// any [`Write`] ([`run_patch`]), which ignores both.
pub trait PatchOutput: Write {
    /// `record` has been read and is about to append its bytes, if it appends any.
    fn record(&mut self, _record: &Record) -> Result<()> {
        Ok(())
    }

    /// Whether [`PatchOutput::chunk_consumed`] needs each chunk's frame: when not, the frame
    /// is freed as soon as it is decompressed (the applier's peak memory).
    fn wants_frames(&self) -> bool {
        false
    }

    /// The current chunk has been consumed whole (its last byte appended): its reference
    /// `prefix`, its decompressed bytes `chunk` and its compressed `frame` (empty unless
    /// [`PatchOutput::wants_frames`]).
    fn chunk_consumed(&mut self, _prefix: &[u8], _chunk: &[u8], _frame: &[u8]) -> Result<()> {
        Ok(())
    }

    /// The current difference chunk has been consumed whole: its bytes and its LZMA stream
    /// (empty unless [`PatchOutput::wants_frames`]).
    fn differences_consumed(&mut self, _chunk: &[u8], _frame: &[u8]) -> Result<()> {
        Ok(())
    }
}

/// A plain [`Write`] as a [`PatchOutput`] that ignores what produced its bytes.
struct Plain<'a>(&'a mut dyn Write);

impl Write for Plain<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.0.write_all(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl PatchOutput for Plain<'_> {}

/// Rebuilds a tar from `records` into `out`, reading source layers from `sources`.
/// Memory is bounded by the format limits: one chunk, its prefix and its frame at a time, and
/// one difference chunk's frame and LZMA dictionary (its bytes are decoded as they are used).
pub fn run_patch<R: Read>(records: &mut RecordReader<R>, sources: &HashMap<u32, SourceLayer>, out: &mut dyn Write) -> Result<u64> {
    replay_patch(records, sources, &mut Plain(out))
}

/// [`run_patch`] into an output that is told which record appends which bytes, and is shown
/// each chunk once it has been consumed.
pub fn replay_patch<R: Read>(records: &mut RecordReader<R>, sources: &HashMap<u32, SourceLayer>, out: &mut dyn PatchOutput) -> Result<u64> {
    let source =
        |layer: u32| sources.get(&layer).ok_or_else(|| Error::malformed("patch", format!("reads source layer {layer}, which delta.json does not list")));
    let mut copy_buf = vec![0u8; COPY_BUFFER_BYTES];
    let mut prefix = Vec::new();
    let mut chunk: Vec<u8> = Vec::new();
    let mut frame: Vec<u8> = Vec::new();
    let mut chunk_pos = 0usize;
    // The current difference chunk, decoded as adds take its bytes; what has been taken, for
    // an output that wants to see the chunk.
    let mut differences: Option<DifferenceStream> = None;
    let mut differences_buf = Vec::new();
    let mut differences_seen: Vec<u8> = Vec::new();
    let mut differences_pos = 0u64;
    let mut written = 0u64;
    loop {
        let record = records.next_record()?;
        out.record(&record)?;
        match record {
            Record::Copy(r) => {
                copy_range(source(r.layer)?, &r, &mut copy_buf, out, |_| Ok(()))?;
                written += r.len;
            }
            Record::Retimed { range: r, shift } => {
                let mut retimer = Retimer::new(shift);
                copy_range(source(r.layer)?, &r, &mut copy_buf, out, |piece| retimer.apply(piece))?;
                written += r.len;
            }
            Record::Chunk { prefix: ranges, raw_len, frame: next } => {
                prefix.clear();
                for r in &ranges {
                    let start = prefix.len();
                    prefix.resize(start + r.len as usize, 0);
                    source(r.layer)?.read_at(r.offset, &mut prefix[start..])?;
                }
                // Reuse the buffer: allocating a new one before the old is freed would hold
                // two chunks at once.
                chunk.clear();
                chunk.reserve_exact(raw_len as usize);
                let zstd_err = |code: usize| Error::malformed("patch chunk", zstd_safe::get_error_name(code).to_string());
                let mut dctx = zstd_safe::DCtx::create();
                dctx.ref_prefix(&prefix).map_err(zstd_err)?;
                let n = dctx.decompress(&mut chunk, &next).map_err(zstd_err)?;
                drop(dctx);
                if n as u64 != raw_len {
                    return Err(Error::malformed("patch chunk", format!("decompressed to {n} bytes, {raw_len} declared")));
                }
                chunk_pos = 0;
                // Kept until the chunk is consumed, for an output that wants to see it. Else
                // the prefix (up to 8 MiB) is freed now, so that it is not held beside the
                // chunk and a difference chunk's frame and dictionary while the adds run.
                if out.wants_frames() {
                    frame = next;
                } else {
                    frame = Vec::new();
                    prefix = Vec::new();
                }
            }
            Record::Add(r) => {
                // The reader checked that the chunk holds `r.len` more bytes.
                let differences = &chunk[chunk_pos..chunk_pos + r.len as usize];
                let mut at = 0;
                copy_range(source(r.layer)?, &r, &mut copy_buf, out, |piece| {
                    add_differences(piece, &differences[at..at + piece.len()]);
                    at += piece.len();
                    Ok(())
                })?;
                chunk_pos += r.len as usize;
                written += r.len;
                if chunk_pos == chunk.len() {
                    out.chunk_consumed(&prefix, &chunk, &frame)?;
                    // Freed now: the next chunk's frame is read before this one would be replaced.
                    frame = Vec::new();
                }
            }
            Record::Differences { raw_len, frame: next } => {
                // The reader checked that the previous one was consumed whole (and finished).
                differences = Some(DifferenceStream::new(next, raw_len)?);
                differences_pos = 0;
                differences_seen.clear();
            }
            Record::AddDifferences(r) => {
                // The reader checked that the difference chunk holds `r.len` more bytes.
                let stream = differences.as_mut().ok_or_else(|| Error::malformed("patch", "an add before any difference chunk"))?;
                let keep = out.wants_frames();
                differences_buf.resize(DIFFERENCE_BUFFER_BYTES, 0);
                copy_range(source(r.layer)?, &r, &mut copy_buf, out, |piece| {
                    for piece in piece.chunks_mut(DIFFERENCE_BUFFER_BYTES) {
                        let d = &mut differences_buf[..piece.len()];
                        stream.read_exact(d)?;
                        add_differences(piece, d);
                        if keep {
                            differences_seen.extend_from_slice(d);
                        }
                    }
                    Ok(())
                })?;
                differences_pos += r.len;
                written += r.len;
                if let Some(stream) = differences.take_if(|s| differences_pos == s.raw_len()) {
                    let frame = if keep { stream.frame().to_vec() } else { Vec::new() };
                    stream.finish()?;
                    out.differences_consumed(&differences_seen, &frame)?;
                    differences_seen = Vec::new();
                }
            }
            Record::Literal(n) => {
                let end = chunk_pos + n as usize;
                out.write_all(&chunk[chunk_pos..end]).ctx(|| "writing rebuilt layer".into())?;
                chunk_pos = end;
                written += n;
                if chunk_pos == chunk.len() {
                    out.chunk_consumed(&prefix, &chunk, &frame)?;
                    // Freed now: the next chunk's frame is read before this one would be replaced.
                    frame = Vec::new();
                }
            }
            Record::End => return Ok(written),
        }
    }
}

/// Adds `differences` to the source bytes `bytes` (as long), byte by byte modulo 256: an add.
fn add_differences(bytes: &mut [u8], differences: &[u8]) {
    for (byte, d) in bytes.iter_mut().zip(differences) {
        *byte = byte.wrapping_add(*d);
    }
}

/// Copies source range `r` to `out` through `buf`, passing each piece through `edit` first.
/// Pieces are whole buffers from the range's start ([`COPY_BUFFER_BYTES`] is a multiple of
/// the tar block), so that a retimed span's headers never straddle two of them.
fn copy_range(layer: &SourceLayer, r: &SourceRange, buf: &mut [u8], out: &mut dyn Write, mut edit: impl FnMut(&mut [u8]) -> Result<()>) -> Result<()> {
    let mut done = 0;
    while done < r.len {
        let n = (r.len - done).min(buf.len() as u64) as usize;
        layer.read_at(r.offset + done, &mut buf[..n])?;
        edit(&mut buf[..n])?;
        out.write_all(&buf[..n]).ctx(|| "writing rebuilt layer".into())?;
        done += n as u64;
    }
    Ok(())
}
