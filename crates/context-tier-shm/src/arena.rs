//! Arenas: shared-memory segments cut into equal slots, for small objects.
//!
//! Layout of an arena segment (all words are native-endian `u64`, all accessed atomically,
//! by every process, through [`Arena::words`]):
//!
//! ```text
//! offset 0            magic        MAGIC once the creator has initialised the header
//! offset 8            geometry     slot size (low 32 bits) | slot count (high 32 bits)
//! offset 16           bitmap       one bit per slot, set while the slot is allocated
//! after the bitmap    slot ids     one word per slot: object id + 1, or 0 when empty
//! header_len (4 KiB multiple)      the slots, slot_size bytes each
//! ```
//!
//! A class's first arena has 256 KiB of slots, so that a context with a few small values
//! takes little shared memory. Every later arena is one 2 MiB segment, header included,
//! mapped at a 2 MiB-aligned address and, where the kernel allows, backed by one huge page
//! (`MADV_COLLAPSE`, which works on `/dev/shm` even where tmpfs is mounted without
//! `huge=`): a random read of a value then needs no 4 KiB page walk, which in a virtual
//! machine costs as much as the read itself. An arena created with less than 2 MiB of
//! shared memory left is small like the first; its segment's size says which it is.
//!
//! Protocol (lock-free, across processes). A slot belongs to whoever holds its id word; the
//! bitmap is only a hint of which slots are taken, so that allocation need not scan the id
//! words, and a process killed at any instruction leaves no slot that nobody can free:
//! - allocate: pick a slot whose bit is clear, claim it with a compare-exchange of its id
//!   word from 0 to the tag (id + 1), then set its bit; release fence, write the bytes, store
//!   the tag again with release ordering. A claim that loses the race moves on. A store may
//!   first try one given slot (the one its process freed last), claimed the same way;
//! - read: load the id word (acquire), copy the bytes, acquire fence, load the id word
//!   again; the copy counts only if both loads saw the tag. Tags are never reused, so a
//!   slot freed and reused while it was copied is always noticed (a seqlock keyed by id);
//! - free: compare-exchange the id word from the tag to 0, then clear the bit;
//! - count: the slots whose id word is not 0.
//!
//! A process killed after claiming a slot leaves its tag in the id word: the object can be
//! found by id and freed. One killed between the two steps of a free leaves a set bit over
//! an empty id word: that slot is not counted, and is skipped until the arena is destroyed.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::time::{Duration, Instant};

use context_core::{Error, Result, cache};
use rustix::fd::OwnedFd;
use rustix::fs::Mode;
use rustix::io::Errno;
use rustix::mm::{MapFlags, ProtFlags};
use rustix::shm;

/// Written last by an arena's creator: the header is initialised.
const MAGIC: u64 = u64::from_le_bytes(*b"wfctxAR2");
/// Written by `destroy` before it unlinks an arena, so that processes which still have it
/// mapped stop using it.
const DESTROYED: u64 = u64::from_le_bytes(*b"wfctxDED");
/// Bytes of slots in a class's first arena.
const FIRST_DATA_BYTES: usize = 256 * 1024;
/// The size of every later arena, header included: one huge page.
const HUGE_ARENA: usize = 2 << 20;
/// How long to wait for another process to finish creating an arena.
const CREATE_WAIT: Duration = Duration::from_millis(200);
const PAGE: usize = 4096;
/// How many 64-byte lines of a freed slot to prefetch for the next store.
const PREFETCH_LINES: usize = 4;

/// Where things are in an arena of one slot size.
#[derive(Clone, Copy, Debug)]
struct Layout {
    slot_size: usize,
    slot_count: usize,
    /// Words of the allocation bitmap.
    bitmap_words: usize,
    /// Offset of the slot id words.
    ids_offset: usize,
    /// Offset of the first slot.
    header_len: usize,
    /// Size of the whole segment.
    total: usize,
}

