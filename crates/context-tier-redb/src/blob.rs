//! The stored forms of an object, described in the [crate] docs: a small object is one blob
//! (a header, then its bytes, raw or in one zstd frame); a mid-size one is one blob too, its
//! two halves compressed on their own (on two threads); a large one is a manifest blob and a
//! chunk blob per chunk, each chunk compressed on its own.

use std::cell::{Cell, RefCell};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;

use context_core::{Error, NewObject, ObjectData, WriteFailure};
use zstd::bulk::{Compressor, Decompressor};

/// Bytes before the body of a blob: the encoding, then the original length (u64 LE).
pub(crate) const HEADER: usize = 9;
/// Objects of this length and more are stored in chunks, in a table of their own.
pub(crate) const CHUNKED_FROM: u64 = 4 << 20;
/// Objects of this length and more (and under [`CHUNKED_FROM`]) are compressed in two pieces,
/// each in a zstd frame of its own, on two threads. Below it, zstd takes too little time
/// (under 150 µs) beside a put's commit for halving it to matter much, and two independent
/// frames lose more of the ratio.
pub(crate) const SPLIT_FROM: u64 = 128 << 10;
/// The length of every chunk but the last: 1 MiB less 4 KiB, so that a chunk stored raw,
/// with its blob header and redb's entry overhead (about 30 bytes), fits in a 1 MiB page of
/// redb. A full 1 MiB would take a 2 MiB page, in memory while it is written and on disk.
pub(crate) const CHUNK: usize = (1 << 20) - (4 << 10);
/// A put commits the chunks it has compressed whenever they hold this many bytes: what a put
/// holds besides the caller's bytes is about this, plus four chunk buffers, plus redb's
/// cache.
pub(crate) const COMMIT_EVERY: usize = 1 << 20;
/// The longest chunk a manifest may name: the bound on what a damaged manifest can make a
/// get allocate, per 4 bytes of manifest.
const MAX_CHUNK: u32 = 1 << 20;

/// The body is the object's bytes.
const RAW: u8 = 0;
/// The body is one zstd frame.
const FRAME: u8 = 1;
/// The body is the chunk size (u32 LE), then the stored length of each chunk's blob (u32
/// LE); the chunks are entries of the chunk table. (Encoding 2, chunks inside the blob, was
/// written by earlier versions and is not read.)
const MANIFEST: u8 = 3;
/// Bytes of a manifest before its chunk table.
const MANIFEST_FIXED: usize = HEADER + 4;
/// The body is the piece size (u32 LE), then the length of each piece's body (u32 LE), then
/// the bodies in order: each a zstd frame shorter than its piece, or the piece's own bytes.
const SPLIT: u8 = 4;
/// Bytes of a split blob before its table of body lengths.
const SPLIT_FIXED: usize = HEADER + 4;

/// zstd never decodes more than this many bytes per byte of a frame: a block holds at most
/// 128 KiB and takes at least 4 bytes (an RLE block). Lengths in a blob that claim more are
/// damage, caught before anything is allocated for them.
const MAX_RATIO: u64 = 32 * 1024;

/// The most bytes an object of `len` bytes is stored in: its length, a blob header, and for
/// a chunked object the manifest's chunk table and a blob header per chunk (a chunk, like a
/// small object, is stored raw when compressing does not shrink it).
pub(crate) fn footprint(len: u64) -> u64 {
    if len < CHUNKED_FROM {
        return len.saturating_add(HEADER as u64);
    }
    let n = len.div_ceil(CHUNK as u64);
    len.saturating_add(MANIFEST_FIXED as u64).saturating_add(n.saturating_mul(4 + HEADER as u64))
}

thread_local! {
    /// This thread's compressor and its level, taken out while in use (so that a nested put,
    /// from inside an object's writer, gets a fresh one instead of a conflict).
    static COMPRESSOR: Cell<Option<(i32, Compressor<'static>)>> = const { Cell::new(None) };
    /// This thread's decompressor, likewise.
    static DECOMPRESSOR: Cell<Option<Decompressor<'static>>> = const { Cell::new(None) };
}

/// Runs `f` with this thread's compressor for `level` (`None` if zstd cannot make one, in
/// which case everything is stored raw).
fn with_compressor<T>(level: i32, f: impl FnOnce(Option<&mut Compressor<'static>>) -> T) -> T {
    let cached = COMPRESSOR.take().filter(|(l, _)| *l == level).map(|(_, c)| c);
    let mut compressor = cached.or_else(|| Compressor::new(level).ok());
    let result = f(compressor.as_mut());
    if let Some(c) = compressor {
        COMPRESSOR.set(Some((level, c)));
    }
    result
}

/// Runs `f` with this thread's decompressor.
fn with_decompressor<T>(f: impl FnOnce(&mut Decompressor<'static>) -> Result<T, String>) -> Result<T, String> {
    let mut decompressor = match DECOMPRESSOR.take() {
        Some(d) => d,
        None => Decompressor::new().map_err(|e| format!("cannot set up zstd decompression: {e}"))?,
    };
    let result = f(&mut decompressor);
    DECOMPRESSOR.set(Some(decompressor));
    result
}

/// Compresses `raw` into `out`, replacing its contents. Returns whether the result is
/// shorter than `raw`; if not (or if zstd fails), `out` is meaningless and `raw` should be
/// stored as it is.
fn compress_into(compressor: Option<&mut Compressor<'static>>, raw: &[u8], out: &mut Vec<u8>) -> bool {
    out.clear();
    let Some(compressor) = compressor else { return false };
    out.reserve(zstd::zstd_safe::compress_bound(raw.len()));
    matches!(compressor.compress_to_buffer(raw, out), Ok(n) if n < raw.len())
}

/// An object under [`CHUNKED_FROM`] bytes encoded for the table: what [`Encoded::write_blob`]
/// writes.
#[derive(Debug)]
pub(crate) struct Encoded<'a> {
    len: u64,
    form: Form<'a>,
}

#[derive(Debug)]
enum Form<'a> {
    /// Encoding 0 from the caller's parts.
    RawParts(&'a [&'a [u8]]),
    /// Encoding 0 from a buffer the object was streamed into.
    RawOwned(Vec<u8>),
    /// Encoding 0 from the two buffers the object was streamed into.
    RawPair(Vec<u8>, Vec<u8>),
    /// Encoding 1.
    Frame(Vec<u8>),
    /// Encoding 4: pieces of `piece` bytes (the last one shorter or alike).
    Split { piece: u32, bodies: [Piece<'a>; 2] },
}

/// The body of one piece of a split blob.
#[derive(Debug)]
enum Piece<'a> {
    /// A zstd frame, shorter than the piece.
    Zstd(Vec<u8>),
    /// The piece's own bytes, in the caller's data.
    Raw(&'a [u8]),
    /// The piece's own bytes, in the buffer it was streamed into.
    RawOwned(Vec<u8>),
}

impl Piece<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Piece::Zstd(bytes) | Piece::RawOwned(bytes) => bytes,
            Piece::Raw(bytes) => bytes,
        }
    }
}

/// Why an object could not be encoded.
#[derive(Debug)]
pub(crate) enum EncodeError {
    /// The object's data failed or had the wrong length.
    Data(Error),
    /// Compressing failed (a helper thread died), or the object cannot be held.
    Compress(io::Error),
}

/// Encodes an object under [`CHUNKED_FROM`] bytes: raw if it does not shrink, else one zstd
/// frame, or from [`SPLIT_FROM`] bytes on two (see [`encode_split`]).
pub(crate) fn encode<'a>(object: &mut NewObject<'a>, level: i32) -> Result<Encoded<'a>, EncodeError> {
    let len = object.len;
    if let ObjectData::Parts(parts) = object.data {
        let total: u64 = parts.iter().map(|p| p.len() as u64).sum();
        if total != len {
            return Err(EncodeError::Data(Error::corrupt(
                format!("object {}", object.id),
                format!("the data holds {total} bytes, the object is {len}"),
            )));
        }
    }
    if len >= SPLIT_FROM {
        return encode_split(object, level);
    }
    let form = match object.data {
        ObjectData::Parts(parts) => {
            let mut nonempty = parts.iter().filter(|p| !p.is_empty());
            let frame = match (nonempty.next(), nonempty.next()) {
                (None, _) => None,
                (Some(only), None) => compress_frame(only, level),
                (Some(_), Some(_)) => compress_frame(&parts.concat(), level),
            };
            frame.map_or(Form::RawParts(parts), Form::Frame)
        }
        ObjectData::Write(_) => {
            let capacity = usize::try_from(len).map_err(|_| too_long(len))?;
            let mut raw = Vec::with_capacity(capacity);
            object.write_to(&mut raw).map_err(from_write_failure)?;
            compress_frame(&raw, level).map_or(Form::RawOwned(raw), Form::Frame)
        }
    };
    Ok(Encoded { len, form })
}

