//! Layers unpacked for the differ: uncompressed tars on disk, memory-mapped and indexed,
//! with the digest of every file's contents.
#![allow(unsafe_code)]

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use memmap2::Mmap;
use rayon::prelude::*;

use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use crate::format::plan::Member;
use crate::image::{Layer, Layout};
use crate::layer::members::{expand, expanded_offset};
use crate::layer::TarIndex;

/// One uncompressed, indexed layer.
#[derive(Debug)]
pub struct Unpacked {
    /// The uncompressed tar.
    pub map: Mmap,
    /// Its entries.
    pub index: TarIndex,
    /// SHA-256 of each entry's contents, for entries with contents.
    pub content_digests: Vec<Option<Digest>>,
}

impl Unpacked {
    /// The bytes of a range of the tar.
    pub fn bytes(&self, range: std::ops::Range<u64>) -> &[u8] {
        &self.map[range.start as usize..range.end as usize]
    }

    /// The expanded view of this layer (see [`crate::layer::members`]): written to
    /// `dir/name`, mapped, its index moved to expanded offsets and each member entry's
    /// contents digested anew. Each member lies within one entry's contents: a gzip file
    /// fills it, a zip entry's deflate stream is a part of it.
    pub fn expanded(&self, members: &[Member], dir: &Path, name: &str, limit: u64, what: &str) -> Result<Unpacked> {
        let path = dir.join(name);
        let file = File::create(&path).ctx(|| format!("creating {}", path.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let len = expand(&self.map[..], members, &mut out, limit, what)?;
        out.into_inner().map_err(|e| Error::io(format!("writing {}", path.display()), e.into_error()))?;
        let file = File::open(&path).ctx(|| format!("opening {}", path.display()))?;
        // SAFETY: as in `unpack`: a private temporary file nothing else writes.
        let map = unsafe { Mmap::map(&file) }.ctx(|| format!("mapping {}", path.display()))?;
        let mut index = self.index.clone();
        index.len = len;
        for e in &mut index.entries {
            let end = expanded_offset(members, e.data_start + e.data_len);
            e.meta_start = expanded_offset(members, e.meta_start);
            e.data_start = expanded_offset(members, e.data_start);
            e.data_len = end - e.data_start;
        }
        let content_digests = index
            .entries
            .par_iter()
            .zip(&self.content_digests)
            .map(|(e, old)| match old {
                Some(_) if e.has_content() => Some(Digest::of(&map[e.data_start as usize..(e.data_start + e.data_len) as usize])),
                _ => None,
            })
            .collect();
        Ok(Unpacked { map, index, content_digests })
    }
}

/// Decompresses `layer` from `layout` into `dir/name`, verifying the blob digest and the
/// diff_id, refusing to write more than `limit` bytes; then maps and indexes it.
pub fn unpack(layout: &Layout, layer: &Layer, dir: &Path, name: &str, limit: u64, what: &str) -> Result<Unpacked> {
    let path = dir.join(name);
    layout.unpack_layer(layer, &path, limit, what)?;
    let file = File::open(&path).ctx(|| format!("opening {}", path.display()))?;
    // SAFETY: the file is a private temporary file we just wrote; nothing else writes to it
    // while it is mapped, so the mapping cannot change under us.
    let map = unsafe { Mmap::map(&file) }.ctx(|| format!("mapping {}", path.display()))?;
    let index = TarIndex::parse(&map, what)?;
    let content_digests = index
        .entries
        .par_iter()
        .map(|e| e.has_content().then(|| Digest::of(&map[e.data_start as usize..(e.data_start + e.data_len) as usize])))
        .collect();
    Ok(Unpacked { map, index, content_digests })
}
