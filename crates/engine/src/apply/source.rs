//! Source material for the applier: the uncompressed source layers a delta reads, as files
//! that are read with positioned reads (never mapped, so memory stays bounded).
//!
//! A delta whose patches read a source layer *expanded* (its listed gzip files and zip
//! entries seen inflated, see [`crate::layer::members`]) gets a view of it: the plain tar as
//! it is, plus one scratch file with the members' contents, read through a map of spans.
//! Only the members are written; the tar is never copied to make the view.

use std::fs::File;
use std::io::{self, BufWriter, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, IoContext, Result};
use crate::format::plan::Member;
use crate::image::{Image, Layout};
use crate::layer::members::inflate_member;
use crate::layer::Compression;

/// One uncompressed source layer on disk, expanded as the delta reads it.
#[derive(Debug)]
pub struct SourceLayer {
    /// The plain tar.
    file: File,
    /// The members' contents and where they lie; empty when nothing is expanded.
    expanded: Option<Expanded>,
    /// Length of the layer as the delta reads it (expanded).
    len: u64,
    index: u32,
}

/// The inflated members of an expanded layer.
#[derive(Debug)]
struct Expanded {
    /// Their contents, one after the other.
    contents: File,
    /// One per member, in order.
    spans: Vec<Span>,
}

/// Where one member lies: in the expanded layer, in the contents file, and where the
/// plain tar resumes after it.
#[derive(Clone, Copy, Debug)]
struct Span {
    /// Expanded offset of its contents.
    expanded: u64,
    /// Length of its contents.
    raw_len: u64,
    /// Offset of its contents in the contents file.
    contents: u64,
    /// Offset in the plain tar of the byte after it.
    tar_end: u64,
}

impl SourceLayer {
    /// Length of the (expanded) tar.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the tar is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads `buf.len()` bytes at `offset` of the (expanded) tar, refusing ranges outside it.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if offset.checked_add(buf.len() as u64).is_none_or(|end| end > self.len) {
            return Err(Error::malformed("patch", format!("range {offset}+{} is outside source layer {} ({} bytes)", buf.len(), self.index, self.len)));
        }
        let Some(expanded) = &self.expanded else {
            return self.file.read_exact_at(buf, offset).ctx(|| format!("reading source layer {}", self.index));
        };
        let (mut pos, mut done) = (offset, 0usize);
        while done < buf.len() {
            let (file, at, available) = expanded.locate(pos, self.len);
            let n = (buf.len() - done).min(usize::try_from(available).unwrap_or(usize::MAX));
            let file = if file == Part::Tar { &self.file } else { &expanded.contents };
            file.read_exact_at(&mut buf[done..done + n], at).ctx(|| format!("reading source layer {}", self.index))?;
            done += n;
            pos += n as u64;
        }
        Ok(())
    }
}

/// Which file a span of the expanded layer is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Tar,
    Contents,
}

impl Expanded {
    /// Where expanded offset `pos` (below `len`) is read: the file, the offset in it, and
    /// how many bytes from there are contiguous.
    fn locate(&self, pos: u64, len: u64) -> (Part, u64, u64) {
        // The first member whose contents end after `pos` (empty members never do).
        let i = self.spans.partition_point(|s| s.expanded + s.raw_len <= pos);
        match self.spans.get(i) {
            Some(s) if pos >= s.expanded => (Part::Contents, s.contents + (pos - s.expanded), s.expanded + s.raw_len - pos),
            next => {
                // Plain tar, after member i-1 (or from the start) and before member i (or the end).
                let (expanded_start, tar_start) = i.checked_sub(1).map_or((0, 0), |p| (self.spans[p].expanded + self.spans[p].raw_len, self.spans[p].tar_end));
                let end = next.map_or(len, |s| s.expanded);
                (Part::Tar, tar_start + (pos - expanded_start), end - pos)
            }
        }
    }
}

/// Makes source layer `index` available uncompressed: a plain-tar blob is used in place;
/// a compressed one is decompressed into `dir`. The source is not hashed: every rebuilt layer
/// is checked against its diff_id before the output is committed, so a damaged source fails
/// that check, and a layer reused as it is is verified on its own copy. With `members`, the
/// layer is made available expanded (each member inflated into a file in `dir`; see
/// [`crate::layer::members`]), as the delta's patches read it; the expanded length may not
/// exceed `limit`.
pub fn materialize(layout: &Layout, image: &Image, index: u32, dir: &Path, limit: u64, members: &[Member]) -> Result<SourceLayer> {
    let layer = image.layers.get(index as usize).ok_or_else(|| Error::malformed("patch", format!("source layer {index} does not exist")))?;
    let what = format!("source layer {index} ({})", layer.blob.digest);
    let blob = layout.open_blob(&layer.blob)?;
    let (file, tar_len) = if layer.compression == Compression::None {
        if layer.blob.size > limit {
            return Err(Error::TooLarge { what, limit });
        }
        (blob, layer.blob.size)
    } else {
        let path = dir.join(format!("source-{index}.tar"));
        let len = layout.decompress_layer(layer, &path, limit, &what)?;
        (File::open(&path).ctx(|| format!("opening {}", path.display()))?, len)
    };
    if members.is_empty() {
        return Ok(SourceLayer { file, expanded: None, len: tar_len, index });
    }
    let (spans, len) = spans(members, tar_len, limit, &what)?;
    let path = dir.join(format!("source-{index}.members"));
    let mut out = BufWriter::with_capacity(1 << 20, File::create(&path).ctx(|| format!("creating {}", path.display()))?);
    for m in members {
        let mut compressed = io::BufReader::with_capacity(64 << 10, At { file: &file, at: m.offset }).take(m.compressed_len);
        inflate_member(&mut compressed, m, &mut out, &format!("{what}: the {} at offset {}", m.wrapping.noun(), m.offset))?;
    }
    out.into_inner().map_err(|e| Error::io(format!("writing {}", path.display()), e.into_error()))?;
    let contents = File::open(&path).ctx(|| format!("opening {}", path.display()))?;
    Ok(SourceLayer { file, expanded: Some(Expanded { contents, spans }), len, index })
}

