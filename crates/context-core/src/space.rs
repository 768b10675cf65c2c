//! Reserving the space of a new file before anything is written to it.
//!
//! A tier that maps a file, or hands its pages to other processes, must own every block
//! before the first byte goes in: a write through a mapping into a hole on a full disk (or
//! a full `/dev/shm`) is a `SIGBUS`, not an error. [`reserve`] does that with
//! `fallocate(2)`, and takes care of what a bare call leaves to its caller:
//!
//! - **Signals.** `fallocate(2)` may fail with `EINTR` when the process catches a signal,
//!   and on tmpfs (`/dev/shm`) the kernel then gives back what the call had allocated.
//!   Recent kernels give up only for a fatal signal, older ones for any signal the process
//!   handles: a profiler's timer, or a `SIGCHLD` in a server that runs workers. One call
//!   for 256 MiB under a steady timer could then fail every time; [`reserve`] asks for at
//!   most 16 MiB at once and asks again for an interrupted piece, so it makes progress
//!   under any signal rate a process can live with.
//! - **Failure.** If a piece fails (a full file system, say), the file is cut back to empty,
//!   so the blocks of the pieces before are free again at once, even if the caller keeps
//!   the file.

use std::io;
use std::os::fd::AsFd;

use rustix::fs::FallocateFlags;
use rustix::io::Errno;

/// The most one `fallocate` call asks for.
const PIECE: u64 = 16 << 20;

/// Interruptions of one piece in a row after which [`reserve`] gives up (with
/// [`io::ErrorKind::Interrupted`]): a process interrupted that often does nothing else.
const MAX_INTERRUPTS: u32 = 1000;

/// Allocates the blocks of the first `len` bytes of the empty file `file`, and sets its
/// length to `len`.
///
/// `file` must be empty (a file just created): on failure it is truncated back to empty.
/// A length of zero is no call at all. Errors are those of `fallocate(2)`: a full file
/// system is [`io::ErrorKind::StorageFull`] (`ENOSPC`), a file system without
/// `fallocate` [`io::ErrorKind::Unsupported`] (`EOPNOTSUPP`), which callers may answer by
/// writing instead. An interrupted call is repeated, up to a limit.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let file = std::fs::File::create_new(dir.path().join("value"))?;
/// context_core::space::reserve(&file, 3 << 20)?;
/// assert_eq!(file.metadata()?.len(), 3 << 20);
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn reserve(file: impl AsFd, len: u64) -> io::Result<()> {
    let fd = file.as_fd();
    in_pieces(len, |offset, n| rustix::fs::fallocate(fd, FallocateFlags::empty(), offset, n)).map_err(|e| {
        // Frees what the pieces before took. Harmless if nothing was allocated; if it
        // fails too, the caller's own clean-up (it removes the file) frees the blocks.
        let _ = rustix::fs::ftruncate(fd, 0);
        io::Error::from(e)
    })
}

