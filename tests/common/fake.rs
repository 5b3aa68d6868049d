//! An in-process fake upstream registry (Docker Registry HTTP API v2 /
//! OCI distribution, pull side only) with request counting, optional Docker
//! Hub style bearer-token auth and misbehaviour knobs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt as _;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::image::sha256_digest;

pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Which TCP connection it came on (numbered from 1 in accept order).
    pub conn: usize,
    pub version: http::Version,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }
}

/// Global failure mode: how the fake answers *every* request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Behave.
    None,
    /// `503 Service Unavailable` with an OCI error body.
    Unavailable,
    /// `429 Too Many Requests` with `Retry-After: <secs>`.
    TooManyRequests { retry_after: u32 },
    /// Close connections without answering (new connections are accepted
    /// and dropped at once; requests on existing ones abort the connection).
    Down,
}

/// A stored manifest.
#[derive(Clone)]
struct StoredManifest {
    media_type: String,
    body: Bytes,
}

/// State of one held blob: the fake sends the first half of the body, then
/// waits until released.
pub struct HoldState {
    released: watch::Sender<bool>,
    halves_sent: watch::Sender<usize>,
    completed: watch::Sender<usize>,
    dropped: watch::Sender<usize>,
}

/// Handle to a held blob; see [`FakeUpstream::hold`].
#[derive(Clone)]
pub struct Hold {
    state: Arc<HoldState>,
}

impl Hold {
    /// Lets every held body (current and future) send the rest.
    pub fn release(&self) {
        self.state.released.send_replace(true);
    }

    /// Waits until `n` bodies in total have handed their first half to
    /// hyper (i.e. the half is on its way to the client). Panics after 10 s.
    pub async fn wait_half_sent(&self, n: usize) {
        let mut rx = self.state.halves_sent.subscribe();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|v| *v >= n))
            .await
            .unwrap_or_else(|_| {
                panic!("fake upstream: half of held blob not sent {n} time(s) within 10 s")
            })
            .unwrap();
    }

    /// Waits until `n` held bodies in total were sent completely. Panics
    /// at once if a held body is dropped unfinished, or after 10 s.
    pub async fn wait_completed(&self, n: usize) {
        let mut done = self.state.completed.subscribe();
        let mut dropped = self.state.dropped.subscribe();
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::select! {
                _ = done.wait_for(|v| *v >= n) => true,
                _ = dropped.wait_for(|v| *v > 0) => false,
            }
        })
        .await;
        match r {
            Ok(true) => {}
            Ok(false) => panic!(
                "fake upstream: a held blob body was dropped (connection closed by the mirror) \
                 before it was sent completely ({} completed)",
                self.completed()
            ),
            Err(_) => panic!("fake upstream: held blob body not completed {n} time(s) within 10 s"),
        }
    }

    pub fn halves_sent(&self) -> usize {
        *self.state.halves_sent.borrow()
    }

    pub fn completed(&self) -> usize {
        *self.state.completed.borrow()
    }

    /// Bodies that were dropped (connection closed by the downstream side)
    /// before they were sent completely.
    pub fn dropped(&self) -> usize {
        *self.state.dropped.borrow()
    }
}

/// Increments `dropped` when a held body is dropped before completion.
struct DropGuard {
    state: Arc<HoldState>,
    done: bool,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        if !self.done {
            self.state.dropped.send_modify(|v| *v += 1);
        }
    }
}

struct Token {
    expires: Instant,
    repos: HashSet<String>,
}

#[derive(Default)]
struct Store {
    blobs: HashMap<String, Bytes>,
    manifests: HashMap<String, StoredManifest>,
    /// repo -> tag -> digest
    tags: HashMap<String, BTreeMap<String, String>>,
}

struct AuthConfig {
    enabled: bool,
    expires_in: u64,
    credentials: Option<(String, String)>,
    private: HashSet<String>,
    /// `service` named in the bearer challenge.
    service: String,
    /// Whether the bearer challenge names the scope.
    challenge_scope: bool,
    /// Registry-level Basic auth (no tokens): these credentials.
    basic: Option<(String, String)>,
    /// Whether tokens are JWT-shaped (`aud` the service, `exp`), as the
    /// Docker token specification's are; opaque strings otherwise.
    jwt: bool,
}

/// A scripted answer for one path; see [`FakeUpstream::respond`].
#[derive(Clone)]
struct Canned {
    status: u16,
    headers: Vec<(String, String)>,
    body: Bytes,
    /// Served only once the request passed the auth checks.
    after_auth: bool,
}

struct Inner {
    addr: SocketAddr,
    /// Served over TLS (HTTP/1.1 and h2 by ALPN).
    tls: bool,
    store: Mutex<Store>,
    log: Mutex<Vec<Recorded>>,
    counts: Mutex<HashMap<(String, String), usize>>,
    failure: Mutex<Failure>,
    down: AtomicBool,
    chunked: AtomicBool,
    /// Referrers per page when the client gives no `n` (0: all).
    referrers_page: std::sync::atomic::AtomicUsize,
    corrupt: Mutex<HashSet<String>>,
    truncate: Mutex<HashSet<String>>,
    holds: Mutex<HashMap<String, Arc<HoldState>>>,
    auth: Mutex<AuthConfig>,
    tokens: Mutex<HashMap<String, Token>>,
    token_seq: AtomicU64,
    connections: AtomicUsize,
    /// Scripted answers by exact path.
    canned: Mutex<HashMap<String, Canned>>,
    /// Which repositories each blob and manifest was pushed to.
    members: Mutex<HashMap<String, HashSet<String>>>,
    /// Whether blobs and manifests by digest are found only in the
    /// repositories they were pushed to (as distribution does).
    strict_repos: AtomicBool,
    /// How long every `/v2/` request waits before it is answered.
    delay: Mutex<Duration>,
    /// Delays before answering, by exact path.
    delays: Mutex<HashMap<String, Duration>>,
    /// Blobs only these repositories have (404 elsewhere), by digest.
    blob_repos: Mutex<HashMap<String, HashSet<String>>>,
    /// Body faults of blobs and manifests, by digest.
    faults: Mutex<HashMap<String, BodyFault>>,
    /// Body faults of any answer, by exact path.
    path_faults: Mutex<HashMap<String, BodyFault>>,
    /// Statuses the next requests under `/v2/<repo>/` get, in order.
    statuses: Mutex<std::collections::VecDeque<u16>>,
    /// Bodies that are still being sent (or were dropped unfinished).
    bodies_open: Arc<AtomicUsize>,
    /// Records no requests (for long runs that measure memory).
    forgetful: AtomicBool,
}