fn too_long(len: u64) -> EncodeError {
    EncodeError::Compress(io::Error::new(io::ErrorKind::OutOfMemory, format!("{len} bytes do not fit in memory")))
}

fn from_write_failure(failure: WriteFailure) -> EncodeError {
    match failure {
        WriteFailure::Data(e) => EncodeError::Data(e),
        // The sinks here are memory and never fail by themselves; report one that does as a
        // failure to compress, which it is.
        WriteFailure::Sink(e) => EncodeError::Compress(e),
    }
}

/// Compresses `raw` into one frame; `None` if it does not shrink.
fn compress_frame(raw: &[u8], level: i32) -> Option<Vec<u8>> {
    with_compressor(level, |compressor| compress_with(compressor, raw))
}

/// Compresses `raw` into one frame with `compressor`; `None` if it does not shrink.
///
/// The frame keeps the room zstd asked for (its bound, about `raw`'s length): it lives only
/// until the put commits, and room never written takes no memory. Shrinking it would move a
/// large buffer on every put.
fn compress_with(compressor: Option<&mut Compressor<'static>>, raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    compress_into(compressor, raw, &mut out).then_some(out)
}

/// The length of the first piece of a split object of `len` bytes; the second holds the rest.
fn split_piece(len: u64) -> usize {
    debug_assert!((SPLIT_FROM..CHUNKED_FROM).contains(&len));
    len.div_ceil(2) as usize
}

/// Encodes an object of [`SPLIT_FROM`] to [`CHUNKED_FROM`] bytes in two halves, each in a
/// zstd frame of its own: the helper thread compresses the first half while this thread takes
/// in the second (from a streamed object) and compresses it; if the helper has not started on
/// the first half by then (it is busy, the machine is, or it woke on this thread's CPU), this
/// thread compresses it too. A half that does not shrink is kept raw; an object that does not
/// shrink as a whole is stored raw (encoding 0).
fn encode_split<'a>(object: &mut NewObject<'a>, level: i32) -> Result<Encoded<'a>, EncodeError> {
    let len = object.len;
    let piece = split_piece(len);
    let form = match object.data {
        ObjectData::Parts(parts) if parts.iter().filter(|p| !p.is_empty()).count() == 1 => {
            let only = parts.iter().find(|p| !p.is_empty()).expect("one part");
            let (first, second) = only.split_at(piece);
            // The helper outlives the call, so it gets a copy of its half.
            let mut copy = half_buffer(first.len());
            copy.extend_from_slice(first);
            let job = Job::offer(copy, level);
            let b = compress_frame(second, level);
            let (copy, a) = job.finish();
            keep_half_buffer(copy);
            if !split_shrinks(len, [(first.len(), &a), (second.len(), &b)]) {
                Form::RawParts(parts)
            } else {
                let bodies = [a.map_or(Piece::Raw(first), Piece::Zstd), b.map_or(Piece::Raw(second), Piece::Zstd)];
                Form::Split { piece: piece as u32, bodies }
            }
        }
        // Several parts or a streamed object: gathered into two buffers as it comes.
        _ => {
            let mut sink = HalvesSink {
                piece,
                level,
                first: half_buffer(piece),
                job: None,
                second: half_buffer(len as usize - piece),
            };
            let written = object.write_to(&mut sink);
            let HalvesSink { job, second, .. } = sink;
            if let Err(failure) = written {
                if let Some(job) = job {
                    job.cancel();
                }
                return Err(from_write_failure(failure));
            }
            let b = compress_frame(&second, level);
            let job = job.expect("the first half is in once the object is");
            let (first, a) = job.finish();
            if !split_shrinks(len, [(first.len(), &a), (second.len(), &b)]) {
                Form::RawPair(first, second)
            } else {
                // A half kept as a frame leaves its buffer free for the next split put.
                let body = |raw: Vec<u8>, frame: Option<Vec<u8>>| match frame {
                    Some(frame) => {
                        keep_half_buffer(raw);
                        Piece::Zstd(frame)
                    }
                    None => Piece::RawOwned(raw),
                };
                Form::Split { piece: piece as u32, bodies: [body(first, a), body(second, b)] }
            }
        }
    };
    Ok(Encoded { len, form })
}

/// The process's zstd helper thread, started by the first split put (again in a forked
/// child).
static HELPER: Mutex<Option<Helper>> = Mutex::new(None);

/// The id of the process that started the helper thread, and the way to the thread (`None`
/// if the process has one CPU only, or no thread could be had).
type Helper = (u32, Option<Sender<Arc<Job>>>);

/// A piece of a split put offered to the helper thread. Whoever claims it first compresses it:
/// the helper, or the putting thread once its own piece is done. So a put never waits for the
/// helper to be scheduled, only for a piece the helper is compressing already. A helper woken
/// on the putting thread's own CPU leaves the piece alone (see [`Job::help`]).
#[derive(Debug)]
struct Job {
    level: i32,
    /// The CPU the putting thread was on when it offered the piece.
    cpu: usize,
    slot: Mutex<Slot>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct Slot {
    /// The piece; out while it is being compressed.
    raw: Option<Vec<u8>>,
    claimed: bool,
    /// Set by the helper when it is done: the frame, or `None` if the piece does not shrink.
    frame: Option<Option<Vec<u8>>>,
}

impl Job {
    /// Offers `raw` to the helper thread, starting the thread if this process has none.
    fn offer(raw: Vec<u8>, level: i32) -> Arc<Job> {
        let job = Arc::new(Job {
            level,
            cpu: rustix::thread::sched_getcpu(),
            slot: Mutex::new(Slot { raw: Some(raw), ..Slot::default() }),
            done: Condvar::new(),
        });
        let mut helper = HELPER.lock().unwrap_or_else(PoisonError::into_inner);
        let pid = std::process::id();
        if helper.as_ref().is_none_or(|(started_by, _)| *started_by != pid) {
            let cpus = thread::available_parallelism().map_or(2, |n| n.get());
            *helper = Some((pid, if cpus > 1 { spawn_helper() } else { None }));
        }
        if let Some((_, Some(sender))) = helper.as_ref()
            && sender.send(Arc::clone(&job)).is_err()
        {
            // The thread is gone; the next put starts another.
            *helper = None;
        }
        job
    }

