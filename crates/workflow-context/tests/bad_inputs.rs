//! Bad inputs not covered elsewhere: planted files and links, damaged context files,
//! unsafe directories, odd configuration files. Each is a clear error that loses nothing
//! and touches nothing outside the context. `docs/bad-inputs.md` lists them all.

mod common;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};

use common::{base, builder};
use workflow_context::{Error, SaveOptions, WorkflowContext};

#[test]
fn a_symlink_planted_where_the_context_dir_will_be_is_not_followed() {
    let b = base();
    let target = b.path().join("elsewhere");
    fs::create_dir(&target).unwrap();
    let contexts = b.path().join("contexts");
    fs::create_dir(&contexts).unwrap();
    fs::set_permissions(&contexts, fs::Permissions::from_mode(0o700)).unwrap();
    symlink(&target, contexts.join("victim")).unwrap();
    // Creating over it: the link is not a context, so creation refuses rather than follow it.
    let err = builder(&contexts).run_id("victim").collect_orphans(false).create().unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. } | Error::Io { .. }), "{err}");
    assert!(fs::read_dir(&target).unwrap().next().is_none(), "nothing was written through the link");
    // Opening through it is refused too.
    assert!(builder(&contexts).run_id("victim").open().is_err());
    assert!(fs::read_dir(&target).unwrap().next().is_none());
    assert!(fs::symlink_metadata(contexts.join("victim")).unwrap().file_type().is_symlink(), "the link is left alone");
}

#[test]
fn a_symlink_planted_where_a_value_file_will_be_is_not_followed() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    let outside = b.path().join("outside.txt");
    fs::write(&outside, b"precious").unwrap();
    // The next object ids are small numbers: plant links at the first few value paths.
    for id in 1..64u64 {
        let _ = symlink(&outside, ctx.dir().join("values").join(format!("{id:016x}.val")));
    }
    for i in 0..5 {
        // Each save either lands elsewhere or fails cleanly; none writes through a link.
        let _ = ctx.save_bytes(&format!("k{i}"), &vec![1u8; 100_000], SaveOptions::new().use_ram(false));
    }
    assert_eq!(fs::read(&outside).unwrap(), b"precious");
}

#[test]
fn a_symlink_planted_as_the_liveness_directory_is_not_followed() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    ctx.save("k", "v").unwrap();
    // A directory outside the context, with a file as old as a dead handle's liveness file.
    let outside = b.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("precious"), b"mine").unwrap();
    let two_minutes_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(120);
    fs::File::options().write(true).open(outside.join("precious")).unwrap().set_modified(two_minutes_ago).unwrap();
    // The context's liveness directory replaced by a link to it.
    let procs = ctx.dir().join("procs");
    fs::rename(&procs, ctx.dir().join("procs-moved")).unwrap();
    symlink(&outside, &procs).unwrap();
    let opened = builder(b.path()).run_id(ctx.run_id()).open();
    let report = workflow_context::collect_orphans(b.path()).unwrap();
    let listed: Vec<_> = fs::read_dir(&outside).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(listed, vec!["precious"], "nothing made or removed through the link; open gave {opened:?}");
    assert_eq!(fs::read(outside.join("precious")).unwrap(), b"mine");
    match opened {
        Err(Error::Io { path, .. }) => assert_eq!(path, procs),
        other => panic!("{other:?}"),
    }
    // A context whose liveness cannot be told is left alone, and reported.
    assert_eq!((report.contexts_removed, report.failed.len()), (0, 1), "{report:?}");
    assert_eq!(report.failed[0].path, ctx.dir());
    assert!(fs::symlink_metadata(&procs).unwrap().file_type().is_symlink(), "the link is left alone");
    fs::remove_file(&procs).unwrap();
    fs::rename(ctx.dir().join("procs-moved"), &procs).unwrap();
    assert_eq!(ctx.load::<String>("k").unwrap(), "v");
}

