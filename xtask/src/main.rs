//! The project's task runner, run as `cargo xtask <task>` through the alias in `.cargo/config.toml`.
//!
//! Tasks:
//!
//! - `cargo xtask ci`: everything CI checks, in order, stopping at the first failure: formatting, clippy (the whole
//!   workspace, then the front crate `workflow-context` with every combination of its `tier-*` features), docs, tests
//!   (nextest when installed, else `cargo test`; then doctests; then the front crate's tests for every partial tier
//!   combination), and, when there are benchmarks, building them and a smoke run of the benchmark harness
//!   (`--quick`; it checks that every figure can be measured, not how fast: no timing is asserted).
//! - `cargo xtask ci --quick`: the same without the per-combination clippy and test runs.
//! - `cargo xtask bench [--quick] [ARGS]`: the benchmark harness (`benches/src/bin/harness/`) in release mode; its
//!   arguments go to it. It prints the figures against their ceilings, floors and goals, and writes
//!   `target/bench/report.md`, `report.json` and `throughput.svg` (`target/bench/quick/` with `--quick`, a smoke
//!   run of under two minutes). The criterion benches are `cargo bench -p workflow-context-benches`.
//! - `cargo xtask fuzz [--seconds N] [TARGET]...`: runs each cargo-fuzz target of `fuzz/` (or the ones named) for N
//!   seconds on the stable toolchain, from a scratch copy of its seed corpus, and prints a summary (see `fuzz.rs`).
//! - `cargo xtask crash [--kills N] [--stress-seconds S]`: the long crash harness and stress test (CI runs them short).
//! - `cargo xtask help`: the usage.
//!
//! It uses only `std`, in the spirit of rust-analyzer's xtask; the pure parts (reading the tier features out of a
//! manifest, building the combinations and the plan of steps) are unit-tested, and so is the rule that every tier crate
//! has its `tier-<name>` feature on the front crate.

mod fuzz;

use std::env;
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

/// The usage text printed by `cargo xtask help` and after a usage error.
const USAGE: &str = "\
Usage: cargo xtask <task>

Tasks:
  ci           run every CI check: fmt, clippy (workspace and every tier-feature combination
               of workflow-context), docs, tests (nextest if installed, then doctests, then
               each partial tier combination) and, if there are any, building the benches
               and a smoke run of the benchmark harness (no timing asserted)
  ci --quick   the same, without the per-combination clippy and test runs
  bench        run the benchmark harness in release mode: every figure beside its ceiling,
               the floors and goals; writes target/bench/report.md, report.json and
               throughput.svg (the criterion benches: cargo bench -p workflow-context-benches)
  bench --quick
               a smoke run of the harness, under two minutes (reports in target/bench/quick/);
               further arguments go to the harness (--only SECTION,..., --out DIR, --help)
  fuzz [--seconds N] [TARGET]...
               run each fuzz target of fuzz/ (or those named) for N seconds (default 60)
               with cargo-fuzz on stable, then print executions and coverage per target
  crash [--kills N] [--stress-seconds S]
               the long crash harness (writers SIGKILLed N times, default 200) and the
               multi-process stress test (S seconds, default 30); CI runs both short
  help         print this message
";

/// The crate that holds the benchmarks.
const BENCH_CRATE: &str = "workflow-context-benches";

/// The benchmark harness binary in [`BENCH_CRATE`].
const HARNESS: &str = "harness";

/// The front crate, whose `tier-*` features are checked in every combination.
const FRONT_CRATE: &str = "workflow-context";

/// The prefix that marks a feature of the front crate as a storage tier.
const TIER_PREFIX: &str = "tier-";

