//! Manifest caching: digests forever, tags for `tag_ttl`, revalidation with
//! HEAD, stale-if-error, coalescing, verification; tags/list passthrough.

mod common;

use std::time::Duration;

use common::*;

const TTL_MS: u64 = 400;

fn short_ttl() -> String {
    format!("tag_ttl = \"{TTL_MS}ms\"")
}

async fn past_ttl() {
    tokio::time::sleep(Duration::from_millis(TTL_MS + 300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manifest_by_digest_is_cached_forever() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[10]);
    up.push_image("library/nginx", "1", &img);
    let st = start_stowage(&up.url(), &short_ttl()).await;
    let c = client();
    check_manifest(&c, &st, "nginx", &img.digest, &img.manifest, OCI_MANIFEST).await;
    let before = up.manifest_requests("library/nginx");
    assert!(before >= 1);
    past_ttl().await;
    check_manifest(&c, &st, "nginx", &img.digest, &img.manifest, OCI_MANIFEST).await;
    up.set_failure(Failure::Down);
    check_manifest(&c, &st, "nginx", &img.digest, &img.manifest, OCI_MANIFEST).await;
    assert_eq!(
        up.manifest_requests("library/nginx"),
        before,
        "digest manifest asked upstream again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tag_within_ttl_is_not_revalidated() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Docker, &[10]);
    up.push_image("library/nginx", "stable", &img);
    let st = start_stowage(&up.url(), "tag_ttl = \"1h\"").await;
    let c = client();
    check_manifest(&c, &st, "nginx", "stable", &img.manifest, DOCKER_MANIFEST).await;
    let before = up.manifest_requests("library/nginx");
    // Even if the tag moves upstream, within the TTL the cached one is served.
    let img2 = make_image(Format::Docker, &[11]);
    up.push_image("library/nginx", "stable", &img2);
    for _ in 0..5 {
        check_manifest(&c, &st, "nginx", "stable", &img.manifest, DOCKER_MANIFEST).await;
    }
    // Manifest requests only: the prefetch of the image's blobs may still
    // be under way.
    assert_eq!(
        up.manifest_requests("library/nginx"),
        before,
        "tag within TTL went upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tag_after_ttl_is_revalidated_with_head() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[10]);
    up.push_image("library/node", "20", &img);
    let st = start_stowage(&up.url(), &short_ttl()).await;
    let c = client();
    let url = st.manifest_url("node", "20");
    get_ok(&c, &url).await;
    let gets_tag = up.manifest_gets("library/node", "20");
    let gets_digest = up.manifest_gets("library/node", &img.digest);
    let heads = up.manifest_heads("library/node", "20");

    past_ttl().await;
    let (h, body) = get_ok(&c, &url).await;
    assert_eq!(body, img.manifest);
    assert_eq!(h["docker-content-digest"], img.digest.as_str());
    assert_eq!(
        up.manifest_heads("library/node", "20"),
        heads + 1,
        "upstream HEADs of the tag after TTL"
    );
    assert_eq!(
        up.manifest_gets("library/node", "20"),
        gets_tag,
        "unchanged tag re-downloaded"
    );
    assert_eq!(
        up.manifest_gets("library/node", &img.digest),
        gets_digest,
        "unchanged manifest re-downloaded"
    );

    // Revalidated: fresh again for another TTL.
    let before = up.total();
    get_ok(&c, &url).await;
    assert_eq!(
        up.total(),
        before,
        "freshly revalidated tag went upstream again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moved_tag_is_served_after_ttl() {
    let up = FakeUpstream::start().await;
    let img1 = make_image(Format::Oci, &[10]);
    let img2 = make_image(Format::Docker, &[20]);
    up.push_image("library/python", "3", &img1);
    let st = start_stowage(&up.url(), &short_ttl()).await;
    let c = client();
    check_manifest(&c, &st, "python", "3", &img1.manifest, OCI_MANIFEST).await;

    up.push_image("library/python", "3", &img2);
    past_ttl().await;
    check_manifest(&c, &st, "python", "3", &img2.manifest, DOCKER_MANIFEST).await;
    pull_image(&c, &st, "python", "3", &img2).await;
    // The old manifest stays available by digest.
    let before = up.total();
    check_manifest(
        &c,
        &st,
        "python",
        &img1.digest,
        &img1.manifest,
        OCI_MANIFEST,
    )
    .await;
    assert_eq!(up.total(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_tag_is_served_when_upstream_fails() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[10]);
    up.push_image("library/golang", "1", &img);
    let st = start_stowage(&up.url(), &short_ttl()).await;
    let c = client();
    check_manifest(&c, &st, "golang", "1", &img.manifest, OCI_MANIFEST).await;

    for f in [Failure::Unavailable, Failure::Down] {
        up.set_failure(f.clone());
        past_ttl().await;
        let before = up.total();
        let r = c.get(st.manifest_url("golang", "1")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{f:?}: stale manifest not served");
        assert_eq!(
            header(&r, "docker-content-digest"),
            Some(img.digest.clone()),
            "{f:?}"
        );
        assert_eq!(r.bytes().await.unwrap(), img.manifest, "{f:?}");
        if f != Failure::Down {
            assert!(
                up.total() > before,
                "{f:?}: stowage did not even try to revalidate"
            );
        }
    }
    // Unreachable upstream altogether.
    let dir = st.stop().await;
    let st = start_stowage_in(dir, &dead_url().await, &short_ttl()).await;
    past_ttl().await;
    check_manifest(&c, &st, "golang", "1", &img.manifest, OCI_MANIFEST).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_tag_is_served_when_upstream_rate_limits() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[10]);
    up.push_image("library/perl", "5", &img);
    let st = start_stowage(&up.url(), &short_ttl()).await;
    let c = client();
    check_manifest(&c, &st, "perl", "5", &img.manifest, OCI_MANIFEST).await;
    up.set_failure(Failure::TooManyRequests { retry_after: 5 });
    past_ttl().await;
    let before = up.total();
    check_manifest(&c, &st, "perl", "5", &img.manifest, OCI_MANIFEST).await;
    assert!(
        up.total() > before,
        "stowage did not even try to revalidate"
    );
}

/// Stale serving is for upstream outages only (unreachable, 5xx, 429): a
/// moved tag whose new manifest does not verify, or that upstream refuses,
/// is an error, not a reason to keep serving the old manifest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_tag_is_not_served_when_upstream_content_is_bad_or_refused() {
    let up = FakeUpstream::start().await;
    let img1 = make_image(Format::Oci, &[10]);
    let img2 = make_image(Format::Oci, &[20]);
    up.push_image("library/ruby", "3", &img1);
    let st = start_stowage(&up.url(), &short_ttl()).await;
    let c = client();
    check_manifest(&c, &st, "ruby", "3", &img1.manifest, OCI_MANIFEST).await;

    // The tag moved, and the new manifest arrives corrupted.
    up.push_image("library/ruby", "3", &img2);
    up.corrupt(&img2.digest);
    past_ttl().await;
    let r = c.get(st.manifest_url("ruby", "3")).send().await.unwrap();
    assert_oci_error(r, 502, &["UNAVAILABLE"], "moved tag, corrupt manifest").await;
    assert!(
        up.manifest_gets("library/ruby", "3") >= 2,
        "the new manifest was fetched"
    );

    // Upstream now refuses the tag outright (403 on HEAD): no stale either.
    up.uncorrupt(&img2.digest);
    up.set_private("library/ruby");
    up.enable_auth(300);
    past_ttl().await;
    let r = c.get(st.manifest_url("ruby", "3")).send().await.unwrap();
    let status = r.status().as_u16();
    assert_ne!(status, 200, "a refused tag was served stale");
}

/// A tag upstream deleted (404), or denied the mirror (403), is not
/// brought back by a later outage: its tag file goes with the answer, so
/// there is no stale copy left to serve, also after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tag_deleted_or_denied_upstream_is_not_served_stale_in_a_later_outage() {
    for (answer, code) in [(404, "MANIFEST_UNKNOWN"), (403, "DENIED")] {
        let up = FakeUpstream::start().await;
        let img = make_image(Format::Oci, &[10]);
        up.push_image("library/ruby", "3", &img);
        let st = start_stowage(&up.url(), &short_ttl()).await;
        let c = client();
        check_manifest(&c, &st, "ruby", "3", &img.manifest, OCI_MANIFEST).await;

        if answer == 404 {
            up.remove_tag("library/ruby", "3");
        } else {
            up.respond(
                "/v2/library/ruby/manifests/3",
                403,
                &[("content-type", "application/json")],
                r#"{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}"#,
            );
        }
        past_ttl().await;
        let r = c.get(st.manifest_url("ruby", "3")).send().await.unwrap();
        assert_oci_error(r, answer, &[code], "withdrawn tag").await;

        // Upstream goes down: the tag stays withdrawn.
        up.set_failure(Failure::Down);
        past_ttl().await;
        let r = c.get(st.manifest_url("ruby", "3")).send().await.unwrap();
        let status = r.status().as_u16();
        assert_ne!(
            status, 200,
            "{answer}: the tag was served stale in an outage"
        );
        // The manifest by digest is still held (digests are immutable).
        check_manifest(&c, &st, "ruby", &img.digest, &img.manifest, OCI_MANIFEST).await;

        // Nor after a restart during the outage.
        let st = start_stowage_in(st.stop().await, &up.url(), &short_ttl()).await;
        let r = c.get(st.manifest_url("ruby", "3")).send().await.unwrap();
        let status = r.status().as_u16();
        assert_ne!(
            status, 200,
            "{answer}: served stale after a restart in an outage"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_revalidations_make_one_upstream_request() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[10]);
    up.push_image("library/ruby", "3", &img);
    let st = start_stowage(&up.url(), &short_ttl()).await;
    let url = st.manifest_url("ruby", "3");
    get_ok(&client(), &url).await;
    past_ttl().await;

    let before = up.manifest_requests("library/ruby");
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(16));
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (url, img, barrier) = (url.clone(), img.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let c = client();
            barrier.wait().await;
            let (h, body) = get_ok(&c, &url).await;
            assert_eq!(body, img.manifest, "client {i}");
            assert_eq!(
                h["docker-content-digest"],
                img.digest.as_str(),
                "client {i}"
            );
        }));
    }
    for t in tasks {
        within(30, "16 revalidating clients", t).await.unwrap();
    }
    assert_eq!(
        up.manifest_heads("library/ruby", "3"),
        1,
        "upstream HEADs for 16 concurrent revalidations"
    );
    assert_eq!(
        up.manifest_requests("library/ruby") - before,
        1,
        "upstream manifest requests for 16 concurrent revalidations"
    );
}

