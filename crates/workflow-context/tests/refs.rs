//! Pass-by-reference: recipes stored, rebuilt once, across processes.

#![cfg(feature = "tier-graph")]

mod common;
#[allow(dead_code)]
#[path = "../examples/graph_runner/toy.rs"]
mod toy;

use std::any::Any;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};

use common::{assert_child_ok, base, builder, run_child};
use futures::channel::oneshot;
use futures::executor::block_on;
use toy::{Image, ToyRunner};
use workflow_context::{Error, GraphRunner, PassBy, SaveOptions, StorageKind, WorkflowContext, WorkflowGraph};

const SUM: &str = r#"{"1": {"class_type": "Constant", "inputs": {"value": 2}},
                      "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 40}}}"#;
const IMAGE: &str = r#"{"1": {"class_type": "SyntheticImage", "inputs": {"width": 8, "height": 4, "seed": 1}},
                        "2": {"class_type": "Resize", "inputs": {"image": ["1", 0], "width": 16, "height": 8}}}"#;

fn graph(json: &str) -> WorkflowGraph {
    WorkflowGraph::from_json(json).unwrap()
}

type Rebuilt = Arc<dyn Any + Send + Sync>;

/// A runner whose runs each wait for the value the test sends them, in the order they
/// start: the test decides when a run ends and what it gives. Counts its runs.
#[derive(Default)]
struct GatedRunner {
    runs: AtomicUsize,
    gates: Mutex<VecDeque<oneshot::Receiver<Rebuilt>>>,
}

