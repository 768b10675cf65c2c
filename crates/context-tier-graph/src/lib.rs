//! The pass-by-reference part of workflow-context: workflow graphs that rebuild values,
//! and the tier that stores them.
//!
//! # What pass-by-reference is for
//! Some values of a workflow run cannot be serialized: a loaded model, a GPU handle, an
//! open session. Instead of the value, the context stores its *recipe*, the workflow graph
//! that produces it, and a [`GraphRunner`] (a ComfyUI server, a model loader…) runs the
//! recipe again when another process loads the value. This crate holds the three pieces:
//!
//! - [`WorkflowGraph`]: a validated graph, with a stable [`content_hash`] the context uses
//!   to run each recipe once;
//! - [`GraphRunner`]: the hook that runs one;
//! - [`GraphTier`] ([`GraphConfig`]): a [`StorageTier`] of files that stores the
//!   context's records of recipes.
//!
//! # The API format
//! A graph is the JSON that ComfyUI's "Save (API format)" writes: an object of node id to
//! node, each node an object with a `class_type` and its `inputs`. An input is a literal
//! JSON value, or a *link* `[node_id, output_index]` to an output of another node:
//!
//! ```json
//! {
//!   "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"},
//!         "_meta": {"title": "Load Checkpoint"}},
//!   "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["4", 1]}}
//! }
//! ```
//!
//! Here node `"6"` takes output 1 of node `"4"` (its CLIP model) as its `clip` input.
//!
//! # Validation
//! [`WorkflowGraph::from_json`] refuses, with [`Error::InvalidGraph`] naming the node at
//! fault when there is one:
//! - text over 64 MiB, text that is not JSON, or JSON nested deeper than serde_json's
//!   recursion limit of 128 (hostile nesting is an error, never a stack overflow);
//! - text holding more than 2,000,000 JSON values, object keys included (parsed, each
//!   takes 32 bytes or more, so a few MiB of `[0,0,0,…]` would take hundreds of MiB);
//! - a top level that is not an object, or an empty one; more than 100,000 nodes;
//! - an empty node id, or one over 256 bytes;
//! - a node that is not an object; a `class_type` missing, not a string, or empty;
//!   `inputs` that is not an object (a missing `inputs` is an empty one; other keys on a
//!   node, such as ComfyUI's `_meta`, are accepted and dropped);
//! - a malformed link: a 2-element array `[string, number]` whose number is not an integer
//!   from 0 to 255 (negative, a fraction, `1.0`, 256 or more);
//! - a link to a node that does not exist, or to the node itself; a cycle of links (the
//!   error names the smallest node on the cycle and shows the cycle);
//! - a literal nesting arrays and objects more than 64 levels deep;
//! - an integer (a number without fraction or exponent) that fits neither `u64` nor `i64`:
//!   serde_json would read it as the nearest float, changing the literal and giving two
//!   different ones the same hash (write `1.8446744073709552e19` for a float);
//! - a graph whose canonical encoding ([`WorkflowGraph::to_json`]) would exceed 64 MiB.
//!
//! What is a link: exactly the top-level input values that are 2-element arrays of a
//! string and a number. This is the ComfyUI convention, so a literal such as `["a", 1]` is
//! read as a link (and refused if no node `"a"` exists); arrays of any other length or
//! shape (`["a", "b"]`, `["a", 1, 2]`) and arrays nested inside literals are literals.
//! JSON objects with a duplicate key keep the last value, as serde_json does. The integer
//! `-0` is the integer 0, as Python's json reads it (serde_json alone reads the float -0.0).
//!
//! The value a graph gives is one output of one node. By default it is output 0 of the
//! graph's sink, the node no other node links to; when there are several sinks, the one
//! with the greatest id. Ids that are all ASCII digits compare by numeric value and come
//! before the others, which compare as strings; [`WorkflowGraph::topological_order`] breaks
//! ties in the same order. Choose another output with [`WorkflowGraph::with_output`].
//!
//! # The hash
//! [`WorkflowGraph::content_hash`] is xxh3-128 over a canonical encoding: the API JSON with
//! node ids and input names sorted, literals written canonically (compact, keys sorted,
//! numbers and strings as serde_json writes them), `_meta` dropped, followed by the chosen
//! output. The same nodes and output give the same hash in every process and run, whatever
//! the key order or whitespace of the text; a different literal, link or output gives a
//! different one. Note that `1` and `1.0` are different literals (an integer and a float),
//! and so are `0.0` and `-0.0`: graphs equal by `==` are exactly those of equal hash.
//!
//! # The tier and what it costs
//! [`GraphTier`] is the mmap tier (`context-tier-mmap`) under its own name and directory:
//! one file `<dir>/<id>.val` per object (mode 0600, in a 0700 directory of its own),
//! created with `O_NOFOLLOW`, space reserved before it is written, removed with
//! `unlink(2)`. It never parses what it stores: the context keeps a graph's encoding inside
//! its own record. Each object costs a file and at least a 4 KiB block, and a few system
//! calls per put, get and delete. Objects over 64 MiB + 4 KiB are refused. Nothing is
//! `fsync`ed: it is scratch data of a workflow run. Any process that builds a
//! [`GraphTier`] over the same directory sees the same objects.
//!
//! # Example
//! ```
//! use context_tier_graph::WorkflowGraph;
//!
//! let graph = WorkflowGraph::from_json(r#"{
//!     "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
//!     "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "strength_model": 0.8}}
//! }"#)?;
//!
//! // The sink, output 0: the model with the LoRA applied.
//! assert_eq!(graph.output(), ("2", 0));
//! assert_eq!(graph.topological_order(), ["1", "2"]);
//! assert_eq!(graph.links("2"), [("clip", "1", 1), ("model", "1", 0)]);
//!
//! // Key order and whitespace do not change the hash; the chosen output does.
//! let same = WorkflowGraph::from_json(&graph.to_json())?;
//! assert_eq!(same.content_hash(), graph.content_hash());
//! let clip = graph.clone().with_output("2", 1)?;
//! assert_ne!(clip.content_hash(), graph.content_hash());
//! # Ok::<(), context_core::Error>(())
//! ```
//!
//! [`content_hash`]: WorkflowGraph::content_hash
//! [`StorageTier`]: context_core::StorageTier
//! [`Error::InvalidGraph`]: context_core::Error::InvalidGraph

mod graph;
mod runner;
mod tier;

pub use graph::{Node, WorkflowGraph};
pub use runner::GraphRunner;
pub use tier::{GraphConfig, GraphTier};
