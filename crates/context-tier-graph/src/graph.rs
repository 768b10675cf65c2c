//! [`WorkflowGraph`]: a validated workflow graph in the ComfyUI API format.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap};
use std::fmt;
use std::io;
use std::ops::ControlFlow;

use context_core::{Error, Result};
use serde::de::{self, Deserializer};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The largest graph text [`WorkflowGraph::from_json`] reads, and the largest canonical
/// encoding ([`WorkflowGraph::to_json`]) a graph may have: 64 MiB.
pub(crate) const MAX_GRAPH_BYTES: usize = 64 << 20;
/// The most nodes a graph may have.
pub(crate) const MAX_NODES: usize = 100_000;
/// The most JSON values (object keys included) a graph's text may hold: what bounds the
/// memory of parsing it. Parsed, a value takes 32 to about 100 bytes whatever its text's
/// length, so 64 MiB of `[0,0,0,…]` would take about 1.5 GiB (measured); this many take
/// at most a few hundred MiB, and leave 20 values to each of the most nodes a graph may
/// have.
pub(crate) const MAX_JSON_VALUES: usize = 2_000_000;
/// The longest node id, in bytes.
pub(crate) const MAX_NODE_ID_BYTES: usize = 256;
/// How deep an input's literal may nest arrays and objects (`[1]` is 1 deep, `1` is 0).
pub(crate) const MAX_INPUT_DEPTH: usize = 64;
/// Output indexes (of links and of the chosen output) are below this.
pub(crate) const MAX_OUTPUT_INDEX: u32 = 256;

/// Prefixed to the canonical encoding before hashing, so a change of encoding is a change
/// of name.
const HASH_DOMAIN: &[u8] = b"context-tier-graph/workflow-graph/v1\0";

/// One node of a [`WorkflowGraph`]: what it is and what it takes.
///
/// Serde derives are provided for convenience; `inputs` holds [`serde_json::Value`]s, which
/// only self-describing formats (JSON, not postcard) can deserialize. [`WorkflowGraph`]'s
/// own serde form works in every format.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// The node's type, as the runner knows it (`"KSampler"`).
    pub class_type: String,
    /// The node's inputs by name: literals, or links `[node_id, output_index]`.
    #[serde(default)]
    pub inputs: Map<String, Value>,
}

/// A workflow graph: its nodes by id, and the output that gives the value.
///
/// Built only by [`WorkflowGraph::from_json`] (or serde), so every graph is valid: see the
/// [crate] docs for the rules. Immutable but for the chosen output
/// ([`WorkflowGraph::with_output`]).
///
/// Its serde form is format-agnostic and validated on the way in: in human-readable formats
/// (JSON) `{"nodes": {…API format…}, "output": [node_id, index]}`, in binary ones (postcard)
/// the canonical API JSON text and the output.
/// In a human-readable format, serde hands over numbers already read, not their text: an
/// integer beyond 64 bits arrives as the nearest float and `-0` as the float -0.0, where
/// [`WorkflowGraph::from_json`] refuses the first and reads the second as the integer 0.
/// Parse API JSON text with `from_json`.
///
/// Two graphs are equal when their nodes and outputs are, literal for literal as the content
/// hash sees them: `-0.0` and `0.0` are different literals (which [`Node`]'s `PartialEq`,
/// that of serde_json's `Value`, calls equal).
#[derive(Clone, Debug)]
pub struct WorkflowGraph {
    nodes: BTreeMap<String, Node>,
    output: (String, u32),
}

/// What one input's value is.
enum Input<'a> {
    Literal,
    Link(&'a str, u32),
    /// Shaped like a link (`[string, number]`) but the number is no output index.
    BadLink(String),
}

fn classify(value: &Value) -> Input<'_> {
    let Value::Array(items) = value else { return Input::Literal };
    let [Value::String(from), Value::Number(index)] = items.as_slice() else { return Input::Literal };
    match index.as_u64() {
        Some(i) if i < u64::from(MAX_OUTPUT_INDEX) => Input::Link(from, i as u32),
        Some(i) => Input::BadLink(format!("output index {i} is over the limit of {}", MAX_OUTPUT_INDEX - 1)),
        None if index.is_i64() => Input::BadLink(format!("output index {index} is negative")),
        None => Input::BadLink(format!("output index {index} is not an integer")),
    }
}

