//! The gzip member header (RFC 1952 section 2.3) as data: every byte an encoder chose,
//! so that a blob can be rebuilt from "encoder + header + uncompressed bytes".

use crate::error::{Error, Result};

const ID1: u8 = 0x1f;
const ID2: u8 = 0x8b;
const CM_DEFLATE: u8 = 8;
const FTEXT: u8 = 0x01;
const FHCRC: u8 = 0x02;
const FEXTRA: u8 = 0x04;
const FNAME: u8 = 0x08;
const FCOMMENT: u8 = 0x10;
/// Flag bits RFC 1952 reserves; a header using them is not one we can describe.
const FRESERVED: u8 = 0xe0;
/// Largest header we parse: 10 fixed bytes, 64 KiB of extra field, and bounded strings.
const MAX_STRING: usize = 64 << 10;

/// Operating-system byte written by Go (`compress/gzip` and pgzip): "unknown".
pub const OS_UNKNOWN: u8 = 255;
/// Operating-system byte written by zlib, GNU gzip and pigz on Unix.
pub const OS_UNIX: u8 = 3;
/// The modification time Go writes when none is set: `time.Time{}.Unix()` truncated to
/// 32 bits (year 1), which puts `00 09 6e 88` in umoci's layers.
pub const GO_ZERO_TIME_MTIME: u32 = 0x886e_0900;

pub use crate::format::encoders::GzipHeader;

impl GzipHeader {
    /// The header the Go standard library's `compress/gzip` writes at default settings
    /// (no modification time: MTIME 0).
    pub fn go_stdlib_default() -> Self {
        GzipHeader::plain(0, 0, OS_UNKNOWN)
    }

    /// The header klauspost/pgzip and klauspost/compress/gzip write at default settings
    /// (they store Go's zero time, see [`GO_ZERO_TIME_MTIME`]).
    pub fn klauspost_default() -> Self {
        GzipHeader::plain(GO_ZERO_TIME_MTIME, 0, OS_UNKNOWN)
    }

    /// A header with only the fixed fields.
    pub fn plain(mtime: u32, xfl: u8, os: u8) -> Self {
        GzipHeader { mtime, xfl, os, text: false, name: None, comment: None, extra: None, header_crc: false }
    }

    /// The header's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut flags = 0;
        if self.text {
            flags |= FTEXT;
        }
        if self.header_crc {
            flags |= FHCRC;
        }
        if self.extra.is_some() {
            flags |= FEXTRA;
        }
        if self.name.is_some() {
            flags |= FNAME;
        }
        if self.comment.is_some() {
            flags |= FCOMMENT;
        }
        let mut out = vec![ID1, ID2, CM_DEFLATE, flags];
        out.extend_from_slice(&self.mtime.to_le_bytes());
        out.extend_from_slice(&[self.xfl, self.os]);
        if let Some(extra) = &self.extra {
            let len = u16::try_from(extra.len()).map_err(|_| Error::malformed("gzip header", "extra field longer than 65535 bytes"))?;
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(extra);
        }
        for s in [&self.name, &self.comment].into_iter().flatten() {
            out.extend(latin1_bytes(s)?);
            out.push(0);
        }
        if self.header_crc {
            let crc = crc32fast::hash(&out) as u16;
            out.extend_from_slice(&crc.to_le_bytes());
        }
        Ok(out)
    }

    /// Parses the header at the start of `blob`; returns it and its length in bytes.
    /// Headers we could not write back identically are rejected, never mis-described.
    pub fn parse(blob: &[u8]) -> Result<(Self, usize)> {
        let bad = |reason: &str| Error::malformed("gzip header", reason);
        let fixed = blob.get(..10).ok_or_else(|| bad("shorter than 10 bytes"))?;
        if fixed[0] != ID1 || fixed[1] != ID2 {
            return Err(bad("not gzip (bad magic)"));
        }
        if fixed[2] != CM_DEFLATE {
            return Err(Error::unsupported("gzip header", format!("compression method {}", fixed[2])));
        }
        let flags = fixed[3];
        if flags & FRESERVED != 0 {
            return Err(Error::unsupported("gzip header", format!("reserved flags {flags:#04x}")));
        }
        let mut header = GzipHeader::plain(u32::from_le_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]), fixed[8], fixed[9]);
        header.text = flags & FTEXT != 0;
        header.header_crc = flags & FHCRC != 0;
        let mut pos = 10;
        if flags & FEXTRA != 0 {
            let len = blob.get(pos..pos + 2).ok_or_else(|| bad("truncated extra length"))?;
            let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
            pos += 2;
            header.extra = Some(blob.get(pos..pos + len).ok_or_else(|| bad("truncated extra field"))?.to_vec());
            pos += len;
        }
        let zstring = |pos: &mut usize| -> Result<String> {
            let rest = &blob[(*pos).min(blob.len())..];
            let end = rest.iter().take(MAX_STRING).position(|&b| b == 0).ok_or_else(|| bad("unterminated string"))?;
            *pos += end + 1;
            Ok(rest[..end].iter().map(|&b| char::from(b)).collect())
        };
        if flags & FNAME != 0 {
            header.name = Some(zstring(&mut pos)?);
        }
        if flags & FCOMMENT != 0 {
            header.comment = Some(zstring(&mut pos)?);
        }
        if header.header_crc {
            let stored = blob.get(pos..pos + 2).ok_or_else(|| bad("truncated header CRC"))?;
            if u16::from_le_bytes([stored[0], stored[1]]) != crc32fast::hash(&blob[..pos]) as u16 {
                return Err(bad("header CRC mismatch"));
            }
            pos += 2;
        }
        Ok((header, pos))
    }
}

