//! The key table: a hash table in a mapped file that every attached process reads in place.
//!
//! # Why
//! Opening a context and looking a key up must not cost more as the context grows. The
//! journal ([`crate::index`]) says what changed; this table says what *is*, in a form a
//! process uses where it lies: opening maps it (O(1)), a lookup probes it (O(1), no lock),
//! and no process keeps a private copy of 100,000 keys.
//!
//! # Layout of `table.<generation>`
//! - A 4 KiB header of 64-bit words: magic, version, geometry, the journal position the
//!   table reflects (`applied`), counters (keys, bytes live in RAM and on disk, tombstones,
//!   heap garbage), the next object id, and a registry of tier names (an entry names its
//!   tier by index).
//! - `capacity` slots (a power of two) of one word each, probed linearly from the key's
//!   hash. `0` is empty, `1` a tombstone; anything else holds, from the top, a 6-bit hash
//!   tag (never 0), the 26-bit number of the 64-byte heap line where the key's entry starts,
//!   and a 32-bit location hint: a copy of the entry's `slot` field (where its tier keeps
//!   the value) if that fits in 32 bits, else 0. With the hint a reader can ask the tier to
//!   start fetching the value before it reads the entry, and the two come from memory at
//!   once. Only a hint: it is never trusted.
//! - The heap of entries, appended to: `[seq][obj][footprint][slot][len][misc][key words]`,
//!   each starting on a 64-byte cache line (an entry with a key of up to 16 bytes is exactly
//!   one line). A key's bytes never change once its entry is published; its fields change
//!   in place under the entry's sequence lock (`seq` odd while a writer is in the middle).
//!   The slot's 26 bits of line number let the heap reach 4 GiB: some 67 million short keys.
//!
//! One word a slot, not two (an entry's offset and a whole hint word, as table version 2
//! had): a lookup reads a slot and then an entry, and at 100,000 keys both are reads from
//! memory unless they are in the CPU's cache. Half the bytes of slots keep twice as many of
//! them there.
//!
//! Every word is accessed as an atomic: other processes write this memory.
//!
//! # Writers and readers
//! Writers hold the context's index lock and change the table only after the journal
//! records the change (a record is committed first, applied second), then advance
//! `applied`. A writer that dies mid-change leaves `applied` behind the journal; the next
//! writer re-applies the records from there (applying is idempotent), forces any torn
//! sequence lock even and counts the counters again. Readers take no lock: a slot word is
//! published with release ordering after its entry is complete, and fields are read under
//! the sequence lock. A reader that finds a sequence lock held for long reports
//! [`Lookup::Busy`] and its caller takes the index lock, which repairs whatever a dead
//! writer left.
//!
//! When the table fills up (slots three quarters used, or the heap full), a writer builds
//! the next generation with room for twice the live keys and publishes it in the meta page;
//! processes map the new file at their next operation. Growth costs O(keys) once per
//! doubling.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::sync::{Arc, OnceLock};

use context_core::{Error, MAX_KEY_LEN, PassBy, Result, StorageKind};
use memmap2::MmapRaw;

use crate::fsutil;
use crate::index::{Entry, Head, Placed};

const MAGIC: u64 = u64::from_le_bytes(*b"WFCTABL1");
/// Version 3: one-word slots, entries on line boundaries.
const VERSION: u64 = 3;
const HEADER: usize = 4096;

// Header words (byte offsets).
const H_MAGIC: usize = 0;
const H_VERSION: usize = 8;
const H_CAPACITY: usize = 16;
const H_HEAP_CAP: usize = 24;
const H_HEAP_END: usize = 32;
const H_APPLIED: usize = 40;
const H_COUNT: usize = 48;
const H_RAM: usize = 56;
const H_DISK: usize = 64;
const H_NEXT_OBJ: usize = 72;
const H_TOMBS: usize = 80;
const H_GARBAGE: usize = 88;
const H_TIERS: usize = 96;
/// Tier names: `MAX_TIERS` records of `[length word][name, up to TIER_NAME_MAX bytes]`.
const H_TIER_NAMES: usize = 128;
const TIER_RECORD: usize = 64;
/// The longest tier name a context can record.
pub(crate) const TIER_NAME_MAX: usize = TIER_RECORD - 8;
const MAX_TIERS: usize = (HEADER - H_TIER_NAMES) / TIER_RECORD;

const EMPTY: u64 = 0;
const TOMBSTONE: u64 = 1;
/// A slot word: `[tag: 6 bits][entry line: 26 bits][location hint: 32 bits]`.
const TAG_SHIFT: u32 = 58;
const LINE_SHIFT: u32 = 32;
const LINE_MASK: u64 = (1 << (TAG_SHIFT - LINE_SHIFT)) - 1;
const HINT_MASK: u64 = u32::MAX as u64;
/// Entries start on cache lines, numbered in the slot word.
const LINE: u64 = 64;
/// The most heap bytes a table can have: as many lines as a slot word can number.
const MAX_HEAP: u64 = (LINE_MASK + 1) * LINE;

/// Entry words before the key: seq, obj, footprint, slot, len, misc.
const ENTRY_WORDS: usize = 6;
const ENTRY_FIXED: usize = ENTRY_WORDS * 8;
/// The heap's first entry starts at its second line: a heap end of 0, as a zeroed header
/// would say, is damage, never an empty heap.
const HEAP_FIRST: u64 = LINE;

/// Bytes of a slot.
const SLOT_BYTES: u64 = 8;
const MIN_CAPACITY: u64 = 256;
const MIN_HEAP: u64 = 32 << 10;

/// Spins on a held sequence lock before a reader calls the table [`Lookup::Busy`].
const SPINS: u32 = 20_000;

/// The path of table generation `g` in `dir`.
pub(crate) fn table_path(dir: &Path, generation: u32) -> PathBuf {
    dir.join(format!("table.{generation}"))
}

/// Maps a table file, asking the kernel to back it with 2 MiB pages where it can.
///
/// Why: a lookup reads two lines at random places of the table (a slot, then its entry);
/// at 100,000 keys the table is 14 MiB, more than the 4 KiB pages the CPU's TLB can cover
/// (about 8 MiB here), so each read also walks the page tables. On this benchmark machine a
/// dependent random read over 16 MiB of a mapped ext4 file costs 167 ns with 4 KiB pages
/// and 55 ns with 2 MiB ones. File systems with large folios in the page cache (ext4 and
/// XFS on recent Linux) honour the advice for shared file mappings; elsewhere it changes
/// nothing, so a refusal is ignored.
fn map_table(file: &std::fs::File, path: &Path) -> Result<MmapRaw> {
    let map = MmapRaw::map_raw(file).map_err(|e| Error::io("map key table", path, e))?;
    // Only a hint: the table works the same with small pages.
    let _ = map.advise(memmap2::Advice::HugePage);
    Ok(map)
}

