//! Throughput against value size for each tier, through the context, beside the ceilings;
//! and the floors that set a save beside its ceiling.

use std::cell::Cell;
use std::collections::HashMap;
use std::hint::black_box;
use std::time::Instant;

use serde_json::json;
use workflow_context::WorkflowContext;
use workflow_context_benches::ceiling::{self, ReadFile};
use workflow_context_benches::measure::{Subject, gbps, median, rounds, show_secs, three_digits};
use workflow_context_benches::workload::{Content, KIB, MIB, Tier, largest, sizes, value};

use crate::report::{Better, Floor, Section, Series};
use crate::{Res, Run, ok};

/// The columns of the latency table, each a subject's name.
const LATENCY: [&str; 9] = [
    "save shm",
    "save mmap",
    "save redb",
    "first shm",
    "again shm",
    "first mmap",
    "again mmap",
    "first redb",
    "again redb",
];
/// The RAM budget of the contexts here: room for the largest value several times over.
const RAM_BUDGET: u64 = 4 << 30;

/// How many operations one measurement may do: enough to last the target time, but never
/// holding more than 256 MiB of outputs.
fn max_reps(bytes: usize) -> usize {
    ((256 * MIB) / bytes.max(1)).clamp(1, 100_000)
}

/// Bytes of shared memory the section holds at once, at most: the largest value, held, and
/// one measurement's saves of it (as many as [`max_reps`] allows; removed after it).
fn shm_needed(quick: bool) -> u64 {
    let big = largest(quick).bytes;
    (big + max_reps(big) * big) as u64
}

/// Runs `op` `reps` times in one timed batch, keeping what it returns until the batch is
/// timed; returns seconds per operation.
fn batch_keep<T>(reps: usize, mut op: impl FnMut(usize) -> T) -> f64 {
    let mut keep = Vec::with_capacity(reps);
    let t = Instant::now();
    for i in 0..reps {
        keep.push(black_box(op(i)));
    }
    let secs = t.elapsed().as_secs_f64();
    drop(keep);
    secs / reps as f64
}

/// Keys no other measurement uses.
struct Keys(Cell<u64>);

impl Keys {
    fn take(&self, n: usize) -> Vec<String> {
        let first = self.0.replace(self.0.get() + n as u64);
        (first..first + n as u64).map(|i| format!("k{i}")).collect()
    }
}

/// The subjects that save `bytes` through `ctx` into `tier`: a save of new keys, the first
/// load of a value just saved, a load of the value `held` again (already checked), and a
/// load with a copy out.
fn tier_subjects<'a>(
    tier: Tier,
    ctx: &'a WorkflowContext,
    bytes: &'a [u8],
    keys: &'a Keys,
    tag: &str,
) -> Vec<Subject<'a>> {
    let opts = tier.save_options();
    let name = tier.name();
    let save_keys = move |keys: &[String]| {
        for k in keys {
            ok(ctx.save_bytes(k, bytes, opts), "save");
        }
    };
    let remove_keys = move |keys: &[String]| {
        for k in keys {
            ok(ctx.remove(k), "remove");
        }
    };
    let mut out = vec![Subject::new(format!("save {name}{tag}"), move |reps| {
        let keys = keys.take(reps);
        let t = Instant::now();
        save_keys(&keys);
        let secs = t.elapsed().as_secs_f64();
        remove_keys(&keys);
        secs / reps as f64
    })];
    out.push(Subject::new(format!("first {name}{tag}"), move |reps| {
        let keys = keys.take(reps);
        save_keys(&keys);
        let secs = batch_keep(reps, |i| ok(ctx.load_bytes(&keys[i]), "first load"));
        remove_keys(&keys);
        secs
    }));
    if tag.is_empty() {
        out.push(
            Subject::new(format!("again {name}"), move |reps| {
                batch_keep(reps, |_| ok(ctx.load_bytes("held"), "load again"))
            })
            .cap(100_000),
        );
        out.push(Subject::new(format!("copy {name}"), move |reps| {
            batch_keep(reps, |_| ok(ctx.load_bytes("held"), "load copy").to_vec())
        }));
    }
    out
}