/// Shortens user input for an error message, on a character boundary.
fn shorten(s: &str) -> String {
    const MAX_CHARS: usize = 64;
    match s.char_indices().nth(MAX_CHARS) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

fn invalid(node: Option<&str>, reason: impl Into<String>) -> Error {
    Error::InvalidGraph { node: node.map(shorten), reason: reason.into() }
}

/// The order of node ids: ids of ASCII digits come first, by numeric value (of any
/// length); the others follow, by their bytes. Equal values ("7", "07") fall back to bytes.
pub(crate) fn cmp_ids(a: &str, b: &str) -> Ordering {
    fn numeric(s: &str) -> Option<&str> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit())).then(|| s.trim_start_matches('0'))
    }
    match (numeric(a), numeric(b)) {
        (Some(x), Some(y)) => x.len().cmp(&y.len()).then_with(|| x.cmp(y)).then_with(|| a.cmp(b)),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => a.cmp(b),
    }
}

/// Calls `f` with each number of `json`, valid JSON, in order: where its text starts, the
/// text, and the top-level key (node id, still quoted) it is under; until `f` breaks.
fn for_each_number<'a>(json: &'a str, mut f: impl FnMut(usize, &'a str, Option<&'a str>) -> ControlFlow<()>) {
    let b = json.as_bytes();
    let (mut i, mut depth) = (0, 0usize);
    let (mut last_string, mut node) = (None, None);
    while i < b.len() {
        match b[i] {
            b'"' => {
                let start = i;
                i += 1;
                // Bounded although `json` is valid: never an index out of range.
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i = (i + 1).min(b.len());
                last_string = json.get(start..i);
            }
            b':' if depth == 1 => {
                node = last_string;
                i += 1;
            }
            b'{' | b'[' => {
                depth += 1;
                i += 1;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < b.len() && matches!(b[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
                    i += 1;
                }
                if f(start, &json[start..i], node).is_break() {
                    return;
                }
            }
            _ => i += 1,
        }
    }
}

/// The first integer (a number with no fraction or exponent) of `json`, valid JSON, that
/// fits neither `u64` nor `i64`, and the top-level key (node id) it is under.
///
/// Why: serde_json reads such an integer as the nearest float, so the literal would change
/// (`18446744073709551616` would reach the runner as `1.8446744073709552e19`) and two
/// different literals would share a content hash, and so a rebuilt value.
fn integer_beyond_64_bits(json: &str) -> Option<(Option<String>, &str)> {
    let mut found = None;
    for_each_number(json, |_, token, node| {
        if !token.contains(['.', 'e', 'E']) && token.parse::<u64>().is_err() && token.parse::<i64>().is_err() {
            let node = node.and_then(|n| serde_json::from_str::<String>(n).ok());
            found = Some((node, token));
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    });
    found
}

/// `json`, valid JSON, with each integer `-0` written `0`, or `None` if it has none.
///
/// Why: serde_json reads the integer `-0` as the float -0.0, so the literal would change (a
/// runner asking for an integer would find none, `["4", -0]` would be no link) and it would
/// hash apart from `0`, the integer it is (Python's json, which ComfyUI uses, reads 0).
fn negative_zero_integers_as_zero(json: &str) -> Option<String> {
    let mut zeroed: Option<Vec<u8>> = None;
    for_each_number(json, |start, token, _| {
        if token == "-0" {
            // Whitespace for the sign: the text stays valid JSON of the same length.
            zeroed.get_or_insert_with(|| json.as_bytes().to_vec())[start] = b' ';
        }
        ControlFlow::Continue(())
    });
    zeroed.map(|bytes| String::from_utf8(bytes).expect("an ASCII byte replaced by another"))
}

/// Whether `json` holds more than `limit` JSON values (object keys included), counted on
/// the text before it is parsed: strings, numbers, `true`, `false`, `null`, arrays and
/// objects. Any text will do (it need not be valid JSON): the count is an upper bound of
/// what parsing it would allocate, and the scan stops once past `limit`.
fn more_json_values_than(json: &str, limit: usize) -> bool {
    let b = json.as_bytes();
    let (mut i, mut values) = (0, 0usize);
    while i < b.len() {
        match b[i] {
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                values += 1;
            }
            b'{' | b'[' => {
                i += 1;
                values += 1;
            }
            b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => {
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || matches!(b[i], b'-' | b'+' | b'.')) {
                    i += 1;
                }
                values += 1;
            }
            _ => i += 1,
        }
        if values > limit {
            return true;
        }
    }
    false
}

