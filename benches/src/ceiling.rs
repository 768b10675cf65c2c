//! The ceilings every figure is set beside: what the machine does with the same bytes
//! without workflow-context. Each function does `reps` operations and returns the seconds
//! per operation, timing only the operation; files and segments it makes are removed
//! afterwards, untimed.

use std::fs::File;
use std::hint::black_box;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rustix::fs::{FallocateFlags, Mode};
use rustix::shm;

/// Copies `src` into freshly allocated memory `reps` times: a new `Vec` below 1 MiB (as
/// `malloc` hands it out), a new anonymous mapping from 1 MiB up, so every page is touched
/// for the first time (`malloc` would hand back pages freed earlier once its threshold
/// for mapping has grown).
pub fn memcpy_fresh(src: &[u8], reps: usize) -> f64 {
    if src.len() < 1 << 20 {
        let mut keep: Vec<Vec<u8>> = Vec::with_capacity(reps);
        let t = Instant::now();
        for _ in 0..reps {
            let mut fresh = Vec::<u8>::with_capacity(src.len());
            fresh.extend_from_slice(src);
            keep.push(black_box(fresh));
        }
        let secs = t.elapsed().as_secs_f64();
        drop(keep);
        return secs / reps as f64;
    }
    let mut keep = Vec::with_capacity(reps);
    let t = Instant::now();
    for _ in 0..reps {
        let mut fresh = memmap2::MmapMut::map_anon(src.len()).expect("map anonymous memory");
        fresh.copy_from_slice(src);
        keep.push(black_box(fresh));
    }
    let secs = t.elapsed().as_secs_f64();
    drop(keep);
    secs / reps as f64
}

/// Copies `src` into `dst`, memory already touched and of the same length, `reps` times.
pub fn memcpy_warm(src: &[u8], dst: &mut [u8], reps: usize) -> f64 {
    let t = Instant::now();
    for _ in 0..reps {
        dst.copy_from_slice(black_box(src));
        black_box(&mut *dst);
    }
    t.elapsed().as_secs_f64() / reps as f64
}

/// `fs::write` of `src` to `reps` new files in `dir`.
pub fn fs_write(dir: &Path, src: &[u8], reps: usize) -> io::Result<f64> {
    let paths: Vec<PathBuf> = (0..reps).map(|i| dir.join(format!("ceiling-write-{i}"))).collect();
    let t = Instant::now();
    for p in &paths {
        std::fs::write(p, src)?;
    }
    let secs = t.elapsed().as_secs_f64();
    for p in &paths {
        std::fs::remove_file(p)?;
    }
    Ok(secs / reps as f64)
}

/// A file in `dir` holding `bytes`, for [`fs_read`]; removed on drop.
#[derive(Debug)]
pub struct ReadFile(PathBuf);

impl ReadFile {
    /// Writes `bytes` to a new file in `dir`.
    pub fn new(dir: &Path, bytes: &[u8]) -> io::Result<Self> {
        let path = dir.join(format!("ceiling-read-{}", bytes.len()));
        std::fs::write(&path, bytes)?;
        Ok(ReadFile(path))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ReadFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `fs::read` of `file` (in the page cache: just written) `reps` times.
pub fn fs_read(file: &ReadFile, reps: usize) -> io::Result<f64> {
    let mut keep = Vec::with_capacity(reps);
    let t = Instant::now();
    for _ in 0..reps {
        keep.push(black_box(std::fs::read(file.path())?));
    }
    let secs = t.elapsed().as_secs_f64();
    drop(keep);
    Ok(secs / reps as f64)
}

thread_local! {
    /// This thread's level-1 compressor and output buffer, kept between calls as the redb
    /// tier keeps its own (a new context and a new buffer cost a context allocation and a
    /// page fault every 4 KiB of output on each call: 9 to 26 % of a 1 MiB compression).
    static ZSTD1: std::cell::RefCell<Option<(zstd::bulk::Compressor<'static>, Vec<u8>)>> =
        const { std::cell::RefCell::new(None) };
}

/// One zstd level-1 compression of `src` with this thread's warm compressor and buffer;
/// returns the compressed length.
fn zstd1_warm(src: &[u8]) -> io::Result<usize> {
    ZSTD1.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = Some((zstd::bulk::Compressor::new(1)?, Vec::new()));
        }
        let (c, out) = cell.as_mut().expect("just set");
        out.clear();
        out.reserve(zstd::zstd_safe::compress_bound(src.len()));
        c.compress_to_buffer(src, out)?;
        Ok(black_box(out.len()))
    })
}

