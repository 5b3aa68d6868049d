//! The manifest cache.
//!
//! * By digest: immutable, so kept forever once fetched and verified. In
//!   memory (a size-weighted moka cache) in front of files on disk at
//!   `<cache>/manifests/<alg>/<hex>` (first line the media type, then the
//!   body).
//! * By tag: a tag maps to a digest, kept per (upstream host, repository,
//!   tag, accept class) in a moka cache whose entries expire after the
//!   upstream's tag TTL, and on disk at
//!   `<cache>/tags/<host>/<repo>/_tags/<tag>[@<class>]` (`_tags` cannot be a
//!   repository component, so tag files never collide with repositories).
//!   The accept class is the set of known manifest types the client accepts
//!   ([`AcceptClass`]): upstream is asked with exactly those, since a
//!   registry answers a tag according to them (a list to list-aware
//!   clients, its linux/amd64 manifest to schema-2-only ones, an OCI index
//!   only to clients that accept one). When the in-memory entry has expired the tag is
//!   revalidated with a `HEAD` upstream; the manifest is fetched again only
//!   if the digest changed. If upstream is out (unreachable, timing out,
//!   5xx or 429: [`Error::is_upstream_outage`]), the cached manifest is
//!   served stale; a refusal (4xx) or bad content (digest mismatch) is an
//!   error, never a reason to serve stale.
//!
//! Whether a manifest is served at all is the client's `Accept` again
//! ([`AcceptClass::serves`]): an OCI manifest by digest to a client that
//! does not accept OCI is `MANIFEST_UNKNOWN`, as a registry answers, never
//! a conversion. Manifests by digest are fetched with all four types
//! accepted (their bytes do not depend on it) and the class decides
//! locally, so the digest cache is shared by every class.
//!
//! Concurrent loads of one digest, and concurrent revalidations of one tag
//! in one class, are coalesced by moka into one upstream request.
//!
//! In a cluster, a client's miss (a digest not held here, a tag past its
//! TTL) goes to the key's owner first (`owner.rs`; a tag's owner is the
//! same for every accept class, and is asked with the class's `Accept`);
//! what it sends is verified and kept here, and a tag expires here when it
//! expires on the owner. A peer's request is never forwarded, nor is a
//! passthrough caller's (the owner could not ask upstream with its
//! credentials). When no owner answers, this node goes upstream itself,
//! stale serving included.
//!
//! With a shared store (`[store]`), the owner of a manifest by digest looks
//! there before upstream and uploads what it fetched upstream, with a
//! record of the tag (and class) it was fetched by. A tag not held here
//! whose record the store has is revalidated like a stale copy: `HEAD`
//! upstream, and the manifest from the store when the digest still
//! matches. Passthrough callers use no store (private content stays off
//! it).

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use moka::Expiry;

use super::layout::{self, Layout};
use super::owner;
use super::private::{Access, Private};
use super::{OriginKey, shared_load};
use crate::bucket::Bucket;
use crate::cluster::{self, Cluster, Hop};
use crate::error::{Asked, Error, ErrorKind, ErrorSource};
use crate::metrics::{CacheKind, Outcome};
use crate::oci::headers::DOCKER_CONTENT_DIGEST;
use crate::oci::manifest::{self, AcceptClass};
use crate::oci::{Algorithm, Digest, RepoName, Tag};
use crate::upstream::caller::Caller;
use crate::upstream::{Upstream, is_idle_timeout};

pub(crate) use crate::oci::manifest::MAX_MANIFEST;

/// In-memory budget for manifest bodies.
const MEMORY_BUDGET: u64 = 64 * 1024 * 1024;

/// Longest a stale tag is served before upstream is asked again.
const STALE_RETRY: Duration = Duration::from_secs(30);

/// A verified manifest.
#[derive(Debug)]
pub(crate) struct Manifest {
    /// Its digest (of `body`).
    pub(crate) digest: Digest,
    /// `Content-Type` to serve it with.
    pub(crate) media_type: String,
    /// The exact bytes upstream served.
    pub(crate) body: Bytes,
    /// Response headers, built once: `Content-Type`,
    /// `Docker-Content-Digest` and `ETag`.
    pub(crate) headers: HeaderMap,
    /// What it refers to, read from the body on first use (by prefetch).
    descriptors: OnceLock<manifest::Descriptors>,
    /// When prefetch last looked at it (see `cache::prefetch`; 0: never).
    pub(crate) prefetched_at: AtomicU64,
}

impl Manifest {
    /// What it costs in memory, for the cache's budget: the body, the media
    /// type (held twice, also in `headers`), and the rest (the digest, the
    /// header map, the cache's entry) as a fixed estimate, so that many
    /// tiny manifests cannot add up past the budget.
    fn weight(&self) -> u32 {
        const FIXED: usize = 512;
        let bytes = self.body.len() + 2 * self.media_type.len() + FIXED;
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }

    /// A manifest and its response headers.
    pub(crate) fn new(digest: Digest, media_type: String, body: Bytes) -> Manifest {
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&media_type) {
            headers.insert(header::CONTENT_TYPE, v);
        }
        if let Ok(v) = HeaderValue::from_str(&digest.to_string()) {
            headers.insert(DOCKER_CONTENT_DIGEST, v);
        }
        if let Ok(v) = HeaderValue::from_str(&format!("\"{digest}\"")) {
            headers.insert(header::ETAG, v);
        }
        Manifest {
            digest,
            media_type,
            body,
            headers,
            descriptors: OnceLock::new(),
            prefetched_at: AtomicU64::new(0),
        }
    }

    /// The blobs (of an image manifest) and child manifests (of an index)
    /// the body refers to.
    pub(crate) fn descriptors(&self) -> &manifest::Descriptors {
        self.descriptors
            .get_or_init(|| manifest::descriptors_of(&self.body))
    }
}

/// Key of a tag: upstream host, repository (as upstream names it), tag and
/// the accept class it was asked with. `host/repo:tag@class` (unambiguous:
/// hosts have no `/`, repositories and tags no `:` or `@`).
type TagKey = String;

/// A tag's current digest and how long it may be trusted.
#[derive(Debug, Clone)]
struct TagEntry {
    digest: Digest,
    fresh_for: Duration,
    outcome: Outcome,
    /// When it was (re)validated: `fresh_for` counts from here.
    checked: std::time::Instant,
}

