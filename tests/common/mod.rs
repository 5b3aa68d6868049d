//! Shared test support: a fake upstream registry, generated images, HTTP
//! client helpers and an in-process stowage.
#![allow(dead_code, unused_imports)]

pub mod fake;
pub mod image;
pub mod mirror;
pub mod process;
pub mod tls;
pub mod usage;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;

pub use fake::{BodyFault, Failure, FakeUpstream, Hold, Recorded, dead_url};
pub use image::{
    Blob, DOCKER_LIST, DOCKER_MANIFEST, Format, Image, Index, MediaType, OCI_INDEX, OCI_MANIFEST,
    make_artifact, make_image, make_image_for, make_index, random_bytes, sha256_digest,
};
pub use mirror::{
    Stowage, config_toml, free_port, free_ports, node_urls, owner_of_digest, owner_of_tag,
    start_cluster, start_cluster_nodes, start_stowage, start_stowage_in, start_stowage_no_prefetch,
    start_stowage_toml,
};
pub use process::{Process, run_stowage, wait_http_ok, write_config};
pub use usage::{Usage, usage};

/// Fails the test if `fut` takes longer than `secs` seconds.
pub async fn within<T>(secs: u64, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {secs} s: {what}"),
    }
}

/// What pulling clients (dockerd, containerd, podman, skopeo) accept for
/// manifests: all four types.
pub const ACCEPT_ALL: &str = "application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";

/// A reqwest client that ignores proxy settings, gives up after 30 s and,
/// like every pulling client, sends `Accept` with [`ACCEPT_ALL`] (a request
/// that sets its own `Accept` replaces it).
pub fn client() -> reqwest::Client {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::ACCEPT,
        http::HeaderValue::from_static(ACCEPT_ALL),
    );
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .default_headers(headers)
        .build()
        .unwrap()
}

/// The value of a response header as a string, if present.
pub fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// Asserts the response is an OCI error with `status`, a JSON content type
/// and `errors[0].code` one of `codes`. Returns the code.
pub async fn assert_oci_error(
    resp: reqwest::Response,
    status: u16,
    codes: &[&str],
    what: &str,
) -> String {
    let got_status = resp.status().as_u16();
    let ct = header(&resp, "content-type");
    let body = resp.bytes().await.unwrap_or_default();
    let text = String::from_utf8_lossy(&body);
    assert_eq!(got_status, status, "{what}: status (body: {text})");
    check_oci_error_body(ct.as_deref(), &body, codes, what)
}

pub fn check_oci_error_body(
    content_type: Option<&str>,
    body: &[u8],
    codes: &[&str],
    what: &str,
) -> String {
    let text = String::from_utf8_lossy(body);
    let ct = content_type.unwrap_or("");
    assert!(
        ct.starts_with("application/json"),
        "{what}: Content-Type {ct:?} is not application/json (body: {text})"
    );
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {text}"));
    let errs = v["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no errors array: {text}"));
    assert!(!errs.is_empty(), "{what}: empty errors array");
    let code = errs[0]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: errors[0].code missing: {text}"))
        .to_string();
    assert!(
        errs[0]["message"].is_string(),
        "{what}: errors[0].message missing: {text}"
    );
    assert!(
        codes.contains(&code.as_str()),
        "{what}: code {code:?}, expected one of {codes:?} (body: {text})"
    );
    code
}

/// A response read off the wire by [`raw_request`].
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    pub fn assert_oci_error(&self, status: u16, codes: &[&str], what: &str) -> String {
        assert_eq!(
            self.status,
            status,
            "{what}: status (body: {})",
            String::from_utf8_lossy(&self.body)
        );
        check_oci_error_body(
            self.header("content-type").as_deref(),
            &self.body,
            codes,
            what,
        )
    }
}

/// Sends one request with the request target exactly as given (no URL
/// normalisation, so `..` and `%2e` survive), over a fresh connection.
pub async fn raw_request(addr: SocketAddr, method: &str, target: &str) -> RawResponse {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(target)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = within(30, "raw request", sender.send_request(req))
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = within(30, "raw body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    RawResponse {
        status,
        headers,
        body,
    }
}

/// Reads a reqwest response body completely; `Err` if the transfer failed.
pub async fn read_body(resp: reqwest::Response) -> Result<Bytes, reqwest::Error> {
    resp.bytes().await
}

/// GETs `url` expecting 200; returns headers and the full body.
pub async fn get_ok(c: &reqwest::Client, url: &str) -> (http::HeaderMap, Bytes) {
    let r = within(30, url, c.get(url).send())
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = r.status();
    let headers = r.headers().clone();
    let body = within(30, url, r.bytes())
        .await
        .unwrap_or_else(|e| panic!("GET {url}: body failed: {e}"));
    assert_eq!(
        status,
        200,
        "GET {url}: status (body: {})",
        String::from_utf8_lossy(&body[..body.len().min(500)])
    );
    (headers, body)
}

