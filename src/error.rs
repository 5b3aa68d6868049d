//! Errors shared across subsystems: [`ConfigError`] for start-up, and the
//! request path's [`Error`].
//!
//! The internal error, as pingora models it: a typed [`ErrorKind`] (the
//! condition), an [`ErrorSource`] (who caused it: the client, an upstream,
//! or stowage itself) and an optional cause kept for logs.
//!
//! Decisions match on the kind and the source, never on message text: for
//! instance [`Error::is_upstream_outage`] is what lets a stale tag be
//! served. The client-visible rendering (HTTP status, OCI error code, JSON
//! body) happens at the HTTP edge only, in `http/error.rs`.

use std::sync::Arc;

use http::{HeaderValue, StatusCode};

use crate::oci::{Invalid, ParseError};

/// The underlying error of an [`Error`], for logs. Shared (`Arc`) so that
/// one failure can be handed to every reader of a blob fill and to every
/// caller coalesced onto one cache load.
pub(crate) type Cause = Arc<dyn std::error::Error + Send + Sync>;

/// Who caused an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorSource {
    /// The request itself (bad name, bad range, no credentials, ...).
    Client,
    /// An upstream registry (unreachable, refused, sent bad content).
    Upstream,
    /// stowage or its machine (disk failure, a task that died).
    Local,
}

impl ErrorSource {
    /// `client`, `upstream` or `local` (told to peers, which decide by it
    /// whether going upstream themselves could help).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorSource::Client => "client",
            ErrorSource::Upstream => "upstream",
            ErrorSource::Local => "local",
        }
    }
}

/// What an upstream request was for, to pick the right "unknown" kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Asked {
    /// A blob.
    Blob,
    /// A manifest.
    Manifest,
    /// Repository-level (tags list, referrers).
    Repository,
}

/// The condition an [`Error`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    /// A repository name outside the grammar.
    NameInvalid,
    /// A tag outside the grammar.
    TagInvalid,
    /// A malformed digest, or an algorithm stowage cannot verify.
    DigestInvalid,
    /// A write: the mirror is read-only. `reads` when the resource may be
    /// read (GET and HEAD), not when it is a write route (uploads).
    Unsupported {
        /// Whether GET and HEAD are allowed on the resource.
        reads: bool,
    },
    /// A path that is no route of the pull API.
    RouteUnknown,
    /// The client must authenticate to the mirror itself.
    Unauthorized {
        /// The `WWW-Authenticate` challenge to answer with.
        challenge: HeaderValue,
    },
    /// A `Range` that selects nothing of a blob of `size` bytes.
    RangeInvalid {
        /// The blob's size.
        size: u64,
    },
    /// No such repository (or no upstream for the registry host asked for).
    NameUnknown,
    /// Upstream does not have the blob.
    BlobUnknown,
    /// Upstream does not have the manifest.
    ManifestUnknown,
    /// Upstream answered 401 although the mirror authenticated.
    UpstreamUnauthorized,
    /// Access denied: upstream answered 403, or a peer request carried a
    /// wrong cluster secret.
    Denied,
    /// Upstream answered 429.
    TooManyRequests {
        /// Its `Retry-After`, passed on.
        retry_after: Option<HeaderValue>,
    },
    /// Upstream answered another 4xx or a 5xx.
    UpstreamStatus {
        /// What it answered.
        status: StatusCode,
        /// Its `Retry-After` (kept for 503), passed on.
        retry_after: Option<HeaderValue>,
    },
    /// No response from upstream: connection, TLS or DNS failure, or no
    /// response headers within the timeout.
    Unreachable,
    /// Upstream's token endpoint refused the mirror or answered garbage.
    UpstreamAuth {
        /// The token endpoint's status, when it answered one.
        status: Option<StatusCode>,
    },
    /// Upstream broke the protocol: a bad redirect or challenge, a body
    /// longer or shorter than announced, a manifest over the size limit.
    UpstreamProtocol,
    /// Upstream's body stalled or broke off mid-transfer.
    BodyBroken,
    /// Upstream's content did not hash to its digest.
    DigestMismatch,
    /// stowage cannot serve this now (no disk and no length to stream by).
    Unavailable,
    /// A local failure (disk, a task that died).
    Internal,
}

/// An error on the request path: condition, who caused it, a message for
/// the client, and the cause for logs.
#[derive(Debug, Clone)]
pub(crate) struct Error {
    kind: ErrorKind,
    source: ErrorSource,
    message: String,
    cause: Option<Cause>,
}

impl Error {
    /// An error of `kind` caused by `source`.
    pub(crate) fn new(kind: ErrorKind, source: ErrorSource, message: impl Into<String>) -> Error {
        Error {
            kind,
            source,
            message: message.into(),
            cause: None,
        }
    }

    /// Keeps `cause` (for logs; the message stays what the client sees).
    pub(crate) fn with_cause(
        mut self,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        self.cause = Some(Arc::from(cause.into()));
        self
    }

    /// The condition.
    pub(crate) fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// Who caused it.
    pub(crate) fn esource(&self) -> ErrorSource {
        self.source
    }

