//! Peak memory of a save and a load, each measured in a fresh child process.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use serde_json::json;
use workflow_context::WorkflowContext;
use workflow_context_benches::measure::{reset_peak_rss, status_kib};
use workflow_context_benches::workload::{Content, FRAME_LEN, MIB, Size, Tier, largest, value};

use crate::report::{Better, Floor, Section};
use crate::{CHILD_FLAG, Res, Run};

/// What a child measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Op {
    /// `save_bytes` of a value the process already holds.
    Save,
    /// The first `load_bytes` of a value in the process, kept.
    Load,
    /// The first `load_bytes(..).to_vec()` in the process, kept.
    LoadCopy,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Save => "save_bytes",
            Op::Load => "load_bytes (first, kept)",
            Op::LoadCopy => "load_bytes().to_vec()",
        }
    }
}

/// What one child process is asked to do.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Job {
    dir: PathBuf,
    run_id: String,
    tier: Tier,
    len: usize,
    op: Op,
    key: String,
}

/// What a child reports, in KiB: the peak above the baseline, and how the resident set
/// changed (anonymous, shared memory, file pages) from the baseline to the peak moment.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Peak {
    reset: bool,
    /// `None` if the kernel would not reset the high-water mark or has no `VmHWM`.
    base_kib: Option<u64>,
    peak_kib: Option<u64>,
    anon_kib: i64,
    shmem_kib: i64,
    file_kib: i64,
}

fn rss() -> [i64; 3] {
    ["RssAnon", "RssShmem", "RssFile"].map(|f| status_kib(f).unwrap_or(0) as i64)
}

/// The child's side: open the context, warm up, reset the peak, do one operation, report.
pub(crate) fn child(job: Job) -> Res<()> {
    let ctx = WorkflowContext::builder().contexts_dir(&job.dir).run_id(&job.run_id).policy(job.tier.policy()).open()?;
    let opts = job.tier.save_options();
    // Warm up the same code paths with a 1 MiB value, so one-time setup is not counted.
    let warm_key = format!("warm-{}", std::process::id());
    ctx.save_bytes(&warm_key, &value(MIB, Content::Text, 5), opts)?;
    drop(ctx.load_bytes(&warm_key)?.to_vec());
    ctx.remove(&warm_key)?;
    let bytes = if job.op == Op::Save { value(job.len, Content::Text, 1) } else { Vec::new() };

    let reset = reset_peak_rss();
    // Without a reset, VmHWM is the process's lifetime peak, which can hide the operation's.
    let base_kib = if reset { status_kib("VmHWM") } else { None };
    let before = rss();
    let (kept, copy) = match job.op {
        Op::Save => {
            ctx.save_bytes(&job.key, &bytes, opts)?;
            (None, None)
        }
        Op::Load => (Some(ctx.load_bytes(&job.key)?), None),
        Op::LoadCopy => (None, Some(ctx.load_bytes(&job.key)?.to_vec())),
    };
    let peak_kib = status_kib("VmHWM");
    let after = rss();
    drop((kept, copy));
    if job.op == Op::Save {
        ctx.remove(&job.key)?;
    }
    let peak = Peak {
        reset,
        base_kib,
        peak_kib,
        anon_kib: after[0] - before[0],
        shmem_kib: after[1] - before[1],
        file_kib: after[2] - before[2],
    };
    println!("{}", serde_json::to_string(&peak)?);
    Ok(())
}

fn measure(job: &Job) -> Res<Peak> {
    let out = Command::new(std::env::current_exe()?)
        .args([CHILD_FLAG, "peak", &serde_json::to_string(job)?])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        return Err(format!("peak-memory child failed ({}) for {job:?}", out.status).into());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn mib(kib: i64) -> String {
    format!("{:+.1} MiB", kib as f64 / 1024.0)
}

pub(crate) fn run(run: &mut Run) -> Res<()> {
    let mut sizes = vec![Size { label: "6 MiB frame", bytes: FRAME_LEN }, Size { label: "64 MiB", bytes: 64 * MIB }];
    if !run.quick {
        sizes.push(largest(false));
    }
    let mut tbl = Section::new(
        "Peak memory of a save and a load",
        "Each figure from a fresh child process: it opens the context (placing values in the tier named), warms \
         up with a 1 MiB value, holds the value to save (if any), resets the kernel's high-water mark \
         (`/proc/self/clear_refs`), does one operation and reads `VmHWM`. `peak` is the high-water mark above \
         that baseline; the resident-set columns say what it was made of (anonymous memory is copies; shared \
         memory and file pages are views of the stored value, not new memory).",
        &["value", "tier", "operation", "peak above baseline", "= value +", "anon", "shmem", "file"],
    );
    let mut worst_save: Vec<(Tier, f64, &'static str)> = Vec::new();
    for tier in Tier::ALL {
        let ctx = tier.context(&run.dir, 4 << 30)?;
        for &size in &sizes {
            let key = format!("held-{}", size.bytes);
            ctx.save_bytes(&key, &value(size.bytes, Content::Text, 1), tier.save_options())?;
            for op in [Op::Save, Op::Load, Op::LoadCopy] {
                let job = Job {
                    dir: run.dir.clone(),
                    run_id: ctx.run_id().to_owned(),
                    tier,
                    len: size.bytes,
                    op,
                    key: if op == Op::Save { "saved".into() } else { key.clone() },
                };
                let p = measure(&job)?;
                // No figure (NaN below, so the floor cannot pass) unless both readings exist.
                let grew = p.base_kib.zip(p.peak_kib).map(|(b, k)| k.saturating_sub(b) as i64);
                let over_value_mib = grew.map_or(f64::NAN, |k| (k * 1024 - size.bytes as i64) as f64 / MIB as f64);
                tbl.row(vec![
                    size.label.to_owned(),
                    tier.name().to_owned(),
                    op.name().to_owned(),
                    grew.map_or_else(|| "n/a".to_owned(), mib),
                    if op == Op::Save {
                        String::from("(value held before)")
                    } else {
                        format!("{over_value_mib:+.1} MiB")
                    },
                    mib(p.anon_kib),
                    mib(p.shmem_kib),
                    mib(p.file_kib),
                ]);
                tbl.data(json!({
                    "value_bytes": size.bytes, "tier": tier.name(), "op": op, "peak_above_baseline_kib": grew,
                    "baseline_kib": p.base_kib, "anon_kib": p.anon_kib, "shmem_kib": p.shmem_kib,
                    "file_kib": p.file_kib, "peak_reset": p.reset,
                }));
                if op == Op::Save {
                    // The floor holds for every value, not only the largest: the worst size.
                    let mib = grew.map_or(f64::NAN, |k| k as f64 / 1024.0);
                    match worst_save.iter_mut().find(|(t, _, _)| *t == tier) {
                        Some(w) if w.1.is_nan() => {}
                        Some(w) if mib.is_nan() || mib > w.1 => *w = (tier, mib, size.label),
                        Some(_) => {}
                        None => worst_save.push((tier, mib, size.label)),
                    }
                }
            }
            ctx.remove(&key)?;
        }
        ctx.shutdown()?;
        eprintln!("  peak memory: {} done", tier.name());
    }
    for (tier, grew_mib, at) in worst_save {
        run.floors.push(Floor::new(
            format!("peak memory while saving a value to {}, worst size ({at})", tier.name()),
            grew_mib,
            Better::Lower,
            (32.0, 16.0),
            |v| format!("value {v:+.1} MiB"),
            "VmHWM above the baseline of a fresh process already holding the value".to_owned(),
        ));
    }
    run.sections.push(tbl);
    Ok(())
}
