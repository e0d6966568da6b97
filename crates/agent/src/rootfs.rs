//! Unpacking an image into a root filesystem, rootless and safely.
//!
//! Each layer is first decompressed and verified against its blob digest and diff_id
//! ([`Layout::unpack_layer`]), then extracted in order with OCI whiteouts applied. Paths go
//! through the crate's tar path check ([`normalize_path`]: no absolute paths, no `..`), and
//! nothing is ever written through a symbolic link: a path whose parent is a symlink is
//! refused, so a layer cannot plant a link and then write through it out of the root.
//! Ownership, device nodes and FIFOs are skipped (no root), and set-id bits are dropped.
//! The root filesystem is built in a temporary sibling and renamed into place, so it either
//! exists complete or not at all; a failed unpack removes its temporaries.
//!
//! Once unpacked, paths inside a root filesystem (the image's `WorkingDir`, its entrypoint)
//! are resolved by [`InRoot`], as a chroot would and never out of it.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::error::Result;
use fleetdelta_engine::error::{Error, IoContext};
use fleetdelta_engine::image::{Image, Layout};
use fleetdelta_engine::layer::tar_index::normalize_path;

/// Largest uncompressed layer unpacked (as the command line's default).
pub const MAX_LAYER_BYTES: u64 = 64 << 30;
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";
/// Permission bits kept: no setuid or setgid for files unpacked without root.
const MODE_MASK: u32 = 0o1777;

/// Unpacks `image` (from `layout`) into `dest`, unless `dest` already exists (it only ever
/// appears complete).
pub fn unpack_image(layout: &Layout, image: &Image, dest: &Path) -> Result<()> {
    if dest.exists() {
        return Ok(());
    }
    let parent = dest.parent().ok_or_else(|| Error::malformed(dest.display().to_string(), "no parent directory"))?;
    fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let building = parent.join(building_name(&name));
    let tar_path = parent.join(layer_tar_name(&name));
    if building.exists() {
        fs::remove_dir_all(&building).ctx(|| format!("removing {}", building.display()))?;
    }
    let built = (|| -> Result<()> {
        fs::create_dir(&building).ctx(|| format!("creating {}", building.display()))?;
        for (i, layer) in image.layers.iter().enumerate() {
            let what = format!("layer {i} ({})", layer.blob.digest);
            layout.unpack_layer(layer, &tar_path, MAX_LAYER_BYTES, &what)?;
            let tar = File::open(&tar_path).ctx(|| format!("opening {}", tar_path.display()))?;
            extract(tar, &building, &what)?;
        }
        let _ = fs::remove_file(&tar_path);
        Ok(fs::rename(&building, dest).ctx(|| format!("renaming {} into place", dest.display()))?)
    })();
    if built.is_err() {
        // Whatever failed (a hostile layer, a full disk), leave nothing behind: the space is
        // needed for the rollback, and the next unpack starts afresh.
        let _ = fs::remove_file(&tar_path);
        let _ = fs::remove_dir_all(&building);
    }
    built?;
    super::state::sync_parent(dest)
}

/// The name of the temporary directory an image is unpacked into, beside its root filesystem
/// named `name`.
pub(crate) fn building_name(name: &str) -> String {
    format!(".{name}.unpacking")
}

/// The name of the temporary file a layer is decompressed into while the root filesystem
/// named `name` is unpacked.
pub(crate) fn layer_tar_name(name: &str) -> String {
    format!(".{name}.layer.tar")
}

