//! stowage: a pull-through caching mirror for OCI / Docker registries.
//!
//! See ARCHITECTURE.md for the bird's-eye view, the code map and the
//! invariants.

pub mod admin;
pub mod body;
pub mod cache;
pub mod cli;
pub mod config;
pub mod error;
pub mod front;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod oci;
pub mod server;
pub mod shutdown;
pub mod upstream;

pub use metrics::Metrics;

/// White-box access for the integration tests (the `test-hooks` feature).
#[cfg(feature = "test-hooks")]
pub mod test_hooks {
    use std::path::{Path, PathBuf};

    use crate::cache::layout::Layout;
    use crate::oci::Digest;
    pub use crate::upstream::{Upstream, UpstreamError};

    /// Where the cache at `cache_dir` keeps the verified blob `digest`
    /// (`sha256:…`).
    pub fn blob_path(cache_dir: &Path, digest: &str) -> PathBuf {
        let digest = Digest::parse(digest).expect("a valid digest");
        Layout::new(cache_dir).blob(&digest)
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
}
