//! The shared index: which key holds which object, seen alike by every attached process.
//!
//! # Design
//! The index has three kinds of files in the context directory:
//! - `meta`, one page every attached process maps. It holds the *head* (the journal's
//!   generation and committed length, packed in one atomic word), the generation of the
//!   key table, the index lock ([`crate::lock`]) and the object a small save is writing.
//! - `journal.<generation>`, an append-only log of changes: the commit point of every
//!   operation, and the record of *pending* objects (being written, or replaced and about
//!   to be deleted). Its room is allocated when the generation is made and it is mapped, so
//!   an append is a copy into memory. `journal.spare` is the generation before the
//!   current one, which the next compaction writes over instead of making a new file.
//! - `table.<generation>`, the key table ([`crate::table`]): a hash table in a mapped file,
//!   which every process reads in place and writers change after the journal commits.
//!
//! - **Reading** a key takes no lock and no copy of the index: one atomic load of the head
//!   and a probe of the mapped table. A process follows the journal only for the pending
//!   objects and to drop cached views of objects that left (`pread` of the new tail).
//! - **Writing** happens under the index lock (four words in the meta page, plus a mutex
//!   for the threads of one handle): catch up, copy the records into the journal at the
//!   committed length, publish the new length in the head (the commit), apply the records
//!   to the table, then mark the table applied up to the head. A writer that finds the
//!   table behind the head (its predecessor died in between) applies the records again;
//!   applying is idempotent.
//! - **Cost** does not grow with the number of keys. A save appends a few dozen bytes and
//!   changes one table entry; opening maps two files and reads a journal that compaction
//!   keeps near 16 KiB of records: it rewrites only the pending objects, into the next
//!   generation, since the keys are in the table. A generation that fills up first moves
//!   to a bigger one the same way, before anything is committed.
//!
//! Space is accounted exactly: every object is either *live* (a key points to it; the
//! table counts these bytes) or *pending* (in the journal), and both count against the
//! budgets. A pending object belongs to an owner (one attached handle); if its owner dies,
//! the next writer that needs the space deletes the object. The one exception is the object
//! of a small save, which is written under the index lock from its id to its commit: it is
//! noted in the meta page's in-flight word instead of a pending record (one store instead
//! of an append), and the next holder of the lock that finds it there, its writer having
//! died before the commit, deletes it ([`Meta::in_flight`]).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex};

use context_core::{Error, ObjectId, ObjectRef, PassBy, Payload, Result, StorageKind};
use memmap2::MmapRaw;
use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::lock::IndexLock;
use crate::table::{Lookup, Table};

/// Size of the meta file.
pub(crate) const META_LEN: u64 = 4096;
const META_MAGIC: u64 = u64::from_le_bytes(*b"WFCMETA1");
/// Version 3: the index lock moved from `flock` on the `lock` file into this page (a
/// process of an older build would not respect it, so it must not attach). Version 4: the
/// shared-memory tier's location words number more slot sizes (an older build would look
/// for small values in the wrong arenas). Version 5: the shared-memory tier's arenas after
/// a class's first are 2 MiB (an older build would not find them ready). Version 6: a
/// small save notes its object in the meta page's in-flight word instead of a pending
/// record (an older build taking the lock over from a dead writer would leave the object
/// behind). Version 7: shared-memory segments are named by the context's instance as well
/// as its run id (an older build would look for them under the run id alone). Version 8:
/// values of 64 KiB or more start 4064 bytes into their shared-memory segment or value file
/// (an older build would read them from the start, and find them corrupt). Version 9: they
/// start 96 bytes in instead (an older build would look for them 4064 bytes in). Version
/// 10: the in-flight word carries a check of the object id it notes (an older build would
/// take the checked word for an id).
const META_VERSION: u64 = 10;
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_STATE: usize = 16;
const OFF_HEAD: usize = 24;
const OFF_RAM_CAP: usize = 32;
const OFF_DISK_CAP: usize = 40;
const OFF_TABLE: usize = 48;
/// This context's instance: random, chosen at creation, naming its shared-memory segments
/// together with the run id ([`Meta::instance`]).
const OFF_INSTANCE: usize = 56;
/// The index lock's words ([`crate::lock`]), in a cache line of their own so that taking
/// the lock does not disturb readers of the head: the holder's token, two 32-bit futex
/// words, the spinner's deadline and the count of wakes that found nobody.
const OFF_LOCK_OWNER: usize = 128;
const OFF_LOCK_SEQ: usize = 136;
const OFF_LOCK_SLEEPERS: usize = 140;
const OFF_LOCK_SPINNER: usize = 144;
const OFF_LOCK_IDLE_WAKES: usize = 152;
/// The object a small save is writing ([`Meta::in_flight`]), in the lock's cache line: only
/// the holder writes it, and the holder has that line already.
const OFF_IN_FLIGHT: usize = 160;

/// The context is open for business.
pub(crate) const STATE_OPEN: u64 = 1;
/// The context was shut down.
pub(crate) const STATE_CLOSED: u64 = 2;

/// The head word: the journal's generation in the high 32 bits (compaction runs every few
/// hundred saves, so 16 bits could wrap within a long run), its committed length in the
/// low 32 (compaction keeps it to a few dozen KiB).
const LEN_BITS: u32 = 32;
const LEN_MASK: u64 = (1 << LEN_BITS) - 1;

/// The journal's generation and committed length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Head {
    pub(crate) generation: u32,
    pub(crate) len: u64,
}

impl Head {
    pub(crate) fn pack(self) -> u64 {
        (u64::from(self.generation) << LEN_BITS) | (self.len & LEN_MASK)
    }
    pub(crate) fn unpack(word: u64) -> Head {
        Head { generation: (word >> LEN_BITS) as u32, len: word & LEN_MASK }
    }
}

/// The mapped meta page, shared by every attached process.
#[derive(Debug)]
pub(crate) struct Meta {
    map: MmapRaw,
    /// The file's device and inode, to tell it from the meta page of a later context of
    /// the same run id.
    id: (u64, u64),
}

impl Meta {
    /// Writes a new meta file at `path` (which must not exist) for a context of instance
    /// `instance`, and maps it.
    pub(crate) fn create(path: &Path, ram_capacity: u64, disk_capacity: Option<u64>, instance: u64) -> Result<Meta> {
        let file = fsutil::create_new(path, "create context meta file")?;
        let mut page = vec![0u8; META_LEN as usize];
        let mut put = |off: usize, v: u64| page[off..off + 8].copy_from_slice(&v.to_le_bytes());
        put(OFF_MAGIC, META_MAGIC);
        put(OFF_VERSION, META_VERSION);
        put(OFF_STATE, STATE_OPEN);
        put(OFF_HEAD, Head { generation: 0, len: 0 }.pack());
        put(OFF_RAM_CAP, ram_capacity);
        put(OFF_DISK_CAP, disk_capacity.unwrap_or(u64::MAX));
        put(OFF_INSTANCE, instance);
        file.write_all_at(&page, 0).map_err(|e| Error::io("write context meta file", path, e))?;
        Self::map(&file, path)
    }

    /// Maps an existing meta file and checks it.
    pub(crate) fn open(path: &Path) -> Result<Meta> {
        let file = fsutil::open_rw(path, "open context meta file")?;
        let len = file.metadata().map_err(|e| Error::io("inspect context meta file", path, e))?.len();
        if len != META_LEN {
            return Err(Error::corrupt(
                path.display().to_string(),
                format!("meta file is {len} bytes, expected {META_LEN}"),
            ));
        }
        let meta = Self::map(&file, path)?;
        let magic = meta.word(OFF_MAGIC).load(Ordering::Acquire);
        let version = meta.word(OFF_VERSION).load(Ordering::Acquire);
        if magic != META_MAGIC {
            return Err(Error::corrupt(path.display().to_string(), "not a workflow-context meta file (bad magic)"));
        }
        if version != META_VERSION {
            return Err(Error::corrupt(
                path.display().to_string(),
                format!(
                    "unsupported meta version {version}: this build of workflow-context reads version \
                     {META_VERSION} (the context was made by another build; a run's processes must all use one)"
                ),
            ));
        }
        Ok(meta)
    }

    fn map(file: &File, path: &Path) -> Result<Meta> {
        let stat = file.metadata().map_err(|e| Error::io("inspect context meta file", path, e))?;
        let map = MmapRaw::map_raw(file).map_err(|e| Error::io("map context meta file", path, e))?;
        if (map.len() as u64) < META_LEN {
            return Err(Error::corrupt(path.display().to_string(), "meta file shrank"));
        }
        Ok(Meta { map, id: (stat.dev(), stat.ino()) })
    }

