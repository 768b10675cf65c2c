//! A toy graph runner: plays graphs of a few node types, enough to see pass-by-reference
//! work end to end. Shared by the `graph_runner` example and the tests.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;
use workflow_context::{Error, GraphRunner, Result, WorkflowGraph};

/// An RGB image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Image {
    /// Width in pixels.
    pub(crate) width: usize,
    /// Height in pixels.
    pub(crate) height: usize,
    /// Row-major RGB bytes.
    pub(crate) pixels: Vec<u8>,
}

/// What a node gives.
#[derive(Clone, Debug)]
enum Output {
    Number(f64),
    Image(Arc<Image>),
}

/// Plays graphs whose nodes are `Constant {value}`, `Add {a, b}`,
/// `SyntheticImage {width, height, seed}` and `Resize {image, width, height}`; inputs are
/// literals or links to other nodes' output 0. Counts its runs.
#[derive(Debug, Default)]
pub(crate) struct ToyRunner {
    /// How many graphs it has run.
    pub(crate) runs: AtomicUsize,
    /// How long each run pretends to take, in milliseconds.
    pub(crate) delay_ms: u64,
}

impl ToyRunner {
    fn input(
        graph: &WorkflowGraph,
        done: &HashMap<String, Output>,
        node: &str,
        name: &str,
    ) -> std::result::Result<Output, String> {
        let value = graph.nodes()[node].inputs.get(name).ok_or_else(|| format!("node {node} has no input {name}"))?;
        if let Some((_, from, _)) = graph.links(node).into_iter().find(|(input, _, _)| *input == name) {
            return done.get(from).cloned().ok_or_else(|| format!("node {from} has not run"));
        }
        match value {
            Value::Number(n) => n.as_f64().map(Output::Number).ok_or_else(|| format!("{name} is not a number")),
            other => Err(format!("node {node}: input {name} is {other}, not a number")),
        }
    }

    fn number(o: Output, what: &str) -> std::result::Result<f64, String> {
        match o {
            Output::Number(n) => Ok(n),
            Output::Image(_) => Err(format!("{what} must be a number, not an image")),
        }
    }

    /// Plays `graph` and returns what its output node gives.
    pub(crate) fn play(graph: &WorkflowGraph) -> std::result::Result<Arc<dyn Any + Send + Sync>, String> {
        let mut done: HashMap<String, Output> = HashMap::new();
        for node in graph.topological_order() {
            let get = |name: &str| Self::input(graph, &done, node, name);
            let out = match graph.nodes()[node].class_type.as_str() {
                "Constant" => Output::Number(Self::number(get("value")?, "value")?),
                "Add" => Output::Number(Self::number(get("a")?, "a")? + Self::number(get("b")?, "b")?),
                "SyntheticImage" => {
                    let (w, h) = (
                        Self::number(get("width")?, "width")? as usize,
                        Self::number(get("height")?, "height")? as usize,
                    );
                    let seed = Self::number(get("seed")?, "seed")? as usize;
                    let pixels =
                        (0..w * h * 3).map(|i| ((i / 3 % w) * 7 + (i / 3 / w) * 13 + i % 3 + seed) as u8).collect();
                    Output::Image(Arc::new(Image { width: w, height: h, pixels }))
                }
                "Resize" => {
                    let Output::Image(src) = get("image")? else {
                        return Err(format!("node {node}: image is not an image"));
                    };
                    let (w, h) = (
                        Self::number(get("width")?, "width")? as usize,
                        Self::number(get("height")?, "height")? as usize,
                    );
                    let mut pixels = Vec::with_capacity(w * h * 3);
                    for y in 0..h {
                        for x in 0..w {
                            let (sx, sy) = (x * src.width / w.max(1), y * src.height / h.max(1));
                            let at = (sy * src.width + sx) * 3;
                            pixels.extend_from_slice(&src.pixels[at..at + 3]);
                        }
                    }
                    Output::Image(Arc::new(Image { width: w, height: h, pixels }))
                }
                other => return Err(format!("node {node}: unknown node type {other}")),
            };
            done.insert(node.to_owned(), out);
        }
        match done.remove(graph.output().0) {
            Some(Output::Number(n)) => Ok(Arc::new(n)),
            Some(Output::Image(img)) => Ok(Arc::new(Image::clone(&img))),
            None => Err("the output node did not run".to_owned()),
        }
    }
}

#[workflow_context::async_trait]
impl GraphRunner for ToyRunner {
    async fn run(&self, graph: &WorkflowGraph) -> Result<Arc<dyn Any + Send + Sync>> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if self.delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(self.delay_ms));
        }
        Self::play(graph).map_err(|reason| Error::InvalidGraph { node: None, reason })
    }
}