/// The most slots an arena of `slot_size`-byte slots has.
#[cfg(test)]
pub(crate) fn most_slots(slot_size: usize) -> usize {
    Layout::small(slot_size).slot_count.max(Layout::huge(slot_size).slot_count)
}

impl Layout {
    /// The layout arena `n` of the class of `slot_size`-byte slots is created with: small
    /// for the first, one huge page for the others. (One that finds too little shared
    /// memory left for a huge page is made small; the size of its segment tells which.)
    fn new(slot_size: usize, n: usize) -> Self {
        if n == 0 { Self::small(slot_size) } else { Self::huge(slot_size) }
    }

    /// The layout of an arena whose segment is `size` bytes, if it is one of the two.
    fn of_size(slot_size: usize, size: u64) -> Option<Self> {
        [Self::small(slot_size), Self::huge(slot_size)].into_iter().find(|l| l.total as u64 == size)
    }

    /// [`FIRST_DATA_BYTES`] of slots.
    fn small(slot_size: usize) -> Self {
        let l = Self::with_slots(slot_size, FIRST_DATA_BYTES / slot_size);
        Layout { total: l.header_len + FIRST_DATA_BYTES, ..l }
    }

    /// One huge page.
    fn huge(slot_size: usize) -> Self {
        // The most slots that fit in one huge page with their header: each slot takes its
        // bytes, its id word and a bit, and the header is rounded up to a page.
        let mut slot_count = (HUGE_ARENA - PAGE) / (slot_size + 8);
        while Self::with_slots(slot_size, slot_count + 1).end() <= HUGE_ARENA {
            slot_count += 1;
        }
        while Self::with_slots(slot_size, slot_count).end() > HUGE_ARENA {
            slot_count -= 1;
        }
        Layout { total: HUGE_ARENA, ..Self::with_slots(slot_size, slot_count) }
    }

    /// A layout of `slot_count` slots, its size their end.
    fn with_slots(slot_size: usize, slot_count: usize) -> Self {
        let bitmap_words = slot_count.div_ceil(64);
        let ids_offset = 16 + 8 * bitmap_words;
        let header_len = (ids_offset + 8 * slot_count).div_ceil(PAGE) * PAGE;
        let total = header_len + slot_count * slot_size;
        Layout { slot_size, slot_count, bitmap_words, ids_offset, header_len, total }
    }

    /// Where the last slot ends.
    fn end(&self) -> usize {
        self.header_len + self.slot_count * self.slot_size
    }

    /// Whether the arena is one huge page, to be mapped at an address aligned to it.
    fn is_huge(&self) -> bool {
        self.total == HUGE_ARENA
    }

    fn geometry(&self) -> u64 {
        self.slot_size as u64 | ((self.slot_count as u64) << 32)
    }
}

/// The answer of [`Arena::open`].
pub(crate) enum Opened {
    /// The arena exists and is initialised.
    Ready(Arc<Arena>),
    /// No arena has this name (or it is being destroyed).
    Missing,
    /// The arena exists but its creator has not finished (or died before finishing).
    NotReady,
}

/// The answer of [`Arena::open_or_create`].
pub(crate) enum Created {
    /// The arena, created by this call or by another process.
    Ready(Arc<Arena>),
    /// Shared memory is full; nothing was left behind.
    NoSpace,
    /// The name is taken by an arena that never became ready: its creator died. Use the next.
    Skip,
}

/// How many slots arena `n` of the class of `slot_size`-byte slots has.
#[cfg(test)]
pub(crate) fn slot_count(slot_size: usize, n: usize) -> usize {
    Layout::new(slot_size, n).slot_count
}

/// One mapped arena.
pub(crate) struct Arena {
    name: String,
    layout: Layout,
    map: Mapping,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena").field("name", &self.name).field("slot_size", &self.layout.slot_size).finish()
    }
}

/// Whether an error from reserving space means "shared memory is full".
pub(crate) fn is_no_space(e: Errno) -> bool {
    e == Errno::NOSPC || e == Errno::DQUOT || e == Errno::NOMEM
}

