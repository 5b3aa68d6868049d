//! The blob index: what the store holds, how big it is, when each blob was
//! last used, and which blobs are pinned. It keeps the store inside its byte
//! budget by evicting least-recently-used blobs.
//!
//! * Entries live in a sharded concurrent map; a hit stores the current time
//!   in an atomic, so the hot path takes no global lock.
//! * Usage = committed bytes + the bytes fills in flight have written so
//!   far (a [`Reservation`] grows as bytes land on disk, never ahead of
//!   them: a fill that announced 6 GiB and received nothing evicts
//!   nothing). When usage passes the high watermark, one evictor
//!   (serialised by a mutex that only fills and commits touch) unlinks the
//!   oldest unpinned blobs until usage is under the low watermark. A reader
//!   with the file open keeps streaming after the unlink.
//! * Recency survives restarts without a write per hit: a flusher copies the
//!   access times that changed into the files' mtimes every
//!   [`FLUSH_INTERVAL`] (and at shutdown); start-up reads them back.
//! * Sizes survive restarts in an append-only journal (`index.log`, one
//!   `+<digest> <size>` line before each commit's rename, `-<digest>` on
//!   removal), compacted at start-up and, once it has grown to twice what
//!   it needs, while running (`journal.rs`). A file whose size disagrees with its
//!   record is dropped; a file with no record (cache written by hand or an
//!   older version) is verified by hashing before it is indexed.
//!
//! Why not moka here (moka does back the manifest and token caches): its
//! capacity is fixed when the cache is built, but the room for blobs shrinks
//! and grows with pinned blobs and fills in flight; it cannot exempt pinned
//! entries from eviction; its weigher is a `u32` (blobs pass 4 GiB); it has no
//! high/low watermarks; and its eviction listener runs after the entry has
//! left the map, racing a refill of the same digest for the file name.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use tokio::sync::Notify;

use super::journal::Journal;
use super::layout::{Layout, Record, Scanned};
use crate::oci::{Digest, Hasher};

/// How often changed access times are written to the files' mtimes.
pub(crate) const FLUSH_INTERVAL: Duration = Duration::from_secs(30);

/// The byte budget of the blob store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Budget {
    /// Hard limit for committed blobs plus fills in flight.
    pub(crate) max_size: u64,
    /// Eviction starts when usage passes this.
    pub(crate) high: u64,
    /// Eviction stops when usage is under this.
    pub(crate) low: u64,
    /// The largest blob cached (`cache.max_blob_size`, at most `max_size`).
    pub(crate) max_blob: u64,
}

impl Budget {
    /// A budget of `max_size` with watermarks given as fractions of it;
    /// blobs up to `max_size` are cached.
    pub(crate) fn new(max_size: u64, high: f64, low: f64) -> Budget {
        let frac = |f: f64| ((max_size as f64) * f.clamp(0.0, 1.0)) as u64;
        let high = frac(high).min(max_size);
        Budget {
            max_size,
            high,
            low: frac(low).min(high),
            max_blob: max_size,
        }
    }

    /// Caches blobs of at most `max_blob` bytes (never more than the
    /// budget).
    pub(crate) fn with_max_blob(mut self, max_blob: u64) -> Budget {
        self.max_blob = max_blob.min(self.max_size);
        self
    }
}

/// A fill's share of the budget: the bytes it has written to its temporary
/// file so far, counted in the usage as they land (so eviction makes room
/// for bytes that arrived, never for bytes merely announced), each chunk
/// just before its write, and only if it fits in the budget: fills in
/// flight never take the disk past `max_size`, however many there are.
/// Dropped unfinished (the fill failed, or its blob is not cached), its
/// bytes leave the usage; committed, they become the stored blob's
/// ([`BlobIndex::committed`]).
pub(crate) struct Reservation {
    index: Arc<BlobIndex>,
    /// Wakes the evictor when the usage passes the high watermark.
    evict: Arc<Notify>,
    /// Bytes counted so far.
    landed: AtomicU64,
    /// The fill's admission by size, while it uses the disk.
    admission: Mutex<Option<Admission>>,
}

impl Reservation {
    /// A reservation against `index` of `already` bytes (counted in its
    /// reserved bytes by the caller, e.g. a prefetch's room), holding the
    /// fill's `admission` ([`BlobIndex::admit`]) until it ends or leaves
    /// the disk.
    pub(crate) fn new(
        index: Arc<BlobIndex>,
        evict: Arc<Notify>,
        already: u64,
        admission: Option<Admission>,
    ) -> Reservation {
        Reservation {
            index,
            evict,
            landed: AtomicU64::new(already),
            admission: Mutex::new(admission),
        }
    }

    /// The fill goes on without the disk: its admission is given back (a
    /// new fill of the same blob, which later requests lead, needs it; the
    /// bytes already written stay counted until the fill ends).
    pub(crate) fn leave_disk(&self) {
        let admission = self.admission.lock().ok().and_then(|mut a| a.take());
        drop(admission);
    }

