//! Layer compression: recognising it from media types, and bounded decoders and encoders.

use std::io::{self, Read, Write};

use crate::digest::{Digest, Hasher};
use crate::error::{Error, IoContext, Result};

/// Largest zstd window (log2) accepted when decoding layers: 128 MiB, zstd's own default
/// bound, so a hostile frame cannot make us allocate more.
pub const MAX_LAYER_ZSTD_WINDOW_LOG: u32 = 27;

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (RFC 1952), possibly several members.
    Gzip,
    /// zstd frames.
    Zstd,
}

impl Compression {
    /// The compression a layer media type declares (OCI and Docker names).
    pub fn from_media_type(media_type: &str) -> Result<Self> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Ok(Compression::Zstd),
            other => Err(Error::unsupported("layer", format!("media type {other}"))),
        }
    }

    /// Rewrites a layer media type for this compression, keeping its family (OCI or Docker).
    pub fn media_type_like(self, original: &str) -> String {
        let docker = original.starts_with("application/vnd.docker.");
        match (docker, self) {
            (true, Compression::None) => "application/vnd.docker.image.rootfs.diff.tar".into(),
            (true, Compression::Gzip) => "application/vnd.docker.image.rootfs.diff.tar.gzip".into(),
            (_, Compression::None) => "application/vnd.oci.image.layer.v1.tar".into(),
            (_, Compression::Gzip) => "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            (_, Compression::Zstd) => "application/vnd.oci.image.layer.v1.tar+zstd".into(),
        }
    }

    /// A reader yielding the uncompressed bytes of `input`.
    pub fn decoder<'a>(self, input: impl Read + 'a) -> Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Compression::None => Box::new(input),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::with_capacity(128 << 10, input))),
            Compression::Zstd => {
                let mut d = zstd::stream::read::Decoder::new(input).ctx(|| "starting zstd decoder".into())?;
                d.window_log_max(MAX_LAYER_ZSTD_WINDOW_LOG).ctx(|| "configuring zstd decoder".into())?;
                Box::new(d)
            }
        })
    }

    /// A writer compressing into `output`.
    pub fn encoder<W: Write>(self, output: W) -> Result<Encoder<W>> {
        Ok(match self {
            Compression::None => Encoder::None(output),
            // Fast rather than small: a recompressed layer gets a new digest whatever the
            // level, so the applier favours speed (bit-exact re-encoding is a separate path).
            Compression::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(output, flate2::Compression::fast())),
            Compression::Zstd => Encoder::Zstd(zstd::stream::write::Encoder::new(output, 3).ctx(|| "starting zstd encoder".into())?),
        })
    }
}

/// A compressing writer; [`Encoder::finish`] completes the stream and returns the output.
#[allow(missing_debug_implementations)]
pub enum Encoder<W: Write> {
    /// Pass-through.
    None(W),
    /// gzip.
    Gzip(flate2::write::GzEncoder<W>),
    /// zstd.
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Encoder<W> {
    /// Completes the stream.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::None(w) => Ok(w),
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::None(w) => w.write(buf),
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::None(w) => w.flush(),
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
        }
    }
}

/// Copies `input` to `output` while hashing, failing with [`Error::TooLarge`] past `limit`
/// bytes: the guard against decompression bombs. Returns the digest and length.
pub fn copy_hashed(mut input: impl Read, mut output: impl Write, limit: u64, what: &str) -> Result<(Digest, u64)> {
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = input.read(&mut buf).ctx(|| format!("reading {what}"))?;
        if n == 0 {
            break;
        }
        if hasher.len() + n as u64 > limit {
            return Err(Error::TooLarge { what: what.to_string(), limit });
        }
        hasher.update(&buf[..n]);
        output.write_all(&buf[..n]).ctx(|| format!("writing {what}"))?;
    }
    let len = hasher.len();
    Ok((hasher.finish(), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_compression_round_trips() {
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let mut e = c.encoder(Vec::new()).unwrap();
            e.write_all(&data).unwrap();
            let compressed = e.finish().unwrap();
            let mut out = Vec::new();
            let (d, n) = copy_hashed(c.decoder(&compressed[..]).unwrap(), &mut out, u64::MAX, "test").unwrap();
            assert_eq!((out.len() as u64, d), (n, Digest::of(&data)), "{c:?}");
        }
    }

    #[test]
    fn decompression_past_the_limit_is_refused() {
        let mut e = Compression::Gzip.encoder(Vec::new()).unwrap();
        e.write_all(&vec![0u8; 10 << 20]).unwrap();
        let bomb = e.finish().unwrap();
        assert!(bomb.len() < 200 << 10, "{} bytes", bomb.len());
        let err = copy_hashed(Compression::Gzip.decoder(&bomb[..]).unwrap(), io::sink(), 1 << 20, "layer 0").unwrap_err();
        assert!(matches!(err, Error::TooLarge { .. }), "{err}");
    }

    #[test]
    fn media_types_map_both_ways() {
        let docker = "application/vnd.docker.image.rootfs.diff.tar.gzip";
        assert_eq!(Compression::from_media_type(docker).unwrap(), Compression::Gzip);
        assert_eq!(Compression::None.media_type_like(docker), "application/vnd.docker.image.rootfs.diff.tar");
        assert!(Compression::from_media_type("text/plain").is_err());
    }
}
