//! Prometheus metrics and the health state behind `/readyz`.
//!
//! One [`Metrics`] per server instance, with its own
//! [`prometheus::Registry`] (never the process-global default registry:
//! several servers may run in one process, as the tests do). The server
//! creates it in `Server::bind` and hands clones of the `Arc` to the
//! upstream clients and the blob store; the admin listener encodes it at
//! `/metrics`.
//!
//! Every label value is bounded: route kinds, cache kinds, outcomes and
//! sources are enums defined here (the label vocabulary), methods are mapped
//! to a fixed set, statuses are HTTP status codes, and upstreams are the
//! configured host names. No repository name, tag or digest is ever a label.
//!
//! This module is a leaf: it uses nothing else of the crate, so every other
//! module may report to it.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `stowage_http_requests_total` | counter | `route`, `method`, `status` |
//! | `stowage_http_requests_in_flight` | gauge | |
//! | `stowage_http_request_duration_seconds` | histogram | `route` |
//! | `stowage_served_bytes_total` | counter | `source` (`cache`, `upstream`, `local`) |
//! | `stowage_cache_requests_total` | counter | `kind` (`manifest`, `blob`), `outcome` (`hit`, `miss`, `join`, `stale`, `upstream`) |
//! | `stowage_manifest_stale_served_total` | counter | |
//! | `stowage_upstream_requests_total` | counter | `upstream`, `kind`, `status` (code or `error`) |
//! | `stowage_upstream_request_duration_seconds` | histogram | `upstream`, `kind` |
//! | `stowage_upstream_ratelimit_remaining` | gauge | `upstream` |
//! | `stowage_upstream_ratelimit_limit` | gauge | `upstream` |
//! | `stowage_blob_fills_in_flight` | gauge | |
//! | `stowage_blob_fills_total` | counter | `result` (`ok`, `uncached`, `failed`, `abandoned`) |
//! | `stowage_blob_fill_bytes_total` | counter | |
//! | `stowage_digest_mismatches_total` | counter | `kind` (`manifest`, `blob`) |
//! | `stowage_cache_scrubbed_bytes_total` | counter | |
//! | `stowage_cache_damaged_blobs_total` | counter | |
//! | `stowage_cache_evictions_total` | counter | |
//! | `stowage_cache_evicted_bytes_total` | counter | |
//! | `stowage_manifest_disk_files` | gauge | |
//! | `stowage_manifest_disk_bytes` | gauge | |
//! | `stowage_manifests_pruned_total` | counter | |
//! | `stowage_prefetch_blobs_total` | counter | |
//! | `stowage_prefetch_bytes_total` | counter | |
//! | `stowage_prefetch_unread_bytes` | gauge | |
//! | `stowage_prefetch_evicted_unread_bytes_total` | counter | |
//! | `stowage_cache_size_bytes` | gauge | |
//! | `stowage_cache_budget_bytes` | gauge | |
//! | `stowage_peer_requests_total` | counter | `kind` (`blob`, `manifest`, `tag`, `probe`), `result` (`ok`, `status`, `unreachable`, `broken`, `mismatch`) |
//! | `stowage_owner_hops_total` | counter | `kind` (`blob`, `manifest`, `tag`) |
//! | `stowage_peer_requests_received_total` | counter | `result` (`accepted`, `refused`) |
//! | `stowage_cluster_peers` | gauge | `state` (`up`, `down`) |
//! | `stowage_store_requests_total` | counter | `kind` (`manifest`, `blob`), `result` (`hit`, `miss`, `error`) |
//! | `stowage_store_uploads_total` | counter | `kind`, `result` (`ok`, `exists`, `failed`, `dropped`) |
//! | `stowage_store_upload_bytes_total` | counter | |
//! | `stowage_store_up` | gauge | `store` (the configured URL) |
//! | `stowage_build_info` | gauge | `version` |
//! | `process_*` | (Linux) | CPU, memory, file descriptors, threads, start time |

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{HeaderMap, Method, StatusCode};
use prometheus::core::Collector;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Buckets of the client request duration histogram (seconds). Blob
/// responses of large layers take minutes, so the range is wide.
const HTTP_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Buckets of the upstream latency histogram (seconds, up to the response
/// headers).
const UPSTREAM_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// `Content-Type` of the Prometheus text exposition format.
pub(crate) const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What a client request asked for: the `route` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RouteKind {
    /// `/v2/`.
    Base,
    /// `/v2/<name>/manifests/<reference>`.
    Manifest,
    /// `/v2/<name>/blobs/<digest>`.
    Blob,
    /// `/v2/<name>/tags/list`.
    Tags,
    /// `/v2/<name>/referrers/<digest>`.
    Referrers,
    /// Anything else: writes, unknown or invalid paths.
    Other,
}

impl RouteKind {
    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RouteKind::Base => "base",
            RouteKind::Manifest => "manifest",
            RouteKind::Blob => "blob",
            RouteKind::Tags => "tags",
            RouteKind::Referrers => "referrers",
            RouteKind::Other => "other",
        }
    }

    /// The cache the route is answered from, if any.
    pub(crate) fn cache(self) -> Option<CacheKind> {
        match self {
            RouteKind::Manifest => Some(CacheKind::Manifest),
            RouteKind::Blob => Some(CacheKind::Blob),
            _ => None,
        }
    }
}

