//! Behaviour of one context in one process: values, keys, budgets, export, lifecycle.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;

use common::{PanicsWhileWritten, PausesWhileWritten, base, budget, builder, run_id, shm_segments, to_disk, tree};
use serde::{Deserialize, Serialize};
use workflow_context::{Error, PassBy, SaveOptions, StorageKind, WorkflowContext, read_exported, read_exported_bytes};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Params {
    prompt: String,
    seed: u64,
    cfg: f32,
    steps: Vec<u16>,
    extra: BTreeMap<String, Option<i64>>,
}

fn params() -> Params {
    Params {
        prompt: "a lighthouse at dusk".into(),
        seed: 12345,
        cfg: 7.5,
        steps: (0..30).collect(),
        extra: [("clip_skip".to_string(), Some(-2)), ("none".to_string(), None)].into(),
    }
}

#[test]
fn typed_values_round_trip() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    ctx.save("params", &params()).unwrap();
    ctx.save("prompt", "a string slice").unwrap();
    ctx.save("n", &42i32).unwrap();
    ctx.save("unit", &()).unwrap();
    assert_eq!(ctx.load::<Params>("params").unwrap(), params());
    assert_eq!(ctx.load::<String>("prompt").unwrap(), "a string slice");
    assert_eq!(ctx.load::<i32>("n").unwrap(), 42);
    ctx.load::<()>("unit").unwrap();
    assert_eq!(
        &*ctx.load_bytes("n").unwrap(),
        &postcard::to_stdvec(&42i32).unwrap()[..],
        "load_bytes is the postcard encoding"
    );
}

#[test]
fn bytes_round_trip_exactly_at_every_size() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    // Across the record's forms (short up to 255 bytes) and the tiers' size classes.
    for (i, len) in [0usize, 1, 31, 32, 255, 256, 4064, 4065, 65_536, 65_537, 6 << 20].into_iter().enumerate() {
        let bytes: Vec<u8> = (0..len).map(|j| (j * 7 + i) as u8).collect();
        for opts in [SaveOptions::new(), to_disk()] {
            let key = format!("v{len}-{}", opts.uses_ram());
            ctx.save_bytes(&key, &bytes, opts).unwrap();
            assert_eq!(&*ctx.load_bytes(&key).unwrap(), &bytes[..], "{key}");
            let info = ctx.storage_info(&key).unwrap().unwrap();
            assert_eq!(info.len, len as u64);
            assert!(info.size >= info.len || info.tier == "redb", "{info:?}");
        }
    }
}

#[test]
#[cfg(feature = "tier-shm")]
fn a_short_string_takes_one_cache_line_of_ram() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    let prompt = "a lighthouse on a cliff at dusk, oil on canvas, 4k";
    assert_eq!(prompt.len(), 50);
    ctx.save("prompt", prompt).unwrap();
    let info = ctx.storage_info("prompt").unwrap().unwrap();
    // 51 bytes encoded, 11 of header and checksum: one 64-byte slot of shared memory.
    assert_eq!((info.storage_type, info.len, info.size), (StorageKind::Ram, 51, 64), "{info:?}");
    assert_eq!(ctx.usage().unwrap().ram_usage_bytes, 64);
    assert_eq!(ctx.load::<String>("prompt").unwrap(), prompt);
}

#[test]
fn wrong_type_is_a_codec_error_naming_the_key() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    ctx.save("p", &params()).unwrap();
    match ctx.load::<u8>("p") {
        Err(Error::Codec { key, op, .. }) => assert_eq!((key.as_str(), op), ("p", "decode")),
        other => panic!("{other:?}"),
    }
    assert_eq!(ctx.load::<Params>("p").unwrap(), params(), "a failed load changes nothing");
}

#[test]
fn missing_keys() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    assert!(matches!(ctx.load::<u8>("nope"), Err(Error::KeyNotFound { key }) if key == "nope"));
    assert!(matches!(ctx.load_bytes("nope"), Err(Error::KeyNotFound { .. })));
    assert!(!ctx.contains("nope").unwrap());
    assert!(!ctx.remove("nope").unwrap());
    assert_eq!(ctx.storage_info("nope").unwrap(), None);
    assert!(matches!(ctx.export_data("nope", b.path().join("x"), false), Err(Error::KeyNotFound { .. })));
}

#[test]
fn keys_never_become_paths() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    let long = "k".repeat(4096);
    let keys = ["../x", "../../etc/passwd", "a/b", "/abs", "ключ 🔑", "\0nul", ".", "..", long.as_str()];
    for (i, k) in keys.iter().enumerate() {
        ctx.save(k, &i).unwrap();
        ctx.save_bytes(&format!("{i}#disk"), &[i as u8; 100_000], to_disk()).unwrap();
    }
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(ctx.load::<usize>(k).unwrap(), i, "{k:?}");
    }
    let mut listed = ctx.list_keys().unwrap();
    listed.retain(|k| !k.ends_with("#disk"));
    let mut expected: Vec<String> = keys.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(listed, expected);
    // Nothing was created outside the context directory, and nothing inside it is named after a key.
    let top: Vec<_> = fs::read_dir(b.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(top, vec![std::ffi::OsString::from(ctx.run_id())]);
    for p in tree(ctx.dir()) {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let hex = |s: &str| s.len() == 16 && s.bytes().all(|c| c.is_ascii_hexdigit());
        let known = ["meta", "procs", "values", "recipes", "values.redb", "journal.spare"].contains(&name.as_str())
            || name.strip_prefix("journal.").is_some_and(|g| g.parse::<u32>().is_ok())
            || name.strip_prefix("table.").is_some_and(|g| g.parse::<u32>().is_ok())
            || hex(&name)
            || name.strip_suffix(".val").is_some_and(hex);
        assert!(known, "unexpected file {}", p.display());
    }
    for bad in ["", &"k".repeat(4097)] {
        assert!(matches!(ctx.save(bad, &1), Err(Error::InvalidKey { .. })));
        assert!(matches!(ctx.load::<u8>(bad), Err(Error::InvalidKey { .. })));
        assert!(matches!(ctx.remove(bad), Err(Error::InvalidKey { .. })));
    }
}

#[test]
fn run_ids() {
    let b = base();
    for bad in ["", "a/b", "..", "../x", "a b", "é", &"x".repeat(65)] {
        assert!(matches!(builder(b.path()).run_id(bad).create(), Err(Error::InvalidRunId { .. })), "{bad:?}");
        assert!(matches!(builder(b.path()).run_id(bad).open(), Err(Error::InvalidRunId { .. })), "{bad:?}");
    }
    let ids: std::collections::HashSet<String> =
        (0..50).map(|_| builder(b.path()).create().unwrap().run_id().to_owned()).collect();
    assert_eq!(ids.len(), 50, "generated run ids are unique");
    assert!(ids.iter().all(|id| id.len() == 32 && id.bytes().all(|c| c.is_ascii_hexdigit())));
    assert!(fs::read_dir(b.path()).unwrap().next().is_none(), "dropped contexts leave nothing");
}

