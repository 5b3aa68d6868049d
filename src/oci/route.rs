//! The API route a request path asks for.

use super::digest::Digest;
use super::name::{MAX_NAME_LEN, Reference};
use super::{ParseError, truncate};

/// An API route with its validated parts. The repository name is still the
/// raw path name; routing to an upstream (which may strip a host prefix)
/// happens in [`crate::http::routing`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
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
pub(crate) fn parse_route(path: &str) -> Result<Route, ParseError> {
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

fn unsupported_path() -> ParseError {
    ParseError::path("this mirror serves only the registry pull API")
}

/// Joins name segments, rejecting anything that is not a plausible name:
/// empty segments, `.`/`..`, or characters outside `[a-z0-9._:-]`. The `:`
/// is allowed only so a registry host with a port can prefix the name.
fn name_from(segs: &[&str]) -> Result<String, ParseError> {
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
        Err(ParseError::name(format!(
            "invalid repository name {:?}",
            truncate(&name)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Tag;

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

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

#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    fn name() -> impl Strategy<Value = String> {
        prop::collection::vec("[a-z0-9]{1,8}([._-][a-z0-9]{1,8}){0,2}", 1..4)
            .prop_map(|p| p.join("/"))
    }

    proptest! {
        /// Paths built from valid parts parse to exactly those parts.
        #[test]
        fn generated_valid_paths_parse_to_their_parts(
            name in name(),
            tag in "[A-Za-z0-9_][A-Za-z0-9._-]{0,30}",
            hex in "[0-9a-f]{64}",
        ) {
            let digest = Digest::parse(&format!("sha256:{hex}")).unwrap();
            prop_assert_eq!(
                parse_route(&format!("/v2/{name}/manifests/{tag}")).unwrap(),
                Route::Manifest { name: name.clone(), reference: Reference::parse(&tag).unwrap() }
            );
            prop_assert_eq!(
                parse_route(&format!("/v2/{name}/manifests/{digest}")).unwrap(),
                Route::Manifest { name: name.clone(), reference: Reference::Digest(digest.clone()) }
            );
            prop_assert_eq!(
                parse_route(&format!("/v2/{name}/blobs/{digest}")).unwrap(),
                Route::Blob { name: name.clone(), digest: digest.clone() }
            );
            prop_assert_eq!(
                parse_route(&format!("/v2/{name}/referrers/{digest}")).unwrap(),
                Route::Referrers { name: name.clone(), digest }
            );
            prop_assert_eq!(
                parse_route(&format!("/v2/{name}/tags/list")).unwrap(),
                Route::TagsList { name }
            );
        }

        /// No accepted name has a component that could leave a directory.
        #[test]
        fn accepted_names_never_escape(path in "/v2/[a-z0-9./%_:-]{0,40}/manifests/x") {
            if let Ok(Route::Manifest { name, .. }) = parse_route(&path) {
                prop_assert!(name.split('/').all(|c| !c.is_empty() && c != "." && c != ".."));
                prop_assert!(!name.contains('%'));
            }
        }
    }
}
