//! A full file system is `PutOutcome::NoSpace` with nothing left behind.
//!
//! The outer test re-runs this test binary in a private mount namespace with a 1 MiB tmpfs
//! as the value directory; it skips (and passes) where namespaces or mounts are not allowed.

use std::path::PathBuf;

use context_core::testing::{Sandboxed, in_private_tmpfs};
use context_core::{NewObject, ObjectData, ObjectId, ObjectRef, PutOutcome, StorageTier};
use context_tier_mmap::{MmapConfig, MmapTier};

const DIR_VAR: &str = "CONTEXT_TIER_MMAP_NOSPACE_DIR";
const DONE: &str = "no-space checks ran";

#[test]
fn full_file_system_is_no_space() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("values");
    std::fs::create_dir(&dir).unwrap();
    match in_private_tmpfs("no_space_inner", &dir, "1m", &[(DIR_VAR, dir.as_os_str())]) {
        Sandboxed::Ran(stdout) => assert!(stdout.contains(DONE), "the checks did not run:\n{stdout}"),
        Sandboxed::Skipped(why) => println!("SKIPPED full_file_system_is_no_space: {why}"),
    }
}

/// Runs inside the private mount namespace, with a 1 MiB tmpfs at `$CONTEXT_TIER_MMAP_NOSPACE_DIR`.
#[test]
#[ignore = "run by full_file_system_is_no_space inside a private mount namespace"]
fn no_space_inner() {
    let Some(dir) = std::env::var_os(DIR_VAR).map(PathBuf::from) else {
        println!("{DIR_VAR} is not set; nothing to check");
        return;
    };
    let tier = MmapTier::new(MmapConfig::new(&dir)).unwrap();
    let len = 4u64 << 20;
    let big = vec![7u8; len as usize];
    let parts: [&[u8]; 1] = [&big];

    let outcome = tier.put(NewObject { id: ObjectId(1), len, data: ObjectData::Parts(&parts) }).unwrap();
    assert_eq!(outcome, PutOutcome::NoSpace);

    let mut called = false;
    let mut fill = |out: &mut dyn std::io::Write| {
        called = true;
        out.write_all(&vec![1u8; len as usize]).map_err(|e| context_core::Error::io("test write", "value", e))
    };
    let outcome = tier.put(NewObject { id: ObjectId(2), len, data: ObjectData::Write(&mut fill) }).unwrap();
    assert_eq!(outcome, PutOutcome::NoSpace);
    assert!(!called, "the fill ran although there was no space");

    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
    assert_eq!(tier.usage().unwrap().objects, 0);
    for id in [1, 2] {
        assert!(tier.get(&ObjectRef { id: ObjectId(id), len, slot: 0, held: 0 }).unwrap().is_none());
    }

    // The tier still works for what fits.
    let small = vec![3u8; 100_000];
    let parts: [&[u8]; 1] = [&small];
    let PutOutcome::Stored(r) =
        tier.put(NewObject { id: ObjectId(3), len: 100_000, data: ObjectData::Parts(&parts) }).unwrap()
    else {
        panic!("100 KB did not fit in 1 MiB")
    };
    assert_eq!(tier.get(&r).unwrap().as_deref(), Some(&small[..]));
    println!("{DONE}");
}
