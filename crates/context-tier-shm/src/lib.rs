//! The RAM tier of workflow-context: values in POSIX shared memory (`/dev/shm`), readable by
//! every process of the same user that builds the tier for the same run id (and instance:
//! [`ShmConfig::instance`], which a context sets so that contexts of one run id in different
//! contexts directories keep apart).
//!
//! # What it costs
//! - A large value (more than 4 KiB) takes one shared-memory segment of its own, rounded up
//!   to whole pages. A read opens and maps the segment: O(1) and zero-copy whatever the size,
//!   and the returned payload keeps the mapping alive even after the value is deleted.
//! - From 64 KiB a value starts 96 bytes into its segment
//!   ([`context_core::record::LARGE_RECORD_OFFSET`]), so that the payload of a context's
//!   record, after its 32-byte header, starts 128 bytes into a page. Copies of the value in
//!   and out then run at memory speed: on the AMD EPYC VM of `docs/benchmarks.md`, the
//!   kernel's copy of a 256 MiB save and a `to_vec` of a loaded 256 MiB view each ran at
//!   half speed or less with the payload at other places in the page (the record module
//!   says why). A loaded view is 128-byte aligned.
//! - Small values (up to 4 KiB) share arenas: segments cut into slots of 64 to 4096
//!   bytes, in steps of a half and a third (64, 96, 128, 192, 256, 384, ...), so that a slot
//!   is at most a third empty and about a seventh on average (a quarter with powers of
//!   two). A value takes the smallest slot that holds its record and is copied out on
//!   reads, so a 50-byte value (90 bytes with its record's header and checksum) costs 96
//!   bytes, not a page, a segment and a mapping. Slots are allocated
//!   lock-free, by any number of processes at once. Arenas are created on demand and kept
//!   until the context is destroyed.
//! - A size's first arena has 256 KiB of slots, so a context with a few small values takes
//!   little shared memory. Each later one is 2 MiB (29,056 slots of 64 bytes, 510 of 4 KiB),
//!   reserved whole when it is created (one that finds less than 2 MiB of `/dev/shm` left
//!   is made small, so a small `/dev/shm` fills up as before). Where the kernel can
//!   (Linux 6.1 or later, with transparent huge pages), it is one huge page:
//!   `MADV_COLLAPSE`, which works on `/dev/shm` even when tmpfs is mounted without `huge=`,
//!   and every process maps it at a 2 MiB-aligned address, so a read of a random small
//!   value walks no 4 KiB page tables. On the 2-core VM of `docs/benchmarks.md`, creating
//!   such an arena takes about 1 ms (once per 2 MiB of values), and a random load among
//!   100,000 small values went from about 555 to 520 ns.
//! - A small value's footprint is its slot. Shared memory also holds the arenas' free
//!   slots, which later stores reuse (filling arenas from the first) and which are given
//!   back when the context is destroyed.
//! - Pages are reserved (`fallocate`) before any byte is written, so a full `/dev/shm` makes
//!   `put` answer [`PutOutcome::NoSpace`] (the context then falls back to disk), never
//!   SIGBUS.
//! - `usage` lists `/dev/shm` and opens every arena: it is for accounting, not a hot path.
//!
//! # When to choose it
//! For values that are read often, or by several processes, and fit in the RAM you let
//! `/dev/shm` have (half of the machine's RAM by default on most distributions).
//!
//! # What it does not do
//! - Persist: segments live in RAM and vanish at reboot. Use a disk tier for anything that
//!   must survive one.
//! - Protect values from the same user: segments are created with mode 0600, so any process
//!   of the same user can read or delete them.
//! - Clean up after a context nobody destroys: segments of a run whose processes all died
//!   stay in `/dev/shm` until [`StorageTier::destroy`] is called for that run id and
//!   instance.
//! - Run anywhere but Linux.
//!
//! # Example
//! ```
//! use context_core::{NewObject, ObjectData, ObjectId, PutOutcome, StorageTier};
//! use context_tier_shm::{ShmConfig, ShmTier};
//!
//! # fn main() -> context_core::Result<()> {
//! let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
//! let run_id = format!("doc-{}-{nanos}", std::process::id());
//! let tier = ShmTier::new(ShmConfig::new(&run_id))?;
//!
//! let value: &[u8] = b"hello, shared memory";
//! let object = NewObject { id: ObjectId(1), len: value.len() as u64, data: ObjectData::Parts(&[value]) };
//! let PutOutcome::Stored(stored) = tier.put(object)? else { panic!("/dev/shm is full") };
//! let payload = tier.get(&stored)?.expect("just stored");
//! assert_eq!(&*payload, value);
//!
//! tier.destroy()?;
//! assert!(tier.get(&stored)?.is_none());
//! # Ok(())
//! # }
//! ```

