//! Many keys: a small save and a small load at 100, 10,000 and 100,000 keys; and opening
//! an existing context.

use std::collections::HashMap;
use std::fs::File;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;
use workflow_context::WorkflowContext;
use workflow_context_benches::ceiling;
use workflow_context_benches::measure::{Subject, best, median, rounds, show_secs, three_digits, worst};
use workflow_context_benches::rng::XorShift;
use workflow_context_benches::workload::{SMALL_STRING, unique_run_id};

use crate::report::{Better, Floor, Section};
use crate::{Res, Run, ok};

/// The key counts compared.
const KEY_COUNTS: [usize; 3] = [100, 10_000, 100_000];
/// How many keys the "hot keys" figures use.
const HOT: usize = 100;

/// A context holding `n` keys of 50-byte strings.
struct Filled {
    n: usize,
    ctx: WorkflowContext,
    keys: Vec<String>,
    /// The same keys and values in a `std` `HashMap`, the reference for scaling.
    map: HashMap<String, String>,
    /// Mean seconds per save while filling it (each a new key).
    fill: f64,
}

fn fill(run: &Run, n: usize) -> Res<Filled> {
    let ctx = WorkflowContext::builder()
        .contexts_dir(&run.dir)
        .max_ram_bytes(1 << 30)
        .run_id(unique_run_id(&format!("keys{n}")))
        .create()?;
    let keys: Vec<String> = (0..n).map(|i| format!("key-{i:06}")).collect();
    let t = Instant::now();
    for k in &keys {
        ctx.save(k, SMALL_STRING)?;
    }
    let fill = t.elapsed().as_secs_f64() / n as f64;
    let map = keys.iter().map(|k| (k.clone(), SMALL_STRING.to_owned())).collect();
    Ok(Filled { n, ctx, keys, map, fill })
}

/// `reps` keys picked at random among the first `among` of `keys`, as owned strings laid
/// out in the order they are used (the caller's own key is in its cache, as a literal
/// would be; what is measured is the store's lookup).
fn picks(rng: &mut XorShift, keys: &[String], among: usize, reps: usize) -> Vec<String> {
    (0..reps).map(|_| keys[rng.below(among)].clone()).collect()
}

/// Seconds per operation of `op` over `keys`.
fn per_op(keys: &[String], mut op: impl FnMut(&String)) -> f64 {
    let t = Instant::now();
    for k in keys {
        op(k);
    }
    t.elapsed().as_secs_f64() / keys.len() as f64
}

/// Seconds per operation of `op` over `keys`, each operation starting only once the one
/// before has returned: the next key's address depends on the answer (always `true` here).
///
/// Why: a lookup alone is short enough for the CPU to start the next one's cache misses while
/// the last one's are still on their way, which a load (hundreds of instructions more per
/// key) never gives it the room to do; chained, the lookups cost what a load's lookup costs.
fn per_op_chained(keys: &[String], mut op: impl FnMut(&String) -> bool) -> f64 {
    let t = Instant::now();
    let mut i = 0;
    let mut done = 0;
    while i < keys.len() {
        // A data dependency, not a branch: the CPU cannot guess past it.
        i += 2 - usize::from(op(&keys[i]));
        done += 1;
    }
    t.elapsed().as_secs_f64() / done.max(1) as f64
}

