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
//! - A redb write transaction per put of a value under 4 MiB and per delete, committed in
//!   redb's multi-process mode (`ConcurrencyMode::MultiWriter`): byte-range locks, three
//!   header writes and the allocator state on each commit. That is about 75 µs for a small
//!   value, against 8 µs for redb in one process without durability; a get is a read
//!   transaction, about 2 µs. Commits are serialized across all processes.
//! - A value of 4 MiB or more is stored in chunks (1 MiB less 4 KiB each), compressed on
//!   two threads as it arrives (a helper thread of the put's own takes every chunk it has
//!   time for; the putting thread, which also fills and stores them, the rest), and
//!   committed in a transaction per 1 MiB of compressed chunks: one commit per chunk that
//!   does not compress, one per several that do. Other processes' commits can interleave;
//!   the value exists for them only once its last transaction, which writes its manifest,
//!   commits.
//! - zstd on every put and get. A value of 128 KiB to 4 MiB is compressed in two halves,
//!   each in a zstd frame of its own: the process's helper thread (`redb-zstd`, started by
//!   the first such put and idle otherwise; none on a single CPU) compresses the first half
//!   while the putting thread takes in and compresses the second; if the helper has not
//!   started on its half by then (another put or another process keeps it busy), or finds
//!   itself woken on the putting thread's own CPU (the others are busy), the putting thread
//!   compresses that half too. With a second core free, a put of 1 MiB of log-like text
//!   through a context takes about as long as zstd alone on one thread (1.3 to 1.8 times
//!   when it was one frame on one thread); with no second core free, about 1.4 times. Two
//!   frames hold a little more than one: 3 to 5 % for text of 1 MiB, up to 25 % for very
//!   repetitive text of 128 to 256 KiB, next to nothing for JSON. A get decodes the two
//!   frames one after the other, as fast as one (about 3.3 GB/s at 1 MiB). Chunked values:
//!   about 1 GB/s to put and 1.3 to 2.3 GB/s to get, on two threads. Chunks that do not
//!   compress pay zstd's attempt for nothing, and are stored raw: about 1 GB/s to put and
//!   1.7 GB/s to get at 256 MiB.
//! - A get copies: it returns an owned buffer, never a view of the file
//!   ([`Capabilities::zero_copy`] is false).
//! - Memory: a put under 4 MiB holds its blob (the compressed value, or the value itself if
//!   it does not shrink; a streamed value is gathered whole first, in two halves from 128
//!   KiB on, and a value given whole lends the helper thread a copy of its first half), and
//!   redb a copy while it commits. Each thread that puts keeps a zstd context, and so does
//!   the helper thread; a thread that put a value of 128 KiB to 4 MiB also keeps the two
//!   buffers it gathered its halves in (up to 4 MiB), since fresh ones cost a page fault
//!   every 4 KiB. A chunked put holds, besides the caller's bytes, at most 1 MiB of
//!   compressed chunks waiting for their commit (plus the chunk that crossed it), four
//!   chunk buffers of the original (the one being filled or compressed on the putting
//!   thread, the one waiting for the helper thread, the one it compresses, a spare), and
//!   redb's cache: about 18 MiB at its peak whatever the value's size
//!   (`examples/peak_memory.rs`: 13 MiB for 256 MiB of text, 18 MiB for 256 MiB of random
//!   bytes, against 100 MiB and 768 MiB when a value was one entry). A get holds the
//!   value and one chunk per thread, plus redb's cache. Each instance has its own redb page
//!   cache of up to 8 MiB.
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
//! (Measured again with chunked storage and the 8 MiB cache: (c) 80 µs and 2.1 µs, (a) 8.6
//! µs and 0.5 µs; (b) 8 ms, the disk's `fsync` being far slower that day.)
//!
//! | Throughput | zstd -1 alone (one thread, in memory) | tier put | tier get |
//! |---|---|---|---|
//! | 1 MiB of log-like text (ratio 23.7, one frame) | 1.50 GB/s compress, 3.33 GB/s decompress | 1.23 GB/s | 3.12 GB/s |
//! | the same in two frames on two threads (held: 4 % more), a quiet day | 1.53 to 1.56 GB/s compress, 3.45 GB/s decompress | 1.50 GB/s (one frame, that day: 1.12 to 1.27 GB/s) | 3.16 to 3.21 GB/s |
//! | 16 MiB of the same (ratio 25, chunks on 2 threads) | 0.94 to 1.02 GB/s compress, 1.33 GB/s decompress | 0.71 to 1.10 GB/s | 1.55 to 2.31 GB/s |
//! | 16 MiB random (chunks stored raw) | plain file write: 0.25 to 3.8 GB/s | 0.58 to 1.00 GB/s | 3.19 to 3.25 GB/s |
//!
//! (The VM was noisier for these throughputs than for the latencies: zstd alone varied by a
//! third from run to run. Before chunked storage, on the same VM at the same time, the tier
//! put and got 16 MiB of text at 0.74 to 0.97 and 1.25 to 1.80 GB/s, and 16 MiB of random
//! bytes at 0.13 to 0.28 and 0.55 to 0.56 GB/s.)
//!
//! `cargo run --release -p context-tier-redb --example peak_memory` measures the peak memory
//! of a put and a get of 256 MiB in a fresh process (`VmHWM` above the value held):
//!
//! | 256 MiB, put streamed | held | put: peak above the value | get: peak above the value |
//! |---|---|---|---|
//! | log-like text (ratio 7.8) | 34.2 MB | 11.3 to 12.4 MiB (one entry: 100 MiB) | 5.8 to 7.1 MiB (one entry: 64 MiB) |
//! | random bytes | 268.4 MB | 14.2 to 15.5 MiB (one entry: 768 MiB) | 5.8 to 8.8 MiB (one entry: 512 MiB) |
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
//! Table `objects` maps the object id (`u64`) to a blob (`&[u8]`): the object itself if it is
//! under 4 MiB, else its manifest. Table `chunks` maps (object id, chunk index) (`(u64,
//! u32)`) to the blob of one chunk of a larger object, in the format of a small object's
//! blob (encoding 0 or 1).
//!
//! | Bytes | Field |
//! |---|---|
//! | 0 | encoding: 0 raw, 1 zstd in one frame, 3 manifest, 4 split in pieces (2, chunks inside the blob, was written by earlier versions and is not read) |
//! | 1..9 | the object's (or chunk's) length, u64 little-endian |
//! | encoding 0: 9.. | the bytes |
//! | encoding 1: 9.. | one zstd frame (with its content size), shorter than the bytes |
//! | encoding 3: 9..13 | the chunk size, u32 LE (1 MiB less 4 KiB, so that a raw chunk fits a 1 MiB page of redb): every chunk but the last has it |
//! | encoding 3: 13..13 + 4n | the length of each of the n chunks' blobs, u32 LE |
//! | encoding 4: 9..13 | the piece size p, u32 LE: every piece but the last has it (half the object, rounded up, for the objects of 128 KiB to 4 MiB this version splits) |
//! | encoding 4: 13..13 + 4n | the length of each of the n = ⌈length / p⌉ pieces' bodies, u32 LE |
//! | encoding 4: then | the n bodies in order, each a zstd frame (with its content size) shorter than its piece, or the piece's bytes if as long as it |
//!
//! A blob (of an object or a chunk) that would not be shorter than its length plus 9 is
//! stored raw. Versions before encoding 4 stored every compressible object under 4 MiB in one
//! frame; this version reads those blobs as ever, while they read a split blob as damaged.
//! [`ObjectRef::held`] is the blob's length, or the manifest's and its chunk blobs' lengths;
//! [`StorageTier::usage`] sums the lengths of every blob in both tables, so it counts the
//! chunks of a put in progress, and of a put whose process died part way until they are
//! deleted (a delete by id, with [`ObjectRef::UNKNOWN_SLOT`], removes chunks that no manifest
//! names). A get checks every length in a blob or manifest against the blob's size, and every
//! chunk blob's length against its manifest, before it decodes it: a manifest can claim
//! at most 1 MiB of object per 4 bytes (the room for which is reserved, not filled, until
//! its chunks are read), and each chunk no more than its stored length can
//! decode to; a split blob's body lengths must add up to the blob's, and each piece can claim
//! no more than its body can decode to. A damaged blob, manifest or chunk is
//! [`Error::Corrupt`] naming the file and the object. A get reads a manifest and its chunks
//! in one read transaction, so a delete meanwhile cannot tear the object: the get sees it
//! whole, or not at all.
//!
//! # Full disks
//! A full file system (`ENOSPC`, `EDQUOT`) anywhere in a put's transaction, commit included,
//! is [`PutOutcome::NoSpace`]: the transaction is aborted, the blocks it had filled are given
//! back (see below), and the instance opens a fresh redb handle, since redb refuses all
//! further work on a handle after an I/O error. A chunked put that runs out of space (or
//! fails otherwise) after some of its transactions committed removes their chunks in one
//! more transaction, which frees their pages for later puts. redb reuses a page a commit
//! freed only once a later commit has gone through, so a put that finds the disk full first
//! commits an empty transaction, which makes the pages freed before it (by a delete, or by
//! such a removal) reusable, and tries once more: only then is it `NoSpace`. The file grows
//! sparse; redb fills it as it writes, so a transaction can run out of space part way. The
//! tier's storage backend remembers what a write transaction wrote while it holds redb's
//! writer lock, and punches holes over it if the transaction runs out of space before its
//! commit goes live. Those pages are free, and named by no commit or reader. A destroy that
//! cannot commit the deletion of the tables for want of space truncates the file instead:
//! its blocks come back at once, though other processes still hold it open, and each of
//! their handles, after an error, reopens it and finds an empty database.
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
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use context_core::{
    Capabilities, Error, Location, NewObject, ObjectId, ObjectRef, Payload, PutOutcome, Result, StorageKind,
    StorageTier, TierUsage,
};
use redb::{
    Builder, ConcurrencyMode, Database, DatabaseError, ReadableDatabase, ReadableTable, TableDefinition, TableError,
    TableHandle,
};
use rustix::fs::OFlags;

