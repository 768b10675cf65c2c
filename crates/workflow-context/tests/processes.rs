//! Several processes attached to one context: visibility, shared budget, concurrent
//! writers, crashes, and a small /dev/shm.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::{assert_child_ok, base, budget, builder, run_child, run_id, shm_segments};
use workflow_context::{SaveOptions, StorageKind, WorkflowContext};

const ENTRY: &str = "child_main";

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("child needs {name}"))
}

fn open_from_env() -> WorkflowContext {
    WorkflowContext::builder().contexts_dir(env("WFCTX_BASE")).run_id(env("WFCTX_RUN")).open().expect("child opens")
}

/// The body of every child process; the parent picks the role.
#[test]
#[ignore = "runs only as a child process started by the other tests"]
fn child_main() {
    let Ok(role) = std::env::var("WFCTX_CHILD_ROLE") else { return };
    match role.as_str() {
        "open-and-save" => {
            let ctx = open_from_env();
            assert_eq!(ctx.load::<String>("from-parent").unwrap(), "hello child");
            assert_eq!(&*ctx.load_bytes("frame").unwrap(), &context_core::testing::pattern(7, 300_000)[..]);
            ctx.save("from-child", &vec![1u32, 2, 3]).unwrap();
            ctx.save_bytes("child-frame", &vec![9u8; 800_000], SaveOptions::new()).unwrap();
            // The budget is the context's: what the parent holds counts here too.
            let u = ctx.usage().unwrap();
            assert!(u.ram_usage_bytes + u.temp_disk_usage_bytes >= 300_000, "{u:?}");
        }
        "writer" => {
            let ctx = open_from_env();
            let me: usize = env("WFCTX_WRITER").parse().unwrap();
            for i in 0..300usize {
                let len = [20usize, 5000, 80_000][i % 3];
                ctx.save_bytes(&format!("w{me}-{i}"), &vec![(me * 50 + i) as u8; len], SaveOptions::new()).unwrap();
                ctx.save(&format!("shared-{}", i % 4), &(me, i)).unwrap();
                if i % 10 == 0 {
                    // Read what another writer wrote, if it is there yet.
                    let other = (me + 1) % 4;
                    if let Ok(v) = ctx.load_bytes(&format!("w{other}-{i}")) {
                        assert!(v.iter().all(|&b| b == (other * 50 + i) as u8));
                    }
                }
            }
        }
        "create-and-wait" => {
            let ctx =
                WorkflowContext::builder().contexts_dir(env("WFCTX_BASE")).run_id(env("WFCTX_RUN")).create().unwrap();
            ctx.save_bytes("ram", &context_core::testing::pattern(1, 200_000), SaveOptions::new()).unwrap();
            ctx.save_bytes("disk", &context_core::testing::pattern(2, 200_000), common::to_disk()).unwrap();
            ctx.save("small", "value").unwrap();
            println!("READY");
            std::thread::sleep(std::time::Duration::from_secs(120));
        }
        "overwrite-forever" => {
            let ctx = open_from_env();
            println!("READY");
            let big = vec![5u8; 3 << 20];
            for i in 0u64.. {
                ctx.save_bytes("big", &big, SaveOptions::new()).unwrap();
                ctx.save(&format!("small-{}", i % 10), &i).unwrap();
                ctx.remove(&format!("small-{}", (i + 5) % 10)).unwrap();
            }
        }
        "env-config" => {
            // WORKFLOW_CONTEXT_CONFIG and TMPDIR are set by the parent.
            let ctx = WorkflowContext::new().unwrap();
            assert_eq!(ctx.dir().parent().unwrap(), std::env::temp_dir().join("from-env"));
            if cfg!(feature = "tier-shm") {
                assert_eq!(ctx.usage().unwrap().ram_capacity_bytes, 3 << 29, "MAX_RAM_GB 1.5 from the file");
            }
            let reopened = WorkflowContext::open(ctx.run_id()).unwrap();
            reopened.save("k", &1u8).unwrap();
            assert_eq!(ctx.load::<u8>("k").unwrap(), 1);
        }
        "empty-tmpdir" => {
            // TMPDIR is set but empty: as unset (POSIX, mktemp, Python's tempfile), not the
            // working directory.
            let ctx = WorkflowContext::new().unwrap();
            let name = env("WFCTX_DIR_NAME");
            assert_eq!(ctx.dir().parent().unwrap(), std::path::Path::new("/tmp").join(&name));
            drop(ctx);
            std::fs::remove_dir(std::path::Path::new("/tmp").join(&name)).unwrap();
        }
        "umask-0-nested-contexts-dir" => {
            // A process started with umask 0 (some daemons and containers), and a contexts
            // directory whose parents do not exist yet (a CONTEXTS_DIR_NAME of "farm/contexts").
            // SAFETY: umask has no preconditions.
            unsafe { libc::umask(0) };
            let base = std::path::PathBuf::from(env("WFCTX_BASE"));
            let ctx = WorkflowContext::builder().contexts_dir(base.join("farm/contexts")).create().unwrap();
            for dir in [base.join("farm"), base.join("farm/contexts"), ctx.dir().to_owned()] {
                let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&dir).unwrap().permissions());
                assert_eq!(mode & 0o022, 0, "{} is writable by others: {mode:o}", dir.display());
            }
        }
        "no-proc-budget" => {
            // /proc is an empty file system here: how much memory the machine has cannot be
            // told, so neither can a share of it.
            let base = env("WFCTX_BASE");
            match WorkflowContext::builder().contexts_dir(&base).create() {
                Err(workflow_context::Error::Config { key, message, .. }) => {
                    assert_eq!(key.as_deref(), Some("MAX_RAM_PERCENT"), "{message}");
                    assert!(message.contains("MAX_RAM_GB"), "says what to set instead: {message}");
                }
                other => panic!("a share of an unknown memory must be an error, not a budget: {other:?}"),
            }
            // An explicit limit needs no share: it holds alone.
            let ctx = WorkflowContext::builder().contexts_dir(&base).config_path(env("WFCTX_CFG")).create().unwrap();
            if cfg!(feature = "tier-shm") {
                assert_eq!(ctx.usage().unwrap().ram_capacity_bytes, 1 << 29, "MAX_RAM_GB 0.5 from the file");
            }
            let ctx = WorkflowContext::builder().contexts_dir(&base).max_ram_bytes(1 << 20).create().unwrap();
            if cfg!(feature = "tier-shm") {
                assert_eq!(ctx.usage().unwrap().ram_capacity_bytes, 1 << 20);
            }
        }
        "bad-env-config" => match WorkflowContext::new() {
            Err(workflow_context::Error::Config { source_name, key, .. }) => {
                assert!(source_name.ends_with("bad.json"), "{source_name}");
                assert_eq!(key.as_deref(), Some("MAX_RAM_PERCENT"));
            }
            other => panic!("a bad config file must be refused: {other:?}"),
        },
        "disk-tiers" => {
            let ctx = open_from_env();
            assert_eq!(&*ctx.load_bytes("small").unwrap(), &vec![1u8; 1000][..]);
            assert_eq!(&*ctx.load_bytes("large").unwrap(), &vec![2u8; 1 << 20][..]);
            ctx.save_bytes("child-small", &vec![3u8; 2000], SaveOptions::new()).unwrap();
            ctx.save_bytes("child-large", &vec![4u8; 2 << 20], SaveOptions::new()).unwrap();
            // The parent still holds its database handle open while this process writes.
            assert_eq!(ctx.storage_info("child-small").unwrap().unwrap().tier, "redb");
        }
        "relative-contexts-dir" => {
            // A contexts directory given relative to the working directory, which the
            // program changes afterwards (as servers and workers do).
            std::env::set_current_dir(env("WFCTX_BASE")).unwrap();
            let ctx = WorkflowContext::builder().contexts_dir("rel").create().unwrap();
            ctx.save("before", "the chdir").unwrap();
            std::env::set_current_dir("/").unwrap();
            ctx.save_bytes("large", &[7u8; 1 << 20], common::to_disk()).unwrap();
            ctx.save("small", &1u32).unwrap();
            assert_eq!(ctx.load::<String>("before").unwrap(), "the chdir");
            assert!(ctx.dir().is_absolute(), "{}", ctx.dir().display());
            let opener = WorkflowContext::builder().contexts_dir(ctx.dir().parent().unwrap()).run_id(ctx.run_id());
            assert_eq!(&*opener.open().unwrap().load_bytes("large").unwrap(), &[7u8; 1 << 20][..]);
            ctx.shutdown().unwrap();
        }
        "shutdown" => {
            let ctx = open_from_env();
            ctx.shutdown().unwrap();
        }
        "small-shm" => {
            // Inside a private mount namespace whose /dev/shm holds 16 MiB.
            let ctx = WorkflowContext::builder().contexts_dir(env("WFCTX_BASE")).create().unwrap();
            let big: Vec<u8> = (0..64usize << 20).map(|i| (i % 251) as u8).collect();
            ctx.save_bytes("big", &big, SaveOptions::new()).unwrap();
            let info = ctx.storage_info("big").unwrap().unwrap();
            assert_eq!(info.storage_type, StorageKind::Disk, "a value larger than /dev/shm spills to disk");
            assert_eq!(&*ctx.load_bytes("big").unwrap(), &big[..]);
            // What fits still goes to RAM.
            ctx.save_bytes("fits", &vec![3u8; 4 << 20], SaveOptions::new()).unwrap();
            assert_eq!(ctx.storage_info("fits").unwrap().unwrap().storage_type, StorageKind::Ram);
            // RAM only, without room in /dev/shm: a clear error, nothing stored.
            let err = ctx.save_bytes("too-big", &big[..32 << 20], SaveOptions::new().ram_only(true)).unwrap_err();
            assert!(matches!(err, workflow_context::Error::OutOfRam { shm_full: true, .. }), "{err}");
            assert!(!ctx.contains("too-big").unwrap());
            println!("small /dev/shm: {err}");
        }
        "tiny-disk" => {
            // Inside a private mount namespace whose contexts directory is a 256 KiB tmpfs:
            // the key table cannot grow past a few thousand keys.
            let ctx =
                WorkflowContext::builder().contexts_dir(env("WFCTX_BASE")).collect_orphans(false).create().unwrap();
            let key = |i: usize| format!("steps/{i:05}/{}", "k".repeat(40));
            let mut saved = 0;
            let err = loop {
                match ctx.save(&key(saved), &saved) {
                    Ok(()) => saved += 1,
                    Err(e) => break e,
                }
                assert!(saved < 100_000, "a 256 KiB disk took 100,000 keys");
            };
            let text = err.to_string();
            assert!(text.contains("table") || text.contains("journal"), "the error names the index file: {text}");
            // Nothing committed was lost, and the refused key is not there.
            assert!(saved > 100, "only {saved} keys fit");
            for i in 0..saved {
                assert_eq!(ctx.load::<usize>(&key(i)).unwrap(), i);
            }
            assert!(!ctx.contains(&key(saved)).unwrap());
            let u = ctx.usage().unwrap();
            assert_eq!(u.stored_keys_count, saved);
            // The refused value's object went back: usage is what the keys hold.
            let held: u64 = (0..saved).map(|i| ctx.storage_info(&key(i)).unwrap().unwrap().size).sum();
            assert_eq!(u.ram_usage_bytes + u.temp_disk_usage_bytes, held);
            // Existing keys can still be overwritten and removed.
            ctx.save(&key(0), &7usize).unwrap();
            assert_eq!(ctx.load::<usize>(&key(0)).unwrap(), 7);
            assert!(ctx.remove(&key(1)).unwrap());
            println!("tiny disk: {saved} keys, then: {err}");
        }
        "sweep-short-of-descriptors" => {
            // Every descriptor but `WFCTX_SPARE` taken, then a sweep: whatever fails, it must
            // not take a context for dead because it could not look at it.
            let spare: usize = env("WFCTX_SPARE").parse().unwrap();
            let mut held = Vec::new();
            while let Ok(f) = std::fs::File::open("/dev/null") {
                held.push(f);
            }
            held.truncate(held.len().saturating_sub(spare));
            let swept = workflow_context::collect_orphans(env("WFCTX_BASE"));
            drop(held);
            println!("{spare} spare descriptors: {swept:?}");
        }
        "hold-the-index-lock" => {
            let ctx = open_from_env();
            // A small save writes its value under the index lock: this one never finishes.
            ctx.save("held", &HoldsTheLock(std::cell::Cell::new(0))).unwrap();
        }
        "open-in-1-gib-of-address-space" => {
            // Room for the context's mappings, not for a 4 GiB buffer.
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let vm_kib: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix("VmSize:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap();
            let limit = (vm_kib << 10) + (1 << 30);
            let rlim = libc::rlimit { rlim_cur: limit, rlim_max: limit };
            // SAFETY: `setrlimit` reads the struct, which outlives the call.
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &rlim) }, 0);
            match WorkflowContext::builder().contexts_dir(env("WFCTX_BASE")).run_id(env("WFCTX_RUN")).open() {
                Err(workflow_context::Error::Corrupt { what, detail, .. }) if what.contains("journal") => {
                    println!("refused: {what}: {detail}");
                }
                other => panic!("{other:?}"),
            }
        }
        "open-and-wait" => {
            let _ctx = open_from_env();
            println!("READY");
            std::thread::sleep(std::time::Duration::from_secs(120));
        }
        other => panic!("unknown role {other}"),
    }
}