    /// Whether `path` names this very meta file now: a shut-down context's directory is
    /// removed, and a new context of the same run id may have taken its name since.
    pub(crate) fn is_at(&self, path: &Path) -> bool {
        std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == self.id)
    }

    fn word(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off.is_multiple_of(8) && off + 8 <= META_LEN as usize);
        // SAFETY: the mapping is META_LEN bytes long (checked in `map`), page aligned, so
        // `off` (a multiple of 8 below META_LEN - 8) is in bounds and 8-byte aligned. The
        // memory lives as long as `self.map`, and is only ever accessed through atomics, by
        // this and other processes, so shared mutation is sound.
        unsafe { &*(self.map.as_mut_ptr().add(off).cast::<AtomicU64>()) }
    }

    fn word32(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off.is_multiple_of(4) && off + 4 <= META_LEN as usize);
        // SAFETY: as in `word`: in bounds (META_LEN bytes are mapped), 4-byte aligned, alive
        // as long as `self.map`, and only ever accessed through atomics.
        unsafe { &*(self.map.as_mut_ptr().add(off).cast::<AtomicU32>()) }
    }

    /// The index lock, shared by every attached process.
    pub(crate) fn lock(&self) -> IndexLock<'_> {
        IndexLock::new(
            self.word(OFF_LOCK_OWNER),
            self.word32(OFF_LOCK_SEQ),
            self.word32(OFF_LOCK_SLEEPERS),
            self.word32(OFF_LOCK_IDLE_WAKES),
            self.word(OFF_LOCK_SPINNER),
        )
    }

    pub(crate) fn state(&self) -> u64 {
        self.word(OFF_STATE).load(Ordering::Acquire)
    }

    /// This context's instance, which tells it apart from contexts of the same run id in
    /// other contexts directories: shared memory is one namespace for the whole machine, so
    /// its segments are named by both.
    pub(crate) fn instance(&self) -> u64 {
        self.word(OFF_INSTANCE).load(Ordering::Relaxed)
    }

    /// The object a holder of the index lock is writing for a small save, or 0.
    ///
    /// A small save writes its value under the lock, from its id's allocation to its
    /// commit, and notes the object here instead of appending a pending record: one store
    /// instead of an append (a small save went from about 1.15 to 1.0 µs). It clears the
    /// note right after its `Put` record commits. A holder that takes the lock and still
    /// finds an object here knows that the holder before it died (or failed) in between,
    /// and that nothing else names the object unless that `Put` committed, which it would
    /// find in the journal's current generation: no compaction runs between a note and its
    /// clearing, but for one before the `Put`'s own append.
    ///
    /// The word holds the id with a 16-bit check of it ([`in_flight_word`]), written in one
    /// store. A word that fails its check (a damaged meta page) reads as no note: the holder
    /// that finds it deletes nothing, so damage here can leave an object behind until the
    /// context is destroyed, but never make a holder delete a live value whose `Put` a
    /// compaction has taken out of the journal.
    pub(crate) fn in_flight(&self) -> u64 {
        let word = self.word(OFF_IN_FLIGHT).load(Ordering::Acquire);
        let obj = word & IN_FLIGHT_ID_MASK;
        if word != 0 && in_flight_word(obj) == Some(word) { obj } else { 0 }
    }

    /// Notes (or, with 0, clears) the object a small save is writing; `false`, noting
    /// nothing, for an id too large to note with its check (the caller records the object
    /// pending instead). Holders of the index lock only.
    pub(crate) fn set_in_flight(&self, obj: u64) -> bool {
        let word = match obj {
            0 => 0,
            _ => match in_flight_word(obj) {
                Some(word) => word,
                None => return false,
            },
        };
        self.word(OFF_IN_FLIGHT).store(word, Ordering::Release);
        true
    }

    /// Writes the in-flight word as it stands, checked or not: for tests that damage it.
    #[cfg(test)]
    pub(crate) fn set_in_flight_word(&self, word: u64) {
        self.word(OFF_IN_FLIGHT).store(word, Ordering::Release);
    }

    pub(crate) fn set_state(&self, state: u64) {
        self.word(OFF_STATE).store(state, Ordering::Release);
    }

    pub(crate) fn head(&self) -> Head {
        Head::unpack(self.word(OFF_HEAD).load(Ordering::Acquire))
    }

    fn set_head(&self, head: Head) {
        self.word(OFF_HEAD).store(head.pack(), Ordering::Release);
    }

    /// The generation of the key table every process should map.
    pub(crate) fn table_generation(&self) -> u32 {
        self.word(OFF_TABLE).load(Ordering::Acquire) as u32
    }

    fn set_table_generation(&self, generation: u32) {
        self.word(OFF_TABLE).store(u64::from(generation), Ordering::Release);
    }

    pub(crate) fn ram_capacity(&self) -> u64 {
        self.word(OFF_RAM_CAP).load(Ordering::Relaxed)
    }

    pub(crate) fn disk_capacity(&self) -> Option<u64> {
        Some(self.word(OFF_DISK_CAP).load(Ordering::Relaxed)).filter(|&c| c != u64::MAX)
    }
}

/// The path of journal generation `g` in `dir`.
pub(crate) fn journal_path(dir: &Path, generation: u32) -> PathBuf {
    dir.join(format!("journal.{generation}"))
}

/// Where an object lives: enough to find it again and to account for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Placed {
    pub(crate) obj: u64,
    pub(crate) tier: Arc<str>,
    pub(crate) kind: StorageKind,
    pub(crate) footprint: u64,
    pub(crate) slot: u64,
    pub(crate) len: u64,
}

impl Placed {
    pub(crate) fn object_ref(&self) -> ObjectRef {
        ObjectRef { id: ObjectId(self.obj), len: self.len, slot: self.slot, held: self.footprint }
    }
}

/// One journal record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Rec {
    /// An object exists (or is about to) that no key points to: being written, or replaced
    /// and about to be deleted. `owner` cleans it up; if `owner` dies, anyone may.
    Pending { at: Placed, owner: u64 },
    /// `key` now points to `at`. The object `key` pointed to before, `old`, becomes
    /// pending, owned by `owner`.
    Put { key: String, at: Placed, old: Option<Placed>, pass_by: PassBy, flags: u8, owner: u64 },
    /// `key`, which pointed to `at`, no longer exists; that object becomes pending, owned
    /// by `owner`.
    Remove { key: String, at: Placed, owner: u64 },
    /// Pending object `obj` is deleted.
    Gone { obj: u64 },
}

/// What the index knows of one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) at: Placed,
    pub(crate) pass_by: PassBy,
    pub(crate) flags: u8,
}

/// A pending object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Pending {
    pub(crate) at: Placed,
    pub(crate) owner: u64,
    /// Journal bytes of the record that made this pending object (0 when it came from a
    /// replaced or removed entry: a compacted journal writes it anew).
    rec_bytes: u64,
}

/// The bits of the in-flight word that hold the object id; its check is above them.
const IN_FLIGHT_ID_MASK: u64 = (1 << 48) - 1;

/// The in-flight word noting object `obj`: the id with the top 16 bits of its XXH3 above
/// it; `None` for 0 or an id too large to leave room for the check (2^48 ids and more).
fn in_flight_word(obj: u64) -> Option<u64> {
    (obj != 0 && obj <= IN_FLIGHT_ID_MASK)
        .then(|| xxhash_rust::xxh3::xxh3_64(&obj.to_le_bytes()) & !IN_FLIGHT_ID_MASK | obj)
}

/// Bytes in use by kind, live and pending together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Used {
    pub(crate) ram: u64,
    pub(crate) disk: u64,
}

impl Used {
    // Saturating: the budget admits nothing that would not count, but the records come from
    // other processes' journal and a damaged one must not panic a reader.
    fn add(&mut self, kind: StorageKind, n: u64) {
        match kind {
            StorageKind::Ram => self.ram = self.ram.saturating_add(n),
            StorageKind::Disk => self.disk = self.disk.saturating_add(n),
        }
    }
    fn sub(&mut self, kind: StorageKind, n: u64) {
        match kind {
            StorageKind::Ram => self.ram = self.ram.saturating_sub(n),
            StorageKind::Disk => self.disk = self.disk.saturating_sub(n),
        }
    }
}

const FRAME: usize = 8;

/// Encodes records into journal frames: `[body length u32][xxh3 of body, low 32 bits][body]`.
/// Returns each frame's length.
pub(crate) fn encode_frames(recs: &[Rec], out: &mut Vec<u8>) -> Vec<usize> {
    recs.iter().map(|rec| encode_frame(rec, out)).collect()
}

