//! The stored form of an object (a "blob"): a header, then the object's bytes, raw or
//! compressed with zstd. The format is described in the [crate] docs.

use std::cell::Cell;
use std::io;
use std::sync::Mutex;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::thread;

use context_core::{Error, NewObject, ObjectData, WriteFailure};
use zstd::bulk::{Compressor, Decompressor};

/// Bytes before the body: the encoding, then the original length (u64 LE).
pub(crate) const HEADER: usize = 9;
/// Objects of this length and more are compressed in independent chunks, on two threads.
pub(crate) const CHUNKED_FROM: u64 = 4 << 20;
/// The length of every chunk but the last.
pub(crate) const CHUNK: usize = 1 << 20;

/// The body is the object's bytes.
const RAW: u8 = 0;
/// The body is one zstd frame.
const FRAME: u8 = 1;
/// The body is the chunk size (u32 LE), the stored length of each chunk (u32 LE), then the
/// chunks, each a zstd frame, or raw when its stored length equals its length.
const CHUNKS: u8 = 2;
/// Bytes of the encoding-2 header after [`HEADER`], before the chunk table.
const CHUNK_SIZE_FIELD: usize = 4;

/// zstd never decodes more than this many bytes per byte of a frame: a block holds at most
/// 128 KiB and takes at least 4 bytes (an RLE block). Lengths in a blob that claim more are
/// damage, caught before anything is allocated for them.
const MAX_RATIO: u64 = 32 * 1024;

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

/// One chunk of an encoding-2 blob.
#[derive(Debug)]
pub(crate) enum Piece {
    /// A zstd frame, shorter than the chunk.
    Zstd(Vec<u8>),
    /// The chunk's bytes, held here (they were streamed in).
    Raw(Vec<u8>),
    /// The chunk's bytes, still in the caller's parts.
    InParts,
}

impl Piece {
    fn stored_len(&self, chunk_len: usize) -> usize {
        match self {
            Piece::Zstd(bytes) | Piece::Raw(bytes) => bytes.len(),
            Piece::InParts => chunk_len,
        }
    }
}

/// An object encoded for the table: what [`Encoded::write_blob`] writes.
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
    /// Encoding 1.
    Frame(Vec<u8>),
    /// Encoding 2, or encoding 0 rebuilt from the chunks (`as_raw`) when compressing them
    /// did not shrink the object as a whole.
    Chunks { pieces: Vec<Piece>, parts: Option<&'a [&'a [u8]]>, as_raw: bool },
}

/// Why an object could not be encoded.
#[derive(Debug)]
pub(crate) enum EncodeError {
    /// The object's data failed or had the wrong length.
    Data(Error),
    /// Compressing failed (a helper thread died).
    Compress(io::Error),
}

/// Encodes an object: raw if it does not shrink, else one zstd frame, or (from
/// [`CHUNKED_FROM`] bytes on) chunks compressed on two threads.
pub(crate) fn encode<'a>(object: &mut NewObject<'a>, level: i32) -> Result<Encoded<'a>, EncodeError> {
    let len = object.len;
    let form = match object.data {
        ObjectData::Parts(parts) => {
            let total: u64 = parts.iter().map(|p| p.len() as u64).sum();
            if total != len {
                return Err(EncodeError::Data(Error::corrupt(
                    format!("object {}", object.id),
                    format!("the data holds {total} bytes, the object is {len}"),
                )));
            }
            if len >= CHUNKED_FROM {
                chunks_form(encode_parts_chunked(parts, len, level), Some(parts), len)
            } else {
                let mut nonempty = parts.iter().filter(|p| !p.is_empty());
                let frame = match (nonempty.next(), nonempty.next()) {
                    (None, _) => None,
                    (Some(only), None) => compress_frame(only, level),
                    (Some(_), Some(_)) => compress_frame(&parts.concat(), level),
                };
                frame.map_or(Form::RawParts(parts), Form::Frame)
            }
        }
        ObjectData::Write(_) if len >= CHUNKED_FROM => {
            let pieces = encode_streamed(object, level)?;
            chunks_form(pieces, None, len)
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
        // The sinks here are memory and never fail; report one that does as a failure to
        // compress, which it is.
        WriteFailure::Sink(e) => EncodeError::Compress(e),
    }
}

