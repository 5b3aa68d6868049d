//! The upstream client on its own, against the fake registry in
//! tests/common: bearer tokens (fetched once, shared, refetched after expiry
//! or rejection), Basic auth, redirects without `Authorization`, path
//! prefixes, statuses passed through, unreachable upstreams and timeouts,
//! and what it counts and logs.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::{HeaderMap, HeaderValue, Method, header};
use http_body_util::BodyExt as _;
use stowage::Metrics;
use stowage::config::{UpstreamConfig, docker_hub};
use stowage::test_hooks::{Upstream, UpstreamError};

fn config(url: String) -> UpstreamConfig {
    UpstreamConfig {
        host: "test.local".into(),
        url,
        library_prefix: false,
        timeout: Duration::from_secs(2),
        ..docker_hub()
    }
}

async fn get(up: &Upstream, repo: &str, tail: &str) -> (u16, String) {
    // Manifests are asked for as pulling clients do, accepting all four
    // types (the fake negotiates like distribution).
    let mut headers = HeaderMap::new();
    if tail.starts_with("manifests/") {
        headers.insert(
            http::header::ACCEPT,
            http::HeaderValue::from_static(common::ACCEPT_ALL),
        );
    }
    let resp = up.send(Method::GET, repo, tail, headers).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A registry demanding bearer tokens from its `/token` endpoint, whose
/// challenge names `service="test registry"`, with `foo/bar:latest`.
async fn bearer_registry(expires_in: u64, challenge_scope: bool) -> (FakeUpstream, Image) {
    let up = FakeUpstream::start().await;
    up.enable_auth(expires_in);
    up.set_service("test registry");
    up.set_challenge_scope(challenge_scope);
    let img = make_image(Format::Oci, &[10]);
    up.push_image("foo/bar", "latest", &img);
    for tag in ["a", "b", "c", "d"] {
        up.set_tag("foo/bar", tag, &img.digest);
    }
    (up, img)
}

fn manifest_text(img: &Image) -> String {
    String::from_utf8(img.manifest.to_vec()).unwrap()
}

#[tokio::test]
async fn bearer_token_fetched_once_and_reused() {
    let (reg, img) = bearer_registry(300, true).await;
    let up = Upstream::new(&config(reg.url())).unwrap();
    for _ in 0..3 {
        assert_eq!(
            get(&up, "foo/bar", "manifests/latest").await,
            (200, manifest_text(&img))
        );
    }
    assert_eq!(reg.token_requests(), 1);
    // One 401, its retry, then two requests authenticated up front.
    assert_eq!(reg.registry_requests(), 4);
    let token_req = reg.last_token_request().unwrap();
    assert_eq!(
        token_req.query.as_deref(),
        Some("service=test+registry&scope=repository%3Afoo%2Fbar%3Apull")
    );
    assert_eq!(
        token_req.header("authorization"),
        None,
        "anonymous token request"
    );
    let seen = reg.requests();
    assert!(seen[0].header("authorization").is_none());
    assert_eq!(
        seen[0].header("user-agent").as_deref(),
        Some(concat!("stowage/", env!("CARGO_PKG_VERSION")))
    );
}

#[tokio::test]
async fn concurrent_first_requests_share_one_token_fetch() {
    let (reg, _) = bearer_registry(300, true).await;
    let up = Arc::new(Upstream::new(&config(reg.url())).unwrap());
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let up = up.clone();
            tokio::spawn(async move { get(&up, "foo/bar", "manifests/latest").await.0 })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(reg.token_requests(), 1);
}

#[tokio::test]
async fn token_refetched_after_expiry_and_after_rejection() {
    let (reg, _) = bearer_registry(1, false).await;
    reg.set_credentials("user", "secret");
    let mut cfg = config(reg.url());
    cfg.username = Some("user".into());
    cfg.password = Some("secret".into());
    let up = Upstream::new(&cfg).unwrap();
    assert_eq!(get(&up, "foo/bar", "manifests/a").await.0, 200);
    assert_eq!(get(&up, "foo/bar", "manifests/b").await.0, 200);
    assert_eq!(reg.token_requests(), 1);
    // expires_in=1 → cached for 0.5 s.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(get(&up, "foo/bar", "manifests/c").await.0, 200);
    assert_eq!(reg.token_requests(), 2);
    // No new 401 round trip: the challenge was remembered.
    assert_eq!(reg.registry_requests(), 4);
    // The token request carried the configured credentials, and the scope
    // (the challenge named none) defaulted to pulling the repository.
    let token_req = reg.last_token_request().unwrap();
    assert!(
        token_req
            .query
            .as_deref()
            .unwrap_or("")
            .ends_with("&scope=repository%3Afoo%2Fbar%3Apull"),
        "{:?}",
        token_req.query
    );
    assert_eq!(
        token_req.header("authorization").as_deref(),
        Some("Basic dXNlcjpzZWNyZXQ=")
    );

    // The registry revokes the token: one 401, a fresh token, a retry.
    reg.revoke_tokens();
    assert_eq!(get(&up, "foo/bar", "manifests/d").await.0, 200);
    assert_eq!(reg.token_requests(), 3);
    assert_eq!(reg.registry_requests(), 6);
}

#[tokio::test]
async fn rejected_after_retry_returns_401() {
    let reg = FakeUpstream::start().await;
    let challenge = format!(r#"Bearer realm="{}/token""#, reg.url());
    reg.respond_open(
        "/v2/a/b/manifests/x",
        401,
        &[("www-authenticate", &challenge)],
        "go away",
    );
    reg.respond_open("/token", 200, &[], r#"{"access_token":"nope"}"#);
    let up = Upstream::new(&config(reg.url())).unwrap();
    assert_eq!(
        get(&up, "a/b", "manifests/x").await,
        (401, "go away".into())
    );
    assert_eq!(reg.registry_requests(), 2);
    let last = reg.last_request("GET", "/v2/a/b/manifests/x").unwrap();
    assert_eq!(last.header("authorization").as_deref(), Some("Bearer nope"));
}

#[tokio::test]
async fn token_endpoint_failures_are_auth_errors() {
    for (status, body) in [
        (403, "denied"),
        (200, "<html>"),
        (200, r#"{"expires_in":5}"#),
    ] {
        let reg = FakeUpstream::start().await;
        let challenge = format!(r#"Bearer realm="{}/token",service=s"#, reg.url());
        reg.respond_open(
            "/v2/a/b/manifests/x",
            401,
            &[("www-authenticate", &challenge)],
            "",
        );
        reg.respond_open("/token", status, &[], body);
        let up = Upstream::new(&config(reg.url())).unwrap();
        let err = up
            .send(Method::GET, "a/b", "manifests/x", HeaderMap::new())
            .await
            .unwrap_err();
        assert!(matches!(err, UpstreamError::Auth { .. }), "{err}");
    }
}

#[tokio::test]
async fn malformed_challenge_is_protocol_error() {
    let reg = FakeUpstream::start().await;
    reg.respond_open(
        "/v2/a/b/manifests/x",
        401,
        &[("www-authenticate", r#"Bearer service="no realm""#)],
        "",
    );
    let up = Upstream::new(&config(reg.url())).unwrap();
    let err = up
        .send(Method::GET, "a/b", "manifests/x", HeaderMap::new())
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Protocol(_)), "{err}");
}

/// A registry wanting `user:pw` as Basic credentials, serving
/// `a/b` manifests `1` and `2` as `welcome`.
async fn basic_registry() -> FakeUpstream {
    let reg = FakeUpstream::start().await;
    reg.require_basic("user", "pw");
    for m in ["1", "2"] {
        reg.respond(&format!("/v2/a/b/manifests/{m}"), 200, &[], "welcome");
    }
    reg
}

#[tokio::test]
async fn basic_auth() {
    let reg = basic_registry().await;
    let mut cfg = config(reg.url());
    cfg.username = Some("user".into());
    cfg.password = Some("pw".into());
    let up = Upstream::new(&cfg).unwrap();
    assert_eq!(
        get(&up, "a/b", "manifests/1").await,
        (200, "welcome".into())
    );
    assert_eq!(
        get(&up, "a/b", "manifests/2").await,
        (200, "welcome".into())
    );
    // 401 + retry, then credentials sent up front.
    assert_eq!(reg.registry_requests(), 3);

    // Anonymous: the 401 comes back as-is.
    let anon = Upstream::new(&config(reg.url())).unwrap();
    assert_eq!(get(&anon, "a/b", "manifests/1").await.0, 401);

    // Wrong password: retried once, then the 401 comes back.
    let reg = basic_registry().await;
    cfg.url = reg.url();
    cfg.password = Some("wrong".into());
    let up = Upstream::new(&cfg).unwrap();
    assert_eq!(get(&up, "a/b", "manifests/1").await.0, 401);
    assert_eq!(get(&up, "a/b", "manifests/1").await.0, 401);
    assert_eq!(reg.registry_requests(), 3);
}

#[tokio::test]
async fn redirects_drop_authorization_keep_range() {
    // Object storage on another address.
    let storage = FakeUpstream::start().await;
    storage.respond_open("/bucket/blob", 206, &[], "partial");
    // A registry wanting Basic credentials that redirects blobs there.
    let reg = FakeUpstream::start().await;
    reg.require_basic("user", "pw");
    let signed = format!("{}/bucket/blob?X-Amz-Signature=s3cr3t", storage.url());
    reg.respond(
        "/v2/a/b/blobs/sha256:abc",
        307,
        &[("location", &signed)],
        "",
    );
    reg.respond(
        "/v2/a/b/manifests/rel",
        302,
        &[("location", "../../other/./m?x=1")],
        "",
    );
    reg.respond_open("/v2/a/other/m", 200, &[], "relative ok");
    reg.respond_open(
        "/v2/a/b/manifests/loop",
        301,
        &[("location", "/v2/a/b/manifests/loop")],
        "",
    );
    reg.respond_open(
        "/v2/a/b/manifests/bad",
        308,
        &[("location", "ftp://x/y")],
        "",
    );
    let mut cfg = config(reg.url());
    cfg.username = Some("user".into());
    cfg.password = Some("pw".into());
    let up = Upstream::new(&cfg).unwrap();

    let mut headers = HeaderMap::new();
    headers.insert(header::RANGE, HeaderValue::from_static("bytes=0-9"));
    headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
    headers.insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("Bearer caller"),
    );
    let resp = up
        .send(Method::GET, "a/b", "blobs/sha256:abc", headers.clone())
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    let s = storage.requests();
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].path, "/bucket/blob");
    assert_eq!(s[0].query.as_deref(), Some("X-Amz-Signature=s3cr3t"));
    assert_eq!(s[0].header("authorization"), None);
    assert_eq!(s[0].header("range").as_deref(), Some("bytes=0-9"));
    assert_eq!(s[0].header("accept").as_deref(), Some("*/*"));
    // The registry saw the mirror's credentials, never the caller's.
    let blob_reqs: Vec<_> = reg
        .requests()
        .into_iter()
        .filter(|r| r.path == "/v2/a/b/blobs/sha256:abc")
        .collect();
    assert_eq!(
        blob_reqs.last().unwrap().header("authorization").as_deref(),
        Some("Basic dXNlcjpwdw==")
    );
    assert!(
        reg.requests()
            .iter()
            .all(|r| r.header("authorization").as_deref() != Some("Bearer caller"))
    );

    // HEAD follows too.
    let resp = up
        .send(Method::HEAD, "a/b", "blobs/sha256:abc", headers)
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(storage.requests()[1].method, "HEAD");

    // Relative Location on the same host: no Authorization either.
    assert_eq!(
        get(&up, "a/b", "manifests/rel").await,
        (200, "relative ok".into())
    );
    let target = reg.last_request("GET", "/v2/a/other/m").unwrap();
    assert_eq!(target.query.as_deref(), Some("x=1"));
    assert_eq!(target.header("authorization"), None);

    let err = up
        .send(Method::GET, "a/b", "manifests/loop", HeaderMap::new())
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Protocol(_)), "{err}");
    assert_eq!(reg.count("GET", "/v2/a/b/manifests/loop"), 6);
    let err = up
        .send(Method::GET, "a/b", "manifests/bad", HeaderMap::new())
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Protocol(_)), "{err}");
}

