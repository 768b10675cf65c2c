//! The storage backend: redb's own file backend, without `fsync`, and giving back the space
//! a failed write transaction took when the disk turns out to be full.

use std::fs::File;
use std::io;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use redb::backends::FileBackend;
use redb::{BackendError, DatabaseError, StorageBackend};
use rustix::fs::FallocateFlags;
use rustix::io::Errno;

/// redb's "writer byte" (`docs/design.md`, "Lock bytes"): a process holds it exclusively for
/// the whole of a write transaction (and of an open), and nobody else writes or resizes the
/// file meanwhile.
const WRITER_BYTE: u64 = 1 << 62;
/// redb's "god byte" in the header at offset 0 (`docs/design.md`, "Database header"). Its
/// lowest bit names the primary commit slot; flipping it makes a commit live.
const GOD_BYTE: usize = 9;
const PRIMARY_BIT: u8 = 1;

/// [`FileBackend`], with two changes for scratch data.
///
/// **No `fsync`.** redb's multi-process modes allow only durable commits, each of which syncs
/// the file twice. A context's data dies with its run and never outlives a reboot, so those
/// syncs buy nothing: every process reads the file through the same page cache, which is
/// coherent without them, and a process that crashes loses nothing it had written. Only a
/// crash of the whole machine can lose commits, and the context is gone then anyway.
///
/// **A full disk gives back what the failed transaction wrote.** redb grows the file sparse
/// and fills it as it writes. A write transaction that runs out of space part way would leave
/// the blocks it did write allocated, in pages that are free again, and the file system full
/// for everyone, this tier included. So the backend remembers which byte ranges it wrote
/// while it holds the writer byte, and when a write fails with `ENOSPC` (or `EDQUOT`) before
/// the transaction's commit went live, it punches holes over them. Those pages are this
/// transaction's alone: it holds the writer byte, so no other process writes the file
/// meanwhile; redb writes pages copy-on-write, so the live commit names none of them (nor,
/// once they are free to reuse, does any reader's snapshot); and the commit goes live only
/// with the header write that flips the primary slot, which never comes. The header itself
/// (offset 0) is never punched, and the file keeps its length, so the header's layout stays
/// true. From then on the backend refuses every write and resize, so the transaction cannot
/// commit; the tier opens a fresh handle.
///
/// Every method, including the byte-range locks the multi-process modes are built on, goes
/// to [`FileBackend`]; `sync_data` alone does nothing.
#[derive(Debug)]
pub(crate) struct ScratchBackend {
    inner: FileBackend,
    /// Another descriptor of the same open file (so the same locks), to punch holes with.
    file: File,
    window: Mutex<Window>,
    /// Set once a write ran out of space: every later write and resize fails.
    out_of_space: AtomicBool,
}

/// What this backend wrote during its hold of the writer byte.
#[derive(Debug, Default)]
struct Window {
    /// The primary slot when the hold began (or the last commit of the hold went live), if
    /// this backend holds the writer byte and could read it.
    primary: Option<u8>,
    /// Byte ranges written since then, adjacent ones merged; never the header.
    written: Vec<(u64, u64)>,
}

/// Whether an error means the file system (or the user's quota) is full.
pub(crate) fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == Errno::NOSPC.raw_os_error() || code == Errno::DQUOT.raw_os_error())
}

fn is_writer_byte(start: Bound<u64>, end: Bound<u64>) -> bool {
    start == Bound::Included(WRITER_BYTE) && end == Bound::Included(WRITER_BYTE)
}

impl ScratchBackend {
    /// Wraps an open database file.
    pub(crate) fn new(file: File) -> Result<Self, DatabaseError> {
        let punch = file.try_clone()?;
        Ok(ScratchBackend {
            inner: FileBackend::new(file)?,
            file: punch,
            window: Mutex::new(Window::default()),
            out_of_space: AtomicBool::new(false),
        })
    }

    fn window(&self) -> MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn refuse_after_no_space(&self) -> io::Result<()> {
        if self.out_of_space.load(Ordering::Acquire) {
            return Err(Errno::NOSPC.into());
        }
        Ok(())
    }

    /// The primary slot the file's header names now, if the header can be read.
    fn primary_slot(&self) -> Option<u8> {
        let mut god = [0; 1];
        self.inner.read(GOD_BYTE as u64, &mut god).ok().map(|()| god[0] & PRIMARY_BIT)
    }

    /// The writer byte was taken: a write transaction (or an open) begins.
    fn begin_hold(&self) {
        *self.window() = Window { primary: self.primary_slot(), written: Vec::new() };
    }

    /// The disk is full: punches holes over what this hold wrote, and over the write that
    /// failed (`failed`, which may have written part of its bytes), if it is still safe to;
    /// refuses further writes.
    fn give_back(&self, failed: Option<(u64, u64)>) {
        self.out_of_space.store(true, Ordering::Release);
        let mut window = self.window();
        let mut written = std::mem::take(&mut window.written);
        written.extend(failed.filter(|&(offset, _)| offset != 0));
        if window.primary.is_none() || window.primary != self.primary_slot() {
            return;
        }
        for (offset, len) in written {
            // Best effort: where holes cannot be punched, the space stays taken.
            let _ =
                rustix::fs::fallocate(&self.file, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, len);
        }
    }
}

#[deny(clippy::missing_trait_methods)]
impl StorageBackend for ScratchBackend {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.refuse_after_no_space()?;
        let result = self.inner.set_len(len);
        if let Err(e) = &result
            && is_no_space(e)
        {
            self.give_back(None);
        }
        result
    }

    /// Does nothing; see the type's docs.
    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.refuse_after_no_space()?;
        let result = self.inner.write(offset, data);
        match &result {
            // The header. Flipping the primary slot makes the commit live, with every page
            // written so far.
            Ok(()) if offset == 0 => {
                let mut window = self.window();
                if let Some(primary) = window.primary
                    && data.len() > GOD_BYTE
                    && data[GOD_BYTE] & PRIMARY_BIT != primary
                {
                    window.primary = Some(data[GOD_BYTE] & PRIMARY_BIT);
                    window.written.clear();
                }
            }
            Ok(()) => {
                let mut window = self.window();
                if window.primary.is_some() {
                    let end = offset + data.len() as u64;
                    match window.written.last_mut() {
                        Some((start, len)) if *start + *len == offset => *len += data.len() as u64,
                        _ => window.written.push((offset, end - offset)),
                    }
                }
            }
            Err(e) if is_no_space(e) => self.give_back(Some((offset, data.len() as u64))),
            Err(_) => {}
        }
        result
    }

    fn close(&self) -> io::Result<()> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        let acquired = self.inner.try_lock_range(start, end)?;
        if acquired && is_writer_byte(start, end) {
            self.begin_hold();
        }
        Ok(acquired)
    }

    fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)?;
        if is_writer_byte(start, end) {
            self.begin_hold();
        }
        Ok(())
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        if is_writer_byte(start, end) {
            *self.window() = Window::default();
        }
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}