#[cfg(all(feature = "tier-shm", feature = "tier-mmap"))]
#[test]
fn ram_first_then_disk_within_the_budget() {
    let b = base();
    let ctx = builder(b.path()).max_ram_bytes(1 << 20).create().unwrap();
    ctx.save_bytes("a", &[1u8; 600 << 10], SaveOptions::new()).unwrap();
    ctx.save_bytes("b", &[2u8; 600 << 10], SaveOptions::new()).unwrap();
    let a = ctx.storage_info("a").unwrap().unwrap();
    let bi = ctx.storage_info("b").unwrap().unwrap();
    assert_eq!((a.storage_type, a.tier.as_str()), (StorageKind::Ram, "shm"));
    assert!(a.shm_name.as_deref().unwrap().starts_with(&format!("/wfctx.{}.", ctx.run_id())));
    assert_eq!((bi.storage_type, bi.tier.as_str()), (StorageKind::Disk, "mmap"), "over budget: spilled");
    assert!(bi.path.as_ref().unwrap().starts_with(ctx.dir()));
    let u = ctx.usage().unwrap();
    assert_eq!(u.ram_capacity_bytes, 1 << 20);
    assert!(u.ram_usage_bytes >= 600 << 10 && u.ram_usage_bytes <= 1 << 20, "{u:?}");
    assert!(u.temp_disk_usage_bytes >= 600 << 10, "{u:?}");
    assert_eq!(u.stored_keys_count, 2);

    // ram_only refuses instead of falling back, and stores nothing.
    let before = ctx.usage().unwrap();
    match ctx.save_bytes("c", &[3u8; 600 << 10], SaveOptions::new().ram_only(true)) {
        Err(Error::OutOfRam { key, needed, capacity, .. }) => {
            assert_eq!(key, "c");
            assert!(needed >= 600 << 10);
            assert_eq!(capacity, 1 << 20);
        }
        other => panic!("{other:?}"),
    }
    assert!(!ctx.contains("c").unwrap());
    assert_eq!(ctx.usage().unwrap(), before);
    // use_ram(false) goes to disk even with room in RAM.
    ctx.save_bytes("d", &[4u8; 10], SaveOptions::new().use_ram(false)).unwrap();
    assert_eq!(ctx.storage_info("d").unwrap().unwrap().storage_type, StorageKind::Disk);
    assert!(matches!(
        ctx.save_bytes("e", b"x", SaveOptions::new().use_ram(false).ram_only(true)),
        Err(Error::InvalidOptions { .. })
    ));
    // Freeing RAM makes room again.
    assert!(ctx.remove("a").unwrap());
    ctx.save_bytes("c", &[3u8; 600 << 10], SaveOptions::new().ram_only(true)).unwrap();
    assert_eq!(&*ctx.load_bytes("c").unwrap(), &[3u8; 600 << 10][..]);
}

#[cfg(feature = "tier-shm")]
#[test]
fn overwrite_frees_the_old_storage() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    let run = ctx.run_id().to_owned();
    ctx.save_bytes("img", &[1u8; 1 << 20], SaveOptions::new()).unwrap();
    let first = ctx.storage_info("img").unwrap().unwrap().shm_name.unwrap();
    let held = ctx.load_bytes("img").unwrap();
    ctx.save_bytes("img", &[2u8; 2 << 20], SaveOptions::new()).unwrap();
    let second = ctx.storage_info("img").unwrap().unwrap().shm_name.unwrap();
    assert_ne!(first, second);
    assert!(!shm_segments(&run).iter().any(|s| format!("/{s}") == first), "old segment unlinked");
    assert!(held.iter().all(|&x| x == 1), "a held view keeps the old bytes");
    // The record (40 bytes more than the value) starts 96 bytes into its segment, so that
    // the value starts 128 bytes into a page: one page more than the value.
    assert_eq!(ctx.usage().unwrap().ram_usage_bytes, (2 << 20) + 4096, "only the new value counts");
    assert!(ctx.remove("img").unwrap());
    assert_eq!(ctx.usage().unwrap().ram_usage_bytes, 0);
    assert!(common::large_segments(&run).is_empty(), "only small-value arenas remain: {:?}", shm_segments(&run));
}

#[test]
fn a_value_that_panics_while_written_leaves_nothing_behind() {
    let b = base();
    for (what, opts) in [("RAM", SaveOptions::new()), ("disk", to_disk())] {
        let ctx = builder(b.path()).create().unwrap();
        let run = ctx.run_id().to_owned();
        ctx.save("kept", "before").unwrap();
        let before = ctx.usage().unwrap();
        let value_files = || fs::read_dir(ctx.dir().join("values")).map_or(0, |d| d.count());
        let files_before = value_files();
        // Large (written outside the index lock) and small (under it).
        for len in [1 << 20, 3000] {
            let value = PanicsWhileWritten::new(len);
            let saved = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ctx.save_with("v", &value, opts)));
            assert!(saved.is_err(), "{what} {len}: the panic goes on to the caller");
            assert_eq!(value.calls.get(), 2);
            assert!(!ctx.contains("v").unwrap(), "{what} {len}");
            assert_eq!(ctx.usage().unwrap(), before, "{what} {len}: nothing is left counted");
            assert!(common::large_segments(&run).is_empty(), "{what} {len}: {:?}", shm_segments(&run));
            // The context goes on: the lock was released, the same key saves.
            ctx.save_with("v", &vec![7u8; len], opts).unwrap();
            assert_eq!(ctx.load::<Vec<u8>>("v").unwrap().len(), len);
            assert!(ctx.remove("v").unwrap());
        }
        assert_eq!(ctx.load::<String>("kept").unwrap(), "before");
        assert_eq!(ctx.usage().unwrap(), before, "{what}");
        assert_eq!(value_files(), files_before, "{what}: no value file left");
    }
}

/// The file `key`'s value is in: its value file, or its shared-memory segment.
fn mapped_file(ctx: &WorkflowContext, key: &str) -> std::path::PathBuf {
    let info = ctx.storage_info(key).unwrap().unwrap();
    info.path.unwrap_or_else(|| format!("/dev/shm{}", info.shm_name.unwrap()).into())
}

/// How many of this process's mappings are of `path`, deleted since.
fn deleted_mappings_of(path: &std::path::Path) -> usize {
    let needle = format!("{} (deleted)", path.display());
    fs::read_to_string("/proc/self/maps").unwrap().lines().filter(|l| l.ends_with(&needle)).count()
}

