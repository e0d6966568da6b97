//! The container engine's image store as a transport (`docker-daemon:NAME[:TAG]`, skopeo's
//! syntax), through the Docker Engine API that Docker and balena-engine speak.
//!
//! - [`client`] talks to the engine (bollard): inspect, export, load, tag.
//! - [`archive`] converts between docker-archive tars (what the engine exports and loads) and
//!   OCI layouts, streaming and verifying every digest.
//!
//! Reading exports the image into a layout with uncompressed layers (the engine keeps no
//! compressed blobs: each layer's blob digest is its diff_id) and the config byte for byte.
//! Writing loads an untagged archive, checks that the engine now holds an image whose ID is
//! the config digest with the expected layers, and only then tags it: an interrupted or
//! refused write leaves every tag as it was.

pub mod archive;
pub mod client;
pub mod containers;

use std::fmt;

use crate::error::{Error, Result};
use crate::image::DEFAULT_TAG;

pub use client::{Engine, LoadReport};
pub use containers::{ContainerSpec, ContainerState, Health, LogLimit};

/// Where the engine is reached when neither `--engine` nor `$DOCKER_HOST` says.
pub const DEFAULT_ENGINE_HOST: &str = "unix:///var/run/docker.sock";

/// The longest repository name or tag accepted (the engine's own limits are lower).
const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// `NAME[:TAG]` of an image in the engine's store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineRef {
    /// The repository name as the engine knows it (`app`, `registry.io:5000/fleet/app`).
    pub name: String,
    /// The tag, if one was given.
    pub tag: Option<String>,
}

impl EngineRef {
    /// Parses `NAME[:TAG]`. The tag is what follows the last `:` when no `/` follows it, so
    /// that a registry port (`host:5000/app`) stays part of the name.
    pub fn parse(reference: &str) -> Result<Self> {
        let invalid = |reason: &str| Error::InvalidReference { reference: format!("docker-daemon:{reference}"), reason: reason.to_string() };
        let (name, tag) = match reference.rsplit_once(':') {
            Some((name, tag)) if !tag.contains('/') => (name, Some(tag)),
            _ => (reference, None),
        };
        // The engine's grammar, loosely: lower-case path components of [a-z0-9._-], and a
        // host part that may carry a port. Digests (`@sha256:`) are not image names here.
        let parts: Vec<&str> = name.split('/').collect();
        let component_ok = |part: &str| !part.is_empty() && part.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
        let host_ok = |part: &str| match part.split_once(':') {
            Some((host, port)) => component_ok(host) && !port.is_empty() && port.chars().all(|c| c.is_ascii_digit()),
            None => component_ok(part),
        };
        let name_ok =
            name.len() <= MAX_NAME_LEN && parts.iter().enumerate().all(|(i, part)| if i == 0 && parts.len() > 1 { host_ok(part) } else { component_ok(part) });
        if !name_ok {
            return Err(invalid("expected docker-daemon:NAME[:TAG], NAME in lower-case letters, digits and ._-/ (a host may carry a :PORT)"));
        }
        if let Some(tag) = tag {
            let tag_ok = !tag.is_empty()
                && tag.len() <= MAX_TAG_LEN
                && !tag.starts_with(['.', '-'])
                && tag.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
            if !tag_ok {
                return Err(invalid("a tag is 1 to 128 letters, digits and ._- not starting with . or -"));
            }
        }
        Ok(EngineRef { name: name.to_string(), tag: tag.map(str::to_string) })
    }

    /// The tag, or [`DEFAULT_TAG`].
    pub fn tag_or_default(&self) -> &str {
        self.tag.as_deref().unwrap_or(DEFAULT_TAG)
    }

    /// `NAME:TAG` as the engine's API takes it.
    pub fn api_name(&self) -> String {
        format!("{}:{}", self.name, self.tag_or_default())
    }
}

impl fmt::Display for EngineRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.tag {
            Some(tag) => write!(f, "{}:{tag}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_tags_and_ports() {
        let cases = [
            ("app", "app", None),
            ("app:v2", "app", Some("v2")),
            ("fleet/app:1.0-rc_1", "fleet/app", Some("1.0-rc_1")),
            ("localhost:5000/app", "localhost:5000/app", None),
            ("localhost:5000/app:v1", "localhost:5000/app", Some("v1")),
        ];
        for (input, name, tag) in cases {
            let r = EngineRef::parse(input).unwrap();
            assert_eq!(r, EngineRef { name: name.into(), tag: tag.map(String::from) }, "{input}");
            assert_eq!(r.to_string(), input);
        }
        assert_eq!(EngineRef::parse("app").unwrap().api_name(), "app:latest");
    }

    #[test]
    fn rejects_bad_names_with_a_reason() {
        for bad in ["", "App", "app:", "app:-x", "a//b", "app:v/1", "app@sha256:00", "app:v 1"] {
            let err = EngineRef::parse(bad).unwrap_err().to_string();
            assert!(err.contains("docker-daemon:"), "{bad}: {err}");
        }
    }
}
