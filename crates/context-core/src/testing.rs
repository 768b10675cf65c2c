//! The conformance kit: checks that a [`StorageTier`] keeps its contract.
//!
//! Every tier of this workspace runs it, and so can yours. In your tier's
//! `tests/conformance.rs`, with `context-core` as a dev-dependency with the `testing`
//! feature:
//!
//! ```
//! # use context_core::testing::MemoryTier as MyTier;
//! context_core::tier_conformance_tests!(|| Box::new(MyTier::default(/* a fresh, empty tier */)));
//! # fn main() {}
//! ```
//!
//! The macro expands to one `#[test]` per check below, each calling the factory for a
//! fresh, empty tier (a `Box` or an `Arc` of it) and destroying that tier at the end.
//! The checks are also public functions over `&dyn StorageTier`, to call by hand, or all
//! at once with [`run_all`].

use std::collections::BTreeMap;

pub use crate::faults::{Call, Fault, FaultyTier, MemoryTier};
pub use crate::sandbox::{Sandboxed, in_private_ext2, in_private_tmpfs};

use crate::Error;
use crate::payload::Payload;
use crate::tier::{NewObject, ObjectData, ObjectId, ObjectRef, PutOutcome, StorageTier, TierUsage};

/// The names of every check, in the order the macro runs them.
pub const CHECKS: &[&str] = &[
    "put_get_round_trip",
    "fill_and_parts_agree",
    "delete_reports_existence",
    "delete_with_unknown_slot",
    "payload_outlives_delete",
    "failed_fill_leaves_nothing",
    "wrong_length_is_refused",
    "usage_counts_objects",
    "footprint_covers_length",
    "concurrent_puts_and_gets",
    "prefetch_is_only_a_hint",
    "destroy_removes_everything",
];

/// Deterministic test bytes for object `seed` of `len` bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Checks where a tier put `object`, for tiers that start large objects
/// [`LARGE_RECORD_OFFSET`](crate::record::LARGE_RECORD_OFFSET) bytes into their file, so
/// that a record's payload (after its [`HEADER_LEN`](crate::record::HEADER_LEN) bytes of
/// header) starts [`PAYLOAD_IN_PAGE`](crate::record::PAYLOAD_IN_PAGE) bytes into a page:
/// `stored` (the file or segment that holds it, read whole) is zeros up to `offset`, then
/// the object; `loaded` (what `get` returned) is the object, and with a non-zero `offset`
/// its bytes from `HEADER_LEN` on start that far into a page. Panics, naming `what`, if
/// not.
///
/// ```
/// // A small object, stored from the start of its file and read back into memory.
/// let object = context_core::testing::pattern(1, 100);
/// let file = object.clone();
/// context_core::testing::check_stored_at("object 1", &file, 0, &object, &object);
/// ```
pub fn check_stored_at(what: &str, stored: &[u8], offset: usize, object: &[u8], loaded: &[u8]) {
    assert_eq!(stored.len(), offset + object.len(), "{what}: the length of what holds it");
    assert!(stored[..offset].iter().all(|&b| b == 0), "{what}: the bytes before it hold nothing");
    assert!(stored[offset..] == *object, "{what}: stored bytes");
    assert!(loaded == object, "{what}: loaded bytes");
    if offset > 0 {
        let payload = loaded[crate::record::HEADER_LEN..].as_ptr() as usize;
        assert_eq!(
            payload % 4096,
            crate::record::PAYLOAD_IN_PAGE,
            "{what}: where in its page a record's payload starts in the view"
        );
    }
}

/// Deterministic bytes for object `seed` of `len` bytes that compress well: a run of one
/// byte value for an even seed, text repeated for an odd one. A tier that compresses takes
/// its other path with them.
///
/// ```
/// let run = context_core::testing::compressible(2, 4096);
/// assert!(run.iter().all(|&b| b == run[0]));
/// assert_eq!(context_core::testing::compressible(3, 100).len(), 100);
/// ```
pub fn compressible(seed: u64, len: usize) -> Vec<u8> {
    if seed.is_multiple_of(2) {
        vec![seed as u8; len]
    } else {
        b"a lighthouse at dusk, seed 12345, cfg 7.5; ".iter().copied().cycle().take(len).collect()
    }
}