impl TagEntry {
    fn new(digest: Digest, fresh_for: Duration, outcome: Outcome) -> TagEntry {
        TagEntry {
            digest,
            fresh_for,
            outcome,
            checked: std::time::Instant::now(),
        }
    }
}

/// Per-entry expiry: each tag entry carries its own freshness.
struct TagExpiry;

impl Expiry<TagKey, TagEntry> for TagExpiry {
    fn expire_after_create(
        &self,
        _key: &TagKey,
        value: &TagEntry,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.fresh_for)
    }
}

/// The manifest files on disk: how much they hold, and their bounds
/// (`cache.max_manifests`, `cache.max_manifest_bytes`).
///
/// What they hold is known from the pruner's last scan of the directory,
/// plus what was written since that scan began: a file written while the
/// scan ran may count twice until the next scan, which only makes that
/// scan come early. A write that takes either past its bound wakes the
/// pruner at once ([`ManifestStore::disk_over`]); it removes the least
/// recently written files down to nine tenths of both bounds, so the
/// scans come at most once per tenth of a bound written, not per write.
struct DiskUse {
    max_files: u64,
    max_bytes: u64,
    /// Files and bytes the last scan left.
    scanned_files: AtomicU64,
    scanned_bytes: AtomicU64,
    /// Files and bytes written since the last scan began.
    new_files: AtomicU64,
    new_bytes: AtomicU64,
    /// Files removed by the pruner since start.
    pruned: AtomicU64,
    /// Woken when a write takes the files past a bound.
    over: tokio::sync::Notify,
}

impl DiskUse {
    fn new(max_files: u64, max_bytes: u64) -> DiskUse {
        DiskUse {
            max_files,
            max_bytes,
            scanned_files: AtomicU64::new(0),
            scanned_bytes: AtomicU64::new(0),
            new_files: AtomicU64::new(0),
            new_bytes: AtomicU64::new(0),
            pruned: AtomicU64::new(0),
            over: tokio::sync::Notify::new(),
        }
    }

    /// Files and bytes on disk, as far as known.
    fn held(&self) -> (u64, u64) {
        let files =
            self.scanned_files.load(Ordering::Relaxed) + self.new_files.load(Ordering::Relaxed);
        let bytes =
            self.scanned_bytes.load(Ordering::Relaxed) + self.new_bytes.load(Ordering::Relaxed);
        (files, bytes)
    }

    fn is_over(&self) -> bool {
        let (files, bytes) = self.held();
        files > self.max_files || bytes > self.max_bytes
    }

    /// A file of `bytes` was written.
    fn wrote(&self, bytes: u64) {
        self.new_files.fetch_add(1, Ordering::Relaxed);
        self.new_bytes.fetch_add(bytes, Ordering::Relaxed);
        if self.is_over() {
            self.over.notify_one();
        }
    }
}

/// What the manifest files on disk hold, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ManifestDisk {
    pub(crate) files: u64,
    pub(crate) bytes: u64,
    /// Files removed by the pruner since start.
    pub(crate) pruned: u64,
}

/// The manifest cache. Share it in an `Arc`.
pub(crate) struct ManifestStore {
    /// Where manifest and tag files live.
    pub(super) layout: Layout,
    /// Manifests by digest, in memory.
    by_digest: moka::future::Cache<Digest, Arc<Manifest>>,
    /// Fresh tags.
    tags: moka::future::Cache<TagKey, TagEntry>,
    /// Fresh referrers answers (`referrers.rs`).
    pub(super) referrers: moka::future::Cache<String, super::referrers::RefEntry>,
    /// The cluster this node is in: misses go to their owner first.
    cluster: Option<Arc<Cluster>>,
    /// The shared store: manifests by digest are looked for there before
    /// upstream, and uploaded there after.
    bucket: Option<Arc<Bucket>>,
    /// Which digests came only through passthrough upstreams.
    private: Arc<Private>,
    /// The manifest files on disk and their bounds.
    disk: DiskUse,
}

impl ManifestStore {
    /// Opens (creating) the manifest and tag directories of `layout`; what
    /// passthrough upstreams bring is marked in `private`.
    pub(crate) fn open(layout: &Layout, private: Arc<Private>) -> io::Result<ManifestStore> {
        std::fs::create_dir_all(layout.manifests())?;
        std::fs::create_dir_all(layout.tags())?;
        let defaults = super::config::CacheConfig::default();
        Ok(ManifestStore {
            layout: layout.clone(),
            by_digest: moka::future::Cache::builder()
                .weigher(|_, m: &Arc<Manifest>| m.weight())
                .max_capacity(MEMORY_BUDGET)
                .build(),
            tags: moka::future::Cache::builder()
                .max_capacity(100_000)
                .expire_after(TagExpiry)
                .build(),
            referrers: super::referrers::new_cache(),
            cluster: None,
            bucket: None,
            private,
            disk: DiskUse::new(
                defaults.max_manifests as u64,
                defaults.max_manifest_bytes.as_u64(),
            ),
        })
    }

    /// Bounds the manifest files on disk to `max_files` and `max_bytes`
    /// ([`ManifestStore::prune`]).
    pub(crate) fn with_disk_limits(mut self, max_files: usize, max_bytes: u64) -> ManifestStore {
        self.disk = DiskUse::new(max_files as u64, max_bytes);
        self
    }

    /// Completes when a write has taken the manifest files past a bound
    /// (at once if one did since the last call): time to prune.
    pub(crate) async fn disk_over(&self) {
        self.disk.over.notified().await
    }

    /// Whether the manifest files are past a bound, as far as known.
    pub(crate) fn disk_is_over(&self) -> bool {
        self.disk.is_over()
    }

    /// What the manifest files on disk hold, as far as known.
    pub(crate) fn disk(&self) -> ManifestDisk {
        let (files, bytes) = self.disk.held();
        ManifestDisk {
            files,
            bytes,
            pruned: self.disk.pruned.load(Ordering::Relaxed),
        }
    }

    /// Looks in the shared store before going upstream, and uploads what
    /// was fetched upstream.
    pub(crate) fn with_bucket(mut self, bucket: Option<Arc<Bucket>>) -> ManifestStore {
        self.bucket = bucket;
        self
    }

    /// The shared store, for a request of `caller` (none in passthrough).
    fn bucket_for(&self, caller: &Caller) -> Option<&Arc<Bucket>> {
        self.bucket
            .as_ref()
            .filter(|_| caller.credential().is_none())
    }

