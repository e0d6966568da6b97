//! Reading and writing images: manifests and configs, OCI layouts. Where an image lives (a
//! layout, a registry, the container engine) is [`crate::reference`].

pub mod layout;
pub mod manifest;
pub mod platform;

pub use layout::{Layout, LayoutWriter};
pub use manifest::{BlobRef, Config, Image, Layer, Manifest};
pub use platform::{IndexEntry, Platform};

/// The tag used when a reference names none.
pub const DEFAULT_TAG: &str = "latest";
