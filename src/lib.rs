//! stowage: a pull-through caching mirror for OCI / Docker registries.
//!
//! See ARCHITECTURE.md for the bird's-eye view and the invariants.

pub mod auth;
pub mod config;
pub mod upstream;
