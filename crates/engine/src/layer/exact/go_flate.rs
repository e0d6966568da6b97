//! A faithful port of the Go standard library's `compress/flate` at `DefaultCompression`
//! (level 6), as shipped in Go 1.19 (Debian bookworm's golang-1.19), which Docker/moby and
//! BuildKit use to write layers.
//!
//! Ported from Go's `compress/flate` (deflate.go, huffman_bit_writer.go, token.go),
//! Copyright 2009 The Go Authors, BSD-3-Clause. Level 6 is the classic lazy matcher:
//! a 17-bit hash of 4 bytes with chains over a 32 KiB window, at most 128 candidates,
//! lazy evaluation up to length 16, blocks of at most 16384 tokens each coded as the
//! smallest of stored, fixed and dynamic Huffman.

use crate::layer::exact::bits::BitWriter;
use crate::layer::exact::huffman::{run_length_codes, Code, HuffmanEncoder, BAD_CODE};

const WINDOW_SIZE: usize = 1 << 15;
const WINDOW_MASK: usize = WINDOW_SIZE - 1;
const BASE_MATCH_LENGTH: usize = 3;
const MIN_MATCH_LENGTH: usize = 4;
const MAX_MATCH_LENGTH: usize = 258;
const MAX_FLATE_BLOCK_TOKENS: usize = 1 << 14;
const MAX_STORE_BLOCK_SIZE: usize = 65535;
const HASH_BITS: u32 = 17;
const HASH_SIZE: usize = 1 << HASH_BITS;
const MAX_HASH_OFFSET: i64 = 1 << 24;
const HASH_MUL: u32 = 0x1e35_a7bd;

const MATCH_TYPE: u32 = 1 << 30;
const LENGTH_SHIFT: u32 = 22;
const OFFSET_MASK: u32 = (1 << LENGTH_SHIFT) - 1;
const END_BLOCK_MARKER: u32 = 256;
const MAX_NUM_LIT: usize = 286;
const OFFSET_CODE_COUNT: usize = 30;
const CODEGEN_CODE_COUNT: usize = 19;
const LENGTH_CODES_START: usize = 257;

static CODEGEN_ORDER: [usize; 19] = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15];
static LENGTH_EXTRA_BITS: [u8; 29] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0];
static LENGTH_BASE: [u32; 29] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 255];
static OFFSET_EXTRA_BITS: [u8; 30] = [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13];
static OFFSET_BASE: [u32; 30] = [
    0x0000, 0x0001, 0x0002, 0x0003, 0x0004, 0x0006, 0x0008, 0x000c, 0x0010, 0x0018, 0x0020, 0x0030, 0x0040, 0x0060, 0x0080, 0x00c0, 0x0100, 0x0180, 0x0200,
    0x0300, 0x0400, 0x0600, 0x0800, 0x0c00, 0x1000, 0x1800, 0x2000, 0x3000, 0x4000, 0x6000,
];

/// Length code (0-28) of `length - 3`.
fn length_code(xlength: u32) -> usize {
    if xlength >= 255 {
        return 28;
    }
    LENGTH_BASE.partition_point(|&b| b <= xlength) - 1
}

/// Distance code (0-29) of `offset - 1`.
fn offset_code(xoffset: u32) -> usize {
    OFFSET_BASE.partition_point(|&b| b <= xoffset) - 1
}

/// The tuning of one Go compression level (`compressionLevel`).
#[derive(Clone, Copy, Debug)]
struct Level {
    good: usize,
    lazy: usize,
    nice: usize,
    chain: usize,
}

/// Go's `levels[6]`, what `DefaultCompression` selects.
const LEVEL_6: Level = Level { good: 8, lazy: 16, nice: 128, chain: 128 };

/// Go 1.19's `compress/flate.Writer` at `DefaultCompression`.
#[derive(Debug)]
pub(crate) struct Deflater {
    level: Level,
    w: BlockWriter,
    sync: bool,
    chain_head: i64,
    hash_head: Box<[u32; HASH_SIZE]>,
    hash_prev: Box<[u32; WINDOW_SIZE]>,
    hash_offset: i64,
    index: usize,
    window: Vec<u8>,
    window_end: usize,
    /// Where the pending tokens' input starts; `None` once slid out of the window (Go's
    /// `math.MaxInt32`), which makes the block ineligible for storing.
    block_start: Option<usize>,
    byte_available: bool,
    tokens: Vec<u32>,
    length: usize,
    offset: usize,
    max_insert_index: usize,
}

