//! The shared index: which key holds which object, seen alike by every attached process.
//!
//! # Design
//! The index is an append-only journal file (`journal.<generation>`) in the context
//! directory, plus a one-page `meta` file that every attached process maps. The meta page
//! holds the *head*: the journal's generation and committed length, packed in one atomic
//! word. Each process keeps a replica of the index in memory (a hash map from key to
//! entry) and the journal offset it has applied.
//!
//! - **Reading** costs one atomic load when nothing changed: if the head equals the
//!   replica's offset, the replica is current. Otherwise the process reads the new tail of
//!   the journal (`pread`) and applies it. Readers never take a lock.
//! - **Writing** happens under an exclusive `flock` on the `lock` file (plus a mutex for the
//!   threads of one process): catch up, append the records with one `pwrite` at the
//!   committed length, then publish the new length in the head. A record is committed the
//!   moment the head covers it; bytes a writer wrote past the head before dying are
//!   ignored and overwritten by the next writer.
//! - **Cost** does not grow with the number of keys: a save appends a few dozen bytes and a
//!   load is a hash lookup. When dead records outweigh live ones, a writer *compacts*:
//!   writes the live state to `journal.<generation + 1>` and publishes the new generation;
//!   readers that see it reload from the new file.
//!
//! Space is accounted exactly from the journal: every object is either *live* (a key
//! points to it) or *pending* (being written, or replaced and about to be deleted), and
//! both count against the budgets. A pending object belongs to an owner (one attached
//! handle); if its owner dies, the next writer that needs the space deletes the object.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use context_core::{Error, ObjectId, ObjectRef, PassBy, Payload, Result, StorageKind};
use memmap2::MmapRaw;
use serde::{Deserialize, Serialize};

use crate::fsutil;

/// Size of the meta file.
pub(crate) const META_LEN: u64 = 4096;
const META_MAGIC: u64 = u64::from_le_bytes(*b"WFCMETA1");
const META_VERSION: u64 = 1;
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_STATE: usize = 16;
const OFF_HEAD: usize = 24;
const OFF_RAM_CAP: usize = 32;
const OFF_DISK_CAP: usize = 40;

/// The context is open for business.
pub(crate) const STATE_OPEN: u64 = 1;
/// The context was shut down.
pub(crate) const STATE_CLOSED: u64 = 2;

const LEN_BITS: u32 = 48;
const LEN_MASK: u64 = (1 << LEN_BITS) - 1;

/// The journal's generation and committed length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Head {
    pub(crate) generation: u16,
    pub(crate) len: u64,
}

impl Head {
    fn pack(self) -> u64 {
        (u64::from(self.generation) << LEN_BITS) | (self.len & LEN_MASK)
    }
    fn unpack(word: u64) -> Head {
        Head { generation: (word >> LEN_BITS) as u16, len: word & LEN_MASK }
    }
}

/// The mapped meta page, shared by every attached process.
#[derive(Debug)]
pub(crate) struct Meta {
    map: MmapRaw,
}

