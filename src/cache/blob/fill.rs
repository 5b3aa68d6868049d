//! Fills: one upstream download per digest, shared by every reader.
//!
//! The fill table holds the fills running now, by digest. Looking a blob up
//! in it ([`FillTable::lookup`]) returns a typed answer, as pingora-cache's
//! lock does: the blob is [`Lookup::Stored`] after all, the request
//! [`Lookup::Join`]s a running fill, or it [`Lookup::Lead`]s a new one and
//! gets the [`FillPermit`] the fill task must hold. Finishing the permit
//! publishes the result; dropping it unfinished (a panic, a runtime
//! shutting down) fails every reader and removes the table entry.
//!
//! The fill task ([`BlobStore::spawn_fill`]) asks its [`Sources`] for the
//! bytes (`source.rs`: the cluster owner, the shared store, upstream), pumps them into a
//! bounded channel to the blocking writer (`writer.rs`), going on from the
//! next source when one breaks off mid-body, verifies size and digest,
//! publishes `Verified`, then commits the file to the store (fsyncs,
//! journal record, rename) while still in the table, so a request arriving
//! meanwhile joins rather than misses.
//!
//! ## Whose failure is it
//!
//! A fill asks under its leader's *origin* (upstream host, repository,
//! and in passthrough the caller's credential): its sources (`source.rs`)
//! end with that upstream, and a peer or the store answers for it.
//! Whoever starts a fill must not decide what its joiners get: until a
//! source has answered with the blob, a joiner under another origin only
//! waits on the fill, and the answer decides per joiner.
//!
//! ```text
//!                      lookup(digest, origin O)
//!   no entry ─────────────────────────────────▶ Connecting(leader's origin L)
//!   (store checked)                                  │        ▲ joiners, any origin
//!                                                    │
//!          ┌──────────── a source's 200 ─────────────┤
//!          ▼                                         ▼ failed before streaming
//!      Streaming ─▶ Verified ─▶ leaves the table   Failed(e): for each reader R
//!          │            (stored)                     ├─ R's origin refused earlier
//!          └─ failed mid-body: every reader's          in this chain: R gets that
//!             body fails (the bytes are bad,           refusal (no new request)
//!             whoever asked)                         ├─ R's origin is L, or e is
//!                                                    │  not origin-specific (5xx,
//!                                                    │  timeout, a local error):
//!                                                    │  R gets e
//!                                                    └─ e is specific to L (404,
//!                                                       401, 403 under L's repo,
//!                                                       any upstream error of
//!                                                       another upstream host):
//!                                                       R looks up again, with
//!                                                       the failed fill as prior
//! ```
//!
//! Looking up again with a prior, the first such reader finds no entry and
//! leads the next fill under its own origin; the others join that one. The
//! next fill inherits the chain's *refusals* (each failed origin with its
//! error), so a reader whose own origin was refused earlier gets that
//! refusal instead of starting yet another request. So there is still one
//! upstream GET per digest for all the repositories that have it, however
//! many clients ask; a refusal costs one GET per refused origin. A reader
//! retries at most [`MAX_ROUNDS`] times.
//!
//! Once a source has answered 200 the bytes are the digest's bytes
//! whoever asked (they are verified against it): anyone joins, as anyone
//! hits a stored blob (see ARCHITECTURE.md, known limits).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};

use super::source::{Opened, Origin, Sources};
use super::spill::{Spill, SpillReceiver};
use super::store::BlobStore;
use super::writer::{Landed, NoReaders, Writer};
use crate::cache::OriginKey;
use crate::cache::index::{Admission, BlobIndex, Reservation};
use crate::error::{Error, ErrorKind, ErrorSource};
use crate::metrics::{CacheKind, FillResult, Outcome};
use crate::oci::{Digest, RepoName};
use crate::upstream::Upstream;
use crate::upstream::caller::Credential;

/// Upstream body chunks queued between the network task and the disk writer.
/// Bounds fill memory to this many frames (hyper's HTTP/1 client frames
/// grow with its adaptive read buffer, up to a few hundred KiB each).
const WRITE_QUEUE: usize = 8;

/// How often a fill waiting for admission to the disk looks again.
const ADMIT_POLL: Duration = Duration::from_millis(20);

/// Most fills one request waits on before giving up (each one after the
/// first follows an origin-specific failure of the previous one).
pub(super) const MAX_ROUNDS: usize = 8;

