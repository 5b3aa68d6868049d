//! Prefetch: when a client asks for an image manifest, start fills for its
//! config and layers at once, before the client asks for them.
//!
//! Docker downloads three layers at a time and skopeo a few; from a distant
//! registry each round costs latency. Starting every blob's fill when the
//! manifest is served turns a pull into about one round: the client's own
//! blob requests then join fills already running (one fill per digest, as
//! for any request).
//!
//! * An image manifest (`GET`, by tag or digest) prefetches its config and
//!   layers, in that order. `HEAD` prefetches nothing: tools that only check
//!   a tag for updates send `HEAD`.
//! * An index prefetches nothing by itself: the platform manifest the client
//!   then asks for does. With `prefetch.platforms`, the index prefetches
//!   those platforms' manifests and their blobs at once.
//! * Bounded: at most `max_concurrent` prefetch fills run at a time (process
//!   wide; the rest of a manifest's blobs wait for a slot, and a client
//!   asking meanwhile leads its own fill), at most [`MAX_QUEUED`] manifests
//!   wait for slots (more are not prefetched), and a blob is prefetched only
//!   into room under the cache's high watermark next to what is stored and
//!   reserved: a prefetch never makes anything be evicted, nor the cache pass
//!   its budget. Blobs stored or filling are skipped, and so are blobs whose
//!   descriptor has no size.
//! * Each manifest is looked at once per [`RECHECK`]: a manifest served at
//!   50k requests a second costs an atomic load, not a walk of its blobs.
//! * Prefetch fills use the upstream, repository and credentials
//!   ([`Caller`]) of the manifest request that triggered them, as that
//!   request's own blob requests would. With `auth = "passthrough"` that
//!   caller has just been let read the manifest by upstream (and so what it
//!   refers to, see `http/passthrough.rs`); upstream still answers each
//!   prefetch fill for that caller's credential, so nothing is fetched for a
//!   caller that it may not read. A platform manifest of an index is
//!   fetched with the caller's credentials and accept class too.
//!
//! What prefetching costs shows in the metrics: blobs and bytes prefetched,
//! prefetched bytes no client has asked for yet (a gauge), and prefetched
//! bytes evicted before any client asked (a counter): see the blob index.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::blob::{BlobStore, Prefetched};
use super::manifests::{Manifest, ManifestStore};
use crate::cache::private::Access;
use crate::cluster::Hop;
use crate::error::ConfigError;
use crate::oci::RepoName;
use crate::oci::manifest::AcceptClass;
use crate::upstream::Upstream;
use crate::upstream::caller::Caller;

/// Manifests whose blobs may wait for a prefetch slot at once.
pub(crate) const MAX_QUEUED: usize = 64;

/// How long after looking at a manifest prefetch looks at it again.
pub(crate) const RECHECK: Duration = Duration::from_secs(30);

/// How many levels of indexes below the manifest asked for a prefetch
/// follows (an index may list indexes; registries nest one level, if at
/// all). Each level is an upstream `GET` and a manifest of up to 4 MiB held
/// until the chain ends: without a bound, a chain of nested indexes
/// published upstream would drive both without end.
const MAX_NESTING: usize = 2;

/// `[prefetch]`, or `prefetch = false` to turn it off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefetchConfig {
    /// Whether manifests start fills for their blobs (default on).
    pub enabled: bool,
    /// Most prefetch fills running at once (default 16).
    pub max_concurrent: usize,
    /// Platforms (`os/arch` or `os/arch/variant`, e.g. `linux/amd64`)
    /// whose manifests and blobs an index prefetches at once.
    pub platforms: Vec<String>,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            enabled: true,
            max_concurrent: 16,
            platforms: Vec::new(),
        }
    }
}

/// The table form of `[prefetch]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    #[serde(default = "enabled_default")]
    enabled: bool,
    #[serde(default = "max_concurrent_default")]
    max_concurrent: usize,
    #[serde(default)]
    platforms: Vec<String>,
}

fn enabled_default() -> bool {
    true
}

fn max_concurrent_default() -> usize {
    PrefetchConfig::default().max_concurrent
}

