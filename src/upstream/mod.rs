//! Requests to upstream registries: the pooled client (`client.rs`),
//! authentication (`auth.rs`: tokens and Basic credentials; `challenge.rs`:
//! `WWW-Authenticate` parsing; `caller.rs`: whose credentials, and
//! passthrough of callers' own), redirects (`redirect.rs`), errors
//! (`error.rs`) and each upstream's configuration (`config.rs`).

pub(crate) mod auth;
pub(crate) mod caller;
mod challenge;
mod client;
pub(crate) mod config;
mod error;
mod redirect;

#[cfg(feature = "fuzzing")]
pub(crate) use challenge::parse_challenges;
pub(crate) use client::is_idle_timeout;
pub use client::{Upstream, UpstreamBody};
#[cfg(feature = "test-hooks")]
pub use error::UpstreamError;
