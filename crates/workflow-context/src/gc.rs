//! Collecting what crashed processes left behind.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use context_core::{Error, Result, validate_run_id};

use crate::context::{META_FILE, finish_removal, is_live, remove_dead_context};
use crate::fsutil;
use crate::index::Meta;

/// Where shared-memory segments show up as files.
#[cfg(feature = "tier-shm")]
const SHM_DIR: &str = "/dev/shm";
/// The prefix of a context's staging directory while it is being created.
pub(crate) const STAGING_PREFIX: &str = ".staging-";
/// The prefix a context's directory is renamed to for its removal.
const REMOVING_PREFIX: &str = ".removing-";
/// How long a staging or removing directory with no live handle must have been left
/// unchanged before it is taken for abandoned. Its creator locks its liveness file just
/// after making it, and changes it until it moves it into place (within milliseconds); a
/// removal changes it until it is gone. Only a process stopped for this long would be
/// mistaken for dead.
pub(crate) const STAGING_GRACE: Duration = Duration::from_secs(60);

/// Removes a context's directory, renamed out of the way first (to
/// `.removing-<name>-<random>`): the run id is free at once, and a removal cut short (a
/// process killed, a file that will not go) leaves a directory that orphan collection
/// finishes, never one that looks like a context without its meta page.
///
/// A handle attaching meanwhile may still create its liveness file in it: a path looked up
/// before the rename ends in the renamed directory, where the removal may have passed
/// already (`ENOTEMPTY`). Only lookups already under way can do that, so the removal starts
/// over, a few times, until they are done.
pub(crate) fn remove_context_dir(dir: &Path) -> io::Result<()> {
    let doomed = rename_for_removal(dir)?;
    let mut tries = 0;
    loop {
        match fs::remove_dir_all(&doomed) {
            Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty && tries < REMOVAL_TRIES => {
                tries += 1;
                std::thread::sleep(REMOVAL_PAUSE);
            }
            done => return done,
        }
    }
}

/// How many times [`remove_context_dir`] starts over, and how long it waits before each
/// time: long enough for a process that was in the middle of a lookup to be scheduled.
const REMOVAL_TRIES: u32 = 20;
const REMOVAL_PAUSE: Duration = Duration::from_millis(1);

/// Renames `dir` to `.removing-<name>-<random>` beside it (one named so already keeps its
/// name: `.removing-<name>-<new random>`); returns where it is now (`dir` itself if it
/// cannot be renamed here).
pub(crate) fn rename_for_removal(dir: &Path) -> io::Result<PathBuf> {
    let mut rand = [0u8; 8];
    let doomed = match (dir.parent(), dir.file_name(), getrandom::fill(&mut rand)) {
        (Some(parent), Some(name), Ok(())) => {
            let name = name.to_string_lossy();
            let name = removing_stem(&name).unwrap_or(&name);
            parent.join(format!("{REMOVING_PREFIX}{name}-{:016x}", u64::from_le_bytes(rand)))
        }
        _ => return Ok(dir.to_owned()),
    };
    match fs::rename(dir, &doomed) {
        Ok(()) => {
            // A rename keeps the directory's modification time, which may be long past: the
            // removal starts the clock that tells a sweep it was abandoned.
            if let Ok(renamed) = fs::File::open(&doomed) {
                let _ = renamed.set_modified(SystemTime::now());
            }
            Ok(doomed)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(e),
        // Renaming cannot be done here: removed in place.
        Err(_) => Ok(dir.to_owned()),
    }
}

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
    /// Contexts that could not be told live or dead, or not wholly removed, each with what
    /// went wrong. They do not stop the collection of the others: a context that cannot be
    /// told dead is left alone, and a dead one loses every part that could be removed.
    pub failed: Vec<GcFailure>,
}

/// A context that [`collect_orphans`] could not handle, in [`GcReport::failed`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct GcFailure {
    /// The context's directory.
    pub path: PathBuf,
    /// What went wrong (the error's message).
    pub reason: String,
}

impl GcFailure {
    fn new(path: &Path, error: &Error) -> Self {
        GcFailure { path: path.to_owned(), reason: error.to_string() }
    }
}

