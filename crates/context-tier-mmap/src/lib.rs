//! A disk tier of workflow-context: one memory-mapped file per value.
//!
//! [`MmapTier`] keeps every object in its own file, `<dir>/<id>.val`, in a directory private
//! to the context (mode 0700, files 0600). Any process that builds an [`MmapTier`] over the
//! same directory sees the same objects.
//!
//! A tier holds its directory open and finds every file relative to it, so it keeps to the
//! directory it was built over: once that is renamed, removed or replaced by another at the
//! same path (the next context of the same run id, say), the tier never reads, writes or
//! deletes a file of the directory now at its path.
//!
//! # What it is for
//! - Values that do not fit the RAM budget: they go to disk instead of failing the save.
//! - Large values read without a copy: [`StorageTier::get`] of an object of 64 KiB or
//!   more maps the file read-only and hands out a view of the mapping, so a load costs O(1)
//!   whatever the size, and the pages are read from the page cache only when touched.
//!
//! # What it costs
//! - A file, an `fallocate(2)` and either a write or a mapping per stored value; an `open`
//!   plus a read (small values) or a mapping (large ones) per load; an `unlink` per delete.
//! - Each value holds whole file-system blocks: its footprint is its file's length rounded
//!   up to 4096 bytes. An object of 64 KiB or more starts 96 bytes into its file (see
//!   below).
//! - No `fsync`: the data is ephemeral scratch data of a workflow run, so it is not made
//!   durable and may be lost (or, after a crash of the machine, left incomplete) on power
//!   loss. The context checks every record it reads back.
//!
//! # When to choose it, and when not
//! Choose it for values of tens of kilobytes and up that overflow RAM, or that readers want
//! zero-copy. Do not choose it for many tiny values: each costs at least a 4 KiB block, an
//! inode and several system calls; the shared-memory tier or a database tier suits them
//! better.
//!
//! # Layout
//! An object smaller than 64 KiB fills its file from the start. A larger one starts at
//! offset 96 ([`context_core::record::LARGE_RECORD_OFFSET`]; the bytes before it read as
//! zeros and hold nothing), so that the payload of a context's record, after its 32-byte
//! header, starts 128 bytes into a page. Both the save and the load gain:
//! - The kernel copies a write into the page cache page by page, and on the AMD EPYC VM this
//!   was measured on that copy runs at half speed when its destination is about 16 bytes
//!   ahead of its source within a page: a payload 32 bytes into the file, written from a
//!   buffer of glibc's `malloc` (16 bytes into its page), took 133 ms for 256 MiB against
//!   65 ms at 128 bytes (`fs::write` of the same bytes: 68 ms).
//! - A copy out of a loaded view (`to_vec`) into such a buffer runs at half speed or less
//!   when the view starts on a page: 0.90 GB/s for 256 MiB, against 1.60 GB/s with the
//!   payload 128 bytes in (memcpy into fresh memory: 1.62 GB/s).
//! - A loaded value's view is 128-byte aligned, as tensors and SIMD readers prefer.
//!
//! # Space and safety
//! Space is reserved with `fallocate(2)` before any byte is written, so a full file system
//! answers [`PutOutcome::NoSpace`] and leaves nothing behind instead of raising `SIGBUS`
//! in a write through a mapping. On a file system without `fallocate` the tier writes with
//! `pwrite(2)` only (never through a mapping), so a full disk is still an answer, not a
//! crash.
//!
//! A loaded large value is a mapping of its file. If someone truncates that file while the
//! mapping is in use, touching the bytes past the new end raises `SIGBUS`; no reader that
//! maps files can prevent this. Value files are mode 0600 in a 0700 directory and are never
//! modified once written, so only the same user, acting behind the tier's back, can do it.
//! Deleting a value (`unlink`) is always safe: mappings keep the old bytes.
//!
//! # Example
//! ```
//! use context_core::{NewObject, ObjectData, ObjectId, PutOutcome, StorageTier};
//! use context_tier_mmap::{MmapConfig, MmapTier};
//!
//! let scratch = tempfile::tempdir()?;
//! let tier = MmapTier::new(MmapConfig::new(scratch.path().join("values")))?;
//!
//! let bytes = b"a value that did not fit in RAM";
//! let object = NewObject { id: ObjectId(1), len: bytes.len() as u64, data: ObjectData::Parts(&[bytes]) };
//! let PutOutcome::Stored(stored) = tier.put(object)? else { panic!("the disk is full") };
//!
//! let payload = tier.get(&stored)?.expect("just stored");
//! assert_eq!(&*payload, bytes);
//!
//! tier.destroy()?;
//! assert!(tier.get(&stored)?.is_none());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use context_core::{
    Capabilities, Error, FileAt, Location, NewObject, ObjectId, ObjectRef, Payload, PutOutcome, Result, StorageKind,
    StorageTier, TierUsage, WriteFailure,
};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

