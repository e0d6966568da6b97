//! klauspost's level-5 match finder (`level5.go`, `fast_encoder.go`), the one
//! `DefaultCompression` selects: a 4-byte hash table plus a two-deep 7-byte hash table,
//! a "check the end of the match" refinement, and every third position hashed inside
//! matches. Offsets are `i32` positions biased by `cur`, exactly as in Go, so stale
//! entries fall out of the 32 KiB window the same way.
//!
//! The history, the two tables and their upkeep ([`FastGen`]) and the hash and match
//! helpers are shared with level 6 (`go127::level6`), whose tables are the same.

use super::tokens::{Tokens, MAX_STORE_BLOCK_SIZE};
use super::MatchFinder;
use crate::layer::exact::match_len::match_len;

const TABLE_BITS: u32 = 15;
const TABLE_SIZE: usize = 1 << TABLE_BITS;
pub(crate) const MAX_MATCH_OFFSET: i32 = 1 << 15;
pub(crate) const MAX_MATCH_LENGTH: i32 = 258;
const ALLOC_HISTORY: usize = MAX_STORE_BLOCK_SIZE * 5;
const BUFFER_RESET: i32 = i32::MAX - ALLOC_HISTORY as i32 - MAX_STORE_BLOCK_SIZE as i32 - 1;
pub(crate) const INPUT_MARGIN: i32 = 12 - 1;
pub(crate) const MIN_NON_LITERAL_BLOCK_SIZE: usize = 1 + 1 + INPUT_MARGIN as usize;

const PRIME_4_BYTES: u32 = 2_654_435_761;
const PRIME_7_BYTES: u64 = 58_295_818_150_454_627;

#[inline(always)]
pub(crate) fn hash4(u: u64) -> usize {
    ((u as u32).wrapping_mul(PRIME_4_BYTES) >> (32 - TABLE_BITS)) as usize
}

#[inline(always)]
pub(crate) fn hash7(u: u64) -> usize {
    ((u << 8).wrapping_mul(PRIME_7_BYTES) >> (64 - TABLE_BITS)) as usize
}

#[inline(always)]
pub(crate) fn load64(b: &[u8], i: i32) -> u64 {
    let i = i as usize;
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

#[inline(always)]
pub(crate) fn load32(b: &[u8], i: i32) -> u32 {
    let i = i as usize;
    u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}

/// Common prefix of `src[s..]` and `src[t..]`, at most 254 bytes (`matchlen`).
#[inline(always)]
pub(crate) fn matchlen(s: i32, t: i32, src: &[u8]) -> i32 {
    let s1 = (s as usize + MAX_MATCH_LENGTH as usize - 4).min(src.len());
    match_len(&src[s as usize..s1], &src[t as usize..]) as i32
}

/// Common prefix of `src[s..]` and `src[t..]`, unbounded (`matchlenLong`).
#[inline(always)]
pub(crate) fn matchlen_long(s: i32, t: i32, src: &[u8]) -> i32 {
    match_len(&src[s as usize..], &src[t as usize..]) as i32
}

/// A long-table entry: the last two positions with that hash (`tableEntryPrev`).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PrevEntry {
    pub(crate) cur: i32,
    pub(crate) prev: i32,
}

impl PrevEntry {
    /// Records `offset` as the newest position, keeping the previous newest.
    #[inline(always)]
    pub(crate) fn push(&mut self, offset: i32) {
        *self = PrevEntry { cur: offset, prev: self.cur };
    }
}

/// The state levels 5 and 6 keep across 64 KiB chunks of one stream: Go's `fastGen`
/// (history and `cur`) plus their 4-byte `table` and two-deep 7-byte `bTable`.
#[derive(Debug)]
pub(crate) struct FastGen {
    pub(crate) hist: Vec<u8>,
    pub(crate) cur: i32,
    pub(crate) table: Box<[i32; TABLE_SIZE]>,
    pub(crate) b_table: Box<[PrevEntry; TABLE_SIZE]>,
}

