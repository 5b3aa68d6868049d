//! Pulling images through stowage: bytes, digests and headers equal the
//! upstream's, names are mapped, and cached content is not fetched again.

mod common;

use common::*;

const ALL_MANIFEST_TYPES: [&str; 4] = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pull_oci_image_by_tag_and_digest() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[3000, 200_000, 1 << 20]);
    up.push_image("library/alpine", "3.20", &img);
    let st = start_stowage(&up.url(), "").await;
    let c = client();

    // One-component name: stowage asks upstream for library/alpine.
    pull_image(&c, &st, "alpine", "3.20", &img).await;
    check_manifest(&c, &st, "alpine", &img.digest, &img.manifest, OCI_MANIFEST).await;

    assert!(
        up.count_where(|r| r.path.starts_with("/v2/alpine/")) == 0,
        "stowage asked upstream for /v2/alpine/... instead of /v2/library/alpine/...: {:?}",
        up.requests()
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect::<Vec<_>>()
    );
    for b in img.blobs() {
        assert_eq!(
            up.blob_gets(&b.digest),
            1,
            "upstream GETs of blob {}",
            b.digest
        );
        assert!(
            up.count("GET", &format!("/v2/library/alpine/blobs/{}", b.digest)) == 1,
            "blob fetched from the wrong repository"
        );
    }
    // The manifest request upstream accepts every manifest type.
    let m = up
        .requests()
        .into_iter()
        .find(|r| r.method == "GET" && r.path.starts_with("/v2/library/alpine/manifests/"))
        .expect("no upstream manifest GET");
    let accept = m
        .headers
        .get_all("accept")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect::<Vec<_>>()
        .join(",");
    for t in ALL_MANIFEST_TYPES {
        assert!(accept.contains(t), "upstream Accept {accept:?} lacks {t}");
    }

    // Second pull: nothing goes upstream (tag is within its TTL).
    let before = up.total();
    pull_image(&c, &st, "alpine", "3.20", &img).await;
    pull_image(&c, &st, "alpine", &img.digest, &img).await;
    pull_image(&c, &st, "library/alpine", "3.20", &img).await;
    assert_eq!(
        up.all_blob_gets(),
        img.blobs().len(),
        "upstream blob GETs after second pull"
    );
    assert_eq!(
        up.total(),
        before,
        "second pull made upstream requests: {:?}",
        up.requests()[before..]
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pull_docker_image_by_digest_first() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Docker, &[10, 50_000]);
    up.push_image("myorg/app", "v1", &img);
    let st = start_stowage(&up.url(), "").await;
    let c = client();

    // Two-component names are not prefixed.
    pull_image(&c, &st, "myorg/app", &img.digest, &img).await;
    check_manifest(&c, &st, "myorg/app", "v1", &img.manifest, DOCKER_MANIFEST).await;
    assert_eq!(
        up.count_where(|r| r.path.contains("/library/")),
        0,
        "myorg/app must not get library/"
    );
    assert!(up.count("GET", &format!("/v2/myorg/app/manifests/{}", img.digest)) >= 1);
    let before = up.total();
    pull_image(&c, &st, "myorg/app", "v1", &img).await;
    assert_eq!(up.total(), before, "second pull went upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pull_multi_platform_index() {
    for format in [Format::Oci, Format::Docker] {
        let up = FakeUpstream::start().await;
        let amd = make_image_for(format, &[100, 2000], "amd64");
        let arm = make_image_for(format, &[300], "arm64");
        let idx = make_index(format, vec![(amd.clone(), "amd64"), (arm.clone(), "arm64")]);
        up.push_index("library/multi", "latest", &idx);
        let st = start_stowage(&up.url(), "").await;
        let c = client();

        check_manifest(
            &c,
            &st,
            "multi",
            "latest",
            &idx.manifest,
            idx.media_type.as_str(),
        )
        .await;
        check_manifest(
            &c,
            &st,
            "multi",
            &idx.digest,
            &idx.manifest,
            idx.media_type.as_str(),
        )
        .await;
        pull_image(&c, &st, "multi", &arm.digest, &arm).await;
        pull_image(&c, &st, "multi", &amd.digest, &amd).await;

        let before = up.total();
        check_manifest(
            &c,
            &st,
            "multi",
            "latest",
            &idx.manifest,
            idx.media_type.as_str(),
        )
        .await;
        pull_image(&c, &st, "multi", &arm.digest, &arm).await;
        assert_eq!(
            up.total(),
            before,
            "{format:?}: cached index pull went upstream"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cached_image_served_while_upstream_down() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[5000, 70_000]);
    up.push_image("library/busybox", "1", &img);
    let st = start_stowage(&up.url(), "").await;
    let c = client();
    pull_image(&c, &st, "busybox", "1", &img).await;

    for f in [Failure::Down, Failure::Unavailable] {
        up.set_failure(f.clone());
        let before = up.total();
        pull_image(&c, &st, "busybox", &img.digest, &img).await;
        pull_image(&c, &st, "busybox", "1", &img).await;
        assert_eq!(up.total(), before, "{f:?}: cached pull went upstream");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_survives_restart() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[5000, 300_000]);
    up.push_image("library/redis", "7", &img);
    let st = start_stowage(&up.url(), "").await;
    let c = client();
    pull_image(&c, &st, "redis", "7", &img).await;
    let dir = st.stop().await;

    // Same cache dir, upstream now failing: digests come from disk.
    up.set_failure(Failure::Unavailable);
    let st = start_stowage_in(dir, &up.url(), "").await;
    let before_blobs = up.all_blob_gets();
    pull_image(&c, &st, "redis", &img.digest, &img).await;
    assert_eq!(
        up.all_blob_gets(),
        before_blobs,
        "blobs fetched again after restart"
    );
    let before = up.total();
    pull_image(&c, &st, "redis", &img.digest, &img).await;
    assert_eq!(up.total(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn head_first_on_uncached_manifest() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[10]);
    up.push_image("library/headfirst", "1", &img);
    let st = start_stowage(&up.url(), "").await;
    let c = client();
    for reference in ["1".to_string(), img.digest.clone()] {
        let url = st.manifest_url("headfirst", &reference);
        let r = c.head(&url).send().await.unwrap();
        assert_eq!(r.status(), 200, "HEAD {url}");
        assert_eq!(
            header(&r, "content-type").as_deref(),
            Some(OCI_MANIFEST),
            "HEAD {url}"
        );
        assert_eq!(
            header(&r, "content-length"),
            Some(img.manifest.len().to_string()),
            "HEAD {url}"
        );
        assert_eq!(
            header(&r, "docker-content-digest"),
            Some(img.digest.clone()),
            "HEAD {url}"
        );
        assert!(r.bytes().await.unwrap().is_empty(), "HEAD {url} has a body");
    }
    check_manifest(&c, &st, "headfirst", "1", &img.manifest, OCI_MANIFEST).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registry_host_in_path_or_ns_selects_the_upstream() {
    let hub = FakeUpstream::start().await;
    let ghcr = FakeUpstream::start().await;
    let hub_img = make_image(Format::Oci, &[100]);
    let ghcr_img = make_image(Format::Oci, &[200]);
    hub.push_image("library/alpine", "1", &hub_img);
    ghcr.push_image("org/app", "1", &ghcr_img);
    let dir = tempfile::TempDir::new().unwrap();
    let toml = format!(
        "{}\n[[upstream]]\nhost = \"ghcr.io\"\nurl = \"{}\"\n",
        config_toml(dir.path(), &hub.url(), ""),
        ghcr.url()
    );
    let st = start_stowage_toml(dir, &toml).await;
    let c = client();

    // Default upstream, with and without its host in the path.
    pull_image(&c, &st, "alpine", "1", &hub_img).await;
    pull_image(&c, &st, "docker.io/library/alpine", "1", &hub_img).await;
    pull_image(&c, &st, "docker.io/alpine", "1", &hub_img).await;
    // Second upstream by path prefix (no library/ prefix there).
    pull_image(&c, &st, "ghcr.io/org/app", "1", &ghcr_img).await;
    assert!(ghcr.manifest_gets("org/app", "1") + ghcr.manifest_heads("org/app", "1") >= 1);
    assert_eq!(ghcr.count_where(|r| r.path.contains("library/")), 0);
    assert_eq!(
        hub.count_where(|r| r.path.contains("org/app")),
        0,
        "ghcr.io request went to the default upstream"
    );

    // containerd's ?ns= names the registry.
    let (_, body) = get_ok(
        &c,
        &format!("{}?ns=ghcr.io", st.manifest_url("org/app", "1")),
    )
    .await;
    assert_eq!(body, ghcr_img.manifest);
    let (_, body) = get_ok(
        &c,
        &format!(
            "{}?ns=ghcr.io",
            st.blob_url("org/app", &ghcr_img.config.digest)
        ),
    )
    .await;
    assert_eq!(body, ghcr_img.config.data);
    // A registry this mirror does not front is refused, never proxied.
    let r = c
        .get(format!("{}?ns=quay.io", st.manifest_url("org/app", "1")))
        .send()
        .await
        .unwrap();
    assert_oci_error(r, 404, &["NAME_UNKNOWN"], "unknown ns").await;
}

/// The future every request's handling starts as is allocated and copied
/// whole for each request (`server.rs`), hits included, and an async fn's
/// state holds the largest state of any path it may take. The paths a hit
/// does not take (misses, requests upstream, the rare routes) are boxed
/// where they start, so it stays small: 2,784 bytes (in the test build as in
/// a release build), where it was 42,128.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requests_future_stays_small() {
    const MAX: usize = 8 << 10;
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[3000]);
    up.push_image("library/alpine", "3.20", &img);
    let st = start_stowage(&up.url(), "").await;
    pull_image(&client(), &st, "alpine", "3.20", &img).await;
    let size = stowage::test_hooks::request_future_size();
    assert!(size > 0, "no request future was noted");
    assert!(
        size <= MAX,
        "a request's future is {size} bytes (at most {MAX}): a path a hit does not take \
         is inline in it; box it where it starts (see routes::handle)"
    );
}