/// A value whose second serialization (the one a save writes into its tier, under the index
/// lock for a small value) says `HOLDING` and never returns.
struct HoldsTheLock(std::cell::Cell<u32>);

impl serde::Serialize for HoldsTheLock {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let call = self.0.replace(self.0.get() + 1);
        if call == 1 {
            println!("HOLDING");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(60));
            }
        }
        s.serialize_u8(1)
    }
}

/// Starts this test binary as a child of `role` on the context `run` in `base`, and waits
/// until it prints `ready`.
fn start_child(role: &str, base: &std::path::Path, run: &str, ready: &str) -> std::process::Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", ENTRY, "--ignored", "--nocapture", "--test-threads=1"])
        .env("WFCTX_CHILD_ROLE", role)
        .env("WFCTX_BASE", base)
        .env("WFCTX_RUN", run)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.unwrap().contains(ready)), "the {role} child never said {ready}");
    child
}

/// The names of the liveness files in a context's directory.
fn liveness_files(ctx: &WorkflowContext) -> std::collections::BTreeSet<std::ffi::OsString> {
    std::fs::read_dir(ctx.dir().join("procs")).unwrap().map(|e| e.unwrap().file_name()).collect()
}

#[test]
fn a_dead_holders_lock_is_taken_over_though_a_process_it_forked_holds_its_liveness_file() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    let before = liveness_files(&ctx);
    let mut child = start_child("hold-the-index-lock", b.path(), ctx.run_id(), "HOLDING");
    let theirs: Vec<_> = liveness_files(&ctx).difference(&before).cloned().collect();
    assert_eq!(theirs.len(), 1, "{theirs:?}");
    child.kill().unwrap();
    child.wait().unwrap();
    // A process the holder forked would hold its liveness lock on: the kernel drops such a
    // lock with the last descriptor of the file, and a fork without exec copies them all.
    // This process plays that heir: the lock is held, and the process that took it is gone.
    let heir = std::fs::File::open(ctx.dir().join("procs").join(&theirs[0])).unwrap();
    heir.lock().unwrap();
    let (done, saved) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            ctx.save("after", &2u8).unwrap();
            done.send(()).unwrap();
        });
        let took = saved.recv_timeout(std::time::Duration::from_secs(5));
        // In any case, let the save go on.
        drop(heir);
        assert!(took.is_ok(), "a dead holder's lock was not taken over in 5 s while its liveness file stayed locked");
    });
    assert_eq!(ctx.load::<u8>("after").unwrap(), 2);
}