/// Which cache: the `kind` label of cache and digest metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CacheKind {
    /// The manifest cache.
    Manifest,
    /// The blob store.
    Blob,
}

impl CacheKind {
    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CacheKind::Manifest => "manifest",
            CacheKind::Blob => "blob",
        }
    }
}

/// How a manifest or blob request was answered: the `outcome` label of
/// `stowage_cache_requests_total`, the `cache` field of the request log and
/// the `x-stowage-cache` response header. The caches produce it; requests
/// that no cache answered (`/v2/`, errors) have none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// From the cache, fresh (a blob in the store, or a fill that is already
    /// verified).
    Hit,
    /// Fetched (or revalidated) upstream; for blobs, this request started
    /// the fill.
    Miss,
    /// Attached to a blob fill already running.
    Join,
    /// A manifest served stale because upstream failed.
    Stale,
    /// Answered from upstream without caching (HEAD on an uncached blob, a
    /// private stream while the disk is failing, tags lists, referrers).
    Upstream,
}

impl Outcome {
    /// How a cached entry loaded with this outcome is answered later: a
    /// hit, unless it is being served stale (it stays `Stale` until
    /// upstream answers again).
    pub(crate) fn again(self) -> Outcome {
        match self {
            Outcome::Stale => Outcome::Stale,
            _ => Outcome::Hit,
        }
    }

    /// The label value (and header value, log field).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Join => "join",
            Outcome::Stale => "stale",
            Outcome::Upstream => "upstream",
        }
    }
}

/// Where served bytes came from: the `source` label of
/// `stowage_served_bytes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// Hits and stale manifests.
    Cache,
    /// What was fetched: misses, fill joins, pass-through.
    Upstream,
    /// Everything else (`/v2/`, errors).
    Local,
}

impl Source {
    /// The source of a request answered with `outcome`.
    pub(crate) fn of(outcome: Option<Outcome>) -> Source {
        match outcome {
            Some(Outcome::Hit | Outcome::Stale) => Source::Cache,
            Some(Outcome::Miss | Outcome::Join | Outcome::Upstream) => Source::Upstream,
            None => Source::Local,
        }
    }

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::Upstream => "upstream",
            Source::Local => "local",
        }
    }
}

/// What a peer request was for: the `kind` label of peer metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeerKind {
    /// A blob (`GET`, or `HEAD`).
    Blob,
    /// A manifest by digest.
    Manifest,
    /// A manifest by tag.
    Tag,
    /// A liveness probe of a down peer.
    Probe,
}

impl PeerKind {
    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            PeerKind::Blob => "blob",
            PeerKind::Manifest => "manifest",
            PeerKind::Tag => "tag",
            PeerKind::Probe => "probe",
        }
    }
}

/// How a peer request went: the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeerResult {
    /// Answered with what was asked.
    Ok,
    /// Answered with another status (an error, a refusal).
    Status,
    /// No answer: connection refused or timed out (the peer is marked
    /// down).
    Unreachable,
    /// The body broke off.
    Broken,
    /// The bytes did not hash to their digest (the peer is marked down).
    Mismatch,
}

impl PeerResult {
    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            PeerResult::Ok => "ok",
            PeerResult::Status => "status",
            PeerResult::Unreachable => "unreachable",
            PeerResult::Broken => "broken",
            PeerResult::Mismatch => "mismatch",
        }
    }
}

/// How a read of the shared store went: the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreResult {
    /// Found.
    Hit,
    /// Not there.
    Miss,
    /// The store failed (or was skipped while down).
    Error,
}

impl StoreResult {
    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            StoreResult::Hit => "hit",
            StoreResult::Miss => "miss",
            StoreResult::Error => "error",
        }
    }
}

/// How an upload to the shared store ended: the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UploadResult {
    /// Uploaded.
    Ok,
    /// Already there (same key, same size): nothing sent.
    Exists,
    /// Failed after every retry.
    Failed,
    /// Not attempted: the upload queue was full, or the file was gone.
    Dropped,
}

impl UploadResult {
    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            UploadResult::Ok => "ok",
            UploadResult::Exists => "exists",
            UploadResult::Failed => "failed",
            UploadResult::Dropped => "dropped",
        }
    }
}

/// The `method` label: the method if it is a standard one, else `other`
/// (methods are arbitrary tokens; labels must stay bounded).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Parses a Docker Hub rate-limit header value such as `100;w=21600`.
pub(crate) fn parse_ratelimit(value: &str) -> Option<i64> {
    value.split(';').next()?.trim().parse::<i64>().ok()
}

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// One series name a scrape can contain, with its label names (for checks
/// that dashboards and alerts query only what exists).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesName {
    /// The full metric name (`stowage_http_requests_total`,
    /// `stowage_upstream_request_duration_seconds_bucket`, ...).
    pub name: String,
    /// Its label names (`le` included for histogram buckets).
    pub labels: Vec<String>,
}

