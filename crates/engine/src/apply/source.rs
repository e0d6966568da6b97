//! Source material for the applier: the uncompressed source layers a delta reads, as files
//! that are read with positioned reads (never mapped, so memory stays bounded).

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, IoContext, Result};
use crate::format::plan::Member;
use crate::image::{Image, Layout};
use crate::layer::members::expand;
use crate::layer::Compression;

/// One uncompressed source layer on disk.
#[derive(Debug)]
pub struct SourceLayer {
    file: File,
    len: u64,
    index: u32,
}

impl SourceLayer {
    /// Length of the uncompressed tar.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the tar is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads `buf.len()` bytes at `offset`, refusing ranges outside the layer.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if offset.checked_add(buf.len() as u64).is_none_or(|end| end > self.len) {
            return Err(Error::malformed("patch", format!("range {offset}+{} is outside source layer {} ({} bytes)", buf.len(), self.index, self.len)));
        }
        self.file.read_exact_at(buf, offset).ctx(|| format!("reading source layer {}", self.index))
    }
}

/// Makes source layer `index` available uncompressed: a plain-tar blob is used in place;
/// a compressed one is decompressed into `dir`. Either way its diff_id is verified, so a
/// damaged source is caught before it can spoil the output. With `members`, the layer is
/// made available expanded (each member inflated; see [`crate::layer::members`]), as the
/// delta's patches read it.
pub fn materialize(layout: &Layout, image: &Image, index: u32, dir: &Path, limit: u64, members: &[Member]) -> Result<SourceLayer> {
    let layer = image.layers.get(index as usize).ok_or_else(|| Error::malformed("patch", format!("source layer {index} does not exist")))?;
    let what = format!("source layer {index} ({})", layer.blob.digest);
    let blob = layout.open_blob(&layer.blob)?;
    // The source is not hashed: every rebuilt layer is checked against its diff_id before the
    // output is committed, so a damaged source fails that check, and a layer reused as it is
    // is verified on its own copy. Hashing the source here cost a pass of SHA-256 over it.
    let (plain, len) = if layer.compression == Compression::None {
        if layer.blob.size > limit {
            return Err(Error::TooLarge { what, limit });
        }
        (blob, layer.blob.size)
    } else {
        let path = dir.join(format!("source-{index}.tar"));
        let len = layout.decompress_layer(layer, &path, limit, &what)?;
        let file = File::open(&path).ctx(|| format!("opening {}", path.display()))?;
        if !members.is_empty() {
            // The expanded copy replaces it; the open handle keeps the data readable.
            std::fs::remove_file(&path).ctx(|| format!("removing {}", path.display()))?;
        }
        (file, len)
    };
    if members.is_empty() {
        return Ok(SourceLayer { file: plain, len, index });
    }
    let path = dir.join(format!("source-{index}.x.tar"));
    let out = File::create(&path).ctx(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, out);
    let input = BufReader::with_capacity(1 << 20, &plain);
    let len = expand(input, members, &mut out, limit, &what)?;
    out.into_inner().map_err(|e| Error::io(format!("writing {}", path.display()), e.into_error()))?;
    let file = File::open(&path).ctx(|| format!("opening {}", path.display()))?;
    Ok(SourceLayer { file, len, index })
}
