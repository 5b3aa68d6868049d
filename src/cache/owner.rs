//! Asking a manifest's owner in the cluster (see `crate::cluster`): a
//! manifest by digest, or a tag, is fetched from the node that owns its
//! key with one peer request, verified here as if it came from upstream
//! (by digest: it must hash to that digest; by tag: to the owner's
//! `Docker-Content-Digest`), and kept locally. For a tag, the owner says
//! how much longer it trusts it (`x-stowage-fresh-ms`), so this node's copy
//! expires when the owner's does: one revalidation upstream per TTL
//! cluster-wide, not one per node.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, header};
use http_body_util::{BodyExt, Limited};

use super::manifests::{MAX_MANIFEST, Manifest};
use crate::cluster::{Cluster, Peer};
use crate::error::{Asked, Error};
use crate::metrics::{CacheKind, PeerKind, PeerResult};
use crate::oci::headers::{
    DOCKER_CONTENT_DIGEST, X_STOWAGE_CACHE, X_STOWAGE_ERROR_SOURCE, X_STOWAGE_FRESH_MS,
};
use crate::oci::manifest::{self, AcceptClass};
use crate::oci::{Digest, RepoName};
use crate::upstream::Upstream;

/// A manifest the owner sent, verified.
pub(super) struct FromOwner {
    pub(super) manifest: Manifest,
    /// For a tag: how much longer the owner trusts it.
    pub(super) fresh_for: Option<Duration>,
    /// The owner serves the tag stale (its upstream is out).
    pub(super) stale: bool,
}

/// Why the owner gave no manifest.
pub(super) enum OwnerMiss {
    /// Ask the next node, or upstream.
    Next,
    /// The owner's answer came from upstream: the answer for the client
    /// (asking upstream again would only repeat it).
    Final(Error),
}

/// What to ask an owner for.
pub(super) struct Question<'a> {
    /// The rendezvous key.
    pub(super) key: &'a [u8],
    /// A digest, or a tag.
    pub(super) reference: &'a str,
    /// The digest asked for; `None` for a tag.
    pub(super) expected: Option<&'a Digest>,
    /// The accept class whose `Accept` the request carries (a tag is
    /// answered, and cached on the owner, per class).
    pub(super) accept: AcceptClass,
}

/// Asks the peers ranked above this node for `asked`, owner first.
/// `Ok(None)`: this node owns the key, or no peer could answer; go
/// upstream.
pub(super) async fn ask(
    cluster: &Arc<Cluster>,
    upstream: &Upstream,
    repo: &RepoName,
    asked: Question<'_>,
) -> Result<Option<FromOwner>, Error> {
    let kind = if asked.expected.is_some() {
        PeerKind::Manifest
    } else {
        PeerKind::Tag
    };
    for (i, peer) in cluster.ask_first(asked.key).iter().enumerate() {
        if i == 0 {
            cluster.metrics().owner_hop(kind);
        }
        match fetch(cluster, peer, kind, upstream, repo, &asked).await {
            Ok(m) => return Ok(Some(m)),
            Err(OwnerMiss::Final(e)) => return Err(e),
            Err(OwnerMiss::Next) => {}
        }
    }
    Ok(None)
}