#[inline(always)]
fn hash4(b: &[u8]) -> usize {
    let v = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (v.wrapping_mul(HASH_MUL) >> (32 - HASH_BITS)) as usize
}

/// Common prefix of `a` and `b`, at most `max` bytes (both at least `max` long).
#[inline(always)]
fn match_len(a: &[u8], b: &[u8], max: usize) -> usize {
    crate::layer::exact::match_len::match_len(&a[..max], &b[..max])
}

impl Deflater {
    pub(crate) fn new() -> Self {
        Deflater {
            level: LEVEL_6,
            w: BlockWriter::new(),
            sync: false,
            chain_head: -1,
            hash_head: Box::new([0; HASH_SIZE]),
            hash_prev: Box::new([0; WINDOW_SIZE]),
            hash_offset: 1,
            index: 0,
            window: vec![0; 2 * WINDOW_SIZE],
            window_end: 0,
            block_start: Some(0),
            byte_available: false,
            tokens: Vec::with_capacity(MAX_FLATE_BLOCK_TOKENS + 1),
            length: MIN_MATCH_LENGTH - 1,
            offset: 0,
            max_insert_index: 0,
        }
    }

    /// Go's `write`: alternately process the window and refill it.
    pub(crate) fn write(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            self.deflate();
            let n = self.fill(data);
            data = &data[n..];
        }
    }

    /// Go's `Close`: process everything and end with an empty final stored block.
    pub(crate) fn close(&mut self) {
        self.sync = true;
        self.deflate();
        self.w.write_stored_header(0, true);
        self.w.bits.flush();
    }

    /// Compressed bytes produced so far.
    pub(crate) fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.w.bits.out)
    }

    /// Go's `fillDeflate`: slide the window by 32 KiB when the cursor nears its end.
    fn fill(&mut self, b: &[u8]) -> usize {
        if self.index >= 2 * WINDOW_SIZE - (MIN_MATCH_LENGTH + MAX_MATCH_LENGTH) {
            self.window.copy_within(WINDOW_SIZE..2 * WINDOW_SIZE, 0);
            self.index -= WINDOW_SIZE;
            self.window_end -= WINDOW_SIZE;
            self.block_start = self.block_start.and_then(|s| s.checked_sub(WINDOW_SIZE));
            self.hash_offset += WINDOW_SIZE as i64;
            if self.hash_offset > MAX_HASH_OFFSET {
                let delta = self.hash_offset - 1;
                self.hash_offset -= delta;
                self.chain_head -= delta;
                let rebase = |v: &mut u32| *v = if i64::from(*v) > delta { (i64::from(*v) - delta) as u32 } else { 0 };
                self.hash_prev.iter_mut().for_each(rebase);
                self.hash_head.iter_mut().for_each(rebase);
            }
        }
        let n = b.len().min(self.window.len() - self.window_end);
        self.window[self.window_end..self.window_end + n].copy_from_slice(&b[..n]);
        self.window_end += n;
        n
    }

    /// Go's `compressor.writeBlock`: emit pending tokens covering input up to `index`.
    fn write_block(&mut self, index: usize) {
        if index > 0 {
            let input = match self.block_start {
                Some(start) if start <= index => Some(&self.window[start..index]),
                _ => None,
            };
            self.w.write_block(&mut self.tokens, false, input);
            self.block_start = Some(index);
        }
        self.tokens.clear();
    }

    /// Go's `findMatch`: walk the hash chain for a match longer than `prev_length`.
    fn find_match(&self, pos: usize, prev_head: i64, prev_length: usize, lookahead: usize) -> Option<(usize, usize)> {
        let min_match_look = lookahead.min(MAX_MATCH_LENGTH);
        let win = &self.window[..pos + min_match_look];
        let nice = (win.len() - pos).min(self.level.nice);
        let mut tries = self.level.chain;
        let mut length = prev_length;
        if length >= self.level.good {
            tries >>= 2;
        }
        let mut w_end = win[pos + length];
        let w_pos = &win[pos..];
        let min_index = pos as i64 - WINDOW_SIZE as i64;
        let mut found = None;
        let mut i = prev_head;
        while tries > 0 {
            let iu = i as usize;
            if w_end == win[iu + length] {
                let n = match_len(&win[iu..], w_pos, min_match_look);
                if n > length && (n > MIN_MATCH_LENGTH || pos - iu <= 4096) {
                    length = n;
                    found = Some((n, pos - iu));
                    if n >= nice {
                        break;
                    }
                    w_end = win[pos + n];
                }
            }
            if i == min_index {
                break;
            }
            i = i64::from(self.hash_prev[iu & WINDOW_MASK]) - self.hash_offset;
            if i < min_index || i < 0 {
                break;
            }
            tries -= 1;
        }
        found
    }

    fn insert_hash(&mut self, index: usize) -> u32 {
        let h = hash4(&self.window[index..index + MIN_MATCH_LENGTH]);
        let head = self.hash_head[h];
        self.hash_prev[index & WINDOW_MASK] = head;
        self.hash_head[h] = (index as i64 + self.hash_offset) as u32;
        head
    }

    /// Go's `deflate` with lazy matching (`fastSkipHashing == skipNever`).
    fn deflate(&mut self) {
        if self.window_end - self.index < MIN_MATCH_LENGTH + MAX_MATCH_LENGTH && !self.sync {
            return;
        }
        self.max_insert_index = self.window_end.saturating_sub(MIN_MATCH_LENGTH - 1);
        loop {
            let lookahead = self.window_end - self.index;
            if lookahead < MIN_MATCH_LENGTH + MAX_MATCH_LENGTH {
                if !self.sync {
                    return;
                }
                if lookahead == 0 {
                    if self.byte_available {
                        self.tokens.push(u32::from(self.window[self.index - 1]));
                        self.byte_available = false;
                    }
                    if !self.tokens.is_empty() {
                        self.write_block(self.index);
                    }
                    return;
                }
            }
            if self.index < self.max_insert_index {
                self.chain_head = i64::from(self.insert_hash(self.index));
            }
            let prev_length = self.length;
            let prev_offset = self.offset;
            self.length = MIN_MATCH_LENGTH - 1;
            self.offset = 0;
            let min_index = self.index.saturating_sub(WINDOW_SIZE) as i64;

            if self.chain_head - self.hash_offset >= min_index && lookahead > prev_length && prev_length < self.level.lazy {
                if let Some((len, off)) = self.find_match(self.index, self.chain_head - self.hash_offset, MIN_MATCH_LENGTH - 1, lookahead) {
                    self.length = len;
                    self.offset = off;
                }
            }
            if prev_length >= MIN_MATCH_LENGTH && self.length <= prev_length {
                // The previous position's match is at least as good: emit it.
                self.tokens.push(MATCH_TYPE | (((prev_length - BASE_MATCH_LENGTH) as u32) << LENGTH_SHIFT) | (prev_offset - 1) as u32);
                let new_index = self.index + prev_length - 1;
                let mut index = self.index + 1;
                while index < new_index {
                    if index < self.max_insert_index {
                        self.insert_hash(index);
                    }
                    index += 1;
                }
                self.index = index;
                self.byte_available = false;
                self.length = MIN_MATCH_LENGTH - 1;
                if self.tokens.len() == MAX_FLATE_BLOCK_TOKENS {
                    self.write_block(self.index);
                }
            } else {
                if self.byte_available {
                    let i = self.index - 1;
                    self.tokens.push(u32::from(self.window[i]));
                    if self.tokens.len() == MAX_FLATE_BLOCK_TOKENS {
                        self.write_block(i + 1);
                    }
                }
                self.index += 1;
                self.byte_available = true;
            }
        }
    }
}

