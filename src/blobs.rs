//! The blob cache: a content-addressed store on disk and the *fills* that
//! populate it.
//!
//! ## Store
//! A verified blob lives at `<cache>/blobs/<alg>/<hex[..2]>/<hex>`. Files only
//! get there by an fsynced, atomic rename from `<cache>/tmp/`, so anything in
//! the store is complete and verified; `tmp/` is emptied at start-up.
//!
//! ## Fills
//! A miss starts one [`Fill`] per digest, process-wide: a task detached from
//! any request that streams the upstream body into a temporary file while
//! hashing it. The fill publishes its progress on a `watch` channel.
//!
//! Every request for the digest while the fill runs (the first included)
//! reads that file with `pread` up to what has been written and waits for
//! more, so there is one upstream request however many clients ask, nobody
//! waits for the end, and a slow client slows nobody but itself.
//!
//! A reader never sends the last byte of its response before the fill has
//! verified the digest: until then it holds back one byte. If verification
//! fails or upstream breaks off, the fill publishes `Failed`, the temporary
//! file is removed, and every reader's body ends with an error, which cuts
//! the connection: no client can complete a corrupt blob.
//!
//! States of a fill, in order: `Connecting` (upstream request sent) ->
//! `Streaming` (headers received, bytes arriving) -> `Verified` or `Failed`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::{mpsc, watch};

use crate::body::{self, Body};
use crate::error::{RegistryError, UpstreamKind};
use crate::range::{self, ByteRange};
use crate::reference::{Digest, Hasher, RepoName};
use crate::upstream::Upstream;

/// Bytes read from disk per body frame.
const CHUNK: usize = 256 * 1024;

/// Upstream body chunks queued between the network task and the disk writer.
/// Bounds fill memory to about this many chunks (hyper's frames are <= 16 KiB
/// on HTTP/1 reads, larger on h2).
const WRITE_QUEUE: usize = 64;

/// How a request for a blob was answered, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Served from the store.
    Hit,
    /// Started a fill.
    Miss,
    /// Attached to a fill already running.
    Join,
    /// Answered from upstream without caching (HEAD on an uncached blob).
    Upstream,
}

impl Outcome {
    /// Lowercase name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Join => "join",
            Outcome::Upstream => "upstream",
        }
    }
}

/// Where a fill is.
#[derive(Debug, Clone)]
enum Phase {
    /// The upstream request is under way; no headers yet.
    Connecting,
    /// Upstream answered 200; bytes are being written.
    Streaming,
    /// All bytes written, size and digest checked, file in the store.
    Verified,
    /// Upstream error, mismatch or local failure. The temporary file is gone.
    Failed(RegistryError),
}

/// What readers of a fill can see, published by the fill on every write.
#[derive(Debug, Clone)]
struct Progress {
    phase: Phase,
    /// Size announced by upstream (`Content-Length`), if any.
    total: Option<u64>,
    /// Bytes written to the temporary file so far; readable with `pread`.
    written: u64,
}

/// One upstream download of one digest, shared by all its readers.
struct Fill {
    /// The temporary file, set before `Streaming` is published. Readers use
    /// positional reads on this descriptor, which stays valid after the
    /// file is renamed into the store or unlinked.
    file: OnceLock<Arc<File>>,
    /// Progress, watched by every reader.
    progress: watch::Sender<Progress>,
}

/// The blob cache. Cheap to share: wrap in an `Arc`.
pub struct BlobStore {
    /// `<cache>/blobs`: verified blobs.
    root: PathBuf,
    /// `<cache>/tmp`: files of fills in progress.
    tmp: PathBuf,
    /// Fills running now, by digest. Locked only on the miss path, never
    /// across an await.
    fills: Mutex<HashMap<Digest, Arc<Fill>>>,
    /// Distinguishes temporary file names.
    next_tmp: AtomicU64,
    /// Longest wait for the next upstream body chunk before a fill gives up.
    idle_timeout: Duration,
}