/// Collects registrations and remembers what they export.
struct Builder {
    registry: Registry,
    series: Vec<SeriesName>,
}

impl Builder {
    fn add<C: Collector + Clone + 'static>(&mut self, c: C, histogram: bool) -> C {
        for desc in c.desc() {
            let labels = desc.variable_labels.clone();
            if histogram {
                for suffix in ["_sum", "_count"] {
                    self.series.push(SeriesName {
                        name: format!("{}{suffix}", desc.fq_name),
                        labels: labels.clone(),
                    });
                }
                let mut with_le = labels.clone();
                with_le.push("le".to_string());
                self.series.push(SeriesName {
                    name: format!("{}_bucket", desc.fq_name),
                    labels: with_le,
                });
            } else {
                self.series.push(SeriesName {
                    name: desc.fq_name.clone(),
                    labels,
                });
            }
        }
        // A fresh registry and distinct constant names: cannot collide.
        if let Err(e) = self.registry.register(Box::new(c.clone())) {
            tracing::error!(error = %e, "metric registration failed");
        }
        c
    }

    fn counter(&mut self, name: &str, help: &str) -> IntCounter {
        let c = IntCounter::with_opts(Opts::new(name, help)).expect("valid metric name");
        self.add(c, false)
    }

    fn counter_vec(&mut self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric name");
        self.add(c, false)
    }

    fn gauge(&mut self, name: &str, help: &str) -> IntGauge {
        let g = IntGauge::with_opts(Opts::new(name, help)).expect("valid metric name");
        self.add(g, false)
    }

    fn gauge_vec(&mut self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric name");
        self.add(g, false)
    }

    fn histogram_vec(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> HistogramVec {
        let h = HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        )
        .expect("valid metric name");
        self.add(h, true)
    }
}

/// Client requests: counts, durations, bytes served, cache outcomes.
struct ClientMetrics {
    requests: IntCounterVec,
    in_flight: IntGauge,
    duration: HistogramVec,
    served_bytes: IntCounterVec,
    cache_requests: IntCounterVec,
    stale_served: IntCounter,
}

impl ClientMetrics {
    fn register(b: &mut Builder) -> ClientMetrics {
        let requests = b.counter_vec(
            "stowage_http_requests_total",
            "Client requests by route kind, method and response status (counted when the response headers are sent).",
            &["route", "method", "status"],
        );
        let in_flight = b.gauge(
            "stowage_http_requests_in_flight",
            "Client responses being sent now.",
        );
        let duration = b.histogram_vec(
            "stowage_http_request_duration_seconds",
            "Time from receiving a client request to the end of its response body.",
            &["route"],
            HTTP_BUCKETS,
        );
        let served_bytes = b.counter_vec(
            "stowage_served_bytes_total",
            "Response body bytes sent to clients, by source: cache (hits, stale manifests), upstream (misses, fill joins, pass-through), local (errors, /v2/).",
            &["source"],
        );
        let cache_requests = b.counter_vec(
            "stowage_cache_requests_total",
            "Manifest and blob requests by how they were answered: hit, miss, join (attached to a running blob fill), stale (manifest served stale, upstream failing), upstream (HEAD of an uncached blob, asked upstream).",
            &["kind", "outcome"],
        );
        let stale_served = b.counter(
            "stowage_manifest_stale_served_total",
            "Manifest responses served from cache past their tag TTL because upstream was unreachable, 5xx or 429.",
        );
        ClientMetrics {
            requests,
            in_flight,
            duration,
            served_bytes,
            cache_requests,
            stale_served,
        }
    }
}

/// Exchanges with upstream registries and their rate limits.
struct UpstreamMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    ratelimit_remaining: IntGaugeVec,
    ratelimit_limit: IntGaugeVec,
    passthrough_checks: IntCounterVec,
}

impl UpstreamMetrics {
    fn register(b: &mut Builder) -> UpstreamMetrics {
        let requests = b.counter_vec(
            "stowage_upstream_requests_total",
            "HTTP exchanges with upstream registries (each redirect hop and token request counts) by upstream host, kind (manifest, blob, tags, referrers, token, other) and status (HTTP code, or error when no response arrived).",
            &["upstream", "kind", "status"],
        );
        let duration = b.histogram_vec(
            "stowage_upstream_request_duration_seconds",
            "Time from sending an upstream request to its response headers (or failure).",
            &["upstream", "kind"],
            UPSTREAM_BUCKETS,
        );
        let ratelimit_remaining = b.gauge_vec(
            "stowage_upstream_ratelimit_remaining",
            "Pulls left in the upstream's rate-limit window, from its last RateLimit-Remaining header (Docker Hub).",
            &["upstream"],
        );
        let ratelimit_limit = b.gauge_vec(
            "stowage_upstream_ratelimit_limit",
            "Pulls allowed per rate-limit window, from the upstream's last RateLimit-Limit header (Docker Hub).",
            &["upstream"],
        );
        let passthrough_checks = b.counter_vec(
            "stowage_passthrough_checks_total",
            "auth = \"passthrough\": upstream asked whether a caller's credential may read a repository or digest the mirror holds (a HEAD with that credential), by upstream host and result (allowed, refused, error).",
            &["upstream", "result"],
        );
        UpstreamMetrics {
            requests,
            duration,
            ratelimit_remaining,
            ratelimit_limit,
            passthrough_checks,
        }
    }
}