/// How a blob or manifest body misbehaves; see [`FakeUpstream::fault`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFault {
    /// Headers (with the right Content-Length), then nothing, ever.
    StallAfterHead,
    /// Half the body, then nothing, ever.
    StallMidBody,
    /// Half the body, then the connection is reset.
    ResetMidBody,
    /// A Content-Length `n` bytes short of the body; all of it is sent.
    LongerThanLength(u64),
    /// A Content-Length `n` bytes more than the body; the body is sent,
    /// then the connection is closed.
    ShorterThanLength(u64),
    /// The right headers, then the body at `n` bytes per second (in
    /// frames of a tenth of that, one every 100 ms).
    Drip(u64),
    /// The body in frames of `n` bytes, a millisecond apart (so that the
    /// client reads many small frames rather than a few large ones).
    Frames(usize),
}

/// The fake registry. Cloning gives another handle to the same server.
#[derive(Clone)]
pub struct FakeUpstream {
    inner: Arc<Inner>,
}

impl FakeUpstream {
    /// Binds 127.0.0.1:0 and serves on the current tokio runtime.
    pub async fn start() -> FakeUpstream {
        FakeUpstream::start_with(None).await
    }

    /// Like [`FakeUpstream::start`], over TLS with `cert` (for `localhost`
    /// and 127.0.0.1), offering h2 and HTTP/1.1 by ALPN.
    pub async fn start_tls(cert: &super::tls::Issued) -> FakeUpstream {
        use rustls::pki_types::pem::PemObject;
        let chain = rustls::pki_types::CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        FakeUpstream::start_with(Some(Arc::new(config))).await
    }