/// Requests for one digest coalesce, but a failure is only the answer for
/// requests that asked the same: a digest that two other repositories do
/// not have (slow 404s there) is still fetched for the one that has it,
/// whichever of the others' loads it waited on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_fetch_by_digest_fails_only_requests_for_its_repository() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[10]);
    up.push_image("library/nginx", "1", &img);
    let mut elsewhere = Vec::new();
    for (repo, delay) in [("other", 600), ("third", 400)] {
        let path = format!("/v2/library/{repo}/manifests/{}", img.digest);
        up.respond(
            &path,
            404,
            &[("content-type", "application/json")],
            r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
        );
        up.delay(&path, Duration::from_millis(delay));
        elsewhere.push((repo, path));
    }
    let st = start_stowage(&up.url(), "").await;
    let c = client();
    let mut refused = Vec::new();
    for (repo, _) in &elsewhere {
        let (c, url) = (c.clone(), st.manifest_url(repo, &img.digest));
        refused.push(tokio::spawn(async move {
            c.get(&url).send().await.unwrap().status().as_u16()
        }));
        // Each request is waiting for its 404 when the next comes.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    within(
        10,
        "the digest in the repository that has it",
        check_manifest(&c, &st, "nginx", &img.digest, &img.manifest, OCI_MANIFEST),
    )
    .await;
    for (r, (repo, path)) in refused.into_iter().zip(&elsewhere) {
        assert_eq!(within(10, repo, r).await.unwrap(), 404, "{repo}");
        assert_eq!(up.count("GET", path), 1, "{repo}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_fetch_of_tag_is_coalesced() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[10]);
    up.push_image("library/php", "8", &img);
    let st = start_stowage(&up.url(), "").await;
    let url = st.manifest_url("php", "8");
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(16));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (url, img, barrier) = (url.clone(), img.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let c = client();
            barrier.wait().await;
            let (_, body) = get_ok(&c, &url).await;
            assert_eq!(body, img.manifest);
        }));
    }
    for t in tasks {
        within(30, "16 clients", t).await.unwrap();
    }
    assert_eq!(
        up.manifest_gets("library/php", "8") + up.manifest_gets("library/php", &img.digest),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manifest_not_matching_its_digest_is_rejected_and_not_cached() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[10]);
    up.push_image("library/evil", "1", &img);
    up.corrupt(&img.digest);
    let st = start_stowage(&up.url(), "").await;
    let c = client();
    let url = st.manifest_url("evil", &img.digest);
    for method in ["GET", "HEAD"] {
        let r = c
            .request(method.parse().unwrap(), &url)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body = r.bytes().await.unwrap_or_default();
        assert!(
            status.is_server_error(),
            "{method}: manifest whose bytes do not hash to the digest answered {status} \
             (body {} bytes, digest {})",
            body.len(),
            sha256_digest(&body)
        );
    }
    let before = up.manifest_requests("library/evil");
    let r = c.get(&url).send().await.unwrap();
    assert!(!r.status().is_success());
    assert!(
        up.manifest_requests("library/evil") > before,
        "bad manifest was cached"
    );

    up.uncorrupt(&img.digest);
    check_manifest(&c, &st, "evil", &img.digest, &img.manifest, OCI_MANIFEST).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tags_list_passes_through() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[10]);
    up.push_image("library/debian", "bookworm", &img);
    up.add_tag_names(
        "library/debian",
        &["bullseye", "buster", "sid", "trixie"],
        &img.digest,
    );
    let st = start_stowage(&up.url(), "").await;
    let c = client();

    let r = c.get(st.v2("debian/tags/list")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        header(&r, "content-type")
            .unwrap()
            .starts_with("application/json")
    );
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        v["tags"],
        serde_json::json!(["bookworm", "bullseye", "buster", "sid", "trixie"])
    );

    let r = c
        .get(st.v2("debian/tags/list?n=2&last=bullseye"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let link = header(&r, "link");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["buster", "sid"]));
    let seen = up
        .last_request("GET", "/v2/library/debian/tags/list")
        .unwrap();
    let q = seen.query.unwrap_or_default();
    assert!(
        q.contains("n=2") && q.contains("last=bullseye"),
        "query sent upstream: {q:?}"
    );
    assert!(
        link.is_some_and(|l| l.contains("rel=\"next\"")),
        "Link header not passed on"
    );

    let r = c.get(st.v2("nosuchrepo/tags/list")).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

