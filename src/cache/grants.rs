//! Passthrough authorization (`auth = "passthrough"`): what upstream said
//! about callers' credentials and about where digests are.
//!
//! A cache hit is served to a caller only once upstream has said two
//! things, each remembered here:
//!
//! * **may read**: upstream let the caller's credential read the
//!   repository (it answered a request made with that credential),
//!   remembered per (credential, upstream host, repository as upstream
//!   names it) for the upstream's `passthrough_ttl` or until the caller's
//!   token expires (a JWT's `exp`), whichever comes first, never extended;
//! * **located**: the digest is in that repository: upstream answered
//!   `200` for that very digest in that repository (a `HEAD` or `GET` of
//!   the blob or manifest, a tag it named in `Docker-Content-Digest`, an
//!   artifact its referrers API listed), with whatever credential,
//!   remembered per (digest, upstream host, repository) until memory runs
//!   short (content is immutable: a digest that was in a repository was
//!   readable by whoever may read it).
//!
//! What a manifest *refers to* (an index's manifests, an image's layers)
//! is not taken as located: a registry that does not check the references
//! of pushed manifests (sparse indexes, foreign layers) would let anybody
//! who can push to some repository name any cached digest there. A
//! referenced digest is confirmed by the request that fetches it with the
//! caller's credential (a miss), or by a `HEAD` (a hit).
//!
//! Anonymous callers are a credential like any other. Memory is bounded:
//! both are moka caches of 16-byte fingerprints, at most [`MAX_READERS`]
//! and [`MAX_LOCATED`] entries.

use std::time::{Duration, Instant};

use sha2::Digest as _;

use crate::oci::{Digest, RepoName};
use crate::upstream::Upstream;
use crate::upstream::caller::{Credential, CredentialId};

/// (credential, repository) pairs remembered at most (LRU beyond that).
const MAX_READERS: u64 = 65_536;

/// (digest, repository) pairs remembered at most.
const MAX_LOCATED: u64 = 131_072;

/// A fingerprint: the first 16 bytes of a SHA-256 over the parts, each
/// length-prefixed (so no two different part lists collide by
/// concatenation).
type Key = u128;

fn key(parts: &[&[u8]]) -> Key {
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    let h = h.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&h[..16]);
    u128::from_be_bytes(first)
}

/// Expires each "may read" after its own TTL.
struct ReaderExpiry;

impl moka::Expiry<Key, Duration> for ReaderExpiry {
    fn expire_after_create(&self, _key: &Key, ttl: &Duration, _at: Instant) -> Option<Duration> {
        Some(*ttl)
    }
}

/// What upstream said. Share it in an `Arc`.
pub(crate) struct Grants {
    /// (credential, host, repository) -> how long upstream's "may read"
    /// lives.
    readers: moka::sync::Cache<Key, Duration>,
    /// (digest, host, repository) known to be in the repository.
    located: moka::sync::Cache<Key, ()>,
}

impl Default for Grants {
    fn default() -> Self {
        Grants::new()
    }
}

impl Grants {
    /// Nothing known.
    pub(crate) fn new() -> Grants {
        Grants {
            readers: moka::sync::Cache::builder()
                .max_capacity(MAX_READERS)
                .expire_after(ReaderExpiry)
                .build(),
            located: moka::sync::Cache::builder()
                .max_capacity(MAX_LOCATED)
                .build(),
        }
    }

    fn reader_key(upstream: &Upstream, repo: &RepoName, credential: &CredentialId) -> Key {
        let repo = upstream.upstream_repo(repo.as_str());
        key(&[
            &credential.bytes()[..],
            upstream.host().as_bytes(),
            repo.as_bytes(),
        ])
    }

    fn located_key(upstream: &Upstream, repo: &RepoName, digest: &Digest) -> Key {
        let repo = upstream.upstream_repo(repo.as_str());
        key(&[
            digest.to_string().as_bytes(),
            upstream.host().as_bytes(),
            repo.as_bytes(),
        ])
    }

