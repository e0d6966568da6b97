//! How each target blob will be rebuilt: byte for byte by a known encoder or with a
//! correction stream, verbatim, or recompressed (same tar, another digest). See
//! [`crate::format::plan::Encoding`].

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::format::plan::Encoding;
use crate::image::{Layer, Layout};
use crate::layer::corrected::{analyze, Outcome, CORRECTION_ENGINE};
use crate::layer::exact::fingerprint_streaming;
use crate::layer::Compression;

/// A gzip blob that no known encoder reproduces is rebuilt with a correction stream only when
/// the stream is smaller than this fraction of the blob; otherwise it is carried whole (or,
/// with [`Fidelity::Content`], recompressed).
pub const CORRECTIONS_BUDGET: f64 = 0.1;

/// What the rebuilt image must preserve.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fidelity {
    /// Every blob digest, hence the target's manifest digest (signatures and digest pins
    /// hold): a layer no known encoder reproduces, even with corrections, is carried whole.
    #[default]
    Exact,
    /// Layer contents only (diff_ids and the config): a layer no known encoder reproduces,
    /// even with corrections, is patched and recompressed, and the written manifest differs
    /// from the target's.
    Content,
}

/// The outcome for one target layer whose tar the applier rebuilds.
#[derive(Debug)]
pub enum Choice {
    /// Rebuild the tar and encode it like this.
    Encode(Encoding),
    /// Rebuild the tar and re-encode it with the correction stream at `path`, whose size is
    /// `bytes` (the encoding is [`Encoding::Corrected`], its `corrections_layer` not yet set).
    Correct {
        /// The encoding for the plan.
        encoding: Encoding,
        /// The correction stream.
        path: PathBuf,
        /// Its size.
        bytes: u64,
    },
    /// Exactness is required and no encoder reproduces the blob: carry it whole.
    CarryBlob,
}

/// Finds how to re-encode target layer `index` from its tar, which `open_tar` reads from the
/// start (it may be called once per candidate encoder). When no known encoder reproduces a
/// gzip blob, tries a correction stream, written into `scratch`.
pub fn choose<R: std::io::Read>(
    layout: &Layout,
    layer: &Layer,
    index: u32,
    fidelity: Fidelity,
    scratch: &Path,
    open_tar: impl FnMut() -> std::io::Result<R>,
) -> Result<Choice> {
    let blob_path = layout.blob_path(&layer.blob.digest);
    let open_blob = || File::open(&blob_path).map(|f| BufReader::with_capacity(1 << 20, f));
    let found = match layer.compression {
        Compression::None => return Ok(Choice::Encode(Encoding::Verbatim)),
        Compression::Gzip => fingerprint_streaming(open_blob, open_tar)?,
        Compression::Zstd => None,
    };
    if let Some(descriptor) = found {
        return Ok(Choice::Encode(Encoding::Exact { descriptor }));
    }
    let mut reason = match layer.compression {
        Compression::Zstd => "zstd layers are not re-encoded exactly by this version".to_string(),
        _ => "no known encoder reproduces this gzip blob".to_string(),
    };
    if layer.compression == Compression::Gzip {
        let path = scratch.join(format!("corrections-{index}"));
        let budget = (CORRECTIONS_BUDGET * layer.blob.size as f64) as u64;
        let out = BufWriter::new(File::create(&path).ctx(|| format!("creating {}", path.display()))?);
        let blob = open_blob().ctx(|| format!("opening {}", blob_path.display()))?;
        match analyze(blob, index, budget, out)? {
            Outcome::Written(a) => {
                let bytes = std::fs::metadata(&path).ctx(|| format!("reading {}", path.display()))?.len();
                if bytes < budget {
                    let encoding = Encoding::Corrected { engine: CORRECTION_ENGINE.into(), header: a.header, corrections_layer: 0, corrections_bytes: bytes };
                    return Ok(Choice::Correct { encoding, path, bytes });
                }
                reason.push_str(&format!(", and its corrections ({bytes} bytes) exceed the budget of {budget}"));
            }
            Outcome::Unusable(why) => reason.push_str(&format!(", and corrections do not either: {why}")),
        }
        std::fs::remove_file(&path).map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
    }
    Ok(match fidelity {
        Fidelity::Exact => Choice::CarryBlob,
        Fidelity::Content => Choice::Encode(Encoding::Recompressed { reason }),
    })
}
