//! The value record: the bytes a tier stores for one value.
//!
//! Every object a tier holds is a record, in one of two forms that its first byte tells
//! apart: a *short* record for a payload of up to [`SHORT_MAX`] (255) bytes, a *full* one
//! for anything longer. The form follows from the payload's length alone: a full record of
//! a short payload is refused, so every payload has exactly one record and the record's
//! length tells the payload's ([`payload_len`]).
//!
//! # A short record
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0 | 1 | marker `0xC5` |
//! | 1 | 1 | flags (bit 0: the payload is a postcard-encoded typed value) |
//! | 2 | 1 | payload length |
//! | 3 | payload length | the payload |
//! | end − 8 | 8 | checksum: XXH3-64 of everything before it, seeded with the object id |
//!
//! Why: most values a workflow passes between steps are a few dozen bytes (a seed, a
//! sampler's name, a prompt), and each costs its record in RAM. Eleven bytes instead of
//! forty put the record of a 50-byte string (51 bytes encoded) in one 64-byte cache line
//! and one 64-byte slot of the shm tier, where the full form took 91 bytes, a 96-byte slot
//! and two lines: a third less of the RAM budget, and one line, not two, that a load of
//! the value reads from memory. A short record does not name its object in clear; the
//! checksum, seeded with the object id, still refuses it under any other id.
//!
//! # A full record
//! A 32-byte header, the payload, and an 8-byte trailer.
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0  | 4 | magic `WFCV` |
//! | 4  | 1 | format version (1) |
//! | 5  | 1 | flags (bit 0: the payload is a postcard-encoded typed value) |
//! | 6  | 2 | reserved, zero |
//! | 8  | 8 | payload length, little endian |
//! | 16 | 8 | object id, little endian |
//! | 24 | 8 | header check: XXH3-64 of bytes 0..24 |
//! | 32 | payload length | the payload |
//! | end − 8 | 8 | payload checksum: XXH3-64 of the payload, seeded with the object id |
//!
//! The payload checksum sits in a trailer so that a writer can compute it while streaming
//! the payload into place, reading the value's bytes from memory once. Seeding it with the
//! object id means a record copied under another object's name fails its check.
//!
//! # Where a large record goes in its file
//! The payload starts at offset 32. A tier that lays large records out in files or segments
//! of their own (the shm and mmap tiers, from 64 KiB) starts each one
//! [`LARGE_RECORD_OFFSET`] (96) bytes in, so that its payload starts [`PAYLOAD_IN_PAGE`]
//! (128) bytes into a page. Why: a copy of many megabytes runs at a half to a quarter of its
//! speed on the CPU we measured (AMD EPYC, Zen 3) when its destination lies a little ahead
//! of its source within a page (from 16 to about 600 bytes, modulo 4096: loads wait on
//! earlier stores to addresses with the same low 12 bits). A save copies from the caller's
//! buffer into the payload's pages (in the kernel, for a `pwrite`), and a load's copy out
//! goes the other way, into a new buffer. Large buffers of glibc's `malloc` start 16 bytes
//! into a page, those of page-aligned allocators at 0. With the payload at 128 the save's
//! destination is ahead by 112 or 128 bytes, past the kernel's copy's narrow window (about
//! 16 bytes), and the load's is behind: both run at memory speed. A payload on the page
//! boundary (as this crate's tiers had it) halved the copy out of a 256 MiB value, one at
//! 32 bytes (a record at 0) halved its save. A view of such a payload is 128-byte aligned.

use std::io;

use crate::tier::ObjectId;
use std::hash::Hasher;

use twox_hash::XxHash3_64;
use xxhash_rust::xxh3::xxh3_64;

