//! Directories of writers that may be killed (kill -9, a power cut): each holds a locked
//! `.lock` file while its writer lives, and is created under its parent's lock, so that the
//! next writer in the same parent removes a dead one's at once, and never a live one's.
//!
//! Used for a layout writer's staging directory ([`crate::image::LayoutWriter`]) and for the
//! scratch directory of a [`crate::Transfer`] ([`ScratchDir`]).

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use crate::error::{Error, IoContext, Result};

/// The file inside such a directory that its writer holds locked.
pub(crate) const LOCK_FILE: &str = ".lock";
/// After the prefix: a directory being removed ([`discard`]), garbage by its name alone.
pub(crate) const TRASH_MARK: &str = "trash-";

/// Takes `dir`'s own lock (flock on the directory): a layout's `index.json` is rewritten
/// under it, and the directories of this module are created and swept under their parent's.
pub(crate) fn lock_dir(dir: &Path) -> Result<File> {
    let file = File::open(dir).ctx(|| format!("opening {}", dir.display()))?;
    file.lock().ctx(|| format!("locking {}", dir.display()))?;
    Ok(file)
}

/// Removes the directories named `prefix…` in `parent` whose writer is gone, and those a
/// writer was removing when it died. The caller holds `parent`'s lock ([`lock_dir`]), so a
/// directory without its lock file has no live writer: writers create both under that lock.
/// With `strict`, a directory that cannot be removed is an error; else it is left (a shared
/// temporary directory holds other users' directories too).
pub(crate) fn remove_stale(parent: &Path, prefix: &str, strict: bool) -> Result<()> {
    let entries = fs::read_dir(parent).ctx(|| format!("reading {}", parent.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(prefix) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = entry.path();
        let stale = name[prefix.len()..].starts_with(TRASH_MARK)
            || match File::open(dir.join(LOCK_FILE)) {
                // A lock we can take is a lock nobody holds: its writer died.
                Ok(lock) => lock.try_lock().is_ok(),
                Err(_) => true,
            };
        if !stale {
            continue;
        }
        match fs::remove_dir_all(&dir) {
            // Another writer may be removing it at the same time: whoever is first wins.
            Err(e) if strict && e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io(format!("removing the stale directory {}", dir.display()), e))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Creates `<parent>/<prefix>XXXXXX` with its lock file locked, under `parent`'s lock after
/// sweeping the dead writers' directories there. Permissions are those the umask gives.
pub(crate) fn create(parent: &Path, prefix: &str, strict: bool) -> Result<(TempDir, File)> {
    use std::os::unix::fs::PermissionsExt;
    let _parent_guard = lock_dir(parent)?;
    remove_stale(parent, prefix, strict)?;
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .permissions(fs::Permissions::from_mode(0o777))
        .tempdir_in(parent)
        .ctx(|| format!("creating a directory in {}", parent.display()))?;
    let lock_path = dir.path().join(LOCK_FILE);
    let lock = File::create(&lock_path).ctx(|| format!("creating {}", lock_path.display()))?;
    lock.lock().ctx(|| format!("locking {}", lock_path.display()))?;
    Ok((dir, lock))
}

/// Removes `path` under another name first (`<prefix>trash-…`), so that a writer killed
/// while removing it leaves a directory that reads as garbage by its name alone.
pub(crate) fn discard(path: &Path) {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name().map(|n| n.to_string_lossy().into_owned())) else { return };
    // The prefix ends with its last '-': tempfile's random part is alphanumeric.
    let Some(cut) = name.rfind('-').map(|i| i + 1) else { return };
    let trash = parent.join(format!("{}{TRASH_MARK}{}", &name[..cut], &name[cut..]));
    if fs::rename(path, &trash).is_ok() {
        let _ = fs::remove_dir_all(&trash);
    }
}

/// A scratch directory (`<parent>/<prefix>XXXXXX`) removed when dropped, and by the next
/// one created in the same parent with the same prefix when its process was killed.
#[derive(Debug)]
pub struct ScratchDir {
    dir: Option<TempDir>,
    _lock: File,
}

impl ScratchDir {
    /// Creates one in `parent` (a shared temporary directory: others' directories there that
    /// cannot be removed are left alone).
    pub fn create(parent: &Path, prefix: &str) -> Result<Self> {
        fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
        let (dir, lock) = create(parent, prefix, false)?;
        Ok(ScratchDir { dir: Some(dir), _lock: lock })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.dir.as_ref().map(TempDir::path).expect("present until dropped")
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let path: PathBuf = dir.keep();
            discard(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A killed process's scratch directory (its lock free, or no lock file yet, or half
    /// removed) goes when the next one is created; a live one's stays; a dropped one goes.
    #[test]
    fn scratch_directories_of_killed_processes_go_when_the_next_is_created() {
        let tmp = tempfile::tempdir().unwrap();
        let prefix = "fleetdelta-scratch-";
        let dead_unlocked = tmp.path().join(format!("{prefix}Dead01"));
        fs::create_dir_all(&dead_unlocked).unwrap();
        fs::write(dead_unlocked.join(LOCK_FILE), b"").unwrap();
        let dead_lockless = tmp.path().join(format!("{prefix}Dead02"));
        fs::create_dir_all(dead_lockless.join("fetched")).unwrap();
        let half_removed = tmp.path().join(format!("{prefix}{TRASH_MARK}Dead03"));
        fs::create_dir_all(&half_removed).unwrap();
        let other = tmp.path().join("someone-else");
        fs::create_dir_all(&other).unwrap();

        let live = ScratchDir::create(tmp.path(), prefix).unwrap();
        fs::write(live.path().join("work"), b"x").unwrap();
        for dead in [&dead_unlocked, &dead_lockless, &half_removed] {
            assert!(!dead.exists(), "{} left", dead.display());
        }
        assert!(other.exists(), "another program's directory is left alone");
        let next = ScratchDir::create(tmp.path(), prefix).unwrap();
        assert!(live.path().join("work").exists(), "a live scratch directory is kept");
        let (live_path, next_path) = (live.path().to_path_buf(), next.path().to_path_buf());
        drop(live);
        drop(next);
        assert!(!live_path.exists() && !next_path.exists(), "dropped ones are removed");
        let left: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["someone-else"]);
    }
}
