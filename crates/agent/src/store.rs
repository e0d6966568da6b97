//! The image store (`<state>/images`, an OCI layout with one tag per image digest) and the
//! unpacked root filesystems beside it.
//!
//! The store is only added to during an update: images come in through [`fleetdelta_pull`] (a
//! delta from the image the service runs when the registry has one) or a layout copy, each
//! committed atomically. Images and root filesystems that nothing installed uses are removed
//! by [`prune`], which the agent runs only after the update is committed.

use std::collections::BTreeSet;
use std::fs;

use super::rootfs::{building_name, layer_tar_name};
use super::runtime::Fetched;
use super::state::{Installed, InstanceRecord, StateDir};
use crate::error::Result;
use fleetdelta_engine::digest::Digest;
use fleetdelta_engine::error::{Error, IoContext};
use fleetdelta_engine::image::Layout;
use fleetdelta_engine::progress::Progress;
use fleetdelta_engine::reference::ImageRef;
use fleetdelta_engine::transfer::Transfer;
use fleetdelta_pull::{pull_into, PullMethod, PullOptions};
use fleetdelta_release::parse_release_image;

/// Brings the image of `to` into the store, from its registry (with a delta from `from`'s
/// image when one exists) or its layout. Returns how. An image already in the store is not
/// fetched again.
pub fn fetch(
    transfer: &Transfer,
    state: &StateDir,
    from: Option<&InstanceRecord>,
    to: &InstanceRecord,
    options: &PullOptions,
    progress: &dyn Progress,
) -> Result<Fetched> {
    let store = state.store();
    if has_image(state, to) {
        return Ok(Fetched::Present);
    }
    let output = ImageRef::Layout { dir: store.clone(), tag: Some(to.store_tag()) };
    let source = from.filter(|f| has_image(state, f)).map(|f| ImageRef::Layout { dir: store.clone(), tag: Some(f.store_tag()) });
    fetch_image(transfer, source.as_ref(), from, to, &output, options, progress)
}

/// Brings the image of `to` to `output` (the store's layout, or the container engine): from
/// its registry, pinned to its digest, with a delta from `source` (the device's copy of
/// `from`'s image) when the registry or the builder service has one; or copied from its
/// layout. Returns how. Shared by the runtimes.
pub(crate) fn fetch_image(
    transfer: &Transfer,
    source: Option<&ImageRef>,
    from: Option<&InstanceRecord>,
    to: &InstanceRecord,
    output: &ImageRef,
    options: &PullOptions,
    progress: &dyn Progress,
) -> Result<Fetched> {
    match parse_release_image(&to.image)? {
        ImageRef::Registry(reference) => {
            // Pinned: a tag that moved since planning must not bring another image.
            let target = reference.with_digest(to.digest);
            // The builder service is told where the device's image is in the registry.
            let source_image = from.and_then(|f| match parse_release_image(&f.image) {
                Ok(ImageRef::Registry(r)) => Some(r.with_digest(f.digest)),
                _ => None,
            });
            let options = PullOptions { source: source_image, ..options.clone() };
            let (report, _) = pull_into(transfer, source, &target, output, &options, progress)?;
            Ok(match report.method {
                PullMethod::Unchanged => Fetched::SameContent,
                PullMethod::Delta { delta, .. } => Fetched::Delta { delta, received_bytes: report.received },
                PullMethod::Full { reason } => Fetched::Layers { received_bytes: report.received, reason },
            })
        }
        local @ ImageRef::Layout { .. } => {
            let report = transfer.copy(&local, output, progress)?;
            match report.manifest {
                Some(found) if found != to.digest => Err(Error::DigestMismatch { what: format!("image {}", to.image), expected: to.digest, found }.into()),
                _ => Ok(Fetched::Layout),
            }
        }
        // parse_release_image gives registry and layout references only.
        _ => Err(Error::unsupported(&to.image, "release images are registry images or OCI layouts").into()),
    }
}

/// Whether the store holds the image of `record`, complete.
pub fn has_image(state: &StateDir, record: &InstanceRecord) -> bool {
    Layout::open(state.store()).and_then(|l| l.load_image(Some(&record.store_tag()))).is_ok()
}

