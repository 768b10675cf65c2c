//! [`FaultyTier`]: a tier wrapper that fails chosen calls, for testing what a context does
//! when its storage fails.

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::payload::Payload;
use crate::tier::{
    Capabilities, Location, NewObject, ObjectData, ObjectRef, PutOutcome, StorageTier, TierUsage, WriteFailure,
};
use crate::types::StorageKind;

/// A call of the [`StorageTier`] trait that a fault can hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Call {
    /// [`StorageTier::put`].
    Put,
    /// [`StorageTier::get`].
    Get,
    /// [`StorageTier::delete`].
    Delete,
    /// [`StorageTier::usage`].
    Usage,
    /// [`StorageTier::destroy`].
    Destroy,
}

/// What goes wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The call fails with `EIO` before doing anything.
    Eio,
    /// The call fails with `ENOSPC` before doing anything.
    Enospc,
    /// A put answers [`PutOutcome::NoSpace`] (the tier is full).
    NoSpace,
    /// A put's bytes stop half way: the data fails with `EIO` after half the object was
    /// written into the wrapped tier, which must then leave nothing behind.
    ShortWrite,
    /// A put stores the object in the wrapped tier, then fails with `ENOSPC`: a tier that
    /// ran out of room and could not clean up after itself either. The contract asks a
    /// failed put to leave nothing; a caller that must survive tiers that cannot always
    /// manage it deletes the object by id.
    LeaveBehind,
}

/// One planned fault: `fault` on the `nth` call (counting from 1) of `call`, and, if
/// `repeat`, on every call after it too.
#[derive(Clone, Copy, Debug)]
struct Planned {
    call: Call,
    nth: u64,
    fault: Fault,
    repeat: bool,
}

#[derive(Debug, Default)]
struct State {
    plan: Vec<Planned>,
    counts: [u64; 5],
    injected: u64,
}

/// Wraps a tier and fails chosen calls at chosen points; every other call goes through.
///
/// It has its own name, so a context can hold it beside the tier it wraps:
///
/// ```
/// # #[cfg(feature = "testing")] {
/// use context_core::testing::{Call, Fault, FaultyTier, MemoryTier};
/// use std::sync::Arc;
/// let tier = FaultyTier::new("faulty", Arc::new(MemoryTier::default()));
/// tier.fail(Call::Put, 2, Fault::Enospc); // the second put fails
/// # }
/// ```
pub struct FaultyTier {
    name: String,
    inner: Arc<dyn StorageTier>,
    state: Mutex<State>,
}

impl fmt::Debug for FaultyTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyTier").field("name", &self.name).field("inner", &self.inner).finish_non_exhaustive()
    }
}

fn call_index(call: Call) -> usize {
    match call {
        Call::Put => 0,
        Call::Get => 1,
        Call::Delete => 2,
        Call::Usage => 3,
        Call::Destroy => 4,
    }
}

impl FaultyTier {
    /// Wraps `inner` under `name`.
    pub fn new(name: impl Into<String>, inner: Arc<dyn StorageTier>) -> Self {
        FaultyTier { name: name.into(), inner, state: Mutex::new(State::default()) }
    }

    /// Fails the `nth` call (from 1) of `call` from now on with `fault`.
    pub fn fail(&self, call: Call, nth: u64, fault: Fault) -> &Self {
        let mut state = self.state();
        let nth = state.counts[call_index(call)] + nth;
        state.plan.push(Planned { call, nth, fault, repeat: false });
        self
    }

    /// Fails every call of `call` from the `nth` on with `fault`, until [`heal`](Self::heal).
    pub fn fail_from(&self, call: Call, nth: u64, fault: Fault) -> &Self {
        let mut state = self.state();
        let nth = state.counts[call_index(call)] + nth;
        state.plan.push(Planned { call, nth, fault, repeat: true });
        self
    }

    /// Removes every planned fault.
    pub fn heal(&self) {
        self.state().plan.clear();
    }

    /// How many faults were injected so far.
    pub fn injected(&self) -> u64 {
        self.state().injected
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a call and returns the fault planned for it, if any.
    fn next(&self, call: Call) -> Option<Fault> {
        let mut state = self.state();
        let i = call_index(call);
        state.counts[i] += 1;
        let n = state.counts[i];
        let fault =
            state.plan.iter().find(|p| p.call == call && (p.nth == n || (p.repeat && n >= p.nth))).map(|p| p.fault);
        if fault.is_some() {
            state.injected += 1;
        }
        fault
    }

    fn error(&self, call: Call, fault: Fault) -> Error {
        let e = match fault {
            Fault::Enospc | Fault::LeaveBehind => io::Error::from_raw_os_error(28),
            _ => io::Error::from_raw_os_error(5),
        };
        Error::io(
            match call {
                Call::Put => "write object (injected fault)",
                Call::Get => "read object (injected fault)",
                Call::Delete => "delete object (injected fault)",
                Call::Usage => "count objects (injected fault)",
                Call::Destroy => "destroy tier (injected fault)",
            },
            format!("tier {}", self.name),
            e,
        )
    }
}

/// Writes through to `out` until `budget` bytes have passed, then fails with `EIO`.
struct Cut<'w> {
    out: &'w mut dyn io::Write,
    budget: u64,
}

