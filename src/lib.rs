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
pub mod upstream;

pub use metrics::Metrics;

/// White-box access for the integration tests (the `test-hooks` feature).
#[cfg(feature = "test-hooks")]
pub mod test_hooks {
    pub use crate::upstream::{Upstream, UpstreamError};
}