#[tokio::test]
async fn library_prefix_and_path_prefix() {
    let (reg, _) = bearer_registry(300, false).await;
    let img = make_image(Format::Oci, &[10]);
    reg.push_image("library/alpine", "3.20", &img);
    let mut cfg = config(format!("{}/", reg.url()));
    cfg.library_prefix = true;
    let up = Upstream::new(&cfg).unwrap();
    assert_eq!(
        get(&up, "alpine", "manifests/3.20").await,
        (200, manifest_text(&img))
    );
    assert!(reg.requests().iter().any(|s| s.path == "/token"
        && s.query.as_deref()
            == Some("service=test+registry&scope=repository%3Alibrary%2Falpine%3Apull")));
    assert_eq!(get(&up, "foo/bar", "manifests/latest").await.0, 200);
    assert!(reg.count("GET", "/v2/foo/bar/manifests/latest") >= 1);

    // A URL with a path prefix.
    let reg = FakeUpstream::start().await;
    reg.respond_open("/mirror/v2/library/alpine/tags/list", 200, &[], "");
    let mut cfg = config(format!("{}/mirror/", reg.url()));
    cfg.library_prefix = true;
    let up = Upstream::new(&cfg).unwrap();
    let resp = up
        .send(
            Method::GET,
            "alpine",
            "tags/list?n=10&last=x",
            HeaderMap::new(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let r = &reg.requests()[0];
    assert_eq!(
        (r.path.as_str(), r.query.as_deref()),
        ("/mirror/v2/library/alpine/tags/list", Some("n=10&last=x"))
    );
}

#[tokio::test]
async fn statuses_pass_through() {
    let reg = FakeUpstream::start().await;
    reg.respond_open(
        "/v2/a/b/manifests/x",
        429,
        &[("retry-after", "1")],
        "slow down",
    );
    let up = Upstream::new(&config(reg.url())).unwrap();
    assert_eq!(get(&up, "a/b", "manifests/missing").await.0, 404);
    assert_eq!(get(&up, "a/b", "manifests/x").await.0, 429);
}

#[tokio::test]
async fn unreachable_and_timeouts() {
    // Nothing listens there.
    let up = Upstream::new(&config(dead_url().await)).unwrap();
    let err = up
        .send(Method::GET, "a/b", "manifests/x", HeaderMap::new())
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Unreachable { .. }), "{err}");

    // Accepts connections but never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let mut cfg = config(format!("http://{addr}"));
    cfg.timeout = Duration::from_millis(200);
    let up = Upstream::new(&cfg).unwrap();
    let started = Instant::now();
    let err = up
        .send(Method::GET, "a/b", "manifests/x", HeaderMap::new())
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Unreachable { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1));
    hold.abort();

    // A TLS handshake against a plain-HTTP server fails as unreachable.
    let reg = FakeUpstream::start().await;
    let up = Upstream::new(&config(format!("https://{}", reg.addr()))).unwrap();
    let err = up
        .send(Method::GET, "a/b", "manifests/x", HeaderMap::new())
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Unreachable { .. }), "{err}");
}

