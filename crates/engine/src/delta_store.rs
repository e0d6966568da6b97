//! Where deltas are kept and found: one delta per (source config, target manifest) pair.
//!
//! - [`DeltaStore::TargetRepository`]: beside the target image in its registry repository,
//!   listed among the target's referrers (`subject`), the way devices look for them (see
//!   `docs/registry.md`), and tagged [`delta_tag`] for people.
//! - [`DeltaStore::Layout`]: in a local OCI layout, tagged [`delta_tag`]; for images that live
//!   in layouts, and for tests.
//!
//! A delta found is always checked against its annotations (format version, source config,
//! target manifest), so a tag that points at something else is never taken for it. A build
//! in progress holds an exclusive lock file per pair, which is what "preparing" means to
//! other processes on the machine.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use crate::format::{reads_version, ANNOTATION_SOURCE_CONFIG, ANNOTATION_TARGET_MANIFEST, ANNOTATION_VERSION};
use crate::image::manifest::{Manifest, MAX_JSON_BYTES};
use crate::image::Layout;
use crate::package::delta_download_bytes;
use crate::reference::ImageRef;
use crate::registry::{Client, RegistryRef};
use crate::transfer::Transfer;

/// What identifies a delta: the source image's config and the target image's manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeltaKey {
    /// Config digest of the image the device has.
    pub source_config: Digest,
    /// Manifest digest of the image it needs.
    pub target_manifest: Digest,
}

/// The tag a delta is stored under: `delta-` and 32 hex digits of each digest (tags are at
/// most 128 characters; the annotations carry the full digests and are checked).
pub fn delta_tag(key: &DeltaKey) -> String {
    format!("delta-{}-{}", &key.source_config.hex()[..32], &key.target_manifest.hex()[..32])
}

/// A delta found in a store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredDelta {
    /// Where it is (pinned by digest for registries).
    pub reference: ImageRef,
    /// Its manifest digest.
    pub manifest: Digest,
    /// What downloading it costs: manifest, config and layers, in bytes.
    pub download: u64,
}

/// Where deltas are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeltaStore {
    /// In the target image's registry repository.
    TargetRepository,
    /// In this local OCI layout.
    Layout(PathBuf),
}

impl DeltaStore {
    /// The store a reference names: `oci:DIR` is a layout store; anything else (`target`)
    /// means beside the targets in their repositories.
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "target" => Ok(DeltaStore::TargetRepository),
            _ => match ImageRef::parse(text)? {
                ImageRef::Layout { dir, tag: None } => Ok(DeltaStore::Layout(dir)),
                other => Err(Error::InvalidReference { reference: other.to_string(), reason: "a delta store is `target` or oci:DIR (without a tag)".into() }),
            },
        }
    }

    /// Where the delta for `key` goes, for a target image at `target`.
    pub fn location(&self, key: &DeltaKey, target: &ImageRef) -> Result<ImageRef> {
        let tag = delta_tag(key);
        match (self, target) {
            (DeltaStore::Layout(dir), _) => Ok(ImageRef::Layout { dir: dir.clone(), tag: Some(tag) }),
            (DeltaStore::TargetRepository, ImageRef::Registry(r)) => Ok(ImageRef::Registry(r.with_tag(&tag))),
            (DeltaStore::TargetRepository, other) => Err(Error::InvalidReference {
                reference: other.to_string(),
                reason: "deltas go beside their target in its registry repository; for images in layouts, name a delta store (oci:DIR)".into(),
            }),
        }
    }

    /// Looks for the delta of `key`, for a target image at `target`.
    pub fn find(&self, transfer: &Transfer, key: &DeltaKey, target: &ImageRef) -> Result<Option<StoredDelta>> {
        match (self, target) {
            (DeltaStore::Layout(dir), _) => find_in_layout(dir, key),
            (DeltaStore::TargetRepository, ImageRef::Registry(r)) => transfer.block_on(find_in_repository(transfer.client(), r, key)),
            (DeltaStore::TargetRepository, other) => Err(Error::InvalidReference {
                reference: other.to_string(),
                reason: "a layout image has no registry repository to hold its deltas; name a delta store (oci:DIR)".into(),
            }),
        }
    }

    fn locks_dir(&self) -> PathBuf {
        match self {
            DeltaStore::Layout(dir) => {
                let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "deltas".into());
                dir.with_file_name(format!(".{name}.building"))
            }
            DeltaStore::TargetRepository => {
                let cache = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")));
                cache.unwrap_or_else(std::env::temp_dir).join("fleetdelta").join("building")
            }
        }
    }

    /// The lock of the delta of `key` for the target at `target`: one per pair in a layout
    /// store (it holds one delta per pair), one per pair and repository beside the targets
    /// (a target in two repositories has a delta in each).
    fn lock_path(&self, key: &DeltaKey, target: &ImageRef) -> PathBuf {
        let pair = format!("{}-{}", key.source_config.hex(), key.target_manifest.hex());
        let name = match self {
            DeltaStore::Layout(_) => format!("{pair}.lock"),
            DeltaStore::TargetRepository => format!("{pair}-{}.lock", &Digest::of(target.repository().as_bytes()).hex()[..REPOSITORY_HASH_HEX]),
        };
        self.locks_dir().join(name)
    }

    /// Takes the build lock of the delta of `key` for the target at `target`; `None` when
    /// another process holds it (a build is in progress). The lock is released when the
    /// returned file is dropped, or when its process dies, however it dies.
    pub fn lock_build(&self, key: &DeltaKey, target: &ImageRef) -> Result<Option<File>> {
        let path = self.lock_path(key, target);
        let dir = self.locks_dir();
        fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let file = File::options().create(true).truncate(false).write(true).open(&path).ctx(|| format!("opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(Error::io(format!("locking {}", path.display()), e)),
        }
    }

    /// Whether a build of the delta of `key` for the target at `target` is in progress (its
    /// lock is held).
    pub fn is_building(&self, key: &DeltaKey, target: &ImageRef) -> Result<bool> {
        let path = self.lock_path(key, target);
        let Ok(file) = File::open(&path) else { return Ok(false) };
        match file.try_lock_shared() {
            Ok(()) => Ok(false),
            Err(fs::TryLockError::WouldBlock) => Ok(true),
            Err(fs::TryLockError::Error(e)) => Err(Error::io(format!("locking {}", path.display()), e)),
        }
    }
}