    /// Asks the owner of a missing manifest or tag first (a node in a
    /// cluster).
    pub(crate) fn with_cluster(mut self, cluster: Option<Arc<Cluster>>) -> ManifestStore {
        self.cluster = cluster;
        self
    }

    /// The cluster to ask for a request: none for a peer's request, which
    /// is never forwarded, nor for a passthrough caller's.
    fn cluster_for(&self, hop: Hop, caller: &Caller) -> Option<&Arc<Cluster>> {
        self.cluster
            .as_ref()
            .filter(|_| !hop.is_peer() && caller.credential().is_none())
    }

    /// How much longer `tag` in `class` is trusted here without asking
    /// upstream (told to the peers that ask this node, its owner).
    pub(crate) async fn tag_fresh_for(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        tag: &Tag,
        class: AcceptClass,
    ) -> Option<Duration> {
        let key = tag_key(upstream, repo, tag, class.upstream());
        let entry = self.tags.get(&key).await?;
        Some(entry.fresh_for.saturating_sub(entry.checked.elapsed()))
    }

    /// After an operator's purge while running: drops from memory the
    /// manifests whose files are gone, and every tag and referrers answer
    /// (each is asked again, from its file or upstream).
    pub(crate) async fn forget_missing(&self) {
        let held: Vec<Digest> = self.by_digest.iter().map(|(d, _)| (*d).clone()).collect();
        for d in held {
            if !tokio::fs::try_exists(self.layout.manifest(&d))
                .await
                .unwrap_or(true)
            {
                self.by_digest.invalidate(&d).await;
            }
        }
        self.tags.invalidate_all();
        self.referrers.invalidate_all();
    }

    /// Compacts the private marks once they have grown
    /// ([`Private::compact_if_grown`]): a digest's content is held while its
    /// blob or manifest file is there (or cannot be looked at), or the
    /// manifest is in memory. Blocking. `None` when not due, else how many
    /// marks were dropped.
    pub(crate) fn compact_private_marks(&self) -> io::Result<Option<usize>> {
        let there = |p: PathBuf| p.try_exists().unwrap_or(true);
        self.private.compact_if_grown(|d| {
            self.by_digest.contains_key(d)
                || there(self.layout.manifest(d))
                || there(self.layout.blob(d))
        })
    }

    /// Scans the manifest files on disk and, when they are past a bound
    /// (`cache.max_manifests`, `cache.max_manifest_bytes`), removes the
    /// least recently written down to nine tenths of both. Blocking.
    /// Returns how many were removed.
    pub(crate) fn prune(&self) -> io::Result<usize> {
        let d = &self.disk;
        // Writes from here on count toward the next scan.
        d.new_files.store(0, Ordering::Relaxed);
        d.new_bytes.store(0, Ordering::Relaxed);
        let mut files = Vec::new();
        let mut bytes = 0u64;
        for alg in std::fs::read_dir(self.layout.manifests())?.flatten() {
            let Ok(rd) = std::fs::read_dir(alg.path()) else {
                continue;
            };
            for f in rd.flatten() {
                let Ok(meta) = f.metadata() else {
                    continue;
                };
                let mtime = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                bytes += meta.len();
                files.push((mtime, meta.len(), f.path()));
            }
        }
        let mut count = files.len() as u64;
        let mut removed = 0;
        if count > d.max_files || bytes > d.max_bytes {
            let keep_files = d.max_files - d.max_files / 10;
            let keep_bytes = d.max_bytes - d.max_bytes / 10;
            files.sort();
            for (_, len, path) in files {
                if count <= keep_files && bytes <= keep_bytes {
                    break;
                }
                if std::fs::remove_file(&path).is_ok() {
                    count -= 1;
                    bytes -= len;
                    removed += 1;
                }
            }
            tracing::info!(
                removed,
                files = count,
                bytes,
                max_files = d.max_files,
                max_bytes = d.max_bytes,
                "pruned least recently written manifests"
            );
        }
        d.scanned_files.store(count, Ordering::Relaxed);
        d.scanned_bytes.store(bytes, Ordering::Relaxed);
        d.pruned.fetch_add(removed as u64, Ordering::Relaxed);
        Ok(removed)
    }