/// Where a fill is.
#[derive(Debug, Clone)]
pub(super) enum Phase {
    /// The upstream request is under way; or a source has answered
    /// (`total` is then set, if it gave a size) and the fill waits for room
    /// in the budget or for its temporary file.
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
pub(super) struct Progress {
    pub(super) phase: Phase,
    /// Size announced by upstream (`Content-Length`), if any, published as
    /// soon as it answers; set to the actual size on verification.
    pub(super) total: Option<u64>,
    /// Bytes written to the temporary file so far; readable with `pread`.
    pub(super) written: u64,
    /// Set when the disk failed (or was never used): bytes at and past this
    /// offset come through the spill queue instead of the file.
    pub(super) disk_end: Option<u64>,
}

/// One upstream download of one digest, shared by all its readers.
pub(super) struct Fill {
    /// Whom it asks.
    pub(super) origin: OriginKey,
    /// Origins refused earlier in this digest's chain of fills, with their
    /// errors (see the module docs).
    refused: Mutex<Vec<(OriginKey, Error)>>,
    /// The temporary file, set before `Streaming` is published (unless the
    /// fill runs without the disk). Readers use positional reads on this
    /// descriptor, which stays valid after the file is renamed or unlinked.
    pub(super) file: OnceLock<Arc<File>>,
    /// Progress, watched by every reader.
    pub(super) progress: watch::Sender<Progress>,
    /// Bytes past `disk_end`, once the disk is out of the picture: one
    /// bounded queue per reader (`spill.rs`).
    pub(super) spill: Arc<Spill>,
    /// Started by a prefetch rather than by a client's request.
    pub(super) prefetched: bool,
    /// A client has asked for the blob (led or joined the fill).
    pub(super) asked: AtomicBool,
    /// A prefetch that gave up before it streamed (upstream's size is more
    /// than the manifest said, and there is no room for the rest): not a
    /// failure of the blob, so whoever joined looks up again.
    dropped: AtomicBool,
    /// Stopped because no client read it any more and enough other fills
    /// already run for nobody ([`Audience`]).
    abandoned: AtomicBool,
    /// Led by a passthrough caller: its content is private
    /// (`cache/private.rs`) until a mirror-mode upstream confirms it.
    pub(super) private: bool,
    /// The passthrough caller's request the fill makes upstream, if any.
    own: Option<OwnFetch>,
}

/// A passthrough caller's upstream request for a blob: its credential, the
/// repository and the upstream asked. Another request with the same three
/// gets the same answer from upstream, so it may read the fill as its own
/// fetch (`Access::Own`), as when a prefetch started with the caller's
/// credential is joined by the caller's own request for the blob.
#[derive(Clone)]
pub(super) struct OwnFetch {
    upstream: Arc<Upstream>,
    repo: RepoName,
    credential: Credential,
}

impl OwnFetch {
    /// The request `origin` makes, when it carries a passthrough caller's
    /// credential.
    pub(super) fn of(origin: &Origin) -> Option<OwnFetch> {
        let credential = origin.caller.credential()?;
        Some(OwnFetch {
            upstream: origin.upstream.clone(),
            repo: origin.repo.clone(),
            credential: credential.clone(),
        })
    }

    fn same(&self, other: &OwnFetch) -> bool {
        Arc::ptr_eq(&self.upstream, &other.upstream)
            && self.repo == other.repo
            && self.credential.id() == other.credential.id()
    }
}

impl Fill {
    /// Whether the fill's upstream request is the one `own` would make.
    pub(super) fn fetches_for(&self, own: Option<&OwnFetch>) -> bool {
        match (&self.own, own) {
            (Some(a), Some(b)) => a.same(b),
            _ => false,
        }
    }

    fn new(
        asker: Asker,
        own: Option<OwnFetch>,
        origin: OriginKey,
        refused: Vec<(OriginKey, Error)>,
    ) -> Arc<Fill> {
        let (progress, _) = watch::channel(Progress {
            phase: Phase::Connecting,
            total: None,
            written: 0,
            disk_end: None,
        });
        Arc::new(Fill {
            origin,
            refused: Mutex::new(refused),
            file: OnceLock::new(),
            progress,
            spill: Arc::default(),
            prefetched: asker == Asker::Prefetch,
            asked: AtomicBool::new(asker == Asker::Client),
            dropped: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
            private: own.is_some(),
            own,
        })
    }

    /// Whether the blob was prefetched and no client has asked for it.
    pub(super) fn unread(&self) -> bool {
        self.prefetched && !self.asked.load(Ordering::Relaxed)
    }
}

/// Who looks a blob up in the fill table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Asker {
    /// A client's request, which reads what it finds.
    Client,
    /// A prefetch: starts a fill if nobody has the blob, reads nothing.
    Prefetch,
}

impl Fill {
    /// What the chain of fills up to this one learnt: the refusals it
    /// inherited, and its own failure when that was upstream's.
    fn refusals(&self) -> Vec<(OriginKey, Error)> {
        let mut all = self.refused.lock().map(|r| r.clone()).unwrap_or_default();
        if let Phase::Failed(e) = &self.progress.borrow().phase
            && e.esource() == ErrorSource::Upstream
        {
            all.push((self.origin.clone(), e.clone()));
        }
        all
    }

    /// Adds `more` refusals (of a chain a reader followed here).
    fn remember(&self, more: Vec<(OriginKey, Error)>) {
        if more.is_empty() {
            return;
        }
        if let Ok(mut refused) = self.refused.lock() {
            for (origin, e) in more {
                if !refused.iter().any(|(o, _)| *o == origin) {
                    refused.push((origin, e));
                }
            }
        }
    }