    async fn start_with(tls: Option<Arc<rustls::ServerConfig>>) -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Inner {
            addr,
            tls: tls.is_some(),
            store: Mutex::default(),
            log: Mutex::default(),
            counts: Mutex::default(),
            failure: Mutex::new(Failure::None),
            down: AtomicBool::new(false),
            chunked: AtomicBool::new(false),
            referrers_page: std::sync::atomic::AtomicUsize::new(0),
            corrupt: Mutex::default(),
            truncate: Mutex::default(),
            holds: Mutex::default(),
            auth: Mutex::new(AuthConfig {
                enabled: false,
                expires_in: 300,
                credentials: None,
                private: HashSet::new(),
                service: "fake".into(),
                challenge_scope: true,
                basic: None,
                jwt: false,
            }),
            canned: Mutex::default(),
            members: Mutex::default(),
            strict_repos: AtomicBool::new(false),
            delay: Mutex::new(Duration::ZERO),
            delays: Mutex::default(),
            blob_repos: Mutex::default(),
            faults: Mutex::default(),
            path_faults: Mutex::default(),
            statuses: Mutex::default(),
            bodies_open: Arc::new(AtomicUsize::new(0)),
            forgetful: AtomicBool::new(false),
            tokens: Mutex::default(),
            token_seq: AtomicU64::new(1),
            connections: AtomicUsize::new(0),
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                if inner.down.load(Ordering::SeqCst) {
                    drop(stream);
                    continue;
                }
                let conn = inner.connections.fetch_add(1, Ordering::SeqCst) + 1;
                let _ = stream.set_nodelay(true);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let inner = inner.clone();
                        async move { inner.handle(req, conn).await }
                    });
                    match tls {
                        None => {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        }
                        Some(config) => {
                            let Ok(stream) =
                                tokio_rustls::TlsAcceptor::from(config).accept(stream).await
                            else {
                                return;
                            };
                            let builder = hyper_util::server::conn::auto::Builder::new(
                                hyper_util::rt::TokioExecutor::new(),
                            );
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        FakeUpstream { inner }
    }

    /// `http://127.0.0.1:PORT` (`https://localhost:PORT` over TLS).
    pub fn url(&self) -> String {
        if self.inner.tls {
            format!("https://localhost:{}", self.inner.addr.port())
        } else {
            format!("http://{}", self.inner.addr)
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    // ----- content -------------------------------------------------------

    /// Stores a blob; returns its digest.
    pub fn add_blob(&self, data: impl Into<Bytes>) -> String {
        let data = data.into();
        let digest = sha256_digest(&data);
        self.inner
            .store
            .lock()
            .unwrap()
            .blobs
            .insert(digest.clone(), data);
        digest
    }

    pub fn remove_blob(&self, digest: &str) {
        self.inner.store.lock().unwrap().blobs.remove(digest);
    }

    /// Deletes a manifest (as `DELETE /v2/<name>/manifests/<digest>`).
    pub fn remove_manifest(&self, digest: &str) {
        self.inner.store.lock().unwrap().manifests.remove(digest);
    }

    /// Deletes a tag (the manifest it pointed at stays, untagged).
    pub fn remove_tag(&self, repo: &str, tag: &str) {
        if let Some(tags) = self.inner.store.lock().unwrap().tags.get_mut(repo) {
            tags.remove(tag);
        }
    }

    /// Stores a manifest, optionally tagging it in `repo`; returns its digest.
    pub fn add_manifest(
        &self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        body: impl Into<Bytes>,
    ) -> String {
        let body = body.into();
        let digest = sha256_digest(&body);
        self.member(&digest, repo);
        let mut store = self.inner.store.lock().unwrap();
        store.manifests.insert(
            digest.clone(),
            StoredManifest {
                media_type: media_type.to_string(),
                body,
            },
        );
        let tags = store.tags.entry(repo.to_string()).or_default();
        if let Some(tag) = tag {
            tags.insert(tag.to_string(), digest.clone());
        }
        digest
    }

    /// From now on, blobs and manifests by digest are found only in the
    /// repositories they were pushed to (`push_image`, `push_index`,
    /// `add_manifest`), as in distribution: `404 *_UNKNOWN` elsewhere.
    pub fn set_strict_repos(&self, on: bool) {
        self.inner.strict_repos.store(on, Ordering::SeqCst);
    }

    fn member(&self, digest: &str, repo: &str) {
        self.inner
            .members
            .lock()
            .unwrap()
            .entry(digest.to_string())
            .or_default()
            .insert(repo.to_string());
    }

    /// Stores config, layers and manifest of `image` and tags it.
    pub fn push_image(&self, repo: &str, tag: &str, image: &super::image::Image) {
        self.member(&self.add_blob(image.config.data.clone()), repo);
        for l in &image.layers {
            self.member(&self.add_blob(l.data.clone()), repo);
        }
        self.add_manifest(
            repo,
            Some(tag),
            image.media_type.as_str(),
            image.manifest.clone(),
        );
    }

    /// Stores an index, all images it refers to, and tags the index.
    pub fn push_index(&self, repo: &str, tag: &str, index: &super::image::Index) {
        for (img, _) in &index.images {
            self.push_image_untagged(repo, img);
        }
        self.add_manifest(
            repo,
            Some(tag),
            index.media_type.as_str(),
            index.manifest.clone(),
        );
    }

    pub fn push_image_untagged(&self, repo: &str, image: &super::image::Image) {
        self.member(&self.add_blob(image.config.data.clone()), repo);
        for l in &image.layers {
            self.member(&self.add_blob(l.data.clone()), repo);
        }
        self.add_manifest(
            repo,
            None,
            image.media_type.as_str(),
            image.manifest.clone(),
        );
    }

    /// Points `repo:tag` at `digest` (which must be a stored manifest).
    pub fn set_tag(&self, repo: &str, tag: &str, digest: &str) {
        let mut store = self.inner.store.lock().unwrap();
        assert!(
            store.manifests.contains_key(digest),
            "set_tag: unknown manifest {digest}"
        );
        store
            .tags
            .entry(repo.to_string())
            .or_default()
            .insert(tag.to_string(), digest.to_string());
    }

    pub fn add_tag_names(&self, repo: &str, tags: &[&str], digest: &str) {
        for t in tags {
            self.set_tag(repo, t, digest);
        }
    }

    // ----- knobs ---------------------------------------------------------

    pub fn set_failure(&self, f: Failure) {
        self.inner.down.store(f == Failure::Down, Ordering::SeqCst);
        *self.inner.failure.lock().unwrap() = f;
    }

    /// Every `/v2/` request waits `d` before it is answered (refusals
    /// included).
    pub fn set_delay(&self, d: Duration) {
        *self.inner.delay.lock().unwrap() = d;
    }

    /// Paginate referrers answers by `n` when the client gives no `n` (as
    /// a registry with a default page size does).
    pub fn set_referrers_page(&self, n: usize) {
        self.inner.referrers_page.store(n, Ordering::SeqCst);
    }

    /// Serve blob bodies as a stream without Content-Length (chunked).
    pub fn set_chunked(&self, on: bool) {
        self.inner.chunked.store(on, Ordering::SeqCst);
    }

    /// Serve wrong bytes (same length, one byte flipped in every 4 KiB) for
    /// `digest` (blob or manifest).
    pub fn corrupt(&self, digest: &str) {
        self.inner
            .corrupt
            .lock()
            .unwrap()
            .insert(digest.to_string());
    }

    /// Blob `digest` is sent with its full Content-Length but the
    /// connection breaks after half the body.
    pub fn truncate(&self, digest: &str) {
        self.inner
            .truncate
            .lock()
            .unwrap()
            .insert(digest.to_string());
    }

    pub fn untruncate(&self, digest: &str) {
        self.inner.truncate.lock().unwrap().remove(digest);
    }

    pub fn uncorrupt(&self, digest: &str) {
        self.inner.corrupt.lock().unwrap().remove(digest);
    }

    /// From now on every GET of blob `digest` sends the first half of the
    /// body, then waits until [`Hold::release`].
    pub fn hold(&self, digest: &str) -> Hold {
        let (released, _) = watch::channel(false);
        let (halves_sent, _) = watch::channel(0);
        let (completed, _) = watch::channel(0);
        let (dropped, _) = watch::channel(0);
        let state = Arc::new(HoldState {
            released,
            halves_sent,
            completed,
            dropped,
        });
        self.inner
            .holds
            .lock()
            .unwrap()
            .insert(digest.to_string(), state.clone());
        Hold { state }
    }

    pub fn unhold(&self, digest: &str) {
        if let Some(s) = self.inner.holds.lock().unwrap().remove(digest) {
            s.released.send_replace(true);
        }
    }

    /// Every request for exactly `path` waits `delay` before it is
    /// answered (after it is recorded).
    pub fn delay(&self, path: &str, delay: Duration) {
        self.inner
            .delays
            .lock()
            .unwrap()
            .insert(path.to_string(), delay);
    }

    /// Only `repos` have blob `digest`: a GET or HEAD under any other
    /// repository gets `404 BLOB_UNKNOWN`.
    pub fn blob_only_in(&self, digest: &str, repos: &[&str]) {
        self.inner.blob_repos.lock().unwrap().insert(
            digest.to_string(),
            repos.iter().map(|r| r.to_string()).collect(),
        );
    }

    /// Every GET of blob or manifest `digest` (by digest or by a tag
    /// pointing at it) misbehaves as `fault` from now on.
    pub fn fault(&self, digest: &str, fault: BodyFault) {
        self.inner
            .faults
            .lock()
            .unwrap()
            .insert(digest.to_string(), fault);
    }

    /// Every GET of exactly `path` (tags lists, referrers, the token
    /// endpoint, ...) gets the answer it would get, misbehaving as `fault`.
    pub fn fault_path(&self, path: &str, fault: BodyFault) {
        self.inner
            .path_faults
            .lock()
            .unwrap()
            .insert(path.to_string(), fault);
    }

    /// Ends the fault of `digest`.
    pub fn clear_fault(&self, digest: &str) {
        self.inner.faults.lock().unwrap().remove(digest);
    }

    /// Ends every fault.
    pub fn clear_faults(&self) {
        self.inner.faults.lock().unwrap().clear();
        self.inner.path_faults.lock().unwrap().clear();
    }

    /// The next `statuses.len()` requests under `/v2/<name>/` are answered
    /// with these statuses in order (an OCI error body; `Retry-After: 1`
    /// with 429 and 503): a burst of failures.
    pub fn fail_next(&self, statuses: &[u16]) {
        self.inner.statuses.lock().unwrap().extend(statuses);
    }

    /// Stops recording requests (the log and the counts grow with every
    /// request: a soak that measures memory turns them off).
    pub fn forget_requests(&self) {
        self.inner.forgetful.store(true, Ordering::Relaxed);
    }

    /// Bodies the fake is sending now (a stalled body counts until the
    /// connection carrying it is closed).
    pub fn bodies_open(&self) -> usize {
        self.inner.bodies_open.load(Ordering::SeqCst)
    }

    /// Require bearer tokens from `/token` for everything under `/v2/`.
    /// Tokens expire after `expires_in` seconds.
    pub fn enable_auth(&self, expires_in: u64) {
        let mut a = self.inner.auth.lock().unwrap();
        a.enabled = true;
        a.expires_in = expires_in;
    }

    /// Credentials the token endpoint accepts (Basic auth) for private repos.
    pub fn set_credentials(&self, user: &str, password: &str) {
        self.inner.auth.lock().unwrap().credentials =
            Some((user.to_string(), password.to_string()));
    }

    /// Tokens for `repo` are only granted with valid credentials.
    pub fn set_private(&self, repo: &str) {
        self.inner
            .auth
            .lock()
            .unwrap()
            .private
            .insert(repo.to_string());
    }

    /// The `service` the bearer challenge names (default `fake`).
    pub fn set_service(&self, service: &str) {
        self.inner.auth.lock().unwrap().service = service.to_string();
    }

    /// Issue JWT-shaped tokens (`aud` the service, `exp`; the signature is
    /// random bytes: only the fake checks them, by lookup).
    pub fn set_jwt_tokens(&self, on: bool) {
        self.inner.auth.lock().unwrap().jwt = on;
    }

    /// Whether the bearer challenge names the scope (default yes).
    pub fn set_challenge_scope(&self, on: bool) {
        self.inner.auth.lock().unwrap().challenge_scope = on;
    }

    /// Forgets every token issued: they are refused from now on.
    pub fn revoke_tokens(&self) {
        self.inner.tokens.lock().unwrap().clear();
    }

    /// Require HTTP Basic credentials on everything under `/v2/` (the
    /// registry itself, no token endpoint): `401` with
    /// `Basic realm="Registry Realm"` otherwise.
    pub fn require_basic(&self, user: &str, password: &str) {
        self.inner.auth.lock().unwrap().basic = Some((user.to_string(), password.to_string()));
    }

    /// Answers every request for exactly `path` (any method) with `status`,
    /// `headers` and `body`, once the request passed the auth checks (if
    /// auth is on). Paths outside `/v2/` (object storage, a path prefix)
    /// work too.
    pub fn respond(&self, path: &str, status: u16, headers: &[(&str, &str)], body: &str) {
        self.script(path, status, headers, body, true);
    }

    /// Like [`FakeUpstream::respond`], but before any auth check (and in
    /// place of the token endpoint when `path` is `/token`).
    pub fn respond_open(&self, path: &str, status: u16, headers: &[(&str, &str)], body: &str) {
        self.script(path, status, headers, body, false);
    }

    fn script(
        &self,
        path: &str,
        status: u16,
        headers: &[(&str, &str)],
        body: &str,
        after_auth: bool,
    ) {
        let canned = Canned {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: Bytes::from(body.to_string()),
            after_auth,
        };
        self.inner
            .canned
            .lock()
            .unwrap()
            .insert(path.to_string(), canned);
    }

    // ----- observations --------------------------------------------------

    /// Requests seen for exactly (method, path); path excludes the query.
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.inner
            .counts
            .lock()
            .unwrap()
            .get(&(method.to_string(), path.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// All requests seen (including `/token`).
    pub fn total(&self) -> usize {
        self.inner.log.lock().unwrap().len()
    }

    /// Requests matching a predicate.
    pub fn count_where(&self, f: impl Fn(&Recorded) -> bool) -> usize {
        self.inner
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| f(r))
            .count()
    }

    fn count_suffix(&self, method: &str, suffix: &str) -> usize {
        self.count_where(|r| {
            r.method == method && r.path.starts_with("/v2/") && r.path.ends_with(suffix)
        })
    }

    /// GETs of `/v2/<any repo>/blobs/<digest>`.
    pub fn blob_gets(&self, digest: &str) -> usize {
        self.count_suffix("GET", &format!("/blobs/{digest}"))
    }

    pub fn blob_heads(&self, digest: &str) -> usize {
        self.count_suffix("HEAD", &format!("/blobs/{digest}"))
    }

    /// GETs of any blob at all.
    pub fn all_blob_gets(&self) -> usize {
        self.count_where(|r| r.method == "GET" && r.path.contains("/blobs/"))
    }

    /// GETs of `/v2/<repo>/manifests/<reference>`.
    pub fn manifest_gets(&self, repo: &str, reference: &str) -> usize {
        self.count("GET", &format!("/v2/{repo}/manifests/{reference}"))
    }

    pub fn manifest_heads(&self, repo: &str, reference: &str) -> usize {
        self.count("HEAD", &format!("/v2/{repo}/manifests/{reference}"))
    }

    /// Requests of any method to any manifest of `repo`.
    pub fn manifest_requests(&self, repo: &str) -> usize {
        let prefix = format!("/v2/{repo}/manifests/");
        self.count_where(|r| r.path.starts_with(&prefix))
    }

    /// Requests to the token endpoint.
    pub fn token_requests(&self) -> usize {
        self.count_where(|r| r.path == "/token")
    }

    /// Requests that reached `/v2/...` (not `/token`).
    pub fn registry_requests(&self) -> usize {
        self.count_where(|r| r.path.starts_with("/v2"))
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.log.lock().unwrap().clone()
    }

    /// The most recent request with this method and path.
    pub fn last_request(&self, method: &str, path: &str) -> Option<Recorded> {
        self.inner
            .log
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|r| r.method == method && r.path == path)
            .cloned()
    }

    /// The most recent request to `/token`.
    pub fn last_token_request(&self) -> Option<Recorded> {
        self.inner
            .log
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|r| r.path == "/token")
            .cloned()
    }

    /// TCP connections accepted and served.
    pub fn connections(&self) -> usize {
        self.inner.connections.load(Ordering::SeqCst)
    }
}

impl Canned {
    fn reply(&self, head: bool) -> Response<Body> {
        let mut b = Response::builder().status(self.status);
        for (k, v) in &self.headers {
            b = b.header(k.as_str(), v.as_str());
        }
        b.body(if head {
            empty()
        } else {
            full(self.body.clone())
        })
        .unwrap()
    }
}

/// A URL on 127.0.0.1 where nothing listens.
pub async fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

pub fn oci_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({"errors": [{"code": code, "message": message, "detail": null}]});
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("docker-distribution-api-version", "registry/2.0")
        .body(full(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

fn corrupt_bytes(data: &Bytes) -> Bytes {
    let mut v = data.to_vec();
    if v.is_empty() {
        return Bytes::new();
    }
    let mut i = 0;
    while i < v.len() {
        v[i] ^= 0x5a;
        i += 4096;
    }
    let last = v.len() - 1;
    v[last] ^= 0xa5;
    Bytes::from(v)
}

fn query_params(q: Option<&str>) -> Vec<(String, String)> {
    let Some(q) = q else { return Vec::new() };
    q.split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a single `bytes=a-b` / `bytes=a-` / `bytes=-n` range.
fn parse_range(h: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = h.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let r = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 || len == 0 {
            return Some(Err(()));
        }
        (len.saturating_sub(n), len - 1)
    } else {
        let start: u64 = a.parse().ok()?;
        let end: u64 = if b.is_empty() {
            len.saturating_sub(1)
        } else {
            b.parse().ok()?
        };
        if start >= len || end < start {
            return Some(Err(()));
        }
        (start, end.min(len - 1))
    };
    Some(Ok(r))
}

impl Inner {
    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: usize,
    ) -> Result<Response<Body>, std::io::Error> {
        let path = req.uri().path().to_string();
        let head = req.method() == Method::HEAD;
        let fault = self.path_faults.lock().unwrap().get(&path).copied();
        let open = self.bodies_open.clone();
        let resp = self.answer(req, conn).await?;
        let Some(fault) = fault.filter(|_| !head) else {
            return Ok(resp);
        };
        // The answer as it would have been, sent misbehaving.
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await?.to_bytes();
        let mut builder = Response::builder().status(parts.status);
        for (k, v) in &parts.headers {
            if k != http::header::CONTENT_LENGTH {
                builder = builder.header(k, v);
            }
        }
        Ok(faulty(builder, bytes, fault, &open))
    }

    async fn answer(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: usize,
    ) -> Result<Response<Body>, std::io::Error> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query = req.uri().query().map(str::to_string);
        if !self.forgetful.load(Ordering::Relaxed) {
            self.log.lock().unwrap().push(Recorded {
                conn,
                version: req.version(),
                method: method.to_string(),
                path: path.clone(),
                query: query.clone(),
                headers: req.headers().clone(),
            });
            *self
                .counts
                .lock()
                .unwrap()
                .entry((method.to_string(), path.clone()))
                .or_default() += 1;
        }

        let delay = self.delays.lock().unwrap().get(&path).copied();
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        if path.starts_with("/v2/") && path.len() > "/v2/".len() {
            let next = self.statuses.lock().unwrap().pop_front();
            if let Some(status) = next {
                let status = StatusCode::from_u16(status).unwrap();
                let mut r = oci_error(status, "UNAVAILABLE", "failing on purpose");
                if status.as_u16() == 429 || status.as_u16() == 503 {
                    r.headers_mut()
                        .insert("retry-after", HeaderValue::from_static("1"));
                }
                return Ok(r);
            }
        }

        let failure = self.failure.lock().unwrap().clone();
        match failure {
            Failure::None => {}
            Failure::Unavailable => {
                return Ok(oci_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UNAVAILABLE",
                    "service unavailable",
                ));
            }
            Failure::TooManyRequests { retry_after } => {
                let mut r = oci_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "TOOMANYREQUESTS",
                    "too many requests",
                );
                r.headers_mut().insert(
                    "retry-after",
                    HeaderValue::from_str(&retry_after.to_string()).unwrap(),
                );
                return Ok(r);
            }
            Failure::Down => {
                return Err(std::io::Error::other("fake upstream is down"));
            }
        }

        let canned = self.canned.lock().unwrap().get(&path).cloned();
        if let Some(c) = &canned
            && !c.after_auth
        {
            return Ok(c.reply(method == Method::HEAD));
        }
        if path == "/token" {
            return Ok(self.token(&req, query.as_deref()));
        }
        if let Some(c) = &canned
            && !path.starts_with("/v2/")
        {
            return Ok(c.reply(method == Method::HEAD));
        }
        if path != "/v2" && !path.starts_with("/v2/") {
            return Ok(oci_error(StatusCode::NOT_FOUND, "NOT_FOUND", "not found"));
        }
        let delay = *self.delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if method != Method::GET && method != Method::HEAD {
            return Ok(oci_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "UNSUPPORTED",
                "the fake upstream is read-only",
            ));
        }
        let head = method == Method::HEAD;

        if path == "/v2/" || path == "/v2" {
            if let Some(resp) = self.check_auth(&req, None) {
                return Ok(resp);
            }
            return Ok(Response::builder()
                .header("content-type", "application/json")
                .header("docker-distribution-api-version", "registry/2.0")
                .header("content-length", "2")
                .body(if head { empty() } else { full("{}") })
                .unwrap());
        }

        if let Some(c) = &canned {
            if let Some(resp) = self.check_auth(&req, None) {
                return Ok(resp);
            }
            return Ok(c.reply(head));
        }
        let rest = &path["/v2/".len()..];
        if let Some(name) = rest.strip_suffix("/tags/list") {
            if let Some(resp) = self.check_auth(&req, Some(name)) {
                return Ok(resp);
            }
            return Ok(self.tags_list(name, query.as_deref(), head));
        }
        let mut parts = rest.rsplitn(3, '/');
        let (Some(reference), Some(kind), Some(name)) = (parts.next(), parts.next(), parts.next())
        else {
            return Ok(oci_error(StatusCode::NOT_FOUND, "NOT_FOUND", "not found"));
        };
        if let Some(resp) = self.check_auth(&req, Some(name)) {
            return Ok(resp);
        }
        match kind {
            "manifests" | "blobs" if !self.is_member(reference, name) => {
                let code = if kind == "blobs" {
                    "BLOB_UNKNOWN"
                } else {
                    "MANIFEST_UNKNOWN"
                };
                Ok(oci_error(
                    StatusCode::NOT_FOUND,
                    code,
                    "unknown to this repository",
                ))
            }
            "manifests" => Ok(self.manifest(name, reference, head, req.headers())),
            "blobs" => Ok(self.blob(name, reference, head, req.headers())),
            "referrers" => Ok(self.referrers(name, reference, query.as_deref(), head)),
            _ => Ok(oci_error(StatusCode::NOT_FOUND, "NOT_FOUND", "not found")),
        }
    }

    fn challenge(&self, name: Option<&str>) -> Response<Body> {
        let (service, with_scope) = {
            let a = self.auth.lock().unwrap();
            (a.service.clone(), a.challenge_scope)
        };
        let mut v = format!(
            "Bearer realm=\"http://{}/token\",service=\"{service}\"",
            self.addr
        );
        if let Some(name) = name.filter(|_| with_scope) {
            v.push_str(&format!(",scope=\"repository:{name}:pull\""));
        }
        let mut r = oci_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "authentication required",
        );
        r.headers_mut()
            .insert("www-authenticate", HeaderValue::from_str(&v).unwrap());
        r
    }

    /// `None` when the request may proceed.
    fn check_auth(&self, req: &Request<Incoming>, name: Option<&str>) -> Option<Response<Body>> {
        let basic = self.auth.lock().unwrap().basic.clone();
        if let Some((user, password)) = basic {
            let want = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            );
            let got = req.headers().get("authorization");
            if got.is_some_and(|g| g.as_bytes() == want.as_bytes()) {
                return None;
            }
            let mut r = oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "who are you");
            r.headers_mut().insert(
                "www-authenticate",
                HeaderValue::from_static("Basic realm=\"Registry Realm\""),
            );
            return Some(r);
        }
        if !self.auth.lock().unwrap().enabled {
            return None;
        }
        let Some(tok) = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return Some(self.challenge(name));
        };
        let tokens = self.tokens.lock().unwrap();
        let Some(t) = tokens.get(tok) else {
            return Some(self.challenge(name));
        };
        if Instant::now() >= t.expires {
            return Some(self.challenge(name));
        }
        if let Some(name) = name
            && !t.repos.contains(name)
        {
            return Some(self.challenge(Some(name)));
        }
        None
    }

    fn token(&self, req: &Request<Incoming>, query: Option<&str>) -> Response<Body> {
        let auth = self.auth.lock().unwrap();
        let params = query_params(query);
        // Basic credentials, if any, must be right.
        let mut authenticated = false;
        if let Some(h) = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
        {
            let Some(b64) = h.strip_prefix("Basic ") else {
                return oci_error(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    "token endpoint wants Basic auth",
                );
            };
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()
                .and_then(|d| String::from_utf8(d).ok());
            let ok = match (&decoded, &auth.credentials) {
                (Some(d), Some((u, p))) => d.split_once(':') == Some((u.as_str(), p.as_str())),
                _ => false,
            };
            if !ok {
                return oci_error(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    "incorrect username or password",
                );
            }
            authenticated = true;
        }
        let mut repos = HashSet::new();
        for (k, v) in &params {
            if k != "scope" {
                continue;
            }
            // repository:<name>:<actions>
            let mut it = v.splitn(3, ':');
            if let (Some("repository"), Some(name), Some(actions)) =
                (it.next(), it.next(), it.next())
                && actions.split(',').any(|a| a == "pull")
                && (authenticated || !auth.private.contains(name))
            {
                repos.insert(name.to_string());
            }
        }
        let n = self.token_seq.fetch_add(1, Ordering::SeqCst);
        let mut token = format!("faketoken-{n}-{}", super::image::random_hex(8));
        if auth.jwt {
            let b64 = |v: serde_json::Value| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
            };
            let exp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                + auth.expires_in;
            token = format!(
                "{}.{}.{}",
                b64(serde_json::json!({"alg": "ES256", "typ": "JWT"})),
                b64(
                    serde_json::json!({"iss": "fake", "aud": auth.service, "exp": exp, "jti": token})
                ),
                super::image::random_hex(32),
            );
        }
        self.tokens.lock().unwrap().insert(
            token.clone(),
            Token {
                expires: Instant::now() + Duration::from_secs(auth.expires_in),
                repos,
            },
        );
        let body = serde_json::json!({
            "token": token,
            "access_token": token,
            "expires_in": auth.expires_in,
            "issued_at": httpdate::fmt_http_date(std::time::SystemTime::now()),
        });
        Response::builder()
            .header("content-type", "application/json")
            .body(full(serde_json::to_vec(&body).unwrap()))
            .unwrap()
    }

    fn tags_list(&self, name: &str, query: Option<&str>, head: bool) -> Response<Body> {
        let store = self.store.lock().unwrap();
        let Some(tags) = store.tags.get(name) else {
            return oci_error(
                StatusCode::NOT_FOUND,
                "NAME_UNKNOWN",
                "repository name not known to registry",
            );
        };
        let params = query_params(query);
        let n: Option<usize> = params
            .iter()
            .find(|(k, _)| k == "n")
            .and_then(|(_, v)| v.parse().ok());
        let last = params
            .iter()
            .find(|(k, _)| k == "last")
            .map(|(_, v)| v.clone());
        let mut list: Vec<&String> = tags
            .keys()
            .filter(|t| last.as_ref().is_none_or(|l| t.as_str() > l.as_str()))
            .collect();
        let mut more = false;
        if let Some(n) = n
            && list.len() > n
        {
            list.truncate(n);
            more = true;
        }
        let body = serde_json::to_vec(&serde_json::json!({"name": name, "tags": list})).unwrap();
        let mut b = Response::builder()
            .header("content-type", "application/json")
            .header("content-length", body.len().to_string());
        if more {
            b = b.header(
                "link",
                format!(
                    "</v2/{name}/tags/list?n={}&last={}>; rel=\"next\"",
                    n.unwrap(),
                    list.last().unwrap()
                ),
            );
        }
        b.body(if head { empty() } else { full(body) }).unwrap()
    }

    /// Whether `reference` (a digest; tags always are) may be served under
    /// `repo` (see `set_strict_repos`).
    fn is_member(&self, reference: &str, repo: &str) -> bool {
        !reference.contains(':')
            || !self.strict_repos.load(Ordering::SeqCst)
            || self
                .members
                .lock()
                .unwrap()
                .get(reference)
                .is_some_and(|repos| repos.contains(repo))
    }

    /// A manifest, negotiated by `Accept` as CNCF distribution 2.8 does
    /// (see [`Negotiated`]).
    fn manifest(
        &self,
        name: &str,
        reference: &str,
        head: bool,
        headers: &HeaderMap,
    ) -> Response<Body> {
        let store = self.store.lock().unwrap();
        let by_tag = !reference.contains(':');
        let digest = if !by_tag {
            reference.to_string()
        } else {
            match store.tags.get(name).and_then(|t| t.get(reference)) {
                Some(d) => d.clone(),
                None => {
                    return oci_error(
                        StatusCode::NOT_FOUND,
                        "MANIFEST_UNKNOWN",
                        "manifest unknown",
                    );
                }
            }
        };
        let Some(m) = store.manifests.get(&digest) else {
            return oci_error(
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                "manifest unknown",
            );
        };
        let (digest, m) = match negotiate(&store, &digest, m, by_tag, headers) {
            Negotiated::Serve(digest, m) => (digest, m),
            Negotiated::Unknown(why) => {
                return oci_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", why);
            }
            Negotiated::Schema1 => {
                // What distribution sends: a freshly signed body each time,
                // with the digest of its unsigned payload in the header.
                let body = format!(
                    "{{\"schemaVersion\":1,\"name\":\"{name}\",\"signatures\":[\"{}\"]}}",
                    super::image::random_hex(16)
                );
                return Response::builder()
                    .header("content-type", SCHEMA1_SIGNED)
                    .header("docker-content-digest", sha256_digest(name.as_bytes()))
                    .header("content-length", body.len().to_string())
                    .body(if head { empty() } else { full(body) })
                    .unwrap();
            }
        };
        let body = if self.corrupt.lock().unwrap().contains(&digest) {
            corrupt_bytes(&m.body)
        } else {
            m.body.clone()
        };
        let builder = Response::builder()
            .header("content-type", m.media_type.as_str())
            .header("docker-content-digest", digest.as_str())
            .header("etag", format!("\"{digest}\""));
        let fault = self.faults.lock().unwrap().get(&digest).copied();
        if let Some(fault) = fault.filter(|_| !head) {
            return faulty(builder, body, fault, &self.bodies_open);
        }
        builder
            .header("content-length", body.len().to_string())
            .body(if head { empty() } else { full(body) })
            .unwrap()
    }

    /// OCI 1.1 referrers: an image index of every stored manifest whose
    /// `subject` is `digest`, filtered by `artifactType` when asked (and
    /// then saying so in `OCI-Filters-Applied`); paginated like the tags
    /// list when `n` is given or a default page size is set (by digest,
    /// after `last`, with a `Link` to the next page).
    fn referrers(
        &self,
        name: &str,
        digest: &str,
        query: Option<&str>,
        head: bool,
    ) -> Response<Body> {
        let params = query_params(query);
        let param = |key: &str| {
            params
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        let filter = param("artifactType");
        let default_page = self.referrers_page.load(Ordering::SeqCst);
        let n: Option<usize> = param("n")
            .and_then(|v| v.parse().ok())
            .or((default_page > 0).then_some(default_page));
        let last = param("last");
        let store = self.store.lock().unwrap();
        let mut found: Vec<(String, serde_json::Value)> = Vec::new();
        for (d, m) in &store.manifests {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.body) else {
                continue;
            };
            if v["subject"]["digest"] != digest {
                continue;
            }
            let artifact_type = v["artifactType"]
                .as_str()
                .or(v["config"]["mediaType"].as_str())
                .unwrap_or_default()
                .to_string();
            if filter.as_ref().is_some_and(|f| *f != artifact_type) {
                continue;
            }
            let mut desc = serde_json::json!({
                "mediaType": m.media_type,
                "digest": d,
                "size": m.body.len(),
                "artifactType": artifact_type,
            });
            if !v["annotations"].is_null() {
                desc["annotations"] = v["annotations"].clone();
            }
            found.push((d.clone(), desc));
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found.retain(|(d, _)| last.as_ref().is_none_or(|l| d > l));
        let mut next = None;
        if let Some(n) = n
            && found.len() > n
        {
            found.truncate(n);
            next = found.last().map(|(d, _)| d.clone());
        }
        let body = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": found.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        }))
        .unwrap();
        let mut b = Response::builder()
            .header("content-type", "application/vnd.oci.image.index.v1+json")
            .header("content-length", body.len().to_string());
        if filter.is_some() {
            b = b.header("oci-filters-applied", "artifactType");
        }
        if let (Some(n), Some(last)) = (n, next) {
            b = b.header(
                "link",
                format!("</v2/{name}/referrers/{digest}?n={n}&last={last}>; rel=\"next\""),
            );
        }
        b.body(if head { empty() } else { full(body) }).unwrap()
    }

    fn blob(&self, name: &str, digest: &str, head: bool, headers: &HeaderMap) -> Response<Body> {
        let elsewhere = self
            .blob_repos
            .lock()
            .unwrap()
            .get(digest)
            .is_some_and(|repos| !repos.contains(name));
        let found = self.store.lock().unwrap().blobs.get(digest).cloned();
        let data = match found.filter(|_| !elsewhere) {
            Some(d) => d.clone(),
            None => {
                return oci_error(
                    StatusCode::NOT_FOUND,
                    "BLOB_UNKNOWN",
                    "blob unknown to registry",
                );
            }
        };
        let data = if self.corrupt.lock().unwrap().contains(digest) {
            corrupt_bytes(&data)
        } else {
            data
        };
        let len = data.len() as u64;
        let builder = Response::builder()
            .header("content-type", "application/octet-stream")
            .header("docker-content-digest", digest)
            .header("accept-ranges", "bytes");
        if head {
            return builder
                .header("content-length", len.to_string())
                .body(empty())
                .unwrap();
        }
        if let Some(r) = headers.get("range").and_then(|v| v.to_str().ok())
            && let Some(r) = parse_range(r, len)
        {
            return match r {
                Ok((s, e)) => builder
                    .status(StatusCode::PARTIAL_CONTENT)
                    .header("content-range", format!("bytes {s}-{e}/{len}"))
                    .header("content-length", (e - s + 1).to_string())
                    .body(full(data.slice(s as usize..=e as usize)))
                    .unwrap(),
                Err(()) => builder
                    .status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header("content-range", format!("bytes */{len}"))
                    .body(empty())
                    .unwrap(),
            };
        }
        let chunked = self.chunked.load(Ordering::SeqCst);
        let hold = self.holds.lock().unwrap().get(digest).cloned();
        let builder = if chunked {
            builder
        } else {
            builder.header("content-length", len.to_string())
        };
        if self.truncate.lock().unwrap().contains(digest) {
            return builder.body(truncated_body(data)).unwrap();
        }
        let fault = self.faults.lock().unwrap().get(digest).copied();
        if let Some(fault) = fault {
            let builder = Response::builder()
                .header("content-type", "application/octet-stream")
                .header("docker-content-digest", digest);
            return faulty(builder, data, fault, &self.bodies_open);
        }
        if let Some(hold) = hold {
            return builder.body(held_body(data, hold)).unwrap();
        }
        if chunked {
            return builder.body(chunked_body(data)).unwrap();
        }
        builder.body(full(data)).unwrap()
    }
}

