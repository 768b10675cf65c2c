//! The crash harness: writer processes are SIGKILLed at random moments of save, overwrite,
//! remove and export loops; after each kill a fresh opener must find every key whose save
//! returned with its whole value, no torn value, an index and usage that agree with what
//! the tiers hold, and, once everything is collected, nothing left behind.
//!
//! `WFCTX_CRASH_KILLS` sets the number of kills (default 30, as CI runs it);
//! `cargo xtask crash --kills N` runs the long version.

#![cfg(feature = "testing")]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{base, builder, run_id, shm_segments};
use workflow_context::{SaveOptions, WorkflowContext};

const ENTRY: &str = "child_main";
const KEYS: u64 = 8;
const SIZES: [usize; 5] = [100, 3000, 70_000, 300_000, 2 << 20];
/// Ops numbered from here save small values only (a save writes those under the index lock,
/// noting its object in flight until its commit). Every other round starts here, so that
/// some kills land in the middle of such saves: in the other rounds, the large saves take
/// most of the time.
const SMALL_ONLY: u64 = 1 << 40;
const SMALL_SIZES: [usize; 3] = [50, 100, 3000];

/// What op `i` does: (key, action).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Save(usize),
    Remove,
    Export,
}

fn op(i: u64) -> (String, Action) {
    let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33;
    let key = format!("key-{}", x % KEYS);
    let action = match x % 10 {
        0..=5 if i >= SMALL_ONLY => Action::Save(SMALL_SIZES[((x / 10) % SMALL_SIZES.len() as u64) as usize]),
        0..=5 => Action::Save(SIZES[((x / 10) % SIZES.len() as u64) as usize]),
        6 | 7 => Action::Remove,
        _ => Action::Export,
    };
    (key, action)
}

/// The value op `i` saves: its number, then bytes derived from it.
fn value(i: u64, len: usize) -> Vec<u8> {
    let mut v = context_core::testing::pattern(i, len.max(8));
    v[..8].copy_from_slice(&i.to_le_bytes());
    v.truncate(len.max(8));
    v
}

/// Appends `<word> <i> .` to the writer's log in one write. A kill can still cut that write
/// short (where the line crosses a page of the file, the kernel stops between the pages), so
/// the closing `.` is what says the line is whole: "done 1099556" cut from
/// "done 1099556631135" must not read as op 1,099,556.
fn log_line(log: &mut std::fs::File, word: &str, i: u64) {
    log.write_all(format!("{word} {i} .\n").as_bytes()).unwrap();
}

/// Reads a whole line of the writer's log: its word and op number; `None` for a torn one.
fn parse_log_line(line: &str) -> Option<(&str, u64)> {
    let (word, rest) = line.strip_suffix(" .")?.split_once(' ')?;
    Some((word, rest.parse().ok()?))
}

fn which(v: &[u8]) -> u64 {
    u64::from_le_bytes(v[..8].try_into().unwrap())
}

#[test]
#[ignore = "runs only as a child process started by the crash harness"]
fn child_main() {
    let Ok(role) = std::env::var("WFCTX_CHILD_ROLE") else { return };
    let base = std::env::var("WFCTX_BASE").unwrap();
    let run = std::env::var("WFCTX_RUN").unwrap();
    match role.as_str() {
        "writer" => {
            let ctx = WorkflowContext::builder().contexts_dir(&base).run_id(&run).open().unwrap();
            let first: u64 = std::env::var("WFCTX_FIRST_OP").unwrap().parse().unwrap();
            let exports = Path::new(&base).join("exports");
            let mut log = std::fs::OpenOptions::new().append(true).open(std::env::var("WFCTX_LOG").unwrap()).unwrap();
            println!("READY");
            for i in first.. {
                let (key, action) = op(i);
                log_line(&mut log, "start", i);
                let ok = match action {
                    Action::Save(len) => ctx.save_bytes(&key, &value(i, len), SaveOptions::new()).is_ok(),
                    Action::Remove => ctx.remove(&key).is_ok(),
                    Action::Export => match ctx.export_data(&key, exports.join(format!("e{i}.wfx")), false) {
                        Ok(()) => true,
                        Err(workflow_context::Error::KeyNotFound { .. }) => true,
                        Err(e) => panic!("export {i}: {e}"),
                    },
                };
                assert!(ok, "op {i} failed");
                log_line(&mut log, "done", i);
            }
        }
        "owner" => {
            let ctx = WorkflowContext::builder().contexts_dir(&base).run_id(&run).create().unwrap();
            ctx.save_bytes("ram", &value(1, 300_000), SaveOptions::new()).unwrap();
            ctx.save_bytes("disk", &value(2, 300_000), SaveOptions::new().use_ram(false)).unwrap();
            ctx.save_bytes("small", &value(3, 100), SaveOptions::new().use_ram(false)).unwrap();
            println!("READY");
            std::thread::sleep(Duration::from_secs(60));
        }
        other => panic!("unknown role {other}"),
    }
}