/// The tier's name, recorded in the index beside each object.
const NAME: &str = "mmap";
/// The extension of value files.
const EXTENSION: &str = "val";
/// The file-system block every footprint is rounded to.
const BLOCK: u64 = 4096;
/// Objects smaller than this are read into memory; the others are mapped (a context keeps
/// views of records from this size on, so a copy it would keep is never handed out).
const READ_LIMIT: u64 = 64 * 1024;
/// Where a mapped object (of [`READ_LIMIT`] or more) starts in its file: so that a
/// context record's payload, after its header, starts 128 bytes into a page (see the
/// [crate] docs).
const MAPPED_OFFSET: u64 = context_core::record::LARGE_RECORD_OFFSET;

/// Where an object of `len` bytes starts in its file.
fn offset_of(len: u64) -> u64 {
    if len >= READ_LIMIT { MAPPED_OFFSET } else { 0 }
}

/// The blocks a file of `size` bytes holds, in bytes.
fn blocks(size: u64) -> u64 {
    size.checked_next_multiple_of(BLOCK).unwrap_or(u64::MAX)
}

/// The configuration of an [`MmapTier`]: the directory that holds one context's value files.
#[derive(Clone, Debug)]
pub struct MmapConfig {
    dir: PathBuf,
}

impl MmapConfig {
    /// A configuration keeping value files in `dir`.
    ///
    /// [`MmapTier::new`] creates `dir` (mode 0700) if it is missing; its parent must exist.
    /// The directory belongs to one context: [`StorageTier::destroy`] removes it whole.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        MmapConfig { dir: dir.into() }
    }
}

/// A disk tier keeping one file per object in a private directory; see the [crate] docs.
///
/// Cheap to build: it holds one descriptor, of its directory, and any number of instances,
/// in any number of processes, can share one directory.
#[derive(Debug)]
pub struct MmapTier {
    dir: PathBuf,
    /// The directory, open: every file is found relative to it (see the [crate] docs).
    fd: OwnedFd,
    /// The directory's device and inode, to tell it from another at its path.
    id: (u64, u64),
}

impl MmapTier {
    /// Opens the tier over `config`'s directory, creating the directory (mode 0700) if it
    /// is missing.
    ///
    /// # Errors
    /// [`Error::Io`] naming the directory if it cannot be created (for example, its parent
    /// is missing), or if it exists but is a symbolic link, not a directory, or not owned by
    /// the effective user of this process.
    pub fn new(config: MmapConfig) -> Result<Self> {
        let dir = config.dir;
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io("create value directory", dir, e)),
        }
        check_dir(&dir)?;
        const OP: &str = "open value directory";
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::open(&dir, flags, Mode::empty()).map_err(|e| Error::io(OP, &dir, e.into()))?;
        // What was checked by path is what was opened.
        let stat = rustix::fs::fstat(&fd).map_err(|e| Error::io(OP, &dir, e.into()))?;
        let euid = rustix::process::geteuid().as_raw();
        if stat.st_uid != euid {
            let why = format!("is owned by uid {}, not by this process's uid {euid}", stat.st_uid);
            return Err(Error::io(OP, &dir, io::Error::other(why)));
        }
        Ok(MmapTier { dir, fd, id: (stat.st_dev, stat.st_ino) })
    }

    /// The directory that holds this context's value files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where object `id`'s file is, for messages: the tier opens it by name, relative to
    /// its directory.
    fn path_of(&self, id: ObjectId) -> PathBuf {
        self.dir.join(file_name(id))
    }

    fn unlink(&self, name: &str) -> io::Result<()> {
        rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()).map_err(io::Error::from)
    }
}

