//! zlib 1.2.13's trees.c: the literal/length and distance codes, Huffman trees built on a
//! heap (ties broken by depth) with the bit-length overflow repair, and the choice of a
//! stored, fixed or dynamic block, whichever is smallest. Ported from zlib, Copyright (C)
//! 1995-2022 Jean-loup Gailly and Mark Adler, under the zlib license.

use super::*;

pub(super) static EXTRA_LBITS: [u8; 29] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0];
pub(super) static EXTRA_DBITS: [u8; 30] = [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13];
pub(super) static EXTRA_BLBITS: [u8; 19] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3, 7];
pub(super) static BL_ORDER: [usize; 19] = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15];
pub(super) static BASE_LENGTH: [u32; 29] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 0];
pub(super) static BASE_DIST: [u32; 30] =
    [0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576];

/// zlib's `_length_code`: length code (0-28) of `length - 3`.
#[inline(always)]
pub(super) fn length_code(lc: usize) -> usize {
    usize::from(LENGTH_CODE[lc & 255])
}

/// zlib's `d_code`: distance code of `distance - 1`, via its 512-entry `_dist_code`.
#[inline(always)]
pub(super) fn d_code(dist: usize) -> usize {
    usize::from(if dist < 256 { DIST_CODE[dist] } else { DIST_CODE[256 + ((dist >> 7) & 255)] })
}

pub(super) static LENGTH_CODE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut code = 0;
    let mut lc = 0;
    while lc < 256 {
        while code < 27 && lc >= BASE_LENGTH[code + 1] as usize {
            code += 1;
        }
        t[lc] = code as u8;
        lc += 1;
    }
    t[255] = 28;
    t
};

pub(super) static DIST_CODE: [u8; 512] = {
    let mut t = [0u8; 512];
    let mut i = 0;
    while i < 512 {
        // Entries 0-255 code distances - 1 below 256; 256-511 code (distance - 1) >> 7.
        let dist = if i < 256 { i } else { (i - 256) << 7 };
        let mut code = 0;
        while code < 29 && dist >= BASE_DIST[code + 1] as usize {
            code += 1;
        }
        t[i] = code as u8;
        i += 1;
    }
    t
};

/// A Huffman tree in zlib's layout: leaves first, then internal nodes. zlib overlays
/// `freq` with `code` and `dad` with `len`; the overlaid values are never read after being
/// overwritten, so separate fields behave the same.
#[derive(Clone, Debug)]
pub(super) struct Tree {
    pub(super) freq: Vec<u32>,
    code: Vec<u16>,
    dad: Vec<u16>,
    len: Vec<u16>,
    max_code: i32,
}

impl Tree {
    pub(super) fn new(size: usize) -> Self {
        Tree { freq: vec![0; size], code: vec![0; size], dad: vec![0; size], len: vec![0; size], max_code: 0 }
    }
}

/// The fixed trees of RFC 1951.
#[derive(Debug)]
pub(super) struct StaticTrees {
    lcode: Vec<u16>,
    llen: Vec<u16>,
    dcode: Vec<u16>,
}

pub(super) fn bi_reverse(code: u32, len: u32) -> u16 {
    (code.reverse_bits() >> (32 - len)) as u16
}

impl StaticTrees {
    pub(super) fn new() -> Self {
        let mut llen = vec![0u16; L_CODES + 2];
        for (n, l) in llen.iter_mut().enumerate() {
            *l = match n {
                0..=143 => 8,
                144..=255 => 9,
                256..=279 => 7,
                _ => 8,
            };
        }
        let mut bl_count = [0u16; MAX_BITS + 1];
        for &l in &llen {
            bl_count[usize::from(l)] += 1;
        }
        let lcode = gen_codes(&llen, L_CODES + 1, &bl_count);
        let dcode = (0..D_CODES).map(|n| bi_reverse(n as u32, 5)).collect();
        StaticTrees { lcode, llen, dcode }
    }
}

/// zlib's `gen_codes`: canonical codes from the lengths.
pub(super) fn gen_codes(len: &[u16], max_code: usize, bl_count: &[u16; MAX_BITS + 1]) -> Vec<u16> {
    let mut next_code = [0u32; MAX_BITS + 1];
    let mut code = 0u32;
    for bits in 1..=MAX_BITS {
        code = (code + u32::from(bl_count[bits - 1])) << 1;
        next_code[bits] = code;
    }
    let mut codes = vec![0u16; len.len()];
    for n in 0..=max_code.min(len.len() - 1) {
        let l = usize::from(len[n]);
        if l == 0 {
            continue;
        }
        codes[n] = bi_reverse(next_code[l], l as u32);
        next_code[l] += 1;
    }
    codes
}

