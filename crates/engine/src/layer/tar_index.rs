//! An index of an uncompressed layer tar: where each entry's header and data lie.
//!
//! The differ never rewrites tar headers; it only needs to know which byte ranges hold
//! regular-file contents (everything else: headers, PAX records, long names, padding and the
//! end-of-archive blocks is "metadata" carried byte for byte) and what each entry is called,
//! to pair it with its counterpart in the source image.

use std::io::{Cursor, Read, Seek};
use std::path::{Component, Path};

use crate::error::{Error, Result};

/// What kind of entry a tar header describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file (including contiguous files).
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A hard link.
    Hardlink,
    /// Anything else (devices, FIFOs, ...).
    Other,
}

/// One entry of a layer tar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TarEntry {
    /// The normalized path: relative, `/`-separated, no `.` components.
    pub path: String,
    /// The entry kind.
    pub kind: EntryKind,
    /// Where the metadata preceding this entry's data starts: the end of the previous file
    /// contents in the archive (0 for the first).
    pub meta_start: u64,
    /// Where the entry's data starts.
    pub data_start: u64,
    /// Length of the entry's data as stored.
    pub data_len: u64,
}

impl TarEntry {
    /// Whether this entry carries file contents that the differ encodes.
    pub fn has_content(&self) -> bool {
        self.kind == EntryKind::File && self.data_len > 0
    }

    /// The byte range of the file contents.
    pub fn content_range(&self) -> std::ops::Range<u64> {
        self.data_start..self.data_start + self.data_len
    }

    /// The byte range of the metadata (headers, padding) just before the contents.
    pub fn meta_range(&self) -> std::ops::Range<u64> {
        self.meta_start..self.data_start
    }
}

/// The entries of one uncompressed tar archive.
#[derive(Clone, Debug, Default)]
pub struct TarIndex {
    /// Entries in archive order.
    pub entries: Vec<TarEntry>,
    /// Total archive length, including end-of-archive blocks and anything after them.
    pub len: u64,
}

impl TarIndex {
    /// Parses an archive held in memory. `what` names it in errors.
    /// Paths that are absolute or contain `..` are refused, as are entries whose data would
    /// run past the end of the archive.
    pub fn parse(bytes: &[u8], what: &str) -> Result<Self> {
        Self::parse_reader(Cursor::new(bytes), bytes.len() as u64, what)
    }

    /// [`TarIndex::parse`] for an archive of `len` bytes read from `reader` (a file on
    /// disk), which is read header by header and seeked past file contents.
    pub fn parse_reader(reader: impl Read + Seek, len: u64, what: &str) -> Result<Self> {
        let malformed = |e: std::io::Error| Error::malformed(what, format!("tar: {e}"));
        let mut archive = tar::Archive::new(reader);
        let mut entries = Vec::new();
        let mut meta_start = 0u64;
        for entry in archive.entries_with_seek().map_err(malformed)? {
            let entry = entry.map_err(malformed)?;
            let path = normalize_path(&entry.path().map_err(malformed)?, what)?;
            if let Some(target) = entry.link_name().map_err(malformed)? {
                if entry.header().entry_type().is_hard_link() {
                    normalize_path(&target, what)?;
                }
            }
            let ty = entry.header().entry_type();
            let kind = if ty.is_file() || ty.is_contiguous() {
                EntryKind::File
            } else if ty.is_dir() {
                EntryKind::Dir
            } else if ty.is_symlink() {
                EntryKind::Symlink
            } else if ty.is_hard_link() {
                EntryKind::Hardlink
            } else {
                EntryKind::Other
            };
            let data_start = entry.raw_file_position();
            let data_len = entry.size();
            if data_start.checked_add(data_len).is_none_or(|end| end > len) {
                return Err(Error::malformed(what, format!("entry {path:?} claims {data_len} bytes past the end of the archive")));
            }
            let e = TarEntry { path, kind, meta_start, data_start, data_len };
            if e.has_content() {
                meta_start = data_start + data_len;
            }
            entries.push(e);
        }
        Ok(TarIndex { entries, len })
    }
}

/// Normalizes a tar path to a relative `/`-separated form, refusing anything that could
/// escape the root.
pub fn normalize_path(path: &Path, what: &str) -> Result<String> {
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy()),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(Error::UnsafePath { what: what.to_string(), path: path.display().to_string() })
            }
        }
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A GNU tar of these files (mode 0644), for tests here and in the differ.
    pub(crate) fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn indexes_contents_and_metadata_ranges() {
        let long_name = format!("{}/file", "d".repeat(150));
        let bytes = archive(&[("./a.txt", b"hello"), ("empty", b""), (&long_name, b"world!")]);
        let idx = TarIndex::parse(&bytes, "t").unwrap();
        let paths: Vec<_> = idx.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["a.txt", "empty", long_name.as_str()]);
        let a = &idx.entries[0];
        assert_eq!(&bytes[a.content_range().start as usize..a.content_range().end as usize], b"hello");
        let last = &idx.entries[2];
        assert_eq!(last.meta_start, a.content_range().end, "metadata runs from the previous contents");
        assert_eq!(&bytes[last.data_start as usize..][..6], b"world!");
        assert_eq!(idx.len, bytes.len() as u64);
    }

    #[test]
    fn refuses_paths_that_escape() {
        for bad in ["../etc/passwd", "/etc/passwd", "a/../../b"] {
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            h.set_cksum();
            let mut raw = h.as_bytes().to_vec();
            raw[..bad.len()].copy_from_slice(bad.as_bytes());
            let mut h = tar::Header::from_byte_slice(&raw).clone();
            h.set_cksum();
            let mut bytes = h.as_bytes().to_vec();
            bytes.extend_from_slice(&[b'x'; 512]);
            bytes.extend_from_slice(&[0; 1024]);
            let err = TarIndex::parse(&bytes, "layer 1").unwrap_err();
            assert!(matches!(err, Error::UnsafePath { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn refuses_truncated_and_garbage_archives() {
        let bytes = archive(&[("a", &[1u8; 3000])]);
        assert!(TarIndex::parse(&bytes[..1500], "t").is_err());
        let mut garbage = vec![0x41u8; 1024];
        garbage[100] = 0;
        assert!(TarIndex::parse(&garbage, "t").is_err());
    }
}
