//! Entry points for the coverage-guided fuzz targets in `fuzz/` (afl.rs),
//! behind the `fuzzing` feature and hidden from the docs: each takes the
//! raw input bytes, calls one parser the way the server does, and asserts
//! what must hold of its result (a failed assertion is a crash to the
//! fuzzer, like a panic in the parser itself).
//!
//! It keeps the library's public surface unchanged: the parsers stay
//! `pub(crate)`, and this module exists only when the feature is enabled
//! (never in a release build).

use std::path::Path;

use crate::cache::blob::range;
use crate::front::access::Htpasswd;
use crate::oci::manifest::refs_of;
use crate::oci::{Digest, Reference, Route, parse_route};
use crate::upstream::parse_challenges;

/// A request path, as `http::routes::handle` parses it. A parsed
/// reference or digest prints back to text that parses to the same value.
pub fn route(data: &[u8]) {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    match parse_route(path) {
        Ok(Route::Manifest { reference, .. }) => {
            let again = Reference::parse(&reference.to_string());
            assert_eq!(again.as_ref(), Ok(&reference));
        }
        Ok(Route::Blob { digest, .. } | Route::Referrers { digest, .. }) => {
            assert_eq!(Digest::parse(&digest.to_string()).as_ref(), Ok(&digest));
        }
        _ => {}
    }
}

/// A `Range` header against a blob size (the first 8 bytes, big-endian):
/// a satisfiable range resolves to a non-empty span within the blob.
pub fn range(data: &[u8]) {
    if data.len() < 8 {
        return;
    }
    let size = u64::from_be_bytes(data[..8].try_into().unwrap_or_default());
    let Ok(value) = std::str::from_utf8(&data[8..]) else {
        return;
    };
    if let Some(r) = range::parse(value)
        && let Some((start, end)) = r.resolve(size)
    {
        assert!(
            start < end,
            "{value:?} on {size}: empty span {start}..{end}"
        );
        assert!(
            end <= size,
            "{value:?} on {size}: {start}..{end} past the end"
        );
    }
}

/// A `WWW-Authenticate` value from an upstream.
pub fn www_authenticate(data: &[u8]) {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_challenges(value);
}

/// A configuration file (parsing and validation; nothing is read from
/// disk or bound).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = crate::config::Config::from_toml_str(text);
}

/// A manifest body, as pins and `stowage cache purge` read it: every
/// digest found prints back to itself.
pub fn refs_of_manifest(data: &[u8]) {
    let refs = refs_of(data);
    for d in refs.manifests.iter().chain(&refs.blobs) {
        assert_eq!(Digest::parse(&d.to_string()).as_ref(), Ok(d));
    }
}

/// An htpasswd file, as `[access]` loads it (with its dummy hash for
/// unknown users).
pub fn htpasswd(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = Htpasswd::parse(Path::new("htpasswd"), &text);
}
