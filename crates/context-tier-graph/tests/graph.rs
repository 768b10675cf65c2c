//! `WorkflowGraph`: parsing, validation, canonical form, hash and order.

use context_core::Error;
use context_tier_graph::WorkflowGraph;

/// ComfyUI's default text-to-image workflow, as "Save (API format)" writes it.
/// (Shared with the fuzz corpus test of `workflow-context`.)
const TXT2IMG: &str = include_str!("fixtures/txt2img-api.json");

/// The same graph: keys in another order, no whitespace, other `_meta`.
const TXT2IMG_SHUFFLED: &str = concat!(
    r#"{"9":{"class_type":"SaveImage","inputs":{"images":["8",0],"filename_prefix":"ComfyUI"}},"#,
    r#""8":{"_meta":{"title":"renamed"},"class_type":"VAEDecode","inputs":{"vae":["4",2],"samples":["3",0]}},"#,
    r#""7":{"class_type":"CLIPTextEncode","inputs":{"clip":["4",1],"text":"text, watermark"}},"#,
    r#""6":{"class_type":"CLIPTextEncode","inputs":{"clip":["4",1],"text":"beautiful scenery nature glass bottle landscape, purple galaxy bottle,"}},"#,
    r#""5":{"class_type":"EmptyLatentImage","inputs":{"batch_size":1,"height":512,"width":512}},"#,
    r#""4":{"class_type":"CheckpointLoaderSimple","inputs":{"ckpt_name":"v1-5-pruned-emaonly.safetensors"}},"#,
    r#""3":{"class_type":"KSampler","inputs":{"latent_image":["5",0],"negative":["7",0],"positive":["6",0],"#,
    r#""model":["4",0],"denoise":1,"scheduler":"normal","sampler_name":"euler","cfg":8,"steps":20,"seed":156680208700286}}}"#
);

fn txt2img() -> WorkflowGraph {
    WorkflowGraph::from_json(TXT2IMG).expect("the default workflow parses")
}

#[test]
fn a_comfyui_graph_parses() {
    let g = txt2img();
    assert_eq!(g.nodes().len(), 7);
    assert_eq!(g.nodes()["3"].class_type, "KSampler");
    assert_eq!(g.nodes()["5"].inputs["width"], 512);
    assert!(!g.nodes()["3"].inputs.contains_key("_meta"));
    assert_eq!(g.output(), ("9", 0), "the sink is SaveImage");
    assert_eq!(g.links("3"), [("latent_image", "5", 0), ("model", "4", 0), ("negative", "7", 0), ("positive", "6", 0)]);
    assert_eq!(g.links("8"), [("samples", "3", 0), ("vae", "4", 2)]);
    assert!(g.links("4").is_empty());
    assert!(g.links("no such node").is_empty());
}

#[test]
fn to_json_round_trips() {
    let g = txt2img();
    let json = g.to_json();
    assert!(!json.contains("_meta") && !json.contains('\n') && json.contains(r#""samples":["3",0]"#), "{json}");
    assert_eq!(WorkflowGraph::from_json(&json).unwrap(), g);
    // With another output chosen, the round trip needs the output chosen again.
    let g = g.with_output("4", 2).unwrap();
    let back = WorkflowGraph::from_json(&g.to_json()).unwrap();
    assert_eq!(back.output(), ("9", 0));
    assert_eq!(back.with_output("4", 2).unwrap(), g);
}

#[test]
fn to_json_is_canonical() {
    let g = WorkflowGraph::from_json(
        r#"{ "b": {"inputs": {"z": {"y": 1, "x": [2.5, null, true]}, "a": ["a", 3]}, "class_type": "B", "_meta": {}},
             "a": {"class_type": "A"} }"#,
    )
    .unwrap();
    assert_eq!(
        g.to_json(),
        r#"{"a":{"class_type":"A","inputs":{}},"b":{"class_type":"B","inputs":{"a":["a",3],"z":{"x":[2.5,null,true],"y":1}}}}"#
    );
    assert_eq!(g.to_string(), g.to_json());
    assert_eq!(WorkflowGraph::from_json(TXT2IMG_SHUFFLED).unwrap().to_json(), txt2img().to_json());
}

#[test]
fn hash_ignores_key_order_whitespace_and_meta() {
    let a = txt2img();
    let b = WorkflowGraph::from_json(TXT2IMG_SHUFFLED).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.content_hash(), b.content_hash());
    assert_eq!(a.content_hash(), a.clone().content_hash());
}

