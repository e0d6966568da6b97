//! Go's length-limited Huffman code construction (`compress/flate/huffman_code.go`).
//!
//! The standard library and klauspost/compress share this algorithm: symbols sorted by
//! (frequency, symbol), the package-merge style `bitCounts` that limits lengths to
//! `max_bits`, then canonical codes assigned in symbol order within each length. Because
//! the sort key is a total order, any correct sort reproduces Go's tie-breaking.

/// One code: `bits` already bit-reversed for LSB-first output, `len` in bits (0 = unused).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Code {
    pub(crate) bits: u16,
    pub(crate) len: u8,
}

/// A symbol and its frequency, as in Go's `literalNode`.
#[derive(Clone, Copy, Debug)]
struct Node {
    symbol: u16,
    freq: i32,
}

/// The per-depth state of Go's `bitCounts`.
#[derive(Clone, Copy, Debug, Default)]
struct LevelInfo {
    last_freq: i32,
    next_char_freq: i32,
    next_pair_freq: i32,
    needed: i32,
}

/// Largest code length `bitCounts` supports (Go's `maxBitsLimit`).
const MAX_BITS_LIMIT: usize = 16;

/// A Huffman code table over `codes.len()` symbols.
#[derive(Clone, Debug)]
pub(crate) struct HuffmanEncoder {
    pub(crate) codes: Vec<Code>,
    list: Vec<Node>,
}

/// Reverses the low `len` bits of `code`.
pub(crate) fn reverse_bits(code: u16, len: u8) -> u16 {
    (code << ((16 - u32::from(len)) & 15)).reverse_bits()
}

impl HuffmanEncoder {
    /// A table of `size` symbols, all unused.
    pub(crate) fn new(size: usize) -> Self {
        HuffmanEncoder { codes: vec![Code::default(); size], list: Vec::with_capacity(size + 1) }
    }

    /// DEFLATE's fixed literal/length code (RFC 1951 3.2.6).
    pub(crate) fn fixed_literal() -> Self {
        let mut h = Self::new(286);
        for (ch, code) in h.codes.iter_mut().enumerate() {
            let ch = ch as u16;
            let (bits, len) = match ch {
                0..=143 => (ch + 48, 8),
                144..=255 => (ch + 400 - 144, 9),
                256..=279 => (ch - 256, 7),
                _ => (ch + 192 - 280, 8),
            };
            *code = Code { bits: reverse_bits(bits, len), len };
        }
        h
    }

    /// DEFLATE's fixed distance code: 30 five-bit codes.
    pub(crate) fn fixed_offset() -> Self {
        let mut h = Self::new(30);
        for (ch, code) in h.codes.iter_mut().enumerate() {
            *code = Code { bits: reverse_bits(ch as u16, 5), len: 5 };
        }
        h
    }

    /// Total bits to code `freq` with this table (Go's `bitLength`).
    pub(crate) fn bit_length<F: Copy + Into<u32>>(&self, freq: &[F]) -> i64 {
        freq.iter().zip(&self.codes).map(|(&f, c)| i64::from(f.into()) * i64::from(c.len)).sum()
    }

    /// Like [`bit_length`](Self::bit_length) but `None` when a used symbol has no code
    /// (klauspost's `canReuseBits`).
    pub(crate) fn can_reuse_bits(&self, freq: &[u16]) -> Option<i64> {
        let mut total = 0i64;
        for (&f, c) in freq.iter().zip(&self.codes) {
            if f != 0 {
                if c.len == 0 && c.bits == 0 {
                    return None;
                }
                total += i64::from(f) * i64::from(c.len);
            }
        }
        Some(total)
    }

    /// Rebuilds the table for the first `freq.len()` symbols, lengths at most `max_bits`
    /// (Go's `generate`). Symbols past `freq.len()` keep their codes, as in Go.
    pub(crate) fn generate<F: Copy + Into<u32>>(&mut self, freq: &[F], max_bits: i32) {
        self.list.clear();
        for (i, &f) in freq.iter().enumerate() {
            let f: u32 = f.into();
            if f != 0 {
                self.list.push(Node { symbol: i as u16, freq: f as i32 });
            } else {
                self.codes[i] = Code::default();
            }
        }
        if self.list.len() <= 2 {
            // Go gives one or two symbols one-bit codes 0 and 1, in symbol order.
            for (i, node) in self.list.iter().enumerate() {
                self.codes[usize::from(node.symbol)] = Code { bits: i as u16, len: 1 };
            }
            return;
        }
        self.list.sort_unstable_by_key(|n| (n.freq, n.symbol));
        let (bit_count, max_bits) = bit_counts(&self.list, max_bits);
        self.assign(&bit_count[..=max_bits]);
    }

