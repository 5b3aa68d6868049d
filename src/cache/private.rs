//! Private content: blobs and manifests that reached the cache only
//! through passthrough upstreams, and what a request may be served of the
//! cache ([`Access`]).
//!
//! The stores are shared by digest across every upstream and repository,
//! whatever the upstream's `auth` mode. A mirror-mode request (anyone who
//! reaches the mirror) must not be served from the cache what only a
//! passthrough caller's credential could fetch, so each such digest is
//! marked *private* and, for mirror-mode requests, held content that is
//! private is not there: the request asks upstream (with the mirror's own
//! credentials) whether the digest is in the repository it names, and an
//! upstream `200` makes the digest public (a mirror-mode fetch of it does
//! too).
//!
//! The marks must survive restarts and crashes, or a restart would turn
//! private content public: they are kept in `<cache>/private.log`
//! (`cache/layout.rs`), one `+<digest>` or `-<digest>` line each, a mark
//! appended and fsynced before the content it marks becomes visible (the
//! blob's rename, the manifest file's write), the log compacted at start-up
//! to the marks of content still on disk. All in memory as well: a sharded
//! map of the private digests (`dashmap`, as the blob index), read on each
//! cache hit of a mirror-mode request only, which also says whether each
//! mark is in the log: one whose append failed (a full disk) is appended
//! again the next time the digest is marked, before its content is stored.
//!
//! Content leaves (blobs evicted, manifest files pruned), so while running
//! the marks are compacted too, once they have doubled since the last time
//! ([`Private::compact_if_grown`]): a mark goes when its content is held
//! nowhere (`held`: files, and manifests in memory) and no one is storing
//! it. A [`Marked`] guard, kept from the mark until the content is visible,
//! is what says someone is; and a mark made again after the check (a new
//! fill of an evicted blob) is kept, as the check is redone against the
//! mark's generation under the map's lock.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;

use super::journal::LineLog;
use super::layout::{Layout, PrivateRecord};
use crate::oci::Digest;

/// What of the cache a request may be served, decided before the cache is
/// asked (`http/passthrough.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Anything held for the digest: upstream let this caller read it in
    /// this repository (or it is the mirror's own, internal request).
    Any,
    /// What is held and not private: a mirror-mode request.
    Public,
    /// Only what the request fetches from upstream itself, with its own
    /// credential: a passthrough caller not yet known to read the digest in
    /// this repository. Held content must be confirmed first.
    Own,
}

impl Access {
    /// Whether held content may be served: `private` says whether it came
    /// only through passthrough upstreams (asked only when it matters),
    /// `own` whether this very request fetched it from upstream.
    pub(crate) fn allows(self, private: impl FnOnce() -> bool, own: bool) -> bool {
        match self {
            Access::Any => true,
            Access::Public => own || !private(),
            Access::Own => own,
        }
    }
}

/// A private digest's mark.
#[derive(Debug, Clone, Copy)]
struct Mark {
    /// Whether the mark is in the log.
    logged: bool,
    /// [`Marked`] guards alive: content being stored under this mark.
    storing: u32,
    /// Bumped by every [`Private::mark`]: a compaction drops a mark only
    /// if none came after it looked.
    generation: u64,
}

/// The private digests of one cache directory.
pub(crate) struct Private {
    /// `<cache>/private.log`.
    log: LineLog,
    /// The private digests.
    set: DashMap<Digest, Mark>,
    /// Source of [`Mark::generation`].
    generations: AtomicU64,
    /// Marks left by the last compaction.
    compacted_to: AtomicUsize,
}

/// A mark being relied on: the content it marks is being stored (from the
/// mark until the blob's rename or the manifest file's write). While any
/// is alive, a compaction keeps the mark, though the content is not there
/// yet.
pub(crate) struct Marked {
    private: Arc<Private>,
    digest: Digest,
}

impl Drop for Marked {
    fn drop(&mut self) {
        if let Some(mut m) = self.private.set.get_mut(&self.digest) {
            m.storing = m.storing.saturating_sub(1);
        }
    }
}

