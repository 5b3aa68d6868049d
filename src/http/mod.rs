//! The HTTP edge of the registry API: where requests enter ([`routes`]),
//! which upstream they are for ([`routing`]), who may read what with
//! `auth = "passthrough"` ([`passthrough`]), request ids, the request log.

use std::sync::Arc;

pub(crate) mod access_log;
pub(crate) mod error;
pub(crate) mod passthrough;
pub(crate) mod request_id;
pub(crate) mod routes;
pub(crate) mod routing;

pub(crate) use routes::handle;

use crate::bucket::Bucket;
use crate::cache::blob::BlobStore;
use crate::cache::grants::Grants;
use crate::cache::manifests::ManifestStore;
use crate::cache::prefetch::Prefetcher;
use crate::cache::private::Private;
use crate::cluster::Cluster;
use crate::front::access::Access;
use crate::metrics::Metrics;
use request_id::RequestIds;
use routing::Router;

/// Shared state of every request.
pub(crate) struct AppState {
    /// Upstream selection.
    pub(crate) router: Router,
    /// The blob cache.
    pub(crate) blobs: Arc<BlobStore>,
    /// The manifest cache.
    pub(crate) manifests: Arc<ManifestStore>,
    /// Starts fills for the blobs of manifests served.
    pub(crate) prefetch: Arc<Prefetcher>,
    /// Client authentication (open unless `[access]` is configured).
    pub(crate) access: Arc<Access>,
    /// What passthrough upstreams let each caller read.
    pub(crate) grants: Arc<Grants>,
    /// Which digests came only through passthrough upstreams.
    pub(crate) private: Arc<Private>,
    /// This server's metrics and health flags.
    pub(crate) metrics: Arc<Metrics>,
    /// Request id generator.
    pub(crate) request_ids: RequestIds,
    /// The cluster this node is in, if any.
    pub(crate) cluster: Option<Arc<Cluster>>,
    /// The shared store, if any.
    pub(crate) bucket: Option<Arc<Bucket>>,
}
