//! [`WorkflowContext`] and [`ContextBuilder`].

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use context_core::record::{self, FLAG_TYPED};
use context_core::{
    Budget, Error, NewObject, ObjectData, ObjectId, PassBy, Payload, PlacementPolicy, PlacementRequest, PutOutcome,
    RamFirst, Result, SaveOptions, StorageInfo, StorageKind, StorageTier, TierStatus, Usage, validate_key,
    validate_run_id,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{self, CONFIG_ENV, FileConfig};
use crate::fork::Process;
use crate::index::{Entry, Meta, Placed, Rec, Replica, STATE_CLOSED};
use crate::table::Lookup;
use crate::{codec, export, fsutil, tiers};

/// Records up to this size are written while holding the index lock (one critical
/// section); larger ones are written outside it, between two short ones.
const SMALL_RECORD: u64 = 64 << 10;
/// Checked views of records at least this large are kept, so loading them again is O(1).
const VIEW_CACHE_MIN: usize = 64 << 10;
/// How many checked views one handle keeps at most.
const VIEW_CACHE_MAX: usize = 4096;

pub(crate) const META_FILE: &str = "meta";
/// How long a handle waits before it tries again to reclaim an in-flight object that a tier
/// failed to delete.
const RECLAIM_RETRY: Duration = Duration::from_millis(100);
pub(crate) const PROCS_DIR: &str = "procs";

/// A scratch store for one workflow run, shared by every process that attaches to it.
///
/// Values live in RAM (POSIX shared memory) while the run's RAM budget has room and spill
/// to disk when it has not. Every attached process sees every key as soon as `save`
/// returns. See the crate documentation for a tour.
///
/// The handle that created the context owns it: dropping that handle, or calling
/// [`shutdown`](Self::shutdown) from any handle, removes every segment and file of the
/// context. Handles from [`open`](Self::open) only detach when dropped.
///
/// A handle belongs to the process that opened it. A process forked from that one without
/// `exec` (a worker pool that forks) inherits a copy, which refuses every call there with
/// [`Error::Forked`] and, dropped there, leaves the context, the liveness of its parent's
/// handles and the tiers' state alone: the child opens the context again for a handle of
/// its own.
///
/// # Errors
/// Besides what each method's own section lists: every call in a forked child is
/// [`Error::Forked`]; after a [`shutdown`](Self::shutdown) (from any handle) every call
/// but `shutdown` is [`Error::Closed`]; a key that is empty or over 4096 bytes is
/// [`Error::InvalidKey`]; a damaged index file is [`Error::Corrupt`], and a failed system
/// call [`Error::Io`].
pub struct WorkflowContext {
    run_id: String,
    dir: PathBuf,
    owner: bool,
    /// The process that opened this handle: a child forked from it inherits a copy, which
    /// must neither act nor clean up in that process's name (see [`crate::fork`]).
    process: Process,
    token: u64,
    meta: Meta,
    replica: RwLock<Replica>,
    /// Serializes this handle's threads before they take the index lock.
    writer: Mutex<()>,
    tiers: Vec<Arc<dyn StorageTier>>,
    /// How many of `tiers`, from the first, this handle built for its context (the rest are
    /// the user's).
    built_tiers: usize,
    /// The tiers of `tiers` that keep values in RAM: told where a value is about to be read.
    ram_tiers: Vec<Arc<dyn StorageTier>>,
    /// The tier that holds the recipes of values passed by reference, kept out of placement.
    pub(crate) recipe_tier: Option<Arc<dyn StorageTier>>,
    policy: Arc<dyn PlacementPolicy>,
    liveness: Mutex<Option<(File, PathBuf)>>,
    closed: AtomicBool,
    /// Set once this handle has let go of what its RAM tiers keep mapped of a context that
    /// another handle ended (see [`Self::leave_ended_context`]).
    left_ended: AtomicBool,
    /// Replaced or removed objects whose tier failed to delete them, to try again.
    deferred: Mutex<Vec<Placed>>,
    /// When this handle may next try to reclaim an in-flight object that a tier failed to
    /// delete: a reclaim asks every tier, so while one keeps failing it is not tried at every
    /// lock.
    reclaim_after: Mutex<Option<Instant>>,
    #[cfg(feature = "tier-graph")]
    pub(crate) refs: crate::refs::Refs,
}

impl fmt::Debug for WorkflowContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkflowContext")
            .field("run_id", &self.run_id)
            .field("dir", &self.dir)
            .field("owner", &self.owner)
            .field("tiers", &self.tiers.iter().map(|t| t.name()).collect::<Vec<_>>())
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

enum RamLimit {
    Bytes(u64),
    Gib(f64),
}

/// Configures and creates or opens a [`WorkflowContext`].
///
/// ```
/// # fn main() -> workflow_context::Result<()> {
/// use workflow_context::WorkflowContext;
/// let dir = tempfile::tempdir().unwrap();
/// let ctx = WorkflowContext::builder()
///     .contexts_dir(dir.path())
///     .max_ram_bytes(64 << 20)
///     .run_id("render-42")
///     .create()?;
/// assert_eq!(ctx.run_id(), "render-42");
/// assert_eq!(ctx.usage()?.ram_capacity_bytes, if cfg!(feature = "tier-shm") { 64 << 20 } else { 0 });
/// # Ok(()) }
/// ```
#[must_use]
pub struct ContextBuilder {
    config_path: Option<PathBuf>,
    max_ram: Option<RamLimit>,
    max_disk: Option<u64>,
    run_id: Option<String>,
    contexts_dir: Option<PathBuf>,
    sweep: bool,
    setup: Setup,
}

/// What a handle brings of its own: how it places values, and tiers of the user's.
struct Setup {
    policy: Arc<dyn PlacementPolicy>,
    extra_tiers: Vec<Arc<dyn StorageTier>>,
    #[cfg(feature = "tier-graph")]
    runner: Option<Arc<dyn context_tier_graph::GraphRunner>>,
}

impl fmt::Debug for ContextBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContextBuilder")
            .field("config_path", &self.config_path)
            .field("run_id", &self.run_id)
            .field("contexts_dir", &self.contexts_dir)
            .field("max_disk", &self.max_disk)
            .field("policy", &self.setup.policy)
            .field("extra_tiers", &self.setup.extra_tiers)
            .finish_non_exhaustive()
    }
}

impl ContextBuilder {
    fn new() -> Self {
        ContextBuilder {
            config_path: None,
            max_ram: None,
            max_disk: None,
            run_id: None,
            contexts_dir: None,
            sweep: true,
            setup: Setup {
                policy: Arc::new(RamFirst::default()),
                extra_tiers: Vec::new(),
                #[cfg(feature = "tier-graph")]
                runner: None,
            },
        }
    }

    /// Whether creating the context first removes the contexts that crashed processes left
    /// in the same contexts directory ([`collect_orphans`](crate::collect_orphans)); on by
    /// default. The sweep looks at every context there and touches only dead ones.
    pub fn collect_orphans(mut self, yes: bool) -> Self {
        self.sweep = yes;
        self
    }

    /// The disk budget in bytes, shared like the RAM budget by every attached process.
    /// Past it a save returns [`Error::OutOfDisk`] and stores nothing. Default: no limit
    /// but the file system's.
    ///
    /// It bounds what the values take, each counted as what its tier holds for it (its
    /// [`StorageInfo::size`](crate::StorageInfo::size): a value in the redb tier
    /// compressed), though a save needs room for the value's whole footprint (for redb, its
    /// uncompressed size) while it is written. It does not bound the size of the files: the
    /// key table, the journal and the redb database's own pages come on top (a redb file of
    /// many small values is about half as large again as the values). Only the creator's
    /// budgets count: a handle that opens the context ignores its own.
    ///
    /// ```
    /// # fn main() -> workflow_context::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use workflow_context::core::Compressed;
    /// use workflow_context::{SaveOptions, WorkflowContext};
    /// let ctx = WorkflowContext::builder().contexts_dir(dir.path()).max_disk_bytes(1 << 20).policy(Compressed).create()?;
    /// # #[cfg(feature = "tier-redb")] {
    /// let text = "lorem ipsum ".repeat(50_000); // 600 KB that compress well
    /// ctx.save_bytes("a", text.as_bytes(), SaveOptions::new())?;
    /// ctx.save_bytes("b", text.as_bytes(), SaveOptions::new())?; // 1.2 MB: within 1 MiB, compressed
    /// assert_eq!(ctx.usage()?.temp_disk_usage_bytes, 2 * ctx.storage_info("a")?.unwrap().size);
    /// # }
    /// # Ok(()) }
    /// ```
    pub fn max_disk_bytes(mut self, bytes: u64) -> Self {
        self.max_disk = Some(bytes);
        self
    }

    /// How this handle places the values it saves (default [`RamFirst`]). Whatever the
    /// policy, budgets hold, `use_ram(false)` keeps a value out of RAM and `ram_only(true)`
    /// keeps it out of disk tiers.
    ///
    /// ```
    /// # fn main() -> workflow_context::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use workflow_context::{StorageKind, WorkflowContext};
    /// use workflow_context::core::DiskOnly;
    /// let ctx = WorkflowContext::builder().contexts_dir(dir.path()).policy(DiskOnly::default()).create()?;
    /// # #[cfg(any(feature = "tier-mmap", feature = "tier-redb"))] {
    /// ctx.save("seed", &7u32)?;
    /// assert_eq!(ctx.storage_info("seed")?.unwrap().storage_type, StorageKind::Disk);
    /// # }
    /// # Ok(()) }
    /// ```
    pub fn policy(mut self, policy: impl PlacementPolicy + 'static) -> Self {
        self.setup.policy = Arc::new(policy);
        self
    }

    /// The runner that rebuilds values passed by reference (see
    /// [`WorkflowContext::load_ref`]).
    #[cfg(feature = "tier-graph")]
    pub fn graph_runner(mut self, runner: Arc<dyn context_tier_graph::GraphRunner>) -> Self {
        self.setup.runner = Some(runner);
        self
    }

    /// Adds a tier of your own beside the built-in ones (placed by the policy like any
    /// other). Its name must differ from every other tier's. For other processes to read
    /// what it holds, they must add the same tier, and it must share its storage with them.
    pub fn tier(mut self, tier: Arc<dyn StorageTier>) -> Self {
        self.setup.extra_tiers.push(tier);
        self
    }

