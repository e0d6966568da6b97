//! How many bytes of a chunk's zstd frame each piece of the chunk costs, estimated.
//!
//! A frame cannot be cut into the bytes each piece of its contents costs: zstd's blocks and
//! entropy tables span pieces. The estimate compresses the chunk again, with the same
//! reference prefix and the differ's settings, in streaming mode with a flush
//! (`ZSTD_e_flush`) at the end of each piece, and counts the bytes each flush writes.
//!
//! A flush ends a block, which costs bytes of its own (a block header, section headers, a
//! match cut in two): about 13 bytes per flush on a chunk of small text files, as much as a
//! tar header that differs from its partner in its mtime costs in the real frame. So the
//! chunk is also compressed once without flushes (which gives back the real frame when the
//! settings are the differ's), and the average cost of a flush, what the flushed
//! compression writes beyond that per flush, is taken off each piece's count (down to 0).
//! What is left, scaled so that it sums to the real frame's length, is the pieces' costs.

use zstd::zstd_safe::{self, zstd_sys::ZSTD_EndDirective, InBuffer, OutBuffer};

use crate::diff::encode::chunk_compressor;
use crate::error::{Error, Result};

/// Output buffer of the recompression, drained after every call.
const OUTPUT_BUFFER_BYTES: usize = 128 << 10;

/// Fractions of a byte the pieces' counts keep once a flush's average cost is taken off.
const WEIGHT_UNITS_PER_BYTE: f64 = 1024.0;

/// The estimated cost of each of `pieces` (lengths summing to `chunk.len()`) in a frame of
/// `frame_len` bytes that compressed `chunk` against `prefix`, recompressing at zstd `level`.
/// The costs sum to `frame_len`; an empty piece costs 0.
pub fn piece_costs(prefix: &[u8], chunk: &[u8], pieces: &[usize], frame_len: u64, level: i32) -> Result<Vec<u64>> {
    if pieces.iter().sum::<usize>() != chunk.len() {
        return Err(Error::Internal(format!("chunk pieces of {} bytes for a chunk of {}", pieces.iter().sum::<usize>(), chunk.len())));
    }
    let flushed = recompress(prefix, chunk, pieces, level)?;
    let flushes = pieces.iter().filter(|n| **n > 0).count();
    let mut weights = Vec::new();
    if flushes > 1 {
        let whole = recompress(prefix, chunk, &[chunk.len()], level)?[0];
        let per_flush = flushed.iter().sum::<u64>().saturating_sub(whole) as f64 / (flushes - 1) as f64;
        weights = flushed.iter().map(|n| ((*n as f64 - per_flush).max(0.0) * WEIGHT_UNITS_PER_BYTE).round() as u64).collect();
    }
    // Should nothing be left (every piece as cheap as a flush), the counts themselves; should
    // they be 0 too (they never are: every flush ends a block), the pieces' lengths.
    for fallback in [flushed, pieces.iter().map(|n| *n as u64).collect()] {
        if weights.iter().sum::<u64>() > 0 {
            break;
        }
        weights = fallback;
    }
    Ok(apportion(frame_len, &weights))
}

/// The bytes each flush writes when `chunk` is compressed against `prefix` and flushed at the
/// end of each piece (the frame header counts with the first piece; the frame's end is left
/// out).
fn recompress(prefix: &[u8], chunk: &[u8], pieces: &[usize], level: i32) -> Result<Vec<u64>> {
    let zstd_err = |code: usize| Error::malformed("recompressing a patch chunk", zstd_safe::get_error_name(code).to_string());
    // The differ's settings for a chunk.
    let mut cctx = chunk_compressor(prefix, chunk.len(), level, "recompressing a patch chunk")?;
    cctx.set_pledged_src_size(Some(chunk.len() as u64)).map_err(zstd_err)?;
    let mut buffer = vec![0u8; OUTPUT_BUFFER_BYTES];
    let mut run = |input: &[u8], directive: ZSTD_EndDirective| -> Result<u64> {
        let mut input = InBuffer::around(input);
        let mut written = 0u64;
        loop {
            let mut output = OutBuffer::around(&mut buffer[..]);
            let left = cctx.compress_stream2(&mut output, &mut input, directive).map_err(zstd_err)?;
            written += output.pos() as u64;
            if left == 0 && input.pos() == input.src.len() {
                return Ok(written);
            }
        }
    };
    let mut flushed = Vec::with_capacity(pieces.len());
    let mut at = 0;
    for &n in pieces {
        flushed.push(if n == 0 { 0 } else { run(&chunk[at..at + n], ZSTD_EndDirective::ZSTD_e_flush)? });
        at += n;
    }
    run(&[], ZSTD_EndDirective::ZSTD_e_end)?;
    Ok(flushed)
}