impl FastGen {
    pub(crate) fn new() -> Self {
        FastGen {
            hist: Vec::with_capacity(ALLOC_HISTORY),
            cur: MAX_STORE_BLOCK_SIZE as i32,
            table: Box::new([0; TABLE_SIZE]),
            b_table: Box::new([PrevEntry::default(); TABLE_SIZE]),
        }
    }

    /// Forgets the history: pushes `cur` past every stored offset (`fastGen.Reset`).
    pub(crate) fn reset(&mut self) {
        if self.cur <= BUFFER_RESET {
            self.cur += MAX_MATCH_OFFSET + self.hist.len() as i32;
        }
        self.hist.clear();
    }

    /// Appends `src` to the history, sliding it down when full; returns where `src` starts.
    pub(crate) fn add_block(&mut self, src: &[u8]) -> i32 {
        if self.hist.len() + src.len() > ALLOC_HISTORY {
            let offset = self.hist.len() - MAX_MATCH_OFFSET as usize;
            self.hist.copy_within(offset.., 0);
            self.hist.truncate(MAX_MATCH_OFFSET as usize);
            self.cur += offset as i32;
        }
        let s = self.hist.len() as i32;
        self.hist.extend_from_slice(src);
        s
    }

    /// Rebases offsets before `cur` would overflow (never reached below 2 GiB per stream).
    pub(crate) fn protect_wraparound(&mut self) {
        while self.cur >= BUFFER_RESET {
            if self.hist.is_empty() {
                self.table.fill(0);
                self.b_table.fill(PrevEntry::default());
                self.cur = MAX_MATCH_OFFSET;
                break;
            }
            let min_off = self.cur + self.hist.len() as i32 - MAX_MATCH_OFFSET;
            let cur = self.cur;
            for v in self.table.iter_mut() {
                *v = if *v <= min_off { 0 } else { *v - cur + MAX_MATCH_OFFSET };
            }
            for v in self.b_table.iter_mut() {
                if v.cur <= min_off {
                    *v = PrevEntry::default();
                } else {
                    v.cur = v.cur - cur + MAX_MATCH_OFFSET;
                    v.prev = if v.prev <= min_off { 0 } else { v.prev - cur + MAX_MATCH_OFFSET };
                }
            }
            self.cur = MAX_MATCH_OFFSET;
        }
    }
}

/// The level-5 encoder (`fastEncL5`).
#[derive(Debug)]
pub(crate) struct FastL5 {
    g: FastGen,
}

impl MatchFinder for FastL5 {
    fn new() -> Self {
        FastL5 { g: FastGen::new() }
    }

    fn reset(&mut self) {
        self.g.reset();
    }

