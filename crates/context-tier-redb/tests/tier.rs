//! Behaviour of `RedbTier` beyond the conformance kit: compression, sharing one file between
//! instances, opening at the same moment, damage, configuration and the file itself.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Barrier;

use context_core::testing::pattern;
use context_core::{Error, NewObject, ObjectData, ObjectId, ObjectRef, PutOutcome, StorageKind, StorageTier};
use context_tier_redb::{RedbConfig, RedbTier};
use redb::{ConcurrencyMode, ReadableDatabase, TableDefinition};

/// The tier's table, as a raw redb handle sees it.
const OBJECTS: TableDefinition<u64, &[u8]> = TableDefinition::new("objects");

/// Opens the database file as another process would, with plain redb.
fn raw_db(path: &Path) -> redb::Database {
    redb::Builder::new().set_concurrency_mode(ConcurrencyMode::MultiWriter).create(path).unwrap()
}

/// The blob stored under `id`, read with plain redb.
fn raw_blob(path: &Path, id: u64) -> Option<Vec<u8>> {
    let db = raw_db(path);
    let txn = db.begin_read().unwrap();
    let table = txn.open_table(OBJECTS).unwrap();
    table.get(id).unwrap().map(|blob| blob.value().to_vec())
}

/// The chunk table, as a raw redb handle sees it.
const CHUNKS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("chunks");
/// The length of every chunk but the last.
const CHUNK: usize = (1 << 20) - (4 << 10);

/// The chunk blobs stored under `id`, in order, read with plain redb.
fn raw_chunks(path: &Path, id: u64) -> Vec<Vec<u8>> {
    let db = raw_db(path);
    let txn = db.begin_read().unwrap();
    let Ok(table) = txn.open_table(CHUNKS) else { return Vec::new() };
    table.range((id, 0)..=(id, u32::MAX)).unwrap().map(|entry| entry.unwrap().1.value().to_vec()).collect()
}

/// Stores chunk blobs under `id` with plain redb, as a put that died part way leaves them.
fn write_raw_chunks(path: &Path, id: u64, chunks: &[(u32, &[u8])]) {
    let db = raw_db(path);
    let txn = db.begin_write().unwrap();
    {
        let mut table = txn.open_table(CHUNKS).unwrap();
        for (i, blob) in chunks {
            table.insert((id, *i), *blob).unwrap();
        }
    }
    txn.commit().unwrap();
}

/// Stores `blob` under `id` with plain redb, bypassing the tier.
fn write_raw_blob(path: &Path, id: u64, blob: &[u8]) {
    let db = raw_db(path);
    let txn = db.begin_write().unwrap();
    txn.open_table(OBJECTS).unwrap().insert(id, blob).unwrap();
    txn.commit().unwrap();
}

fn db_path(scratch: &tempfile::TempDir) -> PathBuf {
    scratch.path().join("context.redb")
}

fn open(path: &Path) -> RedbTier {
    RedbTier::new(RedbConfig::new(path)).unwrap()
}

fn put(tier: &RedbTier, id: u64, bytes: &[u8]) -> ObjectRef {
    let parts: [&[u8]; 1] = [bytes];
    match tier.put(NewObject { id: ObjectId(id), len: bytes.len() as u64, data: ObjectData::Parts(&parts) }) {
        Ok(PutOutcome::Stored(r)) => r,
        other => panic!("put of object {id} failed: {other:?}"),
    }
}

fn put_streamed(tier: &RedbTier, id: u64, bytes: &[u8]) -> ObjectRef {
    let mut write = |out: &mut dyn std::io::Write| {
        bytes
            .chunks(100_003)
            .try_for_each(|piece| out.write_all(piece))
            .map_err(|e| Error::io("test write", "value", e))
    };
    match tier.put(NewObject { id: ObjectId(id), len: bytes.len() as u64, data: ObjectData::Write(&mut write) }) {
        Ok(PutOutcome::Stored(r)) => r,
        other => panic!("streamed put of object {id} failed: {other:?}"),
    }
}

fn get(tier: &RedbTier, r: &ObjectRef) -> Option<Vec<u8>> {
    tier.get(r).unwrap().map(|p| p.to_vec())
}

/// Compressible bytes, like a log or a serialized table.
fn text(len: usize) -> Vec<u8> {
    (0u32..).flat_map(|i| format!("row {i}: state=done score={}\n", i % 101).into_bytes()).take(len).collect()
}

