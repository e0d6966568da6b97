//! The LSB-first bit writer that DEFLATE streams are made of.
//!
//! Go's writers (the standard library's and klauspost's) buffer bits in a `u64` and spill
//! 6 bytes at a time into a 256-byte buffer; only the resulting bit sequence is observable,
//! so this writer keeps the same sequence with a simpler spill rule.

/// Accumulates bits least-significant first and appends whole bytes to `out`.
#[derive(Debug, Default)]
pub(crate) struct BitWriter {
    bits: u64,
    nbits: u32,
    /// Bytes completed so far; the owner drains it.
    pub(crate) out: Vec<u8>,
}

impl BitWriter {
    /// Appends the low `n` bits of `value` (n <= 16 bits beyond the 48 we keep).
    #[inline(always)]
    pub(crate) fn write_bits(&mut self, value: u64, n: u32) {
        debug_assert!(n <= 32);
        self.bits |= (value & ((1u64 << n) - 1)) << self.nbits;
        self.nbits += n;
        if self.nbits >= 48 {
            self.out.extend_from_slice(&self.bits.to_le_bytes()[..6]);
            self.bits >>= 48;
            self.nbits -= 48;
        }
    }

    /// Pads with zero bits to the next byte boundary and emits every pending byte.
    pub(crate) fn flush(&mut self) {
        while self.nbits > 0 {
            self.out.push(self.bits as u8);
            self.bits >>= 8;
            self.nbits = self.nbits.saturating_sub(8);
        }
        self.bits = 0;
    }

    /// Emits raw bytes; the stream must be at a byte boundary (after a stored-block header).
    pub(crate) fn write_bytes(&mut self, bytes: &[u8]) {
        debug_assert_eq!(self.nbits % 8, 0, "write_bytes with unfinished bits");
        self.flush();
        self.out.extend_from_slice(bytes);
    }

    /// Number of bits written but not yet in `out`.
    #[cfg(test)]
    pub(crate) fn pending_bits(&self) -> u32 {
        self.nbits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_packed_lsb_first_and_flush_pads_with_zeros() {
        let mut w = BitWriter::default();
        w.write_bits(0b1, 1);
        w.write_bits(0b01, 2);
        w.write_bits(0xffff, 16);
        assert_eq!(w.pending_bits(), 19);
        w.flush();
        assert_eq!(w.out, vec![0b1111_1011, 0xff, 0b0000_0111]);
    }

    #[test]
    fn long_runs_spill_in_order() {
        let mut w = BitWriter::default();
        for i in 0..100u64 {
            w.write_bits(i & 0x7f, 7);
        }
        w.flush();
        let mut expect = BitWriter::default();
        for i in 0..100u64 {
            for b in 0..7 {
                expect.bits |= ((i >> b) & 1) << expect.nbits;
                expect.nbits += 1;
                if expect.nbits == 8 {
                    expect.out.push(expect.bits as u8);
                    expect.bits = 0;
                    expect.nbits = 0;
                }
            }
        }
        expect.flush();
        assert_eq!(w.out, expect.out);
    }
}