/// This process's mappings of a deleted file of the context of `run_id` with the name of
/// `path`: found by name and run id, since a context's directory is renamed before it is
/// removed (a value file's mapping no longer shows `path` then).
fn deleted_mappings_in(run_id: &str, path: &std::path::Path) -> Vec<String> {
    let needle = format!("/{} (deleted)", path.file_name().unwrap().to_string_lossy());
    let maps = fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines().filter(|l| l.contains(run_id) && l.ends_with(&needle)).map(str::to_owned).collect()
}

#[test]
fn a_view_of_a_value_replaced_before_a_compaction_is_dropped() {
    let b = base();
    for (what, opts) in [("disk", to_disk()), ("RAM", SaveOptions::new())] {
        if what == "RAM" && !cfg!(feature = "tier-shm") {
            continue;
        }
        let a = builder(b.path()).create().unwrap();
        let big = vec![7u8; 1 << 20];
        a.save_bytes("big", &big, opts).unwrap();
        let mapped = mapped_file(&a, "big");
        // `a` keeps a checked view of the value.
        assert_eq!(&*a.load_bytes("big").unwrap(), &big[..]);
        assert_eq!(&*a.load_bytes("big").unwrap(), &big[..]);
        // Another handle replaces it, then saves until the journal is compacted (more than
        // once), before `a` looks again.
        let other = builder(b.path()).run_id(a.run_id()).open().unwrap();
        other.save_bytes("big", &[1u8; 100], SaveOptions::new()).unwrap();
        for i in 0..3000 {
            other.save(&format!("k{}", i % 50), &i).unwrap();
        }
        assert_eq!(&*a.load_bytes("big").unwrap(), &[1u8; 100][..], "{what}");
        assert_eq!(deleted_mappings_of(&mapped), 0, "{what}: the handle still maps the replaced value {mapped:?}");
        // A value that is still its key's loads the same across compactions; once removed,
        // its view goes too.
        other.save_bytes("kept", &big, opts).unwrap();
        assert_eq!(&*a.load_bytes("kept").unwrap(), &big[..]);
        let mapped = mapped_file(&a, "kept");
        for i in 0..3000 {
            other.save(&format!("k{}", i % 50), &i).unwrap();
        }
        let view = a.load_bytes("kept").unwrap();
        assert_eq!(&*view, &big[..]);
        other.remove("kept").unwrap();
        drop(view);
        for i in 0..3000 {
            other.save(&format!("k{}", i % 50), &i).unwrap();
        }
        assert!(!a.contains("kept").unwrap());
        assert_eq!(deleted_mappings_of(&mapped), 0, "{what}: the handle still maps the removed value {mapped:?}");
    }
}

/// A tier that copies what it reads (the redb tier decompresses a copy at every load):
/// a copy the handle kept, as it keeps a zero-copy view, would hold the value's bytes
/// again in this process's heap for as long as its key holds it, one per value loaded.
#[cfg(feature = "tier-redb")]
#[test]
fn a_handle_keeps_no_copy_of_a_large_value_read_from_a_copying_tier() {
    let b = base();
    let ctx = builder(b.path()).policy(workflow_context::core::Compressed).create().unwrap();
    let big = context_core::testing::pattern(3, 1 << 20);
    ctx.save_bytes("big", &big, SaveOptions::new()).unwrap();
    assert_eq!(ctx.storage_info("big").unwrap().unwrap().tier, "redb");
    let first = ctx.load_bytes("big").unwrap();
    let second = ctx.load_bytes("big").unwrap();
    assert!(*first == big[..] && *second == big[..]);
    assert_ne!(first.as_ptr(), second.as_ptr(), "the second load handed out the copy the handle kept of the first");
}

/// A handle lets go of its views of a context another handle ended, whether it is shut
/// down or finds out at its next call: the mappings would keep a removed value's shared
/// memory or disk space taken for as long as the handle lives.
#[test]
fn a_handle_lets_go_of_its_views_of_a_context_another_ended() {
    let b = base();
    for (what, opts) in [("disk", to_disk()), ("RAM", SaveOptions::new())] {
        if what == "RAM" && !cfg!(feature = "tier-shm") {
            continue;
        }
        for shut_down in [true, false] {
            let owner = builder(b.path()).create().unwrap();
            let big = vec![7u8; 1 << 20];
            owner.save_bytes("big", &big, opts).unwrap();
            let mapped = mapped_file(&owner, "big");
            let other = builder(b.path()).run_id(owner.run_id()).open().unwrap();
            // `other` keeps a checked view of the value.
            assert_eq!(&*other.load_bytes("big").unwrap(), &big[..]);
            owner.shutdown().unwrap();
            if shut_down {
                other.shutdown().unwrap();
            } else {
                // Not shut down: its next call finds the context ended.
                assert!(matches!(other.load_bytes("big"), Err(Error::Closed { .. })), "{what}");
            }
            let left = deleted_mappings_in(owner.run_id(), &mapped);
            assert!(left.is_empty(), "{what}, shut down {shut_down}: the handle still maps {left:.300?}");
            drop(other);
        }
    }
}

/// Saves through one handle while another shuts the context down: each is `Ok` or
/// `Closed`, also one that finds the context ended only once it holds the index lock (and
/// lets go of the handle's views then, without taking a lock it holds).
#[test]
fn saves_racing_a_shutdown_by_another_handle_are_ok_or_closed() {
    let b = base();
    for _ in 0..100 {
        let owner = builder(b.path()).create().unwrap();
        let other = std::sync::Arc::new(builder(b.path()).run_id(owner.run_id()).open().unwrap());
        let savers: Vec<_> = (0..2)
            .map(|t| {
                let other = std::sync::Arc::clone(&other);
                std::thread::spawn(move || {
                    for i in 0u64.. {
                        match other.save(&format!("k{t}-{}", i % 10), &i) {
                            Ok(()) => {}
                            Err(Error::Closed { .. }) => return,
                            Err(e) => panic!("a save racing a shutdown: {e}"),
                        }
                    }
                })
            })
            .collect();
        // Saves under way as the context ends (unless a saver failed already).
        while other.list_keys().is_ok_and(|keys| keys.len() < 4) && !savers.iter().any(|s| s.is_finished()) {}
        owner.shutdown().unwrap();
        for saver in savers {
            saver.join().unwrap();
        }
    }
}

/// A handle keeps the shared-memory arenas it read small values from mapped; once another
/// ended the context, it lets go of them (they kept the arenas' memory taken in `/dev/shm`
/// for as long as the handle lived), whether it then finds the context ended or is shut
/// down.
#[cfg(feature = "tier-shm")]
#[test]
fn a_handle_lets_go_of_the_shared_memory_of_a_context_another_ended() {
    let b = base();
    for shut_down in [false, true] {
        let owner = builder(b.path()).create().unwrap();
        owner.save("small", "a small value").unwrap();
        let arena = mapped_file(&owner, "small");
        let other = builder(b.path()).run_id(owner.run_id()).open().unwrap();
        assert_eq!(other.load::<String>("small").unwrap(), "a small value");
        owner.shutdown().unwrap();
        if shut_down {
            other.shutdown().unwrap();
        } else {
            assert!(matches!(other.load::<String>("small"), Err(Error::Closed { .. })));
        }
        let left = deleted_mappings_in(owner.run_id(), &arena);
        assert!(left.is_empty(), "shut down: {shut_down}: a handle of an ended context still maps {left:.300?}");
    }
}