    fn slot(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The piece and its frame (`None`: it does not shrink), compressed here if the helper has
    /// not claimed it, else once the helper is done.
    fn finish(&self) -> (Vec<u8>, Option<Vec<u8>>) {
        let mut slot = self.slot();
        if !slot.claimed {
            slot.claimed = true;
            let raw = slot.raw.take().expect("an unclaimed job holds its piece");
            drop(slot);
            let frame = compress_frame(&raw, self.level);
            return (raw, frame);
        }
        while slot.frame.is_none() {
            slot = self.done.wait(slot).unwrap_or_else(PoisonError::into_inner);
        }
        (slot.raw.take().expect("the helper gives the piece back"), slot.frame.take().expect("done"))
    }

    /// The put failed: the piece is not needed (if the helper is compressing it, it finishes
    /// for nothing).
    fn cancel(&self) {
        let mut slot = self.slot();
        slot.claimed = true;
        slot.raw = None;
    }

    /// On the helper thread: compresses the piece unless the putting thread claimed it.
    fn help(&self, compressor: &mut Option<(i32, Compressor<'static>)>) {
        // Woken on the putting thread's CPU (the other CPUs were busy), the helper would
        // only take turns with it, and the put would wait for both halves in a row plus the
        // switches. Left alone, the piece is compressed by the putting thread itself.
        if rustix::thread::sched_getcpu() == self.cpu {
            return;
        }
        let raw = {
            let mut slot = self.slot();
            if slot.claimed {
                return;
            }
            slot.claimed = true;
            slot.raw.take().expect("an unclaimed job holds its piece")
        };
        if compressor.as_ref().is_none_or(|(level, _)| *level != self.level) {
            *compressor = Compressor::new(self.level).ok().map(|c| (self.level, c));
        }
        let compressing = std::panic::AssertUnwindSafe(|| compress_with(compressor.as_mut().map(|(_, c)| c), &raw));
        let frame = std::panic::catch_unwind(compressing).unwrap_or_else(|_| {
            // Never leave the putting thread waiting; and start afresh.
            *compressor = None;
            None
        });
        let mut slot = self.slot();
        slot.raw = Some(raw);
        slot.frame = Some(frame);
        self.done.notify_all();
    }
}

/// Starts a helper thread; `None` if no thread can be had (puts then compress both halves
/// themselves).
fn spawn_helper() -> Option<Sender<Arc<Job>>> {
    let (sender, jobs) = mpsc::channel::<Arc<Job>>();
    let spawned = thread::Builder::new().name("redb-zstd".into()).spawn(move || {
        let mut compressor = None;
        for job in jobs {
            job.help(&mut compressor);
        }
    });
    spawned.ok().map(|_| sender)
}

/// Whether a split blob of an object of `len` bytes, whose pieces are these many bytes and
/// compressed to these frames (`None`: kept raw), is shorter than the object stored raw.
fn split_shrinks(len: u64, pieces: [(usize, &Option<Vec<u8>>); 2]) -> bool {
    let bodies: u64 = pieces.iter().map(|(raw, frame)| frame.as_ref().map_or(*raw, Vec::len) as u64).sum();
    ((SPLIT_FIXED + 4 * pieces.len()) as u64 + bodies) < HEADER as u64 + len
}

thread_local! {
    /// Buffers this thread gathered the halves of split puts into, kept for its next split
    /// put: a fresh buffer of half a megabyte costs a page fault every 4 KiB, about a third
    /// of the time it takes to compress it. At most [`KEPT_HALVES`] buffers of at most half
    /// of [`CHUNKED_FROM`] each, so a thread keeps at most 4 MiB.
    static HALF_BUFFERS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// How many half buffers a thread keeps: the two halves of one put.
const KEPT_HALVES: usize = 2;

/// An empty buffer with room for `len` bytes: one this thread kept, else a new one.
fn half_buffer(len: usize) -> Vec<u8> {
    let mut buf = HALF_BUFFERS.with_borrow_mut(Vec::pop).unwrap_or_default();
    buf.clear();
    buf.reserve(len);
    buf
}

/// Keeps `buf` for this thread's next split put, if there is room for it.
fn keep_half_buffer(buf: Vec<u8>) {
    if buf.capacity() <= (CHUNKED_FROM / 2) as usize {
        HALF_BUFFERS.with_borrow_mut(|kept| {
            if kept.len() < KEPT_HALVES {
                kept.push(buf);
            }
        });
    }
}

/// The sink a split object streams into: its first half into `first`, offered to the helper
/// thread as soon as it is full, and the rest into `second`.
struct HalvesSink {
    piece: usize,
    level: i32,
    first: Vec<u8>,
    /// The first half, offered to the helper once it is all in.
    job: Option<Arc<Job>>,
    second: Vec<u8>,
}

impl io::Write for HalvesSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rest = buf;
        if self.job.is_none() {
            let take = (self.piece - self.first.len()).min(rest.len());
            self.first.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.first.len() == self.piece {
                self.job = Some(Job::offer(std::mem::take(&mut self.first), self.level));
            }
        }
        self.second.extend_from_slice(rest);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Bytes `start..start + dst.len()` of the concatenated `parts`, copied into `dst`.
fn copy_from_parts(parts: &[&[u8]], mut start: usize, mut dst: &mut [u8]) {
    for part in parts {
        if dst.is_empty() {
            break;
        }
        if start >= part.len() {
            start -= part.len();
            continue;
        }
        let n = (part.len() - start).min(dst.len());
        let (head, tail) = dst.split_at_mut(n);
        head.copy_from_slice(&part[start..start + n]);
        dst = tail;
        start = 0;
    }
}

impl Encoded<'_> {
    /// The length of the blob: at most [`HEADER`] plus the object's length.
    pub(crate) fn blob_len(&self) -> u64 {
        let body = match &self.form {
            Form::RawParts(_) | Form::RawOwned(_) | Form::RawPair(..) => self.len,
            Form::Frame(frame) => frame.len() as u64,
            Form::Split { bodies, .. } => {
                (SPLIT_FIXED - HEADER + 4 * bodies.len()) as u64
                    + bodies.iter().map(|b| b.bytes().len() as u64).sum::<u64>()
            }
        };
        HEADER as u64 + body
    }

    /// Writes the blob into `dst`, which is [`Encoded::blob_len`] bytes long.
    pub(crate) fn write_blob(&self, dst: &mut [u8]) {
        debug_assert_eq!(dst.len() as u64, self.blob_len());
        let (header, body) = dst.split_at_mut(HEADER);
        header[1..].copy_from_slice(&self.len.to_le_bytes());
        header[0] = match &self.form {
            Form::RawParts(parts) => {
                copy_from_parts(parts, 0, body);
                RAW
            }
            Form::RawOwned(raw) => {
                body.copy_from_slice(raw);
                RAW
            }
            Form::RawPair(first, second) => {
                let (a, b) = body.split_at_mut(first.len());
                a.copy_from_slice(first);
                b.copy_from_slice(second);
                RAW
            }
            Form::Frame(frame) => {
                body.copy_from_slice(frame);
                FRAME
            }
            Form::Split { piece, bodies } => {
                let (fixed, mut rest) = body.split_at_mut(SPLIT_FIXED - HEADER);
                fixed.copy_from_slice(&piece.to_le_bytes());
                for b in bodies {
                    let (entry, tail) = rest.split_at_mut(4);
                    entry.copy_from_slice(&(b.bytes().len() as u32).to_le_bytes());
                    rest = tail;
                }
                for b in bodies {
                    let (dst, tail) = rest.split_at_mut(b.bytes().len());
                    dst.copy_from_slice(b.bytes());
                    rest = tail;
                }
                SPLIT
            }
        };
    }
}

/// One chunk of a large object, compressed (or not), ready to be stored as a chunk blob:
/// the same format as a small object's blob, encoding 0 or 1.
#[derive(Debug)]
pub(crate) struct Chunk {
    /// Its index in the object.
    pub(crate) index: u32,
    /// Its original length.
    len: usize,
    body: Body,
}

#[derive(Debug)]
enum Body {
    /// A zstd frame, shorter than the chunk.
    Zstd(Vec<u8>),
    /// The chunk's own bytes.
    Raw(Vec<u8>),
}

impl Chunk {
    /// The length of its blob: at most [`HEADER`] plus its length.
    pub(crate) fn blob_len(&self) -> usize {
        match &self.body {
            Body::Zstd(bytes) | Body::Raw(bytes) => HEADER + bytes.len(),
        }
    }

    /// Writes its blob into `dst`, which is [`Chunk::blob_len`] bytes long.
    pub(crate) fn write_blob(&self, dst: &mut [u8]) {
        let (encoding, bytes) = match &self.body {
            Body::Zstd(bytes) => (FRAME, bytes),
            Body::Raw(bytes) => (RAW, bytes),
        };
        dst[0] = encoding;
        dst[1..HEADER].copy_from_slice(&(self.len as u64).to_le_bytes());
        dst[HEADER..].copy_from_slice(bytes);
    }
}

/// Compresses one chunk; returns it and, if the chunk's buffer is free again, the buffer.
fn encode_owned(
    compressor: Option<&mut Compressor<'static>>,
    scratch: &mut Vec<u8>,
    index: u32,
    mut raw: Vec<u8>,
) -> (Chunk, Option<Vec<u8>>) {
    let len = raw.len();
    if compress_into(compressor, &raw, scratch) {
        raw.clear();
        (Chunk { index, len, body: Body::Zstd(scratch.as_slice().to_vec()) }, Some(raw))
    } else {
        (Chunk { index, len, body: Body::Raw(raw) }, None)
    }
}

/// A compressed chunk coming back from the helper thread, with its buffer for reuse.
type Done = (Chunk, Option<Vec<u8>>);

/// The chunks of a chunked put waiting to be compressed, which both its threads take from.
///
/// Why a queue both take from: the putting thread also fills the chunks and stores them, so
/// the helper, given every other chunk, waited for it half the time; given a chunk whenever it
/// was idle, it still waited while the putting thread compressed one. Here one chunk waits for
/// the helper while it compresses another, so it never idles; the putting thread compresses
/// a chunk only when one already waits, and at the end compresses what still waits instead of
/// waiting for the helper to get to it.
#[derive(Default)]
struct ChunkQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

#[derive(Default)]
struct QueueState {
    waiting: std::collections::VecDeque<(u32, Vec<u8>)>,
    /// No more chunks come: the helper stops once none waits.
    closed: bool,
}

impl ChunkQueue {
    fn state(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a chunk for the helper; hands back a chunk for the caller to compress itself
    /// if one was waiting already (the helper is busy).
    fn offer(&self, chunk: (u32, Vec<u8>)) -> Option<(u32, Vec<u8>)> {
        let mut state = self.state();
        state.waiting.push_back(chunk);
        let mine = if state.waiting.len() > 1 { state.waiting.pop_front() } else { None };
        drop(state);
        self.ready.notify_one();
        mine
    }

    /// Closes the queue; hands back the chunks still waiting, for the caller to compress.
    fn close(&self) -> Vec<(u32, Vec<u8>)> {
        let mut state = self.state();
        state.closed = true;
        let left = state.waiting.drain(..).collect();
        drop(state);
        self.ready.notify_all();
        left
    }

    /// Closes the queue when dropped, whatever happens before: a writer that panics must
    /// not leave the helper waiting for chunks (and the put's scope waiting for it).
    fn closer(&self) -> impl Drop + '_ {
        struct Closer<'q>(&'q ChunkQueue);
        impl Drop for Closer<'_> {
            fn drop(&mut self) {
                self.0.close();
            }
        }
        Closer(self)
    }