/// The ceilings for `text`, measured beside the tiers.
fn ceiling_subjects<'a>(
    run: &'a Run,
    text: &'a [u8],
    warm: &'a mut [u8],
    file: &'a ReadFile,
    packed: &'a [u8],
) -> Vec<Subject<'a>> {
    let len = text.len();
    let dir = &run.dir;
    vec![
        Subject::new("memcpy fresh", move |reps| ceiling::memcpy_fresh(text, reps)),
        Subject::new("memcpy warm", move |reps| ceiling::memcpy_warm(text, warm, reps)),
        Subject::new("fs::write", move |reps| ok(ceiling::fs_write(dir, text, reps), "fs::write")),
        Subject::new("fs::read", move |reps| ok(ceiling::fs_read(file, reps), "fs::read")),
        Subject::new("zstd-1 compress", move |reps| ok(ceiling::zstd_compress(text, reps), "zstd")),
        Subject::new("zstd-1 decompress", move |reps| ok(ceiling::zstd_decompress(packed, len, reps), "unzstd")),
        Subject::new("bare shm write", move |reps| ok(ceiling::shm_write(&run.shm_prefix, text, reps), "shm write")),
    ]
}

/// Throughput tables, the plot's series, and the floors on views.
pub(crate) fn run(run: &mut Run) -> Res<()> {
    // A save that finds shared memory full inside a measurement can only panic, halfway
    // through the run: a `/dev/shm` too small for the section is an error before it starts.
    if let Ok(shm) = rustix::fs::statvfs("/dev/shm") {
        let free = shm.f_bavail.saturating_mul(shm.f_frsize);
        let needed = shm_needed(run.quick);
        if free < needed {
            return Err(format!(
                "/dev/shm has {} MiB free; the throughput section holds up to {} MiB there (the largest value, and \
                 a measurement's saves of it)",
                free / MIB as u64,
                needed / MIB as u64
            )
            .into());
        }
    }
    let ctxs: Vec<(Tier, WorkflowContext)> =
        Tier::ALL.iter().map(|&t| Ok((t, t.context(&run.dir, RAM_BUDGET)?))).collect::<Res<_>>()?;
    let keys = Keys(Cell::new(0));
    let save_cols = ["shm", "mmap", "redb", "redb (noise)"];
    let save_ceilings = ["memcpy fresh", "memcpy warm", "bare shm write", "fs::write", "zstd-1 compress"];
    let load_cols = ["first shm", "first mmap", "first redb", "copy shm", "copy mmap", "copy redb"];
    let load_ceilings = ["memcpy fresh", "fs::read", "zstd-1 decompress"];
    let mut save_tbl = Section::new(
        "Save throughput (GB/s, median)",
        "`save_bytes` of a new key into each tier (log-like text; `redb (noise)`: random bytes), beside the \
         ceilings measured in the same rounds on the same bytes.",
        &[&["size"][..], &save_cols, &save_ceilings, &["text zstd-1 ratio"]].concat(),
    );
    let mut load_tbl = Section::new(
        "Load throughput (GB/s, median)",
        "`first`: the first `load_bytes` of a value in this process (checks its checksum; redb also \
         decompresses). `copy`: `load_bytes(..).to_vec()` of a value already checked. Ceilings on the same bytes.",
        &[&["size"][..], &load_cols, &load_ceilings].concat(),
    );
    let mut lat_tbl = Section::new(
        "Latency per operation (median)",
        "`again`: `load_bytes` of a value this process has loaded before (a view of shared memory or of the \
         mapped file above 64 KiB; a copy below).",
        &[&["size"][..], &LATENCY[..]].concat(),
    );
    let mut series: Vec<Series> = Vec::new();
    let mut add_point = |name: &str, panel: &'static str, ceiling: bool, bytes: usize, gb: f64| {
        let name = name.to_owned();
        match series.iter_mut().find(|s| s.name == name && s.panel == panel) {
            Some(s) => s.points.push((bytes as u64, gb)),
            None => series.push(Series { name, panel, ceiling, points: vec![(bytes as u64, gb)] }),
        }
    };
    // NaN until measured: a figure that was not measured must not pass.
    let mut worst_view = (f64::NAN, String::from("none measured"));
    let mut first_rows = Vec::new();

    for &size in sizes(run.quick) {
        let started = Instant::now();
        let text = value(size.bytes, Content::Text, 1);
        let noise = value(size.bytes, Content::Noise, 2);
        let packed = zstd::bulk::compress(&text, 1)?;
        let file = ReadFile::new(&run.dir, &text)?;
        let mut warm = vec![1u8; size.bytes];
        for (t, ctx) in &ctxs {
            ctx.save_bytes("held", &text, t.save_options())?;
            ctx.load_bytes("held")?;
        }
        let mut subjects = Vec::new();
        for (t, ctx) in &ctxs {
            subjects.extend(tier_subjects(*t, ctx, &text, &keys, ""));
        }
        subjects.extend(tier_subjects(Tier::Redb, &ctxs[2].1, &noise, &keys, " (noise)"));
        subjects.extend(ceiling_subjects(run, &text, &mut warm, &file, &packed));
        rounds(&mut subjects, run.rounds(), run.target(), max_reps(size.bytes));
        let m: HashMap<String, f64> = subjects.iter().map(|s| (s.name.clone(), s.median())).collect();
        drop(subjects);
        let g = |name: &str| gbps(size.bytes, m[name]);
        let cell = |name: &str| three_digits(g(name));

        let save_names = ["save shm", "save mmap", "save redb", "save redb (noise)"];
        save_tbl.row(
            [
                vec![size.label.to_owned()],
                save_names.iter().map(|n| cell(n)).collect(),
                save_ceilings.iter().map(|n| cell(n)).collect(),
                vec![format!("{:.1}", size.bytes as f64 / packed.len() as f64)],
            ]
            .concat(),
        );
        let load_names = ["first shm", "first mmap", "first redb", "copy shm", "copy mmap", "copy redb"];
        load_tbl.row(
            [
                vec![size.label.to_owned()],
                load_names.iter().map(|n| cell(n)).collect(),
                load_ceilings.iter().map(|n| cell(n)).collect(),
            ]
            .concat(),
        );
        lat_tbl.row([vec![size.label.to_owned()], LATENCY.iter().map(|n| show_secs(m[*n])).collect()].concat());
        let secs: serde_json::Map<String, serde_json::Value> = m.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        save_tbl.data(json!({ "size": size, "seconds_per_op": secs, "text_zstd1_bytes": packed.len() }));

        for (name, col) in save_names.iter().zip(save_cols) {
            add_point(col, "save", false, size.bytes, g(name));
        }
        for name in save_ceilings {
            add_point(name, "save", true, size.bytes, g(name));
        }
        for name in load_names {
            add_point(name, "load", false, size.bytes, g(name));
        }
        for name in load_ceilings {
            add_point(name, "load", true, size.bytes, g(name));
        }
        for tier in ["shm", "mmap"] {
            let again = m[&format!("again {tier}")];
            if worst_view.0.is_nan() && worst_view.1 == "none measured" || again.is_nan() || again > worst_view.0 {
                worst_view = (again, format!("{tier}, {}", size.label));
            }
        }
        if size == largest(run.quick) {
            for tier in ["shm", "mmap"] {
                let first = m[&format!("first {tier}")];
                first_rows.push(Floor::info(
                    format!("first `load_bytes` of a {} {tier} value in a process", size.label),
                    show_secs(first),
                    first,
                    format!(
                        "checks the checksum once ({:.2} GB/s); later loads are the view above",
                        gbps(size.bytes, first)
                    ),
                ));
            }
        }
        for (_, ctx) in &ctxs {
            ctx.remove("held")?;
        }
        eprintln!("  throughput {:>12}: {:.1} s", size.label, started.elapsed().as_secs_f64());
    }
    run.floors.push(Floor::new(
        "`load_bytes` view of a RAM or mmap value (again), worst size",
        worst_view.0 * 1e6,
        Better::Lower,
        (20.0, 5.0),
        |v| format!("{} us", three_digits(v)),
        format!(
            "median of repeated loads of a value this process loaded before, worst of every size and of shm and \
             mmap ({}); the first load of a value in a process reads every byte to check its checksum (a damaged \
             value must load as Corrupt, never as garbage), and is reported apart below",
            worst_view.1
        ),
    ));
    run.floors.extend(first_rows);
    run.sections.extend([save_tbl, load_tbl, lat_tbl]);
    run.series.extend(series);
    save_floors(run, &ctxs, &keys)?;
    for (_, ctx) in ctxs {
        ctx.shutdown()?;
    }
    Ok(())
}