/// What a lock-free lookup found.
#[derive(Debug)]
pub(crate) enum Lookup {
    Found(Entry),
    Missing,
    /// A writer holds the key's entry (or died holding it): ask again under the index lock.
    Busy,
}

/// Counters a writer keeps in the header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub(crate) keys: u64,
    pub(crate) ram: u64,
    pub(crate) disk: u64,
}

/// One generation of the key table, mapped.
#[derive(Debug)]
pub(crate) struct Table {
    map: MmapRaw,
    path: PathBuf,
    generation: u32,
    capacity: u64,
    heap_cap: u64,
    /// The registered tier names read so far, by index: a name never changes once
    /// published, so every entry that names a tier shares one string.
    names: Box<[OnceLock<Arc<str>>]>,
}

fn bytes_for(capacity: u64, heap_cap: u64) -> u64 {
    HEADER as u64 + capacity * SLOT_BYTES + heap_cap
}

fn no_names() -> Box<[OnceLock<Arc<str>>]> {
    (0..MAX_TIERS).map(|_| OnceLock::new()).collect()
}

fn key_words(key_len: usize) -> usize {
    key_len.div_ceil(8)
}

fn entry_size(key_len: usize) -> u64 {
    (ENTRY_FIXED + key_words(key_len) * 8) as u64
}

/// The heap bytes an entry of a key of `key_len` bytes takes: whole cache lines.
///
/// Why: a lookup reads its entry's fields and key, and at 100,000 keys that is a cache
/// miss per line. The fixed fields and a key of up to 16 bytes fill exactly one 64-byte
/// line; an entry that started anywhere else would cross into a second one, twice the
/// misses and twice the cache an index of short keys takes. The padding (under 64 bytes)
/// belongs to the entry, and is garbage with it once the entry is removed.
fn entry_span(key_len: usize) -> u64 {
    entry_size(key_len).next_multiple_of(LINE)
}

fn hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

fn tag_of(h: u64) -> u64 {
    // Never 0, so a slot word is never EMPTY or TOMBSTONE.
    (h >> TAG_SHIFT).max(1)
}

/// The slot word of an entry at heap offset `off` (a multiple of [`LINE`] below
/// [`MAX_HEAP`]) of a key with hash tag `tag`, whose value's location word is `slot`.
fn slot_word(tag: u64, off: u64, slot: u64) -> u64 {
    debug_assert!(off.is_multiple_of(LINE) && off < MAX_HEAP);
    (tag << TAG_SHIFT) | ((off / LINE) << LINE_SHIFT) | hint_of(slot)
}

/// The hint a slot keeps of a location word: the word, if it fits, else 0 (none).
fn hint_of(slot: u64) -> u64 {
    if slot <= HINT_MASK { slot } else { 0 }
}

/// The location hint a (full) slot word carries, if any.
fn word_hint(w: u64) -> Option<u64> {
    Some(w & HINT_MASK).filter(|&hint| hint != 0)
}

/// The heap offset of the entry a (full) slot word points to.
fn word_offset(w: u64) -> u64 {
    ((w >> LINE_SHIFT) & LINE_MASK) * LINE
}

fn pack_misc(kind: StorageKind, pass_by: PassBy, flags: u8, tier: u8, key_len: usize) -> u64 {
    let kind = match kind {
        StorageKind::Ram => 0u64,
        StorageKind::Disk => 1,
    };
    let pass_by = match pass_by {
        PassBy::Val => 0u64,
        PassBy::Ref => 1,
    };
    kind | pass_by << 8 | u64::from(flags) << 16 | u64::from(tier) << 24 | (key_len as u64) << 32
}

fn misc_key_len(misc: u64) -> usize {
    (misc >> 32) as usize
}

/// Fields of an entry as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fields {
    obj: u64,
    footprint: u64,
    slot: u64,
    len: u64,
    misc: u64,
}

impl Table {
    /// Creates generation `generation` in `dir` (replacing a leftover of a writer that died
    /// while building it) with room for `capacity` slots and `heap_cap` heap bytes.
    pub(crate) fn create(dir: &Path, generation: u32, capacity: u64, heap_cap: u64) -> Result<Table> {
        debug_assert!(capacity.is_power_of_two() && heap_cap.is_multiple_of(LINE) && heap_cap <= MAX_HEAP);
        let path = table_path(dir, generation);
        // Nobody reads a generation before the meta page names it.
        let _ = std::fs::remove_file(&path);
        let file = fsutil::create_new(&path, "create key table")?;
        let len = bytes_for(capacity, heap_cap);
        // Every block is allocated before the file is mapped: a write through the mapping
        // into a hole on a full disk would be a SIGBUS; this way it is an error, now.
        if let Err(e) = fsutil::reserve(&file, len) {
            let _ = std::fs::remove_file(&path);
            return Err(Error::io("reserve space for key table", &path, e));
        }
        let map = map_table(&file, &path)?;
        let table = Table { map, path, generation, capacity, heap_cap, names: no_names() };
        table.set(H_VERSION, VERSION);
        table.set(H_CAPACITY, capacity);
        table.set(H_HEAP_CAP, heap_cap);
        table.set(H_HEAP_END, HEAP_FIRST);
        table.set(H_NEXT_OBJ, 1);
        table.word(H_MAGIC).store(MAGIC, Ordering::Release);
        Ok(table)
    }

