//! The cache: blobs on disk under a byte budget ([`blob`], [`index`]),
//! manifests and tags ([`manifests`]), referrers answers ([`referrers`]),
//! pinned images ([`pins`]), fills started before clients ask
//! ([`prefetch`]), what passthrough upstreams let callers read
//! ([`grants`]), content fetched only through them ([`private`]) and the
//! exclusive lock on the directory ([`lock`]).

pub(crate) mod blob;
pub(crate) mod config;
pub(crate) mod grants;
pub(crate) mod index;
pub(crate) mod journal;
pub(crate) mod layout;
pub(crate) mod lock;
pub(crate) mod manifests;
mod owner;
pub(crate) mod pins;
pub(crate) mod prefetch;
pub(crate) mod private;
pub(crate) mod referrers;

use crate::error::{Error, ErrorSource};
use crate::oci::RepoName;
use crate::upstream::Upstream;
use crate::upstream::caller::{Caller, CredentialId};

/// Whom a fetch asks: an upstream host, a repository as upstream names it,
/// and in passthrough the caller's credential (by fingerprint: a refusal of
/// one credential is not another's). Requests for one digest share one
/// fetch (a blob fill, a manifest load); its failure is the answer only for
/// those it applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OriginKey {
    host: String,
    repo: String,
    credential: Option<CredentialId>,
}

impl OriginKey {
    pub(crate) fn new(upstream: &Upstream, repo: &RepoName, caller: &Caller) -> OriginKey {
        OriginKey {
            host: upstream.host().to_string(),
            repo: upstream.upstream_repo(repo.as_str()).into_owned(),
            credential: caller.credential().map(|c| c.id()),
        }
    }

    /// Whether `e`, a fetch under this origin failing, is also the answer
    /// for a request under `me`: not when it is specific to this origin
    /// (404, 401, 403: another repository or credential may well be
    /// served), nor when another upstream said it.
    pub(crate) fn failure_is_also_for(&self, e: &Error, me: &OriginKey) -> bool {
        self == me
            || !((e.esource() == ErrorSource::Upstream && self.host != me.host)
                || e.is_origin_specific())
    }
}

/// Most shared loads of one key a request waits on (see [`shared_load`]).
const MAX_LOAD_ROUNDS: usize = 8;

/// The value of `key` in `cache`, loaded by `load` when missing. Requests
/// for one key share one load (moka's coalescing), under the origin of the
/// request that started it. Its failure is the answer for the others only
/// where it applies to them ([`OriginKey::failure_is_also_for`]: a 404 in
/// another repository, or a 401 of another credential, does not);
/// otherwise they load again, under their own origin or joining another's,
/// for at most [`MAX_LOAD_ROUNDS`] loads (each one after the first follows
/// an origin-specific failure of another origin).
pub(crate) async fn shared_load<K, V, F, Fut>(
    cache: &moka::future::Cache<K, V>,
    key: &K,
    me: &OriginKey,
    load: F,
) -> Result<V, Error>
where
    K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = Result<V, Error>>,
{
    let mut rounds = 0;
    loop {
        rounds += 1;
        let loaded = cache
            .try_get_with_by_ref(key, async {
                load().await.map_err(|error| (me.clone(), error))
            })
            .await;
        match loaded {
            Ok(v) => return Ok(v),
            Err(failed) => {
                let (origin, e) = &*failed;
                if rounds >= MAX_LOAD_ROUNDS || origin.failure_is_also_for(e, me) {
                    return Err(e.clone());
                }
            }
        }
    }
}

impl std::fmt::Display for OriginKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.host, self.repo)
    }
}
