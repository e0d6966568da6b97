//! A faithful port of zlib 1.2.13's deflate (deflate.c here, trees.c in [`trees`]; Debian bookworm's
//! zlib1g), levels 1-9 with the default window (15 bits), memory level (8) and strategy.
//!
//! Ported from zlib, Copyright (C) 1995-2022 Jean-loup Gailly and Mark Adler, under the
//! zlib license. Levels 1-3 use `deflate_fast` (no lazy matching), 4-9 `deflate_slow`;
//! blocks end after 16383 symbols and are coded stored, fixed or dynamic, whichever is
//! smallest, with zlib's heap-built Huffman trees (ties broken by depth) and its
//! bit-length overflow repair. The window is managed exactly as zlib does it, stale bytes
//! included, because at the end of the input matches may be probed beyond the data.

mod trees;

use crate::layer::exact::bits::BitWriter;
use crate::layer::exact::match_len::match_len;
use trees::{d_code, length_code, StaticTrees, Tree, EXTRA_DBITS};

const W_SIZE: usize = 1 << 15;
const W_MASK: usize = W_SIZE - 1;
const WINDOW_SIZE: usize = 2 * W_SIZE;
const HASH_BITS: u32 = 15;
const HASH_SIZE: usize = 1 << HASH_BITS;
const HASH_MASK: u32 = (HASH_SIZE - 1) as u32;
const HASH_SHIFT: u32 = HASH_BITS.div_ceil(3);
const MIN_MATCH: usize = 3;
const MAX_MATCH: usize = 258;
const MIN_LOOKAHEAD: usize = MAX_MATCH + MIN_MATCH + 1;
const MAX_DIST: usize = W_SIZE - MIN_LOOKAHEAD;
const WIN_INIT: usize = MAX_MATCH;
const TOO_FAR: usize = 4096;
/// `lit_bufsize - 1` symbols end a block (memLevel 8: 16384).
const SYM_END: usize = (1 << (8 + 6)) - 1;

const LITERALS: usize = 256;
const END_BLOCK: usize = 256;
const L_CODES: usize = LITERALS + 1 + 29;
const D_CODES: usize = 30;
const BL_CODES: usize = 19;
const HEAP_SIZE: usize = 2 * L_CODES + 1;
const MAX_BITS: usize = 15;
const MAX_BL_BITS: usize = 7;
const REP_3_6: usize = 16;
const REPZ_3_10: usize = 17;
const REPZ_11_138: usize = 18;

/// One level's tuning (`configuration_table`).
#[derive(Clone, Copy, Debug)]
struct Config {
    good: usize,
    lazy: usize,
    nice: usize,
    chain: usize,
    slow: bool,
}

static CONFIGS: [Config; 10] = [
    Config { good: 0, lazy: 0, nice: 0, chain: 0, slow: false },
    Config { good: 4, lazy: 4, nice: 8, chain: 4, slow: false },
    Config { good: 4, lazy: 5, nice: 16, chain: 8, slow: false },
    Config { good: 4, lazy: 6, nice: 32, chain: 32, slow: false },
    Config { good: 4, lazy: 4, nice: 16, chain: 16, slow: true },
    Config { good: 8, lazy: 16, nice: 32, chain: 32, slow: true },
    Config { good: 8, lazy: 16, nice: 128, chain: 128, slow: true },
    Config { good: 8, lazy: 32, nice: 128, chain: 256, slow: true },
    Config { good: 32, lazy: 128, nice: 258, chain: 1024, slow: true },
    Config { good: 32, lazy: 258, nice: 258, chain: 4096, slow: true },
];