#[test]
fn the_liveness_files_of_killed_handles_go() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    let ours = liveness_files(&ctx);
    for i in 0..3u8 {
        let mut child = start_child("open-and-wait", b.path(), ctx.run_id(), "READY");
        child.kill().unwrap();
        child.wait().unwrap();
        // Dead for longer than a handle takes between creating its file and locking it.
        for name in liveness_files(&ctx) {
            let file = std::fs::File::open(ctx.dir().join("procs").join(name)).unwrap();
            file.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(120)).unwrap();
        }
        // The next handle to attach removes them.
        let next = builder(b.path()).run_id(ctx.run_id()).open().unwrap();
        next.save("k", &i).unwrap();
        drop(next);
        assert_eq!(liveness_files(&ctx), ours, "round {i}: liveness files of dead handles stay");
    }
}

#[test]
fn a_child_process_sees_and_adds_values() {
    let b = base();
    let ctx = builder(b.path()).max_ram_bytes(budget(1 << 20)).create().unwrap();
    ctx.save("from-parent", "hello child").unwrap();
    ctx.save_bytes("frame", &context_core::testing::pattern(7, 300_000), SaveOptions::new()).unwrap();
    let out =
        run_child(ENTRY, "open-and-save", &[("WFCTX_BASE", b.path().to_str().unwrap()), ("WFCTX_RUN", ctx.run_id())]);
    assert_child_ok(&out);
    assert_eq!(ctx.load::<Vec<u32>>("from-child").unwrap(), vec![1, 2, 3]);
    assert_eq!(&*ctx.load_bytes("child-frame").unwrap(), &vec![9u8; 800_000][..]);
    let u = ctx.usage().unwrap();
    assert_eq!(u.stored_keys_count, 4);
    if cfg!(all(feature = "tier-shm", feature = "tier-mmap")) {
        // 300 KB + 800 KB do not both fit a 1 MiB budget shared by the two processes.
        assert_eq!(ctx.storage_info("child-frame").unwrap().unwrap().storage_type, StorageKind::Disk);
        assert!(u.ram_usage_bytes <= 1 << 20 && u.temp_disk_usage_bytes >= 800_000, "{u:?}");
    }
    // The child only detached: the context lives on.
    assert!(ctx.dir().exists());
}

