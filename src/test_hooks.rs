//! White-box access for the integration tests, behind the `test-hooks`
//! feature (which `tests/*.rs` enable through the self dev-dependency in
//! Cargo.toml): the upstream client on its own, the on-disk layout, a
//! running server's blob store, and the cluster's rendezvous order.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cache::blob::BlobStore;
use crate::cache::layout::Layout;
use crate::oci::Digest;
pub use crate::upstream::{Upstream, UpstreamError};

/// Where the cache at `cache_dir` keeps the verified blob `digest`
/// (`sha256:…`).
pub fn blob_path(cache_dir: &Path, digest: &str) -> PathBuf {
    Layout::new(cache_dir).blob(&parse(digest))
}

/// The blob store of the cache at `cache_dir`.
pub fn blobs_dir(cache_dir: &Path) -> PathBuf {
    Layout::new(cache_dir).blobs()
}

/// Where the cache at `cache_dir` keeps the files of fills in progress
/// (and the readiness probe's file).
pub fn tmp_dir(cache_dir: &Path) -> PathBuf {
    Layout::new(cache_dir).tmp()
}

/// The rendezvous order of `nodes` (peer URLs as a cluster spells them,
/// `http://127.0.0.1:5000`) for blob or manifest `digest`, owner first.
pub fn rank_digest(nodes: &[String], digest: &str) -> Vec<String> {
    rank(nodes, &crate::cluster::digest_key(&parse(digest)))
}

/// The rendezvous order of `nodes` for `tag` of `repo` (as upstream names
/// it) on upstream `host`, owner first.
pub fn rank_tag(nodes: &[String], host: &str, repo: &str, tag: &str) -> Vec<String> {
    let tag = crate::oci::Tag::parse(tag).expect("a valid tag");
    rank(nodes, &crate::cluster::tag_key(host, repo, &tag))
}

fn rank(nodes: &[String], key: &[u8]) -> Vec<String> {
    crate::cluster::ring::rank(nodes, key, |s| s.as_str())
        .into_iter()
        .cloned()
        .collect()
}

/// Makes the start-up scan of the cache at `cache_dir` wait, once the
/// journal is read, until called again with `false`: the window where the
/// server serves blobs the scan has not reached.
pub fn hold_startup_scan(cache_dir: &Path, held: bool) {
    crate::cache::index::hold_scan(cache_dir, held);
}

/// The size of the future every request's handling starts as (allocated
/// and copied whole for each request, `server.rs`); 0 before the first
/// request of the process.
pub fn request_future_size() -> usize {
    REQUEST_FUTURE_SIZE.load(std::sync::atomic::Ordering::Relaxed)
}

static REQUEST_FUTURE_SIZE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Notes the size of a request's future (the same for every request: its
/// type's).
pub(crate) fn note_request_future<F>(future: &F) {
    let size = std::mem::size_of_val(future);
    REQUEST_FUTURE_SIZE.store(size, std::sync::atomic::Ordering::Relaxed);
}

/// Where the cache at `cache_dir` keeps the manifest `digest`.
pub fn manifest_path(cache_dir: &Path, digest: &str) -> PathBuf {
    Layout::new(cache_dir).manifest(&parse(digest))
}

fn parse(digest: &str) -> Digest {
    Digest::parse(digest).expect("a valid digest")
}

/// A running server's blob store and index.
#[derive(Clone)]
pub struct Hooks {
    blobs: Arc<BlobStore>,
}

impl Hooks {
    pub(crate) fn new(blobs: Arc<BlobStore>) -> Hooks {
        Hooks { blobs }
    }

    /// Fills running now (including verified ones still being committed).
    pub fn fills_in_flight(&self) -> usize {
        self.blobs.fills_in_flight()
    }

    /// Requests reading the fills running now.
    pub fn fill_readers(&self) -> usize {
        self.blobs.fill_readers()
    }

    /// Makes disk writes of fills fail (as on a full disk) past `after`
    /// bytes of a blob; `None` turns it off.
    pub fn inject_write_failure(&self, after: Option<u64>) {
        self.blobs.inject_write_failure(after);
    }

    /// Makes every open and create of a file in the blob store take this
    /// long (as on a slow or hung disk); `None` turns it off.
    pub fn inject_disk_latency(&self, latency: Option<std::time::Duration>) {
        self.blobs.inject_disk_latency(latency);
    }

    /// Whether the start-up scan of the blob store has finished.
    pub fn index_loaded(&self) -> bool {
        self.blobs.index().is_loaded()
    }

    /// Bytes of stored blobs, as indexed.
    pub fn used(&self) -> u64 {
        self.blobs.index().used()
    }

    /// Bytes reserved by fills in flight.
    pub fn reserved(&self) -> u64 {
        self.blobs.index().reserved()
    }

    /// Blobs evicted since start.
    pub fn evicted_blobs(&self) -> u64 {
        self.blobs.index().evicted().blobs
    }

    /// Whether the blob `digest` (`sha256:…`) is pinned.
    pub fn is_pinned(&self, digest: &str) -> bool {
        self.blobs.index().is_pinned(&parse(digest))
    }
}
