//! Behaviour of the shared-memory tier beyond the conformance kit: arenas, sharing between
//! instances (as between processes), concurrency, stale reads, destroy and a full /dev/shm.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use context_core::testing::{Sandboxed, in_private_tmpfs, pattern};
use context_core::{NewObject, ObjectData, ObjectId, ObjectRef, PutOutcome, StorageTier, TierUsage};
use context_tier_shm::{ShmConfig, ShmTier};

/// A run id no other test (thread or process) uses: pid, counter and clock.
fn unique_run_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("shm-{}-{}-{nanos}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn tier(run_id: &str) -> ShmTier {
    ShmTier::new(ShmConfig::new(run_id)).unwrap()
}

/// Names in /dev/shm that belong to the run.
fn segments(run_id: &str) -> Vec<String> {
    let prefix = ShmConfig::new(run_id).prefix();
    let mut names: Vec<String> = std::fs::read_dir("/dev/shm")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    names.sort();
    names
}

fn put(tier: &ShmTier, id: u64, bytes: &[u8]) -> ObjectRef {
    let parts: [&[u8]; 1] = [bytes];
    match tier.put(NewObject { id: ObjectId(id), len: bytes.len() as u64, data: ObjectData::Parts(&parts) }) {
        Ok(PutOutcome::Stored(r)) => r,
        other => panic!("put of object {id} ({} bytes): {other:?}", bytes.len()),
    }
}

fn get(tier: &ShmTier, r: &ObjectRef) -> Option<Vec<u8>> {
    tier.get(r).unwrap().map(|p| p.to_vec())
}

#[test]
fn many_small_objects_span_arenas() {
    const N: u64 = 40_000;
    let run = unique_run_id();
    let tier = tier(&run);
    let refs: Vec<(ObjectRef, Vec<u8>)> = (0..N)
        .map(|i| {
            let bytes = pattern(i, 50);
            (put(&tier, i, &bytes), bytes)
        })
        .collect();
    for (r, bytes) in &refs {
        assert_eq!(get(&tier, r).as_ref(), Some(bytes), "object {}", r.id);
    }
    assert_eq!(tier.usage().unwrap(), TierUsage { bytes: N * 64, objects: N });
    // 4,096 slots of 64 bytes in the first arena and 29,056 in each later one: three
    // arenas, and nothing else.
    let prefix = ShmConfig::new(&run).prefix();
    assert_eq!(segments(&run), ["a64.0", "a64.1", "a64.2"].map(|s| format!("{prefix}{s}")));
    let slots: HashSet<u64> = refs.iter().map(|(r, _)| r.slot).collect();
    assert_eq!(slots.len(), refs.len(), "two objects share a slot");
    // An object in the last arena is found by id alone too (a 2 MiB arena is searched
    // with its own geometry), and another process's instance reads it.
    let (last, bytes) = refs.last().unwrap();
    let other = crate::tier(&run);
    assert_eq!(get(&other, last).as_ref(), Some(bytes));
    let lost = ObjectRef { slot: ObjectRef::UNKNOWN_SLOT, ..*last };
    assert_eq!(other.locate(&lost).shm_name, Some(format!("/{prefix}a64.2")));
    assert_eq!(get(&other, &lost).as_ref(), Some(bytes));

    for (r, _) in refs.iter().step_by(2) {
        assert!(tier.delete(r).unwrap());
    }
    assert_eq!(tier.usage().unwrap(), TierUsage { bytes: N / 2 * 64, objects: N / 2 });
    for (i, (r, bytes)) in refs.iter().enumerate() {
        let expected = if i % 2 == 0 { None } else { Some(bytes) };
        assert_eq!(get(&tier, r).as_ref(), expected, "object {}", r.id);
    }
    // Freed slots are reused before a new arena is made.
    for i in 0..N / 2 {
        put(&tier, 20_000 + i, &pattern(i, 60));
    }
    assert_eq!(segments(&run).len(), 3);
    assert_eq!(tier.usage().unwrap(), TierUsage { bytes: N * 64, objects: N });
    tier.destroy().unwrap();
    assert!(segments(&run).is_empty());
}

