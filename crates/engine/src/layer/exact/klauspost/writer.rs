//! klauspost's block writer (`huffman_bit_writer.go`): chooses stored, fixed, dynamic or
//! literal-only Huffman coding per block, and may keep a dynamic table open across
//! blocks ("reuse") until a sync, a new table or a stored block closes it.
//!
//! Go 1.27 took this writer into the standard library with two changes to
//! `writeBlockDynamic`, selected by [`Flavor`]; everything else is the same code.

use super::tokens::{
    Tokens, END_BLOCK_MARKER, LENGTH_BASE, LENGTH_CODES, LENGTH_EXTRA_BITS, LENGTH_SHIFT, MATCH_TYPE, MAX_STORE_BLOCK_SIZE, OFFSET_BASE, OFFSET_EXTRA_BITS,
    OFFSET_MASK,
};
use crate::layer::exact::bits::BitWriter;
use crate::layer::exact::huffman::{run_length_codes, Code, HuffmanEncoder, BAD_CODE};

const OFFSET_CODE_COUNT: usize = 30;
const LITERAL_COUNT: usize = 286;
const CODEGEN_CODE_COUNT: usize = 19;
/// Below this many tokens the fixed code is considered.
const MAX_PREDEFINED_TOKENS: usize = 250;
/// Header size assumed for a literal-only table before one is built (70 bytes).
const GUESS_HEADER_SIZE_BITS: i64 = 70 * 8;

static CODEGEN_ORDER: [usize; 19] = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15];

/// Which release of the writer: they differ only in a block whose table may stay open
/// for the next block (a dynamic block written without a sync).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flavor {
    /// klauspost/compress 1.15.12: such a table is transmitted with all 286 literal/length
    /// and 30 distance code lengths (`indexTokens(tokens, filled)`), and the end-of-block
    /// code is left out of the size estimates.
    Klauspost1_15,
    /// Go 1.27's `compress/flate`: the table is transmitted up to its last used code, as
    /// for any block, and the end-of-block symbol is counted once in the histogram
    /// ("Ensure we can always write EOB": `tokens.extraHist[0] = 1`).
    Go1_27,
}

/// Writes the blocks of one DEFLATE stream.
#[derive(Debug)]
pub(super) struct BlockWriter {
    pub(super) bits: BitWriter,
    /// Size in bits of the open dynamic table's header; 0 when no table is open
    /// (and so no end-of-block is owed).
    last_header: i64,
    /// The open table codes literals only (offsets invalid).
    last_huffman: bool,
    literal_encoding: HuffmanEncoder,
    tmp_lit_encoding: HuffmanEncoder,
    offset_encoding: HuffmanEncoder,
    codegen_encoding: HuffmanEncoder,
    fixed_literal: HuffmanEncoder,
    fixed_offset: HuffmanEncoder,
    /// Offset code used by literal-only blocks: a single one-bit code for distance 0.
    huff_offset: HuffmanEncoder,
    log_new_table_penalty: u32,
    flavor: Flavor,
    literal_freq: [u16; 257 + 32],
    offset_freq: [u16; 32],
    codegen_freq: [u32; CODEGEN_CODE_COUNT],
    codegen: [u8; LITERAL_COUNT + OFFSET_CODE_COUNT + 1],
}

impl BlockWriter {
    pub(super) fn new(log_new_table_penalty: u32, flavor: Flavor) -> Self {
        let mut huff_offset = HuffmanEncoder::new(OFFSET_CODE_COUNT);
        let mut freq = [0u16; OFFSET_CODE_COUNT];
        freq[0] = 1;
        huff_offset.generate(&freq, 15);
        BlockWriter {
            bits: BitWriter::default(),
            last_header: 0,
            last_huffman: false,
            literal_encoding: HuffmanEncoder::new(LITERAL_COUNT),
            tmp_lit_encoding: HuffmanEncoder::new(LITERAL_COUNT),
            offset_encoding: HuffmanEncoder::new(OFFSET_CODE_COUNT),
            codegen_encoding: HuffmanEncoder::new(CODEGEN_CODE_COUNT),
            fixed_literal: HuffmanEncoder::fixed_literal(),
            fixed_offset: HuffmanEncoder::fixed_offset(),
            huff_offset,
            log_new_table_penalty,
            flavor,
            literal_freq: [0; 257 + 32],
            offset_freq: [0; 32],
            codegen_freq: [0; CODEGEN_CODE_COUNT],
            codegen: [0; LITERAL_COUNT + OFFSET_CODE_COUNT + 1],
        }
    }