/// Upstream stalls mid-body (issue 11, item 5): a moved tag whose new
/// manifest stalls after its head or halfway is served stale within about
/// the upstream timeout; an uncached manifest that stalls fails within it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_manifest_bodies_end_within_the_timeout() {
    let up = FakeUpstream::start().await;
    let img1 = make_image(Format::Oci, &[10]);
    let img2 = make_image(Format::Oci, &[20]);
    up.push_image("library/rust", "1", &img1);
    let st = start_stowage(&up.url(), &format!("{}\ntimeout = \"1s\"", short_ttl())).await;
    let c = client();
    check_manifest(&c, &st, "rust", "1", &img1.manifest, OCI_MANIFEST).await;
    up.push_image("library/rust", "1", &img2);
    for fault in [BodyFault::StallAfterHead, BodyFault::StallMidBody] {
        up.fault(&img2.digest, fault);
        past_ttl().await;
        let started = std::time::Instant::now();
        let r = within(10, "a stalled revalidation", async {
            c.get(st.manifest_url("rust", "1")).send().await.unwrap()
        })
        .await;
        let elapsed = started.elapsed();
        assert_eq!(r.status(), 200, "{fault:?}");
        assert_eq!(
            header(&r, "x-stowage-cache").as_deref(),
            Some("stale"),
            "{fault:?}"
        );
        assert_eq!(r.bytes().await.unwrap(), img1.manifest, "{fault:?}");
        assert!(
            elapsed < Duration::from_secs(4),
            "{fault:?}: stale after {elapsed:?}"
        );
        // Uncached, by digest: fails in about the timeout too.
        let started = std::time::Instant::now();
        let r = within(10, "a stalled manifest", async {
            c.get(st.manifest_url("rust", &img2.digest))
                .send()
                .await
                .unwrap()
        })
        .await;
        assert_oci_error(r, 502, &["UNAVAILABLE"], "stalled manifest by digest").await;
        assert!(started.elapsed() < Duration::from_secs(4), "{fault:?}");
    }
    // Once upstream behaves, the tag moves.
    up.clear_faults();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    check_manifest(&c, &st, "rust", "1", &img2.manifest, OCI_MANIFEST).await;
}

