//! The shared store: a bucket every node of a cluster uses as a second
//! tier behind its own disk, through the `object_store` crate (S3 and the
//! S3-compatible Garage, MinIO and Ceph RGW; GCS; Azure; a shared
//! directory).
//!
//! * Reads: before going upstream, the owner of a blob (or of a manifest by
//!   digest) looks here; a blob comes back as a stream that the fill hashes
//!   and verifies like upstream's, so a damaged object is refused, never
//!   served. A node with an empty disk serves what any node fetched.
//! * Writes: after a verified upstream fetch the owner uploads in the
//!   background (`upload.rs`): queued, a few at a time, streamed from the
//!   stored file (multipart when large), retried with backoff, logged,
//!   never in a client's way.
//! * Keys are content-addressed, `<prefix>/blobs/<alg>/<hex>` and
//!   `<prefix>/manifests/<alg>/<hex>` (a manifest object holds its media
//!   type line, then its bytes, as on disk), so concurrent identical writes
//!   are harmless; no conditional request is used (Garage ignores
//!   `If-None-Match`). Tag records, `<prefix>/tags/<host>/<repo>/_tags/<tag>`
//!   (a digest), are hints a node confirms upstream with `HEAD` before use,
//!   so a stale or racing record does no harm.
//! * The store failing degrades to a single node's behaviour (disk and
//!   upstream): reads are skipped for a few seconds after a failure, a
//!   background check notices when it is back, `stowage_store_up` and
//!   `/readyz`'s body say so. It never makes a node unready: a store outage
//!   must not take every node out of a load balancer at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use object_store::path::Path as Key;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt as _,
    ObjectStoreScheme, RetryConfig,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub(crate) mod config;
mod upload;

pub(crate) use config::StoreConfig;

use crate::error::ConfigError;
use crate::metrics::{CacheKind, Metrics, StoreResult};
use crate::oci::Digest;
use crate::oci::manifest::MAX_MANIFEST;
use upload::{HeldBytes, Job};

/// Largest manifest object read from the store: a manifest no larger than
/// one from upstream may be, and its media type line.
const MAX_MANIFEST_OBJECT: u64 = MAX_MANIFEST as u64 + 1024;

/// Largest tag record read from the store (a digest and a newline).
const MAX_TAG_OBJECT: u64 = 1024;

/// After a failure, reads skip the store for this long (and the background
/// check tries it this often).
const DOWN_SKIP: Duration = Duration::from_secs(5);

/// Uploads waiting at most; more are dropped (and counted).
const UPLOAD_QUEUE: usize = 1024;

/// Bytes of manifest uploads held in memory at most (waiting or being
/// sent); more are dropped (and counted). A manifest may be 4 MiB.
const UPLOAD_MANIFEST_BYTES: u64 = 64 * 1024 * 1024;

/// Why a read of the store gave nothing.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BucketError {
    /// The store failed (or did not answer in time).
    #[error("shared store {store}: {message}")]
    Failed {
        /// The configured URL.
        store: String,
        /// What happened.
        message: String,
    },
    /// Skipped: the store failed moments ago.
    #[error("shared store {0} is down; not asked")]
    Down(String),
}

/// A blob in the store, opened from an offset.
pub(crate) struct StoredObject {
    /// Its bytes from the offset asked for.
    pub(crate) body: BoxStream<'static, Result<Bytes, object_store::Error>>,
    /// Its whole size.
    pub(crate) size: u64,
}

/// Health of the store as the last requests saw it.
struct Health {
    up: AtomicBool,
    /// When reads may try again, and the last failure.
    down: Mutex<Option<(Instant, String)>>,
}

/// The shared store.
pub(crate) struct Bucket {
    /// The configured URL (for logs, metrics and `/readyz`).
    name: String,
    /// For reads: no overall timeout (a blob streams as long as it takes),
    /// quick retries.
    reader: Arc<dyn ObjectStore>,
    /// For writes: a timeout per request (one part at most), more retries.
    writer: Arc<dyn ObjectStore>,
    prefix: Key,
    timeout: Duration,
    metrics: Arc<Metrics>,
    health: Health,
    queue: mpsc::Sender<Job>,
    /// Taken by [`Bucket::spawn`].
    jobs: Mutex<Option<mpsc::Receiver<Job>>>,
    /// Bytes of manifest uploads held (see [`UPLOAD_MANIFEST_BYTES`]).
    manifest_bytes: Arc<AtomicU64>,
    concurrency: usize,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bucket")
            .field("store", &self.name)
            .finish_non_exhaustive()
    }
}

