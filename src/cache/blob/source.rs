//! Where a fill gets its bytes: an ordered list of sources, tried in turn.
//!
//! On a node in a cluster that does not own the digest, the list starts
//! with the owner (and the next live node in the digest's rendezvous order
//! if that one ranks above this node too); then, acting as owner itself,
//! the shared store (`[store]`) and last the upstream registry the first
//! request named. A peer is trusted no
//! more than upstream: the fill hashes and verifies whatever comes.
//!
//! A source that cannot be reached (or answers with trouble of its own) is
//! skipped for the next one; a peer that did not answer is marked down. A
//! source that breaks off mid-body (a peer killed, say) is not the fill's
//! end either: the next source is asked for the rest with
//! `Range: bytes=<received>-` and the fill carries on, still hashing, so
//! the clients reading the fill never notice. Only upstream's own answer
//! is final (its 404, its failure, its broken body), since there is
//! nowhere left to go; and a peer's error that came from upstream (the
//! `x-stowage-error-source` header) is final too, since asking upstream
//! again would only repeat it.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::BodyDataStream;
use hyper::body::Incoming;

use crate::bucket::Bucket;
use crate::cluster::{Cluster, Peer};
use crate::error::{Asked, Error, ErrorKind};
use crate::metrics::{PeerKind, PeerResult};
use crate::oci::headers::X_STOWAGE_ERROR_SOURCE;
use crate::oci::{Digest, RepoName};
use crate::upstream::caller::Caller;
use crate::upstream::{Upstream, UpstreamBody, is_idle_timeout};

/// A body being received, as a stream of chunks.
pub(super) type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, Error>> + Send>>;

/// The upstream registry and repository the first request named.
#[derive(Clone)]
pub(super) struct Origin {
    pub(super) upstream: Arc<Upstream>,
    pub(super) repo: RepoName,
    /// Whose credentials ask (passthrough: the caller that leads the fill,
    /// already authorized for the digest in `repo`).
    pub(super) caller: Caller,
}

/// One place bytes can come from.
#[derive(Clone)]
pub(super) enum Source {
    /// A node of the cluster ranked above this one for the digest.
    Peer(Arc<Peer>),
    /// The shared store.
    Bucket(Arc<Bucket>),
    /// The upstream registry: always last.
    Upstream,
}

/// A source's answer: the body from the offset asked for, and the blob's
/// size when the source gave it.
pub(super) struct Opened {
    pub(super) body: ByteStream,
    pub(super) total: Option<u64>,
    /// Index of the source in the list.
    pub(super) index: usize,
}

/// Why a source gave no body.
enum Miss {
    /// Try the next source.
    Next(Error),
    /// The answer for the client.
    Final(Error),
}

/// The sources of one fill, in order.
#[derive(Clone)]
pub(super) struct Sources {
    pub(super) origin: Origin,
    cluster: Option<Arc<Cluster>>,
    list: Vec<Source>,
}

impl Sources {
    /// The owner and the next nodes ranked above this one (peers up only,
    /// with a `cluster`), the shared store (with a `bucket`), upstream.
    pub(super) fn new(
        origin: Origin,
        cluster: Option<Arc<Cluster>>,
        bucket: Option<Arc<Bucket>>,
        digest: &Digest,
    ) -> Sources {
        let mut list: Vec<Source> = match &cluster {
            Some(c) => c
                .ask_first(&crate::cluster::digest_key(digest))
                .into_iter()
                .map(Source::Peer)
                .collect(),
            None => Vec::new(),
        };
        if let Some(b) = bucket {
            list.push(Source::Bucket(b));
        }
        list.push(Source::Upstream);
        Sources {
            origin,
            cluster,
            list,
        }
    }

    /// Whether source `index` is upstream.
    pub(super) fn is_upstream(&self, index: usize) -> bool {
        matches!(self.list.get(index), Some(Source::Upstream))
    }

    /// The shared store, when it is among the sources.
    pub(super) fn bucket(&self) -> Option<&Arc<Bucket>> {
        self.list.iter().find_map(|s| match s {
            Source::Bucket(b) => Some(b),
            _ => None,
        })
    }

