//! Difference chunks (feature [`crate::format::plan::FEATURE_DIFFERENCE_CHUNKS`]): the
//! differences of approximate matches, coded as raw LZMA2 streams without a prefix.
//!
//! Those bytes are mostly zeros with short runs of changed ones (the moved addresses of
//! executable code). LZMA's context-modelled literals and repeated-distance matches code them
//! 10-16% smaller than zstd at level 19 on the corpus's executables, and decode at a few
//! hundred MB/s, since most of the output comes from long matches.
//!
//! The stream is the LZMA2 filter's payload as `.xz` files carry it (chunks with control
//! bytes, ending with the 0x00 end marker), with no container around it; its dictionary size
//! is [`dictionary_bytes`] of the chunk's length, at most [`MAX_DICTIONARY_BYTES`], which
//! bounds the decoder's memory.

use liblzma::stream::{Action, Filters, LzmaOptions, Status, Stream};

use crate::error::{Error, Result};

/// How hard the encoder works (the decoder is the same for both). On the 31 MB of an
/// executable's differences (uv, in 4 MiB chunks): `Fast` 2.39 MB in 0.85 s, as long as zstd
/// at level 12 takes for 2.53 MB; `Strong` 2.10 MB in 15 s, where zstd -19 takes 7.8 s for
/// 2.31 MB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effort {
    /// liblzma's preset 3: hash chains and fast parsing.
    Fast,
    /// liblzma's preset 6: binary trees and optimal parsing.
    Strong,
}

impl Effort {
    fn preset(self) -> u32 {
        match self {
            Effort::Fast => 3,
            Effort::Strong => 6,
        }
    }
}

/// The longest match the encoder looks for before it takes one: the longest there is, which
/// matters on runs of zeros (xz's preset 6 stops at 64 and is 15% larger on executables).
const NICE_LEN: u32 = 273;

/// The largest dictionary: differences repeat at short distances, and a 1 MiB dictionary
/// costs 0.1% over one as long as a 4 MiB chunk on an 11 MB Go executable's differences.
pub const MAX_DICTIONARY_BYTES: u32 = 1 << 20;

/// The dictionary size of a difference chunk of `raw_len` bytes: its length, at least
/// 4 KiB (LZMA2's smallest) and at most [`MAX_DICTIONARY_BYTES`].
pub fn dictionary_bytes(raw_len: u64) -> u32 {
    raw_len.clamp(4096, u64::from(MAX_DICTIONARY_BYTES)) as u32
}

fn options(raw_len: u64, effort: Effort) -> Result<LzmaOptions> {
    let mut options = LzmaOptions::new_preset(effort.preset()).map_err(|e| Error::Internal(format!("LZMA options: {e}")))?;
    options.dict_size(dictionary_bytes(raw_len));
    Ok(options)
}

/// Compresses `data` as one difference chunk.
pub fn compress(data: &[u8], effort: Effort) -> Result<Vec<u8>> {
    let mut options = options(data.len() as u64, effort)?;
    options.nice_len(NICE_LEN);
    let mut filters = Filters::new();
    filters.lzma2(&options);
    let mut stream = Stream::new_raw_encoder(&filters).map_err(|e| Error::Internal(format!("starting the LZMA encoder: {e}")))?;
    let mut out = Vec::with_capacity(data.len() / 4 + 64);
    loop {
        let consumed = stream.total_in() as usize;
        if out.len() == out.capacity() {
            out.reserve(out.capacity().max(4096));
        }
        let status = stream.process_vec(&data[consumed..], &mut out, Action::Finish).map_err(|e| Error::Internal(format!("LZMA compression: {e}")))?;
        if status == Status::StreamEnd {
            return Ok(out);
        }
    }
}

/// Decompresses difference chunk `frame` into `out` (cleared first), which must come to
/// exactly `raw_len` bytes with the whole frame consumed.
pub fn decompress(frame: &[u8], raw_len: u64, out: &mut Vec<u8>) -> Result<()> {
    let raw = usize::try_from(raw_len).map_err(|_| bad(format!("{raw_len} bytes declared")))?;
    out.clear();
    out.resize(raw, 0);
    let mut stream = DifferenceStream::new(frame.to_vec(), raw_len)?;
    stream.read_exact(out)?;
    stream.finish()
}

fn bad(reason: String) -> Error {
    Error::malformed("patch difference chunk (LZMA)", reason)
}

/// A difference chunk decoded as its bytes are needed: memory is the frame and the decoder's
/// dictionary ([`dictionary_bytes`]), not the chunk. Hostile input: the stream must come to
/// exactly the declared length ([`DifferenceStream::finish`]).
pub struct DifferenceStream {
    stream: Stream,
    frame: Vec<u8>,
    raw_len: u64,
}

impl std::fmt::Debug for DifferenceStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DifferenceStream")
            .field("frame_len", &self.frame.len())
            .field("raw_len", &self.raw_len)
            .field("read", &self.stream.total_out())
            .finish()
    }
}

impl DifferenceStream {
    /// Starts decoding `frame`, declared to decompress to `raw_len` bytes.
    pub fn new(frame: Vec<u8>, raw_len: u64) -> Result<Self> {
        let mut filters = Filters::new();
        // The decoder reads only the dictionary size; the rest is in the stream.
        filters.lzma2(&options(raw_len, Effort::Strong)?);
        let stream = Stream::new_raw_decoder(&filters).map_err(|e| Error::Internal(format!("starting the LZMA decoder: {e}")))?;
        Ok(DifferenceStream { stream, frame, raw_len })
    }

    /// The declared length.
    pub fn raw_len(&self) -> u64 {
        self.raw_len
    }