/// How deeply `value` nests arrays and objects, counted without recursion and given up
/// past `limit` (the answer is then `limit + 1`).
fn depth_beyond(value: &Value, limit: usize) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((v, depth)) = stack.pop() {
        let depth = depth + 1;
        match v {
            Value::Array(items) => stack.extend(items.iter().map(|c| (c, depth))),
            Value::Object(map) => stack.extend(map.values().map(|c| (c, depth))),
            _ => continue,
        }
        deepest = deepest.max(depth);
        if deepest > limit {
            break;
        }
    }
    deepest
}

impl WorkflowGraph {
    /// Parses and validates a graph in the ComfyUI API format.
    ///
    /// The output is the graph's sink (the node no other node links to), output 0; with
    /// several sinks, the greatest id (numeric ids by value and before the others, which
    /// compare as strings). Choose another with [`WorkflowGraph::with_output`].
    ///
    /// # Errors
    /// [`Error::InvalidGraph`], naming the node at fault when there is one, for any rule of
    /// the [crate] docs that the text breaks.
    pub fn from_json(json: &str) -> Result<Self> {
        if json.len() > MAX_GRAPH_BYTES {
            return Err(invalid(
                None,
                format!("the graph is {} bytes, over the limit of {MAX_GRAPH_BYTES}", json.len()),
            ));
        }
        // Counted before parsing: what parsing allocates grows with the values, not the bytes.
        if more_json_values_than(json, MAX_JSON_VALUES) {
            return Err(invalid(
                None,
                format!(
                    "the graph holds more than {MAX_JSON_VALUES} JSON values (object keys included), over the limit"
                ),
            ));
        }
        // serde_json's recursion limit (128) stays on: hostile nesting is an error here,
        // not a stack overflow.
        let value: Value = serde_json::from_str(json).map_err(|e| invalid(None, format!("not valid JSON: {e}")))?;
        // serde_json reads an integer beyond 64 bits as the nearest float: refused instead.
        if let Some((node, token)) = integer_beyond_64_bits(json) {
            return Err(invalid(node.as_deref(), format!("the integer {} does not fit in 64 bits", shorten(token))));
        }
        // serde_json reads the integer `-0` as the float -0.0: read as the integer 0 instead.
        let value = match negative_zero_integers_as_zero(json) {
            Some(json) => serde_json::from_str(&json).map_err(|e| invalid(None, format!("not valid JSON: {e}")))?,
            None => value,
        };
        Self::from_value(value)
    }

