//! Passthrough authorization (`auth = "passthrough"`): what upstream said
//! each caller's credential may read.
//!
//! A cache hit is served to a caller only once upstream has said, for that
//! caller's credential, that it may read the repository and that the
//! digest belongs to it. Upstream says so by answering a request made with
//! that credential: fetching the manifest or blob (a miss), or a `HEAD` of
//! that manifest or blob in that repository (a hit not yet known for the
//! caller). The answer is remembered per (credential, upstream host,
//! repository as upstream names it) as a [`Grant`]: "may read", with the
//! digests known to be in that repository for it: the ones upstream
//! confirmed, and those referred to by a manifest of the repository the
//! caller was served (its config and layers, an index's manifests, a
//! referrers answer's artifacts). So a pull costs no `HEAD` per layer, and
//! a digest cached from one repository is never served under another
//! repository name on the strength of being allowed to read that other
//! repository.
//!
//! Tags and referrers are names within a repository: "may read" the
//! repository is enough for them.
//!
//! A grant lives for the upstream's `passthrough_ttl` or until the caller's
//! token expires (a JWT's `exp`), whichever comes first, and is never
//! extended: then upstream is asked again. Anonymous callers are a
//! credential like any other. Memory is bounded: at most [`MAX_GRANTS`]
//! grants of at most [`MAX_DIGESTS`] digests each (16-byte fingerprints);
//! a digest beyond that is checked with a `HEAD`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::Digest as _;

use crate::oci::{Digest, RepoName};
use crate::upstream::Upstream;
use crate::upstream::caller::{Credential, CredentialId};

/// Grants kept at most (LRU beyond that).
const MAX_GRANTS: u64 = 4096;

/// Digests remembered per grant at most.
const MAX_DIGESTS: usize = 512;

/// Whose grant: a credential, an upstream host, a repository as upstream
/// names it.
#[derive(Clone, PartialEq, Eq, Hash)]
struct GrantKey {
    credential: CredentialId,
    host: String,
    repo: String,
}

/// Upstream's answer for one credential and repository: it may read it,
/// and these digests are in it.
pub(crate) struct Grant {
    /// Fingerprints of the digests known to be in the repository.
    digests: Mutex<HashSet<u128>>,
    /// How long the grant lives, from its creation.
    ttl: Duration,
}

impl Grant {
    /// Whether `digest` is known to be in the repository for this caller.
    pub(crate) fn knows(&self, digest: &Digest) -> bool {
        self.digests
            .lock()
            .map(|d| d.contains(&fingerprint(digest)))
            .unwrap_or(false)
    }

    fn add<'a>(&self, digests: impl IntoIterator<Item = &'a Digest>) {
        if let Ok(mut set) = self.digests.lock() {
            for d in digests {
                if set.len() >= MAX_DIGESTS {
                    break;
                }
                set.insert(fingerprint(d));
            }
        }
    }
}

fn fingerprint(digest: &Digest) -> u128 {
    let h = sha2::Sha256::digest(digest.to_string().as_bytes());
    u128::from_be_bytes(h[..16].try_into().unwrap_or_default())
}

/// Expires each grant after its own TTL.
struct GrantExpiry;

