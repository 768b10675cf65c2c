//! A full file system is `PutOutcome::NoSpace` with nothing left behind, and the tier goes
//! on working for what fits.
//!
//! The outer test re-runs this test binary in a private mount namespace with a 1 MiB tmpfs
//! holding the database file; it skips (and passes) where namespaces or mounts are not
//! allowed.

use std::io::Write as _;
use std::path::PathBuf;

use context_core::testing::{self, Sandboxed, pattern};
use context_core::{NewObject, ObjectData, ObjectId, ObjectRef, PutOutcome, StorageTier, TierUsage};
use context_tier_redb::{RedbConfig, RedbTier};

const DIR_VAR: &str = "CONTEXT_TIER_REDB_NOSPACE_DIR";
const DONE: &str = "no-space checks ran";

#[test]
fn full_file_system_is_no_space() {
    in_private_tmpfs("no_space_inner", "1m");
}

#[test]
fn full_file_system_part_way_through_a_chunked_put_is_no_space() {
    in_private_tmpfs("no_space_chunked_inner", "12m");
}

#[test]
fn a_destroy_on_a_full_disk_empties_the_tier_and_gives_the_space_back() {
    in_private_tmpfs("destroy_on_a_full_disk_inner", "4m");
}

#[test]
fn space_a_delete_frees_on_a_full_disk_is_reused() {
    in_private_tmpfs("freed_space_inner", "16m");
}

#[test]
fn a_failed_chunked_put_on_a_disk_without_holes_leaves_room_for_later_puts() {
    in_private_mount(MountKind::Ext2(24 << 20), "failed_chunked_put_on_ext2_inner");
}

/// Runs this binary's ignored test `inner` with a tmpfs of `size` at `$CONTEXT_TIER_REDB_NOSPACE_DIR`.
fn in_private_tmpfs(inner: &str, size: &str) {
    in_private_mount(MountKind::Tmpfs(size), inner);
}

/// What [`in_private_mount`] mounts.
enum MountKind<'a> {
    /// A tmpfs of this size (as `mount -o size=` takes it).
    Tmpfs(&'a str),
    /// An ext2 file system of this many bytes: one that cannot punch holes.
    Ext2(u64),
}

/// Runs this binary's ignored test `inner` with a file system of `kind` at
/// `$CONTEXT_TIER_REDB_NOSPACE_DIR`.
fn in_private_mount(kind: MountKind<'_>, inner: &str) {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("mnt");
    std::fs::create_dir(&dir).unwrap();
    let envs = [(DIR_VAR, dir.as_os_str())];
    let outcome = match kind {
        MountKind::Tmpfs(size) => testing::in_private_tmpfs(inner, &dir, size, &envs),
        MountKind::Ext2(bytes) => testing::in_private_ext2(inner, &dir, bytes, &envs),
    };
    match outcome {
        Sandboxed::Ran(stdout) => assert!(stdout.contains(DONE), "the checks did not run:\n{stdout}"),
        Sandboxed::Skipped(why) => println!("SKIPPED {inner}: {why}"),
    }
}

fn put_parts(tier: &RedbTier, id: u64, bytes: &[u8]) -> PutOutcome {
    let parts: [&[u8]; 1] = [bytes];
    tier.put(NewObject { id: ObjectId(id), len: bytes.len() as u64, data: ObjectData::Parts(&parts) }).unwrap()
}

/// Puts `len` bytes of pattern `id` through `writer`, which must store them (`when` says in
/// what state, for the panic), and checks that `reader` reads them back.
fn stored_and_read_back(writer: &RedbTier, reader: &RedbTier, id: u64, len: usize, when: &str) -> ObjectRef {
    let bytes = pattern(id, len);
    let outcome = put_parts(writer, id, &bytes);
    let PutOutcome::Stored(r) = outcome else { panic!("{len} bytes {when}: {outcome:?}") };
    assert!(reader.get(&r).unwrap().as_deref() == Some(&bytes[..]), "{len} bytes {when} read back wrong");
    r
}

fn id_ref(id: u64) -> ObjectRef {
    ObjectRef { id: ObjectId(id), len: 0, slot: ObjectRef::UNKNOWN_SLOT, held: 0 }
}

