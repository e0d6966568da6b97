//! The patch record stream: how one target layer tar is rebuilt from source material.
//!
//! A patch is a header followed by records. `COPY` records copy a byte range of an
//! uncompressed source layer; `CHUNK` records carry one zstd frame of literal bytes,
//! compressed against a prefix assembled from source ranges (the partners of the literal
//! bytes, in the same order); `LITERAL` records take the next bytes of the current chunk.
//! `ADD` records add source bytes and the next bytes of the current chunk; where a delta has
//! difference chunks (`DIFFERENCES`, LZMA streams without prefix, [`crate::format::lzma`]),
//! `ADD-DIFFERENCES` records take theirs from the current difference chunk instead, so that the
//! differences and the literals are compressed apart, as bsdiff keeps them.
//! The stream ends with `END`. Integers are unsigned LEB128; copy and prefix offsets are
//! zigzag deltas from the end of the previous range read from the same source layer.
//!
//! The reader treats its input as hostile: every length is checked against the format limits
//! and the declared tar length before anything is allocated or read, and the work a patch
//! can cause is bounded by the bytes it produces: every record produces at least one byte
//! (no empty copies, literals or chunks), a chunk frame is no larger than zstd's bound for its
//! decompressed length, and the reference prefixes of all chunks together read at most
//! [`PREFIX_BYTES_PER_TAR_BYTE`] times the tar length (plus [`PREFIX_ALLOWANCE_CHUNKS`]
//! whole prefixes).

use std::collections::HashMap;
use std::io::{self, Read, Write};

use crate::error::{Error, Result};
use crate::format::{MAX_CHUNK_BYTES, MAX_DIFFERENCE_CHUNK_BYTES, MAX_FRAME_BYTES, MAX_PREFIX_BYTES, MAX_PREFIX_RANGES};

/// The first bytes of every patch.
pub const PATCH_MAGIC: &[u8; 8] = b"FDPATCH\x01";

/// Prefix bytes a patch may read per byte of the tar it rebuilds, over all its chunks. The
/// differ's prefixes are the literals' partners plus bounded context, so a real patch reads
/// a few bytes of prefix per literal byte; a hostile one could otherwise read 8 MiB per
/// one-byte chunk.
pub const PREFIX_BYTES_PER_TAR_BYTE: u64 = 16;
/// Whole prefixes ([`MAX_PREFIX_BYTES`] each) a patch may read beyond
/// [`PREFIX_BYTES_PER_TAR_BYTE`]: small layers whose few chunks have large contexts.
pub const PREFIX_ALLOWANCE_CHUNKS: u64 = 8;

/// The most prefix bytes all chunks of a patch for a `tar_len`-byte tar may read together
/// (the differ keeps within it, the reader refuses more).
pub fn prefix_budget(tar_len: u64) -> u64 {
    tar_len.saturating_mul(PREFIX_BYTES_PER_TAR_BYTE).saturating_add(PREFIX_ALLOWANCE_CHUNKS * MAX_PREFIX_BYTES)
}

const TAG_END: u8 = 0;
const TAG_COPY: u8 = 1;
const TAG_LITERAL: u8 = 2;
const TAG_CHUNK: u8 = 3;
const TAG_RETIMED: u8 = 4;
const TAG_ADD: u8 = 5;
const TAG_DIFFERENCES: u8 = 6;
const TAG_ADD_DIFFERENCES: u8 = 7;

/// A byte range of an uncompressed source layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceRange {
    /// Index of the source layer.
    pub layer: u32,
    /// Offset in its uncompressed tar.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl SourceRange {
    /// One past the last byte (saturating: ranges read from a patch are checked separately).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// What a patch says about the tar it rebuilds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchHeader {
    /// Index of the target layer.
    pub target_layer: u32,
    /// Length of the tar the patch rebuilds.
    pub tar_len: u64,
}