impl Private {
    /// Reads `<cache>/private.log` and rewrites it with the marks of
    /// content still in the cache (blob or manifest file present).
    /// Blocking; run before the server listens. A log that cannot be read
    /// is an error: without its marks, private content would be public.
    pub(crate) fn open(layout: &Layout) -> io::Result<Private> {
        let log = LineLog::new(layout.private_log(), layout.tmp());
        let set = DashMap::new();
        let logged = Mark {
            logged: true,
            storing: 0,
            generation: 0,
        };
        log.read(|line| match PrivateRecord::parse(line) {
            Some(PrivateRecord::Private(d)) => {
                set.insert(d, logged);
            }
            Some(PrivateRecord::Public(d)) => {
                set.remove(&d);
            }
            None => {}
        })?;
        // A mark is dropped only when its content is known to be gone (a
        // file that cannot be looked at may still be there).
        let held = |p: std::path::PathBuf| p.try_exists().unwrap_or(true);
        set.retain(|d, _| held(layout.blob(d)) || held(layout.manifest(d)));
        let text: String = set
            .iter()
            .map(|d| PrivateRecord::Private(d.key().clone()).line())
            .collect();
        if let Err(e) = log.rewrite(&text) {
            // The log as it is holds every mark still (and more): keep it.
            tracing::warn!(error = %e, "cannot compact the private content log");
        }
        let compacted_to = AtomicUsize::new(set.len());
        Ok(Private {
            log,
            set,
            generations: AtomicU64::new(1),
            compacted_to,
        })
    }

    /// Compacts the marks ([`Private::compact`]) once they are more than
    /// twice (and 1024 more than) what the last compaction left. Blocking.
    /// `None` when not due, else how many marks were dropped.
    pub(crate) fn compact_if_grown(
        &self,
        held: impl Fn(&Digest) -> bool,
    ) -> io::Result<Option<usize>> {
        let last = self.compacted_to.load(Ordering::Relaxed);
        if self.set.len() <= last.saturating_mul(2).saturating_add(1024) {
            return Ok(None);
        }
        self.compact(held).map(Some)
    }

    /// Drops the marks of content `held` nowhere that no one is storing,
    /// and rewrites the log with the marks left. Blocking (`held` looks at
    /// files, and runs outside the map's locks). Returns how many were
    /// dropped.
    pub(crate) fn compact(&self, held: impl Fn(&Digest) -> bool) -> io::Result<usize> {
        let idle: Vec<(Digest, u64)> = self
            .set
            .iter()
            .filter(|m| m.storing == 0)
            .map(|m| (m.key().clone(), m.generation))
            .collect();
        let mut dropped = 0;
        for (digest, generation) in idle {
            if held(&digest) {
                continue;
            }
            // Still as it was when looked at: no mark since (which may have
            // stored the content by now), none storing.
            if self
                .set
                .remove_if(&digest, |_, m| m.storing == 0 && m.generation == generation)
                .is_some()
            {
                dropped += 1;
            }
        }
        let left = self.set.len();
        self.compacted_to.store(left, Ordering::Relaxed);
        if dropped > 0 {
            self.log.rewrite_with(|| {
                self.set
                    .iter()
                    .map(|m| PrivateRecord::Private(m.key().clone()).line())
                    .collect()
            })?;
            tracing::info!(
                dropped,
                left,
                "forgot the private marks of content no longer held"
            );
        }
        Ok(dropped)
    }

    /// Whether `digest` came only through passthrough upstreams.
    pub(crate) fn contains(&self, digest: &Digest) -> bool {
        self.set.contains_key(digest)
    }

    /// Marks `digest` private, durably (fsynced), before the content
    /// becomes visible in the cache; keep the guard until it is (see
    /// [`Marked`]). Blocking. Private in memory even when the record cannot
    /// be written (a full disk): the caller then keeps the content off the
    /// disk, but a verified manifest is still served from memory, and must
    /// not be to mirror-mode callers. The record is written again at the
    /// next mark of the digest.
    pub(crate) fn mark(self: &Arc<Self>, digest: &Digest) -> io::Result<Marked> {
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        let logged = {
            let mut m = self.set.entry(digest.clone()).or_insert(Mark {
                logged: false,
                storing: 0,
                generation,
            });
            m.storing += 1;
            m.generation = generation;
            m.logged
        };
        let marked = Marked {
            private: self.clone(),
            digest: digest.clone(),
        };
        if logged {
            return Ok(marked);
        }
        let record = PrivateRecord::Private(digest.clone());
        self.log.append(&record.line(), true)?;
        // Still private (a `clear` meanwhile made it public): now logged.
        if let Some(mut m) = self.set.get_mut(digest) {
            m.logged = true;
        }
        Ok(marked)
    }

