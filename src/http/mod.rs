//! The HTTP edge of the registry API: where requests enter ([`routes`]),
//! which upstream they are for ([`routing`]), ranges, request ids, the
//! request log and response bodies.

use std::sync::Arc;

pub mod access_log;
pub mod error;
pub mod request_id;
pub mod routes;
pub mod routing;

pub use routes::handle;

use crate::cache::blob::BlobStore;
use crate::cache::manifests::ManifestStore;
use crate::front::access::Access;
use crate::metrics::Metrics;
use request_id::RequestIds;
use routing::Router;

/// Shared state of every request.
pub struct AppState {
    /// Upstream selection.
    pub router: Router,
    /// The blob cache.
    pub blobs: Arc<BlobStore>,
    /// The manifest cache.
    pub manifests: Arc<ManifestStore>,
    /// Client authentication (open unless `[access]` is configured).
    pub access: Arc<Access>,
    /// This server's metrics and health flags.
    pub metrics: Arc<Metrics>,
    /// Request id generator.
    pub request_ids: RequestIds,
}
