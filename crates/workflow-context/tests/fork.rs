//! A process forked without `exec` holds copies of its parent's handles: they must refuse
//! to act there, and dropping them there must leave the parent's context alone.
//!
//! The only test of its binary: a fork copies one thread, and no other test's thread may
//! hold a lock of the library at that moment.

mod common;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{base, builder};
use workflow_context::core::{Capabilities, Location, NewObject, ObjectRef, PutOutcome, StorageTier, TierUsage};
use workflow_context::{Error, Payload, StorageKind, WorkflowContext};

/// A tier of the user's own, which holds nothing and notes where its destructor ran: in a
/// forked child, a tier's destructor (a database's, say) would run a second time on state
/// its parent still uses.
#[derive(Debug)]
struct Witness {
    dir: PathBuf,
}

impl Witness {
    fn dropped_in(dir: &Path, pid: u32) -> PathBuf {
        dir.join(format!("witness dropped in {pid}"))
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        std::fs::write(Witness::dropped_in(&self.dir, std::process::id()), b"").unwrap();
    }
}

impl StorageTier for Witness {
    fn name(&self) -> &str {
        "witness"
    }
    fn kind(&self) -> StorageKind {
        StorageKind::Disk
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(false, false)
    }
    fn footprint(&self, len: u64) -> u64 {
        len
    }
    fn put(&self, _: NewObject<'_>) -> workflow_context::Result<PutOutcome> {
        Ok(PutOutcome::NoSpace)
    }
    fn get(&self, _: &ObjectRef) -> workflow_context::Result<Option<Payload>> {
        Ok(None)
    }
    fn delete(&self, _: &ObjectRef) -> workflow_context::Result<bool> {
        Ok(false)
    }
    fn locate(&self, _: &ObjectRef) -> Location {
        Location::default()
    }
    fn usage(&self) -> workflow_context::Result<TierUsage> {
        Ok(TierUsage::default())
    }
    fn destroy(&self) -> workflow_context::Result<()> {
        Ok(())
    }
}

fn liveness_files(ctx: &WorkflowContext) -> BTreeSet<OsString> {
    std::fs::read_dir(ctx.dir().join("procs")).unwrap().map(|e| e.unwrap().file_name()).collect()
}

/// Forks this process: `None` in the child, the child's process id in the parent.
fn fork() -> Option<libc::pid_t> {
    // SAFETY: fork(2) in a process whose only other thread is the test harness's, waiting
    // for this one and holding none of the library's locks. The child runs one of the
    // functions below and leaves through `finish`, with _exit(2).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    (pid != 0).then_some(pid)
}

/// Runs `child` in the forked child and ends it, running no destructor or exit handler of
/// its parent's: exit code 0 if `child` succeeded.
fn finish(child: impl FnOnce() -> Result<(), String>) -> ! {
    let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)) {
        Ok(Ok(())) => 0,
        Ok(Err(why)) => {
            eprintln!("in the forked child: {why}");
            1
        }
        Err(_) => 2,
    };
    // SAFETY: ends the forked child at once, as it must.
    unsafe { libc::_exit(code) }
}

/// Waits for the forked child `pid`; panics unless it succeeded.
fn succeeded(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: waits for a child this process forked; `status` is a valid place for its status.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "the forked child failed (status {status:#x})");
}

/// The parent's handles, used in a forked child: every call is refused.
fn refused(owner: &WorkflowContext, attached: &WorkflowContext) -> Result<(), String> {
    let parent = std::os::unix::process::parent_id();
    let forked = |what: &str, r: workflow_context::Result<()>| match r {
        Err(Error::Forked { opened_by, pid, .. }) if opened_by == parent && pid == std::process::id() => Ok(()),
        other => Err(format!("{what}: {other:?}")),
    };
    forked("save", owner.save("prompt", "the child's"))?;
    forked("load", owner.load::<String>("prompt").map(drop))?;
    forked("list_keys", attached.list_keys().map(drop))?;
    forked("remove", attached.remove("prompt").map(drop))?;
    forked("shutdown", owner.shutdown())?;
    let message = owner.save("x", &1u8).unwrap_err().to_string();
    if !message.contains(&parent.to_string()) || !message.contains(owner.run_id()) {
        return Err(format!("the error names neither the parent nor the context: {message}"));
    }
    Ok(())
}

/// The way out for a forked child: a handle of its own.
fn own_handle(base: &Path, run_id: &str) -> Result<(), String> {
    let mine = WorkflowContext::builder().contexts_dir(base).run_id(run_id).open().map_err(|e| format!("open: {e}"))?;
    let seen = mine.load::<String>("prompt").map_err(|e| format!("load: {e}"))?;
    if seen != "the parent's" {
        return Err(format!("its own handle read {seen:?}"));
    }
    // Its liveness file names the child (`<pid> <start time> <namespace>`), not the parent
    // whose handles it copied.
    let pid = std::process::id().to_string();
    let marks: Vec<String> = std::fs::read_dir(mine.dir().join("procs"))
        .map_err(|e| format!("list liveness files: {e}"))?
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .collect();
    if !marks.iter().any(|m| m.split_whitespace().next() == Some(&pid)) {
        return Err(format!("no liveness file names the child, pid {pid}: {marks:?}"));
    }
    mine.save("from the child", "hello").map_err(|e| format!("save: {e}"))
}

#[test]
fn a_forked_child_neither_uses_nor_ends_its_parents_handles() {
    let b = base();
    let owner = builder(b.path()).tier(Arc::new(Witness { dir: b.path().to_owned() })).create().unwrap();
    owner.save("prompt", "the parent's").unwrap();
    let attached = WorkflowContext::builder().contexts_dir(b.path()).run_id(owner.run_id()).open().unwrap();
    let before = liveness_files(&owner);
    assert_eq!(before.len(), 2, "{before:?}");

    // Dropped in the child, the copies neither shut the context down nor remove a liveness
    // file. (Moved into the child, which never returns: the parent's stay here.)
    match fork() {
        None => finish(|| {
            drop(attached);
            drop(owner);
            Ok(())
        }),
        Some(child) => succeeded(child),
    }
    assert_eq!(liveness_files(&owner), before, "the child removed a liveness file of its parent's handles");
    assert_eq!(owner.load::<String>("prompt").unwrap(), "the parent's");
    let dropped: Vec<_> = std::fs::read_dir(b.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(!dropped.iter().any(|n| n.to_string_lossy().starts_with("witness")), "{dropped:?}");

    match fork() {
        None => finish(|| refused(&owner, &attached)),
        Some(child) => succeeded(child),
    }
    match fork() {
        None => finish(|| own_handle(b.path(), owner.run_id())),
        Some(child) => succeeded(child),
    }

    // The parent's handles go on as before, with the child's own save beside their values.
    assert_eq!(liveness_files(&owner), before);
    assert_eq!(owner.load::<String>("prompt").unwrap(), "the parent's");
    assert_eq!(attached.load::<String>("from the child").unwrap(), "hello");
    attached.save("after", &2u8).unwrap();
    assert_eq!(owner.load::<u8>("after").unwrap(), 2);
    drop(attached);
    owner.shutdown().unwrap();
    assert!(!owner.dir().exists());
    // Here, the handle drops its tiers.
    drop(owner);
    assert!(Witness::dropped_in(b.path(), std::process::id()).exists());
}
