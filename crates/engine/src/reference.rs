//! Image references in skopeo's transport syntax: where an image lives (an OCI layout, a
//! registry, the container engine's store). Above the transports it names, so that none of
//! them depends on it.

use std::fmt;
use std::path::PathBuf;

use crate::engine::EngineRef;
use crate::error::{Error, Result};
use crate::image::{Image, Layout};
use crate::registry::RegistryRef;

pub use crate::image::DEFAULT_TAG;

/// Where an image lives.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ImageRef {
    /// `oci:DIR[:TAG]`: an OCI image layout on disk; the tag is the
    /// `org.opencontainers.image.ref.name` annotation of an entry of its `index.json`.
    Layout {
        /// The layout directory.
        dir: PathBuf,
        /// The tag, if one was given.
        tag: Option<String>,
    },
    /// `docker://HOST[:PORT]/REPO[:TAG][@DIGEST]`: an image in a registry.
    Registry(RegistryRef),
    /// `docker-daemon:NAME[:TAG]`: an image in the container engine's store (Docker,
    /// balena-engine), reached at `$DOCKER_HOST` or `--engine` (see [`crate::engine`]).
    Engine(EngineRef),
}

impl ImageRef {
    /// Parses `oci:DIR[:TAG]`, `docker://HOST[:PORT]/REPO[:TAG][@DIGEST]` or
    /// `docker-daemon:NAME[:TAG]`. As in skopeo, an `oci:` directory ends at the first `:`.
    pub fn parse(reference: &str) -> Result<Self> {
        let invalid = |reason: &str| Error::InvalidReference { reference: reference.to_string(), reason: reason.to_string() };
        let (transport, rest) = reference.split_once(':').ok_or_else(|| invalid("expected TRANSPORT:LOCATION, e.g. oci:DIR[:TAG]"))?;
        match transport {
            "oci" => {
                let (dir, tag) = match rest.split_once(':') {
                    Some((dir, tag)) => (dir, Some(tag)),
                    None => (rest, None),
                };
                if dir.is_empty() {
                    return Err(invalid("the layout directory is empty"));
                }
                if let Some(tag) = tag {
                    if tag.is_empty() || tag.len() > 128 || tag.chars().any(|c| c.is_control() || c == '/' || c == ':') {
                        return Err(invalid("a tag is 1 to 128 characters without '/', ':' or control characters"));
                    }
                }
                Ok(ImageRef::Layout { dir: PathBuf::from(dir), tag: tag.map(str::to_string) })
            }
            "docker" => match rest.strip_prefix("//") {
                Some(name) => Ok(ImageRef::Registry(RegistryRef::parse(name)?)),
                None => Err(invalid("expected docker://HOST[:PORT]/REPO[:TAG|@DIGEST]")),
            },
            "docker-daemon" => Ok(ImageRef::Engine(EngineRef::parse(rest)?)),
            other => Err(invalid(&format!("unknown transport {other:?}; supported: oci, docker, docker-daemon"))),
        }
    }

    /// The tag, or [`DEFAULT_TAG`].
    pub fn tag_or_default(&self) -> &str {
        match self {
            ImageRef::Layout { tag, .. } => tag.as_deref().unwrap_or(DEFAULT_TAG),
            ImageRef::Registry(r) => r.tag.as_deref().unwrap_or(DEFAULT_TAG),
            ImageRef::Engine(e) => e.tag_or_default(),
        }
    }

    /// The layout directory and tag, for code that works on local layouts only; a registry
    /// reference is an error saying so (see [`crate::transfer::Transfer::localize`]).
    pub fn local(&self) -> Result<(&std::path::Path, Option<&str>)> {
        match self {
            ImageRef::Layout { dir, tag } => Ok((dir, tag.as_deref())),
            ImageRef::Registry(_) | ImageRef::Engine(_) => Err(Error::InvalidReference {
                reference: self.to_string(),
                reason: "a local OCI layout (oci:DIR[:TAG]) is needed here; fetch registry and engine images first".into(),
            }),
        }
    }