/// Tier features that hold no values (only the recipes of values passed by reference): a
/// combination needs at least one other tier to be a build anyone would use.
const RECIPE_TIERS: &[&str] = &["tier-graph"];

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["help" | "--help" | "-h"] => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        ["ci"] => ci(false).map(|()| "ci passed"),
        ["ci", "--quick"] => ci(true).map(|()| "ci passed"),
        ["bench", harness_args @ ..] => bench(harness_args).map(|()| "bench done"),
        ["fuzz", rest @ ..] => return fuzz::main(rest),
        ["crash", rest @ ..] => crash(rest).map(|()| "crash harness passed"),
        _ => {
            if args.is_empty() {
                eprintln!("xtask: no task given");
            } else {
                eprintln!("xtask: unknown task or arguments: {}", args.join(" "));
            }
            eprint!("\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(done) => {
            println!("==> {done}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("\nxtask: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `cargo xtask ci`, returning a message naming the failed step on failure.
fn ci(quick: bool) -> Result<(), String> {
    let root = workspace_root();
    let tiers = if quick {
        Vec::new()
    } else {
        let path = root.join("crates").join(FRONT_CRATE).join("Cargo.toml");
        let manifest = read(&path)?;
        let tiers = tier_features(&manifest);
        if tiers.is_empty() {
            return Err(format!("found no `{TIER_PREFIX}*` features in {}", path.display()));
        }
        tiers
    };
    let has_benches = read(&root.join("benches").join("Cargo.toml"))?.lines().any(|line| line.trim() == "[[bench]]");
    let config = Config { quick, nextest: has_nextest(&root), has_benches };
    for item in plan(&config, &tiers) {
        match item {
            Item::Note(note) => println!("==> {note}"),
            Item::Step(step) => run(&root, &step)?,
        }
    }
    Ok(())
}

/// Runs `cargo xtask bench`: the harness in release mode, with `harness_args`.
fn bench(harness_args: &[&str]) -> Result<(), String> {
    run(&workspace_root(), &harness_step("bench harness", harness_args))
}

/// The step that runs the benchmark harness in release mode with `harness_args`.
fn harness_step(name: &str, harness_args: &[&str]) -> Step {
    let mut step = Step::new(name, &format!("run --release -p {BENCH_CRATE} --bin {HARNESS}"));
    if !harness_args.is_empty() {
        step.args.push("--".to_owned());
        step.args.extend(harness_args.iter().map(|&a| a.to_owned()));
    }
    step
}

/// Runs `cargo xtask crash [--kills N] [--stress-seconds S]`: the long versions of the
/// crash harness (writers SIGKILLed N times, default 200) and of the multi-process stress
/// test (S seconds, default 30), which CI runs short.
fn crash(args: &[&str]) -> Result<(), String> {
    let (kills, seconds) = crash_args(args)?;
    let root = workspace_root();
    let test = |name: &str, var: &str, value: &str| {
        Step::new(name, &format!("test --release -p {FRONT_CRATE} --features testing --test {name} -- --nocapture"))
            .env(var, value)
    };
    run(&root, &test("crash", "WFCTX_CRASH_KILLS", &kills.to_string()))?;
    run(&root, &test("stress", "WFCTX_STRESS_SECONDS", &seconds.to_string()))
}

/// The kills and stress seconds of `cargo xtask crash`.
fn crash_args(args: &[&str]) -> Result<(u64, u64), String> {
    let (mut kills, mut seconds) = (200, 30);
    let mut rest = args.iter();
    while let Some(&arg) = rest.next() {
        let value = rest.next().and_then(|v| v.parse::<u64>().ok());
        match (arg, value) {
            ("--kills", Some(n)) if n > 0 => kills = n,
            ("--stress-seconds", Some(n)) if n > 0 => seconds = n,
            _ => {
                return Err(format!(
                    "crash: unexpected argument {arg:?}; usage: cargo xtask crash [--kills N] [--stress-seconds S]"
                ));
            }
        }
    }
    Ok((kills, seconds))
}

/// Reads a file, with its path in the error.
fn read(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|err| format!("cannot read {}: {err}", path.display()))
}

/// The workspace root: the parent of this crate's directory.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask/ has a parent directory").to_path_buf()
}

/// The cargo binary that ran us (`$CARGO`), else the one that built us.
fn cargo() -> OsString {
    env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into())
}

