//! The value record: the bytes a tier stores for one value.
//!
//! Every object a tier holds is a record: a 32-byte header followed by the payload.
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0  | 4 | magic `WFCV` |
//! | 4  | 1 | format version (1) |
//! | 5  | 1 | flags (bit 0: the payload is a postcard-encoded typed value) |
//! | 6  | 2 | reserved, zero |
//! | 8  | 8 | payload length, little endian |
//! | 16 | 8 | object id, little endian |
//! | 24 | 8 | checksum: XXH3-64 of the payload, seeded with the object id |
//!
//! The payload starts at offset 32, so a page-aligned object keeps its payload 32-byte
//! aligned. Seeding the checksum with the object id means a record copied under another
//! object's name fails its check.

use crate::tier::ObjectId;
use xxhash_rust::xxh3::{Xxh3, xxh3_64_with_seed};

/// Length of the record header in bytes.
pub const HEADER_LEN: usize = 32;
/// The record magic.
pub const MAGIC: [u8; 4] = *b"WFCV";
/// The record format version written by this crate.
pub const VERSION: u8 = 1;
/// Flag: the payload is a postcard-encoded typed value (saved with `save`, not `save_bytes`).
pub const FLAG_TYPED: u8 = 1;
const KNOWN_FLAGS: u8 = FLAG_TYPED;

/// The decoded header of a value record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// Flags (see [`FLAG_TYPED`]).
    pub flags: u8,
    /// Length of the payload in bytes.
    pub payload_len: u64,
    /// The object this record belongs to.
    pub object_id: ObjectId,
    /// XXH3-64 of the payload seeded with the object id.
    pub checksum: u64,
}

impl RecordHeader {
    /// Length of the whole record (header and payload).
    pub fn record_len(&self) -> u64 {
        HEADER_LEN as u64 + self.payload_len
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4] = VERSION;
        h[5] = self.flags;
        h[8..16].copy_from_slice(&self.payload_len.to_le_bytes());
        h[16..24].copy_from_slice(&self.object_id.0.to_le_bytes());
        h[24..32].copy_from_slice(&self.checksum.to_le_bytes());
        h
    }

    /// Decodes and checks a header: magic, version, flags and reserved bytes.
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
        if h[4] != VERSION {
            return Err(format!("unsupported record version {}", h[4]));
        }
        if h[5] & !KNOWN_FLAGS != 0 || h[6] != 0 || h[7] != 0 {
            return Err(format!("unknown record flags {:#04x} {:#04x} {:#04x}", h[5], h[6], h[7]));
        }
        let word = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
        Ok(RecordHeader { flags: h[5], payload_len: word(8), object_id: ObjectId(word(16)), checksum: word(24) })
    }
}

/// The checksum of a payload stored as object `id`.
pub fn checksum(id: ObjectId, payload: &[u8]) -> u64 {
    xxh3_64_with_seed(payload, id.0)
}

/// A streaming [`checksum`], for payloads written in pieces.
#[derive(Clone)]
pub struct Checksum(Box<Xxh3>);

impl Checksum {
    /// Starts the checksum of object `id`.
    pub fn new(id: ObjectId) -> Self {
        Checksum(Box::new(Xxh3::with_seed(id.0)))
    }

    /// Adds the next piece of the payload.
    pub fn update(&mut self, piece: &[u8]) {
        self.0.update(piece);
    }

    /// The checksum of everything added.
    pub fn finish(&self) -> u64 {
        self.0.digest()
    }
}

/// Encodes a whole record for `payload` into a new buffer (for small values and tests).
pub fn encode(id: ObjectId, flags: u8, payload: &[u8]) -> Vec<u8> {
    let header = RecordHeader { flags, payload_len: payload.len() as u64, object_id: id, checksum: checksum(id, payload) };
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(payload);
    out
}

/// Checks a whole record read back from a tier against what the index expects.
///
/// Verifies the header, that the record is exactly header plus payload long, that it
/// belongs to `expected_id` and, when `verify_payload` is set, the payload's checksum.
/// Returns the header; the payload is `record[HEADER_LEN..]`.
pub fn check(record: &[u8], expected_id: ObjectId, verify_payload: bool) -> Result<RecordHeader, String> {
    let header = RecordHeader::decode(record)?;
    if header.object_id != expected_id {
        return Err(format!("record belongs to object {} instead of {}", header.object_id.0, expected_id.0));
    }
    let actual = (record.len() - HEADER_LEN) as u64;
    if actual != header.payload_len {
        return Err(format!("payload is {actual} bytes but its header says {} (truncated or extended)", header.payload_len));
    }
    if verify_payload {
        let sum = checksum(expected_id, &record[HEADER_LEN..]);
        if sum != header.checksum {
            return Err(format!("payload checksum {sum:#018x} does not match the stored {:#018x}", header.checksum));
        }
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_single_byte_flip_is_caught() {
        let id = ObjectId(7);
        let rec = encode(id, FLAG_TYPED, b"payload bytes");
        let h = check(&rec, id, true).unwrap();
        assert_eq!(h.payload_len, 13);
        assert_eq!(h.flags, FLAG_TYPED);
        for i in 0..rec.len() {
            let mut bad = rec.clone();
            bad[i] ^= 0x40;
            assert!(check(&bad, id, true).is_err(), "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn truncation_and_wrong_id_are_caught() {
        let id = ObjectId(1);
        let rec = encode(id, 0, &[9u8; 100]);
        for cut in [0, 1, 31, 32, 99, 131] {
            assert!(check(&rec[..cut], id, false).is_err(), "cut {cut}");
        }
        assert!(check(&rec, ObjectId(2), false).is_err());
        let mut longer = rec.clone();
        longer.push(0);
        assert!(check(&longer, id, false).is_err());
    }

    #[test]
    fn streaming_checksum_matches() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31) as u8).collect();
        let mut c = Checksum::new(ObjectId(3));
        for piece in data.chunks(777) {
            c.update(piece);
        }
        assert_eq!(c.finish(), checksum(ObjectId(3), &data));
    }
}