#[test]
fn two_instances_share_objects() {
    let run = unique_run_id();
    let (a, b) = (tier(&run), tier(&run));
    let sizes = [0usize, 1, 50, 64, 65, 1000, 4096, 4097, 100_000];
    let refs: Vec<(ObjectRef, Vec<u8>)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let bytes = pattern(i as u64, len);
            (put(&a, i as u64, &bytes), bytes)
        })
        .collect();
    assert_eq!(a.usage().unwrap(), b.usage().unwrap());
    for (r, bytes) in &refs {
        assert_eq!(get(&b, r).as_ref(), Some(bytes), "{} bytes put by a, read by b", bytes.len());
        assert_eq!(a.locate(r), b.locate(r));
        assert!(b.delete(r).unwrap(), "{} bytes put by a, deleted by b", bytes.len());
        assert_eq!(get(&a, r), None, "{} bytes still readable by a after b deleted them", bytes.len());
        assert!(!a.delete(r).unwrap());
    }
    assert_eq!(a.usage().unwrap(), TierUsage::default());

    // Delete by id alone, from an instance that never saw the object.
    let r = put(&a, 100, b"lost slot");
    let c = tier(&run);
    let lost = ObjectRef { slot: ObjectRef::UNKNOWN_SLOT, held: 0, ..r };
    assert_eq!(c.locate(&lost), a.locate(&r));
    assert!(c.locate(&r).shm_name.is_some_and(|n| n.starts_with(&format!("/{}a64.", ShmConfig::new(&run).prefix()))));
    assert!(c.delete(&lost).unwrap());
    assert_eq!(get(&a, &r), None);
    a.destroy().unwrap();
    assert!(segments(&run).is_empty());
}

#[test]
fn destroy_by_another_instance_is_seen() {
    let run = unique_run_id();
    let (a, b) = (tier(&run), tier(&run));
    let small = put(&a, 1, b"small");
    let large = put(&a, 2, &pattern(2, 10_000));
    b.destroy().unwrap();
    // a still has the arena mapped, but it was marked destroyed.
    assert_eq!(get(&a, &small), None);
    assert_eq!(get(&a, &large), None);
    assert_eq!(a.usage().unwrap(), TierUsage::default());
    // And a can start over: the new objects are visible to b.
    let again = put(&a, 3, b"again");
    assert_eq!(get(&b, &again).as_deref(), Some(&b"again"[..]));
    assert_eq!(b.usage().unwrap(), TierUsage { bytes: 64, objects: 1 });
    a.destroy().unwrap();
    assert!(segments(&run).is_empty());
}

