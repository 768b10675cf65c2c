//! A toy `GraphRunner`, driven by a minimal `block_on`.

use std::any::Any;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};

use context_core::Error;
use context_tier_graph::{GraphRunner, WorkflowGraph};

/// Runs a future to completion on this thread, parking while it is pending.
fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = pin!(future);
    loop {
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(output) => return output,
            Poll::Pending => thread::park(),
        }
    }
}

/// Evaluates a toy arithmetic graph: `Const` nodes (input `value`), `Add` and `Mul` nodes
/// (inputs `a` and `b`, literals or links). Every node has one output, 0.
struct Arithmetic;

impl Arithmetic {
    fn eval(graph: &WorkflowGraph) -> context_core::Result<i64> {
        let mut results = std::collections::HashMap::new();
        for id in graph.topological_order() {
            let node = &graph.nodes()[id];
            let arg = |name: &str| -> context_core::Result<i64> {
                if let Some(&(_, from, _)) = graph.links(id).iter().find(|(input, ..)| *input == name) {
                    return Ok(results[from]);
                }
                node.inputs.get(name).and_then(serde_json::Value::as_i64).ok_or_else(|| Error::Runner {
                    key: String::new(),
                    source: format!("node {id}: input {name:?} is not an integer").into(),
                })
            };
            let value = match node.class_type.as_str() {
                "Const" => arg("value")?,
                "Add" => arg("a")? + arg("b")?,
                "Mul" => arg("a")? * arg("b")?,
                other => {
                    return Err(Error::Runner {
                        key: String::new(),
                        source: format!("unknown node type {other}").into(),
                    });
                }
            };
            results.insert(id, value);
        }
        Ok(results[graph.output().0])
    }
}

#[async_trait::async_trait]
impl GraphRunner for Arithmetic {
    async fn run(&self, graph: &WorkflowGraph) -> context_core::Result<Arc<dyn Any + Send + Sync>> {
        // A yield, so block_on really waits once.
        YieldOnce(false).await;
        Ok(Arc::new(Self::eval(graph)?))
    }
}

struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

const TOY: &str = r#"{
    "1": {"class_type": "Const", "inputs": {"value": 6}},
    "2": {"class_type": "Const", "inputs": {"value": 7}},
    "3": {"class_type": "Mul", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
    "4": {"class_type": "Add", "inputs": {"a": ["3", 0], "b": 100}}
}"#;

#[test]
fn runs_the_chosen_output() {
    let runner: &dyn GraphRunner = &Arithmetic;
    let graph = WorkflowGraph::from_json(TOY).unwrap();
    let value = block_on(runner.run(&graph)).unwrap();
    assert_eq!(value.downcast_ref::<i64>(), Some(&142));

    let product = graph.with_output("3", 0).unwrap();
    let value = block_on(runner.run(&product)).unwrap();
    assert_eq!(value.downcast_ref::<i64>(), Some(&42));
}

#[test]
fn a_runner_failure_keeps_its_source() {
    let graph = WorkflowGraph::from_json(r#"{"1": {"class_type": "Div", "inputs": {}}}"#).unwrap();
    let err = block_on(Arithmetic.run(&graph)).unwrap_err();
    assert!(matches!(err, Error::Runner { .. }), "{err:?}");
    let source = std::error::Error::source(&err).expect("the runner's error is the source");
    assert_eq!(source.to_string(), "unknown node type Div");
}

#[test]
fn runners_are_shareable_across_threads() {
    let runner: Arc<dyn GraphRunner> = Arc::new(Arithmetic);
    let graph = Arc::new(WorkflowGraph::from_json(TOY).unwrap());
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (runner, graph) = (runner.clone(), graph.clone());
            thread::spawn(move || *block_on(runner.run(&graph)).unwrap().downcast_ref::<i64>().unwrap())
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 142);
    }
}
