//! A disk tier of workflow-context: many values, zstd-compressed, in one redb database file.
//!
//! [`RedbTier`] keeps every object of a context in one [redb](https://docs.rs/redb) database
//! file, one table entry each, compressed with zstd. Every process attached to the context
//! builds its own [`RedbTier`] over the same file, at any time, and sees what the others
//! commit.
//!
//! # What it is for
//! - Many small values: one file and one B-tree entry for all of them, instead of a file, an
//!   inode and at least a 4 KiB block each (as in the mmap tier). A 50-byte value counts as
//!   59 bytes held.
//! - Compressible values (text, JSON, tables, logs): stored compressed, with zstd at level 1
//!   by default ([`RedbConfig::zstd_level`]). Log-like text shrinks about 24 times. A value
//!   that does not shrink is stored as it is, so nothing ever holds more than its length
//!   plus a 9-byte header ([`StorageTier::footprint`]).
//!
//! # What it costs
//! - A redb write transaction per put and per delete, committed in redb's multi-process mode
//!   (`ConcurrencyMode::MultiWriter`): byte-range locks, three header writes and the
//!   allocator state on each commit. That is about 75 µs for a small value, against 8 µs for
//!   redb in one process without durability; a get is a read transaction, about 2 µs.
//!   Commits are serialized across all processes.
//! - zstd on every put and get: about 1.3 GB/s to put and 3.5 GB/s to get compressible
//!   values of 1 MiB (80 to 100 % of zstd alone); values of 4 MiB or more are compressed and
//!   decompressed in 1 MiB chunks on two threads, about 2.5 GB/s to put and 3 to 3.5 GB/s to
//!   get, faster than zstd alone on one thread.
//! - Large values that do not compress pay zstd's attempt and redb's copies for nothing:
//!   about 0.5 GB/s to put and 0.8 to 0.9 GB/s to get at 16 MiB.
//! - A get copies: it returns an owned buffer, never a view of the file
//!   ([`Capabilities::zero_copy`] is false).
//! - Memory: a put holds the blob it stores (the compressed value, or the value itself if it
//!   does not shrink), and redb holds a copy while it commits. A value of 4 MiB or more
//!   streamed through [`ObjectData::Write`](context_core::ObjectData::Write) is compressed
//!   chunk by chunk as it arrives, with at most three 1 MiB buffers of the original in
//!   memory; smaller streamed values are gathered whole first. A get holds the value. Each
//!   instance has its own redb page cache of up to 64 MiB.
//!
//! ## Measurements
//! `cargo run --release -p context-tier-redb --example durability` (one run; a 2-vCPU Xeon
//! VM, ext4 on a virtio disk, Linux 6.18; the medians were steady from run to run, the file
//! system's write speed was not):
//!
//! | 50-byte value | put (insert + commit), median | get, median |
//! |---|---|---|
//! | (a) `ExclusiveWriter`, `Durability::None`: one process only | 7.9 µs | 0.5 µs |
//! | (b) `MultiWriter`, redb's `FileBackend` (two `fsync`s a commit) | 430 µs | 2.0 µs |
//! | (c) `MultiWriter`, this tier's backend without `fsync`, through [`RedbTier`] | 73 µs | 2.0 µs |
//!
//! | Throughput | zstd -1 alone (one thread, in memory) | tier put | tier get |
//! |---|---|---|---|
//! | 1 MiB of log-like text (ratio 23.7, one frame) | 1.59 GB/s compress, 3.65 GB/s decompress | 1.30 GB/s | 3.50 GB/s |
//! | 16 MiB of the same (ratio 25, chunks on 2 threads) | 1.48 GB/s compress, 1.87 GB/s decompress | 2.48 GB/s | 3.04 GB/s |
//! | 16 MiB random (stored raw) | plain file write: 0.38 to 4.4 GB/s | 0.45 GB/s | 0.81 GB/s |
//!
//! Each get is the first through a new instance, as in another process (the file in the page
//! cache, the instance's own cache empty). Option (a) cannot serve a context: it locks the
//! whole file for one `Database`, so no other process could read the values, and
//! `Durability::None` is refused in the multi-process modes. (c) is what the tier does:
//! access from several processes is required, and the `fsync`s of (b) buy nothing for data
//! that dies with the run (the processes share the page cache, so they need no sync to see
//! each other's commits, and a process crash loses nothing written). (c) puts about six
//! times faster than (b) here, more on disks with slower `fsync`.
//!
//! # When to choose it, and when not
//! Choose it for many small or compressible values that overflow RAM: results of steps,
//! JSON, text, tables. Do not choose it for large values that readers want without a copy,
//! or that do not compress (already compressed images, model weights): the mmap tier maps
//! those zero-copy and writes them at file-system speed. Nor for a high rate of writes from
//! many processes at once: every put and delete takes the one writer lock of the file.
//!
//! # Blob format
//! Table `objects` maps the object id (`u64`) to a blob (`&[u8]`):
//!
//! | Bytes | Field |
//! |---|---|
//! | 0 | encoding: 0 raw, 1 zstd in one frame, 2 zstd in independent chunks |
//! | 1..9 | the object's length, u64 little-endian |
//! | encoding 0: 9.. | the object's bytes |
//! | encoding 1: 9.. | one zstd frame (with its content size) |
//! | encoding 2: 9..13 | the chunk size, u32 LE (1 MiB): every chunk but the last has it |
//! | encoding 2: 13..13 + 4n | the stored length of each of the n chunks, u32 LE |
//! | encoding 2: then | the chunks, in order: each a zstd frame, or the chunk's own bytes when its stored length equals its length |
//!
//! Objects under 4 MiB are one frame, larger ones chunks; either way an object whose blob
//! would not be shorter than its length plus 9 is stored raw. [`ObjectRef::held`] is the
//! blob's length, and [`StorageTier::usage`] sums the blobs' lengths. A get checks every
//! length in the blob against the blob's size before it allocates anything, and reports a
//! damaged blob as [`Error::Corrupt`] naming the file and the object.
//!
//! # Full disks
//! A full file system (`ENOSPC`, `EDQUOT`) anywhere in a put's transaction, commit included,
//! is [`PutOutcome::NoSpace`]: the transaction is aborted, the blocks it had filled are given
//! back (see below), and the instance opens a fresh redb handle, since redb refuses all
//! further work on a handle after an I/O error. The file grows sparse; redb fills it as it
//! writes, so a transaction can run out of space part way. The tier's storage backend
//! remembers what a write transaction wrote while it holds redb's writer lock, and punches
//! holes over it if the transaction runs out of space before its commit goes live. Those
//! pages are free, and named by no commit or reader.
//!
//! # Example
//! ```
//! use context_core::{NewObject, ObjectData, ObjectId, PutOutcome, StorageTier};
//! use context_tier_redb::{RedbConfig, RedbTier};
//!
//! let scratch = tempfile::tempdir()?;
//! let tier = RedbTier::new(RedbConfig::new(scratch.path().join("context.redb")))?;
//!
//! let bytes = b"a small result of a workflow step, one of many".repeat(100);
//! let object = NewObject { id: ObjectId(1), len: bytes.len() as u64, data: ObjectData::Parts(&[&bytes]) };
//! let PutOutcome::Stored(stored) = tier.put(object)? else { panic!("the disk is full") };
//! assert!(stored.held < bytes.len() as u64 / 10, "compressed");
//!
//! let payload = tier.get(&stored)?.expect("just stored");
//! assert_eq!(&*payload, &bytes[..]);
//!
//! tier.destroy()?;
//! assert!(tier.get(&stored)?.is_none());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod backend;
mod blob;

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use context_core::{
    Capabilities, Error, Location, NewObject, ObjectId, ObjectRef, Payload, PutOutcome, Result, StorageKind,
    StorageTier, TierUsage,
};
use redb::{
    Builder, ConcurrencyMode, Database, DatabaseError, ReadableDatabase, ReadableTable, TableDefinition, TableError,
};
use rustix::fs::OFlags;