#[test]
fn describes_itself() {
    let scratch = tempfile::tempdir().unwrap();
    let tier = open(&db_path(&scratch));
    assert_eq!(tier.name(), "redb");
    assert_eq!(tier.kind(), StorageKind::Disk);
    assert!(!tier.capabilities().zero_copy && tier.capabilities().shared_across_processes);
    assert_eq!(tier.path(), db_path(&scratch));
    assert_eq!([0, 1, 4096, u64::MAX].map(|n| tier.footprint(n)), [9, 10, 4105, u64::MAX]);
    let r = ObjectRef { id: ObjectId(3), len: 3, slot: 0, held: 0 };
    assert_eq!(tier.locate(&r).path, Some(db_path(&scratch)));
    assert_eq!(tier.locate(&r).shm_name, None);
    assert!(format!("{tier:?}").contains("context.redb"));
    let mode = fs::metadata(db_path(&scratch)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600);
}

#[test]
fn compressible_values_are_held_in_fewer_bytes() {
    let scratch = tempfile::tempdir().unwrap();
    let tier = open(&db_path(&scratch));
    let repeated: Vec<u8> = b"0123456789abcdef".iter().copied().cycle().take(1 << 20).collect();
    // Under 128 KiB one zstd frame; from there on two, compressed on two threads.
    for (id, len, encoding) in [(1, 100_000, 1), (3, 1 << 20, 4)] {
        let bytes = &repeated[..len];
        for (id, r) in [(id, put(&tier, id, bytes)), (id + 1, put_streamed(&tier, id + 1, bytes))] {
            assert!(r.held < 1 << 12, "{len} bytes of a repeated pattern are held in {}", r.held);
            assert_eq!(get(&tier, &r).as_deref(), Some(bytes));
            assert_eq!(raw_blob(tier.path(), id).unwrap()[0], encoding, "{len} bytes");
        }
    }
    let log = text(300_000);
    let r = put(&tier, 5, &log);
    assert!(r.held < log.len() as u64 / 4, "{} bytes of text held in {}", log.len(), r.held);
    assert_eq!(get(&tier, &r).as_deref(), Some(&log[..]));
    tier.destroy().unwrap();
}

#[test]
fn incompressible_values_are_stored_raw() {
    let scratch = tempfile::tempdir().unwrap();
    let tier = open(&db_path(&scratch));
    for (i, len) in [0usize, 1, 50, 4096, 1 << 20, (4 << 20) - 1, (6 << 20) + 1].into_iter().enumerate() {
        let bytes = pattern(i as u64, len);
        let r = if i % 2 == 0 { put(&tier, i as u64, &bytes) } else { put_streamed(&tier, i as u64, &bytes) };
        let blob = raw_blob(tier.path(), i as u64).unwrap();
        if len < 4 << 20 {
            assert_eq!(r.held, len as u64 + 9, "{len} random bytes");
            assert_eq!(blob[0], 0, "stored raw");
        } else {
            // Chunked: every chunk stored raw, behind its 9-byte header, beside the manifest.
            let n = len.div_ceil(CHUNK) as u64;
            assert_eq!(blob[0], 3, "chunked");
            assert_eq!(r.held, len as u64 + 13 + 13 * n, "{len} random bytes");
            assert!(raw_chunks(tier.path(), i as u64).iter().all(|c| c[0] == 0), "chunks stored raw");
        }
        assert_eq!(r.held, tier.footprint(len as u64));
        assert_eq!(get(&tier, &r).as_deref(), Some(&bytes[..]));
    }
    tier.destroy().unwrap();
}

