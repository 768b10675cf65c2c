//! The bodies of the fuzz targets, one function per target.
//!
//! Each target in `fuzz_targets/` is one line that calls a function here, and the corpus
//! replay test of the main workspace (`crates/workflow-context/tests/fuzz_corpus.rs`)
//! includes this very file with `#[path]`, so the fuzzer and CI run one copy of the logic.
//! That is why this file uses nothing but `workflow_context`, `context_core`,
//! `context_tier_graph`, `xxhash_rust`, `arbitrary` and `tempfile`, which both places can
//! reach.
//!
//! Every function panics (a crash, to libFuzzer) when the code under test breaks a
//! promise: a decoder that panics instead of returning an error, a round trip that does not
//! come back equal, a context that disagrees with the `HashMap` model. Each returns whether
//! its input was accepted, so the replay test can check that the valid seeds still are.

use arbitrary::{Arbitrary, Unstructured};
use context_core::ObjectId;
use context_core::record::{self, RecordHeader};
use context_tier_graph::WorkflowGraph;
use workflow_context::fuzzing;

#[path = "model.rs"]
mod model;
pub use model::{Op, run_ops};

/// The fuzz targets, by name (also the names of the directories in `corpus/`).
pub const TARGETS: &[&str] = &["config", "record", "export", "journal", "graph", "ops"];

/// Runs target `name` on `data`, as its fuzz target does. Returns whether the input was
/// accepted (parsed, decoded, or ran as an op sequence); panics on a bug.
///
/// # Panics
/// On an unknown target name, or when the target finds a bug.
pub fn run(name: &str, data: &[u8]) -> bool {
    match name {
        "config" => config(data),
        "record" => record(data),
        "export" => export(data),
        "journal" => journal(data),
        "graph" => graph(data),
        "ops" => ops(data),
        _ => panic!("no fuzz target named {name:?}"),
    }
}

/// `config`: the configuration file parser, on the input as (lossy) UTF-8 text.
pub fn config(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    fuzzing::parse_config(&text).is_ok()
}

/// `record`: the value record decoder. The input is `[object id: u64 LE][mode: u8][rest]`;
/// the record is checked against that object id. The header check and the payload checksum
/// are 64-bit hashes that libFuzzer cannot forge, so besides taking `rest` as the record
/// as is, the target can seal it itself to reach the checks behind the hashes:
///
/// - `(mode & 0x7f) % 3 == 0`: `rest` is the record.
/// - `(mode & 0x7f) % 3 == 1`: `rest` is `[flags: u8][payload length: u64 LE][body]`; the
///   record is the encoded header of those fields (with a correct header check), then
///   `body`.
/// - `(mode & 0x7f) % 3 == 2`: as 1, then the correct payload checksum of `body` as the
///   trailer.
/// - With bit 7 of `mode` set, modes 1 and 2 seal a short record instead: `rest` is
///   `[flags: u8][payload length: u8][body]`, the record is the short header of those
///   fields, then `body`; in mode 2 the correct checksum of both follows.
pub fn record(data: &[u8]) -> bool {
    let Some((id, rest)) = data.split_first_chunk::<8>() else { return false };
    let id = ObjectId(u64::from_le_bytes(*id));
    let Some((&mode, rest)) = rest.split_first() else { return false };
    let sealing = (mode & 0x7f) % 3;
    if sealing == 0 {
        return check_record(rest, id);
    }
    if mode & 0x80 != 0 {
        let Some(([flags, payload_len], body)) = rest.split_first_chunk::<2>() else { return false };
        let mut rec = vec![record::SHORT_MARKER, *flags, *payload_len];
        rec.extend_from_slice(body);
        if sealing == 2 {
            rec.extend_from_slice(&record::checksum(id, &rec).to_le_bytes());
        }
        return check_record(&rec, id);
    }
    let Some((&flags, rest)) = rest.split_first() else { return false };
    let Some((payload_len, body)) = rest.split_first_chunk::<8>() else { return false };
    let payload_len = u64::from_le_bytes(*payload_len);
    let mut rec = RecordHeader { flags, payload_len, object_id: id }.encode().to_vec();
    rec.extend_from_slice(body);
    if sealing == 2 {
        rec.extend_from_slice(&record::checksum(id, body).to_le_bytes());
    }
    check_record(&rec, id)
}