mod arena;

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use context_core::{
    Capabilities, Error, FileAt, Location, NewObject, ObjectId, ObjectRef, Payload, PutOutcome, Result, StorageKind,
    StorageTier, TierUsage, WriteFailure,
};
use memmap2::Mmap;
use rustix::fs::Mode;
use rustix::io::Errno;
use rustix::shm;

use crate::arena::{Arena, Created, Opened, errno_of, io_err, is_no_space};

/// Page size used for the footprint of large objects.
const PAGE: u64 = 4096;
/// Objects from this size start [`ALIGNED_OFFSET`] bytes into their segment.
const ALIGN_FROM: u64 = 64 * 1024;
/// Where an object of [`ALIGN_FROM`] bytes or more starts in its segment: so that a context
/// record's payload, after its header, starts 128 bytes into a page (see the [crate] docs).
const ALIGNED_OFFSET: u64 = context_core::record::LARGE_RECORD_OFFSET;
/// Slot sizes of the arena classes; objects up to the last one are small. Each power of two
/// has a class half as big again beside it: the RAM budget is charged the slot, so a record
/// of 91 bytes (a 50-byte value) costs 96 bytes, not 128. (The context's record of a
/// 50-byte string is short, 62 bytes, and takes a 64-byte slot.)
const SLOT_SIZES: [usize; 13] = [64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096];
/// The largest small object.
const SMALL_MAX: usize = SLOT_SIZES[SLOT_SIZES.len() - 1];
/// Marks a slot word that names an arena slot.
const SLOT_TAG: u64 = 1 << 62;
/// Marks a short slot word: an arena slot named in 32 bits, `[1][class: 4][arena: 12][slot:
/// 15]`. The composed context keeps a location word of up to 32 bits beside the key in its
/// key table and hands it to [`StorageTier::prefetch`] before it reads the key's entry, so
/// an arena slot that can be named in 32 bits is.
const SHORT_TAG: u64 = 1 << 31;
const SHORT_CLASS_BITS: u32 = 4;
const SHORT_ARENA_BITS: u32 = 12;
const SHORT_SLOT_BITS: u32 = 15;
/// Arenas per class the slot word can name.
const MAX_ARENAS: usize = 1 << 24;

/// Configuration of a [`ShmTier`]: the run id (and instance) that name its segments, and
/// where segments are listed.
#[derive(Clone, Debug)]
pub struct ShmConfig {
    run_id: String,
    instance: Option<u64>,
    shm_dir: PathBuf,
}

impl ShmConfig {
    /// The configuration for the context of `run_id` (1 to 64 of `[A-Za-z0-9_-]`).
    pub fn new(run_id: &str) -> Self {
        ShmConfig { run_id: run_id.to_owned(), instance: None, shm_dir: PathBuf::from("/dev/shm") }
    }

    /// Tells this context apart from others of the same run id (in other contexts
    /// directories, say), whose segments would otherwise have the same names: shared
    /// memory is one namespace for the whole machine. Every process attached to one context
    /// must give the same instance; a context picks it at random when it is created.
    ///
    /// The names of a tier without an instance begin as those of every instance of its run
    /// id do, so its [`destroy`](StorageTier::destroy) removes their segments too.
    ///
    /// ```
    /// use context_tier_shm::ShmConfig;
    /// assert_eq!(ShmConfig::new("run-7").instance(0xab).prefix(), "wfctx.run-7.00000000000000ab.");
    /// assert_eq!(ShmConfig::new("run-7").prefix(), "wfctx.run-7.");
    /// ```
    #[must_use]
    pub fn instance(mut self, instance: u64) -> Self {
        self.instance = Some(instance);
        self
    }

    /// Where shared-memory segments appear as files, listed by `usage` and `destroy`;
    /// `/dev/shm` by default.
    #[must_use]
    pub fn shm_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.shm_dir = dir.into();
        self
    }

    /// `wfctx.<run_id>.`, or `wfctx.<run_id>.<instance, 16 hex digits>.` with an
    /// [`instance`](Self::instance): every segment of this context is named `/` followed by
    /// this.
    pub fn prefix(&self) -> String {
        match self.instance {
            Some(instance) => format!("wfctx.{}.{instance:016x}.", self.run_id),
            None => format!("wfctx.{}.", self.run_id),
        }
    }
}