/// A disk value whose record is exactly 64 KiB, the first size the handle keeps as a checked
/// view: the mmap tier maps its file, so what the handle keeps is a view (the tier read files
/// of up to 64 KiB into memory, and the handle kept that copy in its heap for as long as
/// the key held the value).
#[cfg(feature = "tier-mmap")]
#[test]
fn a_disk_value_of_exactly_64_kib_is_kept_as_a_view_of_its_file() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    let bytes = context_core::testing::pattern(5, (64 << 10) - 40);
    ctx.save_bytes("edge", &bytes, to_disk()).unwrap();
    let info = ctx.storage_info("edge").unwrap().unwrap();
    assert_eq!(info.tier, "mmap");
    let path = info.path.unwrap();
    // The record starts 96 bytes into the file, so that the value starts 128 bytes into a
    // page.
    assert_eq!(fs::metadata(&path).unwrap().len(), (64 << 10) + 96);
    for _ in 0..2 {
        let loaded = ctx.load_bytes("edge").unwrap();
        assert_eq!(&*loaded, &bytes[..]);
        let at = loaded.as_ptr() as usize;
        let maps = fs::read_to_string("/proc/self/maps").unwrap();
        let mapping = maps.lines().find(|l| {
            let (from, to) = l.split_once(' ').unwrap().0.split_once('-').unwrap();
            (usize::from_str_radix(from, 16).unwrap()..usize::from_str_radix(to, 16).unwrap()).contains(&at)
        });
        assert!(
            mapping.is_some_and(|l| l.ends_with(&*path.to_string_lossy())),
            "the value is not a view of {path:?} but in {mapping:.300?}"
        );
    }
}

#[test]
fn storage_info_and_usage_agree() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    ctx.save("s", "small").unwrap();
    // Incompressible, so every tier holds at least its length.
    ctx.save_bytes("big", &context_core::testing::pattern(9, 300_000), SaveOptions::new()).unwrap();
    let s = ctx.storage_info("s").unwrap().unwrap();
    assert_eq!(s.len, postcard::to_stdvec("small").unwrap().len() as u64);
    assert_eq!(s.pass_by, PassBy::Val);
    let u = ctx.usage().unwrap();
    assert_eq!(u.stored_keys_count, 2);
    assert!(u.ram_usage_bytes + u.temp_disk_usage_bytes >= 300_000);
    assert!((u.ram_usage_gb() * (1u64 << 30) as f64 - u.ram_usage_bytes as f64).abs() < 1.0);
    ctx.remove("s").unwrap();
    ctx.remove("big").unwrap();
    let u = ctx.usage().unwrap();
    assert_eq!((u.ram_usage_bytes, u.temp_disk_usage_bytes, u.stored_keys_count), (0, 0, 0));
}

#[test]
fn export_moves_the_value_out() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    ctx.save("params", &params()).unwrap();
    ctx.save_bytes("raw", &[5u8; 100_000], to_disk()).unwrap();
    let out = b.path().join("results/nested/params.wfx");
    ctx.export_data("params", &out, false).unwrap();
    assert!(!ctx.contains("params").unwrap());
    assert_eq!(read_exported::<Params>(&out).unwrap(), params());
    assert_eq!(fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o600);
    ctx.export_data("raw", b.path().join("raw.wfx"), false).unwrap();
    assert_eq!(read_exported_bytes(b.path().join("raw.wfx")).unwrap(), vec![5u8; 100_000]);
    assert_eq!(ctx.usage().unwrap().stored_keys_count, 0);
    assert_eq!(ctx.usage().unwrap().temp_disk_usage_bytes, 0);
}

#[test]
fn failed_export_keeps_the_value() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    ctx.save("v", &params()).unwrap();
    let dest = b.path().join("taken.wfx");
    fs::write(&dest, b"someone else's file").unwrap();
    assert!(matches!(ctx.export_data("v", &dest, false), Err(Error::AlreadyExists { .. })));
    assert_eq!(fs::read(&dest).unwrap(), b"someone else's file");
    assert_eq!(ctx.load::<Params>("v").unwrap(), params(), "the value stays");
    // A destination whose parent is a file cannot be created.
    assert!(matches!(ctx.export_data("v", dest.join("under-a-file"), false), Err(Error::Io { .. })));
    assert_eq!(ctx.load::<Params>("v").unwrap(), params());
    // A failed export leaves no directory it made behind (here: a name too long to link).
    let long = b.path().join("made/for/it").join(format!("{}.wfx", "n".repeat(300)));
    assert!(matches!(ctx.export_data("v", &long, false), Err(Error::Io { .. })));
    assert!(!b.path().join("made").exists(), "the failed export left its directories");
    assert_eq!(ctx.load::<Params>("v").unwrap(), params());
    // overwrite = true replaces it.
    ctx.export_data("v", &dest, true).unwrap();
    assert_eq!(read_exported::<Params>(&dest).unwrap(), params());
    // Damaged or foreign files read back as Corrupt.
    let mut bytes = fs::read(&dest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&dest, &bytes).unwrap();
    assert!(matches!(read_exported::<Params>(&dest), Err(Error::Corrupt { .. })));
    fs::write(&dest, b"not an export").unwrap();
    assert!(matches!(read_exported_bytes(&dest), Err(Error::Corrupt { .. })));
    assert!(matches!(read_exported_bytes(b.path().join("missing")), Err(Error::Io { .. })));
}

#[test]
fn an_export_into_the_contexts_own_directory_is_refused() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    ctx.save_bytes("k", &[3u8; 200_000], to_disk()).unwrap();
    let info = ctx.storage_info("k").unwrap().unwrap();
    // Over the value's own file, next to it, or anywhere below the context's directory, by
    // any spelling: the file would be deleted with the key, or with the context.
    let mut dests = vec![ctx.dir().join("values/elsewhere.wfx"), ctx.dir().join("new/dir/x.wfx")];
    dests.push(ctx.dir().join("values/../x.wfx"));
    dests.extend(info.path);
    for dest in dests {
        match ctx.export_data("k", &dest, true) {
            Err(Error::Io { path, key, .. }) => {
                assert_eq!(path, dest);
                assert_eq!(key.as_deref(), Some("k"));
            }
            other => panic!("{}: {other:?}", dest.display()),
        }
        assert_eq!(&*ctx.load_bytes("k").unwrap(), &[3u8; 200_000][..], "{}: the value stays", dest.display());
    }
    // Beside the context's directory is fine.
    let beside = b.path().join(format!("{}.wfx", ctx.run_id()));
    ctx.export_data("k", &beside, false).unwrap();
    assert_eq!(read_exported_bytes(&beside).unwrap(), vec![3u8; 200_000]);
}