#[test]
fn large_values_are_compressed_in_chunks() {
    let scratch = tempfile::tempdir().unwrap();
    let tier = open(&db_path(&scratch));
    let big = text((9 << 20) + 3);
    // Half random, half text: the random chunks are stored raw inside the chunked blob.
    let mixed: Vec<u8> = pattern(7, 4 << 20).into_iter().chain(text(3 << 20)).collect();
    // Parts that cut chunks in two, as a record header and its payload would.
    let (head, tail) = big.split_at(1000);
    let split = tier.put(NewObject { id: ObjectId(3), len: big.len() as u64, data: ObjectData::Parts(&[head, tail]) });
    let Ok(PutOutcome::Stored(split)) = split else { panic!("{split:?}") };
    for (r, bytes) in [
        (put(&tier, 1, &big), &big),
        (put_streamed(&tier, 2, &big), &big),
        (split, &big),
        (put(&tier, 4, &mixed), &mixed),
        (put_streamed(&tier, 5, &mixed), &mixed),
    ] {
        assert!(r.held < bytes.len() as u64, "object {} is held in {} bytes", r.id, r.held);
        assert_eq!(raw_blob(tier.path(), r.id.0).unwrap()[0], 3, "object {} is chunked", r.id);
        assert!(get(&tier, &r).as_deref() == Some(&bytes[..]), "object {} read back different", r.id);
    }
    assert_eq!(raw_blob(tier.path(), 1), raw_blob(tier.path(), 2), "streamed and whole encode alike");
    assert_eq!(raw_blob(tier.path(), 1), raw_blob(tier.path(), 3), "split parts encode alike");
    assert_eq!(raw_chunks(tier.path(), 1), raw_chunks(tier.path(), 2));
    assert_eq!(tier.usage().unwrap().objects, 5);
    tier.destroy().unwrap();
}

#[test]
fn zstd_level_out_of_range_is_a_config_error() {
    let scratch = tempfile::tempdir().unwrap();
    for level in [23, 1000, i32::MIN] {
        let err = RedbTier::new(RedbConfig::new(db_path(&scratch)).zstd_level(level)).unwrap_err();
        assert!(matches!(&err, Error::Config { key: Some(k), .. } if k == "zstd_level"), "{err:?}");
        assert!(err.to_string().contains(&level.to_string()), "{err}");
    }
    assert!(!db_path(&scratch).exists(), "a refused configuration created the file");
    for (id, level) in [(1, -5), (2, 0), (3, 1), (4, 22)] {
        let tier = RedbTier::new(RedbConfig::new(db_path(&scratch)).zstd_level(level)).unwrap();
        let bytes = text(200_000);
        let r = put(&tier, id, &bytes);
        assert!(r.held < bytes.len() as u64, "level {level}");
        assert_eq!(get(&tier, &r).as_deref(), Some(&bytes[..]), "level {level}");
    }
}

#[test]
fn two_instances_share_one_file() {
    let scratch = tempfile::tempdir().unwrap();
    let a = open(&db_path(&scratch));
    let b = open(&db_path(&scratch));
    let small = put(&a, 1, b"small");
    let large_bytes = text(5 << 20);
    let large = put_streamed(&b, 2, &large_bytes);
    assert_eq!(get(&b, &small).as_deref(), Some(&b"small"[..]));
    assert!(get(&a, &large).as_deref() == Some(&large_bytes[..]));
    assert_eq!(a.usage().unwrap(), b.usage().unwrap());
    assert_eq!(a.usage().unwrap().objects, 2);
    assert_eq!(a.usage().unwrap().bytes, small.held + large.held);

    let held = a.get(&large).unwrap().unwrap();
    let lost = ObjectRef { slot: ObjectRef::UNKNOWN_SLOT, ..large };
    assert!(b.delete(&lost).unwrap());
    assert!(a.get(&large).unwrap().is_none());
    assert!(!a.delete(&large).unwrap());
    assert!(*held == *large_bytes, "a payload changed after another instance deleted its object");

    // Destroy from one instance empties the other's view.
    b.destroy().unwrap();
    assert!(!db_path(&scratch).exists());
    assert!(a.get(&small).unwrap().is_none());
    assert_eq!(a.usage().unwrap().objects, 0);
    a.destroy().unwrap();
    b.destroy().unwrap();

    // A new tier on the same path starts empty.
    let c = open(&db_path(&scratch));
    assert!(c.get(&small).unwrap().is_none());
    assert_eq!(c.usage().unwrap().objects, 0);
    c.destroy().unwrap();
}

#[test]
fn two_threads_create_one_new_file_at_once() {
    for round in 0..20u64 {
        let scratch = tempfile::tempdir().unwrap();
        let path = db_path(&scratch);
        let barrier = Barrier::new(2);
        let tiers: Vec<RedbTier> = std::thread::scope(|s| {
            let opens: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        open(&path)
                    })
                })
                .collect();
            opens.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let r0 = put(&tiers[0], 2 * round, b"from the first");
        let r1 = put(&tiers[1], 2 * round + 1, b"from the second");
        assert_eq!(get(&tiers[1], &r0).as_deref(), Some(&b"from the first"[..]));
        assert_eq!(get(&tiers[0], &r1).as_deref(), Some(&b"from the second"[..]));
        tiers[0].destroy().unwrap();
    }
}