/// Blob fills, verification, eviction, size and budget of the cache.
struct CacheMetrics {
    fills_in_flight: IntGauge,
    fills: IntCounterVec,
    fill_bytes: IntCounter,
    digest_mismatches: IntCounterVec,
    evictions: IntCounter,
    evicted_bytes: IntCounter,
    size: IntGauge,
    budget: IntGauge,
    prefetch_blobs: IntCounter,
    prefetch_bytes: IntCounter,
    prefetch_unread: IntGauge,
    prefetch_evicted_unread: IntCounter,
    scrubbed_bytes: IntCounter,
    damaged: IntCounter,
    manifest_files: IntGauge,
    manifest_bytes: IntGauge,
    manifests_pruned: IntCounter,
}

impl CacheMetrics {
    fn register(b: &mut Builder) -> CacheMetrics {
        let fills_in_flight = b.gauge(
            "stowage_blob_fills_in_flight",
            "Blob downloads from upstream into the cache running now.",
        );
        let fills = b.counter_vec(
            "stowage_blob_fills_total",
            "Finished blob fills by result: ok (verified and stored), uncached (verified and served, not stored) or failed.",
            &["result"],
        );
        let fill_bytes = b.counter(
            "stowage_blob_fill_bytes_total",
            "Bytes of blobs downloaded from upstream, verified and stored.",
        );
        let digest_mismatches = b.counter_vec(
            "stowage_digest_mismatches_total",
            "Upstream content that did not hash to its digest (and was refused), by kind.",
            &["kind"],
        );
        let evictions = b.counter(
            "stowage_cache_evictions_total",
            "Blobs evicted from the cache to stay within its budget.",
        );
        let evicted_bytes = b.counter(
            "stowage_cache_evicted_bytes_total",
            "Bytes of blobs evicted from the cache.",
        );
        let size = b.gauge(
            "stowage_cache_size_bytes",
            "Bytes of blobs in the cache (fills in flight included).",
        );
        let budget = b.gauge(
            "stowage_cache_budget_bytes",
            "The blob cache's configured budget in bytes (0 = not reported).",
        );
        let prefetch_blobs = b.counter(
            "stowage_prefetch_blobs_total",
            "Blob fills started by a prefetch (a manifest's config and layers fetched before a client asked).",
        );
        let prefetch_bytes = b.counter(
            "stowage_prefetch_bytes_total",
            "Bytes of blobs stored by prefetch fills.",
        );
        let prefetch_unread = b.gauge(
            "stowage_prefetch_unread_bytes",
            "Bytes of prefetched blobs in the cache that no client has asked for yet.",
        );
        let prefetch_evicted_unread = b.counter(
            "stowage_prefetch_evicted_unread_bytes_total",
            "Bytes of prefetched blobs evicted before any client asked for them (prefetched for nothing).",
        );
        let scrubbed_bytes = b.counter(
            "stowage_cache_scrubbed_bytes_total",
            "Bytes of stored blobs read and hashed again by the scrubber.",
        );
        let damaged = b.counter(
            "stowage_cache_damaged_blobs_total",
            "Stored blobs found damaged on disk (no longer their size or their digest) and dropped, to be fetched again.",
        );
        let manifest_files = b.gauge(
            "stowage_manifest_disk_files",
            "Manifest files on disk (outside the blob budget; bounded by cache.max_manifests).",
        );
        let manifest_bytes = b.gauge(
            "stowage_manifest_disk_bytes",
            "Bytes of manifest files on disk (outside the blob budget; bounded by cache.max_manifest_bytes).",
        );
        let manifests_pruned = b.counter(
            "stowage_manifests_pruned_total",
            "Manifest files removed from disk, least recently written first, to stay within their bounds.",
        );
        CacheMetrics {
            scrubbed_bytes,
            damaged,
            manifest_files,
            manifest_bytes,
            manifests_pruned,
            prefetch_blobs,
            prefetch_bytes,
            prefetch_unread,
            prefetch_evicted_unread,
            fills_in_flight,
            fills,
            fill_bytes,
            digest_mismatches,
            evictions,
            evicted_bytes,
            size,
            budget,
        }
    }
}

/// Requests between the nodes of a cluster.
struct ClusterMetrics {
    peer_requests: IntCounterVec,
    owner_hops: IntCounterVec,
    received: IntCounterVec,
    peers: IntGaugeVec,
}

