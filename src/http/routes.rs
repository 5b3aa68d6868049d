//! The registry API's routes: one function per route, and [`handle`], where
//! every request enters.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderMap, HeaderValue, Method, Request, Response, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::AppState;
use super::access_log::{LogLine, LoggedBody};
use super::error;
use super::passthrough::{self, Asking};
use super::request_id;
use super::routing::{ns_param, route_kind};
use crate::body::{self, Body};
use crate::cache::manifests::Manifest;
use crate::cache::private::Access;
use crate::cluster::Hop;
use crate::error::{Asked, Error, ErrorSource};
use crate::front::zerocopy::Regions;
use crate::metrics::Outcome;
use crate::oci::headers::{
    DOCKER_API_VERSION, OCI_FILTERS_APPLIED, X_STOWAGE_CACHE, X_STOWAGE_ERROR_SOURCE,
    X_STOWAGE_FRESH_MS, X_STOWAGE_HOP,
};
use crate::oci::manifest::{AcceptClass, OCI_INDEX};
use crate::oci::{Digest, ParseError, Reference, Route, parse_route};
use crate::upstream::Upstream;
use crate::upstream::caller::Caller;

/// Handles one request and wraps its body so that one log line is written
/// when the response is finished (or abandoned). Every request enters here.
///
/// This future is allocated and copied whole for every request
/// (`server.rs`), and an async fn's state holds the largest state of every
/// path it may take. So the paths a cache hit does not take (a miss's load,
/// a request upstream, the rare routes) are boxed where they start, and a
/// hit's future stays small: some 3 KiB in a release build, where it was
/// 42 KiB (wrk on a cached manifest spent 6 % of stowage's CPU copying it).
pub(crate) async fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let request_id = state.request_ids.for_request(req.headers());
    // Parsed once: the route decides the metrics label and the handler.
    let parsed = parse_route(&path);
    let route = route_kind(&parsed);
    // Pinned here, in this future's state, once: handed to the span
    // wrapper by value, it took a slot there as well.
    let dispatched = std::pin::pin!(dispatch(&state, &req, parsed, peer));
    let (response, outcome) = match in_span_once_waiting(dispatched, &request_id).await {
        Ok(answer) => answer,
        Err(e) => (Err(e), None),
    };
    let from_peer = req.headers().contains_key(X_STOWAGE_HOP);
    let mut response = response.unwrap_or_else(|e| {
        // The client's message is short (no upstream URLs); the report,
        // with its causes, is for the operator, with the request id the
        // client was given (this runs outside the request's span).
        match e.esource() {
            ErrorSource::Client => {
                tracing::debug!(%request_id, error = %e.report(), "request failed")
            }
            ErrorSource::Upstream => {
                tracing::info!(%request_id, source = "upstream", error = %e.report(), "request failed")
            }
            ErrorSource::Local => {
                tracing::warn!(%request_id, source = "local", error = %e.report(), "request failed")
            }
        }
        let mut r = error::response(&e, method == Method::HEAD);
        if from_peer {
            // Tells the asking node whether going upstream itself could
            // help (not when upstream answered this).
            r.headers_mut().insert(
                X_STOWAGE_ERROR_SOURCE,
                HeaderValue::from_static(e.esource().as_str()),
            );
        }
        r
    });
    response
        .headers_mut()
        .insert(DOCKER_API_VERSION, HeaderValue::from_static("registry/2.0"));
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(request_id::HEADER, v);
    }
    if let Some(outcome) = outcome {
        // How the mirror answered (hit, miss, join, stale, upstream): for
        // operators, `stowage warm` and debugging.
        response
            .headers_mut()
            .insert(X_STOWAGE_CACHE, HeaderValue::from_static(outcome.as_str()));
    }
    let status = response.status();
    state.metrics.request_started(route, &method, status);
    if let (Some(kind), Some(outcome)) = (route.cache(), outcome) {
        state.metrics.cache_outcome(kind, outcome);
    }
    let (parts, inner) = response.into_parts();
    let expected = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .or_else(|| hyper::body::Body::size_hint(&inner).exact());
    let logged = LoggedBody::new(
        inner,
        expected,
        LogLine {
            method,
            path,
            status,
            outcome,
            peer,
            started,
            request_id,
            route,
            metrics: state.metrics.clone(),
        },
    );
    Response::from_parts(parts, BodyExt::boxed(logged))
}

