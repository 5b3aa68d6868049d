//! Request ids: one per client request, in its log lines and returned as
//! `X-Request-Id`.
//!
//! A sane incoming `X-Request-Id` (set by a load balancer or the client) is
//! kept, so one id follows a request across hops. Otherwise the id is a
//! random per-process prefix and a counter (`5f3a9c1e-42`): unique within
//! the process, and across restarts and replicas with high probability.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderMap;

/// The header carrying the id, in requests and responses.
pub(crate) const HEADER: &str = "x-request-id";

/// Longest incoming id kept.
const MAX_LEN: usize = 128;

/// Whether an incoming id may be reused: 1 to 128 characters from
/// `[A-Za-z0-9._:-]`, so it is safe in logs and headers.
pub(crate) fn is_sane(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Generates request ids for one server.
#[derive(Debug)]
pub(crate) struct RequestIds {
    prefix: String,
    next: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        RequestIds::new()
    }
}

impl RequestIds {
    /// A generator with a fresh random prefix.
    pub(crate) fn new() -> RequestIds {
        // RandomState is seeded from the OS's randomness: no extra crate.
        let seed = std::collections::hash_map::RandomState::new()
            .hash_one((std::process::id(), std::time::SystemTime::now()));
        RequestIds {
            prefix: format!("{:08x}", seed as u32),
            next: AtomicU64::new(1),
        }
    }

    /// A new id.
    pub(crate) fn generate(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.prefix)
    }

    /// The request's own `X-Request-Id` if it is sane, else a new id.
    pub(crate) fn for_request(&self, headers: &HeaderMap) -> String {
        match headers.get(HEADER).and_then(|v| v.to_str().ok()) {
            Some(id) if is_sane(id) => id.to_string(),
            _ => self.generate(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_unique_and_sane() {
        let ids = RequestIds::new();
        let a = ids.generate();
        let b = ids.generate();
        assert_ne!(a, b);
        assert!(is_sane(&a) && is_sane(&b), "{a} {b}");
        assert_ne!(RequestIds::new().prefix, RequestIds::new().prefix);
    }

    #[test]
    fn incoming_ids() {
        let ids = RequestIds::new();
        let mut h = HeaderMap::new();
        h.insert(HEADER, "lb-7f3a:01.x_y".parse().unwrap());
        assert_eq!(ids.for_request(&h), "lb-7f3a:01.x_y");
        for bad in [
            "",
            "has space",
            "new\u{7f}line",
            "quote\"",
            "x".repeat(129).as_str(),
        ] {
            if let Ok(v) = bad.parse() {
                h.insert(HEADER, v);
                let id = ids.for_request(&h);
                assert_ne!(id, bad);
                assert!(id.starts_with(&ids.prefix), "{id}");
            }
        }
        assert!(ids.for_request(&HeaderMap::new()).starts_with(&ids.prefix));
    }
}