/// Docker Hub style rate-limit headers on `a/b` manifest `1`.
fn rate_limited(reg: &FakeUpstream, remaining: &str) {
    reg.respond_open(
        "/v2/a/b/manifests/1",
        200,
        &[
            ("ratelimit-limit", "100;w=21600"),
            ("ratelimit-remaining", remaining),
        ],
        "m",
    );
}

#[tokio::test]
async fn metrics_count_exchanges_and_rate_limits() {
    let reg = FakeUpstream::start().await;
    rate_limited(&reg, "97;w=21600");
    reg.respond_open(
        "/v2/a/b/blobs/sha256:x",
        307,
        &[("location", "/storage/x")],
        "",
    );
    reg.respond_open("/storage/x", 200, &[], "blob");
    let metrics = Arc::new(Metrics::new());
    let up = Upstream::new(&config(reg.url()))
        .unwrap()
        .with_metrics(metrics.clone());
    assert!(Arc::ptr_eq(up.metrics(), &metrics));
    assert_eq!(get(&up, "a/b", "manifests/1").await.0, 200);
    assert_eq!(get(&up, "a/b", "blobs/sha256:x").await.0, 200);
    assert_eq!(get(&up, "a/b", "tags/list").await.0, 404);
    let dead = Upstream::new(&config(dead_url().await))
        .unwrap()
        .with_metrics(metrics.clone());
    assert!(
        dead.send(Method::GET, "a/b", "referrers/sha256:x", HeaderMap::new())
            .await
            .is_err()
    );
    let text = String::from_utf8(metrics.encode().unwrap()).unwrap();
    for line in [
        r#"stowage_upstream_requests_total{kind="manifest",status="200",upstream="test.local"} 1"#,
        r#"stowage_upstream_requests_total{kind="blob",status="307",upstream="test.local"} 1"#,
        r#"stowage_upstream_requests_total{kind="blob",status="200",upstream="test.local"} 1"#,
        r#"stowage_upstream_requests_total{kind="tags",status="404",upstream="test.local"} 1"#,
        r#"stowage_upstream_requests_total{kind="referrers",status="error",upstream="test.local"} 1"#,
        r#"stowage_upstream_request_duration_seconds_count{kind="blob",upstream="test.local"} 2"#,
        r#"stowage_upstream_ratelimit_remaining{upstream="test.local"} 97"#,
        r#"stowage_upstream_ratelimit_limit{upstream="test.local"} 100"#,
    ] {
        assert!(text.contains(line), "missing {line}:\n{text}");
    }
}

