//! Benchmarks of workflow-context (filled by the benchmark issue).
