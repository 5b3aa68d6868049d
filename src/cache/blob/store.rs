//! The store of verified blobs: opening it (emptying `tmp/` of an
//! interrupted run), looking a blob up, creating a fill's temporary file,
//! and committing a verified one (fsync, journal record, rename, directory
//! fsync). Also the background work that keeps it in budget: the start-up
//! index scan, the evictor and the access-time flusher.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::fill::{FillTable, TmpFile};
use crate::bucket::Bucket;
use crate::cache::index::BlobIndex;
use crate::cache::layout::Layout;
use crate::cache::private::Private;
use crate::cluster::Cluster;
use crate::front::ReadBudget;
use crate::metrics::Metrics;
use crate::oci::Digest;

/// A blob in the store, opened: complete and verified.
pub(super) struct StoredBlob {
    pub(super) file: File,
    pub(super) size: u64,
}

/// The blob cache. Cheap to share: wrap in an `Arc`.
pub(crate) struct BlobStore {
    /// Where verified blobs and the files of fills in progress live.
    pub(super) layout: Layout,
    /// Sizes, recency, budget, pins.
    pub(super) index: Arc<BlobIndex>,
    /// Fills running now, by digest.
    pub(super) fills: Arc<FillTable>,
    /// Distinguishes temporary file names.
    next_tmp: AtomicU64,
    /// Longest wait for the next upstream body chunk before a fill gives up.
    pub(super) idle_timeout: Duration,
    /// Wakes the evictor.
    pub(super) evict: Arc<Notify>,
    /// Test hook: fail disk writes once a fill has written this many bytes.
    pub(super) write_fault: AtomicU64,
    /// Fills in flight, fill results, digest mismatches.
    pub(super) metrics: Arc<Metrics>,
    /// Where fill tasks run, so shutdown can wait for them.
    pub(super) tasks: TaskTracker,
    /// The cluster this node is in: misses go to their owner first.
    pub(super) cluster: Option<Arc<Cluster>>,
    /// The shared store: looked in before upstream, uploaded to after.
    pub(super) bucket: Option<Arc<Bucket>>,
    /// Which digests came only through passthrough upstreams.
    pub(super) private: Arc<Private>,
    /// The process-wide budget of read-ahead buffers of blob bodies.
    read_budget: Arc<ReadBudget>,
}

/// The read budget of a store opened without one (tests).
const DEFAULT_READ_BUDGET: usize = 32 * 1024 * 1024;

