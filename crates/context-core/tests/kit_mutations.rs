//! Deliberately broken tiers: does the conformance kit catch each one?
#![cfg(feature = "testing")]
#![allow(missing_docs)]

use std::sync::{Arc, Mutex};

use context_core::testing::{self, CHECKS};
use context_core::{
    Capabilities, Error, Location, NewObject, ObjectData, ObjectId, ObjectRef, Payload, PutOutcome, Result,
    StorageKind, StorageTier, TierUsage, WriteFailure,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Correct,
    LatestBytes,
    IgnoreDelete,
    UsageOffByOne,
    TruncatedGet,
    DestroyHidesButKeeps,
    DestroyNoop,
    DeleteAlwaysTrue,
    UnknownSlotNotFound,
    FailedPutLeaves,
    HeldAboveFootprint,
    /// Stores bytes as they are, but claims a footprint (and holds) of 0: budgets never see it.
    FootprintZero,
    /// get and delete trust the slot word and never check the id stored there.
    StaleSlot,
    /// The `ObjectData::Write` path answers another length in its `ObjectRef`.
    WritePathWrongLen,
    /// The `ObjectData::Write` path answers `held: 0`, while usage counts the bytes.
    WritePathHeldZero,
    LongName,
    /// A delete by id alone takes the first object of the same length, whatever its id.
    UnknownSlotMatchesLen,
    /// A delete by id alone takes the object put last, whatever its id.
    UnknownSlotTakesLatest,
    /// get keeps the bytes it read of each slot, and answers them again for the object that
    /// takes the slot next: stale data after an overwrite.
    CachedBySlot,
    /// A delete takes every other object of the same length too.
    DeleteTakesSameLen,
    /// A delete by id alone hides the object but keeps its bytes (and counts them).
    UnknownSlotLeaks,
    /// Compresses: holds a run of one byte value in 16 bytes, and reads it back a byte short.
    RunsReadBackShort,
}

/// Whether `bytes` are a run of one byte value, which `Mode::RunsReadBackShort` compresses.
fn is_run(bytes: &[u8]) -> bool {
    bytes.len() > 16 && bytes.iter().all(|&b| b == bytes[0])
}

#[derive(Default, Debug)]
struct Inner {
    slots: Vec<Option<(ObjectId, Arc<Vec<u8>>)>>,
    free: Vec<usize>,
    latest: Option<Arc<Vec<u8>>>,
    destroyed: bool,
    cache: std::collections::HashMap<usize, Arc<Vec<u8>>>,
    leaked: Vec<Arc<Vec<u8>>>,
}

/// A slot tier: objects live in a vector, `ObjectRef::slot` is the index, freed slots reused.
#[derive(Debug)]
pub struct Mutant {
    mode: Mode,
    inner: Mutex<Inner>,
}

