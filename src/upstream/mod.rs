//! Requests to upstream registries: the pooled client (`client.rs`),
//! authentication (`auth.rs`: tokens and Basic credentials; `challenge.rs`:
//! `WWW-Authenticate` parsing), redirects (`redirect.rs`), errors
//! (`error.rs`) and each upstream's configuration (`config.rs`).

pub mod auth;
mod challenge;
mod client;
pub mod config;
mod error;
mod redirect;

pub use client::Upstream;
pub use error::UpstreamError;