    /// What a reader under origin `me` makes of this fill failing with `e`
    /// before it streamed: the error to answer with, or `None` to look up
    /// again (the failure was specific to the fill's origin).
    pub(super) fn failure_for(&self, e: &Error, me: &OriginKey) -> Option<Error> {
        if self.dropped.load(Ordering::Relaxed) {
            return None;
        }
        let remembered = self
            .refused
            .lock()
            .ok()
            .and_then(|r| r.iter().find(|(o, _)| o == me).map(|(_, e)| e.clone()));
        if let Some(refusal) = remembered {
            return Some(refusal);
        }
        self.origin.failure_is_also_for(e, me).then(|| e.clone())
    }
}

/// A request's place at a fill: the fill, its subscriptions to the
/// progress and to the spill queue (both taken under the table's lock, the
/// spill one while the fill's progress was held, so it sees every spilled
/// chunk), and how the request is answered. A subscription to the progress
/// is what makes a reader count as one ([`Audience`]).
pub(super) struct FillReader {
    pub(super) fill: Arc<Fill>,
    pub(super) progress: watch::Receiver<Progress>,
    pub(super) spill: SpillReceiver,
    pub(super) outcome: Outcome,
}

impl FillReader {
    fn new(fill: Arc<Fill>, outcome: Outcome) -> FillReader {
        let spill = fill.spill.subscribe();
        let progress = fill.progress.subscribe();
        FillReader {
            fill,
            progress,
            spill,
            outcome,
        }
    }
}

/// The right, and the duty, to run a fill. [`FillPermit::finish`]
/// publishes the result; dropping the permit unfinished fails every reader
/// with "blob fill stopped". Either way the permit takes its fill out of the
/// table (only its own entry: a newer fill may have replaced it).
pub(super) struct FillPermit {
    fill: Arc<Fill>,
    /// The table and key of the fill.
    table: Arc<FillTable>,
    digest: Digest,
    done: bool,
}

impl FillPermit {
    /// The fill this permit runs.
    pub(super) fn fill(&self) -> &Fill {
        &self.fill
    }

    /// Publishes the fill's result and leaves the table.
    pub(super) fn finish(mut self, result: Result<Filled, Error>) {
        self.fill.progress.send_modify(|p| match result {
            Ok(filled) => {
                p.total = Some(filled.size());
                p.phase = Phase::Verified;
            }
            Err(e) => p.phase = Phase::Failed(e),
        });
        self.leave();
        self.done = true;
    }

    fn leave(&self) {
        self.table.remove(&self.digest, &self.fill);
    }
}

impl Drop for FillPermit {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.fill.progress.send_modify(|p| {
            if !matches!(p.phase, Phase::Verified | Phase::Failed(_)) {
                p.phase = Phase::Failed(Error::internal("blob fill stopped"));
            }
        });
        self.leave();
    }
}

/// Where a blob lookup under the fill lock ends up.
pub(super) enum Lookup {
    /// Stored after all (a fill finished just now): open it.
    Stored,
    /// A fill is running: read from it.
    Join(FillReader),
    /// Nobody has it: this request leads a new fill, which must be started
    /// with the permit.
    Lead(FillPermit, FillReader),
}

/// How a fill ended when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Filled {
    /// Verified and stored in the cache: its size.
    Stored(u64),
    /// Verified and served, but not cached (disk failing, over budget, a
    /// private fill, a failed commit): its size.
    Uncached(u64),
}

impl Filled {
    fn size(self) -> u64 {
        match self {
            Filled::Stored(n) | Filled::Uncached(n) => n,
        }
    }
}

/// The fills running now, by digest. Locked only on the miss path, never
/// across an await.
#[derive(Default)]
pub(super) struct FillTable {
    fills: Mutex<HashMap<Digest, Arc<Fill>>>,
}

impl FillTable {
    /// Fills in the table (including verified ones still being committed).
    #[cfg(feature = "test-hooks")]
    pub(super) fn len(&self) -> usize {
        self.fills.lock().map(|f| f.len()).unwrap_or(0)
    }

    /// Readers subscribed to the fills in the table.
    #[cfg(feature = "test-hooks")]
    pub(super) fn readers(&self) -> usize {
        self.fills
            .lock()
            .map(|f| f.values().map(|f| f.progress.receiver_count()).sum())
            .unwrap_or(0)
    }