use crate::backend::ScratchBackend;
use crate::blob::{EncodeError, Encoded};

/// The tier's name, recorded in the index beside each object.
const NAME: &str = "redb";
/// The one table: object id → blob.
const OBJECTS: TableDefinition<u64, &[u8]> = TableDefinition::new("objects");
/// The zstd level unless configured otherwise.
const DEFAULT_ZSTD_LEVEL: i32 = 1;
/// redb's page cache, per process. redb's default (1 GiB) is meant for a database that owns
/// the machine; this is one context among several processes, each with its own cache, and
/// every commit by another process empties it anyway.
const CACHE_BYTES: usize = 64 << 20;
/// How long [`RedbTier::new`] retries while redb reports the file as open elsewhere in a
/// mode that excludes this one (a handle of plain redb, say). Processes opening the tier at
/// the same moment never meet this: redb serializes multi-writer opens itself, under its
/// writer lock, and the first one initialises the file while the others wait.
const OPEN_PATIENCE: Duration = Duration::from_secs(1);

/// The configuration of a [`RedbTier`]: the database file of one context, and how hard to
/// compress.
#[derive(Clone, Debug)]
pub struct RedbConfig {
    path: PathBuf,
    zstd_level: i32,
}

impl RedbConfig {
    /// A configuration keeping the context's objects in the database file `path`.
    ///
    /// [`RedbTier::new`] creates the file (mode 0600) if it is missing; its parent directory
    /// must exist. The file belongs to one context: [`StorageTier::destroy`] removes it.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        RedbConfig { path: path.into(), zstd_level: DEFAULT_ZSTD_LEVEL }
    }

    /// The zstd compression level (default 1: fast, and most of the gain). Any level zstd
    /// accepts, negative ones (faster still) included; 0 means zstd's own default, 3.
    /// [`RedbTier::new`] refuses others.
    #[must_use]
    pub fn zstd_level(mut self, level: i32) -> Self {
        self.zstd_level = level;
        self
    }
}

