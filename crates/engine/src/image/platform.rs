//! Platforms of multi-platform images: `os/architecture[/variant]`, the entries of an image
//! index, and how an entry is matched to a platform. Parsing only; no I/O.

use std::fmt;

use oci_spec::image::ImageIndex;

use crate::error::{Error, Result};
use crate::image::manifest::{BlobRef, Config};

/// What an image runs on: the `platform` of an index entry, or an image config's `os`,
/// `architecture` and `variant`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Platform {
    /// `linux`, `windows`, ...
    pub os: String,
    /// `amd64`, `arm64`, `arm`, ...
    pub architecture: String,
    /// `v7`, `v8`, ...; `None` when not given.
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `os/architecture[/variant]`, as `--platform` takes it (`linux/arm64`,
    /// `linux/arm/v7`).
    pub fn parse(text: &str) -> Result<Self> {
        let invalid = || Error::unsupported(format!("platform {text:?}"), "expected OS/ARCHITECTURE[/VARIANT], e.g. linux/amd64 or linux/arm/v7");
        let parts: Vec<&str> = text.split('/').collect();
        let ok = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Ok(Platform { os: os.to_string(), architecture: arch.to_string(), variant: None }),
            [os, arch, variant] if ok(os) && ok(arch) && ok(variant) => {
                Ok(Platform { os: os.to_string(), architecture: arch.to_string(), variant: Some(variant.to_string()) })
            }
            _ => Err(invalid()),
        }
    }

    /// `linux/architecture`.
    pub fn linux(architecture: &str) -> Self {
        Platform { os: "linux".into(), architecture: architecture.into(), variant: None }
    }

    /// The platform an image config says the image is for.
    pub fn of_config(config: &Config) -> Self {
        Platform { os: config.os.clone(), architecture: config.architecture.clone(), variant: config.variant.clone() }
    }

    /// Whether `other` is the same platform. `arm64` without a variant is `arm64/v8` (its
    /// only variant in practice, which builders write or leave out as they like, as containerd
    /// normalizes it); every other field compares as written.
    pub fn matches(&self, other: &Platform) -> bool {
        self.normalized() == other.normalized()
    }

    fn normalized(&self) -> (&str, &str, Option<&str>) {
        let variant = match (self.architecture.as_str(), self.variant.as_deref()) {
            ("arm64", Some("v8")) => None,
            (_, v) => v,
        };
        (&self.os, &self.architecture, variant)
    }

    pub(crate) fn of_spec(p: &oci_spec::image::Platform) -> Self {
        Platform { os: p.os().to_string(), architecture: p.architecture().to_string(), variant: p.variant().clone() }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Platform {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

/// One entry of an image index: a manifest and the platform it is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    /// The manifest.
    pub manifest: BlobRef,
    /// Its platform; `None` when the entry gives none.
    pub platform: Option<Platform>,
}

/// The entries of the image index `raw` (named `what` in errors) that are images for a
/// platform: entries with an `unknown` OS or architecture (the attestation manifests that
/// buildkit adds) are left out.
pub fn index_entries(raw: &[u8], what: &str) -> Result<Vec<IndexEntry>> {
    let index = ImageIndex::from_reader(raw).map_err(|e| Error::malformed(what, e.to_string()))?;
    let mut entries = Vec::new();
    for d in index.manifests() {
        let platform = d.platform().as_ref().map(Platform::of_spec);
        if platform.as_ref().is_some_and(|p| p.os == "unknown" || p.architecture == "unknown") {
            continue;
        }
        entries.push(IndexEntry { manifest: BlobRef::from_descriptor(d)?, platform });
    }
    Ok(entries)
}

/// The platforms of `entries`, as a list for messages (`linux/amd64, linux/arm64`).
pub fn describe_platforms(entries: &[IndexEntry]) -> String {
    let names: Vec<String> = entries.iter().map(|e| e.platform.as_ref().map_or_else(|| "(no platform)".to_string(), Platform::to_string)).collect();
    if names.is_empty() {
        "no entries".into()
    } else {
        names.join(", ")
    }
}

/// The one entry of `entries` (of the index named `what`) for `platform`. None is an error
/// naming the platform and the platforms there are; several are an error too.
pub fn entry_for<'a>(entries: &'a [IndexEntry], platform: &Platform, what: &str) -> Result<&'a IndexEntry> {
    let matching: Vec<&IndexEntry> = entries.iter().filter(|e| e.platform.as_ref().is_some_and(|p| p.matches(platform))).collect();
    match matching.as_slice() {
        [one] => Ok(one),
        [] => Err(Error::NotFound(format!("an entry for {platform} in {what}, which has {}", describe_platforms(entries)))),
        _ => Err(Error::unsupported(what, format!("several entries for {platform}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;

    #[test]
    fn platforms_parse_print_and_match() {
        for (text, os, arch, variant) in [("linux/amd64", "linux", "amd64", None), ("linux/arm/v7", "linux", "arm", Some("v7"))] {
            let p = Platform::parse(text).unwrap();
            assert_eq!(p, Platform { os: os.into(), architecture: arch.into(), variant: variant.map(String::from) });
            assert_eq!(p.to_string(), text);
        }
        for bad in ["", "linux", "linux/", "/amd64", "linux/arm/v7/x", "linux/am d64"] {
            let err = Platform::parse(bad).unwrap_err().to_string();
            assert!(err.contains("OS/ARCHITECTURE"), "{bad}: {err}");
        }
        let p = |t: &str| Platform::parse(t).unwrap();
        assert!(p("linux/arm64").matches(&p("linux/arm64/v8")));
        assert!(!p("linux/arm/v7").matches(&p("linux/arm/v6")));
        assert!(!p("linux/arm/v7").matches(&p("linux/arm")));
        assert!(!p("linux/amd64").matches(&p("windows/amd64")));
    }

    #[test]
    fn entries_skip_attestations_and_are_found_by_platform() {
        let d = |n: &[u8]| Digest::of(n).to_string();
        let raw = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d(b"a"), "size": 10, "platform": {"os": "linux", "architecture": "amd64"}},
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d(b"b"), "size": 11, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d(b"c"), "size": 12, "platform": {"os": "unknown", "architecture": "unknown"}},
            ]
        });
        let raw = serde_json::to_vec(&raw).unwrap();
        let entries = index_entries(&raw, "index x").unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(describe_platforms(&entries), "linux/amd64, linux/arm64/v8");
        assert_eq!(entry_for(&entries, &Platform::linux("arm64"), "index x").unwrap().manifest.size, 11);
        let err = entry_for(&entries, &Platform::parse("linux/riscv64").unwrap(), "index x").unwrap_err().to_string();
        assert!(err.contains("linux/riscv64") && err.contains("index x") && err.contains("linux/amd64, linux/arm64/v8"), "{err}");
        assert!(index_entries(b"{", "index y").unwrap_err().to_string().contains("index y"));
    }
}