    /// Validates a graph already parsed into a JSON value; see [`WorkflowGraph::from_json`].
    fn from_value(value: Value) -> Result<Self> {
        let Value::Object(top) = value else {
            return Err(invalid(None, "the graph must be a JSON object of node id to node"));
        };
        if top.is_empty() {
            return Err(invalid(None, "the graph has no nodes"));
        }
        if top.len() > MAX_NODES {
            return Err(invalid(None, format!("the graph has {} nodes, over the limit of {MAX_NODES}", top.len())));
        }
        let mut nodes = BTreeMap::new();
        for (id, node) in top {
            let node = parse_node(&id, node)?;
            nodes.insert(id, node);
        }
        // Links: well-formed, to existing nodes, never to the node itself.
        for (id, node) in &nodes {
            for (input, value) in &node.inputs {
                match classify(value) {
                    Input::Literal => {
                        let depth = depth_beyond(value, MAX_INPUT_DEPTH);
                        if depth > MAX_INPUT_DEPTH {
                            return Err(invalid(
                                Some(id),
                                format!("input {:?} nests deeper than {MAX_INPUT_DEPTH} levels", shorten(input)),
                            ));
                        }
                    }
                    Input::BadLink(why) => {
                        return Err(invalid(
                            Some(id),
                            format!("input {:?} is a malformed link: {why}", shorten(input)),
                        ));
                    }
                    Input::Link(from, _) if from == id => {
                        return Err(invalid(Some(id), format!("input {:?} links to the node itself", shorten(input))));
                    }
                    Input::Link(from, _) if !nodes.contains_key(from) => {
                        return Err(invalid(
                            Some(id),
                            format!(
                                "input {:?} links to node {:?}, which does not exist",
                                shorten(input),
                                shorten(from)
                            ),
                        ));
                    }
                    Input::Link(..) => {}
                }
            }
        }
        let mut graph = WorkflowGraph { nodes, output: (String::new(), 0) };
        let order = Order::new(&graph.nodes);
        order.topological()?;
        graph.output = (order.default_output().to_owned(), 0);
        let canonical = graph.canonical_len();
        if canonical > MAX_GRAPH_BYTES as u64 {
            return Err(invalid(
                None,
                format!("the graph's canonical encoding is {canonical} bytes, over the limit of {MAX_GRAPH_BYTES}"),
            ));
        }
        Ok(graph)
    }

    /// The graph in the API format: the nodes only (not the chosen output), compact, with
    /// node ids and input names sorted by their bytes and no extra node keys (`_meta` is
    /// dropped). [`WorkflowGraph::from_json`] reads it back to an equal graph once the
    /// output is chosen again.
    pub fn to_json(&self) -> String {
        let mut out = Vec::new();
        self.write_canonical(&mut out).expect("writing to a Vec cannot fail");
        String::from_utf8(out).expect("serde_json writes UTF-8")
    }

    /// The nodes by id.
    pub fn nodes(&self) -> &BTreeMap<String, Node> {
        &self.nodes
    }

    /// The node and output index that give the value.
    pub fn output(&self) -> (&str, u32) {
        (&self.output.0, self.output.1)
    }

    /// Chooses the node and output index that give the value.
    ///
    /// # Errors
    /// [`Error::InvalidGraph`] naming `node_id` if the graph has no such node, or if
    /// `index` is 256 or more.
    pub fn with_output(mut self, node_id: &str, index: u32) -> Result<Self> {
        if !self.nodes.contains_key(node_id) {
            return Err(invalid(Some(node_id), "no such node to take the output from"));
        }
        if index >= MAX_OUTPUT_INDEX {
            return Err(invalid(
                Some(node_id),
                format!("output index {index} is over the limit of {}", MAX_OUTPUT_INDEX - 1),
            ));
        }
        self.output = (node_id.to_owned(), index);
        Ok(self)
    }

    /// A stable 128-bit hash of the graph and its chosen output.
    ///
    /// xxh3-128 over a fixed prefix, the canonical API JSON of [`WorkflowGraph::to_json`]
    /// (sorted node ids, sorted input names, canonical literals), and the output. Equal in
    /// every process, run and version of this crate for the same nodes and output, whatever
    /// the key order, whitespace or `_meta` of the text it was parsed from. Costs one pass
    /// over the graph; callers that need it often should keep it.
    pub fn content_hash(&self) -> u128 {
        let mut hasher = HashWriter(xxhash_rust::xxh3::Xxh3::new());
        hasher.0.update(HASH_DOMAIN);
        self.write_canonical(&mut hasher).expect("hashing cannot fail");
        hasher.0.update(b"\0");
        serde_json::to_writer(&mut hasher, &self.output.0).expect("hashing cannot fail");
        hasher.0.update(&self.output.1.to_le_bytes());
        hasher.0.digest128()
    }

