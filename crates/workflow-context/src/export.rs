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

/// The fields of a header that passed [`check_header`].
struct Checked {
    flags: u16,
    key_len: usize,
    payload_len: usize,
    stored: u64,
}

/// Checks the header `h` of a file of `total` bytes: its magic, its version, and lengths
/// that add up to the file's (before anything of the sizes they announce is allocated).
/// `bad` makes the error.
fn check_header(h: &[u8], total: u64, bad: &dyn Fn(String) -> Error) -> Result<Checked> {
    let h = h.get(..HEADER).ok_or_else(|| bad(format!("{total} bytes is too short for an export file")))?;
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
    let body = total.saturating_sub(HEADER as u64);
    if key_len.checked_add(payload_len) != Some(body) {
        return Err(bad(format!(
            "the header announces {key_len} key bytes and {payload_len} payload bytes, the file holds {body} (truncated or extended)"
        )));
    }
    let too_large = || bad(format!("a payload of {payload_len} bytes is more than this machine can address"));
    Ok(Checked {
        flags,
        key_len: usize::try_from(key_len).map_err(|_| too_large())?,
        payload_len: usize::try_from(payload_len).map_err(|_| too_large())?,
        stored,
    })
}

/// Decodes export bytes read from `path`.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn decode(bytes: &[u8], path: &Path) -> Result<Exported> {
    decode_from(&mut &bytes[..], bytes.len() as u64, path)
}

/// Reads and checks an export file.
///
/// Only a regular file is read (a FIFO would block, a device such as `/dev/zero` would
/// never end).
pub(crate) fn read(path: &Path) -> Result<Exported> {
    use std::os::unix::fs::OpenOptionsExt;
    let io_err = |op, e| Error::io(op, path, e);
    // Non-blocking, so that opening a FIFO does not wait for a writer.
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(|e| io_err("open export file", e))?;
    let meta = file.metadata().map_err(|e| io_err("inspect export file", e))?;
    if !meta.is_file() {
        return Err(io_err("read export file", io::Error::new(io::ErrorKind::InvalidInput, "not a regular file")));
    }
    decode_from(&mut file, meta.len(), path)
}

/// Decodes the `total` bytes of an export file read from `r` (from `path`).
///
/// The header is checked against `total` before anything the size it announces is
/// allocated, so a foreign or damaged file costs no such allocation; the payload is read
/// into a buffer of its own, once.
fn decode_from(r: &mut dyn Read, total: u64, path: &Path) -> Result<Exported> {
    let bad = |detail: String| Error::corrupt(path.display().to_string(), detail);
    let read_err = |e| Error::io("read export file", path, e);
    let mut h = [0u8; HEADER];
    if total >= HEADER as u64 {
        r.read_exact(&mut h).map_err(read_err)?;
    }
    let c = check_header(if total >= HEADER as u64 { &h } else { &[] }, total, &bad)?;
    let mut read_exactly = |n: usize| -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        buf.try_reserve_exact(n).map_err(|_| read_err(io::ErrorKind::OutOfMemory.into()))?;
        r.take(n as u64).read_to_end(&mut buf).map_err(read_err)?;
        if buf.len() != n {
            return Err(bad(format!("the file shrank while it was read ({} bytes short)", n - buf.len())));
        }
        Ok(buf)
    };
    let key = read_exactly(c.key_len)?;
    let payload = read_exactly(c.payload_len)?;
    if sum(&h, &key, &payload) != c.stored {
        return Err(bad("checksum mismatch: the file is damaged".to_owned()));
    }
    let key = String::from_utf8(key).map_err(|_| bad("the key is not UTF-8".to_owned()))?;
    Ok(Exported { key, flags: c.flags, payload })
}

/// Writes an export file atomically, refusing to replace an existing file unless
/// `overwrite`: [`stage`], then [`Staged::place`] and [`Staged::sync`].
#[cfg(test)]
pub(crate) fn write(dest: &Path, key: &str, flags: u16, payload: &[u8], overwrite: bool) -> Result<()> {
    let mut staged = stage(dest, key, flags, payload, overwrite)?;
    while !staged.place()? {
        staged.restage_named()?;
    }
    staged.sync();
    Ok(())
}

/// An export file written and synced beside its destination, not yet in place.
///
/// [`place`](Staged::place) puts it there. Dropped before that, it leaves nothing: the
/// unnamed file goes with its descriptor, a named temporary file is removed, and so are
/// the directories [`stage`] made (those still empty).
pub(crate) struct Staged<'a> {
    dest: PathBuf,
    parent: PathBuf,
    overwrite: bool,
    header: [u8; HEADER],
    key: &'a [u8],
    payload: &'a [u8],
    /// The directories made for the file, deepest first.
    made: Vec<PathBuf>,
    temp: Temp,
}

