//! Behaviour of `MmapTier` beyond the conformance kit: sharing, permissions, symbolic links
//! and files changed behind the tier's back.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::PathBuf;

use context_core::{Error, NewObject, ObjectData, ObjectId, ObjectRef, PutOutcome, StorageKind, StorageTier};
use context_tier_mmap::{MmapConfig, MmapTier};

fn put(tier: &MmapTier, id: u64, bytes: &[u8]) -> ObjectRef {
    let parts: [&[u8]; 1] = [bytes];
    match tier.put(NewObject { id: ObjectId(id), len: bytes.len() as u64, data: ObjectData::Parts(&parts) }) {
        Ok(PutOutcome::Stored(r)) => r,
        other => panic!("put of object {id} failed: {other:?}"),
    }
}

fn value_dir(scratch: &tempfile::TempDir) -> PathBuf {
    scratch.path().join("values")
}

#[test]
fn describes_itself() {
    let scratch = tempfile::tempdir().unwrap();
    let tier = MmapTier::new(MmapConfig::new(value_dir(&scratch))).unwrap();
    assert_eq!(tier.name(), "mmap");
    assert_eq!(tier.kind(), StorageKind::Disk);
    assert!(tier.capabilities().zero_copy && tier.capabilities().shared_across_processes);
    assert_eq!(tier.dir(), value_dir(&scratch));
    assert_eq!([0, 1, 4096, 4097, u64::MAX].map(|n| tier.footprint(n)), [0, 4096, 4096, 8192, u64::MAX]);
    // From 64 KiB an object starts 96 bytes into its file.
    assert_eq!([65_535, 65_536, 65_537].map(|n| tier.footprint(n)), [65_536, 69_632, 69_632]);
    assert_eq!([130_976, 130_977].map(|n| tier.footprint(n)), [131_072, 135_168]);
    let r = ObjectRef { id: ObjectId(0xab), len: 3, slot: 0, held: 0 };
    assert_eq!(tier.locate(&r).path, Some(value_dir(&scratch).join("00000000000000ab.val")));
    assert_eq!(tier.locate(&r).shm_name, None);
}

#[test]
fn two_instances_share_one_directory() {
    let scratch = tempfile::tempdir().unwrap();
    let a = MmapTier::new(MmapConfig::new(value_dir(&scratch))).unwrap();
    let b = MmapTier::new(MmapConfig::new(value_dir(&scratch))).unwrap();
    let small = put(&a, 1, b"small");
    let large_bytes = context_core::testing::pattern(2, 200_000);
    let large = put(&b, 2, &large_bytes);
    assert_eq!(b.get(&small).unwrap().as_deref(), Some(&b"small"[..]));
    assert_eq!(a.get(&large).unwrap().as_deref(), Some(&large_bytes[..]));
    assert_eq!(a.usage().unwrap(), b.usage().unwrap());
    assert_eq!(a.usage().unwrap().objects, 2);

    let held = a.get(&large).unwrap().unwrap();
    assert!(b.delete(&large).unwrap());
    assert!(a.get(&large).unwrap().is_none());
    assert!(!a.delete(&large).unwrap());
    assert!(*held == *large_bytes, "a held mapping changed after another instance deleted its file");

    b.destroy().unwrap();
    assert!(a.get(&small).unwrap().is_none());
    assert_eq!(a.usage().unwrap().objects, 0);
    a.destroy().unwrap();
}

#[test]
fn files_are_private() {
    let scratch = tempfile::tempdir().unwrap();
    let tier = MmapTier::new(MmapConfig::new(value_dir(&scratch))).unwrap();
    let r = put(&tier, 7, b"secret");
    let mut fill =
        |out: &mut dyn std::io::Write| out.write_all(&[1u8; 100_000]).map_err(|e| Error::io("test write", "value", e));
    let PutOutcome::Stored(f) =
        tier.put(NewObject { id: ObjectId(8), len: 100_000, data: ObjectData::Write(&mut fill) }).unwrap()
    else {
        panic!("no space")
    };
    let mode = |p: PathBuf| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(tier.dir().to_owned()), 0o700);
    assert_eq!(mode(tier.locate(&r).path.unwrap()), 0o600);
    assert_eq!(mode(tier.locate(&f).path.unwrap()), 0o600);
    tier.destroy().unwrap();
}