    /// Finds a running fill for `digest` or makes one that asks `origin`.
    /// Asks `committed` (the index, in memory: no syscall under this lock)
    /// whether the blob is stored: a fill leaves the table only after its
    /// rename and indexing, so "no fill and not committed" means nobody has
    /// it (a blob stored before was found by the caller's own open).
    /// `prior` is the fill this request waited on before, when that one
    /// failed for its own origin only (its refusals carry over).
    ///
    /// A fill already streaming off a failed disk cannot be joined from the
    /// start of the blob: the request leads a new fill that takes its place
    /// in the table (the old one carries on for its readers), so requests
    /// arriving after it share that one rather than each asking upstream.
    /// A fill led here for a passthrough caller's request `own` is private
    /// (`Fill::private`).
    ///
    /// A prefetch that finds a fill running joins it (and reads nothing),
    /// even a spilling one.
    pub(super) fn lookup(
        self: &Arc<Self>,
        digest: &Digest,
        asker: Asker,
        origin: &OriginKey,
        prior: Option<&Arc<Fill>>,
        committed: impl FnOnce(&Digest) -> bool,
        own: Option<OwnFetch>,
    ) -> Result<Lookup, Error> {
        let mut refusals = prior.map(|p| p.refusals()).unwrap_or_default();
        let mut fills = self
            .fills
            .lock()
            .map_err(|_| Error::internal("fill table poisoned"))?;
        // A fill that just failed is still in the table for a moment: start
        // afresh rather than hand its error to a new request (keeping what
        // it learnt of origins that were refused).
        let failed = fills
            .get(digest)
            .is_some_and(|f| matches!(f.progress.borrow().phase, Phase::Failed(_)));
        if failed && let Some(f) = fills.remove(digest) {
            refusals.extend(f.refusals());
        }
        let mut spilling = false;
        if let Some(fill) = fills.get(digest) {
            if asker == Asker::Client {
                fill.asked.store(true, Ordering::Relaxed);
            }
            let progress = fill.progress.borrow();
            if asker == Asker::Prefetch
                || progress.disk_end.is_none()
                || matches!(progress.phase, Phase::Connecting)
            {
                // A verified fill still committing serves a complete,
                // verified file: for the client that is a hit.
                let outcome = if matches!(progress.phase, Phase::Verified) {
                    Outcome::Hit
                } else {
                    Outcome::Join
                };
                // Subscribed while the progress is held: the disk cannot
                // fail in between, so the reader sees every spilled chunk.
                let reader = FillReader::new(fill.clone(), outcome);
                drop(progress);
                fill.remember(refusals);
                return Ok(Lookup::Join(reader));
            }
            spilling = true;
        }
        if !spilling && committed(digest) {
            return Ok(Lookup::Stored);
        }
        let fill = Fill::new(asker, own, origin.clone(), refusals);
        let reader = FillReader::new(fill.clone(), Outcome::Miss);
        // Replaces a spilling fill's entry, if any.
        fills.insert(digest.clone(), fill.clone());
        let permit = FillPermit {
            fill,
            table: self.clone(),
            digest: digest.clone(),
            done: false,
        };
        Ok(Lookup::Lead(permit, reader))
    }

    /// What `HEAD` can learn from a running fill, once upstream has given
    /// the size (the fill may still wait for room in the budget): the size,
    /// how the request is answered, and whether the blob is private.
    pub(super) fn head(&self, digest: &Digest) -> Option<(u64, Outcome, bool)> {
        let fills = self.fills.lock().ok()?;
        let fill = fills.get(digest)?;
        let private = fill.private;
        let p = fill.progress.borrow();
        let outcome = match p.phase {
            Phase::Verified => Outcome::Hit,
            Phase::Connecting | Phase::Streaming => Outcome::Join,
            Phase::Failed(_) => return None,
        };
        Some((p.total?, outcome, private))
    }

    /// Takes `fill` out of the table to be stopped, if no reader is
    /// subscribed to it. Readers subscribe under the table's lock
    /// ([`FillReader::new`]), so once this returns true none can join: a
    /// request for the digest after it leads a new fill.
    fn abandon(&self, digest: &Digest, fill: &Fill) -> bool {
        let Ok(mut fills) = self.fills.lock() else {
            return false;
        };
        if fill.progress.receiver_count() > 0 {
            return false;
        }
        if fills
            .get(digest)
            .is_some_and(|f| std::ptr::eq(Arc::as_ptr(f), fill))
        {
            fills.remove(digest);
        }
        fill.abandoned.store(true, Ordering::Relaxed);
        true
    }

    /// Removes `fill`'s entry for `digest`, if it is still its own.
    fn remove(&self, digest: &Digest, fill: &Arc<Fill>) {
        if let Ok(mut fills) = self.fills.lock()
            && fills.get(digest).is_some_and(|f| Arc::ptr_eq(f, fill))
        {
            fills.remove(digest);
        }
    }
}

/// Whether a fill still has someone to fetch for, asked by its task before
/// it waits for room on the disk and at every chunk.
///
/// A fill whose readers have all left (a cancelled pull) goes on, so that
/// the retry finds the blob cached, as long as it holds one of the store's
/// `cache.max_detached_fills` permits, which it keeps until it ends (a
/// retry that joins and leaves again does not cost it its place; nor does
/// a prefetch that looks it up). Past that many, a fill nobody reads is
/// stopped at its next check, as is, whatever the permits, one nobody
/// reads that could not be cached anyway (off the disk). So a client that
/// asks for blob after blob and hangs up at once cannot make the mirror
/// download all of them at once (each stopped fill costs its upstream
/// connection, nothing is kept). Prefetches are bounded by
/// `prefetch.max_concurrent` instead and always go on.
pub(super) struct Audience<'a> {
    store: &'a BlobStore,
    fill: &'a Fill,
    digest: &'a Digest,
    detached: Option<OwnedSemaphorePermit>,
}