/// Go 1.19's `huffmanBitWriter`, reduced to what level 6 uses.
#[derive(Debug)]
struct BlockWriter {
    bits: BitWriter,
    literal_freq: [u32; MAX_NUM_LIT],
    offset_freq: [u32; OFFSET_CODE_COUNT],
    codegen: [u8; MAX_NUM_LIT + OFFSET_CODE_COUNT + 1],
    codegen_freq: [u32; CODEGEN_CODE_COUNT],
    literal_encoding: HuffmanEncoder,
    offset_encoding: HuffmanEncoder,
    codegen_encoding: HuffmanEncoder,
    fixed_literal: HuffmanEncoder,
    fixed_offset: HuffmanEncoder,
}

impl BlockWriter {
    fn new() -> Self {
        BlockWriter {
            bits: BitWriter::default(),
            literal_freq: [0; MAX_NUM_LIT],
            offset_freq: [0; OFFSET_CODE_COUNT],
            codegen: [0; MAX_NUM_LIT + OFFSET_CODE_COUNT + 1],
            codegen_freq: [0; CODEGEN_CODE_COUNT],
            literal_encoding: HuffmanEncoder::new(MAX_NUM_LIT),
            offset_encoding: HuffmanEncoder::new(OFFSET_CODE_COUNT),
            codegen_encoding: HuffmanEncoder::new(CODEGEN_CODE_COUNT),
            fixed_literal: HuffmanEncoder::fixed_literal(),
            fixed_offset: HuffmanEncoder::fixed_offset(),
        }
    }

