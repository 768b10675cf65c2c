//! The conformance kit of context-core, run against `MmapTier`.

use std::path::PathBuf;

use context_tier_mmap::{MmapConfig, MmapTier};

/// A fresh, empty directory of its own for each tier. The `TempDir` guard is given up: every
/// check ends with `destroy`, which removes the directory.
fn fresh_dir() -> PathBuf {
    tempfile::Builder::new().prefix("context-tier-mmap-").tempdir().expect("create a temporary directory").keep()
}

context_core::tier_conformance_tests!(|| Box::new(MmapTier::new(MmapConfig::new(fresh_dir())).unwrap()));
