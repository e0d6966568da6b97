//! Layers unpacked for the differ: uncompressed tars on disk, indexed, with the digest of
//! every file's contents.
//!
//! The differ's memory must not grow with the images: a builder diffs images of gigabytes on
//! shared machines. The tars stay on disk and are read in bounded pieces: positioned reads
//! into buffers the caller owns (page-cache pages count towards no process), and, for the
//! few readers that need a whole file as a slice (gzip files and zips looked into), a
//! mapping of that file's range alone, unmapped when its [`View`] is dropped. Nothing maps
//! a whole tar, so touched pages never accumulate in the process's RSS.
#![allow(unsafe_code)]

use std::fs::File;
use std::io::{BufReader, BufWriter, Read};
use std::ops::{Deref, Range};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapOptions};
use rayon::prelude::*;

use crate::digest::{Digest, Hasher};
use crate::error::{Error, IoContext, Result};
use crate::format::plan::Member;
use crate::image::{Layer, Layout};
use crate::layer::members::{expand, expanded_offset, Seen};
use crate::layer::TarIndex;

/// Bytes read at a time when a tar or a file in it is read whole (indexing, digesting,
/// expanding, fingerprinting): the working set of each such reader.
pub const READ_BLOCK_BYTES: usize = 1 << 20;

/// One uncompressed, indexed layer.
#[derive(Debug)]
pub struct Unpacked {
    /// The uncompressed tar, read with positioned reads.
    file: File,
    /// Where it is, for messages.
    path: PathBuf,
    /// Its entries.
    pub index: TarIndex,
    /// SHA-256 of each entry's contents, for entries with contents.
    pub content_digests: Vec<Option<Digest>>,
}

/// A range of an unpacked tar mapped into memory, unmapped when dropped: its pages leave the
/// process's RSS with it.
#[derive(Debug)]
pub struct View {
    map: Mmap,
}

impl Deref for View {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map
    }
}

impl Unpacked {
    /// Opens the tar at `path` and indexes it, reading it in [`READ_BLOCK_BYTES`] pieces.
    fn open(path: PathBuf, what: &str) -> Result<Unpacked> {
        let file = File::open(&path).ctx(|| format!("opening {}", path.display()))?;
        let len = file.metadata().ctx(|| format!("reading {}", path.display()))?.len();
        let index = TarIndex::parse_reader(BufReader::with_capacity(64 << 10, &file), len, what)?;
        let mut u = Unpacked { file, path, index, content_digests: Vec::new() };
        u.content_digests = u.digest_contents(|_| true)?;
        Ok(u)
    }

    /// The digests of the contents of the entries with contents that `wanted` (given the
    /// entry's index) selects, each file read in [`READ_BLOCK_BYTES`] pieces.
    fn digest_contents(&self, wanted: impl Fn(usize) -> bool + Sync) -> Result<Vec<Option<Digest>>> {
        self.index
            .entries
            .par_iter()
            .enumerate()
            .map_init(Vec::new, |buf, (i, e)| {
                if !(e.has_content() && wanted(i)) {
                    return Ok(None);
                }
                let mut hasher = Hasher::new();
                let mut at = e.data_start;
                while at < e.data_start + e.data_len {
                    let end = (at + READ_BLOCK_BYTES as u64).min(e.data_start + e.data_len);
                    buf.clear();
                    self.read_append(at..end, buf)?;
                    hasher.update(buf);
                    at = end;
                }
                Ok(Some(hasher.finish()))
            })
            .collect()
    }

    /// Appends bytes `range` of the tar to `out`.
    pub fn read_append(&self, range: Range<u64>, out: &mut Vec<u8>) -> Result<()> {
        let len = usize::try_from(range.end - range.start).map_err(|_| Error::malformed(self.path.display().to_string(), "range too large to read"))?;
        let from = out.len();
        out.resize(from + len, 0);
        self.file.read_exact_at(&mut out[from..], range.start).ctx(|| format!("reading {} at {}", self.path.display(), range.start))
    }

