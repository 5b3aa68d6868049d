//! Manifests as the registry API knows them: the media types stowage asks
//! for, how a manifest's media type is chosen, and the digests a manifest
//! refers to.

use http::{HeaderMap, HeaderValue, header};

use super::Digest;

/// Docker image manifest, schema 2.
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Docker manifest list.
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// OCI image manifest.
pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// OCI image index.
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Docker schema 1 (signed and unsigned): registries convert a schema 2
/// manifest into one for clients that accept neither schema 2 nor a list;
/// stowage never serves them (it cannot verify them, and does not convert).
const SCHEMA1: [&str; 2] = [
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
];

/// Media types asked for on every manifest request of the mirror's own
/// (pins, `warm`, manifests by digest).
pub(crate) const ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json";

/// Request headers for a manifest request: `Accept` with [`ACCEPT`].
pub(crate) fn accept_headers() -> HeaderMap {
    AcceptClass::ALL.headers()
}

/// The known manifest media types a client accepts, read from its `Accept`
/// the way CNCF distribution 2.8 reads it (measured against Debian's
/// `docker-registry` 2.8.2, see ARCHITECTURE.md, "Accept classes"): every `Accept` header,
/// split at commas, parameters dropped, so `q` values are ignored
/// (`;q=0` still accepts) and `*/*` or `application/json` accept none of
/// the four. No `Accept` at all accepts none.
///
/// A registry answers a tag according to this set (an OCI index only to
/// clients that accept one; a Docker list's `linux/amd64` manifest to
/// clients that accept schema 2 but no list), so tags are cached per class.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) struct AcceptClass(u8);

/// The four known types, in the order of the class bits and names.
const KNOWN: [(&str, &str); 4] = [
    (DOCKER_MANIFEST, "v2"),
    (DOCKER_LIST, "list"),
    (OCI_MANIFEST, "oci"),
    (OCI_INDEX, "index"),
];

impl AcceptClass {
    /// All four known types.
    pub(crate) const ALL: AcceptClass = AcceptClass(0b1111);

    /// None of them (no `Accept`, `*/*`, only other types).
    pub(crate) const NONE: AcceptClass = AcceptClass(0);

    /// The class of a request's `Accept` headers.
    pub(crate) fn from_headers(headers: &HeaderMap) -> AcceptClass {
        let mut bits = 0;
        for value in headers.get_all(header::ACCEPT) {
            let Ok(value) = value.to_str() else {
                continue;
            };
            for item in value.split(',') {
                let media_type = item.split(';').next().unwrap_or("").trim();
                if let Some(i) = KNOWN
                    .iter()
                    .position(|(t, _)| t.eq_ignore_ascii_case(media_type))
                {
                    bits |= 1 << i;
                }
            }
        }
        AcceptClass(bits)
    }

    /// The class accepting exactly `types` (known ones; others ignored).
    #[cfg(test)]
    pub(crate) fn of(types: &[&str]) -> AcceptClass {
        let mut bits = 0;
        for t in types {
            if let Some(i) = KNOWN.iter().position(|(k, _)| k == t) {
                bits |= 1 << i;
            }
        }
        AcceptClass(bits)
    }

    fn has(self, media_type: &str) -> bool {
        KNOWN
            .iter()
            .position(|(t, _)| *t == media_type)
            .is_some_and(|i| self.0 & (1 << i) != 0)
    }

    /// The class a tag is asked upstream (and cached) with: this one, or
    /// [`AcceptClass::ALL`] when it accepts none of the known types (what
    /// the tag is then decides the answer, see [`AcceptClass::serves`]).
    pub(crate) fn upstream(self) -> AcceptClass {
        if self == AcceptClass::NONE {
            AcceptClass::ALL
        } else {
            self
        }
    }