impl Meta {
    /// Writes a new meta file at `path` (which must not exist) and maps it.
    pub(crate) fn create(path: &Path, ram_capacity: u64, disk_capacity: Option<u64>) -> Result<Meta> {
        let file = fsutil::create_new(path, "create context meta file")?;
        let mut page = vec![0u8; META_LEN as usize];
        let mut put = |off: usize, v: u64| page[off..off + 8].copy_from_slice(&v.to_le_bytes());
        put(OFF_MAGIC, META_MAGIC);
        put(OFF_VERSION, META_VERSION);
        put(OFF_STATE, STATE_OPEN);
        put(OFF_HEAD, Head { generation: 0, len: 0 }.pack());
        put(OFF_RAM_CAP, ram_capacity);
        put(OFF_DISK_CAP, disk_capacity.unwrap_or(u64::MAX));
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
            return Err(Error::corrupt(path.display().to_string(), format!("unsupported meta version {version}")));
        }
        Ok(meta)
    }

    fn map(file: &File, path: &Path) -> Result<Meta> {
        let map = MmapRaw::map_raw(file).map_err(|e| Error::io("map context meta file", path, e))?;
        if (map.len() as u64) < META_LEN {
            return Err(Error::corrupt(path.display().to_string(), "meta file shrank"));
        }
        Ok(Meta { map })
    }

    fn word(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off.is_multiple_of(8) && off + 8 <= META_LEN as usize);
        // SAFETY: the mapping is META_LEN bytes long (checked in `map`), page aligned, so
        // `off` (a multiple of 8 below META_LEN - 8) is in bounds and 8-byte aligned. The
        // memory lives as long as `self.map`, and is only ever accessed through atomics, by
        // this and other processes, so shared mutation is sound.
        unsafe { &*(self.map.as_mut_ptr().add(off).cast::<AtomicU64>()) }
    }

    pub(crate) fn state(&self) -> u64 {
        self.word(OFF_STATE).load(Ordering::Acquire)
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

    pub(crate) fn ram_capacity(&self) -> u64 {
        self.word(OFF_RAM_CAP).load(Ordering::Relaxed)
    }

    pub(crate) fn disk_capacity(&self) -> Option<u64> {
        Some(self.word(OFF_DISK_CAP).load(Ordering::Relaxed)).filter(|&c| c != u64::MAX)
    }
}

/// The path of journal generation `g` in `dir`.
pub(crate) fn journal_path(dir: &Path, generation: u16) -> PathBuf {
    dir.join(format!("journal.{generation}"))
}

/// Where an object lives: enough to find it again and to account for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Placed {
    pub(crate) obj: u64,
    pub(crate) tier: String,
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
    /// `key` now points to `at`. The object `key` pointed to before becomes pending,
    /// owned by `owner`.
    Put { key: String, at: Placed, pass_by: PassBy, flags: u8, owner: u64 },
    /// `key` no longer exists if it pointed to object `obj`; that object becomes pending,
    /// owned by `owner`.
    Remove { key: String, obj: u64, owner: u64 },
    /// Pending object `obj` is deleted.
    Gone { obj: u64 },
}

/// What the index knows of one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) at: Placed,
    pub(crate) pass_by: PassBy,
    pub(crate) flags: u8,
    /// Journal bytes of the record that made this entry.
    rec_bytes: u64,
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

/// Bytes in use by kind, live and pending together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Used {
    pub(crate) ram: u64,
    pub(crate) disk: u64,
}

impl Used {
    fn add(&mut self, kind: StorageKind, n: u64) {
        match kind {
            StorageKind::Ram => self.ram += n,
            StorageKind::Disk => self.disk += n,
        }
    }
    fn sub(&mut self, kind: StorageKind, n: u64) {
        match kind {
            StorageKind::Ram => self.ram -= n,
            StorageKind::Disk => self.disk -= n,
        }
    }
}

const FRAME: usize = 8;

