//! The conformance kit of context-core, run against `RedbTier`.

use std::ops::Deref;

use context_tier_redb::{RedbConfig, RedbTier};

/// A fresh tier over a new file in a temporary directory of its own, which goes when the
/// tier does.
struct Fresh {
    tier: RedbTier,
    _dir: tempfile::TempDir,
}

impl Deref for Fresh {
    type Target = RedbTier;

    fn deref(&self) -> &RedbTier {
        &self.tier
    }
}

fn fresh() -> Fresh {
    let dir = tempfile::Builder::new().prefix("context-tier-redb-").tempdir().expect("create a temporary directory");
    let tier = RedbTier::new(RedbConfig::new(dir.path().join("context.redb"))).expect("open a fresh redb tier");
    Fresh { tier, _dir: dir }
}

// `Fresh` derefs to the tier, as the macro's `Box` would.
context_core::tier_conformance_tests!(fresh);

/// The same kit over a tier that opens its database at its first operation.
mod lazy {
    use super::*;

    fn fresh_lazy() -> Fresh {
        let dir =
            tempfile::Builder::new().prefix("context-tier-redb-").tempdir().expect("create a temporary directory");
        let config = RedbConfig::new(dir.path().join("context.redb")).open_lazily();
        Fresh { tier: RedbTier::new(config).expect("build a lazy redb tier"), _dir: dir }
    }

    context_core::tier_conformance_tests!(fresh_lazy);
}
