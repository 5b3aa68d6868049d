//! Authenticating to an upstream: the Docker token specification (token
//! URLs, token responses, a cache of tokens per realm, service and scope)
//! and HTTP Basic credentials, and how an [`Upstream`] answers a challenge
//! and remembers it so later requests authenticate up front.
//!
//! This is where the mirror's own credentials (from `UpstreamConfig`)
//! reach upstream requests. A client's `Authorization` goes upstream only
//! in passthrough mode, through `caller.rs` (see `STRIPPED_HEADERS` in
//! `client.rs`).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;

use super::challenge::{self, Challenge};
use super::client::{Hop, Upstream, UpstreamBody};
use super::config::UpstreamConfig;
use super::error::UpstreamError;
use crate::error::ConfigError;

/// Largest token endpoint answer accepted.
const MAX_TOKEN_BODY: usize = 1024 * 1024;

/// Memory for cached tokens, per upstream: some 10,000 of Docker Hub's.
const TOKEN_CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// The token endpoint URL for a challenge: `realm?service=…&scope=…`,
/// values form-encoded and appended to any query the realm already has.
pub(crate) fn token_url(
    realm: &str,
    service: Option<&str>,
    scope: &str,
) -> Result<url::Url, url::ParseError> {
    let mut url = url::Url::parse(realm)?;
    {
        let mut query = url.query_pairs_mut();
        if let Some(service) = service {
            query.append_pair("service", service);
        }
        query.append_pair("scope", scope);
    }
    Ok(url)
}

/// The default scope for pulling a repository.
pub(crate) fn pull_scope(repo: &str) -> String {
    format!("repository:{repo}:pull")
}

/// Lifetime assumed when the token endpoint gives no `expires_in`.
pub(crate) const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// A token as issued by a token endpoint.
#[derive(Clone)]
pub(crate) struct Token {
    /// The ready-made `Authorization: Bearer …` header value (marked
    /// sensitive so it is never printed).
    pub(crate) header: HeaderValue,
    /// How long the token is valid according to the endpoint.
    pub(crate) lifetime: Duration,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("header", &"<redacted>")
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

impl Token {
    /// How long the token may be cached: its lifetime minus a safety margin
    /// of 10 % (at least 5 s), but never less than half the lifetime.
    pub(crate) fn cache_ttl(&self) -> Duration {
        let margin = (self.lifetime / 10).max(Duration::from_secs(5));
        let margin = margin.min(self.lifetime / 2);
        self.lifetime.saturating_sub(margin)
    }
}

/// The JSON a token endpoint answers with (other fields are ignored).
#[derive(Deserialize)]
struct TokenBody {
    /// Docker's name for the token.
    #[serde(default)]
    token: Option<String>,
    /// OAuth2's name for the token.
    #[serde(default)]
    access_token: Option<String>,
    /// Lifetime in seconds.
    #[serde(default)]
    expires_in: Option<u64>,
}

/// Reads a token endpoint's JSON answer: `token` or `access_token`, and
/// `expires_in` seconds (default [`DEFAULT_TOKEN_LIFETIME`]). The error
/// message never contains the token.
pub(crate) fn parse_token_response(body: &[u8]) -> Result<Token, String> {
    let parsed: TokenBody =
        serde_json::from_slice(body).map_err(|e| format!("token response is not JSON: {e}"))?;
    let token = parsed
        .token
        .filter(|t| !t.is_empty())
        .or(parsed.access_token.filter(|t| !t.is_empty()))
        .ok_or_else(|| "token response has neither token nor access_token".to_string())?;
    let mut header = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| "token contains characters not allowed in a header".to_string())?;
    header.set_sensitive(true);
    let lifetime = match parsed.expires_in {
        Some(0) | None => DEFAULT_TOKEN_LIFETIME,
        Some(s) => Duration::from_secs(s),
    };
    Ok(Token { header, lifetime })
}

/// Key of a cached token: realm, service and scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct TokenKey {
    /// Token endpoint URL.
    pub(crate) realm: String,
    /// `service` parameter, if any.
    pub(crate) service: Option<String>,
    /// Requested scope.
    pub(crate) scope: String,
}

