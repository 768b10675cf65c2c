//! Criterion benches of the composed context: `save_bytes` of a new key, `load_bytes` (a
//! zero-copy view above 64 KiB, checked once per process and kept), `load_bytes(..).to_vec()`
//! (a copy out), and an overwrite of the same key; each with the default placement (RAM,
//! the shm tier) and on disk (`use_ram(false)`: redb below 64 KiB, mmap above). Sizes and
//! bytes come from the shared workload; throughput is in bytes, so criterion's reports
//! show GB/s.
//!
//! Run: `cargo bench -p workflow-context-benches --bench context`

mod common;

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use workflow_context::{SaveOptions, WorkflowContext};
use workflow_context_benches::workload::{Content, SIZES, value};

use common::{batch, configure, each, one_at_a_time};

/// Room for the largest value twice over (an overwrite holds the old and the new value).
const RAM_BUDGET: u64 = 2 << 30;

fn placements() -> [(&'static str, SaveOptions); 2] {
    [("ram", SaveOptions::new()), ("disk", SaveOptions::new().use_ram(false))]
}

fn bench_context(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ctx =
        WorkflowContext::builder().contexts_dir(dir.path()).max_ram_bytes(RAM_BUDGET).create().expect("create context");
    let save = |key: &str, bytes: &[u8], opts| ctx.save_bytes(key, bytes, opts).expect("save");
    let remove = |key: &str| {
        ctx.remove(key).expect("remove");
    };

    let mut group = c.benchmark_group("context/save");
    for size in SIZES {
        let bytes = value(size.bytes, Content::Text, 1);
        configure(&mut group, size);
        for (name, opts) in placements() {
            group.bench_with_input(BenchmarkId::new(name, size.bytes), &bytes, |b, bytes| {
                b.iter_custom(|iters| {
                    if one_at_a_time(bytes.len()) {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let t = Instant::now();
                            save("v", bytes, opts);
                            total += t.elapsed();
                            remove("v");
                        }
                        total
                    } else {
                        let keys: Vec<String> = (0..iters).map(|i| format!("v{i}")).collect();
                        batch(iters, |i| save(&keys[i as usize], bytes, opts), |_| keys.iter().for_each(|k| remove(k)))
                    }
                });
            });
        }
    }
    group.finish();

    for (op, copy) in [("context/load_view", false), ("context/load_copy", true)] {
        let mut group = c.benchmark_group(op);
        for size in SIZES {
            let bytes = value(size.bytes, Content::Text, 1);
            configure(&mut group, size);
            for (name, opts) in placements() {
                save("v", &bytes, opts);
                // The first load checks the value's checksum; criterion's warm-up does it.
                let load = || ctx.load_bytes("v").expect("load");
                group.bench_function(BenchmarkId::new(name, size.bytes), |b| match (copy, one_at_a_time(size.bytes)) {
                    (false, false) => b.iter(load),
                    (false, true) => b.iter_custom(|iters| each(iters, load)),
                    (true, false) => b.iter(|| load().to_vec()),
                    (true, true) => b.iter_custom(|iters| each(iters, || load().to_vec())),
                });
                remove("v");
            }
        }
        group.finish();
    }

    let mut group = c.benchmark_group("context/overwrite");
    for size in SIZES {
        let bytes = value(size.bytes, Content::Text, 1);
        configure(&mut group, size);
        for (name, opts) in placements() {
            save("v", &bytes, opts);
            group.bench_with_input(BenchmarkId::new(name, size.bytes), &bytes, |b, bytes| {
                b.iter(|| save("v", bytes, opts));
            });
            remove("v");
        }
    }
    group.finish();
    ctx.shutdown().expect("shutdown");
}

criterion_group!(benches, bench_context);
criterion_main!(benches);
