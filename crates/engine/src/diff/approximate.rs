//! Approximate matches, bsdiff's idea: a file edited in scattered places (version strings, a
//! few functions, addresses shifted by a constant) is coded as regions of its partner plus
//! byte differences, mostly zeros, and the bytes between those regions. The differences and
//! the bytes between go into a chunk like literals (`ADD` and `LITERAL` records, feature
//! [`crate::format::plan::FEATURE_ADD_RANGES`]), where zstd makes the runs of zeros nearly
//! free; a byte matcher pays a sequence for every scattered edit instead.
//!
//! The alignment is the `bsdiff` crate's (Colin Percival's algorithm: a suffix array of the
//! partner, exact matches extended while at least half their bytes agree). It is tried per
//! similar file, and kept only when its estimated size beats the file's literals against the
//! same partner.

use std::io::{self, Write};

use zstd::zstd_safe::{self, CParameter};

use crate::error::{Error, Result};

/// One step of an alignment: `add` bytes of the partner from the current position plus
/// differences, then `extra` bytes of the target as they are; then the partner position moves
/// by `seek` (after the `add`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// Partner bytes rebuilt with differences.
    pub add: u64,
    /// Target bytes that follow, coded as literals.
    pub extra: u64,
    /// Move of the partner position after the add.
    pub seek: i64,
}

/// Estimated patch bytes per `ADD` record (tag and a source range) and per `LITERAL` record.
const ADD_RECORD_BYTES: u64 = 8;
const LITERAL_RECORD_BYTES: u64 = 3;

/// The zstd level the two codings are compared at: their relative size, not the final one.
const ESTIMATE_LEVEL: i32 = 9;

/// An alignment kept only when it is estimated at most this fraction of the literals' size
/// (the literals also profit from their neighbours in a chunk, which the estimate ignores).
const KEEP_BELOW: f64 = 0.9;

/// bsdiff's alignment of `new` against `old`, checked to stay inside both.
pub fn align(old: &[u8], new: &[u8]) -> Result<Vec<Step>> {
    let mut parser = StepParser::default();
    bsdiff::diff(old, new, &mut parser).map_err(|e| Error::io("aligning a similar file", e))?;
    let steps = parser.steps;
    // The applier's ranges are checked when read; here, a step outside either file would be
    // a bug of the aligner, and is refused rather than written.
    let (mut o, mut n) = (0i128, 0u128);
    for s in &steps {
        if o < 0 || o + s.add as i128 > old.len() as i128 {
            return Err(Error::Internal(format!("the aligner read partner bytes {o}+{} of {}", s.add, old.len())));
        }
        n += u128::from(s.add) + u128::from(s.extra);
        o += s.add as i128 + s.seek as i128;
    }
    if n != new.len() as u128 {
        return Err(Error::Internal(format!("the aligner covered {n} of {} bytes", new.len())));
    }
    Ok(steps)
}

/// The chunk bytes of an alignment: for each step, the differences of its add, then its extra
/// bytes.
pub fn chunk_bytes(old: &[u8], new: &[u8], steps: &[Step]) -> Vec<u8> {
    let mut out = Vec::with_capacity(new.len());
    let (mut o, mut n) = (0usize, 0usize);
    for s in steps {
        let (add, extra) = (s.add as usize, s.extra as usize);
        out.extend(new[n..n + add].iter().zip(&old[o..o + add]).map(|(t, p)| t.wrapping_sub(*p)));
        out.extend_from_slice(&new[n + add..n + add + extra]);
        n += add + extra;
        o = (o as i64 + add as i64 + s.seek) as usize;
    }
    out
}

/// Whether coding `new` by `steps` is estimated clearly smaller than coding it as literals,
/// both compressed with `old` as zstd's reference prefix (as a chunk's prefix holds it).
pub fn worth_it(old: &[u8], new: &[u8], steps: &[Step]) -> Result<bool> {
    let literals = compressed_len(old, new)?;
    let records = steps.iter().map(|s| u64::from(s.add > 0) * ADD_RECORD_BYTES + u64::from(s.extra > 0) * LITERAL_RECORD_BYTES).sum::<u64>();
    let approximate = compressed_len(old, &chunk_bytes(old, new, steps))? + records;
    Ok((approximate as f64) < literals as f64 * KEEP_BELOW)
}

fn compressed_len(prefix: &[u8], data: &[u8]) -> Result<u64> {
    let zstd_err = |code: usize| Error::malformed("zstd compression", zstd_safe::get_error_name(code).to_string());
    let mut cctx = zstd_safe::CCtx::create();
    cctx.set_parameter(CParameter::CompressionLevel(ESTIMATE_LEVEL)).map_err(zstd_err)?;
    cctx.set_parameter(CParameter::ChecksumFlag(false)).map_err(zstd_err)?;
    cctx.ref_prefix(prefix).map_err(zstd_err)?;
    let mut frame = Vec::with_capacity(zstd_safe::compress_bound(data.len()));
    cctx.compress2(&mut frame, data).map_err(zstd_err)?;
    Ok(frame.len() as u64)
}

