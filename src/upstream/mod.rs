//! Requests to upstream registries: the pooled client, authentication
//! (challenges, tokens), redirects and errors.

pub mod auth;
mod client;
pub mod config;
mod error;

pub use client::*;
pub use error::UpstreamError;