/// What this process knows of one arena.
enum Entry {
    /// Not looked at yet.
    Unknown,
    /// Mapped.
    Ready(Arc<Arena>),
    /// Its creator died before initialising it; never allocate from it.
    Dead,
}

/// The arenas of one slot size that this process has mapped.
struct ClassState {
    arenas: Vec<Entry>,
    /// Where to look for a free slot first: the arena of the slot this process last freed,
    /// or where it last found room. Only a starting point: before creating an arena, a
    /// store looks through every arena from the first.
    hint: usize,
    /// The slot (arena, slot) this process freed last, if it has not stored there since:
    /// the next store tries it first. Its id word and bitmap word are still in this CPU's
    /// cache, and the free prefetched its bytes.
    freed: Option<(usize, usize)>,
}

impl ClassState {
    fn set(&mut self, n: usize, entry: Entry) {
        if self.arenas.len() <= n {
            self.arenas.resize_with(n + 1, || Entry::Unknown);
        }
        self.arenas[n] = entry;
    }
}

/// The shared-memory tier: large values in a segment each, small values in slot arenas.
///
/// See the [crate documentation](crate) for what it costs and when to choose it.
pub struct ShmTier {
    config: ShmConfig,
    prefix: String,
    classes: [Mutex<ClassState>; SLOT_SIZES.len()],
}

impl std::fmt::Debug for ShmTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmTier")
            .field("run_id", &self.config.run_id)
            .field("shm_dir", &self.config.shm_dir)
            .finish_non_exhaustive()
    }
}

/// A large segment being written: unlinked when dropped unless `keep` is set, so that a
/// failed or unwinding write leaves nothing behind.
struct NewSegment<'a> {
    name: &'a str,
    keep: bool,
}

impl Drop for NewSegment<'_> {
    fn drop(&mut self) {
        if !self.keep {
            let _ = shm::unlink(self.name);
        }
    }
}

/// The arena class of an object of `len` bytes, or `None` for a large object.
fn class_of(len: u64) -> Option<usize> {
    SLOT_SIZES.iter().position(|&size| len <= size as u64)
}

fn footprint_of(len: u64) -> u64 {
    match class_of(len) {
        Some(class) => SLOT_SIZES[class] as u64,
        None => pages(len.saturating_add(offset_of(len))),
    }
}

/// Where a large object of `len` bytes starts in its segment.
fn offset_of(len: u64) -> u64 {
    if len >= ALIGN_FROM { ALIGNED_OFFSET } else { 0 }
}

/// The whole pages a segment of `size` bytes takes, in bytes.
fn pages(size: u64) -> u64 {
    size.div_ceil(PAGE).saturating_mul(PAGE)
}

/// The slot word of slot `slot` of arena `n` of class `class`: short where it fits.
fn encode_slot(class: usize, n: usize, slot: usize) -> u64 {
    let (class, n, slot) = (class as u64, n as u64, slot as u64);
    if class >> SHORT_CLASS_BITS == 0 && n >> SHORT_ARENA_BITS == 0 && slot >> SHORT_SLOT_BITS == 0 {
        SHORT_TAG | (class << (SHORT_ARENA_BITS + SHORT_SLOT_BITS)) | (n << SHORT_SLOT_BITS) | slot
    } else {
        SLOT_TAG | (class << 48) | (n << 24) | slot
    }
}

/// `(class, arena, slot)` of a slot word from [`encode_slot`], short or long.
fn decode_slot(word: u64) -> Option<(usize, usize, usize)> {
    let field = |shift: u32, bits: u32| ((word >> shift) & ((1 << bits) - 1)) as usize;
    let (class, n, slot) = if word >> 31 == 1 {
        let class = field(SHORT_ARENA_BITS + SHORT_SLOT_BITS, SHORT_CLASS_BITS);
        (class, field(SHORT_SLOT_BITS, SHORT_ARENA_BITS), field(0, SHORT_SLOT_BITS))
    } else if word >> 62 == SLOT_TAG >> 62 {
        (field(48, 14), field(24, 24), field(0, 24))
    } else {
        return None;
    };
    (class < SLOT_SIZES.len()).then_some((class, n, slot))
}