/// The error number of an error of a system call, for [`is_no_space`].
pub(crate) fn errno_of(e: io::Error) -> Errno {
    Errno::from_io_error(&e).unwrap_or(Errno::IO)
}

pub(crate) fn io_err(op: &'static str, name: &str, e: impl Into<io::Error>) -> Error {
    Error::io(op, PathBuf::from(name), e.into())
}

impl Arena {
    /// Opens an existing arena without waiting for it to become ready.
    pub(crate) fn open(name: &str, slot_size: usize) -> Result<Opened> {
        let fd = match shm::open(name, shm::OFlags::RDWR, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(Opened::Missing),
            Err(e) => return Err(io_err("open shared-memory arena", name, e)),
        };
        let stat = rustix::fs::fstat(&fd).map_err(|e| io_err("read size of shared-memory arena", name, e))?;
        let Some(layout) = u64::try_from(stat.st_size).ok().and_then(|size| Layout::of_size(slot_size, size)) else {
            // Still being created (the size is set by fallocate before the header is written).
            return Ok(Opened::NotReady);
        };
        let arena = Self::map(name, layout, &fd)?;
        match arena.magic().load(Ordering::Acquire) {
            MAGIC => {
                let geometry = arena.words(8, 1)[0].load(Ordering::Relaxed);
                if geometry != layout.geometry() {
                    return Err(Error::corrupt(
                        name,
                        format!(
                            "arena geometry {geometry:#x}, expected {:#x} for {slot_size}-byte slots",
                            layout.geometry()
                        ),
                    ));
                }
                Ok(Opened::Ready(Arc::new(arena)))
            }
            DESTROYED => Ok(Opened::Missing),
            _ => Ok(Opened::NotReady),
        }
    }

    /// Creates arena `n` of its class, or opens the one another process is creating under
    /// this name.
    pub(crate) fn open_or_create(name: &str, slot_size: usize, n: usize) -> Result<Created> {
        let layout = Layout::new(slot_size, n);
        // An arena that vanishes between our create and open attempts was being created by a
        // process that found shared memory full; try again a few times.
        for _ in 0..3 {
            let flags = shm::OFlags::CREATE | shm::OFlags::EXCL | shm::OFlags::RDWR;
            match shm::open(name, flags, Mode::from_raw_mode(0o600)) {
                Ok(fd) => return Self::init(name, layout, fd),
                Err(Errno::EXIST) => {}
                // Out of space or, on a tmpfs mounted with `nr_inodes`, of inodes.
                Err(e) if is_no_space(e) => return Ok(Created::NoSpace),
                Err(e) => return Err(io_err("create shared-memory arena", name, e)),
            }
            let deadline = Instant::now() + CREATE_WAIT;
            loop {
                match Self::open(name, slot_size)? {
                    Opened::Ready(arena) => return Ok(Created::Ready(arena)),
                    Opened::Missing => break,
                    Opened::NotReady if Instant::now() >= deadline => return Ok(Created::Skip),
                    Opened::NotReady => std::thread::yield_now(),
                }
            }
        }
        Ok(Created::Skip)
    }

    /// Reserves, maps and initialises a segment this process just created: with `layout`,
    /// or small if there is no room for a huge one.
    fn init(name: &str, mut layout: Layout, fd: OwnedFd) -> Result<Created> {
        let reserve = |l: &Layout| context_core::space::reserve(&fd, l.total as u64).map_err(errno_of);
        let mut reserved = reserve(&layout);
        if reserved.is_err_and(is_no_space) && layout.is_huge() {
            // Use what is left (a failed reserve leaves the segment empty).
            layout = Layout::small(layout.slot_size);
            reserved = reserve(&layout);
        }
        if let Err(e) = reserved {
            let _ = shm::unlink(name);
            if is_no_space(e) {
                return Ok(Created::NoSpace);
            }
            return Err(io_err("reserve shared-memory arena", name, e));
        }
        let arena = match Self::map(name, layout, &fd) {
            Ok(arena) => arena,
            Err(e) => {
                let _ = shm::unlink(name);
                return Err(e);
            }
        };
        // The pages are fresh from fallocate, hence zero: an empty bitmap and empty id words.
        arena.words(8, 1)[0].store(layout.geometry(), Ordering::Relaxed);
        arena.magic().store(MAGIC, Ordering::Release);
        if layout.is_huge() {
            // One huge page in place of 512 small ones. After the arena is published, so
            // that nobody waits for it: the kernel moves the contents under every mapping
            // (other processes' mappings, aligned too, then fault the huge page in whole),
            // and a collapse that must first compact memory delays only this store.
            arena.map.collapse();
        }
        Ok(Created::Ready(Arc::new(arena)))
    }