/// Compresses `raw` into one frame; `None` if it does not shrink.
fn compress_frame(raw: &[u8], level: i32) -> Option<Vec<u8>> {
    with_compressor(level, |compressor| {
        let mut out = Vec::new();
        if !compress_into(compressor, raw, &mut out) {
            return None;
        }
        if out.len() < out.capacity() / 2 {
            out.shrink_to_fit();
        }
        Some(out)
    })
}

/// Chooses between encoding 2 and, when the chunks do not shrink the object as a whole,
/// encoding 0.
fn chunks_form<'a>(pieces: Vec<Piece>, parts: Option<&'a [&'a [u8]]>, len: u64) -> Form<'a> {
    let stored: u64 =
        pieces.iter().enumerate().map(|(i, piece)| piece.stored_len(chunk_len(len, CHUNK, i)) as u64).sum();
    let chunked = (HEADER + CHUNK_SIZE_FIELD + 4 * pieces.len()) as u64 + stored;
    let as_raw = chunked >= HEADER as u64 + len;
    Form::Chunks { pieces, parts, as_raw }
}

/// The length of chunk `i` of an object of `len` bytes cut into chunks of `chunk` bytes.
fn chunk_len(len: u64, chunk: usize, i: usize) -> usize {
    let start = i as u64 * chunk as u64;
    len.saturating_sub(start).min(chunk as u64) as usize
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

/// Bytes `start..end` of the concatenated `parts`: borrowed when one part holds them all,
/// else gathered into `gather`.
fn slice_of_parts<'s>(parts: &[&'s [u8]], start: usize, end: usize, gather: &'s mut Vec<u8>) -> &'s [u8] {
    let mut offset = 0;
    for part in parts {
        if start >= offset && end <= offset + part.len() {
            return &part[start - offset..end - offset];
        }
        offset += part.len();
    }
    gather.clear();
    gather.resize(end - start, 0);
    copy_from_parts(parts, start, gather);
    gather
}

/// Compresses the chunks of an object given as parts: even chunks on this thread, odd ones on
/// a helper thread, each straight from the parts where one part holds the whole chunk.
fn encode_parts_chunked(parts: &[&[u8]], len: u64, level: i32) -> Vec<Piece> {
    let len_usize = len as usize; // The parts are in memory, so their total fits.
    let n = len_usize.div_ceil(CHUNK);
    let work = |first: usize| -> Vec<(usize, Piece)> {
        with_compressor(level, |mut compressor| {
            let mut gather = Vec::new();
            let mut scratch = Vec::new();
            (first..n)
                .step_by(2)
                .map(|i| {
                    let start = i * CHUNK;
                    let raw = slice_of_parts(parts, start, (start + CHUNK).min(len_usize), &mut gather);
                    let piece = if compress_into(compressor.as_deref_mut(), raw, &mut scratch) {
                        Piece::Zstd(scratch.as_slice().to_vec())
                    } else {
                        Piece::InParts
                    };
                    (i, piece)
                })
                .collect()
        })
    };
    let done: Vec<(usize, Piece)> = thread::scope(|s| {
        let helper = thread::Builder::new().name("redb-zstd".into()).spawn_scoped(s, || work(1));
        let mut done = work(0);
        match helper {
            Ok(helper) => done.extend(helper.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))),
            // No thread to be had: do its share here.
            Err(_) => done.extend(work(1)),
        }
        done
    });
    in_order(done, n)
}

/// Sorts `(index, piece)` pairs into the list of `n` pieces.
fn in_order(mut done: Vec<(usize, Piece)>, n: usize) -> Vec<Piece> {
    done.sort_unstable_by_key(|(i, _)| *i);
    debug_assert!(done.len() == n && done.iter().enumerate().all(|(k, (i, _))| k == *i));
    done.into_iter().map(|(_, piece)| piece).collect()
}

/// Compresses one streamed chunk; returns its piece and, if the chunk's buffer is free
/// again, the buffer.
fn encode_owned(
    compressor: Option<&mut Compressor<'static>>,
    scratch: &mut Vec<u8>,
    mut raw: Vec<u8>,
) -> (Piece, Option<Vec<u8>>) {
    if compress_into(compressor, &raw, scratch) {
        raw.clear();
        (Piece::Zstd(scratch.as_slice().to_vec()), Some(raw))
    } else {
        (Piece::Raw(raw), None)
    }
}

/// A compressed chunk coming back from the helper thread, with its buffer for reuse.
type Done = (usize, Piece, Option<Vec<u8>>);