#[test]
fn a_damaged_blob_is_corrupt_not_a_panic() {
    let scratch = tempfile::tempdir().unwrap();
    let tier = open(&db_path(&scratch));
    let good = put(&tier, 1, &text(10_000));
    let good_blob = raw_blob(tier.path(), 1).unwrap();
    let chunked = put(&tier, 2, &text(5 << 20));
    let chunked_blob = raw_blob(tier.path(), 2).unwrap();
    let split = put(&tier, 3, &text(1 << 20));
    let split_blob = raw_blob(tier.path(), 3).unwrap();
    assert_eq!(split_blob[0], 4, "two frames");
    let split_with = |at: usize, field: &[u8]| {
        let mut blob = split_blob.clone();
        blob[at..at + field.len()].copy_from_slice(field);
        blob
    };

    let mut damaged: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("short header", vec![0, 1, 2]),
        ("unknown encoding", vec![7; 40]),
        ("raw, wrong length", [&[0u8][..], &100u64.to_le_bytes(), &[1; 10]].concat()),
        ("frame, garbage", [&[1u8][..], &1000u64.to_le_bytes(), &[0x55; 50]].concat()),
        ("frame, huge length", [&[1u8][..], &(1u64 << 50).to_le_bytes(), &good_blob[9..]].concat()),
        ("truncated frame", good_blob[..good_blob.len() - 3].to_vec()),
        ("truncated chunks", chunked_blob[..chunked_blob.len() / 2].to_vec()),
        ("split, truncated", split_blob[..split_blob.len() - 1].to_vec()),
        ("split, huge length", split_with(1, &(1u64 << 50).to_le_bytes())),
        ("split, piece size 0", split_with(9, &0u32.to_le_bytes())),
        ("split, piece size off by one", split_with(9, &((1u32 << 19) + 1).to_le_bytes())),
        (
            "split, body length off by one",
            split_with(13, &(u32::from_le_bytes(split_blob[13..17].try_into().unwrap()) + 1).to_le_bytes()),
        ),
    ];
    let mut flipped = good_blob.clone();
    flipped[20] ^= 0xff;
    flipped[21] ^= 0xff;
    damaged.push(("flipped frame bytes", flipped));
    let mut claimed = chunked_blob.clone();
    claimed[1..9].copy_from_slice(&(1u64 << 40).to_le_bytes());
    damaged.push(("chunked, huge length", claimed));

    for (i, (what, blob)) in damaged.iter().enumerate() {
        let id = 100 + i as u64;
        write_raw_blob(tier.path(), id, blob);
        let r = ObjectRef { id: ObjectId(id), len: 1000, slot: 0, held: 0 };
        match tier.get(&r) {
            Err(e @ Error::Corrupt { .. }) => {
                let message = e.to_string();
                assert!(message.contains(&*tier.path().to_string_lossy()), "{what}: {message}");
                assert!(message.contains(&ObjectId(id).to_string()), "{what}: {message}");
            }
            // A flipped byte in a frame may still decode, to other bytes; the context's
            // checksum catches that.
            Ok(Some(_)) if *what == "flipped frame bytes" => {}
            other => panic!("{what}: {other:?}"),
        }
    }
    // The intact objects are unaffected.
    assert_eq!(get(&tier, &good).as_deref(), Some(&text(10_000)[..]));
    assert!(get(&tier, &chunked).as_deref() == Some(&text(5 << 20)[..]));
    assert!(get(&tier, &split).as_deref() == Some(&text(1 << 20)[..]));
    tier.destroy().unwrap();
}

#[test]
fn new_refuses_links_and_missing_directories() {
    let scratch = tempfile::tempdir().unwrap();
    let target = scratch.path().join("victim");
    fs::write(&target, b"untouched").unwrap();
    let link = scratch.path().join("link.redb");
    symlink(&target, &link).unwrap();
    let err = RedbTier::new(RedbConfig::new(&link)).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("link.redb"), "{err}");
    assert_eq!(fs::read(&target).unwrap(), b"untouched");

    let err = RedbTier::new(RedbConfig::new(scratch.path().join("missing/context.redb"))).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");

    let dir = scratch.path().join("a-directory");
    fs::create_dir(&dir).unwrap();
    assert!(RedbTier::new(RedbConfig::new(&dir)).is_err());

    // A file that is not a redb database is refused, and left as it is.
    let other = scratch.path().join("notes.txt");
    fs::File::create(&other).unwrap().write_all(b"not a database, just some notes").unwrap();
    let err = RedbTier::new(RedbConfig::new(&other)).unwrap_err();
    assert!(err.to_string().contains("notes.txt"), "{err}");
    assert_eq!(fs::read(&other).unwrap(), b"not a database, just some notes");
}

