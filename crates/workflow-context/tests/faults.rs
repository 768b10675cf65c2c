//! A context over a tier that fails: every operation answers with a clear error or falls
//! back, and the context stays consistent (the previous value loads, usage is exact).

mod common;

use std::sync::Arc;

use common::{base, builder};
use context_core::StorageTier;
use context_core::testing::{Call, Fault, FaultyTier, MemoryTier};
use workflow_context::core::{Prefer, Rule};
use workflow_context::{Error, SaveOptions, WorkflowContext};

/// A context whose first choice for every value is a faulty in-memory tier, with the
/// built-in tiers behind it.
fn faulty_context(b: &std::path::Path) -> (WorkflowContext, Arc<FaultyTier>, Arc<MemoryTier>) {
    let inner = Arc::new(MemoryTier::default());
    let faulty = Arc::new(FaultyTier::new("faulty", inner.clone()));
    let ctx = builder(b)
        .tier(faulty.clone())
        .policy(Prefer::first(Rule::named("faulty")).then(Rule::any()))
        .create()
        .unwrap();
    (ctx, faulty, inner)
}

fn objects(tier: &MemoryTier) -> u64 {
    tier.usage().unwrap().objects
}

#[test]
fn a_failing_put_keeps_the_previous_value() {
    let b = base();
    let (ctx, faulty, inner) = faulty_context(b.path());
    ctx.save("k", "old").unwrap();
    let before = ctx.usage().unwrap();
    for fault in [Fault::Eio, Fault::Enospc, Fault::ShortWrite] {
        faulty.fail(Call::Put, 1, fault);
        let err = ctx.save("k", &"new".repeat(100)).unwrap_err();
        match &err {
            Error::Io { key, op, .. } => {
                assert_eq!(key.as_deref(), Some("k"), "{err}");
                assert!(op.contains("write"), "{err}");
            }
            other => panic!("{fault:?}: {other:?}"),
        }
        assert_eq!(ctx.load::<String>("k").unwrap(), "old", "{fault:?}: the previous value still loads");
        assert_eq!(ctx.usage().unwrap(), before, "{fault:?}: usage is exact");
        assert_eq!(objects(&inner), 1, "{fault:?}: nothing half-written stays in the tier");
    }
    assert_eq!(faulty.injected(), 3);
}

#[test]
fn a_put_that_fails_but_leaves_its_object_is_cleaned_up() {
    let b = base();
    let (ctx, faulty, inner) = faulty_context(b.path());
    ctx.save("k", "old").unwrap();
    let before = ctx.usage().unwrap();
    // A small value (written under the index lock) and a large one (written outside it).
    for len in [100usize, 200_000] {
        faulty.fail(Call::Put, 1, Fault::LeaveBehind);
        let err = ctx.save_bytes("k", &vec![1u8; len], SaveOptions::new()).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{len}: {err}");
        assert_eq!(objects(&inner), 1, "{len}: the object the put left was deleted");
        assert_eq!(ctx.usage().unwrap(), before, "{len}: usage is exact");
        assert_eq!(ctx.load::<String>("k").unwrap(), "old");
    }
    // If it cannot be deleted yet, it stays counted, and goes at a later write.
    faulty.fail(Call::Put, 1, Fault::LeaveBehind);
    faulty.fail_from(Call::Delete, 1, Fault::Eio);
    ctx.save_bytes("k", &vec![2u8; 200_000], SaveOptions::new()).unwrap_err();
    assert_eq!(objects(&inner), 2);
    assert!(ctx.usage().unwrap().ram_usage_bytes > before.ram_usage_bytes, "the object left behind is counted");
    faulty.heal();
    ctx.save("other", &1u8).unwrap();
    ctx.remove("other").unwrap();
    assert_eq!(objects(&inner), 1);
    assert_eq!(ctx.usage().unwrap(), before);
}

#[test]
fn a_panicking_put_whose_object_cannot_be_deleted_yet_is_deleted_later() {
    let b = base();
    let (ctx, faulty, inner) = faulty_context(b.path());
    ctx.save("k", "old").unwrap();
    let before = ctx.usage().unwrap();
    faulty.fail_from(Call::Delete, 1, Fault::Eio);
    let value = common::PanicsWhileWritten::new(200_000);
    let saved = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ctx.save("big", &value)));
    assert!(saved.is_err());
    assert!(ctx.usage().unwrap().ram_usage_bytes > before.ram_usage_bytes, "counted while it cannot be deleted");
    // Once the tier deletes again, this handle's next write takes it back.
    faulty.heal();
    ctx.save("other", &1u8).unwrap();
    ctx.remove("other").unwrap();
    assert_eq!(ctx.usage().unwrap(), before);
    assert_eq!(objects(&inner), 1);
}

#[test]
fn a_full_tier_falls_back_to_the_next() {
    let b = base();
    let (ctx, faulty, inner) = faulty_context(b.path());
    faulty.fail(Call::Put, 1, Fault::NoSpace);
    ctx.save("k", "value").unwrap();
    assert_ne!(ctx.storage_info("k").unwrap().unwrap().tier, "faulty");
    assert_eq!(ctx.load::<String>("k").unwrap(), "value");
    assert_eq!(objects(&inner), 0);
    // A first-choice tier that fails hard does not fall back: the error is the answer.
    faulty.fail(Call::Put, 1, Fault::Eio);
    assert!(ctx.save("j", "value").is_err());
    assert!(!ctx.contains("j").unwrap());
}

