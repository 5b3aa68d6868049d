//! The admin listener: `/metrics` (Prometheus text format), `/healthz`
//! (the process is alive) and `/readyz` (it can serve: cache directory
//! writable, blob index loaded, registry listener accepting; its body also
//! notes the cluster's peers and the shared store, which never make a node
//! unready).
//!
//! It is a separate plain-HTTP listener (loopback by default) so that
//! metrics and probes never need the registry's TLS or credentials, and so
//! that it keeps answering while the registry listener drains at shutdown:
//! `/readyz` then says 503 so load balancers stop sending traffic. It has
//! the registry listener's `[limits]` (connection slots of its own, the
//! header and idle timeouts) through a [`Front`] without TLS or access
//! control.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::front::Front;
use crate::metrics::{Metrics, TEXT_CONTENT_TYPE};

/// How long admin connections may take to finish once the admin listener
/// is told to stop.
const ADMIN_DRAIN: Duration = Duration::from_secs(2);

/// Longest a readiness probe of the cache directory may take before it
/// counts as a failure (a hung disk).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A function run before each scrape; see [`AdminState::with_scrape_hook`].
type ScrapeHook = Box<dyn Fn(&Metrics) + Send + Sync>;

/// What the admin handler needs.
pub(crate) struct AdminState {
    /// The server's metrics and health flags.
    pub(crate) metrics: Arc<Metrics>,
    /// The directory in the cache whose writability `/readyz` checks (the
    /// one fills write to).
    pub(crate) probe_dir: PathBuf,
    /// Distinguishes probe file names.
    probes: AtomicU64,
    /// Whether the blob index is loaded (the index's own flag).
    index_loaded: Option<Box<dyn Fn() -> bool + Send + Sync>>,
    /// Runs before each `/metrics` encoding (to copy gauges kept elsewhere).
    before_scrape: Option<ScrapeHook>,
    /// Lines `/readyz` adds about things that do not decide readiness (the
    /// cluster's peers, the shared store).
    notes: Vec<Box<dyn Fn() -> String + Send + Sync>>,
}

impl AdminState {
    /// State for a server with these metrics, probing `probe_dir`.
    pub(crate) fn new(metrics: Arc<Metrics>, probe_dir: PathBuf) -> AdminState {
        AdminState {
            metrics,
            probe_dir,
            probes: AtomicU64::new(0),
            index_loaded: None,
            before_scrape: None,
            notes: Vec::new(),
        }
    }

    /// Adds a line to every `/readyz` answer (ready or not) without a say
    /// in readiness: a shared store that fails must not take every node
    /// out of a load balancer at once.
    pub(crate) fn with_note(mut self, note: impl Fn() -> String + Send + Sync + 'static) -> Self {
        self.notes.push(Box::new(note));
        self
    }

    /// The notes, one per line.
    fn notes(&self) -> String {
        self.notes.iter().map(|n| format!("{}\n", n())).collect()
    }

    /// Runs `refresh` before every `/metrics` answer, e.g. to copy the blob
    /// index's size and eviction totals into the metrics.
    pub(crate) fn with_scrape_hook(
        mut self,
        refresh: impl Fn(&Metrics) + Send + Sync + 'static,
    ) -> Self {
        self.before_scrape = Some(Box::new(refresh));
        self
    }

    /// Asks `loaded` whether the blob index is loaded (not ready until it
    /// is).
    pub(crate) fn with_index_check(
        mut self,
        loaded: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Self {
        self.index_loaded = Some(Box::new(loaded));
        self
    }

    /// Why the server is not ready, or an empty list when it is.
    pub(crate) async fn not_ready(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if !self.metrics.listening() {
            reasons.push("registry listener is not accepting connections".to_string());
        }
        if self.index_loaded.as_ref().is_some_and(|f| !f()) {
            reasons.push("blob index is still loading".to_string());
        }
        let dir = &self.probe_dir;
        let n = self.probes.fetch_add(1, Ordering::Relaxed);
        let probe = dir.join(format!(".readyz-{}-{n}", std::process::id()));
        let checked = tokio::time::timeout(
            PROBE_TIMEOUT,
            tokio::task::spawn_blocking(move || probe_writable(&probe)),
        )
        .await;
        let failure = match checked {
            Err(_) => Some(format!("timed out after {PROBE_TIMEOUT:?}")),
            Ok(Err(e)) => Some(format!("probe task failed: {e}")),
            Ok(Ok(Err(e))) => Some(e.to_string()),
            Ok(Ok(Ok(()))) => None,
        };
        if let Some(why) = failure {
            reasons.push(format!(
                "cache directory {} is not writable: {why}",
                dir.display()
            ));
        }
        reasons
    }
}

/// Creates, writes, syncs and removes a small file.
fn probe_writable(path: &Path) -> std::io::Result<()> {
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?;
        std::io::Write::write_all(&mut f, b"stowage readiness probe\n")?;
        f.sync_all()
    })();
    let removed = std::fs::remove_file(path);
    result?;
    removed
}

