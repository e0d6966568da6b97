#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod agent;
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
pub mod package;
pub mod progress;
pub mod pull;
pub mod registry;
pub mod release;
pub mod release_update;
pub mod service;
pub mod transfer;

pub use apply::{apply, ApplyOptions, ApplyReport, LayerOutput};
pub use diff::{diff, DiffOptions, DiffReport, Level};
pub use digest::Digest;
pub use error::{Error, Result};
pub use image::ImageRef;
pub use info::{info, DeltaInfo};
pub use progress::{Progress, Silent};
pub use pull::{pull, PullOptions, PullReport};
pub use registry::{ClientOptions, RegistryRef};
pub use transfer::Transfer;