impl ClusterMetrics {
    fn register(b: &mut Builder) -> ClusterMetrics {
        let peer_requests = b.counter_vec(
            "stowage_peer_requests_total",
            "Requests this node sent to other nodes of its cluster, by kind (blob, manifest, tag, probe) and result (ok, status: answered something else, unreachable, broken: body broke off, mismatch: bytes failed verification).",
            &["kind", "result"],
        );
        let owner_hops = b.counter_vec(
            "stowage_owner_hops_total",
            "Misses this node sent to the key's owner in its cluster (one per blob fill or manifest load, retries not counted), by kind.",
            &["kind"],
        );
        let received = b.counter_vec(
            "stowage_peer_requests_received_total",
            "Requests from other nodes (carrying the hop header), accepted or refused (missing or wrong cluster secret).",
            &["result"],
        );
        let peers = b.gauge_vec(
            "stowage_cluster_peers",
            "Other nodes of the cluster as this node sees them now, up or down.",
            &["state"],
        );
        ClusterMetrics {
            peer_requests,
            owner_hops,
            received,
            peers,
        }
    }
}

/// Reads of and uploads to the shared store.
struct StoreMetrics {
    requests: IntCounterVec,
    uploads: IntCounterVec,
    upload_bytes: IntCounter,
    up: IntGaugeVec,
}

impl StoreMetrics {
    fn register(b: &mut Builder) -> StoreMetrics {
        let requests = b.counter_vec(
            "stowage_store_requests_total",
            "Reads of the shared object store before going upstream, by kind and result (hit, miss, error: failed or skipped while the store is down).",
            &["kind", "result"],
        );
        let uploads = b.counter_vec(
            "stowage_store_uploads_total",
            "Uploads to the shared object store after a verified upstream fetch, by kind and result (ok, exists, failed after retries, dropped).",
            &["kind", "result"],
        );
        let upload_bytes = b.counter(
            "stowage_store_upload_bytes_total",
            "Bytes uploaded to the shared object store.",
        );
        let up = b.gauge_vec(
            "stowage_store_up",
            "1 while the shared object store answers, 0 while it fails (only with a [store]).",
            &["store"],
        );
        StoreMetrics {
            requests,
            uploads,
            upload_bytes,
            up,
        }
    }
}

/// The metrics of one server instance, and the health state `/readyz`
/// reports. Share it as `Arc<Metrics>`; every method takes `&self`.
pub struct Metrics {
    registry: Registry,
    series: Vec<SeriesName>,

    client: ClientMetrics,
    upstream: UpstreamMetrics,
    cache: CacheMetrics,
    cluster: ClusterMetrics,
    store: StoreMetrics,

    /// The registry listener(s) accept connections.
    listening: AtomicBool,
    /// Serialises [`Metrics::sync_evictions`].
    sync_lock: std::sync::Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("series", &self.series.len())
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh set of metrics in its own registry, with the process
    /// collector on Linux.
    ///
    /// # Panics
    /// Only if a metric name written in this file were invalid, which the
    /// unit tests rule out; never at request time.
    pub fn new() -> Metrics {
        let mut b = Builder {
            registry: Registry::new(),
            series: Vec::new(),
        };
        let client = ClientMetrics::register(&mut b);
        let upstream = UpstreamMetrics::register(&mut b);
        let cache = CacheMetrics::register(&mut b);
        let cluster = ClusterMetrics::register(&mut b);
        let store = StoreMetrics::register(&mut b);
        let build_info = b.gauge_vec(
            "stowage_build_info",
            "Always 1; the version label says which stowage is running.",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        #[cfg(target_os = "linux")]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            b.add(ProcessCollectorHandle(Arc::new(process)), false);
        }
        let Builder { registry, series } = b;
        Metrics {
            registry,
            series,
            client,
            upstream,
            cache,
            cluster,
            store,
            listening: AtomicBool::new(false),
            sync_lock: std::sync::Mutex::new(()),
        }
    }

    /// Every series name a scrape of this registry can contain (whether or
    /// not it has a value yet), with its label names.
    pub fn series_names(&self) -> &[SeriesName] {
        &self.series
    }