    /// Maps generation `generation` in `dir` and checks its header.
    pub(crate) fn open(dir: &Path, generation: u32) -> Result<Table> {
        let path = table_path(dir, generation);
        let file = fsutil::open_rw(&path, "open key table")?;
        let file_len = file.metadata().map_err(|e| Error::io("inspect key table", &path, e))?.len();
        let corrupt = |detail: String| Error::corrupt(path.display().to_string(), detail);
        if file_len < HEADER as u64 {
            return Err(corrupt(format!("the key table is {file_len} bytes, shorter than its header")));
        }
        let map = map_table(&file, &path)?;
        if (map.len() as u64) < file_len {
            return Err(corrupt("the key table shrank while being mapped".to_owned()));
        }
        let mut table = Table { map, path: path.clone(), generation, capacity: 0, heap_cap: 0, names: no_names() };
        let magic = table.get(H_MAGIC);
        let version = table.get(H_VERSION);
        if magic != MAGIC {
            return Err(corrupt("not a workflow-context key table (bad magic)".to_owned()));
        }
        if version != VERSION {
            return Err(corrupt(format!(
                "unsupported key table version {version}: this build of workflow-context reads version {VERSION}"
            )));
        }
        let capacity = table.get(H_CAPACITY);
        let heap_cap = table.get(H_HEAP_CAP);
        if !capacity.is_power_of_two()
            || !heap_cap.is_multiple_of(LINE)
            || capacity
                .checked_mul(SLOT_BYTES)
                .and_then(|s| s.checked_add(heap_cap))
                .and_then(|s| s.checked_add(HEADER as u64))
                != Some(file_len)
            || heap_cap > MAX_HEAP
        {
            return Err(corrupt(format!(
                "the key table's geometry ({capacity} slots, {heap_cap} heap bytes) does not match its \
                 {file_len} bytes"
            )));
        }
        table.capacity = capacity;
        table.heap_cap = heap_cap;
        table.heap_end()?;
        Ok(table)
    }

    pub(crate) fn generation(&self) -> u32 {
        self.generation
    }

    /// Follows the context directory to where it was moved (after creation in staging).
    pub(crate) fn moved_to(&mut self, dir: &Path) {
        self.path = table_path(dir, self.generation);
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn corrupt(&self, detail: String) -> Error {
        Error::corrupt(self.path.display().to_string(), detail)
    }

    /// The word at byte offset `off`, which the caller has bounds-checked.
    fn word(&self, off: usize) -> &AtomicU64 {
        assert!(off.is_multiple_of(8) && off + 8 <= self.map.len(), "key table word {off} out of bounds");
        // SAFETY: `off + 8` is within the mapping (asserted above), which is readable and
        // writable (map_raw of a read-write descriptor) and lives as long as `self`, which
        // the returned borrow cannot outlive. The mapping starts on a page boundary and
        // `off` is a multiple of 8, so the word is aligned for `AtomicU64`. Every process
        // touches table memory only through atomics, so shared mutation is sound.
        unsafe { &*self.map.as_mut_ptr().add(off).cast::<AtomicU64>() }
    }

    fn get(&self, off: usize) -> u64 {
        self.word(off).load(Ordering::Acquire)
    }

    fn set(&self, off: usize, v: u64) {
        self.word(off).store(v, Ordering::Release);
    }

    fn slot(&self, i: u64) -> &AtomicU64 {
        self.word(HEADER + (i as usize) * SLOT_BYTES as usize)
    }

    /// The byte offset in the file of heap offset `off`, if an entry with a key of up to
    /// `key_len` bytes fits there.
    fn entry_at(&self, off: u64, key_len: usize) -> Option<usize> {
        let end = off.checked_add(entry_size(key_len))?;
        (off >= HEAP_FIRST && off.is_multiple_of(LINE) && end <= self.heap_cap)
            .then(|| HEADER + (self.capacity * SLOT_BYTES) as usize + off as usize)
    }

    /// The journal position this table reflects.
    pub(crate) fn applied(&self) -> u64 {
        self.get(H_APPLIED)
    }

    pub(crate) fn set_applied(&self, head: Head) {
        self.set(H_APPLIED, head.pack());
    }

    pub(crate) fn next_obj(&self) -> u64 {
        self.get(H_NEXT_OBJ)
    }

    pub(crate) fn set_next_obj(&self, next: u64) {
        self.set(H_NEXT_OBJ, next);
    }

    pub(crate) fn counters(&self) -> Counters {
        Counters { keys: self.get(H_COUNT), ram: self.get(H_RAM), disk: self.get(H_DISK) }
    }

    fn set_counters(&self, c: Counters) {
        self.set(H_COUNT, c.keys);
        self.set(H_RAM, c.ram);
        self.set(H_DISK, c.disk);
    }

    fn tier_name(&self, i: usize) -> Option<Arc<str>> {
        if i >= (self.get(H_TIERS) as usize).min(MAX_TIERS) {
            return None;
        }
        if let Some(name) = self.names[i].get() {
            return Some(Arc::clone(name));
        }
        let name: Arc<str> = self.read_tier_name(i)?.into();
        Some(Arc::clone(self.names[i].get_or_init(|| name)))
    }

    /// Tier name `i` as the table holds it, if it is one (valid UTF-8 of a valid length).
    fn read_tier_name(&self, i: usize) -> Option<String> {
        let base = H_TIER_NAMES + i * TIER_RECORD;
        let len = self.get(base) as usize;
        if len > TIER_NAME_MAX {
            return None;
        }
        let mut bytes = Vec::with_capacity(len + 8);
        for w in 0..key_words(len) {
            bytes.extend_from_slice(&self.get(base + 8 + w * 8).to_le_bytes());
        }
        bytes.truncate(len);
        String::from_utf8(bytes).ok()
    }

    /// The name of tier `name` as entries share it, registering it if new. Writers only.
    pub(crate) fn shared_tier_name(&self, name: &str) -> Result<Arc<str>> {
        let i = self.tier_index(name)?;
        self.tier_name(i.into()).ok_or_else(|| self.corrupt(format!("tier name {i} is damaged")))
    }

    /// The index of tier `name`, registering it if new. Writers only.
    pub(crate) fn tier_index(&self, name: &str) -> Result<u8> {
        let count = (self.get(H_TIERS) as usize).min(MAX_TIERS);
        // Compared in place, word by word: this runs on every save.
        for i in 0..count {
            let base = H_TIER_NAMES + i * TIER_RECORD;
            if self.get(base) == name.len() as u64
                && name.len() <= TIER_NAME_MAX
                && self.words_match(base + 8, name.as_bytes())
            {
                return Ok(i as u8);
            }
        }
        if name.len() > TIER_NAME_MAX {
            return Err(Error::Config {
                source_name: "builder".into(),
                key: Some("tier".into()),
                message: format!("the tier name {name:?} is longer than {TIER_NAME_MAX} bytes"),
            });
        }
        if count == MAX_TIERS {
            return Err(self.corrupt(format!("more than {MAX_TIERS} distinct tier names were used in one context")));
        }
        let base = H_TIER_NAMES + count * TIER_RECORD;
        for (w, chunk) in name.as_bytes().chunks(8).enumerate() {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.set(base + 8 + w * 8, u64::from_le_bytes(b));
        }
        self.set(base, name.len() as u64);
        // Published last: readers see the name complete or not at all.
        self.set(H_TIERS, count as u64 + 1);
        Ok(count as u8)
    }

    /// Whether the entry at `at` holds `key` (whose length the caller compared).
    fn key_matches(&self, at: usize, key: &[u8]) -> bool {
        self.words_match(at + ENTRY_FIXED, key)
    }

    /// Whether the words from byte offset `start` hold `bytes`, zero-padded to a word.
    fn words_match(&self, start: usize, bytes: &[u8]) -> bool {
        bytes.chunks(8).enumerate().all(|(w, chunk)| {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.word(start + w * 8).load(Ordering::Relaxed) == u64::from_le_bytes(b)
        })
    }

    fn read_key(&self, at: usize, key_len: usize) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(key_words(key_len) * 8);
        for w in 0..key_words(key_len) {
            bytes.extend_from_slice(&self.word(at + ENTRY_FIXED + w * 8).load(Ordering::Relaxed).to_le_bytes());
        }
        bytes.truncate(key_len);
        bytes
    }

