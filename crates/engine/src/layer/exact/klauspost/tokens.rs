//! klauspost's token buffer (`token.go`): literals and matches with running histograms.

/// Match tokens carry this bit; literals are their byte value.
pub(crate) const MATCH_TYPE: u32 = 1 << 30;
/// Bits above this hold the match length minus 3.
pub(crate) const LENGTH_SHIFT: u32 = 22;
/// Mask for the offset part (offset minus 1 in the low 16 bits, offset code above).
pub(crate) const OFFSET_MASK: u32 = (1 << LENGTH_SHIFT) - 1;
/// The end-of-block symbol, stored as a token too.
pub(crate) const END_BLOCK_MARKER: u32 = 256;
/// Largest input chunk the compressor hands the match finder (and largest stored block).
pub(crate) const MAX_STORE_BLOCK_SIZE: usize = 65535;

/// Length code (0-28) of `length - 3`.
pub(crate) static LENGTH_CODES: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut code = 0usize;
    let mut len = 0usize;
    while len < 256 {
        while code < 28 && len >= LENGTH_BASE[code + 1] as usize {
            code += 1;
        }
        t[len] = code as u8;
        len += 1;
    }
    // Length 258 (xlength 255) has its own code.
    t[255] = 28;
    t
};

/// `length - 3` at which each length code starts.
pub(crate) static LENGTH_BASE: [u8; 29] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 255];

/// Extra bits after each length code.
pub(crate) static LENGTH_EXTRA_BITS: [u8; 32] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0, 0, 0, 0];

/// Extra bits after each distance code.
pub(crate) static OFFSET_EXTRA_BITS: [u8; 32] = [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14];

/// `offset - 1` at which each distance code starts.
pub(crate) static OFFSET_BASE: [u32; 30] = [
    0x0000, 0x0001, 0x0002, 0x0003, 0x0004, 0x0006, 0x0008, 0x000c, 0x0010, 0x0018, 0x0020, 0x0030, 0x0040, 0x0060, 0x0080, 0x00c0, 0x0100, 0x0180, 0x0200,
    0x0300, 0x0400, 0x0600, 0x0800, 0x0c00, 0x1000, 0x1800, 0x2000, 0x3000, 0x4000, 0x6000,
];

/// Distance code of `offset - 1` (< 32768).
#[inline(always)]
pub(crate) fn offset_code(xoffset: u32) -> u32 {
    if xoffset < 256 {
        OFFSET_CODES[xoffset as usize]
    } else {
        OFFSET_CODES[((xoffset >> 7) & 255) as usize] + 14
    }
}

static OFFSET_CODES: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut code = 0usize;
    let mut off = 0usize;
    while off < 256 {
        while code < 15 && off as u32 >= OFFSET_BASE[code + 1] {
            code += 1;
        }
        t[off] = code as u32;
        off += 1;
    }
    t
};

/// Tokens of one block and their symbol histograms.
#[derive(Clone, Debug)]
pub(crate) struct Tokens {
    /// Length symbols 256.. (index 0 is end-of-block).
    pub(crate) extra_hist: [u16; 32],
    pub(crate) off_hist: [u16; 32],
    pub(crate) lit_hist: [u16; 256],
    pub(crate) tokens: Vec<u32>,
    /// Go's `n`; equals `tokens.len()` except after a too-short `Encode`, which sets it
    /// without filling the tokens (the caller then discards them).
    pub(crate) n: usize,
}

impl Tokens {
    pub(crate) fn new() -> Self {
        Tokens { extra_hist: [0; 32], off_hist: [0; 32], lit_hist: [0; 256], tokens: Vec::with_capacity(MAX_STORE_BLOCK_SIZE + 1), n: 0 }
    }

    pub(crate) fn reset(&mut self) {
        if self.n == 0 {
            return;
        }
        self.n = 0;
        self.tokens.clear();
        self.lit_hist = [0; 256];
        self.extra_hist = [0; 32];
        self.off_hist = [0; 32];
    }

    #[inline(always)]
    pub(crate) fn add_literal(&mut self, lit: u8) {
        self.tokens.push(u32::from(lit));
        self.lit_hist[usize::from(lit)] = self.lit_hist[usize::from(lit)].wrapping_add(1);
        self.n += 1;
    }