    /// The repository the image is in, which is where deltas to it live and are looked up:
    /// `HOST[:PORT]/NAME` for a registry image, `oci:DIR` for a layout (every tag of a layout
    /// is one repository), `docker-daemon:NAME` for the container engine.
    pub fn repository(&self) -> String {
        match self {
            ImageRef::Layout { dir, .. } => format!("oci:{}", dir.display()),
            ImageRef::Registry(r) => r.repository_name(),
            ImageRef::Engine(e) => format!("docker-daemon:{}", e.name),
        }
    }

    /// Whether the image is reached over the network.
    pub fn is_remote(&self) -> bool {
        matches!(self, ImageRef::Registry(_))
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::Layout { dir, tag: Some(tag) } => write!(f, "oci:{}:{tag}", dir.display()),
            ImageRef::Layout { dir, tag: None } => write!(f, "oci:{}", dir.display()),
            ImageRef::Registry(r) => write!(f, "docker://{r}"),
            ImageRef::Engine(e) => write!(f, "docker-daemon:{e}"),
        }
    }
}

impl std::str::FromStr for ImageRef {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

/// Opens the layout an [`ImageRef`] names (`oci:` only) and loads its image.
pub fn load_image(reference: &ImageRef) -> Result<(Layout, Image)> {
    let (dir, tag) = reference.local()?;
    let layout = Layout::open(dir)?;
    let image = layout.load_image(tag)?;
    Ok((layout, image))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_layout_references() {
        let cases = [("oci:dir", "dir", None), ("oci:some/dir:v2", "some/dir", Some("v2")), ("oci:/abs/dir:1.0-rc_1", "/abs/dir", Some("1.0-rc_1"))];
        for (input, dir, tag) in cases {
            let r = ImageRef::parse(input).unwrap();
            assert_eq!(r, ImageRef::Layout { dir: dir.into(), tag: tag.map(String::from) }, "{input}");
            assert_eq!(r.to_string(), input);
        }
        assert_eq!(ImageRef::parse("oci:d").unwrap().tag_or_default(), "latest");
        let remote = ImageRef::parse("docker://127.0.0.1:5000/fleet/app:v2").unwrap();
        assert!(remote.is_remote());
        assert_eq!(remote.to_string(), "docker://127.0.0.1:5000/fleet/app:v2");
        assert_eq!(remote.tag_or_default(), "v2");
        let engine = ImageRef::parse("docker-daemon:app:v2").unwrap();
        assert_eq!(engine, ImageRef::Engine(EngineRef { name: "app".into(), tag: Some("v2".into()) }));
        assert_eq!((engine.to_string().as_str(), engine.tag_or_default(), engine.is_remote()), ("docker-daemon:app:v2", "v2", false));
        assert!(engine.local().is_err());
    }

    #[test]
    fn repositories_leave_out_tags_and_digests() {
        let pinned = format!("docker://127.0.0.1:5000/fleet/api:v2@{}", crate::digest::Digest::of(b"m"));
        for (reference, repository) in [
            ("docker://127.0.0.1:5000/fleet/api:v1", "127.0.0.1:5000/fleet/api"),
            (pinned.as_str(), "127.0.0.1:5000/fleet/api"),
            ("docker://127.0.0.1:5000/fleet/gpu", "127.0.0.1:5000/fleet/gpu"),
            ("docker://debian:bookworm", "docker.io/library/debian"),
            ("oci:/srv/images:v1", "oci:/srv/images"),
            ("docker-daemon:app:v2", "docker-daemon:app"),
        ] {
            assert_eq!(ImageRef::parse(reference).unwrap().repository(), repository, "{reference}");
        }
    }

    #[test]
    fn rejects_bad_references_with_a_reason() {
        for bad in ["dir", "oci:", "oci:dir:", "oci:dir:a/b", "ftp:x", "docker:host/repo", "docker://Host.io/Repo", "docker-daemon:", "docker-daemon:App"] {
            let err = ImageRef::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }
}