/// Reads the `bsdiff` crate's uncompressed patch as it is written, keeping only its steps:
/// 24-byte controls (add, extra and seek, 64-bit little-endian, the seek's sign in its top
/// bit), each followed by `add + extra` bytes that [`chunk_bytes`] computes again.
#[derive(Debug, Default)]
struct StepParser {
    control: Vec<u8>,
    skip: u64,
    steps: Vec<Step>,
}

impl Write for StepParser {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let n = buf.len();
        while !buf.is_empty() {
            if self.skip > 0 {
                let k = self.skip.min(buf.len() as u64) as usize;
                self.skip -= k as u64;
                buf = &buf[k..];
                continue;
            }
            let k = (24 - self.control.len()).min(buf.len());
            self.control.extend_from_slice(&buf[..k]);
            buf = &buf[k..];
            if self.control.len() == 24 {
                let word = |i: usize| u64::from_le_bytes(self.control[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
                let magnitude = |w: u64| (w & (u64::MAX >> 1)) as i64;
                let (add, extra, seek) = (word(0), word(1), word(2));
                let seek = if seek >> 63 == 1 { -magnitude(seek) } else { magnitude(seek) };
                self.steps.push(Step { add, extra, seek });
                self.skip = add.saturating_add(extra);
                self.control.clear();
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binary-like file: 32-bit numbers every 16 bytes, shifted by a constant in the new
    /// version (code that moved), plus a few edited bytes.
    fn pair() -> (Vec<u8>, Vec<u8>) {
        let mut old = Vec::new();
        let mut state = 0x9e37_79b9_u32;
        for i in 0..20_000u32 {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            old.extend_from_slice(&(0x40_0000 + i * 24).to_le_bytes());
            old.extend_from_slice(&state.to_le_bytes());
            old.extend_from_slice(&[0x48, 0x8b, 0x05, (i % 7) as u8, 0xe8, 0x90, 0x90, 0xc3]);
        }
        let mut new = old.clone();
        for chunk in new.chunks_mut(16) {
            let v = u32::from_le_bytes(chunk[..4].try_into().unwrap()) + 0x40;
            chunk[..4].copy_from_slice(&v.to_le_bytes());
        }
        new[1000..1010].copy_from_slice(b"v2.0.31-fd");
        new.splice(200_000..200_000, b"an inserted function body".iter().copied());
        (old, new)
    }

    #[test]
    fn an_alignment_rebuilds_the_file_and_beats_literals_on_shifted_numbers() {
        let (old, new) = pair();
        let steps = align(&old, &new).unwrap();
        let bytes = chunk_bytes(&old, &new, &steps);
        assert_eq!(bytes.len(), new.len());
        // Apply as the applier does: partner bytes plus differences, then the extra bytes.
        let (mut rebuilt, mut o, mut at) = (Vec::new(), 0usize, 0usize);
        for s in &steps {
            let (add, extra) = (s.add as usize, s.extra as usize);
            rebuilt.extend(old[o..o + add].iter().zip(&bytes[at..at + add]).map(|(p, d)| p.wrapping_add(*d)));
            rebuilt.extend_from_slice(&bytes[at + add..at + add + extra]);
            at += add + extra;
            o = (o as i64 + add as i64 + s.seek) as usize;
        }
        assert_eq!(rebuilt, new);
        assert!(worth_it(&old, &new, &steps).unwrap());
        let literal = compressed_len(&old, &new).unwrap();
        let approximate = compressed_len(&old, &bytes).unwrap();
        assert!(approximate * 4 < literal, "{approximate} bytes approximated, {literal} as literals");
    }

    #[test]
    fn unrelated_files_are_not_worth_approximating() {
        let old: Vec<u8> = (0..50_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let new: Vec<u8> = (0..50_000u32).map(|i| (i.wrapping_mul(40_503) >> 7) as u8 ^ 0x5a).collect();
        let steps = align(&old, &new).unwrap();
        assert!(!worth_it(&old, &new, &steps).unwrap());
    }

    #[test]
    fn the_parser_reads_controls_split_anywhere() {
        let mut written = Vec::new();
        let steps = [Step { add: 3, extra: 2, seek: -7 }, Step { add: 0, extra: 1, seek: 5 }];
        for s in steps {
            written.extend_from_slice(&s.add.to_le_bytes());
            written.extend_from_slice(&s.extra.to_le_bytes());
            written.extend_from_slice(&(s.seek.unsigned_abs() | if s.seek < 0 { 1 << 63 } else { 0 }).to_le_bytes());
            written.extend(std::iter::repeat_n(0xaa, (s.add + s.extra) as usize));
        }
        for split in 1..written.len() {
            let mut p = StepParser::default();
            for piece in written.chunks(split) {
                p.write_all(piece).unwrap();
            }
            assert_eq!(p.steps, steps, "split every {split} bytes");
        }
    }
}