/// The subjects for one filled context: save and load over all keys and over 100 hot
/// ones, and the `HashMap` reference.
fn subjects_for(f: &Filled) -> Vec<Subject<'_>> {
    let mut out = Vec::new();
    let seed = f.n as u64 * 10;
    let mut among = vec![("all", f.n)];
    if f.n > HOT {
        among.push(("hot", HOT));
    }
    for (label, m) in among {
        let mut rng = XorShift::new(seed + 1);
        out.push(Subject::new(format!("save {label} {}", f.n), move |reps| {
            let keys = picks(&mut rng, &f.keys, m, reps);
            per_op(&keys, |k| ok(f.ctx.save(k, SMALL_STRING), "small save"))
        }));
        let mut rng = XorShift::new(seed + 2);
        out.push(Subject::new(format!("load {label} {}", f.n), move |reps| {
            let keys = picks(&mut rng, &f.keys, m, reps);
            per_op(&keys, |k| {
                black_box(ok(f.ctx.load::<String>(k), "small load"));
            })
        }));
    }
    // The index's share of a load: the same random picks, looked up without reading the value,
    // one after another as a load's lookups are.
    let mut rng = XorShift::new(seed + 2);
    out.push(Subject::new(format!("contains all {}", f.n), move |reps| {
        let keys = picks(&mut rng, &f.keys, f.n, reps);
        per_op_chained(&keys, |k| ok(f.ctx.contains(k), "contains"))
    }));
    // The reference needs its own map to insert into.
    let mut map = f.map.clone();
    let mut rng = XorShift::new(seed + 3);
    out.push(Subject::new(format!("map save all {}", f.n), move |reps| {
        let keys = picks(&mut rng, &f.keys, f.n, reps);
        per_op(&keys, |k| {
            black_box(map.insert(k.clone(), SMALL_STRING.to_owned()));
        })
    }));
    let mut rng = XorShift::new(seed + 4);
    out.push(Subject::new(format!("map load all {}", f.n), move |reps| {
        let keys = picks(&mut rng, &f.keys, f.n, reps);
        per_op(&keys, |k| {
            black_box(f.map.get(k).cloned());
        })
    }));
    out
}