    /// `digest` is public: a mirror-mode upstream confirmed or served it.
    /// One short append when it was private, not fsynced (a lost line only
    /// keeps the digest private), nothing otherwise: cheap enough for the
    /// async path, like a log line.
    pub(crate) fn clear(&self, digest: &Digest) {
        let removed = self.set.remove(digest).is_some();
        let record = PrivateRecord::Public(digest.clone());
        if removed && let Err(e) = self.log.append(&record.line(), false) {
            tracing::warn!(%digest, error = %e, "cannot record a digest as public");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_a_restart_and_compaction_keeps_held_content() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let held = Digest::of(crate::oci::Algorithm::Sha256, b"held");
        let gone = Digest::of(crate::oci::Algorithm::Sha256, b"gone");
        let public = Digest::of(crate::oci::Algorithm::Sha256, b"public");
        for d in [&held, &public] {
            let p = layout.blob(d);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        let p = Arc::new(Private::open(&layout).unwrap());
        assert!(!p.contains(&held));
        for d in [&held, &gone, &public] {
            p.mark(d).unwrap();
            assert!(p.contains(d));
        }
        p.clear(&public);
        assert!(!p.contains(&public));
        drop(p);
        let p = Arc::new(Private::open(&layout).unwrap());
        assert!(p.contains(&held));
        assert!(!p.contains(&public));
        // Not in the cache any more: forgotten, and compacted away.
        assert!(!p.contains(&gone));
        let log = std::fs::read_to_string(layout.private_log()).unwrap();
        assert_eq!(log, format!("+{held}\n"));
    }

    /// A mark whose record could not be written (a full disk) is written
    /// at the next mark: that one lets the content be stored, so its
    /// record must be in the log, or a restart makes the content public.
    #[test]
    fn a_mark_that_failed_to_reach_the_log_is_written_at_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let d = Digest::of(crate::oci::Algorithm::Sha256, b"secret");
        let p = Arc::new(Private::open(&layout).unwrap());
        p.log.cut_next_write_short(10);
        assert!(p.mark(&d).is_err());
        assert!(p.contains(&d), "private in memory all the same");
        p.mark(&d).unwrap();
        let b = layout.blob(&d);
        std::fs::create_dir_all(b.parent().unwrap()).unwrap();
        std::fs::write(&b, b"secret").unwrap();
        drop(p);
        let p = Arc::new(Private::open(&layout).unwrap());
        assert!(p.contains(&d), "private content public after a restart");
    }

    /// A damaged line (not UTF-8) in the middle of the log loses only
    /// itself: the marks after it are read and kept. They were dropped,
    /// and the compaction made it for good.
    #[test]
    fn marks_after_a_damaged_line_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let ds: Vec<Digest> = [b"one", b"two"]
            .iter()
            .map(|b| Digest::of(crate::oci::Algorithm::Sha256, *b))
            .collect();
        for d in &ds {
            let p = layout.blob(d);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        let mut log = PrivateRecord::Private(ds[0].clone()).line().into_bytes();
        log.extend_from_slice(b"+sha256:\xff\xfe\n");
        log.extend_from_slice(PrivateRecord::Private(ds[1].clone()).line().as_bytes());
        std::fs::write(layout.private_log(), &log).unwrap();
        for _ in 0..2 {
            let p = Arc::new(Private::open(&layout).unwrap());
            assert!(ds.iter().all(|d| p.contains(d)));
        }
    }

    /// A log that cannot be compacted at start-up (a full disk) is kept
    /// as it is: the cache still starts, with every mark.
    #[test]
    fn a_log_that_cannot_be_compacted_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let d = Digest::of(crate::oci::Algorithm::Sha256, b"held");
        let p = layout.blob(&d);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
        let line = PrivateRecord::Private(d.clone()).line();
        std::fs::write(layout.private_log(), &line).unwrap();
        // The rewrite's temporary file cannot be made.
        let _ = std::fs::remove_dir_all(layout.tmp());
        std::fs::write(layout.tmp(), b"not a directory").unwrap();
        let p = Arc::new(Private::open(&layout).unwrap());
        assert!(p.contains(&d));
        assert_eq!(std::fs::read_to_string(layout.private_log()).unwrap(), line);
    }

    fn digest(i: u32) -> Digest {
        Digest::of(crate::oci::Algorithm::Sha256, &i.to_be_bytes())
    }

    fn store(layout: &Layout, d: &Digest) {
        let p = layout.blob(d);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
    }

