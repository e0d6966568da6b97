//! The one error type of the library: every failure names what it concerns.

use crate::digest::Digest;

/// Everything that can go wrong while reading images, computing deltas or applying them.
///
/// Variants carry the name of the object they concern (a blob, a layer, a file) so that the
/// message alone tells an operator what is wrong; callers can match on the variant.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O failure, with what we were doing.
    #[error("{context}: {source}")]
    Io {
        /// What was being done (e.g. "reading blobs/sha256/ab..").
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An image reference that cannot be parsed or is not supported.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// Why it is invalid.
        reason: String,
    },
    /// Content whose SHA-256 is not the one it should have.
    #[error("{what}: digest mismatch: expected {expected}, found {found}")]
    DigestMismatch {
        /// The object checked.
        what: String,
        /// The digest it should have.
        expected: Digest,
        /// The digest it has.
        found: Digest,
    },
    /// Content whose length is not the one declared for it.
    #[error("{what}: size mismatch: expected {expected} bytes, found {found}")]
    SizeMismatch {
        /// The object checked.
        what: String,
        /// The declared size.
        expected: u64,
        /// The actual size.
        found: u64,
    },
    /// Input that does not follow its format (JSON, tar, delta records).
    #[error("{what}: malformed: {reason}")]
    Malformed {
        /// The object parsed.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Valid input that this build does not handle.
    #[error("{what}: unsupported: {reason}")]
    Unsupported {
        /// The object concerned.
        what: String,
        /// What is not supported.
        reason: String,
    },
    /// Input larger than a configured or format limit (decompression bombs, huge declared sizes).
    #[error("{what}: larger than the limit of {limit} bytes")]
    TooLarge {
        /// The object concerned.
        what: String,
        /// The limit in bytes.
        limit: u64,
    },
    /// A delta written in a format version this build does not know.
    #[error("delta format version {found} is not supported (this build reads versions {oldest} to {supported})")]
    UnsupportedFormatVersion {
        /// The version found in the delta.
        found: String,
        /// The oldest version this build reads.
        oldest: u32,
        /// The newest version this build reads.
        supported: u32,
    },
    /// The source image given to the applier is not the one the delta was made against.
    #[error("the source image is not the one this delta was made against: {reason}")]
    WrongSource {
        /// How the source differs.
        reason: String,
    },
    /// A tag or object that does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A registry answered with an error status.
    #[error("{what}: registry answered {status}: {message}")]
    Registry {
        /// The request, e.g. "GET manifest 127.0.0.1:5000/app:v1".
        what: String,
        /// The HTTP status code.
        status: u16,
        /// The registry's error codes and messages, or the start of its answer.
        message: String,
    },
    /// A registry refused access: no credentials, or credentials it does not accept.
    #[error("{registry}: unauthorized: {reason}")]
    Unauthorized {
        /// `HOST[:PORT]` of the registry.
        registry: String,
        /// What was missing or refused.
        reason: String,
    },
    /// The network failed (connection refused or cut, timeout) and retries did not help.
    #[error("{what}: {reason}")]
    Network {
        /// The request.
        what: String,
        /// The last failure, with how many attempts were made.
        reason: String,
    },
    /// The builder service answered with an error, or could not be reached.
    #[error("builder service {url}: {reason}")]
    Service {
        /// The service's URL.
        url: String,
        /// What went wrong, with the service's own reason when it gave one.
        reason: String,
    },
    /// The container engine (Docker Engine API) refused a request, failed or could not be reached.
    #[error("container engine {engine}: {what}: {reason}")]
    Engine {
        /// Where the engine was reached (`unix:///var/run/docker.sock`).
        engine: String,
        /// The request, e.g. "loading app:v2".
        what: String,
        /// The engine's message, or why it could not be reached.
        reason: String,
    },
    /// A broken invariant of this build: a bug, never caused by input. Reported as such.
    #[error("internal error (a bug in fleetdelta, please report it): {0}")]
    Internal(String),
    /// A path in a tar archive that would escape the extraction root.
    #[error("{what}: unsafe path {path:?} (absolute or containing '..')")]
    UnsafePath {
        /// The archive concerned.
        what: String,
        /// The offending path.
        path: String,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::Malformed`].
    pub fn malformed(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Malformed { what: what.into(), reason: reason.into() }
    }

    /// Shorthand for [`Error::Unsupported`].
    pub fn unsupported(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Unsupported { what: what.into(), reason: reason.into() }
    }

    /// Wraps an I/O error; errors produced by our own bounded readers are unwrapped back
    /// into the [`Error`] they carry.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        match source.downcast::<Error>() {
            Ok(inner) => inner,
            Err(source) => Error::Io { context: context.into(), source },
        }
    }

    /// Turns this error into an [`std::io::Error`] that [`Error::io`] unwraps again, so that
    /// errors raised inside `Read`/`Write` implementations keep their variant.
    pub fn into_io(self) -> std::io::Error {
        std::io::Error::other(self)
    }
}

/// Adds context to `std::io::Result`s.
pub trait IoContext<T> {
    /// Converts the I/O error into [`Error::Io`] with the given context.
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_raised_inside_readers_keep_their_variant() {
        let inner = Error::TooLarge { what: "layer 1".into(), limit: 10 };
        assert!(matches!(Error::io("reading", inner.into_io()), Error::TooLarge { limit: 10, .. }));
        let plain = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        assert!(matches!(Error::io("opening x", plain), Error::Io { .. }));
    }
}