    fn map(name: &str, layout: Layout, fd: &OwnedFd) -> Result<Self> {
        let align = if layout.is_huge() { HUGE_ARENA } else { PAGE };
        let map = Mapping::new(fd, layout.total, align).map_err(|e| io_err("map shared-memory arena", name, e))?;
        Ok(Arena { name: name.to_owned(), layout, map })
    }

    /// Whether the arena is mapped with huge pages in this process (`smaps`). For tests.
    #[cfg(test)]
    pub(crate) fn is_huge_mapped(&self) -> bool {
        context_core::testing::mapping_field(self.map.ptr as usize, "ShmemPmdMapped")
            .and_then(|kb| kb.trim_end_matches(" kB").parse::<usize>().ok())
            .is_some_and(|kb| kb * 1024 >= HUGE_ARENA)
    }

    /// `count` atomic words starting at byte `offset` of the mapping.
    fn words(&self, offset: usize, count: usize) -> &[AtomicU64] {
        assert!(
            offset.is_multiple_of(8) && offset.checked_add(count * 8).is_some_and(|end| end <= self.map.len),
            "arena word range {offset}+{count}×8 outside the {}-byte mapping",
            self.map.len
        );
        // SAFETY: the range [offset, offset + 8 * count) lies inside the mapping (asserted
        // above), which is readable and writable (`Mapping::new` maps it so) and
        // stays mapped for as long as `self`, which the returned borrow cannot outlive. The
        // mapping starts on a page boundary and `offset` is a multiple of 8, so every word
        // is aligned for `AtomicU64`. Every process touches arena memory only through
        // atomic operations (this function is the only way in), so the memory is never
        // accessed non-atomically while these references exist, and `AtomicU64` allows
        // mutation through a shared reference.
        unsafe { std::slice::from_raw_parts(self.map.ptr.add(offset).cast::<AtomicU64>(), count) }
    }

    fn magic(&self) -> &AtomicU64 {
        &self.words(0, 1)[0]
    }

    fn bitmap(&self) -> &[AtomicU64] {
        self.words(16, self.layout.bitmap_words)
    }

    fn ids(&self) -> &[AtomicU64] {
        self.words(self.layout.ids_offset, self.layout.slot_count)
    }

    fn slot_words(&self, slot: usize) -> &[AtomicU64] {
        self.words(self.layout.header_len + slot * self.layout.slot_size, self.layout.slot_size / 8)
    }

    /// Whether the arena is still in use (not destroyed by some process).
    pub(crate) fn is_live(&self) -> bool {
        self.magic().load(Ordering::Acquire) == MAGIC
    }

    /// Marks the arena destroyed so that processes holding it mapped stop using it.
    pub(crate) fn mark_destroyed(&self) {
        self.magic().store(DESTROYED, Ordering::Release);
    }

    /// Bits of bitmap word `i` that stand for real slots.
    fn valid_bits(&self, i: usize) -> u64 {
        let remaining = self.layout.slot_count - i * 64;
        if remaining >= 64 { u64::MAX } else { (1u64 << remaining) - 1 }
    }