/// Length of a full record's header in bytes.
pub const HEADER_LEN: usize = 32;
/// Length of the record trailer in bytes (either form).
pub const TRAILER_LEN: usize = 8;
/// Header plus trailer: a full record is this much longer than its payload.
pub const OVERHEAD: usize = HEADER_LEN + TRAILER_LEN;
/// The longest payload kept in a short record.
pub const SHORT_MAX: usize = 255;
/// The first byte of a short record (a full one starts with [`MAGIC`]).
pub const SHORT_MARKER: u8 = 0xC5;
/// Length of a short record's header in bytes: marker, flags, payload length.
pub const SHORT_HEADER_LEN: usize = 3;
/// Header plus trailer: a short record is this much longer than its payload.
pub const SHORT_OVERHEAD: usize = SHORT_HEADER_LEN + TRAILER_LEN;
/// Where in a page the payload of a large record starts, in a tier that gives each large
/// record a file or segment of its own (see [Where a large record goes in its
/// file](self#where-a-large-record-goes-in-its-file)).
pub const PAYLOAD_IN_PAGE: usize = 128;
/// Where such a tier starts a large record in its file or segment: [`PAYLOAD_IN_PAGE`]
/// less the [`HEADER_LEN`]. The bytes before it hold nothing.
pub const LARGE_RECORD_OFFSET: u64 = (PAYLOAD_IN_PAGE - HEADER_LEN) as u64;
/// The record magic.
pub const MAGIC: [u8; 4] = *b"WFCV";
/// The record format version written by this crate.
pub const VERSION: u8 = 1;
/// Flag: the payload is a postcard-encoded typed value (saved with `save`, not `save_bytes`).
pub const FLAG_TYPED: u8 = 1;
const KNOWN_FLAGS: u8 = FLAG_TYPED;
/// Pieces in which [`write_record`] writes and checksums a payload: each piece is written,
/// then checksummed while the write has left it in the CPU's cache, so the payload is read
/// from memory once.
///
/// Why 2 MiB: small enough to stay in the last-level cache between the two (the share of
/// it a process gets on our 2-core benchmark machine is about 8 MiB), and large enough that
/// a `pwrite` into the page cache of ext4 costs little per call. Saving 256 MiB into a file
/// there took 72 ms in pieces of 256 KiB, 62 ms in pieces of 1 MiB, 59 ms in pieces of
/// 2 MiB and 4 MiB, against 66 ms for `fs::write` of the same bytes (into tmpfs the size
/// made no difference).
const PIECE: usize = 2 << 20;

/// The decoded header of a value record (of either form: a short record's object id is the
/// one [`check`] verified it against).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// Flags (see [`FLAG_TYPED`]).
    pub flags: u8,
    /// Length of the payload in bytes.
    pub payload_len: u64,
    /// The object this record belongs to.
    pub object_id: ObjectId,
}

impl RecordHeader {
    /// Length of the whole record (header, payload and trailer); `u64::MAX` for a header
    /// that claims more than can exist.
    pub fn record_len(&self) -> u64 {
        record_len(self.payload_len)
    }

    /// Encodes the header of a full record.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4] = VERSION;
        h[5] = self.flags;
        h[8..16].copy_from_slice(&self.payload_len.to_le_bytes());
        h[16..24].copy_from_slice(&self.object_id.0.to_le_bytes());
        let check = xxh3_64(&h[..24]);
        h[24..32].copy_from_slice(&check.to_le_bytes());
        h
    }

    /// Decodes and checks the header of a full record: magic, version, flags, reserved
    /// bytes, header check. (A short record has no header of its own to check: [`check`]
    /// checks it whole.)
    ///
    /// Returns a description of the first failed check.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let h: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("record is {} bytes, shorter than its {HEADER_LEN}-byte header", bytes.len()))?;
        if h[0..4] != MAGIC {
            return Err(format!("bad record magic {:02x?}", &h[0..4]));
        }
        let word = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
        if xxh3_64(&h[..24]) != word(24) {
            return Err("the record header fails its check".to_owned());
        }
        if h[4] != VERSION {
            return Err(format!("unsupported record version {}", h[4]));
        }
        if h[5] & !KNOWN_FLAGS != 0 || h[6] != 0 || h[7] != 0 {
            return Err(format!("unknown record flags {:#04x} {:#04x} {:#04x}", h[5], h[6], h[7]));
        }
        Ok(RecordHeader { flags: h[5], payload_len: word(8), object_id: ObjectId(word(16)) })
    }
}