/// Whether the part of a segment name after the prefix names a large object.
fn is_large_name(rest: &[u8]) -> bool {
    rest.len() == 16 && rest.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

/// The slot size of an arena, from the part of its name after the prefix (`a<size>.<n>`, or
/// `<instance>.a<size>.<n>` after the prefix of a tier without an instance).
fn arena_slot_size(rest: &[u8]) -> Option<usize> {
    let rest = match rest.split_at_checked(16) {
        Some((instance, after)) if is_large_name(instance) && after.first() == Some(&b'.') => &after[1..],
        _ => rest,
    };
    let rest = std::str::from_utf8(rest.strip_prefix(b"a")?).ok()?;
    let (size, n) = rest.split_once('.')?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(size) || !all_digits(n) {
        return None;
    }
    size.parse().ok()
}

/// Where a small object is: its class, arena and slot.
struct Found {
    class: usize,
    n: usize,
    arena: Arc<Arena>,
    slot: usize,
}

/// The tag an object has in an arena's id words: never 0, which means "empty".
fn tag_of(id: ObjectId) -> Option<u64> {
    id.0.checked_add(1)
}

impl ShmTier {
    /// Builds the tier for the context of `config`'s run id. Creates nothing until the first
    /// put.
    pub fn new(config: ShmConfig) -> Result<Self> {
        context_core::validate_run_id(&config.run_id)?;
        let prefix = config.prefix();
        let classes = std::array::from_fn(|_| Mutex::new(ClassState { arenas: Vec::new(), hint: 0, freed: None }));
        Ok(ShmTier { config, prefix, classes })
    }

    fn large_name(&self, id: ObjectId) -> String {
        format!("/{}{id}", self.prefix)
    }

    fn arena_name(&self, class: usize, n: usize) -> String {
        format!("/{}a{}.{n}", self.prefix, SLOT_SIZES[class])
    }

    fn class(&self, class: usize) -> MutexGuard<'_, ClassState> {
        // The state stays consistent if a holder panicked: every update is a single store.
        self.classes[class].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Arena `n` of `class`, from this process's cache or opened by name.
    fn lookup(&self, class: usize, n: usize) -> Result<Opened> {
        let mut state = self.class(class);
        if let Some(Entry::Ready(arena)) = state.arenas.get(n) {
            if arena.is_live() {
                return Ok(Opened::Ready(Arc::clone(arena)));
            }
            // Destroyed by another process: forget it.
            state.arenas[n] = Entry::Unknown;
        }
        let opened = Arena::open(&self.arena_name(class, n), SLOT_SIZES[class])?;
        if let Opened::Ready(arena) = &opened {
            state.set(n, Entry::Ready(Arc::clone(arena)));
        }
        Ok(opened)
    }

    fn put_small(&self, mut object: NewObject<'_>, class: usize) -> Result<PutOutcome> {
        let id = object.id;
        let Some(tag) = tag_of(id) else {
            return Err(Error::corrupt(format!("object {id}"), "id u64::MAX cannot be stored in an arena"));
        };
        // Assemble the value first (checking its length): nothing reaches shared memory if
        // the parts are wrong or the fill fails.
        let mut buf = [0u8; SMALL_MAX];
        let bytes = &mut buf[..object.len as usize];
        object.write_into(bytes)?;
        let bytes = &*bytes;

        let slot_size = SLOT_SIZES[class];
        let (mut n, mut freed) = {
            let mut state = self.class(class);
            (state.hint, state.freed.take())
        };
        // Before creating a new arena, look once more from the first: other processes may
        // have freed slots in arenas this process saw full.
        let mut rescanned = n == 0;
        while n < MAX_ARENAS {
            let arena = {
                let mut state = self.class(class);
                // An arena this process found dead may have been removed since (a destroy by
                // another process): creating the next one over its missing name would leave a
                // hole where every other process's search and usage stop.
                let dead = matches!(state.arenas.get(n), Some(Entry::Dead));
                match state.arenas.get(n) {
                    Some(Entry::Ready(arena)) if arena.is_live() => Some(Arc::clone(arena)),
                    _ => {
                        let name = self.arena_name(class, n);
                        match Arena::open(&name, slot_size)? {
                            Opened::Ready(arena) => {
                                state.set(n, Entry::Ready(Arc::clone(&arena)));
                                Some(arena)
                            }
                            // Still the one whose creator died: pass it without waiting again.
                            Opened::NotReady if dead => None,
                            Opened::Missing if !rescanned => {
                                rescanned = true;
                                n = 0;
                                continue;
                            }
                            Opened::Missing | Opened::NotReady => match Arena::open_or_create(&name, slot_size, n)? {
                                Created::Ready(arena) => {
                                    state.set(n, Entry::Ready(Arc::clone(&arena)));
                                    Some(arena)
                                }
                                Created::NoSpace => return Ok(PutOutcome::NoSpace),
                                Created::Skip => {
                                    state.set(n, Entry::Dead);
                                    None
                                }
                            },
                        }
                    }
                }
            };
            let prefer = freed.take().and_then(|(at, slot)| (at == n).then_some(slot));
            if let Some(arena) = arena
                && let Some(slot) = arena.store(tag, bytes, prefer)
            {
                self.class(class).hint = n;
                return Ok(PutOutcome::Stored(ObjectRef {
                    id,
                    len: object.len,
                    slot: encode_slot(class, n, slot),
                    held: SLOT_SIZES[class] as u64,
                }));
            }
            n += 1;
        }
        Ok(PutOutcome::NoSpace)
    }

    fn put_large(&self, mut object: NewObject<'_>) -> Result<PutOutcome> {
        let (id, len) = (object.id, object.len);
        let name = self.large_name(id);
        let flags = shm::OFlags::CREATE | shm::OFlags::EXCL | shm::OFlags::RDWR;
        let fd = match shm::open(&name, flags, Mode::from_raw_mode(0o600)) {
            Ok(fd) => fd,
            // Out of space or, on a tmpfs mounted with `nr_inodes`, of inodes.
            Err(e) if is_no_space(e) => return Ok(PutOutcome::NoSpace),
            Err(e) => return Err(io_err("create shared-memory segment", &name, e)),
        };
        // Reserve every page before writing, so a full /dev/shm is an answer here and never
        // a SIGBUS later.
        let offset = offset_of(len);
        if let Err(e) = context_core::space::reserve(&fd, len.saturating_add(offset)).map_err(errno_of) {
            let _ = shm::unlink(&name);
            if is_no_space(e) {
                return Ok(PutOutcome::NoSpace);
            }
            return Err(io_err("reserve shared-memory segment", &name, e));
        }
        let file = File::from(fd);
        // Unlinked unless written whole, even if the writer panics.
        let mut segment = NewSegment { name: &name, keep: false };
        // pwrite copies into the reserved pages without faulting them into this process.
        let mut sink = std::io::BufWriter::with_capacity(WRITE_BUFFER, FileAt::new(&file, offset));
        let written = object.write_to(&mut sink);
        drop(sink);
        match written {
            Ok(()) => {
                segment.keep = true;
                Ok(PutOutcome::Stored(ObjectRef { id, len, slot: 0, held: self.footprint(len) }))
            }
            Err(WriteFailure::Sink(e)) => Err(Error::io("write shared-memory segment", PathBuf::from(&name), e)),
            Err(WriteFailure::Data(e)) => Err(e),
        }
    }

    fn get_large(&self, id: ObjectId, len: u64) -> Result<Option<Payload>> {
        let name = self.large_name(id);
        let fd = match shm::open(&name, shm::OFlags::RDONLY, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(io_err("open shared-memory segment", &name, e)),
        };
        let file = File::from(fd);
        // SAFETY: the mapping is read-only and shared. The segment was written completely
        // before `put` returned (the context reads only objects `put` has returned), and no
        // process of this crate writes to or truncates a large segment afterwards: objects
        // are written once, and deleting one only unlinks the name, which leaves existing
        // mappings intact. So the bytes behind the returned `&[u8]` never change and never
        // go away while the `Mmap` lives (only a foreign process of the same user tampering
        // with /dev/shm could break this, as with any mapped file).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| io_err("map shared-memory segment", &name, e))?;
        // The object starts where its length says; a segment cut short before that (by a
        // foreign process) holds none of it.
        let end = map.len();
        let start = (offset_of(len) as usize).min(end);
        Ok(Some(Payload::from_shared(Arc::new(map)).slice(start..end)))
    }

    fn delete_large(&self, id: ObjectId) -> Result<bool> {
        let name = self.large_name(id);
        match shm::unlink(&name) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(io_err("delete shared-memory segment", &name, e)),
        }
    }

    /// The arena and slot of the small object `r` (of class `class`), by its slot word or,
    /// for [`ObjectRef::UNKNOWN_SLOT`], by searching.
    fn find_small(&self, r: &ObjectRef, class: usize, tag: u64) -> Result<Option<Found>> {
        if r.slot == ObjectRef::UNKNOWN_SLOT {
            return self.search(tag, Some(class));
        }
        match decode_slot(r.slot) {
            Some((c, n, slot)) if c == class => match self.lookup(class, n)? {
                Opened::Ready(arena) => Ok(Some(Found { class, n, arena, slot })),
                Opened::Missing | Opened::NotReady => Ok(None),
            },
            _ => Err(Error::corrupt(
                format!("object {}", r.id),
                format!("slot word {:#x} names no arena slot for a {}-byte object", r.slot, r.len),
            )),
        }
    }

    /// Searches every existing arena, `first` class first, for the object tagged `tag`.
    fn search(&self, tag: u64, first: Option<usize>) -> Result<Option<Found>> {
        let order = first.into_iter().chain((0..SLOT_SIZES.len()).filter(|&c| Some(c) != first));
        for class in order {
            for n in 0..MAX_ARENAS {
                match self.lookup(class, n)? {
                    Opened::Ready(arena) => {
                        if let Some(slot) = arena.find(tag) {
                            return Ok(Some(Found { class, n, arena, slot }));
                        }
                    }
                    Opened::NotReady => {}
                    Opened::Missing => break,
                }
            }
        }
        Ok(None)
    }

    fn free(&self, found: &Found, tag: u64) -> bool {
        if !found.arena.free(found.slot, tag) {
            return false;
        }
        // Look there first next time: an overwrite frees the old value's slot right after
        // claiming one, so the next save finds a slot at once instead of scanning every
        // arena (which made a save O(arenas), that is O(keys)).
        let mut state = self.class(found.class);
        state.hint = found.n;
        state.freed = Some((found.n, found.slot));
        true
    }

    /// Unlinks the segment `/<file_name>`; a missing one is fine.
    fn unlink_segment(file_name: &OsStr) -> Result<()> {
        let mut name = OsString::from("/");
        name.push(file_name);
        match shm::unlink(name.as_os_str()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(io_err("delete shared-memory segment", &name.to_string_lossy(), e)),
        }
    }

    /// Entries of the shm directory; none if it does not exist.
    fn list(&self) -> Result<Vec<std::fs::DirEntry>> {
        let dir = &self.config.shm_dir;
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("list shared-memory segments in", dir, e)),
        };
        entries.collect::<io::Result<Vec<_>>>().map_err(|e| Error::io("list shared-memory segments in", dir, e))
    }
}

