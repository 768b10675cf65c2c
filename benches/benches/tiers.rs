//! Criterion benches of each tier alone, through the `StorageTier` trait: `put` of a new
//! object, `get` (a zero-copy view for shm and mmap above 64 KiB, a decompressed copy for
//! redb), and `get` with a copy out (`to_vec`). Sizes and bytes come from the shared
//! workload (`workflow_context_benches::workload`); throughput is in bytes, so criterion's
//! reports show GB/s.
//!
//! Run: `cargo bench -p workflow-context-benches --bench tiers`

mod common;

use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use context_core::{NewObject, ObjectData, ObjectId, ObjectRef, PutOutcome, StorageTier};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use workflow_context_benches::workload::{Content, SIZES, Tier, unique_run_id, value};

use common::{batch, configure, each, one_at_a_time};

/// Puts `bytes` as object `id`; panics if the tier has no room.
fn put(tier: &dyn StorageTier, id: u64, bytes: &[u8]) -> ObjectRef {
    let parts: [&[u8]; 1] = [bytes];
    match tier.put(NewObject { id: ObjectId(id), len: bytes.len() as u64, data: ObjectData::Parts(&parts) }) {
        Ok(PutOutcome::Stored(r)) => r,
        Ok(PutOutcome::NoSpace) => panic!("tier {} is full", tier.name()),
        Err(e) => panic!("put into {}: {e}", tier.name()),
    }
}

fn delete(tier: &dyn StorageTier, r: &ObjectRef) {
    tier.delete(r).expect("delete");
}

fn bench_tiers(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let tiers: Vec<(Tier, Arc<dyn StorageTier>)> = Tier::ALL
        .iter()
        .map(|&t| {
            let d = dir.path().join(t.name());
            std::fs::create_dir(&d).expect("tier dir");
            (t, t.build(&d, &unique_run_id("bench-tiers")).expect("build tier"))
        })
        .collect();
    // Object ids are never reused, as the context guarantees.
    let next_id = Cell::new(1u64);
    let take_ids = |n: u64| next_id.replace(next_id.get() + n);

    let mut group = c.benchmark_group("tier/put");
    for size in SIZES {
        let bytes = value(size.bytes, Content::Text, 1);
        configure(&mut group, size);
        for (name, tier) in &tiers {
            let tier = &**tier;
            group.bench_with_input(BenchmarkId::new(name.name(), size.bytes), &bytes, |b, bytes| {
                b.iter_custom(|iters| {
                    if one_at_a_time(bytes.len()) {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let id = take_ids(1);
                            let t = Instant::now();
                            let r = put(tier, id, bytes);
                            total += t.elapsed();
                            delete(tier, &r);
                        }
                        total
                    } else {
                        let first = take_ids(iters);
                        batch(iters, |i| put(tier, first + i, bytes), |refs| refs.iter().for_each(|r| delete(tier, r)))
                    }
                });
            });
        }
    }
    group.finish();

    for (op, copy) in [("tier/get", false), ("tier/get_copy", true)] {
        let mut group = c.benchmark_group(op);
        for size in SIZES {
            let bytes = value(size.bytes, Content::Text, 1);
            configure(&mut group, size);
            for (name, tier) in &tiers {
                let tier = &**tier;
                let r = put(tier, take_ids(1), &bytes);
                group.bench_function(BenchmarkId::new(name.name(), size.bytes), |b| {
                    let get = || tier.get(&r).expect("get").expect("stored");
                    match (copy, one_at_a_time(size.bytes)) {
                        (false, false) => b.iter(get),
                        (false, true) => b.iter_custom(|iters| each(iters, get)),
                        (true, false) => b.iter(|| get().to_vec()),
                        (true, true) => b.iter_custom(|iters| each(iters, || get().to_vec())),
                    }
                });
                delete(tier, &r);
            }
        }
        group.finish();
    }

    for (_, tier) in &tiers {
        tier.destroy().expect("destroy tier");
    }
}

criterion_group!(benches, bench_tiers);
criterion_main!(benches);