/// The small-value figures and their floors, and opening the same contexts.
pub(crate) fn run(run: &mut Run) -> Res<()> {
    let filled: Vec<Filled> = KEY_COUNTS.iter().map(|&n| fill(run, n)).collect::<Res<_>>()?;
    let mut open_tbl = Section::new(
        "Opening an existing context",
        "`WorkflowContext::builder().contexts_dir(..).run_id(..).open()` in the process that created it, many \
         times, the contexts taking turns; the handle is dropped untimed. `open + load`: the open and then \
         the first `load` of a random key through the new handle (it maps the key table, so its first \
         lookups fault pages in). `fresh`: just filled, one new key per save. `journal just before \
         compaction`: the 100-key context 95 % of the way from one compaction of its index journal to the \
         next, counted in overwrites (the most an open of it replays). `journal files`: their size, with the \
         room for appends that each generation allocates up front (an open reads only the records in \
         them). Ceiling: `fs::read` of the index files in full (`meta`, the journal files and the key \
         table), of which opening maps the table and reads the journal's records.",
        &["context", "journal files", "key table", "median", "best", "open + load", "ceiling: read the index", "opens"],
    );
    let fresh: Vec<(String, &Filled)> = filled.iter().map(|f| (format!("{} keys, fresh", f.n), f)).collect();
    open(run, &mut open_tbl, &fresh)?;

    // The machine's own cost of a key count: one dependent random read over as much memory
    // as each context's key table and values' slots take.
    let mut chases: Vec<ceiling::Chase> = filled
        .iter()
        .map(|f| {
            let table = index_bytes(f.ctx.dir(), "table");
            let usage = f.ctx.usage()?;
            Ok(ceiling::Chase::new((table + usage.ram_usage_bytes) as usize, f.n as u64))
        })
        .collect::<Res<_>>()?;
    let footprints: Vec<usize> = chases.iter().map(ceiling::Chase::bytes).collect();
    let log = File::create(run.dir.join("pwrite-ceiling"))?;
    let mut subjects: Vec<Subject<'_>> = filled.iter().flat_map(subjects_for).collect();
    for (f, chase) in filled.iter().zip(chases.iter_mut()) {
        subjects.push(Subject::new(format!("chase {}", f.n), |reps| chase.run(reps)));
    }
    let line = [7u8; 64];
    subjects.push(Subject::new("pwrite", |reps| ok(ceiling::small_pwrite(&log, &line, reps), "pwrite")));
    subjects.push(Subject::new("copy", |reps| ceiling::memcpy_fresh(SMALL_STRING.as_bytes(), reps)));
    rounds(&mut subjects, run.rounds().max(5), run.target(), 100_000);
    let m: HashMap<String, (f64, f64)> = subjects.iter().map(|s| (s.name.clone(), (s.median(), s.best()))).collect();
    drop(subjects);
    let med = |name: &str| m.get(name).map_or(f64::NAN, |v| v.0);

    let mut tbl = Section::new(
        "Small values at 100, 10,000 and 100,000 keys",
        "Per operation, median of rounds (best in brackets). `save`: `save` of a 50-byte string over an existing \
         key; `load`: `load::<String>` of one; `contains`: the lookup of a load without the value's read, each \
         lookup starting when the one before has returned, as a load's does (unchained, a lookup's cache misses \
         overlap the next one's). `random keys`: picked at random over the whole context, so the \
         index and the values are mostly outside the CPU caches at 100,000 keys; `100 hot keys`: picked among \
         100 keys of the same context (what the index costs without the cache misses). Reference: a `std` \
         `HashMap<String, String>` with the same keys and the same random picks; and one read of a random cycle \
         through as much memory as the context's key table and values' slots take, each read's address coming \
         from the read before (what one cache and TLB miss costs at that size: a lookup cannot avoid a few). \
         For scale, one 64-byte `pwrite` (one system call: a save makes none, since the index lock and the \
         journal append are memory operations). Ceiling: a copy of the 50 bytes into \
         a new allocation (what a load hands back).",
        &["figure", "100 keys", "10,000 keys", "100,000 keys", "100,000 / 100"],
    );
    let last = KEY_COUNTS[KEY_COUNTS.len() - 1];
    let first = KEY_COUNTS[0];
    let cell = |name: &str| m.get(name).map_or("-".into(), |v| format!("{} ({})", show_secs(v.0), show_secs(v.1)));
    let ratio = |prefix: &str, hot: bool| {
        let at_last = med(&format!("{prefix} {} {last}", if hot { "hot" } else { "all" }));
        at_last / med(&format!("{prefix} all {first}"))
    };
    for (prefix, label) in [
        ("save", "small save, random keys"),
        ("save hot", "small save, 100 hot keys"),
        ("map save", "reference: HashMap insert, random keys"),
        ("load", "small load, random keys"),
        ("load hot", "small load, 100 hot keys"),
        ("contains", "its lookup alone (`contains`), random keys"),
        ("map load", "reference: HashMap get + clone, random keys"),
    ] {
        let (op, hot) = match prefix.split_once(' ') {
            Some((op, "hot")) => (op, true),
            _ => (prefix, false),
        };
        let mut cells = vec![label.to_owned()];
        cells.extend(KEY_COUNTS.iter().map(|n| {
            // At 100 keys every key is hot.
            let which = if hot && *n > HOT { "hot" } else { "all" };
            cell(&format!("{op} {which} {n}"))
        }));
        cells.push(format!("{:.2}x", ratio(op, hot)));
        tbl.row(cells);
    }
    let mut cells = vec!["reference: one dependent random read over the key table and values' slots".to_owned()];
    cells.extend(
        KEY_COUNTS
            .iter()
            .zip(&footprints)
            .map(|(n, b)| format!("{} ({})", show_secs(med(&format!("chase {n}"))), show_size(*b))),
    );
    // A ratio of a cache hit to a miss says nothing about the store: left out.
    cells.push(String::new());
    tbl.row(cells);
    let mut cells = vec!["save of a new key (fill)".to_owned()];
    cells.extend(filled.iter().map(|f| show_secs(f.fill)));
    cells.push(format!("{:.2}x", filled[2].fill / filled[0].fill));
    tbl.row(cells);
    tbl.row(vec![
        "for scale: one 64-byte pwrite".into(),
        show_secs(med("pwrite")),
        String::new(),
        String::new(),
        String::new(),
    ]);
    tbl.row(vec![
        "ceiling: copy 50 B into a new allocation".into(),
        show_secs(med("copy")),
        String::new(),
        String::new(),
        String::new(),
    ]);
    tbl.data(json!({ "keys": KEY_COUNTS, "median_and_best_seconds": m, "fill_seconds": filled.iter().map(|f| f.fill).collect::<Vec<_>>() }));

    for (op, limits, ceiling_note) in [
        (
            "save",
            (20.0, 5.0),
            format!("for scale, one 64 B pwrite (a system call; a save makes none) {}", show_secs(med("pwrite"))),
        ),
        ("load", (5.0, 2.0), format!("ceiling: copy into a new allocation {}", show_secs(med("copy")))),
    ] {
        let worst = worst(KEY_COUNTS.iter().map(|n| med(&format!("{op} all {n}"))));
        run.floors.push(Floor::new(
            format!("small {op} (50 B string), worst of 100 to 100,000 keys"),
            worst * 1e6,
            Better::Lower,
            limits,
            |v| format!("{} us", three_digits(v)),
            format!("median per op, random existing keys; {ceiling_note}"),
        ));
        run.floors.push(Floor::new(
            format!("small {op}: per-op cost at 100,000 keys against 100 keys (random keys)"),
            ratio(op, false),
            Better::Lower,
            (1.5, 1.2),
            |v| format!("{v:.2}x"),
            format!(
                "{} vs {}, {:.1} dependent random reads' worth more (one costs {} over the {} of 100,000 keys); \
                 100 hot keys of the 100,000: {:.2}x; a std HashMap with the same picks: {:.2}x{}",
                show_secs(med(&format!("{op} all {last}"))),
                show_secs(med(&format!("{op} all {first}"))),
                (med(&format!("{op} all {last}")) - med(&format!("{op} all {first}"))) / med(&format!("chase {last}")),
                show_secs(med(&format!("chase {last}"))),
                show_size(footprints[footprints.len() - 1]),
                ratio(op, true),
                ratio(&format!("map {op}"), false),
                if op == "load" {
                    format!(
                        "; its lookup alone (`contains`): {} vs {}",
                        show_secs(med(&format!("contains all {last}"))),
                        show_secs(med(&format!("contains all {first}")))
                    )
                } else {
                    String::new()
                }
            ),
        ));
    }
    run.sections.push(tbl);

    // The worst case for opening: the journal just short of compaction. Overwrite until the
    // journal compacts (its generation, in its file name, moves on), count the overwrites of
    // one whole cycle to the next compaction, then overwrite 95 % of a cycle more.
    let small = &filled[0];
    let dir = small.ctx.dir().to_owned();
    let mut rng = XorShift::new(99);
    let mut overwrite_until_compacted = || -> Res<usize> {
        let start = journal_generation(&dir);
        for n in 1..=1_000_000 {
            small.ctx.save(&small.keys[rng.below(small.n)], SMALL_STRING)?;
            if journal_generation(&dir) != start {
                return Ok(n);
            }
        }
        Err("the journal never compacted".into())
    };
    overwrite_until_compacted()?;
    let cycle = overwrite_until_compacted()?;
    let overwrites = cycle * 95 / 100;
    for _ in 0..overwrites {
        small.ctx.save(&small.keys[rng.below(small.n)], SMALL_STRING)?;
    }
    let label = format!(
        "{} keys, journal just before compaction ({overwrites} overwrites of a {cycle}-overwrite cycle)",
        small.n
    );
    open(run, &mut open_tbl, &[(label, small)])?;
    run.sections.push(open_tbl);
    for f in filled {
        f.ctx.shutdown()?;
    }
    Ok(())
}