    /// The registry in the Prometheus text exposition format
    /// (`TEXT_CONTENT_TYPE`).
    pub fn encode(&self) -> Result<Vec<u8>, prometheus::Error> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(out)
    }

    // ---------------------------------------------------------- client side

    /// A client request's response headers are being sent: counts it and
    /// marks it in flight until [`Metrics::response_finished`].
    pub(crate) fn request_started(&self, route: RouteKind, method: &Method, status: StatusCode) {
        self.client
            .requests
            .with_label_values(&[route.as_str(), method_label(method), status.as_str()])
            .inc();
        self.client.in_flight.inc();
    }

    /// A response body ended (completely, with an error, or because the
    /// client went away) after `bytes` were sent.
    pub(crate) fn response_finished(
        &self,
        route: RouteKind,
        source: Source,
        bytes: u64,
        elapsed: Duration,
    ) {
        self.client.in_flight.dec();
        self.client
            .duration
            .with_label_values(&[route.as_str()])
            .observe(elapsed.as_secs_f64());
        if bytes > 0 {
            self.client
                .served_bytes
                .with_label_values(&[source.as_str()])
                .inc_by(bytes);
        }
    }

    /// How a manifest or blob request was answered.
    pub(crate) fn cache_outcome(&self, kind: CacheKind, outcome: Outcome) {
        self.client
            .cache_requests
            .with_label_values(&[kind.as_str(), outcome.as_str()])
            .inc();
        if kind == CacheKind::Manifest && outcome == Outcome::Stale {
            self.client.stale_served.inc();
        }
    }

    // -------------------------------------------------------- upstream side

    /// One HTTP exchange with `upstream` ended: with a response (`status`)
    /// or without (`None`: unreachable, timed out).
    pub(crate) fn upstream_exchange(
        &self,
        upstream: &str,
        kind: &'static str,
        status: Option<StatusCode>,
        elapsed: Duration,
    ) {
        let status = status.as_ref().map_or("error", StatusCode::as_str);
        self.upstream
            .requests
            .with_label_values(&[upstream, kind, status])
            .inc();
        self.upstream
            .duration
            .with_label_values(&[upstream, kind])
            .observe(elapsed.as_secs_f64());
    }

    /// A passthrough check (a HEAD with a caller's credential of something
    /// the mirror holds) ended with `result`: allowed, refused or error.
    pub(crate) fn passthrough_check(&self, upstream: &str, result: &'static str) {
        self.upstream
            .passthrough_checks
            .with_label_values(&[upstream, result])
            .inc();
    }

    /// Records Docker Hub's `RateLimit-Remaining` / `RateLimit-Limit`
    /// response headers (`100;w=21600`) when present.
    pub(crate) fn upstream_ratelimit(&self, upstream: &str, headers: &HeaderMap) {
        let value = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_ratelimit)
        };
        if let Some(remaining) = value("ratelimit-remaining") {
            self.upstream
                .ratelimit_remaining
                .with_label_values(&[upstream])
                .set(remaining);
        }
        if let Some(limit) = value("ratelimit-limit") {
            self.upstream
                .ratelimit_limit
                .with_label_values(&[upstream])
                .set(limit);
        }
    }

    // ---------------------------------------------------------- cache side

    /// A blob fill starts: counted in flight until the guard is finished or
    /// dropped (a dropped guard counts as failed).
    pub(crate) fn fill_started(self: &Arc<Self>) -> FillGuard {
        self.cache.fills_in_flight.inc();
        FillGuard {
            metrics: self.clone(),
            done: false,
        }
    }

    /// Content from upstream did not hash to its digest.
    pub(crate) fn digest_mismatch(&self, kind: CacheKind) {
        self.cache
            .digest_mismatches
            .with_label_values(&[kind.as_str()])
            .inc();
    }

    /// Raises the eviction counters to totals kept elsewhere (the blob
    /// index counts its own evictions); never lowers them, so it can be
    /// called on every scrape.
    pub(crate) fn sync_evictions(&self, total_count: u64, total_bytes: u64) {
        let _serialised = self
            .sync_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = total_count.saturating_sub(self.cache.evictions.get());
        let bytes = total_bytes.saturating_sub(self.cache.evicted_bytes.get());
        self.cache.evictions.inc_by(count);
        self.cache.evicted_bytes.inc_by(bytes);
    }

    /// The manifest files on disk now number `files` and hold `bytes`;
    /// `pruned` files were removed since start (the counter is raised to it,
    /// serialised like [`Metrics::sync_evictions`]).
    pub(crate) fn sync_manifest_disk(&self, files: u64, bytes: u64, pruned: u64) {
        let _serialised = self
            .sync_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.cache.manifest_files.set(gauge_value(files));
        self.cache.manifest_bytes.set(gauge_value(bytes));
        let more = pruned.saturating_sub(self.cache.manifests_pruned.get());
        self.cache.manifests_pruned.inc_by(more);
    }

    /// The scrubber read and hashed `bytes` more of stored blobs.
    pub(crate) fn scrubbed(&self, bytes: u64) {
        self.cache.scrubbed_bytes.inc_by(bytes);
    }

    /// A stored blob was found damaged on disk and dropped.
    pub(crate) fn damaged_blob(&self) {
        self.cache.damaged.inc();
    }

    /// A prefetch started a blob fill.
    pub(crate) fn prefetch_started(&self) {
        self.cache.prefetch_blobs.inc();
    }

    /// A prefetch fill stored `bytes`.
    pub(crate) fn prefetch_stored(&self, bytes: u64) {
        self.cache.prefetch_bytes.inc_by(bytes);
    }

    /// Prefetched bytes never asked for: `stored` still in the cache, and
    /// `evicted` in total since start (the counter is raised to it, never
    /// lowered; serialised like [`Metrics::sync_evictions`]).
    pub(crate) fn sync_prefetch_unread(&self, stored: u64, evicted: u64) {
        let _serialised = self
            .sync_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.cache.prefetch_unread.set(gauge_value(stored));
        let more = evicted.saturating_sub(self.cache.prefetch_evicted_unread.get());
        self.cache.prefetch_evicted_unread.inc_by(more);
    }

    /// The blob cache now holds `bytes`.
    pub(crate) fn set_cache_size(&self, bytes: u64) {
        self.cache.size.set(gauge_value(bytes));
    }

    /// The blob cache's budget is `bytes`.
    pub(crate) fn set_cache_budget(&self, bytes: u64) {
        self.cache.budget.set(gauge_value(bytes));
    }

    // ------------------------------------------------------------- cluster

    /// One request to a peer ended with `result`.
    pub(crate) fn peer_request(&self, kind: PeerKind, result: PeerResult) {
        self.cluster
            .peer_requests
            .with_label_values(&[kind.as_str(), result.as_str()])
            .inc();
    }

    /// A miss was sent to its owner.
    pub(crate) fn owner_hop(&self, kind: PeerKind) {
        self.cluster
            .owner_hops
            .with_label_values(&[kind.as_str()])
            .inc();
    }

    /// A request from a peer was accepted (or refused).
    pub(crate) fn peer_request_received(&self, accepted: bool) {
        let result = if accepted { "accepted" } else { "refused" };
        self.cluster.received.with_label_values(&[result]).inc();
    }

    /// The other nodes: `up` of them up, `down` down.
    pub(crate) fn set_peers(&self, up: usize, down: usize) {
        let peers = &self.cluster.peers;
        peers.with_label_values(&["up"]).set(gauge_value(up as u64));
        peers
            .with_label_values(&["down"])
            .set(gauge_value(down as u64));
    }

    // --------------------------------------------------------------- store

    /// A read of the shared store.
    pub(crate) fn store_request(&self, kind: CacheKind, result: StoreResult) {
        self.store
            .requests
            .with_label_values(&[kind.as_str(), result.as_str()])
            .inc();
    }

    /// An upload to the shared store ended (`bytes` sent).
    pub(crate) fn store_upload(&self, kind: CacheKind, result: UploadResult, bytes: u64) {
        self.store
            .uploads
            .with_label_values(&[kind.as_str(), result.as_str()])
            .inc();
        if bytes > 0 {
            self.store.upload_bytes.inc_by(bytes);
        }
    }

    /// The shared store `store` answers (or fails).
    pub(crate) fn set_store_up(&self, store: &str, up: bool) {
        self.store.up.with_label_values(&[store]).set(i64::from(up));
    }

    // -------------------------------------------------------------- health

    /// Whether the registry listener accepts connections; set by the
    /// server when its accept loop starts and when it stops for shutdown.
    pub(crate) fn set_listening(&self, up: bool) {
        self.listening.store(up, Ordering::SeqCst);
    }

    /// See [`Metrics::set_listening`].
    pub(crate) fn listening(&self) -> bool {
        self.listening.load(Ordering::SeqCst)
    }
}

