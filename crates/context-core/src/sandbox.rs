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
    // Exit 77 when the mount is refused, so that it is told apart from a failing test.
    let script = r#"mount -t tmpfs -o size=$1,mode=0700 tmpfs "$2" || exit 77; shift 2; exec "$@""#;
    in_private_mount(inner, script, OsStr::new(size), mount_point, envs)
}

/// As [`in_private_tmpfs`], with an ext2 file system of `bytes` bytes instead of a tmpfs:
/// one without `fallocate` (ext2 has no extents), made with `mkfs.ext2` in an image file
/// beside `mount_point` and mounted through a loop device. Reports
/// [`Sandboxed::Skipped`] where `mkfs.ext2` is missing or loop mounts are refused (they
/// need root).
///
/// # Panics
/// If the inner test fails, or if it did not run (its name matched no test).
pub fn in_private_ext2(inner: &str, mount_point: &Path, bytes: u64, envs: &[(&str, &OsStr)]) -> Sandboxed {
    let mut image = mount_point.as_os_str().to_owned();
    image.push(".ext2.img");
    let image = std::path::PathBuf::from(image);
    let made = std::fs::File::create(&image).and_then(|f| f.set_len(bytes)).map_err(|e| e.to_string()).and_then(|()| {
        match Command::new("mkfs.ext2").args(["-q", "-F"]).arg(&image).output() {
            Ok(out) if out.status.success() => Ok(()),
            Ok(out) => Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
            Err(e) => Err(e.to_string()),
        }
    });
    let outcome = match made {
        Ok(()) => {
            let script = r#"mount -o loop "$1" "$2" || exit 77; shift 2; exec "$@""#;
            in_private_mount(inner, script, image.as_os_str(), mount_point, envs)
        }
        Err(why) => Sandboxed::Skipped(format!("cannot make an ext2 image with mkfs.ext2: {why}")),
    };
    let _ = std::fs::remove_file(&image);
    outcome
}

/// Runs `script` (`sh -c`, given `arg` and `mount_point` as `$1` and `$2`, then the command
/// to exec) in a private mount namespace, to mount something at `mount_point` and run the
/// ignored test `inner` there.
fn in_private_mount(inner: &str, script: &str, arg: &OsStr, mount_point: &Path, envs: &[(&str, &OsStr)]) -> Sandboxed {
    let exe = std::env::current_exe().expect("the test binary's path");
    let attempts: [&[&str]; 2] = [
        &["--mount", "--propagation", "private"],
        &["--user", "--map-root-user", "--mount", "--propagation", "private"],
    ];
    let mut refusals = Vec::new();
    for flags in attempts {
        let mut command = Command::new("unshare");
        command.args(flags).args(["sh", "-c", script, "sh"]).arg(arg).arg(mount_point).arg(&exe).args([
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
    Sandboxed::Skipped(format!("no private mount allowed here: {}", refusals.join("; ")))
}
