//! Stress against a model: 4 processes × 4 threads of mixed save, overwrite, load, remove
//! and list for a bounded time (`WFCTX_STRESS_SECONDS`, default 2), then every key checked
//! against what the threads say they left: no lost update, exact usage.

#![cfg(feature = "testing")]

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_child_ok, base, builder};
use workflow_context::{SaveOptions, WorkflowContext};

const ENTRY: &str = "child_main";
const THREADS: usize = 4;
const PROCESSES: usize = 4;

/// What one thread left under each of its keys: the value's tag and length, or nothing.
type Model = HashMap<String, Option<(u64, usize)>>;

fn value(tag: u64, len: usize) -> Vec<u8> {
    let mut v = context_core::testing::pattern(tag, len.max(8));
    v[..8].copy_from_slice(&tag.to_le_bytes());
    v
}

#[test]
#[ignore = "runs only as a child process started by the stress test"]
fn child_main() {
    let Ok(role) = std::env::var("WFCTX_CHILD_ROLE") else { return };
    assert_eq!(role, "stress");
    let ctx = WorkflowContext::builder()
        .contexts_dir(std::env::var("WFCTX_BASE").unwrap())
        .run_id(std::env::var("WFCTX_RUN").unwrap())
        .open()
        .unwrap();
    let me: u64 = std::env::var("WFCTX_PROCESS").unwrap().parse().unwrap();
    let seconds: u64 = std::env::var("WFCTX_STRESS_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let results: Vec<(Model, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS as u64)
            .map(|t| {
                let ctx = &ctx;
                s.spawn(move || {
                    let mut model = Model::new();
                    let mut x = (me * 31 + t + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    let mut ops = 0u64;
                    while Instant::now() < deadline {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let key = format!("p{me}-t{t}-k{}", x % 12);
                        let tag = (me << 48) | (t << 40) | ops;
                        match (x >> 8) % 10 {
                            0..=4 => {
                                let len = [50usize, 4000, 70_000, 400_000][((x >> 16) % 4) as usize];
                                ctx.save_bytes(&key, &value(tag, len), SaveOptions::new()).unwrap();
                                model.insert(key, Some((tag, len)));
                            }
                            5 | 6 => match model.get(&key).copied().flatten() {
                                Some((tag, len)) => assert_eq!(&*ctx.load_bytes(&key).unwrap(), &value(tag, len)[..]),
                                None => assert!(!ctx.contains(&key).unwrap()),
                            },
                            7 | 8 => {
                                let existed = ctx.remove(&key).unwrap();
                                assert_eq!(existed, model.get(&key).copied().flatten().is_some(), "{key}");
                                model.insert(key, None);
                            }
                            _ => {
                                let _ = ctx.list_keys().unwrap();
                                let _ = ctx.usage().unwrap();
                            }
                        }
                        ops += 1;
                    }
                    (model, ops)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (model, ops) in results {
        println!("ops {ops}");
        for (key, state) in model {
            match state {
                Some((tag, len)) => println!("has {key} {tag} {len}"),
                None => println!("gone {key}"),
            }
        }
    }
}

#[test]
fn processes_and_threads_lose_no_update() {
    let b = base();
    let ctx = builder(b.path()).max_ram_bytes(8 << 20).max_disk_bytes(1 << 30).create().unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..PROCESSES)
        .map(|p| {
            Command::new(&exe)
                .args(["--exact", ENTRY, "--ignored", "--nocapture", "--test-threads=1"])
                .env("WFCTX_CHILD_ROLE", "stress")
                .env("WFCTX_BASE", b.path())
                .env("WFCTX_RUN", ctx.run_id())
                .env("WFCTX_PROCESS", p.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut expected = Model::new();
    let mut ops = 0u64;
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert_child_ok(&out);
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let parts: Vec<&str> = line.split(' ').collect();
            match parts.as_slice() {
                ["ops", n] => ops += n.parse::<u64>().unwrap(),
                ["has", key, tag, len] => {
                    expected.insert(key.to_string(), Some((tag.parse().unwrap(), len.parse().unwrap())));
                }
                ["gone", key] => {
                    expected.insert(key.to_string(), None);
                }
                _ => {}
            }
        }
    }
    println!("stress: {ops} operations by {PROCESSES} processes x {THREADS} threads, {} keys", expected.len());
    assert!(ops > 100, "the stress ran: {ops}");
    for (key, state) in &expected {
        match state {
            Some((tag, len)) => assert_eq!(&*ctx.load_bytes(key).unwrap(), &value(*tag, *len)[..], "{key}"),
            None => assert!(!ctx.contains(key).unwrap(), "{key} was removed"),
        }
    }
    let present = expected.values().filter(|s| s.is_some()).count();
    assert_eq!(ctx.list_keys().unwrap().len(), present, "no key appeared from nowhere");
    let u = ctx.usage().unwrap();
    let held: u64 = ctx.list_keys().unwrap().iter().map(|k| ctx.storage_info(k).unwrap().unwrap().size).sum();
    assert_eq!(u.ram_usage_bytes + u.temp_disk_usage_bytes, held, "usage is exactly what the keys hold");
    let tiers = workflow_context::testing::context_tiers(ctx.run_id(), ctx.dir()).unwrap();
    assert_eq!(tiers.iter().map(|t| t.usage().unwrap().bytes).sum::<u64>(), held, "and what the tiers hold");
    assert!(u.ram_usage_bytes <= 8 << 20);
}