    /// The client-visible explanation.
    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    /// Whether this is an upstream outage: upstream unreachable or timed
    /// out (before or during a body), answering 5xx or 429, or its token
    /// endpoint doing so. Only an outage lets a cached tag be served stale;
    /// a refusal (4xx), bad content (digest mismatch) or a protocol error
    /// does not.
    pub(crate) fn is_upstream_outage(&self) -> bool {
        let outage_status =
            |s: StatusCode| s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS;
        match &self.kind {
            ErrorKind::Unreachable | ErrorKind::BodyBroken | ErrorKind::TooManyRequests { .. } => {
                true
            }
            ErrorKind::UpstreamStatus { status, .. } => outage_status(*status),
            ErrorKind::UpstreamAuth { status: Some(s) } => outage_status(*s),
            _ => false,
        }
    }

    /// Whether this failure is specific to what was asked of upstream
    /// (the repository, or the mirror's credentials for it): upstream said
    /// 404, 401 or 403, or its token endpoint refused the scope. Another
    /// repository may well have the same blob; a blob fill uses this to
    /// decide which of its joiners the failure applies to. In passthrough,
    /// upstream refusing the caller's own credential (the 401 relayed to
    /// the caller) is specific to that credential.
    pub fn is_origin_specific(&self) -> bool {
        match &self.kind {
            ErrorKind::Unauthorized { .. } => true,
            ErrorKind::BlobUnknown
            | ErrorKind::ManifestUnknown
            | ErrorKind::NameUnknown
            | ErrorKind::UpstreamUnauthorized
            | ErrorKind::Denied => self.source == ErrorSource::Upstream,
            ErrorKind::UpstreamAuth { status: Some(s) } => {
                *s == StatusCode::UNAUTHORIZED || *s == StatusCode::FORBIDDEN
            }
            _ => false,
        }
    }

    /// The message followed by the chain of causes, for logs.
    pub(crate) fn report(&self) -> String {
        match &self.cause {
            Some(c) => {
                let chain = chain(c.as_ref());
                if self.message.contains(&chain) {
                    self.message.clone()
                } else {
                    format!("{}: {chain}", self.message)
                }
            }
            None => self.message.clone(),
        }
    }

    /// 404 NAME_UNKNOWN: the client asked for a registry host the mirror
    /// has no upstream for.
    pub(crate) fn name_unknown(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::NameUnknown, ErrorSource::Client, message)
    }

    /// 405 UNSUPPORTED: the mirror is read-only.
    pub(crate) fn unsupported(reads: bool, message: impl Into<String>) -> Error {
        Error::new(
            ErrorKind::Unsupported { reads },
            ErrorSource::Client,
            message,
        )
    }

    /// 401 UNAUTHORIZED with a challenge: the client must authenticate to
    /// the mirror itself.
    pub(crate) fn unauthorized(message: impl Into<String>, challenge: HeaderValue) -> Error {
        Error::new(
            ErrorKind::Unauthorized { challenge },
            ErrorSource::Client,
            message,
        )
    }

    /// 429 TOOMANYREQUESTS with `Retry-After: secs`: the client is refused
    /// for a while (too many failed logins).
    pub(crate) fn client_throttled(message: impl Into<String>, secs: u64) -> Error {
        Error::new(
            ErrorKind::TooManyRequests {
                retry_after: Some(HeaderValue::from(secs)),
            },
            ErrorSource::Client,
            message,
        )
    }

    /// 416: the range selects nothing of a blob of `size` bytes.
    pub(crate) fn range_invalid(size: u64) -> Error {
        Error::new(
            ErrorKind::RangeInvalid { size },
            ErrorSource::Client,
            format!("requested range not satisfiable for a blob of {size} bytes"),
        )
    }

    /// A local failure with no further cause.
    pub(crate) fn internal(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Internal, ErrorSource::Local, message)
    }

    /// A local I/O failure: `context: cause`, the cause kept.
    pub(crate) fn local(context: &str, cause: std::io::Error) -> Error {
        Error::internal(format!("{context}: {cause}")).with_cause(cause)
    }

    /// The mirror cannot serve this now, for a local reason.
    pub(crate) fn unavailable(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Unavailable, ErrorSource::Local, message)
    }

    /// An upstream failure of `kind` (unreachable, protocol, broken body,
    /// digest mismatch, ...).
    pub(crate) fn upstream(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error::new(kind, ErrorSource::Upstream, message)
    }

    /// What a non-success upstream status means for the client. `asked` is
    /// what was asked for, so a 404 becomes `BlobUnknown`,
    /// `ManifestUnknown` or `NameUnknown` (never a 500); `what` names it in
    /// the message.
    pub(crate) fn upstream_status(
        status: StatusCode,
        asked: Asked,
        retry_after: Option<&HeaderValue>,
        what: &str,
    ) -> Error {
        let (kind, message) = match status.as_u16() {
            404 => match asked {
                Asked::Blob => (
                    ErrorKind::BlobUnknown,
                    format!("blob unknown to upstream: {what}"),
                ),
                Asked::Manifest => (
                    ErrorKind::ManifestUnknown,
                    format!("manifest unknown to upstream: {what}"),
                ),
                Asked::Repository => (
                    ErrorKind::NameUnknown,
                    format!("repository unknown to upstream: {what}"),
                ),
            },
            401 => (
                ErrorKind::UpstreamUnauthorized,
                format!("upstream refused the mirror's credentials for {what}"),
            ),
            403 => (
                ErrorKind::Denied,
                format!("upstream denied access to {what}"),
            ),
            429 => (
                ErrorKind::TooManyRequests {
                    retry_after: retry_after.cloned(),
                },
                format!("upstream rate limit reached fetching {what}"),
            ),
            _ => (
                ErrorKind::UpstreamStatus {
                    status,
                    retry_after: retry_after.filter(|_| status.as_u16() == 503).cloned(),
                },
                format!("upstream answered {status} for {what}"),
            ),
        };
        Error::upstream(kind, message)
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|c| c as &(dyn std::error::Error + 'static))
    }
}

