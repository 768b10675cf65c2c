//! The [`StorageTier`] trait: what a place that holds values must do.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::payload::Payload;
use crate::types::StorageKind;

/// Names one stored object inside a context.
///
/// The context assigns ids: unique within a context for its whole life, never reused, so a
/// tier can derive names (a segment or file name) from them. An object is written once and
/// never modified; overwriting a key stores a new object and deletes the old one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId(pub u64);

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A stored object as the index remembers it: its id, its length, and the tier's own hint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ObjectRef {
    /// The object's id.
    pub id: ObjectId,
    /// The object's length in bytes (the whole record).
    pub len: u64,
    /// A tier-private word the tier returned from [`StorageTier::put`] (a slot number, say),
    /// or [`ObjectRef::UNKNOWN_SLOT`] when the caller no longer knows it.
    pub slot: u64,
    /// The bytes the tier holds for the object, as `put` answered: at most
    /// [`StorageTier::footprint`] of its length, less for a tier that compresses. Only `put`
    /// sets it; `get` and `delete` ignore it.
    pub held: u64,
}

impl ObjectRef {
    /// The `slot` of an object whose put gave no answer to record: its writer died, or the
    /// put failed or panicked. [`StorageTier::delete`] must then find the object by its id.
    pub const UNKNOWN_SLOT: u64 = u64::MAX;
}

/// How the bytes of a new object reach the tier.
pub enum ObjectData<'a> {
    /// The object's bytes, as consecutive pieces (a header, then the payload).
    Parts(&'a [&'a [u8]]),
    /// A writer that pushes the whole object, in order, into the sink it is given. It may
    /// write in pieces of any size and is called at most once. This is how values are
    /// streamed into place: serialized, or checksummed piece by piece while being copied,
    /// so the bytes are read from memory once.
    Write(&'a mut (dyn FnMut(&mut dyn io::Write) -> Result<()> + 'a)),
}

/// A new object handed to [`StorageTier::put`].
pub struct NewObject<'a> {
    /// Its id.
    pub id: ObjectId,
    /// Its exact length in bytes.
    pub len: u64,
    /// Its bytes.
    pub data: ObjectData<'a>,
}

/// Why [`NewObject::write_to`] failed.
#[derive(Debug)]
pub enum WriteFailure {
    /// The sink (the tier's own storage) failed; the tier should say where, and may treat
    /// `ENOSPC` as [`PutOutcome::NoSpace`].
    Sink(io::Error),
    /// The object's data failed (a value that does not serialize, a wrong length).
    Data(Error),
}

/// Counts what passes through and keeps the sink's own error apart from the data's.
struct Counting<'w> {
    inner: &'w mut dyn io::Write,
    written: u64,
    limit: u64,
    sink_error: Option<io::Error>,
}

impl io::Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written + buf.len() as u64 > self.limit {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "the object is longer than its declared length"));
        }
        match self.inner.write(buf) {
            Ok(n) => {
                self.written += n as u64;
                Ok(n)
            }
            // Nothing was written and `write_all` tries again: not a failure of the sink.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let shown = io::Error::new(e.kind(), e.to_string());
                self.sink_error = Some(e);
                Err(shown)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        // Keep the sink's own error (its errno tells a full disk apart), as `write` does.
        self.inner.flush().map_err(|e| {
            let shown = io::Error::new(e.kind(), e.to_string());
            self.sink_error = Some(e);
            shown
        })
    }
}

