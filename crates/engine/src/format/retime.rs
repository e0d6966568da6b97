//! Retimed tar spans: source tar bytes copied with every header's modification time moved by
//! the same number of seconds and its checksum recomputed (the patch record `RETIMED`,
//! feature [`crate::format::plan::FEATURE_RETIMED_HEADERS`]).
//!
//! Two builds of the same tree a few seconds apart give layers whose unchanged files differ
//! only in their headers: every mtime moves by the same few seconds, and the header checksum
//! with it. A byte matcher pays for each of those headers; one `RETIMED` record rebuilds a run
//! of such entries, contents included, from a few bytes.
//!
//! The span starts at a header. A [`Retimer`] walks it block by block: at each header it
//! rewrites the mtime and checksum fields (an mtime of 0 is kept: it is how GNU tar and others
//! mark the pseudo-headers of long names and PAX records, and a reproducible build's zero
//! stays zero), reads the size field and skips the data blocks
//! that follow; an all-zero block where a header is due ends the archive, and everything after
//! it is copied as it is. Field layouts are kept exactly (leading spaces, digit count,
//! terminators), so a header whose new value needs more digits is refused: the differ only
//! writes a record after checking that its output equals the target bytes.

use crate::error::{Error, Result};

/// Size of a tar block.
pub const BLOCK: u64 = 512;

const SIZE_FIELD: std::ops::Range<usize> = 124..136;
const MTIME_FIELD: std::ops::Range<usize> = 136..148;
const CHECKSUM_FIELD: std::ops::Range<usize> = 148..156;

fn bad(reason: impl Into<String>) -> Error {
    Error::malformed("retimed tar span", reason)
}

/// Walks a span of tar blocks that starts at a header, retiming every header in it.
#[derive(Clone, Debug)]
pub struct Retimer {
    shift: i64,
    /// Span offset of the next byte [`Retimer::apply`] will see.
    pos: u64,
    /// Span offset of the next header, `None` once the end-of-archive block has been seen.
    next_header: Option<u64>,
    /// Headers rewritten so far.
    headers: u64,
}

impl Retimer {
    /// A walker that moves mtimes by `shift` seconds.
    pub fn new(shift: i64) -> Self {
        Retimer { shift, pos: 0, next_header: Some(0), headers: 0 }
    }

    /// Retimes `buf`, the next bytes of the span, in place. A header must lie whole inside one
    /// call: callers pass buffers whose lengths are multiples of [`BLOCK`], except the last.
    pub fn apply(&mut self, buf: &mut [u8]) -> Result<()> {
        let end = self.pos + buf.len() as u64;
        while let Some(h) = self.next_header.filter(|h| *h < end) {
            let at = (h - self.pos) as usize;
            let Some(block) = buf.get_mut(at..at + BLOCK as usize) else {
                return Err(bad(format!("the span ends inside the header at offset {h}")));
            };
            if block.iter().all(|b| *b == 0) {
                self.next_header = None;
                break;
            }
            let size = retime_header(block, self.shift)?;
            self.headers += 1;
            self.next_header = size.div_ceil(BLOCK).checked_mul(BLOCK).and_then(|d| d.checked_add(h + BLOCK));
        }
        self.pos = end;
        Ok(())
    }

    /// Headers walked so far.
    pub fn headers(&self) -> u64 {
        self.headers
    }

    /// Span offset where the next header is due, `None` after the end of the archive.
    pub fn next_header(&self) -> Option<u64> {
        self.next_header
    }
}

/// Moves the mtime of one header by `shift` seconds, unless it is 0, and recomputes its
/// checksum. Returns the entry's size (the data blocks that follow the header).
pub fn retime_header(block: &mut [u8], shift: i64) -> Result<u64> {
    let size = parse_size(&block[SIZE_FIELD])?;
    let (digits, mtime) = octal_field(&block[MTIME_FIELD]).ok_or_else(|| bad("a header's mtime field holds no octal number"))?;
    if mtime == 0 {
        return Ok(size);
    }
    let new = i128::from(mtime) + i128::from(shift);
    write_octal(&mut block[MTIME_FIELD][digits], new).ok_or_else(|| bad(format!("mtime {mtime} moved by {shift} s does not fit its field")))?;
    let (digits, _) = octal_field(&block[CHECKSUM_FIELD]).ok_or_else(|| bad("a header's checksum field holds no octal number"))?;
    let sum = header_checksum(block);
    write_octal(&mut block[CHECKSUM_FIELD][digits], i128::from(sum)).ok_or_else(|| bad("a header's checksum does not fit its field"))?;
    Ok(size)
}

/// The size of a header's entry (octal or base-256), when its field holds one.
pub fn header_size(block: &[u8]) -> Option<u64> {
    block.get(SIZE_FIELD).and_then(|f| parse_size(f).ok())
}

/// The mtime of a header, when its field holds an octal number.
pub fn header_mtime(block: &[u8]) -> Option<u64> {
    block.get(MTIME_FIELD).and_then(octal_field).map(|(_, v)| v)
}

/// A tar header's checksum: the sum of its bytes with the checksum field taken as spaces.
pub fn header_checksum(block: &[u8]) -> u64 {
    block.iter().enumerate().map(|(i, b)| if CHECKSUM_FIELD.contains(&i) { u64::from(b' ') } else { u64::from(*b) }).sum()
}

