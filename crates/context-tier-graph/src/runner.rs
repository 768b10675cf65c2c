//! [`GraphRunner`]: the hook that turns a recipe back into a value.

use std::any::Any;
use std::sync::Arc;

use context_core::Result;

use crate::WorkflowGraph;

/// Rebuilds a value passed by reference by running its recipe: a client of a ComfyUI
/// server, a model loader, anything that can turn a [`WorkflowGraph`] into the live object
/// it describes.
///
/// This crate only defines the hook; the composed context calls it when a by-reference
/// value is loaded and memoizes the result (one run per graph, found by
/// [`WorkflowGraph::content_hash`] and compared in full), so a runner need not cache.
///
/// # Behavior
/// - Returns the value that the graph's chosen output ([`WorkflowGraph::output`]) gives;
///   callers downcast it to the type they expect.
/// - Called from many tasks at once; it must be safe to run the same graph twice.
/// - A failure is an error, of any variant. The context hands it to its caller as the
///   source of a [`context_core::Error::Runner`] naming the key being loaded, so a runner
///   never needs keys: one that wraps an error of its own (an HTTP client's, a loader's)
///   can return `Error::Runner` with that error as its source and an empty `key`.
///
/// ```
/// use std::any::Any;
/// use std::sync::Arc;
/// use context_tier_graph::{GraphRunner, WorkflowGraph};
///
/// /// Answers the class type of the output node: a stand-in for a real loader.
/// struct ClassOfOutput;
///
/// #[async_trait::async_trait]
/// impl GraphRunner for ClassOfOutput {
///     async fn run(&self, graph: &WorkflowGraph) -> context_core::Result<Arc<dyn Any + Send + Sync>> {
///         let (node, _) = graph.output();
///         Ok(Arc::new(graph.nodes()[node].class_type.clone()))
///     }
/// }
/// ```
#[async_trait::async_trait]
pub trait GraphRunner: Send + Sync {
    /// Runs the graph and returns the value its output gives.
    async fn run(&self, graph: &WorkflowGraph) -> Result<Arc<dyn Any + Send + Sync>>;
}
