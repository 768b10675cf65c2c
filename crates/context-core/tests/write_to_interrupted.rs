#![allow(missing_docs)]
use std::io;

use context_core::{NewObject, ObjectData, ObjectId};

/// A sink that is interrupted (EINTR) once, then takes everything: `write_all` retries.
struct InterruptedOnce {
    out: Vec<u8>,
    interrupted: bool,
}

impl io::Write for InterruptedOnce {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.interrupted {
            self.interrupted = true;
            return Err(io::Error::from(io::ErrorKind::Interrupted));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn an_interrupted_write_that_write_all_retries_is_not_a_failure() {
    let bytes = vec![7u8; 100];
    let parts: [&[u8]; 1] = [&bytes];
    let mut sink = InterruptedOnce { out: Vec::new(), interrupted: false };
    let mut object = NewObject { id: ObjectId(1), len: 100, data: ObjectData::Parts(&parts) };
    let result = object.write_to(&mut sink);
    assert_eq!(sink.out, bytes, "every byte reached the sink");
    assert!(result.is_ok(), "a retried EINTR was reported as {result:?}");
}