#[test]
fn destroy_leaves_a_replacing_file_alone() {
    let scratch = tempfile::tempdir().unwrap();
    let path = db_path(&scratch);
    let old = open(&path);
    put(&old, 1, b"old");
    fs::remove_file(&path).unwrap();
    // A later context's database at the same path.
    let new = open(&path);
    let r = put(&new, 2, b"new");
    old.destroy().unwrap();
    assert!(path.exists());
    assert_eq!(get(&new, &r).as_deref(), Some(&b"new"[..]));
    new.destroy().unwrap();
    assert!(!path.exists());
}

fn id_ref(id: u64) -> ObjectRef {
    ObjectRef { id: ObjectId(id), len: 0, slot: ObjectRef::UNKNOWN_SLOT, held: 0 }
}

#[test]
fn chunked_objects_round_trip() {
    let scratch = tempfile::tempdir().unwrap();
    let tier = open(&db_path(&scratch));
    let threshold = 4usize << 20;
    let mut id = 0;
    let mut held = 0;
    let sizes = [threshold - 1, threshold, 5 * CHUNK + 1];
    let cases = sizes
        .into_iter()
        .flat_map(|len| [(len, true, false), (len, true, true), (len, false, false), (len, false, true)]);
    // And 64 MiB (65 chunks), compressible and streamed.
    for (len, compressible, streamed) in cases.chain([(64 << 20, true, true)]) {
        {
            let bytes = if compressible { text(len) } else { pattern(len as u64, len) };
            {
                id += 1;
                let r = if streamed { put_streamed(&tier, id, &bytes) } else { put(&tier, id, &bytes) };
                assert!(r.held <= tier.footprint(len as u64), "{len} bytes hold {}", r.held);
                let chunks = raw_chunks(tier.path(), id);
                let blob = raw_blob(tier.path(), id).unwrap();
                if len < threshold {
                    // Compressible: two zstd frames in one blob; random: raw.
                    assert!(
                        chunks.is_empty() && blob[0] == if compressible { 4 } else { 0 },
                        "{len} bytes are one blob"
                    );
                } else {
                    assert_eq!(blob[0], 3, "{len} bytes are chunked");
                    assert_eq!(chunks.len(), len.div_ceil(CHUNK));
                    let stored: u64 = chunks.iter().map(|c| c.len() as u64).sum();
                    assert_eq!(r.held, blob.len() as u64 + stored);
                }
                held += r.held;
                assert!(get(&tier, &r).as_deref() == Some(&bytes[..]), "{len} bytes read back different");
            }
        }
    }
    let usage = tier.usage().unwrap();
    assert_eq!((usage.objects, usage.bytes), (id, held));
    // Deleting removes the manifest and every chunk.
    for id in 1..=id {
        assert!(tier.delete(&ObjectRef { id: ObjectId(id), len: 0, slot: 0, held: 0 }).unwrap());
        assert!(raw_chunks(tier.path(), id).is_empty() && raw_blob(tier.path(), id).is_none());
    }
    assert_eq!(tier.usage().unwrap(), context_core::TierUsage::default());
    tier.destroy().unwrap();
}