    /// Go's `reset`: a new stream. The code tables are kept, as in Go; they are always
    /// regenerated before use when no table is open.
    pub(super) fn reset(&mut self) {
        self.bits = BitWriter::default();
        self.last_header = 0;
        self.last_huffman = false;
    }

    #[inline(always)]
    fn write_code(&mut self, c: Code) {
        self.bits.write_bits(u64::from(c.bits), u32::from(c.len));
    }

    /// Closes an open table with its end-of-block code.
    fn write_owed_eob(&mut self) {
        if self.last_header > 0 {
            let eob = self.literal_encoding.codes[END_BLOCK_MARKER as usize];
            self.write_code(eob);
            self.last_header = 0;
        }
    }

    /// Pads to a byte boundary, first closing any open table.
    pub(super) fn flush(&mut self) {
        self.write_owed_eob();
        self.bits.flush();
    }

    /// A stored-block header; an empty final block becomes a 10-bit fixed block instead.
    pub(super) fn write_stored_header(&mut self, length: usize, eof: bool) {
        self.write_owed_eob();
        if length == 0 && eof {
            self.write_fixed_header(eof);
            self.bits.write_bits(0, 7);
            self.flush();
            return;
        }
        self.bits.write_bits(u64::from(eof), 3);
        self.flush();
        self.bits.write_bits(length as u64, 16);
        self.bits.write_bits(u64::from(!(length as u16)), 16);
    }

    pub(super) fn write_bytes(&mut self, bytes: &[u8]) {
        self.bits.write_bytes(bytes);
    }

    fn write_fixed_header(&mut self, eof: bool) {
        self.write_owed_eob();
        self.bits.write_bits(if eof { 3 } else { 2 }, 3);
    }

    fn write_stored(&mut self, input: &[u8], eof: bool) {
        self.write_stored_header(input.len(), eof);
        self.write_bytes(input);
    }

    /// Run-length codes for the concatenated code lengths (`generateCodegen`).
    fn generate_codegen(&mut self, num_literals: usize, num_offsets: usize, huff_only: bool) {
        let offsets = if huff_only { &self.huff_offset } else { &self.offset_encoding };
        let lengths = self.literal_encoding.codes[..num_literals].iter().chain(&offsets.codes[..num_offsets]);
        for (dst, c) in self.codegen.iter_mut().zip(lengths) {
            *dst = c.len;
        }
        self.codegen[num_literals + num_offsets] = BAD_CODE;
        run_length_codes(&mut self.codegen, &mut self.codegen_freq);
    }

    fn num_codegens(&self) -> usize {
        let mut n = CODEGEN_CODE_COUNT;
        while n > 4 && self.codegen_freq[CODEGEN_ORDER[n - 1]] == 0 {
            n -= 1;
        }
        n
    }

    fn header_size(&self) -> (i64, usize) {
        let n = self.num_codegens();
        let size = 3
            + 5
            + 5
            + 4
            + 3 * n as i64
            + self.codegen_encoding.bit_length(&self.codegen_freq)
            + i64::from(self.codegen_freq[16]) * 2
            + i64::from(self.codegen_freq[17]) * 3
            + i64::from(self.codegen_freq[18]) * 7;
        (size, n)
    }

    fn extra_bit_size(&self) -> i64 {
        let lengths: i64 = self.literal_freq[257..LITERAL_COUNT].iter().enumerate().map(|(i, &n)| i64::from(n) * i64::from(LENGTH_EXTRA_BITS[i & 31])).sum();
        let offsets: i64 = self.offset_freq[..OFFSET_CODE_COUNT].iter().enumerate().map(|(i, &n)| i64::from(n) * i64::from(OFFSET_EXTRA_BITS[i & 31])).sum();
        lengths + offsets
    }