/// One peer request for a manifest, verified.
async fn fetch(
    cluster: &Cluster,
    peer: &Arc<Peer>,
    kind: PeerKind,
    upstream: &Upstream,
    repo: &RepoName,
    asked: &Question<'_>,
) -> Result<FromOwner, OwnerMiss> {
    let (reference, expected) = (asked.reference, asked.expected);
    let metrics = cluster.metrics();
    let what = format!("{repo}@{reference} from peer {}", peer.url());
    let resp = cluster
        .client()
        .send(
            peer,
            Method::GET,
            repo.as_str(),
            &format!("manifests/{reference}"),
            upstream.host(),
            asked.accept.headers(),
        )
        .await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            metrics.peer_request(kind, PeerResult::Unreachable);
            cluster.peer_failed(peer, &e.0);
            return Err(OwnerMiss::Next);
        }
    };
    let status = resp.status();
    if status != StatusCode::OK {
        metrics.peer_request(kind, PeerResult::Status);
        let from_upstream = resp
            .headers()
            .get(X_STOWAGE_ERROR_SOURCE)
            .is_some_and(|v| v.as_bytes() == b"upstream");
        if from_upstream {
            return Err(OwnerMiss::Final(Error::upstream_status(
                status,
                Asked::Manifest,
                resp.headers().get(header::RETRY_AFTER),
                &format!("{repo}@{reference}"),
            )));
        }
        tracing::info!(manifest = %what, %status, "peer did not serve the manifest; going on without it");
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            tracing::error!(peer = %peer.url(), %status,
                "peer refused this node's request: is the cluster secret the same on every node?");
            cluster.peer_failed(peer, &format!("refused this node ({status})"));
        }
        return Err(OwnerMiss::Next);
    }
    let headers = resp.headers().clone();
    // The peer client bounds the wait for the head only: a peer that stops
    // after it would hold this request, and every request for the same key
    // waiting on it, for good. The owner answers once it holds the whole
    // manifest, so its body gets what upstream's gets.
    let body = match read_body(resp.into_body(), upstream.timeout()).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            metrics.peer_request(kind, PeerResult::Broken);
            tracing::info!(manifest = %what, error = %e, "reading a manifest from a peer failed");
            return Err(OwnerMiss::Next);
        }
        Err(_) => {
            metrics.peer_request(kind, PeerResult::Broken);
            let why = format!(
                "sent no complete manifest body within {}",
                humantime::format_duration(upstream.timeout())
            );
            tracing::info!(manifest = %what, "peer {why}; going on without it");
            cluster.peer_failed(peer, &why);
            return Err(OwnerMiss::Next);
        }
    };
    let announced =
        header_str(&headers, &DOCKER_CONTENT_DIGEST).and_then(|v| Digest::parse(v).ok());
    let Some(want) = expected.cloned().or(announced) else {
        metrics.peer_request(kind, PeerResult::Status);
        tracing::warn!(manifest = %what, "peer sent a manifest without Docker-Content-Digest");
        return Err(OwnerMiss::Next);
    };
    let got = Digest::of(want.algorithm(), &body);
    if got != want {
        metrics.peer_request(kind, PeerResult::Mismatch);
        metrics.digest_mismatch(CacheKind::Manifest);
        tracing::warn!(manifest = %what, expected = %want, %got, "peer sent a manifest that fails verification");
        cluster.peer_failed(peer, "sent a manifest that failed verification");
        return Err(OwnerMiss::Next);
    }
    metrics.peer_request(kind, PeerResult::Ok);
    cluster.peer_succeeded(peer);
    let media_type = manifest::media_type(header_str(&headers, &header::CONTENT_TYPE), &body);
    let fresh_for = header_str(&headers, &X_STOWAGE_FRESH_MS)
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis);
    let stale = header_str(&headers, &X_STOWAGE_CACHE) == Some("stale");
    Ok(FromOwner {
        manifest: Manifest::new(got, media_type, body),
        fresh_for,
        stale,
    })
}

/// A peer's manifest body, whole within `timeout` (the outer error) and
/// at most [`MAX_MANIFEST`] bytes. A copy, as `manifests::read_body`'s: it
/// is kept for long (the memory cache), and a body that came in one read
/// is a slice of the buffer it landed in, which it would keep whole.
async fn read_body<B>(
    body: B,
    timeout: Duration,
) -> Result<Result<Bytes, Box<dyn std::error::Error + Send + Sync>>, tokio::time::error::Elapsed>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let read = Limited::new(body, MAX_MANIFEST).collect();
    let collected = tokio::time::timeout(timeout, read).await?;
    Ok(collected.map(|b| Bytes::copy_from_slice(&b.to_bytes())))
}

fn header_str<'a>(h: &'a HeaderMap, name: &header::HeaderName) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_peer_manifest_body_keeps_no_receive_buffer_alive() {
        let live = Arc::default();
        let read = crate::body::tracked_buffer(400 * 1024, b"{}", &live);
        let body = http_body_util::Full::new(read.slice(0..2));
        let kept = read_body(body, Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        drop(read);
        assert_eq!(&kept[..], b"{}");
        assert_eq!(live.load(std::sync::atomic::Ordering::Relaxed), 0);
    }
}
