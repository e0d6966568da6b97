//! gzip files and zip entries inside a layer tar, seen uncompressed.
//!
//! A changed `changelog.Debian.gz` differs from its old version in every compressed byte
//! after the first change, though its text only gained a paragraph; a jar whose classes were
//! rebuilt differs in every deflated class. The differ therefore patches an *expanded* tar,
//! in which each listed [`Member`] (a tar entry's data that is one gzip member, or the raw
//! deflate stream of one zip entry) is replaced by its contents: [`expand`] writes that view
//! of a layer. A zip's own headers and central directory stay as they are.
//! The applier rebuilds the expanded target tar and [`Repacker`] turns it back into the
//! real one, compressing each member with the encoder that reproduces its original bytes.
//!
//! A member may also be a span of AArch64 code ([`crate::layer::aarch64_code`]), seen with
//! absolute call targets and page addresses, or of x86-64 code ([`crate::layer::x86_64_code`],
//! rebuilt layers only), seen with its references in the old file's addresses: as many bytes
//! seen as stored, converted back by the [`Repacker`] as it writes.
//!
//! Offsets in [`Member`] are positions in the real tar; positions in the expanded tar
//! follow from them (see [`expanded_offset`]). Tar headers are never rewritten: a header
//! in the expanded view still states the compressed size, which only the real tar obeys.

use std::io::{self, BufRead, BufReader, Read, Write};

use flate2::bufread::{DeflateDecoder, GzDecoder};

use crate::error::{Error, IoContext, Result};
use crate::format::address_map::AddressMap;
use crate::format::plan::{Member, RepackedMember, Wrapping};
use crate::layer::aarch64_code::{AbsoluteReader, RelativeWriter};
use crate::layer::exact::MemberEncoder;
use crate::layer::x86_64_code::{self, Converter};

/// A member as it is read: its place and wrapping, and for x86-64 code (a member of a
/// rebuilt layer) its address map.
pub trait Seen {
    /// Where it is and what frames it.
    fn member(&self) -> &Member;

    /// The address map of x86-64 code; `None` for every other member.
    fn address_map(&self) -> Option<&AddressMap> {
        None
    }
}

impl Seen for Member {
    fn member(&self) -> &Member {
        self
    }
}

impl Seen for RepackedMember {
    fn member(&self) -> &Member {
        &self.member
    }

    fn address_map(&self) -> Option<&AddressMap> {
        self.address_map.as_ref()
    }
}

/// Where `offset` of the real tar lies in the expanded tar, given the members before it.
pub fn expanded_offset(members: &[Member], offset: u64) -> u64 {
    let before = members.partition_point(|m| m.offset + m.compressed_len <= offset);
    members[..before].iter().fold(offset, |at, m| at - m.compressed_len + m.raw_len)
}

/// Copies the tar read from `input` to `output`, each of `members` (in order, not
/// overlapping) inflated: each must hold exactly one gzip member or deflate stream, as its
/// wrapping says, whose contents are `raw_len` bytes. Returns the expanded length, which may not exceed `limit`.
pub fn expand<M: Seen>(mut input: impl Read, members: &[M], output: impl Write, limit: u64, what: &str) -> Result<u64> {
    let mut out = Limited { inner: output, left: limit, limit, what: what.to_string() };
    let mut at = 0u64;
    for seen in members {
        let m = seen.member();
        let gap = m.offset.checked_sub(at).ok_or_else(|| Error::malformed(what, "members overlap or are out of order"))?;
        let n = io::copy(&mut (&mut input).take(gap), &mut out).map_err(|e| Error::io(format!("expanding {what}"), e))?;
        if n != gap {
            return Err(Error::malformed(what, format!("ends at byte {}, before the {} at offset {} the delta lists", at + n, m.wrapping.noun(), m.offset)));
        }
        inflate_member(&mut input, seen, &mut out, &format!("{what}: the {} at offset {}", m.wrapping.noun(), m.offset))?;
        at = m.offset + m.compressed_len;
    }
    io::copy(&mut input, &mut out).map_err(|e| Error::io(format!("expanding {what}"), e))?;
    Ok(limit - out.left)
}

/// The fewest bytes of a gzip member (header and trailer): [`looks_like_gzip`] reads no
/// further.
pub const MIN_GZIP_BYTES: usize = 18;

