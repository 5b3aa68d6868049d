//! The store of verified blobs: opening it (emptying `tmp/` of an
//! interrupted run), looking a blob up, creating a fill's temporary file,
//! and committing a verified one (fsync, journal record, rename, directory
//! fsync). Also the background work that keeps it in budget: the start-up
//! index scan, the evictor and the access-time flusher.
//!
//! ## Group commit
//! Commits go through one thread ([`GroupCommit`]) that takes every blob
//! verified since its last round and commits them together: it starts the
//! write-back of all their files at once (`sync_file_range`), then
//! `fdatasync`s each (after the first, the file system's journal commit
//! has usually covered the rest), appends all their journal records in one
//! write, makes room once, renames each, then fsyncs each distinct
//! directory once. Fills that finish together (a pull of many layers,
//! prefetch) share the cost of the flushes instead of each paying two.
//! The crash guarantee is the same as one at a time: a blob's data is
//! durable before its rename, and its journal record is written before the
//! rename, so a file in `blobs/` is always complete and verified.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Notify, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::fill::{FillTable, TmpFile};
use crate::bucket::Bucket;
use crate::cache::grants::Grants;
use crate::cache::index::{BlobIndex, Recorded, Reservation};
use crate::cache::layout::Layout;
use crate::cache::private::Private;
use crate::cluster::Cluster;
use crate::error::Error;
use crate::front::ReadBudget;
use crate::metrics::Metrics;
use crate::oci::Digest;

/// A blob in the store, opened: complete and verified.
pub(super) struct StoredBlob {
    pub(super) file: Arc<File>,
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
    /// Test hook: milliseconds every open or create of a store file takes.
    disk_latency_ms: AtomicU64,
    /// Opens of stored blobs running on the blocking pool at once (see
    /// [`OPENS_AT_ONCE`]).
    opens: Arc<Semaphore>,
    /// The last [`HOT_FILES`] stored blobs opened, kept open: a hit on one
    /// of them needs no syscall, so it is answered without waiting.
    hot: Arc<HotFiles>,
    /// Fills in flight, fill results, digest mismatches.
    pub(super) metrics: Arc<Metrics>,
    /// Where fill tasks run, so shutdown can wait for them.
    pub(super) tasks: TaskTracker,
    /// The cluster this node is in: misses go to their owner first.
    pub(super) cluster: Option<Arc<Cluster>>,
    /// The shared store: looked in before upstream, uploaded to after.
    pub(super) bucket: Option<Arc<Bucket>>,
    /// The committing thread.
    committer: GroupCommit,
    /// Which digests came only through passthrough upstreams.
    pub(super) private: Arc<Private>,
    /// What upstream let passthrough callers read.
    pub(super) grants: Option<Arc<Grants>>,
    /// The process-wide budget of read-ahead buffers of blob bodies.
    read_budget: Arc<ReadBudget>,
    /// Permits of fills that go on with no client reading them
    /// (`cache.max_detached_fills`; see `fill::Audience`).
    pub(super) detached: Arc<Semaphore>,
}

/// Most opens of stored blobs on the blocking pool at once. Each open is a
/// short syscall, but a burst of hits (thousands of HTTP/2 streams asking
/// for one blob) would otherwise spawn a blocking thread each, up to the
/// pool's 512, and their stacks and allocator arenas stay resident; the
/// rest wait here for a slot.
const OPENS_AT_ONCE: usize = 16;

/// Stored blobs kept open for hits (see `BlobStore::open_stored`). A hit
/// that waits for the blocking pool keeps its whole request future alive
/// meanwhile: thousands of HTTP/2 streams asking for one cached blob held
/// 73 MiB resident instead of 46 MiB (tests/hostile_h2.rs) until the blob
/// they all ask for was served without a syscall.
const HOT_FILES: usize = 4;

/// Fills that go on with no client reading them, unless configured
/// (`cache.max_detached_fills`).
const DEFAULT_DETACHED_FILLS: usize = 16;

