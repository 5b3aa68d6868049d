//! Whose credentials an upstream request carries, and passthrough
//! authentication (`auth = "passthrough"`).
//!
//! With passthrough, the mirror has no credentials of its own for the
//! upstream: each request carries its caller's `Authorization` (a Bearer
//! token the caller got from the upstream's token service, or Basic
//! credentials for a Basic upstream), passed on as is for that request
//! only. The mirror answers no challenge itself: an upstream 401 goes back
//! to the caller as a 401 with the upstream's own `WWW-Authenticate`
//! (realm, service, and the scope for the repository as upstream names it,
//! `library/` included), which is what makes docker, containerd, podman and
//! skopeo fetch a token from the upstream's token service with their own
//! credentials and come back with it. The challenge is remembered, so a
//! caller without any `Authorization` is answered at once without asking
//! upstream (registries that challenge challenge every request without
//! credentials).
//!
//! A caller's header is never logged (it is marked sensitive, and
//! [`Credential`]'s `Debug` prints nothing of it), never a metric label,
//! never written to disk, and never kept beyond the request (or the blob
//! fill it leads). What the mirror remembers of a caller is upstream's
//! answer, keyed by [`CredentialId`], a SHA-256 of the header.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Uri, header};
use hyper::body::Incoming;
use sha2::Digest as _;

use super::auth::pull_scope;
use super::client::Upstream;
use super::config::AuthMode;
use super::error::UpstreamError;

/// Whose credentials an upstream request carries.
#[derive(Clone, Debug)]
pub(crate) enum Caller {
    /// The mirror's own (configured, or anonymous), challenges answered by
    /// the mirror: `auth = "mirror"`.
    Mirror,
    /// The caller's own, passed on: `auth = "passthrough"`.
    Passthrough(Credential),
}

impl Caller {
    /// The caller of a request to `upstream`: its `Authorization` when the
    /// upstream is in passthrough mode, else the mirror.
    pub(crate) fn of(upstream: &Upstream, headers: &HeaderMap) -> Caller {
        if upstream.passthrough() {
            Caller::Passthrough(Credential::from_headers(headers))
        } else {
            Caller::Mirror
        }
    }

    /// The caller's credential, in passthrough mode.
    pub(crate) fn credential(&self) -> Option<&Credential> {
        match self {
            Caller::Mirror => None,
            Caller::Passthrough(c) => Some(c),
        }
    }
}

/// Identifies a credential without holding it: SHA-256 of the
/// `Authorization` value (of nothing, for anonymous callers).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct CredentialId([u8; 32]);

impl CredentialId {
    /// The fingerprint's bytes (for keys derived from it).
    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for CredentialId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CredentialId(..)")
    }
}

/// A caller's `Authorization` for one request.
#[derive(Clone)]
pub(crate) struct Credential {
    /// The header, marked sensitive; `None` for an anonymous caller.
    header: Option<HeaderValue>,
    /// Its fingerprint.
    id: CredentialId,
    /// When it stops being valid, when it says so (a JWT's `exp`).
    expires: Option<SystemTime>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("anonymous", &self.header.is_none())
            .finish_non_exhaustive()
    }
}

impl Credential {
    /// The credential of a request: its (first) `Authorization`, if any.
    pub(crate) fn from_headers(headers: &HeaderMap) -> Credential {
        let header = headers.get(header::AUTHORIZATION).cloned().map(|mut v| {
            v.set_sensitive(true);
            v
        });
        let bytes = header.as_ref().map(|v| v.as_bytes()).unwrap_or_default();
        let id = CredentialId(sha2::Sha256::digest(bytes).into());
        let expires = header.as_ref().and_then(|v| jwt_expiry(v.as_bytes()));
        Credential {
            header,
            id,
            expires,
        }
    }

    /// Its fingerprint.
    pub(crate) fn id(&self) -> CredentialId {
        self.id
    }

    /// Whether the caller sent no `Authorization`.
    pub(crate) fn is_anonymous(&self) -> bool {
        self.header.is_none()
    }

    /// How long it remains valid, when it says (a Bearer JWT's `exp`, read
    /// without verifying: it only ever shortens how long an answer of
    /// upstream's is remembered). `Some(ZERO)` when already expired.
    pub(crate) fn remaining(&self) -> Option<Duration> {
        let expires = self.expires?;
        Some(
            expires
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO),
        )
    }
}

/// The `exp` claim of `Bearer <JWT>`, if the token is a JWT that has one.
fn jwt_expiry(value: &[u8]) -> Option<SystemTime> {
    let token = std::str::from_utf8(value).ok()?;
    let (scheme, token) = token.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let payload = token.trim().split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    #[derive(serde::Deserialize)]
    struct Claims {
        exp: Option<u64>,
    }
    let exp = serde_json::from_slice::<Claims>(&json).ok()?.exp?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(exp))
}

