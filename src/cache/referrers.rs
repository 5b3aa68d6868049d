//! OCI 1.1 referrers answers (`GET /v2/<name>/referrers/<digest>`), cached
//! like tags: per (upstream host, repository, subject digest,
//! `artifactType` filter), fresh for the upstream's tag TTL, then asked
//! again; served stale when upstream is out (unreachable, 5xx, 429), from
//! memory or, after a restart, from disk. So signatures and SBOMs can be
//! found and verified through the mirror, and offline.
//!
//! An answer's body is kept as a manifest (content-addressed under
//! `manifests/`, media type the OCI index), and a small record per key
//! (`cache/layout.rs`: `_referrers/…`) names it and whether upstream
//! applied the filter; only for answers that list something, or for the
//! unfiltered answer about a manifest the cache holds (not for the empty
//! lists of whatever digests and filters clients make up). Answers are
//! always served as
//! `application/vnd.oci.image.index.v1+json`, as the OCI distribution
//! specification requires. A paginated answer (upstream sent `Link`) is
//! passed on with its `Link` but not kept.
//!
//! Registries without the API answer 404; that is passed on (not cached),
//! and clients fall back to the tag schema (`sha256-<hex>.sig`), which goes
//! through the tag cache like any tag.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use super::layout;
use super::manifests::{Manifest, ManifestStore, read_body, write_atomic};
use super::{OriginKey, shared_load};
use crate::error::{Asked, Error};
use crate::metrics::Outcome;
use crate::oci::headers::OCI_FILTERS_APPLIED;
use crate::oci::manifest::{self, OCI_INDEX};
use crate::oci::{Digest, RepoName};
use crate::upstream::Upstream;
use crate::upstream::caller::Caller;

/// Longest a stale answer is served before upstream is asked again.
const STALE_RETRY: Duration = Duration::from_secs(30);

/// A referrers answer.
#[derive(Debug, Clone)]
pub(crate) struct Referrers {
    /// The image index listing the referrers, as upstream sent it.
    pub(crate) body: Bytes,
    /// Whether upstream applied the `artifactType` filter.
    pub(crate) filters_applied: bool,
    /// Upstream's `Link` to the next page (such answers are not kept).
    pub(crate) link: Option<HeaderValue>,
}

/// A cached answer and how long it may be trusted.
#[derive(Debug, Clone)]
pub(crate) struct RefEntry {
    answer: Referrers,
    fresh_for: Duration,
    outcome: Outcome,
}

/// Per-entry expiry, as for tags.
pub(crate) struct RefExpiry;

impl moka::Expiry<String, RefEntry> for RefExpiry {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &RefEntry,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.fresh_for)
    }
}

/// In-memory budget for referrers answers: their bodies and keys (a key
/// holds the client's `artifactType` filter, any text), so neither large
/// answers nor many distinct filters grow memory past it.
const MEMORY_BUDGET: u64 = 16 * 1024 * 1024;

/// The in-memory cache of referrers answers, weighed in bytes.
pub(crate) fn new_cache() -> moka::future::Cache<String, RefEntry> {
    moka::future::Cache::builder()
        .weigher(|key: &String, e: &RefEntry| {
            let link = e.answer.link.as_ref().map_or(0, |l| l.len());
            u32::try_from(key.len() + e.answer.body.len() + link).unwrap_or(u32::MAX)
        })
        .max_capacity(MEMORY_BUDGET)
        .expire_after(RefExpiry)
        .build()
}

impl ManifestStore {
    /// The referrers of `subject` in `repo`, with `filter` as
    /// `artifactType` if given: fresh from the cache, else from upstream
    /// (coalesced per key), else stale when upstream is out. A paginated
    /// answer is not kept, and a `page` past the first (`n`, `last`, as
    /// upstream's `Link` named it) is asked upstream every time.
    pub(crate) async fn referrers(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        subject: &Digest,
        filter: Option<&str>,
        page: &[(&str, &str)],
        caller: &Caller,
    ) -> Result<(Referrers, Outcome), Error> {
        if !page.is_empty() {
            let answer = fetch(upstream, caller, repo, subject, filter, page).await?;
            return Ok((answer, Outcome::Upstream));
        }
        let key = format!(
            "{}/{}@{subject}?{}",
            upstream.host(),
            upstream.upstream_repo(repo.as_str()),
            filter.unwrap_or("")
        );
        if let Some(entry) = self.referrers.get(&key).await {
            let outcome = entry.outcome.again();
            return Ok((entry.answer, outcome));
        }
        let loaded = AtomicBool::new(false);
        let me = OriginKey::new(upstream, repo, caller);
        let entry = shared_load(&self.referrers, &key, &me, || async {
            loaded.store(true, Ordering::Relaxed);
            self.refresh_referrers(upstream, caller, repo, subject, filter)
                .await
        })
        .await?;
        let outcome = if loaded.load(Ordering::Relaxed) {
            entry.outcome
        } else {
            entry.outcome.again()
        };
        Ok((entry.answer, outcome))
    }