#[test]
fn a_put_failing_part_way_leaves_nothing() {
    let scratch = tempfile::tempdir().unwrap();
    let tier = open(&db_path(&scratch));
    let kept = put(&tier, 1, &text(5 << 20));
    let before = tier.usage().unwrap();
    let bytes = pattern(2, 40 << 20);
    for (id, fail_at) in [(2, 10 << 20), (3, (40 << 20) - 1), (4, 100)] {
        // The writer errors after `fail_at` bytes: several batches of chunks are committed by then.
        let mut write = |out: &mut dyn std::io::Write| {
            out.write_all(&bytes[..fail_at]).map_err(|e| Error::io("test write", "value", e))?;
            Err(Error::corrupt("test value", "the writer failed on purpose"))
        };
        let result =
            tier.put(NewObject { id: ObjectId(id), len: bytes.len() as u64, data: ObjectData::Write(&mut write) });
        assert!(matches!(result, Err(Error::Corrupt { .. })), "{result:?}");
        assert!(raw_chunks(tier.path(), id).is_empty(), "chunks of object {id} left behind");
        assert!(raw_blob(tier.path(), id).is_none());
        assert!(tier.get(&id_ref(id)).unwrap().is_none());
        assert!(!tier.delete(&id_ref(id)).unwrap());
        assert_eq!(tier.usage().unwrap(), before);
    }
    // Parts that are not the declared length, found only at the end.
    let short = pattern(5, 12 << 20);
    let result = tier.put(NewObject { id: ObjectId(5), len: 13 << 20, data: ObjectData::Parts(&[&short]) });
    assert!(result.is_err());
    let mut write =
        |out: &mut dyn std::io::Write| out.write_all(&short).map_err(|e| Error::io("test write", "value", e));
    let result = tier.put(NewObject { id: ObjectId(6), len: 13 << 20, data: ObjectData::Write(&mut write) });
    assert!(result.is_err());
    assert!(raw_chunks(tier.path(), 6).is_empty());
    assert_eq!(tier.usage().unwrap(), before);
    assert!(get(&tier, &kept).as_deref() == Some(&text(5 << 20)[..]));
    tier.destroy().unwrap();
}

#[test]
fn delete_by_id_removes_orphan_chunks() {
    let scratch = tempfile::tempdir().unwrap();
    let tier = open(&db_path(&scratch));
    let kept = put(&tier, 1, &pattern(1, 6 << 20));
    let before = tier.usage().unwrap();
    // What a put whose process died after two batches leaves: chunks, no manifest.
    let chunk = [&[0u8][..], &(CHUNK as u64).to_le_bytes(), &pattern(2, CHUNK)].concat();
    write_raw_chunks(tier.path(), 2, &[(0, &chunk), (1, &chunk), (7, &chunk[..100])]);
    assert!(tier.get(&id_ref(2)).unwrap().is_none(), "chunks without a manifest are no object");
    let during = tier.usage().unwrap();
    assert_eq!(during.objects, before.objects);
    assert_eq!(during.bytes, before.bytes + 2 * chunk.len() as u64 + 100, "orphan chunks count until deleted");
    // A delete with a known slot does not look for orphans; one by id does.
    assert!(!tier.delete(&ObjectRef { id: ObjectId(2), len: 0, slot: 0, held: 0 }).unwrap());
    assert!(!tier.delete(&id_ref(2)).unwrap());
    assert!(raw_chunks(tier.path(), 2).is_empty());
    assert_eq!(tier.usage().unwrap(), before);
    // The neighbour's chunks are untouched.
    assert_eq!(raw_chunks(tier.path(), 1).len(), (6usize << 20).div_ceil(CHUNK));
    assert!(get(&tier, &kept).as_deref() == Some(&pattern(1, 6 << 20)[..]));
    // An unknown id with no chunk table at all.
    let fresh = tempfile::tempdir().unwrap();
    let empty = open(&db_path(&fresh));
    put(&empty, 1, b"small");
    assert!(!empty.delete(&id_ref(9)).unwrap());
    empty.destroy().unwrap();
    tier.destroy().unwrap();
}

