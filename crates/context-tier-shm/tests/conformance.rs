//! The conformance kit of context-core, run against the shared-memory tier.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use context_tier_shm::{ShmConfig, ShmTier};

/// A run id no other test (thread or process) uses: pid, counter and clock.
fn unique_run_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("conf-{}-{}-{nanos}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

context_core::tier_conformance_tests!(|| Box::new(ShmTier::new(ShmConfig::new(&unique_run_id())).unwrap()));