/// zlib's deflate state for one raw stream.
#[derive(Debug)]
pub(crate) struct Deflater {
    cfg: Config,
    window: Vec<u8>,
    prev: Vec<u16>,
    head: Vec<u16>,
    ins_h: u32,
    strstart: usize,
    block_start: i64,
    lookahead: usize,
    insert: usize,
    match_length: usize,
    prev_match: usize,
    match_available: bool,
    match_start: usize,
    prev_length: usize,
    high_water: usize,
    // Symbol buffer: (distance, literal or length - 3); distance 0 marks a literal.
    syms: Vec<(u16, u8)>,
    ltree: Tree,
    dtree: Tree,
    bltree: Tree,
    bl_count: [u16; MAX_BITS + 1],
    heap: [usize; 2 * L_CODES + 1],
    heap_len: usize,
    heap_max: usize,
    depth: [u8; 2 * L_CODES + 1],
    opt_len: u64,
    static_len: u64,
    statics: StaticTrees,
    bits: BitWriter,
    /// Input not yet taken into the window (zlib's `next_in`/`avail_in`).
    input: Vec<u8>,
    input_pos: usize,
    flavor: Flavor,
    level: usize,
    /// Matches among `syms` (gzip's `last_dist`).
    matches: usize,
    /// GNU gzip: the end of the input was read (gzip's `eofile`).
    eof: bool,
    /// The input given is the last.
    finishing: bool,
}

/// Which program's deflate the state reproduces: the two share their match finder and
/// trees and differ only in where blocks end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flavor {
    /// zlib 1.2.13, memLevel 8: a block ends after 16383 symbols.
    Zlib,
    /// GNU gzip: a block ends after 32767 symbols, or earlier, at every 4096th symbol, when
    /// an estimate says the block compresses well and is mostly literals (zlib's own
    /// `TRUNCATE_BLOCK` heuristic, compiled out of zlib, with gzip's constants).
    GnuGzip,
}

impl Flavor {
    fn sym_end(self) -> usize {
        match self {
            Flavor::Zlib => SYM_END,
            Flavor::GnuGzip => (1 << 15) - 1,
        }
    }
}

enum Flush {
    None,
    Finish,
}

impl Deflater {
    /// A raw deflate stream as `flavor` writes it at `level` (1-9).
    pub(crate) fn with_flavor(level: u8, flavor: Flavor) -> Self {
        let level = usize::from(level.clamp(1, 9));
        let mut d = Deflater {
            cfg: CONFIGS[level],
            // MIN_MATCH bytes of slack: GNU gzip hashes strings up to the end of its data,
            // which may be the end of the window.
            window: vec![0; WINDOW_SIZE + MIN_MATCH],
            prev: vec![0; W_SIZE],
            head: vec![0; HASH_SIZE],
            ins_h: 0,
            strstart: 0,
            block_start: 0,
            lookahead: 0,
            insert: 0,
            match_length: MIN_MATCH - 1,
            prev_match: 0,
            match_available: false,
            match_start: 0,
            prev_length: MIN_MATCH - 1,
            high_water: 0,
            syms: Vec::with_capacity(flavor.sym_end()),
            ltree: Tree::new(HEAP_SIZE),
            dtree: Tree::new(2 * D_CODES + 1),
            bltree: Tree::new(2 * BL_CODES + 1),
            bl_count: [0; MAX_BITS + 1],
            heap: [0; 2 * L_CODES + 1],
            heap_len: 0,
            heap_max: 0,
            depth: [0; 2 * L_CODES + 1],
            opt_len: 0,
            static_len: 0,
            statics: StaticTrees::new(),
            bits: BitWriter::default(),
            input: Vec::new(),
            input_pos: 0,
            flavor,
            level,
            matches: 0,
            eof: false,
            finishing: false,
        };
        d.init_block();
        d
    }

    /// `deflate(Z_NO_FLUSH)` over `data`.
    pub(crate) fn write(&mut self, data: &[u8]) {
        // zlib takes all of its input; GNU gzip may leave some for its next read.
        self.input.drain(..self.input_pos);
        self.input.extend_from_slice(data);
        self.input_pos = 0;
        if !data.is_empty() || self.lookahead != 0 {
            self.run(Flush::None);
        }
    }