/// The helper thread of [`encode_streamed`]: compresses the chunks it is sent until the
/// sender hangs up.
fn helper(level: i32, chunks: Receiver<(usize, Vec<u8>)>, done: Sender<Done>) {
    let mut compressor = Compressor::new(level).ok();
    let mut scratch = Vec::new();
    for (i, raw) in chunks {
        let (piece, free) = encode_owned(compressor.as_mut(), &mut scratch, raw);
        if done.send((i, piece, free)).is_err() {
            break;
        }
    }
}

/// The sink an object streams into: cuts it into chunks and compresses each as soon as it is
/// full, even chunks on this thread and odd ones on the helper thread, so that what is held
/// at any time is the compressed output plus the chunk being filled, the one the helper is
/// compressing, and one spare buffer.
struct ChunkSink<'r> {
    level: i32,
    filling: Vec<u8>,
    /// The index of the chunk being filled.
    next: usize,
    done: Vec<(usize, Piece)>,
    to_helper: Option<SyncSender<(usize, Vec<u8>)>>,
    from_helper: &'r Receiver<Done>,
    spare: Vec<Vec<u8>>,
    scratch: Vec<u8>,
}

impl ChunkSink<'_> {
    /// Takes in what the helper has finished, keeping its freed buffers for reuse.
    fn collect(&mut self, (i, piece, free): Done) {
        self.done.push((i, piece));
        if let Some(buffer) = free
            && self.spare.is_empty()
        {
            self.spare.push(buffer);
        }
    }

    fn dispatch(&mut self) {
        let raw = std::mem::take(&mut self.filling);
        let i = self.next;
        self.next += 1;
        while let Ok(done) = self.from_helper.try_recv() {
            self.collect(done);
        }
        let raw = match (&self.to_helper, i % 2) {
            (Some(to_helper), 1) => match to_helper.send((i, raw)) {
                Ok(()) => return,
                // The helper is gone (it panicked; joining it will say so): compress here.
                Err(mpsc::SendError((_, raw))) => {
                    self.to_helper = None;
                    raw
                }
            },
            _ => raw,
        };
        let (piece, free) = with_compressor(self.level, |c| encode_owned(c, &mut self.scratch, raw));
        self.collect((i, piece, free));
    }

    /// Compresses the last chunk and waits for the helper's; returns every piece in order.
    fn finish(mut self) -> Vec<Piece> {
        if !self.filling.is_empty() {
            self.dispatch();
        }
        self.to_helper = None;
        while let Ok(done) = self.from_helper.recv() {
            self.collect(done);
        }
        let n = self.next;
        in_order(std::mem::take(&mut self.done), n)
    }
}

impl io::Write for ChunkSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
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
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Streams an object through a [`ChunkSink`].
fn encode_streamed(object: &mut NewObject<'_>, level: i32) -> Result<Vec<Piece>, EncodeError> {
    // A rendezvous channel: a chunk waits for the helper rather than queueing, so at most one
    // chunk is being compressed there while this thread fills and compresses the next.
    let (to_helper, chunks) = mpsc::sync_channel::<(usize, Vec<u8>)>(0);
    let (done, from_helper) = mpsc::channel::<Done>();
    thread::scope(|s| {
        let helper =
            thread::Builder::new().name("redb-zstd".into()).spawn_scoped(s, move || helper(level, chunks, done));
        let mut sink = ChunkSink {
            level,
            filling: Vec::new(),
            next: 0,
            done: Vec::new(),
            // Without a helper (no thread to be had), every chunk is compressed here.
            to_helper: helper.is_ok().then_some(to_helper),
            from_helper: &from_helper,
            spare: Vec::new(),
            scratch: Vec::new(),
        };
        let written = object.write_to(&mut sink);
        let pieces = sink.finish();
        if let Ok(helper) = helper {
            helper.join().map_err(|_| EncodeError::Compress(io::Error::other("the zstd helper thread panicked")))?;
        }
        written.map_err(from_write_failure)?;
        Ok(pieces)
    })
}

