//! Blob responses: 200, 206 with `Content-Range`, or the unsatisfiable
//! range error (rendered at the HTTP edge as 416), with the blob headers
//! (`Content-Type`, `Accept-Ranges`, `Docker-Content-Digest`, `ETag`).

use std::fs::File;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};

use super::range::ByteRange;
use super::reader::{Delivery, Feed, file_body};
use crate::body::{self, Body};
use crate::error::Error;
use crate::oci::Digest;
use crate::oci::headers::DOCKER_CONTENT_DIGEST;

/// The headers every blob response carries.
fn set_blob_headers(h: &mut HeaderMap, digest: &Digest) {
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&digest.to_string()) {
        h.insert(DOCKER_CONTENT_DIGEST, v);
        if let Ok(etag) = HeaderValue::from_str(&format!("\"{digest}\"")) {
            h.insert(header::ETAG, etag);
        }
    }
}

/// A 200/206 response for a blob of known `size` whose bytes come from
/// `file`, either complete (`feed` is `None`) or from a fill; an error for
/// an unsatisfiable range.
pub(super) fn file_response(
    digest: &Digest,
    file: Option<Arc<File>>,
    size: u64,
    range: Option<ByteRange>,
    head_only: bool,
    feed: Option<Feed>,
    delivery: Delivery,
) -> Result<Response<Body>, Error> {
    let (start, end, status) = match range {
        None => (0, size, StatusCode::OK),
        Some(r) => match r.resolve(size) {
            Some((s, e)) => (s, e, StatusCode::PARTIAL_CONTENT),
            None => return Err(Error::range_invalid(size)),
        },
    };
    let body = if head_only {
        body::empty()
    } else {
        file_body(file, start, Some(end), feed, delivery)
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    set_blob_headers(h, digest);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {}-{}/{size}", start, end - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    Ok(response)
}

/// The whole blob of a fill whose size upstream did not give, streamed
/// chunked (a range cannot be resolved without the size, so it is ignored).
pub(super) fn unsized_response(
    digest: &Digest,
    file: Option<Arc<File>>,
    feed: Feed,
    delivery: Delivery,
) -> Response<Body> {
    let mut response = Response::new(file_body(file, 0, None, Some(feed), delivery));
    set_blob_headers(response.headers_mut(), digest);
    response
}

/// The answer to `HEAD` on a blob: its headers, and its length when known.
pub(super) fn head_response(digest: &Digest, size: Option<u64>) -> Response<Body> {
    let mut response = Response::new(body::empty());
    set_blob_headers(response.headers_mut(), digest);
    if let Some(size) = size {
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    response
}
