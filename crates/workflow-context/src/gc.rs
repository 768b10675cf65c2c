//! Collecting what crashed processes left behind.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use context_core::{Error, Result, validate_run_id};

use crate::context::{META_FILE, is_live, remove_dead_context};
use crate::fsutil;
use crate::index::Meta;

/// Where shared-memory segments show up as files.
#[cfg(feature = "tier-shm")]
const SHM_DIR: &str = "/dev/shm";
/// The prefix of a context's staging directory while it is being created.
pub(crate) const STAGING_PREFIX: &str = ".staging-";

/// What [`collect_orphans`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GcReport {
    /// Contexts (and half-created contexts) removed.
    pub contexts_removed: usize,
    /// Shared-memory segments removed with them.
    pub segments_removed: usize,
    /// Bytes of RAM and disk freed (allocated blocks, so sparse files count what they use).
    pub bytes_freed: u64,
    /// Contexts left alone because a live process holds them.
    pub live_contexts: usize,
}

/// Removes every context in `contexts_dir` that no live process holds, with all its
/// shared-memory segments and files. A context is held while any handle to it, in any
/// process, is alive: each handle keeps a lock on a file of its own in the context, and
/// the kernel releases that lock when the process dies, however it dies. Live contexts
/// are never touched, nor is anything in `contexts_dir` that is not a context.
///
/// Creating a context runs this on its contexts directory by default (see
/// [`ContextBuilder::collect_orphans`](crate::ContextBuilder::collect_orphans)).
///
/// ```
/// # fn main() -> workflow_context::Result<()> {
/// let dir = tempfile::tempdir().unwrap();
/// let ctx = workflow_context::WorkflowContext::builder().contexts_dir(dir.path()).create()?;
/// let report = workflow_context::collect_orphans(dir.path())?;
/// assert_eq!((report.contexts_removed, report.live_contexts), (0, 1), "a live context is left alone");
/// # drop(ctx);
/// # Ok(()) }
/// ```
///
/// # Errors
/// [`Error::Io`] if the directory cannot be read, or is not one this user may keep
/// contexts in (a symlink, another user's, or writable by others). A missing directory is
/// an empty report.
pub fn collect_orphans(contexts_dir: impl AsRef<Path>) -> Result<GcReport> {
    let base = contexts_dir.as_ref();
    let mut report = GcReport::default();
    match fs::symlink_metadata(base) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(report),
        Err(e) => return Err(Error::io("inspect contexts directory", base, e)),
        Ok(_) => fsutil::check_private_dir(base)?,
    }
    let entries = fs::read_dir(base).map_err(|e| Error::io("list contexts directory", base, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list contexts directory", base, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let path = entry.path();
        // Never follow a symlink or touch a file: only real directories can be contexts.
        let Ok(meta) = fs::symlink_metadata(&path) else { continue };
        if !meta.is_dir() {
            continue;
        }
        if name.starts_with(STAGING_PREFIX) {
            // A context that was being created when its creator died. Its segments, if any,
            // belong to the run id it was to take, which may be live elsewhere: only the
            // directory goes.
            if !is_live(&path) {
                report.bytes_freed += disk_bytes(&path);
                if fs::remove_dir_all(&path).is_ok() {
                    report.contexts_removed += 1;
                }
            }
            continue;
        }
        if validate_run_id(name).is_err() || !path.join(META_FILE).is_file() {
            continue; // not a context
        }
        // No handle is attached, so no process is in the middle of an operation: every
        // operation goes through a handle, which holds its liveness file from attaching on.
        if is_live(&path) {
            report.live_contexts += 1;
            continue;
        }
        let instance = Meta::open(&path.join(META_FILE)).ok().map(|m| m.instance());
        let (segments, shm_bytes) = instance.map_or((0, 0), |instance| shm_usage(name, instance));
        let bytes = disk_bytes(&path) + shm_bytes;
        remove_dead_context(name, &path)?;
        report.contexts_removed += 1;
        report.segments_removed += segments;
        report.bytes_freed += bytes;
    }
    Ok(report)
}

/// The shared-memory segments of the context `run_id` of instance `instance`: how many,
/// and the bytes they hold.
#[cfg(feature = "tier-shm")]
pub(crate) fn shm_usage(run_id: &str, instance: u64) -> (usize, u64) {
    let prefix = context_tier_shm::ShmConfig::new(run_id).instance(instance).prefix();
    let Ok(entries) = fs::read_dir(SHM_DIR) else { return (0, 0) };
    entries
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(&prefix)))
        .filter_map(|e| e.metadata().ok())
        .fold((0, 0), |(n, bytes), m| (n + 1, bytes + m.blocks() * 512))
}

/// A build without the shared-memory tier makes no segments.
#[cfg(not(feature = "tier-shm"))]
pub(crate) fn shm_usage(_run_id: &str, _instance: u64) -> (usize, u64) {
    (0, 0)
}

/// The allocated bytes of every file below `dir`, not following symlinks.
fn disk_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let Ok(m) = fs::symlink_metadata(e.path()) else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.blocks() * 512;
            }
        }
    }
    total
}