/// A tags list body that stalls is cut within about the upstream timeout
/// (the client's body fails; nothing hangs); a referrers answer that
/// stalls, with nothing cached to fall back on, fails within it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_tags_list_and_referrers_end_within_the_timeout() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[10]);
    up.push_image("library/debian", "bookworm", &img);
    let st = start_stowage(&up.url(), "timeout = \"1s\"").await;
    let c = client();
    // Behaving, it works.
    get_ok(&c, &st.v2("debian/tags/list")).await;
    let subjects = [sha256_digest(b"subject a"), sha256_digest(b"subject b")];
    for (fault, subject) in [BodyFault::StallAfterHead, BodyFault::StallMidBody]
        .into_iter()
        .zip(&subjects)
    {
        let referrers = format!("/v2/library/debian/referrers/{subject}");
        up.respond(
            &referrers,
            200,
            &[("content-type", OCI_INDEX)],
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#,
        );
        up.fault_path("/v2/library/debian/tags/list", fault);
        up.fault_path(&referrers, fault);
        for url in [
            st.v2("debian/tags/list"),
            st.v2(&format!("debian/referrers/{subject}")),
        ] {
            let started = std::time::Instant::now();
            let outcome = within(10, "a stalled upstream body", async {
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => r.bytes().await.map(|_| true),
                    Ok(_) => Ok(false),
                    Err(e) => Err(e),
                }
            })
            .await;
            assert!(
                !matches!(outcome, Ok(true)),
                "{url} {fault:?}: a stalled body completed"
            );
            assert!(
                started.elapsed() < Duration::from_secs(4),
                "{url} {fault:?}: ended after {:?}",
                started.elapsed()
            );
        }
        up.clear_faults();
    }
}