/// One record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// Copy a source range to the output.
    Copy(SourceRange),
    /// Copy the next `n` bytes of the current chunk to the output.
    Literal(u64),
    /// A new chunk replaces the current one (which must have been consumed whole).
    Chunk {
        /// The ranges whose concatenation is the zstd reference prefix.
        prefix: Vec<SourceRange>,
        /// Decompressed length.
        raw_len: u64,
        /// The zstd frame.
        frame: Vec<u8>,
    },
    /// Copy a source range of tar blocks that starts at a header, with every header's mtime
    /// moved by `shift` seconds and its checksum recomputed ([`crate::format::retime`];
    /// feature [`crate::format::plan::FEATURE_RETIMED_HEADERS`]).
    Retimed {
        /// The source span.
        range: SourceRange,
        /// Seconds added to each header's mtime.
        shift: i64,
    },
    /// Append source range bytes each plus (modulo 256) the next byte of the current chunk:
    /// bsdiff's "add" of a source region that the target changed in scattered places
    /// (feature [`crate::format::plan::FEATURE_ADD_RANGES`]). The chunk carries the
    /// differences, mostly zeros, which compress to almost nothing.
    Add(SourceRange),
    /// A new difference chunk replaces the current one (which must have been consumed whole):
    /// a raw LZMA2 stream ([`crate::format::lzma`]; feature
    /// [`crate::format::plan::FEATURE_DIFFERENCE_CHUNKS`]).
    Differences {
        /// Decompressed length.
        raw_len: u64,
        /// The LZMA2 stream.
        frame: Vec<u8>,
    },
    /// Like [`Record::Add`], with the differences taken from the current difference chunk.
    AddDifferences(SourceRange),
    /// The end of the patch.
    End,
}

/// Writes a patch.
#[derive(Debug)]
pub struct RecordWriter<W: Write> {
    out: W,
    cursors: HashMap<u32, u64>,
}

impl<W: Write> RecordWriter<W> {
    /// Starts a patch with its header.
    pub fn new(mut out: W, header: PatchHeader) -> io::Result<Self> {
        out.write_all(PATCH_MAGIC)?;
        write_varint(&mut out, header.target_layer as u64)?;
        write_varint(&mut out, header.tar_len)?;
        Ok(RecordWriter { out, cursors: HashMap::new() })
    }

    fn range(&mut self, r: &SourceRange) -> io::Result<()> {
        let cursor = self.cursors.entry(r.layer).or_insert(0);
        let delta = r.offset as i128 - *cursor as i128;
        *cursor = r.end();
        write_varint(&mut self.out, r.layer as u64)?;
        write_varint(&mut self.out, zigzag(delta as i64))?;
        write_varint(&mut self.out, r.len)
    }

    /// Writes one record.
    pub fn write(&mut self, record: &Record) -> io::Result<()> {
        match record {
            Record::Copy(r) => {
                self.out.write_all(&[TAG_COPY])?;
                self.range(r)
            }
            Record::Literal(n) => {
                self.out.write_all(&[TAG_LITERAL])?;
                write_varint(&mut self.out, *n)
            }
            Record::Chunk { prefix, raw_len, frame } => {
                self.out.write_all(&[TAG_CHUNK])?;
                write_varint(&mut self.out, prefix.len() as u64)?;
                for r in prefix {
                    self.range(r)?;
                }
                write_varint(&mut self.out, *raw_len)?;
                write_varint(&mut self.out, frame.len() as u64)?;
                self.out.write_all(frame)
            }
            Record::Retimed { range, shift } => {
                self.out.write_all(&[TAG_RETIMED])?;
                self.range(range)?;
                write_varint(&mut self.out, zigzag(*shift))
            }
            Record::Add(r) => {
                self.out.write_all(&[TAG_ADD])?;
                self.range(r)
            }
            Record::Differences { raw_len, frame } => {
                self.out.write_all(&[TAG_DIFFERENCES])?;
                write_varint(&mut self.out, *raw_len)?;
                write_varint(&mut self.out, frame.len() as u64)?;
                self.out.write_all(frame)
            }
            Record::AddDifferences(r) => {
                self.out.write_all(&[TAG_ADD_DIFFERENCES])?;
                self.range(r)
            }
            Record::End => self.out.write_all(&[TAG_END]),
        }
    }