    /// Whether a fill that lost source `index` mid-body can go on from the
    /// next one.
    pub(super) fn can_continue_after(&self, index: usize) -> bool {
        !matches!(self.list.get(index), Some(Source::Upstream) | None)
    }

    /// For logs: what source `index` is.
    pub(super) fn describe(&self, index: usize) -> String {
        match self.list.get(index) {
            Some(Source::Peer(p)) => format!("peer {}", p.url()),
            Some(Source::Bucket(b)) => format!("store {}", b.name()),
            Some(Source::Upstream) | None => format!("upstream {}", self.origin.upstream.host()),
        }
    }

    /// The first source from `start` on that gives the blob's bytes from
    /// offset `from`.
    pub(super) async fn open(
        &self,
        digest: &Digest,
        from: u64,
        start: usize,
    ) -> Result<Opened, Error> {
        let mut last = None;
        for index in start..self.list.len() {
            let attempt = match &self.list[index] {
                Source::Peer(peer) => self.open_peer(peer, index, digest, from).await,
                Source::Bucket(bucket) => open_bucket(bucket, digest, from).await,
                Source::Upstream => self.open_upstream(digest, from).await,
            };
            match attempt {
                Ok((body, total)) => return Ok(Opened { body, total, index }),
                Err(Miss::Final(e)) => return Err(e),
                Err(Miss::Next(e)) => {
                    tracing::info!(%digest, source = %self.describe(index), error = %e.report(),
                        "blob source unavailable, trying the next");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::internal("a blob fill has no source")))
    }

    /// The blob's size, asked with `HEAD` of each source in turn.
    pub(super) async fn head(&self, digest: &Digest) -> Result<Option<u64>, Error> {
        for (index, source) in self.list.iter().enumerate() {
            match source {
                Source::Peer(peer) => match self
                    .ask_peer(peer, index, Method::HEAD, digest, HeaderMap::new())
                    .await
                {
                    Ok(resp) => return Ok(content_length(resp.headers())),
                    Err(Miss::Final(e)) => return Err(e),
                    Err(Miss::Next(_)) => {}
                },
                Source::Bucket(b) => {
                    if let Ok(Some(size)) = b.blob_size(digest).await {
                        return Ok(Some(size));
                    }
                }
                Source::Upstream => break,
            }
        }
        self.origin
            .ask(Method::HEAD, digest, HeaderMap::new())
            .await
            .map(|(_, len)| len)
    }

    /// Counts a broken body of source `index` (and marks a peer down).
    pub(super) fn broke(&self, index: usize, why: &str) {
        if let (Some(Source::Peer(p)), Some(c)) = (self.list.get(index), &self.cluster) {
            c.metrics().peer_request(PeerKind::Blob, PeerResult::Broken);
            c.peer_failed(p, why);
        }
    }

    /// The sources among `used` sent bytes that failed verification: peers
    /// are counted and marked down, the store's object is deleted, so the
    /// next attempt goes elsewhere.
    pub(super) async fn distrust(&self, used: &[usize], digest: &Digest) {
        for i in used {
            match (self.list.get(*i), &self.cluster) {
                (Some(Source::Peer(p)), Some(c)) => {
                    c.metrics()
                        .peer_request(PeerKind::Blob, PeerResult::Mismatch);
                    c.peer_failed(p, "sent a blob that failed verification");
                }
                (Some(Source::Bucket(b)), _) => b.forget_blob(digest).await,
                _ => {}
            }
        }
    }

    /// `GET`/`HEAD` of the blob on `peer`: a 200 (or 206) response, or why
    /// not.
    async fn ask_peer(
        &self,
        peer: &Arc<Peer>,
        index: usize,
        method: Method,
        digest: &Digest,
        headers: HeaderMap,
    ) -> Result<Response<Incoming>, Miss> {
        let Some(cluster) = &self.cluster else {
            return Err(Miss::Next(Error::internal("no cluster")));
        };
        let metrics = cluster.metrics();
        if index == 0 && !headers.contains_key(header::RANGE) {
            metrics.owner_hop(PeerKind::Blob);
        }
        let resp = cluster
            .client()
            .send(
                peer,
                method,
                self.origin.repo.as_str(),
                &format!("blobs/{digest}"),
                self.origin.upstream.host(),
                headers,
            )
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                metrics.peer_request(PeerKind::Blob, PeerResult::Unreachable);
                cluster.peer_failed(peer, &e.0);
                return Err(Miss::Next(Error::upstream(ErrorKind::Unreachable, e.0)));
            }
        };
        let status = resp.status();
        if status == StatusCode::OK || status == StatusCode::PARTIAL_CONTENT {
            metrics.peer_request(PeerKind::Blob, PeerResult::Ok);
            cluster.peer_succeeded(peer);
            return Ok(resp);
        }
        metrics.peer_request(PeerKind::Blob, PeerResult::Status);
        let e = Error::upstream_status(
            status,
            Asked::Blob,
            resp.headers().get(header::RETRY_AFTER),
            &digest.to_string(),
        );
        let from_upstream = resp
            .headers()
            .get(X_STOWAGE_ERROR_SOURCE)
            .is_some_and(|v| v.as_bytes() == b"upstream");
        if from_upstream {
            return Err(Miss::Final(e));
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            // Not upstream's answer: the peer refused this node (another
            // cluster secret). Going upstream beats failing the client.
            tracing::error!(peer = %peer.url(), %status,
                "peer refused this node's request: is the cluster secret the same on every node?");
            cluster.peer_failed(peer, &format!("refused this node ({status})"));
        }
        Err(Miss::Next(e))
    }

    async fn open_peer(
        &self,
        peer: &Arc<Peer>,
        index: usize,
        digest: &Digest,
        from: u64,
    ) -> Result<(ByteStream, Option<u64>), Miss> {
        let resp = self
            .ask_peer(peer, index, Method::GET, digest, range_from(from))
            .await?;
        let what = format!("peer {}", peer.url());
        let (body, total) = ranged_body(resp, from, &what, digest).map_err(Miss::Next)?;
        Ok((body, total))
    }

    async fn open_upstream(
        &self,
        digest: &Digest,
        from: u64,
    ) -> Result<(ByteStream, Option<u64>), Miss> {
        let (resp, _) = self
            .origin
            .ask(Method::GET, digest, range_from(from))
            .await
            .map_err(Miss::Final)?;
        let what = format!("upstream {}", self.origin.upstream.host());
        ranged_body(resp, from, &what, digest).map_err(Miss::Final)
    }
}

