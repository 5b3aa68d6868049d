//! Validated names: repository names, tags, references (tag or digest) and
//! image references as users write them.
//!
//! Every type here is a proof of validation: a [`RepoName`] or [`Tag`] can
//! only be built by its `parse`, so code that builds file paths from one
//! never sees `..`, an empty component or anything outside the grammar.

use std::borrow::Cow;
use std::fmt;

use super::digest::Digest;
use super::{ParseError, truncate};

/// Longest repository name accepted (distribution's limit).
pub(super) const MAX_NAME_LEN: usize = 255;

/// Longest tag accepted (OCI distribution spec).
const MAX_TAG_LEN: usize = 128;

/// A repository name such as `library/alpine`: `/`-separated components of
/// lowercase alphanumerics joined by single separators (`.`, `_`, `__`, `-`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct RepoName(String);

impl RepoName {
    /// Validates a repository name against the distribution grammar.
    pub(crate) fn parse(s: &str) -> Result<RepoName, ParseError> {
        let bad = || ParseError::name(format!("invalid repository name {:?}", truncate(s)));
        if s.is_empty() || s.len() > MAX_NAME_LEN {
            return Err(bad());
        }
        if !s.split('/').all(valid_component) {
            return Err(bad());
        }
        Ok(RepoName(s.to_string()))
    }

    /// The name as given.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A repository name as Docker Hub knows it: `library/` + `repo` for a
/// one-component name when `on` (Docker Hub's official images), else
/// `repo` unchanged.
pub(crate) fn library_prefixed(repo: &str, on: bool) -> Cow<'_, str> {
    if on && !repo.contains('/') {
        Cow::Owned(format!("library/{repo}"))
    } else {
        Cow::Borrowed(repo)
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
pub(crate) struct Tag(String);

impl Tag {
    /// Validates a tag.
    pub(crate) fn parse(s: &str) -> Result<Tag, ParseError> {
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
            Err(ParseError::tag(format!("invalid tag {:?}", truncate(s))))
        }
    }

    /// The tag as given.
    pub(crate) fn as_str(&self) -> &str {
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
pub(crate) enum Reference {
    /// A mutable tag.
    Tag(Tag),
    /// An immutable digest.
    Digest(Digest),
}

impl Reference {
    /// A reference containing `:` is a digest, anything else a tag.
    pub(crate) fn parse(s: &str) -> Result<Reference, ParseError> {
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
pub(crate) struct ImageRef {
    /// Registry host, if one was given.
    pub(crate) host: Option<String>,
    /// Repository within that registry.
    pub(crate) repo: RepoName,
    /// Tag or digest.
    pub(crate) reference: Reference,
}

impl ImageRef {
    /// Parses an image reference.
    pub(crate) fn parse(s: &str) -> Result<ImageRef, ParseError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

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
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    /// One repository name component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
    fn component() -> impl Strategy<Value = String> {
        "[a-z0-9]{1,8}(([._]|__|-{1,3})[a-z0-9]{1,8}){0,3}"
    }

    proptest! {
        #[test]
        fn repo_name_display_parse_round_trip(parts in prop::collection::vec(component(), 1..5)) {
            let text = parts.join("/");
            prop_assume!(text.len() <= MAX_NAME_LEN);
            let name = RepoName::parse(&text).unwrap();
            prop_assert_eq!(name.to_string(), text);
        }

        #[test]
        fn tag_display_parse_round_trip(text in "[A-Za-z0-9_][A-Za-z0-9._-]{0,127}", junk in ".{0,140}") {
            prop_assert_eq!(Tag::parse(&text).unwrap().to_string(), text);
            if let Ok(t) = Tag::parse(&junk) {
                prop_assert_eq!(t.to_string(), junk.clone());
                prop_assert!(junk != "." && junk != ".." && !junk.contains('/'));
            }
        }

        #[test]
        fn image_ref_display_parse_round_trip(
            parts in prop::collection::vec(component(), 1..4),
            tag in "[A-Za-z0-9_][A-Za-z0-9._-]{0,20}",
            host in prop::option::of("[a-z0-9]{1,10}\\.(io|com)(:[0-9]{1,5})?"),
        ) {
            let repo = parts.join("/");
            let text = match &host {
                Some(h) => format!("{h}/{repo}:{tag}"),
                None => format!("{repo}:{tag}"),
            };
            let r = ImageRef::parse(&text).unwrap();
            prop_assert_eq!(r.to_string(), text.clone());
            prop_assert_eq!(ImageRef::parse(&r.to_string()).unwrap(), r);
        }
    }
}
