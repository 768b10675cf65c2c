#![no_main]
//! The `export` fuzz target: see `workflow_context_fuzz::export`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    workflow_context_fuzz::export(data);
});
