//! A faithful port of zlib 1.2.13's deflate (deflate.c here, trees.c in [`trees`]; Debian bookworm's
//! zlib1g), levels 1-9 with the default window (15 bits), memory level (8) and strategy.
//!
//! Ported from zlib, Copyright (C) 1995-2022 Jean-loup Gailly and Mark Adler, under the
//! zlib license. Levels 1-3 use `deflate_fast` (no lazy matching), 4-9 `deflate_slow`;
//! blocks end after 16383 symbols and are coded stored, fixed or dynamic, whichever is
//! smallest, with zlib's heap-built Huffman trees (ties broken by depth) and its
//! bit-length overflow repair. The window is managed exactly as zlib does it, stale bytes
//! included, because at the end of the input matches may be probed beyond the data.
//!
//! One part is not zlib's code: at levels 8 and 9, where zlib walks hash chains of up to
//! 1,024 and 4,096 links, `longest_match` finds the same match by jumping between chains
//! (`Deflater::search`); levels 1-7 walk as zlib does (`Deflater::walk`).

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

/// The shortest `chain_length` at which [`Deflater::search`] jumps between chains (levels
/// 8 and 9): below it, keeping the extra chains cost more than it saved, measured on the
/// changed gzip members of the debian-update pair.
const JUMP_CHAIN: usize = 1024;

/// Bytes in the strings of [`Deflater`]'s long chains.
const LONG: usize = 4;

/// The long chain of the string at `s`: a hash of its first [`LONG`] bytes.
#[inline(always)]
fn hash_long(w: &[u8], s: usize) -> usize {
    let v = u32::from_le_bytes(w[s..s + LONG].try_into().expect("LONG bytes"));
    (v.wrapping_mul(0x9E37_79B1) >> (32 - HASH_BITS)) as usize
}

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
    /// Levels that jump between chains only: per window position, how many strings its
    /// hash chain had received when it was linked (wrapping). Two ranks on one chain
    /// tell how many links lie between them, which lets [`Deflater::longest_match`] follow
    /// another chain and still stop where zlib's `chain_length` would have.
    rank: Vec<u16>,
    /// Per hash chain, the rank its next string gets.
    chain_rank: Vec<u16>,
    /// Levels that jump between chains only: chains of strings by a hash of their first
    /// [`LONG`] bytes (zlib's hashes three), linked like `prev` and `head`; much shorter in
    /// text than zlib's.
    prev_long: Vec<u16>,
    head_long: Vec<u16>,
    /// Whether [`Deflater::search`] jumps between chains (and the fields above are kept).
    jumps: bool,
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

/// The best match a search from `scan` has found, and the bytes a longer one must match
/// where this one ends (zlib's `scan_end1` and `scan_end`).
struct Best {
    len: usize,
    start: usize,
    end1: u8,
    end: u8,
}

impl Best {
    fn new(w: &[u8], scan: usize, len: usize, start: usize) -> Self {
        Best { len, start, end1: w[scan + len - 1], end: w[scan + len] }
    }

    /// zlib's quick test of candidate `m`: the two bytes where a longer match would end,
    /// then the first two (the third follows from the hash on the scan's chain).
    #[inline(always)]
    fn may_beat(&self, w: &[u8], scan: usize, m: usize) -> bool {
        w[m + self.len] == self.end && w[m + self.len - 1] == self.end1 && w[m] == w[scan] && w[m + 1] == w[scan + 1]
    }