/// Removes every context in `contexts_dir` that no live process holds, with all its
/// shared-memory segments and files. A context is held while any handle to it, in any
/// process, is alive: each handle keeps a lock on a file of its own in the context, and
/// the kernel releases that lock when the process dies, however it dies. Live contexts
/// are never touched, nor is anything in `contexts_dir` that is not a context.
///
/// A context whose liveness cannot be told (its liveness files cannot be listed or opened,
/// as when this process is out of file descriptors) is left alone and listed in
/// [`GcReport::failed`], as is a dead one that could not be wholly removed; neither stops
/// the collection of the others. A context still being created counts as abandoned only
/// once nothing has changed in it for a minute with no live handle.
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
        if name.starts_with(STAGING_PREFIX) || name.starts_with(REMOVING_PREFIX) {
            // A context that was being created when its creator died, or whose removal was
            // cut short. The segments of the first, if any, belong to the run id it was to
            // take, which may be live elsewhere: only its directory goes. The second is
            // finished: its shared memory too, if its meta page is still there to name it.
            match is_live(&path) {
                Ok(false) if unchanged_for(&meta, STAGING_GRACE) => {
                    // Claimed first, renamed (the second to `.removing-<run id>-<random>`, the
                    // first to a name that gives no run id): a sweeper running at the same time
                    // finds it gone, rather than removing it too and counting it twice.
                    let Ok(path) = rename_for_removal(&path) else { continue };
                    let (mut segments, mut bytes) = (0, disk_bytes(&path));
                    let removed = match removing_run_id(name) {
                        Some(run_id) if path.join(META_FILE).is_file() => {
                            // Its shared memory may be all there still: a collection killed
                            // right after claiming a dead context leaves it whole.
                            if let Ok(meta) = Meta::open(&path.join(META_FILE)) {
                                let (n, shm_bytes) = shm_usage(run_id, meta.instance());
                                segments = n;
                                bytes += shm_bytes;
                            }
                            finish_removal(run_id, &path)
                        }
                        _ => fs::remove_dir_all(&path).map_err(|e| Error::io("remove directory", &path, e)),
                    };
                    match removed {
                        Ok(()) => {
                            report.contexts_removed += 1;
                            report.segments_removed += segments;
                            report.bytes_freed += bytes;
                        }
                        // Gone from under it: a sweeper that listed the directory under the
                        // name this one gave it claimed it in turn, and finishes and counts it.
                        Err(_) if fs::symlink_metadata(&path).is_err_and(|e| e.kind() == io::ErrorKind::NotFound) => {}
                        Err(e) => report.failed.push(GcFailure::new(&path, &e)),
                    }
                }
                Ok(_) => {}
                Err(e) => report.failed.push(GcFailure::new(&path, &e)),
            }
            continue;
        }
        if validate_run_id(name).is_err() || !path.join(META_FILE).is_file() {
            continue; // not a context
        }
        // No handle is attached, so no process is in the middle of an operation: every
        // operation goes through a handle, which holds its liveness file from attaching on.
        // One whose liveness cannot be told is left alone.
        match is_live(&path) {
            Ok(false) => {}
            Ok(true) => {
                report.live_contexts += 1;
                continue;
            }
            Err(e) => {
                report.failed.push(GcFailure::new(&path, &e));
                continue;
            }
        }
        let instance = match Meta::open(&path.join(META_FILE)) {
            Ok(meta) => Some(meta.instance()),
            // Removed meanwhile, by its owner's shutdown (which renames the directory away
            // while it still holds its liveness file) or by another collection: not ours to
            // count.
            Err(Error::Io { ref source, .. }) if source.kind() == io::ErrorKind::NotFound => continue,
            // Unreadable: its directory still goes, its shared memory stays (see
            // `remove_dead_context`).
            Err(_) => None,
        };
        let (segments, shm_bytes) = instance.map_or((0, 0), |instance| shm_usage(name, instance));
        let bytes = disk_bytes(&path) + shm_bytes;
        match remove_dead_context(name, &path) {
            // A handle took it meanwhile.
            Ok(false) => {}
            Ok(true) => {
                report.contexts_removed += 1;
                report.segments_removed += segments;
                report.bytes_freed += bytes;
            }
            Err(e) => report.failed.push(GcFailure::new(&path, &e)),
        }
    }
    Ok(report)
}

