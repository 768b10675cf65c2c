//! `cargo xtask fuzz`: runs the cargo-fuzz targets of `fuzz/` for a while each, on the stable toolchain.
//!
//! For each target (every `[[bin]]` of `fuzz/Cargo.toml`, or the ones named), it copies the committed seeds of
//! `fuzz/corpus/<target>/` into a scratch corpus `fuzz/target/corpus/<target>/` (git-ignored, so what the fuzzer adds
//! is kept between runs but never committed), then runs
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <scratch corpus> -- -max_total_time=<seconds>` from `fuzz/`. It reads
//! libFuzzer's output as it streams by (also saved in `fuzz/target/logs/<target>.log`) and ends with a table of each
//! target's executions, coverage and crash, if any. cargo-fuzz is installed with `cargo install --locked` when
//! missing.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use crate::{USAGE, cargo, read, workspace_root};

/// Seconds each target runs when `--seconds` is not given.
pub(crate) const DEFAULT_SECONDS: u64 = 60;

/// What `cargo xtask fuzz` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Args {
    /// How long each target runs (libFuzzer's `-max_total_time`).
    pub(crate) seconds: u64,
    /// The targets to run; empty for all.
    pub(crate) targets: Vec<String>,
}

/// Parses the arguments after `fuzz`: `[--seconds N] [TARGET]...`.
pub(crate) fn parse_args(args: &[&str]) -> Result<Args, String> {
    let mut parsed = Args { seconds: DEFAULT_SECONDS, targets: Vec::new() };
    let mut args = args.iter();
    while let Some(&arg) = args.next() {
        let seconds = match arg.strip_prefix("--seconds") {
            Some("") => Some(*args.next().ok_or("--seconds needs a number of seconds")?),
            Some(value) => Some(value.strip_prefix('=').ok_or_else(|| format!("unknown option {arg}"))?),
            None => None,
        };
        match seconds {
            Some(value) => {
                parsed.seconds = value
                    .parse()
                    .ok()
                    .filter(|&s| s > 0)
                    .ok_or_else(|| format!("--seconds needs a positive whole number, not {value:?}"))?;
            }
            None if arg.starts_with('-') => return Err(format!("unknown option {arg}")),
            None => parsed.targets.push(arg.to_owned()),
        }
    }
    Ok(parsed)
}

/// The fuzz targets of a cargo-fuzz manifest: the `name` of every `[[bin]]`, in order.
pub(crate) fn target_names(manifest: &str) -> Vec<String> {
    let mut in_bin = false;
    let mut names = Vec::new();
    for line in manifest.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
            continue;
        }
        if let Some((key, value)) = line.split_once('=')
            && in_bin
            && key.trim() == "name"
        {
            names.push(value.trim().trim_matches('"').to_owned());
        }
    }
    names
}

/// The arguments to cargo for fuzzing `target` into `corpus` for `seconds`.
pub(crate) fn run_args(target: &str, corpus: &Path, seconds: u64) -> Vec<String> {
    vec![
        "fuzz".into(),
        "run".into(),
        target.into(),
        corpus.display().to_string(),
        "--".into(),
        format!("-max_total_time={seconds}"),
        "-print_final_stats=1".into(),
    ]
}

/// What libFuzzer reported about one run, gathered line by line from its output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Stats {
    /// Coverage (`cov:`) at the last status line.
    pub(crate) cov: Option<u64>,
    /// Features (`ft:`) at the last status line.
    pub(crate) ft: Option<u64>,
    /// Corpus entries (`corp: N/size`) at the last status line.
    pub(crate) corpus: Option<u64>,
    /// Executions per second (`exec/s:`) at the last status line.
    pub(crate) exec_per_sec: Option<u64>,
    /// Where libFuzzer saved the input that crashed, leaked, timed out or ran out of memory.
    pub(crate) artifact: Option<String>,
    /// The first panic message (`panicked at ...` and the line after it), or sanitizer error line.
    pub(crate) failure: Option<String>,
    /// Executions at the last `#N` status line.
    pub(crate) status_runs: Option<u64>,
    /// Executions from `Done N runs in S second(s)`.
    pub(crate) done_runs: Option<u64>,
    /// Executions from `stat::number_of_executed_units: N`.
    pub(crate) stat_runs: Option<u64>,
    /// Set while the line after `panicked at` is awaited.
    in_panic: bool,
}

