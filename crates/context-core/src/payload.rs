//! [`Payload`]: the bytes of a loaded value, owned or mapped.

use std::fmt;
use std::ops::{Deref, Range};
use std::sync::Arc;

/// The bytes of a loaded value.
///
/// A payload is either a zero-copy view of a mapping (a shared-memory segment or a mapped
/// file, kept alive for as long as any clone of the payload lives, even after the value is
/// overwritten or removed) or an owned buffer. Cloning is cheap: it shares the bytes.
///
/// ```
/// use context_core::Payload;
/// let p = Payload::from_vec(b"hello world".to_vec());
/// assert_eq!(&*p, b"hello world");
/// assert_eq!(&*p.slice(6..11), b"world");
/// ```
#[derive(Clone)]
pub struct Payload {
    bytes: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
}

impl Payload {
    /// Wraps an owned buffer.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        let len = bytes.len();
        Payload { bytes: Arc::new(bytes), range: 0..len }
    }

    /// Wraps shared bytes, such as a memory mapping, without copying them.
    pub fn from_shared(bytes: Arc<dyn AsRef<[u8]> + Send + Sync>) -> Self {
        let len = (*bytes).as_ref().len();
        Payload { bytes, range: 0..len }
    }

    /// A view of part of this payload, sharing its bytes.
    ///
    /// # Panics
    /// If `range` is out of bounds, like slicing.
    #[must_use]
    pub fn slice(&self, range: Range<usize>) -> Self {
        assert!(
            range.start <= range.end && range.end <= self.range.len(),
            "payload slice {range:?} out of bounds (len {})",
            self.range.len()
        );
        Payload { bytes: Arc::clone(&self.bytes), range: self.range.start + range.start..self.range.start + range.end }
    }

    /// The bytes as a slice.
    pub fn as_slice(&self) -> &[u8] {
        &(*self.bytes).as_ref()[self.range.clone()]
    }

    /// Copies the bytes into a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        self.as_slice().to_vec()
    }
}

impl Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsRef<[u8]> for Payload {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Payload {}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Payload").field("len", &self.range.len()).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_nest() {
        let p = Payload::from_vec((0u8..100).collect());
        let s = p.slice(10..50).slice(5..10);
        assert_eq!(&*s, &[15, 16, 17, 18, 19]);
        assert_eq!(s.len(), 5);
        assert_eq!(format!("{s:?}"), "Payload { len: 5, .. }");
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn slice_out_of_bounds_panics() {
        let _ = Payload::from_vec(vec![1, 2, 3]).slice(2..4);
    }

    #[test]
    fn shared_payload_is_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Payload>();
        let shared: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new([1u8, 2, 3]);
        assert_eq!(&*Payload::from_shared(shared), &[1, 2, 3]);
    }
}