/// The fewest bytes of a zip archive (its end of central directory record):
/// [`looks_like_zip`] reads no further.
pub const MIN_ZIP_BYTES: usize = 22;

/// Whether `data` starts like a gzip member (magic and deflate method).
pub fn looks_like_gzip(data: &[u8]) -> bool {
    data.len() >= MIN_GZIP_BYTES && data.starts_with(&[0x1f, 0x8b, 0x08])
}

/// Whether `data` starts like a zip archive (a local file header).
pub fn looks_like_zip(data: &[u8]) -> bool {
    data.len() >= MIN_ZIP_BYTES && data.starts_with(b"PK\x03\x04")
}

/// The contents of `data` if it is exactly one gzip member or deflate stream, as `wrapping`
/// says (what [`expand`] accepts), of at most `max_raw` bytes; `None` otherwise (and for
/// x86-64 code, which needs its map).
pub fn inflate(data: &[u8], wrapping: Wrapping, max_raw: u64) -> Option<Vec<u8>> {
    let mut raw = Vec::new();
    Decoder::new(wrapping, data)?.take(max_raw.saturating_add(1)).read_to_end(&mut raw).ok()?;
    if raw.len() as u64 > max_raw {
        return None;
    }
    let m = Member { offset: 0, compressed_len: data.len() as u64, raw_len: raw.len() as u64, wrapping };
    // The applier's check, so that what the differ accepts the applier accepts.
    inflate_member(&mut &data[..], &m, &mut io::sink(), wrapping.noun()).ok()?;
    Some(raw)
}

/// A gzip or bare deflate decoder (or the AArch64 code view) over a buffered reader, giving
/// the reader back after.
enum Decoder<R: BufRead> {
    Gzip(GzDecoder<R>),
    Deflate(DeflateDecoder<R>),
    Aarch64Code(AbsoluteReader<R>),
}

impl<R: BufRead> Decoder<R> {
    /// The decoder of `wrapping`; none for x86-64 code, seen through its map by
    /// [`inflate_member`].
    fn new(wrapping: Wrapping, input: R) -> Option<Self> {
        match wrapping {
            Wrapping::Gzip => Some(Decoder::Gzip(GzDecoder::new(input))),
            Wrapping::Deflate => Some(Decoder::Deflate(DeflateDecoder::new(input))),
            Wrapping::Aarch64Code => Some(Decoder::Aarch64Code(AbsoluteReader::new(input))),
            Wrapping::X8664Code => None,
        }
    }

    fn into_inner(self) -> R {
        match self {
            Decoder::Gzip(d) => d.into_inner(),
            Decoder::Deflate(d) => d.into_inner(),
            Decoder::Aarch64Code(d) => d.into_inner(),
        }
    }
}

impl<R: BufRead> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Gzip(d) => d.read(buf),
            Decoder::Deflate(d) => d.read(buf),
            Decoder::Aarch64Code(d) => d.read(buf),
        }
    }
}

/// Inflates the `m.compressed_len` bytes of `input` as one gzip member or deflate stream
/// into `output`, checking that they hold exactly that and that it holds `m.raw_len` bytes.
/// A span of code is converted to its seen form.
pub fn inflate_member<M: Seen + ?Sized>(input: &mut dyn Read, seen: &M, output: &mut dyn Write, what: &str) -> Result<()> {
    let m = seen.member();
    if m.wrapping == Wrapping::X8664Code {
        let map = seen.address_map().ok_or_else(|| Error::malformed(what, "x86-64 code without an address map"))?;
        return see_x86_64_code(input, m.compressed_len, map, output, what);
    }
    let mut decoder =
        Decoder::new(m.wrapping, BufReader::with_capacity(64 << 10, input.take(m.compressed_len))).ok_or_else(|| Error::malformed(what, "has no decoder"))?;
    // Errors of `output` (the size limit) keep their kind; the others are the member's.
    let n = io::copy(&mut (&mut decoder).take(m.raw_len + 1), output).map_err(|e| match e.downcast::<Error>() {
        Ok(inner) => inner,
        Err(e) => Error::malformed(what, format!("does not inflate: {e}")),
    })?;
    if n != m.raw_len {
        return Err(Error::malformed(what, format!("inflates to {}{n} bytes, the delta says {}", if n > m.raw_len { "more than " } else { "" }, m.raw_len)));
    }
    // The member must end where the delta says: nothing left, buffered or not.
    let mut probe = [0u8; 1];
    if decoder.read(&mut probe).map_err(|e| Error::malformed(what, format!("does not inflate: {e}")))? != 0 {
        return Err(Error::malformed(what, format!("inflates to more than {} bytes", m.raw_len)));
    }
    let mut rest = decoder.into_inner();
    let buffered = rest.fill_buf().ctx(|| format!("reading {what}"))?.len();
    let unread = rest.into_inner().limit();
    if buffered != 0 || unread != 0 {
        return Err(Error::malformed(what, format!("is followed by {} bytes the member does not use", buffered as u64 + unread)));
    }
    Ok(())
}