/// The value of `field` (`VmFlags`, `ShmemPmdMapped`, ...) in `/proc/self/smaps` for the
/// mapping of this process that holds address `addr`, trimmed; `None` if there is no such
/// mapping or field (or no `/proc`). For tests that check how memory is mapped.
///
/// ```
/// let words = vec![0u64; 1 << 16];
/// # if std::path::Path::new("/proc/self/smaps").exists() {
/// let flags = context_core::testing::mapping_field(words.as_ptr() as usize, "VmFlags").unwrap();
/// assert!(flags.split_whitespace().any(|f| f == "rd"));
/// # }
/// ```
pub fn mapping_field(addr: usize, field: &str) -> Option<String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in smaps.lines() {
        // A mapping's first line starts with its address range, `lo-hi`, in hex.
        if let Some((range, _)) = line.split_once(' ')
            && let Some((lo, hi)) = range.split_once('-')
            && let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        {
            inside = (lo..hi).contains(&addr);
        } else if inside && let Some(value) = line.strip_prefix(field).and_then(|rest| rest.strip_prefix(':')) {
            return Some(value.trim().to_owned());
        }
    }
    None
}

/// Sizes every check goes through: around pages, slots and a megabyte.
pub const SIZES: &[usize] = &[32, 33, 64, 100, 4095, 4096, 4097, 65_536 + 7, (1 << 20) + 3];

/// Checks the reference a put answered: its id and length, and the bytes it says it holds:
/// at most the footprint, and at least the length for a tier that stores bytes as they are.
fn check_ref(tier: &dyn StorageTier, r: ObjectRef, id: u64, len: usize, how: &str) -> ObjectRef {
    assert_eq!(r.id, ObjectId(id), "{}: put ({how}) returned another id", tier.name());
    assert_eq!(r.len, len as u64, "{}: put ({how}) returned another length", tier.name());
    assert!(r.held <= tier.footprint(r.len), "{}: holds {} bytes, more than its footprint", tier.name(), r.held);
    assert!(
        tier.capabilities().compresses || r.held >= r.len,
        "{}: says it holds {} bytes of a {len}-byte object, but does not compress",
        tier.name(),
        r.held
    );
    r
}

fn put_parts(tier: &dyn StorageTier, id: u64, bytes: &[u8]) -> ObjectRef {
    let parts: [&[u8]; 2] = [&bytes[..bytes.len() / 2], &bytes[bytes.len() / 2..]];
    let object = NewObject { id: ObjectId(id), len: bytes.len() as u64, data: ObjectData::Parts(&parts) };
    match tier.put(object) {
        Ok(PutOutcome::Stored(r)) => check_ref(tier, r, id, bytes.len(), "parts"),
        other => panic!("{}: put of object {id} ({} bytes) failed: {other:?}", tier.name(), bytes.len()),
    }
}

fn put_fill(tier: &dyn StorageTier, id: u64, bytes: &[u8]) -> ObjectRef {
    // Written in uneven pieces, as a serializer would.
    let mut write = |out: &mut dyn std::io::Write| {
        for piece in bytes.chunks(1000) {
            let (a, b) = piece.split_at(piece.len().min(3));
            out.write_all(a).and_then(|()| out.write_all(b)).map_err(|e| Error::io("test write", "test value", e))?;
        }
        Ok(())
    };
    let object = NewObject { id: ObjectId(id), len: bytes.len() as u64, data: ObjectData::Write(&mut write) };
    match tier.put(object) {
        Ok(PutOutcome::Stored(r)) => check_ref(tier, r, id, bytes.len(), "write"),
        other => panic!("{}: put (write) of object {id} ({} bytes) failed: {other:?}", tier.name(), bytes.len()),
    }
}

fn get(tier: &dyn StorageTier, r: &ObjectRef) -> Option<Payload> {
    tier.get(r).unwrap_or_else(|e| panic!("{}: get of object {} failed: {e}", tier.name(), r.id))
}