/// Counts a body as open until it is dropped.
struct OpenBody(Arc<AtomicUsize>);

impl OpenBody {
    fn new(open: &Arc<AtomicUsize>) -> OpenBody {
        open.fetch_add(1, Ordering::SeqCst);
        OpenBody(open.clone())
    }
}

impl Drop for OpenBody {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response for `data` misbehaving as `fault` (the builder carries the
/// other headers).
fn faulty(
    builder: http::response::Builder,
    data: Bytes,
    fault: BodyFault,
    open: &Arc<AtomicUsize>,
) -> Response<Body> {
    let len = data.len() as u64;
    let length = match fault {
        BodyFault::LongerThanLength(n) => len.saturating_sub(n),
        BodyFault::ShorterThanLength(n) => len + n,
        _ => len,
    };
    let guard = OpenBody::new(open);
    type Frames = Vec<(Duration, Result<Bytes, &'static str>)>;
    let half = data.slice(..data.len() / 2);
    // (wait before, frame or error); a final `None` wait means "never end".
    let (frames, stall): (Frames, bool) = match fault {
        BodyFault::StallAfterHead => (vec![], true),
        BodyFault::StallMidBody => (vec![(Duration::ZERO, Ok(half))], true),
        BodyFault::ResetMidBody => (
            vec![
                (Duration::ZERO, Ok(half)),
                (Duration::ZERO, Err("fake upstream: reset on purpose")),
            ],
            false,
        ),
        // hyper sends no more than the Content-Length it was given.
        BodyFault::LongerThanLength(_) => (vec![(Duration::ZERO, Ok(data))], false),
        // The body ends short of its Content-Length: hyper closes the
        // connection.
        BodyFault::ShorterThanLength(_) => (vec![(Duration::ZERO, Ok(data))], false),
        BodyFault::Frames(size) => {
            let frames = (0..data.len())
                .step_by(size.max(1))
                .map(|i| {
                    (
                        Duration::from_millis(1),
                        Ok(data.slice(i..(i + size.max(1)).min(data.len()))),
                    )
                })
                .collect();
            (frames, false)
        }
        BodyFault::Drip(rate) => {
            let step = (rate / 10).max(1) as usize;
            let frames = (0..data.len())
                .step_by(step)
                .map(|i| {
                    (
                        Duration::from_millis(100),
                        Ok(data.slice(i..(i + step).min(data.len()))),
                    )
                })
                .collect();
            (frames, false)
        }
    };
    let stream = futures_util::stream::unfold(
        (frames.into_iter(), stall, guard),
        |(mut frames, stall, guard)| async move {
            match frames.next() {
                Some((wait, frame)) => {
                    tokio::time::sleep(wait).await;
                    let item = frame.map(Frame::data).map_err(std::io::Error::other);
                    Some((item, (frames, stall, guard)))
                }
                None if stall => {
                    // Hold the connection open, sending nothing.
                    std::future::pending::<()>().await;
                    None
                }
                None => None,
            }
        },
    );
    builder
        .header("content-length", length.to_string())
        .body(http_body_util::BodyExt::boxed_unsync(StreamBody::new(
            stream.boxed(),
        )))
        .unwrap()
}

/// The first half, then a transport error (hyper aborts the connection).
fn truncated_body(data: Bytes) -> Body {
    let half = data.slice(..data.len() / 2);
    let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
        Ok(Frame::data(half)),
        Err(std::io::Error::other("fake upstream: truncated on purpose")),
    ];
    http_body_util::BodyExt::boxed_unsync(StreamBody::new(futures_util::stream::iter(frames)))
}

/// The body in 64 KiB frames, with no known length.
fn chunked_body(data: Bytes) -> Body {
    let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = (0..data.len())
        .step_by(64 * 1024)
        .map(|i| Ok(Frame::data(data.slice(i..(i + 64 * 1024).min(data.len())))))
        .collect();
    http_body_util::BodyExt::boxed_unsync(StreamBody::new(futures_util::stream::iter(chunks)))
}

/// First half, then (once released) the rest. Reports progress on `hold`.
fn held_body(data: Bytes, hold: Arc<HoldState>) -> Body {
    let half = data.len() / 2;
    let guard = DropGuard {
        state: hold,
        done: false,
    };
    let stream = futures_util::stream::unfold(
        (0u8, data, guard),
        move |(step, data, mut guard)| async move {
            match step {
                0 => {
                    let first = data.slice(..half);
                    Some((Ok(Frame::data(first)), (1, data, guard)))
                }
                1 => {
                    // hyper polls again only after taking the first half.
                    guard.state.halves_sent.send_modify(|v| *v += 1);
                    let mut rx = guard.state.released.subscribe();
                    let _ = rx.wait_for(|r| *r).await;
                    let rest = data.slice(half..);
                    guard.done = true;
                    guard.state.completed.send_modify(|v| *v += 1);
                    Some((Ok(Frame::data(rest)), (2, data, guard)))
                }
                _ => None,
            }
        },
    );
    http_body_util::BodyExt::boxed_unsync(StreamBody::new(stream.boxed()))
}

/// Docker schema 1, signed: what distribution converts to.
pub const SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// What [`negotiate`] decided.
enum Negotiated {
    /// This manifest (the one asked for, or a list's `linux/amd64` entry).
    Serve(String, StoredManifest),
    /// 404 `MANIFEST_UNKNOWN`, with distribution's message.
    Unknown(&'static str),
    /// A schema 1 conversion.
    Schema1,
}

/// Which known manifest types an `Accept` names, as distribution 2.8 reads
/// it: every header, split at commas, parameters (`q`) dropped.
fn accepted(headers: &HeaderMap) -> HashSet<String> {
    headers
        .get_all("accept")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .collect()
}

/// distribution 2.8's `GetManifest`, as measured against Debian's
/// docker-registry 2.8.2: OCI manifests and indexes only to clients that
/// accept them (by tag and by digest); Docker manifests and lists by
/// digest to anyone; by tag, a list to clients that do not accept lists
/// becomes its linux/amd64 manifest, and a Docker manifest to clients that
/// do not accept schema 2 becomes a schema 1 conversion.
fn negotiate(
    store: &Store,
    digest: &str,
    m: &StoredManifest,
    by_tag: bool,
    headers: &HeaderMap,
) -> Negotiated {
    use super::image::{DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
    let accepts = accepted(headers);
    let ok = |t: &str| accepts.contains(t);
    match m.media_type.as_str() {
        OCI_MANIFEST if !ok(OCI_MANIFEST) => Negotiated::Unknown(
            "OCI manifest found, but accept header does not support OCI manifests",
        ),
        OCI_INDEX if !ok(OCI_INDEX) => {
            Negotiated::Unknown("OCI index found, but accept header does not support OCI indexes")
        }
        DOCKER_MANIFEST if by_tag && !ok(DOCKER_MANIFEST) => Negotiated::Schema1,
        DOCKER_LIST if by_tag && !ok(DOCKER_LIST) => {
            #[derive(serde::Deserialize)]
            struct Entry {
                digest: String,
                platform: Option<serde_json::Value>,
            }
            #[derive(serde::Deserialize)]
            struct List {
                manifests: Vec<Entry>,
            }
            let amd64 = serde_json::from_slice::<List>(&m.body)
                .ok()
                .and_then(|l| {
                    l.manifests.into_iter().find(|e| {
                        e.platform
                            .as_ref()
                            .is_some_and(|p| p["architecture"] == "amd64" && p["os"] == "linux")
                    })
                })
                .and_then(|e| {
                    store
                        .manifests
                        .get(&e.digest)
                        .map(|c| (e.digest, c.clone()))
                });
            match amd64 {
                None => Negotiated::Unknown("manifest unknown"),
                Some((_, c)) if c.media_type == DOCKER_MANIFEST && !ok(DOCKER_MANIFEST) => {
                    Negotiated::Schema1
                }
                Some((d, c)) => Negotiated::Serve(d, c),
            }
        }
        _ => Negotiated::Serve(digest.to_string(), m.clone()),
    }
}