    /// The compressed stream.
    pub fn frame(&self) -> &[u8] {
        &self.frame
    }

    /// Fills `out` with the next bytes of the chunk.
    pub fn read_exact(&mut self, out: &mut [u8]) -> Result<()> {
        let mut at = 0;
        while at < out.len() {
            let (consumed, before) = (self.stream.total_in() as usize, self.stream.total_out());
            let status = self.stream.process(&self.frame[consumed..], &mut out[at..], Action::Run).map_err(|e| bad(e.to_string()))?;
            let wrote = (self.stream.total_out() - before) as usize;
            at += wrote;
            let stuck = wrote == 0 && self.stream.total_in() as usize == consumed;
            if at < out.len() && (status == Status::StreamEnd || stuck) {
                return Err(bad(format!("the stream ends after {} of {} bytes", self.stream.total_out(), self.raw_len)));
            }
        }
        Ok(())
    }

    /// After the declared length has been read: the stream must end there, and the frame with
    /// it.
    pub fn finish(mut self) -> Result<()> {
        if self.stream.total_out() != self.raw_len {
            return Err(bad(format!("{} of {} bytes read", self.stream.total_out(), self.raw_len)));
        }
        loop {
            let consumed = self.stream.total_in() as usize;
            let status = self.stream.process(&self.frame[consumed..], &mut [], Action::Run).map_err(|e| bad(e.to_string()))?;
            if status == Status::StreamEnd {
                break;
            }
            // No room for output: a stream that does not end here goes on past the length, or
            // is cut short.
            if self.stream.total_in() as usize == consumed {
                return Err(bad(if consumed == self.frame.len() {
                    format!("the stream is cut short after its {} bytes (no end marker)", self.raw_len)
                } else {
                    format!("decompresses to more than the {} bytes declared", self.raw_len)
                }));
            }
        }
        if self.stream.total_in() != self.frame.len() as u64 {
            return Err(bad(format!("{} bytes follow the end of the stream", self.frame.len() as u64 - self.stream.total_in())));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes like an approximate match's differences in moved code: zeros, and at irregular
    /// gaps the low bytes of an address that moved by one of a few shifts (which change from
    /// region to region), sometimes with a carry.
    fn differences(n: usize) -> Vec<u8> {
        let mut x = 0x2545_f491_u32;
        let mut out = vec![0u8; n];
        let mut at = 0;
        while at + 2 < n {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let shift = [0x10u8, 0x28, 0xe0, 0x08][(at / 40_000 + (x >> 30) as usize) % 4];
            out[at] = shift;
            if x & 0x100 != 0 {
                out[at + 1] = 1;
            }
            at += 24 + (x >> 24) as usize;
        }
        out
    }

    #[test]
    fn a_chunk_round_trips_at_both_efforts_and_beats_zstd_on_differences() {
        let data = differences(1 << 20);
        let mut out = Vec::new();
        for (effort, zstd_level) in [(Effort::Strong, 19), (Effort::Fast, 12)] {
            let frame = compress(&data, effort).unwrap();
            decompress(&frame, data.len() as u64, &mut out).unwrap();
            assert!(out == data);
            let zstd = zstd::bulk::compress(&data, zstd_level).unwrap();
            assert!(frame.len() < zstd.len(), "{effort:?}: LZMA {} bytes, zstd -{zstd_level} {}", frame.len(), zstd.len());
            // Tiny and incompressible chunks too.
            for data in [vec![7u8], (0..5000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect()] {
                decompress(&compress(&data, effort).unwrap(), data.len() as u64, &mut out).unwrap();
                assert!(out == data);
            }
        }
    }

    #[test]
    fn a_frame_that_disagrees_with_its_length_or_is_damaged_is_refused() {
        let data = differences(100_000);
        let frame = compress(&data, Effort::Strong).unwrap();
        let mut out = Vec::new();
        let err = |frame: &[u8], len: u64| decompress(frame, len, &mut Vec::new()).unwrap_err().to_string();
        assert!(err(&frame, 99_999).contains("more than the 99999 bytes declared"), "{}", err(&frame, 99_999));
        assert!(err(&frame, 100_001).contains("100000"), "{}", err(&frame, 100_001));
        assert!(err(&frame[..frame.len() - 1], 100_000).contains("cut short"), "{}", err(&frame[..frame.len() - 1], 100_000));
        assert!(err(&frame[..frame.len() / 2], 100_000).contains("ends after"), "{}", err(&frame[..frame.len() / 2], 100_000));
        let mut trailing = frame.clone();
        trailing.push(0);
        assert!(err(&trailing, 100_000).contains("1 bytes follow"), "{}", err(&trailing, 100_000));
        // Read in pieces, as the applier does.
        let mut stream = DifferenceStream::new(frame.clone(), 100_000).unwrap();
        let mut pieces = Vec::new();
        for n in [1usize, 4095, 50_000, 45_904] {
            let mut piece = vec![0u8; n];
            stream.read_exact(&mut piece).unwrap();
            pieces.extend(piece);
        }
        stream.finish().unwrap();
        assert!(pieces == data);
        // Every truncation and every flipped byte is an error or a different output, never a panic.
        for cut in 0..frame.len() {
            assert!(decompress(&frame[..cut], 100_000, &mut out).is_err());
        }
        for i in 0..frame.len() {
            let mut damaged = frame.clone();
            damaged[i] ^= 0x55;
            if decompress(&damaged, 100_000, &mut out).is_ok() {
                assert!(out.len() == 100_000);
            }
        }
        assert!(decompress(b"", 1, &mut out).is_err());
        assert!(decompress(&[0xff; 64], 1000, &mut out).is_err());
    }
}