/// Hex digits of the repository's digest in a build lock's name (64 bits: collisions between
/// a builder's repositories are not a concern, and a collision only serializes two builds).
const REPOSITORY_HASH_HEX: usize = 16;

/// Whether a delta manifest's annotations say it is a delta from `key`'s source, in a format
/// we read, and not for another target (format 1 names the target in an annotation, format 2
/// only in the `subject`, which a referrers listing implies and `subject_matches` checks).
pub fn annotations_match(annotations: &std::collections::BTreeMap<String, String>, key: &DeltaKey) -> bool {
    annotations.get(ANNOTATION_VERSION).and_then(|v| v.parse().ok()).is_some_and(reads_version)
        && annotations.get(ANNOTATION_SOURCE_CONFIG) == Some(&key.source_config.to_string())
        && annotations.get(ANNOTATION_TARGET_MANIFEST).is_none_or(|t| *t == key.target_manifest.to_string())
}

/// Whether a delta manifest's `subject` is `key`'s target.
fn subject_matches(manifest: &Manifest, key: &DeltaKey) -> bool {
    manifest.subject.as_ref().is_some_and(|s| s.digest == key.target_manifest)
}

/// Looks for the delta of `key` in the layout `dir` (tagged [`delta_tag`], annotations checked).
pub fn find_in_layout(dir: &Path, key: &DeltaKey) -> Result<Option<StoredDelta>> {
    let layout = match Layout::open(dir) {
        Ok(l) => l,
        Err(Error::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let tag = delta_tag(key);
    let manifest_ref = match layout.resolve(Some(&tag)) {
        Ok(m) => m,
        Err(Error::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let manifest = Manifest::parse(layout.read_blob(&manifest_ref, MAX_JSON_BYTES)?, Some(&manifest_ref.media_type))?;
    if !annotations_match(&manifest.annotations, key) || !subject_matches(&manifest, key) {
        return Ok(None);
    }
    let image = layout.load_image(Some(&tag))?;
    Ok(Some(StoredDelta {
        reference: ImageRef::Layout { dir: dir.to_path_buf(), tag: Some(tag) },
        manifest: manifest_ref.digest,
        download: delta_download_bytes(&image),
    }))
}

/// The cheapest delta for `key` among the referrers of the target manifest in `target`'s
/// repository.
pub async fn find_in_repository(client: &Client, target: &RegistryRef, key: &DeltaKey) -> Result<Option<StoredDelta>> {
    let referrers = client.referrers(target, &key.target_manifest).await?;
    let mut best: Option<StoredDelta> = None;
    for r in referrers.into_iter().filter(|r| annotations_match(&r.annotations, key)) {
        let pinned = target.by_digest(r.digest);
        let fetched = client.get_image_manifest(&pinned).await?;
        let manifest = Manifest::parse(fetched.raw.clone(), Some(&fetched.media_type))?;
        let download = fetched.raw.len() as u64 + manifest.config.size + manifest.layers.iter().map(|l| l.size).sum::<u64>();
        if best.as_ref().is_none_or(|b| download < b.download) {
            best = Some(StoredDelta { reference: ImageRef::Registry(pinned), manifest: fetched.digest, download });
        }
    }
    Ok(best)
}

/// The delta of `key` under its tag [`delta_tag`] in `target`'s repository, annotations
/// checked. Finds a delta whose referrers entry was lost (a pusher that lost the race on the
/// referrers fallback tag, or one stopped between pushing the manifest and listing it).
pub async fn find_by_tag(client: &Client, target: &RegistryRef, key: &DeltaKey) -> Result<Option<StoredDelta>> {
    let tagged = target.with_tag(&delta_tag(key));
    let fetched = match client.get_image_manifest(&tagged).await {
        Ok(m) => m,
        Err(Error::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let manifest = Manifest::parse(fetched.raw.clone(), Some(&fetched.media_type))?;
    if !annotations_match(&manifest.annotations, key) || !subject_matches(&manifest, key) {
        return Ok(None);
    }
    let download = fetched.raw.len() as u64 + manifest.config.size + manifest.layers.iter().map(|l| l.size).sum::<u64>();
    Ok(Some(StoredDelta { reference: ImageRef::Registry(target.by_digest(fetched.digest)), manifest: fetched.digest, download }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_fit_and_stores_parse() {
        let key = DeltaKey { source_config: Digest::of(b"a"), target_manifest: Digest::of(b"b") };
        let tag = delta_tag(&key);
        assert_eq!(tag.len(), 6 + 32 + 1 + 32);
        assert!(tag.starts_with("delta-ca978112ca1bbdcafac231b39a23dc4d-3e23e8160039594a33894f6564e1b134"), "{tag}");
        assert_eq!(DeltaStore::parse("target").unwrap(), DeltaStore::TargetRepository);
        assert_eq!(DeltaStore::parse("oci:/srv/deltas").unwrap(), DeltaStore::Layout("/srv/deltas".into()));
        assert!(DeltaStore::parse("oci:/srv/deltas:tag").is_err());
    }

    #[test]
    fn build_locks_exclude_each_other_and_report_building() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeltaStore::Layout(dir.path().join("deltas"));
        let key = DeltaKey { source_config: Digest::of(b"a"), target_manifest: Digest::of(b"b") };
        let target = ImageRef::parse("oci:/srv/images:v2").unwrap();
        assert!(!store.is_building(&key, &target).unwrap());
        let held = store.lock_build(&key, &target).unwrap().expect("free");
        assert!(store.is_building(&key, &target).unwrap());
        assert!(store.lock_build(&key, &target).unwrap().is_none(), "a second builder must not take it");
        drop(held);
        assert!(!store.is_building(&key, &target).unwrap());
        assert!(store.lock_build(&key, &target).unwrap().is_some());
    }

    #[test]
    fn beside_the_targets_each_repository_has_its_own_lock() {
        let store = DeltaStore::TargetRepository;
        let key = DeltaKey { source_config: Digest::of(b"a"), target_manifest: Digest::of(b"b") };
        let api = ImageRef::parse("docker://127.0.0.1:5000/fleet/api@sha256:3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d").unwrap();
        let api_tagged = ImageRef::parse("docker://127.0.0.1:5000/fleet/api:v2").unwrap();
        let gpu = ImageRef::parse("docker://127.0.0.1:5000/fleet/gpu:v2").unwrap();
        assert_eq!(store.lock_path(&key, &api), store.lock_path(&key, &api_tagged), "tags and digests do not change the repository");
        assert_ne!(store.lock_path(&key, &api), store.lock_path(&key, &gpu));
        let layouts = DeltaStore::Layout("/srv/deltas".into());
        assert_eq!(layouts.lock_path(&key, &api), layouts.lock_path(&key, &gpu), "a layout store holds one delta per pair");
    }
}