    /// Finds matches in `src` (at most 64 KiB) against the history and appends tokens.
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
        'outer: loop {
            let mut next_s = s;
            let mut l: i32 = 0;
            let mut t: i32;
            loop {
                let mut next_hash_s = hash4(cv);
                let mut next_hash_l = hash7(cv);
                s = next_s;
                next_s = s + 1 + ((s - next_emit) >> 6);
                if next_s > s_limit {
                    break 'outer;
                }
                let s_candidate = table[next_hash_s];
                let mut l_candidate = b_table[next_hash_l];
                let next = load64(src, next_s);
                let entry = s + cur;
                table[next_hash_s] = entry;
                let e_long = &mut b_table[next_hash_l];
                *e_long = PrevEntry { cur: entry, prev: e_long.cur };

                next_hash_s = hash4(next);
                next_hash_l = hash7(next);

                t = l_candidate.cur - cur;
                if s - t < MAX_MATCH_OFFSET {
                    if cv as u32 == load32(src, t) {
                        table[next_hash_s] = next_s + cur;
                        let e_long = &mut b_table[next_hash_l];
                        *e_long = PrevEntry { cur: next_s + cur, prev: e_long.cur };

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
                    t = l_candidate.prev - cur;
                    if s - t < MAX_MATCH_OFFSET && cv as u32 == load32(src, t) {
                        table[next_hash_s] = next_s + cur;
                        let e_long = &mut b_table[next_hash_l];
                        *e_long = PrevEntry { cur: next_s + cur, prev: e_long.cur };
                        break;
                    }
                }

                t = s_candidate - cur;
                if s - t < MAX_MATCH_OFFSET && cv as u32 == load32(src, t) {
                    // A 4-byte match; see whether the long table offers a longer one at s+1.
                    l = matchlen(s + 4, t + 4, src) + 4;
                    l_candidate = b_table[next_hash_l];
                    table[next_hash_s] = next_s + cur;
                    let e_long = &mut b_table[next_hash_l];
                    *e_long = PrevEntry { cur: next_s + cur, prev: e_long.cur };

                    let mut t2 = l_candidate.cur - cur;
                    if next_s - t2 < MAX_MATCH_OFFSET {
                        if load32(src, t2) == next as u32 {
                            let ml = matchlen(next_s + 4, t2 + 4, src) + 4;
                            if ml > l {
                                t = t2;
                                s = next_s;
                                l = ml;
                                break;
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

            if l == 0 {
                l = matchlen_long(s + 4, t + 4, src) + 4;
            } else if l == MAX_MATCH_LENGTH {
                l += matchlen_long(s + l, t + l, src);
            }

            // Try a better match ending where this one ends, allowing 2 mismatching bytes
            // at its start (they are recovered by the backward extension).
            let s_at = s + l;
            if l < 30 && s_at < s_limit {
                const SKIP_BEGINNING: i32 = 2;
                let e_long = b_table[hash7(load64(src, s_at))].cur;
                let t2 = e_long - cur - l + SKIP_BEGINNING;
                let s2 = s + SKIP_BEGINNING;
                let off = s2 - t2;
                if t2 >= 0 && off < MAX_MATCH_OFFSET && off > 0 {
                    let l2 = matchlen_long(s2, t2, src);
                    if l2 > l {
                        t = t2;
                        l = l2;
                        s = s2;
                    }
                }
            }

            while t > 0 && s > next_emit && src[(t - 1) as usize] == src[(s - 1) as usize] {
                s -= 1;
                t -= 1;
                l += 1;
            }
            for &b in &src[next_emit as usize..s as usize] {
                dst.add_literal(b);
            }
            dst.add_match_long(l, (s - t - 1) as u32);
            s += l;
            next_emit = s;
            if next_s >= s {
                s = next_s + 1;
            }
            if s >= s_limit {
                break 'outer;
            }

            // Index every third position inside the match.
            let mut i = s - l + 1;
            if i < s - 1 {
                let mut cv = load64(src, i);
                let mut te = i + cur;
                table[hash4(cv)] = te;
                let e_long = &mut b_table[hash7(cv)];
                *e_long = PrevEntry { cur: te, prev: e_long.cur };
                cv >>= 8;
                te += 1;
                let e_long = &mut b_table[hash7(cv)];
                *e_long = PrevEntry { cur: te, prev: e_long.cur };
                cv >>= 8;
                te += 1;
                table[hash4(cv)] = te;
                i += 4;
                while i < s - 1 {
                    let cv = load64(src, i);
                    let te = i + cur;
                    let e_long = &mut b_table[hash7(cv)];
                    *e_long = PrevEntry { cur: te, prev: e_long.cur };
                    table[hash4(cv >> 8)] = te + 1;
                    i += 3;
                }
            }

            let x = load64(src, s - 1);
            let o = cur + s - 1;
            table[hash4(x)] = o;
            let e_long = &mut b_table[hash7(x)];
            *e_long = PrevEntry { cur: o, prev: e_long.cur };
            cv = x >> 8;
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
        let mut enc = FastL5::new();
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
        let mut enc = FastL5::new();
        let mut tokens = Tokens::new();
        enc.encode(&mut tokens, &random);
        assert_eq!(tokens.n, 0);
    }
}