#[test]
fn an_export_replaces_a_file_of_the_longest_name() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    // 255 bytes, the most a file name may have.
    let dest = b.path().join(format!("{}.wfx", "n".repeat(251)));
    ctx.save("a", &1u8).unwrap();
    ctx.export_data("a", &dest, false).unwrap();
    ctx.save("b", &2u8).unwrap();
    ctx.export_data("b", &dest, true).unwrap();
    assert_eq!(read_exported::<u8>(&dest).unwrap(), 2);
    assert_eq!(fs::read_dir(b.path()).unwrap().count(), 2, "the context's directory and the file, nothing more");
}

#[test]
fn export_accepts_relative_paths() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    ctx.save("v", &1u8).unwrap();
    let cwd = std::env::current_dir().unwrap();
    // Relative to the current directory, like any path.
    let rel = std::path::PathBuf::from(format!("target/wfctx-rel-{}/v.wfx", ctx.run_id()));
    ctx.export_data("v", &rel, false).unwrap();
    assert_eq!(read_exported::<u8>(cwd.join(&rel)).unwrap(), 1);
    fs::remove_dir_all(cwd.join(rel.parent().unwrap())).unwrap();
}

#[cfg(feature = "tier-mmap")]
#[test]
fn damaged_value_files_load_as_corrupt() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    for (key, len) in [("disk", 200_000), ("packed", 70_000)] {
        ctx.save_bytes(key, &vec![7u8; len], SaveOptions::new().use_ram(false)).unwrap();
        let path = ctx.storage_info(key).unwrap().unwrap().path.unwrap();
        let mut bytes = fs::read(&path).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 1;
        fs::write(&path, &bytes).unwrap();
        match ctx.load_bytes(key) {
            Err(Error::Corrupt { key: Some(k), what, .. }) => {
                assert_eq!(k, key);
                assert!(what.contains(".val"), "{what}");
            }
            other => panic!("{key}: {other:?}"),
        }
        // Truncated.
        fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(ctx.load_bytes(key), Err(Error::Corrupt { .. })), "{key}");
        // Overwriting a damaged value works and heals it.
        ctx.save_bytes(key, b"fresh", SaveOptions::new()).unwrap();
        assert_eq!(&*ctx.load_bytes(key).unwrap(), b"fresh");
    }
}

#[cfg(feature = "tier-redb")]
#[test]
fn damaged_values_in_the_database_load_as_corrupt() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    // Incompressible, so the database holds these very bytes.
    let value = context_core::testing::pattern(42, 1000);
    ctx.save_bytes("small", &value, SaveOptions::new().use_ram(false)).unwrap();
    let info = ctx.storage_info("small").unwrap().unwrap();
    assert_eq!(info.tier, "redb");
    let path = info.path.unwrap();
    let bytes = fs::read(&path).unwrap();
    let at = bytes.windows(64).position(|w| w == &value[100..164]).expect("the value is in the file");
    // Damage one byte in place, as a stray writer would.
    let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[bytes[at + 10] ^ 0x01], (at + 10) as u64).unwrap();
    // A process that has not cached the page reads the damage, and refuses it.
    let other = builder(b.path()).run_id(ctx.run_id()).open().unwrap();
    match other.load_bytes("small") {
        Err(Error::Corrupt { key: Some(k), .. }) => assert_eq!(k, "small"),
        other => panic!("{other:?}"),
    }
    ctx.save_bytes("small", b"fresh", SaveOptions::new().use_ram(false)).unwrap();
    assert_eq!(&*ctx.load_bytes("small").unwrap(), b"fresh");
}

#[cfg(feature = "tier-shm")]
#[test]
fn damaged_shared_memory_loads_as_corrupt() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    ctx.save_bytes("big", &[1u8; 100_000], SaveOptions::new()).unwrap();
    ctx.save_bytes("small", &[1u8; 100], SaveOptions::new()).unwrap();
    let seg = ctx.storage_info("big").unwrap().unwrap().shm_name.unwrap();
    let path = format!("/dev/shm{seg}");
    let mut bytes = fs::read(&path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    fs::write(&path, &bytes).unwrap();
    assert!(matches!(ctx.load_bytes("big"), Err(Error::Corrupt { .. })));
    assert_eq!(&*ctx.load_bytes("small").unwrap(), &[1u8; 100][..], "other values are untouched");
}

#[test]
fn shutdown_removes_everything_and_closes_every_handle() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    let run = ctx.run_id().to_owned();
    let other = builder(b.path()).run_id(&run).open().unwrap();
    ctx.save_bytes("ram", &[1u8; 100_000], SaveOptions::new()).unwrap();
    ctx.save_bytes("disk", &[1u8; 100_000], to_disk()).unwrap();
    ctx.save("small", &1u8).unwrap();
    other.shutdown().unwrap();
    other.shutdown().unwrap();
    assert!(!ctx.dir().exists());
    assert!(shm_segments(&run).is_empty(), "{:?}", shm_segments(&run));
    for r in [
        ctx.load::<u8>("small").map(|_| ()),
        ctx.save("x", &1).map(|_| ()),
        ctx.usage().map(|_| ()),
        other.list_keys().map(|_| ()),
    ] {
        assert!(matches!(r, Err(Error::Closed { ref run_id }) if *run_id == run), "{r:?}");
    }
    ctx.shutdown().unwrap();
    assert!(matches!(builder(b.path()).run_id(&run).open(), Err(Error::ContextNotFound { .. })));
}

#[test]
fn dropping_the_creator_cleans_up_and_dropping_an_opener_does_not() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    let run = ctx.run_id().to_owned();
    ctx.save_bytes("v", &[1u8; 100_000], SaveOptions::new()).unwrap();
    {
        let opener = WorkflowContext::builder().contexts_dir(b.path()).run_id(&run).open().unwrap();
        assert_eq!(opener.list_keys().unwrap(), vec!["v"]);
    }
    assert_eq!(&*ctx.load_bytes("v").unwrap(), &[1u8; 100_000][..]);
    let dir = ctx.dir().to_owned();
    drop(ctx);
    assert!(!dir.exists());
    assert!(shm_segments(&run).is_empty());
}

#[test]
fn creating_over_a_live_run_id_never_wipes_it() {
    let b = base();
    let ctx = builder(b.path()).run_id("shared-run").create().unwrap();
    ctx.save("keep", &"me").unwrap();
    match builder(b.path()).run_id("shared-run").create() {
        Err(Error::AlreadyExists { path, .. }) => assert_eq!(path, ctx.dir()),
        other => panic!("{other:?}"),
    }
    assert_eq!(ctx.load::<String>("keep").unwrap(), "me");
    assert!(fs::read_dir(b.path()).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().starts_with(".staging")));
}