    fn fixed_size(&self, extra_bits: i64) -> i64 {
        3 + self.fixed_literal.bit_length(&self.literal_freq) + self.fixed_offset.bit_length(&self.offset_freq) + extra_bits
    }

    fn dynamic_reuse_size(&self) -> i64 {
        self.literal_encoding.bit_length(&self.literal_freq) + self.offset_encoding.bit_length(&self.offset_freq)
    }

    fn write_dynamic_header(&mut self, num_literals: usize, num_offsets: usize, num_codegens: usize, eof: bool) {
        self.bits.write_bits(if eof { 5 } else { 4 }, 3);
        self.bits.write_bits((num_literals - 257) as u64, 5);
        self.bits.write_bits((num_offsets - 1) as u64, 5);
        self.bits.write_bits((num_codegens - 4) as u64, 4);
        for &sym in &CODEGEN_ORDER[..num_codegens] {
            let len = self.codegen_encoding.codes[sym].len;
            self.bits.write_bits(u64::from(len), 3);
        }
        let mut i = 0;
        loop {
            let word = self.codegen[i];
            i += 1;
            if word == BAD_CODE {
                break;
            }
            let code = self.codegen_encoding.codes[usize::from(word)];
            self.write_code(code);
            let extra = match word {
                16 => 2,
                17 => 3,
                18 => 7,
                _ => continue,
            };
            self.bits.write_bits(u64::from(self.codegen[i]), extra);
            i += 1;
        }
    }

    /// Copies the token histograms into the frequency tables; returns the number of
    /// literal/length and distance codes to transmit: all of them when `filled`, i.e.
    /// when the table may stay open for later blocks.
    fn index_tokens(&mut self, t: &Tokens, filled: bool) -> (usize, usize) {
        self.literal_freq[..256].copy_from_slice(&t.lit_hist);
        self.literal_freq[256..256 + 32].copy_from_slice(&t.extra_hist);
        self.offset_freq = t.off_hist;
        if t.n == 0 {
            return (0, 0);
        }
        if filled {
            return (LITERAL_COUNT, OFFSET_CODE_COUNT);
        }
        let mut num_literals = self.literal_freq.len();
        while self.literal_freq[num_literals - 1] == 0 {
            num_literals -= 1;
        }
        let mut num_offsets = self.offset_freq.len();
        while num_offsets > 0 && self.offset_freq[num_offsets - 1] == 0 {
            num_offsets -= 1;
        }
        if num_offsets == 0 {
            // A dynamic header needs at least one distance code.
            self.offset_freq[0] = 1;
            num_offsets = 1;
        }
        (num_literals, num_offsets)
    }

    fn generate(&mut self) {
        self.literal_encoding.generate(&self.literal_freq[..LITERAL_COUNT], 15);
        self.offset_encoding.generate(&self.offset_freq[..OFFSET_CODE_COUNT], 15);
    }

