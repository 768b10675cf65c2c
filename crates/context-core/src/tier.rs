//! The [`StorageTier`] trait: what a place that holds values must do.

use std::fmt;
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
}

impl ObjectRef {
    /// The `slot` of an object whose writer died before the tier's answer was recorded.
    /// [`StorageTier::delete`] must then find the object by its id.
    pub const UNKNOWN_SLOT: u64 = u64::MAX;
}

/// How the bytes of a new object reach the tier.
pub enum ObjectData<'a> {
    /// The object's bytes, as consecutive pieces (a header, then the payload).
    Parts(&'a [&'a [u8]]),
    /// A writer that fills the whole object into the buffer it is given (exactly the object's
    /// length), for values serialized straight into place. It is called at most once.
    Fill(&'a mut (dyn FnMut(&mut [u8]) -> Result<()> + 'a)),
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

impl NewObject<'_> {
    /// Writes the object into `dst`, which must be exactly [`NewObject::len`] bytes.
    ///
    /// Tiers that write through a mapping call this; tiers that write with `write(2)` can
    /// match on [`ObjectData::Parts`] instead.
    pub fn write_into(&mut self, dst: &mut [u8]) -> Result<()> {
        if dst.len() as u64 != self.len {
            return Err(Error::corrupt(format!("object {}", self.id), format!("destination is {} bytes, object is {}", dst.len(), self.len)));
        }
        match &mut self.data {
            ObjectData::Parts(parts) => {
                let total: usize = parts.iter().map(|p| p.len()).sum();
                if total != dst.len() {
                    return Err(Error::corrupt(format!("object {}", self.id), format!("parts hold {total} bytes, object is {}", self.len)));
                }
                let mut at = 0;
                for p in parts.iter() {
                    dst[at..at + p.len()].copy_from_slice(p);
                    at += p.len();
                }
                Ok(())
            }
            ObjectData::Fill(fill) => fill(dst),
        }
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
    /// Bytes held (the sum of [`StorageTier::footprint`] of the objects present).
    pub bytes: u64,
    /// Number of objects held.
    pub objects: u64,
}

/// Abilities a tier declares, so callers never discover them by error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// [`StorageTier::get`] returns views of the stored bytes (no copy) for large objects.
    pub zero_copy: bool,
    /// Objects put by one process can be read by another process that builds the same tier
    /// over the same context.
    pub shared_across_processes: bool,
}

impl Capabilities {
    /// Declares both abilities.
    pub const fn new(zero_copy: bool, shared_across_processes: bool) -> Self {
        Capabilities { zero_copy, shared_across_processes }
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
/// same id, and never calls `get` or `delete` on an object that `put` has not returned.
///
/// Run [`crate::tier_conformance_tests!`] (feature `testing`) in your tier's tests to check
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

    /// The bytes the tier will hold for an object of `len` bytes, including rounding to
    /// pages or slots. This is what budgets count.
    ///
    /// # Behavior
    /// At least `len`; a pure function of `len`.
    fn footprint(&self, len: u64) -> u64;

    /// Stores a new object.
    ///
    /// # Behavior
    /// - Space is reserved before any byte is written: a full file system is
    ///   [`PutOutcome::NoSpace`] with nothing left behind, never a crash (no SIGBUS).
    /// - On `Ok(Stored)`, the whole object is readable by [`StorageTier::get`] from any
    ///   process. The returned [`ObjectRef`] has the given id and length.
    /// - If writing fails (including an error from [`ObjectData::Fill`]), the error is
    ///   returned and nothing of the object remains.
    fn put(&self, object: NewObject<'_>) -> Result<PutOutcome>;

    /// Reads an object.
    ///
    /// # Behavior
    /// - `Ok(None)` if the object does not exist (it was deleted, perhaps by another process).
    /// - Otherwise the object's bytes, exactly as long as the tier holds them; a shorter or
    ///   longer answer is reported to the caller as corruption, not hidden.
    /// - A returned payload stays valid and unchanged after the object is deleted.
    fn get(&self, object: &ObjectRef) -> Result<Option<Payload>>;

    /// Deletes an object and frees its space.
    ///
    /// # Behavior
    /// - `Ok(true)` if it existed, `Ok(false)` if it did not: deleting a missing object
    ///   succeeds.
    /// - With [`ObjectRef::UNKNOWN_SLOT`], the tier finds the object by id (this may be slow;
    ///   it only happens when cleaning up after a writer that died).
    /// - Payloads already returned by `get` stay valid.
    fn delete(&self, object: &ObjectRef) -> Result<bool>;

    /// Names the segment or file that holds an object, for [`crate::StorageInfo`].
    fn locate(&self, object: &ObjectRef) -> Location;

    /// What the tier holds right now, counted from its storage (not from a cache).
    fn usage(&self) -> Result<TierUsage>;

    /// Deletes every object of this context from the tier, and the tier's own files.
    ///
    /// # Behavior
    /// Idempotent. Afterwards `usage()` is zero and `get` of any object is `Ok(None)` or an
    /// error; never a crash.
    fn destroy(&self) -> Result<()>;
}
