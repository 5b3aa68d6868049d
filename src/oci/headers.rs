//! Header names of the registry API (and stowage's own) that the `http`
//! crate does not define.

use http::HeaderName;

/// The digest of the content a blob or manifest response carries.
pub(crate) const DOCKER_CONTENT_DIGEST: HeaderName =
    HeaderName::from_static("docker-content-digest");

/// `registry/2.0` on every API response.
pub(crate) const DOCKER_API_VERSION: HeaderName =
    HeaderName::from_static("docker-distribution-api-version");

/// Filters a registry applied to a referrers response.
pub(crate) const OCI_FILTERS_APPLIED: HeaderName = HeaderName::from_static("oci-filters-applied");

/// How the mirror answered a blob or manifest request: `hit`, `miss`,
/// `join`, `stale` or `upstream`.
pub(crate) const X_STOWAGE_CACHE: HeaderName = HeaderName::from_static("x-stowage-cache");

/// Docker Hub's pull rate limit (`100;w=21600`).
pub(crate) const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");

/// Pulls left in Docker Hub's rate-limit window (`76;w=21600`).
pub(crate) const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");

/// Marks a peer request (a request one stowage node sends another in a
/// cluster); the value is the sender's advertised URL. A node never
/// forwards a request carrying it.
pub(crate) const X_STOWAGE_HOP: HeaderName = HeaderName::from_static("x-stowage-hop");

/// The cluster secret a peer request carries (when `cluster.secret_file`
/// is set).
pub(crate) const X_STOWAGE_CLUSTER_SECRET: HeaderName =
    HeaderName::from_static("x-stowage-cluster-secret");

/// On a peer's answer for a tag: how many more milliseconds the owner
/// trusts it, so the asking node's copy expires when the owner's does.
pub(crate) const X_STOWAGE_FRESH_MS: HeaderName = HeaderName::from_static("x-stowage-fresh-ms");

/// On an error answered to a peer request: who caused it (`client`,
/// `upstream`, `local`), so the asking node knows whether going upstream
/// itself could help.
pub(crate) const X_STOWAGE_ERROR_SOURCE: HeaderName =
    HeaderName::from_static("x-stowage-error-source");
