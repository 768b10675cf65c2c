//! The one workload every benchmark shares: value sizes, value contents, the tiers and
//! how a context is made to place values in each, and criterion's timing per size.
//!
//! The criterion benches (`benches/tiers.rs`, `benches/context.rs`) and the harness
//! (`src/bin/harness/`) both take their sizes, bytes and tiers from here, so a figure
//! from one can be set beside a figure from the other.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use context_core::{Prefer, Rule, StorageTier};
use serde::{Deserialize, Serialize};
use workflow_context::{Result, SaveOptions, WorkflowContext};

use crate::rng::XorShift;

/// 2^10 bytes.
pub const KIB: usize = 1 << 10;
/// 2^20 bytes.
pub const MIB: usize = 1 << 20;
/// One 1080p RGB frame: 1920 × 1080 × 3 bytes (5.9 MiB).
pub const FRAME_LEN: usize = 1920 * 1080 * 3;
/// The small value of the small-save and small-load figures: a 50-byte string.
pub const SMALL_STRING: &str = "a lighthouse at dusk, oil on canvas, golden hour 1";

/// A value size of the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Size {
    /// How tables show it.
    pub label: &'static str,
    /// The value's length in bytes.
    pub bytes: usize,
}

/// Every value size, smallest first: 64 B, 1 KiB, 64 KiB, 1 MiB, a 1080p frame, 64 MiB, 256 MiB.
pub const SIZES: [Size; 7] = [
    Size { label: "64 B", bytes: 64 },
    Size { label: "1 KiB", bytes: KIB },
    Size { label: "64 KiB", bytes: 64 * KIB },
    Size { label: "1 MiB", bytes: MIB },
    Size { label: "6 MiB frame", bytes: FRAME_LEN },
    Size { label: "64 MiB", bytes: 64 * MIB },
    Size { label: "256 MiB", bytes: 256 * MIB },
];

/// The sizes a run uses: all of them, or up to 64 MiB for a quick run.
pub fn sizes(quick: bool) -> &'static [Size] {
    if quick { &SIZES[..SIZES.len() - 1] } else { &SIZES }
}

/// The largest size of a run: 256 MiB, or 64 MiB for a quick run.
pub fn largest(quick: bool) -> Size {
    *sizes(quick).last().expect("at least one size")
}

/// What a value's bytes look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Content {
    /// Log-like text (timestamps, step names, numbers): zstd level 1 shrinks it several
    /// times. The default content of every benchmark.
    Text,
    /// Random bytes, as noisy image data: nothing compresses them.
    Noise,
}

/// Text lines the [`Content::Text`] generator picks from.
const TEXT_LINES: usize = 512;

/// A value of `len` bytes of `content`, the same for the same `seed`.
pub fn value(len: usize, content: Content, seed: u64) -> Vec<u8> {
    let mut rng = XorShift::new(seed);
    let mut out = vec![0u8; len];
    match content {
        Content::Noise => rng.fill(&mut out),
        Content::Text => {
            let steps = ["KSampler", "VAEDecode", "CLIPTextEncode", "LoadImage", "SaveImage", "ImageScale"];
            let levels = ["INFO", "DEBUG", "WARN"];
            let lines: Vec<Vec<u8>> = (0..TEXT_LINES)
                .map(|i| {
                    format!(
                        "2025-11-29T07:{:02}:{:02}.{:03}Z {} step={} node={} seed={} cfg={}.{} latency_ms={}\n",
                        rng.below(60),
                        rng.below(60),
                        rng.below(1000),
                        levels[rng.below(levels.len())],
                        steps[i % steps.len()],
                        rng.below(40),
                        rng.next_u64() % 1_000_000_007,
                        rng.below(15),
                        rng.below(10),
                        rng.below(5000)
                    )
                    .into_bytes()
                })
                .collect();
            let mut at = 0;
            while at < len {
                let line = &lines[rng.below(TEXT_LINES)];
                let n = line.len().min(len - at);
                out[at..at + n].copy_from_slice(&line[..n]);
                // A fresh millisecond field per line, as in a real log.
                if n > 23 {
                    let ms = rng.below(1000);
                    out[at + 20] = b'0' + (ms / 100) as u8;
                    out[at + 21] = b'0' + (ms / 10 % 10) as u8;
                    out[at + 22] = b'0' + (ms % 10) as u8;
                }
                at += n;
            }
        }
    }
    out
}

/// A storage tier of the workspace, benchmarked alone or through a context.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Tier {
    /// RAM: POSIX shared memory (`context-tier-shm`).
    Shm,
    /// Disk: a mapped file per value (`context-tier-mmap`).
    Mmap,
    /// Disk: zstd-compressed values in one redb database (`context-tier-redb`).
    Redb,
}