impl Bucket {
    /// The store of `cfg` (credentials from the provider's usual
    /// environment variables: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `GOOGLE_APPLICATION_CREDENTIALS`, `AZURE_STORAGE_ACCOUNT_KEY`, ...).
    pub(crate) fn new(cfg: &StoreConfig, metrics: Arc<Metrics>) -> Result<Bucket, ConfigError> {
        cfg.validate()?;
        let invalid = |k: &str, m: String| ConfigError::invalid(format!("store.{k}"), m);
        let url = url::Url::parse(&cfg.url).map_err(|e| invalid("url", e.to_string()))?;
        let (scheme, prefix) =
            ObjectStoreScheme::parse(&url).map_err(|e| invalid("url", e.to_string()))?;
        let reads = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout_disabled();
        let writes = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(cfg.timeout.max(Duration::from_secs(60)));
        let quick = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(1),
                base: 2.0,
            },
            max_retries: 1,
            retry_timeout: cfg.timeout,
        };
        let patient = RetryConfig {
            max_retries: 3,
            retry_timeout: Duration::from_secs(60),
            ..quick.clone()
        };
        let build = |options: ClientOptions, retry: RetryConfig| {
            open(cfg, &url, &scheme, options, retry).map_err(|e| invalid("url", e))
        };
        let (reader, writer, prefix) = match &scheme {
            ObjectStoreScheme::Local => {
                let dir = url
                    .to_file_path()
                    .map_err(|()| invalid("url", format!("{:?}: not a local path", cfg.url)))?;
                std::fs::create_dir_all(&dir).map_err(|source| ConfigError::Read {
                    path: dir.clone(),
                    source,
                })?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| invalid("url", e.to_string()))?;
                let fs: Arc<dyn ObjectStore> = Arc::new(fs);
                (fs.clone(), fs, Key::default())
            }
            _ => (build(reads, quick)?, build(writes, patient)?, prefix),
        };
        let (queue, jobs) = mpsc::channel(UPLOAD_QUEUE);
        let bucket = Bucket {
            name: cfg.url.clone(),
            reader,
            writer,
            prefix,
            timeout: cfg.timeout,
            metrics,
            health: Health {
                up: AtomicBool::new(true),
                down: Mutex::new(None),
            },
            queue,
            jobs: Mutex::new(Some(jobs)),
            manifest_bytes: Arc::new(AtomicU64::new(0)),
            concurrency: cfg.upload_concurrency,
        };
        bucket.metrics.set_store_up(&bucket.name, true);
        Ok(bucket)
    }

    /// The configured URL.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    fn key(&self, kind: &str, digest: &Digest) -> Key {
        self.prefix
            .clone()
            .join(kind)
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }

    /// Whether the store answered last time (reads are skipped for a few
    /// seconds after a failure).
    pub(crate) fn is_up(&self) -> bool {
        self.health.up.load(Ordering::Relaxed)
    }

    /// A line for `/readyz`: the store, and its trouble if it has any.
    pub(crate) fn status(&self) -> String {
        let down = self.health.down.lock().unwrap_or_else(|p| p.into_inner());
        match &*down {
            None => format!("store: {} up", self.name),
            Some((_, why)) => format!(
                "store: {} DOWN (serving from disk and upstream): {why}",
                self.name
            ),
        }
    }

    /// Records a failure: reads skip the store for a while.
    fn failed(&self, why: &str) {
        let was_up = self.health.up.swap(false, Ordering::Relaxed);
        *self.health.down.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now() + DOWN_SKIP, why.to_string()));
        if was_up {
            tracing::warn!(store = %self.name, error = %why,
                "shared store failing: serving from disk and upstream until it answers");
            self.metrics.set_store_up(&self.name, false);
        }
    }

    /// Records a success.
    fn succeeded(&self) {
        if !self.health.up.swap(true, Ordering::Relaxed) {
            *self.health.down.lock().unwrap_or_else(|p| p.into_inner()) = None;
            tracing::info!(store = %self.name, "shared store answers again");
            self.metrics.set_store_up(&self.name, true);
        }
    }

    /// Whether reads should skip the store now.
    fn skip(&self) -> bool {
        if self.is_up() {
            return false;
        }
        let down = self.health.down.lock().unwrap_or_else(|p| p.into_inner());
        down.as_ref()
            .is_some_and(|(until, _)| Instant::now() < *until)
    }

    fn error(&self, message: String) -> BucketError {
        BucketError::Failed {
            store: self.name.clone(),
            message,
        }
    }

    /// Opens `key` from byte `from` on: `None` when it is not there.
    async fn get(
        &self,
        key: &Key,
        from: u64,
        kind: CacheKind,
    ) -> Result<Option<StoredObject>, BucketError> {
        if self.skip() {
            self.metrics.store_request(kind, StoreResult::Error);
            return Err(BucketError::Down(self.name.clone()));
        }
        let options = GetOptions {
            range: (from > 0).then_some(GetRange::Offset(from)),
            ..GetOptions::default()
        };
        let got = tokio::time::timeout(self.timeout, self.reader.get_opts(key, options)).await;
        match got {
            Ok(Ok(r)) => {
                self.succeeded();
                self.metrics.store_request(kind, StoreResult::Hit);
                let size = r.meta.size;
                Ok(Some(StoredObject {
                    body: r.into_stream(),
                    size,
                }))
            }
            Ok(Err(object_store::Error::NotFound { .. })) => {
                self.succeeded();
                self.metrics.store_request(kind, StoreResult::Miss);
                Ok(None)
            }
            Ok(Err(e)) => {
                let why = crate::error::chain(&e);
                self.failed(&why);
                self.metrics.store_request(kind, StoreResult::Error);
                Err(self.error(why))
            }
            Err(_) => {
                let why = format!("no answer within {:?}", self.timeout);
                self.failed(&why);
                self.metrics.store_request(kind, StoreResult::Error);
                Err(self.error(why))
            }
        }
    }

    /// Blob `digest` from byte `from` on, or `None` when the store does not
    /// have it. The caller verifies what it reads.
    pub(crate) async fn blob(
        &self,
        digest: &Digest,
        from: u64,
    ) -> Result<Option<StoredObject>, BucketError> {
        self.get(&self.key("blobs", digest), from, CacheKind::Blob)
            .await
    }

    /// The size of blob `digest` in the store, if it is there.
    pub(crate) async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, BucketError> {
        if self.skip() {
            return Err(BucketError::Down(self.name.clone()));
        }
        let key = self.key("blobs", digest);
        match tokio::time::timeout(self.timeout, self.reader.head(&key)).await {
            Ok(Ok(meta)) => {
                self.succeeded();
                Ok(Some(meta.size))
            }
            Ok(Err(object_store::Error::NotFound { .. })) => {
                self.succeeded();
                Ok(None)
            }
            Ok(Err(e)) => {
                let why = crate::error::chain(&e);
                self.failed(&why);
                Err(self.error(why))
            }
            Err(_) => {
                let why = format!("no answer within {:?}", self.timeout);
                self.failed(&why);
                Err(self.error(why))
            }
        }
    }

    /// Manifest `digest` as stored (its media type line, then its bytes),
    /// or `None`. The caller decodes and verifies it.
    pub(crate) async fn manifest(&self, digest: &Digest) -> Result<Option<Bytes>, BucketError> {
        let key = self.key("manifests", digest);
        let Some(obj) = self.get(&key, 0, CacheKind::Manifest).await? else {
            return Ok(None);
        };
        // Read into memory: no bigger than a manifest from upstream may be.
        if obj.size > MAX_MANIFEST_OBJECT {
            tracing::warn!(store = %self.name, %key, size = obj.size,
                "manifest object in the shared store is too large: not read");
            return Ok(None);
        }
        use futures_util::TryStreamExt as _;
        let chunks: Vec<Bytes> = tokio::time::timeout(self.timeout, obj.body.try_collect())
            .await
            .map_err(|_| self.error("manifest read timed out".into()))?
            .map_err(|e| self.error(crate::error::chain(&e)))?;
        Ok(Some(Bytes::from(chunks.concat())))
    }

    /// Deletes blob `digest` from the store: it failed verification (a
    /// damaged object; keys are content-addressed, so the right bytes can
    /// only ever be what replaces it). Waits for the deletion (bounded by
    /// the timeout), so a retry does not read it again.
    pub(crate) async fn forget_blob(&self, digest: &Digest) {
        let key = self.key("blobs", digest);
        tracing::warn!(store = %self.name, %key, "object in the shared store failed verification: deleting it");
        match tokio::time::timeout(self.timeout, self.writer.delete(&key)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(store = %self.name, %key, error = %e, "deleting a damaged object failed")
            }
            Err(_) => {
                tracing::warn!(store = %self.name, %key, "deleting a damaged object timed out")
            }
        }
    }

    /// Queues the upload of stored blob `digest` (`size` bytes at `path`).
    pub(crate) fn upload_blob(&self, digest: &Digest, path: std::path::PathBuf, size: u64) {
        self.enqueue(Job::Blob {
            key: self.key("blobs", digest),
            path,
            size,
        });
    }

    fn tag_key(&self, host: &str, repo: &str, tag: &str) -> Key {
        let mut k = self.prefix.clone().join("tags").join(host);
        for part in repo.split('/') {
            k = k.join(part);
        }
        k.join("_tags").join(tag)
    }

    /// The digest the store's record of a tag names (a hint to confirm
    /// upstream: tags move, records may be stale).
    pub(crate) async fn tag(&self, host: &str, repo: &str, tag: &str) -> Option<Digest> {
        let key = self.tag_key(host, repo, tag);
        let obj = self.get(&key, 0, CacheKind::Manifest).await.ok()??;
        if obj.size > MAX_TAG_OBJECT {
            tracing::warn!(store = %self.name, %key, size = obj.size,
                "tag record in the shared store is too large: not read");
            return None;
        }
        use futures_util::TryStreamExt as _;
        let chunks: Vec<Bytes> = tokio::time::timeout(self.timeout, obj.body.try_collect())
            .await
            .ok()?
            .ok()?;
        let text = String::from_utf8(chunks.concat()).ok()?;
        Digest::parse(text.trim()).ok()
    }

    /// Queues the record that `tag` pointed at `digest`.
    pub(crate) fn upload_tag(&self, host: &str, repo: &str, tag: &str, digest: &Digest) {
        self.enqueue_manifest(
            self.tag_key(host, repo, tag),
            Bytes::from(format!("{digest}\n")),
        );
    }

    /// Queues the upload of manifest `digest`, encoded as on disk.
    pub(crate) fn upload_manifest(&self, digest: &Digest, encoded: Bytes) {
        self.enqueue_manifest(self.key("manifests", digest), encoded);
    }

    /// Queues a manifest (or tag record) upload, unless the ones held
    /// already take [`UPLOAD_MANIFEST_BYTES`].
    fn enqueue_manifest(&self, key: Key, data: Bytes) {
        let Some(held) = HeldBytes::take(
            &self.manifest_bytes,
            data.len() as u64,
            UPLOAD_MANIFEST_BYTES,
        ) else {
            tracing::warn!(store = %self.name, %key, "too many manifest bytes waiting for upload: not uploading");
            self.metrics.store_upload(
                CacheKind::Manifest,
                crate::metrics::UploadResult::Dropped,
                0,
            );
            return;
        };
        self.enqueue(Job::Manifest {
            key,
            data,
            _held: held,
        });
    }

    fn enqueue(&self, job: Job) {
        let kind = job.kind();
        if let Err(e) = self.queue.try_send(job) {
            tracing::warn!(store = %self.name, "upload queue full: not uploading {}", e.into_inner().key());
            self.metrics
                .store_upload(kind, crate::metrics::UploadResult::Dropped, 0);
        }
    }

    /// Starts the uploader and the health check; both stop with `stop`.
    pub(crate) fn spawn(self: &Arc<Self>, stop: &CancellationToken) {
        if let Some(jobs) = self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let me = self.clone();
            tokio::spawn(stop.clone().run_until_cancelled_owned(async move {
                me.run_uploads(jobs).await;
            }));
        }
        let me = self.clone();
        tokio::spawn(stop.clone().run_until_cancelled_owned(async move {
            let mut tick = tokio::time::interval(DOWN_SKIP);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if !me.is_up() {
                    me.check().await;
                }
            }
        }));
    }

    /// Asks the store for a key that need not exist: any answer means up.
    async fn check(&self) {
        let key = self.prefix.clone().join(".stowage-health");
        match tokio::time::timeout(self.timeout, self.reader.head(&key)).await {
            Ok(Ok(_)) | Ok(Err(object_store::Error::NotFound { .. })) => self.succeeded(),
            Ok(Err(e)) => self.failed(&crate::error::chain(&e)),
            Err(_) => self.failed(&format!("no answer within {:?}", self.timeout)),
        }
    }
}

