//! The one error type of workflow-context.

use std::io;
use std::path::PathBuf;

/// The result type used throughout workflow-context.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a context or a tier.
///
/// Every message names what it is about: the key, run id, path, or configuration key.
/// Tiers report failures with paths and object names; the composed context attaches the
/// user's key once, on the way out (see [`Error::with_key`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No value is stored under this key.
    #[error("key {key:?} not found in the context")]
    KeyNotFound {
        /// The key that was looked up.
        key: String,
    },
    /// No context with this run id exists in the contexts directory.
    #[error("no context with run id {run_id:?} in {}", dir.display())]
    ContextNotFound {
        /// The run id that was asked for.
        run_id: String,
        /// Where it was looked for.
        dir: PathBuf,
    },
    /// Something already exists where a new thing was to be created.
    #[error("{what} already exists: {}", path.display())]
    AlreadyExists {
        /// What was being created or is in the way ("export destination", "live context").
        what: &'static str,
        /// The path that is taken.
        path: PathBuf,
    },
    /// The value cannot be exported (for example, it is stored by reference).
    #[error("key {key:?} cannot be exported: {reason}")]
    NotExportable {
        /// The key.
        key: String,
        /// Why not.
        reason: String,
    },
    /// The value does not fit in RAM (its budget, or shared memory itself) and may not go
    /// to disk: the save asked for RAM only, or no disk tier is there to take it (a build
    /// without one, a policy that ranks none).
    #[error(
        "key {key:?}: {needed} bytes do not fit in RAM ({available} of {capacity} bytes of the budget free{})",
        if *shm_full { ", and shared memory itself is full" } else { "" }
    )]
    OutOfRam {
        /// The key being saved.
        key: String,
        /// Bytes the value needs in RAM.
        needed: u64,
        /// Bytes of the budget still free.
        available: u64,
        /// The context's RAM budget.
        capacity: u64,
        /// Whether the shared-memory file system refused the space although the budget had room.
        shm_full: bool,
    },
    /// The value does not fit on disk (disk budget or file system full).
    #[error("key {key:?}: {needed} bytes do not fit on disk{}", match available { Some(a) => format!(" ({a} bytes of the budget free)"), None => " (the file system is full)".to_owned() })]
    OutOfDisk {
        /// The key being saved.
        key: String,
        /// Bytes the value needs on disk.
        needed: u64,
        /// Bytes of the disk budget still free; `None` if no budget applies, or if the file
        /// system refused the space although the budget had room.
        available: Option<u64>,
    },
    /// The key is not acceptable (empty, too long).
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey {
        /// The key, shortened to its first 64 characters if it was longer.
        key: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The run id is not acceptable.
    #[error("invalid run id {run_id:?}: {reason}")]
    InvalidRunId {
        /// The run id, shortened to its first 80 characters if it was longer.
        run_id: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The save options contradict each other.
    #[error("key {key:?}: invalid save options: {reason}")]
    InvalidOptions {
        /// The key being saved.
        key: String,
        /// What is contradictory.
        reason: &'static str,
    },
    /// The configuration (file, environment or builder) is invalid.
    #[error("configuration error in {}{}: {message}", source_name, match key { Some(k) => format!(", key {k:?}"), None => String::new() })]
    Config {
        /// Where the configuration came from: a file path, or "builder".
        source_name: String,
        /// The configuration key at fault, if one is.
        key: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// A value could not be encoded or decoded with postcard (for example, loaded as the wrong type).
    #[error("key {key:?}: cannot {op} value: {message}")]
    Codec {
        /// The key.
        key: String,
        /// "encode" or "decode".
        op: &'static str,
        /// The codec's message.
        message: String,
    },
    /// Stored or exported bytes failed their checks (magic, length, checksum).
    #[error("corrupt {what}{}: {detail}", match key { Some(k) => format!(" for key {k:?}"), None => String::new() })]
    Corrupt {
        /// What is damaged: a segment name or file path.
        what: String,
        /// The key whose value it holds, if known.
        key: Option<String>,
        /// Which check failed.
        detail: String,
    },
    /// The context was shut down; no further operation is possible on it.
    #[error("context {run_id:?} is shut down")]
    Closed {
        /// The run id of the closed context.
        run_id: String,
    },
    /// The handle was opened by another process, which this one was forked from (without
    /// `exec`): it refuses every operation here, and dropping it here leaves the context
    /// alone. Open the context again in this process.
    #[error(
        "this handle of context {run_id:?} belongs to process {opened_by}, which process {pid} was forked from; \
         open the context again in this process"
    )]
    Forked {
        /// The run id of the context.
        run_id: String,
        /// The process that opened the handle.
        opened_by: u32,
        /// The process that tried to use it.
        pid: u32,
    },
    /// An operating-system call failed.
    #[error("{op} {}{}: {source}", path.display(), match key { Some(k) => format!(" (key {k:?})"), None => String::new() })]
    Io {
        /// What was being done ("create shared-memory segment", "write value file").
        op: &'static str,
        /// The file, directory or segment involved.
        path: PathBuf,
        /// The key being worked on, if any.
        key: Option<String>,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The save's options allow only one kind of tier (RAM or disk), and none of the tiers
    /// the placement policy admits is of that kind: the build has none, or the policy rules
    /// them out (`ram_only(true)` under `DiskOnly`, say).
    #[error("key {key:?}: the save's options allow only a {} tier, and the placement policy admits none of this build's", match kind { crate::StorageKind::Ram => "RAM", crate::StorageKind::Disk => "disk" })]
    NoTier {
        /// The key being saved.
        key: String,
        /// The kind of tier the save options require.
        kind: crate::StorageKind,
    },
    /// The placement policy admits none of the context's tiers for this value.
    #[error("key {key:?}: {reason}")]
    NoPlacement {
        /// The key being saved.
        key: String,
        /// Which policy, and for what size.
        reason: String,
    },
    /// The value is stored in a tier this process does not have (built without its feature).
    #[error("key {key:?} is stored in tier {tier:?}, which this build does not include")]
    TierUnavailable {
        /// The key.
        key: String,
        /// The tier's name.
        tier: String,
    },
    /// A workflow graph (the recipe of a value passed by reference) is malformed.
    #[error("invalid workflow graph{}: {reason}", match node { Some(n) => format!(" at node {n:?}"), None => String::new() })]
    InvalidGraph {
        /// The node at fault, if one is; an id refused for its length is shortened to its
        /// first 64 characters.
        node: Option<String>,
        /// What is wrong.
        reason: String,
    },
    /// The key holds a value passed by reference (a recipe): load it with `load_ref`, or
    /// its recipe with `load_graph`.
    #[error("key {key:?} is passed by reference: load it with load_ref (or its recipe with load_graph)")]
    ByReference {
        /// The key.
        key: String,
    },
    /// The key holds a value passed by value, not a recipe: load it with `load`.
    #[error("key {key:?} holds a value, not a recipe: load it with load or load_bytes")]
    ByValue {
        /// The key.
        key: String,
    },
    /// A value passed by reference was asked for, but the context has no graph runner to
    /// rebuild it.
    #[error(
        "key {key:?} is passed by reference and this context has no graph runner to rebuild it (see ContextBuilder::graph_runner)"
    )]
    NoRunner {
        /// The key.
        key: String,
    },
    /// The graph runner rebuilt a value of another type than the one asked for.
    #[error("key {key:?}: the graph runner's value is not a {expected}")]
    WrongType {
        /// The key.
        key: String,
        /// The type asked for.
        expected: &'static str,
    },
    /// The graph runner that rebuilds a value passed by reference failed.
    #[error("key {key:?}: the graph runner failed: {source}")]
    Runner {
        /// The key whose value was being rebuilt.
        key: String,
        /// The runner's own error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// Builds an [`Error::Io`] for `op` on `path`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io { op, path: path.into(), key: None, source }
    }

    /// Builds an [`Error::Corrupt`] about `what`.
    pub fn corrupt(what: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Corrupt { what: what.into(), key: None, detail: detail.into() }
    }

    /// Attaches the key being worked on to errors that can carry one and lack it.
    ///
    /// The composed context calls this once on every error a tier returns, so tiers never
    /// need to know keys.
    #[must_use]
    pub fn with_key(mut self, k: &str) -> Self {
        match &mut self {
            Error::Io { key, .. } | Error::Corrupt { key, .. } if key.is_none() => {
                *key = Some(k.to_owned());
            }
            _ => {}
        }
        self
    }

    /// Whether this error means "not enough space" (RAM or disk).
    pub fn is_out_of_space(&self) -> bool {
        matches!(self, Error::OutOfRam { .. } | Error::OutOfDisk { .. })
    }
}

