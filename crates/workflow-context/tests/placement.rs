//! Placement policies, the disk budget and user tiers, through the composed context.

mod common;

use std::sync::Arc;

use common::{base, builder};
#[cfg(any(feature = "tier-mmap", feature = "tier-redb"))]
use workflow_context::core::DiskOnly;
use workflow_context::core::{Compressed, PlacementPolicy, Prefer, Rule, StorageTier};
use workflow_context::{Error, SaveOptions, StorageKind};

#[cfg(any(feature = "tier-mmap", feature = "tier-redb"))]
fn disk_tier_for(len: usize) -> &'static str {
    if cfg!(feature = "tier-redb") && (len as u64) + 40 < 64 << 10 {
        "redb"
    } else if cfg!(feature = "tier-mmap") {
        "mmap"
    } else {
        "redb"
    }
}

#[cfg(any(feature = "tier-mmap", feature = "tier-redb"))]
#[test]
fn disk_only_keeps_everything_on_disk_small_values_packed() {
    let b = base();
    let ctx = builder(b.path()).policy(DiskOnly::default()).create().unwrap();
    for len in [10usize, 60_000, 70_000, 1 << 20] {
        let key = format!("v{len}");
        ctx.save_bytes(&key, &vec![3u8; len], SaveOptions::new()).unwrap();
        let info = ctx.storage_info(&key).unwrap().unwrap();
        assert_eq!(info.storage_type, StorageKind::Disk, "{info:?}");
        assert_eq!(info.tier, disk_tier_for(len), "{info:?}");
        assert_eq!(&*ctx.load_bytes(&key).unwrap(), &vec![3u8; len][..]);
    }
    assert_eq!(ctx.usage().unwrap().ram_usage_bytes, 0);
    // ram_only(true) cannot be honoured by a policy that never uses RAM.
    let err = ctx.save("x", &1u8).and_then(|()| ctx.save_with("y", &1u8, SaveOptions::new().ram_only(true)));
    assert!(matches!(err, Err(Error::NoTier { kind: StorageKind::Ram, .. })), "{err:?}");
}