use crate::backend::ScratchBackend;
use crate::blob::{Chunk, ChunkedError, EncodeError, Encoded};

/// The tier's name, recorded in the index beside each object.
const NAME: &str = "redb";
/// Object id → blob: a small object's bytes, or a chunked object's manifest.
const OBJECTS: TableDefinition<u64, &[u8]> = TableDefinition::new("objects");
/// (object id, chunk index) → chunk blob, for chunked objects.
const CHUNKS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("chunks");
/// The zstd level unless configured otherwise.
const DEFAULT_ZSTD_LEVEL: i32 = 1;
/// redb's page cache, per process. redb's default (1 GiB) is meant for a database that owns
/// the machine; this is one context among several processes, each with its own cache, and
/// every commit by another process empties it anyway. redb keeps the pages a write
/// transaction wrote in it, and those a read read, chunks of large values included: the cache
/// is most of what a large put or get holds beyond the value, so it is kept small (with 64
/// MiB, a put of 256 MiB peaked 55 MiB higher).
const CACHE_BYTES: usize = 8 << 20;
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
    lazy: bool,
}

impl RedbConfig {
    /// A configuration keeping the context's objects in the database file `path`.
    ///
    /// [`RedbTier::new`] creates the file (mode 0600) if it is missing; its parent directory
    /// must exist. The file belongs to one context: [`StorageTier::destroy`] removes it.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        RedbConfig { path: path.into(), zstd_level: DEFAULT_ZSTD_LEVEL, lazy: false }
    }

    /// Opens the database at the tier's first operation instead of in [`RedbTier::new`]
    /// (default: in `new`). Why: opening takes redb's locks, reads its header and allocator
    /// state and writes its header back (about 70 us on the VM of `docs/benchmarks.md`, a
    /// quarter of opening a context), and dropping an open handle commits; a process that
    /// never touches the tier pays neither. The cost: `new` then checks only the zstd level,
    /// and a file that cannot be opened, or holds no redb database, is reported by the
    /// first operation (the same [`Error::Io`], naming the file), which creates the file if
    /// it is missing.
    #[must_use]
    pub fn open_lazily(mut self) -> Self {
        self.lazy = true;
        self
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
    /// removes another file put at the same path. Set once, when the database is first
    /// opened.
    identity: OnceLock<(u64, u64)>,
    /// The open database, `None` until it is first opened (see
    /// [`RedbConfig::open_lazily`]). Replaced by a fresh handle when an I/O error (a full
    /// disk, say) has left it refusing every further operation, as redb handles do.
    db: RwLock<Option<Arc<Database>>>,
}

