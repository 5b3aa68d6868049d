//! The listener, connection handling, graceful shutdown, and the request
//! handler that maps API routes onto the caches.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::admin::{self, AdminState};
use crate::blobs::BlobStore;
use crate::http::body::{self, Body};
use crate::config::Config;
use crate::error::{RegistryError, UpstreamKind};
use crate::front::{Front, Reloader};
use crate::index::{BlobIndex, Budget};
use crate::manifests::{Manifest, ManifestStore};
use crate::metrics::{Metrics, RouteKind, source_of};
use crate::oci::ImageRef;
use crate::oci::{Reference, Route, parse_route};
use crate::http::request_id::{self, RequestIds};
use crate::http::routing::{Router, ns_param};
use crate::upstream::Upstream;

/// Why the server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Configuration refused (bad upstream credentials file, ...).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// TLS material or htpasswd file unusable.
    #[error(transparent)]
    Front(#[from] crate::front::FrontError),
    /// Could not bind, or the cache directory is unusable.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Shared state of every request.
pub struct AppState {
    /// Upstream selection.
    pub router: Router,
    /// The blob cache.
    pub blobs: Arc<BlobStore>,
    /// The manifest cache.
    pub manifests: ManifestStore,
    /// Client authentication (open unless `[access]` is configured).
    pub access: Arc<crate::front::access::Access>,
    /// This server's metrics and health flags.
    pub metrics: Arc<Metrics>,
    /// Request id generator.
    pub request_ids: RequestIds,
}

/// A bound, ready-to-run mirror.
pub struct Server {
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown_timeout: Duration,
    front: Arc<Front>,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`), if enabled.
    admin: Option<TcpListener>,
    /// Where the caches live (checked by `/readyz`).
    cache_dir: PathBuf,
}

impl Server {
    /// Opens the caches, builds the upstream clients and binds the listener.
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        let io = |context: String| move |source| ServerError::Io { context, source };
        let metrics = Arc::new(Metrics::new());
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| Upstream::new(u).map(|u| Arc::new(u.with_metrics(metrics.clone()))))
            .collect::<Result<Vec<_>, _>>()?;
        let idle = config
            .upstreams
            .iter()
            .map(|u| u.timeout)
            .max()
            .unwrap_or(Duration::from_secs(30));
        let budget = Budget::new(
            config.cache.max_size.as_u64(),
            config.cache.high_watermark,
            config.cache.low_watermark,
        );
        let index = Arc::new(BlobIndex::new(&config.cache_dir, budget));
        let blobs = BlobStore::open(&config.cache_dir, index, idle).map_err(io(format!(
            "opening blob cache in {}",
            config.cache_dir.display()
        )))?;
        let blobs = Arc::new(blobs.with_metrics(metrics.clone()));
        blobs.spawn_background();
        let manifests = ManifestStore::open(&config.cache_dir).map_err(io(format!(
            "opening manifest cache in {}",
            config.cache_dir.display()
        )))?;
        let front = Arc::new(Front::new(&config)?);
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(io(format!("binding {}", config.listen)))?;
        let admin = match config.admin_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(io(format!("binding the admin listener {addr}")))?,
            ),
            None => None,
        };
        let state = Arc::new(AppState {
            router: Router::new(upstreams),
            blobs,
            manifests,
            access: front.access(),
            metrics,
            request_ids: RequestIds::new(),
        });
        let pins = config
            .cache
            .pin
            .iter()
            .filter_map(|p| ImageRef::parse(p).ok())
            .collect();
        crate::pins::spawn(state.clone(), pins, config.cache.pin_refresh);
        spawn_manifest_pruner(state.clone(), config.cache.max_manifests);
        Ok(Server {
            listener,
            state,
            shutdown_timeout: config.shutdown_timeout,
            front,
            admin,
            cache_dir: config.cache_dir.clone(),
        })
    }

    /// The shared state (caches, upstreams), for tests and tools.
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Reloads the TLS certificate and htpasswd file (SIGHUP).
    pub fn reloader(&self) -> Reloader {
        self.front.reloader()
    }

    /// The address the admin listener bound, or `None` when it is off.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// This server's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.state.metrics
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Serves until `shutdown` completes, then stops accepting and lets
    /// in-flight responses finish for up to the shutdown timeout.
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let graceful = GracefulShutdown::new();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        self.front.configure(&mut builder);
        let watch = self.front.reloader().spawn_watch();
        tokio::pin!(shutdown);
        let admin = self.admin.take().map(|listener| {
            let blobs = self.state.blobs.clone();
            let index = self.state.blobs.index().clone();
            let state = AdminState::new(self.state.metrics.clone(), self.cache_dir.clone())
                .with_index_check(move || blobs.index().is_loaded())
                .with_scrape_hook(move |metrics| {
                    metrics.set_cache_size(index.used().saturating_add(index.reserved()));
                    metrics.set_cache_budget(index.budget().max_size);
                    let evicted = index.evicted();
                    metrics.sync_evictions(evicted.blobs, evicted.bytes);
                });
            admin::spawn(listener, Arc::new(state))
        });
        self.state.metrics.set_listening(true);
        tracing::info!(addr = %self.local_addr(), tls = self.front.tls().is_some(), "stowage listening");
        loop {
            let (permit, stream, peer) = tokio::select! {
                accepted = async {
                    let permit = self.front.slot().await;
                    (permit, self.listener.accept().await)
                } => match accepted {
                    (permit, Ok((stream, peer))) => (permit, stream, peer),
                    (_, Err(e)) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let state = self.state.clone();
            let (front, builder, watcher) =
                (self.front.clone(), builder.clone(), graceful.watcher());
            tokio::spawn(async move {
                let _permit = permit;
                let Some(io) = front.handshake(stream, peer).await else {
                    return;
                };
                let regions = io.regions();
                let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    if let Some(r) = &regions {
                        req.extensions_mut().insert(r.clone());
                    }
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(state, req, peer).await) }
                });
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
                if let Err(e) = watcher.watch(conn.into_owned()).await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            });
        }
        watch.stop();
        drop(self.listener);
        // /readyz answers 503 from now on, while requests drain.
        self.state.metrics.set_listening(false);
        tracing::info!("shutting down: waiting for in-flight requests");
        tokio::select! {
            () = graceful.shutdown() => tracing::info!("all connections closed"),
            () = tokio::time::sleep(self.shutdown_timeout) => {
                tracing::warn!(timeout = ?self.shutdown_timeout, "shutdown timeout reached, dropping connections");
            }
        }
        // Let fills finish committing (their clients may be done already:
        // readers finish at verification, before the fsyncs and rename).
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        while self.state.blobs.fills_in_flight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Persist recency so LRU order survives the restart.
        let index = self.state.blobs.index().clone();
        let _ = tokio::task::spawn_blocking(move || index.flush_atimes()).await;
        self.state.blobs.stop_background();
        if let Some(admin) = admin {
            admin.stop().await;
        }
        Ok(())
    }
}

/// Handles one request and wraps its body so that one log line is written
/// when the response is finished (or abandoned).
pub async fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let request_id = state.request_ids.for_request(req.headers());
    let route = RouteKind::of_path(&path);
    let span = tracing::info_span!("request", request_id = %request_id);
    let (mut response, outcome) = match dispatch(&state, &req).instrument(span).await {
        Ok(r) => r,
        Err(e) => (e.into_response(method == Method::HEAD, body::full), "-"),
    };
    response.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(request_id::HEADER, v);
    }
    if outcome != "-" {
        // How the mirror answered (hit, miss, join, stale, upstream): for
        // operators, `stowage warm` and debugging.
        response
            .headers_mut()
            .insert(CACHE_HEADER, HeaderValue::from_static(outcome));
    }
    let status = response.status();
    state.metrics.request_started(route, &method, status);
    if let Some(kind) = route.cache()
        && outcome != "-"
    {
        state.metrics.cache_outcome(kind, outcome);
    }
    let (parts, inner) = response.into_parts();
    let expected = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .or_else(|| hyper::body::Body::size_hint(&inner).exact());
    let logged = LoggedBody {
        inner,
        bytes: 0,
        expected,
        failed: false,
        log: Some(LogLine {
            method,
            path,
            status,
            outcome,
            peer,
            started,
            request_id,
            route,
            metrics: state.metrics.clone(),
        }),
    };
    Response::from_parts(parts, BodyExt::boxed(logged))
}

/// Keeps the manifest files on disk within `max`, at start and every ten
/// minutes.
fn spawn_manifest_pruner(state: Arc<AppState>, max: usize) {
    let mut stop = state.blobs.stop_signal();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(600));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let s = state.clone();
            match tokio::task::spawn_blocking(move || s.manifests.prune(max)).await {
                Ok(Err(e)) => tracing::warn!(error = %e, "pruning manifests failed"),
                Err(e) => tracing::warn!(error = %e, "manifest pruner panicked"),
                Ok(Ok(_)) => {}
            }
        }
    });
}

/// Response header saying how the mirror answered a blob or manifest
/// request: `hit`, `miss`, `join`, `stale` or `upstream`.
pub const CACHE_HEADER: &str = "x-stowage-cache";

/// Routes a request. Returns the response and how it was answered
/// (`hit`, `miss`, `join`, ... or `-`).
async fn dispatch(
    state: &AppState,
    req: &Request<Incoming>,
) -> Result<(Response<Body>, &'static str), RegistryError> {
    state.access.check(req.headers()).await?;
    let route = parse_route(req.uri().path())?;
    let method = req.method();
    let read_only = method == Method::GET || method == Method::HEAD;
    if !read_only || route == Route::Write {
        return Err(RegistryError::unsupported(format!(
            "{method} is not supported: this is a read-only pull-through mirror"
        )));
    }
    let head = method == Method::HEAD;
    let ns = ns_param(req.uri().query());
    match route {
        Route::Base => {
            let mut r = Response::new(if head {
                body::empty()
            } else {
                body::full("{}")
            });
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from_static("2"));
            Ok((r, "-"))
        }
        Route::Write => Err(RegistryError::unsupported("pushing is not supported")),
        Route::Blob { name, digest } => {
            let (upstream, repo) = state.router.route(&name, ns.as_deref())?;
            let range = req
                .headers()
                .get(header::RANGE)
                .and_then(|v| v.to_str().ok());
            // Zero-copy sends need a plain connection speaking HTTP/1 (h2
            // copies data into its own frames).
            let zero_copy = if req.version() <= http::Version::HTTP_11 {
                req.extensions()
                    .get::<Arc<crate::front::zerocopy::Regions>>()
                    .cloned()
            } else {
                None
            };
            let r = state
                .blobs
                .serve(&upstream, &repo, &digest, range, head, zero_copy)
                .await?;
            Ok((r.response, r.outcome.as_str()))
        }
        Route::Manifest { name, reference } => {
            let (upstream, repo) = state.router.route(&name, ns.as_deref())?;
            let (m, outcome) = match &reference {
                Reference::Digest(d) => state.manifests.by_digest(&upstream, &repo, d).await?,
                Reference::Tag(t) => state.manifests.by_tag(&upstream, &repo, t).await?,
            };
            Ok((manifest_response(&m, head), outcome.as_str()))
        }
        Route::TagsList { name } => {
            let (upstream, repo) = state.router.route(&name, ns.as_deref())?;
            let query = req
                .uri()
                .query()
                .map(|q| {
                    form_urlencoded::Serializer::new(String::new())
                        .extend_pairs(
                            form_urlencoded::parse(q.as_bytes())
                                .filter(|(k, _)| k == "n" || k == "last"),
                        )
                        .finish()
                })
                .filter(|q| !q.is_empty());
            let tail = match query {
                Some(q) => format!("tags/list?{q}"),
                None => "tags/list".to_string(),
            };
            passthrough(&upstream, method, &repo, &tail, HeaderMap::new()).await
        }
        Route::Referrers { name, digest } => {
            let (upstream, repo) = state.router.route(&name, ns.as_deref())?;
            let mut tail = format!("referrers/{digest}");
            if let Some(at) = req.uri().query().and_then(|q| {
                form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "artifactType")
            }) {
                tail.push('?');
                tail.push_str(
                    &form_urlencoded::Serializer::new(String::new())
                        .append_pair("artifactType", &at.1)
                        .finish(),
                );
            }
            let mut headers = HeaderMap::new();
            headers.insert(
                header::ACCEPT,
                HeaderValue::from_static("application/vnd.oci.image.index.v1+json"),
            );
            passthrough(&upstream, method, &repo, &tail, headers).await
        }
    }
}

fn manifest_response(m: &Manifest, head: bool) -> Response<Body> {
    let mut r = Response::new(if head {
        body::empty()
    } else {
        body::full(m.body.clone())
    });
    let h = r.headers_mut();
    h.clone_from(&m.headers);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(m.body.len()));
    r
}

/// Forwards a small read-only request (tags list, referrers) upstream and
/// streams the answer back, keeping the headers that matter.
async fn passthrough(
    upstream: &Upstream,
    method: &Method,
    repo: &crate::oci::RepoName,
    tail: &str,
    headers: HeaderMap,
) -> Result<(Response<Body>, &'static str), RegistryError> {
    let resp = upstream
        .send(method.clone(), repo.as_str(), tail, headers)
        .await?;
    let status = resp.status();
    if !status.is_success() {
        return Err(RegistryError::from_upstream(
            status,
            UpstreamKind::Repository,
            resp.headers().get(header::RETRY_AFTER),
            repo.as_str(),
        ));
    }
    let (parts, incoming) = resp.into_parts();
    let mut r = Response::new(if *method == Method::HEAD {
        body::empty()
    } else {
        BodyExt::boxed(incoming.map_err(std::io::Error::other))
    });
    *r.status_mut() = status;
    for name in [header::CONTENT_TYPE, header::CONTENT_LENGTH, header::LINK] {
        if let Some(v) = parts.headers.get(&name) {
            r.headers_mut().insert(name, v.clone());
        }
    }
    if let Some(v) = parts.headers.get("oci-filters-applied") {
        r.headers_mut().insert("oci-filters-applied", v.clone());
    }
    Ok((r, "upstream"))
}

/// What the request log line says, written once the body ends.
struct LogLine {
    method: Method,
    path: String,
    status: StatusCode,
    outcome: &'static str,
    peer: SocketAddr,
    started: Instant,
    request_id: String,
    route: RouteKind,
    metrics: Arc<Metrics>,
}

/// A body that counts what it sends and logs the request when it is done,
/// failed, or dropped early (client gone).
struct LoggedBody {
    inner: Body,
    bytes: u64,
    /// The body's exact length when known: hyper stops polling a body once
    /// that many bytes are sent, so reaching it means complete.
    expected: Option<u64>,
    failed: bool,
    log: Option<LogLine>,
}

impl LoggedBody {
    fn finish(&mut self, complete: bool) {
        if let Some(l) = self.log.take() {
            let elapsed = l.started.elapsed();
            l.metrics
                .response_finished(l.route, source_of(l.outcome), self.bytes, elapsed);
            tracing::info!(
                request_id = %l.request_id,
                method = %l.method,
                path = %l.path,
                status = l.status.as_u16(),
                bytes = self.bytes,
                ms = elapsed.as_millis() as u64,
                cache = l.outcome,
                peer = %l.peer,
                complete = complete && !self.failed,
                "request"
            );
        }
    }
}

impl hyper::body::Body for LoggedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
            }
            Poll::Ready(Some(Err(_))) => {
                this.failed = true;
                this.finish(false);
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        let complete = hyper::body::Body::is_end_stream(&self.inner)
            || self.expected.is_some_and(|n| n == self.bytes);
        self.finish(complete);
    }
}
