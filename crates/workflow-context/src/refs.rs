//! Values passed by reference: their recipes (workflow graphs) and the values rebuilt from
//! them.

use std::any::Any;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex};

use async_lock::OnceCell;
use context_core::{Error, PassBy, Result, SaveOptions, record};
use context_tier_graph::{GraphRunner, WorkflowGraph};

use crate::codec;
use crate::context::{Pool, WorkflowContext};

type Rebuilt = Arc<dyn Any + Send + Sync>;

/// One handle's runner and the values it rebuilt, one per graph content hash.
pub(crate) struct Refs {
    runner: Option<Arc<dyn GraphRunner>>,
    /// `None` once the handle is shut down: nothing is kept after that. Holds a cell per
    /// graph being run or rebuilt, none for a graph whose last run failed.
    rebuilt: Mutex<Option<HashMap<u128, Arc<Cell>>>>,
}

/// The value rebuilt from one graph, once a run gave it, and the runs that failed.
struct Cell {
    /// The graph the value is rebuilt from: a different graph with the same content hash
    /// (xxh3-128 is no defence against a graph made to collide) gets a cell of its own.
    graph: WorkflowGraph,
    value: OnceCell<Rebuilt>,
    /// How many runs failed, and the last one's error message: a load that waited for a
    /// run that failed ends with its failure, rather than running the graph again.
    failed: Mutex<(u64, String)>,
}

impl Cell {
    fn new(graph: &WorkflowGraph) -> Arc<Self> {
        Arc::new(Cell { graph: graph.clone(), value: OnceCell::new(), failed: Mutex::default() })
    }

    fn failures(&self) -> u64 {
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    /// The message of the last failed run, if one failed since `failures` were counted.
    fn failed_since(&self, failures: u64) -> Option<String> {
        let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        (failed.0 != failures).then(|| failed.1.clone())
    }

    fn fail(&self, error: &Error) {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        *failed = (failed.0 + 1, error.to_string());
    }
}

impl Refs {
    pub(crate) fn new(runner: Option<Arc<dyn GraphRunner>>) -> Self {
        Refs { runner, rebuilt: Mutex::new(Some(HashMap::new())) }
    }

    /// Lets go of the runner and the rebuilt values without dropping them: for a copy of a
    /// handle inherited by a forked child, whose parent still uses them.
    pub(crate) fn abandon(&mut self) {
        std::mem::forget(self.runner.take());
        std::mem::forget(self.rebuilt.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner).take());
    }

    /// Drops every rebuilt value this handle holds, and keeps none from now on.
    pub(crate) fn clear(&self) {
        *self.rebuilt.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Whether the handle is shut down (its rebuilt values dropped).
    fn cleared(&self) -> bool {
        self.rebuilt.lock().unwrap_or_else(|p| p.into_inner()).is_none()
    }

    /// The cell of `graph`, whose content hash is `hash`, or `None` once the handle is shut
    /// down. A graph whose hash another graph's cell holds gets a cell that is not kept: its
    /// value is rebuilt at every load rather than mistaken for the other's.
    fn cell(&self, hash: u128, graph: &WorkflowGraph) -> Option<Arc<Cell>> {
        let mut rebuilt = self.rebuilt.lock().unwrap_or_else(|p| p.into_inner());
        Some(match rebuilt.as_mut()?.entry(hash) {
            Entry::Occupied(kept) if kept.get().graph == *graph => Arc::clone(kept.get()),
            Entry::Occupied(_) => Cell::new(graph),
            Entry::Vacant(room) => Arc::clone(room.insert(Cell::new(graph))),
        })
    }

    /// Drops the cell of `hash` if it is still `cell` and holds no value: after a load
    /// through it failed, so that every graph that ever failed does not keep a cell until
    /// shutdown. The loads still waiting on it hold it, and see the failure.
    fn forget_failed(&self, hash: u128, cell: &Arc<Cell>) {
        let mut rebuilt = self.rebuilt.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rebuilt) = rebuilt.as_mut()
            && cell.value.get().is_none()
            && rebuilt.get(&hash).is_some_and(|kept| Arc::ptr_eq(kept, cell))
        {
            rebuilt.remove(&hash);
        }
    }

