//! Reading and writing images: references, manifests and configs, OCI layouts.

pub mod layout;
pub mod manifest;
pub mod reference;

pub use layout::{load_image, Layout, LayoutWriter};
pub use manifest::{BlobRef, Config, Image, Layer, Manifest};
pub use reference::ImageRef;