/// The checksum of a payload stored as object `id`: XXH3-64 seeded with the id.
///
/// Computed with `twox-hash`, whose XXH3 picks AVX2 at run time (xxhash-rust, used for the
/// small hashes elsewhere, decides SIMD at compile time, so a portable build gets SSE2):
/// about 1.5x faster on cached data, which is what a save checksums.
pub fn checksum(id: ObjectId, payload: &[u8]) -> u64 {
    XxHash3_64::oneshot_with_seed(id.0, payload)
}

/// The length of the record for a payload of `payload_len` bytes; `u64::MAX` for a length
/// that no record can have.
///
/// ```
/// use context_core::record::{payload_len, record_len};
/// assert_eq!(record_len(51), 62); // a short record: 11 bytes more
/// assert_eq!(record_len(4096), 4136); // a full one: 40 bytes more
/// assert_eq!(payload_len(62), Some(51));
/// ```
pub fn record_len(payload_len: u64) -> u64 {
    if payload_len <= SHORT_MAX as u64 {
        payload_len + SHORT_OVERHEAD as u64
    } else {
        payload_len.saturating_add(OVERHEAD as u64)
    }
}

/// The length of the payload of a record of `record_len` bytes: the inverse of
/// [`record_len`], `None` for a length that no record has.
pub fn payload_len(record_len: u64) -> Option<u64> {
    let short = record_len.checked_sub(SHORT_OVERHEAD as u64).filter(|&n| n <= SHORT_MAX as u64);
    short.or_else(|| record_len.checked_sub(OVERHEAD as u64).filter(|&n| n > SHORT_MAX as u64))
}

/// The header of a short record of a payload of `payload_len` bytes (at most
/// [`SHORT_MAX`]).
fn short_header(flags: u8, payload_len: usize) -> [u8; SHORT_HEADER_LEN] {
    debug_assert!(payload_len <= SHORT_MAX);
    [SHORT_MARKER, flags, payload_len as u8]
}

/// Writes the record of `payload` into `out`.
///
/// The payload is written in pieces of 2 MiB, each checksummed right after its write while
/// it is still in the CPU's cache, so it is read from main memory once. That beat a
/// checksum thread on the 2-core VM (measured with pieces of 256 KiB): saving 256 MiB to a
/// file took 72 ms without a checksum, 110 ms with a second thread checksumming the whole
/// payload beside the writer, 86 ms with one following the writer piece by piece (the two
/// cores share more than they seem to), and 79 ms in one pass with an AVX2 checksum.
pub fn write_record(out: &mut dyn io::Write, id: ObjectId, flags: u8, payload: &[u8]) -> io::Result<()> {
    if payload.len() <= SHORT_MAX {
        // Built whole and written at once: one write into a tier's slot.
        let mut rec = [0u8; SHORT_MAX + SHORT_OVERHEAD];
        let end = SHORT_HEADER_LEN + payload.len();
        rec[..SHORT_HEADER_LEN].copy_from_slice(&short_header(flags, payload.len()));
        rec[SHORT_HEADER_LEN..end].copy_from_slice(payload);
        let sum = checksum(id, &rec[..end]);
        rec[end..end + TRAILER_LEN].copy_from_slice(&sum.to_le_bytes());
        return out.write_all(&rec[..end + TRAILER_LEN]);
    }
    if payload.len() <= PIECE {
        // One piece: checksummed in one call, with no streaming state to allocate (a small
        // save makes this its only record).
        out.write_all(&RecordHeader { flags, payload_len: payload.len() as u64, object_id: id }.encode())?;
        out.write_all(payload)?;
        return out.write_all(&checksum(id, payload).to_le_bytes());
    }
    let mut w = RecordWriter::new(out, id, flags, payload.len() as u64)?;
    for piece in payload.chunks(PIECE) {
        io::Write::write_all(&mut w, piece)?;
    }
    w.finish()
}

/// An [`io::Write`] that streams a payload into a record: it writes the header when
/// created, checksums everything written through it, and writes the trailer on
/// [`finish`](RecordWriter::finish). Used to serialize typed values straight into place.
pub struct RecordWriter<'w> {
    out: &'w mut dyn io::Write,
    sum: Box<XxHash3_64>,
    remaining: u64,
}