impl Encoded<'_> {
    /// The length of the blob: at most [`HEADER`] plus the object's length.
    pub(crate) fn blob_len(&self) -> u64 {
        let body = match &self.form {
            Form::RawParts(_) | Form::RawOwned(_) | Form::Chunks { as_raw: true, .. } => self.len,
            Form::Frame(frame) => frame.len() as u64,
            Form::Chunks { pieces, as_raw: false, .. } => {
                let stored: u64 = pieces
                    .iter()
                    .enumerate()
                    .map(|(i, piece)| piece.stored_len(chunk_len(self.len, CHUNK, i)) as u64)
                    .sum();
                (CHUNK_SIZE_FIELD + 4 * pieces.len()) as u64 + stored
            }
        };
        HEADER as u64 + body
    }

    /// Writes the blob into `dst`, which is [`Encoded::blob_len`] bytes long.
    pub(crate) fn write_blob(&self, dst: &mut [u8]) -> Result<(), String> {
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
            Form::Frame(frame) => {
                body.copy_from_slice(frame);
                FRAME
            }
            Form::Chunks { pieces, parts, as_raw: true } => {
                for ((i, piece), out) in pieces.iter().enumerate().zip(body.chunks_mut(CHUNK)) {
                    match (piece, parts) {
                        (Piece::Raw(raw), _) => out.copy_from_slice(raw),
                        (_, Some(parts)) => copy_from_parts(parts, i * CHUNK, out),
                        (Piece::Zstd(frame), None) => with_decompressor(|d| decode_chunk(d, frame, out))?,
                        (Piece::InParts, None) => return Err("a chunk refers to parts that are not there".into()),
                    }
                }
                RAW
            }
            Form::Chunks { pieces, parts, as_raw: false } => {
                let (size, rest) = body.split_at_mut(CHUNK_SIZE_FIELD);
                size.copy_from_slice(&(CHUNK as u32).to_le_bytes());
                let (table, mut data) = rest.split_at_mut(4 * pieces.len());
                for ((i, piece), entry) in pieces.iter().enumerate().zip(table.chunks_exact_mut(4)) {
                    let n = piece.stored_len(chunk_len(self.len, CHUNK, i));
                    entry.copy_from_slice(&(n as u32).to_le_bytes());
                    let (out, tail) = data.split_at_mut(n);
                    match (piece, parts) {
                        (Piece::Zstd(bytes) | Piece::Raw(bytes), _) => out.copy_from_slice(bytes),
                        (Piece::InParts, Some(parts)) => copy_from_parts(parts, i * CHUNK, out),
                        (Piece::InParts, None) => return Err("a chunk refers to parts that are not there".into()),
                    }
                    data = tail;
                }
                CHUNKS
            }
        };
        Ok(())
    }
}

/// Decodes one chunk (or frame) into `out`, which is exactly as long as it must decode to:
/// a chunk stored at its full length is raw.
fn decode_chunk(decompressor: &mut Decompressor<'static>, stored: &[u8], out: &mut [u8]) -> Result<(), String> {
    if stored.len() == out.len() {
        out.copy_from_slice(stored);
        return Ok(());
    }
    if stored.len() > out.len() {
        return Err(format!("a chunk of {} bytes is stored in {} bytes, more than raw", out.len(), stored.len()));
    }
    let n = decompressor
        .decompress_to_buffer(stored, out)
        .map_err(|e| format!("zstd cannot decode {} bytes into {}: {e}", stored.len(), out.len()))?;
    if n != out.len() {
        return Err(format!("a zstd frame decoded to {n} bytes, not {}", out.len()));
    }
    Ok(())
}

/// Checks that `stored` bytes of zstd can decode to `len` bytes at all.
fn check_ratio(len: u64, stored: usize) -> Result<(), String> {
    if len > stored as u64 * MAX_RATIO {
        return Err(format!("{stored} bytes of zstd cannot decode to the {len} bytes the blob claims"));
    }
    Ok(())
}

/// Allocates the output buffer, failing rather than aborting if there is no memory for it.
fn allocate(len: u64) -> Result<Vec<u8>, String> {
    let fail = || format!("no memory for the {len} bytes the blob claims");
    let len = usize::try_from(len).map_err(|_| fail())?;
    let mut out = Vec::new();
    out.try_reserve_exact(len).map_err(|_| fail())?;
    Ok(out)
}

