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
    for (id, r) in [(1, put(&tier, 1, &repeated)), (2, put_streamed(&tier, 2, &repeated))] {
        assert!(r.held < 1 << 12, "1 MiB of a repeated pattern is held in {} bytes", r.held);
        assert_eq!(get(&tier, &r).as_deref(), Some(&repeated[..]));
        assert_eq!(raw_blob(tier.path(), id).unwrap()[0], 1, "one zstd frame");
    }
    let log = text(300_000);
    let r = put(&tier, 3, &log);
    assert!(r.held < log.len() as u64 / 4, "{} bytes of text held in {}", log.len(), r.held);
    assert_eq!(get(&tier, &r).as_deref(), Some(&log[..]));
    tier.destroy().unwrap();
}

#[test]
fn incompressible_values_are_stored_raw() {
    let scratch = tempfile::tempdir().unwrap();
    let tier = open(&db_path(&scratch));
    for (i, len) in [0usize, 1, 50, 4096, 1 << 20, (6 << 20) + 1].into_iter().enumerate() {
        let bytes = pattern(i as u64, len);
        let r = if i % 2 == 0 { put(&tier, i as u64, &bytes) } else { put_streamed(&tier, i as u64, &bytes) };
        assert_eq!(r.held, len as u64 + 9, "{len} random bytes");
        assert!(r.held <= tier.footprint(len as u64));
        assert_eq!(raw_blob(tier.path(), i as u64).unwrap()[0], 0, "stored raw");
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
        assert_eq!(raw_blob(tier.path(), r.id.0).unwrap()[0], 2, "object {} is chunked", r.id);
        assert!(get(&tier, &r).as_deref() == Some(&bytes[..]), "object {} read back different", r.id);
    }
    assert_eq!(raw_blob(tier.path(), 1), raw_blob(tier.path(), 2), "streamed and whole encode alike");
    assert_eq!(raw_blob(tier.path(), 1), raw_blob(tier.path(), 3), "split parts encode alike");
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

    let mut damaged: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("short header", vec![0, 1, 2]),
        ("unknown encoding", vec![7; 40]),
        ("raw, wrong length", [&[0u8][..], &100u64.to_le_bytes(), &[1; 10]].concat()),
        ("frame, garbage", [&[1u8][..], &1000u64.to_le_bytes(), &[0x55; 50]].concat()),
        ("frame, huge length", [&[1u8][..], &(1u64 << 50).to_le_bytes(), &good_blob[9..]].concat()),
        ("truncated frame", good_blob[..good_blob.len() - 3].to_vec()),
        ("truncated chunks", chunked_blob[..chunked_blob.len() / 2].to_vec()),
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