impl<'w> RecordWriter<'w> {
    /// Writes the header of a record of `payload_len` bytes and returns the payload writer.
    pub fn new(out: &'w mut dyn io::Write, id: ObjectId, flags: u8, payload_len: u64) -> io::Result<Self> {
        let mut sum = Box::new(XxHash3_64::with_seed(id.0));
        if payload_len <= SHORT_MAX as u64 {
            // A short record's checksum covers its header too.
            let header = short_header(flags, payload_len as usize);
            out.write_all(&header)?;
            sum.write(&header);
        } else {
            out.write_all(&RecordHeader { flags, payload_len, object_id: id }.encode())?;
        }
        Ok(RecordWriter { out, sum, remaining: payload_len })
    }

    /// Writes the trailer. Fails if the payload written is shorter than announced.
    pub fn finish(self) -> io::Result<()> {
        if self.remaining != 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} payload bytes missing", self.remaining),
            ));
        }
        self.out.write_all(&self.sum.finish().to_le_bytes())
    }
}

impl io::Write for RecordWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() as u64 > self.remaining {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "payload longer than announced"));
        }
        let n = self.out.write(buf)?;
        self.sum.write(&buf[..n]);
        self.remaining -= n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Encodes a whole record for `payload` into a new buffer (for small values and tests).
pub fn encode(id: ObjectId, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OVERHEAD + payload.len());
    write_record(&mut out, id, flags, payload).expect("writing to a Vec cannot fail");
    out
}

/// Where the payload lies in a record that [`check`] accepted.
///
/// # Panics
/// If `record` is shorter than a record's header and trailer.
pub fn payload_range(record: &[u8]) -> std::ops::Range<usize> {
    let start = if record.first() == Some(&SHORT_MARKER) { SHORT_HEADER_LEN } else { HEADER_LEN };
    start..record.len() - TRAILER_LEN
}

/// The payload of a record that [`check`] accepted.
///
/// # Panics
/// If `record` is shorter than a record's header and trailer.
pub fn payload(record: &[u8]) -> &[u8] {
    &record[payload_range(record)]
}

/// Checks a whole record read back from a tier against what the index expects.
///
/// Verifies the header, that the record is exactly header, payload and trailer long, that
/// it belongs to `expected_id` and, when `verify_payload` is set, the payload's checksum.
/// A short record is always checked whole: its checksum is its only check (and covers at
/// most 266 bytes). Returns the header; the payload is [`payload`]`(record)`.
pub fn check(record: &[u8], expected_id: ObjectId, verify_payload: bool) -> Result<RecordHeader, String> {
    if record.first() == Some(&SHORT_MARKER) {
        return check_short(record, expected_id);
    }
    let header = RecordHeader::decode(record)?;
    if header.payload_len <= SHORT_MAX as u64 {
        return Err(format!(
            "a full record of a {}-byte payload, which is kept in a short record (damaged or forged)",
            header.payload_len
        ));
    }
    if header.object_id != expected_id {
        return Err(format!("record belongs to object {} instead of {}", header.object_id.0, expected_id.0));
    }
    // Compared as payload lengths, so a forged header cannot overflow the sum.
    let actual = record.len() as u64;
    if actual < OVERHEAD as u64 || actual - OVERHEAD as u64 != header.payload_len {
        return Err(format!(
            "record is {actual} bytes but its header announces a {}-byte payload (truncated, extended or forged)",
            header.payload_len
        ));
    }
    if verify_payload {
        let stored = u64::from_le_bytes(record[record.len() - TRAILER_LEN..].try_into().expect("8 bytes"));
        let sum = checksum(expected_id, payload(record));
        if sum != stored {
            return Err(format!("payload checksum {sum:#018x} does not match the stored {stored:#018x}"));
        }
    }
    Ok(header)
}

