//! The mirror as a whole: binds the listeners, opens the caches, starts the
//! background work, runs the accept loop and shuts down gracefully.
//! Requests are handled in [`crate::http`].
//!
//! Shutdown, in order: stop accepting (and polling TLS/htpasswd files), let
//! in-flight responses finish for up to `shutdown_timeout`, wait (as long
//! again at most) for blob fills still committing, write access times to
//! disk, then stop the background tasks and the admin listener, which kept
//! answering (`/readyz` with 503) during the drain.

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
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::DropGuard;

use crate::admin::{self, AdminHandle, AdminState};
use crate::bucket::Bucket;
use crate::cache::blob::{BlobStore, Scrub};
use crate::cache::grants::Grants;
use crate::cache::index::{BlobIndex, Budget};
use crate::cache::layout::Layout;
use crate::cache::lock::{DirLock, LockError};
use crate::cache::manifests::ManifestStore;
use crate::cache::pins::Pins;
use crate::cache::prefetch::Prefetcher;
use crate::cache::private::Private;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::front::{Front, ReadBudget, Reloader};
use crate::http::request_id::RequestIds;
use crate::http::routing::Router;
use crate::http::{AppState, handle};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::upstream::Upstream;

/// How long shutdown waits for the access times to be written, past
/// `shutdown_timeout`.
const ATIME_FLUSH_AT_EXIT: Duration = Duration::from_secs(1);

/// Why the server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Configuration refused (bad upstream credentials file, ...).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// TLS material or htpasswd file unusable.
    #[error(transparent)]
    Front(Box<dyn std::error::Error + Send + Sync>),
    /// Another process holds the cache directory's lock.
    #[error("{0}")]
    CacheDirInUse(String),
    /// Could not bind, or the cache directory is unusable.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

impl From<crate::front::FrontError> for ServerError {
    fn from(e: crate::front::FrontError) -> ServerError {
        ServerError::Front(Box::new(e))
    }
}

fn io_error(context: String) -> impl FnOnce(std::io::Error) -> ServerError {
    move |source| ServerError::Io { context, source }
}