/// The spans of `members` (in order, not overlapping, inside a tar of `tar_len` bytes) and
/// the expanded length, at most `limit`.
fn spans(members: &[Member], tar_len: u64, limit: u64, what: &str) -> Result<(Vec<Span>, u64)> {
    let (mut spans, mut tar_at, mut expanded_at, mut contents) = (Vec::with_capacity(members.len()), 0u64, 0u64, 0u64);
    for m in members {
        let gap = m.offset.checked_sub(tar_at).ok_or_else(|| Error::malformed(what, "members overlap or are out of order"))?;
        let tar_end = m.offset.checked_add(m.compressed_len).filter(|end| *end <= tar_len).ok_or_else(|| {
            Error::malformed(what, format!("ends at byte {tar_len}, before the end of the {} at offset {} the delta lists", m.wrapping.noun(), m.offset))
        })?;
        let start = expanded_at + gap;
        spans.push(Span { expanded: start, raw_len: m.raw_len, contents, tar_end });
        expanded_at = start.checked_add(m.raw_len).filter(|e| *e <= limit).ok_or_else(|| too_large(what, limit))?;
        contents += m.raw_len;
        tar_at = tar_end;
    }
    let len = expanded_at.checked_add(tar_len - tar_at).filter(|e| *e <= limit).ok_or_else(|| too_large(what, limit))?;
    Ok((spans, len))
}

fn too_large(what: &str, limit: u64) -> Error {
    Error::TooLarge { what: format!("{what} (with its compressed files inflated)"), limit }
}

/// A `Read` of `file` from offset `at` on, by positioned reads.
struct At<'a> {
    file: &'a File,
    at: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::plan::Wrapping;

    /// A view with the spans of `members` over `tar`, whose members' contents are `contents`.
    fn view(dir: &Path, tar: &[u8], members: &[Member], contents: &[u8]) -> SourceLayer {
        let (spans, len) = spans(members, tar.len() as u64, u64::MAX, "l").unwrap();
        std::fs::write(dir.join("tar"), tar).unwrap();
        std::fs::write(dir.join("contents"), contents).unwrap();
        let open = |n: &str| File::open(dir.join(n)).unwrap();
        SourceLayer { file: open("tar"), expanded: Some(Expanded { contents: open("contents"), spans }), len, index: 0 }
    }

    #[test]
    fn every_range_of_the_view_reads_as_the_expanded_tar() {
        // tar: "aaaa" [member 1: 3 bytes -> "XYZXY"] "bb" [empty member: 2 bytes -> ""] [member: 1 -> "Q"] "cc"
        let tar = b"aaaa123bb45Qcc";
        let members = [
            Member { offset: 4, compressed_len: 3, raw_len: 5, wrapping: Wrapping::Gzip },
            Member { offset: 9, compressed_len: 2, raw_len: 0, wrapping: Wrapping::Gzip },
            Member { offset: 11, compressed_len: 1, raw_len: 1, wrapping: Wrapping::Deflate },
        ];
        let expanded = b"aaaaXYZXYbbQcc";
        let dir = tempfile::tempdir().unwrap();
        let v = view(dir.path(), tar, &members, b"XYZXYQ");
        assert_eq!(v.len(), expanded.len() as u64);
        for start in 0..expanded.len() {
            for end in start..=expanded.len() {
                let mut buf = vec![0; end - start];
                v.read_at(start as u64, &mut buf).unwrap();
                assert_eq!(buf, &expanded[start..end], "{start}..{end}");
            }
        }
        assert!(v.read_at(10, &mut [0; 5]).unwrap_err().to_string().contains("outside source layer 0"));
    }

    #[test]
    fn members_outside_the_tar_or_out_of_order_or_too_large_are_refused() {
        let m = |offset, compressed_len, raw_len| Member { offset, compressed_len, raw_len, wrapping: Wrapping::Gzip };
        assert!(spans(&[m(4, 3, 5), m(6, 1, 1)], 20, u64::MAX, "l").unwrap_err().to_string().contains("out of order"));
        assert!(spans(&[m(18, 3, 5)], 20, u64::MAX, "l").unwrap_err().to_string().contains("before the end of the gzip member at offset 18"));
        assert!(matches!(spans(&[m(0, 3, 50)], 20, 60, "l").unwrap_err(), Error::TooLarge { limit: 60, .. }));
        assert!(spans(&[m(0, 3, 43)], 20, 60, "l").is_ok());
    }
}
