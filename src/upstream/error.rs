//! Why a request to an upstream produced no response, and what that means
//! for the request that needed it.

use http::StatusCode;

use crate::error::{Cause, Error, ErrorKind};

/// Why a request to an upstream produced no response.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// Could not connect / TLS / DNS / timed out waiting for response headers.
    #[error("upstream unreachable: {message}")]
    Unreachable {
        /// What was tried and what happened.
        message: String,
        /// The transport error, if there was one (not for timeouts).
        #[source]
        cause: Option<Cause>,
    },
    /// Token endpoint refused or returned garbage.
    #[error("upstream authentication failed: {message}")]
    Auth {
        /// What went wrong.
        message: String,
        /// The token endpoint's status, when it answered with a failure.
        status: Option<StatusCode>,
    },
    /// Bad redirect, too many redirects, malformed challenge etc.
    #[error("upstream protocol error: {0}")]
    Protocol(String),
    /// Passthrough: upstream answered the caller's own credentials (or
    /// their absence) with 401; the caller must authenticate upstream.
    #[error("upstream requires the caller to authenticate")]
    Refused {
        /// Upstream's `WWW-Authenticate`, relayed to the caller.
        challenge: Option<http::HeaderValue>,
    },
}

impl UpstreamError {
    /// Unreachable, with the transport error as the cause.
    pub(crate) fn unreachable(
        message: String,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> UpstreamError {
        UpstreamError::Unreachable {
            message,
            cause: Some(std::sync::Arc::new(cause)),
        }
    }
}

impl From<UpstreamError> for Error {
    fn from(e: UpstreamError) -> Error {
        if let UpstreamError::Refused { challenge } = &e {
            // The caller's credential was refused: a 401 the caller answers
            // by authenticating with upstream's token service, as upstream
            // itself would have it.
            let challenge = challenge
                .clone()
                .unwrap_or_else(|| http::HeaderValue::from_static("Basic realm=\"registry\""));
            return Error::unauthorized(
                "authentication required: log in to the upstream registry",
                challenge,
            );
        }
        let kind = match &e {
            UpstreamError::Unreachable { .. } => ErrorKind::Unreachable,
            UpstreamError::Auth { status, .. } => ErrorKind::UpstreamAuth { status: *status },
            UpstreamError::Protocol(_) | UpstreamError::Refused { .. } => {
                ErrorKind::UpstreamProtocol
            }
        };
        // The client sees what kind of failure it was, never the URLs the
        // details name (pre-signed query strings, internal hosts, token
        // realms): those stay in the cause, for the logs.
        let message = match &e {
            UpstreamError::Unreachable { .. } => {
                "upstream unreachable: no connection, or no answer in time".to_string()
            }
            UpstreamError::Auth {
                status: Some(status),
                ..
            } => format!("upstream authentication failed: its token endpoint answered {status}"),
            UpstreamError::Auth { status: None, .. } => {
                "upstream authentication failed: no usable token".to_string()
            }
            UpstreamError::Protocol(_) | UpstreamError::Refused { .. } => {
                "upstream protocol error: a bad redirect, challenge or answer".to_string()
            }
        };
        Error::upstream(kind, message).with_cause(e)
    }
}