/// The `object_store` client for `url`.
fn open(
    cfg: &StoreConfig,
    url: &url::Url,
    scheme: &ObjectStoreScheme,
    options: ClientOptions,
    retry: RetryConfig,
) -> Result<Arc<dyn ObjectStore>, String> {
    use object_store::aws::AmazonS3Builder;
    use object_store::azure::MicrosoftAzureBuilder;
    use object_store::gcp::GoogleCloudStorageBuilder;
    let plain_http = cfg
        .endpoint
        .as_deref()
        .is_some_and(|e| e.starts_with("http://"));
    let options = options.with_allow_http(plain_http);
    let store: Arc<dyn ObjectStore> = match scheme {
        ObjectStoreScheme::AmazonS3 => {
            let mut b = AmazonS3Builder::from_env()
                .with_url(url.as_str())
                .with_client_options(options)
                .with_retry(retry);
            if let Some(e) = &cfg.endpoint {
                b = b.with_endpoint(e).with_virtual_hosted_style_request(false);
            }
            if let Some(r) = &cfg.region {
                b = b.with_region(r);
            }
            Arc::new(b.build().map_err(|e| e.to_string())?)
        }
        ObjectStoreScheme::GoogleCloudStorage => Arc::new(
            GoogleCloudStorageBuilder::from_env()
                .with_url(url.as_str())
                .with_client_options(options)
                .with_retry(retry)
                .build()
                .map_err(|e| e.to_string())?,
        ),
        ObjectStoreScheme::MicrosoftAzure => {
            let mut b = MicrosoftAzureBuilder::from_env()
                .with_url(url.as_str())
                .with_client_options(options)
                .with_retry(retry);
            if let Some(e) = &cfg.endpoint {
                b = b.with_endpoint(e.clone());
            }
            Arc::new(b.build().map_err(|e| e.to_string())?)
        }
        other => return Err(format!("{other:?} URLs are not supported for the store")),
    };
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;

    /// Objects larger than a manifest (or a tag record) can be are not read
    /// into memory: a damaged or foreign object is a miss, not a 64 MiB
    /// allocation.
    /// Manifest uploads waiting for a slow (here: not started) uploader
    /// hold at most `UPLOAD_MANIFEST_BYTES`; the rest are dropped and
    /// counted. (By the queue's count alone, 100 of 1 MiB were all held.)
    #[tokio::test]
    async fn manifest_uploads_waiting_are_bounded_in_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg: StoreConfig =
            toml::from_str(&format!("url = \"file://{}\"", dir.path().display())).unwrap();
        let metrics = Arc::new(Metrics::new());
        let bucket = Bucket::new(&cfg, metrics.clone()).unwrap();
        let body = Bytes::from(vec![b'x'; 1 << 20]);
        for i in 0..100u32 {
            let digest = Digest::of(Algorithm::Sha256, &i.to_le_bytes());
            bucket.upload_manifest(&digest, body.clone());
        }
        let held = bucket.manifest_bytes.load(Ordering::Relaxed);
        assert!(held <= UPLOAD_MANIFEST_BYTES, "{held} bytes held");
        let text = String::from_utf8(metrics.encode().unwrap()).unwrap();
        let dropped = text
            .lines()
            .find(|l| {
                l.starts_with("stowage_store_uploads_total")
                    && l.contains(r#"kind="manifest""#)
                    && l.contains(r#"result="dropped""#)
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok());
        // 64 of them fit in 64 MiB.
        assert_eq!(dropped, Some(36));
    }

    #[tokio::test]
    async fn oversized_manifest_and_tag_objects_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let cfg: StoreConfig =
            toml::from_str(&format!("url = \"file://{}\"", dir.path().display())).unwrap();
        let bucket = Bucket::new(&cfg, Arc::new(Metrics::new())).unwrap();
        let digest = Digest::of(Algorithm::Sha256, b"m");
        let (alg, hex) = (digest.algorithm().as_str(), digest.hex());
        let path = dir.path().join("manifests").join(alg).join(hex);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        assert!(bucket.manifest(&digest).await.unwrap().is_none());
        // One within the limit is read.
        f.set_len(1000).unwrap();
        assert_eq!(
            bucket.manifest(&digest).await.unwrap().map(|b| b.len()),
            Some(1000)
        );
        let tag = dir.path().join("tags/docker.io/library/app/_tags/v1");
        std::fs::create_dir_all(tag.parent().unwrap()).unwrap();
        std::fs::write(&tag, format!("{digest}\n")).unwrap();
        assert_eq!(
            bucket.tag("docker.io", "library/app", "v1").await,
            Some(digest.clone())
        );
        // Padded with spaces, the record would still parse: only the size
        // keeps it unread.
        std::fs::write(&tag, format!("{digest}\n{}", " ".repeat(1 << 20))).unwrap();
        assert_eq!(bucket.tag("docker.io", "library/app", "v1").await, None);
    }
}