    /// A stable name, part of tag cache keys in memory and on disk (and of
    /// a tag's owner key in a cluster): the accepted types' short names
    /// joined by `+` (`v2+list+oci+index`, `v2`, `none`).
    pub(crate) fn name(self) -> String {
        let names: Vec<&str> = KNOWN
            .iter()
            .enumerate()
            .filter(|(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, (_, n))| *n)
            .collect();
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join("+")
        }
    }

    /// The `Accept` header value asking for this class's types (all four
    /// for the empty class).
    pub(crate) fn header_value(self) -> HeaderValue {
        let types: Vec<&str> = KNOWN
            .iter()
            .enumerate()
            .filter(|(i, _)| self.upstream().0 & (1 << i) != 0)
            .map(|(_, (t, _))| *t)
            .collect();
        HeaderValue::from_str(&types.join(", ")).unwrap_or(HeaderValue::from_static(ACCEPT))
    }

    /// Request headers with [`AcceptClass::header_value`] as `Accept`.
    pub(crate) fn headers(self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, self.header_value());
        h
    }

    /// Whether a manifest of `media_type` is served to this class, by tag
    /// or by digest, as distribution 2.8 decides: an OCI manifest or index
    /// only when accepted; a Docker schema 2 manifest or list by digest
    /// always, by tag only when accepted (a registry would convert it to
    /// schema 1 otherwise; stowage answers 404 instead); schema 1 never;
    /// any other type (artifacts) always.
    pub(crate) fn serves(self, media_type: &str, by_tag: bool) -> bool {
        match media_type {
            OCI_MANIFEST | OCI_INDEX => self.has(media_type),
            DOCKER_MANIFEST | DOCKER_LIST => !by_tag || self.has(media_type),
            t if SCHEMA1.contains(&t) => false,
            _ => true,
        }
    }
}

/// Largest manifest accepted, from upstream, a peer or the shared store
/// (distribution's own limit).
pub(crate) const MAX_MANIFEST: usize = 4 * 1024 * 1024;

/// The media type a manifest is served with: upstream's `Content-Type`
/// (parameters dropped) unless it is missing or generic (`application/json`,
/// `text/plain`), else the body's `mediaType` field, else an OCI image
/// manifest.
pub(crate) fn media_type(content_type: Option<&str>, body: &[u8]) -> String {
    specific_type(content_type)
        .or_else(|| media_type_in(body))
        .unwrap_or_else(|| OCI_MANIFEST.to_string())
}

/// Longest media type taken from upstream (RFC 6838 allows 127 characters
/// for each of type and subtype); a longer one is ignored, so that a
/// manifest's memory cost is its body's.
const MAX_MEDIA_TYPE: usize = 255;

/// Whether `t` is a media type as RFC 6838 (section 4.2) spells one:
/// `type/subtype`, each a letter or digit then up to 126 of letters,
/// digits and ``!#$&-^_.+``. What upstream names otherwise (a JSON string
/// can hold a newline) would not make a `Content-Type`, nor the first
/// line of the manifest's file (`cache/layout.rs`).
fn is_media_type(t: &str) -> bool {
    let name = |s: &str| {
        (1..=127).contains(&s.len())
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    t.len() <= MAX_MEDIA_TYPE
        && t.split_once('/')
            .is_some_and(|(ty, sub)| name(ty) && name(sub))
}

/// Upstream's `Content-Type` (parameters dropped) when it names a type:
/// `None` when it is missing or generic (then only the body can tell), or
/// not a media type at all.
pub(crate) fn specific_type(content_type: Option<&str>) -> Option<String> {
    content_type
        .map(|v| v.split(';').next().unwrap_or(v).trim())
        .filter(|v| is_media_type(v) && *v != "application/json" && *v != "text/plain")
        .map(str::to_string)
}

/// The `mediaType` field of a manifest body, if it has one and it is a
/// media type ([`is_media_type`]).
fn media_type_in(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<Probe>(body)
        .ok()?
        .media_type
        .filter(|t| is_media_type(t))
}

/// The digests a manifest refers to: child manifests (of an index) and
/// blobs (config and layers).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Refs {
    /// Manifests listed by an index or manifest list.
    pub(crate) manifests: Vec<Digest>,
    /// Config and layer blobs of an image manifest.
    pub(crate) blobs: Vec<Digest>,
}

/// Reads the digests out of a manifest body (Docker v2 / OCI, image or
/// index). Entries that are not valid digests are skipped.
pub(crate) fn refs_of(body: &[u8]) -> Refs {
    #[derive(serde::Deserialize)]
    struct Descriptor {
        digest: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Any {
        #[serde(default)]
        manifests: Vec<Descriptor>,
        config: Option<Descriptor>,
        #[serde(default)]
        layers: Vec<Descriptor>,
    }
    let Ok(any) = serde_json::from_slice::<Any>(body) else {
        return Refs::default();
    };
    let parse = |d: &Descriptor| d.digest.as_deref().and_then(|s| Digest::parse(s).ok());
    Refs {
        manifests: any.manifests.iter().filter_map(parse).collect(),
        blobs: any
            .config
            .iter()
            .chain(any.layers.iter())
            .filter_map(parse)
            .collect(),
    }
}

/// A blob a manifest refers to, with its size when the descriptor has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BlobRef {
    pub(crate) digest: Digest,
    pub(crate) size: Option<u64>,
}