/// Decodes a blob into the object's bytes. Every length is checked against the blob's own
/// size before anything is allocated; a damaged blob is an error (its detail), never a
/// panic.
pub(crate) fn decode(blob: &[u8]) -> Result<Vec<u8>, String> {
    let Some((header, body)) = blob.split_first_chunk::<HEADER>() else {
        return Err(format!("the blob is {} bytes, shorter than its {HEADER}-byte header", blob.len()));
    };
    let mut len_bytes = [0; 8];
    len_bytes.copy_from_slice(&header[1..]);
    let len = u64::from_le_bytes(len_bytes);
    match header[0] {
        RAW => {
            if body.len() as u64 != len {
                return Err(format!("a raw blob of {len} bytes holds {}", body.len()));
            }
            Ok(body.to_vec())
        }
        FRAME => {
            check_ratio(len, body.len())?;
            match zstd::zstd_safe::get_frame_content_size(body) {
                Ok(Some(size)) if size == len => {}
                Ok(Some(size)) => return Err(format!("the zstd frame holds {size} bytes, the blob claims {len}")),
                Ok(None) | Err(_) => return Err("the zstd frame does not say its length".into()),
            }
            let mut out = allocate(len)?;
            let n = with_decompressor(|d| {
                d.decompress_to_buffer(body, &mut out).map_err(|e| format!("zstd cannot decode the frame: {e}"))
            })?;
            if n as u64 != len {
                return Err(format!("the zstd frame decoded to {n} bytes, not {len}"));
            }
            Ok(out)
        }
        CHUNKS => decode_chunks(len, body),
        other => Err(format!("unknown encoding {other}")),
    }
}

