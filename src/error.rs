//! OCI error responses, built in one place.
//!
//! Every failure a client sees is a [`RegistryError`]: an HTTP status, an OCI
//! error code and a message, rendered as
//! `{"errors":[{"code":..,"message":..,"detail":null}]}`.

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};

/// An error as the registry API reports it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct RegistryError {
    /// HTTP status of the response.
    pub status: StatusCode,
    /// OCI error code (`BLOB_UNKNOWN`, `NAME_INVALID`, ...).
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
    /// `Retry-After` passed on from upstream (429, 503).
    pub retry_after: Option<HeaderValue>,
    /// `WWW-Authenticate` challenge of a 401 from the mirror's own access
    /// control.
    pub challenge: Option<Box<HeaderValue>>,
}

impl RegistryError {
    /// An error with the given status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        RegistryError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            challenge: None,
        }
    }

    /// 401 UNAUTHORIZED with a `WWW-Authenticate` challenge: the client must
    /// authenticate to the mirror itself.
    pub fn unauthorized(message: impl Into<String>, challenge: HeaderValue) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message);
        e.challenge = Some(Box::new(challenge));
        e
    }

    /// 400 NAME_INVALID.
    pub fn name_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "NAME_INVALID", message)
    }

    /// 404 NAME_UNKNOWN.
    pub fn name_unknown(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NAME_UNKNOWN", message)
    }

    /// 400 DIGEST_INVALID.
    pub fn digest_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "DIGEST_INVALID", message)
    }

    /// 400 TAG_INVALID.
    pub fn tag_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "TAG_INVALID", message)
    }

    /// 405 UNSUPPORTED: the mirror is read-only.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", message)
    }

    /// 404 BLOB_UNKNOWN.
    pub fn blob_unknown(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", message)
    }

    /// 404 MANIFEST_UNKNOWN.
    pub fn manifest_unknown(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", message)
    }

    /// 416 with the blob size, for an unsatisfiable range.
    pub fn range_invalid(size: u64) -> Self {
        Self::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "RANGE_INVALID",
            format!("requested range not satisfiable for a blob of {size} bytes"),
        )
    }

    /// 502 UNAVAILABLE: upstream failed and nothing is cached.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "UNAVAILABLE", message)
    }

    /// 503 UNAVAILABLE: upstream unreachable and nothing is cached.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", message)
    }

    /// 500: a local failure (disk). Never used for upstream conditions.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", message)
    }

    /// Maps a non-success upstream status to what the client should see.
    /// `kind` is what was asked for, so a 404 becomes `BLOB_UNKNOWN` or
    /// `MANIFEST_UNKNOWN` (never a 500).
    pub fn from_upstream(
        status: StatusCode,
        kind: UpstreamKind,
        retry_after: Option<&HeaderValue>,
        what: &str,
    ) -> Self {
        let mut e = match status.as_u16() {
            404 => match kind {
                UpstreamKind::Blob => {
                    Self::blob_unknown(format!("blob unknown to upstream: {what}"))
                }
                UpstreamKind::Manifest => {
                    Self::manifest_unknown(format!("manifest unknown to upstream: {what}"))
                }
                UpstreamKind::Repository => {
                    Self::name_unknown(format!("repository unknown to upstream: {what}"))
                }
            },
            401 => Self::new(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                format!("upstream refused the mirror's credentials for {what}"),
            ),
            403 => Self::new(
                StatusCode::FORBIDDEN,
                "DENIED",
                format!("upstream denied access to {what}"),
            ),
            429 => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "TOOMANYREQUESTS",
                format!("upstream rate limit reached fetching {what}"),
            ),
            400..=499 => Self::new(
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
                format!("upstream answered {status} for {what}"),
            ),
            _ => Self::bad_gateway(format!("upstream answered {status} for {what}")),
        };
        if matches!(status.as_u16(), 429 | 503) {
            e.retry_after = retry_after.cloned();
        }
        e
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        let v = serde_json::json!({
            "errors": [{"code": self.code, "message": self.message, "detail": null}]
        });
        Bytes::from(v.to_string())
    }

    /// Headers and body as an HTTP response.
    pub fn into_response<B>(
        self,
        head_only: bool,
        body: impl FnOnce(Bytes) -> B,
    ) -> http::Response<B> {
        let bytes = self.body();
        let mut resp = http::Response::new(body(if head_only {
            Bytes::new()
        } else {
            bytes.clone()
        }));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        if let Some(r) = self.retry_after {
            h.insert(header::RETRY_AFTER, r);
        }
        if let Some(c) = self.challenge {
            h.insert(header::WWW_AUTHENTICATE, *c);
        }
        resp
    }
}

/// What an upstream request was for, to pick the right "unknown" code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamKind {
    /// A blob.
    Blob,
    /// A manifest.
    Manifest,
    /// Repository-level (tags list, referrers).
    Repository,
}

impl From<crate::oci::ParseError> for RegistryError {
    fn from(e: crate::oci::ParseError) -> Self {
        use crate::oci::Invalid;
        match e.invalid {
            Invalid::Name => Self::name_invalid(e.message),
            Invalid::Tag => Self::tag_invalid(e.message),
            Invalid::Digest => Self::digest_invalid(e.message),
            Invalid::Path => Self::unsupported(e.message),
        }
    }
}

impl From<crate::upstream::UpstreamError> for RegistryError {
    fn from(e: crate::upstream::UpstreamError) -> Self {
        use crate::upstream::UpstreamError as U;
        match e {
            U::Unreachable(m) => Self::unavailable(format!("upstream unreachable: {m}")),
            U::Auth(m) => Self::bad_gateway(format!("upstream authentication failed: {m}")),
            U::Protocol(m) => Self::bad_gateway(format!("upstream protocol error: {m}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_statuses_map_to_oci_codes() {
        let e = RegistryError::from_upstream(StatusCode::NOT_FOUND, UpstreamKind::Blob, None, "x");
        assert_eq!((e.status.as_u16(), e.code), (404, "BLOB_UNKNOWN"));
        let e =
            RegistryError::from_upstream(StatusCode::NOT_FOUND, UpstreamKind::Manifest, None, "x");
        assert_eq!((e.status.as_u16(), e.code), (404, "MANIFEST_UNKNOWN"));
        let ra = HeaderValue::from_static("30");
        let e = RegistryError::from_upstream(
            StatusCode::TOO_MANY_REQUESTS,
            UpstreamKind::Manifest,
            Some(&ra),
            "x",
        );
        assert_eq!((e.status.as_u16(), e.code), (429, "TOOMANYREQUESTS"));
        assert_eq!(e.retry_after, Some(ra));
        let e = RegistryError::from_upstream(StatusCode::FORBIDDEN, UpstreamKind::Blob, None, "x");
        assert_eq!((e.status.as_u16(), e.code), (403, "DENIED"));
        let e = RegistryError::from_upstream(
            StatusCode::INTERNAL_SERVER_ERROR,
            UpstreamKind::Blob,
            None,
            "x",
        );
        assert_eq!(e.status.as_u16(), 502);
    }

    #[test]
    fn body_is_oci_json() {
        let e = RegistryError::name_invalid("bad");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["errors"][0]["code"], "NAME_INVALID");
        assert_eq!(v["errors"][0]["message"], "bad");
    }
}