enum Temp {
    /// Nothing written yet.
    None,
    /// An unnamed file (`O_TMPFILE`) in the destination directory.
    Unnamed(File),
    /// A named temporary file in the destination directory.
    Named(PathBuf),
    /// In place at the destination.
    Placed,
}

/// Writes the export file of `payload` beside `dest`, without putting it in place.
///
/// The bytes go into an unnamed file in the destination directory (`O_TMPFILE`), synced:
/// a process killed before [`Staged::place`] links it leaves nothing behind, because the
/// kernel frees an unnamed file with its last descriptor. Where the file system has no
/// unnamed files, a named temporary file (`.wfx-export.<random>.tmp`) is written instead;
/// a kill leaves that behind. Missing directories are made. An existing destination is
/// refused here already unless `overwrite` (and again by the placing).
pub(crate) fn stage<'a>(
    dest: &Path,
    key: &'a str,
    flags: u16,
    payload: &'a [u8],
    overwrite: bool,
) -> Result<Staged<'a>> {
    stage_with(dest, key, flags, payload, overwrite, true)
}

/// [`stage`], through an unnamed file only if `unnamed`.
fn stage_with<'a>(
    dest: &Path,
    key: &'a str,
    flags: u16,
    payload: &'a [u8],
    overwrite: bool,
    unnamed: bool,
) -> Result<Staged<'a>> {
    if dest.file_name().is_none() {
        return Err(Error::io("export to", dest, io::Error::other("the destination has no file name")));
    }
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    // The directories this export makes go again if it fails (see `Drop`).
    let made: Vec<PathBuf> = parent
        .ancestors()
        .take_while(|dir| !dir.as_os_str().is_empty() && fs::symlink_metadata(dir).is_err())
        .map(Path::to_owned)
        .collect();
    let mut staged = Staged {
        dest: dest.to_owned(),
        parent,
        overwrite,
        header: header(key, flags, payload),
        key: key.as_bytes(),
        payload,
        made,
        temp: Temp::None,
    };
    fs::create_dir_all(&staged.parent).map_err(|e| Error::io("create export directory", &staged.parent, e))?;
    if !overwrite && fs::symlink_metadata(dest).is_ok() {
        return Err(Error::AlreadyExists { what: "export destination", path: dest.to_owned() });
    }
    if !(unnamed && staged.write_unnamed()?) {
        staged.write_named()?;
    }
    Ok(staged)
}