fn usage(tier: &dyn StorageTier) -> TierUsage {
    tier.usage().unwrap_or_else(|e| panic!("{}: usage failed: {e}", tier.name()))
}

fn finish(tier: &dyn StorageTier) {
    tier.destroy().unwrap_or_else(|e| panic!("{}: destroy failed: {e}", tier.name()));
}

/// The tier's name is one the index can record (1 to 16 ASCII bytes), and every size put as
/// parts reads back exactly, whether its bytes compress or not.
pub fn put_get_round_trip(tier: &dyn StorageTier) {
    let name = tier.name();
    assert!(
        !name.is_empty() && name.len() <= 16 && name.is_ascii(),
        "the tier's name {name:?} is not 1 to 16 ASCII bytes"
    );
    for (i, &len) in SIZES.iter().enumerate() {
        let objects = [
            (100, pattern(i as u64, len), ""),
            (120, compressible(2 * i as u64, len), "compressible (one byte value) "),
            (140, compressible(2 * i as u64 + 1, len), "compressible (text) "),
        ];
        for (id, bytes, what) in objects {
            let r = put_parts(tier, id + i as u64, &bytes);
            let got = get(tier, &r)
                .unwrap_or_else(|| panic!("{}: {what}object of {len} bytes missing after put", tier.name()));
            assert!(*got == *bytes, "{}: {what}object of {len} bytes read back different", tier.name());
        }
    }
    finish(tier);
}

/// An object streamed by a writer reads back like one written as parts.
pub fn fill_and_parts_agree(tier: &dyn StorageTier) {
    for (i, &len) in SIZES.iter().enumerate() {
        let bytes = pattern(1000 + i as u64, len);
        let a = put_parts(tier, 200 + 2 * i as u64, &bytes);
        let b = put_fill(tier, 201 + 2 * i as u64, &bytes);
        assert_eq!(get(tier, &a).as_deref(), Some(&bytes[..]), "{}: parts, {len} bytes", tier.name());
        assert_eq!(get(tier, &b).as_deref(), Some(&bytes[..]), "{}: fill, {len} bytes", tier.name());
    }
    finish(tier);
}

/// Delete answers whether the object existed and takes no other object (not even one of the
/// same length); afterwards get is `None`, even once a new object took the deleted one's
/// place (its slot), which reads back its own bytes, and deleting it again touches nothing.
pub fn delete_reports_existence(tier: &dyn StorageTier) {
    for (i, &len) in SIZES.iter().enumerate() {
        let other = pattern(3000 + i as u64, len);
        let kept = [(put_parts(tier, 3000 + i as u64, &other), other)];
        let first = pattern(i as u64, len);
        let r = put_parts(tier, 300 + i as u64, &first);
        // Read before the delete: a tier that keeps what it read must not show it again.
        assert!(
            get(tier, &r).as_deref() == Some(&first[..]),
            "{}: object of {len} bytes read back different",
            tier.name()
        );
        assert!(tier.delete(&r).unwrap(), "{}: delete of a present object said it was missing", tier.name());
        assert_kept(tier, &kept, &format!("a delete of object {}", r.id));
        assert!(get(tier, &r).is_none(), "{}: object of {len} bytes still readable after delete", tier.name());
        assert!(!tier.delete(&r).unwrap(), "{}: second delete said the object existed", tier.name());
        // A stale reference (another process deleted the object) after its place was reused.
        let bytes = pattern(350 + i as u64, len);
        let next = put_parts(tier, 350 + i as u64, &bytes);
        assert!(get(tier, &r).is_none(), "{}: a deleted object read as the one that took its place", tier.name());
        assert!(!tier.delete(&r).unwrap(), "{}: deleting a deleted object again deleted another", tier.name());
        assert!(
            get(tier, &next).as_deref() == Some(&bytes[..]),
            "{}: object {} ({len} bytes), put after object {} was deleted, reads back other bytes (the deleted \
             object's, or nothing, after a stale delete)",
            tier.name(),
            next.id,
            r.id
        );
        assert_kept(tier, &kept, "a second delete of a deleted object");
    }
    finish(tier);
}