/// Runs `fut` in a `request` span (carrying the request id) that is opened
/// only once `fut` has to wait. A request answered in one poll (a cached
/// manifest, the head of a cached blob) logs nothing while it runs, and
/// opening, entering, leaving and closing a span was its largest share of
/// `tracing` (wrk on a cached manifest, profiled: `tracing`'s own code 2.6 %
/// of stowage's CPU with the span from the start, 0.5 % with this). What is
/// logged before the first wait goes without the span; the request
/// failures that [`handle`] logs carry the id as a field.
async fn in_span_once_waiting<F: Future>(mut fut: Pin<&mut F>, request_id: &str) -> F::Output {
    let mut span: Option<tracing::Span> = None;
    std::future::poll_fn(|cx| {
        // One call of `poll` (written twice, the handler's whole state
        // machine was inlined twice: 0.6 MiB more code).
        let polled = {
            let _entered = span.as_ref().map(tracing::Span::enter);
            fut.as_mut().poll(cx)
        };
        if polled.is_pending() && span.is_none() {
            span = Some(tracing::info_span!("request", request_id = %request_id));
        }
        polled
    })
    .await
}

/// A response (or the error to answer with) and how the mirror answered it
/// (`None` when no cache was involved: `/v2/`, most errors).
type Answer = (Result<Response<Body>, Error>, Option<Outcome>);

/// Checks access and the method, then hands the request to its route.
async fn dispatch(
    state: &AppState,
    req: &Request<Incoming>,
    route: Result<Route, ParseError>,
    peer: SocketAddr,
) -> Result<Answer, Error> {
    // Credentials first: an unauthenticated client learns nothing, not even
    // whether its path was valid. A peer's credential is the cluster secret.
    let hop = match &state.cluster {
        Some(cluster) => cluster.inbound(req.headers())?,
        None => Hop::Client,
    };
    if hop
        != (Hop::Peer {
            authenticated: true,
        })
    {
        state.access.check(req.headers(), peer.ip()).await?;
    }
    let route = route?;
    let method = req.method();
    let read_only = method == Method::GET || method == Method::HEAD;
    if !read_only || route == Route::Write {
        return Err(Error::unsupported(
            route != Route::Write,
            format!("{method} is not supported: this is a read-only pull-through mirror"),
        ));
    }
    let ns = ns_param(req.uri().query());
    let ns = ns.as_deref();
    // Blobs and manifests, the hot routes, keep their hits' futures small
    // (their misses are boxed where they start); the others are boxed here,
    // so that no route's state sits inline in every request's future (see
    // `handle`).
    match route {
        Route::Base => Box::pin(base(state, req, ns, hop)).await,
        Route::Write => Err(Error::unsupported(false, "pushing is not supported")),
        Route::Blob { name, digest } => blob(state, req, &name, ns, &digest, hop).await,
        Route::Manifest { name, reference } => {
            manifest(state, req, &name, ns, &reference, hop).await
        }
        Route::TagsList { name } => Box::pin(tags_list(state, req, &name, ns)).await,
        Route::Referrers { name, digest } => {
            Box::pin(referrers(state, req, &name, ns, &digest)).await
        }
    }
}

/// `/v2/`: the API version check. For a passthrough upstream, upstream's
/// own answer to the caller's credential (a 401 with its challenge tells
/// the client where to get a token).
async fn base(
    state: &AppState,
    req: &Request<Incoming>,
    ns: Option<&str>,
    hop: Hop,
) -> Result<Answer, Error> {
    // A peer's /v2/ is a liveness probe: nothing to relay.
    if let Some(upstream) = state.router.base(ns)
        && upstream.passthrough()
        && !hop.is_peer()
    {
        passthrough::ping(&upstream, &Caller::of(&upstream, req.headers())).await?;
    }
    let mut r = Response::new(if req.method() == Method::HEAD {
        body::empty()
    } else {
        body::full("{}")
    });
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("2"));
    Ok((Ok(r), None))
}