    /// Every node id, dependencies before the nodes that link to them; among nodes ready
    /// at the same time, the smallest id first (numeric ids by value and before the others,
    /// which compare as strings). Deterministic.
    pub fn topological_order(&self) -> Vec<&str> {
        Order::new(&self.nodes).topological().expect("a parsed graph has no cycle")
    }

    /// The links of `node_id`'s inputs, by input name: `(input, from node, output index)`.
    /// Empty if the node has no links or does not exist.
    pub fn links(&self, node_id: &str) -> Vec<(&str, &str, u32)> {
        let Some(node) = self.nodes.get(node_id) else { return Vec::new() };
        let mut links: Vec<(&str, &str, u32)> = node
            .inputs
            .iter()
            .filter_map(|(input, value)| match classify(value) {
                Input::Link(from, index) => Some((input.as_str(), from, index)),
                _ => None,
            })
            .collect();
        links.sort_unstable();
        links
    }

    fn canonical_len(&self) -> u64 {
        let mut counter = CountWriter(0);
        self.write_canonical(&mut counter).expect("counting cannot fail");
        counter.0
    }

    /// Writes the canonical API JSON: compact, keys sorted by their bytes, scalars as
    /// serde_json writes them.
    fn write_canonical(&self, out: &mut dyn io::Write) -> io::Result<()> {
        out.write_all(b"{")?;
        for (i, (id, node)) in self.nodes.iter().enumerate() {
            if i > 0 {
                out.write_all(b",")?;
            }
            serde_json::to_writer(&mut *out, id)?;
            out.write_all(b":{\"class_type\":")?;
            serde_json::to_writer(&mut *out, &node.class_type)?;
            out.write_all(b",\"inputs\":")?;
            write_object(&node.inputs, out)?;
            out.write_all(b"}")?;
        }
        out.write_all(b"}")
    }
}

/// Writes a JSON object with its keys sorted by their bytes, whatever order `Map` keeps
/// (serde_json's `preserve_order` feature may be on in the build).
fn write_object(map: &Map<String, Value>, out: &mut dyn io::Write) -> io::Result<()> {
    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    out.write_all(b"{")?;
    for (i, (key, value)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.write_all(b",")?;
        }
        serde_json::to_writer(&mut *out, key)?;
        out.write_all(b":")?;
        write_value(value, out)?;
    }
    out.write_all(b"}")
}

/// Writes a JSON value canonically. Recursion is bounded: inputs nest at most
/// [`MAX_INPUT_DEPTH`] deep in a parsed graph.
fn write_value(value: &Value, out: &mut dyn io::Write) -> io::Result<()> {
    match value {
        Value::Array(items) => {
            out.write_all(b"[")?;
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.write_all(b",")?;
                }
                write_value(item, out)?;
            }
            out.write_all(b"]")
        }
        Value::Object(map) => write_object(map, out),
        scalar => serde_json::to_writer(out, scalar).map_err(io::Error::other),
    }
}

struct HashWriter(xxhash_rust::xxh3::Xxh3);

impl io::Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct CountWriter(u64);

impl io::Write for CountWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn parse_node(id: &str, node: Value) -> Result<Node> {
    if id.is_empty() {
        return Err(invalid(Some(id), "a node id must not be empty"));
    }
    if id.len() > MAX_NODE_ID_BYTES {
        return Err(invalid(
            Some(id),
            format!("the node id is {} bytes, over the limit of {MAX_NODE_ID_BYTES}", id.len()),
        ));
    }
    let Value::Object(mut fields) = node else {
        return Err(invalid(Some(id), "a node must be a JSON object with \"class_type\" and \"inputs\""));
    };
    let class_type = match fields.remove("class_type") {
        Some(Value::String(s)) if !s.is_empty() => s,
        Some(Value::String(_)) => return Err(invalid(Some(id), "\"class_type\" is empty")),
        Some(_) => return Err(invalid(Some(id), "\"class_type\" is not a string")),
        None => return Err(invalid(Some(id), "\"class_type\" is missing")),
    };
    let inputs = match fields.remove("inputs") {
        Some(Value::Object(inputs)) => inputs,
        None => Map::new(),
        Some(_) => return Err(invalid(Some(id), "\"inputs\" is not a JSON object")),
    };
    Ok(Node { class_type, inputs })
}