/// Whether `cargo nextest --version` works.
fn has_nextest(root: &Path) -> bool {
    Command::new(cargo())
        .args(["nextest", "--version"])
        .current_dir(root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Prints the step's header and runs it from the workspace root, failing unless it exits successfully.
fn run(root: &Path, step: &Step) -> Result<(), String> {
    println!("==> {}\n    $ {step}", step.name);
    let mut command = Command::new(cargo());
    command.args(&step.args).current_dir(root);
    for (key, value) in &step.env {
        command.env(key, value);
    }
    match command.status() {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(format!("step `{}` failed ({status}): {step}", step.name)),
        Err(err) => Err(format!("step `{}` could not start `{step}`: {err}", step.name)),
    }
}

/// What `ci` found out about the machine and the workspace before planning.
#[derive(Debug, Clone, Copy)]
struct Config {
    /// Skip the per-combination clippy and test runs.
    quick: bool,
    /// `cargo nextest` is installed.
    nextest: bool,
    /// `benches/Cargo.toml` declares at least one `[[bench]]`.
    has_benches: bool,
}

/// One entry of the CI plan.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    /// A cargo command to run.
    Step(Step),
    /// A line to print instead of a skipped step.
    Note(String),
}

/// A cargo command with a name for its header and error message.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Step {
    /// What the step checks, printed after `==>`.
    name: String,
    /// The arguments to cargo.
    args: Vec<String>,
    /// Environment variables set for the command.
    env: Vec<(String, String)>,
}

impl Step {
    /// A step running `cargo <args>` (split on whitespace).
    fn new(name: impl Into<String>, args: &str) -> Self {
        Step { name: name.into(), args: args.split_whitespace().map(String::from).collect(), env: Vec::new() }
    }

    /// Sets an environment variable for the command.
    fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }
}

/// Shows the command as a shell line, e.g. `RUSTDOCFLAGS='-D warnings' cargo doc --workspace`.
impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (key, value) in &self.env {
            write!(f, "{key}='{value}' ")?;
        }
        write!(f, "cargo {}", self.args.join(" "))
    }
}

/// The CI plan, in order. `tiers` are the front crate's tier features (unused when `config.quick`).
fn plan(config: &Config, tiers: &[String]) -> Vec<Item> {
    let mut combos = if config.quick { Vec::new() } else { combinations(tiers) };
    combos.retain(|combo| combo.iter().any(|tier| !RECIPE_TIERS.contains(&tier.as_str())));
    let mut items = vec![
        Item::Step(Step::new("fmt", "fmt --all --check")),
        Item::Step(Step::new("clippy", "clippy --workspace --all-targets --all-features -- -D warnings")),
    ];
    for combo in &combos {
        let features = combo.join(",");
        items.push(Item::Step(Step::new(
            format!("clippy {FRONT_CRATE} ({})", combo.join("+")),
            &format!(
                "clippy -p {FRONT_CRATE} --all-targets --no-default-features --features {features} -- -D warnings"
            ),
        )));
    }
    items.push(Item::Step(
        Step::new("doc", "doc --workspace --no-deps --all-features").env("RUSTDOCFLAGS", "-D warnings"),
    ));
    items.push(Item::Step(if config.nextest {
        Step::new("test (nextest)", "nextest run --workspace --all-features --no-fail-fast")
    } else {
        Step::new("test (cargo test; nextest not installed)", "test --workspace --all-features --no-fail-fast")
    }));
    items.push(Item::Step(Step::new("doctests", "test --workspace --all-features --doc")));
    // The full combination was tested above with --all-features.
    for combo in combos.iter().filter(|combo| combo.len() < tiers.len()) {
        items.push(Item::Step(Step::new(
            format!("test {FRONT_CRATE} ({})", combo.join("+")),
            &format!("test -p {FRONT_CRATE} --no-default-features --features {}", combo.join(",")),
        )));
    }
    if config.has_benches {
        items.push(Item::Step(Step::new("bench (build only)", "bench --workspace --no-run")));
        // A smoke test: every figure can be measured and reported. No timing is asserted.
        items.push(Item::Step(harness_step("bench harness (smoke run, no timing asserted)", &["--quick"])));
    } else {
        items.push(Item::Note("bench: skipped, benches/Cargo.toml has no [[bench]] target".to_owned()));
    }
    items
}