    /// Bytes `range` of the tar.
    pub fn read(&self, range: Range<u64>) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.read_append(range, &mut out)?;
        Ok(out)
    }

    /// Whether bytes `range` of this tar equal bytes `other_range` of `other`, compared a
    /// block at a time.
    pub fn same_bytes(&self, range: Range<u64>, other: &Unpacked, other_range: Range<u64>) -> Result<bool> {
        if range.end - range.start != other_range.end - other_range.start {
            return Ok(false);
        }
        const BLOCK: u64 = 64 << 10;
        let (mut mine, mut theirs) = (Vec::new(), Vec::new());
        let mut done = 0;
        while done < range.end - range.start {
            let n = (range.end - range.start - done).min(BLOCK);
            mine.clear();
            theirs.clear();
            self.read_append(range.start + done..range.start + done + n, &mut mine)?;
            other.read_append(other_range.start + done..other_range.start + done + n, &mut theirs)?;
            if mine != theirs {
                return Ok(false);
            }
            done += n;
        }
        Ok(true)
    }

    /// A reader of the whole tar from its start, buffered by [`READ_BLOCK_BYTES`].
    pub fn reader(&self) -> impl Read + '_ {
        BufReader::with_capacity(READ_BLOCK_BYTES, PositionedReader { file: &self.file, at: 0 })
    }

    /// Bytes `range` of the tar as a slice, mapped for as long as the [`View`] lives. For
    /// readers that need a file whole and may touch only part of it (a zip's directory and
    /// some entries); everything else reads with [`Unpacked::read_append`].
    pub fn view(&self, range: Range<u64>) -> Result<View> {
        let len = usize::try_from(range.end - range.start).map_err(|_| Error::malformed(self.path.display().to_string(), "range too large to map"))?;
        if range.end > self.index.len {
            return Err(Error::malformed(self.path.display().to_string(), format!("range {range:?} past the end ({})", self.index.len)));
        }
        // SAFETY: the file is a private temporary file that we wrote before indexing it and
        // that nothing writes or truncates while an `Unpacked` holds it, so the mapped bytes
        // cannot change under the slice; the range lies within the file (checked above).
        let map = unsafe { MmapOptions::new().offset(range.start).len(len).map(&self.file) }.ctx(|| format!("mapping {}", self.path.display()))?;
        Ok(View { map })
    }

    /// The expanded view of this layer (see [`crate::layer::members`]): written to
    /// `dir/name`, its index moved to expanded offsets and each member entry's contents
    /// digested anew. Each member lies within one entry's contents: a gzip file fills it, a
    /// zip entry's deflate stream is a part of it.
    pub fn expanded<M: Seen>(&self, seen: &[M], dir: &Path, name: &str, limit: u64, what: &str) -> Result<Unpacked> {
        let path = dir.join(name);
        let file = File::create(&path).ctx(|| format!("creating {}", path.display()))?;
        let mut out = BufWriter::with_capacity(READ_BLOCK_BYTES, file);
        let len = expand(self.reader(), seen, &mut out, limit, what)?;
        let members: Vec<Member> = seen.iter().map(|m| *m.member()).collect();
        let members = &members[..];
        out.into_inner().map_err(|e| Error::io(format!("writing {}", path.display()), e.into_error()))?;
        let file = File::open(&path).ctx(|| format!("opening {}", path.display()))?;
        let mut index = self.index.clone();
        index.len = len;
        for e in &mut index.entries {
            let end = expanded_offset(members, e.data_start + e.data_len);
            e.meta_start = expanded_offset(members, e.meta_start);
            e.data_start = expanded_offset(members, e.data_start);
            e.data_len = end - e.data_start;
        }
        let mut u = Unpacked { file, path, index, content_digests: Vec::new() };
        u.content_digests = u.digest_contents(|i| self.content_digests[i].is_some())?;
        Ok(u)
    }
}

/// Reads a file from `at` on with positioned reads, so that readers of one file share no
/// cursor.
struct PositionedReader<'a> {
    file: &'a File,
    at: u64,
}

impl Read for PositionedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// Decompresses `layer` from `layout` into `dir/name`, verifying the blob digest and the
/// diff_id, refusing to write more than `limit` bytes; then indexes it.
pub fn unpack(layout: &Layout, layer: &Layer, dir: &Path, name: &str, limit: u64, what: &str) -> Result<Unpacked> {
    let path = dir.join(name);
    layout.unpack_layer(layer, &path, limit, what)?;
    Unpacked::open(path, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::layer::tar_index::tests::archive as tar;

    #[test]
    fn reads_from_disk_what_an_in_memory_index_sees() {
        let big: Vec<u8> = (0..3 * READ_BLOCK_BYTES + 123).map(|i| (i * 7 % 251) as u8).collect();
        let bytes = tar(&[("a.txt", b"hello"), ("empty", b""), ("big.bin", &big), ("b.txt", b"hello")]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layer.tar");
        std::fs::write(&path, &bytes).unwrap();
        let u = Unpacked::open(path, "test layer").unwrap();
        let parsed = TarIndex::parse(&bytes, "test layer").unwrap();
        assert_eq!((&u.index.entries, u.index.len), (&parsed.entries, parsed.len));
        for (e, d) in u.index.entries.iter().zip(&u.content_digests) {
            let data = &bytes[e.data_start as usize..(e.data_start + e.data_len) as usize];
            assert_eq!(*d, e.has_content().then(|| Digest::of(data)), "{}", e.path);
            assert_eq!(&u.view(e.content_range()).unwrap()[..], data);
            assert_eq!(u.read(e.content_range()).unwrap(), data);
        }
        let mut all = Vec::new();
        u.reader().read_to_end(&mut all).unwrap();
        assert_eq!(all, bytes);
        let (a, b) = (u.index.entries[0].content_range(), u.index.entries[3].content_range());
        assert!(u.same_bytes(a.clone(), &u, b).unwrap());
        assert!(!u.same_bytes(a.clone(), &u, a.start + 1..a.end + 1).unwrap());
        assert!(!u.same_bytes(a.clone(), &u, a.start..a.end + 1).unwrap(), "lengths differ");
        assert!(u.view(0..u.index.len + 1).is_err(), "a view past the end is refused");
    }
}