impl BlobStore {
    /// Opens (creating) the store of `layout` and removes leftovers of
    /// fills interrupted by a crash. The index is loaded separately (see
    /// [`BlobStore::spawn_background`]). Fills run on `tasks`; what
    /// passthrough fills bring is marked in `private`.
    pub(crate) fn open(
        layout: &Layout,
        index: Arc<BlobIndex>,
        private: Arc<Private>,
        idle_timeout: Duration,
        tasks: TaskTracker,
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
            fills: Arc::new(FillTable::default()),
            next_tmp: AtomicU64::new(0),
            idle_timeout,
            evict: Arc::new(Notify::new()),
            write_fault: AtomicU64::new(u64::MAX),
            tasks,
            metrics: Arc::new(Metrics::new()),
            cluster: None,
            bucket: None,
            private,
            read_budget: ReadBudget::new(DEFAULT_READ_BUDGET),
        })
    }

    /// Looks in the shared store before going upstream, and uploads what
    /// was fetched upstream.
    pub fn with_bucket(mut self, bucket: Option<Arc<Bucket>>) -> BlobStore {
        self.bucket = bucket;
        self
    }

    /// Asks the owner of a missing blob first (a node in a cluster).
    pub fn with_cluster(mut self, cluster: Option<Arc<Cluster>>) -> BlobStore {
        self.cluster = cluster;
        self
    }

    /// Leases body read buffers from `budget` (a private budget of
    /// [`DEFAULT_READ_BUDGET`] until this is called).
    pub(crate) fn with_read_budget(mut self, budget: Arc<ReadBudget>) -> BlobStore {
        self.read_budget = budget;
        self
    }

    /// The budget body read buffers are leased from.
    pub(super) fn read_budget(&self) -> &Arc<ReadBudget> {
        &self.read_budget
    }

    /// Reports to `metrics` (a fresh, unexported set until this is called).
    pub(crate) fn with_metrics(mut self, metrics: Arc<Metrics>) -> BlobStore {
        self.metrics = metrics;
        self
    }

    /// Fills running now (including verified ones still being committed).
    #[cfg(feature = "test-hooks")]
    pub(crate) fn fills_in_flight(&self) -> usize {
        self.fills.len()
    }

    /// The index.
    pub(crate) fn index(&self) -> &Arc<BlobIndex> {
        &self.index
    }

    /// Starts the background work: loading the index from disk (where
    /// start-up indexing runs), the evictor (where eviction runs) and the
    /// access-time flusher. The last two stop when `stop` is cancelled.
    /// Must run inside a tokio runtime.
    pub(crate) fn spawn_background(&self, stop: &CancellationToken) {
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
        tokio::spawn(stop.clone().run_until_cancelled_owned(async move {
            loop {
                evict.notified().await;
                if !index.is_loaded() {
                    continue;
                }
                let i = index.clone();
                let _ = tokio::task::spawn_blocking(move || i.evict_if_needed()).await;
            }
        }));
        let index = self.index.clone();
        tokio::spawn(stop.clone().run_until_cancelled_owned(async move {
            let mut tick = tokio::time::interval(crate::cache::index::FLUSH_INTERVAL);
            tick.tick().await;
            loop {
                tick.tick().await;
                let i = index.clone();
                let _ = tokio::task::spawn_blocking(move || i.flush_atimes()).await;
            }
        }));
    }

    /// Test hook: make disk writes of fills fail (as on a full disk) past
    /// `after` bytes of a blob; `None` turns it off.
    #[cfg(feature = "test-hooks")]
    pub(crate) fn inject_write_failure(&self, after: Option<u64>) {
        self.write_fault
            .store(after.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Opens a stored blob, or `None` on a miss. Records the access.
    pub(super) fn lookup(&self, digest: &Digest) -> io::Result<Option<StoredBlob>> {
        match File::open(self.layout.blob(digest)) {
            Ok(file) => {
                let size = file.metadata()?.len();
                self.index.touch(digest, size);
                Ok(Some(StoredBlob { file, size }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.index.forget(digest);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// A new temporary file for a fill of `digest`.
    pub(super) fn create_tmp(&self, digest: &Digest) -> io::Result<TmpFile> {
        let path = self
            .layout
            .tmp_file(digest, self.next_tmp.fetch_add(1, Ordering::Relaxed));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(TmpFile {
            path,
            file: Arc::new(file),
        })
    }

    /// fsyncs the file, records it in the journal (and, when `private`,
    /// marks it private: `cache/private.rs`), moves it into the store
    /// atomically, then fsyncs the directory so the rename survives a crash.
    /// Once renamed, the blob is indexed in place of its `reservation`; an
    /// error means nothing was stored. A blob that is not private is public
    /// from then on.
    pub(super) async fn commit(
        &self,
        tmp_path: &Path,
        digest: &Digest,
        size: u64,
        reservation: u64,
        private: bool,
    ) -> io::Result<()> {
        let tmp_path = tmp_path.to_path_buf();
        let dest = self.layout.blob(digest);
        let index = self.index.clone();
        let marks = self.private.clone();
        let digest = digest.clone();
        tokio::task::spawn_blocking(move || {
            File::open(&tmp_path)?.sync_all()?;
            let dir = dest
                .parent()
                .ok_or_else(|| io::Error::other("store path has no parent"))?;
            std::fs::create_dir_all(dir)?;
            if private {
                marks.mark(&digest)?;
            }
            index.record(&digest, size)?;
            // Make room first, so committed bytes stay within the budget
            // (this fill's bytes are already counted as reserved).
            index.evict_if_needed();
            std::fs::rename(&tmp_path, &dest)?;
            index.committed(&digest, size, reservation);
            if !private {
                marks.clear(&digest);
            }
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
}