/// Checks that the objects `kept` still read back as their bytes after `what`.
fn assert_kept(tier: &dyn StorageTier, kept: &[(ObjectRef, Vec<u8>)], what: &str) {
    for (r, bytes) in kept {
        assert!(
            get(tier, r).as_deref() == Some(&bytes[..]),
            "{}: {what} took object {} ({} bytes) too, or changed it",
            tier.name(),
            r.id,
            r.len
        );
    }
}

/// Delete finds an object by id alone when the slot is unknown, whether or not the length
/// is known (a context that cleans up after a writer that died may know only the id),
/// takes that object only (not one of the same length, nor the one put last), and frees
/// its space.
pub fn delete_with_unknown_slot(tier: &dyn StorageTier) {
    let empty = usage(tier);
    for (i, &len) in SIZES.iter().enumerate() {
        for (j, known_len) in [(0, true), (1, false)] {
            let id = 400 + 4 * i as u64 + 2 * j;
            let before = pattern(id + 10_000, len);
            let mut kept = vec![(put_parts(tier, id, &before), before)];
            let r = put_parts(tier, id + 1, &pattern(i as u64, len));
            let after = pattern(id + 20_000, len);
            kept.push((put_parts(tier, 2000 + id, &after), after));
            let lost =
                ObjectRef { slot: ObjectRef::UNKNOWN_SLOT, held: 0, len: if known_len { r.len } else { 0 }, ..r };
            assert!(
                tier.delete(&lost).unwrap(),
                "{}: delete by id of a {len}-byte object (length known: {known_len}) failed to find it",
                tier.name()
            );
            assert!(get(tier, &r).is_none(), "{}: object still readable after delete by id", tier.name());
            let what = format!("a delete by id of object {} (length known: {known_len})", r.id);
            assert_kept(tier, &kept, &what);
            for (k, _) in &kept {
                assert!(tier.delete(k).unwrap(), "{}: delete of a present object said it was missing", tier.name());
            }
            assert_eq!(
                usage(tier),
                empty,
                "{}: usage once every object is deleted, one of {len} bytes by id (length known: {known_len}): \
                 the space of an object deleted by id was not freed",
                tier.name()
            );
        }
    }
    finish(tier);
}

/// A payload read before a delete stays valid and unchanged, and a later object does not
/// show through it.
pub fn payload_outlives_delete(tier: &dyn StorageTier) {
    for (i, &len) in SIZES.iter().enumerate() {
        let bytes = pattern(i as u64, len);
        let r = put_parts(tier, 500 + 2 * i as u64, &bytes);
        let held = get(tier, &r).expect("present");
        assert!(tier.delete(&r).unwrap());
        let after = pattern(99, len);
        let reuse = put_parts(tier, 501 + 2 * i as u64, &after);
        assert!(*held == *bytes, "{}: a held {len}-byte payload changed after delete", tier.name());
        assert!(
            get(tier, &reuse).as_deref() == Some(&after[..]),
            "{}: object {} ({len} bytes), put after object {} was deleted, reads back other bytes (the deleted \
             object's?)",
            tier.name(),
            reuse.id,
            r.id
        );
    }
    finish(tier);
}

/// A writer that fails leaves no object and no usage behind, and deleting what it might
/// have left (by id) takes no other object.
pub fn failed_fill_leaves_nothing(tier: &dyn StorageTier) {
    let bytes = pattern(650, 4096);
    let kept = [(put_parts(tier, 650, &bytes), bytes)];
    let before = usage(tier);
    for (i, &len) in SIZES.iter().enumerate() {
        let mut write = |out: &mut dyn std::io::Write| {
            out.write_all(&[1u8; 20]).map_err(|e| Error::io("test write", "test value", e))?;
            Err(Error::corrupt("test value", "the writer failed on purpose"))
        };
        let id = ObjectId(600 + i as u64);
        let result = tier.put(NewObject { id, len: len as u64, data: ObjectData::Write(&mut write) });
        assert!(result.is_err(), "{}: a failing writer was reported as {result:?}", tier.name());
        let r = ObjectRef { id, len: len as u64, slot: ObjectRef::UNKNOWN_SLOT, held: 0 };
        assert!(!tier.delete(&r).unwrap(), "{}: a failed put of {len} bytes left an object", tier.name());
        assert_kept(tier, &kept, &format!("a failed put of {len} bytes, then a delete of it by id,"));
    }
    assert_eq!(usage(tier), before, "{}: a failed put changed usage", tier.name());
    finish(tier);
}