impl fmt::Debug for RedbTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbTier").field("path", &self.path).field("zstd_level", &self.level).finish_non_exhaustive()
    }
}

impl RedbTier {
    /// Opens the tier over `config`'s database file, creating the file (mode 0600) and an
    /// empty database in it if either is missing. Any number of processes may do this at
    /// once on the same file. With [`RedbConfig::open_lazily`], the tier's first operation
    /// does this instead.
    ///
    /// # Errors
    /// - [`Error::Config`] naming `zstd_level` if the level is outside zstd's range.
    /// - [`Error::Io`] naming the file if it cannot be opened or created (its directory is
    ///   missing, it is a symbolic link or not a regular file), or does not hold a redb
    ///   database; with [`RedbConfig::open_lazily`], from every operation until the file
    ///   opens.
    ///
    /// ```
    /// use context_tier_redb::{RedbConfig, RedbTier};
    ///
    /// let scratch = tempfile::tempdir()?;
    /// let path = scratch.path().join("values.redb");
    /// let tier = RedbTier::new(RedbConfig::new(&path).open_lazily())?;
    /// assert!(!path.exists(), "opened at the first operation");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(config: RedbConfig) -> Result<Self> {
        let RedbConfig { path, zstd_level, lazy } = config;
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
        let tier = RedbTier { path, level: zstd_level, identity: OnceLock::new(), db: RwLock::new(None) };
        if !lazy {
            tier.open()?;
        }
        Ok(tier)
    }

    /// Opens the database, unless it is open: a tier's every operation starts here.
    fn open(&self) -> Result<()> {
        if self.db.read().unwrap_or_else(PoisonError::into_inner).is_some() {
            return Ok(());
        }
        let mut slot = self.db.write().unwrap_or_else(PoisonError::into_inner);
        if slot.is_some() {
            // Another thread opened it meanwhile.
            return Ok(());
        }
        // Once a file has been opened, only that one (see `identity`).
        let (db, identity) = open_database(&self.path, self.identity.get().copied())?;
        self.identity.get_or_init(|| identity);
        *slot = Some(Arc::new(db));
        drop(slot);
        if let Err(e) = self.ensure_tables() {
            // Not usable without its tables: the next operation opens the file again.
            *self.db.write().unwrap_or_else(PoisonError::into_inner) = None;
            return Err(e);
        }
        Ok(())
    }

    /// Commits the tier's tables into a database that has none yet (a new file). Why: on a
    /// full file system, a database that had never committed could not be opened again
    /// (redb then writes its first commit), so the first put to fail there left a handle
    /// that could neither read nor delete, and other processes could not attach, until space
    /// was freed (`tests/no_space.rs`). Only the first instance on a file pays for a commit.
    fn ensure_tables(&self) -> Result<()> {
        const OP: &str = "create the tables of redb database";
        let has_tables = self.run(|db| {
            let txn = db.begin_read().map_err(Failed::new)?;
            match txn.open_table(OBJECTS) {
                Ok(_) => Ok(true),
                Err(TableError::TableDoesNotExist(_)) => Ok(false),
                Err(e) => Err(Failed::new(e)),
            }
        });
        if has_tables.map_err(|f| self.error(OP, f.error))? {
            return Ok(());
        }
        self.run(|db| {
            let txn = db.begin_write().map_err(Failed::new)?;
            txn.open_table(OBJECTS).map_err(Failed::new)?;
            txn.open_table(CHUNKS).map_err(Failed::new)?;
            txn.commit().map_err(Failed::new)
        })
        .map_err(|f| self.error(OP, f.error))
    }

    /// The database file of this context.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open database; `None` before [`open`](Self::open) succeeded.
    fn handle(&self) -> Option<Arc<Database>> {
        self.db.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Replaces `broken` by a fresh handle on the same file, unless another thread already
    /// has; returns the handle to use now.
    fn reopen(&self, broken: &Arc<Database>) -> Result<Arc<Database>> {
        let mut current = self.db.write().unwrap_or_else(PoisonError::into_inner);
        match &*current {
            Some(db) if !Arc::ptr_eq(db, broken) => return Ok(Arc::clone(db)),
            _ => {}
        }
        let (db, _) = open_database(&self.path, self.identity.get().copied())?;
        let db = Arc::new(db);
        *current = Some(Arc::clone(&db));
        Ok(db)
    }

    /// Runs `op` on the database, which [`open`](Self::open) must have opened. A failure
    /// that leaves the handle refusing further work (an I/O error, a failed commit) gets a
    /// fresh handle for later calls; if the failure was a leftover of an earlier one
    /// (`PreviousIo`), `op` is run again on the fresh handle.
    fn run<T>(&self, op: impl Fn(&Database) -> Result<T, Failed>) -> Result<T, Failed> {
        let Some(db) = self.handle() else {
            // Every operation opens the database first; this is a call that did not.
            return Err(Failed::new(redb::Error::Io(io::Error::other("the redb database is not open"))));
        };
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

    /// Runs the write transaction `op`; if the disk is full, commits an empty transaction
    /// and runs `op` once more. Why: redb reuses a page freed by a commit (a delete, or the
    /// removal of a failed put's chunks) only once a later commit has gone through, so on a
    /// full disk every put answered `NoSpace` beside all the room a delete had just made,
    /// until some other write committed (on a file system that cannot punch holes, never).
    fn write(&self, op: impl Fn(&Database) -> Result<(), Failed>) -> Result<(), Failed> {
        match self.run(&op) {
            Err(failure) if failure.is_no_space() && self.release_freed_pages() => {
                self.run(&op).map_err(|again| Failed { committing: again.committing || failure.committing, ..again })
            }
            done => done,
        }
    }

    /// Commits an empty write transaction, in which redb makes the pages earlier commits freed
    /// free to reuse; answers whether it committed.
    fn release_freed_pages(&self) -> bool {
        self.run(|db| db.begin_write().map_err(Failed::new)?.commit().map_err(Failed::in_commit)).is_ok()
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
            .run(|db| read_blob(db, id, |blob| blob.len()).map(|found| found.is_some()))
            .map_err(|f| self.error("look for a partly stored object in redb database", f.error))?;
        if present {
            self.run(|db| remove_object(db, id, false))
                .map_err(|f| self.error("remove a partly stored object from redb database", f.error))?;
        }
        Ok(())
    }

    /// Puts an object of [`blob::CHUNKED_FROM`] bytes or more: its chunks in batches, each in
    /// a write transaction of its own, the last one with the manifest. On any failure, removes
    /// whatever it committed.
    fn put_chunked(&self, mut object: NewObject<'_>) -> Result<PutOutcome> {
        let (id, len) = (object.id, object.len);
        let mut committed_any = false;
        let mut store = |chunks: &[Chunk]| {
            committed_any = true;
            self.write(|db| write_chunks(db, id, chunks, None))
        };
        let failure = match blob::encode_chunked(&mut object, self.level, &mut store) {
            Ok(done) => match self.write(|db| write_chunks(db, id, &done.last, Some(&done.manifest))) {
                Ok(()) => return Ok(PutOutcome::Stored(ObjectRef { id, len, slot: 0, held: done.held })),
                Err(failure) => Err(failure),
            },
            Err(ChunkedError::Store(failure)) => Err(failure),
            Err(ChunkedError::Encode(e)) => Ok(e),
        };
        // Something may have been committed: a batch of chunks, or (if the last commit failed
        // after all) the whole object.
        let committed = committed_any || failure.as_ref().is_err_and(|f| f.committing);
        let left = || {
            self.run(|db| any_of_object(db, id))
                .map_err(|f| self.error("look for a partly stored object in redb database", f.error))
        };
        if committed && left()? {
            self.run(|db| remove_object(db, id, true))
                .map_err(|f| self.error("remove a partly stored object from redb database", f.error))?;
        }
        match failure {
            Err(failure) if failure.is_no_space() => Ok(PutOutcome::NoSpace),
            Err(failure) => Err(self.error("write to redb database", failure.error)),
            Ok(EncodeError::Data(e)) => Err(e),
            Ok(EncodeError::Compress(e)) => Err(Error::io("compress object for redb database", &self.path, e)),
        }
    }

    /// Truncates the database file (the one this tier opened) to nothing, then opens a fresh
    /// handle, which makes an empty database in it. For a destroy on a full disk: deleting the
    /// tables needs fresh pages, and removing the file frees nothing while any process, this
    /// one included, holds it open. A truncated file gives its blocks back at once; every
    /// other handle gets an error from it once, then reopens it and finds no objects.
    fn empty_file(&self) -> Result<()> {
        const OP: &str = "empty redb database";
        let file = OpenOptions::new()
            .write(true)
            .custom_flags((OFlags::NOFOLLOW | OFlags::CLOEXEC).bits() as i32)
            .open(&self.path)
            .map_err(|e| Error::io(OP, &self.path, e))?;
        if Some(check_file(&file).map_err(|e| Error::io(OP, &self.path, e))?) != self.identity.get().copied() {
            let why = io::Error::other("the file was replaced since the tier opened it");
            return Err(Error::io(OP, &self.path, why));
        }
        file.set_len(0).map_err(|e| Error::io(OP, &self.path, e))?;
        if let Some(db) = self.handle() {
            self.reopen(&db)?;
        }
        Ok(())
    }

    /// Removes the database file, if the path still names the file this tier opened.
    fn remove_file(&self) -> Result<()> {
        const OP: &str = "remove redb database";
        match fs::symlink_metadata(&self.path) {
            Ok(meta) if Some((meta.dev(), meta.ino())) == self.identity.get().copied() => {}
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
        encoded.write_blob(slot.as_mut());
    }
    txn.commit().map_err(Failed::in_commit)
}

/// Stores a batch of a chunked object's chunks in one write transaction, and with the last
/// batch its manifest, which makes the object exist.
fn write_chunks(db: &Database, id: ObjectId, chunks: &[Chunk], manifest: Option<&[u8]>) -> Result<(), Failed> {
    let txn = db.begin_write().map_err(Failed::new)?;
    {
        let mut table = txn.open_table(CHUNKS).map_err(Failed::new)?;
        for chunk in chunks {
            let mut slot = table.insert_reserve((id.0, chunk.index), chunk.blob_len()).map_err(Failed::new)?;
            chunk.write_blob(slot.as_mut());
        }
    }
    if let Some(manifest) = manifest {
        txn.open_table(OBJECTS).map_err(Failed::new)?.insert(id.0, manifest).map_err(Failed::new)?;
    }
    txn.commit().map_err(Failed::in_commit)
}

/// Whether anything of the object `id` is there: its blob or manifest, or a chunk.
fn any_of_object(db: &Database, id: ObjectId) -> Result<bool, Failed> {
    let txn = db.begin_read().map_err(Failed::new)?;
    match txn.open_table(OBJECTS) {
        Ok(table) if table.get(id.0).map_err(Failed::new)?.is_some() => return Ok(true),
        Ok(_) | Err(TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(Failed::new(e)),
    }
    match txn.open_table(CHUNKS) {
        Ok(table) => Ok(table.range((id.0, 0)..=(id.0, u32::MAX)).map_err(Failed::new)?.next().is_some()),
        Err(TableError::TableDoesNotExist(_)) => Ok(false),
        Err(e) => Err(Failed::new(e)),
    }
}

/// Why reading an object failed.
enum ReadFailure {
    Db(Failed),
    /// The object is damaged (the detail).
    Damaged(String),
}

/// Reads the blob under `id` in a read transaction and hands it to `f`.
fn read_blob<T>(db: &Database, id: ObjectId, f: impl FnOnce(&[u8]) -> T) -> Result<Option<T>, Failed> {
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

/// Reads and decodes the object `id` in one read transaction (so that a delete meanwhile
/// cannot tear a chunked object): `Ok(None)` if it is not there, `Ok(Some(Err(detail)))` if
/// it is damaged.
fn read_object(db: &Database, id: ObjectId) -> Result<Option<Result<Vec<u8>, String>>, Failed> {
    let txn = db.begin_read().map_err(Failed::new)?;
    let objects = match txn.open_table(OBJECTS) {
        Ok(table) => table,
        // Nothing was ever stored, or the tier was destroyed.
        Err(TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(Failed::new(e)),
    };
    let manifest = {
        let Some(blob) = objects.get(id.0).map_err(Failed::new)? else { return Ok(None) };
        if !blob::is_manifest(blob.value()) {
            return Ok(Some(blob::decode(blob.value())));
        }
        match blob::parse_manifest(blob.value()) {
            Ok(manifest) => manifest,
            Err(detail) => return Ok(Some(Err(format!("its manifest: {detail}")))),
        }
    };
    let chunks = match txn.open_table(CHUNKS) {
        Ok(table) => table,
        Err(TableError::TableDoesNotExist(_)) => return Ok(Some(Err("the chunk table is missing".into()))),
        Err(e) => return Err(Failed::new(e)),
    };
    // The object's room is allocated before any chunk is read, but not touched: a damaged
    // manifest claiming a huge object costs address space until its first missing or short
    // chunk, not memory (see `blob::allocate`). Each chunk is read once.
    let mut out = match blob::allocate(manifest.len) {
        Ok(out) => out,
        Err(detail) => return Ok(Some(Err(detail))),
    };
    let decoded = blob::on_two_threads(&mut out, manifest.chunk, |i, piece| {
        let found = chunks.get((id.0, i as u32)).map_err(|e| ReadFailure::Db(Failed::new(e)))?;
        let blob = found.ok_or_else(|| ReadFailure::Damaged(format!("chunk {i} is missing")))?;
        let blob = blob.value();
        if blob.len() != manifest.stored[i] as usize {
            let detail = format!("chunk {i} is {} bytes, its manifest says {}", blob.len(), manifest.stored[i]);
            return Err(ReadFailure::Damaged(detail));
        }
        blob::decode_chunk(blob, piece).map_err(|detail| ReadFailure::Damaged(format!("chunk {i}: {detail}")))
    });
    match decoded {
        Ok(()) => Ok(Some(Ok(out))),
        Err(ReadFailure::Damaged(detail)) => Ok(Some(Err(detail))),
        Err(ReadFailure::Db(failed)) => Err(failed),
    }
}

/// Removes the object `id` in one write transaction: its blob or manifest, and a chunked
/// object's chunks. With `orphans`, also chunks of `id` that no manifest names (left by a put
/// that died part way). Answers whether the object (its blob or manifest) was there.
fn remove_object(db: &Database, id: ObjectId, orphans: bool) -> Result<bool, Failed> {
    let txn = db.begin_write().map_err(Failed::new)?;
    let (existed, chunked) = {
        let mut table = txn.open_table(OBJECTS).map_err(Failed::new)?;
        let removed = table.remove(id.0).map_err(Failed::new)?;
        (removed.is_some(), removed.is_some_and(|blob| blob::is_manifest(blob.value())))
    };
    // Opening the chunk table would create it: do not, for nothing, when it is missing.
    let has_chunks = || -> Result<bool, Failed> {
        let mut tables = txn.list_tables().map_err(Failed::new)?;
        Ok(tables.any(|table| table.name() == CHUNKS.name()))
    };
    let mut changed = existed;
    if chunked || (orphans && !existed && has_chunks()?) {
        let mut table = txn.open_table(CHUNKS).map_err(Failed::new)?;
        let range = (id.0, 0)..=(id.0, u32::MAX);
        if chunked || table.range(range.clone()).map_err(Failed::new)?.next().is_some() {
            table.retain_in(range, |_, _| false).map_err(Failed::new)?;
            changed = true;
        }
    }
    match txn.commit().map_err(Failed::in_commit) {
        Ok(()) => Ok(existed),
        // There was nothing to remove: the commit would only have released the pages earlier
        // transactions freed (as the next commit will), so one that found no room on the
        // disk loses nothing, and a delete of nothing does not fail for want of room (the
        // caller may be making room). The handle it broke is replaced at its next use.
        Err(failed) if !changed && failed.is_no_space() => Ok(false),
        Err(failed) => Err(failed),
    }
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

    /// The length plus the 9-byte blob header under 4 MiB: an object that does not shrink is
    /// stored raw, so no blob is longer. From 4 MiB on, also the manifest's 4 bytes and a
    /// 9-byte header per chunk (of 1 MiB less 4 KiB): 13 bytes per chunk, plus 13.
    fn footprint(&self, len: u64) -> u64 {
        blob::footprint(len)
    }

    /// Under 4 MiB: compresses the object (from 128 KiB on, in two halves on two threads; see
    /// the [crate] docs), then inserts the blob and commits in one write transaction. From 4
    /// MiB on: compresses chunks on two threads as the object arrives, and stores them in a
    /// write transaction per 1 MiB of compressed chunks, the last one with the manifest. A full
    /// file system anywhere in that is [`PutOutcome::NoSpace`]; on that or any error, the
    /// chunks already committed are removed in one more transaction.
    fn put(&self, mut object: NewObject<'_>) -> Result<PutOutcome> {
        self.open()?;
        if object.len >= blob::CHUNKED_FROM {
            return self.put_chunked(object);
        }
        let (id, len) = (object.id, object.len);
        let encoded = match blob::encode(&mut object, self.level) {
            Ok(encoded) => encoded,
            Err(EncodeError::Data(e)) => return Err(e),
            Err(EncodeError::Compress(e)) => return Err(Error::io("compress object for redb database", &self.path, e)),
        };
        let held = encoded.blob_len();
        let failure = match self.write(|db| write_object(db, id, &encoded)) {
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

    /// Reads the blob, or the manifest and every chunk, in one read transaction, and decodes
    /// it (a chunked object on two threads) into an owned payload.
    fn get(&self, object: &ObjectRef) -> Result<Option<Payload>> {
        self.open()?;
        let id = object.id;
        match self.run(|db| read_object(db, id)) {
            Ok(None) => Ok(None),
            Ok(Some(Ok(bytes))) => Ok(Some(Payload::from_vec(bytes))),
            Ok(Some(Err(detail))) => {
                Err(Error::corrupt(format!("object {id} in redb database {}", self.path.display()), detail))
            }
            Err(failure) => Err(self.error("read from redb database", failure.error)),
        }
    }

    /// Removes the object (its blob, or its manifest and chunks) in one write transaction.
    /// With [`ObjectRef::UNKNOWN_SLOT`] and no object there, removes chunks of the id that no
    /// manifest names, left by a put whose process died part way, and answers `false`.
    fn delete(&self, object: &ObjectRef) -> Result<bool> {
        self.open()?;
        let orphans = object.slot == ObjectRef::UNKNOWN_SLOT;
        self.run(|db| remove_object(db, object.id, orphans))
            .map_err(|f| self.error("delete from redb database", f.error))
    }

    fn locate(&self, _object: &ObjectRef) -> Location {
        Location { shm_name: None, path: Some(self.path.clone()) }
    }

    /// Reads every blob's and chunk's length in one read transaction. Objects are the small
    /// ones and the manifests; bytes include the chunks of a put in progress, and of one that
    /// died part way until they are deleted (by id, with [`ObjectRef::UNKNOWN_SLOT`]).
    fn usage(&self) -> Result<TierUsage> {
        self.open()?;
        let counted = self.run(|db| {
            let txn = db.begin_read().map_err(Failed::new)?;
            let mut usage = TierUsage::default();
            match txn.open_table(OBJECTS) {
                Ok(table) => {
                    for entry in table.iter().map_err(Failed::new)? {
                        let (_, blob) = entry.map_err(Failed::new)?;
                        usage.bytes += blob.value().len() as u64;
                        usage.objects += 1;
                    }
                }
                Err(TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(Failed::new(e)),
            }
            match txn.open_table(CHUNKS) {
                Ok(table) => {
                    for entry in table.iter().map_err(Failed::new)? {
                        let (_, blob) = entry.map_err(Failed::new)?;
                        usage.bytes += blob.value().len() as u64;
                    }
                }
                Err(TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(Failed::new(e)),
            }
            Ok(usage)
        });
        counted.map_err(|f| self.error("read from redb database", f.error))
    }

    /// Deletes the table (every object) in one write transaction, then removes the file.
    /// Other processes may still have the file open: they find no objects in it. On a full
    /// disk, where that transaction cannot commit, truncates the file instead: its blocks
    /// come back at once, and every handle on it, after an error, finds an empty database.
    fn destroy(&self) -> Result<()> {
        // A tier never opened over a file that was never made has nothing to remove (and
        // opening would make one).
        if self.handle().is_none()
            && fs::symlink_metadata(&self.path).is_err_and(|e| e.kind() == io::ErrorKind::NotFound)
        {
            return Ok(());
        }
        self.open()?;
        let cleared = match self.run(|db| {
            let txn = db.begin_write().map_err(Failed::new)?;
            txn.delete_table(OBJECTS).map_err(Failed::new)?;
            txn.delete_table(CHUNKS).map_err(Failed::new)?;
            txn.commit().map_err(Failed::in_commit)
        }) {
            Err(failure) if failure.is_no_space() => self.empty_file(),
            cleared => cleared.map_err(|f| self.error("delete every object in redb database", f.error)),
        };
        // The file goes even if the objects could not be deleted.
        let removed = self.remove_file();
        cleared?;
        removed
    }
}
