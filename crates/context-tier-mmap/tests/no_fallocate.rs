//! A full file system without `fallocate` (ext2: no extents) is `PutOutcome::NoSpace` too.
//!
//! The outer test re-runs this test binary in a private mount namespace with a 2 MiB ext2
//! image mounted (loop) as the value directory; it skips (and passes) where that is not
//! allowed or `mkfs.ext2` is missing.

use std::path::PathBuf;

use context_core::testing::{Sandboxed, in_private_ext2};
use context_core::{NewObject, ObjectData, ObjectId, PutOutcome, StorageTier};
use context_tier_mmap::{MmapConfig, MmapTier};

const DIR_VAR: &str = "CONTEXT_TIER_MMAP_EXT2_DIR";
const DONE: &str = "no-fallocate checks ran";

#[test]
fn full_file_system_without_fallocate_is_no_space() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("values");
    std::fs::create_dir(&dir).unwrap();
    match in_private_ext2("no_fallocate_inner", &dir, 2 << 20, &[(DIR_VAR, dir.as_os_str())]) {
        Sandboxed::Ran(stdout) => assert!(stdout.contains(DONE), "the checks did not run:\n{stdout}"),
        Sandboxed::Skipped(why) => println!("SKIPPED full_file_system_without_fallocate_is_no_space: {why}"),
    }
}

#[test]
#[ignore = "run by full_file_system_without_fallocate_is_no_space inside a private mount namespace"]
fn no_fallocate_inner() {
    let Some(dir) = std::env::var_os(DIR_VAR).map(PathBuf::from) else {
        println!("{DIR_VAR} is not set; nothing to check");
        return;
    };
    let tier = MmapTier::new(MmapConfig::new(dir.join("values"))).unwrap();
    // 100 KiB values until the 2 MiB file system is full: every put is Stored or NoSpace.
    let bytes = vec![5u8; 100 << 10];
    let parts: [&[u8]; 1] = [&bytes];
    let mut stored = 0;
    for id in 0..100u64 {
        match tier.put(NewObject { id: ObjectId(id), len: bytes.len() as u64, data: ObjectData::Parts(&parts) }) {
            Ok(PutOutcome::Stored(_)) => stored += 1,
            Ok(PutOutcome::NoSpace) => break,
            Err(e) => panic!("after {stored} values, a full file system without fallocate gave an error: {e}"),
        }
    }
    assert!(stored > 0 && stored < 100, "{stored} values stored");
    assert_eq!(tier.usage().unwrap().objects, stored, "a refused put left a file");
    println!("{DONE}");
}
