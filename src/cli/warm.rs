//! `stowage warm IMAGE...`: pulls images through a running stowage so that
//! their blobs are cached before anyone needs them.
//!
//! It talks to the mirror like any client (through `Upstream`, so TLS, a
//! custom CA and the mirror's own credentials work), resolves tags and
//! indexes (all platforms, or the ones asked for), then downloads every
//! blob, verifying its digest, with a progress bar per blob. The mirror's
//! `x-stowage-cache` header tells what was already cached.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::BodyExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::oci::headers::X_STOWAGE_CACHE;
use crate::oci::manifest::{self, accept_headers, refs_of};
use crate::oci::{Digest, Hasher, ImageRef};
use crate::upstream::Upstream;
use crate::upstream::config::{UpstreamConfig, docker_hub};

/// What to warm and how.
#[derive(Debug, Clone)]
pub struct WarmOptions {
    /// Base URL of the mirror (`http://127.0.0.1:5000`).
    pub mirror: String,
    /// Only these platforms of an index (`linux/amd64`, `linux/arm64/v8`);
    /// empty means all.
    pub platforms: Vec<String>,
    /// Extra CA certificates to trust for an HTTPS mirror.
    pub ca_file: Option<PathBuf>,
    /// Credentials for a mirror with client authentication.
    pub username: Option<String>,
    /// Password for `username`.
    pub password: Option<String>,
    /// Blobs downloaded at once.
    pub concurrency: usize,
    /// Draw progress bars (when stderr is a terminal).
    pub progress: bool,
}

/// The outcome of a warm run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct WarmSummary {
    /// Manifests resolved.
    pub(crate) manifests: usize,
    /// Distinct blobs.
    pub(crate) blobs: usize,
    /// Blobs the mirror already had.
    pub(crate) blobs_cached: usize,
    /// Bytes the mirror had to fetch from upstream.
    pub(crate) bytes_fetched: u64,
    /// Bytes the mirror already had.
    pub(crate) bytes_cached: u64,
}

impl std::fmt::Display for WarmSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} manifests, {} blobs: {} fetched from upstream ({}), {} already cached ({})",
            self.manifests,
            self.blobs,
            self.blobs - self.blobs_cached,
            crate::cli::ops::human_bytes(self.bytes_fetched),
            self.blobs_cached,
            crate::cli::ops::human_bytes(self.bytes_cached),
        )
    }
}

/// Pulls `images` through the mirror. Fails on the first image or blob
/// that cannot be fetched or does not verify.
pub(crate) async fn warm(opts: &WarmOptions, images: &[String]) -> Result<WarmSummary, String> {
    let mirror = Upstream::new(&UpstreamConfig {
        host: "mirror".into(),
        url: opts.mirror.trim_end_matches('/').to_string(),
        library_prefix: false,
        username: opts.username.clone(),
        password: opts.password.clone(),
        ca_file: opts.ca_file.clone(),
        timeout: Duration::from_secs(60),
        ..docker_hub()
    })
    .map_err(|e| format!("mirror {}: {e}", opts.mirror))?;
    let mirror = Arc::new(mirror);
    let mut summary = WarmSummary::default();
    let mut blobs: BTreeSet<(String, Digest)> = BTreeSet::new();
    for image in images {
        summary.manifests += resolve(&mirror, image, &opts.platforms, &mut blobs).await?;
    }
    summary.blobs = blobs.len();
    for got in download(&mirror, blobs, opts).await {
        match got? {
            Got::Cached(bytes) => {
                summary.blobs_cached += 1;
                summary.bytes_cached += bytes;
            }
            Got::Fetched(bytes) => summary.bytes_fetched += bytes,
        }
    }
    Ok(summary)
}

/// Resolves `image` (and, for an index, the platforms asked for) through
/// the mirror, adding its blobs to `blobs`. Returns how many manifests it
/// read.
async fn resolve(
    mirror: &Upstream,
    image: &str,
    platforms: &[String],
    blobs: &mut BTreeSet<(String, Digest)>,
) -> Result<usize, String> {
    let r = ImageRef::parse(image).map_err(|e| format!("{image}: {}", e.message))?;
    let name = match &r.host {
        Some(h) => format!("{h}/{}", r.repo),
        None => r.repo.to_string(),
    };
    let top = get_manifest(mirror, &name, &r.reference.to_string()).await?;
    let refs = refs_of(&top);
    for b in refs.blobs {
        blobs.insert((name.clone(), b));
    }
    let children = select_platforms(&top, platforms);
    if !refs.manifests.is_empty() && children.is_empty() {
        return Err(format!("{image}: no manifest for platform {platforms:?}"));
    }
    for child in &children {
        let body = get_manifest(mirror, &name, &child.to_string()).await?;
        for b in refs_of(&body).blobs {
            blobs.insert((name.clone(), b));
        }
    }
    Ok(1 + children.len())
}