/// A child manifest of an index, with its platform (`os/architecture`
/// or `os/architecture/variant`) when the descriptor names one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChildRef {
    pub(crate) digest: Digest,
    pub(crate) platform: Option<String>,
}

/// Whether a child manifest's `platform` (as [`ChildRef`] names it) is the
/// `wanted` one; a wanted `os/arch` also matches any variant of it.
pub(crate) fn platform_matches(wanted: &str, platform: &str) -> bool {
    wanted == platform
        || (wanted.matches('/').count() == 1
            && platform.starts_with(wanted)
            && platform[wanted.len()..].starts_with('/'))
}

/// What prefetching needs of a manifest: the blobs of an image manifest
/// (config first, then the layers in order) and the children of an index,
/// each with what its descriptor says.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Descriptors {
    pub(crate) blobs: Vec<BlobRef>,
    pub(crate) children: Vec<ChildRef>,
}

/// Reads the descriptors out of a manifest body (Docker v2 / OCI, image or
/// index). Entries that are not valid digests are skipped; a body that is
/// not JSON has none.
pub(crate) fn descriptors_of(body: &[u8]) -> Descriptors {
    #[derive(serde::Deserialize)]
    struct Platform {
        os: Option<String>,
        architecture: Option<String>,
        variant: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Descriptor {
        digest: Option<String>,
        size: Option<u64>,
        platform: Option<Platform>,
    }
    #[derive(serde::Deserialize)]
    struct Any {
        #[serde(default)]
        manifests: Vec<Descriptor>,
        config: Option<Descriptor>,
        #[serde(default)]
        layers: Vec<Descriptor>,
    }
    let Ok(any) = serde_json::from_slice::<Any>(body) else {
        return Descriptors::default();
    };
    let digest = |d: &Descriptor| d.digest.as_deref().and_then(|s| Digest::parse(s).ok());
    let platform = |p: &Platform| {
        let (os, arch) = (p.os.as_deref()?, p.architecture.as_deref()?);
        Some(match p.variant.as_deref() {
            Some(v) if !v.is_empty() => format!("{os}/{arch}/{v}"),
            _ => format!("{os}/{arch}"),
        })
    };
    Descriptors {
        blobs: any
            .config
            .iter()
            .chain(any.layers.iter())
            .filter_map(|d| {
                Some(BlobRef {
                    digest: digest(d)?,
                    size: d.size,
                })
            })
            .collect(),
        children: any
            .manifests
            .iter()
            .filter_map(|d| {
                Some(ChildRef {
                    digest: digest(d)?,
                    platform: d.platform.as_ref().and_then(platform),
                })
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_image_and_index_refs() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let image = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{a}"}},"layers":[{{"digest":"{b}"}},{{"digest":"junk"}}]}}"#
        );
        let r = refs_of(image.as_bytes());
        assert_eq!(r.blobs.len(), 2);
        assert!(r.manifests.is_empty());
        let index = format!(r#"{{"manifests":[{{"digest":"{a}","platform":{{}}}}]}}"#);
        let r = refs_of(index.as_bytes());
        assert_eq!(r.manifests, vec![Digest::parse(&a).unwrap()]);
        assert_eq!(refs_of(b"not json"), Refs::default());
    }

    #[test]
    fn accept_classes_read_like_distribution() {
        let class = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::ACCEPT, HeaderValue::from_str(v).unwrap());
            }
            AcceptClass::from_headers(&h)
        };
        assert_eq!(class(&[]), AcceptClass::NONE);
        assert_eq!(class(&["*/*"]), AcceptClass::NONE);
        assert_eq!(class(&["application/json"]), AcceptClass::NONE);
        assert_eq!(class(&[ACCEPT]), AcceptClass::ALL);
        // q values are ignored, q=0 included, as distribution does.
        let q = format!("{DOCKER_MANIFEST};q=0.5, {DOCKER_LIST} ; q=0");
        assert_eq!(
            class(&[&q]),
            AcceptClass::of(&[DOCKER_MANIFEST, DOCKER_LIST])
        );
        // Several headers add up; case does not matter.
        assert_eq!(
            class(&[OCI_MANIFEST, "Application/VND.oci.image.index.v1+json"]),
            AcceptClass::of(&[OCI_MANIFEST, OCI_INDEX])
        );
        assert_eq!(AcceptClass::ALL.name(), "v2+list+oci+index");
        assert_eq!(AcceptClass::of(&[DOCKER_MANIFEST]).name(), "v2");
        assert_eq!(AcceptClass::NONE.name(), "none");
        assert_eq!(AcceptClass::NONE.upstream(), AcceptClass::ALL);
        assert_eq!(AcceptClass::NONE.header_value(), ACCEPT);
        assert_eq!(
            AcceptClass::of(&[OCI_MANIFEST, OCI_INDEX]).header_value(),
            "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"
        );
    }

    #[test]
    fn what_each_class_is_served() {
        let docker = AcceptClass::of(&[DOCKER_MANIFEST]);
        let oci = AcceptClass::of(&[OCI_MANIFEST, OCI_INDEX]);
        // OCI types only when accepted, by tag and by digest.
        for by_tag in [true, false] {
            assert!(!docker.serves(OCI_MANIFEST, by_tag));
            assert!(!docker.serves(OCI_INDEX, by_tag));
            assert!(!AcceptClass::NONE.serves(OCI_INDEX, by_tag));
            assert!(oci.serves(OCI_INDEX, by_tag));
        }
        // Docker types by digest always, by tag only when accepted.
        assert!(oci.serves(DOCKER_LIST, false));
        assert!(!oci.serves(DOCKER_LIST, true));
        assert!(AcceptClass::NONE.serves(DOCKER_MANIFEST, false));
        assert!(!AcceptClass::NONE.serves(DOCKER_MANIFEST, true));
        assert!(docker.serves(DOCKER_MANIFEST, true));
        assert!(!docker.serves(DOCKER_LIST, true));
        // Schema 1 never; other types (artifacts) always.
        assert!(!AcceptClass::ALL.serves(SCHEMA1[0], true));
        assert!(AcceptClass::NONE.serves("application/vnd.example+json", true));
    }

    #[test]
    fn media_type_choice() {
        assert_eq!(
            media_type(Some("application/x; charset=utf-8"), b""),
            "application/x"
        );
        assert_eq!(
            media_type(Some("application/json"), br#"{"mediaType":"m/t"}"#),
            "m/t"
        );
        assert_eq!(media_type(None, b"{}"), OCI_MANIFEST);
        // No media type is 100 KiB long: neither from the header nor from
        // the body.
        let huge = format!("application/{}", "x".repeat(100 << 10));
        let body = format!(r#"{{"mediaType":"{huge}"}}"#);
        assert_eq!(media_type(Some(&huge), body.as_bytes()), OCI_MANIFEST);
        assert_eq!(media_type(Some(&huge), br#"{"mediaType":"m/t"}"#), "m/t");
        // Nor what is not a media type: it would not make a header.
        for odd in [
            r#"application/vnd.oci.image.manifest.v1+json\nx"#,
            "application/x y",
            "application",
            "/x",
            "application/",
            "a/b/c",
            r"application/x\u0000",
            r"\u00e9/x",
        ] {
            let body = format!(r#"{{"mediaType":"{odd}"}}"#);
            assert_eq!(media_type(None, body.as_bytes()), OCI_MANIFEST, "{odd}");
        }
        assert_eq!(media_type(Some("x y/z"), b"{}"), OCI_MANIFEST);
        for fine in [
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.cncf.helm.config.v1+json",
            "text/x-shellscript",
        ] {
            assert_eq!(media_type(Some(fine), b""), fine);
            let body = format!(r#"{{"mediaType":"{fine}"}}"#);
            assert_eq!(media_type(None, body.as_bytes()), fine);
        }
    }

    #[test]
    fn reads_descriptors_with_sizes_and_platforms() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let image = format!(
            r#"{{"config":{{"digest":"{a}","size":7}},"layers":[{{"digest":"{b}"}},{{"digest":"junk","size":1}}]}}"#
        );
        let d = descriptors_of(image.as_bytes());
        assert_eq!(d.blobs.len(), 2);
        assert_eq!(d.blobs[0].size, Some(7));
        assert_eq!(d.blobs[1].size, None);
        let index = format!(
            r#"{{"manifests":[{{"digest":"{a}","platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},{{"digest":"{b}"}}]}}"#
        );
        let d = descriptors_of(index.as_bytes());
        assert_eq!(d.children[0].platform.as_deref(), Some("linux/arm64/v8"));
        assert_eq!(d.children[1].platform, None);
        assert!(d.blobs.is_empty());
        assert_eq!(descriptors_of(b"[1]"), Descriptors::default());
    }
}
