//! Several processes reading and writing one context: 1, 2 and 4 copies of this binary,
//! each doing mixed saves and loads on its own keys and on shared ones.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use rustix::fs::Mode;
use rustix::shm;
use serde::{Deserialize, Serialize};
use serde_json::json;
use workflow_context::{SaveOptions, WorkflowContext};
use workflow_context_benches::ceiling;
use workflow_context_benches::measure::three_digits;
use workflow_context_benches::rng::XorShift;
use workflow_context_benches::workload::{Content, MIB, unique_run_id, value};

use crate::report::Section;
use crate::{CHILD_FLAG, Res, Run};

/// Keys of its own each process saves and loads.
const OWN_KEYS: usize = 8;
/// Keys every process saves and loads.
const SHARED_KEYS: usize = 8;
/// The process counts compared.
const PROCESS_COUNTS: [usize; 3] = [1, 2, 4];

/// What one child process is asked to do.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Job {
    dir: PathBuf,
    run_id: String,
    index: usize,
    ops: usize,
    len: usize,
    /// Bare shared memory (the ceiling) instead of the context.
    bare: bool,
}

/// What a child reports.
#[derive(Debug, Serialize, Deserialize)]
struct Done {
    ops: usize,
    bytes: usize,
    seconds: f64,
}

fn own_key(index: usize, k: usize) -> String {
    format!("p{index}-{k}")
}

fn shared_key(k: usize) -> String {
    format!("shared-{k}")
}

/// A segment name for `key` in the bare run `run_id`.
fn segment(run_id: &str, key: &str) -> String {
    format!("/{run_id}.{key}")
}

/// Removes the segments named, when dropped: a child's own, also when it fails midway.
struct Remove(Vec<String>);

impl Drop for Remove {
    fn drop(&mut self) {
        self.0.iter().for_each(|name| ceiling::shm_remove(name));
    }
}

/// Removes, when dropped, every segment of the bare run `run_id` still in `/dev/shm`: a run
/// whose children fail midway (a full `/dev/shm`) leaves none of them behind.
struct BareRun(String);

impl Drop for BareRun {
    fn drop(&mut self) {
        let prefix = format!("{}.", self.0);
        let Ok(entries) = std::fs::read_dir("/dev/shm") else { return };
        for name in entries.flatten().filter_map(|e| e.file_name().into_string().ok()) {
            if name.starts_with(&prefix) {
                ceiling::shm_remove(&format!("/{name}"));
            }
        }
    }
}

/// Maps the segment `name` and copies it into `buf`.
fn bare_load(name: &str, buf: &mut [u8]) -> Res<()> {
    let fd = shm::open(name, shm::OFlags::RDONLY, Mode::empty())?;
    // SAFETY: the segment is written once, before any process loads it, and never
    // truncated while mapped (the benchmark unlinks segments only after every child ends).
    let map = unsafe { memmap2::Mmap::map(&File::from(fd)) }?;
    buf.copy_from_slice(&map);
    std::hint::black_box(buf);
    Ok(())
}

