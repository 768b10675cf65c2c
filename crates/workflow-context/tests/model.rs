//! Random sequences of operations on a context, checked against a `HashMap` model.
//!
//! The model is the `ops` fuzz target's (`fuzz/src/model.rs`, included here), so the
//! property test and the fuzzer check one thing; proptest picks the sequences here and
//! shrinks a failing one to a short list of `Op`s.

mod common;

#[allow(dead_code, unreachable_pub)]
#[path = "../../../fuzz/src/model.rs"]
mod model;

use model::{Op, run_ops_with};
use proptest::prelude::*;

fn op() -> impl Strategy<Value = Op> {
    // Lengths around every boundary of placement: arena slots (up to 4 KiB), segments,
    // and the 64 KiB line between redb and mmap on disk.
    let len = prop_oneof![0u16..100, 3000u16..5000, 60_000u16..=u16::MAX];
    prop_oneof![
        4 => (0u8..8, len, any::<u8>(), any::<bool>())
            .prop_map(|(key, len, fill, to_disk)| Op::Save { key, len, fill, to_disk }),
        2 => (0u8..8, proptest::collection::vec(any::<u16>(), 0..50)).prop_map(|(key, value)| Op::SaveTyped { key, value }),
        2 => (0u8..8).prop_map(|key| Op::Remove { key }),
        3 => (0u8..8).prop_map(|key| Op::Load { key }),
        1 => (0u8..8).prop_map(|key| Op::Export { key }),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn a_context_behaves_like_a_map(ops in proptest::collection::vec(op(), 1..60)) {
        run_ops_with(&ops, common::budget(256 << 10), common::to_disk());
    }
}