impl Stats {
    /// Executions: from `Done N runs`, else `stat::number_of_executed_units`, else the last `#N` status line.
    pub(crate) fn runs(&self) -> Option<u64> {
        self.done_runs.or(self.stat_runs).or(self.status_runs)
    }

    /// Takes in one line of libFuzzer's (or the target's) output.
    pub(crate) fn observe(&mut self, line: &str) {
        let line = line.trim_end();
        if self.in_panic {
            self.in_panic = false;
            if let Some(failure) = &mut self.failure {
                failure.push_str(": ");
                failure.push_str(line.trim());
            }
        }
        if let Some(rest) = line.strip_prefix('#') {
            let mut words = rest.split_whitespace();
            let Some(Ok(n)) = words.next().map(str::parse::<u64>) else { return };
            self.status_runs = Some(n);
            let words: Vec<&str> = words.collect();
            let after = |key: &str| words.iter().position(|&w| w == key).and_then(|i| words.get(i + 1)).copied();
            let number = |key: &str| after(key).and_then(|v| v.parse().ok());
            self.cov = number("cov:").or(self.cov);
            self.ft = number("ft:").or(self.ft);
            self.exec_per_sec = number("exec/s:").or(self.exec_per_sec);
            self.corpus = after("corp:").and_then(|v| v.split('/').next()).and_then(|v| v.parse().ok()).or(self.corpus);
        } else if let Some(rest) = line.strip_prefix("Done ") {
            self.done_runs = rest.split_whitespace().next().and_then(|n| n.parse().ok());
        } else if let Some(rest) = line.strip_prefix("stat::number_of_executed_units:") {
            self.stat_runs = rest.trim().parse().ok();
        } else if let Some(at) = line.find("Test unit written to ") {
            self.artifact = Some(line[at + "Test unit written to ".len()..].trim().to_owned());
        } else if self.failure.is_none() {
            if line.contains("panicked at ") {
                self.failure = Some(line.trim().trim_end_matches(':').to_owned());
                self.in_panic = true;
            } else if line.starts_with("==") && line.contains("ERROR:") {
                self.failure = Some(line.trim().to_owned());
            }
        }
    }
}

/// How one target's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Ran for its time and found nothing.
    Clean,
    /// Found an input that crashes (or leaks, times out, runs out of memory).
    Crash,
    /// Could not run, with why.
    Failed(String),
}

/// One row of the summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Row {
    pub(crate) target: String,
    pub(crate) outcome: Outcome,
    pub(crate) stats: Stats,
}

/// The summary table printed at the end, then one line per crash or failure.
pub(crate) fn summary(rows: &[Row], seconds: u64) -> String {
    let show = |n: Option<u64>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
    let mut out = format!("fuzz summary ({seconds} s per target)\n");
    let header = ["target", "result", "executions", "exec/s", "cov", "ft", "corpus"];
    let mut table: Vec<[String; 7]> = vec![header.map(str::to_owned)];
    for row in rows {
        let s = &row.stats;
        let result = match &row.outcome {
            Outcome::Clean => "ok",
            Outcome::Crash => "CRASH",
            Outcome::Failed(_) => "FAILED",
        };
        table.push([
            row.target.clone(),
            result.to_owned(),
            show(s.runs()),
            show(s.exec_per_sec),
            show(s.cov),
            show(s.ft),
            show(s.corpus),
        ]);
    }
    let mut widths = [0; 7];
    for line in &table {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for line in &table {
        let cells: Vec<String> = line
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (cell, w))| if i < 2 { format!("{cell:<w$}") } else { format!("{cell:>w$}") })
            .collect();
        let _ = writeln!(out, "  {}", cells.join("  ").trim_end());
    }
    for row in rows {
        match &row.outcome {
            Outcome::Clean => {}
            Outcome::Crash => {
                let input = row.stats.artifact.as_deref().unwrap_or("(no input saved)");
                let why = row.stats.failure.as_deref().unwrap_or("see the log");
                let _ = writeln!(out, "  {}: crash input {input}\n    {why}", row.target);
            }
            Outcome::Failed(why) => {
                let _ = writeln!(out, "  {}: {why}", row.target);
            }
        }
    }
    out
}

