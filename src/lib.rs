//! stowage: a pull-through caching mirror for OCI / Docker registries.
//!
//! See ARCHITECTURE.md for the bird's-eye view, the code map and the
//! invariants.

mod admin;
mod body;
mod cache;
pub mod cli;
pub mod config;
mod error;
mod front;
mod http;
mod logging;
mod metrics;
mod oci;
mod server;
mod shutdown;
mod upstream;

pub use config::{Config, ConfigError};
pub use metrics::Metrics;
pub use server::{Server, ServerError};

#[cfg(feature = "test-hooks")]
pub mod test_hooks;