/// The child's side: set up, say `ready`, wait for `go` on stdin, run, report.
pub(crate) fn child(job: Job) -> Res<()> {
    let bytes = value(job.len, Content::Text, 10 + job.index as u64);
    let mut buf = vec![1u8; job.len];
    let own: Vec<String> = (0..OWN_KEYS).map(|k| own_key(job.index, k)).collect();
    let shared: Vec<String> = (0..SHARED_KEYS).map(shared_key).collect();
    let _own_segments =
        Remove(if job.bare { own.iter().map(|k| segment(&job.run_id, k)).collect() } else { Vec::new() });
    let ctx = if job.bare {
        for k in &own {
            ceiling::shm_create(&segment(&job.run_id, k), &bytes)?;
        }
        None
    } else {
        let ctx = WorkflowContext::builder().contexts_dir(&job.dir).run_id(&job.run_id).open()?;
        for k in &own {
            ctx.save_bytes(k, &bytes, SaveOptions::new())?;
        }
        Some(ctx)
    };
    println!("ready");
    std::io::stdout().flush()?;
    let mut go = String::new();
    std::io::stdin().read_line(&mut go)?;
    if go.trim() != "go" {
        // The harness gave up (another child failed) or died: do not run unwatched.
        return Err("the harness went away before the start".into());
    }

    let mut rng = XorShift::new(job.index as u64);
    let t = Instant::now();
    for n in 0..job.ops {
        let key = if rng.below(4) == 0 { &shared[rng.below(SHARED_KEYS)] } else { &own[rng.below(OWN_KEYS)] };
        let save = rng.below(2) == 0;
        match (&ctx, save) {
            (Some(ctx), true) => ctx.save_bytes(key, &bytes, SaveOptions::new())?,
            (Some(ctx), false) => {
                buf.copy_from_slice(&ctx.load_bytes(key)?);
                std::hint::black_box(&mut buf);
            }
            (None, true) => {
                // A new segment, as a save makes; discarded at once, as an overwrite discards the old one.
                let name = segment(&job.run_id, &format!("w{}.{n}", job.index));
                let created = ceiling::shm_create(&name, &bytes);
                ceiling::shm_remove(&name);
                created?;
            }
            (None, false) => bare_load(&segment(&job.run_id, key), &mut buf)?,
        }
    }
    let seconds = t.elapsed().as_secs_f64();
    println!("{}", serde_json::to_string(&Done { ops: job.ops, bytes: job.ops * job.len, seconds })?);
    Ok(())
}

struct Running {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Drop for Running {
    /// A child still running when the harness gives up (another one failed) is stopped, not
    /// left to run its workload unwatched.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Running {
    fn line(&mut self) -> Res<String> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        if line.is_empty() {
            return Err(format!("a child process ended early ({:?})", self.child.wait()?).into());
        }
        Ok(line)
    }
}

/// Runs `procs` children on one context (or on bare segments) and returns (ops/s, GB/s).
fn one(run: &Run, procs: usize, len: usize, ops: usize, bare: bool) -> Res<(f64, f64)> {
    let run_id = unique_run_id(if bare { "bare" } else { "procs" });
    let shared_value = value(len, Content::Text, 3);
    // Dropped after the children (declared before them), on success and failure alike.
    let _bare_run = bare.then(|| BareRun(run_id.clone()));
    let ctx = if bare {
        for k in 0..SHARED_KEYS {
            ceiling::shm_create(&segment(&run_id, &shared_key(k)), &shared_value)?;
        }
        None
    } else {
        let ctx = WorkflowContext::builder().contexts_dir(&run.dir).max_ram_bytes(4 << 30).run_id(&run_id).create()?;
        for k in 0..SHARED_KEYS {
            ctx.save_bytes(&shared_key(k), &shared_value, SaveOptions::new())?;
        }
        Some(ctx)
    };
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for index in 0..procs {
        let job = Job { dir: run.dir.clone(), run_id: run_id.clone(), index, ops, len, bare };
        let mut child = Command::new(&exe)
            .args([CHILD_FLAG, "procs", &serde_json::to_string(&job)?])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        children.push(Running { child, stdin, stdout });
    }
    for c in &mut children {
        let line = c.line()?;
        if line.trim() != "ready" {
            return Err(format!("child said {line:?} instead of ready").into());
        }
    }
    let t = Instant::now();
    for c in &mut children {
        c.stdin.write_all(b"go\n")?;
        c.stdin.flush()?;
    }
    let mut total_ops = 0;
    let mut total_bytes = 0;
    for c in &mut children {
        let done: Done = serde_json::from_str(&c.line()?)?;
        total_ops += done.ops;
        total_bytes += done.bytes;
    }
    let wall = t.elapsed().as_secs_f64();
    for mut c in children {
        let status = c.child.wait()?;
        if !status.success() {
            return Err(format!("a child process failed: {status}").into());
        }
    }
    if let Some(ctx) = ctx {
        ctx.shutdown()?;
    }
    Ok((total_ops as f64 / wall, total_bytes as f64 / wall / 1e9))
}