    /// The next chunk for the helper; `None` once the queue is closed and empty.
    fn take(&self) -> Option<(u32, Vec<u8>)> {
        let mut state = self.state();
        loop {
            if let Some(chunk) = state.waiting.pop_front() {
                return Some(chunk);
            }
            if state.closed {
                return None;
            }
            state = self.ready.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// The helper thread of [`encode_chunked`]: compresses the chunks it takes from `queue` until
/// it is closed and empty (or the receiver of `done` hangs up).
fn helper(level: i32, queue: &ChunkQueue, done: Sender<Done>) {
    let mut compressor = Compressor::new(level).ok();
    let mut scratch = Vec::new();
    while let Some((i, raw)) = queue.take() {
        if done.send(encode_owned(compressor.as_mut(), &mut scratch, i, raw)).is_err() {
            break;
        }
    }
}

/// Stores a batch of chunks (in one write transaction); an error stops the put.
pub(crate) type Store<'s, E> = &'s mut dyn FnMut(&[Chunk]) -> Result<(), E>;

/// The sink an object streams into: cuts it into chunks and compresses each as soon as it is
/// full, on the helper thread or on this one (see [`ChunkQueue`]), and hands the compressed
/// chunks to `store` whenever they hold [`COMMIT_EVERY`] bytes. What it holds at any time is
/// those chunks, the chunk being filled or compressed here, the one waiting for the helper,
/// the one the helper is compressing, and one spare buffer.
struct ChunkSink<'r, 's, E> {
    level: i32,
    filling: Vec<u8>,
    /// The index of the chunk being filled.
    next: u32,
    /// The queue the helper takes chunks from; `None` without a helper.
    queue: Option<&'r ChunkQueue>,
    from_helper: &'r Receiver<Done>,
    spare: Vec<Vec<u8>>,
    scratch: Vec<u8>,
    /// Chunks compressed and not stored yet, and the bytes of their blobs.
    pending: Vec<Chunk>,
    pending_bytes: usize,
    /// The blob length of every chunk compressed so far, by index.
    stored: Vec<u32>,
    store: Store<'s, E>,
    /// Why storing failed; nothing is stored or compressed after that.
    failed: Option<E>,
}

impl<E> ChunkSink<'_, '_, E> {
    /// Takes in a compressed chunk, keeping its freed buffer for reuse, and stores the
    /// pending chunks as soon as they hold [`COMMIT_EVERY`] bytes: chunks come in from both
    /// threads, several at a time, so a batch is bounded here, where each arrives.
    fn collect(&mut self, (chunk, free): Done) {
        let i = chunk.index as usize;
        if self.stored.len() <= i {
            self.stored.resize(i + 1, 0);
        }
        self.stored[i] = chunk.blob_len() as u32;
        self.pending_bytes += chunk.blob_len();
        self.pending.push(chunk);
        if let Some(buffer) = free
            && self.spare.is_empty()
        {
            self.spare.push(buffer);
        }
        if self.pending_bytes >= COMMIT_EVERY {
            // A failure is kept in `failed`, which the next write reports.
            let _ = self.store_pending();
        }
    }

    fn dispatch(&mut self) {
        let raw = std::mem::take(&mut self.filling);
        let i = self.next;
        self.next += 1;
        while let Ok(done) = self.from_helper.try_recv() {
            self.collect(done);
        }
        let mine = match self.queue {
            Some(queue) => queue.offer((i, raw)),
            None => Some((i, raw)),
        };
        if let Some((i, raw)) = mine {
            self.compress_here(i, raw);
        }
    }

    fn compress_here(&mut self, i: u32, raw: Vec<u8>) {
        let done = with_compressor(self.level, |c| encode_owned(c, &mut self.scratch, i, raw));
        self.collect(done);
    }

    /// Hands the pending chunks to `store`, and keeps a buffer of theirs for reuse.
    fn store_pending(&mut self) -> io::Result<()> {
        if self.failed.is_none()
            && let Err(e) = (self.store)(&self.pending)
        {
            self.failed = Some(e);
        }
        self.pending_bytes = 0;
        for chunk in self.pending.drain(..) {
            if let Body::Raw(mut buffer) = chunk.body
                && self.spare.is_empty()
            {
                buffer.clear();
                self.spare.push(buffer);
            }
        }
        self.check()
    }

    fn check(&self) -> io::Result<()> {
        match self.failed {
            Some(_) => Err(io::Error::other("storing the object's chunks failed")),
            None => Ok(()),
        }
    }

    /// Compresses the last chunk and waits for the helper's; returns the chunks not stored
    /// yet, the blob length of every chunk, and the failure to store, if any.
    fn finish(mut self) -> (Vec<Chunk>, Vec<u32>, Option<E>) {
        if !self.filling.is_empty() && self.failed.is_none() {
            self.dispatch();
        }
        // What still waits is compressed here (also if the helper is gone: it panicked, and
        // joining it will say so), then the helper's last chunk is collected.
        if let Some(queue) = self.queue.take() {
            for (i, raw) in queue.close() {
                if self.failed.is_none() {
                    self.compress_here(i, raw);
                }
            }
        }
        while let Ok(done) = self.from_helper.recv() {
            self.collect(done);
        }
        (self.pending, self.stored, self.failed)
    }
}

impl<E> io::Write for ChunkSink<'_, '_, E> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.check()?;
        let mut rest = buf;
        while !rest.is_empty() {
            if self.filling.capacity() == 0 {
                self.filling = self.spare.pop().unwrap_or_else(|| Vec::with_capacity(CHUNK));
            }
            let take = (CHUNK - self.filling.len()).min(rest.len());
            self.filling.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.filling.len() == CHUNK {
                self.dispatch();
                while let Ok(done) = self.from_helper.try_recv() {
                    self.collect(done);
                }
                self.check()?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.check()
    }
}

/// A large object, compressed and partly stored by [`encode_chunked`].
#[derive(Debug)]
pub(crate) struct Chunked {
    /// The chunks not stored yet: they go in the transaction that stores the manifest.
    pub(crate) last: Vec<Chunk>,
    /// The manifest blob.
    pub(crate) manifest: Vec<u8>,
    /// The bytes the object holds: the manifest and every chunk blob.
    pub(crate) held: u64,
}

/// Why [`encode_chunked`] failed.
#[derive(Debug)]
pub(crate) enum ChunkedError<E> {
    /// The object's data, or compressing it.
    Encode(EncodeError),
    /// Storing a batch of chunks.
    Store(E),
}

/// Cuts a large object into chunks, compresses them on two threads as the object streams in,
/// and hands them to `store` in batches of about [`COMMIT_EVERY`] bytes; returns the last
/// batch and the manifest, for the caller to store together. On an error, some batches may
/// have been stored: the caller removes them.
pub(crate) fn encode_chunked<E>(
    object: &mut NewObject<'_>,
    level: i32,
    store: Store<'_, E>,
) -> Result<Chunked, ChunkedError<E>> {
    let len = object.len;
    if len.div_ceil(CHUNK as u64) > u64::from(u32::MAX) {
        return Err(ChunkedError::Encode(too_long(len)));
    }
    // At most one chunk waits for the helper (see `ChunkQueue`).
    let queue = ChunkQueue::default();
    let (done, from_helper) = mpsc::channel::<Done>();
    let (last, stored, failed, written) = thread::scope(|s| {
        let helper = thread::Builder::new().name("redb-zstd".into()).spawn_scoped(s, || helper(level, &queue, done));
        let _close = queue.closer();
        let mut sink = ChunkSink {
            level,
            filling: Vec::new(),
            next: 0,
            // Without a helper (no thread to be had), every chunk is compressed here.
            queue: helper.is_ok().then_some(&queue),
            from_helper: &from_helper,
            spare: Vec::new(),
            scratch: Vec::new(),
            pending: Vec::new(),
            pending_bytes: 0,
            stored: Vec::new(),
            store,
            failed: None,
        };
        let written = object.write_to(&mut sink);
        let (last, stored, failed) = sink.finish();
        if let Ok(helper) = helper {
            helper.join().map_err(|_| {
                ChunkedError::Encode(EncodeError::Compress(io::Error::other("the zstd helper thread panicked")))
            })?;
        }
        Ok((last, stored, failed, written))
    })?;
    if let Some(e) = failed {
        return Err(ChunkedError::Store(e));
    }
    written.map_err(|f| ChunkedError::Encode(from_write_failure(f)))?;
    let manifest = manifest_blob(len, &stored);
    let held = manifest.len() as u64 + stored.iter().map(|&n| u64::from(n)).sum::<u64>();
    Ok(Chunked { last, manifest, held })
}

/// The manifest of an object of `len` bytes whose chunk blobs are `stored` bytes long.
fn manifest_blob(len: u64, stored: &[u32]) -> Vec<u8> {
    debug_assert_eq!(len.div_ceil(CHUNK as u64), stored.len() as u64);
    let mut blob = Vec::with_capacity(MANIFEST_FIXED + 4 * stored.len());
    blob.push(MANIFEST);
    blob.extend_from_slice(&len.to_le_bytes());
    blob.extend_from_slice(&(CHUNK as u32).to_le_bytes());
    for n in stored {
        blob.extend_from_slice(&n.to_le_bytes());
    }
    blob
}

/// Whether a blob of the object table is a manifest (of a chunked object).
pub(crate) fn is_manifest(blob: &[u8]) -> bool {
    blob.first() == Some(&MANIFEST)
}

/// A chunked object's manifest, checked.
#[derive(Debug)]
pub(crate) struct Manifest {
    /// The object's length.
    pub(crate) len: u64,
    /// The length of every chunk but the last.
    pub(crate) chunk: usize,
    /// The length of each chunk's blob.
    pub(crate) stored: Vec<u32>,
}

/// The length of chunk `i` of an object of `len` bytes cut into chunks of `chunk` bytes.
fn chunk_len(len: u64, chunk: usize, i: usize) -> usize {
    let start = i as u64 * chunk as u64;
    len.saturating_sub(start).min(chunk as u64) as usize
}

/// Reads a manifest. Its own length bounds the object's (4 bytes of it per chunk of at most
/// [`MAX_CHUNK`] bytes), and each chunk's stored length bounds what the chunk can decode to;
/// anything else is damage (the detail is returned).
pub(crate) fn parse_manifest(blob: &[u8]) -> Result<Manifest, String> {
    let Some((fixed, table)) = blob.split_first_chunk::<MANIFEST_FIXED>() else {
        return Err(format!("the manifest is {} bytes, shorter than its {MANIFEST_FIXED}-byte header", blob.len()));
    };
    if fixed[0] != MANIFEST {
        return Err(format!("encoding {} is not a manifest", fixed[0]));
    }
    let len = u64::from_le_bytes(fixed[1..HEADER].try_into().expect("8 bytes"));
    let chunk = u32::from_le_bytes(fixed[HEADER..].try_into().expect("4 bytes"));
    if chunk == 0 || chunk > MAX_CHUNK {
        return Err(format!("the chunk size {chunk} is not between 1 and {MAX_CHUNK}"));
    }
    let chunk = chunk as usize;
    let n = len.div_ceil(chunk as u64);
    if n.checked_mul(4) != Some(table.len() as u64) {
        return Err(format!(
            "{len} bytes in chunks of {chunk} need {n} chunks, the manifest lists {} stored lengths in {} bytes",
            table.len() / 4,
            table.len()
        ));
    }
    let stored: Vec<u32> =
        table.chunks_exact(4).map(|entry| u32::from_le_bytes(entry.try_into().expect("4 bytes"))).collect();
    for (i, &m) in stored.iter().enumerate() {
        let want = chunk_len(len, chunk, i);
        let body = (m as usize).checked_sub(HEADER).ok_or_else(|| format!("chunk {i} is stored in {m} bytes"))?;
        if body > want {
            return Err(format!("chunk {i} of {want} bytes is stored in {body} bytes, more than raw"));
        }
        check_ratio(want as u64, body)?;
    }
    Ok(Manifest { len, chunk, stored })
}

/// Checks that `stored` bytes of zstd can decode to `len` bytes at all.
fn check_ratio(len: u64, stored: usize) -> Result<(), String> {
    if len > stored as u64 * MAX_RATIO {
        return Err(format!("{stored} bytes of zstd cannot decode to the {len} bytes the blob claims"));
    }
    Ok(())
}

/// Checks that the zstd frame `body` can and says it does decode to `len` bytes: checked
/// before the room for them is allocated, so that a damaged blob claiming a huge length is
/// refused for the few bytes it is, not after zero-filling what it claims.
fn check_frame(body: &[u8], len: u64) -> Result<(), String> {
    check_ratio(len, body.len())?;
    match zstd::zstd_safe::get_frame_content_size(body) {
        Ok(Some(size)) if size == len => Ok(()),
        Ok(Some(size)) => Err(format!("the zstd frame holds {size} bytes, the blob claims {len}")),
        Ok(None) | Err(_) => Err("the zstd frame does not say its length".into()),
    }
}

/// A zeroed buffer of `len` bytes, failing rather than aborting if there is no memory for
/// it.
///
/// The buffer is not written here: large blocks come zeroed from the kernel (a new mapping,
/// which `calloc` does not clear again), so a page costs memory only once decoding writes
/// it. A damaged manifest claiming more than its chunks hold costs address space until the
/// first chunk that is not there, and a value is not written twice (once with zeros).
pub(crate) fn allocate(len: u64) -> Result<Vec<u8>, String> {
    let fail = || format!("no memory for the {len} bytes the blob claims");
    let len = usize::try_from(len).map_err(|_| fail())?;
    // `vec!` aborts where there is no room: ask first, fallibly.
    let mut probe: Vec<u8> = Vec::new();
    probe.try_reserve_exact(len).map_err(|_| fail())?;
    drop(probe);
    Ok(vec![0; len])
}

/// Splits a blob into its encoding, the length it claims, and its body.
fn split_blob(blob: &[u8]) -> Result<(u8, u64, &[u8]), String> {
    let Some((header, body)) = blob.split_first_chunk::<HEADER>() else {
        return Err(format!("the blob is {} bytes, shorter than its {HEADER}-byte header", blob.len()));
    };
    Ok((header[0], u64::from_le_bytes(header[1..].try_into().expect("8 bytes")), body))
}

/// Decodes the body of a blob of encoding 0 or 1 into `out`, exactly `len` bytes long.
fn decode_body(encoding: u8, body: &[u8], out: &mut [u8]) -> Result<(), String> {
    let len = out.len();
    match encoding {
        RAW if body.len() == len => {
            out.copy_from_slice(body);
            Ok(())
        }
        RAW => Err(format!("a raw blob of {len} bytes holds {}", body.len())),
        FRAME => {
            check_frame(body, len as u64)?;
            let n = with_decompressor(|d| {
                d.decompress_to_buffer(body, out).map_err(|e| format!("zstd cannot decode the frame: {e}"))
            })?;
            if n != len {
                return Err(format!("the zstd frame decoded to {n} bytes, not {len}"));
            }
            Ok(())
        }
        MANIFEST => Err("a manifest where a blob of bytes belongs".into()),
        SPLIT => Err("a split blob where a chunk belongs".into()),
        other => Err(format!("unknown encoding {other}")),
    }
}

/// Decodes the blob of an object under [`CHUNKED_FROM`] bytes into the object's bytes. Every
/// length is checked against the blob's own size before anything is allocated; a damaged blob
/// is an error (its detail), never a panic.
pub(crate) fn decode(blob: &[u8]) -> Result<Vec<u8>, String> {
    let (encoding, len, body) = split_blob(blob)?;
    match encoding {
        RAW if body.len() as u64 != len => Err(format!("a raw blob of {len} bytes holds {}", body.len())),
        RAW => Ok(body.to_vec()),
        FRAME => {
            check_frame(body, len)?;
            let mut out = allocate(len)?;
            decode_body(FRAME, body, &mut out)?;
            Ok(out)
        }
        SPLIT => {
            let (piece, bodies) = parse_split(len, body)?;
            for (i, body) in bodies.iter().enumerate() {
                let want = chunk_len(len, piece, i);
                if body.len() < want {
                    check_frame(body, want as u64).map_err(|detail| format!("piece {i}: {detail}"))?;
                }
            }
            let mut out = allocate(len)?;
            let decode_piece = |i: usize, out: &mut [u8]| {
                let body = bodies[i];
                let encoding = if body.len() == out.len() { RAW } else { FRAME };
                decode_body(encoding, body, out).map_err(|detail| format!("piece {i}: {detail}"))
            };
            out.chunks_mut(piece).enumerate().try_for_each(|(i, out)| decode_piece(i, out))?;
            Ok(out)
        }
        other => decode_body(other, body, &mut []).map(|()| Vec::new()),
    }
}

/// Reads the body of a split blob claiming `len` bytes: the piece size, and each piece's body
/// (a zstd frame if shorter than its piece, else the piece raw). The body lengths must add up
/// to the blob's, and each can decode to its piece at all; anything else is damage.
fn parse_split(len: u64, body: &[u8]) -> Result<(usize, Vec<&[u8]>), String> {
    let Some((piece, rest)) = body.split_first_chunk::<4>() else {
        return Err(format!("the split blob's body is {} bytes, shorter than its piece size", body.len()));
    };
    let piece = u32::from_le_bytes(*piece);
    if piece == 0 {
        return Err("the split blob's piece size is 0".into());
    }
    let piece = piece as usize;
    let n = len.div_ceil(piece as u64);
    let table = n.checked_mul(4).filter(|&t| t <= rest.len() as u64).ok_or_else(|| {
        format!(
            "{len} bytes in pieces of {piece} need {n} body lengths, more than the blob's {} bytes hold",
            rest.len()
        )
    })? as usize;
    let (table, mut rest) = rest.split_at(table);
    let mut bodies = Vec::with_capacity(n as usize);
    for (i, entry) in table.chunks_exact(4).enumerate() {
        let m = u32::from_le_bytes(entry.try_into().expect("4 bytes")) as usize;
        let want = chunk_len(len, piece, i);
        if m > want {
            return Err(format!("piece {i} of {want} bytes is stored in {m} bytes, more than raw"));
        }
        if m < want {
            check_ratio(want as u64, m).map_err(|detail| format!("piece {i}: {detail}"))?;
        }
        let Some((body, tail)) = rest.split_at_checked(m) else {
            return Err(format!("piece {i} is stored in {m} bytes, past the end of the blob"));
        };
        bodies.push(body);
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(format!("the split blob has {} bytes past its pieces", rest.len()));
    }
    Ok((piece, bodies))
}

/// Decodes a chunk's blob into `out`, exactly as long as the chunk must be.
pub(crate) fn decode_chunk(blob: &[u8], out: &mut [u8]) -> Result<(), String> {
    let (encoding, len, body) = split_blob(blob)?;
    if len != out.len() as u64 {
        return Err(format!("the chunk's blob claims {len} bytes, the manifest {}", out.len()));
    }
    decode_body(encoding, body, out)
}

/// Fills `out`, cut into pieces of `chunk` bytes, with `work(i, piece)` for each piece `i`:
/// even pieces on this thread, odd ones on a helper thread.
pub(crate) fn on_two_threads<E: Send>(
    out: &mut [u8],
    chunk: usize,
    work: impl Fn(usize, &mut [u8]) -> Result<(), E> + Sync,
) -> Result<(), E> {
    let mut jobs: [Vec<(usize, &mut [u8])>; 2] = [Vec::new(), Vec::new()];
    for (i, piece) in out.chunks_mut(chunk).enumerate() {
        jobs[i % 2].push((i, piece));
    }
    let [mine, theirs] = jobs;
    // A failure on one thread stops the other at its next piece: damage is reported without
    // decoding (and filling memory with) the rest.
    let failed = AtomicBool::new(false);
    let run = |jobs: Vec<(usize, &mut [u8])>| {
        jobs.into_iter().try_for_each(|(i, piece)| {
            if failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            work(i, piece).inspect_err(|_| failed.store(true, Ordering::Relaxed))
        })
    };
    // The helper takes its share from here; if no thread can be had, this thread does.
    let theirs = Mutex::new(Some(theirs));
    thread::scope(|s| {
        let helper = thread::Builder::new()
            .name("redb-zstd".into())
            .spawn_scoped(s, || theirs.lock().map_or(Ok(()), |mut jobs| jobs.take().map_or(Ok(()), run)))
            .ok();
        run(mine)?;
        let left = theirs.lock().ok().and_then(|mut jobs| if helper.is_none() { jobs.take() } else { None });
        if let Some(left) = left {
            run(left)?;
        }
        match helper {
            Some(helper) => helper.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            None => Ok(()),
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use context_core::ObjectId;

    fn encode_parts(parts: &[&[u8]], level: i32) -> Vec<u8> {
        let len = parts.iter().map(|p| p.len() as u64).sum();
        let mut object = NewObject { id: ObjectId(1), len, data: ObjectData::Parts(parts) };
        let encoded = encode(&mut object, level).unwrap();
        let mut blob = vec![0; encoded.blob_len() as usize];
        encoded.write_blob(&mut blob);
        blob
    }

    fn streamed(bytes: &[u8], piece: usize, f: impl FnOnce(&mut NewObject<'_>)) {
        let mut write = |out: &mut dyn io::Write| {
            bytes.chunks(piece).try_for_each(|p| out.write_all(p)).map_err(|e| Error::io("test write", "value", e))
        };
        let mut object = NewObject { id: ObjectId(2), len: bytes.len() as u64, data: ObjectData::Write(&mut write) };
        f(&mut object);
    }

    fn encode_streamed_bytes(bytes: &[u8], piece: usize) -> Vec<u8> {
        let mut blob = Vec::new();
        streamed(bytes, piece, |object| {
            let encoded = encode(object, 1).unwrap();
            blob = vec![0; encoded.blob_len() as usize];
            encoded.write_blob(&mut blob);
        });
        blob
    }

    /// A chunked object as a table would hold it: the manifest, the chunk blobs by index,
    /// and the size of every batch stored.
    struct Table {
        manifest: Vec<u8>,
        chunks: BTreeMap<u32, Vec<u8>>,
        batches: Vec<usize>,
        held: u64,
    }

    fn chunked(object: &mut NewObject<'_>) -> Table {
        let mut chunks = BTreeMap::new();
        let mut batches = Vec::new();
        let mut store = |batch: &[Chunk]| -> Result<(), ()> {
            batches.push(batch.iter().map(Chunk::blob_len).sum());
            for chunk in batch {
                let mut blob = vec![0; chunk.blob_len()];
                chunk.write_blob(&mut blob);
                assert!(chunks.insert(chunk.index, blob).is_none());
            }
            Ok(())
        };
        let done = encode_chunked(object, 1, &mut store).unwrap();
        store(&done.last).unwrap();
        Table { manifest: done.manifest, chunks, batches, held: done.held }
    }

    fn read_chunked(table: &Table) -> Result<Vec<u8>, String> {
        let m = parse_manifest(&table.manifest)?;
        let mut out = allocate(m.len)?;
        on_two_threads(&mut out, m.chunk, |i, piece| {
            let blob = table.chunks.get(&(i as u32)).ok_or(format!("chunk {i} missing"))?;
            if blob.len() != m.stored[i] as usize {
                return Err(format!("chunk {i} is {} bytes", blob.len()));
            }
            decode_chunk(blob, piece)
        })?;
        Ok(out)
    }

    fn text(len: usize) -> Vec<u8> {
        (0..).flat_map(|i: u32| format!("line {i}: status=ok value={}\n", i % 97).into_bytes()).take(len).collect()
    }

    #[test]
    fn small_encodings_round_trip() {
        let random = context_core::testing::pattern(3, (4 << 20) - 1);
        let compressible = text((4 << 20) - 1);
        let split = SPLIT_FROM as usize;
        for (bytes, encoding) in [
            (&b""[..], RAW),
            (&b"x"[..], RAW),
            (&random[..100_000], RAW),
            (&compressible[..100_000], FRAME),
            (&compressible[..split - 1], FRAME),
            (&compressible[..split], SPLIT),
            (&compressible[..split + 1], SPLIT),
            (&compressible[..], SPLIT),
            (&random[..split], RAW),
            (&random[..], RAW),
        ] {
            let (a, b) = bytes.split_at(bytes.len() / 3);
            let whole = encode_parts(&[bytes], 1);
            for blob in [encode_parts(&[a, b], 1), encode_streamed_bytes(bytes, 7777), encode_parts(&[b"", bytes], 1)] {
                assert!(blob == whole, "{} bytes: parts, streamed and whole encode alike", bytes.len());
            }
            assert_eq!(whole[0], encoding, "{} bytes", bytes.len());
            assert!(whole.len() as u64 <= footprint(bytes.len() as u64));
            assert!(decode(&whole).unwrap() == bytes, "{} bytes", bytes.len());
        }
    }

    /// The body lengths of a split blob.
    fn split_table(blob: &[u8]) -> (u32, Vec<u32>) {
        assert_eq!(blob[0], SPLIT);
        let piece = u32::from_le_bytes(blob[HEADER..SPLIT_FIXED].try_into().unwrap());
        let table = blob[SPLIT_FIXED..SPLIT_FIXED + 8].chunks_exact(4);
        (piece, table.map(|e| u32::from_le_bytes(e.try_into().unwrap())).collect())
    }

    #[test]
    fn split_halves_that_do_not_shrink_are_kept_raw() {
        let len = (1 << 20) + 3;
        let random = context_core::testing::pattern(5, len);
        let compressible = text(len);
        let half = split_piece(len as u64);
        for (raw_half, bytes) in [
            (0, [&random[..half], &compressible[half..]].concat()),
            (1, [&compressible[..half], &random[half..]].concat()),
        ] {
            let (a, b) = bytes.split_at(12345);
            let whole = encode_parts(&[&bytes], 1);
            assert!(whole == encode_parts(&[a, b], 1) && whole == encode_streamed_bytes(&bytes, 4096));
            let (piece, stored) = split_table(&whole);
            assert_eq!(piece as usize, half);
            let pieces = [half, len - half];
            assert_eq!(stored[raw_half] as usize, pieces[raw_half], "the random half is kept raw");
            assert!((stored[1 - raw_half] as usize) < pieces[1 - raw_half] / 4, "the text half is compressed");
            assert_eq!(whole.len(), SPLIT_FIXED + 8 + stored.iter().map(|&m| m as usize).sum::<usize>());
            assert!(decode(&whole).unwrap() == bytes);
        }
    }

    #[test]
    fn split_puts_reuse_their_buffers_and_never_show_old_bytes() {
        let kept = || HALF_BUFFERS.with_borrow(|k| k.iter().map(Vec::capacity).collect::<Vec<_>>());
        HALF_BUFFERS.with_borrow_mut(Vec::clear);
        let big = text(3 << 20);
        let blob = encode_streamed_bytes(&big, 65536);
        assert!(decode(&blob).unwrap() == big);
        let after_big = kept();
        assert_eq!(after_big.len(), KEPT_HALVES, "both compressed halves' buffers are kept");
        assert!(after_big.iter().all(|&c| c >= (3 << 20) / 2), "{after_big:?}");
        // A smaller value in the same buffers: exactly its own bytes come back.
        let small: Vec<u8> = text(300 << 10).iter().map(|b| b.to_ascii_uppercase()).collect();
        let blob = encode_streamed_bytes(&small, 4096);
        assert!(decode(&blob).unwrap() == small);
        assert_eq!(kept(), after_big, "the same buffers, not new ones");
        // Halves kept raw stay in the blob until it is written: nothing comes back then.
        HALF_BUFFERS.with_borrow_mut(Vec::clear);
        let random = context_core::testing::pattern(9, 1 << 20);
        assert!(decode(&encode_streamed_bytes(&random, 4096)).unwrap() == random);
        assert!(kept().is_empty());
        // Buffers over half the split range are not kept (none can be: a split object is
        // under CHUNKED_FROM bytes).
        keep_half_buffer(Vec::with_capacity(CHUNKED_FROM as usize));
        assert!(kept().is_empty());
    }

    #[test]
    fn the_helper_leaves_a_piece_offered_from_its_own_cpu() {
        // Pinned to one CPU, this thread stands for both the putting thread and the helper.
        let cpu = rustix::thread::sched_getcpu();
        let mut only = rustix::thread::CpuSet::new();
        only.set(cpu);
        if let Err(e) = rustix::thread::sched_setaffinity(None, &only) {
            eprintln!("skipped: cannot pin this thread to CPU {cpu}: {e}");
            return;
        }
        let raw = text(300 << 10);
        let job = |cpu| Job {
            level: 1,
            cpu,
            slot: Mutex::new(Slot { raw: Some(raw.clone()), ..Slot::default() }),
            done: Condvar::new(),
        };
        let here = job(cpu);
        here.help(&mut None);
        assert!(!here.slot().claimed, "left for the putting thread");
        let (back, frame) = here.finish();
        assert!(back == raw);
        assert!(zstd::bulk::decompress(&frame.unwrap(), raw.len()).unwrap() == raw);
        // Offered from another CPU, it helps.
        let there = job(usize::MAX);
        there.help(&mut None);
        assert!(there.slot().claimed && there.slot().frame.is_some(), "compressed by the helper");
        let (back, frame) = there.finish();
        assert!(back == raw);
        assert!(zstd::bulk::decompress(&frame.unwrap(), raw.len()).unwrap() == raw);
    }

    #[test]
    fn concurrent_split_puts_share_the_helper() {
        // One helper thread for the process: whichever put's half it does not take, that put
        // compresses itself.
        thread::scope(|s| {
            for t in 0..4u64 {
                s.spawn(move || {
                    for round in 0..5u64 {
                        let len = SPLIT_FROM as usize + (t * 5 + round) as usize * 37_123;
                        let bytes = [&text(len / 2)[..], &context_core::testing::pattern(t, len - len / 2)].concat();
                        let blob = if round % 2 == 0 {
                            encode_parts(&[&bytes], 1)
                        } else {
                            encode_streamed_bytes(&bytes, 5000)
                        };
                        assert_eq!(blob[0], SPLIT);
                        assert!(decode(&blob).unwrap() == bytes, "thread {t} round {round}");
                    }
                });
            }
        });
    }

    #[test]
    fn one_frame_blobs_of_any_size_stay_readable() {
        // Earlier versions stored every compressible object under 4 MiB in one frame.
        for len in [SPLIT_FROM as usize, 1 << 20, (4 << 20) - 1] {
            let bytes = text(len);
            let blob = [&[FRAME][..], &(len as u64).to_le_bytes(), &zstd::bulk::compress(&bytes, 1).unwrap()].concat();
            assert!(decode(&blob).unwrap() == bytes, "{len} bytes");
        }
    }

    #[test]
    fn a_failing_or_panicking_writer_stops_a_split_put() {
        let bytes = text(1 << 20);
        // Fails before, at and after the first half is in; or writes too little.
        for (stop, fail) in [(0, true), (1000, true), (1 << 19, true), ((1 << 19) + 1, true), (900_000, false)] {
            let mut write = |out: &mut dyn io::Write| {
                out.write_all(&bytes[..stop]).map_err(|e| Error::io("test write", "value", e))?;
                if fail { Err(Error::io("test write", "value", io::Error::other("the writer failed"))) } else { Ok(()) }
            };
            let mut object =
                NewObject { id: ObjectId(2), len: bytes.len() as u64, data: ObjectData::Write(&mut write) };
            assert!(matches!(encode(&mut object, 1), Err(EncodeError::Data(_))), "stopped at {stop}");
        }
        // A panic in the writer reaches the caller, and the helper thread is let go.
        for stop in [1000, 600_000] {
            let caught = std::panic::catch_unwind(|| {
                let mut write = |out: &mut dyn io::Write| -> Result<(), Error> {
                    out.write_all(&bytes[..stop]).unwrap();
                    panic!("the writer panicked");
                };
                let mut object =
                    NewObject { id: ObjectId(2), len: bytes.len() as u64, data: ObjectData::Write(&mut write) };
                let _ = encode(&mut object, 1);
            });
            assert!(caught.is_err());
        }
        // And the thread's compressors still work.
        assert!(decode(&encode_streamed_bytes(&bytes, 1 << 16)).unwrap() == bytes);
    }

    #[test]
    fn split_damage_is_an_error() {
        let len = (1 << 20) + 1;
        let mixed = [&context_core::testing::pattern(6, len / 2)[..], &text(len - len / 2)].concat();
        for bytes in [text(len), mixed] {
            let blob = encode_parts(&[&bytes], 1);
            let (piece, stored) = split_table(&blob);
            assert!(decode(&blob).unwrap() == bytes);
            for cut in (0..SPLIT_FIXED + 12).chain([blob.len() / 2, blob.len() - 1]) {
                assert!(decode(&blob[..cut]).is_err(), "cut at {cut}");
            }
            let mut longer = blob.clone();
            longer.push(0);
            assert!(decode(&longer).is_err());
            let with = |at: usize, field: &[u8]| {
                let mut damaged = blob.clone();
                damaged[at..at + field.len()].copy_from_slice(field);
                decode(&damaged)
            };
            for claimed in [0u64, 1, len as u64 - 1, len as u64 + 1, 2 * len as u64, u64::MAX, 1 << 40] {
                assert!(with(1, &claimed.to_le_bytes()).is_err(), "claimed {claimed}");
            }
            for p in [0u32, 1, piece - 1, piece + 1, piece * 2, u32::MAX] {
                assert!(with(HEADER, &p.to_le_bytes()).is_err(), "piece size {p}");
            }
            for (i, m) in [(0, 0u32), (0, stored[0] + 1), (0, stored[0] - 1), (1, stored[1] + 1), (1, u32::MAX)] {
                assert!(with(SPLIT_FIXED + 4 * i, &m.to_le_bytes()).is_err(), "piece {i} stored in {m}");
            }
            let swapped = [stored[1].to_le_bytes(), stored[0].to_le_bytes()].concat();
            if stored[0] != stored[1] {
                assert!(with(SPLIT_FIXED, &swapped).is_err(), "body lengths swapped");
            }
            for byte in (1..blob.len().min(200)).chain((200..blob.len()).step_by(997)) {
                let mut flipped = blob.clone();
                flipped[byte] ^= 0x5a;
                let _ = decode(&flipped); // Anything but a panic.
            }
            // A split blob is no chunk, and no manifest.
            assert!(decode_chunk(&blob, &mut vec![0; len]).unwrap_err().contains("split"));
            assert!(parse_manifest(&blob).is_err());
        }
        // Forged blobs cannot claim more than their pieces can decode to.
        let forge = |len: u64, piece: u32, bodies: &[&[u8]]| {
            let table: Vec<u8> = bodies.iter().flat_map(|b| (b.len() as u32).to_le_bytes()).collect();
            decode(&[&[SPLIT][..], &len.to_le_bytes(), &piece.to_le_bytes(), &table, &bodies.concat()].concat())
        };
        assert!(forge(0, 1, &[]).unwrap().is_empty());
        assert!(forge(3, 2, &[b"ab", b"c"]).unwrap() == b"abc", "raw pieces");
        let max = MAX_RATIO as u32;
        assert!(forge(u64::from(max) + 1, max + 1, &[&[0x28]]).unwrap_err().contains("cannot decode"));
        assert!(forge(2 * u64::from(max), max, &[&[0x28], &[0x28]]).unwrap_err().contains("zstd"));
        assert!(forge(1 << 40, u32::MAX, &[&[0u8; 4][..]; 256]).is_err());
        assert!(forge(u64::MAX, 1, &[b"x"]).unwrap_err().contains("body lengths"));
        assert!(forge(4, 2, &[b"ab", b"cd", b"ef"]).is_err(), "more bodies than pieces");
    }

    #[test]
    fn chunked_encoding_round_trips_in_bounded_batches() {
        let random = context_core::testing::pattern(3, 9 * CHUNK + 5);
        let compressible = text(20 * CHUNK + 5);
        // Half random, half text: some chunks shrink, some are stored raw.
        let mixed: Vec<u8> = random[..5 * CHUNK].iter().chain(&compressible[..4 * CHUNK + 3]).copied().collect();
        for bytes in [&random[..4 << 20], &random[..], &compressible[..], &mixed[..]] {
            let (a, b) = bytes.split_at(bytes.len() / 3);
            let parts = [a, b];
            let mut object = NewObject { id: ObjectId(1), len: bytes.len() as u64, data: ObjectData::Parts(&parts) };
            let whole = chunked(&mut object);
            let mut from_stream = None;
            streamed(bytes, 7777, |object| from_stream = Some(chunked(object)));
            let from_stream = from_stream.unwrap();
            assert_eq!(whole.manifest, from_stream.manifest, "streamed and whole encode alike");
            assert_eq!(whole.chunks, from_stream.chunks);
            for table in [whole, from_stream] {
                assert_eq!(table.manifest[0], MANIFEST);
                assert!(table.held <= footprint(bytes.len() as u64), "{} bytes hold {}", bytes.len(), table.held);
                let blobs: u64 = table.chunks.values().map(|c| c.len() as u64).sum();
                assert_eq!(table.held, table.manifest.len() as u64 + blobs);
                assert!(table.batches.iter().all(|&b| b < COMMIT_EVERY + HEADER + CHUNK), "{:?}", table.batches);
                assert!(read_chunked(&table).unwrap() == bytes, "{} bytes", bytes.len());
            }
        }
        // Random chunks are stored raw, and each fits a 1 MiB page with room to spare.
        let mut object = NewObject { id: ObjectId(1), len: random.len() as u64, data: ObjectData::Parts(&[&random]) };
        let table = chunked(&mut object);
        assert!(table.chunks.values().all(|c| c[0] == RAW && c.len() + 64 <= 1 << 20));
    }

    #[test]
    fn a_panicking_writer_stops_a_chunked_put_and_lets_its_helper_go() {
        let bytes = Arc::new(text(3 * CHUNK + 1000));
        // Panics before any chunk is full, after one, and after three (the helper busy).
        for stop in [1000, CHUNK + 10, 3 * CHUNK] {
            let (done, finished) = mpsc::channel();
            let bytes = Arc::clone(&bytes);
            // On a thread of its own, so that a put that hangs fails the test (its thread is
            // left behind) instead of hanging it.
            thread::spawn(move || {
                let caught = std::panic::catch_unwind(|| {
                    let mut write = |out: &mut dyn io::Write| -> Result<(), Error> {
                        out.write_all(&bytes[..stop]).unwrap();
                        panic!("the writer panicked");
                    };
                    let mut object =
                        NewObject { id: ObjectId(3), len: bytes.len() as u64, data: ObjectData::Write(&mut write) };
                    let _ = encode_chunked(&mut object, 1, &mut |_: &[Chunk]| Ok::<(), ()>(()));
                });
                let _ = done.send(caught.is_err());
            });
            let panicked = finished.recv_timeout(std::time::Duration::from_secs(20));
            assert_eq!(panicked, Ok(true), "stopped at {stop}: the put hung or did not panic");
        }
    }

    #[test]
    fn a_failing_store_stops_the_put() {
        let bytes = context_core::testing::pattern(4, 30 * CHUNK);
        let mut calls = 0;
        let mut store = |_: &[Chunk]| -> Result<(), &str> {
            calls += 1;
            Err("full")
        };
        let mut written = 0;
        let mut write = |out: &mut dyn io::Write| {
            for piece in bytes.chunks(1 << 16) {
                out.write_all(piece).map_err(|e| Error::io("test write", "value", e))?;
                written += piece.len();
            }
            Ok(())
        };
        let mut object = NewObject { id: ObjectId(2), len: bytes.len() as u64, data: ObjectData::Write(&mut write) };
        assert!(matches!(encode_chunked(&mut object, 1, &mut store), Err(ChunkedError::Store("full"))));
        assert_eq!(calls, 1);
        assert!(written < 10 * CHUNK, "the writer went on after the store failed: {written} bytes");
    }

    #[test]
    fn damage_is_an_error() {
        let compressible = text(1 << 20);
        for blob in [encode_parts(&[&compressible[..1000]], 1), encode_parts(&[&compressible], 1)] {
            assert!(decode(&blob[..blob.len() - 1]).is_err());
            assert!(decode(&blob[..5]).is_err());
            let mut longer = blob.clone();
            longer.push(0);
            assert!(decode(&longer).is_err());
            for len in [0u64, 1, 999, 1001, u64::MAX, u64::MAX / 2, 1 << 40] {
                let mut claimed = blob.clone();
                claimed[1..9].copy_from_slice(&len.to_le_bytes());
                assert!(decode(&claimed).is_err(), "claimed {len}");
            }
            for byte in 9..blob.len().min(64) {
                let mut flipped = blob.clone();
                flipped[byte] ^= 0x5a;
                let _ = decode(&flipped); // Anything but a panic.
            }
            for (encoding, says) in [(2, "unknown encoding"), (9, "unknown encoding"), (MANIFEST, "manifest")] {
                let mut unknown = blob.clone();
                unknown[0] = encoding;
                assert!(decode(&unknown).unwrap_err().contains(says));
            }
        }

        let big = text(6 * CHUNK + 10);
        let mut object = NewObject { id: ObjectId(1), len: big.len() as u64, data: ObjectData::Parts(&[&big]) };
        let table = chunked(&mut object);
        assert!(read_chunked(&table).unwrap() == big);
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut manifest = table.manifest.clone();
            f(&mut manifest);
            parse_manifest(&manifest)
        };
        assert!(with(&|m| m.truncate(m.len() - 1)).is_err());
        assert!(with(&|m| m.truncate(12)).is_err());
        assert!(with(&|m| m.push(0)).is_err());
        assert!(with(&|m| m[0] = FRAME).is_err());
        for chunk in [0u32, MAX_CHUNK + 1, u32::MAX, 1] {
            assert!(with(&|m| m[9..13].copy_from_slice(&chunk.to_le_bytes())).is_err(), "chunk size {chunk}");
        }
        for len in [0u64, 1, 6 * CHUNK as u64, 8 * CHUNK as u64, u64::MAX, 1 << 40] {
            assert!(with(&|m| m[1..9].copy_from_slice(&len.to_le_bytes())).is_err(), "claimed {len}");
        }
        for stored in [0u32, 8, CHUNK as u32 + 10, u32::MAX] {
            assert!(with(&|m| m[13..17].copy_from_slice(&stored.to_le_bytes())).is_err(), "stored {stored}");
        }
        // A chunk's blob that is not what the manifest says.
        let first = &table.chunks[&0];
        let mut out = vec![0; CHUNK];
        assert!(decode_chunk(&first[..first.len() - 1], &mut out).is_err());
        assert!(decode_chunk(first, &mut out[..CHUNK - 1]).is_err());
        let mut flipped = first.clone();
        flipped[20] ^= 0xff;
        let _ = decode_chunk(&flipped, &mut out); // Anything but a panic.
        let mut wrong = first.clone();
        wrong[0] = RAW;
        assert!(decode_chunk(&wrong, &mut out).is_err());
    }
}
