//! Docker Hub style bearer-token auth towards the upstream.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;

fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anonymous_pull_of_public_repo_fetches_one_token() {
    let up = FakeUpstream::start().await;
    up.enable_auth(300);
    let img = make_image(Format::Oci, &[100, 200, 300, 400, 500]);
    up.push_image("library/alpine", "latest", &img);
    let st = start_stowage(&up.url(), "").await;
    let c = client();

    pull_image(&c, &st, "alpine", "latest", &img).await;
    pull_image(&c, &st, "alpine", &img.digest, &img).await;
    assert_eq!(
        up.token_requests(),
        1,
        "token requests for one pull of one repository"
    );

    let t = up.last_token_request().unwrap();
    assert!(
        t.header("authorization").is_none(),
        "anonymous token request carried credentials"
    );
    let q = t.query.unwrap_or_default();
    assert!(
        q.contains("scope=repository%3Alibrary%2Falpine%3Apull")
            || q.contains("scope=repository:library/alpine:pull"),
        "token scope: {q:?}"
    );
    assert!(q.contains("service=fake"), "token service: {q:?}");

    // Every request that reached the registry after the token carried it.
    let reqs = up.requests();
    let first_token = reqs.iter().position(|r| r.path == "/token").unwrap();
    for r in &reqs[first_token + 1..] {
        assert!(
            r.header("authorization")
                .is_some_and(|a| a.starts_with("Bearer faketoken-")),
            "{} {} without the bearer token",
            r.method,
            r.path
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_is_reused_across_many_requests() {
    let up = FakeUpstream::start().await;
    up.enable_auth(300);
    let images: Vec<Image> = (0..4)
        .map(|_| make_image(Format::Oci, &[1000, 2000, 3000]))
        .collect();
    for (i, img) in images.iter().enumerate() {
        up.push_image("library/many", &format!("t{i}"), img);
    }
    let st = start_stowage(&up.url(), "").await;
    let c = client();
    for (i, img) in images.iter().enumerate() {
        pull_image(&c, &st, "many", &format!("t{i}"), img).await;
    }
    assert!(
        up.registry_requests() >= 4 * 5,
        "too few upstream requests to prove reuse"
    );
    assert_eq!(
        up.token_requests(),
        1,
        "token requests for 4 pulls of one repository"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_is_refetched_after_expiry() {
    let up = FakeUpstream::start().await;
    up.enable_auth(2);
    let img1 = make_image(Format::Oci, &[1000]);
    let img2 = make_image(Format::Oci, &[1000]);
    up.push_image("library/exp", "1", &img1);
    up.push_image("library/exp", "2", &img2);
    let st = start_stowage(&up.url(), "").await;
    let c = client();
    pull_image(&c, &st, "exp", "1", &img1).await;
    assert_eq!(up.token_requests(), 1);

    tokio::time::sleep(Duration::from_millis(2300)).await;
    // The old token is now refused by upstream; stowage must get a new one.
    pull_image(&c, &st, "exp", "2", &img2).await;
    assert_eq!(up.token_requests(), 2, "token requests after expiry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn private_repo_with_configured_credentials() {
    let up = FakeUpstream::start().await;
    up.enable_auth(300);
    up.set_credentials("alice", "s3cret");
    up.set_private("alice/secret");
    let img = make_image(Format::Docker, &[100, 5000]);
    up.push_image("alice/secret", "v1", &img);
    let st = start_stowage(&up.url(), "username = \"alice\"\npassword = \"s3cret\"").await;
    let c = client();

    pull_image(&c, &st, "alice/secret", "v1", &img).await;
    assert_eq!(up.token_requests(), 1);
    let t = up.last_token_request().unwrap();
    assert_eq!(
        t.header("authorization"),
        Some(basic("alice", "s3cret")),
        "token request credentials"
    );
    assert!(
        t.query.unwrap_or_default().contains("alice"),
        "token scope names the repository"
    );
    for r in up.requests().iter().filter(|r| r.path.starts_with("/v2/")) {
        assert!(
            !r.header("authorization")
                .is_some_and(|a| a.starts_with("Basic ")),
            "password sent to the registry itself: {} {}",
            r.method,
            r.path
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn private_repo_without_credentials_is_refused() {
    let up = FakeUpstream::start().await;
    up.enable_auth(300);
    up.set_credentials("alice", "s3cret");
    up.set_private("alice/secret");
    let img = make_image(Format::Oci, &[100]);
    up.push_image("alice/secret", "v1", &img);
    let c = client();

    for extra in ["", "username = \"alice\"\npassword = \"wrong\""] {
        let st = start_stowage(&up.url(), extra).await;
        for url in [
            st.manifest_url("alice/secret", "v1"),
            st.blob_url("alice/secret", &img.config.digest),
        ] {
            let r = c.get(&url).send().await.unwrap();
            let status = r.status().as_u16();
            assert!(
                matches!(status, 403 | 404 | 502),
                "{extra:?}: GET {url}: status {status}"
            );
            assert_oci_error(
                r,
                status,
                &[
                    "DENIED",
                    "NAME_UNKNOWN",
                    "MANIFEST_UNKNOWN",
                    "BLOB_UNKNOWN",
                    "UNAVAILABLE",
                ],
                &url,
            )
            .await;
        }
    }
}