/// Decodes the body of an encoding-2 blob, on two threads.
fn decode_chunks(len: u64, body: &[u8]) -> Result<Vec<u8>, String> {
    let Some((size, rest)) = body.split_first_chunk::<CHUNK_SIZE_FIELD>() else {
        return Err("the blob ends before its chunk size".into());
    };
    let chunk = u32::from_le_bytes(*size) as usize;
    if chunk == 0 {
        return Err("the chunk size is 0".into());
    }
    let n = len.div_ceil(chunk as u64);
    let table_len = n.checked_mul(4).filter(|&t| t <= rest.len() as u64).ok_or_else(|| {
        format!("{n} chunks of {chunk} bytes for {len} bytes do not fit in a body of {} bytes", body.len())
    })? as usize;
    let n = n as usize;
    let (table, mut data) = rest.split_at(table_len);
    let mut stored = Vec::with_capacity(n);
    for (i, entry) in table.chunks_exact(4).enumerate() {
        let m = u32::from_le_bytes(entry.try_into().expect("4 bytes")) as usize;
        let want = chunk_len(len, chunk, i);
        if m > data.len() {
            return Err(format!("chunk {i} is stored in {m} bytes, past the end of the blob"));
        }
        check_ratio(want as u64, m)?;
        let (this, tail) = data.split_at(m);
        stored.push(this);
        data = tail;
    }
    if !data.is_empty() {
        return Err(format!("{} bytes follow the last chunk", data.len()));
    }
    let mut out = allocate(len)?;
    out.resize(len as usize, 0);
    let mut jobs: [Vec<(&[u8], &mut [u8])>; 2] = [Vec::new(), Vec::new()];
    for (i, pair) in stored.into_iter().zip(out.chunks_mut(chunk)).enumerate() {
        jobs[i % 2].push(pair);
    }
    let [mine, theirs] = jobs;
    let work = |jobs: Vec<(&[u8], &mut [u8])>| -> Result<(), String> {
        with_decompressor(|d| jobs.into_iter().try_for_each(|(stored, out)| decode_chunk(d, stored, out)))
    };
    // The helper takes its share from here; if no thread can be had, this thread does.
    let theirs = Mutex::new(Some(theirs));
    thread::scope(|s| {
        let helper = thread::Builder::new()
            .name("redb-zstd".into())
            .spawn_scoped(s, || theirs.lock().map_or(Ok(()), |mut jobs| jobs.take().map_or(Ok(()), work)))
            .ok();
        work(mine)?;
        let left = theirs.lock().ok().and_then(|mut jobs| if helper.is_none() { jobs.take() } else { None });
        if let Some(left) = left {
            work(left)?;
        }
        match helper {
            Some(helper) => helper.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            None => Ok(()),
        }
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use context_core::ObjectId;

    fn encode_parts(parts: &[&[u8]], level: i32) -> Vec<u8> {
        let len = parts.iter().map(|p| p.len() as u64).sum();
        let mut object = NewObject { id: ObjectId(1), len, data: ObjectData::Parts(parts) };
        let encoded = encode(&mut object, level).unwrap();
        let mut blob = vec![0; encoded.blob_len() as usize];
        encoded.write_blob(&mut blob).unwrap();
        blob
    }

    fn encode_streamed_bytes(bytes: &[u8], piece: usize) -> Vec<u8> {
        let mut write = |out: &mut dyn io::Write| {
            bytes.chunks(piece).try_for_each(|p| out.write_all(p)).map_err(|e| Error::io("test write", "value", e))
        };
        let mut object = NewObject { id: ObjectId(2), len: bytes.len() as u64, data: ObjectData::Write(&mut write) };
        let encoded = encode(&mut object, 1).unwrap();
        let mut blob = vec![0; encoded.blob_len() as usize];
        encoded.write_blob(&mut blob).unwrap();
        blob
    }

    fn text(len: usize) -> Vec<u8> {
        (0..).flat_map(|i: u32| format!("line {i}: status=ok value={}\n", i % 97).into_bytes()).take(len).collect()
    }

    #[test]
    fn encodings_round_trip() {
        let random = context_core::testing::pattern(3, (9 << 20) + 5);
        let compressible = text((9 << 20) + 5);
        // Half random, half text: some chunks shrink, some are stored raw.
        let mixed: Vec<u8> = random[..5 << 20].iter().chain(&compressible[..4 << 20]).copied().collect();
        for (bytes, encoding) in [
            (&b""[..], RAW),
            (&b"x"[..], RAW),
            (&random[..100_000], RAW),
            (&compressible[..100_000], FRAME),
            (&compressible[..(4 << 20) - 1], FRAME),
            (&random[..], RAW),
            (&compressible[..], CHUNKS),
            (&mixed[..], CHUNKS),
        ] {
            let (a, b) = bytes.split_at(bytes.len() / 3);
            for blob in [encode_parts(&[bytes], 1), encode_parts(&[a, b], 1), encode_streamed_bytes(bytes, 7777)] {
                assert_eq!(blob[0], encoding, "{} bytes", bytes.len());
                assert!(blob.len() <= HEADER + bytes.len());
                assert!(decode(&blob).unwrap() == bytes, "{} bytes", bytes.len());
            }
        }
    }

    #[test]
    fn chunks_that_barely_shrink_are_stored_raw() {
        // Random bytes do not shrink: every chunk is stored raw, and so is the whole object.
        let bytes = context_core::testing::pattern(5, 5 << 20);
        for blob in [encode_parts(&[&bytes], 1), encode_streamed_bytes(&bytes, 1 << 16)] {
            assert_eq!(blob[0], RAW);
            assert_eq!(blob.len(), HEADER + bytes.len());
            assert!(decode(&blob).unwrap() == bytes);
        }
        // A streamed object whose one compressed chunk saved less than the chunk table costs
        // is stored raw too, its compressed chunk decoded back into place.
        let mut bytes = context_core::testing::pattern(6, (2 << 20) + 10);
        bytes[..CHUNK].fill(7);
        let first = with_compressor(1, |c| {
            let mut out = Vec::new();
            assert!(compress_into(c, &bytes[..CHUNK], &mut out));
            out
        });
        let pieces = vec![
            Piece::Zstd(first),
            Piece::Raw(bytes[CHUNK..2 * CHUNK].to_vec()),
            Piece::Raw(bytes[2 * CHUNK..].to_vec()),
        ];
        let encoded = Encoded { len: bytes.len() as u64, form: Form::Chunks { pieces, parts: None, as_raw: true } };
        let mut blob = vec![0; encoded.blob_len() as usize];
        encoded.write_blob(&mut blob).unwrap();
        assert_eq!(blob[0], RAW);
        assert!(decode(&blob).unwrap() == bytes);
    }

    #[test]
    fn damage_is_an_error() {
        let compressible = text(5 << 20);
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
            let mut unknown = blob.clone();
            unknown[0] = 9;
            assert!(decode(&unknown).unwrap_err().contains("unknown encoding"));
        }
        let mut chunked = encode_parts(&[&compressible], 1);
        chunked[9..13].copy_from_slice(&0u32.to_le_bytes());
        assert!(decode(&chunked).is_err());
        let mut chunked = encode_parts(&[&compressible], 1);
        chunked[9..13].copy_from_slice(&1u32.to_le_bytes());
        assert!(decode(&chunked).is_err());
    }
}