/// Writes the `len` bytes of x86-64 code read from `input` to `output` as the differ sees
/// them.
fn see_x86_64_code(input: &mut dyn Read, len: u64, map: &AddressMap, mut output: &mut dyn Write, what: &str) -> Result<()> {
    let mut converter = Converter::new(map, len, x86_64_code::Direction::ToOld)?;
    let mut buf = vec![0u8; 64 << 10];
    let mut left = len;
    // Errors of `output` (the size limit) keep their kind.
    let write_error = |e: io::Error| e.downcast::<Error>().unwrap_or_else(|e| Error::io(format!("writing {what}"), e));
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = input.read(&mut buf[..want]).ctx(|| format!("reading {what}"))?;
        if n == 0 {
            return Err(Error::malformed(what, format!("ends {left} bytes before the end of the span")));
        }
        converter.write(&buf[..n], &mut output).map_err(write_error)?;
        left -= n as u64;
    }
    converter.finish(&mut output).map_err(write_error)
}

/// A `Write` that fails with [`Error::TooLarge`] beyond `left` bytes.
struct Limited<W> {
    inner: W,
    left: u64,
    limit: u64,
    what: String,
}

impl<W: Write> Write for Limited<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() as u64 > self.left {
            return Err(Error::TooLarge { what: format!("{} (with its compressed files inflated)", self.what), limit: self.limit }.into_io());
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.write(buf)?;
        self.left -= n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Turns an expanded tar, written into it, back into the real tar, written to `inner`:
/// each member's contents are compressed with its descriptor, and must come out exactly
/// `compressed_len` bytes long (the layer's diff_id, checked after, covers the bytes).
pub struct Repacker<'a, W: Write> {
    inner: W,
    members: std::slice::Iter<'a, RepackedMember>,
    /// Expanded position of the next byte written.
    at: u64,
    /// Where the next member starts in the expanded tar, and the member.
    next: Option<(u64, &'a RepackedMember)>,
    /// The member being compressed: its encoder, contents still to come, compressed bytes
    /// written so far.
    current: Option<Current<'a>>,
    /// Added to a real offset to give the expanded one, for the members passed.
    shift: i128,
}

struct Current<'a> {
    member: &'a RepackedMember,
    encoder: Packer,
    left: u64,
    written: u64,
}

/// What turns a member's contents back into its bytes.
enum Packer {
    Deflate(MemberEncoder),
    Aarch64Code(RelativeWriter),
    X8664Code(Box<Converter>),
}

impl Packer {
    fn write(&mut self, data: &[u8], output: &mut impl Write) -> Result<()> {
        match self {
            Packer::Deflate(e) => e.write(data, output),
            Packer::Aarch64Code(w) => w.write(data, output).ctx(|| "writing AArch64 code".into()),
            Packer::X8664Code(c) => c.write(data, output).ctx(|| "writing x86-64 code".into()),
        }
    }

    fn finish(self, output: &mut impl Write) -> Result<()> {
        match self {
            Packer::Deflate(e) => e.finish(output).map(drop),
            Packer::Aarch64Code(w) => w.finish(output).ctx(|| "writing AArch64 code".into()),
            Packer::X8664Code(c) => c.finish(output).ctx(|| "writing x86-64 code".into()),
        }
    }
}

/// Passes what the encoder produces for one member on to `inner`, counting it.
struct Counting<'w, W> {
    inner: &'w mut W,
    total: &'w mut u64,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        *self.total += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> std::fmt::Debug for Repacker<'_, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repacker").field("at", &self.at).finish_non_exhaustive()
    }
}

