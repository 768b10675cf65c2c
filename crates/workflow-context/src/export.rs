//! The export file: a value made permanent, self-describing and checked.
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0  | 8 | magic `WFCXPORT` |
//! | 8  | 2 | format version (1), little endian |
//! | 10 | 2 | flags (bit 0: postcard-encoded typed value) |
//! | 12 | 4 | key length in bytes |
//! | 16 | 8 | payload length |
//! | 24 | 8 | XXH3-64 of the flags, the key bytes and the payload |
//! | 32 | key length | the key, UTF-8 |
//! | …  | payload length | the payload |

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use context_core::{Error, Result};
use serde::de::DeserializeOwned;
use xxhash_rust::xxh3::Xxh3;

use crate::fsutil;

const MAGIC: &[u8; 8] = b"WFCXPORT";
const VERSION: u16 = 1;
const HEADER: usize = 32;

/// A decoded export file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Exported {
    pub(crate) key: String,
    pub(crate) flags: u16,
    pub(crate) payload: Vec<u8>,
}

fn sum(flags: u16, key: &[u8], payload: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(&flags.to_le_bytes());
    h.update(key);
    h.update(payload);
    h.digest()
}

fn header(key: &str, flags: u16, payload: &[u8]) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..8].copy_from_slice(MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    h[10..12].copy_from_slice(&flags.to_le_bytes());
    h[12..16].copy_from_slice(&(key.len() as u32).to_le_bytes());
    h[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    h[24..32].copy_from_slice(&sum(flags, key.as_bytes(), payload).to_le_bytes());
    h
}

/// Decodes export bytes read from `path`.
pub(crate) fn decode(bytes: &[u8], path: &Path) -> Result<Exported> {
    let bad = |detail: String| Error::corrupt(path.display().to_string(), detail);
    let h = bytes.get(..HEADER).ok_or_else(|| bad(format!("{} bytes is too short for an export file", bytes.len())))?;
    if &h[0..8] != MAGIC {
        return Err(bad("not a workflow-context export file (bad magic)".to_owned()));
    }
    let version = u16::from_le_bytes([h[8], h[9]]);
    if version != VERSION {
        return Err(bad(format!("unsupported export format version {version}")));
    }
    let flags = u16::from_le_bytes([h[10], h[11]]);
    let key_len = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes")) as u64;
    let payload_len = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
    let stored = u64::from_le_bytes(h[24..32].try_into().expect("8 bytes"));
    let body = &bytes[HEADER..];
    if key_len.checked_add(payload_len) != Some(body.len() as u64) {
        return Err(bad(format!(
            "the header announces {key_len} key bytes and {payload_len} payload bytes, the file holds {} (truncated or extended)",
            body.len()
        )));
    }
    let (key, payload) = body.split_at(key_len as usize);
    if sum(flags, key, payload) != stored {
        return Err(bad("checksum mismatch: the file is damaged".to_owned()));
    }
    let key = std::str::from_utf8(key).map_err(|_| bad("the key is not UTF-8".to_owned()))?;
    Ok(Exported { key: key.to_owned(), flags, payload: payload.to_vec() })
}

/// Reads and checks an export file.
pub(crate) fn read(path: &Path) -> Result<Exported> {
    let mut file = File::open(path).map_err(|e| Error::io("open export file", path, e))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(|e| Error::io("read export file", path, e))?;
    decode(&bytes, path)
}

/// Writes an export file atomically: a temporary file in the destination directory,
/// fsync, then a rename that refuses to replace an existing file unless `overwrite`.
pub(crate) fn write(dest: &Path, key: &str, flags: u16, payload: &[u8], overwrite: bool) -> Result<()> {
    let file_name = dest
        .file_name()
        .ok_or_else(|| Error::io("export to", dest, io::Error::other("the destination has no file name")))?;
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| Error::io("create export directory", &parent, e))?;
    if !overwrite && fs::symlink_metadata(dest).is_ok() {
        return Err(Error::AlreadyExists { what: "export destination", path: dest.to_owned() });
    }
    let mut rand = [0u8; 8];
    getrandom::fill(&mut rand).map_err(|e| Error::io("make a temporary name in", &parent, io::Error::other(e)))?;
    let tmp = parent.join(format!(".{}.{:016x}.tmp", file_name.to_string_lossy(), u64::from_le_bytes(rand)));
    let result = (|| {
        let mut file = fsutil::create_new(&tmp, "create temporary export file")?;
        file.write_all(&header(key, flags, payload))
            .and_then(|()| file.write_all(key.as_bytes()))
            .and_then(|()| file.write_all(payload))
            .map_err(|e| Error::io("write export file", &tmp, e))?;
        file.sync_all().map_err(|e| Error::io("sync export file", &tmp, e))?;
        drop(file);
        let flags = if overwrite { rustix::fs::RenameFlags::empty() } else { rustix::fs::RenameFlags::NOREPLACE };
        rustix::fs::renameat_with(rustix::fs::CWD, &tmp, rustix::fs::CWD, dest, flags).map_err(|e| {
            if e == rustix::io::Errno::EXIST {
                Error::AlreadyExists { what: "export destination", path: dest.to_owned() }
            } else {
                Error::io("move export file into place at", dest, e.into())
            }
        })?;
        if let Ok(dir) = File::open(&parent) {
            let _ = dir.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads the payload of a file written by `WorkflowContext::export_data`.
///
/// The file's magic, version, length and checksum are checked: a damaged or truncated file
/// is [`Error::Corrupt`]. For values saved with `save_bytes` this is exactly the bytes
/// saved; for typed values, their postcard encoding (see [`read_exported`]).
pub fn read_exported_bytes(path: impl AsRef<Path>) -> Result<Vec<u8>> {
    Ok(read(path.as_ref())?.payload)
}

/// Reads a typed value from a file written by `WorkflowContext::export_data`.
///
/// ```
/// # fn main() -> workflow_context::Result<()> {
/// use workflow_context::{WorkflowContext, read_exported};
/// let dir = tempfile::tempdir().unwrap();
/// let ctx = WorkflowContext::builder().contexts_dir(dir.path()).create()?;
/// ctx.save("params", &(7u32, "euler".to_string()))?;
/// ctx.export_data("params", dir.path().join("out/params.wfx"), false)?;
/// let back: (u32, String) = read_exported(dir.path().join("out/params.wfx"))?;
/// assert_eq!(back, (7, "euler".to_string()));
/// assert!(!ctx.contains("params")?, "exporting moves the value out of the context");
/// # Ok(()) }
/// ```
pub fn read_exported<T: DeserializeOwned>(path: impl AsRef<Path>) -> Result<T> {
    let path = path.as_ref();
    let exported = read(path)?;
    crate::codec::decode(&exported.payload, &exported.key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a/b/x.wfx");
        write(&dest, "κ/../key", 1, b"payload", false).unwrap();
        let back = read(&dest).unwrap();
        assert_eq!(back, Exported { key: "κ/../key".into(), flags: 1, payload: b"payload".to_vec() });
        let bytes = fs::read(&dest).unwrap();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(matches!(decode(&bad, &dest), Err(Error::Corrupt { .. })), "flip at {i}");
        }
        for cut in 0..bytes.len() {
            assert!(matches!(decode(&bytes[..cut], &dest), Err(Error::Corrupt { .. })), "cut at {cut}");
        }
        assert!(matches!(write(&dest, "k", 0, b"new", false), Err(Error::AlreadyExists { .. })));
        assert_eq!(read(&dest).unwrap().payload, b"payload", "a refused export leaves the old file");
        write(&dest, "k", 0, b"new", true).unwrap();
        assert_eq!(read(&dest).unwrap().payload, b"new");
        let leftovers: Vec<_> = fs::read_dir(dest.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers.len(), 1, "no temporary files left: {leftovers:?}");
    }
}
