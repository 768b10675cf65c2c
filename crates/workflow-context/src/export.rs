//! The export file: a value made permanent, self-describing and checked.
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0  | 8 | magic `WFCXPORT` |
//! | 8  | 2 | format version (2), little endian |
//! | 10 | 2 | flags (bit 0: postcard-encoded typed value) |
//! | 12 | 4 | key length in bytes |
//! | 16 | 8 | payload length |
//! | 24 | 8 | XXH3-64 of bytes 8 to 24 (version, flags and both lengths), the key bytes and the payload |
//! | 32 | key length | the key, UTF-8 |
//! | …  | payload length | the payload |
//!
//! Version 1 files, whose checksum covered the flags but not the lengths (so a file whose
//! key length grew by as much as its payload length shrank passed its check), are still
//! read.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use context_core::{Error, Result};
use serde::de::DeserializeOwned;
use xxhash_rust::xxh3::Xxh3;

use crate::fsutil;

const MAGIC: &[u8; 8] = b"WFCXPORT";
const VERSION: u16 = 2;
const HEADER: usize = 32;

/// A decoded export file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Exported {
    pub(crate) key: String,
    pub(crate) flags: u16,
    pub(crate) payload: Vec<u8>,
}

/// The checksum of a file whose header (before its checksum) is `h`: version 2 covers the
/// version, flags and lengths, version 1 only the flags.
fn sum(h: &[u8], key: &[u8], payload: &[u8]) -> u64 {
    let mut x = Xxh3::new();
    if u16::from_le_bytes([h[8], h[9]]) == 1 {
        x.update(&h[10..12]);
    } else {
        x.update(&h[8..24]);
    }
    x.update(key);
    x.update(payload);
    x.digest()
}