    /// How many cells the handle keeps.
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.rebuilt.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map_or(0, HashMap::len)
    }
}

impl WorkflowContext {
    /// Saves a value by reference: stores the workflow graph that rebuilds it (its
    /// recipe), not the value. Any attached process can read the recipe with
    /// [`load_graph`](Self::load_graph) and rebuild the value with
    /// [`load_ref`](Self::load_ref).
    ///
    /// The recipe lives in the "graph" tier, whatever the placement policy.
    /// [`StorageInfo::pass_by`](crate::StorageInfo::pass_by) is [`PassBy::Ref`].
    ///
    /// ```
    /// # fn main() -> workflow_context::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use workflow_context::{PassBy, WorkflowContext, WorkflowGraph};
    /// let ctx = WorkflowContext::builder().contexts_dir(dir.path()).create()?;
    /// let graph = WorkflowGraph::from_json(r#"{
    ///     "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}}
    /// }"#)?;
    /// ctx.save_ref("model", &graph)?;
    /// assert_eq!(ctx.storage_info("model")?.unwrap().pass_by, PassBy::Ref);
    /// assert_eq!(ctx.load_graph("model")?, graph);
    /// # Ok(()) }
    /// ```
    pub fn save_ref(&self, key: &str, graph: &WorkflowGraph) -> Result<()> {
        let tier = self.recipe_tier.as_ref().expect("a build with tier-graph has a recipe tier");
        self.save_typed(key, graph, SaveOptions::new(), PassBy::Ref, Pool::Recipes(tier))
    }

    /// The recipe of a value passed by reference, as [`save_ref`](Self::save_ref) stored
    /// it, checked again on the way out.
    ///
    /// # Errors
    /// [`Error::KeyNotFound`]; [`Error::ByValue`] if the key holds a value, not a recipe;
    /// [`Error::Corrupt`] or [`Error::InvalidGraph`] if the stored recipe is damaged.
    pub fn load_graph(&self, key: &str) -> Result<WorkflowGraph> {
        let (entry, stored) = self.load_record(key)?;
        if entry.pass_by != PassBy::Ref {
            return Err(Error::ByValue { key: key.to_owned() });
        }
        // The record holds `WorkflowGraph`'s binary serde form, the canonical API JSON and
        // the output, decoded here in two steps: through serde, a graph that fails
        // validation would surface as postcard's message-less `SerdeDeCustom` codec error.
        let (api_json, (node, index)): (String, (String, u32)) = codec::decode(record::payload(&stored), key)?;
        WorkflowGraph::from_json(&api_json)?.with_output(&node, index)
    }