impl<'a> Audience<'a> {
    pub(super) fn new(store: &'a BlobStore, fill: &'a Fill, digest: &'a Digest) -> Audience<'a> {
        Audience {
            store,
            fill,
            digest,
            detached: None,
        }
    }

    /// `Ok` to go on; the error to stop the fill with (it has left the
    /// table) when nobody reads it and no permit to go on alone is free.
    pub(super) fn check(&mut self) -> Result<(), Error> {
        if self.fill.prefetched || self.fill.progress.receiver_count() > 0 {
            return Ok(());
        }
        // Off the disk (a failed disk, a blob not to be cached), nothing
        // would be kept: nobody gains from going on.
        let cacheable = self.fill.progress.borrow().disk_end.is_none();
        if cacheable {
            if self.detached.is_some() {
                return Ok(());
            }
            if let Ok(permit) = self.store.detached.clone().try_acquire_owned() {
                tracing::info!(digest = %self.digest,
                    "every client of a blob fill left: it goes on, to cache the blob");
                self.detached = Some(permit);
                return Ok(());
            }
        }
        if !self.store.fills.abandon(self.digest, self.fill) {
            // A reader joined just now.
            return Ok(());
        }
        let why = if cacheable {
            "cache.max_detached_fills fills already run for nobody"
        } else {
            "it is not being cached"
        };
        Err(Error::unavailable(format!(
            "every client of the fill of {} left, and {why}: stopped",
            self.digest
        )))
    }
}

/// Bytes a prefetch reserved in the index before its fill knew the size;
/// given back when dropped (the fill has reserved its own by then, or
/// failed).
pub(crate) struct PreReserved {
    index: Arc<BlobIndex>,
    bytes: u64,
}

impl PreReserved {
    /// Takes charge of `bytes` already reserved in `index`.
    pub(crate) fn new(index: Arc<BlobIndex>, bytes: u64) -> PreReserved {
        PreReserved { index, bytes }
    }

    /// Reserves `more` bytes as well, if there is room for them under the
    /// high watermark.
    fn grow(&mut self, more: u64) -> bool {
        let room = self.index.reserve_free_room(more);
        if room {
            self.bytes += more;
        }
        room
    }

    /// The reserved bytes, handed over to whoever releases them now.
    fn hand_over(mut self) -> u64 {
        std::mem::take(&mut self.bytes)
    }
}

impl Drop for PreReserved {
    fn drop(&mut self) {
        self.index.release(self.bytes);
    }
}

impl Origin {
    /// Whom this origin asks.
    pub(super) fn key(&self) -> OriginKey {
        OriginKey::new(&self.upstream, &self.repo, &self.caller)
    }
}

/// A fill's temporary file.
pub(super) struct TmpFile {
    pub(super) path: PathBuf,
    pub(super) file: Arc<File>,
}

/// A fill's temporary file, being created on the blocking pool while the
/// fill waits for upstream's answer: the hop to a blocking thread and the
/// create are then off the time to first byte (a blocking thread woken
/// while the machine is busy took 1.75 ms to run in a trace of a cold
/// fetch, all of it before the response head). A fill that turns out not
/// to need it (upstream failed, the blob is too large or has no room)
/// removes it; dropped unused, it is removed in the background.
struct EarlyTmp(Option<tokio::task::JoinHandle<io::Result<TmpFile>>>);

impl EarlyTmp {
    fn start(store: &Arc<BlobStore>, digest: &Digest) -> EarlyTmp {
        let (store, d) = (store.clone(), digest.clone());
        EarlyTmp(Some(tokio::task::spawn_blocking(move || {
            store.create_tmp(&d)
        })))
    }

    /// The file, once created.
    async fn take(mut self) -> Option<io::Result<TmpFile>> {
        let handle = self.0.take()?;
        Some(handle.await.unwrap_or_else(|e| {
            Err(io::Error::other(format!(
                "creating a temporary file panicked: {e}"
            )))
        }))
    }

    /// Removes the file, waiting for it to go.
    async fn remove(self) {
        if let Some(Ok(tmp)) = self.take().await {
            let _ = tokio::fs::remove_file(&tmp.path).await;
        }
    }
}

impl Drop for EarlyTmp {
    fn drop(&mut self) {
        let Some(handle) = self.0.take() else {
            return;
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Ok(Ok(tmp)) = handle.await {
                    let _ = tokio::fs::remove_file(&tmp.path).await;
                }
            });
        }
        // Without a runtime (shutting down) the file stays in `tmp/`,
        // which the next start empties.
    }
}