impl From<ParseError> for Error {
    fn from(e: ParseError) -> Error {
        let kind = match e.invalid {
            Invalid::Name => ErrorKind::NameInvalid,
            Invalid::Tag => ErrorKind::TagInvalid,
            Invalid::Digest => ErrorKind::DigestInvalid,
            Invalid::Path => ErrorKind::RouteUnknown,
        };
        Error::new(kind, ErrorSource::Client, e.message)
    }
}

/// Why a configuration was refused. Messages name the offending key. Each
/// subsystem's configuration validates itself and reports with this type.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// TOML syntax error, unknown key or wrong type; toml's message names the
    /// key and shows the line.
    #[error("{0}")]
    Parse(String),
    /// Parsed, but a value is not acceptable.
    #[error("invalid value for `{key}`: {message}")]
    Invalid {
        /// Dotted path of the key (`upstream[0].url`).
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

impl ConfigError {
    /// The value of `key` is not acceptable.
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Renders an error with its chain of causes (`client error (Connect): tcp
/// connect error: Connection refused`), skipping causes whose text the
/// rendering already holds.
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_are_exactly_unreachable_5xx_and_429() {
        let status = |s: u16| {
            Error::upstream_status(StatusCode::from_u16(s).unwrap(), Asked::Manifest, None, "x")
        };
        for s in [500, 502, 503, 504, 429] {
            assert!(status(s).is_upstream_outage(), "{s}");
        }
        for s in [400, 401, 403, 404, 410] {
            assert!(!status(s).is_upstream_outage(), "{s}");
        }
        assert!(Error::upstream(ErrorKind::Unreachable, "x").is_upstream_outage());
        assert!(Error::upstream(ErrorKind::BodyBroken, "x").is_upstream_outage());
        assert!(!Error::upstream(ErrorKind::DigestMismatch, "x").is_upstream_outage());
        assert!(!Error::upstream(ErrorKind::UpstreamProtocol, "x").is_upstream_outage());
        let auth = |status| Error::upstream(ErrorKind::UpstreamAuth { status }, "x");
        assert!(auth(Some(StatusCode::SERVICE_UNAVAILABLE)).is_upstream_outage());
        assert!(!auth(Some(StatusCode::FORBIDDEN)).is_upstream_outage());
        assert!(!auth(None).is_upstream_outage());
        assert!(!Error::internal("disk").is_upstream_outage());
    }

    #[test]
    fn origin_specific_failures() {
        let status = |s: u16| {
            Error::upstream_status(StatusCode::from_u16(s).unwrap(), Asked::Blob, None, "x")
        };
        for s in [401, 403, 404] {
            assert!(status(s).is_origin_specific(), "{s}");
        }
        for s in [400, 429, 500, 503] {
            assert!(!status(s).is_origin_specific(), "{s}");
        }
        let auth = |status| Error::upstream(ErrorKind::UpstreamAuth { status }, "x");
        assert!(auth(Some(StatusCode::UNAUTHORIZED)).is_origin_specific());
        assert!(!auth(Some(StatusCode::SERVICE_UNAVAILABLE)).is_origin_specific());
        assert!(!auth(None).is_origin_specific());
        assert!(!Error::upstream(ErrorKind::DigestMismatch, "x").is_origin_specific());
        // A client's own unknown name is not upstream's refusal.
        assert!(!Error::name_unknown("x").is_origin_specific());
    }

    #[test]
    fn causes_are_kept_for_logs() {
        let io = std::io::Error::other("disk on fire");
        let e = Error::local("cache storage error", io);
        assert_eq!(e.esource(), ErrorSource::Local);
        assert_eq!(e.message(), "cache storage error: disk on fire");
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(e.report(), "cache storage error: disk on fire");
        let e = Error::upstream(ErrorKind::BodyBroken, "broke off")
            .with_cause(std::io::Error::other("reset"));
        assert_eq!(e.report(), "broke off: reset");
        assert_eq!(e.to_string(), "broke off");
    }
}