/// `/v2/<name>/blobs/<digest>`: from the blob cache.
async fn blob(
    state: &AppState,
    req: &Request<Incoming>,
    name: &str,
    ns: Option<&str>,
    digest: &Digest,
    hop: Hop,
) -> Result<Answer, Error> {
    let (upstream, repo) = state.router.route(name, ns)?;
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok());
    // Zero-copy sends need a plain connection speaking HTTP/1 (h2 copies
    // data into its own frames).
    let zero_copy = if req.version() <= http::Version::HTTP_11 {
        req.extensions().get::<Arc<Regions>>().cloned()
    } else {
        None
    };
    let head = req.method() == Method::HEAD;
    let caller = Caller::of(&upstream, req.headers());
    let asking = Asking::Blob(digest);
    let access = passthrough::authorize(state, &upstream, &repo, &caller, asking).await?;
    let serve = |access| {
        state.blobs.serve(
            &upstream,
            &repo,
            digest,
            range,
            head,
            zero_copy.clone(),
            caller.clone(),
            hop,
            access,
        )
    };
    let r = match serve(access).await? {
        Some(r) => {
            if access == Access::Own {
                passthrough::fetched(state, &upstream, &repo, &caller, digest);
            }
            r
        }
        None => {
            passthrough::confirm(state, &upstream, &repo, &caller, asking).await?;
            serve(Access::Any).await?.ok_or_else(|| unserved(digest))?
        }
    };
    Ok((r.response, Some(r.outcome)))
}

/// The error for content the cache refused to serve after upstream
/// confirmed it (it cannot happen: [`Access::Any`] is served anything).
fn unserved(digest: &Digest) -> Error {
    Error::internal(format!("{digest} not served after upstream confirmed it"))
}

/// `/v2/<name>/manifests/<reference>`: from the manifest cache, as the
/// client's `Accept` asks (its accept class).
async fn manifest(
    state: &AppState,
    req: &Request<Incoming>,
    name: &str,
    ns: Option<&str>,
    reference: &Reference,
    hop: Hop,
) -> Result<Answer, Error> {
    let (upstream, repo) = state.router.route(name, ns)?;
    let class = AcceptClass::from_headers(req.headers());
    let caller = Caller::of(&upstream, req.headers());
    let asking = match reference {
        Reference::Digest(d) => Asking::Manifest(d),
        Reference::Tag(t) => Asking::Tag(t, class),
    };
    let access = passthrough::authorize(state, &upstream, &repo, &caller, asking).await?;
    let (m, outcome) = match reference {
        Reference::Digest(d) => {
            let by_digest = |access| {
                state
                    .manifests
                    .by_digest(&upstream, &repo, d, class, &caller, hop, access)
            };
            match by_digest(access).await? {
                Some(answer) => {
                    if access == Access::Own {
                        passthrough::fetched(state, &upstream, &repo, &caller, d);
                    }
                    answer
                }
                None => {
                    passthrough::confirm(state, &upstream, &repo, &caller, asking).await?;
                    by_digest(Access::Any).await?.ok_or_else(|| unserved(d))?
                }
            }
        }
        Reference::Tag(t) => {
            let answer = state
                .manifests
                .by_tag(&upstream, &repo, t, class, &caller, hop)
                .await?;
            passthrough::served_by_tag(state, &upstream, &repo, &caller, &answer.0);
            answer
        }
    };
    if req.method() == Method::GET && !hop.is_peer() {
        // A pull follows: start its blobs' fills now, with the caller's
        // credentials (in passthrough, upstream has just let this caller
        // read this manifest, and so what it refers to). A peer's request
        // prefetches nothing: the node the client asked does.
        state
            .prefetch
            .on_manifest(&upstream, &repo, &m, class, &caller);
    }
    let mut r = manifest_response(&m, req.method() == Method::HEAD);
    if let (Reference::Tag(t), true) = (reference, hop.is_peer()) {
        // This node owns the tag: the asking node trusts it as long as
        // this one does.
        let left = state.manifests.tag_fresh_for(&upstream, &repo, t, class);
        if let Some(left) = left.await {
            r.headers_mut().insert(
                X_STOWAGE_FRESH_MS,
                HeaderValue::from(left.as_millis() as u64),
            );
        }
    }
    Ok((Ok(r), Some(outcome)))
}