#[test]
fn a_damaged_chunked_object_is_corrupt() {
    let scratch = tempfile::tempdir().unwrap();
    let tier = open(&db_path(&scratch));
    let bytes = text(6 << 20);
    let good = put(&tier, 1, &bytes);
    let manifest = raw_blob(tier.path(), 1).unwrap();
    let chunks = raw_chunks(tier.path(), 1);
    let copy = |id: u64, manifest: &[u8], chunks: &[Vec<u8>]| {
        let indexed: Vec<(u32, &[u8])> = chunks.iter().enumerate().map(|(i, c)| (i as u32, &c[..])).collect();
        write_raw_chunks(tier.path(), id, &indexed);
        write_raw_blob(tier.path(), id, manifest);
    };
    // What is damaged, the manifest, the chunks.
    type Case = (&'static str, Vec<u8>, Vec<Vec<u8>>);
    let mut cases: Vec<Case> = Vec::new();
    cases.push(("truncated manifest", manifest[..manifest.len() - 2].to_vec(), chunks.clone()));
    let mut huge = manifest.clone();
    huge[1..9].copy_from_slice(&(1u64 << 50).to_le_bytes());
    cases.push(("manifest claims a huge length", huge, chunks.clone()));
    let mut size = manifest.clone();
    size[9..13].copy_from_slice(&u32::MAX.to_le_bytes());
    cases.push(("manifest claims huge chunks", size, chunks.clone()));
    let mut stored = manifest.clone();
    let first = u32::from_le_bytes(stored[13..17].try_into().unwrap());
    stored[13..17].copy_from_slice(&(first + 1).to_le_bytes());
    cases.push(("manifest's stored length off by one", stored, chunks.clone()));
    cases.push(("a chunk missing", manifest.clone(), chunks[..chunks.len() - 1].to_vec()));
    let mut short = chunks.clone();
    short[2].pop();
    cases.push(("a chunk truncated", manifest.clone(), short));
    let mut garbage = chunks.clone();
    let n = garbage[1].len();
    garbage[1][9..].copy_from_slice(&vec![0x55; n - 9]);
    cases.push(("a chunk of garbage", manifest.clone(), garbage));
    let mut claims = chunks.clone();
    claims[0][1..9].copy_from_slice(&1u64.to_le_bytes());
    cases.push(("a chunk claims another length", manifest.clone(), claims));
    for (i, (what, manifest, chunks)) in cases.iter().enumerate() {
        let id = 100 + i as u64;
        copy(id, manifest, chunks);
        match tier.get(&id_ref(id)) {
            Err(e @ Error::Corrupt { .. }) => {
                let message = e.to_string();
                assert!(message.contains(&*tier.path().to_string_lossy()), "{what}: {message}");
                assert!(message.contains(&ObjectId(id).to_string()), "{what}: {message}");
            }
            other => panic!("{what}: {other:?}"),
        }
        // A damaged object can still be deleted, chunks and all.
        assert!(tier.delete(&id_ref(id)).unwrap(), "{what}");
        assert!(raw_chunks(tier.path(), id).is_empty(), "{what}");
    }
    assert!(get(&tier, &good).as_deref() == Some(&bytes[..]));
    tier.destroy().unwrap();
}

#[test]
fn a_get_racing_a_delete_sees_all_or_nothing() {
    let scratch = tempfile::tempdir().unwrap();
    let writer = open(&db_path(&scratch));
    let reader = open(&db_path(&scratch));
    let bytes: Vec<u8> = text(3 << 20).into_iter().chain(pattern(9, 3 << 20)).collect();
    let (mut whole, mut none) = (0, 0);
    for round in 0..30u64 {
        let r = put(&writer, round, &bytes);
        std::thread::scope(|s| {
            let deleter = s.spawn(|| assert!(writer.delete(&r).unwrap()));
            loop {
                match reader.get(&r) {
                    Ok(Some(p)) => {
                        assert!(*p == *bytes, "round {round}: a torn object");
                        whole += 1;
                    }
                    Ok(None) => {
                        none += 1;
                        break;
                    }
                    Err(e) => panic!("round {round}: {e}"),
                }
            }
            deleter.join().unwrap();
        });
    }
    println!("whole {whole}, none {none}");
    assert_eq!(none, 30);
    assert_eq!(reader.usage().unwrap(), context_core::TierUsage::default());
    writer.destroy().unwrap();
}

/// Set for the inner test when the outer one runs it in a process of its own.
const PEAK_ENV: &str = "CONTEXT_TIER_REDB_PEAK_CHILD";

/// A damaged blob that claims a huge length is refused for the few bytes it is: nothing of
/// what it claims is allocated first. Measured in a process of its own, whose peak memory
/// no other test moves.
#[test]
fn a_damaged_blob_claiming_a_huge_length_is_refused_before_allocating_it() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "inner_damaged_blobs_allocate_nothing", "--ignored", "--nocapture", "--test-threads=1"])
        .env(PEAK_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("1 passed"), "the child test did not run:\n{stdout}");
}

