//! Placement: which tier takes a value.
//!
//! A [`PlacementPolicy`] ranks the context's tiers for one value; the context then skips
//! tiers that would break a budget or the save's options and takes the first tier with
//! room. Policies are small values: the ready ones ([`RamFirst`], the default,
//! [`DiskOnly`] and [`Compressed`]) and your own, built from [`Rule`]s in the style of
//! admission filters:
//!
//! ```
//! use context_core::{Prefer, Rule, StorageKind};
//! // Values under 1 MiB in RAM, everything else on a zero-copy disk tier, then any disk tier.
//! let policy = Prefer::first(Rule::kind(StorageKind::Ram).and(Rule::size_below(1 << 20)))
//!     .then(Rule::kind(StorageKind::Disk).and(Rule::zero_copy()))
//!     .then(Rule::kind(StorageKind::Disk));
//! # let _ = policy;
//! ```

use std::fmt;
use std::sync::Arc;

use crate::tier::Capabilities;
use crate::types::{SaveOptions, StorageKind};

/// One tier as a placement policy sees it.
#[derive(Clone, Copy, Debug)]
pub struct TierStatus<'a> {
    /// The tier's name.
    pub name: &'a str,
    /// RAM or disk.
    pub kind: StorageKind,
    /// What the tier can do.
    pub capabilities: Capabilities,
    /// The most bytes the tier would hold for this value.
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
    /// Whether `bytes` more fit: within the capacity, if there is one, and never past what a
    /// `u64` counts (a tier may answer `u64::MAX` for a footprint it cannot tell).
    pub fn fits(&self, bytes: u64) -> bool {
        self.used.checked_add(bytes).is_some_and(|total| self.capacity.is_none_or(|cap| total <= cap))
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
///
/// `rank` is called during a save, with the context's index lock held (the lock every
/// writer of the run, in every process, takes): it should answer from the request alone and
/// quickly. It must not call back into the run: from inside `rank`, a save or a `usage()`
/// through any handle of the run, or a load through the handle that is saving, waits for
/// ever for the lock that save holds.
pub trait PlacementPolicy: Send + Sync + fmt::Debug {
    /// The indexes into `request.tiers` to try, best first. Tiers left out are not tried;
    /// an index given twice counts once, and one out of range is skipped (and named in the
    /// [`Error::NoPlacement`](crate::Error::NoPlacement) of a save that finds no tier left).
    fn rank(&self, request: &PlacementRequest<'_>) -> Vec<usize>;
}

impl<P: PlacementPolicy + ?Sized> PlacementPolicy for Arc<P> {
    fn rank(&self, request: &PlacementRequest<'_>) -> Vec<usize> {
        (**self).rank(request)
    }
}

/// A condition on a value and a tier: the building block of [`Prefer`].
///
/// Rules combine with [`and`](Rule::and), [`or`](Rule::or) and `!`.
#[derive(Clone)]
pub struct Rule(Arc<Admits>, Arc<str>);

/// The test a [`Rule`] applies.
type Admits = dyn Fn(&PlacementRequest<'_>, &TierStatus<'_>) -> bool + Send + Sync;

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.1)
    }
}

impl Rule {
    /// A rule from a closure, with a description for `Debug`.
    pub fn new(
        describe: impl Into<String>,
        admits: impl Fn(&PlacementRequest<'_>, &TierStatus<'_>) -> bool + Send + Sync + 'static,
    ) -> Self {
        Rule(Arc::new(admits), describe.into().into())
    }

    /// Whether the rule admits `tier` for the value of `request`.
    pub fn admits(&self, request: &PlacementRequest<'_>, tier: &TierStatus<'_>) -> bool {
        (self.0)(request, tier)
    }

    /// Every tier.
    pub fn any() -> Self {
        Rule::new("any", |_, _| true)
    }

    /// Tiers of this kind.
    pub fn kind(kind: StorageKind) -> Self {
        Rule::new(format!("kind = {kind:?}"), move |_, t| t.kind == kind)
    }

    /// The tier with this name.
    pub fn named(name: impl Into<String>) -> Self {
        let name: String = name.into();
        Rule::new(format!("name = {name:?}"), move |_, t| t.name == name)
    }

    /// Values (records) shorter than `bytes`.
    pub fn size_below(bytes: u64) -> Self {
        Rule::new(format!("size < {bytes}"), move |r, _| r.len < bytes)
    }