    /// The manifest with `digest` for a client of `class`, from memory,
    /// disk or upstream (a body fetched from upstream must hash to
    /// `digest`); `MANIFEST_UNKNOWN` when `class` is not served its media
    /// type. `None` when it is held but `access` does not allow it
    /// (`cache/private.rs`): the caller must be confirmed upstream first.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn by_digest(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
        class: AcceptClass,
        caller: &Caller,
        hop: Hop,
        access: Access,
    ) -> Result<Option<(Arc<Manifest>, Outcome)>, Error> {
        let (m, outcome) = self
            .load_digest(upstream, repo, digest, caller, hop)
            .await?;
        // `Miss`: this request's own fetch, with its caller's credentials
        // (not one it waited for, nor one from memory or disk; a
        // passthrough caller's never comes from an owner or the store).
        if !access.allows(|| self.private.contains(digest), outcome == Outcome::Miss) {
            return Ok(None);
        }
        served(&m, class, false)?;
        Ok(Some((m, outcome)))
    }

    /// The manifest with `digest`, whatever its media type (from its owner
    /// in the cluster, or fetched with `caller`'s credentials, when not
    /// held).
    async fn load_digest(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
        caller: &Caller,
        hop: Hop,
    ) -> Result<(Arc<Manifest>, Outcome), Error> {
        if let Some(m) = self.by_digest.get(digest).await {
            return Ok((m, Outcome::Hit));
        }
        // Boxed: a miss's state (disk, owner, store, upstream) is many KiB,
        // and unboxed it would sit inline in every request's future, hits
        // included (see `routes::handle`).
        Box::pin(self.load_digest_missing(upstream, repo, digest, caller, hop)).await
    }

    /// [`Self::load_digest`] for a digest not in memory: from disk, its
    /// owner, the shared store or upstream (one load for concurrent
    /// callers).
    async fn load_digest_missing(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
        caller: &Caller,
        hop: Hop,
    ) -> Result<(Arc<Manifest>, Outcome), Error> {
        let me = OriginKey::new(upstream, repo, caller);
        let fetched = AtomicBool::new(false);
        let m = shared_load(&self.by_digest, digest, &me, || async {
            if let Some(m) = self.read_disk(digest).await.map_err(local_error)? {
                return Ok(Arc::new(m));
            }
            fetched.store(true, Ordering::Relaxed);
            let m = self
                .fetch_by_digest(upstream, repo, digest, caller, hop)
                .await?;
            if let Err(e) = self.write_disk(&m, caller).await {
                // Verified: serve it all the same (full disk, say).
                tracing::warn!(%digest, error = %e,
                    "cannot store manifest: serving it without caching");
            }
            Ok(Arc::new(m))
        })
        .await?;
        let outcome = if fetched.load(Ordering::Relaxed) {
            Outcome::Miss
        } else {
            Outcome::Hit
        };
        Ok((m, outcome))
    }

    /// The manifest by digest from its owner, else upstream.
    async fn fetch_by_digest(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
        caller: &Caller,
        hop: Hop,
    ) -> Result<Manifest, Error> {
        if let Some(c) = self.cluster_for(hop, caller) {
            let key = cluster::digest_key(digest);
            let asked = owner::Question {
                key: &key,
                reference: &digest.to_string(),
                expected: Some(digest),
                accept: AcceptClass::ALL,
            };
            if let Some(m) = owner::ask(c, upstream, repo, asked).await? {
                return Ok(m.manifest);
            }
        }
        if let Some(m) = self.in_bucket(caller, digest).await {
            return Ok(m);
        }
        let reference = digest.to_string();
        let m = fetch(
            upstream,
            caller,
            repo,
            &reference,
            Some(digest),
            AcceptClass::ALL,
        )
        .await?;
        self.share(caller, &m);
        Ok(m)
    }

    /// The manifest `tag` points at for a client of `class` (asked
    /// upstream, and cached, per class), revalidated upstream once the
    /// tag's TTL has passed; `MANIFEST_UNKNOWN` when `class` is not served
    /// its media type.
    pub(crate) async fn by_tag(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        tag: &Tag,
        class: AcceptClass,
        caller: &Caller,
        hop: Hop,
    ) -> Result<(Arc<Manifest>, Outcome), Error> {
        let (m, outcome) = self
            .load_tag(upstream, repo, tag, class.upstream(), caller, hop)
            .await?;
        served(&m, class, true)?;
        Ok((m, outcome))
    }

    /// The manifest `tag` points at as upstream answers `class` (asked with
    /// `caller`'s credentials).
    async fn load_tag(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        tag: &Tag,
        class: AcceptClass,
        caller: &Caller,
        hop: Hop,
    ) -> Result<(Arc<Manifest>, Outcome), Error> {
        let key = tag_key(upstream, repo, tag, class);
        // Fast path: a fresh tag, no loader future built.
        if let Some(entry) = self.tags.get(&key).await {
            let (m, _) = self
                .load_digest(upstream, repo, &entry.digest, caller, hop)
                .await?;
            let outcome = entry.outcome.again();
            return Ok((m, outcome));
        }
        // Boxed, as a digest's miss (`load_digest`).
        Box::pin(self.load_tag_missing(upstream, repo, tag, class, caller, hop, key)).await
    }

    /// [`Self::load_tag`] for a tag not fresh in memory (`key`): revalidated
    /// or fetched upstream (one load for concurrent callers).
    #[allow(clippy::too_many_arguments)]
    async fn load_tag_missing(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        tag: &Tag,
        class: AcceptClass,
        caller: &Caller,
        hop: Hop,
        key: TagKey,
    ) -> Result<(Arc<Manifest>, Outcome), Error> {
        let loaded = AtomicBool::new(false);
        let me = OriginKey::new(upstream, repo, caller);
        let entry = shared_load(&self.tags, &key, &me, || async {
            loaded.store(true, Ordering::Relaxed);
            let result = self
                .revalidate(upstream, caller, repo, tag, class, hop)
                .await;
            if let Err(e) = &result {
                self.forget_if_withdrawn(upstream, caller, repo, tag, class, e)
                    .await;
            }
            result
        })
        .await?;
        let (m, _) = self
            .load_digest(upstream, repo, &entry.digest, caller, hop)
            .await?;
        let outcome = if loaded.load(Ordering::Relaxed) {
            entry.outcome
        } else {
            entry.outcome.again()
        };
        Ok((m, outcome))
    }

    /// Forgets the tag file of `tag` in `class` when `e`, the answer to its
    /// revalidation, withdraws it ([`withdraws_tag`]): a later outage must
    /// not bring it back as stale (a deleted `.sig` tag, a withdrawn image).
    async fn forget_if_withdrawn(
        &self,
        upstream: &Upstream,
        caller: &Caller,
        repo: &RepoName,
        tag: &Tag,
        class: AcceptClass,
        e: &Error,
    ) {
        if !withdraws_tag(e, caller) {
            return;
        }
        let path = self.tag_path(upstream, repo, tag, class);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => tracing::info!(upstream = upstream.host(), %repo, %tag,
                reason = %e.report(), "tag withdrawn upstream: its stale copy is forgotten"),
            Err(r) if r.kind() == io::ErrorKind::NotFound => {}
            Err(r) => tracing::warn!(upstream = upstream.host(), %repo, %tag, error = %r,
                "cannot remove the file of a tag withdrawn upstream"),
        }
    }

    /// Asks the tag's owner (in a cluster), else upstream, what `tag`
    /// points at now for `class`, using the tag file on disk as the stale
    /// answer.
    async fn revalidate(
        &self,
        upstream: &Upstream,
        caller: &Caller,
        repo: &RepoName,
        tag: &Tag,
        class: AcceptClass,
        hop: Hop,
    ) -> Result<TagEntry, Error> {
        let ttl = upstream.tag_ttl();
        let stale = match self.read_tag(upstream, repo, tag, class).await {
            Some(d) if self.has(&d).await => Some(d),
            _ => None,
        };
        let what = format!("{repo}:{tag}");
        if let Some(c) = self.cluster_for(hop, caller)
            && let Some(entry) = self
                .ask_owner(c, upstream, repo, tag, class, stale.as_ref(), &what)
                .await?
        {
            return Ok(entry);
        }
        let Some(stale) = stale else {
            let m = match self.confirm_hint(upstream, caller, repo, tag, class).await {
                Some(m) => m,
                None => self.fetch_tag(upstream, caller, repo, tag, class).await?,
            };
            return Ok(self
                .adopt(upstream, caller, repo, tag, class, m, ttl, None)
                .await);
        };
        let serve_stale = |reason: String| {
            tracing::warn!(upstream = upstream.host(), manifest = %what, %reason,
                "upstream unavailable, serving stale manifest");
            Ok(TagEntry::new(
                stale.clone(),
                ttl.min(STALE_RETRY),
                Outcome::Stale,
            ))
        };
        match head(upstream, caller, repo, tag, class, &stale, &what).await? {
            Head::Unchanged => return Ok(TagEntry::new(stale, ttl, Outcome::Miss)),
            Head::Outage(reason) => return serve_stale(reason),
            Head::Moved(now) => {
                // Another node may have shared the new one.
                if let Some(now) = now
                    && let Some(m) = self.in_bucket(caller, &now).await
                {
                    return Ok(self
                        .adopt(upstream, caller, repo, tag, class, m, ttl, Some(&stale))
                        .await);
                }
            }
        }
        // Moved (or HEAD gave no digest): fetch the tag.
        match self.fetch_tag(upstream, caller, repo, tag, class).await {
            Ok(m) => Ok(self
                .adopt(upstream, caller, repo, tag, class, m, ttl, Some(&stale))
                .await),
            Err(e) if e.is_upstream_outage() => serve_stale(e.report()),
            Err(e) => Err(e),
        }
    }

    /// With a shared store and no copy here: what the store says `tag` in
    /// `class` pointed at, if upstream's `HEAD` confirms it and the store
    /// has the manifest. A hint only, always confirmed, so a stale or
    /// racing tag record in the store is harmless; it saves a `GET` (which
    /// Docker Hub counts against its rate limit, unlike `HEAD`).
    async fn confirm_hint(
        &self,
        upstream: &Upstream,
        caller: &Caller,
        repo: &RepoName,
        tag: &Tag,
        class: AcceptClass,
    ) -> Option<Manifest> {
        let bucket = self.bucket_for(caller)?;
        let upstream_repo = upstream.upstream_repo(repo.as_str());
        let record = format!("{tag}@{}", class.name());
        let hint = bucket.tag(upstream.host(), &upstream_repo, &record).await?;
        let what = format!("{repo}:{tag}");
        match head(upstream, caller, repo, tag, class, &hint, &what).await {
            Ok(Head::Unchanged) => self.in_bucket(caller, &hint).await,
            _ => None,
        }
    }

    /// `tag` in `class` from upstream (`GET`), shared with the store with
    /// its tag record.
    async fn fetch_tag(
        &self,
        upstream: &Upstream,
        caller: &Caller,
        repo: &RepoName,
        tag: &Tag,
        class: AcceptClass,
    ) -> Result<Manifest, Error> {
        let m = fetch(upstream, caller, repo, tag.as_str(), None, class).await?;
        self.share(caller, &m);
        if let Some(b) = self.bucket_for(caller) {
            let upstream_repo = upstream.upstream_repo(repo.as_str());
            let record = format!("{tag}@{}", class.name());
            b.upload_tag(upstream.host(), &upstream_repo, &record, &m.digest);
        }
        Ok(m)
    }

    /// Manifest `digest` from the shared store, verified; `None` when it is
    /// not there (or the store fails, or the object is damaged, or the
    /// caller is in passthrough).
    async fn in_bucket(&self, caller: &Caller, digest: &Digest) -> Option<Manifest> {
        let bucket = self.bucket_for(caller)?;
        let data = match bucket.manifest(digest).await {
            Ok(Some(d)) => d,
            Ok(None) => return None,
            Err(e) => {
                tracing::debug!(%digest, error = %e, "shared store: no manifest");
                return None;
            }
        };
        let (media_type, body) = layout::decode_manifest(data)?;
        if &Digest::of(digest.algorithm(), &body) != digest {
            tracing::warn!(%digest, store = bucket.name(), "manifest in the shared store does not match its digest");
            return None;
        }
        Some(Manifest::new(digest.clone(), media_type, body))
    }

    /// Uploads a manifest fetched upstream to the shared store.
    fn share(&self, caller: &Caller, m: &Manifest) {
        if let Some(b) = self.bucket_for(caller) {
            let data = layout::encode_manifest(&m.media_type, &m.body);
            b.upload_manifest(&m.digest, Bytes::from(data));
        }
    }

    /// `tag` in `class` from its owner: `None` when no owner answered (go
    /// upstream). The owner's remaining freshness becomes this node's; an
    /// outage of the owner's upstream is served stale from here when
    /// possible.
    #[allow(clippy::too_many_arguments)]
    async fn ask_owner(
        &self,
        cluster: &Arc<Cluster>,
        upstream: &Upstream,
        repo: &RepoName,
        tag: &Tag,
        class: AcceptClass,
        stale: Option<&Digest>,
        what: &str,
    ) -> Result<Option<TagEntry>, Error> {
        let ttl = upstream.tag_ttl();
        let key = cluster::tag_key(upstream.host(), &upstream.upstream_repo(repo.as_str()), tag);
        let asked = owner::Question {
            key: &key,
            reference: tag.as_str(),
            expected: None,
            accept: class,
        };
        match owner::ask(cluster, upstream, repo, asked).await {
            Ok(Some(from)) => {
                let fresh_for = from.fresh_for.unwrap_or(ttl).min(ttl);
                // Owners are asked for mirror-mode callers only.
                let mut entry = self
                    .adopt(
                        upstream,
                        &Caller::Mirror,
                        repo,
                        tag,
                        class,
                        from.manifest,
                        fresh_for,
                        stale,
                    )
                    .await;
                if from.stale {
                    entry.outcome = Outcome::Stale;
                }
                Ok(Some(entry))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                let Some(stale) = stale.filter(|_| e.is_upstream_outage()) else {
                    return Err(e);
                };
                tracing::warn!(upstream = upstream.host(), manifest = %what, reason = %e.report(),
                    "upstream unavailable (said the tag's owner), serving stale manifest");
                Ok(Some(TagEntry::new(
                    stale.clone(),
                    ttl.min(STALE_RETRY),
                    Outcome::Stale,
                )))
            }
        }
    }

    /// Stores a manifest fetched by tag (verified, with `caller`'s
    /// credentials) and points the tag at it, fresh for `ttl`.
    /// If it cannot be stored (a full disk, say), a tag that had a manifest
    /// stays where it was and is served `stale` (what is on disk stays
    /// consistent; upstream is asked again within [`STALE_RETRY`]); a tag
    /// seen for the first time is served from memory, not stored.
    #[allow(clippy::too_many_arguments)]
    async fn adopt(
        &self,
        upstream: &Upstream,
        caller: &Caller,
        repo: &RepoName,
        tag: &Tag,
        class: AcceptClass,
        m: Manifest,
        ttl: Duration,
        stale: Option<&Digest>,
    ) -> TagEntry {
        let stored = match self.write_disk(&m, caller).await {
            Ok(()) => self.write_tag(upstream, repo, tag, class, &m.digest).await,
            Err(e) => Err(e),
        };
        let digest = m.digest.clone();
        // Verified either way: a request by digest need not fetch it again.
        self.by_digest.insert(digest.clone(), Arc::new(m)).await;
        match (stored, stale) {
            (Ok(()), _) => TagEntry::new(digest, ttl, Outcome::Miss),
            (Err(e), Some(stale)) => {
                tracing::warn!(upstream = upstream.host(), manifest = %format!("{repo}:{tag}"),
                    moved_to = %digest, error = %e,
                    "cannot store the new manifest of a moved tag: serving the stale one");
                TagEntry::new(stale.clone(), ttl.min(STALE_RETRY), Outcome::Stale)
            }
            (Err(e), None) => {
                tracing::warn!(upstream = upstream.host(), manifest = %format!("{repo}:{tag}"),
                    %digest, error = %e, "cannot store manifest: serving it without caching");
                TagEntry::new(digest, ttl, Outcome::Miss)
            }
        }
    }

    /// A manifest held locally (memory or disk), never asked upstream.
    pub(super) async fn local(&self, digest: &Digest) -> Option<Arc<Manifest>> {
        if let Some(m) = self.by_digest.get(digest).await {
            return Some(m);
        }
        let m = Arc::new(self.read_disk(digest).await.ok()??);
        self.by_digest.insert(digest.clone(), m.clone()).await;
        Some(m)
    }

    /// Keeps a verified manifest fetched with `caller`'s credentials on
    /// disk and in memory.
    pub(super) async fn keep(&self, m: Manifest, caller: &Caller) -> io::Result<()> {
        self.write_disk(&m, caller).await?;
        self.by_digest.insert(m.digest.clone(), Arc::new(m)).await;
        Ok(())
    }

    /// Whether a manifest is available locally.
    async fn has(&self, digest: &Digest) -> bool {
        self.by_digest.contains_key(digest)
            || tokio::fs::try_exists(self.layout.manifest(digest))
                .await
                .unwrap_or(false)
    }

    fn tag_path(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        tag: &Tag,
        class: AcceptClass,
    ) -> PathBuf {
        self.layout.tag(
            upstream.host(),
            repo.as_str(),
            upstream.library_prefix(),
            tag,
            class,
        )
    }

    async fn read_disk(&self, digest: &Digest) -> io::Result<Option<Manifest>> {
        let path = self.layout.manifest(digest);
        let data = match tokio::fs::read(&path).await {
            Ok(d) => Bytes::from(d),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some((media_type, body)) = layout::decode_manifest(data) else {
            return Ok(None);
        };
        // Never serve a damaged file: it must still hash to its name.
        if &Digest::of(digest.algorithm(), &body) != digest {
            tracing::warn!(%digest, "cached manifest does not match its digest, dropping it");
            let _ = tokio::fs::remove_file(&path).await;
            return Ok(None);
        }
        Ok(Some(Manifest::new(digest.clone(), media_type, body)))
    }

    /// Writes a manifest fetched with `caller`'s credentials: marked
    /// private first when a passthrough caller fetched it, public after
    /// when the mirror did (`cache/private.rs`).
    async fn write_disk(&self, m: &Manifest, caller: &Caller) -> io::Result<()> {
        let data = layout::encode_manifest(&m.media_type, &m.body);
        // Relied on until the file is written (`Marked`).
        let _marked = if caller.credential().is_some() {
            let (private, digest) = (self.private.clone(), m.digest.clone());
            Some(
                tokio::task::spawn_blocking(move || private.mark(&digest))
                    .await
                    .map_err(io::Error::other)??,
            )
        } else {
            None
        };
        let len = data.len() as u64;
        write_atomic(&self.layout, self.layout.manifest(&m.digest), data).await?;
        self.disk.wrote(len);
        if caller.credential().is_none() {
            self.private.clear(&m.digest);
        }
        Ok(())
    }

    async fn read_tag(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        tag: &Tag,
        class: AcceptClass,
    ) -> Option<Digest> {
        let text = tokio::fs::read_to_string(self.tag_path(upstream, repo, tag, class))
            .await
            .ok()?;
        layout::decode_tag(&text)
    }

    async fn write_tag(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        tag: &Tag,
        class: AcceptClass,
        digest: &Digest,
    ) -> io::Result<()> {
        write_atomic(
            &self.layout,
            self.tag_path(upstream, repo, tag, class),
            layout::encode_tag(digest),
        )
        .await
    }
}