/// A disk tier keeping every object of a context, compressed, in one redb database file;
/// see the [crate] docs.
///
/// Every process attached to the context builds its own instance over the same file, at any
/// time; each sees what the others commit.
pub struct RedbTier {
    path: PathBuf,
    level: i32,
    /// The device and inode of the file this tier opened, so that it never reopens or
    /// removes another file put at the same path.
    identity: (u64, u64),
    /// The open database. Replaced by a fresh handle when an I/O error (a full disk, say)
    /// has left it refusing every further operation, as redb handles do.
    db: RwLock<Arc<Database>>,
}

impl fmt::Debug for RedbTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbTier").field("path", &self.path).field("zstd_level", &self.level).finish_non_exhaustive()
    }
}

impl RedbTier {
    /// Opens the tier over `config`'s database file, creating the file (mode 0600) and an
    /// empty database in it if either is missing. Any number of processes may do this at
    /// once on the same file.
    ///
    /// # Errors
    /// - [`Error::Config`] naming `zstd_level` if the level is outside zstd's range.
    /// - [`Error::Io`] naming the file if it cannot be opened or created (its directory is
    ///   missing, it is a symbolic link or not a regular file), or does not hold a redb
    ///   database.
    pub fn new(config: RedbConfig) -> Result<Self> {
        let RedbConfig { path, zstd_level } = config;
        let levels = zstd::compression_level_range();
        if !levels.contains(&zstd_level) {
            return Err(Error::Config {
                source_name: "builder".into(),
                key: Some("zstd_level".into()),
                message: format!(
                    "{zstd_level} is not a zstd compression level (zstd accepts {} to {})",
                    levels.start(),
                    levels.end()
                ),
            });
        }
        let (db, identity) = open_database(&path, None)?;
        Ok(RedbTier { path, level: zstd_level, identity, db: RwLock::new(Arc::new(db)) })
    }