/// Expires each cached token after its [`Token::cache_ttl`].
struct TokenExpiry;

impl moka::Expiry<TokenKey, Token> for TokenExpiry {
    fn expire_after_create(
        &self,
        _key: &TokenKey,
        value: &Token,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.cache_ttl())
    }
}

/// Tokens by (realm, service, scope), each expiring a little before the
/// endpoint said it would. Concurrent fetches of the same key are coalesced.
#[derive(Clone)]
pub(crate) struct TokenCache {
    /// The moka cache.
    inner: moka::future::Cache<TokenKey, Token>,
}

impl Default for TokenCache {
    fn default() -> Self {
        Self::new()
    }
}

impl TokenCache {
    /// An empty cache holding at most [`TOKEN_CACHE_BYTES`] of tokens and
    /// their keys (a token may be up to [`MAX_TOKEN_BODY`] long, and a key
    /// exists per repository clients name).
    pub(crate) fn new() -> TokenCache {
        TokenCache {
            inner: moka::future::Cache::builder()
                .weigher(|k: &TokenKey, t: &Token| {
                    // The strings, and an estimate of the rest.
                    let bytes = k.realm.len()
                        + k.service.as_ref().map_or(0, String::len)
                        + k.scope.len()
                        + t.header.len()
                        + 256;
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .max_capacity(TOKEN_CACHE_BYTES)
                .expire_after(TokenExpiry)
                .build(),
        }
    }

    /// Returns the cached token for `key`, or runs `fetch` (once, however
    /// many callers ask at the same time) and caches its result. Errors are
    /// not cached.
    pub(crate) async fn get_or_fetch<F, E>(&self, key: TokenKey, fetch: F) -> Result<Token, Arc<E>>
    where
        F: Future<Output = Result<Token, E>>,
        E: Send + Sync + 'static,
    {
        self.inner.try_get_with(key, fetch).await
    }

    /// Forgets the token for `key` if it is still `rejected` (one the
    /// registry refused), so the next request fetches a fresh one.
    pub(crate) async fn invalidate_if(&self, key: &TokenKey, rejected: &HeaderValue) {
        if let Some(current) = self.inner.get(key).await
            && current.header == *rejected
        {
            self.inner.invalidate(key).await;
        }
    }
}

/// How an upstream last asked us to authenticate, so later requests can
/// authenticate up front instead of collecting a 401 first.
#[derive(Debug, Clone)]
pub(super) enum Remembered {
    /// Bearer tokens from this realm and service.
    Bearer {
        /// Token endpoint URL.
        realm: String,
        /// `service` parameter for the token endpoint.
        service: Option<String>,
    },
    /// Basic credentials.
    Basic {
        /// The protection space upstream named, if any.
        realm: Option<String>,
    },
}

/// One upstream's credentials and what it asked for last.
pub(super) struct Credentials {
    /// `Authorization: Basic …` when a username is configured.
    basic: Option<HeaderValue>,
    /// Bearer tokens by realm, service and scope.
    tokens: TokenCache,
    /// How the upstream last asked us to authenticate.
    challenge: std::sync::Mutex<Option<Remembered>>,
}

impl Credentials {
    /// The configured credentials (the password resolved from wherever it
    /// is kept).
    pub(super) fn new(cfg: &UpstreamConfig) -> Result<Credentials, ConfigError> {
        let password = cfg.resolve_password()?;
        let basic = match &cfg.username {
            Some(user) => {
                let raw = format!("{user}:{}", password.as_deref().unwrap_or(""));
                let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
                let mut value =
                    HeaderValue::from_str(&format!("Basic {encoded}")).map_err(|_| {
                        ConfigError::invalid(
                            format!("upstream.{}.username", cfg.host),
                            "cannot be sent in a header",
                        )
                    })?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        Ok(Credentials {
            basic,
            tokens: TokenCache::new(),
            challenge: std::sync::Mutex::new(None),
        })
    }

    /// Whether a username is configured.
    pub(super) fn configured(&self) -> bool {
        self.basic.is_some()
    }

    pub(super) fn remembered(&self) -> Option<Remembered> {
        self.challenge
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn remember(&self, how: Remembered) {
        *self
            .challenge
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(how);
    }
}

/// The `Authorization` sent with a request before any challenge.
#[derive(Default)]
pub(super) struct UpFront {
    /// The header value, if the upstream's way of authenticating is known.
    header: Option<HeaderValue>,
    /// The cached token it came from, to forget it if it is refused.
    token: Option<(TokenKey, HeaderValue)>,
}

impl UpFront {
    /// The header to send.
    pub(super) fn header(&self) -> Option<&HeaderValue> {
        self.header.as_ref()
    }
}

impl Upstream {
    /// Authenticates up front when the upstream's challenge is known:
    /// a token for `scope`, or the Basic credentials.
    pub(super) async fn authenticate_up_front(
        &self,
        scope: &str,
    ) -> Result<UpFront, UpstreamError> {
        Ok(match self.credentials.remembered() {
            Some(Remembered::Bearer { realm, service }) => {
                let key = TokenKey {
                    realm,
                    service,
                    scope: scope.to_string(),
                };
                let token = self.token(key.clone()).await?;
                UpFront {
                    header: Some(token.header.clone()),
                    token: Some((key, token.header)),
                }
            }
            Some(Remembered::Basic { .. }) => UpFront {
                header: self.credentials.basic.clone(),
                token: None,
            },
            None => UpFront::default(),
        })
    }

    /// Answers a 401's challenge: the `Authorization` to retry with, or
    /// `None` when the 401 should be returned as-is (no usable challenge,
    /// no credentials, or the credentials just sent were refused). The
    /// challenge is remembered for later requests.
    pub(super) async fn answer_challenge(
        &self,
        headers: &HeaderMap,
        scope: &str,
        sent: &UpFront,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        match challenge::pick(headers) {
            None | Some(Ok(Challenge::Other(_))) => Ok(None),
            Some(Err(e)) => {
                tracing::warn!(upstream = %self.host(), error = %e, "cannot understand upstream's challenge");
                Err(e)
            }
            Some(Ok(Challenge::Bearer(challenge))) => {
                if let Some((key, header)) = &sent.token {
                    self.credentials.tokens.invalidate_if(key, header).await;
                }
                self.credentials.remember(Remembered::Bearer {
                    realm: challenge.realm.clone(),
                    service: challenge.service.clone(),
                });
                let key = TokenKey {
                    realm: challenge.realm,
                    service: challenge.service,
                    scope: challenge.scope.unwrap_or_else(|| scope.to_string()),
                };
                Ok(Some(self.token(key).await?.header))
            }
            Some(Ok(Challenge::Basic { realm })) => {
                let Some(basic) = &self.credentials.basic else {
                    tracing::warn!(upstream = %self.host(), "upstream wants basic auth but no credentials are configured");
                    return Ok(None);
                };
                if sent.header.as_ref() == Some(basic) {
                    tracing::warn!(upstream = %self.host(), "upstream rejected the configured credentials");
                    return Ok(None);
                }
                self.credentials.remember(Remembered::Basic { realm });
                Ok(Some(basic.clone()))
            }
        }
    }

    /// Remembers how a 401 answered to a caller's credentials (passthrough)
    /// asks to authenticate, so callers without credentials can be told at
    /// once (`caller.rs`).
    pub(super) fn remember_challenge(&self, headers: &HeaderMap) {
        match challenge::pick(headers) {
            Some(Ok(Challenge::Bearer(c))) => self.credentials.remember(Remembered::Bearer {
                realm: c.realm,
                service: c.service,
            }),
            Some(Ok(Challenge::Basic { realm })) => {
                self.credentials.remember(Remembered::Basic { realm })
            }
            _ => {}
        }
    }

    /// A token for `key`, cached or freshly fetched (one fetch per key at a
    /// time).
    async fn token(&self, key: TokenKey) -> Result<Token, UpstreamError> {
        self.credentials
            .tokens
            .get_or_fetch(key.clone(), self.fetch_token(key))
            .await
            .map_err(|e| (*e).clone())
    }

    /// Asks the token endpoint of `key.realm` for a token (with the Basic
    /// credentials, when configured).
    async fn fetch_token(&self, key: TokenKey) -> Result<Token, UpstreamError> {
        let realm = &key.realm;
        let url = token_url(realm, key.service.as_deref(), &key.scope).map_err(|_| {
            UpstreamError::Protocol(format!("token realm {realm:?} is not a valid URL"))
        })?;
        let uri: Uri = match url.scheme() {
            "http" | "https" if url.host_str().is_some_and(|h| !h.is_empty()) => {
                url.as_str().parse().map_err(|_| {
                    UpstreamError::Protocol(format!("token realm {realm:?} is not a valid URL"))
                })?
            }
            _ => {
                return Err(UpstreamError::Protocol(format!(
                    "token realm {realm:?} is not an http(s) URL"
                )));
            }
        };
        // Credentials never travel in the clear to a realm of an upstream
        // reached over TLS.
        if url.scheme() == "http" && self.base_is_https() {
            return Err(UpstreamError::Protocol(format!(
                "token realm {realm:?} is plain http for an https upstream: refused"
            )));
        }
        let fail = |message: String, status: Option<StatusCode>| {
            tracing::warn!(upstream = %self.host(), realm = %realm, scope = %key.scope, "token request failed: {message}");
            UpstreamError::Auth { message, status }
        };
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let resp = match self
            .follow(
                "token",
                &Method::GET,
                &uri,
                &headers,
                self.credentials.basic.as_ref(),
                Hop::Redirect,
            )
            .await
        {
            Ok((resp, _)) => resp,
            Err(UpstreamError::Unreachable { message, cause }) => {
                tracing::warn!(upstream = %self.host(), realm = %realm, "token endpoint unreachable: {message}");
                return Err(UpstreamError::Unreachable {
                    message: format!("token endpoint: {message}"),
                    cause,
                });
            }
            Err(e) => return Err(fail(e.to_string(), None)),
        };
        let status = resp.status();
        if !status.is_success() {
            return Err(fail(
                format!("token endpoint {realm} answered {status}"),
                Some(status),
            ));
        }
        let body = self
            .read_token_body(resp, realm)
            .await
            .map_err(|m| fail(m, None))?;
        parse_token_response(&body).map_err(|e| fail(format!("{realm}: {e}"), None))
    }

    /// The token endpoint's answer, bounded in size and time.
    async fn read_token_body(
        &self,
        resp: http::Response<UpstreamBody>,
        realm: &str,
    ) -> Result<bytes::Bytes, String> {
        let collected = tokio::time::timeout(
            self.timeout(),
            Limited::new(resp.into_body(), MAX_TOKEN_BODY).collect(),
        )
        .await
        .map_err(|_| format!("token endpoint {realm} timed out sending its answer"))?
        .map_err(|e| format!("reading token endpoint {realm}: {e}"))?;
        Ok(collected.to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_urls() {
        let url = |realm, service, scope| token_url(realm, service, scope).unwrap().to_string();
        assert_eq!(
            url("https://a/token", Some("reg istry"), "repository:a/b:pull"),
            "https://a/token?service=reg+istry&scope=repository%3Aa%2Fb%3Apull"
        );
        assert_eq!(
            url("https://a/token?x=1", None, "s&t"),
            "https://a/token?x=1&scope=s%26t"
        );
        assert!(token_url("not a url", None, "s").is_err());
        assert_eq!(
            pull_scope("library/alpine"),
            "repository:library/alpine:pull"
        );
    }

    #[test]
    fn token_responses() {
        let t = parse_token_response(br#"{"token":"abc","expires_in":300}"#).unwrap();
        assert_eq!(t.header, "Bearer abc");
        assert!(t.header.is_sensitive());
        assert_eq!(t.lifetime, Duration::from_secs(300));
        assert_eq!(t.cache_ttl(), Duration::from_secs(270));
        let t = parse_token_response(br#"{"access_token":"xyz"}"#).unwrap();
        assert_eq!(t.header, "Bearer xyz");
        assert_eq!(t.lifetime, DEFAULT_TOKEN_LIFETIME);
        assert_eq!(t.cache_ttl(), Duration::from_secs(54));
        let t =
            parse_token_response(br#"{"token":"","access_token":"q","expires_in":20}"#).unwrap();
        assert_eq!(t.header, "Bearer q");
        assert_eq!(t.cache_ttl(), Duration::from_secs(15));
        let t = parse_token_response(br#"{"token":"q","expires_in":1}"#).unwrap();
        assert_eq!(t.cache_ttl(), Duration::from_millis(500));
        assert!(parse_token_response(b"{}").is_err());
        assert!(parse_token_response(b"<html>").is_err());
        let e = parse_token_response(b"{\"token\":\"bad\nsecret\"}").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
        assert!(format!("{t:?}").contains("redacted"));
    }

    #[tokio::test]
    async fn plain_http_realm_of_an_https_upstream_is_refused() {
        let cfg = UpstreamConfig {
            host: "r.example".into(),
            url: "https://r.example".into(),
            username: Some("bot".into()),
            password: Some("pw".into()),
            ..crate::upstream::config::docker_hub()
        };
        let up = Upstream::new(&cfg).unwrap();
        // Port 9 on loopback: a connection attempt would fail as
        // unreachable; the refusal comes first.
        let key = TokenKey {
            realm: "http://127.0.0.1:9/token".into(),
            service: None,
            scope: "repository:a:pull".into(),
        };
        let e = up.fetch_token(key).await.unwrap_err();
        assert!(
            matches!(&e, UpstreamError::Protocol(m) if m.contains("plain http")),
            "{e}"
        );
    }

    /// Large tokens do not add up past the cache's memory: 100 tokens of
    /// 1 MiB (the most a token endpoint may answer) hold at most
    /// `TOKEN_CACHE_BYTES`. (By count alone, all 100 stayed.)
    #[tokio::test]
    async fn the_token_cache_is_bounded_in_bytes() {
        let cache = TokenCache::new();
        let big = "t".repeat(MAX_TOKEN_BODY - 100);
        let answer = format!(r#"{{"token":"{big}","expires_in":300}}"#);
        for i in 0..100 {
            let key = TokenKey {
                realm: "https://auth/token".into(),
                service: None,
                scope: format!("repository:r{i}:pull"),
            };
            cache
                .get_or_fetch(key, async { parse_token_response(answer.as_bytes()) })
                .await
                .unwrap();
        }
        cache.inner.run_pending_tasks().await;
        assert!(
            cache.inner.weighted_size() <= TOKEN_CACHE_BYTES,
            "{} bytes of tokens",
            cache.inner.weighted_size()
        );
        assert!(
            cache.inner.entry_count() <= 32,
            "{}",
            cache.inner.entry_count()
        );
    }

    #[tokio::test]
    async fn cache_coalesces_and_invalidates() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let cache = TokenCache::new();
        let fetches = Arc::new(AtomicUsize::new(0));
        let key = TokenKey {
            realm: "r".into(),
            service: None,
            scope: "s".into(),
        };
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (cache, fetches, key) = (cache.clone(), fetches.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_fetch(key, async {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        parse_token_response(br#"{"token":"a","expires_in":300}"#)
                    })
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().header, "Bearer a");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);

        // A different rejected value leaves the entry alone.
        cache
            .invalidate_if(&key, &HeaderValue::from_static("Bearer other"))
            .await;
        let t = cache
            .get_or_fetch(key.clone(), async { Err::<Token, _>("must not fetch") })
            .await
            .unwrap();
        cache.invalidate_if(&key, &t.header).await;
        let e = cache
            .get_or_fetch(key.clone(), async { Err::<Token, _>("fetch failed") })
            .await
            .unwrap_err();
        assert_eq!(*e, "fetch failed");
    }
}