impl Mutant {
    pub fn new(mode: Mode) -> Self {
        Mutant { mode, inner: Mutex::new(Inner::default()) }
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn find(&self, inner: &Inner, r: &ObjectRef) -> Option<usize> {
        if r.slot != ObjectRef::UNKNOWN_SLOT {
            let s = r.slot as usize;
            if self.mode == Mode::StaleSlot {
                return inner.slots.get(s).and_then(|o| o.as_ref()).map(|_| s);
            }
            if let Some(Some((id, _))) = inner.slots.get(s)
                && *id == r.id
            {
                return Some(s);
            }
            return None;
        }
        match self.mode {
            Mode::UnknownSlotNotFound => return None,
            Mode::UnknownSlotMatchesLen if r.len != 0 => {
                return inner.slots.iter().position(|o| o.as_ref().is_some_and(|(_, b)| b.len() as u64 == r.len));
            }
            Mode::UnknownSlotTakesLatest => {
                let latest = inner.latest.as_ref()?;
                return inner.slots.iter().position(|o| o.as_ref().is_some_and(|(_, b)| Arc::ptr_eq(b, latest)));
            }
            _ => {}
        }
        inner.slots.iter().position(|o| o.as_ref().is_some_and(|(id, _)| *id == r.id))
    }
}

impl StorageTier for Mutant {
    fn name(&self) -> &str {
        if self.mode == Mode::LongName { "a-tier-name-over-16-bytes-é" } else { "mutant" }
    }
    fn kind(&self) -> StorageKind {
        StorageKind::Ram
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(false, false).with_compression(self.mode == Mode::RunsReadBackShort)
    }
    fn footprint(&self, len: u64) -> u64 {
        match self.mode {
            Mode::FootprintZero => 0,
            _ => len,
        }
    }
    fn put(&self, mut object: NewObject<'_>) -> Result<PutOutcome> {
        let is_write = matches!(object.data, ObjectData::Write(_));
        let mut bytes = Vec::new();
        let res = object.write_to(&mut bytes);
        let mut inner = self.lock();
        match res {
            Ok(()) => {}
            Err(f) => {
                if self.mode == Mode::FailedPutLeaves {
                    let s = inner.slots.len();
                    inner.slots.push(Some((object.id, Arc::new(bytes))));
                    let _ = s;
                }
                return Err(match f {
                    WriteFailure::Data(e) => e,
                    WriteFailure::Sink(e) => Error::io("fill", "mutant", e),
                });
            }
        }
        let bytes = Arc::new(bytes);
        inner.latest = Some(Arc::clone(&bytes));
        let slot = match inner.free.pop() {
            Some(s) => {
                inner.slots[s] = Some((object.id, bytes));
                s
            }
            None => {
                inner.slots.push(Some((object.id, bytes)));
                inner.slots.len() - 1
            }
        };
        let mut held = self.footprint(object.len);
        let mut len = object.len;
        if self.mode == Mode::HeldAboveFootprint {
            held += 1;
        }
        if self.mode == Mode::WritePathWrongLen && is_write {
            len += 1;
        }
        if self.mode == Mode::WritePathHeldZero && is_write {
            held = 0;
        }
        if self.mode == Mode::RunsReadBackShort && is_run(&inner.slots[slot].as_ref().unwrap().1) {
            held = 16;
        }
        Ok(PutOutcome::Stored(ObjectRef { id: object.id, len, slot: slot as u64, held }))
    }
    fn get(&self, r: &ObjectRef) -> Result<Option<Payload>> {
        let mut inner = self.lock();
        let Some(s) = self.find(&inner, r) else { return Ok(None) };
        let mut b = Arc::clone(&inner.slots[s].as_ref().unwrap().1);
        if self.mode == Mode::CachedBySlot {
            b = Arc::clone(inner.cache.entry(s).or_insert(b));
        }
        Ok(Some(match self.mode {
            Mode::LatestBytes => Payload::from_vec(inner.latest.as_ref().unwrap().to_vec()),
            Mode::TruncatedGet => Payload::from_vec(b[..b.len() - 1].to_vec()),
            Mode::RunsReadBackShort if is_run(&b) => Payload::from_vec(b[..b.len() - 1].to_vec()),
            _ => Payload::from_shared(b),
        }))
    }
    fn delete(&self, r: &ObjectRef) -> Result<bool> {
        let mut inner = self.lock();
        let Some(s) = self.find(&inner, r) else { return Ok(self.mode == Mode::DeleteAlwaysTrue) };
        if self.mode == Mode::IgnoreDelete {
            return Ok(true);
        }
        let bytes = inner.slots[s].take().unwrap().1;
        let len = bytes.len();
        inner.free.push(s);
        if self.mode == Mode::UnknownSlotLeaks && r.slot == ObjectRef::UNKNOWN_SLOT {
            inner.leaked.push(bytes);
        }
        if self.mode == Mode::DeleteTakesSameLen {
            let inner = &mut *inner;
            for (i, o) in inner.slots.iter_mut().enumerate() {
                if o.as_ref().is_some_and(|(_, b)| b.len() == len) {
                    *o = None;
                    inner.free.push(i);
                }
            }
        }
        Ok(true)
    }
    fn locate(&self, _r: &ObjectRef) -> Location {
        Location::default()
    }
    fn usage(&self) -> Result<TierUsage> {
        let inner = self.lock();
        if inner.destroyed && self.mode == Mode::DestroyHidesButKeeps {
            return Ok(TierUsage::default());
        }
        let present: Vec<&Arc<Vec<u8>>> =
            inner.slots.iter().flatten().map(|(_, b)| b).chain(inner.leaked.iter()).collect();
        let held = |b: &Arc<Vec<u8>>| {
            if self.mode == Mode::RunsReadBackShort && is_run(b) { 16 } else { self.footprint(b.len() as u64) }
        };
        let mut bytes: u64 = present.iter().map(|b| held(b)).sum();
        if self.mode == Mode::UsageOffByOne {
            bytes += present.len() as u64;
        }
        Ok(TierUsage { bytes, objects: present.len() as u64 })
    }
    fn destroy(&self) -> Result<()> {
        let mut inner = self.lock();
        match self.mode {
            Mode::DestroyNoop => {}
            Mode::DestroyHidesButKeeps => inner.destroyed = true,
            _ => {
                inner.slots.clear();
                inner.free.clear();
                inner.leaked.clear();
                inner.latest = None;
            }
        }
        Ok(())
    }
}

type Check = fn(&dyn StorageTier);
const FNS: [Check; 12] = [
    testing::put_get_round_trip,
    testing::fill_and_parts_agree,
    testing::delete_reports_existence,
    testing::delete_with_unknown_slot,
    testing::payload_outlives_delete,
    testing::failed_fill_leaves_nothing,
    testing::wrong_length_is_refused,
    testing::usage_counts_objects,
    testing::footprint_covers_length,
    testing::concurrent_puts_and_gets,
    testing::prefetch_is_only_a_hint,
    testing::destroy_removes_everything,
];

/// The names of the checks that catch `mode`.
fn caught_by(mode: Mode) -> Vec<&'static str> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut caught = Vec::new();
    for (name, check) in CHECKS.iter().zip(FNS) {
        let tier = Mutant::new(mode);
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&tier))).is_err() {
            caught.push(*name);
        }
    }
    std::panic::set_hook(hook);
    caught
}

