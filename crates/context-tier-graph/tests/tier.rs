//! `GraphTier` beyond the conformance kit: its directory, files and limits.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use context_core::{
    Capabilities, Error, NewObject, ObjectData, ObjectId, ObjectRef, PutOutcome, StorageKind, StorageTier, TierUsage,
};
use context_tier_graph::{GraphConfig, GraphTier};

fn put(tier: &GraphTier, id: u64, bytes: &[u8]) -> ObjectRef {
    let object = NewObject { id: ObjectId(id), len: bytes.len() as u64, data: ObjectData::Parts(&[bytes]) };
    match tier.put(object).unwrap() {
        PutOutcome::Stored(r) => r,
        PutOutcome::NoSpace => panic!("no space"),
    }
}

#[test]
fn declares_what_it_is() {
    let scratch = tempfile::tempdir().unwrap();
    let tier = GraphTier::new(GraphConfig::new(scratch.path().join("g"))).unwrap();
    assert_eq!(tier.name(), "graph");
    assert_eq!(tier.kind(), StorageKind::Disk);
    assert_eq!(tier.capabilities(), Capabilities::new(true, true));
    assert_eq!(tier.footprint(0), 0);
    assert_eq!(tier.footprint(1), 4096);
    assert_eq!(tier.footprint(4097), 8192);
    assert_eq!(tier.footprint(u64::MAX), u64::MAX);
    assert_eq!(tier.dir(), scratch.path().join("g"));
}

#[test]
fn files_are_private_and_named_by_id() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("g");
    let tier = GraphTier::new(GraphConfig::new(&dir)).unwrap();
    assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    let r = put(&tier, 0xab, br#"{"1":{"class_type":"A","inputs":{}}}"#);
    let path = dir.join("00000000000000ab.val");
    assert_eq!(tier.locate(&r).path.as_deref(), Some(path.as_path()));
    assert_eq!(tier.locate(&r).shm_name, None);
    assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(fs::read(&path).unwrap(), br#"{"1":{"class_type":"A","inputs":{}}}"#);
    assert_eq!(r.held, 4096);
    // A second tier over the same directory (another process) sees the object.
    let other = GraphTier::new(GraphConfig::new(&dir)).unwrap();
    assert_eq!(other.get(&r).unwrap().unwrap().to_vec(), fs::read(&path).unwrap());
}

#[test]
fn usage_counts_only_graph_files() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("g");
    let tier = GraphTier::new(GraphConfig::new(&dir)).unwrap();
    put(&tier, 1, &[7; 5000]);
    fs::write(dir.join("notes.txt"), b"not an object").unwrap();
    fs::create_dir(dir.join("sub.val")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", dir.join("link.val")).unwrap();
    assert_eq!(tier.usage().unwrap(), TierUsage { bytes: 8192, objects: 1 });
}

#[test]
fn refuses_a_bad_directory() {
    let scratch = tempfile::tempdir().unwrap();
    // A missing parent.
    let err = GraphTier::new(GraphConfig::new(scratch.path().join("missing/g"))).unwrap_err();
    assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("missing/g"), "{err}");
    // A symbolic link to a directory.
    let real = scratch.path().join("real");
    fs::create_dir(&real).unwrap();
    let link = scratch.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let err = GraphTier::new(GraphConfig::new(&link)).unwrap_err();
    assert!(err.to_string().contains("symbolic link"), "{err}");
    // A file.
    let file = scratch.path().join("file");
    fs::write(&file, b"").unwrap();
    let err = GraphTier::new(GraphConfig::new(&file)).unwrap_err();
    assert!(err.to_string().contains("not a directory"), "{err}");
}

#[test]
fn refuses_a_directory_of_another_user() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("theirs");
    fs::create_dir(&dir).unwrap();
    let me = fs::metadata(&dir).unwrap().uid();
    let other = if me == 0 { 65534 } else { 0 };
    if std::os::unix::fs::chown(&dir, Some(other), None).is_err() {
        eprintln!("skipped: cannot give a directory away without root");
        return;
    }
    let err = GraphTier::new(GraphConfig::new(&dir)).unwrap_err();
    assert!(err.to_string().contains("owned by uid"), "{err}");
}

#[test]
fn oversized_objects_are_refused() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("g");
    let tier = GraphTier::new(GraphConfig::new(&dir)).unwrap();
    // A put over the limit fails before the data is asked for or a file is made.
    let len = (64 << 20) + 4097;
    let mut write = |_: &mut dyn std::io::Write| -> context_core::Result<()> { panic!("the data was asked for") };
    let err = tier.put(NewObject { id: ObjectId(1), len, data: ObjectData::Write(&mut write) }).unwrap_err();
    assert!(err.to_string().contains("limit"), "{err}");
    assert_eq!(tier.usage().unwrap(), TierUsage::default());
    // The largest object is fine: checked without writing 64 MiB, as a sparse file. (Files
    // of the mmap tier start an object of 64 KiB or more 96 bytes in.)
    const OFFSET: u64 = context_core::record::LARGE_RECORD_OFFSET;
    let max = ObjectRef { id: ObjectId(2), len: (64 << 20) + 4096, slot: 0, held: 0 };
    fs::File::create(dir.join("0000000000000002.val")).unwrap().set_len(OFFSET + max.len).unwrap();
    assert_eq!(tier.get(&max).unwrap().unwrap().len() as u64, max.len);
    // A file grown past the limit behind the tier's back reads as corrupt.
    let big = ObjectRef { id: ObjectId(3), len: (64 << 20) + 4097, slot: 0, held: 0 };
    fs::File::create(dir.join("0000000000000003.val")).unwrap().set_len(OFFSET + big.len).unwrap();
    let err = tier.get(&big).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
}

#[test]
fn get_does_not_follow_symbolic_links() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("g");
    let tier = GraphTier::new(GraphConfig::new(&dir)).unwrap();
    let outside = scratch.path().join("secret");
    fs::write(&outside, b"secret").unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("0000000000000005.val")).unwrap();
    let r = ObjectRef { id: ObjectId(5), len: 6, slot: 0, held: 0 };
    assert!(tier.get(&r).is_err());
}

#[test]
fn destroy_does_not_follow_symbolic_links() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("g");
    let tier = GraphTier::new(GraphConfig::new(&dir)).unwrap();
    let r = put(&tier, 1, b"recipe");
    let outside = scratch.path().join("keep");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("precious.val"), b"keep me").unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("escape")).unwrap();
    tier.destroy().unwrap();
    assert!(!dir.exists());
    assert_eq!(fs::read(outside.join("precious.val")).unwrap(), b"keep me");
    assert!(tier.get(&r).unwrap().is_none());
    assert_eq!(tier.usage().unwrap(), TierUsage::default());
    tier.destroy().unwrap();
}
