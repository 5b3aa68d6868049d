//! The shared store's configuration (`[store]`).

use std::time::Duration;

use serde::Deserialize;

use crate::error::ConfigError;

/// A bucket every node shares: a second tier behind each node's disk.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Bucket and prefix: `s3://bucket/prefix`, `gs://bucket/prefix`,
    /// `az://container/prefix` (or the `https://` URLs of those services),
    /// `file:///shared/dir` (a directory every node mounts).
    pub url: String,

    /// S3-compatible services (Garage, MinIO, Ceph RGW): their endpoint,
    /// `http://garage:3900`. Path-style requests; plain HTTP allowed when
    /// the endpoint says `http://`. For Azure, the blob endpoint.
    #[serde(default)]
    pub endpoint: Option<String>,

    /// The region (S3; Garage's is usually `garage`).
    #[serde(default)]
    pub region: Option<String>,

    /// Uploads running at once (each streams from the stored file, holding
    /// at most three 5 MiB parts).
    #[serde(default = "default_upload_concurrency")]
    pub upload_concurrency: usize,

    /// Bound on the store's answer to a request (its headers; bodies are
    /// bounded by the upstream idle timeout like any fill source).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_upload_concurrency() -> usize {
    2
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl StoreConfig {
    /// Checks the URL's scheme and the limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |k: &str, m: String| ConfigError::invalid(format!("store.{k}"), m);
        let url = url::Url::parse(&self.url)
            .map_err(|e| invalid("url", format!("{:?}: {e}", self.url)))?;
        object_store::ObjectStoreScheme::parse(&url).map_err(|e| {
            invalid(
                "url",
                format!(
                    "{:?} is not a store URL (s3://, gs://, az://, file://): {e}",
                    self.url
                ),
            )
        })?;
        if let Some(e) = &self.endpoint {
            let u =
                url::Url::parse(e).map_err(|err| invalid("endpoint", format!("{e:?}: {err}")))?;
            if !matches!(u.scheme(), "http" | "https") {
                return Err(invalid("endpoint", format!("{e:?} must be an http(s) URL")));
            }
        }
        if self.upload_concurrency == 0 {
            return Err(invalid("upload_concurrency", "must be at least 1".into()));
        }
        if self.timeout.is_zero() {
            return Err(invalid("timeout", "must be more than zero".into()));
        }
        Ok(())
    }
}
