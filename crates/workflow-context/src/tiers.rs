//! The tiers this build includes, chosen by Cargo features.

use std::path::Path;
use std::sync::Arc;

use context_core::{Result, StorageKind, StorageTier};

/// The directory, inside a context's directory, that holds disk-tier value files.
pub(crate) const VALUES_DIR: &str = "values";

/// The redb database of small disk values, inside a context's directory.
#[cfg(feature = "tier-redb")]
pub(crate) const REDB_FILE: &str = "values.redb";

/// Builds the tiers of this build for the context `run_id` of instance `instance` (see
/// [`Meta::instance`](crate::index::Meta::instance); `None` names shared memory by the run
/// id alone) in `dir`, RAM tiers first.
pub(crate) fn build(run_id: &str, instance: Option<u64>, dir: &Path) -> Result<Vec<Arc<dyn StorageTier>>> {
    build_each(run_id, instance, dir).into_iter().collect()
}

/// [`build`], each tier on its own: one that cannot be built keeps none of the others from
/// being built.
pub(crate) fn build_each(run_id: &str, instance: Option<u64>, dir: &Path) -> Vec<Result<Arc<dyn StorageTier>>> {
    build_each_kind(run_id, instance, dir).into_iter().map(|(_, tier)| tier).collect()
}

/// [`build_each`], with the kind of each tier, known even when it could not be built: a RAM
/// tier keeps its storage outside the context's directory.
#[allow(unused_variables, unused_mut, clippy::vec_init_then_push)]
pub(crate) fn build_each_kind(
    run_id: &str,
    instance: Option<u64>,
    dir: &Path,
) -> Vec<(StorageKind, Result<Arc<dyn StorageTier>>)> {
    let mut tiers: Vec<(StorageKind, Result<Arc<dyn StorageTier>>)> = Vec::new();
    #[cfg(feature = "tier-shm")]
    {
        let config = context_tier_shm::ShmConfig::new(run_id);
        let config = match instance {
            Some(instance) => config.instance(instance),
            None => config,
        };
        tiers.push((StorageKind::Ram, context_tier_shm::ShmTier::new(config).map(|t| Arc::new(t) as _)));
    }
    // The database is opened at the tier's first operation: a handle that never stores or
    // reads a small disk value (most readers of frames) never pays for opening it, about a
    // quarter of opening a context, nor for closing it.
    #[cfg(feature = "tier-redb")]
    tiers.push((
        StorageKind::Disk,
        context_tier_redb::RedbTier::new(context_tier_redb::RedbConfig::new(dir.join(REDB_FILE)).open_lazily())
            .map(|t| Arc::new(t) as _),
    ));
    #[cfg(feature = "tier-mmap")]
    tiers.push((
        StorageKind::Disk,
        context_tier_mmap::MmapTier::new(context_tier_mmap::MmapConfig::new(dir.join(VALUES_DIR)))
            .map(|t| Arc::new(t) as _),
    ));
    tiers
}

/// The directory, inside a context's directory, that holds the recipes of values passed by
/// reference.
#[cfg(feature = "tier-graph")]
pub(crate) const RECIPES_DIR: &str = "recipes";

/// The tier that holds recipes, when this build passes values by reference.
#[allow(unused_variables)]
pub(crate) fn recipes(dir: &Path) -> Result<Option<Arc<dyn StorageTier>>> {
    #[cfg(feature = "tier-graph")]
    {
        let config = context_tier_graph::GraphConfig::new(dir.join(RECIPES_DIR));
        Ok(Some(Arc::new(context_tier_graph::GraphTier::new(config)?)))
    }
    #[cfg(not(feature = "tier-graph"))]
    Ok(None)
}
