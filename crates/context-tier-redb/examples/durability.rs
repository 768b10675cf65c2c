//! Measures what the redb tier costs, for its crate docs.
//!
//! ```text
//! cargo run --release -p context-tier-redb --example durability [DIR]
//! ```
//!
//! DIR (default: the system's temporary directory) is where the database files go; put it
//! on the file system the contexts will use, since `fsync` costs depend on it.
//!
//! 1. The latency of a 50-byte put (insert + commit) and get, for
//!    (a) redb alone in one process: `ConcurrencyMode::ExclusiveWriter`, `Durability::None`;
//!    (b) redb shared by processes: `ConcurrencyMode::MultiWriter` over redb's `FileBackend`,
//!    whose durable commits `fsync` twice;
//!    (c) the tier: `MultiWriter` over its backend without `fsync`, through `RedbTier`
//!    (so including the blob encoding and the attempt to compress 50 bytes).
//! 2. Compression throughput of the tier's put and get on compressible data, beside zstd
//!    level 1 alone (one thread, in memory) on the same bytes; and put and get of
//!    incompressible data, beside a plain file write. Each get is the first through a new
//!    instance, as another process would make it.

use std::path::Path;
use std::time::{Duration, Instant};

use context_core::{NewObject, ObjectData, ObjectId, ObjectRef, PutOutcome, StorageTier};
use context_tier_redb::{RedbConfig, RedbTier};
use redb::{ConcurrencyMode, Database, Durability, ReadableDatabase, TableDefinition};

const TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("objects");
const VALUE: [u8; 50] = *b"a fifty-byte value, as a small result of a step.!!";

/// Median and 99th percentile of `samples`, in microseconds.
fn summary(mut samples: Vec<Duration>) -> String {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    format!("median {:>8.1} µs   p99 {:>8.1} µs", at(0.5), at(0.99))
}

fn time(n: u64, mut op: impl FnMut(u64)) -> Vec<Duration> {
    (0..n)
        .map(|i| {
            let start = Instant::now();
            op(i);
            start.elapsed()
        })
        .collect()
}

fn raw_put(db: &Database, id: u64, durability: Option<Durability>) {
    let mut txn = db.begin_write().unwrap();
    if let Some(durability) = durability {
        txn.set_durability(durability).unwrap();
    }
    txn.open_table(TABLE).unwrap().insert(id, &VALUE[..]).unwrap();
    txn.commit().unwrap();
}

fn raw_get(db: &Database, id: u64) -> Vec<u8> {
    let txn = db.begin_read().unwrap();
    let table = txn.open_table(TABLE).unwrap();
    table.get(id).unwrap().unwrap().value().to_vec()
}

fn report(label: &str, n: u64, puts: Vec<Duration>, gets: Vec<Duration>) {
    println!("{label}");
    println!("    put ({n}×)  {}", summary(puts));
    println!("    get ({n}×)  {}", summary(gets));
}

fn tier_put(tier: &RedbTier, id: u64, bytes: &[u8]) -> ObjectRef {
    let parts: [&[u8]; 1] = [bytes];
    match tier.put(NewObject { id: ObjectId(id), len: bytes.len() as u64, data: ObjectData::Parts(&parts) }) {
        Ok(PutOutcome::Stored(r)) => r,
        other => panic!("put failed: {other:?}"),
    }
}

fn latencies(dir: &Path) {
    let n = 2000;
    let db = Database::create(dir.join("a.redb")).unwrap();
    let puts = time(n, |i| raw_put(&db, i, Some(Durability::None)));
    let gets = time(n, |i| assert_eq!(raw_get(&db, i), VALUE));
    report("(a) ExclusiveWriter, Durability::None (one process only)", n, puts, gets);
    drop(db);

    let n_sync = 300;
    let db =
        redb::Builder::new().set_concurrency_mode(ConcurrencyMode::MultiWriter).create(dir.join("b.redb")).unwrap();
    let puts = time(n_sync, |i| raw_put(&db, i, None));
    let gets = time(n_sync, |i| assert_eq!(raw_get(&db, i), VALUE));
    report("(b) MultiWriter, FileBackend (durable commits, 2 × fsync each)", n_sync, puts, gets);
    drop(db);

    let tier = RedbTier::new(RedbConfig::new(dir.join("c.redb"))).unwrap();
    let refs: Vec<ObjectRef> = (0..n).map(|i| ObjectRef { id: ObjectId(i), len: 50, slot: 0, held: 0 }).collect();
    let puts = time(n, |i| {
        tier_put(&tier, i, &VALUE);
    });
    let gets = time(n, |i| assert_eq!(tier.get(&refs[i as usize]).unwrap().as_deref(), Some(&VALUE[..])));
    report("(c) MultiWriter, no-fsync backend, through RedbTier (chosen)", n, puts, gets);
    tier.destroy().unwrap();
}