impl Staged<'_> {
    /// Writes the file as an unnamed one; `false` if this file system cannot make one.
    fn write_unnamed(&mut self) -> Result<bool> {
        use rustix::fs::{CWD, Mode, OFlags};
        use rustix::io::Errno;
        let flags = OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC;
        let mut file = match rustix::fs::openat(CWD, &self.parent, flags, Mode::from_raw_mode(0o600)) {
            Ok(fd) => File::from(fd),
            // No unnamed files here (an older kernel reports EISDIR).
            Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => return Ok(false),
            Err(e) => return Err(Error::io("create export file in", &self.parent, e.into())),
        };
        self.write_parts(&mut file)?;
        self.temp = Temp::Unnamed(file);
        Ok(true)
    }

    /// Writes the file under a temporary name.
    fn write_named(&mut self) -> Result<()> {
        let tmp = tmp_name(&self.parent)?;
        let mut file = fsutil::create_new(&tmp, "create temporary export file")?;
        self.temp = Temp::Named(tmp);
        self.write_parts(&mut file)
    }

    /// Writes the header, key and payload to `file` and syncs it; errors name the
    /// destination.
    fn write_parts(&self, file: &mut File) -> Result<()> {
        for part in [&self.header[..], self.key, self.payload] {
            file.write_all(part).map_err(|e| Error::io("write export file", &self.dest, e))?;
        }
        file.sync_all().map_err(|e| Error::io("sync export file", &self.dest, e))
    }

    /// Writes the file again, under a temporary name: after [`place`](Self::place) found
    /// that this process cannot link an unnamed file.
    pub(crate) fn restage_named(&mut self) -> Result<()> {
        self.temp = Temp::None;
        self.write_named()
    }

    /// Puts the file at its destination: a link of the unnamed file (which refuses an
    /// existing destination), or a rename (which replaces one atomically, if `overwrite`).
    /// `Ok(false)` if this process cannot link an unnamed file (no `CAP_DAC_READ_SEARCH`
    /// for `AT_EMPTY_PATH`, and no `/proc`): nothing changed, and
    /// [`restage_named`](Self::restage_named) writes the file so that it can be renamed.
    pub(crate) fn place(&mut self) -> Result<bool> {
        use rustix::io::Errno;
        match &self.temp {
            Temp::Unnamed(file) if !self.overwrite => match link_unnamed(file, &self.dest) {
                Ok(()) => {}
                Err(Errno::EXIST) => {
                    return Err(Error::AlreadyExists { what: "export destination", path: self.dest.clone() });
                }
                Err(e) if cannot_link(e) => return Ok(false),
                Err(e) => return Err(Error::io("move export file into place at", &self.dest, e.into())),
            },
            Temp::Unnamed(file) => {
                // Replacing takes a name first: only a rename replaces a file atomically. A
                // kill between the two steps leaves the named file.
                let tmp = tmp_name(&self.parent)?;
                match link_unnamed(file, &tmp) {
                    Ok(()) => {}
                    Err(e) if cannot_link(e) => return Ok(false),
                    Err(e) => return Err(Error::io("link export file at", &tmp, e.into())),
                }
                self.temp = Temp::Named(tmp.clone());
                rename_into_place(&tmp, &self.dest, true)?;
            }
            Temp::Named(tmp) => rename_into_place(tmp, &self.dest, self.overwrite)?,
            Temp::None | Temp::Placed => {
                return Err(Error::io("export to", &self.dest, io::Error::other("no export file is staged")));
            }
        }
        self.temp = Temp::Placed;
        Ok(true)
    }

    /// Once the file is in place: syncs its directory, and the parent of each directory
    /// the export made, so that the file's name, and the names of the directories on its
    /// path, outlive a crash of the machine as its bytes do. Best effort: the file is in
    /// place whatever this finds.
    pub(crate) fn sync(&self) {
        for dir in self.dirs_to_sync() {
            if let Ok(dir) = File::open(dir) {
                let _ = dir.sync_all();
            }
        }
    }

    /// The directories [`sync`](Self::sync) syncs: the file's, and the parent of each one
    /// made for it.
    fn dirs_to_sync(&self) -> impl Iterator<Item = &Path> {
        let parents =
            self.made.iter().map(|d| d.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")));
        std::iter::once(self.parent.as_path()).chain(parents)
    }
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.temp, Temp::None) {
            Temp::Placed => return,
            Temp::Named(tmp) => {
                let _ = fs::remove_file(tmp);
            }
            Temp::Unnamed(_) | Temp::None => {}
        }
        // Deepest first; only empty ones go (`remove_dir`), so nothing anyone else put
        // there meanwhile is touched. Those never made (the export failed making a deeper
        // one, whose name was too long, say) are passed over, not taken for full.
        for dir in &self.made {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// A new temporary name in `parent`; not named after the destination, whose name may be as
/// long as a name can be.
fn tmp_name(parent: &Path) -> Result<PathBuf> {
    let mut rand = [0u8; 8];
    getrandom::fill(&mut rand).map_err(|e| Error::io("make a temporary name in", parent, io::Error::other(e)))?;
    Ok(parent.join(format!(".wfx-export.{:016x}.tmp", u64::from_le_bytes(rand))))
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
/// is [`Error::Corrupt`], and so is a foreign file, refused by its header before anything
/// the size it claims is allocated; a path that is no regular file (a directory, a FIFO, a
/// device) is [`Error::Io`]. For values saved with `save_bytes` this is exactly the bytes
/// saved; for typed values, their postcard encoding (see [`read_exported`]).
pub fn read_exported_bytes(path: impl AsRef<Path>) -> Result<Vec<u8>> {
    Ok(read(path.as_ref())?.payload)
}

/// Reads a typed value from a file written by `WorkflowContext::export_data`.
///
/// A value saved as raw bytes (`save_bytes`) is [`Error::Codec`]: read it with
/// [`read_exported_bytes`]. So is a value of another type than `T`; the error names the
/// key and the file.
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
    crate::codec::decode(&exported.payload, &exported.key).map_err(|e| match e {
        Error::Codec { key, op, message } => {
            Error::Codec { key, op, message: format!("{message} (in {})", path.display()) }
        }
        other => other,
    })
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
        let mut staged = stage_with(&dest, "k", 0, b"first", false, true).unwrap();
        if !matches!(staged.temp, Temp::Unnamed(_)) {
            eprintln!("skipped: the file system under {} has no O_TMPFILE", dir.path().display());
            return;
        }
        assert!(names(dir.path()).is_empty(), "nothing has a name before the file is placed");
        assert!(staged.place().unwrap());
        drop(staged);
        assert_eq!(read(&dest).unwrap().payload, b"first");
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
        // The link itself refuses a destination made after the file was staged.
        let other = dir.path().join("y.wfx");
        let mut staged = stage_with(&other, "k", 0, b"second", false, true).unwrap();
        fs::write(&other, b"someone else's").unwrap();
        assert!(matches!(staged.place(), Err(Error::AlreadyExists { .. })));
        drop(staged);
        assert_eq!(fs::read(&other).unwrap(), b"someone else's");
        // Replacing goes through a temporary name, renamed over the destination.
        let mut staged = stage_with(&dest, "k", 0, b"third", true, true).unwrap();
        assert!(staged.place().unwrap());
        drop(staged);
        assert_eq!(read(&dest).unwrap().payload, b"third");
        // Written again under a name (as when this process cannot link an unnamed file).
        let mut staged = stage_with(&dest, "k", 0, b"fourth", true, true).unwrap();
        staged.restage_named().unwrap();
        assert!(matches!(staged.temp, Temp::Named(_)));
        assert!(staged.place().unwrap());
        drop(staged);
        assert_eq!(read(&dest).unwrap().payload, b"fourth");
        assert_eq!(names(dir.path()), ["x.wfx", "y.wfx"]);
    }

    #[test]
    fn the_named_fallback_renames_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x.wfx");
        let mut staged = stage_with(&dest, "k", 0, b"one", false, false).unwrap();
        assert!(matches!(staged.temp, Temp::Named(_)));
        assert!(staged.place().unwrap());
        drop(staged);
        assert_eq!(read(&dest).unwrap().payload, b"one");
        // Refused by the rename (the destination was made after the file was staged).
        let other = dir.path().join("y.wfx");
        let mut staged = stage_with(&other, "k", 0, b"two", false, false).unwrap();
        fs::write(&other, b"someone else's").unwrap();
        assert!(matches!(staged.place(), Err(Error::AlreadyExists { .. })));
        drop(staged);
        assert_eq!(fs::read(&other).unwrap(), b"someone else's");
        assert_eq!(names(dir.path()), ["x.wfx", "y.wfx"], "the refused temporary file is removed");
        let mut staged = stage_with(&dest, "k", 0, b"two", true, false).unwrap();
        assert!(staged.place().unwrap());
        drop(staged);
        assert_eq!(read(&dest).unwrap().payload, b"two");
        assert_eq!(names(dir.path()), ["x.wfx", "y.wfx"]);
    }

    #[test]
    fn a_file_never_placed_leaves_nothing_nor_the_directories_made_for_it() {
        let dir = tempfile::tempdir().unwrap();
        for unnamed in [true, false] {
            drop(stage_with(&dir.path().join("made/for/it/x.wfx"), "k", 0, b"v", false, unnamed).unwrap());
            assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
        }
        // Making the directories fails part way (a name too long): those made go.
        let deep = dir.path().join("made/for").join("d".repeat(300)).join("x.wfx");
        let err = stage(&deep, "k", 0, b"v", false).err().unwrap();
        assert!(matches!(&err, Error::Io { path, .. } if path == deep.parent().unwrap()), "{err:?}");
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
    }

    #[test]
    fn the_names_on_the_path_of_a_placed_file_are_synced() {
        // The file's name is in its directory; each directory made for it, in its parent.
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("a")).unwrap();
        let mut staged = stage(&dir.path().join("a/b/c/x.wfx"), "k", 0, b"v", false).unwrap();
        assert!(staged.place().unwrap());
        let synced: Vec<&Path> = staged.dirs_to_sync().collect();
        let expected = [dir.path().join("a/b/c"), dir.path().join("a/b"), dir.path().join("a")];
        assert_eq!(synced, expected.iter().map(PathBuf::as_path).collect::<Vec<_>>());
        staged.sync();
    }

    #[test]
    fn what_is_no_export_file_is_refused_before_its_size_is_allocated() {
        let dir = tempfile::tempdir().unwrap();
        // A sparse file of 1 TiB: refused by its header, not read.
        let sparse = dir.path().join("sparse.wfx");
        File::create(&sparse).unwrap().set_len(1 << 40).unwrap();
        assert!(matches!(read(&sparse), Err(Error::Corrupt { what, .. }) if what.contains("sparse.wfx")));
        // A header claiming 1 TiB, on a file that holds less: refused by the lengths.
        write(&dir.path().join("x.wfx"), "k", 0, b"payload", false).unwrap();
        let mut bytes = fs::read(dir.path().join("x.wfx")).unwrap();
        bytes[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
        fs::write(dir.path().join("x.wfx"), &bytes).unwrap();
        assert!(matches!(read(&dir.path().join("x.wfx")), Err(Error::Corrupt { .. })));
        // No regular file: a device that never ends, a FIFO no one writes to, a directory.
        let fifo = dir.path().join("fifo.wfx");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        for path in [Path::new("/dev/zero"), &fifo, dir.path()] {
            match read(path) {
                Err(Error::Io { path: named, .. }) => assert_eq!(named, path),
                other => panic!("{}: {other:?}", path.display()),
            }
        }
    }
}
