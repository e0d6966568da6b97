//! AArch64 code seen with its call targets and page addresses made absolute.
//!
//! A rebuilt executable changes almost everywhere, although most of its functions are the
//! same: code moved, and every `BL` (call) and `ADRP` (page address) whose target lies across
//! the move encodes another distance. Seen with each distance replaced by the position it
//! points at, the calls of the same function are the same bytes before and after, wherever
//! they are, and the differ pays for the targets that really changed. This is xz's ARM64
//! branch/call/jump filter, without its range limit on `ADRP`.
//!
//! The transform works on the 4-byte little-endian words of a span (a [`Member`] of
//! [`Wrapping::Aarch64Code`]): the word at byte `p` of the span (`p` a multiple of 4) is
//! - `BL` (`word & 0xfc00_0000 == 0x9400_0000`): its 26-bit field gets `p / 4` added,
//!   modulo 2^26;
//! - `ADRP` (`word & 0x9f00_0000 == 0x9000_0000`): its 21-bit page field (bits 23–5 high,
//!   30–29 low) gets `p / 4096` added, modulo 2^21;
//! - anything else: unchanged.
//!
//! Bytes after the last whole word are unchanged. The applier subtracts instead of adding.
//! Both keep the bits that say what a word is, so the two directions are exact inverses for
//! any bytes: data words mistaken for instructions come back as they were. The differ starts
//! a span at a 4 KiB page of the code's addresses, so `p / 4096` counts the code's own pages
//! (up to a constant).
//!
//! [`Member`]: crate::format::plan::Member
//! [`Wrapping::Aarch64Code`]: crate::format::plan::Wrapping::Aarch64Code

use std::io::{self, Read, Write};

/// Bytes converted at a time by the reader and writer.
const BUFFER_BYTES: usize = 64 << 10;

/// Which way words are converted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Distances to positions: what the differ and the source side see.
    Absolute,
    /// Positions back to distances: the bytes of the file.
    Relative,
}

/// Converts the whole words of `words`, whose first byte is at span position `at` (a
/// multiple of 4); a trailing partial word is left alone.
pub fn convert(words: &mut [u8], at: u64, direction: Direction) {
    for (k, w) in words.chunks_exact_mut(4).enumerate() {
        let pos = at + 4 * k as u64;
        let word = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        let shift = |field: u32, by: u64, mask: u32| {
            let by = by as u32; // modulo 2^32, then the mask: the field's own modulus.
            match direction {
                Direction::Absolute => field.wrapping_add(by) & mask,
                Direction::Relative => field.wrapping_sub(by) & mask,
            }
        };
        let out = if word & 0xfc00_0000 == 0x9400_0000 {
            (word & 0xfc00_0000) | shift(word & 0x03ff_ffff, pos >> 2, 0x03ff_ffff)
        } else if word & 0x9f00_0000 == 0x9000_0000 {
            let page = ((word >> 29) & 0x3) | (((word >> 5) & 0x7_ffff) << 2);
            let page = shift(page, pos >> 12, 0x1f_ffff);
            (word & 0x9f00_001f) | ((page & 0x3) << 29) | ((page >> 2) << 5)
        } else {
            continue;
        };
        w.copy_from_slice(&out.to_le_bytes());
    }
}

/// Whether `head` (a file's first bytes, at least 20) starts a little-endian 64-bit ELF
/// file for AArch64.
pub fn looks_like_aarch64_elf(head: &[u8]) -> bool {
    super::elf64_le_machine(head) == Some(object::elf::EM_AARCH64.0)
}

/// A reader giving the bytes of `inner` converted to [`Direction::Absolute`].
pub struct AbsoluteReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// `buf[start..end]` is converted and not yet read; `buf[end..filled]` is a partial word.
    start: usize,
    end: usize,
    filled: usize,
    /// Span position of `buf[0]`.
    at: u64,
    eof: bool,
}

impl<R> std::fmt::Debug for AbsoluteReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AbsoluteReader").field("at", &self.at).finish_non_exhaustive()
    }
}

impl<R: Read> AbsoluteReader<R> {
    /// Converts the span that `inner` reads, from its start.
    pub fn new(inner: R) -> Self {
        AbsoluteReader { inner, buf: vec![0; BUFFER_BYTES], start: 0, end: 0, filled: 0, at: 0, eof: false }
    }

    /// The inner reader back.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for AbsoluteReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.start < self.end || out.is_empty() {
                let n = (self.end - self.start).min(out.len());
                out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
                self.start += n;
                return Ok(n);
            }
            if self.eof {
                // The last partial word, as it is.
                if self.end == self.filled {
                    return Ok(0);
                }
                self.end = self.filled;
                continue;
            }
            // Only a partial word is left: move it to the front and read more after it.
            let tail = self.filled - self.end;
            self.buf.copy_within(self.end..self.filled, 0);
            self.at += self.end as u64;
            (self.start, self.end, self.filled) = (0, 0, tail);
            let n = self.inner.read(&mut self.buf[tail..])?;
            if n == 0 {
                self.eof = true;
                continue;
            }
            self.filled += n;
            self.end = self.filled / 4 * 4;
            convert(&mut self.buf[..self.end], self.at, Direction::Absolute);
        }
    }
}

/// Turns [`Direction::Absolute`] bytes, pushed in pieces of any size, back into the file's.
#[derive(Debug)]
pub struct RelativeWriter {
    buf: Vec<u8>,
    /// Span position of the next whole word.
    at: u64,
}

impl Default for RelativeWriter {
    fn default() -> Self {
        RelativeWriter { buf: Vec::with_capacity(BUFFER_BYTES + 4), at: 0 }
    }
}