    /// Reads settings from this JSON file (comments allowed) instead of the file named by
    /// the `WORKFLOW_CONTEXT_CONFIG` environment variable.
    pub fn config_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.config_path = Some(path.into());
        self
    }

    /// The RAM budget in GiB (2^30 bytes); wins over the configuration file. Only the
    /// creator's budget counts: a handle that opens the context ignores its own.
    pub fn max_ram_gb(mut self, gib: f64) -> Self {
        self.max_ram = Some(RamLimit::Gib(gib));
        self
    }

    /// The RAM budget in bytes; wins over the configuration file. Only the creator's
    /// budget counts: a handle that opens the context ignores its own.
    pub fn max_ram_bytes(mut self, bytes: u64) -> Self {
        self.max_ram = Some(RamLimit::Bytes(bytes));
        self
    }

    /// The run id: 1 to 64 of `[A-Za-z0-9_-]`. When creating without one, a unique id is
    /// generated from a secure random source. Opening needs one.
    pub fn run_id(mut self, run_id: impl Into<String>) -> Self {
        self.run_id = Some(run_id.into());
        self
    }

    /// The base directory that holds contexts (one subdirectory per run id). Default: the
    /// temp dir joined with `CONTEXTS_DIR_NAME` from the configuration, or
    /// `workflow_contexts`. A relative path is taken from the working directory when the
    /// context is created or opened.
    pub fn contexts_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.contexts_dir = Some(dir.into());
        self
    }

    fn file_config(&self) -> Result<FileConfig> {
        let path = match &self.config_path {
            Some(p) => Some(p.clone()),
            None => std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()).map(PathBuf::from),
        };
        match path {
            Some(p) => FileConfig::load(&p),
            None => Ok(FileConfig { source_name: "defaults".into(), ..FileConfig::default() }),
        }
    }

    /// The contexts directory, made absolute: the context's paths are kept, and a relative
    /// one would name another place once the program changes its working directory.
    fn base_dir(&self, file: &FileConfig) -> Result<PathBuf> {
        let base = self.contexts_dir.clone().unwrap_or_else(|| file.contexts_dir());
        std::path::absolute(&base).map_err(|e| Error::io("resolve contexts directory", &base, e))
    }

    fn ram_capacity(&self, file: &FileConfig) -> Result<u64> {
        match self.max_ram {
            Some(RamLimit::Bytes(b)) => Ok(b),
            Some(RamLimit::Gib(gb)) => {
                config::check_gb(gb).map_err(|m| Error::Config {
                    source_name: "builder".into(),
                    key: Some("max_ram_gb".into()),
                    message: format!("{m} (got {gb})"),
                })?;
                Ok(config::gb_to_bytes(gb))
            }
            None => config::ram_budget(file, config::memory_limit()),
        }
    }

    /// Creates a new context.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad configuration (the file's, or the builder's: a
    /// `max_ram_gb` that is negative or not a number, a tier name used twice);
    /// [`Error::InvalidRunId`]; [`Error::AlreadyExists`] if a live context already has this
    /// run id, or something that is not a context (a symlink, a file) has its name (a dead
    /// context left by a crash is cleaned up and replaced); [`Error::Io`] if the directory
    /// cannot be made, or the contexts directory is refused (a symlink, a file, another
    /// user's, or writable by others).
    pub fn create(self) -> Result<WorkflowContext> {
        let file = self.file_config()?;
        let ram_capacity = self.ram_capacity(&file)?;
        let base = self.base_dir(&file)?;
        let run_id = match &self.run_id {
            Some(id) => {
                validate_run_id(id)?;
                id.clone()
            }
            None => format!("{:016x}{:016x}", random_u64(&base)?, random_u64(&base)?),
        };
        fsutil::ensure_private_dir(&base)?;
        if self.sweep {
            // Best effort: a failed sweep must not stop a run from starting.
            let _ = crate::gc::collect_orphans(&base);
        }
        WorkflowContext::create_in(&base, run_id, (ram_capacity, self.max_disk), self.setup)
    }

    /// Attaches to an existing context by its run id (set with [`run_id`](Self::run_id)).
    ///
    /// The context's RAM and disk budgets are the ones it was created with; budgets set on
    /// this builder are ignored.
    ///
    /// # Errors
    /// [`Error::ContextNotFound`] if there is no such context, [`Error::Closed`] if it is
    /// being shut down, [`Error::InvalidRunId`] if no valid run id was given;
    /// [`Error::Config`] for a bad configuration file (it is read for `CONTEXTS_DIR_NAME`)
    /// or a tier name used twice; [`Error::Corrupt`] if the context's meta page, journal or
    /// key table is damaged; [`Error::Io`] if the contexts directory is refused (a symlink,
    /// a file, another user's, or writable by others), a symlink or a file is where the
    /// context's directory should be, or its files cannot be opened.
    pub fn open(self) -> Result<WorkflowContext> {
        let file = self.file_config()?;
        let run_id = self
            .run_id
            .clone()
            .ok_or(Error::InvalidRunId { run_id: String::new(), reason: "opening a context needs its run id" })?;
        validate_run_id(&run_id)?;
        WorkflowContext::open_in(&self.base_dir(&file)?, run_id, self.setup)
    }
}

fn random_u64(near: &Path) -> Result<u64> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| Error::io("read random bytes for", near, io::Error::other(e)))?;
    Ok(u64::from_le_bytes(b))
}

/// A handle's token: random, and never 0 (which the index lock reads as "nobody").
fn new_token(near: &Path) -> Result<u64> {
    Ok(random_u64(near)?.max(1))
}

/// Takes the liveness lock that marks a context as in use by this handle, and writes in the
/// file which process took it ([`own_mark`]).
fn register_liveness(dir: &Path, token: u64) -> Result<(File, PathBuf)> {
    let procs = liveness_dir(dir)?.unwrap_or_else(|| dir.join(PROCS_DIR));
    let path = procs.join(format!("{token:016x}"));
    let file = fsutil::create_new(&path, "create liveness file")?;
    file.lock().map_err(|e| Error::io("lock liveness file", &path, e))?;
    if let Some(mark) = own_mark() {
        // Only a hint for the liveness check: without it, the lock alone tells.
        let _ = std::os::unix::fs::FileExt::write_all_at(&file, mark.as_bytes(), 0);
    }
    Ok((file, path))
}

/// This process as a liveness file records it: `<pid> <start time> <pid namespace>`, the
/// start time in clock ticks after boot (`/proc/<pid>/stat`, field 22), the namespace as
/// `<device>:<inode>` of `/proc/self/ns/pid`; `None` without `/proc`.
///
/// Why: the kernel drops a liveness lock when the last descriptor of its open file closes,
/// and a process forked without `exec` (a worker pool that forks, as Python's
/// `multiprocessing` does) holds a copy of every descriptor of its parent. If the parent
/// dies first, its lock stays held for as long as such a child lives, and a writer would
/// wait for it that long. The mark says who took the lock: once that process is gone, the
/// lock is an heir's, and its handle is dead. (The child's copies of its parent's handles
/// refuse to act: see [`crate::fork`].)
///
/// Read from `/proc` once per process (three files: about a tenth of opening a context) and
/// kept, by pid: a forked child, whose pid differs, reads its own.
fn own_mark() -> Option<String> {
    static KEPT: Mutex<Option<(u32, Option<String>)>> = Mutex::new(None);
    let pid = std::process::id();
    // `try_lock`: in a child forked while another thread held the lock, it stays held for
    // good; the child then reads its mark each time instead of waiting forever.
    let mut kept = KEPT.try_lock().ok();
    if let Some(Some((at, mark))) = kept.as_deref()
        && *at == pid
    {
        return mark.clone();
    }
    let mark = read_own_mark(pid);
    if let Some(kept) = kept.as_deref_mut() {
        *kept = Some((pid, mark.clone()));
    }
    mark
}

/// [`own_mark`], read from `/proc`.
fn read_own_mark(pid: u32) -> Option<String> {
    let (dev, ino) = pid_namespace()?;
    Some(format!("{pid} {} {dev}:{ino}\n", start_time(pid).ok()??))
}

/// The device and inode of this process's PID namespace; `None` without `/proc`, or with
/// a `/proc` of another PID namespace (mounted before an `unshare --pid`), where the pids
/// it lists are not the ones this process's namespace gives.
fn pid_namespace() -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    if stat.split_whitespace().next()? != std::process::id().to_string() {
        return None;
    }
    fs::metadata("/proc/self/ns/pid").ok().map(|m| (m.dev(), m.ino()))
}

/// When process `pid` of this PID namespace started (field 22 of `/proc/<pid>/stat`):
/// `Ok(None)` if there is no such process, an error if that cannot be told.
fn start_time(pid: u32) -> io::Result<Option<u64>> {
    let stat = match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // The command name, in parentheses, may hold spaces and parentheses: fields are counted
    // from after its last `)`, where field 3 starts.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).ok_or_else(|| io::Error::other("no command name"))?;
    let field = after.split_whitespace().nth(22 - 3).ok_or_else(|| io::Error::other("no start time"))?;
    field.parse().map(Some).map_err(io::Error::other)
}

/// Whether the process that took the liveness lock whose file holds `mark` is gone: it ran
/// in this PID namespace and no process of its pid and start time runs now. `false` when
/// that cannot be told (no mark, another namespace, `/proc` unreadable).
fn marked_process_gone(mark: &str) -> bool {
    let mut fields = mark.split_whitespace();
    let (Some(pid), Some(start), Some(ns)) = (fields.next(), fields.next(), fields.next()) else { return false };
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else { return false };
    let Some((dev, ino)) = pid_namespace() else { return false };
    if ns != format!("{dev}:{ino}") {
        return false;
    }
    match start_time(pid) {
        Ok(Some(now)) => now != start,
        Ok(None) => true,
        Err(_) => false,
    }
}

/// Whether the context in `dir` was shut down: its meta page says so, or it is gone (a
/// shutdown moves the directory away before removing it).
fn shut_down(dir: &Path) -> bool {
    match Meta::open(&dir.join(META_FILE)) {
        Ok(meta) => meta.state() == STATE_CLOSED,
        Err(Error::Io { source, .. }) => source.kind() == io::ErrorKind::NotFound,
        Err(_) => false,
    }
}