impl NewObject<'_> {
    /// Writes the whole object, in order, into `out`, checking it is exactly
    /// [`NewObject::len`] bytes long. For tiers that write with `write(2)` or into a buffer.
    pub fn write_to(&mut self, out: &mut dyn io::Write) -> std::result::Result<(), WriteFailure> {
        let mut counting = Counting { inner: out, written: 0, limit: self.len, sink_error: None };
        let result = match &mut self.data {
            ObjectData::Parts(parts) => {
                let total: u64 = parts.iter().map(|p| p.len() as u64).sum();
                if total != self.len {
                    return Err(WriteFailure::Data(self.wrong_length(total)));
                }
                parts
                    .iter()
                    .try_for_each(|p| io::Write::write_all(&mut counting, p))
                    .map_err(|e| Error::io("write object", format!("object {}", self.id), e))
            }
            ObjectData::Write(write) => write(&mut counting),
        };
        let flushed = io::Write::flush(&mut counting);
        if let Some(e) = counting.sink_error.take() {
            return Err(WriteFailure::Sink(e));
        }
        result.map_err(WriteFailure::Data)?;
        flushed.map_err(WriteFailure::Sink)?;
        if counting.written != self.len {
            return Err(WriteFailure::Data(self.wrong_length(counting.written)));
        }
        Ok(())
    }

    /// Writes the whole object into `dst`, which must be exactly [`NewObject::len`] bytes:
    /// for tiers that write through a mapping.
    pub fn write_into(&mut self, dst: &mut [u8]) -> Result<()> {
        if dst.len() as u64 != self.len {
            return Err(Error::corrupt(
                format!("object {}", self.id),
                format!("destination is {} bytes, object is {}", dst.len(), self.len),
            ));
        }
        let mut cursor: &mut [u8] = dst;
        match self.write_to(&mut cursor) {
            Ok(()) => Ok(()),
            Err(WriteFailure::Data(e)) => Err(e),
            Err(WriteFailure::Sink(e)) => Err(Error::io("write object into memory", format!("object {}", self.id), e)),
        }
    }

    fn wrong_length(&self, actual: u64) -> Error {
        Error::corrupt(
            format!("object {}", self.id),
            format!("the data holds {actual} bytes, the object is {}", self.len),
        )
    }
}

/// An [`io::Write`] that writes a file at consecutive offsets with `pwrite`, for tiers
/// that fill a freshly reserved file. Wrap it in an [`io::BufWriter`] when pieces are small.
#[derive(Debug)]
pub struct FileAt<'f> {
    file: &'f std::fs::File,
    offset: u64,
}

impl<'f> FileAt<'f> {
    /// Writes `file` from `offset` on.
    pub fn new(file: &'f std::fs::File, offset: u64) -> Self {
        FileAt { file, offset }
    }
}

impl io::Write for FileAt<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = std::os::unix::fs::FileExt::write_at(self.file, buf, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The answer of [`StorageTier::put`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object is stored, complete, and visible to every process that can reach the tier.
    Stored(ObjectRef),
    /// The tier has no room for the object (its file system is full). Nothing was stored;
    /// the caller may try another tier. This is an answer, not an error.
    NoSpace,
}

/// Where a tier keeps an object, for [`crate::StorageInfo`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Location {
    /// The shared-memory segment holding the object, if any.
    pub shm_name: Option<String>,
    /// The file holding the object, if any.
    pub path: Option<PathBuf>,
}

/// What a tier holds right now, as its own storage says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierUsage {
    /// Bytes held: the sum of [`ObjectRef::held`] of the objects present (for a tier that
    /// compresses, less than the sum of their [`StorageTier::footprint`]).
    pub bytes: u64,
    /// Number of objects held.
    pub objects: u64,
}

/// Abilities a tier declares, so callers never discover them by error.
///
/// ```
/// use context_core::Capabilities;
/// let caps = Capabilities::new(false, true).with_compression(true);
/// assert!(caps.compresses && !caps.zero_copy);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// [`StorageTier::get`] returns views of the stored bytes (no copy) for large objects.
    pub zero_copy: bool,
    /// Objects put by one process can be read by another process that builds the same tier
    /// over the same context.
    pub shared_across_processes: bool,
    /// The tier compresses what it stores, so it may hold fewer bytes than it is given.
    pub compresses: bool,
}

impl Capabilities {
    /// Declares the first two abilities; the tier does not compress.
    pub const fn new(zero_copy: bool, shared_across_processes: bool) -> Self {
        Capabilities { zero_copy, shared_across_processes, compresses: false }
    }

    /// Declares whether the tier compresses.
    #[must_use]
    pub const fn with_compression(mut self, compresses: bool) -> Self {
        self.compresses = compresses;
        self
    }
}

/// A place that holds the objects of one context: shared memory, a directory of files, a
/// database.
///
/// A tier stores opaque objects by [`ObjectId`]; it never sees keys. The composed context
/// keeps the index (which key holds which object), decides placement, and checks every
/// object it reads back (the record header and checksum), so a tier need not verify what
/// it returns. Methods are synchronous: every tier does blocking local I/O.
///
/// Every method may be called from many threads, and from many processes that build the
/// same tier over the same context, at once. The context never calls `put` twice with the
/// same id, and never calls `get` on an object that `put` has not returned. It may call
/// `delete`, by id ([`ObjectRef::UNKNOWN_SLOT`]), on an object whose `put` failed,
/// panicked or never returned (its writer died), in case the put left something behind.
///
/// Run `context_core::tier_conformance_tests!` (feature `testing`) in your tier's tests to check
/// it keeps this contract.
pub trait StorageTier: Send + Sync + fmt::Debug {
    /// A short stable name ("shm", "mmap"), recorded in the index beside each object.
    ///
    /// # Behavior
    /// The same for every instance of the tier, in every process; at most 16 ASCII bytes.
    fn name(&self) -> &str;

