//! Upstream authentication: `WWW-Authenticate` challenges and a token cache.
//!
//! Registries following the Docker token specification answer an
//! unauthenticated request with `401` and a challenge such as
//!
//! ```text
//! WWW-Authenticate: Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull"
//! ```
//!
//! [`parse_challenges`] turns such a header value into [`Challenge`]s,
//! [`token_url`] builds the token endpoint request, [`parse_token_response`]
//! reads its answer and [`TokenCache`] keeps tokens until shortly before they
//! expire.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;
use serde::Deserialize;

/// One authentication challenge from a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// `Bearer`: fetch a token from `realm` and present it.
    Bearer(BearerChallenge),
    /// `Basic`: present username and password.
    Basic {
        /// The protection space named by the server, if any.
        realm: Option<String>,
    },
    /// Any other scheme (`Negotiate`, `Digest`, …), which stowage does not
    /// speak. Holds the scheme name in lower case.
    Other(String),
}

/// The parameters of a `Bearer` challenge.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BearerChallenge {
    /// URL of the token endpoint.
    pub realm: String,
    /// The `service` parameter to pass to the token endpoint, if given.
    pub service: Option<String>,
    /// The `scope` the server asked for, if given
    /// (`repository:library/alpine:pull`).
    pub scope: Option<String>,
}

/// Why a `WWW-Authenticate` header value could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChallengeError {
    /// The header value holds no challenge at all.
    #[error("empty challenge")]
    Empty,
    /// Something other than a token where a scheme or parameter name belongs.
    #[error("expected a token at byte {0}")]
    ExpectedToken(usize),
    /// A parameter name not followed by `=`.
    #[error("expected '=' after parameter {0:?}")]
    ExpectedEquals(String),
    /// A quoted string that never ends.
    #[error("unterminated quoted string")]
    UnterminatedQuote,
    /// Text after a parameter value that is neither `,` nor the end.
    #[error("unexpected character at byte {0}")]
    Unexpected(usize),
    /// A `Bearer` challenge without `realm`.
    #[error("bearer challenge has no realm")]
    MissingRealm,
}

/// Characters allowed in an HTTP `token` (RFC 9110 `tchar`).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A small cursor over the header value.
struct Lexer<'a> {
    /// The whole header value.
    s: &'a [u8],
    /// Index of the next unread byte.
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn skip_ws(&mut self) {
        while self.pos < self.s.len() && matches!(self.s[self.pos], b' ' | b'\t') {
            self.pos += 1;
        }
    }

    /// Skips whitespace and commas (empty list elements are allowed).
    fn skip_ws_commas(&mut self) {
        while self.pos < self.s.len() && matches!(self.s[self.pos], b' ' | b'\t' | b',') {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.s.len()
    }

    fn token(&mut self) -> Option<&'a str> {
        let start = self.pos;
        while self.pos < self.s.len() && is_tchar(self.s[self.pos]) {
            self.pos += 1;
        }
        if self.pos == start {
            return None;
        }
        std::str::from_utf8(&self.s[start..self.pos]).ok()
    }

    /// Reads a quoted string (opening quote already current), handling
    /// backslash escapes.
    fn quoted(&mut self) -> Result<String, ChallengeError> {
        self.pos += 1; // opening quote
        let mut out = Vec::new();
        while let Some(b) = self.peek() {
            self.pos += 1;
            match b {
                b'"' => return Ok(String::from_utf8_lossy(&out).into_owned()),
                b'\\' => match self.peek() {
                    Some(escaped) => {
                        out.push(escaped);
                        self.pos += 1;
                    }
                    None => return Err(ChallengeError::UnterminatedQuote),
                },
                other => out.push(other),
            }
        }
        Err(ChallengeError::UnterminatedQuote)
    }

    /// Looks ahead: is the next element `name =` (a parameter), rather than
    /// the scheme of a new challenge? Does not move the cursor.
    fn next_is_param(&self) -> bool {
        let mut probe = Lexer {
            s: self.s,
            pos: self.pos,
        };
        if probe.token().is_none() {
            return false;
        }
        probe.skip_ws();
        probe.peek() == Some(b'=')
    }

    /// Consumes a `token68` (`abc+/==`) if one follows, up to (not
    /// including) the next comma or the end. Leaves the cursor alone and
    /// returns false otherwise.
    fn token68(&mut self) -> bool {
        let mut probe = Lexer {
            s: self.s,
            pos: self.pos,
        };
        let start = probe.pos;
        while probe
            .peek()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
        {
            probe.pos += 1;
        }
        if probe.pos == start {
            return false;
        }
        while probe.peek() == Some(b'=') {
            probe.pos += 1;
        }
        probe.skip_ws();
        if probe.at_end() || probe.peek() == Some(b',') {
            self.pos = probe.pos;
            true
        } else {
            false
        }
    }
}