impl io::Write for Cut<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.budget == 0 {
            return Err(io::Error::from_raw_os_error(5));
        }
        let n = buf.len().min(self.budget as usize);
        let written = self.out.write(&buf[..n])?;
        self.budget -= written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[deny(clippy::missing_trait_methods)]
impl StorageTier for FaultyTier {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> StorageKind {
        self.inner.kind()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn footprint(&self, len: u64) -> u64 {
        self.inner.footprint(len)
    }

    fn put(&self, mut object: NewObject<'_>) -> Result<PutOutcome> {
        match self.next(Call::Put) {
            None => self.inner.put(object),
            Some(Fault::NoSpace) => Ok(PutOutcome::NoSpace),
            Some(Fault::LeaveBehind) => {
                self.inner.put(object)?;
                Err(self.error(Call::Put, Fault::LeaveBehind))
            }
            Some(Fault::ShortWrite) => {
                let (id, len) = (object.id, object.len);
                let mut cut = |out: &mut dyn io::Write| -> Result<()> {
                    let mut short = Cut { out, budget: len / 2 };
                    object.write_to(&mut short).map_err(|f| match f {
                        WriteFailure::Data(e) => e,
                        WriteFailure::Sink(e) => {
                            Error::io("write object (injected short write)", format!("object {id}"), e)
                        }
                    })
                };
                self.inner.put(NewObject { id, len, data: ObjectData::Write(&mut cut) })
            }
            Some(fault) => Err(self.error(Call::Put, fault)),
        }
    }

    fn get(&self, object: &ObjectRef) -> Result<Option<Payload>> {
        match self.next(Call::Get) {
            None => self.inner.get(object),
            Some(fault) => Err(self.error(Call::Get, fault)),
        }
    }

    fn delete(&self, object: &ObjectRef) -> Result<bool> {
        match self.next(Call::Delete) {
            None => self.inner.delete(object),
            Some(fault) => Err(self.error(Call::Delete, fault)),
        }
    }

    fn prefetch(&self, slot: u64) {
        self.inner.prefetch(slot);
    }

    fn locate(&self, object: &ObjectRef) -> Location {
        self.inner.locate(object)
    }

    fn usage(&self) -> Result<TierUsage> {
        match self.next(Call::Usage) {
            None => self.inner.usage(),
            Some(fault) => Err(self.error(Call::Usage, fault)),
        }
    }

    fn destroy(&self) -> Result<()> {
        match self.next(Call::Destroy) {
            None => self.inner.destroy(),
            Some(fault) => Err(self.error(Call::Destroy, fault)),
        }
    }
}

/// A tier that keeps objects in this process's memory: the simplest correct tier, for
/// tests (and the base a [`FaultyTier`] can wrap).
#[derive(Debug, Default)]
pub struct MemoryTier {
    objects: Mutex<std::collections::HashMap<crate::tier::ObjectId, Arc<Vec<u8>>>>,
}

impl MemoryTier {
    fn objects(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<crate::tier::ObjectId, Arc<Vec<u8>>>> {
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[deny(clippy::missing_trait_methods)]
impl StorageTier for MemoryTier {
    fn name(&self) -> &str {
        "memory"
    }

    fn kind(&self) -> StorageKind {
        StorageKind::Ram
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(true, false)
    }

    fn footprint(&self, len: u64) -> u64 {
        len
    }

    fn put(&self, mut object: NewObject<'_>) -> Result<PutOutcome> {
        let mut bytes = Vec::with_capacity(usize::try_from(object.len).unwrap_or(0).min(1 << 30));
        match object.write_to(&mut bytes) {
            Ok(()) => {}
            Err(WriteFailure::Data(e)) => return Err(e),
            Err(WriteFailure::Sink(e)) => return Err(Error::io("fill a buffer for", "memory tier", e)),
        }
        let r = ObjectRef { id: object.id, len: object.len, slot: 0, held: object.len };
        self.objects().insert(object.id, Arc::new(bytes));
        Ok(PutOutcome::Stored(r))
    }

    fn get(&self, object: &ObjectRef) -> Result<Option<Payload>> {
        let shared = |b: &Arc<Vec<u8>>| Payload::from_shared(Arc::clone(b) as Arc<dyn AsRef<[u8]> + Send + Sync>);
        Ok(self.objects().get(&object.id).map(shared))
    }

    fn prefetch(&self, _slot: u64) {
        // Objects are found by id in a map: a location word says nothing here.
    }

    fn delete(&self, object: &ObjectRef) -> Result<bool> {
        Ok(self.objects().remove(&object.id).is_some())
    }

    fn locate(&self, _object: &ObjectRef) -> Location {
        Location::default()
    }

    fn usage(&self) -> Result<TierUsage> {
        let objects = self.objects();
        Ok(TierUsage { bytes: objects.values().map(|b| b.len() as u64).sum(), objects: objects.len() as u64 })
    }

    fn destroy(&self) -> Result<()> {
        self.objects().clear();
        Ok(())
    }
}