/// The stored blobs kept open ([`HOT_FILES`] of them, the last opened
/// first). Read without a lock (an `ArcSwap` of a short list).
#[derive(Default)]
struct HotFiles(ArcSwap<Vec<(Digest, Arc<File>, u64)>>);

impl HotFiles {
    /// The open file of `digest` and its size, if it is kept open.
    fn get(&self, digest: &Digest) -> Option<(Arc<File>, u64)> {
        let hot = self.0.load();
        let (_, file, size) = hot.iter().find(|(d, _, _)| d == digest)?;
        Some((file.clone(), *size))
    }

    /// Lets go of `digest`'s file.
    fn release(&self, digest: &Digest) {
        self.0.rcu(|hot| {
            hot.iter()
                .filter(|(d, _, _)| d != digest)
                .cloned()
                .collect::<Vec<_>>()
        });
    }

    /// Keeps `digest`'s file open, letting go of the least recent one.
    /// An eviction of `digest` racing with this (its index entry goes
    /// before its `release_gone`) is seen by one or the other check.
    fn keep(&self, index: &BlobIndex, digest: &Digest, file: &Arc<File>, size: u64) {
        self.0.rcu(|hot| {
            let mut next = Vec::with_capacity(HOT_FILES);
            next.push((digest.clone(), file.clone(), size));
            next.extend(
                hot.iter()
                    .filter(|(d, _, _)| d != digest)
                    .take(HOT_FILES - 1)
                    .cloned(),
            );
            next
        });
        if !index.contains(digest) {
            self.release_gone(index);
        }
    }

