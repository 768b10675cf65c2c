#![no_main]
//! The `ops` fuzz target: operation sequences checked against a `HashMap` model; see
//! `workflow_context_fuzz::run_ops`. The input is decoded as `Vec<Op>`, exactly as
//! `workflow_context_fuzz::ops` decodes the corpus files, so `cargo fuzz fmt ops <file>`
//! shows the operations of a crash.

use libfuzzer_sys::fuzz_target;
use workflow_context_fuzz::{Op, run_ops};

fuzz_target!(|ops: Vec<Op>| {
    run_ops(&ops);
});