/// The directory of the liveness files of the context in `dir`, or `None` if it has none.
///
/// # Errors
/// If something other than a directory is in its place: a symbolic link planted there is
/// never followed (a handle would make its liveness file wherever it points, and the sweep
/// of dead handles' files would remove the old files there).
fn liveness_dir(dir: &Path) -> Result<Option<PathBuf>> {
    const OP: &str = "open liveness directory";
    let procs = dir.join(PROCS_DIR);
    match fs::symlink_metadata(&procs) {
        Ok(meta) if meta.is_dir() => Ok(Some(procs)),
        Ok(_) => Err(Error::io(OP, &procs, io::Error::other("not a directory (a symlink or a file is in its place)"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(OP, &procs, e)),
    }
}

/// Whether any handle, in any process, holds the context in `dir`.
///
/// # Errors
/// When that cannot be told: its liveness files cannot be listed or opened (out of file
/// descriptors, say). Callers must then treat the context as live: taking a context for
/// dead destroys it under the feet of the processes that use it.
pub(crate) fn is_live(dir: &Path) -> Result<bool> {
    let Some(procs) = liveness_dir(dir)? else { return Ok(false) };
    let entries = match fs::read_dir(&procs) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io("list liveness files", &procs, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list liveness files", &procs, e))?;
        if holder_alive(&entry.path())? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Removes the liveness files of handles that died without a pending object (those with
/// one go when [`recover_dead`](WorkflowContext::recover_dead) deletes it): otherwise every
/// crash would leave one, for every later liveness check of the context to open and lock.
/// Only files unchanged for [`STAGING_GRACE`](crate::gc::STAGING_GRACE): a handle's file is
/// unlocked for a moment between its creation and its lock. Only files whose lock nobody
/// holds: an open costs one lock attempt per old file, not the `/proc` reads that tell a
/// forked heir's lock (such a file goes with its heir). Best effort.
fn sweep_dead_liveness(dir: &Path) {
    let Ok(Some(procs)) = liveness_dir(dir) else { return };
    let Ok(entries) = fs::read_dir(procs) else { return };
    for entry in entries.flatten() {
        let old = entry.metadata().is_ok_and(|m| crate::gc::unchanged_for(&m, crate::gc::STAGING_GRACE));
        let unlocked = || {
            let file = fsutil::open_rw_if_exists(&entry.path(), "open liveness file");
            matches!(file, Ok(Some(f)) if f.try_lock().is_ok())
        };
        if old && unlocked() {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Whether the handle whose liveness file is `path` is alive: `false` only if the file is
/// gone, nobody holds its lock, or the process that took the lock is gone (a process it
/// forked holds it; see [`own_mark`]).
///
/// # Errors
/// If the file cannot be opened for another reason (out of file descriptors or memory, a
/// permission changed): not knowing is not the same as dead.
fn holder_alive(path: &Path) -> Result<bool> {
    let Some(file) = fsutil::open_rw_if_exists(path, "open liveness file")? else { return Ok(false) };
    match file.try_lock() {
        Ok(()) => Ok(false),
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut mark = String::new();
            let read = io::Read::read_to_string(&mut io::Read::take(&file, 128), &mut mark);
            Ok(read.is_err() || !marked_process_gone(&mark))
        }
        // A lock that cannot be tried for another reason than a holder is taken as held.
        Err(std::fs::TryLockError::Error(_)) => Ok(true),
    }
}

/// Which tiers a save may use: the value tiers, placed by the policy, or the one tier
/// that holds recipes.
#[derive(Clone, Copy)]
pub(crate) enum Pool<'a> {
    Values,
    #[cfg_attr(not(feature = "tier-graph"), allow(dead_code))]
    Recipes(&'a Arc<dyn StorageTier>),
}

impl<'a> Pool<'a> {
    fn tiers(self, ctx: &'a WorkflowContext) -> &'a [Arc<dyn StorageTier>] {
        match self {
            Pool::Values => &ctx.tiers,
            Pool::Recipes(tier) => std::slice::from_ref(tier),
        }
    }
}

/// The tiers a save may use, as [`WorkflowContext::candidates`] found them.
struct Choice {
    /// Ranked, allowed by the options, and within budget: the tiers to try, in order.
    fitting: Vec<usize>,
    /// Ranked and allowed by the options: (tier, kind, footprint).
    allowed: Vec<(usize, StorageKind, u64)>,
    /// How many tiers the policy ranked.
    ranked: usize,
    /// Indexes the policy ranked that name no tier.
    unknown: Vec<usize>,
    ram: Budget,
    disk: Budget,
}

/// Kinds of tier whose file system answered "no space" during one save.
#[derive(Clone, Copy, Default)]
struct Refused {
    ram: bool,
    disk: bool,
}

/// What creating or opening a context produces before the handle is assembled.
struct Attached {
    token: u64,
    meta: Meta,
    replica: Replica,
    liveness: (File, PathBuf),
}

/// Holds the index lock: the handle's mutex, then the context's lock, then the replica.
struct WriteGuard<'a> {
    replica: RwLockWriteGuard<'a, Replica>,
    meta: &'a Meta,
    token: u64,
    _writer: MutexGuard<'a, ()>,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        self.meta.lock().release(self.token);
    }
}

fn lock_poisoned<T>(p: std::sync::PoisonError<T>) -> T {
    p.into_inner()
}

impl WorkflowContext {
    /// Creates a context with the default settings (`builder().create()`).
    ///
    /// ```
    /// # fn main() -> workflow_context::Result<()> {
    /// use workflow_context::WorkflowContext;
    /// // In the temp dir's `workflow_contexts` (or as the configuration file says).
    /// let ctx = WorkflowContext::new()?;
    /// ctx.save("prompt", "a lighthouse at dusk")?;
    /// assert_eq!(ctx.load::<String>("prompt")?, "a lighthouse at dusk");
    /// # Ok(()) }
    /// ```
    pub fn new() -> Result<Self> {
        Self::builder().create()
    }

    /// A builder for creating or opening a context.
    pub fn builder() -> ContextBuilder {
        ContextBuilder::new()
    }

    /// Attaches to the existing context `run_id` in the default contexts directory: the
    /// temp dir's `workflow_contexts`, or the `CONTEXTS_DIR_NAME` of the configuration file
    /// named by `WORKFLOW_CONTEXT_CONFIG` (the original's `create=False`).
    ///
    /// # Errors
    /// Those of [`ContextBuilder::open`].
    pub fn open(run_id: &str) -> Result<Self> {
        Self::builder().run_id(run_id).open()
    }

    fn create_in(base: &Path, run_id: String, capacity: (u64, Option<u64>), setup: Setup) -> Result<Self> {
        let token = new_token(base)?;
        let final_dir = base.join(&run_id);
        // Build the context in a private staging directory and move it into place in one
        // rename, so an opener never sees a half-made context.
        let staging = base.join(format!("{}{run_id}-{token:016x}", crate::gc::STAGING_PREFIX));
        fsutil::create_dir(&staging, "create context staging directory")?;
        let built = (|| {
            // Held first, so that an orphan collection running meanwhile sees the staging
            // directory live (see `gc::STAGING_GRACE` for the moment before).
            fsutil::create_dir(&staging.join(PROCS_DIR), "create liveness directory")?;
            let (live_file, _) = register_liveness(&staging, token)?;
            let meta = Meta::create(&staging.join(META_FILE), capacity.0, capacity.1, random_u64(base)?)?;
            let replica = Replica::create(&staging)?;
            fsutil::create_dir(&staging.join(tiers::VALUES_DIR), "create values directory")?;
            Ok::<_, Error>((meta, replica, live_file))
        })();
        let (meta, mut replica, live_file) = match built {
            Ok(parts) => parts,
            Err(e) => {
                let _ = fs::remove_dir_all(&staging);
                return Err(e);
            }
        };
        let mut replaced_stale = false;
        loop {
            match rustix::fs::renameat_with(
                rustix::fs::CWD,
                &staging,
                rustix::fs::CWD,
                &final_dir,
                rustix::fs::RenameFlags::NOREPLACE,
            ) {
                Ok(()) => break,
                Err(e) if (e == rustix::io::Errno::EXIST || e == rustix::io::Errno::NOTEMPTY) && !replaced_stale => {
                    // Only a real context directory may be replaced; a symlink, a file or a
                    // foreign directory under this name is left alone.
                    let is_context = fs::symlink_metadata(&final_dir).is_ok_and(|m| m.is_dir())
                        && fs::symlink_metadata(final_dir.join(META_FILE)).is_ok_and(|m| m.is_file());
                    if !is_context {
                        let _ = fs::remove_dir_all(&staging);
                        return Err(Error::AlreadyExists { what: "something that is not a context", path: final_dir });
                    }
                    match is_live(&final_dir) {
                        Ok(false) => {}
                        Ok(true) => {
                            let _ = fs::remove_dir_all(&staging);
                            return Err(Error::AlreadyExists { what: "live context", path: final_dir });
                        }
                        Err(e) => {
                            let _ = fs::remove_dir_all(&staging);
                            return Err(e);
                        }
                    }
                    // Left behind by a crash: nobody holds it. Remove it and its segments.
                    replaced_stale = true;
                    // A part that could not be removed (a damaged database, say) matters only if
                    // the directory is still in the way: the new context's segments are named by
                    // an instance of its own.
                    match remove_dead_context(&run_id, &final_dir) {
                        Ok(true) => {}
                        // A handle holds it after all.
                        Ok(false) if fs::symlink_metadata(&final_dir).is_ok() => {
                            let _ = fs::remove_dir_all(&staging);
                            return Err(Error::AlreadyExists { what: "live context", path: final_dir });
                        }
                        Ok(false) => {}
                        Err(_) if fs::symlink_metadata(&final_dir).is_err() => {}
                        Err(e) => {
                            let _ = fs::remove_dir_all(&staging);
                            return Err(e);
                        }
                    }
                }
                Err(e) => {
                    let _ = fs::remove_dir_all(&staging);
                    return Err(Error::io("move new context into place at", &final_dir, e.into()));
                }
            }
        }
        replica.moved_to(&final_dir);
        let live_path = final_dir.join(PROCS_DIR).join(format!("{token:016x}"));
        let attached = Attached { token, meta, replica, liveness: (live_file, live_path) };
        match Self::assemble(run_id.clone(), final_dir.clone(), true, attached, setup) {
            Ok(ctx) => Ok(ctx),
            Err(e) => {
                let _ = remove_dead_context(&run_id, &final_dir);
                Err(e)
            }
        }
    }

    /// Builds the tiers and the handle around an attached context.
    fn assemble(run_id: String, dir: PathBuf, owner: bool, parts: Attached, setup: Setup) -> Result<Self> {
        let process = crate::fork::this_process();
        let mut tiers = tiers::build(&run_id, Some(parts.meta.instance()), &dir)?;
        let built_tiers = tiers.len();
        let recipe_tier = tiers::recipes(&dir)?;
        for extra in setup.extra_tiers {
            if extra.name().len() > crate::table::TIER_NAME_MAX || extra.name().is_empty() {
                return Err(Error::Config {
                    source_name: "builder".into(),
                    key: Some("tier".into()),
                    message: format!(
                        "the tier name {:?} must be 1 to {} bytes long",
                        extra.name(),
                        crate::table::TIER_NAME_MAX
                    ),
                });
            }
            // The recipe tier's name too: lookups by name would find either.
            if tiers.iter().chain(&recipe_tier).any(|t| t.name() == extra.name()) {
                return Err(Error::Config {
                    source_name: "builder".into(),
                    key: Some("tier".into()),
                    message: format!("two tiers are named {:?}; tier names must be unique", extra.name()),
                });
            }
            tiers.push(extra);
        }
        let ram_tiers = tiers.iter().filter(|t| t.kind() == StorageKind::Ram).cloned().collect();
        Ok(WorkflowContext {
            run_id,
            dir,
            owner,
            process,
            token: parts.token,
            meta: parts.meta,
            replica: RwLock::new(parts.replica),
            writer: Mutex::new(()),
            tiers,
            built_tiers,
            ram_tiers,
            recipe_tier,
            policy: setup.policy,
            liveness: Mutex::new(Some(parts.liveness)),
            closed: AtomicBool::new(false),
            left_ended: AtomicBool::new(false),
            deferred: Mutex::new(Vec::new()),
            reclaim_after: Mutex::new(None),
            #[cfg(feature = "tier-graph")]
            refs: crate::refs::Refs::new(setup.runner),
        })
    }

    fn open_in(base: &Path, run_id: String, setup: Setup) -> Result<Self> {
        let dir = base.join(&run_id);
        let not_found = || Error::ContextNotFound { run_id: run_id.clone(), dir: base.to_owned() };
        // A contexts directory is refused as `create` refuses it: a context found through a
        // symlink, or in a directory that others may write to, may be anyone's.
        match fs::symlink_metadata(base) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found()),
            _ => fsutil::check_private_dir(base)?,
        }
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::io(
                    "open context directory",
                    &dir,
                    io::Error::other("not a directory (a symlink or a file is in its place)"),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found()),
            Err(e) => return Err(Error::io("open context directory", &dir, e)),
        }
        let meta = match Meta::open(&dir.join(META_FILE)) {
            Ok(m) => m,
            Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => return Err(not_found()),
            Err(e) => return Err(e),
        };
        if meta.state() == STATE_CLOSED {
            return Err(Error::Closed { run_id });
        }
        let token = new_token(&dir)?;
        let (live_file, live_path) = match register_liveness(&dir, token) {
            Ok(l) => l,
            // The context was shut down and removed between our checks.
            Err(_) if meta.state() == STATE_CLOSED => return Err(Error::Closed { run_id }),
            Err(e) => return Err(e),
        };
        // Until the handle exists, a failure must take the liveness file back with it. One
        // that comes from a shutdown meanwhile (the context's files going while this handle
        // maps them and builds its tiers) is `Closed`, whatever file it found missing.
        let unregister = |e: Error| {
            let _ = fs::remove_file(&live_path);
            if shut_down(&dir) { Error::Closed { run_id: run_id.clone() } } else { e }
        };
        // Shut down (or collected as dead) between the first check and the registration.
        if meta.state() == STATE_CLOSED {
            return Err(unregister(Error::Closed { run_id: run_id.clone() }));
        }
        let replica = Replica::open(&dir, &meta).map_err(unregister)?;
        let attached = Attached { token, meta, replica, liveness: (live_file, live_path.clone()) };
        let ctx = Self::assemble(run_id.clone(), dir.clone(), false, attached, setup).map_err(unregister)?;
        // Objects a dead writer held: pending ones, or one it was writing under the lock.
        let has_pending = !ctx.replica.read().unwrap_or_else(lock_poisoned).pending.is_empty();
        if has_pending || ctx.meta.in_flight() != 0 {
            let mut g = ctx.write_lock()?;
            ctx.recover_dead(&mut g)?;
        }
        sweep_dead_liveness(&ctx.dir);
        Ok(ctx)
    }

    /// The run id that names this context.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// This context's directory (inside the contexts directory).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Checks that the context is open, then the key: after a shutdown every call is
    /// [`Error::Closed`], whatever its arguments.
    fn check_key(&self, key: &str) -> Result<()> {
        self.check_open()?;
        validate_key(key)
    }

    fn check_open(&self) -> Result<()> {
        self.check_process()?;
        if self.is_closed() {
            return Err(self.closed_error());
        }
        Ok(())
    }

    /// Whether this handle, or another one, has shut the context down.
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.meta.state() == STATE_CLOSED
    }

    /// [`Error::Closed`], for a call on a context that [`is_closed`](Self::is_closed). A
    /// handle that finds the context ended by another first lets go of what it holds of it,
    /// so the caller must hold none of the handle's locks.
    fn closed_error(&self) -> Error {
        if !self.closed.load(Ordering::Acquire) {
            self.leave_ended_context();
        }
        Error::Closed { run_id: self.run_id.clone() }
    }

    /// Lets go of what this handle holds of a context that another handle ended: its values
    /// are gone, so its views of them and the mappings of its RAM tiers (a shared-memory
    /// tier's arenas) would only keep their memory or disk space taken. A tier lets go of
    /// its mappings at `destroy`, which removes nothing more once the context has ended (the
    /// handle that ended it destroys the same storage), so that is asked, once, of the RAM
    /// tiers this handle built for the context (a user's tier may hold other storage too).
    fn leave_ended_context(&self) {
        self.let_go_of_values();
        if !self.left_ended.swap(true, Ordering::AcqRel) {
            for tier in self.tiers[..self.built_tiers].iter().filter(|t| t.kind() == StorageKind::Ram) {
                let _ = tier.destroy();
            }
        }
    }

    /// Drops what this handle holds of the context's values: the values it rebuilt, and its
    /// views of large ones (mappings that keep a removed value's memory or disk).
    fn let_go_of_values(&self) {
        #[cfg(feature = "tier-graph")]
        self.refs.clear();
        self.replica.read().unwrap_or_else(lock_poisoned).views.lock().unwrap_or_else(lock_poisoned).clear();
    }

    /// Refuses to act in a process forked from the one that opened this handle.
    fn check_process(&self) -> Result<()> {
        let here = crate::fork::this_process();
        if !here.same(self.process) {
            return Err(Error::Forked { run_id: self.run_id.clone(), opened_by: self.process.pid(), pid: here.pid() });
        }
        Ok(())
    }

    fn write_lock(&self) -> Result<WriteGuard<'_>> {
        let mut guard = self.index_lock()?;
        if !self.deferred.lock().unwrap_or_else(lock_poisoned).is_empty() {
            self.retry_deferred(&mut guard)?;
        }
        Ok(guard)
    }

    /// Takes the index lock and brings this process's view up to date.
    fn index_lock(&self) -> Result<WriteGuard<'_>> {
        self.check_open()?;
        let writer = self.writer.lock().unwrap_or_else(lock_poisoned);
        let taken = self.take_index_lock();
        let replica = self.replica.write().unwrap_or_else(lock_poisoned);
        let mut guard = WriteGuard { replica, meta: &self.meta, token: self.token, _writer: writer };
        // Checked again under the lock: shutdown sets the state while holding it.
        if self.is_closed() {
            drop(guard);
            return Err(self.closed_error());
        }
        guard.replica.catch_up_locked(&self.meta)?;
        // A writer that died between committing and applying left the table behind.
        guard.replica.repair_table(&self.meta)?;
        // One that died while growing the table left a table file: the one it was building,
        // or the one it had just replaced.
        if matches!(taken, crate::lock::Taken::FromDead(_)) {
            guard.replica.remove_stale_tables();
        }
        if self.meta.in_flight() != 0 {
            let mut after = self.reclaim_after.lock().unwrap_or_else(lock_poisoned);
            if after.is_none_or(|at| Instant::now() >= at) {
                *after = (!self.reclaim_in_flight(&guard)).then(|| Instant::now() + RECLAIM_RETRY);
            }
        }
        Ok(guard)
    }

    /// Deletes the object a small save left in flight, unless its `Put` committed: the
    /// holder of the lock before this one died (or failed) between writing it and
    /// committing it, and no key or pending record names it. Ids are never reused, so
    /// every tier is asked to delete it by id. If a tier fails to, the note stays for the
    /// next holder to try again. The caller holds the write lock and has caught up.
    fn reclaim_in_flight(&self, g: &WriteGuard<'_>) -> bool {
        let obj = self.meta.in_flight();
        let deleted = match g.replica.commits_put_of(obj) {
            Ok(true) => true,
            Ok(false) => {
                let object = context_core::ObjectRef {
                    id: ObjectId(obj),
                    len: 0,
                    slot: context_core::ObjectRef::UNKNOWN_SLOT,
                    held: 0,
                };
                // Every tier is asked, even after one fails.
                let mut all = true;
                for tier in self.tiers.iter().chain(&self.recipe_tier) {
                    all &= tier.delete(&object).is_ok();
                }
                all
            }
            Err(_) => false,
        };
        if deleted {
            self.meta.set_in_flight(0);
        }
        deleted
    }

    /// Takes the context's index lock for this handle (whose mutex the caller holds).
    fn take_index_lock(&self) -> crate::lock::Taken {
        // A lock taken over from a dead holder needs nothing more: what it left half done
        // is repaired by the catch-up every writer starts with. (The liveness file's path is
        // built only when a holder is suspected dead, not at every save.)
        // A holder whose liveness cannot be told is waited for, as a live one is.
        self.meta
            .lock()
            .acquire(self.token, |t| holder_alive(&self.dir.join(PROCS_DIR).join(format!("{t:016x}"))).unwrap_or(true))
    }

    /// A view of the index for reading: the current key table, and the journal followed
    /// whenever this handle holds views that a change may have made stale.
    fn read_index(&self) -> Result<RwLockReadGuard<'_, Replica>> {
        self.check_open()?;
        {
            let r = self.replica.read().unwrap_or_else(lock_poisoned);
            if r.can_read(&self.meta) {
                return Ok(r);
            }
        }
        self.replica.write().unwrap_or_else(lock_poisoned).catch_up(&self.meta)?;
        Ok(self.replica.read().unwrap_or_else(lock_poisoned))
    }

    /// Looks `key` up without a lock, or under the index lock if a writer is in the middle
    /// of changing its entry (or died there: taking the lock repairs it).
    fn lookup(&self, key: &str) -> Result<Option<Entry>> {
        self.lookup_with(key, |_| {})
    }

    /// [`lookup`](Self::lookup) for a read of the value: the RAM tiers are told where the
    /// value probably is as soon as the key's slot is found, so that its bytes come from
    /// memory while the key's entry does.
    fn lookup_to_read(&self, key: &str) -> Result<Option<Entry>> {
        self.lookup_with(key, |slot| self.prefetch(slot))
    }

    /// Tells the RAM tiers that the value at location word `slot` is about to be used.
    fn prefetch(&self, slot: u64) {
        for tier in &self.ram_tiers {
            tier.prefetch(slot);
        }
    }

    fn lookup_with(&self, key: &str, prefetch: impl FnMut(u64)) -> Result<Option<Entry>> {
        let found = self.read_index()?.lookup(key, prefetch)?;
        match found {
            Lookup::Found(e) => Ok(Some(e)),
            Lookup::Missing => Ok(None),
            Lookup::Busy => self.index_lock()?.replica.get_locked(key),
        }
    }

    fn tier(&self, name: &str) -> Option<&Arc<dyn StorageTier>> {
        self.tiers.iter().chain(&self.recipe_tier).find(|t| t.name() == name)
    }

    fn has_ram_tier(&self) -> bool {
        self.tiers.iter().any(|t| t.kind() == StorageKind::Ram)
    }

    /// Deletes pending objects whose owners died (they were being written or replaced when
    /// their process was killed). Returns how many were cleaned.
    fn recover_dead(&self, g: &mut WriteGuard<'_>) -> Result<usize> {
        let mut owners: Vec<u64> = g.replica.pending.values().map(|p| p.owner).filter(|&o| o != self.token).collect();
        owners.sort_unstable();
        owners.dedup();
        // An owner whose liveness cannot be told keeps its objects until it can be.
        let dead: Vec<u64> = owners
            .into_iter()
            .filter(|o| matches!(holder_alive(&self.dir.join(PROCS_DIR).join(format!("{o:016x}"))), Ok(false)))
            .collect();
        if dead.is_empty() {
            return Ok(0);
        }
        let victims: Vec<Placed> =
            g.replica.pending.values().filter(|p| dead.contains(&p.owner)).map(|p| p.at.clone()).collect();
        let mut gone = Vec::with_capacity(victims.len());
        for at in &victims {
            // Best effort: what cannot be deleted now stays pending for a later try.
            if let Some(tier) = self.tier(&at.tier)
                && tier.delete(&at.object_ref()).is_err()
            {
                continue;
            }
            gone.push(Rec::Gone { obj: at.obj });
        }
        if !gone.is_empty() {
            g.replica.append(&self.meta, &gone)?;
        }
        for o in dead {
            let _ = fs::remove_file(self.dir.join(PROCS_DIR).join(format!("{o:016x}")));
        }
        Ok(gone.len())
    }

    /// The tiers that may take a record of `len` bytes, best first, after the policy's
    /// ranking, the save options and the budgets.
    fn candidates(&self, pool: Pool<'_>, r: &Replica, len: u64, opts: SaveOptions) -> Choice {
        let used = r.used();
        let ram = Budget { used: used.ram, capacity: Some(self.meta.ram_capacity()) };
        let disk = Budget { used: used.disk, capacity: self.meta.disk_capacity() };
        let statuses: Vec<TierStatus<'_>> = pool
            .tiers(self)
            .iter()
            .map(|t| TierStatus {
                name: t.name(),
                kind: t.kind(),
                capabilities: t.capabilities(),
                footprint: t.footprint(len),
            })
            .collect();
        let request = PlacementRequest { len, options: opts, tiers: &statuses, ram, disk };
        let mut choice = Choice { fitting: Vec::new(), allowed: Vec::new(), ranked: 0, unknown: Vec::new(), ram, disk };
        let ranked = match pool {
            Pool::Values => self.policy.rank(&request),
            Pool::Recipes(_) => vec![0],
        };
        for i in ranked {
            let Some(t) = statuses.get(i) else {
                choice.unknown.push(i);
                continue;
            };
            if choice.allowed.iter().any(|&(j, _, _)| j == i) {
                continue;
            }
            choice.ranked += 1;
            let (allowed, fits) = match t.kind {
                StorageKind::Ram => (opts.uses_ram(), ram.fits(t.footprint)),
                StorageKind::Disk => (!opts.is_ram_only(), disk.fits(t.footprint)),
            };
            if allowed {
                choice.allowed.push((i, t.kind, t.footprint));
                if fits {
                    choice.fitting.push(i);
                }
            }
        }
        choice
    }

    /// Stores a record of `len` bytes under `key`, written by `put` into the tier it is
    /// given with the object id it is given.
    ///
    /// A large record is written outside the index lock, so its object is recorded as
    /// pending first (whoever finds its writer dead deletes it). A small one is written
    /// under the lock, from its id to its commit, and noted in the meta page's in-flight word
    /// instead ([`Meta::in_flight`](crate::index::Meta::in_flight)), which the next holder of
    /// the lock reads ([`reclaim_in_flight`](Self::reclaim_in_flight)).
    ///
    /// The caller has checked the key and that the context is open
    /// ([`check_key`](Self::check_key)).
    #[allow(clippy::too_many_arguments)]
    fn store(
        &self,
        key: &str,
        len: u64,
        opts: SaveOptions,
        pass_by: PassBy,
        flags: u8,
        pool: Pool<'_>,
        put: &mut dyn FnMut(&dyn StorageTier, ObjectId) -> Result<PutOutcome>,
    ) -> Result<()> {
        if opts.is_ram_only() && !opts.uses_ram() {
            return Err(Error::InvalidOptions {
                key: key.to_owned(),
                reason: "ram_only(true) and use_ram(false) contradict each other",
            });
        }
        let small = len <= SMALL_RECORD;
        let mut g = Some(self.write_lock()?);
        // The commit looks the key up to replace its value: its slot, then its entry and old
        // value, come from memory while this save does its other work.
        g.as_ref().expect("locked").replica.prefetch_slot(key);
        let id = g.as_mut().expect("locked").replica.allocate_id();
        let mut tried: Vec<usize> = Vec::new();
        let mut refused = Refused::default();
        let mut recovered = false;
        loop {
            let guard = match g.as_mut() {
                Some(guard) => guard,
                None => g.insert(self.write_lock()?),
            };
            let choice = self.candidates(pool, &guard.replica, len, opts);
            let next = choice.fitting.iter().copied().find(|i| !tried.contains(i));
            if next.is_none() && !recovered {
                // Space may be held by writers that died mid-save: reclaim it and look again.
                recovered = true;
                if self.recover_dead(guard)? > 0 {
                    continue;
                }
            }
            let Some(choice) = next else {
                return Err(self.no_room(key, len, opts, &choice, refused));
            };
            tried.push(choice);
            let tier = Arc::clone(&pool.tiers(self)[choice]);
            let at = Placed {
                obj: id,
                tier: guard.replica.shared_tier_name(tier.name())?,
                kind: tier.kind(),
                footprint: tier.footprint(len),
                slot: context_core::ObjectRef::UNKNOWN_SLOT,
                len,
            };
            // A small value is noted in flight, unless the note holds an object that the
            // reclaim on taking the lock could not delete (a tier failed), which must stay,
            // or its id is too large to note: then it is recorded pending instead, as a
            // large one is.
            let noted = small && self.meta.in_flight() == 0 && self.meta.set_in_flight(id);
            if noted {
                guard.replica.prefetch_entry(key, |slot| self.prefetch(slot));
            } else {
                guard.replica.append(&self.meta, &[Rec::Pending { at: at.clone(), owner: self.token }])?;
                if !small {
                    g = None; // write large values outside the lock
                }
            }
            // A panic in the value's own code (its `Serialize`, or a caller's writer) must not
            // leave the object behind, nor its space counted against the budget.
            let outcome = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| put(&*tier, ObjectId(id)))) {
                Ok(outcome) => outcome,
                Err(panic) => {
                    self.take_back_unwound(g.as_mut(), &*tier, &at, noted);
                    std::panic::resume_unwind(panic);
                }
            };
            let guard = match g.as_mut() {
                Some(guard) => guard,
                None => match self.write_lock() {
                    Ok(guard) => g.insert(guard),
                    Err(e) => {
                        // Shut down meanwhile (or the lock failed): take the object back. Its
                        // pending record goes at this handle's next write, if there is one.
                        if let Ok(PutOutcome::Stored(r)) = outcome {
                            self.take_back_uncommitted(&*tier, &r);
                        }
                        self.deferred.lock().unwrap_or_else(lock_poisoned).push(at);
                        return Err(e);
                    }
                },
            };
            match outcome {
                Ok(PutOutcome::Stored(r)) => {
                    // From here on the value counts what the tier really holds.
                    let at = Placed { slot: r.slot, footprint: r.held.min(at.footprint), ..at };
                    return self.commit(guard, key, at, pass_by, flags);
                }
                // The tier kept nothing of the object. Its reservation goes now: whatever
                // happens next (the policy panics, the journal fails) must not leave it counted.
                Ok(PutOutcome::NoSpace) => {
                    if noted {
                        self.meta.set_in_flight(0);
                    } else if let Err(e) = guard.replica.append(&self.meta, &[Rec::Gone { obj: id }]) {
                        // It goes at this handle's next write.
                        self.deferred.lock().unwrap_or_else(lock_poisoned).push(at);
                        return Err(e.with_key(key));
                    }
                    match tier.kind() {
                        StorageKind::Ram => refused.ram = true,
                        StorageKind::Disk => refused.disk = true,
                    }
                }
                Err(e) => {
                    // A failed put should leave nothing, but a tier that ran out of space
                    // may not have been able to clean up after itself: the object is
                    // deleted by id here too, and stays noted (in flight, or pending and
                    // counted, for a later retry) until that succeeds.
                    if noted {
                        if tier.delete(&at.object_ref()).is_ok() {
                            self.meta.set_in_flight(0);
                        } else {
                            self.count_left_behind(guard, &at);
                        }
                    } else {
                        // The put's error is the one to report.
                        self.free_or_defer(guard, &at);
                    }
                    return Err(e.with_key(key));
                }
            }
        }
    }

    /// Takes back the object `at`, whose put into `tier` panicked: deletes whatever the tier
    /// kept of it and forgets it (its in-flight note if `noted`, else its pending record,
    /// under the lock `held`, or taken again for a large value written outside it). What
    /// cannot be deleted stays counted, pending, and this handle deletes it at its next
    /// write.
    fn take_back_unwound(&self, held: Option<&mut WriteGuard<'_>>, tier: &dyn StorageTier, at: &Placed, noted: bool) {
        if noted {
            if tier.delete(&at.object_ref()).is_ok() {
                self.meta.set_in_flight(0);
            } else if let Some(guard) = held {
                self.count_left_behind(guard, at);
            }
            return;
        }
        // Pending: freed as a replaced object is (deleted and recorded gone, or else queued
        // to try again at this handle's next write).
        match held {
            Some(guard) => self.free_or_defer(guard, at),
            None => match self.write_lock() {
                Ok(mut guard) => self.free_or_defer(&mut guard, at),
                // Shut down meanwhile (or the lock failed): at least the object goes.
                Err(_) => {
                    self.take_back_uncommitted(tier, &at.object_ref());
                    self.deferred.lock().unwrap_or_else(lock_poisoned).push(at.clone());
                }
            },
        }
    }

    /// Records the small object `at`, noted in flight, as pending once a failed put left
    /// something of it that its tier would not delete: an in-flight note counts against no
    /// budget, a pending object does. This handle deletes it at its next write, as it does a
    /// large one. If even the record fails, the note stays for the next holder of the lock.
    fn count_left_behind(&self, g: &mut WriteGuard<'_>, at: &Placed) {
        if g.replica.append(&self.meta, &[Rec::Pending { at: at.clone(), owner: self.token }]).is_ok() {
            self.meta.set_in_flight(0);
            self.deferred.lock().unwrap_or_else(lock_poisoned).push(at.clone());
        }
    }

    /// Deletes the object `r`, written into `tier` outside the index lock, when the lock
    /// cannot be had again to commit or free it: the context was shut down meanwhile (or
    /// the lock failed).
    ///
    /// A disk tier may find an object by its path in the context's directory (the mmap
    /// tier does not: it keeps its directory open; a tier of the user's may), which a
    /// shutdown removes; by now a new context of the same run id may have the directory's
    /// name, and an object of its own (ids start at 1 in every context) under that path. So
    /// the object goes from a disk tier only while the directory is still this context's
    /// (if it is not, what this save wrote there went with it). A RAM tier names its
    /// objects by the context's instance too: they always go.
    fn take_back_uncommitted(&self, tier: &dyn StorageTier, r: &context_core::ObjectRef) {
        if tier.kind() == StorageKind::Ram || self.meta.is_at(&self.dir.join(META_FILE)) {
            let _ = tier.delete(r);
        }
    }

    /// Points `key` at the stored object `at`, then deletes the object it replaces.
    fn commit(&self, g: &mut WriteGuard<'_>, key: &str, at: Placed, pass_by: PassBy, flags: u8) -> Result<()> {
        // The old value is freed after the commit: its tier can fetch its slot meanwhile.
        let old = g.replica.get_locked_with(key, |slot| self.prefetch(slot))?.map(|e| e.at);
        let obj = at.obj;
        let put = Rec::Put { key: key.to_owned(), at: at.clone(), old: old.clone(), pass_by, flags, owner: self.token };
        if let Err(e) = g.replica.append(&self.meta, &[put]) {
            // Not committed (no room for the index to grow, say): the new object goes
            // back, and the key keeps its old value. If the key does point to it (the
            // failure came after the commit), it stays. A small save's object stays noted
            // in flight: the next holder of the lock deletes it again if this could not.
            if g.replica.get_locked(key).is_ok_and(|now| now.is_none_or(|now| now.at.obj != obj)) {
                let _ = self.free(g, &at);
            }
            return Err(e.with_key(key));
        }
        // Committed: the object is the key's now. (A note of another object, which a reclaim
        // could not delete, stays for the next one.)
        if self.meta.in_flight() == obj {
            self.meta.set_in_flight(0);
        }
        if let Some(old) = old {
            self.free_or_defer(g, &old);
        }
        g.replica.maybe_compact(&self.meta);
        Ok(())
    }

    /// Frees `at`, which the operation at hand let go of (a committed change replaced or
    /// removed it, or a put failed). What the operation did stands whatever happens here,
    /// so a failure (no room for the journal's record of it, on a full disk) does not fail
    /// it: the object stays pending (counted in usage) and this handle frees it again at
    /// its next write.
    fn free_or_defer(&self, g: &mut WriteGuard<'_>, at: &Placed) {
        if self.free(g, at).is_err() {
            self.deferred.lock().unwrap_or_else(lock_poisoned).push(at.clone());
        }
    }

    /// Deletes a pending object this handle owns and records that it is gone.
    ///
    /// The key's new state is already committed, so a tier that fails to delete does not
    /// fail the operation: the object stays pending (and counted in usage) and this handle
    /// tries again at its next write.
    fn free(&self, g: &mut WriteGuard<'_>, at: &Placed) -> Result<()> {
        if let Some(tier) = self.tier(&at.tier)
            && tier.delete(&at.object_ref()).is_err()
        {
            self.deferred.lock().unwrap_or_else(lock_poisoned).push(at.clone());
            return Ok(());
        }
        g.replica.append(&self.meta, &[Rec::Gone { obj: at.obj }])
    }

    /// Deletes the objects an earlier free could not.
    fn retry_deferred(&self, g: &mut WriteGuard<'_>) -> Result<()> {
        let waiting = std::mem::take(&mut *self.deferred.lock().unwrap_or_else(lock_poisoned));
        let mut waiting = waiting.into_iter();
        while let Some(at) = waiting.next() {
            if g.replica.pending.get(&at.obj).is_some_and(|p| p.owner == self.token)
                && let Err(e) = self.free(g, &at)
            {
                // This one and the rest wait for the next write.
                self.deferred.lock().unwrap_or_else(lock_poisoned).extend(std::iter::once(at).chain(waiting));
                return Err(e);
            }
        }
        Ok(())
    }

    /// The error for a save that no tier could take.
    fn no_room(&self, key: &str, len: u64, opts: SaveOptions, choice: &Choice, refused: Refused) -> Error {
        let key = key.to_owned();
        if choice.ranked == 0 {
            let tiers: Vec<&str> = self.tiers.iter().map(|t| t.name()).collect();
            let unknown = if choice.unknown.is_empty() {
                String::new()
            } else {
                format!(" (it ranked {:?}, which are not indexes of them)", choice.unknown)
            };
            return Error::NoPlacement {
                key,
                reason: format!(
                    "the placement policy {:?} admits none of this build's tiers {tiers:?} for {len} bytes{unknown}",
                    self.policy
                ),
            };
        }
        let need = |kind| choice.allowed.iter().filter(|a| a.1 == kind).map(|a| a.2).min();
        if let Some(needed) = need(StorageKind::Disk) {
            // Disk is the last resort whenever it is allowed.
            let available = if refused.disk && choice.disk.fits(needed) { None } else { choice.disk.available() };
            return Error::OutOfDisk { key, needed, available };
        }
        if let Some(needed) = need(StorageKind::Ram) {
            return Error::OutOfRam {
                key,
                needed,
                available: choice.ram.available().unwrap_or(0),
                capacity: choice.ram.capacity.unwrap_or(0),
                shm_full: refused.ram,
            };
        }
        // The policy ranked tiers, but the options rule out every one of them.
        Error::NoTier { key, kind: if opts.is_ram_only() { StorageKind::Ram } else { StorageKind::Disk } }
    }

    /// Saves a value under `key` with the default options: RAM while the budget has room,
    /// else disk. Overwrites atomically: readers see the old or the new value, never a mix.
    ///
    /// The value is encoded with postcard straight into the memory that will hold it, so
    /// saving costs no extra copy of the value.
    ///
    /// ```
    /// # fn main() -> workflow_context::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use workflow_context::WorkflowContext;
    /// let ctx = WorkflowContext::builder().contexts_dir(dir.path()).create()?;
    /// ctx.save("seed", &12345u64)?;
    /// ctx.save("cfg_scale", &7.5f32)?;
    /// assert_eq!(ctx.load::<u64>("seed")?, 12345);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// Those of [`save_with`](Self::save_with).
    pub fn save<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<()> {
        self.save_with(key, value, SaveOptions::new())
    }

    /// Saves a value with explicit [`SaveOptions`].
    ///
    /// ```
    /// # fn main() -> workflow_context::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use workflow_context::{SaveOptions, StorageKind, WorkflowContext};
    /// let ctx = WorkflowContext::builder().contexts_dir(dir.path()).create()?;
    /// # #[cfg(feature = "tier-mmap")] {
    /// ctx.save_with("dataset", &vec![0u8; 1000], SaveOptions::new().use_ram(false))?;
    /// assert_eq!(ctx.storage_info("dataset")?.unwrap().storage_type, StorageKind::Disk);
    /// # }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::OutOfRam`] or [`Error::OutOfDisk`], storing nothing, if no tier the value
    /// may go to has room (budget or file system); [`Error::InvalidOptions`]
    /// for `use_ram(false)` with `ram_only(true)`; [`Error::NoTier`] if the options allow
    /// only a kind of tier the policy admits none of; [`Error::NoPlacement`] if the policy
    /// admits no tier at all; [`Error::Codec`] if the value cannot be encoded.
    pub fn save_with<T: Serialize + ?Sized>(&self, key: &str, value: &T, opts: SaveOptions) -> Result<()> {
        self.save_typed(key, value, opts, PassBy::Val, Pool::Values)
    }

    pub(crate) fn save_typed<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        opts: SaveOptions,
        pass_by: PassBy,
        pool: Pool<'_>,
    ) -> Result<()> {
        self.check_key(key)?;
        let encoded = codec::encoded_len(value, key)?;
        let len = record::record_len(encoded as u64);
        self.store(key, len, opts, pass_by, FLAG_TYPED, pool, &mut |tier, id| {
            let mut write = |out: &mut dyn io::Write| codec::write_record(value, encoded, id, out, key);
            tier.put(NewObject { id, len, data: ObjectData::Write(&mut write) })
        })
        .map_err(|e| e.with_key(key))
    }

    /// Saves raw bytes; [`load_bytes`](Self::load_bytes) returns exactly these bytes.
    ///
    /// The bytes are checksummed piece by piece as they are copied into place, so they are
    /// read from memory once.
    ///
    /// ```
    /// # fn main() -> workflow_context::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use workflow_context::{SaveOptions, WorkflowContext};
    /// let ctx = WorkflowContext::builder().contexts_dir(dir.path()).create()?;
    /// let frame = vec![128u8; 1920 * 1080 * 3];
    /// ctx.save_bytes("frame", &frame, SaveOptions::new())?;
    /// assert_eq!(&*ctx.load_bytes("frame")?, &frame[..]);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// Those of [`save_with`](Self::save_with), except [`Error::Codec`].
    pub fn save_bytes(&self, key: &str, bytes: &[u8], opts: SaveOptions) -> Result<()> {
        self.check_key(key)?;
        let len = record::record_len(bytes.len() as u64);
        self.store(key, len, opts, PassBy::Val, 0, Pool::Values, &mut |tier, id| {
            let mut write = |out: &mut dyn io::Write| {
                record::write_record(out, id, 0, bytes)
                    .map_err(|e| Error::io("stream value into", format!("object {id}"), e))
            };
            tier.put(NewObject { id, len, data: ObjectData::Write(&mut write) })
        })
        .map_err(|e| e.with_key(key))
    }

    /// Loads and decodes a value saved with [`save`](Self::save).
    ///
    /// # Errors
    /// [`Error::KeyNotFound`]; [`Error::Codec`] if the bytes do not decode as `T` (the
    /// value was saved as another type), or if the value was saved as raw bytes with
    /// [`save_bytes`](Self::save_bytes) (read those with [`load_bytes`](Self::load_bytes):
    /// bytes that happen to decode would give a wrong value); [`Error::ByReference`] if the
    /// key holds a value passed by reference (rebuild it with `load_ref`);
    /// [`Error::Corrupt`] if the stored bytes fail their checks; [`Error::TierUnavailable`]
    /// if the value is in a tier this handle does not have.
    pub fn load<T: DeserializeOwned>(&self, key: &str) -> Result<T> {
        let (entry, record) = self.load_value(key)?;
        if entry.flags & FLAG_TYPED == 0 {
            return Err(Error::Codec {
                key: key.to_owned(),
                op: "decode",
                message: "the value was saved as raw bytes (save_bytes): load it with load_bytes".into(),
            });
        }
        codec::decode(record::payload(&record), key)
    }

    /// Loads a value's bytes: a zero-copy view of the shared memory for a RAM value whose
    /// record (the value and 40 bytes) is over 4 KiB, or of the mapped file for one in the
    /// mmap tier of 64 KiB or more, which stays valid even if the value is overwritten or
    /// removed meanwhile; a copy for smaller values and for values in the redb tier
    /// (decompressed).
    ///
    /// Every load checks the bytes (length and checksum), except that a zero-copy view of a
    /// value whose record is 64 KiB or more is checked only the first time this handle reads
    /// it: objects never change after they are written, so the handle keeps the checked view,
    /// and later loads of the same object cost O(1), until it sees the value replaced or
    /// removed (at its next operation on the context). A smaller value, and a value the tier
    /// copies (the redb tier), is copied and checked at every load.
    ///
    /// # Errors
    /// [`Error::KeyNotFound`]; [`Error::ByReference`] if the key holds a value passed by
    /// reference; [`Error::Corrupt`] if the stored bytes fail their checks;
    /// [`Error::TierUnavailable`] if the value is in a tier this handle does not have.
    pub fn load_bytes(&self, key: &str) -> Result<Payload> {
        let (_, record) = self.load_value(key)?;
        Ok(record.slice(record::payload_range(&record)))
    }

    /// The checked record of a value passed by value.
    fn load_value(&self, key: &str) -> Result<(Entry, Payload)> {
        match self.load_record(key)? {
            (entry, _) if entry.pass_by == PassBy::Ref => Err(Error::ByReference { key: key.to_owned() }),
            found => Ok(found),
        }
    }

    /// Reads and checks the record `key` points to.
    pub(crate) fn load_record(&self, key: &str) -> Result<(Entry, Payload)> {
        self.check_key(key)?;
        let mut last_problem = String::new();
        for _attempt in 0..16 {
            let Some(entry) = self.lookup_to_read(key)? else {
                return Err(Error::KeyNotFound { key: key.to_owned() });
            };
            // Only large records are kept as checked views.
            if entry.at.len >= VIEW_CACHE_MIN as u64 {
                let view = self
                    .read_index()?
                    .views
                    .lock()
                    .unwrap_or_else(lock_poisoned)
                    .get(&entry.at.obj)
                    .map(|view| view.bytes.clone());
                if let Some(view) = view {
                    return Ok((entry, view));
                }
            }
            let tier = self
                .tier(&entry.at.tier)
                .ok_or_else(|| Error::TierUnavailable { key: key.to_owned(), tier: entry.at.tier.to_string() })?;
            let problem = match tier.get(&entry.at.object_ref()).map_err(|e| e.with_key(key))? {
                None => "its object is missing".to_owned(),
                Some(rec) => match record::check(&rec, ObjectId(entry.at.obj), true) {
                    Ok(_) => {
                        // Only views are kept: a copy (the redb tier decompresses one at
                        // every load) kept here would hold the value a second time, in this
                        // process's heap, for as long as its key holds it.
                        if rec.len() >= VIEW_CACHE_MIN && tier.capabilities().zero_copy {
                            self.remember_view(key, &entry, &rec)?;
                        }
                        return Ok((entry, rec));
                    }
                    Err(detail) => detail,
                },
            };
            // The object may have been replaced between reading the index and the tier:
            // if the key now points elsewhere, read again; if not, the damage is real.
            match self.lookup(key)? {
                Some(now) if now.at.obj == entry.at.obj => {
                    let loc = tier.locate(&entry.at.object_ref());
                    let what = loc
                        .shm_name
                        .or_else(|| loc.path.map(|p| p.display().to_string()))
                        .unwrap_or_else(|| format!("object {} in tier {}", ObjectId(entry.at.obj), entry.at.tier));
                    return Err(Error::Corrupt { what, key: Some(key.to_owned()), detail: problem });
                }
                Some(_) => last_problem = problem,
                None => return Err(Error::KeyNotFound { key: key.to_owned() }),
            }
        }
        Err(Error::Corrupt {
            what: format!("key index of {}", self.run_id),
            key: Some(key.to_owned()),
            detail: format!("the value kept changing while being read; last: {last_problem}"),
        })
    }

    fn remember_view(&self, key: &str, entry: &Entry, rec: &Payload) -> Result<()> {
        // Under the read lock, so a concurrent catch-up cannot drop the object in between.
        let r = self.read_index()?;
        if matches!(r.lookup(key, |_| {})?, Lookup::Found(now) if now.at.obj == entry.at.obj) {
            let mut views = r.views.lock().unwrap_or_else(lock_poisoned);
            // A shutdown clears the views after marking the handle closed, under this lock:
            // a load that finishes meanwhile keeps nothing.
            if self.closed.load(Ordering::Acquire) {
                return Ok(());
            }
            if views.len() >= VIEW_CACHE_MAX {
                views.clear();
            }
            views.insert(entry.at.obj, crate::index::View { key: key.into(), bytes: rec.clone() });
        }
        Ok(())
    }

    /// Whether a value is stored under `key`.
    pub fn contains(&self, key: &str) -> Result<bool> {
        self.check_key(key)?;
        Ok(self.lookup(key)?.is_some())
    }

    /// Removes a value and frees its storage. Returns whether it existed.
    pub fn remove(&self, key: &str) -> Result<bool> {
        self.check_key(key)?;
        let mut g = self.write_lock().map_err(|e| e.with_key(key))?;
        let Some(entry) = g.replica.get_locked(key).map_err(|e| e.with_key(key))? else { return Ok(false) };
        self.remove_entry(&mut g, key, &entry)?;
        Ok(true)
    }

    fn remove_entry(&self, g: &mut WriteGuard<'_>, key: &str, entry: &Entry) -> Result<()> {
        g.replica
            .append(&self.meta, &[Rec::Remove { key: key.to_owned(), at: entry.at.clone(), owner: self.token }])
            .map_err(|e| e.with_key(key))?;
        self.free_or_defer(g, &entry.at);
        g.replica.maybe_compact(&self.meta);
        Ok(())
    }

    /// Where and how `key`'s value is stored, or `None` if there is no such key (the
    /// original's `get_storage_info`).
    pub fn storage_info(&self, key: &str) -> Result<Option<StorageInfo>> {
        self.check_key(key)?;
        let Some(entry) = self.lookup(key)? else { return Ok(None) };
        let len = record::payload_len(entry.at.len).unwrap_or(0);
        let info = StorageInfo::new(entry.at.kind, entry.at.tier.to_string(), entry.at.footprint, len, entry.pass_by);
        Ok(Some(match self.tier(&entry.at.tier) {
            Some(t) => {
                let loc = t.locate(&entry.at.object_ref());
                info.with_shm_name(loc.shm_name).with_path(loc.path)
            }
            None => info,
        }))
    }

    /// Every key, sorted.
    pub fn list_keys(&self) -> Result<Vec<String>> {
        let mut keys = self.read_index()?.keys()?;
        keys.sort_unstable();
        Ok(keys)
    }

    /// What the context holds, counted for all attached processes together (the
    /// original's `get_usage`). Values being written or replaced count too: their space is
    /// taken.
    pub fn usage(&self) -> Result<Usage> {
        // Under the index lock: the table's counters and this process's pending objects
        // must describe the same moment.
        let g = self.index_lock()?;
        let used = g.replica.used();
        let capacity = if self.has_ram_tier() { self.meta.ram_capacity() } else { 0 };
        Ok(Usage::new(used.ram, capacity, used.disk, g.replica.key_count() as usize))
    }

    /// Makes a value permanent: writes it to `dest` as a self-describing, checksummed file
    /// (read it back with [`crate::read_exported`] or [`crate::read_exported_bytes`]), then
    /// removes it from the context: the value moves out.
    ///
    /// The file is written atomically: into an unnamed file in the destination directory
    /// (`O_TMPFILE`; a named temporary file where the file system has none), synced, then
    /// linked or renamed into place, so a reader sees the whole file or none; with an
    /// unnamed file, a process killed during the write leaves nothing behind. Missing
    /// parent directories are created. Once the file is in place, its directory and the
    /// parents of the directories made for it are synced too. If anything fails, the value
    /// stays in the context, and the directories this export made are removed again.
    ///
    /// The file is put in place under the context's index lock, together with the removal
    /// of the key, so an export is one step to every other operation on the key, in any
    /// process. Of two exports of a key at the same time, one moves the value and the other
    /// is [`Error::KeyNotFound`] and writes nothing, as after a [`remove`](Self::remove) that
    /// comes while the file is written. A save that replaces the value while the file is
    /// written wins: the file holds the value as it was before, and the key keeps the new
    /// one. A shutdown (from any handle) that comes once the value has been read ends the
    /// export as if the export had come first: the file is written, and the value goes with
    /// the context.
    ///
    /// # Errors
    /// [`Error::KeyNotFound`]; [`Error::AlreadyExists`] if `dest` exists and `overwrite` is
    /// false; [`Error::NotExportable`] for a value stored by reference; [`Error::Corrupt`]
    /// if the stored value fails its checks; [`Error::Io`], also for a destination inside
    /// the context's own directory.
    pub fn export_data(&self, key: &str, dest: impl AsRef<Path>, overwrite: bool) -> Result<()> {
        let dest = dest.as_ref();
        self.check_key(key)?;
        self.check_export_destination(dest).map_err(|e| e.with_key(key))?;
        let (entry, record) = self.load_record(key)?;
        if entry.pass_by == PassBy::Ref {
            return Err(Error::NotExportable {
                key: key.to_owned(),
                reason: "it is stored by reference (a recipe), not by value".into(),
            });
        }
        // Written and synced outside the lock; dropped on any failure below, it leaves
        // nothing (nor the directories it made).
        let mut staged = export::stage(dest, key, u16::from(entry.flags), record::payload(&record), overwrite)
            .map_err(|e| e.with_key(key))?;
        loop {
            let mut g = match self.write_lock() {
                Ok(g) => g,
                // Shut down meanwhile: the value went with the context, as if the export had
                // come first; the file goes in place.
                Err(Error::Closed { .. }) => {
                    while !staged.place().map_err(|e| e.with_key(key))? {
                        staged.restage_named().map_err(|e| e.with_key(key))?;
                    }
                    staged.sync();
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            // Removed meanwhile (by a remove, or another export): this export comes after it.
            let Some(now) = g.replica.get_locked(key)? else {
                return Err(Error::KeyNotFound { key: key.to_owned() });
            };
            if !staged.place().map_err(|e| e.with_key(key))? {
                // This process cannot link an unnamed file: written again under a name,
                // outside the lock, then placed under it.
                drop(g);
                staged.restage_named().map_err(|e| e.with_key(key))?;
                continue;
            }
            // The key still holds what was exported: it moves out. If a save replaced it
            // meanwhile, this export came first and the save wins: the key keeps the new value.
            if now.at.obj == entry.at.obj {
                self.remove_entry(&mut g, key, &now)?;
            }
            drop(g);
            staged.sync();
            return Ok(());
        }
    }

    /// Refuses an export destination inside this context's directory: the file would be
    /// one of the context's own (the value's own file, say), which removing the exported
    /// key, or shutting the context down, deletes.
    fn check_export_destination(&self, dest: &Path) -> Result<()> {
        let absolute = if dest.is_absolute() {
            dest.to_owned()
        } else {
            std::env::current_dir().map_err(|e| Error::io("export to", dest, e))?.join(dest)
        };
        // The nearest directory of the destination that exists, with links and `..` resolved.
        let nearest = absolute.ancestors().skip(1).find_map(|a| fs::canonicalize(a).ok());
        let inside = match (nearest, fs::canonicalize(&self.dir)) {
            (Some(at), Ok(dir)) => at.starts_with(dir),
            _ => false,
        };
        if inside {
            let why = "the destination is inside the context's own directory, whose files the context deletes";
            return Err(Error::io("export to", dest, io::Error::new(io::ErrorKind::InvalidInput, why)));
        }
        Ok(())
    }

    /// Ends the context for every process: removes every value, segment and file and the
    /// context's directory. Idempotent; afterwards every call on any handle returns
    /// [`Error::Closed`].
    pub fn shutdown(&self) -> Result<()> {
        // In a forked child, the context and the handle's state are its parent's.
        self.check_process()?;
        let first = !self.closed.swap(true, Ordering::AcqRel);
        // Whoever ended the context (this handle, another one, another process), this
        // handle lets go of what it holds of its values.
        self.let_go_of_values();
        if !first {
            return Ok(());
        }
        if self.meta.state() == STATE_CLOSED {
            self.leave_ended_context();
            self.release_liveness();
            return Ok(());
        }
        let writer = self.writer.lock().unwrap_or_else(lock_poisoned);
        self.take_index_lock();
        let already = self.meta.state() == STATE_CLOSED;
        self.meta.set_state(STATE_CLOSED);
        let mut first_err = None;
        if !already {
            // Shared memory outlives the directory, and only the meta page in it tells this
            // context's apart: if it could not all go, the directory stays (closed) for an
            // orphan collection to finish once this handle is gone.
            let mut keep_dir = false;
            for tier in &self.tiers {
                if let Err(e) = tier.destroy() {
                    keep_dir |= tier.kind() == StorageKind::Ram;
                    first_err.get_or_insert(e);
                }
            }
            if let Some(tier) = &self.recipe_tier
                && let Err(e) = tier.destroy()
            {
                first_err.get_or_insert(e);
            }
            if !keep_dir
                && let Err(e) = crate::gc::remove_context_dir(&self.dir)
                && e.kind() != io::ErrorKind::NotFound
            {
                first_err.get_or_insert(Error::io("remove context directory", &self.dir, e));
            }
        }
        self.meta.lock().release(self.token);
        drop(writer);
        self.release_liveness();
        first_err.map_or(Ok(()), Err)
    }

    /// Lets a copy of this handle inherited by a forked child go without touching anything
    /// its parent still uses: the liveness file stays, and the tiers, the policy and the
    /// values this handle rebuilt are never dropped here, so no destructor of theirs (a
    /// database's, a model's) runs twice on the same state. What stays allocated is this
    /// process's own copy, freed when it exits; mappings and descriptors close as usual
    /// (a lock taken on a descriptor lives on in the parent's copy).
    fn abandon_in_forked_child(&mut self) {
        std::mem::forget(self.liveness.get_mut().unwrap_or_else(lock_poisoned).take());
        std::mem::forget(self.tiers.clone());
        std::mem::forget(self.ram_tiers.clone());
        std::mem::forget(self.recipe_tier.clone());
        std::mem::forget(Arc::clone(&self.policy));
        #[cfg(feature = "tier-graph")]
        self.refs.abandon();
    }

    fn release_liveness(&self) {
        if let Some((file, path)) = self.liveness.lock().unwrap_or_else(lock_poisoned).take() {
            let _ = fs::remove_file(&path);
            drop(file);
        }
    }
}

/// Removes a context that no process holds: its segments, files and directory. Returns
/// `false`, removing nothing, if the directory is gone or a handle holds it after all.
///
/// The directory is claimed first, renamed out of the way (see
/// [`gc::remove_context_dir`](crate::gc::remove_context_dir)), and everything after acts on
/// the claimed directory only: a new context of the same run id that takes the name
/// meanwhile is never touched.
pub(crate) fn remove_dead_context(run_id: &str, dir: &Path) -> Result<bool> {
    let claimed = match crate::gc::rename_for_removal(dir) {
        Ok(claimed) => claimed,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io("claim dead context", dir, e)),
    };
    let put_back = || {
        let _ = rustix::fs::renameat_with(
            rustix::fs::CWD,
            &claimed,
            rustix::fs::CWD,
            dir,
            rustix::fs::RenameFlags::NOREPLACE,
        );
    };
    // Taken for dead a moment ago: if a handle holds it now (or that cannot be told), it
    // goes back where it was.
    if !matches!(is_live(&claimed), Ok(false)) {
        put_back();
        return Ok(false);
    }
    // What could not be removed goes back too, so that the next collection finds it as the
    // dead context it is (unless a new context took the name: then it is finished as a
    // removal cut short). Only with its meta page, though: without it, it would pass for a
    // foreign directory, never collected and in the way of its run id. A removal that
    // stopped after the meta page went leaves it renamed, for a collection to finish.
    finish_removal(run_id, &claimed).inspect_err(|_| {
        if fs::symlink_metadata(claimed.join(META_FILE)).is_ok() {
            put_back();
        }
    })?;
    Ok(true)
}

