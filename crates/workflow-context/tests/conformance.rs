//! The conformance kit, run against every tier exactly as a context builds it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use context_core::StorageTier;
use workflow_context::testing::context_tiers;

/// Every tier of this build in a fresh context directory (removed with the guard).
fn each_tier() -> (Vec<Arc<dyn StorageTier>>, tempfile::TempDir) {
    static N: AtomicU64 = AtomicU64::new(0);
    let run = format!("conf-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    let dir = tempfile::Builder::new().prefix("wfctx-conformance-").tempdir().unwrap();
    (context_tiers(&run, dir.path()).unwrap(), dir)
}

macro_rules! per_tier {
    ($($check:ident),* $(,)?) => {
        $(
            #[test]
            fn $check() {
                let count = each_tier().0.len();
                assert!(count > 0, "a build has at least one tier");
                for i in 0..count {
                    // A fresh set for each tier: every check destroys the tier it ran on.
                    let (tiers, _dir) = each_tier();
                    context_core::testing::$check(&*tiers[i]);
                }
            }
        )*
    };
}

per_tier!(
    put_get_round_trip,
    fill_and_parts_agree,
    delete_reports_existence,
    delete_with_unknown_slot,
    payload_outlives_delete,
    failed_fill_leaves_nothing,
    wrong_length_is_refused,
    usage_counts_objects,
    footprint_covers_length,
    concurrent_puts_and_gets,
    destroy_removes_everything,
);

#[test]
fn the_macro_covers_every_check() {
    assert_eq!(context_core::testing::CHECKS.len(), 11);
}
