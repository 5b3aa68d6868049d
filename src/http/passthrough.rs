//! Authorizing a request to a passthrough upstream (`auth = "passthrough"`)
//! before the cache answers it: the caller's own credential must have been
//! let by upstream to read what is asked (see `cache/grants.rs` for what
//! is remembered, and `upstream/caller.rs` for how the credential travels).
//!
//! * A tag, or referrers of a digest: the caller may read the repository.
//!   Unknown yet: a `HEAD` of that tag (with the client's accept class), or
//!   of the subject manifest, with the caller's credential.
//! * A manifest or blob by digest: the digest is known to be in the
//!   repository for this caller. Unknown yet: a `HEAD` of that manifest or
//!   blob in that repository with the caller's credential.
//!
//! Upstream's answer is the answer: 200 lets the request go on (and is
//! remembered), 401 goes back to the caller with upstream's challenge, 403
//! and 404 as `DENIED` and `*_UNKNOWN`; when upstream cannot be asked
//! (outage), a caller not already known gets the outage, not the cache.
//! Only requests let through this way reach the cache, so a blob fill
//! (shared by every request for its digest) is only ever led or joined by
//! callers upstream let read that digest in their repository.
//!
//! After a manifest or referrers answer, the digests it refers to are
//! remembered for the caller in that repository, so a pull needs no
//! `HEAD` per layer.

use http::{HeaderMap, Method, StatusCode, header};

use super::AppState;
use crate::cache::manifests::Manifest;
use crate::error::{Asked, Error};
use crate::oci::manifest::{AcceptClass, refs_of};
use crate::oci::{Digest, RepoName, Tag};
use crate::upstream::Upstream;
use crate::upstream::caller::Caller;

/// What a request asks the cache for.
pub(crate) enum Asking<'a> {
    /// A manifest by tag, for a client of this class.
    Tag(&'a Tag, AcceptClass),
    /// A manifest by digest.
    Manifest(&'a Digest),
    /// A blob.
    Blob(&'a Digest),
    /// The referrers of a manifest.
    Referrers(&'a Digest),
}

/// Lets the request through, or answers why not. Callers of mirror-mode
/// upstreams always pass.
pub(crate) async fn authorize(
    state: &AppState,
    upstream: &Upstream,
    repo: &RepoName,
    caller: &Caller,
    asking: Asking<'_>,
) -> Result<(), Error> {
    let Some(credential) = caller.credential() else {
        return Ok(());
    };
    let grant = state.grants.get(upstream, repo, credential);
    let (tail, headers, asked, digest) = match asking {
        Asking::Tag(tag, class) => {
            if grant.is_some() {
                return Ok(());
            }
            (
                format!("manifests/{tag}"),
                class.upstream().headers(),
                Asked::Manifest,
                None,
            )
        }
        Asking::Referrers(subject) => {
            if grant.is_some() {
                return Ok(());
            }
            (
                format!("manifests/{subject}"),
                AcceptClass::ALL.headers(),
                Asked::Manifest,
                Some(subject),
            )
        }
        Asking::Manifest(d) | Asking::Blob(d) if grant.as_ref().is_some_and(|g| g.knows(d)) => {
            return Ok(());
        }
        Asking::Manifest(d) => (
            format!("manifests/{d}"),
            AcceptClass::ALL.headers(),
            Asked::Manifest,
            Some(d),
        ),
        Asking::Blob(d) => (format!("blobs/{d}"), HeaderMap::new(), Asked::Blob, Some(d)),
    };
    let answer = upstream
        .send_as(caller, Method::HEAD, repo.as_str(), &tail, headers)
        .await;
    let metrics = upstream.metrics();
    let resp = match answer {
        Ok(r) => r,
        Err(e) => {
            let e = Error::from(e);
            let result = if matches!(e.kind(), crate::error::ErrorKind::Unauthorized { .. }) {
                "refused"
            } else {
                "error"
            };
            metrics.passthrough_check(upstream.host(), result);
            return Err(e);
        }
    };
    if resp.status() != StatusCode::OK {
        let refused = resp.status().is_client_error();
        metrics.passthrough_check(upstream.host(), if refused { "refused" } else { "error" });
        return Err(Error::upstream_status(
            resp.status(),
            asked,
            resp.headers().get(header::RETRY_AFTER),
            &format!("{repo}/{tail}"),
        ));
    }
    metrics.passthrough_check(upstream.host(), "allowed");
    // A tag's HEAD names the digest it points at for this caller.
    let named = resp
        .headers()
        .get(crate::oci::headers::DOCKER_CONTENT_DIGEST)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Digest::parse(v).ok());
    state.grants.allow(
        upstream,
        repo,
        credential,
        digest.into_iter().chain(named.as_ref()),
    );
    Ok(())
}

/// Remembers for the caller that what `m` refers to is in `repo`: `m`
/// itself, an index's manifests, an image's config and layers.
pub(crate) fn served_manifest(
    state: &AppState,
    upstream: &Upstream,
    repo: &RepoName,
    caller: &Caller,
    m: &Manifest,
) {
    let Some(credential) = caller.credential() else {
        return;
    };
    let refs = refs_of(&m.body);
    state.grants.allow(
        upstream,
        repo,
        credential,
        std::iter::once(&m.digest)
            .chain(refs.manifests.iter())
            .chain(refs.blobs.iter()),
    );
}

/// Remembers for the caller that the artifacts a referrers answer lists
/// are in `repo`.
pub(crate) fn served_referrers(
    state: &AppState,
    upstream: &Upstream,
    repo: &RepoName,
    caller: &Caller,
    body: &[u8],
) {
    let Some(credential) = caller.credential() else {
        return;
    };
    let refs = refs_of(body);
    state
        .grants
        .allow(upstream, repo, credential, refs.manifests.iter());
}

/// `GET /v2/` for a passthrough upstream: upstream's own answer to the
/// caller's credential (a caller without one gets upstream's challenge,
/// remembered or fetched), so clients learn where to get a token.
pub(crate) async fn ping(upstream: &Upstream, caller: &Caller) -> Result<(), Error> {
    match upstream.ping_as(caller).await? {
        StatusCode::OK => Ok(()),
        status => Err(Error::upstream_status(
            status,
            Asked::Repository,
            None,
            "the registry API version check",
        )),
    }
}