/// The name of object `id`'s file in the tier's directory.
fn file_name(id: ObjectId) -> String {
    format!("{id}.{EXTENSION}")
}

/// Refuses a directory that is a symbolic link, not a directory, or someone else's.
fn check_dir(dir: &Path) -> Result<()> {
    const OP: &str = "open value directory";
    let meta = fs::symlink_metadata(dir).map_err(|e| Error::io(OP, dir, e))?;
    let refuse = |why: &str| Error::io(OP, dir, io::Error::other(why.to_owned()));
    if meta.file_type().is_symlink() {
        return Err(refuse("is a symbolic link, not a directory"));
    }
    if !meta.is_dir() {
        return Err(refuse("is not a directory"));
    }
    let euid = rustix::process::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(refuse(&format!("is owned by uid {}, not by this process's uid {euid}", meta.uid())));
    }
    Ok(())
}

/// Whether an error means the file system (or the user's quota) is full.
fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == Errno::NOSPC.raw_os_error() || code == Errno::DQUOT.raw_os_error())
}

/// Opens the existing value file `name` of `tier` for reading, never through a symbolic
/// link and never blocking (on a FIFO planted in its place).
fn open_for_read(tier: &MmapTier, name: &str) -> io::Result<File> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    Ok(File::from(rustix::fs::openat(&tier.fd, name, flags, Mode::empty())?))
}

/// Reads up to `len` bytes of `file` from `offset` with one `pread`, fewer if the file ends
/// first (cut short since it was measured, or shorter than asked for).
///
/// Why one: Linux returns fewer bytes than asked from a regular file only at its end (or to
/// a process a fatal signal is killing), so a second read to find the end would only repeat
/// the answer. Nor `read_to_end`: for a `File`, std asks the kernel for the file's size and
/// position first (`statx` and `lseek`) and reads once more to find the end, four system
/// calls more than this on the path of every small load from this tier.
fn read_at_most(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut bytes = vec![0; len];
    let read = loop {
        match file.read_at(&mut bytes, offset) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            read => break read?,
        }
    };
    bytes.truncate(read);
    Ok(bytes)
}

/// A value file being written: removed on drop unless [`NewFile::keep`] was called, so no
/// error path (nor a panic in a fill closure) leaves a partial object behind.
struct NewFile<'a> {
    tier: &'a MmapTier,
    name: &'a str,
    path: &'a Path,
    file: File,
    keep: bool,
}

impl NewFile<'_> {
    /// Removes the file now and returns `result` (the reason it is being dropped).
    fn discard<T>(mut self, result: Result<T>) -> Result<T> {
        self.keep = true;
        match self.tier.unlink(self.name) {
            Ok(()) => result,
            Err(e) if e.kind() == io::ErrorKind::NotFound => result,
            // The object's own failure matters more; report the cleanup failure only when
            // there is nothing else to report.
            Err(e) => result.and(Err(Error::io("remove incomplete value file", self.path, e))),
        }
    }
}

impl Drop for NewFile<'_> {
    fn drop(&mut self) {
        if !self.keep {
            let _ = self.tier.unlink(self.name);
        }
    }
}

/// Reserves the blocks of a new file of `size` bytes before anything is written, so a full
/// disk shows up here as `ENOSPC`. A file system without `fallocate` gets a sparse file
/// instead, and a full disk then shows up as `ENOSPC` from the writes.
fn reserve(file: &File, size: u64) -> io::Result<()> {
    match context_core::space::reserve(file, size) {
        Err(e) if e.kind() == io::ErrorKind::Unsupported => file.set_len(size),
        reserved => reserved,
    }
}

/// Small pieces are gathered into writes of this size; larger ones go straight through.
const WRITE_BUFFER: usize = 256 << 10;