impl GatedRunner {
    /// The sender that ends the next run not yet given one.
    fn gate(&self) -> oneshot::Sender<Rebuilt> {
        let (tx, rx) = oneshot::channel();
        self.gates.lock().unwrap().push_back(rx);
        tx
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

/// A context whose runner is a [`GatedRunner`], with the graph `SUM` saved as `"sum"`.
fn gated_context(base: &std::path::Path) -> (Arc<GatedRunner>, WorkflowContext) {
    let runner = Arc::new(GatedRunner::default());
    let ctx = builder(base).graph_runner(runner.clone()).create().unwrap();
    ctx.save_ref("sum", &graph(SUM)).unwrap();
    (runner, ctx)
}

/// Two loads of `"sum"`: the first runs the graph, the second waits for it; then `meanwhile`
/// runs and the first is dropped mid-run. Returns what the second gets. A second run, if one
/// starts, ends at once with 42.0.
fn second_load_once_the_first_is_dropped(
    ctx: &WorkflowContext,
    runner: &GatedRunner,
    meanwhile: impl FnOnce(),
) -> workflow_context::Result<Arc<f64>> {
    let _first_gate = runner.gate();
    let second_gate = runner.gate();
    block_on(async {
        let mut first = Box::pin(ctx.load_ref::<f64>("sum"));
        let mut second = Box::pin(ctx.load_ref::<f64>("sum"));
        assert!(futures::poll!(first.as_mut()).is_pending(), "the first load runs the graph");
        assert!(futures::poll!(second.as_mut()).is_pending(), "the second load waits for that run");
        meanwhile();
        drop(first);
        second_gate.send(Arc::new(42.0f64)).unwrap();
        second.await
    })
}

#[workflow_context::async_trait]
impl GraphRunner for GatedRunner {
    async fn run(&self, _graph: &WorkflowGraph) -> workflow_context::Result<Rebuilt> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let gate = self.gates.lock().unwrap().pop_front().expect("the test gave this run a gate");
        // A dropped sender fails the run.
        gate.await.map_err(|_| Error::InvalidGraph { node: None, reason: "the run was called off".into() })
    }
}

#[test]
#[ignore = "runs only as a child process started by the other tests"]
fn child_main() {
    let Ok(role) = std::env::var("WFCTX_CHILD_ROLE") else { return };
    let runner = Arc::new(ToyRunner::default());
    let ctx = WorkflowContext::builder()
        .contexts_dir(std::env::var("WFCTX_BASE").unwrap())
        .run_id(std::env::var("WFCTX_RUN").unwrap())
        .graph_runner(runner.clone())
        .open()
        .unwrap();
    match role.as_str() {
        "save-recipe" => ctx.save_ref("image", &graph(IMAGE)).unwrap(),
        "rebuild" => {
            let sum: Arc<f64> = block_on(ctx.load_ref("sum")).unwrap();
            assert_eq!(*sum, 42.0);
            assert_eq!(runner.runs.load(Ordering::SeqCst), 1);
        }
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn recipes_are_stored_by_reference() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    ctx.save_ref("sum", &graph(SUM)).unwrap();
    let info = ctx.storage_info("sum").unwrap().unwrap();
    assert_eq!((info.pass_by, info.tier.as_str(), info.storage_type), (PassBy::Ref, "graph", StorageKind::Disk));
    assert!(info.path.unwrap().starts_with(ctx.dir()));
    assert_eq!(ctx.load_graph("sum").unwrap(), graph(SUM));
    assert_eq!(ctx.list_keys().unwrap(), vec!["sum"]);
    assert_eq!(ctx.usage().unwrap().temp_disk_usage_bytes, info.size);
    // Overwrite with another recipe, then with a value: storage follows.
    ctx.save_ref("sum", &graph(IMAGE)).unwrap();
    assert_eq!(ctx.load_graph("sum").unwrap(), graph(IMAGE));
    ctx.save("sum", &1u8).unwrap();
    assert_eq!(ctx.storage_info("sum").unwrap().unwrap().pass_by, PassBy::Val);
    assert!(ctx.remove("sum").unwrap());
    let u = ctx.usage().unwrap();
    assert_eq!((u.ram_usage_bytes, u.temp_disk_usage_bytes), (0, 0));
}

#[test]
fn the_wrong_load_says_which_to_use() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    ctx.save_ref("model", &graph(SUM)).unwrap();
    ctx.save("prompt", "hi").unwrap();
    assert!(matches!(ctx.load::<f64>("model"), Err(Error::ByReference { key }) if key == "model"));
    assert!(matches!(ctx.load_bytes("model"), Err(Error::ByReference { .. })));
    assert!(matches!(ctx.load_graph("prompt"), Err(Error::ByValue { key }) if key == "prompt"));
    assert!(matches!(block_on(ctx.load_ref::<f64>("prompt")), Err(Error::ByValue { .. })));
    assert!(matches!(ctx.load_graph("absent"), Err(Error::KeyNotFound { .. })));
    let msg = ctx.load::<f64>("model").unwrap_err().to_string();
    assert!(msg.contains("load_ref"), "{msg}");
}

#[test]
fn a_recipe_cannot_be_exported_and_stays() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    ctx.save_ref("model", &graph(SUM)).unwrap();
    let dest = b.path().join("model.wfx");
    assert!(matches!(ctx.export_data("model", &dest, false), Err(Error::NotExportable { .. })));
    assert!(!dest.exists());
    assert_eq!(ctx.load_graph("model").unwrap(), graph(SUM));
}