/// `/v2/<name>/tags/list`: passed through (only `n` and `last` are kept).
async fn tags_list(
    state: &AppState,
    req: &Request<Incoming>,
    name: &str,
    ns: Option<&str>,
) -> Result<Answer, Error> {
    let (upstream, repo) = state.router.route(name, ns)?;
    let query = req
        .uri()
        .query()
        .map(|q| {
            form_urlencoded::Serializer::new(String::new())
                .extend_pairs(
                    form_urlencoded::parse(q.as_bytes()).filter(|(k, _)| k == "n" || k == "last"),
                )
                .finish()
        })
        .filter(|q| !q.is_empty());
    let tail = match query {
        Some(q) => format!("tags/list?{q}"),
        None => "tags/list".to_string(),
    };
    let caller = Caller::of(&upstream, req.headers());
    let next = NextPage {
        path: format!("/v2/{name}/tags/list"),
        keep: &["n", "last"],
        ns,
    };
    pass_on(
        &upstream,
        &caller,
        req.method(),
        &repo,
        &tail,
        HeaderMap::new(),
        &next,
    )
    .await
}

/// `/v2/<name>/referrers/<digest>`: from the referrers cache (of the
/// query, `artifactType` is kept; `n` and `last`, a page past the first,
/// are asked upstream uncached), always as an OCI image index.
async fn referrers(
    state: &AppState,
    req: &Request<Incoming>,
    name: &str,
    ns: Option<&str>,
    digest: &Digest,
) -> Result<Answer, Error> {
    let (upstream, repo) = state.router.route(name, ns)?;
    let query: Vec<(String, String)> = req
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let param = |key: &str| {
        query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    // An empty filter filters nothing.
    let filter = param("artifactType").filter(|f| !f.is_empty());
    let page: Vec<(&str, &str)> = ["n", "last"]
        .into_iter()
        .filter_map(|k| param(k).map(|v| (k, v)))
        .collect();
    let caller = Caller::of(&upstream, req.headers());
    passthrough::authorize(state, &upstream, &repo, &caller, Asking::Referrers(digest)).await?;
    let (answer, outcome) = state
        .manifests
        .referrers(&upstream, &repo, digest, filter, &page, &caller)
        .await?;
    passthrough::served_referrers(state, &upstream, &repo, &caller, &answer.body);
    let head = req.method() == Method::HEAD;
    let length = answer.body.len();
    let mut r = Response::new(if head {
        body::empty()
    } else {
        body::full(answer.body)
    });
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(OCI_INDEX));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    if answer.filters_applied {
        h.insert(
            OCI_FILTERS_APPLIED,
            HeaderValue::from_static("artifactType"),
        );
    }
    // A paginated answer: its next page stays on this upstream, through
    // this mirror.
    let next = NextPage {
        path: format!("/v2/{name}/referrers/{digest}"),
        keep: &["artifactType", "n", "last"],
        ns,
    };
    if let Some(link) = answer.link.and_then(|l| next.rewrite(&l)) {
        h.insert(header::LINK, link);
    }
    Ok((Ok(r), Some(outcome)))
}

fn manifest_response(m: &Manifest, head: bool) -> Response<Body> {
    let mut r = Response::new(if head {
        body::empty()
    } else {
        body::full(m.body.clone())
    });
    let h = r.headers_mut();
    h.clone_from(&m.headers);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(m.body.len()));
    r
}

/// Where the next page of a paginated pass-through answer is, for the
/// client: this mirror's path as the client asked for it (with its
/// registry-host prefix, if any), the query parameters of upstream's link
/// that are kept, and the client's `ns`.
struct NextPage<'a> {
    path: String,
    keep: &'a [&'a str],
    ns: Option<&'a str>,
}

impl NextPage<'_> {
    /// Upstream's `Link: <…>; rel="next"` rewritten to this mirror, so the
    /// next page comes from the same upstream (the client's path prefix or
    /// `ns` kept; upstream's own path, host and other parameters dropped).
    /// `None` when upstream's header names no next page this can follow.
    fn rewrite(&self, link: &HeaderValue) -> Option<HeaderValue> {
        let target = next_link_target(link.to_str().ok()?)?;
        let base = url::Url::parse("http://upstream.invalid/").ok()?;
        let url = base.join(target).ok()?;
        let mut query = form_urlencoded::Serializer::new(String::new());
        query.extend_pairs(
            url.query_pairs()
                .filter(|(k, _)| self.keep.contains(&k.as_ref())),
        );
        if let Some(ns) = self.ns {
            query.append_pair("ns", ns);
        }
        let query = query.finish();
        let sep = if query.is_empty() { "" } else { "?" };
        HeaderValue::from_str(&format!("<{}{sep}{query}>; rel=\"next\"", self.path)).ok()
    }
}