impl Deflater {
    pub(super) fn init_block(&mut self) {
        self.ltree.freq[..L_CODES].fill(0);
        self.dtree.freq[..D_CODES].fill(0);
        self.bltree.freq[..BL_CODES].fill(0);
        self.ltree.freq[END_BLOCK] = 1;
        self.opt_len = 0;
        self.static_len = 0;
        self.syms.clear();
        self.matches = 0;
    }

    /// `_tr_flush_block`: `buf` is where the block's input starts in the window, if still
    /// there.
    pub(super) fn tr_flush_block(&mut self, buf: Option<usize>, stored_len: usize, last: bool) {
        let mut ltree = std::mem::replace(&mut self.ltree, Tree::new(0));
        let mut dtree = std::mem::replace(&mut self.dtree, Tree::new(0));
        self.build_tree(&mut ltree, TreeKind::Literal);
        self.build_tree(&mut dtree, TreeKind::Distance);
        let max_blindex = self.build_bl_tree(&mut ltree, &mut dtree);
        let mut opt_lenb = (self.opt_len + 3 + 7) >> 3;
        let static_lenb = (self.static_len + 3 + 7) >> 3;
        if static_lenb <= opt_lenb {
            opt_lenb = static_lenb;
        }
        match buf {
            Some(start) if stored_len as u64 + 4 <= opt_lenb => {
                self.bits.write_bits(u64::from(last), 3);
                self.bits.flush();
                self.bits.write_bits(stored_len as u64 & 0xffff, 16);
                self.bits.write_bits(!(stored_len as u64) & 0xffff, 16);
                let bytes = self.window[start..start + stored_len].to_vec();
                self.bits.write_bytes(&bytes);
            }
            _ if static_lenb == opt_lenb => {
                self.bits.write_bits((1 << 1) + u64::from(last), 3);
                let (lcode, llen, dcode) = (&self.statics.lcode, &self.statics.llen, &self.statics.dcode);
                let dlen = [5u16; D_CODES];
                compress_block(&mut self.bits, &self.syms, lcode, llen, dcode, &dlen);
            }
            _ => {
                self.bits.write_bits((2 << 1) + u64::from(last), 3);
                self.send_all_trees(&ltree, &dtree, ltree.max_code as usize + 1, dtree.max_code as usize + 1, max_blindex + 1);
                compress_block(&mut self.bits, &self.syms, &ltree.code, &ltree.len, &dtree.code, &dtree.len);
            }
        }
        self.ltree = ltree;
        self.dtree = dtree;
        self.init_block();
        if last {
            self.bits.flush();
        }
    }

    pub(super) fn smaller(&self, tree: &Tree, n: usize, m: usize) -> bool {
        tree.freq[n] < tree.freq[m] || (tree.freq[n] == tree.freq[m] && self.depth[n] <= self.depth[m])
    }

    pub(super) fn pqdownheap(&mut self, tree: &Tree, mut k: usize) {
        let v = self.heap[k];
        let mut j = k << 1;
        while j <= self.heap_len {
            if j < self.heap_len && self.smaller(tree, self.heap[j + 1], self.heap[j]) {
                j += 1;
            }
            if self.smaller(tree, v, self.heap[j]) {
                break;
            }
            self.heap[k] = self.heap[j];
            k = j;
            j <<= 1;
        }
        self.heap[k] = v;
    }

    pub(super) fn build_tree(&mut self, tree: &mut Tree, kind: TreeKind) {
        let elems = kind.elems();
        let mut max_code: i32 = -1;
        self.heap_len = 0;
        self.heap_max = HEAP_SIZE;
        for n in 0..elems {
            if tree.freq[n] != 0 {
                self.heap_len += 1;
                self.heap[self.heap_len] = n;
                max_code = n as i32;
                self.depth[n] = 0;
            } else {
                tree.len[n] = 0;
            }
        }
        // At least two codes of non-zero frequency.
        while self.heap_len < 2 {
            let node = if max_code < 2 {
                max_code += 1;
                max_code as usize
            } else {
                0
            };
            self.heap_len += 1;
            self.heap[self.heap_len] = node;
            tree.freq[node] = 1;
            self.depth[node] = 0;
            self.opt_len = self.opt_len.wrapping_sub(1);
            if let Some(slen) = kind.static_len(node, &self.statics) {
                self.static_len = self.static_len.wrapping_sub(slen);
            }
        }
        tree.max_code = max_code;
        for n in (1..=self.heap_len / 2).rev() {
            self.pqdownheap(tree, n);
        }
        let mut node = elems;
        loop {
            // pqremove
            let n = self.heap[1];
            self.heap[1] = self.heap[self.heap_len];
            self.heap_len -= 1;
            self.pqdownheap(tree, 1);
            let m = self.heap[1];
            self.heap_max -= 1;
            self.heap[self.heap_max] = n;
            self.heap_max -= 1;
            self.heap[self.heap_max] = m;
            tree.freq[node] = tree.freq[n] + tree.freq[m];
            self.depth[node] = self.depth[n].max(self.depth[m]) + 1;
            tree.dad[n] = node as u16;
            tree.dad[m] = node as u16;
            self.heap[1] = node;
            node += 1;
            self.pqdownheap(tree, 1);
            if self.heap_len < 2 {
                break;
            }
        }
        self.heap_max -= 1;
        self.heap[self.heap_max] = self.heap[1];
        self.gen_bitlen(tree, kind);
        tree.code = gen_codes(&tree.len, max_code.max(0) as usize, &self.bl_count);
    }

