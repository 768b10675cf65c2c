//! The plain data types shared by the tiers and the composed context.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use crate::error::{Error, Result, shorten};

/// How a value is passed between workflow steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PassBy {
    /// The value's bytes are stored.
    Val,
    /// A recipe (workflow graph) that rebuilds the value is stored.
    Ref,
}

/// Whether a tier keeps values in RAM or on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StorageKind {
    /// In memory (for the shared-memory tier: readable by every attached process).
    Ram,
    /// On disk, in the context's directory.
    Disk,
}

/// Options of one save.
///
/// `use_ram(false)` sends the value straight to disk; `ram_only(true)` refuses to fall back
/// to disk and returns [`Error::OutOfRam`] instead. Asking for both is an error.
///
/// ```
/// use context_core::SaveOptions;
/// let opts = SaveOptions::new().use_ram(false);
/// assert!(!opts.uses_ram());
/// assert_eq!(SaveOptions::default(), SaveOptions::new());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SaveOptions {
    use_ram: bool,
    ram_only: bool,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl SaveOptions {
    /// RAM first, falling back to disk: `use_ram(true)`, `ram_only(false)`.
    pub const fn new() -> Self {
        SaveOptions { use_ram: true, ram_only: false }
    }

    /// Whether the value may go to RAM (`true`, the default) or must go to disk.
    #[must_use]
    pub const fn use_ram(mut self, yes: bool) -> Self {
        self.use_ram = yes;
        self
    }

    /// Whether the value must go to RAM and the save fail rather than fall back to disk.
    #[must_use]
    pub const fn ram_only(mut self, yes: bool) -> Self {
        self.ram_only = yes;
        self
    }

    /// The `use_ram` setting.
    pub const fn uses_ram(&self) -> bool {
        self.use_ram
    }

    /// The `ram_only` setting.
    pub const fn is_ram_only(&self) -> bool {
        self.ram_only
    }
}

/// Where and how one key's value is stored (the original's `get_storage_info`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StorageInfo {
    /// RAM or disk.
    pub storage_type: StorageKind,
    /// The name of the tier that holds the value ("shm", "mmap", "redb").
    pub tier: String,
    /// The bytes the tier holds for the value: rounded up to its slot or page, or
    /// compressed (for redb). This is what the value counts in [`Usage`].
    pub size: u64,
    /// The value's length in bytes, as `load_bytes` returns it.
    pub len: u64,
    /// By value or by reference.
    pub pass_by: PassBy,
    /// The shared-memory segment that holds the value, for RAM values.
    pub shm_name: Option<String>,
    /// The file that holds the value, for disk values (for redb, the database file).
    pub path: Option<PathBuf>,
}

impl StorageInfo {
    /// Describes a value of `len` bytes for which `tier` holds `size` bytes.
    pub fn new(storage_type: StorageKind, tier: impl Into<String>, size: u64, len: u64, pass_by: PassBy) -> Self {
        StorageInfo { storage_type, tier: tier.into(), size, len, pass_by, shm_name: None, path: None }
    }

    /// Sets the shared-memory segment name.
    #[must_use]
    pub fn with_shm_name(mut self, name: Option<String>) -> Self {
        self.shm_name = name;
        self
    }

    /// Sets the file path.
    #[must_use]
    pub fn with_path(mut self, path: Option<PathBuf>) -> Self {
        self.path = path;
        self
    }
}

const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

/// What a context holds, shared by every attached process (the original's `get_usage`).
///
/// ```
/// use context_core::Usage;
/// let u = Usage::new(1 << 30, 4 << 30, 3 << 20, 2);
/// assert_eq!(u.ram_usage_gb(), 1.0);
/// assert_eq!(u.ram_capacity_gb(), 4.0);
/// assert_eq!(u.temp_disk_usage_mb(), 3.0);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Usage {
    /// Bytes held in RAM tiers: what the tiers really hold, so each value counts rounded
    /// up to its slot or page, plus values being written or replaced right now.
    pub ram_usage_bytes: u64,
    /// The context's RAM budget (0 when the build has no RAM tier).
    pub ram_capacity_bytes: u64,
    /// Bytes held in disk tiers, counted the same way.
    pub temp_disk_usage_bytes: u64,
    /// Number of keys stored.
    pub stored_keys_count: usize,
}