/// The key of `tag` in `class`: upstream host, repository as upstream
/// names it, tag, class.
fn tag_key(upstream: &Upstream, repo: &RepoName, tag: &Tag, class: AcceptClass) -> TagKey {
    format!(
        "{}/{}:{}@{}",
        upstream.host(),
        upstream.upstream_repo(repo.as_str()),
        tag,
        class.name()
    )
}

/// Replaces the small file at `path` with `data`
/// ([`layout::replace_file`]), its temporary file in the cache's `tmp/`.
pub(super) async fn write_atomic(layout: &Layout, path: PathBuf, data: Vec<u8>) -> io::Result<()> {
    let tmp = layout.tmp();
    tokio::task::spawn_blocking(move || layout::replace_file(&tmp, &path, &data))
        .await
        .map_err(io::Error::other)?
}

/// A manifest body, bounded by [`MAX_MANIFEST`] in size and by the
/// upstream's timeout in time: each frame within it (the body's idle
/// timeout), and the whole body within it too, since nothing reaches the
/// client before the last byte (a manifest is a few KiB).
pub(super) async fn read_body<B>(body: B, timeout: Duration, what: &str) -> Result<Bytes, Error>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let collected = tokio::time::timeout(timeout, Limited::new(body, MAX_MANIFEST).collect())
        .await
        .map_err(|_| {
            Error::upstream(
                ErrorKind::BodyBroken,
                format!(
                    "reading manifest {what} from upstream: not complete within {}",
                    humantime::format_duration(timeout)
                ),
            )
        })?
        .map_err(|e| {
            // Over the size limit: upstream broke the protocol; anything else
            // (a stall, a reset) is the transfer failing.
            let kind = if e.is::<http_body_util::LengthLimitError>() {
                ErrorKind::UpstreamProtocol
            } else {
                ErrorKind::BodyBroken
            };
            let why = if is_idle_timeout(e.as_ref()) {
                format!("stalled for {}", humantime::format_duration(timeout))
            } else {
                e.to_string()
            };
            Error::upstream(
                kind,
                format!("reading manifest {what} from upstream: {why}"),
            )
            .with_cause(e)
        })?;
    // A copy, kept for long (the memory cache, a prefetch): a body that
    // came in one read is a slice of the buffer it landed in (hyper's, up
    // to some 400 KiB), which it would keep whole.
    Ok(Bytes::copy_from_slice(&collected.to_bytes()))
}

