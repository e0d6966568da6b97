//! A faithful port of the Go standard library's `compress/flate` at `DefaultCompression`
//! as rewritten in Go 1.27 (verified against Go 1.27.3, Debian sid's golang-1.27), which
//! `compress/gzip` — and so Docker/moby and BuildKit built with Go 1.27 — writes layers
//! with.
//!
//! Go 1.27 replaced the classic lazy matcher of Go 1.19 ([`go_flate`](super::go_flate))
//! with klauspost/compress's design: `compress/flate` gained `level1.go`..`level6.go`,
//! and `DefaultCompression` became level 6 (`fastEncL6` through `deflateFast`, with
//! `logNewTablePenalty` 7; `deflate.go`'s `init`). Ported from Go 1.27's `compress/flate`
//! (deflate.go, deflatefast.go, level6.go, load_store.go, huffman_bit_writer.go,
//! huffman_code.go, token.go), Copyright 2009-2026 The Go Authors, BSD-3-Clause.
//!
//! Comparing those files with klauspost/compress 1.15.12 (ported in
//! [`klauspost`](super::klauspost)), the code that runs at level 6 is the same but for:
//!
//! - the match finder: level 6 instead of klauspost's default level 5 — ported in
//!   [`level6`] over level 5's tables and helpers (Go 1.27's `level6.go` is klauspost's
//!   1.15.12 `level6.go` renamed);
//! - `huffmanBitWriter.writeBlockDynamic`: a table left open for the next block is sent
//!   only up to its last used code, and counts the end-of-block symbol
//!   ([`Flavor::Go1_27`]).
//!
//! `deflateFast` is klauspost's `storeFast` (64 KiB windows; tiny tails stored or
//! literal-only; a window is stored, literal-only or dynamic by the same rules),
//! `write`/`close` are the same, `writeBlockHuff`, `writeStoredHeader`, the Huffman code
//! construction, the token histograms and `EstimatedBits` are unchanged, and
//! `compress/gzip`'s framing is Go 1.19's. So the stream ends as klauspost's does: `Close`
//! writes an empty final fixed block (10 bits), never a sync marker or stored block, and
//! its last byte is always 0.

pub(crate) mod level6;

use super::klauspost;
pub(crate) use klauspost::Flavor;
use level6::FastL6;

/// Go 1.27's `compress/flate.Writer` at `DefaultCompression`.
pub(crate) type Deflater = klauspost::Deflater<FastL6>;

/// A new Go 1.27 writer at `DefaultCompression`.
pub(crate) fn deflater() -> Deflater {
    Deflater::with_flavor(Flavor::Go1_27)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut d = deflater();
        d.write(data);
        d.close();
        d.take_output()
    }

    fn inflate(raw: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::DeflateDecoder::new(raw).read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn empty_input_is_one_empty_fixed_block() {
        assert_eq!(deflate(b""), vec![0x03, 0x00]);
    }

    #[test]
    fn every_stream_ends_with_a_zero_byte() {
        let text: Vec<u8> = (0..200_000u32).map(|i| b"layer delta "[(i % 12) as usize] ^ (i / 4999) as u8).collect();
        for len in [0, 1, 32, 33, 127, 128, 1000, 65535, 65536, 200_000] {
            let out = deflate(&text[..len]);
            assert_eq!(out.last(), Some(&0), "len {len}");
            assert_eq!(inflate(&out), &text[..len], "len {len}");
        }
    }

    #[test]
    fn round_trips_at_every_window_boundary_and_differs_from_klauspost() {
        let text: Vec<u8> = (0..300_000u32).map(|i| b"the quick brown fox "[(i % 20) as usize] ^ (i / 7919) as u8).collect();
        for len in [12, 13, 127, 128, 65534, 65535, 65536, 131_070, 200_001, 300_000] {
            assert_eq!(inflate(&deflate(&text[..len])), &text[..len], "len {len}");
        }
        // Level 6 and the Go 1.27 writer give other bytes than klauspost's level 5.
        let mut k = klauspost::Deflater::new();
        k.write(&text);
        k.close();
        assert_ne!(k.take_output(), deflate(&text));
    }
}