#[test]
fn a_sweep_never_removes_a_context_being_created() {
    let b = base();
    let done = std::sync::atomic::AtomicBool::new(false);
    let failures = std::thread::scope(|s| {
        let creator = s.spawn(|| {
            let mut failures = Vec::new();
            for i in 0..100 {
                let made = builder(b.path()).run_id(run_id(&format!("being-made-{i}"))).collect_orphans(false).create();
                let checked = made.and_then(|ctx| {
                    ctx.save("k", &1u32)?;
                    ctx.load::<u32>("k")
                });
                if let Err(e) = checked {
                    failures.push(e.to_string());
                }
            }
            done.store(true, std::sync::atomic::Ordering::Release);
            failures
        });
        while !done.load(std::sync::atomic::Ordering::Acquire) {
            let report = workflow_context::collect_orphans(b.path()).unwrap();
            assert_eq!(report.contexts_removed, 0, "{report:?}");
        }
        creator.join().unwrap()
    });
    assert!(failures.is_empty(), "{} of 100 creates failed, the first with: {}", failures.len(), failures[0]);
}

#[test]
fn open_errors() {
    let b = base();
    assert!(
        matches!(builder(b.path()).run_id("absent").open(), Err(Error::ContextNotFound { run_id, .. }) if run_id == "absent")
    );
    assert!(matches!(builder(b.path()).open(), Err(Error::InvalidRunId { .. })));
    fs::create_dir(b.path().join("notactx")).unwrap();
    assert!(matches!(builder(b.path()).run_id("notactx").open(), Err(Error::ContextNotFound { .. })));
}

#[test]
fn files_and_directories_are_private() {
    let b = base();
    let ctx = builder(&b.path().join("contexts")).create().unwrap();
    ctx.save_bytes("disk", &[1u8; 70_000], to_disk()).unwrap();
    ctx.save_bytes("ram", &[1u8; 70_000], SaveOptions::new()).unwrap();
    assert_eq!(fs::metadata(b.path().join("contexts")).unwrap().permissions().mode() & 0o777, 0o700);
    for p in tree(ctx.dir()) {
        let m = fs::symlink_metadata(ctx.dir().join(&p)).unwrap();
        let want = if m.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(m.permissions().mode() & 0o777, want, "{}", p.display());
    }
    for s in shm_segments(ctx.run_id()) {
        assert_eq!(fs::metadata(format!("/dev/shm/{s}")).unwrap().permissions().mode() & 0o777, 0o600, "{s}");
    }
}

