#![doc = include_str!("../README.md")]

mod codec;
mod config;
mod context;
mod export;
mod fork;
mod fsutil;
mod gc;
mod index;
mod lock;
#[cfg(feature = "tier-graph")]
mod refs;
mod table;
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
pub use gc::{GcFailure, GcReport, collect_orphans};

/// Helpers for tests (feature `testing`): the tiers exactly as a context builds them.
#[cfg(feature = "testing")]
pub mod testing {
    use std::path::Path;
    use std::sync::Arc;

    use context_core::{Result, StorageTier};

    /// The tiers of this build as a context `run_id` in directory `dir` uses them (the
    /// directory must exist; if it holds a context, its shared memory is named by that
    /// context's instance). Run the conformance kit on them to check the composition.
    pub fn context_tiers(run_id: &str, dir: &Path) -> Result<Vec<Arc<dyn StorageTier>>> {
        let values = dir.join(crate::tiers::VALUES_DIR);
        if !values.exists() {
            std::fs::create_dir(&values).map_err(|e| context_core::Error::io("create values directory", &values, e))?;
        }
        let instance = crate::index::Meta::open(&dir.join(crate::context::META_FILE)).ok().map(|m| m.instance());
        crate::tiers::build(run_id, instance, dir)
    }
}

/// Entry points into the decoders that read untrusted bytes, for fuzzing (feature
/// `fuzzing`). Each must return an error, never panic, whatever its input.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    /// Parses configuration text as `ContextBuilder::config_path` would read it.
    pub fn parse_config(text: &str) -> context_core::Result<()> {
        crate::config::FileConfig::parse(text, "fuzz input").map(|_| ())
    }

    /// Decodes index journal frames; the number of records on success.
    pub fn decode_journal(bytes: &[u8]) -> Result<usize, String> {
        crate::index::decode_frames(bytes, 0).map(|recs| recs.len())
    }

    /// Decodes an export file; the payload length on success.
    pub fn decode_export(bytes: &[u8]) -> context_core::Result<usize> {
        crate::export::decode(bytes, std::path::Path::new("fuzz input")).map(|e| e.payload.len())
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
