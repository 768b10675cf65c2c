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
    // A value whose second encoding (the write) is not as long as its first (the count).
    let unstable = |then: String| Error::Codec {
        key: key.to_owned(),
        op: "encode",
        message: format!("the value encoded to {len} bytes, then to {then}: its encoding is not stable"),
    };
    if len <= SMALL {
        let mut buf = [0u8; SMALL];
        let encoded = match postcard::to_slice(value, &mut buf) {
            Ok(encoded) => encoded,
            Err(postcard::Error::SerializeBufferFull) => return Err(unstable(format!("more than {SMALL}"))),
            Err(e) => return Err(codec_err(key, "encode", e)),
        };
        if encoded.len() != len {
            return Err(unstable(encoded.len().to_string()));
        }
        return record::write_record(out, id, FLAG_TYPED, encoded).map_err(stream);
    }
    let mut rec = RecordWriter::new(out, id, FLAG_TYPED, len as u64).map_err(stream)?;
    let mut tally = Tally { inner: &mut rec, written: 0, limit: len as u64, over: false };
    let mut buffered = std::io::BufWriter::with_capacity(len.min(64 << 10), &mut tally);
    let encoded = postcard::to_io(value, &mut buffered).map(drop);
    let flushed = buffered.flush();
    drop(buffered);
    // Checked first: the record refuses what is past its length, which postcard reports
    // only as a full buffer.
    if tally.over {
        return Err(unstable(format!("more than {len}")));
    }
    encoded.map_err(|e| codec_err(key, "encode", e))?;
    flushed.map_err(write_err)?;
    if tally.written < len as u64 {
        return Err(unstable(tally.written.to_string()));
    }
    rec.finish().map_err(stream)
}

/// Counts the bytes of a value's encoding that reach its record, and notes an encoding
/// longer than the record.
struct Tally<'w> {
    inner: &'w mut dyn Write,
    written: u64,
    limit: u64,
    over: bool,
}

impl Write for Tally<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written + buf.len() as u64 > self.limit {
            self.over = true;
        }
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
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

    /// A value that encodes to `first` bytes, then to `then`.
    struct Unstable(std::cell::Cell<bool>, usize, usize);

    impl Serialize for Unstable {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeTuple;
            let n = if self.0.replace(true) { self.2 } else { self.1 };
            let mut t = s.serialize_tuple(n)?;
            for _ in 0..n {
                t.serialize_element(&1u8)?;
            }
            t.end()
        }
    }

    #[test]
    fn an_encoding_that_changes_length_says_so() {
        // Below and above the stack buffer, shorter and longer the second time (it was "The
        // serialize buffer is full", or an I/O error of a missing payload, or the two
        // lengths the other way round).
        for (first, then) in [(100, 200), (200, 100), (100, 1000), (1000, 2000), (2000, 1000), (100_000, 70_000)] {
            let value = Unstable(false.into(), first, then);
            let len = encoded_len(&value, "k").unwrap();
            assert_eq!(len, first);
            let err = write_record(&value, len, ObjectId(1), &mut Vec::new(), "k").unwrap_err();
            let Error::Codec { key, op: "encode", message } = &err else { panic!("{first} then {then}: {err:?}") };
            assert_eq!(key, "k");
            let then = match (first <= SMALL, then) {
                (true, then) if then > SMALL => format!("more than {SMALL}"),
                (false, then) if then > first => format!("more than {first}"),
                (_, then) => then.to_string(),
            };
            let expected = format!("the value encoded to {first} bytes, then to {then}: its encoding is not stable");
            assert_eq!(message, &expected);
        }
    }

    #[test]
    fn wrong_type_is_a_codec_error() {
        let bytes = postcard::to_stdvec(&(1u8, 2u8, 3u8)).unwrap();
        assert!(matches!(decode::<u8>(&bytes, "k"), Err(Error::Codec { .. })));
        assert!(matches!(decode::<String>(&[200], "k"), Err(Error::Codec { .. })));
    }
}