    /// Allocates a free slot for the object tagged `tag` (its id + 1), `prefer` if that one
    /// is free, and writes `bytes` into it. `None` when the arena is full.
    pub(crate) fn store(&self, tag: u64, bytes: &[u8], prefer: Option<usize>) -> Option<usize> {
        debug_assert!(tag != 0 && bytes.len() <= self.layout.slot_size);
        if bytes.len() > self.layout.slot_size {
            return None;
        }
        let slot = match prefer {
            Some(slot) if self.claim_slot(slot, tag) => slot,
            _ => self.claim(tag)?,
        };
        let id = &self.ids()[slot];
        // No other process writes this slot now: we hold its id word. Stale readers of a
        // former occupant may still be copying it; the release fence orders the claim before
        // the byte stores below, so a reader that sees any of our bytes also sees the tag
        // change and discards its copy.
        fence(Ordering::Release);
        // The whole slot: words past the object are zeroed, so that nothing of a former
        // occupant is left for a read that asks for more bytes than this object has.
        let mut chunks = bytes.chunks(8);
        for word in self.slot_words(slot) {
            let mut w = [0u8; 8];
            if let Some(chunk) = chunks.next() {
                w[..chunk.len()].copy_from_slice(chunk);
            }
            word.store(u64::from_ne_bytes(w), Ordering::Relaxed);
        }
        // Publish the bytes to readers that acquire the id word.
        id.store(tag, Ordering::Release);
        Some(slot)
    }

    /// Claims `slot` for `tag` if it is free: its id word goes from 0 to `tag`, then its bit
    /// is set.
    fn claim_slot(&self, slot: usize, tag: u64) -> bool {
        if slot >= self.layout.slot_count
            || self.ids()[slot].compare_exchange(0, tag, Ordering::AcqRel, Ordering::Relaxed).is_err()
        {
            return false;
        }
        self.bitmap()[slot / 64].fetch_or(1 << (slot % 64), Ordering::AcqRel);
        true
    }

    /// Claims a free slot for `tag`: its id word goes from 0 to `tag`, then its bit is set.
    fn claim(&self, tag: u64) -> Option<usize> {
        let ids = self.ids();
        for (i, word) in self.bitmap().iter().enumerate() {
            let mut free = !word.load(Ordering::Relaxed) & self.valid_bits(i);
            while free != 0 {
                let bit = free.trailing_zeros() as usize;
                let slot = i * 64 + bit;
                if ids[slot].compare_exchange(0, tag, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                    word.fetch_or(1 << bit, Ordering::AcqRel);
                    return Some(slot);
                }
                free &= !(1 << bit);
            }
        }
        None
    }

    /// Copies `len` bytes of the object tagged `tag` out of `slot`; `None` unless the object
    /// is there for the whole copy.
    pub(crate) fn read(&self, slot: usize, tag: u64, len: usize) -> Option<Vec<u8>> {
        if slot >= self.layout.slot_count || len > self.layout.slot_size || tag == 0 {
            return None;
        }
        let id = &self.ids()[slot];
        if id.load(Ordering::Acquire) != tag {
            return None;
        }
        let mut out = Vec::with_capacity(len.div_ceil(8) * 8);
        for word in &self.slot_words(slot)[..len.div_ceil(8)] {
            out.extend_from_slice(&word.load(Ordering::Relaxed).to_ne_bytes());
        }
        out.truncate(len);
        fence(Ordering::Acquire);
        (id.load(Ordering::Relaxed) == tag).then_some(out)
    }

    /// Frees `slot` if it holds the object tagged `tag`.
    pub(crate) fn free(&self, slot: usize, tag: u64) -> bool {
        if slot >= self.layout.slot_count || tag == 0 {
            return false;
        }
        if self.ids()[slot].compare_exchange(tag, 0, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            return false;
        }
        self.bitmap()[slot / 64].fetch_and(!(1u64 << (slot % 64)), Ordering::Release);
        self.prefetch_for_write(slot);
        true
    }