impl<'a, W: Write> Repacker<'a, W> {
    /// Repacks `members` (validated: in order, not overlapping) into `inner`.
    pub fn new(inner: W, members: &'a [RepackedMember]) -> Self {
        let mut r = Repacker { inner, members: members.iter(), at: 0, next: None, current: None, shift: 0 };
        r.advance();
        r
    }

    fn advance(&mut self) {
        self.next = self.members.next().map(|m| (u64::try_from(i128::from(m.member.offset) + self.shift).unwrap_or(u64::MAX), m));
    }

    /// Starts every member that begins at the current position (a member with no contents
    /// is finished at once).
    fn start_members(&mut self) -> Result<()> {
        while self.current.is_none() {
            let Some((start, member)) = self.next else { return Ok(()) };
            if start != self.at {
                return Ok(());
            }
            self.shift += i128::from(member.member.raw_len) - i128::from(member.member.compressed_len);
            self.advance();
            let encoder = match (member.member.wrapping, &member.descriptor, &member.encoder) {
                (Wrapping::Aarch64Code, None, None) => Packer::Aarch64Code(RelativeWriter::default()),
                (Wrapping::X8664Code, None, None) => {
                    let map = member
                        .address_map
                        .as_ref()
                        .ok_or_else(|| Error::malformed("delta.json", format!("the x86-64 code at offset {} has no address map", member.member.offset)))?;
                    Packer::X8664Code(Box::new(Converter::new(map, member.member.raw_len, x86_64_code::Direction::ToNew)?))
                }
                (Wrapping::Gzip | Wrapping::Deflate, Some(descriptor), None) => Packer::Deflate(descriptor.member_encoder()?),
                (Wrapping::Gzip | Wrapping::Deflate, None, Some(encoder)) => Packer::Deflate(encoder.deflate_encoder()?),
                _ => return Err(Error::malformed("delta.json", format!("the member at offset {} names no single encoder", member.member.offset))),
            };
            self.current = Some(Current { member, encoder, left: member.member.raw_len, written: 0 });
            if member.member.raw_len == 0 {
                self.end_member()?;
            }
        }
        Ok(())
    }

    fn end_member(&mut self) -> Result<()> {
        let Current { member, encoder, mut written, .. } = self.current.take().expect("a member is open");
        encoder.finish(&mut Counting { inner: &mut self.inner, total: &mut written })?;
        if written != member.member.compressed_len {
            return Err(Error::malformed(
                "rebuilt layer",
                format!(
                    "the {} at offset {} compressed to {written} bytes, not {}",
                    member.member.wrapping.noun(),
                    member.member.offset,
                    member.member.compressed_len
                ),
            ));
        }
        Ok(())
    }

    fn write_some(&mut self, data: &[u8]) -> Result<usize> {
        self.start_members()?;
        if let Some(mut current) = self.current.take() {
            let n = (current.left.min(data.len() as u64)) as usize;
            current.encoder.write(&data[..n], &mut Counting { inner: &mut self.inner, total: &mut current.written })?;
            current.left -= n as u64;
            self.at += n as u64;
            let done = current.left == 0;
            self.current = Some(current);
            if done {
                self.end_member()?;
            }
            return Ok(n);
        }
        let n = match self.next {
            Some((start, _)) => (start - self.at).min(data.len() as u64) as usize,
            None => data.len(),
        };
        self.inner.write_all(&data[..n]).ctx(|| "writing rebuilt layer".into())?;
        self.at += n as u64;
        Ok(n)
    }

    /// Checks that every member was written whole; returns the inner writer.
    pub fn finish(mut self) -> Result<W> {
        self.start_members()?;
        if let Some(c) = &self.current {
            return Err(Error::malformed("rebuilt layer", format!("ends inside the {} at offset {}", c.member.member.wrapping.noun(), c.member.member.offset)));
        }
        if let Some((_, m)) = self.next {
            return Err(Error::malformed("rebuilt layer", format!("ends before the {} at offset {}", m.member.wrapping.noun(), m.member.offset)));
        }
        Ok(self.inner)
    }
}