    /// Whether the tier holds objects in RAM or on disk; decides which budget an object
    /// counts against.
    fn kind(&self) -> StorageKind;

    /// The abilities the tier has.
    fn capabilities(&self) -> Capabilities;

    /// The most bytes the tier will hold for an object of `len` bytes, including rounding
    /// to pages or slots. Budgets reserve this much before a put; afterwards they count what
    /// the put answered in [`ObjectRef::held`].
    ///
    /// # Behavior
    /// A pure function of `len`, never decreasing as `len` grows. At least `len` for a tier
    /// that stores bytes as they are; a compressing tier may answer less only if it can
    /// guarantee it (it usually cannot, and answers `len` plus its overhead).
    fn footprint(&self, len: u64) -> u64;

    /// Stores a new object.
    ///
    /// # Behavior
    /// - Space is reserved before any byte is written: a full file system is
    ///   [`PutOutcome::NoSpace`] with nothing left behind, never a crash (no SIGBUS).
    /// - On `Ok(Stored)`, the whole object is readable by [`StorageTier::get`] from any
    ///   process. The returned [`ObjectRef`] has the given id and length, and says in
    ///   `held` how many bytes the tier holds for it (at most `footprint(len)`).
    /// - If writing fails (including an error from [`ObjectData::Write`], or data that is
    ///   not exactly `len` bytes), the error is returned and nothing of the object remains.
    fn put(&self, object: NewObject<'_>) -> Result<PutOutcome>;

    /// Reads an object.
    ///
    /// # Behavior
    /// - `Ok(None)` if the object does not exist (it was deleted, perhaps by another process).
    /// - Otherwise the object's bytes, exactly as long as the tier holds them; a shorter or
    ///   longer answer is reported to the caller as corruption, not hidden.
    /// - A returned payload stays valid and unchanged after the object is deleted.
    fn get(&self, object: &ObjectRef) -> Result<Option<Payload>>;

    /// A hint that the object at location word `slot` (an [`ObjectRef::slot`] this tier
    /// handed out) is about to be read with [`get`](Self::get): a tier that keeps small
    /// objects in memory may start bringing them into the CPU cache, so that the caller's
    /// own lookup and the object's bytes travel from memory at once.
    ///
    /// # Behavior
    /// - Only a hint: it never fails, blocks or changes anything, and the default does
    ///   nothing.
    /// - `slot` is untrusted: it may be stale, or a word of another tier. A tier ignores a
    ///   word it cannot use.
    /// - The composed context keeps a copy of the location word beside each key in its key
    ///   table, to offer before it reads the key's entry, only where the word fits in 32
    ///   bits: a tier that wants the hint names its small objects with such words.
    fn prefetch(&self, slot: u64) {
        let _ = slot;
    }

    /// Deletes an object and frees its space.
    ///
    /// # Behavior
    /// - `Ok(true)` if it existed, `Ok(false)` if it did not: deleting a missing object
    ///   succeeds.
    /// - With [`ObjectRef::UNKNOWN_SLOT`], the tier finds the object by id alone, its `len`
    ///   being 0 when the caller does not know it either (this may be slow; it only happens
    ///   when cleaning up after a writer that died, or after a put that failed or panicked,
    ///   whose object may not exist at all).
    /// - Payloads already returned by `get` stay valid.
    fn delete(&self, object: &ObjectRef) -> Result<bool>;

    /// Names the segment or file that holds an object, for [`crate::StorageInfo`].
    fn locate(&self, object: &ObjectRef) -> Location;

    /// What the tier holds right now, counted from its storage (not from a cache): the sum
    /// of [`ObjectRef::held`] of the objects present.
    fn usage(&self) -> Result<TierUsage>;

    /// Deletes every object of this context from the tier, and the tier's own files.
    ///
    /// # Behavior
    /// Idempotent. Afterwards `usage()` is zero and `get` of any object is `Ok(None)` or an
    /// error; never a crash.
    fn destroy(&self) -> Result<()>;
}
