//! Validated names from request paths: repository names, tags, digests, and
//! the route a path asks for.
//!
//! Every type here is a proof of validation: a [`Digest`] can only be built
//! by [`Digest::parse`], so code that builds file paths from one never sees
//! `..`, `/` or anything but lowercase hex.

use std::fmt;

use crate::error::RegistryError;

/// Longest repository name accepted (distribution's limit).
const MAX_NAME_LEN: usize = 255;

/// Longest tag accepted (OCI distribution spec).
const MAX_TAG_LEN: usize = 128;

/// A digest algorithm stowage can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// SHA-256, 64 hex characters.
    Sha256,
    /// SHA-512, 128 hex characters.
    Sha512,
}

impl Algorithm {
    /// The name used in digest strings and store directories.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A content digest such as `sha256:e3b0…`: a known algorithm and lowercase
/// hex of the right length.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

impl Digest {
    /// Parses `algorithm:hex`, accepting only sha256 and sha512 in canonical
    /// lowercase form.
    pub fn parse(s: &str) -> Result<Digest, RegistryError> {
        let bad = || RegistryError::digest_invalid(format!("invalid digest {:?}", truncate(s)));
        let (alg, hex) = s.split_once(':').ok_or_else(bad)?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => {
                return Err(RegistryError::digest_invalid(format!(
                    "unsupported digest algorithm {:?}",
                    truncate(alg)
                )));
            }
        };
        if hex.len() != algorithm.hex_len()
            || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(bad());
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_string(),
        })
    }

    /// The digest of `data` under `algorithm`.
    pub fn of(algorithm: Algorithm, data: &[u8]) -> Digest {
        let mut h = Hasher::new(algorithm);
        h.update(data);
        h.finish()
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The hex part: safe to use as a file name.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

/// Incremental hashing for either algorithm.
pub enum Hasher {
    /// SHA-256 state.
    Sha256(sha2::Sha256),
    /// SHA-512 state.
    Sha512(sha2::Sha512),
}

impl Hasher {
    /// A fresh hasher.
    pub fn new(algorithm: Algorithm) -> Hasher {
        use sha2::Digest as _;
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        use sha2::Digest as _;
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        use sha2::Digest as _;
        match self {
            Hasher::Sha256(h) => Digest {
                algorithm: Algorithm::Sha256,
                hex: hex::encode(h.finalize()),
            },
            Hasher::Sha512(h) => Digest {
                algorithm: Algorithm::Sha512,
                hex: hex::encode(h.finalize()),
            },
        }
    }
}

/// A repository name such as `library/alpine`: `/`-separated components of
/// lowercase alphanumerics joined by single separators (`.`, `_`, `__`, `-`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepoName(String);

impl RepoName {
    /// Validates a repository name against the distribution grammar.
    pub fn parse(s: &str) -> Result<RepoName, RegistryError> {
        let bad =
            || RegistryError::name_invalid(format!("invalid repository name {:?}", truncate(s)));
        if s.is_empty() || s.len() > MAX_NAME_LEN {
            return Err(bad());
        }
        if !s.split('/').all(valid_component) {
            return Err(bad());
        }
        Ok(RepoName(s.to_string()))
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The `/`-separated components.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: `.`, `_`, `__` or one or more `-`.
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// A tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`. It cannot start with `.`, so
/// it is never `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tag(String);

impl Tag {
    /// Validates a tag.
    pub fn parse(s: &str) -> Result<Tag, RegistryError> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= MAX_TAG_LEN
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b[1..]
                .iter()
                .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'));
        if ok {
            Ok(Tag(s.to_string()))
        } else {
            Err(RegistryError::tag_invalid(format!(
                "invalid tag {:?}",
                truncate(s)
            )))
        }
    }

    /// The tag as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a manifest request names: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    /// A mutable tag.
    Tag(Tag),
    /// An immutable digest.
    Digest(Digest),
}

impl Reference {
    /// A reference containing `:` is a digest, anything else a tag.
    pub fn parse(s: &str) -> Result<Reference, RegistryError> {
        if s.contains(':') {
            Digest::parse(s).map(Reference::Digest)
        } else {
            Tag::parse(s).map(Reference::Tag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

/// An image reference as users write it: `[host/]repo[:tag|@digest]`
/// (`docker.io/library/postgres:16`, `alpine`, `ghcr.io/org/app@sha256:…`).
/// The first component is a host when it contains `.` or `:` or is
/// `localhost` (Docker's rule). No tag means `latest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Registry host, if one was given.
    pub host: Option<String>,
    /// Repository within that registry.
    pub repo: RepoName,
    /// Tag or digest.
    pub reference: Reference,
}

impl ImageRef {
    /// Parses an image reference.
    pub fn parse(s: &str) -> Result<ImageRef, RegistryError> {
        let (rest, reference) = match s.split_once('@') {
            Some((r, d)) => (r, Reference::Digest(Digest::parse(d)?)),
            None => match s.rsplit_once(':') {
                Some((r, t)) if !t.contains('/') => (r, Reference::Tag(Tag::parse(t)?)),
                _ => (s, Reference::Tag(Tag::parse("latest")?)),
            },
        };
        let (host, repo) = match rest.split_once('/') {
            Some((h, r)) if h.contains('.') || h.contains(':') || h == "localhost" => {
                (Some(h.to_string()), r)
            }
            _ => (None, rest),
        };
        Ok(ImageRef {
            host,
            repo: RepoName::parse(repo)?,
            reference,
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(h) = &self.host {
            write!(f, "{h}/")?;
        }
        match &self.reference {
            Reference::Tag(t) => write!(f, "{}:{t}", self.repo),
            Reference::Digest(d) => write!(f, "{}@{d}", self.repo),
        }
    }
}

/// An API route with its validated parts. The repository name is still the
/// raw path name; routing to an upstream (which may strip a host prefix)
/// happens in [`crate::routing`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`: the API version check.
    Base,
    /// `/v2/<name>/manifests/<reference>`.
    Manifest {
        /// Repository path as requested.
        name: String,
        /// Tag or digest.
        reference: Reference,
    },
    /// `/v2/<name>/blobs/<digest>`.
    Blob {
        /// Repository path as requested.
        name: String,
        /// The blob digest.
        digest: Digest,
    },
    /// `/v2/<name>/tags/list`.
    TagsList {
        /// Repository path as requested.
        name: String,
    },
    /// `/v2/<name>/referrers/<digest>`.
    Referrers {
        /// Repository path as requested.
        name: String,
        /// Subject digest.
        digest: Digest,
    },
    /// A push or other write route (`blobs/uploads/...`): never served.
    Write,
}

/// Parses a request path. Does not look at the method; the caller refuses
/// anything but GET/HEAD. Names are checked for characters that could escape
/// a path (`%`, `..`, empty components) here; the full name grammar is
/// applied once the upstream prefix is known.
pub fn parse_route(path: &str) -> Result<Route, RegistryError> {
    let rest = match path.strip_prefix("/v2") {
        Some("") | Some("/") => return Ok(Route::Base),
        Some(r) => r.strip_prefix('/').ok_or_else(unsupported_path)?,
        None => return Err(unsupported_path()),
    };
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    if n >= 3 && segs[n - 2] == "tags" && segs[n - 1] == "list" {
        return Ok(Route::TagsList {
            name: name_from(&segs[..n - 2])?,
        });
    }
    if n >= 3 && segs[n - 2] == "manifests" {
        return Ok(Route::Manifest {
            name: name_from(&segs[..n - 2])?,
            reference: Reference::parse(segs[n - 1])?,
        });
    }
    if n >= 3 && segs[n - 2] == "blobs" && segs[n - 1] == "uploads" {
        return Ok(Route::Write);
    }
    if n >= 3 && segs[n - 2] == "blobs" {
        return Ok(Route::Blob {
            name: name_from(&segs[..n - 2])?,
            digest: Digest::parse(segs[n - 1])?,
        });
    }
    if n >= 3 && segs[n - 2] == "referrers" {
        return Ok(Route::Referrers {
            name: name_from(&segs[..n - 2])?,
            digest: Digest::parse(segs[n - 1])?,
        });
    }
    if let Some(i) = segs.iter().position(|s| *s == "blobs")
        && segs.get(i + 1) == Some(&"uploads")
        && i >= 1
    {
        return Ok(Route::Write);
    }
    Err(unsupported_path())
}

fn unsupported_path() -> RegistryError {
    RegistryError::unsupported("this mirror serves only the registry pull API")
}

/// Joins name segments, rejecting anything that is not a plausible name:
/// empty segments, `.`/`..`, or characters outside `[a-z0-9._:-]`. The `:`
/// is allowed only so a registry host with a port can prefix the name.
fn name_from(segs: &[&str]) -> Result<String, RegistryError> {
    let name = segs.join("/");
    let ok = !segs.is_empty()
        && name.len() <= MAX_NAME_LEN + 256
        && segs.iter().all(|s| {
            !s.is_empty()
                && *s != "."
                && *s != ".."
                && s.bytes().all(|b| {
                    b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || matches!(b, b'.' | b'_' | b'-' | b':')
                })
        });
    if ok {
        Ok(name)
    } else {
        Err(RegistryError::name_invalid(format!(
            "invalid repository name {:?}",
            truncate(&name)
        )))
    }
}

/// Keeps hostile input out of error messages and logs at a bounded size.
fn truncate(s: &str) -> &str {
    match s.char_indices().nth(100) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn digests() {
        let d = Digest::parse(&format!("sha256:{H}")).unwrap();
        assert_eq!(d.to_string(), format!("sha256:{H}"));
        assert_eq!(Digest::of(Algorithm::Sha256, b""), d);
        assert!(Digest::parse("sha256:abc").is_err());
        assert!(Digest::parse(&format!("sha256:{}", H.to_uppercase())).is_err());
        assert!(Digest::parse(&format!("md5:{H}")).is_err());
        assert!(Digest::parse(&format!("sha512:{H}")).is_err());
        assert!(Digest::parse(&format!("sha512:{H}{H}")).is_ok());
        assert!(Digest::parse(H).is_err());
        assert!(Digest::parse(&format!("sha256:../{}", &H[3..])).is_err());
    }

    #[test]
    fn names() {
        for ok in ["a", "library/alpine", "a-b/c.d/e__f", "a--b", "x0/y_1"] {
            assert!(RepoName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "A", "a/", "/a", "a//b", "a..b", "..", "a/../b", "-a", "a-", "a___b", "a.-b",
            "a%2fb", "a b",
        ] {
            assert!(RepoName::parse(bad).is_err(), "{bad}");
        }
        assert!(RepoName::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn tags() {
        for ok in ["latest", "1.0", "_x", "A-b_c.d", &"a".repeat(128)] {
            assert!(Tag::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", ".a", "-a", "a/b", "a:b", &"a".repeat(129)] {
            assert!(Tag::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn image_refs() {
        let r = ImageRef::parse("docker.io/library/postgres:16").unwrap();
        assert_eq!(r.host.as_deref(), Some("docker.io"));
        assert_eq!(r.repo.as_str(), "library/postgres");
        assert_eq!(r.reference, Reference::Tag(Tag::parse("16").unwrap()));
        let r = ImageRef::parse("alpine").unwrap();
        assert_eq!((r.host, r.repo.as_str()), (None, "alpine"));
        assert_eq!(r.reference.to_string(), "latest");
        let r = ImageRef::parse("localhost:5000/a/b").unwrap();
        assert_eq!(r.host.as_deref(), Some("localhost:5000"));
        assert_eq!(r.repo.as_str(), "a/b");
        let r = ImageRef::parse(&format!("ghcr.io/o/app@sha256:{H}")).unwrap();
        assert!(matches!(r.reference, Reference::Digest(_)));
        assert!(ImageRef::parse("Bad Name").is_err());
        assert!(ImageRef::parse("a:b:c").is_err());
    }

    #[test]
    fn routes() {
        assert_eq!(parse_route("/v2/").unwrap(), Route::Base);
        assert_eq!(parse_route("/v2").unwrap(), Route::Base);
        assert_eq!(
            parse_route("/v2/library/alpine/manifests/3.19").unwrap(),
            Route::Manifest {
                name: "library/alpine".into(),
                reference: Reference::Tag(Tag::parse("3.19").unwrap())
            }
        );
        assert!(matches!(
            parse_route(&format!("/v2/a/b/blobs/sha256:{H}")).unwrap(),
            Route::Blob { name, .. } if name == "a/b"
        ));
        // A repository may itself be called "manifests" or "blobs".
        assert!(matches!(
            parse_route(&format!("/v2/blobs/blobs/sha256:{H}")).unwrap(),
            Route::Blob { name, .. } if name == "blobs"
        ));
        assert!(matches!(
            parse_route("/v2/ghcr.io/a/tags/list").unwrap(),
            Route::TagsList { name } if name == "ghcr.io/a"
        ));
        assert_eq!(parse_route("/v2/a/blobs/uploads/").unwrap(), Route::Write);
        assert_eq!(
            parse_route("/v2/a/blobs/uploads/abc").unwrap(),
            Route::Write
        );
        assert_eq!(parse_route("/v2/a/blobs/uploads").unwrap(), Route::Write);
        assert!(parse_route("/v2/a/../b/manifests/x").is_err());
        assert!(parse_route("/v2/a%2f/manifests/x").is_err());
        assert!(parse_route("/v2/Upper/manifests/x").is_err());
        assert!(parse_route("/v2/a/manifests/sha256:abc").is_err());
        assert!(parse_route("/v2/a/manifests/..").is_err());
        assert!(parse_route("/v2/a/blobs/latest").is_err());
        assert!(parse_route("/v2/_catalog").is_err());
        assert!(parse_route("/etc/passwd").is_err());
        assert!(parse_route("/v2/manifests/x").is_err());
    }
}