    /// Reads an entry's fields under its sequence lock; `None` if a writer holds it too long.
    fn read_fields(&self, at: usize) -> Option<Fields> {
        let seq = self.word(at);
        for spin in 0..SPINS {
            let s1 = seq.load(Ordering::Acquire);
            if s1 & 1 == 0 {
                let w = |i: usize| self.word(at + i * 8).load(Ordering::Relaxed);
                let f = Fields { obj: w(1), footprint: w(2), slot: w(3), len: w(4), misc: w(5) };
                fence(Ordering::Acquire);
                if seq.load(Ordering::Relaxed) == s1 {
                    return Some(f);
                }
            }
            if spin < 256 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        None
    }

    /// Writes an entry's fields under its sequence lock (also repairs a lock a dead writer
    /// left odd). Writers only.
    fn write_fields(&self, at: usize, f: Fields) {
        let seq = self.word(at);
        let odd = seq.load(Ordering::Relaxed) | 1;
        seq.store(odd, Ordering::Relaxed);
        fence(Ordering::Release);
        for (i, v) in [f.obj, f.footprint, f.slot, f.len, f.misc].into_iter().enumerate() {
            self.word(at + (i + 1) * 8).store(v, Ordering::Relaxed);
        }
        seq.store(odd.wrapping_add(1), Ordering::Release);
    }

    fn to_entry(&self, f: Fields) -> Result<Entry> {
        let kind = match f.misc & 0xff {
            0 => StorageKind::Ram,
            1 => StorageKind::Disk,
            k => return Err(self.corrupt(format!("an entry of object {} has storage kind {k}", f.obj))),
        };
        let pass_by = match (f.misc >> 8) & 0xff {
            0 => PassBy::Val,
            1 => PassBy::Ref,
            p => return Err(self.corrupt(format!("an entry of object {} is passed by {p}", f.obj))),
        };
        let tier_ix = ((f.misc >> 24) & 0xff) as usize;
        let tier = self
            .tier_name(tier_ix)
            .ok_or_else(|| self.corrupt(format!("an entry of object {} names unknown tier {tier_ix}", f.obj)))?;
        Ok(Entry {
            at: Placed { obj: f.obj, tier, kind, footprint: f.footprint, slot: f.slot, len: f.len },
            pass_by,
            flags: ((f.misc >> 16) & 0xff) as u8,
        })
    }

    /// Probes for `key`: the slot index and entry position, or the first free slot.
    fn probe(&self, key: &[u8], mut candidate: impl FnMut(u64)) -> Result<Probe> {
        let h = hash(key);
        let tag = tag_of(h);
        let mask = self.capacity - 1;
        let mut free = None;
        let mut i = h & mask;
        for _ in 0..self.capacity {
            let w = self.slot(i).load(Ordering::Acquire);
            match w {
                EMPTY => return Ok(Probe::Vacant(free.unwrap_or(i))),
                TOMBSTONE => {
                    free.get_or_insert(i);
                }
                _ if w >> TAG_SHIFT == tag => {
                    if let Some(hint) = word_hint(w) {
                        candidate(hint);
                    }
                    let off = word_offset(w);
                    let at = self
                        .entry_at(off, 0)
                        .ok_or_else(|| self.corrupt(format!("slot {i} points outside the heap ({off})")))?;
                    let key_len = misc_key_len(self.word(at + 40).load(Ordering::Relaxed));
                    if key_len == key.len() {
                        self.entry_at(off, key_len)
                            .ok_or_else(|| self.corrupt(format!("the entry at {off} runs past the heap")))?;
                        if self.key_matches(at, key) {
                            return Ok(Probe::Occupied { slot: i, at });
                        }
                    }
                }
                _ => {}
            }
            i = (i + 1) & mask;
        }
        match free {
            Some(i) => Ok(Probe::Vacant(i)),
            None => Err(self.corrupt("the key table has no empty slot".to_owned())),
        }
    }

    /// Starts fetching the slot a lookup of `key` reads first, so that a writer that looks
    /// the key up a little later finds it in the cache. Only a hint.
    pub(crate) fn prefetch_slot(&self, key: &str) {
        let i = hash(key.as_bytes()) & (self.capacity - 1);
        context_core::cache::prefetch(self.slot(i), false);
    }

    /// Starts fetching the entry that `key`'s first slot points to, if the slot's tag is the
    /// key's, and hands `value` the slot's location hint (where the key's value probably
    /// is). Reads the slot, which [`prefetch_slot`](Self::prefetch_slot) should have
    /// fetched. Only a hint: nothing is checked.
    pub(crate) fn prefetch_entry(&self, key: &str, mut value: impl FnMut(u64)) {
        let h = hash(key.as_bytes());
        let i = h & (self.capacity - 1);
        let w = self.slot(i).load(Ordering::Relaxed);
        if w > TOMBSTONE
            && w >> TAG_SHIFT == tag_of(h)
            && let Some(at) = self.entry_at(word_offset(w), key.len())
        {
            context_core::cache::prefetch(self.word(at), false);
            context_core::cache::prefetch(self.word(at + entry_size(key.len()) as usize - 8), false);
            if let Some(hint) = word_hint(w) {
                value(hint);
            }
        }
    }

    /// Looks `key` up without a lock.
    pub(crate) fn lookup(&self, key: &str, prefetch: impl FnMut(u64)) -> Result<Lookup> {
        match self.probe(key.as_bytes(), prefetch)? {
            Probe::Vacant(_) => Ok(Lookup::Missing),
            Probe::Occupied { at, .. } => match self.read_fields(at) {
                Some(f) => self.to_entry(f).map(Lookup::Found),
                None => Ok(Lookup::Busy),
            },
        }
    }

    /// Whether pointing `key` at an object needs a bigger table (a new key that does not
    /// fit). Writers only.
    pub(crate) fn needs_room_for(&self, key: &str) -> Result<bool> {
        Ok(match self.probe(key.as_bytes(), |_| {})? {
            Probe::Occupied { .. } => false,
            Probe::Vacant(_) => !self.has_room(key.len())?,
        })
    }

    /// Where the heap's next entry goes, checked: a damaged header is an error, never an
    /// entry written out of place (or a panic).
    fn heap_end(&self) -> Result<u64> {
        let end = self.get(H_HEAP_END);
        if end < HEAP_FIRST || !end.is_multiple_of(LINE) || end > self.heap_cap {
            return Err(self.corrupt(format!("the heap's end ({end}) is outside its {} bytes", self.heap_cap)));
        }
        Ok(end)
    }

    /// Whether one more key of `key_len` bytes fits without growing.
    fn has_room(&self, key_len: usize) -> Result<bool> {
        let used = self.get(H_COUNT).saturating_add(self.get(H_TOMBS)).saturating_add(1);
        let slots_free = used.saturating_mul(4) <= self.capacity * 3;
        Ok(slots_free && self.heap_end()? + entry_span(key_len) <= self.heap_cap)
    }

    /// Points `key` at `at`. Idempotent: applying the same record twice changes nothing.
    /// Returns false, changing nothing, if a new key does not fit (the caller grows the
    /// table and tries again). Writers only.
    pub(crate) fn put(&self, key: &str, at: &Placed, pass_by: PassBy, flags: u8) -> Result<bool> {
        let tier = self.tier_index(&at.tier)?;
        let misc = pack_misc(at.kind, pass_by, flags, tier, key.len());
        let fields = Fields { obj: at.obj, footprint: at.footprint, slot: at.slot, len: at.len, misc };
        let mut c = self.counters();
        match self.probe(key.as_bytes(), |_| {})? {
            Probe::Occupied { slot, at: pos } => {
                let old = self.writer_fields(pos)?;
                if old != fields {
                    self.write_fields(pos, fields);
                }
                // The hint follows the value; written only when it changes: readers in other
                // processes hold this line. Tag and entry stay, so a reader sees either word.
                let word = self.slot(slot);
                let w = word.load(Ordering::Relaxed);
                let moved = (w & !HINT_MASK) | hint_of(fields.slot);
                if moved != w {
                    word.store(moved, Ordering::Release);
                }
                if old.obj != fields.obj {
                    let old_kind_ram = old.misc & 0xff == 0;
                    sub_kind(&mut c, old_kind_ram, old.footprint);
                    add_kind(&mut c, at.kind == StorageKind::Ram, at.footprint);
                    self.set_counters(c);
                }
                Ok(true)
            }
            Probe::Vacant(slot) => {
                if !self.has_room(key.len())? {
                    return Ok(false);
                }
                let off = self.heap_end()?;
                let pos = self
                    .entry_at(off, key.len())
                    .ok_or_else(|| self.corrupt(format!("no entry fits at the heap's end ({off})")))?;
                self.word(pos).store(0, Ordering::Relaxed);
                for (i, v) in
                    [fields.obj, fields.footprint, fields.slot, fields.len, fields.misc].into_iter().enumerate()
                {
                    self.word(pos + (i + 1) * 8).store(v, Ordering::Relaxed);
                }
                for (w, chunk) in key.as_bytes().chunks(8).enumerate() {
                    let mut b = [0u8; 8];
                    b[..chunk.len()].copy_from_slice(chunk);
                    self.word(pos + ENTRY_FIXED + w * 8).store(u64::from_le_bytes(b), Ordering::Relaxed);
                }
                self.set(H_HEAP_END, off + entry_span(key.len()));
                if self.slot(slot).load(Ordering::Relaxed) == TOMBSTONE {
                    self.set(H_TOMBS, self.get(H_TOMBS).saturating_sub(1));
                }
                // Published last, with release ordering: readers see the entry complete.
                self.slot(slot).store(slot_word(tag_of(hash(key.as_bytes())), off, fields.slot), Ordering::Release);
                c.keys += 1;
                add_kind(&mut c, at.kind == StorageKind::Ram, at.footprint);
                self.set_counters(c);
                Ok(true)
            }
        }
    }

    /// Removes `key` if it points to object `obj`. Idempotent. Writers only.
    pub(crate) fn remove(&self, key: &str, obj: u64) -> Result<()> {
        if let Probe::Occupied { slot, at } = self.probe(key.as_bytes(), |_| {})? {
            let f = self.writer_fields(at)?;
            if f.obj == obj {
                self.slot(slot).store(TOMBSTONE, Ordering::Release);
                let mut c = self.counters();
                c.keys = c.keys.saturating_sub(1);
                sub_kind(&mut c, f.misc & 0xff == 0, f.footprint);
                self.set_counters(c);
                self.set(H_TOMBS, self.get(H_TOMBS) + 1);
                self.set(H_GARBAGE, self.get(H_GARBAGE) + entry_span(key.len()));
            }
        }
        Ok(())
    }

    /// An entry's fields as the writer (who holds the index lock) sees them.
    fn writer_fields(&self, at: usize) -> Result<Fields> {
        let w = |i: usize| self.word(at + i * 8).load(Ordering::Acquire);
        Ok(Fields { obj: w(1), footprint: w(2), slot: w(3), len: w(4), misc: w(5) })
    }

    /// Every live entry: its key and its fields, for the writer or a weakly consistent
    /// reader (keys added or removed meanwhile may or may not be seen).
    fn live(&self) -> impl Iterator<Item = Result<(Vec<u8>, usize)>> + '_ {
        (0..self.capacity).filter_map(move |i| {
            let w = self.slot(i).load(Ordering::Acquire);
            if w == EMPTY || w == TOMBSTONE {
                return None;
            }
            let off = word_offset(w);
            let Some(at) = self.entry_at(off, 0) else {
                return Some(Err(self.corrupt(format!("slot {i} points outside the heap ({off})"))));
            };
            let key_len = misc_key_len(self.word(at + 40).load(Ordering::Relaxed));
            if key_len > MAX_KEY_LEN || self.entry_at(off, key_len).is_none() {
                return Some(Err(self.corrupt(format!("the entry at {off} has a key of {key_len} bytes"))));
            }
            Some(Ok((self.read_key(at, key_len), at)))
        })
    }