/// Writes the bytes of a large object into its freshly reserved segment.
/// Small pieces of a large object are gathered into writes of this size; larger pieces go
/// straight through.
const WRITE_BUFFER: usize = 256 << 10;

impl StorageTier for ShmTier {
    fn name(&self) -> &str {
        "shm"
    }

    fn kind(&self) -> StorageKind {
        StorageKind::Ram
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(true, true)
    }

    fn footprint(&self, len: u64) -> u64 {
        footprint_of(len)
    }

    fn put(&self, object: NewObject<'_>) -> Result<PutOutcome> {
        match class_of(object.len) {
            Some(class) => self.put_small(object, class),
            None => self.put_large(object),
        }
    }

    fn get(&self, object: &ObjectRef) -> Result<Option<Payload>> {
        let Some(class) = class_of(object.len) else {
            return self.get_large(object.id, object.len);
        };
        let Some(tag) = tag_of(object.id) else {
            return Ok(None);
        };
        let Some(found) = self.find_small(object, class, tag)? else {
            return Ok(None);
        };
        Ok(found.arena.read(found.slot, tag, object.len as usize).map(Payload::from_vec))
    }

    fn prefetch(&self, slot: u64) {
        let Some((class, n, slot)) = decode_slot(slot) else { return };
        // Never waits: if another thread holds the class (mapping an arena, say), no hint.
        let Ok(state) = self.classes[class].try_lock() else { return };
        if let Some(Entry::Ready(arena)) = state.arenas.get(n) {
            arena.prefetch_for_read(slot);
        }
    }