#[test]
fn hash_is_pinned() {
    // Stable across processes, runs and versions: memoized runs are keyed by it. A change
    // here is a change of encoding and must be deliberate.
    let g = WorkflowGraph::from_json(r#"{"1": {"class_type": "Const", "inputs": {"value": 1}}}"#).unwrap();
    assert_eq!(g.content_hash(), 0x410b_209a_7ccd_57ec_b726_39e0_a618_47d5);
    // The encoding: a versioned prefix, the canonical API JSON, NUL, the output node as a
    // JSON string, the output index as 4 little-endian bytes.
    let mut encoding = b"context-tier-graph/workflow-graph/v1\0".to_vec();
    encoding.extend_from_slice(br#"{"1":{"class_type":"Const","inputs":{"value":1}}}"#);
    encoding.extend_from_slice(b"\0\"1\"");
    encoding.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(g.content_hash(), xxhash_rust::xxh3::xxh3_128(&encoding));
}

#[test]
fn hash_changes_with_the_graph() {
    let base = txt2img();
    let h = base.content_hash();
    let variants = [
        TXT2IMG.replace("156680208700286", "156680208700287"),
        TXT2IMG.replace("\"steps\": 20", "\"steps\": 20.0"),
        TXT2IMG.replace("text, watermark", "text, watermark "),
        TXT2IMG.replace("\"vae\": [\"4\", 2]", "\"vae\": [\"4\", 1]"),
        TXT2IMG.replace("\"samples\": [\"3\", 0]", "\"samples\": [\"5\", 0]"),
        TXT2IMG.replace("\"class_type\": \"VAEDecode\"", "\"class_type\": \"VAEDecodeTiled\""),
        TXT2IMG.replace("\"filename_prefix\": \"ComfyUI\", ", ""),
    ];
    for v in &variants {
        let g = WorkflowGraph::from_json(v).unwrap();
        assert_ne!(g.content_hash(), h, "{v}");
    }
    assert_ne!(base.clone().with_output("8", 0).unwrap().content_hash(), h);
    assert_ne!(base.clone().with_output("9", 1).unwrap().content_hash(), h);
    assert_eq!(base.clone().with_output("9", 0).unwrap().content_hash(), h);
}

#[test]
fn topological_order_is_deterministic() {
    // 4 and 5 are ready first; 4 frees 6 and 7; ties go to the smaller id.
    assert_eq!(txt2img().topological_order(), ["4", "5", "6", "7", "3", "8", "9"]);
    assert_eq!(WorkflowGraph::from_json(TXT2IMG_SHUFFLED).unwrap().topological_order(), txt2img().topological_order());
    // Numeric ids by value (10 after 9), before the others.
    let g = WorkflowGraph::from_json(
        r#"{"10": {"class_type": "A"}, "9": {"class_type": "A"}, "b": {"class_type": "A"},
            "a": {"class_type": "A", "inputs": {"x": ["b", 0]}}, "2": {"class_type": "A", "inputs": {"x": ["10", 0]}}}"#,
    )
    .unwrap();
    assert_eq!(g.topological_order(), ["9", "10", "2", "b", "a"]);
}

#[test]
fn default_output_is_the_greatest_sink() {
    let out = |json: &str| WorkflowGraph::from_json(json).unwrap().output().0.to_owned();
    assert_eq!(out(r#"{"9": {"class_type": "A"}, "10": {"class_type": "A"}}"#), "10");
    assert_eq!(out(r#"{"a": {"class_type": "A"}, "b": {"class_type": "A"}}"#), "b");
    assert_eq!(out(r#"{"2": {"class_type": "A"}, "1": {"class_type": "A", "inputs": {"x": ["2", 0]}}}"#), "1");
    assert_eq!(out(r#"{"007": {"class_type": "A"}, "8": {"class_type": "A"}}"#), "8");
    // Non-numeric ids sort after numeric ones.
    assert_eq!(out(r#"{"100": {"class_type": "A"}, "out": {"class_type": "A"}}"#), "out");
    assert_eq!(out(r#"{"only": {"class_type": "A"}}"#), "only");
}

#[test]
fn with_output_refuses_what_is_not_there() {
    let g = txt2img();
    for (node, index, named) in [("42", 0, "42"), ("", 0, ""), ("9", 256, "9"), ("9", u32::MAX, "9")] {
        match g.clone().with_output(node, index) {
            Err(Error::InvalidGraph { node: Some(n), .. }) => assert_eq!(n, named),
            other => panic!("with_output({node:?}, {index}) gave {other:?}"),
        }
    }
    assert_eq!(g.with_output("4", 255).unwrap().output(), ("4", 255));
}

#[test]
fn literals_that_are_not_links() {
    let g = WorkflowGraph::from_json(
        r#"{"1": {"class_type": "A", "inputs": {
            "one": ["1"], "three": ["x", 1, 2], "strings": ["a", "b"], "flag": ["a", true],
            "numbers": [1, 2], "nested": {"x": ["missing", 0]}, "deep": [["missing", 0]], "empty": []
        }}}"#,
    )
    .unwrap();
    assert!(g.links("1").is_empty());
}

#[test]
fn accepted_edges() {
    // Missing inputs, extra keys, the largest index, the longest id, the deepest literal.
    let long = "n".repeat(256);
    let deep = format!("{}1{}", "[".repeat(64), "]".repeat(64));
    let json = format!(
        r#"{{"{long}": {{"class_type": "A", "extra": 1}}, "2": {{"class_type": "B", "inputs": {{"x": ["{long}", 255], "d": {deep}}}}}}}"#
    );
    let g = WorkflowGraph::from_json(&json).unwrap();
    assert_eq!(g.links("2"), [("x", long.as_str(), 255)]);
    assert_eq!(g.output(), ("2", 0));
    assert_eq!(WorkflowGraph::from_json(&g.to_json()).unwrap(), g);
}

#[test]
fn duplicate_keys_keep_the_last() {
    let g = WorkflowGraph::from_json(
        r#"{"1": {"class_type": "A", "inputs": {"x": 1, "x": 2}}, "1": {"class_type": "B", "inputs": {"y": 3, "y": 4}}}"#,
    )
    .unwrap();
    assert_eq!(g.nodes().len(), 1);
    assert_eq!(g.nodes()["1"].class_type, "B");
    assert_eq!(g.nodes()["1"].inputs["y"], 4);
    assert!(!g.nodes()["1"].inputs.contains_key("x"));
}

/// The node an error is expected to name.
enum Names {
    Nothing,
    Node(&'static str),
    Prefix(String),
}

#[test]
fn malformed_graphs_are_refused() {
    use Names::{Node, Nothing};
    let a = r#""a": {"class_type": "A"}"#;
    let long_id = "x".repeat(257);
    let deep_input =
        format!(r#"{{"1": {{"class_type": "A", "inputs": {{"x": {}0{}}}}}}}"#, "[".repeat(65), "]".repeat(65));
    let deep_object =
        format!(r#"{{"1": {{"class_type": "A", "inputs": {{"x": {}0{}}}}}}}"#, "{\"k\":".repeat(70), "}".repeat(70));
    let hostile_input =
        format!(r#"{{"1": {{"class_type": "A", "inputs": {{"x": {}0{}}}}}}}"#, "[".repeat(10_000), "]".repeat(10_000));
    let hostile_top = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let hostile_unclosed = "{\"1\":".repeat(10_000);
    let huge = format!(r#"{{"1": {{"class_type": "A", "inputs": {{"x": "{}"}}}}}}"#, "x".repeat(64 << 20));
    // Small text, but each value parsed takes 32 bytes or more: refused before parsing.
    let too_many_values =
        format!(r#"{{"1": {{"class_type": "A", "inputs": {{"x": [{}0]}}}}}}"#, "0,".repeat(2_000_000));
    let too_many: String = {
        let nodes: Vec<String> = (0..100_001).map(|i| format!(r#""{i}":{{"class_type":"A"}}"#)).collect();
        format!("{{{}}}", nodes.join(","))
    };
    let cases: Vec<(&str, String, Names)> = vec![
        ("not JSON", "{".into(), Nothing),
        ("empty text", "".into(), Nothing),
        ("trailing garbage", format!("{{{a}}} x"), Nothing),
        ("empty object", "{}".into(), Nothing),
        ("array at top", "[]".into(), Nothing),
        ("string at top", r#""graph""#.into(), Nothing),
        ("null at top", "null".into(), Nothing),
        ("node a number", r#"{"1": 5}"#.into(), Node("1")),
        ("node an array", format!(r#"{{{a}, "2": ["A", {{}}]}}"#), Node("2")),
        ("node null", r#"{"1": null}"#.into(), Node("1")),
        ("class_type missing", r#"{"1": {"inputs": {}}}"#.into(), Node("1")),
        ("class_type empty", r#"{"1": {"class_type": ""}}"#.into(), Node("1")),
        ("class_type a number", r#"{"1": {"class_type": 5}}"#.into(), Node("1")),
        ("class_type null", r#"{"1": {"class_type": null}}"#.into(), Node("1")),
        ("class_type an array", r#"{"1": {"class_type": ["A"]}}"#.into(), Node("1")),
        ("inputs an array", r#"{"1": {"class_type": "A", "inputs": []}}"#.into(), Node("1")),
        ("inputs a string", r#"{"1": {"class_type": "A", "inputs": "x"}}"#.into(), Node("1")),
        ("inputs null", r#"{"1": {"class_type": "A", "inputs": null}}"#.into(), Node("1")),
        ("link to a missing node", format!(r#"{{{a}, "b": {{"class_type": "B", "inputs": {{"x": ["c", 0]}}}}}}"#), Node("b")),
        ("link to 01 for 1", r#"{"1": {"class_type": "A"}, "2": {"class_type": "B", "inputs": {"x": ["01", 0]}}}"#.into(), Node("2")),
        ("link index negative", format!(r#"{{{a}, "b": {{"class_type": "B", "inputs": {{"x": ["a", -1]}}}}}}"#), Node("b")),
        ("link index 256", format!(r#"{{{a}, "b": {{"class_type": "B", "inputs": {{"x": ["a", 256]}}}}}}"#), Node("b")),
        ("link index huge", format!(r#"{{{a}, "b": {{"class_type": "B", "inputs": {{"x": ["a", 18446744073709551615]}}}}}}"#), Node("b")),
        ("link index a fraction", format!(r#"{{{a}, "b": {{"class_type": "B", "inputs": {{"x": ["a", 0.5]}}}}}}"#), Node("b")),
        ("link index a float", format!(r#"{{{a}, "b": {{"class_type": "B", "inputs": {{"x": ["a", 1.0]}}}}}}"#), Node("b")),
        ("link index an exponent", format!(r#"{{{a}, "b": {{"class_type": "B", "inputs": {{"x": ["a", 1e2]}}}}}}"#), Node("b")),
        ("link index negative zero float", format!(r#"{{{a}, "b": {{"class_type": "B", "inputs": {{"x": ["a", -0.0]}}}}}}"#), Node("b")),
        ("self link", r#"{"1": {"class_type": "A", "inputs": {"x": ["1", 0]}}}"#.into(), Node("1")),
        (
            "2-cycle",
            r#"{"1": {"class_type": "A", "inputs": {"x": ["2", 0]}}, "2": {"class_type": "A", "inputs": {"x": ["1", 0]}}}"#.into(),
            Node("1"),
        ),
        (
            "3-cycle behind a sink",
            concat!(
                r#"{"9": {"class_type": "Sink", "inputs": {"x": ["6", 0]}}, "5": {"class_type": "A", "inputs": {"x": ["7", 0]}},"#,
                r#""6": {"class_type": "A", "inputs": {"x": ["5", 0]}}, "7": {"class_type": "A", "inputs": {"x": ["6", 0]}},"#,
                r#""1": {"class_type": "Fine"}}"#
            )
            .into(),
            Node("5"),
        ),
        (
            "cycle past a tail into it",
            concat!(
                r#"{"1": {"class_type": "A", "inputs": {"x": ["2", 0]}}, "2": {"class_type": "A", "inputs": {"x": ["3", 0]}},"#,
                r#""3": {"class_type": "A", "inputs": {"x": ["4", 0]}}, "4": {"class_type": "A", "inputs": {"x": ["3", 0]}}}"#
            )
            .into(),
            Node("3"),
        ),
        ("empty node id", r#"{"": {"class_type": "A"}}"#.into(), Node("")),
        ("over-long node id", format!(r#"{{"{long_id}": {{"class_type": "A"}}}}"#), Names::Prefix("x".repeat(64))),
        ("input nested 65 deep", deep_input, Node("1")),
        ("input of objects nested 70 deep", deep_object, Node("1")),
        ("input nested 10,000 deep", hostile_input, Nothing),
        ("top level nested 10,000 deep", hostile_top, Nothing),
        ("10,000 unclosed objects", hostile_unclosed, Nothing),
        ("over 64 MiB", huge, Nothing),
        ("100,001 nodes", too_many, Nothing),
        ("over 2,000,000 JSON values", too_many_values, Nothing),
    ];
    assert!(cases.len() >= 25);
    for (what, json, names) in &cases {
        let err = match WorkflowGraph::from_json(json) {
            Ok(g) => panic!("{what}: accepted as {:.300}", g.to_json()),
            Err(e) => e,
        };
        let Error::InvalidGraph { node, reason } = &err else { panic!("{what}: wrong error {err:?}") };
        assert!(!reason.is_empty(), "{what}");
        match names {
            Nothing => assert_eq!(node, &None, "{what}: {err}"),
            Node(n) => assert_eq!(node.as_deref(), Some(*n), "{what}: {err}"),
            Names::Prefix(p) => {
                let n = node.as_deref().unwrap_or_else(|| panic!("{what}: names no node"));
                assert!(n.starts_with(p.as_str()) && n.ends_with('…') && n.len() < 100, "{what}: {n}");
            }
        }
        // Messages stay short whatever the input.
        assert!(err.to_string().len() < 400, "{what}: {} bytes of message", err.to_string().len());
    }
}

#[test]
fn errors_say_what_is_wrong() {
    let reason = |json: &str| match WorkflowGraph::from_json(json) {
        Err(Error::InvalidGraph { reason, .. }) => reason,
        other => panic!("{other:?}"),
    };
    let r = reason(r#"{"1": {"class_type": "A", "inputs": {"model": ["4", 0]}}}"#);
    assert!(r.contains("\"model\"") && r.contains("\"4\"") && r.contains("does not exist"), "{r}");
    let r = reason(
        r#"{"1": {"class_type": "A", "inputs": {"x": ["2", 0]}}, "2": {"class_type": "A", "inputs": {"x": ["1", 0]}}}"#,
    );
    assert!(r.contains("cycle") && r.contains(r#""1" → "2" → "1""#), "{r}");
    let err = WorkflowGraph::from_json(r#"{"7": {"class_type": "A", "inputs": {"x": ["7", 0]}}}"#).unwrap_err();
    assert_eq!(err.to_string(), r#"invalid workflow graph at node "7": input "x" links to the node itself"#);
}

/// Deterministic xorshift.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn mutated_graphs_never_panic() {
    const INTERESTING: &[u8] = b"{}[]\",:0123456789-.e \\a_\x00\xff";
    let mut rng = Rng(0x5EED_0FC0_FFEE);
    let base = TXT2IMG.as_bytes();
    let mut accepted = 0;
    for _ in 0..2_000 {
        let mut bytes = base.to_vec();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(bytes.len() + 1);
            match rng.below(5) {
                0 if at < bytes.len() => bytes[at] = INTERESTING[rng.below(INTERESTING.len())],
                1 if at < bytes.len() => {
                    bytes.remove(at);
                }
                2 => bytes.insert(at, INTERESTING[rng.below(INTERESTING.len())]),
                3 => {
                    // Repeat a slice: deepens or widens what is there.
                    let len = rng.below(40).min(bytes.len() - at.min(bytes.len()));
                    let piece: Vec<u8> = bytes[at..at + len].to_vec();
                    for _ in 0..1 + rng.below(3) {
                        bytes.splice(at..at, piece.iter().copied());
                    }
                }
                _ => {
                    let len = rng.below(30).min(bytes.len() - at.min(bytes.len()));
                    bytes.drain(at..at + len);
                }
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        match WorkflowGraph::from_json(&text) {
            Ok(g) => {
                accepted += 1;
                // Whatever is accepted is whole: it round-trips, orders and hashes.
                let back = WorkflowGraph::from_json(&g.to_json()).expect("canonical form parses");
                let (node, index) = g.output();
                assert_eq!(back.with_output(node, index).unwrap(), g);
                assert_eq!(g.topological_order().len(), g.nodes().len());
                let _ = g.content_hash();
            }
            Err(Error::InvalidGraph { .. }) => {}
            Err(e) => panic!("wrong error kind: {e:?}"),
        }
    }
    // Some mutations (inside strings, or of numbers) leave a valid graph.
    assert!(accepted > 0);
}

#[test]
fn serde_round_trips_in_json_and_postcard() {
    let g = txt2img().with_output("4", 1).unwrap();

    let json = serde_json::to_string(&g).unwrap();
    assert!(json.starts_with(r#"{"nodes":{"3":"#) && json.ends_with(r#""output":["4",1]}"#), "{json}");
    let back: WorkflowGraph = serde_json::from_str(&json).unwrap();
    assert_eq!(back, g);
    assert_eq!(back.content_hash(), g.content_hash());

    let bytes = postcard::to_allocvec(&g).unwrap();
    let back: WorkflowGraph = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, g);

    // Deserializing validates.
    let bad = r#"{"nodes": {"1": {"class_type": "A", "inputs": {"x": ["1", 0]}}}, "output": ["1", 0]}"#;
    let err = serde_json::from_str::<WorkflowGraph>(bad).unwrap_err();
    assert!(err.to_string().contains("links to the node itself"), "{err}");
    let missing_output = r#"{"nodes": {"1": {"class_type": "A"}}, "output": ["2", 0]}"#;
    assert!(serde_json::from_str::<WorkflowGraph>(missing_output).is_err());
}

#[test]
fn floats_round_trip_exactly_through_the_canonical_json() {
    // Found by the graph fuzz target: without exact float parsing, a literal printed by
    // to_json could parse back as a neighbouring float, changing the graph and its hash.
    let json = r#"{"1": {"class_type": "K", "inputs": {"x": 9.999999999911e+41, "y": [0.1, 1e-300, 2.2250738585072014e-308]}}}"#;
    let g = WorkflowGraph::from_json(json).unwrap();
    let again = WorkflowGraph::from_json(&g.to_json()).unwrap();
    assert_eq!(again, g);
    assert_eq!(again.content_hash(), g.content_hash());
}

#[test]
fn integers_beyond_64_bits_are_not_silently_rounded() {
    // serde_json reads an integer that fits neither u64 nor i64 as the nearest f64: the
    // literal would change (to a float) and two different literals would share a hash.
    let parse = |n: &str| {
        WorkflowGraph::from_json(&format!(r#"{{"1": {{"class_type": "KSampler", "inputs": {{"seed": {n}}}}}}}"#))
    };
    match (parse("18446744073709551616"), parse("18446744073709551617")) {
        (Ok(a), Ok(b)) => {
            assert!(!a.to_json().contains("e+19"), "the integer became a float: {}", a.to_json());
            assert_ne!(a.content_hash(), b.content_hash(), "different literals, one hash");
        }
        // Refusing them is fine too, naming the node and the number.
        (Err(Error::InvalidGraph { node, reason }), Err(_)) => {
            assert_eq!(node.as_deref(), Some("1"));
            assert!(reason.contains("18446744073709551616"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // As a link's output index, the number is an integer over the limit, not "not an integer".
    let err = WorkflowGraph::from_json(
        r#"{"1": {"class_type": "A"}, "2": {"class_type": "B", "inputs": {"x": ["1", 18446744073709551616]}}}"#,
    )
    .unwrap_err();
    assert!(!err.to_string().contains("not an integer"), "{err}");
}

#[test]
fn negative_zero_written_as_an_integer_is_the_integer_zero() {
    // `-0` is an integer (no fraction, no exponent): Python's json, which ComfyUI reads
    // graphs with, gives 0. serde_json alone reads it as the float -0.0.
    let seed = |n: &str| {
        WorkflowGraph::from_json(&format!(r#"{{"1": {{"class_type": "KSampler", "inputs": {{"seed": {n}}}}}}}"#))
            .unwrap()
    };
    let (minus, zero) = (seed("-0"), seed("0"));
    assert_eq!(minus.nodes()["1"].inputs["seed"].as_u64(), Some(0), "{}", minus.to_json());
    assert_eq!(minus, zero);
    assert_eq!(minus.content_hash(), zero.content_hash());
    // As a link's output index it is output 0, not "not an integer".
    let g = WorkflowGraph::from_json(
        r#"{"1": {"class_type": "A"}, "2": {"class_type": "B", "inputs": {"x": ["1", -0], "y": [-0, "-0"]}}}"#,
    )
    .unwrap();
    assert_eq!(g.links("2"), [("x", "1", 0)]);
    assert_eq!(g.nodes()["2"].inputs["y"], serde_json::json!([0, "-0"]), "strings are left alone");
    // The float stays a float.
    assert!(seed("-0.0").to_json().contains(r#""seed":-0.0"#));
    assert!(seed("-0e0").to_json().contains(r#""seed":-0.0"#));
}

#[test]
fn graphs_that_compare_equal_hash_the_same() {
    let seed = |n: &str| {
        WorkflowGraph::from_json(&format!(r#"{{"1": {{"class_type": "KSampler", "inputs": {{"seed": {n}}}}}}}"#))
            .unwrap()
    };
    for (a, b) in
        [("0.0", "-0.0"), ("[0.0]", "[-0.0]"), ("{\"x\": 0.0}", "{\"x\": -1e-400}"), ("1", "1.0"), ("1.0", "1e0")]
    {
        let (a, b) = (seed(a), seed(b));
        assert_eq!(a == b, a.content_hash() == b.content_hash(), "{} and {}", a.to_json(), b.to_json());
    }
}
