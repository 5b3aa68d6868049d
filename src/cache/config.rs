//! The blob cache's configuration (`[cache]`): budget, watermarks, the
//! manifest limits and pinned images, with defaults and validation.

use std::time::Duration;

use serde::Deserialize;

use crate::error::ConfigError;
use crate::oci::ImageRef;

/// The blob cache's budget and what it must keep.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Most bytes of blobs kept on disk (`"50GiB"`, `"500 MB"` or a number
    /// of bytes). Fills in flight count against it.
    #[serde(default = "default_max_size")]
    pub max_size: bytesize::ByteSize,

    /// The largest blob cached (at most `max_size`, which is the default).
    /// A blob announced larger is streamed to its clients without being
    /// cached; one without `Content-Length` that grows larger is cut.
    #[serde(default)]
    pub max_blob_size: Option<bytesize::ByteSize>,

    /// Fraction of `max_size` above which least-recently-used blobs are
    /// evicted.
    #[serde(default = "default_high_watermark")]
    pub high_watermark: f64,

    /// Fraction of `max_size` that eviction brings usage down to.
    #[serde(default = "default_low_watermark")]
    pub low_watermark: f64,

    /// Most manifests kept on disk (they are outside the blob budget); the
    /// least recently written are removed beyond this or
    /// `max_manifest_bytes`.
    #[serde(default = "default_max_manifests")]
    pub max_manifests: usize,

    /// Most bytes of manifest files on disk, outside `max_size` (a
    /// manifest may be up to 4 MiB).
    #[serde(default = "default_max_manifest_bytes")]
    pub max_manifest_bytes: bytesize::ByteSize,

    /// Images whose blobs are never evicted, as `host/repo:tag` or
    /// `host/repo@digest` (`docker.io/library/postgres:16`). A name without
    /// a host means the default upstream.
    #[serde(default)]
    pub pin: Vec<String>,

    /// How often pinned tags are resolved again.
    #[serde(default = "default_pin_refresh", with = "humantime_serde")]
    pub pin_refresh: Duration,

    /// Downloads that go on after every client reading them has left (a
    /// cancelled pull), so that a retry finds the blob cached. Past this
    /// many, a download nobody reads is stopped. 0 stops every download
    /// its clients leave. Prefetches are bounded by
    /// `prefetch.max_concurrent` instead.
    #[serde(default = "default_max_detached_fills")]
    pub max_detached_fills: usize,

    /// How long one pass of the scrubber, which hashes every stored blob
    /// again to find those damaged on disk, should take; a pass starts
    /// this often. `"0s"` turns it off; otherwise at least a second.
    #[serde(default = "default_scrub_interval", with = "humantime_serde")]
    pub scrub_interval: Duration,

    /// The most bytes per second the scrubber reads (a pass of a small
    /// cache reads at 1 MiB/s, finishing early).
    #[serde(default = "default_scrub_max_rate")]
    pub scrub_max_rate: bytesize::ByteSize,
}

fn default_max_size() -> bytesize::ByteSize {
    bytesize::ByteSize::gib(20)
}

fn default_high_watermark() -> f64 {
    0.95
}

fn default_low_watermark() -> f64 {
    0.85
}

fn default_max_manifests() -> usize {
    100_000
}

fn default_max_manifest_bytes() -> bytesize::ByteSize {
    bytesize::ByteSize::gib(1)
}

fn default_pin_refresh() -> Duration {
    Duration::from_secs(600)
}

fn default_max_detached_fills() -> usize {
    16
}

fn default_scrub_interval() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

fn default_scrub_max_rate() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(16)
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_size: default_max_size(),
            max_blob_size: None,
            high_watermark: default_high_watermark(),
            low_watermark: default_low_watermark(),
            max_manifests: default_max_manifests(),
            max_manifest_bytes: default_max_manifest_bytes(),
            pin: Vec::new(),
            pin_refresh: default_pin_refresh(),
            max_detached_fills: default_max_detached_fills(),
            scrub_interval: default_scrub_interval(),
            scrub_max_rate: default_scrub_max_rate(),
        }
    }
}

impl CacheConfig {
    /// The largest blob cached, in bytes.
    pub fn max_blob_bytes(&self) -> u64 {
        self.max_blob_size.unwrap_or(self.max_size).as_u64()
    }

    /// Checks the budget, watermarks and limits (the pinned images are
    /// checked by `parse_pin`, as the whole configuration knows which
    /// registry hosts exist).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_size.as_u64() == 0 {
            return Err(ConfigError::invalid(
                "cache.max_size",
                "must be more than zero",
            ));
        }
        if let Some(max_blob) = self.max_blob_size
            && (max_blob.as_u64() == 0 || max_blob > self.max_size)
        {
            return Err(ConfigError::invalid(
                "cache.max_blob_size",
                "must be more than zero and at most cache.max_size",
            ));
        }
        if !(self.high_watermark > 0.0 && self.high_watermark <= 1.0) {
            return Err(ConfigError::invalid(
                "cache.high_watermark",
                "must be in (0, 1]",
            ));
        }
        if !(self.low_watermark > 0.0 && self.low_watermark <= self.high_watermark) {
            return Err(ConfigError::invalid(
                "cache.low_watermark",
                "must be more than 0 and at most cache.high_watermark",
            ));
        }
        if self.max_manifests == 0 {
            return Err(ConfigError::invalid(
                "cache.max_manifests",
                "must be more than zero",
            ));
        }
        if self.max_manifest_bytes.as_u64() < crate::oci::manifest::MAX_MANIFEST as u64 {
            return Err(ConfigError::invalid(
                "cache.max_manifest_bytes",
                "must be at least 4MiB (the largest manifest accepted)",
            ));
        }
        if !self.scrub_interval.is_zero() && self.scrub_interval < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "cache.scrub_interval",
                "must be \"0s\" (off) or at least 1s",
            ));
        }
        if self.scrub_max_rate.as_u64() == 0 {
            return Err(ConfigError::invalid(
                "cache.scrub_max_rate",
                "must be more than zero",
            ));
        }
        if self.pin_refresh.is_zero() {
            return Err(ConfigError::invalid(
                "cache.pin_refresh",
                "must be more than zero",
            ));
        }
        Ok(())
    }

    /// The pinned images, parsed.
    pub(crate) fn pins(&self) -> Result<Vec<ImageRef>, ConfigError> {
        self.pin
            .iter()
            .enumerate()
            .map(|(i, image)| parse_pin(i, image))
            .collect()
    }
}

/// Parses `cache.pin[i]`.
pub(crate) fn parse_pin(i: usize, image: &str) -> Result<ImageRef, ConfigError> {
    ImageRef::parse(image)
        .map_err(|e| ConfigError::invalid(format!("cache.pin[{i}]"), e.to_string()))
}