/// How a blob fill ended; see [`FillGuard::finish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FillResult {
    /// Verified and stored in the cache: its size in bytes.
    Stored(u64),
    /// Verified and served, but not cached (disk failing, blob over budget).
    Uncached,
    /// Upstream error, digest mismatch or local failure.
    Failed,
    /// Stopped because every client left and `cache.max_detached_fills`
    /// other fills already ran for nobody.
    Abandoned,
}

impl FillResult {
    fn label(self) -> &'static str {
        match self {
            FillResult::Stored(_) => "ok",
            FillResult::Uncached => "uncached",
            FillResult::Failed => "failed",
            FillResult::Abandoned => "abandoned",
        }
    }
}

/// Keeps a blob fill counted in flight; see [`Metrics::fill_started`].
#[must_use = "the fill stays counted in flight until the guard is finished or dropped"]
pub(crate) struct FillGuard {
    metrics: Arc<Metrics>,
    done: bool,
}

impl FillGuard {
    /// The fill ended with `result`.
    pub(crate) fn finish(mut self, result: FillResult) {
        self.done = true;
        self.metrics.cache.fills_in_flight.dec();
        self.metrics
            .cache
            .fills
            .with_label_values(&[result.label()])
            .inc();
        if let FillResult::Stored(size) = result {
            self.metrics.cache.fill_bytes.inc_by(size);
        }
    }
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.cache.fills_in_flight.dec();
            self.metrics
                .cache
                .fills
                .with_label_values(&[FillResult::Failed.label()])
                .inc();
        }
    }
}

/// The process collector is not `Clone`; registration goes through this.
#[cfg(target_os = "linux")]
#[derive(Clone)]
struct ProcessCollectorHandle(Arc<prometheus::process_collector::ProcessCollector>);

#[cfg(target_os = "linux")]
impl Collector for ProcessCollectorHandle {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.0.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(m: &Metrics) -> String {
        String::from_utf8(m.encode().unwrap()).unwrap()
    }

    #[test]
    fn registries_are_independent() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.cache_outcome(CacheKind::Blob, Outcome::Hit);
        assert!(
            scrape(&a).contains(r#"stowage_cache_requests_total{kind="blob",outcome="hit"} 1"#)
        );
        assert!(!scrape(&b).contains("stowage_cache_requests_total"));
        // Nothing leaks into the process-global registry.
        assert!(
            prometheus::gather()
                .iter()
                .all(|f| !f.get_name().starts_with("stowage_"))
        );
    }