impl<'de> Deserialize<'de> for PrefetchConfig {
    /// `prefetch = true|false` or a `[prefetch]` table (whose key errors
    /// stay precise, unlike an untagged enum's).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = PrefetchConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false or a [prefetch] table")
            }
            fn visit_bool<E: serde::de::Error>(self, enabled: bool) -> Result<Self::Value, E> {
                Ok(PrefetchConfig {
                    enabled,
                    ..PrefetchConfig::default()
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                let t = Table::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(PrefetchConfig {
                    enabled: t.enabled,
                    max_concurrent: t.max_concurrent,
                    platforms: t.platforms,
                })
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl PrefetchConfig {
    /// Checks the limit and the platform names.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=1024).contains(&self.max_concurrent) {
            return Err(ConfigError::invalid(
                "prefetch.max_concurrent",
                "must be between 1 and 1024",
            ));
        }
        for (i, p) in self.platforms.iter().enumerate() {
            let parts: Vec<&str> = p.split('/').collect();
            if !(2..=3).contains(&parts.len()) || parts.iter().any(|s| s.is_empty()) {
                return Err(ConfigError::invalid(
                    format!("prefetch.platforms[{i}]"),
                    format!("{p:?} is not os/arch or os/arch/variant (like linux/amd64)"),
                ));
            }
        }
        Ok(())
    }

    /// Whether `platform` (as [`crate::oci::manifest::ChildRef`] names it)
    /// is configured. `os/arch` also matches any variant of it.
    fn wants(&self, platform: &str) -> bool {
        self.platforms
            .iter()
            .any(|p| crate::oci::manifest::platform_matches(p, platform))
    }
}

/// Starts prefetch fills. Share it in an `Arc`.
pub(crate) struct Prefetcher {
    config: PrefetchConfig,
    blobs: Arc<BlobStore>,
    manifests: Arc<ManifestStore>,
    /// Places for prefetch fills running at once.
    slots: Arc<Semaphore>,
    /// Places for manifests waiting for slots.
    queued: Arc<Semaphore>,
    /// When the process started: manifests remember when they were looked
    /// at as milliseconds since then.
    epoch: Instant,
    /// Stops prefetches waiting for slots at shutdown (the fills they
    /// started run on the fill tracker, which shutdown waits for).
    stop: CancellationToken,
}

impl Prefetcher {
    /// A prefetcher over the two caches; its drivers stop with `stop`.
    pub(crate) fn new(
        config: PrefetchConfig,
        blobs: Arc<BlobStore>,
        manifests: Arc<ManifestStore>,
        stop: CancellationToken,
    ) -> Prefetcher {
        Prefetcher {
            slots: Arc::new(Semaphore::new(config.max_concurrent)),
            queued: Arc::new(Semaphore::new(MAX_QUEUED)),
            config,
            blobs,
            manifests,
            epoch: Instant::now(),
            stop,
        }
    }

    /// A client (`caller`, of accept `class`) got `m` (with `GET`) from
    /// `repo` of `upstream`: prefetch what it refers to, in the background.
    /// Cheap when there is nothing to do (off, or looked at less than
    /// [`RECHECK`] ago).
    pub(crate) fn on_manifest(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        m: &Arc<Manifest>,
        class: AcceptClass,
        caller: &Caller,
    ) {
        if !self.config.enabled || !self.due(m) {
            return;
        }
        let d = m.descriptors();
        if d.blobs.is_empty() && (d.children.is_empty() || self.config.platforms.is_empty()) {
            return;
        }
        let Ok(queued) = self.queued.clone().try_acquire_owned() else {
            tracing::debug!(manifest = %m.digest, "prefetch queue full: not prefetching");
            return;
        };
        let this = self.clone();
        let upstream = upstream.clone();
        let repo = repo.clone();
        let m = m.clone();
        let caller = caller.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let _queued = queued;
            stop.run_until_cancelled(this.run(&upstream, &repo, &m, class, &caller, 0))
                .await;
        });
    }

    /// Whether `m` is due a look, marking it looked at now if so.
    fn due(&self, m: &Manifest) -> bool {
        // 0 means never; add 1 so the first millisecond is not "never".
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let last = m.prefetched_at.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < RECHECK.as_millis() as u64 {
            return false;
        }
        m.prefetched_at
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// Prefetches the blobs of an image manifest, or the configured
    /// platforms' manifests (and so their blobs) of an index, `depth`
    /// indexes below the manifest asked for (at most [`MAX_NESTING`]).
    async fn run(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        m: &Manifest,
        class: AcceptClass,
        caller: &Caller,
        depth: usize,
    ) {
        let d = m.descriptors();
        for child in d.children.iter().filter(|_| depth < MAX_NESTING) {
            if !child
                .platform
                .as_deref()
                .is_some_and(|p| self.config.wants(p))
            {
                continue;
            }
            // What a request of this caller for the child would be served:
            // held private content only once upstream confirms it, so a
            // passthrough caller's prefetch fetches the child itself or
            // skips it.
            let access = if caller.credential().is_some() {
                Access::Own
            } else {
                Access::Public
            };
            match self
                .manifests
                .by_digest(
                    upstream,
                    repo,
                    &child.digest,
                    class,
                    caller,
                    Hop::Client,
                    access,
                )
                .await
            {
                Ok(None) => {}
                Ok(Some((child, _))) => {
                    if self.due(&child) {
                        Box::pin(self.run(upstream, repo, &child, class, caller, depth + 1)).await;
                    }
                }
                Err(e) => {
                    tracing::debug!(manifest = %child.digest, error = %e.report(), "prefetching a platform manifest failed")
                }
            }
        }
        for blob in &d.blobs {
            let Some(size) = blob.size else { continue };
            if self.blobs.index().contains(&blob.digest) {
                continue;
            }
            let Ok(slot) = self.slots.clone().acquire_owned().await else {
                return;
            };
            match self
                .blobs
                .prefetch(upstream, repo, &blob.digest, size, slot, caller.clone())
            {
                Ok(Prefetched::Started) => {
                    tracing::debug!(blob = %blob.digest, size, "prefetching")
                }
                Ok(Prefetched::Skipped) => {}
                Ok(Prefetched::NoRoom) => {
                    tracing::debug!(blob = %blob.digest, size, "no room under the high watermark: not prefetching")
                }
                Err(e) => {
                    tracing::debug!(blob = %blob.digest, error = %e.report(), "prefetch failed")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<PrefetchConfig, String> {
        #[derive(Deserialize)]
        struct Doc {
            prefetch: PrefetchConfig,
        }
        toml::from_str::<Doc>(toml_text)
            .map(|d| d.prefetch)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn bool_or_table() {
        assert!(!parse("prefetch = false").unwrap().enabled);
        assert_eq!(parse("prefetch = true").unwrap(), PrefetchConfig::default());
        let c = parse("[prefetch]\nmax_concurrent = 4\nplatforms = [\"linux/arm64\"]").unwrap();
        assert!(c.enabled);
        assert_eq!(c.max_concurrent, 4);
        let e = parse("[prefetch]\nmax_concurent = 4").unwrap_err();
        assert!(e.contains("max_concurent"), "{e}");
        assert!(parse("prefetch = 3").is_err());
    }

    #[test]
    fn validation_and_platforms() {
        let mut c = PrefetchConfig {
            max_concurrent: 0,
            ..PrefetchConfig::default()
        };
        assert!(c.validate().is_err());
        c.max_concurrent = 2;
        c.platforms = vec!["linux".into()];
        assert!(c.validate().is_err());
        c.platforms = vec!["linux/arm64".into(), "linux/arm/v7".into()];
        c.validate().unwrap();
        assert!(c.wants("linux/arm64"));
        assert!(c.wants("linux/arm64/v8"));
        assert!(c.wants("linux/arm/v7"));
        assert!(!c.wants("linux/arm/v6"));
        assert!(!c.wants("linux/arm64x"));
        assert!(!c.wants("linux/amd64"));
    }
}