/// Downloads `blobs` through the mirror, `opts.concurrency` at a time.
async fn download(
    mirror: &Arc<Upstream>,
    blobs: BTreeSet<(String, Digest)>,
    opts: &WarmOptions,
) -> Vec<Result<Got, String>> {
    let bars = MultiProgress::new();
    if !opts.progress {
        bars.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    futures_util::stream::iter(blobs)
        .map(|(name, digest)| {
            let mirror = mirror.clone();
            let bars = bars.clone();
            async move { fetch_blob(&mirror, &name, &digest, &bars).await }
        })
        .buffer_unordered(opts.concurrency.max(1))
        .collect()
        .await
}

/// What the mirror did for one blob (per its `x-stowage-cache` header),
/// and the blob's size.
enum Got {
    /// It had the blob cached.
    Cached(u64),
    /// It fetched the blob from upstream.
    Fetched(u64),
}

async fn get_manifest(mirror: &Upstream, name: &str, reference: &str) -> Result<Vec<u8>, String> {
    let what = format!("{name}:{reference}");
    let resp = mirror
        .send(
            Method::GET,
            name,
            &format!("manifests/{reference}"),
            accept_headers(),
        )
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{what}: {e}"))?
        .to_bytes();
    if status != StatusCode::OK {
        return Err(format!(
            "{what}: mirror answered {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    Ok(body.to_vec())
}

/// The child manifests of an index that match `platforms` (all when empty).
fn select_platforms(index: &[u8], platforms: &[String]) -> Vec<Digest> {
    manifest::descriptors_of(index)
        .children
        .into_iter()
        .filter(|c| {
            platforms.is_empty()
                || c.platform.as_deref().is_some_and(|p| {
                    platforms
                        .iter()
                        .any(|want| manifest::platform_matches(want, p))
                })
        })
        .map(|c| c.digest)
        .collect()
}

/// Downloads one blob through the mirror, verifying it.
async fn fetch_blob(
    mirror: &Upstream,
    name: &str,
    digest: &Digest,
    bars: &MultiProgress,
) -> Result<Got, String> {
    let what = format!("{name}@{digest}");
    let resp = mirror
        .send(
            Method::GET,
            name,
            &format!("blobs/{digest}"),
            HeaderMap::new(),
        )
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    if resp.status() != StatusCode::OK {
        return Err(format!("{what}: mirror answered {}", resp.status()));
    }
    let cached = resp
        .headers()
        .get(X_STOWAGE_CACHE)
        .is_some_and(|v| v.as_bytes() == b"hit");
    let len = resp
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let bar = bars.add(match len {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::no_length(),
    });
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(format!("{:.19}", digest.to_string()));
    let mut body = resp.into_body();
    let mut hasher = Hasher::new(digest.algorithm());
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("{what}: transfer failed: {e}"))?;
        if let Ok(data) = frame.into_data() {
            hasher.update(&data);
            n += data.len() as u64;
            bar.inc(data.len() as u64);
        }
    }
    if &hasher.finish() != digest {
        bar.abandon_with_message("digest mismatch");
        return Err(format!("{what}: downloaded bytes do not match the digest"));
    }
    bar.finish_with_message(if cached { "cached" } else { "fetched" });
    Ok(if cached {
        Got::Cached(n)
    } else {
        Got::Fetched(n)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_selection() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let index = format!(
            r#"{{"manifests":[
              {{"digest":"{a}","platform":{{"os":"linux","architecture":"amd64"}}}},
              {{"digest":"{b}","platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}}]}}"#
        );
        assert_eq!(select_platforms(index.as_bytes(), &[]).len(), 2);
        let one = select_platforms(index.as_bytes(), &["linux/arm64".into()]);
        assert_eq!(one, vec![Digest::parse(&b).unwrap()]);
        let one = select_platforms(index.as_bytes(), &["linux/arm64/v8".into()]);
        assert_eq!(one.len(), 1);
        assert!(select_platforms(index.as_bytes(), &["windows/amd64".into()]).is_empty());
    }
}
