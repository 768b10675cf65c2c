//! Measures the peak memory and the throughput of putting and getting large values, for the
//! crate docs.
//!
//! ```text
//! cargo run --release -p context-tier-redb --example peak_memory [DIR] [MIB]
//! ```
//!
//! DIR (default: the system's temporary directory) is where the database file goes; MIB
//! (default 256) is the value's size. Each measurement runs in a fresh child process (this
//! program again), which:
//! 1. opens the tier, warms it up with a 1 MiB put, get and delete;
//! 2. builds the value (log-like text with random fields, or random bytes) and holds it;
//! 3. resets the kernel's high-water mark (`/proc/self/clear_refs`) and reads `VmHWM`;
//! 4. puts the value streamed through [`ObjectData::Write`] (as `workflow-context` does),
//!    in 64 KiB pieces, and reads `VmHWM` again: the difference is what the put cost;
//! 5. then, in a new instance (as another process would), gets it back, keeping the payload;
//!    `VmHWM` above the value held is what the get cost beyond its result.
//!
//! Times are of one put and one get each (wall clock), not the best of several.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use context_core::{Error, NewObject, ObjectData, ObjectId, ObjectRef, PutOutcome, StorageTier};
use context_tier_redb::{RedbConfig, RedbTier};

const CHILD: &str = "--child";
const MIB: usize = 1 << 20;

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Log-like text with random fields, like the benchmark harness's text values.
fn text(len: usize) -> Vec<u8> {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let steps = ["KSampler", "VAEDecode", "CLIPTextEncode", "LoadImage", "SaveImage", "ImageScale"];
    let lines: Vec<Vec<u8>> = (0..512)
        .map(|i| {
            format!(
                "2025-11-29T07:{:02}:{:02}.{:03}Z INFO step={} node={} seed={} latency_ms={}\n",
                rng.below(60),
                rng.below(60),
                rng.below(1000),
                steps[i % steps.len()],
                rng.below(40),
                rng.next() % 1_000_000_007,
                rng.below(5000)
            )
            .into_bytes()
        })
        .collect();
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let line = &lines[rng.below(lines.len() as u64) as usize];
        let n = line.len().min(len - out.len());
        let at = out.len();
        out.extend_from_slice(&line[..n]);
        // A fresh millisecond field per line, as in a real log.
        if n > 23 {
            let ms = rng.below(1000);
            out[at + 20] = b'0' + (ms / 100) as u8;
            out[at + 21] = b'0' + (ms / 10 % 10) as u8;
            out[at + 22] = b'0' + (ms % 10) as u8;
        }
    }
    out
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field) && l[field.len()..].starts_with(':')).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
}

fn put_streamed(tier: &RedbTier, id: u64, bytes: &[u8]) -> ObjectRef {
    let mut write = |out: &mut dyn std::io::Write| {
        bytes.chunks(64 << 10).try_for_each(|piece| out.write_all(piece)).map_err(|e| Error::io("write", "value", e))
    };
    match tier.put(NewObject { id: ObjectId(id), len: bytes.len() as u64, data: ObjectData::Write(&mut write) }) {
        Ok(PutOutcome::Stored(r)) => r,
        other => panic!("put failed: {other:?}"),
    }
}

/// In the child: measures one put and one get of `len` bytes of `kind`; prints one line.
fn child(path: &Path, kind: &str, len: usize) {
    let tier = RedbTier::new(RedbConfig::new(path)).unwrap();
    let warm = text(MIB);
    let r = put_streamed(&tier, 1, &warm);
    drop(tier.get(&r).unwrap());
    tier.delete(&r).unwrap();
    let value = if kind == "text" { text(len) } else { context_core::testing::pattern(7, len) };

    reset_peak();
    let base = status_kib("VmHWM");
    let start = Instant::now();
    let r = put_streamed(&tier, 2, &value);
    let put_secs = start.elapsed().as_secs_f64();
    let put_peak = status_kib("VmHWM") - base;

    let reader = RedbTier::new(RedbConfig::new(path)).unwrap();
    reset_peak();
    let base = status_kib("VmHWM");
    let start = Instant::now();
    let got = reader.get(&r).unwrap().unwrap();
    let get_secs = start.elapsed().as_secs_f64();
    let get_peak = status_kib("VmHWM") - base;
    assert!(*got == *value);
    drop(got);
    tier.delete(&r).unwrap();
    let over = |kib: u64| kib as f64 / 1024.0;
    println!(
        "{len_mib:>4} MiB {kind:<6} held {held:>10}  put {put:>6.0} MB/s  peak +{put_peak:>6.1} MiB   \
         get {get:>6.0} MB/s  peak value {get_over:+6.1} MiB",
        len_mib = len / MIB,
        held = r.held,
        put = len as f64 / put_secs / 1e6,
        put_peak = over(put_peak),
        get = len as f64 / get_secs / 1e6,
        get_over = over(get_peak) - (len / MIB) as f64,
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(CHILD) {
        child(Path::new(&args[2]), &args[3], args[4].parse().unwrap());
        return;
    }
    let scratch = match args.get(1) {
        Some(dir) => tempfile::tempdir_in(dir),
        None => tempfile::tempdir(),
    }
    .unwrap();
    let mib: usize = args.get(2).map_or(256, |m| m.parse().unwrap());
    let path: PathBuf = scratch.path().join("peak.redb");
    println!("database file {}; put: VmHWM above the value held; get: VmHWM above the result", path.display());
    for len in [16 * MIB, mib * MIB] {
        for kind in ["text", "random"] {
            let status = Command::new(std::env::current_exe().unwrap())
                .args([CHILD, path.to_str().unwrap(), kind, &len.to_string()])
                .status()
                .unwrap();
            assert!(status.success(), "the child failed: {status}");
        }
    }
}
