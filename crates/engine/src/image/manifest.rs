//! Image manifests and configurations: parsing separated from I/O.

use std::collections::BTreeMap;

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::layer::compression::Compression;

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker schema 2 manifest media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker schema 2 manifest list media type.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker schema 2 config media type.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// Largest manifest, index or config we read (the distribution registry's own manifest limit).
pub const MAX_JSON_BYTES: u64 = 4 << 20;

/// A content descriptor reduced to what we use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobRef {
    /// Media type as written in the descriptor.
    pub media_type: String,
    /// Content digest.
    pub digest: Digest,
    /// Content length in bytes.
    pub size: u64,
}

impl BlobRef {
    /// Converts an oci-spec descriptor, accepting only sha256 digests and sane sizes.
    pub fn from_descriptor(d: &Descriptor) -> Result<Self> {
        let digest: Digest = d.digest().to_string().parse()?;
        // OCI sizes are int64: a larger one cannot describe any blob.
        if d.size() > i64::MAX as u64 {
            return Err(Error::malformed(format!("descriptor of {digest}"), format!("size {} is out of range", d.size())));
        }
        Ok(BlobRef { media_type: d.media_type().to_string(), digest, size: d.size() })
    }
}

/// Whether a media type is a multi-platform index (OCI index or Docker manifest list).
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

/// Picks the `linux/arch` entry of a multi-platform index (`raw`), named `what` in errors.
/// Entries without a platform match any (some single-image indexes omit it).
pub fn select_platform(raw: &[u8], what: &str, arch: &str) -> Result<BlobRef> {
    let index = ImageIndex::from_reader(raw).map_err(|e| Error::malformed(what, e.to_string()))?;
    let matching: Vec<_> = index
        .manifests()
        .iter()
        .filter(|d| d.platform().as_ref().is_none_or(|p| p.architecture().to_string() == arch && p.os().to_string() == "linux"))
        .collect();
    match matching.as_slice() {
        [one] => BlobRef::from_descriptor(one),
        [] => Err(Error::NotFound(format!("an entry for linux/{arch} in {what}"))),
        _ => Err(Error::unsupported(what, format!("several entries for linux/{arch}"))),
    }
}

/// One layer of an image: its blob and how it is compressed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    /// The (usually compressed) blob.
    pub blob: BlobRef,
    /// Its compression, from the media type.
    pub compression: Compression,
    /// The digest of the uncompressed tar, from the config's `rootfs.diff_ids`.
    pub diff_id: Digest,
}

/// A parsed image manifest, kept together with its exact bytes.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// The exact bytes (their digest is the image's identity in a registry).
    pub raw: Vec<u8>,
    /// Digest of `raw`.
    pub digest: Digest,
    /// OCI or Docker schema 2 manifest media type.
    pub media_type: String,
    /// The config descriptor.
    pub config: BlobRef,
    /// The layer descriptors, base first.
    pub layers: Vec<BlobRef>,
    /// Its annotations; empty when it has none.
    pub annotations: BTreeMap<String, String>,
    /// The manifest it refers to (`subject`), for referrers such as deltas.
    pub subject: Option<BlobRef>,
    /// Its `artifactType`, when it has one.
    pub artifact_type: Option<String>,
}

impl Manifest {
    /// Parses an OCI or Docker schema 2 image manifest. `descriptor_media_type` is the media
    /// type the referring descriptor gave, if any.
    pub fn parse(raw: Vec<u8>, descriptor_media_type: Option<&str>) -> Result<Self> {
        let what = "image manifest";
        if raw.len() as u64 > MAX_JSON_BYTES {
            return Err(Error::TooLarge { what: what.into(), limit: MAX_JSON_BYTES });
        }
        let parsed = ImageManifest::from_reader(&raw[..]).map_err(|e| Error::malformed(what, e.to_string()))?;
        if parsed.schema_version() != 2 {
            return Err(Error::malformed(what, format!("schemaVersion {} (expected 2)", parsed.schema_version())));
        }
        let media_type = parsed
            .media_type()
            .as_ref()
            .map(|m| m.to_string())
            .or_else(|| descriptor_media_type.map(str::to_string))
            .unwrap_or_else(|| OCI_MANIFEST.to_string());
        if media_type != OCI_MANIFEST && media_type != DOCKER_MANIFEST {
            return Err(Error::unsupported(what, format!("media type {media_type}")));
        }
        let config = BlobRef::from_descriptor(parsed.config())?;
        let layers = parsed.layers().iter().map(BlobRef::from_descriptor).collect::<Result<Vec<_>>>()?;
        let annotations = parsed.annotations().iter().flatten().map(|(k, v)| (k.clone(), v.clone())).collect();
        let subject = parsed.subject().as_ref().map(BlobRef::from_descriptor).transpose()?;
        let artifact_type = parsed.artifact_type().as_ref().map(ToString::to_string);
        let digest = Digest::of(&raw);
        Ok(Manifest { raw, digest, media_type, config, layers, annotations, subject, artifact_type })
    }
}