pub(crate) fn run(run: &mut Run) -> Res<()> {
    let mut tbl = Section::new(
        "Several processes on one context",
        &format!(
            "1, 2 and 4 processes (this binary, re-run as children) attached to one context, all started together; \
             each does N operations: half `save_bytes`, half `load_bytes` + a copy into a warm buffer; a quarter \
             on {SHARED_KEYS} keys every process shares, the rest on {OWN_KEYS} keys of its own. Aggregate ops/s \
             and GB/s over the wall time of the slowest. Ceiling (1 MiB): the same mix on bare shared memory \
             (`shm_open` + `fallocate` + `pwrite` for a save, `shm_open` + `mmap` + copy for a load), no index, \
             no checksum. Each figure is the median of {} runs. The machine has {} cores.",
            if run.quick { 1 } else { 3 },
            run.cores
        ),
        &[
            "values",
            "processes",
            "ops per process",
            "ops/s",
            "GB/s",
            "vs 1 process",
            "ceiling ops/s",
            "ceiling GB/s",
            "of ceiling",
        ],
    );
    let workloads =
        [("64 B", 64, if run.quick { 2_000 } else { 200_000 }), ("1 MiB", MIB, if run.quick { 100 } else { 3_000 })];
    // The median of several runs of each (by ops/s), one with --quick.
    let repeats = if run.quick { 1 } else { 3 };
    let median_of = |bare: bool, procs: usize, len: usize, ops: usize| -> Res<(f64, f64)> {
        let mut runs = (0..repeats).map(|_| one(run, procs, len, ops, bare)).collect::<Res<Vec<_>>>()?;
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(runs[runs.len() / 2])
    };
    for (label, len, ops) in workloads {
        let mut single = None;
        for procs in PROCESS_COUNTS {
            let (ops_s, gb_s) = median_of(false, procs, len, ops)?;
            let single_ops = *single.get_or_insert(ops_s);
            let bare = if len >= MIB { Some(median_of(true, procs, len, ops)?) } else { None };
            tbl.row(vec![
                label.to_owned(),
                procs.to_string(),
                ops.to_string(),
                format!("{ops_s:.0}"),
                three_digits(gb_s),
                format!("{:.2}x", ops_s / single_ops),
                bare.map_or("-".into(), |b| format!("{:.0}", b.0)),
                bare.map_or("-".into(), |b| three_digits(b.1)),
                bare.map_or("-".into(), |b| format!("{:.2}x", ops_s / b.0)),
            ]);
            tbl.data(json!({
                "value_bytes": len, "processes": procs, "ops_per_process": ops,
                "ops_per_second": ops_s, "gb_per_second": gb_s,
                "bare_ops_per_second": bare.map(|b| b.0), "bare_gb_per_second": bare.map(|b| b.1),
            }));
            eprintln!("  processes: {label} x {procs} done");
        }
    }
    run.sections.push(tbl);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn a_bare_run_leaves_no_segment_behind() {
        let run_id = unique_run_id("bare-test");
        let other = unique_run_id("bare-test");
        for name in [segment(&run_id, "shared-0"), segment(&run_id, "p1-3"), segment(&other, "shared-0")] {
            ceiling::shm_create(&name, b"bytes").unwrap();
        }
        drop(BareRun(run_id.clone()));
        assert!(!Path::new(&format!("/dev/shm{}", segment(&run_id, "shared-0"))).exists());
        assert!(!Path::new(&format!("/dev/shm{}", segment(&run_id, "p1-3"))).exists());
        // Another run's segments are its own.
        assert!(Path::new(&format!("/dev/shm{}", segment(&other, "shared-0"))).exists());
        drop(BareRun(other));
    }
}
