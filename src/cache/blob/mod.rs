//! The blob cache: a content-addressed store on disk and the *fills* that
//! populate it.
//!
//! ## Store
//! A verified blob lives at `<cache>/blobs/<alg>/<hex[..2]>/<hex>`. Files only
//! get there by an fsynced, atomic rename from `<cache>/tmp/`, so anything in
//! the store is complete and verified; `tmp/` is emptied at start-up.
//!
//! ## Fills
//! A miss starts one [`Fill`] per digest, process-wide: a task detached from
//! any request that streams the upstream body into a temporary file while
//! hashing it. The fill publishes its progress on a `watch` channel.
//!
//! Every request for the digest while the fill runs (the first included)
//! reads that file with `pread` up to what has been written and waits for
//! more, so there is one upstream request however many clients ask, nobody
//! waits for the end, and a slow client slows nobody but itself.
//!
//! A reader never sends the last byte of its response before the fill has
//! verified the digest: until then it holds back one byte. If verification
//! fails or upstream breaks off, the fill publishes `Failed`, the temporary
//! file is removed, and every reader's body ends with an error, which cuts
//! the connection: no client can complete a corrupt blob.
//!
//! States of a fill, in order: `Connecting` (upstream request sent) ->
//! `Streaming` (headers received, bytes arriving) -> `Verified` or `Failed`.
//!
//! ## Budget
//! The [`BlobIndex`] accounts for every stored blob and reserves room for
//! each fill of known size when it starts; passing the high watermark wakes
//! the evictor. A blob larger than the whole budget is streamed but not
//! cached.
//!
//! ## When the disk fails
//! If the temporary file cannot be created or a write fails (disk full), the
//! fill keeps going without the disk: bytes past what reached the file are
//! handed to the readers already attached through a bounded broadcast queue
//! (the slowest reader paces the fill in this mode, so memory stays bounded),
//! the digest is still verified, and nothing is cached. Requests arriving
//! after that get a private stream of their own from upstream.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::{Notify, broadcast, mpsc, watch};

pub mod range;

use range::ByteRange;

use crate::body::{self, Body};
use crate::cache::index::BlobIndex;
use crate::cache::layout::Layout;
use crate::error::{Asked, Error, ErrorKind};
use crate::front::zerocopy::Regions;

use crate::metrics::{CacheKind, FillResult, Metrics, Outcome};
use crate::oci::headers::DOCKER_CONTENT_DIGEST;
use crate::oci::{Digest, Hasher, RepoName};
use crate::upstream::Upstream;

/// Bytes read from disk per body frame.
const CHUNK: usize = 256 * 1024;

/// Reads up to this size are done in place on the runtime thread (they
/// come from the page cache in microseconds).
const INLINE_READ: u64 = 64 * 1024;

/// Largest frame of mapped file bytes handed to hyper on a zero-copy
/// connection (see [`crate::front::zerocopy`]). The mapping is never touched, so
/// its size costs address space only.
const ZERO_COPY_CHUNK: u64 = 16 * 1024 * 1024;

/// Upstream body chunks queued between the network task and the disk writer.
/// Bounds fill memory to this many frames (hyper's HTTP/1 client frames
/// grow with its adaptive read buffer, up to a few hundred KiB each).
const WRITE_QUEUE: usize = 8;

/// While frames keep arriving, readers are woken at least every this many
/// written bytes (and whenever the queue runs dry).
const PUBLISH_EVERY: u64 = 1024 * 1024;

/// Chunks queued for readers when the disk has failed (see module docs).
const SPILL_QUEUE: usize = 64;

/// Where a fill is.
#[derive(Debug, Clone)]
enum Phase {
    /// The upstream request is under way; no headers yet.
    Connecting,
    /// Upstream answered 200; bytes are being written.
    Streaming,
    /// All bytes received, size and digest checked (and, when cacheable and
    /// the disk held up, the file is in the store).
    Verified,
    /// Upstream error, mismatch or local failure. The temporary file is gone.
    Failed(Error),
}

/// What readers of a fill can see, published by the fill on every write.
#[derive(Debug, Clone)]
struct Progress {
    phase: Phase,
    /// Size announced by upstream (`Content-Length`), if any; set to the
    /// actual size on verification.
    total: Option<u64>,
    /// Bytes written to the temporary file so far; readable with `pread`.
    written: u64,
    /// Set when the disk failed (or was never used): bytes at and past this
    /// offset come through the spill queue instead of the file.
    disk_end: Option<u64>,
}

/// A chunk of a blob at an offset, for readers when the disk has failed.
type SpillChunk = (u64, Bytes);

/// One upstream download of one digest, shared by all its readers.
struct Fill {
    /// The temporary file, set before `Streaming` is published (unless the
    /// fill runs without the disk). Readers use positional reads on this
    /// descriptor, which stays valid after the file is renamed or unlinked.
    file: OnceLock<Arc<File>>,
    /// Progress, watched by every reader.
    progress: watch::Sender<Progress>,
    /// Bytes past `disk_end`, once the disk is out of the picture.
    spill: broadcast::Sender<SpillChunk>,
}