/// `cargo xtask fuzz` with the arguments after `fuzz`: exit code 2 for a usage error, 1 if a target crashed or could
/// not run.
pub(crate) fn main(args: &[&str]) -> ExitCode {
    let args = match parse_args(args) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("xtask: {message}");
            eprint!("\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match fuzz(&args) {
        Ok(()) => {
            println!("==> fuzz passed");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("\nxtask: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Fuzzes the targets `args` names (all when none).
fn fuzz(args: &Args) -> Result<(), String> {
    let fuzz_dir = workspace_root().join("fuzz");
    let all = target_names(&read(&fuzz_dir.join("Cargo.toml"))?);
    if all.is_empty() {
        return Err("fuzz/Cargo.toml declares no [[bin]] fuzz targets".to_owned());
    }
    let targets = if args.targets.is_empty() { all.clone() } else { args.targets.clone() };
    if let Some(unknown) = targets.iter().find(|t| !all.contains(t)) {
        return Err(format!("no fuzz target named {unknown:?}; the targets are {}", all.join(", ")));
    }
    ensure_cargo_fuzz(&fuzz_dir)?;
    let mut rows = Vec::new();
    for target in &targets {
        let (outcome, stats) = match run_target(&fuzz_dir, target, args.seconds) {
            Ok((outcome, stats)) => (outcome, stats),
            Err(why) => (Outcome::Failed(why), Stats::default()),
        };
        rows.push(Row { target: target.clone(), outcome, stats });
    }
    println!("\n{}", summary(&rows, args.seconds));
    let bad: Vec<&str> = rows.iter().filter(|r| r.outcome != Outcome::Clean).map(|r| r.target.as_str()).collect();
    if bad.is_empty() { Ok(()) } else { Err(format!("fuzzing found crashes or failed in: {}", bad.join(", "))) }
}

/// Installs cargo-fuzz unless `cargo fuzz --version` works.
fn ensure_cargo_fuzz(fuzz_dir: &Path) -> Result<(), String> {
    let works = || {
        Command::new(cargo())
            .args(["fuzz", "--version"])
            .current_dir(fuzz_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if works() {
        return Ok(());
    }
    println!("==> cargo-fuzz is not installed: installing it\n    $ cargo install cargo-fuzz --locked");
    let status = Command::new(cargo()).args(["install", "cargo-fuzz", "--locked"]).status();
    match status {
        Ok(s) if s.success() && works() => Ok(()),
        Ok(s) if s.success() => Err("installed cargo-fuzz, but `cargo fuzz --version` still fails".to_owned()),
        Ok(s) => {
            Err(format!("`cargo install cargo-fuzz --locked` failed ({s}); install cargo-fuzz by hand and run again"))
        }
        Err(e) => Err(format!("could not start `cargo install cargo-fuzz --locked`: {e}")),
    }
}

/// Copies the files of `from` into `to` (created if missing), replacing files of the same name.
fn copy_seeds(from: &Path, to: &Path) -> Result<usize, String> {
    fs::create_dir_all(to).map_err(|e| format!("cannot create {}: {e}", to.display()))?;
    let entries = fs::read_dir(from).map_err(|e| format!("cannot read the seeds in {}: {e}", from.display()))?;
    let mut copied = 0;
    for entry in entries {
        let path = entry.map_err(|e| format!("cannot read {}: {e}", from.display()))?.path();
        if path.is_file() {
            let dest = to.join(path.file_name().expect("a file has a name"));
            fs::copy(&path, &dest).map_err(|e| format!("cannot copy {} to {}: {e}", path.display(), dest.display()))?;
            copied += 1;
        }
    }
    Ok(copied)
}

/// Fuzzes one target, streaming libFuzzer's output through and into its log.
fn run_target(fuzz_dir: &Path, target: &str, seconds: u64) -> Result<(Outcome, Stats), String> {
    let scratch = PathBuf::from("target").join("corpus").join(target);
    let seeds = copy_seeds(&fuzz_dir.join("corpus").join(target), &fuzz_dir.join(&scratch))?;
    let logs = fuzz_dir.join("target").join("logs");
    fs::create_dir_all(&logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;
    let log_path = logs.join(format!("{target}.log"));
    let mut log = fs::File::create(&log_path).map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
    let args = run_args(target, &scratch, seconds);
    println!(
        "==> fuzz {target} for {seconds} s ({seeds} seeds copied into fuzz/{})\n    $ RUSTC_BOOTSTRAP=1 cargo {}",
        scratch.display(),
        args.join(" ")
    );
    let mut child = Command::new(cargo())
        .args(&args)
        .current_dir(fuzz_dir)
        .env("RUSTC_BOOTSTRAP", "1")
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("could not start `cargo fuzz run {target}`: {e}"))?;
    let mut stats = Stats::default();
    let mut reader = BufReader::new(child.stderr.take().expect("stderr is piped"));
    let mut line = Vec::new();
    let mut stderr = std::io::stderr().lock();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {
                let _ = stderr.write_all(&line);
                let _ = log.write_all(&line);
                stats.observe(&String::from_utf8_lossy(&line));
            }
            Err(e) => {
                let _ = child.kill();
                return Err(format!("reading the output of `cargo fuzz run {target}`: {e}"));
            }
        }
    }
    drop(stderr);
    let status = child.wait().map_err(|e| format!("waiting for `cargo fuzz run {target}`: {e}"))?;
    let outcome = if status.success() {
        Outcome::Clean
    } else if stats.artifact.is_some() || stats.failure.is_some() {
        Outcome::Crash
    } else {
        Outcome::Failed(format!("`cargo fuzz run {target}` failed ({status}); see {}", log_path.display()))
    };
    Ok((outcome, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_mentions_the_task() {
        assert!(USAGE.contains("fuzz [--seconds N] [TARGET]..."), "{USAGE}");
    }

    #[test]
    fn parses_arguments() {
        assert_eq!(parse_args(&[]).unwrap(), Args { seconds: DEFAULT_SECONDS, targets: vec![] });
        assert_eq!(parse_args(&["--seconds", "30"]).unwrap(), Args { seconds: 30, targets: vec![] });
        assert_eq!(
            parse_args(&["config", "--seconds=600", "ops"]).unwrap(),
            Args { seconds: 600, targets: vec!["config".into(), "ops".into()] }
        );
        assert!(parse_args(&["--seconds"]).is_err());
        assert!(parse_args(&["--seconds", "0"]).is_err());
        assert!(parse_args(&["--seconds", "ten"]).is_err());
        assert!(parse_args(&["--secondsx"]).is_err());
        assert!(parse_args(&["-j2"]).is_err());
    }

    #[test]
    fn reads_target_names_from_the_manifest() {
        let manifest = r#"
[package]
name = "workflow-context-fuzz"

[[bin]]
name = "config"  # the parser
path = "fuzz_targets/config.rs"

[dependencies]
name = "not-a-target"

[[bin]]
path = "fuzz_targets/ops.rs"
name = "ops"
"#;
        assert_eq!(target_names(manifest), ["config", "ops"]);
    }

    #[test]
    fn builds_the_cargo_fuzz_command() {
        let args = run_args("ops", Path::new("target/corpus/ops"), 30);
        assert_eq!(args.join(" "), "fuzz run ops target/corpus/ops -- -max_total_time=30 -print_final_stats=1");
    }

    fn stats_of(output: &str) -> Stats {
        let mut stats = Stats::default();
        output.lines().for_each(|line| stats.observe(line));
        stats
    }

    #[test]
    fn reads_a_clean_run() {
        let stats = stats_of(
            "INFO: Seed: 1234\n\
             #2\tINITED cov: 100 ft: 120 corp: 9/1204b exec/s: 0 rss: 40Mb\n\
             #4096\tpulse  cov: 180 ft: 300 corp: 20/3Kb lim: 43 exec/s: 2048 rss: 50Mb\n\
             #53311\tDONE   cov: 211 ft: 389 corp: 31/5120b lim: 4096 exec/s: 1777 rss: 61Mb\n\
             Done 53311 runs in 31 second(s)\n\
             stat::number_of_executed_units: 53311\n",
        );
        assert_eq!(
            (stats.runs(), stats.cov, stats.ft, stats.corpus, stats.exec_per_sec),
            (Some(53311), Some(211), Some(389), Some(31), Some(1777))
        );
        assert_eq!((stats.artifact, stats.failure), (None, None));
    }

    #[test]
    fn reads_a_crash() {
        let stats = stats_of(
            "#2\tINITED cov: 50 ft: 60 corp: 3/30b exec/s: 0 rss: 40Mb\n\
             #77\tNEW    cov: 58 ft: 70 corp: 4/41b lim: 4 exec/s: 0 rss: 40Mb L: 11/11 MS: 1 ChangeBit-\n\
             \n\
             thread '<unnamed>' panicked at crates/context-core/src/record.rs:60:9:\n\
             attempt to add with overflow\n\
             ==1234== ERROR: libFuzzer: deadly signal\n\
             artifact_prefix='/f/artifacts/record/'; Test unit written to /f/artifacts/record/crash-abc\n\
             stat::number_of_executed_units: 80\n",
        );
        assert_eq!((stats.runs(), stats.cov, stats.ft), (Some(80), Some(58), Some(70)));
        assert_eq!(stats.artifact.as_deref(), Some("/f/artifacts/record/crash-abc"));
        assert_eq!(
            stats.failure.as_deref(),
            Some("thread '<unnamed>' panicked at crates/context-core/src/record.rs:60:9: attempt to add with overflow")
        );
    }

    #[test]
    fn prints_a_summary_table() {
        let clean =
            Stats { done_runs: Some(53311), cov: Some(211), ft: Some(389), corpus: Some(31), ..Stats::default() };
        let crash = Stats {
            stat_runs: Some(80),
            artifact: Some("artifacts/record/crash-abc".into()),
            failure: Some("panicked at x.rs:1:1: boom".into()),
            ..Stats::default()
        };
        let rows = [
            Row { target: "config".into(), outcome: Outcome::Clean, stats: clean },
            Row { target: "record".into(), outcome: Outcome::Crash, stats: crash },
            Row { target: "ops".into(), outcome: Outcome::Failed("no build".into()), stats: Stats::default() },
        ];
        let expected = "\
fuzz summary (30 s per target)
  target  result  executions  exec/s  cov   ft  corpus
  config  ok           53311       -  211  389      31
  record  CRASH           80       -    -    -       -
  ops     FAILED           -       -    -    -       -
  record: crash input artifacts/record/crash-abc
    panicked at x.rs:1:1: boom
  ops: no build
";
        assert_eq!(summary(&rows, 30), expected);
    }

    /// Tidy: every fuzz target has a seed corpus in `fuzz/corpus/<target>/`.
    #[test]
    fn every_fuzz_target_has_seeds() {
        let fuzz_dir = workspace_root().join("fuzz");
        let targets = target_names(&read(&fuzz_dir.join("Cargo.toml")).unwrap());
        assert!(!targets.is_empty(), "fuzz/Cargo.toml has no [[bin]] targets");
        for target in targets {
            let seeds = fs::read_dir(fuzz_dir.join("corpus").join(&target)).map(Iterator::count).unwrap_or(0);
            assert!(seeds > 0, "fuzz target {target} has no seeds in fuzz/corpus/{target}");
        }
    }
}
