//! A faithful port of klauspost/compress `flate` at its default level (1.15.12, the
//! version Debian bookworm's umoci and skopeo were built with).
//!
//! Ported from klauspost/compress `flate` (deflate.go, fast_encoder.go, level5.go,
//! huffman_bit_writer.go, huffman_code.go, token.go), Copyright 2009 The Go Authors and
//! 2015 Klaus Post, BSD-3-Clause.
//!
//! `DefaultCompression` is klauspost's level 5: the input is cut into 64 KiB windows, each
//! run through the level-5 match finder ([`level5`]) and written by [`writer`] as a
//! stored, literal-only, fixed or dynamic block, the latter possibly sharing one Huffman
//! table across windows. Output depends only on the bytes and on where `Flush`/`Close`
//! fall, not on how writes were chunked.
//!
//! Go 1.27's standard library took this design over: [`Deflater`] is generic over the
//! level's match finder ([`MatchFinder`]) and the block writer's [`Flavor`], and
//! `go127` instantiates it with level 6.

pub(crate) mod level5;
pub(crate) mod tokens;
mod writer;

use level5::FastL5;
use tokens::{Tokens, MAX_STORE_BLOCK_SIZE};
use writer::BlockWriter;
pub(crate) use writer::Flavor;

/// A level's match finder (Go's `fastEnc`): turns each window into tokens, matching
/// against the history it keeps.
pub(crate) trait MatchFinder: std::fmt::Debug + Send {
    /// A fresh encoder (`newFastEnc`).
    fn new() -> Self;
    /// Finds matches in `src` (at most 64 KiB) and appends tokens to `dst`. Leaves `dst`
    /// without tokens when it found no match (`dst.n` may still be set for tiny inputs).
    fn encode(&mut self, dst: &mut Tokens, src: &[u8]);
    /// Forgets the history (`fastGen.Reset`).
    fn reset(&mut self);
}

/// Largest dictionary the match finder can use (its window).
const MAX_DICT: usize = 1 << 15;
/// `logNewTablePenalty` for levels 1-6, in klauspost/compress and in Go 1.27.
const FAST_LEVEL_TABLE_PENALTY: u32 = 7;

/// A klauspost `flate.Writer` at a level 1-6 (`F` its match finder; the default is
/// level 5, `DefaultCompression`). Output accumulates in memory until
/// [`take_output`](Self::take_output).
#[derive(Debug)]
pub(crate) struct Deflater<F = FastL5> {
    window: Vec<u8>,
    fast: F,
    tokens: Tokens,
    w: BlockWriter,
}

impl Deflater<FastL5> {
    /// klauspost/compress 1.15.12 at `DefaultCompression`.
    pub(crate) fn new() -> Self {
        Self::with_flavor(Flavor::Klauspost1_15)
    }
}

impl<F: MatchFinder> Deflater<F> {
    /// A writer whose blocks are written as `flavor`'s `huffman_bit_writer.go` does.
    pub(crate) fn with_flavor(flavor: Flavor) -> Self {
        Deflater {
            window: Vec::with_capacity(MAX_STORE_BLOCK_SIZE),
            fast: F::new(),
            tokens: Tokens::new(),
            w: BlockWriter::new(FAST_LEVEL_TABLE_PENALTY, flavor),
        }
    }

    /// Go's `ResetDict`: forget everything, then prime the match finder with `dict`.
    /// klauspost's reset leaves stale table entries behind but moves them out of reach,
    /// so a reused deflater produces the same bytes as a new one.
    pub(crate) fn reset_with_dict(&mut self, dict: &[u8]) {
        self.w.reset();
        self.fast.reset();
        self.window.clear();
        self.tokens.reset();
        let dict = &dict[dict.len().saturating_sub(MAX_DICT)..];
        self.fast.encode(&mut self.tokens, dict);
        self.tokens.reset();
    }

    /// Compresses `data` (Go's `Write`): whole 64 KiB windows are encoded as they fill.
    pub(crate) fn write(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.window.len() == MAX_STORE_BLOCK_SIZE {
                self.store_fast(false);
            }
            let n = data.len().min(MAX_STORE_BLOCK_SIZE - self.window.len());
            self.window.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
    }

    /// Go's `Flush`: encodes what is buffered and appends an empty stored block.
    pub(crate) fn sync_flush(&mut self) {
        self.store_fast(true);
        self.w.write_stored_header(0, false);
        self.w.flush();
    }

    /// Go's `Close`: encodes what is buffered and appends an empty final block.
    pub(crate) fn close(&mut self) {
        self.store_fast(true);
        self.w.write_stored_header(0, true);
        self.w.flush();
    }

    /// Compressed bytes produced so far (whole bytes only; the rest stays pending).
    pub(crate) fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.w.bits.out)
    }

    /// Compressed bytes produced so far, appended to `out`.
    pub(crate) fn drain_output_into(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.w.bits.out);
    }

    /// Go's `storeFast` (Go 1.27: `deflateFast`): encode the window once full, or at a flush.
    fn store_fast(&mut self, sync: bool) {
        let n = self.window.len();
        if n < MAX_STORE_BLOCK_SIZE {
            if !sync {
                return;
            }
            if n < 128 {
                // Tiny tails skip the match finder, and the history is dropped.
                if n == 0 {
                    return;
                }
                if n <= 32 {
                    self.w.write_stored_header(n, false);
                    self.w.write_bytes(&self.window);
                } else {
                    self.w.write_block_huff(false, &self.window, true);
                }
                self.tokens.reset();
                self.window.clear();
                self.fast.reset();
                return;
            }
        }
        self.fast.encode(&mut self.tokens, &self.window);
        if self.tokens.n == 0 {
            self.w.write_stored_header(n, false);
            self.w.write_bytes(&self.window);
        } else if self.tokens.n > n - (n >> 4) {
            // Matches removed less than 1/16 of the input: literal-only coding.
            self.w.write_block_huff(false, &self.window, sync);
        } else {
            self.w.write_block_dynamic(&mut self.tokens, false, Some(&self.window), sync);
        }
        self.tokens.reset();
        self.window.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn inflate(raw: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::DeflateDecoder::new(raw).read_to_end(&mut out).unwrap();
        out
    }

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut d = Deflater::new();
        d.write(data);
        d.close();
        d.take_output()
    }

    #[test]
    fn empty_input_is_one_empty_fixed_block() {
        assert_eq!(deflate(b""), vec![0x03, 0x00]);
    }

    #[test]
    fn sync_flush_ends_with_an_empty_stored_block() {
        let mut d = Deflater::new();
        d.write(b"");
        d.sync_flush();
        assert_eq!(d.take_output(), vec![0, 0, 0, 0xff, 0xff]);
    }

    #[test]
    fn round_trips_at_every_window_boundary() {
        let text: Vec<u8> = (0..300_000u32).map(|i| b"the quick brown fox "[(i % 20) as usize] ^ (i / 7919) as u8).collect();
        for len in [1, 12, 13, 32, 33, 127, 128, 65534, 65535, 65536, 131_070, 200_001, 300_000] {
            assert_eq!(inflate(&deflate(&text[..len])), &text[..len], "len {len}");
        }
    }
}