impl RelativeWriter {
    /// Converts `data` and writes the whole words to `output`; a partial word waits.
    pub fn write(&mut self, mut data: &[u8], output: &mut impl Write) -> io::Result<()> {
        while !data.is_empty() {
            // The buffer holds at most a partial word here: whole words have been written.
            let n = (BUFFER_BYTES - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            let whole = self.buf.len() / 4 * 4;
            if whole >= BUFFER_BYTES || data.is_empty() {
                convert(&mut self.buf[..whole], self.at, Direction::Relative);
                output.write_all(&self.buf[..whole])?;
                self.at += whole as u64;
                self.buf.drain(..whole);
            }
        }
        Ok(())
    }

    /// Writes the last partial word, as it is.
    pub fn finish(self, output: &mut impl Write) -> io::Result<()> {
        output.write_all(&self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(w: u32) -> [u8; 4] {
        w.to_le_bytes()
    }

    fn words(ws: &[u32]) -> Vec<u8> {
        ws.iter().flat_map(|w| word(*w)).collect()
    }

    /// `BL` to byte `target` from byte `from`.
    fn bl(from: u64, target: u64) -> u32 {
        0x9400_0000 | (((target as i64 - from as i64) >> 2) as u32 & 0x03ff_ffff)
    }

    /// `ADRP x3` of the page of `target` from byte `from`.
    fn adrp(from: u64, target: u64) -> u32 {
        let pages = ((target >> 12) as i64 - (from >> 12) as i64) as u32 & 0x1f_ffff;
        0x9000_0003 | ((pages & 3) << 29) | ((pages >> 2) << 5)
    }

    #[test]
    fn calls_and_page_addresses_of_one_target_look_the_same_from_anywhere() {
        let target = 0x2_3450;
        let mut a = words(&[bl(0x100, target), adrp(0x100, target)]);
        let mut b = words(&[bl(0x9_0000, target), adrp(0x9_0000, target)]);
        convert(&mut a, 0x100, Direction::Absolute);
        convert(&mut b, 0x9_0000, Direction::Absolute);
        assert_eq!(a, b);
        // And the positions they say are the target's.
        assert_eq!(u32::from_le_bytes(a[..4].try_into().unwrap()), 0x9400_0000 | (target >> 2) as u32);
        assert_ne!(words(&[bl(0x100, target)]), words(&[bl(0x9_0000, target)]));
    }

    #[test]
    fn other_words_and_a_partial_word_are_left_alone() {
        // ADD, B (not BL), ADR (not ADRP), LDR, and 3 bytes that are no word.
        let before = [words(&[0x9100_0421, 0x1400_0010, 0x1000_0003, 0xf940_0000]), vec![0x94, 0, 0]].concat();
        let mut after = before.clone();
        convert(&mut after, 4096 * 7, Direction::Absolute);
        assert_eq!(after, before);
    }

    #[test]
    fn both_directions_are_inverse_on_any_bytes() {
        let mut rng = 0x1234_5678_9abc_def0u64;
        let data: Vec<u8> = (0..1 << 20)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                // Plenty of BL and ADRP words among random ones.
                match rng % 5 {
                    0 => 0x94,
                    1 => 0x90,
                    2 => 0xb0,
                    _ => (rng >> 24) as u8,
                }
            })
            .collect();
        for at in [0u64, 4, 4096 * 3, u64::from(u32::MAX) * 4 - 8] {
            let mut x = data.clone();
            convert(&mut x, at, Direction::Absolute);
            assert_ne!(x, data);
            convert(&mut x, at, Direction::Relative);
            assert_eq!(x, data, "at {at}");
        }
    }

    #[test]
    fn reader_and_writer_give_the_same_bytes_whatever_the_pieces() {
        let from = |p: u64| bl(p, 0x1_0000);
        let code: Vec<u8> = (0..70_000u64).flat_map(|i| word(if i % 3 == 0 { from(i * 4) } else { adrp(i * 4, 0x8000_0000) })).chain([0x94, 0x00]).collect();
        let mut whole = code.clone();
        convert(&mut whole, 0, Direction::Absolute);
        for piece in [1usize, 3, 4, 5, 4093, 65536, 1 << 20] {
            // A reader over an input that gives `piece` bytes at a time.
            struct Pieces<'a>(&'a [u8], usize);
            impl Read for Pieces<'_> {
                fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                    let n = self.1.min(out.len()).min(self.0.len());
                    out[..n].copy_from_slice(&self.0[..n]);
                    self.0 = &self.0[n..];
                    Ok(n)
                }
            }
            let mut seen = Vec::new();
            AbsoluteReader::new(Pieces(&code, piece)).read_to_end(&mut seen).unwrap();
            assert_eq!(seen, whole, "reads of {piece}");
            let (mut w, mut back) = (RelativeWriter::default(), Vec::new());
            for p in seen.chunks(piece) {
                w.write(p, &mut back).unwrap();
            }
            w.finish(&mut back).unwrap();
            assert_eq!(back, code, "writes of {piece}");
        }
    }

    #[test]
    fn aarch64_elf_files_are_told_from_others() {
        let mut head = [0u8; 20];
        head[..6].copy_from_slice(b"\x7fELF\x02\x01");
        head[18..20].copy_from_slice(&object::elf::EM_AARCH64.0.to_le_bytes());
        assert!(looks_like_aarch64_elf(&head));
        head[18] = 62; // x86-64
        assert!(!looks_like_aarch64_elf(&head));
        head[18..20].copy_from_slice(&object::elf::EM_AARCH64.0.to_le_bytes());
        head[5] = 2; // big-endian
        assert!(!looks_like_aarch64_elf(&head));
        assert!(!looks_like_aarch64_elf(&head[..19]));
    }
}