#[test]
fn put_does_not_write_through_a_planted_symlink() {
    let scratch = tempfile::tempdir().unwrap();
    let tier = MmapTier::new(MmapConfig::new(value_dir(&scratch))).unwrap();
    let target = scratch.path().join("victim");
    fs::write(&target, b"untouched").unwrap();
    let id = ObjectId(5);
    let link = tier.locate(&ObjectRef { id, len: 0, slot: 0, held: 0 }).path.unwrap();
    symlink(&target, &link).unwrap();

    let bytes = [b'x'; 32];
    let parts: [&[u8]; 1] = [&bytes];
    let result = tier.put(NewObject { id, len: 32, data: ObjectData::Parts(&parts) });
    assert!(matches!(result, Err(Error::Io { .. })), "put through a symlink gave {result:?}");
    let mut fill =
        |out: &mut dyn std::io::Write| out.write_all(&[b'y'; 32]).map_err(|e| Error::io("test write", "value", e));
    let result = tier.put(NewObject { id, len: 32, data: ObjectData::Write(&mut fill) });
    assert!(result.is_err(), "fill through a symlink gave {result:?}");
    assert_eq!(fs::read(&target).unwrap(), b"untouched");
    assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the planted link was replaced");

    // Reads refuse the link too, rather than returning the target's bytes.
    assert!(tier.get(&ObjectRef { id, len: 32, slot: 0, held: 0 }).is_err());
    tier.destroy().unwrap();
    assert_eq!(fs::read(&target).unwrap(), b"untouched");
}

#[test]
fn new_refuses_a_symlinked_directory() {
    let scratch = tempfile::tempdir().unwrap();
    let real = scratch.path().join("real");
    fs::create_dir(&real).unwrap();
    let link = scratch.path().join("link");
    symlink(&real, &link).unwrap();
    let err = MmapTier::new(MmapConfig::new(&link)).unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
    assert!(err.to_string().contains(&*link.to_string_lossy()), "{err}");
    assert!(err.to_string().contains("symbolic link"), "{err}");

    let file = scratch.path().join("file");
    fs::write(&file, b"").unwrap();
    let err = MmapTier::new(MmapConfig::new(&file)).unwrap_err();
    assert!(err.to_string().contains("not a directory"), "{err}");

    let err = MmapTier::new(MmapConfig::new(scratch.path().join("missing/values"))).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}

/// Where an object of 64 KiB or more starts in its file: so that a context record's payload,
/// after its 32-byte header, starts 128 bytes into a page.
const MAPPED_OFFSET: usize = context_core::record::LARGE_RECORD_OFFSET as usize;

#[test]
fn a_small_objects_file_grown_longer_reads_one_byte_more_and_odd_files_never_hang() {
    let scratch = tempfile::tempdir().unwrap();
    let tier = MmapTier::new(MmapConfig::new(value_dir(&scratch))).unwrap();
    let bytes = context_core::testing::pattern(1, 1000);
    let r = put(&tier, 1, &bytes);
    let path = tier.locate(&r).path.unwrap();
    let mut grown = bytes.clone();
    grown.extend_from_slice(&[9; 5000]);
    fs::write(&path, &grown).unwrap();
    // Longer than the object: one byte more than it, which no record check passes.
    assert_eq!(&*tier.get(&r).unwrap().unwrap(), &grown[..1001]);
    // A directory or a FIFO where a small object's file should be: an error naming the
    // file, or nothing read; never a hang.
    let dir = ObjectRef { id: ObjectId(2), len: 10, slot: 0, held: 0 };
    fs::create_dir(tier.dir().join("0000000000000002.val")).unwrap();
    let err = tier.get(&dir).unwrap_err();
    assert!(err.to_string().contains("0000000000000002.val"), "{err}");
    let fifo = ObjectRef { id: ObjectId(3), len: 10, slot: 0, held: 0 };
    let at = tier.dir().join("0000000000000003.val");
    rustix::fs::mknodat(rustix::fs::CWD, &at, rustix::fs::FileType::Fifo, rustix::fs::Mode::from_raw_mode(0o600), 0)
        .unwrap();
    match tier.get(&fifo) {
        Ok(Some(p)) => assert!(p.is_empty(), "a FIFO read as {} bytes", p.len()),
        other => assert!(other.is_err(), "{other:?}"),
    }
}

#[test]
fn get_returns_a_truncated_file_at_its_real_length() {
    let scratch = tempfile::tempdir().unwrap();
    let tier = MmapTier::new(MmapConfig::new(value_dir(&scratch))).unwrap();
    let cases = [
        (1u64, 1000usize, 0usize, 10usize),
        (2, 300_000, MAPPED_OFFSET, 100_000),
        (3, 300_000, MAPPED_OFFSET, 10),
        (4, 300_000, MAPPED_OFFSET, 0),
    ];
    for (id, len, offset, short) in cases {
        let bytes = context_core::testing::pattern(id, len);
        let r = put(&tier, id, &bytes);
        let file = fs::OpenOptions::new().write(true).open(tier.locate(&r).path.unwrap()).unwrap();
        file.set_len((offset + short) as u64).unwrap();
        let got = tier.get(&r).unwrap().unwrap();
        assert_eq!(got.len(), short, "object {id} truncated to {short} bytes");
        assert_eq!(&*got, &bytes[..short]);
    }
    // Cut short before the object starts: none of it is there.
    let bytes = context_core::testing::pattern(5, 300_000);
    let r = put(&tier, 5, &bytes);
    let before = (MAPPED_OFFSET - 10) as u64;
    fs::OpenOptions::new().write(true).open(tier.locate(&r).path.unwrap()).unwrap().set_len(before).unwrap();
    assert_eq!(tier.get(&r).unwrap().unwrap().len(), 0);
    tier.destroy().unwrap();
}