#[test]
fn a_failing_get_is_an_error_naming_the_key_and_changes_nothing() {
    let b = base();
    let (ctx, faulty, _inner) = faulty_context(b.path());
    ctx.save("k", "value").unwrap();
    faulty.fail(Call::Get, 1, Fault::Eio);
    match ctx.load::<String>("k") {
        Err(Error::Io { key, .. }) => assert_eq!(key.as_deref(), Some("k")),
        other => panic!("{other:?}"),
    }
    assert_eq!(ctx.load::<String>("k").unwrap(), "value");
    // An export whose read fails leaves the value in place.
    faulty.fail(Call::Get, 1, Fault::Eio);
    assert!(ctx.export_data("k", b.path().join("out.wfx"), false).is_err());
    assert!(!b.path().join("out.wfx").exists());
    assert_eq!(ctx.load::<String>("k").unwrap(), "value");
}

#[test]
fn a_failing_delete_defers_the_free_and_usage_stays_exact() {
    let b = base();
    let (ctx, faulty, inner) = faulty_context(b.path());
    ctx.save("k", "old").unwrap();
    let one = ctx.usage().unwrap();
    // The overwrite commits; deleting the old object fails: the save still succeeded.
    faulty.fail(Call::Delete, 1, Fault::Eio);
    ctx.save("k", "new").unwrap();
    assert_eq!(ctx.load::<String>("k").unwrap(), "new");
    assert_eq!(objects(&inner), 2, "the old object is still there");
    let u = ctx.usage().unwrap();
    assert_eq!(u.ram_usage_bytes, 2 * one.ram_usage_bytes, "and still counted: usage is what is stored");
    assert_eq!(u.stored_keys_count, 1);
    // The next write of this handle frees it.
    ctx.save("other", "x").unwrap();
    assert_eq!(objects(&inner), 2, "k's new object and other");
    ctx.remove("other").unwrap();
    assert_eq!(ctx.usage().unwrap(), one);
    // A remove whose delete fails removes the key and frees the object later too.
    faulty.fail(Call::Delete, 1, Fault::Eio);
    assert!(ctx.remove("k").unwrap());
    assert!(!ctx.contains("k").unwrap());
    assert_eq!(objects(&inner), 1);
    ctx.save("z", "y").unwrap();
    ctx.remove("z").unwrap();
    assert_eq!(objects(&inner), 0);
    let u = ctx.usage().unwrap();
    assert_eq!((u.ram_usage_bytes, u.stored_keys_count), (0, 0));
}

#[test]
fn many_faults_in_a_row_leave_a_consistent_context() {
    let b = base();
    let (ctx, faulty, inner) = faulty_context(b.path());
    let mut model = std::collections::HashMap::new();
    for round in 0..200u32 {
        let key = format!("k{}", round % 7);
        match round % 5 {
            0 => {
                faulty.fail(Call::Put, 1, Fault::ShortWrite);
            }
            1 => {
                faulty.fail(Call::Delete, 1, Fault::Eio);
            }
            2 => {
                faulty.fail(Call::Put, 1, Fault::NoSpace);
            }
            _ => {}
        }
        let value = format!("{round}").repeat(round as usize % 50 + 1);
        if round % 11 == 0 {
            if ctx.remove(&key).unwrap() {
                model.remove(&key);
            }
        } else if ctx.save_with(&key, &value, SaveOptions::new()).is_ok() {
            model.insert(key.clone(), value);
        }
        faulty.heal();
        for (k, v) in &model {
            assert_eq!(&ctx.load::<String>(k).unwrap(), v, "round {round}");
        }
        assert_eq!(ctx.usage().unwrap().stored_keys_count, model.len());
    }
    for k in model.keys() {
        ctx.remove(k).unwrap();
    }
    ctx.save("flush", "x").unwrap();
    ctx.remove("flush").unwrap();
    let u = ctx.usage().unwrap();
    assert_eq!((u.ram_usage_bytes, u.temp_disk_usage_bytes), (0, 0), "nothing leaked");
    assert_eq!(objects(&inner), 0);
}

#[test]
fn a_small_object_that_cannot_be_deleted_yet_stays_counted() {
    // A small value is written under the index lock and noted in flight, not recorded
    // pending; what its failed put leaves must count all the same.
    let b = base();
    let (ctx, faulty, inner) = faulty_context(b.path());
    ctx.save("k", "old").unwrap();
    let before = ctx.usage().unwrap();
    faulty.fail(Call::Put, 1, Fault::LeaveBehind);
    faulty.fail_from(Call::Delete, 1, Fault::Eio);
    ctx.save_bytes("k", &[2u8; 100], SaveOptions::new()).unwrap_err();
    assert_eq!(objects(&inner), 2);
    let u = ctx.usage().unwrap();
    assert!(u.ram_usage_bytes > before.ram_usage_bytes + 100, "the object left behind counts: {u:?}");
    faulty.heal();
    ctx.save("other", &1u8).unwrap();
    ctx.remove("other").unwrap();
    assert_eq!(objects(&inner), 1);
    assert_eq!(ctx.usage().unwrap(), before);
    assert_eq!(ctx.load::<String>("k").unwrap(), "old");
}