    pub(super) fn gen_bitlen(&mut self, tree: &mut Tree, kind: TreeKind) {
        let max_code = tree.max_code;
        let max_length = kind.max_length();
        let mut overflow = 0i32;
        self.bl_count = [0; MAX_BITS + 1];
        tree.len[self.heap[self.heap_max]] = 0;
        let mut h = self.heap_max + 1;
        while h < HEAP_SIZE {
            let n = self.heap[h];
            let mut bits = usize::from(tree.len[usize::from(tree.dad[n])]) + 1;
            if bits > max_length {
                bits = max_length;
                overflow += 1;
            }
            tree.len[n] = bits as u16;
            h += 1;
            if n as i32 > max_code {
                continue;
            }
            self.bl_count[bits] += 1;
            let xbits = kind.extra_bits(n);
            let f = u64::from(tree.freq[n]);
            self.opt_len = self.opt_len.wrapping_add(f * (bits + xbits) as u64);
            if let Some(slen) = kind.static_len(n, &self.statics) {
                self.static_len = self.static_len.wrapping_add(f * (slen + xbits as u64));
            }
        }
        if overflow == 0 {
            return;
        }
        loop {
            let mut bits = max_length - 1;
            while self.bl_count[bits] == 0 {
                bits -= 1;
            }
            self.bl_count[bits] -= 1;
            self.bl_count[bits + 1] += 2;
            self.bl_count[max_length] -= 1;
            overflow -= 2;
            if overflow <= 0 {
                break;
            }
        }
        let mut h = HEAP_SIZE;
        for bits in (1..=max_length).rev() {
            let mut n = self.bl_count[bits];
            while n != 0 {
                h -= 1;
                let m = self.heap[h];
                if m as i32 > max_code {
                    continue;
                }
                if usize::from(tree.len[m]) != bits {
                    self.opt_len = self.opt_len.wrapping_add((bits as u64).wrapping_sub(u64::from(tree.len[m])).wrapping_mul(u64::from(tree.freq[m])));
                    tree.len[m] = bits as u16;
                }
                n -= 1;
            }
        }
    }

    /// `scan_tree`: bit-length code frequencies for a tree's lengths.
    pub(super) fn scan_tree(&mut self, tree: &mut Tree) {
        let max_code = tree.max_code;
        let mut prevlen: i32 = -1;
        let mut nextlen = i32::from(tree.len[0]);
        let mut count = 0;
        let (mut max_count, mut min_count) = if nextlen == 0 { (138, 3) } else { (7, 4) };
        tree.len[(max_code + 1) as usize] = 0xffff;
        for n in 0..=max_code {
            let curlen = nextlen;
            nextlen = i32::from(tree.len[(n + 1) as usize]);
            count += 1;
            if count < max_count && curlen == nextlen {
                continue;
            } else if count < min_count {
                self.bltree.freq[curlen as usize] += count as u32;
            } else if curlen != 0 {
                if curlen != prevlen {
                    self.bltree.freq[curlen as usize] += 1;
                }
                self.bltree.freq[REP_3_6] += 1;
            } else if count <= 10 {
                self.bltree.freq[REPZ_3_10] += 1;
            } else {
                self.bltree.freq[REPZ_11_138] += 1;
            }
            count = 0;
            prevlen = curlen;
            (max_count, min_count) = if nextlen == 0 {
                (138, 3)
            } else if curlen == nextlen {
                (6, 3)
            } else {
                (7, 4)
            };
        }
    }

    pub(super) fn build_bl_tree(&mut self, ltree: &mut Tree, dtree: &mut Tree) -> usize {
        self.scan_tree(ltree);
        self.scan_tree(dtree);
        let mut bltree = std::mem::replace(&mut self.bltree, Tree::new(0));
        self.build_tree(&mut bltree, TreeKind::BitLength);
        self.bltree = bltree;
        let mut max_blindex = BL_CODES - 1;
        while max_blindex >= 3 {
            if self.bltree.len[BL_ORDER[max_blindex]] != 0 {
                break;
            }
            max_blindex -= 1;
        }
        self.opt_len = self.opt_len.wrapping_add(3 * (max_blindex as u64 + 1) + 5 + 5 + 4);
        max_blindex
    }