/// A tags list's `Link` to the next page keeps the client on the same
/// upstream: through `?ns=` and through a path prefix, every page comes
/// from the upstream the first did (never from the default upstream).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tags_list_link_stays_on_the_same_upstream() {
    let hub = FakeUpstream::start().await;
    let other = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[10]);
    let tags = ["a", "b", "c", "d", "e"];
    for up in [&hub, &other] {
        up.push_image("org/app", "a", &img);
        up.add_tag_names("org/app", &tags, &img.digest);
    }
    hub.push_image("library/debian", "a", &img);
    hub.add_tag_names("library/debian", &tags, &img.digest);
    let dir = tempfile::TempDir::new().unwrap();
    let toml = format!(
        "{}\n[[upstream]]\nhost = \"other.io\"\nurl = \"{}\"\n",
        config_toml(dir.path(), &hub.url(), ""),
        other.url()
    );
    let st = start_stowage_toml(dir, &toml).await;
    let c = client();
    for (start, from, upstream_path) in [
        (
            st.v2("org/app/tags/list?ns=other.io&n=2"),
            &other,
            "/v2/org/app/tags/list",
        ),
        (
            st.v2("other.io/org/app/tags/list?n=2"),
            &other,
            "/v2/org/app/tags/list",
        ),
        (
            st.v2("debian/tags/list?n=2"),
            &hub,
            "/v2/library/debian/tags/list",
        ),
    ] {
        let (hub_before, other_before) = (hub.total(), other.total());
        let from_before = from.count("GET", upstream_path);
        let mut url = start.clone();
        let mut seen = Vec::new();
        for page in 0..10 {
            let r = c.get(&url).send().await.unwrap();
            assert_eq!(r.status(), 200, "{start}: page {page} ({url})");
            let link = header(&r, "link");
            let v: serde_json::Value = r.json().await.unwrap();
            seen.extend(
                v["tags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_str().unwrap().to_string()),
            );
            let Some(link) = link else { break };
            let target = link
                .strip_prefix('<')
                .and_then(|l| l.split_once('>'))
                .map(|(t, rest)| {
                    assert!(rest.contains("rel=\"next\""), "{link}");
                    t.to_string()
                })
                .unwrap_or_else(|| panic!("{start}: bad Link {link:?}"));
            assert!(
                target.starts_with("/v2/"),
                "{start}: Link {target} leaves the mirror"
            );
            url = format!("{}{target}", st.url());
        }
        assert_eq!(seen, tags, "{start}: all pages");
        assert_eq!(from.count("GET", upstream_path) - from_before, 3, "{start}");
        let strays = if std::ptr::eq(from, &other) {
            hub.total() - hub_before
        } else {
            other.total() - other_before
        };
        assert_eq!(strays, 0, "{start}: a page went to the other upstream");
    }
}