/// The blob from the shared store: a miss or a failure just moves on to
/// upstream.
async fn open_bucket(
    bucket: &Bucket,
    digest: &Digest,
    from: u64,
) -> Result<(ByteStream, Option<u64>), Miss> {
    match bucket.blob(digest, from).await {
        Ok(Some(obj)) => {
            let what = format!("store {}", bucket.name());
            let digest = digest.clone();
            let body: ByteStream = Box::pin(obj.body.map(move |r| {
                r.map_err(|e| {
                    Error::upstream(
                        ErrorKind::BodyBroken,
                        format!("{what}: body of {digest} broke off: {e}"),
                    )
                    .with_cause(e)
                })
            }));
            Ok((body, Some(obj.size)))
        }
        Ok(None) => Err(Miss::Next(Error::upstream(
            ErrorKind::BlobUnknown,
            format!("{digest} is not in the store"),
        ))),
        Err(e) => Err(Miss::Next(
            Error::upstream(ErrorKind::Unreachable, e.to_string()).with_cause(e),
        )),
    }
}

impl Origin {
    /// Sends `method` for the blob upstream (with `headers`: a `Range`);
    /// anything but 200 or 206 becomes the error for the client. Returns
    /// the response and its `Content-Length`.
    pub(super) async fn ask(
        &self,
        method: Method,
        digest: &Digest,
        headers: HeaderMap,
    ) -> Result<(Response<UpstreamBody>, Option<u64>), Error> {
        let resp = self
            .upstream
            .send_as(
                &self.caller,
                method,
                self.repo.as_str(),
                &format!("blobs/{digest}"),
                headers,
            )
            .await?;
        let status = resp.status();
        if status != StatusCode::OK && status != StatusCode::PARTIAL_CONTENT {
            return Err(Error::upstream_status(
                status,
                Asked::Blob,
                resp.headers().get(header::RETRY_AFTER),
                // Worded as `http/passthrough.rs` words its `HEAD`'s answer,
                // so a refusal says nothing of whether the blob is held.
                &format!("{}/blobs/{digest}", self.repo),
            ));
        }
        let len = content_length(resp.headers());
        Ok((resp, len))
    }
}