    /// Counts the fill's bytes up to `written` (past what is already
    /// counted), about to be written, if they fit under `max_size` next to
    /// what is stored and reserved, evicting at once if that can make room
    /// (blocking: call it from the fill's writer thread). Wakes the evictor
    /// past the high watermark. Returns false, counting nothing, when they
    /// do not fit: the rest of the blob cannot be cached. (A fill admitted
    /// by its size, [`BlobIndex::admit`], always fits, unless pinned blobs
    /// take the room.)
    pub(crate) fn try_grow_to(&self, written: u64) -> bool {
        let before = self.landed.load(Ordering::Relaxed);
        let Some(more) = written.checked_sub(before).filter(|&m| m > 0) else {
            return true;
        };
        if self.fit(more) {
            return true;
        }
        // Evicting helps only if the fills in flight, this chunk with them,
        // fit in the budget at all.
        if self.index.reserved().saturating_add(more) > self.index.budget.max_size {
            return false;
        }
        if self.index.evict_for(more).blobs > 0 {
            // The evictor task lets go of evicted files held open.
            self.evict.notify_one();
        }
        self.fit(more)
    }

    /// Counts `more` bytes if they fit under `max_size` now.
    fn fit(&self, more: u64) -> bool {
        let used = self.index.used();
        let fits = self
            .index
            .reserved
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                let after = r.checked_add(more)?;
                (used.saturating_add(after) <= self.index.budget.max_size).then_some(after)
            })
            .is_ok();
        if fits {
            self.landed.fetch_add(more, Ordering::Relaxed);
            if self.index.over_high() {
                self.evict.notify_one();
            }
        }
        fits
    }

    /// Takes the counted bytes out of the reservation (for the commit,
    /// which hands them to [`BlobIndex::committed`]).
    pub(crate) fn take(&self) -> u64 {
        self.landed.swap(0, Ordering::Relaxed)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.index.release(self.take());
    }
}

/// A fill's admission to the disk by its size ([`BlobIndex::admit`]),
/// given back when dropped (the fill ended).
pub(crate) struct Admission {
    index: Arc<BlobIndex>,
    size: u64,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let _ = self
            .index
            .admitted
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |a| {
                Some(a.saturating_sub(self.size))
            });
    }
}

/// A fill's place in the line for admission
/// ([`BlobIndex::wait_for_admission`]).
pub(crate) struct Waiting {
    index: Arc<BlobIndex>,
    ticket: u64,
}

impl Waiting {
    /// Admits the fill of `size` bytes if it is first in line and fits.
    pub(crate) fn admit(&self, size: u64) -> Option<Admission> {
        let first = self
            .index
            .waiting
            .lock()
            .ok()
            .is_some_and(|line| line.front() == Some(&self.ticket));
        if first {
            self.index.admit_now(size)
        } else {
            None
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Ok(mut line) = self.index.waiting.lock()
            && let Some(at) = line.iter().position(|t| *t == self.ticket)
        {
            line.remove(at);
            self.index.waiters.fetch_sub(1, Ordering::Release);
        }
    }
}

/// What the index knows of one stored blob.
#[derive(Debug)]
struct Meta {
    /// Size in bytes.
    size: u64,
    /// Last access, microseconds since the epoch.
    atime: AtomicU64,
    /// The access time last written to the file's mtime.
    flushed: AtomicU64,
    /// Stored by a prefetch and not asked for by any client since.
    unread: AtomicBool,
}

/// The journal's records, as the start-up scan goes.
enum Records {
    /// Not read yet.
    Pending,
    /// Read; the scan is running.
    Read(Arc<HashMap<Digest, u64>>),
    /// The scan has ended (or failed): the index holds what it found.
    Done,
}

/// How long a lookup waits for the journal to be read at start-up.
const RECORDS_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Cache directories whose start-up scan waits (test hook, see
/// [`hold_scan`]).
#[cfg(feature = "test-hooks")]
static SCANS_HELD: Mutex<Vec<std::path::PathBuf>> = Mutex::new(Vec::new());

/// Test hook (`test_hooks::hold_startup_scan`): makes the start-up scan of
/// the cache at `cache_dir` wait, once the journal is read, until called
/// again with `false`.
#[cfg(feature = "test-hooks")]
pub(crate) fn hold_scan(cache_dir: &Path, held: bool) {
    if let Ok(mut h) = SCANS_HELD.lock() {
        h.retain(|d| d != cache_dir);
        if held {
            h.push(cache_dir.to_path_buf());
        }
    }
}

/// Waits while the scan of `cache_dir` is held. Blocking (the scan runs
/// on a blocking thread).
#[cfg(feature = "test-hooks")]
fn wait_while_scan_held(cache_dir: &Path) {
    while SCANS_HELD
        .lock()
        .is_ok_and(|h| h.iter().any(|d| d == cache_dir))
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// What the journal says of a blob the index does not hold yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recorded {
    /// Verified at this size.
    Size(u64),
    /// No record (the scan hashes such a file), or no records (yet, or any
    /// more).
    Unknown,
}

/// Counters the index reports, for logs and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Evicted {
    /// Blobs removed.
    pub(crate) blobs: u64,
    /// Bytes freed.
    pub(crate) bytes: u64,
}

/// The blob index. Shared by the store, the fills and background tasks.
pub(crate) struct BlobIndex {
    /// Where the blobs are.
    layout: Layout,
    /// `index.log`.
    journal: Journal,
    /// Stored blobs.
    entries: DashMap<Digest, Meta>,
    /// Bytes of stored blobs.
    used: AtomicU64,
    /// Bytes fills in flight have written so far (their reservations).
    reserved: AtomicU64,
    /// The sizes of the fills admitted to the disk and still in flight
    /// ([`BlobIndex::admit`]).
    admitted: AtomicU64,
    /// Fills waiting for admission, oldest first (their tickets): only the
    /// oldest may be admitted, so a large blob is not passed over for ever
    /// by smaller ones. Locked once per fill that has to wait, never on a
    /// hit.
    waiting: Mutex<VecDeque<u64>>,
    /// How many fills wait (read without the lock by fills that need not).
    waiters: AtomicU64,
    /// The next waiting fill's ticket.
    next_ticket: AtomicU64,
    /// The budget.
    budget: Budget,
    /// Blobs of pinned images; never evicted.
    pinned: RwLock<HashSet<Digest>>,
    /// Set once the start-up scan has finished.
    loaded: AtomicBool,
    /// The journal's records while the start-up scan runs: a lookup of a
    /// blob the scan has not reached checks its file against them
    /// ([`BlobIndex::recorded`]).
    records: Mutex<Records>,
    /// Signalled when `records` leaves [`Records::Pending`].
    records_read: Condvar,
    /// Serialises evictions (not taken on the hit path).
    evicting: Mutex<()>,
    /// Totals evicted since start.
    evicted_blobs: AtomicU64,
    /// Bytes evicted since start.
    evicted_bytes: AtomicU64,
    /// Bytes of stored blobs that a prefetch brought in and no client has
    /// asked for yet.
    unread_bytes: AtomicU64,
    /// Bytes of prefetched blobs evicted before any client asked for them
    /// (prefetched for nothing), since start.
    evicted_unread_bytes: AtomicU64,
}

/// What became of prefetched blobs, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unread {
    /// Bytes prefetched, still stored, never asked for.
    pub(crate) stored: u64,
    /// Bytes prefetched and evicted unread, since start.
    pub(crate) evicted: u64,
}

