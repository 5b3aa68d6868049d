//! stowage: a pull-through caching mirror for OCI / Docker registries.
//!
//! See ARCHITECTURE.md for the bird's-eye view, the code map and the
//! invariants.

pub mod auth;
pub mod blobs;
pub mod body;
pub mod config;
pub mod error;
pub mod manifests;
pub mod range;
pub mod reference;
pub mod routing;
pub mod server;
pub mod upstream;