#[test]
fn a_large_objects_record_payload_starts_128_bytes_into_a_page() {
    let scratch = tempfile::tempdir().unwrap();
    let tier = MmapTier::new(MmapConfig::new(value_dir(&scratch))).unwrap();
    for (id, len) in [(1u64, 64 * 1024 - 1), (2, 64 * 1024), (3, 1 << 20)] {
        let bytes = context_core::testing::pattern(id, len);
        let r = put(&tier, id, &bytes);
        let file = fs::read(tier.locate(&r).path.unwrap()).unwrap();
        let offset = if len >= 64 * 1024 { MAPPED_OFFSET } else { 0 };
        let got = tier.get(&r).unwrap().unwrap();
        context_core::testing::check_stored_at(&format!("object {id}"), &file, offset, &bytes, &got);
        assert_eq!(r.held, tier.footprint(len as u64), "object {id}");
        assert!(tier.footprint(len as u64) >= (offset + len) as u64);
    }
    let usage = tier.usage().unwrap();
    assert_eq!(usage.objects, 3);
    assert_eq!(usage.bytes, [64 * 1024 - 1, 64 * 1024, 1 << 20].map(|n| tier.footprint(n)).iter().sum::<u64>());
    tier.destroy().unwrap();
}

#[test]
fn destroy_leaves_a_replaced_directory_alone() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = value_dir(&scratch);
    let tier = MmapTier::new(MmapConfig::new(&dir)).unwrap();
    put(&tier, 1, b"x");
    let elsewhere = scratch.path().join("elsewhere");
    fs::rename(&dir, &elsewhere).unwrap();
    symlink(&elsewhere, &dir).unwrap();
    assert!(tier.destroy().is_err());
    assert!(elsewhere.join("0000000000000001.val").exists());
}

#[test]
fn usage_ignores_foreign_entries() {
    let scratch = tempfile::tempdir().unwrap();
    let tier = MmapTier::new(MmapConfig::new(value_dir(&scratch))).unwrap();
    put(&tier, 1, &[0; 5000]);
    fs::write(tier.dir().join("notes.txt"), b"not a value").unwrap();
    fs::create_dir(tier.dir().join("sub.val")).unwrap();
    symlink("/etc/passwd", tier.dir().join("link.val")).unwrap();
    let usage = tier.usage().unwrap();
    assert_eq!((usage.objects, usage.bytes), (1, 8192));
    tier.destroy().unwrap();
    assert!(!tier.dir().exists());
    tier.destroy().unwrap();
}

#[test]
fn a_tier_keeps_to_its_directory_once_another_takes_its_path() {
    // A context is shut down (its directory moved away and removed) and the next context of
    // the same run id makes a directory at the same path, with objects of the same ids: a
    // tier built over the first never touches the second's files.
    let scratch = tempfile::tempdir().unwrap();
    let dir = value_dir(&scratch);
    let old = MmapTier::new(MmapConfig::new(&dir)).unwrap();
    let kept = put(&old, 1, b"the old context's");
    fs::rename(&dir, scratch.path().join("moved away")).unwrap();
    let new = MmapTier::new(MmapConfig::new(&dir)).unwrap();
    let theirs = [put(&new, 1, b"the new context's 1"), put(&new, 2, b"the new context's 2")];

    assert_eq!(&*old.get(&kept).unwrap().unwrap(), b"the old context's");
    assert!(old.get(&theirs[1]).unwrap().is_none(), "read a file of the new directory");
    assert!(old.delete(&theirs[1]).is_ok_and(|existed| !existed));
    put(&old, 3, b"late");
    assert_eq!(old.usage().unwrap().objects, 2, "old: objects 1 and 3");
    assert!(old.destroy().is_err(), "destroyed the directory now at its path");
    for r in &theirs {
        assert_eq!(new.get(r).unwrap().unwrap().len() as u64, r.len);
    }
    assert_eq!(new.usage().unwrap().objects, 2, "new: objects 1 and 2, and no object 3");

    // Once its directory is removed, it stores nothing, anywhere.
    fs::remove_dir_all(scratch.path().join("moved away")).unwrap();
    let parts: [&[u8]; 1] = [b"after removal"];
    let late = old.put(NewObject { id: ObjectId(4), len: 13, data: ObjectData::Parts(&parts) });
    assert!(late.is_err(), "{late:?}");
    assert!(!dir.join("0000000000000004.val").exists());
    assert!(old.get(&kept).unwrap().is_none());
    new.destroy().unwrap();
    assert!(!dir.exists());
}