#[test]
fn rebuilding_needs_a_runner_and_the_right_type() {
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    ctx.save_ref("sum", &graph(SUM)).unwrap();
    assert!(matches!(block_on(ctx.load_ref::<f64>("sum")), Err(Error::NoRunner { key }) if key == "sum"));
    let with = builder(b.path()).run_id(ctx.run_id()).graph_runner(Arc::new(ToyRunner::default())).open().unwrap();
    assert_eq!(*block_on(with.load_ref::<f64>("sum")).unwrap(), 42.0);
    match block_on(with.load_ref::<String>("sum")) {
        Err(Error::WrongType { key, expected }) => {
            assert_eq!((key.as_str(), expected), ("sum", "alloc::string::String"))
        }
        other => panic!("{other:?}"),
    }
    // A failing run keeps the runner's error as its source, and is not remembered.
    ctx.save_ref("bad", &graph(r#"{"1": {"class_type": "Teleport", "inputs": {}}}"#)).unwrap();
    let err = block_on(with.load_ref::<f64>("bad")).unwrap_err();
    assert!(matches!(err, Error::Runner { ref key, .. } if key == "bad"), "{err:?}");
    let source = std::error::Error::source(&err).expect("the runner's error is the source").to_string();
    assert!(source.contains("Teleport"), "{source}");
    assert!(block_on(with.load_ref::<f64>("bad")).is_err());
}

#[test]
fn each_recipe_runs_once_per_content() {
    let b = base();
    let runner = Arc::new(ToyRunner::default());
    let ctx = builder(b.path()).graph_runner(runner.clone()).create().unwrap();
    ctx.save_ref("a", &graph(IMAGE)).unwrap();
    // The same graph, written differently, under another key.
    ctx.save_ref("b", &graph(&IMAGE.replace([' ', '\n'], ""))).unwrap();
    ctx.save_ref("c", &graph(SUM)).unwrap();
    let a: Arc<Image> = block_on(ctx.load_ref("a")).unwrap();
    let a2: Arc<Image> = block_on(ctx.load_ref("a")).unwrap();
    let b2: Arc<Image> = block_on(ctx.load_ref("b")).unwrap();
    assert!(Arc::ptr_eq(&a, &a2) && Arc::ptr_eq(&a, &b2));
    assert_eq!((a.width, a.height, a.pixels.len()), (16, 8, 16 * 8 * 3));
    assert_eq!(runner.runs.load(Ordering::SeqCst), 1);
    assert_eq!(*block_on(ctx.load_ref::<f64>("c")).unwrap(), 42.0);
    assert_eq!(runner.runs.load(Ordering::SeqCst), 2);
    // Shutdown drops what was rebuilt.
    let weak = Arc::downgrade(&a);
    drop((a, a2, b2));
    assert!(weak.upgrade().is_some(), "the context still holds the value");
    ctx.shutdown().unwrap();
    assert!(weak.upgrade().is_none(), "shutdown dropped it");
    assert!(matches!(block_on(ctx.load_ref::<Image>("a")), Err(Error::Closed { .. })));
}

#[test]
fn concurrent_first_loads_run_the_graph_once() {
    let b = base();
    let runner = Arc::new(ToyRunner { delay_ms: 100, ..ToyRunner::default() });
    let ctx = builder(b.path()).graph_runner(runner.clone()).create().unwrap();
    ctx.save_ref("image", &graph(IMAGE)).unwrap();
    let barrier = Barrier::new(8);
    let values: Vec<Arc<Image>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    block_on(ctx.load_ref::<Image>("image")).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(runner.runs.load(Ordering::SeqCst), 1, "eight concurrent loads, one run");
    assert!(values.iter().all(|v| Arc::ptr_eq(v, &values[0])));
}

#[test]
fn a_recipe_saved_in_one_process_is_rebuilt_in_another() {
    let b = base();
    let runner = Arc::new(ToyRunner::default());
    let ctx = builder(b.path()).graph_runner(runner.clone()).create().unwrap();
    let env = [("WFCTX_BASE", b.path().to_str().unwrap()), ("WFCTX_RUN", ctx.run_id())];
    // The child saves a recipe; this process rebuilds it.
    assert_child_ok(&run_child("child_main", "save-recipe", &env));
    let image: Arc<Image> = block_on(ctx.load_ref("image")).unwrap();
    assert_eq!((image.width, image.height), (16, 8));
    // This process saves one; the child rebuilds it with its own runner.
    ctx.save_ref("sum", &graph(SUM)).unwrap();
    assert_child_ok(&run_child("child_main", "rebuild", &env));
}

#[test]
fn a_damaged_recipe_is_refused() {
    let b = base();
    let ctx = builder(b.path()).graph_runner(Arc::new(ToyRunner::default())).create().unwrap();
    ctx.save_ref("sum", &graph(SUM)).unwrap();
    let path = ctx.storage_info("sum").unwrap().unwrap().path.unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(ctx.load_graph("sum"), Err(Error::Corrupt { .. })));
    assert!(matches!(block_on(ctx.load_ref::<f64>("sum")), Err(Error::Corrupt { .. })));
    // Values saved by value are unaffected and the key can be saved again.
    ctx.save_ref("sum", &graph(SUM)).unwrap();
    assert_eq!(*block_on(ctx.load_ref::<f64>("sum")).unwrap(), 42.0);
    ctx.save_bytes("v", b"x", SaveOptions::new()).unwrap();
}

#[test]
fn shutdown_drops_rebuilt_values_even_when_another_handle_shut_the_context_down() {
    let b = base();
    let owner = builder(b.path()).create().unwrap();
    owner.save_ref("image", &graph(IMAGE)).unwrap();
    let other = builder(b.path()).run_id(owner.run_id()).graph_runner(Arc::new(ToyRunner::default())).open().unwrap();
    let image: Arc<Image> = block_on(other.load_ref("image")).unwrap();
    let weak = Arc::downgrade(&image);
    drop(image);
    assert!(weak.upgrade().is_some(), "the handle holds the rebuilt value");
    // Another handle (another process, typically) ends the context first.
    owner.shutdown().unwrap();
    other.shutdown().unwrap();
    assert!(weak.upgrade().is_none(), "shutdown must drop every rebuilt value of this handle");
}

#[test]
fn a_stored_recipe_that_is_no_valid_graph_is_an_invalid_graph_error() {
    use context_core::{ObjectId, record};
    let b = base();
    let ctx = builder(b.path()).create().unwrap();
    ctx.save_ref("sum", &graph(SUM)).unwrap();
    // Rewrite the record with an intact checksum but a graph that breaks a rule (as a
    // recipe written by another version of the crate may): node "2" now links to itself.
    let path = ctx.storage_info("sum").unwrap().unwrap().path.unwrap();
    let bytes = std::fs::read(&path).unwrap();
    // A short record names its object only in its checksum: find the id that passes.
    let id = (1..10_000).map(ObjectId).find(|&id| record::check(&bytes, id, true).is_ok()).expect("the recipe's id");
    let (api_json, output): (String, (String, u32)) = postcard::from_bytes(record::payload(&bytes)).unwrap();
    assert!(api_json.contains(r#""a":["1",0]"#), "{api_json}");
    let api_json = api_json.replace(r#""a":["1",0]"#, r#""a":["2",0]"#);
    let payload = postcard::to_stdvec(&(api_json, output)).unwrap();
    std::fs::write(&path, record::encode(id, record::FLAG_TYPED, &payload)).unwrap();
    // load_graph's docs: `Error::InvalidGraph` if the stored recipe is damaged.
    match ctx.load_graph("sum") {
        Err(Error::InvalidGraph { node, reason }) => {
            assert_eq!(node.as_deref(), Some("2"));
            assert!(reason.contains("links to the node itself"), "{reason}");
        }
        other => panic!("expected InvalidGraph naming node \"2\", got {other:?}"),
    }
}

#[test]
fn a_value_of_the_wrong_type_is_not_remembered() {
    let b = base();
    let (runner, ctx) = gated_context(b.path());
    // The runner gives a value of the wrong type first (a bug of its own, since fixed),
    // then the right one.
    runner.gate().send(Arc::new("forty-two".to_owned())).unwrap();
    runner.gate().send(Arc::new(42.0f64)).unwrap();
    assert!(matches!(block_on(ctx.load_ref::<f64>("sum")), Err(Error::WrongType { key, .. }) if key == "sum"));
    // Like a failed run, the unusable value is not kept: the next load runs the graph again.
    let sum = block_on(ctx.load_ref::<f64>("sum")).expect("the second run gives an f64");
    assert_eq!((*sum, runner.runs()), (42.0, 2));
    // The right value is kept, and asking for another type does not drop it.
    assert!(matches!(block_on(ctx.load_ref::<String>("sum")), Err(Error::WrongType { .. })));
    assert!(Arc::ptr_eq(&sum, &block_on(ctx.load_ref::<f64>("sum")).unwrap()));
    assert_eq!(runner.runs(), 2);
}

#[test]
fn a_run_in_progress_at_shutdown_hands_out_nothing() {
    // A run in progress when the handle shuts down: the loads waiting on it, the one that
    // started it included, end with `Closed`, and the value it gave is dropped.
    let b = base();
    let (runner, ctx) = gated_context(b.path());
    let gate = runner.gate();
    let value: Rebuilt = Arc::new(42.0f64);
    let weak = Arc::downgrade(&value);
    let (first, second) = block_on(async {
        let mut first = Box::pin(ctx.load_ref::<f64>("sum"));
        let mut second = Box::pin(ctx.load_ref::<f64>("sum"));
        assert!(futures::poll!(first.as_mut()).is_pending(), "the first load runs the graph");
        assert!(futures::poll!(second.as_mut()).is_pending(), "the second load waits for that run");
        ctx.shutdown().unwrap();
        gate.send(value).unwrap();
        (first.await, second.await)
    });
    assert_eq!(runner.runs(), 1);
    assert!(matches!(first, Err(Error::Closed { .. })), "{first:?}");
    assert!(matches!(second, Err(Error::Closed { .. })), "{second:?}");
    assert!(weak.upgrade().is_none(), "a value rebuilt for a handle that shut down is dropped");
}

#[test]
fn no_run_starts_after_shutdown() {
    // The load running the graph is called off after the shutdown: the one waiting for it
    // must not start the graph again.
    let b = base();
    let (runner, ctx) = gated_context(b.path());
    let second = second_load_once_the_first_is_dropped(&ctx, &runner, || ctx.shutdown().unwrap());
    assert!(matches!(second, Err(Error::Closed { .. })), "{second:?}");
    assert_eq!(runner.runs(), 1, "no run starts after shutdown");
}

#[test]
fn a_load_called_off_or_panicking_mid_run_leaves_the_next_one_to_run_the_graph() {
    let b = base();
    let (runner, ctx) = gated_context(b.path());
    // The load running the graph is dropped (a timeout, a `select!`): the one waiting for
    // it runs the graph and gets the value.
    let second = second_load_once_the_first_is_dropped(&ctx, &runner, || {});
    assert_eq!((*second.unwrap(), runner.runs()), (42.0, 2));

    // A runner that panics: the panic reaches the caller, and the next load runs again.
    let panicky = "{\"1\": {\"class_type\": \"Panic\", \"inputs\": {}}}";
    ctx.save_ref("panicky", &graph(panicky)).unwrap();
    struct Panics;
    #[workflow_context::async_trait]
    impl GraphRunner for Panics {
        async fn run(&self, _graph: &WorkflowGraph) -> workflow_context::Result<Rebuilt> {
            panic!("the runner panics")
        }
    }
    let with_panics = builder(b.path()).run_id(ctx.run_id()).graph_runner(Arc::new(Panics)).open().unwrap();
    let caught =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| block_on(with_panics.load_ref::<f64>("panicky"))));
    assert!(caught.is_err(), "the panic reaches the caller");
    let caught =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| block_on(with_panics.load_ref::<f64>("panicky"))));
    assert!(caught.is_err(), "the next load runs the graph again, neither poisoned nor hung");
}

