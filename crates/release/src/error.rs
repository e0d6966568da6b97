//! The error type of the release module: every failure names the file, service and field it
//! concerns, or the release and requirements a device does not meet.

use std::fmt;

use super::requirements::Unmet;

/// Everything that can go wrong while reading release and facts files or planning a transition.
///
/// The device agent's and the release updates' errors wrap it whole; the engine's error knows nothing of it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReleaseError {
    /// A file that could not be read.
    #[error("{file}: {source}")]
    Read {
        /// The file.
        file: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file larger than [`MAX_FILE_BYTES`](super::MAX_FILE_BYTES).
    #[error("{file}: larger than the limit of {limit} bytes")]
    TooLarge {
        /// The file.
        file: String,
        /// The limit in bytes.
        limit: u64,
    },
    /// A file that is not YAML, or whose structure does not follow the format (unknown or
    /// missing keys, wrong types, duplicate keys). The reason names the field path and line.
    #[error("{file}: {reason}")]
    Syntax {
        /// The file (or the name given to the text parsed).
        file: String,
        /// What is wrong, as `path.to.field: message at line L column C`.
        reason: String,
    },
    /// A field whose value is well-formed YAML but not valid (a bad service name, an empty image
    /// reference, an unknown requirement type, an unparsable version range, ...).
    #[error("{file}: {field}: {reason}")]
    Invalid {
        /// The file (or the name given to the text parsed).
        file: String,
        /// The service concerned, if any.
        service: Option<String>,
        /// Where in the file, as a path: `services.gpu.contract.requires[0].version`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The device does not meet the contracts of non-optional services of the target release:
    /// the whole release is rejected for it.
    #[error("{}", RejectionMessage { release, services })]
    Rejected {
        /// The release rejected.
        release: String,
        /// Every non-optional service whose contract is unmet, with all unmet requirements.
        services: Vec<UnmetContract>,
    },
    /// The image catalog (registry, delta store) failed to answer.
    #[error("{what}: {source}")]
    Catalog {
        /// What was asked (which image reference or image pair).
        what: String,
        /// The catalog's error.
        #[source]
        source: Box<fleetdelta_engine::Error>,
    },
}

/// A service whose contract the device does not meet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnmetContract {
    /// The service.
    pub service: String,
    /// The contract's slug.
    pub contract: String,
    /// Every requirement the device fails, in the order the contract lists them.
    pub unmet: Vec<Unmet>,
}

impl fmt::Display for UnmetContract {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "service {:?} (contract {:?}): ", self.service, self.contract)?;
        for (i, unmet) in self.unmet.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{unmet}")?;
        }
        Ok(())
    }
}

struct RejectionMessage<'a> {
    release: &'a str,
    services: &'a [UnmetContract],
}

impl fmt::Display for RejectionMessage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "release {:?} is rejected for this device: ", self.release)?;
        for (i, service) in self.services.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{service}")?;
        }
        Ok(())
    }
}

impl ReleaseError {
    pub(crate) fn invalid(file: &str, service: Option<&str>, field: impl Into<String>, reason: impl Into<String>) -> Self {
        ReleaseError::Invalid { file: file.to_string(), service: service.map(str::to_string), field: field.into(), reason: reason.into() }
    }

    pub(crate) fn catalog(what: impl Into<String>, source: fleetdelta_engine::Error) -> Self {
        ReleaseError::Catalog { what: what.into(), source: Box::new(source) }
    }
}