/// zstd level-1 compression of `src` (one thread, its compressor and output buffer warm,
/// as the tier's are), `reps` times.
pub fn zstd_compress(src: &[u8], reps: usize) -> io::Result<f64> {
    zstd1_warm(src)?;
    let t = Instant::now();
    for _ in 0..reps {
        zstd1_warm(black_box(src))?;
    }
    Ok(t.elapsed().as_secs_f64() / reps as f64)
}

thread_local! {
    /// This thread's decompressor, kept between calls as the redb tier keeps its own
    /// (`zstd::bulk::decompress` makes a new context on every call).
    static UNZSTD: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// One zstd decompression of `packed` into a new buffer of `len` bytes with this thread's
/// warm decompressor.
fn unzstd_warm(packed: &[u8], len: usize) -> io::Result<Vec<u8>> {
    UNZSTD.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = Some(zstd::bulk::Decompressor::new()?);
        }
        let d = cell.as_mut().expect("just set");
        let mut out = Vec::with_capacity(len);
        d.decompress_to_buffer(packed, &mut out)?;
        Ok(out)
    })
}

/// zstd decompression of `packed` (of `len` bytes before compression) into a new buffer
/// (as a load hands one back), its decompressor warm (as the tier's is), `reps` times.
pub fn zstd_decompress(packed: &[u8], len: usize, reps: usize) -> io::Result<f64> {
    unzstd_warm(packed, len)?;
    let mut keep = Vec::with_capacity(reps);
    let t = Instant::now();
    for _ in 0..reps {
        keep.push(black_box(unzstd_warm(black_box(packed), len)?));
    }
    let secs = t.elapsed().as_secs_f64();
    drop(keep);
    Ok(secs / reps as f64)
}

/// Creates the shared-memory segment `/<name>` holding `src` the way the shm tier does:
/// `shm_open`, `fallocate` of every page, `pwrite`. The segment is left in place.
pub fn shm_create(name: &str, src: &[u8]) -> io::Result<()> {
    let fd = shm::open(name, shm::OFlags::CREATE | shm::OFlags::EXCL | shm::OFlags::RDWR, Mode::from_raw_mode(0o600))?;
    if !src.is_empty() {
        rustix::fs::fallocate(&fd, FallocateFlags::empty(), 0, src.len() as u64)?;
    }
    File::from(fd).write_all_at(src, 0)
}

/// Removes the shared-memory segment `/<name>`; a missing one is fine.
pub fn shm_remove(name: &str) {
    let _ = shm::unlink(name);
}