    /// `deflate(Z_FINISH)`.
    pub(crate) fn finish(&mut self) {
        self.input.drain(..self.input_pos);
        self.input_pos = 0;
        self.run(Flush::Finish);
    }

    /// Compressed bytes produced so far.
    pub(crate) fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.bits.out)
    }

    fn avail_in(&self) -> usize {
        self.input.len() - self.input_pos
    }

    fn run(&mut self, flush: Flush) {
        self.finishing = matches!(flush, Flush::Finish);
        if self.cfg.slow {
            self.deflate_slow(&flush)
        } else {
            self.deflate_fast(&flush)
        }
    }

    #[inline(always)]
    fn update_hash(&mut self, c: u8) {
        self.ins_h = ((self.ins_h << HASH_SHIFT) ^ u32::from(c)) & HASH_MASK;
    }

    /// `INSERT_STRING`: returns the previous head of the chain.
    #[inline(always)]
    fn insert_string(&mut self, s: usize) -> usize {
        self.update_hash(self.window[s + MIN_MATCH - 1]);
        let head = self.head[self.ins_h as usize];
        self.prev[s & W_MASK] = head;
        self.head[self.ins_h as usize] = s as u16;
        usize::from(head)
    }

    fn slide_hash(&mut self) {
        let slide = |v: &mut u16| *v = if usize::from(*v) >= W_SIZE { *v - W_SIZE as u16 } else { 0 };
        self.head.iter_mut().for_each(slide);
        self.prev.iter_mut().for_each(slide);
    }

    fn fill_window(&mut self) {
        if self.flavor == Flavor::GnuGzip {
            return self.fill_window_gnu();
        }
        loop {
            let mut more = WINDOW_SIZE - self.lookahead - self.strstart;
            if self.strstart >= W_SIZE + MAX_DIST {
                self.window.copy_within(W_SIZE..W_SIZE + W_SIZE - more, 0);
                self.match_start = self.match_start.wrapping_sub(W_SIZE);
                self.strstart -= W_SIZE;
                self.block_start -= W_SIZE as i64;
                if self.insert > self.strstart {
                    self.insert = self.strstart;
                }
                self.slide_hash();
                more += W_SIZE;
            }
            if self.avail_in() == 0 {
                break;
            }
            let n = more.min(self.avail_in());
            let at = self.strstart + self.lookahead;
            self.window[at..at + n].copy_from_slice(&self.input[self.input_pos..self.input_pos + n]);
            self.input_pos += n;
            self.lookahead += n;
            if self.lookahead + self.insert >= MIN_MATCH {
                let mut s = self.strstart - self.insert;
                self.ins_h = u32::from(self.window[s]);
                self.update_hash(self.window[s + 1]);
                while self.insert > 0 {
                    self.update_hash(self.window[s + MIN_MATCH - 1]);
                    self.prev[s & W_MASK] = self.head[self.ins_h as usize];
                    self.head[self.ins_h as usize] = s as u16;
                    s += 1;
                    self.insert -= 1;
                    if self.lookahead + self.insert < MIN_MATCH {
                        break;
                    }
                }
            }
            if !(self.lookahead < MIN_LOOKAHEAD && self.avail_in() != 0) {
                break;
            }
        }
        // Zero the bytes just past the data the first time they are reachable.
        if self.high_water < WINDOW_SIZE {
            let curr = self.strstart + self.lookahead;
            if self.high_water < curr {
                let init = (WINDOW_SIZE - curr).min(WIN_INIT);
                self.window[curr..curr + init].fill(0);
                self.high_water = curr + init;
            } else if self.high_water < curr + WIN_INIT {
                let init = (curr + WIN_INIT - self.high_water).min(WINDOW_SIZE - self.high_water);
                self.window[self.high_water..self.high_water + init].fill(0);
                self.high_water += init;
            }
        }
    }

    /// GNU gzip's `fill_window`: it reads a file, so each read fills the window (or reaches
    /// the end of the input, after which it zeroes the two bytes past the data and never reads
    /// again), and it slides the whole upper half down. What lies past the end of the data
    /// differs from zlib's window, and matches near the end may read it.
    fn fill_window_gnu(&mut self) {
        while self.lookahead < MIN_LOOKAHEAD && !self.eof {
            let mut more = WINDOW_SIZE - self.lookahead - self.strstart;
            if self.strstart >= W_SIZE + MAX_DIST {
                self.window.copy_within(W_SIZE..2 * W_SIZE, 0);
                self.match_start = self.match_start.wrapping_sub(W_SIZE);
                self.strstart -= W_SIZE;
                self.block_start -= W_SIZE as i64;
                self.slide_hash();
                more += W_SIZE;
            }
            if self.avail_in() < more && !self.finishing {
                // A read would return less than it asks only at the end of the file: wait.
                return;
            }
            let n = more.min(self.avail_in());
            let at = self.strstart + self.lookahead;
            if n == 0 {
                self.eof = true;
                self.window[at..at + MIN_MATCH - 1].fill(0);
                return;
            }
            self.window[at..at + n].copy_from_slice(&self.input[self.input_pos..self.input_pos + n]);
            self.input_pos += n;
            self.lookahead += n;
            if self.strstart == 0 && self.lookahead == n {
                // lm_init: the hash of the first two bytes.
                self.ins_h = u32::from(self.window[0]);
                self.update_hash(self.window[1]);
            }
        }
    }

    /// zlib's portable `longest_match` (byte 2 is not compared: equal hashes imply it).
    fn longest_match(&mut self, mut cur_match: usize) -> usize {
        let mut chain_length = self.cfg.chain;
        let scan = self.strstart;
        let mut best_len = self.prev_length;
        let mut nice_match = self.cfg.nice;
        let limit = self.strstart.saturating_sub(MAX_DIST);
        let strend = scan + MAX_MATCH;
        let w = &self.window;
        let mut scan_end1 = w[scan + best_len - 1];
        let mut scan_end = w[scan + best_len];
        if self.prev_length >= self.cfg.good {
            chain_length >>= 2;
        }
        // zlib stops at a match reaching the end of the data; gzip looks on.
        if nice_match > self.lookahead && self.flavor == Flavor::Zlib {
            nice_match = self.lookahead;
        }
        loop {
            let m = cur_match;
            if w[m + best_len] == scan_end && w[m + best_len - 1] == scan_end1 && w[m] == w[scan] && w[m + 1] == w[scan + 1] {
                // Compare from byte 3 up to MAX_MATCH (byte 2 follows from the hash, as in
                // zlib): the first difference, or MAX_MATCH, a word at a time.
                let len = 3 + match_len(&w[scan + 3..strend], &w[m + 3..m + MAX_MATCH]);
                if len > best_len {
                    self.match_start = cur_match;
                    best_len = len;
                    if len >= nice_match {
                        break;
                    }
                    scan_end1 = w[scan + best_len - 1];
                    scan_end = w[scan + best_len];
                }
            }
            cur_match = usize::from(self.prev[cur_match & W_MASK]);
            if cur_match <= limit {
                break;
            }
            chain_length -= 1;
            if chain_length == 0 {
                break;
            }
        }
        best_len.min(self.lookahead)
    }

    #[inline(always)]
    fn tally_lit(&mut self, c: u8) -> bool {
        self.syms.push((0, c));
        self.ltree.freq[usize::from(c)] += 1;
        self.block_full()
    }

    #[inline(always)]
    fn tally_dist(&mut self, dist: usize, lc: usize) -> bool {
        self.syms.push((dist as u16, lc as u8));
        self.ltree.freq[length_code(lc) + LITERALS + 1] += 1;
        self.dtree.freq[d_code(dist - 1)] += 1;
        self.matches += 1;
        self.block_full()
    }

    /// GNU gzip searches for a match only with a full lookahead's room left in the window.
    #[inline(always)]
    fn may_match(&self) -> bool {
        self.flavor == Flavor::Zlib || self.strstart <= WINDOW_SIZE - MIN_LOOKAHEAD
    }

    /// Whether the block ends after the symbol just tallied.
    #[inline(always)]
    fn block_full(&self) -> bool {
        let n = self.syms.len();
        if self.flavor == Flavor::GnuGzip && self.level > 2 && n & 0xfff == 0 && self.truncate_block() {
            return true;
        }
        n == self.flavor.sym_end()
    }

    /// The `TRUNCATE_BLOCK` estimate: end the block when fewer than half its symbols are
    /// matches and an upper bound of its coded size is under half its input.
    #[cold]
    fn truncate_block(&self) -> bool {
        let n = self.syms.len();
        let mut out_length = n as u64 * 8;
        let in_length = (self.strstart as i64 - self.block_start) as u64;
        for (code, extra) in EXTRA_DBITS.iter().enumerate() {
            out_length += u64::from(self.dtree.freq[code]) * (5 + u64::from(*extra));
        }
        out_length >>= 3;
        self.matches < n / 2 && out_length < in_length / 2
    }

    /// `FLUSH_BLOCK_ONLY`.
    fn flush_block(&mut self, last: bool) {
        let stored_len = (self.strstart as i64 - self.block_start) as usize;
        let buf = (self.block_start >= 0).then_some(self.block_start as usize);
        self.tr_flush_block(buf, stored_len, last);
        self.block_start = self.strstart as i64;
    }

    fn deflate_fast(&mut self, flush: &Flush) {
        loop {
            if self.lookahead < MIN_LOOKAHEAD {
                self.fill_window();
                if self.lookahead < MIN_LOOKAHEAD && matches!(flush, Flush::None) {
                    return;
                }
                if self.lookahead == 0 {
                    break;
                }
            }
            let mut hash_head = 0;
            if self.lookahead >= MIN_MATCH || self.flavor == Flavor::GnuGzip {
                hash_head = self.insert_string(self.strstart);
            }
            if hash_head != 0 && self.strstart - hash_head <= MAX_DIST && self.may_match() {
                self.match_length = self.longest_match(hash_head);
            }
            let bflush;
            if self.match_length >= MIN_MATCH {
                bflush = self.tally_dist(self.strstart - self.match_start, self.match_length - MIN_MATCH);
                self.lookahead -= self.match_length;
                if self.match_length <= self.cfg.lazy && (self.lookahead >= MIN_MATCH || self.flavor == Flavor::GnuGzip) {
                    self.match_length -= 1;
                    loop {
                        self.strstart += 1;
                        self.insert_string(self.strstart);
                        self.match_length -= 1;
                        if self.match_length == 0 {
                            break;
                        }
                    }
                    self.strstart += 1;
                } else {
                    self.strstart += self.match_length;
                    self.match_length = 0;
                    self.ins_h = u32::from(self.window[self.strstart]);
                    self.update_hash(self.window[self.strstart + 1]);
                }
            } else {
                bflush = self.tally_lit(self.window[self.strstart]);
                self.lookahead -= 1;
                self.strstart += 1;
            }
            if bflush {
                self.flush_block(false);
            }
        }
        self.insert = self.strstart.min(MIN_MATCH - 1);
        if matches!(flush, Flush::Finish) {
            self.flush_block(true);
        } else if !self.syms.is_empty() {
            self.flush_block(false);
        }
    }

    fn deflate_slow(&mut self, flush: &Flush) {
        loop {
            if self.lookahead < MIN_LOOKAHEAD {
                self.fill_window();
                if self.lookahead < MIN_LOOKAHEAD && matches!(flush, Flush::None) {
                    return;
                }
                if self.lookahead == 0 {
                    break;
                }
            }
            let mut hash_head = 0;
            if self.lookahead >= MIN_MATCH || self.flavor == Flavor::GnuGzip {
                hash_head = self.insert_string(self.strstart);
            }
            self.prev_length = self.match_length;
            self.prev_match = self.match_start;
            self.match_length = MIN_MATCH - 1;
            if hash_head != 0 && self.prev_length < self.cfg.lazy && self.strstart - hash_head <= MAX_DIST && self.may_match() {
                self.match_length = self.longest_match(hash_head);
                // zlib: `match_length <= 5 && (Z_FILTERED || (match_length == 3 && far))`; the
                // strategy is the default, so only short, far matches are dropped.
                if self.match_length == MIN_MATCH && self.strstart - self.match_start > TOO_FAR {
                    self.match_length = MIN_MATCH - 1;
                }
            }
            if self.prev_length >= MIN_MATCH && self.match_length <= self.prev_length {
                let max_insert = self.strstart + self.lookahead - MIN_MATCH;
                let bflush = self.tally_dist(self.strstart - 1 - self.prev_match, self.prev_length - MIN_MATCH);
                self.lookahead -= self.prev_length - 1;
                self.prev_length -= 2;
                loop {
                    self.strstart += 1;
                    if self.strstart <= max_insert || self.flavor == Flavor::GnuGzip {
                        self.insert_string(self.strstart);
                    }
                    self.prev_length -= 1;
                    if self.prev_length == 0 {
                        break;
                    }
                }
                self.match_available = false;
                self.match_length = MIN_MATCH - 1;
                self.strstart += 1;
                if bflush {
                    self.flush_block(false);
                }
            } else if self.match_available {
                if self.tally_lit(self.window[self.strstart - 1]) {
                    self.flush_block(false);
                }
                self.strstart += 1;
                self.lookahead -= 1;
            } else {
                self.match_available = true;
                self.strstart += 1;
                self.lookahead -= 1;
            }
        }
        if self.match_available {
            self.tally_lit(self.window[self.strstart - 1]);
            self.match_available = false;
        }
        self.insert = self.strstart.min(MIN_MATCH - 1);
        if matches!(flush, Flush::Finish) {
            self.flush_block(true);
        } else if !self.syms.is_empty() {
            self.flush_block(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn deflate(data: &[u8], level: u8) -> Vec<u8> {
        let mut d = Deflater::with_flavor(level, Flavor::Zlib);
        for chunk in data.chunks(10_000) {
            d.write(chunk);
        }
        d.finish();
        d.take_output()
    }

    #[test]
    fn code_tables_match_zlib() {
        assert_eq!((length_code(0), length_code(8), length_code(9), length_code(254), length_code(255)), (0, 8, 8, 27, 28));
        assert_eq!((d_code(0), d_code(4), d_code(5), d_code(6), d_code(255), d_code(256), d_code(32767)), (0, 4, 4, 5, 15, 16, 29));
        assert_eq!(d_code(24576), 29);
        assert_eq!(d_code(24575), 28);
    }

    #[test]
    fn empty_input_is_zlibs_empty_stream() {
        // zlib's Z_FINISH on nothing: one final fixed block holding only end-of-block.
        assert_eq!(deflate(b"", 6), vec![0x03, 0x00]);
    }

    #[test]
    fn every_level_round_trips() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 28) as u8 + b'a').collect();
        for level in 1..=9 {
            for len in [1, 2, 3, 300, 70_000, 200_000] {
                let mut out = Vec::new();
                flate2::read::DeflateDecoder::new(&deflate(&data[..len], level)[..]).read_to_end(&mut out).unwrap();
                assert_eq!(out, &data[..len], "level {level} len {len}");
            }
        }
    }
}
