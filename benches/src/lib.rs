//! Benchmarks of workflow-context, each figure beside the ceiling it chases.
//!
//! - [`workload`]: the one workload every benchmark shares: value sizes (64 B to 256 MiB,
//!   with a 1080p frame), value contents, the tiers, and how a context places values in
//!   each.
//! - [`ceiling`]: what the machine does with the same bytes without workflow-context
//!   (memcpy into warm and fresh memory, `fs::write`/`fs::read`, zstd level 1, a bare
//!   `shm_open` + `fallocate` + `pwrite`).
//! - [`measure`]: rounds in rotating order, medians, peak memory from `/proc/self/status`.
//! - [`rng`]: a seeded xorshift generator and a Zipf sampler.
//!
//! The criterion benches (`cargo bench -p workflow-context-benches`) measure each tier alone
//! through the `StorageTier` trait and the composed context; the harness
//! (`cargo xtask bench`, or `cargo run --release -p workflow-context-benches --bin harness
//! -- [--quick]`) measures what criterion does poorly (many keys, spilling, several
//! processes, peak memory, opening) and writes `target/bench/report.{md,json}` and
//! `target/bench/throughput.svg`. `docs/benchmarks.md` explains every figure.

pub mod ceiling;
pub mod measure;
pub mod rng;
pub mod workload;