/// Counts the harness prints.
#[derive(Debug, Default)]
struct Counts {
    kills: u64,
    ops_done: u64,
    killed_during: BTreeMap<&'static str, u64>,
    in_flight_applied: u64,
    values_checked: u64,
    exports_checked: u64,
}

/// A seeded xorshift, for kill delays.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn writers_killed_at_random_moments_lose_nothing_committed() {
    let kills: u64 = std::env::var("WFCTX_CRASH_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    let b = base();
    std::fs::create_dir(b.path().join("exports")).unwrap();
    let ctx = builder(b.path()).max_ram_bytes(4 << 20).create().unwrap();
    let run = ctx.run_id().to_owned();
    let log_path = b.path().join("ops.log");
    std::fs::write(&log_path, b"").unwrap();
    let exe = std::env::current_exe().unwrap();
    // What each key holds: the op whose value it is, or None.
    let mut model: HashMap<String, Option<u64>> = (0..KEYS).map(|k| (format!("key-{k}"), None)).collect();
    let mut counts = Counts::default();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    for round in 0..kills {
        let first = if round % 2 == 1 { SMALL_ONLY } else { 1 } + round * 1_000_000;
        std::fs::write(&log_path, b"").unwrap();
        let mut child = Command::new(&exe)
            .args(["--exact", ENTRY, "--ignored", "--nocapture", "--test-threads=1"])
            .env("WFCTX_CHILD_ROLE", "writer")
            .env("WFCTX_BASE", b.path())
            .env("WFCTX_RUN", &run)
            .env("WFCTX_FIRST_OP", first.to_string())
            .env("WFCTX_LOG", &log_path)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert!(lines.any(|l| l.unwrap().contains("READY")));
        std::thread::sleep(Duration::from_micros(2_000 + next(&mut rng) % 60_000));
        child.kill().unwrap();
        child.wait().unwrap();
        counts.kills += 1;

        // What the writer said it did.
        let log = std::fs::read_to_string(&log_path).unwrap();
        let mut done = Vec::new();
        let mut started = None;
        for line in log.lines() {
            // A line torn by the kill parses as nothing: a torn "start" was written before
            // its op began, a torn "done" after its op returned (the op counts as in flight).
            match parse_log_line(line) {
                Some(("start", i)) => started = Some(i),
                Some(("done", i)) => done.push(i),
                _ => {}
            }
        }
        let in_flight = started.filter(|s| !done.contains(s));
        counts.ops_done += done.len() as u64;
        let mut exported: Vec<(u64, u64)> = Vec::new(); // (export op, value op)
        for &i in &done {
            let (key, action) = op(i);
            match action {
                Action::Save(_) => *model.get_mut(&key).unwrap() = Some(i),
                Action::Remove => *model.get_mut(&key).unwrap() = None,
                Action::Export => {
                    if let Some(v) = model.get_mut(&key).unwrap().take() {
                        exported.push((i, v));
                    }
                }
            }
        }
        if let Some(i) = in_flight {
            let kind = match op(i).1 {
                Action::Save(_) if i >= SMALL_ONLY => "small save or overwrite",
                Action::Save(_) => "save or overwrite",
                Action::Remove => "remove",
                Action::Export => "export",
            };
            *counts.killed_during.entry(kind).or_default() += 1;
        }

        // A fresh opener: it also reclaims what the dead writer had reserved.
        let fresh = builder(b.path()).run_id(&run).open().unwrap();
        for (key, expected) in model.iter_mut() {
            let mut allowed = vec![*expected];
            let flight = in_flight.map(op).filter(|(k, _)| k == key);
            if let Some((_, action)) = flight {
                allowed.push(match action {
                    Action::Save(_) => Some(in_flight.unwrap()),
                    Action::Remove | Action::Export => None,
                });
            }
            let actual = match fresh.load_bytes(key) {
                Ok(v) => {
                    let i = which(&v);
                    let (_, Action::Save(len)) = op(i) else { panic!("round {round}: {key} holds op {i}, not a save") };
                    assert_eq!(&*v, &value(i, len)[..], "round {round}: {key} holds a torn value of op {i}");
                    counts.values_checked += 1;
                    Some(i)
                }
                Err(workflow_context::Error::KeyNotFound { .. }) => None,
                Err(e) => panic!("round {round}: {key}: {e}"),
            };
            assert!(allowed.contains(&actual), "round {round}: {key} is {actual:?}, expected one of {allowed:?}");
            if actual != *expected {
                counts.in_flight_applied += 1;
                if let (Some(v), Some((_, Action::Export))) = (*expected, flight) {
                    exported.push((in_flight.unwrap(), v));
                }
            }
            *expected = actual;
        }
        for (e, v) in exported {
            let path = b.path().join("exports").join(format!("e{e}.wfx"));
            let (_, Action::Save(len)) = op(v) else { unreachable!() };
            assert_eq!(workflow_context::read_exported_bytes(&path).unwrap(), value(v, len), "export {e}");
            counts.exports_checked += 1;
        }
        // The index, usage and the tiers agree.
        let u = fresh.usage().unwrap();
        let keys = fresh.list_keys().unwrap();
        let held: u64 = keys.iter().map(|k| fresh.storage_info(k).unwrap().unwrap().size).sum();
        assert_eq!(u.ram_usage_bytes + u.temp_disk_usage_bytes, held, "round {round}: usage is what the keys hold");
        assert_eq!(u.stored_keys_count, keys.len());
        let tiers = workflow_context::testing::context_tiers(&run, fresh.dir()).unwrap();
        let stored: u64 = tiers.iter().map(|t| t.usage().unwrap().bytes).sum();
        assert_eq!(stored, held, "round {round}: the tiers hold exactly what the index says");
        assert!(u.ram_usage_bytes <= 4 << 20, "round {round}: the RAM budget held");
        drop(fresh);
    }
    // An export killed before its file was in place leaves nothing: no temporary file.
    let exports: Vec<String> = std::fs::read_dir(b.path().join("exports"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let stray: Vec<&String> = exports
        .iter()
        .filter(|n| n.strip_prefix('e').and_then(|n| n.strip_suffix(".wfx")).is_none_or(|n| n.parse::<u64>().is_err()))
        .collect();
    assert!(stray.is_empty(), "left in the export directory: {stray:?}");
    println!("crash harness: {counts:#?}");
    assert!(counts.kills >= kills && counts.ops_done > kills, "{counts:?}");

    // The owner shuts down: nothing of the context is left.
    let dir = ctx.dir().to_owned();
    drop(ctx);
    assert!(!dir.exists());
    assert!(shm_segments(&run).is_empty());

    // An owner killed outright leaves a dead context; collecting orphans removes all of it.
    let dead = run_id("crashed-owner");
    let mut owner = Command::new(&exe)
        .args(["--exact", ENTRY, "--ignored", "--nocapture", "--test-threads=1"])
        .env("WFCTX_CHILD_ROLE", "owner")
        .env("WFCTX_BASE", b.path())
        .env("WFCTX_RUN", &dead)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(owner.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.unwrap().contains("READY")));
    owner.kill().unwrap();
    owner.wait().unwrap();
    assert!(!shm_segments(&dead).is_empty());
    let report = workflow_context::collect_orphans(b.path()).unwrap();
    assert_eq!(report.contexts_removed, 1, "{report:?}");
    assert!(shm_segments(&dead).is_empty());
    let left: Vec<_> = std::fs::read_dir(b.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.iter().all(|n| n == "exports" || n == "ops.log"), "left behind: {left:?}");
}

#[test]
fn torn_log_lines_read_as_nothing() {
    assert_eq!(parse_log_line("done 1099556631135 ."), Some(("done", 1_099_556_631_135)));
    assert_eq!(parse_log_line("start 7 ."), Some(("start", 7)));
    for torn in ["done 1099556", "done 1099556631135", "done 1099556631135 ", "done ", "do", ""] {
        assert_eq!(parse_log_line(torn), None, "{torn:?}");
    }
}
