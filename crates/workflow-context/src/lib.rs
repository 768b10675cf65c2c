#![doc = include_str!("../README.md")]

mod codec;
mod config;
mod context;
mod export;
mod fsutil;
mod index;
#[cfg(feature = "tier-graph")]
mod refs;
mod tiers;

/// The attribute for implementing [`GraphRunner`]: `#[workflow_context::async_trait]`.
#[cfg(feature = "tier-graph")]
pub use async_trait::async_trait;
pub use config::{CONFIG_ENV, DEFAULT_CONTEXTS_DIR_NAME, DEFAULT_MAX_RAM_PERCENT};
pub use context::{ContextBuilder, WorkflowContext};
pub use context_core::{
    Error, MAX_KEY_LEN, MAX_RUN_ID_LEN, PassBy, Payload, Result, SaveOptions, StorageInfo, StorageKind, Usage,
};
#[cfg(feature = "tier-graph")]
pub use context_tier_graph::{GraphRunner, Node, WorkflowGraph};
pub use export::{read_exported, read_exported_bytes};

/// Helpers for tests (feature `testing`): the tiers exactly as a context builds them.
#[cfg(feature = "testing")]
pub mod testing {
    use std::path::Path;
    use std::sync::Arc;

    use context_core::{Result, StorageTier};

    /// The tiers of this build as a context `run_id` in directory `dir` uses them (the
    /// directory must exist). Run the conformance kit on them to check the composition.
    pub fn context_tiers(run_id: &str, dir: &Path) -> Result<Vec<Arc<dyn StorageTier>>> {
        let values = dir.join(crate::tiers::VALUES_DIR);
        if !values.exists() {
            std::fs::create_dir(&values).map_err(|e| context_core::Error::io("create values directory", &values, e))?;
        }
        crate::tiers::build(run_id, dir)
    }
}

/// The building blocks for writing your own storage tier or placement policy.
pub mod core {
    pub use context_core::*;
}

#[cfg(test)]
mod tests {
    #[test]
    fn handles_are_send_sync_debug() {
        fn send_sync_debug<T: Send + Sync + std::fmt::Debug>() {}
        send_sync_debug::<crate::WorkflowContext>();
        send_sync_debug::<crate::Payload>();
    }
}