/// `bytes` in KiB or MiB, for tables.
fn show_size(bytes: usize) -> String {
    let kib = bytes as f64 / 1024.0;
    if kib < 1024.0 { format!("{kib:.0} KiB") } else { format!("{:.1} MiB", kib / 1024.0) }
}

/// The files of a context's index: `meta`, `journal.*` and `table.*`.
fn index_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("journal") || n.starts_with("table") || n == "meta")
        })
        .collect()
}

/// Bytes in the context's journal files (each has its room for appends allocated up front).
fn journal_bytes(dir: &Path) -> u64 {
    index_bytes(dir, "journal")
}

/// The generation of the context's journal: the highest `journal.<n>`.
fn journal_generation(dir: &Path) -> Option<u32> {
    index_files(dir).iter().filter_map(|p| p.file_name()?.to_str()?.strip_prefix("journal.")?.parse().ok()).max()
}

/// Bytes in the context's index files whose names start with `prefix`.
fn index_bytes(dir: &Path, prefix: &str) -> u64 {
    index_files(dir)
        .iter()
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix)))
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Opens each context many times, the contexts taking turns; adds a row and a floor each.
fn open(run: &mut Run, tbl: &mut Section, contexts: &[(String, &Filled)]) -> Res<()> {
    let times = if run.quick { 40 } else { 200 };
    let mut opens: Vec<Vec<f64>> = vec![Vec::new(); contexts.len()];
    let mut reads: Vec<Vec<f64>> = vec![Vec::new(); contexts.len()];
    let mut firsts: Vec<Vec<f64>> = vec![Vec::new(); contexts.len()];
    let mut rng = XorShift::new(5);
    for round in 0..=times {
        for k in 0..contexts.len() {
            let i = (round + k) % contexts.len();
            let ctx = &contexts[i].1.ctx;
            let t = Instant::now();
            let handle = WorkflowContext::builder().contexts_dir(&run.dir).run_id(ctx.run_id()).open()?;
            let secs = t.elapsed().as_secs_f64();
            let keys = &contexts[i].1.keys;
            black_box(handle.load::<String>(&keys[rng.below(keys.len())])?);
            let first = t.elapsed().as_secs_f64();
            drop(handle);
            let files = index_files(ctx.dir());
            let t = Instant::now();
            for p in &files {
                black_box(std::fs::read(p)?);
            }
            let read = t.elapsed().as_secs_f64();
            // Round 0 warms up.
            if round > 0 {
                opens[i].push(secs);
                firsts[i].push(first);
                reads[i].push(read);
            }
        }
    }
    for (i, (label, f)) in contexts.iter().enumerate() {
        let journal = journal_bytes(f.ctx.dir());
        let table = index_bytes(f.ctx.dir(), "table");
        tbl.row(vec![
            label.clone(),
            show_size(journal as usize),
            show_size(table as usize),
            show_secs(median(&opens[i])),
            show_secs(best(&opens[i])),
            show_secs(median(&firsts[i])),
            show_secs(median(&reads[i])),
            opens[i].len().to_string(),
        ]);
        tbl.data(json!({
            "context": label, "keys": f.n, "journal_bytes": journal, "table_bytes": table,
            "median_seconds": median(&opens[i]), "best_seconds": best(&opens[i]),
            "open_and_load_seconds": median(&firsts[i]), "index_read_seconds": median(&reads[i]),
        }));
        run.floors.push(Floor::new(
            format!("opening an existing context: {label} (median)"),
            median(&opens[i]) * 1e3,
            Better::Lower,
            (1.0, 0.2),
            |v| format!("{} ms", three_digits(v)),
            format!(
                "best {}; open and a first load {}; journal files {:.0} KiB; reading the index files in full {}",
                show_secs(best(&opens[i])),
                show_secs(median(&firsts[i])),
                journal as f64 / 1024.0,
                show_secs(median(&reads[i]))
            ),
        ));
    }
    Ok(())
}
