//! [`GraphTier`]: the tier that holds the records of by-reference values.
//!
//! Recipes are stored like any disk value, one file each, so the tier is the mmap tier
//! under its own name, directory and size limit: every call is forwarded to it.

use std::io;
use std::path::{Path, PathBuf};

use context_core::{
    Capabilities, Error, Location, NewObject, ObjectRef, Payload, PutOutcome, Result, StorageKind, StorageTier,
    TierUsage,
};
use context_tier_mmap::{MmapConfig, MmapTier};

use crate::graph::MAX_GRAPH_BYTES;

/// The largest object the tier stores: the largest graph encoding, plus room for the
/// chosen output (a node id of up to 256 bytes), the encoding's framing and the context's
/// record header and trailer.
pub(crate) const MAX_OBJECT_BYTES: u64 = MAX_GRAPH_BYTES as u64 + 4096;

/// The configuration of a [`GraphTier`]: the directory that holds one context's recipes.
#[derive(Clone, Debug)]
pub struct GraphConfig {
    dir: PathBuf,
}

impl GraphConfig {
    /// A configuration keeping recipe files in `dir`.
    ///
    /// [`GraphTier::new`] creates `dir` (mode 0700) if it is missing; its parent must exist.
    /// The directory belongs to one context: [`StorageTier::destroy`] removes it whole.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        GraphConfig { dir: dir.into() }
    }
}

/// A disk tier keeping one file per object, for the recipes of values passed by reference;
/// see the [crate] docs.
///
/// It stores opaque objects and never parses them. Cheap to build; holds no open files
/// between calls, so any number of instances, in any number of processes, can share one
/// directory.
#[derive(Debug)]
pub struct GraphTier {
    files: MmapTier,
}

impl GraphTier {
    /// Opens the tier over `config`'s directory, creating the directory (mode 0700) if it
    /// is missing.
    ///
    /// # Errors
    /// [`Error::Io`] naming the directory if it cannot be created (for example, its parent
    /// is missing), or if it exists but is a symbolic link, not a directory, or not owned by
    /// the effective user of this process.
    pub fn new(config: GraphConfig) -> Result<Self> {
        Ok(GraphTier { files: MmapTier::new(MmapConfig::new(config.dir))? })
    }

    /// The directory that holds this context's recipe files.
    pub fn dir(&self) -> &Path {
        self.files.dir()
    }

    fn too_large(&self, what: &str, len: u64) -> Error {
        Error::io(
            "store a recipe in",
            self.files.dir(),
            io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("{what} is {len} bytes, over the graph tier's limit of {MAX_OBJECT_BYTES}"),
            ),
        )
    }
}

#[deny(clippy::missing_trait_methods)]
impl StorageTier for GraphTier {
    fn name(&self) -> &str {
        "graph"
    }

    fn kind(&self) -> StorageKind {
        StorageKind::Disk
    }

    fn capabilities(&self) -> Capabilities {
        self.files.capabilities()
    }

    fn footprint(&self, len: u64) -> u64 {
        self.files.footprint(len)
    }

    /// Refuses an object over the limit before asking for its bytes; stores the rest as
    /// the mmap tier does.
    fn put(&self, object: NewObject<'_>) -> Result<PutOutcome> {
        if object.len > MAX_OBJECT_BYTES {
            return Err(self.too_large("the object", object.len));
        }
        self.files.put(object)
    }

    /// Reads a recipe; a file grown past the limit behind the tier's back is corrupt.
    fn get(&self, object: &ObjectRef) -> Result<Option<Payload>> {
        let payload = self.files.get(object)?;
        if let Some(p) = &payload
            && p.len() as u64 > MAX_OBJECT_BYTES
        {
            let path = self.files.locate(object).path.unwrap_or_default();
            return Err(Error::corrupt(
                path.display().to_string(),
                format!("the recipe is {} bytes, over the graph tier's limit of {MAX_OBJECT_BYTES}", p.len()),
            ));
        }
        Ok(payload)
    }

    fn prefetch(&self, _slot: u64) {
        // A recipe is a file read once per rebuild of its value: nothing to fetch ahead.
    }

    fn delete(&self, object: &ObjectRef) -> Result<bool> {
        self.files.delete(object)
    }

    fn locate(&self, object: &ObjectRef) -> Location {
        self.files.locate(object)
    }

    fn usage(&self) -> Result<TierUsage> {
        self.files.usage()
    }

    fn destroy(&self) -> Result<()> {
        self.files.destroy()
    }
}
