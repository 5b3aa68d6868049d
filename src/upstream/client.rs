//! The client side: requests to one upstream registry.
//!
//! [`Upstream::send`] issues one registry API request and deals with
//! everything between stowage and the registry's answer: token and basic
//! authentication (Docker token specification), redirects to object storage,
//! and timeouts. The response body is handed back unread, streaming.

use std::borrow::Cow;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::config::UpstreamConfig;
use super::error::UpstreamError;
use crate::error::ConfigError;
use crate::metrics::Metrics;
use crate::oci::headers::{RATELIMIT_LIMIT, RATELIMIT_REMAINING};
use crate::upstream::auth::{
    Challenge, Token, TokenCache, TokenKey, parse_challenges, pull_scope, token_url,
};

/// Redirects followed for one request before giving up.
const MAX_REDIRECTS: usize = 5;

/// Largest token endpoint answer accepted.
const MAX_TOKEN_BODY: usize = 1024 * 1024;

/// Request headers never copied from the caller: connection-level headers,
/// and the ones `send` sets itself.
const STRIPPED_HEADERS: &[header::HeaderName] = &[
    header::HOST,
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::CONTENT_LENGTH,
    header::USER_AGENT,
];

/// How this upstream last asked us to authenticate, so later requests can
/// authenticate up front instead of collecting a 401 first.
#[derive(Debug, Clone)]
enum Remembered {
    /// Bearer tokens from this realm and service.
    Bearer {
        /// Token endpoint URL.
        realm: String,
        /// `service` parameter for the token endpoint.
        service: Option<String>,
    },
    /// Basic credentials.
    Basic,
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// One upstream registry: a pooled HTTP/1.1 + HTTP/2 client with its
/// credentials, remembered challenge and token cache.
pub struct Upstream {
    /// `cfg.host`.
    host: String,
    /// `cfg.url` without trailing slashes.
    base: String,
    /// `cfg.tag_ttl`.
    tag_ttl: Duration,
    /// `cfg.library_prefix`.
    library_prefix: bool,
    /// Bound on each exchange up to its response headers.
    timeout: Duration,
    /// `Authorization: Basic …` when a username is configured.
    basic: Option<HeaderValue>,
    /// `stowage/<version>`.
    user_agent: HeaderValue,
    /// Pooled HTTP/1.1 + HTTP/2 client, http and https.
    client: HttpClient,
    /// Bearer tokens by realm, service and scope.
    tokens: TokenCache,
    /// How the upstream last asked us to authenticate.
    challenge: Mutex<Option<Remembered>>,
    /// Where exchanges, latencies and rate limits are counted.
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("host", &self.host)
            .field("url", &self.base)
            .field("tag_ttl", &self.tag_ttl)
            .field("library_prefix", &self.library_prefix)
            .field("timeout", &self.timeout)
            .field("credentials", &self.basic.is_some())
            .finish_non_exhaustive()
    }
}

/// The system's trusted roots, loaded once per process; Mozilla's
/// (webpki-roots) when the system has none.
fn system_roots() -> rustls::RootCertStore {
    static ROOTS: OnceLock<rustls::RootCertStore> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let loaded = rustls_native_certs::load_native_certs();
            if !loaded.errors.is_empty() {
                tracing::debug!(errors = ?loaded.errors, "errors loading native root certificates");
            }
            let mut store = rustls::RootCertStore::empty();
            let (added, ignored) = store.add_parsable_certificates(loaded.certs);
            tracing::debug!(added, ignored, "loaded native root certificates");
            if store.is_empty() {
                tracing::info!("no native root certificates found; using the webpki roots");
                store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            }
            store
        })
        .clone()
}

fn config_invalid(cfg: &UpstreamConfig, key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: format!("upstream.{}.{key}", cfg.host),
        message: message.into(),
    }
}