/// Calls `allocate(offset, len)` over `[0, len)` in pieces of at most [`PIECE`] bytes, in
/// order, repeating an interrupted piece; stops at the first other error.
fn in_pieces(len: u64, mut allocate: impl FnMut(u64, u64) -> Result<(), Errno>) -> Result<(), Errno> {
    let mut at = 0;
    let mut interrupts = 0;
    while at < len {
        let n = (len - at).min(PIECE);
        match allocate(at, n) {
            Ok(()) => {
                at += n;
                interrupts = 0;
            }
            Err(Errno::INTR) if interrupts < MAX_INTERRUPTS => interrupts += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    use super::*;
    use crate::sandbox::{Sandboxed, in_private_tmpfs};

    /// The pieces `in_pieces` asks for, successful or not, with what `answer` says to each
    /// (by call number).
    fn calls(len: u64, mut answer: impl FnMut(usize) -> Result<(), Errno>) -> (Result<(), Errno>, Vec<(u64, u64)>) {
        let mut seen = Vec::new();
        let result = in_pieces(len, |offset, n| {
            seen.push((offset, n));
            answer(seen.len() - 1)
        });
        (result, seen)
    }

    #[test]
    fn pieces_cover_the_file_in_order_and_interrupted_ones_are_asked_again() {
        let len = 3 * PIECE + 5;
        // Every other call is interrupted: each piece is asked for twice, then done.
        let (result, seen) = calls(len, |i| if i % 2 == 0 { Err(Errno::INTR) } else { Ok(()) });
        assert_eq!(result, Ok(()));
        let expected = [(0, PIECE), (PIECE, PIECE), (2 * PIECE, PIECE), (3 * PIECE, 5)];
        let doubled: Vec<_> = expected.iter().flat_map(|&p| [p, p]).collect();
        assert_eq!(seen, doubled);
        // Nothing to allocate: no call (fallocate refuses a zero length).
        assert_eq!(calls(0, |_| panic!("called for nothing")).0, Ok(()));
        assert_eq!(calls(PIECE, |_| Ok(())).1, [(0, PIECE)]);
    }

    #[test]
    fn interruptions_stop_only_past_the_limit_and_other_errors_at_once() {
        let limit = MAX_INTERRUPTS as usize;
        let (result, seen) = calls(2 * PIECE, |i| if i < limit { Err(Errno::INTR) } else { Ok(()) });
        assert_eq!(result, Ok(()));
        assert_eq!(seen.len(), limit + 2);
        // The count starts again with each piece.
        let (result, _) = calls(2 * PIECE, |i| if i != limit && i < 2 * limit + 1 { Err(Errno::INTR) } else { Ok(()) });
        assert_eq!(result, Ok(()));
        let (result, seen) = calls(PIECE, |_| Err(Errno::INTR));
        assert_eq!(result, Err(Errno::INTR));
        assert_eq!(seen.len(), limit + 1);
        let (result, seen) = calls(4 * PIECE, |i| if i == 1 { Err(Errno::NOSPC) } else { Ok(()) });
        assert_eq!(result, Err(Errno::NOSPC));
        assert_eq!(seen, [(0, PIECE), (PIECE, PIECE)], "nothing asked after a full disk");
    }

    #[test]
    fn reserves_every_block() {
        let dir = tempfile::tempdir().unwrap();
        let shm = Path::new("/dev/shm");
        for dir in [dir.path(), shm].into_iter().filter(|d| d.is_dir()) {
            let file = tempfile::tempfile_in(dir).unwrap();
            let len = PIECE + (5 << 20) + 123;
            reserve(&file, len).unwrap();
            let meta = file.metadata().unwrap();
            assert_eq!(meta.len(), len, "{}", dir.display());
            assert!(meta.blocks() * 512 >= len, "{}: {} blocks for {len} bytes", dir.display(), meta.blocks());
            let empty = tempfile::tempfile_in(dir).unwrap();
            reserve(&empty, 0).unwrap();
            assert_eq!(empty.metadata().unwrap().len(), 0);
        }
    }

    const INNER_ENV: &str = "CONTEXT_CORE_SPACE_TINY_TMPFS";

    #[test]
    fn a_failed_reserve_leaves_the_file_empty_and_its_blocks_free() {
        let dir = tempfile::tempdir().unwrap();
        let env = [(INNER_ENV, dir.path().as_os_str())];
        match in_private_tmpfs("space::tests::inner_failed_reserve", dir.path(), "24m", &env) {
            Sandboxed::Ran(_) => {}
            Sandboxed::Skipped(why) => println!("SKIPPED a_failed_reserve_leaves_the_file_empty: {why}"),
        }
    }

    #[test]
    #[ignore = "runs inside a private 24 MiB tmpfs, started by a_failed_reserve_leaves_the_file_empty_and_its_blocks_free"]
    fn inner_failed_reserve() {
        let Some(dir) = std::env::var_os(INNER_ENV) else {
            println!("SKIPPED inner_failed_reserve: only meaningful when started by its outer test");
            return;
        };
        let path = Path::new(&dir).join("big");
        let file = std::fs::File::create_new(&path).unwrap();
        // The first 16 MiB piece fits, the second does not.
        let err = reserve(&file, 40 << 20).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull, "{err}");
        let meta = file.metadata().unwrap();
        assert_eq!((meta.len(), meta.blocks()), (0, 0), "the first piece's blocks were kept");
        // All of it is free again: 20 MiB fit beside the file that failed.
        let other = std::fs::File::create_new(Path::new(&dir).join("other")).unwrap();
        reserve(&other, 20 << 20).unwrap();
    }
}