/// The digest of `body`, which must be `want` when given (invariant: a
/// manifest fetched by digest hashes to it; by tag, to upstream's
/// `Docker-Content-Digest`).
fn verify(
    upstream: &Upstream,
    body: &[u8],
    want: Option<&Digest>,
    what: &str,
) -> Result<Digest, Error> {
    let algorithm = want.map(|d| d.algorithm()).unwrap_or(Algorithm::Sha256);
    let digest = Digest::of(algorithm, body);
    if let Some(want) = want
        && want != &digest
    {
        tracing::warn!(manifest = %what, expected = %want, got = %digest, "manifest digest mismatch");
        upstream.metrics().digest_mismatch(CacheKind::Manifest);
        return Err(Error::upstream(
            ErrorKind::DigestMismatch,
            format!("upstream manifest {what} does not match digest {want} (got {digest})"),
        ));
    }
    Ok(digest)
}

/// What a `HEAD` of a tag says about the digest cached for it.
enum Head {
    /// Upstream names the same digest.
    Unchanged,
    /// Another digest (now named), or none given: fetch the tag.
    Moved(Option<Digest>),
    /// Upstream is out (why): serve the cached manifest stale.
    Outage(String),
}

/// Asks upstream with `HEAD` where `tag` points now, compared with `cached`.
/// A refusal or another failure that is no outage is the error to answer
/// with.
async fn head(
    upstream: &Upstream,
    caller: &Caller,
    repo: &RepoName,
    tag: &Tag,
    class: AcceptClass,
    cached: &Digest,
    what: &str,
) -> Result<Head, Error> {
    let head = upstream
        .send_as(
            caller,
            Method::HEAD,
            repo.as_str(),
            &format!("manifests/{tag}"),
            class.headers(),
        )
        .await;
    match head.map_err(Error::from) {
        Err(e) if e.is_upstream_outage() => Ok(Head::Outage(e.report())),
        Err(e) => Err(e),
        Ok(r) if is_outage(r.status()) => Ok(Head::Outage(format!("HEAD answered {}", r.status()))),
        Ok(r) if r.status() == StatusCode::OK => {
            let current = r
                .headers()
                .get(DOCKER_CONTENT_DIGEST)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| Digest::parse(v).ok());
            Ok(if current.as_ref() == Some(cached) {
                Head::Unchanged
            } else {
                Head::Moved(current)
            })
        }
        Ok(r) => Err(Error::upstream_status(
            r.status(),
            Asked::Manifest,
            r.headers().get(header::RETRY_AFTER),
            what,
        )),
    }
}