/// Shortens user input for inclusion in an error message, on a character boundary.
pub(crate) fn shorten(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_their_subject() {
        let e = Error::KeyNotFound { key: "prompt".into() };
        assert_eq!(e.to_string(), "key \"prompt\" not found in the context");
        let e = Error::io("open", "/x/y", io::Error::from(io::ErrorKind::NotFound)).with_key("k");
        let s = e.to_string();
        assert!(s.contains("/x/y") && s.contains("\"k\""), "{s}");
        assert!(std::error::Error::source(&e).is_some());
        let e = Error::Config {
            source_name: "/etc/c.json".into(),
            key: Some("MAX_RAM_GB".into()),
            message: "must be positive".into(),
        };
        assert!(e.to_string().contains("MAX_RAM_GB") && e.to_string().contains("/etc/c.json"));
    }

    #[test]
    fn graph_and_runner_errors_name_their_subject() {
        let e = Error::InvalidGraph { node: Some("4".into()), reason: "links to missing node \"9\"".into() };
        assert_eq!(e.to_string(), "invalid workflow graph at node \"4\": links to missing node \"9\"");
        let e = Error::InvalidGraph { node: None, reason: "not a JSON object".into() };
        assert_eq!(e.to_string(), "invalid workflow graph: not a JSON object");
        let e = Error::Runner { key: "model".into(), source: "server unreachable".into() };
        assert_eq!(e.to_string(), "key \"model\": the graph runner failed: server unreachable");
        assert_eq!(std::error::Error::source(&e).map(ToString::to_string).as_deref(), Some("server unreachable"));
    }

    #[test]
    fn a_forked_handle_names_both_processes_and_the_way_out() {
        let e = Error::Forked { run_id: "render-42".into(), opened_by: 100, pid: 200 };
        assert_eq!(
            e.to_string(),
            "this handle of context \"render-42\" belongs to process 100, which process 200 was forked from; \
             open the context again in this process"
        );
    }

    #[test]
    fn with_key_keeps_an_existing_key() {
        let e = Error::corrupt("seg", "bad magic").with_key("a").with_key("b");
        assert!(matches!(e, Error::Corrupt { key: Some(ref k), .. } if k == "a"));
    }

    #[test]
    fn shorten_respects_char_boundaries() {
        assert_eq!(shorten("ééé", 2), "éé…");
        assert_eq!(shorten("ab", 2), "ab");
    }
}