/// Data that does not add up to the declared length is refused and leaves nothing.
pub fn wrong_length_is_refused(tier: &dyn StorageTier) {
    let before = usage(tier);
    let bytes = pattern(7, 100);
    let parts: [&[u8]; 1] = [&bytes];
    for (i, len) in [99u64, 101, 5000, 1 << 20].into_iter().enumerate() {
        let id = ObjectId(700 + 2 * i as u64);
        let result = tier.put(NewObject { id, len, data: ObjectData::Parts(&parts) });
        assert!(result.is_err(), "{}: 100 bytes of parts for a {len}-byte object gave {result:?}", tier.name());
        assert!(!tier.delete(&ObjectRef { id, len, slot: ObjectRef::UNKNOWN_SLOT, held: 0 }).unwrap());
        let mut write =
            |out: &mut dyn std::io::Write| out.write_all(&bytes).map_err(|e| Error::io("test write", "test value", e));
        let id = ObjectId(701 + 2 * i as u64);
        let result = tier.put(NewObject { id, len, data: ObjectData::Write(&mut write) });
        assert!(result.is_err(), "{}: 100 bytes written for a {len}-byte object gave {result:?}", tier.name());
        assert!(!tier.delete(&ObjectRef { id, len, slot: ObjectRef::UNKNOWN_SLOT, held: 0 }).unwrap());
    }
    assert_eq!(usage(tier), before, "{}: a refused put changed usage", tier.name());
    finish(tier);
}

/// Usage counts present objects and the bytes their puts said they hold, exactly, whether
/// their bytes compress or not.
pub fn usage_counts_objects(tier: &dyn StorageTier) {
    let before = usage(tier);
    // Half of the objects streamed: both ways of putting must answer what they hold.
    let refs: Vec<ObjectRef> = SIZES
        .iter()
        .enumerate()
        .flat_map(|(i, &len)| [(800 + i as u64, pattern(i as u64, len)), (850 + i as u64, compressible(i as u64, len))])
        .enumerate()
        // Each kind of bytes put both ways, in turn.
        .map(
            |(n, (id, bytes))| {
                if (n + n / 2).is_multiple_of(2) { put_parts(tier, id, &bytes) } else { put_fill(tier, id, &bytes) }
            },
        )
        .collect();
    let bytes: u64 = refs.iter().map(|r| r.held).sum();
    let during = usage(tier);
    assert_eq!(during.objects, before.objects + refs.len() as u64, "{}: object count", tier.name());
    assert_eq!(during.bytes, before.bytes + bytes, "{}: bytes held", tier.name());
    for r in &refs {
        tier.delete(r).unwrap();
    }
    assert_eq!(usage(tier), before, "{}: usage after deleting everything", tier.name());
    finish(tier);
}

/// The footprint never shrinks as the length grows, covers the length for a tier that
/// does not compress, and bounds what a put holds.
pub fn footprint_covers_length(tier: &dyn StorageTier) {
    let compresses = tier.capabilities().compresses;
    let mut last = 0;
    for len in [0u64, 1, 32, 63, 64, 65, 4095, 4096, 4097, 1 << 20, 1 << 40] {
        let f = tier.footprint(len);
        assert!(f >= last, "{}: footprint shrank from {last} to {f} at {len}", tier.name());
        assert!(compresses || f >= len, "{}: footprint {f} of {len} bytes, but does not compress", tier.name());
        last = f;
    }
    for (i, &len) in SIZES.iter().enumerate() {
        // Incompressible bytes: a compressing tier cannot shrink them below their length.
        let r = put_parts(tier, 1100 + i as u64, &pattern(i as u64, len));
        assert!(r.held <= tier.footprint(len as u64), "{}: {len} bytes hold {}", tier.name(), r.held);
    }
    finish(tier);
}