    fn write_stored_header(&mut self, length: usize, eof: bool) {
        self.bits.write_bits(u64::from(eof), 3);
        self.bits.flush();
        self.bits.write_bits(length as u64, 16);
        self.bits.write_bits(u64::from(!(length as u16)), 16);
    }

    /// Go's `indexTokens`: symbol frequencies, then fresh codes for both alphabets.
    fn index_tokens(&mut self, tokens: &[u32]) -> (usize, usize) {
        self.literal_freq = [0; MAX_NUM_LIT];
        self.offset_freq = [0; OFFSET_CODE_COUNT];
        for &t in tokens {
            if t < MATCH_TYPE {
                self.literal_freq[t as usize] += 1;
                continue;
            }
            let length = (t - MATCH_TYPE) >> LENGTH_SHIFT;
            self.literal_freq[LENGTH_CODES_START + length_code(length)] += 1;
            self.offset_freq[offset_code(t & OFFSET_MASK)] += 1;
        }
        let mut num_literals = MAX_NUM_LIT;
        while self.literal_freq[num_literals - 1] == 0 {
            num_literals -= 1;
        }
        let mut num_offsets = OFFSET_CODE_COUNT;
        while num_offsets > 0 && self.offset_freq[num_offsets - 1] == 0 {
            num_offsets -= 1;
        }
        if num_offsets == 0 {
            // A dynamic header needs at least one distance code.
            self.offset_freq[0] = 1;
            num_offsets = 1;
        }
        self.literal_encoding.generate(&self.literal_freq, 15);
        self.offset_encoding.generate(&self.offset_freq, 15);
        (num_literals, num_offsets)
    }

    /// Run-length codes for the concatenated code lengths (`generateCodegen`).
    fn generate_codegen(&mut self, num_literals: usize, num_offsets: usize) {
        let lengths = self.literal_encoding.codes[..num_literals].iter().chain(&self.offset_encoding.codes[..num_offsets]);
        for (dst, c) in self.codegen.iter_mut().zip(lengths) {
            *dst = c.len;
        }
        self.codegen[num_literals + num_offsets] = BAD_CODE;
        run_length_codes(&mut self.codegen, &mut self.codegen_freq);
    }

    fn dynamic_size(&self, extra_bits: i64) -> (i64, usize) {
        let mut num_codegens = CODEGEN_CODE_COUNT;
        while num_codegens > 4 && self.codegen_freq[CODEGEN_ORDER[num_codegens - 1]] == 0 {
            num_codegens -= 1;
        }
        let header = 3
            + 5
            + 5
            + 4
            + 3 * num_codegens as i64
            + self.codegen_encoding.bit_length(&self.codegen_freq)
            + i64::from(self.codegen_freq[16]) * 2
            + i64::from(self.codegen_freq[17]) * 3
            + i64::from(self.codegen_freq[18]) * 7;
        let size = header + self.literal_encoding.bit_length(&self.literal_freq) + self.offset_encoding.bit_length(&self.offset_freq) + extra_bits;
        (size, num_codegens)
    }

    fn fixed_size(&self, extra_bits: i64) -> i64 {
        3 + self.fixed_literal.bit_length(&self.literal_freq) + self.fixed_offset.bit_length(&self.offset_freq) + extra_bits
    }