#[test]
fn several_processes_write_at_once() {
    let b = base();
    let ctx = builder(b.path()).max_ram_bytes(budget(8 << 20)).create().unwrap();
    let children: Vec<_> = (0..4)
        .map(|w| {
            let exe = std::env::current_exe().unwrap();
            Command::new(exe)
                .args(["--exact", ENTRY, "--ignored", "--nocapture", "--test-threads=1"])
                .env("WFCTX_CHILD_ROLE", "writer")
                .env("WFCTX_BASE", b.path())
                .env("WFCTX_RUN", ctx.run_id())
                .env("WFCTX_WRITER", w.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // The parent reads while they write.
    for _ in 0..50 {
        let _ = ctx.list_keys().unwrap();
        let _ = ctx.usage().unwrap();
    }
    for c in children {
        assert_child_ok(&c.wait_with_output().unwrap());
    }
    for w in 0..4usize {
        for i in 0..300usize {
            let len = [20usize, 5000, 80_000][i % 3];
            assert_eq!(&*ctx.load_bytes(&format!("w{w}-{i}")).unwrap(), &vec![(w * 50 + i) as u8; len][..]);
        }
    }
    for k in 0..4usize {
        let (_, i): (usize, usize) = ctx.load(&format!("shared-{k}")).unwrap();
        assert_eq!(i % 4, k);
    }
    let u = ctx.usage().unwrap();
    assert_eq!(u.stored_keys_count, 4 * 300 + 4);
    assert!(u.ram_usage_bytes <= budget(8 << 20), "the shared budget held: {u:?}");
    for k in ctx.list_keys().unwrap() {
        assert!(ctx.remove(&k).unwrap());
    }
    let u = ctx.usage().unwrap();
    assert_eq!((u.ram_usage_bytes, u.temp_disk_usage_bytes), (0, 0), "every overwrite freed its old value");
    let run = ctx.run_id().to_owned();
    drop(ctx);
    assert!(shm_segments(&run).is_empty(), "{:?}", shm_segments(&run));
}

#[test]
fn a_context_left_by_a_killed_creator_can_be_replaced() {
    let b = base();
    let run = run_id("killed");
    let mut child = creator_that_waits(b.path(), &run);
    // While the creator lives, its run id is taken.
    assert!(matches!(builder(b.path()).run_id(&run).create(), Err(workflow_context::Error::AlreadyExists { .. })));
    let opened = builder(b.path()).run_id(&run).open().unwrap();
    assert_eq!(opened.load::<String>("small").unwrap(), "value");
    drop(opened);
    child.kill().unwrap();
    child.wait().unwrap();
    // The dead context is replaced, with everything it held.
    let ctx = builder(b.path()).run_id(&run).create().unwrap();
    assert!(ctx.list_keys().unwrap().is_empty());
    assert!(shm_segments(&run).is_empty(), "the dead context's segments are gone: {:?}", shm_segments(&run));
    ctx.save("fresh", &1u8).unwrap();
}

#[cfg(all(feature = "tier-shm", feature = "tier-mmap"))]
#[test]
fn a_small_dev_shm_spills_to_disk_without_sigbus() {
    use context_core::testing::{Sandboxed, in_private_tmpfs};
    let b = base();
    let envs = [("WFCTX_CHILD_ROLE", std::ffi::OsStr::new("small-shm")), ("WFCTX_BASE", b.path().as_os_str())];
    match in_private_tmpfs(ENTRY, std::path::Path::new("/dev/shm"), "16m", &envs) {
        Sandboxed::Ran(_) => {
            assert!(
                std::fs::read_dir(b.path()).unwrap().next().is_none(),
                "the child's context was cleaned up when it ended"
            );
        }
        Sandboxed::Skipped(why) => println!("SKIPPED a_small_dev_shm_spills_to_disk_without_sigbus: {why}"),
    }
}

// Values go to shared memory, so that the disk fills with the index only.
#[cfg(feature = "tier-shm")]
#[test]
fn a_full_disk_stops_the_index_growing_with_an_error_not_a_sigbus() {
    use context_core::testing::{Sandboxed, in_private_tmpfs};
    let b = base();
    let dir = b.path().join("contexts");
    std::fs::create_dir(&dir).unwrap();
    let envs = [("WFCTX_CHILD_ROLE", std::ffi::OsStr::new("tiny-disk")), ("WFCTX_BASE", dir.as_os_str())];
    match in_private_tmpfs(ENTRY, &dir, "256k", &envs) {
        Sandboxed::Ran(stdout) => stdout.lines().filter(|l| l.contains("tiny disk")).for_each(|l| println!("{l}")),
        Sandboxed::Skipped(why) => {
            println!("SKIPPED a_full_disk_stops_the_index_growing_with_an_error_not_a_sigbus: {why}")
        }
    }
}

#[test]
fn space_held_by_a_killed_writer_is_reclaimed() {
    let b = base();
    let ctx = builder(b.path()).max_ram_bytes(budget(64 << 20)).create().unwrap();
    for round in 0..5u64 {
        let mut child = start_child("overwrite-forever", b.path(), ctx.run_id(), "READY");
        // Kill it somewhere in the middle of a save, overwrite or remove.
        std::thread::sleep(std::time::Duration::from_millis(30 + 17 * round));
        child.kill().unwrap();
        child.wait().unwrap();
        // A fresh handle reclaims whatever the dead writer had reserved or not yet freed.
        let fresh = builder(b.path()).run_id(ctx.run_id()).open().unwrap();
        let u = fresh.usage().unwrap();
        // Usage is exactly what the live values hold, as storage_info reports it.
        let live: u64 = fresh.list_keys().unwrap().iter().map(|k| fresh.storage_info(k).unwrap().unwrap().size).sum();
        assert_eq!(
            u.ram_usage_bytes + u.temp_disk_usage_bytes,
            live,
            "round {round}: usage is exactly the live values"
        );
        if fresh.contains("big").unwrap() {
            assert_eq!(&*fresh.load_bytes("big").unwrap(), &vec![5u8; 3 << 20][..], "no torn value");
        }
        // The segments left are the live values' (plus the small-value arenas).
        let large_segments = common::large_segments(ctx.run_id()).len();
        let large_in_ram = fresh
            .list_keys()
            .unwrap()
            .iter()
            .filter(|k| fresh.storage_info(k).unwrap().unwrap().storage_type == StorageKind::Ram)
            .filter(|k| fresh.storage_info(k).unwrap().unwrap().len + 40 > 4096)
            .count();
        assert_eq!(large_segments, large_in_ram, "round {round}: no leaked segment");
    }
}

#[test]
fn a_relative_contexts_dir_survives_a_change_of_working_directory() {
    let b = base();
    let out = run_child(ENTRY, "relative-contexts-dir", &[("WFCTX_BASE", b.path().to_str().unwrap())]);
    assert_child_ok(&out);
    let left = common::tree(&b.path().join("rel"));
    assert!(left.is_empty(), "the shut-down context left {left:?}");
}

#[test]
fn the_config_file_can_come_from_the_environment() {
    let b = base();
    let cfg = b.path().join("cfg.json");
    std::fs::write(&cfg, "{ \"MAX_RAM_GB\": 1.5, // comment\n \"CONTEXTS_DIR_NAME\": \"from-env\" }").unwrap();
    let tmp = b.path().to_str().unwrap();
    let out = run_child(ENTRY, "env-config", &[("WORKFLOW_CONTEXT_CONFIG", cfg.to_str().unwrap()), ("TMPDIR", tmp)]);
    assert_child_ok(&out);
    let bad = b.path().join("bad.json");
    std::fs::write(&bad, r#"{"MAX_RAM_PERCENT": 0}"#).unwrap();
    let out =
        run_child(ENTRY, "bad-env-config", &[("WORKFLOW_CONTEXT_CONFIG", bad.to_str().unwrap()), ("TMPDIR", tmp)]);
    assert_child_ok(&out);
}

#[test]
fn an_empty_tmpdir_is_taken_as_unset() {
    let b = base();
    let name = format!("wfctx-empty-tmpdir-{}", run_id("d"));
    let cfg = b.path().join("cfg.json");
    std::fs::write(&cfg, format!(r#"{{"CONTEXTS_DIR_NAME": "{name}"}}"#)).unwrap();
    let vars = [("WORKFLOW_CONTEXT_CONFIG", cfg.to_str().unwrap()), ("TMPDIR", ""), ("WFCTX_DIR_NAME", &name)];
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", ENTRY, "--ignored", "--nocapture", "--test-threads=1"]);
    cmd.env("WFCTX_CHILD_ROLE", "empty-tmpdir").envs(vars).current_dir(b.path());
    let out = cmd.output().unwrap();
    assert!(!b.path().join(&name).exists(), "the context was made in the working directory");
    assert_child_ok(&out);
}

#[test]
fn the_parents_a_contexts_dir_needs_are_made_private_whatever_the_umask() {
    let b = base();
    let out = run_child(ENTRY, "umask-0-nested-contexts-dir", &[("WFCTX_BASE", b.path().to_str().unwrap())]);
    assert_child_ok(&out);
}

#[test]
fn without_proc_a_share_of_memory_is_an_error_not_a_zero_budget() {
    use context_core::testing::{Sandboxed, in_private_tmpfs};
    let b = base();
    let c = base();
    let cfg = c.path().join("cfg.json");
    std::fs::write(&cfg, r#"{"MAX_RAM_GB": 0.5, "MAX_RAM_PERCENT": 50}"#).unwrap();
    let envs = [
        ("WFCTX_CHILD_ROLE", std::ffi::OsStr::new("no-proc-budget")),
        ("WFCTX_BASE", b.path().as_os_str()),
        ("WFCTX_CFG", cfg.as_os_str()),
    ];
    match in_private_tmpfs(ENTRY, std::path::Path::new("/proc"), "1m", &envs) {
        Sandboxed::Ran(_) => {}
        Sandboxed::Skipped(why) => {
            println!("SKIPPED without_proc_a_share_of_memory_is_an_error_not_a_zero_budget: {why}")
        }
    }
}

#[test]
fn another_process_can_shut_the_context_down() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    ctx.save_bytes("ram", &[1u8; 100_000], SaveOptions::new()).unwrap();
    ctx.save("small", &1u8).unwrap();
    let run = ctx.run_id().to_owned();
    let out = run_child(ENTRY, "shutdown", &[("WFCTX_BASE", b.path().to_str().unwrap()), ("WFCTX_RUN", &run)]);
    assert_child_ok(&out);
    assert!(matches!(ctx.load::<u8>("small"), Err(workflow_context::Error::Closed { .. })));
    assert!(!ctx.dir().exists());
    assert!(shm_segments(&run).is_empty(), "{:?}", shm_segments(&run));
    ctx.shutdown().unwrap();
}

#[test]
fn a_meta_page_claiming_a_4_gib_journal_is_corrupt_without_allocating_it() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    ctx.save("k", "v").unwrap();
    // The head word (at byte 24 of the meta page): the journal's committed length, in its
    // low 32 bits, made 4 GiB less 16 bytes; its generation kept.
    let meta = ctx.dir().join("meta");
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&meta).unwrap();
    let mut head = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut head, 24).unwrap();
    let lie = (u64::from_le_bytes(head) & !0xffff_ffff) | 0xffff_fff0;
    std::os::unix::fs::FileExt::write_all_at(&file, &lie.to_le_bytes(), 24).unwrap();
    // Opened by a process with 1 GiB of address space to spare: refused, not aborted for
    // want of memory.
    let env = [("WFCTX_BASE", b.path().to_str().unwrap()), ("WFCTX_RUN", ctx.run_id())];
    let out = run_child(ENTRY, "open-in-1-gib-of-address-space", &env);
    assert_child_ok(&out);
    // Told the truth again, the context opens.
    std::os::unix::fs::FileExt::write_all_at(&file, &head, 24).unwrap();
    assert_eq!(builder(b.path()).run_id(ctx.run_id()).open().unwrap().load::<String>("k").unwrap(), "v");
}

#[cfg(all(feature = "tier-redb", feature = "tier-mmap"))]
#[test]
fn small_disk_values_go_to_redb_and_large_to_mmap_across_processes() {
    let b = base();
    // No RAM budget: everything goes to disk, placed by size.
    let ctx = builder(b.path()).max_ram_bytes(0).create().unwrap();
    ctx.save_bytes("small", &vec![1u8; 1000], SaveOptions::new()).unwrap();
    ctx.save_bytes("large", &vec![2u8; 1 << 20], SaveOptions::new()).unwrap();
    assert_eq!(ctx.storage_info("small").unwrap().unwrap().tier, "redb");
    assert_eq!(ctx.storage_info("large").unwrap().unwrap().tier, "mmap");
    let out =
        run_child(ENTRY, "disk-tiers", &[("WFCTX_BASE", b.path().to_str().unwrap()), ("WFCTX_RUN", ctx.run_id())]);
    assert_child_ok(&out);
    assert_eq!(&*ctx.load_bytes("child-small").unwrap(), &vec![3u8; 2000][..]);
    assert_eq!(&*ctx.load_bytes("child-large").unwrap(), &vec![4u8; 2 << 20][..]);
    assert_eq!(ctx.storage_info("child-large").unwrap().unwrap().tier, "mmap");
    let u = ctx.usage().unwrap();
    assert_eq!((u.ram_usage_bytes, u.stored_keys_count), (0, 4));
    // Compressible small values are held compressed.
    assert!(ctx.storage_info("small").unwrap().unwrap().size < 1000);
}

/// Starts a child that creates context `run` in `base`, saves a RAM, a disk and a small
/// value, and waits; returns it once it is ready.
fn creator_that_waits(base: &std::path::Path, run: &str) -> std::process::Child {
    start_child("create-and-wait", base, run, "READY")
}

/// Makes a context of `run` in `base` in a child process, then kills the child: a context
/// its creator left behind.
fn killed_creators_context(base: &std::path::Path, run: &str) {
    let mut creator = creator_that_waits(base, run);
    creator.kill().unwrap();
    creator.wait().unwrap();
}

#[test]
fn orphans_are_collected_and_live_contexts_left_alone() {
    let b = base();
    let dead_run = run_id("dead");
    let live_run = run_id("live");
    let mut dead = creator_that_waits(b.path(), &dead_run);
    let mut live = creator_that_waits(b.path(), &live_run);
    dead.kill().unwrap();
    dead.wait().unwrap();
    // Things in the contexts directory that are not contexts are never touched.
    std::fs::write(b.path().join("notes.txt"), b"mine").unwrap();
    std::fs::create_dir(b.path().join("not-a-context")).unwrap();
    std::os::unix::fs::symlink("/tmp", b.path().join("a-link")).unwrap();
    // A half-made context whose creator died two minutes ago.
    let staging = b.path().join(".staging-gone-00000000000000ff");
    std::fs::create_dir_all(staging.join("procs")).unwrap();
    std::fs::write(staging.join("procs/00000000000000ff"), b"").unwrap();
    let two_minutes_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(120);
    std::fs::File::open(&staging).unwrap().set_modified(two_minutes_ago).unwrap();
    // One that is still being made (its creator has not locked its liveness file yet).
    let fresh_staging = b.path().join(".staging-new-00000000000000fe");
    std::fs::create_dir(&fresh_staging).unwrap();
    let had_segments = shm_segments(&dead_run).len();
    if cfg!(feature = "tier-shm") {
        assert!(had_segments >= 2, "the dead context left segments: {had_segments}");
    }

    let report = workflow_context::collect_orphans(b.path()).unwrap();
    println!("{report:?}");
    assert_eq!(report.contexts_removed, 2, "the dead context and the half-made one");
    assert_eq!(report.segments_removed, had_segments);
    assert!(report.bytes_freed >= 400_000, "{report:?}");
    assert_eq!(report.live_contexts, 1);
    assert!(shm_segments(&dead_run).is_empty());
    assert!(!b.path().join(&dead_run).exists() && !staging.exists());
    assert!(fresh_staging.exists(), "a context being created is left to its creator");
    assert!(report.failed.is_empty(), "{report:?}");
    for kept in ["notes.txt", "not-a-context", "a-link"] {
        assert!(std::fs::symlink_metadata(b.path().join(kept)).is_ok(), "{kept} was touched");
    }
    // The live one is whole, and can still be opened and read.
    let opened = builder(b.path()).run_id(&live_run).open().unwrap();
    assert_eq!(opened.load::<String>("small").unwrap(), "value");
    assert_eq!(&*opened.load_bytes("ram").unwrap(), &context_core::testing::pattern(1, 200_000)[..]);
    drop(opened);
    // Once its creator dies too, it goes, and a second collection finds nothing more.
    live.kill().unwrap();
    live.wait().unwrap();
    let report = workflow_context::collect_orphans(b.path()).unwrap();
    assert_eq!((report.contexts_removed, report.live_contexts), (1, 0));
    assert!(shm_segments(&live_run).is_empty());
    assert_eq!(workflow_context::collect_orphans(b.path()).unwrap().contexts_removed, 0);
}

/// Runs `collect_orphans` on `base` in a child process left with `spare` file descriptors.
fn sweep_short_of_descriptors(base: &std::path::Path, spare: usize) -> std::process::Output {
    let out = run_child(
        ENTRY,
        "sweep-short-of-descriptors",
        &[("WFCTX_BASE", base.to_str().unwrap()), ("WFCTX_SPARE", &spare.to_string())],
    );
    assert_child_ok(&out);
    out
}

#[test]
fn a_sweep_short_of_file_descriptors_leaves_a_live_context_alone() {
    let b = base();
    let live = run_id("live-fd");
    let mut creator = creator_that_waits(b.path(), &live);
    // Each number of spare descriptors fails the sweep at another step.
    for spare in 0..12 {
        let out = sweep_short_of_descriptors(b.path(), spare);
        let opened = builder(b.path()).run_id(&live).open();
        let loaded = opened
            .as_ref()
            .map_err(ToString::to_string)
            .and_then(|c| c.load::<String>("small").map_err(|e| e.to_string()));
        if loaded.as_deref() != Ok("value") {
            let _ = creator.kill();
            panic!(
                "a sweep with {spare} spare descriptors broke a context whose creator is alive: {loaded:?}\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
    creator.kill().unwrap();
    creator.wait().unwrap();
    // Dead now: a sweep with descriptors to spare takes it, shared memory and all.
    let report = workflow_context::collect_orphans(b.path()).unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
    assert!(shm_segments(&live).is_empty(), "{:?}", shm_segments(&live));
}

#[test]
fn a_sweep_short_of_file_descriptors_never_drops_a_dead_contexts_shared_memory() {
    let b = base();
    let dead = run_id("dead-fd");
    killed_creators_context(b.path(), &dead);
    let dir = b.path().join(&dead);
    // However short of descriptors a sweep runs, the directory (whose meta page is the only
    // way to tell the context's shared memory apart) goes only with the shared memory.
    for spare in 0..14 {
        let out = sweep_short_of_descriptors(b.path(), spare);
        if !dir.exists() {
            assert!(
                shm_segments(&dead).is_empty(),
                "with {spare} spare descriptors the directory went and the shared memory stayed: {:?}\n{}",
                shm_segments(&dead),
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
    let report = workflow_context::collect_orphans(b.path()).unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
    assert!(!dir.exists() && shm_segments(&dead).is_empty());
}

#[test]
fn a_removal_cut_short_is_finished_by_the_next_sweep() {
    let b = base();
    let two_minutes_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(120);
    // One being removed right now, by a live process (made first: creating a context sweeps).
    let live_run = run_id("being-removed");
    let mut live = creator_that_waits(b.path(), &live_run);
    let in_progress = b.path().join(format!(".removing-{live_run}-00000000000000bb"));
    std::fs::rename(b.path().join(&live_run), &in_progress).unwrap();
    std::fs::File::open(&in_progress).unwrap().set_modified(two_minutes_ago).unwrap();
    // What a shutdown or a collection killed while removing a directory leaves: the
    // directory, renamed for its removal, part of it gone (here, its meta page).
    let cut_short = b.path().join(".removing-gone-00000000000000aa");
    std::fs::create_dir_all(cut_short.join("procs")).unwrap();
    std::fs::create_dir_all(cut_short.join("values")).unwrap();
    std::fs::write(cut_short.join("values/0000000000000001.val"), [7; 5000]).unwrap();
    std::fs::write(cut_short.join("journal.0"), b"left over").unwrap();
    std::fs::File::open(&cut_short).unwrap().set_modified(two_minutes_ago).unwrap();

    let report = workflow_context::collect_orphans(b.path()).unwrap();
    let left_alone = in_progress.exists();
    live.kill().unwrap();
    assert_eq!(report.contexts_removed, 1, "{report:?}");
    assert!(report.bytes_freed >= 5000, "{report:?}");
    assert!(!cut_short.exists());
    assert!(left_alone, "a live process's directory is left to it");
    live.wait().unwrap();
    let had_segments = shm_segments(&live_run).len();
    if cfg!(feature = "tier-shm") {
        assert!(had_segments >= 2, "the context being removed still had its segments: {had_segments}");
    }
    let report = workflow_context::collect_orphans(b.path()).unwrap();
    assert_eq!(report.contexts_removed, 1, "{report:?}");
    assert!(!in_progress.exists());
    // Its shared memory went with it: the meta page inside named it. The report counts it.
    assert!(shm_segments(&live_run).is_empty(), "{:?}", shm_segments(&live_run));
    assert_eq!(report.segments_removed, had_segments, "{report:?}");
    assert!(report.bytes_freed >= 400_000, "its RAM value counts too: {report:?}");
}

/// A file below `.0` made immutable (`chattr +i`) until this is dropped, wherever it has
/// been moved below `.0` by then: no process, root's included, can remove it.
struct Immutable<'a>(&'a std::path::Path);

impl<'a> Immutable<'a> {
    /// `None` where that cannot be done (not root, no `chattr`, a file system without the flag).
    fn new(below: &'a std::path::Path, file: &std::path::Path) -> Option<Self> {
        let made = Command::new("chattr").arg("+i").arg(file).stderr(Stdio::null()).status();
        made.is_ok_and(|s| s.success()).then_some(Immutable(below))
    }
}

impl Drop for Immutable<'_> {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-R").arg("-i").arg(self.0).status();
    }
}

#[test]
fn a_dead_context_whose_removal_stops_part_way_is_finished_later_and_frees_its_run_id() {
    let b = base();
    let run = run_id("stuck");
    killed_creators_context(b.path(), &run);
    let dir = b.path().join(&run);
    // A file that cannot be removed, listed after the meta page: a removal (which goes in
    // listing order) removes the meta page, then stops there.
    for i in 0..16 {
        std::fs::write(dir.join(format!("stuck-{i}")), b"planted").unwrap();
    }
    let listed: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    let after_meta = listed.iter().skip_while(|n| *n != "meta").find(|n| n.starts_with("stuck-")).cloned();
    for name in listed.iter().filter(|n| n.starts_with("stuck-") && Some(*n) != after_meta.as_ref()) {
        std::fs::remove_file(dir.join(name)).unwrap();
    }
    let Some(stuck) = after_meta.and_then(|name| Immutable::new(b.path(), &dir.join(name))) else {
        println!("SKIPPED: cannot make a file immutable here (needs root, chattr and ext4 or the like)");
        return;
    };
    let report = workflow_context::collect_orphans(b.path()).unwrap();
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert!(shm_segments(&run).is_empty(), "{:?}", shm_segments(&run));
    // What is left is not taken for a foreign directory: the run id is free, and once the
    // file can go, a sweep finishes the removal.
    let ctx = builder(b.path()).run_id(&run).create().unwrap();
    ctx.save("k", "v").unwrap();
    let leftovers = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(b.path()).unwrap().map(|e| e.unwrap().path()).filter(|p| *p != ctx.dir()).collect()
    };
    let left = leftovers();
    assert_eq!(left.len(), 1, "{left:?}");
    drop(stuck);
    let two_minutes_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(120);
    std::fs::File::open(&left[0]).unwrap().set_modified(two_minutes_ago).unwrap();
    let report = workflow_context::collect_orphans(b.path()).unwrap();
    assert_eq!((report.contexts_removed, report.live_contexts), (1, 1), "{report:?}");
    assert!(leftovers().is_empty(), "{:?}", leftovers());
    assert_eq!(ctx.load::<String>("k").unwrap(), "v");
}

#[test]
fn a_context_whose_liveness_cannot_be_told_is_left_alone_and_reported() {
    let b = base();
    let run = run_id("untold");
    killed_creators_context(b.path(), &run);
    // A liveness file that cannot be opened (a symbolic link, which is never followed):
    // not knowing whether its holder lives is not knowing that it is dead.
    let link = b.path().join(&run).join("procs").join("00000000000000aa");
    std::os::unix::fs::symlink("/dev/null", &link).unwrap();
    let report = workflow_context::collect_orphans(b.path()).unwrap();
    assert_eq!((report.contexts_removed, report.live_contexts), (0, 0), "{report:?}");
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(report.failed[0].path, b.path().join(&run));
    assert!(report.failed[0].reason.contains("liveness file"), "{}", report.failed[0].reason);
    assert!(b.path().join(&run).join("meta").exists(), "the context was left whole");
    // Nor is it replaced by a new context of the same run id.
    let err = builder(b.path()).run_id(&run).create().unwrap_err();
    assert!(matches!(err, workflow_context::Error::Io { .. }), "{err}");
    // Once it can be told dead, it goes.
    std::fs::remove_file(&link).unwrap();
    let report = workflow_context::collect_orphans(b.path()).unwrap();
    assert_eq!(report.contexts_removed, 1, "{report:?}");
    assert!(shm_segments(&run).is_empty());
}

#[cfg(feature = "tier-redb")]
#[test]
fn a_damaged_dead_context_loses_what_can_be_removed_and_stops_no_other() {
    let b = base();
    let damaged = run_id("damaged");
    let healthy = run_id("healthy");
    // Both made before either dies (creating a context sweeps the dead ones).
    let creators = [creator_that_waits(b.path(), &damaged), creator_that_waits(b.path(), &healthy)];
    for mut creator in creators {
        creator.kill().unwrap();
        creator.wait().unwrap();
    }
    // Its database cannot be opened, so its tier can be neither built nor destroyed.
    std::fs::write(b.path().join(&damaged).join("values.redb"), vec![0xab; 8192]).unwrap();
    let report = workflow_context::collect_orphans(b.path()).unwrap();
    assert_eq!(report.contexts_removed, 1, "the healthy one: {report:?}");
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(report.failed[0].path, b.path().join(&damaged));
    assert!(report.failed[0].reason.contains("values.redb"), "{}", report.failed[0].reason);
    for run in [&damaged, &healthy] {
        assert!(shm_segments(run).is_empty(), "{run}: {:?}", shm_segments(run));
        assert!(!b.path().join(run).exists(), "{run}");
    }
}

#[cfg(feature = "tier-redb")]
#[test]
fn a_damaged_dead_context_is_replaced_by_a_new_one_of_its_run_id() {
    let b = base();
    let run = run_id("damaged-replaced");
    killed_creators_context(b.path(), &run);
    std::fs::write(b.path().join(&run).join("values.redb"), vec![0xab; 8192]).unwrap();
    let ctx = builder(b.path()).run_id(&run).collect_orphans(false).create().unwrap();
    assert!(ctx.list_keys().unwrap().is_empty());
    ctx.save_bytes("fresh", &[1; 100], common::to_disk()).unwrap();
    assert_eq!(&*ctx.load_bytes("fresh").unwrap(), &[1; 100]);
    drop(ctx);
    assert!(shm_segments(&run).is_empty(), "{:?}", shm_segments(&run));
}

#[test]
fn creating_a_context_sweeps_its_directory_unless_told_not_to() {
    let b = base();
    let run = run_id("swept");
    killed_creators_context(b.path(), &run);
    let kept = builder(b.path()).collect_orphans(false).create().unwrap();
    assert!(b.path().join(&run).exists(), "no sweep when switched off");
    drop(kept);
    let ctx = builder(b.path()).create().unwrap();
    assert!(!b.path().join(&run).exists(), "the default sweep removed the dead context");
    assert!(shm_segments(&run).is_empty());
    drop(ctx);
}

#[test]
fn collecting_refuses_an_unsafe_directory() {
    let b = base();
    let link = b.path().join("link");
    std::os::unix::fs::symlink(b.path(), &link).unwrap();
    assert!(matches!(workflow_context::collect_orphans(&link), Err(workflow_context::Error::Io { .. })));
    let report = workflow_context::collect_orphans(b.path().join("missing")).unwrap();
    assert_eq!(report, workflow_context::GcReport::default());
}

/// Shared memory is one namespace for the whole machine: two contexts of one run id, in two
/// contexts directories, must not share (or remove) each other's segments.
#[test]
fn one_run_id_in_two_contexts_directories_keeps_two_contexts() {
    let (here, there) = (base(), base());
    let run = run_id("twin");
    let value = |i: u64| context_core::testing::pattern(i, 200_000);
    let ours = builder(here.path()).run_id(&run).create().unwrap();
    ours.save("small", "ours").unwrap();
    ours.save_bytes("ram", &value(7), SaveOptions::new()).unwrap();
    // A twin elsewhere saves under the same keys (so the same object ids), then dies.
    let mut twin = creator_that_waits(there.path(), &run);
    let alive = builder(there.path()).run_id(&run).open().unwrap();
    alive.save_bytes("mine", &value(8), SaveOptions::new()).unwrap();
    assert_eq!(alive.load::<String>("small").unwrap(), "value");
    drop(alive);
    twin.kill().unwrap();
    twin.wait().unwrap();
    let report = workflow_context::collect_orphans(there.path()).unwrap();
    assert_eq!(report.contexts_removed, 1, "{report:?}");
    if cfg!(feature = "tier-shm") {
        assert!(report.segments_removed >= 2, "the twin's segments are counted as its own: {report:?}");
    }
    assert_eq!(ours.load::<String>("small").unwrap(), "ours");
    assert_eq!(&*ours.load_bytes("ram").unwrap(), &value(7)[..]);
    // A second twin, shut down by its owner, removes only its own segments too.
    let second = builder(there.path()).run_id(&run).create().unwrap();
    second.save_bytes("ram", &value(9), SaveOptions::new()).unwrap();
    second.shutdown().unwrap();
    let reopened = builder(here.path()).run_id(&run).open().unwrap();
    assert_eq!(&*reopened.load_bytes("ram").unwrap(), &value(7)[..]);
    drop(reopened);
    ours.shutdown().unwrap();
    assert!(shm_segments(&run).is_empty());
}
