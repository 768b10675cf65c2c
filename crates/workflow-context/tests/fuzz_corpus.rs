//! Replays the fuzz corpus through the fuzz targets' own code, on stable, as an ordinary
//! test: every seed in `fuzz/corpus/<target>/`, and every crash the fuzzer saved in
//! `fuzz/artifacts/<target>/crash-*` (kept as regressions until fixed).
//!
//! The target bodies are `fuzz/src/lib.rs`, included here with `#[path]` (the main
//! workspace cannot depend on the fuzz crate, which is a workspace of its own), so the
//! fuzzer and this test run one copy of the logic.
//!
//! Seed names say what a seed must do: `ok-*` must be accepted (parsed, decoded, run),
//! `bad-*` must be refused with an error; any other file must only not panic. The seeds are
//! written by the ignored test `write_seeds` below:
//! `cargo test -p workflow-context --all-features --test fuzz_corpus -- --ignored write_seeds`.

#[allow(dead_code, unreachable_pub)]
#[path = "../../../fuzz/src/lib.rs"]
mod targets;

use std::fs;
use std::path::{Path, PathBuf};

use targets::{Op, TARGETS};

/// Seeds are committed: keep them few and small.
const MAX_SEEDS: usize = 20;
const MAX_SEED_BYTES: u64 = 64 << 10;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files directly in `dir`, sorted; none if it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> =
        entries.map(|e| e.expect("read corpus entry").path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

fn name(path: &Path) -> &str {
    path.file_name().and_then(|n| n.to_str()).unwrap_or_default()
}

#[test]
fn every_target_has_a_small_seed_corpus() {
    for target in TARGETS {
        assert!(fuzz_dir().join("fuzz_targets").join(format!("{target}.rs")).is_file(), "no fuzz target {target}");
        let seeds = files(&fuzz_dir().join("corpus").join(target));
        assert!(!seeds.is_empty(), "fuzz/corpus/{target} has no seeds");
        assert!(seeds.len() <= MAX_SEEDS, "fuzz/corpus/{target} has {} seeds, over {MAX_SEEDS}", seeds.len());
        assert!(seeds.iter().any(|s| name(s).starts_with("ok-")), "fuzz/corpus/{target} has no valid seed");
        for seed in &seeds {
            let len = fs::metadata(seed).expect("seed metadata").len();
            assert!(len <= MAX_SEED_BYTES, "{} is {len} bytes, over {MAX_SEED_BYTES}", seed.display());
        }
    }
}

#[test]
fn seeds_replay_as_expected() {
    for target in TARGETS {
        for seed in files(&fuzz_dir().join("corpus").join(target)) {
            let data = fs::read(&seed).expect("read seed");
            let accepted = targets::run(target, &data);
            let name = name(&seed);
            if name.starts_with("ok-") {
                assert!(accepted, "{target}: the valid seed {} was refused", seed.display());
            } else if name.starts_with("bad-") {
                assert!(!accepted, "{target}: the invalid seed {} was accepted", seed.display());
            }
        }
    }
}

#[test]
fn crash_artifacts_no_longer_crash() {
    for target in TARGETS {
        for crash in files(&fuzz_dir().join("artifacts").join(target)) {
            if name(&crash).starts_with("crash-") {
                let data = fs::read(&crash).expect("read crash artifact");
                targets::run(target, &data);
            }
        }
    }
}

#[test]
fn op_seeds_decode_to_what_they_were_written_from() {
    for (name, ops) in op_seeds() {
        assert_eq!(decode_ops(&encode_ops(&ops)), ops, "{name}");
    }
}

/// Writes the seed corpus into `fuzz/corpus/` (replacing the files of the same names).
#[test]
#[ignore = "writes the committed seed corpus; run by hand"]
fn write_seeds() {
    let corpus = fuzz_dir().join("corpus");
    for target in TARGETS {
        let _ = fs::remove_dir_all(corpus.join(target));
    }
    let mut seeds: Vec<(&str, String, Vec<u8>)> = Vec::new();
    let mut add = |target: &'static str, name: &str, bytes: Vec<u8>| seeds.push((target, name.to_owned(), bytes));

    for (name, text) in CONFIGS {
        add("config", name, text.as_bytes().to_vec());
    }
    for (name, text) in GRAPHS {
        add("graph", name, text.as_bytes().to_vec());
    }
    for (name, bytes) in record_seeds() {
        add("record", &name, bytes);
    }
    let (exports, journal) = context_seeds();
    for (name, bytes) in exports {
        add("export", &name, bytes);
    }
    for (name, bytes) in journal {
        add("journal", &name, bytes);
    }
    for (name, ops) in op_seeds() {
        add("ops", name, encode_ops(&ops));
    }
    for (target, name, bytes) in seeds {
        let dir = corpus.join(target);
        fs::create_dir_all(&dir).unwrap();
        assert!(targets::run(target, &bytes) == name.starts_with("ok-"), "{target}/{name} does not replay as named");
        fs::write(dir.join(name), bytes).unwrap();
    }
}

const CONFIGS: &[(&str, &str)] = &[
    (
        "ok-comments.json",
        r#"// workflow-context settings for the render machines
{
    /* A quarter of the machine's memory, but never more than 12.5 GiB:
       whichever limit is lower holds. */
    "MAX_RAM_PERCENT": 25,
    "MAX_RAM_GB": 12.5, // GiB, 2^30 bytes
    "CONTEXTS_DIR_NAME": "render_contexts"
}
"#,
    ),
    ("ok-empty.json", "{}"),
    ("ok-nulls.json", r#"{"MAX_RAM_PERCENT": null, "MAX_RAM_GB": 0, "CONTEXTS_DIR_NAME": "farm/contexts"}"#),
    ("bad-unknown-key.json", r#"{"MAX_RAM": 10}"#),
    ("bad-percent.json", r#"{"MAX_RAM_PERCENT": 150}"#),
    ("bad-gb.json", r#"{"MAX_RAM_GB": 1e300}"#),
    ("bad-dir-name.json", r#"{"CONTEXTS_DIR_NAME": "../elsewhere"}"#),
    ("bad-not-object.json", "[25, 12.5]"),
    ("bad-open-comment.json", "{\"MAX_RAM_PERCENT\": 25 /* unterminated"),
];

/// ComfyUI's default text-to-image workflow in the API format, with `_meta` as ComfyUI
/// writes it.
const TXT2IMG: &str = include_str!("../../context-tier-graph/tests/fixtures/txt2img-api.json");

/// Image-to-image with a LoRA and an upscale pass: string ids, nested literals, a node
/// with two dependents, and unicode.
const IMG2IMG: &str = r#"{
  "10": {"class_type": "LoadImage", "inputs": {"image": "portrait.png", "upload": "image"}},
  "11": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
  "12": {"class_type": "LoraLoader", "inputs": {"model": ["11", 0], "clip": ["11", 1], "lora_name": "ink-style.safetensors", "strength_model": 0.8, "strength_clip": 0.75}},
  "13": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["12", 1], "text": "ink drawing of a lighthouse at dusk, 灯台"}},
  "14": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["12", 1], "text": ""}},
  "15": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["11", 2]}},
  "16": {"class_type": "KSamplerAdvanced", "inputs": {"model": ["12", 0], "positive": ["13", 0], "negative": ["14", 0], "latent_image": ["15", 0], "add_noise": "enable", "noise_seed": 42, "steps": 30, "cfg": 6.5, "sampler_name": "dpmpp_2m", "scheduler": "karras", "start_at_step": 10, "end_at_step": 10000, "return_with_leftover_noise": "disable"}},
  "17": {"class_type": "VAEDecode", "inputs": {"samples": ["16", 0], "vae": ["11", 2]}},
  "upscale": {"class_type": "ImageScaleBy", "inputs": {"image": ["17", 0], "upscale_method": "lanczos", "scale_by": 1.5}},
  "save": {"class_type": "SaveImage", "inputs": {"images": ["upscale", 0], "filename_prefix": "img2img/ink", "extra": {"tags": ["ink", "lighthouse"], "grid": [[1, 2], [3, 4]], "note": null}}}
}"#;

