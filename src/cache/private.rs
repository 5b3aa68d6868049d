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

use std::io;

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

/// The private digests of one cache directory.
pub(crate) struct Private {
    /// `<cache>/private.log`.
    log: LineLog,
    /// The private digests, each with whether its mark is in the log.
    set: DashMap<Digest, bool>,
}

impl Private {
    /// Reads `<cache>/private.log` and rewrites it with the marks of
    /// content still in the cache (blob or manifest file present).
    /// Blocking; run before the server listens. A log that cannot be read
    /// is an error: without its marks, private content would be public.
    pub(crate) fn open(layout: &Layout) -> io::Result<Private> {
        let log = LineLog::new(layout.private_log(), layout.tmp());
        let set = DashMap::new();
        log.read(|line| match PrivateRecord::parse(line) {
            Some(PrivateRecord::Private(d)) => {
                set.insert(d, true);
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
        Ok(Private { log, set })
    }

    /// Whether `digest` came only through passthrough upstreams.
    pub(crate) fn contains(&self, digest: &Digest) -> bool {
        self.set.contains_key(digest)
    }

    /// Marks `digest` private, durably (fsynced), before the content
    /// becomes visible in the cache. Blocking. Private in memory even when
    /// the record cannot be written (a full disk): the caller then keeps
    /// the content off the disk, but a verified manifest is still served
    /// from memory, and must not be to mirror-mode callers. The record is
    /// written again at the next mark of the digest.
    pub(crate) fn mark(&self, digest: &Digest) -> io::Result<()> {
        if self.set.get(digest).is_some_and(|logged| *logged) {
            return Ok(());
        }
        self.set.entry(digest.clone()).or_insert(false);
        let record = PrivateRecord::Private(digest.clone());
        self.log.append(&record.line(), true)?;
        // Still private (a `clear` meanwhile made it public): now logged.
        if let Some(mut logged) = self.set.get_mut(digest) {
            *logged = true;
        }
        Ok(())
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
        let p = Private::open(&layout).unwrap();
        assert!(!p.contains(&held));
        for d in [&held, &gone, &public] {
            p.mark(d).unwrap();
            assert!(p.contains(d));
        }
        p.clear(&public);
        assert!(!p.contains(&public));
        drop(p);
        let p = Private::open(&layout).unwrap();
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
        let p = Private::open(&layout).unwrap();
        p.log.cut_next_write_short(10);
        assert!(p.mark(&d).is_err());
        assert!(p.contains(&d), "private in memory all the same");
        p.mark(&d).unwrap();
        let b = layout.blob(&d);
        std::fs::create_dir_all(b.parent().unwrap()).unwrap();
        std::fs::write(&b, b"secret").unwrap();
        drop(p);
        let p = Private::open(&layout).unwrap();
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
            let p = Private::open(&layout).unwrap();
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
        let p = Private::open(&layout).unwrap();
        assert!(p.contains(&d));
        assert_eq!(std::fs::read_to_string(layout.private_log()).unwrap(), line);
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
