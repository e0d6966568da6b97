//! What can go wrong in the device agent itself (image, registry and release errors keep their
//! own variants of [`fleetdelta_engine::Error`]).

use std::path::PathBuf;

/// A failure of the device agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// Another agent runs on the same state directory.
    #[error("{}: another agent is running on this state directory", state.display())]
    Busy {
        /// The state directory.
        state: PathBuf,
    },
    /// A state directory that does not exist (or holds no agent state), given to a command
    /// that only reads it or speaks to its agent.
    #[error("{}: no agent state directory there", path.display())]
    NoStateDir {
        /// The directory given.
        path: PathBuf,
    },
    /// A state file (installed services, release request) that cannot be read.
    #[error("{}: {reason}", path.display())]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A journal record that cannot be read (other than a torn last line, which a power cut
    /// leaves and which is ignored).
    #[error("{}: line {line}: {reason}", path.display())]
    Journal {
        /// The journal file.
        path: PathBuf,
        /// The line, from 1.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A service instance that cannot be started or stopped.
    #[error("service {service}: {reason}")]
    Runtime {
        /// The service.
        service: String,
        /// What failed.
        reason: String,
    },
    /// The target release could not be fetched.
    #[error("target release {source_name}: {reason}")]
    Target {
        /// The file or URL.
        source_name: String,
        /// What failed.
        reason: String,
    },
    /// A request to the local API that failed or was refused.
    #[error("local API: {0}")]
    Api(String),
    /// An action (`restart`, `reboot`…) that gave up waiting for locks others hold.
    #[error("{action}: waited too long for the update lock of {}", services.join(", "))]
    Locked {
        /// The action.
        action: String,
        /// The services whose locks are held.
        services: Vec<String>,
    },
    /// An action on a service the device does not run.
    #[error("unknown service {service:?} (the device runs: {known})")]
    UnknownService {
        /// The service named.
        service: String,
        /// The services it runs, comma-separated.
        known: String,
    },
    /// An action that failed once its locks were held (the reboot command failed, say).
    #[error("{action}: {reason}")]
    Action {
        /// The action.
        action: String,
        /// What failed.
        reason: String,
    },
    /// An image, registry, container engine or file system failure (the engine's error).
    #[error(transparent)]
    Engine(#[from] fleetdelta_engine::Error),
    /// A release file, device facts file or contract check that failed.
    #[error(transparent)]
    Release(#[from] fleetdelta_release::ReleaseError),
}

/// Result with [`AgentError`].
pub type Result<T, E = AgentError> = std::result::Result<T, E>;

impl AgentError {
    /// The engine's error this one is, if it is one.
    pub fn as_engine(&self) -> Option<&fleetdelta_engine::Error> {
        match self {
            AgentError::Engine(e) => Some(e),
            _ => None,
        }
    }

    /// The release model's error this one is, if it is one.
    pub fn as_release(&self) -> Option<&fleetdelta_release::ReleaseError> {
        match self {
            AgentError::Release(e) => Some(e),
            _ => None,
        }
    }
}
