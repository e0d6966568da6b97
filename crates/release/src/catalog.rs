//! What planning needs from the outside world: resolved images and the state of deltas.
//!
//! The registry client and the delta store implement [`ImageCatalog`]; planning itself does no
//! I/O, so tests use an in-memory catalog.

use fleetdelta_engine::digest::Digest;

/// One layer blob of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LayerBlob {
    /// The blob's digest (compressed, as the registry serves it).
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
}

/// An image reference resolved: its identity and its layers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedImage {
    /// The manifest digest: two references with the same digest are the same image.
    pub digest: Digest,
    /// The config digest, when known: two images with the same config have the same layer
    /// contents (the config lists their diff_ids), whatever their blobs' compression.
    pub config: Option<Digest>,
    /// Its layers, base first.
    pub layers: Vec<LayerBlob>,
}

impl ResolvedImage {
    /// Whether `other` is the same image: the same manifest, or the same config (the same
    /// content under recompressed blobs, which a device need not download nor restart for).
    pub fn same_content(&self, other: &ResolvedImage) -> bool {
        self.digest == other.digest || self.config.is_some_and(|c| other.config == Some(c))
    }

    /// What a full download of the image costs: the sum of its layer sizes.
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }

    /// What pulling this image costs on a device that holds `present`: the layers of this image
    /// that `present` does not have, with their total size.
    pub fn missing_from(&self, present: &ResolvedImage) -> (usize, u64) {
        let mut count = 0;
        let mut size = 0;
        for layer in &self.layers {
            if !present.layers.iter().any(|p| p.digest == layer.digest) {
                count += 1;
                size += layer.size;
            }
        }
        (count, size)
    }
}

/// A delta's source and target images, and where the delta lives. Deltas are unique per pair
/// and repository: whichever services need the same pair in one repository share one delta,
/// and a target image present in two repositories has a delta in each (a delta lives in, and
/// is looked up in, its target's repository, which is what a device pulling the target can
/// read).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImagePair {
    /// The image the device has.
    pub from: Digest,
    /// The image it moves to.
    pub to: Digest,
    /// The target's repository, as [`crate::image_repository`] names it
    /// (`HOST[:PORT]/NAME`, or `oci:DIR` for a layout).
    pub repository: String,
}

/// Where the delta of an image pair stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeltaStatus {
    /// No delta exists and none is being built.
    Absent,
    /// A delta is being built.
    Building,
    /// A delta is built and can be fetched.
    Ready {
        /// Where it is stored (an image reference).
        reference: String,
        /// What a device downloads to apply it, in bytes.
        size: u64,
    },
}

/// Resolves images and reports on deltas. Implemented by the registry client and delta store.
pub trait ImageCatalog {
    /// Resolves an image reference to its digest and layers.
    fn resolve(&self, reference: &str) -> fleetdelta_engine::Result<ResolvedImage>;

    /// The state of the delta between two images, in the target's repository
    /// ([`ImagePair::repository`]).
    fn delta_status(&self, pair: &ImagePair) -> fleetdelta_engine::Result<DeltaStatus>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(n: u8, size: u64) -> LayerBlob {
        LayerBlob { digest: Digest::from_bytes([n; 32]), size }
    }

    #[test]
    fn missing_layers_are_those_the_source_lacks() {
        let from = ResolvedImage { digest: Digest::of(b"a"), config: None, layers: vec![layer(1, 100), layer(2, 20)] };
        let to = ResolvedImage { digest: Digest::of(b"b"), config: None, layers: vec![layer(1, 100), layer(3, 7), layer(4, 5)] };
        assert_eq!(to.size(), 112);
        assert_eq!(to.missing_from(&from), (2, 12));
        assert_eq!(to.missing_from(&to), (0, 0));
    }

    #[test]
    fn the_same_config_is_the_same_content_and_unknown_configs_are_not() {
        let image = |manifest: &[u8], config: Option<&[u8]>| ResolvedImage { digest: Digest::of(manifest), config: config.map(Digest::of), layers: vec![] };
        assert!(image(b"m1", Some(b"c")).same_content(&image(b"m2", Some(b"c"))), "recompressed blobs");
        assert!(!image(b"m1", Some(b"c")).same_content(&image(b"m2", Some(b"d"))));
        assert!(!image(b"m1", None).same_content(&image(b"m2", None)), "unknown configs say nothing");
        assert!(!image(b"m1", Some(b"c")).same_content(&image(b"m2", None)));
        assert!(image(b"m1", None).same_content(&image(b"m1", Some(b"c"))), "the same manifest");
    }
}