/// The run id of a directory named for its removal (`.removing-<run id>-<16 hex digits>`).
fn removing_run_id(name: &str) -> Option<&str> {
    removing_stem(name).filter(|run_id| validate_run_id(run_id).is_ok())
}

/// What a directory named for its removal (`.removing-<name>-<16 hex digits>`) was named.
fn removing_stem(name: &str) -> Option<&str> {
    let (stem, random) = name.strip_prefix(REMOVING_PREFIX)?.rsplit_once('-')?;
    (random.len() == 16 && random.bytes().all(|b| b.is_ascii_hexdigit())).then_some(stem)
}

/// Whether the directory `meta` describes has not changed (no entry made or removed in it)
/// for `grace`; a modification time in the future counts as now.
pub(crate) fn unchanged_for(meta: &fs::Metadata, grace: Duration) -> bool {
    meta.modified().is_ok_and(|at| SystemTime::now().duration_since(at).is_ok_and(|age| age >= grace))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_renamed_for_removal_is_not_taken_for_abandoned() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("dead-run");
        fs::create_dir_all(dir.join("values")).unwrap();
        fs::write(dir.join("values/x"), b"left").unwrap();
        // A context dead for long: its directory unchanged for two minutes.
        let two_minutes_ago = SystemTime::now() - Duration::from_secs(120);
        fs::File::open(&dir).unwrap().set_modified(two_minutes_ago).unwrap();
        // Another process starts removing it: renamed, not yet emptied.
        let doomed = rename_for_removal(&dir).unwrap();
        assert!(doomed.file_name().unwrap().to_str().unwrap().starts_with(REMOVING_PREFIX));
        assert!(!unchanged_for(&fs::symlink_metadata(&doomed).unwrap(), STAGING_GRACE));
        let report = collect_orphans(base.path()).unwrap();
        assert_eq!(report, GcReport::default(), "a removal begun a moment ago is left to its remover");
        assert!(doomed.join("values/x").exists());
        fs::remove_dir_all(&doomed).unwrap();
        assert!(matches!(rename_for_removal(&dir), Err(e) if e.kind() == io::ErrorKind::NotFound));
    }

    #[test]
    fn sweepers_at_once_remove_each_abandoned_directory_once() {
        let two_minutes_ago = SystemTime::now() - Duration::from_secs(120);
        // A claim keeps the name the directory had before its removal began, however often
        // it is claimed.
        let base = tempfile::tempdir().unwrap();
        let made = format!("{STAGING_PREFIX}made-{:016x}", 7);
        let mut dir = base.path().join(&made);
        fs::create_dir(&dir).unwrap();
        for _ in 0..3 {
            dir = rename_for_removal(&dir).unwrap();
        }
        assert_eq!(removing_stem(dir.file_name().unwrap().to_str().unwrap()), Some(&*made));
        for round in 0..20 {
            let base = tempfile::tempdir().unwrap();
            // Directories whose creation or removal was cut short long ago.
            let names: Vec<String> = (0..8)
                .flat_map(|i| {
                    [format!("{REMOVING_PREFIX}gone-{i}-{i:016x}"), format!("{STAGING_PREFIX}made-{i}-{i:016x}")]
                })
                .collect();
            for name in &names {
                let dir = base.path().join(name);
                fs::create_dir_all(dir.join("procs")).unwrap();
                fs::create_dir_all(dir.join("values")).unwrap();
                for f in 0..20 {
                    fs::write(dir.join("values").join(f.to_string()), [7; 5000]).unwrap();
                }
                fs::File::open(&dir).unwrap().set_modified(two_minutes_ago).unwrap();
            }
            let reports: Vec<GcReport> = std::thread::scope(|s| {
                let sweepers: Vec<_> = (0..4).map(|_| s.spawn(|| collect_orphans(base.path()).unwrap())).collect();
                sweepers.into_iter().map(|t| t.join().unwrap()).collect()
            });
            let removed: usize = reports.iter().map(|r| r.contexts_removed).sum();
            let failed: Vec<&GcFailure> = reports.iter().flat_map(|r| &r.failed).collect();
            assert!(failed.is_empty(), "round {round}: {failed:.300?}");
            assert_eq!(removed, names.len(), "round {round}: each removed once, by one sweeper: {reports:.300?}");
            assert_eq!(fs::read_dir(base.path()).unwrap().count(), 0, "round {round}");
        }
    }
}