const GRAPHS: &[(&str, &str)] = &[
    ("ok-txt2img.json", TXT2IMG),
    ("ok-img2img-upscale.json", IMG2IMG),
    ("ok-single-node.json", r#"{"1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}}}"#),
    (
        "ok-no-inputs.json",
        r#"{"07": {"class_type": "A"}, "7": {"class_type": "B"}, "x": {"class_type": "C", "inputs": {}}}"#,
    ),
    (
        "bad-cycle.json",
        r#"{"1": {"class_type": "A", "inputs": {"x": ["2", 0]}}, "2": {"class_type": "B", "inputs": {"y": ["1", 0]}}}"#,
    ),
    ("bad-missing-node.json", r#"{"1": {"class_type": "A", "inputs": {"x": ["9", 0]}}}"#),
    ("bad-self-link.json", r#"{"1": {"class_type": "A", "inputs": {"x": ["1", 0]}}}"#),
    ("bad-link-index.json", r#"{"1": {"class_type": "A"}, "2": {"class_type": "B", "inputs": {"x": ["1", 256]}}}"#),
    ("bad-no-nodes.json", "{}"),
    ("bad-not-json.json", r#"{"1": {"class_type": "A""#),
];

/// A record seed: the object id (8 bytes, little endian), mode 0 (take the rest as is),
/// then the record.
fn record_seed(id: u64, rec: &[u8]) -> Vec<u8> {
    [&id.to_le_bytes()[..], &[0], rec].concat()
}

/// A record seed that the target seals (`mode` 1: header; 2: header and trailer).
fn sealed_record_seed(id: u64, mode: u8, flags: u8, payload_len: u64, body: &[u8]) -> Vec<u8> {
    [&id.to_le_bytes()[..], &[mode, flags], &payload_len.to_le_bytes(), body].concat()
}

/// A short record seed that the target seals (`mode` 1: header; 2: header and checksum).
fn sealed_short_seed(id: u64, mode: u8, flags: u8, payload_len: u8, body: &[u8]) -> Vec<u8> {
    [&id.to_le_bytes()[..], &[mode | 0x80, flags, payload_len], body].concat()
}

fn record_seeds() -> Vec<(String, Vec<u8>)> {
    use workflow_context::core::ObjectId;
    use workflow_context::core::record::{FLAG_TYPED, HEADER_LEN, encode};
    let small = encode(ObjectId(7), 0, b"a small payload");
    let typed = encode(ObjectId(42), FLAG_TYPED, &[3, 0xb4, 0x01, 0x02, 0x05, b'e', b'u', b'l', b'e', b'r']);
    let page: Vec<u8> = (0..4096u32).map(|i| (i * 31 % 251) as u8).collect();
    let large = encode(ObjectId(u64::MAX - 1), 0, &page);
    let mut flipped = small.clone();
    flipped[10] ^= 0x20;
    let body = &page[..300];
    vec![
        ("ok-empty".into(), record_seed(1, &encode(ObjectId(1), 0, b""))),
        ("ok-small".into(), record_seed(7, &small)),
        ("ok-typed".into(), record_seed(42, &typed)),
        ("ok-4k".into(), record_seed(u64::MAX - 1, &large)),
        ("bad-wrong-id".into(), record_seed(8, &small)),
        ("bad-truncated".into(), record_seed(7, &small[..small.len() - 1])),
        ("bad-extended".into(), record_seed(7, &[&small[..], b"!"].concat())),
        ("bad-payload-flip".into(), record_seed(7, &flipped)),
        ("bad-header-only".into(), record_seed(u64::MAX - 1, &large[..HEADER_LEN])),
        ("bad-flags".into(), sealed_short_seed(7, 2, 0x80, 5, b"flags")),
        ("ok-sealed".into(), sealed_record_seed(9, 2, FLAG_TYPED, 300, body)),
        ("ok-sealed-short".into(), sealed_short_seed(9, 2, FLAG_TYPED, 5, b"typed")),
        ("ok-sealed-header".into(), sealed_record_seed(9, 1, 0, 300, &encode(ObjectId(9), 0, body)[HEADER_LEN..])),
        ("bad-sealed-length".into(), sealed_record_seed(9, 2, 0, 301, body)),
        ("bad-sealed-short-length".into(), sealed_short_seed(9, 2, 0, 6, b"short")),
        // A full record of a payload that has a short one: two records for one payload.
        ("bad-full-form-of-a-short-payload".into(), sealed_record_seed(9, 2, FLAG_TYPED, 5, b"typed")),
    ]
}

/// The records of a journal file, without the room after them (zeros: a frame never has an
/// empty body).
fn committed(journal: &[u8]) -> &[u8] {
    let mut at = 0;
    while let Some(header) = journal.get(at..at + 8) {
        let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        at += 8 + len;
    }
    &journal[..at.min(journal.len())]
}

/// Export files and index journals written by a real context.
#[allow(clippy::type_complexity)]
fn context_seeds() -> (Vec<(String, Vec<u8>)>, Vec<(String, Vec<u8>)>) {
    use workflow_context::{SaveOptions, WorkflowContext};
    let base = tempfile::tempdir().unwrap();
    let ctx = WorkflowContext::builder().contexts_dir(base.path()).max_ram_bytes(64 << 10).create().unwrap();
    let journal_path = ctx.dir().join("journal.0");
    let empty_journal = committed(&fs::read(&journal_path).unwrap()).to_vec();

    let frame: Vec<u8> = (0..3000u32).map(|i| (i % 256) as u8).collect();
    ctx.save_bytes("images/frame-0001", &frame, SaveOptions::new()).unwrap();
    ctx.save("params", &(7u32, "euler".to_string(), vec![1.5f32, 2.0])).unwrap();
    ctx.save_bytes("empty", b"", SaveOptions::new()).unwrap();
    ctx.save_bytes("κ/../latent", &[0x5a; 20_000], SaveOptions::new().use_ram(false)).unwrap();
    ctx.save("seed", &156_680_208_700_286u64).unwrap();
    ctx.save("seed", &42u64).unwrap();
    ctx.remove("seed").unwrap();

    let mut exports = Vec::new();
    for (name, key) in [("ok-bytes", "images/frame-0001"), ("ok-typed", "params"), ("ok-empty", "empty")] {
        let dest = base.path().join(name);
        ctx.export_data(key, &dest, false).unwrap();
        exports.push((name.to_owned(), fs::read(&dest).unwrap()));
    }
    let typed = exports[1].1.clone();
    exports.push(("bad-truncated".into(), typed[..typed.len() - 1].to_vec()));
    exports.push(("bad-extended".into(), [&typed[..], b"\0"].concat()));
    let mut flipped = typed.clone();
    *flipped.last_mut().unwrap() ^= 1;
    exports.push(("bad-payload-flip".into(), flipped));
    let mut version = typed.clone();
    version[8] = 0xff;
    exports.push(("bad-version".into(), version));
    exports.push(("bad-header-only".into(), typed[..32].to_vec()));

    let session = committed(&fs::read(&journal_path).unwrap()).to_vec();
    let mut flipped = session.clone();
    let at = session.len() / 2;
    flipped[at] ^= 0x10;
    // The same records for the target to frame itself: `[body length: u8][body]` each.
    let mut bodies = vec![1u8];
    let mut rest = &session[..];
    while let Some((len, tail)) = rest.split_first_chunk::<4>() {
        let len = u32::from_le_bytes(*len) as usize;
        bodies.push(u8::try_from(len).expect("journal records are short"));
        bodies.extend_from_slice(&tail[4..4 + len]);
        rest = &tail[4 + len..];
    }
    let mut bad_body = bodies.clone();
    bad_body[2] = 0xff;
    // Mode 0: the rest is the journal as is.
    let raw = |bytes: &[u8]| [&[0u8][..], bytes].concat();
    let journal = vec![
        ("ok-empty".to_owned(), raw(&empty_journal)),
        ("ok-session".to_owned(), raw(&session)),
        ("ok-framed".to_owned(), bodies),
        ("bad-framed-record".to_owned(), bad_body),
        ("bad-truncated".to_owned(), raw(&session[..session.len() - 3])),
        ("bad-flip".to_owned(), raw(&flipped)),
        ("bad-huge-frame".to_owned(), raw(&[&session[..], &[0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0][..]].concat())),
    ];
    (exports, journal)
}

/// Operation sequences for the `ops` target.
fn op_seeds() -> Vec<(&'static str, Vec<Op>)> {
    use Op::*;
    let basics = vec![
        Save { key: 0, len: 10, fill: 0xab, to_disk: false },
        Load { key: 0 },
        SaveTyped { key: 1, value: vec![1, 2, 3, 65535] },
        Load { key: 1 },
        Remove { key: 0 },
        Load { key: 0 },
        Remove { key: 0 },
        Export { key: 1 },
        Load { key: 1 },
        Export { key: 1 },
    ];
    let spill = vec![
        Save { key: 0, len: 60_000, fill: 1, to_disk: false },
        Save { key: 1, len: 60_000, fill: 2, to_disk: false },
        Save { key: 2, len: 65_535, fill: 3, to_disk: true },
        Save { key: 3, len: 200, fill: 4, to_disk: true },
        Load { key: 0 },
        Load { key: 1 },
        Load { key: 2 },
        Load { key: 3 },
        Reopen,
        Load { key: 1 },
        Remove { key: 0 },
        Save { key: 4, len: 30_000, fill: 5, to_disk: false },
        Load { key: 4 },
        Export { key: 2 },
        Export { key: 4 },
    ];
    let overwrite = vec![
        Save { key: 5, len: 1, fill: 9, to_disk: false },
        Save { key: 5, len: 65_535, fill: 8, to_disk: false },
        Load { key: 5 },
        SaveTyped { key: 5, value: vec![7; 40] },
        Load { key: 5 },
        Reopen,
        Save { key: 5, len: 4_000, fill: 7, to_disk: true },
        Load { key: 5 },
        Export { key: 5 },
        Load { key: 5 },
        Reopen,
        Reopen,
    ];
    let mut churn = Vec::new();
    for i in 0..40u8 {
        churn.push(match i % 5 {
            0 => Save { key: i, len: u16::from(i) * 1500, fill: i, to_disk: i % 3 == 0 },
            1 => SaveTyped { key: i / 2, value: (0..u16::from(i)).collect() },
            2 => Load { key: i / 3 },
            3 => Remove { key: i / 4 },
            _ => Load { key: i },
        });
    }
    vec![
        ("ok-empty", Vec::new()),
        ("ok-basics", basics),
        ("ok-spill", spill),
        ("ok-overwrite", overwrite),
        ("ok-churn", churn),
    ]
}

/// The bytes that `Vec<Op>::arbitrary_take_rest` decodes to `ops` (arbitrary 1.x):
/// before each element a byte with bit 0 set (a zero byte ends the list), an enum variant
/// as a little-endian `u32` scaled into the variant count, then the fields in order.
fn encode_ops(ops: &[Op]) -> Vec<u8> {
    const VARIANTS: u64 = 6;
    fn variant(out: &mut Vec<u8>, index: u64) {
        let x = ((index << 32) + (1 << 31)) / VARIANTS;
        out.extend_from_slice(&u32::try_from(x).unwrap().to_le_bytes());
    }
    let mut out = Vec::new();
    for op in ops {
        out.push(1);
        match op {
            Op::Save { key, len, fill, to_disk } => {
                variant(&mut out, 0);
                out.push(*key);
                out.extend_from_slice(&len.to_le_bytes());
                out.push(*fill);
                out.push(u8::from(*to_disk));
            }
            Op::SaveTyped { key, value } => {
                variant(&mut out, 1);
                out.push(*key);
                for v in value {
                    out.push(1);
                    out.extend_from_slice(&v.to_le_bytes());
                }
                out.push(0);
            }
            Op::Remove { key } => {
                variant(&mut out, 2);
                out.push(*key);
            }
            Op::Load { key } => {
                variant(&mut out, 3);
                out.push(*key);
            }
            Op::Export { key } => {
                variant(&mut out, 4);
                out.push(*key);
            }
            Op::Reopen => variant(&mut out, 5),
        }
    }
    out.push(0);
    out
}

fn decode_ops(bytes: &[u8]) -> Vec<Op> {
    use arbitrary::Arbitrary;
    Vec::<Op>::arbitrary_take_rest(arbitrary::Unstructured::new(bytes)).unwrap()
}