/// [`check`] of a short record.
fn check_short(record: &[u8], expected_id: ObjectId) -> Result<RecordHeader, String> {
    let len = record.len();
    if len < SHORT_OVERHEAD {
        return Err(format!("short record is {len} bytes, shorter than its header and trailer"));
    }
    let payload_len = usize::from(record[2]);
    if len - SHORT_OVERHEAD != payload_len {
        return Err(format!(
            "short record is {len} bytes but its header announces a {payload_len}-byte payload (truncated, \
             extended or forged)"
        ));
    }
    let stored = u64::from_le_bytes(record[len - TRAILER_LEN..].try_into().expect("8 bytes"));
    let sum = checksum(expected_id, &record[..len - TRAILER_LEN]);
    if sum != stored {
        return Err(format!(
            "short record checksum {sum:#018x} does not match the stored {stored:#018x} (damaged, or the record \
             of another object than {})",
            expected_id.0
        ));
    }
    if record[1] & !KNOWN_FLAGS != 0 {
        return Err(format!("unknown record flags {:#04x}", record[1]));
    }
    Ok(RecordHeader { flags: record[1], payload_len: payload_len as u64, object_id: expected_id })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_single_byte_flip_is_caught() {
        let id = ObjectId(7);
        let long: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        for (data, overhead) in [(&b"payload bytes"[..], SHORT_OVERHEAD), (&long[..], OVERHEAD)] {
            let rec = encode(id, FLAG_TYPED, data);
            assert_eq!(rec.len(), data.len() + overhead);
            assert_eq!(rec.len() as u64, record_len(data.len() as u64));
            let h = check(&rec, id, true).unwrap();
            assert_eq!(h.payload_len, data.len() as u64);
            assert_eq!(h.flags, FLAG_TYPED);
            assert_eq!(h.object_id, id);
            assert_eq!(payload(&rec), data);
            for i in 0..rec.len() {
                let mut bad = rec.clone();
                bad[i] ^= 0x40;
                assert!(check(&bad, id, true).is_err(), "{} bytes: flip at byte {i} went unnoticed", data.len());
            }
        }
    }

    #[test]
    fn truncation_and_wrong_id_are_caught() {
        let id = ObjectId(1);
        for len in [0, 100, SHORT_MAX, SHORT_MAX + 1, 1000] {
            let rec = encode(id, 0, &vec![9u8; len]);
            for cut in [0, 1, 2, 3, 10, 31, 32, rec.len() / 2, rec.len() - 1].into_iter().filter(|&c| c < rec.len()) {
                // Unverified or not: a short record is always checked whole.
                assert!(check(&rec[..cut], id, false).is_err(), "{len} bytes cut to {cut}");
            }
            assert!(check(&rec, ObjectId(2), false).is_err(), "{len} bytes under another id");
            let mut longer = rec.clone();
            longer.push(0);
            assert!(check(&longer, id, false).is_err(), "{len} bytes extended");
        }
    }

    #[test]
    fn the_payload_length_alone_chooses_the_form() {
        for len in [0, 1, 51, SHORT_MAX - 1, SHORT_MAX, SHORT_MAX + 1, 4096] {
            let rec = encode(ObjectId(3), 1, &vec![5u8; len]);
            assert_eq!(rec[0] == SHORT_MARKER, len <= SHORT_MAX, "{len} bytes");
            assert_eq!(payload_len(rec.len() as u64), Some(len as u64), "{len} bytes");
            assert_eq!(&rec[payload_range(&rec)], &vec![5u8; len][..]);
        }
        // The record of a 50-byte string fits one cache line.
        assert_eq!(record_len(51), 62);
        // Lengths between the forms' longest short and shortest full record: none.
        for len in (SHORT_MAX + SHORT_OVERHEAD) as u64 + 1..(SHORT_MAX + 1 + OVERHEAD) as u64 {
            assert_eq!(payload_len(len), None, "{len}");
        }
        for len in [0, 1, 10] {
            assert_eq!(payload_len(len), None, "{len}");
        }
        assert_eq!(record_len(u64::MAX), u64::MAX);
        // A full record of a payload that has a short one: refused, however well sealed.
        let mut full = RecordHeader { flags: 0, payload_len: 5, object_id: ObjectId(3) }.encode().to_vec();
        full.extend_from_slice(b"hello");
        full.extend_from_slice(&checksum(ObjectId(3), b"hello").to_le_bytes());
        let err = check(&full, ObjectId(3), true).unwrap_err();
        assert!(err.contains("short record"), "{err}");
    }

    #[test]
    fn a_forged_payload_length_is_refused_not_overflowed() {
        // Found by the `record` fuzz target: a valid header whose payload length makes
        // header + payload + trailer wrap around to the record's real length.
        for payload_len in [u64::MAX, u64::MAX - 7, u64::MAX - 39, u64::MAX - 40, 1 << 62] {
            let header = RecordHeader { flags: 0, payload_len, object_id: ObjectId(7) }.encode();
            assert!(check(&header, ObjectId(7), true).is_err(), "{payload_len}");
            assert!(check(&header, ObjectId(7), false).is_err(), "{payload_len}");
            let mut longer = header.to_vec();
            longer.extend_from_slice(&[0u8; 8]);
            assert!(check(&longer, ObjectId(7), true).is_err(), "{payload_len}");
        }
        assert_eq!(RecordHeader { flags: 0, payload_len: u64::MAX, object_id: ObjectId(1) }.record_len(), u64::MAX);
    }

    #[test]
    fn streamed_records_match_and_lengths_are_enforced() {
        let data: Vec<u8> = (0..(PIECE + 1000) as u32).map(|i| (i * 31) as u8).collect();
        let mut streamed = Vec::new();
        let mut w = RecordWriter::new(&mut streamed, ObjectId(3), 0, data.len() as u64).unwrap();
        for piece in data.chunks(7777) {
            io::Write::write_all(&mut w, piece).unwrap();
        }
        w.finish().unwrap();
        assert_eq!(streamed, encode(ObjectId(3), 0, &data));
        // Up to one piece, `write_record` checksums in one call: the same record, of either form.
        for len in [0, 50, SHORT_MAX, SHORT_MAX + 1, PIECE] {
            let mut streamed = Vec::new();
            let mut w = RecordWriter::new(&mut streamed, ObjectId(4), 1, len as u64).unwrap();
            io::Write::write_all(&mut w, &data[..len]).unwrap();
            w.finish().unwrap();
            assert_eq!(streamed, encode(ObjectId(4), 1, &data[..len]), "{len} bytes");
        }

        let mut out = Vec::new();
        let w = RecordWriter::new(&mut out, ObjectId(3), 0, 10).unwrap();
        assert!(w.finish().is_err(), "a short payload is refused");
        let mut w = RecordWriter::new(&mut out, ObjectId(3), 0, 1).unwrap();
        assert!(io::Write::write_all(&mut w, b"ab").is_err(), "a long payload is refused");
    }

    #[test]
    fn the_checksum_is_xxh3_64_seeded_with_the_id_however_it_is_computed() {
        // The record format names XXH3-64: every implementation and path must agree with
        // the reference one, so records written by any version stay readable.
        let data: Vec<u8> = (0..(3 * PIECE + 17) as u64).map(|i| (i * 31 % 251) as u8).collect();
        for len in [0, 1, 3, 4, 8, 9, 16, 17, 128, 129, 240, 241, 1024, 65_537, PIECE + 1, data.len()] {
            let d = &data[..len];
            let reference = xxhash_rust::xxh3::xxh3_64_with_seed(d, 99);
            assert_eq!(checksum(ObjectId(99), d), reference, "one shot, {len} bytes");
            let mut out = Vec::new();
            write_record(&mut out, ObjectId(99), 0, d).unwrap();
            let trailer = u64::from_le_bytes(out[out.len() - TRAILER_LEN..].try_into().unwrap());
            // A short record's checksum covers its header as well as the payload.
            let covered = if len <= SHORT_MAX { &out[..out.len() - TRAILER_LEN] } else { d };
            let reference = xxhash_rust::xxh3::xxh3_64_with_seed(covered, 99);
            assert_eq!(trailer, reference, "write_record, {len} bytes");
        }
    }
}