/// Bytes of a Latin-1 string (chars up to U+00FF, no NUL).
fn latin1_bytes(s: &str) -> Result<Vec<u8>> {
    s.chars()
        .map(|c| match u8::try_from(u32::from(c)) {
            Ok(b) if b != 0 => Ok(b),
            _ => Err(Error::malformed("gzip header", format!("{c:?} cannot be stored in a Latin-1 string"))),
        })
        .collect()
}

/// The gzip trailer: CRC-32 and length modulo 2^32 of the uncompressed data.
pub fn trailer(crc: u32, len: u64) -> [u8; 8] {
    let mut t = [0u8; 8];
    t[..4].copy_from_slice(&crc.to_le_bytes());
    t[4..].copy_from_slice(&(len as u32).to_le_bytes());
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_default_header_is_what_umoci_writes() {
        assert_eq!(GzipHeader::klauspost_default().to_bytes().unwrap(), [0x1f, 0x8b, 8, 0, 0, 0x09, 0x6e, 0x88, 0, 0xff]);
    }

    #[test]
    fn every_field_round_trips_through_bytes_and_json() {
        let h = GzipHeader {
            mtime: 1_700_000_000,
            xfl: 2,
            os: OS_UNIX,
            text: true,
            name: Some("caf\u{e9}.txt".into()),
            comment: Some("c".into()),
            extra: Some(vec![1, 2, 3]),
            header_crc: true,
        };
        let bytes = h.to_bytes().unwrap();
        assert_eq!(GzipHeader::parse(&bytes).unwrap(), (h.clone(), bytes.len()));
        let json = serde_json::to_string(&h).unwrap();
        assert!(json.contains(r#""extra":"010203""#), "{json}");
        assert_eq!(serde_json::from_str::<GzipHeader>(&json).unwrap(), h);
        let plain = serde_json::to_string(&GzipHeader::klauspost_default()).unwrap();
        assert_eq!(plain, r#"{"mtime":2288912640,"xfl":0,"os":255}"#);
    }

    #[test]
    fn hostile_headers_are_errors_not_panics() {
        let good = GzipHeader::klauspost_default().to_bytes().unwrap();
        for len in 0..good.len() {
            assert!(GzipHeader::parse(&good[..len]).is_err());
        }
        for flags in [FEXTRA, FNAME, FCOMMENT, FHCRC, 0x20] {
            let mut h = good.clone();
            h[3] = flags;
            assert!(GzipHeader::parse(&h).is_err(), "{flags:#x}");
        }
        assert!(GzipHeader { name: Some("\u{100}".into()), ..GzipHeader::klauspost_default() }.to_bytes().is_err());
    }
}
