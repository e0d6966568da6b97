//! Approximate matches, bsdiff's idea: a file edited in scattered places (version strings, a
//! few functions, addresses shifted by a constant) is coded as regions of its partner plus
//! byte differences, mostly zeros, and the bytes between those regions. The differences and
//! the bytes between go into a chunk like literals (`ADD` and `LITERAL` records, feature
//! [`crate::format::plan::FEATURE_ADD_RANGES`]), where zstd makes the runs of zeros nearly
//! free; a byte matcher pays a sequence for every scattered edit instead.
//!
//! The alignment is Colin Percival's (bsdiff's): a suffix array of the partner, exact matches
//! found by binary search in it and extended while at least half their bytes agree. The
//! suffix array comes from libsais (4 bytes per partner byte, several times faster than
//! bsdiff's own qsufsort at 16 bytes per byte), and the target is scanned in independent
//! partitions on rayon's pool. It is tried per similar binary file ([`is_binary`]), and kept
//! only when its estimated size beats the file's literals against the same partner. A wrong alignment can only cost
//! size, never correctness: every step is checked to stay inside both files, and the applier
//! verifies what it rebuilds.

use std::ops::Range;

use libsais::SuffixArrayConstruction;
use rayon::prelude::*;
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
/// Level 3 would be three times faster, but it favours alignments that the real levels code
/// worse than literals (pip-patch's Cython modules: +12% at default, +13% at max).
const ESTIMATE_LEVEL: i32 = 9;

/// An alignment is kept when it is estimated at most this fraction of the literals' size. A
/// margin for the literals' profit from their neighbours in a chunk (0.9) cost more than it
/// saved: the differences are coded by LZMA, which a zstd estimate underrates (the code view
/// of a generated C program: estimated 10.7 kB against 10.9 kB of literals, coded 11.4 kB
/// against 14.5 kB), and no corpus pair came out bigger without it.
const KEEP_BELOW: f64 = 1.0;

/// The target is scanned in partitions of this many bytes, in parallel; each boundary costs at
/// most one more step.
const PARTITION_BYTES: usize = 1 << 20;

/// bsdiff's alignment of `new` against `old`, checked to stay inside both.
pub fn align(old: &[u8], new: &[u8]) -> Result<Vec<Step>> {
    let pieces: Vec<Piece> = if old.is_empty() {
        vec![Piece { old_at: 0, add: 0, extra: new.len() }]
    } else {
        let index = SuffixIndex::new(old)?;
        let bounds: Vec<Range<usize>> = (0..new.len()).step_by(PARTITION_BYTES).map(|s| s..(s + PARTITION_BYTES).min(new.len())).collect();
        let parts: Vec<Vec<Piece>> = bounds.into_par_iter().with_max_len(1).map(|range| scan(&index, new, range)).collect();
        parts.into_iter().flatten().collect()
    };
    let steps: Vec<Step> = pieces
        .iter()
        .enumerate()
        .map(|(k, p)| {
            let next = pieces.get(k + 1).map_or((p.old_at + p.add) as i64, |n| n.old_at as i64);
            Step { add: p.add as u64, extra: p.extra as u64, seek: next - (p.old_at + p.add) as i64 }
        })
        .collect();
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

/// One step of a partition's alignment, with the partner position absolute: `add` bytes of the
/// partner from `old_at` plus differences, then `extra` target bytes.
#[derive(Clone, Copy, Debug)]
struct Piece {
    old_at: usize,
    add: usize,
    extra: usize,
}

/// The suffix array of the partner, with the range of suffixes for each two-byte prefix so a
/// search starts in its bucket.
struct SuffixIndex<'a> {
    old: &'a [u8],
    suffixes: Vec<i32>,
    /// `buckets[k]..buckets[k + 1]`: the suffixes whose first two bytes are `k` (a one-byte
    /// suffix counts as followed by 0, which is where it sorts).
    buckets: Vec<u32>,
}

