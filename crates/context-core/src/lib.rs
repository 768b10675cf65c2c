//! The core of workflow-context: what every storage tier implements and every part shares.
//!
//! - [`StorageTier`]: the trait a place that holds values implements (shared memory, a
//!   directory of mapped files, a database), with a behaviour contract on every method.
//! - [`PlacementPolicy`]: decides which tier takes a value; [`RamFirst`] is the default.
//! - The shared types ([`SaveOptions`], [`StorageInfo`], [`Usage`], [`Payload`]) and the one
//!   [`Error`].
//! - [`record`]: the format of the bytes a tier stores for each value.
//! - [`cache`]: the prefetch hint tiers use to fetch a value's memory ahead of a read.
//! - [`space`]: reserving a new file's blocks before writing it, so that a full disk is an
//!   error and never a `SIGBUS`.
//! - `testing` (feature `testing`): the conformance kit any tier runs against itself.
//!
//! Most users want the `workflow-context` crate, which composes the tiers; this crate is
//! for people who write their own tier.

pub mod cache;
mod error;
mod payload;
mod policy;
pub mod record;
pub mod space;
mod tier;
mod types;

#[cfg(any(test, feature = "testing"))]
mod faults;
#[cfg(any(test, feature = "testing"))]
mod sandbox;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use error::{Error, Result};
pub use payload::Payload;
pub use policy::{
    Budget, Compressed, DiskOnly, PlacementPolicy, PlacementRequest, Prefer, RamFirst, Rule, SMALL_VALUE_THRESHOLD,
    TierStatus,
};
pub use tier::{
    Capabilities, FileAt, Location, NewObject, ObjectData, ObjectId, ObjectRef, PutOutcome, StorageTier, TierUsage,
    WriteFailure,
};
pub use types::{
    MAX_KEY_LEN, MAX_RUN_ID_LEN, PassBy, SaveOptions, StorageInfo, StorageKind, Usage, validate_key, validate_run_id,
};