    fn delete(&self, object: &ObjectRef) -> Result<bool> {
        let class = class_of(object.len);
        if object.slot == ObjectRef::UNKNOWN_SLOT {
            // Search wherever the object could be, whatever its length says.
            if self.delete_large(object.id)? {
                return Ok(true);
            }
            let Some(tag) = tag_of(object.id) else {
                return Ok(false);
            };
            return Ok(match self.search(tag, class)? {
                Some(found) => self.free(&found, tag),
                None => false,
            });
        }
        let Some(class) = class else {
            return self.delete_large(object.id);
        };
        let Some(tag) = tag_of(object.id) else {
            return Ok(false);
        };
        Ok(match self.find_small(object, class, tag)? {
            Some(found) => self.free(&found, tag),
            None => false,
        })
    }

    fn locate(&self, object: &ObjectRef) -> Location {
        let shm_name = match class_of(object.len) {
            None => Some(self.large_name(object.id)),
            Some(class) if object.slot == ObjectRef::UNKNOWN_SLOT => tag_of(object.id)
                .and_then(|tag| self.search(tag, Some(class)).ok().flatten())
                .map(|found| self.arena_name(found.class, found.n)),
            Some(_) => decode_slot(object.slot).map(|(class, n, _)| self.arena_name(class, n)),
        };
        Location { shm_name, path: None }
    }

