//! stowage: a pull-through caching mirror for OCI / Docker registries.
//!
//! See ARCHITECTURE.md for the bird's-eye view, the code map, the
//! invariants and the entry points.
//!
//! # Layout
//!
//! ```text
//! main.rs        clap only; hands off to cli
//! cli/           subcommand handlers (run, check-config, warm, cache stats|ls|purge)
//! server.rs      binds the listeners, opens the caches, accept loop, graceful shutdown
//! shutdown.rs    the stop token of background tasks, the tracker of fills
//! config.rs      the whole configuration: TOML, flags, each section's validation
//! admin.rs       /metrics, /healthz, /readyz
//! http/          where requests enter: routes, OCI errors, upstream routing, request log
//! cache/         layout on disk, journal, blob index, blob store and fills (their sources:
//!                cluster owner, shared store, upstream), manifests (asking their owner), pins
//! cluster/       peers, liveness, rendezvous owners, peer requests, the cluster secret
//! bucket/        the shared store (object_store): reads, background uploads, health
//! front/         connection limits, TLS, client authentication, reloads, zero-copy sends
//! upstream/      the client of upstream registries: auth, challenges, redirects, errors
//! logging.rs     log configuration and set-up
//! error.rs       the internal error (kind, source, cause) and ConfigError
//! oci/           the OCI vocabulary: digests, names, routes, manifests, header names
//! metrics.rs     Prometheus metrics and their label vocabulary
//! body.rs        the response body type
//! ```
//!
//! # Dependency rule
//!
//! Dependencies point one way, down this list of ranks; a module uses only
//! modules of a lower rank, so there are no cycles (`tests/layout.rs`
//! checks every `crate::` reference):
//!
//! ```text
//! 0  oci, metrics, body, shutdown    leaves
//! 1  error
//! 2  upstream, front, logging,        know nothing of each other
//!    cluster, bucket
//! 3  cache
//! 4  http, admin
//! 5  config, test_hooks
//! 6  server, fuzzing
//! 7  cli
//! 8  main
//! ```
//!
//! Modules are private; the public surface is what `main.rs` and the
//! black-box tests need ([`Config`], [`Server`], [`Metrics`], [`cli`]).
//! White-box hooks for the integration tests sit behind the `test-hooks`
//! feature, the fuzz targets' entry points (`fuzz/`) behind `fuzzing`.

mod admin;
mod body;
mod bucket;
mod cache;
pub mod cli;
mod cluster;
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

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