/// A tier on the database in `$CONTEXT_TIER_REDB_NOSPACE_DIR`, and a second instance on
/// it, as another process attached to the context would have; `None` outside the sandbox.
/// Also the directory and the database's path.
fn tiers_on_the_small_file_system() -> Option<(PathBuf, PathBuf, RedbTier, RedbTier)> {
    let Some(dir) = std::env::var_os(DIR_VAR).map(PathBuf::from) else {
        println!("{DIR_VAR} is not set; nothing to check");
        return None;
    };
    let path = dir.join("context.redb");
    let (tier, peer) = (RedbTier::new(RedbConfig::new(&path)).unwrap(), RedbTier::new(RedbConfig::new(&path)).unwrap());
    Some((dir, path, tier, peer))
}

/// Runs inside the private mount namespace, with a 1 MiB tmpfs at `$CONTEXT_TIER_REDB_NOSPACE_DIR`.
#[test]
#[ignore = "run by full_file_system_is_no_space inside a private mount namespace"]
fn no_space_inner() {
    let Some((dir, path, tier, peer)) = tiers_on_the_small_file_system() else { return };
    let before = tier.usage().unwrap();
    let small = pattern(1, 10_000);
    let PutOutcome::Stored(first) = put_parts(&tier, 1, &small) else { panic!("10 KB did not fit in 1 MiB") };

    let len = 4u64 << 20;
    let big = pattern(2, len as usize);
    let blocks = || std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).unwrap());
    let blocks_before = blocks();
    assert_eq!(put_parts(&tier, 2, &big), PutOutcome::NoSpace);
    let mut fill = |out: &mut dyn std::io::Write| {
        out.write_all(&pattern(3, len as usize)).map_err(|e| context_core::Error::io("test write", "value", e))
    };
    let outcome = tier.put(NewObject { id: ObjectId(3), len, data: ObjectData::Write(&mut fill) }).unwrap();
    assert_eq!(outcome, PutOutcome::NoSpace);
    assert_eq!(put_parts(&peer, 4, &pattern(4, 3 << 20)), PutOutcome::NoSpace);
    // The failed transactions gave back the blocks they had filled.
    assert!(blocks() <= blocks_before, "{} blocks held after NoSpace, {blocks_before} before", blocks());

    for t in [&tier, &peer] {
        for id in [2, 3, 4] {
            assert!(t.get(&id_ref(id)).unwrap().is_none(), "object {id} left behind");
        }
        assert_eq!(t.usage().unwrap().objects, before.objects + 1);
        assert_eq!(t.get(&first).unwrap().as_deref(), Some(&small[..]));
    }

    // The tier still works for what fits, from both instances: small values, and large ones
    // that compress.
    for (t, id) in [(&tier, 5), (&peer, 6), (&tier, 7)] {
        let bytes = pattern(id, 20_000);
        let PutOutcome::Stored(r) = put_parts(t, id, &bytes) else { panic!("20 KB did not fit after NoSpace") };
        assert_eq!(tier.get(&r).unwrap().as_deref(), Some(&bytes[..]));
        assert_eq!(peer.get(&r).unwrap().as_deref(), Some(&bytes[..]));
    }
    let zeros = vec![0u8; 8 << 20];
    let PutOutcome::Stored(r) = put_parts(&tier, 8, &zeros) else { panic!("8 MiB of zeros did not compress to fit") };
    assert!(peer.get(&r).unwrap().as_deref() == Some(&zeros[..]));
    assert_eq!(tier.usage().unwrap(), peer.usage().unwrap());

    peer.destroy().unwrap();
    tier.destroy().unwrap();
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
    println!("{DONE}");
}

