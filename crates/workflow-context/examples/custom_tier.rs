//! Writing your own tier: an in-process map, checked by the conformance kit, then used by
//! a context beside the built-in tiers.
//!
//! Run it with `cargo run -p workflow-context --example custom_tier`.
//!
//! A context uses such a tier only in the process that adds it: here the tier keeps its
//! objects in this process's memory, so other processes attached to the context cannot
//! read them (it declares `shared_across_processes: false`). A tier meant to be shared
//! keeps its objects where every process reaches them, as the built-in tiers do.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

// A tier author depends on `context-core` (the trait, and the kit behind its `testing`
// feature); `workflow_context::core` re-exports the same items.
use context_core::testing;
use context_core::{
    Capabilities, Error, Location, NewObject, ObjectId, ObjectRef, Payload, Prefer, PutOutcome, Result, Rule,
    StorageKind, StorageTier, TierUsage, WriteFailure,
};
use workflow_context::WorkflowContext;

/// Objects in a map in this process's memory: fast, private to the process, gone with it.
#[derive(Debug, Default)]
struct MapTier {
    objects: Mutex<HashMap<ObjectId, Arc<Vec<u8>>>>,
}

impl MapTier {
    fn objects(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectId, Arc<Vec<u8>>>> {
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl StorageTier for MapTier {
    fn name(&self) -> &str {
        "memory"
    }

    fn kind(&self) -> StorageKind {
        StorageKind::Ram
    }

    fn capabilities(&self) -> Capabilities {
        // Loads share the stored buffer (no copy); other processes cannot see it.
        Capabilities::new(true, false)
    }

    fn footprint(&self, len: u64) -> u64 {
        len
    }

    fn put(&self, mut object: NewObject<'_>) -> Result<PutOutcome> {
        let mut bytes = Vec::with_capacity(object.len as usize);
        match object.write_to(&mut bytes) {
            Ok(()) => {}
            Err(WriteFailure::Data(e)) => return Err(e),
            Err(WriteFailure::Sink(e)) => return Err(Error::io("fill a buffer for", "memory tier", e)),
        }
        let r = ObjectRef { id: object.id, len: object.len, slot: 0, held: object.len };
        self.objects().insert(object.id, Arc::new(bytes));
        Ok(PutOutcome::Stored(r))
    }

    fn get(&self, object: &ObjectRef) -> Result<Option<Payload>> {
        Ok(self
            .objects()
            .get(&object.id)
            .map(|b| Payload::from_shared(Arc::clone(b) as Arc<dyn AsRef<[u8]> + Send + Sync>)))
    }

    fn delete(&self, object: &ObjectRef) -> Result<bool> {
        Ok(self.objects().remove(&object.id).is_some())
    }

    fn locate(&self, _object: &ObjectRef) -> Location {
        Location::default()
    }

    fn usage(&self) -> Result<TierUsage> {
        let objects = self.objects();
        Ok(TierUsage { bytes: objects.values().map(|b| b.len() as u64).sum(), objects: objects.len() as u64 })
    }

    fn destroy(&self) -> Result<()> {
        self.objects().clear();
        Ok(())
    }
}

fn main() -> Result<()> {
    // 1. The conformance kit: every check of the StorageTier contract, each on a fresh tier.
    //    In your own crate's tests, one line does the same as #[test]s:
    //    context_core::tier_conformance_tests!(|| Box::new(MapTier::default()));
    testing::run_all(|| Box::new(MapTier::default()));
    println!("conformance kit: all {} checks passed for the memory tier", testing::CHECKS.len());

    // 2. A context that uses it first, and the built-in tiers after it.
    let dir = std::env::temp_dir().join("workflow-context-custom-tier");
    let ctx = WorkflowContext::builder()
        .contexts_dir(&dir)
        .tier(Arc::new(MapTier::default()))
        .policy(Prefer::first(Rule::named("memory").and(Rule::size_below(1 << 20))).then(Rule::any()))
        .create()?;
    ctx.save("prompt", "a lighthouse at dusk")?;
    ctx.save_bytes("frame", &vec![7u8; 4 << 20], Default::default())?;
    for key in ctx.list_keys()? {
        let info = ctx.storage_info(&key)?.expect("listed keys exist");
        println!("{key:<8} -> tier {:<7} {:?}, {} bytes", info.tier, info.storage_type, info.len);
    }
    assert_eq!(ctx.storage_info("prompt")?.expect("saved").tier, "memory");
    assert_eq!(ctx.load::<String>("prompt")?, "a lighthouse at dusk");
    assert_ne!(ctx.storage_info("frame")?.expect("saved").tier, "memory", "large values go to the built-in tiers");
    Ok(())
}