/// Whether upstream's answer `e` to a tag withdraws it: unknown (404, for
/// any caller: the tag or repository is gone), or denied to the mirror's
/// own credentials (403 from the registry or its token endpoint: refused
/// to every mirror-mode client alike). Not a 401, which is about the
/// credentials, not the tag (a mistyped password must not cost every tag
/// its stale copy), nor a passthrough caller's 403, which is that
/// caller's own. Errors of stowage's own or of the request (a media type
/// the client does not accept) are not upstream's answer.
fn withdraws_tag(e: &Error, caller: &Caller) -> bool {
    let mirror = caller.credential().is_none();
    e.esource() == ErrorSource::Upstream
        && match e.kind() {
            ErrorKind::ManifestUnknown | ErrorKind::NameUnknown => true,
            ErrorKind::Denied => mirror,
            ErrorKind::UpstreamAuth { status: Some(s) } => mirror && *s == StatusCode::FORBIDDEN,
            _ => false,
        }
}

/// Upstream answers under which a cached manifest is served stale (the same
/// statuses [`Error::is_upstream_outage`] calls an outage).
fn is_outage(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

fn local_error(e: io::Error) -> Error {
    Error::local("manifest cache storage error", e)
}

/// GETs a manifest by tag or digest, accepting `class`, and verifies it:
/// against `expected` when fetched by digest, against upstream's
/// `Docker-Content-Digest` when fetched by tag. A schema 1 answer (a
/// registry's conversion for a client that accepts neither schema 2 nor a
/// list) is `MANIFEST_UNKNOWN`: stowage serves no schema 1.
async fn fetch(
    upstream: &Upstream,
    caller: &Caller,
    repo: &RepoName,
    reference: &str,
    expected: Option<&Digest>,
    class: AcceptClass,
) -> Result<Manifest, Error> {
    // Worded as `http/passthrough.rs` words its `HEAD`'s answer, so a
    // refusal says nothing of whether the manifest is held.
    let what = format!("{repo}/manifests/{reference}");
    let resp = upstream
        .send_as(
            caller,
            Method::GET,
            repo.as_str(),
            &format!("manifests/{reference}"),
            class.headers(),
        )
        .await?;
    if resp.status() != StatusCode::OK {
        return Err(Error::upstream_status(
            resp.status(),
            Asked::Manifest,
            resp.headers().get(header::RETRY_AFTER),
            &what,
        ));
    }
    let header_digest = resp
        .headers()
        .get(DOCKER_CONTENT_DIGEST)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Digest::parse(v).ok());
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // Refused before the body is read when the header names the type; a
    // generic one (`application/json`) leaves it to the body's `mediaType`
    // (checked by the caller, `served`).
    if manifest::specific_type(content_type.as_deref()).is_some_and(|t| !class.serves(&t, true)) {
        return Err(Error::new(
            ErrorKind::ManifestUnknown,
            ErrorSource::Client,
            format!(
                "upstream offers {what} to this Accept only as {}, which stowage does not serve",
                content_type.unwrap_or_default()
            ),
        ));
    }
    let body = read_body(resp.into_body(), upstream.timeout(), &what).await?;
    let digest = verify(upstream, &body, expected.or(header_digest.as_ref()), &what)?;
    let media_type = manifest::media_type(content_type.as_deref(), &body);
    Ok(Manifest::new(digest, media_type, body))
}

