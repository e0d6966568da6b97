//! Manifest and config parsing on arbitrary bytes, and joining the two into an image.
//!
//! The whole input is tried as a manifest and as a config. It is also split at its first NUL
//! byte into a manifest and a config (seeds use that shape); when both parse they are joined
//! as they are and, so that the layer checks are reached too, with the manifest's config
//! digest set to the config's.
#![no_main]

use fleetdelta::image::manifest::{Config, Image, Manifest, DOCKER_MANIFEST};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Manifest::parse(data.to_vec(), None);
    let _ = Manifest::parse(data.to_vec(), Some(DOCKER_MANIFEST));
    let _ = Config::parse(data.to_vec());

    let Some(split) = data.iter().position(|b| *b == 0) else { return };
    let (Ok(manifest), Ok(config)) = (Manifest::parse(data[..split].to_vec(), None), Config::parse(data[split + 1..].to_vec())) else { return };
    let _ = Image::new(manifest.clone(), config.clone());
    let mut manifest = manifest;
    manifest.config.digest = config.digest;
    if let Ok(image) = Image::new(manifest, config) {
        assert_eq!(image.layers.len(), image.config.diff_ids.len());
    }
});
