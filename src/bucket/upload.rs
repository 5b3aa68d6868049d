//! Background uploads to the shared store.
//!
//! Jobs wait in a bounded queue (full: the job is dropped and counted; the
//! next node to fetch the blob upstream uploads it); `upload_concurrency`
//! run at once. A blob is first looked up (same key and size: nothing to
//! send), then read from its file in the store on disk, never held whole in
//! memory: up to 5 MiB in one `PUT`, larger ones as a multipart upload of
//! 5 MiB parts with at most two in flight. A failed upload is retried four
//! times with backoff (2 s, 4 s, 8 s), logged each time, and aborted
//! (multipart) when it gives up; clients never wait for any of it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use object_store::path::Path as Key;
use object_store::{ObjectStoreExt as _, PutPayload, WriteMultipart};
use tokio::io::AsyncReadExt as _;
use tokio::sync::{Semaphore, mpsc};

use super::Bucket;
use crate::metrics::{CacheKind, UploadResult};

/// Largest blob sent in one `PUT`; also the part size of larger ones (the
/// S3 minimum for every part but the last).
const PART: usize = 5 * 1024 * 1024;

/// Parts of one multipart upload in flight at most.
const PARTS_IN_FLIGHT: usize = 2;

/// Attempts per upload.
const ATTEMPTS: u32 = 4;

/// Read size from the file.
const READ: usize = 1024 * 1024;

/// One upload.
pub(super) enum Job {
    /// A stored blob.
    Blob { key: Key, path: PathBuf, size: u64 },
    /// A manifest, encoded as on disk, its bytes counted while it waits
    /// or is sent.
    Manifest {
        key: Key,
        data: Bytes,
        /// Given back when the job ends.
        _held: HeldBytes,
    },
}

/// Bytes of manifest uploads held in memory (queued or being sent),
/// counted in a total that [`HeldBytes::take`] keeps under a limit.
pub(super) struct HeldBytes {
    total: Arc<AtomicU64>,
    bytes: u64,
}

impl HeldBytes {
    /// Counts `bytes` in `total` if that stays within `limit`.
    pub(super) fn take(total: &Arc<AtomicU64>, bytes: u64, limit: u64) -> Option<HeldBytes> {
        total
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                let after = t.checked_add(bytes)?;
                (after <= limit).then_some(after)
            })
            .ok()?;
        Some(HeldBytes {
            total: total.clone(),
            bytes,
        })
    }
}

impl Drop for HeldBytes {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Job {
    pub(super) fn kind(&self) -> CacheKind {
        match self {
            Job::Blob { .. } => CacheKind::Blob,
            Job::Manifest { .. } => CacheKind::Manifest,
        }
    }

    pub(super) fn key(&self) -> &Key {
        match self {
            Job::Blob { key, .. } | Job::Manifest { key, .. } => key,
        }
    }
}

/// Why an attempt failed.
enum Failure {
    /// Try again later.
    Retry(String),
    /// No point: the file is gone.
    Give(String),
}

impl Bucket {
    /// Runs queued jobs, `concurrency` at a time, until the queue closes.
    pub(super) async fn run_uploads(self: Arc<Self>, mut jobs: mpsc::Receiver<Job>) {
        let slots = Arc::new(Semaphore::new(self.concurrency));
        while let Some(job) = jobs.recv().await {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let me = self.clone();
            tokio::spawn(async move {
                me.upload(job).await;
                drop(slot);
            });
        }
    }

    /// One job, with its retries.
    async fn upload(&self, job: Job) {
        let kind = job.kind();
        for attempt in 1..=ATTEMPTS {
            match self.attempt(&job).await {
                Ok((result, bytes)) => {
                    self.succeeded();
                    self.metrics.store_upload(kind, result, bytes);
                    tracing::debug!(store = %self.name, key = %job.key(), result = result.as_str(), bytes, "uploaded");
                    return;
                }
                Err(Failure::Give(why)) => {
                    tracing::info!(store = %self.name, key = %job.key(), %why, "not uploading");
                    self.metrics.store_upload(kind, UploadResult::Dropped, 0);
                    return;
                }
                Err(Failure::Retry(why)) if attempt < ATTEMPTS => {
                    let wait = Duration::from_secs(1 << attempt);
                    tracing::warn!(store = %self.name, key = %job.key(), attempt, retry_in = ?wait,
                        error = %why, "upload to the shared store failed");
                    self.failed(&why);
                    tokio::time::sleep(wait).await;
                }
                Err(Failure::Retry(why)) => {
                    tracing::error!(store = %self.name, key = %job.key(), attempts = ATTEMPTS,
                        error = %why, "upload to the shared store failed; giving up");
                    self.failed(&why);
                    self.metrics.store_upload(kind, UploadResult::Failed, 0);
                }
            }
        }
    }

    async fn attempt(&self, job: &Job) -> Result<(UploadResult, u64), Failure> {
        let retry = |e: object_store::Error| Failure::Retry(crate::error::chain(&e));
        match job {
            Job::Manifest { key, data, .. } => {
                self.writer
                    .put(key, PutPayload::from_bytes(data.clone()))
                    .await
                    .map_err(retry)?;
                Ok((UploadResult::Ok, data.len() as u64))
            }
            Job::Blob { key, path, size } => {
                match self.writer.head(key).await {
                    Ok(meta) if meta.size == *size => return Ok((UploadResult::Exists, 0)),
                    Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(retry(e)),
                }
                let file = tokio::fs::File::open(path).await.map_err(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        Failure::Give(format!("{} is gone (evicted)", path.display()))
                    } else {
                        Failure::Retry(format!("{}: {e}", path.display()))
                    }
                })?;
                if *size as usize <= PART {
                    self.put_small(key, file, *size).await
                } else {
                    self.put_multipart(key, file, *size).await
                }
            }
        }
    }

    async fn put_small(
        &self,
        key: &Key,
        mut file: tokio::fs::File,
        size: u64,
    ) -> Result<(UploadResult, u64), Failure> {
        let mut buf = Vec::with_capacity(size as usize);
        file.read_to_end(&mut buf)
            .await
            .map_err(|e| Failure::Retry(e.to_string()))?;
        if buf.len() as u64 != size {
            return Err(Failure::Give(format!(
                "the stored file has {} bytes, not {size}",
                buf.len()
            )));
        }
        self.writer
            .put(key, PutPayload::from(buf))
            .await
            .map_err(|e| Failure::Retry(crate::error::chain(&e)))?;
        Ok((UploadResult::Ok, size))
    }

    async fn put_multipart(
        &self,
        key: &Key,
        mut file: tokio::fs::File,
        size: u64,
    ) -> Result<(UploadResult, u64), Failure> {
        let upload = self
            .writer
            .put_multipart(key)
            .await
            .map_err(|e| Failure::Retry(crate::error::chain(&e)))?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut buf = vec![0u8; READ];
        let mut sent = 0u64;
        let result: Result<(), String> = async {
            loop {
                let n = file.read(&mut buf).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                w.wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(|e| crate::error::chain(&e))?;
                w.write(&buf[..n]);
                sent += n as u64;
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            let _ = w.abort().await;
            return Err(Failure::Retry(e));
        }
        if sent != size {
            let _ = w.abort().await;
            return Err(Failure::Give(format!(
                "the stored file has {sent} bytes, not {size}"
            )));
        }
        w.finish()
            .await
            .map_err(|e| Failure::Retry(crate::error::chain(&e)))?;
        Ok((UploadResult::Ok, size))
    }
}