impl<W: Write> Write for Repacker<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        self.write_some(data).map_err(Error::into_io)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::exact::{Descriptor, Encoder, GzipHeader};

    fn zlib9() -> Descriptor {
        Descriptor { encoder: Encoder::GnuGzip { level: 9 }, header: GzipHeader::plain(0, 2, 3) }
    }

    fn text(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| b"abcdefgh ijk\n"[(i * 7 + usize::from(seed) * (i / 100)) % 13]).collect()
    }

    /// A fake tar: filler, then members with filler between them: gzip files (one empty) and
    /// bare deflate streams as in a zip (one empty).
    fn sample() -> (Vec<u8>, Vec<u8>, Vec<RepackedMember>) {
        let contents = [(text(70_000, 1), true), (Vec::new(), true), (text(300, 2), true), (text(50_000, 3), false), (Vec::new(), false)];
        let (mut real, mut expanded, mut members) = (Vec::new(), Vec::new(), Vec::new());
        for (i, (c, gzip)) in contents.iter().enumerate() {
            let filler = vec![i as u8; 512 * (i + 1)];
            real.extend_from_slice(&filler);
            expanded.extend_from_slice(&filler);
            let (packed, member) = if *gzip {
                let gz = zlib9().encode_to_vec(c).unwrap();
                let m = RepackedMember::gzip(Member::gzip(real.len() as u64, gz.len() as u64, c.len() as u64), zlib9());
                (gz, m)
            } else {
                let zlib6 = Encoder::Zlib { level: 6 };
                let raw = zlib6.deflate_to_vec(c).unwrap();
                let m = RepackedMember::deflate(Member::deflate(real.len() as u64, raw.len() as u64, c.len() as u64), zlib6);
                (raw, m)
            };
            members.push(member);
            real.extend_from_slice(&packed);
            expanded.extend_from_slice(c);
        }
        real.extend_from_slice(&[9u8; 1024]);
        expanded.extend_from_slice(&[9u8; 1024]);
        (real, expanded, members)
    }

    fn plain(members: &[RepackedMember]) -> Vec<Member> {
        members.iter().map(|m| m.member).collect()
    }

    #[test]
    fn expanding_then_repacking_gives_the_tar_back_whatever_the_write_sizes() {
        let (real, expanded, members) = sample();
        let mut out = Vec::new();
        let len = expand(&real[..], &plain(&members), &mut out, u64::MAX, "layer").unwrap();
        assert_eq!(out, expanded);
        assert_eq!(len, expanded.len() as u64);
        for step in [1, 7, 512, 4096, 1 << 20] {
            let mut r = Repacker::new(Vec::new(), &members);
            for piece in expanded.chunks(step) {
                r.write_all(piece).unwrap();
            }
            assert_eq!(r.finish().unwrap(), real, "writes of {step} bytes");
        }
    }

    #[test]
    fn expanded_offsets_follow_the_members_before() {
        let (real, expanded, members) = sample();
        let m = plain(&members);
        assert_eq!(expanded_offset(&m, 0), 0);
        assert_eq!(expanded_offset(&m, m[0].offset), m[0].offset);
        assert_eq!(expanded_offset(&m, real.len() as u64), expanded.len() as u64);
        let after_first = m[0].offset + m[0].compressed_len;
        assert_eq!(expanded_offset(&m, after_first), m[0].offset + m[0].raw_len);
    }

    #[test]
    fn lying_members_are_refused_with_the_offset() {
        let (real, _, members) = sample();
        let mut wrong_len = plain(&members);
        wrong_len[0].raw_len += 1;
        let e = expand(&real[..], &wrong_len, io::sink(), u64::MAX, "source layer 0").unwrap_err().to_string();
        assert!(e.contains("offset") && e.contains("inflates to"), "{e}");
        let mut short = plain(&members);
        short[2].compressed_len -= 1;
        let e = expand(&real[..], &short, io::sink(), u64::MAX, "source layer 0").unwrap_err().to_string();
        assert!(e.contains("does not inflate") || e.contains("inflates to"), "{e}");
        let mut long = plain(&members);
        long[0].compressed_len += 1;
        let e = expand(&real[..], &long, io::sink(), u64::MAX, "source layer 0").unwrap_err().to_string();
        assert!(e.contains("followed by 1 bytes"), "{e}");
        let mut not_gzip = plain(&members);
        not_gzip[0].offset -= 512;
        assert!(expand(&real[..], &not_gzip, io::sink(), u64::MAX, "l").is_err());
        let mut beyond = plain(&members);
        beyond[2].offset = real.len() as u64 + 10;
        let e = expand(&real[..], &beyond, io::sink(), u64::MAX, "l").unwrap_err().to_string();
        assert!(e.contains("ends at byte"), "{e}");
    }

    #[test]
    fn deflate_streams_are_checked_as_strictly_as_gzip_members() {
        let (real, _, members) = sample();
        let m = plain(&members);
        let mut as_gzip = m.clone();
        as_gzip[3].wrapping = Wrapping::Gzip;
        let e = expand(&real[..], &as_gzip, io::sink(), u64::MAX, "l").unwrap_err().to_string();
        assert!(e.contains("gzip member at offset") && e.contains("does not inflate"), "{e}");
        let mut as_deflate = m.clone();
        as_deflate[0].wrapping = Wrapping::Deflate;
        let e = expand(&real[..], &as_deflate, io::sink(), u64::MAX, "l").unwrap_err().to_string();
        assert!(e.contains("deflate stream at offset"), "{e}");
        let mut long = m.clone();
        long[3].compressed_len += 1;
        let e = expand(&real[..], &long, io::sink(), u64::MAX, "l").unwrap_err().to_string();
        assert!(e.contains("followed by 1 bytes"), "{e}");
        let mut short_raw = m.clone();
        short_raw[3].raw_len -= 1;
        let e = expand(&real[..], &short_raw, io::sink(), u64::MAX, "l").unwrap_err().to_string();
        assert!(e.contains("inflates to more than"), "{e}");
        // What the differ's inflate accepts is exactly what expand accepts.
        let d = m[3];
        let data = &real[d.offset as usize..(d.offset + d.compressed_len) as usize];
        assert_eq!(inflate(data, Wrapping::Deflate, u64::MAX).map(|r| r.len() as u64), Some(d.raw_len));
        assert_eq!(inflate(data, Wrapping::Gzip, u64::MAX), None);
        assert_eq!(inflate(&real[..d.offset as usize + d.compressed_len as usize + 1][d.offset as usize..], Wrapping::Deflate, u64::MAX), None);
        assert_eq!(inflate(data, Wrapping::Deflate, d.raw_len - 1), None);
    }

    #[test]
    fn a_member_naming_the_wrong_kind_of_encoder_is_refused() {
        let (_, expanded, mut members) = sample();
        members[3].descriptor = Some(zlib9());
        let mut r = Repacker::new(Vec::new(), &members);
        let e = r.write_all(&expanded).map_err(|e| Error::io("w", e)).unwrap_err().to_string();
        assert!(e.contains("names no single encoder"), "{e}");
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let zeros = vec![0u8; 4 << 20];
        let gz = zlib9().encode_to_vec(&zeros).unwrap();
        let m = [Member::gzip(0, gz.len() as u64, zeros.len() as u64)];
        let e = expand(&gz[..], &m, io::sink(), 1 << 20, "l").unwrap_err();
        assert!(matches!(e, Error::TooLarge { limit: 1048576, .. }), "{e}");
    }

    #[test]
    fn a_stream_that_ends_inside_or_before_a_member_is_refused() {
        let (_, expanded, members) = sample();
        let mut r = Repacker::new(Vec::new(), &members);
        r.write_all(&expanded[..members[0].member.offset as usize + 10]).unwrap();
        assert!(r.finish().unwrap_err().to_string().contains("ends inside"));
        let mut r = Repacker::new(Vec::new(), &members);
        r.write_all(&expanded[..100]).unwrap();
        assert!(r.finish().unwrap_err().to_string().contains("ends before"));
    }

    #[test]
    fn contents_that_compress_to_another_length_are_refused() {
        let (_, mut expanded, members) = sample();
        let at = members[0].member.offset as usize;
        // Incompressible bytes in place of text: another compressed length.
        for (i, b) in expanded[at..at + 60_000].iter_mut().enumerate() {
            *b = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3];
        }
        let mut r = Repacker::new(Vec::new(), &members);
        let e = r.write_all(&expanded).map_err(|e| Error::io("w", e)).unwrap_err().to_string();
        assert!(e.contains("compressed to"), "{e}");
    }
}
