//! Random sequences of operations on a context, checked against a `HashMap` model.

mod common;

use std::collections::HashMap;

use common::{base, builder};
use proptest::prelude::*;
use workflow_context::{Error, SaveOptions};

#[derive(Clone, Debug)]
enum Op {
    Save { key: u8, len: usize, fill: u8, to_disk: bool },
    SaveTyped { key: u8, value: Vec<u16> },
    Remove { key: u8 },
    Load { key: u8 },
    Export { key: u8 },
    Reopen,
}

#[derive(Clone, Debug, PartialEq)]
enum Value {
    Bytes(Vec<u8>),
    Typed(Vec<u16>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..8, prop_oneof![0usize..100, 3000usize..5000, 60_000usize..70_000, 200_000usize..300_000], any::<u8>(), any::<bool>())
            .prop_map(|(key, len, fill, to_disk)| Op::Save { key, len, fill, to_disk }),
        2 => (0u8..8, proptest::collection::vec(any::<u16>(), 0..50)).prop_map(|(key, value)| Op::SaveTyped { key, value }),
        2 => (0u8..8).prop_map(|key| Op::Remove { key }),
        3 => (0u8..8).prop_map(|key| Op::Load { key }),
        1 => (0u8..8).prop_map(|key| Op::Export { key }),
        1 => Just(Op::Reopen),
    ]
}

fn key(k: u8) -> String {
    format!("key/{k}/../ü")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn a_context_behaves_like_a_map(ops in proptest::collection::vec(op(), 1..60)) {
        let b = base();
        let owner = builder(b.path()).max_ram_bytes(common::budget(512 << 10)).create().unwrap();
        // Operations go through a second handle, as another process would; it is replaced
        // by a fresh one from time to time.
        let mut ctx = builder(b.path()).run_id(owner.run_id()).open().unwrap();
        let mut model: HashMap<String, Value> = HashMap::new();
        let mut exports = 0;
        for op in ops {
            match op {
                Op::Save { key: k, len, fill, to_disk } => {
                    let bytes = vec![fill; len];
                    let opts = if to_disk { common::to_disk() } else { SaveOptions::new() };
                    ctx.save_bytes(&key(k), &bytes, opts).unwrap();
                    model.insert(key(k), Value::Bytes(bytes));
                }
                Op::SaveTyped { key: k, value } => {
                    ctx.save(&key(k), &value).unwrap();
                    model.insert(key(k), Value::Typed(value));
                }
                Op::Remove { key: k } => {
                    prop_assert_eq!(ctx.remove(&key(k)).unwrap(), model.remove(&key(k)).is_some());
                }
                Op::Load { key: k } => match model.get(&key(k)) {
                    Some(Value::Bytes(b)) => prop_assert_eq!(&*ctx.load_bytes(&key(k)).unwrap(), &b[..]),
                    Some(Value::Typed(v)) => prop_assert_eq!(&ctx.load::<Vec<u16>>(&key(k)).unwrap(), v),
                    None => prop_assert!(matches!(ctx.load_bytes(&key(k)), Err(Error::KeyNotFound { .. })), "missing key loaded"),
                },
                Op::Export { key: k } => {
                    let dest = b.path().join(format!("export-{exports}"));
                    exports += 1;
                    match model.remove(&key(k)) {
                        Some(Value::Bytes(bytes)) => {
                            ctx.export_data(&key(k), &dest, false).unwrap();
                            prop_assert_eq!(workflow_context::read_exported_bytes(&dest).unwrap(), bytes);
                        }
                        Some(Value::Typed(v)) => {
                            ctx.export_data(&key(k), &dest, false).unwrap();
                            prop_assert_eq!(workflow_context::read_exported::<Vec<u16>>(&dest).unwrap(), v);
                        }
                        None => prop_assert!(
                            matches!(ctx.export_data(&key(k), &dest, false), Err(Error::KeyNotFound { .. })),
                            "missing key exported"
                        ),
                    }
                }
                Op::Reopen => {
                    ctx = builder(b.path()).run_id(owner.run_id()).open().unwrap();
                }
            }
            let mut keys = ctx.list_keys().unwrap();
            keys.sort();
            let mut expected: Vec<String> = model.keys().cloned().collect();
            expected.sort();
            prop_assert_eq!(keys, expected);
            let u = ctx.usage().unwrap();
            prop_assert_eq!(u.stored_keys_count, model.len());
            prop_assert_eq!(owner.usage().unwrap(), u, "both handles agree on usage");
            prop_assert!(u.ram_usage_bytes <= common::budget(512 << 10));
        }
        for k in model.keys() {
            ctx.remove(k).unwrap();
        }
        let u = ctx.usage().unwrap();
        prop_assert_eq!((u.ram_usage_bytes, u.temp_disk_usage_bytes, u.stored_keys_count), (0, 0, 0));
    }
}
