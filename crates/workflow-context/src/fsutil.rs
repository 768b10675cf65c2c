//! File-system helpers that never follow symlinks and create with tight permissions.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use context_core::{Error, Result};
use rustix::fs::OFlags;

const NOFOLLOW: i32 = OFlags::NOFOLLOW.bits() as i32 | OFlags::CLOEXEC.bits() as i32;

/// Creates a new file, mode 0600; fails if anything (a file or a symlink) is at `path`.
pub(crate) fn create_new(path: &Path, op: &'static str) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(NOFOLLOW)
        .open(path)
        .map_err(|e| Error::io(op, path, e))
}

/// Opens an existing regular file for reading and writing without following a symlink.
pub(crate) fn open_rw(path: &Path, op: &'static str) -> Result<File> {
    OpenOptions::new().read(true).write(true).custom_flags(NOFOLLOW).open(path).map_err(|e| Error::io(op, path, e))
}

/// [`open_rw`], with `None` if nothing is at `path`.
pub(crate) fn open_rw_if_exists(path: &Path, op: &'static str) -> Result<Option<File>> {
    match OpenOptions::new().read(true).write(true).custom_flags(NOFOLLOW).open(path) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(op, path, e)),
    }
}

/// Creates a directory, mode 0700 (the parent must exist).
pub(crate) fn create_dir(path: &Path, op: &'static str) -> Result<()> {
    DirBuilder::new().mode(0o700).create(path).map_err(|e| Error::io(op, path, e))
}

/// Makes sure `path` is a directory we may keep contexts in: creates it (0700, and the
/// parents it needs 0700) if missing; if present, it must be a real directory (not a
/// symlink), owned by this user, and not writable by others.
pub(crate) fn ensure_private_dir(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                // 0700 too: a parent others may write to lets them move the contexts
                // directory away and put one of theirs in its place.
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)
                    .map_err(|e| Error::io("create parent of contexts directory", parent, e))?;
            }
            match DirBuilder::new().mode(0o700).create(path) {
                Ok(()) => Ok(()),
                // Another process created it at the same moment: check what is there now.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => check_private_dir(path),
                Err(e) => Err(Error::io("create contexts directory", path, e)),
            }
        }
        Err(e) => Err(Error::io("inspect contexts directory", path, e)),
        Ok(_) => check_private_dir(path),
    }
}

pub(crate) fn check_private_dir(path: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(path).map_err(|e| Error::io("inspect contexts directory", path, e))?;
    let refuse = |why: &str| Error::io("use contexts directory", path, io::Error::other(why.to_owned()));
    if meta.file_type().is_symlink() {
        return Err(refuse("it is a symlink; refusing to follow it"));
    }
    if !meta.is_dir() {
        return Err(refuse("it is not a directory"));
    }
    if meta.uid() != rustix::process::geteuid().as_raw() {
        return Err(refuse("it is owned by another user"));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(refuse("it is writable by group or others"));
    }
    Ok(())
}

/// Allocates the blocks of `file`'s first `len` bytes (and sets its length), so that writes
/// through a mapping of it cannot fail for want of space. Uses `fallocate`, or writes zeros
/// where the file system has no `fallocate`.
pub(crate) fn reserve(file: &fs::File, len: u64) -> io::Result<()> {
    match context_core::space::reserve(file, len) {
        Err(e) if e.kind() == io::ErrorKind::Unsupported => {
            use std::os::unix::fs::FileExt;
            let zeros = vec![0u8; 1 << 20];
            let mut at = 0;
            while at < len {
                let n = zeros.len().min((len - at) as usize);
                file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            Ok(())
        }
        reserved => reserved,
    }
}

/// The names in `dir` that start with `prefix`, sorted (for tests that look at which index
/// files there are).
#[cfg(test)]
pub(crate) fn names_starting(dir: &Path, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}