/// The names of the features in a manifest's `[features]` table, in order.
///
/// A tiny parser, enough for our manifests: it takes every `name = ...` line between `[features]` and the next table
/// header, skipping comments and the continuation lines of multi-line arrays.
fn feature_names(manifest: &str) -> Vec<String> {
    let mut in_features = false;
    let mut names = Vec::new();
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            let header = line.split('#').next().unwrap_or_default().trim();
            in_features = header == "[features]";
            continue;
        }
        if !in_features || line.starts_with('#') {
            continue;
        }
        let Some((key, _)) = line.split_once('=') else { continue };
        let key = key.trim();
        let key = key.strip_prefix('"').and_then(|key| key.strip_suffix('"')).unwrap_or(key);
        let is_name = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if !key.is_empty() && key.chars().all(is_name) {
            names.push(key.to_owned());
        }
    }
    names
}

/// The tier features (`tier-*`) of a manifest, in order.
fn tier_features(manifest: &str) -> Vec<String> {
    feature_names(manifest).into_iter().filter(|name| name.starts_with(TIER_PREFIX)).collect()
}

/// Every non-empty combination of `items`, smallest first, each keeping the order of `items`.
fn combinations<T: Clone>(items: &[T]) -> Vec<Vec<T>> {
    let n = items.len();
    let mut out = Vec::new();
    for k in 1..=n {
        // `idx` walks the k-subsets of 0..n in lexicographic order.
        let mut idx: Vec<usize> = (0..k).collect();
        'subsets: loop {
            out.push(idx.iter().map(|&i| items[i].clone()).collect());
            let mut i = k;
            loop {
                if i == 0 {
                    break 'subsets;
                }
                i -= 1;
                if idx[i] != i + n - k {
                    break;
                }
            }
            idx[i] += 1;
            for j in i + 1..k {
                idx[j] = idx[j - 1] + 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"
[package]
name = "workflow-context"
features = "not this one"

[features]
default = ["tier-shm", "tier-mmap"]
## The RAM tier.
tier-shm = ["dep:context-tier-shm"]
# tier-commented = []
tier-mmap = [
    "dep:context-tier-mmap",
    "x = y",
]
"tier-quoted" = []
testing = []

[dependencies]
tier-not-a-feature = "1"
"#;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|&s| s.to_owned()).collect()
    }

    #[test]
    fn parses_feature_names() {
        assert_eq!(feature_names(MANIFEST), strings(&["default", "tier-shm", "tier-mmap", "tier-quoted", "testing"]));
    }

    #[test]
    fn keeps_only_tier_features() {
        assert_eq!(tier_features(MANIFEST), strings(&["tier-shm", "tier-mmap", "tier-quoted"]));
        assert!(tier_features("[package]\nname = \"x\"\n").is_empty());
    }

    #[test]
    fn combinations_of_two_and_three() {
        assert_eq!(combinations(&["a", "b"]), vec![vec!["a"], vec!["b"], vec!["a", "b"]]);
        let three =
            [vec!["a"], vec!["b"], vec!["c"], vec!["a", "b"], vec!["a", "c"], vec!["b", "c"], vec!["a", "b", "c"]];
        assert_eq!(combinations(&["a", "b", "c"]), three);
        assert!(combinations::<&str>(&[]).is_empty());
        assert_eq!(combinations(&[0; 5]).len(), 31);
    }

    fn commands(config: Config, tiers: &[&str]) -> Vec<String> {
        plan(&config, &strings(tiers))
            .into_iter()
            .map(|item| match item {
                Item::Step(step) => step.to_string(),
                Item::Note(note) => format!("# {note}"),
            })
            .collect()
    }

    #[test]
    fn full_plan() {
        let config = Config { quick: false, nextest: true, has_benches: true };
        let expected = [
            "cargo fmt --all --check",
            "cargo clippy --workspace --all-targets --all-features -- -D warnings",
            "cargo clippy -p workflow-context --all-targets --no-default-features --features tier-shm -- -D warnings",
            "cargo clippy -p workflow-context --all-targets --no-default-features --features tier-mmap -- -D warnings",
            "cargo clippy -p workflow-context --all-targets --no-default-features --features tier-shm,tier-mmap -- -D warnings",
            "RUSTDOCFLAGS='-D warnings' cargo doc --workspace --no-deps --all-features",
            "cargo nextest run --workspace --all-features --no-fail-fast",
            "cargo test --workspace --all-features --doc",
            "cargo test -p workflow-context --no-default-features --features tier-shm",
            "cargo test -p workflow-context --no-default-features --features tier-mmap",
            "cargo bench --workspace --no-run",
            "cargo run --release -p workflow-context-benches --bin harness -- --quick",
        ];
        assert_eq!(commands(config, &["tier-shm", "tier-mmap"]), expected);
    }

    #[test]
    fn bench_runs_the_harness_with_its_arguments() {
        assert_eq!(
            harness_step("bench harness", &[]).to_string(),
            "cargo run --release -p workflow-context-benches --bin harness"
        );
        assert_eq!(
            harness_step("bench harness", &["--quick", "--only", "keys"]).to_string(),
            "cargo run --release -p workflow-context-benches --bin harness -- --quick --only keys"
        );
    }

    /// Tidy: the harness the bench task and CI run exists, and the benches manifest declares criterion benches.
    #[test]
    fn the_harness_and_the_benches_exist() {
        let benches = workspace_root().join("benches");
        assert!(benches.join("src/bin").join(HARNESS).join("main.rs").is_file(), "no harness binary in benches/");
        let manifest = read(&benches.join("Cargo.toml")).unwrap();
        assert!(manifest.contains(&format!("name = \"{BENCH_CRATE}\"")), "benches/ is not {BENCH_CRATE}");
        assert!(manifest.lines().any(|line| line.trim() == "[[bench]]"), "benches/Cargo.toml has no [[bench]]");
    }

    #[test]
    fn crash_arguments() {
        assert_eq!(crash_args(&[]), Ok((200, 30)));
        assert_eq!(crash_args(&["--kills", "500", "--stress-seconds", "5"]), Ok((500, 5)));
        assert!(crash_args(&["--kills"]).is_err());
        assert!(crash_args(&["--kills", "0"]).is_err());
        assert!(crash_args(&["--bogus", "1"]).is_err());
    }

    #[test]
    fn a_recipe_tier_alone_is_no_combination() {
        let config = Config { quick: false, nextest: true, has_benches: false };
        let plan = commands(config, &["tier-shm", "tier-graph"]);
        let clippy_runs: Vec<&String> = plan.iter().filter(|c| c.contains("--no-default-features")).collect();
        assert_eq!(clippy_runs.len(), 3, "shm, shm+graph, and shm tested alone: {clippy_runs:?}");
        assert!(plan.iter().all(|c| !c.contains("--features tier-graph ")), "{plan:?}");
    }

    #[test]
    fn quick_plan_without_nextest_or_benches() {
        let config = Config { quick: true, nextest: false, has_benches: false };
        let expected = [
            "cargo fmt --all --check",
            "cargo clippy --workspace --all-targets --all-features -- -D warnings",
            "RUSTDOCFLAGS='-D warnings' cargo doc --workspace --no-deps --all-features",
            "cargo test --workspace --all-features --no-fail-fast",
            "cargo test --workspace --all-features --doc",
            "# bench: skipped, benches/Cargo.toml has no [[bench]] target",
        ];
        assert_eq!(commands(config, &["tier-shm", "tier-mmap"]), expected);
    }

    #[test]
    fn quick_plan_with_benches_ends_in_the_harness_smoke_run() {
        let config = Config { quick: true, nextest: true, has_benches: true };
        let plan = commands(config, &["tier-shm", "tier-mmap"]);
        assert_eq!(
            plan[plan.len() - 2..],
            [
                "cargo bench --workspace --no-run",
                "cargo run --release -p workflow-context-benches --bin harness -- --quick"
            ]
        );
    }

    /// Tidy: every `crates/context-tier-<name>` crate has its `tier-<name>` feature on the front crate.
    #[test]
    fn every_tier_crate_has_a_front_feature() {
        let root = workspace_root();
        let manifest = read(&root.join("crates").join(FRONT_CRATE).join("Cargo.toml")).unwrap();
        let tiers = tier_features(&manifest);
        assert!(!tiers.is_empty(), "{FRONT_CRATE} has no {TIER_PREFIX}* features");
        for entry in fs::read_dir(root.join("crates")).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            if let Some(tier) = name.strip_prefix("context-tier-") {
                let feature = format!("{TIER_PREFIX}{tier}");
                assert!(tiers.contains(&feature), "crates/{name} has no `{feature}` feature on {FRONT_CRATE}");
            }
        }
    }
}
