//! Timing and memory measurement: rounds in rotating order, medians, and the kernel's
//! record of a process's memory.

use std::time::{Duration, Instant};

/// Seconds taken by `f`.
pub fn seconds(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

/// The median of `samples` (the mean of the middle two for an even count); NaN if empty.
pub fn median(samples: &[f64]) -> f64 {
    let mut s: Vec<f64> = samples.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// The smallest of `samples`; NaN if empty.
pub fn best(samples: &[f64]) -> f64 {
    samples.iter().copied().reduce(f64::min).unwrap_or(f64::NAN)
}

/// The largest of `values`, for a "worst of" figure checked against a floor: NaN if any
/// is NaN (a figure that was not measured must not pass) or if there are none. Not
/// `fold(0.0, f64::max)`, which drops NaN and turns "nothing measured" into 0.
pub fn worst(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut out: Option<f64> = None;
    for v in values {
        out = Some(match out {
            _ if v.is_nan() => return f64::NAN,
            Some(o) => o.max(v),
            None => v,
        });
    }
    out.unwrap_or(f64::NAN)
}

/// One thing to measure in [`rounds`]: `run(reps)` does `reps` operations and returns the
/// seconds per operation, timing only the operations (cleanup between them is untimed).
pub struct Subject<'a> {
    /// What is measured, for tables.
    pub name: String,
    /// Runs `reps` operations; returns seconds per operation.
    pub run: Box<dyn FnMut(usize) -> f64 + 'a>,
    /// How many operations one measurement does; [`rounds`] sets it after the warm-up.
    pub reps: usize,
    /// The most operations one measurement may do, if not the caller's limit.
    pub cap: Option<usize>,
    /// Seconds per operation, one per counted round.
    pub samples: Vec<f64>,
}

impl<'a> Subject<'a> {
    /// A subject named `name`.
    pub fn new(name: impl Into<String>, run: impl FnMut(usize) -> f64 + 'a) -> Self {
        Subject { name: name.into(), run: Box::new(run), reps: 1, cap: None, samples: Vec::new() }
    }

    /// Lets one measurement do up to `reps` operations, whatever the caller's limit (for
    /// operations whose outputs are small whatever the value's size).
    #[must_use]
    pub fn cap(mut self, reps: usize) -> Self {
        self.cap = Some(reps);
        self
    }

    /// The median seconds per operation.
    pub fn median(&self) -> f64 {
        median(&self.samples)
    }

    /// The best seconds per operation.
    pub fn best(&self) -> f64 {
        best(&self.samples)
    }
}

/// Measures `subjects` against each other: a warm-up round (which also sizes each
/// subject's measurement to last about `target` by the wall clock, between 1 and its cap
/// or `max_reps` operations, timed on a batch of them rather than on one), then `counted`
/// rounds. Each round runs every subject once, starting from a different subject each
/// time, so none always runs first (first touches of memory are slow on a VM) and a drift
/// in the machine's speed falls on all alike. A measurement of several short operations is
/// preceded by an untimed quarter of it, so that it starts with the caches and the
/// allocator warmed by its own kind of work rather than by the subject before it.
///
/// With `WFBENCH_TRACE` set in the environment, every measurement is printed to stderr.
pub fn rounds(subjects: &mut [Subject<'_>], counted: usize, target: Duration, max_reps: usize) {
    let n = subjects.len();
    let trace = std::env::var_os("WFBENCH_TRACE").is_some();
    for s in subjects.iter_mut() {
        s.reps = reps_for(s, target, max_reps);
    }
    for round in 0..counted {
        for k in 0..n {
            let s = &mut subjects[(round + k) % n];
            if s.reps > 1 {
                (s.run)(s.reps.div_ceil(4));
            }
            let per_op = (s.run)(s.reps);
            if trace {
                eprintln!("    round {round}: {:<24} {:>7} reps {}", s.name, s.reps, show_secs(per_op));
            }
            s.samples.push(per_op);
        }
    }
}

/// How many operations of `s` last about `target` by the wall clock (untimed setup and
/// cleanup count against the target too), between 1 and its cap or `max_reps`.
///
/// Sized from a batch of at least a fortieth of the target, doubling from one operation,
/// and the faster of two runs of that batch (the very first may pay for one-time setup). A
/// single short operation costs what a cold one costs, plus the clock's own overhead, and
/// would size the measurement at a fraction of the target: a small load at 100,000 keys
/// measured 15,000 operations instead of about 40,000.
fn reps_for(s: &mut Subject<'_>, target: Duration, max_reps: usize) -> usize {
    let cap = s.cap.unwrap_or(max_reps).max(1);
    let enough = target.as_secs_f64() / 40.0;
    let mut batch = |n: usize| {
        let t = Instant::now();
        let timed = (s.run)(n) * n as f64;
        t.elapsed().as_secs_f64().max(timed).max(1e-9)
    };
    let mut n = 1;
    let mut wall = batch(n);
    while wall < enough && n < cap {
        n = (n * 2).min(cap);
        wall = batch(n);
    }
    let wall = wall.min(batch(n));
    ((target.as_secs_f64() * n as f64 / wall) as usize).clamp(1, cap)
}

/// A field of `/proc/self/status` in KiB (`VmHWM`, `VmRSS`, `RssAnon`, `RssShmem`, ...).
pub fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.strip_prefix(field).is_some_and(|rest| rest.starts_with(':')))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resets the kernel's peak-RSS record (`VmHWM`) to the current RSS, so the next reading
/// is the peak of what follows. Returns whether the kernel allowed it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Bytes per second as GB/s (10^9 bytes).
pub fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// A duration in seconds, shown with a unit that suits it: `83 ns`, `2.41 us`, `81.3 ms`.
pub fn show_secs(secs: f64) -> String {
    let (v, unit) = match secs {
        s if !s.is_finite() => return "n/a".to_owned(),
        s if s < 1e-6 => (s * 1e9, "ns"),
        s if s < 1e-3 => (s * 1e6, "us"),
        s if s < 1.0 => (s * 1e3, "ms"),
        s => (s, "s"),
    };
    format!("{} {unit}", three_digits(v))
}

/// A number with three significant digits (`0.0234`, `2.41`, `81.3`), or as an integer
/// when it is 100 or more.
pub fn three_digits(v: f64) -> String {
    match v.abs() {
        a if !a.is_finite() => "n/a".to_owned(),
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 10.0 => format!("{v:.1}"),
        a if a >= 1.0 || a == 0.0 => format!("{v:.2}"),
        a => format!("{v:.*}", (2 - a.log10().floor() as i64).clamp(3, 12) as usize),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_units() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(best(&[3.0, 1.0]), 1.0);
        assert_eq!(show_secs(83e-9), "83.0 ns");
        assert_eq!(show_secs(2.414e-6), "2.41 us");
        assert_eq!(show_secs(0.0813), "81.3 ms");
        assert_eq!(show_secs(120.0), "120 s");
        assert_eq!(gbps(1_000_000_000, 2.0), 0.5);
        assert_eq!(three_digits(0.5), "0.500");
        assert_eq!(three_digits(0.0234), "0.0234");
        assert_eq!(three_digits(1234.5), "1234");
    }

    #[test]
    fn a_worst_of_figures_keeps_nan() {
        assert!(worst([f64::NAN, 1.0e-6]).is_nan());
        assert!(worst([]).is_nan());
        assert_eq!(worst([1.0, 3.0, 2.0]), 3.0);
    }

    #[test]
    fn rounds_rotate_and_count() {
        let order = std::cell::RefCell::new(Vec::new());
        let mut subjects: Vec<Subject<'_>> = (0..3)
            .map(|i| {
                let order = &order;
                Subject::new(format!("s{i}"), move |_| {
                    order.borrow_mut().push(i);
                    1.0
                })
            })
            .collect();
        rounds(&mut subjects, 3, Duration::from_millis(1), 10);
        assert!(subjects.iter().all(|s| s.samples.len() == 3 && s.reps == 1));
        // Warm-up 0,0,1,1,2,2; then rounds starting at 0, 1, 2.
        assert_eq!(*order.borrow(), [0, 0, 1, 1, 2, 2, 0, 1, 2, 1, 2, 0, 2, 0, 1]);
    }

    #[test]
    fn short_operations_are_sized_from_a_batch() {
        // Each call costs 5 us beyond its operations of 1 us each (a cold first operation,
        // the clock): sized from one operation, the measurement would do 10 ms / 6 us = 1,666.
        let mut s = Subject::new("short", |n| (5e-6 + n as f64 * 1e-6) / n as f64);
        let reps = reps_for(&mut s, Duration::from_millis(10), 1_000_000);
        assert!((9_000..=10_000).contains(&reps), "{reps}");
        // The cap holds, and so does the least of one operation.
        assert_eq!(reps_for(&mut s, Duration::from_millis(10), 100), 100);
        let mut slow = Subject::new("slow", |_| 1.0);
        assert_eq!(reps_for(&mut slow, Duration::from_millis(10), 100), 1);
    }

    #[test]
    fn reads_its_own_status() {
        assert!(status_kib("VmRSS").is_some_and(|kib| kib > 0));
        assert!(status_kib("NoSuchField").is_none());
    }
}
