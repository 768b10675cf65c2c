//! Benchmarks of workflow-context. `src/bin/quick.rs` is the quick look used while
//! building; the criterion benches and the full harness come with the benchmark work.
