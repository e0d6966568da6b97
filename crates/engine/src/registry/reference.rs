//! Registry image references: `HOST[:PORT]/REPO[:TAG][@DIGEST]`, as in `docker://` references.
//!
//! The grammar is the distribution project's (`reference/regexp.go`): lower-case path
//! components joined by `.`, `_`, `__` or dashes, a tag of at most 128 word characters, dots
//! and dashes, and a sha256 digest. As in docker and skopeo, a first component that has no
//! `.` or `:` and is not `localhost` names a repository on Docker Hub.

use std::fmt;

use crate::digest::Digest;
use crate::error::{Error, Result};

/// The registry that references without a host name point at.
pub const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's registry API is served.
const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// Longest repository name the distribution registry accepts.
const MAX_NAME_LEN: usize = 255;
/// Longest tag.
const MAX_TAG_LEN: usize = 128;

/// An image in a registry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RegistryRef {
    /// `HOST[:PORT]`, as written (Docker Hub as [`DOCKER_HUB`]).
    pub registry: String,
    /// Repository path, e.g. `library/debian` or `fleet/app`.
    pub repository: String,
    /// The tag, if one was given.
    pub tag: Option<String>,
    /// The digest, if one was given; it wins over the tag.
    pub digest: Option<Digest>,
}

impl RegistryRef {
    /// Parses `HOST[:PORT]/REPO[:TAG][@DIGEST]` (what follows `docker://`).
    pub fn parse(text: &str) -> Result<Self> {
        let invalid = |reason: &str| Error::InvalidReference { reference: format!("docker://{text}"), reason: reason.to_string() };
        let (name_tag, digest) = match text.split_once('@') {
            Some((n, d)) => (n, Some(d.parse::<Digest>().map_err(|_| invalid("the digest must be sha256: and 64 lower-case hex digits"))?)),
            None => (text, None),
        };
        // A tag follows the last ':' that comes after the last '/' (a ':' before it is a port).
        let last_slash = name_tag.rfind('/').unwrap_or(0);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => (&name_tag[..last_slash + i], Some(&name_tag[last_slash + i + 1..])),
            None => (name_tag, None),
        };
        if tag.is_some_and(|t| !is_valid_tag(t)) {
            return Err(invalid("a tag is 1 to 128 letters, digits, '_', '.' or '-', not starting with '.' or '-'"));
        }
        let (registry, repository) = match name.split_once('/') {
            Some((host, rest)) if host.contains('.') || host.contains(':') || host == "localhost" => (host.to_string(), rest.to_string()),
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        if registry.is_empty() || registry.chars().any(|c| !(c.is_ascii_alphanumeric() || ".-:[]".contains(c))) {
            return Err(invalid("the registry must be HOST[:PORT]"));
        }
        let repository = if registry == DOCKER_HUB && !repository.contains('/') { format!("library/{repository}") } else { repository };
        if repository.is_empty() || repository.len() > MAX_NAME_LEN || !repository.split('/').all(valid_component) {
            return Err(invalid(
                "the repository must be lower-case components of letters and digits separated by '/', joined within by '.', '_', '__' or dashes",
            ));
        }
        Ok(RegistryRef { registry, repository, tag: tag.map(str::to_string), digest })
    }