#[test]
fn a_failed_run_fails_the_loads_that_waited_for_it() {
    let b = base();
    let (runner, ctx) = gated_context(b.path());
    ctx.save_ref("same", &graph(SUM)).unwrap();
    let first_gate = runner.gate();
    // Were a second run started, it would end at once with this value.
    runner.gate().send(Arc::new(42.0f64)).unwrap();
    let (first, second) = block_on(async {
        let mut first = Box::pin(ctx.load_ref::<f64>("sum"));
        let mut second = Box::pin(ctx.load_ref::<f64>("same"));
        assert!(futures::poll!(first.as_mut()).is_pending(), "the first load runs the graph");
        assert!(futures::poll!(second.as_mut()).is_pending(), "the second load waits for that run");
        drop(first_gate); // the run fails
        (first.await, second.await)
    });
    assert!(matches!(&first, Err(Error::Runner { key, .. }) if key == "sum"), "{first:?}");
    // The waiting load shares the failure of the run it waited for, under its own key,
    // rather than running the graph again (eight waiters would run a failing graph eight
    // times, one after the other).
    match &second {
        Err(err @ Error::Runner { key, .. }) => {
            assert_eq!(key, "same");
            assert!(err.to_string().contains("called off"), "{err}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(runner.runs(), 1, "concurrent first loads wait for one run, failed or not");
    // The failure is not remembered: the next load runs the graph again.
    assert_eq!(*block_on(ctx.load_ref::<f64>("sum")).unwrap(), 42.0);
    assert_eq!(runner.runs(), 2);
}