/// Extracts one layer tar over `root`.
fn extract(tar: File, root: &Path, what: &str) -> Result<()> {
    let io_err = |e: io::Error| Error::malformed(what, format!("tar: {e}"));
    let mut archive = tar::Archive::new(io::BufReader::new(tar));
    for entry in archive.entries().map_err(io_err)? {
        let mut entry = entry.map_err(io_err)?;
        let rel = normalize_path(&entry.path().map_err(io_err)?, what)?;
        if rel.is_empty() {
            continue;
        }
        let (dir, file_name) = match rel.rsplit_once('/') {
            Some((d, f)) => (d, f),
            None => ("", rel.as_str()),
        };
        let parent = ensure_dirs(root, dir, what)?;
        if file_name == OPAQUE_WHITEOUT {
            for child in fs::read_dir(&parent).ctx(|| format!("reading {}", parent.display()))? {
                remove_any(&child.ctx(|| format!("reading {}", parent.display()))?.path())?;
            }
            continue;
        }
        if let Some(hidden) = file_name.strip_prefix(WHITEOUT_PREFIX) {
            // `.wh..` would remove the directory above (up to the root filesystems beside
            // this one), `.wh.` the directory itself.
            if matches!(hidden, "" | "." | "..") || hidden.contains('/') {
                return Err(Error::malformed(what, format!("whiteout {rel:?} does not name an entry of its directory")).into());
            }
            remove_any(&parent.join(hidden))?;
            continue;
        }
        let path = parent.join(file_name);
        // Only directories and files have a mode that matters (some writers leave it empty
        // on links).
        let mode = || entry.header().mode().map(|m| m & MODE_MASK).map_err(io_err);
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            if fs::symlink_metadata(&path).is_ok_and(|m| !m.is_dir()) {
                remove_any(&path)?;
            }
            if !path.exists() {
                fs::create_dir(&path).ctx(|| format!("creating {}", path.display()))?;
            }
            fs::set_permissions(&path, fs::Permissions::from_mode(mode()? | 0o700)).ctx(|| format!("setting mode of {}", path.display()))?;
        } else if kind.is_file() || kind.is_contiguous() {
            let mode = mode()?;
            remove_any(&path)?;
            let mut out = File::create(&path).ctx(|| format!("creating {}", path.display()))?;
            io::copy(&mut entry, &mut out).ctx(|| format!("writing {}", path.display()))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).ctx(|| format!("setting mode of {}", path.display()))?;
        } else if kind.is_symlink() {
            let target = entry.link_name().map_err(io_err)?.ok_or_else(|| Error::malformed(what, format!("symlink {rel:?} without a target")))?;
            remove_any(&path)?;
            std::os::unix::fs::symlink(&*target, &path).ctx(|| format!("creating symlink {}", path.display()))?;
        } else if kind.is_hard_link() {
            let target = entry.link_name().map_err(io_err)?.ok_or_else(|| Error::malformed(what, format!("hard link {rel:?} without a target")))?;
            let target_rel = normalize_path(&target, what)?;
            let (tdir, tname) = target_rel.rsplit_once('/').unwrap_or(("", target_rel.as_str()));
            let source = ensure_dirs(root, tdir, what)?.join(tname);
            if fs::symlink_metadata(&source).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(Error::UnsafePath { what: what.to_string(), path: target_rel }.into());
            }
            remove_any(&path)?;
            fs::hard_link(&source, &path).ctx(|| format!("linking {} to {}", path.display(), source.display()))?;
        }
        // Device nodes and FIFOs need root; a rootless service does without them.
    }
    Ok(())
}

/// Creates the directories of `rel` under `root`, refusing to pass through a symlink.
fn ensure_dirs(root: &Path, rel: &str, what: &str) -> Result<PathBuf> {
    let mut path = root.to_path_buf();
    for part in rel.split('/').filter(|p| !p.is_empty()) {
        path.push(part);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => return Err(Error::UnsafePath { what: what.to_string(), path: format!("{rel} (through a symlink)") }.into()),
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                remove_any(&path)?;
                fs::create_dir(&path).ctx(|| format!("creating {}", path.display()))?;
            }
            Err(_) => fs::create_dir(&path).ctx(|| format!("creating {}", path.display()))?,
        }
    }
    Ok(path)
}

/// Removes a file, link or directory tree; nothing there is fine.
fn remove_any(path: &Path) -> Result<()> {
    let result = match fs::symlink_metadata(path) {
        Err(_) => return Ok(()),
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
    };
    Ok(result.ctx(|| format!("removing {}", path.display()))?)
}

/// A root filesystem opened to resolve paths inside it with chroot semantics, as the image's
/// own processes would see them: an absolute path, and the target of an absolute symlink,
/// start from the root filesystem's root; `..` never climbs above that root (at the root it
/// stays there); relative symlinks resolve from their own directory. Nothing outside the
/// root filesystem is ever reached, whatever the links inside it say. Resolution is done by
/// the kernel (`openat2` with `RESOLVE_IN_ROOT`) or, on kernels before 5.6, by libpathrs's
/// `O_PATH` walk, both through the [`pathrs`] crate.
#[derive(Debug)]
pub struct InRoot {
    root: pathrs::Root,
    /// The root filesystem's host path, without symlinks.
    host: PathBuf,
}

impl InRoot {
    /// Opens the root filesystem at `rootfs` (a host path).
    pub fn open(rootfs: &Path) -> Result<Self> {
        let host = rootfs.canonicalize().ctx(|| format!("opening {}", rootfs.display()))?;
        let root = pathrs::Root::open(&host).map_err(|e| pathrs_error(format!("opening {}", host.display()), e))?;
        Ok(InRoot { root, host })
    }

    /// The host path of `path` inside the root filesystem (symlinks followed, within it). It
    /// must exist.
    pub fn resolve(&self, path: &str) -> Result<PathBuf> {
        let handle = self.root.resolve(path).map_err(|e| pathrs_error(self.context(path), e))?;
        self.host_path(path, &handle)
    }

