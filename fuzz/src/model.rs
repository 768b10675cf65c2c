//! The `ops` model: operation sequences on a context, checked against a `HashMap`.
//!
//! One copy for three users: the `ops` fuzz target, the corpus replay test, and the
//! property test `crates/workflow-context/tests/model.rs`, which include this file with
//! `#[path]`. It uses nothing but `workflow_context`, `arbitrary` and `tempfile`.

use std::collections::HashMap;

use arbitrary::Arbitrary;
use workflow_context::{Error, SaveOptions, WorkflowContext};

/// The most operations one `ops` input runs, so that each execution stays fast.
pub const MAX_OPS: usize = 64;
/// The RAM budget of the `ops` context: small, so that values spill across the tiers.
pub const OPS_RAM_BUDGET: u64 = 64 << 10;
/// Keys are chosen among this many, so that operations meet the same keys again.
const KEYS: u8 = 8;

/// One operation of the `ops` target.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `save_bytes` of `len` bytes of `fill`, with `use_ram(false)` if `to_disk`.
    Save { key: u8, len: u16, fill: u8, to_disk: bool },
    /// `save` of a typed value.
    SaveTyped { key: u8, value: Vec<u16> },
    /// `remove`.
    Remove { key: u8 },
    /// `load_bytes` or `load`, as the key was saved.
    Load { key: u8 },
    /// `export_data` to a fresh file, read back and compared.
    Export { key: u8 },
    /// Replaces the handle the operations go through by a freshly opened one.
    Reopen,
}

/// What the model holds for a key.
#[derive(Clone, Debug, PartialEq)]
enum Value {
    Bytes(Vec<u8>),
    Typed(Vec<u16>),
}

fn key(k: u8) -> String {
    format!("key/{}/../ü", k % KEYS)
}

/// [`run_ops_with`] as the `ops` fuzz target runs it: a RAM budget of [`OPS_RAM_BUDGET`],
/// and `use_ram(false)` for the saves that go to disk.
pub fn run_ops(ops: &[Op]) {
    run_ops_with(ops, OPS_RAM_BUDGET, SaveOptions::new().use_ram(false));
}

/// Runs the first [`MAX_OPS`] operations against a fresh context with a RAM budget of
/// `ram_budget` (in a temporary contexts directory) through a second opened handle, and
/// checks the context against a `HashMap` model after each: its keys, its values, its
/// exports, its usage as both handles see it, and the RAM budget. `to_disk` are the
/// options of the saves that go to disk (a build without disk tiers passes others).
pub fn run_ops_with(ops: &[Op], ram_budget: u64, to_disk_options: SaveOptions) {
    let base = tempfile::Builder::new().prefix("wfctx-model-").tempdir().expect("tempdir");
    let builder = || WorkflowContext::builder().contexts_dir(base.path());
    let owner = builder().max_ram_bytes(ram_budget).create().expect("create context");
    let mut ctx = builder().run_id(owner.run_id()).open().expect("open context");
    let mut model: HashMap<String, Value> = HashMap::new();
    let mut exports = 0;
    for op in ops.iter().take(MAX_OPS) {
        match *op {
            Op::Save { key: k, len, fill, to_disk } => {
                let bytes = vec![fill; usize::from(len)];
                let opts = if to_disk { to_disk_options } else { SaveOptions::new() };
                ctx.save_bytes(&key(k), &bytes, opts).expect("save_bytes");
                model.insert(key(k), Value::Bytes(bytes));
            }
            Op::SaveTyped { key: k, ref value } => {
                ctx.save(&key(k), value).expect("save");
                model.insert(key(k), Value::Typed(value.clone()));
            }
            Op::Remove { key: k } => {
                assert_eq!(ctx.remove(&key(k)).expect("remove"), model.remove(&key(k)).is_some(), "remove {}", key(k));
            }
            Op::Load { key: k } => match model.get(&key(k)) {
                Some(Value::Bytes(b)) => assert_eq!(&*ctx.load_bytes(&key(k)).expect("load_bytes"), &b[..]),
                Some(Value::Typed(v)) => assert_eq!(&ctx.load::<Vec<u16>>(&key(k)).expect("load"), v),
                None => {
                    let got = ctx.load_bytes(&key(k));
                    assert!(matches!(got, Err(Error::KeyNotFound { .. })), "missing key loaded: {got:?}");
                }
            },
            Op::Export { key: k } => {
                let dest = base.path().join(format!("export-{exports}"));
                exports += 1;
                match model.remove(&key(k)) {
                    Some(Value::Bytes(bytes)) => {
                        ctx.export_data(&key(k), &dest, false).expect("export_data");
                        assert_eq!(workflow_context::read_exported_bytes(&dest).expect("read_exported_bytes"), bytes);
                    }
                    Some(Value::Typed(v)) => {
                        ctx.export_data(&key(k), &dest, false).expect("export_data");
                        assert_eq!(workflow_context::read_exported::<Vec<u16>>(&dest).expect("read_exported"), v);
                    }
                    None => {
                        let got = ctx.export_data(&key(k), &dest, false);
                        assert!(matches!(got, Err(Error::KeyNotFound { .. })), "missing key exported: {got:?}");
                    }
                }
            }
            Op::Reopen => {
                ctx = builder().run_id(owner.run_id()).open().expect("reopen context");
            }
        }
        let mut keys = ctx.list_keys().expect("list_keys");
        keys.sort();
        let mut expected: Vec<String> = model.keys().cloned().collect();
        expected.sort();
        assert_eq!(keys, expected, "after {op:?}");
        let u = ctx.usage().expect("usage");
        assert_eq!(u.stored_keys_count, model.len(), "after {op:?}");
        assert_eq!(owner.usage().expect("owner usage"), u, "both handles agree on usage after {op:?}");
        assert!(u.ram_usage_bytes <= ram_budget, "RAM budget exceeded after {op:?}: {u:?}");
    }
    for k in model.keys() {
        ctx.remove(k).expect("remove");
    }
    let u = ctx.usage().expect("usage");
    assert_eq!((u.ram_usage_bytes, u.temp_disk_usage_bytes, u.stored_keys_count), (0, 0, 0), "left behind: {u:?}");
}