/// A save against its ceiling, the two alternating: (median of the per-round ratios
/// ceiling time / save time, median save seconds, median ceiling seconds).
fn versus(run: &Run, save: Subject<'_>, ceiling: Subject<'_>) -> (f64, f64, f64) {
    // Start with the page cache written back: the pair before may have left gigabytes for
    // the kernel to flush on the other core, which this pair would pay for.
    rustix::fs::sync();
    let mut pair = [save, ceiling];
    rounds(&mut pair, if run.quick { 5 } else { 11 }, run.target(), 1);
    let ratios: Vec<f64> = pair[0].samples.iter().zip(&pair[1].samples).map(|(s, c)| c / s).collect();
    (median(&ratios), pair[0].median(), pair[1].median())
}

/// The floors that set a save beside its ceiling, each measured as a pair.
fn save_floors(run: &mut Run, ctxs: &[(Tier, WorkflowContext)], keys: &Keys) -> Res<()> {
    let big = largest(run.quick);
    let text = value(big.bytes, Content::Text, 1);
    let ctx = |tier: Tier| &ctxs.iter().find(|(t, _)| *t == tier).expect("every tier").1;
    fn save<'a>(ctx: &'a WorkflowContext, tier: Tier, bytes: &'a [u8], keys: &'a Keys) -> Subject<'a> {
        tier_subjects(tier, ctx, bytes, keys, "").swap_remove(0)
    }
    let dir = run.dir.clone();

    let (ratio, s, c) = versus(
        run,
        save(ctx(Tier::Shm), Tier::Shm, &text, keys),
        Subject::new("memcpy fresh", |reps| ceiling::memcpy_fresh(&text, reps)),
    );
    run.floors.push(Floor::new(
        format!("{} save into RAM (shm), against memcpy into fresh memory", big.label),
        ratio,
        Better::Higher,
        (0.8, 0.9),
        |v| format!("{v:.2}x"),
        format!(
            "save {} vs memcpy {} (medians; ratio is the median of rounds that alternate)",
            show_secs(s),
            show_secs(c)
        ),
    ));
    let (ratio, s, c) = versus(
        run,
        save(ctx(Tier::Mmap), Tier::Mmap, &text, keys),
        Subject::new("fs::write", |reps| ok(ceiling::fs_write(&dir, &text, reps), "fs::write")),
    );
    run.floors.push(Floor::new(
        format!("{} save to the mmap tier, against fs::write", big.label),
        ratio,
        Better::Higher,
        (0.8, 0.9),
        |v| format!("{v:.2}x"),
        format!("save {} vs fs::write {} in the same directory", show_secs(s), show_secs(c)),
    ));
    drop(text);
    // Every size from 64 KiB (below, a save is its record and its commit, not compression),
    // each against one-thread zstd -1 with its context and buffer warm (as the tier's are).
    // The floor is the worst from 1 MiB; 64 KiB is reported beside it: there the fixed cost
    // of a multi-process redb commit (about 75 us) is as long as the compression itself.
    let mut worst = (f64::NAN, String::from("none measured"));
    let mut per_size = Vec::new();
    for &size in sizes(run.quick).iter().filter(|s| s.bytes >= 64 * KIB) {
        let text = value(size.bytes, Content::Text, 1);
        let (ratio, s, c) = versus(
            run,
            save(ctx(Tier::Redb), Tier::Redb, &text, keys),
            Subject::new("zstd", |reps| ok(ceiling::zstd_compress(&text, reps), "zstd")),
        );
        let detail = format!(
            "{}: {ratio:.2}x (save {}, {:.2} GB/s, vs zstd -1 {}, {:.2} GB/s)",
            size.label,
            show_secs(s),
            gbps(size.bytes, s),
            show_secs(c),
            gbps(size.bytes, c)
        );
        if size.bytes < MIB {
            run.floors.push(Floor::info(
                format!("redb tier save of {} of compressible text, against zstd-1 compress", size.label),
                format!("{ratio:.2}x"),
                ratio,
                format!("{detail}; one thread below 128 KiB, and a commit of about 75 us"),
            ));
            continue;
        }
        if worst.1 == "none measured" || ratio.is_nan() || ratio < worst.0 {
            worst = (ratio, size.label.to_owned());
        }
        per_size.push(detail);
    }
    run.floors.push(Floor::new(
        format!("redb tier save of compressible text, against zstd-1 compress, worst of 1 MiB and up ({})", worst.1),
        worst.0,
        Better::Higher,
        (0.7, 0.8),
        |v| format!("{v:.2}x"),
        format!(
            "{}; zstd on one thread, its context and buffer kept warm; the tier compresses on two threads from 128 KiB",
            per_size.join("; ")
        ),
    ));
    Ok(())
}