fn hv(h: &http::HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// GET and HEAD of a blob through stowage, checking bytes and headers.
pub async fn check_blob(c: &reqwest::Client, st: &Stowage, name: &str, blob: &Blob) {
    let url = st.blob_url(name, &blob.digest);
    let (h, body) = get_ok(c, &url).await;
    assert_eq!(body.len(), blob.len(), "GET {url}: length");
    assert_eq!(
        sha256_digest(&body),
        blob.digest,
        "GET {url}: digest of body"
    );
    assert_eq!(body, blob.data, "GET {url}: bytes");
    assert_eq!(
        hv(&h, "content-length"),
        Some(blob.len().to_string()),
        "GET {url}: Content-Length"
    );
    assert_eq!(
        hv(&h, "docker-content-digest"),
        Some(blob.digest.clone()),
        "GET {url}: Docker-Content-Digest"
    );
    assert!(
        hv(&h, "content-type").is_some(),
        "GET {url}: Content-Type missing"
    );

    let r = within(30, &url, c.head(&url).send()).await.unwrap();
    assert_eq!(r.status(), 200, "HEAD {url}");
    assert_eq!(
        header(&r, "content-length"),
        Some(blob.len().to_string()),
        "HEAD {url}: Content-Length"
    );
    assert_eq!(
        header(&r, "docker-content-digest"),
        Some(blob.digest.clone()),
        "HEAD {url}: Docker-Content-Digest"
    );
    assert!(
        r.bytes().await.unwrap().is_empty(),
        "HEAD {url}: has a body"
    );
}

/// GET and HEAD of a manifest through stowage, checking body and headers.
pub async fn check_manifest(
    c: &reqwest::Client,
    st: &Stowage,
    name: &str,
    reference: &str,
    body_expected: &[u8],
    media_type: &str,
) {
    let digest = sha256_digest(body_expected);
    let url = st.manifest_url(name, reference);
    let (h, body) = get_ok(c, &url).await;
    assert_eq!(&body[..], body_expected, "GET {url}: manifest bytes");
    assert_eq!(
        hv(&h, "content-type").as_deref(),
        Some(media_type),
        "GET {url}: Content-Type"
    );
    assert_eq!(
        hv(&h, "content-length"),
        Some(body_expected.len().to_string()),
        "GET {url}: Content-Length"
    );
    assert_eq!(
        hv(&h, "docker-content-digest"),
        Some(digest.clone()),
        "GET {url}: Docker-Content-Digest"
    );

    let r = within(30, &url, c.head(&url).send()).await.unwrap();
    assert_eq!(r.status(), 200, "HEAD {url}");
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some(media_type),
        "HEAD {url}: Content-Type"
    );
    assert_eq!(
        header(&r, "content-length"),
        Some(body_expected.len().to_string()),
        "HEAD {url}: Content-Length"
    );
    assert_eq!(
        header(&r, "docker-content-digest"),
        Some(digest),
        "HEAD {url}: Docker-Content-Digest"
    );
    assert!(
        r.bytes().await.unwrap().is_empty(),
        "HEAD {url}: has a body"
    );
}

/// Pulls `img` through stowage as `name:reference` (manifest, config,
/// layers), checking everything.
pub async fn pull_image(
    c: &reqwest::Client,
    st: &Stowage,
    name: &str,
    reference: &str,
    img: &Image,
) {
    check_manifest(
        c,
        st,
        name,
        reference,
        &img.manifest,
        img.media_type.as_str(),
    )
    .await;
    for b in img.blobs() {
        check_blob(c, st, name, b).await;
    }
}

/// The sum of `name`'s samples at `st`'s `/metrics` whose labels include
/// every `(label, value)` (0 when none).
pub async fn metric(st: &Stowage, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = within(10, "scrape", async {
        client()
            .get(st.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    })
    .await;
    let mut total = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, rest) = key.split_once('{').unwrap_or((key, ""));
        if n != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        {
            total += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    total
}

/// Waits (10 s at most) until `metric(st, name, labels)` is at least
/// `want` (for a counter that a background task, such as the scrubber,
/// raises at its own pace); the value reached.
pub async fn metric_reaches(st: &Stowage, name: &str, labels: &[(&str, &str)], want: f64) -> f64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = metric(st, name, labels).await;
        if got >= want {
            return got;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name}{labels:?} is {got}, expected at least {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (10 s at most) until `metric(st, name, labels)` is `want`.
pub async fn metric_becomes(st: &Stowage, name: &str, labels: &[(&str, &str)], want: f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = metric(st, name, labels).await;
        if got == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name}{labels:?} is {got}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