    /// Go's `writeBlockDynamic`: a block of tokens, possibly continuing the open table.
    pub(super) fn write_block_dynamic(&mut self, tokens: &mut Tokens, eof: bool, input: Option<&[u8]>, sync: bool) {
        let sync = sync || eof;
        if sync {
            tokens.add_eob();
        } else if self.flavor == Flavor::Go1_27 {
            tokens.extra_hist[0] = 1;
        }
        // A literal-only table cannot code matches; the last block must be closed.
        if (self.last_huffman || eof) && self.last_header > 0 {
            self.write_owed_eob();
            self.last_huffman = false;
        }
        if self.last_header > 0 && !self.can_reuse(tokens) {
            self.write_owed_eob();
        }

        let filled = !sync && self.flavor == Flavor::Klauspost1_15;
        let (num_literals, num_offsets) = self.index_tokens(tokens, filled);
        let stored = input.filter(|i| i.len() <= MAX_STORE_BLOCK_SIZE);
        let ssize = stored.map(|i| (i.len() as i64 + 5) * 8);
        let mut extra_bits = 0;
        if stored.is_some() || self.last_header > 0 {
            extra_bits = self.extra_bit_size();
        }

        if self.last_header > 0 {
            // Estimate a new table against reusing the open one, with a penalty on the
            // estimate since real tables are not optimal.
            let mut new_size = self.last_header + tokens.estimated_bits();
            new_size += i64::from(self.literal_encoding.codes[END_BLOCK_MARKER as usize].len) + (new_size >> self.log_new_table_penalty);
            let reuse_size = self.dynamic_reuse_size() + extra_bits;
            let size = if new_size < reuse_size {
                self.write_owed_eob();
                new_size
            } else {
                reuse_size
            };
            if tokens.n < MAX_PREDEFINED_TOKENS && self.fixed_size(extra_bits) + 7 < size {
                if let (Some(input), Some(ssize)) = (stored, ssize) {
                    if ssize <= size {
                        self.write_stored(input, eof);
                        return;
                    }
                }
                self.write_fixed_header(eof);
                if !sync {
                    tokens.add_eob();
                }
                self.write_tokens(&tokens.tokens, true);
                return;
            }
            if let (Some(input), Some(ssize)) = (stored, ssize) {
                if ssize <= size {
                    self.write_stored(input, eof);
                    return;
                }
            }
        }

        if self.last_header == 0 {
            self.literal_freq[END_BLOCK_MARKER as usize] = 1;
            self.generate();
            self.generate_codegen(num_literals, num_offsets, false);
            self.codegen_encoding.generate(&self.codegen_freq, 7);
            let (header, num_codegens) = self.header_size();
            let size = header + self.dynamic_reuse_size() + extra_bits;

            if tokens.n < MAX_PREDEFINED_TOKENS {
                let pre_size = self.fixed_size(extra_bits);
                if pre_size <= size {
                    if let (Some(input), Some(ssize)) = (stored, ssize) {
                        if ssize <= pre_size {
                            self.write_stored(input, eof);
                            return;
                        }
                    }
                    self.write_fixed_header(eof);
                    if !sync {
                        tokens.add_eob();
                    }
                    self.write_tokens(&tokens.tokens, true);
                    return;
                }
            }
            if let (Some(input), Some(ssize)) = (stored, ssize) {
                if ssize <= size {
                    self.write_stored(input, eof);
                    return;
                }
            }
            self.write_dynamic_header(num_literals, num_offsets, num_codegens, eof);
            if !sync {
                self.last_header = self.header_size().0;
            }
            self.last_huffman = false;
        }
        if sync {
            self.last_header = 0;
        }
        self.write_tokens(&tokens.tokens, false);
    }

    fn can_reuse(&self, t: &Tokens) -> bool {
        let offsets_ok = t.off_hist[..OFFSET_CODE_COUNT].iter().zip(&self.offset_encoding.codes).all(|(&v, c)| v == 0 || *c != Code::default());
        let lengths_ok = t.extra_hist[..LITERAL_COUNT - 256].iter().zip(&self.literal_encoding.codes[256..]).all(|(&v, c)| v == 0 || *c != Code::default());
        let literals_ok = t.lit_hist.iter().zip(&self.literal_encoding.codes[..256]).all(|(&v, c)| v == 0 || *c != Code::default());
        offsets_ok && lengths_ok && literals_ok
    }