/// Microseconds since the epoch, now: the unit of access times.
pub(crate) fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl BlobIndex {
    /// An empty index over the store of `layout`; call
    /// [`BlobIndex::load`] to fill it from disk.
    pub(crate) fn new(layout: &Layout, budget: Budget) -> BlobIndex {
        BlobIndex {
            layout: layout.clone(),
            journal: Journal::new(layout.journal(), layout.tmp()),
            entries: DashMap::new(),
            used: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            budget,
            pinned: RwLock::new(HashSet::new()),
            loaded: AtomicBool::new(false),
            records: Mutex::new(Records::Pending),
            records_read: Condvar::new(),
            evicting: Mutex::new(()),
            evicted_blobs: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            unread_bytes: AtomicU64::new(0),
            evicted_unread_bytes: AtomicU64::new(0),
            admitted: AtomicU64::new(0),
            waiting: Mutex::new(VecDeque::new()),
            waiters: AtomicU64::new(0),
            next_ticket: AtomicU64::new(0),
        }
    }

    /// The budget.
    pub(crate) fn budget(&self) -> Budget {
        self.budget
    }

    /// Bytes of stored blobs.
    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Bytes fills in flight have written so far (their reservations).
    pub(crate) fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Relaxed)
    }

    /// Whether the start-up scan has finished.
    pub(crate) fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Blobs and bytes evicted since start.
    pub(crate) fn evicted(&self) -> Evicted {
        Evicted {
            blobs: self.evicted_blobs.load(Ordering::Relaxed),
            bytes: self.evicted_bytes.load(Ordering::Relaxed),
        }
    }

    /// Prefetched bytes never asked for: still stored, and evicted.
    pub(crate) fn unread(&self) -> Unread {
        Unread {
            stored: self.unread_bytes.load(Ordering::Relaxed),
            evicted: self.evicted_unread_bytes.load(Ordering::Relaxed),
        }
    }

    /// Records a hit: the blob was just used. `size` is the file's size,
    /// used to index a blob the start-up scan has not reached yet.
    pub(crate) fn touch(&self, digest: &Digest, size: u64) {
        let now = now_micros();
        if let Some(m) = self.entries.get(digest) {
            m.atime.store(now, Ordering::Relaxed);
            Self::mark_read(&m, &self.unread_bytes);
            return;
        }
        self.insert(digest, size, now, 0);
    }

    /// A client asked for a blob that may have been prefetched: it no
    /// longer counts as unread.
    pub(crate) fn asked(&self, digest: &Digest) {
        if let Some(m) = self.entries.get(digest) {
            Self::mark_read(&m, &self.unread_bytes);
        }
    }

    fn mark_read(m: &Meta, unread_bytes: &AtomicU64) {
        // A load first: the hit path only reads a cache line it shares.
        if m.unread.load(Ordering::Relaxed) && m.unread.swap(false, Ordering::Relaxed) {
            unread_bytes.fetch_sub(m.size, Ordering::Relaxed);
        }
    }

    /// Adds an entry unless present; returns whether it was added.
    fn insert(&self, digest: &Digest, size: u64, atime: u64, flushed: u64) -> bool {
        use dashmap::mapref::entry::Entry;
        match self.entries.entry(digest.clone()) {
            Entry::Occupied(_) => false,
            Entry::Vacant(v) => {
                v.insert(Meta {
                    size,
                    atime: AtomicU64::new(atime),
                    flushed: AtomicU64::new(flushed),
                    unread: AtomicBool::new(false),
                });
                self.used.fetch_add(size, Ordering::Relaxed);
                true
            }
        }
    }

    /// Forgets a blob whose file turned out to be missing (purged by an
    /// operator command, or lost), unless it is there by now: a fill of
    /// the same digest may have committed since the file was found
    /// missing. Under the eviction lock, which the commit's indexing takes
    /// too (after its rename), so the two cannot interleave.
    pub(crate) fn forget(&self, digest: &Digest) {
        let Ok(_guard) = self.evicting.lock() else {
            return;
        };
        if self.layout.blob(digest).exists() {
            return;
        }
        self.remove_entry(digest);
    }

    /// Forgets a blob whose file does not have the size it was indexed at
    /// (damaged on disk) and cannot be removed, unless it has that size by
    /// now (a fill of the same digest committed since). Under the eviction
    /// lock, as [`BlobIndex::forget`]. The file's bytes stay on disk,
    /// outside the budget, until it can be removed.
    pub(crate) fn forget_damaged(&self, digest: &Digest) {
        let Ok(_guard) = self.evicting.lock() else {
            return;
        };
        let Some(size) = self.size(digest) else {
            return;
        };
        if std::fs::metadata(self.layout.blob(digest)).is_ok_and(|m| m.len() == size) {
            return;
        }
        self.remove_entry(digest);
    }

    /// Forgets a blob whose file no longer hashes to its digest (found by
    /// the scrubber), if the file at its path is still the one hashed,
    /// `file` (device and inode), or is gone: a fill of the same digest may
    /// have committed a new one since. Records the removal in the journal,
    /// so a damaged file that could not be removed is hashed again at the
    /// next start rather than trusted by its record. Under the eviction
    /// lock, as [`BlobIndex::forget`].
    pub(crate) fn forget_file(&self, digest: &Digest, file: (u64, u64)) {
        use std::os::unix::fs::MetadataExt as _;
        let Ok(_guard) = self.evicting.lock() else {
            return;
        };
        match std::fs::metadata(self.layout.blob(digest)) {
            Ok(m) if (m.dev(), m.ino()) != file => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(_) => return,
        }
        if self.entries.contains_key(digest) {
            let _ = self.journal.append(&Record::Removed(digest.clone()));
        }
        self.remove_entry(digest);
    }

    /// The stored blobs whose hex digest starts with `prefix` (two hex
    /// digits, as the store's directories), with their sizes: one of 256
    /// slices of the index, so a walk over all of them never holds more
    /// than a slice in memory.
    pub(crate) fn stored_under(&self, prefix: &str) -> Vec<(Digest, u64)> {
        self.entries
            .iter()
            .filter(|e| e.key().hex().starts_with(prefix))
            .map(|e| (e.key().clone(), e.size))
            .collect()
    }

    fn remove_entry(&self, digest: &Digest) {
        if let Some((_, m)) = self.entries.remove(digest) {
            self.used.fetch_sub(m.size, Ordering::Relaxed);
            Self::mark_read(&m, &self.unread_bytes);
        }
    }

    /// Admits a fill of a blob of `size` bytes to the disk if, with the
    /// fills admitted before it, it fits in `max_size` (what is stored can
    /// always be evicted for them): fills admitted this way never run out
    /// of room half way, however many there are at once. The admission
    /// lasts as long as the returned guard. Not while other fills wait for
    /// admission: then join them ([`BlobIndex::wait_for_admission`]).
    pub(crate) fn admit(self: &Arc<Self>, size: u64) -> Option<Admission> {
        if self.waiters.load(Ordering::Acquire) > 0 {
            return None;
        }
        self.admit_now(size)
    }

    /// A place in the line of fills waiting for admission; leaves the
    /// line when dropped.
    pub(crate) fn wait_for_admission(self: &Arc<Self>) -> Waiting {
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut line) = self.waiting.lock() {
            line.push_back(ticket);
            self.waiters.fetch_add(1, Ordering::Release);
        }
        Waiting {
            index: self.clone(),
            ticket,
        }
    }

    fn admit_now(self: &Arc<Self>, size: u64) -> Option<Admission> {
        self.admitted
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |a| {
                let after = a.checked_add(size)?;
                (after <= self.budget.max_size).then_some(after)
            })
            .ok()?;
        Some(Admission {
            index: self.clone(),
            size,
        })
    }

    /// Whether a blob of `size` bytes is cached at all: at most
    /// `cache.max_blob_size` (which is at most the budget).
    pub(crate) fn cacheable(&self, size: u64) -> bool {
        size <= self.budget.max_blob
    }

    /// Gives back counted bytes of a fill (failed or committed) or of a
    /// prefetch that did not start.
    pub(crate) fn release(&self, size: u64) {
        let _ = self
            .reserved
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                Some(r.saturating_sub(size))
            });
    }

    fn over_high(&self) -> bool {
        self.used() + self.reserved() > self.budget.high
    }

    /// Appends the records of blobs about to be committed, in one write.
    /// Called before their renames. Not fsynced: a record lost in a crash
    /// only means the next start hashes that file before indexing it.
    pub(crate) fn record_all(&self, blobs: &[(&Digest, u64)]) -> io::Result<()> {
        let records: Vec<Record> = blobs
            .iter()
            .map(|(d, size)| Record::Stored((*d).clone(), *size))
            .collect();
        self.journal.append_all(&records)
    }

    /// Indexes a blob just committed to the store in place of the `landed`
    /// bytes its fill counted (taken out of its [`Reservation`]). Done under
    /// the eviction lock, so an eviction never sees the blob counted twice
    /// (stored and reserved). `unread`: a prefetch stored it and no client
    /// has asked for it yet.
    pub(crate) fn committed(&self, digest: &Digest, size: u64, landed: u64, unread: bool) {
        let _guard = self.evicting.lock();
        self.release(landed);
        let now = now_micros();
        if self.insert(digest, size, now, now)
            && unread
            && let Some(m) = self.entries.get(digest)
        {
            m.unread.store(true, Ordering::Relaxed);
            self.unread_bytes.fetch_add(size, Ordering::Relaxed);
        }
    }

    /// Reserves `size` bytes if they fit under the high watermark next to
    /// what is stored and reserved: room a prefetch may take without making
    /// anything be evicted. Returns whether it reserved.
    pub(crate) fn reserve_free_room(&self, size: u64) -> bool {
        let used = self.used();
        self.reserved
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                let after = r.checked_add(size)?;
                (used.saturating_add(after) <= self.budget.high).then_some(after)
            })
            .is_ok()
    }

    /// Whether the index holds `digest` (stored and indexed).
    pub(crate) fn contains(&self, digest: &Digest) -> bool {
        self.entries.contains_key(digest)
    }

    /// Forgets every indexed blob whose file is gone (removed by an
    /// operator command while running). Blocking: one `stat` per blob.
    /// Returns how many were forgotten.
    pub(crate) fn forget_missing(&self) -> usize {
        let digests: Vec<Digest> = self.entries.iter().map(|e| e.key().clone()).collect();
        let mut gone = 0;
        for d in digests {
            if !self.layout.blob(&d).try_exists().unwrap_or(true) {
                self.forget(&d);
                gone += 1;
            }
        }
        gone
    }

    /// The size `digest` was indexed with, if indexed.
    pub(crate) fn size(&self, digest: &Digest) -> Option<u64> {
        self.entries.get(digest).map(|m| m.size)
    }

    /// Replaces the set of pinned blobs.
    pub(crate) fn set_pinned(&self, pinned: HashSet<Digest>) {
        if let Ok(mut p) = self.pinned.write() {
            *p = pinned;
        }
    }

    /// Whether `digest` is pinned.
    #[cfg(feature = "test-hooks")]
    pub(crate) fn is_pinned(&self, digest: &Digest) -> bool {
        self.pinned
            .read()
            .map(|p| p.contains(digest))
            .unwrap_or(false)
    }

    /// Evicts least-recently-used unpinned blobs until usage is under the
    /// low watermark, if it is over the high one. Blocking (unlinks files):
    /// run it on a blocking thread. Returns what was evicted.
    pub(crate) fn evict_if_needed(&self) -> Evicted {
        self.evict_for(0)
    }

    /// [`BlobIndex::evict_if_needed`] as if `extra` more bytes were
    /// reserved: room for a fill's next chunk.
    fn evict_for(&self, extra: u64) -> Evicted {
        let Ok(_guard) = self.evicting.lock() else {
            return Evicted::default();
        };
        if self.used() + self.reserved() + extra <= self.budget.high {
            return Evicted::default();
        }
        let pinned = self.pinned.read().map(|p| p.clone()).unwrap_or_default();
        let mut candidates: Vec<(u64, Digest)> = self
            .entries
            .iter()
            .filter(|e| !pinned.contains(e.key()))
            .map(|e| (e.value().atime.load(Ordering::Relaxed), e.key().clone()))
            .collect();
        candidates.sort_unstable();
        let mut done = Evicted::default();
        for (_, digest) in candidates {
            if self.used() + self.reserved() + extra <= self.budget.low {
                break;
            }
            let Some((_, meta)) = self.entries.remove(&digest) else {
                continue;
            };
            match std::fs::remove_file(self.layout.blob(&digest)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(%digest, error = %e, "cannot evict blob");
                    self.entries.insert(digest, meta);
                    continue;
                }
            }
            let _ = self.journal.append(&Record::Removed(digest.clone()));
            self.used.fetch_sub(meta.size, Ordering::Relaxed);
            if meta.unread.load(Ordering::Relaxed) {
                self.unread_bytes.fetch_sub(meta.size, Ordering::Relaxed);
                self.evicted_unread_bytes
                    .fetch_add(meta.size, Ordering::Relaxed);
            }
            done.blobs += 1;
            done.bytes += meta.size;
        }
        self.evicted_blobs.fetch_add(done.blobs, Ordering::Relaxed);
        self.evicted_bytes.fetch_add(done.bytes, Ordering::Relaxed);
        if done.blobs > 0 {
            tracing::info!(
                blobs = done.blobs,
                bytes = done.bytes,
                used = self.used(),
                reserved = self.reserved(),
                "evicted least recently used blobs"
            );
        }
        if self.used() + self.reserved() > self.budget.high {
            tracing::warn!(
                used = self.used(),
                reserved = self.reserved(),
                max = self.budget.max_size,
                "cache over its high watermark after eviction (pinned blobs or fills in flight)"
            );
        }
        done
    }

    /// Compacts the journal while running once it has grown to more than
    /// twice what it needs (no concurrent record is lost: see
    /// `journal.rs`). Blocking. Returns whether it did.
    pub(crate) fn compact_journal_if_due(&self) -> bool {
        if !self.is_loaded() {
            return false;
        }
        match self.journal.compact_if_due() {
            Ok(done) => done,
            Err(e) => {
                tracing::warn!(error = %e, "cannot compact the blob journal");
                false
            }
        }
    }

    /// Writes access times that changed since the last flush into the
    /// files' mtimes. Blocking.
    pub(crate) fn flush_atimes(&self) -> usize {
        let mut n = 0;
        for e in self.entries.iter() {
            let atime = e.atime.load(Ordering::Relaxed);
            if atime != e.flushed.load(Ordering::Relaxed) {
                let t = filetime::FileTime::from_unix_time(
                    (atime / 1_000_000) as i64,
                    ((atime % 1_000_000) * 1000) as u32,
                );
                if filetime::set_file_mtime(self.layout.blob(e.key()), t).is_ok() {
                    e.flushed.store(atime, Ordering::Relaxed);
                    n += 1;
                }
            }
        }
        n
    }

    /// Rebuilds the index from disk. Blocking; run it in the background
    /// while the server already serves (misses meanwhile are correct, just
    /// slower). Drops files that are not valid digests or whose size
    /// disagrees with the journal; verifies unrecorded files by hashing;
    /// compacts the journal. Returns the number of blobs indexed.
    pub(crate) fn load(&self) -> io::Result<usize> {
        /// Lookups stop waiting for the records however the load ends.
        struct Done<'a>(&'a BlobIndex);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.set_records(Records::Done);
            }
        }
        let _done = Done(self);
        // Records appended from now on (commits, evictions during the scan)
        // go into the compacted journal as well.
        self.journal.mark()?;
        let records = Arc::new(self.journal.read().unwrap_or_else(|e| {
            // Only slower: files without a record are hashed.
            tracing::warn!(error = %e, "cannot read the blob journal; hashing every blob");
            HashMap::new()
        }));
        self.set_records(Records::Read(records.clone()));
        #[cfg(feature = "test-hooks")]
        wait_while_scan_held(self.layout.dir());
        let mut kept = 0;
        self.layout.scan_blobs(|entry| match entry {
            Scanned::Stray(path, why) => drop_file(&path, why),
            Scanned::Blob(digest, file) => {
                if self.load_one(&records, digest, &file) {
                    kept += 1;
                }
            }
        });
        // What the scan kept, then whatever was appended meanwhile.
        let records: Vec<Record> = self
            .entries
            .iter()
            .map(|e| Record::Stored(e.key().clone(), e.size))
            .collect();
        // The index is complete either way; a journal that cannot be
        // compacted just stays longer.
        self.loaded.store(true, Ordering::Release);
        self.set_records(Records::Done);
        if let Err(e) = self.journal.compact_to(records.into_iter()) {
            tracing::warn!(error = %e, "cannot compact the blob journal");
        }
        Ok(kept)
    }

    fn set_records(&self, records: Records) {
        if let Ok(mut r) = self.records.lock() {
            *r = records;
        }
        self.records_read.notify_all();
    }

    /// What the journal says of `digest`, for a lookup of a blob the index
    /// does not hold: until the start-up scan has reached a file, only its
    /// record tells whether it is whole. Waits (blocking) for the journal
    /// to be read, up to [`RECORDS_WAIT`].
    pub(crate) fn recorded(&self, digest: &Digest) -> Recorded {
        let Ok(guard) = self.records.lock() else {
            return Recorded::Unknown;
        };
        let Ok((guard, _)) = self
            .records_read
            .wait_timeout_while(guard, RECORDS_WAIT, |r| matches!(r, Records::Pending))
        else {
            return Recorded::Unknown;
        };
        match &*guard {
            Records::Read(records) => records
                .get(digest)
                .map_or(Recorded::Unknown, |&size| Recorded::Size(size)),
            Records::Pending | Records::Done => Recorded::Unknown,
        }
    }

    /// Indexes one file found by the start-up scan, if its size agrees with
    /// its journal record or (unrecorded) it hashes to its name; drops it
    /// otherwise. Returns whether it was kept.
    fn load_one(
        &self,
        records: &HashMap<Digest, u64>,
        digest: Digest,
        file: &std::fs::DirEntry,
    ) -> bool {
        let path = file.path();
        let Ok(meta) = file.metadata() else {
            return false;
        };
        if !meta.is_file() {
            drop_file(&path, "not a regular file");
            return false;
        }
        let size = meta.len();
        // A file served before the scan reached it was indexed then
        // (`touch`): dropped, it is forgotten too.
        let reject = |why: &str| {
            drop_file(&path, why);
            self.forget(&digest);
            false
        };
        match records.get(&digest) {
            Some(&recorded) if recorded == size => {}
            Some(&recorded) => {
                tracing::warn!(%digest, size, recorded, "blob size does not match its record");
                return reject("size does not match its record");
            }
            None => {
                if !verify_file(&path, &digest) {
                    return reject("unrecorded and does not hash to its name");
                }
            }
        }
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        self.insert(&digest, size, mtime, mtime);
        true
    }
}