    /// Lets go of every blob the index no longer holds (evicted,
    /// forgotten). Called after each eviction, so an evicted blob's disk
    /// space is freed then, not whenever four other blobs were opened.
    fn release_gone(&self, index: &BlobIndex) {
        if self.0.load().iter().all(|(d, _, _)| index.contains(d)) {
            return;
        }
        self.0.rcu(|hot| {
            hot.iter()
                .filter(|(d, _, _)| index.contains(d))
                .cloned()
                .collect::<Vec<_>>()
        });
    }
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
        let hot = Arc::new(HotFiles::default());
        Ok(BlobStore {
            committer: GroupCommit::start(index.clone(), private.clone(), hot.clone())?,
            layout: layout.clone(),
            index,
            fills: Arc::new(FillTable::default()),
            next_tmp: AtomicU64::new(0),
            idle_timeout,
            evict: Arc::new(Notify::new()),
            write_fault: AtomicU64::new(u64::MAX),
            disk_latency_ms: AtomicU64::new(0),
            opens: Arc::new(Semaphore::new(OPENS_AT_ONCE)),
            hot,
            tasks,
            metrics: Arc::new(Metrics::new()),
            cluster: None,
            bucket: None,
            grants: None,
            private,
            read_budget: ReadBudget::new(DEFAULT_READ_BUDGET),
            detached: Arc::new(Semaphore::new(DEFAULT_DETACHED_FILLS)),
        })
    }

    /// Looks in the shared store before going upstream, and uploads what
    /// was fetched upstream.
    pub fn with_bucket(mut self, bucket: Option<Arc<Bucket>>) -> BlobStore {
        self.bucket = bucket;
        self
    }

    /// Where a passthrough caller's verified fill records that upstream let
    /// its credential read the digest in the repository.
    pub fn with_grants(mut self, grants: Arc<Grants>) -> BlobStore {
        self.grants = Some(grants);
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

    /// Lets at most `max` fills go on with no client reading them
    /// ([`DEFAULT_DETACHED_FILLS`] until this is called).
    pub(crate) fn with_max_detached_fills(mut self, max: usize) -> BlobStore {
        self.detached = Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS)));
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

    /// Requests reading the fills running now.
    #[cfg(feature = "test-hooks")]
    pub(crate) fn fill_readers(&self) -> usize {
        self.fills.readers()
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
        let hot = self.hot.clone();
        tokio::spawn(stop.clone().run_until_cancelled_owned(async move {
            loop {
                evict.notified().await;
                if !index.is_loaded() {
                    continue;
                }
                let i = index.clone();
                if tokio::task::spawn_blocking(move || i.evict_if_needed())
                    .await
                    .is_ok()
                {
                    // Also after evictions elsewhere (a fill making room):
                    // their files held open go too.
                    hot.release_gone(&index);
                }
            }
        }));
        let index = self.index.clone();
        tokio::spawn(stop.clone().run_until_cancelled_owned(async move {
            let mut tick = tokio::time::interval(crate::cache::index::FLUSH_INTERVAL);
            tick.tick().await;
            loop {
                tick.tick().await;
                let i = index.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    i.flush_atimes();
                    i.compact_journal_if_due();
                })
                .await;
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

    /// Test hook: every open or create of a store file takes `latency`.
    #[cfg(feature = "test-hooks")]
    pub(crate) fn inject_disk_latency(&self, latency: Option<Duration>) {
        let ms = latency.map_or(0, |l| l.as_millis() as u64);
        self.disk_latency_ms.store(ms, Ordering::Relaxed);
    }

    /// The injected disk latency (see `inject_disk_latency`), if any.
    fn slow_disk(&self) {
        let ms = self.disk_latency_ms.load(Ordering::Relaxed);
        if ms > 0 {
            std::thread::sleep(Duration::from_millis(ms));
        }
    }

    /// Opens a stored blob, or `None` on a miss, on a thread of the
    /// blocking pool (an open on a slow disk must not hold up a runtime
    /// worker). Once the index is loaded, a digest it does not know is a
    /// miss without a syscall.
    pub(super) async fn open_stored(
        self: &Arc<Self>,
        digest: &Digest,
    ) -> Result<Option<StoredBlob>, Error> {
        if self.index.is_loaded() && !self.index.contains(digest) {
            return Ok(None);
        }
        if let Some(blob) = self.hot_blob(digest) {
            return Ok(Some(blob));
        }
        let permit = self
            .opens
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::internal("blob opens closed"))?;
        let (store, d) = (self.clone(), digest.clone());
        let opened = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            store.lookup(&d)
        })
        .await
        .map_err(|e| Error::internal(format!("blob lookup panicked: {e}")))?
        .map_err(|e| Error::local("cache storage error", e))?;
        if let Some(blob) = &opened {
            self.hot.keep(&self.index, digest, &blob.file, blob.size);
        }
        Ok(opened)
    }

    /// Forgets the blobs whose files are gone (an operator's purge while
    /// running) and lets go of their files kept open. Blocking. Returns
    /// how many were forgotten.
    pub(crate) fn forget_missing(&self) -> usize {
        let gone = self.index.forget_missing();
        self.hot.release_gone(&self.index);
        gone
    }

    /// Drops a stored blob found damaged on disk by the scrubber: removes
    /// its file if that is still the one found damaged, `id` (device and
    /// inode), forgets it, and lets go of it if it is kept open. A file
    /// that cannot be removed is forgotten all the same: the blob is a miss,
    /// fetched (and served) again each time. Blocking.
    pub(super) fn drop_damaged(&self, digest: &Digest, id: (u64, u64)) {
        use std::os::unix::fs::MetadataExt as _;
        let path = self.layout.blob(digest);
        if std::fs::metadata(&path).is_ok_and(|m| (m.dev(), m.ino()) == id)
            && let Err(e) = std::fs::remove_file(&path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(%digest, error = %e, "cannot remove a damaged stored blob");
        }
        self.index.forget_file(digest, id);
        self.hot.release(digest);
    }

    /// A stored blob among the [`HOT_FILES`] kept open, if the index still
    /// holds it (an evicted or forgotten one is let go) and it still has
    /// its size (one `fstat`: a file truncated on disk is let go, and the
    /// lookup that follows drops it). Records the access. No lock.
    fn hot_blob(&self, digest: &Digest) -> Option<StoredBlob> {
        let (file, size) = self.hot.get(digest)?;
        if !self.index.contains(digest) {
            self.hot.release_gone(&self.index);
            return None;
        }
        if file.metadata().map(|m| m.len()).ok() != Some(size) {
            self.hot.release(digest);
            return None;
        }
        self.index.touch(digest, size);
        Some(StoredBlob { file, size })
    }

    /// Opens a stored blob, or `None` on a miss. Records the access.
    /// A file whose size is not the one indexed (it was verified at that
    /// size) was damaged on disk: it is dropped, and the lookup is a miss.
    /// Blocking.
    fn lookup(&self, digest: &Digest) -> io::Result<Option<StoredBlob>> {
        self.slow_disk();
        let path = self.layout.blob(digest);
        match File::open(&path) {
            Ok(file) => {
                let size = file.metadata()?.len();
                // Not indexed: the start-up scan has not reached it yet, and
                // only its journal record tells whether it is whole; without
                // one (the scan would hash it) it is a miss, the fill
                // replacing it.
                let indexed = match self.index.size(digest) {
                    Some(indexed) => indexed,
                    None => match self.index.recorded(digest) {
                        Recorded::Size(recorded) => recorded,
                        Recorded::Unknown => return Ok(None),
                    },
                };
                if indexed != size {
                    tracing::warn!(%digest, indexed, size,
                        "stored blob changed size on disk, dropping it");
                    self.metrics.damaged_blob();
                    match std::fs::remove_file(&path) {
                        Ok(()) => self.index.forget(digest),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => self.index.forget(digest),
                        // Still a miss: fetched (and served) again each
                        // time, never served from the damaged file.
                        Err(e) => {
                            tracing::warn!(%digest, error = %e,
                                "cannot remove a damaged stored blob");
                            self.index.forget_damaged(digest);
                        }
                    }
                    return Ok(None);
                }
                self.index.touch(digest, size);
                Ok(Some(StoredBlob {
                    file: Arc::new(file),
                    size,
                }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.index.forget(digest);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// A new temporary file for a fill of `digest`. Blocking.
    pub(super) fn create_tmp(&self, digest: &Digest) -> io::Result<TmpFile> {
        self.slow_disk();
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

    /// Commits the verified blob in `tmp`: its
    /// data made durable, recorded in the journal (and, when `private`,
    /// marked private: `cache/private.rs`), moved into the store
    /// atomically, the directory fsynced so the rename survives a crash; in
    /// a group with the other blobs verified meanwhile (see the module
    /// docs). Once renamed, the blob is indexed in place of its
    /// `reservation`; an error means nothing was stored. A blob that is not
    /// private is public from then on.
    pub(super) async fn commit(
        &self,
        tmp: &TmpFile,
        digest: &Digest,
        size: u64,
        reservation: Arc<Reservation>,
        unread: bool,
        private: bool,
    ) -> io::Result<()> {
        let (done, result) = oneshot::channel();
        let pending = Pending {
            tmp: tmp.path.clone(),
            file: tmp.file.clone(),
            dest: self.layout.blob(digest),
            digest: digest.clone(),
            size,
            reservation,
            unread,
            private,
            done,
        };
        self.committer
            .tx
            .send(pending)
            .map_err(|_| io::Error::other("the commit thread is gone"))?;
        result
            .await
            .map_err(|_| io::Error::other("the commit thread stopped"))?
    }
}

/// Most blobs committed in one round.
const MAX_GROUP: usize = 256;

/// A verified blob waiting for the group commit.
struct Pending {
    tmp: PathBuf,
    file: Arc<File>,
    dest: PathBuf,
    digest: Digest,
    size: u64,
    reservation: Arc<Reservation>,
    unread: bool,
    private: bool,
    done: oneshot::Sender<io::Result<()>>,
}

/// The thread that commits verified blobs in groups. It stops when the
/// store (the sender) is dropped, after the commits queued before.
struct GroupCommit {
    tx: mpsc::Sender<Pending>,
}

impl GroupCommit {
    fn start(
        index: Arc<BlobIndex>,
        marks: Arc<Private>,
        hot: Arc<HotFiles>,
    ) -> io::Result<GroupCommit> {
        let (tx, rx) = mpsc::channel::<Pending>();
        std::thread::Builder::new()
            .name("blob-commit".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut group = vec![first];
                    while group.len() < MAX_GROUP {
                        match rx.try_recv() {
                            Ok(p) => group.push(p),
                            Err(_) => break,
                        }
                    }
                    commit_group(&index, &marks, &hot, group);
                }
            })?;
        Ok(GroupCommit { tx })
    }
}

/// One round of the group commit. Each blob's result goes to its fill; a
/// blob that fails is left out (its fill removes the temporary file).
fn commit_group(index: &BlobIndex, marks: &Arc<Private>, hot: &HotFiles, group: Vec<Pending>) {
    // Start the write-back of every file before waiting for any: the
    // data goes to the disk together, and the file system commits the
    // allocations of all of them with the first fdatasync.
    for p in &group {
        start_writeback(&p.file);
    }
    let mut ready = Vec::with_capacity(group.len());
    // The private marks, relied on until the renames below are done (or
    // failed): a compaction meanwhile keeps them.
    let mut marked = Vec::new();
    for p in group {
        let durable = rustix::fs::fdatasync(&*p.file)
            .map_err(io::Error::from)
            .and_then(|()| match p.dest.parent() {
                Some(dir) => std::fs::create_dir_all(dir),
                None => Err(io::Error::other("store path has no parent")),
            })
            // Marked (fsynced) before its record and rename: private
            // content is never visible unmarked, not even after a crash.
            .and_then(|()| {
                if p.private {
                    marked.push(marks.mark(&p.digest)?);
                }
                Ok(())
            });
        match durable {
            Ok(()) => ready.push(p),
            Err(e) => {
                let _ = p.done.send(Err(e));
            }
        }
    }
    // Records before renames: a renamed blob always has its record (or
    // is verified by hashing at the next start if the record was lost).
    let records: Vec<_> = ready.iter().map(|p| (&p.digest, p.size)).collect();
    if let Err(e) = index.record_all(&records) {
        for p in ready {
            let _ = p.done.send(Err(io::Error::new(e.kind(), e.to_string())));
        }
        return;
    }
    // Make room first, so committed bytes stay within the budget (these
    // fills' bytes are already counted as reserved).
    if index.evict_if_needed().blobs > 0 {
        hot.release_gone(index);
    }
    let mut dirs = HashSet::new();
    let mut renamed = Vec::with_capacity(ready.len());
    for p in ready {
        match std::fs::rename(&p.tmp, &p.dest) {
            Ok(()) => {
                index.committed(&p.digest, p.size, p.reservation.take(), p.unread);
                if !p.private {
                    marks.clear(&p.digest);
                }
                if let Some(dir) = p.dest.parent() {
                    dirs.insert(dir.to_path_buf());
                }
                renamed.push(p);
            }
            Err(e) => {
                let _ = p.done.send(Err(e));
            }
        }
    }
    for dir in &dirs {
        if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
            // Stored and served; only durability across a power cut is in
            // doubt (the next start re-verifies via the journal).
            tracing::warn!(dir = %dir.display(), error = %e, "cannot fsync a blob directory");
        }
    }
    for p in renamed {
        let _ = p.done.send(Ok(()));
    }
}

/// Asks the kernel to start writing `file`'s dirty pages now, without
/// waiting (`sync_file_range(SYNC_FILE_RANGE_WRITE)`; rustix has no
/// wrapper for it). Only a head start for the fdatasync that follows, so a
/// failure is ignored.
fn start_writeback(file: &File) {
    // SAFETY: a plain syscall on a descriptor `file` keeps open; no memory
    // is passed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}