    /// Rebuilds a value passed by reference, running its recipe with the context's
    /// [`GraphRunner`] the first time, and handing out the same value after that.
    ///
    /// This handle runs each recipe once: the same graph (by [`WorkflowGraph::content_hash`],
    /// then compared in full, so two graphs made to share a hash are never mistaken for one
    /// another) saved under two keys is rebuilt once, and concurrent first loads wait for
    /// one run (and share its failure). A failed run is not remembered (nor kept in memory):
    /// the next load runs the graph again; nor is a value that is not a `T`. A load dropped mid-run (a timeout) leaves the run to the next load.
    /// [`shutdown`](Self::shutdown) drops every rebuilt value: a load still running or
    /// waiting then ends with [`Error::Closed`], and no run starts after it.
    ///
    /// # Errors
    /// Those of [`load_graph`](Self::load_graph); [`Error::NoRunner`] if the context was
    /// built without [`graph_runner`](crate::ContextBuilder::graph_runner);
    /// [`Error::Runner`] (keeping the runner's error as its source, or its message for the
    /// loads that waited for the run) if the run fails;
    /// [`Error::WrongType`] if the runner's value is not a `T`; [`Error::Closed`] if this
    /// handle shuts down before the value is handed out.
    pub async fn load_ref<T: Any + Send + Sync>(&self, key: &str) -> Result<Arc<T>> {
        let graph = self.load_graph(key)?;
        let Some(runner) = self.refs.runner.clone() else {
            return Err(Error::NoRunner { key: key.to_owned() });
        };
        // Shut down since the recipe was read (a shutdown in the meantime cleared the cells).
        let hash = graph.content_hash();
        let Some(cell) = self.refs.cell(hash, &graph) else {
            return Err(Error::Closed { run_id: self.run_id().to_owned() });
        };
        let closed = || Error::Closed { run_id: self.run_id().to_owned() };
        let wrong_type = || Error::WrongType { key: key.to_owned(), expected: std::any::type_name::<T>() };
        let failures = cell.failures();
        let value = cell
            .value
            .get_or_try_init(|| async {
                // Waited for a run that a shutdown cut short: no run starts after it.
                if self.refs.cleared() {
                    return Err(closed());
                }
                // Waited for a run that failed: its failure is this load's too.
                if let Some(message) = cell.failed_since(failures) {
                    return Err(Error::Runner { key: key.to_owned(), source: message.into() });
                }
                let value = runner.run(&graph).await.map_err(|e| {
                    cell.fail(&e);
                    Error::Runner { key: key.to_owned(), source: Box::new(e) }
                })?;
                // A value no load of this type can use is not remembered, as a failure.
                if !value.is::<T>() {
                    return Err(wrong_type());
                }
                Ok(value)
            })
            .await
            .inspect_err(|_| self.refs.forget_failed(hash, &cell))?;
        // Shut down during the run, or since: the value goes with the cell, to no one.
        if self.refs.cleared() {
            return Err(closed());
        }
        Arc::clone(value).downcast::<T>().map_err(|_| wrong_type())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;

    fn constant(value: u32) -> WorkflowGraph {
        let json = format!(r#"{{"1": {{"class_type": "Constant", "inputs": {{"value": {value}}}}}}}"#);
        WorkflowGraph::from_json(&json).unwrap()
    }

    /// Fails the runs of the constants 1 and 3, gives `1.0` for the others.
    struct OddFails;

    #[async_trait::async_trait]
    impl GraphRunner for OddFails {
        async fn run(&self, graph: &WorkflowGraph) -> Result<Rebuilt> {
            if *graph == constant(1) || *graph == constant(3) {
                return Err(Error::InvalidGraph { node: None, reason: "odd".into() });
            }
            Ok(Arc::new(1.0f64))
        }
    }

    #[test]
    fn a_graph_with_the_hash_of_another_never_gets_its_value() {
        let refs = Refs::new(None);
        let (one, two) = (constant(1), constant(2));
        let kept = refs.cell(7, &one).unwrap();
        let other = refs.cell(7, &two).unwrap();
        assert!(!Arc::ptr_eq(&kept, &other), "a second graph under one hash shares the first's cell");
        assert!(Arc::ptr_eq(&kept, &refs.cell(7, &one).unwrap()), "the first graph keeps its cell");
        assert_eq!(refs.kept(), 1);
    }

    #[test]
    fn a_graph_whose_run_failed_keeps_no_cell() {
        let dir = tempfile::tempdir().unwrap();
        let ctx =
            WorkflowContext::builder().contexts_dir(dir.path()).graph_runner(Arc::new(OddFails)).create().unwrap();
        for value in 0..4 {
            ctx.save_ref(&format!("g{value}"), &constant(value)).unwrap();
        }
        for value in 0..4 {
            let loaded = block_on(ctx.load_ref::<f64>(&format!("g{value}")));
            assert_eq!(loaded.is_ok(), value % 2 == 0, "{loaded:?}");
        }
        // A load of the wrong type fails too, and keeps nothing of its own.
        ctx.save_ref("g6", &constant(6)).unwrap();
        assert!(matches!(block_on(ctx.load_ref::<u8>("g6")), Err(Error::WrongType { .. })));
        assert_eq!(ctx.refs.kept(), 2, "only the two rebuilt values are kept");
        assert_eq!(*block_on(ctx.load_ref::<f64>("g6")).unwrap(), 1.0);
        assert_eq!(ctx.refs.kept(), 3);
        ctx.shutdown().unwrap();
    }
}