#[test]
fn concurrent_allocation_never_shares_a_slot() {
    let run = unique_run_id();
    let tiers = [tier(&run), tier(&run)];
    let per_thread = 3_000u64;
    let all: Vec<(ObjectRef, Vec<u8>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let tier = &tiers[t as usize % 2];
                s.spawn(move || {
                    (0..per_thread)
                        .map(|j| {
                            let id = t * 1_000_000 + j;
                            let bytes = pattern(id, [10, 64, 100, 700, 4096][j as usize % 5]);
                            (put(tier, id, &bytes), bytes)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let slots: HashSet<u64> = all.iter().map(|(r, _)| r.slot).collect();
    assert_eq!(slots.len(), all.len(), "a slot was handed out twice");
    for (i, (r, bytes)) in all.iter().enumerate() {
        // Read through the other instance than the one that wrote, half of the time.
        assert_eq!(get(&tiers[i % 2], r).as_ref(), Some(bytes), "object {}", r.id);
    }
    let expected: u64 = all.iter().map(|(r, _)| tiers[0].footprint(r.len)).sum();
    assert_eq!(tiers[1].usage().unwrap(), TierUsage { bytes: expected, objects: all.len() as u64 });
    tiers[0].destroy().unwrap();
    assert!(segments(&run).is_empty());
}

#[test]
fn stale_get_never_returns_another_objects_bytes() {
    let run = unique_run_id();
    let tier = tier(&run);
    // A freed slot is reused by the next object of its class; the old reference misses.
    let old = put(&tier, 1, &pattern(1, 40));
    assert!(tier.delete(&old).unwrap());
    let new = put(&tier, 2, &pattern(2, 40));
    assert_eq!(new.slot, old.slot, "the freed slot was not reused");
    assert_eq!(get(&tier, &old), None);
    assert_eq!(get(&tier, &new), Some(pattern(2, 40)));
    assert!(!tier.delete(&old).unwrap());
    assert!(tier.delete(&new).unwrap());

    // Readers race a writer that keeps deleting and reusing the same slots.
    let current: Mutex<Vec<ObjectRef>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    let other = ShmTier::new(ShmConfig::new(&run)).unwrap();
    std::thread::scope(|s| {
        for reader in [&tier, &other] {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let refs = current.lock().unwrap().clone();
                    for r in refs {
                        if let Some(bytes) = get(reader, &r) {
                            assert_eq!(bytes, pattern(r.id.0, r.len as usize), "object {} read wrong bytes", r.id);
                            reads.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
        let mut id = 100u64;
        // At least 2,000 rounds, and on until the readers have seen objects (a loaded
        // machine may starve them for a while), within a bound.
        let started = std::time::Instant::now();
        for round in 0.. {
            if round >= 2_000
                && (reads.load(Ordering::Relaxed) >= 100 || started.elapsed() > std::time::Duration::from_secs(30))
            {
                break;
            }
            let refs: Vec<ObjectRef> = (0..8)
                .map(|_| {
                    id += 1;
                    put(&tier, id, &pattern(id, 1000))
                })
                .collect();
            *current.lock().unwrap() = refs.clone();
            for r in &refs {
                assert!(tier.delete(r).unwrap());
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert!(reads.load(Ordering::Relaxed) > 0, "the readers never saw an object");
    assert_eq!(tier.usage().unwrap(), TierUsage::default());
    tier.destroy().unwrap();
}

#[test]
fn destroy_leaves_nothing() {
    let run = unique_run_id();
    let tier = tier(&run);
    let refs: Vec<ObjectRef> = [10usize, 100, 1000, 4096, 5000, 1 << 20]
        .iter()
        .enumerate()
        .map(|(i, &len)| put(&tier, i as u64, &pattern(i as u64, len)))
        .collect();
    assert_eq!(segments(&run).len(), 6, "{:?}", segments(&run)); // 4 arenas, 2 large segments
    // Another run's segments are not touched, even if its id extends this one's.
    let neighbour_run = format!("{run}x");
    let neighbour = ShmTier::new(ShmConfig::new(&neighbour_run)).unwrap();
    let kept = put(&neighbour, 1, b"neighbour");
    tier.destroy().unwrap();
    assert!(segments(&run).is_empty(), "{:?}", segments(&run));
    assert_eq!(tier.usage().unwrap(), TierUsage::default());
    for r in &refs {
        assert_eq!(get(&tier, r), None);
    }
    tier.destroy().unwrap();
    assert_eq!(get(&neighbour, &kept).as_deref(), Some(&b"neighbour"[..]));
    neighbour.destroy().unwrap();
    assert!(segments(&neighbour_run).is_empty());
}

#[test]
fn shm_dir_is_where_segments_are_listed() {
    let run = unique_run_id();
    let empty = std::env::temp_dir().join(format!("{run}-empty"));
    std::fs::create_dir_all(&empty).unwrap();
    let tier = ShmTier::new(ShmConfig::new(&run).shm_dir(&empty)).unwrap();
    put(&tier, 1, &pattern(1, 5000));
    // Arenas are found by name, large segments by listing shm_dir: here an empty directory.
    assert_eq!(tier.usage().unwrap(), TierUsage::default());
    ShmTier::new(ShmConfig::new(&run)).unwrap().destroy().unwrap();
    std::fs::remove_dir(&empty).unwrap();
    assert!(segments(&run).is_empty());
}

/// Set for the inner test when the outer one runs it in a 1 MiB /dev/shm.
const INNER_ENV: &str = "CONTEXT_TIER_SHM_TINY_SHM";

#[test]
fn full_shm_answers_no_space() {
    let tiny = [(INNER_ENV, std::ffi::OsStr::new("1"))];
    match in_private_tmpfs("inner_no_space_in_tiny_shm", Path::new("/dev/shm"), "1m", &tiny) {
        Sandboxed::Ran(stdout) => stdout.lines().filter(|l| l.contains("fit in")).for_each(|l| println!("{l}")),
        Sandboxed::Skipped(why) => println!("SKIPPED full_shm_answers_no_space: {why}"),
    }
}

#[test]
#[ignore = "runs inside a private 1 MiB /dev/shm, started by full_shm_answers_no_space"]
fn inner_no_space_in_tiny_shm() {
    if std::env::var_os(INNER_ENV).is_none() {
        println!("SKIPPED inner_no_space_in_tiny_shm: only meaningful when started by full_shm_answers_no_space");
        return;
    }
    let run = unique_run_id();
    let tier = tier(&run);
    let big = pattern(1, 4 << 20);
    let parts: [&[u8]; 1] = [&big];
    let outcome = tier.put(NewObject { id: ObjectId(1), len: big.len() as u64, data: ObjectData::Parts(&parts) });
    assert_eq!(outcome.unwrap(), PutOutcome::NoSpace);
    let mut fill =
        |_: &mut dyn std::io::Write| -> context_core::Result<()> { panic!("fill called although there is no space") };
    let outcome = tier.put(NewObject { id: ObjectId(2), len: big.len() as u64, data: ObjectData::Write(&mut fill) });
    assert_eq!(outcome.unwrap(), PutOutcome::NoSpace);
    assert!(segments(&run).is_empty(), "{:?}", segments(&run));
    assert_eq!(tier.usage().unwrap(), TierUsage::default());

    // What fits is stored.
    let r = put(&tier, 3, &pattern(3, 256 << 10));
    assert_eq!(get(&tier, &r), Some(pattern(3, 256 << 10)));
    assert!(tier.delete(&r).unwrap());

    // Small objects fill arenas until an arena cannot be created; all of them stay readable.
    // Arenas after the first are 2 MiB where they fit and small where they do not, so the
    // 1 MiB holds three arenas of 256 slots of 1 KiB.
    let mut stored = Vec::new();
    for id in 100u64.. {
        let bytes = pattern(id, 1000);
        let parts: [&[u8]; 1] = [&bytes];
        match tier.put(NewObject { id: ObjectId(id), len: 1000, data: ObjectData::Parts(&parts) }).unwrap() {
            PutOutcome::Stored(r) => stored.push((r, bytes)),
            PutOutcome::NoSpace => break,
        }
    }
    assert_eq!(stored.len(), 3 * 256, "small objects that fit");
    let prefix = ShmConfig::new(&run).prefix();
    assert_eq!(segments(&run), ["a1024.0", "a1024.1", "a1024.2"].map(|s| format!("{prefix}{s}")));
    for (r, bytes) in &stored {
        assert_eq!(get(&tier, r).as_ref(), Some(bytes));
    }
    assert_eq!(tier.usage().unwrap(), TierUsage { bytes: stored.len() as u64 * 1024, objects: stored.len() as u64 });
    tier.destroy().unwrap();
    assert!(segments(&run).is_empty());
    println!("inner_no_space_in_tiny_shm: {} small objects fit in 1 MiB", stored.len());
}

#[test]
fn a_large_object_whose_writer_panics_leaves_no_segment() {
    let run = unique_run_id();
    let tier = tier(&run);
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut fill = |out: &mut dyn std::io::Write| -> context_core::Result<()> {
            out.write_all(&[1u8; 100_000]).unwrap();
            panic!("a writer that panics halfway");
        };
        tier.put(NewObject { id: ObjectId(7), len: 200_000, data: ObjectData::Write(&mut fill) })
    }));
    assert!(unwound.is_err());
    assert!(segments(&run).is_empty(), "{:?}", segments(&run));
    assert_eq!(tier.usage().unwrap(), TierUsage::default());
    // The id can be stored again.
    let r = put(&tier, 7, &pattern(7, 200_000));
    assert_eq!(get(&tier, &r), Some(pattern(7, 200_000)));
    tier.destroy().unwrap();
}

/// Set for the inner test when the outer one runs it in a /dev/shm of 4 inodes.
const FEW_INODES_ENV: &str = "CONTEXT_TIER_SHM_FEW_INODES";

#[test]
fn shm_out_of_inodes_answers_no_space() {
    let env = [(FEW_INODES_ENV, std::ffi::OsStr::new("1"))];
    // The size goes into `mount -o size=`, so it can carry a second option.
    match in_private_tmpfs("inner_out_of_inodes", Path::new("/dev/shm"), "64m,nr_inodes=4", &env) {
        Sandboxed::Ran(stdout) => stdout.lines().filter(|l| l.contains("inodes")).for_each(|l| println!("{l}")),
        Sandboxed::Skipped(why) => println!("SKIPPED shm_out_of_inodes_answers_no_space: {why}"),
    }
}

#[test]
#[ignore = "runs inside a private /dev/shm of 4 inodes, started by shm_out_of_inodes_answers_no_space"]
fn inner_out_of_inodes() {
    if std::env::var_os(FEW_INODES_ENV).is_none() {
        println!("SKIPPED inner_out_of_inodes: only meaningful when started by shm_out_of_inodes_answers_no_space");
        return;
    }
    let run = unique_run_id();
    let tier = tier(&run);
    // Large objects, a segment each, until no inode is left: then NoSpace (so that a context
    // falls back to disk), not an error.
    let mut stored = Vec::new();
    for id in 0..8u64 {
        let bytes = pattern(id, 8192);
        let parts: [&[u8]; 1] = [&bytes];
        match tier.put(NewObject { id: ObjectId(id), len: 8192, data: ObjectData::Parts(&parts) }) {
            Ok(PutOutcome::Stored(r)) => stored.push((r, bytes)),
            Ok(PutOutcome::NoSpace) => break,
            Err(e) => panic!("a /dev/shm out of inodes must answer NoSpace: {e}"),
        }
    }
    assert!(!stored.is_empty() && stored.len() < 8, "{} large objects stored", stored.len());
    // A small object of a class with no arena yet needs an inode too.
    let small = pattern(100, 3000);
    let parts: [&[u8]; 1] = [&small];
    let outcome = tier.put(NewObject { id: ObjectId(100), len: 3000, data: ObjectData::Parts(&parts) });
    assert_eq!(outcome.unwrap(), PutOutcome::NoSpace);
    for (r, bytes) in &stored {
        assert_eq!(get(&tier, r).as_ref(), Some(bytes));
    }
    tier.destroy().unwrap();
    assert!(segments(&run).is_empty(), "{:?}", segments(&run));
    println!("inner_out_of_inodes: {} segments fit in 4 inodes", stored.len());
}

#[test]
fn instances_of_one_run_id_keep_apart() {
    let run = unique_run_id();
    let (a, b) = (
        ShmTier::new(ShmConfig::new(&run).instance(1)).unwrap(),
        ShmTier::new(ShmConfig::new(&run).instance(2)).unwrap(),
    );
    // The same ids in both, small and large.
    let in_a: Vec<ObjectRef> = [100usize, 5000].iter().map(|&len| put(&a, len as u64, &pattern(1, len))).collect();
    let in_b: Vec<ObjectRef> = [100usize, 5000].iter().map(|&len| put(&b, len as u64, &pattern(2, len))).collect();
    assert_eq!(a.usage().unwrap(), b.usage().unwrap());
    assert_eq!(a.usage().unwrap().objects, 2);
    a.destroy().unwrap();
    assert_eq!(a.usage().unwrap(), TierUsage::default());
    for r in &in_a {
        assert_eq!(get(&a, r), None);
    }
    for (r, len) in in_b.iter().zip([100usize, 5000]) {
        assert_eq!(get(&b, r).as_deref(), Some(&pattern(2, len)[..]), "instance 2 lost its {len}-byte object");
    }
    b.destroy().unwrap();
    assert!(segments(&run).is_empty(), "{:?}", segments(&run));
}

#[test]
fn destroy_without_instance_is_seen_by_instances() {
    let run = unique_run_id();
    let a = ShmTier::new(ShmConfig::new(&run).instance(7)).unwrap();
    let small = put(&a, 1, b"small");
    let large = put(&a, 2, &pattern(2, 10_000));
    // A tier without an instance removes the segments of every instance of its run id.
    tier(&run).destroy().unwrap();
    assert!(segments(&run).is_empty(), "{:?}", segments(&run));
    assert_eq!(get(&a, &large), None);
    assert_eq!(a.usage().unwrap(), TierUsage::default());
    // a still has the arena mapped: it must see that it was destroyed, as it does when a
    // tier of its own instance destroys it.
    assert_eq!(get(&a, &small), None, "a small object is still readable after destroy");
    // And what a stores afterwards is visible to another process of the instance.
    let again = put(&a, 3, b"again");
    let b = ShmTier::new(ShmConfig::new(&run).instance(7)).unwrap();
    assert_eq!(get(&b, &again).as_deref(), Some(&b"again"[..]), "stored into an unlinked arena");
    a.destroy().unwrap();
    assert!(segments(&run).is_empty(), "{:?}", segments(&run));
}

#[test]
fn get_with_a_longer_len_never_shows_a_deleted_objects_bytes() {
    let run = unique_run_id();
    let tier = tier(&run);
    let old = put(&tier, 1, &[0xaa; 60]);
    assert!(tier.delete(&old).unwrap());
    let new = put(&tier, 2, &[0x55; 8]);
    assert_eq!(new.slot, old.slot, "the freed slot was not reused");
    // An index that got the length wrong (within the slot's class).
    let got = get(&tier, &ObjectRef { len: 60, ..new });
    tier.destroy().unwrap();
    if let Some(bytes) = got {
        assert!(!bytes.contains(&0xaa), "object 2 read as 60 bytes shows object 1's bytes: {bytes:02x?}");
    }
}

#[test]
fn an_arena_passed_as_dead_leaves_no_hole_after_destroy() {
    let run = unique_run_id();
    let prefix = ShmConfig::new(&run).prefix();
    // Arena 0 of the 64-byte class, whose creator died right after creating it (size 0).
    let dead = Path::new("/dev/shm").join(format!("{prefix}a64.0"));
    std::fs::File::create(&dead).unwrap();
    let a = tier(&run);
    let first = put(&a, 1, b"one"); // waits for arena 0, gives up on it, uses arena 1
    assert_eq!(a.locate(&first).shm_name, Some(format!("/{prefix}a64.1")));
    // Another process ends the context, and a goes on (it can start over).
    tier(&run).destroy().unwrap();
    let r = put(&a, 2, b"two");
    // What a stored is counted, and found by id, by every other process.
    let c = tier(&run);
    let seen = c.usage().unwrap();
    let found = c.delete(&ObjectRef { slot: ObjectRef::UNKNOWN_SLOT, len: 0, ..r }).unwrap();
    let at = a.locate(&r).shm_name;
    a.destroy().unwrap();
    assert_eq!(seen.objects, 1, "another process's usage misses the object in {at:?}: {:?}", segments(&run));
    assert!(found, "another process's delete by id misses the object in {at:?}");
}

#[test]
fn a_large_objects_record_payload_starts_128_bytes_into_a_page() {
    // From 64 KiB an object starts this far into its segment: a context record's 32-byte
    // header before the payload, 128 bytes into the page.
    const OFFSET: usize = context_core::record::LARGE_RECORD_OFFSET as usize;
    let run = unique_run_id();
    let tier = tier(&run);
    let lens = [5000usize, 64 * 1024 - 1, 64 * 1024, 1 << 20];
    for (id, &len) in (1u64..).zip(&lens) {
        let bytes = pattern(id, len);
        let r = put(&tier, id, &bytes);
        let offset = if len >= 64 * 1024 { OFFSET } else { 0 };
        assert_eq!(tier.footprint(len as u64), ((offset + len) as u64).next_multiple_of(4096), "object {id}");
        assert_eq!(r.held, tier.footprint(len as u64), "object {id}");
        let name = format!("{}{:016x}", ShmConfig::new(&run).prefix(), id);
        let segment = std::fs::read(Path::new("/dev/shm").join(&name)).unwrap();
        let got = tier.get(&r).unwrap().unwrap();
        context_core::testing::check_stored_at(&format!("object {id}"), &segment, offset, &bytes, &got);
    }
    let usage = tier.usage().unwrap();
    assert_eq!(usage.objects, lens.len() as u64);
    assert_eq!(usage.bytes, lens.iter().map(|&n| tier.footprint(n as u64)).sum::<u64>());
    tier.destroy().unwrap();
}
