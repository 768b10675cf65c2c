//! Placement: which tier takes a value.

use std::fmt;

use crate::types::{SaveOptions, StorageKind};

/// One tier as a placement policy sees it.
#[derive(Clone, Copy, Debug)]
pub struct TierStatus<'a> {
    /// The tier's name.
    pub name: &'a str,
    /// RAM or disk.
    pub kind: StorageKind,
    /// Bytes the tier would hold for this value.
    pub footprint: u64,
}

/// A budget shared by all tiers of one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Bytes in use, including space reserved by saves in progress.
    pub used: u64,
    /// The limit; `None` means no limit but the file system's.
    pub capacity: Option<u64>,
}

impl Budget {
    /// Whether `bytes` more fit.
    pub fn fits(&self, bytes: u64) -> bool {
        self.capacity.is_none_or(|cap| self.used.checked_add(bytes).is_some_and(|total| total <= cap))
    }

    /// Bytes still free, if there is a limit.
    pub fn available(&self) -> Option<u64> {
        self.capacity.map(|cap| cap.saturating_sub(self.used))
    }
}

/// What a policy is asked: where should a value of `len` bytes go?
#[derive(Clone, Copy, Debug)]
pub struct PlacementRequest<'a> {
    /// The value's length in bytes (its record, header included).
    pub len: u64,
    /// The save's options.
    pub options: SaveOptions,
    /// The context's tiers, in the order they were configured.
    pub tiers: &'a [TierStatus<'a>],
    /// The RAM budget.
    pub ram: Budget,
    /// The disk budget.
    pub disk: Budget,
}

/// Decides which tiers may take a value, in order of preference.
///
/// A policy ranks; the context enforces. Whatever a policy answers, the context skips tiers
/// whose budget the value would exceed, keeps `use_ram(false)` values out of RAM tiers and
/// `ram_only(true)` values out of disk tiers, and falls through to the next tier when one
/// has no room. So a policy cannot break a budget or an option, and can be small.
pub trait PlacementPolicy: Send + Sync + fmt::Debug {
    /// The indexes into `request.tiers` to try, best first. Tiers left out are not tried.
    fn rank(&self, request: &PlacementRequest<'_>) -> Vec<usize>;
}

/// The default policy: RAM tiers while the value fits the RAM budget, then disk tiers.
///
/// ```
/// use context_core::{Budget, PlacementPolicy, PlacementRequest, RamFirst, SaveOptions, StorageKind, TierStatus};
/// let tiers = [
///     TierStatus { name: "mmap", kind: StorageKind::Disk, footprint: 4096 },
///     TierStatus { name: "shm", kind: StorageKind::Ram, footprint: 4096 },
/// ];
/// let request = PlacementRequest {
///     len: 100,
///     options: SaveOptions::new(),
///     tiers: &tiers,
///     ram: Budget { used: 0, capacity: Some(1 << 20) },
///     disk: Budget { used: 0, capacity: None },
/// };
/// assert_eq!(RamFirst.rank(&request), vec![1, 0]);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct RamFirst;

impl PlacementPolicy for RamFirst {
    fn rank(&self, request: &PlacementRequest<'_>) -> Vec<usize> {
        let of_kind = |kind| request.tiers.iter().enumerate().filter(move |(_, t)| t.kind == kind).map(|(i, _)| i);
        of_kind(StorageKind::Ram).chain(of_kind(StorageKind::Disk)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_fits_without_overflow() {
        let b = Budget { used: u64::MAX - 1, capacity: Some(u64::MAX) };
        assert!(b.fits(1));
        assert!(!b.fits(2));
        assert_eq!(Budget { used: 10, capacity: Some(4) }.available(), Some(0));
        assert!(Budget { used: u64::MAX, capacity: None }.fits(u64::MAX));
    }
}