    /// Creates the directory `path` inside the root filesystem and any missing parents (`mkdir
    /// -p` in a chroot); returns its host path. Created directories get mode 0755.
    pub fn create_dir_all(&self, path: &str) -> Result<PathBuf> {
        let handle = self.root.mkdir_all(path, &fs::Permissions::from_mode(0o755)).map_err(|e| pathrs_error(self.context(path), e))?;
        self.host_path(path, &handle)
    }

    fn context(&self, path: &str) -> String {
        format!("resolving {path:?} inside {}", self.host.display())
    }

    /// The host path of a resolved handle, which must lie inside the root filesystem (it does,
    /// unless the tree was moved under us).
    fn host_path(&self, path: &str, handle: &pathrs::Handle) -> Result<PathBuf> {
        use std::os::fd::{AsFd, AsRawFd};
        let link = format!("/proc/self/fd/{}", handle.as_fd().as_raw_fd());
        let found = fs::read_link(&link).ctx(|| format!("{}: reading {link}", self.context(path)))?;
        if !found.starts_with(&self.host) || !found.exists() {
            return Err(Error::io(self.context(path), io::Error::other(format!("found at {}, outside it", found.display()))).into());
        }
        Ok(found)
    }
}

/// A libpathrs failure as an I/O error, keeping the kind of its errno where it has one.
fn pathrs_error(context: String, e: pathrs::error::Error) -> Error {
    let kind = match e.kind() {
        pathrs::error::ErrorKind::OsError(Some(errno)) => io::Error::from_raw_os_error(errno).kind(),
        _ => io::ErrorKind::Other,
    };
    Error::Io { context, source: io::Error::new(kind, e) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o4755);
            if let Some(link) = link {
                b.append_link(&mut h, path, link).unwrap();
            } else {
                b.append_data(&mut h, path, *data).unwrap();
            }
        }
        b.into_inner().unwrap()
    }

    fn extract_bytes(bytes: &[u8], root: &Path) -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.tar");
        fs::write(&p, bytes).unwrap();
        extract(File::open(&p).unwrap(), root, "layer")
    }

    #[test]
    fn applies_files_links_and_whiteouts() {
        use tar::EntryType::*;
        let root = tempfile::tempdir().unwrap();
        let lower = tar_of(&[
            ("bin/run", Regular, b"#!/bin/sh\n", None),
            ("etc/a", Regular, b"a", None),
            ("etc/b", Regular, b"b", None),
            ("var/cache/x", Regular, b"x", None),
            ("bin/sh-link", Symlink, b"", Some("/bin/sh")),
            ("bin/run2", Link, b"", Some("bin/run")),
        ]);
        extract_bytes(&lower, root.path()).unwrap();
        let upper = tar_of(&[("etc/.wh.a", Regular, b"", None), ("var/cache/.wh..wh..opq", Regular, b"", None)]);
        extract_bytes(&upper, root.path()).unwrap();
        let r = root.path();
        assert_eq!(fs::read(r.join("bin/run2")).unwrap(), b"#!/bin/sh\n");
        assert_eq!(fs::metadata(r.join("bin/run")).unwrap().permissions().mode() & 0o7777, 0o755, "setuid dropped");
        assert_eq!(fs::read_link(r.join("bin/sh-link")).unwrap(), Path::new("/bin/sh"));
        assert!(!r.join("etc/a").exists() && r.join("etc/b").exists());
        assert!(r.join("var/cache").is_dir() && fs::read_dir(r.join("var/cache")).unwrap().next().is_none());
    }

    #[test]
    fn never_writes_through_a_symlink() {
        use tar::EntryType::*;
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let evil = tar_of(&[("escape", Symlink, b"", Some(outside.path().to_str().unwrap())), ("escape/planted", Regular, b"x", None)]);
        let err = extract_bytes(&evil, root.path()).unwrap_err();
        assert!(matches!(err.as_engine(), Some(Error::UnsafePath { .. })), "{err}");
        assert!(!outside.path().join("planted").exists());
    }

    #[test]
    fn whiteouts_must_name_one_entry_of_their_directory() {
        use tar::EntryType::*;
        for bad in [".wh.", ".wh..", ".wh...", "etc/.wh.", "etc/.wh...", "etc/sub/.wh..."] {
            let tmp = tempfile::tempdir().unwrap();
            // `root` stands for the unpack directory, `beside` for the running instance's
            // root filesystem next to it.
            let (root, beside) = (tmp.path().join("building"), tmp.path().join("running"));
            fs::create_dir_all(root.join("etc/sub")).unwrap();
            fs::create_dir_all(&beside).unwrap();
            fs::write(root.join("etc/sub/keep"), "k").unwrap();
            let err = extract_bytes(&tar_of(&[(bad, Regular, b"", None)]), &root).unwrap_err().to_string();
            assert!(err.contains("layer: malformed: whiteout") && err.contains(&format!("{bad:?}")), "{bad}: {err}");
            assert!(root.join("etc/sub/keep").exists() && beside.exists(), "{bad} removed something");
        }
    }

    #[test]
    fn paths_resolve_inside_the_root_filesystem_as_in_a_chroot() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
        fs::create_dir_all(root.join("srv/app")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        let link = |target: &Path, name: &str| std::os::unix::fs::symlink(target, root.join(name)).unwrap();
        link(&outside, "host-abs");
        link(Path::new("/srv"), "abs");
        link(Path::new("../../../../../srv"), "climb");
        link(Path::new("srv/app"), "rel");
        let inroot = InRoot::open(&root).unwrap();
        let canon = root.canonicalize().unwrap();
        assert_eq!(inroot.resolve("/srv/app").unwrap(), canon.join("srv/app"));
        assert_eq!(inroot.resolve("../../srv").unwrap(), canon.join("srv"), "`..` stops at the root");
        assert_eq!(inroot.resolve("abs/app").unwrap(), canon.join("srv/app"), "absolute links start from the root");
        assert_eq!(inroot.resolve("climb/app").unwrap(), canon.join("srv/app"));
        assert_eq!(inroot.resolve("/rel").unwrap(), canon.join("srv/app"));
        assert_eq!(inroot.create_dir_all("/abs/app/work/dir").unwrap(), canon.join("srv/app/work/dir"));
        assert_eq!(inroot.create_dir_all("climb/new").unwrap(), canon.join("srv/new"));
        // The host path the link names is taken inside the root, where it does not exist.
        assert!(inroot.resolve("host-abs").is_err());
        let err = inroot.create_dir_all("host-abs/planted").unwrap_err().to_string();
        assert!(err.contains("resolving \"host-abs/planted\" inside"), "{err}");
        assert!(fs::read_dir(&outside).unwrap().next().is_none(), "nothing created outside");
        assert!(!canon.join(outside.strip_prefix("/").unwrap()).exists(), "a dangling link is not made real");
    }

    /// An image of uncompressed layer tars in a new layout at `dir`.
    fn image_of(dir: &Path, layers: &[Vec<u8>]) -> (Layout, Image) {
        use fleetdelta_engine::image::manifest::{BlobRef, OCI_CONFIG, OCI_MANIFEST};
        use fleetdelta_engine::image::LayoutWriter;
        use fleetdelta_engine::Digest;
        let w = LayoutWriter::create(dir).unwrap();
        let mut descriptors = Vec::new();
        for tar in layers {
            let (d, n) = w.put_blob(tar).unwrap();
            descriptors.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d.to_string(), "size": n}));
        }
        let diff_ids: Vec<String> = layers.iter().map(|t| Digest::of(t).to_string()).collect();
        let config =
            serde_json::to_vec(&serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}})).unwrap();
        let (cd, cn) = w.put_blob(&config).unwrap();
        let manifest = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": cd.to_string(), "size": cn}, "layers": descriptors}))
        .unwrap();
        let (md, mn) = w.put_blob(&manifest).unwrap();
        w.commit(&BlobRef { media_type: OCI_MANIFEST.into(), digest: md, size: mn }, "t").unwrap();
        let layout = Layout::open(dir).unwrap();
        let image = layout.load_image(Some("t")).unwrap();
        (layout, image)
    }

    #[test]
    fn a_failed_unpack_leaves_nothing_behind_and_the_next_one_starts_afresh() {
        use tar::EntryType::*;
        let tmp = tempfile::tempdir().unwrap();
        let rootfs_dir = tmp.path().join("rootfs");
        fs::create_dir_all(rootfs_dir.join("running/etc")).unwrap();
        let good = tar_of(&[("etc/a", Regular, b"a", None)]);
        let (layout, image) = image_of(&tmp.path().join("hostile"), &[good.clone(), tar_of(&[(".wh..", Regular, b"", None)])]);
        let dest = rootfs_dir.join("new");
        let err = unpack_image(&layout, &image, &dest).unwrap_err().to_string();
        assert!(err.contains("layer 1 (sha256:") && err.contains("whiteout"), "{err}");
        let left: Vec<_> = fs::read_dir(&rootfs_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["running"], "the unpack's temporaries are removed");
        let (layout, image) = image_of(&tmp.path().join("fine"), &[good]);
        unpack_image(&layout, &image, &dest).unwrap();
        assert_eq!(fs::read(dest.join("etc/a")).unwrap(), b"a");
        assert_eq!(fs::read_dir(&rootfs_dir).unwrap().count(), 2);
    }
}