    pub(super) fn send_bl_code(&mut self, c: usize) {
        self.bits.write_bits(u64::from(self.bltree.code[c]), u32::from(self.bltree.len[c]));
    }

    pub(super) fn send_tree(&mut self, tree: &Tree, max_code: usize) {
        let mut prevlen: i32 = -1;
        let mut nextlen = i32::from(tree.len[0]);
        let mut count = 0;
        let (mut max_count, mut min_count) = if nextlen == 0 { (138, 3) } else { (7, 4) };
        for n in 0..=max_code {
            let curlen = nextlen;
            nextlen = i32::from(tree.len[n + 1]);
            count += 1;
            if count < max_count && curlen == nextlen {
                continue;
            } else if count < min_count {
                while count != 0 {
                    self.send_bl_code(curlen as usize);
                    count -= 1;
                }
            } else if curlen != 0 {
                if curlen != prevlen {
                    self.send_bl_code(curlen as usize);
                    count -= 1;
                }
                self.send_bl_code(REP_3_6);
                self.bits.write_bits((count - 3) as u64, 2);
            } else if count <= 10 {
                self.send_bl_code(REPZ_3_10);
                self.bits.write_bits((count - 3) as u64, 3);
            } else {
                self.send_bl_code(REPZ_11_138);
                self.bits.write_bits((count - 11) as u64, 7);
            }
            count = 0;
            prevlen = curlen;
            (max_count, min_count) = if nextlen == 0 {
                (138, 3)
            } else if curlen == nextlen {
                (6, 3)
            } else {
                (7, 4)
            };
        }
    }

    pub(super) fn send_all_trees(&mut self, ltree: &Tree, dtree: &Tree, lcodes: usize, dcodes: usize, blcodes: usize) {
        self.bits.write_bits((lcodes - 257) as u64, 5);
        self.bits.write_bits((dcodes - 1) as u64, 5);
        self.bits.write_bits((blcodes - 4) as u64, 4);
        for &sym in &BL_ORDER[..blcodes] {
            self.bits.write_bits(u64::from(self.bltree.len[sym]), 3);
        }
        self.send_tree(ltree, lcodes - 1);
        self.send_tree(dtree, dcodes - 1);
    }
}

/// Which of zlib's three trees, for its static description (`static_tree_desc`).
#[derive(Clone, Copy, Debug)]
pub(super) enum TreeKind {
    Literal,
    Distance,
    BitLength,
}

impl TreeKind {
    pub(super) fn elems(self) -> usize {
        match self {
            TreeKind::Literal => L_CODES,
            TreeKind::Distance => D_CODES,
            TreeKind::BitLength => BL_CODES,
        }
    }
    pub(super) fn max_length(self) -> usize {
        match self {
            TreeKind::BitLength => MAX_BL_BITS,
            _ => MAX_BITS,
        }
    }
    pub(super) fn extra_bits(self, n: usize) -> usize {
        match self {
            TreeKind::Literal if n > LITERALS => usize::from(EXTRA_LBITS[n - LITERALS - 1]),
            TreeKind::Literal => 0,
            TreeKind::Distance => usize::from(EXTRA_DBITS[n]),
            TreeKind::BitLength => usize::from(EXTRA_BLBITS[n]),
        }
    }
    pub(super) fn static_len(self, n: usize, statics: &StaticTrees) -> Option<u64> {
        match self {
            TreeKind::Literal => Some(u64::from(statics.llen[n])),
            TreeKind::Distance => Some(5),
            TreeKind::BitLength => None,
        }
    }
}

/// `compress_block`: the block's symbols with the given trees, then end-of-block.
pub(super) fn compress_block(bits: &mut BitWriter, syms: &[(u16, u8)], lcode: &[u16], llen: &[u16], dcode: &[u16], dlen: &[u16]) {
    let send = |code: u16, len: u16, bits: &mut BitWriter| bits.write_bits(u64::from(code), u32::from(len));
    for &(dist, lc) in syms {
        if dist == 0 {
            send(lcode[usize::from(lc)], llen[usize::from(lc)], bits);
            continue;
        }
        let lc = usize::from(lc);
        let code = length_code(lc);
        send(lcode[code + LITERALS + 1], llen[code + LITERALS + 1], bits);
        let extra = u32::from(EXTRA_LBITS[code]);
        if extra != 0 {
            bits.write_bits((lc as u32 - BASE_LENGTH[code]) as u64, extra);
        }
        let dist = usize::from(dist) - 1;
        let code = d_code(dist);
        send(dcode[code], dlen[code], bits);
        let extra = u32::from(EXTRA_DBITS[code]);
        if extra != 0 {
            bits.write_bits((dist as u32 - BASE_DIST[code]) as u64, extra);
        }
    }
    send(lcode[END_BLOCK], llen[END_BLOCK], bits);
}