/// Parses one `WWW-Authenticate` header value into its challenges.
///
/// Scheme and parameter names are case-insensitive; parameter values may be
/// tokens or quoted strings (which may contain commas and escaped quotes).
/// Several challenges may share one header value
/// (`Basic realm="a", Bearer realm="b"`). A `Bearer` challenge must carry a
/// `realm`.
pub fn parse_challenges(value: &str) -> Result<Vec<Challenge>, ChallengeError> {
    let mut lx = Lexer {
        s: value.as_bytes(),
        pos: 0,
    };
    let mut out = Vec::new();
    lx.skip_ws_commas();
    while !lx.at_end() {
        let scheme = lx
            .token()
            .ok_or(ChallengeError::ExpectedToken(lx.pos))?
            .to_ascii_lowercase();
        let mut params: Vec<(String, String)> = Vec::new();
        lx.skip_ws();
        // token68 form (`Negotiate abc==`), recognised only as the first
        // element after the scheme.
        if !lx.token68() {
            loop {
                lx.skip_ws_commas();
                if lx.at_end() || !lx.next_is_param() {
                    break;
                }
                let name = lx
                    .token()
                    .ok_or(ChallengeError::ExpectedToken(lx.pos))?
                    .to_ascii_lowercase();
                lx.skip_ws();
                if lx.peek() != Some(b'=') {
                    return Err(ChallengeError::ExpectedEquals(name));
                }
                lx.pos += 1;
                lx.skip_ws();
                let val = if lx.peek() == Some(b'"') {
                    lx.quoted()?
                } else {
                    lx.token()
                        .ok_or(ChallengeError::ExpectedToken(lx.pos))?
                        .to_string()
                };
                params.push((name, val));
                lx.skip_ws();
                if !lx.at_end() && lx.peek() != Some(b',') {
                    return Err(ChallengeError::Unexpected(lx.pos));
                }
            }
        }
        let param = |n: &str| params.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        out.push(match scheme.as_str() {
            "bearer" => Challenge::Bearer(BearerChallenge {
                realm: param("realm")
                    .filter(|r| !r.is_empty())
                    .ok_or(ChallengeError::MissingRealm)?,
                service: param("service"),
                scope: param("scope"),
            }),
            "basic" => Challenge::Basic {
                realm: param("realm"),
            },
            _ => Challenge::Other(scheme),
        });
        lx.skip_ws_commas();
    }
    if out.is_empty() {
        return Err(ChallengeError::Empty);
    }
    Ok(out)
}

/// Percent-encodes a query component: everything but RFC 3986 unreserved
/// characters is escaped.
pub fn percent_encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The token endpoint URL for a challenge: `realm?service=…&scope=…`, with
/// values percent-encoded and `&` used if the realm already has a query.
pub fn token_url(realm: &str, service: Option<&str>, scope: &str) -> String {
    let mut url = realm.to_string();
    let mut sep = if realm.contains('?') { '&' } else { '?' };
    if let Some(service) = service {
        url.push(sep);
        url.push_str("service=");
        url.push_str(&percent_encode_query(service));
        sep = '&';
    }
    url.push(sep);
    url.push_str("scope=");
    url.push_str(&percent_encode_query(scope));
    url
}

/// The default scope for pulling a repository.
pub fn pull_scope(repo: &str) -> String {
    format!("repository:{repo}:pull")
}

