//! Values passed by reference: their recipes (workflow graphs) and the values rebuilt from
//! them.

use std::any::Any;
use std::collections::HashMap;
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
    /// `None` once the handle is shut down: nothing is kept after that.
    rebuilt: Mutex<Option<HashMap<u128, Arc<Cell>>>>,
}

/// The value rebuilt from one graph, once a run gave it, and the runs that failed.
#[derive(Default)]
struct Cell {
    value: OnceCell<Rebuilt>,
    /// How many runs failed, and the last one's error message: a load that waited for a
    /// run that failed ends with its failure, rather than running the graph again.
    failed: Mutex<(u64, String)>,
}

impl Cell {
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

    /// The cell of `hash`, or `None` once the handle is shut down.
    fn cell(&self, hash: u128) -> Option<Arc<Cell>> {
        let mut rebuilt = self.rebuilt.lock().unwrap_or_else(|p| p.into_inner());
        let rebuilt = rebuilt.as_mut()?;
        Some(Arc::clone(rebuilt.entry(hash).or_default()))
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
    /// This handle runs each recipe once per content hash
    /// ([`WorkflowGraph::content_hash`]): the same graph saved under two keys is rebuilt
    /// once, and concurrent first loads wait for one run (and share its failure). A failed
    /// run is not remembered: the next load runs the graph again; nor is a value that is
    /// not a `T`. A load dropped mid-run (a timeout) leaves the run to the next load.
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
        let Some(cell) = self.refs.cell(graph.content_hash()) else {
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
            .await?;
        // Shut down during the run, or since: the value goes with the cell, to no one.
        if self.refs.cleared() {
            return Err(closed());
        }
        Arc::clone(value).downcast::<T>().map_err(|_| wrong_type())
    }
}