    /// Go's `assignEncodingAndSize`: the least frequent symbols get the longest codes,
    /// codes within one length assigned in symbol order.
    fn assign(&mut self, bit_count: &[i32]) {
        let mut code: u16 = 0;
        let mut end = self.list.len();
        for (n, &bits) in bit_count.iter().enumerate() {
            code = code.wrapping_shl(1);
            if n == 0 || bits == 0 {
                continue;
            }
            let start = end - bits as usize;
            let chunk = &mut self.list[start..end];
            chunk.sort_unstable_by_key(|n| n.symbol);
            for node in chunk.iter() {
                self.codes[usize::from(node.symbol)] = Code { bits: reverse_bits(code, n as u8), len: n as u8 };
                code = code.wrapping_add(1);
            }
            end = start;
        }
    }
}

/// Marks the end of the code lengths in [`run_length_codes`]'s buffer.
pub(crate) const BAD_CODE: u8 = 255;

/// Go's `generateCodegen` (RFC 1951 3.2.7): rewrites the code lengths in `codegen`,
/// terminated by [`BAD_CODE`], in place into run-length symbols (16-18 followed by their
/// repeat argument) ending with [`BAD_CODE`], and counts each symbol in `freq`.
pub(crate) fn run_length_codes(codegen: &mut [u8], freq: &mut [u32; 19]) {
    *freq = [0; 19];
    let mut size = codegen[0];
    let mut count: i32 = 1;
    let mut out = 0usize;
    let mut in_index = 1usize;
    // Output never overtakes input, so one buffer serves both.
    while size != BAD_CODE {
        let next_size = codegen[in_index];
        in_index += 1;
        if next_size == size {
            count += 1;
            continue;
        }
        if size != 0 {
            codegen[out] = size;
            out += 1;
            freq[usize::from(size)] += 1;
            count -= 1;
            while count >= 3 {
                let n = count.min(6);
                codegen[out] = 16;
                codegen[out + 1] = (n - 3) as u8;
                out += 2;
                freq[16] += 1;
                count -= n;
            }
        } else {
            while count >= 11 {
                let n = count.min(138);
                codegen[out] = 18;
                codegen[out + 1] = (n - 11) as u8;
                out += 2;
                freq[18] += 1;
                count -= n;
            }
            if count >= 3 {
                codegen[out] = 17;
                codegen[out + 1] = (count - 3) as u8;
                out += 2;
                freq[17] += 1;
                count = 0;
            }
        }
        count -= 1;
        while count >= 0 {
            codegen[out] = size;
            out += 1;
            freq[usize::from(size)] += 1;
            count -= 1;
        }
        size = next_size;
        count = 1;
    }
    codegen[out] = BAD_CODE;
}