fn tls_config(cfg: &UpstreamConfig) -> Result<rustls::ClientConfig, ConfigError> {
    let mut roots = system_roots();
    if let Some(path) = &cfg.ca_file {
        let pem = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let certs = rustls_pemfile::certs(&mut pem.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| config_invalid(cfg, "ca_file", format!("{}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(config_invalid(
                cfg,
                "ca_file",
                format!("{} holds no PEM certificates", path.display()),
            ));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| config_invalid(cfg, "ca_file", format!("{}: {e}", path.display())))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| config_invalid(cfg, "url", format!("TLS setup failed: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Logs Docker Hub's pull rate limit when a response carries it
/// (`ratelimit-limit: 100;w=21600`, `ratelimit-remaining: 76;w=21600`, on
/// manifest responses), and every 429 with its `Retry-After`.
fn log_rate_limit(host: &str, method: &Method, url: &str, resp: &Response<Incoming>) {
    let get = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok());
    if let Some(remaining) = get(RATELIMIT_REMAINING.as_str()) {
        let limit = get(RATELIMIT_LIMIT.as_str()).unwrap_or("-");
        tracing::info!(upstream = %host, %method, %url, limit, remaining, "upstream rate limit");
    }
    if resp.status() == StatusCode::TOO_MANY_REQUESTS {
        let retry_after = get(header::RETRY_AFTER.as_str()).unwrap_or("-");
        tracing::warn!(upstream = %host, %method, %url, retry_after, "upstream rate limit exceeded (429)");
    }
}

/// A URL for logs: the query of redirect targets (pre-signed URLs carry
/// signatures there) is left out.
fn loggable(uri: &Uri, keep_query: bool) -> String {
    if keep_query || uri.query().is_none() {
        return uri.to_string();
    }
    format!(
        "{}://{}{}?…",
        uri.scheme_str().unwrap_or("?"),
        uri.authority().map(|a| a.as_str()).unwrap_or(""),
        uri.path()
    )
}

fn is_redirect(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::MOVED_PERMANENTLY
            | StatusCode::FOUND
            | StatusCode::SEE_OTHER
            | StatusCode::TEMPORARY_REDIRECT
            | StatusCode::PERMANENT_REDIRECT
    )
}

/// Removes `.` and `..` segments from an absolute path (RFC 3986 §5.2.4).
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

/// Resolves a `Location` value against the URL that produced it. Only http
/// and https targets are accepted.
fn resolve_location(base: &Uri, location: &str) -> Result<Uri, UpstreamError> {
    let bad = |why: &str| UpstreamError::Protocol(format!("bad redirect to {location:?}: {why}"));
    let location = location.split('#').next().unwrap_or("").trim();
    if location.is_empty() {
        return Err(bad("empty Location"));
    }
    let scheme = base.scheme_str().unwrap_or("https");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or("");
    let has_scheme = location.split_once(':').is_some_and(|(s, _)| {
        !s.is_empty()
            && s.starts_with(|c: char| c.is_ascii_alphabetic())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    });
    let absolute = if has_scheme {
        location.to_string()
    } else if location.starts_with("//") {
        format!("{scheme}:{location}")
    } else {
        let (path, query) = match location.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (location, None),
        };
        let path = if path.is_empty() {
            base.path().to_string()
        } else if path.starts_with('/') {
            remove_dot_segments(path)
        } else {
            let base_path = base.path();
            let dir = &base_path[..base_path.rfind('/').map_or(0, |i| i + 1)];
            let dir = if dir.is_empty() { "/" } else { dir };
            remove_dot_segments(&format!("{dir}{path}"))
        };
        let query = query.map(|q| format!("?{q}")).unwrap_or_default();
        format!("{scheme}://{authority}{path}{query}")
    };
    let uri: Uri = absolute.parse().map_err(|_| bad("not a valid URL"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(bad("only http and https are followed")),
    }
    if uri.host().is_none() {
        return Err(bad("no host"));
    }
    Ok(uri)
}

/// The challenge to answer from a 401's `WWW-Authenticate` headers: the first
/// Bearer, else the first Basic. `None` when there is no header or only
/// schemes stowage does not speak; an error when nothing usable parsed and
/// some header was malformed.
fn pick_challenge(headers: &HeaderMap) -> Option<Result<Challenge, UpstreamError>> {
    let mut basic = None;
    let mut error = None;
    for value in headers.get_all(header::WWW_AUTHENTICATE) {
        let parsed = value
            .to_str()
            .map_err(|_| "WWW-Authenticate is not ASCII".to_string())
            .and_then(|v| {
                parse_challenges(v).map_err(|e| format!("bad WWW-Authenticate {v:?}: {e}"))
            });
        match parsed {
            Ok(challenges) => {
                for c in challenges {
                    match c {
                        Challenge::Bearer(_) => return Some(Ok(c)),
                        Challenge::Basic { .. } if basic.is_none() => basic = Some(c),
                        _ => {}
                    }
                }
            }
            Err(e) => error = Some(e),
        }
    }
    match (basic, error) {
        (Some(b), _) => Some(Ok(b)),
        (None, Some(e)) => Some(Err(UpstreamError::Protocol(e))),
        (None, None) => None,
    }
}

impl Upstream {
    /// Builds the pooled hyper-util client (hyper-rustls HttpsConnector over HttpConnector, http1+http2,
    /// native roots + webpki roots fallback, plus cfg.ca_file extra PEM roots; ring provider; both http:// and https://),
    /// resolves the password (cfg.resolve_password()).
    pub fn new(cfg: &UpstreamConfig) -> Result<Upstream, ConfigError> {
        let base = cfg.url.trim_end_matches('/').to_string();
        let uri: Uri = base
            .parse()
            .map_err(|e| config_invalid(cfg, "url", format!("{:?}: {e}", cfg.url)))?;
        if !matches!(uri.scheme_str(), Some("http") | Some("https")) || uri.host().is_none() {
            return Err(config_invalid(
                cfg,
                "url",
                format!("{:?} must be an http:// or https:// URL", cfg.url),
            ));
        }

        let password = cfg.resolve_password()?;
        let basic = match &cfg.username {
            Some(user) => {
                let raw = format!("{user}:{}", password.as_deref().unwrap_or(""));
                let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
                let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
                    .map_err(|_| config_invalid(cfg, "username", "cannot be sent in a header"))?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(cfg.timeout));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(cfg)?)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(https);

        Ok(Upstream {
            host: cfg.host.clone(),
            base,
            tag_ttl: cfg.tag_ttl,
            library_prefix: cfg.library_prefix,
            timeout: cfg.timeout,
            basic,
            user_agent: HeaderValue::from_static(concat!("stowage/", env!("CARGO_PKG_VERSION"))),
            client,
            tokens: TokenCache::new(),
            challenge: Mutex::new(None),
            metrics: Arc::new(Metrics::new()),
        })
    }

    /// Counts this upstream's requests in `metrics` (a fresh, unexported
    /// set is used until this is called).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Upstream {
        self.metrics = metrics;
        self
    }

    /// The metrics this upstream reports to (also used by the caches for
    /// what they verify of its answers).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The registry host clients name this upstream by (`cfg.host`).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// How long a tag's manifest is served without asking upstream again.
    pub fn tag_ttl(&self) -> Duration {
        self.tag_ttl
    }

    /// The repository name as upstream knows it: `library/` + repo when cfg.library_prefix and repo has no '/'.
    pub fn upstream_repo<'a>(&self, repo: &'a str) -> Cow<'a, str> {
        if self.library_prefix && !repo.contains('/') {
            Cow::Owned(format!("library/{repo}"))
        } else {
            Cow::Borrowed(repo)
        }
    }

    /// Sends `method` (GET or HEAD) to `{url}/v2/{upstream_repo(repo)}/{tail}` (tail e.g. "manifests/latest",
    /// "blobs/sha256:…", "tags/list?n=10&last=x", "referrers/sha256:…"; already validated by the caller; url may have a path prefix).
    /// `headers` (Accept, Range, …) are copied onto the request. Returns the final response (any status, incl. 404/429/5xx)
    /// with its streaming body.
    ///
    /// Authentication is handled here: a 401 carrying a Bearer or Basic
    /// challenge is answered once (fetching a token if needed), and the
    /// challenge is remembered so later requests authenticate up front. A
    /// 401 that survives the retry is returned as-is. Redirects are followed
    /// (at most 5) without the `Authorization` header. The configured
    /// timeout bounds each HTTP exchange up to its response headers.
    /// Caller-supplied `Host`, `Authorization`, `User-Agent` and hop-by-hop
    /// headers are ignored.
    pub async fn send(
        &self,
        method: Method,
        repo: &str,
        tail: &str,
        mut headers: HeaderMap,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let upstream_repo = self.upstream_repo(repo);
        let url = format!("{}/v2/{}/{}", self.base, upstream_repo, tail);
        let uri: Uri = url
            .parse()
            .map_err(|e| UpstreamError::Protocol(format!("bad request URL {url:?}: {e}")))?;
        for name in STRIPPED_HEADERS {
            headers.remove(name);
        }
        let default_scope = pull_scope(&upstream_repo);
        let kind = request_kind(tail);

        // Authenticate up front when we know how.
        let remembered = self.remembered();
        let mut sent_token: Option<(TokenKey, HeaderValue)> = None;
        let auth = match remembered {
            Some(Remembered::Bearer { realm, service }) => {
                let key = TokenKey {
                    realm,
                    service,
                    scope: default_scope.clone(),
                };
                let token = self.token(key.clone()).await?;
                sent_token = Some((key, token.header.clone()));
                Some(token.header)
            }
            Some(Remembered::Basic) => self.basic.clone(),
            None => None,
        };

        let resp = self
            .follow(kind, &method, &uri, &headers, auth.as_ref())
            .await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }

        let retry_auth = match pick_challenge(resp.headers()) {
            None => return Ok(resp),
            Some(Err(e)) => {
                tracing::warn!(upstream = %self.host, error = %e, "cannot understand upstream's challenge");
                return Err(e);
            }
            Some(Ok(Challenge::Bearer(challenge))) => {
                if let Some((key, header)) = &sent_token {
                    self.tokens.invalidate_if(key, header).await;
                }
                self.remember(Remembered::Bearer {
                    realm: challenge.realm.clone(),
                    service: challenge.service.clone(),
                });
                let key = TokenKey {
                    realm: challenge.realm,
                    service: challenge.service,
                    scope: challenge.scope.unwrap_or(default_scope),
                };
                self.token(key).await?.header
            }
            Some(Ok(Challenge::Basic { .. })) => {
                let Some(basic) = &self.basic else {
                    tracing::warn!(upstream = %self.host, "upstream wants basic auth but no credentials are configured");
                    return Ok(resp);
                };
                if auth.as_ref() == Some(basic) {
                    tracing::warn!(upstream = %self.host, "upstream rejected the configured credentials");
                    return Ok(resp);
                }
                self.remember(Remembered::Basic);
                basic.clone()
            }
            Some(Ok(Challenge::Other(_))) => return Ok(resp),
        };
        drop(resp);

        let resp = self
            .follow(kind, &method, &uri, &headers, Some(&retry_auth))
            .await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            tracing::warn!(upstream = %self.host, url = %uri, "upstream still answers 401 after authenticating");
        }
        Ok(resp)
    }

    fn remembered(&self) -> Option<Remembered> {
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

    /// A token for `key`, cached or freshly fetched (one fetch per key at a
    /// time).
    async fn token(&self, key: TokenKey) -> Result<Token, UpstreamError> {
        self.tokens
            .get_or_fetch(key.clone(), self.fetch_token(key))
            .await
            .map_err(|e| (*e).clone())
    }

    async fn fetch_token(&self, key: TokenKey) -> Result<Token, UpstreamError> {
        let realm = &key.realm;
        let url = token_url(realm, key.service.as_deref(), &key.scope);
        let uri: Uri = url.parse().map_err(|_| {
            UpstreamError::Protocol(format!("token realm {realm:?} is not a valid URL"))
        })?;
        if !matches!(uri.scheme_str(), Some("http") | Some("https")) || uri.host().is_none() {
            return Err(UpstreamError::Protocol(format!(
                "token realm {realm:?} is not an http(s) URL"
            )));
        }
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let fail = |message: String, status: Option<StatusCode>| {
            tracing::warn!(upstream = %self.host, realm = %realm, scope = %key.scope, "token request failed: {message}");
            UpstreamError::Auth { message, status }
        };
        let resp = match self
            .follow("token", &Method::GET, &uri, &headers, self.basic.as_ref())
            .await
        {
            Ok(resp) => resp,
            Err(UpstreamError::Unreachable { message, cause }) => {
                tracing::warn!(upstream = %self.host, realm = %realm, "token endpoint unreachable: {message}");
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
        let body = tokio::time::timeout(
            self.timeout,
            Limited::new(resp.into_body(), MAX_TOKEN_BODY).collect(),
        )
        .await
        .map_err(|_| {
            fail(
                format!("token endpoint {realm} timed out sending its answer"),
                None,
            )
        })?
        .map_err(|e| fail(format!("reading token endpoint {realm}: {e}"), None))?
        .to_bytes();
        crate::upstream::auth::parse_token_response(&body)
            .map_err(|e| fail(format!("{realm}: {e}"), None))
    }

    /// Sends a request and follows redirects (at most [`MAX_REDIRECTS`]).
    /// `auth` goes to the first hop only. `kind` labels the metrics.
    async fn follow(
        &self,
        kind: &'static str,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        auth: Option<&HeaderValue>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut uri = uri.clone();
        for hop in 0..=MAX_REDIRECTS {
            let auth = if hop == 0 { auth } else { None };
            let resp = self
                .exchange(kind, method, &uri, headers, auth, hop == 0)
                .await?;
            if !is_redirect(resp.status()) {
                return Ok(resp);
            }
            let Some(location) = resp.headers().get(header::LOCATION) else {
                return Ok(resp);
            };
            let location = location.to_str().map_err(|_| {
                UpstreamError::Protocol("redirect Location is not ASCII".to_string())
            })?;
            uri = resolve_location(&uri, location)?;
        }
        Err(UpstreamError::Protocol(format!(
            "more than {MAX_REDIRECTS} redirects"
        )))
    }

    /// One HTTP exchange, bounded by the timeout up to the response headers,
    /// counted in the metrics as `kind`.
    async fn exchange(
        &self,
        kind: &'static str,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        auth: Option<&HeaderValue>,
        first_hop: bool,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(uri.clone())
            .body(Empty::<Bytes>::new())
            .map_err(|e| UpstreamError::Protocol(format!("cannot build request: {e}")))?;
        let req_headers = req.headers_mut();
        for (name, value) in headers {
            req_headers.append(name, value.clone());
        }
        req_headers.insert(header::USER_AGENT, self.user_agent.clone());
        if let Some(auth) = auth {
            req_headers.insert(header::AUTHORIZATION, auth.clone());
        }

        let started = Instant::now();
        let url = loggable(uri, first_hop);
        let result = tokio::time::timeout(self.timeout, self.client.request(req)).await;
        let elapsed = started.elapsed();
        let status = match &result {
            Ok(Ok(resp)) => Some(resp.status()),
            _ => None,
        };
        self.metrics
            .upstream_exchange(&self.host, kind, status, elapsed);
        match result {
            Ok(Ok(resp)) => {
                self.metrics.upstream_ratelimit(&self.host, resp.headers());
                log_rate_limit(&self.host, method, &url, &resp);
                tracing::debug!(
                    upstream = %self.host,
                    %method,
                    %url,
                    status = resp.status().as_u16(),
                    elapsed_ms = elapsed.as_millis() as u64,
                    "upstream request"
                );
                Ok(resp)
            }
            Ok(Err(e)) => {
                let message = format!("{method} {url}: {}", crate::error::chain(&e));
                tracing::debug!(upstream = %self.host, elapsed_ms = elapsed.as_millis() as u64, "upstream request failed: {message}");
                Err(UpstreamError::unreachable(message, e))
            }
            Err(_) => {
                let message = format!(
                    "{method} {url}: no response within {}",
                    humantime::format_duration(self.timeout)
                );
                tracing::debug!(upstream = %self.host, "upstream request timed out: {message}");
                Err(UpstreamError::Unreachable {
                    message,
                    cause: None,
                })
            }
        }
    }
}

/// The metrics `kind` of a registry API request, from its path tail
/// (`manifests/…`, `blobs/…`, `tags/list…`, `referrers/…`).
fn request_kind(tail: &str) -> &'static str {
    match tail.split('/').next() {
        Some("manifests") => "manifest",
        Some("blobs") => "blob",
        Some("tags") => "tags",
        Some("referrers") => "referrers",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;

    type Reply = Response<Full<Bytes>>;

    /// What a test server saw of one request.
    #[derive(Debug, Clone)]
    struct Seen {
        method: Method,
        path: String,
        authorization: Option<String>,
        range: Option<String>,
        accept: Option<String>,
        user_agent: Option<String>,
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<Seen>>);

    impl Recorder {
        fn all(&self) -> Vec<Seen> {
            self.0.lock().unwrap().clone()
        }
        fn count(&self, prefix: &str) -> usize {
            self.all()
                .iter()
                .filter(|s| s.path.starts_with(prefix))
                .count()
        }
    }

    fn reply(status: u16, body: &str) -> Reply {
        Response::builder()
            .status(status)
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    }

    fn with_header(mut r: Reply, name: header::HeaderName, value: &str) -> Reply {
        r.headers_mut()
            .append(name, HeaderValue::from_str(value).unwrap());
        r
    }

    /// Starts an HTTP/1.1 server on 127.0.0.1:0. `make` receives the bound
    /// address and returns the handler; every request is recorded.
    async fn serve<H>(make: impl FnOnce(SocketAddr) -> H) -> (SocketAddr, Arc<Recorder>)
    where
        H: Fn(&Request<Incoming>) -> Reply + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler = Arc::new(make(addr));
        let recorder = Arc::new(Recorder::default());
        let rec = recorder.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (handler, rec) = (handler.clone(), rec.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let h = |n: header::HeaderName| {
                            req.headers()
                                .get(n)
                                .map(|v| v.to_str().unwrap().to_string())
                        };
                        rec.0.lock().unwrap().push(Seen {
                            method: req.method().clone(),
                            path: req.uri().to_string(),
                            authorization: h(header::AUTHORIZATION),
                            range: h(header::RANGE),
                            accept: h(header::ACCEPT),
                            user_agent: h(header::USER_AGENT),
                        });
                        let resp = handler(&req);
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (addr, recorder)
    }

    fn config(url: String) -> UpstreamConfig {
        UpstreamConfig {
            host: "test.local".into(),
            url,
            library_prefix: false,
            timeout: Duration::from_secs(2),
            ..crate::upstream::config::docker_hub()
        }
    }

    async fn get(up: &Upstream, repo: &str, tail: &str) -> (u16, String) {
        let resp = up
            .send(Method::GET, repo, tail, HeaderMap::new())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// A registry demanding bearer tokens from its own `/token` endpoint.
    /// Tokens are `tok-N`; only tokens of the current generation are valid.
    struct BearerRegistry {
        addr: SocketAddr,
        rec: Arc<Recorder>,
        issued: Arc<AtomicUsize>,
        generation: Arc<AtomicUsize>,
    }

    async fn bearer_registry(expires_in: u64, challenge_scope: bool) -> BearerRegistry {
        let issued = Arc::new(AtomicUsize::new(0));
        let generation = Arc::new(AtomicUsize::new(0));
        let (iss, generation_h) = (issued.clone(), generation.clone());
        let (addr, rec) = serve(move |addr| {
            move |req: &Request<Incoming>| {
                let path = req.uri().path();
                if path == "/token" {
                    let query = req.uri().query().unwrap_or("");
                    if !query.contains("service=test%20registry") {
                        return reply(400, "bad service");
                    }
                    let n = iss.fetch_add(1, Ordering::SeqCst) + 1;
                    generation_h.store(n, Ordering::SeqCst);
                    return reply(
                        200,
                        &format!(r#"{{"token":"tok-{n}","expires_in":{expires_in}}}"#),
                    );
                }
                let want = format!("Bearer tok-{}", generation_h.load(Ordering::SeqCst));
                let got = req.headers().get(header::AUTHORIZATION);
                if got.is_some_and(|g| g == want.as_str()) {
                    return reply(200, &format!("ok {path}"));
                }
                let repo = path
                    .trim_start_matches("/v2/")
                    .rsplit_once("/manifests/")
                    .map(|(r, _)| r.to_string())
                    .unwrap_or_default();
                let scope = if challenge_scope {
                    format!(r#",scope="repository:{repo}:pull""#)
                } else {
                    String::new()
                };
                with_header(
                    reply(401, "unauthorized"),
                    header::WWW_AUTHENTICATE,
                    &format!(
                        r#"Bearer realm="http://{addr}/token",service="test registry"{scope}"#
                    ),
                )
            }
        })
        .await;
        BearerRegistry {
            addr,
            rec,
            issued,
            generation,
        }
    }

    #[tokio::test]
    async fn bearer_token_fetched_once_and_reused() {
        let reg = bearer_registry(300, true).await;
        let up = Upstream::new(&config(format!("http://{}", reg.addr))).unwrap();
        for _ in 0..3 {
            assert_eq!(
                get(&up, "foo/bar", "manifests/latest").await,
                (200, "ok /v2/foo/bar/manifests/latest".to_string())
            );
        }
        assert_eq!(reg.issued.load(Ordering::SeqCst), 1);
        // One 401, its retry, then two requests authenticated up front.
        assert_eq!(reg.rec.count("/v2/"), 4);
        let seen = reg.rec.all();
        let token_req = seen.iter().find(|s| s.path.starts_with("/token")).unwrap();
        assert_eq!(
            token_req.path,
            "/token?service=test%20registry&scope=repository%3Afoo%2Fbar%3Apull"
        );
        assert_eq!(token_req.authorization, None, "anonymous token request");
        assert!(seen[0].authorization.is_none());
        assert_eq!(
            seen[0].user_agent.as_deref(),
            Some(concat!("stowage/", env!("CARGO_PKG_VERSION")))
        );
    }

    #[tokio::test]
    async fn concurrent_first_requests_share_one_token_fetch() {
        let reg = bearer_registry(300, true).await;
        let up = Arc::new(Upstream::new(&config(format!("http://{}", reg.addr))).unwrap());
        let tasks: Vec<_> = (0..6)
            .map(|_| {
                let up = up.clone();
                tokio::spawn(async move { get(&up, "foo/bar", "manifests/latest").await.0 })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), 200);
        }
        assert_eq!(reg.issued.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn token_refetched_after_expiry_and_after_rejection() {
        let reg = bearer_registry(1, false).await;
        let mut cfg = config(format!("http://{}", reg.addr));
        cfg.username = Some("user".into());
        cfg.password = Some("secret".into());
        let up = Upstream::new(&cfg).unwrap();
        assert_eq!(get(&up, "foo/bar", "manifests/a").await.0, 200);
        assert_eq!(get(&up, "foo/bar", "manifests/b").await.0, 200);
        assert_eq!(reg.issued.load(Ordering::SeqCst), 1);
        // expires_in=1 → cached for 0.5 s.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(get(&up, "foo/bar", "manifests/c").await.0, 200);
        assert_eq!(reg.issued.load(Ordering::SeqCst), 2);
        // No new 401 round trip: the challenge was remembered.
        assert_eq!(reg.rec.count("/v2/"), 4);
        // The token request carried the configured credentials, and the
        // scope defaulted to pulling the repository.
        let token_req = reg
            .rec
            .all()
            .into_iter()
            .find(|s| s.path.starts_with("/token"))
            .unwrap();
        assert!(
            token_req
                .path
                .ends_with("&scope=repository%3Afoo%2Fbar%3Apull")
        );
        assert_eq!(
            token_req.authorization.as_deref(),
            Some("Basic dXNlcjpzZWNyZXQ=")
        );

        // The registry revokes the token: one 401, a fresh token, a retry.
        reg.generation.store(99, Ordering::SeqCst);
        assert_eq!(get(&up, "foo/bar", "manifests/d").await.0, 200);
        assert_eq!(reg.issued.load(Ordering::SeqCst), 3);
        assert_eq!(reg.rec.count("/v2/"), 6);
    }

    #[tokio::test]
    async fn rejected_after_retry_returns_401() {
        let (addr, rec) = serve(|addr| {
            move |req: &Request<Incoming>| {
                if req.uri().path() == "/token" {
                    return reply(200, r#"{"access_token":"nope"}"#);
                }
                with_header(
                    reply(401, "go away"),
                    header::WWW_AUTHENTICATE,
                    &format!(r#"Bearer realm="http://{addr}/token""#),
                )
            }
        })
        .await;
        let up = Upstream::new(&config(format!("http://{addr}"))).unwrap();
        assert_eq!(
            get(&up, "a/b", "manifests/x").await,
            (401, "go away".into())
        );
        assert_eq!(rec.count("/v2/"), 2);
        let last = rec.all().into_iter().last().unwrap();
        assert_eq!(last.authorization.as_deref(), Some("Bearer nope"));
    }

    #[tokio::test]
    async fn token_endpoint_failures_are_auth_errors() {
        for answer in [
            reply(403, "denied"),
            reply(200, "<html>"),
            reply(200, r#"{"expires_in":5}"#),
        ] {
            let answer = Arc::new(Mutex::new(Some(answer)));
            let (addr, _) = serve(move |addr| {
                move |req: &Request<Incoming>| {
                    if req.uri().path() == "/token" {
                        return answer
                            .lock()
                            .unwrap()
                            .take()
                            .unwrap_or_else(|| reply(500, "once"));
                    }
                    with_header(
                        reply(401, ""),
                        header::WWW_AUTHENTICATE,
                        &format!(r#"Bearer realm="http://{addr}/token",service=s"#),
                    )
                }
            })
            .await;
            let up = Upstream::new(&config(format!("http://{addr}"))).unwrap();
            let err = up
                .send(Method::GET, "a/b", "manifests/x", HeaderMap::new())
                .await
                .unwrap_err();
            assert!(matches!(err, UpstreamError::Auth { .. }), "{err}");
        }
    }

    #[tokio::test]
    async fn malformed_challenge_is_protocol_error() {
        let (addr, _) = serve(|_| {
            |_: &Request<Incoming>| {
                with_header(
                    reply(401, ""),
                    header::WWW_AUTHENTICATE,
                    r#"Bearer service="no realm""#,
                )
            }
        })
        .await;
        let up = Upstream::new(&config(format!("http://{addr}"))).unwrap();
        let err = up
            .send(Method::GET, "a/b", "manifests/x", HeaderMap::new())
            .await
            .unwrap_err();
        assert!(matches!(err, UpstreamError::Protocol(_)), "{err}");
    }

    fn basic_registry() -> impl Fn(&Request<Incoming>) -> Reply {
        |req: &Request<Incoming>| {
            // user:pw
            if req
                .headers()
                .get(header::AUTHORIZATION)
                .is_some_and(|v| v == "Basic dXNlcjpwdw==")
            {
                reply(200, "welcome")
            } else {
                with_header(
                    reply(401, "who are you"),
                    header::WWW_AUTHENTICATE,
                    r#"Basic realm="Registry Realm""#,
                )
            }
        }
    }

    #[tokio::test]
    async fn basic_auth() {
        let (addr, rec) = serve(|_| basic_registry()).await;
        let mut cfg = config(format!("http://{addr}"));
        cfg.username = Some("user".into());
        cfg.password = Some("pw".into());
        let up = Upstream::new(&cfg).unwrap();
        assert_eq!(
            get(&up, "a/b", "manifests/1").await,
            (200, "welcome".into())
        );
        assert_eq!(
            get(&up, "a/b", "manifests/2").await,
            (200, "welcome".into())
        );
        // 401 + retry, then credentials sent up front.
        assert_eq!(rec.count("/v2/"), 3);

        // Anonymous: the 401 comes back as-is.
        let anon = Upstream::new(&config(format!("http://{addr}"))).unwrap();
        assert_eq!(get(&anon, "a/b", "manifests/1").await.0, 401);

        // Wrong password: retried once, then the 401 comes back.
        let (addr, rec) = serve(|_| basic_registry()).await;
        cfg.url = format!("http://{addr}");
        cfg.password = Some("wrong".into());
        let up = Upstream::new(&cfg).unwrap();
        assert_eq!(get(&up, "a/b", "manifests/1").await.0, 401);
        assert_eq!(get(&up, "a/b", "manifests/1").await.0, 401);
        assert_eq!(rec.count("/v2/"), 3);
    }

    #[tokio::test]
    async fn redirects_drop_authorization_keep_range() {
        // Object storage on another address.
        let (storage, storage_rec) = serve(|_| {
            |req: &Request<Incoming>| {
                if req.uri().path() == "/bucket/blob" {
                    reply(206, "partial")
                } else {
                    reply(404, "")
                }
            }
        })
        .await;
        let reg = bearer_registry(300, true).await;
        let (addr, rec) = serve(move |_| {
            move |req: &Request<Incoming>| {
                let ok = req
                    .headers()
                    .get(header::AUTHORIZATION)
                    .is_some_and(|v| v == "Basic dXNlcjpwdw==");
                match req.uri().path() {
                    "/v2/a/b/blobs/sha256:abc" if ok => with_header(
                        reply(307, ""),
                        header::LOCATION,
                        &format!("http://{storage}/bucket/blob?X-Amz-Signature=s3cr3t"),
                    ),
                    "/v2/a/b/manifests/rel" if ok => {
                        with_header(reply(302, ""), header::LOCATION, "../../other/./m?x=1")
                    }
                    "/v2/a/other/m" => reply(200, "relative ok"),
                    "/v2/a/b/manifests/loop" => {
                        with_header(reply(301, ""), header::LOCATION, "/v2/a/b/manifests/loop")
                    }
                    "/v2/a/b/manifests/bad" => {
                        with_header(reply(308, ""), header::LOCATION, "ftp://x/y")
                    }
                    _ => with_header(
                        reply(401, ""),
                        header::WWW_AUTHENTICATE,
                        r#"Basic realm="r""#,
                    ),
                }
            }
        })
        .await;
        drop(reg);
        let mut cfg = config(format!("http://{addr}"));
        cfg.username = Some("user".into());
        cfg.password = Some("pw".into());
        let up = Upstream::new(&cfg).unwrap();

        let mut headers = HeaderMap::new();
        headers.insert(header::RANGE, HeaderValue::from_static("bytes=0-9"));
        headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer caller"),
        );
        let resp = up
            .send(Method::GET, "a/b", "blobs/sha256:abc", headers.clone())
            .await
            .unwrap();
        assert_eq!(resp.status(), 206);
        let s = storage_rec.all();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].path, "/bucket/blob?X-Amz-Signature=s3cr3t");
        assert_eq!(s[0].authorization, None);
        assert_eq!(s[0].range.as_deref(), Some("bytes=0-9"));
        assert_eq!(s[0].accept.as_deref(), Some("*/*"));
        // The caller's Authorization never reached the registry.
        assert!(
            rec.all()
                .iter()
                .all(|r| r.authorization.as_deref() != Some("Bearer caller"))
        );

        // HEAD follows too.
        let resp = up
            .send(Method::HEAD, "a/b", "blobs/sha256:abc", headers)
            .await
            .unwrap();
        assert_eq!(resp.status(), 206);
        assert_eq!(storage_rec.all()[1].method, Method::HEAD);

        // Relative Location on the same host: no Authorization either.
        assert_eq!(
            get(&up, "a/b", "manifests/rel").await,
            (200, "relative ok".into())
        );
        let target = rec
            .all()
            .into_iter()
            .find(|r| r.path == "/v2/a/other/m?x=1")
            .unwrap();
        assert_eq!(target.authorization, None);

        let err = up
            .send(Method::GET, "a/b", "manifests/loop", HeaderMap::new())
            .await
            .unwrap_err();
        assert!(matches!(err, UpstreamError::Protocol(_)), "{err}");
        assert_eq!(rec.count("/v2/a/b/manifests/loop"), 6);
        let err = up
            .send(Method::GET, "a/b", "manifests/bad", HeaderMap::new())
            .await
            .unwrap_err();
        assert!(matches!(err, UpstreamError::Protocol(_)), "{err}");
    }

    #[tokio::test]
    async fn library_prefix_and_path_prefix() {
        let reg = bearer_registry(300, false).await;
        let mut cfg = config(format!("http://{}/", reg.addr));
        cfg.library_prefix = true;
        let up = Upstream::new(&cfg).unwrap();
        assert_eq!(up.upstream_repo("alpine"), "library/alpine");
        assert_eq!(up.upstream_repo("foo/bar"), "foo/bar");
        assert!(matches!(up.upstream_repo("foo/bar"), Cow::Borrowed(_)));
        assert_eq!(
            get(&up, "alpine", "manifests/3.20").await,
            (200, "ok /v2/library/alpine/manifests/3.20".into())
        );
        assert!(reg.rec.all().iter().any(|s| s.path
            == "/token?service=test%20registry&scope=repository%3Alibrary%2Falpine%3Apull"));
        assert_eq!(get(&up, "foo/bar", "manifests/1").await.0, 200);
        assert!(
            reg.rec
                .all()
                .iter()
                .any(|s| s.path == "/v2/foo/bar/manifests/1")
        );

        let no_prefix = Upstream::new(&config(format!("http://{}", reg.addr))).unwrap();
        assert_eq!(no_prefix.upstream_repo("alpine"), "alpine");

        // A URL with a path prefix.
        let (addr, rec) = serve(|_| |_: &Request<Incoming>| reply(200, "")).await;
        let mut cfg = config(format!("http://{addr}/mirror/"));
        cfg.library_prefix = true;
        let up = Upstream::new(&cfg).unwrap();
        assert_eq!(up.host(), "test.local");
        assert_eq!(up.tag_ttl(), Duration::from_secs(300));
        let resp = up
            .send(
                Method::GET,
                "alpine",
                "tags/list?n=10&last=x",
                HeaderMap::new(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            rec.all()[0].path,
            "/mirror/v2/library/alpine/tags/list?n=10&last=x"
        );
    }

    #[tokio::test]
    async fn statuses_pass_through() {
        let (addr, _) = serve(|_| {
            |req: &Request<Incoming>| match req.uri().path() {
                "/v2/a/b/manifests/missing" => reply(404, "nope"),
                _ => with_header(reply(429, "slow down"), header::RETRY_AFTER, "1"),
            }
        })
        .await;
        let up = Upstream::new(&config(format!("http://{addr}"))).unwrap();
        assert_eq!(get(&up, "a/b", "manifests/missing").await.0, 404);
        assert_eq!(get(&up, "a/b", "manifests/x").await.0, 429);
    }

    #[tokio::test]
    async fn unreachable_and_timeouts() {
        // Nothing listens on a port we just released.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let up = Upstream::new(&config(format!("http://127.0.0.1:{port}"))).unwrap();
        let err = up
            .send(Method::GET, "a/b", "manifests/x", HeaderMap::new())
            .await
            .unwrap_err();
        assert!(matches!(err, UpstreamError::Unreachable { .. }), "{err}");

        // Accepts connections but never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let mut cfg = config(format!("http://{addr}"));
        cfg.timeout = Duration::from_millis(200);
        let up = Upstream::new(&cfg).unwrap();
        let started = Instant::now();
        let err = up
            .send(Method::GET, "a/b", "manifests/x", HeaderMap::new())
            .await
            .unwrap_err();
        assert!(matches!(err, UpstreamError::Unreachable { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(1));
        hold.abort();

        // A TLS handshake against a plain-HTTP server fails as unreachable.
        let (addr, _) = serve(|_| |_: &Request<Incoming>| reply(200, "")).await;
        let up = Upstream::new(&config(format!("https://{addr}"))).unwrap();
        let err = up
            .send(Method::GET, "a/b", "manifests/x", HeaderMap::new())
            .await
            .unwrap_err();
        assert!(matches!(err, UpstreamError::Unreachable { .. }), "{err}");
    }

    #[test]
    fn new_rejects_bad_config() {
        assert!(Upstream::new(&config("ftp://x".into())).is_err());
        let mut cfg = config("https://x".into());
        cfg.ca_file = Some("/nonexistent/ca.pem".into());
        assert!(matches!(Upstream::new(&cfg), Err(ConfigError::Read { .. })));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        cfg.ca_file = Some(path);
        let e = Upstream::new(&cfg).unwrap_err();
        assert!(e.to_string().contains("ca_file"), "{e}");
        let up = Upstream::new(&config("https://x".into())).unwrap();
        let dbg = format!("{up:?}");
        assert!(dbg.contains("test.local"), "{dbg}");
    }

    #[test]
    fn location_resolution() {
        let base: Uri = "https://reg.example/v2/a/b/blobs/sha256:1?x=y"
            .parse()
            .unwrap();
        let r = |l: &str| resolve_location(&base, l).map(|u| u.to_string());
        assert_eq!(
            r("https://s3.example/bucket/k?sig=1").unwrap(),
            "https://s3.example/bucket/k?sig=1"
        );
        assert_eq!(r("//cdn.example/p").unwrap(), "https://cdn.example/p");
        assert_eq!(r("/other/path").unwrap(), "https://reg.example/other/path");
        assert_eq!(r("c/d").unwrap(), "https://reg.example/v2/a/b/blobs/c/d");
        assert_eq!(r("../../x?q=1").unwrap(), "https://reg.example/v2/a/x?q=1");
        assert_eq!(
            r("?page=2").unwrap(),
            "https://reg.example/v2/a/b/blobs/sha256:1?page=2"
        );
        assert_eq!(r("/a/b#frag").unwrap(), "https://reg.example/a/b");
        assert!(r("").is_err());
        assert!(r("ftp://x/y").is_err());
        assert!(r("http://").is_err());
        assert!(r("/bad path").is_err());
        assert_eq!(remove_dot_segments("/a/b/../../../c"), "/c");
        assert_eq!(remove_dot_segments("/a/./b/."), "/a/b/");
    }

    #[test]
    fn challenge_selection() {
        let mut h = HeaderMap::new();
        assert!(pick_challenge(&h).is_none());
        h.append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Negotiate"),
        );
        assert!(pick_challenge(&h).is_none());
        h.append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer x"),
        );
        assert!(matches!(
            pick_challenge(&h),
            Some(Err(UpstreamError::Protocol(_)))
        ));
        h.append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=r"),
        );
        assert!(matches!(
            pick_challenge(&h),
            Some(Ok(Challenge::Basic { .. }))
        ));
        h.append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"https://t\""),
        );
        assert!(matches!(pick_challenge(&h), Some(Ok(Challenge::Bearer(_)))));
    }

    #[tokio::test]
    async fn metrics_count_exchanges_and_rate_limits() {
        let (addr, _) = serve(|_| {
            |req: &Request<Incoming>| match req.uri().path() {
                "/v2/a/b/manifests/1" => {
                    let r = with_header(
                        reply(200, "m"),
                        header::HeaderName::from_static("ratelimit-limit"),
                        "100;w=21600",
                    );
                    with_header(
                        r,
                        header::HeaderName::from_static("ratelimit-remaining"),
                        "97;w=21600",
                    )
                }
                "/v2/a/b/blobs/sha256:x" => {
                    with_header(reply(307, ""), header::LOCATION, "/storage/x")
                }
                "/storage/x" => reply(200, "blob"),
                _ => reply(404, ""),
            }
        })
        .await;
        let metrics = Arc::new(Metrics::new());
        let up = Upstream::new(&config(format!("http://{addr}")))
            .unwrap()
            .with_metrics(metrics.clone());
        assert!(Arc::ptr_eq(up.metrics(), &metrics));
        assert_eq!(get(&up, "a/b", "manifests/1").await.0, 200);
        assert_eq!(get(&up, "a/b", "blobs/sha256:x").await.0, 200);
        assert_eq!(get(&up, "a/b", "tags/list").await.0, 404);
        let dead = Upstream::new(&config("http://127.0.0.1:9".into()))
            .unwrap()
            .with_metrics(metrics.clone());
        assert!(
            dead.send(Method::GET, "a/b", "referrers/sha256:x", HeaderMap::new())
                .await
                .is_err()
        );
        let text = String::from_utf8(metrics.encode().unwrap()).unwrap();
        for line in [
            r#"stowage_upstream_requests_total{kind="manifest",status="200",upstream="test.local"} 1"#,
            r#"stowage_upstream_requests_total{kind="blob",status="307",upstream="test.local"} 1"#,
            r#"stowage_upstream_requests_total{kind="blob",status="200",upstream="test.local"} 1"#,
            r#"stowage_upstream_requests_total{kind="tags",status="404",upstream="test.local"} 1"#,
            r#"stowage_upstream_requests_total{kind="referrers",status="error",upstream="test.local"} 1"#,
            r#"stowage_upstream_request_duration_seconds_count{kind="blob",upstream="test.local"} 2"#,
            r#"stowage_upstream_ratelimit_remaining{upstream="test.local"} 97"#,
            r#"stowage_upstream_ratelimit_limit{upstream="test.local"} 100"#,
        ] {
            assert!(text.contains(line), "missing {line}:\n{text}");
        }
        assert_eq!(request_kind("tags/list?n=1"), "tags");
        assert_eq!(request_kind("whatever"), "other");
    }

    #[derive(Clone, Default)]
    struct LogCapture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for LogCapture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn rate_limit_headers_and_429_are_logged() {
        let (addr, _) = serve(|_| {
            |req: &Request<Incoming>| match req.uri().path() {
                "/v2/a/b/manifests/1" => {
                    let r = with_header(
                        reply(200, "m"),
                        header::HeaderName::from_static("ratelimit-limit"),
                        "100;w=21600",
                    );
                    with_header(
                        r,
                        header::HeaderName::from_static("ratelimit-remaining"),
                        "76;w=21600",
                    )
                }
                "/v2/a/b/manifests/2" => {
                    with_header(reply(429, "slow down"), header::RETRY_AFTER, "30")
                }
                _ => reply(200, ""),
            }
        })
        .await;
        let capture = LogCapture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let up = Upstream::new(&config(format!("http://{addr}"))).unwrap();
        assert_eq!(get(&up, "a/b", "manifests/3").await.0, 200);
        let quiet = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        assert!(!quiet.contains("rate limit"), "{quiet}");
        assert_eq!(get(&up, "a/b", "manifests/1").await.0, 200);
        assert_eq!(get(&up, "a/b", "manifests/2").await.0, 429);
        let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("upstream rate limit"), "{text}");
        assert!(text.contains(r#"limit="100;w=21600""#), "{text}");
        assert!(text.contains(r#"remaining="76;w=21600""#), "{text}");
        assert!(
            text.contains("upstream rate limit exceeded (429)"),
            "{text}"
        );
        assert!(text.contains(r#"retry_after="30""#), "{text}");
    }
}