/// Threads putting, reading and deleting distinct objects at once see only their own bytes.
pub fn concurrent_puts_and_gets(tier: &dyn StorageTier) {
    let threads = 4;
    let per_thread = 40u64;
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let mut mine = BTreeMap::new();
                for j in 0..per_thread {
                    let id = 10_000 + t * 1000 + j;
                    let len = SIZES[(id as usize) % SIZES.len()].min(70_000);
                    let bytes = pattern(id, len);
                    mine.insert(id, (put_parts(tier, id, &bytes), bytes));
                    if j % 3 == 0 {
                        let (r, _) = mine.remove(&id).expect("just put");
                        assert!(tier.delete(&r).unwrap());
                    }
                }
                for (r, bytes) in mine.values() {
                    assert_eq!(
                        get(tier, r).as_deref(),
                        Some(&bytes[..]),
                        "{}: object {} under concurrency",
                        tier.name(),
                        r.id
                    );
                }
            });
        }
    });
    finish(tier);
}

/// Destroy empties the tier and can be repeated.
pub fn destroy_removes_everything(tier: &dyn StorageTier) {
    let refs: Vec<ObjectRef> =
        SIZES.iter().enumerate().map(|(i, &len)| put_parts(tier, 900 + i as u64, &pattern(i as u64, len))).collect();
    tier.destroy().unwrap();
    assert_eq!(usage(tier), TierUsage::default(), "{}: usage after destroy", tier.name());
    for r in &refs {
        // A destroyed tier may answer with an error, but never with the old bytes.
        if let Ok(Some(p)) = tier.get(r) {
            panic!("{}: object {} ({} bytes) readable after destroy", tier.name(), r.id, p.len());
        }
    }
    tier.destroy().unwrap();
}

/// `prefetch` changes nothing and never panics, whatever word it is given: the location
/// words of present objects, of a deleted one, and words the tier never handed out.
pub fn prefetch_is_only_a_hint(tier: &dyn StorageTier) {
    let refs: Vec<(ObjectRef, Vec<u8>)> = SIZES
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let bytes = pattern(i as u64, len);
            (put_parts(tier, 1100 + i as u64, &bytes), bytes)
        })
        .collect();
    let gone = put_parts(tier, 1099, &pattern(7, 100));
    assert!(tier.delete(&gone).unwrap());
    let before = usage(tier);
    let mut words = vec![0, 1, u64::MAX, ObjectRef::UNKNOWN_SLOT, gone.slot];
    words.extend(refs.iter().map(|(r, _)| r.slot));
    // Every bit pattern of the top byte over a few low patterns, and each word's bits flipped.
    words.extend((0..=255u64).flat_map(|top| [top << 56, top << 56 | 0xffff, top << 56 | 0x00ff_ffff_ffff_ffff]));
    words.extend(refs.iter().flat_map(|(r, _)| (0..64).map(move |bit| r.slot ^ 1 << bit)));
    for &w in &words {
        tier.prefetch(w);
    }
    for (r, bytes) in &refs {
        assert_eq!(get(tier, r).as_deref(), Some(&bytes[..]), "{}: an object changed after prefetch", tier.name());
    }
    assert!(get(tier, &gone).is_none(), "{}: prefetch brought a deleted object back", tier.name());
    assert_eq!(usage(tier), before, "{}: prefetch changed the usage", tier.name());
    finish(tier);
}