/// Runs inside the private mount namespace, with a 12 MiB tmpfs at
/// `$CONTEXT_TIER_REDB_NOSPACE_DIR`: large objects run out of space after some of their
/// chunks were committed.
#[test]
#[ignore = "run by full_file_system_part_way_through_a_chunked_put_is_no_space inside a private mount namespace"]
fn no_space_chunked_inner() {
    let Some((_, _, tier, peer)) = tiers_on_the_small_file_system() else { return };
    let small = pattern(1, 10_000);
    let PutOutcome::Stored(first) = put_parts(&tier, 1, &small) else { panic!("10 KB did not fit") };
    let before = tier.usage().unwrap();

    // 40 MiB that do not compress, into 12 MiB: a few batches of chunks commit, then the
    // file system is full. Whole, streamed, and from the other instance.
    let big = pattern(2, 40 << 20);
    assert_eq!(put_parts(&tier, 2, &big), PutOutcome::NoSpace);
    let mut fill = |out: &mut dyn std::io::Write| {
        big.chunks(100_000)
            .try_for_each(|p| out.write_all(p))
            .map_err(|e| context_core::Error::io("test write", "value", e))
    };
    let outcome =
        tier.put(NewObject { id: ObjectId(3), len: big.len() as u64, data: ObjectData::Write(&mut fill) }).unwrap();
    assert_eq!(outcome, PutOutcome::NoSpace);
    assert_eq!(put_parts(&peer, 4, &big[..20 << 20]), PutOutcome::NoSpace);
    for t in [&tier, &peer] {
        for id in [2, 3, 4] {
            assert!(t.get(&id_ref(id)).unwrap().is_none(), "object {id} left behind");
            assert!(!t.delete(&id_ref(id)).unwrap(), "object {id} left behind");
        }
        assert_eq!(t.usage().unwrap(), before, "chunks of a failed put left behind");
        assert_eq!(t.get(&first).unwrap().as_deref(), Some(&small[..]));
    }

    // The space the failed puts took is free again: large objects that fit are stored.
    for round in 0..3u64 {
        for (t, id) in [(&tier, 10 + 2 * round), (&peer, 11 + 2 * round)] {
            let bytes = pattern(id, 5 << 20);
            let PutOutcome::Stored(r) = put_parts(t, id, &bytes) else { panic!("5 MiB did not fit after NoSpace") };
            assert!(peer.get(&r).unwrap().as_deref() == Some(&bytes[..]));
            assert!(tier.delete(&r).unwrap());
        }
    }
    assert_eq!(tier.usage().unwrap(), before);
    peer.destroy().unwrap();
    tier.destroy().unwrap();
    println!("{DONE}");
}

#[test]
fn a_full_file_system_under_a_new_database_is_no_space_and_reads_go_on() {
    in_private_tmpfs("no_space_fresh_inner", "4m");
}

/// Appends to `path` until the file system is full; returns the bytes written.
fn fill(path: &std::path::Path) -> u64 {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
    let buf = vec![0x77u8; 1 << 20];
    let (mut total, mut block) = (0, buf.len());
    while block >= 512 {
        match file.write(&buf[..block]) {
            Ok(n) => total += n as u64,
            Err(_) => block /= 2,
        }
    }
    total
}

/// Runs inside the private mount namespace, with a 4 MiB tmpfs at `$CONTEXT_TIER_REDB_NOSPACE_DIR`.
#[test]
#[ignore = "run inside a private mount namespace by a_full_file_system_under_a_new_database_is_no_space_and_reads_go_on"]
fn no_space_fresh_inner() {
    let Some(dir) = std::env::var_os(DIR_VAR).map(PathBuf::from) else {
        println!("{DIR_VAR} is not set; nothing to check");
        return;
    };
    // A database nothing was ever stored in, then a file system that fills up but for 8 KiB.
    let path = dir.join("context.redb");
    let tier = RedbTier::new(RedbConfig::new(&path)).unwrap();
    let filler = dir.join("filler");
    fill(&filler);
    let full = std::fs::metadata(&filler).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&filler).unwrap().set_len(full - (8 << 10)).unwrap();
    let outcome =
        tier.put(NewObject { id: ObjectId(2), len: 1 << 20, data: ObjectData::Parts(&[&pattern(2, 1 << 20)]) });
    assert!(matches!(outcome, Ok(PutOutcome::NoSpace)), "a full file system is NoSpace: {outcome:?}");
    // The instance goes on reading and deleting, and another can attach.
    assert!(tier.get(&id_ref(2)).unwrap().is_none());
    assert!(!tier.delete(&id_ref(2)).unwrap());
    RedbTier::new(RedbConfig::new(&path)).unwrap();
    std::fs::remove_file(&filler).unwrap();
    assert!(matches!(put_parts(&tier, 3, b"fits again"), PutOutcome::Stored(_)));
    assert_eq!(&*tier.get(&id_ref(3)).unwrap().unwrap(), b"fits again");
    println!("{DONE}");
}