    /// Tiers whose loads are zero-copy views.
    pub fn zero_copy() -> Self {
        Rule::new("zero-copy", |_, t| t.capabilities.zero_copy)
    }

    /// Tiers that compress.
    pub fn compressing() -> Self {
        Rule::new("compressing", |_, t| t.capabilities.compresses)
    }

    /// Both rules.
    #[must_use]
    pub fn and(self, other: Rule) -> Self {
        let describe = format!("({:?} and {:?})", self, other);
        Rule::new(describe, move |r, t| self.admits(r, t) && other.admits(r, t))
    }

    /// Either rule.
    #[must_use]
    pub fn or(self, other: Rule) -> Self {
        let describe = format!("({:?} or {:?})", self, other);
        Rule::new(describe, move |r, t| self.admits(r, t) || other.admits(r, t))
    }
}

impl std::ops::Not for Rule {
    type Output = Rule;

    /// The opposite of the rule.
    fn not(self) -> Rule {
        let describe = format!("not {:?}", self);
        Rule::new(describe, move |r, t| !self.admits(r, t))
    }
}

/// A policy made of rules tried in order: first the tiers the first rule admits (in the
/// order they were configured), then those the second admits, and so on. A tier admitted
/// by no rule is never used.
#[derive(Clone, Debug)]
pub struct Prefer {
    stages: Vec<Rule>,
}

impl Prefer {
    /// A policy whose first choice is the tiers `rule` admits.
    pub fn first(rule: Rule) -> Self {
        Prefer { stages: vec![rule] }
    }

    /// Then the tiers `rule` admits.
    #[must_use]
    pub fn then(mut self, rule: Rule) -> Self {
        self.stages.push(rule);
        self
    }
}

impl PlacementPolicy for Prefer {
    fn rank(&self, request: &PlacementRequest<'_>) -> Vec<usize> {
        let mut ranked = Vec::with_capacity(request.tiers.len());
        for rule in &self.stages {
            for (i, tier) in request.tiers.iter().enumerate() {
                if !ranked.contains(&i) && rule.admits(request, tier) {
                    ranked.push(i);
                }
            }
        }
        ranked
    }
}

/// The size under which [`RamFirst`] and [`DiskOnly`] send disk values to a packing tier
/// (one that does not map each value) rather than a zero-copy one: 64 KiB.
pub const SMALL_VALUE_THRESHOLD: u64 = 64 << 10;

/// Disk tiers for a value: packed small values first, then zero-copy ones, then any.
fn disk_stages(threshold: u64, policy: Prefer) -> Prefer {
    let disk = || Rule::kind(StorageKind::Disk);
    policy
        .then(disk().and(Rule::size_below(threshold)).and(!Rule::zero_copy()))
        .then(disk().and(!Rule::size_below(threshold)).and(Rule::zero_copy()))
        .then(disk())
}

/// The default policy: RAM while the value fits the RAM budget, else disk, where disk
/// means a packing tier (redb) for values under a threshold (default 64 KiB) and a
/// zero-copy tier (mmap) at or above it.
///
/// ```
/// use context_core::{Budget, Capabilities, PlacementPolicy, PlacementRequest, RamFirst, SaveOptions, StorageKind, TierStatus};
/// let tiers = [
///     TierStatus { name: "mmap", kind: StorageKind::Disk, capabilities: Capabilities::new(true, true), footprint: 4096 },
///     TierStatus { name: "redb", kind: StorageKind::Disk, capabilities: Capabilities::new(false, true), footprint: 200 },
///     TierStatus { name: "shm", kind: StorageKind::Ram, capabilities: Capabilities::new(true, true), footprint: 4096 },
/// ];
/// let request = |len| PlacementRequest {
///     len,
///     options: SaveOptions::new(),
///     tiers: &tiers,
///     ram: Budget { used: 0, capacity: Some(1 << 20) },
///     disk: Budget { used: 0, capacity: None },
/// };
/// assert_eq!(RamFirst::default().rank(&request(100)), vec![2, 1, 0]);
/// assert_eq!(RamFirst::default().rank(&request(1 << 20)), vec![2, 0, 1]);
/// ```
#[derive(Clone, Debug)]
pub struct RamFirst {
    rules: Prefer,
}

impl Default for RamFirst {
    fn default() -> Self {
        Self::with_threshold(SMALL_VALUE_THRESHOLD)
    }
}