    /// A match of any length (split into pieces of at most 258); `xoffset` is offset - 1.
    #[inline]
    pub(crate) fn add_match_long(&mut self, mut length: i32, xoffset: u32) {
        let oc = offset_code(xoffset);
        let xoffset = xoffset | (oc << 16);
        while length > 0 {
            let mut xl = length;
            if xl > 258 {
                // Leave at least 3 bytes for the next piece.
                xl = if xl > 258 + 3 { 258 } else { 258 - 3 };
            }
            length -= xl;
            let xl = (xl - 3) as u32;
            let code = usize::from(LENGTH_CODES[xl as usize & 255]) + 1;
            self.extra_hist[code] = self.extra_hist[code].wrapping_add(1);
            self.off_hist[(oc & 31) as usize] = self.off_hist[(oc & 31) as usize].wrapping_add(1);
            self.tokens.push(MATCH_TYPE | (xl << LENGTH_SHIFT) | xoffset);
            self.n += 1;
        }
    }

    pub(crate) fn add_eob(&mut self) {
        self.tokens.push(END_BLOCK_MARKER);
        self.extra_hist[0] = self.extra_hist[0].wrapping_add(1);
        self.n += 1;
    }

    /// klauspost's estimate of an optimal coding of the block in bits (`EstimatedBits`),
    /// computed in `f32` exactly as Go does: the result decides whether to start a new table.
    pub(crate) fn estimated_bits(&self) -> i64 {
        let mut shannon = 0f32;
        let mut bits = 0i64;
        let mut n_matches = 0i64;
        let total = self.n;
        if total > 0 {
            let inv_total = 1.0f32 / total as f32;
            for &v in &self.lit_hist {
                if v > 0 {
                    let n = f32::from(v);
                    shannon += at_least_one(-fast_log2(n * inv_total)) * n;
                }
            }
            shannon += 15.0;
            for (i, &v) in self.extra_hist[1..286 - 256].iter().enumerate() {
                if v > 0 {
                    let n = f32::from(v);
                    shannon += at_least_one(-fast_log2(n * inv_total)) * n;
                    bits += i64::from(LENGTH_EXTRA_BITS[i & 31]) * i64::from(v);
                    n_matches += i64::from(v);
                }
            }
        }
        if n_matches > 0 {
            let inv_total = 1.0f32 / n_matches as f32;
            for (i, &v) in self.off_hist[..30].iter().enumerate() {
                if v > 0 {
                    let n = f32::from(v);
                    shannon += at_least_one(-fast_log2(n * inv_total)) * n;
                    bits += i64::from(OFFSET_EXTRA_BITS[i & 31]) * i64::from(v);
                }
            }
        }
        shannon as i64 + bits
    }
}

/// Clamps to [1, 15].
fn at_least_one(v: f32) -> f32 {
    v.clamp(1.0, 15.0)
}

/// klauspost's `mFastLog2`: a cheap log2 approximation whose exact rounding we must keep.
fn fast_log2(val: f32) -> f32 {
    let mut ux = val.to_bits() as i32;
    let mut log2 = (((ux >> 23) & 255) - 128) as f32;
    ux &= -0x7f80_0001;
    ux = ux.wrapping_add(127 << 23);
    let uval = f32::from_bits(ux as u32);
    // Go's literals, rounded to f32 exactly as Go rounds them.
    #[allow(clippy::excessive_precision)]
    let (a, b, c) = (-0.34484843f32, 2.02466578f32, 0.67487759f32);
    log2 += (a * uval + b) * uval - c;
    log2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_and_offset_code_tables_match_go() {
        // Spot values from token.go's literal tables.
        assert_eq!(&LENGTH_CODES[..12], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 9, 9]);
        assert_eq!((LENGTH_CODES[254], LENGTH_CODES[255]), (27, 28));
        assert_eq!(LENGTH_CODES[224], 27);
        assert_eq!(LENGTH_CODES[223], 26);
        assert_eq!(offset_code(0), 0);
        assert_eq!(offset_code(4), 4);
        assert_eq!(offset_code(5), 4);
        assert_eq!(offset_code(255), 15);
        assert_eq!(offset_code(256), 16);
        assert_eq!(offset_code(32767), 29);
        assert_eq!(offset_code(0x6000), 29);
        assert_eq!(offset_code(0x5fff), 28);
    }

    #[test]
    fn long_matches_split_leaving_at_least_three_bytes() {
        let mut t = Tokens::new();
        t.add_match_long(260, 0);
        let lens: Vec<u32> = t.tokens.iter().map(|tok| ((tok >> LENGTH_SHIFT) & 255) + 3).collect();
        assert_eq!(lens, vec![255, 5]);
        let mut t = Tokens::new();
        t.add_match_long(262, 0);
        let lens: Vec<u32> = t.tokens.iter().map(|tok| ((tok >> LENGTH_SHIFT) & 255) + 3).collect();
        assert_eq!(lens, vec![258, 4]);
    }

    #[test]
    fn fast_log2_is_close_to_log2() {
        for v in [0.001f32, 0.1, 0.5, 0.9, 1.0] {
            assert!((fast_log2(v) - v.log2()).abs() < 0.01, "{v}");
        }
    }
}