    /// Every key, in table order.
    pub(crate) fn keys(&self) -> Result<Vec<String>> {
        self.live()
            .map(|r| {
                let (key, at) = r?;
                String::from_utf8(key).map_err(|_| self.corrupt(format!("the key of the entry at {at} is not UTF-8")))
            })
            .collect()
    }

    /// After a writer died mid-change: forces every sequence lock even and counts the
    /// counters again from the entries. Writers only.
    pub(crate) fn recount(&self) -> Result<()> {
        let mut c = Counters::default();
        let mut heap = 0;
        let mut tombs = 0;
        for i in 0..self.capacity {
            if self.slot(i).load(Ordering::Relaxed) == TOMBSTONE {
                tombs += 1;
            }
        }
        for item in self.live() {
            let (key, at) = item?;
            let seq = self.word(at);
            let s = seq.load(Ordering::Relaxed);
            if s & 1 == 1 {
                seq.store(s.wrapping_add(1), Ordering::Release);
            }
            let f = self.writer_fields(at)?;
            c.keys += 1;
            add_kind(&mut c, f.misc & 0xff == 0, f.footprint);
            heap += entry_span(key.len());
        }
        self.set_counters(c);
        self.set(H_TOMBS, tombs);
        self.set(H_GARBAGE, (self.heap_end()? - HEAP_FIRST).saturating_sub(heap));
        Ok(())
    }