    /// What the manifest endpoint is asked for: the digest if known, else the tag, else `latest`.
    pub fn reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => crate::image::DEFAULT_TAG.to_string(),
        }
    }

    /// The host (and port) the registry API is served from.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// The repository, `HOST[:PORT]/NAME`: where the image's deltas live and are looked up.
    pub fn repository_name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// Whether `other` is in the same repository (same registry and name).
    pub fn same_repository(&self, other: &RegistryRef) -> bool {
        self.registry == other.registry && self.repository == other.repository
    }

    /// The same repository with another tag (and no digest).
    pub fn with_tag(&self, tag: &str) -> Self {
        RegistryRef { tag: Some(tag.to_string()), digest: None, ..self.clone() }
    }

    /// The same repository pinned to a digest (the tag is kept for display).
    pub fn with_digest(&self, digest: Digest) -> Self {
        RegistryRef { digest: Some(digest), ..self.clone() }
    }

    /// The same image without its tag (a digest names it alone).
    pub fn without_tag(&self) -> Self {
        RegistryRef { tag: None, ..self.clone() }
    }

    /// The image `digest` of the same repository, named by its digest alone: a tag kept from
    /// another image would make it read as that one.
    pub fn by_digest(&self, digest: Digest) -> Self {
        RegistryRef { tag: None, digest: Some(digest), ..self.clone() }
    }
}

/// Whether `tag` is a tag as the distribution spec defines it: 1 to 128 letters, digits, `_`,
/// `.` or `-`, not starting with `.` or `-` (so never a path, whatever a registry lists).
pub(crate) fn is_valid_tag(tag: &str) -> bool {
    let mut chars = tag.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && tag.len() <= MAX_TAG_LEN
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

fn valid_component(c: &str) -> bool {
    let bytes = c.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        // Separators: '.', '_', '__' or a run of '-', each between alphanumerics.
        let start = i;
        match bytes[i] {
            b'.' => i += 1,
            b'_' => i += if bytes.get(i + 1) == Some(&b'_') { 2 } else { 1 },
            b'-' => {
                while bytes.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
        if start == 0 || !bytes.get(i).is_some_and(|&b| alnum(b)) {
            return false;
        }
    }
    true
}

impl fmt::Display for RegistryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[test]
    fn parses_registry_references() {
        let cases: [(&str, &str, &str, Option<&str>, bool); 7] = [
            ("127.0.0.1:5000/app:v1", "127.0.0.1:5000", "app", Some("v1"), false),
            ("localhost/fleet/app", "localhost", "fleet/app", None, false),
            ("registry.example.com/a/b/c:1.0-rc_1", "registry.example.com", "a/b/c", Some("1.0-rc_1"), false),
            ("debian:bookworm", DOCKER_HUB, "library/debian", Some("bookworm"), false),
            ("balena/open-balena-api", DOCKER_HUB, "balena/open-balena-api", None, false),
            ("host:5000/app@sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824", "host:5000", "app", None, true),
            (
                "host:5000/my__app.x--y:v2@sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
                "host:5000",
                "my__app.x--y",
                Some("v2"),
                true,
            ),
        ];
        for (text, registry, repository, tag, has_digest) in cases {
            let r = RegistryRef::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!((r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()), (registry, repository, tag), "{text}");
            assert_eq!(r.digest.is_some(), has_digest, "{text}");
            if has_digest {
                assert_eq!(r.reference(), D);
            }
        }
        assert_eq!(RegistryRef::parse("localhost/app").unwrap().reference(), "latest");
        assert_eq!(RegistryRef::parse("debian").unwrap().api_host(), "registry-1.docker.io");
        assert_eq!(RegistryRef::parse("h:1/a/b:t").unwrap().to_string(), "h:1/a/b:t");
    }

    #[test]
    fn rejects_malformed_references() {
        for bad in [
            "",
            "host:5000/",
            "host:5000/App",
            "host:5000/a//b",
            "host:5000/-a",
            "host:5000/a-",
            "host:5000/a..b",
            "host:5000/a___b",
            "host:5000/a:",
            "host:5000/a:-x",
            "host:5000/a:x/y",
            "host:5000/a@sha256:abc",
            "host:5000/a@md5:00",
            "ho st/a",
            "host:5000/a b",
        ] {
            let err = RegistryRef::parse(bad).expect_err(bad).to_string();
            assert!(err.contains("invalid image reference"), "{bad}: {err}");
        }
        let long_tag = format!("h.io/a:{}", "t".repeat(129));
        assert!(RegistryRef::parse(&long_tag).is_err());
    }
}