/// A bound, ready-to-run mirror.
pub struct Server {
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown_timeout: Duration,
    front: Arc<Front>,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`), if enabled.
    admin: Option<TcpListener>,
    /// Its front door: the same limits, slots of its own.
    admin_front: Arc<Front>,
    /// Where the caches live (checked by `/readyz`).
    layout: Layout,
    /// Stops background work; fills are tracked here.
    shutdown: Shutdown,
    /// The exclusive lock on the cache directory, held until the server
    /// is dropped (after `run` returns).
    _dir_lock: DirLock,
    /// Ends the background work if the server is dropped without running.
    _stop_on_drop: DropGuard,
}

impl Server {
    /// Opens the caches, builds the upstream clients, binds the listeners
    /// and starts the background work (index loading, eviction, pins).
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        let metrics = Arc::new(Metrics::new());
        let shutdown = Shutdown::new();
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| Upstream::new(u).map(|u| Arc::new(u.with_metrics(metrics.clone()))))
            .collect::<Result<Vec<_>, _>>()?;
        let layout = Layout::new(&config.cache_dir);
        // Before anything touches the directory (opening the blob store
        // empties tmp/).
        let dir_lock = DirLock::acquire(&layout).map_err(|e| match e {
            e @ LockError::Held { .. } => ServerError::CacheDirInUse(e.to_string()),
            LockError::Io { dir, source } => ServerError::Io {
                context: format!("locking cache directory {}", dir.display()),
                source,
            },
        })?;
        let cluster = open_cluster(&config, &metrics)?;
        let bucket = match &config.store {
            Some(cfg) => {
                let b = Arc::new(Bucket::new(cfg, metrics.clone())?);
                tracing::info!(store = b.name(), "shared store");
                Some(b)
            }
            None => None,
        };
        let remote = Remote {
            cluster: cluster.clone(),
            bucket: bucket.clone(),
        };
        let grants = Arc::new(Grants::new());
        let (blobs, manifests, private) =
            open_caches(&config, &layout, &metrics, &shutdown, &remote, &grants)?;
        let front = Arc::new(Front::new(
            config.tls.as_ref(),
            config.access.as_ref(),
            &config.limits,
        )?);
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(io_error(format!("binding {}", config.listen)))?;
        let admin = match config.admin_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(io_error(format!("binding the admin listener {addr}")))?,
            ),
            None => None,
        };
        let router = Router::new(upstreams);
        let pins = Pins {
            images: config.cache.pins()?,
            every: config.cache.pin_refresh,
            manifests: manifests.clone(),
            index: blobs.index().clone(),
            route: router.resolver(),
            layout: layout.clone(),
        };
        pins.spawn(shutdown.token());
        if let Some(c) = &cluster {
            c.spawn(&shutdown.token());
        }
        if let Some(b) = &bucket {
            b.spawn(&shutdown.token());
        }
        spawn_manifest_pruner(&shutdown, manifests.clone());
        spawn_purge_watch(&shutdown, &layout, blobs.clone(), manifests.clone());
        let prefetch = Arc::new(Prefetcher::new(
            config.prefetch.clone(),
            blobs.clone(),
            manifests.clone(),
            shutdown.token(),
        ));
        let state = Arc::new(AppState {
            router,
            blobs,
            manifests,
            prefetch,
            access: front.access(),
            grants,
            private,
            metrics,
            request_ids: RequestIds::new(),
            cluster,
            bucket,
        });
        Ok(Server {
            listener,
            state,
            shutdown_timeout: config.shutdown_timeout,
            front,
            admin,
            admin_front: Arc::new(Front::admin(&config.limits)),
            layout,
            _stop_on_drop: shutdown.drop_guard(),
            shutdown,
            _dir_lock: dir_lock,
        })
    }

    /// White-box access to the blob store, for the integration tests.
    #[cfg(feature = "test-hooks")]
    pub fn hooks(&self) -> crate::test_hooks::Hooks {
        crate::test_hooks::Hooks::new(self.state.blobs.clone())
    }

    /// Reloads the TLS certificate and htpasswd file (SIGHUP).
    pub(crate) fn reloader(&self) -> Reloader {
        self.front.reloader()
    }

    /// The address the admin listener bound, or `None` when it is off.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
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
        // File polling stops with the accept loop, the rest after draining.
        let polling = self.shutdown.token().child_token();
        self.front.reloader().spawn_watch(&polling);
        let admin = self.start_admin();
        self.state.metrics.set_listening(true);
        tracing::info!(addr = %self.local_addr(), tls = self.front.tls().is_some(), "stowage listening");
        self.accept_until(shutdown, &builder, &graceful).await;
        polling.cancel();
        drop(self.listener);
        // /readyz answers 503 from now on, while requests drain.
        self.state.metrics.set_listening(false);
        tracing::info!("shutting down: waiting for in-flight requests");
        // One deadline for draining and for the fills: the operator's
        // grace period (systemd, Kubernetes) is sized on it.
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        tokio::select! {
            () = graceful.shutdown() => tracing::info!("all connections closed"),
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(timeout = ?self.shutdown_timeout, "shutdown timeout reached, dropping connections");
            }
        }
        // Let fills finish committing (their clients may be done already:
        // readers finish at verification, before the fsyncs and rename).
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if !self.shutdown.wait_for_fills(left).await {
            tracing::warn!("shutdown timeout reached with blob fills still running");
        }
        // Persist recency so LRU order survives the restart; a disk that
        // does not answer within a second does not hold up the exit.
        let index = self.state.blobs.index().clone();
        let flush = tokio::task::spawn_blocking(move || index.flush_atimes());
        if tokio::time::timeout(ATIME_FLUSH_AT_EXIT, flush)
            .await
            .is_err()
        {
            tracing::warn!("access times not saved at shutdown: the disk did not answer in time");
        }
        self.shutdown.cancel();
        if let Some(admin) = admin {
            admin.stopped().await;
        }
        Ok(())
    }

    /// Starts the admin listener, if enabled; it stops with the background
    /// work.
    fn start_admin(&mut self) -> Option<AdminHandle> {
        let listener = self.admin.take()?;
        let blobs = self.state.blobs.clone();
        let index = self.state.blobs.index().clone();
        let manifests = self.state.manifests.clone();
        let mut state = AdminState::new(self.state.metrics.clone(), self.layout.tmp())
            .with_index_check(move || blobs.index().is_loaded())
            .with_scrape_hook(move |metrics| {
                metrics.set_cache_size(index.used().saturating_add(index.reserved()));
                metrics.set_cache_budget(index.budget().max_size);
                let evicted = index.evicted();
                metrics.sync_evictions(evicted.blobs, evicted.bytes);
                let unread = index.unread();
                metrics.sync_prefetch_unread(unread.stored, unread.evicted);
                let disk = manifests.disk();
                metrics.sync_manifest_disk(disk.files, disk.bytes, disk.pruned);
            });
        if let Some(c) = self.state.cluster.clone() {
            state = state.with_note(move || c.status());
        }
        if let Some(b) = self.state.bucket.clone() {
            state = state.with_note(move || b.status());
        }
        Some(admin::spawn(
            listener,
            self.admin_front.clone(),
            Arc::new(state),
            self.shutdown.token(),
        ))
    }

    /// Accepts connections (within the connection limit) until `shutdown`
    /// completes, serving each in a task watched by `graceful`.
    async fn accept_until(
        &self,
        shutdown: impl Future<Output = ()> + Send + 'static,
        builder: &auto::Builder<TokioExecutor>,
        graceful: &GracefulShutdown,
    ) {
        tokio::pin!(shutdown);
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
                () = &mut shutdown => return,
            };
            let _ = stream.set_nodelay(true);
            let conn = Connection {
                state: self.state.clone(),
                front: self.front.clone(),
                builder: builder.clone(),
                watcher: graceful.watcher(),
            };
            tokio::spawn(conn.serve(permit, stream, peer));
        }
    }
}

/// What serving one accepted connection needs.
struct Connection {
    state: Arc<AppState>,
    front: Arc<Front>,
    builder: auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
}

impl Connection {
    /// The front door (TLS, timeouts), then HTTP/1.1 or h2 until the client
    /// leaves or the drain ends. The connection slot is held throughout.
    async fn serve(self, permit: OwnedSemaphorePermit, stream: TcpStream, peer: SocketAddr) {
        let _permit = permit;
        let Some(io) = self.front.handshake(stream, peer).await else {
            return;
        };
        let regions = io.regions();
        let state = self.state;
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            if let Some(r) = &regions {
                req.extensions_mut().insert(r.clone());
            }
            let state = state.clone();
            // Boxed: hyper keeps a stream's service future inline in the
            // stream's task for as long as the stream lives (an enum with
            // the response body), and the handler's future is large; boxed,
            // it is freed when the response head is ready, so a long-lived
            // stream costs its body, not its handler's largest state. Boxed
            // on first poll, not here: hyper calls the service as it reads
            // each HEADERS frame, so a burst of 2,000 HTTP/2 streams boxed
            // every handler before the first one ran (8 KiB each in a debug
            // build: the flood of tests/hostile_h2.rs added 28 MiB resident,
            // 14 MiB since); now only handlers that wait hold theirs. Boxing
            // allocates and copies the whole future for every request, so
            // `routes::handle` keeps it small: what a hit does not need
            // (misses, upstream, rare routes) is boxed where it starts.
            async move {
                let handling = handle(state, req, peer);
                #[cfg(feature = "test-hooks")]
                crate::test_hooks::note_request_future(&handling);
                Ok::<_, Infallible>(Box::pin(handling).await)
            }
        });
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        if let Err(e) = self.watcher.watch(conn.into_owned()).await {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}

/// What lies beyond this node's disk: its cluster's peers and the shared
/// store.
struct Remote {
    cluster: Option<Arc<Cluster>>,
    bucket: Option<Arc<Bucket>>,
}

/// The cluster of `[cluster]`, if any. A peer answers a blob request once
/// its own fill has upstream's headers, so peers get the longest upstream
/// timeout and a margin to answer.
fn open_cluster(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<Option<Arc<Cluster>>, ServerError> {
    let Some(cfg) = &config.cluster else {
        return Ok(None);
    };
    let upstream = config
        .upstreams
        .iter()
        .map(|u| u.timeout)
        .max()
        .unwrap_or(Duration::from_secs(30));
    let cluster = Cluster::new(
        cfg,
        config.tls.is_some(),
        upstream + Duration::from_secs(5),
        metrics.clone(),
    )?;
    tracing::info!(me = %cluster.peers().me(), nodes = cluster.peers().all().len(),
        secret = cfg.secret_file.is_some(), "cluster mode");
    Ok(Some(Arc::new(cluster)))
}

/// The caches of a server: blobs, manifests, marks of private content.
type Caches = (Arc<BlobStore>, Arc<ManifestStore>, Arc<Private>);

/// Opens the marks of private content, the blob store (starting its
/// background work) and the manifest cache.
fn open_caches(
    config: &Config,
    layout: &Layout,
    metrics: &Arc<Metrics>,
    shutdown: &Shutdown,
    remote: &Remote,
    grants: &Arc<Grants>,
) -> Result<Caches, ServerError> {
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
    )
    .with_max_blob(config.cache.max_blob_bytes());
    let index = Arc::new(BlobIndex::new(layout, budget));
    let private = Arc::new(Private::open(layout).map_err(io_error(format!(
        "opening {}",
        layout.private_log().display()
    )))?);
    let blobs = BlobStore::open(layout, index, private.clone(), idle, shutdown.fills()).map_err(
        io_error(format!(
            "opening blob cache in {}",
            config.cache_dir.display()
        )),
    )?;
    let read_budget = ReadBudget::new(config.limits.read_ahead_budget.as_u64() as usize);
    let blobs = Arc::new(
        blobs
            .with_metrics(metrics.clone())
            .with_cluster(remote.cluster.clone())
            .with_bucket(remote.bucket.clone())
            .with_read_budget(read_budget)
            .with_max_detached_fills(config.cache.max_detached_fills)
            .with_grants(grants.clone()),
    );
    blobs.spawn_background(&shutdown.token());
    blobs.spawn_scrubber(
        Scrub {
            interval: config.cache.scrub_interval,
            max_rate: config.cache.scrub_max_rate.as_u64(),
        },
        &shutdown.token(),
    );
    let manifests = ManifestStore::open(layout, private.clone()).map_err(io_error(format!(
        "opening manifest cache in {}",
        config.cache_dir.display()
    )))?;
    let manifests = manifests
        .with_disk_limits(
            config.cache.max_manifests,
            config.cache.max_manifest_bytes.as_u64(),
        )
        .with_cluster(remote.cluster.clone())
        .with_bucket(remote.bucket.clone());
    Ok((blobs, Arc::new(manifests), private))
}

/// How often a running instance looks for a purge by an operator command.
const PURGE_CHECK: Duration = Duration::from_secs(2);

/// Watches `<cache>/purged`, which each `stowage cache purge` replaces:
/// when it is another file, the blobs and manifests the purge removed are
/// forgotten (their bytes leave the budget, their open files are let go,
/// the next request fetches them again). One `stat` per interval.
fn spawn_purge_watch(
    shutdown: &Shutdown,
    layout: &Layout,
    blobs: Arc<BlobStore>,
    manifests: Arc<ManifestStore>,
) {
    // Which file it is (each purge makes a new one), by `stat`: no need
    // to read it, which a purge run as another user may not let us do.
    async fn identity(path: &std::path::Path) -> Option<(u64, u64, i64, i64)> {
        use std::os::unix::fs::MetadataExt;
        let m = tokio::fs::metadata(path).await.ok()?;
        Some((m.dev(), m.ino(), m.mtime(), m.mtime_nsec()))
    }
    let path = layout.purged();
    shutdown.spawn_background(async move {
        let mut seen = identity(&path).await;
        let mut tick = tokio::time::interval(PURGE_CHECK);
        loop {
            tick.tick().await;
            let now = identity(&path).await;
            if now == seen {
                continue;
            }
            seen = now;
            let b = blobs.clone();
            let gone = tokio::task::spawn_blocking(move || b.forget_missing())
                .await
                .unwrap_or(0);
            manifests.forget_missing().await;
            tracing::info!(
                blobs = gone,
                "cache purged by an operator: forgot what it removed"
            );
        }
    });
}

/// Keeps the manifest files on disk within their bounds (at start, every
/// ten minutes, and when a write passes one) and compacts the private marks
/// when due, until the background work stops.
fn spawn_manifest_pruner(shutdown: &Shutdown, manifests: Arc<ManifestStore>) {
    shutdown.spawn_background(async move {
        // A scan at start-up, then every ten minutes, and whenever a write
        // takes the files past a bound: at most once a second then, should
        // removals fail and every write find them still past it.
        let mut tick = tokio::time::interval(Duration::from_secs(600));
        let mut last = None::<tokio::time::Instant>;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = manifests.disk_over() => {
                    if !manifests.disk_is_over() {
                        continue;
                    }
                    if let Some(t) = last {
                        tokio::time::sleep_until(t + Duration::from_secs(1)).await;
                    }
                }
            }
            last = Some(tokio::time::Instant::now());
            let m = manifests.clone();
            // The private marks of content gone (blobs evicted, manifests
            // pruned) go too, once they have doubled.
            let done = tokio::task::spawn_blocking(move || (m.prune(), m.compact_private_marks()));
            match done.await {
                Ok((pruned, compacted)) => {
                    if let Err(e) = pruned {
                        tracing::warn!(error = %e, "pruning manifests failed");
                    }
                    if let Err(e) = compacted {
                        tracing::warn!(error = %e, "compacting the private marks failed");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "manifest pruner panicked"),
            }
        }
    });
}