#[derive(Clone, Default)]
struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn rate_limit_headers_and_429_are_logged() {
    let reg = FakeUpstream::start().await;
    rate_limited(&reg, "76;w=21600");
    reg.respond_open(
        "/v2/a/b/manifests/2",
        429,
        &[("retry-after", "30")],
        "slow down",
    );
    reg.respond_open("/v2/a/b/manifests/3", 200, &[], "");
    let capture = LogCapture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    // With a single registered dispatcher, tracing-core computes the
    // interest of a callsite first hit on another thread (another test
    // reaching the same log line) from that thread's default, which is no
    // subscriber, and caches "never". A second live dispatcher makes it ask
    // every registered one instead.
    let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
    let up = Upstream::new(&config(reg.url())).unwrap();
    assert_eq!(get(&up, "a/b", "manifests/3").await.0, 200);
    let quiet = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(!quiet.contains("rate limit"), "{quiet}");
    assert_eq!(get(&up, "a/b", "manifests/1").await.0, 200);
    assert_eq!(get(&up, "a/b", "manifests/2").await.0, 429);
    let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("upstream rate limit"), "{text}");
    assert!(text.contains(r#"limit="100;w=21600""#), "{text}");
    assert!(text.contains(r#"remaining="76;w=21600""#), "{text}");
    assert!(
        text.contains("upstream rate limit exceeded (429)"),
        "{text}"
    );
    assert!(text.contains(r#"retry_after="30""#), "{text}");
}

/// Credentials go only where the registry itself sent the mirror: a 401
/// from a redirect target is not a registry challenge (no token fetched
/// from its realm, no credentials sent there).
#[tokio::test]
async fn redirect_target_401_is_not_a_challenge() {
    let storage = FakeUpstream::start().await;
    let realm = format!("{}/token", storage.url());
    storage.respond_open(
        "/cdn/blob",
        401,
        &[(
            "www-authenticate",
            &format!("Bearer realm=\"{realm}\",service=\"cdn\""),
        )],
        "",
    );
    storage.respond_open("/token", 200, &[], r#"{"token":"cdn-token"}"#);
    let reg = FakeUpstream::start().await;
    reg.respond(
        "/v2/a/b/blobs/sha256:abc",
        307,
        &[("location", &format!("{}/cdn/blob", storage.url()))],
        "",
    );
    let mut cfg = config(reg.url());
    cfg.username = Some("user".into());
    cfg.password = Some("pw".into());
    let up = Upstream::new(&cfg).unwrap();
    let err = up
        .send(Method::GET, "a/b", "blobs/sha256:abc", HeaderMap::new())
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Protocol(_)), "{err}");
    assert_eq!(
        storage.token_requests(),
        0,
        "a token was fetched from the CDN's realm"
    );
    assert!(
        storage
            .requests()
            .iter()
            .all(|r| r.header("authorization").is_none()),
        "credentials reached the redirect target"
    );
    assert_eq!(storage.count("GET", "/cdn/blob"), 1);
}

/// Redirects never reach link-local or private addresses from an upstream
/// that is not at one (here: a loopback upstream may redirect to loopback,
/// by address or by name, but not to 169.254.169.254 or 10.x), unless
/// `allow_private_redirects`.
#[tokio::test]
async fn redirects_to_private_addresses_are_refused() {
    let storage = FakeUpstream::start().await;
    storage.respond_open("/ok", 200, &[], "fine");
    let reg = FakeUpstream::start().await;
    for (path, target) in [
        (
            "/v2/a/b/blobs/sha256:meta",
            "http://169.254.169.254/latest/meta-data/".to_string(),
        ),
        (
            "/v2/a/b/blobs/sha256:lan",
            "http://10.255.255.1/x".to_string(),
        ),
        ("/v2/a/b/blobs/sha256:v6", "http://[fe80::1]/x".to_string()),
        (
            "/v2/a/b/blobs/sha256:local",
            format!("{}/ok", storage.url()),
        ),
        (
            "/v2/a/b/blobs/sha256:name",
            format!("http://localhost:{}/ok", storage.addr().port()),
        ),
    ] {
        reg.respond(path, 302, &[("location", &target)], "");
    }
    let mut cfg = config(reg.url());
    cfg.timeout = Duration::from_secs(1);
    let up = Upstream::new(&cfg).unwrap();
    for digest in ["sha256:meta", "sha256:lan", "sha256:v6"] {
        let started = Instant::now();
        let err = up
            .send(
                Method::GET,
                "a/b",
                &format!("blobs/{digest}"),
                HeaderMap::new(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&err, UpstreamError::Protocol(m) if m.contains("allow_private_redirects")),
            "{digest}: {err}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{digest}: tried to connect"
        );
    }
    for digest in ["sha256:local", "sha256:name"] {
        assert_eq!(
            get(&up, "a/b", &format!("blobs/{digest}")).await,
            (200, "fine".into()),
            "{digest}"
        );
    }
    // Allowed: the mirror tries (whatever answers there, if anything).
    cfg.allow_private_redirects = true;
    let up = Upstream::new(&cfg).unwrap();
    match up
        .send(Method::GET, "a/b", "blobs/sha256:lan", HeaderMap::new())
        .await
    {
        Ok(_) | Err(UpstreamError::Unreachable { .. }) => {}
        Err(e) => panic!("allowed private redirect refused: {e}"),
    }
}

/// The token realm a challenge names gets the mirror's credentials, so it
/// is held to the same address rules as a redirect target: a loopback
/// upstream's realm may be on loopback (by address or by name), not at
/// 169.254.169.254 or 10.x.
#[tokio::test]
async fn token_realms_at_private_addresses_are_refused() {
    let tokens = FakeUpstream::start().await;
    tokens.respond_open("/token", 200, &[], r#"{"token":"t"}"#);
    let realms = [
        ("meta", "http://169.254.169.254/latest/token".to_string()),
        ("lan", "http://10.255.255.1/token".to_string()),
        ("local", format!("{}/token", tokens.url())),
        (
            "name",
            format!("http://localhost:{}/token", tokens.addr().port()),
        ),
    ];
    for (case, realm) in realms {
        // One registry per realm: an upstream remembers its challenge.
        let reg = FakeUpstream::start().await;
        let challenge = format!("Bearer realm=\"{realm}\",service=\"reg\"");
        reg.respond(
            "/v2/a/b/manifests/v1",
            401,
            &[("www-authenticate", &challenge)],
            "",
        );
        let mut cfg = config(reg.url());
        cfg.timeout = Duration::from_secs(1);
        cfg.username = Some("mirror".into());
        cfg.password = Some("secret".into());
        let up = Upstream::new(&cfg).unwrap();
        let before = tokens.token_requests();
        let started = Instant::now();
        let sent = up
            .send(Method::GET, "a/b", "manifests/v1", HeaderMap::new())
            .await;
        if case == "meta" || case == "lan" {
            let message = sent.unwrap_err().to_string();
            assert!(
                message.contains("token realm refused")
                    && message.contains("allow_private_redirects"),
                "{case}: {message}"
            );
            assert!(
                started.elapsed() < Duration::from_millis(500),
                "{case}: tried to connect"
            );
        } else {
            // Loopback, like the upstream: the token is fetched (and the
            // registry, scripted to, still refuses).
            assert_eq!(sent.unwrap().status(), 401, "{case}");
            assert_eq!(tokens.token_requests(), before + 1, "{case}");
        }
    }
    assert!(
        tokens
            .requests()
            .iter()
            .all(|r| r.header("authorization").is_some()),
        "the realm got the credentials"
    );
}
