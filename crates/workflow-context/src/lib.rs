#![doc = include_str!("../README.md")]

mod codec;
mod config;
mod context;
mod export;
mod fsutil;
mod index;
mod tiers;

pub use config::{CONFIG_ENV, DEFAULT_CONTEXTS_DIR_NAME, DEFAULT_MAX_RAM_PERCENT};
pub use context::{ContextBuilder, WorkflowContext};
pub use context_core::{
    Error, MAX_KEY_LEN, MAX_RUN_ID_LEN, PassBy, Payload, Result, SaveOptions, StorageInfo, StorageKind, Usage,
};
pub use export::{read_exported, read_exported_bytes};

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