/// Destroys the tiers of the dead context of `run_id` whose directory, claimed for removal,
/// is `dir`, then removes the directory.
///
/// Every part is removed that can be: a disk tier that cannot be built or destroyed (a
/// damaged database, say) keeps neither the other tiers' storage nor the directory from
/// going, since its files are in the directory. Shared memory that cannot be destroyed keeps
/// the directory (with its meta page, the only record of which segments are this
/// context's), and so does a meta page that cannot be read for now (out of descriptors or
/// memory), for a later collection to finish. The first failure is returned.
pub(crate) fn finish_removal(run_id: &str, dir: &Path) -> Result<()> {
    // Without its meta page, the context's shared memory cannot be told apart from that of
    // another context of the same run id: it is left alone (its files go with the directory).
    let meta = match Meta::open(&dir.join(META_FILE)) {
        Ok(meta) => Some(meta),
        Err(Error::Io { source, .. }) if source.kind() != io::ErrorKind::NotFound => {
            return Err(Error::io("open the meta page of dead context", dir, source));
        }
        Err(_) => None,
    };
    let mut first_err = None;
    let mut keep_dir = false;
    if let Some(meta) = meta {
        meta.set_state(STATE_CLOSED);
        for (kind, tier) in tiers::build_each_kind(run_id, Some(meta.instance()), dir) {
            if let Err(e) = tier.and_then(|tier| tier.destroy()) {
                keep_dir |= kind == StorageKind::Ram;
                first_err.get_or_insert(e);
            }
        }
    }
    if !keep_dir {
        match fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                first_err.get_or_insert(Error::io("remove dead context", dir, e));
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

impl Drop for WorkflowContext {
    fn drop(&mut self) {
        if self.check_process().is_err() {
            self.abandon_in_forked_child();
        } else if self.owner {
            let _ = self.shutdown();
        } else {
            self.release_liveness();
        }
    }
}

#[cfg(test)]
mod tests {

    use context_core::ObjectRef;

    use super::*;

    /// A context with a run id of its own: shared-memory segments are named by run id, and
    /// tests run side by side.
    fn context(base: &Path, run_id: &str) -> WorkflowContext {
        let run_id = format!("{run_id}-{}", std::process::id());
        WorkflowContext::builder().contexts_dir(base).max_ram_bytes(64 << 20).run_id(run_id).create().unwrap()
    }

    /// A context whose one tier is a [`FaultyTier`](context_core::testing::FaultyTier) over a
    /// memory tier, for tests that make the tier fail; with a run id of its own.
    fn faulty_context(base: &Path, run_id: &str) -> (Arc<context_core::testing::FaultyTier>, WorkflowContext) {
        use context_core::testing::{FaultyTier, MemoryTier};
        let faulty = Arc::new(FaultyTier::new("faulty", Arc::new(MemoryTier::default())));
        let ctx = WorkflowContext::builder()
            .contexts_dir(base)
            .run_id(format!("{run_id}-{}", std::process::id()))
            .tier(faulty.clone())
            .policy(crate::core::Prefer::first(crate::core::Rule::named("faulty")).then(crate::core::Rule::any()))
            .create()
            .unwrap();
        (faulty, ctx)
    }

    #[test]
    fn a_context_taken_for_dead_a_moment_too_early_is_left_whole() {
        // A sweep found the run id's directory dead; before it removes it, a new context of
        // the same run id takes the name, or a handle attaches. Nothing of it is touched.
        let base = tempfile::tempdir().unwrap();
        let ctx = context(base.path(), "taken-for-dead");
        ctx.save_bytes("big", &[5; 100_000], SaveOptions::new()).unwrap();
        ctx.save("small", "kept").unwrap();
        assert!(!remove_dead_context(ctx.run_id(), ctx.dir()).unwrap());
        assert!(ctx.dir().join(META_FILE).is_file(), "the directory is back in its place");
        assert_eq!(ctx.meta.state(), crate::index::STATE_OPEN);
        assert_eq!(&*ctx.load_bytes("big").unwrap(), &[5; 100_000][..]);
        ctx.save("after", &1u8).unwrap();
        assert_eq!(ctx.load::<String>("small").unwrap(), "kept");
        let left: Vec<_> = fs::read_dir(base.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }

    #[test]
    fn a_dead_handles_index_lock_is_taken_over() {
        let base = tempfile::tempdir().unwrap();
        let ctx = context(base.path(), "lock-dead");
        // A handle that took the lock and died: it has no liveness file any more.
        let dead = 0xdead_u64;
        ctx.meta.lock().acquire(dead, |_| true);
        let started = Instant::now();
        ctx.save("k", "after the takeover").unwrap();
        assert_eq!(ctx.load::<String>("k").unwrap(), "after the takeover");
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        // The lock was let go after the save.
        assert!(ctx.meta.lock().acquire(1, |_| panic!("the lock is free")) == crate::lock::Taken::Free);
        ctx.meta.lock().release(1);
    }

    #[test]
    fn table_files_a_writer_left_dying_while_growing_are_removed_by_the_next() {
        let base = tempfile::tempdir().unwrap();
        let ctx = context(base.path(), "stale-tables");
        for i in 0..300u32 {
            ctx.save(&format!("k{i}"), &i).unwrap();
        }
        let current = ctx.meta.table_generation();
        assert!(current > 0, "the table grew");
        let tables = || fsutil::names_starting(ctx.dir(), "table.");
        // What a writer killed in the middle of growing the table leaves: the generation it
        // had replaced (killed before removing it), or the one it was building.
        fs::copy(ctx.dir().join(format!("table.{current}")), ctx.dir().join(format!("table.{}", current - 1))).unwrap();
        fs::write(ctx.dir().join(format!("table.{}", current + 1)), b"half built").unwrap();
        assert_eq!(tables().len(), 3);
        // A live writer's leftovers are not looked for at every save.
        ctx.save("k0", &0u32).unwrap();
        assert_eq!(tables().len(), 3);
        // The next writer after the dead one removes them.
        ctx.meta.lock().acquire(0xdead, |_| true);
        ctx.save("after", &1u32).unwrap();
        assert_eq!(tables(), [format!("table.{current}")]);
        for i in 0..300u32 {
            assert_eq!(ctx.load::<u32>(&format!("k{i}")).unwrap(), i);
        }
    }

    /// A writer that holds the index lock, dead: it allocated an object and wrote it for a
    /// small save of `key` (into the tier `like` is in), noted it in flight, and, if
    /// `committed`, committed its `Put` too, then died before clearing the note. Returns
    /// the tier and the object.
    fn died_mid_small_save(
        ctx: &WorkflowContext,
        like: &str,
        key: &str,
        bytes: &[u8],
        committed: bool,
    ) -> (Arc<dyn StorageTier>, ObjectRef) {
        let tier = Arc::clone(ctx.tier(&ctx.lookup(like).unwrap().unwrap().at.tier).unwrap());
        ctx.meta.lock().acquire(0xdead, |_| true);
        let mut replica = ctx.replica.write().unwrap();
        replica.catch_up_locked(&ctx.meta).unwrap();
        let id = replica.allocate_id();
        let record = record::encode(ObjectId(id), 0, bytes);
        let len = record.len() as u64;
        assert!(ctx.meta.set_in_flight(id));
        let PutOutcome::Stored(r) =
            tier.put(NewObject { id: ObjectId(id), len, data: ObjectData::Parts(&[&record]) }).unwrap()
        else {
            panic!("no room for a small object");
        };
        if committed {
            let at = Placed {
                obj: id,
                tier: replica.shared_tier_name(tier.name()).unwrap(),
                kind: tier.kind(),
                footprint: r.held,
                slot: r.slot,
                len,
            };
            let put = Rec::Put { key: key.to_owned(), at, old: None, pass_by: PassBy::Val, flags: 0, owner: 0xdead };
            replica.append(&ctx.meta, &[put]).unwrap();
        }
        (tier, r)
    }

    /// A context (and its directory) holding `k` = `kept`.
    fn holding_k(run_id: &str) -> (tempfile::TempDir, WorkflowContext) {
        let base = tempfile::tempdir().unwrap();
        let ctx = context(base.path(), run_id);
        ctx.save_bytes("k", b"kept", SaveOptions::new()).unwrap();
        (base, ctx)
    }

    /// What the tiers hold, against what the index says the keys hold.
    fn held(ctx: &WorkflowContext, tier: &dyn StorageTier) -> (u64, u64) {
        let keys: u64 = ctx.list_keys().unwrap().iter().map(|k| ctx.storage_info(k).unwrap().unwrap().size).sum();
        (tier.usage().unwrap().bytes, keys)
    }

    #[test]
    fn an_object_a_dead_writer_left_in_flight_is_deleted_by_the_next_writer() {
        let (_base, ctx) = holding_k("in-flight-lost");
        let (tier, orphan) = died_mid_small_save(&ctx, "k", "lost", b"never committed", false);
        assert!(tier.get(&orphan).unwrap().is_some());
        // The next save takes the lock over and deletes the object no key names.
        ctx.save_bytes("k2", b"after the takeover", SaveOptions::new()).unwrap();
        assert_eq!(ctx.meta.in_flight(), 0);
        assert!(tier.get(&orphan).unwrap().is_none(), "the object left in flight is still there");
        let (stored, keys) = held(&ctx, &*tier);
        assert_eq!(stored, keys, "the tier holds exactly what the keys hold");
        assert!(!ctx.contains("lost").unwrap());
        assert_eq!(&*ctx.load_bytes("k").unwrap(), b"kept");
    }

    #[test]
    fn a_damaged_in_flight_word_never_makes_a_writer_delete_a_live_value() {
        let (_base, ctx) = holding_k("in-flight-damaged");
        // Overwrite k until the journal compacts: no record of its current generation then
        // names k's object, so only the table does.
        let generation = ctx.meta.head().generation;
        for n in 0.. {
            if ctx.meta.head().generation != generation {
                break;
            }
            assert!(n < 100_000, "the journal never compacted");
            ctx.save_bytes("k", b"kept", SaveOptions::new()).unwrap();
        }
        let entry = ctx.lookup("k").unwrap().unwrap();
        let tier = Arc::clone(ctx.tier(&entry.at.tier).unwrap());
        // Damage left the in-flight word holding the live object's bare id.
        ctx.meta.set_in_flight_word(entry.at.obj);
        // The next writer takes the lock, and must not take the word for a note.
        ctx.save_bytes("k2", b"after the damage", SaveOptions::new()).unwrap();
        assert_eq!(&*ctx.load_bytes("k").unwrap(), b"kept");
        let (stored, keys) = held(&ctx, &*tier);
        assert_eq!(stored, keys, "the tier holds exactly what the keys hold");
    }

    #[test]
    fn an_object_in_flight_whose_put_committed_is_kept() {
        let (base, ctx) = holding_k("in-flight-kept");
        let (tier, object) = died_mid_small_save(&ctx, "k", "made it", b"committed", true);
        // Opening (which reclaims what dead writers left) and a save: the value stays.
        let other = WorkflowContext::builder().contexts_dir(base.path()).run_id(ctx.run_id()).open().unwrap();
        assert_eq!(ctx.meta.in_flight(), 0, "opening did not take the note up");
        ctx.save_bytes("k2", b"after the takeover", SaveOptions::new()).unwrap();
        assert!(tier.get(&object).unwrap().is_some());
        assert_eq!(&*other.load_bytes("made it").unwrap(), b"committed");
        let (stored, keys) = held(&ctx, &*tier);
        assert_eq!(stored, keys, "the tier holds exactly what the keys hold");
    }

    #[test]
    fn a_change_that_committed_stands_though_freeing_what_it_replaced_fails() {
        let base = tempfile::tempdir().unwrap();
        let ctx = context(base.path(), "free-fails");
        let twin = context(base.path(), "free-fails-twin");
        for c in [&ctx, &twin] {
            c.save("k", "old").unwrap();
            c.save("gone", "soon").unwrap();
        }
        let fault_after = |appends| ctx.replica.write().unwrap().appends_before_fault = appends;
        // The overwrite commits (one append), then cannot record the old value's release.
        fault_after(Some(1));
        let saved = ctx.save("k", "new");
        fault_after(None);
        saved.expect("an overwrite that committed reported a failure");
        assert_eq!(ctx.load::<String>("k").unwrap(), "new");
        // The next write releases it.
        ctx.save("flush", &1u8).unwrap();
        // Likewise a removal.
        fault_after(Some(1));
        let removed = ctx.remove("gone");
        fault_after(None);
        assert!(removed.expect("a removal that committed reported a failure"));
        assert!(!ctx.contains("gone").unwrap());
        ctx.save("flush", &2u8).unwrap();
        // Nothing is left counted but the values, as in a context where nothing failed.
        twin.save("k", "new").unwrap();
        twin.save("flush", &1u8).unwrap();
        assert!(twin.remove("gone").unwrap());
        twin.save("flush", &2u8).unwrap();
        assert_eq!(ctx.usage().unwrap(), twin.usage().unwrap());
        assert!(ctx.replica.read().unwrap().pending.is_empty());
    }

    #[test]
    fn a_write_the_index_cannot_record_is_an_error_naming_its_key() {
        let base = tempfile::tempdir().unwrap();
        let ctx = context(base.path(), "unrecorded");
        ctx.save("small", "kept").unwrap();
        let big = vec![3u8; 200_000];
        ctx.save_bytes("big", &big, SaveOptions::new()).unwrap();
        let usage = ctx.usage().unwrap();
        // Every append to the journal fails, as on a full disk when the journal must move to
        // a new generation.
        let fault = |on: bool| ctx.replica.write().unwrap().appends_before_fault = on.then_some(0);
        fault(true);
        let results = [
            ("small", ctx.save("small", "new").err()),
            ("new small", ctx.save("new small", "new").err()),
            ("big", ctx.save_bytes("big", &[4u8; 200_000], SaveOptions::new()).err()),
            ("new big", ctx.save_bytes("new big", &[4u8; 200_000], SaveOptions::new()).err()),
            ("small", ctx.remove("small").err()),
            ("big", ctx.remove("big").err()),
        ];
        fault(false);
        for (key, err) in results {
            match err {
                Some(Error::Io { key: named, .. }) => assert_eq!(named.as_deref(), Some(key), "{key}"),
                other => panic!("{key}: {other:?}"),
            }
        }
        // Nothing changed.
        assert_eq!(ctx.load::<String>("small").unwrap(), "kept");
        assert!(*ctx.load_bytes("big").unwrap() == big[..]);
        assert!(!ctx.contains("new small").unwrap() && !ctx.contains("new big").unwrap());
        assert_eq!(ctx.usage().unwrap(), usage);
    }

    #[test]
    fn a_large_save_that_cannot_take_the_lock_again_gives_its_reservation_back_later() {
        use context_core::testing::{Call, Fault};
        let base = tempfile::tempdir().unwrap();
        let (faulty, ctx) = faulty_context(base.path(), "relock-fails");
        ctx.save_bytes("k", &[1; 100_000], SaveOptions::new()).unwrap();
        // The old value of an overwrite cannot be deleted: this handle frees it later.
        faulty.fail(Call::Delete, 1, Fault::Eio);
        ctx.save_bytes("k", b"new", SaveOptions::new()).unwrap();
        let before = ctx.usage().unwrap();
        // A large save: the retry at its first lock fails to delete again, its pending
        // record commits, and the retry when it takes the lock again deletes the old value
        // but cannot record it (the journal is full): the save fails there.
        faulty.fail(Call::Delete, 1, Fault::Eio);
        ctx.replica.write().unwrap().appends_before_fault = Some(1);
        let saved = ctx.save_bytes("big", &[2; 100_000], SaveOptions::new());
        ctx.replica.write().unwrap().appends_before_fault = None;
        assert!(matches!(&saved, Err(Error::Io { key: Some(k), .. }) if k == "big"), "{saved:?}");
        assert!(!ctx.contains("big").unwrap());
        // The next write records the old value gone, and the refused one's reservation too.
        ctx.save("flush", &1u8).unwrap();
        ctx.remove("flush").unwrap();
        let after = ctx.usage().unwrap();
        assert!(ctx.replica.read().unwrap().pending.is_empty(), "{:?}", ctx.replica.read().unwrap().pending);
        assert!(after.ram_usage_bytes < before.ram_usage_bytes, "{before:?} then {after:?}");
        assert_eq!(faulty.usage().unwrap().objects, 1, "only the value of k is left in the tier");
    }

    #[test]
    fn a_reservation_a_full_tier_refused_goes_though_the_journal_is_full_then() {
        use context_core::testing::{Call, Fault};
        let base = tempfile::tempdir().unwrap();
        let (faulty, ctx) = faulty_context(base.path(), "refused-journal-full");
        let before = ctx.usage().unwrap();
        // The pending record of the large value commits; the tier is full; recording that
        // the reservation goes fails (the journal is full), and so does the save.
        faulty.fail(Call::Put, 1, Fault::NoSpace);
        ctx.replica.write().unwrap().appends_before_fault = Some(1);
        let saved = ctx.save_bytes("big", &[2; 100_000], SaveOptions::new());
        ctx.replica.write().unwrap().appends_before_fault = None;
        assert!(saved.is_err(), "{saved:?}");
        // The next write records it gone.
        ctx.save("flush", &1u8).unwrap();
        ctx.remove("flush").unwrap();
        assert!(ctx.replica.read().unwrap().pending.is_empty(), "{:?}", ctx.replica.read().unwrap().pending);
        assert_eq!(ctx.usage().unwrap(), before);
    }

    #[test]
    fn a_note_the_reclaim_could_not_clear_outlives_later_saves() {
        use context_core::testing::{Call, Fault};
        let base = tempfile::tempdir().unwrap();
        let (faulty, ctx) = faulty_context(base.path(), "stuck-note");
        ctx.save_bytes("k", b"kept", SaveOptions::new()).unwrap();
        let (tier, orphan) = died_mid_small_save(&ctx, "k", "lost", b"never committed", false);
        // The next writer cannot delete the orphan: the note stays.
        faulty.fail_from(Call::Delete, 1, Fault::Eio);
        ctx.save_bytes("small", b"while the tier cannot delete", SaveOptions::new()).unwrap();
        assert_eq!(ctx.meta.in_flight(), orphan.id.0);
        let tries = faulty.injected();
        // Neither a small save nor a large one takes the note over or clears it, nor, for a
        // while, tries the reclaim again.
        ctx.save_bytes("small 2", b"and another", SaveOptions::new()).unwrap();
        ctx.save_bytes("large", &[3; 100_000], SaveOptions::new()).unwrap();
        assert_eq!(ctx.meta.in_flight(), orphan.id.0, "a later save lost the note of the orphan");
        assert!(tier.get(&orphan).unwrap().is_some());
        assert_eq!(faulty.injected(), tries, "the reclaim was tried again at once");
        // Once the tier deletes again, the next writer after the wait reclaims it.
        faulty.heal();
        *ctx.reclaim_after.lock().unwrap() = Some(Instant::now());
        ctx.save_bytes("after", b"healed", SaveOptions::new()).unwrap();
        assert_eq!(ctx.meta.in_flight(), 0);
        assert!(tier.get(&orphan).unwrap().is_none());
        for (key, bytes) in
            [("k", &b"kept"[..]), ("small", b"while the tier cannot delete"), ("small 2", b"and another")]
        {
            assert_eq!(&*ctx.load_bytes(key).unwrap(), bytes);
        }
        let (stored, keys) = held(&ctx, &*tier);
        assert_eq!(stored, keys, "the faulty tier holds exactly what the keys hold");
        assert!(ctx.replica.read().unwrap().pending.is_empty());
    }

    #[test]
    fn a_live_handles_index_lock_is_waited_for() {
        let base = tempfile::tempdir().unwrap();
        let ctx = context(base.path(), "lock-live");
        // Another handle, alive (its liveness file is locked), holds the lock.
        let other = 0x0123_u64;
        let (_live, _) = register_liveness(&ctx.dir, other).unwrap();
        ctx.meta.lock().acquire(other, |_| true);
        std::thread::scope(|s| {
            let saver = s.spawn(|| ctx.save("k", "after the release").unwrap());
            std::thread::sleep(Duration::from_millis(100));
            assert!(!saver.is_finished(), "saved while another live handle held the index lock");
            assert!(!ctx.contains("k").unwrap());
            ctx.meta.lock().release(other);
            saver.join().unwrap();
        });
        assert_eq!(ctx.load::<String>("k").unwrap(), "after the release");
    }

    #[test]
    fn a_liveness_mark_tells_a_gone_process_from_a_live_one() {
        let mine = own_mark().expect("this machine has /proc");
        assert!(!marked_process_gone(&mine), "this process is alive: {mine}");
        // A process that has exited, with the same namespace.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let ns = mine.split_whitespace().nth(2).unwrap();
        assert!(marked_process_gone(&format!("{pid} 1 {ns}")), "an exited process");
        // This process's pid with another start time: its pid was reused.
        let me = std::process::id();
        assert!(marked_process_gone(&format!("{me} 1 {ns}")), "a reused pid");
        // What cannot be told is never gone: another namespace, no mark, a damaged one.
        assert!(!marked_process_gone(&format!("{pid} 1 0:0")));
        for mark in ["", "12", "x y z", "4294967296 1 1:1"] {
            assert!(!marked_process_gone(mark), "{mark:?}");
        }
    }
}