/// The dependency structure of a set of nodes, by position in id order.
struct Order<'g> {
    /// Node ids, sorted by [`cmp_ids`]; positions below are into this.
    ids: Vec<&'g str>,
    /// For each node, the nodes that link to it (one entry per link).
    dependents: Vec<Vec<usize>>,
    /// For each node, how many links it has (to other nodes).
    dependencies: Vec<usize>,
}

impl<'g> Order<'g> {
    /// Builds the structure; links to missing nodes are skipped (checked before).
    fn new(nodes: &'g BTreeMap<String, Node>) -> Self {
        let mut ids: Vec<&str> = nodes.keys().map(String::as_str).collect();
        ids.sort_unstable_by(|a, b| cmp_ids(a, b));
        let position: BTreeMap<&str, usize> = ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        let mut dependents = vec![Vec::new(); ids.len()];
        let mut dependencies = vec![0; ids.len()];
        for (i, id) in ids.iter().enumerate() {
            for value in nodes[*id].inputs.values() {
                if let Input::Link(from, _) = classify(value)
                    && let Some(&j) = position.get(from)
                {
                    dependents[j].push(i);
                    dependencies[i] += 1;
                }
            }
        }
        Order { ids, dependents, dependencies }
    }

    /// Kahn's algorithm with a heap of ready nodes, smallest id first.
    fn topological(&self) -> Result<Vec<&'g str>> {
        let mut waiting = self.dependencies.clone();
        let mut ready: BinaryHeap<Reverse<usize>> =
            (0..self.ids.len()).filter(|&i| waiting[i] == 0).map(Reverse).collect();
        let mut order = Vec::with_capacity(self.ids.len());
        while let Some(Reverse(i)) = ready.pop() {
            order.push(self.ids[i]);
            for &d in &self.dependents[i] {
                waiting[d] -= 1;
                if waiting[d] == 0 {
                    ready.push(Reverse(d));
                }
            }
        }
        if order.len() == self.ids.len() {
            return Ok(order);
        }
        Err(self.cycle_error(&waiting))
    }

    /// Names a node on a cycle. Every node Kahn's algorithm left waits on another one left;
    /// following those from any of them must come back around.
    fn cycle_error(&self, waiting: &[usize]) -> Error {
        // For each node left, one node left that it links to.
        let mut waits_on = vec![usize::MAX; self.ids.len()];
        for (from, dependents) in self.dependents.iter().enumerate() {
            if waiting[from] > 0 {
                for &d in dependents {
                    if waiting[d] > 0 {
                        waits_on[d] = from;
                    }
                }
            }
        }
        let start = (0..self.ids.len()).find(|&i| waiting[i] > 0).expect("a node is left");
        let mut seen = vec![false; self.ids.len()];
        let mut at = start;
        while !seen[at] {
            seen[at] = true;
            at = waits_on[at];
        }
        // `at` is on the cycle: walk it once, and name its smallest node.
        let mut cycle = vec![at];
        let mut next = waits_on[at];
        while next != at {
            cycle.push(next);
            next = waits_on[next];
        }
        let first = cycle.iter().enumerate().min_by_key(|&(_, &n)| n).map_or(0, |(k, _)| k);
        cycle.rotate_left(first);
        // Shown as the walk went: "a" → "b" reads "a" links to "b".
        const SHOWN: usize = 8;
        let mut path: Vec<String> = cycle.iter().take(SHOWN).map(|&n| format!("{:?}", shorten(self.ids[n]))).collect();
        if cycle.len() > SHOWN {
            path.push(format!("… ({} nodes)", cycle.len()));
        }
        path.push(format!("{:?}", shorten(self.ids[cycle[0]])));
        invalid(Some(self.ids[cycle[0]]), format!("the node is on a cycle of links: {}", path.join(" → ")))
    }

    /// The greatest sink.
    fn default_output(&self) -> &'g str {
        let sink =
            (0..self.ids.len()).rev().find(|&i| self.dependents[i].is_empty()).expect("an acyclic graph has a sink");
        self.ids[sink]
    }
}