/// Runs inside the private mount namespace, with a 16 MiB tmpfs at
/// `$CONTEXT_TIER_REDB_NOSPACE_DIR`: the disk fills up, a large object is deleted to make
/// room, and what fits in its place is stored (redb reuses a page that a commit freed only
/// once a later commit has gone through: every put answered `NoSpace` until something else
/// was deleted).
#[test]
#[ignore = "run by space_a_delete_frees_on_a_full_disk_is_reused inside a private mount namespace"]
fn freed_space_inner() {
    let Some((dir, _, tier, peer)) = tiers_on_the_small_file_system() else { return };
    let PutOutcome::Stored(large) = put_parts(&tier, 1, &pattern(1, 10 << 20)) else { panic!("10 MiB did not fit") };
    let PutOutcome::Stored(small) = put_parts(&tier, 2, b"small") else { panic!("a small value did not fit") };
    fill(&dir.join("filler"));
    assert!(tier.delete(&large).unwrap());
    // In the room the deleted object left: one transaction, chunks, and from another
    // instance (another process).
    let puts: [(&RedbTier, u64, usize); 3] = [(&tier, 3, 2 << 20), (&tier, 4, 5 << 20), (&peer, 5, 2 << 20)];
    for (t, id, len) in puts {
        let r = stored_and_read_back(t, &tier, id, len, "in the room of 10 MiB deleted");
        assert!(t.delete(&r).unwrap());
    }
    assert_eq!(peer.get(&small).unwrap().as_deref(), Some(&b"small"[..]));
    std::fs::remove_file(dir.join("filler")).unwrap();
    peer.destroy().unwrap();
    tier.destroy().unwrap();
    println!("{DONE}");
}

/// Runs inside the private mount namespace, with an ext2 file system of 24 MiB at
/// `$CONTEXT_TIER_REDB_NOSPACE_DIR`, which cannot punch holes: a chunked put runs out of
/// space after some of its chunks were committed, and later puts reuse the space those took
/// (every later put, however small, answered `NoSpace`).
#[test]
#[ignore = "run by a_failed_chunked_put_on_a_disk_without_holes_leaves_room_for_later_puts inside a private mount namespace"]
fn failed_chunked_put_on_ext2_inner() {
    let Some((_, _, tier, peer)) = tiers_on_the_small_file_system() else { return };
    let PutOutcome::Stored(first) = put_parts(&tier, 1, b"small") else { panic!("a small value did not fit") };
    let big = pattern(2, 40 << 20);
    assert_eq!(put_parts(&tier, 2, &big), PutOutcome::NoSpace);
    assert_eq!(tier.usage().unwrap().objects, 1, "chunks of a failed put left behind");
    for (t, id, len) in [(&tier, 3, 100_000), (&peer, 4, 5 << 20), (&tier, 5, 10 << 20)] {
        stored_and_read_back(t, &peer, id, len, "after a failed put");
    }
    assert_eq!(tier.get(&first).unwrap().as_deref(), Some(&b"small"[..]));
    peer.destroy().unwrap();
    tier.destroy().unwrap();
    println!("{DONE}");
}

/// Runs inside the private mount namespace, with a 4 MiB tmpfs at
/// `$CONTEXT_TIER_REDB_NOSPACE_DIR`: the disk is full when the context ends. Deleting the
/// tables needs fresh pages, so the destroy failed; the file was removed, but this instance
/// and the others still held it open, and read every object in it, and its blocks stayed
/// taken until the last of them went.
#[test]
#[ignore = "run by a_destroy_on_a_full_disk_empties_the_tier_and_gives_the_space_back inside a private mount namespace"]
fn destroy_on_a_full_disk_inner() {
    let Some((dir, path, tier, peer)) = tiers_on_the_small_file_system() else { return };
    let PutOutcome::Stored(r) = put_parts(&tier, 1, &pattern(1, 1 << 20)) else { panic!("1 MiB did not fit") };
    let filler = dir.join("filler");
    fill(&filler);
    let destroyed = tier.destroy();
    assert!(destroyed.is_ok(), "destroy on a full disk: {destroyed:?}");
    assert!(!path.exists());
    assert_eq!(tier.usage().unwrap(), TierUsage::default());
    for t in [&tier, &peer] {
        assert!(!matches!(t.get(&r), Ok(Some(_))), "an object is still readable after destroy");
    }
    tier.destroy().unwrap();
    // The file's blocks are free again, though both instances still hold it open.
    let mut more = std::fs::OpenOptions::new().append(true).open(&filler).unwrap();
    more.write_all(&[7; 512 << 10]).expect("the destroyed database's space is free");
    drop(more);
    std::fs::remove_file(&filler).unwrap();
    peer.destroy().unwrap();
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
    println!("{DONE}");
}
