//! What a request may be served of the cache ([`Access`]), decided before
//! the cache is asked: for a passthrough upstream (`auth = "passthrough"`)
//! from what upstream said of the caller's own credential (see
//! `cache/grants.rs` for what is remembered, `upstream/caller.rs` for how
//! the credential travels); for a mirror-mode upstream, everything but
//! private content (`cache/private.rs`).
//!
//! * A tag, or referrers of a digest: the caller may read the repository.
//!   Unknown yet: a `HEAD` of that tag (with the client's accept class), or
//!   of the subject manifest, with the caller's credential.
//! * A manifest or blob by digest: the caller may read the repository and
//!   upstream said the digest is in it. Unknown yet: [`Access::Own`], the
//!   request fetches it itself with its credential (one `GET`, no `HEAD`,
//!   when nobody holds it), and held content is [`confirm`]ed with a `HEAD`
//!   of it in that repository first.
//!
//! Upstream's answer is the answer: 200 lets the request go on (and is
//! remembered), 401 goes back to the caller with upstream's challenge, 403
//! and 404 as `DENIED` and `*_UNKNOWN`, worded alike whether the digest is
//! held or not (no oracle); when upstream cannot be asked (outage), a
//! caller not already known gets the outage, not the cache. So a blob fill
//! (shared by every request for its digest) is only ever joined by callers
//! upstream let read that digest in their repository.

use http::{HeaderMap, Method, StatusCode, header};

use super::AppState;
use crate::cache::manifests::Manifest;
use crate::cache::private::Access;
use crate::error::{Asked, Error};
use crate::oci::manifest::{AcceptClass, refs_of};
use crate::oci::{Digest, RepoName, Tag};
use crate::upstream::Upstream;
use crate::upstream::caller::Caller;

/// What a request asks the cache for.
#[derive(Clone, Copy)]
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

/// What the request may be served of the cache, or why it may not go on.
/// Callers of mirror-mode upstreams get [`Access::Public`].
pub(crate) async fn authorize(
    state: &AppState,
    upstream: &Upstream,
    repo: &RepoName,
    caller: &Caller,
    asking: Asking<'_>,
) -> Result<Access, Error> {
    let Some(credential) = caller.credential() else {
        return Ok(Access::Public);
    };
    let readable = state.grants.may_read(upstream, repo, credential);
    match asking {
        Asking::Tag(..) | Asking::Referrers(_) if readable => return Ok(Access::Any),
        Asking::Manifest(d) | Asking::Blob(d)
            if readable && state.grants.located(upstream, repo, d) =>
        {
            return Ok(Access::Any);
        }
        // A caller without credentials is refused at once by `confirm`
        // once upstream's challenge is known.
        Asking::Manifest(_) | Asking::Blob(_) if !credential.is_anonymous() => {
            return Ok(Access::Own);
        }
        _ => {}
    }
    confirm(state, upstream, repo, caller, asking).await?;
    Ok(Access::Any)
}

/// Asks upstream (`HEAD`, with the caller's credential, or the mirror's
/// own for a mirror-mode upstream) whether what `asking` names is there
/// for the caller, and remembers a yes: for a passthrough caller, that it
/// may read `repo` and where the digest is; for the mirror, that the
/// digest is public. Any other answer is the error to answer with.
///
/// Boxed: the state of a request upstream is several KiB, and unboxed it
/// would sit inline in the future of every request that may confirm, hits
/// included (see `routes::handle`).
pub(crate) async fn confirm(
    state: &AppState,
    upstream: &Upstream,
    repo: &RepoName,
    caller: &Caller,
    asking: Asking<'_>,
) -> Result<(), Error> {
    Box::pin(ask_upstream(state, upstream, repo, caller, asking)).await
}

/// [`confirm`], unboxed.
async fn ask_upstream(
    state: &AppState,
    upstream: &Upstream,
    repo: &RepoName,
    caller: &Caller,
    asking: Asking<'_>,
) -> Result<(), Error> {
    let (tail, headers, asked, digest) = match asking {
        Asking::Tag(tag, class) => (
            format!("manifests/{tag}"),
            class.upstream().headers(),
            Asked::Manifest,
            None,
        ),
        Asking::Manifest(d) | Asking::Referrers(d) => (
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
    let count = |result| {
        if caller.credential().is_some() {
            upstream
                .metrics()
                .passthrough_check(upstream.host(), result);
        }
    };
    let resp = match answer {
        Ok(r) => r,
        Err(e) => {
            let e = Error::from(e);
            let refused = matches!(e.kind(), crate::error::ErrorKind::Unauthorized { .. });
            count(if refused { "refused" } else { "error" });
            return Err(e);
        }
    };
    if resp.status() != StatusCode::OK {
        count(if resp.status().is_client_error() {
            "refused"
        } else {
            "error"
        });
        return Err(Error::upstream_status(
            resp.status(),
            asked,
            resp.headers().get(header::RETRY_AFTER),
            &format!("{repo}/{tail}"),
        ));
    }
    count("allowed");
    let Some(credential) = caller.credential() else {
        if let Some(d) = digest {
            state.private.clear(d);
        }
        return Ok(());
    };
    // A tag's HEAD names the digest it points at for this caller.
    let named = resp
        .headers()
        .get(crate::oci::headers::DOCKER_CONTENT_DIGEST)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Digest::parse(v).ok());
    state.grants.allow(upstream, repo, credential);
    state
        .grants
        .locate(upstream, repo, digest.into_iter().chain(named.as_ref()));
    Ok(())
}

/// Remembers what a request with [`Access::Own`] learnt by fetching
/// `digest` from upstream itself: the caller may read `repo`, and the
/// digest is in it.
pub(crate) fn fetched(
    state: &AppState,
    upstream: &Upstream,
    repo: &RepoName,
    caller: &Caller,
    digest: &Digest,
) {
    if let Some(credential) = caller.credential() {
        state.grants.allow(upstream, repo, credential);
        state.grants.locate(upstream, repo, [digest]);
    }
}

/// Remembers, after a manifest was served by tag, that the tag's manifest
/// is in `repo` (the tag is upstream's word for it; what the manifest
/// refers to is not, see `cache/grants.rs`).
pub(crate) fn served_by_tag(
    state: &AppState,
    upstream: &Upstream,
    repo: &RepoName,
    caller: &Caller,
    m: &Manifest,
) {
    if caller.credential().is_some() {
        state.grants.locate(upstream, repo, [&m.digest]);
    }
}

/// Remembers that the artifacts a referrers answer lists are in `repo`
/// (upstream's referrers API lists manifests of that repository).
pub(crate) fn served_referrers(
    state: &AppState,
    upstream: &Upstream,
    repo: &RepoName,
    caller: &Caller,
    body: &[u8],
) {
    if caller.credential().is_some() {
        let refs = refs_of(body);
        state.grants.locate(upstream, repo, refs.manifests.iter());
    }
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
