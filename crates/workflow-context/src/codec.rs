//! Typed values: postcard, written straight into the tier's memory.

use std::io::Write;

use context_core::record::{self, FLAG_TYPED, RecordWriter};
use context_core::{Error, ObjectId, Result};
use postcard::ser_flavors::Flavor;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A postcard flavor that only counts bytes, so a value's size is known before any buffer
/// is allocated and it can be serialized straight into its final place.
struct Counter(usize);

impl Flavor for Counter {
    type Output = usize;

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0 += data.len();
        Ok(())
    }

    fn try_push(&mut self, _: u8) -> postcard::Result<()> {
        self.0 += 1;
        Ok(())
    }

    fn finalize(self) -> postcard::Result<usize> {
        Ok(self.0)
    }
}

/// The length of `value`'s postcard encoding.
pub(crate) fn encoded_len<T: Serialize + ?Sized>(value: &T, key: &str) -> Result<usize> {
    postcard::serialize_with_flavor(value, Counter(0)).map_err(|e| codec_err(key, "encode", e))
}

/// Values up to this many bytes are encoded on the stack and written to the tier at once.
const SMALL: usize = 512;

/// Writes the record of `value` as object `id` into `out`; `len` is the length of the
/// value's encoding ([`encoded_len`]), which the record's header announces. A small value is
/// encoded on the stack and its record written at once, checksummed in one call; a larger
/// one is encoded through a buffer of up to 64 KiB into a [`RecordWriter`], which checksums
/// it as it goes (a buffer as large for every value made each small save allocate and free
/// 64 KiB, and the streaming checksum's state is an allocation of its own).
pub(crate) fn write_record<T: Serialize + ?Sized>(
    value: &T,
    len: usize,
    id: ObjectId,
    out: &mut dyn Write,
    key: &str,
) -> Result<()> {
    let stream = |e: std::io::Error| Error::io("stream value into", format!("object {id}"), e);
    let write_err = |e: std::io::Error| Error::Codec { key: key.to_owned(), op: "encode", message: e.to_string() };
    if len <= SMALL {
        let mut buf = [0u8; SMALL];
        let encoded = postcard::to_slice(value, &mut buf).map_err(|e| codec_err(key, "encode", e))?;
        if encoded.len() != len {
            return Err(Error::Codec {
                key: key.to_owned(),
                op: "encode",
                message: format!(
                    "the value encoded to {} bytes, then to {len}: its encoding is not stable",
                    encoded.len()
                ),
            });
        }
        return record::write_record(out, id, FLAG_TYPED, encoded).map_err(stream);
    }
    let mut rec = RecordWriter::new(out, id, FLAG_TYPED, len as u64).map_err(stream)?;
    let mut buffered = std::io::BufWriter::with_capacity(len.min(64 << 10), &mut rec);
    postcard::to_io(value, &mut buffered).map_err(|e| codec_err(key, "encode", e))?;
    buffered.flush().map_err(write_err)?;
    drop(buffered);
    rec.finish().map_err(stream)
}

/// Decodes a value, requiring every byte to be used (trailing bytes mean the wrong type).
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8], key: &str) -> Result<T> {
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|e| codec_err(key, "decode", e))?;
    if !rest.is_empty() {
        return Err(Error::Codec {
            key: key.to_owned(),
            op: "decode",
            message: format!("{} bytes left over after decoding: the value was saved as another type", rest.len()),
        });
    }
    Ok(value)
}

fn codec_err(key: &str, op: &'static str, e: postcard::Error) -> Error {
    Error::Codec { key: key.to_owned(), op, message: e.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measured_length_matches_encoding() {
        // Small (encoded on the stack), at the edge, and large (through the buffer).
        for floats in [3, (SMALL - 20) / 4, 100_000] {
            let v = (String::from("a prompt"), vec![1.5f32; floats], Some(7u64));
            let n = encoded_len(&v, "k").unwrap();
            assert_eq!(n, postcard::to_stdvec(&v).unwrap().len());
            let mut buf = Vec::new();
            write_record(&v, n, ObjectId(5), &mut buf, "k").unwrap();
            let header = record::check(&buf, ObjectId(5), true).unwrap();
            assert_eq!((header.payload_len, header.flags), (n as u64, FLAG_TYPED));
            let back: (String, Vec<f32>, Option<u64>) = decode(record::payload(&buf), "k").unwrap();
            assert_eq!(back, v);
        }
    }

    #[test]
    fn wrong_type_is_a_codec_error() {
        let bytes = postcard::to_stdvec(&(1u8, 2u8, 3u8)).unwrap();
        assert!(matches!(decode::<u8>(&bytes, "k"), Err(Error::Codec { .. })));
        assert!(matches!(decode::<String>(&[200], "k"), Err(Error::Codec { .. })));
    }
}