    #[test]
    fn names_follow_conventions() {
        let m = Metrics::new();
        let names: Vec<&str> = m.series_names().iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&"stowage_http_requests_total"));
        assert!(names.contains(&"stowage_upstream_request_duration_seconds_bucket"));
        assert!(names.contains(&"stowage_blob_fills_in_flight"));
        #[cfg(target_os = "linux")]
        assert!(names.contains(&"process_resident_memory_bytes"));
        for s in m.series_names() {
            let n = &s.name;
            assert!(
                n.starts_with("stowage_") || n.starts_with("process_"),
                "{n}: prefix"
            );
            assert!(
                n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{n}: characters"
            );
            for l in &s.labels {
                assert!(
                    !matches!(
                        l.as_str(),
                        "repo" | "repository" | "digest" | "tag" | "name"
                    ),
                    "{n}: unbounded label {l}"
                );
            }
        }
        // Process metrics are exported on a scrape.
        #[cfg(target_os = "linux")]
        assert!(scrape(&m).contains("process_open_fds "));
        assert!(scrape(&m).contains(&format!(
            "stowage_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
    }

    #[test]
    fn labels_are_bounded() {
        let m = Metrics::new();
        let odd = Method::from_bytes(b"BREW").unwrap();
        m.request_started(RouteKind::Other, &odd, StatusCode::METHOD_NOT_ALLOWED);
        m.response_finished(
            RouteKind::Other,
            Source::Local,
            10,
            Duration::from_millis(3),
        );
        let text = scrape(&m);
        assert!(
            text.contains(
                r#"stowage_http_requests_total{method="other",route="other",status="405"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"stowage_served_bytes_total{source="local"} 10"#));
        assert!(text.contains("stowage_http_requests_in_flight 0"));
        assert_eq!(Source::of(Some(Outcome::Hit)).as_str(), "cache");
        assert_eq!(Source::of(Some(Outcome::Join)).as_str(), "upstream");
        assert_eq!(Source::of(None).as_str(), "local");
    }

    #[test]
    fn upstream_and_ratelimit() {
        let m = Metrics::new();
        m.upstream_exchange(
            "docker.io",
            "blob",
            Some(StatusCode::OK),
            Duration::from_millis(20),
        );
        m.upstream_exchange("docker.io", "token", None, Duration::from_secs(1));
        let mut h = HeaderMap::new();
        h.insert("ratelimit-remaining", "97;w=21600".parse().unwrap());
        h.insert("ratelimit-limit", "100;w=21600".parse().unwrap());
        m.upstream_ratelimit("docker.io", &h);
        m.upstream_ratelimit("docker.io", &HeaderMap::new());
        let text = scrape(&m);
        for line in [
            r#"stowage_upstream_requests_total{kind="blob",status="200",upstream="docker.io"} 1"#,
            r#"stowage_upstream_requests_total{kind="token",status="error",upstream="docker.io"} 1"#,
            r#"stowage_upstream_request_duration_seconds_count{kind="blob",upstream="docker.io"} 1"#,
            r#"stowage_upstream_ratelimit_remaining{upstream="docker.io"} 97"#,
            r#"stowage_upstream_ratelimit_limit{upstream="docker.io"} 100"#,
        ] {
            assert!(text.contains(line), "missing {line}:\n{text}");
        }
        assert_eq!(parse_ratelimit("100;w=21600"), Some(100));
        assert_eq!(parse_ratelimit(" 5 "), Some(5));
        assert_eq!(parse_ratelimit("lots"), None);
    }

    #[test]
    fn fills_evictions_gauges() {
        let m = Arc::new(Metrics::new());
        let a = m.fill_started();
        let b = m.fill_started();
        assert!(scrape(&m).contains("stowage_blob_fills_in_flight 2"));
        a.finish(FillResult::Stored(1000));
        drop(b);
        m.fill_started().finish(FillResult::Uncached);
        m.digest_mismatch(CacheKind::Blob);
        m.sync_evictions(3, 40);
        // Totals kept elsewhere never lower the counters.
        m.sync_evictions(2, 20);
        m.set_cache_size(500);
        m.set_cache_budget(1 << 40);
        m.cache_outcome(CacheKind::Manifest, Outcome::Stale);
        let text = scrape(&m);
        for line in [
            "stowage_blob_fills_in_flight 0",
            r#"stowage_blob_fills_total{result="ok"} 1"#,
            r#"stowage_blob_fills_total{result="failed"} 1"#,
            r#"stowage_blob_fills_total{result="uncached"} 1"#,
            "stowage_blob_fill_bytes_total 1000",
            r#"stowage_digest_mismatches_total{kind="blob"} 1"#,
            "stowage_cache_evictions_total 3",
            "stowage_cache_evicted_bytes_total 40",
            "stowage_cache_size_bytes 500",
            "stowage_cache_budget_bytes 1099511627776",
            "stowage_manifest_stale_served_total 1",
        ] {
            assert!(text.contains(line), "missing {line}:\n{text}");
        }
    }

    #[test]
    fn health_flags() {
        let m = Metrics::new();
        assert!(!m.listening());
        m.set_listening(true);
        assert!(m.listening());
    }
}