impl Fill {
    fn new() -> Arc<Fill> {
        let (progress, _) = watch::channel(Progress {
            phase: Phase::Connecting,
            total: None,
            written: 0,
            disk_end: None,
        });
        let (spill, _) = broadcast::channel(SPILL_QUEUE);
        Arc::new(Fill {
            file: OnceLock::new(),
            progress,
            spill,
        })
    }
}

/// The blob cache. Cheap to share: wrap in an `Arc`.
pub struct BlobStore {
    /// Where verified blobs and the files of fills in progress live.
    layout: Layout,
    /// Sizes, recency, budget, pins.
    index: Arc<BlobIndex>,
    /// Fills running now, by digest. Locked only on the miss path, never
    /// across an await.
    fills: Mutex<HashMap<Digest, Arc<Fill>>>,
    /// Distinguishes temporary file names.
    next_tmp: AtomicU64,
    /// Longest wait for the next upstream body chunk before a fill gives up.
    idle_timeout: Duration,
    /// Wakes the evictor.
    evict: Arc<Notify>,
    /// Test hook: fail disk writes once a fill has written this many bytes.
    write_fault: AtomicU64,
    /// Fills in flight, fill results, digest mismatches.
    metrics: Arc<Metrics>,
    /// Set when the server stops, ending the background tasks.
    stopped: watch::Sender<bool>,
}

/// The blob part of a response before the handler adds common headers.
pub struct BlobResponse {
    /// How it was answered.
    pub outcome: Outcome,
    /// The HTTP response, or the error to answer with (an unsatisfiable
    /// range of a stored blob is still a hit).
    pub response: Result<Response<Body>, Error>,
}

impl BlobStore {
    /// Opens (creating) the store of `layout` and removes leftovers of
    /// fills interrupted by a crash. The index is loaded separately (see
    /// [`BlobStore::spawn_background`]).
    pub fn open(
        layout: &Layout,
        index: Arc<BlobIndex>,
        idle_timeout: Duration,
    ) -> io::Result<BlobStore> {
        let tmp = layout.tmp();
        std::fs::create_dir_all(layout.blobs())?;
        std::fs::create_dir_all(&tmp)?;
        for entry in std::fs::read_dir(&tmp)? {
            let entry = entry?;
            tracing::info!(file = %entry.path().display(), "removing leftover of an interrupted fill");
            if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(entry.path())?;
            } else {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(BlobStore {
            layout: layout.clone(),
            index,
            fills: Mutex::new(HashMap::new()),
            next_tmp: AtomicU64::new(0),
            idle_timeout,
            evict: Arc::new(Notify::new()),
            write_fault: AtomicU64::new(u64::MAX),
            stopped: watch::channel(false).0,
            metrics: Arc::new(Metrics::new()),
        })
    }

    /// Reports to `metrics` (a fresh, unexported set until this is called).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> BlobStore {
        self.metrics = metrics;
        self
    }

    /// The metrics this store reports to.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Fills running now (including verified ones still being committed).
    pub fn fills_in_flight(&self) -> usize {
        self.fills.lock().map(|f| f.len()).unwrap_or(0)
    }

    /// The index.
    pub fn index(&self) -> &Arc<BlobIndex> {
        &self.index
    }