/// `MANIFEST_UNKNOWN` unless a client of `class` is served `m`'s media
/// type (by tag or by digest), as a registry answers such a client.
fn served(m: &Manifest, class: AcceptClass, by_tag: bool) -> Result<(), Error> {
    if class.serves(&m.media_type, by_tag) {
        return Ok(());
    }
    let by = if by_tag { "tag" } else { "digest" };
    Err(Error::new(
        ErrorKind::ManifestUnknown,
        ErrorSource::Client,
        format!(
            "manifest {} is {}, which the request's Accept does not include (asked by {by}; \
             stowage does not convert manifests)",
            m.digest, m.media_type
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest body kept in memory keeps no more than itself: one that
    /// came in one read was a slice of the 400 KiB buffer it landed in,
    /// kept whole (a 64 MiB budget of 1 KiB manifests held gigabytes).
    #[tokio::test]
    async fn a_manifest_body_keeps_no_upstream_buffer_alive() {
        let live = Arc::default();
        let read = crate::body::tracked_buffer(400 * 1024, b"{}", &live);
        let body = http_body_util::Full::new(read.slice(0..2));
        let kept = read_body(body, Duration::from_secs(5), "test")
            .await
            .unwrap();
        drop(read);
        assert_eq!(&kept[..], b"{}");
        assert_eq!(live.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    /// Five manifest files of 100 bytes, written at seconds 1000 to 1004.
    fn five_manifests(
        layout: &Layout,
        max_files: usize,
        max_bytes: u64,
    ) -> (ManifestStore, Vec<PathBuf>) {
        let private = Arc::new(Private::open(layout).unwrap());
        let store = ManifestStore::open(layout, private)
            .unwrap()
            .with_disk_limits(max_files, max_bytes);
        let mut paths = Vec::new();
        for i in 0..5u8 {
            let d = Digest::of(crate::oci::Algorithm::Sha256, &[i]);
            let p = store.layout.manifest(&d);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, [i; 100]).unwrap();
            filetime::set_file_mtime(&p, filetime::FileTime::from_unix_time(1000 + i as i64, 0))
                .unwrap();
            paths.push(p);
        }
        (store, paths)
    }

    #[test]
    fn prune_keeps_the_most_recently_written() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let (store, paths) = five_manifests(&layout, 10, 1 << 20);
        assert_eq!(store.prune().unwrap(), 0);
        assert_eq!(
            store.disk(),
            ManifestDisk {
                files: 5,
                bytes: 500,
                pruned: 0
            }
        );
        let (store, _) = five_manifests(&layout, 3, 1 << 20);
        assert_eq!(store.prune().unwrap(), 2);
        let kept: Vec<bool> = paths.iter().map(|p| p.exists()).collect();
        assert_eq!(kept, vec![false, false, true, true, true]);
        assert_eq!(
            store.disk(),
            ManifestDisk {
                files: 3,
                bytes: 300,
                pruned: 2
            }
        );
    }

    /// Past the byte bound, the least recently written go until the files
    /// hold at most nine tenths of it (here 225 of 250 bytes: two files).
    #[test]
    fn prune_keeps_the_bytes_within_their_bound() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let (store, paths) = five_manifests(&layout, 10, 250);
        assert_eq!(store.prune().unwrap(), 3);
        let kept: Vec<bool> = paths.iter().map(|p| p.exists()).collect();
        assert_eq!(kept, vec![false, false, false, true, true]);
        assert_eq!(
            store.disk(),
            ManifestDisk {
                files: 2,
                bytes: 200,
                pruned: 3
            }
        );
    }

    /// A write that takes the files past a bound wakes the pruner at once,
    /// not at its next tick; one within the bounds does not.
    #[tokio::test]
    async fn a_write_past_a_bound_wakes_the_pruner() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let (store, _) = five_manifests(&layout, 6, 1 << 20);
        store.prune().unwrap();
        let m = Manifest::new(
            Digest::of(crate::oci::Algorithm::Sha256, b"{}"),
            "application/vnd.oci.image.manifest.v1+json".into(),
            Bytes::from_static(b"{}"),
        );
        let woken = |store: &ManifestStore| {
            futures_util::FutureExt::now_or_never(store.disk_over()).is_some()
        };
        store.write_disk(&m, &Caller::Mirror).await.unwrap();
        assert_eq!(store.disk().files, 6);
        assert!(!woken(&store) && !store.disk_is_over());
        let m2 = Manifest::new(
            Digest::of(crate::oci::Algorithm::Sha256, b"{ }"),
            "application/vnd.oci.image.manifest.v1+json".into(),
            Bytes::from_static(b"{ }"),
        );
        store.write_disk(&m2, &Caller::Mirror).await.unwrap();
        assert!(store.disk_is_over());
        assert!(woken(&store), "the pruner was not woken");
        assert_eq!(store.prune().unwrap(), 1);
        assert!(!store.disk_is_over());
        assert_eq!(store.disk().files, 6);
    }

    /// The memory cache is bounded whatever the manifests' sizes: one-byte
    /// bodies (weighed 1 byte each before) do not let it hold more entries
    /// than the budget allows for their real cost.
    #[tokio::test]
    async fn tiny_manifests_are_weighed_for_their_real_cost() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let private = Arc::new(Private::open(&layout).unwrap());
        let store = ManifestStore::open(&layout, private).unwrap();
        for i in 0..200_000u32 {
            let body = Bytes::copy_from_slice(&i.to_le_bytes()[..1]);
            let d = Digest::of(crate::oci::Algorithm::Sha256, &i.to_le_bytes());
            let m = Manifest::new(d.clone(), manifest::OCI_MANIFEST.to_string(), body);
            store.by_digest.insert(d, Arc::new(m)).await;
        }
        store.by_digest.run_pending_tasks().await;
        let held = store.by_digest.entry_count();
        assert!(
            held <= MEMORY_BUDGET / 512,
            "{held} manifests held in a {MEMORY_BUDGET}-byte budget"
        );
        assert!(store.by_digest.weighted_size() <= MEMORY_BUDGET);
    }
}