impl moka::Expiry<GrantKey, Arc<Grant>> for GrantExpiry {
    fn expire_after_create(
        &self,
        _key: &GrantKey,
        value: &Arc<Grant>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// The grants of every caller. Share it in an `Arc`.
pub(crate) struct Grants {
    cache: moka::sync::Cache<GrantKey, Arc<Grant>>,
}

impl Default for Grants {
    fn default() -> Self {
        Grants::new()
    }
}

impl Grants {
    /// No grants.
    pub(crate) fn new() -> Grants {
        Grants {
            cache: moka::sync::Cache::builder()
                .max_capacity(MAX_GRANTS)
                .expire_after(GrantExpiry)
                .build(),
        }
    }

    fn key(upstream: &Upstream, repo: &RepoName, credential: &Credential) -> GrantKey {
        GrantKey {
            credential: credential.id(),
            host: upstream.host().to_string(),
            repo: upstream.upstream_repo(repo.as_str()).into_owned(),
        }
    }

    /// The caller's grant for `repo`, if upstream let it read the
    /// repository recently.
    pub(crate) fn get(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        credential: &Credential,
    ) -> Option<Arc<Grant>> {
        self.cache.get(&Grants::key(upstream, repo, credential))
    }

    /// Records that upstream let `credential` read `repo`, and that
    /// `digests` are in it (a grant that exists keeps its expiry).
    pub(crate) fn allow<'a>(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        credential: &Credential,
        digests: impl IntoIterator<Item = &'a Digest>,
    ) {
        let ttl = match credential.remaining() {
            Some(left) => left.min(upstream.passthrough_ttl()),
            None => upstream.passthrough_ttl(),
        };
        if ttl.is_zero() {
            return;
        }
        let grant = self
            .cache
            .get_with(Grants::key(upstream, repo, credential), || {
                Arc::new(Grant {
                    digests: Mutex::new(HashSet::new()),
                    ttl,
                })
            });
        grant.add(digests);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue, header};

    fn upstream(ttl: Duration) -> Upstream {
        Upstream::new(&crate::upstream::config::UpstreamConfig {
            host: "r.example".into(),
            url: "http://127.0.0.1:9".into(),
            library_prefix: true,
            auth: crate::upstream::config::AuthMode::Passthrough,
            passthrough_ttl: ttl,
            ..crate::upstream::config::docker_hub()
        })
        .unwrap()
    }

    fn credential(auth: &str) -> Credential {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        Credential::from_headers(&h)
    }

    #[test]
    fn grants_are_per_credential_repository_and_digest() {
        let up = upstream(Duration::from_secs(60));
        let grants = Grants::new();
        let alice = credential("Bearer alice");
        let bob = credential("Bearer bob");
        let private = RepoName::parse("acme/private").unwrap();
        let public = RepoName::parse("acme/public").unwrap();
        let d1 = Digest::of(crate::oci::Algorithm::Sha256, b"1");
        let d2 = Digest::of(crate::oci::Algorithm::Sha256, b"2");
        assert!(grants.get(&up, &private, &alice).is_none());
        grants.allow(&up, &private, &alice, [&d1]);
        let g = grants.get(&up, &private, &alice).unwrap();
        assert!(g.knows(&d1) && !g.knows(&d2));
        assert!(grants.get(&up, &private, &bob).is_none());
        assert!(grants.get(&up, &public, &alice).is_none());
        grants.allow(&up, &public, &bob, [&d2]);
        assert!(!grants.get(&up, &public, &bob).unwrap().knows(&d1));
        // One-component names are keyed as upstream names them.
        let short = RepoName::parse("busybox").unwrap();
        grants.allow(&up, &short, &alice, []);
        assert!(
            grants
                .get(&up, &RepoName::parse("library/busybox").unwrap(), &alice)
                .is_some()
        );
    }

    #[test]
    fn grants_are_bounded_and_expire() {
        let up = upstream(Duration::from_millis(50));
        let grants = Grants::new();
        let alice = credential("Bearer alice");
        let repo = RepoName::parse("a/b").unwrap();
        let many: Vec<Digest> = (0..(MAX_DIGESTS as u32 + 10))
            .map(|i| Digest::of(crate::oci::Algorithm::Sha256, &i.to_be_bytes()))
            .collect();
        grants.allow(&up, &repo, &alice, &many);
        let g = grants.get(&up, &repo, &alice).unwrap();
        assert!(g.knows(&many[0]));
        assert!(!g.knows(many.last().unwrap()));
        std::thread::sleep(Duration::from_millis(80));
        assert!(grants.get(&up, &repo, &alice).is_none());
        // An expired token is not remembered at all.
        let old = base64_json(r#"{"exp":1}"#);
        let expired = credential(&format!("Bearer a.{old}.c"));
        grants.allow(&up, &repo, &expired, []);
        assert!(grants.get(&up, &repo, &expired).is_none());
    }

    fn base64_json(s: &str) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }
}
