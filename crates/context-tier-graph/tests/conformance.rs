//! The conformance kit of context-core, run against `GraphTier`.

use std::ops::Deref;

use context_tier_graph::{GraphConfig, GraphTier};

/// A fresh tier over a directory inside its own temporary directory, which lives as long
/// as the tier.
struct Fresh {
    tier: GraphTier,
    _scratch: tempfile::TempDir,
}

impl Deref for Fresh {
    type Target = GraphTier;

    fn deref(&self) -> &GraphTier {
        &self.tier
    }
}

fn fresh() -> Fresh {
    let scratch =
        tempfile::Builder::new().prefix("context-tier-graph-").tempdir().expect("create a temporary directory");
    let tier = GraphTier::new(GraphConfig::new(scratch.path().join("graphs"))).expect("open the tier");
    Fresh { tier, _scratch: scratch }
}

context_core::tier_conformance_tests!(fresh);