    /// Starts the background work: loading the index from disk, the
    /// evictor, and the access-time flusher. Must run inside a tokio
    /// runtime.
    pub fn spawn_background(self: &Arc<Self>) {
        let index = self.index.clone();
        let evict = self.evict.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let loader = index.clone();
            match tokio::task::spawn_blocking(move || loader.load()).await {
                Ok(Ok(n)) => tracing::info!(
                    blobs = n,
                    bytes = index.used(),
                    ms = started.elapsed().as_millis() as u64,
                    "blob index loaded"
                ),
                Ok(Err(e)) => tracing::error!(error = %e, "loading the blob index failed"),
                Err(e) => tracing::error!(error = %e, "blob index loader panicked"),
            }
            evict.notify_one();
        });
        let index = self.index.clone();
        let evict = self.evict.clone();
        let mut stop = self.stop_signal();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = evict.notified() => {}
                    _ = stop.changed() => return,
                }
                if !index.is_loaded() {
                    continue;
                }
                let i = index.clone();
                let _ = tokio::task::spawn_blocking(move || i.evict_if_needed()).await;
            }
        });
        let index = self.index.clone();
        let mut stop = self.stop_signal();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(crate::cache::index::FLUSH_INTERVAL);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
                }
                let i = index.clone();
                let _ = tokio::task::spawn_blocking(move || i.flush_atimes()).await;
            }
        });
    }

    /// Completes-on-change receiver for background work tied to this store:
    /// it changes once, when the server stops.
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stopped.subscribe()
    }

    /// Stops the background work (evictor, flusher, and whatever else
    /// watches [`BlobStore::stop_signal`]).
    pub fn stop_background(&self) {
        self.stopped.send_replace(true);
    }

    /// Test hook: make disk writes of fills fail (as on a full disk) past
    /// `after` bytes of a blob; `None` turns it off.
    #[doc(hidden)]
    pub fn inject_write_failure(&self, after: Option<u64>) {
        self.write_fault
            .store(after.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Opens a stored blob, returning it with its size, or `None` on a miss.
    /// Records the access.
    fn open_stored(&self, digest: &Digest) -> io::Result<Option<(File, u64)>> {
        match File::open(self.layout.blob(digest)) {
            Ok(f) => {
                let len = f.metadata()?.len();
                self.index.touch(digest, len);
                Ok(Some((f, len)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.index.forget(digest);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether the store holds `digest` (verified, complete).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.layout.blob(digest).is_file()
    }

    /// Answers `GET` (or `HEAD` when `head_only`) for a blob: from the store,
    /// by joining a running fill, or by starting one. `range` is the raw
    /// `Range` header, if any.
    pub async fn serve(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
        range: Option<&str>,
        head_only: bool,
        zero_copy: Option<Arc<Regions>>,
    ) -> Result<BlobResponse, Error> {
        let range = range.and_then(range::parse);
        // A stored blob: complete and verified.
        let hit = |file: File, size: u64, zero_copy| {
            Ok(BlobResponse {
                outcome: Outcome::Hit,
                response: file_response(
                    digest,
                    Some(Arc::new(file)),
                    size,
                    range,
                    head_only,
                    None,
                    zero_copy,
                ),
            })
        };
        if let Some((file, size)) = self.open_stored(digest).map_err(local_error)? {
            return hit(file, size, zero_copy);
        }
        if head_only {
            return self.head_miss(upstream, repo, digest).await;
        }
        let (fill, outcome, spill) = match self.join_or_start(upstream, repo, digest)? {
            Lookup::Stored(file, size) => return hit(file, size, zero_copy),
            Lookup::Fill(fill, outcome, spill) => (fill, outcome, spill),
        };
        let mut rx = fill.progress.subscribe();
        let progress = rx
            .wait_for(|p| !matches!(p.phase, Phase::Connecting))
            .await
            .map_err(|_| Error::internal("blob fill ended without a result"))?
            .clone();
        if let Phase::Failed(e) = progress.phase {
            return Err(e);
        }
        let file = fill.file.get().cloned();
        let feed = Feed {
            progress: rx,
            spill: Some(spill),
        };
        let response = match progress.total {
            Some(size) => file_response(digest, file, size, range, false, Some(feed), zero_copy),
            None => {
                // Upstream gave no length: stream the whole blob chunked (a
                // range cannot be resolved without the size, so it is
                // ignored).
                let mut response = Response::new(file_body(file, 0, None, Some(feed), zero_copy));
                set_blob_headers(response.headers_mut(), digest);
                Ok(response)
            }
        };
        Ok(BlobResponse { outcome, response })
    }

    /// Finds a running fill for `digest` or starts one. Checks the store
    /// again under the lock: a fill removes itself from the map only after
    /// its rename, so "no fill and no file" means nobody has it.
    ///
    /// The reader's spill subscription is taken while holding the fill's
    /// progress, which is only ever changed to "off the disk" or to
    /// `Streaming` before any chunk is spilled; so a reader that joins sees
    /// every spilled chunk. A fill already streaming off the disk cannot be
    /// joined from the start of the blob; such requests get a private fill.
    fn join_or_start(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Lookup, Error> {
        let mut fills = self
            .fills
            .lock()
            .map_err(|_| Error::internal("fill table poisoned"))?;
        // A fill that just failed is still in the table for a moment: start
        // afresh rather than hand its error to a new request.
        let failed = fills
            .get(digest)
            .is_some_and(|f| matches!(f.progress.borrow().phase, Phase::Failed(_)));
        if failed {
            fills.remove(digest);
        }
        if let Some(fill) = fills.get(digest) {
            let progress = fill.progress.borrow();
            if progress.disk_end.is_none() || matches!(progress.phase, Phase::Connecting) {
                // A verified fill still committing serves a complete,
                // verified file: for the client that is a hit.
                let outcome = if matches!(progress.phase, Phase::Verified) {
                    Outcome::Hit
                } else {
                    Outcome::Join
                };
                let spill = fill.spill.subscribe();
                drop(progress);
                return Ok(Lookup::Fill(fill.clone(), outcome, spill));
            }
            drop(progress);
            drop(fills);
            let fill = Fill::new();
            let spill = fill.spill.subscribe();
            self.spawn_fill(fill.clone(), upstream, repo, digest, false);
            return Ok(Lookup::Fill(fill, Outcome::Upstream, spill));
        }
        if let Some((file, size)) = self.open_stored(digest).map_err(local_error)? {
            return Ok(Lookup::Stored(file, size));
        }
        let fill = Fill::new();
        let spill = fill.spill.subscribe();
        fills.insert(digest.clone(), fill.clone());
        drop(fills);
        self.spawn_fill(fill.clone(), upstream, repo, digest, true);
        Ok(Lookup::Fill(fill, Outcome::Miss, spill))
    }

    /// Runs a fill in a task of its own. `shared` fills are in the fill
    /// table and try to cache; private ones stream without the disk.
    fn spawn_fill(
        self: &Arc<Self>,
        fill: Arc<Fill>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
        shared: bool,
    ) {
        let store = self.clone();
        let upstream = upstream.clone();
        let repo = repo.clone();
        let digest = digest.clone();
        let mut cleanup = FillCleanup {
            store: Some(self.clone()),
            fill: fill.clone(),
            digest: digest.clone(),
        };
        tokio::spawn(async move {
            let guard = store.metrics.fill_started();
            let result = store
                .run_fill(&fill, &upstream, &repo, &digest, shared)
                .await;
            guard.finish(match &result {
                Ok((size, true)) => FillResult::Stored(*size),
                Ok((_, false)) => FillResult::Uncached,
                Err(_) => FillResult::Failed,
            });
            match &result {
                Ok((size, true)) => tracing::info!(%digest, size, repo = %repo, "blob cached"),
                Ok((size, false)) => {
                    tracing::info!(%digest, size, repo = %repo, "blob served without caching")
                }
                Err(e) => {
                    tracing::warn!(%digest, repo = %repo, error = %e.report(), "blob fill failed")
                }
            }
            fill.progress.send_modify(|p| match result {
                Ok((size, _)) => {
                    p.total = Some(size);
                    p.phase = Phase::Verified;
                }
                Err(e) => p.phase = Phase::Failed(e),
            });
            if shared && let Ok(mut fills) = store.fills.lock() {
                // Only this fill's own entry: a newer fill may have replaced
                // it after it failed.
                if fills.get(&digest).is_some_and(|f| Arc::ptr_eq(f, &fill)) {
                    fills.remove(&digest);
                }
            }
            cleanup.disarm();
        });
    }

    /// The fill task: fetch, write and hash, verify, commit. Returns the
    /// size and whether the blob was cached. On any error the temporary
    /// file is removed.
    async fn run_fill(
        &self,
        fill: &Fill,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
        shared: bool,
    ) -> Result<(u64, bool), Error> {
        let (resp, total) = ask_upstream(upstream, Method::GET, repo, digest).await?;

        // Without a known size the disk is required: readers cannot tell
        // the last byte of a spilled stream.
        let use_disk = shared && total.is_none_or(|t| self.index.cacheable(t));
        if shared && !use_disk {
            tracing::info!(%digest, size = total, max = self.index.budget().max_size,
                "blob larger than the cache budget: streaming without caching");
        }
        let file = if use_disk {
            match self.create_tmp(digest) {
                Ok(f) => Some(f),
                Err(e) if total.is_some() => {
                    tracing::error!(%digest, error = %e, "cannot create a temporary file: streaming without caching");
                    None
                }
                Err(e) => return Err(local_error(e)),
            }
        } else if total.is_some() {
            None
        } else {
            return Err(Error::unavailable(format!(
                "cannot stream {digest} without the disk: upstream sent no Content-Length"
            )));
        };

        let reservation = match (&file, total) {
            (Some(_), Some(t)) => {
                if self.index.reserve(t) {
                    self.evict.notify_one();
                }
                t
            }
            _ => 0,
        };
        let tmp_path = file.as_ref().map(|(p, _)| p.clone());
        if let Some((_, f)) = &file {
            let _ = fill.file.set(f.clone());
        }
        fill.progress.send_modify(|p| {
            p.phase = Phase::Streaming;
            p.total = total;
            if file.is_none() {
                p.disk_end = Some(0);
            }
        });

        let result = self
            .stream(fill, resp.into_body(), file.map(|(_, f)| f), total, digest)
            .await;
        if let Ok((size, _)) = &result {
            // Verified: readers may finish now. Making the file durable and
            // moving it into the store (fsyncs, rename) need not hold up
            // their last byte; the fill stays in the table until then, so
            // new requests join it instead of missing.
            fill.progress.send_modify(|p| {
                p.total = Some(*size);
                p.phase = Phase::Verified;
            });
        }
        let outcome = match (result, tmp_path) {
            (Ok((size, true)), Some(tmp)) => {
                match self.commit(&tmp, digest, size, reservation).await {
                    Ok(()) => Ok((size, true)),
                    Err(e) => {
                        let _ = std::fs::remove_file(&tmp);
                        tracing::error!(%digest, error = %e, "cannot commit blob to the store");
                        // The readers already have verified bytes; only caching failed.
                        Ok((size, false))
                    }
                }
            }
            (Ok((size, _)), tmp) => {
                if let Some(tmp) = tmp {
                    let _ = std::fs::remove_file(&tmp);
                }
                Ok((size, false))
            }
            (Err(e), tmp) => {
                if let Some(tmp) = tmp {
                    let _ = std::fs::remove_file(&tmp);
                }
                Err(e)
            }
        };
        if matches!(outcome, Ok((_, true))) {
            // The commit turned the reservation into a stored blob.
            self.evict.notify_one();
        } else {
            self.index.release(reservation);
        }
        outcome
    }

    fn create_tmp(&self, digest: &Digest) -> io::Result<(PathBuf, Arc<File>)> {
        let path = self
            .layout
            .tmp_file(digest, self.next_tmp.fetch_add(1, Ordering::Relaxed));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((path, Arc::new(file)))
    }

    /// Pumps the upstream body to a blocking writer thread that writes,
    /// hashes and publishes progress (or spills to readers once the disk
    /// fails), then checks size and digest. Returns the size and whether
    /// the whole blob reached the file.
    async fn stream(
        &self,
        fill: &Fill,
        mut body: hyper::body::Incoming,
        file: Option<Arc<File>>,
        total: Option<u64>,
        digest: &Digest,
    ) -> Result<(u64, bool), Error> {
        let (tx, rx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
        let writer = Writer {
            file,
            progress: fill.progress.clone(),
            spill: fill.spill.clone(),
            fault: self.write_fault.load(Ordering::Relaxed),
            can_spill: total.is_some(),
            stall_limit: self.idle_timeout,
        };
        let algorithm = digest.algorithm();
        let writer = tokio::task::spawn_blocking(move || writer.run(rx, algorithm));

        let mut received = 0u64;
        let pump: Result<(), Error> = async {
            loop {
                let frame = match tokio::time::timeout(self.idle_timeout, body.frame()).await {
                    Err(_) => {
                        return Err(Error::upstream(
                            ErrorKind::BodyBroken,
                            format!(
                                "upstream stalled for {:?} sending {digest}",
                                self.idle_timeout
                            ),
                        ));
                    }
                    Ok(None) => return Ok(()),
                    Ok(Some(Err(e))) => {
                        return Err(Error::upstream(
                            ErrorKind::BodyBroken,
                            format!("upstream body of {digest} broke off: {e}"),
                        )
                        .with_cause(e));
                    }
                    Ok(Some(Ok(frame))) => frame,
                };
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                received += data.len() as u64;
                if total.is_some_and(|t| received > t) {
                    return Err(Error::upstream(
                        ErrorKind::UpstreamProtocol,
                        format!("upstream sent more than its Content-Length for {digest}"),
                    ));
                }
                if tx.send(data).await.is_err() {
                    // The writer stopped: its error is reported below.
                    return Ok(());
                }
            }
        }
        .await;
        drop(tx);
        let written = writer
            .await
            .map_err(|e| Error::internal(format!("blob writer panicked: {e}")))?;
        pump?;
        let (actual, size, on_disk) = written.map_err(local_error)?;
        if let Some(t) = total
            && size != t
        {
            return Err(Error::upstream(
                ErrorKind::UpstreamProtocol,
                format!("upstream sent {size} of {t} bytes for {digest}"),
            ));
        }
        if &actual != digest {
            self.metrics.digest_mismatch(CacheKind::Blob);
            return Err(Error::upstream(
                ErrorKind::DigestMismatch,
                format!("digest mismatch: upstream sent {actual} for {digest}"),
            ));
        }
        Ok((size, on_disk))
    }

    /// fsyncs the file, records it in the journal, moves it into the store
    /// atomically, then fsyncs the directory so the rename survives a crash.
    /// Once renamed, the blob is indexed in place of its `reservation`; an
    /// error means nothing was stored.
    async fn commit(
        &self,
        tmp_path: &Path,
        digest: &Digest,
        size: u64,
        reservation: u64,
    ) -> io::Result<()> {
        let tmp_path = tmp_path.to_path_buf();
        let dest = self.layout.blob(digest);
        let index = self.index.clone();
        let digest = digest.clone();
        tokio::task::spawn_blocking(move || {
            File::open(&tmp_path)?.sync_all()?;
            let dir = dest
                .parent()
                .ok_or_else(|| io::Error::other("store path has no parent"))?;
            std::fs::create_dir_all(dir)?;
            index.record(&digest, size)?;
            // Make room first, so committed bytes stay within the budget
            // (this fill's bytes are already counted as reserved).
            index.evict_if_needed();
            std::fs::rename(&tmp_path, &dest)?;
            index.committed(&digest, size, reservation);
            if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
                // Stored and served; only durability across a power cut is
                // in doubt (the next start re-verifies via the journal).
                tracing::warn!(%digest, error = %e, "cannot fsync the blob directory");
            }
            Ok(())
        })
        .await
        .map_err(io::Error::other)?
    }

    /// `HEAD` on a blob that is not stored: answer from a running fill when
    /// it knows the size, otherwise ask upstream with `HEAD`. Never starts
    /// a fill.
    async fn head_miss(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<BlobResponse, Error> {
        let known = self.fills.lock().ok().and_then(|f| {
            let p = f.get(digest)?.progress.borrow().clone();
            let outcome = match p.phase {
                Phase::Verified => Outcome::Hit,
                Phase::Streaming => Outcome::Join,
                Phase::Connecting | Phase::Failed(_) => return None,
            };
            Some((p.total?, outcome))
        });
        let (size, outcome) = match known {
            Some((size, outcome)) => (Some(size), outcome),
            None => (
                ask_upstream(upstream, Method::HEAD, repo, digest).await?.1,
                Outcome::Upstream,
            ),
        };
        let mut response = Response::new(body::empty());
        set_blob_headers(response.headers_mut(), digest);
        if let Some(size) = size {
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        }
        Ok(BlobResponse {
            outcome,
            response: Ok(response),
        })
    }
}

/// The blocking half of a fill: writes chunks to the file, hashes them and
/// publishes progress; once the disk fails, spills chunks to the readers.
struct Writer {
    file: Option<Arc<File>>,
    progress: watch::Sender<Progress>,
    spill: broadcast::Sender<SpillChunk>,
    /// Test hook: fail writes past this many bytes.
    fault: u64,
    /// Whether spilling is possible (the size is known).
    can_spill: bool,
    /// Longest wait for the slowest reader when spilling.
    stall_limit: Duration,
}

impl Writer {
    /// Returns the digest, the size and whether every byte reached the file.
    fn run(
        self,
        mut rx: mpsc::Receiver<Bytes>,
        algorithm: crate::oci::Algorithm,
    ) -> io::Result<(Digest, u64, bool)> {
        let mut hasher = Hasher::new(algorithm);
        let mut offset = 0u64;
        let mut published = 0u64;
        let mut on_disk = self.file.is_some();
        while let Some(chunk) = rx.blocking_recv() {
            if on_disk && let Some(file) = &self.file {
                let result = if offset + chunk.len() as u64 > self.fault {
                    Err(io::Error::new(
                        io::ErrorKind::StorageFull,
                        "injected write failure",
                    ))
                } else {
                    let mut out: &File = file;
                    out.write_all(&chunk)
                };
                match result {
                    Ok(()) => {
                        // Wake readers once per burst, not per frame: when
                        // nothing more is queued, or every PUBLISH_EVERY.
                        let written = offset + chunk.len() as u64;
                        if rx.is_empty() || written - published >= PUBLISH_EVERY {
                            self.progress.send_modify(|p| p.written = written);
                            published = written;
                        }
                    }
                    Err(e) if self.can_spill => {
                        tracing::error!(error = %e, at = offset,
                            "writing a blob to the cache failed: streaming the rest without caching");
                        on_disk = false;
                        self.progress.send_modify(|p| {
                            p.written = offset;
                            p.disk_end = Some(offset);
                        });
                    }
                    Err(e) => return Err(e),
                }
            }
            if !on_disk {
                // Pace the fill by the slowest attached reader so memory
                // stays bounded (a reader stuck for longer than the idle
                // timeout is dropped: it lags and its body fails); with no
                // reader left there is no point.
                let waiting = std::time::Instant::now();
                while self.spill.len() + 1 >= SPILL_QUEUE
                    && self.spill.receiver_count() > 0
                    && waiting.elapsed() < self.stall_limit
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                if self.spill.receiver_count() == 0 {
                    return Err(io::Error::other(
                        "no readers left for a blob that cannot be cached",
                    ));
                }
                let _ = self.spill.send((offset, chunk.clone()));
            }
            hasher.update(&chunk);
            offset += chunk.len() as u64;
        }
        if on_disk && published != offset {
            self.progress.send_modify(|p| p.written = offset);
        }
        Ok((hasher.finish(), offset, on_disk))
    }
}

/// Sends `method` for a blob upstream; anything but 200 becomes the OCI
/// error for the client. Returns the response and its `Content-Length`.
async fn ask_upstream(
    upstream: &Upstream,
    method: Method,
    repo: &RepoName,
    digest: &Digest,
) -> Result<(Response<hyper::body::Incoming>, Option<u64>), Error> {
    let resp = upstream
        .send(
            method,
            repo.as_str(),
            &format!("blobs/{digest}"),
            HeaderMap::new(),
        )
        .await?;
    if resp.status() != StatusCode::OK {
        return Err(Error::upstream_status(
            resp.status(),
            Asked::Blob,
            resp.headers().get(header::RETRY_AFTER),
            &digest.to_string(),
        ));
    }
    let len = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    Ok((resp, len))
}

/// Makes sure a fill task that dies without finishing (a panic, or its
/// runtime shutting down) fails its readers and leaves the fill table,
/// instead of leaving them waiting forever.
struct FillCleanup {
    store: Option<Arc<BlobStore>>,
    fill: Arc<Fill>,
    digest: Digest,
}

impl FillCleanup {
    fn disarm(&mut self) {
        self.store = None;
    }
}

impl Drop for FillCleanup {
    fn drop(&mut self) {
        let Some(store) = self.store.take() else {
            return;
        };
        self.fill.progress.send_modify(|p| {
            if !matches!(p.phase, Phase::Verified | Phase::Failed(_)) {
                p.phase = Phase::Failed(Error::internal("blob fill stopped"));
            }
        });
        if let Ok(mut fills) = store.fills.lock()
            && fills
                .get(&self.digest)
                .is_some_and(|f| Arc::ptr_eq(f, &self.fill))
        {
            fills.remove(&self.digest);
        }
    }
}

/// Result of looking for a blob under the fill lock.
enum Lookup {
    /// Stored after all (a fill finished just now).
    Stored(File, u64),
    /// A fill to read from, started or joined, with the reader's
    /// subscription to its spill queue.
    Fill(Arc<Fill>, Outcome, broadcast::Receiver<SpillChunk>),
}

fn local_error(e: io::Error) -> Error {
    Error::local("cache storage error", e)
}

fn set_blob_headers(h: &mut HeaderMap, digest: &Digest) {
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&digest.to_string()) {
        h.insert(DOCKER_CONTENT_DIGEST, v);
        if let Ok(etag) = HeaderValue::from_str(&format!("\"{digest}\"")) {
            h.insert(header::ETAG, etag);
        }
    }
}

/// What a reader of a fill listens to.
struct Feed {
    progress: watch::Receiver<Progress>,
    spill: Option<broadcast::Receiver<SpillChunk>>,
}

/// Builds a 200/206/416 response for a blob of known `size` whose bytes come
/// from `file`, either complete (`feed` is `None`) or from a fill.
fn file_response(
    digest: &Digest,
    file: Option<Arc<File>>,
    size: u64,
    range: Option<ByteRange>,
    head_only: bool,
    feed: Option<Feed>,
    zero_copy: Option<Arc<Regions>>,
) -> Result<Response<Body>, Error> {
    let (start, end, status) = match range {
        None => (0, size, StatusCode::OK),
        Some(r) => match r.resolve(size) {
            Some((s, e)) => (s, e, StatusCode::PARTIAL_CONTENT),
            None => return Err(Error::range_invalid(size)),
        },
    };
    let body = if head_only {
        body::empty()
    } else {
        file_body(file, start, Some(end), feed, zero_copy)
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    set_blob_headers(h, digest);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {}-{}/{size}", start, end - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    Ok(response)
}

/// Reader state for one response body.
struct Reader {
    file: Option<Arc<File>>,
    /// Next offset to send.
    pos: u64,
    /// End of the span to send (exclusive); `None` = to the end of a blob
    /// whose size is not known yet.
    end: Option<u64>,
    /// The fill being read, or `None` for a stored blob.
    feed: Option<Feed>,
    /// The final byte of the response, received from the spill queue and
    /// held until the fill is verified.
    held: Option<Bytes>,
    /// Set on plain HTTP/1 connections: send file bytes with `sendfile`.
    zero_copy: Option<Arc<Regions>>,
}

/// What to do next.
enum Step {
    /// Read `[pos, limit)` from the file.
    Disk(u64),
    /// Send these bytes.
    Send(Bytes),
    /// The response is complete.
    Done,
}

/// A body that streams `[start, end)` of a blob in bounded chunks. When
/// reading a fill, it waits for bytes to arrive, never sends its final byte
/// before the fill is verified, and fails if the fill fails.
fn file_body(
    file: Option<Arc<File>>,
    start: u64,
    end: Option<u64>,
    feed: Option<Feed>,
    zero_copy: Option<Arc<Regions>>,
) -> Body {
    let reader = Reader {
        file,
        pos: start,
        end,
        feed,
        held: None,
        zero_copy,
    };
    let stream = futures_util::stream::try_unfold(reader, |mut r| async move {
        let chunk = match r.next_step().await? {
            Step::Done => return Ok(None),
            Step::Send(bytes) => bytes,
            Step::Disk(limit) => {
                let file = r
                    .file
                    .clone()
                    .ok_or_else(|| io::Error::other("blob has no file to read"))?;
                let pos = r.pos;
                let chunk = match &r.zero_copy {
                    // A few KiB from the page cache: cheaper to copy in
                    // place than to map, or to hop to a blocking thread.
                    _ if limit - pos <= INLINE_READ => {
                        read_exact_at(&file, pos, (limit - pos) as usize)?
                    }
                    // Mapped, never touched: the connection sends it with
                    // sendfile, so a large frame costs no memory.
                    Some(regions) => {
                        let want = (limit - pos).min(ZERO_COPY_CHUNK) as usize;
                        regions.chunk(&file, pos, want)?
                    }
                    None => {
                        let want = (limit - pos).min(CHUNK as u64) as usize;
                        tokio::task::spawn_blocking(move || read_exact_at(&file, pos, want))
                            .await
                            .map_err(io::Error::other)??
                    }
                };
                r.pos += chunk.len() as u64;
                chunk
            }
        };
        Ok(Some((Frame::data(chunk), r)))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

impl Reader {
    /// Waits until there is something to send.
    async fn next_step(&mut self) -> io::Result<Step> {
        loop {
            let Some(feed) = self.feed.as_mut() else {
                let end = self.end.unwrap_or(self.pos);
                return Ok(if self.pos < end {
                    Step::Disk(end)
                } else {
                    Step::Done
                });
            };
            let p = feed.progress.borrow_and_update().clone();
            let verified = match p.phase {
                Phase::Failed(e) => {
                    return Err(io::Error::other(format!(
                        "blob fill failed: {}",
                        e.message()
                    )));
                }
                Phase::Verified => true,
                Phase::Connecting | Phase::Streaming => false,
            };
            // The end of this response, when known.
            let end = self.end.or(if verified { p.total } else { None });
            // A reader that will never need spilled bytes lets go of the
            // queue, so it cannot hold up a fill that lost its disk.
            let needs_spill = match (p.disk_end, end) {
                (Some(d), Some(e)) => e > d,
                (None, _) => !verified,
                (Some(_), None) => true,
            };
            if !needs_spill {
                feed.spill = None;
            }
            if verified && let Some(h) = self.held.take() {
                return Ok(Step::Send(h));
            }
            let finished = end.is_some_and(|e| self.pos >= e) && self.held.is_none();
            if finished && verified {
                return Ok(Step::Done);
            }
            if !finished && self.held.is_none() {
                // Never send the final byte before verification: hold back
                // the last byte of the response, or, size unknown, the last
                // byte written so far.
                let max_send = match (verified, end) {
                    (true, Some(e)) => e,
                    (false, Some(e)) => e - 1,
                    (_, None) => p.written.saturating_sub(1),
                };
                let on_disk = p.disk_end.unwrap_or(p.written);
                let limit = on_disk.min(max_send);
                if self.pos < limit {
                    return Ok(Step::Disk(limit));
                }
                if let (Some(d), Some(e)) = (p.disk_end, end)
                    && self.pos >= d
                {
                    // Past the disk: take bytes from the spill queue.
                    let spill = feed
                        .spill
                        .as_mut()
                        .ok_or_else(|| io::Error::other("uncached blob stream unavailable"))?;
                    tokio::select! {
                        chunk = spill.recv() => match chunk {
                            Ok((off, bytes)) => {
                                if let Some(step) = self.take_spilled(off, bytes, e, verified)? {
                                    return Ok(step);
                                }
                            }
                            Err(broadcast::error::RecvError::Lagged(_)) => {
                                return Err(io::Error::other("reader fell behind an uncached blob stream"));
                            }
                            Err(broadcast::error::RecvError::Closed) => {
                                if verified {
                                    return Err(io::Error::other("uncached blob stream ended early"));
                                }
                                wait_change(&mut feed.progress).await?;
                            }
                        },
                        changed = wait_change(&mut feed.progress), if !verified => changed?,
                    }
                    continue;
                }
            }
            wait_change(&mut feed.progress).await?;
        }
    }

    /// Takes what this reader needs from a spilled chunk at `off`, holding
    /// back the response's final byte until verification.
    fn take_spilled(
        &mut self,
        off: u64,
        bytes: Bytes,
        end: u64,
        verified: bool,
    ) -> io::Result<Option<Step>> {
        let chunk_end = off + bytes.len() as u64;
        if chunk_end <= self.pos {
            return Ok(None);
        }
        if off > self.pos {
            return Err(io::Error::other("missed part of an uncached blob stream"));
        }
        let from = (self.pos - off) as usize;
        let to = (end.min(chunk_end) - off) as usize;
        let mut slice = bytes.slice(from..to);
        self.pos += slice.len() as u64;
        if self.pos == end && !verified && !slice.is_empty() {
            self.held = Some(slice.split_off(slice.len() - 1));
        }
        Ok((!slice.is_empty()).then_some(Step::Send(slice)))
    }
}

/// Waits for the fill's progress to change. When the fill is gone its final
/// state is already published; anything else is an error.
async fn wait_change(progress: &mut watch::Receiver<Progress>) -> io::Result<()> {
    if progress.changed().await.is_ok() {
        return Ok(());
    }
    match progress.borrow().phase {
        Phase::Verified | Phase::Failed(_) => Ok(()),
        _ => Err(io::Error::other("blob fill vanished")),
    }
}

/// Reads exactly `len` bytes at `pos` (the bytes are known to be on disk).
fn read_exact_at(file: &File, pos: u64, len: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::zeroed(len);
    file.read_exact_at(&mut buf, pos)?;
    Ok(buf.freeze())
}