/// Lifetime assumed when the token endpoint gives no `expires_in`.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// A token as issued by a token endpoint.
#[derive(Clone)]
pub struct Token {
    /// The ready-made `Authorization: Bearer …` header value (marked
    /// sensitive so it is never printed).
    pub header: HeaderValue,
    /// How long the token is valid according to the endpoint.
    pub lifetime: Duration,
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
    pub fn cache_ttl(&self) -> Duration {
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
pub fn parse_token_response(body: &[u8]) -> Result<Token, String> {
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
pub struct TokenKey {
    /// Token endpoint URL.
    pub realm: String,
    /// `service` parameter, if any.
    pub service: Option<String>,
    /// Requested scope.
    pub scope: String,
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
pub struct TokenCache {
    /// The moka cache.
    inner: moka::future::Cache<TokenKey, Token>,
}

impl Default for TokenCache {
    fn default() -> Self {
        Self::new()
    }
}

impl TokenCache {
    /// An empty cache holding at most 10 000 tokens.
    pub fn new() -> TokenCache {
        TokenCache {
            inner: moka::future::Cache::builder()
                .max_capacity(10_000)
                .expire_after(TokenExpiry)
                .build(),
        }
    }

    /// Returns the cached token for `key`, or runs `fetch` (once, however
    /// many callers ask at the same time) and caches its result. Errors are
    /// not cached.
    pub async fn get_or_fetch<F, E>(&self, key: TokenKey, fetch: F) -> Result<Token, Arc<E>>
    where
        F: Future<Output = Result<Token, E>>,
        E: Send + Sync + 'static,
    {
        self.inner.try_get_with(key, fetch).await
    }

    /// Forgets the token for `key` if it is still `rejected` (one the
    /// registry refused), so the next request fetches a fresh one.
    pub async fn invalidate_if(&self, key: &TokenKey, rejected: &HeaderValue) {
        if let Some(current) = self.inner.get(key).await
            && current.header == *rejected
        {
            self.inner.invalidate(key).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(realm: &str, service: Option<&str>, scope: Option<&str>) -> Challenge {
        Challenge::Bearer(BearerChallenge {
            realm: realm.into(),
            service: service.map(Into::into),
            scope: scope.map(Into::into),
        })
    }

    #[test]
    fn docker_hub_challenge() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        )
        .unwrap();
        assert_eq!(
            c,
            vec![bearer(
                "https://auth.docker.io/token",
                Some("registry.docker.io"),
                Some("repository:library/alpine:pull")
            )]
        );
    }

    #[test]
    fn quoted_values_may_hold_commas_and_escapes() {
        let c = parse_challenges(
            r#"Bearer realm="https://a/token",scope="repository:a/b:pull,push",service="x\"y""#,
        )
        .unwrap();
        assert_eq!(
            c,
            vec![bearer(
                "https://a/token",
                Some("x\"y"),
                Some("repository:a/b:pull,push")
            )]
        );
    }

    #[test]
    fn unquoted_values_whitespace_and_case() {
        let c = parse_challenges("bEaReR  Realm = tok , SERVICE=reg ,scope=\"s\"").unwrap();
        assert_eq!(c, vec![bearer("tok", Some("reg"), Some("s"))]);
        let c = parse_challenges("BASIC realm=\"Registry Realm\"").unwrap();
        assert_eq!(
            c,
            vec![Challenge::Basic {
                realm: Some("Registry Realm".into())
            }]
        );
        assert_eq!(
            parse_challenges("Basic").unwrap(),
            vec![Challenge::Basic { realm: None }]
        );
    }

    #[test]
    fn scope_and_service_are_optional() {
        let c = parse_challenges(r#"Bearer realm="https://a/token""#).unwrap();
        assert_eq!(c, vec![bearer("https://a/token", None, None)]);
    }

    #[test]
    fn several_challenges_in_one_value() {
        let c = parse_challenges(
            r#"Basic realm="a, b", Bearer realm="https://t",service=s, Negotiate abc==, Digest realm=x"#,
        )
        .unwrap();
        assert_eq!(
            c,
            vec![
                Challenge::Basic {
                    realm: Some("a, b".into())
                },
                bearer("https://t", Some("s"), None),
                Challenge::Other("negotiate".into()),
                Challenge::Other("digest".into()),
            ]
        );
    }

    #[test]
    fn errors() {
        assert_eq!(parse_challenges(""), Err(ChallengeError::Empty));
        assert_eq!(parse_challenges("  , "), Err(ChallengeError::Empty));
        assert_eq!(
            parse_challenges(r#"Bearer service="x""#),
            Err(ChallengeError::MissingRealm)
        );
        assert_eq!(
            parse_challenges(r#"Bearer realm="""#),
            Err(ChallengeError::MissingRealm)
        );
        assert_eq!(
            parse_challenges(r#"Bearer realm="https://x"#),
            Err(ChallengeError::UnterminatedQuote)
        );
        assert!(matches!(
            parse_challenges(r#"Bearer realm="a" junk"#),
            Err(ChallengeError::Unexpected(_))
        ));
        assert!(matches!(
            parse_challenges(r#"Bearer realm=x, scope="#),
            Err(ChallengeError::ExpectedToken(_))
        ));
        assert_eq!(
            parse_challenges("Bearer realm="),
            Err(ChallengeError::MissingRealm)
        );
        assert!(matches!(
            parse_challenges(r#""quoted" realm=x"#),
            Err(ChallengeError::ExpectedToken(0))
        ));
    }

    #[test]
    fn token_urls() {
        assert_eq!(
            token_url("https://a/token", Some("reg istry"), "repository:a/b:pull"),
            "https://a/token?service=reg%20istry&scope=repository%3Aa%2Fb%3Apull"
        );
        assert_eq!(
            token_url("https://a/token?x=1", None, "s&t"),
            "https://a/token?x=1&scope=s%26t"
        );
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
