//! The mirror as a whole: binds the listeners, opens the caches, runs the
//! accept loop and shuts down gracefully. Requests are handled in
//! [`crate::http`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::admin::{self, AdminState};
use crate::cache::blob::BlobStore;
use crate::cache::index::{BlobIndex, Budget};
use crate::cache::layout::Layout;
use crate::cache::manifests::ManifestStore;
use crate::config::Config;
use crate::front::{Front, Reloader};
use crate::http::request_id::RequestIds;
use crate::http::routing::Router;
use crate::http::{AppState, handle};
use crate::metrics::Metrics;
use crate::oci::ImageRef;
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

/// A bound, ready-to-run mirror.
pub struct Server {
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown_timeout: Duration,
    front: Arc<Front>,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`), if enabled.
    admin: Option<TcpListener>,
    /// Where the caches live (checked by `/readyz`).
    layout: Layout,
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
        let layout = Layout::new(&config.cache_dir);
        let index = Arc::new(BlobIndex::new(&layout, budget));
        let blobs = BlobStore::open(&layout, index, idle).map_err(io(format!(
            "opening blob cache in {}",
            config.cache_dir.display()
        )))?;
        let blobs = Arc::new(blobs.with_metrics(metrics.clone()));
        blobs.spawn_background();
        let manifests = ManifestStore::open(&layout).map_err(io(format!(
            "opening manifest cache in {}",
            config.cache_dir.display()
        )))?;
        let front = Arc::new(Front::new(
            config.tls.as_ref(),
            config.access.as_ref(),
            &config.limits,
        )?);
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
        crate::cache::pins::spawn(state.clone(), pins, config.cache.pin_refresh);
        spawn_manifest_pruner(state.clone(), config.cache.max_manifests);
        Ok(Server {
            listener,
            state,
            shutdown_timeout: config.shutdown_timeout,
            front,
            admin,
            layout,
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
            let state = AdminState::new(self.state.metrics.clone(), self.layout.tmp())
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
