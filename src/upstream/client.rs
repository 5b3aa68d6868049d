//! The client side: requests to one upstream registry.
//!
//! [`Upstream::send`] issues one registry API request and deals with
//! everything between stowage and the registry's answer: token and basic
//! authentication (Docker token specification, `auth.rs`), redirects to
//! object storage (`redirect.rs`), and timeouts. The response body is
//! handed back unread, streaming, as an [`UpstreamBody`]: every read of it
//! is bounded by the upstream's timeout (an idle timeout: a body that sends
//! nothing for that long fails), whoever reads it.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::GaiResolver;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::auth::{Credentials, pull_scope};
use super::config::{AuthMode, UpstreamConfig};
use super::error::UpstreamError;
use super::redirect::{GuardedResolver, RedirectPolicy, refused_in};
use crate::error::ConfigError;
use crate::metrics::Metrics;
use crate::oci::headers::{RATELIMIT_LIMIT, RATELIMIT_REMAINING};

/// Request headers never copied from the caller: connection-level headers,
/// and the ones `send` sets itself. A client's own `Authorization` reaches
/// an upstream only in passthrough mode, and only through `caller.rs`;
/// otherwise the mirror authenticates with its configured credentials
/// (`auth.rs`).
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

type HttpClient<R = GaiResolver> = Client<HttpsConnector<HttpConnector<R>>, Empty<Bytes>>;

/// Which hop of a request an exchange is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Hop {
    /// The request as sent to the registry.
    First,
    /// A redirect target, or the token realm the registry named: connected
    /// to through the guarded resolver, its query left out of logs.
    Redirect,
}

/// The body of an upstream response: hyper's, failing with a
/// [`tower_http::timeout::TimeoutError`] when no frame arrives within the
/// upstream's timeout (tower-http's per-frame timer, reset on each frame).
/// Boxed so that it is `Unpin` like hyper's own body.
pub struct UpstreamBody(std::pin::Pin<Box<tower_http::timeout::TimeoutBody<Incoming>>>);

impl UpstreamBody {
    fn new(idle: Duration, body: Incoming) -> UpstreamBody {
        UpstreamBody(Box::pin(tower_http::timeout::TimeoutBody::new(idle, body)))
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody").finish_non_exhaustive()
    }
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.0.size_hint()
    }
}

/// A 401 from a redirect target: not the registry's challenge.
pub(super) fn redirect_target_401() -> UpstreamError {
    UpstreamError::Protocol(
        "a redirect target answered 401: only the registry's own challenges are answered".into(),
    )
}

/// Whether a body error is an upstream body's idle timeout.
pub(crate) fn is_idle_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if e.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// One upstream registry: a small pool of HTTP/1.1 + HTTP/2 clients with its
/// credentials, remembered challenge and token cache.
pub struct Upstream {
    /// `cfg.host`.
    host: String,
    /// `cfg.url` without trailing slashes.
    pub(super) base: String,
    /// `cfg.tag_ttl`.
    tag_ttl: Duration,
    /// `cfg.library_prefix`.
    library_prefix: bool,
    /// Bound on each exchange up to its response headers, and on each wait
    /// for the next frame of a response body.
    timeout: Duration,
    /// Configured credentials, token cache, remembered challenge.
    pub(super) credentials: Credentials,
    /// `stowage/<version>`.
    user_agent: HeaderValue,
    /// Pooled HTTP/1.1 + HTTP/2 clients, http and https, used in turn
    /// (`cfg.connections` of them: over h2 each is one connection).
    clients: Vec<HttpClient>,
    /// The same for redirect hops, whose resolver refuses addresses the
    /// redirect policy does not allow.
    redirect_clients: Vec<HttpClient<GuardedResolver>>,
    /// Whose turn it is.
    next_client: std::sync::atomic::AtomicUsize,
    /// Where redirects may lead.
    pub(super) redirects: Arc<RedirectPolicy>,
    /// Where exchanges, latencies and rate limits are counted.
    metrics: Arc<Metrics>,
    /// `cfg.auth`: whose credentials go upstream (`caller.rs`).
    pub(super) auth_mode: AuthMode,
    /// `cfg.passthrough_ttl`.
    pub(super) passthrough_ttl: Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("host", &self.host)
            .field("url", &self.base)
            .field("tag_ttl", &self.tag_ttl)
            .field("library_prefix", &self.library_prefix)
            .field("timeout", &self.timeout)
            .field("credentials", &self.credentials.configured())
            .field("auth", &self.auth_mode)
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

/// The pooled client: hyper-rustls over hyper-util's connector, HTTP/1.1
/// and HTTP/2, http and https, connecting within the upstream's timeout.
fn http_client<R>(cfg: &UpstreamConfig, resolver: R) -> Result<HttpClient<R>, ConfigError>
where
    R: tower_service::Service<hyper_util::client::legacy::connect::dns::Name>
        + Clone
        + Send
        + Sync
        + 'static,
    R::Response: Iterator<Item = std::net::SocketAddr>,
    R::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    R::Future: Send,
{
    let mut http = HttpConnector::new_with_resolver(resolver);
    http.enforce_http(false);
    http.set_connect_timeout(Some(cfg.timeout));
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(cfg)?)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(https))
}