/// The names that appear in watched directories (inotify): created there
/// (`IN_CREATE`), or renamed into them (`IN_MOVED_TO`).
struct DirWatch {
    fd: std::os::fd::OwnedFd,
}

impl DirWatch {
    fn new() -> DirWatch {
        use rustix::fs::inotify;
        DirWatch {
            fd: inotify::init(inotify::CreateFlags::NONBLOCK).unwrap(),
        }
    }

    fn add(&self, dir: &std::path::Path) {
        use rustix::fs::inotify::{WatchFlags, add_watch};
        add_watch(&self.fd, dir, WatchFlags::CREATE | WatchFlags::MOVED_TO).unwrap();
    }

    /// (created, renamed in) since the last call.
    fn names(&self) -> (Vec<String>, Vec<String>) {
        use rustix::fs::inotify::{ReadFlags, Reader};
        let mut buf = [std::mem::MaybeUninit::uninit(); 4096];
        let mut reader = Reader::new(&self.fd, &mut buf);
        let (mut created, mut moved) = (vec![], vec![]);
        loop {
            let event = match reader.next() {
                Ok(e) => e,
                Err(rustix::io::Errno::AGAIN) => return (created, moved),
                Err(e) => panic!("reading inotify events: {e}"),
            };
            let name = event
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if event.events().contains(ReadFlags::CREATE) {
                created.push(name);
            } else if event.events().contains(ReadFlags::MOVED_TO) {
                moved.push(name);
            }
        }
    }
}

/// The directories named `name` under `dir`.
fn dirs_named(dir: &std::path::Path, name: &str) -> Vec<std::path::PathBuf> {
    let mut found = vec![];
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            if e.file_name() == name {
                found.push(e.path());
            } else {
                found.extend(dirs_named(&e.path(), name));
            }
        }
    }
    found
}

