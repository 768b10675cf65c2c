//! Several processes on one database file, as the processes attached to one context are.
//!
//! Each outer test re-runs this test binary as child processes (`--exact <child> --ignored`),
//! which talk to it over their stdin and stdout.

use std::io::{BufRead, BufReader, Lines, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use context_core::testing::pattern;
use context_core::{NewObject, ObjectData, ObjectId, ObjectRef, PutOutcome, StorageTier};
use context_tier_redb::{RedbConfig, RedbTier};

const PATH_VAR: &str = "CONTEXT_TIER_REDB_CHILD_PATH";
const ROLE_VAR: &str = "CONTEXT_TIER_REDB_CHILD_ROLE";
/// Lines the children print start with this, to tell them from the test harness's own.
const MARK: &str = "@@";

/// A child process running one ignored test of this binary.
struct Peer {
    name: String,
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Peer {
    fn spawn(test: &str, path: &Path, role: usize) -> Peer {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--ignored", "--nocapture", "--test-threads=1"])
            .env(PATH_VAR, path)
            .env(ROLE_VAR, role.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        Peer { name: format!("{test} #{role}"), child, stdin, stdout }
    }

    /// Waits for the child to print `word`.
    fn expect(&mut self, word: &str) {
        for line in self.stdout.by_ref() {
            let line = line.unwrap();
            if let Some(said) = line.split(MARK).nth(1) {
                assert_eq!(said.trim(), word, "{} said something else", self.name);
                return;
            }
        }
        let status = self.child.wait().unwrap();
        panic!("{} ended ({status}) without saying {word}", self.name);
    }

    fn tell(&mut self, word: &str) {
        writeln!(self.stdin, "{word}").unwrap();
        self.stdin.flush().unwrap();
    }

    fn finish(mut self) {
        drop(self.stdin);
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{} failed: {status}", self.name);
    }
}

/// In a child: says `word` to the parent.
fn say(word: &str) {
    println!("{MARK}{word}");
    std::io::stdout().flush().unwrap();
}

/// In a child: waits for the parent to say `word`.
fn hear(word: &str) {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    assert_eq!(line.trim(), word);
}

/// In a child: the database file and the child's role, if this is a child at all.
fn child_setup() -> Option<(PathBuf, usize)> {
    let path = PathBuf::from(std::env::var_os(PATH_VAR)?);
    let role = std::env::var(ROLE_VAR).ok()?.parse().ok()?;
    Some((path, role))
}

fn put(tier: &RedbTier, id: u64, bytes: &[u8]) -> ObjectRef {
    let parts: [&[u8]; 1] = [bytes];
    match tier.put(NewObject { id: ObjectId(id), len: bytes.len() as u64, data: ObjectData::Parts(&parts) }) {
        Ok(PutOutcome::Stored(r)) => r,
        other => panic!("put of object {id} failed: {other:?}"),
    }
}

fn id_ref(id: u64) -> ObjectRef {
    ObjectRef { id: ObjectId(id), len: 0, slot: ObjectRef::UNKNOWN_SLOT, held: 0 }
}

/// The objects the child of `child_puts` stores: small, compressible, and large enough to be
/// chunked.
fn child_object(id: u64) -> Vec<u8> {
    match id {
        1 => b"a small value".to_vec(),
        2 => pattern(2, 70_000),
        3 => vec![b'z'; 300_000],
        4 => (0u32..).flat_map(|i| format!("{i},").into_bytes()).take(5 << 20).collect(),
        _ => pattern(id, 5000),
    }
}

const CHILD_IDS: std::ops::RangeInclusive<u64> = 1..=5;

#[test]
fn a_live_process_reads_and_deletes_what_another_put() {
    let scratch = tempfile::tempdir().unwrap();
    let path = scratch.path().join("context.redb");
    // The parent's tier is open before, during and after the child's.
    let tier = RedbTier::new(RedbConfig::new(&path)).unwrap();
    let mut child = Peer::spawn("child_puts", &path, 0);
    child.expect("stored");
    for id in CHILD_IDS {
        let got = tier.get(&id_ref(id)).unwrap();
        assert!(got.as_deref() == Some(&child_object(id)[..]), "object {id} put by the child");
    }
    assert_eq!(tier.usage().unwrap().objects, 5);
    let mine = put(&tier, 10, b"from the parent");
    // Delete one of the child's while it is alive; it checks.
    assert!(tier.delete(&id_ref(3)).unwrap());
    child.tell("deleted");
    child.expect("checked");
    child.finish();
    // What the child deleted, and what it left, after it is gone.
    assert!(tier.get(&id_ref(1)).unwrap().is_none());
    assert!(tier.get(&id_ref(4)).unwrap().as_deref() == Some(&child_object(4)[..]));
    assert_eq!(tier.get(&mine).unwrap().as_deref(), Some(&b"from the parent"[..]));
    tier.destroy().unwrap();
    assert!(!path.exists());
}

/// Run by `a_live_process_reads_and_deletes_what_another_put`.
#[test]
#[ignore = "run as a child process by a_live_process_reads_and_deletes_what_another_put"]
fn child_puts() {
    let Some((path, _)) = child_setup() else { return };
    let tier = RedbTier::new(RedbConfig::new(path)).unwrap();
    for id in CHILD_IDS {
        put(&tier, id, &child_object(id));
    }
    say("stored");
    hear("deleted");
    assert!(tier.get(&id_ref(3)).unwrap().is_none(), "the parent's delete is not seen");
    assert_eq!(tier.get(&id_ref(10)).unwrap().as_deref(), Some(&b"from the parent"[..]));
    for id in [1, 2, 4, 5] {
        assert!(tier.get(&id_ref(id)).unwrap().as_deref() == Some(&child_object(id)[..]), "object {id}");
    }
    assert!(tier.delete(&id_ref(1)).unwrap());
    say("checked");
}

#[test]
fn two_processes_create_one_new_file_at_once() {
    for round in 0..5 {
        let scratch = tempfile::tempdir().unwrap();
        let path = scratch.path().join("context.redb");
        let mut peers: Vec<Peer> = (0..2).map(|role| Peer::spawn("child_creates", &path, role)).collect();
        for peer in &mut peers {
            peer.expect("ready");
        }
        // Both open the new file at the same moment.
        for peer in &mut peers {
            peer.tell("open");
        }
        for peer in &mut peers {
            peer.expect("stored");
        }
        // Each reads the other's value while the other is alive.
        for peer in &mut peers {
            peer.tell("read");
        }
        for peer in &mut peers {
            peer.expect("read");
        }
        for peer in peers {
            peer.finish();
        }
        let tier = RedbTier::new(RedbConfig::new(&path)).unwrap();
        assert_eq!(tier.usage().unwrap().objects, 2, "round {round}");
        tier.destroy().unwrap();
    }
}

/// Run by `two_processes_create_one_new_file_at_once`.
#[test]
#[ignore = "run as a child process by two_processes_create_one_new_file_at_once"]
fn child_creates() {
    let Some((path, role)) = child_setup() else { return };
    say("ready");
    hear("open");
    let tier = RedbTier::new(RedbConfig::new(path)).unwrap();
    put(&tier, role as u64, format!("from child {role}").as_bytes());
    say("stored");
    hear("read");
    let other = 1 - role;
    let got = tier.get(&id_ref(other as u64)).unwrap();
    assert_eq!(got.as_deref(), Some(format!("from child {other}").as_bytes()));
    say("read");
}