fn check_record(rec: &[u8], id: ObjectId) -> bool {
    let header = RecordHeader::decode(rec);
    let unverified = record::check(rec, id, false);
    match record::check(rec, id, true) {
        Ok(h) => {
            // A short record has no header of its own to decode.
            if rec[0] != record::SHORT_MARKER {
                assert_eq!(header, Ok(h), "check accepted a record whose header does not decode alike");
            }
            assert_eq!(record::payload_len(rec.len() as u64), Some(h.payload_len));
            assert_eq!(unverified, Ok(h), "a record that passes the full check passes the quick one");
            assert_eq!(h.object_id, id);
            assert_eq!(record::payload(rec).len() as u64, h.payload_len);
            assert_eq!(h.record_len(), rec.len() as u64);
            // Re-encoding the accepted payload gives the same bytes back.
            assert_eq!(record::encode(id, h.flags, record::payload(rec)), rec, "record does not re-encode alike");
            true
        }
        Err(_) => false,
    }
}

/// `export`: the export file decoder.
pub fn export(data: &[u8]) -> bool {
    match fuzzing::decode_export(data) {
        Ok(len) => {
            assert!(len <= data.len(), "a {}-byte export file claims a {len}-byte payload", data.len());
            true
        }
        Err(_) => false,
    }
}

/// `journal`: the index journal frame decoder. The input is `[mode: u8][rest]`. Each frame
/// carries the low 32 bits of a 64-bit hash of its body, so besides taking `rest` as the
/// journal as is (even `mode`), the target can frame it itself (odd `mode`): `rest` is then
/// a list of `[body length: u8][body]`, each made a frame with a correct length and
/// checksum, so that the fuzzer reaches the record decoder behind the checksum.
pub fn journal(data: &[u8]) -> bool {
    let Some((&mode, rest)) = data.split_first() else { return false };
    let journal = if mode % 2 == 0 { rest.to_vec() } else { frame(rest) };
    match fuzzing::decode_journal(&journal) {
        Ok(records) => {
            // Every frame has an 8-byte header.
            assert!(records <= journal.len() / 8, "{} bytes decoded to {records} records", journal.len());
            true
        }
        Err(_) => false,
    }
}

/// Frames `[body length: u8][body]...` as the journal does: `[body length: u32 LE][xxh3-64 of
/// the body, low 32 bits, LE][body]`. A last body shorter than announced is taken as is.
pub fn frame(mut bodies: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bodies.len() * 2);
    while let Some((&len, rest)) = bodies.split_first() {
        let (body, next) = rest.split_at(usize::from(len).min(rest.len()));
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&(xxhash_rust::xxh3::xxh3_64(body) as u32).to_le_bytes());
        out.extend_from_slice(body);
        bodies = next;
    }
    out
}

/// `graph`: the workflow graph parser, on the input as (lossy) UTF-8 text. A graph it
/// accepts must come back equal from its own canonical JSON, with the same content hash.
pub fn graph(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let Ok(g) = WorkflowGraph::from_json(&text) else { return false };
    let canonical = g.to_json();
    let again = match WorkflowGraph::from_json(&canonical) {
        Ok(again) => again,
        Err(e) => panic!("the canonical JSON of an accepted graph is refused: {e}\n{canonical}"),
    };
    assert_eq!(again, g, "the graph does not round-trip through its canonical JSON");
    assert_eq!(again.content_hash(), g.content_hash(), "the content hash changed across the round trip");
    assert_eq!(again.to_json(), canonical, "the canonical JSON is not a fixed point");
    let order = g.topological_order();
    assert_eq!(order.len(), g.nodes().len());
    for id in &order {
        for (_, from, _) in g.links(id) {
            let before = order.iter().position(|n| n == &from);
            let at = order.iter().position(|n| n == id);
            assert!(before < at, "{from:?} comes after {id:?}, which links to it");
        }
    }
    true
}

/// `ops` on raw bytes: decodes them as the fuzz target's `Vec<Op>` argument is decoded
/// (`Arbitrary::arbitrary_take_rest`), then runs [`run_ops`].
pub fn ops(data: &[u8]) -> bool {
    match Vec::<Op>::arbitrary_take_rest(Unstructured::new(data)) {
        Ok(ops) => {
            run_ops(&ops);
            true
        }
        Err(_) => false,
    }
}
