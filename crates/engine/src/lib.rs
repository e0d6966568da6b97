//! The delta engine of fleetdelta: OCI images (layouts, registries, a container engine's
//! image store), the delta format, and the two halves of the pipeline:
//!
//! - [`diff`](mod@diff): read both images → expand members (gzip, zip) → pair layers → plan → encode
//!   → package the delta as an OCI image;
//! - [`apply`](mod@apply): open and verify the delta → read the source → rebuild every layer → verify
//!   every digest → commit.
//! - [`platforms`]: multi-platform images, a delta per platform gathered in a delta index, and
//!   the applier's choice of the entry for its source's platform.
//! - [`retention`]: which deltas of a repository no kept image needs, deleted (`fleetdelta gc`).
//!
//! This crate depends on no other crate of the workspace: the release model, the builder
//! service and the device agent are built on it.
#![deny(missing_docs)]

pub mod apply;
pub mod delta_store;
pub mod diff;
pub mod digest;
pub mod engine;
pub mod error;
pub mod format;
pub mod image;
pub mod info;
pub mod layer;
pub mod locked_dir;
pub mod package;
pub mod platforms;
pub mod progress;
pub mod reference;
pub mod registry;
pub mod retention;
#[cfg(test)]
mod test_bytes;
pub mod transfer;

pub use apply::{apply, ApplyOptions, ApplyReport, LayerOutput};
pub use diff::{diff, DiffOptions, DiffReport, Level};
pub use digest::Digest;
pub use error::{Error, Result};
pub use info::{info, DeltaInfo};
pub use progress::{Progress, Silent};
pub use reference::ImageRef;
pub use registry::{ClientOptions, RegistryRef};
pub use transfer::Transfer;