/// Appends one record's frame to `out` (see [`encode_frames`]); returns the frame's length.
fn encode_frame(rec: &Rec, out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME]);
    let body = postcard::to_extend(rec, std::mem::take(out)).expect("encoding to a Vec cannot fail");
    *out = body;
    let body_len = (out.len() - start - FRAME) as u32;
    let sum = xxhash_rust::xxh3::xxh3_64(&out[start + FRAME..]) as u32;
    out[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&sum.to_le_bytes());
    out.len() - start
}

/// Decodes journal frames. Returns the records and, for each, its frame length.
/// Any damage is an error naming the offset: committed journal bytes are never torn.
pub(crate) fn decode_frames(bytes: &[u8], base: u64) -> std::result::Result<Vec<(Rec, usize)>, String> {
    let mut recs = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let frame = bytes
            .get(at..at + FRAME)
            .ok_or_else(|| format!("truncated record header at offset {}", base + at as u64))?;
        let body_len = u32::from_le_bytes(frame[0..4].try_into().expect("4 bytes")) as usize;
        let sum = u32::from_le_bytes(frame[4..8].try_into().expect("4 bytes"));
        let body = bytes
            .get(at + FRAME..at + FRAME + body_len)
            .ok_or_else(|| format!("record at offset {} claims {body_len} bytes past the end", base + at as u64))?;
        if xxhash_rust::xxh3::xxh3_64(body) as u32 != sum {
            return Err(format!("record at offset {} fails its checksum", base + at as u64));
        }
        let rec: Rec = postcard::from_bytes(body)
            .map_err(|e| format!("record at offset {} does not decode: {e}", base + at as u64))?;
        recs.push((rec, FRAME + body_len));
        at += FRAME + body_len;
    }
    Ok(recs)
}

/// The file of the journal generation before the current one, kept to be written over by
/// the next compaction.
pub(crate) const SPARE_JOURNAL: &str = "journal.spare";

/// Bytes a journal generation starts with. Compaction keeps the journal near
/// [`COMPACT_MIN`], so it seldom needs more.
const JOURNAL_MIN: u64 = 32 << 10;

/// One generation of the journal: a file whose blocks are all allocated up front, mapped so
/// that an append is a copy into memory rather than a system call. Only the first `len`
/// bytes of the head are committed; the rest is zeros or an append that was never
/// committed, and nobody reads it.
#[derive(Debug)]
struct Journal {
    file: File,
    map: MmapRaw,
    /// The file's device and inode, to recognise it under another name.
    id: (u64, u64),
}

impl Journal {
    /// Creates generation `path` (replacing a leftover of a writer that died making it)
    /// with room for `cap` bytes.
    fn create(path: &Path, cap: u64) -> Result<Journal> {
        let _ = std::fs::remove_file(path);
        let file = fsutil::create_new(path, "create index journal")?;
        // Every block is allocated before the file is mapped: a full disk is an error now,
        // not a SIGBUS at an append.
        if let Err(e) = fsutil::reserve(&file, cap) {
            let _ = std::fs::remove_file(path);
            return Err(Error::io("reserve space for index journal", path, e));
        }
        Self::map(file, path)
    }

    fn open(path: &Path) -> Result<Journal> {
        Self::map(fsutil::open_rw(path, "open index journal")?, path)
    }

    fn map(file: File, path: &Path) -> Result<Journal> {
        let meta = file.metadata().map_err(|e| Error::io("inspect index journal", path, e))?;
        let map = MmapRaw::map_raw(&file).map_err(|e| Error::io("map index journal", path, e))?;
        Ok(Journal { file, map, id: (meta.dev(), meta.ino()) })
    }

    /// Whether `path` names this very file now (journal files change names as generations
    /// pass; see [`Replica::spare`]).
    fn is_at(&self, path: &Path) -> bool {
        std::fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == self.id)
    }

    /// The bytes the file has room for.
    fn cap(&self) -> u64 {
        self.map.len() as u64
    }

    /// Copies `bytes` to offset `at`, which the caller checked is within [`cap`](Self::cap)
    /// and past the committed length.
    fn write_at(&self, at: u64, bytes: &[u8]) {
        assert!(at.checked_add(bytes.len() as u64).is_some_and(|end| end <= self.cap()), "append past the journal");
        // SAFETY: the destination range is inside the mapping (asserted above), which lives
        // as long as `self.map`. No code of this program reads or writes these bytes
        // meanwhile: they lie past the committed length, which readers stop at, and only the
        // holder of the index lock writes, which is the caller. (A process still reading the
        // file's previous generation may `pread` them while they change: that is the
        // kernel's copy, not an access through a reference, and `Replica::follow` throws
        // such a read away.) A `&[u8]` from the caller cannot overlap the mapping's
        // uncommitted tail.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.map.as_mut_ptr().add(at as usize), bytes.len()) }
    }

    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, at)
    }

    /// The bytes `from..to` in place, if the file has them, for a caller that holds the
    /// index lock.
    fn locked_bytes(&self, from: u64, to: u64) -> Option<&[u8]> {
        if from > to || to > self.cap() {
            return None;
        }
        // SAFETY: the range is inside the mapping (checked above), which lives as long as
        // `self.map`, and the returned borrow cannot outlive `self`. Nothing writes these
        // bytes while the borrow lives: only the holder of the index lock writes a journal
        // file (appends past the committed length, and compactions), and the caller holds
        // the lock, while `&self` keeps this replica's own appends out.
        Some(unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(from as usize), (to - from) as usize) })
    }
}

/// Whether the caller holds the index lock, under which no process writes the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    Locked,
    Unlocked,
}

/// This process's view of the index: the mapped key table, shared with every process,
/// and the pending objects, which this process follows in the journal.
#[derive(Debug)]
pub(crate) struct Replica {
    dir: PathBuf,
    journal: Journal,
    /// The generation before `journal`, still open and mapped: the next compaction writes
    /// the generation after into this same file (see [`reuse_spare`](Self::reuse_spare)),
    /// and a process that follows it finds it here. Keeping it saves an `open`, an `mmap`,
    /// a `munmap` and a `close` a compaction, and the page faults of writing through a new
    /// mapping: a tenth of a small save's cost (1.55 to 1.40 µs at 100 keys).
    spare: Option<Journal>,
    /// Buffers an append encodes into (records, frame lengths), kept from one to the next.
    scratch: (Vec<u8>, Vec<usize>),
    head: Head,
    table: Table,
    pub(crate) pending: HashMap<u64, Pending>,
    /// Bytes held by pending objects.
    pending_used: Used,
    /// Bytes of journal records that describe pending objects (for compaction).
    live_bytes: u64,
    /// Checked zero-copy views of large objects, by object, dropped as soon as their object
    /// leaves the live set.
    pub(crate) views: Mutex<HashMap<u64, View>>,
    /// Tests only: how many more appends succeed before every one fails as if the disk
    /// were full (`None`: no fault).
    #[cfg(test)]
    pub(crate) appends_before_fault: Option<usize>,
}

/// A checked zero-copy view of a large object, and the key it was loaded for.
#[derive(Debug)]
pub(crate) struct View {
    pub(crate) key: Box<str>,
    pub(crate) bytes: Payload,
}

/// Journal size below which compaction never runs. Compaction writes only the pending
/// objects (the keys are in the table), so it is cheap and the journal stays short:
/// opening a context replays at most this much.
const COMPACT_MIN: u64 = 16 << 10;
/// Compaction runs when the journal is this many times the size of its pending records.
const COMPACT_RATIO: u64 = 4;

