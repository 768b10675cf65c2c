#![no_main]
//! The `config` fuzz target: see `workflow_context_fuzz::config`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    workflow_context_fuzz::config(data);
});