/// Compressible bytes: a log-like text.
fn text(len: usize) -> Vec<u8> {
    (0u32..)
        .flat_map(|i| format!("{i:08} step=transform status=ok rows={} took={}ms\n", i % 1000, i % 37).into_bytes())
        .take(len)
        .collect()
}

fn best(runs: usize, mut op: impl FnMut()) -> Duration {
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            op();
            start.elapsed()
        })
        .min()
        .unwrap()
}

/// The best of five gets, each the first through a new instance on the same file, as in
/// another process: the file is in the page cache, but not in that instance's redb cache.
fn cold_get(tier: &RedbTier, r: &ObjectRef) -> Duration {
    (0..5)
        .map(|_| {
            let reader = RedbTier::new(RedbConfig::new(tier.path())).unwrap();
            let start = Instant::now();
            assert_eq!(reader.get(r).unwrap().unwrap().len() as u64, r.len);
            start.elapsed()
        })
        .min()
        .unwrap()
}

fn mbps(bytes: usize, took: Duration) -> String {
    format!("{:>7.0} MB/s", bytes as f64 / took.as_secs_f64() / 1e6)
}

fn throughput(dir: &Path) {
    let tier = RedbTier::new(RedbConfig::new(dir.join("t.redb"))).unwrap();
    let random = context_core::testing::pattern(1, 16 << 20);
    let mut id = 0;
    for (label, bytes) in [
        ("100 KB of text (one frame)", text(100_000)),
        ("1 MiB of text (two frames, 2 threads)", text(1 << 20)),
        ("16 MiB of text (chunks, 2 threads)", text(16 << 20)),
    ] {
        let compressed = zstd::bulk::compress(&bytes, 1).unwrap();
        let zstd_c = best(5, || drop(zstd::bulk::compress(&bytes, 1).unwrap()));
        let zstd_d = best(5, || drop(zstd::bulk::decompress(&compressed, bytes.len()).unwrap()));
        let mut held = 0;
        let put = best(5, || {
            id += 1;
            held = tier_put(&tier, id, &bytes).held;
        });
        let r = ObjectRef { id: ObjectId(id), len: bytes.len() as u64, slot: 0, held };
        let get = cold_get(&tier, &r);
        println!("{label}: zstd -1 ratio {:.1}, tier holds {held} bytes", bytes.len() as f64 / compressed.len() as f64);
        println!(
            "    zstd -1 alone, 1 thread:  compress {}   decompress {}",
            mbps(bytes.len(), zstd_c),
            mbps(bytes.len(), zstd_d)
        );
        println!(
            "    tier put / get:           put      {}   get        {}",
            mbps(bytes.len(), put),
            mbps(bytes.len(), get)
        );
    }
    let put = best(3, || {
        id += 1;
        tier_put(&tier, id, &random);
    });
    let r = ObjectRef { id: ObjectId(id), len: random.len() as u64, slot: 0, held: 0 };
    let get = cold_get(&tier, &r);
    let mut file = 0;
    let plain = best(3, || {
        file += 1;
        std::fs::write(dir.join(format!("plain-{file}")), &random).unwrap();
    });
    println!("16 MiB incompressible (chunks stored raw):");
    println!("    plain file write, no fsync: {}", mbps(random.len(), plain));
    println!(
        "    tier put / get:           put      {}   get        {}",
        mbps(random.len(), put),
        mbps(random.len(), get)
    );
    tier.destroy().unwrap();
}

fn main() {
    let scratch = match std::env::args_os().nth(1) {
        Some(dir) => tempfile::tempdir_in(dir),
        None => tempfile::tempdir(),
    }
    .unwrap();
    println!("database files in {}\n", scratch.path().display());
    latencies(scratch.path());
    println!();
    throughput(scratch.path());
}
