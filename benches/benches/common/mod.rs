//! Helpers shared by the criterion benches (a module of each, not a bench itself).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, SamplingMode, Throughput};
use workflow_context_benches::workload::{MIB, Size, criterion_timing};

/// Sets the group's timing and throughput for values of `size`.
pub(crate) fn configure(group: &mut BenchmarkGroup<'_, WallTime>, size: Size) {
    let timing = criterion_timing(size.bytes);
    group
        .sample_size(timing.sample_size)
        .warm_up_time(timing.warm_up)
        .measurement_time(timing.measurement)
        .sampling_mode(if timing.flat { SamplingMode::Flat } else { SamplingMode::Auto })
        .throughput(Throughput::Bytes(size.bytes as u64));
}

/// Whether values of `bytes` are timed one operation at a time (their cleanup, a delete
/// or a free, runs between operations, untimed) rather than in one batch.
pub(crate) fn one_at_a_time(bytes: usize) -> bool {
    bytes >= MIB
}

/// Times `iters` runs of `op`, one at a time; what `op` returns is dropped untimed.
pub(crate) fn each<T>(iters: u64, mut op: impl FnMut() -> T) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let t = Instant::now();
        let out = black_box(op());
        total += t.elapsed();
        drop(out);
    }
    total
}

/// Times `iters` runs of `op` in one batch, then calls `cleanup` with what they returned,
/// untimed.
pub(crate) fn batch<T>(iters: u64, mut op: impl FnMut(u64) -> T, cleanup: impl FnOnce(Vec<T>)) -> Duration {
    let mut outs = Vec::with_capacity(iters as usize);
    let t = Instant::now();
    for i in 0..iters {
        outs.push(black_box(op(i)));
    }
    let total = t.elapsed();
    cleanup(outs);
    total
}