    /// Asks the CPU to bring the first lines of `slot` into its cache, ready to be written:
    /// the next small store of this process in this class is usually into the slot it
    /// freed last, and without this its bytes are a cache miss by then.
    fn prefetch_for_write(&self, slot: usize) {
        for line in self.slot_words(slot).chunks(8).take(PREFETCH_LINES) {
            cache::prefetch(&line[0], true);
        }
    }

    /// Asks the CPU to bring `slot`'s id word and its first lines into its cache, for a
    /// read that is about to come. Out-of-range slots are ignored.
    pub(crate) fn prefetch_for_read(&self, slot: usize) {
        if slot >= self.layout.slot_count {
            return;
        }
        cache::prefetch(&self.ids()[slot], false);
        for line in self.slot_words(slot).chunks(8).take(PREFETCH_LINES) {
            cache::prefetch(&line[0], false);
        }
    }

    /// The slot holding the object tagged `tag`, if any.
    pub(crate) fn find(&self, tag: u64) -> Option<usize> {
        if tag == 0 {
            return None;
        }
        self.ids().iter().position(|id| id.load(Ordering::Acquire) == tag)
    }

    /// The number of slots that hold an object (or one being written).
    pub(crate) fn allocated(&self) -> u64 {
        self.ids().iter().filter(|id| id.load(Ordering::Relaxed) != 0).count() as u64
    }
}

