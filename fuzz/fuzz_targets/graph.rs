#![no_main]
//! The `graph` fuzz target: see `workflow_context_fuzz::graph`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    workflow_context_fuzz::graph(data);
});