#[test]
fn a_contexts_dir_owned_by_another_user_is_refused() {
    let b = base();
    let dir = b.path().join("theirs");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    // As root, hand the directory to "nobody"; elsewhere this check cannot be staged.
    if rustix::process::geteuid().is_root() {
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        match builder(&dir).create() {
            Err(Error::Io { path, source, .. }) => {
                assert_eq!(path, dir);
                assert!(source.to_string().contains("another user"), "{source}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(workflow_context::collect_orphans(&dir), Err(Error::Io { .. })));
        // Nor is a context found there attached to.
        std::os::unix::fs::chown(&dir, Some(0), Some(0)).unwrap();
        let ctx = builder(&dir).create().unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        match builder(&dir).run_id(ctx.run_id()).open() {
            Err(Error::Io { path, source, .. }) => {
                assert_eq!(path, dir);
                assert!(source.to_string().contains("another user"), "{source}");
            }
            other => panic!("{other:?}"),
        }
        std::os::unix::fs::chown(&dir, Some(0), Some(0)).unwrap();
        drop(ctx);
    } else {
        println!("SKIPPED: not root, cannot give a directory to another user");
    }
}

#[test]
fn a_contexts_path_that_is_a_file_is_refused() {
    let b = base();
    let file = b.path().join("file");
    fs::write(&file, b"x").unwrap();
    assert!(matches!(builder(&file).create(), Err(Error::Io { .. })));
    assert_eq!(fs::read(&file).unwrap(), b"x");
}

#[test]
fn damaged_context_files_are_corrupt_on_open_and_change_nothing() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    ctx.save("k", "v").unwrap();
    let meta = ctx.dir().join("meta");
    let journal = ctx.dir().join("journal.0");
    let good_meta = fs::read(&meta).unwrap();
    let good_journal = fs::read(&journal).unwrap();
    let open = || builder(b.path()).run_id(ctx.run_id()).open();

    // A meta file with a foreign magic, a wrong size, or truncated to nothing.
    for bad in [b"not a meta file at all".to_vec(), vec![0u8; 4096], good_meta[..100].to_vec()] {
        fs::write(&meta, &bad).unwrap();
        assert!(matches!(open(), Err(Error::Corrupt { .. })), "meta of {} bytes", bad.len());
    }
    fs::write(&meta, &good_meta).unwrap();

    // A journal damaged in its committed part (the first record's body, after its 8-byte
    // frame header): refused, naming the journal. (The file is longer than the committed
    // records: its room for appends is allocated up front.)
    let mut flipped = good_journal.clone();
    flipped[12] ^= 0xff;
    fs::write(&journal, &flipped).unwrap();
    match open() {
        Err(Error::Corrupt { what, .. }) => assert!(what.contains("journal"), "{what}"),
        other => panic!("{other:?}"),
    }
    // Truncated below its committed length: damage too, not a failed system call.
    fs::write(&journal, &good_journal[..10]).unwrap();
    match open() {
        Err(Error::Corrupt { what, .. }) => assert!(what.contains("journal"), "{what}"),
        other => panic!("a truncated journal: {other:?}"),
    }
    // Restored, everything is as it was.
    fs::write(&journal, &good_journal).unwrap();
    assert_eq!(open().unwrap().load::<String>("k").unwrap(), "v");

    // The key table: a foreign file, a wrong size, a header that lies about its geometry,
    // a slot pointing outside the table: refused or an error, naming the table; never a panic.
    let table = ctx.dir().join("table.0");
    let good_table = fs::read(&table).unwrap();
    let mut lying = good_table.clone();
    lying[16] ^= 0x40; // the slot count
    let mut far_slot = good_table.clone();
    for w in far_slot[4096..].chunks_mut(8).take(256) {
        if w.iter().any(|&x| x != 0) {
            // The same hash tag, an offset past the end.
            w[..6].fill(0xff);
        }
    }
    let mut lying_heap_end = good_table.clone();
    lying_heap_end[32] ^= 0x04; // the heap's end, off its 8-byte alignment
    for (what, bad) in [
        ("foreign", b"not a table".repeat(500)),
        ("truncated", good_table[..good_table.len() - 8].to_vec()),
        ("lying geometry", lying),
        ("lying heap end", lying_heap_end),
        ("slot out of bounds", far_slot),
    ] {
        fs::write(&table, &bad).unwrap();
        let result = open().and_then(|h| h.load::<String>("k"));
        match result {
            Err(Error::Corrupt { what: w, .. }) => assert!(w.contains("table"), "{what}: {w}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    fs::write(&table, &good_table).unwrap();
    assert_eq!(open().unwrap().load::<String>("k").unwrap(), "v");

    // The same lie told to a handle that has the table mapped already: a new key, which
    // needs the heap, is refused as corrupt before anything is committed, again and again;
    // never a panic. An overwrite, which does not, still works.
    let file = fs::OpenOptions::new().write(true).open(&table).unwrap();
    let end = u64::from_le_bytes(good_table[32..40].try_into().unwrap());
    std::os::unix::fs::FileExt::write_all_at(&file, &(end + 4).to_le_bytes(), 32).unwrap();
    for _ in 0..2 {
        match ctx.save("new", "w") {
            Err(Error::Corrupt { what, .. }) => assert!(what.contains("table"), "{what}"),
            other => panic!("{other:?}"),
        }
    }
    ctx.save("k", "v2").unwrap();
    assert_eq!(ctx.load::<String>("k").unwrap(), "v2");
    // Told the truth again, the table takes new keys.
    std::os::unix::fs::FileExt::write_all_at(&file, &end.to_le_bytes(), 32).unwrap();
    ctx.save("new", "w").unwrap();
    assert_eq!(open().unwrap().load::<String>("new").unwrap(), "w");
    assert_eq!(ctx.usage().unwrap().stored_keys_count, 2);
}

#[test]
fn a_key_table_whose_applied_position_lies_is_repaired_from_the_journal() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    for i in 0..20u32 {
        ctx.save(&format!("k{i}"), &i).unwrap();
    }
    assert!(ctx.remove("k19").unwrap());
    // The header word (at byte 40 of the table) that says how far into the journal the
    // table reflects, with one bit flipped: mostly a position inside a record.
    let table = fs::OpenOptions::new().read(true).write(true).open(ctx.dir().join("table.0")).unwrap();
    let mut word = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(&table, &mut word, 40).unwrap();
    for bit in 0..12 {
        let lie = u64::from_le_bytes(word) ^ (1 << bit);
        std::os::unix::fs::FileExt::write_all_at(&table, &lie.to_le_bytes(), 40).unwrap();
        // The next writer, finding the table behind the journal (as after a writer that
        // died before applying its change), repairs it; the journal is whole.
        let other = builder(b.path()).run_id(ctx.run_id()).open().unwrap();
        for (who, h) in [("this handle", &ctx), ("another", &other)] {
            if let Err(e) = h.save("k0", &bit) {
                panic!("bit {bit}: a save through {who}: {e}");
            }
        }
        for i in 1..19u32 {
            assert_eq!(other.load::<u32>(&format!("k{i}")).unwrap(), i, "bit {bit}");
        }
        assert!(!other.contains("k19").unwrap(), "bit {bit}: a removed key came back");
        assert_eq!(other.usage().unwrap().stored_keys_count, 19, "bit {bit}");
        std::os::unix::fs::FileExt::read_exact_at(&table, &mut word, 40).unwrap();
    }
}

/// The one file in `dir` whose name starts with `prefix` (`journal.spare` aside).
fn generation_file(dir: &std::path::Path, prefix: &str) -> String {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(prefix) && n != "journal.spare")
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    names.pop().unwrap()
}

#[test]
fn a_missing_journal_or_key_table_generation_is_corrupt_naming_it() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    ctx.save("k", "v").unwrap();
    let attached = builder(b.path()).run_id(ctx.run_id()).open().unwrap();
    let open = || builder(b.path()).run_id(ctx.run_id()).open();
    for prefix in ["journal.", "table."] {
        // Enough new keys for the journal to compact and the key table to grow past the
        // generations `attached` maps.
        let key = |i: u32| format!("{prefix}{i}");
        for i in 0..1_000u32 {
            ctx.save(&key(i), &i).unwrap();
        }
        let name = generation_file(ctx.dir(), prefix);
        assert!(!name.ends_with(".0"), "{name}: the index moved on");
        let (path, aside) = (ctx.dir().join(&name), b.path().join("aside"));
        fs::rename(&path, &aside).unwrap();
        // Opening, and a handle that follows the index to the generation the meta page
        // names (the table at a load, the journal at a save).
        let followed =
            if prefix == "table." { attached.load::<String>("k").err() } else { attached.save("k", "w").err() };
        for (how, err) in [("open", open().err()), ("follow", followed)] {
            match err {
                Some(Error::Corrupt { what, detail, .. }) => {
                    assert!(what.ends_with(&name), "{how} without {name}: names {what}: {detail}");
                    assert!(detail.contains("missing"), "{how} without {name}: {detail}");
                }
                other => panic!("{how} without {name}: {other:?}"),
            }
        }
        fs::rename(&aside, &path).unwrap();
        assert_eq!(open().unwrap().load::<u32>(&key(999)).unwrap(), 999);
        assert_eq!(attached.load::<u32>(&key(999)).unwrap(), 999);
    }
    attached.save("k", "w").unwrap();
    assert_eq!(ctx.load::<String>("k").unwrap(), "w");
}

#[test]
fn foreign_files_planted_in_the_context_dir_are_ignored() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    ctx.save("k", "v").unwrap();
    fs::write(ctx.dir().join("values").join("00000000000abcde.val"), b"planted").unwrap();
    fs::write(ctx.dir().join("notes.txt"), b"planted").unwrap();
    fs::write(ctx.dir().join("procs").join("ffffffffffffffff"), b"").unwrap();
    assert_eq!(ctx.list_keys().unwrap(), vec!["k"], "a planted value file is no key");
    let opened = builder(b.path()).run_id(ctx.run_id()).open().unwrap();
    assert_eq!(opened.load::<String>("k").unwrap(), "v");
    drop(opened);
    let dir = ctx.dir().to_owned();
    drop(ctx);
    assert!(!dir.exists(), "shutdown removes the planted files with the context");
}

#[test]
fn odd_configuration_files_are_config_errors() {
    let b = base();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a directory", Vec::new()),
        ("not UTF-8", vec![0xff, 0xfe, b'{', b'}']),
        ("over 1 MiB", format!("{{\"MAX_RAM_GB\": 1{}}}", " ".repeat(1 << 20)).into_bytes()),
        ("a JSON string", b"\"MAX_RAM_GB\"".to_vec()),
        ("null", b"null".to_vec()),
        ("a nested object", br#"{"MAX_RAM_GB": {"value": 1}}"#.to_vec()),
        ("an unterminated comment", b"{ /* forever }".to_vec()),
    ];
    for (what, bytes) in cases {
        let path = b.path().join("cfg");
        let _ = fs::remove_dir_all(&path);
        let _ = fs::remove_file(&path);
        if what == "a directory" {
            fs::create_dir(&path).unwrap();
        } else {
            fs::write(&path, &bytes).unwrap();
        }
        match builder(b.path()).config_path(&path).create() {
            Err(Error::Config { source_name, .. }) => assert_eq!(source_name, path.display().to_string(), "{what}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    let left: Vec<_> = fs::read_dir(b.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec!["cfg"], "a refused configuration creates nothing");
}

#[test]
fn a_zero_ram_budget_sends_everything_to_disk() {
    let b = base();
    let ctx = builder(b.path()).max_ram_bytes(0).create().unwrap();
    let saved = ctx.save("k", "v");
    if cfg!(any(feature = "tier-mmap", feature = "tier-redb")) {
        saved.unwrap();
        assert_eq!(ctx.usage().unwrap().ram_usage_bytes, 0);
    } else {
        assert!(matches!(saved, Err(Error::OutOfRam { .. })));
    }
    assert!(matches!(
        ctx.save_with("r", &1u8, SaveOptions::new().ram_only(true)),
        Err(Error::OutOfRam { .. } | Error::NoTier { .. })
    ));
}

#[test]
fn keys_and_values_at_the_edges() {
    let b = base();
    let ctx = WorkflowContext::builder().contexts_dir(b.path()).create().unwrap();
    // Control characters, a lone NUL, right-to-left marks, and a key of exactly 4096 bytes.
    let long = "é".repeat(2048);
    for key in ["\u{202e}evil", "\n\t\r", "\0", "a\0b", long.as_str()] {
        ctx.save(key, &key.len()).unwrap();
        assert_eq!(ctx.load::<usize>(key).unwrap(), key.len());
    }
    // An empty value, and load of it.
    ctx.save_bytes("empty", &[], SaveOptions::new()).unwrap();
    assert!(ctx.load_bytes("empty").unwrap().is_empty());
    // Loading raw bytes as a typed value of the wrong shape is a codec error.
    ctx.save_bytes("raw", &[0xff; 3], SaveOptions::new()).unwrap();
    assert!(matches!(ctx.load::<String>("raw"), Err(Error::Codec { .. })));
}

#[test]
fn an_unknown_configuration_key_is_refused_even_when_its_value_is_null() {
    // docs/bad-inputs.md #15: "Config with an unknown key -> Config naming the key and
    // listing the valid ones". A misspelt key set to null must not pass unnoticed.
    let b = base();
    let path = b.path().join("cfg.json");
    fs::write(&path, r#"{"MAX_RAM_GB": 1, "MAX_RAM_PRECENT": null}"#).unwrap();
    match builder(b.path()).config_path(&path).collect_orphans(false).create() {
        Err(Error::Config { source_name, key, message }) => {
            assert_eq!(source_name, path.display().to_string());
            assert_eq!(key.as_deref(), Some("MAX_RAM_PRECENT"), "{message}");
            assert!(message.contains("MAX_RAM_PERCENT"), "lists the valid keys: {message}");
        }
        other => panic!("an unknown key was accepted: {other:?}"),
    }
}

#[test]
fn raw_bytes_never_load_as_a_typed_value() {
    // docs/bad-inputs.md #36: "`load::<String>` of raw bytes -> `Codec` naming the key; the
    // value kept". Raw bytes that happen to be a valid postcard encoding must not decode.
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    ctx.save_bytes("raw", b"\x02hi", SaveOptions::new()).unwrap();
    match ctx.load::<String>("raw") {
        Err(Error::Codec { key, .. }) => assert_eq!(key, "raw"),
        other => panic!("raw bytes loaded as a String: {other:?}"),
    }
    ctx.save_bytes("zero", &[0], SaveOptions::new()).unwrap();
    match ctx.load::<Vec<u8>>("zero") {
        Err(Error::Codec { key, .. }) => assert_eq!(key, "zero"),
        other => panic!("the byte [0] loaded as a Vec<u8>: {other:?}"),
    }
    assert_eq!(&*ctx.load_bytes("raw").unwrap(), b"\x02hi", "the value is kept");
    // The export file records the same flag: reading it back typed is refused too.
    let dest = b.path().join("raw.wfx");
    ctx.export_data("raw", &dest, false).unwrap();
    match workflow_context::read_exported::<String>(&dest) {
        Err(Error::Codec { key, .. }) => assert_eq!(key, "raw"),
        other => panic!("an export of raw bytes read as a String: {other:?}"),
    }
    assert_eq!(workflow_context::read_exported_bytes(&dest).unwrap(), b"\x02hi");
}

#[test]
fn after_shutdown_every_call_is_closed_whatever_its_arguments() {
    // WorkflowContext::shutdown: "afterwards every call on any handle returns Error::Closed".
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    let other = builder(b.path()).run_id(ctx.run_id()).open().unwrap();
    ctx.shutdown().unwrap();
    for h in [&ctx, &other] {
        let r = h.load::<u8>("");
        assert!(matches!(r, Err(Error::Closed { .. })), "load(\"\"): {r:?}");
        let r = h.contains("");
        assert!(matches!(r, Err(Error::Closed { .. })), "contains(\"\"): {r:?}");
        let r = h.save_with("k", &1u8, SaveOptions::new().use_ram(false).ram_only(true));
        assert!(matches!(r, Err(Error::Closed { .. })), "save_with(contradictory options): {r:?}");
    }
}