    /// Builds generation `generation` with room for the live keys, twice over, and one
    /// more of `key_len` bytes. Writers only; the caller publishes it.
    pub(crate) fn grown(&self, dir: &Path, generation: u32, key_len: usize) -> Result<Table> {
        let keys = self.get(H_COUNT).min(self.capacity) + 1;
        let live_heap = (self.heap_end()? - HEAP_FIRST).saturating_sub(self.get(H_GARBAGE));
        let Some((capacity, heap_cap)) = grown_geometry(keys, live_heap, key_len) else {
            let full = std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                format!(
                    "the key table is full: its {live_heap} bytes of entries and a new key of {key_len} bytes \
                     pass the {} GiB a table can hold; remove keys or use another run",
                    MAX_HEAP >> 30
                ),
            );
            return Err(Error::io("grow the key table", &self.path, full));
        };
        let next = Table::create(dir, generation, capacity, heap_cap)?;
        let count = (self.get(H_TIERS) as usize).min(MAX_TIERS);
        for i in 0..count {
            let name = self.tier_name(i).ok_or_else(|| self.corrupt(format!("tier name {i} is damaged")))?;
            next.tier_index(&name)?;
        }
        for item in self.live() {
            let (key, at) = item?;
            let f = self.writer_fields(at)?;
            let key = String::from_utf8(key).map_err(|_| self.corrupt(format!("the key at {at} is not UTF-8")))?;
            let e = self.to_entry(f)?;
            if !next.put(&key, &e.at, e.pass_by, e.flags)? {
                return Err(self.corrupt("a grown key table is too small for the live keys".to_owned()));
            }
        }
        next.set(H_NEXT_OBJ, self.next_obj());
        next.set(H_APPLIED, self.applied());
        Ok(next)
    }
}

/// The slots and heap bytes of a table grown for `keys` keys (one of them new, of `key_len`
/// bytes) and `live_heap` bytes of live entries besides: room for twice as much, but
/// never past [`MAX_HEAP`]. `None` if even the live entries and the new one pass it.
fn grown_geometry(keys: u64, live_heap: u64, key_len: usize) -> Option<(u64, u64)> {
    let capacity = (keys * 2).next_power_of_two().max(MIN_CAPACITY);
    let needed = live_heap.checked_add(entry_span(key_len) + HEAP_FIRST).filter(|&n| n <= MAX_HEAP)?;
    let heap_cap = (needed * 2).next_multiple_of(4096).clamp(MIN_HEAP, MAX_HEAP);
    Some((capacity, heap_cap))
}

enum Probe {
    Occupied { slot: u64, at: usize },
    Vacant(u64),
}

fn add_kind(c: &mut Counters, ram: bool, n: u64) {
    if ram {
        c.ram = c.ram.saturating_add(n);
    } else {
        c.disk = c.disk.saturating_add(n);
    }
}

