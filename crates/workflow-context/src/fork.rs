//! Which process is running: what tells a handle it was inherited by a forked child.
//!
//! # Why
//! A process forked without `exec` (a worker pool that forks, as Python's `multiprocessing`
//! does by default on Linux) holds a copy of its parent's handles: the same index-lock
//! token, the same liveness file, the same tiers. Used there, a handle would act in its
//! parent's name; dropped there, it would remove its parent's liveness file (so the parent
//! looks dead to a sweep) or, if it opened the context, shut the context down under the
//! parent. A handle therefore remembers the process that opened it and refuses to act
//! anywhere else.
//!
//! # How, for the cost of one read
//! Every operation checks, so the check must not be a system call: `getpid` costs about
//! 85 ns on the 2-core VM of `docs/benchmarks.md`, 40 % of a small load. This process's
//! identity lives in one anonymous page mapped with `MADV_WIPEONFORK` (Linux 4.14): a
//! forked child sees that page zeroed, finds no identity there, and takes a new one. Where
//! the kernel refuses the advice, every check asks the kernel instead: slower, never wrong.
//!
//! The identity is the process id. A child in a new PID namespace can have its parent's
//! process id (the parent being its own namespace's init, the child the first process of
//! the new one), so identities also carry a number drawn at random when the process first
//! asks.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};

/// This process's identity: the process id in the low 32 bits, a random number above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Process(u64);

impl Process {
    /// The process id of this identity's process.
    pub(crate) fn pid(self) -> u32 {
        self.0 as u32
    }
}

/// The identity word, at the start of a page that forked children see zeroed; `None` where
/// the kernel cannot wipe a page on fork. The page is mapped once and never unmapped.
static WORD: OnceLock<Option<&'static AtomicU64>> = OnceLock::new();

const PAGE_BYTES: usize = 4096;

/// The identity of a process that cannot keep one in a wiped page: drawn anew each time,
/// so only its process id can be compared (see [`Process::same`]).
fn fresh() -> Process {
    let pid = u64::from(std::process::id());
    let mut random = [0u8; 4];
    // Without randomness the process id alone tells processes apart, but in the rare case
    // of the namespace above.
    let _ = getrandom::fill(&mut random);
    Process(u64::from(u32::from_le_bytes(random)) << 32 | pid)
}

/// Maps the identity page, for the rest of the process.
fn wiped_on_fork() -> Option<&'static AtomicU64> {
    let map = MmapRaw::from(MmapOptions::new().len(PAGE_BYTES).map_anon().ok()?);
    // SAFETY: the range is exactly the anonymous mapping made above, which nothing else
    // refers to yet. MADV_WIPEONFORK changes no byte of this process's memory: it only
    // gives a child forked later a zeroed copy of the range instead of this one.
    unsafe { rustix::mm::madvise(map.as_mut_ptr().cast(), map.len(), rustix::mm::Advice::LinuxWipeOnFork) }.ok()?;
    let map: &'static MmapRaw = Box::leak(Box::new(map));
    // SAFETY: the mapping is PAGE_BYTES long, readable and writable, page-aligned (so
    // aligned for an `AtomicU64`), and never unmapped (leaked above). Its memory is
    // touched only through this atomic.
    Some(unsafe { &*map.as_mut_ptr().cast::<AtomicU64>() })
}

/// This process's identity. Checked at every operation, so the common case is two loads.
#[inline]
pub(crate) fn this_process() -> Process {
    if let Some(Some(word)) = WORD.get() {
        let known = word.load(Ordering::Relaxed);
        if known != 0 {
            return Process(known);
        }
    }
    first_asked()
}

/// This process's identity the first time it is asked for, in this process or in this
/// forked child (whose page is zeroed), or every time without a wiped page.
#[cold]
fn first_asked() -> Process {
    let Some(word) = WORD.get_or_init(wiped_on_fork) else {
        return fresh();
    };
    // Of two threads asking at once, the first to store wins, and both hand out what the
    // page holds.
    let _ = word.compare_exchange(0, fresh().0, Ordering::Relaxed, Ordering::Relaxed);
    Process(word.load(Ordering::Relaxed))
}

impl Process {
    /// Whether `self` and `other` are one process. Identities drawn without a wiped page
    /// differ at every draw, so only their process ids are compared then.
    #[inline]
    pub(crate) fn same(self, other: Process) -> bool {
        self == other || (matches!(WORD.get(), Some(None)) && self.pid() == other.pid())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_keeps_its_identity() {
        let a = this_process();
        let b = std::thread::spawn(this_process).join().unwrap();
        assert!(a.same(b) && b.same(a));
        assert_eq!(a.pid(), std::process::id());
    }

    #[test]
    fn identities_of_other_processes_differ() {
        let me = this_process();
        let other = Process(u64::from(me.pid().wrapping_add(1)) | (me.0 & !0xffff_ffff));
        assert!(!me.same(other));
    }
}
