//! A quick look at the figures the foundation must reach, each beside its ceiling measured
//! in the same run. The full harness (criterion benches, spill, many processes, plots) is
//! `cargo xtask bench`'s job; this is the smoke check used while building.
//!
//! Run: `cargo run --release -p workflow-context-benches --bin quick`

use std::hint::black_box;
use std::time::{Duration, Instant};

use workflow_context::{SaveOptions, WorkflowContext};

const BIG: usize = 256 << 20;

fn per_op_us(n: u32, mut f: impl FnMut(u32)) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    t.elapsed().as_secs_f64() * 1e6 / f64::from(n)
}

fn best_of(runs: usize, mut f: impl FnMut() -> Duration) -> Duration {
    (0..runs).map(|_| f()).min().expect("at least one run")
}

/// memcpy into freshly allocated memory, or `fs::write` of a new file in `dir`.
fn measure_ceiling(big: &[u8], ram: bool, dir: &std::path::Path) -> Duration {
    if ram {
        let t = Instant::now();
        let mut fresh = Vec::<u8>::with_capacity(big.len());
        fresh.extend_from_slice(big);
        black_box(&fresh);
        t.elapsed()
    } else {
        let p = dir.join("ceiling");
        let t = Instant::now();
        std::fs::write(&p, big).expect("fs::write");
        let d = t.elapsed();
        std::fs::remove_file(&p).expect("remove");
        d
    }
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn main() -> workflow_context::Result<()> {
    let dir = tempfile::tempdir().expect("tempdir");
    let ctx = WorkflowContext::builder().contexts_dir(dir.path()).max_ram_bytes(4 << 30).create()?;
    let small = "x".repeat(50);

    println!("figure                                  measured      ceiling / floor");
    for keys in [10u32, 100_000] {
        let have = ctx.usage()?.stored_keys_count as u32;
        for i in have..keys {
            ctx.save(&format!("fill-{i}"), &small)?;
        }
        let save = per_op_us(50_000, |i| ctx.save(&format!("k{}", i % 1000), &small).expect("save"));
        let load = per_op_us(200_000, |i| {
            black_box(ctx.load::<String>(&format!("k{}", i % 1000)).expect("load"));
        });
        println!("small save, {keys:>6} keys                {save:>7.2} us    floor 20 us");
        println!("small load, {keys:>6} keys                {load:>7.2} us    floor 5 us");
    }

    let big = vec![7u8; BIG];
    for (name, opts) in [("RAM (shm)", SaveOptions::new()), ("disk (mmap)", SaveOptions::new().use_ram(false))] {
        let mut ratios = Vec::new();
        // Round 0 warms the machine up (the first touch of memory is slow on a VM) and is
        // not counted; the ceiling and the save then alternate which goes first.
        for round in 0..4 {
            let ceiling = measure_ceiling(&big, opts.uses_ram(), dir.path());
            let hwm = vm_hwm_kib();
            let t = Instant::now();
            ctx.save_bytes("big", &big, opts)?;
            let save = t.elapsed();
            let grew = vm_hwm_kib().saturating_sub(hwm) / 1024;
            ctx.remove("big")?;
            let ceiling = if round % 2 == 0 { ceiling } else { measure_ceiling(&big, opts.uses_ram(), dir.path()) };
            if round > 0 {
                ratios.push((ceiling.as_secs_f64() / save.as_secs_f64(), save, ceiling, grew));
            }
        }
        ratios.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (ratio, save, ceiling, grew) = ratios[1];
        let what = if opts.uses_ram() { "memcpy to fresh memory" } else { "fs::write" };
        println!(
            "256 MiB save to {name:<12}            {:>7.1} ms    {ratio:.2}x {what} ({:.1} ms); peak RSS +{grew} MiB",
            save.as_secs_f64() * 1e3,
            ceiling.as_secs_f64() * 1e3
        );
        ctx.save_bytes("big", &big, opts)?;
        let first = Instant::now();
        black_box(ctx.load_bytes("big")?);
        let first = first.elapsed();
        let view = per_op_us(10_000, |_| {
            black_box(ctx.load_bytes("big").expect("view"));
        });
        println!(
            "load_bytes view of 256 MiB, {name:<12}  {view:>7.2} us    first load (checks the checksum) {:.1} ms",
            first.as_secs_f64() * 1e3
        );
        ctx.remove("big")?;
    }

    let opened =
        WorkflowContext::builder().contexts_dir(dir.path()).max_ram_bytes(1 << 30).run_id("quick-open").create()?;
    for i in 0..100 {
        opened.save(&format!("k{i}"), &i)?;
    }
    let open = best_of(5, || {
        let t = Instant::now();
        let h = WorkflowContext::builder().contexts_dir(dir.path()).run_id("quick-open").open().expect("open");
        let d = t.elapsed();
        drop(h);
        d
    });
    println!("open an existing context (100 keys)      {:>7.1} us    floor 1000 us", open.as_secs_f64() * 1e6);
    Ok(())
}