impl Tier {
    /// Every tier, RAM first.
    pub const ALL: [Tier; 3] = [Tier::Shm, Tier::Mmap, Tier::Redb];

    /// The tier's own name, as `storage_info` reports it.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Shm => "shm",
            Tier::Mmap => "mmap",
            Tier::Redb => "redb",
        }
    }

    /// Builds the tier alone over `dir` (which must exist), as a context would, for the
    /// run `run_id`.
    pub fn build(self, dir: &Path, run_id: &str) -> Result<Arc<dyn StorageTier>> {
        Ok(match self {
            Tier::Shm => Arc::new(context_tier_shm::ShmTier::new(context_tier_shm::ShmConfig::new(run_id))?),
            Tier::Mmap => {
                Arc::new(context_tier_mmap::MmapTier::new(context_tier_mmap::MmapConfig::new(dir.join("values")))?)
            }
            Tier::Redb => {
                Arc::new(context_tier_redb::RedbTier::new(context_tier_redb::RedbConfig::new(dir.join("values.redb")))?)
            }
        })
    }

    /// The placement policy that sends every value to this tier and nowhere else (a save
    /// that does not fit fails rather than landing elsewhere).
    pub fn policy(self) -> Prefer {
        Prefer::first(Rule::named(self.name()))
    }

    /// The save options for this tier: values for a disk tier stay out of RAM.
    pub fn save_options(self) -> SaveOptions {
        SaveOptions::new().use_ram(self == Tier::Shm)
    }

    /// A new context in `dir` with a RAM budget of `ram_budget` bytes whose handle places
    /// every value in this tier.
    pub fn context(self, dir: &Path, ram_budget: u64) -> Result<WorkflowContext> {
        WorkflowContext::builder()
            .contexts_dir(dir)
            .max_ram_bytes(ram_budget)
            .run_id(unique_run_id(self.name()))
            .policy(self.policy())
            .create()
    }
}

/// A run id unique on this machine: `<tag>-<pid>-<counter>-<time>`.
pub fn unique_run_id(tag: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let tag: String = tag.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').take(20).collect();
    format!("{tag}-{}-{n}-{:x}", std::process::id(), nanos % (1 << 40))
}

/// How criterion measures one size: few, short samples for large values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CriterionTiming {
    /// Samples per benchmark.
    pub sample_size: usize,
    /// Warm-up time.
    pub warm_up: Duration,
    /// Measurement time.
    pub measurement: Duration,
    /// Whether every sample runs the same number of iterations (`SamplingMode::Flat`),
    /// which keeps slow benchmarks from running 55 times the minimum.
    pub flat: bool,
}

/// Criterion's timing for values of `bytes`, chosen so that `cargo bench` of everything
/// takes minutes, not hours, on two cores.
pub fn criterion_timing(bytes: usize) -> CriterionTiming {
    let ms = Duration::from_millis;
    match bytes {
        b if b < MIB => CriterionTiming { sample_size: 20, warm_up: ms(300), measurement: ms(1000), flat: false },
        b if b < 64 * MIB => CriterionTiming { sample_size: 10, warm_up: ms(300), measurement: ms(1500), flat: true },
        _ => CriterionTiming { sample_size: 10, warm_up: ms(200), measurement: ms(2000), flat: true },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_grow_and_quick_stops_at_64_mib() {
        assert!(SIZES.windows(2).all(|w| w[0].bytes < w[1].bytes));
        assert_eq!(largest(false).bytes, 256 * MIB);
        assert_eq!(largest(true).bytes, 64 * MIB);
        assert_eq!(SMALL_STRING.len(), 50);
    }

    #[test]
    fn values_are_repeatable_and_text_compresses() {
        assert_eq!(value(1000, Content::Text, 1), value(1000, Content::Text, 1));
        assert_ne!(value(1000, Content::Noise, 1), value(1000, Content::Noise, 2));
        let text = value(256 * KIB, Content::Text, 1);
        assert!(text.iter().all(|b| b.is_ascii()));
        let packed = zstd::bulk::compress(&text, 1).unwrap();
        assert!(packed.len() * 3 < text.len(), "text shrinks only to {} of {}", packed.len(), text.len());
        let noise = value(256 * KIB, Content::Noise, 1);
        assert!(zstd::bulk::compress(&noise, 1).unwrap().len() >= noise.len());
    }

    #[test]
    fn run_ids_are_valid_and_unique() {
        let a = unique_run_id("a tag/with junk");
        let b = unique_run_id("a tag/with junk");
        assert_ne!(a, b);
        workflow_context::core::validate_run_id(&a).unwrap();
    }
}