impl StorageTier for MmapTier {
    fn name(&self) -> &str {
        NAME
    }

    fn kind(&self) -> StorageKind {
        StorageKind::Disk
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(true, true)
    }

    /// The file's length (the object's, plus 96 bytes from 64 KiB) rounded up to the
    /// 4096-byte file-system block.
    fn footprint(&self, len: u64) -> u64 {
        blocks(len.saturating_add(offset_of(len)))
    }

    /// Creates `<dir>/<id>.val` (never through a symbolic link, never over an existing
    /// file), reserves its space with `fallocate`, then writes it with `pwrite` (large
    /// pieces straight from the caller's memory, small ones through a buffer), from offset
    /// 96 if it is 64 KiB or more (see the [crate] docs). The data is not `fsync`ed.
    fn put(&self, mut object: NewObject<'_>) -> Result<PutOutcome> {
        let id = object.id;
        let len = object.len;
        let name = file_name(id);
        let path = self.path_of(id);
        let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let file = match rustix::fs::openat(&self.fd, &name, flags, Mode::from_raw_mode(0o600)) {
            Ok(fd) => File::from(fd),
            // Out of inodes, or of quota.
            Err(e) if is_no_space(&e.into()) => return Ok(PutOutcome::NoSpace),
            Err(e) => return Err(Error::io("create value file", path, e.into())),
        };
        let mut new = NewFile { tier: self, name: &name, path: &path, file, keep: false };

        let offset = offset_of(len);
        match reserve(&new.file, len.saturating_add(offset)) {
            Ok(()) => {}
            Err(e) if is_no_space(&e) => return new.discard(Ok(PutOutcome::NoSpace)),
            Err(e) => return new.discard(Err(Error::io("reserve space for value file", &path, e))),
        };

        // Sparse (no fallocate on this file system) or not, the bytes go in with pwrite:
        // a full disk then shows as ENOSPC from write(2), never as SIGBUS from a mapping.
        let mut sink = io::BufWriter::with_capacity(WRITE_BUFFER, FileAt::new(&new.file, offset));
        let written = object.write_to(&mut sink);
        drop(sink);
        match written {
            Ok(()) => {}
            Err(WriteFailure::Sink(e)) if is_no_space(&e) => return new.discard(Ok(PutOutcome::NoSpace)),
            Err(WriteFailure::Sink(e)) => return new.discard(Err(Error::io("write value file", &path, e))),
            Err(WriteFailure::Data(e)) => return new.discard(Err(e)),
        }

        new.keep = true;
        Ok(PutOutcome::Stored(ObjectRef { id, len, slot: 0, held: self.footprint(len) }))
    }

