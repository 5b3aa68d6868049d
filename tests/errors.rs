//! Error handling: invalid requests are refused locally with OCI error
//! codes; upstream errors map to the right codes.

mod common;

use common::*;

const GOOD_DIGEST: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn base_endpoint() {
    let up = FakeUpstream::start().await;
    let st = start_stowage(&up.url(), "").await;
    let c = client();
    for path in ["/v2/", "/v2"] {
        let r = c.get(format!("{}{path}", st.url())).send().await.unwrap();
        assert_eq!(r.status(), 200, "GET {path}");
        assert_eq!(
            header(&r, "docker-distribution-api-version").as_deref(),
            Some("registry/2.0"),
            "GET {path}"
        );
    }
    let r = c.head(format!("{}/v2/", st.url())).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "docker-distribution-api-version").as_deref(),
        Some("registry/2.0")
    );
    assert!(r.bytes().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_names_are_refused_locally() {
    let up = FakeUpstream::start().await;
    let st = start_stowage(&up.url(), "").await;
    let long = "a".repeat(256);
    let long_nested = format!("{}/{}", "b".repeat(200), "c".repeat(60));
    let names = [
        "UPPER",
        "Library/alpine",
        "a..b",
        "a/../b",
        "..",
        "a/..",
        "../etc",
        "a/./b",
        "a//b",
        "-a",
        "a-",
        "a___b",
        "_a",
        "a/b/",
        "%2e%2e",
        "a/%2e%2e/b",
        "a b",
        long.as_str(),
        long_nested.as_str(),
    ];
    for name in names {
        for tail in [
            "manifests/latest".to_string(),
            format!("blobs/{GOOD_DIGEST}"),
            "tags/list".to_string(),
        ] {
            let target = format!("/v2/{}/{tail}", name.replace(' ', "%20"));
            let r = raw_request(st.addr, "GET", &target).await;
            r.assert_oci_error(400, &["NAME_INVALID"], &format!("GET {target}"));
        }
    }
    // `..` right after /v2/, and paths that are no API route at all: refused
    // locally with an OCI error (which one depends on how far routing got).
    for target in [
        "/v2/../manifests/latest",
        "/v2/../../etc/passwd",
        "/v2/a/b/../../manifests/latest",
    ] {
        let r = raw_request(st.addr, "GET", target).await;
        assert!(
            matches!(r.status, 400 | 404 | 405),
            "GET {target}: status {} (body {})",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        check_oci_error_body(
            r.header("content-type").as_deref(),
            &r.body,
            &["NAME_INVALID", "NAME_UNKNOWN", "NOT_FOUND", "UNSUPPORTED"],
            target,
        );
    }
    assert_eq!(
        up.total(),
        0,
        "invalid names reached upstream: {:?}",
        up.requests()
            .iter()
            .map(|r| r.path.clone())
            .collect::<Vec<_>>()
    );

    // Valid but unusual names are accepted (and go upstream).
    for name in ["a__b", "a-b", "a--b", "a.b", "a_b/c-d/e.f", "0"] {
        let r = raw_request(st.addr, "GET", &format!("/v2/{name}/manifests/latest")).await;
        r.assert_oci_error(404, &["MANIFEST_UNKNOWN"], name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_digests_are_refused_locally() {
    let up = FakeUpstream::start().await;
    let st = start_stowage(&up.url(), "").await;
    let upper = format!("sha256:{}", GOOD_DIGEST[7..].to_uppercase());
    let short = &GOOD_DIGEST[..GOOD_DIGEST.len() - 1];
    let long = format!("{GOOD_DIGEST}0");
    let digests = [
        "sha256:abc",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
        upper.as_str(),
        short,
        long.as_str(),
        "sha256:",
        "sha256:zzzzc44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "sha256:..%2f..%2fetc",
        ":e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    ];
    for d in digests {
        for kind in ["blobs", "manifests"] {
            let target = format!("/v2/alpine/{kind}/{d}");
            for method in ["GET", "HEAD"] {
                let r = raw_request(st.addr, method, &target).await;
                if method == "HEAD" {
                    assert_eq!(r.status, 400, "HEAD {target}");
                    assert!(r.body.is_empty(), "HEAD {target} has a body");
                } else {
                    r.assert_oci_error(400, &["DIGEST_INVALID"], &format!("GET {target}"));
                }
            }
        }
    }
    // A blob reference must be a digest.
    let r = raw_request(st.addr, "GET", "/v2/alpine/blobs/latest").await;
    r.assert_oci_error(400, &["DIGEST_INVALID"], "blob by tag");
    assert_eq!(up.total(), 0, "invalid digests reached upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_tags_are_refused_locally() {
    let up = FakeUpstream::start().await;
    let st = start_stowage(&up.url(), "").await;
    let long = "t".repeat(129);
    for tag in [
        "-bad",
        ".bad",
        long.as_str(),
        "bad%20tag",
        "bad!tag",
        "b@d",
        "%2e%2e",
    ] {
        let target = format!("/v2/alpine/manifests/{tag}");
        let r = raw_request(st.addr, "GET", &target).await;
        r.assert_oci_error(
            400,
            &["TAG_INVALID", "MANIFEST_INVALID"],
            &format!("GET {target}"),
        );
    }
    assert_eq!(up.total(), 0, "invalid tags reached upstream");
    // Longest valid tag and odd-but-valid tags are accepted.
    let max = "t".repeat(128);
    for tag in [max.as_str(), "_x", "1.0-rc_1", "A"] {
        let r = raw_request(st.addr, "GET", &format!("/v2/alpine/manifests/{tag}")).await;
        r.assert_oci_error(404, &["MANIFEST_UNKNOWN"], tag);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn push_attempts_are_unsupported() {
    let up = FakeUpstream::start().await;
    let st = start_stowage(&up.url(), "").await;
    let cases = [
        ("POST", "/v2/alpine/blobs/uploads/".to_string()),
        (
            "POST",
            format!("/v2/alpine/blobs/uploads/?digest={GOOD_DIGEST}"),
        ),
        (
            "POST",
            "/v2/alpine/blobs/uploads/?mount=sha256:aa&from=other".to_string(),
        ),
        (
            "PATCH",
            "/v2/alpine/blobs/uploads/0c8a2f3b-6c1e-4e7e-9a4b-5f0a1f2e3d4c".to_string(),
        ),
        (
            "PUT",
            format!(
                "/v2/alpine/blobs/uploads/0c8a2f3b-6c1e-4e7e-9a4b-5f0a1f2e3d4c?digest={GOOD_DIGEST}"
            ),
        ),
        (
            "DELETE",
            "/v2/alpine/blobs/uploads/0c8a2f3b-6c1e-4e7e-9a4b-5f0a1f2e3d4c".to_string(),
        ),
        ("DELETE", format!("/v2/alpine/blobs/{GOOD_DIGEST}")),
        ("PUT", "/v2/alpine/manifests/latest".to_string()),
        ("PUT", format!("/v2/alpine/manifests/{GOOD_DIGEST}")),
        ("DELETE", "/v2/alpine/manifests/latest".to_string()),
        ("DELETE", format!("/v2/alpine/manifests/{GOOD_DIGEST}")),
        ("POST", "/v2/alpine/manifests/latest".to_string()),
    ];
    for (method, target) in &cases {
        let r = raw_request(st.addr, method, target).await;
        r.assert_oci_error(405, &["UNSUPPORTED"], &format!("{method} {target}"));
        // RFC 9110: a 405 lists the methods the resource has: none for
        // an upload.
        let allow = if target.contains("/uploads") {
            ""
        } else {
            "GET, HEAD"
        };
        assert_eq!(
            r.header("allow").as_deref(),
            Some(allow),
            "{method} {target}"
        );
    }
    for method in ["GET", "HEAD"] {
        let target = "/v2/alpine/blobs/uploads/0c8a2f3b-6c1e-4e7e-9a4b-5f0a1f2e3d4c";
        let r = raw_request(st.addr, method, target).await;
        assert_eq!(r.status, 405, "{method} {target}");
        assert_eq!(r.header("allow").as_deref(), Some(""), "{method} {target}");
    }
    assert_eq!(up.total(), 0, "push attempts reached upstream");
}

/// A path that is no route of the API (the catalog, the root, a manifest
/// with no reference) is not found: 404 with an OCI error body, whatever
/// the method. It once got 405, as if another method would do.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paths_outside_the_api_are_not_found() {
    let up = FakeUpstream::start().await;
    let st = start_stowage(&up.url(), "").await;
    for target in [
        "/",
        "/v2/_catalog",
        "/v2/library/alpine/manifests",
        "/v2/library/alpine/blobs",
        "/v2/library/alpine/tags",
        "/v1/_ping",
        "/v2x",
    ] {
        for method in ["GET", "HEAD", "POST"] {
            let r = raw_request(st.addr, method, target).await;
            assert_eq!(r.status, 404, "{method} {target}");
            if method != "HEAD" {
                r.assert_oci_error(404, &["UNSUPPORTED"], &format!("{method} {target}"));
            }
        }
    }
    assert_eq!(up.total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_404_maps_to_unknown_codes() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[10]);
    up.push_image("library/exists", "1", &img);
    let st = start_stowage(&up.url(), "").await;
    let c = client();
    let missing = sha256_digest(b"missing");

    let r = c
        .get(st.manifest_url("exists", "nosuchtag"))
        .send()
        .await
        .unwrap();
    assert_oci_error(r, 404, &["MANIFEST_UNKNOWN"], "unknown tag").await;
    let r = c
        .get(st.manifest_url("exists", &missing))
        .send()
        .await
        .unwrap();
    assert_oci_error(r, 404, &["MANIFEST_UNKNOWN"], "unknown manifest digest").await;
    let r = c
        .get(st.manifest_url("nosuchrepo", "latest"))
        .send()
        .await
        .unwrap();
    assert_oci_error(
        r,
        404,
        &["MANIFEST_UNKNOWN", "NAME_UNKNOWN"],
        "unknown repo",
    )
    .await;
    let r = c.get(st.blob_url("exists", &missing)).send().await.unwrap();
    assert_oci_error(r, 404, &["BLOB_UNKNOWN"], "unknown blob").await;
    for url in [
        st.blob_url("exists", &missing),
        st.manifest_url("exists", "nosuchtag"),
    ] {
        let r = c.head(&url).send().await.unwrap();
        assert_eq!(r.status(), 404, "HEAD {url}");
        assert!(r.bytes().await.unwrap().is_empty(), "HEAD {url} has a body");
    }

    // Not remembered: content that appears upstream is found.
    let late = Blob::random(100);
    let r = c
        .get(st.blob_url("exists", &late.digest))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    up.add_blob(late.data.clone());
    check_blob(&c, &st, "exists", &late).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_429_is_passed_on_with_retry_after() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[10]);
    up.push_image("library/limited", "1", &img);
    up.set_failure(Failure::TooManyRequests { retry_after: 17 });
    let st = start_stowage(&up.url(), "").await;
    let c = client();
    for url in [
        st.manifest_url("limited", "1"),
        st.manifest_url("limited", &img.digest),
        st.blob_url("limited", &img.config.digest),
    ] {
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(
            header(&r, "retry-after").as_deref(),
            Some("17"),
            "GET {url}: Retry-After"
        );
        assert_oci_error(r, 429, &["TOOMANYREQUESTS"], &url).await;
    }
    // Nothing bad was cached: once the limit lifts, the pull works.
    up.set_failure(Failure::None);
    pull_image(&c, &st, "limited", "1", &img).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_failure_with_nothing_cached_is_502_or_503() {
    let c = client();
    let blob = Blob::random(10);

    // Unreachable address.
    let st = start_stowage(&dead_url().await, "timeout = \"5s\"").await;
    for url in [
        st.manifest_url("alpine", "latest"),
        st.manifest_url("alpine", GOOD_DIGEST),
        st.blob_url("alpine", &blob.digest),
    ] {
        let r = within(20, &url, c.get(&url).send()).await.unwrap();
        let status = r.status().as_u16();
        assert!(
            status == 502 || status == 503,
            "unreachable upstream: GET {url}: {status}"
        );
        assert_oci_error(r, status, &["UNAVAILABLE", "UNKNOWN"], &url).await;
    }

    // Upstream that answers 503, and one that drops connections.
    let up = FakeUpstream::start().await;
    up.add_blob(blob.data.clone());
    let st = start_stowage(&up.url(), "timeout = \"5s\"").await;
    for f in [Failure::Unavailable, Failure::Down] {
        up.set_failure(f.clone());
        for url in [
            st.manifest_url("alpine", "latest"),
            st.blob_url("alpine", &blob.digest),
        ] {
            let r = within(20, &url, c.get(&url).send()).await.unwrap();
            let status = r.status().as_u16();
            assert!(status == 502 || status == 503, "{f:?}: GET {url}: {status}");
            assert_oci_error(
                r,
                status,
                &["UNAVAILABLE", "UNKNOWN"],
                &format!("{f:?} {url}"),
            )
            .await;
        }
    }
    up.set_failure(Failure::None);
    check_blob(&c, &st, "alpine", &blob).await;
}

/// An upstream 401 (the mirror's credentials refused) reaches the client
/// as a mirror failure naming the reason, so that dockerd and containerd
/// fall back to the registry: never as a 401 without `WWW-Authenticate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_401_is_a_mirror_failure() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[10]);
    up.push_image("library/locked", "1", &img);
    up.require_basic("alice", "right");
    let st = start_stowage(&up.url(), "username = \"alice\"\npassword = \"wrong\"").await;
    let c = client();
    for url in [
        st.manifest_url("locked", "1"),
        st.manifest_url("locked", &img.digest),
        st.blob_url("locked", &img.config.digest),
        st.v2("locked/tags/list"),
    ] {
        let r = c.get(&url).send().await.unwrap();
        let (status, challenge) = (r.status(), r.headers().contains_key("www-authenticate"));
        let ct = header(&r, "content-type");
        let body = r.bytes().await.unwrap();
        let text = String::from_utf8_lossy(&body);
        assert!(
            status != 401 || challenge,
            "GET {url}: 401 without a challenge"
        );
        assert_eq!(status, 502, "GET {url}: {text}");
        check_oci_error_body(ct.as_deref(), &body, &["UNAVAILABLE"], &url);
        assert!(
            text.contains("credentials"),
            "GET {url}: reason not given: {text}"
        );
        let r = c.head(&url).send().await.unwrap();
        assert_eq!(r.status(), 502, "HEAD {url}");
    }
}

/// Client-visible errors do not echo upstream URLs (they may carry
/// pre-signed query strings, internal host names); the logs have them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_errors_do_not_echo_upstream_urls() {
    let c = client();
    let leaks = |text: &str, secret: &str| text.contains(secret) || text.contains("http://");

    // Unreachable.
    let dead = dead_url().await;
    let st = start_stowage(&dead, "timeout = \"1s\"").await;
    let r = c.get(st.manifest_url("x", "1")).send().await.unwrap();
    let text = r.text().await.unwrap();
    let addr = dead.trim_start_matches("http://");
    assert!(!leaks(&text, addr), "unreachable: {text}");

    // A bad redirect, a failing token endpoint.
    let up = FakeUpstream::start().await;
    up.respond(
        "/v2/library/x/manifests/1",
        302,
        &[("location", "ftp://secret.example/path?sig=abc")],
        "",
    );
    let st = start_stowage(&up.url(), "").await;
    let r = c.get(st.manifest_url("x", "1")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let text = r.text().await.unwrap();
    assert!(!leaks(&text, "secret.example"), "bad redirect: {text}");
    up.enable_auth(300);
    up.respond_open("/token", 500, &[], "token service down");
    let r = c.get(st.manifest_url("x", "2")).send().await.unwrap();
    let text = r.text().await.unwrap();
    assert!(
        !leaks(&text, &up.addr().to_string()),
        "token endpoint: {text}"
    );
    assert!(text.contains("errors"), "{text}");
}