#[test]
#[ignore = "runs in a process of its own, started by a_damaged_blob_claiming_a_huge_length_is_refused_before_allocating_it"]
fn inner_damaged_blobs_allocate_nothing() {
    if std::env::var_os(PEAK_ENV).is_none() {
        return;
    }
    let peak_kib = || -> u64 {
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let scratch = tempfile::tempdir().unwrap();
    let tier = open(&db_path(&scratch));
    let claimed: u64 = 1 << 30;
    let garbage = vec![0x55u8; 32 << 10];
    // One zstd frame (encoding 1) of 32 KiB claiming 1 GiB, within the largest ratio zstd
    // reaches.
    let frame = [&[1u8][..], &claimed.to_le_bytes(), &garbage].concat();
    // Two frames (encoding 4): pieces of 512 MiB, each stored in 16 KiB.
    let table: Vec<u8> = [16u32 << 10; 2].iter().flat_map(|m| m.to_le_bytes()).collect();
    let split = [&[4u8][..], &claimed.to_le_bytes(), &(512u32 << 20).to_le_bytes(), &table, &garbage].concat();
    // Chunked (encoding 3): a manifest of 1,028 chunks, each said to be stored in 1 KiB,
    // and no chunk.
    let chunks = claimed.div_ceil(CHUNK as u64);
    let stored: Vec<u8> = (0..chunks).flat_map(|_| 1024u32.to_le_bytes()).collect();
    let manifest = [&[3u8][..], &claimed.to_le_bytes(), &(CHUNK as u32).to_le_bytes(), &stored].concat();
    for (id, what, blob) in [(1, "frame", frame), (2, "split", split), (3, "manifest", manifest)] {
        write_raw_blob(tier.path(), id, &blob);
        let before = peak_kib();
        let got = tier.get(&ObjectRef { id: ObjectId(id), len: 0, slot: ObjectRef::UNKNOWN_SLOT, held: 0 });
        let grew_mib = (peak_kib() - before) >> 10;
        assert!(matches!(got, Err(Error::Corrupt { .. })), "{what}: {got:?}");
        assert!(grew_mib < 64, "{what}: a get of a damaged blob of {} KiB took {grew_mib} MiB", blob.len() >> 10);
    }
}

#[test]
fn a_lazy_tier_opens_its_database_at_its_first_operation() {
    let scratch = tempfile::tempdir().unwrap();
    let path = db_path(&scratch);
    let lazy = RedbTier::new(RedbConfig::new(&path).open_lazily()).unwrap();
    assert!(!path.exists(), "nothing is made before the first operation");
    // Destroying a tier that never opened a file that was never made is a no-op, and
    // makes none.
    lazy.destroy().unwrap();
    assert!(!path.exists());

    let r = put(&lazy, 1, b"first");
    assert!(path.exists());
    let eager = open(&path);
    assert_eq!(get(&eager, &r).as_deref(), Some(&b"first"[..]));

    // A lazy tier over a file another instance made reads it at its first operation.
    let reader = RedbTier::new(RedbConfig::new(&path).open_lazily()).unwrap();
    assert_eq!(get(&reader, &r).as_deref(), Some(&b"first"[..]));
    assert_eq!(reader.usage().unwrap().objects, 1);

    // One never used destroys the file it finds.
    let destroyer = RedbTier::new(RedbConfig::new(&path).open_lazily()).unwrap();
    destroyer.destroy().unwrap();
    assert!(!path.exists());
    assert_eq!(get(&lazy, &r), None, "every instance finds the objects gone");
}

#[test]
fn a_lazy_tier_reports_a_bad_file_at_each_operation_and_leaves_it_alone() {
    let scratch = tempfile::tempdir().unwrap();
    let notes = scratch.path().join("notes.txt");
    fs::write(&notes, b"not a database, just some notes").unwrap();
    let target = scratch.path().join("victim");
    fs::write(&target, b"untouched").unwrap();
    let link = scratch.path().join("link.redb");
    symlink(&target, &link).unwrap();
    let r = ObjectRef { id: ObjectId(1), len: 5, slot: 0, held: 5 };
    for (path, name) in [(&notes, "notes.txt"), (&link, "link.redb")] {
        let tier = RedbTier::new(RedbConfig::new(path).open_lazily()).unwrap();
        let parts: [&[u8]; 1] = [b"value"];
        let put = tier.put(NewObject { id: ObjectId(1), len: 5, data: ObjectData::Parts(&parts) });
        for result in [put.map(|_| ()), tier.get(&r).map(|_| ()), tier.delete(&r).map(|_| ()), tier.usage().map(|_| ())]
        {
            let err = result.unwrap_err();
            assert!(matches!(err, Error::Io { .. }), "{name}: {err:?}");
            assert!(err.to_string().contains(name), "{name}: {err}");
        }
        assert!(tier.destroy().is_err(), "{name}");
    }
    assert_eq!(fs::read(&notes).unwrap(), b"not a database, just some notes");
    assert_eq!(fs::read(&target).unwrap(), b"untouched");
}