/// Encodes records into journal frames: `[body length u32][xxh3 of body, low 32 bits][body]`.
/// Returns each frame's length.
pub(crate) fn encode_frames(recs: &[Rec], out: &mut Vec<u8>) -> Vec<usize> {
    let mut lens = Vec::with_capacity(recs.len());
    for rec in recs {
        let start = out.len();
        out.extend_from_slice(&[0u8; FRAME]);
        let body = postcard::to_extend(rec, std::mem::take(out)).expect("encoding to a Vec cannot fail");
        *out = body;
        let body_len = (out.len() - start - FRAME) as u32;
        let sum = xxhash_rust::xxh3::xxh3_64(&out[start + FRAME..]) as u32;
        out[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&sum.to_le_bytes());
        lens.push(out.len() - start);
    }
    lens
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

/// This process's copy of the index.
#[derive(Debug)]
pub(crate) struct Replica {
    dir: PathBuf,
    journal: File,
    head: Head,
    pub(crate) keys: HashMap<String, Entry>,
    pub(crate) pending: HashMap<u64, Pending>,
    pub(crate) next_obj: u64,
    pub(crate) used: Used,
    /// Bytes of journal records that still describe the current state (for compaction).
    live_bytes: u64,
    /// Checked zero-copy views of large objects, dropped as soon as their object leaves
    /// the live set.
    pub(crate) views: Mutex<HashMap<u64, Payload>>,
}

/// Journal size below which compaction never runs.
const COMPACT_MIN: u64 = 64 << 10;
/// Compaction runs when the journal is this many times the size of its live records, so
/// the journal stays within a small multiple of the state (opening replays all of it) and
/// compaction's cost, writing the live records once, is spread over as many new ones.
const COMPACT_RATIO: u64 = 2;

impl Replica {
    /// A replica of an empty index whose journal generation 0 is created in `dir`.
    pub(crate) fn create(dir: &Path) -> Result<Replica> {
        let path = journal_path(dir, 0);
        let journal = fsutil::create_new(&path, "create index journal")?;
        Ok(Self::empty(dir, journal, Head { generation: 0, len: 0 }))
    }

    /// A replica loaded from the journal that `meta` points to.
    pub(crate) fn open(dir: &Path, meta: &Meta) -> Result<Replica> {
        let head = meta.head();
        let path = journal_path(dir, head.generation);
        let journal = fsutil::open_rw(&path, "open index journal")?;
        let mut replica = Self::empty(dir, journal, Head { generation: head.generation, len: 0 });
        replica.catch_up(meta)?;
        Ok(replica)
    }

    fn empty(dir: &Path, journal: File, head: Head) -> Replica {
        Replica {
            dir: dir.to_owned(),
            journal,
            head,
            keys: HashMap::new(),
            pending: HashMap::new(),
            next_obj: 1,
            used: Used::default(),
            live_bytes: 0,
            views: Mutex::new(HashMap::new()),
        }
    }

    /// Follows the context directory to where it was moved (after creation in staging).
    pub(crate) fn moved_to(&mut self, dir: &Path) {
        self.dir = dir.to_owned();
    }

    /// Whether the replica has applied everything committed.
    pub(crate) fn is_current(&self, meta: &Meta) -> bool {
        meta.head() == self.head
    }

    /// Applies every committed record this replica has not seen.
    pub(crate) fn catch_up(&mut self, meta: &Meta) -> Result<()> {
        for _ in 0..64 {
            let head = meta.head();
            if head == self.head {
                return Ok(());
            }
            if head.generation != self.head.generation {
                // A writer compacted the journal: reload from the new generation.
                let path = journal_path(&self.dir, head.generation);
                match fsutil::open_rw(&path, "open index journal") {
                    Ok(file) => {
                        let fresh = Self::empty(&self.dir, file, Head { generation: head.generation, len: 0 });
                        let old = std::mem::replace(self, fresh);
                        drop(old);
                    }
                    // Compacted again meanwhile: read the head anew.
                    Err(Error::Io { ref source, .. }) if source.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
            }
            let from = self.head.len;
            let to = head.len;
            if to < from {
                return Err(self.corrupt(format!("committed length went back from {from} to {to}")));
            }
            let mut buf = vec![0u8; (to - from) as usize];
            self.journal.read_exact_at(&mut buf, from).map_err(|e| Error::io("read index journal", self.path(), e))?;
            let recs = decode_frames(&buf, from).map_err(|d| self.corrupt(d))?;
            for (rec, frame_len) in recs {
                self.apply(rec, frame_len as u64);
            }
            self.head = Head { generation: head.generation, len: to };
        }
        Err(self.corrupt("the journal kept changing generation while being read".to_owned()))
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

    /// Applies one record. Records come from the committed journal, so they are applied
    /// as written; inconsistent ones (which no writer produces) are ignored, not trusted.
    fn apply(&mut self, rec: Rec, frame_len: u64) {
        match rec {
            Rec::Pending { at, owner } => {
                self.next_obj = self.next_obj.max(at.obj + 1);
                self.used.add(at.kind, at.footprint);
                self.live_bytes += frame_len;
                if let Some(old) = self.pending.insert(at.obj, Pending { at, owner, rec_bytes: frame_len }) {
                    self.used.sub(old.at.kind, old.at.footprint);
                    self.live_bytes -= old.rec_bytes;
                }
            }
            Rec::Put { key, at, pass_by, flags, owner } => {
                self.next_obj = self.next_obj.max(at.obj + 1);
                if let Some(p) = self.pending.remove(&at.obj) {
                    self.used.sub(p.at.kind, p.at.footprint);
                    self.live_bytes -= p.rec_bytes;
                }
                self.used.add(at.kind, at.footprint);
                self.live_bytes += frame_len;
                let obj = at.obj;
                if let Some(old) = self.keys.insert(key, Entry { at, pass_by, flags, rec_bytes: frame_len }) {
                    self.live_bytes -= old.rec_bytes;
                    if old.at.obj != obj {
                        self.forget_view(old.at.obj);
                        // The old object stays counted: it is pending until deleted.
                        self.pending.insert(old.at.obj, Pending { at: old.at, owner, rec_bytes: 0 });
                    } else {
                        self.used.sub(old.at.kind, old.at.footprint);
                    }
                }
            }
            Rec::Remove { key, obj, owner } => {
                if self.keys.get(&key).is_some_and(|e| e.at.obj == obj) {
                    let old = self.keys.remove(&key).expect("present");
                    self.live_bytes -= old.rec_bytes;
                    self.forget_view(obj);
                    self.pending.insert(obj, Pending { at: old.at, owner, rec_bytes: 0 });
                }
            }
            Rec::Gone { obj } => {
                if let Some(p) = self.pending.remove(&obj) {
                    self.used.sub(p.at.kind, p.at.footprint);
                    self.live_bytes -= p.rec_bytes;
                }
                self.forget_view(obj);
            }
        }
    }

    /// Appends records and publishes them. The caller holds the write lock and has caught up.
    pub(crate) fn append(&mut self, meta: &Meta, recs: &[Rec]) -> Result<()> {
        debug_assert!(self.is_current(meta));
        let mut buf = Vec::with_capacity(128 * recs.len());
        let frame_lens = encode_frames(recs, &mut buf);
        let at = self.head.len;
        let end = at + buf.len() as u64;
        if end > LEN_MASK {
            return Err(self.corrupt("journal reached its maximum length".to_owned()));
        }
        self.journal.write_all_at(&buf, at).map_err(|e| Error::io("append to index journal", self.path(), e))?;
        let head = Head { generation: self.head.generation, len: end };
        meta.set_head(head);
        // Apply our own records exactly as a reader would.
        for (rec, frame_len) in recs.iter().zip(frame_lens) {
            self.apply(rec.clone(), frame_len as u64);
        }
        self.head = head;
        Ok(())
    }

    /// Rewrites the journal as the current state when dead records dominate it.
    /// The caller holds the write lock and has caught up.
    pub(crate) fn maybe_compact(&mut self, meta: &Meta) -> Result<()> {
        if self.head.len < COMPACT_MIN || self.head.len < COMPACT_RATIO * self.live_bytes.max(1) {
            return Ok(());
        }
        let generation = self.head.generation.wrapping_add(1);
        let path = journal_path(&self.dir, generation);
        // A leftover from a writer that died mid-compaction is garbage: nobody reads it.
        let _ = std::fs::remove_file(&path);
        let file = fsutil::create_new(&path, "create compacted index journal")?;
        let mut recs: Vec<Rec> = Vec::with_capacity(self.keys.len() + self.pending.len());
        for p in self.pending.values() {
            recs.push(Rec::Pending { at: p.at.clone(), owner: p.owner });
        }
        for (key, e) in &self.keys {
            recs.push(Rec::Put { key: key.clone(), at: e.at.clone(), pass_by: e.pass_by, flags: e.flags, owner: 0 });
        }
        let mut buf = Vec::new();
        let frame_lens = encode_frames(&recs, &mut buf);
        file.write_all_at(&buf, 0).map_err(|e| Error::io("write compacted index journal", &path, e))?;
        let old_path = self.path();
        let head = Head { generation, len: buf.len() as u64 };
        meta.set_head(head);
        self.journal = file;
        self.head = head;
        // Account the rewritten records exactly as a replica loading this file would.
        let mut lens = frame_lens.into_iter();
        for p in self.pending.values_mut() {
            p.rec_bytes = lens.next().expect("one frame per record") as u64;
        }
        for e in self.keys.values_mut() {
            e.rec_bytes = lens.next().expect("one frame per record") as u64;
        }
        self.live_bytes = buf.len() as u64;
        let _ = std::fs::remove_file(old_path);
        Ok(())
    }

    /// A fresh object id. The caller holds the write lock and records a `Pending` for it
    /// before anyone else can allocate.
    pub(crate) fn allocate_id(&mut self) -> u64 {
        let id = self.next_obj;
        self.next_obj += 1;
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(obj: u64, kind: StorageKind, footprint: u64) -> Placed {
        Placed { obj, tier: "t".into(), kind, footprint, slot: 0, len: footprint }
    }

    #[test]
    fn frames_round_trip_and_damage_is_detected() {
        let recs = vec![
            Rec::Pending { at: placed(1, StorageKind::Ram, 64), owner: 9 },
            Rec::Put {
                key: "k/../é".into(),
                at: placed(1, StorageKind::Ram, 64),
                pass_by: PassBy::Val,
                flags: 1,
                owner: 9,
            },
            Rec::Remove { key: "k".into(), obj: 1, owner: 9 },
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
        let h = Head { generation: 65535, len: LEN_MASK };
        assert_eq!(Head::unpack(h.pack()), h);
    }

    #[test]
    fn accounting_follows_records() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Meta::create(&dir.path().join("meta"), 1000, None).unwrap();
        let mut r = Replica::create(dir.path()).unwrap();
        let a = placed(r.allocate_id(), StorageKind::Ram, 100);
        r.append(&meta, &[Rec::Pending { at: a.clone(), owner: 1 }]).unwrap();
        assert_eq!(r.used, Used { ram: 100, disk: 0 });
        r.append(&meta, &[Rec::Put { key: "k".into(), at: a.clone(), pass_by: PassBy::Val, flags: 0, owner: 1 }])
            .unwrap();
        assert_eq!(r.used, Used { ram: 100, disk: 0 });
        let b = placed(r.allocate_id(), StorageKind::Disk, 300);
        r.append(
            &meta,
            &[
                Rec::Pending { at: b.clone(), owner: 1 },
                Rec::Put { key: "k".into(), at: b.clone(), pass_by: PassBy::Val, flags: 0, owner: 1 },
            ],
        )
        .unwrap();
        assert_eq!(r.used, Used { ram: 100, disk: 300 }, "old object is pending until gone");
        r.append(&meta, &[Rec::Gone { obj: a.obj }]).unwrap();
        assert_eq!(r.used, Used { ram: 0, disk: 300 });
        // Another replica replaying the journal agrees.
        let r2 = Replica::open(dir.path(), &meta).unwrap();
        assert_eq!(r2.used, r.used);
        assert_eq!(r2.keys, r.keys);
        assert_eq!(r2.next_obj, r.next_obj);
        r.append(&meta, &[Rec::Remove { key: "k".into(), obj: b.obj, owner: 1 }, Rec::Gone { obj: b.obj }]).unwrap();
        assert_eq!(r.used, Used::default());
        assert!(r.keys.is_empty() && r.pending.is_empty());
    }
}