    fn usage(&self) -> Result<TierUsage> {
        let mut usage = TierUsage::default();
        for (class, &slot_size) in SLOT_SIZES.iter().enumerate() {
            for n in 0..MAX_ARENAS {
                match Arena::open(&self.arena_name(class, n), slot_size)? {
                    Opened::Ready(arena) => {
                        let objects = arena.allocated();
                        usage.objects += objects;
                        usage.bytes += objects * slot_size as u64;
                    }
                    Opened::NotReady => {}
                    Opened::Missing => break,
                }
            }
        }
        for entry in self.list()? {
            let file_name = entry.file_name();
            let Some(rest) = file_name.as_bytes().strip_prefix(self.prefix.as_bytes()) else { continue };
            if !is_large_name(rest) {
                continue;
            }
            match entry.metadata() {
                Ok(meta) => {
                    usage.objects += 1;
                    usage.bytes = usage.bytes.saturating_add(pages(meta.len()));
                }
                // Deleted since the listing.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("read size of shared-memory segment", entry.path(), e)),
            }
        }
        Ok(usage)
    }

    fn destroy(&self) -> Result<()> {
        let mut first_error = None;
        match self.list() {
            Ok(entries) => {
                for entry in entries {
                    let file_name = entry.file_name();
                    let Some(rest) = file_name.as_bytes().strip_prefix(self.prefix.as_bytes()) else { continue };
                    // Tell processes that still have the arena mapped to stop using it.
                    if let Some(slot_size) = arena_slot_size(rest).filter(|size| SLOT_SIZES.contains(size))
                        && let Some(name) = file_name.to_str()
                        && let Ok(Opened::Ready(arena)) = Arena::open(&format!("/{name}"), slot_size)
                    {
                        arena.mark_destroyed();
                    }
                    if let Err(e) = Self::unlink_segment(&file_name) {
                        first_error.get_or_insert(e);
                    }
                }
            }
            Err(e) => first_error = Some(e),
        }
        for class in 0..SLOT_SIZES.len() {
            let mut state = self.class(class);
            state.arenas.clear();
            state.hint = 0;
            state.freed = None;
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_and_footprints() {
        assert_eq!(class_of(0), Some(0));
        assert_eq!(class_of(64), Some(0));
        assert_eq!(class_of(65), Some(1));
        assert_eq!(class_of(96), Some(1));
        assert_eq!(class_of(97), Some(2));
        assert_eq!(class_of(4096), Some(SLOT_SIZES.len() - 1));
        assert_eq!(class_of(4097), None);
        assert_eq!(footprint_of(50), 64);
        assert_eq!(footprint_of(91), 96);
        assert_eq!(footprint_of(129), 192);
        assert_eq!(footprint_of(3000), 3072);
        // Past the smallest class, no slot is more than a third empty.
        for len in 65..=4096u64 {
            assert!(2 * footprint_of(len) <= 3 * len, "{len} bytes take a {}-byte slot", footprint_of(len));
        }
        assert_eq!(footprint_of(4097), 8192);
        assert_eq!(footprint_of(u64::MAX), u64::MAX);
    }

    #[test]
    fn slot_words_round_trip() {
        let last = SLOT_SIZES.len() - 1;
        for (class, n, slot, short) in [
            (0, 0, 0, true),
            (last, 4095, 32767, true),
            (3, 17, 4095, true),
            (6, 4096, 63, false),
            (6, MAX_ARENAS - 1, 63, false),
            (0, 0, 32768, false),
            (last, 1, (1 << 24) - 1, false),
        ] {
            let word = encode_slot(class, n, slot);
            assert_ne!(word, ObjectRef::UNKNOWN_SLOT);
            assert_eq!(word <= u64::from(u32::MAX), short, "({class}, {n}, {slot}): {word:#x}");
            assert_eq!(decode_slot(word), Some((class, n, slot)));
        }
        // Every slot of every arena that a short word can name is named by one.
        let most = SLOT_SIZES.iter().map(|&size| arena::most_slots(size)).max().unwrap();
        assert!(most < 1 << SHORT_SLOT_BITS, "{most} slots");
        assert!(SLOT_SIZES.len() <= 1 << SHORT_CLASS_BITS);
        for word in [0, 1, SHORT_TAG - 1, 1 << 32, ObjectRef::UNKNOWN_SLOT, u64::from(u32::MAX)] {
            assert_eq!(decode_slot(word), None, "{word:#x}");
        }
        assert_eq!(decode_slot(SLOT_TAG | (SLOT_SIZES.len() as u64) << 48), None);
    }

    #[test]
    fn names_are_told_apart() {
        assert!(is_large_name(b"00000000000000ff"));
        assert!(!is_large_name(b"a64.0"));
        assert_eq!(arena_slot_size(b"a64.0"), Some(64));
        assert_eq!(arena_slot_size(b"a4096.12"), Some(4096));
        assert_eq!(arena_slot_size(b"a64."), None);
        assert_eq!(arena_slot_size(b"00000000000000ff"), None);
        assert_eq!(arena_slot_size(b"00000000000000ab.a96.3"), Some(96));
        assert_eq!(arena_slot_size(b"00000000000000ab.0000000000000001"), None);
        assert_eq!(ShmConfig::new("r").prefix(), "wfctx.r.");
    }

    #[test]
    fn a_store_goes_where_the_last_slot_was_freed() {
        use context_core::{NewObject, ObjectData};
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let tier = ShmTier::new(ShmConfig::new(&format!("hint-{}-{nanos}", std::process::id()))).unwrap();
        let put =
            |id: u64| match tier.put(NewObject { id: ObjectId(id), len: 40, data: ObjectData::Parts(&[&[7u8; 40]]) }) {
                Ok(PutOutcome::Stored(r)) => r,
                other => panic!("{other:?}"),
            };
        let arena_of = |r: &ObjectRef| decode_slot(r.slot).unwrap().1;
        // Three full arenas of the smallest class and a fourth with room.
        let first = arena::slot_count(SLOT_SIZES[0], 0);
        let per_arena = arena::slot_count(SLOT_SIZES[0], 1);
        let refs: Vec<ObjectRef> = (1..=(first + 2 * per_arena + 1) as u64).map(put).collect();
        assert_eq!(arena_of(refs.last().unwrap()), 3);
        // Room in arena 1 and arena 0; a store takes arena 0's.
        assert!(tier.delete(&refs[first + 5]).unwrap());
        assert!(tier.delete(&refs[3]).unwrap());
        assert_eq!(decode_slot(put(1_000_000).slot), decode_slot(refs[3].slot));
        // An overwrite frees a slot in arena 2: the next store goes straight there rather
        // than scanning from the first arena with room.
        assert!(tier.delete(&refs[first + per_arena + 9]).unwrap());
        assert_eq!(decode_slot(put(1_000_001).slot), decode_slot(refs[first + per_arena + 9].slot));
        // The next store goes on from there, to arena 3, which has room.
        assert_eq!(arena_of(&put(1_000_002)), 3);
        // Within an arena, the slot freed last is taken first, though a lower one is free;
        // the next store scans from the first slot again.
        assert!(tier.delete(&refs[1]).unwrap());
        assert!(tier.delete(&refs[7]).unwrap());
        assert_eq!(decode_slot(put(1_000_003).slot), decode_slot(refs[7].slot));
        assert_eq!(decode_slot(put(1_000_004).slot), decode_slot(refs[1].slot));
        // A freed slot taken by someone else in the meantime is simply passed over.
        assert!(tier.delete(&refs[11]).unwrap());
        let (_, n, slot) = decode_slot(refs[11].slot).unwrap();
        let Ok(Opened::Ready(arena)) = tier.lookup(0, n) else { panic!("arena {n} is mapped") };
        assert_eq!(arena.store(u64::MAX, &[1; 8], Some(slot)), Some(slot));
        assert_ne!(decode_slot(put(1_000_005).slot), decode_slot(refs[11].slot));
        tier.destroy().unwrap();
    }

    #[test]
    fn bad_run_ids_are_refused() {
        assert!(ShmTier::new(ShmConfig::new("a/b")).is_err());
        assert!(ShmTier::new(ShmConfig::new("")).is_err());
    }
}