/// Opens generation `current()` of an index file with `open`, and the newer one if a writer
/// replaced it meanwhile (the file of the generation read a moment ago is then gone).
fn follow_generation<T>(
    dir: &Path,
    what: &str,
    current: impl Fn() -> u32,
    open: impl Fn(u32) -> Result<T>,
) -> Result<(T, u32)> {
    for _ in 0..64 {
        let generation = current();
        match open(generation) {
            Err(Error::Io { ref source, .. })
                if source.kind() == std::io::ErrorKind::NotFound && current() != generation =>
            {
                continue;
            }
            Err(Error::Io { ref source, ref path, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(missing_generation(path, what, generation));
            }
            other => return other.map(|t| (t, generation)),
        }
    }
    Err(Error::corrupt(dir.display().to_string(), format!("the {what} kept changing generation while being opened")))
}

/// The error for the file of generation `generation` of an index file (`what`), at `path`,
/// which is missing though the meta page still names that generation: damage, not a writer
/// moving on (a writer publishes the next generation before the file of this one goes).
fn missing_generation(path: &Path, what: &str, generation: u32) -> Error {
    Error::corrupt(
        path.display().to_string(),
        format!("the {what} is missing, though the meta page names its generation {generation} as current"),
    )
}

impl Replica {
    /// A replica of an empty index whose journal and table, generation 0, are created in
    /// `dir`.
    pub(crate) fn create(dir: &Path) -> Result<Replica> {
        let journal = Journal::create(&journal_path(dir, 0), JOURNAL_MIN)?;
        let table = Table::create(dir, 0, TABLE_START_SLOTS, TABLE_START_HEAP)?;
        Ok(Self::empty(dir, journal, Head { generation: 0, len: 0 }, table))
    }

    /// Attaches to the index `meta` describes: maps its table and reads the journal.
    pub(crate) fn open(dir: &Path, meta: &Meta) -> Result<Replica> {
        // A writer may compact the journal (or grow the table) meanwhile, renaming the file
        // the meta page named a moment ago.
        let (journal, generation) =
            follow_generation(dir, "journal", || meta.head().generation, |g| Journal::open(&journal_path(dir, g)))?;
        let table = Self::map_table(dir, meta)?;
        let mut replica = Self::empty(dir, journal, Head { generation, len: 0 }, table);
        replica.catch_up(meta)?;
        Ok(replica)
    }

    /// Maps the table generation `meta` names (following it if it changes meanwhile).
    fn map_table(dir: &Path, meta: &Meta) -> Result<Table> {
        follow_generation(dir, "key table", || meta.table_generation(), |g| Table::open(dir, g)).map(|(t, _)| t)
    }

    fn empty(dir: &Path, journal: Journal, head: Head, table: Table) -> Replica {
        Replica {
            dir: dir.to_owned(),
            journal,
            spare: None,
            scratch: (Vec::new(), Vec::new()),
            head,
            table,
            pending: HashMap::new(),
            pending_used: Used::default(),
            live_bytes: 0,
            views: Mutex::new(HashMap::new()),
            #[cfg(test)]
            appends_before_fault: None,
        }
    }

    /// Follows the context directory to where it was moved (after creation in staging).
    pub(crate) fn moved_to(&mut self, dir: &Path) {
        self.dir = dir.to_owned();
        self.table.moved_to(dir);
    }

    /// Whether the replica has applied everything committed and maps the current table.
    pub(crate) fn is_current(&self, meta: &Meta) -> bool {
        meta.head() == self.head && meta.table_generation() == self.table.generation()
    }

    /// Whether a reader may use this replica as it is: it maps the current table (which
    /// holds every key), and it has followed the journal if it keeps views that the
    /// journal may retire. Lookups need nothing from the journal, so a process that holds
    /// no views reads without following other processes' writes.
    pub(crate) fn can_read(&self, meta: &Meta) -> bool {
        meta.table_generation() == self.table.generation()
            && (meta.head() == self.head || self.views.lock().unwrap_or_else(|p| p.into_inner()).is_empty())
    }

    /// Looks a key up in the shared table, without a lock. `prefetch` is called with the
    /// location word of each candidate entry whose word fits in 32 bits, before the entry
    /// itself is read (see
    /// [`StorageTier::prefetch`](context_core::StorageTier::prefetch)).
    pub(crate) fn lookup(&self, key: &str, prefetch: impl FnMut(u64)) -> Result<Lookup> {
        self.table.lookup(key, prefetch)
    }

    /// Every key, in no order; weakly consistent without the index lock.
    pub(crate) fn keys(&self) -> Result<Vec<String>> {
        self.table.keys()
    }

    /// Bytes in use, live and pending. Exact under the index lock.
    pub(crate) fn used(&self) -> Used {
        let live = self.table.counters();
        Used {
            ram: live.ram.saturating_add(self.pending_used.ram),
            disk: live.disk.saturating_add(self.pending_used.disk),
        }
    }

    /// How many keys there are. Exact under the index lock.
    pub(crate) fn key_count(&self) -> u64 {
        self.table.counters().keys
    }

    /// Applies every committed record this replica has not seen and maps the current
    /// table.
    pub(crate) fn catch_up(&mut self, meta: &Meta) -> Result<()> {
        self.catch_up_with(meta, Held::Unlocked)
    }

    /// [`catch_up`](Self::catch_up) for a caller that holds the index lock: the journal
    /// cannot change meanwhile, so its records are decoded where they lie in the mapping
    /// instead of copied out with a system call (which, when several processes save in
    /// turn, every save made to read the others' records).
    pub(crate) fn catch_up_locked(&mut self, meta: &Meta) -> Result<()> {
        self.catch_up_with(meta, Held::Locked)
    }

    fn catch_up_with(&mut self, meta: &Meta, held: Held) -> Result<()> {
        if meta.table_generation() != self.table.generation() {
            self.table = Self::map_table(&self.dir, meta)?;
        }
        for _ in 0..64 {
            if self.follow(meta, meta.head(), held)? {
                return Ok(());
            }
        }
        Err(self.corrupt("the journal kept changing generation while being read".to_owned()))
    }

    /// Applies the records up to `head`, which was loaded from `meta` a moment ago. `false`
    /// if the journal moved to another generation meanwhile: load the head and try again.
    /// (Having caught up with the head as it was is enough: a writer may have appended
    /// since, and chasing it could go on for as long as it writes.)
    fn follow(&mut self, meta: &Meta, head: Head, held: Held) -> Result<bool> {
        if head == self.head {
            return Ok(true);
        }
        if head.generation != self.head.generation {
            // A writer compacted the journal: reload from the new generation.
            match self.open_journal(&journal_path(&self.dir, head.generation)) {
                Ok(journal) => {
                    self.spare = Some(std::mem::replace(&mut self.journal, journal));
                    self.head = Head { generation: head.generation, len: 0 };
                    self.pending.clear();
                    self.pending_used = Used::default();
                    self.live_bytes = 0;
                    // The records of the old generation this replica had not read, which
                    // would have dropped views of the objects they replaced, are gone with
                    // it: keep only the views whose key still names their object.
                    let table = &self.table;
                    self.views.get_mut().unwrap_or_else(|p| p.into_inner()).retain(|&obj, view| {
                        matches!(table.lookup(&view.key, |_| {}), Ok(Lookup::Found(now)) if now.at.obj == obj)
                    });
                }
                // Compacted again meanwhile, or else the file is missing.
                Err(Error::Io { ref source, ref path, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                    if meta.head().generation != head.generation {
                        return Ok(false);
                    }
                    return Err(missing_generation(path, "journal", head.generation));
                }
                Err(e) => return Err(e),
            }
        }
        let (from, to) = (self.head.len, head.len);
        let read = self.read_journal(from, to, held);
        // A generation's file is written over two compactions on (see `reuse_spare`): what
        // was read counts only if the head still names its generation after the read.
        fence(Ordering::Acquire);
        if meta.head().generation != head.generation {
            return Ok(false);
        }
        for (rec, frame_len) in read? {
            self.apply(&rec, frame_len as u64);
        }
        self.head = Head { generation: head.generation, len: to };
        Ok(true)
    }

    fn read_journal(&self, from: u64, to: u64, held: Held) -> Result<Vec<(Rec, usize)>> {
        if to < from {
            return Err(self.corrupt(format!("committed length went back from {from} to {to}")));
        }
        // Checked before anything is read or allocated: a damaged head may claim 4 GiB.
        if to > self.journal.cap() {
            return Err(
                self.corrupt(format!("committed length {to} is past the journal's {} bytes", self.journal.cap()))
            );
        }
        if held == Held::Locked {
            let bytes = self.journal.locked_bytes(from, to).ok_or_else(|| {
                self.corrupt(format!("committed length {to} is past the journal's {} bytes", self.journal.cap()))
            })?;
            return decode_frames(bytes, from).map_err(|d| self.corrupt(d));
        }
        // Without the lock, a writer may be rewriting this file (see `reuse_spare`): the
        // kernel copies the bytes, and `follow` throws the copy away if that happened.
        let mut buf = vec![0u8; (to - from) as usize];
        self.journal.read_exact_at(&mut buf, from).map_err(|e| match e.kind() {
            // The file ends before what the meta page says is committed: it was truncated.
            std::io::ErrorKind::UnexpectedEof => {
                self.corrupt(format!("committed length {to} is past the end of the journal (truncated)"))
            }
            _ => Error::io("read index journal", self.path(), e),
        })?;
        decode_frames(&buf, from).map_err(|d| self.corrupt(d))
    }

    /// Repairs the table after a writer died while changing it: applies again the
    /// journal records it may have missed, then counts the counters anew. The caller
    /// holds the write lock and has caught up. Returns whether anything needed repair.
    pub(crate) fn repair_table(&mut self, meta: &Meta) -> Result<bool> {
        let applied = Head::unpack(self.table.applied());
        if applied == self.head {
            return Ok(false);
        }
        // Records of another generation are all in the table already (compaction runs
        // only on an applied table); this generation's are re-applied from its start.
        let from =
            if applied.generation == self.head.generation && applied.len <= self.head.len { applied.len } else { 0 };
        let recs = match self.read_journal(from, self.head.len, Held::Locked) {
            Ok(recs) => recs,
            // No record starts there: the table's word is what is damaged. Applying the whole
            // generation again is as safe (idempotent) and ends in the same state. (Damage in
            // the journal itself fails that read too.)
            Err(_) if from != 0 => self.read_journal(0, self.head.len, Held::Locked)?,
            Err(e) => return Err(e),
        };
        for (rec, _) in recs {
            self.apply_to_table(meta, &rec)?;
        }
        self.table.recount()?;
        self.table.set_applied(self.head);
        Ok(true)
    }

    fn path(&self) -> PathBuf {
        journal_path(&self.dir, self.head.generation)
    }

    fn corrupt(&self, detail: String) -> Error {
        Error::corrupt(self.path().display().to_string(), detail)
    }

    fn forget_view(&self, obj: u64) {
        self.views.lock().unwrap_or_else(|p| p.into_inner()).remove(&obj);
    }

    fn add_pending(&mut self, at: Placed, owner: u64, rec_bytes: u64) {
        self.pending_used.add(at.kind, at.footprint);
        self.live_bytes += rec_bytes;
        if let Some(old) = self.pending.insert(at.obj, Pending { at, owner, rec_bytes }) {
            self.pending_used.sub(old.at.kind, old.at.footprint);
            self.live_bytes -= old.rec_bytes;
        }
    }

    fn drop_pending(&mut self, obj: u64) {
        if let Some(p) = self.pending.remove(&obj) {
            self.pending_used.sub(p.at.kind, p.at.footprint);
            self.live_bytes -= p.rec_bytes;
        }
    }

    /// Applies one record to this process's pending objects. Records come from the
    /// committed journal, so they are applied as written.
    fn apply(&mut self, rec: &Rec, frame_len: u64) {
        match rec {
            Rec::Pending { at, owner } => self.add_pending(at.clone(), *owner, frame_len),
            Rec::Put { at, old, owner, .. } => {
                self.drop_pending(at.obj);
                if let Some(old) = old.as_ref().filter(|o| o.obj != at.obj) {
                    self.forget_view(old.obj);
                    // The old object stays counted: it is pending until deleted.
                    self.add_pending(old.clone(), *owner, 0);
                }
            }
            Rec::Remove { at, owner, .. } => {
                self.forget_view(at.obj);
                self.add_pending(at.clone(), *owner, 0);
            }
            Rec::Gone { obj } => {
                self.drop_pending(*obj);
                self.forget_view(*obj);
            }
        }
    }

    /// Applies one record to the shared table, growing it if needed. Idempotent.
    fn apply_to_table(&mut self, meta: &Meta, rec: &Rec) -> Result<()> {
        match rec {
            Rec::Pending { at, .. } => {
                if self.table.next_obj() <= at.obj {
                    self.table.set_next_obj(at.obj + 1);
                }
            }
            Rec::Put { key, at, pass_by, flags, .. } => {
                // A small save's object has no `Pending` record before its `Put`.
                if self.table.next_obj() <= at.obj {
                    self.table.set_next_obj(at.obj + 1);
                }
                if !self.table.put(key, at, *pass_by, *flags)? {
                    // Only when repairing (`append` grows first): grow and apply again.
                    self.grow(meta, key.len())?;
                    if !self.table.put(key, at, *pass_by, *flags)? {
                        return Err(Error::corrupt(
                            self.table.path().display().to_string(),
                            "a grown key table is full",
                        ));
                    }
                }
            }
            Rec::Remove { key, at, .. } => self.table.remove(key, at.obj)?,
            Rec::Gone { .. } => {}
        }
        Ok(())
    }

    /// Replaces the table by a bigger generation with room for a new key of `key_len`
    /// bytes, and publishes it. The caller holds the write lock.
    fn grow(&mut self, meta: &Meta, key_len: usize) -> Result<()> {
        let generation = self.table.generation().wrapping_add(1);
        let grown = self.table.grown(&self.dir, generation, key_len)?;
        meta.set_table_generation(generation);
        let old = std::mem::replace(&mut self.table, grown);
        let _ = std::fs::remove_file(old.path());
        Ok(())
    }

    /// Removes every key table file but the current one's: what a writer that died while
    /// growing the table left (the generation it was building, or the one it had just
    /// replaced). Only a hint of cleanliness: what cannot be listed or removed stays. The
    /// caller holds the write lock, so no other table is being built.
    pub(crate) fn remove_stale_tables(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        let current = self.table.generation();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let generation = name.to_str().and_then(|n| n.strip_prefix("table.")).and_then(|g| g.parse::<u32>().ok());
            if generation.is_some_and(|g| g != current) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// The name of tier `name` as the index's entries share it (one string for all),
    /// registering it in the key table if new. The caller holds the write lock.
    pub(crate) fn shared_tier_name(&self, name: &str) -> Result<Arc<str>> {
        self.table.shared_tier_name(name)
    }

    /// Appends records and publishes them, then applies them to the table. The caller
    /// holds the write lock and has caught up.
    pub(crate) fn append(&mut self, meta: &Meta, recs: &[Rec]) -> Result<()> {
        debug_assert!(self.is_current(meta));
        #[cfg(test)]
        if let Some(left) = self.appends_before_fault.as_mut() {
            if *left == 0 {
                let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
                return Err(Error::io("append to index journal (a test's fault)", self.path(), full));
            }
            *left -= 1;
        }
        // Make room in the table before committing: a change that is committed must be
        // applied, so what can fail (disk space for a bigger table, the tier registry) fails
        // first, with nothing committed.
        for rec in recs {
            if let Rec::Put { key, at, .. } = rec {
                self.table.tier_index(&at.tier)?;
                if self.table.needs_room_for(key)? {
                    self.grow(meta, key.len())?;
                }
            }
        }
        // Encoded into buffers this replica keeps: a save appends three times.
        let (mut buf, mut frame_lens) = (std::mem::take(&mut self.scratch.0), std::mem::take(&mut self.scratch.1));
        buf.clear();
        frame_lens.clear();
        let committed = self.encode_and_commit(meta, recs, &mut buf, &mut frame_lens);
        let applied = committed.and_then(|head| {
            for (rec, &frame_len) in recs.iter().zip(&frame_lens) {
                self.apply_to_table(meta, rec)?;
                self.apply(rec, frame_len as u64);
            }
            self.table.set_applied(head);
            Ok(())
        });
        self.scratch = (buf, frame_lens);
        applied
    }

    /// Encodes `recs` into `buf` (their frame lengths into `frame_lens`) and commits them:
    /// the part of [`append`](Self::append) that can fail with nothing committed. Returns
    /// the new head.
    fn encode_and_commit(
        &mut self,
        meta: &Meta,
        recs: &[Rec],
        buf: &mut Vec<u8>,
        frame_lens: &mut Vec<usize>,
    ) -> Result<Head> {
        for rec in recs {
            frame_lens.push(encode_frame(rec, buf));
        }
        if self.head.len + buf.len() as u64 > self.journal.cap() {
            // This generation is full: the pending objects move to a bigger one first (which
            // may fail, for want of disk space, with nothing committed).
            self.compact(meta, buf.len() as u64)?;
        }
        let at = self.head.len;
        let end = at + buf.len() as u64;
        if end > LEN_MASK {
            return Err(self.corrupt("journal reached its maximum length".to_owned()));
        }
        self.journal.write_at(at, buf);
        let head = Head { generation: self.head.generation, len: end };
        // Committed here: from now on every process sees these records.
        meta.set_head(head);
        self.head = head;
        Ok(head)
    }

    /// Rewrites the journal as the pending objects when older records dominate it (the
    /// keys live in the table). The caller holds the write lock and has caught up.
    ///
    /// Best effort: it runs after a change has committed, so a compaction that fails (no
    /// disk space for the new generation) leaves the journal as it is; an append that finds
    /// the journal full compacts it first, and fails then, before committing anything.
    pub(crate) fn maybe_compact(&mut self, meta: &Meta) {
        if self.head.len < COMPACT_MIN || self.head.len < COMPACT_RATIO * self.live_bytes.max(1) {
            return;
        }
        let _ = self.compact(meta, 0);
    }

    /// Writes the pending objects into the next journal generation, with room for `room`
    /// more bytes at least, and publishes it. The caller holds the write lock and has caught
    /// up.
    fn compact(&mut self, meta: &Meta, room: u64) -> Result<()> {
        let generation = self.head.generation.wrapping_add(1);
        let path = journal_path(&self.dir, generation);
        let recs: Vec<Rec> = self.pending.values().map(|p| Rec::Pending { at: p.at.clone(), owner: p.owner }).collect();
        let mut buf = Vec::new();
        let frame_lens = encode_frames(&recs, &mut buf);
        // Half the new generation is free after the rewrite, so appends go on for a while
        // before the next one.
        let cap = ((buf.len() as u64 + room) * 2).next_power_of_two().max(JOURNAL_MIN);
        if cap > LEN_MASK {
            return Err(Error::corrupt(path.display().to_string(), "journal reached its maximum length"));
        }
        let journal = match self.reuse_spare(&path, cap) {
            Some(journal) => journal,
            // A leftover from a writer that died mid-compaction is garbage (nobody reads
            // it): `create` replaces it.
            None => Journal::create(&path, cap)?,
        };
        journal.write_at(0, &buf);
        let old_path = self.path();
        let head = Head { generation, len: buf.len() as u64 };
        meta.set_head(head);
        self.table.set_applied(head);
        let old = std::mem::replace(&mut self.journal, journal);
        self.head = head;
        // Account the rewritten records exactly as a replica loading this file would.
        for (p, len) in self.pending.values_mut().zip(frame_lens) {
            p.rec_bytes = len as u64;
        }
        self.live_bytes = buf.len() as u64;
        // The old generation's file becomes the spare the next compaction writes into.
        if std::fs::rename(&old_path, self.dir.join(SPARE_JOURNAL)).is_ok() {
            self.spare = Some(old);
        } else {
            let _ = std::fs::remove_file(old_path);
        }
        Ok(())
    }

    /// Journal generation `path`: the spare this replica holds if `path` names that file
    /// now, else the file opened and mapped.
    fn open_journal(&mut self, path: &Path) -> Result<Journal> {
        match self.spare.take() {
            Some(spare) if spare.is_at(path) => Ok(spare),
            _ => Journal::open(path),
        }
    }

    /// The spare journal file (the generation before the current one), moved to `path` if it
    /// has room for `cap` bytes.
    ///
    /// Why: a new file costs its allocation, and unlinking the old one its blocks' release
    /// (with a discard, on a file system mounted with `discard`, waited for): together more
    /// than a hundred saves' worth of appends. The file comes through the mapping this
    /// process already holds when it can ([`open_journal`](Self::open_journal)). A process
    /// that still reads the old generation through an open descriptor may see it rewritten;
    /// `catch_up` throws away what it read if the head has moved on meanwhile.
    ///
    /// A writer that died between publishing a compaction and renaming the generation before
    /// it left that file under its own name (the generation before the current one) and no
    /// spare: that file is the spare, and taking it leaves no orphan behind.
    fn reuse_spare(&mut self, path: &Path, cap: u64) -> Option<Journal> {
        let spare = self.dir.join(SPARE_JOURNAL);
        let orphan = journal_path(&self.dir, self.head.generation.wrapping_sub(1));
        std::fs::rename(&spare, path).or_else(|_| std::fs::rename(&orphan, path)).ok()?;
        match self.open_journal(path) {
            Ok(journal) if journal.cap() >= cap => Some(journal),
            _ => {
                let _ = std::fs::remove_file(path);
                None
            }
        }
    }

    /// A fresh object id. The caller holds the write lock and records a `Pending` for it
    /// before anyone else can allocate.
    pub(crate) fn allocate_id(&mut self) -> u64 {
        let id = self.table.next_obj();
        self.table.set_next_obj(id + 1);
        id
    }

    /// Whether the journal's current generation commits a `Put` of object `obj`. The
    /// caller holds the write lock and has caught up. (See [`Meta::in_flight`]: a small
    /// save's object is noted there until its `Put` commits, and no compaction runs in
    /// between, so a committed `Put` of it is in the current generation.)
    pub(crate) fn commits_put_of(&self, obj: u64) -> Result<bool> {
        let recs = self.read_journal(0, self.head.len, Held::Locked)?;
        Ok(recs.iter().any(|(rec, _)| matches!(rec, Rec::Put { at, .. } if at.obj == obj)))
    }

    /// Looks a key up holding the write lock (no writer can be in the middle).
    pub(crate) fn get_locked(&self, key: &str) -> Result<Option<Entry>> {
        self.get_locked_with(key, |_| {})
    }

    /// See [`Table::prefetch_slot`].
    pub(crate) fn prefetch_slot(&self, key: &str) {
        self.table.prefetch_slot(key);
    }

    /// See [`Table::prefetch_entry`].
    pub(crate) fn prefetch_entry(&self, key: &str, value: impl FnMut(u64)) {
        self.table.prefetch_entry(key, value);
    }

    /// [`get_locked`](Self::get_locked), offering the value's location word to `prefetch`
    /// as [`lookup`](Self::lookup) does.
    pub(crate) fn get_locked_with(&self, key: &str, prefetch: impl FnMut(u64)) -> Result<Option<Entry>> {
        match self.table.lookup(key, prefetch)? {
            Lookup::Found(e) => Ok(Some(e)),
            Lookup::Missing => Ok(None),
            Lookup::Busy => Err(Error::corrupt(
                self.table.path().display().to_string(),
                format!("the entry of key {key:?} stays locked after repair"),
            )),
        }
    }
}

/// Slots of a new context's table.
const TABLE_START_SLOTS: u64 = 256;
/// Heap bytes of a new context's table.
const TABLE_START_HEAP: u64 = 32 << 10;

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(obj: u64, kind: StorageKind, footprint: u64) -> Placed {
        Placed { obj, tier: "t".into(), kind, footprint, slot: 0, len: footprint }
    }

    /// A new index in a temporary directory, with no budget: the directory, its meta page
    /// and the creating process's replica.
    fn new_index() -> (tempfile::TempDir, Meta, Replica) {
        let dir = tempfile::tempdir().unwrap();
        let meta = Meta::create(&dir.path().join("meta"), u64::MAX, None, 1).unwrap();
        let replica = Replica::create(dir.path()).unwrap();
        (dir, meta, replica)
    }

    /// The meta page of the index in `dir` as another process maps it.
    fn other_process(dir: &tempfile::TempDir) -> Meta {
        Meta::open(&dir.path().join("meta")).unwrap()
    }

    /// The names of the journal files in `dir`, sorted.
    fn journal_files(dir: &tempfile::TempDir) -> Vec<String> {
        fsutil::names_starting(dir.path(), "journal.")
    }

    #[test]
    fn the_in_flight_word_notes_an_id_with_its_check_and_a_damaged_one_notes_nothing() {
        let (dir, meta, _) = new_index();
        let other = other_process(&dir);
        for obj in [1, 2, 7, 1 << 20, 0xdead_beef, IN_FLIGHT_ID_MASK] {
            assert!(meta.set_in_flight(obj));
            assert_eq!((meta.in_flight(), other.in_flight()), (obj, obj));
            let word = meta.word(OFF_IN_FLIGHT).load(Ordering::Relaxed);
            // Any one bit flipped: no note, so nothing is deleted on its account.
            for bit in 0..64 {
                meta.set_in_flight_word(word ^ 1 << bit);
                assert_eq!(meta.in_flight(), 0, "object {obj:#x} with bit {bit} flipped");
            }
            // A bare id, as a build without the check wrote it.
            meta.set_in_flight_word(obj);
            assert_eq!(meta.in_flight(), 0, "bare object id {obj:#x}");
        }
        assert!(meta.set_in_flight(0));
        assert_eq!(meta.in_flight(), 0);
        // An id with no room left for its check is not noted (the save records it pending).
        assert!(meta.set_in_flight(5));
        assert!(!meta.set_in_flight(IN_FLIGHT_ID_MASK + 1));
        assert_eq!(meta.in_flight(), 5, "a refused note leaves the word as it was");
    }

    #[test]
    fn a_meta_page_of_another_version_is_refused_by_name() {
        let (dir, meta, _replica) = new_index();
        meta.word(OFF_VERSION).store(META_VERSION - 1, Ordering::Release);
        let Err(Error::Corrupt { what, detail, .. }) = Meta::open(&dir.path().join("meta")) else {
            panic!("a meta page of version {} was accepted", META_VERSION - 1)
        };
        assert!(what.ends_with("meta"), "{what}");
        assert!(detail.contains(&format!("version {}", META_VERSION - 1)), "{detail}");
        assert!(detail.contains(&format!("reads version {META_VERSION}")), "{detail}");
        meta.word(OFF_VERSION).store(META_VERSION, Ordering::Release);
        other_process(&dir);
    }

    #[test]
    fn frames_round_trip_and_damage_is_detected() {
        let recs = vec![
            Rec::Pending { at: placed(1, StorageKind::Ram, 64), owner: 9 },
            Rec::Put {
                key: "k/../é".into(),
                at: placed(1, StorageKind::Ram, 64),
                old: Some(placed(0, StorageKind::Disk, 3)),
                pass_by: PassBy::Val,
                flags: 1,
                owner: 9,
            },
            Rec::Remove { key: "k".into(), at: placed(1, StorageKind::Ram, 64), owner: 9 },
            Rec::Gone { obj: 1 },
        ];
        let mut buf = Vec::new();
        encode_frames(&recs, &mut buf);
        let back: Vec<Rec> = decode_frames(&buf, 0).unwrap().into_iter().map(|(r, _)| r).collect();
        assert_eq!(back, recs);
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            assert!(decode_frames(&bad, 0).is_err(), "flip at {i} unnoticed");
        }
        for cut in 1..buf.len() {
            // A cut inside a record is an error; a cut at a frame boundary is a shorter journal.
            let _ = decode_frames(&buf[..cut], 0);
        }
    }

    #[test]
    fn head_packs() {
        let h = Head { generation: u32::MAX, len: LEN_MASK };
        assert_eq!(Head::unpack(h.pack()), h);
    }

    fn put(key: &str, at: &Placed, old: Option<&Placed>) -> Rec {
        Rec::Put { key: key.into(), at: at.clone(), old: old.cloned(), pass_by: PassBy::Val, flags: 0, owner: 1 }
    }

    fn entry(r: &Replica, key: &str) -> Option<Entry> {
        r.get_locked(key).unwrap()
    }

    #[test]
    fn accounting_follows_records() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Meta::create(&dir.path().join("meta"), 1000, None, 1).unwrap();
        let mut r = Replica::create(dir.path()).unwrap();
        let a = placed(r.allocate_id(), StorageKind::Ram, 100);
        r.append(&meta, &[Rec::Pending { at: a.clone(), owner: 1 }]).unwrap();
        assert_eq!(r.used(), Used { ram: 100, disk: 0 });
        r.append(&meta, &[put("k", &a, None)]).unwrap();
        assert_eq!(r.used(), Used { ram: 100, disk: 0 });
        assert_eq!(r.key_count(), 1);
        let b = placed(r.allocate_id(), StorageKind::Disk, 300);
        r.append(&meta, &[Rec::Pending { at: b.clone(), owner: 1 }, put("k", &b, Some(&a))]).unwrap();
        assert_eq!(r.used(), Used { ram: 100, disk: 300 }, "old object is pending until gone");
        r.append(&meta, &[Rec::Gone { obj: a.obj }]).unwrap();
        assert_eq!(r.used(), Used { ram: 0, disk: 300 });
        // Another process attaching agrees.
        let r2 = Replica::open(dir.path(), &meta).unwrap();
        assert_eq!(r2.used(), r.used());
        assert_eq!(entry(&r2, "k"), entry(&r, "k"));
        assert_eq!(r2.table.next_obj(), r.table.next_obj());
        r.append(&meta, &[Rec::Remove { key: "k".into(), at: b.clone(), owner: 1 }, Rec::Gone { obj: b.obj }]).unwrap();
        assert_eq!(r.used(), Used::default());
        assert!(entry(&r, "k").is_none() && r.pending.is_empty());
        assert_eq!(r.key_count(), 0);
    }

    #[test]
    fn a_table_left_behind_the_journal_is_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Meta::create(&dir.path().join("meta"), 1000, None, 1).unwrap();
        let mut r = Replica::create(dir.path()).unwrap();
        let a = placed(r.allocate_id(), StorageKind::Ram, 10);
        let b = placed(r.allocate_id(), StorageKind::Ram, 20);
        r.append(&meta, &[Rec::Pending { at: a.clone(), owner: 1 }, put("x", &a, None)]).unwrap();
        let applied = r.table.applied();
        // A writer commits two records and dies before it applies them.
        let recs = [Rec::Pending { at: b.clone(), owner: 1 }, put("y", &b, None)];
        r.append(&meta, &recs).unwrap();
        r.table.remove("y", b.obj).unwrap();
        r.table.set_applied(Head::unpack(applied));
        let mut fresh = Replica::open(dir.path(), &meta).unwrap();
        assert!(entry(&fresh, "y").is_none(), "not applied yet");
        assert!(fresh.repair_table(&meta).unwrap());
        assert!(!fresh.repair_table(&meta).unwrap(), "repaired once");
        assert_eq!(entry(&fresh, "y").unwrap().at, b);
        assert_eq!(entry(&fresh, "x").unwrap().at, a);
        assert_eq!(fresh.used(), Used { ram: 30, disk: 0 });
        assert_eq!(fresh.key_count(), 2);
    }

    #[test]
    fn compaction_keeps_pending_objects_and_opening_reads_little() {
        let (dir, meta, mut r) = new_index();
        let stuck = placed(r.allocate_id(), StorageKind::Ram, 5);
        r.append(&meta, &[Rec::Pending { at: stuck.clone(), owner: 7 }]).unwrap();
        let mut current: Vec<Option<Placed>> = vec![None; 2_000];
        for i in 0..5_000usize {
            let at = placed(r.allocate_id(), StorageKind::Disk, 1);
            let key = format!("key-{}", i % 2_000);
            let old = current[i % 2_000].replace(at.clone());
            let mut recs = vec![Rec::Pending { at: at.clone(), owner: 1 }, put(&key, &at, old.as_ref())];
            recs.extend(old.map(|o| Rec::Gone { obj: o.obj }));
            r.append(&meta, &recs).unwrap();
            r.maybe_compact(&meta);
        }
        assert_eq!(r.used(), Used { ram: 5, disk: 2_000 });
        assert!(meta.head().generation > 0, "compacted");
        assert!(meta.head().len < 2 * COMPACT_MIN, "the journal stays short: {}", meta.head().len);
        let fresh = Replica::open(dir.path(), &meta).unwrap();
        assert_eq!(fresh.pending.keys().copied().collect::<Vec<_>>(), vec![stuck.obj]);
        assert_eq!(fresh.key_count(), 2_000);
        assert_eq!(fresh.keys().unwrap().len(), 2_000);
        assert_eq!(fresh.used(), r.used());
    }

    #[test]
    fn a_reader_following_the_journal_while_it_is_compacted_and_reused_sees_no_damage() {
        let dir = tempfile::tempdir().unwrap();
        let meta_path = dir.path().join("meta");
        let meta = Meta::create(&meta_path, u64::MAX, None, 1).unwrap();
        let mut w = Replica::create(dir.path()).unwrap();
        let stuck = placed(w.allocate_id(), StorageKind::Ram, 5);
        w.append(&meta, &[Rec::Pending { at: stuck.clone(), owner: 7 }]).unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            // Another process's view: its own meta mapping and journal descriptors.
            let reader = s.spawn(|| {
                let meta = Meta::open(&meta_path).unwrap();
                let mut r = Replica::open(dir.path(), &meta).unwrap();
                let mut rounds = 0u64;
                while !done.load(Ordering::Acquire) {
                    r.catch_up(&meta).expect("a journal being compacted reads as whole records");
                    rounds += 1;
                }
                r.catch_up(&meta).unwrap();
                (r.pending.keys().copied().collect::<Vec<_>>(), r.used(), rounds)
            });
            // Objects that come and go: the journal compacts every few hundred records, and
            // each compaction writes over the file of the generation before last.
            for _ in 0..30_000 {
                let at = placed(w.allocate_id(), StorageKind::Disk, 1);
                w.append(&meta, &[Rec::Pending { at: at.clone(), owner: 1 }]).unwrap();
                w.append(&meta, &[Rec::Gone { obj: at.obj }]).unwrap();
                w.maybe_compact(&meta);
            }
            assert!(meta.head().generation > 10, "compacted {} times", meta.head().generation);
            done.store(true, Ordering::Release);
            let (pending, used, rounds) = reader.join().unwrap();
            assert_eq!(pending, vec![stuck.obj]);
            assert_eq!(used, w.used());
            assert!(rounds > 10, "the reader followed along ({rounds} rounds)");
        });
    }

    #[test]
    fn what_a_reader_read_from_a_reused_generation_is_thrown_away() {
        let (dir, meta, mut w) = new_index();
        for _ in 0..50 {
            let at = placed(w.allocate_id(), StorageKind::Ram, 1);
            w.append(&meta, &[Rec::Pending { at, owner: 1 }]).unwrap();
        }
        // Another process, on generation 0, with its own descriptor of the file.
        let other_meta = other_process(&dir);
        let mut r = Replica::open(dir.path(), &other_meta).unwrap();
        let at = placed(w.allocate_id(), StorageKind::Ram, 1);
        w.append(&meta, &[Rec::Pending { at, owner: 1 }]).unwrap();
        // The reader loads the head here, and is held up while the writer compacts twice:
        // the second compaction writes generation 2 over generation 0's file.
        let seen = other_meta.head();
        w.compact(&meta, 0).unwrap();
        w.compact(&meta, 0).unwrap();
        assert_eq!(meta.head().generation, 2);
        assert!(!r.follow(&other_meta, seen, Held::Unlocked).unwrap(), "bytes of a reused file were applied");
        assert_eq!(r.pending.len(), 50, "nothing changed");
        r.catch_up(&other_meta).unwrap();
        assert_eq!(r.head, w.head);
        assert_eq!(r.pending.len(), 51);
        assert_eq!(r.used(), w.used());
    }

    #[test]
    fn compaction_writes_into_the_spare_this_process_holds_and_a_follower_reuses_its_own() {
        let (dir, meta, mut w) = new_index();
        let other_meta = other_process(&dir);
        let mut r = Replica::open(dir.path(), &other_meta).unwrap();
        let pend = |w: &mut Replica| {
            let at = placed(w.allocate_id(), StorageKind::Ram, 1);
            w.append(&meta, &[Rec::Pending { at, owner: 1 }]).unwrap();
        };
        pend(&mut w);
        r.catch_up(&other_meta).unwrap();
        let first = w.journal.id;
        assert_eq!(r.journal.id, first, "both map generation 0's file");
        w.compact(&meta, 0).unwrap();
        pend(&mut w);
        r.catch_up(&other_meta).unwrap();
        let second = w.journal.id;
        assert_ne!(second, first);
        assert_eq!(w.spare.as_ref().map(|j| j.id), Some(first), "the writer keeps generation 0 mapped");
        assert_eq!(r.spare.as_ref().map(|j| j.id), Some(first), "so does the follower");
        // Generation 2 goes into generation 0's file, through the mappings already held.
        w.compact(&meta, 0).unwrap();
        pend(&mut w);
        assert_eq!(w.journal.id, first);
        assert_eq!(w.spare.as_ref().map(|j| j.id), Some(second));
        assert!(w.journal.is_at(&journal_path(dir.path(), 2)));
        r.catch_up(&other_meta).unwrap();
        assert_eq!(r.journal.id, first);
        assert_eq!(r.spare.as_ref().map(|j| j.id), Some(second));
        assert_eq!((r.head, r.pending.len(), r.used()), (w.head, 3, w.used()));
        // A spare that is no longer the file at the path is not used: the file is opened.
        std::fs::remove_file(dir.path().join(SPARE_JOURNAL)).unwrap();
        w.compact(&meta, 0).unwrap();
        assert!(w.journal.is_at(&journal_path(dir.path(), 3)));
        assert_ne!(w.journal.id, second, "a new file, since the spare was gone");
        r.catch_up(&other_meta).unwrap();
        assert_eq!(r.journal.id, w.journal.id);
        assert_eq!((r.head, r.pending.len()), (w.head, 3));
        assert_eq!(Replica::open(dir.path(), &meta).unwrap().pending.len(), 3);
    }

    #[test]
    fn a_lock_holder_reads_the_journal_in_place_and_sees_what_a_reader_copies() {
        let (dir, meta, mut w) = new_index();
        let other_meta = other_process(&dir);
        let mut copied = Replica::open(dir.path(), &other_meta).unwrap();
        let mut in_place = Replica::open(dir.path(), &other_meta).unwrap();
        for round in 0..2_000u64 {
            let at = placed(w.allocate_id(), StorageKind::Ram, round + 1);
            w.append(&meta, &[Rec::Pending { at: at.clone(), owner: 1 }]).unwrap();
            if round % 10 != 0 {
                w.append(&meta, &[Rec::Gone { obj: at.obj }]).unwrap();
            }
            w.maybe_compact(&meta);
            if round % 7 == 0 {
                copied.catch_up(&other_meta).unwrap();
                in_place.catch_up_locked(&other_meta).unwrap();
                assert_eq!(
                    (in_place.head, &in_place.pending, in_place.used()),
                    (copied.head, &copied.pending, copied.used())
                );
            }
        }
        assert!(meta.head().generation > 0, "the journal was compacted along the way");
        in_place.catch_up_locked(&other_meta).unwrap();
        assert_eq!((in_place.head, in_place.pending.len(), in_place.used()), (w.head, 200, w.used()));
        // A committed length past the file is damage, not a read out of the mapping.
        let cap = in_place.journal.cap();
        meta.set_head(Head { generation: meta.head().generation, len: cap + 8 });
        match in_place.catch_up_locked(&other_meta) {
            Err(Error::Corrupt { detail, .. }) => assert!(detail.contains("past the journal"), "{detail}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_generation_left_under_its_name_by_a_dead_writer_becomes_the_next_one() {
        let (dir, meta, mut w) = new_index();
        let at = placed(w.allocate_id(), StorageKind::Ram, 1);
        w.append(&meta, &[Rec::Pending { at, owner: 1 }]).unwrap();
        w.compact(&meta, 0).unwrap();
        // The writer died before renaming generation 0 to the spare.
        std::fs::rename(dir.path().join(SPARE_JOURNAL), journal_path(dir.path(), 0)).unwrap();
        let orphan = w.spare.take().unwrap().id;
        let mut next = Replica::open(dir.path(), &meta).unwrap();
        next.compact(&meta, 0).unwrap();
        assert_eq!(next.journal.id, orphan, "generation 2 went into generation 0's file");
        let journals = journal_files(&dir);
        assert_eq!(journals, ["journal.2".to_owned(), SPARE_JOURNAL.to_owned()], "no orphan is left");
        assert_eq!(Replica::open(dir.path(), &meta).unwrap().pending.len(), 1);
    }

    #[test]
    fn opening_follows_a_compaction_that_renames_the_journal_meanwhile() {
        let (dir, meta, mut writer) = new_index();
        let at = placed(writer.allocate_id(), StorageKind::Ram, 10);
        writer.append(&meta, &[Rec::Pending { at, owner: 1 }]).unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        let failures = std::thread::scope(|s| {
            let opener = s.spawn(|| {
                let meta = other_process(&dir);
                let failures: Vec<String> =
                    (0..5_000).filter_map(|_| Replica::open(dir.path(), &meta).err().map(|e| e.to_string())).collect();
                done.store(true, Ordering::Release);
                failures
            });
            let mut compactions = 0;
            while !done.load(Ordering::Acquire) {
                writer.compact(&meta, 0).unwrap();
                compactions += 1;
            }
            assert!(compactions > 10, "the opens raced {compactions} compactions only");
            opener.join().unwrap()
        });
        assert!(failures.is_empty(), "{} of 5,000 opens failed, the first with: {}", failures.len(), failures[0]);
    }

    #[test]
    fn a_full_journal_moves_to_a_bigger_generation_and_loses_nothing() {
        let (dir, meta, mut r) = new_index();
        assert_eq!(r.journal.cap(), JOURNAL_MIN);
        // Objects that stay pending (being written) take more room than a generation starts
        // with, and compaction cannot shrink them.
        let pending: Vec<Placed> = (0..3_000).map(|_| placed(r.allocate_id(), StorageKind::Ram, 1)).collect();
        for at in &pending {
            r.append(&meta, &[Rec::Pending { at: at.clone(), owner: 1 }]).unwrap();
        }
        assert!(meta.head().len > JOURNAL_MIN, "{}", meta.head().len);
        assert!(meta.head().generation > 0, "moved on when full");
        assert!(r.journal.cap().is_power_of_two() && r.journal.cap() > meta.head().len, "{}", r.journal.cap());
        // Every generation but the current one is gone, the one before it kept as the spare
        // (too small to be reused here).
        let journals = journal_files(&dir);
        assert_eq!(journals, [format!("journal.{}", meta.head().generation), SPARE_JOURNAL.to_owned()]);
        let fresh = Replica::open(dir.path(), &meta).unwrap();
        assert_eq!(fresh.pending.len(), 3_000);
        assert_eq!(fresh.used(), Used { ram: 3_000, disk: 0 });
        // What a writer appended to the journal is what a reader decodes from the file.
        assert_eq!(fresh.head, r.head);
    }
}