impl Upstream {
    /// The client for `cfg`: the pooled HTTP client (system roots, or
    /// webpki's when the system has none, plus `cfg.ca_file`) and the
    /// credentials (the password resolved from wherever it is kept).
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
        let redirects = Arc::new(RedirectPolicy::new(&uri, cfg.allow_private_redirects));
        Ok(Upstream {
            host: cfg.host.clone(),
            base,
            tag_ttl: cfg.tag_ttl,
            library_prefix: cfg.library_prefix,
            timeout: cfg.timeout,
            credentials: Credentials::new(cfg)?,
            user_agent: HeaderValue::from_static(concat!("stowage/", env!("CARGO_PKG_VERSION"))),
            clients: (0..cfg.connections.max(1))
                .map(|_| http_client(cfg, GaiResolver::new()))
                .collect::<Result<_, _>>()?,
            redirect_clients: (0..cfg.connections.max(1))
                .map(|_| {
                    let resolver = GuardedResolver {
                        policy: redirects.clone(),
                    };
                    http_client(cfg, resolver)
                })
                .collect::<Result<_, _>>()?,
            next_client: std::sync::atomic::AtomicUsize::new(0),
            redirects,
            metrics: Arc::new(Metrics::new()),
            auth_mode: cfg.auth,
            passthrough_ttl: cfg.passthrough_ttl,
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
    pub(crate) fn host(&self) -> &str {
        &self.host
    }

    /// How long a tag's manifest is served without asking upstream again.
    pub(crate) fn tag_ttl(&self) -> Duration {
        self.tag_ttl
    }

    /// Bound on each exchange up to its response headers, and on each wait
    /// for the next frame of a response body.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether the upstream is reached over TLS.
    pub(super) fn base_is_https(&self) -> bool {
        self.base
            .get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
    }

    /// Whether one-component names get Docker Hub's `library/`.
    pub(crate) fn library_prefix(&self) -> bool {
        self.library_prefix
    }

    /// The repository name as upstream knows it (Docker Hub's `library/`
    /// for one-component names when `library_prefix` is set).
    pub(crate) fn upstream_repo<'a>(&self, repo: &'a str) -> Cow<'a, str> {
        crate::oci::library_prefixed(repo, self.library_prefix)
    }

    /// Sends `method` (GET or HEAD) to `{url}/v2/{upstream_repo(repo)}/{tail}`
    /// (`tail` such as `manifests/latest`, `blobs/sha256:…`,
    /// `tags/list?n=10&last=x`, already validated by the caller; the URL may
    /// have a path prefix). `headers` (Accept, Range, …) are copied onto the
    /// request. Returns the final response (any status, 404/429/5xx
    /// included) with its streaming body.
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
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let upstream_repo = self.upstream_repo(repo);
        let url = format!("{}/v2/{}/{}", self.base, upstream_repo, tail);
        let uri: Uri = url
            .parse()
            .map_err(|e| UpstreamError::Protocol(format!("bad request URL {url:?}: {e}")))?;
        strip_headers(&mut headers);
        let scope = pull_scope(&upstream_repo);
        let kind = request_kind(tail);