    /// Returns the object's bytes as its file holds them, at their actual length (a file cut
    /// short gives fewer bytes; a small object's file grown longer, one byte more than the
    /// object): read into memory below 64 KiB, a view of the file mapped read-only from
    /// 64 KiB on (see the [crate] docs on truncation).
    fn get(&self, object: &ObjectRef) -> Result<Option<Payload>> {
        // The path only names the file in errors: a read opens it by name in the directory.
        let path = || self.path_of(object.id);
        let file = match open_for_read(self, &file_name(object.id)) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("open value file", path(), e)),
        };
        if object.len < READ_LIMIT {
            // A small object fills its file from the start. Reading one byte more than it
            // has tells a file of the right length from a longer one (whose record the
            // context then refuses) without asking for the file's size: a load from this
            // tier is three system calls. The read is bounded, and the file was opened
            // without following links and without blocking, so whatever else stands at the
            // name (a directory, a FIFO) is an error or a short read, never a hang.
            let bytes =
                read_at_most(&file, 0, object.len as usize + 1).map_err(|e| Error::io("read value file", path(), e))?;
            return Ok(Some(Payload::from_vec(bytes)));
        }
        let meta = file.metadata().map_err(|e| Error::io("inspect value file", path(), e))?;
        if !meta.is_file() {
            return Err(Error::io("open value file", path(), io::Error::other("not a regular file")));
        }
        // Where the object starts follows from its length; a file cut short before that
        // holds none of it.
        let offset = offset_of(object.len).min(meta.len());
        let available = meta.len() - offset;
        if available < READ_LIMIT {
            // A large object's file cut short.
            let bytes =
                read_at_most(&file, offset, available as usize).map_err(|e| Error::io("read value file", path(), e))?;
            return Ok(Some(Payload::from_vec(bytes)));
        }
        // SAFETY: the mapping is read-only and private to this payload. The file is a
        // regular file (checked above) that the tier never modifies after `put` returned,
        // and deleting it only unlinks the name, which leaves the mapping intact. The one
        // remaining hazard, another process of the same user truncating the file while the
        // mapping is in use (SIGBUS on access past the new end), cannot be excluded by any
        // mapping-based reader and is documented in the crate docs.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io("map value file", path(), e))?;
        // The mapping covers the file as it is now, which a truncation since the `fstat`
        // above may have cut shorter still.
        let end = map.len();
        let start = (offset as usize).min(end);
        Ok(Some(Payload::from_shared(Arc::new(map)).slice(start..end)))
    }

    /// Unlinks the object's file; the slot is not used.
    fn delete(&self, object: &ObjectRef) -> Result<bool> {
        match self.unlink(&file_name(object.id)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("remove value file", self.path_of(object.id), e)),
        }
    }

    fn locate(&self, object: &ObjectRef) -> Location {
        Location { shm_name: None, path: Some(self.path_of(object.id)) }
    }

    /// Lists the directory: every regular `*.val` file counts as an object of its length.
    fn usage(&self) -> Result<TierUsage> {
        const OP: &str = "list value directory";
        let entries = rustix::fs::Dir::read_from(&self.fd).map_err(|e| Error::io(OP, &self.dir, e.into()))?;
        let mut usage = TierUsage::default();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(OP, &self.dir, e.into()))?;
            let name = entry.file_name();
            if Path::new(OsStr::from_bytes(name.to_bytes())).extension().is_none_or(|ext| ext != EXTENSION) {
                continue;
            }
            // Symbolic links are not followed. A file deleted meanwhile no longer counts.
            let stat = match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat) => stat,
                Err(Errno::NOENT) => continue,
                Err(e) => {
                    let path = self.dir.join(OsStr::from_bytes(name.to_bytes()));
                    return Err(Error::io("inspect value file", path, e.into()));
                }
            };
            if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
                continue;
            }
            usage.bytes = usage.bytes.saturating_add(blocks(stat.st_size as u64));
            usage.objects += 1;
        }
        Ok(usage)
    }

    /// Removes the directory with everything in it; a missing directory is success. Only
    /// the tier's own directory: another one at its path is left alone (an error).
    fn destroy(&self) -> Result<()> {
        match fs::symlink_metadata(&self.dir) {
            Ok(meta) if meta.is_dir() && (meta.dev(), meta.ino()) == self.id => {}
            Ok(meta) if meta.is_dir() => {
                let why = io::Error::other("another directory has taken its path since the tier opened it; left alone");
                return Err(Error::io("remove value directory", &self.dir, why));
            }
            Ok(_) => {
                let why = io::Error::other("no longer a directory (a symbolic link?); left alone");
                return Err(Error::io("remove value directory", &self.dir, why));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("remove value directory", &self.dir, e)),
        }
        // `remove_dir_all` never follows symbolic links inside the directory.
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove value directory", &self.dir, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_at_most_stops_where_the_file_ends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..100u8).collect();
        fs::write(&path, &bytes).unwrap();
        let file = File::open(&path).unwrap();
        assert_eq!(read_at_most(&file, 0, 100).unwrap(), bytes);
        assert_eq!(read_at_most(&file, 10, 5).unwrap(), &bytes[10..15]);
        // Asked for more than there is (the file cut short since it was measured).
        assert_eq!(read_at_most(&file, 0, 150).unwrap(), bytes);
        assert_eq!(read_at_most(&file, 90, 50).unwrap(), &bytes[90..]);
        assert!(read_at_most(&file, 200, 10).unwrap().is_empty());
        assert!(read_at_most(&file, 0, 0).unwrap().is_empty());
    }
}