/// A manifest or tag file is replaced through a temporary file in the
/// cache's `tmp/` (emptied at start-up), not beside it: one beside it,
/// left by a kill -9 in the middle of the write, would stay for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manifest_and_tag_files_are_not_written_through_temporary_files_beside_them() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[10]);
    up.push_image("library/nginx", "1", &img);
    let st = start_stowage(&up.url(), &short_ttl()).await;
    let c = client();
    let manifests = st.dir.path().join("manifests").join("sha256");
    std::fs::create_dir_all(&manifests).unwrap();
    let watch = DirWatch::new();
    watch.add(&manifests);
    let hex = |d: &str| d.trim_start_matches("sha256:").to_string();
    let landed = |d: &str| manifests.join(hex(d)).exists();

    check_manifest(&c, &st, "nginx", "1", &img.manifest, OCI_MANIFEST).await;
    within(10, "the manifest file is written", async {
        while !landed(&img.digest) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let tags = dirs_named(&st.dir.path().join("tags"), "_tags");
    assert_eq!(tags.len(), 1, "{tags:?}");
    watch.add(&tags[0]);
    let tag_files = || std::fs::read_dir(&tags[0]).unwrap().count();
    let before = tag_files();
    assert!(before >= 1);

    // The tag moves: a new manifest file, and the tag file rewritten.
    let img2 = make_image(Format::Oci, &[11]);
    up.push_image("library/nginx", "1", &img2);
    past_ttl().await;
    check_manifest(&c, &st, "nginx", "1", &img2.manifest, OCI_MANIFEST).await;
    within(10, "the new manifest file is written", async {
        while !landed(&img2.digest) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (created, moved) = watch.names();
    assert!(
        created.is_empty(),
        "files created beside manifests or tags: {created:?}"
    );
    // The watch saw the writes: both manifests and the tag renamed in.
    assert!(moved.contains(&hex(&img.digest)), "{moved:?}");
    assert!(moved.contains(&hex(&img2.digest)), "{moved:?}");
    assert!(moved.len() >= 3, "no tag file rewritten: {moved:?}");
    assert_eq!(tag_files(), before);
}

/// A manifest whose body names a media type that is not one (a newline
/// in it), served with a generic `Content-Type`: it is served, with a
/// `Content-Type`, and kept on disk like any other. The newline once left
/// it without `Content-Type`, and split its file so that it never read
/// back: not served from the cache after a restart with upstream out.
#[tokio::test]
async fn a_manifest_naming_a_malformed_media_type_is_served_and_kept() {
    let up = FakeUpstream::start().await;
    let body = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json\nx","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":0},"layers":[]}"#;
    let digest = sha256_digest(body.as_bytes());
    up.respond(
        &format!("/v2/odd/img/manifests/{digest}"),
        200,
        &[("content-type", "application/json")],
        body,
    );
    let get = async |st: &Stowage| {
        let r = client()
            .get(st.manifest_url("odd/img", &digest))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let content_type = header(&r, "content-type");
        (status, content_type, r.bytes().await.unwrap())
    };
    let st = start_stowage_no_prefetch(&up.url(), "").await;
    let oci = Some("application/vnd.oci.image.manifest.v1+json".to_string());
    let (status, content_type, got) = get(&st).await;
    assert_eq!((status, &content_type), (200, &oci));
    assert_eq!(got, body.as_bytes());
    let dir = st.stop().await;
    up.set_failure(Failure::Unavailable);
    let st = start_stowage_in(dir, &up.url(), "").await;
    let (status, content_type, got) = get(&st).await;
    assert_eq!((status, content_type), (200, oci), "served from the cache");
    assert_eq!(got, body.as_bytes());
}

/// Manifest files in a cache directory.
fn manifest_files(cache: &std::path::Path) -> usize {
    std::fs::read_dir(cache.join("manifests"))
        .map(|algs| {
            algs.flatten()
                .map(|a| std::fs::read_dir(a.path()).map_or(0, |f| f.count()))
                .sum()
        })
        .unwrap_or(0)
}

/// The manifest files on disk stay within `cache.max_manifests` as they are
/// written, not only at the pruner's ten-minute tick (which had let any
/// number pile up in between), and `/metrics` shows them and the pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manifest_files_are_pruned_as_soon_as_they_pass_their_bound() {
    let up = FakeUpstream::start().await;
    let images: Vec<_> = (0..30)
        .map(|i| {
            let img = make_image(Format::Oci, &[i + 1]);
            up.push_image("library/many", &format!("t{i}"), &img);
            img
        })
        .collect();
    let dir = tempfile::TempDir::new().unwrap();
    let toml = format!(
        "prefetch = false\n{}\n[cache]\nmax_manifests = 10\n",
        config_toml(dir.path(), &up.url(), "")
    );
    let st = start_stowage_toml(dir, &toml).await;
    let c = client();
    for img in &images {
        check_manifest(&c, &st, "many", &img.digest, &img.manifest, OCI_MANIFEST).await;
    }
    let cache = st.dir.path().to_path_buf();
    // Settled: within the bound, and every file written either on disk or
    // counted as pruned (the counter moves at the end of a prune).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let kept = loop {
        let files = manifest_files(&cache) as f64;
        let pruned = metric(&st, "stowage_manifests_pruned_total", &[]).await;
        if files <= 10.0 && files + pruned == 30.0 {
            break files;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{files} manifest files on disk and {pruned} pruned 10 s after the writes, bound 10"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(kept >= 9.0, "pruned below nine tenths of the bound: {kept}");
    // A file written while a scan ran may count twice until the next scan.
    let shown = metric(&st, "stowage_manifest_disk_files", &[]).await;
    assert!(
        (kept..=kept + 2.0).contains(&shown),
        "{shown} files shown, {kept} on disk"
    );
    assert!(metric(&st, "stowage_manifest_disk_bytes", &[]).await > 0.0);
    // The most recently written are the ones kept, and every manifest is
    // still served (from memory, or upstream again).
    let last = images.last().unwrap();
    let hex = last.digest.trim_start_matches("sha256:");
    assert!(cache.join("manifests/sha256").join(hex).exists());
    for img in &images {
        check_manifest(&c, &st, "many", &img.digest, &img.manifest, OCI_MANIFEST).await;
    }
}