impl RamFirst {
    /// RAM first, with disk values under `threshold` bytes going to a packing tier.
    pub fn with_threshold(threshold: u64) -> Self {
        RamFirst { rules: disk_stages(threshold, Prefer::first(Rule::kind(StorageKind::Ram))) }
    }
}

impl PlacementPolicy for RamFirst {
    fn rank(&self, request: &PlacementRequest<'_>) -> Vec<usize> {
        self.rules.rank(request)
    }
}

/// Disk only, as [`RamFirst`] places disk values; RAM tiers are never used.
#[derive(Clone, Debug)]
pub struct DiskOnly {
    rules: Prefer,
}

impl Default for DiskOnly {
    fn default() -> Self {
        Self::with_threshold(SMALL_VALUE_THRESHOLD)
    }
}

impl DiskOnly {
    /// Disk only, with values under `threshold` bytes going to a packing tier.
    pub fn with_threshold(threshold: u64) -> Self {
        // A first stage that admits nothing keeps the shape of RamFirst's disk stages.
        DiskOnly { rules: disk_stages(threshold, Prefer::first(Rule::new("nothing", |_, _| false))) }
    }
}

impl PlacementPolicy for DiskOnly {
    fn rank(&self, request: &PlacementRequest<'_>) -> Vec<usize> {
        self.rules.rank(request)
    }
}

/// Always a compressing tier (redb); a value is refused if the build has none.
#[derive(Clone, Copy, Debug, Default)]
pub struct Compressed;

impl PlacementPolicy for Compressed {
    fn rank(&self, request: &PlacementRequest<'_>) -> Vec<usize> {
        Prefer::first(Rule::compressing()).rank(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiers() -> [TierStatus<'static>; 3] {
        [
            TierStatus {
                name: "shm",
                kind: StorageKind::Ram,
                capabilities: Capabilities::new(true, true),
                footprint: 1,
            },
            TierStatus {
                name: "redb",
                kind: StorageKind::Disk,
                capabilities: Capabilities::new(false, true).with_compression(true),
                footprint: 1,
            },
            TierStatus {
                name: "mmap",
                kind: StorageKind::Disk,
                capabilities: Capabilities::new(true, true),
                footprint: 1,
            },
        ]
    }

    fn request<'a>(tiers: &'a [TierStatus<'a>], len: u64) -> PlacementRequest<'a> {
        PlacementRequest {
            len,
            options: SaveOptions::new(),
            tiers,
            ram: Budget { used: 0, capacity: Some(100) },
            disk: Budget { used: 0, capacity: None },
        }
    }

    #[test]
    fn budget_fits_without_overflow() {
        let b = Budget { used: u64::MAX - 1, capacity: Some(u64::MAX) };
        assert!(b.fits(1));
        assert!(!b.fits(2));
        assert_eq!(Budget { used: 10, capacity: Some(4) }.available(), Some(0));
        // Without a limit, anything fits that can still be counted.
        assert!(Budget { used: 0, capacity: None }.fits(u64::MAX));
        assert!(!Budget { used: 1, capacity: None }.fits(u64::MAX));
    }

    #[test]
    fn ready_policies() {
        let t = tiers();
        assert_eq!(RamFirst::default().rank(&request(&t, 100)), vec![0, 1, 2]);
        assert_eq!(RamFirst::default().rank(&request(&t, 64 << 10)), vec![0, 2, 1]);
        assert_eq!(RamFirst::with_threshold(10).rank(&request(&t, 100)), vec![0, 2, 1]);
        assert_eq!(DiskOnly::default().rank(&request(&t, 100)), vec![1, 2]);
        assert_eq!(DiskOnly::default().rank(&request(&t, 1 << 20)), vec![2, 1]);
        assert_eq!(Compressed.rank(&request(&t, 1 << 20)), vec![1]);
        assert!(Compressed.rank(&request(&t[..1], 10)).is_empty());
    }

    #[test]
    fn rules_combine() {
        let t = tiers();
        let r = request(&t, 500);
        let big_on_disk = Rule::kind(StorageKind::Disk).and(!Rule::size_below(1000));
        assert!(!big_on_disk.admits(&r, &t[1]));
        assert!(Rule::named("shm").or(Rule::compressing()).admits(&r, &t[1]));
        let p = Prefer::first(Rule::named("mmap")).then(Rule::any());
        assert_eq!(p.rank(&r), vec![2, 0, 1]);
        assert_eq!(format!("{:?}", !Rule::zero_copy()), "not zero-copy");
    }
}