/// A parsed image configuration, kept together with its exact bytes.
#[derive(Clone, Debug)]
pub struct Config {
    /// The exact bytes.
    pub raw: Vec<u8>,
    /// Digest of `raw`.
    pub digest: Digest,
    /// `rootfs.diff_ids`: digests of the uncompressed layers, base first.
    pub diff_ids: Vec<Digest>,
    /// CPU architecture (`amd64`, `arm64`, ...).
    pub architecture: String,
    /// Operating system.
    pub os: String,
    /// CPU variant (`v7`, `v8`), when the config gives one.
    pub variant: Option<String>,
}

impl Config {
    /// Parses an OCI or Docker image configuration.
    pub fn parse(raw: Vec<u8>) -> Result<Self> {
        let what = "image config";
        if raw.len() as u64 > MAX_JSON_BYTES {
            return Err(Error::TooLarge { what: what.into(), limit: MAX_JSON_BYTES });
        }
        let parsed = ImageConfiguration::from_reader(&raw[..]).map_err(|e| Error::malformed(what, e.to_string()))?;
        if parsed.rootfs().typ() != "layers" {
            return Err(Error::malformed(what, format!("rootfs.type {:?} (expected \"layers\")", parsed.rootfs().typ())));
        }
        let diff_ids = parsed.rootfs().diff_ids().iter().map(|d| d.parse::<Digest>()).collect::<Result<Vec<_>>>()?;
        let digest = Digest::of(&raw);
        let variant = parsed.variant().clone();
        Ok(Config { raw, digest, diff_ids, architecture: parsed.architecture().to_string(), os: parsed.os().to_string(), variant })
    }
}

/// An image: manifest, config and the layers they describe together.
#[derive(Clone, Debug)]
pub struct Image {
    /// The manifest.
    pub manifest: Manifest,
    /// The config.
    pub config: Config,
    /// Layers with their compression and diff_id, base first.
    pub layers: Vec<Layer>,
}

impl Image {
    /// Joins a manifest and its config, checking that they agree.
    pub fn new(manifest: Manifest, config: Config) -> Result<Self> {
        if manifest.config.digest != config.digest {
            return Err(Error::DigestMismatch { what: "image config".into(), expected: manifest.config.digest, found: config.digest });
        }
        if manifest.config.size != config.raw.len() as u64 {
            return Err(Error::SizeMismatch {
                what: format!("image config {}", config.digest),
                expected: manifest.config.size,
                found: config.raw.len() as u64,
            });
        }
        if manifest.layers.len() != config.diff_ids.len() {
            return Err(Error::malformed(
                "image",
                format!("manifest lists {} layers but config lists {} diff_ids", manifest.layers.len(), config.diff_ids.len()),
            ));
        }
        let layers = manifest
            .layers
            .iter()
            .zip(&config.diff_ids)
            .enumerate()
            .map(|(i, (blob, diff_id))| {
                let compression = Compression::from_media_type(&blob.media_type)
                    .map_err(|_| Error::unsupported(format!("layer {i} ({})", blob.digest), format!("media type {}", blob.media_type)))?;
                Ok(Layer { blob: blob.clone(), compression, diff_id: *diff_id })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Image { manifest, config, layers })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"]}}"#;

    fn manifest_json(media_type: &str, layer_type: &str, config_digest: &Digest) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{media_type}","config":{{"mediaType":"{OCI_CONFIG}","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"{layer_type}","digest":"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824","size":5}}]}}"#,
            CONFIG.len()
        )
    }

    #[test]
    fn parses_oci_and_docker_manifests() {
        let config = Config::parse(CONFIG.as_bytes().to_vec()).unwrap();
        for (mt, lt, compression) in [
            (OCI_MANIFEST, "application/vnd.oci.image.layer.v1.tar+gzip", Compression::Gzip),
            (DOCKER_MANIFEST, "application/vnd.docker.image.rootfs.diff.tar.gzip", Compression::Gzip),
            (OCI_MANIFEST, "application/vnd.oci.image.layer.v1.tar+zstd", Compression::Zstd),
            (OCI_MANIFEST, "application/vnd.oci.image.layer.v1.tar", Compression::None),
        ] {
            let m = Manifest::parse(manifest_json(mt, lt, &config.digest).into_bytes(), None).unwrap();
            assert_eq!(m.media_type, mt);
            let image = Image::new(m, config.clone()).unwrap();
            assert_eq!(image.layers[0].compression, compression);
        }
    }

    #[test]
    fn rejects_malformed_and_inconsistent_documents() {
        let config = Config::parse(CONFIG.as_bytes().to_vec()).unwrap();
        for bad in ["", "{", "[]", r#"{"schemaVersion":2}"#, r#"{"schemaVersion":1,"config":{},"layers":[]}"#] {
            assert!(Manifest::parse(bad.as_bytes().to_vec(), None).is_err(), "{bad}");
        }
        for bad in ["{}", r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["md5:00"]}}"#] {
            assert!(Config::parse(bad.as_bytes().to_vec()).is_err(), "{bad}");
        }
        let m = Manifest::parse(manifest_json(OCI_MANIFEST, "application/x-unknown", &config.digest).into_bytes(), None).unwrap();
        assert!(matches!(Image::new(m, config.clone()), Err(Error::Unsupported { .. })));
        let m = Manifest::parse(manifest_json(OCI_MANIFEST, OCI_CONFIG, &Digest::of(b"x")).into_bytes(), None).unwrap();
        assert!(matches!(Image::new(m, config), Err(Error::DigestMismatch { .. })));
    }
}