    /// Returns the output.
    pub fn into_inner(self) -> W {
        self.out
    }
}

/// Reads a patch, enforcing the format limits and the declared tar length.
#[derive(Debug)]
pub struct RecordReader<R: Read> {
    input: R,
    header: PatchHeader,
    cursors: HashMap<u32, u64>,
    produced: u64,
    chunk_left: u64,
    differences_left: u64,
    prefix_budget: u64,
    ended: bool,
    retimed_allowed: bool,
    add_allowed: bool,
    differences_allowed: bool,
    skip_frames: bool,
}

fn bad(reason: impl Into<String>) -> Error {
    Error::malformed("patch", reason)
}

impl<R: Read> RecordReader<R> {
    /// Reads the header. `max_tar_len` bounds the declared tar length.
    pub fn new(mut input: R, max_tar_len: u64) -> Result<Self> {
        let mut magic = [0u8; 8];
        read_exact(&mut input, &mut magic)?;
        if &magic != PATCH_MAGIC {
            return Err(bad("not a fleetdelta patch (bad magic)"));
        }
        let target_layer = u32::try_from(read_varint(&mut input)?).map_err(|_| bad("target layer index out of range"))?;
        let tar_len = read_varint(&mut input)?;
        if tar_len > max_tar_len {
            return Err(Error::TooLarge { what: format!("patch for target layer {target_layer}"), limit: max_tar_len });
        }
        Ok(RecordReader {
            input,
            header: PatchHeader { target_layer, tar_len },
            cursors: HashMap::new(),
            produced: 0,
            chunk_left: 0,
            differences_left: 0,
            prefix_budget: prefix_budget(tar_len),
            ended: false,
            retimed_allowed: false,
            add_allowed: false,
            differences_allowed: false,
            skip_frames: false,
        })
    }

    /// Reads past the frames of chunks and difference chunks rather than into memory: their
    /// records come with an empty `frame`. For a scan of what a patch reads, which needs no
    /// frame, at the cost of a small buffer instead of one allocation per chunk.
    pub fn skip_frames(mut self, skip: bool) -> Self {
        self.skip_frames = skip;
        self
    }

    /// Accepts `RETIMED` records, which a delta may use only when it declares
    /// [`crate::format::plan::FEATURE_RETIMED_HEADERS`].
    pub fn allow_retimed(mut self, allowed: bool) -> Self {
        self.retimed_allowed = allowed;
        self
    }

    /// Accepts `ADD` records, which a delta may use only when it declares
    /// [`crate::format::plan::FEATURE_ADD_RANGES`].
    pub fn allow_add(mut self, allowed: bool) -> Self {
        self.add_allowed = allowed;
        self
    }

    /// Accepts `DIFFERENCES` and `ADD-DIFFERENCES` records, which a delta may use only when it
    /// declares [`crate::format::plan::FEATURE_DIFFERENCE_CHUNKS`].
    pub fn allow_differences(mut self, allowed: bool) -> Self {
        self.differences_allowed = allowed;
        self
    }

    /// Returns the input, positioned after the last record read.
    pub fn into_inner(self) -> R {
        self.input
    }

    /// The header.
    pub fn header(&self) -> PatchHeader {
        self.header
    }

    fn range(&mut self) -> Result<SourceRange> {
        let layer = u32::try_from(read_varint(&mut self.input)?).map_err(|_| bad("source layer index out of range"))?;
        let delta = unzigzag(read_varint(&mut self.input)?);
        let len = read_varint(&mut self.input)?;
        let cursor = self.cursors.entry(layer).or_insert(0);
        let offset = u64::try_from(*cursor as i128 + delta as i128).map_err(|_| bad("source offset out of range"))?;
        let end = offset.checked_add(len).ok_or_else(|| bad("source range overflows"))?;
        *cursor = end;
        Ok(SourceRange { layer, offset, len })
    }

