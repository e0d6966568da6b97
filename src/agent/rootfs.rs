//! Unpacking an image into a root filesystem, rootless and safely.
//!
//! Each layer is first decompressed and verified against its blob digest and diff_id
//! ([`Layout::unpack_layer`]), then extracted in order with OCI whiteouts applied. Paths go
//! through the crate's tar path check ([`normalize_path`]: no absolute paths, no `..`), and
//! nothing is ever written through a symbolic link: a path whose parent is a symlink is
//! refused, so a layer cannot plant a link and then write through it out of the root.
//! Ownership, device nodes and FIFOs are skipped (no root), and set-id bits are dropped.
//! The root filesystem is built in a temporary sibling and renamed into place, so it either
//! exists complete or not at all.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::image::{Image, Layout};
use crate::layer::tar_index::normalize_path;

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
    let building = parent.join(format!(".{name}.unpacking"));
    let tar_path = parent.join(format!(".{name}.layer.tar"));
    if building.exists() {
        fs::remove_dir_all(&building).ctx(|| format!("removing {}", building.display()))?;
    }
    fs::create_dir(&building).ctx(|| format!("creating {}", building.display()))?;
    for (i, layer) in image.layers.iter().enumerate() {
        let what = format!("layer {i} ({})", layer.blob.digest);
        layout.unpack_layer(layer, &tar_path, MAX_LAYER_BYTES, &what)?;
        let tar = File::open(&tar_path).ctx(|| format!("opening {}", tar_path.display()))?;
        extract(tar, &building, &what)?;
    }
    let _ = fs::remove_file(&tar_path);
    fs::rename(&building, dest).ctx(|| format!("renaming {} into place", dest.display()))?;
    super::state::sync_parent(dest)
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
            remove_any(&parent.join(hidden))?;
            continue;
        }
        let path = parent.join(file_name);
        let mode = entry.header().mode().map_err(io_err)? & MODE_MASK;
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            if fs::symlink_metadata(&path).is_ok_and(|m| !m.is_dir()) {
                remove_any(&path)?;
            }
            if !path.exists() {
                fs::create_dir(&path).ctx(|| format!("creating {}", path.display()))?;
            }
            fs::set_permissions(&path, fs::Permissions::from_mode(mode | 0o700)).ctx(|| format!("setting mode of {}", path.display()))?;
        } else if kind.is_file() || kind.is_contiguous() {
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
                return Err(Error::UnsafePath { what: what.to_string(), path: target_rel });
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
            Ok(m) if m.file_type().is_symlink() => {
                return Err(Error::UnsafePath { what: what.to_string(), path: format!("{rel} (through a symlink)") })
            }
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
    result.ctx(|| format!("removing {}", path.display()))
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
        assert!(matches!(err, Error::UnsafePath { .. }), "{err}");
        assert!(!outside.path().join("planted").exists());
    }
}