#[test]
fn an_unsafe_contexts_dir_is_refused() {
    let b = base();
    let open_dir = b.path().join("world-writable");
    fs::create_dir(&open_dir).unwrap();
    fs::set_permissions(&open_dir, fs::Permissions::from_mode(0o777)).unwrap();
    assert!(matches!(builder(&open_dir).create(), Err(Error::Io { .. })));
    let link = b.path().join("link");
    std::os::unix::fs::symlink(b.path(), &link).unwrap();
    assert!(matches!(builder(&link).create(), Err(Error::Io { .. })));
    // Opening a context there is refused too: a context found in a directory others may
    // write to, or through a link, may be anyone's.
    let planted = b.path().join("planted");
    fs::create_dir(&planted).unwrap();
    fs::set_permissions(&planted, fs::Permissions::from_mode(0o700)).unwrap();
    let ctx = builder(&planted).create().unwrap();
    ctx.save("k", "planted").unwrap();
    let link = b.path().join("link-to-planted");
    std::os::unix::fs::symlink(&planted, &link).unwrap();
    match builder(&link).run_id(ctx.run_id()).open() {
        Err(Error::Io { path, .. }) => assert_eq!(path, link),
        other => panic!("{other:?}"),
    }
    fs::set_permissions(&planted, fs::Permissions::from_mode(0o777)).unwrap();
    match builder(&planted).run_id(ctx.run_id()).open() {
        Err(Error::Io { path, source, .. }) => {
            assert_eq!(path, planted);
            assert!(source.to_string().contains("writable by group or others"), "{source}");
        }
        other => panic!("{other:?}"),
    }
    // A missing contexts directory holds no context.
    let missing = builder(&b.path().join("missing")).run_id(ctx.run_id()).open();
    assert!(matches!(missing, Err(Error::ContextNotFound { .. })), "{missing:?}");
    fs::set_permissions(&planted, fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(builder(&planted).run_id(ctx.run_id()).open().unwrap().load::<String>("k").unwrap(), "planted");
}

#[test]
fn config_file_sets_the_budget_and_builder_wins() {
    let b = base();
    let cfg = b.path().join("cfg.json");
    fs::write(&cfg, "{\n  // two gigabytes at most\n  \"MAX_RAM_GB\": 2, /* and */ \"MAX_RAM_PERCENT\": 100\n}")
        .unwrap();
    let ctx = builder(b.path()).config_path(&cfg).create().unwrap();
    let cap = ctx.usage().unwrap().ram_capacity_bytes;
    if cfg!(feature = "tier-shm") {
        assert_eq!(cap, 2 << 30);
    }
    let ctx2 = builder(b.path()).config_path(&cfg).max_ram_gb(0.5).create().unwrap();
    if cfg!(feature = "tier-shm") {
        assert_eq!(ctx2.usage().unwrap().ram_capacity_bytes, 1 << 29, "the builder wins over the file");
    }
    // An opener uses the context's budget, whatever its own configuration says.
    let opener = builder(b.path()).max_ram_bytes(1).run_id(ctx2.run_id()).open().unwrap();
    assert_eq!(opener.usage().unwrap().ram_capacity_bytes, ctx2.usage().unwrap().ram_capacity_bytes);

    fs::write(&cfg, r#"{"MAX_RAM_PERCENT": 150}"#).unwrap();
    match builder(b.path()).config_path(&cfg).create() {
        Err(Error::Config { source_name, key, .. }) => {
            assert_eq!(source_name, cfg.display().to_string());
            assert_eq!(key.as_deref(), Some("MAX_RAM_PERCENT"));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(builder(b.path()).config_path(b.path().join("missing.json")).create(), Err(Error::Config { .. })));
    assert!(matches!(builder(b.path()).max_ram_gb(-1.0).create(), Err(Error::Config { .. })));
    assert!(matches!(builder(b.path()).max_ram_gb(f64::NAN).create(), Err(Error::Config { .. })));
}

#[test]
fn contexts_dir_name_from_the_config_file() {
    let b = base();
    let cfg = b.path().join("cfg.json");
    let name = format!("wfctx-cfg-test-{}", run_id("d"));
    fs::write(&cfg, format!(r#"{{"CONTEXTS_DIR_NAME": "{name}"}}"#)).unwrap();
    let ctx = WorkflowContext::builder().config_path(&cfg).create().unwrap();
    assert_eq!(ctx.dir().parent().unwrap(), std::env::temp_dir().join(&name));
    let opener = WorkflowContext::builder().config_path(&cfg).run_id(ctx.run_id()).open().unwrap();
    drop(opener);
    drop(ctx);
    fs::remove_dir(std::env::temp_dir().join(&name)).unwrap();
}

#[test]
fn many_threads_lose_nothing() {
    let b = base();
    let ctx = builder(b.path()).max_ram_bytes(budget(4 << 20)).create().unwrap();
    let threads = 8;
    let per = 300;
    std::thread::scope(|s| {
        for t in 0..threads {
            let ctx = &ctx;
            s.spawn(move || {
                for i in 0..per {
                    let len = [10usize, 3000, 70_000, 300_000][i % 4];
                    ctx.save_bytes(&format!("t{t}-{i}"), &vec![(t * 31 + i) as u8; len], SaveOptions::new()).unwrap();
                    // Everyone also fights over a few shared keys.
                    ctx.save(&format!("shared-{}", i % 5), &(t, i)).unwrap();
                    if i % 7 == 0 {
                        assert!(ctx.remove(&format!("t{t}-{i}")).unwrap());
                    }
                }
            });
        }
    });
    let mut expect = 0;
    for t in 0..threads {
        for i in 0..per {
            let key = format!("t{t}-{i}");
            if i % 7 == 0 {
                assert!(!ctx.contains(&key).unwrap());
                continue;
            }
            expect += 1;
            let len = [10usize, 3000, 70_000, 300_000][i % 4];
            assert_eq!(&*ctx.load_bytes(&key).unwrap(), &vec![(t * 31 + i) as u8; len][..], "{key}");
        }
    }
    for k in 0..5 {
        let (_, i): (usize, usize) = ctx.load(&format!("shared-{k}")).unwrap();
        assert_eq!(i % 5, k);
    }
    let u = ctx.usage().unwrap();
    assert_eq!(u.stored_keys_count, expect + 5);
    assert!(u.ram_usage_bytes <= budget(4 << 20), "the budget held: {u:?}");
    for k in ctx.list_keys().unwrap() {
        ctx.remove(&k).unwrap();
    }
    let u = ctx.usage().unwrap();
    assert_eq!((u.ram_usage_bytes, u.temp_disk_usage_bytes), (0, 0), "nothing leaked");
}

#[test]
fn overwrites_are_atomic_for_readers() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    let sizes = [100usize, 5000, 200_000];
    for (k, len) in sizes.iter().enumerate() {
        ctx.save_bytes(&format!("k{k}"), &vec![0u8; *len], if k == 1 { to_disk() } else { SaveOptions::new() })
            .unwrap();
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (k, len) in sizes.iter().enumerate() {
                    let v = ctx.load_bytes(&format!("k{k}")).unwrap();
                    assert_eq!(v.len(), *len);
                    assert!(v.iter().all(|&x| x == v[0]), "a torn read of k{k}");
                    reads += 1;
                }
            }
            reads
        });
        for round in 1..=200u32 {
            for (k, len) in sizes.iter().enumerate() {
                let opts = if k == 1 { to_disk() } else { SaveOptions::new() };
                ctx.save_bytes(&format!("k{k}"), &vec![round as u8; *len], opts).unwrap();
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
    });
}

#[test]
fn index_survives_compaction() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    let other = builder(b.path()).run_id(ctx.run_id()).open().unwrap();
    // Enough overwrites to make the journal compact many times (about every 130).
    const SAVES: u32 = 6_000;
    for i in 0..SAVES {
        ctx.save(&format!("k{}", i % 50), &i).unwrap();
        if i % 1_500 == 0 {
            assert_eq!(other.load::<u32>(&format!("k{}", i % 50)).unwrap(), i);
        }
    }
    for k in 0..50u32 {
        let v: u32 = other.load(&format!("k{k}")).unwrap();
        assert_eq!(v % 50, k);
        assert!(v >= SAVES - 50);
    }
    let mut journals: Vec<_> = fs::read_dir(ctx.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("journal."))
        .collect();
    // The current generation, and the one before kept for the next compaction to reuse.
    assert_eq!(journals.len(), 2, "old journals are removed: {journals:?}");
    assert!(journals.contains(&"journal.spare".to_owned()), "{journals:?}");
    journals.retain(|j| j != "journal.spare");
    let generation: u32 = journals[0].strip_prefix("journal.").unwrap().parse().unwrap();
    assert!(generation >= 10, "the journal was compacted {generation} times");
    // Its room (allocated up front) stays at the smallest size: compaction keeps it short.
    assert!(fs::metadata(ctx.dir().join(&journals[0])).unwrap().len() <= 32 << 10, "the journal stays short");
    assert_eq!(other.usage().unwrap(), ctx.usage().unwrap());
}

#[test]
fn the_key_table_grows_under_readers() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    let other = builder(b.path()).run_id(ctx.run_id()).open().unwrap();
    let key = |i: u32| format!("steps/{i}/{}", "k".repeat((i % 40) as usize));
    for i in 0..6_000u32 {
        ctx.save(&key(i), &i).unwrap();
        if i % 3 == 0 {
            assert!(ctx.remove(&key(i)).unwrap());
        }
        if i % 500 == 0 {
            // The other handle follows the table to its new generations.
            assert_eq!(other.contains(&key(i)).unwrap(), i % 3 != 0);
        }
    }
    let tables: Vec<_> = fs::read_dir(ctx.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("table."))
        .collect();
    assert_eq!(tables.len(), 1, "old tables are removed: {tables:?}");
    assert_ne!(tables[0], "table.0", "the table grew");
    let late = builder(b.path()).run_id(ctx.run_id()).open().unwrap();
    for h in [&ctx, &other, &late] {
        assert_eq!(h.usage().unwrap().stored_keys_count, 4_000);
        assert_eq!(h.list_keys().unwrap().len(), 4_000);
        for i in (0..6_000u32).step_by(7) {
            assert_eq!(h.load::<u32>(&key(i)).ok(), (i % 3 != 0).then_some(i), "{}", key(i));
        }
    }
}