/// `total` split in proportion to `weights` (not all 0), in whole bytes that sum to it: each
/// share rounded down, the bytes left over going to the largest remainders (the earliest
/// first among equals). A weight of 0 gets 0.
pub(super) fn apportion(total: u64, weights: &[u64]) -> Vec<u64> {
    let sum: u128 = weights.iter().map(|w| u128::from(*w)).sum();
    if sum == 0 {
        return vec![0; weights.len()];
    }
    let exact: Vec<(u64, u128)> = weights
        .iter()
        .map(|w| {
            let scaled = u128::from(total) * u128::from(*w);
            ((scaled / sum) as u64, scaled % sum)
        })
        .collect();
    let mut shares: Vec<u64> = exact.iter().map(|(s, _)| *s).collect();
    let left = total - shares.iter().sum::<u64>();
    let mut order: Vec<usize> = (0..weights.len()).filter(|i| weights[*i] > 0).collect();
    order.sort_by(|a, b| exact[*b].1.cmp(&exact[*a].1).then(a.cmp(b)));
    for i in order.into_iter().take(left as usize) {
        shares[i] += 1;
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_bytes::noise;

    /// What the differ writes for `chunk` against `prefix`.
    fn frame(prefix: &[u8], chunk: &[u8], level: i32) -> Vec<u8> {
        let mut cctx = chunk_compressor(prefix, chunk.len(), level, "a test chunk").unwrap();
        let mut out = Vec::with_capacity(zstd_safe::compress_bound(chunk.len()));
        cctx.compress2(&mut out, chunk).unwrap();
        out
    }

    #[test]
    fn costs_sum_to_the_frame_and_unique_bytes_cost_more_than_bytes_the_prefix_holds() {
        // Two files whose partners are in the prefix: the first came back unchanged, the
        // second was rewritten with bytes found nowhere.
        let (partner_a, partner_b) = (noise(1, 20_000), noise(2, 20_000));
        let prefix = [partner_a.clone(), partner_b].concat();
        let new_b = noise(3, 20_000);
        let chunk = [partner_a, new_b].concat();
        for level in [3, 12, 19] {
            let frame = frame(&prefix, &chunk, level);
            let costs = piece_costs(&prefix, &chunk, &[20_000, 20_000], frame.len() as u64, level).unwrap();
            assert_eq!(costs.iter().sum::<u64>(), frame.len() as u64, "level {level}");
            assert!(costs[0] < 200, "level {level}: a copy of the prefix costs a few sequences: {costs:?}");
            assert!(costs[1] > 19_000, "level {level}: new noise costs its length: {costs:?}");
        }
    }

    #[test]
    fn what_a_flush_costs_is_not_charged_to_small_pieces() {
        // 300 tar-header-sized pieces found as they are in the prefix, then one of noise:
        // flushed one by one, the small pieces would cost 10 bytes or more each.
        let partners = noise(7, 300 * 512);
        let fresh = noise(8, 20_000);
        let chunk = [partners.clone(), fresh].concat();
        let mut pieces = vec![512; 300];
        pieces.push(20_000);
        let frame = frame(&partners, &chunk, 12);
        let costs = piece_costs(&partners, &chunk, &pieces, frame.len() as u64, 12).unwrap();
        let small: u64 = costs[..300].iter().sum();
        assert!(small < frame.len() as u64 / 50, "{small} of {} for the pieces the prefix holds", frame.len());
        assert_eq!(costs.iter().sum::<u64>(), frame.len() as u64);
    }

    #[test]
    fn empty_pieces_cost_nothing_and_the_pieces_must_cover_the_chunk() {
        let chunk = noise(5, 3000);
        let costs = piece_costs(&[], &chunk, &[0, 1000, 0, 2000, 0], 2500, 3).unwrap();
        assert_eq!(costs.iter().sum::<u64>(), 2500);
        assert_eq!((costs[0], costs[2], costs[4]), (0, 0, 0));
        assert!(costs[3] > costs[1], "{costs:?}");
        assert!(piece_costs(&[], &chunk, &[1000], 2500, 3).is_err());
    }

    #[test]
    fn apportioning_rounds_to_whole_bytes_that_sum_to_the_total() {
        assert_eq!(apportion(10, &[1, 1, 1]), [4, 3, 3]);
        assert_eq!(apportion(10, &[0, 5, 0, 5]), [0, 5, 0, 5]);
        assert_eq!(apportion(7, &[1, 2, 4]), [1, 2, 4]);
        assert_eq!(apportion(0, &[3, 4]), [0, 0]);
        assert_eq!(apportion(5, &[0, 0]), [0, 0]);
        assert_eq!(apportion(100, &[3, 1]).iter().sum::<u64>(), 100);
        assert_eq!(apportion(u64::MAX, &[u64::MAX, u64::MAX]).iter().sum::<u64>(), u64::MAX);
    }
}
