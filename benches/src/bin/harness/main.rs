//! The benchmark harness: the figures criterion measures poorly, each beside its ceiling
//! measured in the same run, checked against the project's floors and goals.
//!
//! Run: `cargo xtask bench` (or `cargo xtask bench --quick`, a smoke run of under two
//! minutes), or `cargo run --release -p workflow-context-benches --bin harness -- [--quick]
//! [--out DIR] [--only SECTION,...]`.
//!
//! Sections: `throughput` (every size and tier through the context, and the floors that
//! set a save beside its ceiling), `keys` (small values at 100 to 100,000 keys, and
//! opening a context), `spill` (frames four times the RAM budget, Zipf reads), `procs`
//! (1, 2 and 4 processes on one context), `peak` (peak memory of a save and a load).
//!
//! It prints a table and writes `report.md`, `report.json` and `throughput.svg` into
//! `target/bench/` (`target/bench/quick/` for `--quick`). It fails only if something
//! breaks, never because a figure misses its floor: the report says so.

mod keys;
mod peak;
mod procs;
mod report;
mod spill;
mod throughput;

use std::error::Error;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use report::{Floor, Machine, Report, Section, Series};

/// The hidden first argument that makes this binary a child of a running harness.
pub(crate) const CHILD_FLAG: &str = "--child";

/// Results with any error.
pub(crate) type Res<T> = Result<T, Box<dyn Error>>;

/// The sections, in the order they run.
const SECTIONS: [&str; 5] = ["throughput", "keys", "spill", "procs", "peak"];

/// A run of the harness: its settings and what it has measured so far.
pub(crate) struct Run {
    /// A smoke run: fewer rounds, sizes up to 64 MiB, smaller working sets.
    pub(crate) quick: bool,
    /// The scratch directory: the contexts' directory, and where the ceilings write files.
    pub(crate) dir: PathBuf,
    /// A prefix for the ceilings' shared-memory segments.
    pub(crate) shm_prefix: String,
    /// The machine's cores.
    pub(crate) cores: usize,
    pub(crate) floors: Vec<Floor>,
    pub(crate) sections: Vec<Section>,
    pub(crate) series: Vec<Series>,
}

impl Run {
    /// Counted rounds of each comparison.
    pub(crate) fn rounds(&self) -> usize {
        if self.quick { 3 } else { 7 }
    }

    /// About how long one measurement lasts.
    pub(crate) fn target(&self) -> Duration {
        Duration::from_millis(if self.quick { 10 } else { 40 })
    }
}

/// Unwraps a result inside a measurement, where there is no way to return it.
pub(crate) fn ok<T, E: std::fmt::Display>(result: Result<T, E>, what: &str) -> T {
    result.unwrap_or_else(|e| panic!("{what} failed: {e}"))
}

/// The workspace's target directory: `$CARGO_TARGET_DIR`, else `target/` beside the workspace manifest.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("target"))
}

const USAGE: &str = "\
Usage: harness [--quick] [--out DIR] [--only SECTION,...]

  --quick        a smoke run of under two minutes (fewer rounds, sizes up to 64 MiB)
  --out DIR      where to write report.md, report.json and throughput.svg
                 (default target/bench, or target/bench/quick with --quick)
  --only LIST    run only these sections: throughput, keys, spill, procs, peak
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = if args.first().map(String::as_str) == Some(CHILD_FLAG) { child(&args[1..]) } else { parent(&args) };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("harness: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs as a child process: `--child <kind> <job as JSON>`.
fn child(args: &[String]) -> Res<()> {
    match args {
        [kind, job] if kind == "procs" => procs::child(serde_json::from_str(job)?),
        [kind, job] if kind == "peak" => peak::child(serde_json::from_str(job)?),
        _ => Err(format!("bad child arguments: {args:?}").into()),
    }
}

fn parent(args: &[String]) -> Res<()> {
    let mut quick = false;
    let mut out = None;
    let mut only: Vec<String> = SECTIONS.iter().map(|s| s.to_string()).collect();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--out" => out = Some(PathBuf::from(it.next().ok_or("--out needs a directory")?)),
            "--only" => {
                only = it.next().ok_or("--only needs a list")?.split(',').map(str::to_owned).collect();
                if let Some(bad) = only.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
                    return Err(format!("no section {bad:?}\n\n{USAGE}").into());
                }
            }
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}").into()),
        }
    }
    let out = out.unwrap_or_else(|| {
        let dir = target_dir().join("bench");
        if quick { dir.join("quick") } else { dir }
    });
    let started = Instant::now();
    let started_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // The scratch directory sits in the system's temp dir, on the same file system as
    // the contexts a user would make.
    let scratch = tempfile::Builder::new().prefix("wfctx-bench-").tempdir()?;
    let machine = Machine::this();
    let mut run = Run {
        quick,
        dir: scratch.path().to_owned(),
        shm_prefix: workflow_context_benches::workload::unique_run_id("wfbench"),
        cores: machine.cores,
        floors: Vec::new(),
        sections: Vec::new(),
        series: Vec::new(),
    };
    eprintln!("harness: {} run, scratch in {}", if quick { "quick" } else { "full" }, run.dir.display());
    for section in SECTIONS.iter().filter(|s| only.iter().any(|o| o == *s)) {
        // Each section starts with the page cache written back, so that the gigabytes the
        // one before wrote are not flushed (by the kernel, on the other core) while this
        // one measures.
        rustix::fs::sync();
        let t = Instant::now();
        eprintln!("harness: {section} ...");
        match *section {
            "throughput" => throughput::run(&mut run)?,
            "keys" => keys::run(&mut run)?,
            "spill" => spill::run(&mut run)?,
            "procs" => procs::run(&mut run)?,
            "peak" => peak::run(&mut run)?,
            _ => unreachable!("sections are checked"),
        }
        eprintln!("harness: {section} took {:.1} s", t.elapsed().as_secs_f64());
    }
    let mut command = String::from("cargo run --release -p workflow-context-benches --bin harness");
    if !args.is_empty() {
        command += " -- ";
        command += &args.join(" ");
    }
    let mut machine = machine;
    machine.load_average.1 = report::load_average();
    let report = Report {
        mode: if quick { "quick" } else { "full" },
        command,
        machine,
        started_unix,
        seconds: started.elapsed().as_secs_f64(),
        floors: run.floors,
        sections: run.sections,
        series: run.series,
    };
    print!("{}", report.text());
    report.write(&out)?;
    println!("\nWrote {0}/report.md, {0}/report.json and {0}/throughput.svg", out.display());
    // A floor without a figure is a failure of the run, not a miss of the store: the smoke
    // run in CI exists to catch it.
    let unmeasured: Vec<&str> = report.floors.iter().filter(|f| f.unmeasured()).map(|f| f.figure.as_str()).collect();
    if !unmeasured.is_empty() {
        return Err(format!("figures that could not be measured: {}", unmeasured.join("; ")).into());
    }
    Ok(())
}