/// A bare `shm_open` + `fallocate` + `pwrite` of `src` into `reps` new segments (named
/// after `prefix`), each unlinked afterwards, untimed.
pub fn shm_write(prefix: &str, src: &[u8], reps: usize) -> io::Result<f64> {
    let names: Vec<String> = (0..reps).map(|i| format!("/{prefix}.ceiling.{i}")).collect();
    let t = Instant::now();
    let mut result = Ok(());
    for name in &names {
        result = shm_create(name, src);
        if result.is_err() {
            break;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    for name in &names {
        shm_remove(name);
    }
    result.map(|()| secs / reps as f64)
}

/// One small `pwrite` of `buf` at the end of `file`, `reps` times: what one system call
/// costs, beside a small save (which makes none).
pub fn small_pwrite(file: &File, buf: &[u8], reps: usize) -> io::Result<f64> {
    let start = file.metadata()?.len();
    let t = Instant::now();
    for i in 0..reps {
        file.write_all_at(buf, start + (i * buf.len()) as u64)?;
    }
    let secs = t.elapsed().as_secs_f64();
    file.set_len(start)?;
    Ok(secs / reps as f64)
}

/// A random cycle through every 64-byte line of a buffer: each read's address comes from
/// the read before, so no two reads overlap, as in a hash-table lookup. One step costs what
/// a cache miss (and, past the TLB's reach, a page walk) costs at that footprint: the
/// reference for how much a small load or save may grow with the number of keys.
///
/// The buffer is an anonymous mapping advised onto 2 MiB pages, as the key table and the
/// shared-memory arenas are, so that a step pays no page walk the store does not pay.
#[derive(Debug)]
pub struct Chase {
    /// Line `i`'s first 8 bytes hold the byte offset of the line after it; the rest is
    /// padding.
    map: memmap2::MmapMut,
    /// Byte offset of the line the next read reads.
    at: usize,
}

/// Bytes of a huge page.
const HUGE_PAGE: usize = 2 << 20;

impl Chase {
    /// A cycle through `bytes` of memory (at least one line), in an order drawn from `seed`.
    ///
    /// # Panics
    /// If the memory cannot be mapped.
    pub fn new(bytes: usize, seed: u64) -> Self {
        let lines = (bytes / 64).max(1);
        let mut map = memmap2::MmapMut::map_anon(lines * 64).expect("map the chase's memory");
        // Only a hint, as for the store: where it is refused, small pages.
        if lines * 64 >= HUGE_PAGE {
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        let mut order: Vec<usize> = (0..lines).collect();
        let mut rng = crate::rng::XorShift::new(seed);
        for i in (1..lines).rev() {
            order.swap(i, rng.below(i + 1));
        }
        for (i, &line) in order.iter().enumerate() {
            let next = order[(i + 1) % lines] as u64 * 64;
            map[line * 64..line * 64 + 8].copy_from_slice(&next.to_ne_bytes());
        }
        Chase { map, at: order[0] * 64 }
    }

    /// The bytes the cycle runs through.
    pub fn bytes(&self) -> usize {
        self.map.len()
    }

    /// `reps` dependent reads, each of the line the one before named.
    pub fn run(&mut self, reps: usize) -> f64 {
        let map = &self.map[..];
        let mut at = self.at;
        let t = Instant::now();
        for _ in 0..reps {
            let word: [u8; 8] = map[at..at + 8].try_into().expect("8 bytes");
            at = u64::from_ne_bytes(word) as usize;
        }
        let secs = t.elapsed().as_secs_f64();
        self.at = black_box(at);
        secs / reps as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_run_and_clean_up() {
        let dir = tempfile::tempdir().unwrap();
        let src = vec![5u8; 100_000];
        assert!(memcpy_fresh(&src, 2) > 0.0);
        assert!(memcpy_fresh(&vec![1u8; 1 << 20], 2) > 0.0);
        let mut dst = vec![0u8; src.len()];
        assert!(memcpy_warm(&src, &mut dst, 2) > 0.0);
        assert_eq!(dst, src);
        assert!(fs_write(dir.path(), &src, 3).unwrap() > 0.0);
        let file = ReadFile::new(dir.path(), &src).unwrap();
        assert!(fs_read(&file, 2).unwrap() > 0.0);
        drop(file);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(zstd_compress(&src, 1).unwrap() > 0.0);
        let packed = zstd::bulk::compress(&src, 1).unwrap();
        assert!(zstd_decompress(&packed, src.len(), 1).unwrap() > 0.0);
        assert_eq!(unzstd_warm(&packed, src.len()).unwrap(), src);
        let prefix = crate::workload::unique_run_id("ceiling-test");
        assert!(shm_write(&prefix, &src, 2).unwrap() > 0.0);
        assert!(!Path::new(&format!("/dev/shm/{prefix}.ceiling.0")).exists());
        let log = File::create(dir.path().join("log")).unwrap();
        assert!(small_pwrite(&log, &[1; 64], 10).unwrap() > 0.0);
        assert_eq!(log.metadata().unwrap().len(), 0);
    }

    #[test]
    fn a_chase_visits_every_line_once_per_cycle() {
        let mut chase = Chase::new(64 * 1000, 3);
        assert_eq!(chase.bytes(), 64 * 1000);
        let start = chase.at;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            assert!(seen.insert(chase.at), "line {} visited twice", chase.at / 64);
            chase.run(1);
        }
        assert_eq!(chase.at, start);
        assert_eq!(Chase::new(10, 1).bytes(), 64);
    }
}