    /// The database file of this context.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn handle(&self) -> Arc<Database> {
        Arc::clone(&self.db.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Replaces `broken` by a fresh handle on the same file, unless another thread already
    /// has; returns the handle to use now.
    fn reopen(&self, broken: &Arc<Database>) -> Result<Arc<Database>> {
        let mut current = self.db.write().unwrap_or_else(PoisonError::into_inner);
        if Arc::ptr_eq(&current, broken) {
            let (db, _) = open_database(&self.path, Some(self.identity))?;
            *current = Arc::new(db);
        }
        Ok(Arc::clone(&current))
    }

    /// Runs `op` on the database. A failure that leaves the handle refusing further work (an
    /// I/O error, a failed commit) gets a fresh handle for later calls; if the failure was a
    /// leftover of an earlier one (`PreviousIo`), `op` is run again on the fresh handle.
    fn run<T>(&self, op: impl Fn(&Database) -> Result<T, Failed>) -> Result<T, Failed> {
        let db = self.handle();
        let failure = match op(&db) {
            Err(failure) if failure.breaks_handle() => failure,
            done => return done,
        };
        // If no fresh handle can be had now, the next call tries again.
        match self.reopen(&db) {
            Ok(fresh) if failure.is_leftover() => op(&fresh),
            _ => Err(failure),
        }
    }

    /// Converts a redb failure into the tier's error, naming the file and what was done.
    fn error(&self, op: &'static str, error: redb::Error) -> Error {
        match error {
            redb::Error::Io(e) => Error::io(op, &self.path, e),
            redb::Error::Corrupted(detail) => {
                Error::corrupt(format!("redb database {}", self.path.display()), format!("{op}: {detail}"))
            }
            other => Error::io(op, &self.path, io::Error::other(other)),
        }
    }

    /// After a failed commit, whose changes redb may or may not have applied, makes sure the
    /// object is not there.
    fn remove_leftover(&self, id: ObjectId) -> Result<()> {
        let present = self
            .run(|db| read_object(db, id, |blob| blob.len()).map(|found| found.is_some()))
            .map_err(|f| self.error("look for a partly stored object in redb database", f.error))?;
        if present {
            self.run(|db| remove_object(db, id))
                .map_err(|f| self.error("remove a partly stored object from redb database", f.error))?;
        }
        Ok(())
    }

    /// Removes the database file, if the path still names the file this tier opened.
    fn remove_file(&self) -> Result<()> {
        const OP: &str = "remove redb database";
        match fs::symlink_metadata(&self.path) {
            Ok(meta) if (meta.dev(), meta.ino()) == self.identity => {}
            // Removed already, perhaps by another process; or another file (a later
            // context's?) is there now, which is not this tier's to remove.
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(OP, &self.path, e)),
        }
        match fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(OP, &self.path, e)),
        }
    }
}