/// A running admin listener; see [`spawn`].
pub(crate) struct AdminHandle {
    task: JoinHandle<()>,
}

impl AdminHandle {
    /// Waits for the listener task, which ends once its stop token is
    /// cancelled and open admin connections had a moment to finish.
    pub(crate) async fn stopped(self) {
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "admin listener task failed");
        }
    }
}

/// Serves the admin endpoints on `listener` until `stop` is cancelled,
/// behind `front` (connection slots, header and idle timeouts).
pub(crate) fn spawn(
    listener: TcpListener,
    front: Arc<Front>,
    state: Arc<AdminState>,
    stop: CancellationToken,
) -> AdminHandle {
    let task = tokio::spawn(async move {
        let graceful = GracefulShutdown::new();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        front.configure(&mut builder);
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "admin listener (/metrics, /healthz, /readyz)");
        }
        loop {
            let (permit, stream, peer) = tokio::select! {
                accepted = async {
                    let permit = front.slot().await;
                    (permit, listener.accept().await)
                } => match accepted {
                    (permit, Ok((stream, peer))) => (permit, stream, peer),
                    (_, Err(e)) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = stop.cancelled() => break,
            };
            let state = state.clone();
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, &req).await) }
            });
            let front = front.clone();
            let builder = builder.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let _permit = permit;
                let Some(io) = front.handshake(stream, peer).await else {
                    return;
                };
                let conn = builder
                    .serve_connection(TokioIo::new(io), service)
                    .into_owned();
                if let Err(e) = watcher.watch(conn).await {
                    tracing::debug!(%peer, error = %e, "admin connection ended with an error");
                }
            });
        }
        drop(listener);
        let _ = tokio::time::timeout(ADMIN_DRAIN, graceful.shutdown()).await;
    });
    AdminHandle { task }
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Refreshes and encodes the metrics.
fn scrape(state: &AdminState) -> Result<Vec<u8>, prometheus::Error> {
    if let Some(refresh) = &state.before_scrape {
        refresh(&state.metrics);
    }
    state.metrics.encode()
}

/// Answers one admin request.
pub(crate) async fn handle(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "only GET and HEAD\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let mut response = match req.uri().path() {
        "/metrics" => match scrape(state) {
            Ok(body) => text(StatusCode::OK, TEXT_CONTENT_TYPE, body),
            Err(e) => {
                tracing::error!(error = %e, "encoding metrics failed");
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    PLAIN,
                    format!("encoding metrics failed: {e}\n"),
                )
            }
        },
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n"),
        "/readyz" => {
            let reasons = state.not_ready().await;
            if reasons.is_empty() {
                text(StatusCode::OK, PLAIN, format!("ready\n{}", state.notes()))
            } else {
                tracing::warn!(reasons = %reasons.join("; "), "not ready");
                let mut body = String::from("not ready:\n");
                for r in &reasons {
                    body.push_str("- ");
                    body.push_str(r);
                    body.push('\n');
                }
                body.push_str(&state.notes());
                text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, body)
            }
        }
        "/" => text(
            StatusCode::OK,
            PLAIN,
            "stowage admin: /metrics /healthz /readyz\n",
        ),
        _ => text(StatusCode::NOT_FOUND, PLAIN, "not found\n"),
    };
    if head {
        let length = hyper::body::Body::size_hint(response.body()).exact();
        *response.body_mut() = Full::new(Bytes::new());
        if let Some(n) = length {
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readiness_reasons() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        let metrics = Arc::new(Metrics::new());
        let loaded = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = loaded.clone();
        let state = AdminState::new(metrics.clone(), dir.path().join("tmp"))
            .with_index_check(move || flag.load(Ordering::SeqCst));
        // Not listening yet.
        let r = state.not_ready().await;
        assert_eq!(r.len(), 1, "{r:?}");
        assert!(r[0].contains("listener"), "{r:?}");
        metrics.set_listening(true);
        assert!(state.not_ready().await.is_empty());
        // The probe leaves nothing behind.
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );

        loaded.store(false, Ordering::SeqCst);
        let r = state.not_ready().await;
        assert!(r.iter().any(|r| r.contains("index")), "{r:?}");
        loaded.store(true, Ordering::SeqCst);

        // tmp replaced by a file: not writable, even for root.
        std::fs::remove_dir(dir.path().join("tmp")).unwrap();
        std::fs::write(dir.path().join("tmp"), b"x").unwrap();
        let r = state.not_ready().await;
        assert_eq!(r.len(), 1, "{r:?}");
        assert!(r[0].contains("not writable"), "{r:?}");
    }
}
