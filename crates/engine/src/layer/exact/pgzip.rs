//! klauspost/pgzip's framing (1.2.5): one gzip member whose deflate stream is cut into
//! fixed-size blocks, each compressed by its own klauspost deflater primed with the last
//! 16 KiB of the previous block and ended by a sync flush; the last block also gets an
//! empty final block. Blocks are independent given their dictionary, so we compress them
//! in parallel, as pgzip does, and the bytes are the same.
//!
//! Ported from klauspost/pgzip `gzip.go`, Copyright 2010 The Go Authors and Klaus Post,
//! BSD-3-Clause.

use std::io::{Read, Write};

use rayon::prelude::*;

use super::gzip_header::{trailer, GzipHeader};
use super::klauspost::Deflater;
use crate::error::{Error, IoContext, Result};

/// Dictionary carried from one block to the next (pgzip's `tailSize`).
pub const TAIL_SIZE: usize = 16384;
/// pgzip's default block size (`defaultBlockSize`).
pub const DEFAULT_BLOCK_SIZE: u32 = 1 << 20;
/// The block size umoci 0.4.7 sets with `SetConcurrency(256<<10, ...)`.
pub const UMOCI_BLOCK_SIZE: u32 = 256 << 10;
/// Largest block size we accept: bounds memory per block (pgzip itself has no limit).
pub const MAX_BLOCK_SIZE: u32 = 64 << 20;

/// Checks a block size the way `SetConcurrency` does, plus our memory bound.
pub fn check_block_size(block_size: u32) -> Result<usize> {
    if (block_size as usize) <= TAIL_SIZE || block_size > MAX_BLOCK_SIZE {
        return Err(Error::unsupported("pgzip block size", format!("{block_size} (must be above {TAIL_SIZE} and at most {MAX_BLOCK_SIZE})")));
    }
    Ok(block_size as usize)
}

/// Compresses one pgzip block: `dict` is the previous block's tail (empty for the first).
pub(crate) fn compress_block(deflater: &mut Deflater, dict: &[u8], block: &[u8], last: bool, out: &mut Vec<u8>) {
    deflater.reset_with_dict(dict);
    deflater.write(block);
    deflater.sync_flush();
    if last {
        deflater.close();
    }
    deflater.drain_output_into(out);
}

/// Writes `input` as pgzip would with `block_size`, using `header`. Memory stays bounded
/// by a few blocks per thread. Returns the number of uncompressed bytes.
pub fn encode<R: Read, W: Write>(mut input: R, mut output: W, block_size: u32, header: &GzipHeader) -> Result<u64> {
    let block_size = check_block_size(block_size)?;
    output.write_all(&header.to_bytes()?).ctx(|| "writing gzip header".into())?;
    // A batch per round: enough blocks to keep every thread busy.
    let batch = rayon::current_num_threads().max(1) * 2;
    let mut crc = crc32fast::Hasher::new();
    let mut total = 0u64;
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let mut blocks = Vec::with_capacity(batch);
        let mut finished = false;
        while blocks.len() < batch {
            let block = read_block(&mut input, block_size)?;
            crc.update(&block);
            total += block.len() as u64;
            // Only a short (possibly empty) block can be the last: pgzip compresses a full
            // block as soon as it fills, and Close then compresses whatever is left.
            finished = block.len() < block_size;
            blocks.push(block);
            if finished {
                break;
            }
        }
        let dicts: Vec<&[u8]> =
            std::iter::once(&tail[..]).chain(blocks.iter().map(|b| if b.len() > TAIL_SIZE { &b[b.len() - TAIL_SIZE..] } else { &[][..] })).collect();
        let n = blocks.len();
        let compressed: Vec<Vec<u8>> = blocks
            .par_iter()
            .enumerate()
            .map_init(Deflater::new, |deflater, (i, block)| {
                let mut out = Vec::with_capacity(block.len() / 2 + 64);
                compress_block(deflater, dicts[i], block, finished && i + 1 == n, &mut out);
                out
            })
            .collect();
        for c in &compressed {
            output.write_all(c).ctx(|| "writing pgzip block".into())?;
        }
        tail = dicts[n].to_vec();
        if finished {
            break;
        }
    }
    output.write_all(&trailer(crc.finalize(), total)).ctx(|| "writing gzip trailer".into())?;
    Ok(total)
}

/// Reads up to `size` bytes, short only at end of input.
pub(crate) fn read_block(input: &mut impl Read, size: usize) -> Result<Vec<u8>> {
    let mut block = Vec::with_capacity(size);
    input.take(size as u64).read_to_end(&mut block).ctx(|| "reading layer".into())?;
    Ok(block)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pgzip(data: &[u8], block_size: u32) -> Vec<u8> {
        let mut out = Vec::new();
        encode(data, &mut out, block_size, &GzipHeader::klauspost_default()).unwrap();
        out
    }

    #[test]
    fn empty_input_matches_pgzip() {
        // header, empty block + sync marker, empty final block, CRC and size of nothing.
        let mut expect = GzipHeader::klauspost_default().to_bytes().unwrap();
        expect.extend_from_slice(&[0, 0, 0, 0xff, 0xff, 0x03, 0x00]);
        expect.extend_from_slice(&[0; 8]);
        assert_eq!(pgzip(b"", UMOCI_BLOCK_SIZE), expect);
    }

    #[test]
    fn block_sizes_pgzip_rejects_are_unsupported() {
        assert!(check_block_size(16384).is_err());
        assert!(check_block_size(16385).is_ok());
    }

    #[test]
    fn output_decodes_at_block_multiples() {
        let data: Vec<u8> = (0..100_000u32).flat_map(|i| (i % 977).to_le_bytes()).collect();
        for len in [0, 1, 20_000, 40_000, 80_000, 400_000] {
            let gz = pgzip(&data[..len], 20_000);
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut out).unwrap();
            assert_eq!(out, &data[..len]);
        }
    }
}