/// A shared read-write mapping of a whole segment, at an address that is a multiple of
/// `align`; unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; it is accessed only
// through atomic words (`Arena::words`), which any thread may use.
unsafe impl Send for Mapping {}
// SAFETY: as for `Send`: shared references only ever reach the memory through atomics.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes of `fd` (a multiple of the page size) at an address that
    /// is a multiple of `align` (a power of two, at least a page).
    fn new(fd: &OwnedFd, len: usize, align: usize) -> io::Result<Self> {
        let prot = ProtFlags::READ | ProtFlags::WRITE;
        if align <= PAGE {
            // SAFETY: a new shared mapping at an address the kernel picks: it overlaps no
            // memory this process uses, and `Drop` unmaps exactly [ptr, ptr + len).
            let ptr = unsafe { rustix::mm::mmap(std::ptr::null_mut(), len, prot, MapFlags::SHARED, fd, 0)? };
            return Ok(Mapping { ptr: ptr.cast(), len });
        }
        // Reserve `len + align` bytes of address space, inaccessible and backed by nothing,
        // then map the segment over the aligned part of it and give back the rest.
        let room = len + align;
        // SAFETY: a new private mapping with no access at an address the kernel picks: it
        // overlaps no memory this process uses.
        let base = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                room,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )?
        }
        .cast::<u8>();
        let lead = (base as usize).next_multiple_of(align) - base as usize;
        // SAFETY: [base + lead, base + lead + len) lies inside the reservation just made
        // (lead < align), which nothing else in this process knows of, so MAP_FIXED
        // replaces only our own inaccessible pages.
        let mapped =
            unsafe { rustix::mm::mmap(base.add(lead).cast(), len, prot, MapFlags::SHARED | MapFlags::FIXED, fd, 0) };
        if let Err(e) = mapped {
            // SAFETY: the whole reservation is ours and nothing points into it.
            let _ = unsafe { rustix::mm::munmap(base.cast(), room) };
            return Err(e.into());
        }
        // SAFETY: the two ends of the reservation outside the segment's mapping, ours and
        // unused: the head (empty, and left alone, when the reservation came aligned) and
        // the tail (never empty, since lead < align).
        unsafe {
            if lead > 0 {
                let _ = rustix::mm::munmap(base.cast(), lead);
            }
            let _ = rustix::mm::munmap(base.add(lead + len).cast(), align - lead);
        }
        // SAFETY: `base + lead` is inside the reservation (see above).
        Ok(Mapping { ptr: unsafe { base.add(lead) }, len })
    }

    /// Asks the kernel to back the mapping with huge pages now (`MADV_COLLAPSE`, Linux 6.1;
    /// honoured for shared memory whatever tmpfs's `huge=` says). Only a hint: the
    /// contents stay as they are, and where the kernel cannot (an older kernel, no free
    /// 2 MiB of memory) the small pages stay. Returns whether it was done.
    fn collapse(&self) -> bool {
        // SAFETY: the range is exactly this mapping. MADV_COLLAPSE moves its pages into
        // one huge page with the same contents, visible to every process mapping them; it
        // changes no byte and unmaps nothing.
        unsafe { libc::madvise(self.ptr.cast(), self.len, libc::MADV_COLLAPSE) == 0 }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: [ptr, ptr + len) is the mapping this value made; every reference into
        // it borrows the `Arena` that owns this value, so none outlives it.
        let _ = unsafe { rustix::mm::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_fit() {
        for slot_size in [64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096] {
            for n in [0, 1, 7] {
                let l = Layout::new(slot_size, n);
                assert!(l.ids_offset + 8 * l.slot_count <= l.header_len);
                assert!(16 + 8 * l.bitmap_words <= l.ids_offset && l.bitmap_words * 64 >= l.slot_count);
                assert_eq!(l.header_len % PAGE, 0);
                assert!(l.end() <= l.total);
                if n == 0 {
                    // Sizes that do not divide the slot bytes leave less than a slot unused.
                    assert_eq!(l.total, l.header_len + FIRST_DATA_BYTES);
                    assert!(FIRST_DATA_BYTES - l.slot_count * slot_size < slot_size);
                } else {
                    // One huge page, filled but for less than a slot and its header's page.
                    assert!(l.is_huge());
                    assert!(l.total - l.end() < slot_size + 8 + PAGE, "{slot_size}: {l:?}");
                    assert_eq!(Layout::with_slots(slot_size, l.slot_count).end(), l.end());
                    assert!(Layout::with_slots(slot_size, l.slot_count + 1).end() > HUGE_ARENA);
                }
            }
        }
        assert_eq!(Layout::new(64, 0).header_len, 9 * PAGE);
    }

    #[test]
    fn later_arenas_are_one_huge_page() {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let name = format!("/wfctx.huge-{}-{nanos}.a96.1", std::process::id());
        let Ok(Created::Ready(arena)) = Arena::open_or_create(&name, 96, 1) else { panic!("created {name}") };
        let addr = arena.map.ptr as usize;
        assert_eq!(addr % HUGE_ARENA, 0, "mapped at {addr:#x}");
        // Another mapping (as another process makes it) is aligned and usable too.
        let Ok(Opened::Ready(other)) = Arena::open(&name, 96) else { panic!("opened {name}") };
        assert_eq!(other.map.ptr as usize % HUGE_ARENA, 0);
        let slot = arena.store(5, b"forty-two", None).unwrap();
        assert_eq!(other.read(slot, 5, 9).as_deref(), Some(&b"forty-two"[..]));
        // Where the kernel can collapse shared memory (Linux 6.1 with THP), the segment is
        // one huge page, and a new mapping of it maps that page whole.
        if arena.map.collapse() {
            assert!(arena.is_huge_mapped(), "{name} is not mapped with a huge page");
            assert_eq!(other.read(slot, 5, 9).as_deref(), Some(&b"forty-two"[..]));
            assert!(other.is_huge_mapped(), "the other mapping of {name} uses small pages");
            let third = match Arena::open(&name, 96) {
                Ok(Opened::Ready(a)) => a,
                _ => panic!("opened {name}"),
            };
            assert_eq!(third.read(slot, 5, 9).as_deref(), Some(&b"forty-two"[..]));
            assert!(third.is_huge_mapped(), "a new mapping of {name} uses small pages");
        } else {
            eprintln!("skipped: this kernel does not collapse shared memory into huge pages (MADV_COLLAPSE)");
        }
        // The first arena of a class stays small.
        assert!(!Layout::new(96, 0).is_huge());
        let _ = shm::unlink(&name);
    }
}