/// Every way `Mutant` can be broken.
const BROKEN: [Mode; 21] = [
    Mode::LatestBytes,
    Mode::IgnoreDelete,
    Mode::UsageOffByOne,
    Mode::TruncatedGet,
    Mode::DestroyHidesButKeeps,
    Mode::DestroyNoop,
    Mode::DeleteAlwaysTrue,
    Mode::UnknownSlotNotFound,
    Mode::FailedPutLeaves,
    Mode::HeldAboveFootprint,
    Mode::FootprintZero,
    Mode::StaleSlot,
    Mode::WritePathWrongLen,
    Mode::WritePathHeldZero,
    Mode::LongName,
    Mode::UnknownSlotMatchesLen,
    Mode::UnknownSlotTakesLatest,
    Mode::CachedBySlot,
    Mode::DeleteTakesSameLen,
    Mode::UnknownSlotLeaks,
    Mode::RunsReadBackShort,
];

/// One test, not one a mode: `caught_by` swaps the process's panic hook.
#[test]
fn the_kit_passes_a_correct_tier_and_catches_every_broken_one() {
    assert_eq!(FNS.len(), CHECKS.len(), "FNS lists every check of the kit");
    let caught = caught_by(Mode::Correct);
    assert!(caught.is_empty(), "a correct tier fails {caught:?}");
    let missed: Vec<Mode> = BROKEN.into_iter().filter(|&mode| caught_by(mode).is_empty()).collect();
    assert!(missed.is_empty(), "broken tiers that pass every check of the kit: {missed:?}");
}
