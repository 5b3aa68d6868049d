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
//! One mirror address may front several passthrough upstreams, and a
//! client keeps one credential per address, so it may present on a request
//! for one upstream what another issued. Once an upstream's challenge is
//! known, a credential is passed to it only when it is meant for it: of
//! the challenge's scheme (Basic or Bearer), and, for a JWT naming its
//! audience (`aud`, the token service's `service` in the Docker token
//! specification), naming that upstream's service. Otherwise the caller
//! gets that upstream's challenge, as a caller without credentials does.
//!
//! A caller's header is never logged (it is marked sensitive, and
//! [`Credential`]'s `Debug` prints nothing of it), never a metric label,
//! never written to disk, and never kept beyond the request (or the blob
//! fill it leads). What the mirror remembers of a caller is upstream's
//! answer, keyed by [`CredentialId`], a SHA-256 of the header.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Uri, header};
use sha2::Digest as _;

use super::auth::{Remembered, pull_scope};
use super::client::{Hop, Upstream, UpstreamBody};
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
    /// Its scheme, lowercase (`basic`, `bearer`, ...).
    scheme: String,
    /// The services it is for, when it says so (a JWT's `aud`).
    audience: Vec<String>,
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
        // A copy: the request's own value is a slice of the buffer its
        // head was read into (up to some 400 KiB), which fills led with
        // this credential would keep whole for as long as they run.
        let header = headers
            .get(header::AUTHORIZATION)
            .map(|v| HeaderValue::from_bytes(v.as_bytes()).unwrap_or_else(|_| v.clone()))
            .map(|mut v| {
                v.set_sensitive(true);
                v
            });
        let bytes = header.as_ref().map(|v| v.as_bytes()).unwrap_or_default();
        let id = CredentialId(sha2::Sha256::digest(bytes).into());
        let text = std::str::from_utf8(bytes).unwrap_or("");
        let (scheme, token) = text.split_once(' ').unwrap_or((text, ""));
        let scheme = scheme.to_ascii_lowercase();
        let claims = (scheme == "bearer")
            .then(|| jwt_claims(token))
            .flatten()
            .unwrap_or_default();
        Credential {
            header,
            id,
            // Checked: `exp` is the caller's, and `SystemTime + Duration`
            // panics past what the clock can hold.
            expires: claims
                .exp
                .and_then(|exp| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(exp))),
            scheme,
            audience: claims.aud.map(Audience::into_vec).unwrap_or_default(),
        }
    }

    /// Whether it may be passed to an upstream that challenges as `how`:
    /// the same scheme and, for a token naming its audience, the
    /// upstream's service.
    fn meant_for(&self, how: &Remembered) -> bool {
        match how {
            Remembered::Basic { .. } => self.scheme == "basic",
            Remembered::Bearer { service, .. } => {
                self.scheme == "bearer"
                    && (self.audience.is_empty()
                        || service.as_ref().is_none_or(|s| self.audience.contains(s)))
            }
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

/// The claims of a JWT that say what the mirror may use: when it expires
/// and whom it is for.
#[derive(Default, serde::Deserialize)]
struct Claims {
    exp: Option<u64>,
    aud: Option<Audience>,
}

/// A JWT's `aud`: one string or several (RFC 7519, section 4.1.3).
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn into_vec(self) -> Vec<String> {
        match self {
            Audience::One(s) => vec![s],
            Audience::Many(v) => v,
        }
    }
}

/// The claims of a token, if it is a JWT. Read without verifying the
/// signature (the mirror holds no key): they only ever shorten how long an
/// answer of upstream's is remembered, or keep the token from an upstream
/// it does not name.
fn jwt_claims(token: &str) -> Option<Claims> {
    let payload = token.trim().split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice::<Claims>(&json).ok()
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
            Remembered::Bearer { realm, service } => {
                let mut v = format!("Bearer realm={}", quoted(&realm));
                if let Some(s) = service {
                    v.push_str(&format!(",service={}", quoted(&s)));
                }
                if let Some(repo) = upstream_repo {
                    v.push_str(&format!(",scope={}", quoted(&pull_scope(repo))));
                }
                v
            }
            Remembered::Basic { realm } => {
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
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
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
                self.follow(
                    "other",
                    &Method::GET,
                    &uri,
                    &HeaderMap::new(),
                    None,
                    Hop::First,
                )
                .await?
                .0
            }
            Caller::Passthrough(c) => {
                self.send_passthrough(c, "other", Method::GET, &url, None, HeaderMap::new())
                    .await?
            }
        };
        Ok(resp.status())
    }

    /// Sends with the caller's credential, unless upstream's challenge is
    /// known and the caller has none or none meant for this upstream: then
    /// the caller gets that challenge without asking upstream.
    async fn send_passthrough(
        &self,
        credential: &Credential,
        kind: &'static str,
        method: Method,
        url: &str,
        upstream_repo: Option<&str>,
        mut headers: HeaderMap,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        if let Some(how) = self.credentials.remembered()
            && (credential.is_anonymous() || !credential.meant_for(&how))
        {
            if !credential.is_anonymous() {
                tracing::debug!(upstream = %self.host(), scheme = %credential.scheme,
                    "the caller's credential is not for this upstream; not passed on");
            }
            return Err(UpstreamError::Refused {
                challenge: self.caller_challenge(upstream_repo),
            });
        }
        let uri = parse_uri(url)?;
        super::client::strip_headers(&mut headers);
        let (resp, from_registry) = self
            .follow(
                kind,
                &method,
                &uri,
                &headers,
                credential.header.as_ref(),
                Hop::First,
            )
            .await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        if !from_registry {
            // A redirect target's challenge is not the registry's: never
            // relayed to the caller, never remembered.
            return Err(super::client::redirect_target_401());
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

    /// A credential keeps no more of the request than its value: it was a
    /// slice of the buffer the request's head was read into, kept whole
    /// by every fill it led.
    #[test]
    fn a_credential_keeps_no_request_buffer_alive() {
        let live = std::sync::Arc::default();
        let head = crate::body::tracked_buffer(400 * 1024, b"Basic eDp", &live);
        let mut h = HeaderMap::new();
        let value = HeaderValue::from_maybe_shared(head.slice(0..9)).unwrap();
        h.insert(header::AUTHORIZATION, value);
        drop(head);
        let c = Credential::from_headers(&h);
        drop(h);
        assert_eq!(live.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert_eq!(
            c.header.as_ref().map(|v| v.as_bytes()),
            Some(&b"Basic eDp"[..])
        );
        assert!(c.header.as_ref().is_some_and(HeaderValue::is_sensitive));
    }

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
        // An `exp` past what the clock holds is no expiry, not a panic.
        let far = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!(r#"{{"exp":{}}}"#, u64::MAX));
        let c = Credential::from_headers(&headers(Some(&format!("Bearer a.{far}.b"))));
        assert_eq!(c.remaining(), None);
    }

    #[test]
    fn credentials_go_only_where_they_are_meant_for() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let bearer = |claims: &str| {
            Credential::from_headers(&headers(Some(&format!("Bearer h.{}.s", b64(claims)))))
        };
        let hub = Remembered::Bearer {
            realm: "https://auth.example/token".into(),
            service: Some("registry.example".into()),
        };
        let basic = Remembered::Basic { realm: None };
        assert!(bearer(r#"{"aud":"registry.example"}"#).meant_for(&hub));
        assert!(bearer(r#"{"aud":["other","registry.example"]}"#).meant_for(&hub));
        assert!(!bearer(r#"{"aud":"other"}"#).meant_for(&hub));
        // No audience, or an opaque token: nothing says otherwise.
        assert!(bearer(r#"{"exp":1}"#).meant_for(&hub));
        let opaque = Credential::from_headers(&headers(Some("bearer opaque")));
        assert!(opaque.meant_for(&hub));
        assert!(!opaque.meant_for(&basic));
        let pw = Credential::from_headers(&headers(Some("Basic dTpw")));
        assert!(pw.meant_for(&basic));
        assert!(!pw.meant_for(&hub));
        let no_service = Remembered::Bearer {
            realm: "r".into(),
            service: None,
        };
        assert!(bearer(r#"{"aud":"other"}"#).meant_for(&no_service));
    }

    #[test]
    fn quoting() {
        assert_eq!(quoted(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