/// The octal digits of a field (after leading spaces): their range in the field and value.
fn octal_field(field: &[u8]) -> Option<(std::ops::Range<usize>, u64)> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        return None;
    }
    let start = field.iter().position(|b| *b != b' ')?;
    let len = field[start..].iter().take_while(|b| (b'0'..=b'7').contains(b)).count();
    if len == 0 {
        return None;
    }
    let value = field[start..start + len].iter().try_fold(0u64, |v, d| v.checked_mul(8)?.checked_add(u64::from(d - b'0')))?;
    Some((start..start + len, value))
}

/// Writes `value` in the digits of `out`, zero-padded; `None` when it does not fit.
fn write_octal(out: &mut [u8], value: i128) -> Option<()> {
    if value < 0 || (out.len() < 40 && value >= 1i128 << (3 * out.len())) {
        return None;
    }
    let mut v = value;
    for d in out.iter_mut().rev() {
        *d = b'0' + (v & 7) as u8;
        v >>= 3;
    }
    Some(())
}

/// The size field: octal, or base-256 (GNU) when its first byte has the high bit set.
fn parse_size(field: &[u8]) -> Result<u64> {
    if field[0] & 0x80 != 0 {
        if field[0] & 0x40 != 0 {
            return Err(bad("a header's size is negative"));
        }
        let mut v: u64 = u64::from(field[0] & 0x3f);
        for b in &field[1..] {
            v = v.checked_mul(256).and_then(|v| v.checked_add(u64::from(*b))).ok_or_else(|| bad("a header's size overflows"))?;
        }
        return Ok(v);
    }
    Ok(octal_field(field).map_or(0, |(_, v)| v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(path: &str, size: u64, mtime: u64) -> Vec<u8> {
        let mut h = tar::Header::new_ustar();
        h.set_path(path).unwrap();
        h.set_size(size);
        h.set_mtime(mtime);
        h.set_mode(0o644);
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn archive(mtime: u64) -> Vec<u8> {
        let mut a = tar::Builder::new(Vec::new());
        for (i, size) in [0usize, 1, 511, 512, 513, 5000].into_iter().enumerate() {
            let data = vec![b'x'; size];
            let mut h = tar::Header::new_gnu();
            h.set_size(size as u64);
            h.set_mtime(mtime + i as u64);
            h.set_mode(0o644);
            a.append_data(&mut h, format!("dir/file-{i}-{}", "long-name-".repeat(i * 3)), &data[..]).unwrap();
        }
        a.into_inner().unwrap()
    }

    #[test]
    fn a_retimed_archive_equals_the_archive_built_later() {
        let (old, new) = (archive(1_700_000_000), archive(1_700_000_005));
        assert_ne!(old, new);
        for chunk in [512usize, 1024, 4096, old.len()] {
            let mut out = old.clone();
            let mut r = Retimer::new(5);
            for piece in out.chunks_mut(chunk) {
                r.apply(piece).unwrap();
            }
            assert_eq!(out, new, "in pieces of {chunk}");
            assert_eq!(r.next_header(), None, "the end-of-archive blocks were seen");
        }
        let mut back = new.clone();
        Retimer::new(-5).apply(&mut back).unwrap();
        assert_eq!(back, old);
    }

    #[test]
    fn the_walker_skips_data_blocks_and_reports_the_next_header() {
        let mut span = header("a", 513, 10);
        span.extend(vec![0xffu8; 1024]); // data that would not parse as a header
        span.extend(header("b", 0, 10));
        let mut r = Retimer::new(1);
        r.apply(&mut span).unwrap();
        assert_eq!(r.next_header(), Some(2048));
        assert_eq!(header_mtime(&span[1536..2048]), Some(11));
        assert!(span[512..1536].iter().all(|b| *b == 0xff), "data untouched");
    }

    #[test]
    fn field_layouts_are_kept_and_overflow_is_refused() {
        let mut h = header("a", 0, 0o7777777777);
        let before = h[MTIME_FIELD].to_vec();
        retime_header(&mut h, 0).unwrap();
        assert_eq!(h[MTIME_FIELD], before[..]);
        let err = retime_header(&mut header("a", 0, 0o77777777777), 1).unwrap_err().to_string();
        assert!(err.contains("does not fit"), "{err}");
        let err = retime_header(&mut header("a", 0, 3), -4).unwrap_err().to_string();
        assert!(err.contains("does not fit"), "{err}");
        let mut zero = header("a", 0, 0);
        let before = zero.clone();
        retime_header(&mut zero, 7).unwrap();
        assert_eq!(zero, before, "an mtime of 0 stays 0");
        let mut blank = header("a", 0, 3);
        blank[MTIME_FIELD].fill(b' ');
        assert!(retime_header(&mut blank, 1).unwrap_err().to_string().contains("mtime field"));
    }

    #[test]
    fn a_header_cut_by_the_span_is_refused() {
        let mut span = header("a", 0, 1)[..300].to_vec();
        assert!(Retimer::new(1).apply(&mut span).unwrap_err().to_string().contains("ends inside the header"));
    }

    #[test]
    fn base_256_sizes_are_read() {
        let mut field = [0u8; 12];
        field[0] = 0x80;
        field[10] = 1;
        field[11] = 2;
        assert_eq!(parse_size(&field).unwrap(), 258);
        field[0] = 0xff;
        assert!(parse_size(&field).is_err());
    }
}