    /// While running, the marks of content gone (an evicted blob) are
    /// forgotten, in memory and in the log; those of content held, and of
    /// content being stored (a guard alive, the file not there yet), are
    /// kept. Before, marks were forgotten only at a restart.
    #[test]
    fn compaction_forgets_the_marks_of_content_gone() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let p = Arc::new(Private::open(&layout).unwrap());
        let (held, gone, storing) = (digest(1), digest(2), digest(3));
        store(&layout, &held);
        drop(p.mark(&held).unwrap());
        drop(p.mark(&gone).unwrap());
        let guard = p.mark(&storing).unwrap();
        assert_eq!(p.compact(|d| layout.blob(d).exists()).unwrap(), 1);
        assert!(p.contains(&held) && p.contains(&storing));
        assert!(!p.contains(&gone));
        let mut log = std::fs::read_to_string(layout.private_log()).unwrap();
        let mut want = [format!("+{held}\n"), format!("+{storing}\n")];
        want.sort();
        let mut lines: Vec<_> = log.split_inclusive('\n').map(str::to_owned).collect();
        lines.sort();
        assert_eq!(lines, want);
        // Stored: the guard goes once the file is there.
        store(&layout, &storing);
        drop(guard);
        assert_eq!(p.compact(|d| layout.blob(d).exists()).unwrap(), 0);
        // Evicted: its mark goes at the next compaction.
        std::fs::remove_file(layout.blob(&storing)).unwrap();
        assert_eq!(p.compact(|d| layout.blob(d).exists()).unwrap(), 1);
        assert!(!p.contains(&storing));
        log = std::fs::read_to_string(layout.private_log()).unwrap();
        assert_eq!(log, format!("+{held}\n"));
    }

    /// A mark made again after a compaction looked at it (a new fill of an
    /// evicted blob, whose content may be stored before the compaction
    /// removes anything) is not dropped by that compaction.
    #[test]
    fn a_mark_made_again_during_a_compaction_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let p = Arc::new(Private::open(&layout).unwrap());
        let d = digest(7);
        drop(p.mark(&d).unwrap());
        // `held` runs between the compaction's look and its removal: the
        // digest is marked and stored again right then.
        let dropped = p
            .compact(|x| {
                if x == &d {
                    let again = p.mark(&d).unwrap();
                    store(&layout, &d);
                    drop(again);
                }
                false
            })
            .unwrap();
        assert_eq!(dropped, 0);
        assert!(p.contains(&d), "private content left unmarked");
        drop(p);
        let p = Private::open(&layout).unwrap();
        assert!(p.contains(&d), "private content unmarked after a restart");
    }

    /// Marks made while compactions run are never lost from the log: each
    /// one whose content is stored is there after a restart.
    #[test]
    fn compactions_lose_no_concurrent_mark() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let p = Arc::new(Private::open(&layout).unwrap());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let compactor = {
            let (p, layout, stop) = (p.clone(), layout.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    p.compact(|d| layout.blob(d).exists()).unwrap();
                }
            })
        };
        for i in 0..300 {
            let d = digest(i);
            let marked = p.mark(&d).unwrap();
            if i % 2 == 0 {
                store(&layout, &d);
            }
            drop(marked);
        }
        stop.store(true, Ordering::Relaxed);
        compactor.join().unwrap();
        drop(p);
        let p = Private::open(&layout).unwrap();
        for i in (0..300).step_by(2) {
            assert!(p.contains(&digest(i)), "mark {i} lost");
        }
    }

    /// A compaction is due only once the marks have more than doubled.
    #[test]
    fn compaction_is_due_once_the_marks_have_doubled() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let p = Arc::new(Private::open(&layout).unwrap());
        for i in 0..1024 {
            drop(p.mark(&digest(i)).unwrap());
        }
        assert_eq!(p.compact_if_grown(|_| false).unwrap(), None);
        drop(p.mark(&digest(5000)).unwrap());
        assert_eq!(p.compact_if_grown(|_| false).unwrap(), Some(1025));
        assert_eq!(p.set.len(), 0);
    }

    #[test]
    fn what_each_access_is_served() {
        let (private, public) = (|| true, || false);
        for own in [true, false] {
            assert!(Access::Any.allows(private, own));
            assert!(Access::Public.allows(public, own));
        }
        assert!(!Access::Public.allows(private, false));
        assert!(Access::Public.allows(private, true));
        assert!(!Access::Own.allows(public, false));
        assert!(Access::Own.allows(private, true));
    }
}
