//! Layer compression: recognising it from media types, and bounded decoders and encoders.

use std::io::{self, Read, Write};

use crate::digest::{Digest, Hasher};
use crate::error::{Error, IoContext, Result};

/// Largest zstd window (log2) accepted when decoding layers: 16 MiB, so that two layers
/// decoded at once stay within the applier's memory bound (README) whatever a hostile frame
/// asks for. zstd's levels up to 19 use at most 8 MiB; only `--ultra`/`--long` frames need
/// more, and are refused by name.
pub const MAX_LAYER_ZSTD_WINDOW_LOG: u32 = 24;

/// Most bytes one byte of deflate data can expand to (a 258-byte match coded in under two
/// bits, 1032:1), which bounds the tar a gzip blob of known size can hold.
const MAX_DEFLATE_EXPANSION: u64 = 1032;
/// Most bytes one byte of a zstd frame can expand to: an RLE block of 128 KiB takes four
/// bytes (its three-byte header and the byte repeated).
const MAX_ZSTD_EXPANSION: u64 = 128 << 8;

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
            "application/vnd.oci.image.layer.v1.tar+zstd" | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Ok(Compression::Zstd),
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

    /// The largest uncompressed tar a blob of `blob_size` bytes in this compression can hold:
    /// the bound that the verified target manifest puts on a rebuilt layer.
    pub fn max_uncompressed_len(self, blob_size: u64) -> u64 {
        match self {
            Compression::None => blob_size,
            Compression::Gzip => blob_size.saturating_mul(MAX_DEFLATE_EXPANSION),
            Compression::Zstd => blob_size.saturating_mul(MAX_ZSTD_EXPANSION),
        }
    }

    /// The compression that a blob's first bytes show (gzip and zstd magic numbers; a zstd
    /// stream may start with a skippable frame); anything else is taken as a plain tar.
    pub fn sniff(start: &[u8]) -> Self {
        match start {
            [0x1f, 0x8b, ..] => Compression::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
            [b0, 0x2a, 0x4d, 0x18, ..] if b0 & 0xf0 == 0x50 => Compression::Zstd,
            _ => Compression::None,
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
                Box::new(ZstdReader(d))
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

/// A zstd decoder whose window refusal names the limit, instead of zstd's bare "Frame
/// requires too much memory for decoding".
struct ZstdReader<R>(R);

impl<R: Read> Read for ZstdReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).map_err(|e| {
            if e.to_string().contains("too much memory") {
                Error::TooLarge { what: "zstd frame window".into(), limit: 1 << MAX_LAYER_ZSTD_WINDOW_LOG }.into_io()
            } else {
                Error::malformed("zstd stream", e.to_string()).into_io()
            }
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
    fn zstd_windows_past_the_limit_are_refused_by_name() {
        let data = text_like(40 << 20);
        let mut big = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        big.set_parameter(zstd::stream::raw::CParameter::WindowLog(27)).unwrap();
        big.set_parameter(zstd::stream::raw::CParameter::EnableLongDistanceMatching(true)).unwrap();
        big.write_all(&data).unwrap();
        let big = big.finish().unwrap();
        let err = copy_hashed(Compression::Zstd.decoder(&big[..]).unwrap(), io::sink(), u64::MAX, "layer 0").unwrap_err();
        assert!(matches!(err, Error::TooLarge { limit, .. } if limit == 1 << MAX_LAYER_ZSTD_WINDOW_LOG), "{err}");
        let small = zstd::encode_all(&data[..], 19).unwrap();
        copy_hashed(Compression::Zstd.decoder(&small[..]).unwrap(), io::sink(), u64::MAX, "layer 0").unwrap();
    }

    fn text_like(len: usize) -> Vec<u8> {
        let mut x = 1u64;
        (0..len)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                b'a' + (x >> 60) as u8
            })
            .collect()
    }

    #[test]
    fn sniffing_and_expansion_bounds() {
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let mut e = c.encoder(Vec::new()).unwrap();
            e.write_all(&[0u8; 4 << 20]).unwrap();
            let blob = e.finish().unwrap();
            assert_eq!(Compression::sniff(&blob), c);
            assert!(c.max_uncompressed_len(blob.len() as u64) >= 4 << 20, "{c:?}: {} bytes", blob.len());
        }
        assert_eq!(Compression::None.max_uncompressed_len(10), 10);
    }

    #[test]
    fn media_types_map_both_ways() {
        let docker = "application/vnd.docker.image.rootfs.diff.tar.gzip";
        assert_eq!(Compression::from_media_type(docker).unwrap(), Compression::Gzip);
        assert_eq!(Compression::None.media_type_like(docker), "application/vnd.docker.image.rootfs.diff.tar");
        assert!(Compression::from_media_type("text/plain").is_err());
    }
}