    fn produce(&mut self, n: u64) -> Result<()> {
        self.produced = self
            .produced
            .checked_add(n)
            .filter(|p| *p <= self.header.tar_len)
            .ok_or_else(|| bad(format!("records produce more than the declared {} bytes", self.header.tar_len)))?;
        Ok(())
    }

    /// A chunk's (`what`) decompressed length, at most `max`, and its frame, checked against
    /// the format limits and the bytes left to produce.
    fn chunk_body(&mut self, what: &str, max: u64) -> Result<(u64, Vec<u8>)> {
        let raw_len = read_varint(&mut self.input)?;
        if raw_len > max {
            return Err(Error::TooLarge { what: what.into(), limit: max });
        }
        if raw_len == 0 {
            return Err(bad(format!("a {what} of 0 bytes")));
        }
        if raw_len > self.header.tar_len - self.produced {
            return Err(bad(format!("a {what} of {raw_len} bytes, more than the {} bytes left to produce", self.header.tar_len - self.produced)));
        }
        let frame_len = read_varint(&mut self.input)?;
        let frame_limit = (zstd::zstd_safe::compress_bound(raw_len as usize) as u64).min(MAX_FRAME_BYTES);
        if frame_len > frame_limit {
            return Err(bad(format!("a {what} frame of {frame_len} bytes for {raw_len} bytes, more than zstd's bound of {frame_limit}")));
        }
        let mut frame = Vec::new();
        let mut input = (&mut self.input).take(frame_len);
        let read = if self.skip_frames {
            io::copy(&mut input, &mut io::sink())
        } else {
            // Bounded by the checks above; allocated whole, not grown as it is read.
            frame.reserve_exact(frame_len as usize);
            input.read_to_end(&mut frame).map(|n| n as u64)
        };
        if read.map_err(|e| Error::io("reading patch", e))? != frame_len {
            return Err(bad(format!("truncated {what} frame")));
        }
        Ok((raw_len, frame))
    }

    /// An add's source range, its differences taken from the current chunk, or from the
    /// current difference chunk when `from_differences`.
    fn add(&mut self, from_differences: bool) -> Result<SourceRange> {
        let r = self.range()?;
        if r.len == 0 {
            return Err(bad("an add of 0 bytes"));
        }
        let (left, what) = if from_differences { (&mut self.differences_left, "difference chunk") } else { (&mut self.chunk_left, "chunk") };
        if r.len > *left {
            return Err(bad(format!("an add of {} bytes but only {} left in the {what}", r.len, *left)));
        }
        *left -= r.len;
        self.produce(r.len)?;
        Ok(r)
    }

