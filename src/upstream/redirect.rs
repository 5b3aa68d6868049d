//! Following redirects (registries send blob downloads to object storage):
//! at most [`MAX_REDIRECTS`] hops, `Authorization` on the first hop only,
//! `Location` resolved with the `url` crate (RFC 3986 reference resolution).

use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Uri, header};

use super::client::{Upstream, UpstreamBody};
use super::error::UpstreamError;

/// Redirects followed for one request before giving up.
const MAX_REDIRECTS: usize = 5;

fn is_redirect(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::MOVED_PERMANENTLY
            | StatusCode::FOUND
            | StatusCode::SEE_OTHER
            | StatusCode::TEMPORARY_REDIRECT
            | StatusCode::PERMANENT_REDIRECT
    )
}

/// Resolves a `Location` value against the URL that produced it. Only http
/// and https targets are accepted; the fragment is dropped.
fn resolve_location(base: &Uri, location: &str) -> Result<Uri, UpstreamError> {
    let bad = |why: &str| UpstreamError::Protocol(format!("bad redirect to {location:?}: {why}"));
    let reference = location.split('#').next().unwrap_or("").trim();
    if reference.is_empty() {
        return Err(bad("empty Location"));
    }
    // `url` would percent-encode spaces and controls; a Location carrying
    // them is not a URI reference at all.
    if !reference.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("not a valid URL"));
    }
    let base = url::Url::parse(&base.to_string()).map_err(|_| bad("not a valid URL"))?;
    let mut target = base.join(reference).map_err(|_| bad("not a valid URL"))?;
    target.set_fragment(None);
    if !matches!(target.scheme(), "http" | "https") {
        return Err(bad("only http and https are followed"));
    }
    if target.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    target.as_str().parse().map_err(|_| bad("not a valid URL"))
}

impl Upstream {
    /// Sends a request and follows redirects (at most [`MAX_REDIRECTS`]).
    /// `auth` goes to the first hop only. `kind` labels the metrics.
    pub(super) async fn follow(
        &self,
        kind: &'static str,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        auth: Option<&HeaderValue>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let mut uri = uri.clone();
        for hop in 0..=MAX_REDIRECTS {
            let auth = if hop == 0 { auth } else { None };
            let resp = self
                .exchange(kind, method, &uri, headers, auth, hop == 0)
                .await?;
            if !is_redirect(resp.status()) {
                return Ok(resp);
            }
            let Some(location) = resp.headers().get(header::LOCATION) else {
                return Ok(resp);
            };
            let location = location.to_str().map_err(|_| {
                UpstreamError::Protocol("redirect Location is not ASCII".to_string())
            })?;
            uri = resolve_location(&uri, location)?;
        }
        Err(UpstreamError::Protocol(format!(
            "more than {MAX_REDIRECTS} redirects"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_resolution() {
        let base: Uri = "https://reg.example/v2/a/b/blobs/sha256:1?x=y"
            .parse()
            .unwrap();
        let r = |l: &str| resolve_location(&base, l).map(|u| u.to_string());
        assert_eq!(
            r("https://s3.example/bucket/k?sig=1").unwrap(),
            "https://s3.example/bucket/k?sig=1"
        );
        assert_eq!(r("//cdn.example/p").unwrap(), "https://cdn.example/p");
        assert_eq!(r("/other/path").unwrap(), "https://reg.example/other/path");
        assert_eq!(r("c/d").unwrap(), "https://reg.example/v2/a/b/blobs/c/d");
        assert_eq!(r("../../x?q=1").unwrap(), "https://reg.example/v2/a/x?q=1");
        assert_eq!(
            r("?page=2").unwrap(),
            "https://reg.example/v2/a/b/blobs/sha256:1?page=2"
        );
        assert_eq!(r("/a/b#frag").unwrap(), "https://reg.example/a/b");
        assert!(r("").is_err());
        assert!(r("ftp://x/y").is_err());
        assert!(r("http://").is_err());
        assert!(r("/bad path").is_err());
        // Dot segments (RFC 3986 section 5.2.4).
        assert_eq!(r("/a/b/../../../c").unwrap(), "https://reg.example/c");
        assert_eq!(r("/a/./b/.").unwrap(), "https://reg.example/a/b/");
    }
}
