//! A private, small file system for tests of "the disk (or `/dev/shm`) is full".

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

/// How [`in_private_tmpfs`] ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sandboxed {
    /// The inner test ran and passed; its standard output.
    Ran(String),
    /// This machine allows no private mount namespace with a tmpfs (neither as root nor
    /// through a user namespace); why, for the skip message.
    Skipped(String),
}

/// Re-runs the ignored test `inner` of the running test binary in a private mount
/// namespace in which a tmpfs of `size` (as `mount -o size=` takes it: `"1m"`, `"16m"`) is
/// mounted at `mount_point` (a scratch directory, or `/dev/shm`), with the environment
/// variables `envs` set. Nothing outside the namespace sees the mount.
///
/// It tries `unshare --mount` (root) first, then `unshare --user --map-root-user --mount`
/// (unprivileged user namespaces), and reports [`Sandboxed::Skipped`] if neither may mount,
/// so a test skips cleanly in containers that forbid both.
///
/// # Panics
/// If the inner test fails, or if it did not run (its name matched no test).
///
/// ```no_run
/// use context_core::testing::{Sandboxed, in_private_tmpfs};
/// # let scratch = std::path::Path::new("/tmp/mnt");
/// match in_private_tmpfs("inner_full_disk", scratch, "1m", &[("MY_TEST_DIR", scratch.as_os_str())]) {
///     Sandboxed::Ran(stdout) => print!("{stdout}"),
///     Sandboxed::Skipped(why) => println!("SKIPPED: {why}"),
/// }
/// ```
pub fn in_private_tmpfs(inner: &str, mount_point: &Path, size: &str, envs: &[(&str, &OsStr)]) -> Sandboxed {
    let exe = std::env::current_exe().expect("the test binary's path");
    // Exit 77 when the mount is refused, so that it is told apart from a failing test.
    let script = r#"mount -t tmpfs -o size=$1,mode=0700 tmpfs "$2" || exit 77; shift 2; exec "$@""#;
    let attempts: [&[&str]; 2] = [
        &["--mount", "--propagation", "private"],
        &["--user", "--map-root-user", "--mount", "--propagation", "private"],
    ];
    let mut refusals = Vec::new();
    for flags in attempts {
        let mut command = Command::new("unshare");
        command.args(flags).args(["sh", "-c", script, "sh", size]).arg(mount_point).arg(&exe).args([
            "--exact",
            inner,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ]);
        for (name, value) in envs {
            command.env(name, value);
        }
        let output = match command.output() {
            Ok(output) => output,
            Err(e) => return Sandboxed::Skipped(format!("cannot run unshare: {e}")),
        };
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr);
        match output.status.code() {
            Some(0) => {
                assert!(stdout.contains("1 passed"), "the inner test {inner} did not run:\n{stdout}\n{stderr}");
                return Sandboxed::Ran(stdout);
            }
            Some(77) => refusals.push(format!("unshare {}: mount refused: {}", flags.join(" "), stderr.trim())),
            // unshare's own refusal (no permission for the namespace).
            Some(1) if stderr.starts_with("unshare:") => {
                refusals.push(format!("unshare {}: {}", flags.join(" "), stderr.trim()));
            }
            _ => panic!("the inner test {inner} failed ({}):\n{stdout}\n{stderr}", output.status),
        }
    }
    Sandboxed::Skipped(format!("no private tmpfs allowed here: {}", refusals.join("; ")))
}
