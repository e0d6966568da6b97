//! How each target blob will be rebuilt: byte for byte by a known encoder, verbatim, or
//! recompressed (same tar, another digest). See [`crate::format::plan::Encoding`].

use std::fs::File;
use std::io::BufReader;

use crate::error::Result;
use crate::format::plan::Encoding;
use crate::image::{Layer, Layout};
use crate::layer::exact::fingerprint_streaming;
use crate::layer::Compression;

/// What the rebuilt image must preserve.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fidelity {
    /// Every blob digest, hence the target's manifest digest (signatures and digest pins
    /// hold): a layer no known encoder reproduces is carried whole.
    #[default]
    Exact,
    /// Layer contents only (diff_ids and the config): a layer no known encoder reproduces is
    /// patched and recompressed, and the written manifest differs from the target's.
    Content,
}

/// The outcome for one target layer whose tar the applier rebuilds.
#[derive(Debug)]
pub enum Choice {
    /// Rebuild the tar and encode it like this.
    Encode(Encoding),
    /// Exactness is required and no encoder reproduces the blob: carry it whole.
    CarryBlob,
}

/// Finds how to re-encode `layer` from its tar, which `open_tar` reads from the start (it may
/// be called once per candidate encoder).
pub fn choose<R: std::io::Read>(layout: &Layout, layer: &Layer, fidelity: Fidelity, open_tar: impl FnMut() -> std::io::Result<R>) -> Result<Choice> {
    let found = match layer.compression {
        Compression::None => return Ok(Choice::Encode(Encoding::Verbatim)),
        Compression::Gzip => {
            let path = layout.blob_path(&layer.blob.digest);
            fingerprint_streaming(|| File::open(&path).map(|f| BufReader::with_capacity(1 << 20, f)), open_tar)?
        }
        Compression::Zstd => None,
    };
    Ok(match (found, fidelity) {
        (Some(descriptor), _) => Choice::Encode(Encoding::Exact { descriptor }),
        (None, Fidelity::Exact) => Choice::CarryBlob,
        (None, Fidelity::Content) => Choice::Encode(Encoding::Recompressed {
            reason: match layer.compression {
                Compression::Zstd => "zstd layers are not re-encoded exactly by this version".into(),
                _ => "no known encoder reproduces this gzip blob".into(),
            },
        }),
    })
}