impl BlobStore {
    /// Runs the fill of `permit` in a task of its own.
    ///
    /// `slot` (a prefetch's place among its concurrent fills) is held until
    /// the fill ends.
    pub(super) fn spawn_fill(
        self: &Arc<Self>,
        permit: FillPermit,
        sources: Sources,
        digest: &Digest,
        prefetch: Option<(tokio::sync::OwnedSemaphorePermit, PreReserved)>,
    ) {
        let store = self.clone();
        let digest = digest.clone();
        self.tasks.spawn(async move {
            let (_slot, pre) = match prefetch {
                Some((slot, pre)) => (Some(slot), Some(pre)),
                None => (None, None),
            };
            let guard = store.metrics.fill_started();
            let result = store.run_fill(permit.fill(), &sources, &digest, pre).await;
            if let (true, Ok(Filled::Stored(size))) = (permit.fill().prefetched, &result) {
                store.metrics.prefetch_stored(*size);
            }
            let abandoned = permit.fill().abandoned.load(Ordering::Relaxed);
            guard.finish(match &result {
                Ok(Filled::Stored(size)) => FillResult::Stored(*size),
                Ok(Filled::Uncached(_)) => FillResult::Uncached,
                Err(_) if abandoned => FillResult::Abandoned,
                Err(_) => FillResult::Failed,
            });
            let repo = &sources.origin.repo;
            match &result {
                Err(e) if abandoned => {
                    tracing::info!(%digest, repo = %repo, reason = %e, "blob fill stopped")
                }
                Ok(Filled::Stored(size)) => {
                    tracing::info!(%digest, size, repo = %repo, "blob cached")
                }
                Ok(Filled::Uncached(size)) => {
                    tracing::info!(%digest, size, repo = %repo, "blob served without caching")
                }
                Err(e) => {
                    tracing::warn!(%digest, repo = %repo, error = %e.report(), "blob fill failed")
                }
            }
            permit.finish(result);
        });
    }

    /// The fill task: fetch, write and hash, verify, commit. On any error
    /// the temporary file is removed.
    async fn run_fill(
        self: &Arc<Self>,
        fill: &Fill,
        sources: &Sources,
        digest: &Digest,
        mut pre: Option<PreReserved>,
    ) -> Result<Filled, Error> {
        let mut audience = Audience::new(self, fill, digest);
        let early = EarlyTmp::start(self, digest);
        let opened = sources.open(digest, 0, 0).await?;
        audience.check()?;
        let total = opened.total;
        if let (Some(pre), Some(t)) = (&mut pre, total)
            && t > pre.bytes
            && !pre.grow(t - pre.bytes)
            && fill.unread()
        {
            // The manifest gave less than upstream sends, and the rest has
            // no room: a prefetch never makes room by evicting. Joiners, if
            // any came meanwhile, look up again (`failure_for`).
            fill.dropped.store(true, Ordering::Relaxed);
            return Err(Error::unavailable(format!(
                "upstream sends {t} bytes for {digest}, more than the manifest's {} and than \
                 there is room for under the high watermark: not prefetched",
                pre.bytes
            )));
        }
        // Upstream has answered: `HEAD` is answered from the fill from now
        // on, also while it waits for room or for its file (`head`).
        if total.is_some() {
            fill.progress.send_modify(|p| p.total = total);
        }
        // Admitted to the disk by its size, waiting (joinable) for fills
        // admitted before it to end if need be; a prefetch does not wait.
        let admission = match total {
            Some(t) if self.index.cacheable(t) => {
                // (A prefetch a client has joined waits for the client.)
                let patience = if pre.is_some() && fill.unread() {
                    Duration::ZERO
                } else {
                    self.idle_timeout
                };
                let admitted = self.admit(t, patience, &mut audience).await?;
                if admitted.is_none() && pre.is_some() && fill.unread() {
                    fill.dropped.store(true, Ordering::Relaxed);
                    return Err(Error::unavailable(format!(
                        "no room in the cache budget for {digest} ({t} bytes) next to the \
                         downloads in progress: not prefetched"
                    )));
                }
                admitted
            }
            _ => None,
        };
        let tmp = match (total, &admission) {
            (Some(t), None) if self.index.cacheable(t) => {
                tracing::warn!(%digest, size = t, wait = ?self.idle_timeout,
                    "no room in the cache budget next to the downloads in progress: \
                     streaming without caching");
                early.remove().await;
                None
            }
            _ => self.fill_file(digest, total, early).await?,
        };
        // Without a file (none could be created) the room is not needed.
        let admission = admission.filter(|_| tmp.is_some());
        // Counted against the budget as the bytes land (by the writer); a
        // prefetch's room, reserved up front, is handed over as the floor
        // (the bytes that land fill it before the reservation grows).
        let already = pre.map_or(0, PreReserved::hand_over);
        let reservation = Arc::new(Reservation::new(
            self.index.clone(),
            self.evict.clone(),
            already,
            admission,
        ));
        if let Some(t) = &tmp {
            let _ = fill.file.set(t.file.clone());
        }
        fill.progress.send_modify(|p| {
            p.phase = Phase::Streaming;
            p.total = total;
            if tmp.is_none() {
                p.disk_end = Some(0);
            }
        });
        let file = tmp.as_ref().map(|t| t.file.clone());
        let result = self
            .stream(sources, opened, file, &reservation, &mut audience)
            .await;
        let fetched_upstream = matches!(&result,
            Ok((_, used)) if used.last().is_some_and(|i| sources.is_upstream(*i)));
        let result = result.map(|(landed, _)| landed);
        if let (Ok(_), Some(own), Some(grants)) = (&result, &fill.own, &self.grants) {
            // Verified from upstream with a passthrough caller's credential:
            // upstream let it read the digest in the repository, so the
            // caller's requests are served from the cache without asking
            // again (`cache/grants.rs`). A prefetch's fill counts too.
            grants.allow(&own.upstream, &own.repo, &own.credential);
            grants.locate(&own.upstream, &own.repo, [digest]);
        }
        if let Ok(landed) = &result {
            // Verified: readers may finish now. Making the file durable and
            // moving it into the store (fsyncs, rename) need not hold up
            // their last byte; the fill stays in the table until then, so
            // new requests join it instead of missing.
            fill.progress.send_modify(|p| {
                p.total = Some(landed.size());
                p.phase = Phase::Verified;
            });
        }
        let filled = self.keep(result, tmp, fill, digest, reservation).await;
        if let Ok(Filled::Stored(size)) = filled {
            // The commit turned the reservation into a stored blob.
            self.evict.notify_one();
            // Whoever fetched it upstream shares it.
            if let Some(bucket) = sources.bucket().filter(|_| fetched_upstream) {
                bucket.upload_blob(digest, self.layout.blob(digest), size);
            }
        }
        filled
    }