fn drop_file(path: &Path, why: &str) {
    tracing::warn!(path = %path.display(), reason = why, "dropping file from the blob store");
    let _ = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
}

/// Whether the file at `path` hashes to `digest`.
fn verify_file(path: &Path, digest: &Digest) -> bool {
    let Ok(mut f) = File::open(path) else {
        return false;
    };
    let mut h = Hasher::new(digest.algorithm());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match io::Read::read(&mut f, &mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(_) => return false,
        }
    }
    &h.finish() == digest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;

    fn digest(n: u8) -> Digest {
        Digest::of(Algorithm::Sha256, &[n])
    }

    fn store(index: &BlobIndex, n: u8, size: usize) -> Digest {
        let d = digest(n);
        let p = index.layout.blob(&d);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, vec![n; size]).unwrap();
        index.record_all(&[(&d, size as u64)]).unwrap();
        index.committed(&d, size as u64, 0, false);
        d
    }

    /// The scrubber forgets a damaged blob only if its path still holds
    /// the file it found damaged (or nothing): a file committed in its
    /// place since stays. A damaged file left on disk (it could not be
    /// removed) is not trusted by its journal record at the next start: it
    /// is hashed, and dropped.
    #[test]
    fn a_damaged_file_is_forgotten_only_while_it_is_the_one_found() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let index = BlobIndex::new(&layout, Budget::new(1 << 20, 0.9, 0.8));
        index.load().unwrap();
        let d = store(&index, 1, 300);
        let path = layout.blob(&d);
        let id = |p: &Path| {
            let m = std::fs::metadata(p).unwrap();
            (m.dev(), m.ino())
        };
        let found = id(&path);
        // Replaced by a new file (a fill committed since): kept.
        let fresh = dir.path().join("fresh");
        std::fs::write(&fresh, vec![1u8; 300]).unwrap();
        std::fs::rename(&fresh, &path).unwrap();
        index.forget_file(&d, found);
        assert!(index.contains(&d));
        // Still the file found damaged: forgotten, the file left in place.
        index.forget_file(&d, id(&path));
        assert!(!index.contains(&d));
        assert_eq!(index.used(), 0);
        assert!(path.exists());
        drop(index);
        let again = BlobIndex::new(&layout, Budget::new(1 << 20, 0.9, 0.8));
        assert_eq!(again.load().unwrap(), 0, "hashed at start, and dropped");
        assert!(!path.exists());
    }

    /// A lookup that found no file forgets the digest late, after a fill
    /// of it committed (renamed and indexed): the committed blob stays
    /// indexed and counted. Before, it was forgotten, and its bytes were on
    /// disk outside the budget until the next start.
    #[test]
    fn a_late_forget_keeps_a_blob_committed_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let index = BlobIndex::new(&Layout::new(dir.path()), Budget::new(1000, 0.9, 0.6));
        let d = store(&index, 1, 300);
        index.forget(&d);
        assert!(index.contains(&d));
        assert_eq!(index.used(), 300);
        // Gone for real: forgotten.
        std::fs::remove_file(index.layout.blob(&d)).unwrap();
        index.forget(&d);
        assert!(!index.contains(&d));
        assert_eq!(index.used(), 0);
    }

    #[test]
    fn budget_watermarks() {
        let b = Budget::new(1000, 0.9, 0.8);
        assert_eq!((b.max_size, b.high, b.low), (1000, 900, 800));
        let b = Budget::new(1000, 0.5, 0.9);
        assert_eq!((b.high, b.low), (500, 500));
    }

    #[test]
    fn evicts_least_recently_used_unpinned() {
        let dir = tempfile::tempdir().unwrap();
        let index = BlobIndex::new(&Layout::new(dir.path()), Budget::new(1000, 0.9, 0.6));
        let a = store(&index, 1, 300);
        let b = store(&index, 2, 300);
        let c = store(&index, 3, 300);
        // Make a the oldest, b the newest; pin c.
        index
            .entries
            .get(&a)
            .unwrap()
            .atime
            .store(10, Ordering::Relaxed);
        index
            .entries
            .get(&b)
            .unwrap()
            .atime
            .store(30, Ordering::Relaxed);
        index
            .entries
            .get(&c)
            .unwrap()
            .atime
            .store(5, Ordering::Relaxed);
        index.set_pinned([c.clone()].into_iter().collect());
        assert_eq!(index.evict_if_needed(), Evicted::default());
        let d = store(&index, 4, 300);
        index
            .entries
            .get(&d)
            .unwrap()
            .atime
            .store(40, Ordering::Relaxed);
        let e = index.evict_if_needed();
        assert_eq!(
            e,
            Evicted {
                blobs: 2,
                bytes: 600
            }
        );
        assert!(!index.layout.blob(&a).exists());
        assert!(!index.layout.blob(&b).exists());
        assert!(index.layout.blob(&c).exists());
        assert!(index.layout.blob(&d).exists());
        assert_eq!(index.used(), 600);
    }

    #[test]
    fn reload_drops_bad_files_and_keeps_recency() {
        let dir = tempfile::tempdir().unwrap();
        let index = BlobIndex::new(&Layout::new(dir.path()), Budget::new(1 << 20, 0.9, 0.8));
        let a = store(&index, 1, 100);
        let b = store(&index, 2, 100);
        index
            .entries
            .get(&a)
            .unwrap()
            .atime
            .store(1_000_000, Ordering::Relaxed);
        assert_eq!(index.flush_atimes(), 1);
        // A truncated file, a junk name, an unrecorded but valid file.
        std::fs::write(index.layout.blob(&b), b"short").unwrap();
        std::fs::write(
            index
                .layout
                .blobs()
                .join("sha256")
                .join(&a.hex()[..2])
                .join("junk"),
            b"x",
        )
        .unwrap();
        let data = b"unrecorded";
        let u = Digest::of(Algorithm::Sha256, data);
        let up = index.layout.blob(&u);
        std::fs::create_dir_all(up.parent().unwrap()).unwrap();
        std::fs::write(&up, data).unwrap();
        let bad = Digest::of(Algorithm::Sha256, b"other");
        let bp = index.layout.blob(&bad);
        std::fs::create_dir_all(bp.parent().unwrap()).unwrap();
        std::fs::write(&bp, b"not other").unwrap();

        let again = BlobIndex::new(&Layout::new(dir.path()), Budget::new(1 << 20, 0.9, 0.8));
        assert_eq!(again.load().unwrap(), 2);
        let atime_of = |d: &Digest| {
            again
                .entries
                .get(d)
                .map(|m| m.atime.load(Ordering::Relaxed))
        };
        assert_eq!(atime_of(&a), Some(1_000_000));
        assert!(atime_of(&u).is_some());
        assert!(atime_of(&b).is_none());
        assert!(!again.layout.blob(&b).exists());
        assert!(!bp.exists());
        assert_eq!(again.used(), 100 + data.len() as u64);
        // The journal was compacted to exactly the kept entries.
        let journal = std::fs::read_to_string(Layout::new(dir.path()).journal()).unwrap();
        assert_eq!(journal.lines().count(), 2);
    }

    /// A file served before the start-up scan reached it is indexed then;
    /// when the scan drops it, the index forgets it (else it would count
    /// in the budget, be journaled, and look stored with no file).
    #[test]
    fn a_file_dropped_by_the_scan_is_forgotten_even_if_served_before() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let bad = Digest::of(Algorithm::Sha256, b"other");
        let path = layout.blob(&bad);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"not other").unwrap();
        let index = BlobIndex::new(&layout, Budget::new(1 << 20, 0.9, 0.8));
        index.touch(&bad, 9);
        assert_eq!(index.load().unwrap(), 0);
        assert!(!path.exists());
        assert!(!index.contains(&bad));
        assert_eq!(index.used(), 0);
        let journal = std::fs::read_to_string(layout.journal()).unwrap_or_default();
        assert_eq!(journal.lines().count(), 0, "{journal}");
    }

    /// A journal that cannot be read (here a directory in its place): the
    /// load hashes every blob instead, and the index is loaded.
    #[test]
    fn an_unreadable_journal_only_makes_the_load_hash() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let index = BlobIndex::new(&layout, Budget::new(1 << 20, 0.9, 0.8));
        let d = Digest::of(Algorithm::Sha256, b"kept");
        let path = layout.blob(&d);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"kept").unwrap();
        std::fs::create_dir_all(layout.journal()).unwrap();
        assert_eq!(index.load().unwrap(), 1);
        assert!(index.is_loaded() && index.contains(&d));
    }
}