    /// Whether upstream let `credential` read `repo` recently.
    pub(crate) fn may_read(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        credential: &Credential,
    ) -> bool {
        self.readers
            .get(&Grants::reader_key(upstream, repo, &credential.id()))
            .is_some()
    }

    /// Records that upstream let `credential` read `repo` (an existing
    /// record keeps its expiry).
    pub(crate) fn allow(&self, upstream: &Upstream, repo: &RepoName, credential: &Credential) {
        let ttl = match credential.remaining() {
            Some(left) => left.min(upstream.passthrough_ttl()),
            None => upstream.passthrough_ttl(),
        };
        if ttl.is_zero() {
            return;
        }
        self.readers
            .get_with(Grants::reader_key(upstream, repo, &credential.id()), || ttl);
    }

    /// Whether upstream said `digest` is in `repo`.
    pub(crate) fn located(&self, upstream: &Upstream, repo: &RepoName, digest: &Digest) -> bool {
        self.located
            .get(&Grants::located_key(upstream, repo, digest))
            .is_some()
    }

    /// Records that upstream said `digests` are in `repo`.
    pub(crate) fn locate<'a>(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digests: impl IntoIterator<Item = &'a Digest>,
    ) {
        for d in digests {
            self.located
                .insert(Grants::located_key(upstream, repo, d), ());
        }
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
    fn readers_are_per_credential_and_repository() {
        let up = upstream(Duration::from_secs(60));
        let grants = Grants::new();
        let alice = credential("Bearer alice");
        let bob = credential("Bearer bob");
        let private = RepoName::parse("acme/private").unwrap();
        let public = RepoName::parse("acme/public").unwrap();
        assert!(!grants.may_read(&up, &private, &alice));
        grants.allow(&up, &private, &alice);
        assert!(grants.may_read(&up, &private, &alice));
        assert!(!grants.may_read(&up, &private, &bob));
        assert!(!grants.may_read(&up, &public, &alice));
        // One-component names are keyed as upstream names them.
        let short = RepoName::parse("busybox").unwrap();
        grants.allow(&up, &short, &alice);
        let long = RepoName::parse("library/busybox").unwrap();
        assert!(grants.may_read(&up, &long, &alice));
    }

    #[test]
    fn digests_are_located_per_repository() {
        let up = upstream(Duration::from_secs(60));
        let grants = Grants::new();
        let private = RepoName::parse("acme/private").unwrap();
        let public = RepoName::parse("acme/public").unwrap();
        let d1 = Digest::of(crate::oci::Algorithm::Sha256, b"1");
        let d2 = Digest::of(crate::oci::Algorithm::Sha256, b"2");
        grants.locate(&up, &private, [&d1]);
        assert!(grants.located(&up, &private, &d1));
        assert!(!grants.located(&up, &private, &d2));
        assert!(!grants.located(&up, &public, &d1));
        let other = Upstream::new(&crate::upstream::config::UpstreamConfig {
            host: "other.example".into(),
            ..crate::upstream::config::docker_hub()
        })
        .unwrap();
        assert!(!grants.located(&other, &private, &d1));
    }

    #[test]
    fn readers_expire_with_the_ttl_or_the_token() {
        let up = upstream(Duration::from_millis(50));
        let grants = Grants::new();
        let alice = credential("Bearer alice");
        let repo = RepoName::parse("a/b").unwrap();
        grants.allow(&up, &repo, &alice);
        assert!(grants.may_read(&up, &repo, &alice));
        std::thread::sleep(Duration::from_millis(80));
        assert!(!grants.may_read(&up, &repo, &alice));
        // An expired token is not remembered at all.
        let old = base64_json(r#"{"exp":1}"#);
        let expired = credential(&format!("Bearer a.{old}.c"));
        grants.allow(&up, &repo, &expired);
        assert!(!grants.may_read(&up, &repo, &expired));
    }

    #[test]
    fn keys_do_not_collide_by_concatenation() {
        assert_ne!(key(&[b"ab", b"c"]), key(&[b"a", b"bc"]));
    }

    fn base64_json(s: &str) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }
}