/// Removes from the store every image no installed service uses, and every root filesystem
/// of images or services no longer installed, with the temporaries of unpacks that did not
/// finish. Service data is kept. Only what the agent recognises as its own is removed
/// (blobs named by their digest, root filesystems named by theirs, unpack temporaries): any
/// other file found there is left alone, and is no reason to fail.
pub fn prune(state: &StateDir, installed: &Installed) -> Result<()> {
    let keep: BTreeSet<String> = installed.services.values().map(InstanceRecord::store_tag).collect();
    prune_store(state, &keep)?;
    let services = state.root().join("services");
    for entry in fs::read_dir(&services).ctx(|| format!("reading {}", services.display()))? {
        let entry = entry.ctx(|| format!("reading {}", services.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let wanted = installed.services.get(&name).map(|r| r.digest.hex());
        let rootfs_dir = entry.path().join("rootfs");
        let Ok(entries) = fs::read_dir(&rootfs_dir) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(kind) = entry.file_type() else { continue };
            let path = entry.path();
            let result = match RootfsEntry::parse(&name) {
                Some(RootfsEntry::Rootfs(hex)) if kind.is_dir() && Some(hex) != wanted.as_deref() => fs::remove_dir_all(&path),
                Some(RootfsEntry::Building) if kind.is_dir() => fs::remove_dir_all(&path),
                Some(RootfsEntry::LayerTar) if kind.is_file() => fs::remove_file(&path),
                _ => continue,
            };
            result.ctx(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// What the agent keeps in a service's `rootfs/` directory (prune runs under the agent lock,
/// so no unpack is under way and its temporaries are leftovers).
#[derive(Debug, PartialEq, Eq)]
enum RootfsEntry<'a> {
    /// A root filesystem, named by its image's digest (hex).
    Rootfs(&'a str),
    /// The directory of an unpack that did not finish.
    Building,
    /// The decompressed layer of an unpack that did not finish.
    LayerTar,
}

impl<'a> RootfsEntry<'a> {
    fn parse(name: &'a str) -> Option<Self> {
        if Digest::is_hex(name) {
            return Some(RootfsEntry::Rootfs(name));
        }
        // Temporaries are named after the root filesystem they build (see rootfs.rs).
        let hex = name.strip_prefix('.')?.split('.').next()?;
        match name {
            _ if !Digest::is_hex(hex) => None,
            _ if name == building_name(hex) => Some(RootfsEntry::Building),
            _ if name == layer_tar_name(hex) => Some(RootfsEntry::LayerTar),
            _ => None,
        }
    }
}

fn prune_store(state: &StateDir, keep: &BTreeSet<String>) -> Result<()> {
    let Ok(layout) = Layout::open(state.store()) else { return Ok(()) };
    layout.retain(|tag| keep.contains(tag))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_removes_only_what_it_recognises_and_stray_files_do_not_stop_it() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path().join("state")).unwrap();
        let (kept, old) = (Digest::of(b"kept"), Digest::of(b"old"));
        let record = InstanceRecord {
            image: "x".into(),
            digest: kept,
            config: None,
            release: "1".into(),
            environment: Default::default(),
            labels: Default::default(),
            run: Default::default(),
        };
        let installed = Installed { services: [("api".to_string(), record)].into(), ..Installed::default() };
        let rootfs = state.rootfs("api", &kept);
        let dir = rootfs.parent().unwrap().to_path_buf();
        for d in [rootfs.clone(), state.rootfs("api", &old), dir.join(building_name(&old.hex())), dir.join(building_name(&kept.hex())), dir.join("notes")] {
            fs::create_dir_all(d.join("etc")).unwrap();
        }
        // What a failed unpack leaves (its layer tar is a file, which remove_dir_all refuses),
        // and files nobody knows.
        fs::write(dir.join(layer_tar_name(&old.hex())), b"tar").unwrap();
        fs::write(dir.join(layer_tar_name("x")), b"stray").unwrap();
        fs::write(dir.join("README"), b"stray").unwrap();
        fs::write(dir.join(old.hex()).with_extension("bak"), b"stray").unwrap();
        fs::write(state.root().join("services").join("stray-file"), b"stray").unwrap();
        prune(&state, &installed).unwrap();
        let mut left: Vec<String> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        let mut expected = vec![kept.hex(), layer_tar_name("x"), "README".to_string(), format!("{}.bak", old.hex()), "notes".to_string()];
        expected.sort();
        assert_eq!(left, expected);
        assert!(rootfs.join("etc").is_dir());
        prune(&state, &installed).unwrap();
    }
}