    /// Takes `m`, whose first three bytes are the scan's, if its match is longer; whether
    /// it was.
    #[inline(always)]
    fn offer(&mut self, w: &[u8], scan: usize, m: usize) -> bool {
        let len = 3 + match_len(&w[scan + 3..scan + MAX_MATCH], &w[m + 3..m + MAX_MATCH]);
        if len <= self.len {
            return false;
        }
        *self = Best::new(w, scan, len, m);
        true
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
        let jumps = CONFIGS[level].slow && CONFIGS[level].chain >= JUMP_CHAIN;
        let mut d = Deflater {
            cfg: CONFIGS[level],
            // MIN_MATCH bytes of slack: GNU gzip hashes strings up to the end of its data,
            // which may be the end of the window.
            window: vec![0; WINDOW_SIZE + MIN_MATCH],
            prev: vec![0; W_SIZE],
            head: vec![0; HASH_SIZE],
            rank: if jumps { vec![0; W_SIZE] } else { Vec::new() },
            chain_rank: if jumps { vec![0; HASH_SIZE] } else { Vec::new() },
            prev_long: if jumps { vec![0; W_SIZE] } else { Vec::new() },
            head_long: if jumps { vec![0; HASH_SIZE] } else { Vec::new() },
            jumps,
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
        self.link(s)
    }

    /// Puts string `s` at the head of the chain of `ins_h` (its hash) and, at the levels
    /// that jump between chains, ranks it there and links it on its long chain; returns the
    /// previous head.
    #[inline(always)]
    fn link(&mut self, s: usize) -> usize {
        let h = self.ins_h as usize;
        let head = self.head[h];
        self.prev[s & W_MASK] = head;
        self.head[h] = s as u16;
        if self.jumps {
            let rank = self.chain_rank[h].wrapping_add(1);
            self.chain_rank[h] = rank;
            self.rank[s & W_MASK] = rank;
            // The window holds LONG bytes from `s` on: GNU gzip's MIN_MATCH bytes of slack.
            let h = hash_long(&self.window, s);
            self.prev_long[s & W_MASK] = self.head_long[h];
            self.head_long[h] = s as u16;
        }
        usize::from(head)
    }

    fn slide_hash(&mut self) {
        let slide = |v: &mut u16| *v = if usize::from(*v) >= W_SIZE { *v - W_SIZE as u16 } else { 0 };
        self.head.iter_mut().for_each(slide);
        self.prev.iter_mut().for_each(slide);
        if self.jumps {
            self.head_long.iter_mut().for_each(slide);
            self.prev_long.iter_mut().for_each(slide);
        }
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
                    self.link(s);
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

    /// zlib's `longest_match`: of the first `chain_length` strings on the scan's chain
    /// after the limit, the first with the longest match, if longer than `prev_length`
    /// (byte 2 is not compared: equal hashes imply it). [`Deflater::search`] finds it.
    fn longest_match(&mut self, hash_head: usize) -> usize {
        let (len, start) = if self.jumps {
            let found = self.search(hash_head);
            // Every test that encodes at a level that jumps checks it against zlib's walk.
            #[cfg(test)]
            assert_eq!(found, self.walk(hash_head), "longest_match at {} ({:?}, chain {})", self.strstart, self.flavor, self.cfg.chain);
            found
        } else {
            self.walk(hash_head)
        };
        self.match_start = start;
        len
    }

    /// [`Deflater::walk`]'s result found in fewer links, at the levels that link every
    /// string and have long chains to walk ([`JUMP_CHAIN`]):
    ///
    /// - A better match than `best_len` bytes holds the scan's string of [`LONG`] bytes at
    ///   every offset `i <= best_len + 1 - LONG`; at such a candidate `q`, the string at
    ///   `q + i` is on that string's long chain. Once a match is found at `m`, the next
    ///   better candidate lies on the long chain through `m + i`, past it; the offset whose
    ///   next link lies furthest back skips the most candidates that cannot be better
    ///   (zlib-ng's `longest_match_slow` jumps the same way). Before any match, the long chain
    ///   of the string that ends a byte past `prev_length` is walked from its head, once the
    ///   scan's chain has reached the candidates whose string there is linked already.
    /// - A candidate from another chain is the scan's when its first three bytes are the
    ///   scan's (then so is its hash), and zlib would have looked at it only when its rank
    ///   says that fewer than `chain_length` links separate it from the scan: past such a
    ///   candidate, the search stops.
    /// - A long chain walked for as many links as zlib had left is given up: the walk goes
    ///   back to the scan's chain where it left it and counts as zlib does.
    fn search(&self, hash_head: usize) -> (usize, usize) {
        let (chain, limit, nice_match) = self.search_bounds();
        let scan = self.strstart;
        let (w, prev, prev_long, rank) = (&self.window, &self.prev, &self.prev_long, &self.rank);
        let scan_rank = rank[scan & W_MASK];
        // Links between the scan and `m` on the scan's chain (0 for its head).
        let links = |m: usize| usize::from(scan_rank.wrapping_sub(rank[m & W_MASK]).wrapping_sub(1));
        let mut best = Best::new(w, scan, self.prev_length, self.match_start);
        // The candidate is `link - offset`: `link` is on the scan's chain (offset 0), or on
        // the long chain of the scan's string at `offset`.
        let mut link = hash_head;
        let (mut long, mut offset) = (false, 0);
        // On the scan's chain: the candidates zlib may still look at, this one included. On
        // a long one: the links zlib had left, which it may follow.
        let mut left = chain;
        // Where the scan's chain is taken up again, and the candidates left there.
        let mut resume = (0, 0);
        // Before any match: the offset of the long chain to take from its head.
        let mut end = (best.len + 1).saturating_sub(LONG);
        loop {
            if end != 0 && !long && link + end <= scan {
                resume = (link, left);
                (link, long, offset, end) = (usize::from(self.head_long[hash_long(w, scan + end)]), true, end, 0);
                if link <= limit + offset {
                    break;
                }
                continue;
            }
            let m = link - offset;
            if best.may_beat(w, scan, m) && (!long || w[m + 2] == w[scan + 2]) {
                if long && links(m) >= chain {
                    break;
                }
                if best.offer(w, scan, m) {
                    if best.len >= nice_match {
                        break;
                    }
                    end = 0;
                    // The next candidate after `m` on the scan's chain, or on a long chain
                    // through the match at an offset whose string lies before the scan
                    // (and so is linked): whichever lies furthest back.
                    let (mut at, mut bound, mut on_long) = (0, prev[m & W_MASK] as isize, false);
                    if best.len >= LONG {
                        for i in 0..=(best.len - LONG).min(scan - 1 - m) {
                            let b = prev_long[(m + i) & W_MASK] as isize - i as isize;
                            if b < bound {
                                (at, bound, on_long) = (i, b, true);
                            }
                        }
                    }
                    left = chain - 1 - links(m);
                    resume = (usize::from(prev[m & W_MASK]), left);
                    if bound <= limit as isize || left == 0 {
                        break;
                    }
                    (link, long, offset) = (bound as usize + at, on_long, at);
                    continue;
                }
            }
            link = usize::from(if long { prev_long[link & W_MASK] } else { prev[link & W_MASK] });
            left -= 1;
            if left == 0 {
                if !long {
                    break;
                }
                // As many links followed as zlib had left: back to the scan's chain.
                (link, left) = resume;
                (long, offset) = (false, 0);
                if left == 0 {
                    break;
                }
            }
            if link <= limit + offset {
                break;
            }
        }
        (best.len.min(self.lookahead), best.start)
    }

    /// The candidates zlib looks at (`chain_length`), the position a candidate must lie
    /// past (`limit`) and the length that ends the search (`nice_match`).
    fn search_bounds(&self) -> (usize, usize, usize) {
        let chain = if self.prev_length >= self.cfg.good { self.cfg.chain >> 2 } else { self.cfg.chain };
        // zlib stops at a match reaching the end of the data; gzip looks on.
        let nice = if self.flavor == Flavor::Zlib { self.cfg.nice.min(self.lookahead) } else { self.cfg.nice };
        (chain, self.strstart.saturating_sub(MAX_DIST), nice)
    }

    /// [`Deflater::longest_match`]'s result as zlib finds it, link by link down the scan's
    /// chain: the match length and where it starts (the previous start when none beats
    /// `prev_length`).
    fn walk(&self, mut cur_match: usize) -> (usize, usize) {
        let (mut chain_length, limit, nice_match) = self.search_bounds();
        let (w, scan) = (&self.window, self.strstart);
        let mut best = Best::new(w, scan, self.prev_length, self.match_start);
        loop {
            if best.may_beat(w, scan, cur_match) && best.offer(w, scan, cur_match) && best.len >= nice_match {
                break;
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
        (best.len.min(self.lookahead), best.start)
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

    /// Words of a small vocabulary, lines and indentation: long hash chains, many matches
    /// and lazy matches to beat, as in changelogs and manual pages.
    fn prose(len: usize, seed: u64) -> Vec<u8> {
        const WORDS: [&str; 24] = [
            "the",
            "package",
            "debian",
            "fix",
            "security",
            "update",
            "version",
            "upstream",
            "new",
            "release",
            "for",
            "in",
            "of",
            "to",
            "and",
            "changelog",
            "--",
            "urgency=medium",
            "  * ",
            "\n",
            "\n\n",
            "CVE-2024-",
            "bookworm",
            "0.1.2",
        ];
        let mut x = seed;
        let mut out = Vec::with_capacity(len + 32);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(WORDS[(x % WORDS.len() as u64) as usize].as_bytes());
            if !x.is_multiple_of(5) {
                out.push(b' ');
            }
            if x.is_multiple_of(97) {
                // A repeated run, and digits: short and very long matches.
                out.extend(std::iter::repeat_n(b'=', (x % 300) as usize));
                out.extend(format!("{}", x % 100_000).bytes());
            }
        }
        out.truncate(len);
        out
    }

    #[test]
    fn the_search_finds_what_zlibs_walk_finds() {
        // `longest_match` asserts, in tests, that the search agrees with zlib's walk at every
        // call: text with long chains, across the window's slides, at the levels that jump,
        // for both programs, written whole and in small pieces.
        for (seed, len) in [(1, 300_000), (2, 70_000), (3, 5_000)] {
            let data = prose(len, seed);
            for level in 8..=9 {
                for flavor in [Flavor::Zlib, Flavor::GnuGzip] {
                    for piece in [len, 4_096] {
                        let mut d = Deflater::with_flavor(level, flavor);
                        data.chunks(piece).for_each(|c| d.write(c));
                        d.finish();
                        let mut out = Vec::new();
                        flate2::read::DeflateDecoder::new(&d.take_output()[..]).read_to_end(&mut out).unwrap();
                        assert!(out == data, "level {level} {flavor:?} pieces of {piece}");
                    }
                }
            }
        }
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