/// Runs every check against tiers made by `make`, each on a fresh tier; a check that fails
/// panics with what the tier did wrong.
///
/// ```
/// use context_core::testing::{MemoryTier, run_all};
/// run_all(|| Box::new(MemoryTier::default()));
/// ```
pub fn run_all<T: std::ops::Deref<Target = D>, D: DynTier + ?Sized>(make: impl Fn() -> T) {
    let checks: [fn(&dyn StorageTier); 12] = [
        put_get_round_trip,
        fill_and_parts_agree,
        delete_reports_existence,
        delete_with_unknown_slot,
        payload_outlives_delete,
        failed_fill_leaves_nothing,
        wrong_length_is_refused,
        usage_counts_objects,
        footprint_covers_length,
        concurrent_puts_and_gets,
        prefetch_is_only_a_hint,
        destroy_removes_everything,
    ];
    for check in checks {
        let tier = make();
        check(DynTier::as_dyn(&*tier));
    }
}

/// Turns `&T` or `&dyn StorageTier` into `&dyn StorageTier`.
#[doc(hidden)]
pub trait DynTier {
    /// The tier as a trait object.
    fn as_dyn(&self) -> &dyn StorageTier;
}

impl<T: StorageTier> DynTier for T {
    fn as_dyn(&self) -> &dyn StorageTier {
        self
    }
}

impl DynTier for dyn StorageTier {
    fn as_dyn(&self) -> &dyn StorageTier {
        self
    }
}

/// Expands to one `#[test]` per conformance check, each on a fresh tier from `$make`.
///
/// `$make` is an expression that can be called with no arguments and returns a `Box` or an
/// `Arc` of a fresh, empty tier. See [`testing`](crate::testing).
#[macro_export]
macro_rules! tier_conformance_tests {
    ($make:expr) => {
        $crate::tier_conformance_tests!(@each $make;
            put_get_round_trip, fill_and_parts_agree, delete_reports_existence,
            delete_with_unknown_slot, payload_outlives_delete, failed_fill_leaves_nothing,
            wrong_length_is_refused, usage_counts_objects, footprint_covers_length,
            concurrent_puts_and_gets, prefetch_is_only_a_hint, destroy_removes_everything);
    };
    (@each $make:expr; $($check:ident),* $(,)?) => {
        $(
            #[test]
            fn $check() {
                let tier = ($make)();
                $crate::testing::$check($crate::testing::DynTier::as_dyn(&*tier));
            }
        )*
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    crate::tier_conformance_tests!(|| Box::new(MemoryTier::default()));

    mod faulty_without_faults {
        use super::*;
        crate::tier_conformance_tests!(|| Box::new(FaultyTier::new("faulty", Arc::new(MemoryTier::default()))));
    }

    #[test]
    fn faults_hit_the_planned_calls() {
        let tier = FaultyTier::new("faulty", Arc::new(MemoryTier::default()));
        tier.fail(Call::Put, 2, Fault::Enospc).fail(Call::Get, 1, Fault::Eio);
        let bytes = pattern(1, 100);
        put_parts(&tier, 1, &bytes);
        let parts: [&[u8]; 1] = [&bytes];
        let err = tier.put(NewObject { id: ObjectId(2), len: 100, data: ObjectData::Parts(&parts) }).unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
        assert!(tier.get(&ObjectRef { id: ObjectId(1), len: 100, slot: 0, held: 0 }).is_err());
        assert_eq!(get(&tier, &ObjectRef { id: ObjectId(1), len: 100, slot: 0, held: 0 }).as_deref(), Some(&bytes[..]));
        tier.fail(Call::Put, 1, Fault::ShortWrite);
        assert!(tier.put(NewObject { id: ObjectId(3), len: 100, data: ObjectData::Parts(&parts) }).is_err());
        assert_eq!(usage(&tier).objects, 1, "a short write leaves nothing");
        tier.fail_from(Call::Put, 1, Fault::NoSpace);
        for id in 4..7 {
            let r = tier.put(NewObject { id: ObjectId(id), len: 100, data: ObjectData::Parts(&parts) }).unwrap();
            assert_eq!(r, PutOutcome::NoSpace);
        }
        tier.heal();
        put_parts(&tier, 7, &bytes);
        assert_eq!(tier.injected(), 6);
    }
}
