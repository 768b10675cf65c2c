//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};

use workflow_context::{ContextBuilder, WorkflowContext};

/// Options that send a value to disk when this build has a disk tier (else the default).
pub fn to_disk() -> workflow_context::SaveOptions {
    workflow_context::SaveOptions::new().use_ram(!cfg!(feature = "tier-mmap"))
}

/// A RAM budget of `bytes` when values can spill to disk; without a disk tier, one large
/// enough for the whole test.
pub fn budget(bytes: u64) -> u64 {
    if cfg!(feature = "tier-mmap") { bytes } else { 1 << 30 }
}

/// A fresh contexts directory, removed when dropped.
pub fn base() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("wfctx-test-").tempdir().expect("tempdir")
}

/// A run id unique across the parallel test processes.
pub fn run_id(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

pub fn builder(base: &Path) -> ContextBuilder {
    WorkflowContext::builder().contexts_dir(base)
}

/// Names in /dev/shm that belong to `run_id`.
pub fn shm_segments(run_id: &str) -> Vec<String> {
    let prefix = format!("wfctx.{run_id}.");
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// The segments of `run_id` that hold one large value each (not the small-value arenas,
/// named `wfctx.<run id>.<instance>.a<slot size>.<n>`).
pub fn large_segments(run_id: &str) -> Vec<String> {
    let prefix = format!("wfctx.{run_id}.");
    shm_segments(run_id)
        .into_iter()
        .filter(|s| s[prefix.len()..].split_once('.').is_some_and(|(_, name)| !name.starts_with('a')))
        .collect()
}

/// Every path below `dir`, relative.
pub fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.flatten() {
                let p = e.path();
                out.push(p.strip_prefix(dir).unwrap().to_owned());
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(p);
                }
            }
        }
    }
    out.sort();
    out
}

/// Runs this test binary again as a child that executes `role` (see `child_main` in the
/// test files), with `env` set. The child test is `#[ignore]`d so it only runs this way.
pub fn run_child(entry: &str, role: &str, env: &[(&str, &str)]) -> Output {
    let exe = std::env::current_exe().expect("current exe");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", entry, "--ignored", "--nocapture", "--test-threads=1"]).env("WFCTX_CHILD_ROLE", role);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("spawn child")
}

pub fn assert_child_ok(out: &Output) {
    assert!(
        out.status.success(),
        "child failed: {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("1 passed"), "the child test did not run:\n{stdout}");
}

/// A value whose `Serialize` panics halfway through every call after the first (a save
/// serializes twice: once to count the bytes, once to write them).
pub struct PanicsWhileWritten {
    len: usize,
    /// How many times it was serialized.
    pub calls: std::cell::Cell<u32>,
}

impl PanicsWhileWritten {
    /// A value of `len` bytes.
    pub fn new(len: usize) -> Self {
        PanicsWhileWritten { len, calls: 0.into() }
    }
}

impl serde::Serialize for PanicsWhileWritten {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let call = self.calls.replace(self.calls.get() + 1);
        let mut seq = s.serialize_tuple(self.len)?;
        for i in 0..self.len {
            assert!(call == 0 || i < self.len / 2, "a serializer that panics while the value is written");
            seq.serialize_element(&(i as u8))?;
        }
        seq.end()
    }
}

/// A value of `len` bytes whose `Serialize`, the second time it is called (a save's write,
/// after its count), stops halfway: it says so on `paused` and waits for `resume`. With it a
/// test puts other operations in the middle of a save.
pub struct PausesWhileWritten {
    len: usize,
    calls: std::cell::Cell<u32>,
    paused: std::sync::mpsc::Sender<()>,
    resume: std::sync::mpsc::Receiver<()>,
}

impl PausesWhileWritten {
    /// The value, the receiver told when it pauses, and the sender that resumes it.
    pub fn new(len: usize) -> (Self, std::sync::mpsc::Receiver<()>, std::sync::mpsc::Sender<()>) {
        let (paused, on_pause) = std::sync::mpsc::channel();
        let (resume, on_resume) = std::sync::mpsc::channel();
        (PausesWhileWritten { len, calls: 0.into(), paused, resume: on_resume }, on_pause, resume)
    }
}

impl serde::Serialize for PausesWhileWritten {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let call = self.calls.replace(self.calls.get() + 1);
        let mut seq = s.serialize_tuple(self.len)?;
        for i in 0..self.len {
            if call == 1 && i == self.len / 2 {
                let _ = self.paused.send(());
                let _ = self.resume.recv();
            }
            seq.serialize_element(&(i as u8))?;
        }
        seq.end()
    }
}