/// Opens (creating if missing) the database file, never through a symbolic link, and opens
/// the database in it for many writing processes. With `expect`, refuses a file other than
/// that one (and creates none).
fn open_database(path: &Path, expect: Option<(u64, u64)>) -> Result<(Database, (u64, u64))> {
    const OP: &str = "open redb database";
    let deadline = Instant::now() + OPEN_PATIENCE;
    loop {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(expect.is_none())
            .truncate(false)
            .mode(0o600)
            .custom_flags((OFlags::NOFOLLOW | OFlags::CLOEXEC).bits() as i32)
            .open(path)
            .map_err(|e| Error::io(OP, path, e))?;
        let identity = check_file(&file).map_err(|e| Error::io(OP, path, e))?;
        if expect.is_some_and(|expected| expected != identity) {
            let why = io::Error::other("the file was replaced since the tier opened it");
            return Err(Error::io(OP, path, why));
        }
        let backend = ScratchBackend::new(file).map_err(|e| Error::io(OP, path, io::Error::other(e)))?;
        let opened = Builder::new()
            .set_concurrency_mode(ConcurrencyMode::MultiWriter)
            .set_cache_size(CACHE_BYTES)
            .create_with_backend(backend);
        match opened {
            Ok(db) => return Ok((db, identity)),
            // Open elsewhere in a mode that excludes this one for now.
            Err(DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(DatabaseError::Storage(redb::StorageError::Io(e))) => return Err(Error::io(OP, path, e)),
            Err(e) => return Err(Error::io(OP, path, io::Error::other(e))),
        }
    }
}

/// Refuses anything but a regular file; returns its device and inode.
fn check_file(file: &File) -> io::Result<(u64, u64)> {
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    Ok((meta.dev(), meta.ino()))
}

/// A redb failure, and whether it came from a commit (whose changes may then have been
/// applied or not).
#[derive(Debug)]
struct Failed {
    error: redb::Error,
    committing: bool,
}

impl Failed {
    fn new(error: impl Into<redb::Error>) -> Self {
        Failed { error: error.into(), committing: false }
    }

    fn in_commit(error: impl Into<redb::Error>) -> Self {
        Failed { error: error.into(), committing: true }
    }

    /// Whether the handle refuses every further operation now (redb says: close and reopen).
    fn breaks_handle(&self) -> bool {
        self.committing || matches!(self.error, redb::Error::Io(_)) || self.is_leftover()
    }

    /// Whether the failure is an earlier one's, met before this operation did anything.
    fn is_leftover(&self) -> bool {
        matches!(self.error, redb::Error::PreviousIo | redb::Error::DatabaseClosed)
    }

    /// Whether the file system (or the user's quota) is full.
    fn is_no_space(&self) -> bool {
        matches!(&self.error, redb::Error::Io(e) if backend::is_no_space(e))
    }
}

/// Stores a blob under `id` in one write transaction.
fn write_object(db: &Database, id: ObjectId, encoded: &Encoded<'_>) -> Result<(), Failed> {
    let txn = db.begin_write().map_err(Failed::new)?;
    {
        let mut table = txn.open_table(OBJECTS).map_err(Failed::new)?;
        let len = usize::try_from(encoded.blob_len())
            .map_err(|_| Failed::new(redb::StorageError::ValueTooLarge(usize::MAX)))?;
        let mut slot = table.insert_reserve(id.0, len).map_err(Failed::new)?;
        // Only a compressed chunk of this process's own making can fail here (it is decoded
        // again to store the object raw), which would be a bug; the transaction is dropped.
        encoded.write_blob(slot.as_mut()).map_err(|detail| Failed::new(redb::StorageError::Corrupted(detail)))?;
    }
    txn.commit().map_err(Failed::in_commit)
}

/// Reads the blob under `id` in a read transaction and hands it to `f`.
fn read_object<T>(db: &Database, id: ObjectId, f: impl FnOnce(&[u8]) -> T) -> Result<Option<T>, Failed> {
    let txn = db.begin_read().map_err(Failed::new)?;
    let table = match txn.open_table(OBJECTS) {
        Ok(table) => table,
        // Nothing was ever stored, or the tier was destroyed.
        Err(TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(Failed::new(e)),
    };
    let found = table.get(id.0).map_err(Failed::new)?;
    Ok(found.map(|blob| f(blob.value())))
}

/// Removes the blob under `id` in one write transaction; whether it was there.
fn remove_object(db: &Database, id: ObjectId) -> Result<bool, Failed> {
    let txn = db.begin_write().map_err(Failed::new)?;
    let existed = {
        let mut table = txn.open_table(OBJECTS).map_err(Failed::new)?;
        table.remove(id.0).map_err(Failed::new)?.is_some()
    };
    txn.commit().map_err(Failed::in_commit)?;
    Ok(existed)
}

impl StorageTier for RedbTier {
    fn name(&self) -> &str {
        NAME
    }

    fn kind(&self) -> StorageKind {
        StorageKind::Disk
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(false, true).with_compression(true)
    }

    /// The length plus the 9-byte blob header: an object that does not shrink is stored raw,
    /// so no blob is longer.
    fn footprint(&self, len: u64) -> u64 {
        len.saturating_add(blob::HEADER as u64)
    }

    /// Compresses the object (on two threads from 4 MiB on; a streamed object chunk by chunk
    /// as it arrives), then inserts the blob and commits in one write transaction. A full
    /// file system anywhere in that is [`PutOutcome::NoSpace`], with the transaction aborted.
    fn put(&self, mut object: NewObject<'_>) -> Result<PutOutcome> {
        let (id, len) = (object.id, object.len);
        let encoded = match blob::encode(&mut object, self.level) {
            Ok(encoded) => encoded,
            Err(EncodeError::Data(e)) => return Err(e),
            Err(EncodeError::Compress(e)) => return Err(Error::io("compress object for redb database", &self.path, e)),
        };
        let held = encoded.blob_len();
        let failure = match self.run(|db| write_object(db, id, &encoded)) {
            Ok(()) => return Ok(PutOutcome::Stored(ObjectRef { id, len, slot: 0, held })),
            Err(failure) => failure,
        };
        if failure.committing {
            self.remove_leftover(id)?;
        }
        if failure.is_no_space() {
            Ok(PutOutcome::NoSpace)
        } else {
            Err(self.error("write to redb database", failure.error))
        }
    }

    /// Reads the blob in a read transaction and decodes it (on two threads for a chunked
    /// blob) into an owned payload.
    fn get(&self, object: &ObjectRef) -> Result<Option<Payload>> {
        let id = object.id;
        match self.run(|db| read_object(db, id, blob::decode)) {
            Ok(None) => Ok(None),
            Ok(Some(Ok(bytes))) => Ok(Some(Payload::from_vec(bytes))),
            Ok(Some(Err(detail))) => {
                Err(Error::corrupt(format!("object {id} in redb database {}", self.path.display()), detail))
            }
            Err(failure) => Err(self.error("read from redb database", failure.error)),
        }
    }

    /// Removes the object in one write transaction; the slot is not used.
    fn delete(&self, object: &ObjectRef) -> Result<bool> {
        self.run(|db| remove_object(db, object.id)).map_err(|f| self.error("delete from redb database", f.error))
    }

    fn locate(&self, _object: &ObjectRef) -> Location {
        Location { shm_name: None, path: Some(self.path.clone()) }
    }

    /// Reads every blob's length in one read transaction.
    fn usage(&self) -> Result<TierUsage> {
        let counted = self.run(|db| {
            let txn = db.begin_read().map_err(Failed::new)?;
            let table = match txn.open_table(OBJECTS) {
                Ok(table) => table,
                Err(TableError::TableDoesNotExist(_)) => return Ok(TierUsage::default()),
                Err(e) => return Err(Failed::new(e)),
            };
            let mut usage = TierUsage::default();
            for entry in table.iter().map_err(Failed::new)? {
                let (_, blob) = entry.map_err(Failed::new)?;
                usage.bytes += blob.value().len() as u64;
                usage.objects += 1;
            }
            Ok(usage)
        });
        counted.map_err(|f| self.error("read from redb database", f.error))
    }

    /// Deletes the table (every object) in one write transaction, then removes the file.
    /// Other processes may still have the file open: they find no objects in it.
    fn destroy(&self) -> Result<()> {
        let cleared = self.run(|db| {
            let txn = db.begin_write().map_err(Failed::new)?;
            txn.delete_table(OBJECTS).map_err(Failed::new)?;
            txn.commit().map_err(Failed::in_commit)
        });
        // The file goes even if the objects could not be deleted: that frees the space.
        let removed = self.remove_file();
        cleared.map_err(|f| self.error("delete every object in redb database", f.error))?;
        removed
    }
}
