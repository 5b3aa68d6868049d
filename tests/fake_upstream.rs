//! Self-tests of the fake upstream registry in tests/common, talking to it
//! directly (no stowage involved). If these fail, the other suites' results
//! mean nothing.

mod common;

use common::*;

#[tokio::test]
async fn serves_generated_image() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[1000, 70_000]);
    up.push_image("library/alpine", "3.20", &img);
    let c = client();

    let r = c.get(format!("{}/v2/", up.url())).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "docker-distribution-api-version").as_deref(),
        Some("registry/2.0")
    );

    let r = c
        .get(format!("{}/v2/library/alpine/manifests/3.20", up.url()))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type").as_deref(), Some(OCI_MANIFEST));
    assert_eq!(
        header(&r, "docker-content-digest").as_deref(),
        Some(img.digest.as_str())
    );
    assert_eq!(
        header(&r, "content-length"),
        Some(img.manifest.len().to_string())
    );
    let body = r.bytes().await.unwrap();
    assert_eq!(body, img.manifest);
    assert_eq!(sha256_digest(&body), img.digest);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["config"]["digest"], img.config.digest.as_str());
    assert_eq!(v["layers"][1]["size"], 70_000);

    for b in img.blobs() {
        let url = format!("{}/v2/library/alpine/blobs/{}", up.url(), b.digest);
        let r = c.head(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "content-length"), Some(b.len().to_string()));
        assert_eq!(
            header(&r, "docker-content-digest").as_deref(),
            Some(b.digest.as_str())
        );
        assert!(r.bytes().await.unwrap().is_empty());
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let body = r.bytes().await.unwrap();
        assert_eq!(sha256_digest(&body), b.digest);
        assert_eq!(up.blob_gets(&b.digest), 1);
        assert_eq!(up.blob_heads(&b.digest), 1);
    }
    // by digest, and HEAD
    let r = c
        .head(format!(
            "{}/v2/library/alpine/manifests/{}",
            up.url(),
            img.digest
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "content-length"),
        Some(img.manifest.len().to_string())
    );
    assert_eq!(up.manifest_gets("library/alpine", "3.20"), 1);
    assert_eq!(up.manifest_heads("library/alpine", &img.digest), 1);
    assert_eq!(
        up.last_request("GET", "/v2/library/alpine/manifests/3.20")
            .unwrap()
            .header("accept")
            .as_deref(),
        Some(OCI_MANIFEST)
    );
    assert_eq!(up.total(), 1 + 1 + 2 * 3 + 1);

    // Docker format and index
    let d = make_image(Format::Docker, &[10]);
    assert_eq!(d.media_type.as_str(), DOCKER_MANIFEST);
    let idx = make_index(
        Format::Oci,
        vec![
            (d.clone(), "amd64"),
            (make_image_for(Format::Oci, &[5], "arm64"), "arm64"),
        ],
    );
    up.push_index("library/multi", "latest", &idx);
    let r = c
        .get(format!("{}/v2/library/multi/manifests/latest", up.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "content-type").as_deref(), Some(OCI_INDEX));
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["manifests"][0]["digest"], d.digest.as_str());
    let r = c
        .get(format!(
            "{}/v2/library/multi/manifests/{}",
            up.url(),
            d.digest
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "content-type").as_deref(), Some(DOCKER_MANIFEST));
}

#[tokio::test]
async fn unknown_things_are_404_with_codes() {
    let up = FakeUpstream::start().await;
    let c = client();
    let r = c
        .get(format!("{}/v2/library/x/manifests/nope", up.url()))
        .send()
        .await
        .unwrap();
    assert_oci_error(r, 404, &["MANIFEST_UNKNOWN"], "manifest").await;
    let r = c
        .get(format!(
            "{}/v2/library/x/blobs/{}",
            up.url(),
            sha256_digest(b"nope")
        ))
        .send()
        .await
        .unwrap();
    assert_oci_error(r, 404, &["BLOB_UNKNOWN"], "blob").await;
}