/// The URI reference of the `rel="next"` link in a `Link` header value
/// (RFC 8288: `<uri>; param; param, <uri>; ...`).
fn next_link_target(value: &str) -> Option<&str> {
    let mut rest = value;
    while let Some(open) = rest.find('<') {
        let after = &rest[open + 1..];
        let close = after.find('>')?;
        let target = &after[..close];
        let params = &after[close + 1..];
        let end = params.find('<').unwrap_or(params.len());
        let is_next = params[..end].split(';').any(|p| {
            let p = p.trim().trim_end_matches(',').trim();
            p.split_once('=').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("rel")
                    && v.trim()
                        .trim_matches('"')
                        .split_whitespace()
                        .any(|r| r.eq_ignore_ascii_case("next"))
            })
        });
        if is_next {
            return Some(target);
        }
        rest = &params[end..];
    }
    None
}

/// Forwards a small read-only request (tags list) upstream, with the
/// caller's credentials in passthrough mode, and streams the answer back,
/// keeping the headers that matter (a `Link` to the next page rewritten by
/// `next`).
async fn pass_on(
    upstream: &Upstream,
    caller: &Caller,
    method: &Method,
    repo: &crate::oci::RepoName,
    tail: &str,
    headers: HeaderMap,
    next: &NextPage<'_>,
) -> Result<Answer, Error> {
    let resp = upstream
        .send_as(caller, method.clone(), repo.as_str(), tail, headers)
        .await?;
    let status = resp.status();
    if !status.is_success() {
        return Err(Error::upstream_status(
            status,
            Asked::Repository,
            resp.headers().get(header::RETRY_AFTER),
            repo.as_str(),
        ));
    }
    let (parts, incoming) = resp.into_parts();
    let mut r = Response::new(if *method == Method::HEAD {
        body::empty()
    } else {
        BodyExt::boxed(incoming.map_err(std::io::Error::other))
    });
    *r.status_mut() = status;
    for name in [header::CONTENT_TYPE, header::CONTENT_LENGTH] {
        if let Some(v) = parts.headers.get(&name) {
            r.headers_mut().insert(name, v.clone());
        }
    }
    if let Some(link) = parts
        .headers
        .get(header::LINK)
        .and_then(|l| next.rewrite(l))
    {
        r.headers_mut().insert(header::LINK, link);
    }
    if let Some(v) = parts.headers.get(OCI_FILTERS_APPLIED) {
        r.headers_mut().insert(OCI_FILTERS_APPLIED, v.clone());
    }
    Ok((Ok(r), Some(Outcome::Upstream)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_links_are_rewritten_to_the_mirror() {
        let next = NextPage {
            path: "/v2/ghcr.io/org/app/tags/list".into(),
            keep: &["n", "last"],
            ns: None,
        };
        let rw = |v: &str| {
            next.rewrite(&HeaderValue::from_str(v).unwrap())
                .map(|h| h.to_str().unwrap().to_string())
        };
        assert_eq!(
            rw("</v2/org/app/tags/list?n=2&last=b>; rel=\"next\"").as_deref(),
            Some("</v2/ghcr.io/org/app/tags/list?n=2&last=b>; rel=\"next\"")
        );
        // Absolute, other parameters, other hosts: only n and last survive.
        assert_eq!(
            rw("<https://evil.example/v2/x/tags/list?last=a%20b&x=1&n=5>; rel=next").as_deref(),
            Some("</v2/ghcr.io/org/app/tags/list?last=a+b&n=5>; rel=\"next\"")
        );
        // Several links: the one whose rel is next.
        assert_eq!(
            rw("</a?n=1>; rel=\"prev\", </b?n=9&last=z>; rel=\"next\"").as_deref(),
            Some("</v2/ghcr.io/org/app/tags/list?n=9&last=z>; rel=\"next\"")
        );
        assert_eq!(rw("</a?n=1>; rel=\"prev\""), None);
        assert_eq!(rw("garbage"), None);
        let with_ns = NextPage {
            path: "/v2/org/app/tags/list".into(),
            keep: &["n", "last"],
            ns: Some("ghcr.io"),
        };
        assert_eq!(
            with_ns
                .rewrite(&HeaderValue::from_static(
                    "</v2/org/app/tags/list?n=2&last=b>; rel=\"next\""
                ))
                .unwrap(),
            "</v2/org/app/tags/list?n=2&last=b&ns=ghcr.io>; rel=\"next\""
        );
    }
}
