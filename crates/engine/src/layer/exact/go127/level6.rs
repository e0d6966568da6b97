//! Go 1.27's level-6 match finder (`compress/flate/level6.go`, `fastEncL6`), the one
//! `DefaultCompression` selects. It is klauspost/compress's `level6.go` (the same code
//! in 1.15.12, renamed), i.e. level 5 ([`FastL5`](crate::layer::exact::klauspost::level5::FastL5))
//! with three changes:
//!
//! - a slower skip over unmatched input (`skipLog` 7 instead of 6);
//! - after a 4-byte short-table match, the previous match's offset is tried one byte
//!   later ("repeat"), before the long-table candidates at the next position;
//! - the end-of-match refinement tries both entries of the long table, for any match
//!   length; and every position after a match, rather than every third, is hashed (the
//!   long table at each, the short table at every second), up to the end of the block
//!   once the search stops.
//!
//! The tables, history and helpers are level 5's ([`FastGen`]): Go 1.27's `fastGen`,
//! `tableEntryPrev`, `hashLen`, `matchLenLimited` and `matchLenLong` are klauspost's.

use crate::layer::exact::klauspost::level5::{
    hash4, hash7, load32, load64, matchlen, matchlen_long, FastGen, INPUT_MARGIN, MAX_MATCH_LENGTH, MAX_MATCH_OFFSET, MIN_NON_LITERAL_BLOCK_SIZE,
};
use crate::layer::exact::klauspost::tokens::Tokens;
use crate::layer::exact::klauspost::MatchFinder;

/// Go's `skipLog` for level 6: unmatched runs are searched at every position for the first
/// 128 bytes, then ever more sparsely.
const SKIP_LOG: u32 = 7;
/// Bytes at the start of a match the end-of-match refinement lets mismatch.
const SKIP_BEGINNING: i32 = 2;

/// The level-6 encoder (`fastEncL6`).
#[derive(Debug)]
pub(crate) struct FastL6 {
    g: FastGen,
}

impl MatchFinder for FastL6 {
    fn new() -> Self {
        FastL6 { g: FastGen::new() }
    }

    fn reset(&mut self) {
        self.g.reset();
    }

