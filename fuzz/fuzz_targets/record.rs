#![no_main]
//! The `record` fuzz target: see `workflow_context_fuzz::record`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    workflow_context_fuzz::record(data);
});
