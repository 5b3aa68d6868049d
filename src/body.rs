//! The response body type shared by every handler, and small constructors.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};

/// Every response body: a boxed stream of byte frames whose error aborts the
/// response (the connection is cut, so a client never sees a clean EOF).
pub(crate) type Body = BoxBody<Bytes, std::io::Error>;

/// A body holding `bytes`.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body (HEAD responses, 304s).
pub(crate) fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Test only: a read buffer of `len` bytes starting with `prefix` (the rest
/// spaces), as hyper hands out slices of, whose bytes count in `live` for
/// as long as any slice of it is kept.
#[cfg(test)]
pub(crate) fn tracked_buffer(
    len: usize,
    prefix: &[u8],
    live: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Bytes {
    use std::sync::atomic::Ordering;
    struct Buffer(Vec<u8>, std::sync::Arc<std::sync::atomic::AtomicUsize>);
    impl AsRef<[u8]> for Buffer {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }
    impl Drop for Buffer {
        fn drop(&mut self) {
            self.1.fetch_sub(self.0.len(), Ordering::Relaxed);
        }
    }
    let mut data = vec![b' '; len.max(prefix.len())];
    data[..prefix.len()].copy_from_slice(prefix);
    live.fetch_add(data.len(), Ordering::Relaxed);
    Bytes::from_owner(Buffer(data, live.clone()))
}