    /// Admission to the disk for a blob of `size` bytes
    /// ([`BlobIndex::admit`]), waiting up to `patience` for room (unless
    /// the fill's `audience` leaves meanwhile: the error to stop with).
    async fn admit(
        &self,
        size: u64,
        patience: Duration,
        audience: &mut Audience<'_>,
    ) -> Result<Option<Admission>, Error> {
        if let Some(a) = self.index.admit(size) {
            return Ok(Some(a));
        }
        if patience.is_zero() {
            return Ok(None);
        }
        let deadline = tokio::time::Instant::now() + patience;
        let waiting = self.index.wait_for_admission();
        loop {
            if let Some(a) = waiting.admit(size) {
                return Ok(Some(a));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(ADMIT_POLL).await;
            audience.check()?;
        }
    }

    /// The temporary file a fill writes to, or `None` to stream without the
    /// disk (a blob over `cache.max_blob_size`, or no file could be
    /// created). Without a known size the disk is required: readers could
    /// not tell the last byte of a spilled stream.
    async fn fill_file(
        self: &Arc<Self>,
        digest: &Digest,
        total: Option<u64>,
        early: EarlyTmp,
    ) -> Result<Option<TmpFile>, Error> {
        if total.is_some_and(|t| !self.index.cacheable(t)) {
            tracing::info!(%digest, size = total, max = self.index.budget().max_blob,
                "blob larger than cache.max_blob_size: streaming without caching");
            early.remove().await;
            return Ok(None);
        }
        // Created on the blocking pool (a syscall that a slow disk can hold
        // up, not for a runtime worker), since the fill began.
        let created = early
            .take()
            .await
            .unwrap_or_else(|| Err(io::Error::other("no temporary file was started")));
        match created {
            Ok(t) => Ok(Some(t)),
            Err(e) if total.is_some() => {
                tracing::error!(%digest, error = %e, "cannot create a temporary file: streaming without caching");
                Ok(None)
            }
            Err(e) => Err(Error::local("cache storage error", e)),
        }
    }

    /// Commits a verified blob whose every byte reached its file; removes
    /// the temporary file otherwise.
    async fn keep(
        &self,
        result: Result<Landed, Error>,
        tmp: Option<TmpFile>,
        fill: &Fill,
        digest: &Digest,
        reservation: Arc<Reservation>,
    ) -> Result<Filled, Error> {
        match (result, tmp) {
            (Ok(Landed::OnDisk(size)), Some(tmp)) => {
                let unread = fill.unread();
                match self
                    .commit(&tmp, digest, size, reservation, unread, fill.private)
                    .await
                {
                    Ok(()) => {
                        if unread && fill.asked.load(Ordering::Relaxed) {
                            // A client joined while the commit ran.
                            self.index.asked(digest);
                        }
                        Ok(Filled::Stored(size))
                    }
                    Err(e) => {
                        let _ = tokio::fs::remove_file(&tmp.path).await;
                        tracing::error!(%digest, error = %e, "cannot commit blob to the store");
                        // The readers already have verified bytes; only
                        // caching failed.
                        Ok(Filled::Uncached(size))
                    }
                }
            }
            (result, tmp) => {
                if let Some(tmp) = tmp {
                    let _ = tokio::fs::remove_file(&tmp.path).await;
                }
                result.map(|landed| Filled::Uncached(landed.size()))
            }
        }
    }

    /// Pumps the sources' bodies to a blocking writer thread that writes,
    /// hashes and publishes progress (or spills to readers once the disk
    /// fails), then checks size and digest.
    /// The fill and its digest are `audience`'s.
    async fn stream(
        &self,
        sources: &Sources,
        opened: Opened,
        file: Option<Arc<File>>,
        reservation: &Arc<Reservation>,
        audience: &mut Audience<'_>,
    ) -> Result<(Landed, Vec<usize>), Error> {
        let (fill, digest) = (audience.fill, audience.digest);
        let total = opened.total;
        let (tx, rx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
        let writer = Writer {
            file,
            progress: fill.progress.clone(),
            spill: fill.spill.clone(),
            runtime: tokio::runtime::Handle::current(),
            fault: self.write_fault.load(Ordering::Relaxed),
            can_spill: total.is_some(),
            stall_limit: self.idle_timeout,
            reservation: reservation.clone(),
        };
        let algorithm = digest.algorithm();
        let (pumped, written) = tokio::join!(
            self.pump(sources, opened, tx, total, digest, audience),
            writer.run(rx, algorithm)
        );
        let written = written.map_err(|e| Error::internal(format!("blob writer panicked: {e}")))?;
        let used = pumped?;
        let written = written.map_err(|e| {
            // The readers left between the last check and this chunk (and
            // none joined since: then it is the plain failure it is to them).
            if !NoReaders::is(&e) {
                Error::local("cache storage error", e)
            } else if self.fills.abandon(digest, fill) {
                Error::unavailable(format!(
                    "every client of the fill of {digest} left, and it is not being cached: stopped"
                ))
            } else {
                Error::unavailable(format!("{digest}: {e}"))
            }
        })?;
        let size = written.landed.size();
        let from = || {
            used.iter()
                .map(|i| sources.describe(*i))
                .collect::<Vec<_>>()
                .join(" then ")
        };
        if let Some(t) = total
            && size != t
        {
            return Err(Error::upstream(
                ErrorKind::UpstreamProtocol,
                format!("{} sent {size} of {t} bytes for {digest}", from()),
            ));
        }
        if written.digest != *digest {
            self.metrics.digest_mismatch(CacheKind::Blob);
            sources.distrust(&used, digest).await;
            return Err(Error::upstream(
                ErrorKind::DigestMismatch,
                format!(
                    "digest mismatch: {} sent {} for {digest}",
                    from(),
                    written.digest
                ),
            ));
        }
        Ok((written.landed, used))
    }

    /// Moves the sources' chunks into the writer's queue (backpressure: at
    /// most [`WRITE_QUEUE`] chunks wait), each within the idle timeout.
    /// When a source that is not the last breaks off, the next one is asked
    /// for the rest and the pumping goes on. Returns the indexes of the
    /// sources that sent bytes, when the body ends or the writer stops (its
    /// error is reported by the caller).
    async fn pump(
        &self,
        sources: &Sources,
        mut opened: Opened,
        tx: mpsc::Sender<Bytes>,
        total: Option<u64>,
        digest: &Digest,
        audience: &mut Audience<'_>,
    ) -> Result<Vec<usize>, Error> {
        let mut received = 0u64;
        let mut used = vec![opened.index];
        loop {
            let e = match self
                .pump_one(&mut opened, &tx, &mut received, total, digest, audience)
                .await
            {
                Ok(()) => return Ok(used),
                Err(e) => e,
            };
            let broken = matches!(e.kind(), ErrorKind::BodyBroken);
            if !broken || !sources.can_continue_after(opened.index) {
                return Err(e);
            }
            tracing::warn!(%digest, source = %sources.describe(opened.index), at = received,
                error = %e.report(), "blob source broke off: going on from the next source");
            sources.broke(opened.index, &e.report());
            let next = sources.open(digest, received, opened.index + 1).await?;
            if let (Some(t), Some(n)) = (total, next.total)
                && t != n
            {
                return Err(Error::upstream(
                    ErrorKind::UpstreamProtocol,
                    format!(
                        "{} gives {digest} {n} bytes, {} gave {t}",
                        sources.describe(next.index),
                        sources.describe(opened.index)
                    ),
                ));
            }
            opened = next;
            used.push(opened.index);
        }
    }

    /// Pumps one source's body until it ends (`Ok`) or fails.
    async fn pump_one(
        &self,
        opened: &mut Opened,
        tx: &mpsc::Sender<Bytes>,
        received: &mut u64,
        total: Option<u64>,
        digest: &Digest,
        audience: &mut Audience<'_>,
    ) -> Result<(), Error> {
        loop {
            let data = match tokio::time::timeout(self.idle_timeout, opened.body.next()).await {
                Err(_) => {
                    return Err(Error::upstream(
                        ErrorKind::BodyBroken,
                        format!(
                            "source stalled for {:?} sending {digest}",
                            self.idle_timeout
                        ),
                    ));
                }
                Ok(None) => return Ok(()),
                Ok(Some(Err(e))) => return Err(e),
                Ok(Some(Ok(data))) => data,
            };
            *received += data.len() as u64;
            if total.is_some_and(|t| *received > t) {
                return Err(Error::upstream(
                    ErrorKind::UpstreamProtocol,
                    format!("source sent more than the announced length of {digest}"),
                ));
            }
            let max = self.index.budget().max_blob;
            if total.is_none() && *received > max {
                return Err(Error::unavailable(format!(
                    "{digest} has no Content-Length and grew past cache.max_blob_size \
                     ({max} bytes): not cached, not served"
                )));
            }
            // Every chunk: whether anyone still waits for the bytes.
            audience.check()?;
            if tx.send(data).await.is_err() {
                // The writer stopped: its error is reported by the caller.
                return Ok(());
            }
        }
    }
}
