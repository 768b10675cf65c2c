//! The conformance kit, run against every tier exactly as a context builds it.

use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use context_core::StorageTier;
use workflow_context::testing::context_tiers;

/// One tier of a fresh context directory, which lives as long as the tier.
struct ContextTier {
    tier: Arc<dyn StorageTier>,
    _dir: tempfile::TempDir,
}

impl Deref for ContextTier {
    type Target = dyn StorageTier;
    fn deref(&self) -> &Self::Target {
        &*self.tier
    }
}

/// The tier named `name` as a context builds it, in a fresh directory.
fn context_tier(name: &str) -> ContextTier {
    static N: AtomicU64 = AtomicU64::new(0);
    let run = format!("conf-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    let dir = tempfile::Builder::new().prefix("wfctx-conformance-").tempdir().unwrap();
    let tier = context_tiers(&run, dir.path())
        .unwrap()
        .into_iter()
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("this build has no {name} tier"));
    ContextTier { tier, _dir: dir }
}

#[cfg(feature = "tier-shm")]
mod shm {
    context_core::tier_conformance_tests!(|| super::context_tier("shm"));
}

#[cfg(feature = "tier-mmap")]
mod mmap {
    context_core::tier_conformance_tests!(|| super::context_tier("mmap"));
}

#[cfg(feature = "tier-redb")]
mod redb {
    context_core::tier_conformance_tests!(|| super::context_tier("redb"));
}