    /// Asks upstream; keeps and returns its answer, or the kept one when
    /// upstream is out.
    async fn refresh_referrers(
        &self,
        upstream: &Upstream,
        caller: &Caller,
        repo: &RepoName,
        subject: &Digest,
        filter: Option<&str>,
    ) -> Result<RefEntry, Error> {
        let ttl = upstream.tag_ttl();
        let record = self.layout.referrers(
            upstream.host(),
            repo.as_str(),
            upstream.library_prefix(),
            subject,
            filter,
        );
        let answer = match fetch(upstream, caller, repo, subject, filter, &[]).await {
            Ok(a) => a,
            Err(e) if e.is_upstream_outage() => {
                let kept = match tokio::fs::read_to_string(&record).await {
                    Ok(text) => layout::decode_referrers(&text),
                    Err(_) => None,
                };
                let Some((digest, filters_applied)) = kept else {
                    return Err(e);
                };
                let Some(m) = self.local(&digest).await else {
                    return Err(e);
                };
                tracing::warn!(upstream = upstream.host(), %repo, %subject, reason = %e.report(),
                    "upstream unavailable, serving stale referrers");
                return Ok(RefEntry {
                    answer: Referrers {
                        body: m.body.clone(),
                        filters_applied,
                        link: None,
                    },
                    fresh_for: ttl.min(STALE_RETRY),
                    outcome: Outcome::Stale,
                });
            }
            Err(e) => return Err(e),
        };
        if answer.link.is_some() {
            return Ok(RefEntry {
                answer,
                fresh_for: Duration::ZERO,
                outcome: Outcome::Upstream,
            });
        }
        // Kept on disk (for outages after a restart) when it lists
        // something, or, unfiltered, for a subject the cache holds. Not an
        // empty list for any digest or filter a client names: each would
        // be a file for good (OCI 1.1 registries answer 200 to any subject).
        let durable = !manifest::refs_of(&answer.body).manifests.is_empty()
            || (filter.is_none()
                && tokio::fs::try_exists(self.layout.manifest(subject))
                    .await
                    .unwrap_or(false));
        // A record of an earlier answer must not outlive this one when this
        // one is not kept: an outage would bring back referrers deleted
        // since.
        let forget_older = async || {
            if let Err(e) = tokio::fs::remove_file(&record).await
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(upstream = upstream.host(), %repo, %subject, error = %e,
                    "cannot remove an outdated referrers record");
            }
        };
        if !durable {
            forget_older().await;
            return Ok(RefEntry {
                answer,
                fresh_for: ttl,
                outcome: Outcome::Miss,
            });
        }
        let m = Manifest::new(
            Digest::of(subject.algorithm(), &answer.body),
            OCI_INDEX.to_string(),
            answer.body.clone(),
        );
        let digest = m.digest.clone();
        let kept = match self.keep(m, caller).await {
            Ok(()) => {
                write_atomic(
                    &self.layout,
                    record.clone(),
                    layout::encode_referrers(&digest, answer.filters_applied),
                )
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = kept {
            // Upstream's answer is served all the same (a full disk, say);
            // only keeping it for an outage failed.
            tracing::warn!(upstream = upstream.host(), %repo, %subject, error = %e,
                "cannot store referrers: serving them without caching");
            // A record of this very answer (unchanged upstream) still holds.
            let same = tokio::fs::read_to_string(&record)
                .await
                .ok()
                .and_then(|t| layout::decode_referrers(&t))
                == Some((digest, answer.filters_applied));
            if !same {
                forget_older().await;
            }
        }
        Ok(RefEntry {
            answer,
            fresh_for: ttl,
            outcome: Outcome::Miss,
        })
    }
}

/// GETs the referrers of `subject` (with the filter and the page, if
/// any).
async fn fetch(
    upstream: &Upstream,
    caller: &Caller,
    repo: &RepoName,
    subject: &Digest,
    filter: Option<&str>,
    page: &[(&str, &str)],
) -> Result<Referrers, Error> {
    let mut tail = format!("referrers/{subject}");
    let query = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(
            filter
                .map(|f| ("artifactType", f))
                .into_iter()
                .chain(page.iter().copied()),
        )
        .finish();
    if !query.is_empty() {
        tail.push('?');
        tail.push_str(&query);
    }
    let mut headers = HeaderMap::new();
    headers.insert(header::ACCEPT, HeaderValue::from_static(OCI_INDEX));
    let what = format!("referrers of {repo}@{subject}");
    let resp = upstream
        .send_as(caller, Method::GET, repo.as_str(), &tail, headers)
        .await?;
    if resp.status() != StatusCode::OK {
        return Err(Error::upstream_status(
            resp.status(),
            Asked::Repository,
            resp.headers().get(header::RETRY_AFTER),
            &what,
        ));
    }
    let filters_applied = filter.is_some()
        && resp
            .headers()
            .get(OCI_FILTERS_APPLIED)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|f| f.trim() == "artifactType"));
    let link = resp.headers().get(header::LINK).cloned();
    let body = read_body(resp.into_body(), upstream.timeout(), &what).await?;
    Ok(Referrers {
        body,
        filters_applied,
        link,
    })
}