    /// The next record. After [`Record::End`] the output length has been checked.
    pub fn next_record(&mut self) -> Result<Record> {
        if self.ended {
            return Err(bad("read past the end record"));
        }
        let mut tag = [0u8; 1];
        read_exact(&mut self.input, &mut tag)?;
        match tag[0] {
            TAG_END => {
                if self.produced != self.header.tar_len {
                    return Err(bad(format!("records produce {} bytes, {} declared", self.produced, self.header.tar_len)));
                }
                if self.chunk_left != 0 {
                    return Err(bad(format!("{} bytes of the last chunk unused", self.chunk_left)));
                }
                if self.differences_left != 0 {
                    return Err(bad(format!("{} bytes of the last difference chunk unused", self.differences_left)));
                }
                self.ended = true;
                Ok(Record::End)
            }
            TAG_COPY => {
                let r = self.range()?;
                if r.len == 0 {
                    return Err(bad("a copy of 0 bytes"));
                }
                self.produce(r.len)?;
                Ok(Record::Copy(r))
            }
            TAG_LITERAL => {
                let n = read_varint(&mut self.input)?;
                if n == 0 {
                    return Err(bad("a literal of 0 bytes"));
                }
                if n > self.chunk_left {
                    return Err(bad(format!("literal of {n} bytes but only {} left in the chunk", self.chunk_left)));
                }
                self.chunk_left -= n;
                self.produce(n)?;
                Ok(Record::Literal(n))
            }
            TAG_CHUNK => {
                if self.chunk_left != 0 {
                    return Err(bad(format!("new chunk while {} bytes of the previous one are unused", self.chunk_left)));
                }
                let count = read_varint(&mut self.input)?;
                if count > MAX_PREFIX_RANGES {
                    return Err(Error::TooLarge { what: "chunk prefix range count".into(), limit: MAX_PREFIX_RANGES });
                }
                let mut prefix = Vec::with_capacity(count.min(1024) as usize);
                let mut prefix_len = 0u64;
                for _ in 0..count {
                    let r = self.range()?;
                    prefix_len = prefix_len.saturating_add(r.len);
                    if prefix_len > MAX_PREFIX_BYTES {
                        return Err(Error::TooLarge { what: "chunk prefix".into(), limit: MAX_PREFIX_BYTES });
                    }
                    prefix.push(r);
                }
                self.prefix_budget = self.prefix_budget.checked_sub(prefix_len).ok_or_else(|| {
                    bad(format!("chunk prefixes read more than {PREFIX_BYTES_PER_TAR_BYTE} bytes per byte of the {}-byte tar", self.header.tar_len))
                })?;
                let (raw_len, frame) = self.chunk_body("chunk", MAX_CHUNK_BYTES)?;
                self.chunk_left = raw_len;
                Ok(Record::Chunk { prefix, raw_len, frame })
            }
            TAG_RETIMED if self.retimed_allowed => {
                let range = self.range()?;
                let shift = unzigzag(read_varint(&mut self.input)?);
                if range.len == 0 {
                    return Err(bad("a retimed span of 0 bytes"));
                }
                self.produce(range.len)?;
                Ok(Record::Retimed { range, shift })
            }
            TAG_RETIMED => Err(bad(format!("a retimed record in a delta that does not declare {:?}", crate::format::plan::FEATURE_RETIMED_HEADERS))),
            TAG_ADD if self.add_allowed => Ok(Record::Add(self.add(false)?)),
            TAG_ADD => Err(bad(format!("an add record in a delta that does not declare {:?}", crate::format::plan::FEATURE_ADD_RANGES))),
            TAG_DIFFERENCES if self.differences_allowed => {
                if self.differences_left != 0 {
                    return Err(bad(format!("new difference chunk while {} bytes of the previous one are unused", self.differences_left)));
                }
                let (raw_len, frame) = self.chunk_body("difference chunk", MAX_DIFFERENCE_CHUNK_BYTES)?;
                self.differences_left = raw_len;
                Ok(Record::Differences { raw_len, frame })
            }
            TAG_ADD_DIFFERENCES if self.differences_allowed => Ok(Record::AddDifferences(self.add(true)?)),
            TAG_DIFFERENCES | TAG_ADD_DIFFERENCES => {
                Err(bad(format!("a difference chunk or its add in a delta that does not declare {:?}", crate::format::plan::FEATURE_DIFFERENCE_CHUNKS)))
            }
            other => Err(bad(format!("unknown record tag {other}"))),
        }
    }
}

fn read_exact(input: &mut impl Read, buf: &mut [u8]) -> Result<()> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => bad("truncated"),
        _ => Error::io("reading patch", e),
    })
}

/// Writes an unsigned LEB128 integer.
pub fn write_varint(out: &mut impl Write, mut v: u64) -> io::Result<()> {
    let mut buf = [0u8; 10];
    let mut i = 0;
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            buf[i] = byte;
            i += 1;
            break;
        }
        buf[i] = byte | 0x80;
        i += 1;
    }
    out.write_all(&buf[..i])
}