/// `Range: bytes=<from>-`, or nothing from 0.
fn range_from(from: u64) -> HeaderMap {
    let mut h = HeaderMap::new();
    if from > 0
        && let Ok(v) = HeaderValue::from_str(&format!("bytes={from}-"))
    {
        h.insert(header::RANGE, v);
    }
    h
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// `Content-Range: bytes <start>-<end>/<total>` as (start, total).
fn content_range(headers: &HeaderMap) -> Option<(u64, Option<u64>)> {
    let v = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let (span, total) = v.strip_prefix("bytes ")?.split_once('/')?;
    let (start, _) = span.split_once('-')?;
    Some((start.parse().ok()?, total.parse().ok()))
}

/// The body of a response to a request for the blob from `from` on, as a
/// stream starting exactly at `from` (a 200 answer to a ranged request has
/// its first `from` bytes skipped), and the blob's size when known.
fn ranged_body<B>(
    resp: Response<B>,
    from: u64,
    what: &str,
    digest: &Digest,
) -> Result<(ByteStream, Option<u64>), Error>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let len = content_length(resp.headers());
    let partial = resp.status() == StatusCode::PARTIAL_CONTENT;
    let total = if partial {
        match content_range(resp.headers()) {
            Some((start, total)) if start == from => total.or(len.map(|l| from + l)),
            _ => {
                return Err(Error::upstream(
                    ErrorKind::UpstreamProtocol,
                    format!("{what} answered bytes={from}- of {digest} with another range"),
                ));
            }
        }
    } else {
        len
    };
    let what = what.to_string();
    let digest = digest.clone();
    let body: ByteStream = Box::pin(BodyDataStream::new(resp.into_body()).map(move |r| {
        r.map_err(|e| {
            let e: Box<dyn std::error::Error + Send + Sync> = e.into();
            let how = if is_idle_timeout(e.as_ref()) {
                "stalled (no byte within its timeout)"
            } else {
                "broke off"
            };
            Error::upstream(
                ErrorKind::BodyBroken,
                format!("{what}: body of {digest} {how}: {e}"),
            )
            .with_cause(e)
        })
    }));
    if partial || from == 0 {
        return Ok((body, total));
    }
    Ok((skip(body, from), total))
}

/// `stream` without its first `n` bytes.
fn skip(stream: ByteStream, mut n: u64) -> ByteStream {
    Box::pin(stream.filter_map(move |item| {
        let out = match item {
            Ok(b) if n >= b.len() as u64 => {
                n -= b.len() as u64;
                None
            }
            Ok(b) => {
                let rest = b.slice(n as usize..);
                n = 0;
                Some(Ok(rest))
            }
            Err(e) => Some(Err(e)),
        };
        futures_util::future::ready(out)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn skip_drops_exactly_the_prefix() {
        let chunks: Vec<Result<Bytes, Error>> = vec![
            Ok(Bytes::from_static(b"abc")),
            Ok(Bytes::from_static(b"defg")),
            Ok(Bytes::from_static(b"hi")),
        ];
        for n in 0..=9u64 {
            let s: ByteStream = Box::pin(futures_util::stream::iter(chunks.to_vec()));
            let got: Vec<Bytes> = skip(s, n).map(|r| r.unwrap()).collect().await;
            let joined: Vec<u8> = got.iter().flat_map(|b| b.to_vec()).collect();
            assert_eq!(joined, b"abcdefghi"[n as usize..].to_vec(), "n={n}");
            assert!(got.iter().all(|b| !b.is_empty()));
        }
    }
}