/// A quoted-string parameter value (RFC 9110).
fn quoted(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

impl Upstream {
    /// Whether callers' own credentials are passed on
    /// (`auth = "passthrough"`).
    pub(crate) fn passthrough(&self) -> bool {
        self.auth_mode == AuthMode::Passthrough
    }

    /// How long upstream's answer for a caller's credential is remembered
    /// at most.
    pub(crate) fn passthrough_ttl(&self) -> Duration {
        self.passthrough_ttl
    }

    /// The challenge a caller without credentials gets, when upstream's is
    /// known: upstream's realm and service, and the pull scope of
    /// `upstream_repo` (as upstream names it) when given.
    pub(crate) fn caller_challenge(&self, upstream_repo: Option<&str>) -> Option<HeaderValue> {
        let text = match self.credentials.remembered()? {
            super::auth::Remembered::Bearer { realm, service } => {
                let mut v = format!("Bearer realm={}", quoted(&realm));
                if let Some(s) = service {
                    v.push_str(&format!(",service={}", quoted(&s)));
                }
                if let Some(repo) = upstream_repo {
                    v.push_str(&format!(",scope={}", quoted(&pull_scope(repo))));
                }
                v
            }
            super::auth::Remembered::Basic { realm } => {
                format!("Basic realm={}", quoted(realm.as_deref().unwrap_or("")))
            }
        };
        HeaderValue::from_str(&text).ok()
    }

    /// Like [`Upstream::send`], with `caller`'s credentials: the mirror's
    /// (exactly `send`), or the caller's own passed on as is. In
    /// passthrough, an upstream 401 is [`UpstreamError::Refused`] with
    /// upstream's challenge (remembered for later callers without
    /// credentials), and a caller without credentials is refused at once
    /// when the challenge is already known.
    pub(crate) async fn send_as(
        &self,
        caller: &Caller,
        method: Method,
        repo: &str,
        tail: &str,
        headers: HeaderMap,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let credential = match caller {
            Caller::Mirror => return self.send(method, repo, tail, headers).await,
            Caller::Passthrough(c) => c,
        };
        let upstream_repo = self.upstream_repo(repo);
        let url = format!("{}/v2/{}/{}", self.base, upstream_repo, tail);
        let kind = super::client::request_kind(tail);
        self.send_passthrough(
            credential,
            kind,
            method,
            &url,
            Some(&upstream_repo),
            headers,
        )
        .await
    }

    /// `GET /v2/` with `caller`'s credentials (the API version check, which
    /// tells a client how to authenticate). `Ok` with upstream's status,
    /// or [`UpstreamError::Refused`] with its challenge.
    pub(crate) async fn ping_as(&self, caller: &Caller) -> Result<StatusCode, UpstreamError> {
        let url = format!("{}/v2/", self.base);
        let resp = match caller {
            Caller::Mirror => {
                let uri = parse_uri(&url)?;
                self.follow("other", &Method::GET, &uri, &HeaderMap::new(), None)
                    .await?
            }
            Caller::Passthrough(c) => {
                self.send_passthrough(c, "other", Method::GET, &url, None, HeaderMap::new())
                    .await?
            }
        };
        Ok(resp.status())
    }

    async fn send_passthrough(
        &self,
        credential: &Credential,
        kind: &'static str,
        method: Method,
        url: &str,
        upstream_repo: Option<&str>,
        mut headers: HeaderMap,
    ) -> Result<Response<Incoming>, UpstreamError> {
        if credential.is_anonymous()
            && let Some(challenge) = self.caller_challenge(upstream_repo)
        {
            return Err(UpstreamError::Refused {
                challenge: Some(challenge),
            });
        }
        let uri = parse_uri(url)?;
        super::client::strip_headers(&mut headers);
        let resp = self
            .follow(kind, &method, &uri, &headers, credential.header.as_ref())
            .await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        self.remember_challenge(resp.headers());
        Err(UpstreamError::Refused {
            challenge: resp.headers().get(header::WWW_AUTHENTICATE).cloned(),
        })
    }
}

fn parse_uri(url: &str) -> Result<Uri, UpstreamError> {
    url.parse()
        .map_err(|e| UpstreamError::Protocol(format!("bad request URL {url:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    #[test]
    fn credentials_are_fingerprinted_and_never_printed() {
        let exp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 300;
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!(r#"{{"sub":"u","exp":{exp}}}"#));
        let jwt = format!("Bearer eyJhbGciOiJFUzI1NiJ9.{claims}.c2ln");
        let c = Credential::from_headers(&headers(Some(&jwt)));
        assert!(!c.is_anonymous());
        let left = c.remaining().unwrap();
        assert!(left > Duration::from_secs(290) && left <= Duration::from_secs(300));
        assert!(!format!("{c:?}").contains("eyJ"), "{c:?}");
        assert!(c.header.as_ref().unwrap().is_sensitive());
        let same = Credential::from_headers(&headers(Some(&jwt)));
        assert_eq!(c.id(), same.id());
        let other = Credential::from_headers(&headers(Some("Basic dTpw")));
        assert_ne!(c.id(), other.id());
        assert_eq!(other.remaining(), None);
        let anon = Credential::from_headers(&headers(None));
        assert!(anon.is_anonymous());
        assert_ne!(anon.id(), other.id());
        assert_eq!(format!("{:?}", anon.id()), "CredentialId(..)");
        // Opaque tokens have no expiry; expired ones have none left.
        assert_eq!(
            Credential::from_headers(&headers(Some("Bearer opaque"))).remaining(),
            None
        );
        let old = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"exp":1}"#);
        let c = Credential::from_headers(&headers(Some(&format!("Bearer a.{old}.b"))));
        assert_eq!(c.remaining(), Some(Duration::ZERO));
    }

    #[test]
    fn quoting() {
        assert_eq!(quoted(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