fn header(key: &str, flags: u16, payload: &[u8]) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..8].copy_from_slice(MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    h[10..12].copy_from_slice(&flags.to_le_bytes());
    h[12..16].copy_from_slice(&(key.len() as u32).to_le_bytes());
    h[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    let checksum = sum(&h, key.as_bytes(), payload);
    h[24..32].copy_from_slice(&checksum.to_le_bytes());
    h
}

/// Decodes export bytes read from `path`.
pub(crate) fn decode(bytes: &[u8], path: &Path) -> Result<Exported> {
    let bad = |detail: String| Error::corrupt(path.display().to_string(), detail);
    let h = bytes.get(..HEADER).ok_or_else(|| bad(format!("{} bytes is too short for an export file", bytes.len())))?;
    if &h[0..8] != MAGIC {
        return Err(bad("not a workflow-context export file (bad magic)".to_owned()));
    }
    let version = u16::from_le_bytes([h[8], h[9]]);
    if !(1..=VERSION).contains(&version) {
        return Err(bad(format!("unsupported export format version {version}")));
    }
    let flags = u16::from_le_bytes([h[10], h[11]]);
    let key_len = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes")) as u64;
    let payload_len = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
    let stored = u64::from_le_bytes(h[24..32].try_into().expect("8 bytes"));
    let body = &bytes[HEADER..];
    if key_len.checked_add(payload_len) != Some(body.len() as u64) {
        return Err(bad(format!(
            "the header announces {key_len} key bytes and {payload_len} payload bytes, the file holds {} (truncated or extended)",
            body.len()
        )));
    }
    let (key, payload) = body.split_at(key_len as usize);
    if sum(h, key, payload) != stored {
        return Err(bad("checksum mismatch: the file is damaged".to_owned()));
    }
    let key = std::str::from_utf8(key).map_err(|_| bad("the key is not UTF-8".to_owned()))?;
    Ok(Exported { key: key.to_owned(), flags, payload: payload.to_vec() })
}

/// Reads and checks an export file.
pub(crate) fn read(path: &Path) -> Result<Exported> {
    let mut file = File::open(path).map_err(|e| Error::io("open export file", path, e))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(|e| Error::io("read export file", path, e))?;
    decode(&bytes, path)
}

/// Writes an export file atomically, refusing to replace an existing file unless
/// `overwrite`.
///
/// The bytes go into an unnamed file in the destination directory (`O_TMPFILE`), which is
/// synced and then linked into place: a process killed before the link leaves nothing
/// behind, because the kernel frees an unnamed file with its last descriptor. Where the
/// file system has no unnamed files, or the process cannot link one, a named temporary
/// file (`.wfx-export.<random>.tmp`) is written instead and renamed into place; a kill during
/// that write leaves it behind.
pub(crate) fn write(dest: &Path, key: &str, flags: u16, payload: &[u8], overwrite: bool) -> Result<()> {
    if dest.file_name().is_none() {
        return Err(Error::io("export to", dest, io::Error::other("the destination has no file name")));
    }
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    // The directories this export makes go again if it fails: a failed export leaves nothing.
    let made: Vec<PathBuf> = parent
        .ancestors()
        .take_while(|dir| !dir.as_os_str().is_empty() && fs::symlink_metadata(dir).is_err())
        .map(Path::to_owned)
        .collect();
    fs::create_dir_all(&parent).map_err(|e| Error::io("create export directory", &parent, e))?;
    let written = write_in(&parent, dest, key, flags, payload, overwrite);
    if written.is_err() {
        // Deepest first; only empty ones go (`remove_dir`), so nothing anyone else put
        // there meanwhile is touched.
        for dir in &made {
            if fs::remove_dir(dir).is_err() {
                break;
            }
        }
    }
    written
}

/// [`write`] into the existing directory `parent` of `dest`.
fn write_in(parent: &Path, dest: &Path, key: &str, flags: u16, payload: &[u8], overwrite: bool) -> Result<()> {
    if !overwrite && fs::symlink_metadata(dest).is_ok() {
        return Err(Error::AlreadyExists { what: "export destination", path: dest.to_owned() });
    }
    let header = header(key, flags, payload);
    let parts: [&[u8]; 3] = [&header, key.as_bytes(), payload];
    let tmp_name = || -> Result<PathBuf> {
        let mut rand = [0u8; 8];
        getrandom::fill(&mut rand).map_err(|e| Error::io("make a temporary name in", parent, io::Error::other(e)))?;
        // Not named after the destination, whose name may be as long as a name can be.
        Ok(parent.join(format!(".wfx-export.{:016x}.tmp", u64::from_le_bytes(rand))))
    };
    if !write_unnamed(parent, dest, &parts, overwrite, tmp_name)? {
        write_named(&tmp_name()?, dest, &parts, overwrite)?;
    }
    if let Ok(dir) = File::open(parent) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Writes `parts` to `file` and syncs it; errors name `path`.
fn write_parts(file: &mut File, parts: &[&[u8]], path: &Path) -> Result<()> {
    for part in parts {
        file.write_all(part).map_err(|e| Error::io("write export file", path, e))?;
    }
    file.sync_all().map_err(|e| Error::io("sync export file", path, e))
}

/// The export through an unnamed file; `false` if this file system or process cannot make
/// one or link it (nothing is left behind then).
fn write_unnamed(
    parent: &Path,
    dest: &Path,
    parts: &[&[u8]],
    overwrite: bool,
    tmp_name: impl FnOnce() -> Result<PathBuf>,
) -> Result<bool> {
    use rustix::fs::{CWD, Mode, OFlags};
    use rustix::io::Errno;
    let flags = OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC;
    let mut file = match rustix::fs::openat(CWD, parent, flags, Mode::from_raw_mode(0o600)) {
        Ok(fd) => File::from(fd),
        // No unnamed files here (an older kernel reports EISDIR).
        Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => return Ok(false),
        Err(e) => return Err(Error::io("create export file in", parent, e.into())),
    };
    write_parts(&mut file, parts, dest)?;
    if !overwrite {
        // The link itself refuses an existing destination.
        return match link_unnamed(&file, dest) {
            Ok(()) => Ok(true),
            Err(Errno::EXIST) => Err(Error::AlreadyExists { what: "export destination", path: dest.to_owned() }),
            Err(e) if cannot_link(e) => Ok(false),
            Err(e) => Err(Error::io("move export file into place at", dest, e.into())),
        };
    }
    // Replacing takes a name first: only a rename replaces a file atomically. A kill
    // between the two steps leaves the named file.
    let tmp = tmp_name()?;
    match link_unnamed(&file, &tmp) {
        Ok(()) => {}
        Err(e) if cannot_link(e) => return Ok(false),
        Err(e) => return Err(Error::io("link export file at", &tmp, e.into())),
    }
    drop(file);
    rename_into_place(&tmp, dest, true)?;
    Ok(true)
}

/// Whether a failed link of an unnamed file means this process cannot link one at all
/// (no `CAP_DAC_READ_SEARCH` for `AT_EMPTY_PATH`, and no `/proc`), rather than a problem
/// with the destination.
fn cannot_link(e: rustix::io::Errno) -> bool {
    use rustix::io::Errno;
    matches!(e, Errno::NOENT | Errno::PERM | Errno::ACCESS)
}

/// Gives the unnamed `file` the name `to`: by its descriptor (`AT_EMPTY_PATH`), else
/// through `/proc/self/fd`, which needs no privilege.
fn link_unnamed(file: &File, to: &Path) -> rustix::io::Result<()> {
    use rustix::fs::{AtFlags, CWD, linkat};
    match linkat(file, c"", CWD, to, AtFlags::EMPTY_PATH) {
        Err(e) if cannot_link(e) => link_by_proc(file, to),
        other => other,
    }
}

/// Links `file` at `to` through its `/proc/self/fd` entry.
fn link_by_proc(file: &File, to: &Path) -> rustix::io::Result<()> {
    use std::os::fd::AsRawFd;
    let by_proc = format!("/proc/self/fd/{}", file.as_raw_fd());
    rustix::fs::linkat(rustix::fs::CWD, by_proc.as_str(), rustix::fs::CWD, to, rustix::fs::AtFlags::SYMLINK_FOLLOW)
}

/// The export through a named temporary file `tmp`, renamed into place.
fn write_named(tmp: &Path, dest: &Path, parts: &[&[u8]], overwrite: bool) -> Result<()> {
    let result = fsutil::create_new(tmp, "create temporary export file").and_then(|mut file| {
        write_parts(&mut file, parts, tmp)?;
        drop(file);
        rename_into_place(tmp, dest, overwrite)
    });
    if result.is_err() {
        let _ = fs::remove_file(tmp);
    }
    result
}

/// Renames `tmp` to `dest`, refusing to replace a file unless `overwrite`; removes `tmp`
/// if the rename fails.
fn rename_into_place(tmp: &Path, dest: &Path, overwrite: bool) -> Result<()> {
    let flags = if overwrite { rustix::fs::RenameFlags::empty() } else { rustix::fs::RenameFlags::NOREPLACE };
    rustix::fs::renameat_with(rustix::fs::CWD, tmp, rustix::fs::CWD, dest, flags).map_err(|e| {
        let _ = fs::remove_file(tmp);
        if e == rustix::io::Errno::EXIST {
            Error::AlreadyExists { what: "export destination", path: dest.to_owned() }
        } else {
            Error::io("move export file into place at", dest, e.into())
        }
    })
}

/// Reads the payload of a file written by `WorkflowContext::export_data`.
///
/// The file's magic, version, length and checksum are checked: a damaged or truncated file
/// is [`Error::Corrupt`]. For values saved with `save_bytes` this is exactly the bytes
/// saved; for typed values, their postcard encoding (see [`read_exported`]).
pub fn read_exported_bytes(path: impl AsRef<Path>) -> Result<Vec<u8>> {
    Ok(read(path.as_ref())?.payload)
}

/// Reads a typed value from a file written by `WorkflowContext::export_data`.
///
/// A value saved as raw bytes (`save_bytes`) is [`Error::Codec`]: read it with
/// [`read_exported_bytes`].
///
/// ```
/// # fn main() -> workflow_context::Result<()> {
/// use workflow_context::{WorkflowContext, read_exported};
/// let dir = tempfile::tempdir().unwrap();
/// let ctx = WorkflowContext::builder().contexts_dir(dir.path()).create()?;
/// ctx.save("params", &(7u32, "euler".to_string()))?;
/// ctx.export_data("params", dir.path().join("out/params.wfx"), false)?;
/// let back: (u32, String) = read_exported(dir.path().join("out/params.wfx"))?;
/// assert_eq!(back, (7, "euler".to_string()));
/// assert!(!ctx.contains("params")?, "exporting moves the value out of the context");
/// # Ok(()) }
/// ```
pub fn read_exported<T: DeserializeOwned>(path: impl AsRef<Path>) -> Result<T> {
    let path = path.as_ref();
    let exported = read(path)?;
    if exported.flags & u16::from(context_core::record::FLAG_TYPED) == 0 {
        return Err(Error::Codec {
            key: exported.key,
            op: "decode",
            message: format!("{} holds raw bytes (save_bytes): read it with read_exported_bytes", path.display()),
        });
    }
    crate::codec::decode(&exported.payload, &exported.key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a/b/x.wfx");
        write(&dest, "κ/../key", 1, b"payload", false).unwrap();
        let back = read(&dest).unwrap();
        assert_eq!(back, Exported { key: "κ/../key".into(), flags: 1, payload: b"payload".to_vec() });
        let bytes = fs::read(&dest).unwrap();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(matches!(decode(&bad, &dest), Err(Error::Corrupt { .. })), "flip at {i}");
        }
        for cut in 0..bytes.len() {
            assert!(matches!(decode(&bytes[..cut], &dest), Err(Error::Corrupt { .. })), "cut at {cut}");
        }
        assert!(matches!(write(&dest, "k", 0, b"new", false), Err(Error::AlreadyExists { .. })));
        assert_eq!(read(&dest).unwrap().payload, b"payload", "a refused export leaves the old file");
        write(&dest, "k", 0, b"new", true).unwrap();
        assert_eq!(read(&dest).unwrap().payload, b"new");
        let leftovers: Vec<_> = fs::read_dir(dest.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers.len(), 1, "no temporary files left: {leftovers:?}");
    }

    #[test]
    fn the_checksum_covers_where_the_key_ends() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x.wfx");
        write(&dest, "k", 0, b"PAYLOAD", false).unwrap();
        let mut bytes = fs::read(&dest).unwrap();
        assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), 2);
        // Three bytes moved from the payload to the key: the same bytes in the same order.
        bytes[12..16].copy_from_slice(&4u32.to_le_bytes());
        bytes[16..24].copy_from_slice(&4u64.to_le_bytes());
        assert!(matches!(decode(&bytes, &dest), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn version_1_files_are_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x.wfx");
        // A version 1 file, as the builds before version 2 wrote it.
        let (key, payload) = (b"key".as_slice(), b"payload".as_slice());
        // Flags 3, not 1, so that a checksum of the version bytes would not pass for one of
        // the flags.
        let mut x = Xxh3::new();
        x.update(&3u16.to_le_bytes());
        x.update(key);
        x.update(payload);
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&1u16.to_le_bytes());
        bytes.extend_from_slice(&3u16.to_le_bytes());
        bytes.extend_from_slice(&(key.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&x.digest().to_le_bytes());
        bytes.extend_from_slice(key);
        bytes.extend_from_slice(payload);
        let back = decode(&bytes, &dest).unwrap();
        assert_eq!(back, Exported { key: "key".into(), flags: 3, payload: payload.to_vec() });
        bytes[8] = 3;
        assert!(matches!(decode(&bytes, &dest), Err(Error::Corrupt { .. })), "version 3 is unknown");
    }

    /// Everything in `dir`, by name.
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn an_unnamed_file_is_linked_into_place() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x.wfx");
        let parts: [&[u8]; 2] = [b"first ", b"file"];
        let no_name = || -> Result<PathBuf> { panic!("a new file needs no temporary name") };
        if !write_unnamed(dir.path(), &dest, &parts, false, no_name).unwrap() {
            eprintln!("skipped: the file system under {} has no O_TMPFILE", dir.path().display());
            return;
        }
        assert_eq!(fs::read(&dest).unwrap(), b"first file");
        // The link without privilege, through /proc, where /proc is mounted.
        if Path::new("/proc/self/fd").exists() {
            let flags = rustix::fs::OFlags::TMPFILE | rustix::fs::OFlags::WRONLY;
            let fd = rustix::fs::openat(rustix::fs::CWD, dir.path(), flags, rustix::fs::Mode::from_raw_mode(0o600));
            let mut file = File::from(fd.unwrap());
            file.write_all(b"by proc").unwrap();
            link_by_proc(&file, &dir.path().join("p.wfx")).unwrap();
            assert_eq!(fs::read(dir.path().join("p.wfx")).unwrap(), b"by proc");
            fs::remove_file(dir.path().join("p.wfx")).unwrap();
        }
        let refused = write_unnamed(dir.path(), &dest, &[b"second"], false, no_name);
        assert!(matches!(refused, Err(Error::AlreadyExists { .. })), "{refused:?}");
        assert_eq!(fs::read(&dest).unwrap(), b"first file");
        let tmp = dir.path().join(".x.wfx.1.tmp");
        assert!(write_unnamed(dir.path(), &dest, &[b"second"], true, || Ok(tmp.clone())).unwrap());
        assert_eq!(fs::read(&dest).unwrap(), b"second");
        assert_eq!(names(dir.path()), ["x.wfx"]);
    }

    #[test]
    fn the_named_fallback_renames_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x.wfx");
        let tmp = dir.path().join(".x.wfx.1.tmp");
        write_named(&tmp, &dest, &[b"one"], false).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"one");
        let refused = write_named(&tmp, &dest, &[b"two"], false);
        assert!(matches!(refused, Err(Error::AlreadyExists { .. })), "{refused:?}");
        assert_eq!(fs::read(&dest).unwrap(), b"one");
        assert_eq!(names(dir.path()), ["x.wfx"], "the refused temporary file is removed");
        write_named(&tmp, &dest, &[b"two"], true).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"two");
        assert_eq!(names(dir.path()), ["x.wfx"]);
        // A destination in a directory that is gone: an error naming it, nothing left.
        let gone = dir.path().join("gone/x.wfx");
        let err = write_named(&dir.path().join("gone/.x.tmp"), &gone, &[b"3"], false).unwrap_err();
        assert!(err.to_string().contains("gone"), "{err}");
        assert_eq!(names(dir.path()), ["x.wfx"]);
    }
}