/// Reads an unsigned LEB128 integer, refusing overlong or overflowing encodings.
pub fn read_varint(input: &mut impl Read) -> Result<u64> {
    let mut v = 0u64;
    for i in 0..10 {
        let mut b = [0u8; 1];
        read_exact(input, &mut b)?;
        let byte = b[0];
        if i == 9 && byte > 1 {
            return Err(bad("integer overflows 64 bits"));
        }
        v |= ((byte & 0x7f) as u64) << (7 * i);
        if byte & 0x80 == 0 {
            if i > 0 && byte == 0 {
                return Err(bad("overlong integer encoding"));
            }
            return Ok(v);
        }
    }
    Err(bad("integer longer than 10 bytes"))
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (PatchHeader, Vec<Record>) {
        let header = PatchHeader { target_layer: 3, tar_len: 100 + 7 + 4 + 5 + 1024 };
        let records = vec![
            Record::Copy(SourceRange { layer: 1, offset: 5000, len: 100 }),
            Record::Retimed { range: SourceRange { layer: 0, offset: 512, len: 1024 }, shift: -5 },
            Record::Chunk {
                prefix: vec![SourceRange { layer: 1, offset: 10, len: 20 }, SourceRange { layer: 0, offset: 7, len: 9 }],
                raw_len: 16,
                frame: vec![1, 2, 3],
            },
            Record::Literal(7),
            Record::Add(SourceRange { layer: 1, offset: 4000, len: 4 }),
            Record::Literal(5),
            Record::End,
        ];
        (header, records)
    }

    fn encode(header: PatchHeader, records: &[Record]) -> Vec<u8> {
        let mut w = RecordWriter::new(Vec::new(), header).unwrap();
        for r in records {
            w.write(r).unwrap();
        }
        w.into_inner()
    }

    fn decode(bytes: &[u8]) -> Result<Vec<Record>> {
        let mut r = RecordReader::new(bytes, u64::MAX)?.allow_retimed(true).allow_add(true).allow_differences(true);
        let mut out = Vec::new();
        loop {
            let rec = r.next_record()?;
            let end = rec == Record::End;
            out.push(rec);
            if end {
                return Ok(out);
            }
        }
    }

    #[test]
    fn skipped_frames_read_as_empty_and_a_truncated_one_still_fails() {
        let (h, recs) = sample();
        let bytes = encode(h, &recs);
        let mut r = RecordReader::new(&bytes[..], u64::MAX).unwrap().allow_retimed(true).allow_add(true).skip_frames(true);
        for expected in &recs {
            let expected = match expected.clone() {
                Record::Chunk { prefix, raw_len, .. } => Record::Chunk { prefix, raw_len, frame: Vec::new() },
                other => other,
            };
            assert_eq!(r.next_record().unwrap(), expected);
        }
        // Cut inside the chunk's 3-byte frame.
        let frame_end = bytes.windows(3).position(|w| w == [1, 2, 3]).unwrap() + 3;
        let mut r = RecordReader::new(&bytes[..frame_end - 1], u64::MAX).unwrap().allow_retimed(true).allow_add(true).skip_frames(true);
        let err = (0..3).map(|_| r.next_record()).find_map(Result::err).unwrap();
        assert!(err.to_string().contains("truncated chunk frame"), "{err}");
    }

    #[test]
    fn records_round_trip() {
        let (h, recs) = sample();
        let bytes = encode(h, &recs);
        assert_eq!(RecordReader::new(&bytes[..], u64::MAX).unwrap().header(), h);
        assert_eq!(decode(&bytes).unwrap(), recs);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let (h, recs) = sample();
        let bytes = encode(h, &recs);
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "truncated at {cut} accepted");
        }
    }

    #[test]
    fn inconsistent_streams_are_refused() {
        let h = PatchHeader { target_layer: 0, tar_len: 10 };
        let cases: Vec<(&str, Vec<Record>)> = vec![
            ("too long", vec![Record::Copy(SourceRange { layer: 0, offset: 0, len: 11 }), Record::End]),
            ("too short", vec![Record::Copy(SourceRange { layer: 0, offset: 0, len: 9 }), Record::End]),
            ("literal without chunk", vec![Record::Literal(10), Record::End]),
            (
                "unused chunk",
                vec![
                    Record::Chunk { prefix: vec![], raw_len: 10, frame: vec![0] },
                    Record::Literal(5),
                    Record::Copy(SourceRange { layer: 0, offset: 0, len: 5 }),
                    Record::End,
                ],
            ),
            ("oversized chunk", vec![Record::Chunk { prefix: vec![], raw_len: MAX_CHUNK_BYTES + 1, frame: vec![] }]),
            (
                "oversized prefix",
                vec![Record::Chunk { prefix: vec![SourceRange { layer: 0, offset: 0, len: MAX_PREFIX_BYTES + 1 }], raw_len: 1, frame: vec![] }],
            ),
            (
                "empty copy",
                vec![Record::Copy(SourceRange { layer: 0, offset: 0, len: 0 }), Record::Copy(SourceRange { layer: 0, offset: 0, len: 10 }), Record::End],
            ),
            ("empty literal", vec![Record::Chunk { prefix: vec![], raw_len: 10, frame: vec![0] }, Record::Literal(0), Record::Literal(10), Record::End]),
            (
                "empty chunk",
                vec![Record::Chunk { prefix: vec![], raw_len: 0, frame: vec![] }, Record::Copy(SourceRange { layer: 0, offset: 0, len: 10 }), Record::End],
            ),
            (
                "chunk past the tar",
                vec![Record::Copy(SourceRange { layer: 0, offset: 0, len: 5 }), Record::Chunk { prefix: vec![], raw_len: 6, frame: vec![0] }],
            ),
            ("frame past zstd's bound", vec![Record::Chunk { prefix: vec![], raw_len: 10, frame: vec![0; 200] }, Record::Literal(10), Record::End]),
        ];
        for (name, recs) in cases {
            assert!(decode(&encode(h, &recs)).is_err(), "{name} accepted");
        }
        assert!(matches!(RecordReader::new(&encode(h, &[])[..], 9), Err(Error::TooLarge { .. })));
        assert!(decode(b"NOTAPATCH").is_err());
        let empty_retime = vec![Record::Retimed { range: SourceRange { layer: 0, offset: 0, len: 0 }, shift: 1 }, Record::End];
        assert!(decode(&encode(h, &empty_retime)).is_err(), "empty retimed span accepted");
    }

    #[test]
    fn retimed_records_need_the_feature() {
        let (h, recs) = sample();
        let bytes = encode(h, &recs);
        let mut r = RecordReader::new(&bytes[..], u64::MAX).unwrap();
        assert!(matches!(r.next_record().unwrap(), Record::Copy(_)));
        let err = r.next_record().unwrap_err().to_string();
        assert!(err.contains("does not declare \"retimed-headers\""), "{err}");
    }

    #[test]
    fn add_records_need_the_feature_and_take_their_differences_from_the_chunk() {
        let (h, recs) = sample();
        let bytes = encode(h, &recs);
        let mut r = RecordReader::new(&bytes[..], u64::MAX).unwrap().allow_retimed(true);
        for _ in 0..4 {
            r.next_record().unwrap();
        }
        let err = r.next_record().unwrap_err().to_string();
        assert!(err.contains("does not declare \"add-ranges\""), "{err}");

        let h = PatchHeader { target_layer: 0, tar_len: 10 };
        let past = [Record::Chunk { prefix: vec![], raw_len: 5, frame: vec![0] }, Record::Add(SourceRange { layer: 0, offset: 0, len: 6 })];
        let err = decode(&encode(h, &past)).unwrap_err().to_string();
        assert!(err.contains("an add of 6 bytes but only 5 left in the chunk"), "{err}");
        let without_chunk = [Record::Add(SourceRange { layer: 0, offset: 0, len: 10 }), Record::End];
        assert!(decode(&encode(h, &without_chunk)).is_err());
        let empty = [Record::Chunk { prefix: vec![], raw_len: 10, frame: vec![0] }, Record::Add(SourceRange { layer: 0, offset: 0, len: 0 })];
        assert!(decode(&encode(h, &empty)).unwrap_err().to_string().contains("an add of 0 bytes"));
    }

    #[test]
    fn difference_chunks_need_the_feature_and_are_consumed_apart_from_the_chunk() {
        let h = PatchHeader { target_layer: 0, tar_len: 20 };
        let differences = |raw_len: u64| Record::Differences { raw_len, frame: vec![9, 8] };
        let chunk = |raw_len: u64| Record::Chunk { prefix: vec![SourceRange { layer: 0, offset: 0, len: 3 }], raw_len, frame: vec![1] };
        let add = |len: u64| Record::AddDifferences(SourceRange { layer: 0, offset: 0, len });
        // Adds and literals interleave, each taking from its own chunk.
        let recs = vec![
            differences(8),
            chunk(6),
            add(5),
            Record::Literal(4),
            add(3),
            Record::Literal(2),
            Record::Copy(SourceRange { layer: 1, offset: 0, len: 6 }),
            Record::End,
        ];
        let bytes = encode(h, &recs);
        assert_eq!(decode(&bytes).unwrap(), recs);
        let mut r = RecordReader::new(&bytes[..], u64::MAX).unwrap().allow_add(true);
        let err = r.next_record().unwrap_err().to_string();
        assert!(err.contains("does not declare \"difference-chunks\""), "{err}");

        let cases: Vec<(&str, Vec<Record>)> = vec![
            ("add past the difference chunk", vec![differences(4), add(5)]),
            ("add without a difference chunk", vec![chunk(20), add(5)]),
            ("unused difference chunk", vec![differences(4), add(2), Record::Copy(SourceRange { layer: 0, offset: 0, len: 18 }), Record::End]),
            ("new difference chunk before the last is used", vec![differences(4), add(2), differences(2)]),
            ("empty difference chunk", vec![differences(0)]),
            ("oversized difference chunk", vec![Record::Differences { raw_len: MAX_DIFFERENCE_CHUNK_BYTES + 1, frame: vec![] }]),
            ("difference chunk past the tar", vec![differences(21)]),
            ("frame past the bound", vec![Record::Differences { raw_len: 10, frame: vec![0; 200] }]),
            ("empty add", vec![differences(4), add(0)]),
        ];
        for (name, recs) in cases {
            let h = PatchHeader { target_layer: 0, tar_len: if name.starts_with("oversized") { u64::MAX } else { 20 } };
            assert!(decode(&encode(h, &recs)).is_err(), "{name} accepted");
        }
    }

    #[test]
    fn prefixes_are_bounded_per_byte_produced() {
        // One-byte chunks, each with a whole prefix: the reads a tiny patch could cause.
        let chunks = PREFIX_ALLOWANCE_CHUNKS + 2 * PREFIX_BYTES_PER_TAR_BYTE;
        let h = PatchHeader { target_layer: 0, tar_len: chunks };
        let mut recs = Vec::new();
        for _ in 0..chunks {
            recs.push(Record::Chunk { prefix: vec![SourceRange { layer: 0, offset: 0, len: MAX_PREFIX_BYTES }], raw_len: 1, frame: vec![0] });
            recs.push(Record::Literal(1));
        }
        recs.push(Record::End);
        let err = decode(&encode(h, &recs)).unwrap_err().to_string();
        assert!(err.contains("bytes per byte"), "{err}");
        // The same prefixes over a tar long enough to justify them are accepted.
        let mut recs: Vec<Record> = recs[..2 * PREFIX_ALLOWANCE_CHUNKS as usize].to_vec();
        recs.push(Record::End);
        decode(&encode(PatchHeader { target_layer: 0, tar_len: PREFIX_ALLOWANCE_CHUNKS }, &recs)).unwrap();
    }

    #[test]
    fn varints_refuse_overflow_and_overlong_forms() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut b = Vec::new();
            write_varint(&mut b, v).unwrap();
            assert_eq!(read_varint(&mut &b[..]).unwrap(), v);
        }
        assert!(read_varint(&mut &[0xff; 11][..]).is_err());
        assert!(read_varint(&mut &[0x80, 0x00][..]).is_err());
        assert!(read_varint(&mut &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02][..]).is_err());
        for v in [0i64, -1, 1, i64::MIN, i64::MAX] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
    }
}