impl PartialEq for WorkflowGraph {
    fn eq(&self, other: &Self) -> bool {
        self.output == other.output
            && self.nodes.len() == other.nodes.len()
            && self.nodes.iter().zip(&other.nodes).all(|((id, a), (other_id, b))| {
                id == other_id && a.class_type == b.class_type && same_object(&a.inputs, &b.inputs)
            })
    }
}

/// Whether two JSON objects are the same, as the canonical encoding writes them.
fn same_object(a: &Map<String, Value>, b: &Map<String, Value>) -> bool {
    a.len() == b.len() && a.iter().all(|(key, v)| b.get(key).is_some_and(|w| same_value(v, w)))
}

/// Whether two JSON values are the same, as the canonical encoding writes them: unlike
/// `Value`'s `==`, floats compare by their bits, so `-0.0` is not `0.0`. Recursion is
/// bounded: inputs nest at most [`MAX_INPUT_DEPTH`] deep in a parsed graph.
fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x == y && x.as_f64().map(f64::to_bits) == y.as_f64().map(f64::to_bits),
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same_value(v, w)),
        (Value::Object(x), Value::Object(y)) => same_object(x, y),
        _ => a == b,
    }
}

impl fmt::Display for WorkflowGraph {
    /// The canonical API JSON, as [`WorkflowGraph::to_json`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_json())
    }
}

/// Human-readable serde form.
#[derive(Serialize, Deserialize)]
struct Readable<N> {
    nodes: N,
    output: (String, u32),
}

/// Binary serde form. `workflow-context`'s `load_graph` decodes it as the tuple
/// `(String, (String, u32))`, which postcard encodes the same, so that a stored graph that
/// fails validation is reported as such (through serde, postcard drops the error's
/// message): keep the two the same.
#[derive(Serialize, Deserialize)]
struct Compact {
    api_json: String,
    output: (String, u32),
}

struct NodesMap<'a>(&'a WorkflowGraph);

impl Serialize for NodesMap<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.nodes.len()))?;
        for (id, node) in &self.0.nodes {
            map.serialize_entry(id, node)?;
        }
        map.end()
    }
}

impl Serialize for WorkflowGraph {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            Readable { nodes: NodesMap(self), output: self.output.clone() }.serialize(serializer)
        } else {
            Compact { api_json: self.to_json(), output: self.output.clone() }.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for WorkflowGraph {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let (graph, (node, index)) = if deserializer.is_human_readable() {
            let r = Readable::<Value>::deserialize(deserializer)?;
            (WorkflowGraph::from_value(r.nodes), r.output)
        } else {
            let c = Compact::deserialize(deserializer)?;
            (WorkflowGraph::from_json(&c.api_json), c.output)
        };
        graph.and_then(|g| g.with_output(&node, index)).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_values_are_counted_on_any_text() {
        let count = |json: &str| (0..100).find(|&limit| !more_json_values_than(json, limit)).unwrap();
        assert_eq!(count(""), 0);
        assert_eq!(count("[1, 2.5e3, -7]"), 4);
        assert_eq!(count(r#"{"a": true, "b": [false, null], "c": {}}"#), 9);
        // Escaped quotes stay inside their string; structure inside strings is text.
        assert_eq!(count(r#"["x\"y", "{[1,2]}", "\\"]"#), 4);
        // Not JSON: still bounded, and never past the text.
        assert_eq!(count(r#"["unterminated"#), 2);
        assert_eq!(count(r#"[1 2 3 truefalse"#), 5);
        // The scan stops once past the limit.
        assert!(more_json_values_than(&"[0,".repeat(1000), 10));
    }
}