/// The blob part of a response before the handler adds common headers.
pub struct BlobResponse {
    /// How it was answered.
    pub outcome: Outcome,
    /// The HTTP response.
    pub response: Response<Body>,
}

impl BlobStore {
    /// Opens (creating) the store under `cache_dir` and removes leftovers of
    /// fills interrupted by a crash.
    pub fn open(cache_dir: &Path, idle_timeout: Duration) -> io::Result<BlobStore> {
        let root = cache_dir.join("blobs");
        let tmp = cache_dir.join("tmp");
        std::fs::create_dir_all(&root)?;
        std::fs::create_dir_all(&tmp)?;
        for entry in std::fs::read_dir(&tmp)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(BlobStore {
            root,
            tmp,
            fills: Mutex::new(HashMap::new()),
            next_tmp: AtomicU64::new(0),
            idle_timeout,
        })
    }

    /// Where a verified blob lives. Only built from a validated [`Digest`].
    fn path_of(&self, digest: &Digest) -> PathBuf {
        self.root
            .join(digest.algorithm().as_str())
            .join(&digest.hex()[..2])
            .join(digest.hex())
    }

    /// Opens a stored blob, returning it with its size, or `None` on a miss.
    fn open_stored(&self, digest: &Digest) -> io::Result<Option<(File, u64)>> {
        match File::open(self.path_of(digest)) {
            Ok(f) => {
                let len = f.metadata()?.len();
                Ok(Some((f, len)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether the store holds `digest` (verified, complete).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.path_of(digest).is_file()
    }

    /// Answers `GET` (or `HEAD` when `head_only`) for a blob: from the store,
    /// by joining a running fill, or by starting one. `range` is the raw
    /// `Range` header, if any.
    pub async fn serve(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
        range: Option<&str>,
        head_only: bool,
    ) -> Result<BlobResponse, RegistryError> {
        let range = range.and_then(range::parse);
        if let Some((file, size)) = self.open_stored(digest).map_err(local_error)? {
            return Ok(BlobResponse {
                outcome: Outcome::Hit,
                response: file_response(digest, Arc::new(file), size, range, head_only, None)?,
            });
        }
        if head_only {
            return self.head_miss(upstream, repo, digest).await;
        }
        let (fill, outcome) = match self.join_or_start(upstream, repo, digest)? {
            Lookup::Stored(file, size) => {
                return Ok(BlobResponse {
                    outcome: Outcome::Hit,
                    response: file_response(digest, Arc::new(file), size, range, false, None)?,
                });
            }
            Lookup::Fill(fill, outcome) => (fill, outcome),
        };
        let mut rx = fill.progress.subscribe();
        let progress = rx
            .wait_for(|p| !matches!(p.phase, Phase::Connecting))
            .await
            .map_err(|_| RegistryError::internal("blob fill ended without a result"))?
            .clone();
        if let Phase::Failed(e) = progress.phase {
            return Err(e);
        }
        let file = fill
            .file
            .get()
            .cloned()
            .ok_or_else(|| RegistryError::internal("blob fill has no file"))?;
        Ok(BlobResponse {
            outcome,
            response: fill_response(digest, file, progress.total, range, rx)?,
        })
    }

    /// Finds a running fill for `digest` or starts one. Checks the store
    /// again under the lock: a fill removes itself from the map only after
    /// its rename, so "no fill and no file" means nobody has it.
    fn join_or_start(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Lookup, RegistryError> {
        let mut fills = self
            .fills
            .lock()
            .map_err(|_| RegistryError::internal("fill table poisoned"))?;
        if let Some(fill) = fills.get(digest) {
            return Ok(Lookup::Fill(fill.clone(), Outcome::Join));
        }
        if let Some((file, size)) = self.open_stored(digest).map_err(local_error)? {
            return Ok(Lookup::Stored(file, size));
        }
        let (progress, _) = watch::channel(Progress {
            phase: Phase::Connecting,
            total: None,
            written: 0,
        });
        let fill = Arc::new(Fill {
            file: OnceLock::new(),
            progress,
        });
        fills.insert(digest.clone(), fill.clone());
        drop(fills);

        let store = self.clone();
        let upstream = upstream.clone();
        let repo = repo.clone();
        let digest = digest.clone();
        let task_fill = fill.clone();
        tokio::spawn(async move {
            let result = store.run_fill(&task_fill, &upstream, &repo, &digest).await;
            match &result {
                Ok(size) => {
                    tracing::info!(%digest, size, repo = %repo, "blob cached");
                    task_fill
                        .progress
                        .send_modify(|p| p.phase = Phase::Verified);
                }
                Err(e) => {
                    tracing::warn!(%digest, repo = %repo, error = %e, "blob fill failed");
                    task_fill
                        .progress
                        .send_modify(|p| p.phase = Phase::Failed(e.clone()));
                }
            }
            if let Ok(mut fills) = store.fills.lock() {
                fills.remove(&digest);
            }
        });
        Ok(Lookup::Fill(fill, Outcome::Miss))
    }

    /// The fill task: fetch, write and hash, verify, commit. Returns the
    /// size on success. On any error the temporary file is removed.
    async fn run_fill(
        &self,
        fill: &Fill,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<u64, RegistryError> {
        let resp = upstream
            .send(
                Method::GET,
                repo.as_str(),
                &format!("blobs/{digest}"),
                HeaderMap::new(),
            )
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(RegistryError::from_upstream(
                resp.status(),
                UpstreamKind::Blob,
                resp.headers().get(header::RETRY_AFTER),
                &digest.to_string(),
            ));
        }
        let total = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());

        let tmp_path = self.tmp.join(format!(
            "{}-{}-{}",
            digest.hex(),
            std::process::id(),
            self.next_tmp.fetch_add(1, Ordering::Relaxed)
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp_path)
            .map_err(local_error)?;
        let file = Arc::new(file);
        // Set once, by this task only.
        let _ = fill.file.set(file.clone());
        fill.progress.send_modify(|p| {
            p.phase = Phase::Streaming;
            p.total = total;
        });

        let result = self
            .stream_to_disk(fill, resp.into_body(), file, total, digest)
            .await;
        match result {
            Ok(size) => match self.commit(&tmp_path, digest).await {
                Ok(()) => Ok(size),
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp_path);
                    Err(local_error(e))
                }
            },
            Err(e) => {
                let _ = std::fs::remove_file(&tmp_path);
                Err(e)
            }
        }
    }

    /// Pumps the upstream body to a blocking writer thread that writes,
    /// hashes and publishes progress, then checks size and digest.
    async fn stream_to_disk(
        &self,
        fill: &Fill,
        mut body: hyper::body::Incoming,
        file: Arc<File>,
        total: Option<u64>,
        digest: &Digest,
    ) -> Result<u64, RegistryError> {
        let (tx, mut rx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
        let progress = fill.progress.clone();
        let algorithm = digest.algorithm();
        let writer = tokio::task::spawn_blocking(move || -> io::Result<(Digest, u64)> {
            let mut hasher = Hasher::new(algorithm);
            let mut written = 0u64;
            let mut out: &File = &file;
            while let Some(chunk) = rx.blocking_recv() {
                out.write_all(&chunk)?;
                hasher.update(&chunk);
                written += chunk.len() as u64;
                progress.send_modify(|p| p.written = written);
            }
            Ok((hasher.finish(), written))
        });

        let mut received = 0u64;
        let pump: Result<(), RegistryError> = async {
            loop {
                let frame = match tokio::time::timeout(self.idle_timeout, body.frame()).await {
                    Err(_) => {
                        return Err(RegistryError::bad_gateway(format!(
                            "upstream stalled for {:?} sending {digest}",
                            self.idle_timeout
                        )));
                    }
                    Ok(None) => return Ok(()),
                    Ok(Some(Err(e))) => {
                        return Err(RegistryError::bad_gateway(format!(
                            "upstream body of {digest} broke off: {e}"
                        )));
                    }
                    Ok(Some(Ok(frame))) => frame,
                };
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                received += data.len() as u64;
                if total.is_some_and(|t| received > t) {
                    return Err(RegistryError::bad_gateway(format!(
                        "upstream sent more than its Content-Length for {digest}"
                    )));
                }
                if tx.send(data).await.is_err() {
                    // The writer stopped: its error is reported below.
                    return Ok(());
                }
            }
        }
        .await;
        drop(tx);
        let written = writer
            .await
            .map_err(|e| RegistryError::internal(format!("blob writer panicked: {e}")))?
            .map_err(local_error);
        pump?;
        let (actual, size) = written?;
        if let Some(t) = total
            && size != t
        {
            return Err(RegistryError::bad_gateway(format!(
                "upstream sent {size} of {t} bytes for {digest}"
            )));
        }
        if &actual != digest {
            return Err(RegistryError::bad_gateway(format!(
                "digest mismatch: upstream sent {actual} for {digest}"
            )));
        }
        Ok(size)
    }

    /// fsyncs the file and moves it into the store atomically, then fsyncs
    /// the directory so the rename survives a crash.
    async fn commit(&self, tmp_path: &Path, digest: &Digest) -> io::Result<()> {
        let tmp_path = tmp_path.to_path_buf();
        let dest = self.path_of(digest);
        tokio::task::spawn_blocking(move || {
            File::open(&tmp_path)?.sync_all()?;
            let dir = dest
                .parent()
                .ok_or_else(|| io::Error::other("store path has no parent"))?;
            std::fs::create_dir_all(dir)?;
            std::fs::rename(&tmp_path, &dest)?;
            File::open(dir)?.sync_all()
        })
        .await
        .map_err(io::Error::other)?
    }

    /// `HEAD` on a blob that is not stored: answer from a running fill when
    /// it knows the size, otherwise ask upstream with `HEAD`. Never starts
    /// a fill.
    async fn head_miss(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<BlobResponse, RegistryError> {
        let known = self
            .fills
            .lock()
            .ok()
            .and_then(|f| f.get(digest).map(|f| f.progress.borrow().total))
            .flatten();
        let size = match known {
            Some(size) => Some(size),
            None => {
                let resp = upstream
                    .send(
                        Method::HEAD,
                        repo.as_str(),
                        &format!("blobs/{digest}"),
                        HeaderMap::new(),
                    )
                    .await?;
                if resp.status() != StatusCode::OK {
                    return Err(RegistryError::from_upstream(
                        resp.status(),
                        UpstreamKind::Blob,
                        resp.headers().get(header::RETRY_AFTER),
                        &digest.to_string(),
                    ));
                }
                resp.headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
            }
        };
        let mut response = Response::new(body::empty());
        set_blob_headers(response.headers_mut(), digest);
        if let Some(size) = size {
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        }
        Ok(BlobResponse {
            outcome: Outcome::Upstream,
            response,
        })
    }
}

/// Result of looking for a blob under the fill lock.
enum Lookup {
    /// Stored after all (a fill finished just now).
    Stored(File, u64),
    /// A fill to read from, started or joined.
    Fill(Arc<Fill>, Outcome),
}

fn local_error(e: io::Error) -> RegistryError {
    RegistryError::internal(format!("cache storage error: {e}"))
}

fn set_blob_headers(h: &mut HeaderMap, digest: &Digest) {
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&digest.to_string()) {
        h.insert("docker-content-digest", v.clone());
        if let Ok(etag) = HeaderValue::from_str(&format!("\"{digest}\"")) {
            h.insert(header::ETAG, etag);
        }
    }
}

/// Builds a 200/206/416 response for a blob of known `size` whose bytes come
/// from `file`, either complete (`fill` is `None`) or still being written.
fn file_response(
    digest: &Digest,
    file: Arc<File>,
    size: u64,
    range: Option<ByteRange>,
    head_only: bool,
    fill: Option<watch::Receiver<Progress>>,
) -> Result<Response<Body>, RegistryError> {
    let (start, end, status) = match range {
        None => (0, size, StatusCode::OK),
        Some(r) => match r.resolve(size) {
            Some((s, e)) => (s, e, StatusCode::PARTIAL_CONTENT),
            None => {
                let mut e = RegistryError::range_invalid(size).into_response(head_only, body::full);
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    e.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return Ok(e);
            }
        },
    };
    let body = if head_only {
        body::empty()
    } else {
        file_body(file, start, Some(end), fill)
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    set_blob_headers(h, digest);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {}-{}/{size}", start, end - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    Ok(response)
}

/// A response reading from a fill in progress.
fn fill_response(
    digest: &Digest,
    file: Arc<File>,
    total: Option<u64>,
    range: Option<ByteRange>,
    rx: watch::Receiver<Progress>,
) -> Result<Response<Body>, RegistryError> {
    match total {
        Some(size) => file_response(digest, file, size, range, false, Some(rx)),
        None => {
            // Upstream gave no length: stream the whole blob chunked (a
            // range cannot be resolved without the size, so it is ignored).
            let mut response = Response::new(file_body(file, 0, None, Some(rx)));
            set_blob_headers(response.headers_mut(), digest);
            Ok(response)
        }
    }
}

/// Reader state for one response body.
struct Reader {
    file: Arc<File>,
    /// Next offset to send.
    pos: u64,
    /// End of the span to send (exclusive); `None` = to the end of the blob,
    /// size not yet known.
    end: Option<u64>,
    /// Progress of the fill being read, or `None` for a stored blob.
    fill: Option<watch::Receiver<Progress>>,
}

/// A body that streams `[start, end)` of `file` in bounded chunks. When
/// reading a fill, it waits for bytes to be written, never sends its final
/// byte before the fill is verified, and fails if the fill fails.
fn file_body(
    file: Arc<File>,
    start: u64,
    end: Option<u64>,
    fill: Option<watch::Receiver<Progress>>,
) -> Body {
    let reader = Reader {
        file,
        pos: start,
        end,
        fill,
    };
    let stream = futures_util::stream::try_unfold(reader, |mut r| async move {
        let Some(limit) = r.readable_limit().await? else {
            return Ok(None);
        };
        let want = (limit - r.pos).min(CHUNK as u64) as usize;
        let file = r.file.clone();
        let pos = r.pos;
        let chunk = tokio::task::spawn_blocking(move || read_exact_at(&file, pos, want))
            .await
            .map_err(io::Error::other)??;
        r.pos += chunk.len() as u64;
        Ok(Some((Frame::data(chunk), r)))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

impl Reader {
    /// Waits until there is something to send and returns the offset up to
    /// which bytes may be sent now (`> pos`), or `None` at the end.
    async fn readable_limit(&mut self) -> io::Result<Option<u64>> {
        loop {
            let Some(rx) = self.fill.as_mut() else {
                let end = self.end.unwrap_or(self.pos);
                return Ok((self.pos < end).then_some(end));
            };
            let p = rx.borrow_and_update().clone();
            match p.phase {
                Phase::Failed(e) => {
                    return Err(io::Error::other(format!("blob fill failed: {}", e.message)));
                }
                Phase::Verified => {
                    let end = self.end.unwrap_or(p.written).min(p.written);
                    if self.pos < end {
                        return Ok(Some(end));
                    }
                    return Ok(None);
                }
                Phase::Connecting | Phase::Streaming => {
                    // Hold back the final byte of this response until the
                    // digest is verified.
                    let limit = self
                        .end
                        .unwrap_or(u64::MAX)
                        .min(p.written)
                        .saturating_sub(1);
                    if self.pos < limit {
                        return Ok(Some(limit));
                    }
                }
            }
            if rx.changed().await.is_err() {
                return Err(io::Error::other("blob fill vanished"));
            }
        }
    }
}

/// Reads exactly `len` bytes at `pos` (the bytes are known to be on disk).
fn read_exact_at(file: &File, pos: u64, len: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::zeroed(len);
    file.read_exact_at(&mut buf, pos)?;
    Ok(buf.freeze())
}