    fn encode(&mut self, dst: &mut Tokens, src: &[u8]) {
        self.g.protect_wraparound();
        let mut s = self.g.add_block(src);
        if src.len() < MIN_NON_LITERAL_BLOCK_SIZE {
            // Go records the count without tokens; callers treat this as "all literals".
            dst.n = src.len();
            return;
        }
        let FastGen { hist, cur, table, b_table } = &mut self.g;
        let cur = *cur;
        let src = &hist[..];
        let mut next_emit = s;
        let s_limit = src.len() as i32 - INPUT_MARGIN;
        let mut cv = load64(src, s);
        // The offset of the previous match ("repeat MUST be > 1 and within range").
        let mut repeat: i32 = 1;
        'outer: loop {
            let mut next_s = s;
            let mut l: i32 = 0;
            let mut t: i32;
            loop {
                let mut next_hash_s = hash4(cv);
                let mut next_hash_l = hash7(cv);
                s = next_s;
                next_s = s + 1 + ((s - next_emit) >> SKIP_LOG);
                if next_s > s_limit {
                    break 'outer;
                }
                // A short and a long candidate.
                let s_candidate = table[next_hash_s];
                let mut l_candidate = b_table[next_hash_l];
                let next = load64(src, next_s);
                let entry = s + cur;
                table[next_hash_s] = entry;
                b_table[next_hash_l].push(entry);

                next_hash_s = hash4(next);
                next_hash_l = hash7(next);

                t = l_candidate.cur - cur;
                if s - t < MAX_MATCH_OFFSET {
                    if cv as u32 == load32(src, t) {
                        // The long candidate matches at least 4 bytes; index `next_s`.
                        table[next_hash_s] = next_s + cur;
                        b_table[next_hash_l].push(next_s + cur);

                        // The previous long candidate may match longer.
                        let t2 = l_candidate.prev - cur;
                        if s - t2 < MAX_MATCH_OFFSET && cv as u32 == load32(src, t2) {
                            l = matchlen(s + 4, t + 4, src) + 4;
                            let ml1 = matchlen(s + 4, t2 + 4, src) + 4;
                            if ml1 > l {
                                t = t2;
                                l = ml1;
                                break;
                            }
                        }
                        break;
                    }
                    // The newest long candidate does not match; the previous one may.
                    t = l_candidate.prev - cur;
                    if s - t < MAX_MATCH_OFFSET && cv as u32 == load32(src, t) {
                        table[next_hash_s] = next_s + cur;
                        b_table[next_hash_l].push(next_s + cur);
                        break;
                    }
                }

                t = s_candidate - cur;
                if s - t < MAX_MATCH_OFFSET && cv as u32 == load32(src, t) {
                    // A 4-byte match.
                    l = matchlen(s + 4, t + 4, src) + 4;

                    // The long candidates at `next_s`, read before indexing it.
                    l_candidate = b_table[next_hash_l];
                    table[next_hash_s] = next_s + cur;
                    b_table[next_hash_l].push(next_s + cur);

                    // The previous match's offset, one byte on (`repOff` 1).
                    let t2 = s - repeat + 1;
                    if load32(src, t2) == (cv >> 8) as u32 {
                        let ml = matchlen(s + 4 + 1, t2 + 4, src) + 4;
                        if ml > l {
                            t = t2;
                            l = ml;
                            s += 1;
                            break;
                        }
                    }

                    // A longer match from the long table at `next_s`?
                    let mut t2 = l_candidate.cur - cur;
                    if next_s - t2 < MAX_MATCH_OFFSET {
                        if load32(src, t2) == next as u32 {
                            let ml = matchlen(next_s + 4, t2 + 4, src) + 4;
                            if ml > l {
                                t = t2;
                                s = next_s;
                                l = ml;
                                // Still check the previous entry.
                            }
                        }
                        t2 = l_candidate.prev - cur;
                        if next_s - t2 < MAX_MATCH_OFFSET && load32(src, t2) == next as u32 {
                            let ml = matchlen(next_s + 4, t2 + 4, src) + 4;
                            if ml > l {
                                t = t2;
                                s = next_s;
                                l = ml;
                                break;
                            }
                        }
                    }
                    break;
                }
                cv = next;
            }

            // Extend the match as far as it goes.
            if l == 0 {
                l = matchlen_long(s + 4, t + 4, src) + 4;
            } else if l == MAX_MATCH_LENGTH {
                l += matchlen_long(s + l, t + l, src);
            }

            // A better match ending where this one ends, allowing 2 mismatching bytes at
            // its start (recovered by the backward extension if they match after all).
            let s_at = s + l;
            if s_at < s_limit {
                let e_long = b_table[hash7(load64(src, s_at))];
                let mut t2 = e_long.cur - cur - l + SKIP_BEGINNING;
                let s2 = s + SKIP_BEGINNING;
                let off = s2 - t2;
                if off < MAX_MATCH_OFFSET {
                    if off > 0 && t2 >= 0 {
                        let l2 = matchlen_long(s2, t2, src);
                        if l2 > l {
                            t = t2;
                            l = l2;
                            s = s2;
                        }
                    }
                    // The previous entry, measured against the (possibly new) length.
                    t2 = e_long.prev - cur - l + SKIP_BEGINNING;
                    let off = s2 - t2;
                    if off > 0 && off < MAX_MATCH_OFFSET && t2 >= 0 {
                        let l2 = matchlen_long(s2, t2, src);
                        if l2 > l {
                            t = t2;
                            l = l2;
                            s = s2;
                        }
                    }
                }
            }

            // Extend backwards.
            while t > 0 && s > next_emit && src[(t - 1) as usize] == src[(s - 1) as usize] {
                s -= 1;
                t -= 1;
                l += 1;
            }
            for &b in &src[next_emit as usize..s as usize] {
                dst.add_literal(b);
            }
            dst.add_match_long(l, (s - t - 1) as u32);
            repeat = s - t;
            s += l;
            next_emit = s;
            if next_s >= s {
                s = next_s + 1;
            }

            if s >= s_limit {
                // Index everything after the match up to the end of the block.
                let mut i = next_s + 1;
                while i < src.len() as i32 - 8 {
                    let cv = load64(src, i);
                    table[hash4(cv)] = i + cur;
                    b_table[hash7(cv)].push(i + cur);
                    i += 2;
                }
                break 'outer;
            }

            // Every long hash in between, and every second short one.
            let mut i = next_s + 1;
            while i < s - 1 {
                let cv = load64(src, i);
                let te = i + cur;
                let h_long = hash7(cv);
                let h_long2 = hash7(cv >> 8);
                table[hash4(cv)] = te;
                // In this order: both may be the same entry.
                b_table[h_long].push(te);
                b_table[h_long2].push(te + 1);
                i += 2;
            }
            cv = load64(src, s);
        }

        if (next_emit as usize) < src.len() {
            // A chunk with no match at all stays token-less: the caller stores it.
            if dst.n == 0 {
                return;
            }
            for &b in &src[next_emit as usize..] {
                dst.add_literal(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_text_yields_matches_and_random_bytes_none() {
        let mut enc = FastL6::new();
        let mut tokens = Tokens::new();
        let text: Vec<u8> = b"hello world, hello world, hello world! ".repeat(100);
        enc.encode(&mut tokens, &text);
        assert!(tokens.n > 0 && tokens.n < text.len() / 4);
        let mut x = 0x1234_5678u32;
        let random: Vec<u8> = (0..4000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let mut enc = FastL6::new();
        let mut tokens = Tokens::new();
        enc.encode(&mut tokens, &random);
        assert_eq!(tokens.n, 0);
    }

    #[test]
    fn a_repeated_offset_is_found_one_byte_on() {
        // "abcd" then a run coded at distance 1 after a literal: the repeat check must
        // keep every match within the window and the tokens must decode to the input.
        let mut data = b"0123456789abcdefghij".to_vec();
        data.extend(std::iter::repeat_n(b'z', 300));
        data.extend_from_slice(b"0123456789abcdefghij");
        let mut enc = FastL6::new();
        let mut tokens = Tokens::new();
        enc.encode(&mut tokens, &data);
        let mut out: Vec<u8> = Vec::new();
        for &t in &tokens.tokens {
            if t < crate::layer::exact::klauspost::tokens::MATCH_TYPE {
                out.push(t as u8);
            } else {
                let len = ((t >> 22) & 255) as usize + 3;
                let off = (t & 0xffff) as usize + 1;
                for _ in 0..len {
                    out.push(out[out.len() - off]);
                }
            }
        }
        assert_eq!(out, data);
    }
}
