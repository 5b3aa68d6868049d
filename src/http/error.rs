//! OCI error responses, rendered in this one place.
//!
//! Every failure a client sees is an [`Error`] turned into an HTTP status,
//! an OCI error code and `{"errors":[{"code":..,"message":..,"detail":null}]}`.
//! Upstream 404s become `*_UNKNOWN` (never a 500); upstream failures are
//! `UNAVAILABLE` (503 when upstream cannot be reached, 502 otherwise, an
//! upstream 401 included); local failures are 500 `UNKNOWN`. The only 401
//! is the mirror's own, with its `WWW-Authenticate` challenge.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{self, Body};
use crate::error::{Error, ErrorKind};

/// The HTTP status and OCI error code of `e`.
pub(crate) fn status_and_code(e: &Error) -> (StatusCode, &'static str) {
    use ErrorKind as K;
    match e.kind() {
        K::NameInvalid => (StatusCode::BAD_REQUEST, "NAME_INVALID"),
        K::TagInvalid => (StatusCode::BAD_REQUEST, "TAG_INVALID"),
        K::DigestInvalid => (StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
        K::Unsupported { .. } => (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
        // The OCI codes have none for "no such route"; a path outside the
        // pull API asks for an operation the mirror does not support.
        K::RouteUnknown => (StatusCode::NOT_FOUND, "UNSUPPORTED"),
        // Only the mirror's own challenge is a 401: a client can answer
        // it. Upstream refusing the mirror's credentials is a failure of
        // the mirror (502, the reason in the message), after which dockerd
        // and containerd fall back to the registry itself.
        K::Unauthorized { .. } => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
        K::RangeInvalid { .. } => (StatusCode::RANGE_NOT_SATISFIABLE, "RANGE_INVALID"),
        K::NameUnknown => (StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
        K::BlobUnknown => (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"),
        K::ManifestUnknown => (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
        K::Denied => (StatusCode::FORBIDDEN, "DENIED"),
        K::TooManyRequests { .. } => (StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS"),
        K::Unreachable | K::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        K::UpstreamStatus { .. }
        | K::UpstreamUnauthorized
        | K::UpstreamAuth { .. }
        | K::UpstreamProtocol
        | K::BodyBroken
        | K::DigestMismatch => (StatusCode::BAD_GATEWAY, "UNAVAILABLE"),
        K::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN"),
    }
}

/// The JSON body.
pub(crate) fn body(e: &Error) -> Bytes {
    let (_, code) = status_and_code(e);
    let v = serde_json::json!({
        "errors": [{"code": code, "message": e.message(), "detail": null}]
    });
    Bytes::from(v.to_string())
}

/// `e` as an HTTP response (headers only when `head_only`, with the length
/// the body would have).
pub(crate) fn response(e: &Error, head_only: bool) -> Response<Body> {
    let (status, _) = status_and_code(e);
    let bytes = body(e);
    let length = bytes.len();
    let mut resp = Response::new(if head_only {
        body::empty()
    } else {
        body::full(bytes)
    });
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    match e.kind() {
        ErrorKind::TooManyRequests {
            retry_after: Some(r),
        }
        | ErrorKind::UpstreamStatus {
            retry_after: Some(r),
            ..
        } => {
            h.insert(header::RETRY_AFTER, r.clone());
        }
        ErrorKind::Unsupported { reads } => {
            // RFC 9110 section 15.5.6: a 405 lists the methods allowed
            // (none, on an upload).
            let allow = if *reads { "GET, HEAD" } else { "" };
            h.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        ErrorKind::Unauthorized { challenge } => {
            h.insert(header::WWW_AUTHENTICATE, challenge.clone());
        }
        ErrorKind::RangeInvalid { size } => {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
        }
        _ => {}
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Asked;

    fn oci(e: &Error) -> (u16, &'static str) {
        let (s, c) = status_and_code(e);
        (s.as_u16(), c)
    }

    #[test]
    fn upstream_statuses_map_to_oci_codes() {
        let e = Error::upstream_status(StatusCode::NOT_FOUND, Asked::Blob, None, "x");
        assert_eq!(oci(&e), (404, "BLOB_UNKNOWN"));
        let e = Error::upstream_status(StatusCode::NOT_FOUND, Asked::Manifest, None, "x");
        assert_eq!(oci(&e), (404, "MANIFEST_UNKNOWN"));
        let ra = HeaderValue::from_static("30");
        let e = Error::upstream_status(
            StatusCode::TOO_MANY_REQUESTS,
            Asked::Manifest,
            Some(&ra),
            "x",
        );
        assert_eq!(oci(&e), (429, "TOOMANYREQUESTS"));
        assert_eq!(
            response(&e, false).headers().get(header::RETRY_AFTER),
            Some(&ra)
        );
        let e = Error::upstream_status(StatusCode::FORBIDDEN, Asked::Blob, None, "x");
        assert_eq!(oci(&e), (403, "DENIED"));
        let e = Error::upstream_status(StatusCode::UNAUTHORIZED, Asked::Blob, None, "x");
        assert_eq!(oci(&e), (502, "UNAVAILABLE"));
        assert!(
            response(&e, false)
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .is_none()
        );
        let e = Error::upstream_status(StatusCode::INTERNAL_SERVER_ERROR, Asked::Blob, None, "x");
        assert_eq!(oci(&e).0, 502);
    }

    #[test]
    fn body_is_oci_json() {
        let e = Error::from(crate::oci::RepoName::parse("Bad").unwrap_err());
        let v: serde_json::Value = serde_json::from_slice(&body(&e)).unwrap();
        assert_eq!(v["errors"][0]["code"], "NAME_INVALID");
        assert_eq!(v["errors"][0]["message"], "invalid repository name \"Bad\"");
    }
}
