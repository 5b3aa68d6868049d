//! stowage: a pull-through caching mirror for OCI / Docker registries.
//!
//! See ARCHITECTURE.md for the bird's-eye view, the code map and the
//! invariants.

pub mod admin;
pub mod blobs;
pub mod body;
pub mod config;
pub mod error;
pub mod front;
pub mod index;
pub mod manifests;
pub mod metrics;
pub mod oci;
pub mod ops;
pub mod pins;
pub mod range;
pub mod request_id;
pub mod routing;
pub mod server;
pub mod upstream;
pub mod warm;