    /// Writes tokens with the open table (or the fixed code); a trailing end-of-block
    /// token is written last.
    fn write_tokens(&mut self, tokens: &[u32], fixed: bool) {
        let (lit, off) =
            if fixed { (&self.fixed_literal.codes, &self.fixed_offset.codes) } else { (&self.literal_encoding.codes, &self.offset_encoding.codes) };
        let bits = &mut self.bits;
        let (body, eob) = match tokens.split_last() {
            Some((&END_BLOCK_MARKER, body)) => (body, true),
            _ => (tokens, false),
        };
        for &t in body {
            if t < MATCH_TYPE {
                let c = lit[t as usize];
                bits.write_bits(u64::from(c.bits), u32::from(c.len));
                continue;
            }
            let length = ((t >> LENGTH_SHIFT) & 255) as usize;
            let length_code = usize::from(LENGTH_CODES[length] & 31);
            let c = lit[257 + length_code];
            bits.write_bits(u64::from(c.bits), u32::from(c.len));
            if length_code >= 8 {
                let extra = length as u64 - u64::from(LENGTH_BASE[length_code]);
                bits.write_bits(extra, u32::from(LENGTH_EXTRA_BITS[length_code]));
            }
            let offset = t & OFFSET_MASK;
            let offset_code = ((offset >> 16) & 31) as usize;
            let c = off[offset_code];
            bits.write_bits(u64::from(c.bits), u32::from(c.len));
            if offset_code >= 4 {
                let extra = (offset - OFFSET_BASE[offset_code]) & 0xffff;
                bits.write_bits(u64::from(extra), u32::from(OFFSET_EXTRA_BITS[offset_code]));
            }
        }
        if eob {
            let c = lit[END_BLOCK_MARKER as usize];
            bits.write_bits(u64::from(c.bits), u32::from(c.len));
        }
    }

    /// Go's `writeBlockHuff`: literals only, or stored when that is not worth it.
    pub(super) fn write_block_huff(&mut self, eof: bool, input: &[u8], sync: bool) {
        self.literal_freq = [0; 257 + 32];
        if !self.last_huffman {
            self.offset_freq = [0; 32];
        }
        const NUM_LITERALS: usize = END_BLOCK_MARKER as usize + 1;
        const NUM_OFFSETS: usize = 1;
        for &b in input {
            self.literal_freq[usize::from(b)] = self.literal_freq[usize::from(b)].wrapping_add(1);
        }
        let storable = input.len() <= MAX_STORE_BLOCK_SIZE;
        let ssize = (input.len() as i64 + 5) * 8;
        if storable && input.len() > 1024 {
            // Quick check for incompressible content: a flat histogram.
            let mut abs = 0f64;
            let avg = input.len() as f64 / 256.0;
            let max = (input.len() * 2) as f64;
            for &v in &self.literal_freq[..256] {
                let diff = f64::from(v) - avg;
                abs += diff * diff;
                if abs > max {
                    break;
                }
            }
            if abs < max {
                self.write_stored(input, eof);
                return;
            }
        }
        self.literal_freq[END_BLOCK_MARKER as usize] = 1;
        self.tmp_lit_encoding.generate(&self.literal_freq[..NUM_LITERALS], 15);
        let mut est_bits = self.tmp_lit_encoding.can_reuse_bits(&self.literal_freq[..NUM_LITERALS]).unwrap_or(i64::from(i32::MAX));
        if est_bits < i64::from(i32::MAX) {
            est_bits += self.last_header;
            if self.last_header == 0 {
                est_bits += GUESS_HEADER_SIZE_BITS;
            }
            est_bits += est_bits >> self.log_new_table_penalty;
        }
        if storable && ssize <= est_bits {
            self.write_stored(input, eof);
            return;
        }
        if self.last_header > 0 {
            let reuse_size = self.literal_encoding.can_reuse_bits(&self.literal_freq[..256]).unwrap_or(i64::from(i32::MAX));
            if est_bits < reuse_size {
                self.write_owed_eob();
            }
        }
        if self.last_header == 0 {
            std::mem::swap(&mut self.literal_encoding, &mut self.tmp_lit_encoding);
            self.generate_codegen(NUM_LITERALS, NUM_OFFSETS, true);
            self.codegen_encoding.generate(&self.codegen_freq, 7);
            let num_codegens = self.num_codegens();
            self.write_dynamic_header(NUM_LITERALS, NUM_OFFSETS, num_codegens, eof);
            self.last_huffman = true;
            self.last_header = self.header_size().0;
        }
        let codes = &self.literal_encoding.codes;
        for &b in input {
            let c = codes[usize::from(b)];
            self.bits.write_bits(u64::from(c.bits), u32::from(c.len));
        }
        if eof || sync {
            let c = self.literal_encoding.codes[END_BLOCK_MARKER as usize];
            self.write_code(c);
            self.last_header = 0;
            self.last_huffman = false;
        }
    }
}
