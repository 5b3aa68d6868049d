//! The HTTP edge of the registry API: routing a request to an upstream,
//! ranges, request ids, response bodies.

pub mod body;
pub mod range;
pub mod request_id;
pub mod routing;
