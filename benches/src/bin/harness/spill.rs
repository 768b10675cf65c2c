//! Spill: a working set of 1080p frames four times the RAM budget, read with a Zipf skew.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::time::Instant;

use serde_json::json;
use workflow_context::WorkflowContext;
use workflow_context_benches::ceiling;
use workflow_context_benches::measure::{Subject, gbps, rounds, show_secs, three_digits};
use workflow_context_benches::rng::{XorShift, Zipf};
use workflow_context_benches::workload::{Content, FRAME_LEN, MIB, value};

use crate::report::{Floor, Section};
use crate::{Res, Run};

/// The Zipf exponent of the reads.
const SKEW: f64 = 0.8;

/// Bytes the run's segments hold in `/dev/shm` right now (allocated blocks, not lengths).
fn shm_bytes(run_id: &str) -> u64 {
    let prefix = format!("wfctx.{run_id}.");
    let Ok(entries) = std::fs::read_dir("/dev/shm") else { return 0 };
    entries
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(&prefix)))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

pub(crate) fn run(run: &mut Run) -> Res<()> {
    let budget: u64 = if run.quick { 64 * MIB as u64 } else { 256 * MIB as u64 };
    let frames = (4 * budget).div_ceil(FRAME_LEN as u64) as usize;
    let reads = if run.quick { 400 } else { 3000 };
    let ctx = WorkflowContext::builder().contexts_dir(&run.dir).max_ram_bytes(budget).create()?;
    // A few distinct frames, each saved under many keys with its index stamped in front.
    let mut sources: Vec<Vec<u8>> = (0..4).map(|i| value(FRAME_LEN, Content::Noise, 100 + i)).collect();
    let keys: Vec<String> = (0..frames).map(|i| format!("frame-{i:04}")).collect();
    let mut ram_max = 0u64;
    let mut shm_max = 0u64;
    let mut save_secs: BTreeMap<String, f64> = BTreeMap::new();
    let mut tier_of: Vec<String> = Vec::with_capacity(frames);
    let mut per_tier: BTreeMap<String, usize> = BTreeMap::new();
    let mut save_total = 0.0;
    for (i, key) in keys.iter().enumerate() {
        let src = &mut sources[i % 4];
        src[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let t = Instant::now();
        ctx.save_bytes(key, src, Default::default())?;
        let secs = t.elapsed().as_secs_f64();
        save_total += secs;
        let tier = ctx.storage_info(key)?.map_or_else(|| "?".to_owned(), |info| info.tier);
        *save_secs.entry(tier.clone()).or_default() += secs;
        *per_tier.entry(tier.clone()).or_default() += 1;
        tier_of.push(tier);
        ram_max = ram_max.max(ctx.usage()?.ram_usage_bytes);
        shm_max = shm_max.max(shm_bytes(ctx.run_id()));
    }
    let usage = ctx.usage()?;

    // Reads: ranks shuffled over the frames, so the hot ones fall in RAM and on disk alike.
    let zipf = Zipf::new(frames, SKEW);
    let mut order: Vec<usize> = (0..frames).collect();
    let mut rng = XorShift::new(8);
    rng.shuffle(&mut order);
    let picks: Vec<usize> = (0..reads).map(|_| order[zipf.sample(&mut rng)]).collect();
    let mut buf = vec![1u8; FRAME_LEN];
    let mut reads_per_tier: BTreeMap<&str, usize> = BTreeMap::new();
    let mut first_reads = 0;
    // Per tier: the first reads of frames in this process (each checks its checksum) and
    // their time; the later ones are handed the view checked then.
    let mut first_per_tier: BTreeMap<&str, (usize, f64)> = BTreeMap::new();
    let mut seen = vec![false; frames];
    let t = Instant::now();
    for &i in &picks {
        let first = !seen[i];
        let started = first.then(Instant::now);
        let frame = ctx.load_bytes(&keys[i])?;
        buf.copy_from_slice(&frame);
        std::hint::black_box(&mut buf);
        *reads_per_tier.entry(&tier_of[i]).or_default() += 1;
        if let Some(started) = started {
            seen[i] = true;
            first_reads += 1;
            let (n, secs) = first_per_tier.entry(&tier_of[i]).or_default();
            *n += 1;
            *secs += started.elapsed().as_secs_f64();
        }
    }
    let read_secs = t.elapsed().as_secs_f64();
    let read_bytes = reads * FRAME_LEN;

    // The ceilings, on one frame.
    let frame = &sources[0];
    let mut warm = vec![1u8; FRAME_LEN];
    let dir = run.dir.clone();
    let prefix = run.shm_prefix.clone();
    let mut subjects = vec![
        Subject::new("memcpy warm", |reps| ceiling::memcpy_warm(frame, &mut warm, reps)),
        Subject::new("fs::write", |reps| crate::ok(ceiling::fs_write(&dir, frame, reps), "fs::write")),
        Subject::new("bare shm write", |reps| crate::ok(ceiling::shm_write(&prefix, frame, reps), "shm write")),
    ];
    rounds(&mut subjects, run.rounds(), run.target(), 20);
    let ceil: BTreeMap<String, f64> = subjects.iter().map(|s| (s.name.clone(), s.median())).collect();
    drop(subjects);
    ctx.shutdown()?;

    let mut tbl = Section::new(
        "Spill: 1080p frames, four times the RAM budget",
        &format!(
            "{frames} frames of {FRAME_LEN} bytes ({:.0} MiB) saved into a context with a RAM budget of {} MiB, then \
             {reads} `load_bytes` + copy into a warm buffer, frames picked with Zipf s = {SKEW} (ranks shuffled \
             over the frames; {first_reads} of the reads were a frame's first in this process, which checks its \
             checksum). Ceilings: one frame, measured in the same run.",
            (frames * FRAME_LEN) as f64 / MIB as f64,
            budget / MIB as u64
        ),
        &["figure", "measured", "ceiling"],
    );
    let where_ = per_tier.iter().map(|(t, n)| format!("{t}: {n}")).collect::<Vec<_>>().join(", ");
    tbl.row(vec!["frames per tier (`storage_info`)".into(), where_.clone(), String::new()]);
    for (tier, secs) in &save_secs {
        let n = per_tier[tier];
        let ceiling_name = if tier == "shm" { "bare shm write" } else { "fs::write" };
        tbl.row(vec![
            format!("save into {tier}"),
            format!("{} GB/s ({} a frame)", three_digits(gbps(n * FRAME_LEN, *secs)), show_secs(secs / n as f64)),
            format!("{ceiling_name} {} GB/s", three_digits(gbps(FRAME_LEN, ceil[ceiling_name]))),
        ]);
    }
    tbl.row(vec![
        "save, all frames".into(),
        format!("{} GB/s", three_digits(gbps(frames * FRAME_LEN, save_total))),
        String::new(),
    ]);
    let reads_where = reads_per_tier.iter().map(|(t, n)| format!("{t}: {n}")).collect::<Vec<_>>().join(", ");
    tbl.row(vec![
        "skewed reads (load_bytes + copy)".into(),
        format!(
            "{} GB/s, {:.0} reads/s ({reads_where})",
            three_digits(gbps(read_bytes, read_secs)),
            reads as f64 / read_secs
        ),
        format!("memcpy warm {} GB/s", three_digits(gbps(FRAME_LEN, ceil["memcpy warm"]))),
    ]);
    for (tier, (n, secs)) in &first_per_tier {
        tbl.row(vec![
            format!("first read of a frame in {tier} (checks its checksum), + copy"),
            format!(
                "{} GB/s ({} a frame, {n} frames)",
                three_digits(gbps(n * FRAME_LEN, *secs)),
                show_secs(secs / *n as f64)
            ),
            format!("memcpy warm {} GB/s", three_digits(gbps(FRAME_LEN, ceil["memcpy warm"]))),
        ]);
    }
    tbl.row(vec![
        "RAM budget held: `usage()` max".into(),
        format!(
            "{:.1} MiB of {} MiB ({:.0} %)",
            ram_max as f64 / MIB as f64,
            budget / MIB as u64,
            100.0 * ram_max as f64 / budget as f64
        ),
        format!(
            "payload of the frames in RAM: {:.1} MiB",
            (per_tier.get("shm").copied().unwrap_or(0) * FRAME_LEN) as f64 / MIB as f64
        ),
    ]);
    tbl.row(vec![
        "RAM really held: `/dev/shm` blocks max".into(),
        format!("{:.1} MiB", shm_max as f64 / MIB as f64),
        format!(
            "`usage()` at the end: {:.1} MiB RAM, {:.1} MiB disk",
            usage.ram_usage_bytes as f64 / MIB as f64,
            usage.temp_disk_usage_bytes as f64 / MIB as f64
        ),
    ]);
    tbl.data(json!({
        "frames": frames, "frame_bytes": FRAME_LEN, "ram_budget": budget, "per_tier": per_tier,
        "save_seconds_per_tier": save_secs, "reads": reads, "read_seconds": read_secs,
        "reads_per_tier": reads_per_tier, "first_reads": first_reads, "first_reads_per_tier": first_per_tier,
        "usage_ram_max": ram_max, "dev_shm_max": shm_max, "ceilings_seconds": ceil,
    }));
    run.sections.push(tbl);
    run.floors.push(Floor::info(
        format!("spill: RAM budget held ({} MiB budget, 4x working set)", budget / MIB as u64),
        format!("{:.0} %", 100.0 * ram_max as f64 / budget as f64),
        ram_max as f64 / budget as f64,
        format!(
            "`usage()` max {:.1} MiB; /dev/shm max {:.1} MiB; frames per tier: {where_}",
            ram_max as f64 / MIB as f64,
            shm_max as f64 / MIB as f64
        ),
    ));
    Ok(())
}
