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