        let sent = self.authenticate_up_front(&scope).await?;
        let (resp, from_registry) = self
            .follow(kind, &method, &uri, &headers, sent.header(), Hop::First)
            .await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        if !from_registry {
            // Object storage or a CDN asking for credentials: they are
            // the registry's to give, not the mirror's.
            return Err(redirect_target_401());
        }
        let Some(retry) = self.answer_challenge(resp.headers(), &scope, &sent).await? else {
            return Ok(resp);
        };
        drop(resp);
        let (resp, from_registry) = self
            .follow(kind, &method, &uri, &headers, Some(&retry), Hop::First)
            .await?;
        if resp.status() == StatusCode::UNAUTHORIZED && !from_registry {
            return Err(redirect_target_401());
        }
        if resp.status() == StatusCode::UNAUTHORIZED {
            tracing::warn!(upstream = %self.host, url = %uri, "upstream still answers 401 after authenticating");
        }
        Ok(resp)
    }

    /// One HTTP exchange, bounded by the timeout up to the response headers,
    /// counted in the metrics as `kind`.
    pub(super) async fn exchange(
        &self,
        kind: &'static str,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        auth: Option<&HeaderValue>,
        hop: Hop,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
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
        let url = loggable(uri, hop == Hop::First);
        // Spread over the pool: over h2 one client is one connection, and
        // one connection for every fill of an upstream is a bottleneck.
        let turn = self
            .next_client
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sent = match hop {
            Hop::First => self.clients[turn % self.clients.len()].request(req),
            Hop::Redirect => self.redirect_clients[turn % self.redirect_clients.len()].request(req),
        };
        let result = tokio::time::timeout(self.timeout, sent).await;
        let elapsed = started.elapsed();
        let status = match &result {
            Ok(Ok(resp)) => Some(resp.status()),
            _ => None,
        };
        self.metrics
            .upstream_exchange(&self.host, kind, status, elapsed);
        match result {
            Ok(Ok(resp)) => {
                self.answered(method, &url, &resp, elapsed);
                let timeout = self.timeout;
                Ok(resp.map(|body| UpstreamBody::new(timeout, body)))
            }
            Ok(Err(e)) => {
                if let Some(refused) = refused_in(&e) {
                    return Err(UpstreamError::Protocol(refused));
                }
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

    /// Records what an exchange's response says: rate limits, a debug line.
    fn answered(&self, method: &Method, url: &str, resp: &Response<Incoming>, elapsed: Duration) {
        self.metrics.upstream_ratelimit(&self.host, resp.headers());
        log_rate_limit(&self.host, method, url, resp);
        tracing::debug!(
            upstream = %self.host,
            %method,
            %url,
            status = resp.status().as_u16(),
            elapsed_ms = elapsed.as_millis() as u64,
            "upstream request"
        );
    }
}

/// Removes the caller-supplied headers `send` never copies.
pub(super) fn strip_headers(headers: &mut HeaderMap) {
    for name in STRIPPED_HEADERS {
        headers.remove(name);
    }
}

/// The metrics `kind` of a registry API request, from its path tail
/// (`manifests/…`, `blobs/…`, `tags/list…`, `referrers/…`).
pub(super) fn request_kind(tail: &str) -> &'static str {
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

    fn config(url: String) -> UpstreamConfig {
        UpstreamConfig {
            host: "test.local".into(),
            url,
            library_prefix: false,
            timeout: Duration::from_secs(2),
            ..crate::upstream::config::docker_hub()
        }
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
    fn library_prefix() {
        let mut cfg = config("http://127.0.0.1:9/".into());
        cfg.library_prefix = true;
        let up = Upstream::new(&cfg).unwrap();
        assert_eq!(up.upstream_repo("alpine"), "library/alpine");
        assert_eq!(up.upstream_repo("foo/bar"), "foo/bar");
        assert!(matches!(up.upstream_repo("foo/bar"), Cow::Borrowed(_)));
        let no_prefix = Upstream::new(&config("http://127.0.0.1:9".into())).unwrap();
        assert_eq!(no_prefix.upstream_repo("alpine"), "alpine");
        assert_eq!(up.host(), "test.local");
        assert_eq!(up.tag_ttl(), Duration::from_secs(300));
    }

    #[test]
    fn request_kinds() {
        assert_eq!(request_kind("manifests/latest"), "manifest");
        assert_eq!(request_kind("blobs/sha256:x"), "blob");
        assert_eq!(request_kind("tags/list?n=1"), "tags");
        assert_eq!(request_kind("referrers/sha256:x"), "referrers");
        assert_eq!(request_kind("whatever"), "other");
    }
}
