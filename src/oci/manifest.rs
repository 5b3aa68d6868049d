//! Manifests as the registry API knows them: the media types stowage asks
//! for, how a manifest's media type is chosen, and the digests a manifest
//! refers to.

use http::{HeaderMap, HeaderValue, header};

use super::Digest;

/// OCI image manifest.
pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// OCI image index.
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Media types asked for on every manifest request.
pub(crate) const ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json";

/// Request headers for a manifest request: `Accept` with [`ACCEPT`].
pub(crate) fn accept_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::ACCEPT, HeaderValue::from_static(ACCEPT));
    h
}

/// The media type a manifest is served with: upstream's `Content-Type`
/// (parameters dropped) unless it is missing or generic (`application/json`,
/// `text/plain`), else the body's `mediaType` field, else an OCI image
/// manifest.
pub(crate) fn media_type(content_type: Option<&str>, body: &[u8]) -> String {
    content_type
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_string())
        .filter(|v| !v.is_empty() && v != "application/json" && v != "text/plain")
        .or_else(|| media_type_in(body))
        .unwrap_or_else(|| OCI_MANIFEST.to_string())
}

/// The `mediaType` field of a manifest body, if it has one.
fn media_type_in(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<Probe>(body).ok()?.media_type
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
    }
}
