#![no_main]
//! The `journal` fuzz target: see `workflow_context_fuzz::journal`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    workflow_context_fuzz::journal(data);
});