#[tokio::test]
async fn tags_list_pagination() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[1]);
    up.push_image("library/t", "a", &img);
    up.add_tag_names("library/t", &["b", "c", "d"], &img.digest);
    let c = client();
    let v: serde_json::Value = c
        .get(format!("{}/v2/library/t/tags/list?n=2&last=a", up.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        v,
        serde_json::json!({"name": "library/t", "tags": ["b", "c"]})
    );
    assert_eq!(
        up.last_request("GET", "/v2/library/t/tags/list")
            .unwrap()
            .query
            .as_deref(),
        Some("n=2&last=a")
    );
}

#[tokio::test]
async fn ranges() {
    let up = FakeUpstream::start().await;
    let b = Blob::random(100);
    up.add_blob(b.data.clone());
    let c = client();
    let url = format!("{}/v2/r/blobs/{}", up.url(), b.digest);
    let r = c
        .get(&url)
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        header(&r, "content-range").as_deref(),
        Some("bytes 10-19/100")
    );
    assert_eq!(r.bytes().await.unwrap(), b.data.slice(10..20));
    let r = c
        .get(&url)
        .header("range", "bytes=-5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), b.data.slice(95..));
    let r = c
        .get(&url)
        .header("range", "bytes=100-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
}

#[tokio::test]
async fn token_auth_flow() {
    let up = FakeUpstream::start().await;
    up.enable_auth(1);
    up.set_credentials("alice", "s3cret");
    up.set_private("alice/secret");
    let img = make_image(Format::Oci, &[10]);
    up.push_image("library/pub", "latest", &img);
    up.push_image("alice/secret", "latest", &img);
    let c = client();

    let r = c
        .get(format!("{}/v2/library/pub/manifests/latest", up.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let chall = header(&r, "www-authenticate").unwrap();
    assert_eq!(
        chall,
        format!(
            "Bearer realm=\"{}/token\",service=\"fake\",scope=\"repository:library/pub:pull\"",
            up.url()
        )
    );

    let tok: serde_json::Value = c
        .get(format!(
            "{}/token?service=fake&scope=repository%3Alibrary%2Fpub%3Apull",
            up.url()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tok["expires_in"], 1);
    let t = tok["token"].as_str().unwrap().to_string();
    let r = c
        .get(format!("{}/v2/library/pub/manifests/latest", up.url()))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // the anonymous token does not open other repos
    let r = c
        .get(format!("{}/v2/alice/secret/manifests/latest", up.url()))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // private: anonymous token has no access; wrong password refused.
    let tok: serde_json::Value = c
        .get(format!(
            "{}/token?service=fake&scope=repository:alice/secret:pull",
            up.url()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = c
        .get(format!("{}/v2/alice/secret/manifests/latest", up.url()))
        .bearer_auth(tok["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .get(format!(
            "{}/token?service=fake&scope=repository:alice/secret:pull",
            up.url()
        ))
        .basic_auth("alice", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let tok: serde_json::Value = c
        .get(format!(
            "{}/token?service=fake&scope=repository:alice/secret:pull",
            up.url()
        ))
        .basic_auth("alice", Some("s3cret"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let t2 = tok["token"].as_str().unwrap().to_string();
    let r = c
        .get(format!("{}/v2/alice/secret/manifests/latest", up.url()))
        .bearer_auth(&t2)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.token_requests(), 4);
    assert!(
        up.last_token_request()
            .unwrap()
            .header("authorization")
            .unwrap()
            .starts_with("Basic ")
    );

    // expiry
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = c
        .get(format!("{}/v2/alice/secret/manifests/latest", up.url()))
        .bearer_auth(&t2)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn hold_corrupt_chunked_and_failures() {
    let up = FakeUpstream::start().await;
    let b = Blob::random(1 << 20);
    up.add_blob(b.data.clone());
    let c = client();
    let url = format!("{}/v2/r/blobs/{}", up.url(), b.digest);

    // hold: half arrives, then nothing until release
    let hold = up.hold(&b.digest);
    let mut r = c.get(&url).send().await.unwrap();
    assert_eq!(header(&r, "content-length"), Some((1 << 20).to_string()));
    hold.wait_half_sent(1).await;
    let mut got = Vec::new();
    while got.len() < (1 << 19) {
        got.extend_from_slice(&within(10, "first half", r.chunk()).await.unwrap().unwrap());
    }
    assert_eq!(got.len(), 1 << 19);
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(100), r.chunk())
            .await
            .is_err(),
        "held body must not progress"
    );
    hold.release();
    while let Some(ch) = r.chunk().await.unwrap() {
        got.extend_from_slice(&ch);
    }
    assert_eq!(sha256_digest(&got), b.digest);
    hold.wait_completed(1).await;
    assert_eq!(hold.dropped(), 0);
    up.unhold(&b.digest);

    // a dropped held body is reported
    let hold = up.hold(&b.digest);
    let r = c.get(&url).send().await.unwrap();
    hold.wait_half_sent(1).await;
    drop(r);
    within(10, "drop noticed", async {
        while hold.dropped() == 0 {
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    up.unhold(&b.digest);

    // corrupt: same length, other hash
    up.corrupt(&b.digest);
    let body = c.get(&url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(body.len(), b.len());
    assert_ne!(sha256_digest(&body), b.digest);
    up.uncorrupt(&b.digest);

    // truncated: the transfer fails on the client
    up.truncate(&b.digest);
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(header(&r, "content-length"), Some((1 << 20).to_string()));
    assert!(r.bytes().await.is_err(), "truncated body must fail");
    up.untruncate(&b.digest);

    // chunked
    up.set_chunked(true);
    let r = c.get(&url).send().await.unwrap();
    assert!(header(&r, "content-length").is_none());
    assert_eq!(header(&r, "transfer-encoding").as_deref(), Some("chunked"));
    assert_eq!(sha256_digest(&r.bytes().await.unwrap()), b.digest);
    up.set_chunked(false);

    up.set_failure(Failure::Unavailable);
    let r = c.get(&url).send().await.unwrap();
    assert_oci_error(r, 503, &["UNAVAILABLE"], "503").await;
    up.set_failure(Failure::TooManyRequests { retry_after: 7 });
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(header(&r, "retry-after").as_deref(), Some("7"));
    assert_oci_error(r, 429, &["TOOMANYREQUESTS"], "429").await;
    up.set_failure(Failure::Down);
    assert!(client().get(&url).send().await.is_err());
    assert!(c.get(&url).send().await.is_err());
    up.set_failure(Failure::None);
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);

    let dead = dead_url().await;
    assert!(c.get(format!("{dead}/v2/")).send().await.is_err());
}

/// The fake negotiates manifests by `Accept` as distribution 2.8 does
/// (measured against Debian's docker-registry 2.8.2; see ARCHITECTURE.md).
#[tokio::test]
async fn negotiates_manifests_like_distribution() {
    let up = FakeUpstream::start().await;
    let amd64 = make_image_for(Format::Docker, &[100], "amd64");
    let arm64 = make_image_for(Format::Docker, &[100], "arm64");
    let list = make_index(
        Format::Docker,
        vec![(amd64.clone(), "amd64"), (arm64, "arm64")],
    );
    up.push_index("app/docker", "v1", &list);
    let oci = make_image(Format::Oci, &[100]);
    up.push_image("app/oci", "v1", &oci);
    let c = client();
    // (repo, reference, Accept or none) -> (status, Docker-Content-Digest)
    let ask = |repo: &str, reference: &str, accept: Option<&str>| {
        let url = format!("{}/v2/{repo}/manifests/{reference}", up.url());
        let c = c.clone();
        let accept = accept.map(str::to_string);
        async move {
            // `*/*` stands in for no Accept: the client's default would
            // otherwise apply, and distribution reads both the same way.
            let r = c
                .get(&url)
                .header("accept", accept.as_deref().unwrap_or("*/*"))
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                header(&r, "content-type").unwrap_or_default(),
                header(&r, "docker-content-digest").unwrap_or_default(),
            )
        }
    };
    // A list by tag: the list to list clients, its amd64 manifest to
    // schema 2 clients, a schema 1 conversion to the others.
    let r = ask("app/docker", "v1", Some(ACCEPT_ALL)).await;
    assert_eq!((r.0, r.2.as_str()), (200, list.digest.as_str()));
    let r = ask("app/docker", "v1", Some(DOCKER_MANIFEST)).await;
    assert_eq!((r.0, r.2.as_str()), (200, amd64.digest.as_str()));
    let r = ask("app/docker", "v1", Some(OCI_MANIFEST)).await;
    assert_eq!((r.0, r.1.as_str()), (200, common::fake::SCHEMA1_SIGNED));
    let r = ask("app/docker", "v1", None).await;
    assert_eq!((r.0, r.1.as_str()), (200, common::fake::SCHEMA1_SIGNED));
    // By digest a list goes to anyone, q values ignored.
    let r = ask(
        "app/docker",
        &list.digest,
        Some(&format!("{DOCKER_LIST};q=0")),
    )
    .await;
    assert_eq!((r.0, r.2.as_str()), (200, list.digest.as_str()));
    let r = ask("app/docker", &list.digest, None).await;
    assert_eq!((r.0, r.2.as_str()), (200, list.digest.as_str()));
    // OCI only to clients accepting OCI, by tag and by digest.
    for reference in ["v1", oci.digest.as_str()] {
        assert_eq!(ask("app/oci", reference, None).await.0, 404);
        assert_eq!(
            ask("app/oci", reference, Some(DOCKER_MANIFEST)).await.0,
            404
        );
        let r = ask("app/oci", reference, Some(OCI_MANIFEST)).await;
        assert_eq!((r.0, r.2.as_str()), (200, oci.digest.as_str()));
    }
}

/// The fault knobs behave as documented, seen by a plain client.
#[tokio::test]
async fn body_faults() {
    use std::time::{Duration, Instant};
    let up = FakeUpstream::start().await;
    let data = random_bytes(20_000);
    let digest = up.add_blob(data.clone());
    let url = format!("{}/v2/r/blobs/{digest}", up.url());
    let c = client();

    // Headers arrive, the body never does.
    up.fault(&digest, BodyFault::StallAfterHead);
    let r = within(5, "head of a stalled body", c.get(&url).send())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-length"), Some("20000".into()));
    let read = tokio::time::timeout(Duration::from_millis(500), r.bytes()).await;
    assert!(read.is_err(), "a stalled body ended: {read:?}");

    // Half, then nothing.
    up.fault(&digest, BodyFault::StallMidBody);
    let mut r = c.get(&url).send().await.unwrap();
    let mut got = 0;
    while got < 10_000 {
        got += r.chunk().await.unwrap().unwrap().len();
    }
    assert_eq!(got, 10_000);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), r.chunk())
            .await
            .is_err()
    );
    drop(r);

    // Reset mid-body and a body shorter than its Content-Length: errors.
    for fault in [BodyFault::ResetMidBody, BodyFault::ShorterThanLength(10)] {
        up.fault(&digest, fault);
        let r = c.get(&url).send().await.unwrap();
        assert!(r.bytes().await.is_err(), "{fault:?}");
    }

    // A Content-Length 100 bytes short: the client gets that many.
    up.fault(&digest, BodyFault::LongerThanLength(100));
    let body = c.get(&url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(&body[..], &data[..data.len() - 100]);

    // 5000 bytes at 10 KiB/s: complete, in about half a second.
    let small = random_bytes(5_000);
    let d2 = up.add_blob(small.clone());
    up.fault(&d2, BodyFault::Drip(10_240));
    let started = Instant::now();
    let body = c
        .get(format!("{}/v2/r/blobs/{d2}", up.url()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(body, small);
    assert!(started.elapsed() >= Duration::from_millis(400));

    // Bursts of statuses, then normal again; per-repository blobs; delays.
    up.clear_faults();
    up.fail_next(&[503, 500]);
    let s1 = c.get(&url).send().await.unwrap();
    assert_eq!(s1.status(), 503);
    assert_eq!(header(&s1, "retry-after"), Some("1".into()));
    assert_eq!(c.get(&url).send().await.unwrap().status(), 500);
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    up.blob_only_in(&digest, &["r"]);
    let other = format!("{}/v2/other/blobs/{digest}", up.url());
    assert_eq!(c.get(&other).send().await.unwrap().status(), 404);
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    up.delay(
        &format!("/v2/other/blobs/{digest}"),
        Duration::from_millis(300),
    );
    let started = Instant::now();
    assert_eq!(c.get(&other).send().await.unwrap().status(), 404);
    assert!(started.elapsed() >= Duration::from_millis(300));
}