#[test]
fn compressed_policy_needs_a_compressing_tier() {
    let b = base();
    let ctx = builder(b.path()).policy(Compressed).create().unwrap();
    let result = ctx.save_bytes("text", "lorem ipsum ".repeat(10_000).as_bytes(), SaveOptions::new());
    if cfg!(feature = "tier-redb") {
        result.unwrap();
        let info = ctx.storage_info("text").unwrap().unwrap();
        assert_eq!(info.tier, "redb");
        assert!(info.size < info.len / 10, "compressible data is held compressed: {info:?}");
        assert_eq!(ctx.usage().unwrap().temp_disk_usage_bytes, info.size);
        assert_eq!(&*ctx.load_bytes("text").unwrap(), "lorem ipsum ".repeat(10_000).as_bytes());
    } else {
        match result {
            Err(Error::NoPlacement { key, reason }) => {
                assert_eq!(key, "text");
                assert!(reason.contains("Compressed"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(!ctx.contains("text").unwrap());
    }
}

#[test]
fn a_policy_cannot_override_the_options() {
    let b = base();
    let ram_only_policy = Prefer::first(Rule::kind(StorageKind::Ram));
    let ctx = builder(b.path()).policy(ram_only_policy).create().unwrap();
    let err = ctx.save_with("k", &1u8, SaveOptions::new().use_ram(false)).unwrap_err();
    if cfg!(feature = "tier-shm") {
        assert!(matches!(err, Error::NoTier { kind: StorageKind::Disk, .. }), "{err}");
    } else {
        assert!(matches!(err, Error::NoPlacement { .. }), "{err}");
    }
    assert!(!ctx.contains("k").unwrap());
}

#[cfg(any(feature = "tier-mmap", feature = "tier-redb"))]
#[test]
fn the_disk_budget_holds_and_nothing_half_written_stays() {
    // Incompressible values, so a compressing tier holds what a plain one would.
    let b = base();
    let ctx = builder(b.path()).max_ram_bytes(0).max_disk_bytes(1 << 20).create().unwrap();
    ctx.save_bytes("a", &context_core::testing::pattern(1, 600 << 10), SaveOptions::new()).unwrap();
    let before = ctx.usage().unwrap();
    let files_before = common::tree(ctx.dir());
    match ctx.save_bytes("b", &context_core::testing::pattern(2, 600 << 10), SaveOptions::new()) {
        Err(Error::OutOfDisk { key, needed, available }) => {
            assert_eq!(key, "b");
            assert!(needed >= 600 << 10);
            assert_eq!(available, Some((1 << 20) - before.temp_disk_usage_bytes));
        }
        other => panic!("{other:?}"),
    }
    assert!(!ctx.contains("b").unwrap());
    assert_eq!(ctx.usage().unwrap(), before, "usage unchanged");
    assert_eq!(common::tree(ctx.dir()), files_before, "no file left behind");
    // An overwrite needs room for the new value while the old one still exists: the
    // budget holds at every moment, and a reader can still load the old one meanwhile.
    assert!(matches!(
        ctx.save_bytes("a", &context_core::testing::pattern(3, 600 << 10), SaveOptions::new()),
        Err(Error::OutOfDisk { .. })
    ));
    assert_eq!(
        &*ctx.load_bytes("a").unwrap(),
        &context_core::testing::pattern(1, 600 << 10)[..],
        "a refused overwrite keeps the old value"
    );
    ctx.save_bytes("a", &context_core::testing::pattern(3, 400 << 10), SaveOptions::new()).unwrap();
    assert_eq!(&*ctx.load_bytes("a").unwrap(), &context_core::testing::pattern(3, 400 << 10)[..]);
    // An opener shares the budget: it belongs to the context.
    let other = builder(b.path()).run_id(ctx.run_id()).max_disk_bytes(u64::MAX).open().unwrap();
    assert!(matches!(
        other.save_bytes("c", &context_core::testing::pattern(4, 700 << 10), SaveOptions::new()),
        Err(Error::OutOfDisk { .. })
    ));
}

/// A tier that is always full (every put answers "no space") and holds nothing.
#[derive(Debug)]
struct Named {
    name: &'static str,
    kind: StorageKind,
    /// Whether it answers `u64::MAX` for every footprint (a tier that cannot tell).
    unbounded: bool,
}

/// A full RAM tier named `name`.
fn named(name: &'static str) -> Arc<Named> {
    Arc::new(Named { name, kind: StorageKind::Ram, unbounded: false })
}

impl StorageTier for Named {
    fn name(&self) -> &str {
        self.name
    }
    fn kind(&self) -> StorageKind {
        self.kind
    }
    fn capabilities(&self) -> workflow_context::core::Capabilities {
        workflow_context::core::Capabilities::new(false, false)
    }
    fn footprint(&self, len: u64) -> u64 {
        if self.unbounded { u64::MAX } else { len }
    }
    fn put(
        &self,
        _: workflow_context::core::NewObject<'_>,
    ) -> workflow_context::Result<workflow_context::core::PutOutcome> {
        Ok(workflow_context::core::PutOutcome::NoSpace)
    }
    fn get(
        &self,
        _: &workflow_context::core::ObjectRef,
    ) -> workflow_context::Result<Option<workflow_context::Payload>> {
        Ok(None)
    }
    fn delete(&self, _: &workflow_context::core::ObjectRef) -> workflow_context::Result<bool> {
        Ok(false)
    }
    fn locate(&self, _: &workflow_context::core::ObjectRef) -> workflow_context::core::Location {
        Default::default()
    }
    fn usage(&self) -> workflow_context::Result<workflow_context::core::TierUsage> {
        Ok(Default::default())
    }
    fn destroy(&self) -> workflow_context::Result<()> {
        Ok(())
    }
}

#[test]
fn user_tiers_need_unique_names_and_a_full_one_is_skipped() {
    let b = base();
    let dup = if cfg!(feature = "tier-shm") {
        "shm"
    } else if cfg!(feature = "tier-mmap") {
        "mmap"
    } else {
        "redb"
    };
    // The recipe tier's name is taken too.
    let taken = if cfg!(feature = "tier-graph") { vec![dup, "graph"] } else { vec![dup] };
    for dup in taken {
        match builder(b.path()).tier(named(dup)).create() {
            Err(Error::Config { message, .. }) => assert!(message.contains(dup), "{message}"),
            other => panic!("{dup}: {other:?}"),
        }
    }
    assert!(std::fs::read_dir(b.path()).unwrap().next().is_none(), "a refused context leaves nothing");
    // A tier that always answers "no space" is tried first and skipped.
    let ctx = builder(b.path())
        .tier(named("full"))
        .policy(Prefer::first(Rule::named("full")).then(Rule::any()))
        .create()
        .unwrap();
    ctx.save("k", &5u8).unwrap();
    assert_ne!(ctx.storage_info("k").unwrap().unwrap().tier, "full");
    assert_eq!(ctx.load::<u8>("k").unwrap(), 5);
}

#[cfg(any(feature = "tier-mmap", feature = "tier-redb"))]
#[test]
fn a_tier_that_counts_every_value_as_u64_max_overflows_nothing() {
    let b = base();
    // No disk budget (the default), and the first disk tier tried claims u64::MAX bytes for
    // every value, then turns it away.
    let unbounded = Arc::new(Named { name: "unbounded", kind: StorageKind::Disk, unbounded: true });
    let ctx = builder(b.path())
        .max_ram_bytes(0)
        .tier(unbounded)
        .policy(Prefer::first(Rule::named("unbounded")).then(Rule::any()))
        .create()
        .unwrap();
    ctx.save_bytes("a", b"on disk already", SaveOptions::new()).unwrap();
    ctx.save_bytes("b", &vec![1u8; 100_000], SaveOptions::new()).unwrap();
    assert_ne!(ctx.storage_info("b").unwrap().unwrap().tier, "unbounded");
    ctx.remove("a").unwrap();
    ctx.remove("b").unwrap();
    let u = ctx.usage().unwrap();
    assert_eq!((u.ram_usage_bytes, u.temp_disk_usage_bytes, u.stored_keys_count), (0, 0, 0));
}

/// A policy that ranks the tier named "full" first, then every other, and panics every
/// second time it is asked.
#[derive(Debug, Default)]
struct PanicsEverySecondTime {
    calls: std::sync::atomic::AtomicUsize,
}

impl PlacementPolicy for PanicsEverySecondTime {
    fn rank(&self, request: &workflow_context::core::PlacementRequest<'_>) -> Vec<usize> {
        let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!(n.is_multiple_of(2), "the policy panics on purpose");
        Prefer::first(Rule::named("full")).then(Rule::any()).rank(request)
    }
}

#[test]
fn a_policy_that_panics_after_a_tier_turned_a_value_away_leaves_nothing_counted() {
    let b = base();
    // The first tier is full: the save asks the policy again, which panics.
    let full = Arc::new(Named { name: "full", kind: StorageKind::Disk, unbounded: false });
    let ctx = builder(b.path()).tier(full).policy(PanicsEverySecondTime::default()).create().unwrap();
    for len in [100usize, 100_000] {
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ctx.save_bytes("k", &vec![1u8; len], SaveOptions::new().use_ram(false))
        }));
        assert!(caught.is_err(), "{len} bytes: the policy's panic reaches the caller");
        let u = ctx.usage().unwrap();
        assert_eq!((u.ram_usage_bytes, u.temp_disk_usage_bytes, u.stored_keys_count), (0, 0, 0), "{len} bytes");
    }
}

/// A policy that answers the same indexes, whatever it is asked (and does not show them).
struct Ranks(Vec<usize>);

impl std::fmt::Debug for Ranks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ranks")
    }
}

impl PlacementPolicy for Ranks {
    fn rank(&self, _: &workflow_context::core::PlacementRequest<'_>) -> Vec<usize> {
        self.0.clone()
    }
}

#[test]
fn a_policy_that_ranks_tiers_that_do_not_exist_is_told_so() {
    let b = base();
    let ctx = builder(b.path()).tier(named("full")).policy(Ranks(vec![99, usize::MAX, 99])).create().unwrap();
    match ctx.save("k", &1u8) {
        Err(Error::NoPlacement { key, reason }) => {
            assert_eq!(key, "k");
            assert!(reason.contains("99") && reason.contains(&usize::MAX.to_string()), "{reason}");
            assert!(reason.contains("\"full\""), "the tiers there are: {reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!ctx.contains("k").unwrap());
    assert_eq!(ctx.usage().unwrap().stored_keys_count, 0);
}