impl Usage {
    /// Builds a usage report.
    pub fn new(
        ram_usage_bytes: u64,
        ram_capacity_bytes: u64,
        temp_disk_usage_bytes: u64,
        stored_keys_count: usize,
    ) -> Self {
        Usage { ram_usage_bytes, ram_capacity_bytes, temp_disk_usage_bytes, stored_keys_count }
    }

    /// RAM usage in GiB (2^30 bytes).
    pub fn ram_usage_gb(&self) -> f64 {
        self.ram_usage_bytes as f64 / GIB
    }

    /// RAM capacity in GiB (2^30 bytes).
    pub fn ram_capacity_gb(&self) -> f64 {
        self.ram_capacity_bytes as f64 / GIB
    }

    /// Disk usage in MiB (2^20 bytes).
    pub fn temp_disk_usage_mb(&self) -> f64 {
        self.temp_disk_usage_bytes as f64 / MIB
    }
}

/// The longest key accepted, in bytes of UTF-8.
pub const MAX_KEY_LEN: usize = 4096;
/// The longest run id accepted.
pub const MAX_RUN_ID_LEN: usize = 64;

/// Checks a key: any non-empty UTF-8 string of at most [`MAX_KEY_LEN`] bytes.
///
/// Keys never become file or segment names, so `"../x"`, `"a/b"` and `"/abs"` are fine.
///
/// ```
/// use context_core::validate_key;
/// assert!(validate_key("../etc/passwd").is_ok());
/// assert!(validate_key("").is_err());
/// ```
pub fn validate_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidKey { key: String::new(), reason: "a key must not be empty" });
    }
    if key.len() > MAX_KEY_LEN {
        return Err(Error::InvalidKey { key: shorten(key, 64), reason: "a key must be at most 4096 bytes of UTF-8" });
    }
    Ok(())
}

/// Checks a run id: 1 to [`MAX_RUN_ID_LEN`] characters of `[A-Za-z0-9_-]`.
///
/// ```
/// use context_core::validate_run_id;
/// assert!(validate_run_id("run_2024-01").is_ok());
/// assert!(validate_run_id("../x").is_err());
/// ```
pub fn validate_run_id(run_id: &str) -> Result<()> {
    let reason = if run_id.is_empty() {
        Some("a run id must not be empty")
    } else if run_id.len() > MAX_RUN_ID_LEN {
        Some("a run id must be at most 64 characters")
    } else if !run_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        Some("a run id may only contain A-Z, a-z, 0-9, '_' and '-'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidRunId { run_id: shorten(run_id, 80), reason }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        for ok in ["a", "../x", "a/b", "/abs", "ключ", "\0", &"k".repeat(MAX_KEY_LEN)] {
            validate_key(ok).unwrap();
        }
        assert!(matches!(validate_key(""), Err(Error::InvalidKey { .. })));
        let long = "é".repeat(MAX_KEY_LEN / 2 + 1);
        match validate_key(&long) {
            Err(Error::InvalidKey { key, .. }) => assert!(key.chars().count() <= 65),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn run_ids() {
        for ok in ["a", "A-b_9", &"x".repeat(64)] {
            validate_run_id(ok).unwrap();
        }
        for bad in ["", "a/b", "..", "a b", "é", &"x".repeat(65), "a.b", "a\0"] {
            assert!(matches!(validate_run_id(bad), Err(Error::InvalidRunId { .. })), "{bad:?}");
        }
    }

    #[test]
    fn save_options() {
        let o = SaveOptions::new();
        assert!(o.uses_ram() && !o.is_ram_only());
        let o = o.ram_only(true).use_ram(false);
        assert!(!o.uses_ram() && o.is_ram_only());
    }
}