/// Go's `bitCounts`: how many symbols get each code length, for `list` sorted by
/// increasing frequency (at least 3 symbols). Returns the counts and the effective limit.
fn bit_counts(list: &[Node], max_bits: i32) -> ([i32; MAX_BITS_LIMIT + 1], usize) {
    let n = list.len() as i32;
    // Go appends a sentinel of infinite frequency after the last symbol.
    let freq_at = |i: i32| list.get(i as usize).map_or(i32::MAX, |node| node.freq);
    let max_bits = max_bits.min(n - 1) as usize;

    let mut levels = [LevelInfo::default(); MAX_BITS_LIMIT + 1];
    let mut leaf_counts = [[0i32; MAX_BITS_LIMIT + 1]; MAX_BITS_LIMIT + 1];
    for level in 1..=max_bits {
        levels[level] = LevelInfo {
            last_freq: list[1].freq,
            next_char_freq: list[2].freq,
            next_pair_freq: if level == 1 { i32::MAX } else { list[0].freq.wrapping_add(list[1].freq) },
            needed: 0,
        };
        leaf_counts[level][level] = 2;
    }
    levels[max_bits].needed = 2 * n - 4;

    let mut level = max_bits;
    while level < MAX_BITS_LIMIT {
        if levels[level].next_pair_freq == i32::MAX && levels[level].next_char_freq == i32::MAX {
            // Out of leaves and pairs: this level and those below are done.
            levels[level].needed = 0;
            levels[level + 1].next_pair_freq = i32::MAX;
            level += 1;
            continue;
        }
        let prev_freq = levels[level].last_freq;
        if levels[level].next_char_freq < levels[level].next_pair_freq {
            let count = leaf_counts[level][level] + 1;
            levels[level].last_freq = levels[level].next_char_freq;
            leaf_counts[level][level] = count;
            levels[level].next_char_freq = freq_at(count);
        } else {
            levels[level].last_freq = levels[level].next_pair_freq;
            let save = leaf_counts[level][level];
            leaf_counts[level] = leaf_counts[level - 1];
            leaf_counts[level][level] = save;
            levels[level - 1].needed = 2;
        }
        levels[level].needed -= 1;
        if levels[level].needed == 0 {
            if level == max_bits {
                break;
            }
            levels[level + 1].next_pair_freq = prev_freq.wrapping_add(levels[level].last_freq);
            level += 1;
        } else {
            while levels[level - 1].needed > 0 {
                level -= 1;
            }
        }
    }
    debug_assert_eq!(leaf_counts[max_bits][max_bits], n, "bitCounts did not place every leaf");

    let mut bit_count = [0i32; MAX_BITS_LIMIT + 1];
    let counts = &leaf_counts[max_bits];
    for (bits, level) in (1..=max_bits).rev().enumerate() {
        bit_count[bits + 1] = counts[level] - counts[level - 1];
    }
    (bit_count, max_bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lengths(h: &HuffmanEncoder) -> Vec<u8> {
        h.codes.iter().map(|c| c.len).collect()
    }

    #[test]
    fn two_symbols_get_one_bit_each() {
        let mut h = HuffmanEncoder::new(4);
        h.generate(&[0u16, 5, 0, 1], 15);
        assert_eq!(h.codes[1], Code { bits: 0, len: 1 });
        assert_eq!(h.codes[3], Code { bits: 1, len: 1 });
        assert_eq!(h.codes[0].len, 0);
    }

    #[test]
    fn lengths_respect_the_limit_and_kraft() {
        // Fibonacci frequencies force the deepest possible unlimited tree.
        let mut freq = vec![0u16; 30];
        let (mut a, mut b) = (1u16, 1u16);
        for f in freq.iter_mut() {
            *f = a;
            let c = a.saturating_add(b);
            a = b;
            b = c;
        }
        let mut h = HuffmanEncoder::new(30);
        h.generate(&freq, 7);
        let lens = lengths(&h);
        assert!(lens.iter().all(|&l| (1..=7).contains(&l)), "{lens:?}");
        let kraft: f64 = lens.iter().map(|&l| 0.5f64.powi(i32::from(l))).sum();
        assert!((kraft - 1.0).abs() < 1e-9, "{kraft}");
    }

    #[test]
    fn canonical_codes_are_assigned_in_symbol_order() {
        let mut h = HuffmanEncoder::new(4);
        h.generate(&[1u16, 1, 1, 1], 15);
        let codes: Vec<u16> = h.codes.iter().map(|c| reverse_bits(c.bits, c.len)).collect();
        assert_eq!(codes, vec![0, 1, 2, 3]);
        assert_eq!(lengths(&h), vec![2, 2, 2, 2]);
    }

    #[test]
    fn code_lengths_are_run_length_coded_like_go() {
        let mut cg = vec![8u8; 7];
        cg.extend([0u8; 20]);
        cg.extend([5u8; 2]);
        cg.push(BAD_CODE);
        let mut freq = [0u32; 19];
        run_length_codes(&mut cg, &mut freq);
        // 8, repeat 6 (16,3); 18 with 20-11=9; 5, 5.
        assert_eq!(&cg[..8], &[8, 16, 3, 18, 9, 5, 5, BAD_CODE]);
        assert_eq!((freq[8], freq[16], freq[18], freq[5]), (1, 1, 1, 2));
    }

    #[test]
    fn fixed_code_matches_rfc1951() {
        let lit = HuffmanEncoder::fixed_literal();
        assert_eq!((lit.codes[0].len, lit.codes[144].len, lit.codes[256].len, lit.codes[285].len), (8, 9, 7, 8));
        assert_eq!(reverse_bits(lit.codes[256].bits, 7), 0);
        assert_eq!(reverse_bits(lit.codes[0].bits, 8), 0b0011_0000);
    }
}