fn sub_kind(c: &mut Counters, ram: bool, n: u64) {
    if ram {
        c.ram = c.ram.saturating_sub(n);
    } else {
        c.disk = c.disk.saturating_sub(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(obj: u64, tier: &str, kind: StorageKind, footprint: u64) -> Placed {
        Placed { obj, tier: tier.into(), kind, footprint, slot: obj * 3, len: footprint + 1 }
    }

    fn found(t: &Table, key: &str) -> Option<Entry> {
        match t.lookup(key, |_| {}).unwrap() {
            Lookup::Found(e) => Some(e),
            Lookup::Missing => None,
            Lookup::Busy => panic!("busy without a writer"),
        }
    }

    /// The location words a lookup of `key` offers for prefetching. A writer's prefetch of
    /// the key's entry (from its first slot) offers the same, when that slot is the key's.
    fn offered(t: &Table, key: &str) -> Vec<u64> {
        let mut words = Vec::new();
        t.lookup(key, |w| words.push(w)).unwrap();
        t.prefetch_slot(key);
        let mut ahead = Vec::new();
        t.prefetch_entry(key, |w| ahead.push(w));
        assert!(ahead.is_empty() || ahead == words, "{key}: prefetched {ahead:?}, looked up {words:?}");
        words
    }

    #[test]
    fn a_lookup_offers_the_value_location_before_reading_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Table::create(dir.path(), 0, MIN_CAPACITY, MIN_HEAP).unwrap();
        assert!(offered(&t, "a").is_empty(), "nothing is offered for a missing key");
        let a = placed(1, "shm", StorageKind::Ram, 100);
        t.put("a", &a, PassBy::Val, 0).unwrap();
        assert_eq!(offered(&t, "a"), [a.slot]);
        let mut ahead = Vec::new();
        t.prefetch_entry("a", |w| ahead.push(w));
        assert_eq!(ahead, [a.slot], "a key alone in its first slot is prefetched");
        for missing in ["b", "c", "a-longer-key"] {
            t.prefetch_entry(missing, |w| panic!("{missing}: prefetched {w}"));
        }
        // An overwrite moves the hint with the entry.
        let b = placed(2, "shm", StorageKind::Ram, 100);
        t.put("a", &b, PassBy::Val, 0).unwrap();
        assert_eq!(offered(&t, "a"), [b.slot]);
        // Through growth too; and a removed key offers nothing.
        for i in 0..2_000u64 {
            let key = format!("k{i}");
            let at = placed(10 + i, "shm", StorageKind::Ram, 64);
            if !t.put(&key, &at, PassBy::Val, 0).unwrap() {
                t = t.grown(dir.path(), t.generation() + 1, key.len()).unwrap();
                assert!(t.put(&key, &at, PassBy::Val, 0).unwrap());
            }
        }
        assert_eq!(offered(&t, "a"), [b.slot]);
        assert_eq!(offered(&t, "k1999"), [(10 + 1999) * 3]);
        t.remove("a", 2).unwrap();
        assert!(!offered(&t, "a").contains(&b.slot));
        assert!(found(&t, "a").is_none());
    }

    #[test]
    fn put_lookup_remove_and_counters() {
        let dir = tempfile::tempdir().unwrap();
        let t = Table::create(dir.path(), 0, MIN_CAPACITY, MIN_HEAP).unwrap();
        let a = placed(1, "shm", StorageKind::Ram, 100);
        assert!(t.put("a", &a, PassBy::Val, 1).unwrap());
        assert!(t.put("a", &a, PassBy::Val, 1).unwrap(), "idempotent");
        assert_eq!(t.counters(), Counters { keys: 1, ram: 100, disk: 0 });
        let e = found(&t, "a").unwrap();
        assert_eq!((e.at, e.pass_by, e.flags), (a, PassBy::Val, 1));
        let b = placed(2, "a-longer-tier-name", StorageKind::Disk, 7);
        t.put("a", &b, PassBy::Ref, 0).unwrap();
        assert_eq!(t.counters(), Counters { keys: 1, ram: 0, disk: 7 });
        assert_eq!(found(&t, "a").unwrap().at, b);
        t.remove("a", 1).unwrap();
        assert!(found(&t, "a").is_some(), "a stale remove leaves the key");
        t.remove("a", 2).unwrap();
        t.remove("a", 2).unwrap();
        assert!(found(&t, "a").is_none());
        assert_eq!(t.counters(), Counters::default());
        // Reopened by another process: the same state.
        let u = Table::open(dir.path(), 0).unwrap();
        assert!(found(&u, "a").is_none());
        assert_eq!(u.get(H_TOMBS), 1);
    }

    #[test]
    fn grows_and_keeps_every_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Table::create(dir.path(), 0, MIN_CAPACITY, MIN_HEAP).unwrap();
        let mut generation = 0;
        for i in 0..5_000u64 {
            let key = format!("k/{i}/{}", "x".repeat((i % 50) as usize));
            let at = placed(i + 1, if i % 2 == 0 { "shm" } else { "mmap" }, StorageKind::Ram, i);
            if !t.put(&key, &at, PassBy::Val, 0).unwrap() {
                generation += 1;
                t = t.grown(dir.path(), generation, key.len()).unwrap();
                assert!(t.put(&key, &at, PassBy::Val, 0).unwrap());
            }
            if i % 3 == 0 {
                t.remove(&key, i + 1).unwrap();
            }
        }
        assert!(generation > 3, "grew {generation} times");
        let mut live = 0;
        for i in 0..5_000u64 {
            let key = format!("k/{i}/{}", "x".repeat((i % 50) as usize));
            let e = found(&t, &key);
            assert_eq!(e.is_some(), i % 3 != 0, "{key}");
            if let Some(e) = e {
                assert_eq!(e.at.obj, i + 1);
                live += 1;
            }
        }
        let before = t.counters();
        assert_eq!(before.keys, live);
        t.recount().unwrap();
        assert_eq!(t.counters(), before);
        assert_eq!(t.keys().unwrap().len() as u64, live);
    }

    #[test]
    fn a_torn_entry_is_busy_until_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let t = Table::create(dir.path(), 0, MIN_CAPACITY, MIN_HEAP).unwrap();
        t.put("k", &placed(1, "shm", StorageKind::Ram, 10), PassBy::Val, 0).unwrap();
        let Probe::Occupied { at, .. } = t.probe(b"k", |_| {}).unwrap() else { panic!() };
        // A writer died in the middle of changing the entry.
        t.word(at).store(t.word(at).load(Ordering::Relaxed) | 1, Ordering::Release);
        assert!(matches!(t.lookup("k", |_| {}).unwrap(), Lookup::Busy));
        t.recount().unwrap();
        assert!(found(&t, "k").is_some());
    }

    #[test]
    fn damage_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let t = Table::create(dir.path(), 0, MIN_CAPACITY, MIN_HEAP).unwrap();
        t.put("k", &placed(1, "shm", StorageKind::Ram, 10), PassBy::Val, 0).unwrap();
        let Probe::Occupied { slot, .. } = t.probe(b"k", |_| {}).unwrap() else { panic!() };
        let w = t.slot(slot).load(Ordering::Relaxed);
        t.slot(slot).store(w | (LINE_MASK << LINE_SHIFT), Ordering::Relaxed);
        assert!(matches!(t.lookup("k", |_| {}), Err(Error::Corrupt { .. })));
        assert!(t.keys().is_err());
        std::fs::write(table_path(dir.path(), 1), b"short").unwrap();
        assert!(matches!(Table::open(dir.path(), 1), Err(Error::Corrupt { .. })));
        // A table of another version (version 2 had two-word slots) is named as such.
        t.set(H_VERSION, 2);
        let err = Table::open(dir.path(), 0).unwrap_err().to_string();
        assert!(err.contains("version 2") && err.contains("reads version 3"), "{err}");
    }

    /// The byte offset in the file of `key`'s entry.
    fn entry_pos(t: &Table, key: &str) -> usize {
        match t.probe(key.as_bytes(), |_| {}).unwrap() {
            Probe::Occupied { at, .. } => at,
            Probe::Vacant(_) => panic!("{key} is missing"),
        }
    }

    #[test]
    fn every_entry_lies_on_as_few_cache_lines_as_its_size_allows() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Table::create(dir.path(), 0, MIN_CAPACITY, MIN_HEAP).unwrap();
        // Keys of every length from 1 to 40 bytes (entries of 56 to 88 bytes), mixed, through
        // growth, with removals between.
        let keys: Vec<String> = (0..3_000).map(|i| format!("{i:0>width$}", width = 1 + i * 7 % 40)).collect();
        for (i, key) in keys.iter().enumerate() {
            let at = placed(i as u64 + 1, "shm", StorageKind::Ram, 64);
            if !t.put(key, &at, PassBy::Val, 0).unwrap() {
                t = t.grown(dir.path(), t.generation() + 1, key.len()).unwrap();
                assert!(t.put(key, &at, PassBy::Val, 0).unwrap());
            }
            if i % 5 == 0 {
                t.remove(key, i as u64 + 1).unwrap();
            }
        }
        let mut lines_by_size = std::collections::BTreeMap::new();
        for (i, key) in keys.iter().enumerate().filter(|(i, _)| i % 5 != 0) {
            let pos = entry_pos(&t, key);
            let size = entry_size(key.len()) as usize;
            let lines = (pos % 64 + size).div_ceil(64);
            assert_eq!(
                lines,
                size.div_ceil(64),
                "key {i} ({} bytes): its entry at {pos} spans {lines} lines",
                key.len()
            );
            *lines_by_size.entry(size).or_insert(0) += 1;
            assert_eq!(found(&t, key).unwrap().at.obj, i as u64 + 1);
        }
        assert!(lines_by_size.len() > 3, "{lines_by_size:?}");
        // Removed entries are garbage, the same when counted as the heap changes and afresh;
        // the live ones take whole lines.
        let garbage = t.get(H_GARBAGE);
        t.recount().unwrap();
        assert_eq!(t.get(H_GARBAGE), garbage);
        let live: u64 = keys.iter().enumerate().filter(|(i, _)| i % 5 != 0).map(|(_, k)| entry_span(k.len())).sum();
        assert_eq!(t.get(H_HEAP_END) - HEAP_FIRST - garbage, live);
    }

    #[test]
    fn a_slot_is_one_word_and_hints_only_locations_that_fit_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let t = Table::create(dir.path(), 0, MIN_CAPACITY, MIN_HEAP).unwrap();
        assert_eq!(t.map.len() as u64, HEADER as u64 + MIN_CAPACITY * 8 + MIN_HEAP);
        let mut far = placed(1, "shm", StorageKind::Ram, 10);
        far.slot = 1 << 40 | 7;
        t.put("far", &far, PassBy::Val, 0).unwrap();
        assert!(offered(&t, "far").is_empty(), "a location of more than 32 bits is no hint");
        assert_eq!(found(&t, "far").unwrap().at, far, "but the entry keeps it whole");
        // Moved to a location that fits: hinted; and back: not.
        let mut near = far.clone();
        near.slot = u64::from(u32::MAX);
        t.put("far", &near, PassBy::Val, 0).unwrap();
        assert_eq!(offered(&t, "far"), [near.slot]);
        t.put("far", &far, PassBy::Val, 0).unwrap();
        assert!(offered(&t, "far").is_empty());
        assert_eq!(found(&t, "far").unwrap().at, far);
    }

    #[test]
    fn growth_stops_at_the_most_a_slot_word_can_point_to() {
        // Room for twice the live entries, within the limit.
        assert_eq!(grown_geometry(1, 0, 3), Some((MIN_CAPACITY, MIN_HEAP)));
        assert_eq!(grown_geometry(1_000, 1 << 20, 10), Some((2048, (2 << 20) + 4096)));
        // Near the limit: as much as there is; past it: none.
        let key = 16;
        assert_eq!(grown_geometry(1 << 20, MAX_HEAP / 2, key).map(|g| g.1), Some(MAX_HEAP));
        assert_eq!(grown_geometry(1 << 20, MAX_HEAP - 2 * LINE, key).map(|g| g.1), Some(MAX_HEAP));
        assert_eq!(grown_geometry(1 << 20, MAX_HEAP - 2 * LINE + 8, key), None);
        assert_eq!(grown_geometry(1 << 20, u64::MAX, key), None);
        // Every line of the largest heap can be numbered.
        let last = MAX_HEAP - LINE;
        assert_eq!(word_offset(slot_word(63, last, 5)), last);
        assert_eq!(slot_word(63, last, 5) >> TAG_SHIFT, 63);
        assert_eq!(word_hint(slot_word(1, 0, 5)), Some(5));
        assert_eq!(word_hint(slot_word(1, 0, 1 << 32)), None);
    }

    #[test]
    fn a_heap_end_that_lies_is_corrupt_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let t = Table::create(dir.path(), 0, MIN_CAPACITY, MIN_HEAP).unwrap();
        t.put("k", &placed(1, "shm", StorageKind::Ram, 10), PassBy::Val, 0).unwrap();
        let end = t.get(H_HEAP_END);
        for lie in [end + 4, end + 8, 0, 4, MIN_HEAP + 64, u64::MAX - 63] {
            t.set(H_HEAP_END, lie);
            // A table already mapped: met at the next new key, or the next count.
            let put = t.put("new", &placed(2, "shm", StorageKind::Ram, 10), PassBy::Val, 0);
            assert!(matches!(put, Err(Error::Corrupt { .. })), "heap end {lie}: {put:?}");
            assert!(matches!(t.needs_room_for("new"), Err(Error::Corrupt { .. })), "heap end {lie}");
            assert!(matches!(t.recount(), Err(Error::Corrupt { .. })), "heap end {lie}");
            assert!(matches!(t.grown(dir.path(), 1, 3), Err(Error::Corrupt { .. })), "heap end {lie}");
            // Opened afresh.
            assert!(matches!(Table::open(dir.path(), 0), Err(Error::Corrupt { .. })), "heap end {lie}");
        }
        t.set(H_HEAP_END, end);
        assert!(Table::open(dir.path(), 0).is_ok());
        assert!(t.put("new", &placed(2, "shm", StorageKind::Ram, 10), PassBy::Val, 0).unwrap());
    }

    #[test]
    fn tables_are_mapped_with_the_huge_page_advice() {
        if !Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
            eprintln!("skipped: this kernel has no transparent huge pages");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let created = Table::create(dir.path(), 0, 1 << 17, 2 << 20).unwrap();
        let opened = Table::open(dir.path(), 0).unwrap();
        for (how, t) in [("created", &created), ("opened", &opened)] {
            let flags = context_core::testing::mapping_field(t.map.as_ptr() as usize, "VmFlags")
                .expect("the table's mapping is in smaps");
            assert!(flags.split_whitespace().any(|f| f == "hg"), "{how} table mapped without MADV_HUGEPAGE: {flags}");
        }
    }
}