impl<'a> SuffixIndex<'a> {
    fn new(old: &'a [u8]) -> Result<Self> {
        if old.len() > libsais::LIBSAIS_I32_OUTPUT_MAXIMUM_SIZE {
            return Err(Error::Internal(format!("a partner of {} bytes is too large to align", old.len())));
        }
        let suffixes = SuffixArrayConstruction::for_text(old)
            .in_owned_buffer32()
            .single_threaded()
            .run()
            .map_err(|e| Error::Internal(format!("building the suffix array of a partner: {e:?}")))?
            .into_vec();
        let mut buckets = vec![0u32; (1 << 16) + 1];
        for &p in &suffixes {
            buckets[prefix2(&old[p as usize..]) + 1] += 1;
        }
        for k in 1..buckets.len() {
            buckets[k] += buckets[k - 1];
        }
        Ok(SuffixIndex { old, suffixes, buckets })
    }

    fn suffix(&self, i: usize) -> &'a [u8] {
        &self.old[self.suffixes[i] as usize..]
    }

    /// The partner position of a longest match of a prefix of `new`, and its length: a binary
    /// search in the bucket of `new`'s first two bytes (the whole array when it is empty).
    /// Its time is the cache misses of the search, not the comparisons: skipping the prefix
    /// both bounds share with `new` made it slower on a 33 MB executable.
    fn search(&self, new: &[u8]) -> (usize, usize) {
        let (mut lo, mut hi) = (0, self.suffixes.len() - 1);
        if new.len() >= 2 {
            let k = prefix2(new);
            let (a, b) = (self.buckets[k] as usize, self.buckets[k + 1] as usize);
            if b > a {
                (lo, hi) = (a, b - 1);
            }
        }
        while hi - lo >= 2 {
            let mid = lo + (hi - lo) / 2;
            let s = self.suffix(mid);
            let n = s.len().min(new.len());
            if s[..n] < new[..n] {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let (lo_len, hi_len) = (common_prefix(self.suffix(lo), new), common_prefix(self.suffix(hi), new));
        if lo_len > hi_len {
            (self.suffixes[lo] as usize, lo_len)
        } else {
            (self.suffixes[hi] as usize, hi_len)
        }
    }
}

/// The first two bytes of `s` as a bucket number (a missing second byte as 0).
fn prefix2(s: &[u8]) -> usize {
    (usize::from(s[0]) << 8) | usize::from(s.get(1).copied().unwrap_or(0))
}

/// How many leading bytes `a` and `b` share, eight at a time.
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= n {
        let x = u64::from_le_bytes(a[i..i + 8].try_into().expect("8 bytes")) ^ u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if x != 0 {
            return i + (x.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

/// bsdiff's scan over `new[range]`: from each position, the longest match in the partner; a
/// match is taken when it beats continuing the current alignment by more than 8 bytes. Between
/// two matches, the previous one is extended forwards and the next backwards while at least
/// half their bytes agree, and what is left between them is extra.
fn scan(index: &SuffixIndex<'_>, new: &[u8], range: Range<usize>) -> Vec<Piece> {
    let old = index.old;
    let end = range.end;
    let mut pieces = Vec::new();
    let (mut at, mut len, mut pos) = (range.start, 0usize, 0usize);
    let (mut last_at, mut last_pos, mut last_offset) = (range.start, 0usize, 0isize);
    // The partner byte the current alignment pairs with target byte `n`, if there is one.
    let aligned = |n: usize, offset: isize| -> bool {
        let o = n as isize + offset;
        o >= 0 && (o as usize) < old.len() && old[o as usize] == new[n]
    };
    while at < end {
        let mut old_score = 0usize;
        at += len;
        let mut scored = at;
        while at < end {
            (pos, len) = index.search(&new[at..end]);
            while scored < at + len {
                old_score += usize::from(aligned(scored, last_offset));
                scored += 1;
            }
            if (len == old_score && len != 0) || len > old_score + 8 {
                break;
            }
            old_score -= usize::from(aligned(at, last_offset));
            at += 1;
        }
        if len == old_score && at != end {
            continue;
        }
        // Forwards from the last match, backwards from this one.
        let (mut agree, mut best, mut forward) = (0isize, 0isize, 0usize);
        let mut i = 0;
        while last_at + i < at && last_pos + i < old.len() {
            agree += isize::from(old[last_pos + i] == new[last_at + i]);
            i += 1;
            if agree * 2 - i as isize > best * 2 - forward as isize {
                (best, forward) = (agree, i);
            }
        }
        let mut backward = 0usize;
        if at < end {
            let (mut agree, mut best) = (0isize, 0isize);
            let mut i = 1;
            while at >= last_at + i && pos >= i {
                agree += isize::from(old[pos - i] == new[at - i]);
                if agree * 2 - i as isize > best * 2 - backward as isize {
                    (best, backward) = (agree, i);
                }
                i += 1;
            }
        }
        if last_at + forward > at - backward {
            // The two extensions overlap: split where the most bytes agree.
            let overlap = last_at + forward - (at - backward);
            let (mut agree, mut best, mut split) = (0isize, 0isize, 0usize);
            for i in 0..overlap {
                agree += isize::from(new[last_at + forward - overlap + i] == old[last_pos + forward - overlap + i]);
                agree -= isize::from(new[at - backward + i] == old[pos - backward + i]);
                if agree > best {
                    (best, split) = (agree, i + 1);
                }
            }
            forward = forward + split - overlap;
            backward -= split;
        }
        pieces.push(Piece { old_at: last_pos, add: forward, extra: at - backward - (last_at + forward) });
        (last_at, last_pos, last_offset) = (at - backward, pos - backward, pos as isize - at as isize);
    }
    // Not empty: the last pass of the loop reaches `end`, and a pass that reaches it pushes.
    pieces
}

/// Whether `data` is binary (holds a NUL byte): executables, libraries, compiled modules. Text
/// (sources, scripts, bundles) has none, and zstd against the partner codes its inserted and
/// deleted lines better than an alignment does.
pub fn is_binary(data: &[u8]) -> bool {
    data.contains(&0)
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

/// bsdiff's alignment of `new` against `old`, when coding `new` by it is estimated smaller
/// than coding it as literals, both compressed with `old` as zstd's reference prefix (as a
/// chunk's prefix holds it); `None` otherwise. The literals' estimate is made while the
/// alignment runs: building the partner's suffix array takes one thread, and on a large
/// executable it is the longest serial step of the differ (go-cli-amd64's default diff
/// left a core idle for a third of its time).
pub fn align_if_smaller(old: &[u8], new: &[u8]) -> Result<Option<Vec<Step>>> {
    let (steps, literals) = rayon::join(|| align(old, new), || compressed_len(old, new, ESTIMATE_LEVEL, false));
    let steps = steps?;
    let approximate = approximate_len(old, new, &steps)?;
    Ok(((approximate as f64) < literals? as f64 * KEEP_BELOW).then_some(steps))
}

/// The estimated size of coding `new` by `steps`: its chunk bytes compressed against `old`,
/// plus its records.
fn approximate_len(old: &[u8], new: &[u8], steps: &[Step]) -> Result<u64> {
    let records = steps.iter().map(|s| u64::from(s.add > 0) * ADD_RECORD_BYTES + u64::from(s.extra > 0) * LITERAL_RECORD_BYTES).sum::<u64>();
    Ok(compressed_len(old, &chunk_bytes(old, new, steps), ESTIMATE_LEVEL, false)? + records)
}

/// How many bytes zstd at `level` compresses `data` to, with `prefix` as its reference
/// prefix: the differ's estimate of what coding `data` against `prefix` costs. With
/// `whole_prefix`, the window spans the prefix and the data (up to 2^27 bytes) and long matches
/// are searched all over it, so that a fast level still finds what the data shares with the
/// prefix.
pub fn compressed_len(prefix: &[u8], data: &[u8], level: i32, whole_prefix: bool) -> Result<u64> {
    let zstd_err = |code: usize| Error::malformed("zstd compression", zstd_safe::get_error_name(code).to_string());
    let mut cctx = zstd_safe::CCtx::create();
    cctx.set_parameter(CParameter::CompressionLevel(level)).map_err(zstd_err)?;
    if whole_prefix {
        let span = (prefix.len() + data.len()).max(1 << 10);
        cctx.set_parameter(CParameter::WindowLog(span.next_power_of_two().trailing_zeros().min(27))).map_err(zstd_err)?;
        cctx.set_parameter(CParameter::EnableLongDistanceMatching(true)).map_err(zstd_err)?;
    }
    cctx.set_parameter(CParameter::ChecksumFlag(false)).map_err(zstd_err)?;
    cctx.ref_prefix(prefix).map_err(zstd_err)?;
    let mut frame = Vec::with_capacity(zstd_safe::compress_bound(data.len()));
    cctx.compress2(&mut frame, data).map_err(zstd_err)?;
    Ok(frame.len() as u64)
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
        assert_eq!(rebuild(&old, &new, &steps), new);
        assert_eq!(align_if_smaller(&old, &new).unwrap().as_deref(), Some(&steps[..]), "kept, as aligned");
        let literal = compressed_len(&old, &new, ESTIMATE_LEVEL, false).unwrap();
        let approximate = compressed_len(&old, &bytes, ESTIMATE_LEVEL, false).unwrap();
        assert!(approximate * 4 < literal, "{approximate} bytes approximated, {literal} as literals");
    }

    #[test]
    fn unrelated_files_are_not_worth_approximating() {
        let old: Vec<u8> = (0..50_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let new: Vec<u8> = (0..50_000u32).map(|i| (i.wrapping_mul(40_503) >> 7) as u8 ^ 0x5a).collect();
        assert_eq!(align_if_smaller(&old, &new).unwrap(), None);
    }

    /// Rebuilds `new` from `old` and an alignment as the applier does.
    fn rebuild(old: &[u8], new: &[u8], steps: &[Step]) -> Vec<u8> {
        let bytes = chunk_bytes(old, new, steps);
        let (mut rebuilt, mut o, mut at) = (Vec::new(), 0usize, 0usize);
        for s in steps {
            let (add, extra) = (s.add as usize, s.extra as usize);
            rebuilt.extend(old[o..o + add].iter().zip(&bytes[at..at + add]).map(|(p, d)| p.wrapping_add(*d)));
            rebuilt.extend_from_slice(&bytes[at + add..at + add + extra]);
            at += add + extra;
            o = (o as i64 + add as i64 + s.seek) as usize;
        }
        rebuilt
    }

    #[test]
    fn the_suffix_search_finds_a_longest_match() {
        let mut state = 7u32;
        let mut byte = || {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            b"abcab\0"[(state >> 16) as usize % 6]
        };
        let old: Vec<u8> = (0..3000).map(|_| byte()).collect();
        let index = SuffixIndex::new(&old).unwrap();
        for start in 0..200 {
            let new: Vec<u8> = (0..40).map(|_| byte()).chain(old[start * 7..start * 7 + 5].iter().copied()).skip(start % 41).collect();
            let longest = (0..old.len()).map(|p| common_prefix(&old[p..], &new)).max().unwrap();
            let (pos, len) = index.search(&new);
            assert_eq!(len, longest, "search from {new:?}");
            assert_eq!(common_prefix(&old[pos..], &new), len);
        }
        // One-byte targets and suffixes, and a byte the partner lacks.
        assert_eq!(index.search(b"a").1, 1);
        assert_eq!(index.search(b"z").1, 0);
    }

    #[test]
    fn a_target_scanned_in_several_partitions_is_rebuilt_whole() {
        let (old, mut new) = pair();
        while new.len() < 2 * PARTITION_BYTES + 12_345 {
            new.extend_from_within(..old.len().min(2 * PARTITION_BYTES + 12_345 - new.len()));
        }
        let steps = align(&old, &new).unwrap();
        assert_eq!(rebuild(&old, &new, &steps), new);
        // The partitions' boundaries do not break the alignment: nearly every byte is an add.
        let added: u64 = steps.iter().map(|s| s.add).sum();
        assert!(added as f64 > 0.99 * new.len() as f64, "{added} of {} bytes added", new.len());
    }

    #[test]
    fn an_empty_partner_or_target_still_aligns() {
        let new = b"nothing to match against".to_vec();
        assert_eq!(rebuild(&[], &new, &align(&[], &new).unwrap()), new);
        assert_eq!(align(b"some partner", &[]).unwrap(), Vec::new());
        assert_eq!(rebuild(b"x", b"xxxxxy", &align(b"x", b"xxxxxy").unwrap()), b"xxxxxy");
    }

    #[test]
    fn only_binary_contents_are_aligned() {
        assert!(is_binary(b"\x7fELF\x02\x01\x01\x00\x00"));
        assert!(!is_binary(b"export const version = '4.2.1';\n"));
        assert!(!is_binary(&[]));
    }
}