    fn write_dynamic_header(&mut self, num_literals: usize, num_offsets: usize, num_codegens: usize, eof: bool) {
        self.bits.write_bits(if eof { 5 } else { 4 }, 3);
        self.bits.write_bits(num_literals.wrapping_sub(257) as u64, 5);
        self.bits.write_bits(num_offsets.wrapping_sub(1) as u64, 5);
        self.bits.write_bits(num_codegens.wrapping_sub(4) as u64, 4);
        for &sym in &CODEGEN_ORDER[..num_codegens] {
            self.bits.write_bits(u64::from(self.codegen_encoding.codes[sym].len), 3);
        }
        let mut i = 0;
        loop {
            let word = self.codegen[i];
            i += 1;
            if word == BAD_CODE {
                break;
            }
            let c = self.codegen_encoding.codes[usize::from(word)];
            self.bits.write_bits(u64::from(c.bits), u32::from(c.len));
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

    /// Go's `writeBlock`: the smallest of fixed, dynamic and (when `input` is known and
    /// short enough) stored.
    fn write_block(&mut self, tokens: &mut Vec<u32>, eof: bool, input: Option<&[u8]>) {
        tokens.push(END_BLOCK_MARKER);
        let (num_literals, num_offsets) = self.index_tokens(tokens);
        let stored = input.filter(|i| i.len() <= MAX_STORE_BLOCK_SIZE);
        let mut extra_bits = 0i64;
        if stored.is_some() {
            for code in LENGTH_CODES_START + 8..num_literals {
                extra_bits += i64::from(self.literal_freq[code]) * i64::from(LENGTH_EXTRA_BITS[code - LENGTH_CODES_START]);
            }
            for (freq, bits) in self.offset_freq[..num_offsets].iter().zip(&OFFSET_EXTRA_BITS).skip(4) {
                extra_bits += i64::from(*freq) * i64::from(*bits);
            }
        }
        let mut size = self.fixed_size(extra_bits);
        self.generate_codegen(num_literals, num_offsets);
        self.codegen_encoding.generate(&self.codegen_freq, 7);
        let (dynamic_size, num_codegens) = self.dynamic_size(extra_bits);
        let dynamic = dynamic_size < size;
        if dynamic {
            size = dynamic_size;
        }
        if let Some(input) = stored {
            if ((input.len() as i64 + 5) * 8) < size {
                self.write_stored_header(input.len(), eof);
                self.bits.write_bytes(input);
                return;
            }
        }
        if dynamic {
            self.write_dynamic_header(num_literals, num_offsets, num_codegens, eof);
        } else {
            self.bits.write_bits(if eof { 3 } else { 2 }, 3);
        }
        let (lit, off) =
            if dynamic { (&self.literal_encoding.codes, &self.offset_encoding.codes) } else { (&self.fixed_literal.codes, &self.fixed_offset.codes) };
        write_tokens(&mut self.bits, tokens, lit, off);
    }
}

/// Go's `writeTokens`; the end-of-block marker is an ordinary literal token here.
fn write_tokens(bits: &mut BitWriter, tokens: &[u32], lit: &[Code], off: &[Code]) {
    for &t in tokens {
        if t < MATCH_TYPE {
            let c = lit[t as usize];
            bits.write_bits(u64::from(c.bits), u32::from(c.len));
            continue;
        }
        let length = (t - MATCH_TYPE) >> LENGTH_SHIFT;
        let lc = length_code(length);
        let c = lit[lc + LENGTH_CODES_START];
        bits.write_bits(u64::from(c.bits), u32::from(c.len));
        if LENGTH_EXTRA_BITS[lc] > 0 {
            bits.write_bits(u64::from(length - LENGTH_BASE[lc]), u32::from(LENGTH_EXTRA_BITS[lc]));
        }
        let offset = t & OFFSET_MASK;
        let oc = offset_code(offset);
        let c = off[oc];
        bits.write_bits(u64::from(c.bits), u32::from(c.len));
        if OFFSET_EXTRA_BITS[oc] > 0 {
            bits.write_bits(u64::from(offset - OFFSET_BASE[oc]), u32::from(OFFSET_EXTRA_BITS[oc]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut d = Deflater::new();
        d.write(data);
        d.close();
        d.take_output()
    }

    #[test]
    fn code_tables_match_go() {
        assert_eq!((length_code(0), length_code(8), length_code(9), length_code(254), length_code(255)), (0, 8, 8, 27, 28));
        assert_eq!((offset_code(0), offset_code(4), offset_code(5), offset_code(6), offset_code(32767)), (0, 4, 4, 5, 29));
    }

    #[test]
    fn empty_input_is_an_empty_final_stored_block() {
        assert_eq!(deflate(b""), vec![0x01, 0x00, 0x00, 0xff, 0xff]);
    }

    #[test]
    fn round_trips_across_window_slides() {
        let data: Vec<u8> = (0..400_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 29) as u8 + b'a').collect();
        for len in [1, 3, 4, 5, 300, 65536, 65537, 400_000] {
            let mut out = Vec::new();
            flate2::read::DeflateDecoder::new(&deflate(&data[..len])[..]).read_to_end(&mut out).unwrap();
            assert_eq!(out, &data[..len], "len {len}");
        }
    }
}