#[test]
fn a_missing_kind_of_tier_is_a_clear_error() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    let disk = ctx.save_bytes("d", b"x", SaveOptions::new().use_ram(false));
    if cfg!(any(feature = "tier-mmap", feature = "tier-redb")) {
        disk.unwrap();
    } else {
        assert!(matches!(disk, Err(Error::NoTier { kind: StorageKind::Disk, .. })), "{disk:?}");
    }
    let ram = ctx.save_bytes("r", b"x", SaveOptions::new().ram_only(true));
    if cfg!(feature = "tier-shm") {
        ram.unwrap();
    } else {
        assert!(matches!(ram, Err(Error::NoTier { kind: StorageKind::Ram, .. })), "{ram:?}");
        let u = ctx.usage().unwrap();
        assert_eq!((u.ram_capacity_bytes, u.ram_usage_bytes), (0, 0), "a build without RAM says so");
    }
    // A default save always finds a home.
    ctx.save("any", &vec![1u8; 100_000]).unwrap();
    assert_eq!(ctx.load::<Vec<u8>>("any").unwrap(), vec![1u8; 100_000]);
}

#[test]
fn a_save_cut_off_by_a_shutdown_leaves_a_new_context_of_its_run_id_alone() {
    // A large value is written outside the index lock. The context is shut down meanwhile,
    // and a new one of the same run id made (a run started again): the save ends `Closed`,
    // and takes back nothing of the new context's, whose object ids start at 1 again.
    let b = base();
    for (what, opts) in [("disk", to_disk()), ("RAM", SaveOptions::new())] {
        let owner = builder(b.path()).create().unwrap();
        let run = owner.run_id().to_owned();
        let other = builder(b.path()).run_id(&run).open().unwrap();
        let (value, paused, resume) = PausesWhileWritten::new(1 << 20);
        std::thread::scope(|s| {
            let other = &other;
            let saver = s.spawn(move || other.save_with("late", &value, opts));
            paused.recv().unwrap();
            drop(owner);
            let again = builder(b.path()).run_id(&run).create().unwrap();
            for i in 0..4u8 {
                again.save_bytes(&format!("v{i}"), &[i; 100_000], opts).unwrap();
            }
            resume.send(()).unwrap();
            let saved = saver.join().unwrap();
            assert!(matches!(saved, Err(Error::Closed { .. })), "{what}: {saved:?}");
            for i in 0..4u8 {
                let loaded = again.load_bytes(&format!("v{i}")).map(|v| v.to_vec());
                assert_eq!(loaded.ok(), Some(vec![i; 100_000]), "{what}: v{i} of the new context");
            }
            let u = again.usage().unwrap();
            let held: u64 = (0..4).map(|i| again.storage_info(&format!("v{i}")).unwrap().unwrap().size).sum();
            assert_eq!(u.ram_usage_bytes + u.temp_disk_usage_bytes, held, "{what}");
            let segments = common::large_segments(&run);
            // One segment for each of the new context's values in RAM, and none else.
            let in_ram = (0..4)
                .filter(|i| again.storage_info(&format!("v{i}")).unwrap().unwrap().storage_type == StorageKind::Ram)
                .count();
            assert_eq!(segments.len(), in_ram, "{what}: {segments:?}");
        });
    }
}

#[test]
fn an_export_that_a_shutdown_cuts_off_says_its_file_is_there() {
    // The exported file is written outside the index lock. A shutdown meanwhile leaves it
    // in place: the export answers `Ok`, as if it had come first (it answered `Closed`,
    // though the file was there).
    let b = base();
    for round in 0..4 {
        for (what, opts) in [("RAM", SaveOptions::new()), ("disk", to_disk())] {
            let owner = builder(b.path()).max_ram_bytes(64 << 20).create().unwrap();
            let other = builder(b.path()).run_id(owner.run_id()).open().unwrap();
            let big = context_core::testing::pattern(round, 16 << 20);
            owner.save_bytes("big", &big, opts).unwrap();
            // In a directory of its own, which the export makes once it has read the value.
            let dest = b.path().join(format!("out-{what}-{round}/big.wfx"));
            let exported = std::thread::scope(|s| {
                let exporter = s.spawn(|| other.export_data("big", &dest, false));
                while !dest.parent().unwrap().exists() && !exporter.is_finished() {
                    std::thread::yield_now();
                }
                owner.shutdown().unwrap();
                exporter.join().unwrap()
            });
            match exported {
                Ok(()) => assert_eq!(read_exported_bytes(&dest).unwrap(), big, "{what} {round}"),
                Err(e) => panic!("{what} {round}: {e:?}; the file is there: {}", dest.exists()),
            }
        }
    }
}

/// `rounds` times: a context whose owner shuts it down while `openers` threads attach to it
/// in a loop. Each round gives what the shutdown answered, the error each opener's loop
/// ended with, and what was left in the contexts directory.
fn shut_down_as_handles_attach(
    openers: usize,
    rounds: usize,
) -> Vec<(workflow_context::Result<()>, Vec<Error>, Vec<std::path::PathBuf>)> {
    let b = base();
    (0..rounds)
        .map(|_| {
            let owner = builder(b.path()).create().unwrap();
            let run = owner.run_id().to_owned();
            let started = std::sync::Barrier::new(openers + 1);
            let (shut, ends) = std::thread::scope(|s| {
                let looping: Vec<_> = (0..openers)
                    .map(|_| {
                        s.spawn(|| {
                            started.wait();
                            loop {
                                if let Err(e) = builder(b.path()).run_id(&run).open() {
                                    break e;
                                }
                            }
                        })
                    })
                    .collect();
                started.wait();
                // Some opens succeed first (a head start, not a timing assertion).
                std::thread::sleep(std::time::Duration::from_millis(2));
                let shut = owner.shutdown();
                (shut, looping.into_iter().map(|o| o.join().unwrap()).collect())
            });
            let left = tree(b.path());
            // What a round left must not disturb the next one.
            for entry in fs::read_dir(b.path()).unwrap() {
                let _ = fs::remove_dir_all(entry.unwrap().path());
            }
            (shut, ends, left)
        })
        .collect()
}

#[test]
fn opening_a_context_as_it_is_shut_down_is_closed_not_an_io_error() {
    // Each open answers with a handle, `Closed` or `ContextNotFound`, never an error about a
    // file of the context that went meanwhile ("create value directory ...: No such file or
    // directory", "open redb database ..."), as about one round in four did.
    for (round, (_, ends, _)) in shut_down_as_handles_attach(3, 100).into_iter().enumerate() {
        for e in ends {
            assert!(matches!(e, Error::Closed { .. } | Error::ContextNotFound { .. }), "round {round}: {e:?}");
        }
    }
}

#[test]
fn a_shutdown_as_handles_attach_removes_the_whole_directory() {
    // A handle attaching may create its liveness file in the directory the shutdown is
    // removing. The shutdown still succeeds and leaves nothing (it failed with "remove
    // context directory: Directory not empty", leaving `.removing-<run id>-...` behind for
    // a sweep, in about one round in twenty).
    for (round, (shut, _, left)) in shut_down_as_handles_attach(8, 150).into_iter().enumerate() {
        assert!(shut.is_ok(), "round {round}: {shut:?}");
        assert!(left.is_empty(), "round {round}: {left:?}");
    }
}
